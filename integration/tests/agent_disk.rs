//! The agent's disk under faults (issue 10, item 4): a disk that fills up during a pull, a
//! cached file that no longer matches its digest, a bad metainfo (beside a cached blob, or
//! handed out by the tracker), a partial download whose data went bad, and `partial/` files
//! left by a crash. Every pull still ends with the exact blob.
//!
//! The full-disk tests mount a small tmpfs as the agent's data directory, so they need root
//! (CI runs as root); without it they say so and pass.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use shoal_integration::cluster::{Cluster, Process, TestBlob};
use shoal_integration::{sha256, skip_if_external};
use shoal_p2p::piece_store::PieceFile;
use shoal_p2p::tracker_client::metainfo_path;
use shoal_p2p::Metainfo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1024 * 1024;
const SKIP: &str = "the agent disk tests start their own origin, tracker and agents";
const PULL_LIMIT: Duration = Duration::from_secs(60);

/// `<data>/cache/sha256/<hex>`: where an agent keeps a complete blob.
fn cached_path(data: &Path, blob: &TestBlob) -> PathBuf {
    data.join("cache").join("sha256").join(hex_of(blob))
}

/// `<data>/cache/metainfo/sha256/<hex>`: the metainfo beside a cached blob.
fn cached_metainfo_path(data: &Path, blob: &TestBlob) -> PathBuf {
    data.join("cache").join("metainfo").join("sha256").join(hex_of(blob))
}

/// `<data>/partial/sha256/<hex>`: a download's piece file (its bitfield is `<that>.bitfield`).
fn partial_path(data: &Path, blob: &TestBlob) -> PathBuf {
    data.join("partial").join("sha256").join(hex_of(blob))
}

fn hex_of(blob: &TestBlob) -> &str {
    blob.digest.strip_prefix("sha256:").expect("a sha256 digest")
}

fn file_digest(path: &Path) -> String {
    sha256(&std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())))
}

/// Pull `blob` through `agent` and check the bytes.
async fn pull_exact(cluster: &Cluster, agent: usize, blob: &TestBlob, what: &str) {
    let fetched = tokio::time::timeout(PULL_LIMIT, cluster.fetch(agent, blob))
        .await
        .unwrap_or_else(|_| panic!("{what}: the pull did not finish in {PULL_LIMIT:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(fetched.digest, blob.digest, "{what}: the agent served other bytes than the blob's");
}

/// The origin's metainfo of `blob`, decoded.
async fn origin_metainfo(cluster: &Cluster, blob: &TestBlob) -> (Metainfo, Vec<u8>) {
    let digest = blob.digest.parse().expect("digest");
    let url = format!("{}{}", cluster.origin.url(), metainfo_path(&digest));
    let body = reqwest::get(&url).await.expect("GET metainfo").bytes().await.expect("metainfo body").to_vec();
    (serde_json::from_slice(&body).expect("the origin's metainfo decodes"), body)
}

/// Write a piece file and bitfield for `blob` as a download would have left them, holding the
/// pieces in `held`.
fn write_partial(data: &Path, blob: &TestBlob, meta: &Metainfo, held: impl Iterator<Item = u32>) -> PathBuf {
    let path = partial_path(data, blob);
    let bytes = std::fs::read(&blob.path).expect("read the blob's bytes");
    let mut file = PieceFile::open(&path, meta.clone()).expect("create the piece file");
    for i in held {
        let (start, len) = meta.piece_range(i).expect("piece in range");
        file.write_piece(i, &bytes[start as usize..(start + len) as usize]).expect("write a piece");
    }
    file.flush().expect("persist the bitfield");
    path
}

/// Overwrite `len` bytes at `offset` of `path` with other bytes (same size: a bad sector).
fn corrupt(path: &Path, offset: u64, len: usize) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open to corrupt");
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).expect("read before corrupting");
    for b in &mut buf {
        *b ^= 0x5a;
    }
    file.write_all_at(&buf, offset).expect("corrupt");
}

