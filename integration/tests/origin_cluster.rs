//! The origin cluster: three or four real `shoal origin` processes that place every blob
//! and every repository on R = 2 of them. Any origin answers any request the same way; a
//! crashed origin loses nothing; a new origin receives exactly the blobs it now owns; a
//! rolling restart never fails a pull of a committed image; GC removes only unreferenced
//! blobs and spares a push still in flight; the internal API refuses strangers and bad
//! content.
//!
//! Placement is checked on disk against the origins' own rendezvous hashing
//! (`shoal_origin::cluster::placement`), so "exactly its owners" is an exact set, not a
//! ratio. Each test starts its own cluster ([`OriginCluster`]) on loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_integration::api::{parse_upload_range, with_query, SendExt};
use shoal_integration::oci::{self, Blob};
use shoal_integration::origins::{
    random_size, try_pull_blob, try_pull_image, try_push_blob, try_push_image, try_put_manifest, ClusterSpec,
    OriginCluster, TestImage, ADMIN_PREFIX, INTERNAL_PREFIX,
};
use shoal_integration::{random_bytes, sha256, skip_if_external, unique_repo, Client, Method, StatusCode};
use tokio::sync::RwLock;

#[path = "origin_cluster/clocks.rs"]
mod clocks;

const SKIP: &str = "the origin cluster tests start their own origins";
const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// Repair of a few dozen small blobs takes a pass or two; this is a generous bound.
const REPAIR_LIMIT: Duration = Duration::from_secs(60);

/// 2 or 3 layer sizes between 64 KiB and 2 MiB.
fn layer_sizes() -> Vec<usize> {
    (0..random_size(2, 3)).map(|_| random_size(64 * KIB, 2 * MIB)).collect()
}

/// Every config and layer digest of `images`, once each, sorted.
fn blob_digests(images: &[TestImage]) -> Vec<String> {
    let set: BTreeSet<String> = images.iter().flat_map(TestImage::blob_digests).collect();
    set.into_iter().collect()
}

async fn push_through(cluster: &OriginCluster, origin: usize, image: &TestImage) {
    let result = try_push_image(&cluster.client(origin), image).await;
    cluster.check(result, &format!("push of {} through origin {origin}", image.name()));
}

/// Pulls every image (manifest by tag, then every blob, digests verified) through every
/// origin in `through`.
async fn pull_all(cluster: &OriginCluster, images: &[TestImage], through: &[usize]) {
    for &origin in through {
        let client = cluster.client(origin);
        for image in images {
            let result = try_pull_image(&client, image).await;
            cluster.check(result, &format!("pull of {} through origin {origin}", image.name()));
        }
    }
}

/// The tags of `repo` as origin `origin` lists them, sorted.
async fn tags(cluster: &OriginCluster, origin: usize, repo: &str) -> Vec<String> {
    let reply = cluster.client(origin).tags(repo, "").await;
    let mut tags: Vec<String> = reply.json()["tags"]
        .as_array()
        .unwrap_or_else(|| cluster.fail(&format!("no tags array: {}", reply.describe())))
        .iter()
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect();
    tags.sort();
    tags
}

/// Every origin in `through` lists exactly the pushed tags of every repository, and a
/// catalog of exactly these repositories (each test has a cluster of its own).
async fn assert_same_listings(cluster: &OriginCluster, images: &[TestImage], through: &[usize]) {
    let mut want: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for image in images {
        want.entry(&image.repo).or_default().push(image.tag.clone());
    }
    for tags in want.values_mut() {
        tags.sort();
    }
    let want_catalog: Vec<String> = want.keys().map(|r| r.to_string()).collect();
    for &origin in through {
        let mut catalog = cluster.client(origin).catalog().await;
        catalog.sort();
        if catalog != want_catalog {
            cluster.fail(&format!("origin {origin}: _catalog {catalog:?}, want {want_catalog:?}"));
        }
        for (repo, want_tags) in &want {
            let got = tags(cluster, origin, repo).await;
            if &got != want_tags {
                cluster.fail(&format!("origin {origin}: tags of {repo} {got:?}, want {want_tags:?}"));
            }
        }
    }
}

/// Six images (2-3 random layers of 64 KiB-2 MiB each) in three repositories, each pushed
/// through a different origin than its neighbour. Every origin serves every image and the
/// same tags and catalog, and every config and layer is on disk on exactly its two owners:
/// right after the pushes (the origin that took an upload it does not own kept no copy) and
/// after every origin served every blob (serving a blob it does not own leaves no copy).
#[tokio::test(flavor = "multi_thread")]
async fn three_origins_two_replicas() {
    skip_if_external!(SKIP);
    let cluster = OriginCluster::start_n(3).await;
    let all = [0, 1, 2];
    let repos: Vec<String> = (0..3).map(|_| unique_repo("cluster")).collect();
    let mut images = Vec::new();
    for n in 0..6 {
        let image = TestImage::random(&repos[n % 3], &format!("v{n}"), &layer_sizes());
        // Origins 0 1 2 1 2 0: every repository is pushed through two different origins.
        push_through(&cluster, (n + n / 3) % 3, &image).await;
        images.push(image);
    }
    let digests = blob_digests(&images);
    cluster.assert_placed(&digests, &all, "right after the pushes");

    pull_all(&cluster, &images, &all).await;
    assert_same_listings(&cluster, &images, &all).await;
    cluster.assert_placed(&digests, &all, "after every origin served every image");
}

