//! `shoal up`: a whole local Shoal from one command, with embedded defaults and no external
//! services: one origin, one tracker and three agents on local ports, so pulls go through the
//! swarm for real.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::agent::{self, AgentFile};
use crate::config::OriginConfig;
use crate::origin;
use crate::tracker::{self, TrackerArgs};

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Where the local cluster keeps its data
    #[arg(long, env = "SHOAL_DATA_DIR", default_value = "shoal-data")]
    pub data_dir: PathBuf,
    /// Registry address of the origin; the tracker and agents take the next ports
    #[arg(long, env = "SHOAL_LISTEN", default_value = "127.0.0.1:5000")]
    pub listen: SocketAddr,
    /// Number of agents
    #[arg(long, default_value_t = 3)]
    pub agents: u16,
    /// TLS everywhere: a cluster CA and a certificate in DATA_DIR/pki (made once, kept),
    /// HTTPS listeners and mutual TLS between peers
    #[arg(long)]
    pub tls: bool,
    /// Pull through an upstream registry: REGISTRY=URL (e.g.
    /// docker.io=https://registry-1.docker.io), repeatable
    #[arg(long, value_delimiter = ',')]
    pub upstream: Vec<String>,
}

/// Validity of the certificate `shoal up --tls` issues, in days (it is re-issued at every
/// start, and once a third of it is left: [`spawn_renewal`]).
const UP_CERT_DAYS: u32 = 30;

/// Make (or reuse) the local CA in `dir`, issue this run's certificate for `listen`'s
/// address and localhost, and install TLS with them. One process runs every role, so it
/// has one identity: an origin's, which every role accepts from a node.
fn install_tls(dir: &std::path::Path, listen: SocketAddr) -> anyhow::Result<()> {
    let (cert, key) = issue_up_cert(dir, listen)?;
    let settings = shoal_tls::TlsSettings {
        cert: Some(cert),
        key: Some(key),
        cluster_ca: Some(dir.join("ca.pem")),
        ..Default::default()
    };
    crate::tls::install(&settings)?;
    spawn_renewal(dir.to_path_buf(), listen);
    Ok(())
}

/// Make (or reuse) the local CA in `dir` and issue the certificate of this run.
fn issue_up_cert(dir: &std::path::Path, listen: SocketAddr) -> anyhow::Result<(PathBuf, PathBuf)> {
    let ca = if dir.join("ca.pem").exists() {
        crate::certs::read_ca(dir)?
    } else {
        crate::certs::write_ca(dir, "Shoal local CA (shoal up)", 3650)?
    };
    let mut ips = vec![std::net::IpAddr::from([127, 0, 0, 1])];
    if !listen.ip().is_unspecified() && !ips.contains(&listen.ip()) {
        ips.push(listen.ip());
    }
    let role = shoal_registry::identity::Role::Origin;
    crate::certs::write_issued(&ca, dir, "shoal-up", role, &["localhost".into()], &ips, UP_CERT_DAYS)
}

/// How often a `shoal up --tls` left running checks its certificate.
const UP_RENEW_CHECK: std::time::Duration = std::time::Duration::from_secs(3600);

/// Issue the certificate again once a third of its validity is left (the TLS context
/// reloads the files): a `shoal up` left running past 30 days kept serving an expired one,
/// and every handshake between its processes failed.
fn spawn_renewal(dir: PathBuf, listen: SocketAddr) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UP_RENEW_CHECK).await;
            let Some(expires) = shoal_tls::current().certificate_expires() else { continue };
            let left = expires.duration_since(std::time::SystemTime::now()).unwrap_or_default();
            if left > std::time::Duration::from_secs(u64::from(UP_CERT_DAYS) * 86_400 / 3) {
                continue;
            }
            let (dir, listen) = (dir.clone(), listen);
            match tokio::task::spawn_blocking(move || issue_up_cert(&dir, listen)).await {
                Ok(Ok(_)) => tracing::info!("shoal up: certificate issued again before it expires"),
                Ok(Err(e)) => tracing::warn!(error = %e, "shoal up: could not issue the certificate again"),
                Err(e) => tracing::warn!(error = %e, "shoal up: could not issue the certificate again"),
            }
        }
    });
}

/// Agents `shoal up` runs at most: the tracker takes the origin's port + 100, and agent i
/// the ports + i and + 200 + i.
const MAX_UP_AGENTS: u16 = 99;

/// `base`'s port + `offset`; the caller has checked it fits ([`check_ports`]).
fn port(base: SocketAddr, offset: u16) -> SocketAddr {
    SocketAddr::new(base.ip(), base.port().saturating_add(offset))
}

/// Where the processes of `shoal up` reach each other (and clients on this machine reach
/// them): `listen` itself, or loopback for a wildcard (`--listen 0.0.0.0:5000` binds every
/// address; the peers and URLs name 127.0.0.1).
fn reachable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], listen.port())),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), listen.port())
        }
        _ => listen,
    }
}

