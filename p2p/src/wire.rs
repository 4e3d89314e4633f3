//! The peer protocol's framing: messages to and from length-prefixed binary frames.
//!
//! A frame is a u32 big-endian length of what follows, then (unless the length is zero, a
//! keep-alive) a one-byte message type and its payload. All integers are big-endian. Payloads:
//!
//! | type | message   | payload                                                              |
//! |------|-----------|----------------------------------------------------------------------|
//! | 0    | handshake | version u8, digest (u16 length + UTF-8), peer id (20 bytes), bitfield (rest) |
//! | 1    | have      | index u32                                                            |
//! | 2    | request   | index u32 (always a whole piece)                                     |
//! | 3    | piece     | index u32, data (rest)                                               |
//! | 4    | cancel    | index u32                                                            |
//! | 5    | error     | code u16, message (rest, UTF-8, at most 1 KiB)                       |
//!
//! Everything here comes from untrusted peers, so the decoder checks every field and never
//! panics: oversized frames are refused from their length prefix alone, before any buffering.
//! Whether a bitfield or piece fits the blob is the caller's check (it knows the metainfo).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use shoal_registry::Digest;
use tokio_util::codec::{Decoder, Encoder};

use crate::metainfo::MAX_PIECE_LENGTH;
use crate::peer::{PeerId, PEER_ID_LEN};

/// The protocol version sent in the handshake; peers with another version are refused.
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest error message text in bytes, so an error frame cannot be used to push bulk data.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// Default frame limit: the largest piece plus room for the header.
pub const DEFAULT_MAX_FRAME: usize = MAX_PIECE_LENGTH as usize + 64;

/// Bytes in the length prefix.
pub(crate) const LEN_PREFIX: usize = 4;

const TYPE_HANDSHAKE: u8 = 0;
const TYPE_HAVE: u8 = 1;
const TYPE_REQUEST: u8 = 2;
pub(crate) const TYPE_PIECE: u8 = 3;
const TYPE_CANCEL: u8 = 4;
const TYPE_ERROR: u8 = 5;

/// One message of the peer protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// First message each way: which blob, who we are, and which pieces we already have.
    Handshake { version: u8, digest: Digest, peer_id: PeerId, bitfield: Bytes },
    /// The sender now has this piece.
    Have(u32),
    /// Please send this whole piece.
    Request { index: u32 },
    /// A whole piece, in answer to a request.
    Piece { index: u32, data: Bytes },
    /// Never mind the request for this piece (someone else delivered it first).
    Cancel(u32),
    /// The sender is giving up on the connection (or a request) and says why.
    Error { code: u16, message: String },
    /// Nothing; keeps idle connections from being timed out.
    KeepAlive,
}

impl Message {
    /// The message's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Handshake { .. } => "handshake",
            Message::Have(_) => "have",
            Message::Request { .. } => "request",
            Message::Piece { .. } => "piece",
            Message::Cancel(_) => "cancel",
            Message::Error { .. } => "error",
            Message::KeepAlive => "keep-alive",
        }
    }
}

/// Why bytes are not a valid frame, or a message cannot be framed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("i/o error on the peer connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("piece {index} came in a frame of {len} bytes, not its {expected}")]
    PieceLength { index: u32, len: usize, expected: usize },
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("{message} frame is truncated")]
    Truncated { message: &'static str },
    #[error("{message} frame has {extra} trailing bytes")]
    TrailingBytes { message: &'static str, extra: usize },
    #[error("invalid digest in handshake: {0}")]
    InvalidDigest(String),
    #[error("error message is not valid UTF-8")]
    InvalidUtf8,
    #[error("error message of {0} bytes exceeds {MAX_ERROR_MESSAGE}")]
    ErrorMessageTooLong(usize),
}

/// The `tokio_util` codec for peer connections. Peers read with `FramedRead::new(read_half,
/// PeerCodec::default())` and send with the `writer` module's `PeerWriter`, which frames
/// pieces without copying them; `Framed` works too (the tests use it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCodec {
    /// Largest frame accepted or sent (length prefix excluded).
    pub max_frame: usize,
}

impl Default for PeerCodec {
    fn default() -> Self {
        PeerCodec { max_frame: DEFAULT_MAX_FRAME }
    }
}

impl PeerCodec {
    /// A codec with a custom frame limit (e.g. smaller for tests or memory-tight agents).
    pub fn new(max_frame: usize) -> PeerCodec {
        PeerCodec { max_frame }
    }
}

