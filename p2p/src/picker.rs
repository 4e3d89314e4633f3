//! Which pieces to request from which peer: the swarm scheduler's pure state.
//!
//! One event loop owns a [`PiecePicker`] per blob and feeds it what happens (peers joining with
//! their bitfields, `have` messages, pieces arriving or failing, the clock); it answers with the
//! pieces to request. No I/O and no clock of its own (time is passed in), so every policy here
//! is unit-tested without sockets or sleeps. The policies:
//!
//! - **Readers first.** Pieces in a window just ahead of each client's read position are picked
//!   before anything else, so a streaming `GET` is not starved by the rest of the download.
//! - **Rarest first** elsewhere, ties broken at random (with an injectable RNG), so the swarm
//!   spreads copies of scarce pieces and peers do not all chase the same piece.
//! - **One request per piece**, except in **endgame** (every missing piece some connected peer
//!   has is already requested): then a piece may be requested from a few peers at once, so one
//!   slow peer cannot hold up the end of the download; the losers get a `Cancel`.
//! - **No deadlines here.** Each request records when it was sent; whether a peer is too slow
//!   is decided from what its connection delivers (see `flow`), and its requests are then
//!   withdrawn ([`PiecePicker::withdraw`]) so the pieces are free to request again.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::bitfield::Bitfield;
use crate::metainfo::Metainfo;
use crate::peer::PeerId;

/// Default number of pieces, starting at a reader's position, that are picked before others.
pub const DEFAULT_READER_WINDOW: u32 = 4;

/// Default cap on simultaneous requests for one piece in endgame.
pub const DEFAULT_ENDGAME_MAX_REQUESTS: usize = 2;

/// Up to this many pieces per pick are chosen by repeated minimum rather than by sorting every
/// candidate piece (most picks want one or two).
const FEW_PICKS: usize = 4;

/// Tunables of the picker; every field has a documented default (see the `DEFAULT_*` consts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickerConfig {
    /// Pieces from each reader's position onwards that go first (default 4).
    pub reader_window: u32,
    /// Most simultaneous requests for one piece in endgame (default 2).
    pub endgame_max_requests: usize,
}

impl Default for PickerConfig {
    fn default() -> Self {
        PickerConfig {
            reader_window: DEFAULT_READER_WINDOW,
            endgame_max_requests: DEFAULT_ENDGAME_MAX_REQUESTS,
        }
    }
}

/// Why an event does not fit the picker's blob.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PickerError {
    #[error("bitfield covers {actual} pieces, the blob has {expected}")]
    BitfieldLength { expected: u32, actual: u32 },
    #[error("piece {index} is out of range (blob has {count} pieces)")]
    OutOfRange { index: u32, count: u32 },
    #[error("peer {0} is not known to the picker")]
    UnknownPeer(PeerId),
}

/// One outstanding request.
#[derive(Clone, Copy, Debug)]
struct Request {
    peer: PeerId,
    sent_at: Instant,
}

/// The scheduler state for one blob; see the module docs for the policies.
#[derive(Debug)]
pub struct PiecePicker<R = StdRng> {
    config: PickerConfig,
    piece_length: u64,
    size: u64,
    have: Bitfield,
    /// How many connected peers have each piece.
    availability: Vec<u32>,
    peers: HashMap<PeerId, Bitfield>,
    /// Outstanding requests by piece; never holds an empty list or a piece we have.
    in_flight: BTreeMap<u32, Vec<Request>>,
    reader_positions: Vec<u32>,
    /// The reader window in force: the configured one, or more (see `set_reader_window`).
    reader_window: u32,
    rng: R,
}

impl PiecePicker<StdRng> {
    /// A picker for `metainfo`'s blob, starting from the pieces in `have` (e.g. a resumed
    /// download), with an OS-seeded RNG.
    pub fn new(metainfo: &Metainfo, have: Bitfield, config: PickerConfig) -> Result<Self, PickerError> {
        PiecePicker::with_rng(metainfo, have, config, StdRng::from_os_rng())
    }
}

