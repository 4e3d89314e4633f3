//! What the router answers to writes, and to listings too large for one answer: a read-only
//! registry (an agent) refuses every upload route; a manifest body is read whole up to its
//! limit, or refused, never cut short; a manifest must be UTF-8 (JSON is).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use tower::ServiceExt as _;

use super::test_store::Empty;
use super::DIGEST_HEADER;
use crate::digest::{Algorithm, Digest};
use crate::ApiConfig;

async fn status(router: axum::Router, method: Method, path: &str) -> StatusCode {
    let req = Request::builder().method(method).uri(path).body(Body::empty()).unwrap();
    router.oneshot(req).await.unwrap().status()
}

/// A read-only registry (an agent) answers every upload route with 405 `UNSUPPORTED`,
/// reads of an upload session's status included (they reached the store, whose refusal was a
/// 500 and an error in the log).
#[tokio::test]
async fn a_read_only_registry_refuses_every_upload_route() {
    let api = ApiConfig { read_only: true, ..ApiConfig::default() };
    let router = crate::router(Arc::new(Empty), api);
    let session = "/v2/team/app/blobs/uploads/abc";
    for (method, path) in [
        (Method::GET, session),
        (Method::HEAD, session),
        (Method::PATCH, session),
        (Method::PUT, session),
        (Method::DELETE, session),
        (Method::POST, "/v2/team/app/blobs/uploads/"),
    ] {
        assert_eq!(
            status(router.clone(), method.clone(), path).await,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
    }
    assert_eq!(
        status(
            router,
            Method::GET,
            "/v2/team/app/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000"
        )
        .await,
        StatusCode::NOT_FOUND
    );
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn manifest_json(extra: &str) -> Vec<u8> {
    let d = format!("sha256:{}", "0".repeat(64));
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",{extra}"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{d}","size":2}},"layers":[]}}"#
    )
    .into_bytes()
}

async fn put(config: ApiConfig, body: Vec<u8>) -> axum::response::Response {
    let router = crate::router(Arc::new(Empty), config);
    let req = Request::builder()
        .method(Method::PUT)
        .uri("/v2/team/app/manifests/v1")
        .header(header::CONTENT_TYPE, OCI_MANIFEST)
        .body(Body::from(body))
        .unwrap();
    router.oneshot(req).await.unwrap()
}

/// A limit above the bytes read past a limit before a 413 (64 MiB): the body was cut there
/// and the rest stored as the manifest, under a digest the client never pushed.
#[tokio::test]
async fn a_manifest_above_64_mib_under_its_limit_is_read_whole() {
    let mut body = manifest_json("");
    body.resize(65 << 20, b' ');
    let whole = Digest::of(Algorithm::Sha256, &body).to_string();
    let config = ApiConfig { max_manifest_size: 128 << 20, ..ApiConfig::default() };
    let r = put(config.clone(), body.clone()).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()[DIGEST_HEADER].to_str().unwrap(), whole);
    // Over its limit: refused, not cut.
    body.resize(129 << 20, b' ');
    assert_eq!(put(config, body).await.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

/// A manifest body that stalls past the server's body timeout is 408, which a client may
/// send again; it was 400 `MANIFEST_INVALID`, which says the content is wrong for good.
#[tokio::test]
async fn a_manifest_body_that_times_out_is_408_not_invalid() {
    let router = crate::router(Arc::new(Empty), ApiConfig::default());
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = vec![
        Ok(bytes::Bytes::from_static(b"{\"schemaVersion\":")),
        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no byte for 30 s")),
    ];
    let req = Request::builder()
        .method(Method::PUT)
        .uri("/v2/team/app/manifests/v1")
        .header(header::CONTENT_TYPE, OCI_MANIFEST)
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    let r = router.oneshot(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::REQUEST_TIMEOUT);
}

#[tokio::test]
async fn a_manifest_that_is_not_utf8_is_invalid() {
    // An unknown field: serde_json skips its string without checking it.
    let mut body = manifest_json(r#""x":"ff","#);
    let at = body.windows(2).position(|w| w == b"ff").unwrap();
    body[at] = 0xff;
    let r = put(ApiConfig::default(), body).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let text = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    assert!(
        String::from_utf8_lossy(&text).contains("MANIFEST_INVALID"),
        "{}",
        String::from_utf8_lossy(&text)
    );
}

/// An `n` above the most one answer holds is refused, not answered with fewer.
/// An `n` above one answer's most is served as that most (the spec lets an answer hold
/// fewer than `n` when a `Link` follows); it was refused with 400. Not a number still is.
#[tokio::test]
async fn a_listing_larger_than_one_answer_is_served_a_page_at_a_time() {
    let router = crate::router(Arc::new(Empty), ApiConfig::default());
    let max = super::MAX_PAGE;
    // The empty store knows no repository: the request got through to it.
    for n in [max, max + 1, 1_000_000] {
        let path = format!("/v2/team/app/tags/list?n={n}");
        assert_eq!(status(router.clone(), Method::GET, &path).await, StatusCode::NOT_FOUND, "n={n}");
    }
    assert_eq!(status(router, Method::GET, "/v2/team/app/tags/list?n=x").await, StatusCode::BAD_REQUEST);
}

/// Refuses every repository write and upload with a challenge, as origins with `[auth]` do
/// to an agent's anonymous client.
struct Challenging;

#[async_trait::async_trait]
impl crate::auth::Authorize for Challenging {
    async fn authorize(
        &self,
        check: &crate::auth::AccessCheck<'_>,
    ) -> Result<crate::auth::Principal, crate::error::ApiError> {
        let writes = check
            .needs
            .iter()
            .any(|n| matches!(n, crate::auth::Need::Repo(_, a) if *a != crate::auth::Action::Pull));
        if writes {
            return Err(crate::error::ApiError::new(crate::error::ErrorCode::Unauthorized, "log in"));
        }
        crate::auth::Open.authorize(check).await
    }
}

/// A read-only registry (an agent) answers writes with 405 `UNSUPPORTED` and its `Allow`
/// whatever the client's credentials: with access control on it answered 401, so `docker
/// push` to an agent said "unauthorized", never "read-only".
#[tokio::test]
async fn a_read_only_registry_refuses_writes_before_asking_for_credentials() {
    let api = ApiConfig {
        read_only: true,
        auth: crate::auth::AuthGate(Arc::new(Challenging)),
        ..ApiConfig::default()
    };
    let router = crate::router(Arc::new(Empty), api);
    let blob = format!("/v2/team/app/blobs/sha256:{}", "0".repeat(64));
    for (method, path, allow) in [
        (Method::PUT, "/v2/team/app/manifests/v1", "GET, HEAD"),
        (Method::DELETE, "/v2/team/app/manifests/v1", "GET, HEAD"),
        (Method::DELETE, blob.as_str(), "GET, HEAD"),
        (Method::POST, "/v2/team/app/blobs/uploads/", ""),
        (Method::HEAD, "/v2/team/app/blobs/uploads/abc", ""),
    ] {
        let req = Request::builder().method(method.clone()).uri(path).body(Body::empty()).unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(resp.headers()[header::ALLOW], allow, "{method} {path}");
    }
    // Reads still meet the gate's answer (here: open for pulls).
    assert_eq!(status(router, Method::GET, &blob).await, StatusCode::NOT_FOUND);
}

/// A HEAD answer says the length GET's body has (RFC 9110 8.6) or none: it said 0 for every
/// answer that did not set its length itself (`/v2/`, listings, every error).
#[tokio::test]
async fn a_head_answer_carries_the_length_of_the_get_body() {
    let router = crate::router(Arc::new(Empty), ApiConfig::default());
    let blob = format!("/v2/team/app/blobs/sha256:{}", "0".repeat(64));
    for path in ["/v2/", blob.as_str(), "/v2/team/app/tags/list"] {
        let get = Request::builder().method(Method::GET).uri(path).body(Body::empty()).unwrap();
        let get = router.clone().oneshot(get).await.unwrap();
        let status = get.status();
        let body = axum::body::to_bytes(get.into_body(), 1 << 20).await.unwrap();
        let head = Request::builder().method(Method::HEAD).uri(path).body(Body::empty()).unwrap();
        let head = router.clone().oneshot(head).await.unwrap();
        assert_eq!(head.status(), status, "{path}");
        if let Some(len) = head.headers().get(header::CONTENT_LENGTH) {
            assert_eq!(len.to_str().unwrap(), body.len().to_string(), "{path}");
        }
        assert!(axum::body::to_bytes(head.into_body(), 1 << 20).await.unwrap().is_empty());
    }
}

/// A mount that fails (the source repository's records cannot be read now) starts an upload
/// session, as one whose source lacks the blob does: the spec asks a registry unable to
/// mount for a 202, and the upload works where the mount did not. Before, it was a 503.
#[tokio::test]
async fn a_mount_that_fails_starts_an_upload_session() {
    let router = crate::router(Arc::new(Empty), ApiConfig::default());
    let digest = format!("sha256:{}", "0".repeat(64));
    let path = format!("/v2/team/app/blobs/uploads/?mount={digest}&from=down/app");
    let req = Request::builder().method(Method::POST).uri(&path).body(Body::empty()).unwrap();
    let resp = router.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(resp.headers()[header::LOCATION], "/v2/team/app/blobs/uploads/u");
}

/// A 405 names the methods its resource takes (RFC 9110): an agent's manifests and blobs take
/// reads only and its upload routes nothing; an origin's manifests take reads, `PUT` and
/// `DELETE`.
#[tokio::test]
async fn a_405_names_the_methods_its_resource_takes() {
    let allow = |read_only: bool, method: Method, path: &'static str| async move {
        let router = crate::router(Arc::new(Empty), ApiConfig { read_only, ..ApiConfig::default() });
        let req = Request::builder().method(method).uri(path).body(Body::empty()).unwrap();
        let resp = router.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "{path}");
        resp.headers().get(header::ALLOW).map(|v| v.to_str().unwrap().to_string())
    };
    let manifest = "/v2/team/app/manifests/v1";
    assert_eq!(allow(true, Method::PUT, manifest).await.as_deref(), Some("GET, HEAD"));
    assert_eq!(allow(false, Method::POST, manifest).await.as_deref(), Some("GET, HEAD, PUT, DELETE"));
    assert_eq!(allow(true, Method::POST, "/v2/team/app/blobs/uploads/").await.as_deref(), Some(""));
    assert_eq!(allow(false, Method::PUT, "/v2/team/app/tags/list").await.as_deref(), Some("GET, HEAD"));
}

/// Of several `digest` (or `mount`) parameters only the last was read: an upload closed with
/// two digests was checked against the last. Refused as ambiguous (400 `DIGEST_INVALID`).
#[tokio::test]
async fn a_repeated_digest_parameter_is_refused() {
    let router = crate::router(Arc::new(Empty), ApiConfig::default());
    let (a, b) = (Digest::of(Algorithm::Sha256, b"a"), Digest::of(Algorithm::Sha256, b"b"));
    for (method, path) in [
        (Method::PUT, format!("/v2/team/app/blobs/uploads/u?digest={a}&digest={b}")),
        (Method::POST, format!("/v2/team/app/blobs/uploads/?digest={a}&digest={a}")),
        (Method::POST, format!("/v2/team/app/blobs/uploads/?mount={a}&from=x/y&mount={b}")),
    ] {
        let req = Request::builder().method(method).uri(path.as_str()).body(Body::empty()).unwrap();
        let r = router.clone().oneshot(req).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("DIGEST_INVALID"), "{path}");
    }
    let one = format!("/v2/team/app/blobs/uploads/?mount={a}&from=x/y");
    assert_eq!(status(router, Method::POST, &one).await, StatusCode::ACCEPTED, "one mount is fine");
}