impl Decoder for PeerCodec {
    type Item = Message;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, WireError> {
        let Some(prefix) = src.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.max_frame {
            return Err(WireError::FrameTooLarge { len, max: self.max_frame });
        }
        let needed = LEN_PREFIX + len;
        if src.len() < needed {
            // Bounded by `max_frame`, checked above.
            src.reserve(needed - src.len());
            return Ok(None);
        }
        src.advance(LEN_PREFIX);
        if len == 0 {
            return Ok(Some(Message::KeepAlive));
        }
        let frame = src.split_to(len).freeze();
        parse(frame).map(Some)
    }
}

/// Reads fields off a frame body, turning every shortfall into `Truncated`.
struct Reader {
    buf: Bytes,
    message: &'static str,
}

impl Reader {
    fn truncated(&self) -> WireError {
        WireError::Truncated { message: self.message }
    }

    fn take(&mut self, n: usize) -> Result<Bytes, WireError> {
        if self.buf.len() < n {
            return Err(self.truncated());
        }
        Ok(self.buf.split_to(n))
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// Insist the frame was fully consumed.
    fn end(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes { message: self.message, extra: self.buf.len() })
        }
    }
}

/// Parse a non-empty frame body (type byte and payload).
fn parse(mut frame: Bytes) -> Result<Message, WireError> {
    let Some(&ty) = frame.first() else {
        return Err(WireError::Truncated { message: "frame" });
    };
    frame.advance(1);
    let message = match ty {
        TYPE_HANDSHAKE => "handshake",
        TYPE_HAVE => "have",
        TYPE_REQUEST => "request",
        TYPE_PIECE => "piece",
        TYPE_CANCEL => "cancel",
        TYPE_ERROR => "error",
        other => return Err(WireError::UnknownType(other)),
    };
    let mut r = Reader { buf: frame, message };
    let msg = match ty {
        TYPE_HANDSHAKE => {
            let version = r.u8()?;
            let digest_len = usize::from(r.u16()?);
            let digest_bytes = r.take(digest_len)?;
            let digest = std::str::from_utf8(&digest_bytes)
                .map_err(|_| WireError::InvalidDigest("not UTF-8".into()))?
                .parse::<Digest>()
                .map_err(|e| WireError::InvalidDigest(e.to_string()))?;
            let mut peer_id = [0u8; PEER_ID_LEN];
            peer_id.copy_from_slice(&r.take(PEER_ID_LEN)?);
            let bitfield = r.rest();
            Message::Handshake { version, digest, peer_id: PeerId(peer_id), bitfield }
        }
        TYPE_HAVE => Message::Have(r.u32()?),
        TYPE_REQUEST => Message::Request { index: r.u32()? },
        TYPE_CANCEL => Message::Cancel(r.u32()?),
        TYPE_PIECE => {
            let index = r.u32()?;
            Message::Piece { index, data: r.rest() }
        }
        _ => {
            let code = r.u16()?;
            let text = r.rest();
            if text.len() > MAX_ERROR_MESSAGE {
                return Err(WireError::ErrorMessageTooLong(text.len()));
            }
            let message = String::from_utf8(text.to_vec()).map_err(|_| WireError::InvalidUtf8)?;
            Message::Error { code, message }
        }
    };
    r.end()?;
    Ok(msg)
}

impl Encoder<Message> for PeerCodec {
    type Error = WireError;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), WireError> {
        let body_len = match &msg {
            Message::KeepAlive => 0,
            Message::Handshake { digest, bitfield, .. } => {
                1 + 1 + 2 + digest.to_string().len() + PEER_ID_LEN + bitfield.len()
            }
            Message::Have(_) | Message::Request { .. } | Message::Cancel(_) => 1 + 4,
            Message::Piece { data, .. } => 1 + 4 + data.len(),
            Message::Error { message, .. } => {
                if message.len() > MAX_ERROR_MESSAGE {
                    return Err(WireError::ErrorMessageTooLong(message.len()));
                }
                1 + 2 + message.len()
            }
        };
        if body_len > self.max_frame {
            return Err(WireError::FrameTooLarge { len: body_len, max: self.max_frame });
        }
        let prefix = u32::try_from(body_len)
            .map_err(|_| WireError::FrameTooLarge { len: body_len, max: self.max_frame })?;
        dst.reserve(LEN_PREFIX + body_len);
        dst.put_u32(prefix);
        match msg {
            Message::KeepAlive => {}
            Message::Handshake { version, digest, peer_id, bitfield } => {
                let digest = digest.to_string();
                dst.put_u8(TYPE_HANDSHAKE);
                dst.put_u8(version);
                // A digest string is at most ~135 bytes, far below u16::MAX.
                dst.put_u16(u16::try_from(digest.len()).unwrap_or(u16::MAX));
                dst.put_slice(digest.as_bytes());
                dst.put_slice(peer_id.as_bytes());
                dst.put_slice(&bitfield);
            }
            Message::Have(index) => {
                dst.put_u8(TYPE_HAVE);
                dst.put_u32(index);
            }
            Message::Request { index } => {
                dst.put_u8(TYPE_REQUEST);
                dst.put_u32(index);
            }
            Message::Cancel(index) => {
                dst.put_u8(TYPE_CANCEL);
                dst.put_u32(index);
            }
            Message::Piece { index, data } => {
                put_piece_header(dst, index);
                dst.put_slice(&data);
            }
            Message::Error { code, message } => {
                dst.put_u8(TYPE_ERROR);
                dst.put_u16(code);
                dst.put_slice(message.as_bytes());
            }
        }
        Ok(())
    }
}

