//! `shoal up`, the README's one command: a whole local Shoal in one process. A blob pushed to
//! its origin comes back through each of its agents, in plain HTTP and with `--tls` (a CA
//! made in the data directory, HTTPS everywhere, mutual TLS between peers).

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use shoal_integration::origin::{free_port, shoal_binary, spawn_logged};
use shoal_integration::{random_bytes, sha256, skip_if_external};

/// Kills the child on drop.
struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `shoal up` on a free block of ports (the origin's, +1.. for agents, +100 tracker, +200..
/// peers); returns the process and the origin's port.
fn start(dir: &Path, tls: bool) -> (Up, u16) {
    // Every port of the block must be free: the tracker and the peer listeners take
    // base + 100 and base + 200 + i.
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    let base = loop {
        let p = free_port();
        if p < 30_000 && [1, 2, 100, 200, 201, 202].iter().all(|d| free(p + d)) {
            break p;
        }
    };
    let mut command = Command::new(shoal_binary());
    command
        .arg("up")
        .arg("--listen")
        .arg(format!("127.0.0.1:{base}"))
        .arg("--agents")
        .arg("2")
        .arg("--data-dir")
        .arg(dir.join("data"));
    if tls {
        command.arg("--tls");
    }
    let child = spawn_logged(command, &dir.join("up.log")).expect("spawn shoal up");
    (Up(child), base)
}

async fn wait_healthy(http: &reqwest::Client, url: &str, up: &mut Up, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await {
            if r.status() == reqwest::StatusCode::OK {
                return;
            }
        }
        if let Ok(Some(status)) = up.0.try_wait() {
            panic!("shoal up exited with {status}:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        assert!(
            Instant::now() < deadline,
            "{url} not healthy:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn push_and_pull_through_agents(tls: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (mut up, base) = start(dir.path(), tls);
    let scheme = if tls { "https" } else { "http" };
    // With --tls, clients trust the CA shoal up made; wait for it to exist first.
    let ca = dir.path().join("data/pki/ca.pem");
    let deadline = Instant::now() + Duration::from_secs(30);
    while tls && !ca.exists() {
        assert!(Instant::now() < deadline, "no CA at {}", ca.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let settings = shoal_tls::TlsSettings { ca: tls.then(|| ca.clone()), ..Default::default() };
    let http = shoal_tls::http_client_with(&shoal_tls::Tls::load(&settings).unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let log = dir.path().join("up.log");
    let origin = format!("{scheme}://127.0.0.1:{base}");
    let agents: Vec<String> = (1..=2).map(|i| format!("{scheme}://127.0.0.1:{}", base + i)).collect();
    wait_healthy(&http, &origin, &mut up, &log).await;
    for a in &agents {
        wait_healthy(&http, a, &mut up, &log).await;
    }

    let blob = random_bytes(3 << 20);
    let digest = sha256(&blob);
    let resp = http
        .post(format!("{origin}/v2/up/test/blobs/uploads/?digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::CREATED);
    for a in &agents {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let resp = http.get(format!("{a}/v2/up/test/blobs/{digest}")).send().await.unwrap();
            if resp.status() == reqwest::StatusCode::OK {
                let body = resp.bytes().await.unwrap();
                assert_eq!(sha256(&body), digest, "through {a}");
                break;
            }
            assert!(Instant::now() < deadline, "{a} answered {}", resp.status());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if tls {
        // Plain HTTP gets no answer, and the swarm ran over mutual TLS.
        let plain = reqwest::Client::new().get(format!("http://127.0.0.1:{base}/v2/")).send().await;
        assert!(plain.is_err(), "plain HTTP answered {:?}", plain.map(|r| r.status()));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("peer_tls=true"), "{text}");
    }
    // The preheat command it prints works as printed: with --tls it names the CA to trust.
    let text = std::fs::read_to_string(&log).unwrap();
    let preheat = text.lines().find(|l| l.trim_start().starts_with("shoal preheat")).expect("a preheat line");
    let names_ca = preheat.contains(&format!("--tls-ca {}", ca.display()));
    assert_eq!(names_ca, tls, "{preheat}");
}

/// One test, plain then TLS: two `shoal up`s at once could pick overlapping port blocks.
#[tokio::test]
async fn shoal_up_serves_a_blob_through_every_agent_plain_and_with_tls() {
    skip_if_external!("starts its own Shoal");
    push_and_pull_through_agents(false).await;
    push_and_pull_through_agents(true).await;
}
