//! Test content: random bytes, digest strings and unique names.
//!
//! Randomness does not need to be cryptographic here, only different between
//! tests and runs, so a SplitMix64 stream seeded from the clock, the process id
//! and a counter does the job without another dependency.

use sha2::{Digest as _, Sha256, Sha512};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn seed() -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or_default();
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    nanos ^ (u64::from(std::process::id()) << 32) ^ count.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `len` bytes that differ between calls (and so between blobs).
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut state = seed();
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&splitmix(&mut state).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// 12 lowercase hex characters, unique within and across runs.
pub fn unique_token() -> String {
    let mut state = seed();
    format!("{:012x}", splitmix(&mut state) & 0xFFFF_FFFF_FFFF)
}

/// A repository name no other test uses: `conformance/<area>-<token>`.
/// Tests share one registry when `SHOAL_TEST_REGISTRY_URL` is set, so every
/// test works in repositories of its own.
pub fn unique_repo(area: &str) -> String {
    format!("conformance/{area}-{}", unique_token())
}

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `sha512:<hex>` of `data`.
pub fn sha512(data: &[u8]) -> String {
    format!("sha512:{}", hex::encode(Sha512::digest(data)))
}

/// A well-formed sha256 digest of content that nobody pushed.
pub fn absent_digest() -> String {
    sha256(&random_bytes(64))
}

/// Whether `s` contains a hyphenated UUID (8-4-4-4-12 hex digits).
pub fn contains_uuid(s: &str) -> bool {
    let bytes = s.as_bytes();
    const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
    (0..bytes.len()).any(|start| {
        let mut pos = start;
        for (i, len) in GROUPS.iter().enumerate() {
            if i > 0 {
                if bytes.get(pos) != Some(&b'-') {
                    return false;
                }
                pos += 1;
            }
            let Some(group) = bytes.get(pos..pos + len) else {
                return false;
            };
            if !group.iter().all(u8::is_ascii_hexdigit) {
                return false;
            }
            pos += len;
        }
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_have_the_right_form() {
        assert_eq!(sha256(b""), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(sha512(b"").len(), "sha512:".len() + 128);
    }

    #[test]
    fn random_bytes_differ() {
        assert_eq!(random_bytes(33).len(), 33);
        assert_ne!(random_bytes(32), random_bytes(32));
        assert_ne!(unique_token(), unique_token());
    }

    #[test]
    fn uuid_detection() {
        assert!(contains_uuid("/v2/a/blobs/uploads/3f1c0a52-8e5b-4b61-9a4e-0c8d1f2e3a4b?state=x"));
        assert!(!contains_uuid("/v2/a/blobs/uploads/12345"));
    }
}
