//! `shoal node`: prepares a Kubernetes node for the Shoal agent and undoes it.
//!
//! containerd only sends pulls to a mirror when it finds a `hosts.toml` for the registry under its
//! `config_path`, a directory on the node. The Helm chart cannot write there itself, so its pods
//! run this command: an init container of the agent DaemonSet runs `setup` (write the mirror
//! config, back up what the user had, create the agent's cache directory); after `helm
//! uninstall`, a hook DaemonSet runs `restore` on every node (put back the user's files, remove
//! ours) and a hook Job runs `wait` until that DaemonSet is ready everywhere, so the uninstall
//! ends only once no node still points at an agent that is gone.
//!
//! The decisions (what to do with one registry directory, when `wait` may stop) are pure
//! functions with tests beside them; the file system is touched in blocking functions run on
//! tokio's blocking pool.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::atomic_file;

mod hosts;
use hosts::*;

/// containerd's usual `config_path`.
const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";
/// Docker Hub's registry API: what containerd itself uses for `docker.io`.
const DOCKER_HUB_SERVER: &str = "https://registry-1.docker.io";
/// How long containerd waits to connect to the mirror before falling back to the registry.
const DEFAULT_DIAL_TIMEOUT_MS: u64 = 200;
/// How long `wait` waits for every node in all.
const DEFAULT_WAIT_TIMEOUT_SECS: u64 = 600;
/// How long `wait` wants every address ready, with no address coming or going, before it stops.
const DEFAULT_SETTLE_SECS: u64 = 10;
/// Time between two rounds of `wait`.
const WAIT_POLL_INTERVAL_SECS: u64 = 1;
/// Timeout of one `/readyz` probe (and of one name resolution).
const PROBE_TIMEOUT_SECS: u64 = 2;

#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    #[command(subcommand)]
    pub command: NodeCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum NodeCommand {
    /// Point containerd at the node's agent (backing up the user's hosts.toml files) and create
    /// the agent's data directory
    Setup(SetupArgs),
    /// Put back the hosts.toml files `setup` replaced and remove the ones it wrote
    Restore(RestoreArgs),
    /// Wait until every address behind a headless Service answers GET /readyz with 200
    Wait(WaitArgs),
}

#[derive(clap::Args, Debug)]
pub struct SetupArgs {
    /// containerd's registry config_path: one directory per registry host
    #[arg(long, env = "SHOAL_NODE_HOSTS_DIR", default_value = DEFAULT_HOSTS_DIR)]
    pub hosts_dir: PathBuf,
    /// Registry hosts as clients pull by them (docker.io, ghcr.io, host:port), comma-separated;
    /// =SERVER_URL sets the upstream containerd falls back to (https://registry-1.docker.io for
    /// docker.io, else https://NAME)
    #[arg(
        long,
        env = "SHOAL_NODE_REGISTRY",
        value_delimiter = ',',
        requires = "mirror",
        value_name = "NAME[=SERVER_URL]",
        value_parser = parse_registry
    )]
    pub registry: Vec<Registry>,
    /// The node's agent, e.g. http://127.0.0.1:5000 (needed with --registry)
    #[arg(long, env = "SHOAL_NODE_MIRROR", value_name = "URL", value_parser = parse_url)]
    pub mirror: Option<String>,
    /// containerd's connect timeout to the mirror (dial_timeout), so a dead agent costs little
    #[arg(
        long,
        env = "SHOAL_NODE_DIAL_TIMEOUT",
        default_value_t = Duration::from_millis(DEFAULT_DIAL_TIMEOUT_MS).into()
    )]
    pub dial_timeout: humantime::Duration,
    /// Create the agent's data directory here
    #[arg(long, env = "SHOAL_NODE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Owner of --data-dir, as numeric UID:GID, for an agent that does not run as root
    #[arg(long, env = "SHOAL_NODE_OWNER", requires = "data_dir", value_name = "UID:GID", value_parser = parse_owner)]
    pub owner: Option<(u32, u32)>,
    /// The CA (PEM) of an https mirror: copied into --data-dir as mirror-ca.pem, which each
    /// hosts.toml names as the mirror's `ca`
    #[arg(long, env = "SHOAL_NODE_MIRROR_CA", requires = "data_dir", value_name = "FILE")]
    pub mirror_ca: Option<PathBuf>,
    /// Where --data-dir is on the node, as containerd sees it, when this process sees it
    /// elsewhere (a container's mount) [default: --data-dir]
    #[arg(long, env = "SHOAL_NODE_HOST_DATA_DIR", requires = "mirror_ca", value_name = "DIR")]
    pub host_data_dir: Option<PathBuf>,
}

