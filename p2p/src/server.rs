//! The peer server: answers other peers' requests for pieces of the blobs this node holds
//! (complete or still downloading) and tells them about new pieces as they arrive.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use shoal_registry::Digest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::FramedRead;

use crate::bitfield::Bitfield;
use crate::blob::BlobPieces;
use crate::inbound::{AddressSlots, BlobSlots, InboundCodec};
use crate::limiter::RateLimiter;
use crate::metrics::SwarmMetrics;
use crate::peer::PeerId;
use crate::piece_sends::{PieceSendGate, SEND_HOLD};
use crate::super_seed::SuperSeed;
use crate::transport::{self, ReadHalf, WriteHalf};
use crate::wire::{Message, PeerCodec, PROTOCOL_VERSION};
use crate::writer::{send_new_haves, PeerWriter};

/// How long a new connection may take to say which blob it wants.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection sent no piece, with no request waiting and no `have` of a new piece, this
/// long is closed (keep-alives do not count: a peer may not hold a blob slot, or a cached
/// blob's pin, without using it).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long after its last piece (or its start) a connection's `have`s of new pieces keep it
/// open: a downloader that gets its pieces elsewhere for a while keeps its connection (and
/// the origin's super-seeding hears of its gains), but a peer that tells a new `have` every
/// two minutes and asks for nothing held a cached blob's pin for piece count x 2 minutes (a
/// day for a 1 GiB blob), so `have`s alone keep it this long at most, then `IDLE_TIMEOUT`.
const HAVES_KEEP: Duration = Duration::from_secs(600);

/// What a connection's sending side tells its reader, which closes an idle connection.
#[derive(Default)]
struct Activity {
    /// Pieces sent so far.
    sent: std::sync::atomic::AtomicU64,
    /// Requests queued now (waiting for a send slot or the egress limit).
    queued: std::sync::atomic::AtomicUsize,
}
/// Requests queued per connection; more is a protocol violation.
const MAX_QUEUED_REQUESTS: usize = 64;
/// A request that would wait longer than this behind the node's egress limit is declined at
/// once (a `Cancel` frame), well inside the requester's deadline, so it asks someone else.
const MAX_EGRESS_WAIT: Duration = Duration::from_secs(2);
/// Default cap on connections from one IP address: a node opens one connection per download
/// to a peer, and pulls a few dozen blobs at once at most; one host cannot take the whole
/// connection budget.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 64;
/// Default cap on the peers an agent serves one blob to at once. Each download connects to
/// ten peers (`max_connections_per_blob`), so ten is the mean; without a cap the hosts that
/// announced first are in every downloader's first handout and each was asked by about 50
/// at once, so their first pieces left them at a fiftieth of their link. In the simulator
/// (128 MiB, 50 Mbit/s hosts, seed 1) a cap of 12 took p99 from 1.37 to 1.28 at 100 hosts
/// and from 2.10 to 1.73 at 10,000 (docs/benchmarks.md). A refused downloader forgets this
/// peer until the tracker names it again and connects to its next candidate.
pub const DEFAULT_MAX_PEERS_PER_BLOB: usize = 12;
/// Default number of pieces an origin sends at once, over all its connections (its
/// `peer_upload_slots`). A fleet that starts together asks an origin for about one distinct
/// first piece per agent: sent side by side, a thousand first pieces each went at a
/// thousandth of the origin's link, none arrived for 17 s, and the fleet had nothing to pass
/// on meanwhile (`shoal-sim`, 1 GiB, 1,000 hosts). Sixteen at a time, each goes at about a
/// host's rate (an origin's link is typically ten or more hosts' wide), and the swarm starts
/// spreading the first of them within a fraction of a second. See [`TURN_REMINDER`].
pub const DEFAULT_ORIGIN_UPLOAD_SLOTS: usize = 16;
/// While a connection's requests wait for a send slot (or for the node's egress limit), the
/// server sends it a keep-alive this often: the requester counts any bytes on a connection as
/// a sign that its requests are not stalled (`swarm_state`'s stall rule), so requests that
/// wait their turn are not withdrawn and asked elsewhere. Well inside the requester's stall
/// window (`flow::STALL_AFTER`, 3 s).
pub const TURN_REMINDER: Duration = Duration::from_secs(1);
/// How long after telling a downloader about pieces its blob gained a server gathers the
/// next ones, to tell them in one write; a piece gained after a quiet spell this long is told
/// at once. Told one by one, every piece gained woke each of a partial seeder's connections
/// (about ten in a fleet) to write a frame, and woke the downloader at the other end to read
/// it; gathered, a 20-host fleet made 5 % fewer system calls and pulled as fast (1.07-1.09
/// × the link's time; docs/benchmarks.md, session 20). Short against a piece's transfer
/// (a 512 KiB piece takes about a second at a peer's share of a 50 Mbit/s link). Told only
/// at the end of a batch, every download's first pieces reached its peers a quarter second
/// late while their uplinks idled; told at once, a 20-host fleet held 12 % more bytes one
/// second in (docs/benchmarks.md, session 31).
pub const HAVE_BATCH: Duration = Duration::from_millis(250);
/// Error code sent when the blob is unknown here.
pub const ERROR_UNKNOWN_BLOB: u16 = 404;
/// Error code sent when this node already serves the blob to as many peers as it will.
pub const ERROR_BLOB_BUSY: u16 = 503;
/// Error code sent for protocol violations.
pub const ERROR_PROTOCOL: u16 = 400;

