//! [`BlobPieces`]: one blob as the swarm sees it, whether still being assembled from pieces or
//! complete on disk. Downloads write into it, the peer server and local readers read from it,
//! and everyone can wait for new pieces. It stays readable across the switch from partial file
//! to finished blob.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use tokio::sync::watch;

use crate::bitfield::Bitfield;
use crate::metainfo::Metainfo;
use crate::piece_store::{is_disk_full, read_new_at, PieceError, PieceFile};

mod fresh;
pub use fresh::{FRESH_PIECES, RECENT_BYTES};

/// The shortest time between two persists of a download's bitfield. Persisting after every
/// piece costs several fsyncs per piece and capped a download at ~100 MB/s.
const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// Verified bytes a download gathers before its bitfield is persisted again (once
/// [`FLUSH_INTERVAL`] has passed). On a 50 Mbit/s link half a second is 3 MiB: persisting
/// then (two fsyncs, a rename) cost a 20-host fleet's agents 4-5 % of their CPU per byte.
const FLUSH_BYTES: u64 = 8 * 1024 * 1024;
/// The longest a slow download's verified pieces wait to be persisted, however few bytes they
/// are. A killed agent loses at most the larger of [`FLUSH_INTERVAL`] and the smaller of
/// [`FLUSH_BYTES`] and this of verified work.
const FLUSH_MAX_INTERVAL: std::time::Duration = std::time::Duration::from_secs(4);

/// Verified pieces not yet persisted: since when, and how many bytes.
#[derive(Clone, Copy, Debug)]
struct Unflushed {
    since: std::time::Instant,
    bytes: u64,
}

impl Unflushed {
    fn none() -> Unflushed {
        Unflushed { since: std::time::Instant::now(), bytes: 0 }
    }

    /// Whether the bitfield is due to be persisted at `now`.
    fn due(&self, now: std::time::Instant) -> bool {
        let waited = now.saturating_duration_since(self.since);
        waited >= FLUSH_MAX_INTERVAL || (waited >= FLUSH_INTERVAL && self.bytes >= FLUSH_BYTES)
    }
}

/// Room a bitfield file needs when the disk is full: a bit per piece plus its header,
/// rounded up to whole 64 KiB (a few filesystem blocks, whatever the filesystem).
fn bitfield_room(metainfo: &Metainfo) -> u64 {
    const UNIT: u64 = 64 * 1024;
    let bytes = u64::from(metainfo.piece_count()).div_ceil(8) + 1024;
    bytes.div_ceil(UNIT) * UNIT
}

/// How many times one write that finds the disk full asks for room and tries again.
const DISK_FULL_RETRIES: u32 = 3;

/// Frees disk space for a download that found the disk full: given the bytes the download
/// still has to write, deletes what it may (e.g. evicts cached blobs) and says whether it freed
/// anything. Called from the blocking pool, possibly with this blob's state lock held.
pub type Reclaim = Arc<dyn Fn(u64) -> bool + Send + Sync>;

/// Told the index of a piece of a complete blob whose bytes on disk do not match its hash (or
/// that could not be read whole): the file went bad after it was verified.
pub type OnCorrupt = Box<dyn Fn(u32) + Send + Sync>;

enum State {
    Partial(PieceFile, Unflushed),
    /// The finished blob (its path is in `BlobPieces::finished`).
    Complete {
        file: File,
    },
    /// The assembled blob did not match its digest.
    Failed,
}

fn failed() -> PieceError {
    PieceError::Io(std::io::Error::other("blob failed verification and was discarded"))
}

/// Which pieces are held, readable without any lock: async tasks ask `has`/`have` all the
/// time, and must never wait on the state lock while a writer holds it across an fsync. A bit
/// is set only after its piece's bytes are written (under the state lock), so a reader that
/// sees it can read the piece.
struct HeldPieces {
    words: Vec<std::sync::atomic::AtomicU64>,
    len: u32,
    /// The blob failed verification: nothing is held any more.
    failed: std::sync::atomic::AtomicBool,
}

