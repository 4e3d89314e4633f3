//! What every download of one node shares: the bytes its connections receive (from which the
//! node's ingress rate is measured), the bytes each download has in flight, and one budget of
//! outbound peer connections. A node pulling five layers at once has one link, and five
//! in-flight budgets of two seconds each would queue ten; twenty layers with ten connections
//! each would open two hundred.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::flow::RateMeter;

/// Default outbound peer connections per node, across all its downloads.
pub const DEFAULT_MAX_OUTBOUND_CONNECTIONS: usize = 128;

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
    in_flight: HashMap<u64, u64>,
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
        inner.in_flight.insert(id, 0);
        DownloadSlot { node: self.clone(), id }
    }
}

impl DownloadSlot {
    /// Record this download's bytes in flight at `now`, and return the node's measured ingress
    /// rate (bytes/s, once measured) and the bytes the node's other downloads have in flight.
    pub fn update(&self, now: Instant, in_flight: u64) -> (Option<f64>, u64) {
        let total = self.node.received.load(Ordering::Relaxed);
        let mut inner = self.node.lock();
        inner.in_flight.insert(self.id, in_flight);
        let busy = inner.in_flight.values().any(|&b| b > 0);
        inner.meter.sample(now, total, busy);
        let elsewhere = inner.in_flight.iter().filter(|(&id, _)| id != self.id).map(|(_, &b)| b).sum();
        (inner.meter.rate(), elsewhere)
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
    use std::time::Duration;

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
        assert_eq!(a.update(t0, 4_000_000), (None, 0));
        assert_eq!(b.update(t0, 1_000_000).1, 4_000_000);
        for i in 1..=10u64 {
            counter.fetch_add(1_000_000, Ordering::Relaxed);
            a.update(t0 + Duration::from_millis(100 * i), 4_000_000);
        }
        let (rate, elsewhere) = a.update(t0 + Duration::from_millis(1100), 4_000_000);
        assert_eq!(elsewhere, 1_000_000);
        let rate = rate.unwrap();
        assert!((rate - 10e6).abs() < 1.5e6, "{rate}");
        drop(b);
        assert_eq!(
            a.update(t0 + Duration::from_millis(1200), 0).1,
            0,
            "a finished download no longer counts"
        );
    }
}
