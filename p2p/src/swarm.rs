//! The download of one blob: the I/O around [`SwarmState`]. One event loop feeds the state
//! machine what happens (connections, pieces stored, tracker answers, a timer with each
//! connection's byte count) and carries out the actions it returns; connections, the tracker,
//! piece verification and origin fetches run as tasks that report back. Every decision
//! (what to request from whom, stalls, fallback, connects) is in `swarm_state`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::announcer::Announcer;
use crate::blob::BlobPieces;
use crate::conn::{self, Command, ConnEvent, ConnId, ConnTimeouts};
use crate::limiter::RateLimiter;
use crate::metrics::SwarmMetrics;
use crate::node::NodeFlow;
use crate::peer::PeerId;
use crate::piece_store::PieceError;
use crate::swarm_state::{
    Action, ConnBytes, DuplicateRequests, Fatal, SchedulerConfig, Stored, SwarmState, ORIGIN_PEER,
};
use crate::tracker_client::{AnnounceRequest, PeerInfo, TrackerClient};

/// Event loop housekeeping period: how often connections' byte counts are sampled.
const TICK: Duration = Duration::from_millis(200);

/// Most queued events handled before the request pipelines are filled again. Connections
/// forward each `have` of a batch as its own event, and a 20-host fleet's downloader hears
/// about a hundred a second: filling after each one (picking, sorting peers) was 6 % of the
/// agent's CPU. One fill after everything queued decides the same requests from the same
/// state; the bound keeps a flood of events from delaying requests for long.
const EVENTS_PER_PASS: usize = 64;

/// Fetches byte ranges of the blob from an origin: the fallback when the swarm stalls.
#[async_trait]
pub trait Fallback: Send + Sync + 'static {
    async fn fetch(&self, offset: u64, len: u64) -> Result<Bytes, String>;
}

/// Tunables of a download; defaults suit a datacenter network.
#[derive(Clone, Debug)]
pub struct SwarmConfig {
    pub peer_id: PeerId,
    /// The address announced to the tracker for our peer listener.
    pub advertise: SocketAddr,
    pub timeouts: ConnTimeouts,
    /// The decisions' tunables (connections, pipelining, fallback, stalls).
    pub scheduler: SchedulerConfig,
}

impl SwarmConfig {
    pub fn new(peer_id: PeerId, advertise: SocketAddr) -> SwarmConfig {
        SwarmConfig {
            peer_id,
            advertise,
            timeouts: ConnTimeouts {
                connect: Duration::from_secs(3),
                handshake: Duration::from_secs(5),
                idle: Duration::from_secs(30),
            },
            scheduler: SchedulerConfig::default(),
        }
    }
}

/// What every download of a node shares.
#[derive(Clone)]
pub struct SwarmDeps {
    /// For metainfo; announces go through `announcer`.
    pub tracker: Arc<TrackerClient>,
    /// The node's announce queue, which batches every download's announces.
    pub announcer: Announcer,
    pub ingress: Arc<RateLimiter>,
    pub metrics: SwarmMetrics,
    /// The node's measured ingress and bytes in flight, shared by its downloads.
    pub node: NodeFlow,
}

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    /// The state machine gave up (a long stall, a failing or lying origin fallback).
    #[error(transparent)]
    Gave(#[from] Fatal),
    #[error("piece storage failed: {0}")]
    Storage(String),
}

impl From<ConnEvent> for Event {
    fn from(event: ConnEvent) -> Event {
        Event::Conn(event)
    }
}

enum Event {
    Conn(ConnEvent),
    Written { from: PeerId, over: Option<SocketAddr>, index: u32, result: Result<bool, PieceError> },
    Announced(Result<Vec<PeerInfo>, String>, Duration),
    Fetched { index: u32, result: Result<Bytes, String> },
}

struct Peer {
    /// The accepted connection to this peer (see [`ConnId`]).
    conn: ConnId,
    /// Where that connection goes.
    addr: SocketAddr,
    commands: mpsc::Sender<Command>,
    received: Arc<AtomicU64>,
    piece_bytes: Arc<AtomicU64>,
}

struct Swarm {
    cfg: SwarmConfig,
    deps: SwarmDeps,
    pieces: Arc<BlobPieces>,
    fallback: Arc<dyn Fallback>,
    state: SwarmState,
    peers: HashMap<PeerId, Peer>,
    events_tx: mpsc::Sender<Event>,
    /// The scheduled (sleeping) announce, cancelled when the download ends: left to run, it
    /// told the tracker "incomplete" after the final "complete" and listed a failed download.
    pending_announce: Option<tokio::task::AbortHandle>,
}