/// A tmpfs of `mib` MiB mounted on `dir` (an agent's data directory) for as long as it lives.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (with a note) when not root: only root may mount.
    fn mount(dir: &Path, mib: u64) -> Option<Tmpfs> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a small tmpfs as the agent's data directory needs root");
            return None;
        }
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "shoal-it-agent-disk"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a {mib} MiB tmpfs on {}", dir.display());
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the agent may still hold files open when a failing test unwinds.
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// One agent whose data directory is a `mib` MiB tmpfs, with `toml` in its config.
async fn agent_on_small_disk(mib: u64, toml: &str) -> Option<(Cluster, Tmpfs)> {
    let mut cluster = Cluster::start_with(1, toml).await;
    cluster.kill_agent(0);
    let tmpfs = Tmpfs::mount(&cluster.agent_data_dir(0), mib)?;
    cluster.restart_agent(0).await;
    Some((cluster, tmpfs))
}

/// A 40 MiB disk holds three 12 MiB blobs; the fourth pull runs into a full disk (the byte
/// watermarks, 20 GiB by default, never trigger) when its piece file is allocated, or on a
/// write where the filesystem cannot allocate ahead. The agent evicts the least recently used
/// blob and goes on: the pull is exact, and the evicted blob is gone from the cache.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_during_a_pull_evicts_and_the_pull_succeeds() {
    skip_if_external!(SKIP);
    let Some((cluster, _tmpfs)) = agent_on_small_disk(40, "").await else { return };
    let data = cluster.agent_data_dir(0);
    let mut blobs = Vec::new();
    for _ in 0..4 {
        blobs.push(cluster.push_random_blob(12 * MIB).await);
    }
    for (i, blob) in blobs.iter().enumerate() {
        pull_exact(&cluster, 0, blob, &format!("blob {i}")).await;
    }
    let full = cluster.agent_metric(0, "shoal_agent_disk_full_total", &[]).await;
    let evictions = cluster.agent_metric(0, "shoal_agent_cache_evictions_total", &[]).await;
    println!("disk full {full} times, {evictions} evictions");
    assert!(full >= 1.0, "48 MiB onto a 40 MiB disk never found it full");
    assert!(evictions >= 1.0, "the full disk evicted nothing");
    assert!(!cached_path(&data, &blobs[0]).exists(), "the least recently used blob was evicted");
    // The client can hold its last byte a moment before the download's file moves into the
    // cache and its bitfield is removed: wait for both, as the other pulls here do.
    assert_eq!(
        wait_for_digest(&cached_path(&data, &blobs[3]), &blobs[3].digest).await,
        blobs[3].digest,
        "the last blob is cached"
    );
    assert_eq!(wait_for_no_partials(&data).await, 0, "a finished download left partial files");
}

/// Watermarks as a share of the filesystem (Dragonfly's model): with `70%`/`40%` on a
/// 40 MiB disk, a pull that would take the disk past 70% evicts first, down to 40%, and the
/// disk never fills.
#[tokio::test(flavor = "multi_thread")]
async fn share_watermarks_evict_before_the_disk_fills() {
    skip_if_external!(SKIP);
    let toml = "cache_high_watermark = \"70%\"\ncache_low_watermark = \"40%\"\n";
    let Some((cluster, _tmpfs)) = agent_on_small_disk(40, toml).await else { return };
    let mut blobs = Vec::new();
    for _ in 0..4 {
        blobs.push(cluster.push_random_blob(12 * MIB).await);
    }
    for (i, blob) in blobs.iter().enumerate() {
        pull_exact(&cluster, 0, blob, &format!("blob {i}")).await;
    }
    let full = cluster.agent_metric(0, "shoal_agent_disk_full_total", &[]).await;
    let evictions = cluster.agent_metric(0, "shoal_agent_cache_evictions_total", &[]).await;
    let used = shoal_used_share(&cluster.agent_data_dir(0));
    println!("disk full {full} times, {evictions} evictions, {:.0}% used", used * 100.0);
    assert_eq!(full, 0.0, "the share watermark should have made room before the disk filled");
    assert!(evictions >= 1.0, "48 MiB through a 70% watermark of 40 MiB evicted nothing");
    assert!(used <= 0.7, "the disk is {:.0}% used, above its 70% watermark", used * 100.0);
}

