//! Downloads against local stand-ins for the origin and tracker (axum on loopback): joins,
//! restarts, the metainfo size check, pins of finished blobs, abandoned starts.

use std::time::Duration;

use shoal_p2p::announcer::Announcer;
use shoal_p2p::limiter::RateLimiter;
use shoal_p2p::node::NodeFlow;
use shoal_p2p::tracker_client::TrackerClient;
use shoal_p2p::{PeerId, SwarmMetrics};

use super::*;
use crate::cache::CacheMetrics;
use crate::disk::CacheLimits;

/// Downloads whose origin and tracker are a closed port: any download started fails.
fn downloads(dir: &std::path::Path) -> Arc<Downloads> {
    downloads_at(dir, "http://127.0.0.1:1")
}

/// Downloads whose origin and tracker are both `url`.
fn downloads_at(dir: &std::path::Path, url: &str) -> Arc<Downloads> {
    downloads_with(dir, url, CacheLimits::bytes(1 << 30, 1 << 29))
}

/// Downloads whose origin and tracker are both `url`, with these cache limits.
fn downloads_with(dir: &std::path::Path, url: &str, limits: CacheLimits) -> Arc<Downloads> {
    let auth = RemoteAuth::new(Arc::new(|| Box::pin(async { None })));
    downloads_authed(dir, url, limits, auth)
}

/// Downloads whose origin and tracker are both `url`, with these cache limits and this policy.
fn downloads_authed(
    dir: &std::path::Path,
    url: &str,
    limits: CacheLimits,
    auth: Arc<RemoteAuth>,
) -> Arc<Downloads> {
    let registry = prometheus::Registry::new();
    let metrics = CacheMetrics::new(&registry).unwrap();
    let cache = Arc::new(BlobCache::open(&dir.join("cache"), &dir.join("partial"), limits, metrics).unwrap());
    let nowhere = vec![url.to_string()];
    let origin = OriginClient::new(nowhere.clone(), Duration::from_secs(1), &registry).unwrap();
    let tracker = Arc::new(TrackerClient::new(nowhere, Duration::from_secs(1)).unwrap());
    let deps = SwarmDeps {
        tracker: tracker.clone(),
        announcer: Announcer::spawn(tracker),
        ingress: Arc::new(RateLimiter::new(None, 1 << 20)),
        metrics: SwarmMetrics::new("agent", &registry).unwrap(),
        node: NodeFlow::new(16),
    };
    let swarm = SwarmConfig::new(PeerId::random(), "127.0.0.1:1".parse().unwrap());
    Arc::new(Downloads::new(cache, origin, deps, swarm, auth))
}

/// A request that found the blob missing, then joins after a download of it finished (a
/// second client of the same blob), gets the cached copy: no second download starts.
#[tokio::test]
async fn joining_a_blob_cached_meanwhile_gets_the_copy_not_a_second_download() {
    let dir = tempfile::tempdir().unwrap();
    let downloads = downloads(dir.path());
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let meta = Metainfo::compute(&data[..], data.len() as u64, shoal_registry::Algorithm::Sha256).unwrap();
    let digest = meta.digest().clone();
    let repo: RepoName = "team/app".parse().unwrap();
    assert!(
        downloads.join(&repo, &digest, None, None).await.is_err(),
        "not cached: a download starts, and fails here"
    );
    let path = downloads.cache.blob_path(&digest);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &data).unwrap();
    downloads.cache.write_metainfo(&meta).unwrap();
    downloads.cache.insert(&digest, data.len() as u64);
    match downloads.join(&repo, &digest, None, None).await {
        Ok(Joined::Cached(pieces)) => assert_eq!(pieces.metainfo().digest(), &digest),
        Ok(Joined::Download(_)) => panic!("a second download of a cached blob started"),
        Err(e) => panic!("a cached blob was downloaded again (and failed): {e}"),
    }
    assert!(downloads.running(&digest).is_none());
}

