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

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_p2p::metainfo::{piece_length_for, Metainfo};
use shoal_p2p::node::{ConnectionSlot, DownloadSlot, NodeFlow};
use shoal_p2p::server::SuperSeed;
use shoal_p2p::swarm_state::{Action, Stored, SwarmState, ORIGIN_PEER};
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
    FetchStart { node: usize, blob: usize, index: u32, origin: usize },
    FetchArrives(usize, usize, u32),
    FetchFailed(usize, usize, u32),
    FlowDone(Completion),
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
    metas: Vec<Metainfo>,
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
                let piece = piece_length_for(size);
                let digest = Digest::of(Algorithm::Sha256, format!("shoal-sim layer {i}").as_bytes());
                Metainfo::new(
                    digest,
                    size,
                    piece,
                    vec![0; 32 * (size.div_ceil(piece) as usize).saturating_sub(1)],
                )
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
            Ev::CancelArrives(c, index) => {
                if let Some(conn) = self.conn_mut(c) {
                    conn.queue.retain(|&i| i != index);
                }
            }
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
                let Some(d) = self.download(node, blob) else { return };
                if d.state.fetch_failed(index, "origin unreachable").is_err() {
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
            let (rate, elsewhere) = d.slot.update(now, d.state.in_flight_bytes());
            let actions = d.state.fill(now, rate, elsewhere);
            self.act(node, blob, actions);
        }
    }

    /// Bytes a connection has delivered so far, counting the piece under way.
    fn conn_bytes(&self, c: ConnId) -> u64 {
        self.conn(c).map_or(0, |k| k.bytes_done + k.flow.map_or(0, |f| self.net.sent(f, self.now) as u64))
    }

    fn node_received(&self, node: usize) -> u64 {
        let n = &self.nodes[node];
        let open: u64 =
            n.downloads.iter().flatten().flat_map(|d| &d.outbound).map(|&c| self.conn_bytes(c)).sum();
        n.closed_bytes + open
    }

    fn start(&mut self, node: usize) {
        let host = self.host(node);
        self.nodes[node].alive = true;
        self.nodes[node].started = true;
        self.started_at[host] = Some(self.now);
        self.blobs_left[host] = self.metas.len();
        let now = self.instant();
        for blob in 0..self.metas.len() {
            let meta = &self.metas[blob];
            let have = Bitfield::new(meta.piece_count());
            let n = &self.nodes[node];
            let rng = StdRng::seed_from_u64(self.cfg.seed ^ ((node as u64) << 20) ^ blob as u64);
            let state = match SwarmState::with_rng(
                self.cfg.scheduler.clone(),
                n.peer_id,
                n.addr,
                meta,
                have.clone(),
                now,
                rng,
            ) {
                Ok(s) => s,
                Err(_) => {
                    self.fail(node);
                    return;
                }
            };
            let actions = state.start();
            let slot = n.flow.join();
            let n = &mut self.nodes[node];
            n.have[blob] = Some(have);
            n.downloads[blob] = Some(Download { state, slot, outbound: Vec::new(), fill_pending: false });
            self.after(nanos(TICK), Ev::Tick(node, blob));
            self.act(node, blob, actions);
            self.want_fill(node, blob);
        }
        self.after(nanos(ANNOUNCE_INTERVAL), Ev::SeedAnnounce(node));
    }

    fn tick(&mut self, node: usize, blob: usize) {
        let Some(d) = self.nodes[node].downloads[blob].as_ref() else { return };
        let received: Vec<(PeerId, u64)> = d
            .outbound
            .iter()
            .filter_map(|&c| self.conn(c).map(|k| (self.nodes[k.server].peer_id, self.conn_bytes(c))))
            .collect();
        let now = self.instant();
        let Some(d) = self.download(node, blob) else { return };
        match d.state.tick(now, &received) {
            Ok(actions) => {
                self.act(node, blob, actions);
                self.after(nanos(TICK), Ev::Tick(node, blob));
                self.want_fill(node, blob);
            }
            Err(_) => self.fail(node),
        }
    }

    /// The origins the tracker lists as seeders: it learns of a lost one only when its
    /// cached list of seeders expires.
    fn origin_seeders(&self) -> Vec<PeerInfo> {
        let ttl = nanos(SEEDER_CACHE_TTL);
        self.nodes[..self.origins()]
            .iter()
            .filter(|n| n.lost_at.is_none_or(|at| self.now < at.saturating_add(ttl)))
            .map(|n| PeerInfo { peer_id: n.hex.clone(), addr: n.addr, complete: true, origin: true })
            .collect()
    }

    fn announce(&mut self, node: usize, blob: usize) {
        if self.download(node, blob).is_none() {
            return;
        }
        let peers = if self.cfg.tracker_dead {
            None
        } else {
            let now = self.instant();
            let origins = self.origin_seeders();
            let (digest, n) = (self.metas[blob].digest(), &self.nodes[node]);
            if self.tracker.announce(digest, &n.hex, n.addr, false, now) {
                Some(self.tracker.handout(
                    digest,
                    &n.hex,
                    &origins,
                    HANDOUT_LIMIT,
                    now,
                    &mut self.tracker_rng,
                ))
            } else {
                None
            }
        };
        self.after(self.rtt, Ev::AnnounceReply(node, blob, peers));
    }

    /// The agent's seeding loop: every interval, announce each complete blob as complete.
    fn seed_announce(&mut self, node: usize) {
        if !self.nodes[node].alive {
            return;
        }
        if !self.cfg.tracker_dead {
            let now = self.instant();
            for blob in 0..self.metas.len() {
                let n = &self.nodes[node];
                if n.have[blob].as_ref().is_some_and(Bitfield::is_complete) {
                    self.tracker.announce(self.metas[blob].digest(), &n.hex, n.addr, true, now);
                }
            }
        }
        self.after(nanos(ANNOUNCE_INTERVAL), Ev::SeedAnnounce(node));
    }

    /// Carry out a download's decisions, as `Swarm::act` does.
    fn act(&mut self, node: usize, blob: usize, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Connect(addr) => self.connect(node, blob, addr),
                Action::Request { peer, index } => match self.conn_to(node, blob, &peer) {
                    Some(c) => self.after(self.half_rtt, Ev::RequestArrives(c, index)),
                    None => {
                        if let Some(d) = self.download(node, blob) {
                            d.state.request_failed(&peer, index);
                        }
                    }
                },
                Action::Cancel { peer, index } => {
                    if let Some(c) = self.conn_to(node, blob, &peer) {
                        self.after(self.half_rtt, Ev::CancelArrives(c, index));
                    }
                }
                Action::TimedOut { peer, index } => {
                    self.counters.piece_timeouts += 1;
                    if let Some(c) = self.conn_to(node, blob, &peer) {
                        self.after(self.half_rtt, Ev::CancelArrives(c, index));
                    }
                }
                Action::Disconnect(peer) => {
                    if let Some(c) = self.conn_to(node, blob, &peer) {
                        self.close(c, false);
                    }
                }
                Action::Fetch { index } => match (0..self.origins()).find(|&o| self.nodes[o].alive) {
                    Some(origin) => self.after(self.half_rtt, Ev::FetchStart { node, blob, index, origin }),
                    None => self.after(self.rtt, Ev::FetchFailed(node, blob, index)),
                },
                Action::Announce { after } => self.after(nanos(after), Ev::AnnounceSend(node, blob)),
            }
        }
    }

    fn conn_to(&self, node: usize, blob: usize, peer: &PeerId) -> Option<ConnId> {
        let d = self.nodes[node].downloads[blob].as_ref()?;
        d.outbound
            .iter()
            .copied()
            .find(|&c| self.conn(c).is_some_and(|k| self.nodes[k.server].peer_id == *peer))
    }

    fn connect(&mut self, node: usize, blob: usize, addr: SocketAddr) {
        let Some(slot) = self.nodes[node].flow.connection_slot() else {
            if let Some(d) = self.download(node, blob) {
                d.state.connect_abandoned(addr);
            }
            return;
        };
        let Some(&server) = self.by_addr.get(&addr) else {
            if let Some(d) = self.download(node, blob) {
                d.state.connect_failed(addr);
            }
            return;
        };
        self.counters.connects += 1;
        let conn = Conn {
            generation: 0,
            live: true,
            client: node,
            server,
            blob,
            established: false,
            queue: VecDeque::new(),
            sending: None,
            flow: None,
            bytes_done: 0,
            counted: None,
            _slot: Some(slot),
        };
        let id = match self.free_conns.pop() {
            Some(idx) => {
                let generation = self.conns[idx as usize].generation.wrapping_add(1);
                self.conns[idx as usize] = Conn { generation, ..conn };
                ConnId { idx, generation }
            }
            None => {
                self.conns.push(conn);
                ConnId { idx: (self.conns.len() - 1) as u32, generation: 0 }
            }
        };
        // TCP's handshake, then the protocol's (both ways).
        self.after(2 * self.rtt, Ev::ConnectDone(id));
    }

    fn connect_done(&mut self, c: ConnId) {
        let Some(conn) = self.conn(c) else { return };
        let (node, server, blob) = (conn.client, conn.server, conn.blob);
        let now = self.instant();
        if self.download(node, blob).is_none() {
            self.free(c);
            return;
        }
        let s = &self.nodes[server];
        let max_inbound = if s.origin { ORIGIN_MAX_INBOUND } else { AGENT_MAX_INBOUND };
        let Some(bitfield) = s.have[blob].clone().filter(|_| s.alive && s.inbound_count < max_inbound) else {
            let addr = s.addr;
            self.free(c);
            if let Some(d) = self.download(node, blob) {
                d.state.connect_failed(addr);
            }
            self.want_fill(node, blob);
            return;
        };
        let (peer, addr) = (s.peer_id, s.addr);
        let counted = match (&s.super_seed, &self.nodes[node].have[blob]) {
            (Some(ss), Some(theirs)) => Some(ss.join(self.metas[blob].digest(), theirs)),
            _ => None,
        };
        let s = &mut self.nodes[server];
        s.inbound_count += 1;
        s.inbound[blob].push(c);
        if let Some(conn) = self.conn_mut(c) {
            conn.established = true;
            conn.counted = counted;
        }
        let Some(d) = self.download(node, blob) else { return };
        if d.state.connected(peer, addr, bitfield, now) {
            d.outbound.push(c);
            self.want_fill(node, blob);
        } else {
            self.close(c, false);
        }
    }

    /// Close a connection. `tell_client`: the server side went away, so the client's state
    /// hears of it (a client that closes it itself already knows).
    fn close(&mut self, c: ConnId, tell_client: bool) {
        let Some(conn) = self.conn(c) else { return };
        let (node, server, blob, established, flow) =
            (conn.client, conn.server, conn.blob, conn.established, conn.flow);
        let bytes = self.conn_bytes(c);
        if let Some(f) = flow {
            self.counters.wasted_bytes += self.net.sent(f, self.now) as u64;
            self.net.remove_flow(f);
        }
        let counted = self.conn_mut(c).and_then(|k| k.counted.take());
        let now = self.instant();
        if established {
            let s = &mut self.nodes[server];
            s.inbound_count -= 1;
            s.inbound[blob].retain(|&x| x != c);
            if let (Some(ss), Some(counted)) = (&s.super_seed, counted) {
                ss.leave(self.metas[blob].digest(), &counted, now);
            }
        }
        let peer = self.nodes[server].peer_id;
        let n = &mut self.nodes[node];
        n.closed_bytes += bytes;
        if let Some(d) = n.downloads[blob].as_mut() {
            d.outbound.retain(|&x| x != c);
            if tell_client {
                d.state.closed(&peer);
                self.want_fill(node, blob);
            }
        }
        self.free(c);
    }

    fn free(&mut self, c: ConnId) {
        if let Some(conn) = self.conn_mut(c) {
            conn.live = false;
            conn.queue.clear();
            conn._slot = None;
            conn.counted = None;
            self.free_conns.push(c.idx);
        }
    }

    /// The server side of a connection takes its next request: an origin may decline it
    /// (super-seeding), else the piece streams on the connection's flow.
    fn serve_next(&mut self, c: ConnId) {
        let now = self.instant();
        loop {
            let Some(conn) = self.conn_mut(c) else { return };
            let Some(index) = conn.queue.pop_front() else {
                conn.sending = None;
                if let Some(f) = conn.flow.take() {
                    self.net.remove_flow(f);
                }
                return;
            };
            let (server, client, blob, flow) = (conn.server, conn.client, conn.blob, conn.flow);
            let s = &self.nodes[server];
            if !s.have[blob].as_ref().is_some_and(|h| h.get(index)) {
                continue;
            }
            if let Some(ss) = &s.super_seed {
                let meta = &self.metas[blob];
                let peer = self.nodes[client].peer_id;
                if !ss.claim(meta.digest(), index, peer, meta.piece_count(), now) {
                    self.counters.declines += 1;
                    self.after(self.half_rtt, Ev::DeclineArrives(c, index));
                    continue;
                }
            }
            let len = self.piece_len(blob, index) as f64;
            match flow {
                Some(f) => {
                    let horizon = self.horizon();
                    if let Some(done) = self.net.next_unit(f, len, self.now, horizon) {
                        self.schedule(done.at, Ev::FlowDone(done));
                    }
                }
                None => {
                    let uses = self.uses(server, client);
                    let f = self.net.add_flow(&uses, len, Owner::Conn(c), self.now);
                    if let Some(conn) = self.conn_mut(c) {
                        conn.flow = Some(f);
                    }
                }
            }
            if let Some(conn) = self.conn_mut(c) {
                conn.sending = Some(index);
            }
            return;
        }
    }

    /// The links a transfer from `from` to `to` loads: data one way, ACKs the other.
    fn uses(&self, from: usize, to: usize) -> [(LinkId, f64); 4] {
        let (f, t, a) = (&self.nodes[from], &self.nodes[to], self.cfg.ack_overhead);
        [(f.up, 1.0), (t.down, 1.0), (t.up, a), (f.down, a)]
    }

    fn piece_sent(&mut self, c: ConnId) {
        let now = self.instant();
        let Some(conn) = self.conn_mut(c) else { return };
        let Some(index) = conn.sending.take() else { return };
        let (server, client, blob) = (conn.server, conn.client, conn.blob);
        let len = self.piece_len(blob, index);
        if let Some(conn) = self.conn_mut(c) {
            conn.bytes_done += len;
        }
        let s = &self.nodes[server];
        if let Some(ss) = &s.super_seed {
            self.counters.origin_bytes += len;
            ss.sent_in_full(self.metas[blob].digest(), index, self.nodes[client].peer_id, now);
        }
        self.after(self.half_rtt, Ev::PieceArrives(c, index));
        self.serve_next(c);
    }

    fn fetch_start(&mut self, node: usize, blob: usize, index: u32, origin: usize) {
        if self.download(node, blob).is_none() {
            return;
        }
        if !self.nodes[origin].alive {
            self.after(self.half_rtt, Ev::FetchFailed(node, blob, index));
            return;
        }
        let uses = self.uses(origin, node);
        let len = self.piece_len(blob, index) as f64;
        self.net.add_flow(&uses, len, Owner::Fetch { node, blob, index, origin }, self.now);
    }

    /// A verified piece reaches `node`'s download, from a peer or the HTTP fallback.
    fn receive(&mut self, node: usize, blob: usize, from: PeerId, index: u32) {
        let now = self.instant();
        let len = self.piece_len(blob, index);
        if self.nodes[node].downloads[blob].is_none() {
            return;
        }
        let Some(have) = self.nodes[node].have[blob].as_mut() else { return };
        let fresh = !have.get(index);
        if fresh {
            let _ = have.set(index);
            self.spread_have(node, blob, index);
        } else {
            self.counters.duplicate_bytes += len;
        }
        let Some(d) = self.download(node, blob) else { return };
        match d.state.stored(from, index, Stored::Ok, now) {
            Ok(actions) => self.act(node, blob, actions),
            Err(_) => {
                self.fail(node);
                return;
            }
        }
        if self.download(node, blob).is_some_and(|d| d.state.is_complete()) {
            self.finish(node, blob);
        } else {
            self.want_fill(node, blob);
        }
    }

    /// `node` got piece `index`: its server tells its downloaders (`have`), and it tells the
    /// origins it is connected to, whose super-seeding counts holders.
    fn spread_have(&mut self, node: usize, blob: usize, index: u32) {
        let peer = self.nodes[node].peer_id;
        let now = self.instant();
        let inbound = self.nodes[node].inbound[blob].clone();
        for c in inbound {
            let Some(client) = self.conn(c).map(|k| k.client) else { continue };
            let Some(d) = self.download(client, blob) else { continue };
            d.state.have(&peer, index, now);
            // The loop runs `fill` after every event; only a `have` that opens a request
            // can change what it decides.
            let picker = d.state.picker();
            if !picker.have().get(index) && picker.in_flight(index) == 0 {
                self.want_fill(client, blob);
            }
        }
        let outbound =
            self.nodes[node].downloads[blob].as_ref().map(|d| d.outbound.clone()).unwrap_or_default();
        for c in outbound {
            let Some(server) = self.conn(c).map(|k| k.server) else { continue };
            let gained = match &self.nodes[server].super_seed {
                Some(ss) => ss.gained(self.metas[blob].digest(), index),
                None => false,
            };
            if gained {
                if let Some(counted) = self.conn_mut(c).and_then(|k| k.counted.as_mut()) {
                    let _ = counted.set(index);
                }
            }
        }
    }

    /// A download completed: its connections close, the node announces itself complete and
    /// goes on seeding.
    fn finish(&mut self, node: usize, blob: usize) {
        let outbound =
            self.nodes[node].downloads[blob].as_ref().map(|d| d.outbound.clone()).unwrap_or_default();
        for c in outbound {
            self.close(c, false);
        }
        self.nodes[node].downloads[blob] = None;
        if !self.cfg.tracker_dead {
            let now = self.instant();
            let n = &self.nodes[node];
            self.tracker.announce(self.metas[blob].digest(), &n.hex, n.addr, true, now);
        }
        let host = self.host(node);
        self.blobs_left[host] = self.blobs_left[host].saturating_sub(1);
        if self.blobs_left[host] == 0 && self.finished_at[host].is_none() {
            self.finished_at[host] = Some(self.now);
            self.running -= 1;
        }
    }

    /// A host's download gave up (the state machine's `Fatal`).
    fn fail(&mut self, node: usize) {
        let host = self.host(node);
        if !self.failed[host] && self.finished_at[host].is_none() {
            self.failed[host] = true;
            self.running -= 1;
        }
        self.drop_downloads(node);
    }

    fn drop_downloads(&mut self, node: usize) {
        for blob in 0..self.metas.len() {
            let outbound =
                self.nodes[node].downloads[blob].as_ref().map(|d| d.outbound.clone()).unwrap_or_default();
            for c in outbound {
                self.close(c, false);
            }
            self.nodes[node].downloads[blob] = None;
        }
    }

    /// A node's process dies: every connection to and from it closes, its HTTP transfers
    /// (as an origin) fail.
    fn leave(&mut self, node: usize) {
        if !self.nodes[node].alive {
            return;
        }
        if !self.nodes[node].origin {
            let host = self.host(node);
            if self.finished_at[host].is_none() && !self.failed[host] {
                self.failed[host] = true;
                self.running -= 1;
            }
        }
        self.drop_downloads(node);
        self.nodes[node].alive = false;
        self.nodes[node].lost_at = Some(self.now);
        for blob in 0..self.metas.len() {
            for c in self.nodes[node].inbound[blob].clone() {
                self.close(c, true);
            }
        }
        // Connections still being set up to it fail when their handshake is due.
        let fetches: Vec<(FlowId, Owner)> =
            self.net.flows_where(|o| matches!(o, Owner::Fetch { origin, .. } if *origin == node));
        for (f, owner) in fetches {
            self.net.remove_flow(f);
            if let Owner::Fetch { node: client, blob, index, .. } = owner {
                self.after(self.half_rtt, Ev::FetchFailed(client, blob, index));
            }
        }
    }

    /// One line a simulated second to stderr: where the fleet's time goes.
    fn trace(&mut self) {
        let origins = self.origins();
        let (mut pieces, mut total, mut conns, mut sending, mut done) = (0u64, 0u64, 0usize, 0usize, 0usize);
        for n in &self.nodes[origins..] {
            for (b, h) in n.have.iter().enumerate() {
                pieces += h.as_ref().map_or(0, |h| u64::from(h.count()));
                total += u64::from(self.metas[b].piece_count());
            }
            for d in n.downloads.iter().flatten() {
                conns += d.outbound.len();
                sending +=
                    d.outbound.iter().filter(|&&c| self.conn(c).is_some_and(|k| k.sending.is_some())).count();
            }
        }
        for f in &self.finished_at {
            done += usize::from(f.is_some());
        }
        let in_flight: u64 = self.nodes[origins..]
            .iter()
            .flat_map(|n| n.downloads.iter().flatten())
            .map(|d| d.state.picker().in_flight_total() as u64)
            .sum();
        // How busy the hosts' links are (of their goodput), and how many uplinks idle.
        let (mut up, mut down) = (vec![0.0f64; self.nodes.len()], vec![0.0f64; self.nodes.len()]);
        for k in self.conns.iter().filter(|k| k.live) {
            if let Some(f) = k.flow {
                let r = self.net.rate(f);
                up[k.server] += r;
                down[k.client] += r;
            }
        }
        let cap = self.cfg.host_bps / 8.0 * self.cfg.efficiency;
        let hosts = (self.nodes.len() - origins).max(1) as f64;
        let up_use: f64 = up[origins..].iter().sum::<f64>() / (cap * hosts);
        let active: Vec<usize> = (origins..self.nodes.len())
            .filter(|&n| self.nodes[n].downloads.iter().any(Option::is_some))
            .collect();
        let down_use = active.iter().map(|&n| down[n]).sum::<f64>() / (cap * active.len().max(1) as f64);
        let idle_up = up[origins..].iter().filter(|&&r| r < cap * 0.05).count();
        eprintln!(
            "trace t={:.1}s pieces={:.3} done={} conns={} sending={} flows={} requests={} origin={:.2}xS declines={} timeouts={} up={:.2} down(active)={:.2} idle_up={}",
            self.now as f64 / NANOS,
            pieces as f64 / total.max(1) as f64,
            done,
            conns,
            sending,
            self.net.flow_count(),
            in_flight,
            self.counters.origin_bytes as f64 / self.cfg.image_bytes() as f64,
            self.counters.declines,
            self.counters.piece_timeouts,
            up_use,
            down_use,
            idle_up,
        );
        self.after(1_000_000_000, Ev::Trace);
    }

    fn outcome(&self) -> Outcome {
        let origins = self.origins();
        let hosts = self
            .cfg
            .hosts
            .iter()
            .enumerate()
            .map(|(h, spec)| {
                let secs = match (self.started_at[h], self.finished_at[h]) {
                    (Some(s), Some(f)) => Some((f - s) as f64 / NANOS),
                    _ => None,
                };
                HostResult {
                    limit_secs: self.cfg.limit_secs(spec.rate_factor),
                    secs,
                    straggler: spec.rate_factor < 1.0,
                    left: spec.leave_at.is_some() && !self.nodes[origins + h].alive,
                }
            })
            .collect();
        Outcome {
            hosts,
            image_bytes: self.cfg.image_bytes(),
            counters: self.counters.clone(),
            sim_secs: self.now as f64 / NANOS,
        }
    }
}
