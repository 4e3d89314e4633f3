//! The tracker's HTTP API: `POST /v1/announce`, `POST /v1/announces` (a node's announces in
//! one request, each taken as if alone) and `GET /v1/metainfo/<digest>`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use axum::extract::FromRequestParts;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use shoal_registry::identity::TransportIdentity;
use shoal_registry::Digest;

use crate::origins::{OriginError, Origins};
use crate::peers::{PeerStore, PeerStoreLimits, Refused};
use crate::proto::{
    valid_peer_id, AnnounceBatch, AnnounceBatchResponse, AnnounceRequest, AnnounceResponse, AnnounceResult,
    PeerInfo, MAX_ANNOUNCE_BATCH,
};

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
    /// Accept announces and metainfo requests only from clients whose TLS certificate the
    /// cluster CA signed for a node (set when the tracker's listener verifies them).
    pub require_node_identity: bool,
    /// Live announcements one announcer (node identity, or client address) may hold.
    pub max_entries_per_announcer: usize,
    /// Digests tracked at once ([`PeerStoreLimits::max_digests`]; tests lower it).
    pub max_digests: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            origins: Vec::new(),
            announce_interval: Duration::from_secs(3),
            handout_limit: 50,
            origin_timeout: Duration::from_secs(5),
            require_node_identity: false,
            max_entries_per_announcer: crate::peers::DEFAULT_MAX_ENTRIES_PER_ANNOUNCER,
            max_digests: PeerStoreLimits::default().max_digests,
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
    origins: Arc<Origins>,
    announces: IntCounterVec,
    batches: IntCounter,
    digests: IntGauge,
    peer_count: IntGauge,
    /// Each announcer's budget of seeder lookups the origins answer ([`crate::lookups`]).
    lookups: crate::lookups::LookupBudgets,
    /// When a full tracker may next ask the origins about a digest it does not know.
    next_full_lookup: Mutex<Instant>,
}

/// Least time between two origin lookups a full tracker makes for digests it does not know
/// (seeders not cached): announces that find it full are charged to no quota, so made-up
/// digests cost the origins at most this rate, while a new image's digests, announced by
/// every downloader, are looked up once and then served from the cache.
pub const FULL_LOOKUP_EVERY: Duration = Duration::from_millis(100);

/// Build the tracker's router, registering its metrics in `registry`.
pub fn router(config: TrackerConfig, registry: &Registry) -> Result<Router, BuildError> {
    let announces =
        IntCounterVec::new(Opts::new("shoal_tracker_announces_total", "Announces by outcome"), &["outcome"])?;
    let digests = IntGauge::new("shoal_tracker_swarms", "Digests with live announcements")?;
    let peer_count = IntGauge::new("shoal_tracker_peers", "Live announcements")?;
    registry.register(Box::new(announces.clone()))?;
    let batches = IntCounter::new(
        "shoal_tracker_announce_batches_total",
        "Batches of announces received (POST /v1/announces); each announce also counts in shoal_tracker_announces_total",
    )?;
    registry.register(Box::new(batches.clone()))?;
    registry.register(Box::new(digests.clone()))?;
    registry.register(Box::new(peer_count.clone()))?;
    let limits = PeerStoreLimits {
        ttl: config.announce_interval * 3,
        max_entries_per_announcer: config.max_entries_per_announcer,
        max_digests: config.max_digests,
        ..PeerStoreLimits::default()
    };
    let origins = Arc::new(Origins::new(config.origins.clone(), config.origin_timeout)?);
    let tracker = Arc::new(Tracker {
        config,
        peers: Mutex::new(PeerStore::new(limits)),
        origins,
        announces,
        batches,
        digests,
        peer_count,
        next_full_lookup: Mutex::new(Instant::now()),
        lookups: Default::default(),
    });
    tokio::spawn(expire_loop(Arc::downgrade(&tracker)));
    Ok(Router::new()
        .route("/v1/announce", post(announce))
        .route("/v1/announces", post(announce_batch))
        .route("/v1/metainfo/{digest}", get(metainfo))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_ANNOUNCE_BODY))
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

/// What the HTTP server knows of the client: the node identity its TLS certificate proved,
/// and its address.
struct Client {
    identity: Option<TransportIdentity>,
    remote: Option<SocketAddr>,
}

impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Client, Self::Rejection> {
        Ok(Client {
            identity: parts.extensions.get::<TransportIdentity>().cloned(),
            remote: parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0),
        })
    }
}

/// The answer to a client without the node identity this tracker requires.
fn not_a_node() -> Response {
    (StatusCode::FORBIDDEN, "this tracker serves only the cluster's nodes: present a node certificate")
        .into_response()
}

/// Who is calling, as its announce quota is charged: its node identity and its address, or
/// without an identity its address (IPv6: its /64, `host_key`). `None` when the tracker needs an identity and there is
/// none. The address counts with an identity too: a chart's agents share one certificate
/// (one identity), and charged by identity alone a fleet shared one node's quota.
fn caller(t: &Tracker, client: &Client) -> Option<String> {
    caller_key(client.identity.as_ref(), client.remote, t.config.require_node_identity)
}

