//! The agent's disk: complete, verified blobs under `cache/` (with their metainfo beside them)
//! and partial downloads under `partial/`, bounded together by the watermarks of
//! [`crate::disk`] (which decides; this module does the I/O). A pinned blob (being read or
//! seeded) and a running download are never removed. Losing any of it loses nothing: blobs
//! come back from the swarm.
//!
//! What is checked, when:
//! - At start: `partial/` is scanned; temp files, bitfields without data, and partial downloads
//!   idle for longer than `partial_max_age` are removed, the rest is counted. Leftovers of
//!   evictions and metainfo without a blob are removed from `cache/`. Blobs are not read.
//! - When a cached blob is opened to be served (to a local client or a peer): its metainfo
//!   must decode, name the blob and give the file's size; a file of the wrong size is removed.
//!   A missing or bad metainfo is fetched again and the whole file checked against it once
//!   ([`BlobCache::adopt_metainfo`]) before it is rewritten.
//! - Every piece read from a cached blob is checked against its hash before it is sent
//!   ([`BlobPieces::verifying_reads`]); a mismatch removes the blob, and the reader goes on
//!   from a new download of it.
//! - Every 60 s ([`BlobCache::maintain`]): idle partials are re-measured and the stale ones
//!   removed, and the watermarks applied (a share watermark follows the whole filesystem,
//!   which other programs fill too).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use shoal_p2p::blob::BlobPieces;
use shoal_p2p::piece_store::bitfield_path;
use shoal_registry::Digest;

pub use crate::disk::CacheLimits;
use crate::disk::{self, FsUsage};

/// How often idle partials are re-measured, stale ones removed and the watermarks applied.
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(60);

/// The directory of metainfo files inside the cache root.
const METAINFO_DIR: &str = "metainfo";
/// Suffix of a file set aside for deletion (renamed, then unlinked; see [`BlobCache::set_aside_all`]).
const EVICTED_SUFFIX: &str = ".evicted";

struct Entry {
    size: u64,
    last_used: u64,
    pins: u32,
    /// Tells this file apart from a later copy of the same blob (see `remove_corrupt`).
    generation: u64,
}

struct Partial {
    /// Counted bytes: the blob's size while its download runs, then what it holds on disk.
    bytes: u64,
    /// Downloads running into it (0 or 1).
    active: u32,
    idle_since: SystemTime,
}

#[derive(Default)]
struct State {
    entries: HashMap<Digest, Entry>,
    partials: HashMap<Digest, Partial>,
    /// Pins still held on copies removed while pinned (found corrupt, or gone from disk): their
    /// drops are taken here first, so they never unpin a newer copy's entry.
    orphan_pins: HashMap<Digest, u32>,
    /// Digests whose files are being renamed aside (outside the lock): a writer of one of
    /// their files waits until that is done ([`BlobCache::wait_set_aside`]). A count, as an
    /// eviction and a corrupt copy's removal may overlap.
    setting_aside: HashMap<Digest, u32>,
    /// Digests whose partial download's file is being opened ([`BlobCache::open_alone`]).
    opening: std::collections::HashSet<Digest>,
}

impl State {
    /// Remove `digest`'s entry, keeping count of the pins still held on it.
    fn remove_entry(&mut self, digest: &Digest) -> Option<Entry> {
        let e = self.entries.remove(digest)?;
        if e.pins > 0 {
            *self.orphan_pins.entry(digest.clone()).or_insert(0) += e.pins;
        }
        Some(e)
    }

    /// `digest`'s files are about to be renamed aside, outside the lock.
    fn begin_set_aside(&mut self, digest: &Digest) {
        *self.setting_aside.entry(digest.clone()).or_insert(0) += 1;
    }
}

/// Cache metrics (`shoal_agent_cache_*`, `shoal_agent_partial_bytes`, `shoal_agent_disk_full_total`).
#[derive(Clone)]
pub struct CacheMetrics {
    pub bytes: prometheus::IntGauge,
    pub partial_bytes: prometheus::IntGauge,
    pub evictions: prometheus::IntCounter,
    pub corrupt: prometheus::IntCounter,
    pub disk_full: prometheus::IntCounter,
}

