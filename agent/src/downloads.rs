//! Blob downloads on an agent: one shared download per digest however many clients ask, each
//! a swarm (with origin fallback) filling a piece file that clients read while it fills. A
//! finished blob is verified, moved into the cache and announced as seeded.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream;
use shoal_p2p::blob::BlobPieces;
use shoal_p2p::swarm::{self, Fallback, SwarmConfig, SwarmDeps};
use shoal_p2p::Metainfo;
use shoal_registry::range::ByteRange;
use shoal_registry::{ByteStream, Digest, RepoName, StoreError};
use tokio::sync::{watch, OnceCell};

use crate::cache::BlobCache;
use crate::origin_client::OriginClient;
use crate::seeding::Seeding;

/// Bytes handed to a client per read.
const READ_CHUNK: usize = 256 * 1024;
/// A reader waiting this long for the next piece gets an error instead of hanging.
const READER_STALL: Duration = Duration::from_secs(120);

/// The outcome of a download, once it has one.
type Outcome = Option<Result<(), String>>;

/// One blob being downloaded.
pub struct Download {
    pub pieces: Arc<BlobPieces>,
    readers: Mutex<HashMap<u64, u32>>,
    positions: watch::Sender<Vec<u32>>,
    outcome: watch::Sender<Outcome>,
}

impl Download {
    fn set_reader(&self, id: u64, piece: Option<u32>) {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        match piece {
            Some(p) => readers.insert(id, p),
            None => readers.remove(&id),
        };
        let mut positions: Vec<u32> = readers.values().copied().collect();
        positions.sort_unstable();
        positions.dedup();
        self.positions.send_replace(positions);
    }

    /// Wait for the download to end.
    pub async fn wait(&self) -> Result<(), String> {
        let mut rx = self.outcome.subscribe();
        loop {
            if let Some(result) = rx.borrow_and_update().clone() {
                return result;
            }
            if rx.changed().await.is_err() {
                return Err("download abandoned".into());
            }
        }
    }
}

/// Fetches missing ranges straight from an origin, through the repository the client asked.
struct OriginFallback {
    origin: OriginClient,
    repo: RepoName,
    digest: Digest,
}

#[async_trait]
impl Fallback for OriginFallback {
    async fn fetch(&self, offset: u64, len: u64) -> Result<Bytes, String> {
        self.origin.blob_range(&self.repo, &self.digest, offset, len).await.map_err(|e| e.to_string())
    }
}

/// Everything a node's downloads share.
pub struct Downloads {
    pub cache: Arc<BlobCache>,
    origin: OriginClient,
    deps: SwarmDeps,
    swarm: SwarmConfig,
    partial_dir: PathBuf,
    active: Mutex<HashMap<Digest, Arc<OnceCell<Arc<Download>>>>>,
    next_reader: AtomicU64,
    seeding: std::sync::OnceLock<Arc<Seeding>>,
}

impl Downloads {
    pub fn new(
        cache: Arc<BlobCache>,
        origin: OriginClient,
        deps: SwarmDeps,
        swarm: SwarmConfig,
        partial_dir: PathBuf,
    ) -> Downloads {
        Downloads {
            cache,
            origin,
            deps,
            swarm,
            partial_dir,
            active: Mutex::new(HashMap::new()),
            next_reader: AtomicU64::new(1),
            seeding: std::sync::OnceLock::new(),
        }
    }

    /// Where finished blobs are registered for seeding.
    pub fn set_seeding(&self, seeding: Arc<Seeding>) {
        let _ = self.seeding.set(seeding);
    }

    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<OnceCell<Arc<Download>>>>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The download of `digest` if one is running (for the peer server).
    /// Every download in progress.
    pub fn all_running(&self) -> Vec<(Digest, Arc<Download>)> {
        self.active().iter().filter_map(|(d, cell)| cell.get().map(|dl| (d.clone(), dl.clone()))).collect()
    }

    pub fn running(&self, digest: &Digest) -> Option<Arc<Download>> {
        self.active().get(digest).and_then(|cell| cell.get().cloned())
    }

    /// The metainfo of a blob: from the trackers, else straight from the origin.
    pub async fn metainfo(&self, digest: &Digest) -> Result<Metainfo, StoreError> {
        let json = match self.deps.tracker.metainfo(digest).await {
            Ok(Some(json)) => json,
            Ok(None) => return Err(StoreError::BlobUnknown),
            Err(e) => {
                tracing::debug!(%digest, error = %e, "tracker metainfo failed; asking the origin");
                self.origin.metainfo(digest).await?.ok_or(StoreError::BlobUnknown)?
            }
        };
        let m: Metainfo = serde_json::from_slice(&json)
            .map_err(|e| StoreError::Internal(format!("invalid metainfo for {digest}: {e}")))?;
        if m.digest() != digest {
            return Err(StoreError::Internal(format!("metainfo for another blob than {digest}")));
        }
        Ok(m)
    }