/// A tracker hands out a metainfo that claims twice the blob's size (with a chain of its
/// own): a download joined with the size the origins confirmed starts from the origin's
/// metainfo instead, so no range is served against the forged chain.
#[tokio::test]
async fn a_trackers_metainfo_of_the_wrong_size_gives_way_to_the_origins() {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let size = data.len() as u64;
    let digest =
        Metainfo::compute(&data[..], size, shoal_registry::Algorithm::Sha256).unwrap().digest().clone();
    let forged = Metainfo::unverifiable(digest.clone(), 2 * size, 64 * 1024).unwrap();
    let (url, _) = serve_blob(data, Some(serde_json::to_vec(&forged).unwrap())).await;

    let dir = tempfile::tempdir().unwrap();
    let downloads = downloads_at(dir.path(), &url);
    assert_eq!(downloads.metainfo(&digest).await.unwrap().size(), 2 * size, "the tracker's answer");
    let repo: RepoName = "team/app".parse().unwrap();
    match downloads.join(&repo, &digest, Some(size), None).await {
        Ok(Joined::Download(download)) => assert_eq!(download.pieces().metainfo().size(), size),
        Ok(Joined::Cached(_)) => panic!("nothing is cached"),
        Err(e) => panic!("the download did not start: {e}"),
    }
}

/// A tracker's metainfo of the right size but with a chain of made-up pieces (a tracker not
/// to be trusted, or an answer changed on its way) vouches for any range that ends before
/// the last piece. A client reading such a range gets an error, not the made-up bytes as a
/// complete answer; with the tracker's metainfo the origins' own, the range is served.
#[tokio::test]
async fn a_range_is_not_served_by_a_trackers_made_up_metainfo() {
    use axum::http::{header, HeaderMap, StatusCode};
    use axum::routing::get;
    use futures_util::StreamExt;
    let real: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let size = real.len() as u64;
    let mut made_up = real.clone();
    made_up[10] ^= 0xff;
    let algorithm = shoal_registry::Algorithm::Sha256;
    let origins = Metainfo::compute(&real[..], size, algorithm).unwrap();
    let digest = origins.digest().clone();
    let chain = Metainfo::compute(&made_up[..], size, algorithm).unwrap();
    let forged = Metainfo::new(digest.clone(), size, chain.piece_length(), chain.chain().to_vec()).unwrap();
    assert!(origins.piece_count() > 2);
    let range = ByteRange { start: 0, end: 999 };

    // The tracker hands out `tracker`, the origins' metainfo is the real one, and the bytes
    // come (over the fallback here; from a peer in the real case) as `bytes`.
    async fn serve(tracker: Metainfo, origins: Metainfo, bytes: Vec<u8>) -> String {
        let digest = origins.digest().clone();
        let (tracker, origins, bytes) =
            (serde_json::to_vec(&tracker).unwrap(), serde_json::to_vec(&origins).unwrap(), Arc::new(bytes));
        let ranged = move |headers: HeaderMap| {
            let bytes = bytes.clone();
            async move {
                let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).unwrap_or_default();
                let (a, b) = range.trim_start_matches("bytes=").split_once('-').unwrap_or(("0", ""));
                let a: usize = a.parse().unwrap_or(0);
                let b: usize = b.parse().unwrap_or(bytes.len() - 1).min(bytes.len() - 1);
                (StatusCode::PARTIAL_CONTENT, bytes[a..=b].to_vec())
            }
        };
        let app = axum::Router::new()
            .route(&format!("/v1/metainfo/{digest}"), get(move || async move { tracker }))
            .route(&shoal_p2p::tracker_client::metainfo_path(&digest), get(move || async move { origins }))
            .route("/v2/{*rest}", get(ranged));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }
    async fn read(url: &str, digest: &Digest, size: u64, range: ByteRange) -> Result<Vec<u8>, String> {
        let dir = tempfile::tempdir().unwrap();
        let downloads = downloads_at(dir.path(), url);
        let repo: RepoName = "team/app".parse().unwrap();
        let download = match downloads.join(&repo, digest, Some(size), None).await {
            Ok(Joined::Download(d)) => d,
            Ok(Joined::Cached(_)) => panic!("nothing is cached"),
            Err(e) => panic!("the download did not start: {e}"),
        };
        let mut stream = downloads.stream(&repo, download, range);
        let mut got = Vec::new();
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(20), stream.next()).await.unwrap() {
            got.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
        }
        Ok(got)
    }

    let url = serve(forged.clone(), origins.clone(), made_up).await;
    match read(&url, &digest, size, range).await {
        Ok(got) => panic!("{} made-up bytes served as a complete range", got.len()),
        Err(e) => assert!(e.contains("not the origins'"), "{e}"),
    }
    let url = serve(origins.clone(), origins, real.clone()).await;
    assert_eq!(read(&url, &digest, size, range).await.unwrap(), real[..1000].to_vec());
}

