//! Blob downloads on an agent: one shared download per digest however many clients ask, each
//! a swarm (with origin fallback) filling a piece file that clients read while it fills. A
//! finished blob is verified, moved into the cache and announced as seeded.
//!
//! Every piece is checked against the digest's own hash chain (`shoal_p2p::chain`), so a
//! finished download has its digest. A download whose swarm gave up with a metainfo from the
//! tracker that differs from the origin's (a bad state list: its last piece can never pass)
//! starts again, once, from the origin's own metainfo with an empty piece file. A reader
//! carries on with the new attempt if what it was sent still holds: nothing yet, or pieces the
//! new metainfo checks with the same states. Any other reader gets an error (what it was sent
//! may be wrong) and the client's retry starts clean. A resumed piece file's pieces are
//! checked again first, so neither a bad state list nor a bad sector wedges a digest.
//!
//! Cached blobs are streamed to clients piece by piece, each checked against its hash
//! ([`BlobCache`]); a piece that fails removes the cached file, and the same reader goes on
//! from a new download of the blob, so the client still gets the exact blob.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::HeaderValue;
use shoal_p2p::blob::BlobPieces;
use shoal_p2p::swarm::{self, SwarmConfig, SwarmDeps};
use shoal_p2p::{Metainfo, PieceError};
use shoal_registry::auth::remote::RemoteAuth;
use shoal_registry::range::ByteRange;
use shoal_registry::{ByteStream, Digest, RepoName, StoreError};
use tokio::sync::{watch, OnceCell};

use crate::cache::{BlobCache, Cached, PartialClaim};
use crate::origin_client::OriginClient;
use crate::seeding::Seeding;

mod askers;
mod confirm;
mod reader;
use askers::{Asker, OriginFallback};
use confirm::MetainfoCheck;
use reader::{Reader, Source};

/// Attempts of one download: the first, and one from the origin's metainfo (see the module docs).
const DOWNLOAD_ATTEMPTS: u32 = 2;

/// The outcome of a download, once it has one.
type Outcome = Option<Result<(), String>>;

/// Where a download's metainfo came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MetainfoSource {
    Tracker,
    Origin,
}

/// Which attempt of a download runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Attempt {
    /// 1, then 2 after a restart.
    number: u32,
}

/// One blob being downloaded.
pub struct Download {
    /// The piece file of the current attempt and its number, replaced together on a restart
    /// (a reader never takes one attempt's pieces for another's: its check of what it sent
    /// would be skipped); readers wait on it for a restart.
    current: watch::Sender<(Arc<BlobPieces>, Attempt)>,
    readers: Mutex<HashMap<u64, u32>>,
    positions: watch::Sender<Vec<u32>>,
    outcome: watch::Sender<Outcome>,
    /// The clients the origin fallback asks as, newest first (see [`OriginFallback`]).
    askers: Mutex<Vec<Asker>>,
    /// Whether its metainfo may vouch for a range short of the blob's end ([`confirm`]).
    check: MetainfoCheck,
}

impl Download {
    fn new(pieces: Arc<BlobPieces>, asker: Asker, source: MetainfoSource) -> Download {
        Download {
            current: watch::Sender::new((pieces, Attempt { number: 1 })),
            readers: Mutex::new(HashMap::new()),
            positions: watch::Sender::new(Vec::new()),
            outcome: watch::Sender::new(None),
            askers: Mutex::new(vec![asker]),
            check: MetainfoCheck::new(source),
        }
    }

    /// The pieces of the current attempt (to serve peers, persist on shutdown, read).
    pub fn pieces(&self) -> Arc<BlobPieces> {
        self.current().0
    }

    /// The pieces of the current attempt with its number, read together.
    fn current(&self) -> (Arc<BlobPieces>, Attempt) {
        self.current.borrow().clone()
    }

