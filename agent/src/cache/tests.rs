use super::*;
use crate::disk::Watermark;
use shoal_p2p::Metainfo;

fn digest(i: u32) -> Digest {
    Digest::of(shoal_registry::Algorithm::Sha256, &i.to_be_bytes())
}

fn metrics() -> CacheMetrics {
    CacheMetrics::new(&prometheus::Registry::new()).unwrap()
}

fn cache(dir: &Path, high: u64, low: u64) -> Arc<BlobCache> {
    Arc::new(
        BlobCache::open(&dir.join("cache"), &dir.join("partial"), CacheLimits::bytes(high, low), metrics())
            .unwrap(),
    )
}

fn put(c: &BlobCache, i: u32, size: usize) {
    let d = digest(i);
    let path = c.blob_path(&d);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, vec![0u8; size]).unwrap();
    c.insert(&d, size as u64);
}

/// A real blob of `size` bytes in the cache, with its metainfo; its bytes.
fn put_real(c: &BlobCache, size: usize) -> (Digest, Vec<u8>) {
    let data: Vec<u8> = (0..size).map(|i| (i * 13 % 251) as u8).collect();
    let meta = Metainfo::compute(&data[..], size as u64, shoal_registry::Algorithm::Sha256).unwrap();
    let d = meta.digest().clone();
    let path = c.blob_path(&d);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &data).unwrap();
    c.write_metainfo(&meta).unwrap();
    c.insert(&d, size as u64);
    (d, data)
}

/// Blobs that moved into the cache while still read (downloads that ran together), with
/// nothing evictable then, are evicted once their readers let go, not at the next download
/// or the minute's sweep: the cache stayed over its high watermark meanwhile.
#[tokio::test]
async fn the_watermarks_apply_when_the_last_reader_lets_go() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 300, 150);
    let mut pins = Vec::new();
    for i in 1..=4 {
        let d = digest(i);
        let path = c.blob_path(&d);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, vec![0u8; 100]).unwrap();
        pins.push(c.insert_pinned(&d, 100));
    }
    assert_eq!(c.total(), 400, "nothing evictable while every blob is read");
    drop(pins);
    let started = std::time::Instant::now();
    // Under the high watermark (a pass that ran before every pin dropped may stop there).
    while c.total() > 300 {
        assert!(started.elapsed() < Duration::from_secs(5), "still {} bytes held", c.total());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A download's blob moves into the cache pinned (its clients and peers still read the file):
/// the watermarks do not take it, even when it alone is over them, until the pin goes.
#[test]
fn a_blob_inserted_pinned_stays_until_its_pin_goes() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 300, 150);
    put(&c, 1, 100);
    let d = digest(2);
    let path = c.blob_path(&d);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, vec![0u8; 400]).unwrap();
    let pin = c.insert_pinned(&d, 400);
    assert_eq!(c.get(&d), Some(400), "kept although over the high watermark alone");
    assert!(path.exists());
    assert!(c.get(&digest(1)).is_none(), "the unpinned one made room");
    drop(pin);
    c.make_room(0);
    assert!(c.get(&d).is_none(), "evicted once unpinned");
    assert!(!path.exists());
}

/// After a restart the eviction order follows the files' last use (written or read), not the
/// digests: the blob untouched for a day goes first, although its digest sorts last.
#[test]
fn a_restart_keeps_the_recently_used_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let (old, recent) = {
        let c = cache(dir.path(), 1000, 500);
        put(&c, 1, 100);
        put(&c, 2, 100);
        // The stale one is the one whose digest sorts last: digest order would keep it.
        if digest(1) > digest(2) {
            (digest(1), digest(2))
        } else {
            (digest(2), digest(1))
        }
    };
    let day_ago = SystemTime::now() - Duration::from_secs(86_400);
    let times = std::fs::FileTimes::new().set_accessed(day_ago).set_modified(day_ago);
    let c = cache(dir.path(), 1000, 500);
    std::fs::File::options().write(true).open(c.blob_path(&old)).unwrap().set_times(times).unwrap();
    drop(c);
    let c = cache(dir.path(), 150, 100);
    assert!(c.contains(&recent), "the blob used lately was evicted");
    assert!(!c.contains(&old));
}

