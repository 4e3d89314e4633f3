//! Upload sessions live on the origin that opened them (their bytes are in its upload file),
//! but behind a load balancer a client's next PATCH or PUT may reach another origin. The
//! session id names its home origin, so this layer forwards such requests there, unchanged
//! (credentials included), and streams the answer back. Requests are forwarded at most once.
//! A forwarded request fails with 503 when membership counts the home down, when the home
//! stops taking the body, or (but for the final `PUT`) gives no answer within the commit
//! timeout of the body's end (the upload watchdog copies between origins use too).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use shoal_origin::cluster::membership::Membership;
use shoal_origin::cluster::remote::commit_timeout;
use shoal_origin::upload_watch;

/// Marks a forwarded request so it is never forwarded again.
const FORWARDED: HeaderName = HeaderName::from_static("x-shoal-forwarded-by");

/// Headers that belong to one hop and are not passed on.
const HOP_BY_HOP: [&str; 5] = ["connection", "host", "keep-alive", "transfer-encoding", "upgrade"];

/// Where to forward and how.
#[derive(Clone)]
pub struct Forwarder {
    membership: Arc<Membership>,
    client: reqwest::Client,
    /// Longest time the home may take no body chunk (the client's own pauses included).
    idle: Duration,
    /// Longest wait for the home's answer after the body's end, but for the final `PUT`.
    commit: Duration,
}

impl Forwarder {
    /// The client only bounds connecting: an upload body may stream for as long as the
    /// client keeps sending, exactly as it could to the home origin itself. `body_idle` is
    /// the longest pause this origin's server allows a client's body; the home gets that
    /// plus `call_timeout` to take each chunk, and [`commit_timeout`] to answer, except for
    /// the final `PUT`: the home answers it after copying the blob to its other owners, which
    /// takes as long as the blob is big. Whatever the request, the wait ends when membership
    /// counts the home as down (a hung origin fails its health checks).
    pub fn new(
        membership: Arc<Membership>,
        call_timeout: Duration,
        body_idle: Duration,
    ) -> anyhow::Result<Forwarder> {
        let client = shoal_tls::http_client().connect_timeout(call_timeout).build()?;
        Ok(Forwarder {
            membership,
            client,
            idle: body_idle + call_timeout,
            commit: commit_timeout(call_timeout),
        })
    }

    /// Where the session `path` names is held: here (or nowhere: not a session, or a home
    /// that is not a member, answered here with 404), at another live origin, or at a member
    /// counted down. Only a member of its own can be down: an entry that is this origin
    /// under another name, or another's second address, is never live, and a session named
    /// for it got 503 for ever.
    fn home(&self, path: &str) -> Home {
        let Some(home) = upload_id(path).and_then(shoal_origin::upload_home) else { return Home::Here };
        if home == self.membership.me() || !self.membership.is_member(&home) {
            return Home::Here;
        }
        let Some(url) = self.membership.url(&home) else { return Home::Here };
        if !self.membership.live().contains(&home) {
            return Home::Down(home);
        }
        Home::At(home, url)
    }

    async fn forward(&self, home: &str, base: &str, req: Request) -> anyhow::Result<Response> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut out = self.client.request(parts.method.clone(), format!("{base}{path}"));
        for (name, value) in &parts.headers {
            if !HOP_BY_HOP.contains(&name.as_str()) {
                out = out.header(name, value);
            }
        }
        if let Ok(me) = HeaderValue::from_str(self.membership.me()) {
            out = out.header(FORWARDED, me);
        }
        let (stream, watch) = upload_watch::watch(body.into_data_stream().map_err(std::io::Error::other));
        let send = out.body(reqwest::Body::wrap_stream(stream)).send();
        let commit = (parts.method != Method::PUT).then_some(self.commit);
        let gone = || {
            let down = !self.membership.live().iter().any(|id| id == home);
            down.then(|| format!("the home origin {home} is down"))
        };
        let answer = watch.run_checked(send, self.idle, commit, gone).await.map_err(anyhow::Error::msg)??;
        let mut response = Response::builder().status(answer.status());
        for (name, value) in answer.headers() {
            if !HOP_BY_HOP.contains(&name.as_str()) && name != reqwest::header::CONTENT_LENGTH {
                response = response.header(name, value);
            }
        }
        let body = Body::from_stream(answer.bytes_stream());
        Ok(response.body(body).unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response()))
    }
}

