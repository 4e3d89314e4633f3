//! SHA-2 chaining values: how a piece is checked against the blob's own digest, so every byte
//! is hashed once.
//!
//! SHA-256 and SHA-512 consume their input in 64- and 128-byte blocks, carrying an internal
//! state (the chaining value) from block to block; the digest is that state after the padded
//! last block. Pieces are a power of two of at least 64 KiB, so every piece boundary is a block
//! boundary. A metainfo lists the state after each piece but the last: piece `i` is exactly
//! right when compressing it onto the state after piece `i - 1` (the algorithm's initial
//! state for piece 0) gives the listed state after piece `i`, and the last piece is right when
//! finishing it onto the state before it gives the blob's digest. Once every piece has passed,
//! the whole blob provably has the digest: the checks chain from the initial state to the
//! digest. So an agent verifies the blob while verifying pieces, in any order, and never hashes
//! a byte twice (before this, each piece had a SHA-256 of its own and the whole blob was hashed
//! again for its digest).
//!
//! A forged state list cannot pass a wrong piece past the end: the last check is against the
//! digest the client asked for, and making a state list that reaches it from other bytes means
//! finding a second preimage of the compression function.

use sha2::digest::generic_array::GenericArray;
use shoal_registry::Algorithm;

/// The running state of SHA-256 or SHA-512 at a block boundary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainState {
    Sha256([u32; 8]),
    Sha512([u64; 8]),
}

