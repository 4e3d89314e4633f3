//! Limits on what untrusted peers may make a node hold: how many connections one address
//! may open to a peer server ([`AddressSlots`]) and how many peers one blob serves at once
//! ([`BlobSlots`]), and how frames are read ([`InboundCodec`]):
//! small until the handshake is done, a requested piece only at its own length, and a piece
//! nobody asked for is skipped as its bytes arrive instead of being buffered whole.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use shoal_registry::Digest;
use tokio_util::codec::Decoder;

use crate::transport::FrameNeed;
use crate::wire::{Message, PeerCodec, WireError, DEFAULT_MAX_FRAME, LEN_PREFIX, TYPE_PIECE};

/// Largest frame read before the handshake is done, and all the serving side ever reads
/// (a downloader sends only small control messages). The handshake's bitfield fits for
/// blobs of up to 512 Ki pieces (512 GiB in 1 MiB pieces); a whole piece (up to 4 MiB)
/// does not, so a connection cannot make a node buffer that much before it says who it is.
pub const MAX_HANDSHAKE_FRAME: usize = 64 * 1024 + 256;

/// Largest frame other than a piece read once pieces may come: a `have`, a `cancel`, an
/// `error` with its longest message. Without it, any type of frame could be as long as a
/// whole piece (4 MiB) and the codec reserved room for it, on each of a node's connections.
pub const MAX_CONTROL_FRAME: usize = 64 + crate::wire::MAX_ERROR_MESSAGE;

/// Bytes of a piece frame before its data: length prefix, type and index.
const PIECE_HEAD: usize = LEN_PREFIX + 1 + 4;

/// Decodes what a peer sends: [`PeerCodec`] with a frame limit that starts at
/// [`MAX_HANDSHAKE_FRAME`], and a filter that lets through only the pieces this side
/// requested. Any other piece frame is skipped from its header on: its data is counted and
/// discarded as it arrives, never held. A requested piece's frame must be exactly that
/// piece's length, checked from its header: a peer cannot make the reader reserve the frame
/// limit (4 MiB) for a piece of 256 KiB.
#[derive(Debug)]
pub struct InboundCodec {
    codec: PeerCodec,
    /// Requested pieces and the frame length each must come in (type, index and data).
    requested: HashMap<u32, usize>,
    /// Bytes of an unrequested piece still to be skipped.
    skipping: usize,
    dropped: u64,
    /// Bytes still missing of the frame being read, for the socket's low-water mark.
    need: FrameNeed,
    /// Bytes of requested pieces read so far, counted as they arrive (the frame heads too):
    /// the download's progress, which a connection's keep-alives and `have`s are not.
    piece_bytes: Arc<AtomicU64>,
    /// Bytes of the requested piece frame at the front of the buffer already counted.
    counted: usize,
}

impl Default for InboundCodec {
    fn default() -> Self {
        InboundCodec::new()
    }
}

impl InboundCodec {
    /// A codec for a connection whose handshake is still to come.
    pub fn new() -> InboundCodec {
        InboundCodec {
            codec: PeerCodec::new(MAX_HANDSHAKE_FRAME),
            requested: HashMap::new(),
            skipping: 0,
            dropped: 0,
            need: FrameNeed::default(),
            piece_bytes: Arc::default(),
            counted: 0,
        }
    }

    /// Where this codec counts the bytes of requested pieces it has read.
    pub fn piece_bytes(&self) -> Arc<AtomicU64> {
        self.piece_bytes.clone()
    }

    /// Where this codec reports the bytes missing of the frame it is reading.
    pub fn need(&self) -> FrameNeed {
        self.need.clone()
    }

    /// The handshake is done and this side downloads: whole pieces may come now.
    pub fn allow_pieces(&mut self) {
        self.codec.max_frame = DEFAULT_MAX_FRAME;
    }

    /// Piece `index`, of `piece_len` bytes, was requested: let it through once, at that
    /// length only.
    pub fn expect(&mut self, index: u32, piece_len: u64) {
        let frame = usize::try_from(piece_len).unwrap_or(usize::MAX).saturating_add(PIECE_HEAD - LEN_PREFIX);
        self.requested.insert(index, frame);
    }

    /// Piece `index` will not come (the peer declined it).
    pub fn forget(&mut self, index: u32) {
        self.requested.remove(&index);
    }

    /// Bytes of unrequested pieces skipped so far.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped
    }

    /// Skip what is buffered of an unrequested piece; whether it is all gone.
    fn skip(&mut self, src: &mut BytesMut) -> bool {
        let n = self.skipping.min(src.len());
        src.advance(n);
        self.skipping -= n;
        self.dropped += n as u64;
        self.skipping == 0
    }
}

