//! The HTTP side of pull-through on an origin: the progress endpoint agents and other origins
//! poll while a blob is fetched, the list of configured registries agents map requests with,
//! and the middleware that hands a client's upstream credentials to [`PullThrough`].

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Deserialize;
use shoal_registry::auth::authority::NodeApiCaller;
use shoal_registry::mirror::Registries;
use shoal_registry::{ApiError, Digest, RepoName};
use shoal_upstream::Credentials;

use super::{
    with_client_credentials, ClientCredentials, PullThrough, PROGRESS_ROUTE, REGISTRIES_ROUTE,
    UPSTREAM_AUTHORIZATION,
};

#[derive(Deserialize)]
struct ProgressQuery {
    repo: String,
    #[serde(default)]
    here: Option<String>,
}

/// The node-API routes of pull-through (guard them like the other node routes).
pub fn routes(pull: Arc<PullThrough>) -> Router {
    Router::new().route(PROGRESS_ROUTE, get(progress)).route(STREAM_ROUTE, get(stream)).with_state(pull)
}

/// The list of configured upstream registries, for anyone: agents map every request with it
/// and ask for it with no credentials of their own (a client's token comes only with a
/// client's request), so behind the node guard an agent without a node certificate never
/// learnt it where `[auth]` lets no anonymous client pull, and every mirrored name failed.
/// It names registries (host names), nothing of what they hold.
pub fn public_routes(pull: Arc<PullThrough>) -> Router {
    Router::new().route(REGISTRIES_ROUTE, get(registries)).with_state(pull)
}

async fn registries(State(pull): State<Arc<PullThrough>>) -> Json<Registries> {
    Json(Registries { registries: pull.registries().to_vec() })
}

/// Middleware on the registry API: a one-component Docker Hub name in the explicit form
/// (`/v2/docker.io/alpine/...`, as a client that names the origin and not an agent writes
/// it) is answered 404 `NAME_UNKNOWN` naming `docker.io/library/alpine`, the one repository
/// that content is kept and authorized under. Asked of Docker Hub as `alpine`, it answered
/// 401 as for a private repository. Not served under either name: under its own it is a
/// second copy that access rules written for `docker.io/library/...` do not cover, and
/// rewritten here it would miss the token a client fetched for the name it asked for (Docker
/// scopes its token by its own reference) and a mount's `from`. Agents rewrite such names
/// before they ask (`mirror::target`). Runs before authorization.
pub async fn explicit_names(State(pull): State<Arc<PullThrough>>, req: Request, next: Next) -> Response {
    let full = shoal_registry::mirror::split_path(req.uri().path())
        .and_then(|(name, _)| shoal_registry::mirror::explicit_repo(name, pull.registries()));
    match full {
        Some(full) => ApiError::new(
            shoal_registry::ErrorCode::NameUnknown,
            format!("Docker Hub keeps this repository as {full}: ask for that name"),
        )
        .into_response(),
        None => next.run(req).await,
    }
}

/// Whether a request may fetch on this origin itself (`here`): only a node may (an origin
/// asking on its primary's behalf); a client's `here` would have every origin fetch the
/// same blob from the upstream, past the one fetch per digest.
fn here(q: &ProgressQuery, caller: Option<Extension<NodeApiCaller>>) -> bool {
    q.here.is_some() && caller.is_some_and(|Extension(c)| c == NodeApiCaller::Node)
}

async fn progress(
    State(pull): State<Arc<PullThrough>>,
    Path(digest): Path<String>,
    Query(q): Query<ProgressQuery>,
    caller: Option<Extension<NodeApiCaller>>,
) -> Response {
    let (Ok(digest), Ok(repo)) = (digest.parse::<Digest>(), q.repo.parse::<RepoName>()) else {
        return (StatusCode::BAD_REQUEST, "bad digest or repository name").into_response();
    };
    match pull.progress(&repo, &digest, here(&q, caller)).await {
        Ok(p) => Json(p).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Route of a fetch's bytes while they arrive (for its first requesters).
pub const STREAM_ROUTE: &str = "/shoal/v1/upstream/blobs/{digest}/stream";

/// `200` with the blob's bytes as the fetch receives them, or `404`: not streamed (wait for
/// the blob, then read it as any other).
async fn stream(
    State(pull): State<Arc<PullThrough>>,
    Path(digest): Path<String>,
    Query(q): Query<ProgressQuery>,
    caller: Option<Extension<NodeApiCaller>>,
) -> Response {
    let (Ok(digest), Ok(repo)) = (digest.parse::<Digest>(), q.repo.parse::<RepoName>()) else {
        return (StatusCode::BAD_REQUEST, "bad digest or repository name").into_response();
    };
    match pull.stream(&repo, &digest, here(&q, caller)).await {
        Ok(Some((size, body))) => {
            ([(header::CONTENT_LENGTH, size.to_string())], axum::body::Body::from_stream(body))
                .into_response()
        }
        Ok(None) => (StatusCode::NOT_FOUND, "not streamed; wait for the blob").into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The client's credentials for upstreams: Shoal's own header (set by agents and origins),
/// else, when Shoal itself does not check credentials (`shoal_auth` false), a plain
/// `Authorization: Basic` the client sent after an upstream's challenge.
pub fn credentials_of(headers: &HeaderMap, shoal_auth: bool) -> Option<Credentials> {
    if let Some(v) = headers.get(UPSTREAM_AUTHORIZATION) {
        return Credentials::from_authorization(v);
    }
    if shoal_auth {
        return None;
    }
    headers.get(header::AUTHORIZATION).and_then(Credentials::from_authorization)
}

/// Middleware: run the request with the client's upstream credentials (see [`credentials_of`]).
pub async fn pass_credentials(State(shoal_auth): State<bool>, req: Request, next: Next) -> Response {
    let creds = ClientCredentials {
        creds: credentials_of(req.headers(), shoal_auth),
        may_answer_challenge: !shoal_auth,
    };
    with_client_credentials(creds, next.run(req)).await
}
