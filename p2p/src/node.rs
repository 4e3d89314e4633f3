//! What every download of one node shares: the bytes its connections receive (from which the
//! node's ingress rate is measured), the bytes each download has in flight, one budget of
//! outbound peer connections, and the blacklist. A node pulling five layers at once has one
//! link, and five in-flight budgets of two seconds each would queue ten; twenty layers with
//! ten connections each would open two hundred. A peer that sent a bad piece of a blob is
//! still banned when the blob's download starts again (a client retrying a failed pull, a
//! blob pulled again after eviction). Incast is the link's too: the cap on peers sending at
//! once ([`SenderCap`]) counts the senders of every download.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use shoal_registry::Digest;

use crate::blacklist::Blacklist;
use crate::flow::RateMeter;
use crate::incast::SenderCap;
use crate::metainfo::Metainfo;

/// Default outbound peer connections per node, across all its downloads.
pub const DEFAULT_MAX_OUTBOUND_CONNECTIONS: usize = 128;

/// Blobs whose blacklists a node keeps between downloads; past it the list kept longest ago
/// goes. Lists hold only live bans and recent strikes, and most are empty and not kept.
pub const MAX_KEPT_BLACKLISTS: usize = 1024;

/// A node's shared ingress state; cheap to clone.
#[derive(Clone)]
pub struct NodeFlow {
    received: Arc<AtomicU64>,
    inner: Arc<Mutex<Inner>>,
    connections: Arc<AtomicUsize>,
    max_connections: usize,
}

impl Default for NodeFlow {
    fn default() -> Self {
        NodeFlow::new(DEFAULT_MAX_OUTBOUND_CONNECTIONS)
    }
}

/// One outbound connection (or attempt) counted against the node's budget until dropped.
pub struct ConnectionSlot {
    connections: Arc<AtomicUsize>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
struct Inner {
    meter: RateMeter,
    next_id: u64,
    /// Each download's bytes in flight and peers sending to it.
    in_flight: HashMap<u64, (u64, usize)>,
    senders: SenderCap,
    /// Each blob's blacklist while no download of it runs, by the blob and the fingerprint
    /// of the metainfo its download checked pieces with, and when it was put back.
    blacklists: HashMap<(Digest, [u8; 32]), (Instant, Blacklist)>,
}

impl Inner {
    /// Peers sending to all the node's downloads.
    fn sending(&self) -> usize {
        self.in_flight.values().map(|&(_, n)| n).sum()
    }
}

/// One download's registration; its in-flight bytes are forgotten when it is dropped.
pub struct DownloadSlot {
    node: NodeFlow,
    id: u64,
}

impl NodeFlow {
    /// Shared state for a node that opens at most `max_connections` outbound peer connections.
    pub fn new(max_connections: usize) -> NodeFlow {
        NodeFlow {
            received: Arc::default(),
            inner: Arc::default(),
            connections: Arc::default(),
            max_connections: max_connections.max(1),
        }
    }

    /// Outbound connections the node may still open.
    pub fn connection_room(&self) -> usize {
        self.max_connections.saturating_sub(self.connections.load(Ordering::Acquire))
    }

    /// Take one outbound connection from the budget, if any is left.
    pub fn connection_slot(&self) -> Option<ConnectionSlot> {
        let max = self.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| ConnectionSlot { connections: self.connections.clone() })
    }

    /// The counter every connection adds the bytes it reads to.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.received.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a download.
    pub fn join(&self) -> DownloadSlot {
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        inner.in_flight.insert(id, (0, 0));
        DownloadSlot { node: self.clone(), id }
    }

    /// The blacklist of a blob's peers kept from its earlier downloads, for a download of
    /// `meta` that starts at `now` (it owns the list until it gives it back with
    /// [`NodeFlow::keep_blacklist`]). Only a list kept under the same metainfo: a download
    /// that checked pieces with a wrong one (a tracker's that disagreed with the origin's)
    /// banned every honest peer that sent one, and its retry with the origin's metainfo
    /// refused them all for the ban's five minutes.
    pub fn blacklist_for(&self, meta: &Metainfo, now: Instant) -> Option<Blacklist> {
        let key = (meta.digest().clone(), meta.fingerprint());
        let (_, mut list) = self.lock().blacklists.remove(&key)?;
        list.prune(now);
        (!list.is_empty()).then_some(list)
    }

