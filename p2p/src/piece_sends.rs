//! How many peers an agent sends one piece to at once.
//!
//! A fleet that pulls one blob together spreads each piece from its first holders, and the
//! time a hand-off takes is the fleet's ramp. An agent that had just received a piece sent it
//! to every peer that asked (up to its dozen) side by side, each at a twelfth of its uplink,
//! so none of them could pass it on for two seconds. Sent to a few at a time, the first ones
//! have it soon and pass it on while the rest wait their turn (hearing keep-alives, as at an
//! origin's send slots). Once the fleet holds many pieces, peers ask for different ones and
//! the limit does not bind, so the uplink stays full. In `shoal-sim` (128 MiB, 50 Mbit/s
//! hosts, seed 1), p50 / p99 × the link time with 4 against none: 1,000 hosts 1.24 / 1.28
//! against 1.31 / 1.36, 3,000 hosts 1.27 / 1.32 against 1.36 / 1.43; 2 gave the same there
//! (1.23 / 1.30 at 1,000, 1.27 / 1.34 at 10,000), and with 512 KiB pieces 1.17 / 1.22 and
//! 1.19 / 1.26 against 1.18 / 1.22 and 1.21 / 1.28 with 4 (session 19). A limit on all of an
//! agent's sends at once (four or eight pieces, whatever they are) left links idle and was
//! not kept.
//!
//! Two, not four: the same happens at a download's end. The origin hands its last pieces to
//! whoever asks first, and every other host then wants them from that one uplink. Sent to
//! all four of a 5-host fleet's other hosts at a quarter of the uplink each, no copy could be
//! passed on until all were done (a traced real run: the last 8 pieces took 3 s). Real fleets
//! on 50 Mbit/s links, alternated with 4 (docs/benchmarks.md, session 18): 5 hosts 1.04 ×
//! the link time in four runs of four against 1.04-1.08, 10 hosts 1.05 against 1.06-1.07,
//! 20 hosts 1.08-1.10 against 1.08-1.09, stragglers' fast hosts 1.08 against 1.09.
//!
//! The count is the server's per-key cap ([`KeyedSlots`], as for addresses and blobs), keyed
//! by (digest, piece); `shoal-sim` holds the same slots keyed by its own blob numbers.

use std::sync::Arc;
use std::time::Duration;

use shoal_registry::Digest;
use tokio::sync::watch;

use crate::inbound::{KeyedSlot, KeyedSlots};

/// Peers one piece is sent to at once by default (the agent's `max_sends_per_piece`).
pub const DEFAULT_SENDS_PER_PIECE: usize = 2;

/// A send counts against its piece's limit for at most this long, then goes on outside it (chosen
/// with a limit of 4). A piece at a quarter of a 50 Mbit/s uplink takes 0.7 s, so the fleet's first
/// hand-offs are limited; a send to a slow peer is not for long, or four stragglers could hold a
/// piece for seconds while fast hosts wait for it (`shoal-sim --scenario stragglers`, 20 hosts,
/// seeds 1-4: the fast hosts' slowest at 1.18-1.38 × their link time with no bound, 1.15-1.29 with
/// 1 s, 1.12-1.15 with 0.5 s and 0.75 s, 1.13-1.17 without a limit; 1,000 hosts without stragglers
/// p50 / p99 1.24 / 1.28 with 0.75 s and no bound, 1.26 / 1.30 with 0.5 s).
pub const SEND_HOLD: Duration = Duration::from_millis(750);

/// Sends in progress per (digest, piece), shared by a peer server's connections: a
/// connection takes a [`PieceSend`] for the piece it is about to send and holds it until the
/// piece is sent; one whose requests all wait watches [`freed`](Self::freed) to look again.
pub struct PieceSendGate {
    slots: Arc<KeyedSlots<(Digest, u32)>>,
    freed: watch::Sender<u64>,
}

impl PieceSendGate {
    /// At most `limit` sends of one piece at once.
    pub fn new(limit: usize) -> Arc<PieceSendGate> {
        Arc::new(PieceSendGate { slots: KeyedSlots::new(limit), freed: watch::Sender::new(0) })
    }

    /// The position in `queue` of the first piece of `digest` that may be sent now, and its
    /// send (held until the piece is sent).
    pub fn take_first(self: &Arc<Self>, digest: &Digest, queue: &[u32]) -> Option<(usize, PieceSend)> {
        queue.iter().enumerate().find_map(|(pos, &index)| {
            let slot = self.slots.take((digest.clone(), index))?;
            Some((pos, PieceSend { gate: self.clone(), slot: Some(slot) }))
        })
    }

    /// Whether any piece of `digest` in `queue` may be sent now.
    pub fn any_free(&self, digest: &Digest, queue: &[u32]) -> bool {
        queue.iter().any(|&index| self.slots.is_free(&(digest.clone(), index)))
    }

    /// Changes whenever a send ends.
    pub fn freed(&self) -> watch::Receiver<u64> {
        self.freed.subscribe()
    }
}

/// One send of a piece in progress; dropping it ends the send and wakes the waiting.
pub struct PieceSend {
    gate: Arc<PieceSendGate>,
    slot: Option<KeyedSlot<(Digest, u32)>>,
}

impl Drop for PieceSend {
    fn drop(&mut self) {
        // Free the slot before waking the waiting, or they would find it still taken.
        drop(self.slot.take());
        self.gate.freed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_goes_to_at_most_its_limit_of_peers_at_once_and_others_are_not_held_up() {
        let gate = PieceSendGate::new(2);
        let blob: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let (_, first) = gate.take_first(&blob, &[7]).unwrap();
        let (_, second) = gate.take_first(&blob, &[7]).unwrap();
        assert!(
            !gate.any_free(&blob, &[7]) && gate.take_first(&blob, &[7]).is_none(),
            "a third send of one piece at once"
        );
        assert!(gate.any_free(&blob, &[7, 8]), "another piece waits for nothing");
        let (pos, other) = gate.take_first(&blob, &[7, 8]).unwrap();
        assert_eq!(pos, 1, "the first queued piece with a free send is taken");
        let freed = gate.freed();
        drop(first);
        assert!(freed.has_changed().unwrap(), "an ended send wakes the waiting");
        assert!(gate.any_free(&blob, &[7]));
        let third = gate.take_first(&blob, &[7]).unwrap();
        drop((second, third, other));
        assert!(gate.any_free(&blob, &[7]) && gate.any_free(&blob, &[8]), "ended sends leave nothing behind");
    }
}