/// Finds the blobs this node can serve.
#[async_trait]
pub trait PieceLookup: Send + Sync + 'static {
    async fn lookup(&self, digest: &Digest) -> Option<Arc<BlobPieces>>;
}

/// Serves pieces to peers, under a node-wide egress limit and a connection limit.
pub struct PeerServer {
    pub peer_id: PeerId,
    pub lookup: Arc<dyn PieceLookup>,
    pub egress: Arc<RateLimiter>,
    pub metrics: SwarmMetrics,
    pub max_connections: usize,
    /// Connections from one IP address at once; more are closed as soon as accepted.
    pub max_connections_per_address: usize,
    /// Peers served one blob at once; more are refused after the handshake
    /// ([`ERROR_BLOB_BUSY`]). `None`: no cap (origins, whose super-seeding spreads the load).
    pub max_peers_per_blob: Option<usize>,
    /// Pieces sent at once over all connections; the others wait their turn, first come
    /// first served, one piece per turn ([`DEFAULT_ORIGIN_UPLOAD_SLOTS`]). `None`: every
    /// connection sends as soon as it has a request (agents).
    pub upload_slots: Option<Arc<Semaphore>>,
    /// Peers one piece is sent to at once (agents: [`crate::piece_sends`]); a connection
    /// whose requests are all for pieces at the limit waits, hearing keep-alives. `None`: no
    /// limit (origins, whose super-seeding sends each piece about once anyway).
    pub piece_sends: Option<Arc<PieceSendGate>>,
    /// Super-seeding (origins): a piece sent to one peer is declined to others for this
    /// long, so they fetch it from that peer and the seeder sends each piece about once.
    pub super_seed: Option<SuperSeed>,
    /// Pace the TCP sending of every accepted connection ([`transport::pace`]): origins,
    /// whose fast uplinks otherwise burst into hosts' queues.
    pub pace: bool,
}

