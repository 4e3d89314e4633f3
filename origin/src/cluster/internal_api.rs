//! The server side of the internal API: the HTTP routes other origins call to reach this
//! origin's [`Node`]. Every route is a thin translation between HTTP and one `Node` method;
//! the paths, query types and limits are in [`crate::cluster::wire`].
//!
//! Status codes, which [`crate::cluster::remote::RemoteNode`] maps back to [`NodeError`]:
//! - 400: a malformed digest, repository name, query or JSON body; on `PUT /blobs/{digest}`
//!   also content that does not match its digest or size ([`NodeError::Corrupt`]).
//! - 401: missing or wrong secret (and no certificate of an allowed role). 411: a blob `PUT` without `Content-Length`.
//! - 413: a JSON body over [`MAX_RECORDS_BODY`] or more than [`MAX_RECORD_KEYS`] keys.
//! - 409: records whose versions are too far ahead of this origin's clock
//!   ([`NodeError::ClockRefused`]).
//! - 422: the node refused ([`NodeError::Refused`]): another replica would refuse too.
//! - 500: a storage failure ([`NodeError::Storage`]). 507: storage full.
//! - 502: the node could not reach something it needed ([`NodeError::Unreachable`]): the
//!   caller should try another replica.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use sha2::{Digest as _, Sha256};
use shoal_registry::identity::{Role, TransportIdentity};
use shoal_registry::range::{parse_range, RangeRequest};
use shoal_registry::{ByteStream, Digest, RepoName};

use crate::cluster::node::{BlobEntry, Holding, Node, NodeError, ScanPage};
use crate::cluster::record::{Record, RecordKey};
use crate::cluster::wire::PurgeQuery;
use crate::cluster::wire::{
    list_limit, BlobListQuery, HealthReply, RepoListQuery, RepoQuery, ScanQuery, StatQuery,
    APPLY_DEADLINE_MS, BLOBS, BLOB_ROUTE, HEALTH, MAX_RECORDS_BODY, MAX_RECORD_KEYS, METAINFO_ROUTE,
    QUARANTINE, QUARANTINED_HEADER, QUARANTINE_BLOB_ROUTE, QUARANTINE_ROUTE, RECORDS_APPLY, RECORDS_FORGET,
    RECORDS_GET, RECORDS_SCAN, REPAIR_PENDING, REPOS, RESTORE_BLOB_ROUTE, SCAN_MORE, SCAN_PAGE_BYTES,
};

/// What `GET /health` answers, asked fresh on every call so it reflects the current state.
/// It runs on the async executor, so it must only read state, never block.
pub type HealthFn = Arc<dyn Fn() -> HealthReply + Send + Sync>;

/// Who may call a guarded API (the internal API, the admin API): a client whose TLS
/// certificate names one of `roles` (checked by the HTTP server against the cluster CA),
/// or one that sends `Authorization: Bearer <s>` for any `s` in `secrets`. Several secrets
/// let an operator rotate the shared one an origin at a time. With neither, **every caller
/// is trusted**: only for a single origin, or a listener no untrusted client can reach.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    pub secrets: Vec<String>,
    pub roles: Vec<Role>,
}

impl Guard {
    /// Nothing to check: every caller is trusted.
    pub fn is_open(&self) -> bool {
        self.secrets.is_empty() && self.roles.is_empty()
    }
}

/// The internal API over `node`, behind `guard` (health included).
pub fn router(node: Arc<dyn Node>, policy: Guard, health: HealthFn) -> Router {
    let state = ApiState { node, health };
    let routes = Router::new()
        .route(HEALTH, get(health_reply))
        .route(BLOBS, get(blob_list))
        .route(BLOB_ROUTE, get(blob_get).put(blob_put).delete(blob_remove))
        .route(METAINFO_ROUTE, get(metainfo))
        .route(QUARANTINE_BLOB_ROUTE, post(blob_quarantine))
        .route(RESTORE_BLOB_ROUTE, post(blob_restore))
        .route(QUARANTINE, get(quarantine_list))
        .route(QUARANTINE_ROUTE, delete(blob_purge))
        .route(REPAIR_PENDING, get(repair_pending))
        .route(RECORDS_GET, post(records_get))
        .route(RECORDS_SCAN, get(records_scan))
        .route(RECORDS_APPLY, post(records_apply))
        .route(RECORDS_FORGET, post(records_forget))
        .route(REPOS, get(repos))
        .with_state(state);
    guard(routes, policy)
}