/// The same made-up metainfo, with the origins out of reach when the reader asks them (its
/// check then waits for the download's end): the download finds the chain bad at its end and
/// finishes on a second attempt with the origins' metainfo and the real bytes. The reader's
/// range, read from the first attempt, is not answered: the download's end vouched for the
/// second attempt only, and served the made-up bytes as a complete range.
#[tokio::test]
async fn a_range_read_from_a_discarded_attempt_is_not_served() {
    use axum::http::{header, HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use futures_util::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let real: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let size = real.len() as u64;
    let mut made_up = real.clone();
    made_up[10] ^= 0xff;
    let algorithm = shoal_registry::Algorithm::Sha256;
    let origins = Metainfo::compute(&real[..], size, algorithm).unwrap();
    let digest = origins.digest().clone();
    let chain = Metainfo::compute(&made_up[..], size, algorithm).unwrap();
    let forged = Metainfo::new(digest.clone(), size, chain.piece_length(), chain.chain().to_vec()).unwrap();
    // The origins' metainfo: 503 to its first question (the reader's), then the real one;
    // the bytes: made up until the origins' metainfo was handed out, then real.
    let asked = Arc::new(AtomicUsize::new(0));
    let (tracker, origins) = (serde_json::to_vec(&forged).unwrap(), serde_json::to_vec(&origins).unwrap());
    let metainfo = {
        let asked = asked.clone();
        move || {
            let (asked, origins) = (asked.clone(), origins.clone());
            async move {
                if asked.fetch_add(1, Ordering::SeqCst) == 0 {
                    return (StatusCode::SERVICE_UNAVAILABLE, Vec::new()).into_response();
                }
                origins.into_response()
            }
        }
    };
    let (made_up, real_bytes) = (Arc::new(made_up), Arc::new(real.clone()));
    let ranged = {
        let asked = asked.clone();
        move |headers: HeaderMap| {
            let bytes = if asked.load(Ordering::SeqCst) >= 2 { real_bytes.clone() } else { made_up.clone() };
            async move {
                let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).unwrap_or_default();
                let (a, b) = range.trim_start_matches("bytes=").split_once('-').unwrap_or(("0", ""));
                let a: usize = a.parse().unwrap_or(0);
                let b: usize = b.parse().unwrap_or(bytes.len() - 1).min(bytes.len() - 1);
                (StatusCode::PARTIAL_CONTENT, bytes[a..=b].to_vec())
            }
        }
    };
    let app = axum::Router::new()
        .route(&format!("/v1/metainfo/{digest}"), get(move || async move { tracker }))
        .route(&shoal_p2p::tracker_client::metainfo_path(&digest), get(metainfo))
        .route("/v2/{*rest}", get(ranged));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let downloads = downloads_at(dir.path(), &url);
    let repo: RepoName = "team/app".parse().unwrap();
    let Ok(Joined::Download(download)) = downloads.join(&repo, &digest, Some(size), None).await else {
        panic!("a download starts");
    };
    let mut stream = downloads.stream(&repo, download.clone(), ByteRange { start: 0, end: 999 });
    let mut got = Vec::new();
    let mut error = None;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), stream.next()).await.unwrap() {
        match chunk {
            Ok(c) => got.extend_from_slice(&c),
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    assert!(asked.load(Ordering::SeqCst) >= 2, "the download never started again");
    let Some(error) = error else {
        let what = if got == real[..1000] { "real" } else { "made-up" };
        panic!("{} {what} bytes served from the discarded attempt as a complete range", got.len());
    };
    assert!(error.contains("retry"), "{error}");
    download.wait().await.unwrap();
    assert!(downloads.cache.contains(&digest), "the download itself finished");
}

/// Restarts race readers: whatever a reader takes, the pieces are the attempt's own
/// (attempts alternate between two blobs' piece files, odd and even).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_takes_one_attempts_pieces_for_anothers() {
    let dir = tempfile::tempdir().unwrap();
    let downloads = downloads(dir.path());
    let mut files = Vec::new();
    for seed in [1u8, 2] {
        let data = vec![seed; 100_000];
        let meta =
            Metainfo::compute(&data[..], data.len() as u64, shoal_registry::Algorithm::Sha256).unwrap();
        files.push(downloads.open_partial(&meta.digest().clone(), meta, None, None).await.unwrap());
    }
    let asker = Asker { repo: "team/app".parse().unwrap(), client: None };
    let download = Arc::new(Download::new(files[0].clone(), asker, MetainfoSource::Origin));
    let odd = files[0].metainfo().digest().clone();
    let reader = {
        let download = download.clone();
        std::thread::spawn(move || {
            for _ in 0..200_000 {
                let (pieces, attempt) = download.current();
                assert_eq!(
                    pieces.metainfo().digest() == &odd,
                    attempt.number % 2 == 1,
                    "attempt {}",
                    attempt.number
                );
            }
        })
    };
    for i in 0..20_000 {
        download.restart(files[(i + 1) % 2].clone());
    }
    reader.join().unwrap();
}