impl HeldPieces {
    fn from(have: &Bitfield) -> HeldPieces {
        let words = (0..have.len().div_ceil(64))
            .map(|w| {
                let bits = (0..64u32)
                    .filter(|b| {
                        let i = w * 64 + b;
                        i < have.len() && have.get(i)
                    })
                    .fold(0u64, |acc, b| acc | (1 << b));
                std::sync::atomic::AtomicU64::new(bits)
            })
            .collect();
        HeldPieces { words, len: have.len(), failed: std::sync::atomic::AtomicBool::new(false) }
    }

    fn get(&self, index: u32) -> bool {
        use std::sync::atomic::Ordering::Acquire;
        if index >= self.len || self.failed.load(Acquire) {
            return false;
        }
        let word = self.words[(index / 64) as usize].load(Acquire);
        word & (1 << (index % 64)) != 0
    }

    fn set(&self, index: u32) {
        if index < self.len {
            self.words[(index / 64) as usize]
                .fetch_or(1 << (index % 64), std::sync::atomic::Ordering::Release);
        }
    }

    fn fail(&self) {
        self.failed.store(true, std::sync::atomic::Ordering::Release);
    }

    fn snapshot(&self) -> Bitfield {
        let mut out = Bitfield::new(self.len);
        for i in (0..self.len).filter(|&i| self.get(i)) {
            let _ = out.set(i);
        }
        out
    }
}

/// A blob this node has all or some pieces of.
pub struct BlobPieces {
    metainfo: Arc<Metainfo>,
    /// The file and its persistence; writers and readers of bytes take it, never async code.
    state: RwLock<State>,
    /// What async code asks: which pieces are held (see [`HeldPieces`]).
    held: HeldPieces,
    /// Where the finished blob lives, once it does.
    finished: std::sync::OnceLock<PathBuf>,
    /// Number of pieces held; changes whenever a piece arrives.
    progress: watch::Sender<u32>,
    /// Held while writing a piece's bytes. The kernel writes to one file one at a time anyway
    /// (ext4 takes the inode lock), and writers left to race there spin on it: 8% of an
    /// agent's CPU in a profile. Waiting here sleeps instead, and readers are not involved.
    writing: std::sync::Mutex<()>,
    /// Whatever must live as long as this blob is served (e.g. a cache pin against eviction):
    /// set once, when it is opened from the cache or when its download moved it there.
    guard: std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>>,
    /// Where a write that finds the disk full asks for room (see [`BlobPieces::reclaiming`]).
    reclaim: Option<Reclaim>,
    /// For a complete blob: every piece read is checked against its hash, and a mismatch is
    /// reported here (see [`BlobPieces::verifying_reads`]).
    on_corrupt: Option<OnCorrupt>,
    /// Verified pieces just ahead of the slowest local reader (see [`fresh`]).
    fresh: std::sync::Mutex<fresh::Fresh>,
}

/// Run `write`; when it finds the disk full, ask `reclaim` (if any) for `need()` bytes and run
/// it again, up to [`DISK_FULL_RETRIES`] times: the one policy for a download's writes and for
/// the allocation of its piece file.
fn retry_when_full<T>(
    reclaim: Option<&Reclaim>,
    metainfo: &Metainfo,
    need: impl Fn() -> u64,
    mut write: impl FnMut() -> Result<T, PieceError>,
) -> Result<T, PieceError> {
    let mut attempts = 0;
    loop {
        match write() {
            Err(PieceError::Io(e)) if is_disk_full(&e) && attempts < DISK_FULL_RETRIES => {
                let Some(reclaim) = reclaim else { return Err(PieceError::Io(e)) };
                attempts += 1;
                let missing = need();
                tracing::warn!(
                    digest = %metainfo.digest(), missing, attempt = attempts,
                    "disk full while writing a download; making room"
                );
                if !reclaim(missing) {
                    return Err(PieceError::Io(e));
                }
            }
            other => return other,
        }
    }
}

