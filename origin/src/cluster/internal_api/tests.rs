//! The internal API's guard, limits and answers, against requests made by hand.

use shoal_registry::Algorithm;

use super::*;
use crate::cluster::testing::{serve, MemNode};
use crate::cluster::wire::{blob_path, metainfo_path, PREFIX};

#[test]
fn secrets_and_roles() {
    let hashed = |s: &[u8]| -> [u8; 32] { Sha256::digest(s).into() };
    let auth = Auth { secrets: vec![hashed(b"s3cret"), hashed(b"next")], roles: vec![Role::Origin] };
    let request = |authorization: Option<&str>, role: Option<Role>| {
        let mut r = Request::new(Body::empty());
        if let Some(v) = authorization {
            r.headers_mut().insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        if let Some(role) = role {
            r.extensions_mut().insert(TransportIdentity { name: "n".into(), role });
        }
        r
    };
    assert!(auth.allows(&request(Some("Bearer s3cret"), None)));
    assert!(auth.allows(&request(Some("Bearer next"), None)));
    assert!(!auth.allows(&request(Some("Bearer s3cre"), None)));
    assert!(!auth.allows(&request(Some("Bearer s3cret "), None)));
    assert!(!auth.allows(&request(Some("Basic s3cret"), None)));
    assert!(!auth.allows(&request(None, None)));
    assert!(auth.allows(&request(None, Some(Role::Origin))));
    assert!(!auth.allows(&request(None, Some(Role::Agent))));
    assert!(!auth.allows(&request(None, Some(Role::Admin))));
    assert!(Auth { secrets: Vec::new(), roles: Vec::new() }.allows(&request(None, None)));
}

/// A served node with one blob, and a raw client for it.
struct Fixture {
    base: String,
    http: reqwest::Client,
    digest: Digest,
}

const BLOB: &[u8] = b"0123456789";

async fn fixture(secret: Option<&str>) -> Fixture {
    let node = MemNode::new("a:1");
    let digest = Digest::of(Algorithm::Sha256, BLOB);
    node.blob_put(&digest, BLOB.len() as u64, Box::pin(futures_util::stream::iter([Ok(Bytes::from(BLOB))])))
        .await
        .unwrap();
    let addr = serve(node, secret).await;
    Fixture { base: format!("http://{addr}"), http: reqwest::Client::new(), digest }
}

impl Fixture {
    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    async fn status(&self, rb: reqwest::RequestBuilder) -> u16 {
        rb.send().await.unwrap().status().as_u16()
    }
}

#[tokio::test]
async fn every_route_needs_the_secret() {
    let f = fixture(Some("right")).await;
    let d = f.digest.clone();
    let routes = [
        (reqwest::Method::GET, HEALTH.to_string()),
        (reqwest::Method::GET, blob_path(&d)),
        (reqwest::Method::HEAD, blob_path(&d)),
        (reqwest::Method::DELETE, blob_path(&d)),
        (reqwest::Method::GET, metainfo_path(&d)),
        (reqwest::Method::GET, BLOBS.to_string()),
        (reqwest::Method::GET, format!("{RECORDS_SCAN}?repo=a&kind=tag")),
        (reqwest::Method::POST, format!("{RECORDS_FORGET}?repo=a")),
        (reqwest::Method::GET, REPOS.to_string()),
        (reqwest::Method::GET, format!("{PREFIX}/no/such/route")),
    ];
    for (method, path) in &routes {
        assert_eq!(f.status(f.req(method.clone(), path)).await, 401, "{method} {path}");
        assert_eq!(f.status(f.req(method.clone(), path).bearer_auth("wrong")).await, 401, "{method} {path}");
    }
    let resp = f.req(reqwest::Method::GET, HEALTH).bearer_auth("right").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<HealthReply>().await.unwrap().id, "a:1");
    let resp = f.req(reqwest::Method::GET, &blob_path(&d)).header("authorization", "Bearer right").send();
    assert_eq!(resp.await.unwrap().bytes().await.unwrap(), BLOB);
}

#[tokio::test]
async fn ranges_and_head() {
    let f = fixture(None).await;
    let path = blob_path(&f.digest);
    let resp = f.req(reqwest::Method::HEAD, &path).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()[header::CONTENT_LENGTH], "10");
    let resp = f.req(reqwest::Method::GET, &path).header(header::RANGE, "bytes=2-4").send().await.unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.headers()[header::CONTENT_RANGE], "bytes 2-4/10");
    assert_eq!(resp.bytes().await.unwrap(), &BLOB[2..=4]);
    let resp = f.req(reqwest::Method::GET, &path).header(header::RANGE, "bytes=10-").send().await.unwrap();
    assert_eq!(resp.status(), 416);
    assert_eq!(resp.headers()[header::CONTENT_RANGE], "bytes */10");
    let resp = f.req(reqwest::Method::GET, &path).header(header::RANGE, "lines=1-2").send().await.unwrap();
    assert_eq!(resp.status(), 200, "an unusable range is ignored");
    let absent = blob_path(&Digest::of(Algorithm::Sha256, b"absent"));
    assert_eq!(f.status(f.req(reqwest::Method::HEAD, &absent)).await, 404);
    assert_eq!(f.status(f.req(reqwest::Method::GET, &absent)).await, 404);
    assert_eq!(f.status(f.req(reqwest::Method::DELETE, &absent)).await, 404);
}

