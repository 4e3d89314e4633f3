//! The decisions of one blob's download, as a pure state machine: given events and a clock,
//! which pieces to request from whom, which requests to cancel, which peers to connect to or
//! drop, when to announce, and when to fetch from an origin over HTTP. `swarm` does the I/O
//! and feeds the results back; nothing here touches a socket, a file or the system clock, so
//! every policy is tested with hand-made events (as Kraken's scheduler keeps its state).
//!
//! The policies:
//! - **Closed-loop pipelining** (`flow`): each peer gets requests for the rate it has shown,
//!   and the download keeps [`flow::IN_FLIGHT_HORIZON`] of the node's measured ingress in
//!   flight; neither depends on a configured rate, which only caps them.
//! - **Stalls, not deadlines**: a peer's requests are withdrawn only when its connection
//!   delivered no byte for [`flow::STALL_AFTER`]; bytes that keep arriving are never timed
//!   out. Stalls in a row get a peer banned (`blacklist`).
//! - **Super-seeding origins** are asked only for pieces no other connected peer has, and not
//!   again soon after they declined one.
//! - **HTTP fallback** only for pieces no connected peer has (while the swarm delivers), or
//!   for anything after a real stall.
//! - **Endgame** duplicates are cancelled as soon as one copy is stored (`picker`).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::bitfield::Bitfield;
use crate::blacklist::{Blacklist, BlacklistConfig};
use crate::flow::{self, PeerFlow};
use crate::metainfo::Metainfo;
use crate::peer::PeerId;
use crate::picker::{PickerConfig, PickerError, PiecePicker};
use crate::tracker_client::PeerInfo;

/// The pseudo-peer id of the HTTP origin fallback inside the picker.
pub const ORIGIN_PEER: PeerId = PeerId([0xff; 20]);
/// How long a piece an origin declined is not asked of an origin again.
pub const DECLINE_BACKOFF: Duration = Duration::from_secs(2);
/// A peer is traded for a seeder (see `SwarmState::rotate`) only after this long connected.
pub const ROTATE_AFTER: Duration = Duration::from_secs(2);
/// Consecutive failed fallback fetches, with no peer connected, that fail the download.
pub const MAX_FALLBACK_FAILURES: u32 = 5;

/// Tunables of the decisions; [`SchedulerConfig::default`] documents each default.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Outbound connections per blob (default 10).
    pub max_connections: usize,
    /// Most requests in flight to one peer, however fast it is (default 16).
    pub max_pipeline: usize,
    /// Requests in flight to an origin while other peers are connected too (default 1):
    /// origins are the seeders of last resort, so the swarm should carry most of the load.
    pub origin_pipeline: usize,
    /// No bytes of requested pieces for this long (or no peers at all) brings in the HTTP
    /// fallback (default 3 s).
    pub fallback_after: Duration,
    /// Ranges fetched from the origin at once (default 4).
    pub fallback_parallel: usize,
    /// No progress from anywhere for this long fails the download (default 60 s).
    pub stall_timeout: Duration,
    /// A connection silent this long with requests outstanding is stalled (default
    /// [`flow::STALL_AFTER`]); the node's own ingress limit, if any, adds its delay.
    pub peer_stall: Duration,
    /// The node's configured ingress limit in bytes/s: an upper bound on what is in flight.
    pub ingress_limit: Option<u64>,
    pub picker: PickerConfig,
    pub blacklist: BlacklistConfig,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_connections: 10,
            max_pipeline: 16,
            origin_pipeline: 1,
            fallback_after: Duration::from_secs(3),
            fallback_parallel: 4,
            stall_timeout: Duration::from_secs(60),
            peer_stall: flow::STALL_AFTER,
            ingress_limit: None,
            picker: PickerConfig::default(),
            blacklist: BlacklistConfig::default(),
        }
    }
}

/// What the I/O side is to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Open a connection to this candidate.
    Connect(SocketAddr),
    /// Send a request for a piece.
    Request { peer: PeerId, index: u32 },
    /// Tell a peer we no longer want a piece (another copy arrived).
    Cancel { peer: PeerId, index: u32 },
    /// A request was withdrawn because the peer stalled: cancel it there (and count it).
    TimedOut { peer: PeerId, index: u32 },
    /// Close the connection to a peer.
    Disconnect(PeerId),
    /// Fetch a piece from an origin over HTTP.
    Fetch { index: u32 },
    /// Announce to the tracker after this delay.
    Announce { after: Duration },
}

/// How storing a received piece ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    Ok,
    /// The piece failed its hash.
    BadPiece,
}

/// Why the download cannot go on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Fatal {
    #[error("no progress for {0:?} from peers or origin ({1})")]
    Stalled(Duration, String),
    #[error("origin fallback failed: {0}")]
    Fallback(String),
}

struct Peer {
    addr: SocketAddr,
    origin: bool,
    flow: PeerFlow,
    connected_at: Instant,
}

/// One download's decisions; see the module docs.
pub struct SwarmState<R = StdRng> {
    cfg: SchedulerConfig,
    me: PeerId,
    advertise: SocketAddr,
    piece_length: u64,
    picker: PiecePicker<R>,
    blacklist: Blacklist,
    peers: HashMap<PeerId, Peer>,
    /// Pieces an origin declined recently; not asked of an origin again until the swarm had
    /// a chance to pass them on.
    declined: HashMap<u32, Instant>,
    /// Pieces a peer declined recently, not asked of it again yet.
    declined_by: HashMap<(PeerId, u32), Instant>,
    connecting: HashSet<SocketAddr>,
    candidates: Vec<PeerInfo>,
    fallback_active: bool,
    fallback_failures: u32,
    announced_once: bool,
    announces: u32,
    last_progress: Instant,
    /// Outbound connections the node's budget still allows (set by the I/O side).
    node_room: usize,
    rng: R,
}