impl<R: Rng> PiecePicker<R> {
    /// Like [`PiecePicker::new`] with a given RNG, so tests (and reproductions) are deterministic.
    pub fn with_rng(
        metainfo: &Metainfo,
        have: Bitfield,
        config: PickerConfig,
        rng: R,
    ) -> Result<Self, PickerError> {
        let count = metainfo.piece_count();
        if have.len() != count {
            return Err(PickerError::BitfieldLength { expected: count, actual: have.len() });
        }
        let reader_window = config.reader_window;
        Ok(PiecePicker {
            config,
            piece_length: metainfo.piece_length(),
            size: metainfo.size(),
            have,
            availability: vec![0; count as usize],
            peers: HashMap::new(),
            in_flight: BTreeMap::new(),
            reader_positions: Vec::new(),
            reader_window,
            rng,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &PickerConfig {
        &self.config
    }

    /// Number of pieces in the blob.
    pub fn piece_count(&self) -> u32 {
        self.have.len()
    }

    /// The pieces we have.
    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    /// Whether we have every piece.
    pub fn is_complete(&self) -> bool {
        self.have.is_complete()
    }

    /// How many connected peers have piece `index` (0 when out of range).
    pub fn availability(&self, index: u32) -> u32 {
        self.availability.get(index as usize).copied().unwrap_or(0)
    }

    /// The bitfield a connected peer has announced so far.
    pub fn peer_bitfield(&self, peer: &PeerId) -> Option<&Bitfield> {
        self.peers.get(peer)
    }

    /// Whether `peer` has any piece we lack (i.e. whether the connection is worth keeping).
    pub fn is_interesting(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|bf| bf.iter_set().any(|i| !self.have.get(i)))
    }

    /// A peer connected (or re-sent its bitfield): count its pieces. Replaces a previous bitfield.
    pub fn add_peer(&mut self, peer: PeerId, bitfield: Bitfield) -> Result<(), PickerError> {
        if bitfield.len() != self.piece_count() {
            return Err(PickerError::BitfieldLength { expected: self.piece_count(), actual: bitfield.len() });
        }
        if let Some(old) = self.peers.remove(&peer) {
            self.uncount(&old);
        }
        for i in bitfield.iter_set() {
            self.availability[i as usize] += 1;
        }
        self.peers.insert(peer, bitfield);
        Ok(())
    }

    /// A peer disconnected: forget its pieces and requests. Returns the pieces whose requests to
    /// it were dropped (now free to request elsewhere).
    pub fn remove_peer(&mut self, peer: &PeerId) -> Vec<u32> {
        if let Some(old) = self.peers.remove(peer) {
            self.uncount(&old);
        }
        self.withdraw(peer)
    }

    fn uncount(&mut self, bitfield: &Bitfield) {
        for i in bitfield.iter_set() {
            let slot = &mut self.availability[i as usize];
            *slot = slot.saturating_sub(1);
        }
    }

    /// A peer announced a new piece (`Have`).
    pub fn peer_has(&mut self, peer: &PeerId, index: u32) -> Result<(), PickerError> {
        let count = self.piece_count();
        let bf = self.peers.get_mut(peer).ok_or(PickerError::UnknownPeer(*peer))?;
        if bf.set(index).map_err(|_| PickerError::OutOfRange { index, count })? {
            self.availability[index as usize] += 1;
        }
        Ok(())
    }

    /// The pieces active readers are at; each gets a priority window starting there. Earlier
    /// positions in the list go first. Out-of-range positions are ignored.
    pub fn set_reader_positions(&mut self, positions: Vec<u32>) {
        self.reader_positions = positions;
    }

    /// Widen each reader's window to `pieces` (never below the configured `reader_window`):
    /// the swarm sets it from the node's measured rate (`flow::reader_window`).
    pub fn set_reader_window(&mut self, pieces: u32) {
        self.reader_window = pieces.max(self.config.reader_window);
    }

    /// The reader window in force.
    pub fn reader_window(&self) -> u32 {
        self.reader_window
    }

    /// Outstanding requests to `peer`.
    pub fn in_flight_for(&self, peer: &PeerId) -> usize {
        self.in_flight.values().flatten().filter(|r| r.peer == *peer).count()
    }

    /// Outstanding requests to every peer together.
    pub fn in_flight_total(&self) -> usize {
        self.in_flight.values().map(Vec::len).sum()
    }

    /// Outstanding requests for piece `index`.
    pub fn in_flight(&self, index: u32) -> usize {
        self.in_flight.get(&index).map_or(0, Vec::len)
    }

    /// When the oldest outstanding request to `peer` was sent, if any.
    pub fn oldest_request_to(&self, peer: &PeerId) -> Option<Instant> {
        self.in_flight.values().flatten().filter(|r| r.peer == *peer).map(|r| r.sent_at).min()
    }

    /// The pieces requested from `peer` and not yet received, oldest request first.
    pub fn requests_to(&self, peer: &PeerId) -> Vec<u32> {
        self.request_times_to(peer).into_iter().map(|(_, i)| i).collect()
    }

    /// [`Self::requests_to`] with the time each request was sent.
    pub fn request_times_to(&self, peer: &PeerId) -> Vec<(Instant, u32)> {
        let mut reqs: Vec<(Instant, u32)> = self
            .in_flight
            .iter()
            .flat_map(|(&i, reqs)| reqs.iter().filter(|r| r.peer == *peer).map(move |r| (r.sent_at, i)))
            .collect();
        reqs.sort_unstable();
        reqs
    }

    /// Bytes requested from `peer` and not yet received.
    pub fn in_flight_bytes_for(&self, peer: &PeerId) -> u64 {
        self.in_flight
            .iter()
            .map(|(&i, reqs)| reqs.iter().filter(|r| r.peer == *peer).count() as u64 * self.piece_len(i))
            .sum()
    }

    /// Bytes requested from every peer together and not yet received.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight.iter().map(|(&i, reqs)| reqs.len() as u64 * self.piece_len(i)).sum()
    }

    /// Whether every missing piece that some connected peer has is already requested, which
    /// allows duplicate requests.
    pub fn is_endgame(&self) -> bool {
        let mut any_missing = false;
        for i in self.have.iter_missing() {
            if self.availability[i as usize] > 0 {
                if !self.in_flight.contains_key(&i) {
                    return false;
                }
                any_missing = true;
            }
        }
        any_missing
    }

    /// Choose pieces to request from `peer` now, keeping at most `max_in_flight_for_peer`
    /// requests outstanding to it, and record them as in flight with the time they were sent.
    /// Returns nothing for an unknown peer.
    pub fn pick(&mut self, peer: &PeerId, now: Instant, max_in_flight_for_peer: usize) -> Vec<u32> {
        self.pick_where(peer, now, max_in_flight_for_peer, |_, _| true)
    }

    /// [`pick`](Self::pick), restricted to pieces for which `allowed(index, availability)` holds,
    /// e.g. to ask an origin only for pieces no other peer can supply.
    pub fn pick_where(
        &mut self,
        peer: &PeerId,
        now: Instant,
        max_in_flight_for_peer: usize,
        allowed: impl Fn(u32, u32) -> bool,
    ) -> Vec<u32> {
        let budget = max_in_flight_for_peer.saturating_sub(self.in_flight_for(peer));
        let Some(bf) = self.peers.get(peer) else {
            return Vec::new();
        };
        if budget == 0 {
            return Vec::new();
        }
        let endgame = self.is_endgame();
        let max_requests = if endgame { self.config.endgame_max_requests.max(1) } else { 1 };
        let eligible = |i: u32| {
            bf.get(i)
                && !self.have.get(i)
                && allowed(i, self.availability[i as usize])
                && self
                    .in_flight
                    .get(&i)
                    .is_none_or(|reqs| reqs.len() < max_requests && reqs.iter().all(|r| r.peer != *peer))
        };

        let mut picked: Vec<u32> = Vec::with_capacity(budget);
        'readers: for &pos in &self.reader_positions {
            let end = pos.saturating_add(self.reader_window).min(self.piece_count());
            for i in pos..end {
                if picked.len() == budget {
                    break 'readers;
                }
                if eligible(i) && !picked.contains(&i) {
                    picked.push(i);
                }
            }
        }

        if picked.len() < budget {
            let mut rest: Vec<u32> = bf.iter_set().filter(|&i| eligible(i) && !picked.contains(&i)).collect();
            rest.shuffle(&mut self.rng);
            // Rarest first, the random order kept among equals. In endgame, pieces with fewer
            // outstanding requests go first.
            let key = |i: u32| (self.in_flight(i), self.availability[i as usize]);
            let want = budget - picked.len();
            if want <= FEW_PICKS {
                // The first of the smallest key, `want` times: what a stable sort would put
                // first, without sorting a thousand pieces to take one or two (the sort was
                // the largest cost of a 1,000-host simulation).
                for _ in 0..want.min(rest.len()) {
                    let Some((at, _)) = rest.iter().enumerate().min_by_key(|&(pos, &i)| (key(i), pos)) else {
                        break;
                    };
                    picked.push(rest.remove(at));
                }
            } else {
                rest.sort_by_key(|&i| key(i));
                rest.truncate(want);
                picked.extend(rest);
            }
        }

        for &i in &picked {
            self.in_flight.entry(i).or_default().push(Request { peer: *peer, sent_at: now });
        }
        picked
    }

