//! One outbound peer connection of a download: handshake, then requests out and pieces in.
//! It owns no swarm state; it reports to the swarm's event loop and obeys its commands.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use crate::bitfield::Bitfield;
use crate::blob::BlobPieces;
use crate::inbound::InboundCodec;
use crate::limiter::RateLimiter;
use crate::peer::PeerId;
use crate::transport::{self, ReadHalf, WriteHalf};
use crate::wire::{Message, PeerCodec, WireError, PROTOCOL_VERSION};
use crate::writer::{send_new_haves, PeerWriter};

/// Commands from the event loop to a connection.
#[derive(Debug)]
pub enum Command {
    Request(u32),
    Cancel(u32),
}

/// One connection of this process, told apart from any other (the peer id alone is what the
/// remote side claims: a second connection claiming a connected peer's id, refused as a
/// duplicate, must not speak for or close the first, nor must a closed connection's last
/// events speak for a newer one to the same peer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId(u64);

impl ConnId {
    pub(crate) fn next() -> ConnId {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        ConnId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// What a connection reports to the event loop, each event naming its connection.
#[derive(Debug)]
pub enum ConnEvent {
    Connected {
        peer: PeerId,
        conn: ConnId,
        addr: SocketAddr,
        bitfield: Bitfield,
        commands: mpsc::Sender<Command>,
        /// Bytes read from this connection so far, counted as they arrive (not per piece):
        /// a connection that reads is not stalled.
        received: Arc<AtomicU64>,
        /// Of those, the bytes of pieces this side requested: the swarm sees a piece in
        /// transit as progress, and keep-alives alone as none.
        piece_bytes: Arc<AtomicU64>,
    },
    ConnectFailed {
        addr: SocketAddr,
        reason: String,
    },
    Have {
        peer: PeerId,
        conn: ConnId,
        index: u32,
    },
    /// The peer declined a request (a super-seeding origin that sent the piece elsewhere).
    Declined {
        peer: PeerId,
        conn: ConnId,
        index: u32,
    },
    /// The peer sent a requested piece in a frame of another length: a bad piece, known
    /// before its bytes came.
    BadPiece {
        peer: PeerId,
        conn: ConnId,
        index: u32,
    },
    Piece {
        peer: PeerId,
        conn: ConnId,
        index: u32,
        data: Bytes,
    },
    Closed {
        peer: PeerId,
        conn: ConnId,
        reason: String,
    },
}

/// Timeouts of a connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnTimeouts {
    pub connect: Duration,
    pub handshake: Duration,
    /// Silence after which the connection is considered dead.
    pub idle: Duration,
}

/// The read half of a connection, counting the bytes it reads into this connection's counter
/// and the node's.
pub struct CountingReader<R> {
    inner: R,
    conn: Arc<AtomicU64>,
    node: Arc<AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for CountingReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.conn.fetch_add(n, Ordering::Relaxed);
            self.node.fetch_add(n, Ordering::Relaxed);
        }
        poll
    }
}