impl SwarmState<StdRng> {
    /// The state of a download of `metainfo`'s blob that holds `have` so far, started at `now`.
    pub fn new(
        cfg: SchedulerConfig,
        me: PeerId,
        advertise: SocketAddr,
        metainfo: &Metainfo,
        have: Bitfield,
        now: Instant,
    ) -> Result<Self, PickerError> {
        SwarmState::with_rng(cfg, me, advertise, metainfo, have, now, StdRng::from_os_rng())
    }
}

impl<R: Rng + Clone> SwarmState<R> {
    /// Like [`SwarmState::new`] with a given RNG, so tests are deterministic.
    pub fn with_rng(
        cfg: SchedulerConfig,
        me: PeerId,
        advertise: SocketAddr,
        metainfo: &Metainfo,
        have: Bitfield,
        now: Instant,
        rng: R,
    ) -> Result<Self, PickerError> {
        let picker = PiecePicker::with_rng(metainfo, have, cfg.picker.clone(), rng.clone())?;
        let blacklist = Blacklist::new(cfg.blacklist.clone());
        Ok(SwarmState {
            piece_length: metainfo.piece_length(),
            cfg,
            me,
            advertise,
            picker,
            blacklist,
            peers: HashMap::new(),
            declined: HashMap::new(),
            declined_by: HashMap::new(),
            connecting: HashSet::new(),
            candidates: Vec::new(),
            fallback_active: false,
            fallback_failures: 0,
            announced_once: false,
            announces: 0,
            last_progress: now,
            node_room: usize::MAX,
            rng,
        })
    }

    /// The first actions: announce at once.
    pub fn start(&self) -> Vec<Action> {
        vec![Action::Announce { after: Duration::ZERO }]
    }

    /// Whether every piece is here.
    pub fn is_complete(&self) -> bool {
        self.picker.is_complete()
    }

    /// The picker, for inspection.
    pub fn picker(&self) -> &PiecePicker<R> {
        &self.picker
    }

    /// Connected peers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// The pieces local readers wait on, which go first.
    pub fn set_readers(&mut self, positions: Vec<u32>) {
        self.picker.set_reader_positions(positions);
    }

    /// A connection's handshake succeeded. Returns whether to keep it (not banned, not a
    /// duplicate, not ourselves, a bitfield of the right length).
    pub fn connected(&mut self, peer: PeerId, addr: SocketAddr, bitfield: Bitfield, now: Instant) -> bool {
        self.connecting.remove(&addr);
        if self.blacklist.is_banned(&peer, now) || self.peers.contains_key(&peer) || peer == self.me {
            return false;
        }
        if self.picker.add_peer(peer, bitfield).is_err() {
            return false;
        }
        let origin = self.candidates.iter().any(|c| c.addr == addr && c.origin);
        self.peers.insert(peer, Peer { addr, origin, flow: PeerFlow::new(now), connected_at: now });
        true
    }

    /// How many more outbound connections the node's shared budget allows right now.
    pub fn set_node_room(&mut self, room: usize) {
        self.node_room = room;
    }

    /// A connection attempt was not made after all (the node's budget ran out meanwhile):
    /// the candidate stays for later.
    pub fn connect_abandoned(&mut self, addr: SocketAddr) {
        self.connecting.remove(&addr);
    }

    /// A connection attempt failed: forget the candidate.
    pub fn connect_failed(&mut self, addr: SocketAddr) {
        self.connecting.remove(&addr);
        self.candidates.retain(|c| c.addr != addr);
    }

    /// A peer announced a new piece.
    pub fn have(&mut self, peer: &PeerId, index: u32) {
        let _ = self.picker.peer_has(peer, index);
    }

    /// A peer declined a request (a super-seeding origin sent the piece elsewhere).
    pub fn declined(&mut self, peer: PeerId, index: u32, now: Instant) {
        self.picker.failed(&peer, index);
        self.declined.insert(index, now);
        self.declined_by.insert((peer, index), now);
    }

    /// A connection closed.
    pub fn closed(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
        self.picker.remove_peer(peer);
    }

    /// A piece from `from` (or [`ORIGIN_PEER`]) was verified and stored, or failed its hash.
    pub fn stored(
        &mut self,
        from: PeerId,
        index: u32,
        outcome: Stored,
        now: Instant,
    ) -> Result<Vec<Action>, Fatal> {
        let mut actions = Vec::new();
        match outcome {
            Stored::Ok => {
                self.last_progress = now;
                for other in self.picker.received(&from, index) {
                    if self.peers.contains_key(&other) {
                        actions.push(Action::Cancel { peer: other, index });
                    }
                }
                if from == ORIGIN_PEER {
                    self.fallback_failures = 0;
                } else {
                    self.blacklist.delivered(&from);
                }
            }
            Stored::BadPiece => {
                self.picker.failed(&from, index);
                if from == ORIGIN_PEER {
                    return Err(Fatal::Fallback(format!("origin sent a bad piece {index}")));
                }
                self.blacklist.bad_piece(from, now);
                self.closed(&from);
                actions.push(Action::Disconnect(from));
            }
        }
        Ok(actions)
    }

    /// A fallback fetch failed. Fatal after [`MAX_FALLBACK_FAILURES`] in a row with no peer.
    pub fn fetch_failed(&mut self, index: u32, error: &str) -> Result<(), Fatal> {
        self.picker.failed(&ORIGIN_PEER, index);
        self.fallback_failures += 1;
        if self.fallback_failures >= MAX_FALLBACK_FAILURES && self.peers.is_empty() {
            return Err(Fatal::Fallback(error.to_string()));
        }
        Ok(())
    }