/// What a failed download's finish left in the cache (its metainfo; its moved file when a
/// later step failed) goes; a copy the cache holds is left alone.
#[test]
fn an_unfinished_downloads_files_go_and_a_cached_copy_stays() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 1 << 20, 1 << 19);
    let (kept, _) = put_real(&c, 1000);
    let stray = digest(9);
    std::fs::create_dir_all(c.blob_path(&stray).parent().unwrap()).unwrap();
    std::fs::write(c.blob_path(&stray), b"moved, then a directory sync failed").unwrap();
    std::fs::create_dir_all(c.metainfo_path(&stray).parent().unwrap()).unwrap();
    std::fs::write(c.metainfo_path(&stray), b"{}").unwrap();
    c.discard_unfinished(&stray);
    c.discard_unfinished(&kept);
    assert!(!c.blob_path(&stray).exists() && !c.metainfo_path(&stray).exists());
    assert!(c.blob_path(&kept).exists() && c.metainfo_path(&kept).exists());
}

#[test]
fn evicts_lru_down_to_low_watermark_but_never_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 300, 150);
    put(&c, 1, 100);
    put(&c, 2, 100);
    let pinned = c.pin(&digest(1)).unwrap();
    put(&c, 3, 100);
    assert_eq!(c.get(&digest(3)), Some(100));
    // 400 > 300: evict unpinned LRU (2, then 3 is the newest) until <= 150.
    put(&c, 4, 100);
    assert!(c.get(&digest(1)).is_some(), "pinned blob survives");
    assert!(c.get(&digest(2)).is_none());
    assert!(!c.blob_path(&digest(2)).exists());
    assert!(c.total() <= 200);
    drop(pinned);
    put(&c, 5, 200);
    assert!(c.total() <= 300);
    let leftovers: Vec<_> = std::fs::read_dir(c.blob_path(&digest(1)).parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(EVICTED_SUFFIX))
        .collect();
    assert!(leftovers.is_empty(), "set-aside files are unlinked: {leftovers:?}");
}

#[test]
fn asking_whether_a_blob_is_held_is_not_a_use() {
    let dir = tempfile::tempdir().unwrap();
    // Over 300 bytes, evict down to 300: one 100-byte blob at a time.
    let c = cache(dir.path(), 300, 300);
    put(&c, 1, 100);
    put(&c, 2, 100);
    put(&c, 3, 100);
    // The seeding loop checks every held blob each interval: that must not make blob 1
    // look recently used.
    assert!(c.contains(&digest(1)));
    assert!(!c.contains(&digest(9)));
    put(&c, 4, 100);
    assert!(!c.contains(&digest(1)), "the least recently used blob goes first");
    assert!(c.contains(&digest(2)) && c.contains(&digest(3)) && c.contains(&digest(4)));
}

#[test]
fn reopens_with_existing_blobs() {
    let dir = tempfile::tempdir().unwrap();
    {
        let c = cache(dir.path(), 1000, 500);
        put(&c, 1, 10);
    }
    let c = cache(dir.path(), 1000, 500);
    assert_eq!(c.get(&digest(1)), Some(10));
}

#[test]
fn running_downloads_count_and_idle_partials_go_before_cached_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 300, 200);
    put(&c, 1, 100);
    put(&c, 2, 100);
    // An idle partial left by a failed download: 50 bytes on disk.
    let idle = c.claim_partial(&digest(7), 50);
    std::fs::create_dir_all(c.partial_path(&digest(7)).parent().unwrap()).unwrap();
    std::fs::write(c.partial_path(&digest(7)), [1u8; 50]).unwrap();
    drop(idle);
    assert_eq!(c.partial_total(), 50);
    // A download of 100 bytes starts: 350 held > 300, down to 200.
    let running = c.claim_partial(&digest(8), 100);
    assert_eq!(c.make_room(100), 150);
    assert!(!c.partial_path(&digest(7)).exists(), "the idle partial goes first");
    assert!(c.get(&digest(1)).is_none() && c.get(&digest(2)).is_some(), "then the LRU blob");
    // The running download is never a victim, however short the room.
    assert!(c.reclaim(1000));
    assert_eq!(c.partial_total(), 100);
    assert!(!c.reclaim(1000), "nothing left to evict");
    running.finished();
    assert_eq!(c.partial_total(), 0);
}

#[test]
fn share_watermarks_follow_the_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let used = Arc::new(AtomicU64::new(0));
    let u = used.clone();
    let limits =
        CacheLimits::new(Watermark::Share(0.9), Watermark::Share(0.5), Duration::from_secs(3600)).unwrap();
    let c = Arc::new(
        BlobCache::open_with_usage(
            &dir.path().join("cache"),
            &dir.path().join("partial"),
            limits,
            metrics(),
            Box::new(move || Some(FsUsage { total: 1000, used: u.load(Ordering::SeqCst) })),
        )
        .unwrap(),
    );
    used.store(300, Ordering::SeqCst);
    put(&c, 1, 100);
    put(&c, 2, 100);
    assert_eq!(c.total(), 200, "30% used: nothing to do");
    // Another program fills the disk to 95%: down to 50% means 450 bytes, all the cache has.
    used.store(950, Ordering::SeqCst);
    c.sweep();
    assert_eq!(c.total(), 0);
    // A download about to write 700 bytes onto a 30% full disk makes room first.
    used.store(300, Ordering::SeqCst);
    put(&c, 3, 100);
    let _running = c.claim_partial(&digest(4), 700);
    assert_eq!(c.make_room(700), 100);
}

