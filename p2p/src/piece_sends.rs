//! How many peers an agent sends one piece to at once.
//!
//! A fleet that pulls one blob together spreads each piece from its first holders, and the
//! time a hand-off takes is the fleet's ramp. An agent that had just received a piece sent it
//! to every peer that asked (up to its dozen) side by side, each at a twelfth of its uplink,
//! so none of them could pass it on for two seconds. Sent to four at a time, the first four
//! have it in half a second and pass it on while the rest wait their turn (hearing
//! keep-alives, as at an origin's send slots). Once the fleet holds many pieces, peers ask
//! for different ones and the limit does not bind, so the uplink stays full. In `shoal-sim`
//! (128 MiB, 50 Mbit/s hosts, seed 1), p50 / p99 × the link time with 4 against none: 1,000
//! hosts 1.24 / 1.28 against 1.31 / 1.36, 3,000 hosts 1.27 / 1.32 against 1.36 / 1.43; two
//! gave the same, a limit on all of an agent's sends at once (four or eight pieces, whatever
//! they are) left links idle and was not kept (docs/benchmarks.md).
//!
//! The rule is pure and keyed by anything (the server uses (digest, piece), the simulator its
//! own blob numbers), so the peer server and `shoal-sim` run the same counts.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_registry::Digest;
use tokio::sync::watch;

/// Peers one piece is sent to at once by default (the agent's `max_sends_per_piece`).
pub const DEFAULT_SENDS_PER_PIECE: usize = 4;

/// A send counts against its piece's limit for at most this long, then goes on outside it. A
/// piece at a quarter of a 50 Mbit/s uplink takes 0.7 s, so the fleet's first hand-offs are
/// limited; a send to a slow peer is not for long, or four stragglers could hold a piece for
/// seconds while fast hosts wait for it (`shoal-sim --scenario stragglers`, 20 hosts, seeds
/// 1-4: the fast hosts' slowest at 1.18-1.38 × their link time with no bound, 1.15-1.29 with
/// 1 s, 1.12-1.15 with 0.5 s and 0.75 s, 1.13-1.17 without a limit; 1,000 hosts without
/// stragglers p50 / p99 1.24 / 1.28 with 0.75 s and no bound, 1.26 / 1.30 with 0.5 s).
pub const SEND_HOLD: Duration = Duration::from_millis(750);

/// Sends in progress per piece, under a limit.
#[derive(Debug)]
pub struct SendCounts<K> {
    limit: usize,
    sends: HashMap<K, usize>,
}

impl<K: Eq + Hash> SendCounts<K> {
    /// At most `limit` sends of one piece at once (at least one).
    pub fn new(limit: usize) -> SendCounts<K> {
        SendCounts { limit: limit.max(1), sends: HashMap::new() }
    }

    /// Whether a send of `key` could start now.
    pub fn is_free(&self, key: &K) -> bool {
        self.sends.get(key).is_none_or(|&n| n < self.limit)
    }

    /// Start a send of `key` if the limit allows; every `true` is matched by one
    /// [`end`](Self::end).
    pub fn start(&mut self, key: K) -> bool {
        let n = self.sends.entry(key).or_insert(0);
        if *n >= self.limit {
            return false;
        }
        *n += 1;
        true
    }

    /// A send of `key` ended (sent, declined or cut off).
    pub fn end(&mut self, key: &K) {
        if let Some(n) = self.sends.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.sends.remove(key);
            }
        }
    }

    /// Pieces being sent now (each to at least one peer).
    pub fn pieces_in_flight(&self) -> usize {
        self.sends.len()
    }
}

/// A node's [`SendCounts`] per blob, shared by its peer server's connections: a connection
/// takes a [`PieceSend`] for the piece it is about to send and holds it until the piece is
/// sent; one whose requests all wait watches [`freed`](Self::freed) to look again.
pub struct PieceSendGate {
    limit: usize,
    counts: Mutex<HashMap<Digest, SendCounts<u32>>>,
    freed: watch::Sender<u64>,
}

impl PieceSendGate {
    /// At most `limit` sends of one piece at once.
    pub fn new(limit: usize) -> Arc<PieceSendGate> {
        Arc::new(PieceSendGate { limit, counts: Mutex::new(HashMap::new()), freed: watch::Sender::new(0) })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, SendCounts<u32>>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The position in `queue` of the first piece of `digest` that may be sent now, and its
    /// send (held until the piece is sent).
    pub fn take_first(self: &Arc<Self>, digest: &Digest, queue: &[u32]) -> Option<(usize, PieceSend)> {
        let mut all = self.counts();
        if let Some(counts) = all.get(digest) {
            if !queue.iter().any(|i| counts.is_free(i)) {
                return None;
            }
        }
        let counts = all.entry(digest.clone()).or_insert_with(|| SendCounts::new(self.limit));
        let pos = queue.iter().position(|&i| counts.start(i))?;
        Some((pos, PieceSend { gate: self.clone(), digest: digest.clone(), index: queue[pos] }))
    }

    /// Whether any piece of `digest` in `queue` may be sent now.
    pub fn any_free(&self, digest: &Digest, queue: &[u32]) -> bool {
        self.counts().get(digest).is_none_or(|c| queue.iter().any(|i| c.is_free(i)))
    }

    /// Changes whenever a send ends.
    pub fn freed(&self) -> watch::Receiver<u64> {
        self.freed.subscribe()
    }
}

/// One send of a piece in progress; dropping it ends the send and wakes the waiting.
pub struct PieceSend {
    gate: Arc<PieceSendGate>,
    digest: Digest,
    index: u32,
}

impl Drop for PieceSend {
    fn drop(&mut self) {
        {
            let mut all = self.gate.counts();
            if let Some(counts) = all.get_mut(&self.digest) {
                counts.end(&self.index);
                if counts.pieces_in_flight() == 0 {
                    all.remove(&self.digest);
                }
            }
        }
        self.gate.freed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_goes_to_at_most_its_limit_of_peers_at_once_and_others_are_not_held_up() {
        let mut c = SendCounts::new(2);
        assert!(c.start(7) && c.start(7));
        assert!(!c.is_free(&7) && !c.start(7), "a third send of one piece at once");
        assert!(c.is_free(&8) && c.start(8), "another piece waits for nothing");
        c.end(&7);
        assert!(c.is_free(&7) && c.start(7));
        c.end(&7);
        c.end(&7);
        c.end(&8);
        assert_eq!(c.pieces_in_flight(), 0, "ended sends leave nothing behind");
        c.end(&9);
        assert!(c.is_free(&9));
    }
}
