//! Meta against a real (small) filesystem.

use std::path::PathBuf;

use shoal_registry::Algorithm;

use super::*;

/// A tmpfs of `mib` MiB on `dir` while it lives; `None` (with a note) when not root.
pub(crate) struct Tmpfs(PathBuf);

impl Tmpfs {
    pub(crate) fn mount(dir: &Path, mib: u64) -> Option<Tmpfs> {
        let uid = std::process::Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            eprintln!("skipped: mounting a small tmpfs needs root");
            return None;
        }
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "shoal-origin-meta"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a {mib} MiB tmpfs on {}", dir.display());
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn digest(i: u32) -> Digest {
    Digest::of(Algorithm::Sha256, &i.to_le_bytes())
}

/// A commit that meets a full disk fails (as "storage full"); once space is back, writes
/// work again and what was committed before is all there. Before, redb's failed state
/// stayed: every later write answered 500 until the origin restarted.
#[test]
fn a_full_disk_does_not_break_the_metadata_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_tmpfs) = Tmpfs::mount(dir.path(), 8) else { return };
    let meta = Meta::open(&dir.path().join("meta.redb")).unwrap();
    assert!(meta.commit_blob(&digest(0), 10, None).unwrap());
    // Fill the disk.
    let filler = dir.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
    }
    let mut failure = None;
    for i in 1..400 {
        let written = meta
            .commit_blob(&digest(i), 10, None)
            .and_then(|_| meta.put_metainfo(&digest(i), &vec![7u8; 32 << 10]));
        if let Err(e) = written {
            failure = Some(e);
            break;
        }
    }
    let failure = failure.expect("a write failed on the full disk");
    assert!(matches!(failure, StoreError::StorageFull), "{failure:?}");
    std::fs::remove_file(&filler).unwrap();
    assert!(meta.commit_blob(&digest(1000), 20, None).expect("writes work once space is back"));
    assert_eq!(meta.blob_size(&digest(0)).unwrap(), Some(10));
    assert_eq!(meta.blob_size(&digest(1000)).unwrap(), Some(20));
}

/// A metainfo computed while its blob was removed (GC, repair) is not written back: nothing
/// would ever remove it from the table.
#[test]
fn a_metainfo_for_a_blob_no_longer_here_is_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let meta = Meta::open(&dir.path().join("meta.redb")).unwrap();
    assert!(meta.commit_blob(&digest(1), 10, None).unwrap());
    meta.put_metainfo(&digest(1), b"{}").unwrap();
    assert_eq!(meta.metainfo(&digest(1)).unwrap().as_deref(), Some(&b"{}"[..]));
    assert_eq!(meta.remove_blob(&digest(1)).unwrap(), Some(10));
    meta.put_metainfo(&digest(1), b"{}").unwrap();
    assert_eq!(meta.metainfo(&digest(1)).unwrap(), None);
    meta.put_metainfo(&digest(2), b"{}").unwrap();
    assert_eq!(meta.metainfo(&digest(2)).unwrap(), None);
}

/// While a broken handle is being opened again (here: the lock held, as a long repair of
/// the file holds it), other calls fail at once with an error instead of waiting for it;
/// once opened, they work. Before, every metadata call queued behind the opening.
#[test]
fn calls_during_a_reopen_fail_at_once_instead_of_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let meta = std::sync::Arc::new(Meta::open(&dir.path().join("meta.redb")).unwrap());
    assert!(meta.commit_blob(&digest(0), 10, None).unwrap());
    meta.broken.store(true, std::sync::atomic::Ordering::Release);
    let opening = meta.db.read().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let asking = meta.clone();
    std::thread::spawn(move || {
        let _ = tx.send(asking.blob_size(&digest(0)).is_err());
    });
    let failed = rx.recv_timeout(std::time::Duration::from_secs(5));
    drop(opening);
    assert_eq!(failed, Ok(true), "a call waited for the opening (or succeeded on a broken handle)");
    assert_eq!(meta.blob_size(&digest(0)).unwrap(), Some(10), "opened again by the next call");
}
