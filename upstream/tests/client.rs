//! The upstream client against a registry and token server run by the test on loopback (real
//! HTTP; the policies are the test's): Docker's token flow with anonymous, configured and
//! client credentials, tokens reused, Basic challenges, digests checked, 404, 429 honoured
//! without sending, redirects followed, a stalled body timed out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures_util::StreamExt;
use shoal_registry::{Algorithm, Digest};
use shoal_upstream::{Credentials, Upstream, UpstreamConfig, UpstreamError, UpstreamMetrics};

const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
const BLOB: &[u8] = b"the blob's bytes";

#[derive(Default)]
struct Fake {
    addr: Mutex<String>,
    tokens: Mutex<HashMap<String, usize>>,
    requests: AtomicUsize,
}

fn basic_user(h: &HeaderMap) -> Option<(String, String)> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Basic ")?;
    let text = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(v).ok()?).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn challenge(fake: &Fake, repo: &str) -> Response {
    let addr = fake.addr.lock().unwrap().clone();
    let value =
        format!("Bearer realm=\"http://{addr}/token\",service=\"fake\",scope=\"repository:{repo}:pull\"");
    if repo.starts_with("negotiate/") {
        // A scheme Shoal does not speak, offered first.
        let mut response = StatusCode::UNAUTHORIZED.into_response();
        response.headers_mut().append(header::WWW_AUTHENTICATE, "Negotiate".parse().unwrap());
        response.headers_mut().append(header::WWW_AUTHENTICATE, value.parse().unwrap());
        return response;
    }
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, value)]).into_response()
}

async fn handle(State(fake): State<Arc<Fake>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let h = req.headers().clone();
    let head = req.method() == axum::http::Method::HEAD;
    if path == "/token" {
        let user = match basic_user(&h) {
            Some((u, p)) if u == "alice" && p == "secret" => "alice".to_string(),
            Some(_) => return StatusCode::UNAUTHORIZED.into_response(),
            None => "anonymous".to_string(),
        };
        *fake.tokens.lock().unwrap().entry(user.clone()).or_default() += 1;
        if req.uri().query().is_some_and(|q| q.contains("slowtoken")) {
            // A token server slow enough that a burst's 401s all arrive while it answers.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        return axum::Json(serde_json::json!({"token": format!("tok-{user}"), "expires_in": 300}))
            .into_response();
    }
    if let Some(digest) = path.strip_prefix("/data/") {
        return if digest == Digest::of(Algorithm::Sha256, BLOB).to_string() {
            BLOB.into_response()
        } else {
            StatusCode::NOT_FOUND.into_response()
        };
    }
    fake.requests.fetch_add(1, Ordering::SeqCst);
    let Some(rest) = path.strip_prefix("/v2/") else { return StatusCode::NOT_FOUND.into_response() };
    let (repo, kind, reference) = match (rest.rfind("/manifests/"), rest.rfind("/blobs/")) {
        (Some(i), _) => (&rest[..i], "manifests", &rest[i + 11..]),
        (None, Some(i)) => (&rest[..i], "blobs", &rest[i + 7..]),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    if repo.starts_with("throttle/") {
        return (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "2")]).into_response();
    }
    let bearer =
        h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if repo.starts_with("basic/") {
        if basic_user(&h) != Some(("alice".into(), "secret".into())) {
            return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Basic realm=\"fake\"")])
                .into_response();
        }
    } else {
        let ok = match bearer {
            Some("tok-alice") => true,
            Some("tok-anonymous") => !repo.starts_with("private/"),
            _ => false,
        };
        if !ok {
            return challenge(&fake, repo);
        }
    }
    match kind {
        // A registry that takes no HEAD for manifests.
        "manifests" if head && repo.starts_with("nohead/") => StatusCode::METHOD_NOT_ALLOWED.into_response(),
        "manifests" if repo.starts_with("generic/") => {
            // The right bytes, a generic Content-Type.
            ([(header::CONTENT_TYPE, "application/octet-stream")], MANIFEST.to_vec()).into_response()
        }
        "manifests" if repo.starts_with("bare-index/") => {
            // An index without `mediaType`, served as plain JSON.
            let body = br#"{"schemaVersion":2,"manifests":[]}"#.to_vec();
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        "manifests" => {
            let body: &[u8] = if repo.starts_with("bad/") { b"{}" } else { MANIFEST };
            let digest = Digest::of(Algorithm::Sha256, MANIFEST).to_string();
            if reference != "v1" && reference != digest {
                return StatusCode::NOT_FOUND.into_response();
            }
            let headers = [
                (header::CONTENT_TYPE, "application/vnd.oci.image.manifest.v1+json".to_string()),
                (header::HeaderName::from_static("docker-content-digest"), digest),
            ];
            (headers, body.to_vec()).into_response()
        }
        _ => {
            if reference != Digest::of(Algorithm::Sha256, BLOB).to_string() {
                return StatusCode::NOT_FOUND.into_response();
            }
            if repo.starts_with("redirect/") {
                return (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, format!("/data/{reference}"))])
                    .into_response();
            }
            if repo.starts_with("chunked/") && !head {
                // A body without Content-Length (chunked), as some object stores send.
                let body = futures_util::stream::once(async {
                    Ok::<_, std::io::Error>(bytes::Bytes::from_static(BLOB))
                });
                return Body::from_stream(body).into_response();
            }
            if repo.starts_with("drip/") {
                // A byte every 300 ms, inside the test's 500 ms idle timeout every time.
                let drip = futures_util::stream::iter(BLOB.iter().copied()).then(|b| async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b]))
                });
                return ([(header::CONTENT_LENGTH, BLOB.len().to_string())], Body::from_stream(drip))
                    .into_response();
            }
            if repo.starts_with("stall/") {
                let first = futures_util::stream::once(async {
                    Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"the"))
                });
                let never = futures_util::stream::pending();
                return (
                    [(header::CONTENT_LENGTH, BLOB.len().to_string())],
                    Body::from_stream(first.chain(never)),
                )
                    .into_response();
            }
            BLOB.into_response()
        }
    }
}

