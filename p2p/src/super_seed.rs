//! Super-seeding, the origins' rule for sending each piece about once: which pieces a
//! seeding server sent recently and to whom, which pieces its connected peers hold, and when
//! a peer that was sent elsewhere is served after all. Pure and clock-free (the time is an
//! argument), so the peer server runs it on the wall clock and `shoal-sim` on simulated time.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shoal_registry::Digest;

use crate::bitfield::Bitfield;
use crate::peer::PeerId;

/// Which pieces a super-seeding server sent recently and to whom, and which pieces its
/// connected peers already hold (from their handshakes and `have` messages).
///
/// A peer's claim to hold a piece counts only if this server has sent that piece to someone
/// before: every piece of a blob enters the swarm from a seeder, so a claim to a piece never
/// sent out is a lie (or left from before a restart). Without that rule one peer claiming
/// every piece made the origin decline every piece to everyone, and the whole fleet fell
/// back to fetching the blob over HTTP. With several origins seeding one blob, each knows
/// only its own sends, so the blob may leave the origins up to once per origin.
///
/// No I/O and no clock of its own: the time is passed in, so the server gives it the wall
/// clock and `shoal-sim` runs the same rule on simulated time.
pub struct SuperSeed {
    window: Duration,
    reask_after: Duration,
    linger: Duration,
    /// Each piece's last claim: when its window started, to whom, and whether it was sent in
    /// full since (the window restarts at the first full send only).
    sent: std::sync::Mutex<std::collections::HashMap<(Digest, u32), LastClaim>>,
    holders: std::sync::Mutex<std::collections::HashMap<Digest, Holders>>,
    /// When each peer was first told to fetch a piece elsewhere.
    declined: std::sync::Mutex<std::collections::HashMap<(Digest, u32, PeerId), std::time::Instant>>,
    /// Peers that disconnected, whose pieces still count for [`HOLDER_LINGER`] unless the same
    /// peer connects for the blob again first.
    departed: std::sync::Mutex<DepartedPeers>,
    /// The pieces of each blob this server has sent at least once.
    sent_once: std::sync::Mutex<std::collections::HashMap<Digest, Bitfield>>,
    /// Sizes past which `sent` and `declined` are pruned next (see [`PRUNE_FLOOR`]).
    prune_sent_at: std::sync::atomic::AtomicUsize,
    prune_declined_at: std::sync::atomic::AtomicUsize,
}

/// A piece's last claim: when its window started, to whom, and whether it was sent in full
/// since.
type LastClaim = (Instant, PeerId, bool);

/// Blobs whose sent pieces are remembered; past this, blobs no peer is connected for are
/// forgotten first.
const MAX_REMEMBERED_BLOBS: usize = 10_000;

/// An agent closes its connection to the origin when its download completes, but it keeps
/// seeding the blob (and the tracker hands it out first), so its pieces still count as held
/// for this long after it left.
pub const HOLDER_LINGER: Duration = Duration::from_secs(60);
/// Departed peers remembered at most (oldest forgotten first).
const MAX_DEPARTED: usize = 10_000;