    fn piece_len(&self, index: u32) -> u64 {
        let offset = u64::from(index) * self.piece_length;
        self.piece_length.min(self.size.saturating_sub(offset))
    }

    /// A verified piece arrived from `peer` and is stored: mark it as ours and drop its
    /// requests. Returns the other peers it was also requested from, to send them `Cancel`.
    pub fn received(&mut self, peer: &PeerId, index: u32) -> Vec<PeerId> {
        let mut cancel = self.mark_have(index);
        cancel.retain(|p| p != peer);
        cancel
    }

    /// We got piece `index` some other way (e.g. straight from an origin). Returns every peer it
    /// was requested from, to send them `Cancel`.
    pub fn mark_have(&mut self, index: u32) -> Vec<PeerId> {
        if self.have.set(index).is_err() {
            return Vec::new();
        }
        self.in_flight.remove(&index).unwrap_or_default().into_iter().map(|r| r.peer).collect()
    }

    /// The request for `index` to `peer` failed (bad piece, error, peer refused): free it.
    pub fn failed(&mut self, peer: &PeerId, index: u32) {
        if let Some(reqs) = self.in_flight.get_mut(&index) {
            reqs.retain(|r| r.peer != *peer);
            if reqs.is_empty() {
                self.in_flight.remove(&index);
            }
        }
    }

    /// Withdraw every outstanding request to `peer` (it stalled): the pieces are free to
    /// request again. Returns them in piece order, to send the peer `Cancel`s.
    pub fn withdraw(&mut self, peer: &PeerId) -> Vec<u32> {
        let mut out = Vec::new();
        self.in_flight.retain(|&index, reqs| {
            let before = reqs.len();
            reqs.retain(|r| r.peer != *peer);
            if reqs.len() != before {
                out.push(index);
            }
            !reqs.is_empty()
        });
        out
    }
}

#[cfg(test)]
mod tests {
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
        let mut p = PiecePicker::with_rng(
            &meta(3),
            bits(3, &[0, 2]),
            PickerConfig::default(),
            StdRng::seed_from_u64(1),
        )
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
}