/// Middleware: send requests for another origin's upload session to that origin.
pub async fn forward_uploads(State(f): State<Forwarder>, req: Request, next: Next) -> Response {
    if req.headers().contains_key(&FORWARDED) {
        return next.run(req).await;
    }
    let (home, base) = match f.home(req.uri().path()) {
        Home::Here => return next.run(req).await,
        // The session is on a member that is restarting or stalled, and will be there again
        // (sessions outlive restarts): a 404 here told the client to start over.
        Home::Down(home) => {
            return unavailable(&format!("the origin holding this upload session ({home}) is down; retry"))
        }
        Home::At(home, base) => (home, base),
    };
    if !sent_as_parsed(&base, req.uri()) {
        // Not an upload session's path once the URL parser has read it: served here (404).
        return next.run(req).await;
    }
    match f.forward(&home, &base, req).await {
        Ok(response) => response,
        Err(e) => {
            tracing::warn!(home = %base, error = %e, "forwarding an upload request failed");
            unavailable(&format!("the origin holding this upload session is unreachable: {e:#}"))
        }
    }
}

/// Where an upload session is held, as [`Forwarder::home`] finds it.
enum Home {
    Here,
    At(String, String),
    Down(String),
}

/// A 503 the client retries after a while (the home's health checks take seconds).
fn unavailable(message: &str) -> Response {
    let body = serde_json::json!({"errors": [{"code": "UNKNOWN", "message": message}]});
    (StatusCode::SERVICE_UNAVAILABLE, [(axum::http::header::RETRY_AFTER, "5")], axum::Json(body))
        .into_response()
}

/// Whether `uri`, sent to `base`, reaches the path the registry parsed: the URL parser folds
/// `..` and `.` segments (`%2e` too) and turns `\` into `/`, so
/// `/v2/pub/blobs/uploads/..\..\..\priv/manifests/t.<home>` parsed as an upload session
/// here would reach another origin as a manifest read, with this origin's node identity.
fn sent_as_parsed(base: &str, uri: &axum::http::Uri) -> bool {
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    reqwest::Url::parse(&format!("{base}{path}")).is_ok_and(|url| url.path() == uri.path())
}

/// The upload session a request's path names, parsed as the registry routes it: only
/// requests to an upload session are forwarded to its home. A looser match (any path with
/// `/blobs/uploads/` in it) forwarded, say, a manifest read of a repository named
/// `t/blobs/uploads/x` to another origin, which saw this origin's node identity on it.
fn upload_id(path: &str) -> Option<&str> {
    match shoal_registry::api::route::parse_route(path)? {
        shoal_registry::api::route::Route::Upload { id, .. } => Some(id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{sent_as_parsed, upload_id};

    /// A path the URL parser would rewrite (dot segments, backslashes) is not forwarded.
    #[test]
    fn only_paths_sent_as_parsed_are_forwarded() {
        let base = "https://o1.shoal:5000";
        let uri = |p: &str| p.parse::<axum::http::Uri>().unwrap();
        assert!(sent_as_parsed(base, &uri("/v2/team/app/blobs/uploads/abc.3132?digest=sha256:00")));
        for trick in [
            "/v2/pub/blobs/uploads/../../../priv/manifests/t.3132",
            "/v2/pub/blobs/uploads/%2e%2e/%2e%2e/priv/manifests/t.3132",
            "/v2/pub/blobs/uploads/./t.3132",
        ] {
            assert!(!sent_as_parsed(base, &uri(trick)), "{trick}");
        }
        if let Ok(backslashes) =
            "/v2/pub/blobs/uploads/..\\..\\priv/manifests/t.3132".parse::<axum::http::Uri>()
        {
            assert!(!sent_as_parsed(base, &backslashes));
        }
    }

    #[test]
    fn only_requests_to_an_upload_session_name_one() {
        assert_eq!(upload_id("/v2/team/app/blobs/uploads/abc.3132"), Some("abc.3132"));
        assert_eq!(upload_id("/v2/team/app/blobs/uploads/"), None, "a new upload has no home yet");
        let disguised = "/v2/t/blobs/uploads/x/manifests/v.3132372e302e302e313a31";
        assert_eq!(upload_id(disguised), None, "a manifest of repository t/blobs/uploads/x");
        assert_eq!(upload_id("/v2/t/blobs/uploads/x/blobs/sha256:00.3132"), None);
        assert_eq!(upload_id("/v2/t/blobs/uploads/x/tags/list"), None);
    }
}
