//! Origin configuration: a TOML file, overridden by `SHOAL_*` environment variables and flags.
//! Every field has a default with units; `docs/configuration.md` lists them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use bytesize::ByteSize;
use serde::Deserialize;
use shoal_registry::auth::AuthConfig;

/// How long garbage collection keeps unreferenced files aside by default.
const DEFAULT_GC_QUARANTINE: Duration = Duration::from_secs(60);
/// The `shoal origin` config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OriginConfig {
    /// HTTP address of the registry API, `/healthz` and `/metrics`.
    pub listen: SocketAddr,
    /// Peer-protocol address for seeding blobs into the swarm.
    pub peer_listen: Option<SocketAddr>,
    /// Peer address announced to others, when `peer_listen` is a wildcard address.
    pub peer_advertise: Option<SocketAddr>,
    /// Where blobs, upload sessions and metadata live.
    pub data_dir: PathBuf,
    /// An upload session idle this long is discarded with its data.
    #[serde(with = "humantime_serde")]
    pub upload_idle_timeout: Duration,
    /// Largest manifest accepted.
    pub max_manifest_size: ByteSize,
    /// Pieces the peer server sends at once over all connections; the others wait their
    /// turn (`shoal_p2p::server::DEFAULT_ORIGIN_UPLOAD_SLOTS`). 0: no limit.
    pub peer_upload_slots: usize,
    pub limits: Limits,
    pub auth: AuthConfig,
    pub cluster: ClusterSection,
    /// Certificates: TLS on the listeners, node identity, peer mutual TLS.
    pub tls: shoal_tls::TlsSettings,
    /// Upstream registries pulled through (`[[upstream]]`, one section each).
    pub upstream: Vec<shoal_upstream::UpstreamConfig>,
}

/// The `[cluster]` section: the other origins and how data is spread over them.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// Every origin's `host:port` (this one included), `dns+name:port` or
    /// `srv+_service._tcp.name`. Empty: a lone origin.
    pub members: Vec<String>,
    /// This origin's `host:port` as the others reach it; defaults to `internal_listen`, else
    /// `listen`.
    pub advertise: Option<String>,
    /// A second listener for what only the cluster's processes call: the internal and admin
    /// APIs (then not served on `listen`) and requests other origins forward. With node
    /// certificates it requires one at the handshake. Members are then listed (and
    /// advertised) by this address.
    pub internal_listen: Option<SocketAddr>,
    /// Copies of every blob and of every repository's metadata.
    pub replicas: usize,
    /// Copies that must be durable before a push is acknowledged; defaults to `replicas`.
    pub write_quorum: Option<usize>,
    /// Shared secret of the internal and admin APIs (or `SHOAL_CLUSTER_SECRET`): sent on
    /// calls to other origins, and accepted.
    pub secret: Option<String>,
    /// More secrets accepted from callers (not sent): to rotate the secret an origin at a
    /// time, add the new one here everywhere, then make it `secret`, then drop the old.
    pub accepted_secrets: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub health_timeout: Duration,
    /// Failed checks in a row before an origin counts as down.
    pub health_fails: u32,
    /// Passed checks in a row before it counts as up again.
    pub health_passes: u32,
    #[serde(with = "humantime_serde")]
    pub dns_refresh: Duration,
    /// Timeout of internal calls that move no bulk data.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// How often the repair queue is worked (a full pass every ten).
    #[serde(with = "humantime_serde")]
    pub repair_interval: Duration,
    /// Bytes per second repair may copy.
    pub repair_rate: ByteSize,
    /// Unreferenced blobs younger than this survive garbage collection.
    #[serde(with = "humantime_serde")]
    pub gc_grace: Duration,
    /// Run garbage collection this often; unset: only when asked (`POST /shoal/v1/admin/gc`).
    #[serde(default, with = "humantime_serde")]
    pub gc_interval: Option<Duration>,
    /// Unreferenced files are set aside this long before a last check deletes them (at least
    /// `shoal_origin::cluster::gc::MIN_QUARANTINE`).
    #[serde(with = "humantime_serde")]
    pub gc_quarantine: Duration,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            members: Vec::new(),
            advertise: None,
            internal_listen: None,
            replicas: 2,
            write_quorum: None,
            secret: None,
            accepted_secrets: Vec::new(),
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_secs(1),
            health_fails: 3,
            health_passes: 2,
            dns_refresh: Duration::from_secs(30),
            call_timeout: Duration::from_secs(5),
            repair_interval: Duration::from_secs(30),
            repair_rate: ByteSize::mib(200),
            gc_grace: Duration::from_secs(60 * 60),
            gc_interval: None,
            gc_quarantine: DEFAULT_GC_QUARANTINE,
        }
    }
}

