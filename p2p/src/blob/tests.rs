use super::*;
use shoal_registry::{Algorithm, Digest};
use std::time::Duration;

fn setup(pieces: usize) -> (tempfile::TempDir, Vec<u8>, Arc<Metainfo>) {
    let data: Vec<u8> = (0..pieces * 64 * 1024 + 999).map(|i| (i * 7 % 253) as u8).collect();
    let meta = Metainfo::compute(&data[..], data.len() as u64, Algorithm::Sha256).unwrap();
    (tempfile::tempdir().unwrap(), data, Arc::new(meta))
}

fn piece<'a>(meta: &Metainfo, data: &'a [u8], i: u32) -> &'a [u8] {
    let (start, len) = meta.piece_range(i).unwrap();
    &data[start as usize..(start + len) as usize]
}

/// Write pieces in `order` as the swarm does.
fn download(blob: &BlobPieces, meta: &Metainfo, data: &[u8], order: &[u32]) {
    for &i in order {
        assert!(blob.write_piece(i, piece(meta, data, i)).unwrap());
    }
}

#[test]
fn pieces_in_any_order_finish_into_the_blob() {
    let (dir, data, meta) = setup(6);
    let count = meta.piece_count();
    let blob = BlobPieces::partial(&dir.path().join("b.part"), meta.clone()).unwrap();
    download(&blob, &meta, &data, &[2, 3, 1, 0]);
    let rest: Vec<u32> = (4..count).rev().collect();
    download(&blob, &meta, &data, &rest);
    let dest = dir.path().join("final");
    blob.finish(&dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(&Digest::of(Algorithm::Sha256, &std::fs::read(&dest).unwrap()), meta.digest());
}

/// A metainfo that names another digest over the same chain: every piece but the last passes,
/// the last cannot, so the blob never finishes with the wrong digest.
#[test]
fn a_chain_that_does_not_reach_the_digest_fails_the_last_piece() {
    let (dir, data, meta) = setup(3);
    let wrong = Digest::of(Algorithm::Sha256, b"something else");
    let mut json = serde_json::to_value(&*meta).unwrap();
    json["digest"] = serde_json::Value::String(wrong.to_string());
    let bad = Arc::new(serde_json::from_value::<Metainfo>(json).unwrap());
    let blob = BlobPieces::partial(&dir.path().join("b.part"), bad.clone()).unwrap();
    let last = bad.piece_count() - 1;
    download(&blob, &bad, &data, &(0..last).collect::<Vec<_>>());
    assert!(matches!(blob.write_piece(last, piece(&bad, &data, last)), Err(PieceError::HashMismatch { .. })));
    assert!(matches!(blob.finish(&dir.path().join("final")), Err(PieceError::Incomplete { missing: 1 })));
}

#[test]
fn a_resumed_download_drops_held_pieces_whose_bytes_went_bad() {
    use std::os::unix::fs::FileExt;
    let (dir, data, meta) = setup(5);
    let path = dir.path().join("b.part");
    let blob = BlobPieces::partial(&path, meta.clone()).unwrap();
    for i in [0, 1, 2, 4, 5] {
        blob.write_piece(i, piece(&meta, &data, i)).unwrap();
    }
    blob.persist().unwrap();
    drop(blob);
    // A bad sector in piece 1, which the bitfield still claims.
    let (start, _) = meta.piece_range(1).unwrap();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().write_all_at(b"rot", start + 9).unwrap();
    let again = BlobPieces::partial(&path, meta.clone()).unwrap();
    assert_eq!(again.have().iter_set().collect::<Vec<_>>(), [0, 2, 4, 5]);
    download(&again, &meta, &data, &[3, 1]);
    let dest = dir.path().join("final");
    again.finish(&dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
}

/// The bitfield is persisted without syncing the data (see `piece_store`), so a machine crash
/// can keep a bitfield that claims pieces whose bytes never reached the disk: a fresh file's
/// lost writeback reads back as zeros, or the file is shorter than it was. Resuming checks
/// every claimed piece, fetches the lost ones again and finishes with the right bytes.
#[test]
fn a_crash_that_lost_unsynced_piece_data_costs_a_refetch_not_a_wrong_byte() {
    use std::os::unix::fs::FileExt;
    for lost in ["zeros", "truncated"] {
        let (dir, data, meta) = setup(6);
        let path = dir.path().join("b.part");
        let blob = BlobPieces::partial(&path, meta.clone()).unwrap();
        for i in 0..6 {
            blob.write_piece(i, piece(&meta, &data, i)).unwrap();
        }
        blob.persist().unwrap();
        drop(blob);
        let (start, _) = meta.piece_range(3).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        match lost {
            // Pieces 3 and 4 never written back.
            "zeros" => {
                let (end, _) = meta.piece_range(5).unwrap();
                file.write_all_at(&vec![0u8; (end - start) as usize], start).unwrap();
            }
            // Everything from piece 3 on gone: a file of the wrong size starts over.
            _ => file.set_len(start).unwrap(),
        }
        drop(file);
        let again = BlobPieces::partial(&path, meta.clone()).unwrap();
        let kept: Vec<u32> = again.have().iter_set().collect();
        let expect: &[u32] = if lost == "zeros" { &[0, 1, 2, 5] } else { &[] };
        assert_eq!(kept, expect, "{lost}");
        let missing: Vec<u32> = (0..meta.piece_count()).filter(|i| !kept.contains(i)).collect();
        download(&again, &meta, &data, &missing);
        let dest = dir.path().join("final");
        again.finish(&dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), data, "{lost}");
    }
}

#[test]
fn verifying_reads_of_a_complete_blob_catch_a_bad_sector_and_a_truncation() {
    use std::os::unix::fs::FileExt;
    let (dir, data, meta) = setup(4);
    let path = dir.path().join("blob");
    std::fs::write(&path, &data).unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let open = |seen: &Arc<std::sync::Mutex<Vec<u32>>>| {
        let seen = seen.clone();
        BlobPieces::complete(&path, meta.clone())
            .unwrap()
            .verifying_reads(move |i| seen.lock().unwrap().push(i))
    };
    let blob = open(&seen);
    assert_eq!(blob.read_piece(2).unwrap(), piece(&meta, &data, 2));
    let (start, _) = meta.piece_range(2).unwrap();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().write_all_at(b"x", start).unwrap();
    assert!(matches!(blob.read_piece(2), Err(PieceError::HashMismatch { index: 2 })));
    // Unverified reads (a download's own, just-verified file) do not look.
    let plain = BlobPieces::complete(&path, meta.clone()).unwrap();
    assert_eq!(plain.read_piece(2).unwrap().len(), piece(&meta, &data, 2).len());
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(start).unwrap();
    assert!(matches!(open(&seen).read_piece(3), Err(PieceError::HashMismatch { index: 3 })));
    assert_eq!(*seen.lock().unwrap(), [2, 3]);
    assert_eq!(blob.read_piece(0).unwrap(), piece(&meta, &data, 0), "good pieces still serve");
}

#[test]
fn a_write_that_finds_the_disk_full_makes_room_and_tries_again() {
    let (dir, _data, meta) = setup(3);
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let frees = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (a, f) = (asked.clone(), frees.clone());
    let blob = BlobPieces::partial(&dir.path().join("b.part"), meta.clone()).unwrap().reclaiming(Arc::new(
        move |need| {
            a.lock().unwrap().push(need);
            f.load(std::sync::atomic::Ordering::SeqCst)
        },
    ));
    let full = || PieceError::Io(std::io::Error::from(std::io::ErrorKind::StorageFull));
    let mut fails = 2;
    let wrote = blob.retry_when_full(|| {
        if fails > 0 {
            fails -= 1;
            return Err(full());
        }
        Ok(7)
    });
    assert_eq!(wrote.unwrap(), 7);
    assert_eq!(*asked.lock().unwrap(), [meta.size(), meta.size()], "room for the rest of the download");
    // Nothing more to free: the error stands.
    frees.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(blob.retry_when_full(|| Err::<(), _>(full())), Err(PieceError::Io(_))));
    // Always full: a few attempts, then the error.
    frees.store(true, std::sync::atomic::Ordering::SeqCst);
    asked.lock().unwrap().clear();
    assert!(blob.retry_when_full(|| Err::<(), _>(full())).is_err());
    assert_eq!(asked.lock().unwrap().len(), DISK_FULL_RETRIES as usize);
    // Other errors are not retried.
    let other = blob.retry_when_full(|| Err::<(), _>(PieceError::Io(std::io::Error::other("eio"))));
    assert!(other.is_err() && asked.lock().unwrap().len() == DISK_FULL_RETRIES as usize);
}