fn caller_key(
    identity: Option<&TransportIdentity>,
    remote: Option<SocketAddr>,
    require: bool,
) -> Option<String> {
    let address =
        remote.map_or_else(|| "unknown".to_string(), |a| shoal_p2p::inbound::host_key(a.ip()).to_string());
    match identity {
        Some(id) if id.role.is_node() => Some(format!("{id}@{address}")),
        _ if require => None,
        _ => Some(address),
    }
}

/// The caller's quota key ([`caller`]), taken from the request's head: a caller the tracker
/// refuses is answered before its body is read (the body came first, so any client without a
/// certificate had the tracker hold its announce bodies).
struct Announcer(String);

impl FromRequestParts<Arc<Tracker>> for Announcer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, t: &Arc<Tracker>) -> Result<Announcer, Response> {
        let client = match Client::from_request_parts(parts, t).await {
            Ok(client) => client,
            Err(never) => match never {},
        };
        match caller(t, &client) {
            Some(key) => Ok(Announcer(key)),
            None => {
                t.announces.with_label_values(&["refused"]).inc();
                Err(not_a_node())
            }
        }
    }
}

/// The largest announce body taken: a full batch ([`MAX_ANNOUNCE_BATCH`] announces of about
/// 250 bytes) is about 64 KiB. Axum's default (2 MiB) let one host hold hundreds of MiB with
/// a few hundred slow bodies.
pub const MAX_ANNOUNCE_BODY: usize = 256 * 1024;

async fn announce(
    State(t): State<Arc<Tracker>>,
    Announcer(announcer): Announcer,
    body: axum::body::Bytes,
) -> Response {
    let Ok(req) = serde_json::from_slice::<AnnounceRequest>(&body) else {
        t.announces.with_label_values(&["invalid"]).inc();
        return bad_request("announce body must be JSON {digest, peer_id, addr, complete}");
    };
    let peers = match admit(&t, &announcer, &req) {
        Ok(Handout::Nothing) => Vec::new(),
        Ok(kind) => handout(&t, &announcer, &req, kind).await,
        Err((status, why)) => return (status, why).into_response(),
    };
    Json(AnnounceResponse { interval_secs: interval_secs(&t), peers }).into_response()
}

/// `POST /v1/announces`: each announce of the batch is taken as if sent alone, and answered
/// in order; one refused announce does not fail the others. A complete peer (a seeder) is
/// handed no peers: it does not download. The origins are asked for the downloads' seeders
/// at once, not one after another.
async fn announce_batch(
    State(t): State<Arc<Tracker>>,
    Announcer(announcer): Announcer,
    body: axum::body::Bytes,
) -> Response {
    let Ok(batch) = serde_json::from_slice::<AnnounceBatch>(&body) else {
        t.announces.with_label_values(&["invalid"]).inc();
        return bad_request("body must be JSON {announces: [{digest, peer_id, addr, complete}, ...]}");
    };
    if batch.announces.len() > MAX_ANNOUNCE_BATCH {
        t.announces.with_label_values(&["invalid"]).inc();
        return bad_request(&format!("at most {MAX_ANNOUNCE_BATCH} announces per batch"));
    }
    t.batches.inc();
    let admitted: Vec<Result<Handout, (StatusCode, String)>> =
        batch.announces.iter().map(|req| admit(&t, &announcer, req)).collect();
    let mut handouts = Vec::new();
    for (req, admitted) in batch.announces.iter().zip(&admitted) {
        match admitted {
            Ok(kind) if *kind != Handout::Nothing && !req.complete => {
                handouts.push(handout(&t, &announcer, req, *kind))
            }
            _ => {}
        }
    }
    let mut handouts = futures_util::future::join_all(handouts).await.into_iter();
    let results = batch
        .announces
        .iter()
        .zip(admitted)
        .map(|(req, admitted)| match admitted {
            Ok(kind) if kind != Handout::Nothing && !req.complete => {
                AnnounceResult { peers: handouts.next().unwrap_or_default(), error: None }
            }
            Ok(_) => AnnounceResult::default(),
            Err((status, why)) => {
                AnnounceResult { peers: Vec::new(), error: Some(format!("{status}: {why}")) }
            }
        })
        .collect();
    Json(AnnounceBatchResponse { interval_secs: interval_secs(&t), results }).into_response()
}

fn interval_secs(t: &Tracker) -> u64 {
    t.config.announce_interval.as_secs().max(1)
}

/// What an admitted announce is handed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handout {
    /// No peers (a peer leaving).
    Nothing,
    /// The origins' seeders (asked if not cached) and a share of the swarm.
    Peers,
    /// The tracker is full and the digest unknown to it: the origins' seeders if cached, else
    /// asked at most every [`FULL_LOOKUP_EVERY`] (announces of made-up digests, which no
    /// quota charges when nothing is listed, would each cost a call).
    Cached,
}

