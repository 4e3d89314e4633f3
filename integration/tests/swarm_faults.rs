//! The swarm under faults: an agent dies mid-transfer, a peer serves corrupt
//! pieces, the tracker is down, an agent crashes and restarts on its data, an
//! agent's first origin is dead.
//! Every pull still ends with the exact blob.
//!
//! Each test starts its own origin, tracker and agents ([`Cluster`]) on
//! loopback.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use shoal_integration::api::ImageKind;
use shoal_integration::cluster::{Cluster, TestBlob};
use shoal_integration::origin::free_port;
use shoal_integration::{sha256, skip_if_external, unique_repo, Client, StatusCode};
use shoal_p2p::blob::BlobPieces;
use shoal_p2p::limiter::RateLimiter;
use shoal_p2p::server::{PeerServer, PieceLookup};
use shoal_p2p::tracker_client::{metainfo_path, AnnounceRequest, TrackerClient};
use shoal_p2p::{Metainfo, PeerId, SwarmMetrics};
use shoal_registry::Digest;

const MIB: u64 = 1024 * 1024;
const SKIP: &str = "the swarm tests start their own origin, tracker and agents";

/// Polls `probe` every 50 ms until it returns `Some`, panicking after `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Verified bytes an agent has received so far (peers and origin), or `None`
/// if its `/metrics` does not answer.
async fn received(cluster: &Cluster, agent: usize) -> Option<u64> {
    cluster
        .try_metric(&cluster.agent_url(agent), "shoal_agent_received_bytes_total", &[])
        .await
        .ok()
        .map(|v| v as u64)
}

/// Four agents (ingress limited to 24 MiB/s so the transfer lasts seconds)
/// pull one 96 MiB blob; one is SIGKILLed once it has received 16 MiB and
/// served pieces to the others (so they lose a source mid-transfer). The three
/// survivors finish with the exact blob.
#[tokio::test(flavor = "multi_thread")]
async fn agent_killed_mid_transfer_others_finish() {
    skip_if_external!(SKIP);
    const AGENTS: usize = 4;
    const VICTIM: usize = 0;
    let size = 96 * MIB;
    let mut cluster = Cluster::start_with(AGENTS, "ingress_rate = \"24MiB\"\n").await;
    let blob = cluster.push_random_blob(size).await;

    let pulls: Vec<_> = (0..AGENTS).map(|i| tokio::spawn(cluster.fetch(i, &blob))).collect();
    // Kill it while it is both downloading and serving the others.
    let (at_kill, served) =
        wait_for("the victim to receive 16 MiB and serve a piece", Duration::from_secs(60), || async {
            let got = received(&cluster, VICTIM).await?;
            let sent = cluster
                .try_metric(&cluster.agent_url(VICTIM), "shoal_agent_peer_sent_bytes_total", &[])
                .await
                .ok()?;
            (got >= 16 * MIB && sent > 0.0).then_some((got, sent))
        })
        .await;
    assert!(at_kill < size, "the victim finished before it could be killed mid-transfer");
    cluster.kill_agent(VICTIM);
    println!(
        "killed agent {VICTIM} after it received {:.1} MiB and sent {:.1} MiB to peers",
        at_kill as f64 / MIB as f64,
        served / MIB as f64
    );

    for (i, pull) in pulls.into_iter().enumerate() {
        let result = tokio::time::timeout(Duration::from_secs(120), pull)
            .await
            .unwrap_or_else(|_| panic!("agent {i}: the pull did not finish in 120 s"))
            .expect("pull task");
        if i == VICTIM {
            assert!(result.is_err(), "the killed agent's pull cannot have finished: {result:?}");
            continue;
        }
        let fetched = result.unwrap_or_else(|e| panic!("agent {i}: {e}"));
        let from = cluster.agent_received(i).await;
        println!(
            "agent {i}: {:.1} s, {:.1} MiB from peers, {:.1} MiB from origin HTTP",
            fetched.elapsed.as_secs_f64(),
            from.peer as f64 / MIB as f64,
            from.origin as f64 / MIB as f64
        );
        assert_eq!(fetched.bytes, size, "agent {i}: length");
        assert_eq!(fetched.digest, blob.digest, "agent {i}: digest");
    }
}