    /// Start the next attempt on `pieces`.
    fn restart(&self, pieces: Arc<BlobPieces>) {
        self.current.send_modify(|(current, attempt)| {
            *current = pieces;
            attempt.number += 1;
        });
    }

    fn set_reader(&self, id: u64, piece: Option<u32>) {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        match piece {
            Some(p) => readers.insert(id, p),
            None => readers.remove(&id),
        };
        let mut positions: Vec<u32> = readers.values().copied().collect();
        positions.sort_unstable();
        positions.dedup();
        self.pieces().set_reader_floor(positions.first().copied());
        // Each read of a chunk lands here; the swarm is woken only when a position moved.
        self.positions.send_if_modified(|old| {
            let moved = *old != positions;
            *old = positions;
            moved
        });
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

/// Why one attempt of a download failed.
fn join_error(e: tokio::task::JoinError) -> StoreError {
    StoreError::Internal(e.to_string())
}

/// Everything a node's downloads share.
pub struct Downloads {
    pub cache: Arc<BlobCache>,
    origin: OriginClient,
    deps: SwarmDeps,
    swarm: SwarmConfig,
    active: Mutex<HashMap<Digest, Arc<OnceCell<Arc<Download>>>>>,
    next_reader: AtomicU64,
    seeding: std::sync::OnceLock<Arc<Seeding>>,
    /// The origins' access policy, for anonymous tokens ([`Downloads::credentials`]).
    auth: Arc<RemoteAuth>,
}

/// What a request for a blob that was not cached when it looked gets from [`Downloads::join`].
pub enum Joined {
    /// The download of it, running or just started.
    Download(Arc<Download>),
    /// The cached copy (opened, pinned): a download finished since the caller looked.
    Cached(Arc<BlobPieces>),
}

/// A join's hold on its digest's cell: a join dropped before the cell holds a download (its
/// client went away while the metainfo or the piece file was on its way) takes the cell out
/// of `active` unless another join waits on it, so abandoned starts do not pile up there.
struct Abandoned<'a> {
    downloads: &'a Downloads,
    digest: &'a Digest,
    cell: Arc<OnceCell<Arc<Download>>>,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if !self.cell.initialized() {
            self.downloads.forget(self.digest, &self.cell);
        }
    }
}

/// Why [`Downloads::start`] did not start a download.
enum NotStarted {
    Cached,
    Failed(StoreError),
}

impl From<StoreError> for NotStarted {
    fn from(e: StoreError) -> NotStarted {
        NotStarted::Failed(e)
    }
}

/// Rounds of [`Downloads::join`]: each finds the blob cached but its copy gone (evicted, or
/// found bad and removed) when opened; the next one starts a download unless it is cached again.
const MAX_JOIN_ROUNDS: usize = 3;

impl Downloads {
    /// `auth`: the origins' access policy, which decides when origin calls need an anonymous
    /// token.
    pub fn new(
        cache: Arc<BlobCache>,
        origin: OriginClient,
        deps: SwarmDeps,
        swarm: SwarmConfig,
        auth: Arc<RemoteAuth>,
    ) -> Downloads {
        Downloads {
            cache,
            origin,
            deps,
            swarm,
            active: Mutex::new(HashMap::new()),
            next_reader: AtomicU64::new(1),
            seeding: std::sync::OnceLock::new(),
            auth,
        }
    }

    /// Where finished blobs are registered for seeding.
    pub fn set_seeding(&self, seeding: Arc<Seeding>) {
        let _ = self.seeding.set(seeding);
    }

    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<OnceCell<Arc<Download>>>>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every download in progress.
    pub fn all_running(&self) -> Vec<(Digest, Arc<Download>)> {
        self.active().iter().filter_map(|(d, cell)| cell.get().map(|dl| (d.clone(), dl.clone()))).collect()
    }

    /// The download of `digest` if one is running (for the peer server).
    pub fn running(&self, digest: &Digest) -> Option<Arc<Download>> {
        self.active().get(digest).and_then(|cell| cell.get().cloned())
    }

