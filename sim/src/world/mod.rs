//! The simulated fleet: hosts running the real download state machine
//! ([`SwarmState`], with its picker, blacklist and flow rules), origins running the real
//! super-seeding rule ([`SuperSeed`]), and the real tracker store and handout ([`PeerStore`]).
//! Only what the I/O side of `p2p/src/swarm.rs`, `conn.rs` and `server.rs` does is modelled
//! here: connections, requests, cancels, `have`s and pieces travel as events, bytes as fluid
//! flows ([`crate::fluid`]), and time is a counter, so a seed replays a run exactly.
//!
//! What each event does mirrors the real code: a download's loop feeds every event to its
//! state, then calls `fill` with the node's measured rate; a tick every 200 ms passes each
//! connection's byte count; a server answers requests one after the other per connection,
//! an origin declining (a `Cancel`) what its super-seeding rule refuses.
//!
//! This module holds the types, setup and the event loop; `conns` the connections and the
//! serving side, `hosts` what a host's downloads do, `trace` what a run shows.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_p2p::inbound::{BlobSlots, KeyedSlot, KeyedSlots};
use shoal_p2p::metainfo::{piece_length_for, Metainfo};
use shoal_p2p::node::{ConnectionSlot, DownloadSlot, NodeFlow};
use shoal_p2p::super_seed::SuperSeed;
use shoal_p2p::swarm_state::{
    Action, ConnBytes, DuplicateRequests, Rotations, Stored, SwarmState, ORIGIN_PEER,
};
use shoal_p2p::tracker_client::PeerInfo;
use shoal_p2p::{Bitfield, PeerId};
use shoal_registry::{Algorithm, Digest};
use shoal_tracker::peers::{PeerStore, PeerStoreLimits};

use crate::config::{
    FleetConfig, AGENT_MAX_INBOUND, ANNOUNCE_INTERVAL, HANDOUT_LIMIT, ORIGIN_MAX_INBOUND, SEEDER_CACHE_TTL,
    SUPER_SEED_WINDOW, TICK,
};
use crate::fluid::{Completion, FlowId, LinkId, Network, SimTime, NANOS};
use crate::report::{HostResult, Outcome};

mod conns;
mod hosts;
mod trace;
use trace::Progress;
mod turns;

/// The port every simulated peer listens on.
const PEER_PORT: u16 = 7000;