/// Four images are pushed, then origin 1 is SIGKILLed. Once the others have noticed, every
/// image is still pulled through origins 0 and 2, and four new images are pushed through
/// them. Origin 1 restarts on its data; repair then puts every blob, old and new, on exactly
/// its two owners among all three, and every origin serves every image and tag.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_loses_nothing() {
    skip_if_external!(SKIP);
    let mut cluster = OriginCluster::start_n(3).await;
    let all = [0, 1, 2];
    let survivors = [0, 2];
    let repos: Vec<String> = (0..2).map(|_| unique_repo("crash")).collect();
    let mut images = Vec::new();
    for n in 0..4 {
        let image = TestImage::random(&repos[n % 2], &format!("before{n}"), &layer_sizes());
        push_through(&cluster, n % 3, &image).await;
        images.push(image);
    }
    cluster.assert_placed(&blob_digests(&images), &all, "before the crash");

    cluster.kill(1);
    for origin in survivors {
        cluster.wait_sees(origin, 1, false).await;
    }
    pull_all(&cluster, &images, &survivors).await;
    for n in 0..4 {
        let image = TestImage::random(&repos[n % 2], &format!("after{n}"), &layer_sizes());
        push_through(&cluster, survivors[n % 2], &image).await;
        images.push(image);
    }
    pull_all(&cluster, &images, &survivors).await;

    cluster.start(1).await;
    cluster.wait_converged().await;
    cluster.repair_until_placed(&blob_digests(&images), &all, REPAIR_LIMIT).await;
    pull_all(&cluster, &images, &all).await;
    assert_same_listings(&cluster, &images, &all).await;
}

/// Three origins run with a member list of four; the fourth is listed but not started, so
/// health checks mark it down. 40 blobs in four repositories end up on their two owners
/// among the three. Then the fourth starts and repair runs until placement is stable: the
/// fourth holds exactly the blobs whose owners among four include it, the repair counters
/// of the cluster grew by exactly that many copies (and bytes), the same number of surplus
/// copies were removed, and every blob is on exactly its two owners among four and served
/// by every origin.
#[tokio::test(flavor = "multi_thread")]
async fn fourth_origin_gets_its_share() {
    skip_if_external!(SKIP);
    let mut cluster = OriginCluster::start_cluster(ClusterSpec::new(4).running(3)).await;
    let live = [0, 1, 2];
    let all = [0, 1, 2, 3];
    let repos: Vec<String> = (0..4).map(|_| unique_repo("join")).collect();
    let mut blobs: Vec<(String, Blob)> = Vec::new();
    for n in 0..40 {
        let blob = Blob::random_layer(oci::OCI_LAYER, random_size(16 * KIB, 256 * KIB));
        let repo = &repos[n % 4];
        let result = try_push_blob(&cluster.client(n % 3), repo, &blob).await;
        cluster.check(result, &format!("push of blob {n} through origin {}", n % 3));
        blobs.push((repo.clone(), blob));
    }
    let digests: Vec<String> = blobs.iter().map(|(_, b)| b.digest.clone()).collect();
    cluster.repair_until_placed(&digests, &live, REPAIR_LIMIT).await;

    const COPIED: &str = "shoal_origin_repair_copied_blobs_total";
    const COPIED_BYTES: &str = "shoal_origin_repair_copied_bytes_total";
    const REMOVED: &str = "shoal_origin_repair_removed_blobs_total";
    let copied_before = cluster.metric_sum(&live, COPIED).await;
    let bytes_before = cluster.metric_sum(&live, COPIED_BYTES).await;
    let removed_before = cluster.metric_sum(&live, REMOVED).await;

    cluster.start(3).await;
    cluster.wait_converged().await;
    cluster.repair_until_placed(&digests, &all, REPAIR_LIMIT).await;
    // Stable: another pass anywhere finds nothing to copy or remove.
    for origin in all {
        let report = cluster.repair(origin).await;
        if report.copied_blobs != 0 || report.removed_blobs != 0 || report.failures != 0 {
            cluster.fail(&format!("origin {origin}: a repair pass after placement was reached: {report:?}"));
        }
    }

    let want: BTreeSet<&str> =
        digests.iter().filter(|d| cluster.owners(d, &all).contains(&3)).map(String::as_str).collect();
    let got: BTreeSet<&str> =
        digests.iter().filter(|d| cluster.blob_on_disk(3, d)).map(String::as_str).collect();
    if got != want {
        cluster.fail(&format!("the fourth origin holds {got:?}, but owns {want:?}"));
    }
    let want_bytes: usize =
        blobs.iter().filter(|(_, b)| want.contains(b.digest.as_str())).map(|(_, b)| b.data.len()).sum();
    println!("{} of {} blobs moved to the fourth origin ({want_bytes} bytes)", want.len(), digests.len());

    let copied = cluster.metric_sum(&all, COPIED).await - copied_before;
    let bytes = cluster.metric_sum(&all, COPIED_BYTES).await - bytes_before;
    let removed = cluster.metric_sum(&all, REMOVED).await - removed_before;
    if copied != want.len() as f64 || bytes != want_bytes as f64 || removed != want.len() as f64 {
        cluster.fail(&format!(
            "repair counters grew by {copied} copies, {bytes} bytes, {removed} removals; want {} copies, \
             {want_bytes} bytes, {} removals",
            want.len(),
            want.len()
        ));
    }

    for origin in all {
        let client = cluster.client(origin);
        for (repo, blob) in &blobs {
            let result = try_pull_blob(&client, repo, &blob.digest).await;
            cluster.check(result, &format!("blob {} through origin {origin}", blob.digest));
        }
    }
}