impl PeerCodec {
    /// Frame the header of a piece message carrying `len` bytes into `dst`, for a writer that
    /// sends the data itself straight from its buffer (as the `writer` module's `PeerWriter`
    /// does).
    pub fn encode_piece_header(&self, index: u32, len: usize, dst: &mut BytesMut) -> Result<(), WireError> {
        let body_len = 1 + 4 + len;
        if body_len > self.max_frame {
            return Err(WireError::FrameTooLarge { len: body_len, max: self.max_frame });
        }
        let prefix = u32::try_from(body_len)
            .map_err(|_| WireError::FrameTooLarge { len: body_len, max: self.max_frame })?;
        dst.reserve(LEN_PREFIX + 1 + 4);
        dst.put_u32(prefix);
        put_piece_header(dst, index);
        Ok(())
    }
}

fn put_piece_header(dst: &mut BytesMut, index: u32) {
    dst.put_u8(TYPE_PIECE);
    dst.put_u32(index);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use shoal_registry::Algorithm;

    fn digest() -> Digest {
        Digest::of(Algorithm::Sha256, b"layer")
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Handshake {
                version: PROTOCOL_VERSION,
                digest: digest(),
                peer_id: PeerId([7; 20]),
                bitfield: Bytes::from_static(&[0xff, 0x80]),
            },
            Message::Handshake {
                version: 9,
                digest: Digest::of(Algorithm::Sha512, b"x"),
                peer_id: PeerId([0; 20]),
                bitfield: Bytes::new(),
            },
            Message::Have(0),
            Message::Have(u32::MAX),
            Message::Request { index: 42 },
            Message::Piece { index: 3, data: Bytes::from(vec![1u8; 1000]) },
            Message::Piece { index: 4, data: Bytes::new() },
            Message::Cancel(17),
            Message::Error { code: 404, message: "no such blob ✗".into() },
            Message::Error { code: 0, message: String::new() },
            Message::Error { code: u16::MAX, message: "x".repeat(MAX_ERROR_MESSAGE) },
            Message::KeepAlive,
        ]
    }

    fn encode(msg: Message) -> BytesMut {
        let mut buf = BytesMut::new();
        PeerCodec::default().encode(msg, &mut buf).unwrap();
        buf
    }

    /// Decode a single complete frame, requiring that it consumes the buffer.
    fn decode_one(bytes: &[u8]) -> Result<Option<Message>, WireError> {
        let mut buf = BytesMut::from(bytes);
        let out = PeerCodec::default().decode(&mut buf);
        if matches!(out, Ok(Some(_))) {
            assert!(buf.is_empty(), "frame not fully consumed");
        }
        out
    }

    /// A frame with the given type and payload, with a correct length prefix.
    fn frame(ty: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
        v.push(ty);
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn every_message_round_trips() {
        for msg in samples() {
            let bytes = encode(msg.clone());
            assert_eq!(decode_one(&bytes).unwrap(), Some(msg));
        }
    }

    #[test]
    fn byte_layout_is_stable() {
        assert_eq!(&encode(Message::KeepAlive)[..], &[0, 0, 0, 0]);
        assert_eq!(&encode(Message::Have(258))[..], &[0, 0, 0, 5, 1, 0, 0, 1, 2]);
        assert_eq!(&encode(Message::Request { index: 1 })[..], &[0, 0, 0, 5, 2, 0, 0, 0, 1]);
        assert_eq!(&encode(Message::Cancel(1))[..], &[0, 0, 0, 5, 4, 0, 0, 0, 1]);
        assert_eq!(
            &encode(Message::Piece { index: 1, data: Bytes::from_static(b"ab") })[..],
            &[0, 0, 0, 7, 3, 0, 0, 0, 1, b'a', b'b']
        );
        assert_eq!(
            &encode(Message::Error { code: 258, message: "no".into() })[..],
            &[0, 0, 0, 5, 5, 1, 2, b'n', b'o']
        );
        let hs = encode(Message::Handshake {
            version: 1,
            digest: digest(),
            peer_id: PeerId([9; 20]),
            bitfield: Bytes::from_static(&[0xa0]),
        });
        let d = digest().to_string();
        let mut expected = ((1 + 1 + 2 + d.len() + 20 + 1) as u32).to_be_bytes().to_vec();
        expected.extend_from_slice(&[0, 1]);
        expected.extend_from_slice(&(d.len() as u16).to_be_bytes());
        expected.extend_from_slice(d.as_bytes());
        expected.extend_from_slice(&[9; 20]);
        expected.push(0xa0);
        assert_eq!(&hs[..], &expected[..]);
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let bytes = encode(Message::Piece { index: 1, data: Bytes::from(vec![5; 100]) });
        let mut codec = PeerCodec::default();
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            buf.put_u8(*b);
            let out = codec.decode(&mut buf).unwrap();
            if i + 1 < bytes.len() {
                assert_eq!(out, None);
            } else {
                assert_eq!(out, Some(Message::Piece { index: 1, data: Bytes::from(vec![5; 100]) }));
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn several_frames_in_one_buffer() {
        let mut buf = BytesMut::new();
        for msg in samples() {
            buf.extend_from_slice(&encode(msg));
        }
        let mut codec = PeerCodec::default();
        let mut got = Vec::new();
        while let Some(msg) = codec.decode(&mut buf).unwrap() {
            got.push(msg);
        }
        assert_eq!(got, samples());
    }

    #[test]
    fn oversized_frame_rejected_from_the_prefix_alone() {
        let mut codec = PeerCodec::new(100);
        let mut buf = BytesMut::from(&101u32.to_be_bytes()[..]);
        assert!(matches!(codec.decode(&mut buf), Err(WireError::FrameTooLarge { len: 101, max: 100 })));
        let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        assert!(matches!(PeerCodec::default().decode(&mut buf), Err(WireError::FrameTooLarge { .. })));
        // Nothing was reserved for the announced size.
        assert!(buf.capacity() < 1024);
        let mut buf = BytesMut::from(&100u32.to_be_bytes()[..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn default_limit_fits_the_largest_piece() {
        let data = Bytes::from(vec![0u8; MAX_PIECE_LENGTH as usize]);
        let msg = Message::Piece { index: 0, data };
        assert_eq!(decode_one(&encode(msg.clone())).unwrap(), Some(msg));
    }

    #[test]
    fn unknown_type_rejected() {
        assert!(matches!(decode_one(&frame(6, &[])), Err(WireError::UnknownType(6))));
        assert!(matches!(decode_one(&frame(255, &[1, 2])), Err(WireError::UnknownType(255))));
    }

    #[test]
    fn truncated_payloads_rejected() {
        for ty in [TYPE_HAVE, TYPE_REQUEST, TYPE_CANCEL, TYPE_PIECE] {
            for len in 0..4 {
                assert!(
                    matches!(decode_one(&frame(ty, &vec![0; len])), Err(WireError::Truncated { .. })),
                    "type {ty} len {len}"
                );
            }
        }
        assert!(matches!(decode_one(&frame(TYPE_ERROR, &[0])), Err(WireError::Truncated { .. })));
        // Handshake cut at every point before the bitfield.
        let full = encode(Message::Handshake {
            version: 1,
            digest: digest(),
            peer_id: PeerId([1; 20]),
            bitfield: Bytes::new(),
        });
        let body = &full[5..];
        for cut in 0..body.len() {
            assert!(
                matches!(decode_one(&frame(TYPE_HANDSHAKE, &body[..cut])), Err(WireError::Truncated { .. })),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn trailing_bytes_rejected() {
        for ty in [TYPE_HAVE, TYPE_REQUEST, TYPE_CANCEL] {
            assert!(matches!(
                decode_one(&frame(ty, &[0, 0, 0, 1, 9])),
                Err(WireError::TrailingBytes { extra: 1, .. })
            ));
        }
    }

    #[test]
    fn invalid_digest_rejected() {
        let handshake = |d: &[u8]| {
            let mut p = vec![1];
            p.extend_from_slice(&(d.len() as u16).to_be_bytes());
            p.extend_from_slice(d);
            p.extend_from_slice(&[0; 20]);
            frame(TYPE_HANDSHAKE, &p)
        };
        for bad in [&b"sha256:xyz"[..], b"", b"md5:abcd", &[0xff, 0xfe][..]] {
            assert!(matches!(decode_one(&handshake(bad)), Err(WireError::InvalidDigest(_))));
        }
        let good = digest().to_string();
        assert!(decode_one(&handshake(good.as_bytes())).is_ok());
    }

    #[test]
    fn bad_error_text_rejected() {
        assert!(matches!(decode_one(&frame(TYPE_ERROR, &[0, 1, 0xc3])), Err(WireError::InvalidUtf8)));
        let mut long = vec![0, 1];
        long.extend(std::iter::repeat_n(b'a', MAX_ERROR_MESSAGE + 1));
        assert!(matches!(decode_one(&frame(TYPE_ERROR, &long)), Err(WireError::ErrorMessageTooLong(1025))));
    }

    #[test]
    fn encoder_refuses_what_the_decoder_would_reject() {
        let mut codec = PeerCodec::new(10);
        let mut buf = BytesMut::new();
        let piece = Message::Piece { index: 0, data: Bytes::from(vec![0; 6]) };
        assert!(matches!(codec.encode(piece, &mut buf), Err(WireError::FrameTooLarge { len: 11, max: 10 })));
        let error = Message::Error { code: 1, message: "é".repeat(513) };
        assert!(matches!(
            PeerCodec::default().encode(error, &mut buf),
            Err(WireError::ErrorMessageTooLong(1026))
        ));
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn works_over_a_real_stream() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_util::codec::Framed;

        let (a, b) = tokio::io::duplex(64);
        let mut tx = Framed::new(a, PeerCodec::default());
        let mut rx = Framed::new(b, PeerCodec::default());
        let sender = tokio::spawn(async move {
            for msg in samples() {
                tx.send(msg).await.unwrap();
            }
        });
        let mut got = Vec::new();
        for _ in 0..samples().len() {
            got.push(rx.next().await.unwrap().unwrap());
        }
        sender.await.unwrap();
        assert_eq!(got, samples());
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u8>(), any::<Vec<u8>>(), any::<[u8; 20]>(), proptest::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(version, d, id, bf)| Message::Handshake {
                    version,
                    digest: Digest::of(Algorithm::Sha256, &d),
                    peer_id: PeerId(id),
                    bitfield: Bytes::from(bf),
                }),
            any::<u32>().prop_map(Message::Have),
            any::<u32>().prop_map(|index| Message::Request { index }),
            (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..2048))
                .prop_map(|(index, d)| Message::Piece { index, data: Bytes::from(d) }),
            any::<u32>().prop_map(Message::Cancel),
            (any::<u16>(), ".{0,200}").prop_map(|(code, message)| Message::Error { code, message }),
            Just(Message::KeepAlive),
        ]
    }

    /// Decode everything currently decodable; stops at the first error.
    fn drain(codec: &mut PeerCodec, buf: &mut BytesMut, out: &mut Vec<Message>) -> Result<(), WireError> {
        while let Some(msg) = codec.decode(buf)? {
            out.push(msg);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096), max in 0usize..5000) {
            let mut codec = PeerCodec::new(max);
            let mut buf = BytesMut::from(&bytes[..]);
            let mut out = Vec::new();
            let _ = drain(&mut codec, &mut buf, &mut out);
            let _ = codec.decode_eof(&mut buf);
        }

        #[test]
        fn arbitrary_frame_bodies_never_panic(ty in 0u8..8, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_one(&frame(ty, &payload));
        }

        #[test]
        fn valid_streams_decode_regardless_of_chunking(
            msgs in proptest::collection::vec(arb_message(), 0..12),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let mut stream = BytesMut::new();
            let mut codec = PeerCodec::default();
            for m in &msgs {
                codec.encode(m.clone(), &mut stream).unwrap();
            }
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            points.push(0);
            points.push(stream.len());
            points.sort_unstable();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for w in points.windows(2) {
                buf.extend_from_slice(&stream[w[0]..w[1]]);
                drain(&mut codec, &mut buf, &mut out).unwrap();
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(out, msgs);
        }
    }
}