/// An origin (and tracker) serving one blob: its metainfo at both paths (the tracker's is
/// `tracker_metainfo` if given), its bytes by range under any repository; no announce
/// route, so a download fetches over HTTP.
async fn serve_blob(data: Vec<u8>, tracker_metainfo: Option<Vec<u8>>) -> (String, Digest) {
    use axum::http::{header, HeaderMap, StatusCode};
    use axum::routing::get;
    let meta = Metainfo::compute(&data[..], data.len() as u64, shoal_registry::Algorithm::Sha256).unwrap();
    let digest = meta.digest().clone();
    let json = serde_json::to_vec(&meta).unwrap();
    let (tracker_json, data) = (tracker_metainfo.unwrap_or_else(|| json.clone()), Arc::new(data));
    let ranged = move |headers: HeaderMap| {
        let data = data.clone();
        async move {
            let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).unwrap_or_default();
            let (a, b) = range.trim_start_matches("bytes=").split_once('-').unwrap_or(("0", ""));
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b.parse().unwrap_or(data.len() - 1).min(data.len() - 1);
            (StatusCode::PARTIAL_CONTENT, data[a..=b].to_vec())
        }
    };
    let app = axum::Router::new()
        .route(&format!("/v1/metainfo/{digest}"), get(move || async move { tracker_json }))
        .route(&shoal_p2p::tracker_client::metainfo_path(&digest), get(move || async move { json }))
        .route("/v2/{*rest}", get(ranged));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, digest)
}

