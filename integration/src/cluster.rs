//! A whole Shoal on loopback: one origin (seeding on a peer listener), one
//! tracker and N agents, each a real `shoal` process with its own temporary
//! directory, for the swarm tests.
//!
//! The origin is an [`Origin`] (same spawning, restart and log handling as the
//! API tests); the tracker and the agents are [`Process`]es that can be killed
//! with SIGKILL (a crash, no graceful shutdown) and restarted on the same port,
//! data directory and config. Peer listeners bind port 0, so only the HTTP
//! ports are picked in advance (and retried if another test takes one first).
//!
//! Blobs are written to a file while hashed and pushed with a monolithic
//! `POST ?digest=` streamed from that file; pulls through an agent are streamed
//! and hashed on the fly, so eight concurrent 256 MiB pulls do not hold 2 GiB
//! in memory. [`Cluster::metric`] reads one value from a `/metrics` page.

use crate::content::{random_bytes, unique_repo};
use crate::origin::{free_port, log_tail, shoal_binary, spawn_logged, wait_healthy, Origin};
use futures_util::StreamExt;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE};
use sha2::{Digest as _, Sha256};
use std::ffi::OsString;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How often a process start is retried on a new port (another test may grab
/// a port between our probe and the child's bind).
const SPAWN_ATTEMPTS: usize = 3;
/// Announce interval of the tracker and the agents: short, so swarms form fast.
pub const ANNOUNCE_INTERVAL: &str = "1s";
/// A read through an agent that sees no byte for this long fails.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Blocks of the generated blobs.
const BLOCK: usize = 1 << 20;

/// A `shoal` child process (tracker or agent) on a fixed HTTP port.
pub struct Process {
    name: String,
    bin: PathBuf,
    /// The subcommand and every flag but `--listen`.
    args: Vec<OsString>,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl Process {
    /// Starts `shoal <args> --listen 127.0.0.1:<free port>` and waits for `/healthz`.
    pub async fn spawn(name: String, args: Vec<OsString>, log: PathBuf) -> Process {
        let mut process = Process { name, bin: shoal_binary(), args, port: 0, log, child: None };
        for attempt in 1..=SPAWN_ATTEMPTS {
            process.port = free_port();
            match process.launch().await {
                Ok(()) => return process,
                Err(why) if attempt < SPAWN_ATTEMPTS => {
                    eprintln!("{} start attempt {attempt} failed: {why}; retrying", process.name);
                }
                Err(why) => panic!(
                    "{} did not become healthy: {why}\n--- log ---\n{}",
                    process.name,
                    log_tail(&process.log)
                ),
            }
        }
        unreachable!("the loop returns or panics")
    }

    async fn launch(&mut self) -> Result<(), String> {
        let mut command = Command::new(&self.bin);
        command.args(&self.args).arg("--listen").arg(format!("127.0.0.1:{}", self.port));
        let url = self.url();
        let child = self.child.insert(spawn_logged(command, &self.log)?);
        let result = wait_healthy(child, &url).await;
        if result.is_err() {
            self.kill();
        }
        result
    }

    /// `http://127.0.0.1:<port>`, or `https://` for a process started with `--tls-cert`.
    pub fn url(&self) -> String {
        let tls = self.args.iter().any(|a| a == "--tls-cert");
        format!("{}://127.0.0.1:{}", if tls { "https" } else { "http" }, self.port)
    }

    /// The file that receives the process's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the child is alive (started and not killed or exited).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM (what Kubernetes sends on a rollout); the process drains and exits on its own.
    pub fn terminate(&mut self) {
        if let Some(child) = &self.child {
            let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
            // SAFETY: kill(2) with a pid this process spawned and has not reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }

    /// Waits up to `limit` for the process to exit; its status if it did.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = status {
                self.child = None;
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, then reap. Does nothing if the process is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the process if it runs, then starts it again on the same port
    /// with the same arguments (so the same data directory and config).
    pub async fn restart(&mut self) {
        self.kill();
        let mut last_error = String::new();
        for _ in 0..SPAWN_ATTEMPTS {
            match self.launch().await {
                Ok(()) => return,
                // The old socket may linger for a moment; retry on the same port.
                Err(why) => last_error = why,
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        panic!(
            "{} did not come back after a restart: {last_error}\n--- log ---\n{}",
            self.name,
            log_tail(&self.log)
        );
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} log ({}) ---\n{}", self.name, self.url(), log_tail(&self.log));
        }
        self.kill();
    }
}

/// A blob pushed to the cluster's origin; its bytes stay in `path` until the
/// cluster is dropped.
#[derive(Clone, Debug)]
pub struct TestBlob {
    pub repo: String,
    pub digest: String,
    pub size: u64,
    pub path: PathBuf,
}

/// What a pull through an agent returned.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// `sha256:<hex>` of the bytes received.
    pub digest: String,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Origin + tracker + agents. Dropping it kills every process and removes
/// every directory.
pub struct Cluster {
    pub origin: Origin,
    pub tracker: Process,
    agents: Vec<Process>,
    root: TempDir,
    http: reqwest::Client,
    /// Every process has a certificate from the test PKI: TLS listeners, mutual TLS peers.
    tls: bool,
    /// Makes this cluster's certificate names its own (clusters start in parallel).
    token: String,
}

impl Cluster {
    /// A cluster with `agents` agents on the default agent config (plus the
    /// short [`ANNOUNCE_INTERVAL`]).
    pub async fn start(agents: usize) -> Cluster {
        Cluster::start_with(agents, "").await
    }

    /// A cluster whose agents all get `agent_toml` appended to their config
    /// file (which already sets `announce_interval`).
    pub async fn start_with(agents: usize, agent_toml: &str) -> Cluster {
        Cluster::start_opts(agents, "", agent_toml, false).await
    }

    /// [`start_with`](Self::start_with), the origin's config file also getting `origin_toml`
    /// (e.g. an `[auth]` section).
    pub async fn start_with_origin(agents: usize, origin_toml: &str, agent_toml: &str) -> Cluster {
        Cluster::start_opts(agents, origin_toml, agent_toml, false).await
    }

    /// A cluster where every process has a certificate from the binary's test PKI
    /// ([`crate::tls::pki`]): HTTPS on every listener, node identity on every connection,
    /// the peer protocol over mutual TLS.
    pub async fn start_tls(agents: usize) -> Cluster {
        Cluster::start_opts(agents, "", "", true).await
    }

    async fn start_opts(agents: usize, extra_origin_toml: &str, agent_toml: &str, tls: bool) -> Cluster {
        use shoal_registry::identity::Role;
        assert!(
            crate::external_registry().is_none(),
            "a swarm test starts its own origin: skip_if_external! first"
        );
        let mut origin_toml = format!("peer_listen = \"127.0.0.1:0\"\n{extra_origin_toml}");
        let mut tracker_tls = Vec::new();
        let token = crate::unique_token();
        if tls {
            origin_toml.push_str(&crate::tls::pki().toml(&format!("origin-{token}"), Role::Origin));
            tracker_tls = crate::tls::pki().flags(&format!("tracker-{token}"), Role::Tracker);
        }
        let origin = Origin::start_with_config(&origin_toml).await;
        let root =
            tempfile::Builder::new().prefix("shoal-swarm-").tempdir().expect("create a temporary directory");
        let tracker = Process::spawn(
            "shoal tracker".to_string(),
            vec![
                "tracker".into(),
                "--origin".into(),
                origin.url().into(),
                "--announce-interval".into(),
                ANNOUNCE_INTERVAL.into(),
            ]
            .into_iter()
            .chain(tracker_tls)
            .collect(),
            root.path().join("tracker.log"),
        )
        .await;
        let http = shoal_tls::http_client()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(READ_TIMEOUT)
            .build()
            .expect("build an HTTP client");
        let mut cluster = Cluster { origin, tracker, agents: Vec::new(), root, http, tls, token };
        for _ in 0..agents {
            cluster.add_agent(agent_toml).await;
        }
        cluster
    }

    /// Starts one more agent with `extra_toml` appended to its config; returns its index.
    pub async fn add_agent(&mut self, extra_toml: &str) -> usize {
        let origin = self.origin.url().to_string();
        self.add_agent_with_origins(extra_toml, &origin).await
    }

    /// [`add_agent`](Self::add_agent) with `origins` as the agent's `--origin` value (a
    /// comma-separated list), e.g. a dead origin before the cluster's to test failover.
    pub async fn add_agent_with_origins(&mut self, extra_toml: &str, origins: &str) -> usize {
        let index = self.agents.len();
        let dir = self.root.path().join(format!("agent-{index}"));
        std::fs::create_dir_all(dir.join("data")).expect("create the agent's data directory");
        let config = dir.join("config.toml");
        std::fs::write(&config, format!("announce_interval = \"{ANNOUNCE_INTERVAL}\"\n{extra_toml}\n"))
            .expect("write the agent's config");
        let mut args: Vec<OsString> = vec![
            "agent".into(),
            "--peer-listen".into(),
            "127.0.0.1:0".into(),
            "--origin".into(),
            origins.into(),
            "--tracker".into(),
            self.tracker.url().into(),
            "--data-dir".into(),
            dir.join("data").into(),
            "--config".into(),
            config.into(),
        ];
        if self.tls {
            let role = shoal_registry::identity::Role::Agent;
            args.extend(crate::tls::pki().flags(&format!("agent-{index}-{}", self.token), role));
        }
        let agent = Process::spawn(format!("shoal agent {index}"), args, dir.join("server.log")).await;
        self.agents.push(agent);
        index
    }

    pub fn agent_count(&self) -> usize {
        self.agents.len()
    }

    pub fn agent(&self, index: usize) -> &Process {
        &self.agents[index]
    }

    pub fn agent_mut(&mut self, index: usize) -> &mut Process {
        &mut self.agents[index]
    }

    pub fn agent_url(&self, index: usize) -> String {
        self.agents[index].url()
    }

    /// The agent's `--data-dir`.
    pub fn agent_data_dir(&self, index: usize) -> PathBuf {
        self.root.path().join(format!("agent-{index}")).join("data")
    }

    /// SIGKILL an agent (it keeps its port and data directory for a restart).
    pub fn kill_agent(&mut self, index: usize) {
        self.agents[index].kill();
    }

    /// Start a killed (or running) agent again on the same port, data and config.
    pub async fn restart_agent(&mut self, index: usize) {
        self.agents[index].restart().await;
    }

    pub fn kill_tracker(&mut self) {
        self.tracker.kill();
    }

    pub async fn restart_tracker(&mut self) {
        self.tracker.restart().await;
    }

    /// Writes `size` bytes that differ from every other blob to a file, then
    /// pushes them to the origin with a monolithic `POST ?digest=` streamed
    /// from that file; asserts 201.
    pub async fn push_random_blob(&self, size: u64) -> TestBlob {
        let repo = unique_repo("swarm");
        let dir = self.root.path().join("blobs");
        std::fs::create_dir_all(&dir).expect("create the blob directory");
        let path = dir.join(crate::unique_token());
        let digest = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || write_random_file(&path, size))
                .await
                .expect("blob writer task")
                .expect("write the blob file")
        };
        let file = tokio::fs::File::open(&path).await.expect("open the blob file");
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(file, BLOCK));
        let url = format!("{}/v2/{repo}/blobs/uploads/?digest={digest}", self.origin.url());
        let resp = self
            .http
            .post(&url)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, size)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"));
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(status, reqwest::StatusCode::CREATED, "monolithic push of {size} bytes: {text}");
        TestBlob { repo, digest, size, path }
    }

    /// Pulls `blob` through an agent (`GET /v2/<repo>/blobs/<digest>`), hashing
    /// as it streams. The future owns what it needs, so it can be spawned.
    pub fn fetch(
        &self,
        agent: usize,
        blob: &TestBlob,
    ) -> impl Future<Output = Result<Fetched, String>> + Send + 'static {
        fetch_blob(self.http.clone(), self.blob_url(agent, blob), None)
    }

    /// Like [`fetch`](Self::fetch), but a slow client: reads at most
    /// `bytes_per_sec` (the agent sees the backpressure).
    pub fn fetch_throttled(
        &self,
        agent: usize,
        blob: &TestBlob,
        bytes_per_sec: u64,
    ) -> impl Future<Output = Result<Fetched, String>> + Send + 'static {
        fetch_blob(self.http.clone(), self.blob_url(agent, blob), Some(bytes_per_sec))
    }

    fn blob_url(&self, agent: usize, blob: &TestBlob) -> String {
        format!("{}/v2/{}/blobs/{}", self.agents[agent].url(), blob.repo, blob.digest)
    }

    /// The sum of every series of metric `name` whose labels include `labels`,
    /// from `<base>/metrics`; 0 when no series matches (a labelled counter
    /// appears only once it has been used).
    pub async fn try_metric(&self, base: &str, name: &str, labels: &[(&str, &str)]) -> Result<f64, String> {
        let url = format!("{base}/metrics");
        let resp = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: {}", resp.status()));
        }
        let text = resp.text().await.map_err(|e| format!("GET {url}: {e}"))?;
        Ok(metric_value(&text, name, labels).unwrap_or(0.0))
    }

    /// [`try_metric`](Self::try_metric), panicking if `/metrics` cannot be read.
    pub async fn metric(&self, base: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.try_metric(base, name, labels).await.unwrap_or_else(|e| panic!("reading {name}: {e}"))
    }

    pub async fn agent_metric(&self, agent: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metric(&self.agents[agent].url(), name, labels).await
    }

    pub async fn origin_metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metric(self.origin.url(), name, labels).await
    }

    /// Bytes the origin has sent so far: pieces to peers plus HTTP bodies
    /// (which include range fallbacks, and the small `/metrics` pages).
    pub async fn origin_egress(&self) -> OriginEgress {
        OriginEgress {
            peer: self.origin_metric("shoal_origin_peer_sent_bytes_total", &[]).await as u64,
            http: self.origin_metric("shoal_origin_http_sent_bytes_total", &[]).await as u64,
        }
    }

    /// Verified bytes an agent received, from peers and from the origin fallback.
    pub async fn agent_received(&self, agent: usize) -> AgentReceived {
        let name = "shoal_agent_received_bytes_total";
        AgentReceived {
            peer: self.agent_metric(agent, name, &[("source", "peer")]).await as u64,
            origin: self.agent_metric(agent, name, &[("source", "origin")]).await as u64,
        }
    }
}