/// What the client loop of [`rolling_restart_keeps_every_image`] did.
#[derive(Default)]
struct Load {
    committed: Vec<TestImage>,
    pulls: usize,
    pull_failures: Vec<String>,
    push_retries: usize,
    push_failures: Vec<String>,
}

/// How long the client loop retries one push before it counts as failed.
const PUSH_RETRY_LIMIT: Duration = Duration::from_secs(30);

/// Picks the next origin, round robin, whose gate is open (not being restarted), and holds
/// its gate (a read lock) for as long as the guard lives.
fn pick<'a>(
    gates: &'a [RwLock<()>],
    next: &mut usize,
) -> Option<(usize, tokio::sync::RwLockReadGuard<'a, ()>)> {
    for _ in 0..gates.len() {
        let origin = *next % gates.len();
        *next += 1;
        if let Ok(guard) = gates[origin].try_read() {
            return Some((origin, guard));
        }
    }
    None
}

/// Pushes new images and pulls committed ones until `stop`, only through origins whose gate
/// is open. A push is retried (through the next origin) until it succeeds; an image counts
/// as committed once its manifest PUT returned 201, and from then on every pull of it must
/// succeed.
async fn client_loop(
    urls: Vec<String>,
    gates: Arc<Vec<RwLock<()>>>,
    stop: Arc<AtomicBool>,
    load: Arc<Mutex<Load>>,
) {
    let clients: Vec<Client> = urls.iter().map(|u| Client::new(u)).collect();
    let repo = unique_repo("rolling");
    let mut next = 0;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let image = TestImage::random(&repo, &format!("r{n}"), &[random_size(64 * KIB, 256 * KIB); 2]);
        n += 1;
        let deadline = Instant::now() + PUSH_RETRY_LIMIT;
        loop {
            let result = match pick(&gates, &mut next) {
                Some((origin, _gate)) => try_push_image(&clients[origin], &image)
                    .await
                    .map_err(|e| format!("origin {origin}: {e}")),
                None => Err("every origin is being restarted".to_string()),
            };
            match result {
                Ok(()) => {
                    load.lock().unwrap().committed.push(image.clone());
                    break;
                }
                Err(e) if Instant::now() >= deadline => {
                    load.lock().unwrap().push_failures.push(format!("{}: {e}", image.name()));
                    break;
                }
                Err(_) => {
                    load.lock().unwrap().push_retries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // The newest committed image and two older ones in turn, so every image is pulled
        // again and again while the origins come and go.
        let picks: Vec<TestImage> = {
            let load = load.lock().unwrap();
            let count = load.committed.len();
            [count.checked_sub(1), (count > 0).then(|| n % count), (count > 0).then(|| (n * 7 + 3) % count)]
                .into_iter()
                .flatten()
                .map(|i| load.committed[i].clone())
                .collect()
        };
        for image in picks {
            let Some((origin, _gate)) = pick(&gates, &mut next) else { continue };
            let result = try_pull_image(&clients[origin], &image).await;
            let mut load = load.lock().unwrap();
            load.pulls += 1;
            if let Err(e) = result {
                load.pull_failures.push(format!("{} through origin {origin}: {e}", image.name()));
            }
        }
    }
}

/// Waits until the client loop has committed `at_least` images.
async fn wait_commits(cluster: &OriginCluster, load: &Mutex<Load>, at_least: usize, what: &str) {
    cluster
        .wait_for(what, PUSH_RETRY_LIMIT, || async {
            let n = load.lock().unwrap().committed.len();
            if n >= at_least {
                Ok(())
            } else {
                Err(format!("{n} committed"))
            }
        })
        .await
}

/// A client loop pushes new images and pulls committed ones through whichever origins are
/// not being restarted, while origins 0, 1 and 2 are restarted one at a time (SIGTERM,
/// start, every origin sees every other up, then the loop commits two more images with all
/// three up). Pushes may be retried; a pull of a committed image never fails. At the end
/// every blob is on its owners after repair, and every committed image and tag is served by
/// every origin.
#[tokio::test(flavor = "multi_thread")]
async fn rolling_restart_keeps_every_image() {
    skip_if_external!(SKIP);
    let mut cluster = OriginCluster::start_n(3).await;
    let all = [0, 1, 2];
    let gates: Arc<Vec<RwLock<()>>> = Arc::new(all.iter().map(|_| RwLock::new(())).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Mutex::new(Load::default()));
    let urls: Vec<String> = all.iter().map(|&i| cluster.url(i)).collect();
    let task = tokio::spawn(client_loop(urls, gates.clone(), stop.clone(), load.clone()));

    let committed = || load.lock().unwrap().committed.len();
    wait_commits(&cluster, &load, 3, "the client loop to commit 3 images").await;

    for origin in all {
        let before = committed();
        {
            // Waits for the loop's requests through this origin to finish; new ones go elsewhere.
            let _gate = gates[origin].write().await;
            cluster.stop(origin).await;
            cluster.start(origin).await;
            cluster.wait_converged().await;
        }
        let during = committed() - before;
        println!("origin {origin} restarted; {during} images committed meanwhile");
        let what = format!("two commits after origin {origin} came back");
        wait_commits(&cluster, &load, committed() + 2, &what).await;
    }
    stop.store(true, Ordering::Relaxed);
    cluster
        .check(
            tokio::time::timeout(Duration::from_secs(120), task)
                .await
                .map_err(|_| "did not stop".to_string()),
            "the client loop",
        )
        .expect("client loop task");

    let load = std::mem::take(&mut *load.lock().unwrap());
    println!(
        "{} images committed, {} pulls, {} push retries",
        load.committed.len(),
        load.pulls,
        load.push_retries
    );
    if !load.pull_failures.is_empty() || !load.push_failures.is_empty() {
        cluster.fail(&format!(
            "{} of {} pulls of committed images failed:\n{}\n{} pushes never succeeded:\n{}",
            load.pull_failures.len(),
            load.pulls,
            load.pull_failures.join("\n"),
            load.push_failures.len(),
            load.push_failures.join("\n")
        ));
    }

    cluster.repair_until_placed(&blob_digests(&load.committed), &all, REPAIR_LIMIT).await;
    pull_all(&cluster, &load.committed, &all).await;
    let repo = &load.committed[0].repo;
    for origin in all {
        let listed: BTreeSet<String> = tags(&cluster, origin, repo).await.into_iter().collect();
        let missing: Vec<&str> =
            load.committed.iter().map(|i| i.tag.as_str()).filter(|t| !listed.contains(*t)).collect();
        if !missing.is_empty() {
            cluster.fail(&format!("origin {origin} does not list committed tags {missing:?}"));
        }
    }
}

/// `DELETE /v2/<repo>/manifests/<digest>` through `origin`; the spec answers 202.
async fn delete_manifest(cluster: &OriginCluster, origin: usize, image: &TestImage) {
    let path = format!("/v2/{}/manifests/{}", image.repo, image.manifest_digest());
    cluster.client(origin).delete(&path).reply().await.expect(StatusCode::ACCEPTED);
}

/// A repository whose manifests take more than one internal answer (34 manifests of 4 MiB
/// of JSON whitespace, 8 MiB each as records, 272 MiB in all against the 256 MiB a caller
/// reads at once): garbage collection's scan reads them page by page from the other origin
/// and completes, keeping the blobs they use and sweeping an unreferenced one. Before paging,
/// every collection failed on such a repository until its manifests were deleted.
#[tokio::test(flavor = "multi_thread")]
async fn gc_pages_a_repository_larger_than_one_answer() {
    skip_if_external!(SKIP);
    let cluster = OriginCluster::start_cluster(
        ClusterSpec::new(2).cluster("gc_grace = \"0s\"\ngc_quarantine = \"10s\""),
    )
    .await;
    let repo = unique_repo("gc-pages");
    let client = cluster.client(0);
    let (config, layer) = (Blob::config(oci::OCI_CONFIG), Blob::random_layer(oci::OCI_LAYER, 64 * KIB));
    client.push_blob(&repo, &config.data).await;
    client.push_blob(&repo, &layer.data).await;
    let orphan = client.push_blob(&repo, &random_bytes(32 * KIB)).await;
    let started = Instant::now();
    let mut last = None;
    for i in 0..34 {
        let mut value = oci::image_manifest_value(oci::OCI_MANIFEST, &config, std::slice::from_ref(&layer));
        value["annotations"] = oci::annotations_value(&[("test.n", &i.to_string())]);
        let mut bytes = serde_json::to_vec(&value).expect("manifest JSON");
        bytes.resize(4 * MIB - 4 * KIB, b'\n');
        let manifest = oci::Manifest::from_bytes(oci::OCI_MANIFEST, bytes);
        client.push_manifest(&repo, &manifest.digest, &manifest).await;
        last = Some(manifest);
    }
    println!("34 manifests of 4 MiB pushed in {:?}", started.elapsed());

    let started = Instant::now();
    let report = cluster.gc(0).await;
    println!("gc in {:?}: {report:?}", started.elapsed());
    if !cluster.holders(&orphan).is_empty() {
        cluster.fail(&format!(
            "the unreferenced blob {orphan} is still on origins {:?}",
            cluster.holders(&orphan)
        ));
    }
    cluster.assert_placed(&[config.digest.clone(), layer.digest.clone()], &[0, 1], "after gc");
    let last = last.expect("a manifest");
    for origin in [0, 1] {
        let got = cluster.client(origin).get_manifest(&repo, &last.digest).await;
        got.expect(StatusCode::OK);
        assert_eq!(got.body.len(), last.bytes.len(), "manifest through origin {origin}");
    }
}

/// With no grace period: image A (layers L1, L2) and image B (L2, L3) share a repository; A's
/// manifest is deleted by digest and GC runs from one origin. A's config and L1 (referenced
/// by nothing now) are gone from every disk; B's config, L2 and L3 are still on exactly
/// their owners; B is served in full by every origin; A's manifest, tag and L1 are 404
/// everywhere. Throughout the GC a tracker asks every origin who seeds A's blobs (as it does
/// for each announce of agents still holding them): that is no use of the blobs, and does not
/// bring them back from quarantine.
#[tokio::test(flavor = "multi_thread")]
async fn gc_removes_unreferenced_blobs() {
    skip_if_external!(SKIP);
    let cluster = OriginCluster::start_cluster(
        ClusterSpec::new(3).cluster("gc_grace = \"0s\"\ngc_quarantine = \"10s\""),
    )
    .await;
    let all = [0, 1, 2];
    let repo = unique_repo("gc");
    let layer = || Blob::random_layer(oci::OCI_LAYER, random_size(64 * KIB, 512 * KIB));
    let (l1, l2, l3) = (layer(), layer(), layer());
    let a = TestImage::from_blobs(&repo, "a", Blob::config(oci::OCI_CONFIG), vec![l1.clone(), l2.clone()]);
    let b = TestImage::from_blobs(&repo, "b", Blob::config(oci::OCI_CONFIG), vec![l2, l3]);
    push_through(&cluster, 0, &a).await;
    push_through(&cluster, 1, &b).await;
    delete_manifest(&cluster, 2, &a).await;

    let asking = {
        let urls: Vec<String> = all
            .iter()
            .flat_map(|&i| {
                [&a.image.config, &l1]
                    .map(|b| format!("{}/shoal/v1/blobs/{}/locations", cluster.url(i), b.digest))
            })
            .collect();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut answered = 0;
            for _ in 0..400 {
                for url in &urls {
                    if let Ok(reply) = http.get(url).send().await {
                        assert_eq!(reply.status(), StatusCode::OK, "{url}");
                        answered += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answered
        })
    };
    let report = cluster.gc(0).await;
    assert!(!asking.is_finished(), "the locations questions ended early: {:?}", asking.await);
    asking.abort();
    println!("gc: {report:?}");
    let garbage = [&a.image.config, &l1];
    for blob in garbage {
        let held = cluster.holders(&blob.digest);
        if !held.is_empty() {
            cluster.fail(&format!("unreferenced blob {} is still on origins {held:?}", blob.digest));
        }
    }
    cluster.assert_placed(&b.blob_digests(), &all, "after gc");
    let garbage_bytes = (a.image.config.data.len() + l1.data.len()) as u64;
    if report.swept_blobs < 2 || report.swept_bytes < garbage_bytes || report.marked_blobs < 3 {
        cluster.fail(&format!("gc report {report:?}: want ≥ 2 swept ({garbage_bytes} bytes), ≥ 3 marked"));
    }
    let swept = cluster.metric_sum(&all, "shoal_origin_gc_swept_blobs_total").await;
    if swept < 2.0 {
        cluster.fail(&format!("shoal_origin_gc_swept_blobs_total sums to {swept} over the cluster"));
    }

    // The collection's member list reaches every origin (the leader's health replies) and is
    // kept in its data directory: a later collection counts the origins missing since.
    let ids: BTreeSet<String> = cluster.ids().into_iter().collect();
    for origin in all {
        let path = cluster.data_dir(origin).join(shoal_origin::cluster::collected::FILE_NAME);
        let kept = cluster
            .wait_for(
                &format!("origin {origin} keeps the collection's member list"),
                Duration::from_secs(10),
                || {
                    let path = path.clone();
                    async move {
                        let bytes = std::fs::read(&path).map_err(|e| e.to_string())?;
                        serde_json::from_slice::<shoal_origin::cluster::collected::LastCollection>(&bytes)
                            .map_err(|e| e.to_string())
                    }
                },
            )
            .await;
        assert_eq!(kept.members, ids, "origin {origin}");
    }

    pull_all(&cluster, std::slice::from_ref(&b), &all).await;
    for origin in all {
        let client = cluster.client(origin);
        client.get_manifest(&repo, a.manifest_digest()).await.expect(StatusCode::NOT_FOUND);
        client.get_manifest(&repo, "a").await.expect(StatusCode::NOT_FOUND);
        client.get_blob(&repo, &l1.digest).await.expect(StatusCode::NOT_FOUND);
    }
}

/// With a 5 s grace period: an old image is pushed and its manifest deleted, and the grace
/// period passes. Then the blobs of image C are uploaded (referenced by no manifest yet) and
/// GC runs: the old image's blobs are swept, C's are not, so C's manifest PUT that follows
/// succeeds and C is served by every origin.
#[tokio::test(flavor = "multi_thread")]
async fn gc_spares_a_racing_push() {
    skip_if_external!(SKIP);
    const GRACE: Duration = Duration::from_secs(5);
    let cluster = OriginCluster::start_cluster(
        ClusterSpec::new(3).cluster("gc_grace = \"5s\"\ngc_quarantine = \"10s\""),
    )
    .await;
    let all = [0, 1, 2];
    let repo = unique_repo("gcrace");
    let old = TestImage::random(&repo, "old", &[random_size(64 * KIB, 512 * KIB)]);
    push_through(&cluster, 0, &old).await;
    delete_manifest(&cluster, 0, &old).await;
    // Wall-clock time is what the grace period measures: let it pass for the old blobs.
    tokio::time::sleep(GRACE + Duration::from_secs(1)).await;

    let c = TestImage::random(&repo, "c", &[random_size(64 * KIB, 512 * KIB); 2]);
    for blob in c.blobs() {
        let result = try_push_blob(&cluster.client(1), &repo, blob).await;
        cluster.check(result, &format!("upload of {} before its manifest", blob.digest));
    }
    let report = cluster.gc(2).await;
    println!("gc: {report:?}");
    for digest in old.blob_digests() {
        let held = cluster.holders(&digest);
        if !held.is_empty() {
            cluster.fail(&format!("old blob {digest} outlived its grace period on origins {held:?}"));
        }
    }
    cluster.assert_placed(&c.blob_digests(), &all, "blobs uploaded within the grace period, after gc");

    let result = try_put_manifest(&cluster.client(2), &c).await;
    cluster.check(result, "manifest PUT of C after gc");
    pull_all(&cluster, std::slice::from_ref(&c), &all).await;
}

/// Against a running cluster: the internal API answers 401 without the bearer secret or with
/// a wrong one (and 200 with it, so the 401s mean something), as do the admin routes; a blob
/// PUT whose body does not match its digest is refused with 400 and stores nothing, while a
/// matching one is stored; malformed digests are 400; the internal API is not reachable
/// through the registry's `/v2/` routes.
#[tokio::test(flavor = "multi_thread")]
async fn internal_api_refuses_bad_input() {
    skip_if_external!(SKIP);
    let cluster = OriginCluster::start_n(3).await;
    let all = [0, 1, 2];
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", cluster.url(0));
    let health = format!("{INTERNAL_PREFIX}/health");

    let anonymous = http.get(url(&health)).reply().await;
    anonymous.expect(StatusCode::UNAUTHORIZED);
    let wrong = http.get(url(&health)).bearer_auth("not-the-secret").reply().await;
    wrong.expect(StatusCode::UNAUTHORIZED);
    cluster.authed(0, Method::GET, &health).reply().await.expect(StatusCode::OK);

    for (method, path) in [(Method::GET, "members"), (Method::POST, "repair"), (Method::POST, "gc")] {
        let path = format!("{ADMIN_PREFIX}/{path}");
        http.request(method.clone(), url(&path)).reply().await.expect(StatusCode::UNAUTHORIZED);
        let wrong = http.request(method, url(&path)).bearer_auth("not-the-secret").reply().await;
        wrong.expect(StatusCode::UNAUTHORIZED);
    }

    // Content that does not hash to the digest in the path, sent to an owner of that digest.
    let data = random_bytes(64 * KIB);
    let digest = sha256(&data);
    let claimed = sha256(&random_bytes(64));
    let owner = cluster.owners(&claimed, &all)[0];
    let put = |origin: usize, digest: &str, body: Vec<u8>| {
        cluster.authed(origin, Method::PUT, &format!("{INTERNAL_PREFIX}/blobs/{digest}")).body(body).reply()
    };
    put(owner, &claimed, data.clone()).await.expect(StatusCode::BAD_REQUEST);
    for d in [&claimed, &digest] {
        let held = cluster.holders(d);
        if !held.is_empty() {
            cluster.fail(&format!("a refused PUT left {d} on origins {held:?}"));
        }
    }
    // Without the secret, even matching content is refused and not stored.
    let anonymous_put =
        http.put(url(&format!("{INTERNAL_PREFIX}/blobs/{digest}"))).body(data.clone()).reply().await;
    anonymous_put.expect(StatusCode::UNAUTHORIZED);
    if !cluster.holders(&digest).is_empty() {
        cluster.fail(&format!("an unauthenticated PUT stored {digest}"));
    }
    // The same body under its own digest is accepted and stored, and readable with the secret only.
    let owner = cluster.owners(&digest, &all)[0];
    let stored = put(owner, &digest, data.clone()).await;
    assert!(stored.status.is_success(), "{}", stored.describe());
    if !cluster.blob_on_disk(owner, &digest) {
        cluster.fail(&format!("an accepted internal PUT of {digest} is not on origin {owner}'s disk"));
    }
    let blob_path = format!("{INTERNAL_PREFIX}/blobs/{digest}");
    http.get(cluster.url(owner) + &blob_path).reply().await.expect(StatusCode::UNAUTHORIZED);
    let read = cluster.authed(owner, Method::GET, &blob_path).reply().await;
    read.expect(StatusCode::OK);
    assert!(read.body == data, "internal GET returned other bytes: {}", read.describe());

    for bad in ["sha256:xyz", "notadigest", "sha256:ABCDEF"] {
        put(0, bad, b"x".to_vec()).await.expect(StatusCode::BAD_REQUEST);
        let path = format!("{INTERNAL_PREFIX}/blobs/{bad}");
        cluster.authed(0, Method::GET, &path).reply().await.expect(StatusCode::BAD_REQUEST);
    }

    let through_v2 = cluster.authed(0, Method::GET, &format!("/v2{INTERNAL_PREFIX}/health")).reply().await;
    assert_ne!(through_v2.status, StatusCode::OK, "{}", through_v2.describe());
}

/// A chunked upload whose requests reach a different origin each time, as behind a load
/// balancer without session affinity: POST through origin 0, PATCH through 1 and 2, status
/// through 1, PUT through 2. The session's id names its home origin, and the others forward
/// to it; the blob ends up on its two owners and every origin serves it.
#[tokio::test(flavor = "multi_thread")]
async fn upload_session_spans_origins() {
    skip_if_external!(SKIP);
    let cluster = OriginCluster::start_n(3).await;
    let all = [0, 1, 2];
    let repo = unique_repo("spread");
    let data = random_bytes(3 * MIB + 123);
    let digest = sha256(&data);
    let absolute = cluster.client(0).start_upload(&repo).await;
    let location = absolute.strip_prefix(&cluster.url(0)).unwrap_or(&absolute).to_string();
    let (first, second) = data.split_at(MIB);
    cluster.client(1).patch_chunk(&location, 0, first).await.expect(StatusCode::ACCEPTED);
    let status = cluster.client(2).upload_status(&location).await;
    status.expect(StatusCode::NO_CONTENT);
    assert_eq!(status.must_header("range"), format!("0-{}", MIB - 1));
    cluster.client(2).patch_chunk(&location, MIB, second).await.expect(StatusCode::ACCEPTED);
    let done = cluster.client(2).finish_upload(&location, &digest, &[]).await;
    done.expect(StatusCode::CREATED);
    cluster.assert_placed(std::slice::from_ref(&digest), &all, "after a spread upload");
    for origin in all {
        let result = try_pull_blob(&cluster.client(origin), &repo, &digest).await;
        cluster.check(result, &format!("blob through origin {origin}"));
    }
    // The session is gone once committed, whichever origin is asked.
    cluster.client(1).upload_status(&location).await.expect(StatusCode::NOT_FOUND);
}

/// A final `PUT` whose blob could not be copied to enough owners (the other owner is dead
/// but still counted live) fails with 503, which tells the client to retry; once the owner
/// is back the same `PUT` succeeds and the blob is on both. Before, the session had ended with
/// the 503, and the retry got 404: the client had to upload every byte again.
#[tokio::test(flavor = "multi_thread")]
async fn a_final_put_that_failed_to_copy_succeeds_when_retried() {
    skip_if_external!(SKIP);
    // Slow to count a member down: the dead owner stays in the placement.
    let spec = ClusterSpec::new(2).cluster("call_timeout = \"1s\"\nhealth_fails = 1000");
    let mut cluster = OriginCluster::start_cluster(spec).await;
    let repo = unique_repo("put-retry");
    let data = random_bytes(300 * KIB);
    let digest = sha256(&data);
    let location = cluster.client(0).start_upload(&repo).await;
    cluster.client(0).patch_chunk(&location, 0, &data).await.expect(StatusCode::ACCEPTED);
    cluster.kill(1);
    let failed = cluster.client(0).finish_upload(&location, &digest, &[]).await;
    failed.expect(StatusCode::SERVICE_UNAVAILABLE);
    cluster.client(0).head_blob(&repo, &digest).await.expect(StatusCode::NOT_FOUND);
    cluster.start(1).await;
    cluster.wait_converged().await;
    cluster.client(0).finish_upload(&location, &digest, &[]).await.expect(StatusCode::CREATED);
    for origin in [0, 1] {
        let result = try_pull_blob(&cluster.client(origin), &repo, &digest).await;
        cluster.check(result, &format!("blob through origin {origin}"));
    }
    assert_eq!(cluster.holders(&digest), vec![0, 1], "a copy on each owner");
}

/// An upload request forwarded to a session's home origin that hangs (SIGSTOP: its socket
/// accepts and buffers, nothing reads or answers) fails with 503 once the home stops taking
/// the body, instead of holding the client for good; once the home is back, the session
/// resumes from the offset it reports and the blob is whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_forwarded_upload_to_a_hung_home_fails_and_the_session_resumes() {
    skip_if_external!(SKIP);
    let spec =
        ClusterSpec::new(3).cluster("call_timeout = \"1s\"").config("[limits]\nbody_idle_timeout = \"2s\"");
    let cluster = OriginCluster::start_cluster(spec).await;
    let repo = unique_repo("hung-home");
    let data = random_bytes(64 * MIB);
    let digest = sha256(&data);
    let absolute = cluster.client(0).start_upload(&repo).await;
    let location = absolute.strip_prefix(&cluster.url(0)).unwrap_or(&absolute).to_string();

    cluster.hang(0, true);
    let started = std::time::Instant::now();
    let patch = tokio::time::timeout(
        Duration::from_secs(30),
        cluster
            .client(1)
            .patch(&location)
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("0-{}", data.len() - 1))
            .body(data.clone())
            .try_reply(),
    )
    .await;
    let took = started.elapsed();
    cluster.hang(0, false);
    match patch {
        Err(_) => cluster.fail("the PATCH forwarded to the hung home got no answer in 30 s"),
        Ok(Ok(reply)) => {
            reply.expect(StatusCode::SERVICE_UNAVAILABLE);
            println!("forwarded PATCH to a hung home: 503 after {took:?}");
        }
        // The origin may close the client's connection while it still sends the body.
        Ok(Err(why)) => println!("forwarded PATCH to a hung home: connection ended after {took:?}: {why}"),
    }
    assert!(took < Duration::from_secs(20), "the forwarder gave up after {took:?}");

    cluster.wait_converged().await;
    let status = cluster.client(0).upload_status(&location).await;
    status.expect(StatusCode::NO_CONTENT);
    // `0-0` is read as nothing received: the home takes the body in chunks far above a byte.
    let end = parse_upload_range(status.must_header("range")).expect("a 0-<end> range") as usize;
    let offset = if end == 0 { 0 } else { end + 1 };
    println!("the home holds {offset} of {} bytes of the session", data.len());
    if offset < data.len() {
        cluster.client(0).patch_chunk(&location, offset, &data[offset..]).await.expect(StatusCode::ACCEPTED);
    }

    // The final PUT, forwarded to the home while it hangs: no bound on the home's answer
    // (it copies the blob to its owners first), but the home's failed health checks end it.
    cluster.hang(0, true);
    let started = std::time::Instant::now();
    let put = tokio::time::timeout(
        Duration::from_secs(40),
        cluster.client(1).put(&with_query(&location, "digest", &digest)).try_reply(),
    )
    .await;
    let took = started.elapsed();
    cluster.hang(0, false);
    match put {
        Err(_) => cluster.fail("the PUT forwarded to the hung home got no answer in 40 s"),
        Ok(reply) => println!("forwarded PUT to a hung home: {:?} after {took:?}", reply.map(|r| r.status)),
    }
    cluster.wait_converged().await;
    // Answered or not, the home commits the PUT it had taken once it runs again (it may still
    // be copying and linking the blob), or the session is still there to finish.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if cluster.client(0).head_blob(&repo, &digest).await.status == StatusCode::OK {
            break;
        }
        if cluster.client(0).upload_status(&location).await.status == StatusCode::NO_CONTENT {
            // The taken PUT may end the session between the two calls: 404, then the blob.
            let done = cluster.client(0).finish_upload(&location, &digest, &[]).await;
            if done.status == StatusCode::CREATED {
                break;
            }
            done.expect(StatusCode::NOT_FOUND);
        }
        assert!(std::time::Instant::now() < deadline, "the blob neither committed nor its session resumable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for origin in [0, 1, 2] {
        let result = try_pull_blob(&cluster.client(origin), &repo, &digest).await;
        cluster.check(result, &format!("blob through origin {origin}"));
    }
}

