//! The OCI Distribution v1.1 HTTP API as an axum router over a [`RegistryStore`].
//!
//! One dispatcher matches the path (names contain slashes, so axum's path patterns do not fit),
//! checks access and the request limit, and hands off to one small handler per endpoint.

mod blobs;
#[cfg(test)]
mod identity_tests;
mod listing;
pub use listing::MAX_PAGE;
mod manifests;
pub mod route;
#[cfg(test)]
mod test_store;
mod uploads;
#[cfg(test)]
mod write_tests;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::TryStreamExt;
use tokio::sync::Semaphore;

use crate::auth::{
    AccessCheck, Action, AuthGate, Need, Principal, ServedPrincipal, Visible, FORWARD_AUTHORIZATION,
};
use crate::error::{ApiError, ErrorCode};
use crate::name::RepoName;
use crate::store::{ByteStream, RegistryStore};
use route::{parse_route, Route};

/// Header every `/v2/` response carries so Docker clients recognise the API.
pub const API_VERSION_HEADER: &str = "docker-distribution-api-version";
pub const DIGEST_HEADER: &str = "docker-content-digest";
/// On an upstream tag's manifest: the seconds left until
/// [`StoredManifest::serve_stale_until`](crate::store::StoredManifest), which agents keep with
/// the tag by their own clock (seconds left, not a time: nodes' clocks may disagree).
pub const SERVE_STALE_FOR_HEADER: &str = "shoal-serve-stale-for";

/// Seconds since the Unix epoch now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
pub const UPLOAD_UUID_HEADER: &str = "docker-upload-uuid";
pub const SUBJECT_HEADER: &str = "oci-subject";
pub const FILTERS_APPLIED_HEADER: &str = "oci-filters-applied";

/// How a registry router behaves; the origin and the agent differ only here and in the store.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Answer every write with 405 `UNSUPPORTED` (the agent's mode).
    pub read_only: bool,
    /// Largest manifest accepted, in bytes.
    pub max_manifest_size: u64,
    /// Requests served at once before new ones get 429 `TOOMANYREQUESTS`.
    pub max_concurrent_requests: usize,
    /// Who may do what; the default allows everything.
    pub auth: AuthGate,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            read_only: false,
            max_manifest_size: crate::manifest::DEFAULT_MAX_MANIFEST_SIZE,
            max_concurrent_requests: 1024,
            auth: AuthGate::default(),
        }
    }
}

/// Shared state of the router.
struct App {
    store: Arc<dyn RegistryStore>,
    config: ApiConfig,
    in_flight: Arc<Semaphore>,
}

/// Build the `/v2/` router over `store`.
pub fn router(store: Arc<dyn RegistryStore>, config: ApiConfig) -> Router {
    let in_flight = Arc::new(Semaphore::new(config.max_concurrent_requests.max(1)));
    let app = Arc::new(App { store, config, in_flight });
    Router::new()
        .route("/v2", axum::routing::any(dispatch))
        .route("/v2/", axum::routing::any(dispatch))
        .route("/v2/{*rest}", axum::routing::any(dispatch))
        .with_state(app)
}

/// What a handler needs from the request, already separated from the body.
pub(crate) struct Ctx {
    pub store: Arc<dyn RegistryStore>,
    pub config: ApiConfig,
    pub method: Method,
    pub headers: HeaderMap,
    pub query: HashMap<String, String>,
    pub body: Body,
    /// Which repositories the catalog may show this client (`None`: all).
    pub visible: Option<crate::auth::Visible>,
}

impl Ctx {
    pub fn header(&self, name: impl header::AsHeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The request body as a stream of byte chunks.
    pub fn take_body(&mut self) -> ByteStream {
        let body = std::mem::take(&mut self.body);
        Box::pin(body.into_data_stream().map_err(body_error))
    }

    /// The declared `Content-Length`, if any.
    pub fn content_length(&self) -> Result<Option<u64>, ApiError> {
        match self.header(header::CONTENT_LENGTH) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| ApiError::new(ErrorCode::SizeInvalid, "Content-Length is not a number")),
        }
    }
}

/// A request body's error as an `io::Error`, keeping the kind of an I/O error inside it (the
/// HTTP server's body timeout is `TimedOut`), so the store and the client see why.
fn body_error(e: axum::Error) -> std::io::Error {
    let mut inner = e.into_inner();
    loop {
        inner = match inner.downcast::<std::io::Error>() {
            Ok(io) => return *io,
            Err(other) => other,
        };
        inner = match inner.downcast::<axum::Error>() {
            Ok(wrapped) => wrapped.into_inner(),
            Err(other) => return std::io::Error::other(other),
        };
    }
}

pub(crate) type ApiResult = Result<Response, ApiError>;

