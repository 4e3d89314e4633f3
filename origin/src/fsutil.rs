//! Small durable-write helpers: content is fsynced before it is renamed into place, and the
//! directory after, so a crash leaves either the old state or the new one.

use std::fs;
use std::io::Write;
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

/// Write `data` to `dest` through a temp file in `tmp_dir`.
pub fn write_atomic(tmp_dir: &Path, dest: &Path, data: &[u8]) -> std::io::Result<()> {
    if dest.exists() {
        return Ok(());
    }
    let tmp = tmp_dir.join(uuid::Uuid::new_v4().to_string());
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        publish(&tmp, dest)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
