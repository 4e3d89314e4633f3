//! Rendezvous (highest random weight) hashing with a hash that never changes.
//!
//! Every node that ranks a key must reach the same answer: agents choosing the tracker for a
//! digest, origins choosing the owners of a blob. The `rendezvous_hash` crate's default node
//! hasher is std's `DefaultHasher`, whose output may change between Rust releases, so two
//! builds could rank one key differently and split a swarm across trackers or disagree on
//! where a blob lives. This module pins the hash to SHA-256, the same in every build and on
//! every machine, and is the one place the ranking is computed.

use std::hash::{Hash, Hasher};

use rendezvous_hash::{IdNode, NodeHasher, RendezvousNodes};
use sha2::{Digest as _, Sha256};

/// The node hasher: the first 8 bytes (big-endian) of SHA-256 over the key's then the node
/// id's `Hash` encoding.
#[derive(Clone, Copy, Debug, Default)]
struct StableHasher;

/// A `Hasher` that feeds SHA-256; only `write` is overridden, so what it hashes is the
/// `Hash` impls' byte stream (for `str`: its bytes, then `0xff`).
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let out = self.0.clone().finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&out[..8]);
        u64::from_be_bytes(first)
    }
}

impl NodeHasher<String> for StableHasher {
    fn hash<T: Hash>(&self, node: &String, item: &T) -> u64 {
        let mut h = Sha256Hasher(Sha256::new());
        item.hash(&mut h);
        node.hash(&mut h);
        h.finish()
    }
}

/// Every distinct node id in `nodes`, most preferred for `key` first. The order of `nodes`
/// does not matter; duplicates count once.
pub fn ranked(key: &str, nodes: &[String]) -> Vec<String> {
    let mut set = RendezvousNodes::new(StableHasher);
    for n in nodes {
        set.insert(IdNode::new(n.clone()));
    }
    set.calc_candidates(&key).map(|n| (**n).clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn known_ranking_does_not_drift_between_builds() {
        // Pinned: if this changes, nodes of different builds would rank keys differently. The
        // expected order is sha256(key ++ 0xff ++ node ++ 0xff)[..8] as a big-endian u64,
        // highest first, checked independently of this crate.
        let nodes = ids(&[
            "http://tracker-a:7070",
            "http://tracker-b:7070",
            "http://tracker-c:7070",
            "http://tracker-d:7070",
        ]);
        let key = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert_eq!(
            ranked(key, &nodes),
            [
                "http://tracker-d:7070",
                "http://tracker-a:7070",
                "http://tracker-b:7070",
                "http://tracker-c:7070"
            ]
        );
    }

    #[test]
    fn order_of_nodes_does_not_matter_and_duplicates_count_once() {
        let nodes = ids(&["a", "b", "c", "d", "e"]);
        let mut shuffled = ids(&["c", "e", "a", "d", "b", "a"]);
        assert_eq!(ranked("k", &nodes), ranked("k", &shuffled));
        shuffled.reverse();
        assert_eq!(ranked("k", &nodes), ranked("k", &shuffled));
        assert_eq!(ranked("k", &nodes).len(), 5);
    }

    #[test]
    fn no_nodes_no_ranking() {
        assert!(ranked("k", &[]).is_empty());
    }
}
