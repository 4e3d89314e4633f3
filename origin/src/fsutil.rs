//! Small durable-write helpers: content is fsynced before it is renamed into place, and the
//! directory after, so a crash leaves either the old state or the new one.

use std::fs;
use std::path::Path;

/// fsync a directory so a rename or unlink inside it survives a crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Move a finished, fsynced file to `dest` (creating its parent). If `dest` already exists the
/// content is identical (content addressing), so the new copy is simply dropped.
pub fn publish(src: &Path, dest: &Path) -> std::io::Result<()> {
    let parent = dest.parent().ok_or_else(|| std::io::Error::other("blob path has no parent"))?;
    if dest.exists() {
        fs::remove_file(src)?;
        return Ok(());
    }
    fs::create_dir_all(parent)?;
    fs::rename(src, dest)?;
    sync_dir(parent)
}
