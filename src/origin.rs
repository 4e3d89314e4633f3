//! `shoal origin`: the registry CI pushes to, over durable local storage.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use prometheus::IntGauge;
use shoal_origin::{OriginStore, StoreConfig};

use crate::config::OriginConfig;
use crate::http::{with_basics, HttpMetrics};

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
        let mut config = OriginConfig::load(self.config.as_deref())?;
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(peer) = self.peer_listen {
            config.peer_listen = Some(peer);
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        Ok(config)
    }
}

/// A bound, ready origin; `serve` runs it until shutdown.
pub struct Origin {
    listener: tokio::net::TcpListener,
    app: axum::Router,
}

impl Origin {
    pub async fn bind(config: OriginConfig) -> anyhow::Result<Origin> {
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
        let api = shoal_registry::router(std::sync::Arc::new(store), config.api());
        let app = with_basics(api, metrics);
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        if let Some(peer) = config.peer_listen {
            tracing::info!(%peer, "peer listener reserved for seeding (used once the swarm lands)");
        }
        tracing::info!(listen = %listener.local_addr()?, data_dir = %config.data_dir.display(), "origin ready");
        Ok(Origin { listener, app })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        axum::serve(self.listener, self.app).with_graceful_shutdown(shutdown).await?;
        Ok(())
    }
}