/// Name of the mirror's CA in the agent's data directory.
const MIRROR_CA_FILE: &str = "mirror-ca.pem";

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// containerd's registry config_path: one directory per registry host
    #[arg(long, env = "SHOAL_NODE_HOSTS_DIR", default_value = DEFAULT_HOSTS_DIR)]
    pub hosts_dir: PathBuf,
    /// After restoring, answer GET /readyz and /healthz with 200 on this address until stopped
    #[arg(long, env = "SHOAL_NODE_SERVE", value_name = "ADDR")]
    pub serve: Option<SocketAddr>,
}

#[derive(clap::Args, Debug)]
pub struct WaitArgs {
    /// HOST:PORT of a headless Service: one address per pod
    #[arg(long, env = "SHOAL_NODE_ENDPOINT", value_name = "HOST:PORT")]
    pub endpoint: String,
    /// Give up after this long
    #[arg(
        long,
        env = "SHOAL_NODE_TIMEOUT",
        default_value_t = Duration::from_secs(DEFAULT_WAIT_TIMEOUT_SECS).into()
    )]
    pub timeout: humantime::Duration,
    /// Every address must stay ready, with none coming or going, this long
    #[arg(
        long,
        env = "SHOAL_NODE_SETTLE",
        default_value_t = Duration::from_secs(DEFAULT_SETTLE_SECS).into()
    )]
    pub settle: humantime::Duration,
}

/// One `--registry` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registry {
    /// The host clients pull by; the name of its directory under the hosts dir.
    pub name: String,
    /// The upstream containerd falls back to.
    pub server: String,
}

fn parse_registry(value: &str) -> Result<Registry, String> {
    let (name, server) = match value.split_once('=') {
        Some((name, server)) => (name.trim(), Some(server.trim())),
        None => (value.trim(), None),
    };
    check_registry_name(name)?;
    let server = match server {
        Some(url) => parse_url(url)?,
        None if name == "docker.io" => DOCKER_HUB_SERVER.to_string(),
        None => parse_url(&format!("https://{name}"))?,
    };
    Ok(Registry { name: name.to_string(), server })
}

/// The name becomes a directory under the hosts dir, so it must stay one plain path component.
fn check_registry_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty registry name".into());
    }
    if name == "." || name.contains("..") {
        return Err(format!("registry name {name:?} must not contain \"..\" or be \".\""));
    }
    if name.contains('/') || name.contains('\\') {
        return Err(format!("registry name {name:?} must be a host, without '/'"));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("registry name {name:?} must not contain whitespace"));
    }
    // containerd's `_default` directory holds the configuration of every registry without
    // one of its own: a mirror written there would take them all.
    if name.starts_with('_') {
        return Err(format!("registry name {name:?} must not start with '_' (containerd's _default)"));
    }
    Ok(())
}

