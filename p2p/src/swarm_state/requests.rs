//! Which pieces a download asks of whom now: the node's in-flight budget, each peer's
//! pipelining depth, the origin's narrow share (paced by how fast this host passes its pieces
//! on), endgame duplicates only where they help, the node's cap on senders, and the HTTP
//! fallback's top-up.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;

use super::{Action, SwarmState, ORIGIN_PEER};
use crate::flow;
use crate::peer::PeerId;
use crate::server::HAVE_BATCH;

/// A download asks an origin for another piece only while it holds fewer than this many
/// (or more at a fast node: [`unshared_origin_limit`])
/// pieces from an origin that none of its peers has announced yet: the origin then sends no
/// faster than the hosts pass its pieces on. Every piece an origin sends one host of an
/// N-host fleet must leave that host's uplink about N - 1 times (directly or through the
/// hosts it reaches first), so a fleet can take at most its uplinks' sum ÷ (N - 1) from the
/// origin; an origin that serves whoever asks sent a 5-host fleet 72 Mbit/s where its 50 Mbit/s
/// uplinks could pass on 62, and the host that asked most (67 of 256 pieces, against 41 for
/// another) had 22 s of upload in a 21.5 s pull: for its last 6 s it fed four hosts at a
/// quarter of its uplink each while theirs idled. Real fleet runs (128 MiB, 50 Mbit/s hosts,
/// docs/benchmarks.md, session 22), slowest host ÷ the link time: 5 hosts 1.02-1.06 (median
/// 1.03, 10 runs) against 1.04-1.41 without; 2 pieces gave 1.09-1.19 (the origin then idles
/// while hosts wait), 6 and 8 gave 1.03-1.04 and 1.04-1.09.
pub const UNSHARED_ORIGIN_PIECES: usize = 4;
/// How long after a peer takes a piece from us that piece counts as shared: our server may
/// gather the pieces we gain for up to [`HAVE_BATCH`] before telling the peer, and the peer's
/// server as long before telling us it has it.
pub const SHARING_LOOP: Duration = HAVE_BATCH.saturating_mul(2);

/// How many unshared origin pieces a download may hold: [`UNSHARED_ORIGIN_PIECES`], or what
/// the node receives in one [`SHARING_LOOP`] if that is more. A fixed count is a window over
/// that loop, and at a fast node the loop, not the peers' uplinks, set the origin's pace: two
/// agents at 25 MiB/s each (1 MiB pieces, `swarm.sh` part 3) took 1.39-1.59 × the ideal time
/// with 4, 0.98 without a limit (session 24). A 50 Mbit/s host with 512 KiB pieces gets 6,
/// which gave 1.03-1.04 at 5 hosts in session 22 (4: 1.02-1.06).
pub fn unshared_origin_limit(node_rate: Option<f64>, piece_length: u64) -> usize {
    let per_loop = node_rate
        .filter(|r| r.is_finite() && *r > 0.0)
        .map(|r| (r * SHARING_LOOP.as_secs_f64() / piece_length.max(1) as f64).ceil())
        .unwrap_or(0.0);
    // `as` saturates for absurd rates; the floor is the constant.
    (per_loop as usize).max(UNSHARED_ORIGIN_PIECES)
}

/// A piece from an origin counts against [`UNSHARED_ORIGIN_PIECES`] for at most this long:
/// peers that never ask for it (they download elsewhere, or are not connected to us) must not
/// keep the download from the origin for good.
pub const UNSHARED_MEMORY: Duration = Duration::from_secs(5);

/// What one `fill` knows about the requests already out.
struct Outlook {
    /// Pieces requested from some peer (grows as this fill requests more).
    requested: HashSet<u32>,
    /// Requested pieces whose every request is late (`flow::is_late`).
    late: HashSet<u32>,
    /// For the others, the least time left until one of their requests is expected done.
    left: HashMap<u32, Duration>,
    /// Holders no agent is: connected origins, and the HTTP fallback once it came in; and
    /// whether any other peer is connected.
    origins: u32,
    others_connected: bool,
}

