//! Small durable-write helpers: content is fsynced before it is renamed into place, and the
//! directory after, so a crash leaves either the old state or the new one.

use std::fs;
use std::path::Path;

pub use shoal_registry::durable::sync_dir;

/// Move a finished, fsynced file to `dest` (creating its parent); `true` if it moved. A
/// failed sync of the directory after the move removes the file (from `dest`, and `src`). If
/// `dest` already exists the content is identical (content addressing): `src` stays where it
/// is for the caller to drop once it no longer needs it, and the directory is synced all the
/// same (the rename that put `dest` there may have had its sync fail).
pub fn publish(src: &Path, dest: &Path) -> std::io::Result<bool> {
    let parent = dest.parent().ok_or_else(|| std::io::Error::other("blob path has no parent"))?;
    if dest.exists() {
        sync_dir(parent)?;
        return Ok(false);
    }
    shoal_registry::durable::create_dir_all(parent)?;
    fs::rename(src, dest)?;
    if let Err(e) = sync_dir(parent) {
        // Not durable: nothing of it may stay in the store unrecorded, and its bytes are not
        // to be trusted to a retry either (the caller ends the upload when `src` is gone).
        let _ = fs::rename(dest, src);
        let _ = fs::remove_file(src);
        return Err(e);
    }
    Ok(true)
}