/// A snapshot of the origin's egress counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginEgress {
    pub peer: u64,
    pub http: u64,
}

impl OriginEgress {
    pub fn total(&self) -> u64 {
        self.peer + self.http
    }

    /// What was sent between `earlier` and `self`.
    pub fn since(&self, earlier: &OriginEgress) -> OriginEgress {
        OriginEgress { peer: self.peer - earlier.peer, http: self.http - earlier.http }
    }
}

/// A snapshot of an agent's received-bytes counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentReceived {
    pub peer: u64,
    pub origin: u64,
}

impl AgentReceived {
    pub fn total(&self) -> u64 {
        self.peer + self.origin
    }
}

/// Writes `size` bytes to `path` and returns their `sha256:` digest. Every
/// 1 MiB block is one random block with its index in the first 8 bytes, so
/// pieces differ from each other and blobs from each other, cheaply even in a
/// debug build. Blocking.
fn write_random_file(path: &Path, size: u64) -> std::io::Result<String> {
    let mut block = random_bytes(BLOCK);
    let mut out = std::io::BufWriter::with_capacity(BLOCK, std::fs::File::create(path)?);
    let mut hasher = Sha256::new();
    let mut left = size;
    let mut index: u64 = 0;
    while left > 0 {
        block[..8].copy_from_slice(&index.to_le_bytes());
        let n = usize::try_from(left.min(BLOCK as u64)).unwrap_or(BLOCK);
        hasher.update(&block[..n]);
        out.write_all(&block[..n])?;
        left -= n as u64;
        index += 1;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// GET `url`, hashing the body as it streams, optionally no faster than `rate`.
async fn fetch_blob(http: reqwest::Client, url: String, rate: Option<u64>) -> Result<Fetched, String> {
    let started = Instant::now();
    let resp = http.get(&url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(format!("GET {url}: {status}: {text}"));
    }
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("GET {url}: body failed after {bytes} bytes: {e}"))?;
        hasher.update(&chunk);
        bytes += chunk.len() as u64;
        if let Some(rate) = rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
            let elapsed = started.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
    }
    Ok(Fetched {
        digest: format!("sha256:{}", hex::encode(hasher.finalize())),
        bytes,
        elapsed: started.elapsed(),
    })
}