    /// The tracker answered (`None`: the announce failed); `interval` is when to announce
    /// again. The first few announces come quicker, so a fleet that starts together finds
    /// each other before leaning on the origin.
    pub fn announced(
        &mut self,
        peers: Option<Vec<PeerInfo>>,
        interval: Duration,
        now: Instant,
    ) -> Vec<Action> {
        self.announced_once = true;
        for p in peers.into_iter().flatten() {
            // A peer seen before may have completed since: keep what the tracker says now.
            match self.candidates.iter_mut().find(|c| c.addr == p.addr) {
                Some(c) => *c = p,
                None => self.candidates.push(p),
            }
        }
        // Seeders first, then origins, then the rest, as the tracker orders a handout.
        self.candidates.sort_by_key(|c| (!c.complete, !c.origin));
        let quick = Duration::from_millis(250 << self.announces.min(3));
        self.announces += 1;
        let after = if self.announces <= 3 { quick.min(interval) } else { interval };
        let mut actions = vec![Action::Announce { after }];
        actions.extend(self.connect_more(now));
        actions
    }

    /// Housekeeping on a timer: `received` holds each connection's cumulative bytes read.
    /// Withdraws the requests of stalled peers, connects to more candidates, brings in the
    /// HTTP fallback, and fails the download after a long stall.
    pub fn tick(&mut self, now: Instant, received: &[(PeerId, u64)]) -> Result<Vec<Action>, Fatal> {
        let mut actions = Vec::new();
        let stall_after = self
            .cfg
            .peer_stall
            .saturating_add(flow::limiter_delay(self.cfg.ingress_limit, self.piece_length));
        for &(id, bytes) in received {
            let busy = self.picker.in_flight_for(&id) > 0;
            let Some(peer) = self.peers.get_mut(&id) else { continue };
            if peer.flow.sample(now, bytes, busy) && busy {
                // Bytes of requested pieces arriving are progress, whether or not a piece is
                // complete yet: on a slow link several pieces arrive at once, each for seconds.
                self.last_progress = now;
            }
            let Some(oldest) = self.picker.oldest_request_to(&id) else { continue };
            if !peer.flow.is_stalled(now, oldest, stall_after) {
                continue;
            }
            for index in self.picker.withdraw(&id) {
                actions.push(Action::TimedOut { peer: id, index });
            }
            if self.blacklist.timeout(id, now) {
                self.closed(&id);
                actions.push(Action::Disconnect(id));
            }
        }
        self.blacklist.prune(now);
        self.declined.retain(|_, at| now.duration_since(*at) < DECLINE_BACKOFF);
        self.declined_by.retain(|_, at| now.duration_since(*at) < DECLINE_BACKOFF);
        actions.extend(self.connect_more(now));
        actions.extend(self.rotate(now));
        self.consider_fallback(now)?;
        Ok(actions)
    }

    /// Connect to candidates until the limit, best first (the tracker orders them).
    fn connect_more(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        for c in &self.candidates {
            if self.peers.len() + self.connecting.len() >= self.cfg.max_connections || self.node_room == 0 {
                break;
            }
            let id = c.peer_id.parse::<PeerId>().ok();
            let known = id.is_some_and(|id| {
                id == self.me || self.peers.contains_key(&id) || self.blacklist.is_banned(&id, now)
            });
            let connected = self.peers.values().any(|p| p.addr == c.addr);
            if c.addr == self.advertise || self.connecting.contains(&c.addr) || known || connected {
                continue;
            }
            self.connecting.insert(c.addr);
            self.node_room -= 1;
            actions.push(Action::Connect(c.addr));
        }
        actions
    }

    /// With every connection in use, trade the least useful peer for a seeder the tracker
    /// handed out that we are not connected to: a peer that has nothing we lack, else the
    /// slowest incomplete one. Without this a download stays with the ten peers it met first;
    /// in a 20-host swarm the hosts whose first peers were slow took twice as long as the
    /// rest, and went on crawling after the others had finished and become seeders. One
    /// trade per tick, and only for peers connected [`ROTATE_AFTER`] or longer, so their
    /// rates are measured.
    fn rotate(&mut self, now: Instant) -> Vec<Action> {
        if self.peers.len() < self.cfg.max_connections || !self.connecting.is_empty() || self.node_room == 0 {
            return Vec::new();
        }
        let seeder = self.candidates.iter().find(|c| {
            let id = c.peer_id.parse::<PeerId>().ok();
            c.complete
                && !c.origin
                && c.addr != self.advertise
                && !self.peers.values().any(|p| p.addr == c.addr)
                && id.is_none_or(|id| {
                    id != self.me && !self.peers.contains_key(&id) && !self.blacklist.is_banned(&id, now)
                })
        });
        let Some(seeder) = seeder.map(|c| c.addr) else { return Vec::new() };
        let count = self.picker.piece_count();
        let victim = self
            .peers
            .iter()
            .filter(|(id, p)| {
                !p.origin
                    && now.saturating_duration_since(p.connected_at) >= ROTATE_AFTER
                    && self.picker.peer_bitfield(id).is_some_and(|b| b.count() < count)
            })
            .min_by(|(a, pa), (b, pb)| {
                let key =
                    |id: &PeerId, p: &Peer| (self.picker.is_interesting(id), p.flow.rate().unwrap_or(0.0));
                let (ka, kb) = (key(a, pa), key(b, pb));
                ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
            })
            .map(|(id, _)| *id);
        let Some(victim) = victim else { return Vec::new() };
        self.closed(&victim);
        self.connecting.insert(seeder);
        self.node_room -= 1;
        vec![Action::Disconnect(victim), Action::Connect(seeder)]
    }

