//! Upstream registries as the agent's clients name them. containerd mirrors send
//! `/v2/library/alpine/...?ns=docker.io`, Docker Engine's `registry-mirrors` send Docker Hub
//! pulls without `ns`, and a plain `docker pull node:5000/docker.io/library/alpine` uses the
//! explicit form. This layer rewrites each request to the one repository the origins keep the
//! content under ([`shoal_registry::mirror::target`]), from the registry names the origins
//! publish, before the registry API (and its access checks) sees the request.
//!
//! It also carries a client's Basic credentials to the origins, for private upstream
//! repositories, when Shoal itself does not use `Authorization` (no access control).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use shoal_registry::auth::remote::RemoteAuth;
use shoal_registry::mirror::{self, split_path, with_name, Target};
use shoal_registry::RepoName;

use crate::origin_client::OriginClient;

/// How often the registry names are asked of the origins once known.
pub const REGISTRIES_REFRESH: Duration = Duration::from_secs(30);
/// How often they are asked while no origin has answered yet.
const REGISTRIES_RETRY: Duration = Duration::from_secs(2);
/// Names without `ns` whose answering form is remembered (the table is cleared when full:
/// forgetting one costs only its answers while the origins are down).
const MAX_ANSWERED_NAMES: usize = 4096;

tokio::task_local! {
    /// The client's `Authorization: Basic` for upstreams while its request is handled.
    pub static UPSTREAM_CREDENTIALS: Option<HeaderValue>;
}

/// The current request's upstream credentials, if it sent any.
pub fn upstream_credentials() -> Option<HeaderValue> {
    UPSTREAM_CREDENTIALS.try_with(Clone::clone).ok().flatten()
}

/// The upstream registry names the origins pull through, refreshed in the background.
pub struct Registries {
    /// `None` until an origin first answered: "no upstream registries" and "not known yet"
    /// must not look alike.
    names: Mutex<Option<Vec<String>>>,
    /// Names asked without `ns` (Docker Engine's mirror requests) by which form answered
    /// them: `true` only upstream so far, `false` once the pushed name did (for good: a
    /// pushed repository's missing tag is a 404 too, then answered upstream). While the
    /// origins are down the pushed name answers 503, not 404, and an upstream-only name's
    /// pulls need the upstream form's kept answer.
    answered_by: Mutex<std::collections::HashMap<String, bool>>,
    origin: OriginClient,
}

impl Registries {
    pub fn new(origin: OriginClient) -> Arc<Registries> {
        Arc::new(Registries { names: Mutex::new(None), answered_by: Mutex::default(), origin })
    }

    /// Whether `name` was answered by its upstream form only, so far.
    fn answered_upstream_only(&self, name: &str) -> bool {
        self.answered_by.lock().unwrap_or_else(|p| p.into_inner()).get(name) == Some(&true)
    }

    /// `name` was answered by its upstream form (`true`) or its pushed one (`false`, for good).
    fn answered(&self, name: &str, upstream: bool) {
        let mut table = self.answered_by.lock().unwrap_or_else(|p| p.into_inner());
        if table.len() >= MAX_ANSWERED_NAMES && !table.contains_key(name) {
            table.clear();
        }
        let pushed_once = table.get(name) == Some(&false);
        table.insert(name.to_string(), upstream && !pushed_once);
    }

    /// The names known (none before an origin first answered).
    pub fn names(&self) -> Vec<String> {
        self.names.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default()
    }

    /// Whether an origin has answered at least once.
    pub fn known(&self) -> bool {
        self.names.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Whether `repo` is upstream content (explicit form).
    pub fn is_upstream(&self, repo: &RepoName) -> bool {
        mirror::split(repo.as_str(), &self.names()).is_some()
    }

    /// Ask the origins now; `false` if none answered.
    pub async fn refresh(&self) -> bool {
        match self.origin.upstream_registries().await {
            Ok(names) => {
                *self.names.lock().unwrap_or_else(|p| p.into_inner()) = Some(names);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not fetch the upstream registries");
                false
            }
        }
    }

    /// Keep the names fresh (every [`REGISTRIES_REFRESH`], sooner until an origin answers).
    pub fn spawn_refresh(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(r) = me.upgrade() else { return };
                let ok = r.refresh().await;
                drop(r);
                tokio::time::sleep(if ok { REGISTRIES_REFRESH } else { REGISTRIES_RETRY }).await;
            }
        });
    }
}

