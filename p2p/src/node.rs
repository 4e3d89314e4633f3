//! What every download of one node shares: the bytes its connections receive (from which the
//! node's ingress rate is measured) and the bytes each download has in flight, so that the
//! in-flight budget of `flow` is the node's, not one per blob. A node pulling five layers at
//! once has one link, and five budgets of two seconds each would queue ten.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::flow::RateMeter;

/// A node's shared ingress state; cheap to clone.
#[derive(Clone, Default)]
pub struct NodeFlow {
    received: Arc<AtomicU64>,
    inner: Arc<Mutex<Inner>>,
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