/// The `[limits]` section: what one client may take (origins and agents).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Registry requests served at once; more get 429 `TOOMANYREQUESTS`.
    pub max_concurrent_requests: usize,
    /// Upload sessions open at once; more get 429 `TOOMANYREQUESTS`.
    pub max_upload_sessions: usize,
    /// HTTP connections open at once; at the cap, accepting waits for one to close.
    pub max_connections: usize,
    /// Time to send a whole request head (and the idle time of a keep-alive connection).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Window over which a request body must bring `body_min_rate` (and at least a byte).
    #[serde(with = "humantime_serde")]
    pub body_idle_timeout: Duration,
    /// Slowest accepted request body, bytes per second averaged over `body_idle_timeout`.
    pub body_min_rate: ByteSize,
    /// A response the client takes no byte of this long closes its connection.
    #[serde(with = "humantime_serde")]
    pub send_idle_timeout: Duration,
    /// Peer connections from one IP address at once; more are closed at once.
    pub max_peer_connections_per_address: usize,
    /// HTTP connections from one IP address at once (per listener); more are closed at once.
    pub max_connections_per_address: usize,
    /// Leading bits of an IPv6 address that name one host in the per-address limits (64: a
    /// host's /64; 128 where the cluster's nodes share one subnet).
    pub ipv6_host_prefix: u8,
    /// On SIGTERM, `/readyz` answers 503 this long before the listener closes.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// Then requests in flight get this long to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_concurrent_requests: 1024,
            max_upload_sessions: shoal_origin::DEFAULT_MAX_UPLOAD_SESSIONS,
            max_connections: crate::http_server::DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: crate::http_server::DEFAULT_HEADER_READ_TIMEOUT,
            body_idle_timeout: crate::http_server::DEFAULT_BODY_IDLE_TIMEOUT,
            body_min_rate: ByteSize::b(crate::http_server::DEFAULT_BODY_MIN_RATE),
            send_idle_timeout: crate::http_server::DEFAULT_SEND_IDLE_TIMEOUT,
            max_peer_connections_per_address: shoal_p2p::server::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            max_connections_per_address: crate::http_server::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            ipv6_host_prefix: shoal_p2p::inbound::DEFAULT_IPV6_HOST_PREFIX,
            drain_delay: crate::http_server::DEFAULT_DRAIN_DELAY,
            shutdown_timeout: crate::http_server::DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }
}

impl Limits {
    /// Refuse counts no server can work with. The timeouts may be zero: `0s` is "no limit"
    /// for the three idle timeouts (configuration.md), and no wait for the stop's two.
    pub fn check(&self) -> anyhow::Result<()> {
        count("limits.max_concurrent_requests", self.max_concurrent_requests)?;
        count("limits.max_upload_sessions", self.max_upload_sessions)?;
        count("limits.max_connections", self.max_connections)?;
        count("limits.max_connections_per_address", self.max_connections_per_address)?;
        count("limits.max_peer_connections_per_address", self.max_peer_connections_per_address)?;
        anyhow::ensure!(
            (1..=128).contains(&self.ipv6_host_prefix),
            "limits.ipv6_host_prefix must be from 1 to 128 (bits of an IPv6 address)"
        );
        Ok(())
    }

    /// Apply the process-wide part of these limits (how addresses group into hosts).
    pub fn apply(&self) {
        shoal_p2p::inbound::set_ipv6_host_prefix(self.ipv6_host_prefix);
    }

