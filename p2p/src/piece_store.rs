//! The on-disk form of a blob being downloaded: one preallocated file plus a bitfield file.
//!
//! Pieces arrive out of order from many peers, so each is written at its offset into a file of
//! the blob's final size. The bitfield beside it records which pieces are on disk so a restarted
//! agent resumes instead of starting over. The persisted bitfield never claims a piece that was
//! not verified and fully written (into the page cache: a killed process loses none of it), and
//! it is replaced atomically. It may lag behind, which only costs a re-download. The data is not
//! fsynced before the bitfield: after a crash of the machine, a claimed piece's bytes may be
//! lost, so whoever resumes a file checks every claimed piece against its hash first
//! ([`crate::blob::BlobPieces::partial`] does). Syncing the data every time the bitfield was
//! persisted stalled the download for each writeback (a quarter of a 1 GiB loopback pull).
//!
//! All of this is blocking file I/O: async callers use `spawn_blocking`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::bitfield::Bitfield;
pub use crate::bitfield_file::bitfield_path;
use crate::bitfield_file::{load_bitfield, write_bitfield};
use crate::metainfo::Metainfo;
use shoal_registry::durable::sync_dir;

/// Why a piece could not be stored or read, or the blob could not be finished.
#[derive(Debug, thiserror::Error)]
pub enum PieceError {
    #[error("piece file i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("piece {index} is out of range (blob has {count} pieces)")]
    OutOfRange { index: u32, count: u32 },
    #[error("piece {index} does not match its hash in the metainfo")]
    HashMismatch { index: u32 },
    #[error("piece {index} is not downloaded yet")]
    Missing { index: u32 },
    #[error("offset {offset} is past the end of the blob ({size} bytes)")]
    OffsetOutOfRange { offset: u64, size: u64 },
    #[error("blob is incomplete: {missing} pieces missing")]
    Incomplete { missing: u32 },
}

/// A blob being assembled from pieces; see the module docs for the crash-safety invariant.
#[derive(Debug)]
pub struct PieceFile {
    file: File,
    path: PathBuf,
    bitfield_path: PathBuf,
    metainfo: Metainfo,
    have: Bitfield,
    /// Pieces set in `have` since the bitfield file was last written.
    unpersisted: u32,
    /// Persist after this many new pieces (1 = after every piece).
    persist_every: u32,
}

/// Read exactly `len` bytes at `offset` into a new buffer that is not zeroed first. These
/// buffers carry every piece a node serves; clearing memory that the read overwrites at once
/// showed up as a few percent of a busy seeder's CPU.
pub fn read_new_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset.saturating_add(buf.len() as u64);
        // Reads into the spare capacity and extends the length by what was read.
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // The allocation may be larger than asked for, and a read may have filled it.
    buf.truncate(len);
    Ok(buf)
}

/// Give the data file `size` bytes, allocated on disk at once where the file system can.
///
/// A download that cannot fit then fails here, with `ENOSPC`, rather than after it fetched most
/// of the blob; and writes into allocated blocks skip ext4's delayed allocation of each page
/// (a fifth of a 1 GiB write's system time here). File systems without `fallocate` get a
/// sparse file, as before.
fn allocate(file: &File, size: u64) -> io::Result<()> {
    file.set_len(size)?;
    if size == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => Ok(()),
        Err(e) => {
            // Back to empty, so a retry (after room was made) allocates again instead of
            // taking the sparse file for one of the right size.
            let _ = file.set_len(0);
            Err(e.into())
        }
    }
}