    /// Join (or start) the download of `digest`, falling back to the origin via `repo`.
    pub async fn join(
        self: &Arc<Self>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Arc<Download>, StoreError> {
        let cell = self.active().entry(digest.clone()).or_default().clone();
        let download = cell.get_or_try_init(|| self.start(repo, digest)).await;
        if download.is_err() {
            self.forget(digest, &cell);
        }
        download.cloned()
    }

    fn forget(&self, digest: &Digest, cell: &Arc<OnceCell<Arc<Download>>>) {
        let mut active = self.active();
        if active.get(digest).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            active.remove(digest);
        }
    }

    async fn start(self: &Arc<Self>, repo: &RepoName, digest: &Digest) -> Result<Arc<Download>, StoreError> {
        let metainfo = Arc::new(self.metainfo(digest).await?);
        let path = self.partial_dir.join(digest.algorithm().name()).join(digest.hex());
        let pieces = {
            let metainfo = metainfo.clone();
            tokio::task::spawn_blocking(move || BlobPieces::partial(&path, metainfo))
                .await
                .map_err(|e| StoreError::Internal(e.to_string()))?
                .map_err(|e| StoreError::Internal(format!("piece file: {e}")))?
        };
        let download = Arc::new(Download {
            pieces: Arc::new(pieces),
            readers: Mutex::new(HashMap::new()),
            positions: watch::Sender::new(Vec::new()),
            outcome: watch::Sender::new(None),
        });
        let fallback = Arc::new(OriginFallback {
            origin: self.origin.clone(),
            repo: repo.clone(),
            digest: digest.clone(),
        });
        let this = self.clone();
        let task = download.clone();
        let digest = digest.clone();
        tokio::spawn(async move {
            let result = this.run(&task, fallback, &digest).await;
            if let Err(e) = &result {
                tracing::warn!(%digest, error = %e, "download failed");
            }
            task.outcome.send_replace(Some(result));
            // The download is over: later requests are served from the cache (or start anew).
            this.active().remove(&digest);
        });
        Ok(download)
    }

    async fn run(
        &self,
        download: &Arc<Download>,
        fallback: Arc<OriginFallback>,
        digest: &Digest,
    ) -> Result<(), String> {
        let started = std::time::Instant::now();
        let readers = download.positions.subscribe();
        swarm::download(download.pieces.clone(), self.swarm.clone(), self.deps.clone(), fallback, readers)
            .await
            .map_err(|e| e.to_string())?;
        let pieces = download.pieces.clone();
        let cache = self.cache.clone();
        let digest_c = digest.clone();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let dest = cache.blob_path(&digest_c);
            pieces.finish(&dest).map_err(|e| e.to_string())?;
            let meta_path = cache.metainfo_path(&digest_c);
            if let Some(parent) = meta_path.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            if let Ok(json) = serde_json::to_vec(&**pieces.metainfo()) {
                let _ = std::fs::write(&meta_path, json);
            }
            cache.insert(&digest_c, pieces.metainfo().size());
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())??;
        if let Some(seeding) = self.seeding.get() {
            seeding.touch(digest);
        }
        self.deps.metrics.download_seconds.observe(started.elapsed().as_secs_f64());
        tracing::info!(%digest, secs = started.elapsed().as_secs_f64(), "blob downloaded and verified");
        Ok(())
    }

    /// Stream `range` of a download to a client as its pieces arrive.
    pub fn stream(self: &Arc<Self>, download: Arc<Download>, range: ByteRange) -> ByteStream {
        let id = self.next_reader.fetch_add(1, Ordering::Relaxed);
        let reader = Reader { download, id, pos: range.start, end: range.end + 1 };
        Box::pin(stream::unfold(reader, |mut r| async move {
            let item = r.next().await?;
            Some((item, r))
        }))
    }
}

/// A client's read position in a download; unregisters itself when dropped.
struct Reader {
    download: Arc<Download>,
    id: u64,
    pos: u64,
    end: u64,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.download.set_reader(self.id, None);
    }
}

impl Reader {
    async fn next(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if self.pos >= self.end {
            return None;
        }
        let meta = self.download.pieces.metainfo().clone();
        let index = meta.piece_index_at(self.pos)?;
        self.download.set_reader(self.id, Some(index));
        let mut progress = self.download.pieces.subscribe();
        let mut outcome = self.download.outcome.subscribe();
        let deadline = tokio::time::Instant::now() + READER_STALL;
        while !self.download.pieces.has(index) {
            if let Some(Err(e)) = outcome.borrow_and_update().clone() {
                return Some(Err(std::io::Error::other(format!("download failed: {e}"))));
            }
            tokio::select! {
                _ = progress.changed() => {}
                _ = outcome.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Some(Err(std::io::Error::other("download stalled")));
                }
            }
        }
        let want = usize::try_from(self.end - self.pos).unwrap_or(READ_CHUNK).min(READ_CHUNK);
        let pieces = self.download.pieces.clone();
        let pos = self.pos;
        let read = tokio::task::spawn_blocking(move || pieces.read_new_at(pos, want)).await;
        match read {
            Ok(Ok(buf)) if !buf.is_empty() => {
                self.pos += buf.len() as u64;
                Some(Ok(Bytes::from(buf)))
            }
            Ok(Ok(_)) => Some(Err(std::io::Error::other("blob ended early"))),
            Ok(Err(e)) => Some(Err(std::io::Error::other(e.to_string()))),
            Err(e) => Some(Err(std::io::Error::other(e.to_string()))),
        }
    }
}