/// An http(s) URL that can be written inside a TOML basic string as it is.
fn parse_url(value: &str) -> Result<String, String> {
    let value = value.trim().trim_end_matches('/');
    let url = reqwest::Url::parse(value).map_err(|e| format!("{value:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("{value:?} must be an http:// or https:// URL"));
    }
    if value.chars().any(|c| c == '"' || c == '\\' || c.is_whitespace() || c.is_control()) {
        return Err(format!("{value:?} must not contain quotes, backslashes or whitespace"));
    }
    Ok(value.to_string())
}

fn parse_owner(value: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{value:?} is not a numeric UID:GID");
    let (uid, gid) = value.split_once(':').ok_or_else(bad)?;
    Ok((uid.parse().map_err(|_| bad())?, gid.parse().map_err(|_| bad())?))
}

/// Go's `time.ParseDuration` (containerd) reads whole milliseconds; humantime's spaced output it
/// would not.
fn go_duration(d: Duration) -> anyhow::Result<String> {
    anyhow::ensure!(d >= Duration::from_millis(1), "--dial-timeout must be at least 1ms");
    Ok(format!("{}ms", d.as_millis()))
}

/// Everything `setup` needs, checked.
struct SetupPlan {
    hosts_dir: PathBuf,
    registries: Vec<Registry>,
    mirror: String,
    dial_timeout: String,
    data_dir: Option<PathBuf>,
    owner: Option<(u32, u32)>,
    /// The mirror's CA to copy into the data directory, and where containerd finds the copy.
    mirror_ca: Option<(PathBuf, PathBuf)>,
}

impl SetupPlan {
    fn new(args: SetupArgs) -> anyhow::Result<SetupPlan> {
        let mut seen = BTreeSet::new();
        for r in &args.registry {
            anyhow::ensure!(seen.insert(r.name.as_str()), "--registry {} is given twice", r.name);
        }
        anyhow::ensure!(
            !args.registry.is_empty() || args.data_dir.is_some(),
            "nothing to set up: give --registry NAME (with --mirror URL) and/or --data-dir DIR"
        );
        let mirror_ca = match (&args.mirror_ca, &args.data_dir) {
            (Some(ca), Some(data_dir)) => {
                let seen_by_containerd = args.host_data_dir.as_ref().unwrap_or(data_dir).join(MIRROR_CA_FILE);
                anyhow::ensure!(seen_by_containerd.is_absolute(), "--host-data-dir must be an absolute path");
                // Written into hosts.toml as a TOML string: nothing that would end or escape it.
                let text = seen_by_containerd.to_str().unwrap_or("\"");
                anyhow::ensure!(
                    !text.chars().any(|c| c == '"' || c == '\\' || c.is_control()),
                    "the mirror CA's path {} has a quote, backslash or control character; hosts.toml could not name it",
                    seen_by_containerd.display()
                );
                Some((ca.clone(), seen_by_containerd))
            }
            _ => None,
        };
        Ok(SetupPlan {
            mirror_ca,
            dial_timeout: go_duration(*args.dial_timeout)?,
            hosts_dir: args.hosts_dir,
            registries: args.registry,
            mirror: args.mirror.unwrap_or_default(),
            data_dir: args.data_dir,
            owner: args.owner,
        })
    }
}

/// Copy the CA certificate at `source` into `data_dir` as [`MIRROR_CA_FILE`]; where it went.
fn write_mirror_ca(source: &Path, data_dir: &Path) -> anyhow::Result<PathBuf> {
    let pem = std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
    anyhow::ensure!(
        String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----"),
        "{} holds no PEM certificate",
        source.display()
    );
    let target = data_dir.join(MIRROR_CA_FILE);
    atomic_file::write(&target, &pem, None)?;
    Ok(target)
}

/// Do `setup`; returns one line per thing done.
fn setup_blocking(plan: &SetupPlan) -> anyhow::Result<Vec<String>> {
    let mut report = Vec::new();
    if let Some(data_dir) = &plan.data_dir {
        // Who owned it before this setup (the mirror CA's write below takes it for a moment).
        let before = std::fs::symlink_metadata(data_dir).ok().map(|m| {
            use std::os::unix::fs::MetadataExt as _;
            (m.uid(), m.gid())
        });
        std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        if let Some((source, _)) = &plan.mirror_ca {
            // Written while this process owns the directory: the chart's init container is
            // root with CAP_CHOWN alone (no CAP_DAC_OVERRIDE), so in a directory already
            // handed to the agent's user (a pod's restart) it could not create a file.
            if plan.owner.is_some() {
                let me = (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw());
                std::os::unix::fs::chown(data_dir, Some(me.0), Some(me.1))
                    .with_context(|| format!("chown {}:{} {}", me.0, me.1, data_dir.display()))?;
            }
            let target = write_mirror_ca(source, data_dir)?;
            report.push(format!("mirror CA: {}", target.display()));
        }
        match plan.owner {
            Some((uid, gid)) if before.is_some_and(|b| b != (uid, gid)) => {
                // The agent's user changed (agent.runAsUser): what the old one made, its cache
                // and partial downloads, goes to the new one too, or every pull of a blob not
                // cached fails on a directory it cannot write.
                let changed = chown_tree(data_dir, uid, gid)?;
                report.insert(
                    0,
                    format!(
                        "data dir {}: ready, owned by {uid}:{gid} ({changed} entries handed over)",
                        data_dir.display()
                    ),
                );
            }
            Some((uid, gid)) => {
                std::os::unix::fs::chown(data_dir, Some(uid), Some(gid))
                    .with_context(|| format!("chown {uid}:{gid} {}", data_dir.display()))?;
                report.insert(0, format!("data dir {}: ready, owned by {uid}:{gid}", data_dir.display()));
            }
            None => report.insert(0, format!("data dir {}: ready", data_dir.display())),
        }
    }
    hosts::write_registries(plan, &mut report)?;
    Ok(report)
}

/// Give `dir` and everything under it to `uid:gid`, links themselves and not what they point
/// at, `dir` itself last: a handover cut short (the init container killed) leaves `dir` the
/// old user's, so the next setup sees the change and starts it again. Returns how many
/// entries were handed over.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> anyhow::Result<usize> {
    let mut order = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).with_context(|| format!("reading {}", path.display()))? {
                pending.push(entry.with_context(|| format!("reading {}", path.display()))?.path());
            }
        }
        order.push(path);
    }
    // Every directory was listed before its entries: in reverse, `dir` goes last.
    for path in order.iter().rev() {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {uid}:{gid} {}", path.display()))?;
    }
    Ok(order.len())
}