    /// The HTTP server's share of these limits.
    pub fn http(&self) -> crate::http_server::HttpLimits {
        crate::http_server::HttpLimits {
            max_connections: self.max_connections,
            max_connections_per_address: self.max_connections_per_address,
            header_read_timeout: self.header_read_timeout,
            body_idle_timeout: self.body_idle_timeout,
            body_min_rate: self.body_min_rate.as_u64(),
            send_idle_timeout: self.send_idle_timeout,
            drain_delay: self.drain_delay,
            shutdown_timeout: self.shutdown_timeout,
        }
    }
}

/// Default registry port, the one Docker users expect.
pub fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5000))
}

/// Default upload idle timeout: long enough for a slow CI uploader between chunks.
pub fn default_upload_idle_timeout() -> Duration {
    Duration::from_secs(60 * 60)
}

impl Default for OriginConfig {
    fn default() -> Self {
        OriginConfig {
            listen: default_listen(),
            peer_listen: None,
            peer_advertise: None,
            data_dir: PathBuf::from("shoal-data/origin"),
            upload_idle_timeout: default_upload_idle_timeout(),
            max_manifest_size: ByteSize::b(shoal_registry::manifest::DEFAULT_MAX_MANIFEST_SIZE),
            peer_upload_slots: shoal_p2p::server::DEFAULT_ORIGIN_UPLOAD_SLOTS,
            limits: Limits::default(),
            auth: AuthConfig::default(),
            tls: shoal_tls::TlsSettings::default(),
            cluster: ClusterSection::default(),
            upstream: Vec::new(),
        }
    }
}

/// Shortest announce period accepted (agents' re-announces, the tracker's interval): zero
/// made every agent re-announce all it seeds in a busy loop, a flood on the trackers, and the
/// tracker's expiry sweep a busy loop under its lock.
pub const MIN_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest accepted period of scheduled garbage collection: each run scans every repository
/// of the cluster, and zero ran them back to back.
pub const MIN_GC_INTERVAL: Duration = Duration::from_secs(60);

/// `value` of setting `name`, refused below `min`.
pub fn at_least(name: &str, value: Duration, min: Duration) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        value >= min,
        "{name} = {} is below its minimum of {}",
        humantime::format_duration(value),
        humantime::format_duration(min)
    );
    Ok(value)
}

/// Refuse a zero `value` of setting `name`: a zero timeout failed every call at once, a zero
/// count was quietly taken as one.
pub fn nonzero<T: PartialEq + Default>(name: &str, value: T) -> anyhow::Result<()> {
    anyhow::ensure!(value != T::default(), "{name} must be above zero");
    Ok(())
}

/// Largest count of connections, requests, sessions or slots a setting may name: far past
/// any machine's descriptors, and far below what tokio's semaphores take (they panicked at
/// start, or in the peer server's task, above `usize::MAX >> 3`).
pub const MAX_COUNT: usize = 1 << 20;

/// Refuse a count of setting `name` that is zero or above [`MAX_COUNT`].
pub fn count(name: &str, value: usize) -> anyhow::Result<()> {
    nonzero(name, value)?;
    at_most_count(name, value)
}

/// Refuse a count of setting `name` above [`MAX_COUNT`] (for counts where zero means "no limit").
pub fn at_most_count(name: &str, value: usize) -> anyhow::Result<()> {
    anyhow::ensure!(value <= MAX_COUNT, "{name} must be at most {MAX_COUNT}");
    Ok(())
}

/// A `--announce-interval` flag's value: a duration of at least [`MIN_ANNOUNCE_INTERVAL`].
pub fn parse_announce_interval(s: &str) -> Result<Duration, String> {
    let value = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    at_least("the announce interval", value, MIN_ANNOUNCE_INTERVAL).map_err(|e| e.to_string())
}

