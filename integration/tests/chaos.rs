//! Chaos: nothing acknowledged is lost. A 3-origin cluster (R = 2), a tracker and two agents;
//! for `CHAOS_SECS` (default 20) seconds, at once: pushes through every origin, some of them
//! re-pushes that reuse the layers of a deleted image (the layer HEAD says it exists, so only
//! the manifest is put, exactly what `docker push` does), manifest deletes, garbage
//! collections, pulls through the agents, and SIGKILLs and restarts of origins (one down at a
//! time) and agents. Then everything is healed and repaired, and every acknowledged image that
//! was not deleted is read back through every origin and through an agent, every byte checked
//! against its digest. Lost must be 0.
//!
//! The same test is the chaos benchmark with a longer run:
//! `CHAOS_SECS=300 cargo test --release -p shoal-integration --test chaos -- --nocapture`
//! (see `integration/bench/chaos.sh`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_integration::cluster::Process;
const KIB: usize = 1024;
use shoal_integration::oci::{self, Blob};
use shoal_integration::origins::{
    random_size, try_pull_image, try_push_blob, try_put_manifest, ClusterSpec, OriginCluster, TestImage,
};
use shoal_integration::{skip_if_external, unique_repo, Client, SendExt, StatusCode};

const SKIP: &str = "starts its own origins, tracker and agents";
/// Default length of the fault window, in seconds.
const DEFAULT_CHAOS_SECS: u64 = 20;
/// Pushers running at once (each through an origin of its own).
const PUSHERS: usize = 3;

/// What the workload did, for the summary line.
#[derive(Default)]
struct Counters {
    pushes_acked: AtomicU64,
    pushes_failed: AtomicU64,
    repushes_acked: AtomicU64,
    deletes: AtomicU64,
    pulls_ok: AtomicU64,
    pulls_failed: AtomicU64,
    gcs_run: AtomicU64,
    gcs_refused: AtomicU64,
    kills: AtomicU64,
}

/// Acknowledged images by manifest digest; `None` once a delete was attempted (its outcome
/// may be either, so it is not checked).
type Ledger = Arc<Mutex<BTreeMap<String, Option<TestImage>>>>;