/// Whether `wait` may stop: every address ready, and the same addresses, for `settle`.
#[derive(Debug)]
struct SettleTracker {
    settle: Duration,
    addrs: BTreeSet<SocketAddr>,
    /// Since when the current set of addresses has been all ready.
    ready_since: Option<Instant>,
}

impl SettleTracker {
    fn new(settle: Duration) -> SettleTracker {
        SettleTracker { settle, addrs: BTreeSet::new(), ready_since: None }
    }

    /// Record one round of probes (address → answered 200); true when waiting is over.
    fn observe(&mut self, now: Instant, round: &BTreeMap<SocketAddr, bool>) -> bool {
        let addrs: BTreeSet<SocketAddr> = round.keys().copied().collect();
        let all_ready = !round.is_empty() && round.values().all(|ready| *ready);
        if addrs != self.addrs || !all_ready {
            self.ready_since = None;
        }
        self.addrs = addrs;
        if all_ready && self.ready_since.is_none() {
            self.ready_since = Some(now);
        }
        self.ready_since.is_some_and(|since| now.duration_since(since) >= self.settle)
    }
}

/// Timing of `wait`, apart so tests can poll faster.
struct WaitTiming {
    timeout: Duration,
    settle: Duration,
    poll_interval: Duration,
    probe_timeout: Duration,
}