async fn fake() -> (Arc<Fake>, String) {
    let fake = Arc::new(Fake::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    *fake.addr.lock().unwrap() = addr.clone();
    let app = axum::Router::new().fallback(handle).with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (fake, format!("http://{addr}"))
}

fn upstream(url: &str, extra: &str) -> Upstream {
    let config: UpstreamConfig =
        toml::from_str(&format!("registry = \"fake.test\"\nurl = \"{url}\"\n{extra}")).unwrap();
    Upstream::with_idle_timeout(config, UpstreamMetrics::unregistered(), Duration::from_millis(500)).unwrap()
}

fn alice() -> Credentials {
    Credentials { username: "alice".into(), password: "secret".into() }
}

#[tokio::test]
async fn the_token_flow_fetches_one_token_for_many_requests() {
    let (fake, url) = fake().await;
    let up = upstream(&url, "");
    let manifest_digest = Digest::of(Algorithm::Sha256, MANIFEST);
    for _ in 0..20 {
        assert_eq!(up.resolve_tag("library/app", "v1", None).await.unwrap(), manifest_digest);
    }
    let m = up.manifest("library/app", &manifest_digest.to_string(), None).await.unwrap();
    assert_eq!(m.digest, manifest_digest);
    assert_eq!(m.media_type, "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(fake.tokens.lock().unwrap().get("anonymous"), Some(&1));
    // One 401 to learn the realm, then 21 requests with the token.
    assert_eq!(fake.requests.load(Ordering::SeqCst), 22);
}

#[tokio::test]
async fn a_burst_that_meets_401_together_fetches_one_token() {
    let (fake, url) = fake().await;
    let up = Arc::new(upstream(&url, ""));
    let manifest_digest = Digest::of(Algorithm::Sha256, MANIFEST);
    let pulls: Vec<_> = (0..20)
        .map(|_| {
            let up = up.clone();
            tokio::spawn(async move { up.resolve_tag("slowtoken/app", "v1", None).await })
        })
        .collect();
    for pull in pulls {
        assert_eq!(pull.await.unwrap().unwrap(), manifest_digest);
    }
    assert_eq!(fake.tokens.lock().unwrap().get("anonymous"), Some(&1));
    // With a client's credentials too: one fetch for their key.
    let again: Vec<_> = (0..5)
        .map(|_| {
            let up = up.clone();
            tokio::spawn(async move { up.resolve_tag("private/slowtoken", "v1", Some(&alice())).await })
        })
        .collect();
    for pull in again {
        assert_eq!(pull.await.unwrap().unwrap(), manifest_digest);
    }
    assert_eq!(fake.tokens.lock().unwrap().get("alice"), Some(&1));
}

#[tokio::test]
async fn private_repositories_need_the_right_credentials() {
    let (fake, url) = fake().await;
    let up = upstream(&url, "");
    assert!(matches!(up.resolve_tag("private/app", "v1", None).await, Err(UpstreamError::Unauthorized(_))));
    assert!(up.resolve_tag("private/app", "v1", Some(&alice())).await.is_ok());
    let wrong = Credentials { username: "alice".into(), password: "nope".into() };
    assert!(matches!(
        up.resolve_tag("private/app", "v1", Some(&wrong)).await,
        Err(UpstreamError::Unauthorized(_))
    ));
    // Configured credentials open it without a client's.
    let dir = tempfile_dir();
    std::fs::write(dir.join("password"), "secret\n").unwrap();
    let configured = upstream(
        &url,
        &format!("username = \"alice\"\npassword_file = \"{}\"", dir.join("password").display()),
    );
    assert!(configured.resolve_tag("private/app", "v1", None).await.is_ok());
    assert!(fake.tokens.lock().unwrap().get("alice").is_some_and(|n| *n >= 2));
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-upstream-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn a_bearer_challenge_after_one_of_another_scheme_is_answered() {
    let (fake, url) = fake().await;
    let up = upstream(&url, "");
    let digest = up.resolve_tag("negotiate/app", "v1", None).await.unwrap();
    assert_eq!(digest, Digest::of(Algorithm::Sha256, MANIFEST));
    assert_eq!(fake.tokens.lock().unwrap().get("anonymous"), Some(&1));
}

#[tokio::test]
async fn basic_challenges_are_answered_with_credentials() {
    let (_fake, url) = fake().await;
    let up = upstream(&url, "");
    assert!(matches!(up.resolve_tag("basic/app", "v1", None).await, Err(UpstreamError::Unauthorized(_))));
    assert!(up.resolve_tag("basic/app", "v1", Some(&alice())).await.is_ok());
}

#[tokio::test]
async fn blobs_stream_follow_redirects_and_time_out_when_stalled() {
    let (_fake, url) = fake().await;
    let up = upstream(&url, "");
    let digest = Digest::of(Algorithm::Sha256, BLOB);
    for repo in ["library/app", "redirect/app"] {
        let blob = up.blob(repo, &digest, None).await.unwrap();
        assert_eq!(blob.size, BLOB.len() as u64);
        let bytes: Vec<u8> = blob.body.map(|c| c.unwrap().to_vec()).concat().await;
        assert_eq!(bytes, BLOB, "{repo}");
    }
    assert_eq!(up.blob_head("library/app", &digest, None).await.unwrap(), BLOB.len() as u64);
    let absent = Digest::of(Algorithm::Sha256, b"absent");
    assert!(matches!(up.blob("library/app", &absent, None).await, Err(UpstreamError::NotFound)));
    let stalled = up.blob("stall/app", &digest, None).await.unwrap();
    let results: Vec<_> =
        tokio::time::timeout(Duration::from_secs(5), stalled.body.collect::<Vec<_>>()).await.unwrap();
    assert!(results.last().unwrap().as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut));
    // A byte just inside each idle timeout: failed once a window (twice the idle timeout)
    // passed below the minimum rate, not after the whole blob's 16 drips (4.8 s).
    let started = std::time::Instant::now();
    let dripping = up.blob("drip/app", &digest, None).await.unwrap();
    let results: Vec<_> =
        tokio::time::timeout(Duration::from_secs(10), dripping.body.collect::<Vec<_>>()).await.unwrap();
    let last = results.last().unwrap();
    assert!(last.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut), "{last:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "failed after {:?}", started.elapsed());
}

/// A blob answered without Content-Length (chunked) takes its size from the registry's
/// `HEAD`; a tag of a registry that takes no `HEAD` for manifests (405) is resolved by a
/// `GET`. Before, the first was never pullable and the second never resolved.
#[tokio::test]
async fn a_chunked_blob_and_a_registry_without_head_still_work() {
    let (_fake, url) = fake().await;
    let up = upstream(&url, "");
    let digest = Digest::of(Algorithm::Sha256, BLOB);
    let blob = up.blob("chunked/app", &digest, None).await.unwrap();
    assert_eq!(blob.size, BLOB.len() as u64);
    let bytes: Vec<u8> = blob.body.map(|c| c.unwrap().to_vec()).concat().await;
    assert_eq!(bytes, BLOB);
    let tag = up.resolve_tag("nohead/app", "v1", None).await.unwrap();
    assert_eq!(tag, Digest::of(Algorithm::Sha256, MANIFEST));
}

/// A manifest's kind comes from its own `mediaType` before the answer's Content-Type (a
/// generic one passed on to clients as the manifest's type before), and an index without
/// either is known by its `manifests` (taken for an image manifest and refused before).
#[tokio::test]
async fn a_manifests_kind_comes_from_its_bytes_first() {
    let (_fake, url) = fake().await;
    let up = upstream(&url, "");
    let generic = up.manifest("generic/app", "v1", None).await.unwrap();
    assert_eq!(generic.media_type, "application/vnd.oci.image.manifest.v1+json");
    let index = up.manifest("bare-index/app", "v1", None).await.unwrap();
    assert_eq!(index.media_type, "application/vnd.oci.image.index.v1+json");
}

#[tokio::test]
async fn manifests_are_checked_against_their_digest() {
    let (_fake, url) = fake().await;
    let up = upstream(&url, "");
    let digest = Digest::of(Algorithm::Sha256, MANIFEST).to_string();
    assert!(matches!(up.manifest("bad/app", &digest, None).await, Err(UpstreamError::Invalid(_))));
    assert!(matches!(up.manifest("library/app", "v2", None).await, Err(UpstreamError::NotFound)));
}

#[tokio::test]
async fn a_429_is_honoured_without_sending_until_retry_after() {
    let (fake, url) = fake().await;
    let up = upstream(&url, "");
    let first = up.resolve_tag("throttle/app", "v1", None).await;
    assert!(
        matches!(first, Err(UpstreamError::TooManyRequests { retry_after }) if retry_after == Duration::from_secs(2))
    );
    let sent = fake.requests.load(Ordering::SeqCst);
    let second = up.resolve_tag("library/app", "v1", None).await;
    assert!(matches!(second, Err(UpstreamError::TooManyRequests { .. })), "{second:?}");
    assert_eq!(fake.requests.load(Ordering::SeqCst), sent, "a request went out inside Retry-After");
    // The 429 was the anonymous client's quota: a client with its own account still pulls.
    assert!(up.resolve_tag("library/app", "v1", Some(&alice())).await.is_ok(), "another account throttled");
    assert!(matches!(
        up.resolve_tag("library/app", "v1", None).await,
        Err(UpstreamError::TooManyRequests { .. })
    ));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(up.resolve_tag("library/app", "v1", None).await.is_ok());
}

#[tokio::test]
async fn an_unreachable_upstream_is_unavailable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let up = upstream(&url, "");
    assert!(matches!(up.resolve_tag("library/app", "v1", None).await, Err(UpstreamError::Unavailable(_))));
}

/// An upstream whose referrers API pages its answer (the spec's `Link: <...>; rel="next"`) is
/// read to its last page; a link to another host is not followed.
#[tokio::test]
async fn referrers_are_read_to_the_last_page_on_the_upstreams_own_host() {
    use axum::routing::get;
    let subject = Digest::of(Algorithm::Sha256, b"subject");
    let descriptor = |name: &str| {
        let d = Digest::of(Algorithm::Sha256, name.as_bytes());
        format!(r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":10}}"#)
    };
    let index = |entries: Vec<String>| {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
            entries.join(",")
        )
    };
    let (first, second, third) =
        (index(vec![descriptor("a")]), index(vec![descriptor("b")]), index(vec![descriptor("c")]));
    let path = format!("/v2/r/referrers/{subject}");
    // Several link values in one header (RFC 8288), the next one not first.
    let (next, elsewhere) = (
        format!("<{path}?last=z>; rel=\"last\", <{path}?last=a>; rel=\"next\""),
        format!("<http://other.invalid{path}?last=b>; rel=\"next\""),
    );
    let app = axum::Router::new().route(
        &path,
        get(move |q: axum::extract::RawQuery| {
            let (first, second, third) = (first.clone(), second.clone(), third.clone());
            let (next, elsewhere) = (next.clone(), elsewhere.clone());
            async move {
                let oci = "application/vnd.oci.image.index.v1+json";
                match q.0.as_deref() {
                    None => ([(header::CONTENT_TYPE, oci.to_string()), (header::LINK, next)], first)
                        .into_response(),
                    Some("last=a") => {
                        ([(header::CONTENT_TYPE, oci.to_string()), (header::LINK, elsewhere)], second)
                            .into_response()
                    }
                    Some(_) => ([(header::CONTENT_TYPE, oci)], third).into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let up = upstream(&url, "");
    let found = up.referrers("r", &subject, None).await.unwrap().expect("an API");
    let names: Vec<Digest> = found.iter().map(|d| d.digest.clone()).collect();
    assert_eq!(
        names,
        vec![Digest::of(Algorithm::Sha256, b"a"), Digest::of(Algorithm::Sha256, b"b")],
        "both pages of its own host, not the third elsewhere"
    );
}
