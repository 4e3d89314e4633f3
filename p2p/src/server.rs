//! The peer server: answers other peers' requests for pieces of the blobs this node holds
//! (complete or still downloading) and tells them about new pieces as they arrive.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
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
/// A connection silent this long is closed (peers send keep-alives).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
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
/// While a connection's requests wait for a send slot, the server sends it a keep-alive this
/// often: the requester counts any bytes on a connection as a sign that its requests are
/// not stalled (`swarm_state`'s stall rule), so requests that wait their turn are not
/// withdrawn and asked elsewhere. Well inside the requester's stall window
/// (`flow::STALL_AFTER`, 3 s).
pub const TURN_REMINDER: Duration = Duration::from_secs(1);
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
        let (read, write) = transport::accept(stream, HANDSHAKE_TIMEOUT).await?;
        // Small frames only, for good: a downloader sends handshakes and control messages,
        // and the pieces it has no business sending are skipped unread.
        let mut reader = FramedRead::new(read, InboundCodec::new());
        let mut writer = PeerWriter::new(write, PeerCodec::default());
        let first =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await.map_err(|_| "handshake timeout")?;
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
            Some(s) => s.join(&digest, &claimed),
            None => Bitfield::new(piece_count),
        };
        let result = self.exchange(reader, writer, &pieces, remote, advertised, &mut counted).await;
        if let Some(s) = &self.super_seed {
            s.leave(&digest, &counted, Instant::now());
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
        mut advertised: Bitfield,
        counted: &mut Bitfield,
    ) -> Result<(), String> {
        // Incoming messages go through a small queue so requests keep arriving (and cancels
        // take effect) while a piece is being sent.
        let (in_tx, mut in_rx) = mpsc::channel::<Message>(MAX_QUEUED_REQUESTS);
        let reader = tokio::spawn(async move {
            loop {
                match tokio::time::timeout(IDLE_TIMEOUT, stream.next()).await {
                    Ok(Some(Ok(m))) => {
                        if in_tx.send(m).await.is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        });
        let mut progress = pieces.subscribe();
        let mut queue: VecDeque<u32> = VecDeque::new();
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
                        let len = pieces.metainfo().piece_len(index).unwrap_or(0);
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
                        if queue.len() < before {
                            self.egress.release(pieces.metainfo().piece_len(index).unwrap_or(0));
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
                changed = progress.changed() => {
                    if changed.is_err() {
                        continue;
                    }
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
                    let _turn = turn.take();
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
                    self.egress.release(pieces.metainfo().piece_len(index).unwrap_or(0));
                    if !pieces.has(index) {
                        let _ = sink.send(error(ERROR_PROTOCOL, "piece not held")).await;
                        continue;
                    }
                    let count = pieces.metainfo().piece_count();
                    if self.super_seed.as_ref().is_some_and(|s| !s.claim(digest, index, remote, count, Instant::now())) {
                        // Declined: another peer just got it and can pass it on.
                        if let Err(e) = sink.send(Message::Cancel(index)).await {
                            break Err(e.to_string());
                        }
                        continue;
                    }
                    let len = pieces.metainfo().piece_len(index).unwrap_or(0);
                    self.egress.acquire(len).await;
                    let source = pieces.clone();
                    let data = tokio::task::spawn_blocking(move || source.read_piece(index)).await;
                    let Ok(Ok(data)) = data else {
                        break Err(format!("reading piece {index} failed"));
                    };
                    let sent = {
                        let send = sink.send(Message::Piece { index, data: data.into() });
                        tokio::pin!(send);
                        // The send counts against its piece's limit for `SEND_HOLD` at most.
                        let hold = tokio::time::sleep(SEND_HOLD);
                        tokio::pin!(hold);
                        loop {
                            tokio::select! {
                                sent = &mut send => break sent,
                                _ = &mut hold, if piece_send.is_some() => piece_send = None,
                            }
                        }
                    };
                    drop(piece_send);
                    if let Err(e) = sent {
                        break Err(e.to_string());
                    }
                    if let Some(s) = &self.super_seed {
                        s.sent_in_full(digest, index, remote, Instant::now());
                    }
                    self.metrics.sent_bytes.inc_by(len);
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
            self.egress.release(pieces.metainfo().piece_len(index).unwrap_or(0));
        }
        result
    }
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
mod tests {
    use std::sync::atomic::AtomicU64;

    use shoal_registry::Algorithm;

    use super::*;
    use crate::conn::{self, ConnEvent, ConnTimeouts};
    use crate::metainfo::Metainfo;

    struct OneBlob(Arc<BlobPieces>);

    #[async_trait]
    impl PieceLookup for OneBlob {
        async fn lookup(&self, digest: &Digest) -> Option<Arc<BlobPieces>> {
            (digest == self.0.metainfo().digest()).then(|| self.0.clone())
        }
    }

    /// Connect a downloader of `want` to `addr`; its first event.
    async fn dial(addr: std::net::SocketAddr, want: &Arc<BlobPieces>) -> ConnEvent {
        let (tx, mut rx) = mpsc::channel(16);
        let timeouts = ConnTimeouts {
            connect: Duration::from_secs(5),
            handshake: Duration::from_secs(5),
            idle: Duration::from_secs(30),
        };
        let pieces = want.clone();
        tokio::spawn(async move {
            let counter = Arc::new(AtomicU64::new(0));
            let ingress = Arc::new(RateLimiter::unlimited());
            conn::run(addr, PeerId::random(), pieces, ingress, counter, timeouts, tx).await;
        });
        rx.recv().await.expect("the connection reports how it started")
    }

    /// A downloader of `meta`'s blob holding nothing, handshaken with the server at `addr`.
    async fn raw_peer(
        addr: std::net::SocketAddr,
        meta: &Metainfo,
    ) -> tokio_util::codec::Framed<TcpStream, PeerCodec> {
        use futures_util::SinkExt;
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut framed = tokio_util::codec::Framed::new(stream, PeerCodec::default());
        let hello = Message::Handshake {
            version: PROTOCOL_VERSION,
            digest: meta.digest().clone(),
            peer_id: PeerId::random(),
            bitfield: Bitfield::new(meta.piece_count()).to_bytes().into(),
        };
        framed.send(hello).await.unwrap();
        let reply = framed.next().await.unwrap().unwrap();
        assert!(matches!(reply, Message::Handshake { .. }), "{reply:?}");
        framed
    }

    #[tokio::test]
    async fn requests_wait_their_turn_for_a_send_slot_hearing_keep_alives_and_are_served_in_arrival_order() {
        use futures_util::SinkExt;
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("seed");
        std::fs::write(&seed, vec![7u8; 3 << 20]).unwrap();
        let meta = Arc::new(Metainfo::compute_file(&seed, Algorithm::Sha256).unwrap());
        let seeded = Arc::new(BlobPieces::complete(&seed, meta.clone()).unwrap());
        let slots = Arc::new(Semaphore::new(1));
        let server = Arc::new(PeerServer {
            peer_id: PeerId::random(),
            lookup: Arc::new(OneBlob(seeded)),
            egress: Arc::new(RateLimiter::unlimited()),
            metrics: SwarmMetrics::unregistered(),
            max_connections: 16,
            max_connections_per_address: 16,
            max_peers_per_blob: None,
            upload_slots: Some(slots.clone()),
            piece_sends: None,
            super_seed: None,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(server.serve(listener));

        // The test holds the only slot, so both downloaders wait in line: `first` asks first.
        let held = slots.clone().acquire_owned().await.unwrap();
        let (mut first, mut second) = (raw_peer(addr, &meta).await, raw_peer(addr, &meta).await);
        first.send(Message::Request { index: 0 }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        second.send(Message::Request { index: 1 }).await.unwrap();

        // While they wait, the downloaders hear a keep-alive every `TURN_REMINDER`, no piece.
        let waited = TURN_REMINDER * 7 / 2;
        let end = tokio::time::Instant::now() + waited;
        let mut heard = 0;
        while let Ok(next) = tokio::time::timeout_at(end, second.next()).await {
            match next {
                Some(Ok(Message::KeepAlive)) => heard += 1,
                other => panic!("waiting for a slot, the second downloader got {other:?}"),
            }
        }
        assert!(heard >= 2, "{heard} keep-alives in {waited:?} of waiting");
        heard = 0;
        while let Ok(next) = tokio::time::timeout(Duration::from_millis(10), first.next()).await {
            match next {
                Some(Ok(Message::KeepAlive)) => heard += 1,
                other => panic!("waiting for a slot, the first downloader got {other:?}"),
            }
        }
        assert!(heard >= 2, "{heard} keep-alives in {waited:?} of waiting");

        // The slot comes free: the downloaders get their pieces in the order they asked, one
        // slot between them.
        let (tx, mut order) = mpsc::unbounded_channel();
        for (name, mut peer) in [("first", first), ("second", second)] {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(Ok(m)) = peer.next().await {
                    if let Message::Piece { index, .. } = m {
                        let _ = tx.send((name, index));
                        return;
                    }
                }
            });
        }
        drop(held);
        let a = tokio::time::timeout(Duration::from_secs(5), order.recv()).await.unwrap().unwrap();
        let b = tokio::time::timeout(Duration::from_secs(5), order.recv()).await.unwrap().unwrap();
        assert_eq!((a.0, a.1, b.0, b.1), ("first", 0, "second", 1));
        serving.abort();
    }

    #[tokio::test]
    async fn a_piece_at_its_limit_of_sends_waits_with_keep_alives_while_other_pieces_go() {
        use futures_util::SinkExt;
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("seed");
        std::fs::write(&seed, vec![7u8; 3 << 20]).unwrap();
        let meta = Arc::new(Metainfo::compute_file(&seed, Algorithm::Sha256).unwrap());
        let seeded = Arc::new(BlobPieces::complete(&seed, meta.clone()).unwrap());
        let gate = PieceSendGate::new(1);
        let server = Arc::new(PeerServer {
            peer_id: PeerId::random(),
            lookup: Arc::new(OneBlob(seeded)),
            egress: Arc::new(RateLimiter::unlimited()),
            metrics: SwarmMetrics::unregistered(),
            max_connections: 16,
            max_connections_per_address: 16,
            max_peers_per_blob: None,
            upload_slots: None,
            piece_sends: Some(gate.clone()),
            super_seed: None,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(server.serve(listener));

        // Piece 0 is being sent to someone else (the test holds its only send).
        let (_, held) = gate.take_first(meta.digest(), &[0]).unwrap();
        let mut peer = raw_peer(addr, &meta).await;
        peer.send(Message::Request { index: 0 }).await.unwrap();
        peer.send(Message::Request { index: 1 }).await.unwrap();
        // Piece 1 is not held up behind piece 0; piece 0 waits, with keep-alives.
        let waited = TURN_REMINDER * 7 / 2;
        let end = tokio::time::Instant::now() + waited;
        let (mut keep_alives, mut got) = (0, Vec::new());
        while let Ok(next) = tokio::time::timeout_at(end, peer.next()).await {
            match next {
                Some(Ok(Message::KeepAlive)) => keep_alives += 1,
                Some(Ok(Message::Piece { index, .. })) => got.push(index),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, vec![1], "piece 1 should go at once and piece 0 wait for its send");
        assert!(keep_alives >= 2, "{keep_alives} keep-alives in {waited:?} of waiting");
        // The other send ends: piece 0 comes.
        drop(held);
        let piece = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match peer.next().await {
                    Some(Ok(Message::Piece { index, .. })) => return index,
                    Some(Ok(Message::KeepAlive)) => continue,
                    other => panic!("unexpected {other:?}"),
                }
            }
        })
        .await
        .expect("a freed send was never taken");
        assert_eq!(piece, 0);
        serving.abort();
    }

    #[tokio::test]
    async fn a_blob_serves_at_most_its_cap_of_peers_and_frees_a_place_when_one_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let (seed, want) = (dir.path().join("seed"), dir.path().join("want"));
        std::fs::write(&seed, vec![7u8; 3 << 20]).unwrap();
        let meta = Arc::new(Metainfo::compute_file(&seed, Algorithm::Sha256).unwrap());
        let seeded = Arc::new(BlobPieces::complete(&seed, meta.clone()).unwrap());
        let wanted = Arc::new(BlobPieces::partial(&want, meta).unwrap());
        let metrics = SwarmMetrics::unregistered();
        let server = Arc::new(PeerServer {
            peer_id: PeerId::random(),
            lookup: Arc::new(OneBlob(seeded)),
            egress: Arc::new(RateLimiter::unlimited()),
            metrics: metrics.clone(),
            max_connections: 16,
            max_connections_per_address: 16,
            max_peers_per_blob: Some(2),
            upload_slots: None,
            piece_sends: None,
            super_seed: None,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(server.serve(listener));

        let first = dial(addr, &wanted).await;
        let second = dial(addr, &wanted).await;
        assert!(matches!(first, ConnEvent::Connected { .. }), "{first:?}");
        assert!(matches!(second, ConnEvent::Connected { .. }), "{second:?}");
        match dial(addr, &wanted).await {
            ConnEvent::ConnectFailed { reason, .. } => {
                assert!(reason.contains(&ERROR_BLOB_BUSY.to_string()), "{reason}")
            }
            other => panic!("a third peer of a blob capped at two was let in: {other:?}"),
        }
        assert_eq!(metrics.refused_busy.get(), 1);

        // The first downloader leaves (dropping its commands closes the connection): its
        // place is free again once the server has seen it go.
        drop(first);
        let mut joined = false;
        for _ in 0..50 {
            if let ConnEvent::Connected { .. } = dial(addr, &wanted).await {
                joined = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(joined, "a place freed by a leaving peer was never given to another");
        drop(second);
        serving.abort();
    }
}