/// The share of the filesystem at `dir` in use, as `df` shows it.
fn shoal_used_share(dir: &Path) -> f64 {
    let out =
        std::process::Command::new("df").args(["-k", "--output=size,used"]).arg(dir).output().expect("df");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().nth(1).expect("a df line");
    let mut fields = line.split_whitespace().map(|f| f.parse::<f64>().expect("a number"));
    let (size, used) = (fields.next().expect("size"), fields.next().expect("used"));
    used / size
}

/// Cached blobs that no longer match their digest: one with a few bytes changed (a bad
/// sector), found when it is next served, piece by piece; one truncated, found when it is
/// opened. Each is removed and fetched again within the same pull: the client gets the exact
/// blob, and the cache holds the exact bytes afterwards.
///
/// The bad files are put in the stopped agent's cache (as a pull would have left them, then
/// damaged), so the agent meets them first when it starts; a blob lost by a running agent is
/// `a_blob_lost_right_after_its_pull_is_fetched_again_at_once`.
#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_cached_file_is_detected_and_fetched_again() {
    skip_if_external!(SKIP);
    let mut cluster = Cluster::start(1).await;
    let data = cluster.agent_data_dir(0);
    let flipped = cluster.push_random_blob(3 * MIB).await;
    let truncated = cluster.push_random_blob(3 * MIB).await;
    cluster.kill_agent(0);
    for blob in [&flipped, &truncated] {
        let (_, json) = origin_metainfo(&cluster, blob).await;
        let bytes = std::fs::read(&blob.path).expect("blob bytes");
        for (path, bytes) in [(cached_path(&data, blob), bytes), (cached_metainfo_path(&data, blob), json)] {
            std::fs::create_dir_all(path.parent().expect("parent")).expect("cache dirs");
            std::fs::write(&path, bytes).expect("seed the cache");
        }
    }
    corrupt(&cached_path(&data, &flipped), 2 * MIB + 17, 8);
    let file = std::fs::OpenOptions::new().write(true).open(cached_path(&data, &truncated)).expect("open");
    file.set_len(MIB).expect("truncate");
    drop(file);
    cluster.restart_agent(0).await;

    pull_exact(&cluster, 0, &flipped, "pull of the corrupted blob").await;
    pull_exact(&cluster, 0, &truncated, "pull of the truncated blob").await;
    let found = cluster.agent_metric(0, "shoal_agent_cache_corrupt_total", &[]).await;
    assert_eq!(found, 2.0, "both bad cache entries are counted");
    // Fetched again: the cache holds the exact bytes now.
    for blob in [&flipped, &truncated] {
        let digest = wait_for_digest(&cached_path(&data, blob), &blob.digest).await;
        assert_eq!(digest, blob.digest, "the refetched cache entry");
    }
    pull_exact(&cluster, 0, &flipped, "pull after the refetch").await;
}

/// Longer than a pull of a few MiB takes here, shorter than the origin's decline of a piece
/// a departed peer holds (two re-asks, 20 s) or the agent's HTTP fallback (15 s).
const REFETCH_LIMIT: Duration = Duration::from_secs(10);