    fn consider_fallback(&mut self, now: Instant) -> Result<(), Fatal> {
        let idle = now.duration_since(self.last_progress);
        let no_peers = self.announced_once && self.peers.is_empty() && self.connecting.is_empty();
        if !self.fallback_active && (idle >= self.cfg.fallback_after || no_peers) {
            let full = Bitfield::full(self.picker.piece_count());
            if self.picker.add_peer(ORIGIN_PEER, full).is_ok() {
                self.fallback_active = true;
            }
        }
        if idle >= self.cfg.stall_timeout {
            let state = format!(
                "{} of {} pieces, {} peers connected, {} connecting, {} candidates, origin fallback {}",
                self.picker.have().count(),
                self.picker.piece_count(),
                self.peers.len(),
                self.connecting.len(),
                self.candidates.len(),
                if self.fallback_active { "active" } else { "off" },
            );
            return Err(Fatal::Stalled(self.cfg.stall_timeout, state));
        }
        Ok(())
    }

    /// Whether the HTTP fallback has been brought in.
    pub fn fallback_active(&self) -> bool {
        self.fallback_active
    }

    /// The requests to send now. `node_rate` is the node's measured ingress (bytes/s) and
    /// `elsewhere` the bytes the node's other downloads have in flight: the budget is the
    /// node's, shared by all of them.
    pub fn fill(&mut self, now: Instant, node_rate: Option<f64>, elsewhere: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let budget = flow::in_flight_budget(node_rate, self.cfg.ingress_limit).saturating_sub(elsewhere);
        let cap = flow::in_flight_pieces(budget, self.piece_length);
        let mut room =
            cap.saturating_sub(self.picker.in_flight_total() - self.picker.in_flight_for(&ORIGIN_PEER));
        let origins = self.peers.values().filter(|p| p.origin).count() as u32;
        let others_connected = self.peers.len() > origins as usize;

        // The peers furthest below their pipelining depth go first, ties at random: a fast
        // peer whose queue drained is refilled before a slow one that still has work.
        let mut order: Vec<(PeerId, usize)> = self
            .peers
            .iter()
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
        order.sort_by_key(|(id, depth)| {
            // Fill level in percent; integer keys keep the sort total.
            self.picker.in_flight_for(id) * 100 / (*depth).max(1)
        });
        // Endgame duplicates only where they help (see `flow::is_late`, `worth_duplicating`).
        let (mut requested, late, left) = self.request_outlook(now);
        // Without a configured limit, every peer may have one request whatever the budget:
        // the budget keeps requests from queueing behind our own link, but when each peer's
        // upload is shared by many downloaders the link fills only with many peers sending at
        // once. Without this floor a host that measured a low rate got a 2-piece budget, so
        // only 2 peers sent to it, so it measured a low rate: 3-7 Mbit/s of a 25 Mbit/s link
        // for 30 s while the rest of a 20-host fleet ran at full speed. A first pass gives
        // the idle peers their one request; the second fills depths within the budget.
        let floor = usize::from(self.cfg.ingress_limit.is_none());
        let passes = [(floor, true), (usize::MAX, false)];
        for (id, depth, first) in
            passes.iter().flat_map(|&(cap, first)| order.iter().map(move |&(id, d)| (id, d.min(cap), first)))
        {
            let in_flight = self.picker.in_flight_for(&id);
            let limit = if first {
                if in_flight > 0 {
                    continue;
                }
                depth
            } else {
                if room == 0 {
                    break;
                }
                depth.min(in_flight.saturating_add(room))
            };
            let is_origin = self.peers.get(&id).is_some_and(|p| p.origin);
            let declined = &self.declined;
            let declined_by = &self.declined_by;
            let rate = self.peers.get(&id).and_then(|p| p.flow.rate());
            let (requested_now, late, left, piece_length) = (&requested, &late, &left, self.piece_length);
            let fresh_or_late = move |index: u32| {
                !requested_now.contains(&index)
                    || late.contains(&index)
                    || left.get(&index).is_some_and(|&l| flow::worth_duplicating(l, piece_length, rate))
            };
            let picked = if is_origin && others_connected {
                // Only pieces no other connected peer has, and not just declined.
                self.picker.pick_where(&id, now, limit, |index, availability| {
                    availability <= origins && !declined.contains_key(&index) && fresh_or_late(index)
                })
            } else {
                self.picker.pick_where(&id, now, limit, |index, _| {
                    !declined_by.contains_key(&(id, index)) && fresh_or_late(index)
                })
            };
            room = room.saturating_sub(picked.len());
            requested.extend(picked.iter().copied());
            actions.extend(picked.into_iter().map(|index| Action::Request { peer: id, index }));
        }

        if self.fallback_active {
            // While peers deliver, the fallback only tops up what none of them has (the
            // fallback pseudo-peer counts in the availability itself); after a stall it
            // fetches anything missing.
            let stalled = now.duration_since(self.last_progress) >= self.cfg.fallback_after;
            let declined = &self.declined;
            let picked = if others_connected && !stalled {
                self.picker.pick_where(
                    &ORIGIN_PEER,
                    now,
                    self.cfg.fallback_parallel,
                    |index, availability| availability <= origins + 1 && !declined.contains_key(&index),
                )
            } else {
                self.picker.pick(&ORIGIN_PEER, now, self.cfg.fallback_parallel)
            };
            actions.extend(picked.into_iter().map(|index| Action::Fetch { index }));
        }
        actions
    }

