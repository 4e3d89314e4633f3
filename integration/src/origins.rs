//! An origin cluster under test: N real `shoal origin` processes on loopback that know each
//! other through `--cluster`, share a secret, and replicate every blob and repository on R
//! of them.
//!
//! Every origin's id is its `--listen` address as written in `--cluster`, so all ports are
//! picked before the first process starts (the member list cannot change under a running
//! origin). If one of them is taken by another test before its origin binds it, the whole
//! cluster is started again on new ports. A member can be listed without being started (a
//! node that joins later): it is then simply down for the others until [`start`] is called.
//!
//! Each origin has its own directory (`data/`, `config.toml`, `server.log`) under one
//! temporary directory. [`kill`] is a crash (SIGKILL), [`stop`] a graceful shutdown
//! (SIGTERM, then wait); [`start`] brings an origin back on the same port, data and config.
//! Every assertion helper here puts the last lines of every origin's log into its panic
//! message, because a cluster failure is rarely visible in the one log that noticed it.
//!
//! The image helpers are fallible (`try_*`) so a test that restarts origins can retry a push
//! while treating any failed pull of a committed image as a bug.
//!
//! [`start`]: OriginCluster::start
//! [`kill`]: OriginCluster::kill
//! [`stop`]: OriginCluster::stop

use crate::api::{Client, Image, SendExt};
use crate::cluster::metric_value;
use crate::content::{random_bytes, sha256, unique_token};
use crate::oci::{self, Blob, Manifest};
use crate::origin::{free_port, log_tail, shoal_binary, spawn_logged, wait_healthy};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Deserialize;
use shoal_origin::cluster::placement;
use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The environment variable origins read their shared secret from.
pub const SECRET_ENV: &str = "SHOAL_CLUSTER_SECRET";
/// Prefix of the internal API every origin serves to the others.
pub const INTERNAL_PREFIX: &str = "/shoal/internal/v1";
/// Prefix of the admin API.
pub const ADMIN_PREFIX: &str = "/shoal/v1/admin";

/// `[cluster]` settings every test cluster gets unless its spec overrides the key: health
/// checks fast enough that a dead origin is noticed in about 400 ms and a restarted one in
/// about 200 ms, and a repair loop that runs every second.
pub const TEST_CLUSTER_DEFAULTS: &[(&str, &str)] = &[
    ("health_interval", "\"200ms\""),
    ("health_fails", "2"),
    ("health_passes", "1"),
    ("repair_interval", "\"1s\""),
];

/// How often a cluster start is tried on fresh ports.
const START_ATTEMPTS: usize = 3;
/// How long an origin may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long every origin may take to see every running member as up (and the others down).
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);
/// Admin calls run whole repair or GC passes: give them time.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long [`OriginCluster::gc`] waits for a collection already running to end (one sets
/// copies aside for the quarantine, 10 s in the chaos test, then marks again).
const GC_BUSY_WAIT: Duration = Duration::from_secs(60);
/// Log lines of each origin quoted in a failure message.
const TAIL_LINES: usize = 40;

/// What to start.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Origins listed in everyone's `--cluster`.
    pub members: usize,
    /// How many of them (the first ones) are started; the rest stay down until started.
    pub running: usize,
    /// `--replicas`.
    pub replicas: usize,
    /// `key = value` lines for the `[cluster]` section; a key given here replaces the
    /// same key of [`TEST_CLUSTER_DEFAULTS`].
    pub cluster_toml: String,
    /// Extra environment of one member's process: (member, name, value).
    pub env: Vec<(usize, String, String)>,
    /// Node certificates from the test PKI instead of a shared secret: HTTPS listeners,
    /// origins proving who they are to each other, and an operator's certificate for the
    /// harness's admin calls.
    pub tls: bool,
    /// The shared secret (default: a random one).
    pub secret: Option<String>,
    /// Each origin also gets an internal listener (`--internal-listen`), and the members
    /// are listed by it.
    pub internal_listeners: bool,
    /// Top-level TOML put before `[cluster]` (e.g. `[[upstream]]` sections).
    pub top_toml: String,
    /// With `tls`: certificates but no cluster CA (server TLS only; the shared secret
    /// authenticates the origins to each other).
    pub server_tls_only: bool,
}

