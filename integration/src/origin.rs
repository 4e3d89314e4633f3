//! A `shoal origin` process under test, or an external registry.
//!
//! Every test starts its own origin: a free port on 127.0.0.1 and a fresh
//! temporary directory, so tests run in parallel without sharing state. The
//! child is killed when the [`Origin`] is dropped; if the test is panicking the
//! tail of the server's log is printed first.
//!
//! With `SHOAL_TEST_REGISTRY_URL` set, [`Origin::start`] spawns nothing and
//! points at that registry instead (used to validate the suite against another
//! implementation). Tests that need a restart or a Shoal config file skip
//! themselves with [`skip_if_external!`](crate::skip_if_external).

use crate::api::Client;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Environment variable naming the `shoal` binary to test.
pub const BIN_ENV: &str = "SHOAL_BIN";
/// Environment variable naming an already running registry to test instead.
pub const REGISTRY_URL_ENV: &str = "SHOAL_TEST_REGISTRY_URL";
/// `user:password` the tests send (HTTP Basic) to the external registry, for one that
/// requires authentication (the conformance tests with auth on).
pub const REGISTRY_CREDS_ENV: &str = "SHOAL_TEST_REGISTRY_CREDS";

/// The external registry's credentials, from [`REGISTRY_CREDS_ENV`].
pub fn external_credentials() -> Option<(String, String)> {
    let creds = std::env::var(REGISTRY_CREDS_ENV).ok()?;
    let (user, password) = creds.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

const HEALTH_TIMEOUT: Duration = Duration::from_secs(20);
const SPAWN_ATTEMPTS: usize = 3;
const LOG_TAIL_BYTES: u64 = 8 * 1024;

/// The external registry URL (without a trailing slash), if one is configured.
pub fn external_registry() -> Option<String> {
    std::env::var(REGISTRY_URL_ENV)
        .ok()
        .map(|url| url.trim().trim_end_matches('/').to_string())
        .filter(|url| !url.is_empty())
}

/// A registry under test: a spawned `shoal origin`, or an external registry.
pub struct Origin {
    url: String,
    server: Option<Server>,
}

/// The parts of a spawned origin that survive a restart.
struct Server {
    bin: PathBuf,
    port: u16,
    /// Holds `data/`, `config.toml` and `server.log`.
    root: TempDir,
    config: Option<PathBuf>,
    child: Option<Child>,
}

impl Origin {
    /// Starts an origin with the default configuration, or connects to the
    /// external registry when `SHOAL_TEST_REGISTRY_URL` is set.
    pub async fn start() -> Origin {
        match external_registry() {
            Some(url) => Origin { url, server: None },
            None => Origin::spawn(None).await,
        }
    }

    /// Starts an origin with `toml` as its `--config` file. Panics against an
    /// external registry: call [`skip_if_external!`](crate::skip_if_external) first.
    pub async fn start_with_config(toml: &str) -> Origin {
        assert!(
            external_registry().is_none(),
            "a test that needs a Shoal config must skip_if_external! first"
        );
        Origin::spawn(Some(toml)).await
    }

    async fn spawn(config: Option<&str>) -> Origin {
        let config_text = config.map(str::to_string);
        let root =
            tempfile::Builder::new().prefix("shoal-it-").tempdir().expect("create a temporary directory");
        std::fs::create_dir_all(root.path().join("data")).expect("create the data directory");
        let config = config.map(|toml| {
            let path = root.path().join("config.toml");
            std::fs::write(&path, toml).expect("write the config file");
            path
        });
        let mut server = Server { bin: shoal_binary(), port: 0, root, config, child: None };
        // A port found free can be taken by another test before the child binds
        // it; such a child exits at once, so try again on a new port.
        for attempt in 1..=SPAWN_ATTEMPTS {
            server.port = free_port();
            let url = format!("{}://127.0.0.1:{}", scheme_of(config_text.as_deref()), server.port);
            match server.launch(&url).await {
                Ok(()) => return Origin { url, server: Some(server) },
                Err(why) if attempt < SPAWN_ATTEMPTS => {
                    eprintln!("origin start attempt {attempt} failed: {why}; retrying");
                }
                Err(why) => panic!(
                    "shoal origin did not become healthy: {why}\n--- server log ---\n{}",
                    server.log_tail()
                ),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// Base URL, e.g. `http://127.0.0.1:40123` (no trailing slash).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// An HTTP client for this registry, without credentials.
    pub fn client(&self) -> Client {
        let client = Client::new(&self.url);
        match external_credentials().filter(|_| self.is_external()) {
            Some((user, password)) => client.with_basic_auth(&user, &password),
            None => client,
        }
    }

    /// Whether this is an external registry (`SHOAL_TEST_REGISTRY_URL`).
    pub fn is_external(&self) -> bool {
        self.server.is_none()
    }

    /// The origin's `--data-dir`. Panics for an external registry.
    pub fn data_dir(&self) -> PathBuf {
        self.spawned().root.path().join("data")
    }

    /// The file that receives the origin's stdout and stderr.
    pub fn log_path(&self) -> PathBuf {
        self.spawned().root.path().join("server.log")
    }

    /// Kills the origin (SIGKILL: no graceful shutdown, like a crash) and starts
    /// it again on the same port, data directory and config. Panics for an
    /// external registry.
    pub async fn restart(&mut self) {
        let url = self.url.clone();
        let server = self.server.as_mut().expect("restart needs a spawned origin: skip_if_external! first");
        server.kill();
        let mut last_error = String::new();
        for _ in 0..SPAWN_ATTEMPTS {
            match server.launch(&url).await {
                Ok(()) => return,
                // The old socket may linger for a moment; retry on the same port.
                Err(why) => last_error = why,
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        panic!(
            "shoal origin did not come back after a restart: {last_error}\n--- server log ---\n{}",
            server.log_tail()
        );
    }

    /// Kills the origin (SIGKILL) and leaves it down. Panics for an external registry.
    pub fn kill(&mut self) {
        self.server.as_mut().expect("kill needs a spawned origin: skip_if_external! first").kill();
    }

    fn spawned(&self) -> &Server {
        self.server.as_ref().expect("only a spawned origin has this: skip_if_external! first")
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(server) = self.server.as_mut() {
            if std::thread::panicking() {
                eprintln!("--- shoal origin log ({}) ---\n{}", self.url, server.log_tail());
            }
            server.kill();
        }
    }
}

impl Server {
    /// Spawns the child and waits until `GET /healthz` answers 200.
    async fn launch(&mut self, url: &str) -> Result<(), String> {
        let mut command = Command::new(&self.bin);
        command
            .arg("origin")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.root.path().join("data"));
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        let child = self.child.insert(spawn_logged(command, &self.root.path().join("server.log"))?);
        let result = wait_healthy(child, url).await;
        if result.is_err() {
            self.kill();
        }
        result
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self) -> String {
        log_tail(&self.root.path().join("server.log"))
    }
}

/// `https` for a config with a `[tls]` section that names a certificate (see
/// [`crate::tls::TestPki::toml`]), else `http`.
pub(crate) fn scheme_of(config: Option<&str>) -> &'static str {
    let has_tls = config.is_some_and(|c| {
        c.lines().any(|l| l.trim() == "[tls]") && c.lines().any(|l| l.trim_start().starts_with("cert ="))
    });
    if has_tls {
        "https"
    } else {
        "http"
    }
}

/// Spawns `command` with its stdout and stderr appended to `log_path`, without
/// the harness's own environment variables (they are not Shoal settings).
pub fn spawn_logged(mut command: Command, log_path: &Path) -> Result<Child, String> {
    let log = File::options()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| format!("open {}: {e}", log_path.display()))?;
    let log_err = log.try_clone().map_err(|e| e.to_string())?;
    let program = command.get_program().to_owned();
    command
        .env_remove(BIN_ENV)
        .env_remove(REGISTRY_URL_ENV)
        .env_remove(REGISTRY_CREDS_ENV)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", Path::new(&program).display()))
}

/// Waits until `GET <url>/healthz` answers 200, failing early if `child` exits.
pub(crate) async fn wait_healthy(child: &mut Child, url: &str) -> Result<(), String> {
    let http = shoal_tls::http_client().timeout(Duration::from_secs(2)).build().map_err(|e| e.to_string())?;
    let deadline = Instant::now() + HEALTH_TIMEOUT;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("shoal exited early with {status}"));
        }
        match http.get(format!("{url}/healthz")).send().await {
            Ok(resp) if resp.status() == reqwest::StatusCode::OK => return Ok(()),
            Ok(resp) => last = format!("/healthz answered {}", resp.status()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("not healthy after {HEALTH_TIMEOUT:?}: {last}"))
}

/// The last few KiB of a server log, for a failing test's output.
pub(crate) fn log_tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::from("(no log)");
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The `shoal` binary: `$SHOAL_BIN`, else `target/debug/shoal` next to the test
/// executable (`target/debug/deps/<test>`), else the workspace's `target/debug`.
pub fn shoal_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os(BIN_ENV) {
        return PathBuf::from(bin);
    }
    let beside_tests =
        std::env::current_exe().ok().and_then(|exe| exe.parent()?.parent().map(|dir| dir.join("shoal")));
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/shoal");
    beside_tests
        .into_iter()
        .chain(Some(workspace))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("no shoal binary found: build it (cargo build) or set {BIN_ENV}"))
}

/// A port that was free a moment ago on 127.0.0.1 (also: a port where nothing listens).
pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768-60999 by default): ports handed out for
    // `--peer-listen 127.0.0.1:0` and for outgoing connections come from that range, and
    // one of them could take a port picked here before the process that needs it binds it.
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let span = 12_000u16;
    let start = (std::process::id() as u16).wrapping_mul(7919) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed) % span) % span;
        let port = 20_000 + offset;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}