/// Whether every port `shoal up` takes above `base` exists and no two collide.
fn check_ports(base: SocketAddr, agents: u16) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_UP_AGENTS).contains(&agents),
        "--agents {agents}: between 1 and {MAX_UP_AGENTS} (each takes the ports after the origin's)"
    );
    anyhow::ensure!(
        base.port() != 0,
        "--listen needs a fixed port: the tracker's, the agents' and the peer ports are counted from it"
    );
    let top = 200 + agents;
    anyhow::ensure!(
        base.port().checked_add(top).is_some(),
        "--listen port {} leaves no room for the {top} ports after it that the tracker and agents take",
        base.port()
    );
    Ok(())
}

pub async fn run(
    args: UpArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let bind = args.listen;
    check_ports(bind, args.agents)?;
    let base = reachable(bind);
    let pki = args.data_dir.join("pki");
    if args.tls {
        install_tls(&pki, base)?;
    }
    let scheme = if args.tls { "https" } else { "http" };
    let origin_url = format!("{scheme}://{base}");
    let tracker_addr = port(base, 100);
    let origin = origin::bind(OriginConfig {
        listen: bind,
        peer_listen: Some(port(bind, 200)),
        peer_advertise: Some(port(base, 200)),
        data_dir: args.data_dir.join("origin"),
        upstream: args.upstream.iter().map(|f| origin::upstream_flag(f)).collect::<anyhow::Result<_>>()?,
        ..OriginConfig::default()
    })
    .await?;
    let tracker = tracker::bind(TrackerArgs {
        listen: port(bind, 100),
        origin: vec![origin_url.clone()],
        announce_interval: std::time::Duration::from_secs(3),
        handout_limit: 50,
        ipv6_host_prefix: shoal_p2p::inbound::DEFAULT_IPV6_HOST_PREFIX,
        max_connections: tracker::DEFAULT_TRACKER_MAX_CONNECTIONS,
        tls: Default::default(),
    })
    .await?;
    let mut agents = Vec::new();
    for i in 1..=args.agents {
        let file = AgentFile {
            listen: port(bind, i),
            peer_listen: port(bind, 200 + i),
            peer_advertise: Some(port(base, 200 + i)),
            origin: Some(origin_url.clone()),
            trackers: vec![format!("{scheme}://{tracker_addr}")],
            data_dir: args.data_dir.join(format!("agent{i}")),
            ..AgentFile::default()
        };
        agents.push((port(base, i), agent::bind(file).await?));
    }
    let first_agent = port(base, 1);
    println!("Shoal is up (data in {}).", args.data_dir.display());
    println!("  origin   {scheme}://{base}/v2/   push here (docker push, skopeo, buildx)");
    println!("  tracker  {scheme}://{tracker_addr}/");
    for (addr, _) in &agents {
        println!("  agent    {scheme}://{addr}/v2/   pull here (read-only, fed by the swarm)");
    }
    if args.tls {
        let ca = pki.join("ca.pem");
        println!("TLS everywhere; clients trust the CA {}:", ca.display());
        println!("  curl --cacert {} {scheme}://{base}/v2/", ca.display());
        println!("  skopeo: --dest-cert-dir / --src-cert-dir DIR with the CA as DIR/ca.crt");
        println!("  docker: /etc/docker/certs.d/{base}/ca.crt");
    }
    println!("Every server has /healthz and /metrics.\n");
    println!("Try it:");
    println!("  docker tag busybox {base}/demo/busybox:1 && docker push {base}/demo/busybox:1");
    println!("  docker pull {first_agent}/demo/busybox:1");
    let trust = if args.tls { format!(" --tls-ca {}", pki.join("ca.pem").display()) } else { String::new() };
    println!("  shoal preheat{trust} {scheme}://{first_agent} demo/busybox:1");
    println!("Press Ctrl-C to stop.");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(origin.serve(stopped(stop_rx.clone())));
    tasks.spawn(tracker.serve(stopped(stop_rx.clone())));
    for (_, agent) in agents {
        tasks.spawn(agent.serve(stopped(stop_rx.clone())));
    }
    tokio::select! {
        _ = shutdown => {}
        Some(result) = tasks.join_next() => {
            // A component stopped on its own: that is an error worth surfacing.
            let _ = stop_tx.send(true);
            result??;
            anyhow::bail!("a component stopped unexpectedly");
        }
    }
    let _ = stop_tx.send(true);
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_past_the_last_or_into_each_other_are_refused() {
        let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        assert!(check_ports(at(5000), 3).is_ok());
        assert!(check_ports(at(65_332), 3).is_ok(), "the third agent's peer port is 65,535");
        assert!(check_ports(at(65_333), 3).unwrap_err().to_string().contains("leaves no room"));
        assert!(check_ports(at(5000), 100).is_err(), "agent 100 would take the tracker's port");
        assert!(check_ports(at(5000), 0).is_err());
        assert!(check_ports(at(0), 3).unwrap_err().to_string().contains("needs a fixed port"));
    }

    #[test]
    fn a_wildcard_listen_is_reached_on_loopback() {
        let reach = |s: &str| reachable(s.parse().unwrap()).to_string();
        assert_eq!(reach("0.0.0.0:5000"), "127.0.0.1:5000");
        assert_eq!(reach("[::]:5000"), "[::1]:5000");
        assert_eq!(reach("10.1.2.3:5000"), "10.1.2.3:5000");
    }
}
