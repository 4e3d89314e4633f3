//! `shoal agent`: the read-only registry on every node, backed by the swarm.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytesize::ByteSize;
use serde::Deserialize;
use shoal_agent::{Agent, AgentConfig, CacheLimits, Watermark};

use crate::http::{with_basics, BoundServer, HttpMetrics};

/// Flags of `shoal agent`; each overrides the config file.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AgentArgs {
    /// Address of the read-only registry API, /healthz and /metrics [default: 127.0.0.1:5000]
    #[arg(long, env = "SHOAL_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address for peer connections [default: 127.0.0.1:7001]
    #[arg(long, env = "SHOAL_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// Peer address announced to others when --peer-listen is 0.0.0.0 or [::] (ip:port; an
    /// IPv6 address with or without brackets)
    #[arg(long, env = "SHOAL_PEER_ADVERTISE", value_parser = crate::peer_addr::parse_advertise)]
    pub peer_advertise: Option<SocketAddr>,
    /// Origin base URL(s), comma-separated, all of one origin cluster: requests go to one and
    /// fail over to the next on a connection error, timeout, 5xx or 429
    #[arg(long, env = "SHOAL_ORIGIN")]
    pub origin: Option<String>,
    /// Tracker base URL(s), comma-separated
    #[arg(long, env = "SHOAL_TRACKER", value_delimiter = ',')]
    pub tracker: Vec<String>,
    /// Directory for the blob cache and partial downloads [default: shoal-data/agent]
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML config file (see docs/configuration.md)
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

/// The `shoal agent` config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentFile {
    pub listen: SocketAddr,
    pub peer_listen: SocketAddr,
    pub peer_advertise: Option<SocketAddr>,
    /// Origin base URL(s), comma-separated.
    pub origin: Option<String>,
    pub trackers: Vec<String>,
    pub data_dir: PathBuf,
    /// Eviction starts above this much cached data (complete blobs and partial downloads), or
    /// above this share of the filesystem in use ("90%")...
    pub cache_high_watermark: Watermark,
    /// ...and stops at this much (of the same kind).
    pub cache_low_watermark: Watermark,
    /// A partial download idle for longer than this is removed.
    #[serde(with = "humantime_serde")]
    pub partial_max_age: Duration,
    /// How long a tag resolution is reused.
    #[serde(with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// How long the origin's word that a blob or a manifest (by digest) is in a repository is
    /// reused: a delete at the origin reaches the agent within it.
    #[serde(with = "humantime_serde")]
    pub confirm_ttl: Duration,
    /// Timeout of each call to the origin or a tracker.
    #[serde(with = "humantime_serde")]
    pub http_timeout: Duration,
    /// Node-wide peer upload limit per second (unset: unlimited).
    pub egress_rate: Option<ByteSize>,
    /// Node-wide peer download limit per second (unset: unlimited).
    pub ingress_rate: Option<ByteSize>,
    /// Keep seeding a blob this long after its last use.
    #[serde(with = "humantime_serde")]
    pub seed_window: Duration,
    #[serde(with = "humantime_serde")]
    pub announce_interval: Duration,
    /// Outbound peer connections per blob.
    pub max_connections_per_blob: usize,
    /// Peers this agent serves one blob to at once; more are refused (busy).
    pub max_peers_per_blob: usize,
    /// Peers one piece is sent to at once (0: no limit).
    pub max_sends_per_piece: usize,
    /// Inbound peer connections in all.
    pub max_peer_connections: usize,
    /// Outbound peer connections in all, across every download.
    pub max_outbound_connections: usize,
    /// No progress from peers for this long brings in the origin.
    #[serde(with = "humantime_serde")]
    pub fallback_after: Duration,
    pub limits: crate::config::Limits,
    /// Certificates: TLS on the listeners, node identity, peer mutual TLS.
    pub tls: shoal_tls::TlsSettings,
}