impl BlobPieces {
    /// A complete blob file (a cache entry or an origin's blob). Blocking.
    pub fn complete(path: &Path, metainfo: Arc<Metainfo>) -> Result<BlobPieces, PieceError> {
        let file = File::open(path)?;
        let count = metainfo.piece_count();
        let finished = std::sync::OnceLock::new();
        let _ = finished.set(path.to_path_buf());
        Ok(BlobPieces {
            held: HeldPieces::from(&Bitfield::full(count)),
            finished,
            metainfo,
            state: RwLock::new(State::Complete { file }),
            progress: watch::Sender::new(count),
            writing: std::sync::Mutex::new(()),
            guard: std::sync::OnceLock::new(),
            reclaim: None,
            on_corrupt: None,
            fresh: Default::default(),
        })
    }

    /// Keep `guard` alive for as long as this blob is (e.g. a cache pin while seeding).
    pub fn with_guard(self, guard: impl std::any::Any + Send + Sync) -> BlobPieces {
        self.keep(guard);
        self
    }

    /// [`with_guard`](Self::with_guard) for a blob already shared: whoever holds it (a
    /// client's reader, a peer's connection) keeps `guard` alive. Only the first guard is
    /// kept; a later one is dropped at once (returns whether it was kept).
    pub fn keep(&self, guard: impl std::any::Any + Send + Sync) -> bool {
        self.guard.set(Box::new(guard)).is_ok()
    }

    /// Check every piece of a complete blob as it is read (for peers or local clients) against
    /// its hash: a piece whose bytes on disk changed since the blob was verified (a bad sector,
    /// a truncated file) is never served; the read fails and `on_corrupt` is told, so the owner
    /// can drop the file and fetch the blob again. Costs one SHA-256 pass over what is read.
    pub fn verifying_reads(mut self, on_corrupt: impl Fn(u32) + Send + Sync + 'static) -> BlobPieces {
        self.on_corrupt = Some(Box::new(on_corrupt));
        self
    }

    /// When a write of this download finds the disk full, ask `reclaim` for room and try again
    /// (up to `DISK_FULL_RETRIES` times) before failing.
    pub fn reclaiming(mut self, reclaim: Reclaim) -> BlobPieces {
        self.reclaim = Some(reclaim);
        self
    }

    /// [`BlobPieces::partial`], then [`BlobPieces::reclaiming`]; the piece file's allocation
    /// (the whole blob, at creation) asks `reclaim` for room too when the disk is full.
    /// Blocking.
    pub fn partial_reclaiming(
        path: &Path,
        metainfo: Arc<Metainfo>,
        reclaim: Reclaim,
    ) -> Result<BlobPieces, PieceError> {
        let size = metainfo.size();
        let open = || BlobPieces::partial(path, metainfo.clone());
        let blob = retry_when_full(Some(&reclaim), &metainfo, || size, open)?;
        Ok(blob.reclaiming(reclaim))
    }

