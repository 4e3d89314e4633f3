//! Shoal's agent: a read-only registry on every node. Blobs come from the local cache or from
//! a swarm of peers as verified pieces, streamed to the client while they arrive; the origin
//! is the fallback. The cache is only a cache: losing it loses nothing.

pub mod cache;
pub mod disk;
pub mod downloads;
pub mod manifest_cache;
pub mod mirror;
pub mod origin_client;
pub mod preheat;
pub mod seeding;
pub mod serving;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use shoal_p2p::announcer::Announcer;
use shoal_p2p::limiter::RateLimiter;
use shoal_p2p::node::NodeFlow;
use shoal_p2p::server::PeerServer;
use shoal_p2p::swarm::{SwarmConfig, SwarmDeps};
use shoal_p2p::tracker_client::{AnnounceRequest, TrackerClient};
use shoal_p2p::{PeerId, SwarmMetrics};
use shoal_registry::auth::remote::RemoteAuth;
use shoal_registry::Digest;

/// How often an agent fetches the origins' authorization policy and public keys (also at
/// most every few seconds when a token names a key it does not know).
pub const AUTH_REFRESH: Duration = Duration::from_secs(30);

use crate::cache::{BlobCache, CacheMetrics};
pub use crate::disk::{CacheLimits, Watermark};
use crate::downloads::Downloads;
use crate::origin_client::OriginClient;
use crate::seeding::Seeding;
use crate::serving::AgentPieces;
use crate::store::AgentStore;

/// Everything an agent needs to start; the binary fills it from flags and the config file.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Origin base URLs, all of one cluster: requests go to one, failing over to the next.
    pub origins: Vec<String>,
    pub trackers: Vec<String>,
    pub data_dir: PathBuf,
    /// Address other peers reach this agent's peer listener at.
    pub advertise: SocketAddr,
    pub cache: CacheLimits,
    /// How long a tag's resolution may be reused.
    pub tag_ttl: Duration,
    /// How long the origin's word that a blob or manifest is in a repository is reused.
    pub confirm_ttl: Duration,
    /// Timeout of each call to the origin or a tracker.
    pub http_timeout: Duration,
    /// Node-wide peer traffic limits in bytes per second (None: unlimited).
    pub egress_rate: Option<u64>,
    pub ingress_rate: Option<u64>,
    /// Keep announcing a blob as seeded this long after its last use.
    pub seed_window: Duration,
    pub announce_interval: Duration,
    pub max_connections_per_blob: usize,
    /// Peers served one blob at once (inbound); more are refused as busy.
    pub max_peers_per_blob: usize,
    /// Peers one piece is sent to at once (0: no limit).
    pub max_sends_per_piece: usize,
    pub fallback_after: Duration,
    pub max_peer_connections: usize,
    /// Outbound peer connections in all, across every download (the node's budget).
    pub max_outbound_connections: usize,
    /// Inbound peer connections from one IP address at once.
    pub max_peer_connections_per_address: usize,
}

