//! The tracker's soft state: per blob digest, the peers that announced it, with a TTL, and the
//! handout policy. Pure and synchronous (time is an argument) so the policy is unit-tested,
//! and deterministic for a seeded RNG (peers are kept in id order, not a hash map's random
//! order), so `shoal-sim` replays a fleet's handouts exactly.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::Rng;
use shoal_p2p::tracker_client::PeerInfo;
use shoal_registry::Digest;

struct Entry {
    addr: SocketAddr,
    complete: bool,
    expires: Instant,
}

/// Limits that keep the store bounded whatever clients send.
#[derive(Clone, Debug)]
pub struct PeerStoreLimits {
    /// How long an announcement counts.
    pub ttl: Duration,
    /// Peers remembered per digest; the oldest incomplete ones give way first.
    pub max_peers_per_digest: usize,
    /// Digests tracked at once; new digests are refused past it until entries expire.
    pub max_digests: usize,
}

impl Default for PeerStoreLimits {
    fn default() -> Self {
        PeerStoreLimits { ttl: Duration::from_secs(30), max_peers_per_digest: 5000, max_digests: 100_000 }
    }
}

/// Announced peers per digest.
pub struct PeerStore {
    limits: PeerStoreLimits,
    /// Per digest, peers by id: a `BTreeMap`, so handouts from a seeded RNG are reproducible.
    swarms: HashMap<Digest, BTreeMap<String, Entry>>,
}

impl PeerStore {
    pub fn new(limits: PeerStoreLimits) -> PeerStore {
        PeerStore { limits, swarms: HashMap::new() }
    }

    /// Record (or refresh) an announcement; `false` if the store is full.
    pub fn announce(
        &mut self,
        digest: &Digest,
        peer_id: &str,
        addr: SocketAddr,
        complete: bool,
        now: Instant,
    ) -> bool {
        if !self.swarms.contains_key(digest) && self.swarms.len() >= self.limits.max_digests {
            self.expire(now);
            if self.swarms.len() >= self.limits.max_digests {
                return false;
            }
        }
        let swarm = self.swarms.entry(digest.clone()).or_default();
        if !swarm.contains_key(peer_id) && swarm.len() >= self.limits.max_peers_per_digest {
            swarm.retain(|_, e| e.expires > now);
            if swarm.len() >= self.limits.max_peers_per_digest {
                // Make room by dropping the incomplete peer closest to expiry.
                let victim = swarm
                    .iter()
                    .filter(|(_, e)| !e.complete)
                    .min_by_key(|(_, e)| e.expires)
                    .map(|(k, _)| k.clone());
                match victim {
                    Some(v) => {
                        swarm.remove(&v);
                    }
                    None => return false,
                }
            }
        }
        swarm.insert(peer_id.to_string(), Entry { addr, complete, expires: now + self.limits.ttl });
        true
    }

    /// Forget a peer (it said it stopped).
    pub fn remove(&mut self, digest: &Digest, peer_id: &str) {
        if let Some(swarm) = self.swarms.get_mut(digest) {
            swarm.remove(peer_id);
            if swarm.is_empty() {
                self.swarms.remove(digest);
            }
        }
    }

    /// Drop expired announcements.
    pub fn expire(&mut self, now: Instant) {
        self.swarms.retain(|_, swarm| {
            swarm.retain(|_, e| e.expires > now);
            !swarm.is_empty()
        });
    }