#[test]
fn discard_deletes_a_partial_download() {
    let (dir, data, meta) = setup(3);
    let path = dir.path().join("b.part");
    let blob = BlobPieces::partial(&path, meta.clone()).unwrap();
    blob.write_piece(0, piece(&meta, &data, 0)).unwrap();
    blob.persist().unwrap();
    blob.discard().unwrap();
    assert!(!path.exists() && !crate::piece_store::bitfield_path(&path).exists());
    assert!(!blob.has(0) && blob.read_piece(0).is_err());
}

#[test]
fn a_restarted_download_keeps_the_pieces_persisted_on_the_way() {
    // FLUSH_BYTES and a bit more, from piece 4 on.
    let (dir, data, meta) = setup((FLUSH_BYTES as usize * 9 / 8) >> 16);
    let path = dir.path().join("b.part");
    let blob = BlobPieces::partial(&path, meta.clone()).unwrap();
    let written: Vec<u32> = (4..meta.piece_count()).collect();
    for &i in &written {
        blob.write_piece(i, piece(&meta, &data, i)).unwrap();
    }
    let (start, _) = meta.piece_range(4).unwrap();
    assert!(meta.size() - start >= FLUSH_BYTES, "enough bytes to persist");
    std::thread::sleep(FLUSH_INTERVAL + Duration::from_millis(20));
    // This write is due to persist the bitfield.
    blob.write_piece(2, piece(&meta, &data, 2)).unwrap();
    drop(blob);
    let again = BlobPieces::partial(&path, meta.clone()).unwrap();
    let expected: Vec<u32> = std::iter::once(2).chain(written).collect();
    assert_eq!(again.have().iter_set().collect::<Vec<_>>(), expected);
    assert_eq!(again.read_piece(4).unwrap(), piece(&meta, &data, 4));
}