/// What the middleware needs.
#[derive(Clone)]
pub struct MirrorState {
    pub registries: Arc<Registries>,
    pub auth: Arc<RemoteAuth>,
}

/// The client's upstream credentials in `headers`: its `Authorization: Basic`, which is its
/// upstream's only where Shoal checks none. With the origins' policy not known yet (the agent
/// just started), it is asked first, or a Shoal password could go to an upstream's token
/// realm.
pub async fn client_upstream_credentials(auth: &RemoteAuth, headers: &HeaderMap) -> Option<HeaderValue> {
    if auth.enabled_now().await != Some(false) {
        return None;
    }
    headers
        .get(header::AUTHORIZATION)
        .filter(|v| v.as_bytes().len() > 6 && v.as_bytes()[..6].eq_ignore_ascii_case(b"basic "))
        .cloned()
}

/// Middleware: map names to upstream content and pass on upstream credentials.
pub async fn map_names(State(s): State<MirrorState>, mut req: Request, next: Next) -> Response {
    let creds = client_upstream_credentials(&s.auth, req.headers()).await;
    let Some((name, tail)) = split_path(req.uri().path()) else {
        return UPSTREAM_CREDENTIALS.scope(creds, next.run(req)).await;
    };
    let ns = query_value(req.uri(), "ns");
    // A mirror request (containerd's `?ns=`) before the agent knows which registries the
    // origins pull through would be answered from the pushed repository of that name: another
    // registry's content. It waits for the names (one ask), or is refused as unavailable.
    if ns.is_some() && !s.registries.known() && !s.registries.refresh().await {
        let err = shoal_registry::StoreError::Unavailable(
            "the origins' upstream registries are not known yet".into(),
        );
        return shoal_registry::ApiError::from(err).into_response();
    }
    let target = mirror::target(name, ns.as_deref(), &s.registries.names());
    let tail = tail.to_string();
    match target {
        Target::AsIs => UPSTREAM_CREDENTIALS.scope(creds, next.run(req)).await,
        Target::Upstream(full) => {
            if let Some(uri) = with_name(req.uri(), &full, &tail) {
                *req.uri_mut() = uri;
            }
            UPSTREAM_CREDENTIALS.scope(creds, next.run(req)).await
        }
        Target::PushedElse(full) => {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                return UPSTREAM_CREDENTIALS.scope(creds, next.run(req)).await;
            }
            // A referrers listing is 200 whatever the repository holds (an empty index for a
            // subject it lacks), so it cannot tell pushed content from none: it goes where
            // the name's manifests were last answered from, and tells nothing of the name.
            if tail.starts_with("/referrers/") {
                if s.registries.answered_upstream_only(name_of(req.uri())) {
                    if let Some(uri) = with_name(req.uri(), &full, &tail) {
                        *req.uri_mut() = uri;
                    }
                }
                return UPSTREAM_CREDENTIALS.scope(creds, next.run(req)).await;
            }
            let (parts, _) = req.into_parts();
            let first = Request::from_parts(parts.clone(), Body::empty());
            let answer = UPSTREAM_CREDENTIALS.scope(creds.clone(), next.clone().run(first)).await;
            let status = answer.status();
            if status.is_success() {
                s.registries.answered(name_of(&parts.uri), false);
                return answer;
            }
            // A 404 is "not pushed": the upstream form is asked. A server error (the origins
            // down) is asked there too for a name only its upstream form has answered, whose
            // kept answers an agent serves while the origins are down; otherwise it stands
            // (pushed content may be what was asked for).
            let name = name_of(&parts.uri).to_string();
            let upstream_only = s.registries.answered_upstream_only(&name);
            if status != StatusCode::NOT_FOUND && !(status.is_server_error() && upstream_only) {
                return answer;
            }
            let Some(uri) = with_name(&parts.uri, &full, &tail) else { return answer };
            let mut second = Request::from_parts(parts, Body::empty());
            *second.uri_mut() = uri;
            let upstream = UPSTREAM_CREDENTIALS.scope(creds, next.run(second)).await;
            if upstream.status().is_success() {
                s.registries.answered(&name, true);
            } else if status.is_server_error() {
                return answer;
            }
            upstream
        }
    }
}