/// Why a run could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("a fleet needs at least one host and one layer of at least one byte")]
    Empty,
    #[error("blob metainfo: {0}")]
    Metainfo(#[from] shoal_p2p::MetainfoError),
    #[error("scheduler: {0}")]
    Picker(#[from] shoal_p2p::PickerError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ConnId {
    idx: u32,
    generation: u32,
}

/// A send's place among its piece's sends (blob, piece index).
type PieceSlot = KeyedSlot<(usize, u32)>;

/// What a flow carries.
#[derive(Clone, Copy, Debug)]
enum Owner {
    /// Pieces over a peer connection.
    Conn(ConnId),
    /// One HTTP fallback range from an origin.
    Fetch { node: usize, blob: usize, index: u32, origin: usize },
}

#[derive(Debug)]
enum Ev {
    Start(usize),
    Leave(usize),
    Tick(usize, usize),
    AnnounceSend(usize, usize),
    AnnounceReply(usize, usize, Option<Vec<PeerInfo>>),
    SeedAnnounce(usize),
    ConnectDone(ConnId),
    RequestArrives(ConnId, u32),
    CancelArrives(ConnId, u32),
    DeclineArrives(ConnId, u32),
    PieceArrives(ConnId, u32),
    FetchStart {
        node: usize,
        blob: usize,
        index: u32,
        origin: usize,
    },
    FetchArrives(usize, usize, u32),
    FetchFailed(usize, usize, u32),
    FlowDone(Completion),
    /// A send has counted against its piece's limit for `SEND_HOLD` (its id).
    SendHoldOver(ConnId, u64),
    Recompute,
    Trace,
}

struct Scheduled {
    at: SimTime,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Download {
    state: SwarmState,
    slot: DownloadSlot,
    outbound: Vec<ConnId>,
    fill_pending: bool,
}

struct Node {
    origin: bool,
    peer_id: PeerId,
    hex: String,
    addr: SocketAddr,
    up: LinkId,
    down: LinkId,
    alive: bool,
    started: bool,
    flow: NodeFlow,
    counter: Arc<AtomicU64>,
    /// Bytes received on connections that have closed (the node's counter keeps them).
    closed_bytes: u64,
    /// Pieces held per blob; `None` before the host started on it (its server then does not
    /// know the blob).
    have: Vec<Option<Bitfield>>,
    inbound: Vec<Vec<ConnId>>,
    inbound_count: usize,
    downloads: Vec<Option<Download>>,
    super_seed: Option<SuperSeed>,
    /// Peers served per blob, under the agent's cap (the server's real rule).
    blob_peers: Arc<BlobSlots>,
    /// An origin's send slots (`peer_upload_slots`, the server's real rule); `None`: every
    /// connection sends at once.
    turns: Option<turns::Turns>,
    /// Sends in progress per (blob, piece) under an agent's `max_sends_per_piece` (the
    /// server's real rule), and the connections waiting for one to end; `None`: no limit.
    piece_sends: Option<Arc<KeyedSlots<(usize, u32)>>>,
    piece_waiters: Vec<ConnId>,
    lost_at: Option<SimTime>,
}

struct Conn {
    generation: u32,
    live: bool,
    client: usize,
    server: usize,
    blob: usize,
    established: bool,
    /// Requests arrived at the server, not yet served.
    queue: VecDeque<u32>,
    sending: Option<u32>,
    flow: Option<FlowId>,
    /// Bytes of pieces sent in full on this connection.
    bytes_done: u64,
    /// The pieces the origin's super-seeding counts this client as holding.
    counted: Option<Bitfield>,
    _slot: Option<ConnectionSlot>,
    /// The server's count of this blob's peers, held while the connection is up.
    _blob_slot: Option<KeyedSlot<Digest>>,
    /// Holds one of the server's send slots (`Node::turns`), or waits in line since then.
    turn: bool,
    waiting_since: Option<SimTime>,
    /// Keep-alive bytes the server sent while this connection waited for a slot, past waits.
    reminder_bytes: u64,
    /// The send in progress holds its turn (`turn`) and counts against its piece's limit
    /// (`max_sends_per_piece`) for `SEND_HOLD` at most: its id, and its place among the
    /// piece's sends if it took one (freed when dropped).
    held_send: Option<(u64, Option<PieceSlot>)>,
}

/// Counters of the whole run.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub origin_bytes: u64,
    pub fallback_bytes: u64,
    pub duplicate_bytes: u64,
    /// Bytes of pieces cut off mid-transfer when their connection closed (a peer traded
    /// away, a host that finished or left): sent, but never a whole piece.
    pub wasted_bytes: u64,
    pub piece_timeouts: u64,
    /// Peers traded away by rotation: at once (nothing in flight), or retired.
    pub rotations: Rotations,
    /// Requests for a piece already asked of another peer, by why.
    pub duplicate_requests: DuplicateRequests,
    pub declines: u64,
    pub connects: u64,
    pub events: u64,
    pub rate_recomputes: u64,
}

/// One run of a fleet; see the module docs.
pub struct Sim {
    cfg: FleetConfig,
    base: Instant,
    now: SimTime,
    seq: u64,
    events: BinaryHeap<Reverse<Scheduled>>,
    net: Network<Owner>,
    nodes: Vec<Node>,
    conns: Vec<Conn>,
    free_conns: Vec<u32>,
    /// Ids of sends held against a piece's limit.
    next_send_id: u64,
    metas: Vec<Metainfo>,
    /// Pieces of every blob of the image together.
    image_pieces: u32,
    tracker: PeerStore,
    tracker_rng: StdRng,
    by_addr: HashMap<SocketAddr, usize>,
    fills: Vec<(usize, usize)>,
    recompute_pending: bool,
    last_recompute: SimTime,
    rtt: SimTime,
    half_rtt: SimTime,
    started_at: Vec<Option<SimTime>>,
    finished_at: Vec<Option<SimTime>>,
    /// Per host: fresh pieces received, and when the first and the half arrived (`--trace`).
    progress: Vec<Progress>,
    failed: Vec<bool>,
    blobs_left: Vec<usize>,
    running: usize,
    pub counters: Counters,
}

fn nanos(d: Duration) -> SimTime {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Sim {
    /// Set up a fleet: origins first (nodes `0..origins`), then the hosts.
    pub fn new(cfg: FleetConfig) -> Result<Sim, SimError> {
        if cfg.hosts.is_empty() || cfg.layers.is_empty() || cfg.layers.contains(&0) {
            return Err(SimError::Empty);
        }
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let metas = cfg
            .layers
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let piece = cfg.piece_length.unwrap_or_else(|| piece_length_for(size));
                let digest = Digest::of(Algorithm::Sha256, format!("shoal-sim layer {i}").as_bytes());
                Metainfo::unverifiable(digest, size, piece)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut net = Network::new();
        let origins = cfg.origins.max(1);
        let mut nodes = Vec::with_capacity(origins + cfg.hosts.len());
        let mut by_addr = HashMap::new();
        for i in 0..origins + cfg.hosts.len() {
            let origin = i < origins;
            let bps = if origin { cfg.origin_bps } else { cfg.host_bps * cfg.hosts[i - origins].rate_factor };
            let bytes_per_sec = bps / 8.0 * cfg.efficiency;
            let peer_id = PeerId(rng.random());
            let addr = SocketAddr::from((Ipv4Addr::from(0x0a00_0000u32 + i as u32 + 1), PEER_PORT));
            by_addr.insert(addr, i);
            let flow = NodeFlow::new(cfg.max_outbound);
            let counter = flow.counter();
            let blobs = metas.len();
            nodes.push(Node {
                origin,
                peer_id,
                hex: peer_id.to_string(),
                addr,
                up: net.add_link(bytes_per_sec),
                down: net.add_link(bytes_per_sec),
                alive: origin,
                started: origin,
                flow,
                counter,
                closed_bytes: 0,
                have: metas.iter().map(|m| origin.then(|| Bitfield::full(m.piece_count()))).collect(),
                inbound: vec![Vec::new(); blobs],
                inbound_count: 0,
                downloads: (0..blobs).map(|_| None).collect(),
                super_seed: origin.then(|| SuperSeed::new(SUPER_SEED_WINDOW)),
                blob_peers: BlobSlots::new(match cfg.max_peers_per_blob {
                    Some(n) if !origin => n,
                    _ => usize::MAX,
                }),
                turns: if origin { cfg.origin_upload_slots } else { cfg.agent_upload_slots }
                    .map(turns::Turns::new),
                piece_sends: cfg.max_sends_per_piece.filter(|_| !origin).map(KeyedSlots::new),
                piece_waiters: Vec::new(),
                lost_at: None,
            });
        }
        let hosts = cfg.hosts.len();
        let limits = PeerStoreLimits { ttl: ANNOUNCE_INTERVAL * 3, ..PeerStoreLimits::default() };
        let rtt = nanos(cfg.rtt);
        let mut sim = Sim {
            base: Instant::now(),
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            net,
            nodes,
            conns: Vec::new(),
            free_conns: Vec::new(),
            next_send_id: 0,
            image_pieces: metas.iter().map(Metainfo::piece_count).sum(),
            metas,
            tracker: PeerStore::new(limits),
            tracker_rng: StdRng::seed_from_u64(rng.random()),
            by_addr,
            fills: Vec::new(),
            recompute_pending: false,
            last_recompute: 0,
            rtt,
            half_rtt: rtt / 2,
            started_at: vec![None; hosts],
            finished_at: vec![None; hosts],
            progress: vec![Progress::default(); hosts],
            failed: vec![false; hosts],
            blobs_left: vec![0; hosts],
            running: hosts,
            counters: Counters::default(),
            cfg,
        };
        for (h, spec) in sim.cfg.hosts.clone().iter().enumerate() {
            let node = origins + h;
            sim.schedule(nanos(spec.start), Ev::Start(node));
            if let Some(leave) = spec.leave_at {
                sim.schedule(nanos(leave), Ev::Leave(node));
            }
        }
        if sim.cfg.trace {
            sim.schedule(0, Ev::Trace);
        }
        if let Some(at) = sim.cfg.origin_lost_at {
            sim.schedule(nanos(at), Ev::Leave(0));
        }
        Ok(sim)
    }

    fn origins(&self) -> usize {
        self.cfg.origins.max(1)
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.now)
    }

    fn schedule(&mut self, at: SimTime, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse(Scheduled { at, seq: self.seq, ev }));
    }

    fn after(&mut self, delay: SimTime, ev: Ev) {
        self.schedule(self.now.saturating_add(delay), ev);
    }

    /// Run until every host finished, failed or left, or the time limit.
    pub fn run(mut self) -> Outcome {
        let limit = nanos(self.cfg.time_limit);
        while let Some(Reverse(next)) = self.events.pop() {
            if next.at > limit || self.running == 0 {
                break;
            }
            self.now = next.at;
            self.counters.events += 1;
            self.handle(next.ev);
            self.flush_fills();
            self.maybe_recompute();
        }
        if self.cfg.trace {
            self.trace_milestones();
        }
        self.outcome()
    }

    fn maybe_recompute(&mut self) {
        if !self.net.is_dirty() || self.recompute_pending {
            return;
        }
        if self.cfg.rate_epoch.is_zero() {
            if self.events.peek().is_none_or(|Reverse(e)| e.at > self.now) {
                self.recompute();
            }
            return;
        }
        let at = self.now.max(self.last_recompute + nanos(self.cfg.rate_epoch));
        self.recompute_pending = true;
        self.schedule(at, Ev::Recompute);
    }

    /// Until when completions are scheduled: the next step in stepped mode, any time in
    /// exact mode (see [`Network::recompute`]).
    fn horizon(&self) -> Option<SimTime> {
        let epoch = nanos(self.cfg.rate_epoch);
        (epoch > 0).then(|| self.last_recompute + epoch)
    }

    fn recompute(&mut self) {
        self.recompute_pending = false;
        self.last_recompute = self.now;
        self.counters.rate_recomputes += 1;
        let horizon = self.horizon();
        for c in self.net.recompute(self.now, horizon) {
            self.schedule(c.at, Ev::FlowDone(c));
        }
        // Stepped mode: step on while anything flows, to hand out the next completions.
        if let Some(next) = horizon.filter(|_| self.net.flow_count() > 0) {
            self.recompute_pending = true;
            self.schedule(next, Ev::Recompute);
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Start(node) => self.start(node),
            Ev::Leave(node) => self.leave(node),
            Ev::Tick(node, blob) => self.tick(node, blob),
            Ev::AnnounceSend(node, blob) => self.announce(node, blob),
            Ev::AnnounceReply(node, blob, peers) => {
                let now = self.instant();
                if let Some(d) = self.download(node, blob) {
                    let actions = d.state.announced(peers, ANNOUNCE_INTERVAL, now);
                    self.act(node, blob, actions);
                    self.want_fill(node, blob);
                }
            }
            Ev::SeedAnnounce(node) => self.seed_announce(node),
            Ev::ConnectDone(c) => self.connect_done(c),
            Ev::RequestArrives(c, index) => {
                let Some(conn) = self.conn_mut(c) else { return };
                conn.queue.push_back(index);
                if conn.sending.is_none() {
                    self.serve_next(c);
                }
            }
            Ev::CancelArrives(c, index) => self.cancel_arrives(c, index),
            Ev::DeclineArrives(c, index) => {
                let now = self.instant();
                let Some((node, blob, server)) = self.conn(c).map(|k| (k.client, k.blob, k.server)) else {
                    return;
                };
                let peer = self.nodes[server].peer_id;
                if let Some(d) = self.download(node, blob) {
                    d.state.declined(peer, index, now);
                    self.want_fill(node, blob);
                }
            }
            Ev::PieceArrives(c, index) => {
                let Some((node, blob, server)) = self.conn(c).map(|k| (k.client, k.blob, k.server)) else {
                    return;
                };
                let from = self.nodes[server].peer_id;
                self.receive(node, blob, from, index);
            }
            Ev::FetchStart { node, blob, index, origin } => self.fetch_start(node, blob, index, origin),
            Ev::FetchArrives(node, blob, index) => self.receive(node, blob, ORIGIN_PEER, index),
            Ev::FetchFailed(node, blob, index) => {
                let now = self.instant();
                let Some(d) = self.download(node, blob) else { return };
                if d.state.fetch_failed(index, "origin unreachable", now).is_err() {
                    self.fail(node);
                } else {
                    self.want_fill(node, blob);
                }
            }
            Ev::FlowDone(done) => {
                if !self.net.is_current(done.flow, done.version) {
                    return;
                }
                match self.net.tag(done.flow) {
                    Some(Owner::Conn(c)) => self.piece_sent(c),
                    Some(Owner::Fetch { node, blob, index, origin }) => {
                        self.net.remove_flow(done.flow);
                        let len = self.piece_len(blob, index);
                        self.counters.origin_bytes += len;
                        self.counters.fallback_bytes += len;
                        let _ = origin;
                        self.after(self.half_rtt, Ev::FetchArrives(node, blob, index));
                    }
                    None => {}
                }
            }
            Ev::Recompute => self.recompute(),
            Ev::Trace => self.trace(),
            Ev::SendHoldOver(c, id) => self.send_hold_over(c, id),
        }
    }

    fn host(&self, node: usize) -> usize {
        node - self.origins()
    }

    fn piece_len(&self, blob: usize, index: u32) -> u64 {
        self.metas[blob].piece_len(index).unwrap_or(0)
    }

    fn download(&mut self, node: usize, blob: usize) -> Option<&mut Download> {
        self.nodes[node].downloads[blob].as_mut()
    }

    fn conn(&self, c: ConnId) -> Option<&Conn> {
        self.conns.get(c.idx as usize).filter(|k| k.live && k.generation == c.generation)
    }

    fn conn_mut(&mut self, c: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(c.idx as usize).filter(|k| k.live && k.generation == c.generation)
    }

    fn want_fill(&mut self, node: usize, blob: usize) {
        if let Some(d) = self.download(node, blob) {
            if !d.fill_pending {
                d.fill_pending = true;
                self.fills.push((node, blob));
            }
        }
    }

    /// What the download loop does after every event: tell the state the node's connection
    /// room, record its bytes in flight and let it request with the node's measured rate.
    fn flush_fills(&mut self) {
        while let Some((node, blob)) = self.fills.pop() {
            let received = self.node_received(node);
            let now = self.instant();
            let n = &mut self.nodes[node];
            n.counter.store(received, Ordering::Relaxed);
            let room = n.flow.connection_room();
            let Some(d) = n.downloads[blob].as_mut() else { continue };
            d.fill_pending = false;
            d.state.set_node_room(room);
            for silent in d.state.take_incast_signs() {
                d.slot.incast(now, silent.ip());
            }
            let view = d.slot.update(now, d.state.in_flight_bytes(), d.state.senders());
            d.state.set_sender_room(view.sender_room);
            let actions = d.state.fill(now, view.rate, view.elsewhere);
            self.counters.duplicate_requests += d.state.take_duplicate_requests();
            self.act(node, blob, actions);
        }
    }

    /// Bytes a connection has delivered so far: all of them (keep-alives too) and those of
    /// pieces, counting the piece under way, as the real connection counts them.
    fn conn_bytes(&self, c: ConnId) -> ConnBytes {
        self.conn(c).map_or(ConnBytes::default(), |k| {
            let pieces = k.bytes_done + k.flow.map_or(0, |f| self.net.sent(f, self.now) as u64);
            ConnBytes { all: pieces + k.keep_alive_bytes(self.now), pieces }
        })
    }

    fn node_received(&self, node: usize) -> u64 {
        let n = &self.nodes[node];
        let open: u64 =
            n.downloads.iter().flatten().flat_map(|d| &d.outbound).map(|&c| self.conn_bytes(c).all).sum();
        n.closed_bytes + open
    }
}

impl Conn {
    /// Keep-alive bytes the server has sent this connection by `now`, while it waited.
    fn keep_alive_bytes(&self, now: SimTime) -> u64 {
        self.reminder_bytes + self.waiting_since.map_or(0, |since| reminder_bytes(since, now))
    }

    /// The connection stops waiting at `now` (if it was): its keep-alives so far are kept.
    /// Returns whether it was waiting.
    fn end_wait(&mut self, now: SimTime) -> bool {
        let Some(since) = self.waiting_since.take() else { return false };
        self.reminder_bytes += reminder_bytes(since, now);
        true
    }
}

/// The keep-alives a server sends a connection that waits for a send slot from `since` to
/// `now` (`server::TURN_REMINDER`), in bytes: the client counts them as signs of life.
fn reminder_bytes(since: SimTime, now: SimTime) -> u64 {
    const KEEP_ALIVE_FRAME: u64 = 4;
    KEEP_ALIVE_FRAME * (now.saturating_sub(since) / nanos(shoal_p2p::server::TURN_REMINDER))
}
