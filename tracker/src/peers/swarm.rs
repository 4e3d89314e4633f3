//! One digest's announcements, kept so that a handout draws its peers in O(limit): the
//! entries by peer id, and each class's ids in a list sampled by index
//! ([`sample_where`], a lazy shuffle). The store's policy (quotas, eviction, the handout's
//! order) is `peers.rs`'s.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rand::Rng;

pub(super) struct Entry {
    pub(super) addr: SocketAddr,
    pub(super) complete: bool,
    pub(super) expires: Instant,
    /// Who announced it (a node identity, or an address without TLS): its quota is charged.
    pub(super) announcer: Arc<str>,
    /// Its index in its class's list ([`Swarm::complete`] or [`Swarm::incomplete`]).
    pub(super) slot: usize,
}

/// One digest's announcements: by peer id (id order, so sweeps are reproducible), and each
/// class's ids in a list a handout samples by index without walking the swarm.
#[derive(Default)]
pub(super) struct Swarm {
    pub(super) entries: BTreeMap<Arc<str>, Entry>,
    pub(super) complete: Vec<Arc<str>>,
    pub(super) incomplete: Vec<Arc<str>>,
}

impl Swarm {
    fn class(&mut self, complete: bool) -> &mut Vec<Arc<str>> {
        if complete {
            &mut self.complete
        } else {
            &mut self.incomplete
        }
    }

    pub(super) fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.get(id)
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Record `entry` under `id`, in place of any entry it had (returned).
    pub(super) fn insert(&mut self, id: &str, mut entry: Entry) -> Option<Entry> {
        let old = self.remove(id);
        let id: Arc<str> = Arc::from(id);
        let class = self.class(entry.complete);
        entry.slot = class.len();
        class.push(id.clone());
        self.entries.insert(id, entry);
        old
    }

    /// Forget `id`'s entry: its class's list fills the hole with its last id.
    pub(super) fn remove(&mut self, id: &str) -> Option<Entry> {
        let gone = self.entries.remove(id)?;
        let class = self.class(gone.complete);
        class.swap_remove(gone.slot);
        if let Some(moved) = class.get(gone.slot).cloned() {
            if let Some(e) = self.entries.get_mut(&moved) {
                e.slot = gone.slot;
            }
        }
        Some(gone)
    }

    /// Drop the entries `keep` refuses (calling it once per entry, in id order), then rebuild
    /// the class lists in id order if any went.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&Entry) -> bool) {
        let before = self.entries.len();
        self.entries.retain(|_, e| keep(e));
        if self.entries.len() == before {
            return;
        }
        self.complete.clear();
        self.incomplete.clear();
        for (id, e) in &mut self.entries {
            let class = if e.complete { &mut self.complete } else { &mut self.incomplete };
            e.slot = class.len();
            class.push(id.clone());
        }
    }
}

/// Up to `want` distinct indices below `len`, in uniformly random order, of which `keep`
/// holds: a Fisher-Yates shuffle done lazily (only the positions drawn are remembered),
/// stopping once `want` are found, so it costs O(want + refused), not O(len).
pub(super) fn sample_where(
    len: usize,
    want: usize,
    rng: &mut impl Rng,
    mut keep: impl FnMut(usize) -> bool,
) -> Vec<usize> {
    let mut out = Vec::with_capacity(want.min(len));
    // Positions below `i` are done; a position at or past it holds `moved[p]`, or else `p`.
    let mut moved: HashMap<usize, usize> = HashMap::new();
    let mut i = 0;
    while out.len() < want && i < len {
        let j = rng.random_range(i..len);
        let at_i = moved.remove(&i).unwrap_or(i);
        let drawn = if j == i { at_i } else { moved.insert(j, at_i).unwrap_or(j) };
        if keep(drawn) {
            out.push(drawn);
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A handout draws what it needs: asking for 50 of 20,000 looks at about 50 (plus the
    /// ones it refuses), and every index is as likely as any other.
    #[test]
    fn sampling_costs_what_is_drawn_and_is_uniform() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut looked = 0;
        let got = sample_where(20_000, 50, &mut rng, |_| {
            looked += 1;
            true
        });
        assert_eq!((got.len(), looked), (50, 50));
        let distinct: std::collections::BTreeSet<usize> = got.iter().copied().collect();
        assert_eq!(distinct.len(), 50);
        assert!(got.iter().all(|&i| i < 20_000));
        // Half refused: about twice as many looked at, never the whole list.
        let mut looked = 0;
        let got = sample_where(20_000, 50, &mut rng, |i| {
            looked += 1;
            i % 2 == 0
        });
        assert_eq!(got.len(), 50);
        assert!(got.iter().all(|i| i % 2 == 0));
        assert!(looked < 300, "looked at {looked} of 20,000 for 50");
        // Too few kept: each index is looked at once, and all the kept ones come back.
        let mut looked = 0;
        let got = sample_where(100, 50, &mut rng, |i| {
            looked += 1;
            i < 10
        });
        assert_eq!((got.len(), looked), (10, 100));
        // Uniform: 3 of 10, 30,000 times, each index near 9,000 times, each first near 3,000.
        let mut counts = [0u32; 10];
        let mut firsts = [0u32; 10];
        for _ in 0..30_000 {
            let got = sample_where(10, 3, &mut rng, |_| true);
            firsts[got[0]] += 1;
            for i in got {
                counts[i] += 1;
            }
        }
        assert!(counts.iter().all(|&c| (8_500..9_500).contains(&c)), "{counts:?}");
        assert!(firsts.iter().all(|&c| (2_700..3_300).contains(&c)), "{firsts:?}");
    }
}