/// The repository part of a request's path (empty if it names none).
fn name_of(uri: &Uri) -> &str {
    split_path(uri.path()).map_or("", |(name, _)| name)
}

/// The value of `key` in the URI's query (percent-decoded), if present.
fn query_value(uri: &Uri, key: &str) -> Option<String> {
    let q = axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(uri).ok()?;
    q.0.get(key).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before an origin has said which registries it pulls through, a mirror request for
    /// `org/app` of ghcr.io must not be answered with the pushed `org/app`; a request without
    /// `ns` is served as always.
    #[tokio::test]
    async fn a_mirror_request_before_the_registries_are_known_is_not_answered_with_pushed_content() {
        use tower::ServiceExt as _;
        let unreachable = vec!["http://127.0.0.1:9".to_string()];
        let origin =
            OriginClient::new(unreachable, Duration::from_millis(500), &prometheus::Registry::new()).unwrap();
        let auth = RemoteAuth::new(Arc::new(|| Box::pin(async { None })));
        let state = MirrorState { registries: Registries::new(origin), auth };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let app = axum::Router::new()
            .fallback(move |req: Request| {
                record.lock().unwrap().push(req.uri().to_string());
                async { StatusCode::OK }
            })
            .layer(axum::middleware::from_fn_with_state(state, map_names));
        let ask = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
        let mirrored = app.clone().oneshot(ask("/v2/org/app/manifests/1?ns=ghcr.io")).await.unwrap();
        assert_eq!(mirrored.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(seen.lock().unwrap().is_empty(), "{:?}", seen.lock().unwrap());
        let pushed = app.oneshot(ask("/v2/org/app/manifests/1")).await.unwrap();
        assert_eq!(pushed.status(), StatusCode::OK);
        assert_eq!(*seen.lock().unwrap(), ["/v2/org/app/manifests/1"]);
    }

    /// Docker Engine's mirror requests name Docker Hub images without `ns`: the pushed name
    /// answers 404 and the upstream form is asked. With the origins down the pushed name
    /// answers 503; a name last answered from upstream is then asked there too (the agent
    /// keeps those answers), so the images a node holds still start. A name whose pushed
    /// form answered last keeps the 503 (the pushed content may be what was asked for).
    #[tokio::test]
    async fn a_name_last_answered_upstream_is_asked_there_while_the_origins_are_down() {
        use std::sync::atomic::{AtomicU16, Ordering};
        use tower::ServiceExt as _;
        let unreachable = vec!["http://127.0.0.1:9".to_string()];
        let origin =
            OriginClient::new(unreachable, Duration::from_millis(500), &prometheus::Registry::new()).unwrap();
        let registries = Registries::new(origin);
        *registries.names.lock().unwrap() = Some(vec!["docker.io".to_string()]);
        let auth = RemoteAuth::new(Arc::new(|| Box::pin(async { None })));
        let state = MirrorState { registries, auth };
        let pushed = Arc::new(AtomicU16::new(404));
        let upstream_asked = Arc::new(AtomicU16::new(0));
        let (p, u) = (pushed.clone(), upstream_asked.clone());
        let app = axum::Router::new()
            .fallback(move |req: Request| {
                let path = req.uri().path().to_string();
                let (p, u) = (p.clone(), u.clone());
                async move {
                    if path.starts_with("/v2/docker.io/") {
                        u.fetch_add(1, Ordering::SeqCst);
                        return StatusCode::OK;
                    }
                    StatusCode::from_u16(p.load(Ordering::SeqCst)).unwrap_or(StatusCode::OK)
                }
            })
            .layer(axum::middleware::from_fn_with_state(state, map_names));
        let ask = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
        let status = |app: axum::Router, uri: &'static str| async move {
            app.oneshot(ask(uri)).await.unwrap().status()
        };
        assert_eq!(status(app.clone(), "/v2/library/alpine/manifests/1").await, StatusCode::OK);
        assert_eq!(upstream_asked.load(Ordering::SeqCst), 1);
        pushed.store(200, Ordering::SeqCst);
        assert_eq!(status(app.clone(), "/v2/team/app/manifests/1").await, StatusCode::OK);
        // A tag the pushed repository lacks is answered upstream: the name stays pushed.
        pushed.store(404, Ordering::SeqCst);
        assert_eq!(status(app.clone(), "/v2/team/app/manifests/latest").await, StatusCode::OK);
        assert_eq!(upstream_asked.load(Ordering::SeqCst), 2);
        // The origins go down.
        pushed.store(503, Ordering::SeqCst);
        assert_eq!(status(app.clone(), "/v2/library/alpine/manifests/1").await, StatusCode::OK);
        assert_eq!(status(app.clone(), "/v2/library/alpine/blobs/sha256:00").await, StatusCode::OK);
        assert_eq!(upstream_asked.load(Ordering::SeqCst), 4);
        assert_eq!(status(app.clone(), "/v2/team/app/manifests/1").await, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(upstream_asked.load(Ordering::SeqCst), 4, "a pushed name is not asked upstream");
    }

    /// Docker's mirror requests for referrers (no `ns`): a pushed repository answers 200 with
    /// an empty index for any subject, which marked the name as pushed for good and never
    /// asked the upstream form. Now a name answered upstream has its referrers asked there,
    /// and a referrers answer marks nothing.
    #[tokio::test]
    async fn referrers_go_where_the_names_manifests_came_from() {
        use tower::ServiceExt as _;
        let unreachable = vec!["http://127.0.0.1:9".to_string()];
        let origin =
            OriginClient::new(unreachable, Duration::from_millis(500), &prometheus::Registry::new()).unwrap();
        let registries = Registries::new(origin);
        *registries.names.lock().unwrap() = Some(vec!["docker.io".to_string()]);
        let auth = RemoteAuth::new(Arc::new(|| Box::pin(async { None })));
        let state = MirrorState { registries: registries.clone(), auth };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let app = axum::Router::new()
            .fallback(move |req: Request| {
                let path = req.uri().path().to_string();
                record.lock().unwrap().push(path.clone());
                // Pushed: no manifests; referrers always 200 (an empty index).
                async move {
                    if path.starts_with("/v2/docker.io/") || path.contains("/referrers/") {
                        StatusCode::OK
                    } else {
                        StatusCode::NOT_FOUND
                    }
                }
            })
            .layer(axum::middleware::from_fn_with_state(state, map_names));
        let ask = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
        // Before any manifest: the pushed form, and the name stays unmarked.
        app.clone().oneshot(ask("/v2/library/alpine/referrers/sha256:00")).await.unwrap();
        assert!(!registries.answered_by.lock().unwrap().contains_key("library/alpine"));
        app.clone().oneshot(ask("/v2/library/alpine/manifests/1")).await.unwrap();
        assert!(registries.answered_upstream_only("library/alpine"));
        app.oneshot(ask("/v2/library/alpine/referrers/sha256:00")).await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "/v2/library/alpine/referrers/sha256:00",
                "/v2/library/alpine/manifests/1",
                "/v2/docker.io/library/alpine/manifests/1",
                "/v2/docker.io/library/alpine/referrers/sha256:00",
            ]
        );
    }

    #[test]
    fn paths_split_at_the_last_endpoint() {
        assert_eq!(
            split_path("/v2/library/alpine/manifests/3.20"),
            Some(("library/alpine", "/manifests/3.20"))
        );
        assert_eq!(split_path("/v2/a/blobs/b/blobs/sha256:x"), Some(("a/blobs/b", "/blobs/sha256:x")));
        assert_eq!(split_path("/v2/team/app/tags/list"), Some(("team/app", "/tags/list")));
        assert_eq!(split_path("/v2/"), None);
        assert_eq!(split_path("/v1/preheat"), None);
    }

    #[test]
    fn names_are_replaced_and_queries_kept() {
        let uri: Uri = "/v2/library/alpine/manifests/3.20?ns=docker.io".parse().unwrap();
        let out = with_name(&uri, "docker.io/library/alpine", "/manifests/3.20").unwrap();
        assert_eq!(out.to_string(), "/v2/docker.io/library/alpine/manifests/3.20?ns=docker.io");
    }

    #[test]
    fn ns_is_read_from_the_query() {
        let v = |u: &str| query_value(&u.parse::<Uri>().unwrap(), "ns");
        assert_eq!(v("/v2/a/tags/list?ns=docker.io").as_deref(), Some("docker.io"));
        assert_eq!(v("/v2/a/tags/list?a=1&ns=upstream.test%3A443").as_deref(), Some("upstream.test:443"));
        assert_eq!(v("/v2/a/tags/list?a=1"), None);
        assert_eq!(v("/v2/a/tags/list"), None);
    }
}