/// The length in the prefix of the frame `src` starts with, once the prefix is there.
fn frame_len(src: &[u8]) -> Option<usize> {
    let prefix = src.get(..LEN_PREFIX)?;
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    Some(usize::try_from(len).unwrap_or(usize::MAX))
}

impl Decoder for InboundCodec {
    type Item = Message;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, WireError> {
        let message = self.decode_frame(src);
        let need = match &message {
            Ok(None) if self.skipping > 0 => self.skipping,
            Ok(None) => {
                frame_len(src).map_or(0, |len| LEN_PREFIX.saturating_add(len).saturating_sub(src.len()))
            }
            _ => 0,
        };
        self.need.set(need);
        message
    }
}

impl InboundCodec {
    /// One frame, or `None` until one is whole.
    fn decode_frame(&mut self, src: &mut BytesMut) -> Result<Option<Message>, WireError> {
        loop {
            if !self.skip(src) {
                return Ok(None);
            }
            if let Some(len) = frame_len(src) {
                if len > self.codec.max_frame {
                    return Err(WireError::FrameTooLarge { len, max: self.codec.max_frame });
                }
                if len > MAX_CONTROL_FRAME && self.codec.max_frame > MAX_HANDSHAKE_FRAME {
                    match src.get(LEN_PREFIX) {
                        None => return Ok(None),
                        Some(&TYPE_PIECE) => {}
                        Some(_) => return Err(WireError::FrameTooLarge { len, max: MAX_CONTROL_FRAME }),
                    }
                }
                // A keep-alive has no type byte; a piece frame too short for its index is
                // left to the codec, which reports it as truncated.
                if len >= PIECE_HEAD - LEN_PREFIX && src.get(LEN_PREFIX) == Some(&TYPE_PIECE) {
                    let Some(head) = src.get(..PIECE_HEAD) else { return Ok(None) };
                    let index = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
                    let Some(&expected) = self.requested.get(&index) else {
                        src.advance(LEN_PREFIX);
                        self.skipping = len;
                        self.counted = 0;
                        continue;
                    };
                    if len != expected {
                        return Err(WireError::PieceLength { index, len, expected });
                    }
                    let here = src.len().min(LEN_PREFIX.saturating_add(len));
                    let new = here.saturating_sub(self.counted);
                    self.piece_bytes.fetch_add(new as u64, Ordering::Relaxed);
                    self.counted = here;
                }
            }
            let message = self.codec.decode(src)?;
            if let Some(Message::Piece { index, .. }) = &message {
                self.requested.remove(index);
                self.counted = 0;
            }
            return Ok(message);
        }
    }
}

/// Open connections per key, each key at most `max`: per remote IP address, so one address
/// cannot take a server's whole connection budget ([`AddressSlots`]), and per blob, so the
/// first peers every downloader hears of are not asked by half the fleet at once
/// ([`BlobSlots`]).
#[derive(Debug)]
pub struct KeyedSlots<K> {
    max: usize,
    open: Mutex<HashMap<K, usize>>,
}

/// One connection counted against its key until dropped.
#[derive(Debug)]
pub struct KeyedSlot<K: Eq + Hash + Clone> {
    slots: Arc<KeyedSlots<K>>,
    key: K,
}

/// Connections per remote address; IPv4 addresses mapped into IPv6 count as the IPv4 address.
pub type AddressSlots = KeyedSlots<IpAddr>;
/// Peers served per blob.
pub type BlobSlots = KeyedSlots<Digest>;

impl<K: Eq + Hash + Clone> KeyedSlots<K> {
    pub fn new(max: usize) -> Arc<KeyedSlots<K>> {
        Arc::new(KeyedSlots { max: max.max(1), open: Mutex::default() })
    }

    /// A slot for a connection counted against `key`, unless that key is at its cap.
    pub fn take(self: &Arc<Self>, key: K) -> Option<KeyedSlot<K>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(KeyedSlot { slots: self.clone(), key })
    }

    /// Whether [`take`](Self::take) would give a slot for `key` now.
    pub fn is_free(&self, key: &K) -> bool {
        self.open(key) < self.max
    }

    /// Connections open for `key`.
    pub fn open(&self, key: &K) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(key).copied().unwrap_or(0)
    }
}

impl KeyedSlots<IpAddr> {
    /// A slot for a connection from `ip`'s host ([`host_key`]).
    pub fn take_address(self: &Arc<Self>, ip: IpAddr) -> Option<KeyedSlot<IpAddr>> {
        self.take(host_key(ip))
    }
}

