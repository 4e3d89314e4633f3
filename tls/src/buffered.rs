//! The read buffering under a TLS stream: small until the handshake is done, large after.
//!
//! rustls reads the socket 4 KiB at a time, so a stream that carries bulk data reads the
//! socket in large pieces underneath ([`TLS_READ_BUFFER`]). Allocated when the connection
//! is accepted, that buffer let every client that opened a connection and sent nothing hold
//! 256 KiB until the handshake deadline: a listener's 4,096 connections were 1 GiB. The
//! buffer is [`TLS_HANDSHAKE_READ_BUFFER`] until [`Buffered::grow`] (called once the
//! handshake has passed), and grows at the first read that finds it empty.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};

/// Size of the read buffer under a TLS stream that carries bulk data, once its handshake is
/// done. rustls reads the socket 4 KiB at a time (a 16 KiB record takes four reads, and its
/// buffer shrinks back whenever it drains); reading the socket in large pieces underneath
/// turns those system calls into copies.
pub const TLS_READ_BUFFER: usize = 256 * 1024;

/// Size of the read buffer while the handshake runs (a ClientHello is a few hundred bytes).
pub const TLS_HANDSHAKE_READ_BUFFER: usize = 4 * 1024;

/// `stream` with read buffering for a TLS layer on top: [`TLS_HANDSHAKE_READ_BUFFER`] until
/// [`Buffered::grow`], then [`TLS_READ_BUFFER`]. Writes pass straight through.
pub fn buffered<S: AsyncRead + AsyncWrite + Unpin>(stream: S) -> Buffered<S> {
    let reader = Some(BufReader::with_capacity(TLS_HANDSHAKE_READ_BUFFER, stream));
    Buffered { reader, grow: false, capacity: TLS_HANDSHAKE_READ_BUFFER }
}

/// See [`buffered`].
pub struct Buffered<S> {
    /// `None` only within a poll that swaps the buffer.
    reader: Option<BufReader<S>>,
    /// The large buffer is due (the handshake is done) but not yet in place.
    grow: bool,
    /// The read buffer's size.
    capacity: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Buffered<S> {
    /// The handshake is done: the next read that finds the small buffer empty replaces it
    /// with a [`TLS_READ_BUFFER`] one (bytes already buffered are read out first).
    pub fn grow(&mut self) {
        self.grow = true;
    }

    /// Bytes the read buffer can hold now.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn reader(&mut self) -> io::Result<Pin<&mut BufReader<S>>> {
        if self.grow && self.reader.as_ref().is_some_and(|r| r.buffer().is_empty()) {
            if let Some(small) = self.reader.take() {
                self.reader = Some(BufReader::with_capacity(TLS_READ_BUFFER, small.into_inner()));
                self.grow = false;
                self.capacity = TLS_READ_BUFFER;
            }
        }
        match self.reader.as_mut() {
            Some(r) => Ok(Pin::new(r)),
            None => Err(io::Error::other("TLS read buffer lost")),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Buffered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.reader() {
            Ok(r) => r.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Buffered<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.reader.as_mut() {
            Some(r) => Pin::new(r).poll_write(cx, data),
            None => Poll::Ready(Err(io::Error::other("TLS stream lost"))),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.reader.as_mut() {
            Some(r) => Pin::new(r).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(io::Error::other("TLS stream lost"))),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.reader.as_ref().is_some_and(|r| r.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.reader.as_mut() {
            Some(r) => Pin::new(r).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.reader.as_mut() {
            Some(r) => Pin::new(r).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Small until told to grow; the bytes buffered when told are read out before the
    /// buffer is replaced, and every byte arrives once, in order.
    #[tokio::test]
    async fn the_buffer_grows_after_the_handshake_and_loses_nothing() {
        let (mut far, near) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        far.write_all(&data).await.unwrap();
        drop(far);
        let mut stream = buffered(near);
        assert_eq!(stream.capacity(), TLS_HANDSHAKE_READ_BUFFER);
        let mut got = vec![0u8; 100];
        stream.read_exact(&mut got).await.unwrap();
        stream.grow();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        got.extend(rest);
        assert_eq!(got, data);
        assert_eq!(stream.capacity(), TLS_READ_BUFFER);
    }
}
