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
//!   delivered no byte for [`flow::STALL_AFTER`], or for twice the time a piece takes at the
//!   rate the peer has shown (or at the node's measured ingress shared among its peers, if
//!   slower) if that is longer ([`flow::PeerFlow::stall_after`]); bytes that
//!   keep arriving are never timed out, unless no piece has come of them for
//!   [`flow::MAX_PIECE_WAIT`] (a peer sending only keep-alives). Stalls in a row get a peer
//!   banned (`blacklist`).
//! - **Super-seeding origins** are asked only for pieces no other connected peer has, the
//!   next ones the readers need, not again soon after they declined one, and not while this
//!   host still holds [`UNSHARED_ORIGIN_PIECES`] of theirs that no peer has yet (more at a
//!   fast node: [`unshared_origin_limit`]).
//! - **HTTP fallback** only for pieces no connected peer has (while the swarm delivers), or
//!   for anything after a real stall, or while no peer has completed a piece for
//!   [`flow::MAX_PIECE_WAIT`] with requests out (bytes arriving or not).
//! - **Endgame** duplicates only where they help, cancelled as soon as one copy is stored.
//! - **Incast**: a busy connection that had its share of the node's link, silent for
//!   [`crate::incast::INCAST_SILENCE`] while others deliver, is reported to the node, whose
//!   cap on peers sending at once ([`crate::incast::SenderCap`]) then keeps idle peers from
//!   being asked until senders finish.
//! - **Peers**: candidates up to the per-blob and node limits; a full download trades its
//!   least useful peer for a new seeder.
//!
//! Requests are decided in `requests`, connections in `peers`, stalls in `stalls`, the
//! HTTP fallback in `fallback`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::bitfield::Bitfield;
use crate::blacklist::{Blacklist, BlacklistConfig};
use crate::flow::{self, PeerFlow};
use crate::metainfo::Metainfo;
use crate::peer::PeerId;
use crate::picker::{PickerConfig, PickerError, PiecePicker};
use crate::tracker_client::PeerInfo;

pub use counts::{DuplicateRequests, Rotations};
pub use requests::{unshared_origin_limit, SHARING_LOOP, UNSHARED_MEMORY, UNSHARED_ORIGIN_PIECES};
pub use stalls::ConnBytes;

mod counts;
mod fallback;
mod peers;
mod requests;
mod stalls;

pub use fallback::{FALLBACK_BACKOFF, FALLBACK_BACKOFF_MAX, FALLBACK_PATIENCE, MAX_FALLBACK_FAILURES};

/// The pseudo-peer id of the HTTP origin fallback inside the picker.
pub const ORIGIN_PEER: PeerId = PeerId([0xff; 20]);
/// How long a piece an origin declined is not asked of an origin again.
pub const DECLINE_BACKOFF: Duration = Duration::from_secs(2);
/// A peer is traded for another candidate (see `SwarmState::rotate`) only after this long
/// connected, so its rate is measured.
pub const ROTATE_AFTER: Duration = Duration::from_secs(2);
/// A peer that has pieces we lack is traded only when its measured rate is below this share
/// of the mean over our measured peers: its upload is shared by more downloaders than the
/// others', so moving elsewhere spreads the fleet's load over idle uplinks. In `shoal-sim`
/// (128 MiB, 50 Mbit/s hosts) p99 at 100 / 300 hosts was 2.07 / 2.29 × the link time with
/// 0.5, 1.68 / 1.76 with 0.7, 1.33 / 1.39 with 0.85, and 1.57 / 1.63 with 1.0, where every
/// host traded a peer on almost every tick (94 connections per host).
pub const ROTATE_SLOW_SHARE: f64 = 0.85;
/// Candidates a download remembers: the latest handouts first. The tracker hands out up to
/// 50 peers per announce; a list that kept every peer ever handed out grew with the fleet,
/// and merging each handout into it cost a linear search per peer.
pub const MAX_CANDIDATES: usize = 200;
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
    /// The piece failed its hash. `over`: the address of the connection it came over (`None`
    /// for the origin's HTTP fallback), which is what is banned: by the time the check ends
    /// the peer id may be another connection's (peer ids are only claimed in a handshake).
    BadPiece {
        over: Option<SocketAddr>,
    },
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
    /// When this peer last completed a piece for us (or connected).
    last_piece: Instant,
    /// Traded away by [`SwarmState::rotate`]: asked for nothing more, and disconnected once
    /// the pieces it is sending have arrived (or it stalls), so their bytes are not wasted.
    retiring: bool,
    /// Its current silence was reported as a sign of incast (cleared when bytes arrive).
    silence_reported: bool,
    /// Bytes of requested pieces read from this connection as of the last tick.
    piece_bytes: u64,
}