/// A chunk sent through another origin while the session's home is down (restarting) gets
/// 503 with `Retry-After` all along, never 404 `BLOB_UPLOAD_UNKNOWN` (which tells a client to
/// give the upload up): once the others counted the home down, they served the request
/// themselves and found no such session. Back up, the home finishes the same session.
#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_for_a_home_that_is_down_is_retried_not_refused() {
    skip_if_external!(SKIP);
    let mut cluster = OriginCluster::start_cluster(ClusterSpec::new(3)).await;
    let repo = unique_repo("home-down");
    let data = random_bytes(256 * KIB);
    let digest = sha256(&data);
    let absolute = cluster.client(0).start_upload(&repo).await;
    let location = absolute.strip_prefix(&cluster.url(0)).unwrap_or(&absolute).to_string();
    cluster.client(1).patch_chunk(&location, 0, &data[..100 * KIB]).await.expect(StatusCode::ACCEPTED);
    cluster.kill(0);
    // Health checks every 200 ms, two fails: counted down within a second; ask for three.
    let until = Instant::now() + Duration::from_secs(3);
    let mut answers = 0;
    while Instant::now() < until {
        let reply = cluster.client(1).patch_chunk(&location, 100 * KIB, &data[100 * KIB..]).await;
        reply.expect(StatusCode::SERVICE_UNAVAILABLE);
        reply.must_header("retry-after");
        answers += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answers > 5, "{answers} answers");
    cluster.start(0).await;
    cluster.wait_converged().await;
    cluster
        .client(1)
        .patch_chunk(&location, 100 * KIB, &data[100 * KIB..])
        .await
        .expect(StatusCode::ACCEPTED);
    cluster.client(2).finish_upload(&location, &digest, &[]).await.expect(StatusCode::CREATED);
    for origin in [0, 1, 2] {
        let result = try_pull_blob(&cluster.client(origin), &repo, &digest).await;
        cluster.check(result, &format!("blob through origin {origin}"));
    }
}