impl PeerServer {
    /// Accept connections until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(Semaphore::new(self.max_connections.max(1)));
        let per_address = AddressSlots::new(self.max_connections_per_address);
        let per_blob = BlobSlots::new(self.max_peers_per_blob.unwrap_or(usize::MAX));
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "peer listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%remote, "peer connection refused: too many connections");
                continue;
            };
            let Some(address_slot) = per_address.take_address(remote.ip()) else {
                tracing::debug!(%remote, "peer connection refused: too many from this address");
                continue;
            };
            let server = self.clone();
            let per_blob = per_blob.clone();
            tokio::spawn(async move {
                let _permit = (permit, address_slot);
                let gauge = server.metrics.connections.with_label_values(&["in"]);
                gauge.inc();
                if let Err(e) = server.handle(stream, &per_blob).await {
                    tracing::debug!(%remote, error = %e, "peer connection ended");
                }
                gauge.dec();
            });
        }
    }

    async fn handle(&self, stream: TcpStream, per_blob: &Arc<BlobSlots>) -> Result<(), String> {
        if self.pace && !transport::pace(&stream) {
            tracing::debug!("TCP pacing not available on a peer connection");
        }
        // One deadline for the TLS handshake and the peer's hello together: each had its own,
        // so a trickling client held a connection slot for twice the time.
        let handshake_by = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        let (read, write) = transport::accept(stream, HANDSHAKE_TIMEOUT).await?;
        // Small frames only, for good: a downloader sends handshakes and control messages,
        // and the pieces it has no business sending are skipped unread.
        let mut reader = FramedRead::new(read, InboundCodec::new());
        let mut writer = PeerWriter::new(write, PeerCodec::default());
        let first =
            tokio::time::timeout_at(handshake_by, reader.next()).await.map_err(|_| "handshake timeout")?;
        let Some(Ok(Message::Handshake { version, digest, peer_id: remote, bitfield: theirs })) = first
        else {
            return Err("expected a handshake".into());
        };
        if version != PROTOCOL_VERSION {
            let _ = writer.send(error(ERROR_PROTOCOL, "unsupported protocol version")).await;
            return Err(format!("peer speaks version {version}"));
        }
        let Some(pieces) = self.lookup.lookup(&digest).await else {
            let _ = writer.send(error(ERROR_UNKNOWN_BLOB, "blob not here")).await;
            return Err(format!("unknown blob {digest}"));
        };
        let Some(_blob_slot) = per_blob.take(digest.clone()) else {
            self.metrics.refused_busy.inc();
            let _ =
                writer.send(error(ERROR_BLOB_BUSY, "serving this blob to as many peers as it will")).await;
            return Err(format!("blob {digest} busy"));
        };
        // Watched from before the hello's snapshot: a piece gained after it is a change
        // `exchange` tells (subscribed there, a piece gained meanwhile was told only with the
        // next one, and never if it was the download's last).
        let progress = pieces.subscribe();
        let advertised = pieces.have();
        let hello = Message::Handshake {
            version: PROTOCOL_VERSION,
            digest,
            peer_id: self.peer_id,
            bitfield: advertised.to_bytes().into(),
        };
        writer.send(hello).await.map_err(|e| e.to_string())?;
        let piece_count = pieces.metainfo().piece_count();
        let claimed =
            Bitfield::from_bytes(piece_count, &theirs).unwrap_or_else(|_| Bitfield::new(piece_count));
        let digest = pieces.metainfo().digest().clone();
        // The pieces this peer counts as holding, for super-seeding.
        let mut counted = match &self.super_seed {
            Some(s) => s.join(&digest, &claimed, remote),
            None => Bitfield::new(piece_count),
        };
        let told = (progress, advertised);
        let result = self.exchange(reader, writer, &pieces, remote, told, &mut counted).await;
        if let Some(s) = &self.super_seed {
            s.leave(&digest, &counted, remote, Instant::now());
        }
        result
    }

    /// Serve requests on an established connection until it ends.
    async fn exchange(
        &self,
        mut stream: FramedRead<ReadHalf, InboundCodec>,
        mut sink: PeerWriter<WriteHalf>,
        pieces: &Arc<BlobPieces>,
        remote: PeerId,
        (mut progress, mut advertised): (tokio::sync::watch::Receiver<u32>, Bitfield),
        counted: &mut Bitfield,
    ) -> Result<(), String> {
        // Incoming messages go through a small queue so requests keep arriving (and cancels
        // take effect) while a piece is being sent.
        let (in_tx, mut in_rx) = mpsc::channel::<Message>(MAX_QUEUED_REQUESTS);
        // Only a piece sent, a request waiting to be sent, or a `have` of a piece not told
        // before keeps a connection: one with none of these for `IDLE_TIMEOUT` gives its blob
        // slot and connection slot back, and with them its pin on a cached blob. Keep-alives,
        // the same `have` again, or a request cancelled before it was sent, every two minutes,
        // kept a blob from eviction for good; `have`s count for `HAVES_KEEP` after the last
        // piece sent only.
        let mut told = vec![false; pieces.metainfo().piece_count() as usize];
        let activity = Arc::new(Activity::default());
        let seen = activity.clone();
        let reader = tokio::spawn(async move {
            let mut deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
            // When a piece was last seen sent or a request waiting (or the connection began),
            // looked at on each `have` and at each deadline: what `have`s are counted from;
            // one count of pieces seen for both, so a piece is credited once.
            let mut useful_at = tokio::time::Instant::now();
            let mut sent_seen = 0;
            loop {
                let next = match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        let sent = seen.sent.load(std::sync::atomic::Ordering::Relaxed);
                        let waiting = seen.queued.load(std::sync::atomic::Ordering::Relaxed) > 0;
                        if sent == sent_seen && !waiting {
                            return;
                        }
                        sent_seen = sent;
                        useful_at = tokio::time::Instant::now();
                        deadline = useful_at + IDLE_TIMEOUT;
                        continue;
                    }
                };
                match next {
                    Some(Ok(m)) => {
                        if let Message::Have(index) = &m {
                            let now = tokio::time::Instant::now();
                            let sent = seen.sent.load(std::sync::atomic::Ordering::Relaxed);
                            if sent != sent_seen || seen.queued.load(std::sync::atomic::Ordering::Relaxed) > 0
                            {
                                // Credited here, the piece keeps the connection as the
                                // deadline would have.
                                (sent_seen, useful_at) = (sent, now);
                                deadline = deadline.max(now + IDLE_TIMEOUT);
                            }
                            if told.get_mut(*index as usize).is_some_and(|t| !std::mem::replace(t, true))
                                && now < useful_at + HAVES_KEEP
                            {
                                deadline = now + IDLE_TIMEOUT;
                            }
                        }
                        if matches!(m, Message::KeepAlive) {
                            continue;
                        }
                        if in_tx.send(m).await.is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        });
        // A piece gained after a quiet spell is told at once; pieces gained within
        // `HAVE_BATCH` of telling are told together when it has passed, in one write.
        let mut haves_due = false;
        let mut last_told: Option<tokio::time::Instant> = None;
        let haves_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(haves_timer);
        let mut queue: VecDeque<u32> = VecDeque::new();
        // Queued requests whose egress admission was given back while a send to this peer
        // was slow: admitted again (or declined) when their turn comes.
        let mut unadmitted: HashSet<u32> = HashSet::new();
        let piece_len = |index: u32| pieces.metainfo().piece_len(index).unwrap_or(0);
        // This connection's place in the line for a send slot, and its turn once it has one.
        let mut waiting: Option<TurnWait> = None;
        let mut turn: Option<OwnedSemaphorePermit> = None;
        let mut reminder = tokio::time::interval(TURN_REMINDER);
        reminder.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether every queued request is for a piece already sent to as many peers as one
        // piece may be; then this connection waits for one of those sends to end.
        let mut freed = self.piece_sends.as_ref().map(|g| g.freed());
        let mut blocked = false;
        let result = loop {
            activity.queued.store(queue.len(), std::sync::atomic::Ordering::Relaxed);
            match &self.upload_slots {
                // A connection with nothing to send leaves the line (or gives its turn back).
                _ if queue.is_empty() => {
                    waiting = None;
                    turn = None;
                }
                Some(slots) if turn.is_none() && waiting.is_none() => {
                    waiting = Some(Box::pin(slots.clone().acquire_owned()));
                    reminder.reset();
                }
                _ => {}
            }
            let ready = !queue.is_empty() && (self.upload_slots.is_none() || turn.is_some());
            let was_blocked = blocked;
            blocked = ready
                && self
                    .piece_sends
                    .as_ref()
                    .is_some_and(|g| !g.any_free(pieces.metainfo().digest(), queue.make_contiguous()));
            if blocked && !was_blocked {
                reminder.reset();
            }
            let may_send = ready && !blocked;
            tokio::select! {
                biased;
                incoming = in_rx.recv() => match incoming {
                    None => break Ok(()),
                    Some(Message::Request { index }) => {
                        if queue.len() >= MAX_QUEUED_REQUESTS {
                            let _ = sink.send(error(ERROR_PROTOCOL, "too many requests queued")).await;
                            break Err("request flood".to_string());
                        }
                        // Asked again while queued: it is sent once, and admitted once (a
                        // cancel takes every copy out and gives one admission back).
                        if queue.contains(&index) {
                            continue;
                        }
                        let len = piece_len(index);
                        if !self.egress.admit(len, MAX_EGRESS_WAIT) {
                            if let Err(e) = sink.send(Message::Cancel(index)).await {
                                break Err(e.to_string());
                            }
                            continue;
                        }
                        queue.push_back(index);
                    }
                    Some(Message::Cancel(index)) => {
                        let before = queue.len();
                        queue.retain(|&i| i != index);
                        if queue.len() < before && !unadmitted.remove(&index) {
                            self.egress.release(piece_len(index));
                        }
                    }
                    Some(Message::Have(index)) => {
                        let fresh = index < counted.len() && !counted.get(index);
                        if fresh
                            && self.super_seed.as_ref().is_some_and(|s| s.gained(pieces.metainfo().digest(), index))
                        {
                            let _ = counted.set(index);
                        }
                    }
                    Some(Message::Error { code, message }) => break Err(format!("peer error {code}: {message}")),
                    Some(_) => {}
                },
                changed = progress.changed(), if !haves_due => {
                    if changed.is_err() {
                        continue;
                    }
                    let now = tokio::time::Instant::now();
                    if let Some(due) = last_told.map(|t| t + HAVE_BATCH).filter(|&due| due > now) {
                        haves_due = true;
                        haves_timer.as_mut().reset(due);
                        continue;
                    }
                    last_told = Some(now);
                    if let Err(e) = send_new_haves(&mut sink, &mut advertised, pieces.have()).await {
                        break Err(e.to_string());
                    }
                },
                _ = &mut haves_timer, if haves_due => {
                    haves_due = false;
                    last_told = Some(tokio::time::Instant::now());
                    // Seen before the snapshot: a piece gained after it wakes the next batch.
                    progress.borrow_and_update();
                    if let Err(e) = send_new_haves(&mut sink, &mut advertised, pieces.have()).await {
                        break Err(e.to_string());
                    }
                },
                granted = wait_turn(&mut waiting), if waiting.is_some() => {
                    waiting = None;
                    match granted {
                        Ok(permit) => turn = Some(permit),
                        Err(_) => break Err("upload slots closed".to_string()),
                    }
                },
                _ = wait_freed(&mut freed), if blocked => {},
                _ = std::future::ready(()), if may_send => {
                    // One piece per turn: the next one waits at the back of the line.
                    let mut held_turn = turn.take();
                    let digest = pieces.metainfo().digest();
                    let (index, mut piece_send) = match &self.piece_sends {
                        None => match queue.pop_front() {
                            Some(index) => (index, None),
                            None => continue,
                        },
                        // Another connection may have taken the last free send meanwhile.
                        Some(gate) => match gate.take_first(digest, queue.make_contiguous()) {
                            Some((pos, send)) => match queue.remove(pos) {
                                Some(index) => (index, Some(send)),
                                None => continue,
                            },
                            None => continue,
                        },
                    };
                    // A turn and a piece's send are for sending that piece: every other answer
                    // (a cancel, a decline, an error) lets them go first. Held through such a
                    // write to a peer that stopped reading, each kept one of the origin's few
                    // send slots for the write's whole timeout.
                    if unadmitted.remove(&index) && !self.egress.admit(piece_len(index), MAX_EGRESS_WAIT) {
                        drop((held_turn.take(), piece_send.take()));
                        if let Err(e) = sink.send(Message::Cancel(index)).await {
                            break Err(e.to_string());
                        }
                        continue;
                    }
                    self.egress.release(piece_len(index));
                    if !pieces.has(index) {
                        // Asked for a piece it was never told of (or past the blob's end).
                        drop((held_turn.take(), piece_send.take()));
                        let _ = sink.send(error(ERROR_PROTOCOL, "piece not held")).await;
                        break Err(format!("peer asked for piece {index}, which is not held"));
                    }
                    let count = pieces.metainfo().piece_count();
                    if self.super_seed.as_ref().is_some_and(|s| !s.claim(digest, index, remote, Instant::now())) {
                        // Declined: another peer just got it and can pass it on.
                        tracing::trace!(%digest, index, %remote, "piece declined");
                        drop((held_turn.take(), piece_send.take()));
                        if let Err(e) = sink.send(Message::Cancel(index)).await {
                            break Err(e.to_string());
                        }
                        continue;
                    }
                    let len = piece_len(index);
                    if let Err(e) = acquire_egress(&self.egress, len, &mut sink).await {
                        break Err(e.to_string());
                    }
                    // A piece this node just verified is still in memory (peers ask for it
                    // within a second or two); older ones are read back on the blocking pool.
                    let data = match pieces.piece_in_memory(index) {
                        Some(data) => data,
                        None => {
                            let source = pieces.clone();
                            let data = tokio::task::spawn_blocking(move || source.read_piece(index)).await;
                            let Ok(Ok(data)) = data else {
                                break Err(format!("reading piece {index} failed"));
                            };
                            Bytes::from(data)
                        }
                    };
                    let sent = {
                        let send = sink.send(Message::Piece { index, data });
                        tokio::pin!(send);
                        // The send holds its piece's limit, its upload slot and the egress
                        // admission of the requests queued behind it for `SEND_HOLD` at most: a
                        // peer that reads slowly (or not at all) keeps none of them from the
                        // others for the minute its send may take.
                        let hold = tokio::time::sleep(SEND_HOLD);
                        tokio::pin!(hold);
                        let mut holding = true;
                        loop {
                            tokio::select! {
                                sent = &mut send => break sent,
                                _ = &mut hold, if holding => {
                                    holding = false;
                                    piece_send = None;
                                    held_turn = None;
                                    for &queued in &queue {
                                        if unadmitted.insert(queued) {
                                            self.egress.release(piece_len(queued));
                                        }
                                    }
                                }
                            }
                        }
                    };
                    drop((piece_send, held_turn));
                    if let Err(e) = sent {
                        break Err(e.to_string());
                    }
                    if let Some(s) = &self.super_seed {
                        s.sent_in_full(digest, index, remote, count, Instant::now());
                    }
                    self.metrics.sent_bytes.inc_by(len);
                    activity.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::trace!(%digest, index, %remote, "piece sent");
                },
                _ = reminder.tick(), if waiting.is_some() || blocked => {
                    if let Err(e) = sink.send(Message::KeepAlive).await {
                        break Err(e.to_string());
                    }
                },
            }
        };
        reader.abort();
        for index in queue {
            if !unadmitted.contains(&index) {
                self.egress.release(piece_len(index));
            }
        }
        result
    }
}