/// Download every missing piece of `pieces`, from peers and, if they stall, from the origin.
/// `readers` carries the piece indexes local readers wait on, which are fetched first.
pub async fn download(
    pieces: Arc<BlobPieces>,
    cfg: SwarmConfig,
    deps: SwarmDeps,
    fallback: Arc<dyn Fallback>,
    mut readers: watch::Receiver<Vec<u32>>,
) -> Result<(), SwarmError> {
    if pieces.is_complete() {
        return Ok(());
    }
    let mut scheduler = cfg.scheduler.clone();
    scheduler.ingress_limit = match (scheduler.ingress_limit, deps.ingress.rate()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let digest = pieces.metainfo().digest().clone();
    let started = Instant::now();
    let mut state =
        SwarmState::new(scheduler, cfg.peer_id, cfg.advertise, pieces.metainfo(), pieces.have(), started)
            .map_err(|e| SwarmError::Storage(e.to_string()))?;
    if let Some(blacklist) = deps.node.blacklist_for(pieces.metainfo(), started) {
        state = state.with_blacklist(blacklist);
    }
    let (events_tx, mut events) = mpsc::channel::<Event>(256);
    let slot = deps.node.join();
    let mut swarm = Swarm {
        cfg,
        deps,
        pieces,
        fallback,
        state,
        peers: HashMap::new(),
        events_tx,
        pending_announce: None,
    };
    swarm.deps.metrics.active_swarms.inc();
    // Readers that were waiting before this download started: `changed` reports only later
    // moves.
    swarm.state.set_readers(readers.borrow_and_update().clone());
    let start = swarm.state.start();
    swarm.act(start);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        if swarm.pieces.is_complete() {
            break Ok(());
        }
        swarm.state.set_node_room(swarm.deps.node.connection_room());
        let now = tokio::select! {
            Some(event) = events.recv() => {
                let now = Instant::now();
                match swarm.handle_queued(event, &mut events, now) {
                    Ok(()) => now,
                    Err(e) => break Err(e),
                }
            }
            changed = readers.changed() => {
                if changed.is_ok() {
                    let positions = readers.borrow_and_update().clone();
                    swarm.state.set_readers(positions);
                }
                Instant::now()
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let received: Vec<(PeerId, ConnBytes)> = swarm
                    .peers
                    .iter()
                    .map(|(id, p)| {
                        let all = p.received.load(Ordering::Relaxed);
                        (*id, ConnBytes { all, pieces: p.piece_bytes.load(Ordering::Relaxed) })
                    })
                    .collect();
                match swarm.state.tick(now, &received) {
                    Ok(actions) => swarm.act(actions),
                    Err(e) => break Err(e.into()),
                }
                let traded = swarm.state.take_rotations();
                let rotations = &swarm.deps.metrics.peer_rotations;
                rotations.with_label_values(&["immediate"]).inc_by(traded.immediate);
                rotations.with_label_values(&["retiring"]).inc_by(traded.retiring);
                now
            }
        };
        for silent in swarm.state.take_incast_signs() {
            if let Some(cap) = slot.incast(now, silent.ip()) {
                swarm.deps.metrics.incast_backoffs.inc();
                tracing::debug!(%digest, cap, %silent, "incast: fewer peers may send at once");
            }
        }
        let view = slot.update(now, swarm.state.in_flight_bytes(), swarm.state.senders());
        swarm.state.set_sender_room(view.sender_room);
        let actions = swarm.state.fill(now, view.rate, view.elsewhere);
        swarm.act(actions);
        let duplicates = swarm.state.take_duplicate_requests();
        if duplicates != DuplicateRequests::default() {
            let requests = &swarm.deps.metrics.duplicate_requests;
            requests.with_label_values(&["late"]).inc_by(duplicates.late);
            requests.with_label_values(&["faster"]).inc_by(duplicates.faster);
        }
    };
    drop(slot);
    let blacklist = swarm.state.take_blacklist();
    swarm.deps.node.keep_blacklist(swarm.pieces.metainfo(), blacklist, Instant::now());
    swarm.deps.metrics.active_swarms.dec();
    // Dropping the command senders closes every connection.
    for _ in swarm.peers.drain() {
        swarm.deps.metrics.connections.with_label_values(&["out"]).dec();
    }
    if let Some(pending) = swarm.pending_announce.take() {
        pending.abort();
    }
    swarm.announce_final(result.is_ok());
    result
}

impl Swarm {
    /// Feed `first` and then whatever else is already queued (up to [`EVENTS_PER_PASS`]) to
    /// the state machine, carrying out its decisions after each; the caller then fills the
    /// request pipelines once for all of them.
    fn handle_queued(
        &mut self,
        first: Event,
        events: &mut mpsc::Receiver<Event>,
        now: Instant,
    ) -> Result<(), SwarmError> {
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(event) = next.take() {
            let actions = self.handle(event, now)?;
            self.act(actions);
            handled += 1;
            if handled < EVENTS_PER_PASS {
                next = events.try_recv().ok();
            }
        }
        Ok(())
    }