    /// A download of `meta`'s blob ended: keep its blacklist for the next one, merged with any
    /// another download of the blob under the same metainfo gave back meanwhile.
    pub fn keep_blacklist(&self, meta: &Metainfo, mut list: Blacklist, now: Instant) {
        let key = (meta.digest().clone(), meta.fingerprint());
        let mut inner = self.lock();
        if let Some((_, kept)) = inner.blacklists.remove(&key) {
            list.merge(kept);
        }
        list.prune(now);
        inner.blacklists.retain(|_, (_, l)| {
            l.prune(now);
            !l.is_empty()
        });
        if list.is_empty() {
            return;
        }
        if inner.blacklists.len() >= MAX_KEPT_BLACKLISTS {
            let oldest = inner.blacklists.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                inner.blacklists.remove(&oldest);
            }
        }
        inner.blacklists.insert(key, (now, list));
    }
}

/// What a download learns from its node on each update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NodeView {
    /// The node's measured ingress (bytes/s), once measured.
    pub rate: Option<f64>,
    /// Bytes the node's other downloads have in flight.
    pub elsewhere: u64,
    /// How many more peers may start sending to this download: the node's [`SenderCap`]
    /// less the peers sending to all its downloads (`usize::MAX` without a cap).
    pub sender_room: usize,
}

impl DownloadSlot {
    /// Record this download's bytes in flight and the peers sending them at `now`, and
    /// return what the node's other downloads and its link leave for it.
    pub fn update(&self, now: Instant, in_flight: u64, senders: usize) -> NodeView {
        let total = self.node.received.load(Ordering::Relaxed);
        let mut inner = self.node.lock();
        inner.in_flight.insert(self.id, (in_flight, senders));
        let busy = inner.in_flight.values().any(|&(b, _)| b > 0);
        inner.meter.sample(now, total, busy);
        let elsewhere = inner.in_flight.iter().filter(|(&id, _)| id != self.id).map(|(_, &(b, _))| b).sum();
        let sending = inner.sending();
        let sender_room = inner.senders.room(now, sending);
        NodeView { rate: inner.meter.rate(), elsewhere, sender_room }
    }

    /// A sign of incast on one of this download's connections, to the peer at `from`
    /// ([`crate::incast`]); returns the node's new cap on senders if it fell.
    pub fn incast(&self, now: Instant, from: std::net::IpAddr) -> Option<usize> {
        let mut inner = self.node.lock();
        let sending = inner.sending();
        if inner.senders.incast(now, sending, from) {
            inner.senders.cap(now)
        } else {
            None
        }
    }
}