/// Read a component's TOML config file; no `path` gives the defaults.
pub fn load_toml<T: serde::de::DeserializeOwned + Default>(path: Option<&Path>) -> anyhow::Result<T> {
    let Some(path) = path else { return Ok(T::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
}

impl OriginConfig {
    /// Refuse the origin's own settings no server can work with (the cluster's are checked by
    /// [`OriginConfig::cluster`], the limits by [`Limits::check`]): a zero upload idle timeout
    /// dropped sessions between a client's requests, a zero manifest size refused every
    /// manifest, a zero repair rate crawled at a byte a second.
    pub fn check(&self) -> anyhow::Result<()> {
        nonzero("upload_idle_timeout", self.upload_idle_timeout)?;
        nonzero("max_manifest_size", self.max_manifest_size.as_u64())?;
        nonzero("cluster.repair_rate", self.cluster.repair_rate.as_u64())?;
        at_most_count("peer_upload_slots", self.peer_upload_slots)?;
        self.limits.check()
    }

    /// The cluster settings, checked: a cluster of more than one needs a secret, and this
    /// origin needs an address the others can reach.
    pub fn cluster(&self) -> anyhow::Result<shoal_origin::cluster::ClusterConfig> {
        let c = &self.cluster;
        let reached_at = c.internal_listen.unwrap_or(self.listen);
        let advertise = match &c.advertise {
            Some(a) => a.clone(),
            None if reached_at.ip().is_unspecified() && !c.members.is_empty() => {
                anyhow::bail!("cluster.advertise (--advertise) is required when listening on {reached_at}")
            }
            None => reached_at.to_string(),
        };
        let min_quarantine = shoal_origin::cluster::gc::MIN_QUARANTINE;
        if c.gc_quarantine < min_quarantine {
            anyhow::bail!(
                "cluster.gc_quarantine must be at least {} (twice the deadline of a write that read a link)",
                humantime::format_duration(min_quarantine)
            );
        }
        nonzero("cluster.replicas", c.replicas)?;
        nonzero("cluster.health_interval", c.health_interval)?;
        nonzero("cluster.health_timeout", c.health_timeout)?;
        nonzero("cluster.health_fails", c.health_fails)?;
        nonzero("cluster.health_passes", c.health_passes)?;
        nonzero("cluster.dns_refresh", c.dns_refresh)?;
        nonzero("cluster.call_timeout", c.call_timeout)?;
        nonzero("cluster.repair_interval", c.repair_interval)?;
        let members = if c.members.is_empty() { vec![advertise.clone()] } else { c.members.clone() };
        let lone = shoal_origin::cluster::lone(&members);
        let max_manifest = shoal_origin::cluster::wire::MAX_MANIFEST_SIZE;
        if !lone && self.max_manifest_size.as_u64() > max_manifest {
            anyhow::bail!(
                "max_manifest_size must be at most {} in a cluster (a manifest is copied between origins as a record of up to twice its size)",
                ByteSize::b(max_manifest)
            );
        }
        let secret = c.secret.clone().filter(|s| !s.is_empty());
        // Origins prove who they are to each other with a certificate or the secret.
        let node_identity = self.tls.serves_tls() && self.tls.cluster_ca.is_some();
        if !lone && secret.is_none() && !node_identity {
            anyhow::bail!(
                "a cluster of origins needs node certificates ([tls] cert, key and cluster_ca) or a \
                 shared secret (SHOAL_CLUSTER_SECRET or cluster.secret)"
            );
        }
        // A lone origin keeps one copy; asking for more could never succeed.
        let replicas = if lone { 1 } else { c.replicas };
        let write_quorum = if lone { 1 } else { c.write_quorum.unwrap_or(replicas) };
        if write_quorum == 0 || write_quorum > replicas {
            anyhow::bail!("cluster.write_quorum must be between 1 and replicas ({replicas})");
        }
        // Members named outright (no DNS source that may name more): a write quorum above
        // their number could never be met, and every push failed with 503.
        let named = members.iter().all(|m| !m.starts_with("dns+") && !m.starts_with("srv+"));
        let distinct: std::collections::BTreeSet<&String> = members.iter().chain([&advertise]).collect();
        if !lone && named && write_quorum > distinct.len() {
            anyhow::bail!(
                "cluster.write_quorum ({write_quorum}) is more than the {} origins cluster.members names: \
                 every write would fail (lower cluster.replicas, or cluster.write_quorum)",
                distinct.len()
            );
        }
        Ok(shoal_origin::cluster::ClusterConfig {
            advertise,
            members,
            replicas,
            write_quorum,
            secret,
            health_interval: c.health_interval,
            health_timeout: c.health_timeout,
            health_fails: c.health_fails,
            health_passes: c.health_passes,
            dns_refresh: c.dns_refresh,
            call_timeout: c.call_timeout,
            repair_interval: c.repair_interval,
            repair_rate: c.repair_rate.as_u64(),
            gc_grace: c.gc_grace,
            gc_quarantine: c.gc_quarantine,
        })
    }

    /// The cluster secrets this origin accepts: its own and those still accepted during a
    /// rotation, blanks left out.
    pub fn cluster_secrets(&self) -> Vec<String> {
        let c = &self.cluster;
        c.secret.iter().chain(&c.accepted_secrets).filter(|s| !s.is_empty()).cloned().collect()
    }

    /// Who may call this origin's internal API (other origins: their certificate or a
    /// secret) and its admin API (operators' certificates, origins relaying, or a secret).
    /// `None` when there is nothing to check them with (a lone origin without TLS): the
    /// APIs are then not served at all.
    pub fn guards(
        &self,
    ) -> Option<(shoal_origin::cluster::internal_api::Guard, shoal_origin::cluster::internal_api::Guard)>
    {
        use shoal_origin::cluster::internal_api::Guard;
        use shoal_registry::identity::Role;
        let secrets = self.cluster_secrets();
        let node_identity = self.tls.serves_tls() && self.tls.cluster_ca.is_some();
        let roles = |r: &[Role]| if node_identity { r.to_vec() } else { Vec::new() };
        let internal = Guard { secrets: secrets.clone(), roles: roles(&[Role::Origin]) };
        let admin = Guard { secrets, roles: roles(&[Role::Admin, Role::Origin]) };
        (!internal.is_open()).then_some((internal, admin))
    }

    /// The registry API settings derived from this config, deciding access with `auth`.
    pub fn api(&self, auth: shoal_registry::auth::AuthGate) -> shoal_registry::ApiConfig {
        shoal_registry::ApiConfig {
            read_only: false,
            max_manifest_size: self.max_manifest_size.as_u64(),
            max_concurrent_requests: self.limits.max_concurrent_requests,
            auth,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_below_their_minimum_are_refused_where_they_are_read() {
        assert!(parse_announce_interval("0s").unwrap_err().contains("below its minimum of 1s"));
        assert!(parse_announce_interval("300ms").is_err());
        assert_eq!(parse_announce_interval("3s"), Ok(Duration::from_secs(3)));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "announce_interval = \"0s\"\n").unwrap();
        let agent = crate::agent::AgentArgs { config: Some(file.clone()), ..Default::default() };
        let err = agent.resolve().unwrap_err().to_string();
        assert!(err.contains("announce_interval = 0s is below its minimum of 1s"), "{err}");
        std::fs::write(&file, "[cluster]\ngc_interval = \"0s\"\n").unwrap();
        let origin = crate::origin::OriginArgs { config: Some(file.clone()), ..Default::default() };
        let err = origin.resolve().unwrap_err().to_string();
        assert!(err.contains("cluster.gc_interval = 0s is below its minimum of 1m"), "{err}");
        std::fs::write(&file, "[cluster]\ngc_interval = \"24h\"\n").unwrap();
        assert!(origin.resolve().is_ok());
    }

    /// Zero where zero cannot work, and counts past any machine, are refused by name before
    /// the origin opens anything: a zero upload idle timeout dropped sessions between a
    /// client's requests, a zero repair rate copied a byte a second.
    #[test]
    fn an_origin_refuses_settings_it_cannot_work_with() {
        for (toml, err) in [
            ("upload_idle_timeout = \"0s\"", "upload_idle_timeout must be above zero"),
            ("max_manifest_size = \"0B\"", "max_manifest_size must be above zero"),
            ("[cluster]\nrepair_rate = \"0B\"", "cluster.repair_rate must be above zero"),
            ("peer_upload_slots = 9223372036854775807", "peer_upload_slots must be at most 1048576"),
            (
                "[limits]\nmax_connections = 9223372036854775807",
                "limits.max_connections must be at most 1048576",
            ),
        ] {
            let config: OriginConfig = toml::from_str(toml).unwrap();
            assert_eq!(config.check().unwrap_err().to_string(), err, "{toml}");
        }
        let unlimited: OriginConfig = toml::from_str("peer_upload_slots = 0").unwrap();
        assert!(unlimited.check().is_ok(), "0 peer upload slots is no limit");
        assert!(OriginConfig::default().check().is_ok());
    }

    /// A manifest limit whose records could not travel between origins is refused at start.
    #[test]
    fn a_manifest_limit_larger_than_records_carry_is_refused() {
        let cluster = "[cluster]\nsecret = \"s\"\nmembers = [\"a:1\", \"b:1\"]\nadvertise = \"a:1\"\n";
        let big: OriginConfig = toml::from_str(&format!("max_manifest_size = \"17MiB\"\n{cluster}")).unwrap();
        let err = big.cluster().unwrap_err().to_string();
        assert!(err.contains("max_manifest_size must be at most 16.0 MiB"), "{err}");
        let fits: OriginConfig =
            toml::from_str(&format!("max_manifest_size = \"16MiB\"\n{cluster}")).unwrap();
        assert!(fits.cluster().is_ok());
        // A lone origin copies no record anywhere.
        let lone: OriginConfig = toml::from_str("max_manifest_size = \"64MiB\"").unwrap();
        assert!(lone.cluster().is_ok());
        // One `dns+` member is a cluster (the name gives every origin's address).
        let named = "[cluster]\nsecret = \"s\"\nmembers = [\"dns+origins:1\"]\nadvertise = \"a:1\"\n";
        let big: OriginConfig = toml::from_str(&format!("max_manifest_size = \"17MiB\"\n{named}")).unwrap();
        let err = big.cluster().unwrap_err().to_string();
        assert!(err.contains("max_manifest_size must be at most 16.0 MiB"), "{err}");
        let unguarded: OriginConfig =
            toml::from_str("[cluster]\nmembers = [\"dns+origins:1\"]\nadvertise = \"a:1\"\n").unwrap();
        assert!(unguarded.cluster().unwrap_err().to_string().contains("needs node certificates"));
    }

    /// A write quorum more origins than the members named outright could never be met: refused
    /// at start (every push failed with 503, `/readyz` 200). A `dns+` member may name more.
    #[test]
    fn a_write_quorum_above_the_named_members_is_refused() {
        let two = "[cluster]\nsecret = \"s\"\nmembers = [\"a:1\", \"b:1\"]\nadvertise = \"a:1\"\n";
        let three: OriginConfig = toml::from_str(&format!("{two}replicas = 3\n")).unwrap();
        let err = three.cluster().unwrap_err().to_string();
        assert!(err.contains("more than the 2 origins"), "{err}");
        let quorum_two: OriginConfig =
            toml::from_str(&format!("{two}replicas = 3\nwrite_quorum = 2\n")).unwrap();
        assert!(quorum_two.cluster().is_ok());
        let named =
            "[cluster]\nsecret = \"s\"\nmembers = [\"dns+origins:1\"]\nadvertise = \"a:1\"\nreplicas = 3\n";
        assert!(toml::from_str::<OriginConfig>(named).unwrap().cluster().is_ok());
    }

    /// Zero timeouts and counts are refused with the setting's name, not taken as one or
    /// left to fail every call.
    #[test]
    fn zero_timeouts_and_counts_are_refused_by_name() {
        let cluster = "secret = \"s\"\nmembers = [\"a:1\", \"b:1\"]\nadvertise = \"a:1\"\n";
        for (key, value) in [
            ("replicas", "0"),
            ("health_timeout", "\"0s\""),
            ("call_timeout", "\"0s\""),
            ("health_fails", "0"),
            ("repair_interval", "\"0s\""),
        ] {
            let c: OriginConfig = toml::from_str(&format!("[cluster]\n{cluster}{key} = {value}\n")).unwrap();
            let err = c.cluster().unwrap_err().to_string();
            assert_eq!(err, format!("cluster.{key} must be above zero"));
        }
        for key in ["max_connections", "max_upload_sessions"] {
            let c: OriginConfig = toml::from_str(&format!("[limits]\n{key} = 0\n")).unwrap();
            let err = c.limits.check().unwrap_err().to_string();
            assert_eq!(err, format!("limits.{key} must be above zero"));
        }
        for prefix in [0, 129] {
            let c: OriginConfig =
                toml::from_str(&format!("[limits]\nipv6_host_prefix = {prefix}\n")).unwrap();
            let err = c.limits.check().unwrap_err().to_string();
            assert!(err.starts_with("limits.ipv6_host_prefix must be from 1 to 128"), "{err}");
        }
        let host: OriginConfig = toml::from_str("[limits]\nipv6_host_prefix = 128\n").unwrap();
        assert!(host.limits.check().is_ok());
        // The idle timeouts' `0s` is documented as no limit.
        let no_limit: OriginConfig =
            toml::from_str("[limits]\nheader_read_timeout = \"0s\"\nsend_idle_timeout = \"0s\"\n").unwrap();
        assert!(no_limit.limits.check().is_ok());
        let fine: OriginConfig = toml::from_str(&format!("[cluster]\n{cluster}")).unwrap();
        assert!(fine.cluster().is_ok() && fine.limits.check().is_ok());
    }

    #[test]
    fn parses_a_full_config() {
        let c: OriginConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:7000"
            data_dir = "/tmp/x"
            upload_idle_timeout = "2s"
            max_manifest_size = "1MiB"
            peer_upload_slots = 4
            [limits]
            max_concurrent_requests = 3
            header_read_timeout = "5s"
            body_idle_timeout = "10s"
            body_min_rate = "2KiB"
            send_idle_timeout = "45s"
            max_connections = 100
            max_peer_connections_per_address = 8
            [auth]
            anonymous = "pull"
            users = [{ name = "ci", password = "p", access = "push" }]
            "#,
        )
        .unwrap();
        assert_eq!(c.upload_idle_timeout, Duration::from_secs(2));
        assert_eq!(c.max_manifest_size.as_u64(), 1024 * 1024);
        assert_eq!(c.peer_upload_slots, 4);
        assert_eq!(c.limits.max_concurrent_requests, 3);
        let http = c.limits.http();
        assert_eq!(http.header_read_timeout, Duration::from_secs(5));
        assert_eq!(http.body_idle_timeout, Duration::from_secs(10));
        assert_eq!(http.body_min_rate, 2048);
        assert_eq!(http.send_idle_timeout, Duration::from_secs(45));
        assert_eq!(http.max_connections, 100);
        assert_eq!(c.limits.max_peer_connections_per_address, 8);
        assert_eq!(c.auth.users.len(), 1);
    }

    #[test]
    fn parses_token_auth_with_rules() {
        let c: OriginConfig = toml::from_str(
            r#"
            [auth]
            tokens = true
            realm = "https://registry.example.com/token"
            token_ttl = "2m"
            login_failures = 3
            users = [{ name = "alice", password_argon2 = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA", access = "none" }]
            [[auth.rules]]
            repositories = "team/*"
            pull = ["alice"]
            push = ["ci"]
            delete = ["ci"]
            [[auth.rules]]
            repositories = "*"
            anonymous_pull = true
            "#,
        )
        .unwrap();
        assert!(c.auth.tokens && c.auth.enabled());
        assert_eq!(c.auth.token_ttl, Duration::from_secs(120));
        assert_eq!(c.auth.rules.len(), 2);
        assert_eq!(c.auth.rules[0].pull, vec!["alice".to_string()]);
        assert!(c.auth.rules[1].anonymous_pull);
        assert!(!OriginConfig::default().auth.enabled());
        assert!(toml::from_str::<OriginConfig>("[[auth.rules]]\nrepositories = \"*\"\npul = []").is_err());
    }

    #[test]
    fn rejects_unknown_fields() {
        assert!(toml::from_str::<OriginConfig>("lisen = \"127.0.0.1:1\"").is_err());
    }
}