impl Default for ClusterSpec {
    fn default() -> ClusterSpec {
        ClusterSpec {
            members: 3,
            running: 3,
            replicas: 2,
            cluster_toml: String::new(),
            env: Vec::new(),
            tls: false,
            secret: None,
            internal_listeners: false,
            top_toml: String::new(),
            server_tls_only: false,
        }
    }
}

impl ClusterSpec {
    /// `members` origins, all running, R = 2, the test defaults.
    pub fn new(members: usize) -> ClusterSpec {
        ClusterSpec { members, running: members, ..ClusterSpec::default() }
    }

    /// Adds `key = value` lines to the `[cluster]` section.
    pub fn cluster(mut self, toml: &str) -> ClusterSpec {
        self.cluster_toml.push_str(toml);
        self.cluster_toml.push('\n');
        self
    }

    /// Adds TOML outside `[cluster]` (e.g. `[[upstream]]` sections) to every origin's config.
    pub fn config(mut self, toml: &str) -> ClusterSpec {
        self.top_toml.push_str(toml);
        self.top_toml.push('\n');
        self
    }

    /// Sets `name=value` in member `i`'s environment (e.g. libfaketime's, to skew its clock).
    pub fn member_env(mut self, i: usize, name: &str, value: &str) -> ClusterSpec {
        self.env.push((i, name.to_string(), value.to_string()));
        self
    }

    /// Node certificates instead of a shared secret (see [`ClusterSpec::tls`]).
    pub fn with_tls(mut self) -> ClusterSpec {
        self.tls = true;
        self
    }

    /// HTTPS listeners with certificates from the test PKI but no cluster CA: the shared
    /// secret, not node certificates, tells origins apart.
    pub fn with_server_tls(mut self) -> ClusterSpec {
        self.tls = true;
        self.server_tls_only = true;
        self
    }

    /// An internal listener on every origin (see [`ClusterSpec::internal_listeners`]).
    pub fn with_internal_listeners(mut self) -> ClusterSpec {
        self.internal_listeners = true;
        self
    }

    /// `secret` as the shared secret, instead of a random one.
    pub fn secret(mut self, secret: &str) -> ClusterSpec {
        self.secret = Some(secret.to_string());
        self
    }

    /// Starts only the first `running` members.
    pub fn running(mut self, running: usize) -> ClusterSpec {
        self.running = running;
        self
    }

    /// The config file: test defaults not overridden, then the spec's own lines.
    fn config_toml(&self) -> String {
        let overridden: BTreeSet<&str> = self
            .cluster_toml
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(key, _)| key.trim())
            .collect();
        let mut toml = self.top_toml.clone();
        toml.push_str("[cluster]\n");
        for (key, value) in TEST_CLUSTER_DEFAULTS {
            if !overridden.contains(key) {
                toml.push_str(&format!("{key} = {value}\n"));
            }
        }
        toml.push_str(&self.cluster_toml);
        toml
    }
}

/// What `POST /shoal/v1/admin/repair` and `POST /shoal/v1/admin/gc` answer: the origin's
/// own report types, so the tests read exactly what the origin writes.
pub use shoal_origin::cluster::gc::GcReport;
pub use shoal_origin::cluster::repair::RepairReport;

/// One entry of `GET /shoal/v1/admin/members`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: String,
    pub url: String,
    pub up: bool,
}

/// One origin of the cluster: fixed port and directory, a child while it runs.
struct Member {
    port: u16,
    /// Holds `data/`, `config.toml` and `server.log`.
    dir: PathBuf,
    /// The ids in this origin's `--cluster` (changed by `restart_with_members`).
    members: Vec<String>,
    /// Extra environment of its process.
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// `https` with node certificates, else `http`.
    scheme: &'static str,
    /// The internal listener's port, if it has one: then its id.
    internal_port: Option<u16>,
}

impl Member {
    /// As listed in `--cluster`: the internal listener if there is one.
    fn id(&self) -> String {
        format!("127.0.0.1:{}", self.internal_port.unwrap_or(self.port))
    }