/// A peer the tracker handed out, its id parsed once: candidates are looked at on every tick
/// (to connect, to rotate), and parsing hex ids there was 6 % of a 1,000-host simulation.
struct Candidate {
    /// `None` if the tracker sent an id that does not parse (then only the address is known).
    id: Option<PeerId>,
    addr: SocketAddr,
    complete: bool,
    origin: bool,
}

impl From<&PeerInfo> for Candidate {
    fn from(p: &PeerInfo) -> Candidate {
        Candidate { id: p.peer_id.parse().ok(), addr: p.addr, complete: p.complete, origin: p.origin }
    }
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
    /// The last connections that closed, oldest first (see [`SwarmState::address_of`]).
    departed: VecDeque<(PeerId, SocketAddr)>,
    /// Pieces an origin declined recently; not asked of an origin again until the swarm had
    /// a chance to pass them on.
    declined: HashMap<u32, Instant>,
    /// Pieces a peer declined recently, not asked of it again yet.
    declined_by: HashMap<(PeerId, u32), Instant>,
    /// Pieces an origin sent us lately, the oldest first (see [`UNSHARED_ORIGIN_PIECES`]).
    from_origin: VecDeque<(Instant, u32)>,
    connecting: HashSet<SocketAddr>,
    /// Peers the tracker handed out, the latest handout first.
    candidates: Vec<Candidate>,
    /// Addresses the tracker named as origins, kept even when their candidate entry is gone.
    origin_addrs: HashSet<SocketAddr>,
    fallback_active: bool,
    /// Failed fallback rounds in a row: a round's fetches are those sent while this count
    /// stood where it stands, and the first of them to fail counts for all.
    fallback_failures: u32,
    /// Fallback fetches out, with the count of failed rounds when each was sent.
    fallback_sent: HashMap<u32, u32>,
    /// No fallback fetch before this, after a failed round.
    fallback_retry_at: Option<Instant>,
    announced_once: bool,
    announces: u32,
    last_progress: Instant,
    /// When a piece from a peer (not the HTTP fallback) was last verified and stored: bytes
    /// of pieces are progress, but a peer sending a piece's last bytes a few at a time (and
    /// reconnecting before its own connection is judged) would be progress for ever (see
    /// `consider_fallback`). The fallback's own pieces do not count: they would take the
    /// download out of "fetch anything" after each piece, and a trickling peer claiming
    /// every piece would keep it to a few pieces a minute.
    last_stored: Instant,
    /// When the swarm last showed it is alive without delivering to us: a peer announced a
    /// piece we lack (or connected holding one), or an origin declined a request because an
    /// agent holds the piece.
    last_sign_of_life: Instant,
    /// Outbound connections the node's budget still allows (set by the I/O side).
    node_room: usize,
    /// The node's measured ingress (bytes/s) as of the last `fill`, for the share of it each
    /// connection can expect when the node's own link is what limits them.
    node_rate: Option<f64>,
    /// Peers that may start sending to this download under the node's cap on senders (set
    /// by the I/O side; `usize::MAX` without a cap).
    sender_room: usize,
    /// Signs of incast seen since the I/O side last took them.
    incast_signs: Vec<std::net::SocketAddr>,
    rotations: Rotations,
    duplicate_requests: DuplicateRequests,
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
            from_origin: VecDeque::new(),
            declined_by: HashMap::new(),
            connecting: HashSet::new(),
            candidates: Vec::new(),
            origin_addrs: HashSet::new(),
            fallback_active: false,
            departed: VecDeque::new(),
            fallback_failures: 0,
            fallback_sent: HashMap::new(),
            fallback_retry_at: None,
            announced_once: false,
            announces: 0,
            last_progress: now,
            last_stored: now,
            last_sign_of_life: now,
            node_room: usize::MAX,
            node_rate: None,
            sender_room: usize::MAX,
            incast_signs: Vec::new(),
            rotations: Rotations::default(),
            duplicate_requests: DuplicateRequests::default(),
            rng,
        })
    }

    /// Start with the bans and strikes earlier downloads of this blob left on the node
    /// ([`crate::node::NodeFlow::blacklist_for`]) instead of an empty list.
    pub fn with_blacklist(mut self, blacklist: Blacklist) -> Self {
        self.blacklist = blacklist;
        self
    }

    /// The blacklist, for the node to keep when the download ends (an empty one is left).
    pub fn take_blacklist(&mut self) -> Blacklist {
        std::mem::replace(&mut self.blacklist, Blacklist::new(self.cfg.blacklist.clone()))
    }

    /// The peers rotation traded away since the last call (the I/O side adds them to its
    /// counters).
    pub fn take_rotations(&mut self) -> Rotations {
        std::mem::take(&mut self.rotations)
    }

    /// The duplicate requests sent since the last call (the I/O side adds them to its
    /// counters).
    pub fn take_duplicate_requests(&mut self) -> DuplicateRequests {
        std::mem::take(&mut self.duplicate_requests)
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
    /// duplicate, not ourselves, not posing as the HTTP fallback, a bitfield of the right
    /// length). A peer naming itself [`ORIGIN_PEER`] would be asked for the fallback's pieces
    /// and a bad one from it would end the download, or replace the fallback's bitfield.
    ///
    /// A refused address stops being a candidate (as one that could not be reached does)
    /// until a handout names it again: kept, it was dialled again on every tick, and a
    /// handful of such addresses listed as seeders took every connection from honest peers.
    pub fn connected(&mut self, peer: PeerId, addr: SocketAddr, bitfield: Bitfield, now: Instant) -> bool {
        self.connecting.remove(&addr);
        if self.blacklist.is_banned(&addr, now)
            || self.peers.contains_key(&peer)
            || peer == self.me
            || peer == ORIGIN_PEER
        {
            self.candidates.retain(|c| c.addr != addr);
            return false;
        }
        // A new peer holding pieces we lack shows the swarm is alive, as a `have` does: our
        // request to it may wait for the peer's send slot before any byte comes.
        let news = bitfield.iter_set().any(|i| !self.picker.have().get(i));
        if self.picker.add_peer(peer, bitfield).is_err() {
            self.candidates.retain(|c| c.addr != addr);
            return false;
        }
        if news {
            self.last_sign_of_life = now;
        }
        let origin = self.origin_addrs.contains(&addr);
        self.peers.insert(
            peer,
            Peer {
                addr,
                origin,
                flow: PeerFlow::new(now),
                connected_at: now,
                last_piece: now,
                retiring: false,
                silence_reported: false,
                piece_bytes: 0,
            },
        );
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
    /// A piece we lack reaching one of our peers shows the swarm is alive (see
    /// [`FALLBACK_PATIENCE`]).
    pub fn have(&mut self, peer: &PeerId, index: u32, now: Instant) {
        let news =
            self.picker.peer_bitfield(peer).is_some_and(|b| !b.get(index)) && !self.picker.have().get(index);
        if self.picker.peer_has(peer, index).is_ok() && news {
            self.last_sign_of_life = now;
        }
    }

    /// A peer declined a request (a super-seeding origin sent the piece elsewhere). An
    /// origin's decline shows the swarm is alive: an agent holds the piece.
    pub fn declined(&mut self, peer: PeerId, index: u32, now: Instant) {
        if !self.picker.is_requested_from(&peer, index) {
            // The answer to a cancel of ours (a stall, a retiring peer, endgame), not a refusal.
            return;
        }
        // Only an origin's decline (super-seeding: the piece went to another peer, to be
        // passed on) keeps the piece from every origin for a while; an agent's (out of egress)
        // says nothing about the origins.
        if self.peers.get(&peer).is_some_and(|p| p.origin) {
            self.last_sign_of_life = now;
            self.declined.insert(index, now);
        }
        self.picker.failed(&peer, index);
        self.declined_by.insert((peer, index), now);
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
                if from != ORIGIN_PEER {
                    self.last_stored = now;
                }
                for other in self.picker.received(&from, index) {
                    if self.peers.contains_key(&other) {
                        actions.push(Action::Cancel { peer: other, index });
                    }
                }
                if from == ORIGIN_PEER {
                    self.fallback_delivered(index);
                } else if let Some(p) = self.peers.get_mut(&from) {
                    if p.origin {
                        self.from_origin.push_back((now, index));
                    }
                    p.last_piece = now;
                    self.blacklist.delivered(&p.addr);
                }
                actions.extend(self.release_retired());
            }
            Stored::BadPiece { over } => {
                self.picker.failed(&from, index);
                if from == ORIGIN_PEER {
                    return Err(Fatal::Fallback(format!("origin sent a bad piece {index}")));
                }
                // The peer may have closed while its piece was checked: banned all the same.
                let Some(addr) = over.or_else(|| self.address_of(&from)) else { return Ok(actions) };
                self.blacklist.bad_piece(addr, now);
                // Dropped only if the id is still that connection's: a peer that claimed an
                // honest one's id, sent a bad piece and left has not the honest one cut off.
                if self.peers.get(&from).is_some_and(|p| p.addr == addr) {
                    self.closed(&from);
                    actions.push(Action::Disconnect(from));
                }
            }
        }
        Ok(actions)
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
        if let Some(peers) = peers {
            // The latest handout first, in the tracker's (random) order, then the older
            // candidates it did not name again. Kept in first-seen order instead, every host
            // of a fleet that started together preferred the same few early announcers (they
            // were in everyone's first handouts), and later the same first seeder: 299 of
            // 300 simulated hosts ended up downloading from one uplink.
            let fresh: HashSet<SocketAddr> = peers.iter().map(|p| p.addr).collect();
            let older = std::mem::take(&mut self.candidates).into_iter().filter(|c| !fresh.contains(&c.addr));
            let mut seen = HashSet::new();
            self.candidates =
                peers.iter().filter(|p| seen.insert(p.addr)).map(Candidate::from).chain(older).collect();
            self.candidates.truncate(MAX_CANDIDATES);
            self.origin_addrs.extend(self.candidates.iter().filter(|c| c.origin).map(|c| c.addr));
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
    pub fn tick(&mut self, now: Instant, received: &[(PeerId, ConnBytes)]) -> Result<Vec<Action>, Fatal> {
        let mut actions = Vec::new();
        // Whether we are waiting for bytes, before this tick withdraws a stalled peer's requests.
        let waiting = self.in_flight_bytes() > 0;
        actions.extend(self.withdraw_stalled(now, received));
        self.blacklist.prune(now);
        self.declined.retain(|_, at| now.duration_since(*at) < DECLINE_BACKOFF);
        self.declined_by.retain(|_, at| now.duration_since(*at) < DECLINE_BACKOFF);
        actions.extend(self.release_retired());
        actions.extend(self.connect_more(now));
        actions.extend(self.rotate(now));
        self.consider_fallback(now, waiting)?;
        Ok(actions)
    }

    /// A request could not be handed to its connection (it closed): free the piece.
    pub fn request_failed(&mut self, peer: &PeerId, index: u32) {
        self.picker.failed(peer, index);
    }

    /// Bytes this download has requested from peers and not yet received.
    pub fn in_flight_bytes(&self) -> u64 {
        self.picker.in_flight_bytes().saturating_sub(self.picker.in_flight_bytes_for(&ORIGIN_PEER))
    }

    /// A one-line summary for errors and logs.
    pub fn describe(&self) -> String {
        format!(
            "{} of {} pieces, {} peers connected, {} connecting, {} candidates, {} requests in flight, origin fallback {}",
            self.picker.have().count(),
            self.picker.piece_count(),
            self.peers.len(),
            self.connecting.len(),
            self.candidates.len(),
            self.picker.in_flight_total(),
            if self.fallback_active { "active" } else { "off" },
        )
    }
}

#[cfg(test)]
mod tests;