    /// Feed one event to the state machine; returns what it decided.
    fn handle(&mut self, event: Event, now: Instant) -> Result<Vec<Action>, SwarmError> {
        match event {
            Event::Conn(ConnEvent::Connected {
                peer,
                conn,
                addr,
                bitfield,
                commands,
                received,
                piece_bytes,
            }) => {
                // Dropping `commands` of a refused connection closes it.
                if self.state.connected(peer, addr, bitfield, now) {
                    tracing::trace!(%peer, %addr, "peer connected");
                    self.deps.metrics.connections.with_label_values(&["out"]).inc();
                    self.peers.insert(peer, Peer { conn, addr, commands, received, piece_bytes });
                }
            }
            Event::Conn(ConnEvent::ConnectFailed { addr, reason }) => {
                tracing::debug!(%addr, %reason, "peer connect failed");
                self.state.connect_failed(addr);
            }
            Event::Conn(event) if !self.speaks_for_its_peer(&event) => {
                // A refused connection (a duplicate of a connected peer's id), or one the
                // swarm dropped, reporting after the fact: neither is its peer's now.
                if let ConnEvent::Closed { peer, reason, .. } = event {
                    tracing::debug!(%peer, %reason, "a connection that was not the peer's closed");
                }
            }
            Event::Conn(ConnEvent::Have { peer, index, .. }) => self.state.have(&peer, index, now),
            Event::Conn(ConnEvent::Declined { peer, index, .. }) => self.state.declined(peer, index, now),
            Event::Conn(ConnEvent::BadPiece { peer, index, .. }) => {
                let over = self.peers.get(&peer).map(|p| p.addr);
                tracing::warn!(%peer, ?over, index, "peer sent a piece of the wrong length; blacklisted");
                return Ok(self.state.stored(peer, index, Stored::BadPiece { over }, now)?);
            }
            Event::Conn(ConnEvent::Piece { peer, index, data, .. }) => {
                tracing::trace!(%peer, index, "piece received");
                let over = self.peers.get(&peer).map(|p| p.addr);
                self.store(peer, over, index, data)
            }
            Event::Conn(ConnEvent::Closed { peer, reason, .. }) => {
                tracing::debug!(%peer, %reason, "peer connection closed");
                self.state.closed(&peer);
                self.forget(&peer);
            }
            Event::Written { from, over, index, result } => {
                let outcome = match result {
                    Ok(_) => Stored::Ok,
                    Err(PieceError::HashMismatch { .. }) => {
                        if from != ORIGIN_PEER {
                            tracing::warn!(peer = %from, ?over, index, "peer sent a bad piece; blacklisted");
                        }
                        Stored::BadPiece { over }
                    }
                    Err(e) => return Err(SwarmError::Storage(e.to_string())),
                };
                return Ok(self.state.stored(from, index, outcome, now)?);
            }
            Event::Announced(result, interval) => {
                let peers = match result {
                    Ok(peers) => Some(peers),
                    Err(e) => {
                        tracing::debug!(error = %e, "announce failed");
                        None
                    }
                };
                return Ok(self.state.announced(peers, interval, now));
            }
            Event::Fetched { index, result } => match result {
                Ok(data) => self.store(ORIGIN_PEER, None, index, data),
                Err(e) => {
                    tracing::warn!(index, error = %e, "origin fallback fetch failed");
                    self.state.fetch_failed(index, &e, now)?;
                }
            },
        }
        Ok(Vec::new())
    }

