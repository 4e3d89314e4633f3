//! The picker's policies, driven by hand-made peers and bitfields.

use super::*;
use shoal_registry::{Algorithm, Digest};
use std::time::Duration;

const PIECE: u64 = 64 * 1024;

fn meta(pieces: u32) -> Metainfo {
    let size = u64::from(pieces) * PIECE;
    Metainfo::unverifiable(Digest::of(Algorithm::Sha256, b"x"), size, PIECE).unwrap()
}

fn picker(pieces: u32, seed: u64) -> PiecePicker {
    PiecePicker::with_rng(
        &meta(pieces),
        Bitfield::new(pieces),
        PickerConfig::default(),
        StdRng::seed_from_u64(seed),
    )
    .unwrap()
}

fn peer(n: u8) -> PeerId {
    PeerId([n; 20])
}

fn bits(len: u32, set: &[u32]) -> Bitfield {
    let mut bf = Bitfield::new(len);
    for &i in set {
        bf.set(i).unwrap();
    }
    bf
}

#[test]
fn rarest_first() {
    let mut p = picker(4, 1);
    // Piece 3 is on one peer, 2 on two, 1 on three, 0 on four.
    p.add_peer(peer(1), bits(4, &[0, 1, 2, 3])).unwrap();
    p.add_peer(peer(2), bits(4, &[0, 1, 2])).unwrap();
    p.add_peer(peer(3), bits(4, &[0, 1])).unwrap();
    p.add_peer(peer(4), bits(4, &[0])).unwrap();
    assert_eq!(p.availability(0), 4);
    assert_eq!(p.availability(3), 1);
    assert_eq!(p.pick(&peer(1), Instant::now(), 4), vec![3, 2, 1, 0]);
}

#[test]
fn ties_are_broken_by_the_rng_deterministically() {
    let order = |seed| {
        let mut p = picker(16, seed);
        p.add_peer(peer(1), Bitfield::full(16)).unwrap();
        p.pick(&peer(1), Instant::now(), 16)
    };
    assert_eq!(order(7), order(7));
    let mut sorted = order(7);
    sorted.sort_unstable();
    assert_eq!(sorted, (0..16).collect::<Vec<_>>());
    assert!((0..10).any(|s| order(s) != order(s + 1)), "seeds should give different orders");
}

#[test]
fn reader_window_goes_first() {
    let mut p = picker(20, 3);
    p.add_peer(peer(1), Bitfield::full(20)).unwrap();
    // Make piece 0 the rarest: without readers it would go first.
    p.add_peer(peer(2), bits(20, &(1..20).collect::<Vec<_>>())).unwrap();
    p.set_reader_positions(vec![10, 18]);
    let now = Instant::now();
    assert_eq!(p.pick(&peer(1), now, 3), vec![10, 11, 12]);
    // The next pick finishes the first window, then the second (clamped at the end).
    assert_eq!(p.pick(&peer(1), now, 6)[..3], [13, 18, 19]);
    // Windows exhausted: rarest first again.
    assert_eq!(p.pick(&peer(1), now, 7), vec![0]);
}

#[test]
fn in_order_picks_take_the_readers_windows_then_the_next_pieces_not_the_rarest() {
    let mut p = picker(20, 3);
    p.add_peer(peer(1), Bitfield::full(20)).unwrap();
    // Piece 19 is the rarest: rarest first would take it right after the window.
    p.add_peer(peer(2), bits(20, &(0..19).collect::<Vec<_>>())).unwrap();
    p.mark_have(6);
    p.set_reader_positions(vec![4]);
    let now = Instant::now();
    // The window is pieces 4-7 (6 is here).
    assert_eq!(p.pick_in_order_where(&peer(1), now, 4, |i, _| i != 8), vec![4, 5, 7, 0]);
    assert_eq!(p.pick_in_order_where(&peer(1), now, 8, |i, _| i != 8), vec![1, 2, 3, 9]);
}

#[test]
fn reader_window_skips_pieces_we_have_or_the_peer_lacks() {
    let mut p = picker(10, 3);
    p.mark_have(2);
    p.add_peer(peer(1), bits(10, &[1, 3, 4, 5, 6, 9])).unwrap();
    p.set_reader_positions(vec![1, 100]);
    assert_eq!(p.pick(&peer(1), Instant::now(), 3), vec![1, 3, 4]);
}

#[test]
fn respects_the_per_peer_budget() {
    let mut p = picker(10, 1);
    p.add_peer(peer(1), Bitfield::full(10)).unwrap();
    let now = Instant::now();
    assert_eq!(p.pick(&peer(1), now, 3).len(), 3);
    assert_eq!(p.in_flight_for(&peer(1)), 3);
    assert!(p.pick(&peer(1), now, 3).is_empty());
    assert_eq!(p.pick(&peer(1), now, 5).len(), 2);
    assert!(p.pick(&peer(1), now, 0).is_empty());
}