    /// A blob being downloaded into the piece file at `path` (resumed if it exists). Blocking.
    ///
    /// A resumed file's held pieces are read back and checked against their hashes first: the
    /// bitfield says they were verified when written, but the disk may have lost them since (a
    /// bad sector, a crash that kept the bitfield but not the data). A piece that fails is
    /// fetched again: the blob is finished only with every piece checked.
    pub fn partial(path: &Path, metainfo: Arc<Metainfo>) -> Result<BlobPieces, PieceError> {
        // Persistence is driven by time and bytes here (see `Unflushed`), not by the piece count.
        let mut file = PieceFile::open(path, (*metainfo).clone())?.with_persist_every(u32::MAX);
        let held: Vec<u32> = file.have().iter_set().collect();
        let mut dropped = 0u32;
        for index in held {
            match file.read_piece(index) {
                Ok(data) if metainfo.verify_piece(index, &data) => {}
                _ => {
                    file.forget(index)?;
                    dropped += 1;
                }
            }
        }
        if dropped > 0 {
            tracing::warn!(
                path = %path.display(), dropped,
                "held pieces of a resumed download no longer match their hashes; fetching them again"
            );
        }
        let count = file.have().count();
        let held = HeldPieces::from(file.have());
        let state = State::Partial(file, Unflushed::none());
        Ok(BlobPieces {
            held,
            finished: std::sync::OnceLock::new(),
            metainfo,
            state: RwLock::new(state),
            progress: watch::Sender::new(count),
            writing: std::sync::Mutex::new(()),
            guard: std::sync::OnceLock::new(),
            reclaim: None,
            on_corrupt: None,
            fresh: Default::default(),
        })
    }