/// Connect to `addr` and run the connection until it closes or `commands` is dropped.
/// `node_received` counts the bytes read into the node's total. Events go straight into the
/// caller's channel as `E` (the swarm's own event type), with no forwarding task between: a
/// hop there was a second task wake-up for every piece and `have` a connection reads.
pub async fn run<E: From<ConnEvent>>(
    addr: SocketAddr,
    me: PeerId,
    pieces: Arc<BlobPieces>,
    ingress: Arc<RateLimiter>,
    node_received: Arc<AtomicU64>,
    timeouts: ConnTimeouts,
    events: mpsc::Sender<E>,
) {
    let conn = ConnId::next();
    let received = Arc::new(AtomicU64::new(0));
    let counters = (received.clone(), node_received);
    let shaken = match handshake(addr, me, &pieces, timeouts, counters).await {
        Ok(ok) => ok,
        Err(reason) => {
            let _ = events.send(E::from(ConnEvent::ConnectFailed { addr, reason })).await;
            return;
        }
    };
    // Only a seeder of the whole blob hears which pieces this side gains: a super-seeding
    // origin declines pieces that a connected peer can pass on instead, and origins seed
    // whole blobs. An agent's server has no use for them, and sent to every peer each piece
    // gained woke every connection of the download to write a frame the other side dropped.
    let Shaken { peer, bitfield, reader: mut stream, writer: mut sink, mut progress, mut advertised } =
        shaken;
    let tell_gains = bitfield.is_complete();
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Command>(64);
    let piece_bytes = stream.decoder().piece_bytes();
    let connected =
        ConnEvent::Connected { peer, conn, addr, bitfield, commands: cmd_tx, received, piece_bytes };
    if events.send(E::from(connected)).await.is_err() {
        return;
    }
    let reason = loop {
        tokio::select! {
            changed = progress.changed(), if tell_gains => {
                if changed.is_err() {
                    // Cannot happen while this connection holds the piece store.
                    break "piece store closed".to_string();
                }
                if let Err(e) = send_new_haves(&mut sink, &mut advertised, pieces.have()).await {
                    break e.to_string();
                }
            }
            cmd = cmd_rx.recv() => {
                let msg = match cmd {
                    None => break "swarm closed the connection".to_string(),
                    Some(Command::Request(index)) => {
                        stream.decoder_mut().expect(index, pieces.metainfo().piece_len(index).unwrap_or(0));
                        Message::Request { index }
                    }
                    // A piece already on its way is still taken: it may be the first to arrive.
                    Some(Command::Cancel(index)) => Message::Cancel(index),
                };
                if let Err(e) = sink.send(msg).await {
                    break e.to_string();
                }
            }
            incoming = tokio::time::timeout(timeouts.idle, stream.next()) => match incoming {
                Err(_) => break "idle timeout".to_string(),
                Ok(None) => break "closed by peer".to_string(),
                Ok(Some(Err(WireError::PieceLength { index, len, expected }))) => {
                    // A requested piece that cannot be its piece: banned as a bad piece is.
                    let _ = events.send(E::from(ConnEvent::BadPiece { peer, conn, index })).await;
                    break format!("piece {index} came in {len} bytes, not {expected}");
                }
                Ok(Some(Err(e))) => break format!("protocol error: {e}"),
                Ok(Some(Ok(Message::Piece { index, data }))) => {
                    // Waiting here stops reading the socket, so TCP pushes back on the sender.
                    ingress.acquire(data.len() as u64).await;
                    if events.send(E::from(ConnEvent::Piece { peer, conn, index, data })).await.is_err() {
                        break "swarm gone".to_string();
                    }
                }
                Ok(Some(Ok(Message::Have(index)))) => {
                    if events.send(E::from(ConnEvent::Have { peer, conn, index })).await.is_err() {
                        break "swarm gone".to_string();
                    }
                }
                Ok(Some(Ok(Message::Cancel(index)))) => {
                    stream.decoder_mut().forget(index);
                    if events.send(E::from(ConnEvent::Declined { peer, conn, index })).await.is_err() {
                        break "swarm gone".to_string();
                    }
                }
                Ok(Some(Ok(Message::Error { code, message }))) => break format!("peer error {code}: {message}"),
                Ok(Some(Ok(_))) => {}
            }
        }
    };
    let dropped = stream.decoder().dropped_bytes();
    if dropped > 0 {
        tracing::debug!(%peer, %addr, dropped, "peer sent bytes of pieces that were not requested");
    }
    let _ = events.send(E::from(ConnEvent::Closed { peer, conn, reason })).await;
}

type PeerReader = FramedRead<CountingReader<ReadHalf>, InboundCodec>;

/// A connection whose handshake is done.
struct Shaken {
    peer: PeerId,
    /// The pieces the peer said it holds.
    bitfield: Bitfield,
    reader: PeerReader,
    writer: PeerWriter<WriteHalf>,
    /// This side's pieces, watched from before the hello was made: a piece gained after it
    /// is a change not yet seen, so it is told as a `have` (taken after the handshake, a
    /// piece gained meanwhile was neither in the hello nor a change, and never told).
    progress: tokio::sync::watch::Receiver<u32>,
    /// The pieces the hello told.
    advertised: Bitfield,
}