#[test]
fn unknown_peer_gets_nothing() {
    let mut p = picker(4, 1);
    assert!(p.pick(&peer(9), Instant::now(), 4).is_empty());
    assert_eq!(p.peer_has(&peer(9), 0), Err(PickerError::UnknownPeer(peer(9))));
}

#[test]
fn no_duplicates_outside_endgame() {
    let mut p = picker(6, 1);
    p.add_peer(peer(1), Bitfield::full(6)).unwrap();
    p.add_peer(peer(2), Bitfield::full(6)).unwrap();
    let now = Instant::now();
    let a = p.pick(&peer(1), now, 3);
    let b = p.pick(&peer(2), now, 2);
    assert_eq!(a.len(), 3);
    assert_eq!(b.len(), 2);
    assert!(a.iter().all(|i| !b.contains(i)));
    assert!(!p.is_endgame());
}

#[test]
fn endgame_allows_limited_duplicates_and_cancels_losers() {
    let mut p = picker(4, 1);
    for n in 1..=4 {
        p.add_peer(peer(n), Bitfield::full(4)).unwrap();
    }
    let now = Instant::now();
    let a = p.pick(&peer(1), now, 2);
    let b = p.pick(&peer(2), now, 2);
    assert_eq!(a.len() + b.len(), 4);
    assert!(p.is_endgame());
    // Peer 3 may duplicate, and never asks for the same piece twice itself.
    let c = p.pick(&peer(3), now, 10);
    assert_eq!(c.len(), 4);
    assert!((0..4).all(|i| p.in_flight(i) == 2));
    // The cap of two requests per piece is reached: peer 4 gets nothing.
    assert!(p.pick(&peer(4), now, 10).is_empty());
    // The first copy wins; the other requester is told to cancel.
    let piece = a[0];
    assert_eq!(p.received(&peer(1), piece), vec![peer(3)]);
    assert_eq!(p.in_flight(piece), 0);
    assert!(p.have().get(piece));
    // A later duplicate arrival has nobody left to cancel.
    assert!(p.received(&peer(3), piece).is_empty());
}

#[test]
fn endgame_prefers_pieces_with_fewer_requests() {
    let cfg = PickerConfig { endgame_max_requests: 3, ..PickerConfig::default() };
    let mut p = PiecePicker::with_rng(&meta(3), Bitfield::new(3), cfg, StdRng::seed_from_u64(5)).unwrap();
    for n in 1..=3 {
        p.add_peer(peer(n), Bitfield::full(3)).unwrap();
    }
    let now = Instant::now();
    p.pick(&peer(1), now, 3);
    let first = p.pick(&peer(2), now, 1);
    assert_eq!(first.len(), 1);
    let next = p.pick(&peer(3), now, 2);
    assert!(!next.contains(&first[0]), "{next:?} should avoid the doubly requested {first:?}");
}

#[test]
fn endgame_ignores_pieces_no_peer_has() {
    let mut p = picker(3, 1);
    p.add_peer(peer(1), bits(3, &[0, 1])).unwrap();
    p.add_peer(peer(2), bits(3, &[0, 1])).unwrap();
    let now = Instant::now();
    assert_eq!(p.pick(&peer(1), now, 5).len(), 2);
    assert!(p.is_endgame());
    assert_eq!(p.pick(&peer(2), now, 5).len(), 2);
}

#[test]
fn withdrawn_requests_are_re_requestable_and_remember_when_they_were_sent() {
    let mut p = picker(2, 1);
    p.add_peer(peer(1), Bitfield::full(2)).unwrap();
    p.add_peer(peer(2), Bitfield::full(2)).unwrap();
    let t0 = Instant::now();
    assert_eq!(p.pick(&peer(1), t0, 1).len(), 1);
    let later = t0 + Duration::from_secs(1);
    assert_eq!(p.pick(&peer(2), later, 1).len(), 1);
    assert_eq!(p.oldest_request_to(&peer(1)), Some(t0));
    assert_eq!(p.oldest_request_to(&peer(2)), Some(later));
    assert_eq!(p.in_flight_bytes(), 2 * PIECE);
    assert_eq!(p.in_flight_bytes_for(&peer(1)), PIECE);
    let freed = p.withdraw(&peer(1));
    assert_eq!(freed.len(), 1);
    assert_eq!(p.in_flight(freed[0]), 0);
    assert_eq!(p.oldest_request_to(&peer(1)), None);
    assert!(p.peer_bitfield(&peer(1)).is_some(), "the peer stays connected");
    // The freed piece goes to the next peer that asks, not as a duplicate.
    assert!(!p.is_endgame());
    assert_eq!(p.pick(&peer(2), later, 2), freed);
}

