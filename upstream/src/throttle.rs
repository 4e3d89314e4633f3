//! `Retry-After` windows per credentials: registries count their pull limits per account
//! (and per address for anonymous pulls), so one client's 429, its own account's quota, does
//! not stop the others. Bounded; the shared windows (anonymous, configured credentials) are
//! never evicted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The fingerprint of the credentials a request goes with (zeros: none).
pub(crate) type Key = [u8; 32];

/// The key of requests without credentials.
const ANONYMOUS: Key = [0; 32];

/// Credentials whose `Retry-After` is remembered at once (when full, the client window that
/// ends first is dropped; never the anonymous or the configured one).
const MAX_THROTTLED_CLIENTS: usize = 10_000;

/// No request before each key's instant.
pub(crate) struct Throttles {
    windows: Mutex<HashMap<Key, Instant>>,
    /// The configured credentials' key (every client without credentials of its own goes
    /// by it), or [`ANONYMOUS`].
    shared: Key,
}

impl Throttles {
    pub(crate) fn new(shared: Key) -> Throttles {
        Throttles { windows: Mutex::new(HashMap::new()), shared }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Instant>> {
        self.windows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// No request with the credentials of `key` for `wait` from `now`.
    pub(crate) fn remember(&self, key: &Key, now: Instant, wait: Duration) {
        let mut windows = self.lock();
        if windows.len() >= MAX_THROTTLED_CLIENTS && !windows.contains_key(key) {
            windows.retain(|_, until| *until > now);
            // Still full: the client window ending first goes.
            if windows.len() >= MAX_THROTTLED_CLIENTS {
                let first = windows
                    .iter()
                    .filter(|(k, _)| **k != ANONYMOUS && **k != self.shared)
                    .min_by_key(|(_, u)| **u);
                if let Some(first) = first.map(|(k, _)| *k) {
                    windows.remove(&first);
                }
            }
        }
        windows.insert(*key, now + wait);
    }

    /// What is left at `now` of the window of `key`, if any.
    pub(crate) fn left(&self, key: &Key, now: Instant) -> Option<Duration> {
        let until = self.lock().get(key).copied()?;
        Some(until.saturating_duration_since(now)).filter(|left| !left.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full table of live windows drops the client window that ends first for a new key,
    /// never the anonymous one (ending first here), and nothing for a key already there.
    #[test]
    fn a_full_throttle_table_keeps_the_shared_window() {
        let up = Throttles::new(ANONYMOUS);
        let now = Instant::now();
        let key = |i: usize| {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            k
        };
        up.remember(&[0; 32], now, Duration::from_secs(5));
        for i in 0..MAX_THROTTLED_CLIENTS - 1 {
            up.remember(&key(i), now, Duration::from_secs(60 + i as u64));
        }
        assert_eq!(up.lock().len(), MAX_THROTTLED_CLIENTS);
        up.remember(&key(0), now, Duration::from_secs(600));
        assert_eq!(up.lock().len(), MAX_THROTTLED_CLIENTS, "an update evicts nothing");
        up.remember(&key(MAX_THROTTLED_CLIENTS), now, Duration::from_secs(600));
        let table = up.lock();
        assert_eq!(table.len(), MAX_THROTTLED_CLIENTS);
        assert!(table.contains_key(&[0; 32]), "the anonymous window was dropped");
        assert!(!table.contains_key(&key(1)), "the client window ending first goes");
        assert!(table.contains_key(&key(0)), "updated, no longer first");
    }
}
