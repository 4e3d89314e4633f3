//! The tracker's HTTP API: `POST /v1/announce` and `GET /v1/metainfo/<digest>`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use shoal_registry::Digest;

use crate::origins::{OriginError, Origins};
use crate::peers::{PeerStore, PeerStoreLimits};
use crate::proto::{valid_peer_id, AnnounceRequest, AnnounceResponse};

/// Tracker settings.
#[derive(Clone, Debug)]
pub struct TrackerConfig {
    /// Origin base URLs (every origin of the cluster may be listed), asked for metainfo and
    /// seeders one at a time, failing over to the next.
    pub origins: Vec<String>,
    /// How often agents should announce.
    pub announce_interval: Duration,
    /// Peers handed out per announce.
    pub handout_limit: usize,
    /// Timeout of every call to an origin.
    pub origin_timeout: Duration,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            origins: Vec::new(),
            announce_interval: Duration::from_secs(3),
            handout_limit: 50,
            origin_timeout: Duration::from_secs(5),
        }
    }
}

/// Building the router fails only on metric registration or HTTP client setup.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("origins: {0}")]
    Origins(#[from] crate::origins::OriginsBuildError),
}

struct Tracker {
    config: TrackerConfig,
    peers: Mutex<PeerStore>,
    origins: Origins,
    announces: IntCounterVec,
    digests: IntGauge,
    peer_count: IntGauge,
}

/// Build the tracker's router, registering its metrics in `registry`.
pub fn router(config: TrackerConfig, registry: &Registry) -> Result<Router, BuildError> {
    let announces =
        IntCounterVec::new(Opts::new("shoal_tracker_announces_total", "Announces by outcome"), &["outcome"])?;
    let digests = IntGauge::new("shoal_tracker_swarms", "Digests with live announcements")?;
    let peer_count = IntGauge::new("shoal_tracker_peers", "Live announcements")?;
    registry.register(Box::new(announces.clone()))?;
    registry.register(Box::new(digests.clone()))?;
    registry.register(Box::new(peer_count.clone()))?;
    let limits = PeerStoreLimits { ttl: config.announce_interval * 3, ..PeerStoreLimits::default() };
    let origins = Origins::new(config.origins.clone(), config.origin_timeout)?;
    let tracker = Arc::new(Tracker {
        config,
        peers: Mutex::new(PeerStore::new(limits)),
        origins,
        announces,
        digests,
        peer_count,
    });
    tokio::spawn(expire_loop(Arc::downgrade(&tracker)));
    Ok(Router::new()
        .route("/v1/announce", post(announce))
        .route("/v1/metainfo/{digest}", get(metainfo))
        .with_state(tracker))
}

async fn expire_loop(tracker: std::sync::Weak<Tracker>) {
    loop {
        let Some(t) = tracker.upgrade() else { return };
        let period = t.config.announce_interval;
        {
            let mut peers = lock(&t.peers);
            peers.expire(Instant::now());
            t.digests.set(peers.digests() as i64);
            t.peer_count.set(peers.peers() as i64);
        }
        drop(t);
        tokio::time::sleep(period).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn bad_request(msg: &str) -> Response {
    (StatusCode::BAD_REQUEST, msg.to_string()).into_response()
}

async fn announce(State(t): State<Arc<Tracker>>, body: axum::body::Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<AnnounceRequest>(&body) else {
        t.announces.with_label_values(&["invalid"]).inc();
        return bad_request("announce body must be JSON {digest, peer_id, addr, complete}");
    };
    if !valid_peer_id(&req.peer_id) {
        t.announces.with_label_values(&["invalid"]).inc();
        return bad_request("peer_id must be 40 lowercase hex characters");
    }
    let now = Instant::now();
    if req.stopped {
        lock(&t.peers).remove(&req.digest, &req.peer_id);
        t.announces.with_label_values(&["stopped"]).inc();
        return Json(AnnounceResponse {
            interval_secs: t.config.announce_interval.as_secs(),
            peers: Vec::new(),
        })
        .into_response();
    }
    let seeders = t.origins.seeders(&req.digest).await;
    let peers = {
        let mut store = lock(&t.peers);
        if !store.announce(&req.digest, &req.peer_id, req.addr, req.complete, now) {
            t.announces.with_label_values(&["full"]).inc();
            return (StatusCode::SERVICE_UNAVAILABLE, "tracker is full").into_response();
        }
        store.handout(&req.digest, &req.peer_id, &seeders, t.config.handout_limit, now, &mut rand::rng())
    };
    t.announces.with_label_values(&["ok"]).inc();
    Json(AnnounceResponse { interval_secs: t.config.announce_interval.as_secs().max(1), peers })
        .into_response()
}

async fn metainfo(State(t): State<Arc<Tracker>>, Path(digest): Path<String>) -> Response {
    let Ok(digest) = digest.parse::<Digest>() else {
        return bad_request("invalid digest");
    };
    match t.origins.metainfo(&digest).await {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(OriginError::Unknown(_)) => {
            (StatusCode::NOT_FOUND, "blob unknown to the origins").into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}
