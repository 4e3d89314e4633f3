//! The tracker's soft state: per blob digest, the peers that announced it, with a TTL, and the
//! handout policy. Pure and synchronous (time is an argument) so the policy is unit-tested,
//! and deterministic for a seeded RNG (peers are kept in id order, not a hash map's random
//! order, and each class's list changes only by the store's own operations), so `shoal-sim`
//! replays a fleet's handouts exactly. A handout samples its peers in O(limit), not in the
//! swarm's size: it runs under the tracker's lock for every announce of a download.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::Rng;
use shoal_p2p::tracker_client::PeerInfo;
use shoal_registry::Digest;

mod swarm;
use swarm::{sample_where, Entry, Swarm};

/// Default cap on live announcements from one announcer: an agent holding ten thousand
/// blobs at once is far past any real node, and one client cannot fill the store.
pub const DEFAULT_MAX_ENTRIES_PER_ANNOUNCER: usize = 10_000;

/// Peers remembered per digest by default. A peer evicted from a full swarm is handed out to
/// nobody, so nobody downloads from it and its uplink idles: with 5,000, a simulated fleet of
/// 10,000 hosts pulling one blob kept ~1,600 uplinks idle throughout (links at 0.81 of their
/// rate; p50 / p99 1.63 / 1.72 × the link time); with room for all of them, 0.95 and
/// 1.42 / 1.47 (`shoal-sim --peers 10000`, docs/benchmarks.md). Only a new peer of a full
/// swarm costs a pass over the digest's peers (the eviction); a handout samples.
pub const DEFAULT_MAX_PEERS_PER_DIGEST: usize = 20_000;

/// Why an announcement was not recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the tracker is full")]
    StoreFull,
    #[error("this blob's swarm is full")]
    SwarmFull,
    #[error("this announcer holds too many announcements")]
    AnnouncerFull,
    #[error("another announcer holds this peer id for this blob")]
    NotOwner,
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
    /// Live announcements one announcer may hold.
    pub max_entries_per_announcer: usize,
    /// Live announcements held in all: new ones are refused past it until entries expire.
    /// Per-announcer quotas alone let a few hundred announcer keys (a host with many IPv6
    /// addresses where the prefix is 128) grow the store past the tracker's memory.
    pub max_entries: usize,
}

/// Default [`PeerStoreLimits::max_entries`]: about 150-200 bytes each, so ~200 MB at most,
/// and fifty fleets of 20,000 hosts with a blob each.
pub const DEFAULT_MAX_ENTRIES: usize = 1_000_000;