/// An agent loses a blob right after pulling it (here its cached file is cut short; eviction
/// is the same) and is asked for it again within the minute the origin's super-seeding still
/// counts a departed agent's pieces as held (`HOLDER_LINGER`). The agent's own old copy is no
/// reason to send it elsewhere: the pull is served over the peer protocol at once, where it
/// used to wait for the origin's declines to run out (about 20 s).
#[tokio::test(flavor = "multi_thread")]
async fn a_blob_lost_right_after_its_pull_is_fetched_again_at_once() {
    skip_if_external!(SKIP);
    let cluster = Cluster::start(1).await;
    let data = cluster.agent_data_dir(0);
    let blob = cluster.push_random_blob(3 * MIB).await;
    pull_exact(&cluster, 0, &blob, "first pull").await;
    let path = cached_path(&data, &blob);
    assert_eq!(wait_for_digest(&path, &blob.digest).await, blob.digest, "the blob is cached");
    // The agent's connection to the origin ends with its download: the origin now counts it
    // as a departed holder of every piece.
    let inbound = [("direction", "in")];
    for _ in 0..100 {
        if cluster.origin_metric("shoal_origin_peer_connections", &inbound).await == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cluster.origin_metric("shoal_origin_peer_connections", &inbound).await, 0.0);
    let file = std::fs::OpenOptions::new().write(true).open(&path).expect("open the cached blob");
    file.set_len(MIB).expect("cut the cached blob short");
    drop(file);
    let before = cluster.agent_received(0).await;

    let started = std::time::Instant::now();
    pull_exact(&cluster, 0, &blob, "pull after the loss").await;
    let took = started.elapsed();
    println!("pulled again in {took:?}");
    assert_eq!(cluster.agent_metric(0, "shoal_agent_cache_corrupt_total", &[]).await, 1.0);
    let after = cluster.agent_received(0).await;
    assert_eq!(after.origin, before.origin, "nothing came over the HTTP fallback");
    assert!(after.peer - before.peer >= 3 * MIB, "the blob came over the peer protocol again");
    assert!(
        took < REFETCH_LIMIT,
        "the pull after the loss took {took:?}: the origin declined the agent's own pieces"
    );
    assert_eq!(wait_for_digest(&path, &blob.digest).await, blob.digest, "the refetched cache entry");
}

/// The refetched blob lands in the cache once its download finishes; wait for it a moment.
async fn wait_for_digest(path: &Path, want: &str) -> String {
    settle(|| if path.exists() { file_digest(path) } else { String::new() }, |digest| digest == want).await
}

/// Files left in `<data>/partial/sha256` once the downloads that had them finish (the last
/// one, the bitfield, goes a moment after the blob moves into the cache); waits a moment.
async fn wait_for_no_partials(data: &Path) -> usize {
    let dir = data.join("partial").join("sha256");
    settle(|| std::fs::read_dir(&dir).map_or(0, |d| d.count()), |&files| files == 0).await
}

/// Reads `probe` every 50 ms for up to 5 s until `done` holds; the last reading either way
/// (the caller asserts on it, so a failure shows what was there).
async fn settle<T>(probe: impl Fn() -> T, done: impl Fn(&T) -> bool) -> T {
    let mut last = probe();
    for _ in 0..100 {
        if done(&last) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = probe();
    }
    last
}

/// The metainfo beside a cached blob is garbage (written by an older agent without a rename,
/// or a bad sector). The agent finds out when it opens the blob, fetches the metainfo again,
/// checks the blob against it, and rewrites it: the pull is served from the cache (nothing
/// downloaded again) and the blob can be seeded again.
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_metainfo_beside_a_cached_blob_is_detected_and_recovered() {
    skip_if_external!(SKIP);
    let mut cluster = Cluster::start(1).await;
    let data = cluster.agent_data_dir(0);
    let blob = cluster.push_random_blob(3 * MIB).await;
    pull_exact(&cluster, 0, &blob, "first pull").await;
    // The stream ends as the last piece arrives; the blob lands in the cache just after.
    assert_eq!(wait_for_digest(&cached_path(&data, &blob), &blob.digest).await, blob.digest);
    cluster.kill_agent(0);
    let meta_path = cached_metainfo_path(&data, &blob);
    assert!(meta_path.exists(), "the agent keeps the metainfo beside the blob");
    std::fs::write(&meta_path, b"{\"digest\": \"sha256:00\", \"size\": tru").expect("write a torn metainfo");
    cluster.restart_agent(0).await;

    pull_exact(&cluster, 0, &blob, "pull with a bad metainfo").await;
    let received = cluster.agent_received(0).await.total();
    assert_eq!(received, 0, "the cached blob was good: nothing should have been downloaded again");
    let (want, _) = origin_metainfo(&cluster, &blob).await;
    let got: Metainfo = serde_json::from_slice(&std::fs::read(&meta_path).expect("read the metainfo again"))
        .expect("the rewritten metainfo decodes");
    assert_eq!(got, want, "the metainfo beside the blob is the origin's again");
}