#[test]
fn open_cleans_partial_leftovers_by_age_and_counts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("partial").join("sha256");
    std::fs::create_dir_all(&partial).unwrap();
    let old = partial.join(digest(1).hex());
    let recent = partial.join(digest(2).hex());
    for p in [&old, &recent] {
        std::fs::write(p, vec![7u8; 8192]).unwrap();
        std::fs::write(bitfield_path(p), b"bits").unwrap();
    }
    let stray_tmp =
        partial.join(format!(".{}.bitfield.1.2{}", digest(2).hex(), shoal_registry::durable::TEMP_SUFFIX));
    let orphan_bitfield = partial.join(format!("{}.bitfield", digest(3).hex()));
    std::fs::write(&stray_tmp, b"torn").unwrap();
    std::fs::write(&orphan_bitfield, b"bits").unwrap();
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::options().write(true).open(&old).unwrap().set_modified(two_hours_ago).unwrap();
    // A metainfo without its blob, and a blob set aside by an eviction that a crash cut short.
    let meta = dir.path().join("cache").join(METAINFO_DIR).join("sha256");
    std::fs::create_dir_all(&meta).unwrap();
    std::fs::write(meta.join(digest(5).hex()), b"{}").unwrap();
    let blobs = dir.path().join("cache").join("sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(format!("{}{EVICTED_SUFFIX}", digest(6).hex())), b"x").unwrap();

    let c = cache(dir.path(), 1 << 30, 1 << 29);
    assert!(!old.exists() && !bitfield_path(&old).exists(), "stale partial removed with its bitfield");
    assert!(!stray_tmp.exists() && !orphan_bitfield.exists());
    assert!(recent.exists() && bitfield_path(&recent).exists(), "a recent partial is kept to resume");
    assert!(!meta.join(digest(5).hex()).exists());
    assert_eq!(std::fs::read_dir(&blobs).unwrap().count(), 0);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(c.partial_total(), std::fs::metadata(&recent).unwrap().blocks() * 512);
    assert_eq!(c.metrics.partial_bytes.get() as u64, c.partial_total());
}

#[test]
fn sweep_removes_partials_that_went_stale_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let limits =
        CacheLimits { partial_max_age: Duration::from_millis(50), ..CacheLimits::bytes(1 << 30, 1 << 29) };
    let c = Arc::new(
        BlobCache::open(&dir.path().join("cache"), &dir.path().join("partial"), limits, metrics()).unwrap(),
    );
    let path = c.partial_path(&digest(1));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"some pieces").unwrap();
    let claim = c.claim_partial(&digest(1), 11);
    std::thread::sleep(Duration::from_millis(80));
    c.sweep();
    assert!(path.exists(), "a running download's file is never removed");
    drop(claim);
    c.sweep();
    assert!(path.exists(), "just went idle");
    std::thread::sleep(Duration::from_millis(80));
    c.sweep();
    assert!(!path.exists() && c.partial_total() == 0, "idle longer than partial_max_age");
}

#[test]
fn a_corrupt_piece_removes_the_blob_but_not_a_newer_copy() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 1 << 30, 1 << 29);
    let (d, data) = put_real(&c, 300 * 1024);
    let Cached::Ready(pieces) = c.open_blob(&d) else { panic!("a good blob opens") };
    assert_eq!(pieces.read_piece(0).unwrap(), data[..64 * 1024]);
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(c.blob_path(&d))
        .unwrap()
        .write_all_at(b"!", 70_000)
        .unwrap();
    // A newer copy lands before the old reader notices: it is kept.
    let fresh_generation = {
        c.insert(&d, data.len() as u64);
        c.lock().entries[&d].generation
    };
    assert!(pieces.read_piece(1).is_err());
    assert!(c.get(&d).is_some() && c.lock().entries[&d].generation == fresh_generation);
    drop(pieces);
    // The copy the reader opened is the one that is bad.
    let Cached::Ready(pieces) = c.open_blob(&d) else { panic!("opens") };
    assert!(matches!(pieces.read_piece(1), Err(shoal_p2p::PieceError::HashMismatch { index: 1 })));
    assert!(c.get(&d).is_none() && !c.blob_path(&d).exists() && !c.metainfo_path(&d).exists());
    assert_eq!(c.metrics.corrupt.get(), 1);
    assert!(matches!(c.open_blob(&d), Cached::Missing));
}