#[test]
fn a_slow_download_is_not_persisted_before_enough_bytes() {
    let (dir, data, meta) = setup(6);
    let path = dir.path().join("b.part");
    let blob = BlobPieces::partial(&path, meta.clone()).unwrap();
    blob.write_piece(4, piece(&meta, &data, 4)).unwrap();
    std::thread::sleep(FLUSH_INTERVAL + Duration::from_millis(20));
    blob.write_piece(2, piece(&meta, &data, 2)).unwrap();
    drop(blob);
    // Not persisted (a killed agent fetches these two again); `persist` on shutdown would.
    let again = BlobPieces::partial(&path, meta.clone()).unwrap();
    assert_eq!(again.have().count(), 0);
    again.write_piece(2, piece(&meta, &data, 2)).unwrap();
    again.persist().unwrap();
    drop(again);
    let third = BlobPieces::partial(&path, meta.clone()).unwrap();
    assert_eq!(third.have().iter_set().collect::<Vec<_>>(), [2]);
}

#[test]
fn readers_of_held_pieces_never_wait_for_a_writer() {
    let (dir, data, meta) = setup(3);
    let blob = Arc::new(BlobPieces::partial(&dir.path().join("b.part"), meta.clone()).unwrap());
    blob.write_piece(1, piece(&meta, &data, 1)).unwrap();
    // A writer persisting the bitfield (an fsync) holds the state lock exclusively.
    let persisting = blob.state.write().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let b = blob.clone();
    std::thread::spawn(move || {
        let _ = tx.send((b.has(1), b.has(0), b.have().count(), b.finished_path()));
    });
    let got = rx.recv_timeout(Duration::from_secs(2)).expect("has/have waited for the state lock");
    drop(persisting);
    assert_eq!(got, (true, false, 1, None));
}