/// A peer that asks again for a piece it was told to fetch elsewhere at least this long ago
/// gets it: none of its own peers had it in the meantime (agents back off 2 s after a
/// decline and ask an origin only for pieces no connected peer has), so the origin spends its
/// bandwidth on the agents that are actually starved. Shorter re-ask times buy tail latency
/// with origin egress: with 16 agents at 10 MiB/s, 1.5 s gave p99 1.07 × ideal but 2.4 × the
/// blob from the origin; 6 s gave 1.15 and 1.59; 10 s gave 1.28 and 1.47 (docs/benchmarks.md).
pub const REASK_AFTER: Duration = Duration::from_secs(10);
/// How long after its first decline a peer that asks again for a piece `holders` connected
/// agents hold is served: `reask_after` for each holder and one more. The more agents hold a
/// piece, the sooner the requester's own peers get it, and in a big fleet one fixed wait let
/// every host come back for its share: with 100 and 300 simulated hosts (`shoal-sim`,
/// 128 MiB) a fixed 10 s cost 1.18 and 1.84 × the blob from the origin, one wait per holder
/// 1.00 and 1.00, at the same completion times. With one wait per holder, 2,000 and 10,000
/// hosts still came back after 10 s for pieces one connected agent held (the origin sees only
/// its 1,024 connections, and at that size the first copies take longer than 10 s to spread):
/// 1.22 and 2.13 × the blob; the extra wait gives 1.00 at 2,000, the same times up to 300.
/// From two holders on the wait reaches `DECLINE_MEMORY`, which restarts the count: such a
/// piece is left to the swarm, and an agent that really gets nothing brings in its HTTP
/// fallback (`swarm_state::FALLBACK_PATIENCE`).
fn reask_wait(reask_after: Duration, holders: u32) -> Duration {
    reask_after.saturating_mul(holders + 1)
}

/// Decline records older than this are forgotten.
const DECLINE_MEMORY: Duration = Duration::from_secs(30);
/// The `sent` and `declined` maps are pruned of expired entries once they hold more than
/// this many, or twice what the last pruning left, whichever is more. Expired entries
/// decide nothing (they count as absent), so pruning only bounds memory; pruning at a fixed
/// 100,000 scanned the whole map on every request once a big fleet kept more than that
/// alive (`shoal-sim` at 1,000 hosts: 85 % of the time in `retain`).
const PRUNE_FLOOR: usize = 100_000;

/// A peer that disconnected from one blob, with the pieces it counted as holding.
struct Departed {
    at: Instant,
    digest: Digest,
    peer: PeerId,
    have: Bitfield,
}

/// Departed peers, oldest first, and how many records each (blob, peer) has among them, so a
/// peer that connects again is looked for in the queue only when it is there.
#[derive(Default)]
struct DepartedPeers {
    queue: VecDeque<Departed>,
    index: std::collections::HashMap<(Digest, PeerId), u32>,
}

impl DepartedPeers {
    fn push(&mut self, d: Departed) {
        *self.index.entry((d.digest.clone(), d.peer)).or_insert(0) += 1;
        self.queue.push_back(d);
    }

    fn pop_front(&mut self) -> Option<Departed> {
        let d = self.queue.pop_front()?;
        let key = (d.digest.clone(), d.peer);
        if let Some(n) = self.index.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.index.remove(&key);
            }
        }
        Some(d)
    }

    /// Take out the records past `linger` at `now`, and the oldest past [`MAX_DEPARTED`].
    fn expire(&mut self, now: Instant, linger: Duration) -> Vec<Departed> {
        let mut expired = Vec::new();
        while self
            .queue
            .front()
            .is_some_and(|d| now.duration_since(d.at) >= linger || self.queue.len() > MAX_DEPARTED)
        {
            expired.extend(self.pop_front());
        }
        expired
    }

    /// Take out every record of `peer` for `digest`.
    fn take(&mut self, digest: &Digest, peer: PeerId) -> Vec<Bitfield> {
        if self.index.remove(&(digest.clone(), peer)).is_none() {
            return Vec::new();
        }
        let mut taken = Vec::new();
        self.queue.retain(|d| {
            let same = d.peer == peer && &d.digest == digest;
            if same {
                taken.push(d.have.clone());
            }
            !same
        });
        taken
    }
}

/// How many connected peers hold each piece of one blob.
struct Holders {
    connections: usize,
    counts: Vec<u32>,
}

impl SuperSeed {
    /// Super-seeding with a `window` after each piece sent and the default re-ask and
    /// linger times ([`REASK_AFTER`], [`HOLDER_LINGER`]).
    pub fn new(window: Duration) -> SuperSeed {
        SuperSeed::with_timing(window, REASK_AFTER, HOLDER_LINGER)
    }