#[test]
fn a_cached_blob_of_the_wrong_size_is_removed_when_opened() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 1 << 30, 1 << 29);
    let (d, _) = put_real(&c, 100 * 1024);
    std::fs::OpenOptions::new().write(true).open(c.blob_path(&d)).unwrap().set_len(10).unwrap();
    assert!(matches!(c.open_blob(&d), Cached::Missing));
    assert!(!c.blob_path(&d).exists());
    assert_eq!(c.metrics.corrupt.get(), 1);
}

#[test]
fn a_bad_metainfo_is_replaced_once_the_file_is_checked_against_a_fetched_one() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 1 << 30, 1 << 29);
    let (d, data) = put_real(&c, 200 * 1024);
    let good = Metainfo::compute(&data[..], data.len() as u64, shoal_registry::Algorithm::Sha256).unwrap();
    std::fs::write(c.metainfo_path(&d), b"{\"digest\": tor").unwrap();
    assert!(matches!(c.open_blob(&d), Cached::NeedsMetainfo));
    let Cached::Ready(pieces) = c.adopt_metainfo(&d, good.clone()) else { panic!("adopted") };
    assert_eq!(pieces.read_piece(2).unwrap(), data[128 * 1024..192 * 1024]);
    let written: Metainfo = serde_json::from_slice(&std::fs::read(c.metainfo_path(&d)).unwrap()).unwrap();
    assert_eq!(written, good);
    drop(pieces);
    assert!(matches!(c.open_blob(&d), Cached::Ready(_)));
    // A metainfo the file does not match: the file is the suspect, and goes.
    let mut other = data.clone();
    other[5] ^= 1;
    let wrong = Metainfo::compute(&other[..], other.len() as u64, shoal_registry::Algorithm::Sha256).unwrap();
    let wrong = Metainfo::new(d.clone(), wrong.size(), wrong.piece_length(), wrong.chain().to_vec()).unwrap();
    assert!(matches!(c.adopt_metainfo(&d, wrong), Cached::Missing));
    assert!(c.get(&d).is_none() && !c.blob_path(&d).exists());
}

#[test]
fn metainfo_is_written_by_temp_file_and_rename() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 1 << 30, 1 << 29);
    let (d, data) = put_real(&c, 1000);
    let meta = Metainfo::compute(&data[..], 1000, shoal_registry::Algorithm::Sha256).unwrap();
    c.write_metainfo(&meta).unwrap();
    let meta_dir = c.metainfo_path(&d).parent().unwrap().to_path_buf();
    let names: Vec<String> = std::fs::read_dir(&meta_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, [d.hex().to_string()], "no temp file left behind");
    // A temp file a crash left is not mistaken for anything, and goes at the next start.
    let temp = format!(".{}.1.2{}", d.hex(), shoal_registry::durable::TEMP_SUFFIX);
    std::fs::write(meta_dir.join(temp), b"{\"dig").unwrap();
    drop(c);
    let c = cache(dir.path(), 1 << 30, 1 << 29);
    assert!(matches!(c.open_blob(&d), Cached::Ready(_)));
    assert_eq!(std::fs::read_dir(&meta_dir).unwrap().count(), 1);
}

/// A second copy of a blob written over one that readers hold (a download of a blob already
/// cached) keeps the readers' pins: with the old reader gone and a new one reading, the blob
/// is not evicted for room; once nobody reads it, it is.
#[test]
fn a_copy_written_over_a_pinned_one_keeps_its_pins() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 300 * 1024, 150 * 1024);
    let (d, data) = put_real(&c, 200 * 1024);
    let Cached::Ready(old) = c.open_blob(&d) else { panic!("the blob opens") };
    // The same blob again (its file replaced, its entry recorded anew).
    std::fs::write(c.blob_path(&d), &data).unwrap();
    c.insert(&d, data.len() as u64);
    let Cached::Ready(new) = c.open_blob(&d) else { panic!("the new copy opens") };
    drop(old);
    put(&c, 7, 200 * 1024);
    assert!(c.contains(&d), "a blob being read was evicted");
    drop(new);
    put(&c, 8, 200 * 1024);
    assert!(!c.contains(&d), "with no reader left the blob is evictable again");
}