/// A partial download whose bitfield claims every piece, but one piece's bytes went bad on
/// disk (a bad sector, or a crash between data and bitfield). Before, the download finished at
/// once, failed its whole-blob digest, and did so again on every pull: the digest was wedged.
/// Now the held pieces are checked when the download resumes, and the bad one fetched again.
#[tokio::test(flavor = "multi_thread")]
async fn a_partial_download_with_a_bad_sector_does_not_wedge_its_digest() {
    skip_if_external!(SKIP);
    let mut cluster = Cluster::start(1).await;
    let data = cluster.agent_data_dir(0);
    let blob = cluster.push_random_blob(3 * MIB).await;
    let (meta, _) = origin_metainfo(&cluster, &blob).await;
    cluster.kill_agent(0);
    let path = write_partial(&data, &blob, &meta, 0..meta.piece_count());
    corrupt(&path, MIB + 5, 4);
    cluster.restart_agent(0).await;

    pull_exact(&cluster, 0, &blob, "pull over the bad partial").await;
    let received = cluster.agent_received(0).await.total();
    assert!(
        received > 0 && received <= meta.piece_length(),
        "only the bad piece is fetched again ({received} bytes)"
    );
    assert_eq!(wait_for_digest(&cached_path(&data, &blob), &blob.digest).await, blob.digest);
    assert!(!path.exists(), "the partial file is gone once the blob is cached");
}

/// A tracker that hands out a bad state list (one chaining value wrong) for every blob and no
/// peers. The origin's pieces on either side of it then fail verification against it; the
/// agent fetches the origin's own metainfo, re-checks what it holds and starts again, and the
/// pull succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_piece_list_from_the_tracker_is_recovered_from_the_origin() {
    skip_if_external!(SKIP);
    let cluster = Cluster::start(0).await;
    let blob = cluster.push_random_blob(3 * MIB).await;
    let (_, good) = origin_metainfo(&cluster, &blob).await;
    let mut json: serde_json::Value = serde_json::from_slice(&good).expect("metainfo JSON");
    let chain = json["chain"].as_str().expect("chaining values").to_string();
    // The state after piece 3, changed: a metainfo that decodes but lies about pieces 3 and 4.
    let at = 3 * 64 + 5;
    let swapped = if &chain[at..=at] == "0" { "1" } else { "0" };
    json["chain"] = serde_json::Value::String(format!("{}{swapped}{}", &chain[..at], &chain[at + 1..]));
    let tracker = FakeTracker::start(serde_json::to_vec(&json).expect("encode")).await;

    let dir = tempfile::tempdir().expect("temp dir");
    let args: Vec<OsString> = vec![
        "agent".into(),
        "--peer-listen".into(),
        "127.0.0.1:0".into(),
        "--origin".into(),
        cluster.origin.url().into(),
        "--tracker".into(),
        tracker.url.clone().into(),
        "--data-dir".into(),
        dir.path().join("data").into(),
    ];
    let agent = Process::spawn("shoal agent (bad tracker)".into(), args, dir.path().join("agent.log")).await;
    let url = format!("{}/v2/{}/blobs/{}", agent.url(), blob.repo, blob.digest);
    let reply = tokio::time::timeout(PULL_LIMIT, async { reqwest::get(&url).await?.bytes().await })
        .await
        .expect("the pull did not finish in time")
        .expect("the pull through an agent with a lying tracker");
    assert_eq!(sha256(&reply), blob.digest, "the agent served the exact blob");
    assert!(tracker.metainfo_requests() >= 1, "the agent asked the fake tracker");
}

/// Serves `GET /v1/metainfo/<digest>` with one fixed body and answers announces with no peers.
struct FakeTracker {
    url: String,
    requests: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeTracker {
    async fn start(metainfo: Vec<u8>) -> FakeTracker {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the fake tracker");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let metainfo = Arc::new(metainfo);
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve_fake_tracker(conn, metainfo.clone(), counter.clone()));
            }
        });
        FakeTracker { url, requests, task }
    }

    fn metainfo_requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for FakeTracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// HTTP/1.1 with keep-alive, just enough for the agent's tracker client.