    /// Super-seeding with every time set (tests use short ones).
    pub fn with_timing(window: Duration, reask_after: Duration, linger: Duration) -> SuperSeed {
        SuperSeed {
            window,
            reask_after,
            linger,
            sent: Default::default(),
            holders: Default::default(),
            declined: Default::default(),
            departed: Default::default(),
            sent_once: Default::default(),
            prune_sent_at: PRUNE_FLOOR.into(),
            prune_declined_at: PRUNE_FLOOR.into(),
        }
    }

    fn holders(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Digest, Holders>> {
        self.holders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether piece `index` of `digest` has been sent out by this server.
    fn was_sent(&self, digest: &Digest, index: u32) -> bool {
        let sent = self.sent_once.lock().unwrap_or_else(|p| p.into_inner());
        sent.get(digest).is_some_and(|b| b.get(index))
    }

    fn record_sent(&self, digest: &Digest, index: u32, piece_count: u32) {
        let mut sent = self.sent_once.lock().unwrap_or_else(|p| p.into_inner());
        if !sent.contains_key(digest) && sent.len() >= MAX_REMEMBERED_BLOBS {
            let holders = self.holders();
            sent.retain(|d, _| holders.contains_key(d));
            if sent.len() >= MAX_REMEMBERED_BLOBS {
                return;
            }
        }
        let bits = sent.entry(digest.clone()).or_insert_with(|| Bitfield::new(piece_count));
        let _ = bits.set(index);
    }

    /// Peer `peer` connected claiming `have`; returns the pieces that count as held by it (see
    /// [`SuperSeed`]), which [`SuperSeed::leave`] gets back.
    ///
    /// What this peer held when it last left the blob stops counting: its handshake says what
    /// it holds now. An agent that lost a blob (evicted, or removed as corrupt) and pulled it
    /// again within [`HOLDER_LINGER`] was otherwise counted as holding it, declined by the
    /// origin, and waited a re-ask (20 s) for pieces nobody had.
    pub fn join(&self, digest: &Digest, have: &Bitfield, peer: PeerId) -> Bitfield {
        self.forget_departed(digest, peer);
        let mut counted = Bitfield::new(have.len());
        for i in have.iter_set().filter(|&i| self.was_sent(digest, i)) {
            let _ = counted.set(i);
        }
        let mut all = self.holders();
        let h = all
            .entry(digest.clone())
            .or_insert_with(|| Holders { connections: 0, counts: vec![0; have.len() as usize] });
        h.connections += 1;
        for i in counted.iter_set() {
            if let Some(c) = h.counts.get_mut(i as usize) {
                *c += 1;
            }
        }
        counted
    }

    /// A connected peer announced a new piece; whether it counts (the caller then adds it to
    /// what that peer's [`SuperSeed::leave`] gives back).
    pub fn gained(&self, digest: &Digest, index: u32) -> bool {
        if !self.was_sent(digest, index) {
            return false;
        }
        let mut all = self.holders();
        let Some(c) = all.get_mut(digest).and_then(|h| h.counts.get_mut(index as usize)) else {
            return false;
        };
        *c += 1;
        true
    }

    /// Peer `peer`, whose counted pieces are `have`, disconnected: they stop counting after
    /// [`HOLDER_LINGER`], or when the same peer connects for the blob again. `now` is the
    /// current time.
    pub fn leave(&self, digest: &Digest, have: &Bitfield, peer: PeerId, now: Instant) {
        let mut departed = self.departed.lock().unwrap_or_else(|p| p.into_inner());
        departed.push(Departed { at: now, digest: digest.clone(), peer, have: have.clone() });
        drop(departed);
        self.expire_departed(now);
    }

    /// Age out departed peers whose linger time is over.
    fn expire_departed(&self, now: Instant) {
        let expired = self.departed.lock().unwrap_or_else(|p| p.into_inner()).expire(now, self.linger);
        for d in expired {
            self.forget(&d.digest, &d.have);
        }
    }

    /// Stop counting what `peer` held when it last left `digest` (it is back, and says anew).
    fn forget_departed(&self, digest: &Digest, peer: PeerId) {
        let gone = self.departed.lock().unwrap_or_else(|p| p.into_inner()).take(digest, peer);
        for have in gone {
            self.forget(digest, &have);
        }
    }

    /// Stop counting a departed peer's pieces.
    fn forget(&self, digest: &Digest, have: &Bitfield) {
        let mut all = self.holders();
        let Some(h) = all.get_mut(digest) else { return };
        h.connections = h.connections.saturating_sub(1);
        for i in have.iter_set() {
            if let Some(c) = h.counts.get_mut(i as usize) {
                *c = c.saturating_sub(1);
            }
        }
        if h.connections == 0 {
            all.remove(digest);
        }
    }

    /// Whether `peer` may have piece `index` now; if so, it is recorded as sent to `peer`.
    /// Declined: a piece another connected peer holds (take it from that peer) unless this
    /// peer was already sent away for it [`REASK_AFTER`] ago, or one sent to another peer
    /// within the window (it is on its way there).
    pub fn claim(&self, digest: &Digest, index: u32, peer: PeerId, now: Instant) -> bool {
        self.expire_departed(now);
        let holders =
            self.holders().get(digest).and_then(|h| h.counts.get(index as usize)).copied().unwrap_or(0);
        if holders > 0 {
            let wait = reask_wait(self.reask_after, holders);
            let mut declined = self.declined.lock().unwrap_or_else(|p| p.into_inner());
            if declined.len() > self.prune_declined_at.load(Ordering::Relaxed) {
                declined.retain(|_, at| now.duration_since(*at) < DECLINE_MEMORY);
                self.prune_declined_at.store((declined.len() * 2).max(PRUNE_FLOOR), Ordering::Relaxed);
            }
            let first = *declined.entry((digest.clone(), index, peer)).or_insert(now);
            let elapsed = now.duration_since(first);
            if elapsed < wait || elapsed >= DECLINE_MEMORY {
                if elapsed >= DECLINE_MEMORY {
                    declined.insert((digest.clone(), index, peer), now);
                }
                return false;
            }
            declined.remove(&(digest.clone(), index, peer));
        }
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        if sent.len() > self.prune_sent_at.load(Ordering::Relaxed) {
            sent.retain(|_, (at, _, _)| now.duration_since(*at) < self.window);
            self.prune_sent_at.store((sent.len() * 2).max(PRUNE_FLOOR), Ordering::Relaxed);
        }
        match sent.get(&(digest.clone(), index)) {
            Some((at, to, _)) if *to != peer && now.duration_since(*at) < self.window => false,
            // The same peer again within its window: served, but the window does not start
            // again. Restarted by each of its requests, a peer asking every 3 s for a piece it
            // never passed on kept it from everyone else for good.
            Some((at, to, _)) if *to == peer && now.duration_since(*at) < self.window => true,
            _ => {
                sent.insert((digest.clone(), index), (now, peer, false));
                true
            }
        }
    }
}

impl SuperSeed {
    /// The piece claimed for `peer` has been handed to its connection in full: the window in
    /// which others are sent elsewhere starts again now. Measured from the claim alone, it
    /// ran out while a slow transfer was still under way (1 MiB at a 25 Mbit/s host's share of
    /// its link takes longer than the 3 s window), nobody held the piece yet, and the origin
    /// sent it again: 1.15-1.30 x the blob from the origin at 25 Mbit/s against 1.02-1.11 at 50.
    ///
    /// Only from now on do claims to hold the piece count (see [`SuperSeed`]): counted from the
    /// claim, a peer that asked for every piece and read none, then claimed them all over two
    /// connections, had every piece declined to everyone (two holders wait out the decline
    /// memory) and sent the whole fleet to the HTTP fallback.
    pub fn sent_in_full(&self, digest: &Digest, index: u32, peer: PeerId, piece_count: u32, now: Instant) {
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = sent.get_mut(&(digest.clone(), index)) else { return };
        if entry.1 != peer {
            return;
        }
        // Its first full send only: sent to the same peer again, it does not hold the piece
        // back from the others for another window.
        if !entry.2 {
            (entry.0, entry.2) = (now, true);
        }
        drop(sent);
        self.record_sent(digest, index, piece_count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest() -> Digest {
        Digest::of(shoal_registry::Algorithm::Sha256, b"blob")
    }

    fn bits(len: u32, set: &[u32]) -> Bitfield {
        let mut b = Bitfield::new(len);
        for &i in set {
            b.set(i).unwrap();
        }
        b
    }

    const N: u32 = 4;

    /// Send `pieces` out (to a throwaway peer), as a seeder does before anyone can hold them.
    fn send_out(s: &SuperSeed, d: &Digest, pieces: &[u32]) {
        let first = PeerId::random();
        for &i in pieces {
            assert!(s.claim(d, i, first, Instant::now()), "piece {i} is free to send");
            s.sent_in_full(d, i, first, N, Instant::now());
        }
    }

    #[test]
    fn a_piece_a_connected_peer_holds_is_declined_until_that_peer_leaves() {
        let s = SuperSeed::new(Duration::from_millis(1));
        let (d, a, b) = (digest(), PeerId::random(), PeerId::random());
        send_out(&s, &d, &[1, 2]);
        std::thread::sleep(Duration::from_millis(5));
        let holder_id = PeerId::random();
        let holder = s.join(&d, &bits(N, &[1]), holder_id);
        let mut other = s.join(&d, &bits(N, &[]), PeerId::random());
        assert!(!s.claim(&d, 1, a, Instant::now()), "peer holding piece 1 is connected");
        assert!(!s.claim(&d, 1, a, Instant::now()), "asking again at once changes nothing");
        assert!(s.claim(&d, 0, a, Instant::now()), "nobody holds piece 0");
        assert!(s.gained(&d, 2));
        other.set(2).unwrap();
        assert!(!s.claim(&d, 2, b, Instant::now()), "announced with have");
        s.leave(&d, &holder, holder_id, Instant::now());
        assert!(!s.claim(&d, 1, b, Instant::now()), "a peer that just left still seeds what it has");
        s.forget(&d, &holder);
        assert!(s.claim(&d, 1, b, Instant::now()), "the only holder of piece 1 is gone");
        assert!(!s.gained(&d, 9), "out of range: ignored, no panic");
        assert!(!s.claim(&d, 2, a, Instant::now()), "the other peer still holds piece 2");
    }

    #[test]
    fn the_window_starts_again_when_the_piece_has_been_sent_in_full() {
        let s = SuperSeed::with_timing(Duration::from_millis(50), REASK_AFTER, HOLDER_LINGER);
        let (d, a, b) = (digest(), PeerId::random(), PeerId::random());
        assert!(s.claim(&d, 0, a, Instant::now()));
        // The transfer to `a` takes longer than the window.
        std::thread::sleep(Duration::from_millis(60));
        s.sent_in_full(&d, 0, a, N, Instant::now());
        assert!(!s.claim(&d, 0, b, Instant::now()), "declined: `a` only just got it");
        std::thread::sleep(Duration::from_millis(60));
        assert!(s.claim(&d, 0, b, Instant::now()), "served once the window after the send has passed");
        s.sent_in_full(&d, 0, a, N, Instant::now());
        assert!(s.claim(&d, 0, b, Instant::now()), "a stale completion by another peer changes nothing");
    }

    /// A peer that asks for the same piece again and again (and reads it, or not) does not
    /// keep it from the others past one window after its first full send. Before, each of
    /// its requests started the window again.
    #[test]
    fn asking_again_does_not_hold_a_piece_back_from_the_others() {
        let s = SuperSeed::with_timing(Duration::from_millis(100), REASK_AFTER, HOLDER_LINGER);
        let (d, a, b) = (digest(), PeerId::random(), PeerId::random());
        assert!(s.claim(&d, 0, a, Instant::now()));
        s.sent_in_full(&d, 0, a, N, Instant::now());
        // Asked again and sent again within the window, which does not start again.
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(20));
            assert!(s.claim(&d, 0, a, Instant::now()), "the same peer is served again");
            s.sent_in_full(&d, 0, a, N, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(s.claim(&d, 0, b, Instant::now()), "one window after the first full send, others are served");
        // Asked again before any full send: the window runs from the first claim.
        assert!(s.claim(&d, 1, a, Instant::now()));
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(20));
            assert!(s.claim(&d, 1, a, Instant::now()));
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(s.claim(&d, 1, b, Instant::now()), "requests alone do not hold it back either");
    }

    #[test]
    fn claims_to_pieces_never_sent_out_do_not_count() {
        let s = SuperSeed::new(Duration::from_millis(1));
        let (d, a) = (digest(), PeerId::random());
        // A liar claims the whole blob before anything was sent.
        let counted = s.join(&d, &bits(N, &[0, 1, 2, 3]), PeerId::random());
        assert_eq!(counted.count(), 0);
        assert!(!s.gained(&d, 3), "a have for a piece never sent out is ignored too");
        for i in 0..N {
            assert!(s.claim(&d, i, a, Instant::now()), "piece {i} is served: nobody can hold it yet");
        }
        std::thread::sleep(Duration::from_millis(5));
        // Asked for, but not sent in full yet (or never read): claims to it do not count. A
        // peer that asked for every piece, read none and then claimed them all over two
        // connections once had every piece declined to everyone.
        let (liar, accomplice) = (PeerId::random(), PeerId::random());
        assert_eq!(s.join(&d, &bits(N, &[0, 1, 2, 3]), liar).count(), 0);
        assert_eq!(s.join(&d, &bits(N, &[0, 1, 2, 3]), accomplice).count(), 0);
        for i in 0..N {
            assert!(s.claim(&d, i, a, Instant::now()), "piece {i} is still served");
        }
        // Once a piece is out, a holder's claim to it counts.
        s.sent_in_full(&d, 2, a, N, Instant::now());
        s.sent_in_full(&d, 1, PeerId::random(), N, Instant::now());
        std::thread::sleep(Duration::from_millis(5));
        let honest = s.join(&d, &bits(N, &[1, 2]), PeerId::random());
        assert_eq!(honest.iter_set().collect::<Vec<_>>(), [2], "piece 1 went to someone else");
        assert!(!s.claim(&d, 2, PeerId::random(), Instant::now()));
    }

    #[test]
    fn the_window_lets_the_recipient_ask_again_but_not_others() {
        let s = SuperSeed::new(Duration::from_millis(50));
        let (d, a, b) = (digest(), PeerId::random(), PeerId::random());
        assert!(s.claim(&d, 3, a, Instant::now()));
        assert!(s.claim(&d, 3, a, Instant::now()), "the same peer may ask again (a retry)");
        assert!(!s.claim(&d, 3, b, Instant::now()));
        std::thread::sleep(Duration::from_millis(80));
        assert!(s.claim(&d, 3, b, Instant::now()), "after the window nobody is known to hold it");
    }

    #[test]
    fn a_peer_that_asks_again_after_a_decline_is_served() {
        let reask = Duration::from_millis(100);
        let s = SuperSeed::with_timing(Duration::from_millis(1), reask, HOLDER_LINGER);
        let (d, a) = (digest(), PeerId::random());
        send_out(&s, &d, &[2]);
        s.join(&d, &bits(N, &[2]), PeerId::random());
        let t = Instant::now();
        assert!(!s.claim(&d, 2, a, t));
        let later = t + reask + Duration::from_millis(50);
        assert!(!s.claim(&d, 2, a, later), "one holder: two waits, not one");
        let later = later + reask;
        assert!(s.claim(&d, 2, a, later), "none of its peers had it for a while: it is starved");
        assert!(!s.claim(&d, 2, PeerId::random(), later), "a first ask from another peer is still declined");
    }

    #[test]
    fn a_re_ask_waits_longer_the_more_agents_hold_the_piece() {
        let reask = Duration::from_secs(1);
        let s = SuperSeed::with_timing(Duration::from_millis(1), reask, HOLDER_LINGER);
        let (d, a) = (digest(), PeerId::random());
        send_out(&s, &d, &[2]);
        std::thread::sleep(Duration::from_millis(5));
        s.join(&d, &bits(N, &[2]), PeerId::random());
        s.join(&d, &bits(N, &[2]), PeerId::random());
        let t = Instant::now();
        assert!(!s.claim(&d, 2, a, t));
        // Two agents hold it: a requester whose own peers lack it will find it soon, and in
        // a big fleet every host would otherwise come back for its share after one wait.
        assert!(!s.claim(&d, 2, a, t + 2 * reask + Duration::from_millis(500)), "two waits are not enough");
        assert!(
            s.claim(&d, 2, a, t + 3 * reask + Duration::from_millis(1)),
            "a wait per holder, and one more"
        );
    }

    #[test]
    fn a_departed_peer_counts_as_a_holder_for_the_linger_time() {
        let linger = Duration::from_millis(100);
        let s = SuperSeed::with_timing(Duration::from_millis(1), REASK_AFTER, linger);
        let (d, a) = (digest(), PeerId::random());
        send_out(&s, &d, &[0, 1]);
        std::thread::sleep(Duration::from_millis(5));
        let holder_id = PeerId::random();
        let holder = s.join(&d, &bits(N, &[0, 1]), holder_id);
        s.leave(&d, &holder, holder_id, Instant::now());
        assert!(!s.claim(&d, 0, a, Instant::now()), "it just finished and still seeds");
        std::thread::sleep(linger + Duration::from_millis(50));
        assert!(s.claim(&d, 1, a, Instant::now()), "long gone: the origin serves it");
    }

    #[test]
    fn a_departed_peer_that_connects_again_counts_for_what_it_holds_now() {
        let s = SuperSeed::new(Duration::from_millis(1));
        let (d, a, b) = (digest(), PeerId::random(), PeerId::random());
        send_out(&s, &d, &[0, 1, 2]);
        std::thread::sleep(Duration::from_millis(5));
        let held = s.join(&d, &bits(N, &[0, 1, 2]), a);
        s.leave(&d, &held, a, Instant::now());
        let other = s.join(&d, &bits(N, &[2]), b);
        s.leave(&d, &other, b, Instant::now());
        assert!(!s.claim(&d, 0, b, Instant::now()), "`a` left just now and still seeds piece 0");
        // `a` lost the blob and asks for it again: its own old copy is no reason to send it away.
        let again = s.join(&d, &bits(N, &[]), a);
        assert_eq!(again.count(), 0);
        assert!(s.claim(&d, 0, a, Instant::now()), "nobody but `a` itself ever held piece 0");
        assert!(!s.claim(&d, 2, a, Instant::now()), "`b`, gone just now, still seeds piece 2");
        s.leave(&d, &again, a, Instant::now());
        // Coming back twice (and a third time) is counted once.
        let mut twice = s.join(&d, &bits(N, &[1]), a);
        s.leave(&d, &twice, a, Instant::now());
        twice = s.join(&d, &bits(N, &[1]), a);
        assert_eq!(
            s.holders().get(&d).map(|h| (h.connections, h.counts[1])),
            Some((2, 1)),
            "`a` now, `b` departed"
        );
        s.leave(&d, &twice, a, Instant::now());
    }
}