/// Require `Authorization: Bearer <secret>` on every route of `routes` (the internal API,
/// the admin API); without a secret, every caller is trusted.
/// `routes`, answering 401 to callers `policy` does not allow.
pub fn guard(routes: Router, policy: Guard) -> Router {
    let auth = Arc::new(Auth {
        secrets: policy.secrets.iter().map(|s| Sha256::digest(s.as_bytes()).into()).collect(),
        roles: policy.roles,
    });
    routes.layer(middleware::from_fn_with_state(auth, authenticate))
}

#[derive(Clone)]
struct ApiState {
    node: Arc<dyn Node>,
    health: HealthFn,
}

/// The accepted secrets, kept as their SHA-256 so comparison takes the same time for any
/// input, and the accepted certificate roles.
struct Auth {
    secrets: Vec<[u8; 32]>,
    roles: Vec<Role>,
}

impl Auth {
    fn allows(&self, req: &Request) -> bool {
        if self.secrets.is_empty() && self.roles.is_empty() {
            return true;
        }
        if req.extensions().get::<TransportIdentity>().is_some_and(|id| self.roles.contains(&id.role)) {
            return true;
        }
        let Some(given) =
            req.headers().get(header::AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        else {
            return false;
        };
        let given: [u8; 32] = Sha256::digest(given).into();
        // Every accepted secret is compared, so timing does not tell which one matched.
        self.secrets.iter().fold(false, |ok, expected| constant_time_eq(&given, expected) | ok)
    }
}

/// Equality whose running time does not depend on where the inputs first differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authenticate(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    if auth.allows(&req) {
        next.run(req).await
    } else {
        let mut response = Failure::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong internal API secret, and no certificate of a role allowed here",
        )
        .into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        response
    }
}

/// An error answer: a status and a short plain-text reason.
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    message: String,
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure { status, message: message.into() }
    }

    fn bad_request(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found() -> Failure {
        Failure::new(StatusCode::NOT_FOUND, "not found")
    }

    fn too_large(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::PAYLOAD_TOO_LARGE, message)
    }
}

impl From<NodeError> for Failure {
    fn from(e: NodeError) -> Failure {
        let status = match &e {
            NodeError::Corrupt(_) => StatusCode::BAD_REQUEST,
            NodeError::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
            NodeError::Storage { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            NodeError::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            NodeError::Refused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            NodeError::ClockRefused { .. } => StatusCode::CONFLICT,
        };
        if status.is_server_error() {
            tracing::warn!(error = %e, "internal API call failed");
        }
        Failure::new(status, e.to_string())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], self.message).into_response()
    }
}

type Answer<T> = Result<T, Failure>;

fn parse_digest(raw: &str) -> Answer<Digest> {
    raw.parse().map_err(|e| Failure::bad_request(format!("bad digest {raw:?}: {e}")))
}

fn parse_repo(raw: &str) -> Answer<RepoName> {
    raw.parse().map_err(|e| Failure::bad_request(format!("bad repository name: {e}")))
}

/// The request's `Content-Length`, if it sent one.
fn content_length(headers: &HeaderMap) -> Answer<Option<u64>> {
    headers
        .get(header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| Failure::bad_request("bad Content-Length"))
        })
        .transpose()
}