fn secs_from_env() -> u64 {
    std::env::var("CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_CHAOS_SECS)
}

/// Push every blob the origin does not already hold for `repo` (a HEAD first, as docker does),
/// then the manifest; `Ok` only on 201 for all.
async fn push_reusing(client: &Client, image: &TestImage) -> Result<(), String> {
    for blob in image.blobs() {
        let head = client.head(&format!("/v2/{}/blobs/{}", image.repo, blob.digest)).try_reply().await?;
        if head.status != StatusCode::OK {
            try_push_blob(client, &image.repo, blob).await?;
        }
    }
    try_put_manifest(client, image).await
}

/// One pusher: new images, and now and then a delete followed by a re-push of the deleted
/// image's layers under a new config, after a pause long enough for GC's grace to pass.
async fn pusher(me: usize, client: Client, ledger: Ledger, counters: Arc<Counters>, stop: Arc<AtomicBool>) {
    let repo = unique_repo(&format!("chaos{me}"));
    let mut round = 0u64;
    let mut deleted: Vec<Vec<Blob>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        round += 1;
        let tag = format!("r{round}");
        let reuse = round.is_multiple_of(4) && !deleted.is_empty();
        let image = if reuse {
            let layers = deleted.remove(0);
            TestImage::from_blobs(&repo, &tag, Blob::config(oci::OCI_CONFIG), layers)
        } else {
            TestImage::random(
                &repo,
                &tag,
                &[random_size(16 * KIB, 256 * KIB), random_size(16 * KIB, 128 * KIB)],
            )
        };
        match push_reusing(&client, &image).await {
            Ok(()) => {
                counters.pushes_acked.fetch_add(1, Ordering::SeqCst);
                if reuse {
                    counters.repushes_acked.fetch_add(1, Ordering::SeqCst);
                }
                let digest = image.manifest_digest().to_string();
                let layers: Vec<Blob> = image.image.layers.clone();
                ledger.lock().unwrap().insert(digest.clone(), Some(image));
                // Every third image is deleted again: its layers become garbage that a later
                // re-push (and GC) race over.
                if round.is_multiple_of(3) {
                    ledger.lock().unwrap().insert(digest.clone(), None);
                    let path = format!("/v2/{repo}/manifests/{digest}");
                    if client.delete(&path).try_reply().await.is_ok_and(|r| r.status == StatusCode::ACCEPTED)
                    {
                        counters.deletes.fetch_add(1, Ordering::SeqCst);
                        deleted.push(layers);
                    }
                }
            }
            Err(_) => {
                counters.pushes_failed.fetch_add(1, Ordering::SeqCst);
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Pulls random acknowledged images through the agents; failures while faults run are
/// counted, not fatal.
async fn puller(agents: Vec<Client>, ledger: Ledger, counters: Arc<Counters>, stop: Arc<AtomicBool>) {
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let pick = {
            let ledger = ledger.lock().unwrap();
            let live: Vec<&TestImage> = ledger.values().flatten().collect();
            (!live.is_empty()).then(|| live[n % live.len()].clone())
        };
        if let Some(image) = pick {
            match try_pull_image(&agents[n % agents.len()], &image).await {
                Ok(()) => counters.pulls_ok.fetch_add(1, Ordering::SeqCst),
                Err(_) => counters.pulls_failed.fetch_add(1, Ordering::SeqCst),
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_agent(index: usize, root: &std::path::Path, origins: &str, tracker: &str) -> Process {
    let dir = root.join(format!("agent-{index}"));
    std::fs::create_dir_all(dir.join("data")).expect("agent data dir");
    let config = dir.join("config.toml");
    std::fs::write(&config, "announce_interval = \"1s\"\n").expect("agent config");
    let args: Vec<OsString> = vec![
        "agent".into(),
        "--peer-listen".into(),
        "127.0.0.1:0".into(),
        "--origin".into(),
        origins.into(),
        "--tracker".into(),
        tracker.into(),
        "--data-dir".into(),
        dir.join("data").into(),
        "--config".into(),
        config.into(),
    ];
    Process::spawn(format!("shoal agent {index}"), args, dir.join("server.log")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_acknowledged_is_lost_under_chaos() {
    skip_if_external!(SKIP);
    let secs = secs_from_env();
    let spec = ClusterSpec::new(3).cluster("gc_grace = \"2s\"\ngc_quarantine = \"10s\"");
    let mut cluster = OriginCluster::start_cluster(spec).await;
    let root = tempfile::Builder::new().prefix("shoal-chaos-").tempdir().expect("temp dir");
    let origins: Vec<String> = (0..3).map(|i| cluster.url(i)).collect();
    let tracker = Process::spawn(
        "shoal tracker".into(),
        vec![
            "tracker".into(),
            "--origin".into(),
            origins.join(",").into(),
            "--announce-interval".into(),
            "1s".into(),
        ],
        root.path().join("tracker.log"),
    )
    .await;
    let mut agents = Vec::new();
    for i in 0..2 {
        agents.push(start_agent(i, root.path(), &origins.join(","), &tracker.url()).await);
    }

    let ledger: Ledger = Arc::default();
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for me in 0..PUSHERS {
        tasks.push(tokio::spawn(pusher(
            me,
            cluster.client(me % 3),
            ledger.clone(),
            counters.clone(),
            stop.clone(),
        )));
    }
    let agent_clients: Vec<Client> = agents.iter().map(|a| Client::new(&a.url())).collect();
    tasks.push(tokio::spawn(puller(agent_clients, ledger.clone(), counters.clone(), stop.clone())));

    // Faults: every ~4 s a crash of an origin (one down at a time, back 1-2 s later), and of an
    // agent in between; a GC asked of an origin whenever none is running (refused while a
    // member is down, so they run in the gaps between crashes).
    let started = Instant::now();
    let mut tick = 0u64;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
    let mut gc: Option<tokio::task::JoinHandle<bool>> = None;
    while started.elapsed() < Duration::from_secs(secs) {
        tick += 1;
        if gc.as_ref().is_none_or(|g| g.is_finished()) {
            if let Some(done) = gc.take() {
                let ran = done.await.unwrap_or(false);
                let counter = if ran { &counters.gcs_run } else { &counters.gcs_refused };
                counter.fetch_add(1, Ordering::SeqCst);
            }
            let (url, secret, http) =
                (cluster.url((tick as usize) % 3), cluster.secret().to_string(), http.clone());
            gc = Some(tokio::spawn(async move {
                let sent = http.post(format!("{url}/shoal/v1/admin/gc")).bearer_auth(secret).send().await;
                sent.is_ok_and(|r| r.status().is_success())
            }));
        }
        match tick % 4 {
            1 => {
                let victim = (tick as usize / 4) % 3;
                cluster.kill(victim);
                counters.kills.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(800 + 400 * (tick % 2))).await;
                cluster.start(victim).await;
            }
            3 => {
                let victim = (tick as usize / 4) % agents.len();
                agents[victim].kill();
                counters.kills.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                agents[victim].restart().await;
            }
            _ => tokio::time::sleep(Duration::from_millis(700)).await,
        }
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = t.await;
    }
    if let Some(done) = gc.take() {
        let ran = done.await.unwrap_or(false);
        let counter = if ran { &counters.gcs_run } else { &counters.gcs_refused };
        counter.fetch_add(1, Ordering::SeqCst);
    }

    // Heal: every process up, membership converged, repair until every queue is empty.
    for i in 0..3 {
        if !cluster.running().contains(&i) {
            cluster.start(i).await;
        }
    }
    cluster.wait_converged().await;
    for _ in 0..20 {
        for i in 0..3 {
            let _ = cluster.try_repair(i).await;
        }
        if cluster.metric_sum(&[0, 1, 2], "shoal_origin_repair_queue_length").await == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // One more collection on a whole cluster: it must not take anything acknowledged either.
    let final_gc = cluster.gc(0).await;
    println!("final gc: {final_gc:?}");

    let expected: Vec<TestImage> = ledger.lock().unwrap().values().flatten().cloned().collect();
    let mut lost = Vec::new();
    for image in &expected {
        for i in 0..3 {
            if let Err(why) = try_pull_image(&cluster.client(i), image).await {
                lost.push(format!("{} through origin {i}: {why}", image.name()));
            }
        }
        if let Err(why) = try_pull_image(&Client::new(&agents[0].url()), image).await {
            lost.push(format!("{} through agent 0: {why}", image.name()));
        }
    }
    let c = |a: &AtomicU64| a.load(Ordering::SeqCst);
    println!(
        "chaos: secs={secs} acknowledged={} (re-pushes of deleted layers {}) failed_pushes={} deletes={} \
         kills={} gcs_run={} gcs_refused={} pulls_ok={} pulls_failed_during_faults={} checked={} lost={}",
        c(&counters.pushes_acked),
        c(&counters.repushes_acked),
        c(&counters.pushes_failed),
        c(&counters.deletes),
        c(&counters.kills),
        c(&counters.gcs_run),
        c(&counters.gcs_refused),
        c(&counters.pulls_ok),
        c(&counters.pulls_failed),
        expected.len(),
        lost.len()
    );
    assert!(c(&counters.pushes_acked) >= 10, "the workload ran");
    if !lost.is_empty() {
        cluster.fail(&format!("{} acknowledged reads failed:\n{}", lost.len(), lost.join("\n")));
    }
    drop(tracker);
}