    /// Carry out the state machine's decisions.
    fn act(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Connect(addr) => self.connect(addr),
                Action::Request { peer, index } => {
                    tracing::trace!(%peer, index, "piece requested");
                    let sent = self.peers.get(&peer).map(|p| p.commands.try_send(Command::Request(index)));
                    if !matches!(sent, Some(Ok(()))) {
                        self.state.request_failed(&peer, index);
                    }
                }
                Action::Cancel { peer, index } => {
                    tracing::trace!(%peer, index, "piece request cancelled");
                    self.cancel(&peer, index)
                }
                Action::TimedOut { peer, index } => {
                    tracing::info!(%peer, index, "piece request timed out: no bytes from the peer");
                    self.deps.metrics.piece_timeouts.inc();
                    self.cancel(&peer, index);
                }
                Action::Disconnect(peer) => self.forget(&peer),
                Action::Fetch { index } => self.fetch(index),
                Action::Announce { after } => self.announce(after),
            }
        }
    }

    fn cancel(&self, peer: &PeerId, index: u32) {
        if let Some(p) = self.peers.get(peer) {
            let _ = p.commands.try_send(Command::Cancel(index));
        }
    }

    /// Drop a connection (closing it, if still open).
    /// Whether `event` comes from its peer's accepted connection (a connection's first event,
    /// `Connected` or `ConnectFailed`, is always taken).
    fn speaks_for_its_peer(&self, event: &ConnEvent) -> bool {
        let (peer, conn) = match event {
            ConnEvent::Connected { .. } | ConnEvent::ConnectFailed { .. } => return true,
            ConnEvent::Have { peer, conn, .. }
            | ConnEvent::Declined { peer, conn, .. }
            | ConnEvent::BadPiece { peer, conn, .. }
            | ConnEvent::Piece { peer, conn, .. }
            | ConnEvent::Closed { peer, conn, .. } => (peer, *conn),
        };
        self.peers.get(peer).is_some_and(|p| p.conn == conn)
    }

    fn forget(&mut self, peer: &PeerId) {
        if self.peers.remove(peer).is_some() {
            self.deps.metrics.connections.with_label_values(&["out"]).dec();
        }
    }

    fn connect(&mut self, addr: SocketAddr) {
        // The slot is held for the attempt and the connection's whole life (the task's).
        let Some(slot) = self.deps.node.connection_slot() else {
            self.state.connect_abandoned(addr);
            return;
        };
        let events = self.events_tx.clone();
        let (me, pieces, ingress, timeouts) =
            (self.cfg.peer_id, self.pieces.clone(), self.deps.ingress.clone(), self.cfg.timeouts);
        let node_received = self.deps.node.counter();
        tokio::spawn(async move {
            let _slot = slot;
            conn::run(addr, me, pieces, ingress, node_received, timeouts, events).await;
        });
    }

    fn fetch(&self, index: u32) {
        let Some((offset, len)) = self.pieces.metainfo().piece_range(index) else { return };
        let fallback = self.fallback.clone();
        let events = self.events_tx.clone();
        let ingress = self.deps.ingress.clone();
        tokio::spawn(async move {
            // Bytes from the origin count against the node's ingress limit too.
            ingress.acquire(len).await;
            let result = fallback.fetch(offset, len).await;
            let _ = events.send(Event::Fetched { index, result }).await;
        });
    }

    fn announce(&mut self, after: Duration) {
        let announcer = self.deps.announcer.clone();
        let req = AnnounceRequest {
            digest: self.pieces.metainfo().digest().clone(),
            peer_id: self.cfg.peer_id.to_string(),
            addr: self.cfg.advertise,
            complete: false,
            stopped: false,
        };
        let events = self.events_tx.clone();
        if let Some(previous) = self.pending_announce.take() {
            previous.abort();
        }
        let task = tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let (result, interval) = match announcer.announce(req).await {
                Ok(r) => (Ok(r.peers), Duration::from_secs(r.interval_secs.clamp(1, 300))),
                Err(e) => (Err(e.to_string()), Duration::from_secs(3)),
            };
            let _ = events.send(Event::Announced(result, interval)).await;
        });
        self.pending_announce = Some(task.abort_handle());
    }

    /// Tell the tracker how the download ended (best effort, in the background): a seeder now,
    /// or, failed, no longer a peer of the blob.
    fn announce_final(&self, complete: bool) {
        let announcer = self.deps.announcer.clone();
        let req = AnnounceRequest {
            digest: self.pieces.metainfo().digest().clone(),
            peer_id: self.cfg.peer_id.to_string(),
            addr: self.cfg.advertise,
            complete,
            stopped: !complete,
        };
        tokio::spawn(async move {
            let _ = announcer.announce(req).await;
        });
    }

    /// Verify and write a piece on the blocking pool; the result comes back as an event.
    /// Metrics are counted here, not in the event loop, which may already have finished when
    /// the last piece's event arrives.
    /// Verify and write a piece from `from`, which came over the connection to `over`.
    fn store(&self, from: PeerId, over: Option<SocketAddr>, index: u32, data: Bytes) {
        let pieces = self.pieces.clone();
        let events = self.events_tx.clone();
        let metrics = self.deps.metrics.clone();
        let len = data.len() as u64;
        tokio::spawn(async move {
            let result = tokio::task::spawn_blocking(move || {
                let result = pieces.write_piece(index, &data);
                if let Ok(true) = result {
                    pieces.keep_verified(index, data);
                }
                result
            })
            .await
            .unwrap_or_else(|e| Err(PieceError::Io(std::io::Error::other(e.to_string()))));
            match &result {
                Ok(true) => {
                    metrics.pieces_verified.inc();
                    let source = if from == ORIGIN_PEER { "origin" } else { "peer" };
                    metrics.received_bytes.with_label_values(&[source]).inc_by(len);
                }
                Ok(false) => metrics.duplicate_bytes.inc_by(len),
                Err(PieceError::HashMismatch { .. }) => metrics.pieces_rejected.inc(),
                Err(_) => {}
            }
            let _ = events.send(Event::Written { from, over, index, result }).await;
        });
    }
}

#[cfg(test)]
mod tests;