/// A JSON body of at most `limit` bytes, read without ever holding more than that.
async fn json_body<T: DeserializeOwned>(headers: &HeaderMap, body: Body, limit: usize) -> Answer<T> {
    let too_large = || Failure::too_large(format!("body is larger than {limit} bytes"));
    if content_length(headers)?.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Failure::bad_request(format!("reading body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&buf).map_err(|e| Failure::bad_request(format!("bad JSON body: {e}")))
}

async fn health_reply(State(s): State<ApiState>) -> Json<HealthReply> {
    Json((s.health)())
}

async fn blob_list(
    State(s): State<ApiState>,
    Query(q): Query<BlobListQuery>,
) -> Answer<Json<Vec<BlobEntry>>> {
    Ok(Json(s.node.blob_list(q.after.as_ref(), list_limit(q.n)).await?))
}

/// `HEAD` (size only) and `GET` (bytes, honouring a single `Range`).
async fn blob_get(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
    method: Method,
    Query(q): Query<StatQuery>,
    headers: HeaderMap,
) -> Answer<Response> {
    let digest = parse_digest(&raw)?;
    let size = if q.peek && method == Method::HEAD {
        match s.node.blob_peek(&digest).await? {
            Holding::Held(size) => size,
            Holding::Quarantined => {
                let mut response = Failure::not_found().into_response();
                response.headers_mut().insert(QUARANTINED_HEADER, HeaderValue::from_static("1"));
                return Ok(response);
            }
            Holding::Absent => return Err(Failure::not_found()),
        }
    } else {
        s.node.blob_stat(&digest).await?.ok_or_else(Failure::not_found)?
    };
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(r) => match parse_range(r, size) {
            RangeRequest::Full => None,
            RangeRequest::Partial(r) => Some(r),
            RangeRequest::Unsatisfiable => {
                let mut response =
                    Failure::new(StatusCode::RANGE_NOT_SATISFIABLE, "range outside the blob").into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    response.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Ok(response);
            }
        },
    };
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        // The blob may have been removed since the stat: then it is absent, as for any reader.
        Body::from_stream(s.node.blob_get(&digest, range).await?.ok_or_else(Failure::not_found)?)
    };
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(range.map_or(size, |r| r.len())));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    if let Some(r) = range {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", r.start, r.end)) {
            response.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(response)
}

/// Streams the body straight into the node, which verifies it before it becomes visible.
async fn blob_put(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Answer<StatusCode> {
    let digest = parse_digest(&raw)?;
    let size = content_length(&headers)?
        .ok_or_else(|| Failure::new(StatusCode::LENGTH_REQUIRED, "Content-Length is required"))?;
    let stream: ByteStream = Box::pin(body.into_data_stream().map_err(std::io::Error::other));
    s.node.blob_put(&digest, size, stream).await?;
    Ok(StatusCode::CREATED)
}

async fn blob_remove(State(s): State<ApiState>, Path(raw): Path<String>) -> Answer<StatusCode> {
    let digest = parse_digest(&raw)?;
    if s.node.blob_remove(&digest).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Failure::not_found())
    }
}

async fn blob_quarantine(State(s): State<ApiState>, Path(raw): Path<String>) -> Answer<StatusCode> {
    let digest = parse_digest(&raw)?;
    if s.node.blob_quarantine(&digest).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Failure::not_found())
    }
}

async fn blob_restore(State(s): State<ApiState>, Path(raw): Path<String>) -> Answer<StatusCode> {
    let digest = parse_digest(&raw)?;
    if s.node.blob_restore(&digest).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Failure::not_found())
    }
}

async fn quarantine_list(
    State(s): State<ApiState>,
    Query(q): Query<BlobListQuery>,
) -> Answer<Json<Vec<BlobEntry>>> {
    Ok(Json(s.node.quarantine_list(q.after.as_ref(), list_limit(q.n)).await?))
}

async fn blob_purge(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
    Query(q): Query<PurgeQuery>,
) -> Answer<Json<u64>> {
    let digest = parse_digest(&raw)?;
    s.node.blob_purge(&digest, q.since).await?.map(Json).ok_or_else(Failure::not_found)
}

async fn repair_pending(State(s): State<ApiState>) -> Answer<Json<u64>> {
    Ok(Json(s.node.repair_pending().await?))
}

async fn metainfo(State(s): State<ApiState>, Path(raw): Path<String>) -> Answer<Response> {
    let digest = parse_digest(&raw)?;
    let json: Bytes = s.node.metainfo(&digest).await?.ok_or_else(Failure::not_found)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}