    pub fn metainfo(&self) -> &Arc<Metainfo> {
        &self.metainfo
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The pieces held now. Takes no lock a writer holds (async code calls it).
    pub fn have(&self) -> Bitfield {
        self.held.snapshot()
    }

    /// Whether piece `index` is held. Takes no lock a writer holds (async code calls it).
    pub fn has(&self, index: u32) -> bool {
        self.held.get(index)
    }

    fn fresh(&self) -> std::sync::MutexGuard<'_, fresh::Fresh> {
        self.fresh.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Local readers are at piece `floor` or beyond (`None`: no reader is): verified pieces
    /// from there on may be kept in memory for them (see [`BlobPieces::keep_verified`]).
    /// Takes no lock a writer holds.
    pub fn set_reader_floor(&self, floor: Option<u32>) {
        self.fresh().set_floor(floor);
    }

    /// Piece `index`, just verified and stored, with the bytes it was verified from: kept in
    /// memory if a local reader is within [`FRESH_PIECES`] of it, so the reader sends it
    /// without reading it back from disk, and among the newest [`RECENT_BYTES`] for peers
    /// ([`BlobPieces::piece_in_memory`]) until the blob is finished. Bytes of the wrong
    /// length are ignored.
    pub fn keep_verified(&self, index: u32, data: Bytes) {
        let fits = self.metainfo.piece_range(index).is_some_and(|(_, len)| len == data.len() as u64);
        // Under the state lock, so `finish`'s clearing cannot come between the check and
        // the keeping (both take the state lock first, then the fresh one).
        let state = self.read_state();
        if fits && self.held.get(index) && matches!(&*state, State::Partial(..)) {
            self.fresh().keep(index, data);
        }
    }

    /// The whole of held piece `index` if it is kept in memory (see
    /// [`BlobPieces::keep_verified`]). Never blocks on I/O (async code calls it).
    pub fn piece_in_memory(&self, index: u32) -> Option<Bytes> {
        if !self.held.get(index) {
            return None;
        }
        self.fresh().get_any(index).cloned()
    }

    /// The bytes from `offset` to the end of its piece, if that piece is kept in memory for
    /// readers. Never blocks on I/O (async code calls it).
    pub fn fresh_at(&self, offset: u64) -> Option<Bytes> {
        let index = self.metainfo.piece_index_at(offset)?;
        let (start, _) = self.metainfo.piece_range(index)?;
        if !self.held.get(index) {
            return None;
        }
        let fresh = self.fresh();
        let data = fresh.get(index)?;
        let from = usize::try_from(offset - start).ok().filter(|&f| f < data.len())?;
        Some(data.slice(from..))
    }

    /// Every piece is held (the blob may not be finished into its final place yet).
    pub fn is_complete(&self) -> bool {
        *self.progress.borrow() == self.metainfo.piece_count()
    }

    /// Where the finished blob lives, once it does. Takes no lock a writer holds.
    pub fn finished_path(&self) -> Option<PathBuf> {
        self.finished.get().cloned()
    }

    /// Watch the number of pieces held.
    pub fn subscribe(&self) -> watch::Receiver<u32> {
        self.progress.subscribe()
    }

    /// Verify and store a piece; `Ok(true)` if it was new. Blocking.
    pub fn write_piece(&self, index: u32, data: &[u8]) -> Result<bool, PieceError> {
        // Verify outside the lock so readers are not held up by hashing.
        if !self.metainfo.verify_piece(index, data) {
            return Err(PieceError::HashMismatch { index });
        }
        // The bytes go in under the shared lock, so readers carry on meanwhile (writing fresh
        // page cache can take a millisecond per piece); writers take turns (see `writing`).
        {
            let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
            match &*self.read_state() {
                State::Partial(file, _) if file.have().get(index) => return Ok(false),
                State::Partial(file, _) => self.retry_when_full(|| file.write_data(index, data))?,
                State::Complete { .. } => return Ok(false),
                State::Failed => return Err(failed()),
            }
        }
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let (file, flushed) = match &mut *state {
            State::Partial(file, flushed) => (file, flushed),
            State::Complete { .. } => return Ok(false),
            State::Failed => return Err(failed()),
        };
        if !file.mark_written(index)? {
            return Ok(false);
        }
        self.held.set(index);
        // Persisting stays under the exclusive lock: a download then cannot run ahead of its
        // last persisted bitfield by more than the flush rule allows (see `Unflushed`),
        // whatever the disk's fsync takes. (Persisting a snapshot outside the lock let a slow
        // disk leave a crashed agent with nothing persisted after seconds of verified pieces.)
        flushed.bytes += data.len() as u64;
        let now = std::time::Instant::now();
        if flushed.due(now) {
            match self.flush_bitfield(file) {
                Ok(()) => *flushed = Unflushed::none(),
                // The piece is written and held: only its record is late, which a crash turns
                // into pieces fetched again, not into a failed download. Asked again at the
                // flush rule's pace.
                Err(PieceError::Io(e)) if is_disk_full(&e) => {
                    tracing::warn!(
                        digest = %self.metainfo.digest(), unflushed = flushed.bytes,
                        "disk full: the download's bitfield is not persisted yet"
                    );
                    flushed.since = now;
                }
                Err(e) => return Err(e),
            }
        }
        let count = file.have().count();
        drop(state);
        self.publish_count(count);
        Ok(true)
    }

    /// Persist the bitfield of a partial download now (on shutdown), so a restart resumes
    /// with every verified piece. Blocking (an fsync).
    pub fn persist(&self) -> Result<(), PieceError> {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if let State::Partial(file, flushed) = &mut *state {
            self.flush_bitfield(file)?;
            *flushed = Unflushed::none();
        }
        Ok(())
    }

    /// Persist `file`'s bitfield; when the disk is full, the room asked for is the bitfield
    /// file's, not the rest of the download (whose piece file was allocated whole at its
    /// start: asking for it evicted gigabytes of cached blobs for a file of kilobytes).
    fn flush_bitfield(&self, file: &mut PieceFile) -> Result<(), PieceError> {
        let room = bitfield_room(&self.metainfo);
        retry_when_full(self.reclaim.as_ref(), &self.metainfo, || room, || file.flush())
    }

    /// Run `write`; when it finds the disk full, ask the reclaimer (if any) for room for the
    /// rest of the download and run it again, a few times at most.
    fn retry_when_full<T>(&self, write: impl FnMut() -> Result<T, PieceError>) -> Result<T, PieceError> {
        retry_when_full(self.reclaim.as_ref(), &self.metainfo, || self.bytes_missing(), write)
    }

    /// About how many bytes this download has still to write (whole pieces missing).
    fn bytes_missing(&self) -> u64 {
        let missing = u64::from(self.metainfo.piece_count().saturating_sub(*self.progress.borrow()));
        missing.saturating_mul(self.metainfo.piece_length()).min(self.metainfo.size())
    }

    /// Give up on a partial download: its piece file and bitfield are deleted and every read
    /// fails from now on (a complete blob is left alone). Blocking.
    pub fn discard(&self) -> Result<(), PieceError> {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        match std::mem::replace(&mut *state, State::Failed) {
            State::Partial(file, _) => {
                self.held.fail();
                self.fresh().clear();
                file.discard()
            }
            State::Failed => Ok(()),
            complete => {
                *state = complete;
                Ok(())
            }
        }
    }

    /// Announce `count` pieces held. Two writers can get here in either order after releasing
    /// the state lock, so only an increase is published; otherwise the later of them could set
    /// the count back, and a finished download would never look complete (its swarm then
    /// stalled for 60 s with every piece held, as seen in the preheat test).
    fn publish_count(&self, count: u32) {
        self.progress.send_if_modified(|held| {
            let newer = count > *held;
            if newer {
                *held = count;
            }
            newer
        });
    }

    /// Read up to `max` bytes at `offset` into a new buffer, stopping at the first missing
    /// piece (empty at the end of the blob); `Missing` if the piece at `offset` is not held.
    /// Blocking.
    pub fn read_new_at(&self, offset: u64, max: usize) -> Result<Vec<u8>, PieceError> {
        match &*self.read_state() {
            State::Partial(f, _) => f.read_new_at(offset, max),
            State::Complete { file, .. } => {
                let size = self.metainfo.size();
                if offset >= size {
                    return Ok(Vec::new());
                }
                let n = max.min(usize::try_from(size - offset).unwrap_or(usize::MAX));
                Ok(read_new_at(file, offset, n)?)
            }
            State::Failed => Err(failed()),
        }
    }

    /// One whole piece. Blocking. For a complete blob opened with
    /// [`verifying_reads`](Self::verifying_reads), the piece is checked against its hash.
    pub fn read_piece(&self, index: u32) -> Result<Vec<u8>, PieceError> {
        let count = self.metainfo.piece_count();
        let (offset, len) =
            self.metainfo.piece_range(index).ok_or(PieceError::OutOfRange { index, count })?;
        let len = usize::try_from(len).map_err(|_| PieceError::OutOfRange { index, count })?;
        let read = match &*self.read_state() {
            State::Partial(f, _) => return f.read_piece(index),
            State::Complete { file, .. } => read_new_at(file, offset, len),
            State::Failed => return Err(failed()),
        };
        let Some(on_corrupt) = &self.on_corrupt else { return Ok(read?) };
        match read {
            Ok(data) if self.metainfo.verify_piece(index, &data) => Ok(data),
            Ok(_) => {
                on_corrupt(index);
                Err(PieceError::HashMismatch { index })
            }
            // Shorter than its metainfo says: truncated since it was verified.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                on_corrupt(index);
                Err(PieceError::HashMismatch { index })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Move the complete download to `dest`; readers continue from there. Every piece was
    /// checked against the digest's chain as it was written, so the blob has its digest
    /// without being read again (see [`crate::chain`]). On failure the blob is unusable and
    /// reads fail. Blocking: the data's fsync runs under the shared lock, so readers go on;
    /// the exclusive lock covers the rename.
    pub fn finish(&self, dest: &Path) -> Result<(), PieceError> {
        if let State::Partial(pieces, _) = &*self.read_state() {
            pieces.sync()?;
        }
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        match std::mem::replace(&mut *state, State::Failed) {
            State::Partial(pieces, _) => {
                if let Err(e) = pieces.finish(dest) {
                    self.held.fail();
                    return Err(e);
                }
                let file = File::open(dest).inspect_err(|_| self.held.fail())?;
                *state = State::Complete { file };
                let _ = self.finished.set(dest.to_path_buf());
                // The file serves from here on; whoever keeps this blob open keeps no copies.
                self.fresh().clear();
                Ok(())
            }
            other => {
                *state = other;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests;
