//! Which origins own a key: the top R of the live origins by rendezvous hashing. Blobs are
//! placed by digest, repository metadata by repository name. Rendezvous hashing moves only
//! the keys whose owners changed when an origin joins or leaves (about 1/N of them).

use shoal_p2p::rendezvous;

/// Every node ordered by preference for `key`: the first R are its owners, the rest are the
/// fallbacks used when an owner cannot take a write. The hash is the pinned one of
/// [`rendezvous`], so origins running different builds agree on placement.
pub fn ranked(key: &str, nodes: &[String]) -> Vec<String> {
    rendezvous::ranked(key, nodes)
}

/// The owners of `key` among `nodes`: the first `replicas` of [`ranked`].
pub fn owners(key: &str, nodes: &[String], replicas: usize) -> Vec<String> {
    let mut all = ranked(key, nodes);
    all.truncate(replicas.max(1));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:5000")).collect()
    }

    #[test]
    fn owners_are_stable_and_distinct() {
        let ns = nodes(3);
        let a = owners("sha256:abc", &ns, 2);
        assert_eq!(a, owners("sha256:abc", &ns, 2));
        assert_eq!(a.len(), 2);
        assert_ne!(a[0], a[1]);
        let mut shuffled = ns.clone();
        shuffled.reverse();
        assert_eq!(a, owners("sha256:abc", &shuffled, 2), "order of the member list does not matter");
    }

    #[test]
    fn known_placement_does_not_drift_between_builds() {
        // Pinned: if this changes, origins of different versions would disagree on owners.
        let ns = nodes(3);
        assert_eq!(ranked("sha256:abc", &ns), ["10.0.0.2:5000", "10.0.0.1:5000", "10.0.0.0:5000"]);
        assert_eq!(ranked("repo/name", &ns), ["10.0.0.0:5000", "10.0.0.1:5000", "10.0.0.2:5000"]);
    }

    #[test]
    fn adding_a_node_moves_about_a_quarter_of_the_keys() {
        let three = nodes(3);
        let four = nodes(4);
        let keys: Vec<String> = (0..4000).map(|i| format!("sha256:{i:064x}")).collect();
        let moved = keys.iter().filter(|k| owners(k, &three, 2) != owners(k, &four, 2)).count();
        // With R = 2 of 4, a key changes owners when the new node is in its top two: ~1/2 of
        // keys gain the new node as an owner, and each such key moves one copy.
        let fraction = moved as f64 / keys.len() as f64;
        assert!((0.4..0.6).contains(&fraction), "moved {fraction}");
        let copies_moved: usize = keys
            .iter()
            .map(|k| {
                let old = owners(k, &three, 2);
                owners(k, &four, 2).iter().filter(|n| !old.contains(n)).count()
            })
            .sum();
        let copy_fraction = copies_moved as f64 / (keys.len() * 2) as f64;
        assert!((0.2..0.3).contains(&copy_fraction), "copies moved {copy_fraction}");
    }

    #[test]
    fn removing_a_node_only_moves_its_keys() {
        let three = nodes(3);
        let two: Vec<String> = three[..2].to_vec();
        for i in 0..500 {
            let k = format!("k{i}");
            let before = owners(&k, &three, 1);
            if before[0] != three[2] {
                assert_eq!(before, owners(&k, &two, 1));
            }
        }
    }
}