impl Drop for DownloadSlot {
    fn drop(&mut self) {
        self.node.lock().in_flight.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blacklist::BlacklistConfig;
    use std::net::SocketAddr;
    use std::time::Duration;

    fn meta(blob: &[u8], piece_length: u64) -> Metainfo {
        let digest = Digest::of(shoal_registry::Algorithm::Sha256, blob);
        Metainfo::unverifiable(digest, 4 * 1024 * 1024, piece_length).unwrap()
    }

    #[test]
    fn a_blobs_bans_outlive_its_download_and_stay_with_that_blob() {
        let node = NodeFlow::default();
        let (a, b) = (meta(b"a", 1 << 20), meta(b"b", 1 << 20));
        let bad = SocketAddr::from(([10, 0, 0, 1], 7000));
        let t0 = Instant::now();
        assert!(node.blacklist_for(&a, t0).is_none());
        let mut list = Blacklist::new(BlacklistConfig::default());
        list.bad_piece(bad, t0);
        node.keep_blacklist(&a, list, t0);
        assert!(node.blacklist_for(&b, t0).is_none(), "another blob's download trusts the peer");
        let list = node.blacklist_for(&a, t0 + Duration::from_secs(1)).expect("kept");
        assert!(list.is_banned(&bad, t0 + Duration::from_secs(1)));
        assert!(node.blacklist_for(&a, t0).is_none(), "one download owns the list at a time");
        node.keep_blacklist(&a, list, t0 + Duration::from_secs(2));
        let later = t0 + BlacklistConfig::default().ban_duration;
        assert!(node.blacklist_for(&a, later).is_none(), "an expired ban is not kept");
    }

    /// Bans a download made while checking pieces with one metainfo do not follow the blob
    /// into a download with another (a tracker's metainfo that disagreed with the origin's
    /// failed every honest peer's pieces; the retry with the origin's refused them all).
    #[test]
    fn bans_stay_with_the_metainfo_they_were_made_under() {
        let node = NodeFlow::default();
        let (wrong, right) = (meta(b"a", 1 << 20), meta(b"a", 2 << 20));
        assert_eq!(wrong.digest(), right.digest());
        let honest = SocketAddr::from(([10, 0, 0, 1], 7000));
        let t0 = Instant::now();
        let mut list = Blacklist::new(BlacklistConfig::default());
        list.bad_piece(honest, t0);
        node.keep_blacklist(&wrong, list, t0);
        assert!(node.blacklist_for(&right, t0).is_none(), "the retry trusts the peer");
        // The other way round: a ban made under the right metainfo (a real liar) outlives a
        // download under a wrong one, whose own list is kept apart.
        let liar = SocketAddr::from(([10, 0, 0, 2], 7000));
        let mut list = Blacklist::new(BlacklistConfig::default());
        list.bad_piece(liar, t0);
        node.keep_blacklist(&right, list, t0);
        assert!(node.blacklist_for(&wrong, t0).is_some_and(|l| !l.is_banned(&liar, t0)));
        let mut list = Blacklist::new(BlacklistConfig::default());
        list.bad_piece(honest, t0);
        node.keep_blacklist(&wrong, list, t0);
        let kept = node.blacklist_for(&right, t0).expect("the right metainfo's list is kept");
        assert!(kept.is_banned(&liar, t0) && !kept.is_banned(&honest, t0));
    }

    #[test]
    fn kept_blacklists_are_bounded() {
        let node = NodeFlow::default();
        let t0 = Instant::now();
        for i in 0..MAX_KEPT_BLACKLISTS + 10 {
            let mut list = Blacklist::new(BlacklistConfig::default());
            list.bad_piece(SocketAddr::from(([10, 0, 0, 1], 7000)), t0);
            node.keep_blacklist(
                &meta(i.to_string().as_bytes(), 1 << 20),
                list,
                t0 + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(node.lock().blacklists.len(), MAX_KEPT_BLACKLISTS);
        assert!(node.blacklist_for(&meta(b"0", 1 << 20), t0).is_none(), "the oldest went first");
    }

    #[test]
    fn outbound_connections_share_one_budget() {
        let node = NodeFlow::new(2);
        let a = node.connection_slot().unwrap();
        let b = node.clone().connection_slot().unwrap();
        assert_eq!(node.connection_room(), 0);
        assert!(node.connection_slot().is_none(), "the budget is the node's");
        drop(a);
        assert_eq!(node.connection_room(), 1);
        assert!(node.connection_slot().is_some());
        drop(b);
    }

    #[test]
    fn downloads_see_each_others_bytes_in_flight_and_one_node_rate() {
        let node = NodeFlow::default();
        let counter = node.counter();
        let (a, b) = (node.join(), node.join());
        let t0 = Instant::now();
        let first = a.update(t0, 4_000_000, 3);
        assert_eq!((first.rate, first.elsewhere), (None, 0));
        assert_eq!(b.update(t0, 1_000_000, 1).elsewhere, 4_000_000);
        for i in 1..=10u64 {
            counter.fetch_add(1_000_000, Ordering::Relaxed);
            a.update(t0 + Duration::from_millis(100 * i), 4_000_000, 3);
        }
        let view = a.update(t0 + Duration::from_millis(1100), 4_000_000, 3);
        assert_eq!(view.elsewhere, 1_000_000);
        let rate = view.rate.unwrap();
        assert!((rate - 10e6).abs() < 1.5e6, "{rate}");
        drop(b);
        assert_eq!(
            a.update(t0 + Duration::from_millis(1200), 0, 0).elsewhere,
            0,
            "a finished download no longer counts"
        );
    }

    #[test]
    fn one_cap_on_senders_counts_every_download() {
        let node = NodeFlow::default();
        let (a, b) = (node.join(), node.join());
        let t0 = Instant::now();
        assert_eq!(a.update(t0, 1, 6).sender_room, usize::MAX, "no cap before a sign of incast");
        assert_eq!(b.update(t0, 1, 4).sender_room, usize::MAX);
        assert_eq!(
            b.incast(t0, std::net::Ipv4Addr::LOCALHOST.into()),
            Some(5),
            "a sign on one download caps the node at half of the 10 peers sending to both"
        );
        assert_eq!(a.update(t0, 1, 2).sender_room, 0, "2 + 4 already over the cap");
        assert_eq!(b.update(t0, 1, 1).sender_room, 2);
        drop(b);
        assert_eq!(a.update(t0, 1, 2).sender_room, 3, "a finished download's senders no longer count");
    }
}