    /// The pieces requested from peers; those whose requests are all late; and for the
    /// others, the least time left until one of their requests is expected to be done.
    fn request_outlook(&self, now: Instant) -> (HashSet<u32>, HashSet<u32>, HashMap<u32, Duration>) {
        let mut requested = HashSet::new();
        let mut on_time = HashSet::new();
        let mut left: HashMap<u32, Duration> = HashMap::new();
        for (id, peer) in &self.peers {
            let rate = peer.flow.rate();
            for (ahead, (sent_at, index)) in self.picker.request_times_to(id).into_iter().enumerate() {
                requested.insert(index);
                let age = now.saturating_duration_since(sent_at);
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
        (requested, late, left)
    }

    /// A request could not be handed to its connection (it closed): free the piece.
    pub fn request_failed(&mut self, peer: &PeerId, index: u32) {
        self.picker.failed(peer, index);
    }

    /// Bytes this download has requested from peers and not yet received.
    pub fn in_flight_bytes(&self) -> u64 {
        self.picker.in_flight_bytes().saturating_sub(self.picker.in_flight_bytes_for(&ORIGIN_PEER))
    }

    /// A one-line summary for logs.
    pub fn describe(&self) -> String {
        format!(
            "{} of {} pieces, {} peers, {} in flight",
            self.picker.have().count(),
            self.picker.piece_count(),
            self.peers.len(),
            self.picker.in_flight_total()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_registry::{Algorithm, Digest};

    const PIECE: u64 = 1024 * 1024;

    fn meta(pieces: u32) -> Metainfo {
        let size = u64::from(pieces) * PIECE;
        Metainfo::new(Digest::of(Algorithm::Sha256, b"blob"), size, PIECE, vec![[0; 32]; pieces as usize])
            .unwrap()
    }

    fn peer(n: u8) -> PeerId {
        PeerId([n; 20])
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 4000))
    }

    fn info(n: u8, origin: bool) -> PeerInfo {
        PeerInfo { peer_id: peer(n).to_string(), addr: addr(n), complete: origin, origin }
    }

    fn state(pieces: u32, cfg: SchedulerConfig, t0: Instant) -> SwarmState {
        let me = peer(0);
        SwarmState::with_rng(
            cfg,
            me,
            addr(0),
            &meta(pieces),
            Bitfield::new(pieces),
            t0,
            StdRng::seed_from_u64(7),
        )
        .unwrap()
    }

    fn requests(actions: &[Action]) -> Vec<(PeerId, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Request { peer, index } => Some((*peer, *index)),
                _ => None,
            })
            .collect()
    }

    /// Connect peers 1..=n, each holding every piece, through an announce.
    fn with_seeders(s: &mut SwarmState, n: u8, t: Instant) {
        let peers = (1..=n).map(|i| info(i, false)).collect();
        let connects = s.announced(Some(peers), Duration::from_secs(5), t);
        assert_eq!(connects.iter().filter(|a| matches!(a, Action::Connect(_))).count(), n as usize);
        for i in 1..=n {
            assert!(s.connected(peer(i), addr(i), Bitfield::full(s.picker().piece_count()), t));
        }
    }

    /// Let `bytes_per_tick` arrive from each of `peers` per 200 ms tick, storing whole pieces as
    /// they complete, for `ticks` ticks; returns the time and the per-peer byte counters.
    fn run(
        s: &mut SwarmState,
        mut t: Instant,
        counters: &mut HashMap<PeerId, u64>,
        rates: &HashMap<PeerId, u64>,
        ticks: u32,
        node_rate: Option<f64>,
    ) -> (Instant, Vec<Action>) {
        let mut all = Vec::new();
        let mut progress: HashMap<PeerId, u64> = HashMap::new();
        for _ in 0..ticks {
            t += Duration::from_millis(200);
            let mut samples = Vec::new();
            for (id, rate) in rates {
                if s.picker().in_flight_for(id) == 0 {
                    samples.push((*id, counters.get(id).copied().unwrap_or(0)));
                    continue;
                }
                let c = counters.entry(*id).or_default();
                *c += rate / 5;
                let p = progress.entry(*id).or_default();
                *p += rate / 5;
                samples.push((*id, *c));
                // Deliver whole pieces in request order.
                while *p >= PIECE {
                    let next = s.picker().requests_to(id).first().copied();
                    let Some(index) = next else { break };
                    *p -= PIECE;
                    all.extend(s.stored(*id, index, Stored::Ok, t).unwrap());
                }
            }
            all.extend(s.tick(t, &samples).unwrap());
            all.extend(s.fill(t, node_rate, 0));
        }
        (t, all)
    }

    #[test]
    fn the_first_requests_fit_the_slow_start_budget_and_the_unknown_peer_depth() {
        let t0 = Instant::now();
        let mut s = state(64, SchedulerConfig::default(), t0);
        assert_eq!(s.start(), vec![Action::Announce { after: Duration::ZERO }]);
        with_seeders(&mut s, 10, t0);
        let reqs = requests(&s.fill(t0, None, 0));
        // An 8 MiB budget of 1 MiB pieces, but one request for every peer first.
        assert_eq!(reqs.len(), 10);
        let mut per_peer: HashMap<PeerId, usize> = HashMap::new();
        for (p, _) in &reqs {
            *per_peer.entry(*p).or_default() += 1;
        }
        assert!(per_peer.values().all(|&n| n <= flow::MIN_PIPELINE), "{per_peer:?}");
        let mut pieces: Vec<u32> = reqs.iter().map(|r| r.1).collect();
        pieces.sort_unstable();
        pieces.dedup();
        assert_eq!(pieces.len(), 10, "no piece asked twice outside endgame");
        // With 3 peers the budget is what limits: 8 pieces, 2 per peer at most.
        let mut s = state(64, SchedulerConfig::default(), t0);
        with_seeders(&mut s, 3, t0);
        assert_eq!(requests(&s.fill(t0, None, 0)).len(), 3 * flow::MIN_PIPELINE);
    }

