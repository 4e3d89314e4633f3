use super::*;
use crate::bitfield_file::encode_bitfield;
use shoal_registry::Algorithm;

const KIB: usize = 1024;

fn blob(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 253) as u8).collect()
}

fn metainfo(data: &[u8]) -> Metainfo {
    Metainfo::compute(data, data.len() as u64, Algorithm::Sha256).unwrap()
}

fn piece<'a>(m: &Metainfo, data: &'a [u8], i: u32) -> &'a [u8] {
    let (off, len) = m.piece_range(i).unwrap();
    &data[off as usize..(off + len) as usize]
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    data: Vec<u8>,
    meta: Metainfo,
}

/// A 5-piece blob (4 × 64 KiB + 10 KiB) and a path for its piece file.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("downloads").join("blob.part");
    let data = blob(4 * 64 * KIB + 10 * KIB);
    let meta = metainfo(&data);
    assert_eq!(meta.piece_count(), 5);
    Fixture { _dir: dir, path, data, meta }
}

#[test]
fn open_preallocates_and_starts_empty() {
    let f = fixture();
    let pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    let meta = fs::metadata(&f.path).unwrap();
    assert_eq!(meta.len(), f.data.len() as u64);
    // Allocated on disk, not sparse (the test's temporary directory supports fallocate).
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 >= meta.len(), "{} blocks for {} bytes", meta.blocks(), meta.len());
    assert_eq!(pf.have().count(), 0);
    assert!(!pf.is_complete());
    assert_eq!(pf.path(), f.path);
}

#[test]
fn out_of_order_writes_then_finish() {
    let f = fixture();
    let mut pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    for i in [3, 0, 4, 2, 1] {
        pf.write_piece(i, piece(&f.meta, &f.data, i)).unwrap();
        assert!(pf.have().get(i));
    }
    assert!(pf.is_complete());
    for i in 0..5 {
        assert_eq!(pf.read_piece(i).unwrap(), piece(&f.meta, &f.data, i));
    }
    let dest = f.path.parent().unwrap().join("blobs/sha256/ab/final");
    pf.finish(&dest).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), f.data);
    assert!(!f.path.exists());
    assert!(!bitfield_path(&f.path).exists());
}

/// A bitfield that cannot be deleted once the blob is renamed into place fails nothing: the
/// finished blob is durable (its caller deleted it on any error, a good download lost).
#[test]
fn a_bitfield_that_cannot_be_deleted_fails_no_finished_blob() {
    let f = fixture();
    let mut pf = PieceFile::open(&f.path, f.meta.clone()).unwrap().with_persist_every(u32::MAX);
    for i in 0..5 {
        pf.write_piece(i, piece(&f.meta, &f.data, i)).unwrap();
    }
    // Something not a file where the bitfield is: its removal fails.
    let bitfield = bitfield_path(&f.path);
    let _ = fs::remove_file(&bitfield);
    fs::create_dir_all(bitfield.join("busy")).unwrap();
    let dest = f.path.parent().unwrap().join("final");
    pf.finish(&dest).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), f.data);
}

#[test]
fn pieces_written_and_marked_separately_persist_on_flush() {
    let f = fixture();
    let mut pf = PieceFile::open(&f.path, f.meta.clone()).unwrap().with_persist_every(u32::MAX);
    for i in [1, 3] {
        pf.write_data(i, piece(&f.meta, &f.data, i)).unwrap();
        assert!(pf.mark_written(i).unwrap());
    }
    assert!(!pf.mark_written(3).unwrap(), "marking twice is not new");
    pf.flush().unwrap();
    drop(pf);
    let reopened = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    assert_eq!(reopened.have().iter_set().collect::<Vec<_>>(), [1, 3]);
    for i in [1, 3] {
        assert_eq!(reopened.read_piece(i).unwrap(), piece(&f.meta, &f.data, i));
    }
}

