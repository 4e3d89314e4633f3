//! The download of one blob: a single event loop owns the swarm's state (picker, blacklist,
//! connections) while connections, the tracker and origin fetches run as tasks that report
//! back. When the swarm makes no progress, an origin joins as a pseudo-peer over HTTP ranges,
//! so a pull never waits on the swarm alone.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::bitfield::Bitfield;
use crate::blacklist::{Blacklist, BlacklistConfig};
use crate::blob::BlobPieces;
use crate::conn::{self, Command, ConnEvent, ConnTimeouts};
use crate::limiter::RateLimiter;
use crate::metrics::SwarmMetrics;
use crate::peer::PeerId;
use crate::picker::{PickerConfig, PiecePicker};
use crate::piece_store::PieceError;
use crate::tracker_client::{AnnounceRequest, PeerInfo, TrackerClient};

/// The pseudo-peer id of the HTTP origin fallback inside the picker.
const ORIGIN_PEER: PeerId = PeerId([0xff; 20]);
/// Event loop housekeeping period.
const TICK: Duration = Duration::from_millis(200);
/// How long a piece an origin declined is not asked of an origin again.
const DECLINE_BACKOFF: Duration = Duration::from_secs(2);

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
    /// Outbound connections per blob.
    pub max_connections: usize,
    /// Requests in flight per peer.
    pub pipeline: usize,
    /// Requests in flight to an origin while other peers are connected too: origins are the
    /// seeders of last resort, so the swarm should carry most of the load.
    pub origin_pipeline: usize,
    /// No new piece for this long (or no peers at all) brings in the origin fallback.
    pub fallback_after: Duration,
    /// Ranges fetched from the origin at once.
    pub fallback_parallel: usize,
    /// No new piece from anywhere for this long fails the download.
    pub stall_timeout: Duration,
    pub timeouts: ConnTimeouts,
    pub picker: PickerConfig,
    pub blacklist: BlacklistConfig,
}

impl SwarmConfig {
    pub fn new(peer_id: PeerId, advertise: SocketAddr) -> SwarmConfig {
        SwarmConfig {
            peer_id,
            advertise,
            max_connections: 10,
            pipeline: 4,
            origin_pipeline: 1,
            fallback_after: Duration::from_secs(3),
            fallback_parallel: 4,
            stall_timeout: Duration::from_secs(60),
            timeouts: ConnTimeouts {
                connect: Duration::from_secs(3),
                handshake: Duration::from_secs(5),
                idle: Duration::from_secs(30),
            },
            picker: PickerConfig::default(),
            blacklist: BlacklistConfig::default(),
        }
    }
}

/// Requests in flight may add up to this much of the node's ingress limit. More would wait
/// behind the node's own limit and outlive their deadlines, which looks like slow peers: with
/// 16 agents at 10 MiB/s, 4 requests to each of 10 peers queued 4 s of data, hundreds of
/// requests timed out, good peers were dropped and downloads fell back to the origin. Less
/// leaves uploaders idle between requests: the same fleet gave p99 1.21-1.31 × ideal with 1 s
/// and 1.12-1.18 with 2 s (requests wait up to 2 s in a busy peer's queue).
pub const IN_FLIGHT_HORIZON: Duration = Duration::from_secs(2);

/// The most requests a download keeps in flight across all its peers: enough pieces to
/// fill [`IN_FLIGHT_HORIZON`] of the ingress `rate` (bytes/s), at least 2; no cap without a
/// limit.
pub fn in_flight_cap(rate: Option<u64>, piece_length: u64) -> usize {
    let Some(rate) = rate.filter(|r| *r > 0) else { return usize::MAX };
    let bytes = rate as f64 * IN_FLIGHT_HORIZON.as_secs_f64();
    let pieces = (bytes / piece_length.max(1) as f64).ceil();
    // Bounded by the line above for any sane rate; `as` saturates for absurd ones.
    (pieces as usize).max(2)
}

/// How long the requests a download keeps in flight take to pass the node's own ingress
/// limit: a piece may arrive that much later than it would unlimited, so deadlines get it on
/// top. About [`IN_FLIGHT_HORIZON`], more where the 2-piece minimum exceeds it (large pieces
/// at a low rate); zero without a limit.
pub fn in_flight_window(rate: Option<u64>, piece_length: u64) -> Duration {
    let Some(rate) = rate.filter(|r| *r > 0) else { return Duration::ZERO };
    let pieces = in_flight_cap(Some(rate), piece_length) as f64;
    Duration::try_from_secs_f64(pieces * piece_length as f64 / rate as f64).unwrap_or(Duration::MAX)
}