/// A finished download moves its blob into the cache pinned while anyone still holds its
/// pieces (a client's stream through the download, a peer's connection): a blob alone over
/// the high watermark stays while it is read, and goes once the last holder lets go.
/// Before, the watermarks evicted it the moment it was inserted, under its readers.
#[tokio::test]
async fn a_finished_downloads_blob_stays_cached_while_the_download_is_held() {
    let data: Vec<u8> = (0..400_000u32).map(|i| (i % 249) as u8).collect();
    let (url, digest) = serve_blob(data, None).await;
    let dir = tempfile::tempdir().unwrap();
    let downloads = downloads_with(dir.path(), &url, CacheLimits::bytes(300_000, 100_000));
    let repo: RepoName = "team/app".parse().unwrap();
    let Ok(Joined::Download(download)) = downloads.join(&repo, &digest, Some(400_000), None).await else {
        panic!("a download starts");
    };
    download.wait().await.unwrap();
    assert!(downloads.cache.contains(&digest), "evicted under its readers");
    assert!(downloads.cache.blob_path(&digest).exists());
    // A peer's connection holds the pieces, not the download.
    let peer = download.pieces();
    drop(download);
    tokio::time::sleep(Duration::from_millis(50)).await;
    downloads.cache.make_room(0);
    assert!(downloads.cache.contains(&digest), "evicted under a peer's connection");
    drop(peer);
    // The download's own task lets go of it just after it ends.
    for _ in 0..100 {
        downloads.cache.make_room(0);
        if !downloads.cache.contains(&digest) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("kept after the last holder let go");
}

/// A client that goes away while its download is starting (the tracker is slow to answer
/// the metainfo) leaves nothing in the running downloads; before, every such abandoned
/// start stayed there for the life of the agent.
#[tokio::test]
async fn a_join_dropped_while_its_download_starts_leaves_nothing_behind() {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/v1/metainfo/{digest}",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            "{}"
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir().unwrap();
    let downloads = downloads_at(dir.path(), &url);
    let repo: RepoName = "team/app".parse().unwrap();
    for i in 0..3u8 {
        let digest = Digest::of(shoal_registry::Algorithm::Sha256, &[i]);
        let join = downloads.join(&repo, &digest, None, None);
        assert!(tokio::time::timeout(Duration::from_millis(100), join).await.is_err());
    }
    assert!(downloads.active().is_empty(), "{} abandoned starts kept", downloads.active().len());
}

/// A client that goes away while its download opens the piece file leaves that opening
/// running in the blocking pool; a retry's start waits for it instead of opening, checking
/// and rewriting the same file beside it, and the abandoned opening keeps the partial
/// claimed (an eviction must not take its file meanwhile). Before, the two ran at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_does_not_open_the_piece_file_beside_an_abandoned_start() {
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::mpsc;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let size = data.len() as u64;
    let (url, digest) = serve_blob(data, None).await;
    let dir = tempfile::tempdir().unwrap();
    let downloads = downloads_at(dir.path(), &url);
    let (inside, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (go_rx, first) = (Mutex::new(go_rx), AtomicBool::new(true));
    *downloads.cache.before_open.lock().unwrap() = Some(Arc::new({
        let (inside, most) = (inside.clone(), most.clone());
        move || {
            let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let _ = entered_tx.send(());
            if first.swap(false, Ordering::SeqCst) {
                // The abandoned start's opening, held here until the test lets it go.
                let _ = go_rx.lock().unwrap().recv();
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
            inside.fetch_sub(1, Ordering::SeqCst);
        }
    }));
    let entered = Arc::new(Mutex::new(entered_rx));
    let wait_entered = |limit: Duration| {
        let entered = entered.clone();
        tokio::task::spawn_blocking(move || entered.lock().unwrap().recv_timeout(limit).is_ok())
    };
    let repo: RepoName = "team/app".parse().unwrap();
    let join = |downloads: Arc<Downloads>| {
        let (repo, digest) = (repo.clone(), digest.clone());
        tokio::spawn(async move { downloads.join(&repo, &digest, Some(size), None).await.map(|_| ()) })
    };
    let abandoned = join(downloads.clone());
    assert!(wait_entered(Duration::from_secs(10)).await.unwrap(), "the first start reached its opening");
    abandoned.abort();
    let _ = abandoned.await;
    let retry = join(downloads.clone());
    assert!(
        !wait_entered(Duration::from_millis(500)).await.unwrap(),
        "the retry opened the piece file beside the abandoned start"
    );
    let claimed = std::time::Instant::now();
    while downloads.cache.claims(&digest) < 2 {
        assert!(
            claimed.elapsed() < Duration::from_secs(10),
            "the retry and the abandoned opening claim the partial"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    go_tx.send(()).unwrap();
    let started = tokio::time::timeout(Duration::from_secs(10), retry).await;
    assert!(matches!(started, Ok(Ok(Ok(())))), "the retry's download started: {started:?}");
    assert_eq!(most.load(Ordering::SeqCst), 1, "two openings of one piece file ran at once");
}

/// What [`serve_blob_to_tokens`]'s origin accepts and has done.
#[derive(Default)]
struct Tokens {
    /// Client tokens it accepts now (one that expires is taken out).
    accepted: Vec<String>,
    /// Anonymous tokens it handed out, with when: each is good for [`ANONYMOUS_LIFE`].
    issued: Vec<(String, std::time::Instant)>,
    /// Ranges it served, and refused.
    served: usize,
    refused: usize,
}

/// How long [`serve_blob_to_tokens`]'s anonymous tokens are good for: the agent keeps a token
/// until 30 s before the `expires_in` it was given (31 s here), so for the same second.
const ANONYMOUS_LIFE: Duration = Duration::from_secs(1);

/// Downloads from `url` whose origins want tokens (their anonymous ones from `url/token`).
async fn downloads_with_token_auth(dir: &std::path::Path, url: &str) -> Arc<Downloads> {
    let realm = format!("{url}/token");
    let auth = RemoteAuth::new(Arc::new(move || {
        let realm = realm.clone();
        Box::pin(async move {
            let mut published = shoal_registry::auth::remote::Published::open();
            published.enabled = true;
            published.policy.tokens = true;
            published.policy.realm = realm;
            published.policy.service = "s".into();
            Some(published)
        })
    }));
    assert!(auth.refresh().await);
    downloads_authed(dir, url, CacheLimits::bytes(1 << 30, 1 << 29), auth)
}

/// An origin (and tracker) serving one blob by range, slowly (`delay` a range), only to the
/// tokens `Tokens` says are good; anonymous tokens at `/token`.
async fn serve_blob_to_tokens(data: Vec<u8>, delay: Duration) -> (String, Digest, Arc<Mutex<Tokens>>) {
    use axum::http::{header, HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    let meta = Metainfo::compute(&data[..], data.len() as u64, shoal_registry::Algorithm::Sha256).unwrap();
    let digest = meta.digest().clone();
    let json = serde_json::to_vec(&meta).unwrap();
    let tracker_json = json.clone();
    let (data, tokens) = (Arc::new(data), Arc::new(Mutex::new(Tokens::default())));
    let (ranges, issuing) = (tokens.clone(), tokens.clone());
    let ranged = move |uri: axum::http::Uri, headers: HeaderMap| {
        let (data, tokens) = (data.clone(), ranges.clone());
        async move {
            // A repository the blob was unlinked from.
            if uri.path().starts_with("/v2/gone/") {
                return (StatusCode::NOT_FOUND, Vec::new()).into_response();
            }
            // A repository whose metadata cannot be read (its owners down), the blob's fine.
            if uri.path().starts_with("/v2/sick/") {
                return (StatusCode::SERVICE_UNAVAILABLE, Vec::new()).into_response();
            }
            let token = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
            let good = {
                let t = tokens.lock().unwrap();
                t.accepted.iter().any(|a| a == token)
                    || t.issued.iter().any(|(a, at)| a == token && at.elapsed() < ANONYMOUS_LIFE)
            };
            if !good {
                tokens.lock().unwrap().refused += 1;
                let challenge = [(header::WWW_AUTHENTICATE, "Bearer realm=\"http://x/token\",service=\"s\"")];
                return (StatusCode::UNAUTHORIZED, challenge, Vec::new()).into_response();
            }
            tokio::time::sleep(delay).await;
            let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).unwrap_or_default();
            let (a, b) = range.trim_start_matches("bytes=").split_once('-').unwrap_or(("0", ""));
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b.parse().unwrap_or(data.len() - 1).min(data.len() - 1);
            tokens.lock().unwrap().served += 1;
            (StatusCode::PARTIAL_CONTENT, data[a..=b].to_vec()).into_response()
        }
    };
    let token = move || {
        let tokens = issuing.clone();
        async move {
            let mut t = tokens.lock().unwrap();
            let token = format!("anon-{}", t.issued.len());
            t.issued.push((format!("Bearer {token}"), std::time::Instant::now()));
            axum::Json(serde_json::json!({ "token": token, "expires_in": 31 }))
        }
    };
    let app = axum::Router::new()
        .route(&format!("/v1/metainfo/{digest}"), get(move || async move { tracker_json }))
        .route(&shoal_p2p::tracker_client::metainfo_path(&digest), get(move || async move { json }))
        .route("/token", get(token))
        .route("/v2/{*rest}", get(ranged));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, digest, tokens)
}

/// A client token that expires during a download (no node TLS: the origin fallback carries
/// clients' tokens) is replaced by the next client that joins it, here the same client
/// retrying with a new token. Before, the fallback kept the starting client's token for the
/// whole download, and five rounds of 401 failed it.
#[tokio::test]
async fn a_download_outlives_the_token_it_started_with_when_a_client_joins_with_a_new_one() {
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 247) as u8).collect();
    let (url, digest, tokens) = serve_blob_to_tokens(data, Duration::from_millis(100)).await;
    tokens.lock().unwrap().accepted.push("Bearer old".into());
    let dir = tempfile::tempdir().unwrap();
    let downloads = downloads_at(dir.path(), &url);
    let repo: RepoName = "team/app".parse().unwrap();
    let bearer = |t: &str| Some(HeaderValue::from_str(&format!("Bearer {t}")).unwrap());
    let Ok(Joined::Download(download)) = downloads.join(&repo, &digest, Some(2_000_000), bearer("old")).await
    else {
        panic!("a download starts");
    };
    while tokens.lock().unwrap().served == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The first client's token expires; it comes back with a new one.
    tokens.lock().unwrap().accepted = vec!["Bearer new".into()];
    let Ok(Joined::Download(joined)) = downloads.join(&repo, &digest, Some(2_000_000), bearer("new")).await
    else {
        panic!("the download is joined");
    };
    assert!(Arc::ptr_eq(&download, &joined));
    download.wait().await.unwrap();
    assert!(downloads.cache.contains(&digest));
}

/// An anonymous client's download asks the origins with an anonymous token fetched by the
/// agent, kept until shortly before it expires: a download that outlives one fetches the
/// next (here a token lives a second; the download takes several). Before, the token
/// fetched when the download started was used to its end.
#[tokio::test]
async fn an_anonymous_download_fetches_a_new_token_when_its_token_expires() {
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 241) as u8).collect();
    let (url, digest, tokens) = serve_blob_to_tokens(data, Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let downloads = downloads_with_token_auth(dir.path(), &url).await;
    let repo: RepoName = "library/app".parse().unwrap();
    let Ok(Joined::Download(download)) = downloads.join(&repo, &digest, Some(2_000_000), None).await else {
        panic!("a download starts");
    };
    download.wait().await.unwrap();
    assert!(downloads.cache.contains(&digest));
    let t = tokens.lock().unwrap();
    assert!(t.issued.len() > 1, "one token for the whole download ({} ranges)", t.served);
}