async fn dispatch(State(app): State<Arc<App>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Some(route) = parse_route(parts.uri.path()) else {
        return with_version(StatusCode::NOT_FOUND.into_response());
    };
    let is_read = parts.method == Method::GET || parts.method == Method::HEAD;
    // Upload sessions are a write's, whatever the method: a read-only registry has none.
    let writes = !is_read || matches!(route, Route::Upload { .. } | Route::UploadStart { .. });
    let allow = allowed_methods(&route, app.config.read_only);
    if writes && app.config.read_only {
        // Before authorization: an agent's writes are refused as unsupported whoever asks
        // (behind a 401 or 403 first, `docker push` said "unauthorized", never "read-only").
        let err = ApiError::new(ErrorCode::Unsupported, "this registry is read-only; push to an origin");
        return with_version(finish(err.into_response(), &parts.method, allow));
    }
    if let Some(name) = repeated_digest_parameter(&parts.uri) {
        let err = ApiError::new(ErrorCode::DigestInvalid, format!("more than one `{name}` parameter"));
        return with_version(err.into_response());
    }
    let mut query =
        Query::<HashMap<String, String>>::try_from_uri(&parts.uri).map(|q| q.0).unwrap_or_default();
    let needs = needs(&route, &parts.method);
    let identity = parts.extensions.get::<crate::identity::TransportIdentity>();
    let check = AccessCheck { headers: &parts.headers, identity, needs: &needs };
    let principal = match app.config.auth.0.authorize(&check).await {
        Ok(p) => p,
        Err(e) => return with_version(e.into_response()),
    };
    // A cross-repository mount reads its source. Without pull there it is no mount, and the
    // spec's answer to a mount that cannot be done is a new upload session (202), not a
    // refusal: containerd fails a push on a 403 there.
    if let (Route::UploadStart { .. }, Some(_), Some(from)) = (&route, query.get("mount"), query.get("from"))
    {
        let source = [Need::Repo(from.clone(), Action::Pull)];
        let check = AccessCheck { headers: &parts.headers, identity, needs: &source };
        if app.config.auth.0.authorize(&check).await.is_err() {
            query.remove("mount");
        }
    }
    // Taken once the request is authorized: a login waits up to `PASSWORD_CHECK_WAIT` for
    // one of the few password checks, and logins under made-up names holding these slots
    // while they waited turned every other client away with 429.
    let Ok(_permit) = app.in_flight.clone().try_acquire_owned() else {
        let err = ApiError::new(ErrorCode::TooManyRequests, "too many requests in flight; retry shortly")
            .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return with_version(err.into_response());
    };
    // A bearer token that authorized this request goes along to the origin (agents, plain HTTP).
    let forward = parts
        .headers
        .get(header::AUTHORIZATION)
        .filter(|v| v.as_bytes().len() > 7 && v.as_bytes()[..7].eq_ignore_ascii_case(b"bearer "))
        .cloned();
    let visible = if matches!(route, Route::Catalog) {
        catalog_visibility(&app, &parts.headers, &principal).await
    } else {
        None
    };
    let mut ctx = Ctx {
        store: app.store.clone(),
        config: app.config.clone(),
        method: parts.method.clone(),
        headers: parts.headers,
        query,
        body,
        visible,
    };
    let result = FORWARD_AUTHORIZATION.scope(forward, handle(route, &mut ctx)).await;
    let mut response = finish(result.unwrap_or_else(IntoResponse::into_response), &ctx.method, allow);
    response.extensions_mut().insert(ServedPrincipal(principal));
    with_version(response)
}