/// A peer that serves a blob whose every piece is corrupted: the real peer
/// server over a damaged copy, announced to the tracker as a complete seeder
/// every second.
struct CorruptPeer {
    addr: SocketAddr,
    metrics: SwarmMetrics,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for CorruptPeer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Serves one blob, whatever its file holds.
struct OneBlob {
    digest: Digest,
    pieces: Arc<BlobPieces>,
}

#[async_trait]
impl PieceLookup for OneBlob {
    async fn lookup(&self, digest: &Digest) -> Option<Arc<BlobPieces>> {
        (digest == &self.digest).then(|| self.pieces.clone())
    }
}

impl CorruptPeer {
    async fn start(cluster: &Cluster, blob: &TestBlob, dir: &Path) -> CorruptPeer {
        let digest: Digest = blob.digest.parse().expect("a valid digest");
        let url = format!("{}{}", cluster.origin.url(), metainfo_path(&digest));
        let json = reqwest::get(&url).await.and_then(|r| r.error_for_status()).expect("GET metainfo");
        let metainfo: Metainfo = serde_json::from_slice(&json.bytes().await.expect("metainfo body"))
            .expect("the origin's metainfo parses");

        // Flip one byte in every piece, so no piece of this copy verifies.
        let mut data = std::fs::read(&blob.path).expect("read the blob");
        for index in 0..metainfo.piece_count() {
            let (offset, len) = metainfo.piece_range(index).expect("piece in range");
            data[usize::try_from(offset + len / 2).expect("offset fits")] ^= 0xff;
        }
        let path = dir.join("corrupt-blob");
        std::fs::write(&path, &data).expect("write the corrupt copy");
        drop(data);
        let pieces =
            Arc::new(BlobPieces::complete(&path, Arc::new(metainfo)).expect("open the corrupt copy"));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the corrupt peer");
        let addr = listener.local_addr().expect("its address");
        let peer_id = PeerId::random();
        let metrics = SwarmMetrics::unregistered();
        let server = Arc::new(PeerServer {
            peer_id,
            lookup: Arc::new(OneBlob { digest: digest.clone(), pieces }),
            egress: Arc::new(RateLimiter::unlimited()),
            metrics: metrics.clone(),
            max_connections: 16,
            max_connections_per_address: 16,
            max_peers_per_blob: None,
            upload_slots: None,
            piece_sends: None,
            super_seed: None,
            pace: false,
        });
        let serve = tokio::spawn(server.serve(listener));

        let tracker =
            TrackerClient::new(vec![cluster.tracker.url()], Duration::from_secs(2)).expect("tracker client");
        let request =
            AnnounceRequest { digest, peer_id: peer_id.to_string(), addr, complete: true, stopped: false };
        // The first announce must land before any agent asks for peers.
        tracker.announce(&request).await.expect("announce the corrupt peer");
        let announce = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = tracker.announce(&request).await;
            }
        });
        CorruptPeer { addr, metrics, tasks: vec![serve, announce] }
    }
}