/// A client's token refused with nobody newer to ask as: the fallback asks anonymously, which
/// the origins allow for a public repository.
#[tokio::test]
async fn a_refused_client_token_falls_back_to_an_anonymous_one() {
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 239) as u8).collect();
    let (url, digest, tokens) = serve_blob_to_tokens(data, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let downloads = downloads_with_token_auth(dir.path(), &url).await;
    let repo: RepoName = "library/app".parse().unwrap();
    let expired = Some(HeaderValue::from_static("Bearer expired"));
    let Ok(Joined::Download(download)) = downloads.join(&repo, &digest, Some(1_000_000), expired).await
    else {
        panic!("a download starts");
    };
    download.wait().await.unwrap();
    assert!(downloads.cache.contains(&digest));
    assert!(tokens.lock().unwrap().refused > 0, "the client's token was never refused");
}

/// A download started through `team/app` by one client, then joined by the same client
/// through `joiner` (a repository the fake origin answers for in its own way): it completes
/// into the cache.
async fn joined_through(joiner: &str) {
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 233) as u8).collect();
    let (url, digest, tokens) = serve_blob_to_tokens(data, Duration::from_millis(100)).await;
    tokens.lock().unwrap().accepted.push("Bearer t".into());
    let dir = tempfile::tempdir().unwrap();
    let downloads = downloads_at(dir.path(), &url);
    let bearer = Some(HeaderValue::from_static("Bearer t"));
    let (team, joiner): (RepoName, RepoName) = ("team/app".parse().unwrap(), joiner.parse().unwrap());
    let Ok(Joined::Download(download)) =
        downloads.join(&team, &digest, Some(2_000_000), bearer.clone()).await
    else {
        panic!("a download starts");
    };
    let Ok(Joined::Download(_)) = downloads.join(&joiner, &digest, Some(2_000_000), bearer).await else {
        panic!("the download is joined");
    };
    download.wait().await.unwrap();
    assert!(downloads.cache.contains(&digest));
}