    /// Peers for `requester`: complete peers first, then `origins`, then incomplete peers,
    /// random within each class, at most `limit`, never the requester itself.
    pub fn handout(
        &self,
        digest: &Digest,
        requester: &str,
        origins: &[PeerInfo],
        limit: usize,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Vec<PeerInfo> {
        let mut complete = Vec::new();
        let mut incomplete = Vec::new();
        if let Some(swarm) = self.swarms.get(digest) {
            for (id, e) in swarm {
                if id == requester || e.expires <= now {
                    continue;
                }
                if e.complete {
                    complete.push((id, e));
                } else {
                    incomplete.push((id, e));
                }
            }
        }
        let info = |(id, e): &(&String, &Entry)| PeerInfo {
            peer_id: (*id).clone(),
            addr: e.addr,
            complete: e.complete,
            origin: false,
        };
        // A random `limit` of each class in random order, as a whole shuffle would give, but
        // without shuffling (or cloning) all of a 5,000-peer swarm for every announce.
        let (complete, _) = complete.partial_shuffle(rng, limit);
        let mut out: Vec<PeerInfo> = complete.iter().map(info).collect();
        let mut origins: Vec<PeerInfo> = origins.iter().filter(|o| o.peer_id != requester).cloned().collect();
        origins.shuffle(rng);
        out.extend(origins.into_iter().take(limit - out.len()));
        let (incomplete, _) = incomplete.partial_shuffle(rng, limit - out.len());
        out.extend(incomplete.iter().map(info));
        out
    }

    /// Number of digests with live announcements (a metric).
    pub fn digests(&self) -> usize {
        self.swarms.len()
    }

    /// Total announcements held (a metric).
    pub fn peers(&self) -> usize {
        self.swarms.values().map(BTreeMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn digest(s: &str) -> Digest {
        Digest::of(shoal_registry::Algorithm::Sha256, s.as_bytes())
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn origin(id: &str, port: u16) -> PeerInfo {
        PeerInfo { peer_id: id.into(), addr: addr(port), complete: true, origin: true }
    }

    #[test]
    fn handout_orders_classes_and_skips_requester() {
        let now = Instant::now();
        let mut store = PeerStore::new(PeerStoreLimits::default());
        let d = digest("a");
        store.announce(&d, "inc1", addr(1), false, now);
        store.announce(&d, "full1", addr(2), true, now);
        store.announce(&d, "me", addr(3), false, now);
        store.announce(&d, "full2", addr(4), true, now);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let peers = store.handout(&d, "me", &[origin("o1", 9)], 50, now, &mut rng);
        let ids: Vec<&str> = peers.iter().map(|p| p.peer_id.as_str()).collect();
        assert_eq!(ids.len(), 4);
        assert!(ids[..2].contains(&"full1") && ids[..2].contains(&"full2"));
        assert_eq!(ids[2], "o1");
        assert_eq!(ids[3], "inc1");
        let limited = store.handout(&d, "me", &[], 1, now, &mut rng);
        assert_eq!(limited.len(), 1);
        assert!(limited[0].complete);
    }

    #[test]
    fn announcements_expire() {
        let now = Instant::now();
        let mut store =
            PeerStore::new(PeerStoreLimits { ttl: Duration::from_secs(10), ..PeerStoreLimits::default() });
        let d = digest("a");
        store.announce(&d, "p", addr(1), false, now);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(store.handout(&d, "x", &[], 10, now + Duration::from_secs(5), &mut rng).len(), 1);
        assert!(store.handout(&d, "x", &[], 10, now + Duration::from_secs(11), &mut rng).is_empty());
        store.expire(now + Duration::from_secs(11));
        assert_eq!(store.digests(), 0);
    }

    #[test]
    fn store_stays_bounded() {
        let now = Instant::now();
        let limits =
            PeerStoreLimits { ttl: Duration::from_secs(10), max_peers_per_digest: 2, max_digests: 1 };
        let mut store = PeerStore::new(limits);
        let d = digest("a");
        assert!(store.announce(&d, "seed", addr(1), true, now));
        assert!(store.announce(&d, "a", addr(2), false, now));
        // Full: the incomplete peer gives way, the seeder stays.
        assert!(store.announce(&d, "b", addr(3), false, now + Duration::from_secs(1)));
        assert_eq!(store.peers(), 2);
        assert!(!store.announce(&digest("other"), "c", addr(4), false, now));
        assert!(store.announce(&digest("other"), "c", addr(4), false, now + Duration::from_secs(20)));
    }
}