/// What every download of a node shares.
#[derive(Clone)]
pub struct SwarmDeps {
    pub tracker: Arc<TrackerClient>,
    pub ingress: Arc<RateLimiter>,
    pub metrics: SwarmMetrics,
}

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error("no progress for {0:?} from peers or origin ({1})")]
    Stalled(Duration, String),
    #[error("origin fallback failed: {0}")]
    Fallback(String),
    #[error("piece storage failed: {0}")]
    Storage(String),
}

enum Event {
    Conn(ConnEvent),
    Written { from: PeerId, index: u32, result: Result<bool, PieceError> },
    Announced(Result<Vec<PeerInfo>, String>, Duration),
    Fetched { index: u32, result: Result<Bytes, String> },
}

struct Peer {
    commands: mpsc::Sender<Command>,
}

struct Swarm {
    cfg: SwarmConfig,
    deps: SwarmDeps,
    pieces: Arc<BlobPieces>,
    fallback: Arc<dyn Fallback>,
    picker: PiecePicker,
    /// Requests in flight at most, across peers (see [`in_flight_cap`]).
    max_in_flight: usize,
    blacklist: Blacklist,
    peers: HashMap<PeerId, Peer>,
    /// Connected peers that are origins (from the tracker's handout).
    origins: HashSet<PeerId>,
    /// Pieces an origin declined recently (it sent them to another peer); not asked again
    /// of an origin until the swarm had a chance to pass them on.
    declined: HashMap<u32, Instant>,
    /// Pieces a peer declined recently (busy or super-seeding), not asked of it again yet.
    declined_by: HashMap<(PeerId, u32), Instant>,
    connecting: HashSet<SocketAddr>,
    candidates: Vec<PeerInfo>,
    fallback_active: bool,
    fallback_failures: u32,
    announced_once: bool,
    /// Announces answered so far; the first few come quicker so a fleet that starts together
    /// finds each other before leaning on the origin.
    announces: u32,
    last_progress: Instant,
    events_tx: mpsc::Sender<Event>,
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
    let (rate, piece_length) = (deps.ingress.rate(), pieces.metainfo().piece_length());
    let max_in_flight = in_flight_cap(rate, piece_length);
    let mut picker_cfg = cfg.picker.clone();
    picker_cfg.request_timeout_base =
        picker_cfg.request_timeout_base.saturating_add(in_flight_window(rate, piece_length));
    let picker = PiecePicker::new(pieces.metainfo(), pieces.have(), picker_cfg)
        .map_err(|e| SwarmError::Storage(e.to_string()))?;
    let (events_tx, mut events) = mpsc::channel::<Event>(256);
    let blacklist = Blacklist::new(cfg.blacklist.clone());
    let mut swarm = Swarm {
        cfg,
        deps,
        pieces,
        fallback,
        picker,
        max_in_flight,
        blacklist,
        peers: HashMap::new(),
        origins: HashSet::new(),
        declined: HashMap::new(),
        declined_by: HashMap::new(),
        connecting: HashSet::new(),
        candidates: Vec::new(),
        fallback_active: false,
        fallback_failures: 0,
        announced_once: false,
        announces: 0,
        last_progress: Instant::now(),
        events_tx,
    };
    swarm.deps.metrics.active_swarms.inc();
    swarm.announce(Duration::ZERO);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        if swarm.pieces.is_complete() {
            break Ok(());
        }
        tokio::select! {
            Some(event) = events.recv() => {
                if let Err(e) = swarm.handle(event) {
                    break Err(e);
                }
            }
            changed = readers.changed() => {
                if changed.is_ok() {
                    let positions = readers.borrow_and_update().clone();
                    swarm.picker.set_reader_positions(positions);
                }
            }
            _ = tick.tick() => {
                if let Err(e) = swarm.housekeeping() {
                    break Err(e);
                }
            }
        }
        swarm.fill_requests();
    };
    swarm.deps.metrics.active_swarms.dec();
    // Dropping the command senders closes every connection.
    swarm.peers.clear();
    if result.is_ok() {
        swarm.announce_final();
    }
    result
}