impl CacheMetrics {
    pub fn new(registry: &prometheus::Registry) -> Result<CacheMetrics, prometheus::Error> {
        let m = CacheMetrics {
            bytes: prometheus::IntGauge::new("shoal_agent_cache_bytes", "Bytes of complete blobs cached")?,
            partial_bytes: prometheus::IntGauge::new(
                "shoal_agent_partial_bytes",
                "Bytes of partial downloads counted against the cache limits (running: the blob's size)",
            )?,
            evictions: prometheus::IntCounter::new("shoal_agent_cache_evictions_total", "Blobs evicted")?,
            corrupt: prometheus::IntCounter::new(
                "shoal_agent_cache_corrupt_total",
                "Cached blobs removed because their file no longer matched their digest or size",
            )?,
            disk_full: prometheus::IntCounter::new(
                "shoal_agent_disk_full_total",
                "Writes that found the disk full and evicted to make room",
            )?,
        };
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.partial_bytes.clone()))?;
        registry.register(Box::new(m.evictions.clone()))?;
        registry.register(Box::new(m.corrupt.clone()))?;
        registry.register(Box::new(m.disk_full.clone()))?;
        Ok(m)
    }
}

/// Reads the usage of the cache's filesystem (statvfs; replaceable in tests).
pub type UsageProbe = Box<dyn Fn() -> Option<FsUsage> + Send + Sync>;

/// Complete blobs under `<root>/<alg>/<hex>`, their metainfo under `<root>/metainfo/<alg>/<hex>`,
/// partial downloads under `<partial_root>/<alg>/<hex>` (with `.bitfield` beside).
pub struct BlobCache {
    root: PathBuf,
    partial_root: PathBuf,
    limits: CacheLimits,
    state: Mutex<State>,
    /// Signalled when a digest's files are free again: those set aside outside the lock are
    /// out of the way, or an opening of its partial file ended.
    files_free: Condvar,
    /// Runs before files are renamed aside (tests hold an eviction there).
    #[cfg(test)]
    before_set_aside: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// Runs once a partial file's opening has its digest to itself (tests hold one there).
    #[cfg(test)]
    pub(crate) before_open: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
    clock: AtomicU64,
    generation: AtomicU64,
    metrics: CacheMetrics,
    usage: UsageProbe,
    /// A pass over the watermarks is queued on the blocking pool ([`BlobCache::unpinned`]).
    room_queued: std::sync::atomic::AtomicBool,
    /// The most recently used blobs found at start, newest first, with when (see
    /// [`BlobCache::take_used_before_start`]).
    used_before_start: Mutex<Vec<(Digest, SystemTime)>>,
}

/// Blobs [`BlobCache::take_used_before_start`] remembers from the start-up scan: as many as
/// the agent seeds at once.
const USED_BEFORE_START: usize = 1000;

/// Keeps a blob from being evicted while it lives.
pub struct Pin {
    cache: Arc<BlobCache>,
    digest: Digest,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let released = {
            let mut state = self.cache.lock();
            if let Some(n) = state.orphan_pins.get_mut(&self.digest) {
                *n -= 1;
                if *n == 0 {
                    state.orphan_pins.remove(&self.digest);
                }
                false
            } else if let Some(e) = state.entries.get_mut(&self.digest) {
                e.pins = e.pins.saturating_sub(1);
                e.pins == 0
            } else {
                false
            }
        };
        if released {
            self.cache.unpinned();
        }
    }
}

/// Ends a [`State::begin_set_aside`] of each victim's digest when dropped, and wakes the
/// writers waiting on them.
struct SetAsideEnd<'a> {
    cache: &'a BlobCache,
    victims: &'a [(Digest, [PathBuf; 2])],
}

impl Drop for SetAsideEnd<'_> {
    fn drop(&mut self) {
        let mut state = self.cache.lock();
        for (digest, _) in self.victims {
            if let Some(n) = state.setting_aside.get_mut(digest) {
                *n -= 1;
                if *n == 0 {
                    state.setting_aside.remove(digest);
                }
            }
        }
        drop(state);
        self.cache.files_free.notify_all();
    }
}

/// A partial file's opening that has its digest to itself ([`BlobCache::open_alone`]); the
/// next one may start once this drops.
pub struct OpenAlone<'a> {
    cache: &'a BlobCache,
    digest: Digest,
}

impl Drop for OpenAlone<'_> {
    fn drop(&mut self) {
        self.cache.lock().opening.remove(&self.digest);
        self.cache.files_free.notify_all();
    }
}

/// A running download's claim on its partial file: counted at the blob's full size and never
/// removed while it lives. Dropped, the partial is idle (kept for a retry to resume, counted at
/// what it holds, removed when stale or for room); [`PartialClaim::finished`] forgets it (the
/// file became a cached blob or was discarded). Dropping does no I/O.
pub struct PartialClaim {
    cache: Arc<BlobCache>,
    digest: Digest,
    finished: std::sync::atomic::AtomicBool,
}

