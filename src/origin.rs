//! `shoal origin`: the registry CI pushes to, over durable local storage.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::IntGauge;
use shoal_origin::cluster::store::ClusterStore;
use shoal_origin::{OriginStore, StoreConfig};
use shoal_p2p::server::PeerServer;
use shoal_p2p::tracker_client::{Locations, Seeder};
use shoal_p2p::{PeerId, SwarmMetrics};
use shoal_registry::Digest;

use crate::config::OriginConfig;
use crate::http::{with_basics, BoundServer, HttpMetrics};

/// How often the storage gauges are refreshed.
const GAUGE_PERIOD: Duration = Duration::from_secs(2);

/// Flags of `shoal origin`; each overrides the same field of the config file.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OriginArgs {
    /// Address for the registry API, /healthz and /metrics [default: 127.0.0.1:5000]
    #[arg(long, env = "SHOAL_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    /// Address for peer connections (seeding into the swarm)
    #[arg(long, env = "SHOAL_PEER_LISTEN")]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// Peer address announced to others when --peer-listen is 0.0.0.0 or [::]
    #[arg(long, env = "SHOAL_PEER_ADVERTISE")]
    pub peer_advertise: Option<std::net::SocketAddr>,
    /// Directory for blobs, uploads and metadata [default: shoal-data/origin]
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML config file (see docs/configuration.md)
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
}

impl OriginArgs {
    /// The effective config: file, then flags and environment on top.
    pub fn resolve(&self) -> anyhow::Result<OriginConfig> {
        let mut config: OriginConfig = crate::config::load_toml(self.config.as_deref())?;
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(peer) = self.peer_listen {
            config.peer_listen = Some(peer);
        }
        if let Some(peer) = self.peer_advertise {
            config.peer_advertise = Some(peer);
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        Ok(config)
    }
}

/// Open the origin's storage, start seeding, and bind its HTTP server.
pub async fn bind(config: OriginConfig) -> anyhow::Result<BoundServer> {
    let store = OriginStore::open(StoreConfig {
        data_dir: config.data_dir.clone(),
        upload_idle_timeout: config.upload_idle_timeout,
    })
    .await
    .with_context(|| format!("opening data directory {}", config.data_dir.display()))?;
    let metrics = HttpMetrics::new("origin")?;
    let stored = IntGauge::new("shoal_origin_storage_bytes", "Bytes of blob content stored")?;
    metrics.registry.register(Box::new(stored.clone()))?;
    tokio::spawn({
        let store = store.clone();
        async move {
            loop {
                stored.set(i64::try_from(store.stored_bytes()).unwrap_or(i64::MAX));
                tokio::time::sleep(GAUGE_PERIOD).await;
            }
        }
    });
    let seeder = match config.peer_listen {
        Some(addr) => Some(start_seeding(&store, addr, config.peer_advertise, &metrics).await?),
        None => None,
    };
    let registry = ClusterStore::single(store.clone(), &config.listen.to_string())?;
    let api = shoal_registry::router(Arc::new(registry), config.api()).merge(seeding_routes(store, seeder));
    let server = BoundServer::bind(config.listen, with_basics(api, metrics)).await?;
    tracing::info!(listen = %server.local_addr()?, data_dir = %config.data_dir.display(), "origin ready");
    Ok(server)
}

/// The origin's identity in the swarm.
#[derive(Clone, Copy)]
struct SeederIdentity {
    peer_id: PeerId,
    advertise: SocketAddr,
}

/// Bind the peer listener and serve every blob this origin holds to the swarm.
async fn start_seeding(
    store: &OriginStore,
    listen: SocketAddr,
    advertise: Option<SocketAddr>,
    metrics: &HttpMetrics,
) -> anyhow::Result<SeederIdentity> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding peer listener {listen}"))?;
    let bound = listener.local_addr()?;
    let advertise = crate::peer_addr::advertised(bound, advertise)?;
    let peer_id = PeerId::random();
    let server = Arc::new(PeerServer {
        peer_id,
        lookup: Arc::new(store.clone()),
        egress: Arc::new(shoal_p2p::limiter::RateLimiter::unlimited()),
        metrics: SwarmMetrics::new("origin", &metrics.registry)?,
        max_connections: 1024,
        // Send each piece to one agent and let the swarm spread it.
        super_seed: Some(shoal_p2p::server::SuperSeed::new(Duration::from_secs(3))),
    });
    tokio::spawn(server.serve(listener));
    tracing::info!(peer_listen = %bound, %advertise, %peer_id, "seeding blobs to the swarm");
    Ok(SeederIdentity { peer_id, advertise })
}

#[derive(Clone)]
struct SeedingState {
    store: OriginStore,
    seeder: Option<SeederIdentity>,
}

/// `/shoal/v1/blobs/<digest>/{metainfo,locations}`: what trackers and agents ask an origin.
fn seeding_routes(store: OriginStore, seeder: Option<SeederIdentity>) -> axum::Router {
    axum::Router::new()
        .route("/shoal/v1/blobs/{digest}/metainfo", get(metainfo))
        .route("/shoal/v1/blobs/{digest}/locations", get(locations))
        .with_state(SeedingState { store, seeder })
}

async fn metainfo(State(s): State<SeedingState>, Path(digest): Path<String>) -> Response {
    let Ok(digest) = digest.parse::<Digest>() else {
        return (StatusCode::BAD_REQUEST, "invalid digest").into_response();
    };
    match s.store.metainfo(&digest).await {
        Ok(Some(m)) => axum::Json(&*m).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "blob unknown").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn locations(State(s): State<SeedingState>, Path(digest): Path<String>) -> Response {
    let Ok(digest) = digest.parse::<Digest>() else {
        return (StatusCode::BAD_REQUEST, "invalid digest").into_response();
    };
    let mut found = Locations::default();
    if let (Some(seeder), Ok(true)) = (s.seeder, s.store.has_blob(&digest).await) {
        found.seeders.push(Seeder { peer_id: seeder.peer_id.to_string(), addr: seeder.advertise });
    }
    axum::Json(found).into_response()
}
