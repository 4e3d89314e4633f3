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
    let _ = stream.set_nodelay(true);
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
    let _ = stream.set_nodelay(true);
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
