//! The peer server: answers other peers' requests for pieces of the blobs this node holds
//! (complete or still downloading) and tells them about new pieces as they arrive.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use shoal_registry::Digest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::FramedRead;

use crate::bitfield::Bitfield;
use crate::blob::BlobPieces;
use crate::inbound::{AddressSlots, BlobSlots, InboundCodec};
use crate::limiter::RateLimiter;
use crate::metrics::SwarmMetrics;
use crate::peer::PeerId;
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
        let result = loop {
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
                _ = std::future::ready(()), if !queue.is_empty() => {
                    let Some(index) = queue.pop_front() else { continue };
                    self.egress.release(pieces.metainfo().piece_len(index).unwrap_or(0));
                    if !pieces.has(index) {
                        let _ = sink.send(error(ERROR_PROTOCOL, "piece not held")).await;
                        continue;
                    }
                    let digest = pieces.metainfo().digest();
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
                    if let Err(e) = sink.send(Message::Piece { index, data: data.into() }).await {
                        break Err(e.to_string());
                    }
                    if let Some(s) = &self.super_seed {
                        s.sent_in_full(digest, index, remote, Instant::now());
                    }
                    self.metrics.sent_bytes.inc_by(len);
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
