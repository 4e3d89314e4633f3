//! The agent as a seeder: which blobs it recently pulled or served, and the announcements
//! that keep it listed at the tracker as a complete peer for them. Downloads report finished
//! blobs here; what the peer server can serve is in `serving`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_p2p::tracker_client::{AnnounceRequest, TrackerClient};
use shoal_p2p::PeerId;
use shoal_registry::Digest;

use crate::cache::BlobCache;

/// Blobs announced as seeded at once, most recent first.
const MAX_SEEDED: usize = 1000;

/// Blobs this agent keeps announcing as a complete seeder, for `window` after their last use.
pub struct Seeding {
    recent: Mutex<HashMap<Digest, Instant>>,
    window: Duration,
}

impl Seeding {
    pub fn new(window: Duration) -> Seeding {
        Seeding { recent: Mutex::new(HashMap::new()), window }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Instant>> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The blob was pulled or served: keep seeding it.
    pub fn touch(&self, digest: &Digest) {
        self.touch_at(digest, Instant::now());
    }

    /// The blob was last used `at` (a use before a restart): seeded for what is left of the
    /// window. A later use is never set back.
    pub fn touch_at(&self, digest: &Digest, at: Instant) {
        let mut recent = self.lock();
        let at = recent.get(digest).map_or(at, |&t| t.max(at));
        recent.insert(digest.clone(), at);
        if recent.len() > MAX_SEEDED {
            let mut by_age: Vec<(Instant, Digest)> = recent.iter().map(|(d, t)| (*t, d.clone())).collect();
            by_age.sort();
            for (_, d) in by_age.into_iter().take(recent.len() - MAX_SEEDED) {
                recent.remove(&d);
            }
        }
    }

    /// Seed the blobs of `used` (digest, last use as the files tell it) used within the
    /// window before now: what the cache found at start.
    pub fn resume(&self, used: Vec<(Digest, std::time::SystemTime)>) {
        let (now, instant) = (std::time::SystemTime::now(), Instant::now());
        for (digest, at) in used {
            let age = now.duration_since(at).unwrap_or(Duration::ZERO);
            if age < self.window {
                self.touch_at(&digest, instant.checked_sub(age).unwrap_or(instant));
            }
        }
    }

    /// The blobs seeded now (used within the seed window).
    pub fn current(&self) -> Vec<Digest> {
        let mut recent = self.lock();
        let window = self.window;
        recent.retain(|_, t| t.elapsed() < window);
        recent.keys().cloned().collect()
    }

    /// Re-announce every recently used blob as complete, every `interval`, until the process ends.
    pub async fn announce_loop(
        self: Arc<Self>,
        tracker: Arc<TrackerClient>,
        cache: Arc<BlobCache>,
        peer_id: PeerId,
        advertise: std::net::SocketAddr,
        interval: Duration,
    ) {
        let mut period = interval;
        loop {
            tokio::time::sleep(period).await;
            // Still held? Asking must not count as a use: every recently used blob is checked
            // each interval, in no particular order, which would scramble the
            // least-recently-used order eviction relies on.
            let reqs: Vec<AnnounceRequest> = self
                .current()
                .into_iter()
                .filter(|digest| cache.contains(digest))
                .map(|digest| AnnounceRequest {
                    digest,
                    peer_id: peer_id.to_string(),
                    addr: advertise,
                    complete: true,
                    stopped: false,
                })
                .collect();
            // One request per tracker (per 256 blobs), not one per blob.
            let mut asked = None::<u64>;
            for result in tracker.announce_many(&reqs).await {
                match result {
                    Ok(r) => asked = Some(asked.map_or(r.interval_secs, |a| a.min(r.interval_secs))),
                    Err(e) => tracing::debug!(error = %e, "seeding announce failed"),
                }
            }
            period = seeding_period(interval, asked);
        }
    }
}

/// How long the seeding loop waits between rounds: the configured interval, but never longer
/// than the trackers ask (they forget a peer after three of their own intervals; an agent
/// configured slower than its trackers was listed a third of the time).
fn seeding_period(configured: Duration, asked_secs: Option<u64>) -> Duration {
    match asked_secs {
        Some(secs) => configured.min(Duration::from_secs(secs.max(1))),
        None => configured,
    }
}

#[cfg(test)]
mod period_tests {
    use super::*;

    #[test]
    fn the_trackers_interval_caps_the_seeding_period() {
        let s = Duration::from_secs;
        assert_eq!(seeding_period(s(30), Some(3)), s(3), "a tracker that forgets after 9 s");
        assert_eq!(seeding_period(s(3), Some(30)), s(3), "announcing more often than asked is fine");
        assert_eq!(seeding_period(s(3), None), s(3), "no answer: the configured interval");
        assert_eq!(seeding_period(s(3), Some(0)), s(1), "a zero interval is not a busy loop");
    }
}