async fn handshake(
    addr: SocketAddr,
    me: PeerId,
    pieces: &BlobPieces,
    timeouts: ConnTimeouts,
    (conn, node): (Arc<AtomicU64>, Arc<AtomicU64>),
) -> Result<Shaken, String> {
    // Small frames until the handshake is done; then whole pieces, but only requested ones.
    let codec = InboundCodec::new();
    let (read, write) = transport::connect(addr, timeouts.connect, timeouts.handshake, codec.need()).await?;
    let mut reader = FramedRead::new(CountingReader { inner: read, conn, node }, codec);
    let mut writer = PeerWriter::new(write, PeerCodec::default());
    let digest = pieces.metainfo().digest().clone();
    let progress = pieces.subscribe();
    let advertised = pieces.have();
    let hello = Message::Handshake {
        version: PROTOCOL_VERSION,
        digest: digest.clone(),
        peer_id: me,
        bitfield: advertised.to_bytes().into(),
    };
    writer.send(hello).await.map_err(|e| e.to_string())?;
    let reply =
        tokio::time::timeout(timeouts.handshake, reader.next()).await.map_err(|_| "handshake timeout")?;
    match reply {
        Some(Ok(Message::Handshake { version, digest: theirs, peer_id, bitfield })) => {
            if version != PROTOCOL_VERSION || theirs != digest {
                return Err("handshake for another blob or version".into());
            }
            let bitfield = Bitfield::from_bytes(pieces.metainfo().piece_count(), &bitfield)
                .map_err(|e| format!("bad bitfield: {e}"))?;
            reader.decoder_mut().allow_pieces();
            Ok(Shaken { peer: peer_id, bitfield, reader, writer, progress, advertised })
        }
        Some(Ok(Message::Error { code, message })) => Err(format!("peer refused ({code}): {message}")),
        Some(Ok(other)) => Err(format!("expected handshake, got {}", other.name())),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("closed during handshake".into()),
    }
}

