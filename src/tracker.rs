//! `shoal tracker`: peer lists per blob digest for the agents' swarms.

use std::net::SocketAddr;
use std::time::Duration;

use shoal_tracker::TrackerConfig;

use crate::http::{with_basics, BoundServer, HttpMetrics};

/// Default connections a tracker keeps open at once. Every agent of a fleet keeps one
/// (pooled, used every few seconds: never idle long enough to be closed), so this is the
/// largest fleet a tracker serves; at the listeners' default of 4,096 a larger fleet's
/// agents waited in the backlog, timed out, and pulled from the origins over HTTP.
pub const DEFAULT_TRACKER_MAX_CONNECTIONS: usize = 65_536;

/// The most peers one announce may be handed: 0 handed out none (every download fell to the
/// origins' HTTP without a word), and tens of thousands made each answer megabytes of JSON
/// sampled under the peer store's lock.
const MAX_HANDOUT_LIMIT: u64 = 1000;

/// Flags of `shoal tracker`.
#[derive(clap::Args, Debug, Clone)]
pub struct TrackerArgs {
    /// Address for the announce API, /healthz and /metrics
    #[arg(long, env = "SHOAL_LISTEN", default_value = "127.0.0.1:7000")]
    pub listen: SocketAddr,
    /// Origin base URL(s), comma-separated (list every origin of the cluster): asked for metainfo
    /// and seeders, failing over to the next on a connection error, timeout, 5xx or 429
    #[arg(long, env = "SHOAL_ORIGIN", value_delimiter = ',', required = true)]
    pub origin: Vec<String>,
    /// How often agents re-announce
    #[arg(long, env = "SHOAL_ANNOUNCE_INTERVAL", default_value = "3s", value_parser = crate::config::parse_announce_interval)]
    pub announce_interval: Duration,
    /// Peers handed out per announce
    #[arg(long, env = "SHOAL_HANDOUT_LIMIT", default_value_t = 50,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_HANDOUT_LIMIT))]
    pub handout_limit: usize,
    /// Leading bits of an IPv6 address that name one announcer for the announce quota (64: a
    /// host's /64; 128 where the cluster's nodes share one subnet)
    #[arg(long, env = "SHOAL_IPV6_HOST_PREFIX", default_value_t = shoal_p2p::inbound::DEFAULT_IPV6_HOST_PREFIX,
          value_parser = clap::value_parser!(u8).range(1..=128))]
    pub ipv6_host_prefix: u8,
    /// Connections open at once (one per agent of the fleet, and the origins'); at the cap,
    /// new ones wait for one to close. Needs as many open files (`ulimit -n`)
    #[arg(long, env = "SHOAL_MAX_CONNECTIONS", default_value_t = DEFAULT_TRACKER_MAX_CONNECTIONS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_048_576))]
    pub max_connections: usize,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

/// Bind the tracker's HTTP server.
pub async fn bind(args: TrackerArgs) -> anyhow::Result<BoundServer> {
    let metrics = HttpMetrics::new("tracker")?;
    shoal_p2p::inbound::set_ipv6_host_prefix(args.ipv6_host_prefix);
    let config = TrackerConfig {
        origins: args.origin.clone(),
        announce_interval: args.announce_interval,
        handout_limit: args.handout_limit,
        // With a cluster CA on its listener, the tracker serves the cluster's nodes only.
        require_node_identity: shoal_tls::current().verifies_nodes(),
        ..TrackerConfig::default()
    };
    let api = shoal_tracker::router(config, &metrics.registry)?;
    // No config file: the default limits but the connection cap.
    let limits =
        crate::http_server::HttpLimits { max_connections: args.max_connections, ..Default::default() };
    let readiness = crate::readiness::Readiness::new(vec![]);
    let server =
        BoundServer::bind(args.listen, with_basics(api, metrics, readiness.clone()), limits, readiness)
            .await?;
    tracing::info!(listen = %server.local_addr()?, origins = ?args.origin, "tracker ready");
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrackerArgs,
    }

    /// A handout of no peers (every download on the origins' HTTP, silently) or of whole
    /// swarms is refused at start.
    #[test]
    fn the_handout_limit_is_checked() {
        let parse =
            |limit: &str| Cli::try_parse_from(["tracker", "--origin", "http://o", "--handout-limit", limit]);
        assert!(parse("0").is_err());
        assert!(parse("1001").is_err());
        assert_eq!(parse("50").map(|c| c.args.handout_limit).ok(), Some(50));
    }
}