/// The sum of the samples of `name` in a Prometheus text page whose labels
/// include every pair of `labels`; `None` if none matches.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(sample) = parse_sample(line) else { continue };
        if sample.name != name {
            continue;
        }
        if labels.iter().all(|(k, v)| sample.labels.iter().any(|(sk, sv)| sk == k && sv == v)) {
            *found.get_or_insert(0.0) += sample.value;
        }
    }
    found
}

/// One sample of a Prometheus text page.
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(String, String)>,
    value: f64,
}

/// One sample line: `name{k="v",...} value [timestamp]` or `name value`.
fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        let close = loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => break i,
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            '"' => break,
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        };
        rest = &inner[close + 1..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample { name, labels, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_and_labelled_samples() {
        let text = "# HELP x_total Things\n# TYPE x_total counter\nx_total 42\n\
                    y_bytes_total{source=\"peer\"} 10\ny_bytes_total{source=\"origin\"} 5\n\
                    z{a=\"1\",b=\"q\\\"uote\"} 7 1700000000\n";
        assert_eq!(metric_value(text, "x_total", &[]), Some(42.0));
        assert_eq!(metric_value(text, "y_bytes_total", &[]), Some(15.0));
        assert_eq!(metric_value(text, "y_bytes_total", &[("source", "origin")]), Some(5.0));
        assert_eq!(metric_value(text, "y_bytes_total", &[("source", "tracker")]), None);
        assert_eq!(metric_value(text, "z", &[("b", "q\"uote")]), Some(7.0));
        assert_eq!(metric_value(text, "x", &[]), None);
    }
}