#[test]
fn failed_frees_the_request() {
    let mut p = picker(1, 1);
    p.add_peer(peer(1), Bitfield::full(1)).unwrap();
    p.add_peer(peer(2), Bitfield::full(1)).unwrap();
    let now = Instant::now();
    assert_eq!(p.pick(&peer(1), now, 1), vec![0]);
    p.failed(&peer(2), 0); // not its request: no effect
    assert_eq!(p.in_flight(0), 1);
    p.failed(&peer(1), 0);
    assert_eq!(p.in_flight(0), 0);
    assert_eq!(p.pick(&peer(2), now, 1), vec![0]);
}

#[test]
fn removing_a_peer_forgets_its_pieces_and_requests() {
    let mut p = picker(4, 1);
    p.add_peer(peer(1), bits(4, &[0, 1])).unwrap();
    p.add_peer(peer(2), bits(4, &[1, 2])).unwrap();
    let mut picked = p.pick(&peer(1), Instant::now(), 2);
    picked.sort_unstable();
    let mut freed = p.remove_peer(&peer(1));
    freed.sort_unstable();
    assert_eq!(freed, picked);
    assert_eq!((p.availability(0), p.availability(1), p.availability(2)), (0, 1, 1));
    assert_eq!(p.in_flight_for(&peer(1)), 0);
    assert!(p.remove_peer(&peer(1)).is_empty());
}

#[test]
fn have_updates_availability() {
    let mut p = picker(4, 1);
    p.add_peer(peer(1), Bitfield::new(4)).unwrap();
    assert!(!p.is_interesting(&peer(1)));
    p.peer_has(&peer(1), 2).unwrap();
    p.peer_has(&peer(1), 2).unwrap();
    assert_eq!(p.availability(2), 1);
    assert!(p.is_interesting(&peer(1)));
    assert_eq!(p.peer_has(&peer(1), 4), Err(PickerError::OutOfRange { index: 4, count: 4 }));
    assert_eq!(p.pick(&peer(1), Instant::now(), 4), vec![2]);
    // Re-adding a peer replaces its bitfield rather than double counting.
    p.add_peer(peer(1), bits(4, &[3])).unwrap();
    assert_eq!((p.availability(2), p.availability(3)), (0, 1));
}

#[test]
fn bitfield_lengths_are_checked() {
    let m = meta(4);
    assert_eq!(
        PiecePicker::new(&m, Bitfield::new(3), PickerConfig::default()).unwrap_err(),
        PickerError::BitfieldLength { expected: 4, actual: 3 }
    );
    let mut p = picker(4, 1);
    assert_eq!(
        p.add_peer(peer(1), Bitfield::new(5)),
        Err(PickerError::BitfieldLength { expected: 4, actual: 5 })
    );
}

#[test]
fn resumed_download_and_completion() {
    let mut p =
        PiecePicker::with_rng(&meta(3), bits(3, &[0, 2]), PickerConfig::default(), StdRng::seed_from_u64(1))
            .unwrap();
    p.add_peer(peer(1), Bitfield::full(3)).unwrap();
    assert_eq!(p.pick(&peer(1), Instant::now(), 5), vec![1]);
    assert!(p.received(&peer(1), 1).is_empty());
    assert!(p.is_complete());
    assert!(!p.is_endgame());
    assert!(p.pick(&peer(1), Instant::now(), 5).is_empty());
    assert!(p.mark_have(99).is_empty());
}

#[test]
fn bytes_in_flight_use_each_pieces_length() {
    // 2 full pieces and a 1-byte tail.
    let m = Metainfo::unverifiable(Digest::of(Algorithm::Sha256, b"x"), 2 * PIECE + 1, PIECE).unwrap();
    let cfg = PickerConfig::default();
    let mut p = PiecePicker::with_rng(&m, Bitfield::new(3), cfg, StdRng::seed_from_u64(1)).unwrap();
    p.add_peer(peer(1), bits(3, &[0, 2])).unwrap();
    assert_eq!(p.pick(&peer(1), Instant::now(), 2).len(), 2);
    assert_eq!(p.in_flight_bytes(), PIECE + 1);
}

/// Requests sent at one instant are listed in the order they were sent (the order the peer
/// serves them), not by piece index: a retiring peer keeps the piece it is sending, and
/// lateness counts the requests really ahead of each.
#[test]
fn requests_sent_at_one_instant_keep_their_order() {
    let mut p = picker(16, 1);
    p.add_peer(peer(1), Bitfield::full(16)).unwrap();
    let now = Instant::now();
    assert_eq!(p.pick_where(&peer(1), now, 1, |i, _| i == 9), vec![9]);
    assert_eq!(p.pick_where(&peer(1), now, 2, |i, _| i == 2), vec![2]);
    assert_eq!(p.pick_where(&peer(1), now, 3, |i, _| i == 5), vec![5]);
    assert_eq!(p.requests_to(&peer(1)), vec![9, 2, 5]);
}