    #[test]
    fn the_budget_grows_with_the_measured_node_rate_and_is_shared_with_other_downloads() {
        let t0 = Instant::now();
        let mut s = state(128, SchedulerConfig::default(), t0);
        with_seeders(&mut s, 10, t0);
        // 20 MB/s measured: 40 MB in flight, but 2 requests a peer until peers are measured.
        assert_eq!(requests(&s.fill(t0, Some(20e6), 0)).len(), 20);
        let mut s = state(128, SchedulerConfig::default(), t0);
        with_seeders(&mut s, 10, t0);
        // Another download of the node already has 26 MB in flight: 14 MB left, 14 pieces
        // (10 first requests, then 4 more).
        assert_eq!(requests(&s.fill(t0, Some(20e6), 26_000_000)).len(), 14);
        // With the budget spent elsewhere, each peer still gets its one request.
        let mut s = state(128, SchedulerConfig::default(), t0);
        with_seeders(&mut s, 10, t0);
        assert_eq!(requests(&s.fill(t0, Some(20e6), 40_000_000)).len(), 10);
        // A configured limit is a hard cap: then the two-piece minimum is all there is.
        let cfg = SchedulerConfig { ingress_limit: Some(1), ..SchedulerConfig::default() };
        let mut s = state(128, cfg, t0);
        with_seeders(&mut s, 10, t0);
        assert_eq!(requests(&s.fill(t0, Some(20e6), 40_000_000)).len(), flow::MIN_PIPELINE);
    }

    #[test]
    fn a_configured_ingress_limit_caps_what_is_in_flight() {
        let t0 = Instant::now();
        let cfg = SchedulerConfig { ingress_limit: Some(2 * PIECE), ..SchedulerConfig::default() };
        let mut s = state(64, cfg, t0);
        with_seeders(&mut s, 10, t0);
        assert_eq!(requests(&s.fill(t0, Some(100e6), 0)).len(), 4, "2 s of 2 MiB/s");
    }

    #[test]
    fn a_peer_is_never_timed_out_while_its_bytes_arrive_however_slowly() {
        let t0 = Instant::now();
        let mut s = state(64, SchedulerConfig::default(), t0);
        with_seeders(&mut s, 2, t0);
        s.fill(t0, None, 0);
        let mut counters = HashMap::new();
        // Peer 1 delivers 6 MB/s; peer 2 trickles 100 KB/s: a piece takes it 10 s.
        let rates = HashMap::from([(peer(1), 6_000_000), (peer(2), 100_000)]);
        let (_, actions) = run(&mut s, t0, &mut counters, &rates, 60, None);
        let timeouts = actions.iter().filter(|a| matches!(a, Action::TimedOut { .. })).count();
        assert_eq!(timeouts, 0, "{actions:?}");
        assert!(s.picker().in_flight_for(&peer(2)) <= flow::MIN_PIPELINE);
    }

    #[test]
    fn a_silent_peer_is_timed_out_and_its_pieces_go_elsewhere() {
        let t0 = Instant::now();
        let mut s = state(64, SchedulerConfig::default(), t0);
        with_seeders(&mut s, 2, t0);
        let first = requests(&s.fill(t0, None, 0));
        let silent: Vec<u32> = first.iter().filter(|r| r.0 == peer(2)).map(|r| r.1).collect();
        assert!(!silent.is_empty());
        let mut counters = HashMap::new();
        let rates = HashMap::from([(peer(1), 6_000_000), (peer(2), 0)]);
        // Just before the stall time nothing is withdrawn.
        let (t, actions) = run(&mut s, t0, &mut counters, &rates, 14, None);
        assert!(!actions.iter().any(|a| matches!(a, Action::TimedOut { .. })));
        let (_, actions) = run(&mut s, t, &mut counters, &rates, 1, None);
        let timed_out: Vec<u32> = actions
            .iter()
            .filter_map(|a| match a {
                Action::TimedOut { peer: p, index } if *p == peer(2) => Some(*index),
                _ => None,
            })
            .collect();
        assert_eq!(timed_out, silent);
        // The withdrawn pieces are asked of the peer that delivers (it has room once measured).
        let asked_again: Vec<u32> =
            requests(&actions).iter().filter(|r| r.0 == peer(1)).map(|r| r.1).collect();
        assert!(silent.iter().any(|i| asked_again.contains(i)) || s.picker().in_flight_for(&peer(1)) > 0);
        assert!(!actions.contains(&Action::Disconnect(peer(2))), "one stall is not a ban");
    }

    #[test]
    fn stalls_in_a_row_ban_a_peer_and_a_delivery_forgives_them() {
        let t0 = Instant::now();
        let mut s = state(64, SchedulerConfig::default(), t0);
        with_seeders(&mut s, 2, t0);
        let mut counters = HashMap::new();
        let rates = HashMap::from([(peer(1), 6_000_000), (peer(2), 0)]);
        s.fill(t0, None, 0);
        let (_, actions) = run(&mut s, t0, &mut counters, &rates, 60, None);
        assert!(actions.contains(&Action::Disconnect(peer(2))), "3 stalls in a row ban");
        assert_eq!(s.peer_count(), 1);
        // A banned peer handed out again is not reconnected.
        let again =
            s.announced(Some(vec![info(2, false)]), Duration::from_secs(5), t0 + Duration::from_secs(13));
        assert!(!again.contains(&Action::Connect(addr(2))));
    }

