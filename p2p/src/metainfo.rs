//! Metainfo: how a blob is cut into pieces, and the hash state at each piece boundary.
//!
//! Peers are untrusted, so every piece must be checkable on its own before it is stored or
//! served; the origin computes this once per blob and the tracker hands it out. The states are
//! the blob digest's own (see [`crate::chain`]), so checking every piece checks the digest. Its JSON form
//! is untrusted input too, so decoding validates every field instead of trusting it.

use std::io::{self, Read};
use std::path::Path;

use shoal_registry::{Algorithm, Digest};

use crate::chain::{self, ChainState};

/// Smallest piece length: below this, per-piece overhead (requests, hashes, bitfield bits)
/// dominates the transfer.
pub const MIN_PIECE_LENGTH: u64 = 64 * 1024;

/// Largest piece length accepted in a metainfo: a piece is the unit of retry and of buffering
/// on the wire, so it stays a few MiB; this also bounds the wire protocol's frame size.
pub const MAX_PIECE_LENGTH: u64 = 4 * 1024 * 1024;

/// Largest piece length [`piece_length_for`] chooses. A piece is forwarded only once it is
/// whole and verified, so its length sets how fast a piece hops from agent to agent: at
/// 10 MiB/s a 4 MiB piece takes 0.4 s per hop, a 1 MiB piece 0.1 s. Measured with 16 agents
/// at 10 MiB/s each (docs/benchmarks.md): p99 1.28 × ideal with 1 MiB pieces against 1.4-1.5
/// with 4 MiB, and no more CPU at 25 MiB/s.
pub const LARGEST_CHOSEN_PIECE_LENGTH: u64 = 1024 * 1024;

/// Pieces we aim for per blob, when pieces of at least [`SHORTEST_SPREAD_PIECE_LENGTH`] allow
/// it. A piece is passed on only once it is whole, so at the start of a pull, while few hosts
/// hold anything, every hand-off costs a piece's time on a shared flow; with this many pieces
/// that start costs a small share of the blob's transfer whatever its size. The simulator
/// (`shoal-sim`, 128 MiB, 50 Mbit/s hosts, seed 1) with 1 MiB pieces against 512 KiB ones:
/// p99 1.32 against 1.26 at 3,000 hosts, 1.35 against 1.28 at 10,000. The 20-host fleet on
/// shaped links was within its noise (docs/benchmarks.md).
pub const TARGET_PIECES: u64 = 256;

/// The shortest piece chosen to reach [`TARGET_PIECES`]: each request, to a peer or to the
/// origin's HTTP fallback, costs a round trip, and with 64 KiB pieces a 16 MiB blob's
/// fallback took 1.3 × its link time in the simulator.
pub const SHORTEST_SPREAD_PIECE_LENGTH: u64 = 256 * 1024;

/// Pieces every blob gets when [`MIN_PIECE_LENGTH`] allows, so even a small layer can be
/// fetched from several peers at once.
pub const MIN_PIECES: u64 = 16;

/// How much `compute` reads at a time.
const READ_CHUNK: usize = 1024 * 1024;

/// The piece length for a blob of `size` bytes.
///
/// The rule: the largest power of two not above `size / 256`, at least 256 KiB
/// ([`SHORTEST_SPREAD_PIECE_LENGTH`]), but never more than what gives 16 pieces (the largest
/// power of two not above `size / 16`, at least 64 KiB); and at most 1 MiB
/// ([`LARGEST_CHOSEN_PIECE_LENGTH`]). So a 128 MiB blob gets 256 pieces of 512 KiB, blobs from
/// 4 MiB to 128 MiB 256 KiB pieces (16 to 512 of them), smaller blobs 16 or more pieces down
/// to 64 KiB (fewer below 1 MiB), and blobs from 256 MiB up 1 MiB pieces (1,024 for 1 GiB),
/// which keeps the per-piece costs of big blobs where they were. Rounding down rather than up
/// is what guarantees "at least so many pieces when possible".
pub fn piece_length_for(size: u64) -> u64 {
    let spread =
        pow2_floor(size / TARGET_PIECES).clamp(SHORTEST_SPREAD_PIECE_LENGTH, LARGEST_CHOSEN_PIECE_LENGTH);
    let several = pow2_floor(size / MIN_PIECES).clamp(MIN_PIECE_LENGTH, LARGEST_CHOSEN_PIECE_LENGTH);
    spread.min(several)
}