async fn serve_fake_tracker(
    mut conn: tokio::net::TcpStream,
    metainfo: Arc<Vec<u8>>,
    requests: Arc<std::sync::atomic::AtomicUsize>,
) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let body_len = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + body_len {
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + body_len);
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let (status, body) = if path.starts_with("/v1/metainfo/") {
            requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            ("200 OK", metainfo.to_vec())
        } else if path == "/v1/announce" {
            ("200 OK", br#"{"interval_secs":1,"peers":[]}"#.to_vec())
        } else {
            ("404 Not Found", Vec::new())
        };
        let reply = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if conn.write_all(reply.as_bytes()).await.is_err() || conn.write_all(&body).await.is_err() {
            return;
        }
    }
}

/// `partial/` as a crash leaves it: a download's piece file and bitfield, a half-written
/// bitfield temp file. What is older than `partial_max_age` (1 h by default) is removed when
/// the agent starts; a recent partial stays (a retried pull resumes it) and is counted in
/// `shoal_agent_partial_bytes`, against the cache limits.
#[tokio::test(flavor = "multi_thread")]
async fn partial_files_left_by_a_crash_are_cleaned() {
    skip_if_external!(SKIP);
    let mut cluster = Cluster::start(1).await;
    let data = cluster.agent_data_dir(0);
    let old = cluster.push_random_blob(2 * MIB).await;
    let recent = cluster.push_random_blob(2 * MIB).await;
    let (old_meta, _) = origin_metainfo(&cluster, &old).await;
    let (recent_meta, _) = origin_metainfo(&cluster, &recent).await;
    cluster.kill_agent(0);

    let old_path = write_partial(&data, &old, &old_meta, 0..4);
    let recent_path = write_partial(&data, &recent, &recent_meta, 0..4);
    // What a bitfield write cut short by a crash leaves (`shoal_registry::durable`).
    let name = old_path.file_name().expect("a file name").to_string_lossy().into_owned();
    let tmp =
        old_path.with_file_name(format!(".{name}.bitfield.1.2{}", shoal_registry::durable::TEMP_SUFFIX));
    std::fs::write(&tmp, b"SHOALBF1 torn").expect("write a torn bitfield temp file");
    let two_hours_ago = SystemTime::now() - Duration::from_secs(2 * 3600);
    let mut old_bitfield = old_path.clone().into_os_string();
    old_bitfield.push(".bitfield");
    for path in [old_path.clone(), PathBuf::from(old_bitfield.clone()), tmp.clone()] {
        let file = std::fs::File::options().write(true).open(&path).expect("open to age");
        file.set_modified(two_hours_ago).expect("set the modification time");
    }
    cluster.restart_agent(0).await;

    assert!(!old_path.exists(), "a partial file older than partial_max_age is removed at start");
    assert!(!PathBuf::from(old_bitfield).exists(), "with its bitfield");
    assert!(!tmp.exists(), "a bitfield temp file is removed at start");
    assert!(recent_path.exists(), "a recent partial stays, to be resumed");
    let counted = cluster.agent_metric(0, "shoal_agent_partial_bytes", &[]).await;
    use std::os::unix::fs::MetadataExt;
    let on_disk = std::fs::metadata(&recent_path).expect("stat").blocks() * 512;
    assert_eq!(counted as u64, on_disk, "the recent partial counts against the cache limits");

    // And it is resumed: only the missing pieces come over the network.
    pull_exact(&cluster, 0, &recent, "pull resuming the recent partial").await;
    assert_eq!(wait_for_digest(&cached_path(&data, &recent), &recent.digest).await, recent.digest);
    let received = cluster.agent_received(0).await.total();
    assert_eq!(received, recent.size - 4 * recent_meta.piece_length(), "the four held pieces were kept");
    let counted = cluster.agent_metric(0, "shoal_agent_partial_bytes", &[]).await;
    assert_eq!(counted, 0.0, "no partial once the blob is cached");
}