/// Default leading bits of an IPv6 address that name one host in per-address limits: a /64,
/// what one host may take addresses from (SLAAC, privacy addresses); counted per address, a
/// host with a /64 had 2^64 allowances.
pub const DEFAULT_IPV6_HOST_PREFIX: u8 = 64;

/// This process's IPv6 host prefix ([`set_ipv6_host_prefix`]).
static IPV6_HOST_PREFIX: std::sync::atomic::AtomicU8 =
    std::sync::atomic::AtomicU8::new(DEFAULT_IPV6_HOST_PREFIX);

/// Set, at start, how many leading bits of an IPv6 address name one host in this process's
/// per-address limits (1 to 128; `[limits] ipv6_host_prefix`, the tracker's
/// `--ipv6-host-prefix`). A cluster whose nodes share one IPv6 subnet (Kubernetes nodes on
/// host networking, all in one /64) needs 128, or the whole fleet counts as one host: one
/// peer-connection cap at each origin, one announce quota at each tracker.
pub fn set_ipv6_host_prefix(bits: u8) {
    IPV6_HOST_PREFIX.store(bits.clamp(1, 128), std::sync::atomic::Ordering::Relaxed);
}

/// The host an address counts for in per-address limits: an IPv4 address (IPv4-mapped IPv6
/// too), or an IPv6 address's leading bits as set by [`set_ipv6_host_prefix`] (a /64 by
/// default).
pub fn host_key(ip: IpAddr) -> IpAddr {
    host_key_with(ip, IPV6_HOST_PREFIX.load(std::sync::atomic::Ordering::Relaxed))
}

/// [`host_key`] with an IPv6 prefix of `bits` (1 to 128).
pub fn host_key_with(ip: IpAddr, bits: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits.clamp(1, 128))).unwrap_or(u128::MAX);
            IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & mask))
        }
        v4 => v4,
    }
}

