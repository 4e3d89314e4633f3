//! Which peers a download connects to: candidates from the tracker up to the per-blob and
//! node limits, and trading the least useful peer for a seeder once every connection is used.

use std::net::SocketAddr;
use std::time::Instant;

use rand::seq::IndexedRandom;

use super::{Action, Candidate, SwarmState, ROTATE_AFTER, ROTATE_SLOW_SHARE};
use crate::peer::PeerId;

/// Closed connections whose addresses a download keeps: a piece is verified on the blocking
/// pool, and a peer that sent a bad one and closed at once is gone from `peers` when the
/// verdict arrives; it is banned by the address kept here.
const DEPARTED_KEPT: usize = 64;

impl<R: rand::Rng + Clone> SwarmState<R> {
    /// A connection closed.
    pub fn closed(&mut self, peer: &PeerId) {
        if let Some(p) = self.peers.remove(peer) {
            if self.departed.len() == DEPARTED_KEPT {
                self.departed.pop_front();
            }
            self.departed.push_back((*peer, p.addr));
        }
        self.picker.remove_peer(peer);
    }

    /// The address of a connected peer, or of one whose connection closed lately.
    pub(super) fn address_of(&self, peer: &PeerId) -> Option<SocketAddr> {
        let departed = || self.departed.iter().rev().find(|(id, _)| id == peer).map(|(_, addr)| *addr);
        self.peers.get(peer).map(|p| p.addr).or_else(departed)
    }

    /// Whether `c` is someone we could connect to now: not ourselves, not banned, not
    /// connected or being connected to already.
    fn is_new_candidate(&self, c: &Candidate, now: Instant) -> bool {
        let known = c.id.is_some_and(|id| id == self.me || self.peers.contains_key(&id));
        c.addr != self.advertise
            && !known
            && !self.blacklist.is_banned(&c.addr, now)
            && !self.connecting.contains(&c.addr)
            && !self.peers.values().any(|p| p.addr == c.addr)
    }

    fn start_connecting(&mut self, addr: SocketAddr) -> Action {
        self.connecting.insert(addr);
        self.node_room -= 1;
        Action::Connect(addr)
    }

    /// Connect to candidates until the limit, best first (the tracker orders them).
    pub(super) fn connect_more(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut i = 0;
        while i < self.candidates.len()
            && self.peers.len() + self.connecting.len() < self.cfg.max_connections
            && self.node_room > 0
        {
            let c = &self.candidates[i];
            i += 1;
            if self.is_new_candidate(c, now) {
                let addr = c.addr;
                actions.push(self.start_connecting(addr));
            }
        }
        actions
    }

    /// Disconnect the retiring peers (see [`rotate`](Self::rotate)) that have nothing in
    /// flight any more.
    pub(super) fn release_retired(&mut self) -> Vec<Action> {
        let idle: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(id, p)| p.retiring && self.picker.in_flight_for(id) == 0)
            .map(|(id, _)| *id)
            .collect();
        idle.into_iter()
            .map(|id| {
                self.closed(&id);
                Action::Disconnect(id)
            })
            .collect()
    }

    /// With every connection in use, trade the least useful peer for a candidate we are not
    /// connected to: a peer that has nothing we lack, or one whose measured rate is below
    /// [`ROTATE_SLOW_SHARE`] of the mean over our measured peers (its upload is shared by more
    /// downloaders than the others'). The replacement is a seeder if the tracker named one,
    /// else any candidate, chosen at random. Without rotation a download stays with the ten
    /// peers it met first; in a 20-host swarm the hosts whose first peers were slow took
    /// twice as long as the rest. Trading the slowest peer for the first seeder in the list
    /// whatever its rate, as this did before, sent every host of a 300-host simulated fleet
    /// to the first host that finished, while the others' uplinks idled. One trade per tick,
    /// and only for peers connected [`ROTATE_AFTER`] or longer, so their rates are measured.
    ///
    /// A victim with pieces on their way is not cut off: it retires (the piece on the wire
    /// arrives, its queue is cancelled, it is disconnected after that piece) while the
    /// replacement connects beside it; retiring peers do not count against the limit. Cutting it
    /// off threw away the bytes already on the wire and asked for them again elsewhere: in a
    /// 20-host fleet on 50 Mbit/s links the hosts received 12 % more than the blob, none of it
    /// counted as a duplicate piece.
    pub(super) fn rotate(&mut self, now: Instant) -> Vec<Action> {
        let active = self.peers.values().filter(|p| !p.retiring).count();
        if active < self.cfg.max_connections || !self.connecting.is_empty() || self.node_room == 0 {
            return Vec::new();
        }
        let measured: Vec<f64> =
            self.peers.values().filter(|p| !p.origin).filter_map(|p| p.flow.rate()).collect();
        let mean = measured.iter().sum::<f64>() / measured.len().max(1) as f64;
        // Least useful first: nothing we lack, then the lowest rate shown.
        let victim = self
            .peers
            .iter()
            .filter(|(_, p)| {
                !p.origin && !p.retiring && now.saturating_duration_since(p.connected_at) >= ROTATE_AFTER
            })
            .filter_map(|(id, p)| {
                let useless = !self.picker.is_interesting(id);
                let slow = p.flow.rate().is_some_and(|r| r < mean * ROTATE_SLOW_SHARE);
                (useless || slow).then(|| (*id, (!useless, p.flow.rate().unwrap_or(0.0))))
            })
            // Ties go to the lowest id, not to the hash map's order: a seeded run is replayable.
            .min_by(|(ia, a), (ib, b)| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(ia.0.cmp(&ib.0)))
            .map(|(id, _)| id);
        let Some(victim) = victim else { return Vec::new() };
        let fresh: Vec<&Candidate> =
            self.candidates.iter().filter(|c| !c.origin && self.is_new_candidate(c, now)).collect();
        let seeders: Vec<SocketAddr> = fresh.iter().filter(|c| c.complete).map(|c| c.addr).collect();
        let pool = if seeders.is_empty() { fresh.iter().map(|c| c.addr).collect() } else { seeders };
        let Some(&next) = pool.choose(&mut self.rng) else { return Vec::new() };
        if self.picker.in_flight_for(&victim) > 0 {
            self.rotations.retiring += 1;
            if let Some(p) = self.peers.get_mut(&victim) {
                p.retiring = true;
            }
            // It sends one piece at a time: the oldest request is on the wire, the rest
            // wait in its queue and go back to the pool, to be asked of faster peers.
            let mut actions = Vec::new();
            for (_, index) in self.picker.request_times_to(&victim).into_iter().skip(1) {
                self.picker.failed(&victim, index);
                actions.push(Action::Cancel { peer: victim, index });
            }
            actions.push(self.start_connecting(next));
            return actions;
        }
        self.rotations.immediate += 1;
        self.closed(&victim);
        vec![Action::Disconnect(victim), self.start_connecting(next)]
    }
}