impl<R: rand::Rng + Clone> SwarmState<R> {
    /// How many more peers may start sending to this download under the node's cap on
    /// senders ([`crate::node::NodeView::sender_room`]).
    pub fn set_sender_room(&mut self, room: usize) {
        self.sender_room = room;
    }

    /// Peers with requests of this download out: the senders the node's cap counts.
    pub fn senders(&self) -> usize {
        self.peers.keys().filter(|id| self.picker.in_flight_for(id) > 0).count()
    }

    /// The requests to send now. `node_rate` is the node's measured ingress (bytes/s) and
    /// `elsewhere` the bytes the node's other downloads have in flight: the budget is the
    /// node's, shared by all of them.
    pub fn fill(&mut self, now: Instant, node_rate: Option<f64>, elsewhere: u64) -> Vec<Action> {
        self.node_rate = node_rate;
        let budget = flow::in_flight_budget(node_rate, self.cfg.ingress_limit).saturating_sub(elsewhere);
        self.picker.set_reader_window(flow::reader_window(node_rate, self.piece_length));
        let cap = flow::in_flight_pieces(budget, self.piece_length);
        let mut room =
            cap.saturating_sub(self.picker.in_flight_total() - self.picker.in_flight_for(&ORIGIN_PEER));
        let mut outlook = self.outlook(now);
        let order = self.peer_order(outlook.others_connected);
        let mut actions = Vec::new();

        // Peers with nothing in flight start sending only within the node's cap on senders
        // (`crate::incast`; no cap until its link shows incast).
        let mut starts = self.sender_room;
        // Without a configured limit, every idle peer first gets one request whatever the
        // budget: the budget keeps requests from queueing behind our own link, but when each
        // peer's upload is shared by many downloaders the link fills only with many peers
        // sending at once. Without this a host that measured a low rate got a 2-piece budget,
        // so only 2 peers sent to it, so it measured a low rate: 3-7 Mbit/s of a 25 Mbit/s
        // link for 30 s while the rest of a 20-host fleet ran at full speed.
        if self.cfg.ingress_limit.is_none() {
            for &(id, _) in &order {
                if starts == 0 {
                    break;
                }
                if self.picker.in_flight_for(&id) == 0 {
                    let picked = self.request_from(id, 1, now, &mut outlook, &mut actions);
                    room = room.saturating_sub(picked);
                    starts -= usize::from(picked > 0);
                }
            }
        }
        // Then the pipelining depths, within the budget.
        for &(id, depth) in &order {
            if room == 0 {
                break;
            }
            let idle = self.picker.in_flight_for(&id) == 0;
            if idle && starts == 0 {
                continue;
            }
            let limit = depth.min(self.picker.in_flight_for(&id).saturating_add(room));
            let picked = self.request_from(id, limit, now, &mut outlook, &mut actions);
            room = room.saturating_sub(picked);
            starts -= usize::from(idle && picked > 0);
        }

        actions.extend(self.fallback_fetches(now, outlook.origins, outlook.others_connected));
        actions
    }

