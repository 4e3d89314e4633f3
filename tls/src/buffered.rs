//! The read buffering under a TLS stream: small until the handshake is done, large after.
//!
//! rustls reads the socket 4 KiB at a time, so a stream that carries bulk data reads the
//! socket in large pieces underneath ([`TLS_READ_BUFFER`]). Allocated when the connection
//! is accepted, that buffer let every client that opened a connection and sent nothing hold
//! 256 KiB until the handshake deadline: a listener's 4,096 connections were 1 GiB. The
//! buffer is [`TLS_HANDSHAKE_READ_BUFFER`] until [`Buffered::grow`] (called once the
//! handshake has passed), and grows at the first read that finds it empty; or, with
//! [`Buffered::grow_when_busy`] (an HTTP server's connections), only while bulk data arrives.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, BufReader, ReadBuf};

/// Size of the read buffer under a TLS stream that carries bulk data, once its handshake is
/// done. rustls reads the socket 4 KiB at a time (a 16 KiB record takes four reads, and its
/// buffer shrinks back whenever it drains); reading the socket in large pieces underneath
/// turns those system calls into copies.
pub const TLS_READ_BUFFER: usize = 256 * 1024;

/// Size of the read buffer while the handshake runs (a ClientHello is a few hundred bytes).
pub const TLS_HANDSHAKE_READ_BUFFER: usize = 4 * 1024;

/// `stream` with read buffering for a TLS layer on top: [`TLS_HANDSHAKE_READ_BUFFER`] until
/// [`Buffered::grow`] or [`Buffered::grow_when_busy`]. Writes pass straight through.
pub fn buffered<S: AsyncRead + AsyncWrite + Unpin>(stream: S) -> Buffered<S> {
    let reader = Some(BufReader::with_capacity(TLS_HANDSHAKE_READ_BUFFER, stream));
    Buffered {
        reader,
        growth: Growth::Never,
        grow: false,
        capacity: TLS_HANDSHAKE_READ_BUFFER,
        grown: None,
        episode: None,
        shrink_at: None,
    }
}

/// When the read buffer is [`TLS_READ_BUFFER`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Growth {
    /// Never: the handshake runs.
    Never,
    /// From the next read that finds the small buffer empty on (a peer connection: bulk data
    /// both ways).
    Always,
    /// While bulk data arrives: after a read of the socket filled the small buffer, until a
    /// read finds the buffer empty and the socket with nothing to read (then it is small
    /// again) once the stream has brought little ([`BULK_BYTES`]) or the large buffer has been in place a
    /// while ([`BULK_KEPT`]). An HTTP server's connections mostly read request heads, and an
    /// idle one (a pooled keep-alive, a client that finished its handshake and sent nothing)
    /// must not hold 256 KiB: a listener's 4,096 connections were 1 GiB. An upload's socket
    /// runs dry at most wake-ups; shrinking at each, every next one zero-filled 256 KiB anew.
    WhenBusy,
}

/// Bytes a stream must have brought (with no pause over [`EPISODE_GAP`]) for a dry socket
/// not to shrink the large buffer ([`Growth::WhenBusy`]): a stream, not a request head that
/// happened to fill 4 KiB.
pub const BULK_BYTES: u64 = 1 << 20;

/// A pause in the data longer than this ends a stream (see [`Growth::WhenBusy`]).
pub const EPISODE_GAP: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a large buffer that reads a stream is kept through dry sockets
/// ([`Growth::WhenBusy`]); then the next dry socket shrinks it (grown again at the next full
/// read): at most one fresh buffer a second for a busy upload.
pub const BULK_KEPT: std::time::Duration = std::time::Duration::from_secs(1);

