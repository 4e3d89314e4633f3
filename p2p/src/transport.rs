//! The byte stream a peer connection runs over: plain TCP, or mutual TLS when this process's
//! TLS context has it ([`shoal_tls::Tls::peer`]), so only the cluster's own nodes can ask
//! for pieces or serve them. The rest of the protocol sees two boxed halves either way.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;

/// The receiving half of a peer connection.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The sending half of a peer connection.
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;
/// An accepted peer connection over TLS, before it is split.
type TlsServerStream = shoal_tls::ServerTlsStream<shoal_tls::Buffered<TcpStream>>;

/// Unsent bytes a peer socket may hold before a write waits (`TCP_NOTSENT_LOWAT`). Without a
/// bound the kernel takes megabytes of pieces at once, so the server counts a piece as sent
/// (and starts the next, which a cancel can then no longer stop) seconds before its bytes
/// leave: on 50 Mbit/s links, with 512 KiB pieces, half of a 20-host fleet's duplicate
/// requests arrived whole. 128 KiB is 20 ms at 50 Mbit/s; a write wakes about every
/// 64 KiB sent.
pub const NOT_SENT_LOW_WATER: u32 = 128 * 1024;

/// Set a socket option at `SOL_SOCKET` to `value` (the C type the option takes: `c_int` for
/// most, the kernel's `unsigned long`, a `u64` here, for `SO_MAX_PACING_RATE`); whether the
/// kernel took it. Neither socket2 nor rustix wraps the options this is used for.
fn set_socket_option<T: Copy>(stream: &TcpStream, name: libc::c_int, value: T) -> bool {
    // SAFETY: a socket descriptor the stream keeps open, and a pointer to a plain value that
    // outlives the call, with its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// Nagle off (requests and `have`s are small and urgent) and the unsent-bytes bound.
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(stream).set_tcp_notsent_lowat(NOT_SENT_LOW_WATER);
}

/// The cap given to `SO_MAX_PACING_RATE` to pace a socket: none (all ones but the last bit;
/// all ones means "not paced"). Any value turns on the kernel's own TCP pacing, which sends a
/// connection's window spread over its round trip at about its congestion window's rate
/// instead of in line-rate bursts.
pub const PACED_WITHOUT_CAP: u64 = u64::MAX - 1;

/// Turn on the kernel's TCP pacing for a seeder's socket ([`PACED_WITHOUT_CAP`]); whether the
/// kernel took it.
///
/// Why the origins pace: an origin's uplink is many times a host's, so unpaced it delivers
/// each connection's window into the host's switch queue as one burst, and a full drop-tail
/// queue drops bursts first. On 20 emulated 50 Mbit/s hosts behind a 500 Mbit/s origin, the
/// origin's segments were retransmitted 4-6 times as often as the hosts' own (which their
/// slower links space out), and every retransmission is a byte the origin sends twice:
/// 1.11-1.13 x the blob unpaced, 1.08-1.11 paced (median 1.10), the pull's time the same
/// (docs/benchmarks.md). Pacing every agent's socket too gained nothing more.
pub fn pace(stream: &TcpStream) -> bool {
    set_socket_option(stream, libc::SO_MAX_PACING_RATE, PACED_WITHOUT_CAP)
}

/// Most bytes a downloading connection lets the kernel gather before waking its reader
/// (`SO_RCVLOWAT`). A peer's share of a 50 Mbit/s link arrives a jumbo frame at a time; woken
/// for each, the reader pays a wake-up, a `recv` and a decoder pass per 9 KB, and on a VM
/// every sleep and wake-up costs about 15 us of CPU besides. The mark never exceeds what the
/// frame still lacks, so a piece completes when its last byte arrives whatever the mark;
/// what waits is only the count of bytes seen, at most one piece's worth, and a connection
/// is stalled only after two piece times of silence. 256 KiB (a whole default piece) took
/// a single 50 Mbit/s pull from 34 context switches per MiB to 22-24 and its CPU down by
/// 3-5 %, against 64 KiB (docs/benchmarks.md, session 27).
pub const RECV_LOW_WATER_MAX: usize = 256 * 1024;

/// The mark is at most the receive buffer divided by this. The kernel grows the buffer for a
/// mark whose bytes (with their per-packet overhead) would not fit, and clamps the receive
/// window to the mark while it does, which would cap a fast link's throughput; a third
/// leaves room for that overhead.
pub const RECV_LOW_WATER_BUFFER_SHARE: usize = 3;