/// Pins on a copy removed as corrupt do not unpin the copy fetched after it.
#[test]
fn pins_of_a_removed_copy_do_not_unpin_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 300 * 1024, 150 * 1024);
    let (d, data) = put_real(&c, 200 * 1024);
    let Cached::Ready(old) = c.open_blob(&d) else { panic!("the blob opens") };
    // The file is cut short on disk: the next open finds it and removes the entry.
    std::fs::write(c.blob_path(&d), &data[..1000]).unwrap();
    assert!(matches!(c.open_blob(&d), Cached::Missing));
    // Fetched again: blob and metainfo written, the entry recorded.
    std::fs::write(c.blob_path(&d), &data).unwrap();
    let meta = Metainfo::compute(&data[..], data.len() as u64, shoal_registry::Algorithm::Sha256).unwrap();
    c.write_metainfo(&meta).unwrap();
    c.insert(&d, data.len() as u64);
    let Cached::Ready(new) = c.open_blob(&d) else { panic!("the refetched copy opens") };
    drop(old);
    put(&c, 9, 200 * 1024);
    assert!(c.contains(&d), "the old copy's pin unpinned the new copy, which was evicted while read");
    drop(new);
}

/// A resumed download's partial file is on the filesystem already: under share watermarks,
/// only the bytes it has still to write count as incoming, so resuming does not evict blobs
/// for room it has.
#[test]
fn a_resumed_download_makes_room_only_for_what_it_has_still_to_write() {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let limits =
        CacheLimits::new(Watermark::Share(0.9), Watermark::Share(0.5), Duration::from_secs(3600)).unwrap();
    let c = Arc::new(
        BlobCache::open_with_usage(
            &dir.path().join("cache"),
            &dir.path().join("partial"),
            limits,
            metrics(),
            // 85 of 100 MiB used, the partial file's 4 MiB included.
            Box::new(|| Some(FsUsage { total: 100 * MIB, used: 85 * MIB })),
        )
        .unwrap(),
    );
    put(&c, 1, (10 * MIB) as usize);
    let resumed = digest(2);
    let path = c.partial_path(&resumed);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, vec![7u8; (4 * MIB) as usize]).unwrap();
    let _claim = c.claim_partial(&resumed, 8 * MIB);
    assert_eq!(c.make_room_for_download(&resumed, 8 * MIB), 0, "89% with the 4 MiB to come: under 90%");
    assert_eq!(c.total(), 10 * MIB);
    // A fresh download of the same size has all 8 MiB to write: 93% → down to 50%.
    let _fresh = c.claim_partial(&digest(3), 8 * MIB);
    assert_eq!(c.make_room_for_download(&digest(3), 8 * MIB), 10 * MIB);
}

/// An eviction renames its victims' files outside the index lock: while a rename is held up
/// (a disk slow on metadata), the checks async requests make (`contains`, `get`) answer at
/// once. A writer of the same digest's files (a new download, a metainfo) waits until the old
/// files are out of the way, so the rename cannot take the new file.
#[test]
fn an_eviction_renames_outside_the_lock_and_writers_of_its_digest_wait() {
    use std::sync::mpsc;
    let dir = tempfile::tempdir().unwrap();
    let c = cache(dir.path(), 300, 150);
    put(&c, 1, 200);
    let (held_tx, held_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    *c.before_set_aside.lock().unwrap() = Some(Box::new(move || {
        let _ = held_tx.send(());
        let _ = go_rx.lock().unwrap().recv();
    }));
    let evicting = std::thread::spawn({
        let c = c.clone();
        // Over the high watermark: the older blob goes.
        move || put(&c, 2, 150)
    });
    held_rx.recv_timeout(Duration::from_secs(10)).expect("the eviction reached its renames");
    let (answer_tx, answer_rx) = mpsc::channel();
    std::thread::spawn({
        let c = c.clone();
        move || {
            let _ = answer_tx.send((c.contains(&digest(1)), c.get(&digest(2))));
        }
    });
    let answer =
        answer_rx.recv_timeout(Duration::from_secs(2)).expect("the index answers during the renames");
    assert_eq!(answer, (false, Some(150)));
    let (wrote_tx, wrote_rx) = mpsc::channel();
    let path = c.blob_path(&digest(1));
    let writer = std::thread::spawn({
        let (c, path) = (c.clone(), path.clone());
        move || {
            c.wait_set_aside(&digest(1));
            std::fs::write(&path, b"the new copy").unwrap();
            let _ = wrote_tx.send(());
        }
    });
    assert!(wrote_rx.recv_timeout(Duration::from_millis(300)).is_err(), "the writer waited");
    go_tx.send(()).unwrap();
    evicting.join().unwrap();
    writer.join().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"the new copy");
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(EVICTED_SUFFIX))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
