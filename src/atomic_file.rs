//! Files the binary writes for other programs to read (containerd's `hosts.toml` and its copy
//! of the mirror CA, certificates and keys): a reader sees the old file or the new one, never
//! half of one, and a key is private from its first byte, whatever an older file's mode was.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Where [`write`] puts `path`'s new contents before the rename: `.NAME.shoal-tmp` beside it
/// (left behind only by a crash in between; the next write replaces it).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.shoal-tmp"))
}

/// Write `contents` to `path` through a new file (`mode`, or the default less the umask),
/// synced, renamed over `path`, and the directory synced.
pub fn write(path: &Path, contents: &[u8], mode: Option<u32>) -> anyhow::Result<()> {
    let temp = temp_path(path);
    let _ = std::fs::remove_file(&temp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    if let Some(mode) = mode {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(mode);
    }
    let mut file = options.open(&temp).with_context(|| format!("creating {}", temp.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", temp.display()))?;
    drop(file);
    std::fs::rename(&temp, path)
        .with_context(|| format!("renaming {} to {}", temp.display(), path.display()))?;
    sync_dir(path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")))
}

/// Make a directory's entries (a rename, a removal) durable.
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}
