//! The origin's admin API under `/shoal/v1/admin`: run a repair pass or a garbage collection
//! now, and see the cluster's members. It moves or deletes data, so it requires the cluster
//! secret like the internal API.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use shoal_origin::cluster::coordinator::Coordinator;
use shoal_origin::cluster::membership::Membership;
use shoal_origin::cluster::repair::RepairHandle;
use tokio::sync::Mutex;

/// What the admin routes act on.
#[derive(Clone)]
pub struct Admin {
    pub coordinator: Arc<Coordinator>,
    pub membership: Arc<Membership>,
    pub repair: RepairHandle,
    pub secret: String,
    pub gc_grace: Duration,
}

#[derive(Clone)]
struct AdminState {
    admin: Admin,
    /// One collection at a time per origin.
    gc_running: Arc<Mutex<()>>,
}

/// The admin routes, behind the cluster secret.
pub fn routes(admin: Admin) -> axum::Router {
    let secret = admin.secret.clone();
    let router = axum::Router::new()
        .route("/shoal/v1/admin/repair", post(repair))
        .route("/shoal/v1/admin/gc", post(gc))
        .route("/shoal/v1/admin/members", get(members))
        .with_state(AdminState { admin, gc_running: Arc::new(Mutex::new(())) });
    shoal_origin::cluster::internal_api::guard(router, Some(secret))
}

async fn repair(State(s): State<AdminState>) -> Response {
    match s.admin.repair.run_now().await {
        Some(report) => axum::Json(report).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "repair loop stopped").into_response(),
    }
}

async fn gc(State(s): State<AdminState>) -> Response {
    let Ok(_running) = s.gc_running.try_lock() else {
        return (StatusCode::CONFLICT, "a garbage collection is already running").into_response();
    };
    match shoal_origin::cluster::gc::collect(&s.admin.coordinator, s.admin.gc_grace).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
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
