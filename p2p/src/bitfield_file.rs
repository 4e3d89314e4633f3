//! The persisted bitfield of a download, `<piece file>.bitfield`: which pieces were verified
//! and written, so a restarted agent resumes instead of starting over. It is written
//! by atomic replacement and tied to one exact metainfo; see [`crate::piece_store`] for the
//! crash-safety invariant it keeps.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::bitfield::Bitfield;
use crate::metainfo::Metainfo;

/// First bytes of a bitfield file, so a foreign or older format is discarded, not misread.
const BITFIELD_MAGIC: &[u8; 8] = b"SHOALBF1";

/// Where the bitfield of the data file at `path` lives: `<path>.bitfield`.
pub fn bitfield_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".bitfield");
    PathBuf::from(name)
}

/// The bitfield file: magic, blob size (u64), piece length (u64), digest (u16 length + text),
/// then the bitfield bytes. The header ties the bitfield to one exact metainfo.
pub(crate) fn encode_bitfield(metainfo: &Metainfo, have: &Bitfield) -> Vec<u8> {
    let digest = metainfo.digest().to_string();
    let mut out = Vec::with_capacity(8 + 8 + 8 + 2 + digest.len() + have.as_bytes().len());
    out.extend_from_slice(BITFIELD_MAGIC);
    out.extend_from_slice(&metainfo.size().to_be_bytes());
    out.extend_from_slice(&metainfo.piece_length().to_be_bytes());
    // A digest string is at most ~135 bytes.
    out.extend_from_slice(&u16::try_from(digest.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(digest.as_bytes());
    out.extend_from_slice(have.as_bytes());
    out
}

/// Decode a bitfield file, or `None` if it does not belong to `metainfo` or is malformed.
fn decode_bitfield(bytes: &[u8], metainfo: &Metainfo) -> Option<Bitfield> {
    let rest = bytes.strip_prefix(BITFIELD_MAGIC)?;
    let (size, rest) = rest.split_first_chunk::<8>()?;
    let (piece_length, rest) = rest.split_first_chunk::<8>()?;
    let (digest_len, rest) = rest.split_first_chunk::<2>()?;
    let (digest, rest) = rest.split_at_checked(usize::from(u16::from_be_bytes(*digest_len)))?;
    let matches = u64::from_be_bytes(*size) == metainfo.size()
        && u64::from_be_bytes(*piece_length) == metainfo.piece_length()
        && digest == metainfo.digest().to_string().as_bytes();
    if !matches {
        return None;
    }
    Bitfield::from_bytes(metainfo.piece_count(), rest).ok()
}

pub(crate) fn load_bitfield(path: &Path, metainfo: &Metainfo) -> Option<Bitfield> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read bitfield; starting from no pieces");
            return None;
        }
    };
    let decoded = decode_bitfield(&bytes, metainfo);
    if decoded.is_none() {
        tracing::warn!(path = %path.display(), "bitfield file does not match the metainfo; starting from no pieces");
    }
    decoded
}

/// Atomically replace the bitfield file: write a temp file, fsync it, rename it over, fsync the
/// directory.
pub(crate) fn write_bitfield(path: &Path, metainfo: &Metainfo, have: &Bitfield) -> io::Result<()> {
    shoal_registry::durable::replace(path, &encode_bitfield(metainfo, have), None)
}
