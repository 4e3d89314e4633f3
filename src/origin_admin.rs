//! The origin's admin API under `/shoal/v1/admin`: run a repair pass or a garbage collection
//! now, and see the cluster's members. It moves or deletes data, so it requires the cluster
//! secret or a certificate: an operator's (role admin) or an origin's, relaying a
//! collection to the origin that runs it. A node that is not an origin cannot call it.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use shoal_origin::cluster::coordinator::Coordinator;
use shoal_origin::cluster::gc::{Departures, GcError, GcSettings};
use shoal_origin::cluster::membership::Membership;
use shoal_origin::cluster::repair::RepairHandle;

/// What the admin routes act on.
#[derive(Clone)]
pub struct Admin {
    pub coordinator: Arc<Coordinator>,
    pub membership: Arc<Membership>,
    pub repair: RepairHandle,
    /// Who may call: operators' certificates, origins relaying, or the cluster secret.
    pub guard: shoal_origin::cluster::internal_api::Guard,
    /// The secret this origin sends when it relays a collection (its certificate goes too).
    pub secret: Option<String>,
    pub gc: GcSettings,
    /// For handing a collection to the origin that runs it.
    pub http: reqwest::Client,
}

#[derive(Clone)]
struct AdminState {
    admin: Admin,
}

/// The admin routes, behind `admin.guard`.
pub fn routes(admin: Admin) -> axum::Router {
    let guard = admin.guard.clone();
    let router = axum::Router::new()
        .route("/shoal/v1/admin/repair", post(repair))
        .route("/shoal/v1/admin/gc", post(gc))
        .route("/shoal/v1/admin/members", get(members))
        .with_state(AdminState { admin });
    shoal_origin::cluster::internal_api::guard(router, guard)
}

async fn repair(State(s): State<AdminState>) -> Response {
    match s.admin.repair.run_now().await {
        Some(report) => axum::Json(report).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "repair loop stopped").into_response(),
    }
}

/// How long a relayed collection's answer is waited for past the quarantine it waits out: a
/// hung leader (or a request the HTTP client's pool lost) must not hold the caller for ever.
/// A collection that runs longer goes on at the leader.
const GC_RELAY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The query of `POST /shoal/v1/admin/gc`.
#[derive(Debug, serde::Deserialize)]
struct GcQuery {
    /// `forget`: collect although R or more of the last collection's origins left the member
    /// list (the operator says they are gone for good, and their repositories with them).
    departed: Option<String>,
}

/// Collect now. Only one origin collects (see `cluster::gc`): any other hands the request to
/// it and relays its answer, so the caller may ask any origin. The collection runs in a task
/// of its own: a caller that hangs up (a timed-out `curl`, a relaying origin giving up) no
/// longer stops it midway, with copies set aside until the next one.
async fn gc(State(s): State<AdminState>, Query(q): Query<GcQuery>) -> Response {
    let departures = match q.departed.as_deref() {
        None => Departures::Guard,
        Some("forget") => Departures::Forget,
        Some(other) => {
            return (StatusCode::BAD_REQUEST, format!("departed={other:?}: the only value is \"forget\""))
                .into_response()
        }
    };
    let (coordinator, settings) = (s.admin.coordinator.clone(), s.admin.gc);
    let run = tokio::spawn(async move {
        shoal_origin::cluster::gc::collect_with(&coordinator, settings, departures).await
    });
    let Ok(result) = run.await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "garbage collection stopped").into_response();
    };
    match result {
        Ok(report) => axum::Json(report).into_response(),
        Err(GcError::NotLeader { leader }) => forward_gc(&s.admin, &leader, departures).await,
        Err(e @ GcError::Running) => (StatusCode::CONFLICT, e.to_string()).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn forward_gc(admin: &Admin, leader: &str, departures: Departures) -> Response {
    let Some(url) = admin.membership.url(leader) else {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("gc leader {leader} is not a known member"))
            .into_response();
    };
    let timeout = admin.gc.quarantine.saturating_add(GC_RELAY_TIMEOUT);
    let mut request = admin.http.post(format!("{url}/shoal/v1/admin/gc")).timeout(timeout);
    if departures == Departures::Forget {
        request = request.query(&[("departed", "forget")]);
    }
    if let Some(secret) = &admin.secret {
        request = request.bearer_auth(secret);
    }
    let sent = request.send().await;
    let answer = match sent {
        Ok(resp) => {
            let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let content_type = resp.headers().get(reqwest::header::CONTENT_TYPE).cloned();
            resp.bytes().await.map(|body| (status, content_type, body))
        }
        Err(e) => Err(e),
    };
    match answer {
        Ok((status, content_type, body)) => {
            let mut response = (status, body).into_response();
            if let Some(ct) =
                content_type.and_then(|v| axum::http::HeaderValue::from_bytes(v.as_bytes()).ok())
            {
                response.headers_mut().insert(axum::http::header::CONTENT_TYPE, ct);
            }
            response
        }
        Err(e) => (StatusCode::BAD_GATEWAY, format!("gc leader {leader}: {e}")).into_response(),
    }
}

#[derive(serde::Serialize)]
struct MemberView {
    id: String,
    url: String,
    up: bool,
}

async fn members(State(s): State<AdminState>) -> Response {
    let members: Vec<MemberView> = s
        .admin
        .membership
        .members()
        .into_iter()
        .map(|m| MemberView { id: m.id, url: m.url, up: m.up })
        .collect();
    axum::Json(members).into_response()
}