/// The last touches every routed answer gets: a 405 names the methods its resource takes
/// (RFC 9110; none: an empty list) unless the store named them, and a HEAD answer carries GET's headers but no body.
fn finish(mut response: Response, method: &Method, allow: &'static str) -> Response {
    if response.status() == StatusCode::METHOD_NOT_ALLOWED && !response.headers().contains_key(header::ALLOW)
    {
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    if method == Method::HEAD {
        // The length GET's body would have (RFC 9110 8.6), where the answer did not say it
        // itself: once the body is gone, the server would otherwise announce 0.
        if !response.headers().contains_key(header::CONTENT_LENGTH) {
            if let Some(n) = axum::body::HttpBody::size_hint(response.body()).exact() {
                response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
        let (p, _) = response.into_parts();
        response = Response::from_parts(p, Body::empty());
    }
    response
}

/// A digest-bearing parameter (`digest`, `mount`) given more than once: only the last would
/// be read, so an upload closed with `?digest=<right>&digest=<wrong>` was checked against one
/// digest while a proxy or log in front saw another. Refused as ambiguous.
fn repeated_digest_parameter(uri: &http::Uri) -> Option<&'static str> {
    let pairs = Query::<Vec<(String, String)>>::try_from_uri(uri).map(|q| q.0).unwrap_or_default();
    ["digest", "mount"].into_iter().find(|name| pairs.iter().filter(|(k, _)| k == name).count() > 1)
}

/// Which repositories the catalog shows. A node (an agent, with its certificate) lists it for a
/// client of its own: what that client may pull, by the credentials the node forwarded (none:
/// an anonymous client's view). Shown everything, an agent's clients saw private names.
async fn catalog_visibility(app: &App, headers: &HeaderMap, principal: &Principal) -> Option<Visible> {
    let auth = &app.config.auth.0;
    let Principal::Node(_) = principal else { return auth.visible(principal) };
    let needs = [Need::Catalog];
    match auth.authorize(&AccessCheck { headers, identity: None, needs: &needs }).await {
        Ok(client) => auth.visible(&client),
        Err(_) => Some(Arc::new(|_: &str| false)),
    }
}

/// What a request needs, by endpoint and method.
fn needs(route: &Route<'_>, method: &Method) -> Vec<Need> {
    let read = *method == Method::GET || *method == Method::HEAD;
    let repo = |name: &str, action| vec![Need::Repo(name.to_string(), action)];
    match route {
        Route::Base => vec![Need::Base],
        Route::Catalog => vec![Need::Catalog],
        Route::Tags { name } | Route::Referrers { name, .. } => repo(name, Action::Pull),
        Route::Blob { name, .. } | Route::Manifest { name, .. } => match *method {
            _ if read => repo(name, Action::Pull),
            Method::DELETE => repo(name, Action::Delete),
            _ => repo(name, Action::Push),
        },
        Route::Upload { name, .. } => repo(name, Action::Push),
        // A cross-repository mount's source is checked apart (see `dispatch`).
        Route::UploadStart { name } => repo(name, Action::Push),
    }
}

async fn handle(route: Route<'_>, ctx: &mut Ctx) -> ApiResult {
    let method = ctx.method.clone();
    match route {
        Route::Base => match method {
            Method::GET | Method::HEAD => {
                Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{}").into_response())
            }
            _ => Err(method_not_allowed()),
        },
        Route::Catalog => match method {
            Method::GET | Method::HEAD => listing::catalog(ctx).await,
            _ => Err(method_not_allowed()),
        },
        Route::Tags { name } => {
            let name = repo(name)?;
            match method {
                Method::GET | Method::HEAD => listing::tags(ctx, &name).await,
                _ => Err(method_not_allowed()),
            }
        }
        Route::Referrers { name, digest } => {
            let name = repo(name)?;
            match method {
                Method::GET | Method::HEAD => listing::referrers(ctx, &name, digest).await,
                _ => Err(method_not_allowed()),
            }
        }
        Route::Blob { name, digest } => {
            let name = repo(name)?;
            let digest = digest.parse()?;
            match method {
                Method::GET | Method::HEAD => blobs::get(ctx, &name, &digest).await,
                Method::DELETE => blobs::delete(ctx, &name, &digest).await,
                _ => Err(method_not_allowed()),
            }
        }
        Route::UploadStart { name } => {
            let name = repo(name)?;
            match method {
                Method::POST => uploads::start(ctx, &name).await,
                _ => Err(method_not_allowed()),
            }
        }
        Route::Upload { name, id } => {
            let name = repo(name)?;
            match method {
                Method::GET | Method::HEAD => uploads::status(ctx, &name, id).await,
                Method::PATCH => uploads::patch(ctx, &name, id).await,
                Method::PUT => uploads::finish(ctx, &name, id).await,
                Method::DELETE => uploads::cancel(ctx, &name, id).await,
                _ => Err(method_not_allowed()),
            }
        }
        Route::Manifest { name, reference } => {
            let name = repo(name)?;
            match method {
                Method::GET | Method::HEAD => manifests::get(ctx, &name, reference).await,
                Method::PUT => manifests::put(ctx, &name, reference).await,
                Method::DELETE => manifests::delete(ctx, &name, reference).await,
                _ => Err(method_not_allowed()),
            }
        }
    }
}

fn repo(name: &str) -> Result<RepoName, ApiError> {
    Ok(name.parse()?)
}

/// The methods `route` takes here, as a 405's `Allow` lists them (a read-only registry, an
/// agent, takes reads only, and no upload method at all).
fn allowed_methods(route: &Route<'_>, read_only: bool) -> &'static str {
    match (route, read_only) {
        (Route::Base | Route::Catalog | Route::Tags { .. } | Route::Referrers { .. }, _) => "GET, HEAD",
        (Route::Blob { .. } | Route::Manifest { .. }, true) => "GET, HEAD",
        (Route::Upload { .. } | Route::UploadStart { .. }, true) => "",
        (Route::Blob { .. }, false) => "GET, HEAD, DELETE",
        (Route::Manifest { .. }, false) => "GET, HEAD, PUT, DELETE",
        (Route::UploadStart { .. }, false) => "POST",
        (Route::Upload { .. }, false) => "GET, HEAD, PATCH, PUT, DELETE",
    }
}

fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::Unsupported, "method not supported on this endpoint")
}

fn with_version(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(HeaderName::from_static(API_VERSION_HEADER), HeaderValue::from_static("registry/2.0"));
    response
}

/// A header value from text that was validated upstream (digests, names, numbers).
pub(crate) fn hv(s: impl AsRef<str>) -> HeaderValue {
    HeaderValue::from_str(s.as_ref()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `Range` value for an upload holding `offset` bytes (`0-0` when empty, as
/// docker/distribution answers and clients expect).
pub(crate) fn upload_range(offset: u64) -> HeaderValue {
    hv(format!("0-{}", offset.saturating_sub(1)))
}