/// The largest power of two not above `n` (1 for 0).
fn pow2_floor(n: u64) -> u64 {
    n.checked_ilog2().map_or(1, |log| 1u64 << log)
}

/// Why a metainfo is inconsistent (decoding untrusted JSON or building one by hand).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetainfoError {
    #[error("piece length {0} is not a power of two between 64 KiB and 4 MiB")]
    PieceLength(u64),
    #[error(
        "a blob of {size} bytes in pieces of {piece_length} needs {expected} chaining values, got {actual}"
    )]
    PieceCount { size: u64, piece_length: u64, expected: u64, actual: u64 },
    #[error("chaining values must be lowercase hex, {0} bytes each")]
    ChainHex(usize),
}

/// How a blob is cut into pieces, and the hash state after each piece but the last (see
/// [`crate::chain`]). Always internally consistent: the only ways to get one are
/// [`Metainfo::new`], [`Metainfo::compute`] and validated JSON.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "MetainfoJson", into = "MetainfoJson")]
pub struct Metainfo {
    digest: Digest,
    size: u64,
    piece_length: u64,
    /// The chaining value after each piece but the last, [`chain::state_len`] bytes each.
    chain: Vec<u8>,
}

impl Metainfo {
    /// Build a metainfo from parts, checking that they agree with each other. `chain` holds
    /// the state after each piece but the last, back to back.
    pub fn new(
        digest: Digest,
        size: u64,
        piece_length: u64,
        chain: Vec<u8>,
    ) -> Result<Metainfo, MetainfoError> {
        if !piece_length.is_power_of_two() || !(MIN_PIECE_LENGTH..=MAX_PIECE_LENGTH).contains(&piece_length) {
            return Err(MetainfoError::PieceLength(piece_length));
        }
        let pieces = size.div_ceil(piece_length);
        let expected = pieces.saturating_sub(1);
        let stride = chain::state_len(digest.algorithm());
        if !chain.len().is_multiple_of(stride) {
            return Err(MetainfoError::ChainHex(stride));
        }
        let actual = (chain.len() / stride) as u64;
        // Piece indices are u32 on the wire; a blob that needs more is not representable.
        if expected != actual || pieces > u64::from(u32::MAX) {
            return Err(MetainfoError::PieceCount { size, piece_length, expected, actual });
        }
        Ok(Metainfo { digest, size, piece_length, chain })
    }

    /// A metainfo whose chaining values are all zero: no piece passes `verify_piece` (bar a
    /// hash collision). For code that schedules pieces and never checks bytes: the scheduler's
    /// tests and the simulator.
    pub fn unverifiable(digest: Digest, size: u64, piece_length: u64) -> Result<Metainfo, MetainfoError> {
        let states =
            usize::try_from(size.div_ceil(piece_length.max(1)).saturating_sub(1)).unwrap_or(usize::MAX);
        let chain = vec![0; states.saturating_mul(chain::state_len(digest.algorithm()))];
        Metainfo::new(digest, size, piece_length, chain)
    }