/// A client that joined through a repository the blob was then unlinked from (404 there) does
/// not fail the download for the clients before it: the fallback asks as them. Before, any
/// answer but a 401 to the newest joiner ended every fallback fetch, and the download.
#[tokio::test]
async fn a_joiner_whose_repository_lost_the_blob_does_not_fail_the_download() {
    joined_through("gone/app").await;
}

/// A client that joined through a repository the origins cannot answer for (503: its
/// metadata's owners down, while the blob's are up) does not fail the download for the
/// clients before it: the next fallback round asks through their repository. Before, every
/// round asked as the newest joiner, met the same 503, and the download failed.
#[tokio::test]
async fn a_joiner_whose_repository_is_unavailable_does_not_fail_the_download() {
    joined_through("sick/app").await;
}

/// A blob read from the cache (a pull, not a download) is seeded for the window from then,
/// and an agent restarted over its cache goes on seeding what it pulled within the window
/// before (before, only downloads and peers' lookups counted, and the list started empty:
/// after a rolling upgrade no node seeded its layers).
#[tokio::test]
async fn cached_blobs_are_seeded_when_pulled_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let meta = Metainfo::compute(&data[..], data.len() as u64, shoal_registry::Algorithm::Sha256).unwrap();
    let digest = meta.digest().clone();
    {
        let downloads = downloads(dir.path());
        let seeding = Arc::new(Seeding::new(Duration::from_secs(600)));
        downloads.set_seeding(seeding.clone());
        let path = downloads.cache.blob_path(&digest);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &data).unwrap();
        downloads.cache.write_metainfo(&meta).unwrap();
        downloads.cache.insert(&digest, data.len() as u64);
        assert!(seeding.current().is_empty());
        assert!(downloads.open_cached(&digest).await.is_some());
        assert_eq!(seeding.current(), std::slice::from_ref(&digest), "a pull from the cache is a use");
    }
    // A restart: the cache found on disk, written just now.
    let downloads = downloads(dir.path());
    let seeding = Seeding::new(Duration::from_secs(600));
    seeding.resume(downloads.cache.take_used_before_start());
    assert_eq!(seeding.current(), std::slice::from_ref(&digest), "seeded on after the restart");
    // Used longer ago than the window: not seeded.
    let old = Seeding::new(Duration::from_secs(600));
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    old.resume(vec![(digest.clone(), long_ago)]);
    assert!(old.current().is_empty());
    // An earlier use never sets a later one back.
    old.touch(&digest);
    old.touch_at(&digest, std::time::Instant::now() - Duration::from_secs(3600));
    assert_eq!(old.current(), [digest]);
}