impl AgentFile {
    /// Refuse settings an agent cannot work with: a zero timeout failed every call at once,
    /// a zero count refused every connection or was quietly taken as one.
    fn check(&self) -> anyhow::Result<()> {
        use crate::config::{count, nonzero};
        nonzero("http_timeout", self.http_timeout)?;
        count("max_connections_per_blob", self.max_connections_per_blob)?;
        count("max_peers_per_blob", self.max_peers_per_blob)?;
        count("max_peer_connections", self.max_peer_connections)?;
        count("max_outbound_connections", self.max_outbound_connections)?;
        self.limits.check()
    }
}

impl Default for AgentFile {
    fn default() -> Self {
        AgentFile {
            listen: crate::config::default_listen(),
            peer_listen: SocketAddr::from(([127, 0, 0, 1], 7001)),
            peer_advertise: None,
            origin: None,
            trackers: Vec::new(),
            data_dir: PathBuf::from("shoal-data/agent"),
            cache_high_watermark: Watermark::Bytes(ByteSize::gib(20).as_u64()),
            cache_low_watermark: Watermark::Bytes(ByteSize::gib(16).as_u64()),
            partial_max_age: shoal_agent::disk::DEFAULT_PARTIAL_MAX_AGE,
            tag_ttl: Duration::from_secs(2),
            confirm_ttl: shoal_agent::store::DEFAULT_CONFIRM_TTL,
            http_timeout: Duration::from_secs(10),
            egress_rate: None,
            ingress_rate: None,
            seed_window: Duration::from_secs(600),
            announce_interval: Duration::from_secs(3),
            max_connections_per_blob: 10,
            max_peers_per_blob: shoal_p2p::server::DEFAULT_MAX_PEERS_PER_BLOB,
            max_sends_per_piece: shoal_p2p::piece_sends::DEFAULT_SENDS_PER_PIECE,
            max_peer_connections: 512,
            max_outbound_connections: shoal_p2p::node::DEFAULT_MAX_OUTBOUND_CONNECTIONS,
            fallback_after: Duration::from_secs(3),
            limits: crate::config::Limits::default(),
            tls: shoal_tls::TlsSettings::default(),
        }
    }
}

impl AgentArgs {
    /// The effective config: file, then flags and environment on top.
    pub fn resolve(&self) -> anyhow::Result<AgentFile> {
        let mut c: AgentFile = crate::config::load_toml(self.config.as_deref())?;
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.peer_listen {
            c.peer_listen = v;
        }
        if let Some(v) = self.peer_advertise {
            c.peer_advertise = Some(v);
        }
        if let Some(v) = &self.origin {
            c.origin = Some(v.clone());
        }
        if !self.tracker.is_empty() {
            c.trackers = self.tracker.clone();
        }
        if let Some(v) = &self.data_dir {
            c.data_dir = v.clone();
        }
        c.tls = c.tls.overridden_by(&self.tls.settings());
        crate::config::at_least(
            "announce_interval",
            c.announce_interval,
            crate::config::MIN_ANNOUNCE_INTERVAL,
        )?;
        c.check()?;
        Ok(c)
    }
}