/// SIGTERM in the middle of a push (a rollout while CI pushes): the origin drains, the upload
/// in flight either completes (201, and then the blob is whole everywhere) or fails cleanly,
/// and after the restart no trace of a partial blob is visible: HEAD and GET answer 404 on
/// every origin and no blob file exists on any disk.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_push_leaves_nothing_half_written() {
    skip_if_external!(SKIP);
    // The `[limits]` table follows the `[cluster]` lines in the config file.
    let spec = ClusterSpec::new(3).cluster("[limits]\nshutdown_timeout = \"1s\"");
    let mut cluster = OriginCluster::start_cluster(spec).await;
    let repo = unique_repo("sigterm");
    let data = random_bytes(8 * MIB);
    let digest = sha256(&data);
    // About 1.3 MiB/s: the push is still sending when SIGTERM arrives.
    let chunks: Vec<Vec<u8>> = data.chunks(64 * KIB).map(<[u8]>::to_vec).collect();
    let body = futures_util::StreamExt::then(futures_util::stream::iter(chunks), |chunk| async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok::<_, std::io::Error>(chunk)
    });
    let url = format!("{}/v2/{repo}/blobs/uploads/?digest={digest}", cluster.url(0));
    let push = tokio::spawn(
        reqwest::Client::new()
            .post(url)
            .header("content-type", "application/octet-stream")
            .header("content-length", data.len().to_string())
            .body(reqwest::Body::wrap_stream(body))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.stop(0).await;
    let outcome = push.await.expect("push task").map(|r| r.status());
    println!("push during SIGTERM: {outcome:?}");
    cluster.start(0).await;
    cluster.wait_converged().await;
    let acknowledged = outcome.as_ref().is_ok_and(|s| *s == StatusCode::CREATED);
    for i in 0..3 {
        let client = cluster.client(i);
        if acknowledged {
            cluster.check(
                try_pull_blob(&client, &repo, &digest).await,
                &format!("acknowledged blob via origin {i}"),
            );
        } else {
            let head = client.head(&format!("/v2/{repo}/blobs/{digest}")).try_reply().await;
            let status = head.map(|r| r.status);
            if status != Ok(StatusCode::NOT_FOUND) {
                cluster.fail(&format!("an unacknowledged push is visible through origin {i}: {status:?}"));
            }
        }
    }
    if !acknowledged && !cluster.holders(&digest).is_empty() {
        cluster.fail(&format!("a blob file of the cut push is on origins {:?}", cluster.holders(&digest)));
    }
}
