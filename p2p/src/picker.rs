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
    /// Order among requests sent at one instant: a peer serves them as they were sent, and
    /// one `fill` sends many at once (rarest first, not in index order).
    seq: u64,
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
    /// The next request's [`Request::seq`].
    next_seq: u64,
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
            next_seq: 0,
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

    /// Whether piece `index` is requested from `peer` and not yet received.
    pub fn is_requested_from(&self, peer: &PeerId, index: u32) -> bool {
        self.in_flight.get(&index).is_some_and(|reqs| reqs.iter().any(|r| r.peer == *peer))
    }

    /// When the oldest outstanding request to `peer` was sent, if any.
    pub fn oldest_request_to(&self, peer: &PeerId) -> Option<Instant> {
        self.in_flight.values().flatten().filter(|r| r.peer == *peer).map(|r| r.sent_at).min()
    }

    /// The pieces requested from `peer` and not yet received, oldest request first.
    pub fn requests_to(&self, peer: &PeerId) -> Vec<u32> {
        self.request_times_to(peer).into_iter().map(|(_, i)| i).collect()
    }

    /// [`Self::requests_to`] with the time each request was sent, in the order they were sent.
    pub fn request_times_to(&self, peer: &PeerId) -> Vec<(Instant, u32)> {
        let mut reqs: Vec<(Instant, u64, u32)> = self
            .in_flight
            .iter()
            .flat_map(|(&i, reqs)| {
                reqs.iter().filter(|r| r.peer == *peer).map(move |r| (r.sent_at, r.seq, i))
            })
            .collect();
        reqs.sort_unstable();
        reqs.into_iter().map(|(at, _, i)| (at, i)).collect()
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
        self.pick_ordered(peer, now, max_in_flight_for_peer, allowed, false)
    }

    /// [`pick_where`](Self::pick_where), but past the readers' windows in index order rather
    /// than rarest first: what a download asks an origin for (pieces no peer has), so the
    /// host it lands on is asked for it soon. Picked rarest first, an origin's pieces went to
    /// hosts far ahead of every reader: in a traced 5-host run one host got 8 such pieces
    /// 4-6 s in, and no host asked for them until its reader got there, 15 s later, when all
    /// four asked at once.
    pub fn pick_in_order_where(
        &mut self,
        peer: &PeerId,
        now: Instant,
        max_in_flight_for_peer: usize,
        allowed: impl Fn(u32, u32) -> bool,
    ) -> Vec<u32> {
        self.pick_ordered(peer, now, max_in_flight_for_peer, allowed, true)
    }

    fn pick_ordered(
        &mut self,
        peer: &PeerId,
        now: Instant,
        max_in_flight_for_peer: usize,
        allowed: impl Fn(u32, u32) -> bool,
        in_order: bool,
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

        if picked.len() < budget && in_order {
            let want = budget - picked.len();
            let next: Vec<u32> =
                bf.iter_set().filter(|&i| eligible(i) && !picked.contains(&i)).take(want).collect();
            picked.extend(next);
        } else if picked.len() < budget {
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
            let seq = self.next_seq;
            self.next_seq += 1;
            self.in_flight.entry(i).or_default().push(Request { peer: *peer, sent_at: now, seq });
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
mod tests;