/// A cached blob whose metainfo file went missing is checked against the origins' metainfo,
/// not a tracker's: a tracker's copy with made-up chaining values (the right digest and size)
/// made the good file look corrupt, and it was deleted.
#[tokio::test]
async fn a_cached_blobs_lost_metainfo_comes_from_the_origins_not_a_tracker() {
    use axum::routing::get;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let size = data.len() as u64;
    let algorithm = shoal_registry::Algorithm::Sha256;
    let origins = Metainfo::compute(&data[..], size, algorithm).unwrap();
    let digest = origins.digest().clone();
    let mut other = data.clone();
    other[10] ^= 0xff;
    let chain = Metainfo::compute(&other[..], size, algorithm).unwrap();
    let forged = Metainfo::new(digest.clone(), size, chain.piece_length(), chain.chain().to_vec()).unwrap();
    let (forged, right) = (serde_json::to_vec(&forged).unwrap(), serde_json::to_vec(&origins).unwrap());
    let app = axum::Router::new()
        .route(&format!("/v1/metainfo/{digest}"), get(move || async move { forged }))
        .route(&shoal_p2p::tracker_client::metainfo_path(&digest), get(move || async move { right }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let downloads = downloads_at(dir.path(), &url);
    let path = downloads.cache.blob_path(&digest);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &data).unwrap();
    downloads.cache.insert(&digest, size);
    let opened = downloads.open_cached(&digest).await.expect("the cached blob opens");
    assert_eq!(opened.metainfo().chain(), origins.chain());
    assert_eq!(std::fs::read(&path).unwrap(), data, "the good file stays");
}
