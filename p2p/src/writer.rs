//! The sending half of a peer connection.
//!
//! Serving pieces is most of what a seeder does, so a piece goes to the socket straight from
//! the buffer it was read into: its frame header and its data leave in one vectored write,
//! instead of being copied into a frame buffer first as a `tokio_util` `FramedWrite` would.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Encoder;

use crate::bitfield::Bitfield;
use crate::wire::{Message, PeerCodec, WireError};

/// How long one message may take to leave: a peer that stops reading must not hold a
/// connection (and the piece it pins in memory) forever. Generous, because a rate-limited
/// peer takes a while to drain a 4 MiB piece.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes [`Message`]s to `W`, each fully sent (or failed) when [`PeerWriter::send`] returns.
pub struct PeerWriter<W> {
    io: W,
    codec: PeerCodec,
    /// Frames of small messages and piece headers; empty between sends.
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> PeerWriter<W> {
    /// A writer that frames with `codec` (its frame limit applies to what is sent).
    pub fn new(io: W, codec: PeerCodec) -> PeerWriter<W> {
        PeerWriter { io, codec, buf: BytesMut::with_capacity(256) }
    }

    /// Send one message, within [`SEND_TIMEOUT`].
    pub async fn send(&mut self, msg: Message) -> Result<(), WireError> {
        within_send_timeout(self.write(msg)).await
    }

    /// Send small messages in one write (a piece goes through [`send`](Self::send)), within
    /// [`SEND_TIMEOUT`]: a batch of haves costs the peer one wake-up, not one per piece.
    pub async fn send_batch(&mut self, msgs: impl IntoIterator<Item = Message>) -> Result<(), WireError> {
        self.buf.clear();
        for msg in msgs {
            self.codec.encode(msg, &mut self.buf)?;
        }
        let buf = &mut self.buf;
        within_send_timeout(async { Ok(self.io.write_all_buf(buf).await?) }).await
    }

    async fn write(&mut self, msg: Message) -> Result<(), WireError> {
        self.buf.clear();
        match msg {
            Message::Piece { index, data } => {
                self.codec.encode_piece_header(index, data.len(), &mut self.buf)?;
                let mut frame = (&mut self.buf).chain(data);
                self.io.write_all_buf(&mut frame).await?;
            }
            other => {
                self.codec.encode(other, &mut self.buf)?;
                self.io.write_all_buf(&mut self.buf).await?;
            }
        }
        Ok(())
    }
}

/// `send` fails with a timeout past [`SEND_TIMEOUT`].
async fn within_send_timeout(
    send: impl std::future::Future<Output = Result<(), WireError>>,
) -> Result<(), WireError> {
    match tokio::time::timeout(SEND_TIMEOUT, send).await {
        Ok(result) => result,
        Err(_) => Err(WireError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "peer did not read for too long",
        ))),
    }
}

/// Send `have` for every piece in `now` that `advertised` lacks, then remember `now` as
/// advertised: how each side of a connection keeps the other up to date.
pub async fn send_new_haves<W>(
    sink: &mut PeerWriter<W>,
    advertised: &mut Bitfield,
    now: Bitfield,
) -> Result<(), WireError>
where
    W: AsyncWrite + Unpin,
{
    let new: Vec<u32> = now.iter_set().filter(|&i| !advertised.get(i)).collect();
    *advertised = now;
    if new.is_empty() {
        return Ok(());
    }
    sink.send_batch(new.into_iter().map(Message::Have)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures_util::StreamExt;
    use tokio_util::codec::FramedRead;

    #[tokio::test]
    async fn what_it_writes_decodes_to_the_same_messages() {
        let (a, b) = tokio::io::duplex(64);
        let sent = vec![
            Message::Have(3),
            Message::Piece { index: 7, data: Bytes::from(vec![5u8; 100_000]) },
            Message::Request { index: 9 },
            Message::Piece { index: 0, data: Bytes::new() },
            Message::Error { code: 2, message: "bye".into() },
        ];
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            let mut w = PeerWriter::new(a, PeerCodec::default());
            for m in sent {
                w.send(m).await.unwrap();
            }
        });
        let got: Vec<Message> = FramedRead::new(b, PeerCodec::default()).map(|m| m.unwrap()).collect().await;
        writer.await.unwrap();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn a_piece_over_the_frame_limit_is_refused_and_nothing_is_written() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = PeerWriter::new(a, PeerCodec::new(1024));
        let big = Message::Piece { index: 1, data: Bytes::from(vec![0u8; 2048]) };
        assert!(matches!(w.send(big).await, Err(WireError::FrameTooLarge { .. })));
        drop(w);
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut b, &mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn new_haves_are_sent_once() {
        let (a, b) = tokio::io::duplex(1024);
        let mut w = PeerWriter::new(a, PeerCodec::default());
        let mut advertised = Bitfield::new(8);
        advertised.set(1).unwrap();
        let mut now = advertised.clone();
        now.set(3).unwrap();
        now.set(6).unwrap();
        send_new_haves(&mut w, &mut advertised, now.clone()).await.unwrap();
        assert_eq!(advertised, now);
        send_new_haves(&mut w, &mut advertised, now).await.unwrap();
        drop(w);
        let got: Vec<Message> = FramedRead::new(b, PeerCodec::default()).map(|m| m.unwrap()).collect().await;
        assert_eq!(got, [Message::Have(3), Message::Have(6)]);
    }
}
