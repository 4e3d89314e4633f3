//! Small durable-write helpers: content is fsynced before it is renamed into place, and the
//! directory after, so a crash leaves either the old state or the new one.

use std::fs;
use std::path::Path;

pub use shoal_registry::durable::sync_dir;

/// Move a finished, fsynced file to `dest` (creating its parent). If `dest` already exists the
/// content is identical (content addressing), so the new copy is simply dropped.
pub fn publish(src: &Path, dest: &Path) -> std::io::Result<()> {
    let parent = dest.parent().ok_or_else(|| std::io::Error::other("blob path has no parent"))?;
    if dest.exists() {
        fs::remove_file(src)?;
        return Ok(());
    }
    shoal_registry::durable::create_dir_all(parent)?;
    fs::rename(src, dest)?;
    sync_dir(parent)
}