    /// Connected peers with their pipelining depths, those furthest below their depth first
    /// (ties at random): a fast peer whose queue drained is refilled before a slow one that
    /// still has work.
    fn peer_order(&mut self, others_connected: bool) -> Vec<(PeerId, usize)> {
        let mut order: Vec<(PeerId, usize)> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.retiring)
            .map(|(id, p)| {
                let depth = if p.origin && others_connected {
                    self.cfg.origin_pipeline
                } else {
                    flow::pipeline_depth(p.flow.rate(), self.piece_length, self.cfg.max_pipeline)
                };
                (*id, depth)
            })
            .collect();
        order.sort_unstable_by_key(|(id, _)| id.0);
        order.shuffle(&mut self.rng);
        // Fill level in percent; integer keys keep the sort total.
        order.sort_by_key(|(id, depth)| self.picker.in_flight_for(id) * 100 / (*depth).max(1));
        order
    }

    /// Ask `id` for pieces until it has `limit` requests in flight; returns how many. An
    /// origin among other peers gets only pieces none of them has and it did not just
    /// decline, the next ones the readers will reach first, and nothing while this download
    /// holds [`UNSHARED_ORIGIN_PIECES`] from an origin that no peer has yet; anyone gets a
    /// piece already requested only if that request is late, or this peer would deliver it
    /// much sooner (`flow::worth_duplicating`).
    fn request_from(
        &mut self,
        id: PeerId,
        limit: usize,
        now: Instant,
        outlook: &mut Outlook,
        actions: &mut Vec<Action>,
    ) -> usize {
        let Some(peer) = self.peers.get(&id) else { return 0 };
        let (rate, origin_only) = (peer.flow.rate(), peer.origin && outlook.others_connected);
        let piece_length = self.piece_length;
        let (origins, o) = (outlook.origins, &*outlook);
        let fresh_or_late = |index: u32| {
            !o.requested.contains(&index)
                || o.late.contains(&index)
                || o.left.get(&index).is_some_and(|&l| flow::worth_duplicating(l, piece_length, rate))
        };
        if origin_only
            && self.unshared_origin_pieces(now, origins)
                >= unshared_origin_limit(self.node_rate, piece_length)
        {
            return 0;
        }
        let picked = if origin_only {
            self.picker.pick_in_order_where(&id, now, limit, |index, availability| {
                availability <= origins && !self.declined.contains_key(&index) && fresh_or_late(index)
            })
        } else {
            self.picker.pick_where(&id, now, limit, |index, _| {
                !self.declined_by.contains_key(&(id, index)) && fresh_or_late(index)
            })
        };
        for index in &picked {
            if outlook.late.contains(index) {
                self.duplicate_requests.late += 1;
            } else if outlook.requested.contains(index) {
                self.duplicate_requests.faster += 1;
            }
        }
        outlook.requested.extend(picked.iter().copied());
        actions.extend(picked.iter().map(|&index| Action::Request { peer: id, index }));
        picked.len()
    }

    /// Pieces an origin sent this download within [`UNSHARED_MEMORY`] that no connected peer
    /// other than an origin has announced yet (forgetting older ones).
    fn unshared_origin_pieces(&mut self, now: Instant, origins: u32) -> usize {
        while self
            .from_origin
            .front()
            .is_some_and(|&(at, _)| now.saturating_duration_since(at) >= UNSHARED_MEMORY)
        {
            self.from_origin.pop_front();
        }
        self.from_origin.iter().filter(|&&(_, index)| self.picker.availability(index) <= origins).count()
    }

    /// The requests already out, for endgame decisions (see [`Outlook`]).
    fn outlook(&self, now: Instant) -> Outlook {
        let mut requested = HashSet::new();
        let mut on_time = HashSet::new();
        let mut left: HashMap<u32, Duration> = HashMap::new();
        for (id, peer) in &self.peers {
            let rate = peer.flow.rate();
            for (ahead, (sent_at, index)) in self.picker.request_times_to(id).into_iter().enumerate() {
                requested.insert(index);
                // Its own wait began when the piece before it at this peer arrived: a request
                // that queued behind pieces since delivered is not late for having waited.
                let age = now.saturating_duration_since(sent_at.max(peer.last_piece));
                if flow::is_late(age, ahead, self.piece_length, rate) {
                    continue;
                }
                on_time.insert(index);
                // Unmeasured peers count as about to deliver: nothing is known against them.
                let t = flow::time_left(age, ahead, self.piece_length, rate).unwrap_or(Duration::ZERO);
                left.entry(index).and_modify(|l| *l = (*l).min(t)).or_insert(t);
            }
        }
        let late = requested.difference(&on_time).copied().collect();
        let connected_origins = self.peers.values().filter(|p| p.origin).count();
        let others_connected = self.peers.len() > connected_origins;
        // The fallback's pseudo-peer holds every piece: counted with the origins, so a piece
        // "only origins hold" is still one no agent has once the fallback came in.
        let origins = connected_origins as u32 + u32::from(self.fallback_active);
        Outlook { requested, late, left, origins, others_connected }
    }
}
