//! The byte stream a peer connection runs over: plain TCP, or mutual TLS when this process's
//! TLS context has it ([`shoal_tls::Tls::peer`]), so only the cluster's own nodes can ask
//! for pieces or serve them. The rest of the protocol sees two boxed halves either way.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// The receiving half of a peer connection.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The sending half of a peer connection.
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// Unsent bytes a peer socket may hold before a write waits (`TCP_NOTSENT_LOWAT`). Without a
/// bound the kernel takes megabytes of pieces at once, so the server counts a piece as sent
/// (and starts the next, which a cancel can then no longer stop) seconds before its bytes
/// leave: on 50 Mbit/s links, with 512 KiB pieces, half of a 20-host fleet's duplicate
/// requests arrived whole. 128 KiB is 20 ms at 50 Mbit/s; a write wakes about every
/// 64 KiB sent.
pub const NOT_SENT_LOW_WATER: u32 = 128 * 1024;

/// Nagle off (requests and `have`s are small and urgent) and the unsent-bytes bound.
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(stream).set_tcp_notsent_lowat(NOT_SENT_LOW_WATER);
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
/// `handshake`.
pub async fn connect(
    addr: SocketAddr,
    connect: Duration,
    handshake: Duration,
) -> Result<(ReadHalf, WriteHalf), String> {
    let stream = tokio::time::timeout(connect, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timeout".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    tune(&stream);
    let tls = shoal_tls::current();
    let Some(peer) = tls.peer() else { return Ok(tcp_halves(stream)) };
    let name = shoal_tls::ServerName::IpAddress(addr.ip().into());
    let stream = tokio::time::timeout(handshake, peer.connector.connect(name, shoal_tls::buffered(stream)))
        .await
        .map_err(|_| "TLS handshake timeout".to_string())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    Ok(halves(stream))
}

/// Accept a peer's connection: the TLS handshake (if on) within `handshake`, from a client
/// whose certificate the cluster CA signed for one of its nodes.
pub async fn accept(stream: TcpStream, handshake: Duration) -> Result<(ReadHalf, WriteHalf), String> {
    tune(&stream);
    let tls = shoal_tls::current();
    let Some(peer) = tls.peer() else { return Ok(tcp_halves(stream)) };
    let stream = tokio::time::timeout(handshake, peer.acceptor.accept(shoal_tls::buffered(stream)))
        .await
        .map_err(|_| "TLS handshake timeout".to_string())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    match shoal_tls::identity_of(stream.get_ref().1) {
        Some(id) if id.role.is_node() => Ok(halves(stream)),
        Some(id) => Err(format!("{id} is not a node")),
        None => Err("the client certificate names no Shoal role".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ends of a peer connection bound their unsent bytes: the server's, which sends
    /// pieces, and the client's.
    #[tokio::test]
    async fn both_ends_bound_their_unsent_bytes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (client, (server, _)) = (client.unwrap(), accepted.unwrap());
        for stream in [&client, &server] {
            let before = socket2::SockRef::from(stream).tcp_notsent_lowat().unwrap();
            assert_ne!(before, NOT_SENT_LOW_WATER, "the kernel's default is unbounded");
            tune(stream);
            assert_eq!(socket2::SockRef::from(stream).tcp_notsent_lowat().unwrap(), NOT_SENT_LOW_WATER);
            assert!(stream.nodelay().unwrap());
        }
    }
}