/// A peer announced as a complete seeder serves nothing but corrupt pieces.
/// The agent (its ingress limited, so the transfer lasts long enough to use
/// every peer it is handed) rejects them, drops the peer and still delivers
/// the exact blob.
#[tokio::test(flavor = "multi_thread")]
async fn corrupt_peer_is_detected_and_blacklisted() {
    skip_if_external!(SKIP);
    let size = 32 * MIB;
    let cluster = Cluster::start_with(1, "ingress_rate = \"16MiB\"\n").await;
    let blob = cluster.push_random_blob(size).await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let corrupt = CorruptPeer::start(&cluster, &blob, dir.path()).await;

    let fetched = tokio::time::timeout(Duration::from_secs(120), cluster.fetch(0, &blob))
        .await
        .expect("the pull did not finish in 120 s")
        .unwrap_or_else(|e| panic!("pull: {e}"));
    let rejected = cluster.agent_metric(0, "shoal_agent_pieces_rejected_total", &[]).await;
    let verified = cluster.agent_metric(0, "shoal_agent_pieces_verified_total", &[]).await;
    let served = corrupt.metrics.sent_bytes.get();
    println!(
        "pull {:.1} s; corrupt peer {} sent {:.1} MiB; agent rejected {rejected} pieces, verified {verified}",
        fetched.elapsed.as_secs_f64(),
        corrupt.addr,
        served as f64 / MIB as f64
    );
    assert_eq!(fetched.digest, blob.digest, "digest");
    assert!(served > 0, "the agent never asked the corrupt peer for a piece");
    assert!(rejected > 0.0, "the corrupt peer's pieces were not rejected");
    // Blacklisted after its first bad piece: it cannot have fed the agent all
    // along (it has every piece and is listed first).
    assert!(served < size, "the corrupt peer sent {served} bytes: it was never dropped");
}

/// With the tracker down, a pull through an agent still completes: metainfo
/// and bytes come straight from the origin.
#[tokio::test(flavor = "multi_thread")]
async fn tracker_down_pull_finishes_through_origin() {
    skip_if_external!(SKIP);
    let size = 24 * MIB;
    let mut cluster = Cluster::start(1).await;
    let blob = cluster.push_random_blob(size).await;
    cluster.kill_tracker();

    let fetched = tokio::time::timeout(Duration::from_secs(60), cluster.fetch(0, &blob))
        .await
        .expect("the pull did not finish in 60 s: it hangs on the dead tracker")
        .unwrap_or_else(|e| panic!("pull: {e}"));
    let from = cluster.agent_received(0).await;
    println!(
        "tracker down: pull {:.1} s, {:.1} MiB from origin HTTP, {:.1} MiB from peers",
        fetched.elapsed.as_secs_f64(),
        from.origin as f64 / MIB as f64,
        from.peer as f64 / MIB as f64
    );
    assert_eq!(fetched.digest, blob.digest, "digest");
    assert!(from.origin > 0, "no bytes came from the origin fallback");
}