/// Start the agent (cache, swarm, peer server) and bind its HTTP server.
pub async fn bind(file: AgentFile) -> anyhow::Result<BoundServer> {
    let origins = shoal_p2p::failover::split_urls(file.origin.as_deref().unwrap_or_default());
    anyhow::ensure!(!origins.is_empty(), "an agent needs --origin URL[,URL...]");
    anyhow::ensure!(!file.trackers.is_empty(), "an agent needs --tracker URL");
    file.limits.apply();
    let peer_listener = tokio::net::TcpListener::bind(file.peer_listen)
        .await
        .with_context(|| format!("binding peer listener {}", file.peer_listen))?;
    let advertise = crate::peer_addr::advertised(peer_listener.local_addr()?, file.peer_advertise)?;
    let metrics = HttpMetrics::new("agent")?;
    let config = AgentConfig {
        origins,
        trackers: file.trackers.clone(),
        data_dir: file.data_dir.clone(),
        advertise,
        cache: CacheLimits::new(file.cache_high_watermark, file.cache_low_watermark, file.partial_max_age)
            .context("cache_high_watermark / cache_low_watermark")?,
        tag_ttl: file.tag_ttl,
        confirm_ttl: file.confirm_ttl,
        http_timeout: file.http_timeout,
        egress_rate: file.egress_rate.map(|r| r.as_u64()),
        ingress_rate: file.ingress_rate.map(|r| r.as_u64()),
        seed_window: file.seed_window,
        announce_interval: file.announce_interval,
        max_connections_per_blob: file.max_connections_per_blob,
        max_peers_per_blob: file.max_peers_per_blob,
        max_sends_per_piece: file.max_sends_per_piece,
        fallback_after: file.fallback_after,
        max_peer_connections: file.max_peer_connections,
        max_outbound_connections: file.max_outbound_connections,
        max_peer_connections_per_address: file.limits.max_peer_connections_per_address,
    };
    let agent = tokio::task::block_in_place(|| Agent::start(&config, &metrics.registry))?;
    tokio::spawn(agent.peer_server.clone().serve(peer_listener));
    let api_config = shoal_registry::ApiConfig {
        read_only: true,
        max_concurrent_requests: file.limits.max_concurrent_requests,
        auth: shoal_registry::auth::AuthGate(agent.auth.clone()),
        ..shoal_registry::ApiConfig::default()
    };
    let mirror =
        shoal_agent::mirror::MirrorState { registries: agent.registries.clone(), auth: agent.auth.clone() };
    let api =
        shoal_registry::router(agent.store.clone() as Arc<dyn shoal_registry::RegistryStore>, api_config)
            .layer(axum::middleware::from_fn_with_state(mirror, shoal_agent::mirror::map_names))
            .merge(agent.routes());
    // Until an origin has answered with its access policy every registry request gets 503:
    // not ready, so a rollout with a broken origin URL or TLS setting stops at its first pods.
    let auth = agent.auth.clone();
    let readiness = crate::readiness::Readiness::new(vec![Box::new(move || {
        auth.enabled()
            .is_none()
            .then(|| "no origin has answered yet (its access policy is not known)".to_string())
    })]);
    let server = BoundServer::bind(
        file.listen,
        with_basics(api, metrics, readiness.clone()),
        file.limits.http(),
        readiness,
    )
    .await?;
    tracing::info!(
        listen = %server.local_addr()?, %advertise, peer_id = %agent.peer_id,
        origins = ?config.origins, trackers = ?config.trackers, "agent ready"
    );
    Ok(server.after_stop(async move { agent.leave(LEAVE_TIMEOUT).await }))
}

/// How long a stopping agent may spend persisting partial downloads and leaving its swarms.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_timeouts_and_counts_are_refused_by_name() {
        for (key, value) in
            [("http_timeout", "\"0s\""), ("max_peers_per_blob", "0"), ("max_outbound_connections", "0")]
        {
            let file: AgentFile = toml::from_str(&format!("{key} = {value}\n")).unwrap();
            assert_eq!(file.check().unwrap_err().to_string(), format!("{key} must be above zero"));
        }
        let file: AgentFile = toml::from_str("[limits]\nmax_connections = 0\n").unwrap();
        assert_eq!(file.check().unwrap_err().to_string(), "limits.max_connections must be above zero");
        assert!(AgentFile::default().check().is_ok());
    }

    /// A count past what a semaphore takes panicked (the peer server's task died, its port
    /// closed, while the agent still announced itself): refused at start by name.
    #[test]
    fn counts_past_any_machine_are_refused_by_name() {
        for key in ["max_peer_connections", "max_outbound_connections", "max_peers_per_blob"] {
            let file: AgentFile = toml::from_str(&format!("{key} = 9223372036854775807\n")).unwrap();
            assert_eq!(file.check().unwrap_err().to_string(), format!("{key} must be at most 1048576"));
        }
        let file: AgentFile =
            toml::from_str("[limits]\nmax_concurrent_requests = 2305843009213693952\n").unwrap();
        assert_eq!(
            file.check().unwrap_err().to_string(),
            "limits.max_concurrent_requests must be at most 1048576"
        );
        let file: AgentFile = toml::from_str("max_peer_connections = 1048576\n").unwrap();
        assert!(file.check().is_ok());
    }
}