/// Wait until the node's egress limit lets `len` bytes go, sending a keep-alive every
/// [`TURN_REMINDER`] meanwhile. Admission bounds the wait at about [`MAX_EGRESS_WAIT`] (more
/// for a piece bigger than that much of the rate): silent that long, the request would look
/// stalled or, after 2 s, like a flow lost to incast (`crate::incast`) to its requester.
/// Without a wait (no limit, or tokens at hand) no timer is set: this runs for every piece.
async fn acquire_egress(
    egress: &RateLimiter,
    len: u64,
    sink: &mut PeerWriter<WriteHalf>,
) -> Result<(), crate::wire::WireError> {
    let wait = egress.reserve(len, Instant::now());
    let start = tokio::time::Instant::now();
    let until = start + wait;
    let mut reminder = start + TURN_REMINDER;
    while reminder < until {
        tokio::time::sleep_until(reminder).await;
        sink.send(Message::KeepAlive).await?;
        reminder += TURN_REMINDER;
    }
    if !wait.is_zero() {
        tokio::time::sleep_until(until).await;
    }
    Ok(())
}

/// A connection waiting in line for a send slot (tokio's semaphore serves waiters first
/// come, first served).
type TurnWait = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// The next end of a send of a piece at its limit, or never without a limit.
async fn wait_freed(freed: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    match freed.as_mut() {
        // The sender lives in the gate, which outlives the server's connections.
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// The wait for a send slot, or never if this connection is not in line.
async fn wait_turn(waiting: &mut Option<TurnWait>) -> Result<OwnedSemaphorePermit, AcquireError> {
    match waiting.as_mut() {
        Some(wait) => wait.await,
        None => std::future::pending().await,
    }
}

fn error(code: u16, message: &str) -> Message {
    Message::Error { code, message: message.to_string() }
}

#[cfg(test)]
mod tests;