impl PartialClaim {
    /// The partial file is gone (moved into the cache, or discarded): stop counting it.
    pub fn finished(&self) {
        if self.finished.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut state = self.cache.lock();
        state.partials.remove(&self.digest);
        self.cache.publish(&state);
    }
}

impl Drop for PartialClaim {
    fn drop(&mut self) {
        if *self.finished.get_mut() {
            return;
        }
        let mut state = self.cache.lock();
        if let Some(p) = state.partials.get_mut(&self.digest) {
            p.active = p.active.saturating_sub(1);
            if p.active == 0 {
                p.idle_since = SystemTime::now();
            }
        }
    }
}

/// A cached blob, opened to be served.
pub enum Cached {
    /// Not in the cache (or just removed as corrupt).
    Missing,
    /// Its metainfo is missing or bad: fetch it and [`BlobCache::adopt_metainfo`].
    NeedsMetainfo,
    /// Pinned while it lives; every piece read is checked against its hash.
    Ready(Arc<BlobPieces>),
}

impl BlobCache {
    /// Open the cache (`root`) and partial (`partial_root`) directories: index the blobs, clean
    /// and count `partial/` (see the module docs). Blocking.
    pub fn open(
        root: &Path,
        partial_root: &Path,
        limits: CacheLimits,
        metrics: CacheMetrics,
    ) -> std::io::Result<BlobCache> {
        let usage_root = root.to_path_buf();
        let usage: UsageProbe = Box::new(move || match disk::fs_usage(&usage_root) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cache filesystem's usage");
                None
            }
        });
        BlobCache::open_with_usage(root, partial_root, limits, metrics, usage)
    }

    /// [`open`](Self::open) with the filesystem's usage read by `usage` (tests).
    pub fn open_with_usage(
        root: &Path,
        partial_root: &Path,
        limits: CacheLimits,
        metrics: CacheMetrics,
        usage: UsageProbe,
    ) -> std::io::Result<BlobCache> {
        std::fs::create_dir_all(root)?;
        std::fs::create_dir_all(partial_root)?;
        let generation = AtomicU64::new(1);
        let mut state = State::default();
        let mut found = Vec::new();
        for (alg, dir) in subdirs(root)? {
            if alg == METAINFO_DIR {
                continue;
            }
            for (name, path) in files(&dir)? {
                if name.ends_with(EVICTED_SUFFIX) {
                    remove_logged(&path);
                    continue;
                }
                let Ok(digest) = format!("{alg}:{name}").parse::<Digest>() else { continue };
                let meta = std::fs::metadata(&path)?;
                found.push((last_touched(&meta), digest, meta.len()));
            }
        }
        // Uses before the restart, as well as the files tell them: least recently used first.
        found.sort();
        let used_before_start =
            found.iter().rev().take(USED_BEFORE_START).map(|(at, d, _)| (d.clone(), *at)).collect();
        let mut tick = 0;
        for (_, digest, size) in found {
            tick += 1;
            let generation = generation.fetch_add(1, Ordering::Relaxed);
            state.entries.insert(digest, Entry { size, last_used: tick, pins: 0, generation });
        }
        // Metainfo without its blob (a crash between the two), temp files of metainfo writes.
        for (alg, dir) in subdirs(&root.join(METAINFO_DIR))? {
            for (name, path) in files(&dir)? {
                let blob = format!("{alg}:{name}").parse::<Digest>().ok();
                if !blob.is_some_and(|d| state.entries.contains_key(&d)) {
                    remove_logged(&path);
                }
            }
        }
        let now = SystemTime::now();
        for (alg, dir) in subdirs(partial_root)? {
            for (name, path) in files(&dir)? {
                let digest = format!("{alg}:{name}").parse::<Digest>().ok();
                let data = name.strip_suffix(".bitfield").map(|n| dir.join(n));
                let keep = match (&digest, data) {
                    (Some(_), _) => true,
                    // A bitfield is kept with its data file, which decides below.
                    (None, Some(data)) => data.exists(),
                    // Temp files, leftovers of evictions, anything else.
                    (None, None) => false,
                };
                if !keep {
                    remove_logged(&path);
                    continue;
                }
                let Some(digest) = digest else { continue };
                let meta = std::fs::metadata(&path)?;
                let modified = meta.modified().unwrap_or(now);
                if now.duration_since(modified).unwrap_or(Duration::ZERO) > limits.partial_max_age {
                    tracing::info!(path = %path.display(), "removing a stale partial download");
                    remove_logged(&path);
                    remove_logged(&bitfield_path(&path));
                    continue;
                }
                let bytes = on_disk(&meta);
                state.partials.insert(digest, Partial { bytes, active: 0, idle_since: modified });
            }
        }
        let cache = BlobCache {
            root: root.to_path_buf(),
            partial_root: partial_root.to_path_buf(),
            limits,
            state: Mutex::new(state),
            files_free: Condvar::new(),
            #[cfg(test)]
            before_set_aside: Mutex::new(None),
            #[cfg(test)]
            before_open: Mutex::new(None),
            clock: AtomicU64::new(tick + 1),
            generation,
            metrics,
            usage,
            room_queued: Default::default(),
            used_before_start: Mutex::new(used_before_start),
        };
        cache.publish(&cache.lock());
        cache.make_room(0);
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rename the files of `victims` aside, outside the lock (async requests take it, and a
    /// disk slow on metadata must not stall them while thousands of small layers go), then
    /// let the writers waiting on those digests go on. Each digest was entered with
    /// [`State::begin_set_aside`] under the lock that took it out of the index. Returns the
    /// renamed files, to unlink. Blocking.
    fn set_aside_all(&self, victims: Vec<(Digest, [PathBuf; 2])>) -> Vec<PathBuf> {
        if victims.is_empty() {
            return Vec::new();
        }
        // Ends the set-aside however this returns, so no writer of these digests waits for good.
        let _end = SetAsideEnd { cache: self, victims: &victims };
        #[cfg(test)]
        if let Some(hook) = self.before_set_aside.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            hook();
        }
        victims.iter().flat_map(|(_, paths)| paths.iter().filter_map(|p| set_aside(p))).collect()
    }

    /// Wait until no file of `digest` is being renamed aside: call before writing one (a
    /// partial download's file, a metainfo, a finished blob), so the rename cannot take the
    /// new file. Blocking.
    pub fn wait_set_aside(&self, digest: &Digest) {
        let mut state = self.lock();
        while state.setting_aside.contains_key(digest) {
            state = self.files_free.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Have `digest`'s partial download file to this opening alone until the guard drops:
    /// waits until no other opening of it runs, nor a renaming aside of its files. A start
    /// whose client went away goes on opening the file in the blocking pool (checking a
    /// resumed file's pieces takes a while); a retry's start must not open, check and
    /// rewrite the same file and bitfield beside it. Blocking.
    pub fn open_alone(&self, digest: &Digest) -> OpenAlone<'_> {
        let mut state = self.lock();
        while state.opening.contains(digest) || state.setting_aside.contains_key(digest) {
            state = self.files_free.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.opening.insert(digest.clone());
        drop(state);
        let alone = OpenAlone { cache: self, digest: digest.clone() };
        #[cfg(test)]
        {
            let hook = self.before_open.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(hook) = hook {
                hook();
            }
        }
        alone
    }

    /// How many downloads claim `digest`'s partial file (tests).
    #[cfg(test)]
    pub(crate) fn claims(&self, digest: &Digest) -> u32 {
        self.lock().partials.get(digest).map_or(0, |p| p.active)
    }

    fn publish(&self, state: &State) {
        let cached: u64 = state.entries.values().map(|e| e.size).sum();
        let partial: u64 = state.partials.values().map(|p| p.bytes).sum();
        self.metrics.bytes.set(i64::try_from(cached).unwrap_or(i64::MAX));
        self.metrics.partial_bytes.set(i64::try_from(partial).unwrap_or(i64::MAX));
    }

    /// Where a complete blob lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join(digest.algorithm().name()).join(digest.hex())
    }

    /// Where a cached blob's metainfo lives (JSON), for seeding after a restart.
    pub fn metainfo_path(&self, digest: &Digest) -> PathBuf {
        self.root.join(METAINFO_DIR).join(digest.algorithm().name()).join(digest.hex())
    }

    /// Where a download of `digest` assembles its pieces.
    pub fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.partial_root.join(digest.algorithm().name()).join(digest.hex())
    }

    /// Whether a blob is cached; unlike [`get`](Self::get), not a use (background checks
    /// must not reorder eviction).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.lock().entries.contains_key(digest)
    }

    /// Size of a cached blob; counts as a use.
    pub fn get(&self, digest: &Digest) -> Option<u64> {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        let e = state.entries.get_mut(digest)?;
        e.last_used = tick;
        Some(e.size)
    }

    /// Pin a cached blob for the life of the returned guard.
    pub fn pin(self: &Arc<Self>, digest: &Digest) -> Option<Pin> {
        self.pin_with_generation(digest).map(|(pin, _)| pin)
    }

    fn pin_with_generation(self: &Arc<Self>, digest: &Digest) -> Option<(Pin, u64)> {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        let e = state.entries.get_mut(digest)?;
        e.pins += 1;
        e.last_used = tick;
        Some((Pin { cache: self.clone(), digest: digest.clone() }, e.generation))
    }

    /// Claim the partial file of a download of `digest` (`size` bytes) that starts now. Call
    /// [`make_room`](Self::make_room) with `size` next, from the blocking pool.
    pub fn claim_partial(self: &Arc<Self>, digest: &Digest, size: u64) -> PartialClaim {
        let mut state = self.lock();
        let p = state.partials.entry(digest.clone()).or_insert(Partial {
            bytes: size,
            active: 0,
            idle_since: SystemTime::now(),
        });
        p.active += 1;
        p.bytes = size;
        self.publish(&state);
        PartialClaim { cache: self.clone(), digest: digest.clone(), finished: Default::default() }
    }

    /// Record a blob just finished into `blob_path`, then apply the watermarks. Blocking.
    pub fn insert(&self, digest: &Digest, size: u64) {
        self.record(digest, size, 0);
        self.make_room(0);
    }

    /// [`insert`](Self::insert), pinned before the watermarks apply: for a finished download,
    /// whose clients and peers go on reading the file after it moved into the cache.
    pub fn insert_pinned(self: &Arc<Self>, digest: &Digest, size: u64) -> Pin {
        self.record(digest, size, 1);
        let pin = Pin { cache: self.clone(), digest: digest.clone() };
        self.make_room(0);
        pin
    }

    fn record(&self, digest: &Digest, size: u64, pins: u32) {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        // A copy written over one still pinned (a second download of a blob already cached)
        // keeps its pins: they are the readers' and seeders' of this digest.
        let pins = state.entries.get(digest).map_or(0, |e| e.pins) + pins;
        state.entries.insert(digest.clone(), Entry { size, last_used: tick, pins, generation });
        self.publish(&state);
    }

    /// Bytes of complete blobs held.
    pub fn total(&self) -> u64 {
        self.lock().entries.values().map(|e| e.size).sum()
    }

    /// Bytes of partial downloads counted.
    /// The blobs found in the cache at start, newest first, with when each was last written
    /// or read as the files tell it (at most [`USED_BEFORE_START`]), once: a restarted agent
    /// goes on seeding what it pulled within the seed window before.
    pub fn take_used_before_start(&self) -> Vec<(Digest, SystemTime)> {
        std::mem::take(&mut *self.used_before_start.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn partial_total(&self) -> u64 {
        self.lock().partials.values().map(|p| p.bytes).sum()
    }
}

/// When a cached blob's file was last written or (as far as the mount records reads, e.g.
/// `relatime`: about daily) read: its place in the eviction order after a restart, which
/// before took blobs in digest order, a layer pulled a minute ago as soon as a stale one.
fn last_touched(meta: &std::fs::Metadata) -> SystemTime {
    let written = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    meta.accessed().map_or(written, |read| read.max(written))
}

/// Bytes a file occupies on disk (a partial download is sparse until filled).
fn on_disk(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks().saturating_mul(512)
}

/// Rename `path` aside for deletion; the new name, if it existed.
fn set_aside(path: &Path) -> Option<PathBuf> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(EVICTED_SUFFIX);
    let aside = PathBuf::from(aside);
    match std::fs::rename(path, &aside) {
        Ok(()) => Some(aside),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot set a file aside for deletion");
            None
        }
    }
}

fn remove_logged(path: &Path) {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a file");
        }
        _ => {}
    }
}

/// `(name, path)` of each directory in `dir` (none if `dir` does not exist).
fn subdirs(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    entries(dir, true)
}

/// `(name, path)` of each file in `dir`.
fn files(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    entries(dir, false)
}

fn entries(dir: &Path, dirs: bool) -> std::io::Result<Vec<(String, PathBuf)>> {
    let read = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in read {
        let entry = entry?;
        if entry.file_type()?.is_dir() == dirs {
            out.push((entry.file_name().to_string_lossy().to_string(), entry.path()));
        }
    }
    Ok(out)
}

mod eviction;
mod opening;

#[cfg(test)]
mod tests;
