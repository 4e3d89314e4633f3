//! Stalls, the one reason a download gives up on a request: each connection's bytes are
//! sampled on the timer, and a connection silent for longer than its window (the peer's rate,
//! or the node's link shared among its peers, [`flow::PeerFlow::stall_after`]) loses its
//! requests; stalls in a row get it banned. A shorter silence while other connections
//! deliver is a sign of incast ([`crate::incast`]), counted for the node's cap on senders.
//!
//! Only the bytes of requested pieces are progress. Any bytes keep a connection from
//! stalling (a request waiting for a send slot hears a keep-alive every second), but an
//! agent's keep-alives and `have`s alone are only a sign of life: counted as progress, a peer
//! that held our requests and sent nothing else kept the HTTP fallback out and the download
//! from failing until its requests starved a minute later. An origin's keep-alives still
//! count: its line of waiting requests is honest and long (about 17 s at a thousand hosts),
//! and the fallback coming in during it would fetch the blob over HTTP once per host.

use std::time::Instant;

use super::{Action, SwarmState};
use crate::peer::PeerId;
use crate::{flow, incast};

/// What one connection has read so far (cumulative): all its bytes, and those that were bytes
/// of pieces this side requested (counted as they arrive, before a piece is whole).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnBytes {
    pub all: u64,
    pub pieces: u64,
}

impl<R: rand::Rng + Clone> SwarmState<R> {
    /// The signs of incast seen since the last call (the silent peers' addresses), for the
    /// node's cap on senders.
    pub fn take_incast_signs(&mut self) -> Vec<std::net::SocketAddr> {
        std::mem::take(&mut self.incast_signs)
    }

    /// Samples each connection's cumulative bytes (`received`), counts bytes of requested
    /// pieces as progress, and withdraws the requests of connections that stalled or
    /// delivered no piece for [`flow::MAX_PIECE_WAIT`], banning repeat offenders.
    pub(super) fn withdraw_stalled(&mut self, now: Instant, received: &[(PeerId, ConnBytes)]) -> Vec<Action> {
        let mut actions = Vec::new();
        let stall_after = self
            .cfg
            .peer_stall
            .saturating_add(flow::limiter_delay(self.cfg.ingress_limit, self.piece_length));
        // Every connection's bytes first, so a silence below is judged against what all the
        // others delivered up to now.
        for &(id, bytes) in received {
            let busy = self.picker.in_flight_for(&id) > 0;
            let Some(peer) = self.peers.get_mut(&id) else { continue };
            let pieces_grew = bytes.pieces > peer.piece_bytes;
            peer.piece_bytes = peer.piece_bytes.max(bytes.pieces);
            if peer.flow.sample(now, bytes.all, busy) {
                peer.silence_reported = false;
                if busy && (pieces_grew || peer.origin) {
                    // Bytes of requested pieces arriving are progress, whether or not a piece
                    // is complete yet: on a slow link several pieces arrive at once, each for
                    // seconds.
                    self.last_progress = now;
                } else if busy {
                    self.last_sign_of_life = now;
                }
            }
        }
        let share = self.link_share();
        for &(id, _) in received {
            let Some(oldest) = self.picker.oldest_request_to(&id) else { continue };
            let Some(peer) = self.peers.get_mut(&id) else { continue };
            let quiet_since = peer.flow.quiet_since(oldest);
            // Silent while others delivered, after it had its share of the link: a sign of
            // incast, once per silence.
            let had_share = peer
                .flow
                .rate_at_last_byte()
                .zip(share)
                .is_some_and(|(rate, share)| rate >= share * incast::FAIR_SHARE);
            if !peer.silence_reported
                && had_share
                && now.saturating_duration_since(quiet_since) >= incast::INCAST_SILENCE
                && self.last_progress > quiet_since
            {
                peer.silence_reported = true;
                self.incast_signs.push(peer.addr);
            }
            let window = peer.flow.stall_after(stall_after, self.piece_length, share);
            let stalled = peer.flow.is_stalled(now, oldest, window);
            let starved = now.saturating_duration_since(oldest.max(peer.last_piece)) >= flow::MAX_PIECE_WAIT;
            if !stalled && !starved {
                continue;
            }
            let addr = peer.addr;
            for index in self.picker.withdraw(&id) {
                actions.push(Action::TimedOut { peer: id, index });
            }
            if self.blacklist.timeout(addr, now) {
                self.closed(&id);
                actions.push(Action::Disconnect(id));
            }
        }
        actions
    }

    /// The rate each connection can expect when the node's own link is the limit: its
    /// measured ingress shared evenly among the connected peers (`None` until measured). All
    /// of them, not only those with requests out at this instant: when several peers finish
    /// their pieces at once, the one still silent would otherwise be judged at the whole
    /// link's rate for a moment.
    fn link_share(&self) -> Option<f64> {
        self.node_rate.map(|rate| rate / self.peers.len().max(1) as f64)
    }
}
