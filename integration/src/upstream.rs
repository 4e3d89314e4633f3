//! An upstream registry for the pull-through tests: Debian's `docker-registry` (the CNCF
//! distribution), started by the test on a free loopback port with its own storage, plain
//! HTTP and no auth. Its access log tells how many times each blob left it, which is what
//! "one upstream download per cluster" is measured by. Stopped on drop; can be stopped and
//! started again on the same storage and port (an upstream outage).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::origin::free_port;

/// Where Debian installs the registry.
pub const DOCKER_REGISTRY: &str = "/usr/bin/docker-registry";

/// A running (or stopped) `docker-registry`.
pub struct UpstreamRegistry {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl UpstreamRegistry {
    /// Start one, or `None` when the binary is not installed (the test then says so).
    pub async fn start() -> Option<UpstreamRegistry> {
        if !std::path::Path::new(DOCKER_REGISTRY).exists() {
            eprintln!("{DOCKER_REGISTRY} not installed");
            return None;
        }
        let dir = tempfile::Builder::new().prefix("shoal-upstream-").tempdir().ok()?;
        let port = free_port();
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("storage").display()
        );
        std::fs::write(dir.path().join("config.yml"), config).ok()?;
        let mut up = UpstreamRegistry { dir, port, child: None };
        up.start_again().await;
        Some(up)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Start it (again) on the same port and storage, and wait until it answers.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "upstream already running");
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("log file");
        let child = Command::new(DOCKER_REGISTRY)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        self.child = Some(child);
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(format!("{}/v2/", self.url())).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "docker-registry did not start:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop it (an outage); `start_again` brings it back.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// How many times the registry sent `digest`'s bytes (`GET .../blobs/<digest>` answered
    /// 200 or 206, from the access log).
    pub fn blob_gets(&self, digest: &str) -> usize {
        let needle = format!("/blobs/{digest} ");
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET ") && l.contains(&needle))
            .filter(|l| {
                l.split('"').nth(2).is_some_and(|after| {
                    let status = after.split_whitespace().next().unwrap_or("");
                    status == "200" || status == "206"
                })
            })
            .count()
    }

    /// Requests for manifests of `repo` (any method, any status).
    pub fn manifest_requests(&self, repo: &str) -> usize {
        let needle = format!(" /v2/{repo}/manifests/");
        self.log().lines().filter(|l| l.contains(&needle) && l.contains("HTTP/1.1\"")).count()
    }
}

impl Drop for UpstreamRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}