    /// The metainfo of a blob: from the trackers, else straight from the origin.
    pub async fn metainfo(&self, digest: &Digest) -> Result<Metainfo, StoreError> {
        Ok(self.metainfo_with_source(digest).await?.0)
    }

    async fn metainfo_with_source(&self, digest: &Digest) -> Result<(Metainfo, MetainfoSource), StoreError> {
        match self.deps.tracker.metainfo(digest).await {
            Ok(Some(json)) => Ok((decode_metainfo(&json, digest)?, MetainfoSource::Tracker)),
            Ok(None) => Err(StoreError::BlobUnknown),
            Err(e) => {
                tracing::debug!(%digest, error = %e, "tracker metainfo failed; asking the origin");
                Ok((self.origin_metainfo(digest).await?, MetainfoSource::Origin))
            }
        }
    }

    /// The metainfo of a blob straight from the origin (trackers hand out copies of it).
    async fn origin_metainfo(&self, digest: &Digest) -> Result<Metainfo, StoreError> {
        let json = self.origin.metainfo(digest).await?.ok_or(StoreError::BlobUnknown)?;
        decode_metainfo(&json, digest)
    }

    /// A cached blob, opened to be served (to a client or a peer): pinned, every piece read
    /// checked. A missing or bad metainfo beside it is fetched again from the origins and the
    /// blob checked against it. `None` if it is not cached (or was just found bad and
    /// removed). Not a tracker's copy: the file is deleted if it does not match, and a
    /// tracker's metainfo is not to be trusted (one with made-up chaining values deleted good
    /// blobs).
    pub async fn open_cached(&self, digest: &Digest) -> Option<Arc<BlobPieces>> {
        let cache = self.cache.clone();
        let d = digest.clone();
        let opened = tokio::task::spawn_blocking(move || cache.open_blob(&d)).await.ok()?;
        let opened = match opened {
            Cached::NeedsMetainfo => {
                let metainfo = match self.origin_metainfo(digest).await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(%digest, error = %e, "cannot fetch the metainfo of a cached blob");
                        return None;
                    }
                };
                let cache = self.cache.clone();
                let d = digest.clone();
                tokio::task::spawn_blocking(move || cache.adopt_metainfo(&d, metainfo)).await.ok()?
            }
            other => other,
        };
        match opened {
            Cached::Ready(pieces) => {
                // A use as a pull is: seeded for the window from now (before, only downloads
                // and peers' lookups counted, so a layer pulled from the cache went unseeded).
                if let Some(seeding) = self.seeding.get() {
                    seeding.touch(digest);
                }
                Some(pieces)
            }
            Cached::Missing | Cached::NeedsMetainfo => None,
        }
    }

    /// Join (or start) the download of `digest`, falling back to the origin via `repo`; or,
    /// when the blob was cached after the caller looked (a download that finished meanwhile),
    /// the cached copy, rather than a second download of it.
    /// `size`, when the caller knows it from the origins, is checked against the metainfo a
    /// new download starts from (see [`Downloads::start`]), and against a running one's.
    /// `client`: the credentials the client's request carried (see [`Downloads::credentials`]);
    /// the download's origin calls carry them, and its fallback asks as the newest joiner.
    pub async fn join(
        self: &Arc<Self>,
        repo: &RepoName,
        digest: &Digest,
        size: Option<u64>,
        client: Option<HeaderValue>,
    ) -> Result<Joined, StoreError> {
        let credentials = self.credentials(repo, client.clone()).await;
        let asker = Asker { repo: repo.clone(), client };
        let join = self.join_as(asker, digest, size);
        shoal_registry::auth::FORWARD_AUTHORIZATION.scope(credentials, join).await
    }

    async fn join_as(
        self: &Arc<Self>,
        asker: Asker,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<Joined, StoreError> {
        // A cached copy found bad when opened is removed: the next round downloads it.
        for _ in 0..MAX_JOIN_ROUNDS {
            let cell = self.active().entry(digest.clone()).or_default().clone();
            let joined = Abandoned { downloads: self, digest, cell };
            let cell = &joined.cell;
            match cell.get_or_try_init(|| self.start(&asker, digest, size)).await {
                // One started by a caller that did not know the size (a reader's restart):
                // its bytes are not served against a size they do not have.
                Ok(download) if size.is_some_and(|s| s != download.pieces().metainfo().size()) => {
                    return Err(StoreError::Unavailable(format!(
                        "{digest}: the running download's size is not the origins'"
                    )));
                }
                Ok(download) => {
                    download.asked_by(asker);
                    return Ok(Joined::Download(download.clone()));
                }
                Err(NotStarted::Failed(e)) => {
                    self.forget(digest, cell);
                    return Err(e);
                }
                Err(NotStarted::Cached) => {
                    self.forget(digest, cell);
                    if let Some(pieces) = self.open_cached(digest).await {
                        return Ok(Joined::Cached(pieces));
                    }
                }
            }
        }
        Err(StoreError::Unavailable(format!("{digest}: its cached copy keeps disappearing")))
    }

    /// Remove `digest`'s cell from `active` if it is still `cell` and no other join holds it
    /// (the map's and the caller's are the only references; joins take theirs under the
    /// lock). A join still waiting on the cell starts the download itself; removed under it,
    /// its download would run outside `active` and a third join would start a second one.
    fn forget(&self, digest: &Digest, cell: &Arc<OnceCell<Arc<Download>>>) {
        let mut active = self.active();
        let alone = Arc::strong_count(cell) == 2;
        if alone && active.get(digest).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            active.remove(digest);
        }
    }

    /// Start a download of `digest`, unless it is cached: no download of it runs (the caller
    /// holds its `active` cell), so one that just finished has put it there.
    ///
    /// A tracker's metainfo is checked against the digest's chain only piece by piece: one
    /// that claims a larger size could vouch, with a chain of its own, for the bytes of a
    /// range that ends before the last piece (which alone must make the digest). So a
    /// metainfo whose size is not the size the origins confirmed is replaced by the origin's
    /// own, and a download starts only from a metainfo of that size.
    async fn start(
        self: &Arc<Self>,
        asker: &Asker,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<Arc<Download>, NotStarted> {
        if self.cache.contains(digest) {
            return Err(NotStarted::Cached);
        }
        let (mut metainfo, mut source) = self.metainfo_with_source(digest).await?;
        if let Some(size) = size.filter(|&s| s != metainfo.size()) {
            if source == MetainfoSource::Tracker {
                tracing::warn!(%digest, size, claimed = metainfo.size(), "the tracker's metainfo has the wrong size; using the origin's");
                (metainfo, source) = (self.origin_metainfo(digest).await?, MetainfoSource::Origin);
            }
            if metainfo.size() != size {
                return Err(StoreError::Unavailable(format!(
                    "{digest}: the metainfo says {} bytes, the origins {size}",
                    metainfo.size()
                ))
                .into());
            }
        }
        let claim = Arc::new(self.cache.claim_partial(digest, metainfo.size()));
        let pieces = self.open_partial(digest, metainfo, None, Some(claim.clone())).await?;
        let download = Arc::new(Download::new(pieces, asker.clone(), source));
        let fallback = Arc::new(OriginFallback {
            downloads: self.clone(),
            download: Arc::downgrade(&download),
            digest: digest.clone(),
        });
        let this = self.clone();
        let task = download.clone();
        let digest = digest.clone();
        tokio::spawn(async move {
            // A panic must still end the download: left in `active`, its digest would be
            // joined by every later pull and never finish.
            let run = std::panic::AssertUnwindSafe(this.run(&task, fallback, &digest, source, &claim));
            let result = futures_util::FutureExt::catch_unwind(run)
                .await
                .unwrap_or_else(|_| Err("the download panicked".to_string()));
            if let Err(e) = &result {
                tracing::warn!(%digest, error = %e, "download failed");
            }
            task.outcome.send_replace(Some(result));
            // The download is over: later requests are served from the cache (or start anew).
            // Its own cell only (not yet set if the download ended within the instant its
            // join took to store it); another download's cell stays.
            let mut active = this.active();
            let own = |c: &Arc<OnceCell<Arc<Download>>>| c.get().is_none_or(|d| Arc::ptr_eq(d, &task));
            if active.get(&digest).is_some_and(own) {
                active.remove(&digest);
            }
        });
        Ok(download)
    }

    /// Make room for a download of `metainfo` and open its piece file (resumed if it exists),
    /// after discarding `previous` (a failed attempt's). Full-disk writes evict and retry.
    /// The opening has the digest's files to itself, and `claim` (the download's, when it
    /// starts) is held until it ends: when its caller goes away (a client that left while
    /// the download started) the opening runs on in the blocking pool, and neither a retry's
    /// opening nor an eviction of the idle partial may touch the file meanwhile.
    async fn open_partial(
        &self,
        digest: &Digest,
        metainfo: Metainfo,
        previous: Option<Arc<BlobPieces>>,
        claim: Option<Arc<PartialClaim>>,
    ) -> Result<Arc<BlobPieces>, StoreError> {
        let cache = self.cache.clone();
        let path = cache.partial_path(digest);
        tokio::task::spawn_blocking(move || {
            let _claim = claim;
            let _alone = cache.open_alone(metainfo.digest());
            if let Some(previous) = previous {
                if let Err(e) = previous.discard() {
                    tracing::warn!(error = %e, "could not delete a failed download's piece file");
                }
            }
            cache.make_room_for_download(metainfo.digest(), metainfo.size());
            // An eviction of this digest's idle partial may still be renaming its files aside.
            cache.wait_set_aside(metainfo.digest());
            let reclaim = cache.clone();
            BlobPieces::partial_reclaiming(
                &path,
                Arc::new(metainfo),
                Arc::new(move |need| reclaim.reclaim(need)),
            )
            .map(Arc::new)
        })
        .await
        .map_err(join_error)?
        .map_err(|e| StoreError::Internal(format!("piece file: {e}")))
    }

    async fn run(
        &self,
        download: &Arc<Download>,
        fallback: Arc<OriginFallback>,
        digest: &Digest,
        mut source: MetainfoSource,
        claim: &Arc<PartialClaim>,
    ) -> Result<(), String> {
        let started = std::time::Instant::now();
        let mut swarm_secs: f64;
        let mut attempt = 1;
        loop {
            let pieces = download.pieces();
            let readers = download.positions.subscribe();
            let swarmed = swarm::download(
                pieces.clone(),
                self.swarm.clone(),
                self.deps.clone(),
                fallback.clone(),
                readers,
            )
            .await;
            // Every piece held: the rest is moving the blob into the cache (its fsync).
            swarm_secs = started.elapsed().as_secs_f64();
            // Every piece is checked against the digest's own chain (`shoal_p2p::chain`), so a
            // finished download has its digest; what can fail is the swarm, and a metainfo
            // from the tracker that lies about the chain makes it fail at the last piece.
            let why = match swarmed {
                Ok(()) => match self.finish(&pieces, digest, claim).await {
                    Ok(()) => break,
                    Err(e) => return Err(e.to_string()),
                },
                Err(e) => e.to_string(),
            };
            if source != MetainfoSource::Tracker || attempt >= DOWNLOAD_ATTEMPTS {
                return Err(why);
            }
            // Asked as the clients (this task runs outside any request's scope).
            let ask = |origin: OriginClient, _: RepoName| async move {
                let json = origin.metainfo(digest).await?.ok_or(StoreError::BlobUnknown)?;
                decode_metainfo(&json, digest)
            };
            let origin = match self.as_clients(&Arc::downgrade(download), ask).await {
                Ok(m) => m,
                Err(e) => return Err(format!("{why} (and the origin's metainfo: {e})")),
            };
            if origin == **pieces.metainfo() {
                // The metainfo was right: a swarm failure of another kind, not ours to retry.
                return Err(why);
            }
            tracing::warn!(
                %digest, error = %why, attempt,
                "download failed in a way a bad metainfo explains; \
                 starting again from the origin's metainfo"
            );
            let fresh =
                self.open_partial(digest, origin, Some(pieces), None).await.map_err(|e| e.to_string())?;
            download.restart(fresh);
            source = MetainfoSource::Origin;
            attempt += 1;
        }
        if let Some(seeding) = self.seeding.get() {
            seeding.touch(digest);
        }
        self.deps.metrics.download_seconds.observe(started.elapsed().as_secs_f64());
        tracing::info!(%digest, secs = started.elapsed().as_secs_f64(), swarm_secs, "blob downloaded and verified");
        Ok(())
    }

    /// Move a complete download into the cache: its metainfo first (temp file and rename), then
    /// the blob, verified against its digest. On a digest mismatch the piece file is gone.
    async fn finish(
        &self,
        pieces: &Arc<BlobPieces>,
        digest: &Digest,
        claim: &Arc<PartialClaim>,
    ) -> Result<(), PieceError> {
        let pieces = pieces.clone();
        let cache = self.cache.clone();
        let digest = digest.clone();
        let claim = claim.clone();
        tokio::task::spawn_blocking(move || {
            cache.write_metainfo(pieces.metainfo())?;
            if let Err(e) = pieces.finish(&cache.blob_path(&digest)) {
                cache.discard_unfinished(&digest);
                return Err(e);
            }
            // Counted as a cached blob from here on, not as a partial download too.
            claim.finished();
            // Clients' readers and peers' connections hold these pieces and read the file
            // after it moved into the cache: pinned until the last of them lets go.
            pieces.keep(cache.insert_pinned(&digest, pieces.metainfo().size()));
            Ok(())
        })
        .await
        .map_err(|e| PieceError::Io(std::io::Error::other(e.to_string())))?
    }

    /// Stream `range` of a download to a client as its pieces arrive.
    pub fn stream(
        self: &Arc<Self>,
        repo: &RepoName,
        download: Arc<Download>,
        range: ByteRange,
    ) -> ByteStream {
        let digest = download.pieces().metainfo().digest().clone();
        self.reader(repo, &digest, Source::Download(download), range)
    }

    /// Stream `range` of a cached blob (from [`open_cached`](Self::open_cached)) to a client,
    /// checking each piece; from a new download of it if the file turns out bad.
    pub fn stream_cached(
        self: &Arc<Self>,
        repo: &RepoName,
        pieces: Arc<BlobPieces>,
        range: ByteRange,
    ) -> ByteStream {
        let digest = pieces.metainfo().digest().clone();
        self.reader(repo, &digest, Source::Cached(pieces), range)
    }

    fn reader(
        self: &Arc<Self>,
        repo: &RepoName,
        digest: &Digest,
        source: Source,
        range: ByteRange,
    ) -> ByteStream {
        let id = self.next_reader.fetch_add(1, Ordering::Relaxed);
        Reader::stream(self.clone(), repo.clone(), digest.clone(), source, id, range)
    }
}

fn decode_metainfo(json: &[u8], digest: &Digest) -> Result<Metainfo, StoreError> {
    let m: Metainfo = serde_json::from_slice(json)
        .map_err(|e| StoreError::Internal(format!("invalid metainfo for {digest}: {e}")))?;
    if m.digest() != digest {
        return Err(StoreError::Internal(format!("metainfo for another blob than {digest}")));
    }
    Ok(m)
}

#[cfg(test)]
mod tests;