impl Swarm {
    fn announce(&self, after: Duration) {
        let tracker = self.deps.tracker.clone();
        let req = AnnounceRequest {
            digest: self.pieces.metainfo().digest().clone(),
            peer_id: self.cfg.peer_id.to_string(),
            addr: self.cfg.advertise,
            complete: false,
            stopped: false,
        };
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let (result, interval) = match tracker.announce(&req).await {
                Ok(r) => (Ok(r.peers), Duration::from_secs(r.interval_secs.clamp(1, 300))),
                Err(e) => (Err(e.to_string()), Duration::from_secs(3)),
            };
            let _ = events.send(Event::Announced(result, interval)).await;
        });
    }

    /// Tell the tracker we are a seeder now (best effort, in the background).
    fn announce_final(&self) {
        let tracker = self.deps.tracker.clone();
        let req = AnnounceRequest {
            digest: self.pieces.metainfo().digest().clone(),
            peer_id: self.cfg.peer_id.to_string(),
            addr: self.cfg.advertise,
            complete: true,
            stopped: false,
        };
        tokio::spawn(async move {
            let _ = tracker.announce(&req).await;
        });
    }

    fn handle(&mut self, event: Event) -> Result<(), SwarmError> {
        let now = Instant::now();
        match event {
            Event::Conn(ConnEvent::Connected { peer, addr, bitfield, commands }) => {
                self.connecting.remove(&addr);
                if self.blacklist.is_banned(&peer, now)
                    || self.peers.contains_key(&peer)
                    || peer == self.cfg.peer_id
                {
                    return Ok(()); // dropping `commands` closes it
                }
                if self.picker.add_peer(peer, bitfield).is_ok() {
                    self.deps.metrics.connections.with_label_values(&["out"]).inc();
                    self.peers.insert(peer, Peer { commands });
                    if self.candidates.iter().any(|c| c.addr == addr && c.origin) {
                        self.origins.insert(peer);
                    }
                }
            }
            Event::Conn(ConnEvent::ConnectFailed { addr, reason }) => {
                tracing::debug!(%addr, %reason, "peer connect failed");
                self.connecting.remove(&addr);
                self.candidates.retain(|c| c.addr != addr);
            }
            Event::Conn(ConnEvent::Have { peer, index }) => {
                let _ = self.picker.peer_has(&peer, index);
            }
            Event::Conn(ConnEvent::Declined { peer, index }) => {
                self.picker.failed(&peer, index);
                self.declined.insert(index, now);
                self.declined_by.insert((peer, index), now);
            }
            Event::Conn(ConnEvent::Piece { peer, index, data }) => self.store(peer, index, data),
            Event::Conn(ConnEvent::Closed { peer, reason }) => {
                tracing::debug!(%peer, %reason, "peer connection closed");
                self.drop_peer(&peer);
            }
            Event::Written { from, index, result } => match result {
                Ok(_) => {
                    self.last_progress = now;
                    for other in self.picker.received(&from, index) {
                        if let Some(p) = self.peers.get(&other) {
                            let _ = p.commands.try_send(Command::Cancel(index));
                        }
                    }
                    if from == ORIGIN_PEER {
                        self.fallback_failures = 0;
                    } else {
                        self.blacklist.delivered(&from);
                    }
                }
                Err(PieceError::HashMismatch { .. }) => {
                    self.picker.failed(&from, index);
                    if from != ORIGIN_PEER {
                        tracing::warn!(peer = %from, index, "peer sent a bad piece; blacklisted");
                        self.blacklist.bad_piece(from, now);
                        self.drop_peer(&from);
                    } else {
                        return Err(SwarmError::Fallback(format!("origin sent a bad piece {index}")));
                    }
                }
                Err(e) => return Err(SwarmError::Storage(e.to_string())),
            },
            Event::Announced(result, interval) => {
                self.announced_once = true;
                match result {
                    Ok(peers) => {
                        for p in peers {
                            if !self.candidates.iter().any(|c| c.addr == p.addr) {
                                self.candidates.push(p);
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "announce failed"),
                }
                let quick = Duration::from_millis(250 << self.announces.min(3));
                self.announces += 1;
                self.announce(if self.announces <= 3 { quick.min(interval) } else { interval });
                self.connect_more();
            }
            Event::Fetched { index, result } => match result {
                Ok(data) => self.store(ORIGIN_PEER, index, data),
                Err(e) => {
                    self.picker.failed(&ORIGIN_PEER, index);
                    self.fallback_failures += 1;
                    tracing::warn!(index, error = %e, "origin fallback fetch failed");
                    if self.fallback_failures >= 5 && self.peers.is_empty() {
                        return Err(SwarmError::Fallback(e));
                    }
                }
            },
        }
        Ok(())
    }

    /// Verify and write a piece on the blocking pool; the result comes back as an event.
    /// Metrics are counted here, not in the event loop, which may already have finished when
    /// the last piece's event arrives.
    fn store(&self, from: PeerId, index: u32, data: Bytes) {
        let pieces = self.pieces.clone();
        let events = self.events_tx.clone();
        let metrics = self.deps.metrics.clone();
        let len = data.len() as u64;
        tokio::spawn(async move {
            let writer = pieces.clone();
            let result = tokio::task::spawn_blocking(move || {
                let written = writer.write_piece(index, &data);
                // The piece that extends the whole-blob hash is hashed right here, from memory;
                // pieces it makes contiguous are caught up on below.
                if written.is_ok() {
                    writer.extend_hash(index, &data);
                }
                written
            })
            .await
            .unwrap_or_else(|e| Err(PieceError::Io(std::io::Error::other(e.to_string()))));
            if result.is_ok() && pieces.hash_can_advance() {
                // Catching up may hash many pieces; it must not hold up this piece's event.
                tokio::task::spawn_blocking(move || pieces.advance_hash());
            }
            match &result {
                Ok(_) => {
                    metrics.pieces_verified.inc();
                    let source = if from == ORIGIN_PEER { "origin" } else { "peer" };
                    metrics.received_bytes.with_label_values(&[source]).inc_by(len);
                }
                Err(PieceError::HashMismatch { .. }) => metrics.pieces_rejected.inc(),
                Err(_) => {}
            }
            let _ = events.send(Event::Written { from, index, result }).await;
        });
    }

    fn drop_peer(&mut self, peer: &PeerId) {
        self.origins.remove(peer);
        if self.peers.remove(peer).is_some() {
            self.deps.metrics.connections.with_label_values(&["out"]).dec();
        }
        self.picker.remove_peer(peer);
    }

    fn housekeeping(&mut self) -> Result<(), SwarmError> {
        let now = Instant::now();
        for (peer, index) in self.picker.expired(now) {
            if peer == ORIGIN_PEER {
                continue;
            }
            tracing::info!(%peer, index, "piece request timed out");
            if self.blacklist.timeout(peer, now) {
                self.drop_peer(&peer);
            } else if let Some(p) = self.peers.get(&peer) {
                // The piece is asked of someone else now; a peer slow because it is in demand
                // should not still spend its upload on it.
                let _ = p.commands.try_send(Command::Cancel(index));
            }
        }
        self.blacklist.prune(now);
        self.connect_more();
        self.consider_fallback(now)
    }

    /// Open connections to candidates until the limit, best first (the tracker orders them).
    fn connect_more(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while self.peers.len() + self.connecting.len() < self.cfg.max_connections && i < self.candidates.len()
        {
            let c = &self.candidates[i];
            i += 1;
            let id = c.peer_id.parse::<PeerId>().ok();
            if c.addr == self.cfg.advertise
                || self.connecting.contains(&c.addr)
                || id.is_some_and(|id| {
                    id == self.cfg.peer_id
                        || self.peers.contains_key(&id)
                        || self.blacklist.is_banned(&id, now)
                })
            {
                continue;
            }
            self.connecting.insert(c.addr);
            let events = self.events_tx.clone();
            let (addr, me, pieces, ingress, timeouts) =
                (c.addr, self.cfg.peer_id, self.pieces.clone(), self.deps.ingress.clone(), self.cfg.timeouts);
            tokio::spawn(async move {
                let (tx, mut rx) = mpsc::channel(64);
                let forward = async {
                    while let Some(e) = rx.recv().await {
                        if events.send(Event::Conn(e)).await.is_err() {
                            return;
                        }
                    }
                };
                tokio::join!(conn::run(addr, me, pieces, ingress, timeouts, tx), forward);
            });
        }
    }

    /// Bring in the origin when the swarm cannot deliver; fail when nothing delivers at all.
    fn consider_fallback(&mut self, now: Instant) -> Result<(), SwarmError> {
        let idle = now.duration_since(self.last_progress);
        let no_peers = self.announced_once && self.peers.is_empty() && self.connecting.is_empty();
        if !self.fallback_active && (idle >= self.cfg.fallback_after || no_peers) {
            tracing::info!(digest = %self.pieces.metainfo().digest(), ?idle, no_peers, "swarm stalled; fetching from origin");
            let full = Bitfield::full(self.pieces.metainfo().piece_count());
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
            return Err(SwarmError::Stalled(self.cfg.stall_timeout, state));
        }
        Ok(())
    }

    fn fill_requests(&mut self) {
        let now = Instant::now();
        let mut ids: Vec<PeerId> = self.peers.keys().copied().collect();
        // Under the in-flight cap, the first peers asked get the requests: take turns.
        rand::seq::SliceRandom::shuffle(&mut ids[..], &mut rand::rng());
        let mut room = self.max_in_flight.saturating_sub(self.picker.in_flight_total());
        let others_connected = self.peers.len() > self.origins.len();
        let origins = self.origins.len() as u32;
        self.declined.retain(|_, at| now.duration_since(*at) < DECLINE_BACKOFF);
        self.declined_by.retain(|_, at| now.duration_since(*at) < DECLINE_BACKOFF);
        let declined = &self.declined;
        let declined_by = &self.declined_by;
        for peer in ids {
            if room == 0 {
                break;
            }
            let limit = |pipeline: usize| pipeline.min(self.picker.in_flight_for(&peer).saturating_add(room));
            let picked = if others_connected && self.origins.contains(&peer) {
                // Ask an origin only for pieces no other connected peer has and it did not
                // just decline (super-seeding): the swarm should carry everything it can.
                let limit = limit(self.cfg.origin_pipeline);
                self.picker.pick_where(&peer, now, limit, |index, availability| {
                    availability <= origins && !declined.contains_key(&index)
                })
            } else {
                let limit = limit(self.cfg.pipeline);
                self.picker
                    .pick_where(&peer, now, limit, |index, _| !declined_by.contains_key(&(peer, index)))
            };
            room = room.saturating_sub(picked.len());
            for index in picked {
                let sent = self.peers.get(&peer).map(|p| p.commands.try_send(Command::Request(index)));
                if !matches!(sent, Some(Ok(()))) {
                    self.picker.failed(&peer, index);
                }
            }
        }
        if self.fallback_active {
            // While peers deliver, the HTTP fallback only tops up what none of them has (the
            // fallback pseudo-peer counts in the availability itself); when nothing arrives,
            // it fetches anything missing.
            let stalled = now.duration_since(self.last_progress) >= self.cfg.fallback_after;
            let picked = if others_connected && !stalled {
                let declined = &self.declined;
                self.picker.pick_where(
                    &ORIGIN_PEER,
                    now,
                    self.cfg.fallback_parallel,
                    |index, availability| availability <= origins + 1 && !declined.contains_key(&index),
                )
            } else {
                self.picker.pick(&ORIGIN_PEER, now, self.cfg.fallback_parallel)
            };
            for index in picked {
                let Some((offset, len)) = self.pieces.metainfo().piece_range(index) else { continue };
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn requests_in_flight_fill_one_horizon_of_the_ingress_limit() {
        assert_eq!(in_flight_cap(Some(10 * MIB), MIB), 20);
        assert_eq!(in_flight_cap(Some(25 * MIB), 4 * MIB), 13, "rounded up");
        assert_eq!(in_flight_cap(Some(MIB), 4 * MIB), 2, "never fewer than 2");
        assert_eq!(in_flight_cap(None, MIB), usize::MAX, "no limit, no cap");
        assert_eq!(in_flight_cap(Some(0), MIB), usize::MAX, "a zero rate means unlimited");
        assert_eq!(in_flight_cap(Some(u64::MAX), 1), usize::MAX, "saturates");
    }

    #[test]
    fn deadlines_cover_the_whole_window_in_flight() {
        let secs = |rate, piece| in_flight_window(rate, piece).as_secs_f64();
        assert!((secs(Some(10 * MIB), MIB) - 2.0).abs() < 1e-9, "20 pieces at 10 MiB/s");
        assert!((secs(Some(MIB), 4 * MIB) - 8.0).abs() < 1e-9, "2 pieces of 4 MiB at 1 MiB/s");
        assert_eq!(in_flight_window(None, MIB), Duration::ZERO);
        assert_eq!(in_flight_window(Some(0), MIB), Duration::ZERO);
        assert!(in_flight_window(Some(1), u64::MAX) > Duration::from_secs(1 << 40), "no panic");
    }
}
