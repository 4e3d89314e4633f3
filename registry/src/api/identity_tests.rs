//! The router with a transport identity on the request, as the TLS layer will put it there
//! (simulated here by a layer that inserts the extension): a node may pull a private
//! repository without credentials, and nothing more.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use tower::ServiceExt as _;

use super::test_store::Empty;
use crate::auth::authority::Authority;
use crate::auth::{AuthConfig, AuthGate, Rule};
use crate::identity::{Role, TransportIdentity};
use crate::ApiConfig;

fn router(identity: Option<TransportIdentity>) -> axum::Router {
    let config = AuthConfig {
        tokens: true,
        rules: vec![
            Rule { repositories: "private/*".into(), ..Rule::default() },
            Rule { repositories: "public/*".into(), anonymous_pull: true, ..Rule::default() },
        ],
        anonymous: Some(crate::auth::Access::None),
        ..AuthConfig::default()
    };
    let dir = std::env::temp_dir().join(format!("shoal-identity-test-{}", std::process::id()));
    let authority = Authority::new(config, &dir, &[]).unwrap();
    let api = ApiConfig { auth: AuthGate(Arc::new(authority)), ..ApiConfig::default() };
    let router = crate::router(Arc::new(Empty), api);
    match identity {
        // What the TLS layer does for a client certificate the cluster CA signed.
        Some(id) => router.layer(axum::middleware::from_fn(
            move |mut req: axum::extract::Request, next: axum::middleware::Next| {
                req.extensions_mut().insert(id.clone());
                next.run(req)
            },
        )),
        None => router,
    }
}

async fn status(router: axum::Router, method: Method, path: &str) -> StatusCode {
    let req = Request::builder().method(method).uri(path).body(Body::empty()).unwrap();
    router.oneshot(req).await.unwrap().status()
}

#[tokio::test]
async fn a_node_identity_pulls_private_repositories_and_nothing_more() {
    let manifest = "/v2/private/app/manifests/v1";
    let uploads = "/v2/private/app/blobs/uploads/";
    // Without an identity: a challenge.
    assert_eq!(status(router(None), Method::GET, manifest).await, StatusCode::UNAUTHORIZED);
    // (The catalog is open to anonymous clients: `public/*` may be pulled anonymously.)
    assert_eq!(status(router(None), Method::GET, "/v2/_catalog").await, StatusCode::OK);
    for role in [Role::Agent, Role::Origin, Role::Tracker] {
        let id = TransportIdentity { name: "node-1".into(), role };
        // Allowed through to the (empty) store.
        assert_eq!(status(router(Some(id.clone())), Method::GET, manifest).await, StatusCode::NOT_FOUND);
        assert_eq!(status(router(Some(id.clone())), Method::GET, "/v2/_catalog").await, StatusCode::OK);
        assert_eq!(status(router(Some(id.clone())), Method::POST, uploads).await, StatusCode::UNAUTHORIZED);
        assert_eq!(status(router(Some(id)), Method::DELETE, manifest).await, StatusCode::UNAUTHORIZED);
    }
    // An operator's certificate is not a node.
    let admin = TransportIdentity { name: "ops".into(), role: Role::Admin };
    assert_eq!(status(router(Some(admin)), Method::GET, manifest).await, StatusCode::UNAUTHORIZED);
}

/// Logins waiting for a password check (made-up names, more than the checks that run at
/// once) do not hold the requests in flight: an anonymous pull of a public repository is
/// answered meanwhile. Before, the waiting logins took every slot and it got 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_waiting_for_a_password_check_hold_no_request_slot() {
    let config = AuthConfig {
        rules: vec![Rule { repositories: "public/*".into(), anonymous_pull: true, ..Rule::default() }],
        anonymous: Some(crate::auth::Access::None),
        ..AuthConfig::default()
    };
    let dir = std::env::temp_dir().join(format!("shoal-slots-test-{}", std::process::id()));
    let authority = Authority::new(config, &dir, &[]).unwrap();
    let api =
        ApiConfig { auth: AuthGate(Arc::new(authority)), max_concurrent_requests: 4, ..ApiConfig::default() };
    let router = crate::router(Arc::new(Empty), api);
    let logins: Vec<_> = (0..12)
        .map(|i| {
            let router = router.clone();
            let basic =
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("made-up-{i}:x"));
            let req = Request::builder()
                .uri("/v2/public/app/tags/list")
                .header("authorization", format!("Basic {basic}"))
                .body(Body::empty())
                .unwrap();
            tokio::spawn(async move { router.oneshot(req).await.unwrap().status() })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let anonymous = status(router.clone(), Method::GET, "/v2/public/app/tags/list").await;
    assert_ne!(anonymous, StatusCode::TOO_MANY_REQUESTS, "waiting logins took every request slot");
    for login in logins {
        login.await.unwrap();
    }
}

#[test]
fn what_each_endpoint_needs() {
    use super::needs;
    use crate::api::route::parse_route;
    use crate::auth::{Action, Need};
    let need =
        |method: Method, path: &str, _query: &[(&str, &str)]| needs(&parse_route(path).unwrap(), &method);
    let repo = |a| vec![Need::Repo("a/b".into(), a)];
    assert_eq!(need(Method::GET, "/v2/", &[]), vec![Need::Base]);
    assert_eq!(need(Method::GET, "/v2/_catalog", &[]), vec![Need::Catalog]);
    assert_eq!(need(Method::HEAD, "/v2/a/b/manifests/v1", &[]), repo(Action::Pull));
    assert_eq!(need(Method::PUT, "/v2/a/b/manifests/v1", &[]), repo(Action::Push));
    assert_eq!(need(Method::DELETE, "/v2/a/b/manifests/v1", &[]), repo(Action::Delete));
    assert_eq!(need(Method::DELETE, "/v2/a/b/blobs/sha256:00", &[]), repo(Action::Delete));
    assert_eq!(need(Method::GET, "/v2/a/b/tags/list", &[]), repo(Action::Pull));
    assert_eq!(need(Method::GET, "/v2/a/b/blobs/uploads/x", &[]), repo(Action::Push));
    // A mount's source is checked apart: without pull there, the mount becomes an upload.
    assert_eq!(
        need(Method::POST, "/v2/a/b/blobs/uploads/", &[("mount", "sha256:00"), ("from", "c/d")]),
        repo(Action::Push)
    );
}

/// An agent lists the catalog with its node certificate for a client of its own: the origin
/// shows what that client may pull (by the credentials the agent forwards; none: anonymous),
/// not everything a node may pull.
#[tokio::test]
async fn a_node_lists_the_catalog_as_its_client_would_see_it() {
    let agent = TransportIdentity { name: "node-1".into(), role: Role::Agent };
    let req = Request::builder().uri("/v2/_catalog").body(Body::empty()).unwrap();
    let reply = router(Some(agent)).oneshot(req).await.unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let body = axum::body::to_bytes(reply.into_body(), 1 << 20).await.unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(listed["repositories"], serde_json::json!(["public/app"]), "{listed}");
}