#[test]
fn duplicate_write_is_a_noop() {
    let f = fixture();
    let mut pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    pf.write_piece(1, piece(&f.meta, &f.data, 1)).unwrap();
    pf.write_piece(1, piece(&f.meta, &f.data, 1)).unwrap();
    assert_eq!(pf.have().count(), 1);
}

#[test]
fn hash_mismatch_is_rejected_and_nothing_marked() {
    let f = fixture();
    let mut pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    let mut bad = piece(&f.meta, &f.data, 2).to_vec();
    bad[0] ^= 0xff;
    assert!(matches!(pf.write_piece(2, &bad), Err(PieceError::HashMismatch { index: 2 })));
    // Right bytes for another piece, or a wrong length, are mismatches too.
    assert!(matches!(
        pf.write_piece(2, piece(&f.meta, &f.data, 1)),
        Err(PieceError::HashMismatch { index: 2 })
    ));
    assert!(matches!(pf.write_piece(4, &[]), Err(PieceError::HashMismatch { index: 4 })));
    assert!(matches!(pf.write_piece(5, &[]), Err(PieceError::OutOfRange { index: 5, count: 5 })));
    assert_eq!(pf.have().count(), 0);
    assert!(!bitfield_path(&f.path).exists());
    // Nothing was written either.
    assert!(fs::read(&f.path).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn reopen_after_crash_keeps_persisted_pieces() {
    let f = fixture();
    let mut pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    pf.write_piece(0, piece(&f.meta, &f.data, 0)).unwrap();
    pf.write_piece(3, piece(&f.meta, &f.data, 3)).unwrap();
    // A crash: no destructor, no flush.
    std::mem::forget(pf);
    let pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    assert_eq!(pf.have().iter_set().collect::<Vec<_>>(), vec![0, 3]);
    assert_eq!(pf.read_piece(3).unwrap(), piece(&f.meta, &f.data, 3));
}

#[test]
fn batched_persistence_lags_but_never_lies() {
    let f = fixture();
    let mut pf = PieceFile::open(&f.path, f.meta.clone()).unwrap().with_persist_every(2);
    pf.write_piece(0, piece(&f.meta, &f.data, 0)).unwrap();
    assert!(!bitfield_path(&f.path).exists());
    pf.write_piece(1, piece(&f.meta, &f.data, 1)).unwrap();
    pf.write_piece(2, piece(&f.meta, &f.data, 2)).unwrap();
    drop(pf);
    let mut pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    assert_eq!(pf.have().iter_set().collect::<Vec<_>>(), vec![0, 1]);
    pf = pf.with_persist_every(10);
    pf.write_piece(4, piece(&f.meta, &f.data, 4)).unwrap();
    pf.flush().unwrap();
    drop(pf);
    let pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    assert_eq!(pf.have().iter_set().collect::<Vec<_>>(), vec![0, 1, 4]);
}

#[test]
fn undecodable_or_foreign_bitfield_is_discarded() {
    let f = fixture();
    let mut pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    pf.write_piece(0, piece(&f.meta, &f.data, 0)).unwrap();
    drop(pf);
    let bf = bitfield_path(&f.path);
    let good = fs::read(&bf).unwrap();
    for bad in [
        Vec::new(),
        b"garbage".to_vec(),
        good[..good.len() - 1].to_vec(),
        [&good[..], &[0][..]].concat(),
        [&b"SHOALBF0"[..], &good[8..]].concat(),
    ] {
        fs::write(&bf, &bad).unwrap();
        let pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
        assert_eq!(pf.have().count(), 0);
    }
    // A bitfield written for another blob is not trusted either.
    let other_data = blob(5 * 64 * KIB);
    let other = metainfo(&other_data);
    fs::write(&bf, encode_bitfield(&other, &Bitfield::full(other.piece_count()))).unwrap();
    let pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    assert_eq!(pf.have().count(), 0);
    // And the intact one still loads.
    fs::write(&bf, &good).unwrap();
    let pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    assert_eq!(pf.have().count(), 1);
}

#[test]
fn wrong_size_data_file_starts_over() {
    let f = fixture();
    let mut pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    pf.write_piece(0, piece(&f.meta, &f.data, 0)).unwrap();
    drop(pf);
    fs::OpenOptions::new().write(true).open(&f.path).unwrap().set_len(10).unwrap();
    let pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    assert_eq!(pf.have().count(), 0);
    assert_eq!(fs::metadata(&f.path).unwrap().len(), f.data.len() as u64);
}

#[test]
fn read_piece_only_serves_what_we_have() {
    let f = fixture();
    let mut pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    pf.write_piece(4, piece(&f.meta, &f.data, 4)).unwrap();
    assert_eq!(pf.read_piece(4).unwrap().len(), 10 * KIB);
    assert!(matches!(pf.read_piece(0), Err(PieceError::Missing { index: 0 })));
    assert!(matches!(pf.read_piece(9), Err(PieceError::OutOfRange { index: 9, .. })));
}

#[test]
fn read_at_stops_at_the_first_missing_piece() {
    let f = fixture();
    let mut pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    for i in [1, 2, 4] {
        pf.write_piece(i, piece(&f.meta, &f.data, i)).unwrap();
    }
    let p = 64 * KIB;
    let mut buf = vec![0u8; 10 * p];
    assert!(matches!(pf.read_at(0, &mut buf), Err(PieceError::Missing { index: 0 })));
    // From inside piece 1: through piece 2, stopping before missing piece 3.
    let n = pf.read_at(p as u64 + 5, &mut buf).unwrap();
    assert_eq!(n, 2 * p - 5);
    assert_eq!(&buf[..n], &f.data[p + 5..3 * p]);
    // A small buffer inside one piece.
    let mut small = [0u8; 100];
    assert_eq!(pf.read_at(2 * p as u64, &mut small).unwrap(), 100);
    assert_eq!(&small[..], &f.data[2 * p..2 * p + 100]);
    // The tail piece, up to EOF.
    let n = pf.read_at(4 * p as u64 + 1, &mut buf).unwrap();
    assert_eq!(&buf[..n], &f.data[4 * p + 1..]);
    let size = f.data.len() as u64;
    assert_eq!(pf.read_at(size, &mut buf).unwrap(), 0);
    assert!(matches!(pf.read_at(size + 1, &mut buf), Err(PieceError::OffsetOutOfRange { .. })));
    assert_eq!(pf.read_at(p as u64, &mut []).unwrap(), 0);
}

#[test]
fn finish_requires_completion() {
    let f = fixture();
    let mut pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    pf.write_piece(0, piece(&f.meta, &f.data, 0)).unwrap();
    let dest = f.path.with_file_name("final");
    assert!(matches!(pf.finish(&dest), Err(PieceError::Incomplete { missing: 4 })));
    assert!(!dest.exists());
}

#[test]
fn zero_size_blob_is_complete_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.part");
    let meta = metainfo(&[]);
    let pf = PieceFile::open(&path, meta).unwrap();
    assert!(pf.is_complete());
    let dest = dir.path().join("out/empty");
    pf.finish(&dest).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), Vec::<u8>::new());
}

#[test]
fn discard_removes_everything() {
    let f = fixture();
    let mut pf = PieceFile::open(&f.path, f.meta.clone()).unwrap();
    pf.write_piece(0, piece(&f.meta, &f.data, 0)).unwrap();
    pf.discard().unwrap();
    assert!(!f.path.exists());
    assert!(!bitfield_path(&f.path).exists());
}

#[test]
fn sha512_blobs_finish_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.part");
    let data = blob(70 * KIB);
    let meta = Metainfo::compute(&data[..], data.len() as u64, Algorithm::Sha512).unwrap();
    let mut pf = PieceFile::open(&path, meta.clone()).unwrap();
    for i in 0..meta.piece_count() {
        pf.write_piece(i, piece(&meta, &data, i)).unwrap();
    }
    pf.finish(&dir.path().join("b")).unwrap();
}