/// Take one announce from `announcer`: list (or forget, if it is leaving) the peer, and say
/// what it is handed. A full tracker (or a digest's swarm full of complete peers) still
/// hands out what it knows: a few announcers that filled it with made-up complete peers must
/// not leave every downloader of the cluster with no peer at all (each then fetched the whole
/// blob from the origins over HTTP). Such a downloader is not handed to others until there is
/// room.
fn admit(t: &Tracker, announcer: &str, req: &AnnounceRequest) -> Result<Handout, (StatusCode, String)> {
    if !valid_peer_id(&req.peer_id) {
        t.announces.with_label_values(&["invalid"]).inc();
        return Err((StatusCode::BAD_REQUEST, "peer_id must be 40 lowercase hex characters".into()));
    }
    if req.stopped {
        lock(&t.peers).remove_by(announcer, &req.digest, &req.peer_id, req.addr);
        t.announces.with_label_values(&["stopped"]).inc();
        return Ok(Handout::Nothing);
    }
    // Admission first: a refused announce never makes the tracker call an origin.
    let admitted = lock(&t.peers).announce_by(
        announcer,
        &req.digest,
        &req.peer_id,
        req.addr,
        req.complete,
        Instant::now(),
    );
    let outcome = match &admitted {
        Ok(()) => "ok",
        Err(Refused::StoreFull | Refused::SwarmFull) => "full",
        Err(Refused::AnnouncerFull) => "quota",
        Err(Refused::NotOwner) => "refused",
    };
    t.announces.with_label_values(&[outcome]).inc();
    match admitted {
        // Another announcer holds this peer id's entry (peer ids are in every handout, so a
        // hostile one can squat a victim's id on digests it has not announced yet): the
        // entry stays the holder's, but the downloader still gets its peers. Refused with
        // 403, it failed over to another tracker (splitting the swarm) or fetched the blob
        // over HTTP, for as long as the squatter refreshed.
        Ok(()) | Err(Refused::SwarmFull | Refused::NotOwner) => Ok(Handout::Peers),
        Err(Refused::StoreFull) => Ok(Handout::Cached),
        Err(why @ Refused::AnnouncerFull) => Err((StatusCode::TOO_MANY_REQUESTS, why.to_string())),
    }
}

/// Whether a full tracker may ask the origins about an unknown digest now (and if so, the
/// next may in [`FULL_LOOKUP_EVERY`]).
fn full_lookup_due(t: &Tracker) -> bool {
    let mut next = lock(&t.next_full_lookup);
    let now = Instant::now();
    if now < *next {
        return false;
    }
    *next = now + FULL_LOOKUP_EVERY;
    true
}

/// Peers for an admitted announce: the origins' seeders of the blob and a share of its swarm.
async fn handout(t: &Tracker, announcer: &str, req: &AnnounceRequest, kind: Handout) -> Vec<PeerInfo> {
    // A digest whose seeders are not cached, or cached past their time, costs the origins a
    // call: within the announcer's budget (`crate::lookups`), else handed out as a full
    // tracker hands out (the cached seeders, however old).
    let kind = match kind {
        Handout::Peers
            if !t.origins.seeders_answered(&req.digest) && !t.lookups.take(announcer, Instant::now()) =>
        {
            Handout::Cached
        }
        other => other,
    };
    let seeders = match kind {
        Handout::Cached => match t.origins.cached_seeders(&req.digest) {
            Some(cached) => cached,
            None if full_lookup_due(t) => t.origins.seeders(&req.digest).await,
            None => Vec::new(),
        },
        _ => t.origins.seeders(&req.digest).await,
    };
    lock(&t.peers).handout(
        &req.digest,
        &req.peer_id,
        &seeders,
        t.config.handout_limit,
        Instant::now(),
        &mut rand::rng(),
    )
}

async fn metainfo(State(t): State<Arc<Tracker>>, client: Client, Path(digest): Path<String>) -> Response {
    if caller(&t, &client).is_none() {
        return not_a_node();
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_registry::identity::Role;

    #[test]
    fn quotas_are_charged_per_node_and_address() {
        let agent = TransportIdentity { name: "agent".into(), role: Role::Agent };
        let at = |a: &str| Some(a.parse::<SocketAddr>().unwrap());
        let one = caller_key(Some(&agent), at("10.0.0.1:9000"), true).unwrap();
        let two = caller_key(Some(&agent), at("10.0.0.2:9000"), true).unwrap();
        assert_ne!(one, two, "agents sharing a certificate are charged apart");
        assert_eq!(one, caller_key(Some(&agent), at("10.0.0.1:9001"), true).unwrap());
        assert_eq!(caller_key(None, at("10.0.0.1:1"), true), None, "an identity is required");
        let ops = TransportIdentity { name: "ops".into(), role: Role::Admin };
        assert_eq!(caller_key(Some(&ops), at("10.0.0.1:1"), true), None, "not a node");
        // Without identities, by address; IPv6 by its /64.
        let v6 = |a: &str| caller_key(None, at(a), false).unwrap();
        assert_eq!(v6("[2001:db8:1:2::1]:1"), v6("[2001:db8:1:2:ffff::9]:2"));
        assert_ne!(v6("[2001:db8:1:2::1]:1"), v6("[2001:db8:1:3::1]:1"));
        assert_eq!(v6("[::ffff:10.0.0.1]:1"), "10.0.0.1");
    }
}