impl<K: Eq + Hash + Clone> Drop for KeyedSlot<K> {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, Bytes};
    use tokio_util::codec::Encoder;

    fn frame(msg: Message) -> BytesMut {
        let mut buf = BytesMut::new();
        PeerCodec::default().encode(msg, &mut buf).unwrap();
        buf
    }

    fn piece(index: u32, len: usize) -> Message {
        Message::Piece { index, data: Bytes::from(vec![7u8; len]) }
    }

    /// Once pieces may come, a frame of another type as long as a piece is refused before
    /// anything is buffered for it; a piece and an error with its longest message still pass.
    #[test]
    fn only_pieces_may_be_long_once_they_may_come() {
        let mut codec = InboundCodec::new();
        codec.allow_pieces();
        let mut buf = BytesMut::new();
        buf.put_u32(4 << 20);
        assert!(codec.decode(&mut buf).unwrap().is_none(), "waits for the type byte");
        buf.put_u8(1);
        assert!(matches!(codec.decode(&mut buf), Err(WireError::FrameTooLarge { .. })));
        assert!(buf.capacity() < 64 * 1024, "{} bytes reserved", buf.capacity());

        let mut codec = InboundCodec::new();
        codec.allow_pieces();
        codec.expect(3, 1 << 20);
        let long_error = Message::Error { code: 1, message: "x".repeat(crate::wire::MAX_ERROR_MESSAGE) };
        let (out, _) =
            feed(&mut codec, &[frame(long_error.clone()), frame(piece(3, 1 << 20))].concat(), 4096);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], long_error);
    }

    /// Feed `bytes` in `step`-sized parts, as a socket would, collecting the messages and the
    /// most bytes the decoder ever held.
    fn feed(codec: &mut InboundCodec, bytes: &[u8], step: usize) -> (Vec<Message>, usize) {
        let (mut out, mut held, mut buf) = (Vec::new(), 0, BytesMut::new());
        for part in bytes.chunks(step) {
            buf.put_slice(part);
            held = held.max(buf.len());
            while let Some(m) = codec.decode(&mut buf).unwrap() {
                out.push(m);
            }
        }
        (out, held)
    }

    #[test]
    fn an_unrequested_piece_is_skipped_without_being_held() {
        let mut codec = InboundCodec::new();
        codec.allow_pieces();
        codec.expect(2, 1000);
        let mut stream = frame(Message::KeepAlive);
        stream.extend_from_slice(&frame(piece(1, 1 << 20)));
        stream.extend_from_slice(&frame(Message::Have(5)));
        stream.extend_from_slice(&frame(piece(2, 1000)));
        stream.extend_from_slice(&frame(piece(2, 1000)));
        stream.extend_from_slice(&frame(Message::KeepAlive));
        let (messages, held) = feed(&mut codec, &stream, 4096);
        assert_eq!(messages, vec![Message::KeepAlive, Message::Have(5), piece(2, 1000), Message::KeepAlive]);
        assert!(held < 8192, "held {held} bytes of a piece nobody asked for");
        assert_eq!(codec.dropped_bytes(), (1 + 4 + (1 << 20)) + (1 + 4 + 1000));
    }

    /// What the decoder reports missing is exactly what the rest of the frame needs: a piece
    /// being read, one being skipped, nothing between frames. (The socket's low-water mark
    /// follows it; one byte too many would hold the frame's end.)
    #[test]
    fn the_bytes_missing_of_a_frame_are_reported_exactly() {
        let mut codec = InboundCodec::new();
        codec.allow_pieces();
        codec.expect(2, 100000);
        let need = codec.need();
        let mut stream = frame(piece(2, 100_000));
        stream.extend_from_slice(&frame(piece(1, 50_000)));
        let total = stream.len();
        let first = total - (LEN_PREFIX + 5 + 50_000);
        let mut buf = BytesMut::new();
        buf.put_slice(&stream[..3]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert_eq!(need.get(), 0, "the length is not known yet");
        buf.put_slice(&stream[3..40_000]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert_eq!(need.get(), first - 40_000);
        buf.put_slice(&stream[40_000..first + 20_000]);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(piece(2, 100_000)));
        assert_eq!(need.get(), 0);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert_eq!(need.get(), total - first - 20_000, "the skipped piece's rest");
        buf.put_slice(&stream[first + 20_000..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert_eq!(need.get(), 0);
        assert!(buf.is_empty());
    }

    /// Only requested pieces' bytes count as progress, as they arrive and each once; a
    /// connection's keep-alives, `have`s and unrequested pieces do not.
    #[test]
    fn bytes_of_requested_pieces_are_counted_as_they_arrive_and_nothing_else() {
        let mut codec = InboundCodec::new();
        codec.allow_pieces();
        codec.expect(2, 100000);
        codec.expect(4, 7);
        let counted = codec.piece_bytes();
        let wanted = frame(piece(2, 100_000));
        let mut stream = frame(Message::KeepAlive);
        stream.extend_from_slice(&frame(Message::Have(5)));
        stream.extend_from_slice(&frame(piece(1, 30_000)));
        let before = stream.len();
        stream.extend_from_slice(&wanted);
        stream.extend_from_slice(&frame(Message::KeepAlive));
        stream.extend_from_slice(&frame(piece(4, 7)));
        let mut buf = BytesMut::new();
        buf.put_slice(&stream[..before + 50_000]);
        while codec.decode(&mut buf).unwrap().is_some() {}
        assert_eq!(counted.load(Ordering::Relaxed), 50_000, "half of piece 2, counted before it is whole");
        buf.put_slice(&stream[before + 50_000..]);
        let mut messages = Vec::new();
        while let Some(m) = codec.decode(&mut buf).unwrap() {
            messages.push(m);
        }
        assert_eq!(messages, vec![piece(2, 100_000), Message::KeepAlive, piece(4, 7)]);
        assert_eq!(counted.load(Ordering::Relaxed), (wanted.len() + frame(piece(4, 7)).len()) as u64);
        // Split at every byte, a piece is still counted once.
        codec.expect(9, 300);
        feed(&mut codec, &frame(piece(9, 300)), 1);
        let all = wanted.len() + frame(piece(4, 7)).len() + frame(piece(9, 300)).len();
        assert_eq!(counted.load(Ordering::Relaxed), all as u64);
    }

    #[test]
    fn a_requested_piece_split_at_every_byte_still_comes_through() {
        let mut codec = InboundCodec::new();
        codec.allow_pieces();
        codec.expect(9, 300);
        let (messages, _) = feed(&mut codec, &frame(piece(9, 300)), 1);
        assert_eq!(messages, vec![piece(9, 300)]);
        codec.expect(3, 10);
        codec.forget(3);
        let (messages, _) = feed(&mut codec, &frame(piece(3, 10)), 1);
        assert!(messages.is_empty(), "a declined piece is not expected any more");
    }

    #[test]
    fn before_the_handshake_a_piece_sized_frame_is_refused_from_its_length() {
        let mut codec = InboundCodec::new();
        let mut buf = BytesMut::new();
        buf.put_u32(4 * 1024 * 1024);
        assert!(matches!(codec.decode(&mut buf), Err(WireError::FrameTooLarge { .. })));
        // A piece header says the same even for a requested piece.
        let mut codec = InboundCodec::new();
        codec.expect(0, 100 * 1024);
        let mut buf = frame(piece(0, 100 * 1024));
        assert!(matches!(codec.decode(&mut buf), Err(WireError::FrameTooLarge { .. })));
        // A handshake fits.
        let hello = Message::Handshake {
            version: crate::PROTOCOL_VERSION,
            digest: shoal_registry::Digest::of(shoal_registry::Algorithm::Sha256, b"x"),
            peer_id: crate::PeerId::random(),
            bitfield: Bytes::from(vec![0u8; 16 * 1024]),
        };
        let (messages, _) = feed(&mut InboundCodec::new(), &frame(hello.clone()), 1000);
        assert_eq!(messages, vec![hello]);
    }

    /// A requested piece's header names its frame's length; any but the piece's own is an
    /// error before the reader reserves room for it.
    #[test]
    fn a_requested_piece_of_another_length_is_refused_from_its_header() {
        for len in [1000, 1024, 4 * 1024 * 1024 - 64] {
            let mut codec = InboundCodec::new();
            codec.allow_pieces();
            codec.expect(3, 1024);
            let mut buf = frame(piece(3, len)).split_to(PIECE_HEAD);
            let before = buf.capacity();
            let result = codec.decode(&mut buf);
            if len == 1024 {
                assert_eq!(result.unwrap(), None, "the right length waits for its data");
            } else {
                let err = result.unwrap_err();
                assert!(matches!(err, WireError::PieceLength { index: 3, expected: 1029, .. }), "{err}");
                assert_eq!(buf.capacity(), before, "nothing reserved for a {len}-byte piece");
            }
        }
    }

    #[test]
    fn a_short_piece_frame_is_still_an_error() {
        let mut codec = InboundCodec::new();
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_u8(TYPE_PIECE);
        buf.put_u16(0);
        assert!(matches!(codec.decode(&mut buf), Err(WireError::Truncated { .. })));
    }

    #[test]
    fn address_slots_cap_each_address_and_free_on_drop() {
        let slots = AddressSlots::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = slots.take_address(a).unwrap();
        let _second = slots.take_address(mapped).unwrap();
        assert!(slots.take_address(a).is_none(), "a third from one address");
        let _other = slots.take_address(b).unwrap();
        drop(first);
        assert_eq!(slots.open(&a), 1);
        assert!(slots.take_address(a).is_some());
        // IPv6: one host's /64 is one address.
        let (x, y): (IpAddr, IpAddr) =
            ("2001:db8:1:2::1".parse().unwrap(), "2001:db8:1:2:ab::9".parse().unwrap());
        let _x = slots.take_address(x).unwrap();
        let _y = slots.take_address(y).unwrap();
        assert!(slots.take_address("2001:db8:1:2::ffff".parse().unwrap()).is_none(), "a third from one /64");
        assert!(slots.take_address("2001:db8:1:3::1".parse().unwrap()).is_some(), "another /64");
    }

    /// With 128 bits every IPv6 address is a host of its own (nodes of one subnet); other
    /// prefixes keep the leading bits only; IPv4 is never masked.
    #[test]
    fn the_ipv6_host_prefix_decides_what_one_host_is() {
        let a: IpAddr = "2001:db8:1:2:aaaa:bbbb:cccc:dddd".parse().unwrap();
        let at = |bits| host_key_with(a, bits).to_string();
        assert_eq!(at(128), "2001:db8:1:2:aaaa:bbbb:cccc:dddd");
        assert_eq!(at(64), "2001:db8:1:2::");
        assert_eq!(at(56), "2001:db8:1::");
        assert_eq!(at(1), "::");
        assert_eq!(at(0), "::", "below 1: 1");
        assert_eq!(at(200), at(128), "above 128: 128");
        let v4: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(host_key_with(v4, 1).to_string(), "10.0.0.1");
    }

    #[test]
    fn blob_slots_cap_each_blob_and_free_on_drop() {
        let slots = BlobSlots::new(1);
        let a: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let b: Digest = format!("sha256:{}", "b".repeat(64)).parse().unwrap();
        let first = slots.take(a.clone()).unwrap();
        assert!(slots.take(a.clone()).is_none(), "a second peer for one blob");
        let _other = slots.take(b.clone()).unwrap();
        drop(first);
        assert_eq!(slots.open(&a), 0);
        assert!(slots.take(a).is_some());
    }
}
