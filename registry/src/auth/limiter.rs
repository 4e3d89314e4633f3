//! Failed logins, counted per user name: after `max` failures within `window`, further
//! attempts for that name are refused (429) until the window has passed, so a password cannot
//! be guessed at the speed of the network. Keyed by name, not address: the HTTP server does
//! not see client addresses behind load balancers anyway.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Names tracked at once; past this, entries whose window has passed are dropped.
const MAX_TRACKED: usize = 10_000;

pub struct FailedLogins {
    max: u32,
    window: Duration,
    seen: Mutex<HashMap<String, (u32, Instant)>>,
}

impl FailedLogins {
    pub fn new(max: u32, window: Duration) -> FailedLogins {
        FailedLogins { max: max.max(1), window, seen: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u32, Instant)>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `name` has used up its failures for now.
    pub fn blocked(&self, name: &str, now: Instant) -> bool {
        self.lock()
            .get(name)
            .is_some_and(|(count, since)| *count >= self.max && now.duration_since(*since) < self.window)
    }

    /// Count a failure for `name`.
    pub fn failed(&self, name: &str, now: Instant) {
        let mut seen = self.lock();
        if seen.len() >= MAX_TRACKED {
            let window = self.window;
            seen.retain(|_, (_, since)| now.duration_since(*since) < window);
        }
        let entry = seen.entry(name.to_string()).or_insert((0, now));
        if now.duration_since(entry.1) >= self.window {
            *entry = (0, now);
        }
        entry.0 += 1;
    }

    /// A success clears the count.
    pub fn succeeded(&self, name: &str) {
        self.lock().remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_max_then_recovers() {
        let l = FailedLogins::new(3, Duration::from_secs(60));
        let t = Instant::now();
        for _ in 0..3 {
            assert!(!l.blocked("a", t));
            l.failed("a", t);
        }
        assert!(l.blocked("a", t));
        assert!(!l.blocked("b", t));
        assert!(!l.blocked("a", t + Duration::from_secs(61)));
        l.succeeded("a");
        assert!(!l.blocked("a", t));
    }
}