/// One round: resolve the endpoint, probe each address.
async fn probe_round(
    client: &reqwest::Client,
    endpoint: &str,
    probe_timeout: Duration,
) -> anyhow::Result<BTreeMap<SocketAddr, bool>> {
    let addrs: BTreeSet<SocketAddr> = tokio::time::timeout(probe_timeout, tokio::net::lookup_host(endpoint))
        .await
        .map_err(|_| anyhow::anyhow!("resolving {endpoint} timed out"))?
        .with_context(|| format!("resolving {endpoint}"))?
        .collect();
    let probes = addrs.iter().map(|addr| async move {
        let ready = match client.get(format!("http://{addr}/readyz")).send().await {
            Ok(response) => response.status() == reqwest::StatusCode::OK,
            Err(_) => false,
        };
        (*addr, ready)
    });
    Ok(futures_util::future::join_all(probes).await.into_iter().collect())
}

async fn wait_for(endpoint: &str, timing: WaitTiming) -> anyhow::Result<()> {
    // Pod addresses are reached directly, never through a proxy from the environment.
    let client = shoal_tls::http_client()
        .no_proxy()
        .connect_timeout(timing.probe_timeout)
        .timeout(timing.probe_timeout)
        .build()?;
    let started = Instant::now();
    let mut tracker = SettleTracker::new(timing.settle);
    let mut shown: Option<(usize, usize)> = None;
    loop {
        let problem = match probe_round(&client, endpoint, timing.probe_timeout).await {
            Ok(round) => {
                let ready = round.values().filter(|r| **r).count();
                if shown != Some((ready, round.len())) {
                    println!("{endpoint}: {ready}/{} ready", round.len());
                    shown = Some((ready, round.len()));
                }
                if tracker.observe(Instant::now(), &round) {
                    println!(
                        "{endpoint}: all {} ready and unchanged for {}",
                        round.len(),
                        humantime::format_duration(timing.settle)
                    );
                    return Ok(());
                }
                let not_ready: Vec<String> =
                    round.iter().filter(|(_, r)| !**r).map(|(a, _)| a.to_string()).collect();
                if round.is_empty() {
                    format!("{endpoint} resolved to no addresses")
                } else if not_ready.is_empty() {
                    format!("all {} addresses ready, but not yet for the settle time", round.len())
                } else {
                    format!("not ready: {}", not_ready.join(", "))
                }
            }
            Err(e) => {
                tracker.observe(Instant::now(), &BTreeMap::new());
                format!("{e:#}")
            }
        };
        if started.elapsed() + timing.poll_interval > timing.timeout {
            anyhow::bail!(
                "{endpoint} not ready after {}: {problem}",
                humantime::format_duration(timing.timeout)
            );
        }
        tokio::time::sleep(timing.poll_interval).await;
    }
}

/// What `restore --serve` answers: the Job that runs `wait` reads it.
fn restored_router() -> axum::Router {
    axum::Router::new()
        .route("/readyz", axum::routing::get(|| async { "restored\n" }))
        .route("/healthz", axum::routing::get(|| async { "restored\n" }))
}

pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    match args.command {
        NodeCommand::Setup(args) => {
            let plan = SetupPlan::new(args)?;
            for line in tokio::task::spawn_blocking(move || setup_blocking(&plan)).await?? {
                println!("{line}");
            }
            Ok(())
        }
        NodeCommand::Restore(args) => {
            let hosts_dir = args.hosts_dir.clone();
            for line in tokio::task::spawn_blocking(move || restore_blocking(&hosts_dir)).await?? {
                println!("{line}");
            }
            if let Some(addr) = args.serve {
                let listener =
                    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
                println!("serving /readyz on {addr} until stopped");
                let limits = crate::http_server::HttpLimits::default();
                crate::http_server::serve(
                    listener,
                    restored_router(),
                    limits,
                    None,
                    crate::shutdown_signal(),
                )
                .await;
            }
            Ok(())
        }
        NodeCommand::Wait(args) => {
            wait_for(
                &args.endpoint,
                WaitTiming {
                    timeout: *args.timeout,
                    settle: *args.settle,
                    poll_interval: Duration::from_secs(WAIT_POLL_INTERVAL_SECS),
                    probe_timeout: Duration::from_secs(PROBE_TIMEOUT_SECS),
                },
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests;