#[tokio::test]
async fn put_needs_a_length() {
    let f = fixture(None).await;
    let d = Digest::of(Algorithm::Sha256, b"abc");
    let chunked = reqwest::Body::wrap_stream(futures_util::stream::iter([Ok::<_, std::io::Error>(
        Bytes::from_static(b"abc"),
    )]));
    assert_eq!(f.status(f.req(reqwest::Method::PUT, &blob_path(&d)).body(chunked)).await, 411);
    assert_eq!(f.status(f.req(reqwest::Method::PUT, &blob_path(&d)).body("abc")).await, 201);
    assert_eq!(f.status(f.req(reqwest::Method::PUT, &blob_path(&d)).body("abd")).await, 400);
}

#[tokio::test]
async fn bad_digests_are_400() {
    let f = fixture(None).await;
    for bad in ["sha256:abc", "md5:0123", "nocolon", "sha256:", "SHA256:%20"] {
        let path = format!("{BLOBS}/{bad}");
        for method in [reqwest::Method::GET, reqwest::Method::HEAD, reqwest::Method::DELETE] {
            assert_eq!(f.status(f.req(method.clone(), &path)).await, 400, "{method} {path}");
        }
        assert_eq!(f.status(f.req(reqwest::Method::PUT, &path).body("x")).await, 400, "PUT {path}");
        assert_eq!(f.status(f.req(reqwest::Method::GET, &format!("{path}/metainfo"))).await, 400);
    }
    assert_eq!(f.status(f.req(reqwest::Method::GET, &format!("{BLOBS}?after=sha256:zz"))).await, 400);
    assert_eq!(f.status(f.req(reqwest::Method::GET, &format!("{BLOBS}?n=-1"))).await, 400);
    let scan = format!("{RECORDS_SCAN}?repo=a&kind=manifest&subject=bad");
    assert_eq!(f.status(f.req(reqwest::Method::GET, &scan)).await, 400);
    assert_eq!(f.status(f.req(reqwest::Method::GET, &format!("{RECORDS_SCAN}?repo=a&kind=blob"))).await, 400);
}

#[tokio::test]
async fn bad_repository_names_are_400() {
    let f = fixture(None).await;
    for bad in ["", "UPPER", "a//b", "-x", "a%00b"] {
        let q = format!("repo={bad}");
        let get = f.req(reqwest::Method::POST, &format!("{RECORDS_GET}?{q}")).body("[]");
        assert_eq!(f.status(get).await, 400, "get {bad:?}");
        let apply = f.req(reqwest::Method::POST, &format!("{RECORDS_APPLY}?{q}")).body("[]");
        assert_eq!(f.status(apply).await, 400, "apply {bad:?}");
        let scan = f.req(reqwest::Method::GET, &format!("{RECORDS_SCAN}?{q}&kind=tag"));
        assert_eq!(f.status(scan).await, 400, "scan {bad:?}");
        let forget = f.req(reqwest::Method::POST, &format!("{RECORDS_FORGET}?{q}")).body("[]");
        assert_eq!(f.status(forget).await, 400, "forget {bad:?}");
    }
    let missing = f.req(reqwest::Method::POST, RECORDS_FORGET).body("[]");
    assert_eq!(f.status(missing).await, 400);
}

#[tokio::test]
async fn malformed_json_is_400() {
    let f = fixture(None).await;
    for body in ["", "{", "not json", "[{\"kind\":\"tag\"}]", "{\"a\":1}", "[[[[[[[[[[[[[[[[[[[[[[[[[[[["] {
        let get = f.req(reqwest::Method::POST, &format!("{RECORDS_GET}?repo=a")).body(body);
        assert_eq!(f.status(get).await, 400, "get {body:?}");
        let apply = f.req(reqwest::Method::POST, &format!("{RECORDS_APPLY}?repo=a")).body(body);
        assert_eq!(f.status(apply).await, 400, "apply {body:?}");
    }
    let deep = "[".repeat(100_000);
    let apply = f.req(reqwest::Method::POST, &format!("{RECORDS_APPLY}?repo=a")).body(deep);
    assert_eq!(f.status(apply).await, 400, "deep nesting is refused, not a stack overflow");
}

#[tokio::test]
async fn oversized_records_bodies_are_413() {
    let f = fixture(None).await;
    let big = vec![b' '; MAX_RECORDS_BODY + 1];
    let apply = f.req(reqwest::Method::POST, &format!("{RECORDS_APPLY}?repo=a")).body(big);
    assert_eq!(f.status(apply).await, 413);
    let keys: Vec<RecordKey> = (0..=MAX_RECORD_KEYS).map(|i| RecordKey::Tag(format!("t{i}"))).collect();
    let get = f.req(reqwest::Method::POST, &format!("{RECORDS_GET}?repo=a")).json(&keys);
    assert_eq!(f.status(get).await, 413);
}

#[tokio::test]
async fn listing_limits_are_capped() {
    let f = fixture(None).await;
    let page: Vec<BlobEntry> = f
        .req(reqwest::Method::GET, &format!("{BLOBS}?n=999999999"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    let page: Vec<BlobEntry> =
        f.req(reqwest::Method::GET, &format!("{BLOBS}?n=0")).send().await.unwrap().json().await.unwrap();
    assert!(page.is_empty());
    let unknown = f.req(reqwest::Method::GET, &format!("{RECORDS_SCAN}?repo=a&kind=tag"));
    assert_eq!(f.status(unknown).await, 404);
}