#[test]
fn a_failed_blob_holds_nothing_and_a_finished_one_everything() {
    let (dir, data, meta) = setup(3);
    let blob = BlobPieces::partial(&dir.path().join("b.part"), meta.clone()).unwrap();
    download(&blob, &meta, &data, &(0..meta.piece_count()).collect::<Vec<_>>());
    let dest = dir.path().join("final");
    blob.finish(&dest).unwrap();
    assert_eq!(blob.finished_path(), Some(dest));
    assert!(blob.have().is_complete());

    // A finish that fails (its destination's directory cannot be made: a file is in the way).
    let blob = BlobPieces::partial(&dir.path().join("c.part"), meta.clone()).unwrap();
    download(&blob, &meta, &data, &(0..meta.piece_count()).collect::<Vec<_>>());
    std::fs::write(dir.path().join("blocker"), b"").unwrap();
    assert!(blob.finish(&dir.path().join("blocker/c")).is_err());
    assert!(!blob.has(0) && blob.have().count() == 0 && blob.finished_path().is_none());
}

#[test]
fn a_late_writer_cannot_set_the_progress_count_back() {
    let (dir, _data, meta) = setup(3);
    let blob = BlobPieces::partial(&dir.path().join("b.part"), meta.clone()).unwrap();
    let count = meta.piece_count();
    // The writer of the last piece publishes first, the one before it second.
    blob.publish_count(count);
    blob.publish_count(count - 1);
    assert!(blob.is_complete());
    assert_eq!(*blob.subscribe().borrow(), count);
}

#[test]
fn verified_pieces_ahead_of_a_reader_are_served_from_memory_until_it_passes_them() {
    let (dir, data, meta) = setup(8);
    let blob = BlobPieces::partial(&dir.path().join("b.part"), meta.clone()).unwrap();
    let bytes = |i: u32| Bytes::copy_from_slice(piece(&meta, &data, i));
    let (start2, len2) = meta.piece_range(2).unwrap();
    // No reader: nothing is kept.
    download(&blob, &meta, &data, &[0]);
    blob.keep_verified(0, bytes(0));
    assert!(blob.fresh_at(0).is_none());
    // A reader at piece 1: pieces 1.. within the window are kept once held, not before.
    blob.set_reader_floor(Some(1));
    blob.keep_verified(2, bytes(2));
    assert!(blob.fresh_at(start2).is_none(), "not held yet");
    download(&blob, &meta, &data, &[2, 7]);
    blob.keep_verified(2, bytes(2));
    blob.keep_verified(7, bytes(7));
    assert_eq!(blob.fresh_at(start2 + 10).unwrap(), piece(&meta, &data, 2)[10..]);
    assert!(blob.fresh_at(meta.piece_range(7).unwrap().0).is_none(), "beyond the window");
    assert!(blob.fresh_at(start2 + len2).is_none(), "piece 3 is not held");
    // Bytes of the wrong length are not kept.
    download(&blob, &meta, &data, &[3]);
    blob.keep_verified(3, bytes(3).slice(1..));
    assert!(blob.fresh_at(start2 + len2).is_none());
    // The reader moved past piece 2.
    blob.set_reader_floor(Some(3));
    assert!(blob.fresh_at(start2).is_none());
    // A discarded download serves nothing from memory either.
    blob.set_reader_floor(Some(2));
    blob.keep_verified(2, bytes(2));
    assert!(blob.fresh_at(start2).is_some());
    blob.discard().unwrap();
    assert!(blob.fresh_at(start2).is_none());
}