/// Why an agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cache directory: {0}")]
    Cache(#[from] std::io::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("origin client: {0}")]
    Origin(#[from] crate::origin_client::OriginClientError),
}

/// A running agent's parts: the registry store (for the API router) and the peer server.
pub struct Agent {
    pub store: Arc<AgentStore>,
    /// The upstream registries the origins pull through (for [`mirror::map_names`]).
    pub registries: Arc<mirror::Registries>,
    /// Decides access from the origins' published policy and keys (registry API, preheat).
    pub auth: Arc<RemoteAuth>,
    pub peer_server: Arc<PeerServer>,
    pub peer_id: PeerId,
    downloads: Arc<Downloads>,
    seeding: Arc<Seeding>,
    tracker: Arc<TrackerClient>,
    advertise: std::net::SocketAddr,
}

impl Agent {
    /// Build the agent and start its background work (seeding announcements).
    pub fn start(config: &AgentConfig, registry: &prometheus::Registry) -> Result<Agent, AgentError> {
        let cache_metrics = CacheMetrics::new(registry)?;
        let cache = Arc::new(BlobCache::open(
            &config.data_dir.join("cache"),
            &config.data_dir.join("partial"),
            config.cache,
            cache_metrics,
        )?);
        tokio::spawn(cache.clone().maintain(cache::MAINTENANCE_INTERVAL));
        let origin = OriginClient::new(config.origins.clone(), config.http_timeout, registry)?;
        let tracker = Arc::new(TrackerClient::new(config.trackers.clone(), config.http_timeout)?);
        let metrics = SwarmMetrics::new("agent", registry)?;
        let peer_id = PeerId::random();
        let burst = 8 * 1024 * 1024;
        let deps = SwarmDeps {
            tracker: tracker.clone(),
            announcer: Announcer::spawn(tracker.clone()),
            ingress: Arc::new(RateLimiter::new(config.ingress_rate, burst)),
            metrics: metrics.clone(),
            node: NodeFlow::new(config.max_outbound_connections),
        };
        let mut swarm = SwarmConfig::new(peer_id, config.advertise);
        swarm.scheduler.max_connections = config.max_connections_per_blob;
        swarm.scheduler.fallback_after = config.fallback_after;
        let auth = {
            let origin = origin.clone();
            RemoteAuth::new(Arc::new(move || {
                let origin = origin.clone();
                Box::pin(async move { origin.auth_policy().await })
            }))
        };
        auth.spawn_refresh(AUTH_REFRESH);
        let downloads = Arc::new(Downloads::new(cache, origin.clone(), deps, swarm, auth.clone()));
        let seeding = Arc::new(Seeding::new(config.seed_window));
        seeding.resume(downloads.cache.take_used_before_start());
        downloads.set_seeding(seeding.clone());
        tokio::spawn(seeding.clone().announce_loop(
            tracker.clone(),
            downloads.cache.clone(),
            peer_id,
            config.advertise,
            config.announce_interval,
        ));
        let peer_server = Arc::new(PeerServer {
            peer_id,
            lookup: Arc::new(AgentPieces { downloads: downloads.clone(), seeding: seeding.clone() }),
            egress: Arc::new(RateLimiter::new(config.egress_rate, burst)),
            metrics,
            max_connections: config.max_peer_connections,
            max_connections_per_address: config.max_peer_connections_per_address,
            max_peers_per_blob: Some(config.max_peers_per_blob),
            // Agents send to every peer they serve at once, a piece to a few at a time: their
            // uplinks are shared by a dozen downloaders at most (`max_peers_per_blob`).
            upload_slots: None,
            piece_sends: (config.max_sends_per_piece > 0)
                .then(|| shoal_p2p::piece_sends::PieceSendGate::new(config.max_sends_per_piece)),
            super_seed: None,
            pace: false,
        });
        let registries = mirror::Registries::new(origin.clone());
        registries.spawn_refresh();
        let store = Arc::new(AgentStore::new(
            origin,
            downloads.clone(),
            config.tag_ttl,
            config.confirm_ttl,
            auth.clone(),
            registries.clone(),
        ));
        Ok(Agent {
            store,
            registries,
            auth,
            peer_server,
            peer_id,
            downloads,
            seeding,
            tracker,
            advertise: config.advertise,
        })
    }

    /// Leave cleanly (the process is stopping): persist every partial download's bitfield, so
    /// a restart resumes with every verified piece, and tell the trackers this peer is gone,
    /// so nobody is sent to a closed port. Bounded by `within`.
    pub async fn leave(&self, within: std::time::Duration) {
        let work = async {
            let running = self.downloads.all_running();
            for (digest, download) in &running {
                let pieces = download.pieces();
                match tokio::task::spawn_blocking(move || pieces.persist()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(%digest, error = %e, "could not persist a partial download"),
                    Err(e) => tracing::warn!(%digest, error = %e, "persisting a partial download panicked"),
                }
            }
            let mut digests: Vec<Digest> = running.into_iter().map(|(d, _)| d).collect();
            digests.extend(self.seeding.current());
            digests.sort();
            digests.dedup();
            let leaving: Vec<AnnounceRequest> = digests
                .iter()
                .map(|digest| AnnounceRequest {
                    digest: digest.clone(),
                    peer_id: self.peer_id.to_string(),
                    addr: self.advertise,
                    complete: false,
                    stopped: true,
                })
                .collect();
            let told = self.tracker.announce_many(&leaving).await.iter().filter(|r| r.is_ok()).count();
            tracing::info!(swarms = digests.len(), told, "left the swarms");
        };
        if tokio::time::timeout(within, work).await.is_err() {
            tracing::warn!(?within, "leaving the swarms took too long; stopping anyway");
        }
    }

    /// The agent's HTTP routes beyond the registry API (`/v1/preheat`).
    pub fn routes(&self) -> axum::Router {
        axum::Router::new()
            .route("/v1/preheat", axum::routing::post(preheat::preheat))
            .with_state(preheat::PreheatState::new(self.store.clone(), self.auth.clone()))
    }
}