    /// The public listener (registry API, metrics).
    fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    /// Where the admin API is: the internal listener if there is one.
    fn admin_url(&self) -> String {
        format!("{}://{}", self.scheme, self.id())
    }

    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }
}

/// Running origins. Dropping it kills every process and removes every directory.
pub struct OriginCluster {
    root: TempDir,
    bin: PathBuf,
    secret: String,
    replicas: usize,
    tls: bool,
    server_tls_only: bool,
    internal_listeners: bool,
    nodes: Vec<Member>,
    http: reqwest::Client,
    /// Set once a failure message has quoted the logs, so `Drop` does not print them again.
    logs_shown: AtomicBool,
}

impl OriginCluster {
    /// Starts the members of `spec` that should run and waits until every running origin
    /// sees every running member as up and the others as down.
    pub async fn start_cluster(spec: ClusterSpec) -> OriginCluster {
        assert!(
            crate::external_registry().is_none(),
            "an origin cluster test starts its own origins: skip_if_external! first"
        );
        assert!(spec.running <= spec.members && spec.members > 0, "bad spec {spec:?}");
        let root = tempfile::Builder::new()
            .prefix("shoal-origins-")
            .tempdir()
            .expect("create a temporary directory");
        let http = if spec.tls && !spec.server_tls_only {
            // The PKI first: it installs the harness's TLS context, which every client uses.
            let operator = crate::tls::pki().identity("operator", shoal_registry::identity::Role::Admin);
            shoal_tls::http_client_with(&operator)
        } else {
            if spec.tls {
                crate::tls::pki(); // trust the test CA
            }
            shoal_tls::http_client()
        };
        let http = http.timeout(ADMIN_TIMEOUT).build().expect("build an HTTP client");
        let mut cluster = OriginCluster {
            root,
            bin: shoal_binary(),
            secret: spec.secret.clone().unwrap_or_else(|| format!("it-secret-{}", unique_token())),
            replicas: spec.replicas,
            tls: spec.tls,
            server_tls_only: spec.server_tls_only,
            internal_listeners: spec.internal_listeners,
            nodes: Vec::new(),
            http,
            logs_shown: AtomicBool::new(false),
        };
        let config = spec.config_toml();
        for attempt in 1..=START_ATTEMPTS {
            cluster.kill_all();
            cluster.nodes = cluster.fresh_members(spec.members, &config);
            for (i, name, value) in &spec.env {
                cluster.nodes[*i].env.push((name.clone(), value.clone()));
            }
            match cluster.launch_first(spec.running).await {
                Ok(()) => {
                    cluster.wait_converged().await;
                    return cluster;
                }
                Err(why) if attempt < START_ATTEMPTS => {
                    eprintln!("origin cluster start attempt {attempt} failed: {why}; retrying on new ports");
                }
                Err(why) => cluster.fail(&format!("the origin cluster did not start: {why}")),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// [`start_cluster`](Self::start_cluster) with `members` origins, all running, R = 2.
    pub async fn start_n(members: usize) -> OriginCluster {
        OriginCluster::start_cluster(ClusterSpec::new(members)).await
    }

    /// Distinct free ports and empty directories for `count` members.
    fn fresh_members(&self, count: usize, config: &str) -> Vec<Member> {
        let mut ports = BTreeSet::new();
        while ports.len() < count {
            ports.insert(free_port());
        }
        // One more port each for the internal listeners; they are the ids then.
        let mut internal: Vec<Option<u16>> = vec![None; count];
        if self.internal_listeners {
            let mut taken = ports.clone();
            for slot in internal.iter_mut() {
                let mut p = free_port();
                while !taken.insert(p) {
                    p = free_port();
                }
                *slot = Some(p);
            }
        }
        let ids: Vec<String> = ports
            .iter()
            .zip(&internal)
            .map(|(port, internal)| format!("127.0.0.1:{}", internal.unwrap_or(*port)))
            .collect();
        ports
            .into_iter()
            .zip(internal)
            .enumerate()
            .map(|(i, (port, internal_port))| {
                let dir = self.root.path().join(format!("origin-{i}"));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(dir.join("data")).expect("create an origin's data directory");
                let mut config = config.to_string();
                if self.tls {
                    let role = shoal_registry::identity::Role::Origin;
                    let name = format!("origin-{port}");
                    let pki = crate::tls::pki();
                    config.push_str(&if self.server_tls_only {
                        pki.server_toml(&name, role)
                    } else {
                        pki.toml(&name, role)
                    });
                }
                std::fs::write(dir.join("config.toml"), config).expect("write an origin's config");
                let scheme = if self.tls { "https" } else { "http" };
                Member {
                    port,
                    dir,
                    members: ids.clone(),
                    env: Vec::new(),
                    child: None,
                    scheme,
                    internal_port,
                }
            })
            .collect()
    }

    /// Spawns the first `running` members together, then waits for each to be healthy.
    async fn launch_first(&mut self, running: usize) -> Result<(), String> {
        for i in 0..running {
            self.spawn(i)?;
        }
        for i in 0..running {
            let url = self.nodes[i].url();
            let child = self.nodes[i].child.as_mut().expect("just spawned");
            if let Err(why) = wait_healthy(child, &url).await {
                return Err(format!("origin {i} ({url}): {why}"));
            }
        }
        // Another test's process may have taken a port between the probe and the bind, and
        // answered /healthz for an origin that then failed to start. The admin API needs this
        // cluster's secret, so only our own origins answer it.
        for i in 0..running {
            let url = self.nodes[i].url();
            if let Err(why) = self.try_members(i).await {
                return Err(format!("origin {i} ({url}) is not ours: {why}"));
            }
            let child = self.nodes[i].child.as_mut().expect("just spawned");
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("origin {i} ({url}) exited: {status}"));
            }
        }
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let node = &self.nodes[i];
        let mut command = Command::new(&self.bin);
        command
            .arg("origin")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", node.port))
            .arg("--peer-listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(node.dir.join("data"))
            .arg("--config")
            .arg(node.dir.join("config.toml"))
            .arg("--cluster")
            .arg(node.members.join(","))
            .arg("--replicas")
            .arg(self.replicas.to_string())
            .envs((!self.tls || self.server_tls_only).then_some((SECRET_ENV, &self.secret)))
            .envs(node.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(port) = node.internal_port {
            command.arg("--internal-listen").arg(format!("127.0.0.1:{port}"));
        }
        let child = spawn_logged(command, &node.log())?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    // ---- addresses -------------------------------------------------------------------

    /// How many origins are listed (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `http://127.0.0.1:<port>` of origin `i`.
    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// Origin `i`'s id: `127.0.0.1:<port>`, as listed in `--cluster`.
    pub fn id(&self, i: usize) -> String {
        self.nodes[i].id()
    }

    /// Every listed origin's id, in index order.
    pub fn ids(&self) -> Vec<String> {
        self.nodes.iter().map(Member::id).collect()
    }

    /// A registry client for origin `i`.
    pub fn client(&self, i: usize) -> Client {
        Client::new(&self.url(i))
    }

    /// The shared secret the origins were started with.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The indices of the origins started and not killed or stopped since.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].child.is_some()).collect()
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("data")
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.nodes[i].log()
    }

    // ---- processes -------------------------------------------------------------------

    /// SIGKILL origin `i` (a crash); it keeps its port, data and config for [`start`](Self::start).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`hang = true`) or SIGCONT origin `i`: a process that is hung, not dead (its
    /// sockets accept and buffer, nothing answers).
    pub fn hang(&self, i: usize, hang: bool) {
        let Some(child) = &self.nodes[i].child else { return };
        let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
        let signal = if hang { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) has no memory effects; `pid` is our own child, not yet reaped.
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "could not signal origin {i} (pid {pid})");
    }

    /// SIGTERM origin `i` and wait until it has exited (a graceful shutdown). Fails the test
    /// if it is still running after 30 s.
    pub async fn stop(&mut self, i: usize) {
        let Some(mut child) = self.nodes[i].child.take() else { return };
        let pid = child.id();
        let pid_t = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
        // SAFETY: kill(2) has no memory effects; `pid` is our own child, not yet reaped (we
        // hold its `Child`), so the id cannot have been reused by another process.
        let sent = unsafe { libc::kill(pid_t, libc::SIGTERM) };
        assert_eq!(sent, 0, "could not send SIGTERM to origin {i} (pid {pid})");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.fail(&format!("origin {i} (pid {pid}) still ran {STOP_TIMEOUT:?} after SIGTERM"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts origin `i` (killing it first if it runs) on its port, data and config, and waits
    /// until it answers `/healthz`. Retries on the same port: the old socket may linger.
    pub async fn start(&mut self, i: usize) {
        self.kill(i);
        let url = self.url(i);
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let result = match self.spawn(i) {
                Ok(()) => wait_healthy(self.nodes[i].child.as_mut().expect("just spawned"), &url).await,
                Err(why) => Err(why),
            };
            match result {
                Ok(()) => return,
                Err(why) => last_error = why,
            }
            self.kill(i);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.fail(&format!("origin {i} ({url}) did not start: {last_error}"));
    }

    /// Stops origin `i` gracefully and starts it again with `members` as its `--cluster`
    /// list (ids, normally from [`ids`](Self::ids)); the others keep their lists.
    pub async fn restart_with_members(&mut self, i: usize, members: &[String]) {
        self.stop(i).await;
        self.nodes[i].members = members.to_vec();
        self.start(i).await;
    }

    fn kill_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }

    // ---- admin API -------------------------------------------------------------------

    /// A request to origin `i` carrying the cluster's bearer secret (and, with node
    /// certificates, the operator's certificate, which is what counts there).
    pub fn authed(&self, i: usize, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.nodes[i].admin_url()))
            .header(AUTHORIZATION, format!("Bearer {}", self.secret))
    }

    /// The member list as origin `i` sees it.
    pub async fn try_members(&self, i: usize) -> Result<Vec<MemberStatus>, String> {
        let reply = self
            .authed(i, Method::GET, &format!("{ADMIN_PREFIX}/members"))
            .timeout(Duration::from_secs(5))
            .try_reply()
            .await?;
        if reply.status != StatusCode::OK {
            return Err(reply.describe());
        }
        serde_json::from_slice(&reply.body).map_err(|e| format!("{e}: {}", reply.describe()))
    }

    /// Runs one full repair pass on origin `i` now.
    pub async fn try_repair(&self, i: usize) -> Result<RepairReport, String> {
        self.admin_post(i, "repair").await
    }

    /// [`try_repair`](Self::try_repair), failing the test on an error.
    pub async fn repair(&self, i: usize) -> RepairReport {
        self.try_repair(i).await.unwrap_or_else(|e| self.fail(&format!("repair on origin {i}: {e}")))
    }

    /// Runs a cluster-wide mark-and-sweep from origin `i` now. A collection already running
    /// (409: one whose caller hung up goes on, by design) is waited out, up to
    /// [`GC_BUSY_WAIT`], and then asked again.
    pub async fn gc(&self, i: usize) -> GcReport {
        let deadline = Instant::now() + GC_BUSY_WAIT;
        loop {
            match self.admin_post(i, "gc").await {
                Ok(report) => return report,
                Err(e) if e.contains(" -> 409 ") && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await
                }
                Err(e) => self.fail(&format!("gc on origin {i}: {e}")),
            }
        }
    }

    async fn admin_post<T: for<'de> Deserialize<'de>>(&self, i: usize, what: &str) -> Result<T, String> {
        let reply = self
            .authed(i, Method::POST, &format!("{ADMIN_PREFIX}/{what}"))
            .header(CONTENT_LENGTH, "0")
            .try_reply()
            .await?;
        if reply.status != StatusCode::OK {
            return Err(reply.describe());
        }
        serde_json::from_slice(&reply.body).map_err(|e| format!("{e}: {}", reply.describe()))
    }

    /// Waits until every running origin lists exactly its `--cluster` members and sees the
    /// running ones up and the others down.
    pub async fn wait_converged(&self) {
        let running: BTreeSet<String> = self.running().into_iter().map(|i| self.id(i)).collect();
        self.wait_for("every origin to see the running members up and no other", CONVERGE_TIMEOUT, || {
            let running = &running;
            async move {
                for i in self.running() {
                    let seen = self.try_members(i).await.map_err(|e| format!("origin {i}: {e}"))?;
                    let listed: BTreeSet<String> = seen.iter().map(|m| m.id.clone()).collect();
                    let wanted: BTreeSet<String> = self.nodes[i].members.iter().cloned().collect();
                    let up: BTreeSet<String> = seen.iter().filter(|m| m.up).map(|m| m.id.clone()).collect();
                    let want_up: BTreeSet<String> = wanted.intersection(running).cloned().collect();
                    if listed != wanted || up != want_up {
                        return Err(format!("origin {i} sees {seen:?}; want up {want_up:?}"));
                    }
                }
                Ok(())
            }
        })
        .await;
    }

    /// Waits until origin `i` sees origin `other` as `up`.
    pub async fn wait_sees(&self, i: usize, other: usize, up: bool) {
        let id = self.id(other);
        let what = format!("origin {i} to see origin {other} {}", if up { "up" } else { "down" });
        self.wait_for(&what, CONVERGE_TIMEOUT, || async {
            let seen = self.try_members(i).await?;
            match seen.iter().find(|m| m.id == id) {
                Some(m) if m.up == up => Ok(()),
                _ => Err(format!("origin {i} sees {seen:?}")),
            }
        })
        .await;
    }

    // ---- placement and disks ---------------------------------------------------------

    /// Where origin `i` keeps the blob `digest` (`sha256:<hex>`).
    pub fn blob_path(&self, i: usize, digest: &str) -> PathBuf {
        let (algorithm, hex) = digest.split_once(':').unwrap_or_else(|| panic!("not a digest: {digest}"));
        self.data_dir(i).join("blobs").join(algorithm).join(&hex[..2]).join(hex)
    }

    /// Whether origin `i` has the blob as a committed file (whether it runs or not).
    pub fn blob_on_disk(&self, i: usize, digest: &str) -> bool {
        self.blob_path(i, digest).is_file()
    }

    /// Every origin (running or not) with the blob on disk, ascending.
    pub fn holders(&self, digest: &str) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.blob_on_disk(i, digest)).collect()
    }

    /// The owners of `key` (a digest, or a repository name) when only the origins `among`
    /// are live: `placement::owners` over their ids, as indices, ascending.
    pub fn owners(&self, key: &str, among: &[usize]) -> Vec<usize> {
        let ids: Vec<String> = among.iter().map(|&i| self.id(i)).collect();
        let mut owners: Vec<usize> = placement::owners(key, &ids, self.replicas)
            .iter()
            .map(|id| among[ids.iter().position(|x| x == id).expect("an owner is a member")])
            .collect();
        owners.sort_unstable();
        owners
    }

    /// Every digest whose holders are not exactly its owners among `among`, with both sets.
    pub fn misplaced(&self, digests: &[String], among: &[usize]) -> Vec<String> {
        digests
            .iter()
            .filter_map(|d| {
                let (held, owned) = (self.holders(d), self.owners(d, among));
                (held != owned).then(|| format!("{d}: on {held:?}, owners {owned:?}"))
            })
            .collect()
    }

    /// Fails the test unless every digest is on disk on exactly its owners among `among`.
    pub fn assert_placed(&self, digests: &[String], among: &[usize], when: &str) {
        let wrong = self.misplaced(digests, among);
        if !wrong.is_empty() {
            self.fail(&format!(
                "{when}: {} of {} blobs are not on exactly their owners:\n{}",
                wrong.len(),
                digests.len(),
                wrong.join("\n")
            ));
        }
    }

    /// Runs a repair pass on every running origin, round after round, until every digest is
    /// on exactly its owners among `among`; returns the reports of every pass run. Fails
    /// the test after `limit`.
    pub async fn repair_until_placed(
        &self,
        digests: &[String],
        among: &[usize],
        limit: Duration,
    ) -> Vec<RepairReport> {
        let deadline = Instant::now() + limit;
        let mut reports = Vec::new();
        loop {
            for i in self.running() {
                match self.try_repair(i).await {
                    Ok(report) => reports.push(report),
                    Err(e) => eprintln!("repair on origin {i}: {e}"),
                }
            }
            let wrong = self.misplaced(digests, among);
            if wrong.is_empty() {
                return reports;
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "after {limit:?} of repairs, {} of {} blobs are not on exactly their owners among \
                     {among:?}:\n{}",
                    wrong.len(),
                    digests.len(),
                    wrong.join("\n")
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // ---- metrics, waiting, failing ---------------------------------------------------

    /// The sum of every series of metric `name` on origin `i`'s `/metrics` (0 if absent).
    pub async fn metric(&self, i: usize, name: &str) -> f64 {
        let url = format!("{}/metrics", self.url(i));
        let reply = self.http.get(&url).timeout(Duration::from_secs(5)).try_reply().await;
        match reply {
            Ok(reply) if reply.status == StatusCode::OK => {
                metric_value(&reply.text(), name, &[]).unwrap_or(0.0)
            }
            Ok(reply) => self.fail(&format!("reading {name}: {}", reply.describe())),
            Err(e) => self.fail(&format!("reading {name}: {e}")),
        }
    }

    /// [`metric`](Self::metric) summed over the origins `among`.
    pub async fn metric_sum(&self, among: &[usize], name: &str) -> f64 {
        let mut sum = 0.0;
        for &i in among {
            sum += self.metric(i, name).await;
        }
        sum
    }

    /// Polls `probe` every 100 ms until it returns `Ok`, failing the test (with its last
    /// error and the logs) after `limit`.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, limit: Duration, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        let deadline = Instant::now() + limit;
        loop {
            match probe().await {
                Ok(value) => return value,
                Err(why) if Instant::now() >= deadline => {
                    self.fail(&format!("timed out after {limit:?} waiting for {what}: {why}"))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Fails the test unless `result` is `Ok`, quoting the logs.
    pub fn check<T>(&self, result: Result<T, String>, what: &str) -> T {
        result.unwrap_or_else(|e| self.fail(&format!("{what}: {e}")))
    }

    /// Fails the test with `message` and the last lines of every origin's log.
    pub fn fail(&self, message: &str) -> ! {
        self.logs_shown.store(true, Ordering::Relaxed);
        panic!("{message}\n{}", self.logs());
    }

    /// The last lines of every origin's log, each under a header naming the origin.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let tail = log_tail(&node.log());
            let lines: Vec<&str> = tail.lines().collect();
            let from = lines.len().saturating_sub(TAIL_LINES);
            out.push_str(&format!("--- origin {i} ({}) log, last lines ---\n", node.id()));
            out.push_str(&lines[from..].join("\n"));
            out.push('\n');
        }
        out
    }
}

impl Drop for OriginCluster {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.logs_shown.load(Ordering::Relaxed) {
            eprintln!("{}", self.logs());
        }
        self.kill_all();
    }
}

// ---- images ------------------------------------------------------------------------

/// An image built in memory, and where it is pushed: `repo:tag`.
#[derive(Clone, Debug)]
pub struct TestImage {
    pub repo: String,
    pub tag: String,
    pub image: Image,
}

impl TestImage {
    /// A fresh random image: a unique config and one random layer per entry of `layer_sizes`.
    pub fn random(repo: &str, tag: &str, layer_sizes: &[usize]) -> TestImage {
        let config = Blob::config(oci::OCI_CONFIG);
        let layers: Vec<Blob> =
            layer_sizes.iter().map(|&len| Blob::random_layer(oci::OCI_LAYER, len)).collect();
        TestImage::from_blobs(repo, tag, config, layers)
    }

    /// An image over given blobs (to share layers between images).
    pub fn from_blobs(repo: &str, tag: &str, config: Blob, layers: Vec<Blob>) -> TestImage {
        let value = oci::image_manifest_value(oci::OCI_MANIFEST, &config, &layers);
        let manifest = Manifest::from_value(oci::OCI_MANIFEST, &value);
        TestImage { repo: repo.to_string(), tag: tag.to_string(), image: Image { manifest, config, layers } }
    }

    /// The config, then every layer.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.image.config).chain(self.image.layers.iter())
    }

    /// The digests of the config and the layers (the content stored as blob files).
    pub fn blob_digests(&self) -> Vec<String> {
        self.blobs().map(|b| b.digest.clone()).collect()
    }

    pub fn manifest_digest(&self) -> &str {
        &self.image.manifest.digest
    }

    /// `repo:tag`, for messages.
    pub fn name(&self) -> String {
        format!("{}:{}", self.repo, self.tag)
    }
}

/// A size in `min..=max` that differs between calls.
pub fn random_size(min: usize, max: usize) -> usize {
    let bytes = random_bytes(8);
    let n = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
    min + (n % (max - min + 1) as u64) as usize
}

/// Pushes `blob` to `repo` with one monolithic `POST ?digest=`; `Ok` only on 201.
pub async fn try_push_blob(client: &Client, repo: &str, blob: &Blob) -> Result<(), String> {
    let reply = client
        .post(&format!("/v2/{repo}/blobs/uploads/?digest={}", blob.digest))
        .header(CONTENT_TYPE, "application/octet-stream")
        .body(blob.data.clone())
        .try_reply()
        .await?;
    match reply.status {
        StatusCode::CREATED => Ok(()),
        _ => Err(reply.describe()),
    }
}

/// `PUT` the image's manifest under its tag; `Ok` only on 201.
pub async fn try_put_manifest(client: &Client, image: &TestImage) -> Result<(), String> {
    let manifest = &image.image.manifest;
    let reply = client
        .put(&format!("/v2/{}/manifests/{}", image.repo, image.tag))
        .header(CONTENT_TYPE, manifest.media_type.as_str())
        .body(manifest.bytes.clone())
        .try_reply()
        .await?;
    match reply.status {
        StatusCode::CREATED => Ok(()),
        _ => Err(reply.describe()),
    }
}

/// Pushes every blob, then the manifest under the tag; the image is committed only if
/// this returns `Ok`.
pub async fn try_push_image(client: &Client, image: &TestImage) -> Result<(), String> {
    for blob in image.blobs() {
        try_push_blob(client, &image.repo, blob).await?;
    }
    try_put_manifest(client, image).await
}

/// `GET` a blob and check its bytes hash to `digest`.
pub async fn try_pull_blob(client: &Client, repo: &str, digest: &str) -> Result<(), String> {
    let reply = client.get(&format!("/v2/{repo}/blobs/{digest}")).try_reply().await?;
    if reply.status != StatusCode::OK || reply.body_error.is_some() {
        return Err(reply.describe());
    }
    let got = sha256(&reply.body);
    if got != digest {
        return Err(format!("GET {}: {} bytes hashing to {got}, want {digest}", reply.url, reply.body.len()));
    }
    Ok(())
}

/// Pulls the image the way a client does: the manifest by tag (its bytes must be exactly
/// the pushed ones), then every blob it names, each digest verified.
pub async fn try_pull_image(client: &Client, image: &TestImage) -> Result<(), String> {
    let reply = client
        .get(&format!("/v2/{}/manifests/{}", image.repo, image.tag))
        .header(ACCEPT, oci::ACCEPT_ALL)
        .try_reply()
        .await?;
    if reply.status != StatusCode::OK {
        return Err(reply.describe());
    }
    if reply.body != image.image.manifest.bytes {
        return Err(format!(
            "manifest of {} hashes to {}, want {}: {}",
            image.name(),
            sha256(&reply.body),
            image.manifest_digest(),
            reply.describe()
        ));
    }
    for blob in image.blobs() {
        try_pull_blob(client, &image.repo, &blob.digest).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_lines_replace_default_keys() {
        let toml = ClusterSpec::new(3).cluster("gc_grace = \"0s\"\nhealth_fails = 5").config_toml();
        assert!(toml.starts_with("[cluster]\n"));
        assert!(toml.contains("health_interval = \"200ms\"\n"));
        assert!(toml.contains("gc_grace = \"0s\"\n"));
        assert_eq!(toml.matches("health_fails").count(), 1, "{toml}");
        assert!(toml.contains("health_fails = 5"));
    }

    #[test]
    fn random_sizes_stay_in_range() {
        for _ in 0..100 {
            let n = random_size(10, 20);
            assert!((10..=20).contains(&n));
        }
    }
}