async fn records_get(
    State(s): State<ApiState>,
    Query(q): Query<RepoQuery>,
    headers: HeaderMap,
    body: Body,
) -> Answer<Json<Vec<Option<Record>>>> {
    let repo = parse_repo(&q.repo)?;
    let keys: Vec<RecordKey> = json_body(&headers, body, MAX_RECORDS_BODY).await?;
    if keys.len() > MAX_RECORD_KEYS {
        return Err(Failure::too_large(format!("at most {MAX_RECORD_KEYS} keys per call")));
    }
    Ok(Json(s.node.records_get(repo.as_str(), &keys).await?))
}

/// Every record in one answer for callers of earlier releases; one page for those that ask.
async fn records_scan(State(s): State<ApiState>, Query(q): Query<ScanQuery>) -> Answer<Response> {
    let repo = parse_repo(&q.repo)?;
    let Some(max_bytes) = q.max_bytes else {
        let records = s.node.records_scan(repo.as_str(), q.kind, q.subject.as_ref()).await?;
        return Ok(Json(records.ok_or_else(Failure::not_found)?).into_response());
    };
    let page = ScanPage {
        after: q.after,
        max_bytes: max_bytes.clamp(1, SCAN_PAGE_BYTES),
        max_records: q.max_records.unwrap_or(usize::MAX).max(1),
    };
    let answer = s.node.records_page(repo.as_str(), q.kind, q.subject.as_ref(), &page).await?;
    let answer = answer.ok_or_else(Failure::not_found)?;
    let mut response = Json(answer.records).into_response();
    if answer.more {
        response.headers_mut().insert(SCAN_MORE, HeaderValue::from_static("1"));
    }
    Ok(response)
}

async fn records_apply(
    State(s): State<ApiState>,
    Query(q): Query<RepoQuery>,
    headers: HeaderMap,
    body: Body,
) -> Answer<StatusCode> {
    let repo = parse_repo(&q.repo)?;
    // The time the writer gave it counts from the request's head, not from its body read
    // (a slow read must not add to it), and never beyond the read-to-write deadline.
    let deadline = match headers.get(APPLY_DEADLINE_MS) {
        None => None,
        Some(v) => {
            let ms = v.to_str().ok().and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| {
                Failure::bad_request(format!("{APPLY_DEADLINE_MS} must be a number of milliseconds"))
            })?;
            let left = std::time::Duration::from_millis(ms).min(crate::cluster::gc::READ_TO_WRITE_DEADLINE);
            Some(std::time::Instant::now() + left)
        }
    };
    let records: Vec<Record> = json_body(&headers, body, MAX_RECORDS_BODY).await?;
    // A writer whose clock is far ahead would make its records win over every later write.
    if let Some(r) = records.iter().find(|r| crate::cluster::record::too_far_ahead(&r.version)) {
        let ahead = r.version.millis.saturating_sub(crate::cluster::record::now_millis());
        return Err(Failure::new(
            StatusCode::CONFLICT,
            format!(
                "record version from {} is {} ms ahead of this origin's clock (at most {} ms allowed): fix the clocks",
                r.version.node,
                ahead,
                crate::cluster::record::MAX_CLOCK_AHEAD.as_millis()
            ),
        ));
    }
    // What is late commits nothing.
    match deadline {
        Some(deadline) => s.node.records_apply_by(repo.as_str(), &records, deadline).await?,
        None => s.node.records_apply(repo.as_str(), &records).await?,
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn records_forget(
    State(s): State<ApiState>,
    Query(q): Query<RepoQuery>,
    headers: HeaderMap,
    body: Body,
) -> Answer<StatusCode> {
    let repo = parse_repo(&q.repo)?;
    let records: Vec<Record> = json_body(&headers, body, MAX_RECORDS_BODY).await?;
    s.node.records_forget(repo.as_str(), &records).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn repos(State(s): State<ApiState>, Query(q): Query<RepoListQuery>) -> Answer<Json<Vec<String>>> {
    Ok(Json(s.node.repos(q.after.as_deref(), list_limit(q.n)).await?))
}

#[cfg(test)]
mod tests;
