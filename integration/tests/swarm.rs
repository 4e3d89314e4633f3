//! The swarm at work: many agents pulling the same blob at once share it among
//! themselves instead of each taking it from the origin, and a small agent
//! cache evicts while it serves.
//!
//! Each test starts its own origin, tracker and agents ([`Cluster`]) on
//! loopback; the fault tests (kills, a corrupt peer, a dead tracker, restarts)
//! are in `swarm_faults.rs`.

use std::time::{Duration, Instant};

use shoal_integration::cluster::{Cluster, Fetched};
use shoal_integration::skip_if_external;

const MIB: u64 = 1024 * 1024;

/// Eight agents ask for one 256 MiB blob at the same moment. Every copy is
/// exact, and the origin sends at most two blob-sizes in all (pieces to peers
/// plus HTTP fallback): the agents fed each other.
#[tokio::test(flavor = "multi_thread")]
async fn eight_agents_pull_one_256mib_blob_at_once() {
    skip_if_external!("the swarm tests start their own origin, tracker and agents");
    const AGENTS: usize = 8;
    let size = 256 * MIB;
    let cluster = Cluster::start(AGENTS).await;
    let blob = cluster.push_random_blob(size).await;
    let before = cluster.origin_egress().await;

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(AGENTS));
    let started = Instant::now();
    let pulls: Vec<_> = (0..AGENTS)
        .map(|i| {
            let fetch = cluster.fetch(i, &blob);
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                fetch.await
            })
        })
        .collect();
    let mut results: Vec<Fetched> = Vec::new();
    for (i, pull) in pulls.into_iter().enumerate() {
        let fetched = tokio::time::timeout(Duration::from_secs(300), pull)
            .await
            .unwrap_or_else(|_| panic!("agent {i}: the pull did not finish in 300 s"))
            .expect("pull task")
            .unwrap_or_else(|e| panic!("agent {i}: {e}"));
        results.push(fetched);
    }
    let wall = started.elapsed();
    let egress = cluster.origin_egress().await.since(&before);

    println!("8 agents x {} MiB: all done in {:.1} s", size / MIB, wall.as_secs_f64());
    for (i, fetched) in results.iter().enumerate() {
        let received = cluster.agent_received(i).await;
        let sent = cluster.agent_metric(i, "shoal_agent_peer_sent_bytes_total", &[]).await;
        println!(
            "  agent {i}: {:.1} s, received {:.1} MiB from peers + {:.1} MiB from origin HTTP, sent {:.1} MiB to peers",
            fetched.elapsed.as_secs_f64(),
            received.peer as f64 / MIB as f64,
            received.origin as f64 / MIB as f64,
            sent / MIB as f64,
        );
    }
    let ratio = egress.total() as f64 / size as f64;
    println!(
        "  origin egress: {:.1} MiB pieces + {:.1} MiB HTTP = {:.2} x blob size",
        egress.peer as f64 / MIB as f64,
        egress.http as f64 / MIB as f64,
        ratio
    );

    for (i, fetched) in results.iter().enumerate() {
        assert_eq!(fetched.bytes, size, "agent {i}: length");
        assert_eq!(fetched.digest, blob.digest, "agent {i}: digest");
    }
    assert!(
        egress.total() <= 2 * size,
        "the origin sent {} bytes ({ratio:.2} x the blob: {} as pieces, {} over HTTP); \
         the swarm should carry all but 2 x",
        egress.total(),
        egress.peer,
        egress.http
    );
}

/// An agent with a 40 MiB cache (low watermark 20 MiB) pulls three 20 MiB
/// blobs one after another while a slow client reads a fourth. Every pull is
/// exact, the cache evicted (even the blob still being read, whose open file
/// keeps serving), and ends at or below its high watermark.
#[tokio::test(flavor = "multi_thread")]
async fn cache_eviction_under_small_cache_while_pulling() {
    skip_if_external!("the swarm tests start their own origin, tracker and agents");
    let high = 40 * MIB;
    let cluster =
        Cluster::start_with(1, "cache_high_watermark = \"40MiB\"\ncache_low_watermark = \"20MiB\"\n").await;
    let mut blobs = Vec::new();
    for _ in 0..4 {
        blobs.push(cluster.push_random_blob(20 * MIB).await);
    }

    // The slow reader takes about 6 s for its 20 MiB, overlapping the other three pulls.
    let slow = tokio::spawn(cluster.fetch_throttled(0, &blobs[3], 20 * MIB / 6));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, blob) in blobs[..3].iter().enumerate() {
        let fetched = tokio::time::timeout(Duration::from_secs(60), cluster.fetch(0, blob))
            .await
            .unwrap_or_else(|_| panic!("blob {i}: the pull did not finish in 60 s"))
            .unwrap_or_else(|e| panic!("blob {i}: {e}"));
        assert_eq!(fetched.digest, blob.digest, "blob {i}: digest");
        println!("blob {i}: {:.1} s", fetched.elapsed.as_secs_f64());
    }
    let fetched = tokio::time::timeout(Duration::from_secs(60), slow)
        .await
        .expect("the slow pull did not finish in 60 s")
        .expect("slow pull task")
        .unwrap_or_else(|e| panic!("slow pull: {e}"));
    assert_eq!(fetched.digest, blobs[3].digest, "slow pull: digest");
    println!("slow pull: {:.1} s", fetched.elapsed.as_secs_f64());

    let evictions = cluster.agent_metric(0, "shoal_agent_cache_evictions_total", &[]).await;
    let cached = cluster.agent_metric(0, "shoal_agent_cache_bytes", &[]).await;
    println!("evictions: {evictions}, cache: {:.1} MiB", cached / MIB as f64);
    assert!(evictions > 0.0, "80 MiB through a 40 MiB cache evicted nothing");
    assert!(cached <= high as f64, "cache holds {cached} bytes, above its 40 MiB high watermark");
}
