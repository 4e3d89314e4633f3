//! Replacing a small file durably: the new contents go to a temp file beside it, which is
//! synced, renamed over the file, and the directory synced. A reader sees the old contents or
//! the new ones, never part of either; after a crash the file is whole, old or new. Every
//! crate writes files this way (metainfo, bitfields, keys, containerd's `hosts.toml`).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// How the temp files of [`replace`] end (`.NAME.<pid>.<n>.shoal-tmp` beside `NAME`): only a
/// crash between the write and the rename leaves one ([`remove_leftovers`]).
pub const TEMP_SUFFIX: &str = ".shoal-tmp";

/// A temp file name for `path` no other writer uses, in this process or another.
fn temp_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{n}{TEMP_SUFFIX}", std::process::id()))
}

/// Replace `path` with `contents` (see the module docs); a new file gets `mode`, or the
/// default less the umask. Two writers at once each write their own temp file: the file ends
/// as one of them wrote it.
pub fn replace(path: &Path, contents: &[u8], mode: Option<u32>) -> std::io::Result<()> {
    let temp = temp_path(path);
    let written = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        if let Some(mode) = mode {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(mode);
        }
        let mut file = options.open(&temp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    sync_dir(parent(path))
}

/// Make a directory's entries (a rename, a removal) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    std::fs::File::open(dir)?.sync_all()
}

/// Remove the temp files a crashed [`replace`] of `path` left beside it; how many.
pub fn remove_leftovers(path: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for temp in leftovers(path)? {
        match std::fs::remove_file(&temp) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// The temp files of [`replace`] of `path` present beside it.
pub fn leftovers(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let prefix = format!(".{name}.");
    let entries = match std::fs::read_dir(parent(path)) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.starts_with(&prefix) && file.ends_with(TEMP_SUFFIX) {
            found.push(entry.path());
        }
    }
    Ok(found)
}

/// Create `dir` and its missing ancestors durably: after each one is created its parent is
/// synced, so a power loss on a filesystem that does not order metadata cannot keep a file
/// renamed into `dir` (and synced there) while losing `dir`'s own entry. A directory that
/// exists already costs one `stat`; one created by another thread a moment before is taken as
/// it is (its creator syncs its parent within microseconds).
pub fn create_dir_all(dir: &Path) -> std::io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(up) = dir.parent() {
        create_dir_all(up)?;
    }
    match std::fs::create_dir(dir) {
        // Lost a race with another creator: sync its entry here too rather than rely on it.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        other => other?,
    }
    sync_dir(parent(dir))
}

fn parent(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_dir_all_makes_every_missing_level_and_accepts_existing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        create_dir_all(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_all(&deep).unwrap();
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        assert!(create_dir_all(&dir.path().join("file/below")).is_err(), "a file in the way");
    }
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn replaces_whole_files_with_their_mode_and_leaves_nothing_beside_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts.toml");
        replace(&path, b"old", None).unwrap();
        replace(&path, b"new contents", Some(0o600)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new contents");
        assert!(leftovers(&path).unwrap().is_empty());
        let key = dir.path().join("key.pem");
        replace(&key, b"secret", Some(0o600)).unwrap();
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        // A crash between write and rename leaves a temp file; it is found and removed.
        std::fs::write(temp_path(&path), b"half").unwrap();
        std::fs::write(dir.path().join(".other.1.2.shoal-tmp"), b"x").unwrap();
        assert_eq!(remove_leftovers(&path).unwrap(), 1);
        assert!(dir.path().join(".other.1.2.shoal-tmp").exists(), "another file's temp stays");
        assert_eq!(std::fs::read(&path).unwrap(), b"new contents");
    }

    #[test]
    fn concurrent_writers_leave_one_whole_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metainfo");
        let versions: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 64 * 1024]).collect();
        std::thread::scope(|s| {
            for v in &versions {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..20 {
                        replace(path, v, None).unwrap();
                    }
                });
            }
        });
        assert!(versions.contains(&std::fs::read(&path).unwrap()));
        assert!(leftovers(&path).unwrap().is_empty());
    }
}