#[test]
fn a_slow_download_persists_after_enough_bytes_or_at_the_longest_wait() {
    let t0 = std::time::Instant::now();
    let after = |bytes: u64| Unflushed { since: t0, bytes };
    // A fast download persists every FLUSH_INTERVAL, as before.
    assert!(!after(64 << 20).due(t0 + FLUSH_INTERVAL - Duration::from_millis(1)));
    assert!(after(FLUSH_BYTES).due(t0 + FLUSH_INTERVAL));
    // A slow one waits for FLUSH_BYTES...
    assert!(!after(FLUSH_BYTES - 1).due(t0 + FLUSH_INTERVAL * 3));
    // ...but never past FLUSH_MAX_INTERVAL.
    assert!(!after(1).due(t0 + FLUSH_MAX_INTERVAL - Duration::from_millis(1)));
    assert!(after(1).due(t0 + FLUSH_MAX_INTERVAL));
}

#[test]
fn the_newest_pieces_are_in_memory_for_peers_until_the_blob_is_finished() {
    let (dir, data, meta) = setup(6);
    let count = meta.piece_count();
    let blob = BlobPieces::partial(&dir.path().join("b.part"), meta.clone()).unwrap();
    let bytes = |i: u32| Bytes::copy_from_slice(piece(&meta, &data, i));
    // Not held yet: not kept.
    blob.keep_verified(1, bytes(1));
    assert!(blob.piece_in_memory(1).is_none());
    // Held, no reader: kept for peers.
    let all: Vec<u32> = (0..count).collect();
    download(&blob, &meta, &data, &all[..count as usize - 1]);
    blob.keep_verified(1, bytes(1));
    assert_eq!(blob.piece_in_memory(1).unwrap(), piece(&meta, &data, 1));
    assert!(blob.fresh_at(meta.piece_range(1).unwrap().0).is_none(), "no reader, nothing for one");
    assert!(blob.piece_in_memory(2).is_none(), "never kept");
    // Finished: the file serves, nothing stays in memory, and nothing new is kept.
    download(&blob, &meta, &data, &[count - 1]);
    blob.finish(&dir.path().join("final")).unwrap();
    assert!(blob.piece_in_memory(1).is_none());
    blob.keep_verified(2, bytes(2));
    assert!(blob.piece_in_memory(2).is_none());
}

/// A small tmpfs mounted on a fresh directory for as long as it lives (root only).
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(mib: u64) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a small tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "shoal-unit-full"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs");
        Some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// A full disk when the bitfield is due to be persisted fails no download: the piece file
/// was allocated whole at the start, the pieces are written and held, and the room asked
/// for is the bitfield file's (before, every piece missing: a half-done 10 GiB download
/// evicted 5 GiB of cached blobs for a file of kilobytes, then failed when nothing could go).
#[test]
fn a_full_disk_at_a_bitfield_flush_fails_no_piece() {
    let Some(fs) = Tmpfs::mount(16) else { return };
    // 136 pieces of 64 KiB: past FLUSH_BYTES once all are written.
    let (_dir, data, meta) = setup(136);
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let a = asked.clone();
    let blob = BlobPieces::partial_reclaiming(
        &fs.0.path().join("b.part"),
        meta.clone(),
        Arc::new(move |need| {
            a.lock().unwrap().push(need);
            false
        }),
    )
    .unwrap();
    // Everything else the filesystem has goes to another file.
    let filler = fs.0.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[1u8; 4096]).is_ok() {}
    }
    std::thread::sleep(FLUSH_INTERVAL + Duration::from_millis(100));
    let all: Vec<u32> = (0..meta.piece_count()).collect();
    download(&blob, &meta, &data, &all);
    let asked = asked.lock().unwrap().clone();
    assert!(!asked.is_empty(), "the flush found the disk full");
    assert!(asked.iter().all(|&n| n == bitfield_room(&meta)), "asked for {asked:?}");
    // Room again: the download finishes.
    std::fs::remove_file(&filler).unwrap();
    blob.persist().unwrap();
    let dest = fs.0.path().join("final");
    blob.finish(&dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
}