impl Default for PeerStoreLimits {
    fn default() -> Self {
        PeerStoreLimits {
            ttl: Duration::from_secs(30),
            max_peers_per_digest: DEFAULT_MAX_PEERS_PER_DIGEST,
            max_digests: 100_000,
            max_entries_per_announcer: DEFAULT_MAX_ENTRIES_PER_ANNOUNCER,
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

/// The least time between two sweeps of expired entries that refused announces start. A
/// sweep walks every entry under the tracker's lock, so an announcer at its quota (or a full
/// store) that kept announcing new digests made every one of its requests' 256 announces a
/// walk of the whole store; the periodic sweep (`api.rs`) runs besides.
pub const ON_DEMAND_SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Announced peers per digest.
pub struct PeerStore {
    limits: PeerStoreLimits,
    /// Per digest, peers by id: a `BTreeMap`, so handouts from a seeded RNG are reproducible.
    swarms: HashMap<Digest, Swarm>,
    /// Live announcements per announcer, and in all.
    held: Held,
    /// When expired entries were last dropped, and how many times that has been done.
    last_sweep: Option<Instant>,
    sweeps: u64,
}

/// Live announcements per announcer, and their total.
#[derive(Default)]
struct Held {
    by: HashMap<Arc<str>, usize>,
    total: usize,
}

impl Held {
    fn of(&self, announcer: &str) -> usize {
        self.by.get(announcer).copied().unwrap_or(0)
    }

    /// `announcer` as a shared key (the one already held, if any).
    fn key(&self, announcer: &str) -> Arc<str> {
        self.by.get_key_value(announcer).map_or_else(|| Arc::from(announcer), |(k, _)| k.clone())
    }

    /// One more announcement held by `announcer`.
    fn charge(&mut self, announcer: Arc<str>) {
        *self.by.entry(announcer).or_insert(0) += 1;
        self.total += 1;
    }

    /// One fewer announcement held by `announcer`.
    fn release(&mut self, announcer: &Arc<str>) {
        if let Some(n) = self.by.get_mut(announcer) {
            *n -= 1;
            self.total -= 1;
            if *n == 0 {
                self.by.remove(announcer);
            }
        }
    }
}

impl PeerStore {
    pub fn new(limits: PeerStoreLimits) -> PeerStore {
        PeerStore { limits, swarms: HashMap::new(), held: Held::default(), last_sweep: None, sweeps: 0 }
    }

    /// Record (or refresh) an announcement, charged to the peer itself; `false` if refused.
    pub fn announce(
        &mut self,
        digest: &Digest,
        peer_id: &str,
        addr: SocketAddr,
        complete: bool,
        now: Instant,
    ) -> bool {
        self.announce_by(peer_id, digest, peer_id, addr, complete, now).is_ok()
    }

    /// Record (or refresh) an announcement from `announcer`. Nothing here calls out: the
    /// tracker checks capacity with this before it asks an origin anything.
    pub fn announce_by(
        &mut self,
        announcer: &str,
        digest: &Digest,
        peer_id: &str,
        addr: SocketAddr,
        complete: bool,
        now: Instant,
    ) -> Result<(), Refused> {
        let existing = self.swarms.get(digest).and_then(|s| s.get(peer_id));
        let new_entry = existing.is_none();
        let refresh = match existing {
            Some(e) if e.expires > now && !owns(e, announcer, addr) => return Err(Refused::NotOwner),
            Some(e) => owns(e, announcer, addr),
            None => false,
        };
        // A refresh stays charged to whoever holds the entry: the same identity from another
        // address (SNAT) is let refresh it, but moving the charge to its new address, unchecked,
        // let one certificate on two addresses pile entries past its quota without end.
        let owner = existing.filter(|_| refresh).map(|e| e.announcer.clone());
        if !refresh && self.held.of(announcer) >= self.limits.max_entries_per_announcer {
            self.expire_if_due(now);
            if self.held.of(announcer) >= self.limits.max_entries_per_announcer {
                return Err(Refused::AnnouncerFull);
            }
        }
        if new_entry && self.held.total >= self.limits.max_entries {
            self.expire_if_due(now);
            if self.held.total >= self.limits.max_entries {
                return Err(Refused::StoreFull);
            }
        }
        if !self.swarms.contains_key(digest) && self.swarms.len() >= self.limits.max_digests {
            self.expire_if_due(now);
            if self.swarms.len() >= self.limits.max_digests {
                return Err(Refused::StoreFull);
            }
        }
        let held = &mut self.held;
        let swarm = self.swarms.entry(digest.clone()).or_default();
        if swarm.get(peer_id).is_none() && swarm.len() >= self.limits.max_peers_per_digest {
            swarm.retain(|e| {
                let live = e.expires > now;
                if !live {
                    held.release(&e.announcer);
                }
                live
            });
            if swarm.len() >= self.limits.max_peers_per_digest {
                // Make room by dropping the incomplete peer closest to expiry.
                let victim = swarm
                    .entries
                    .iter()
                    .filter(|(_, e)| !e.complete)
                    .min_by_key(|(_, e)| e.expires)
                    .map(|(k, _)| k.clone());
                match victim.and_then(|v| swarm.remove(&v)) {
                    Some(gone) => held.release(&gone.announcer),
                    None => return Err(Refused::SwarmFull),
                }
            }
        }
        let announcer = owner.unwrap_or_else(|| held.key(announcer));
        let entry =
            Entry { addr, complete, expires: now + self.limits.ttl, announcer: announcer.clone(), slot: 0 };
        if let Some(old) = swarm.insert(peer_id, entry) {
            held.release(&old.announcer);
        }
        held.charge(announcer);
        Ok(())
    }

    /// Forget a peer (it said it stopped).
    pub fn remove(&mut self, digest: &Digest, peer_id: &str) {
        if let Some(swarm) = self.swarms.get_mut(digest) {
            if let Some(gone) = swarm.remove(peer_id) {
                self.held.release(&gone.announcer);
            }
            if swarm.is_empty() {
                self.swarms.remove(digest);
            }
        }
    }

    /// Forget a peer if `announcer` holds its entry (a `stopped` announce), by the rule a
    /// refresh follows ([`owns`]): the same announcer, or the same identity announcing the
    /// same peer address `addr`.
    pub fn remove_by(&mut self, announcer: &str, digest: &Digest, peer_id: &str, addr: SocketAddr) {
        let owned =
            self.swarms.get(digest).and_then(|s| s.get(peer_id)).is_some_and(|e| owns(e, announcer, addr));
        if owned {
            self.remove(digest, peer_id);
        }
    }

    /// [`PeerStore::expire`], unless that was done less than [`ON_DEMAND_SWEEP_EVERY`] ago.
    fn expire_if_due(&mut self, now: Instant) {
        if self.last_sweep.is_some_and(|at| now.saturating_duration_since(at) < ON_DEMAND_SWEEP_EVERY) {
            return;
        }
        self.expire(now);
    }

    /// Drop expired announcements.
    pub fn expire(&mut self, now: Instant) {
        self.last_sweep = Some(now);
        self.sweeps += 1;
        let held = &mut self.held;
        self.swarms.retain(|_, swarm| {
            swarm.retain(|e| {
                let live = e.expires > now;
                if !live {
                    held.release(&e.announcer);
                }
                live
            });
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
        // The origins always have their places: complete peers are only what their announcers
        // claim, and enough made-up ones would otherwise keep every seeder out of the handout.
        let mut origins: Vec<PeerInfo> = origins.iter().filter(|o| o.peer_id != requester).cloned().collect();
        origins.shuffle(rng);
        origins.truncate(limit);
        let Some(swarm) = self.swarms.get(digest) else { return origins };
        // A random share of each class in random order, as a whole shuffle would give, drawn
        // without visiting (or cloning) the rest of a 20,000-peer swarm for every announce.
        let mut share = |class: &[Arc<str>], want: usize| -> Vec<PeerInfo> {
            let live = |i: usize| {
                let id = &class[i];
                &**id != requester && swarm.get(id).is_some_and(|e| e.expires > now)
            };
            sample_where(class.len(), want, rng, live)
                .into_iter()
                .filter_map(|i| {
                    let id = &class[i];
                    swarm.get(id).map(|e| PeerInfo {
                        peer_id: id.to_string(),
                        addr: e.addr,
                        complete: e.complete,
                        origin: false,
                    })
                })
                .collect()
        };
        let mut out = share(&swarm.complete, limit - origins.len());
        out.extend(origins);
        let rest = limit - out.len();
        out.extend(share(&swarm.incomplete, rest));
        out
    }

    /// Number of digests with live announcements (a metric).
    pub fn digests(&self) -> usize {
        self.swarms.len()
    }

    /// Total announcements held (a metric).
    pub fn peers(&self) -> usize {
        self.swarms.values().map(Swarm::len).sum()
    }
}

/// Whether `announcer` may refresh `entry`: the announcer that made it, or the same node
/// seen from another source address (its identity is the same and it announces the same
/// peer address: behind SNAT, or over another address family, a node's source address
/// changes between connections, and its own entries were refused as another's).
fn owns(entry: &Entry, announcer: &str, addr: SocketAddr) -> bool {
    &*entry.announcer == announcer || (entry.addr == addr && same_identity(&entry.announcer, announcer))
}

/// Whether two announcer keys (`identity@address`, or an address alone without node
/// identities) name the same identity; two keys without one do not.
fn same_identity(a: &str, b: &str) -> bool {
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((a, _)), Some((b, _))) => a == b,
        _ => false,
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

    /// Announcers may claim to be complete: however many do, the origins (the seeders that
    /// surely hold the blob) are in every handout, after the complete peers it has room for.
    #[test]
    fn claimed_complete_peers_cannot_crowd_the_origins_out() {
        let now = Instant::now();
        let mut store = PeerStore::new(PeerStoreLimits::default());
        let d = digest("a");
        for i in 0..200u16 {
            store.announce(&d, &format!("fake{i}"), addr(1000 + i), true, now);
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let origins = [origin("o1", 9), origin("o2", 10)];
        let peers = store.handout(&d, "me", &origins, 50, now, &mut rng);
        assert_eq!(peers.len(), 50);
        assert!(peers[..48].iter().all(|p| p.complete && !p.origin));
        let ids: std::collections::BTreeSet<&str> = peers[48..].iter().map(|p| p.peer_id.as_str()).collect();
        assert_eq!(ids, std::collections::BTreeSet::from(["o1", "o2"]));
        // An origin asking is not handed itself, and a limit below the origins keeps origins.
        let peers = store.handout(&d, "o1", &origins, 1, now, &mut rng);
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].peer_id, "o2");
    }

    /// However entries come, change class and go, each class's list holds exactly its
    /// entries, each at the slot the entry records, and handouts see every live one.
    #[test]
    fn class_lists_follow_every_change() {
        let now = Instant::now();
        let limits =
            PeerStoreLimits { ttl: Duration::from_secs(10), max_peers_per_digest: 40, ..Default::default() };
        let mut store = PeerStore::new(limits);
        let d = digest("a");
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for step in 0..5_000u64 {
            let at = now + Duration::from_millis(step * 7);
            let id = format!("p{}", rng.random_range(0..60u16));
            match rng.random_range(0..10) {
                0..=5 => {
                    let _ = store.announce(&d, &id, addr(1), rng.random_bool(0.5), at);
                }
                6..=7 => store.remove(&d, &id),
                8 => store.expire(at),
                _ => {
                    let all = store.handout(&d, "nobody", &[], usize::MAX / 2, at, &mut rng);
                    let live = store
                        .swarms
                        .get(&d)
                        .map_or(0, |s| s.entries.values().filter(|e| e.expires > at).count());
                    assert_eq!(all.len(), live, "step {step}");
                }
            }
            if let Some(swarm) = store.swarms.get(&d) {
                assert_eq!(swarm.complete.len() + swarm.incomplete.len(), swarm.entries.len());
                for (id, e) in &swarm.entries {
                    let class = if e.complete { &swarm.complete } else { &swarm.incomplete };
                    assert_eq!(&class[e.slot], id, "step {step}");
                }
            }
        }
    }

    #[test]
    fn a_fleet_of_ten_thousand_is_remembered_whole() {
        let now = Instant::now();
        let mut store = PeerStore::new(PeerStoreLimits::default());
        let d = digest("a");
        for i in 0..10_000u16 {
            assert!(store.announce(&d, &format!("p{i}"), addr(i), false, now));
        }
        assert_eq!(store.peers(), 10_000, "peers of a 10,000-host swarm were evicted");
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
        let limits = PeerStoreLimits {
            ttl: Duration::from_secs(10),
            max_peers_per_digest: 2,
            max_digests: 1,
            ..Default::default()
        };
        let mut store = PeerStore::new(limits);
        let d = digest("a");
        assert!(store.announce(&d, "seed", addr(1), true, now));
        assert!(store.announce(&d, "a", addr(2), false, now));
        // Full: the incomplete peer gives way, the seeder stays.
        assert!(store.announce(&d, "b", addr(3), false, now + Duration::from_secs(1)));
        assert_eq!(
            store.announce_by("c", &d, "c", addr(3), true, now + Duration::from_secs(2)),
            Ok(()),
            "an incomplete peer gives way to a seeder"
        );
        assert_eq!(
            store.announce_by("d", &d, "d", addr(3), true, now + Duration::from_secs(2)),
            Err(Refused::SwarmFull),
            "nothing gives way to a third seeder"
        );
        assert_eq!(store.peers(), 2);
        assert!(!store.announce(&digest("other"), "c", addr(4), false, now));
        assert!(store.announce(&digest("other"), "c", addr(4), false, now + Duration::from_secs(20)));
    }

    #[test]
    fn one_announcer_cannot_fill_the_store() {
        let now = Instant::now();
        let limits = PeerStoreLimits { max_entries_per_announcer: 3, ..PeerStoreLimits::default() };
        let mut store = PeerStore::new(limits);
        for i in 0..3 {
            assert_eq!(store.announce_by("node-a", &digest(&i.to_string()), "p", addr(1), true, now), Ok(()));
        }
        // Refreshing what it holds is fine; a fourth entry is not, whatever the digest.
        assert_eq!(store.announce_by("node-a", &digest("0"), "p", addr(1), true, now), Ok(()));
        assert_eq!(
            store.announce_by("node-a", &digest("3"), "p", addr(1), true, now),
            Err(Refused::AnnouncerFull)
        );
        assert_eq!(
            store.announce_by("node-a", &digest("0"), "q", addr(1), true, now),
            Err(Refused::AnnouncerFull)
        );
        // Others are not charged for it.
        assert_eq!(store.announce_by("node-b", &digest("3"), "p", addr(2), true, now), Ok(()));
        // A stopped entry or an expired one frees the quota.
        store.remove_by("node-a", &digest("1"), "p", addr(1));
        assert_eq!(store.announce_by("node-a", &digest("4"), "p", addr(1), true, now), Ok(()));
        let later = now + store.limits.ttl + Duration::from_secs(1);
        assert_eq!(store.announce_by("node-a", &digest("5"), "p", addr(1), true, later), Ok(()));
        assert_eq!(store.peers(), 1);
    }

    #[test]
    fn a_live_entry_belongs_to_its_announcer() {
        let now = Instant::now();
        let mut store = PeerStore::new(PeerStoreLimits::default());
        let d = digest("a");
        assert_eq!(store.announce_by("node-a", &d, "p", addr(1), true, now), Ok(()));
        // Another node cannot point peer p elsewhere, nor make it stop.
        assert_eq!(store.announce_by("intruder", &d, "p", addr(66), true, now), Err(Refused::NotOwner));
        store.remove_by("intruder", &d, "p", addr(1));
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let peers = store.handout(&d, "x", &[], 10, now, &mut rng);
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].addr, addr(1));
        // Once it has expired, the id is free again.
        let later = now + store.limits.ttl + Duration::from_secs(1);
        assert_eq!(store.announce_by("intruder", &d, "p", addr(66), true, later), Ok(()));
    }

    /// The same node (identity) from another source address refreshes and stops its own
    /// entry, as long as it announces the same peer address; another identity cannot.
    #[test]
    fn a_node_behind_changing_source_addresses_keeps_its_entries() {
        let now = Instant::now();
        let mut store = PeerStore::new(PeerStoreLimits::default());
        let d = digest("a");
        assert_eq!(store.announce_by("agent-1@10.0.0.1", &d, "p", addr(1), false, now), Ok(()));
        assert_eq!(store.announce_by("agent-1@10.0.0.2", &d, "p", addr(1), true, now), Ok(()));
        assert_eq!(
            store.announce_by("agent-1@10.0.0.3", &d, "p", addr(66), true, now),
            Err(Refused::NotOwner)
        );
        assert_eq!(
            store.announce_by("agent-2@10.0.0.1", &d, "p", addr(1), true, now),
            Err(Refused::NotOwner)
        );
        // Without node identities an address is all there is: another one is another node.
        assert_eq!(store.announce_by("10.0.0.9", &d, "q", addr(2), true, now), Ok(()));
        assert_eq!(store.announce_by("10.0.0.8", &d, "q", addr(2), true, now), Err(Refused::NotOwner));
        // Its stop from another source address needs its peer address too (another node with
        // the same identity, a chart's shared certificate, does not stop it by id alone).
        store.remove_by("agent-1@10.0.0.5", &d, "p", addr(66));
        assert_eq!(store.peers(), 2, "a stop naming another peer address removed the entry");
        store.remove_by("agent-1@10.0.0.4", &d, "p", addr(1));
        assert_eq!(store.peers(), 1, "the node's stop from another address removed its entry");
    }

    /// A refresh from another source address stays charged to the entry's holder: one
    /// identity on two addresses cannot move entries to the second and make new ones on the
    /// first without end (each address holds its quota at most).
    #[test]
    fn a_refresh_from_another_address_does_not_move_the_charge() {
        let now = Instant::now();
        let limits = PeerStoreLimits { max_entries_per_announcer: 3, ..PeerStoreLimits::default() };
        let mut store = PeerStore::new(limits);
        for round in 0..3 {
            for i in 0..3 {
                let (d, peer) = (digest(&format!("{round}-{i}")), format!("p{round}-{i}"));
                let port = 100 * round + i;
                let made = store.announce_by("n@A", &d, &peer, addr(port), false, now);
                if round > 0 {
                    assert_eq!(made, Err(Refused::AnnouncerFull), "round {round}: A holds its quota");
                    continue;
                }
                assert_eq!(made, Ok(()));
                assert_eq!(store.announce_by("n@B", &d, &peer, addr(port), false, now), Ok(()), "a refresh");
            }
        }
        assert!(store.held.of("n@B") <= 3, "B holds {}", store.held.of("n@B"));
        assert_eq!(store.held.of("n@A"), 3);
        assert_eq!(store.peers(), 3);
    }

    /// Announcements in all are bounded whatever the number of announcers: past the cap a
    /// new one is refused as the store being full (its announcer still gets peers), a
    /// refresh still goes through, and room comes back as entries go.
    #[test]
    fn the_store_holds_at_most_so_many_announcements_in_all() {
        let now = Instant::now();
        let mut store = PeerStore::new(PeerStoreLimits { max_entries: 5, ..PeerStoreLimits::default() });
        for i in 0..5 {
            let announcer = format!("10.0.0.{i}");
            assert_eq!(
                store.announce_by(&announcer, &digest("a"), &format!("p{i}"), addr(i), true, now),
                Ok(())
            );
        }
        assert_eq!(
            store.announce_by("10.0.0.9", &digest("a"), "p9", addr(9), true, now),
            Err(Refused::StoreFull)
        );
        assert_eq!(
            store.announce_by("10.0.0.9", &digest("b"), "p9", addr(9), true, now),
            Err(Refused::StoreFull)
        );
        assert_eq!(
            store.announce_by("10.0.0.1", &digest("a"), "p1", addr(1), false, now),
            Ok(()),
            "a refresh"
        );
        store.remove_by("10.0.0.0", &digest("a"), "p0", addr(0));
        assert_eq!(store.announce_by("10.0.0.9", &digest("a"), "p9", addr(9), true, now), Ok(()));
        assert_eq!(store.peers(), 5);
    }

    #[test]
    fn refused_announces_sweep_the_store_at_most_once_a_second() {
        let now = Instant::now();
        let limits =
            PeerStoreLimits { max_entries_per_announcer: 3, max_digests: 5, ..PeerStoreLimits::default() };
        let mut store = PeerStore::new(limits);
        for i in 0..3 {
            assert_eq!(store.announce_by("node-a", &digest(&i.to_string()), "p", addr(1), true, now), Ok(()));
        }
        for i in 3..5 {
            assert_eq!(store.announce_by("node-b", &digest(&i.to_string()), "p", addr(2), true, now), Ok(()));
        }
        // An announcer at its quota, and another facing a full store, keep asking.
        for i in 0..1000 {
            let d = digest(&format!("new-{i}"));
            assert_eq!(store.announce_by("node-a", &d, "p", addr(1), true, now), Err(Refused::AnnouncerFull));
            assert_eq!(store.announce_by("node-c", &d, "p", addr(3), true, now), Err(Refused::StoreFull));
        }
        assert_eq!(store.sweeps, 1, "2,000 refusals in the same second walked the store once");
        let later = now + ON_DEMAND_SWEEP_EVERY;
        assert_eq!(
            store.announce_by("node-a", &digest("x"), "p", addr(1), true, later),
            Err(Refused::AnnouncerFull)
        );
        assert_eq!(store.sweeps, 2);
        // What expires is still found by the next sweep.
        let expired = now + store.limits.ttl + Duration::from_secs(1);
        assert_eq!(store.announce_by("node-c", &digest("x"), "p", addr(3), true, expired), Ok(()));
    }
}