/// See [`buffered`].
pub struct Buffered<S> {
    /// `None` only within a poll that swaps the buffer.
    reader: Option<BufReader<S>>,
    growth: Growth,
    /// The large buffer is due but not yet in place (it is swapped in when the small one is
    /// empty, so no buffered byte is lost).
    grow: bool,
    /// The read buffer's size.
    capacity: usize,
    /// When the large buffer was put in place.
    grown: Option<std::time::Instant>,
    /// The bytes read since data began to arrive with no gap over [`EPISODE_GAP`], and when
    /// the last came.
    episode: Option<(std::time::Instant, u64)>,
    /// Wakes the reader when a large buffer kept through a dry socket may go.
    shrink_at: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Buffered<S> {
    /// The handshake is done: the next read that finds the small buffer empty replaces it
    /// with a [`TLS_READ_BUFFER`] one (bytes already buffered are read out first), for good.
    pub fn grow(&mut self) {
        self.growth = Growth::Always;
        self.grow = true;
    }

    /// The handshake is done: the buffer is large only while bulk data arrives (see
    /// [`Growth::WhenBusy`]).
    pub fn grow_when_busy(&mut self) {
        self.growth = Growth::WhenBusy;
    }

    /// Bytes the read buffer can hold now.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Put a buffer of `capacity` in place if the current one is empty.
    fn swap(&mut self, capacity: usize) {
        if self.reader.as_ref().is_some_and(|r| r.buffer().is_empty()) {
            if let Some(old) = self.reader.take() {
                self.reader = Some(BufReader::with_capacity(capacity, old.into_inner()));
                self.capacity = capacity;
                self.grown = (capacity == TLS_READ_BUFFER).then(std::time::Instant::now);
            }
        }
    }

    fn reader(&mut self) -> io::Result<Pin<&mut BufReader<S>>> {
        if self.grow && self.reader.as_ref().is_some_and(|r| r.buffer().is_empty()) {
            self.swap(TLS_READ_BUFFER);
            self.grow = false;
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
        if self.growth != Growth::WhenBusy {
            return match self.reader() {
                Ok(r) => r.poll_read(cx, buf),
                Err(e) => Poll::Ready(Err(e)),
            };
        }
        let this = &mut *self;
        let mut reader = match this.reader() {
            Ok(r) => r,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let reads_socket = reader.buffer().is_empty();
        let filled = match reader.as_mut().poll_fill_buf(cx) {
            Poll::Pending => {
                // Nothing to read: idle, or between bursts. Small again until bulk comes,
                // unless a stream is under way (see `Growth::WhenBusy`).
                let streaming = this.episode.is_some_and(|(_, read)| read >= BULK_BYTES)
                    && this.grown.is_some_and(|at| at.elapsed() < BULK_KEPT);
                if reads_socket && this.capacity == TLS_READ_BUFFER {
                    match this.grown.filter(|_| streaming) {
                        // Kept through this dry socket, but woken when it may go: a stream
                        // that has ended (a push's last layer) must not keep it while idle.
                        Some(at) => {
                            let until = tokio::time::Instant::from_std(at + BULK_KEPT);
                            let timer = this
                                .shrink_at
                                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                            if timer.deadline() != until {
                                timer.as_mut().reset(until);
                            }
                            if timer.as_mut().poll(cx).is_ready() {
                                this.shrink_at = None;
                                this.swap(TLS_HANDSHAKE_READ_BUFFER);
                            }
                        }
                        None => {
                            this.shrink_at = None;
                            this.swap(TLS_HANDSHAKE_READ_BUFFER);
                        }
                    }
                }
                return Poll::Pending;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(data)) => {
                let n = data.len().min(buf.remaining());
                buf.put_slice(&data[..n]);
                (n, data.len())
            }
        };
        let (taken, available) = filled;
        reader.consume(taken);
        if reads_socket {
            let now = std::time::Instant::now();
            this.episode = match this.episode {
                Some((last, read)) if now.duration_since(last) <= EPISODE_GAP => {
                    Some((now, read + available as u64))
                }
                _ => Some((now, available as u64)),
            };
        }
        if reads_socket
            && available == TLS_HANDSHAKE_READ_BUFFER
            && this.capacity == TLS_HANDSHAKE_READ_BUFFER
        {
            this.grow = true;
        }
        Poll::Ready(Ok(()))
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

    /// An HTTP server's connection: small while it reads request heads or waits, large while
    /// a body streams in, small again once the socket has nothing to read; every byte
    /// arrives once, in order.
    #[tokio::test]
    async fn a_busy_buffer_is_large_only_while_bulk_data_arrives() {
        let (mut far, near) = tokio::io::duplex(1 << 20);
        let mut stream = buffered(near);
        stream.grow_when_busy();
        // A request head, then nothing: the buffer stays small.
        far.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut head = [0u8; 18];
        stream.read_exact(&mut head).await.unwrap();
        let mut one = [0u8; 1];
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), stream.read(&mut one)).await;
        assert!(waited.is_err(), "nothing was sent");
        assert_eq!(stream.capacity(), TLS_HANDSHAKE_READ_BUFFER);
        // A body: large while it streams.
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        far.write_all(&data).await.unwrap();
        let mut got = vec![0u8; data.len()];
        let mut read = 0;
        let mut largest = 0;
        while read < data.len() {
            let n = stream.read(&mut got[read..(read + 16 * 1024).min(data.len())]).await.unwrap();
            read += n;
            largest = largest.max(stream.capacity());
        }
        assert_eq!(got, data);
        assert_eq!(largest, TLS_READ_BUFFER);
        // Idle again: small (600 KB is not a stream).
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), stream.read(&mut one)).await;
        assert!(waited.is_err(), "nothing was sent");
        assert_eq!(stream.capacity(), TLS_HANDSHAKE_READ_BUFFER);
        // A stream (over BULK_BYTES) keeps its buffer through a dry socket for BULK_KEPT, then
        // shrinks at the next.
        let stream_data = vec![7u8; 2 << 20];
        let sent = stream_data.clone();
        // Past the duplex's 1 MiB: written while read.
        let writer = tokio::spawn(async move {
            far.write_all(&sent).await.unwrap();
            far
        });
        let mut sink = vec![0u8; stream_data.len()];
        stream.read_exact(&mut sink).await.unwrap();
        assert_eq!(sink, stream_data);
        let mut far = writer.await.unwrap();
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), stream.read(&mut one)).await;
        assert!(waited.is_err(), "nothing was sent");
        assert_eq!(stream.capacity(), TLS_READ_BUFFER, "a stream's buffer went at a dry socket");
        // Idle after the stream, with a read waiting (as hyper's for the next request head):
        // its task is woken once BULK_KEPT has passed, with no byte sent, and the read it
        // polls again lets the buffer go.
        struct Wakes(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Wakes {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let wakes = std::sync::Arc::new(Wakes(std::sync::atomic::AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        {
            let mut read = std::pin::pin!(stream.read(&mut one));
            assert!(read.as_mut().poll(&mut cx).is_pending());
            tokio::time::sleep(BULK_KEPT + std::time::Duration::from_millis(300)).await;
            assert!(wakes.0.load(std::sync::atomic::Ordering::SeqCst) >= 1, "not woken to let the buffer go");
            assert!(read.as_mut().poll(&mut cx).is_pending(), "nothing was sent");
        }
        assert_eq!(stream.capacity(), TLS_HANDSHAKE_READ_BUFFER, "an idle stream's buffer stayed");
        far.write_all(b"x").await.unwrap();
        drop(far);
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"x");
    }
}
