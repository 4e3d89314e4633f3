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
}

fn port(base: SocketAddr, offset: u16) -> SocketAddr {
    SocketAddr::new(base.ip(), base.port() + offset)
}

pub async fn run(
    args: UpArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let base = args.listen;
    let origin_url = format!("http://{base}");
    let tracker_addr = port(base, 100);
    let origin = origin::bind(OriginConfig {
        listen: base,
        peer_listen: Some(port(base, 200)),
        data_dir: args.data_dir.join("origin"),
        ..OriginConfig::default()
    })
    .await?;
    let tracker = tracker::bind(TrackerArgs {
        listen: tracker_addr,
        origin: vec![origin_url.clone()],
        announce_interval: std::time::Duration::from_secs(3),
        handout_limit: 50,
        tls: Default::default(),
    })
    .await?;
    let mut agents = Vec::new();
    for i in 1..=args.agents {
        let file = AgentFile {
            listen: port(base, i),
            peer_listen: port(base, 200 + i),
            origin: Some(origin_url.clone()),
            trackers: vec![format!("http://{tracker_addr}")],
            data_dir: args.data_dir.join(format!("agent{i}")),
            ..AgentFile::default()
        };
        agents.push((file.listen, agent::bind(file).await?));
    }
    let first_agent = port(base, 1);
    println!("Shoal is up (data in {}).", args.data_dir.display());
    println!("  origin   http://{base}/v2/   push here (docker push, skopeo, buildx)");
    println!("  tracker  http://{tracker_addr}/");
    for (addr, _) in &agents {
        println!("  agent    http://{addr}/v2/   pull here (read-only, fed by the swarm)");
    }
    println!("Every server has /healthz and /metrics.\n");
    println!("Try it:");
    println!("  docker tag busybox {base}/demo/busybox:1 && docker push {base}/demo/busybox:1");
    println!("  docker pull {first_agent}/demo/busybox:1");
    println!("  shoal preheat http://{first_agent} demo/busybox:1");
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