/// Below this many missing bytes the reader takes whatever arrives (low-water mark 1): a
/// setting per few packets would cost more than the wake-ups it saves.
pub const RECV_LOW_WATER_MIN: usize = 16 * 1024;

/// Bytes the decoder of a connection still needs to finish the frame it is in (0 when it
/// does not know: between frames, or before a frame's length arrived). The decoder sets it;
/// the socket reads it before each read, so the low-water mark never asks for bytes the peer
/// will not send.
#[derive(Clone, Debug, Default)]
pub struct FrameNeed(Arc<AtomicUsize>);

impl FrameNeed {
    pub fn set(&self, bytes: usize) {
        self.0.store(bytes, Ordering::Relaxed);
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// The low-water mark to hold while `need` bytes of the current frame are missing, given the
/// mark set now and the socket's receive buffer; `None` keeps the current one.
///
/// Lowered at once when the current mark exceeds what is missing (or the peer's last bytes
/// would wait for the idle timeout); raised only when that at least doubles it, to keep the
/// `setsockopt`s to a few per piece. At most a third of the receive buffer
/// ([`RECV_LOW_WATER_BUFFER_SHARE`]).
fn low_water(need: usize, current: usize, recv_buffer: usize) -> Option<usize> {
    let want = if need >= RECV_LOW_WATER_MIN {
        need.min(RECV_LOW_WATER_MAX).min(recv_buffer / RECV_LOW_WATER_BUFFER_SHARE).max(1)
    } else {
        1
    };
    let too_high = current > need.max(1);
    (too_high || want >= current.saturating_mul(2)).then_some(want).filter(|&w| w != current)
}

/// A plain TCP read half whose low-water mark follows its decoder's [`FrameNeed`].
struct LowWaterReader {
    inner: OwnedReadHalf,
    need: FrameNeed,
    current: usize,
}

impl LowWaterReader {
    fn adjust(&mut self) {
        let need = self.need.get();
        // Most reads change nothing: the receive buffer is only asked for when they may.
        let may_lower = self.current > need.max(1);
        let may_raise =
            need >= RECV_LOW_WATER_MIN && need.min(RECV_LOW_WATER_MAX) >= self.current.saturating_mul(2);
        if !may_lower && !may_raise {
            return;
        }
        let stream: &TcpStream = self.inner.as_ref();
        let recv_buffer = socket2::SockRef::from(stream).recv_buffer_size().unwrap_or(0);
        let Some(mark) = low_water(need, self.current, recv_buffer) else { return };
        let value = libc::c_int::try_from(mark).unwrap_or(1);
        if set_socket_option(stream, libc::SO_RCVLOWAT, value) {
            self.current = mark;
        }
    }
}

impl AsyncRead for LowWaterReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.adjust();
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

fn halves<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S) -> (ReadHalf, WriteHalf) {
    let (read, write) = tokio::io::split(stream);
    (Box::new(read), Box::new(write))
}

fn tcp_halves(stream: TcpStream) -> (ReadHalf, WriteHalf) {
    let (read, write) = stream.into_split();
    (Box::new(read), Box::new(write))
}

/// Connect to a peer: TCP within `connect`, then the TLS handshake (if on) within
/// `handshake`. Over plain TCP the read half's low-water mark follows `need` (over TLS the
/// record layer's buffering hides what the socket still has to receive).
pub async fn connect(
    addr: SocketAddr,
    connect: Duration,
    handshake: Duration,
    need: FrameNeed,
) -> Result<(ReadHalf, WriteHalf), String> {
    let stream = tokio::time::timeout(connect, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timeout".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    tune(&stream);
    let tls = shoal_tls::current();
    let Some(peer) = tls.peer() else {
        let (read, write) = stream.into_split();
        return Ok((Box::new(LowWaterReader { inner: read, need, current: 1 }), Box::new(write)));
    };
    connect_tls(peer, addr, stream, handshake).await
}

/// The TLS half of [`connect`], with `peer`'s configuration. The connection ends when the
/// server's certificate does.
async fn connect_tls(
    peer: &shoal_tls::PeerTls,
    addr: SocketAddr,
    stream: TcpStream,
    handshake: Duration,
) -> Result<(ReadHalf, WriteHalf), String> {
    let name = shoal_tls::ServerName::IpAddress(addr.ip().into());
    let mut stream =
        tokio::time::timeout(handshake, peer.connector.connect(name, shoal_tls::buffered(stream)))
            .await
            .map_err(|_| "TLS handshake timeout".to_string())?
            .map_err(|e| format!("TLS handshake: {e}"))?;
    let expires = shoal_tls::server_expires(stream.get_ref().1);
    stream.get_mut().0.grow();
    until_expiry(halves(stream), expires)
}

/// Accept a peer's connection: the TLS handshake (if on) within `handshake`, from a client
/// whose certificate the cluster CA signed for one of its nodes.
pub async fn accept(stream: TcpStream, handshake: Duration) -> Result<(ReadHalf, WriteHalf), String> {
    tune(&stream);
    let tls = shoal_tls::current();
    let Some(peer) = tls.peer() else { return Ok(tcp_halves(stream)) };
    accept_tls(peer, stream, handshake).await
}

/// The TLS half of [`accept`], with `peer`'s configuration. The role the client's certificate
/// proves is good while the certificate is: the connection ends at its expiry (a download
/// under way then goes on through a new connection, with the renewed certificate).
async fn accept_tls(
    peer: &shoal_tls::PeerTls,
    stream: TcpStream,
    handshake: Duration,
) -> Result<(ReadHalf, WriteHalf), String> {
    let (stream, expires) = accept_tls_stream(peer, stream, handshake).await?;
    until_expiry(halves(stream), expires)
}

/// The TLS stream [`accept_tls`] splits, and when the client's certificate expires. Its read
/// buffer stays the handshake's small one: the serving side reads only requests and haves
/// (a 256 KiB buffer on each of an origin's 1,024 peer connections was 256 MiB for nothing).
async fn accept_tls_stream(
    peer: &shoal_tls::PeerTls,
    stream: TcpStream,
    handshake: Duration,
) -> Result<(TlsServerStream, Option<std::time::SystemTime>), String> {
    let stream = tokio::time::timeout(handshake, peer.acceptor.accept(shoal_tls::buffered(stream)))
        .await
        .map_err(|_| "TLS handshake timeout".to_string())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    match shoal_tls::identity_of(stream.get_ref().1) {
        Some(id) if id.role.is_node() => {
            let expires = shoal_tls::identity_expires(stream.get_ref().1);
            Ok((stream, expires))
        }
        Some(id) => Err(format!("{id} is not a node")),
        None => Err("the client certificate names no Shoal role".into()),
    }
}

/// A TLS connection's halves, its read half ending at `expires` (the other end's
/// certificate's expiry; a connection reads for as long as it lives, so its loop ends then).
fn until_expiry(
    (read, write): (ReadHalf, WriteHalf),
    expires: Option<std::time::SystemTime>,
) -> Result<(ReadHalf, WriteHalf), String> {
    let Some(expires) = expires else { return Ok((read, write)) };
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .map_err(|_| "the other end's certificate has expired".to_string())?;
    Ok((Box::new(UntilExpiry { inner: read, expiry: Box::pin(tokio::time::sleep(left)) }), write))
}

/// A read half that fails once its connection's certificate has expired.
struct UntilExpiry {
    inner: ReadHalf,
    expiry: Pin<Box<tokio::time::Sleep>>,
}

impl AsyncRead for UntilExpiry {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.expiry.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the peer's certificate expired",
            )));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Peer TLS with the cluster CA `ca`, as node `name` whose certificate lives `life`.
    fn peer_tls(dir: &std::path::Path, ca: &shoal_tls::Issued, name: &str, life: Duration) -> shoal_tls::Tls {
        let ips = ["127.0.0.1".parse().unwrap()];
        let issued =
            shoal_tls::issue_for(ca, name, shoal_registry::identity::Role::Agent, &[], &ips, life).unwrap();
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
        std::fs::write(&cert, &issued.cert_pem).unwrap();
        std::fs::write(&key, &issued.key_pem).unwrap();
        std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
        shoal_tls::Tls::load(&shoal_tls::TlsSettings {
            cert: Some(cert),
            key: Some(key),
            cluster_ca: Some(dir.join("ca.pem")),
            ..Default::default()
        })
        .unwrap()
    }

    /// Over mutual TLS a peer connection ends when the other end's certificate does: the
    /// role it proved at the handshake is good only while the certificate is (a download
    /// under way outlived it before). Both ends' reads fail at the expiry of the other's
    /// certificate, though nothing arrives.
    #[tokio::test]
    async fn a_peer_connection_ends_when_the_other_ends_certificate_expires() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let dir = tempfile::tempdir().unwrap();
        let ca = shoal_tls::new_ca("test", 1).unwrap();
        let server = peer_tls(dir.path(), &ca, "server", Duration::from_secs(3600));
        let client = peer_tls(dir.path(), &ca, "client", Duration::from_secs(3));
        let (to_server, at_server) = connected_pair().await;
        let addr = to_server.peer_addr().unwrap();
        let handshake = Duration::from_secs(5);
        let (connected, accepted) = tokio::join!(
            connect_tls(client.peer().unwrap(), addr, to_server, handshake),
            accept_tls(server.peer().unwrap(), at_server, handshake),
        );
        let ((_client_read, mut client_write), (mut server_read, _server_write)) =
            (connected.unwrap(), accepted.unwrap());
        client_write.write_all(b"ping").await.unwrap();
        client_write.flush().await.unwrap();
        let mut buf = [0u8; 4];
        server_read.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping", "served while the certificate is valid");
        let started = std::time::Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(10), server_read.read(&mut buf)).await;
        let err = ended.expect("the read ends at the expiry").expect_err("an error, not data");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted, "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        // A certificate already expired is refused at the handshake's end.
        let (to_server, at_server) = connected_pair().await;
        let (_, accepted) = tokio::join!(
            connect_tls(client.peer().unwrap(), addr, to_server, handshake),
            accept_tls(server.peer().unwrap(), at_server, handshake),
        );
        assert!(accepted.is_err());
    }

    /// The serving side of a peer connection reads only requests and haves: its TLS read
    /// buffer stays the handshake's 4 KiB however much arrives (it grew to 256 KiB for the
    /// connection's life, 256 MiB on an origin at its 1,024 peer connections).
    #[tokio::test]
    async fn the_serving_side_keeps_a_small_tls_read_buffer() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let dir = tempfile::tempdir().unwrap();
        let ca = shoal_tls::new_ca("test", 1).unwrap();
        let server = peer_tls(dir.path(), &ca, "server", Duration::from_secs(3600));
        let client = peer_tls(dir.path(), &ca, "client", Duration::from_secs(3600));
        let (to_server, at_server) = connected_pair().await;
        let addr = to_server.peer_addr().unwrap();
        let handshake = Duration::from_secs(5);
        let (connected, accepted) = tokio::join!(
            connect_tls(client.peer().unwrap(), addr, to_server, handshake),
            accept_tls_stream(server.peer().unwrap(), at_server, handshake),
        );
        let ((_client_read, mut client_write), (mut stream, _)) = (connected.unwrap(), accepted.unwrap());
        let sent = vec![7u8; 512 * 1024];
        let writer = tokio::spawn(async move {
            client_write.write_all(&sent).await.unwrap();
            client_write.flush().await.unwrap();
            client_write
        });
        let mut got = vec![0u8; 512 * 1024];
        stream.read_exact(&mut got).await.unwrap();
        let _client_write = writer.await.unwrap();
        assert!(got.iter().all(|&b| b == 7));
        assert_eq!(stream.get_ref().0.capacity(), shoal_tls::TLS_HANDSHAKE_READ_BUFFER);
    }

    /// Both ends of a fresh loopback connection: the client's and the accepted one.
    async fn connected_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    /// Both ends of a peer connection bound their unsent bytes: the server's, which sends
    /// pieces, and the client's.
    #[tokio::test]
    async fn both_ends_bound_their_unsent_bytes() {
        let (client, server) = connected_pair().await;
        for stream in [&client, &server] {
            let before = socket2::SockRef::from(stream).tcp_notsent_lowat().unwrap();
            assert_ne!(before, NOT_SENT_LOW_WATER, "the kernel's default is unbounded");
            tune(stream);
            assert_eq!(socket2::SockRef::from(stream).tcp_notsent_lowat().unwrap(), NOT_SENT_LOW_WATER);
            assert!(stream.nodelay().unwrap());
        }
    }

    /// A `SOL_SOCKET` option's value, read back as `T`.
    fn socket_option<T: Copy + Default>(fd: i32, name: libc::c_int) -> T {
        let mut value = T::default();
        let mut len = std::mem::size_of::<T>() as libc::socklen_t;
        // SAFETY: an open socket and an out-pointer with its length.
        let rc =
            unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, name, (&mut value as *mut T).cast(), &mut len) };
        assert_eq!(rc, 0);
        value
    }

    fn pacing_cap(stream: &TcpStream) -> u64 {
        socket_option(stream.as_raw_fd(), libc::SO_MAX_PACING_RATE)
    }

    /// A paced socket carries the no-cap cap (which turns pacing on); others carry none.
    #[tokio::test]
    async fn a_paced_socket_has_pacing_on_without_a_cap() {
        let (client, server) = connected_pair().await;
        assert_eq!(pacing_cap(&server), u64::MAX, "unpaced by default");
        assert!(pace(&server));
        assert_eq!(pacing_cap(&server), PACED_WITHOUT_CAP);
        assert_eq!(pacing_cap(&client), u64::MAX, "the other end is untouched");
    }

    /// The mark rises to a share of the frame once its length is known, falls to what is
    /// missing near its end, and is 1 between frames.
    #[test]
    fn the_low_water_mark_follows_the_frame() {
        let buffer = 1 << 20;
        assert_eq!(low_water(0, 1, buffer), None, "between frames: take what comes");
        assert_eq!(low_water(1 << 20, 1, buffer), Some(RECV_LOW_WATER_MAX));
        assert_eq!(low_water(1 << 20, 1, 384 * 1024), Some(128 * 1024), "a third of the buffer");
        assert_eq!(low_water(1 << 20, RECV_LOW_WATER_MAX, buffer), None);
        assert_eq!(low_water(96 * 1024, RECV_LOW_WATER_MAX, buffer), Some(96 * 1024), "not above the need");
        assert_eq!(low_water(50 * 1024, 40 * 1024, buffer), None, "no setsockopt for a small rise");
        assert_eq!(low_water(9000, 40 * 1024, buffer), Some(1), "the last packets: each as it comes");
        assert_eq!(low_water(0, 40 * 1024, buffer), Some(1));
    }

    fn rcvlowat(fd: i32) -> i32 {
        socket_option(fd, libc::SO_RCVLOWAT)
    }

    /// Over a real socket: while a piece's bytes trickle in, the reader sleeps until tens of
    /// KiB are there; the piece's last bytes and a small frame after it still come through
    /// at once (a mark above what the peer sends would hold them until the idle timeout).
    #[tokio::test]
    async fn a_piece_wakes_its_reader_in_big_steps_and_its_tail_is_not_held() {
        use crate::inbound::InboundCodec;
        use crate::wire::{Message, PeerCodec};
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        use tokio_util::codec::{Encoder, FramedRead};

        let (client, mut server) = connected_pair().await;
        let fd = client.as_raw_fd();
        let mut codec = InboundCodec::new();
        codec.allow_pieces();
        codec.expect(7, 1 << 20);
        let need = codec.need();
        let (read, _write) = client.into_split();
        let mut frames = FramedRead::new(LowWaterReader { inner: read, need, current: 1 }, codec);

        let data = vec![5u8; 1 << 20];
        let mut wire = bytes::BytesMut::new();
        PeerCodec::default()
            .encode(Message::Piece { index: 7, data: data.clone().into() }, &mut wire)
            .unwrap();
        PeerCodec::default().encode(Message::Have(3), &mut wire).unwrap();
        let half = wire.len() / 2;
        server.write_all(&wire[..half]).await.unwrap();
        let reading = tokio::spawn(async move {
            let piece = frames.next().await.unwrap().unwrap();
            let have = frames.next().await.unwrap().unwrap();
            (piece, have, frames)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mark = rcvlowat(fd);
        assert!(mark >= RECV_LOW_WATER_MIN as i32, "mid-piece mark {mark}");
        // The rest in packet-sized writes, the last of them smaller than the mark.
        for chunk in wire[half..].chunks(9000) {
            server.write_all(chunk).await.unwrap();
        }
        let (piece, have, mut frames) =
            tokio::time::timeout(Duration::from_secs(2), reading).await.expect("tail held").unwrap();
        assert_eq!(piece, Message::Piece { index: 7, data: data.into() });
        assert_eq!(have, Message::Have(3));
        // A lone small frame later: the mark left from the piece must not hold it.
        let mut have = bytes::BytesMut::new();
        PeerCodec::default().encode(Message::Have(4), &mut have).unwrap();
        server.write_all(&have).await.unwrap();
        let next =
            tokio::time::timeout(Duration::from_secs(2), frames.next()).await.expect("small frame held");
        assert_eq!(next.unwrap().unwrap(), Message::Have(4));
        assert_eq!(rcvlowat(fd), 1);
    }
}