    /// Compute the metainfo of `size` bytes read from `reader`, hashing every byte once: the
    /// chaining values are the blob digest's own hash states at piece boundaries.
    ///
    /// `size` is needed up front because it decides the piece length; a reader that yields a
    /// different number of bytes is an `InvalidData` error. Blocking: call it from
    /// `spawn_blocking`.
    pub fn compute(reader: impl Read, size: u64, algorithm: Algorithm) -> io::Result<Metainfo> {
        let piece_length = piece_length_for(size);
        let (digest, read, chain) = hash_chain(reader, piece_length, algorithm)?;
        if read != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected {size} bytes, read {read}"),
            ));
        }
        Metainfo::new(digest, size, piece_length, chain)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Compute the metainfo of the file at `path`, taking the size from its metadata.
    /// Blocking: call it from `spawn_blocking`.
    pub fn compute_file(path: &Path, algorithm: Algorithm) -> io::Result<Metainfo> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Metainfo::compute(file, size, algorithm)
    }

    /// Whether `reader` yields exactly the blob this metainfo describes: its size, every
    /// chaining value and the whole digest, checked in one pass. Blocking: call it from
    /// `spawn_blocking`.
    pub fn describes(&self, reader: impl Read) -> io::Result<bool> {
        let (digest, read, chain) = hash_chain(reader, self.piece_length, self.digest.algorithm())?;
        Ok(read == self.size && digest == self.digest && chain == self.chain)
    }

    /// The whole blob's digest: the last piece is checked against it, so a blob whose every
    /// piece passed has it.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The blob's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Length of every piece but the last.
    pub fn piece_length(&self) -> u64 {
        self.piece_length
    }

    /// The chaining values, back to back (the state after each piece but the last).
    pub fn chain(&self) -> &[u8] {
        &self.chain
    }

    /// What tells this metainfo from another of the same blob (its cut and its chaining
    /// values): a node's kept bans are this metainfo's, since a wrong one fails honest
    /// peers' pieces.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(self.digest.to_string().as_bytes());
        h.update(self.size.to_be_bytes());
        h.update(self.piece_length.to_be_bytes());
        h.update(&self.chain);
        h.finalize().into()
    }

    /// Whether `other` checks pieces `first..=last` exactly as this one does: same blob, same
    /// cut, and the same states around those pieces.
    pub fn checks_alike(&self, other: &Metainfo, first: u32, last: u32) -> bool {
        if self.digest != other.digest || self.size != other.size || self.piece_length != other.piece_length {
            return false;
        }
        let stride = chain::state_len(self.digest.algorithm());
        let from = first.saturating_sub(1) as usize * stride;
        let to = (last as usize + 1).saturating_mul(stride).min(self.chain.len());
        from >= to || self.chain.get(from..to) == other.chain.get(from..to)
    }

    /// Number of pieces (zero for an empty blob).
    pub fn piece_count(&self) -> u32 {
        // `new` guarantees the count fits.
        u32::try_from(self.size.div_ceil(self.piece_length)).unwrap_or(u32::MAX)
    }

    /// Byte offset and length of piece `index`; the last piece may be shorter. `None` when the
    /// index is out of range.
    pub fn piece_range(&self, index: u32) -> Option<(u64, u64)> {
        if index >= self.piece_count() {
            return None;
        }
        let offset = u64::from(index) * self.piece_length;
        let len = self.piece_length.min(self.size - offset);
        Some((offset, len))
    }

    /// Length of piece `index`, or `None` when out of range.
    pub fn piece_len(&self, index: u32) -> Option<u64> {
        self.piece_range(index).map(|(_, len)| len)
    }

    /// The piece holding byte `offset`, or `None` at or past the end of the blob.
    pub fn piece_index_at(&self, offset: u64) -> Option<u32> {
        if offset >= self.size {
            return None;
        }
        u32::try_from(offset / self.piece_length).ok()
    }

    /// The listed state after piece `index` (`None` for the last piece and beyond).
    fn state_after(&self, index: u32) -> Option<&[u8]> {
        let stride = chain::state_len(self.digest.algorithm());
        let from = (index as usize).checked_mul(stride)?;
        self.chain.get(from..from.checked_add(stride)?)
    }

    /// Whether `data` is exactly piece `index`: its length, and its hash from the state before
    /// it to the state after it (to the blob's digest for the last piece).
    pub fn verify_piece(&self, index: u32, data: &[u8]) -> bool {
        if self.piece_len(index) != Some(data.len() as u64) {
            return false;
        }
        let algorithm = self.digest.algorithm();
        let before = match index.checked_sub(1) {
            None => Some(ChainState::initial(algorithm)),
            Some(prev) => self.state_after(prev).and_then(|b| ChainState::from_bytes(algorithm, b)),
        };
        let Some(mut state) = before else { return false };
        if index + 1 == self.piece_count() {
            let got = state.finish(data, self.size);
            return hex::decode(self.digest.hex()).is_ok_and(|want| want == got);
        }
        state.absorb(data);
        self.state_after(index).is_some_and(|want| state.equals_bytes(want))
    }
}