    #[test]
    fn pipelining_follows_each_peers_measured_rate() {
        let t0 = Instant::now();
        let mut s = state(256, SchedulerConfig::default(), t0);
        with_seeders(&mut s, 2, t0);
        s.fill(t0, None, 0);
        let mut counters = HashMap::new();
        let rates = HashMap::from([(peer(1), 8_000_000), (peer(2), 400_000)]);
        let (_, _) = run(&mut s, t0, &mut counters, &rates, 15, Some(8.4e6));
        let fast = s.picker().in_flight_for(&peer(1));
        let slow = s.picker().in_flight_for(&peer(2));
        assert!(fast >= 6, "fast peer has {fast} in flight");
        assert!(slow <= 2, "slow peer has {slow} in flight");
    }

    #[test]
    fn an_origin_is_asked_only_for_what_no_other_peer_has() {
        let t0 = Instant::now();
        let mut s = state(4, SchedulerConfig::default(), t0);
        let connects = s.announced(Some(vec![info(9, true), info(1, false)]), Duration::from_secs(5), t0);
        assert_eq!(connects.len(), 3);
        assert!(s.connected(peer(9), addr(9), Bitfield::full(4), t0));
        let mut bf = Bitfield::new(4);
        bf.set(0).unwrap();
        bf.set(1).unwrap();
        assert!(s.connected(peer(1), addr(1), bf, t0));
        let reqs = requests(&s.fill(t0, None, 0));
        let from_origin: Vec<u32> = reqs.iter().filter(|r| r.0 == peer(9)).map(|r| r.1).collect();
        assert_eq!(from_origin.len(), 1, "one at a time from an origin");
        assert!(from_origin[0] >= 2, "only pieces the other peer lacks: {from_origin:?}");
        // A declined piece is not asked of the origin again within the backoff.
        s.declined(peer(9), from_origin[0], t0);
        let again = requests(&s.fill(t0, None, 0));
        assert!(!again.contains(&(peer(9), from_origin[0])), "{again:?}");
    }