/// SHA-256's initial state (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] =
    [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

/// SHA-512's initial state (FIPS 180-4, 5.3.5).
const SHA512_IV: [u64; 8] = [
    0x6a09e667f3bcc908,
    0xbb67ae8584caa73b,
    0x3c6ef372fe94f82b,
    0xa54ff53a5f1d36f1,
    0x510e527fade682d1,
    0x9b05688c2b3e6c1f,
    0x1f83d9abfb41bd6b,
    0x5be0cd19137e2179,
];

/// Bytes of a chaining value (and of the digest) for `algorithm`.
pub fn state_len(algorithm: Algorithm) -> usize {
    match algorithm {
        Algorithm::Sha256 => 32,
        Algorithm::Sha512 => 64,
    }
}

/// Bytes per compression block for `algorithm`.
pub fn block_len(algorithm: Algorithm) -> usize {
    match algorithm {
        Algorithm::Sha256 => 64,
        Algorithm::Sha512 => 128,
    }
}

impl ChainState {
    /// The state before any input.
    pub fn initial(algorithm: Algorithm) -> ChainState {
        match algorithm {
            Algorithm::Sha256 => ChainState::Sha256(SHA256_IV),
            Algorithm::Sha512 => ChainState::Sha512(SHA512_IV),
        }
    }

    /// A state from its big-endian bytes, as a metainfo lists it; `None` if the length is not
    /// [`state_len`] of `algorithm`.
    pub fn from_bytes(algorithm: Algorithm, bytes: &[u8]) -> Option<ChainState> {
        if bytes.len() != state_len(algorithm) {
            return None;
        }
        Some(match algorithm {
            Algorithm::Sha256 => {
                let mut s = [0u32; 8];
                for (w, b) in s.iter_mut().zip(bytes.chunks_exact(4)) {
                    *w = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                }
                ChainState::Sha256(s)
            }
            Algorithm::Sha512 => {
                let mut s = [0u64; 8];
                for (w, b) in s.iter_mut().zip(bytes.chunks_exact(8)) {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(b);
                    *w = u64::from_be_bytes(word);
                }
                ChainState::Sha512(s)
            }
        })
    }

    /// The algorithm whose state this is.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            ChainState::Sha256(_) => Algorithm::Sha256,
            ChainState::Sha512(_) => Algorithm::Sha512,
        }
    }

    /// The state's big-endian bytes (the digest's byte order): the first [`state_len`] of the
    /// array.
    fn bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        match self {
            ChainState::Sha256(s) => {
                for (o, w) in out.chunks_exact_mut(4).zip(s) {
                    o.copy_from_slice(&w.to_be_bytes());
                }
            }
            ChainState::Sha512(s) => {
                for (o, w) in out.chunks_exact_mut(8).zip(s) {
                    o.copy_from_slice(&w.to_be_bytes());
                }
            }
        }
        out
    }

    /// Append the state's big-endian bytes to `out`.
    pub fn write_bytes(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.bytes()[..state_len(self.algorithm())]);
    }

    /// Whether the state's bytes are `bytes`.
    pub fn equals_bytes(&self, bytes: &[u8]) -> bool {
        self.bytes()[..state_len(self.algorithm())] == *bytes
    }

    /// Compress the whole blocks of `data` into the state. Only whole blocks: the caller keeps
    /// a partial block for [`finish`](Self::finish) or for the next call.
    /// A trailing partial block is ignored (callers pass block multiples).
    pub fn absorb(&mut self, data: &[u8]) {
        match self {
            // One block per call: no copy into an array of blocks, and the per-call cost (a
            // CPU feature check) is small next to a block's compression.
            ChainState::Sha256(s) => {
                for b in data.chunks_exact(64) {
                    sha2::compress256(s, std::slice::from_ref(GenericArray::from_slice(b)));
                }
            }
            ChainState::Sha512(s) => {
                for b in data.chunks_exact(128) {
                    sha2::compress512(s, std::slice::from_ref(GenericArray::from_slice(b)));
                }
            }
        }
    }

    /// Finish the hash: compress `tail` (any length) with the padding for a message of
    /// `total_len` bytes, and return the digest's bytes.
    pub fn finish(mut self, tail: &[u8], total_len: u64) -> Vec<u8> {
        let block = block_len(self.algorithm());
        let whole = tail.len() - tail.len() % block;
        self.absorb(&tail[..whole]);
        // Padding (FIPS 180-4, 5.1): 0x80, zeros, then the length in bits, big-endian, in the
        // last 8 (SHA-256) or 16 (SHA-512) bytes of the final block.
        let rest = &tail[whole..];
        let len_field = block / 8;
        let mut last = Vec::with_capacity(2 * block);
        last.extend_from_slice(rest);
        last.push(0x80);
        while last.len() % block != block - len_field {
            last.push(0);
        }
        let bits = u128::from(total_len) * 8;
        last.extend_from_slice(&bits.to_be_bytes()[16 - len_field..]);
        self.absorb(&last);
        let mut out = Vec::with_capacity(state_len(self.algorithm()));
        self.write_bytes(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 131 % 253) as u8).collect()
    }

    /// Chaining over any block-aligned split, then finishing, gives the algorithm's digest,
    /// for lengths around every padding edge case.
    #[test]
    fn chained_states_reach_the_real_digest() {
        for len in [0, 1, 55, 56, 63, 64, 65, 111, 112, 127, 128, 129, 1000, 4096, 65536 + 17] {
            let d = data(len);
            for (alg, block) in [(Algorithm::Sha256, 64), (Algorithm::Sha512, 128)] {
                let split = (len / 2) / block * block;
                let mut s = ChainState::initial(alg);
                s.absorb(&d[..split]);
                // Through bytes and back, as a metainfo carries it.
                let mut bytes = Vec::new();
                s.write_bytes(&mut bytes);
                assert_eq!(bytes.len(), state_len(alg));
                let s = ChainState::from_bytes(alg, &bytes).unwrap();
                let got = s.finish(&d[split..], len as u64);
                let want = match alg {
                    Algorithm::Sha256 => sha2::Sha256::digest(&d).to_vec(),
                    Algorithm::Sha512 => sha2::Sha512::digest(&d).to_vec(),
                };
                assert_eq!(got, want, "{alg:?} len {len} split {split}");
            }
        }
    }

    /// Throughput against sha2's own hasher: `cargo test --release -p shoal-p2p chain::tests::speed
    /// -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn speed() {
        let d = data(64 << 20);
        let t = std::time::Instant::now();
        let mut s = ChainState::initial(Algorithm::Sha256);
        s.absorb(&d);
        let chained = t.elapsed();
        let t = std::time::Instant::now();
        let _ = sha2::Sha256::digest(&d);
        println!("64 MiB: chained {chained:?}, sha2 {:?}", t.elapsed());
    }

    #[test]
    fn a_changed_byte_changes_the_state() {
        let d = data(4096);
        let mut a = ChainState::initial(Algorithm::Sha256);
        a.absorb(&d);
        let mut e = d.clone();
        e[4000] ^= 1;
        let mut b = ChainState::initial(Algorithm::Sha256);
        b.absorb(&e);
        assert_ne!(a, b);
        assert!(ChainState::from_bytes(Algorithm::Sha256, &[0; 31]).is_none());
    }
}
