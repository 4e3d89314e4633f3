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

use crate::cluster::node::{BlobEntry, Node, NodeError, ScanPage};
use crate::cluster::record::{Record, RecordKey};
use crate::cluster::wire::PurgeQuery;
use crate::cluster::wire::{
    list_limit, BlobListQuery, HealthReply, RepoListQuery, RepoQuery, ScanQuery, BLOBS, BLOB_ROUTE, HEALTH,
    MAX_RECORDS_BODY, MAX_RECORD_KEYS, METAINFO_ROUTE, QUARANTINE, QUARANTINE_BLOB_ROUTE, QUARANTINE_ROUTE,
    RECORDS_APPLY, RECORDS_FORGET, RECORDS_GET, RECORDS_SCAN, REPAIR_PENDING, REPOS, RESTORE_BLOB_ROUTE,
    SCAN_MORE, SCAN_PAGE_BYTES,
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
    headers: HeaderMap,
) -> Answer<Response> {
    let digest = parse_digest(&raw)?;
    let size = s.node.blob_stat(&digest).await?.ok_or_else(Failure::not_found)?;
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
    let page = ScanPage { after: q.after, max_bytes: max_bytes.clamp(1, SCAN_PAGE_BYTES) };
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
    s.node.records_apply(repo.as_str(), &records).await?;
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
mod tests {
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
        node.blob_put(
            &digest,
            BLOB.len() as u64,
            Box::pin(futures_util::stream::iter([Ok(Bytes::from(BLOB))])),
        )
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
            assert_eq!(
                f.status(f.req(method.clone(), path).bearer_auth("wrong")).await,
                401,
                "{method} {path}"
            );
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
        let resp =
            f.req(reqwest::Method::GET, &path).header(header::RANGE, "bytes=2-4").send().await.unwrap();
        assert_eq!(resp.status(), 206);
        assert_eq!(resp.headers()[header::CONTENT_RANGE], "bytes 2-4/10");
        assert_eq!(resp.bytes().await.unwrap(), &BLOB[2..=4]);
        let resp =
            f.req(reqwest::Method::GET, &path).header(header::RANGE, "bytes=10-").send().await.unwrap();
        assert_eq!(resp.status(), 416);
        assert_eq!(resp.headers()[header::CONTENT_RANGE], "bytes */10");
        let resp =
            f.req(reqwest::Method::GET, &path).header(header::RANGE, "lines=1-2").send().await.unwrap();
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
        assert_eq!(
            f.status(f.req(reqwest::Method::GET, &format!("{RECORDS_SCAN}?repo=a&kind=blob"))).await,
            400
        );
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
        for body in ["", "{", "not json", "[{\"kind\":\"tag\"}]", "{\"a\":1}", "[[[[[[[[[[[[[[[[[[[[[[[[[[[["]
        {
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
}
