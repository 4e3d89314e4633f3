//! [`BlobPieces`]: one blob as the swarm sees it, whether still being assembled from pieces or
//! complete on disk. Downloads write into it, the peer server and local readers read from it,
//! and everyone can wait for new pieces. It stays readable across the switch from partial file
//! to finished blob.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::bitfield::Bitfield;
use crate::metainfo::Metainfo;
use crate::piece_store::{PieceError, PieceFile};

/// How often the bitfield is persisted (after an fdatasync of the data). Persisting after every
/// piece costs several fsyncs per piece and capped a download at ~100 MB/s; a crash now loses
/// at most this much of verified work.
const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

enum State {
    Partial(PieceFile, std::time::Instant),
    Complete {
        file: File,
        path: PathBuf,
    },
    /// The assembled blob did not match its digest.
    Failed,
}

fn failed() -> PieceError {
    PieceError::Io(std::io::Error::other("blob failed verification and was discarded"))
}

/// A blob this node has all or some pieces of.
pub struct BlobPieces {
    metainfo: Arc<Metainfo>,
    state: RwLock<State>,
    /// Number of pieces held; changes whenever a piece arrives.
    progress: watch::Sender<u32>,
    /// Whatever must live as long as this blob is served (e.g. a cache pin against eviction).
    _guard: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl BlobPieces {
    /// A complete blob file (a cache entry or an origin's blob). Blocking.
    pub fn complete(path: &Path, metainfo: Arc<Metainfo>) -> Result<BlobPieces, PieceError> {
        let file = File::open(path)?;
        let count = metainfo.piece_count();
        Ok(BlobPieces {
            metainfo,
            state: RwLock::new(State::Complete { file, path: path.to_path_buf() }),
            progress: watch::Sender::new(count),
            _guard: None,
        })
    }

    /// Keep `guard` alive for as long as this blob is (e.g. a cache pin while seeding).
    pub fn with_guard(mut self, guard: impl std::any::Any + Send + Sync) -> BlobPieces {
        self._guard = Some(Box::new(guard));
        self
    }

    /// A blob being downloaded into the piece file at `path` (resumed if it exists). Blocking.
    pub fn partial(path: &Path, metainfo: Arc<Metainfo>) -> Result<BlobPieces, PieceError> {
        // Persistence is driven by time here (see FLUSH_INTERVAL), not by the piece count.
        let file = PieceFile::open(path, (*metainfo).clone())?.with_persist_every(u32::MAX);
        let count = file.have().count();
        let state = State::Partial(file, std::time::Instant::now());
        Ok(BlobPieces {
            metainfo,
            state: RwLock::new(state),
            progress: watch::Sender::new(count),
            _guard: None,
        })
    }

    pub fn metainfo(&self) -> &Arc<Metainfo> {
        &self.metainfo
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The pieces held now.
    pub fn have(&self) -> Bitfield {
        match &*self.read_state() {
            State::Partial(f, _) => f.have().clone(),
            State::Complete { .. } => Bitfield::full(self.metainfo.piece_count()),
            State::Failed => Bitfield::new(self.metainfo.piece_count()),
        }
    }

    pub fn has(&self, index: u32) -> bool {
        match &*self.read_state() {
            State::Partial(f, _) => f.have().get(index),
            State::Complete { .. } => index < self.metainfo.piece_count(),
            State::Failed => false,
        }
    }

    /// Every piece is held (the blob may not be finished into its final place yet).
    pub fn is_complete(&self) -> bool {
        *self.progress.borrow() == self.metainfo.piece_count()
    }

    /// Where the finished blob lives, once it does.
    pub fn finished_path(&self) -> Option<PathBuf> {
        match &*self.read_state() {
            State::Complete { path, .. } => Some(path.clone()),
            State::Partial(..) | State::Failed => None,
        }
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
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let (file, flushed) = match &mut *state {
            State::Partial(file, flushed) => (file, flushed),
            State::Complete { .. } => return Ok(false),
            State::Failed => return Err(failed()),
        };
        if file.have().get(index) {
            return Ok(false);
        }
        file.write_verified_piece(index, data)?;
        if flushed.elapsed() >= FLUSH_INTERVAL {
            file.flush()?;
            *flushed = std::time::Instant::now();
        }
        let count = file.have().count();
        drop(state);
        self.progress.send_replace(count);
        Ok(true)
    }

    /// Read bytes at `offset`, up to the first missing piece; `Missing` if the piece at
    /// `offset` is not held. Blocking.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, PieceError> {
        match &*self.read_state() {
            State::Partial(f, _) => f.read_at(offset, buf),
            State::Complete { file, .. } => {
                let size = self.metainfo.size();
                if offset >= size {
                    return Ok(0);
                }
                let n = buf.len().min(usize::try_from(size - offset).unwrap_or(usize::MAX));
                file.read_exact_at(&mut buf[..n], offset)?;
                Ok(n)
            }
            State::Failed => Err(failed()),
        }
    }

    /// One whole piece. Blocking.
    pub fn read_piece(&self, index: u32) -> Result<Vec<u8>, PieceError> {
        let count = self.metainfo.piece_count();
        let (offset, len) =
            self.metainfo.piece_range(index).ok_or(PieceError::OutOfRange { index, count })?;
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| PieceError::OutOfRange { index, count })?];
        match &*self.read_state() {
            State::Partial(f, _) => return f.read_piece(index),
            State::Complete { file, .. } => file.read_exact_at(&mut buf, offset)?,
            State::Failed => return Err(failed()),
        }
        Ok(buf)
    }

    /// Verify the whole blob and move it to `dest`; readers continue from there. On failure
    /// the blob is unusable (its pieces matched but the whole did not) and reads fail. Blocking.
    /// The whole-file hash runs under the shared lock, so readers (including async tasks that
    /// check `has`) are never held up for it; the exclusive lock covers only the rename.
    pub fn finish(&self, dest: &Path) -> Result<(), PieceError> {
        let verified = match &*self.read_state() {
            State::Partial(pieces, _) => pieces.verify(),
            _ => return Ok(()),
        };
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        match std::mem::replace(&mut *state, State::Failed) {
            State::Partial(pieces, _) => {
                verified?;
                pieces.publish_verified(dest)?;
                *state = State::Complete { file: File::open(dest)?, path: dest.to_path_buf() };
                Ok(())
            }
            other => {
                *state = other;
                Ok(())
            }
        }
    }
}