impl PieceFile {
    /// Create the data file at `path` (preallocated to the blob's size) or reopen it after a
    /// restart, loading the persisted bitfield. A bitfield that does not decode, or belongs to a
    /// different metainfo, or a data file of the wrong size, means starting from no pieces.
    pub fn open(path: &Path, metainfo: Metainfo) -> Result<PieceFile, PieceError> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                fs::create_dir_all(parent)?;
            }
        }
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let size_ok = file.metadata()?.len() == metainfo.size();
        if !size_ok {
            allocate(&file, metainfo.size())?;
        }
        let bitfield_path = bitfield_path(path);
        let have = if size_ok { load_bitfield(&bitfield_path, &metainfo) } else { None };
        let have = have.unwrap_or_else(|| Bitfield::new(metainfo.piece_count()));
        tracing::debug!(path = %path.display(), have = have.count(), pieces = have.len(), "opened piece file");
        Ok(PieceFile {
            file,
            path: path.to_path_buf(),
            bitfield_path,
            metainfo,
            have,
            unpersisted: 0,
            persist_every: 1,
        })
    }

    /// Persist the bitfield only every `n` new pieces (at least 1) instead of after each one,
    /// trading a little re-download after a crash for fewer fsyncs. Call [`PieceFile::flush`]
    /// before dropping to keep the rest.
    pub fn with_persist_every(mut self, n: u32) -> PieceFile {
        self.persist_every = n.max(1);
        self
    }

    /// The metainfo this file is assembled against.
    pub fn metainfo(&self) -> &Metainfo {
        &self.metainfo
    }

    /// Path of the data file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pieces that are verified and written (some perhaps not yet persisted).
    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    /// Whether every piece is here.
    pub fn is_complete(&self) -> bool {
        self.have.is_complete()
    }

    /// Verify `data` against piece `index`'s hash and write it. A piece that fails verification
    /// is not written or marked; writing a piece we already have is a no-op.
    pub fn write_piece(&mut self, index: u32, data: &[u8]) -> Result<(), PieceError> {
        self.range(index)?;
        if !self.metainfo.verify_piece(index, data) {
            return Err(PieceError::HashMismatch { index });
        }
        self.write_verified_piece(index, data)
    }

    /// Write a piece the caller has already checked with [`Metainfo::verify_piece`], so the
    /// hashing can happen outside whatever lock guards this file. Writing an unverified piece
    /// here would break the "have means verified" invariant.
    pub fn write_verified_piece(&mut self, index: u32, data: &[u8]) -> Result<(), PieceError> {
        self.range(index)?;
        if self.have.get(index) {
            return Ok(());
        }
        self.write_data(index, data)?;
        self.mark_written(index)?;
        if self.unpersisted >= self.persist_every {
            self.flush()?;
        }
        Ok(())
    }

    /// Write the bytes of a verified piece at its offset without marking it held. It takes
    /// `&self`, so pieces can be written side by side under a shared lock; the caller then
    /// marks the piece with [`PieceFile::mark_written`] (the "have means verified and written"
    /// invariant holds because only written pieces get marked).
    pub fn write_data(&self, index: u32, data: &[u8]) -> Result<(), PieceError> {
        let (offset, _) = self.range(index)?;
        shoal_registry::file_write::write_all_at(&self.file, data, offset)?;
        Ok(())
    }

    /// Mark a piece that [`PieceFile::write_data`] wrote as held; `false` if it already was.
    pub fn mark_written(&mut self, index: u32) -> Result<bool, PieceError> {
        let newly = self.have.set(index).map_err(|_| self.out_of_range(index))?;
        if newly {
            self.unpersisted += 1;
        }
        Ok(newly)
    }

    /// Stop claiming piece `index` (its bytes on disk turned out not to match its hash): it is
    /// fetched again, and the bitfield persisted next no longer lists it.
    pub fn forget(&mut self, index: u32) -> Result<(), PieceError> {
        if self.have.clear(index).map_err(|_| self.out_of_range(index))? {
            self.unpersisted += 1;
        }
        Ok(())
    }

    /// Record every piece written so far: atomically replace the bitfield file (fsynced). The
    /// data is left to the kernel's writeback (see the module's doc for why that is safe).
    pub fn flush(&mut self) -> Result<(), PieceError> {
        if self.unpersisted == 0 {
            return Ok(());
        }
        write_bitfield(&self.bitfield_path, &self.metainfo, &self.have)?;
        self.unpersisted = 0;
        Ok(())
    }

    /// Read a whole piece we have, e.g. to answer a peer's request.
    pub fn read_piece(&self, index: u32) -> Result<Vec<u8>, PieceError> {
        let (offset, len) = self.range(index)?;
        if !self.have.get(index) {
            return Err(PieceError::Missing { index });
        }
        let len = usize::try_from(len).map_err(|_| self.out_of_range(index))?;
        Ok(read_new_at(&self.file, offset, len)?)
    }

    /// Read bytes starting at `offset` for streaming to a client, stopping at the first piece we
    /// do not have. Returns how many bytes were read: 0 at the end of the blob, and
    /// `Missing` if the piece at `offset` itself is not here yet (wait for it, then retry).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, PieceError> {
        let n = self.readable_at(offset, buf.len())?;
        self.file.read_exact_at(&mut buf[..n], offset)?;
        Ok(n)
    }

    /// [`read_at`](Self::read_at) into a new buffer of at most `max` bytes.
    pub fn read_new_at(&self, offset: u64, max: usize) -> Result<Vec<u8>, PieceError> {
        let n = self.readable_at(offset, max)?;
        Ok(read_new_at(&self.file, offset, n)?)
    }

    /// How many of the `max` bytes at `offset` can be read: up to the end of the blob or the
    /// first missing piece; `Missing` if the piece at `offset` itself is not here.
    fn readable_at(&self, offset: u64, max: usize) -> Result<usize, PieceError> {
        let size = self.metainfo.size();
        if offset > size {
            return Err(PieceError::OffsetOutOfRange { offset, size });
        }
        if offset == size || max == 0 {
            return Ok(0);
        }
        let mut end = offset.saturating_add(max as u64).min(size);
        let Some(first) = self.metainfo.piece_index_at(offset) else {
            return Ok(0);
        };
        let mut index = first;
        while let Some((start, len)) = self.metainfo.piece_range(index) {
            if start >= end {
                break;
            }
            if !self.have.get(index) {
                if index == first {
                    return Err(PieceError::Missing { index });
                }
                end = start;
                break;
            }
            if start + len >= end {
                break;
            }
            index += 1;
        }
        Ok(usize::try_from(end - offset).unwrap_or(max).min(max))
    }

    /// Write the file's data to disk (an fsync), e.g. before [`finish`](Self::finish) under
    /// a lock readers would otherwise wait on.
    pub fn sync(&self) -> Result<(), PieceError> {
        Ok(self.file.sync_all()?)
    }

    /// Turn the complete download into the final blob: check that every piece is here (each
    /// was checked against the digest's chain when written, so together they have the digest),
    /// fsync, rename the file to `dest` (creating its directory) and drop the bitfield.
    /// Blocking.
    pub fn finish(self, dest: &Path) -> Result<(), PieceError> {
        let missing = self.have.len() - self.have.count();
        if missing > 0 {
            return Err(PieceError::Incomplete { missing });
        }
        self.file.sync_all()?;
        if let Some(parent) = dest.parent() {
            shoal_registry::durable::create_dir_all(parent)?;
        }
        fs::rename(&self.path, dest)?;
        if let Some(parent) = dest.parent() {
            sync_dir(parent)?;
        }
        // The blob is in place and durable: a bitfield left behind is only litter (a
        // bitfield without its piece file is removed at start), never a reason to fail the
        // finished blob, which the caller would then delete.
        if let Err(e) = remove_if_exists(&self.bitfield_path) {
            tracing::warn!(path = %self.bitfield_path.display(), error = %e, "could not delete a finished download's bitfield");
        }
        Ok(())
    }

    /// Delete the partial download and its bitfield (e.g. the blob was found elsewhere).
    pub fn discard(self) -> Result<(), PieceError> {
        remove_if_exists(&self.path)?;
        remove_if_exists(&self.bitfield_path)?;
        Ok(())
    }

    fn range(&self, index: u32) -> Result<(u64, u64), PieceError> {
        self.metainfo.piece_range(index).ok_or_else(|| self.out_of_range(index))
    }

    fn out_of_range(&self, index: u32) -> PieceError {
        PieceError::OutOfRange { index, count: self.metainfo.piece_count() }
    }
}

/// Whether an I/O error means the disk (or the user's quota) is full: room can be made by
/// deleting something, and the write tried again.
pub fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || e.raw_os_error() == Some(rustix::io::Errno::DQUOT.raw_os_error())
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