/// An agent (ingress limited to 20 MiB/s) is SIGKILLed while pulling a 64 MiB
/// blob, after it has verified more than 30% of it, and restarted on the same
/// data directory. The second pull is exact, and the restarted agent receives
/// at most what it had not verified before the crash (plus one piece):
/// verified pieces survive a crash.
///
/// Download bitfields are persisted on a piece write once 500 ms have passed
/// and 8 MiB were verified since the last time (or 4 s have passed), so the
/// agent runs at least 700 ms and 9 MiB past the 30% mark before the kill:
/// everything counted at the mark is on disk by then.
#[tokio::test(flavor = "multi_thread")]
async fn restarted_agent_keeps_verified_pieces() {
    skip_if_external!(SKIP);
    let size = 64 * MIB;
    let mut cluster = Cluster::start_with(1, "ingress_rate = \"20MiB\"\n").await;
    let blob = cluster.push_random_blob(size).await;
    let piece = shoal_p2p::piece_length_for(size);

    let first = tokio::spawn(cluster.fetch(0, &blob));
    let mark = wait_for("the agent to verify 30% of the blob", Duration::from_secs(60), || async {
        received(&cluster, 0).await.filter(|&n| n * 10 > size * 3)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    wait_for("the agent to verify 9 MiB past the 30% mark", Duration::from_secs(60), || async {
        received(&cluster, 0).await.filter(|&n| n >= mark + 9 * MIB)
    })
    .await;
    let at_kill = received(&cluster, 0).await.unwrap_or(mark);
    assert!(at_kill < size, "the pull finished before the kill: the throttle did not hold ({at_kill} bytes)");
    cluster.kill_agent(0);
    let first = first.await.expect("pull task");
    assert!(first.is_err(), "the killed agent's pull cannot have finished: {first:?}");

    cluster.restart_agent(0).await;
    let fetched = tokio::time::timeout(Duration::from_secs(60), cluster.fetch(0, &blob))
        .await
        .expect("the pull after the restart did not finish in 60 s")
        .unwrap_or_else(|e| panic!("pull after the restart: {e}"));
    let after = cluster.agent_received(0).await.total();
    println!(
        "verified {:.1} MiB at the 30% mark, {:.1} MiB at the kill; received {:.1} MiB after the restart ({:.1} s)",
        mark as f64 / MIB as f64,
        at_kill as f64 / MIB as f64,
        after as f64 / MIB as f64,
        fetched.elapsed.as_secs_f64()
    );
    assert_eq!(fetched.digest, blob.digest, "digest after the restart");
    assert!(
        after <= size - mark + piece,
        "the restarted agent received {after} bytes of a {size}-byte blob, though {mark} bytes were \
         verified (and persisted) before the crash: verified pieces were fetched again"
    );
}

/// The agent lists a dead origin (a port nothing listens on) before the real
/// one. A pull through it (manifest by tag, then its config and layer) is
/// exact; the dead origin was tried, and only once: the agent sticks to the
/// origin that answered instead of paying for the dead one on every request.
#[tokio::test(flavor = "multi_thread")]
async fn agent_fails_over_from_a_dead_origin() {
    skip_if_external!(SKIP);
    let mut cluster = Cluster::start(0).await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let origins = format!("{dead},{}", cluster.origin.url());
    let agent = cluster.add_agent_with_origins("", &origins).await;

    let repo = unique_repo("failover");
    let image = cluster.origin.client().push_image(&repo, ImageKind::Oci, Some("v1"), 3 * MIB as usize).await;
    let through_agent = Client::new(&cluster.agent_url(agent));

    let manifest = through_agent.get_manifest(&repo, "v1").await;
    manifest.expect(StatusCode::OK);
    assert_eq!(sha256(&manifest.body), image.manifest.digest, "manifest digest");
    for blob in std::iter::once(&image.config).chain(&image.layers) {
        let reply = through_agent.get_blob(&repo, &blob.digest).await;
        reply.expect(StatusCode::OK);
        assert_eq!(sha256(&reply.body), blob.digest, "blob digest");
    }
    // Again, now from the agent's caches and the tag lookup at the origin.
    tokio::time::sleep(Duration::from_secs(3)).await;
    through_agent.get_manifest(&repo, "v1").await.expect(StatusCode::OK);

    let name = "shoal_agent_origin_failures_total";
    let dead_failures = cluster.agent_metric(agent, name, &[("origin", dead.as_str())]).await;
    let live_failures = cluster.agent_metric(agent, name, &[("origin", cluster.origin.url())]).await;
    let log = std::fs::read_to_string(cluster.agent(agent).log_path()).expect("read the agent's log");
    let logged = log.lines().filter(|l| l.contains("trying the next origin") && l.contains(&dead)).count();
    println!("dead origin {dead}: {dead_failures} failed attempts, {logged} log lines");
    assert_eq!(
        dead_failures, 1.0,
        "the dead origin must be tried exactly once (then the live one is sticky)"
    );
    assert_eq!(live_failures, 0.0, "the live origin never failed");
    assert_eq!(logged, 1, "the agent logs the failed attempt");
}

/// SIGTERM (a Kubernetes rollout) in the middle of a pull through an agent: `/readyz` answers
/// 503 at once while the agent drains; the pull in flight finishes within the shutdown
/// deadline or fails cleanly (never a wrong byte); the agent persists what it verified, tells
/// the tracker it left, and exits 0. Restarted, it resumes from its verified pieces.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_an_agent_and_keeps_its_verified_pieces() {
    skip_if_external!(SKIP);
    let size = 64 * MIB;
    let toml = "ingress_rate = \"16MiB\"\n[limits]\ndrain_delay = \"1s\"\nshutdown_timeout = \"1s\"\n";
    let mut cluster = Cluster::start_with(1, toml).await;
    let blob = cluster.push_random_blob(size).await;
    let piece = shoal_p2p::piece_length_for(size);
    let first = tokio::spawn(cluster.fetch(0, &blob));
    wait_for("the agent to verify 30% of the blob", Duration::from_secs(60), || async {
        received(&cluster, 0).await.filter(|&n| n * 10 > size * 3)
    })
    .await;
    let stopped_before = cluster
        .metric(&cluster.tracker.url(), "shoal_tracker_announces_total", &[("outcome", "stopped")])
        .await;
    cluster.agent_mut(0).terminate();
    // The signal is handled asynchronously: within the 1 s drain delay /readyz turns 503.
    let readyz = format!("{}/readyz", cluster.agent_url(0));
    let mut statuses = Vec::new();
    for _ in 0..18 {
        let status = reqwest::get(&readyz).await.map(|r| r.status().as_u16());
        statuses.push(status.as_ref().map_or(0, |s| *s));
        if status.is_ok_and(|s| s == 503) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(statuses.last(), Some(&503), "a draining agent answers /readyz with 503: {statuses:?}");
    let at_term = received(&cluster, 0).await.unwrap_or(0);
    let exit = cluster.agent_mut(0).wait_exit(Duration::from_secs(15)).await;
    assert!(exit.is_some_and(|s| s.success()), "the agent exits 0 after draining: {exit:?}");
    match first.await.expect("pull task") {
        Ok(fetched) => assert_eq!(fetched.digest, blob.digest, "a pull that finished is exact"),
        Err(why) => println!("the pull in flight failed cleanly: {why}"),
    }
    let stopped = cluster
        .metric(&cluster.tracker.url(), "shoal_tracker_announces_total", &[("outcome", "stopped")])
        .await;
    assert!(stopped > stopped_before, "the agent told the tracker it left");

    cluster.restart_agent(0).await;
    let fetched = tokio::time::timeout(Duration::from_secs(60), cluster.fetch(0, &blob))
        .await
        .expect("the pull after the restart did not finish in 60 s")
        .unwrap_or_else(|e| panic!("pull after the restart: {e}"));
    assert_eq!(fetched.digest, blob.digest);
    let after = cluster.agent_received(0).await.total();
    println!("verified {at_term} bytes at SIGTERM; received {after} after the restart");
    assert!(
        after <= size - at_term + piece,
        "pieces verified before SIGTERM were fetched again ({after} bytes)"
    );
}

/// What an origin deletes, agents stop serving within `confirm_ttl` (1 s here): a manifest
/// pulled by digest and a blob the agent holds in its cache answer 404 once the origin says
/// they are gone. Before, the agent's confirmations never expired: a leaked secret or a
/// vulnerable image deleted at the origin stayed pullable from every node that had served it.
#[tokio::test(flavor = "multi_thread")]
async fn what_the_origin_deletes_agents_stop_serving() {
    skip_if_external!(SKIP);
    let cluster = Cluster::start_with(1, "confirm_ttl = \"1s\"\n").await;
    let repo = unique_repo("deleted");
    let origin = cluster.origin.client();
    let image = origin.push_image(&repo, ImageKind::Oci, None, 2 * MIB as usize).await;
    let agent = Client::new(&cluster.agent_url(0));
    let (manifest, layer) = (&image.manifest.digest, &image.layers[0].digest);
    agent.get_manifest(&repo, manifest).await.expect(StatusCode::OK);
    agent.get_blob(&repo, layer).await.expect(StatusCode::OK);

    origin.delete(&format!("/v2/{repo}/manifests/{manifest}")).send().await.unwrap();
    origin.delete(&format!("/v2/{repo}/blobs/{layer}")).send().await.unwrap();
    origin.get_manifest(&repo, manifest).await.expect(StatusCode::NOT_FOUND);
    origin.head_blob(&repo, layer).await.expect(StatusCode::NOT_FOUND);
    // Within the TTL the agent may still answer from what the origin confirmed; after it, not.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    agent.get_manifest(&repo, manifest).await.expect(StatusCode::NOT_FOUND);
    agent.head_blob(&repo, layer).await.expect(StatusCode::NOT_FOUND);
    agent.get_blob(&repo, layer).await.expect(StatusCode::NOT_FOUND);
}

/// The origins go down (here the only one is killed): an image a node pulled before still
/// pulls from its agent by tag, as by digest, where the tag last pointed (a pod with
/// `imagePullPolicy: Always` resolves its tag at every start). Before, past `tag_ttl` (2 s)
/// the tag answered 503 while every byte of the image was on the node. A tag never resolved
/// there has nothing to fall back on.
#[tokio::test(flavor = "multi_thread")]
async fn a_pulled_image_still_pulls_by_tag_while_the_origins_are_down() {
    skip_if_external!(SKIP);
    let mut cluster = Cluster::start_with(1, "confirm_ttl = \"1s\"\n").await;
    let repo = unique_repo("outage");
    let origin = cluster.origin.client();
    let image = origin.push_image(&repo, ImageKind::Oci, Some("v1"), 2 * MIB as usize).await;
    origin.push_manifest(&repo, "v2", &image.manifest).await;
    let agent = Client::new(&cluster.agent_url(0));
    let pull = || async {
        let manifest = agent.get_manifest(&repo, "v1").await;
        manifest.expect(StatusCode::OK);
        assert_eq!(sha256(&manifest.body), image.manifest.digest, "manifest digest");
        for blob in std::iter::once(&image.config).chain(&image.layers) {
            let reply = agent.get_blob(&repo, &blob.digest).await;
            reply.expect(StatusCode::OK);
            assert_eq!(sha256(&reply.body), blob.digest, "blob digest");
        }
    };
    pull().await;
    // A tag the node resolved, then deleted at the origin and seen gone there, is not served
    // from memory through the outage.
    origin.push_manifest(&repo, "gone", &image.manifest).await;
    agent.get_manifest(&repo, "gone").await.expect(StatusCode::OK);
    origin.delete(&format!("/v2/{repo}/manifests/gone")).send().await.unwrap().error_for_status().unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    agent.get_manifest(&repo, "gone").await.expect(StatusCode::NOT_FOUND);
    cluster.origin.kill();
    // Past `tag_ttl` and `confirm_ttl`: the agent asks the origin, which does not answer.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    pull().await;
    agent.get_manifest(&repo, &image.manifest.digest).await.expect(StatusCode::OK);
    agent.get_manifest(&repo, "v2").await.expect(StatusCode::SERVICE_UNAVAILABLE);
    agent.get_manifest(&repo, "gone").await.expect(StatusCode::SERVICE_UNAVAILABLE);
}

/// Tag and catalog listings through an agent are the origin's pages: `n` items and a `Link`
/// whenever more follow, to the last item. The agent once decided "more follow" by counting
/// items, which cut a listing short wherever the origin capped or filtered a page.
#[tokio::test(flavor = "multi_thread")]
async fn listings_through_an_agent_follow_the_origins_pages() {
    skip_if_external!(SKIP);
    let cluster = Cluster::start(1).await;
    let repo = unique_repo("listing");
    let origin = cluster.origin.client();
    let image = origin.push_image(&repo, ImageKind::Oci, Some("t0"), 1024).await;
    let tags: Vec<String> = (0..5).map(|i| format!("t{i}")).collect();
    for tag in &tags[1..] {
        origin.push_manifest(&repo, tag, &image.manifest).await;
    }
    let agent = Client::new(&cluster.agent_url(0));
    let (mut seen, mut query) = (Vec::new(), "?n=2".to_string());
    loop {
        let reply = agent.tags(&repo, &query).await;
        reply.expect(StatusCode::OK);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        let page: Vec<String> =
            body["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().into()).collect();
        assert!(page.len() <= 2, "{page:?}");
        seen.extend(page.clone());
        let Some(link) = reply.header("link") else { break };
        assert!(link.contains(&format!("last={}", page.last().unwrap())), "{link}");
        query = format!("?n=2&last={}", page.last().unwrap());
    }
    assert_eq!(seen, tags);
}

/// An agent whose origins have never answered (a wrong URL, a TLS mistake) is not ready: it
/// answers every registry request with 503 until one does, and a rollout must stop at its
/// first pods rather than pass over the fleet. With its origin up it is ready at once.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_is_not_ready_until_an_origin_has_answered() {
    skip_if_external!(SKIP);
    let dir = tempfile::tempdir().expect("tempdir");
    let nowhere = format!("http://127.0.0.1:{}", shoal_integration::origin::free_port());
    let args: Vec<std::ffi::OsString> = vec![
        "agent".into(),
        "--peer-listen".into(),
        "127.0.0.1:0".into(),
        "--origin".into(),
        nowhere.clone().into(),
        "--tracker".into(),
        nowhere.into(),
        "--data-dir".into(),
        dir.path().join("data").into(),
    ];
    let agent =
        shoal_integration::cluster::Process::spawn("lone agent".into(), args, dir.path().join("agent.log"))
            .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let readyz = reqwest::get(format!("{}/readyz", agent.url())).await.expect("GET /readyz");
    assert_eq!(readyz.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(readyz.text().await.unwrap_or_default().contains("no origin has answered"));
    let v2 = reqwest::get(format!("{}/v2/", agent.url())).await.expect("GET /v2/");
    assert_eq!(v2.status(), StatusCode::SERVICE_UNAVAILABLE, "the registry it would be serving");

    let cluster = Cluster::start(1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = reqwest::get(format!("{}/readyz", cluster.agent_url(0))).await.map(|r| r.status());
        if status.as_ref().is_ok_and(|s| *s == StatusCode::OK) {
            break;
        }
        assert!(Instant::now() < deadline, "an agent with its origin up is not ready: {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A SIGTERM while an agent is still starting (here indexing 30,000 cached blobs) is handled,
/// not lost: the handler is in place before the listener is, and the agent stops cleanly
/// (exit 0) without serving. As PID 1 in a container a signal with no handler is ignored, and
/// the handlers came only once a server served: a pod deleted while starting waited out its
/// grace period, or started and served until killed.
#[test]
fn a_stop_during_a_slow_start_is_handled() {
    use std::io::Write as _;
    use std::os::unix::process::ExitStatusExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("data/cache/sha256");
    std::fs::create_dir_all(&cache).expect("cache dir");
    for i in 0..30_000u32 {
        let name = sha256(&i.to_le_bytes());
        let mut f =
            std::fs::File::create(cache.join(name.trim_start_matches("sha256:"))).expect("a cached blob");
        f.write_all(&i.to_le_bytes()).expect("write");
    }
    let port = free_port();
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let mut child = std::process::Command::new(shoal_integration::origin::shoal_binary())
        .args(["agent", "--listen", &format!("127.0.0.1:{port}"), "--peer-listen", "127.0.0.1:0"])
        .args(["--origin", &nowhere, "--tracker", &nowhere, "--data-dir"])
        .arg(dir.path().join("data"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start shoal agent");
    // SIGTERM is signal 15: bit 14 of the caught-signal mask.
    let catches_term = |pid: u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let mask = status.lines().find_map(|l| l.strip_prefix("SigCgt:")).unwrap_or("0").trim().to_string();
        u64::from_str_radix(&mask, 16).unwrap_or(0) & (1 << 14) != 0
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !catches_term(child.id()) {
        assert!(Instant::now() < deadline, "the agent never handled SIGTERM");
        assert!(child.try_wait().expect("wait").is_none(), "the agent exited while starting");
        std::thread::sleep(Duration::from_millis(1));
    }
    let listening = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
    // SAFETY: kill(2) with a pid this test spawned and has not reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent did not stop within 20 s of a SIGTERM while starting");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!listening, "the SIGTERM handler came only after the listener (a stop while starting was lost)");
    assert!(
        status.success(),
        "the agent was killed by the signal, not stopped: {status:?} {:?}",
        status.signal()
    );
}