/// Read everything from `reader`, returning the blob digest, byte count and the chaining value
/// at each piece boundary but the last.
fn hash_chain(
    mut reader: impl Read,
    piece_length: u64,
    algorithm: Algorithm,
) -> io::Result<(Digest, u64, Vec<u8>)> {
    let mut state = ChainState::initial(algorithm);
    let block = chain::block_len(algorithm);
    // Reads land after `held`: the bytes not compressed yet, at most one block, kept back
    // until it is known whether they end the blob (the last piece's state is not listed, and
    // `finish` pads the end).
    let mut buf = vec![0u8; block + READ_CHUNK];
    let mut held = 0usize;
    let mut total = 0u64;
    let mut chain = Vec::new();
    loop {
        let n = match reader.read(&mut buf[held..]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let filled = held + n;
        let mut done = 0usize;
        loop {
            let to_boundary = usize::try_from(piece_length - (total % piece_length)).unwrap_or(usize::MAX);
            let available = filled - done;
            if available > to_boundary {
                // A boundary with bytes after it is not the end: compress to it, list its state.
                state.absorb(&buf[done..done + to_boundary]);
                state.write_bytes(&mut chain);
                done += to_boundary;
                total += to_boundary as u64;
            } else {
                // Whole blocks only, and at least one byte kept back.
                let take = (available.saturating_sub(1) / block) * block;
                state.absorb(&buf[done..done + take]);
                done += take;
                total += take as u64;
                break;
            }
        }
        buf.copy_within(done..filled, 0);
        held = filled - done;
    }
    let size = total + held as u64;
    let hex = hex::encode(state.finish(&buf[..held], size));
    let digest: Digest = format!("{}:{hex}", algorithm.name())
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((digest, size, chain))
}

/// The JSON form exchanged over HTTP: the chaining values as one hex string, which is compact
/// and trivial to produce from any language. The field is `chain`, not the `pieces` of per-piece
/// hashes that versions before chaining used, so either version refuses the other's metainfo
/// instead of misreading it (and an origin recomputes a stored one it cannot read).
#[derive(serde::Serialize, serde::Deserialize)]
struct MetainfoJson {
    digest: Digest,
    size: u64,
    piece_length: u64,
    chain: String,
}

impl From<Metainfo> for MetainfoJson {
    fn from(m: Metainfo) -> Self {
        MetainfoJson {
            digest: m.digest,
            size: m.size,
            piece_length: m.piece_length,
            chain: hex::encode(m.chain),
        }
    }
}

impl TryFrom<MetainfoJson> for Metainfo {
    type Error = MetainfoError;

    fn try_from(j: MetainfoJson) -> Result<Self, Self::Error> {
        let stride = chain::state_len(j.digest.algorithm());
        let hex = j.chain.as_bytes();
        if !hex.len().is_multiple_of(2 * stride)
            || !hex.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        {
            return Err(MetainfoError::ChainHex(stride));
        }
        let chain = hex::decode(hex).map_err(|_| MetainfoError::ChainHex(stride))?;
        Metainfo::new(j.digest, j.size, j.piece_length, chain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;

    /// Deterministic non-repeating test content.
    fn blob(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// A reader that returns at most `step` bytes per call, to exercise piece boundaries that
    /// fall inside reads.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.data.len().min(self.step).min(buf.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn piece_length_rule() {
        assert_eq!(piece_length_for(0), 64 * KIB);
        assert_eq!(piece_length_for(1), 64 * KIB);
        assert_eq!(piece_length_for(MIB), 64 * KIB);
        assert_eq!(piece_length_for(2 * MIB - 1), 64 * KIB);
        assert_eq!(piece_length_for(2 * MIB), 128 * KIB);
        assert_eq!(piece_length_for(4 * MIB), 256 * KIB);
        assert_eq!(piece_length_for(16 * MIB), 256 * KIB);
        assert_eq!(piece_length_for(128 * MIB - 1), 256 * KIB);
        assert_eq!(piece_length_for(128 * MIB), 512 * KIB);
        assert_eq!(piece_length_for(256 * MIB - 1), 512 * KIB);
        assert_eq!(piece_length_for(256 * MIB), MIB);
        assert_eq!(piece_length_for(10 * 1024 * MIB), MIB);
        assert_eq!(piece_length_for(u64::MAX), MIB);
        for size in [MIB, 3 * MIB + 7, 4 * MIB - 1] {
            let pl = piece_length_for(size);
            assert!((16..=32).contains(&size.div_ceil(pl)), "size {size}: pieces of {pl}");
        }
        for size in [64 * MIB, 100 * MIB + 7, 128 * MIB, 256 * MIB - 1, 256 * MIB, 512 * MIB - 1] {
            let pl = piece_length_for(size);
            assert!((256..=512).contains(&size.div_ceil(pl)), "size {size}: pieces of {pl}");
        }
    }

    #[test]
    fn compute_lists_the_digest_states_at_piece_boundaries() {
        let data = blob(3 * MIB as usize + 12345);
        let m = Metainfo::compute(&data[..], data.len() as u64, Algorithm::Sha256).unwrap();
        assert_eq!(m.digest(), &Digest::of(Algorithm::Sha256, &data));
        assert_eq!(m.size(), data.len() as u64);
        assert_eq!(m.piece_length(), 128 * KIB);
        assert_eq!(m.piece_count(), 25);
        assert_eq!(m.chain().len(), 24 * 32);
        let mut state = ChainState::initial(Algorithm::Sha256);
        for (i, chunk) in data.chunks(m.piece_length() as usize).enumerate() {
            assert!(m.verify_piece(i as u32, chunk), "piece {i}");
            if i < 24 {
                state.absorb(chunk);
                assert!(state.equals_bytes(&m.chain()[i * 32..(i + 1) * 32]), "state after {i}");
            }
        }
        // Across every read size, including ones that end exactly on a boundary.
        for step in [1000, 64 * 1024, 128 * 1024, 128 * 1024 + 1] {
            let trickled =
                Metainfo::compute(Trickle { data: &data, step }, data.len() as u64, Algorithm::Sha256);
            assert_eq!(trickled.unwrap(), m, "reads of {step}");
        }
    }

    /// Pieces verified one by one, in any order, prove the digest: a piece that is right on
    /// its own terms but follows a forged state list fails at the last piece at the latest.
    #[test]
    fn a_forged_chain_cannot_reach_the_digest() {
        let data = blob(4 * 64 * KIB as usize + 5);
        let m = Metainfo::compute(&data[..], data.len() as u64, Algorithm::Sha256).unwrap();
        let mut evil = data.clone();
        evil[10] ^= 1;
        let forged = Metainfo::compute(&evil[..], evil.len() as u64, Algorithm::Sha256).unwrap();
        // The forger keeps the real digest but lists the states of the evil bytes.
        let lying =
            Metainfo::new(m.digest().clone(), m.size(), m.piece_length(), forged.chain().to_vec()).unwrap();
        let pieces: Vec<_> = evil.chunks(64 * KIB as usize).collect();
        assert!(lying.verify_piece(0, pieces[0]), "a lie about piece 0 holds on its own");
        assert!(!lying.verify_piece(4, pieces[4]), "but the last piece must reach the real digest");
        assert!(!m.verify_piece(0, pieces[0]));
    }

    #[test]
    fn compute_is_independent_of_read_sizes() {
        let data = blob(300 * KIB as usize + 1);
        let whole = Metainfo::compute(&data[..], data.len() as u64, Algorithm::Sha512).unwrap();
        let trickled =
            Metainfo::compute(Trickle { data: &data, step: 7777 }, data.len() as u64, Algorithm::Sha512)
                .unwrap();
        assert_eq!(whole, trickled);
        assert_eq!(whole.digest().algorithm(), Algorithm::Sha512);
        assert_eq!(whole.piece_count(), 5);
    }

    #[test]
    fn compute_rejects_a_size_mismatch() {
        let data = blob(1000);
        let err = Metainfo::compute(&data[..], 999, Algorithm::Sha256).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let err = Metainfo::compute(&data[..], 1001, Algorithm::Sha256).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn compute_file_reads_the_size_from_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data = blob(200 * KIB as usize);
        std::fs::write(&path, &data).unwrap();
        let m = Metainfo::compute_file(&path, Algorithm::Sha256).unwrap();
        assert_eq!(m, Metainfo::compute(&data[..], data.len() as u64, Algorithm::Sha256).unwrap());
    }

    #[test]
    fn empty_blob_has_no_pieces() {
        let m = Metainfo::compute(&[][..], 0, Algorithm::Sha256).unwrap();
        assert_eq!(m.piece_count(), 0);
        assert_eq!(m.piece_range(0), None);
        assert_eq!(m.piece_index_at(0), None);
        assert!(!m.verify_piece(0, &[]));
    }

    #[test]
    fn piece_ranges_and_lookup() {
        let data = blob(150 * KIB as usize);
        let m = Metainfo::compute(&data[..], data.len() as u64, Algorithm::Sha256).unwrap();
        assert_eq!(m.piece_count(), 3);
        assert_eq!(m.piece_range(0), Some((0, 64 * KIB)));
        assert_eq!(m.piece_range(1), Some((64 * KIB, 64 * KIB)));
        assert_eq!(m.piece_range(2), Some((128 * KIB, 22 * KIB)));
        assert_eq!(m.piece_range(3), None);
        assert_eq!(m.piece_range(u32::MAX), None);
        assert_eq!(m.piece_index_at(0), Some(0));
        assert_eq!(m.piece_index_at(64 * KIB - 1), Some(0));
        assert_eq!(m.piece_index_at(64 * KIB), Some(1));
        assert_eq!(m.piece_index_at(150 * KIB - 1), Some(2));
        assert_eq!(m.piece_index_at(150 * KIB), None);
        assert_eq!(m.piece_index_at(u64::MAX), None);
    }

    #[test]
    fn exact_multiple_has_a_full_last_piece() {
        let data = blob(128 * KIB as usize);
        let m = Metainfo::compute(&data[..], data.len() as u64, Algorithm::Sha256).unwrap();
        assert_eq!(m.piece_count(), 2);
        assert_eq!(m.piece_range(1), Some((64 * KIB, 64 * KIB)));
    }

    #[test]
    fn describes_checks_size_pieces_and_digest_in_one_pass() {
        let data: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
        let m = Metainfo::compute(&data[..], data.len() as u64, Algorithm::Sha256).unwrap();
        assert!(m.describes(&data[..]).unwrap());
        assert!(!m.describes(&data[..data.len() - 1]).unwrap(), "shorter");
        let mut flipped = data.clone();
        flipped[70_000] ^= 1;
        assert!(!m.describes(&flipped[..]).unwrap(), "one byte off");
        // Right bytes, wrong chain.
        let mut chain = m.chain().to_vec();
        chain[33] ^= 1;
        let lying = Metainfo::new(m.digest().clone(), m.size(), m.piece_length(), chain).unwrap();
        assert!(!lying.describes(&data[..]).unwrap());
    }

    #[test]
    fn verify_piece_checks_length_and_hash() {
        let data = blob(100 * KIB as usize);
        let m = Metainfo::compute(&data[..], data.len() as u64, Algorithm::Sha256).unwrap();
        let last = &data[64 * KIB as usize..];
        assert!(m.verify_piece(1, last));
        assert!(!m.verify_piece(1, &last[1..]));
        assert!(!m.verify_piece(0, last));
        let mut flipped = last.to_vec();
        flipped[10] ^= 1;
        assert!(!m.verify_piece(1, &flipped));
        assert!(!m.verify_piece(2, last));
    }

    #[test]
    fn json_round_trip_and_shape() {
        let data = blob(130 * KIB as usize);
        let m = Metainfo::compute(&data[..], data.len() as u64, Algorithm::Sha256).unwrap();
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["digest"], m.digest().to_string());
        assert_eq!(json["size"], 130 * KIB);
        assert_eq!(json["piece_length"], 64 * KIB);
        assert_eq!(json["chain"].as_str().unwrap().len(), 2 * 64);
        assert_eq!(json["chain"].as_str().unwrap(), hex::encode(m.chain()));
        let back: Metainfo = serde_json::from_value(json).unwrap();
        assert_eq!(back, m);
        // The per-piece hashes of earlier versions are refused, not misread.
        let old = serde_json::json!({"digest": m.digest(), "size": m.size(), "piece_length": m.piece_length(),
            "pieces": "ab".repeat(3 * 32)});
        assert!(serde_json::from_value::<Metainfo>(old).is_err());
    }

    #[test]
    fn json_validation_rejects_inconsistent_input() {
        let digest = Digest::of(Algorithm::Sha256, b"x");
        let hash = "ab".repeat(32);
        let doc = |size: u64, piece_length: u64, chain: &str| serde_json::json!({"digest": digest, "size": size, "piece_length": piece_length, "chain": chain});
        let ok = doc(2 * 64 * KIB + 1, 64 * KIB, &hash.repeat(2));
        assert!(serde_json::from_value::<Metainfo>(ok).is_ok());
        assert!(serde_json::from_value::<Metainfo>(doc(100, 64 * KIB, "")).is_ok(), "one piece, no states");
        let bad = [
            doc(64 * KIB + 1, 64 * KIB, ""),                   // too few states
            doc(100, 64 * KIB, &hash),                         // too many states
            doc(0, 64 * KIB, &hash),                           // empty blob has no pieces
            doc(100, 0, &hash),                                // zero piece length
            doc(100, 100_000, &hash),                          // not a power of two
            doc(100, 32 * KIB, &hash),                         // below the minimum
            doc(100, 8 * MIB, &hash),                          // above the maximum
            doc(100, 64 * KIB, &hash[..63]),                   // odd hex
            doc(100, 64 * KIB, &"AB".repeat(32)),              // uppercase
            doc(100, 64 * KIB, &format!("{}zz", &hash[..62])), // not hex
            doc(100, 64 * KIB, &format!("{}é", &hash[..62])),  // multibyte, 64 bytes
            doc(u64::MAX, 4 * MIB, &hash),                     // huge size, no overflow
            doc(u64::MAX, 64 * KIB, &hash),                    // more pieces than u32
        ];
        for (i, b) in bad.into_iter().enumerate() {
            assert!(serde_json::from_value::<Metainfo>(b).is_err(), "case {i} accepted");
        }
        let bad_digest =
            serde_json::json!({"digest": "md5:x", "size": 0, "piece_length": 65536, "chain": ""});
        assert!(serde_json::from_value::<Metainfo>(bad_digest).is_err());
        let missing = serde_json::json!({"digest": digest, "size": 0, "piece_length": 65536});
        assert!(serde_json::from_value::<Metainfo>(missing).is_err());
    }

    #[test]
    fn an_unverifiable_metainfo_has_the_cut_and_passes_no_piece() {
        let data = blob(3 * 64 * KIB as usize + 1);
        let digest = Digest::of(Algorithm::Sha256, &data);
        let m = Metainfo::unverifiable(digest, data.len() as u64, 64 * KIB).unwrap();
        assert_eq!((m.piece_count(), m.chain().len()), (4, 3 * 32));
        assert!(!m.verify_piece(0, &data[..64 * KIB as usize]));
        assert!(!m.verify_piece(3, &data[3 * 64 * KIB as usize..]), "the last starts from a zero state too");
    }

    #[test]
    fn new_validates_like_json() {
        let digest = Digest::of(Algorithm::Sha256, b"x");
        assert_eq!(Metainfo::new(digest.clone(), 10, 1000, vec![]), Err(MetainfoError::PieceLength(1000)));
        assert_eq!(
            Metainfo::new(digest.clone(), 64 * KIB + 10, 64 * KIB, vec![]),
            Err(MetainfoError::PieceCount {
                size: 64 * KIB + 10,
                piece_length: 64 * KIB,
                expected: 1,
                actual: 0
            })
        );
        assert_eq!(
            Metainfo::new(digest.clone(), 10, 64 * KIB, vec![0; 31]),
            Err(MetainfoError::ChainHex(32))
        );
        assert!(Metainfo::new(digest, 0, 64 * KIB, vec![]).is_ok());
    }
}
