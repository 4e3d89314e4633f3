//! One upstream question per origin at a time for the same manifest: a rollout's nodes ask
//! every origin for a new image's tag and manifests within a second, and each request that
//! missed the cluster asked the upstream itself (Docker Hub counts every manifest `GET`
//! against the pull limit, and its 429 stops every pull from it for minutes). A request that
//! missed the cluster and would ask the upstream about a key (repository, reference, the
//! client's credentials) waits for the one before it, up to [`SERIAL_WAIT`], then looks in
//! the cluster again, where that one stored the answer; answers the cluster holds never wait.
//! Each request still makes its own access checks; nothing one client was given is handed
//! to another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest a request waits for the one before it with the same key: a healthy upstream
/// answers a manifest within it; past it (an upstream that hangs) the request asks itself, so
/// that with `STALE_ANSWER_AFTER` on top it still answers within an agent's 10 s wait.
pub const SERIAL_WAIT: Duration = Duration::from_secs(2);

/// Keys most held or waited on at once; past it, a request goes on without waiting.
const MAX_KEYS: usize = 10_000;

/// Per-key turns.
#[derive(Default)]
pub struct Serial {
    keys: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A request's turn for its key; the key leaves the map when no other request holds or
/// waits for it.
pub struct Turn<'a> {
    serial: &'a Serial,
    key: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Serial {
    /// Wait (up to [`SERIAL_WAIT`]) for the requests before this one with `key`; the turn
    /// lasts until the returned value drops.
    pub async fn turn(&self, key: String) -> Option<Turn<'_>> {
        let lock = {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            if keys.len() >= MAX_KEYS && !keys.contains_key(&key) {
                return None;
            }
            keys.entry(key.clone()).or_default().clone()
        };
        let guard = tokio::time::timeout(SERIAL_WAIT, lock.clone().lock_owned()).await.ok();
        Some(Turn { serial: self, key, lock, guard })
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut keys = self.serial.keys.lock().unwrap_or_else(|p| p.into_inner());
        // The map's reference, this turn's, and its guard's (when it got the lock).
        let own = 2 + usize::from(self.guard.is_some());
        if keys.get(&self.key).is_some_and(|l| Arc::ptr_eq(l, &self.lock))
            && Arc::strong_count(&self.lock) <= own
        {
            keys.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests with one key take turns, others do not wait, a request waits no longer than
    /// [`SERIAL_WAIT`], and the map empties as the turns end.
    #[tokio::test]
    async fn turns_per_key_bounded_and_forgotten() {
        let serial = Arc::new(Serial::default());
        let first = serial.turn("a".into()).await.expect("a turn");
        let other = tokio::time::timeout(Duration::from_millis(100), serial.turn("b".into())).await;
        assert!(other.is_ok(), "another key does not wait");
        drop(other);
        let waiting = {
            let serial = serial.clone();
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let turn = serial.turn("a".into()).await;
                (started.elapsed(), turn.is_some_and(|t| t.guard.is_some()))
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(first);
        let (waited, got) = waiting.await.unwrap();
        assert!(got && waited >= Duration::from_millis(150) && waited < SERIAL_WAIT, "{waited:?}");
        assert!(serial.keys.lock().unwrap().is_empty(), "keys left behind");

        let held = serial.turn("c".into()).await.expect("a turn");
        let started = std::time::Instant::now();
        let late = serial.turn("c".into()).await.expect("a turn");
        assert!(late.guard.is_none() && started.elapsed() >= SERIAL_WAIT, "waited past the bound");
        drop((held, late));
        assert!(serial.keys.lock().unwrap().is_empty());
    }
}