    #[test]
    fn fallback_only_for_pieces_no_peer_has_until_a_real_stall() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let mut s = state(4, SchedulerConfig::default(), t0);
        s.announced(Some(vec![info(1, false)]), secs(5), t0);
        let mut bf = Bitfield::new(4);
        bf.set(0).unwrap();
        bf.set(1).unwrap();
        assert!(s.connected(peer(1), addr(1), bf, t0));
        assert_eq!(requests(&s.fill(t0, None, 0)).len(), 2);
        // Bytes arrive for 2.5 s without completing a piece: that is progress.
        s.tick(t0 + Duration::from_millis(2500), &[(peer(1), 900_000)]).unwrap();
        s.tick(t0 + secs(5), &[(peer(1), 900_000)]).unwrap();
        assert!(!s.fallback_active(), "2.5 s since the last byte");
        // Then nothing for 3 s: the origin comes in.
        s.tick(t0 + Duration::from_millis(5500), &[(peer(1), 900_000)]).unwrap();
        assert!(s.fallback_active());
        // The peer delivers again: the fallback tops up only what no peer has, pieces 2 and 3.
        let t = t0 + secs(6);
        s.stored(peer(1), 0, Stored::Ok, t).unwrap();
        let mut fetched: Vec<u32> = s
            .fill(t, None, 0)
            .iter()
            .filter_map(|a| match a {
                Action::Fetch { index } => Some(*index),
                _ => None,
            })
            .collect();
        fetched.sort_unstable();
        assert_eq!(fetched, vec![2, 3]);
    }

    #[test]
    fn endgame_duplicates_only_late_requests_and_cancels_them_when_one_copy_arrives() {
        let t0 = Instant::now();
        let mut s = state(2, SchedulerConfig::default(), t0);
        with_seeders(&mut s, 3, t0);
        let first = requests(&s.fill(t0, None, 0));
        assert_eq!(first.len(), 2, "one request per piece while they are on time: {first:?}");
        // Bytes keep arriving (no stall), but slower than predicted: once a request is late,
        // another peer may ask for the same piece, at most twice per piece.
        assert!(requests(&s.fill(t0 + Duration::from_secs(2), None, 0)).is_empty());
        let t1 = t0 + Duration::from_millis(2600);
        let dupes = requests(&s.fill(t1, None, 0));
        assert_eq!(dupes.len(), 2, "{dupes:?}");
        for (p, index) in &dupes {
            assert!(!first.contains(&(*p, *index)), "a duplicate goes to another peer");
        }
        let (winner, index) = dupes[0];
        let loser = first.iter().find(|r| r.1 == index).unwrap().0;
        let actions = s.stored(winner, index, Stored::Ok, t1).unwrap();
        assert_eq!(actions, vec![Action::Cancel { peer: loser, index }]);
        assert_eq!(s.picker().in_flight(index), 0);
    }

    #[test]
    fn a_fast_peer_takes_over_the_last_pieces_from_a_straggler() {
        let t0 = Instant::now();
        let mut s = state(16, SchedulerConfig::default(), t0);
        with_seeders(&mut s, 2, t0);
        s.fill(t0, None, 0);
        let mut counters = HashMap::new();
        // Peer 1 delivers 6 MB/s, peer 2 (a straggler) 150 KB/s: a piece takes it 7 s.
        let rates = HashMap::from([(peer(1), 6_000_000), (peer(2), 150_000)]);
        let (t, _) = run(&mut s, t0, &mut counters, &rates, 20, Some(6.15e6));
        assert!(
            s.picker().in_flight_for(&peer(2)) <= 1,
            "the fast peer took over what waited behind the straggler"
        );
        let held = s.picker().requests_to(&peer(2));
        // By now peer 1 has fetched everything else; the straggler's piece is asked of it too,
        // long before the straggler is late.
        assert!(s.picker().have().count() >= 14, "{}", s.describe());
        let (_, actions) = run(&mut s, t, &mut counters, &rates, 5, Some(6.15e6));
        for index in held {
            let asked =
                actions.contains(&Action::Request { peer: peer(1), index }) || s.picker().have().get(index);
            assert!(asked, "piece {index} stays with the straggler: {}", s.describe());
        }
        assert!(s.is_complete() || s.picker().in_flight_for(&peer(1)) > 0);
    }

    #[test]
    fn connects_stop_at_the_nodes_budget_and_resume_when_it_allows() {
        let t0 = Instant::now();
        let mut s = state(4, SchedulerConfig::default(), t0);
        s.set_node_room(2);
        let peers = (1..=5).map(|i| info(i, false)).collect();
        let connects = s.announced(Some(peers), Duration::from_secs(5), t0);
        assert_eq!(connects.iter().filter(|a| matches!(a, Action::Connect(_))).count(), 2);
        // One attempt could not get a slot after all: it stays a candidate.
        s.connect_abandoned(addr(2));
        s.set_node_room(10);
        let more = s.tick(t0 + Duration::from_millis(200), &[]).unwrap();
        let addrs: Vec<&Action> = more.iter().filter(|a| matches!(a, Action::Connect(_))).collect();
        assert_eq!(addrs.len(), 4, "{more:?}");
        assert!(more.contains(&Action::Connect(addr(2))));
    }

    #[test]
    fn a_full_download_trades_its_least_useful_peer_for_a_new_seeder() {
        let t0 = Instant::now();
        let cfg = SchedulerConfig { max_connections: 2, ..SchedulerConfig::default() };
        let mut s = state(4, cfg, t0);
        s.announced(Some(vec![info(1, false), info(2, false)]), Duration::from_secs(5), t0);
        let half = |set: &[u32]| {
            let mut b = Bitfield::new(4);
            for &i in set {
                b.set(i).unwrap();
            }
            b
        };
        assert!(s.connected(peer(1), addr(1), half(&[0, 1]), t0));
        assert!(s.connected(peer(2), addr(2), half(&[2]), t0));
        // Peer 3 completes and the tracker hands it out as a seeder.
        let mut seeder = info(3, false);
        seeder.complete = true;
        let t1 = t0 + Duration::from_secs(1);
        s.announced(Some(vec![seeder.clone()]), Duration::from_secs(5), t1);
        assert!(s.tick(t1, &[]).unwrap().is_empty(), "too early: rates not measured yet");
        // Both peers deliver; peer 2 is the slower.
        let t2 = t0 + Duration::from_millis(2600);
        s.fill(t0, None, 0);
        s.tick(t0 + Duration::from_millis(1600), &[(peer(1), 3_000_000), (peer(2), 100_000)]).unwrap();
        let actions = s.tick(t2, &[(peer(1), 6_000_000), (peer(2), 200_000)]).unwrap();
        assert!(actions.contains(&Action::Disconnect(peer(2))), "{actions:?}");
        assert!(actions.contains(&Action::Connect(addr(3))), "{actions:?}");
        assert_eq!(s.peer_count(), 1);
        // Once the seeder is connected there is nothing better to trade for.
        assert!(s.connected(peer(3), addr(3), Bitfield::full(4), t2));
        let later = s.tick(t2 + Duration::from_secs(3), &[(peer(1), 6_000_000), (peer(3), 0)]).unwrap();
        assert!(!later.iter().any(|a| matches!(a, Action::Disconnect(_))), "{later:?}");
    }

    #[test]
    fn a_bad_piece_bans_and_drops_the_peer_and_a_bad_origin_piece_is_fatal() {
        let t0 = Instant::now();
        let mut s = state(4, SchedulerConfig::default(), t0);
        with_seeders(&mut s, 1, t0);
        let reqs = requests(&s.fill(t0, None, 0));
        let actions = s.stored(peer(1), reqs[0].1, Stored::BadPiece, t0).unwrap();
        assert_eq!(actions, vec![Action::Disconnect(peer(1))]);
        assert!(!s.connected(peer(1), addr(1), Bitfield::full(4), t0), "banned");
        assert!(s.stored(ORIGIN_PEER, 0, Stored::BadPiece, t0).is_err());
    }

    #[test]
    fn a_download_with_no_progress_fails_after_the_stall_timeout() {
        let t0 = Instant::now();
        let mut s = state(4, SchedulerConfig::default(), t0);
        s.announced(Some(vec![]), Duration::from_secs(5), t0);
        s.tick(t0 + Duration::from_millis(200), &[]).unwrap();
        assert!(s.fallback_active(), "no peers at all: the origin at once");
        let err = s.tick(t0 + Duration::from_secs(60), &[]).unwrap_err();
        assert!(matches!(err, Fatal::Stalled(..)), "{err}");
    }

    #[test]
    fn the_first_announces_come_quickly() {
        let t0 = Instant::now();
        let mut s = state(4, SchedulerConfig::default(), t0);
        let afters: Vec<Duration> = (0..5)
            .map(|_| match s.announced(None, Duration::from_secs(5), t0)[0] {
                Action::Announce { after } => after,
                ref other => panic!("{other:?}"),
            })
            .collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(afters, vec![ms(250), ms(500), ms(1000), Duration::from_secs(5), Duration::from_secs(5)]);
    }
}