/// Tests' downloader: `pieces` fetched from `addr` with a random peer id, no rate limit and
/// generous timeouts, its events sent to `events`.
#[cfg(test)]
pub(crate) fn spawn_test_download(
    addr: SocketAddr,
    pieces: Arc<BlobPieces>,
    events: mpsc::Sender<ConnEvent>,
) {
    let timeouts = ConnTimeouts {
        connect: Duration::from_secs(5),
        handshake: Duration::from_secs(5),
        idle: Duration::from_secs(30),
    };
    let ingress = Arc::new(RateLimiter::unlimited());
    let counter = Arc::new(AtomicU64::new(0));
    tokio::spawn(run(addr, PeerId::random(), pieces, ingress, counter, timeouts, events));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metainfo::Metainfo;
    use futures_util::SinkExt;
    use shoal_registry::Algorithm;
    use tokio::net::TcpListener;

    /// What a raw server whose handshake lists every piece (`seeder`) or only the last hears
    /// from a downloader that gains piece 0 after connecting (`mid_handshake`: after its hello,
    /// before the server's reply): the `have`s within half a second.
    async fn haves_heard(seeder: bool, mid_handshake: bool) -> Vec<u32> {
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("seed");
        std::fs::write(&seed, vec![7u8; 3 << 20]).unwrap();
        let meta = Arc::new(Metainfo::compute_file(&seed, Algorithm::Sha256).unwrap());
        let complete = BlobPieces::complete(&seed, meta.clone()).unwrap();
        let want = Arc::new(BlobPieces::partial(&dir.path().join("want"), meta.clone()).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();

        let (tx, mut events) = mpsc::channel(16);
        spawn_test_download(addr, want.clone(), tx);
        let (stream, _) = listener.accept().await.unwrap();
        let mut server = tokio_util::codec::Framed::new(stream, PeerCodec::default());
        let hello = server.next().await.unwrap().unwrap();
        assert!(matches!(hello, Message::Handshake { .. }), "{hello:?}");
        let gain =
            || assert!(want.write_piece(0, &complete.read_piece(0).unwrap()).unwrap(), "piece 0 verifies");
        if mid_handshake {
            gain();
        }
        let mut has = Bitfield::new(meta.piece_count());
        for i in 0..meta.piece_count() {
            if seeder || i + 1 == meta.piece_count() {
                has.set(i).unwrap();
            }
        }
        server
            .send(Message::Handshake {
                version: PROTOCOL_VERSION,
                digest: meta.digest().clone(),
                peer_id: PeerId::random(),
                bitfield: has.to_bytes().into(),
            })
            .await
            .unwrap();
        // Held to the end: dropping its command sender closes the connection.
        let connected = events.recv().await;
        assert!(matches!(connected, Some(ConnEvent::Connected { .. })), "{connected:?}");

        if !mid_handshake {
            gain();
        }
        let mut heard = Vec::new();
        let end = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(end, server.next()).await {
            match m {
                Message::Have(i) => heard.push(i),
                Message::KeepAlive => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(tokio::time::Instant::now() >= end, "the connection stayed up");
        drop(connected);
        heard
    }

    /// A seeder of the whole blob (an origin, which super-seeds) hears each piece the
    /// downloader gains; a peer still downloading, which has no use for it, hears nothing.
    #[tokio::test]
    async fn only_a_seeder_of_the_whole_blob_hears_what_a_download_gains() {
        assert_eq!(haves_heard(true, false).await, [0]);
        assert_eq!(haves_heard(false, false).await, Vec::<u32>::new());
    }

    /// A piece gained while the handshake is under way (in neither the hello nor, before,
    /// any change watched) is told to a seeder too: a super-seeding origin otherwise never
    /// counts this peer as holding it.
    #[tokio::test]
    async fn a_piece_gained_during_the_handshake_is_told() {
        assert_eq!(haves_heard(true, true).await, [0]);
    }

    /// A requested piece sent in a frame of another length is reported as a bad piece (the
    /// swarm bans the address), then the connection closes, before its bytes are read.
    #[tokio::test]
    async fn a_piece_of_the_wrong_length_is_reported_as_bad() {
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("seed");
        std::fs::write(&seed, vec![7u8; 3 << 20]).unwrap();
        let meta = Arc::new(Metainfo::compute_file(&seed, Algorithm::Sha256).unwrap());
        let want = Arc::new(BlobPieces::partial(&dir.path().join("want"), meta.clone()).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut events) = mpsc::channel(16);
        spawn_test_download(addr, want, tx);
        let (stream, _) = listener.accept().await.unwrap();
        let mut server = tokio_util::codec::Framed::new(stream, PeerCodec::default());
        let hello = server.next().await.unwrap().unwrap();
        assert!(matches!(hello, Message::Handshake { .. }), "{hello:?}");
        let handshake = Message::Handshake {
            version: PROTOCOL_VERSION,
            digest: meta.digest().clone(),
            peer_id: PeerId::random(),
            bitfield: Bitfield::full(meta.piece_count()).to_bytes().into(),
        };
        server.send(handshake).await.unwrap();
        let Some(ConnEvent::Connected { commands, .. }) = events.recv().await else {
            panic!("not connected")
        };
        commands.send(Command::Request(0)).await.unwrap();
        loop {
            match server.next().await.unwrap().unwrap() {
                Message::Request { index: 0 } => break,
                Message::KeepAlive | Message::Have(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        let short = meta.piece_len(0).unwrap() as usize - 1;
        server.send(Message::Piece { index: 0, data: vec![1u8; short].into() }).await.unwrap();
        let reported = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap();
        assert!(matches!(reported, Some(ConnEvent::BadPiece { index: 0, .. })), "{reported:?}");
        let closed = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap();
        assert!(matches!(closed, Some(ConnEvent::Closed { .. })), "{closed:?}");
    }
}
