//! Failed logins, counted per user name: after `max` failures within `window`, further
//! attempts for that name are refused (429) until the window has passed, so a password cannot
//! be guessed at the speed of the network. Keyed by name, not address: the HTTP server does
//! not see client addresses behind load balancers anyway.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Names tracked at once; past this, entries whose window has passed are dropped, and if
/// none has, the unknown name whose window started first (made-up names must not grow the
/// table without end; names are at most `MAX_LOGIN_NAME_BYTES` long). Configured users'
/// entries are never pushed out: a flood of made-up names must not reset a real user's
/// count. Unknown names are counted at all so that a 429 does not tell which names exist.
const MAX_TRACKED: usize = 10_000;

/// Distinct wrong passwords remembered per name and window: a repeat of one is not a new
/// guess. containerd and buildkit send each failed login twice (a POST, then a GET with Basic),
/// and kubelets retry an old imagePullSecret: counted each time, a password rotation while
/// some nodes still held the old one kept the name blocked and refused the new password too.
const REMEMBERED_GUESSES: usize = 16;

/// Failures of one name in its current window.
struct Entry {
    count: u32,
    since: Instant,
    /// The name is a configured user's.
    known: bool,
    /// Keyed hashes of the wrong passwords counted in this window ([`guess`]).
    tried: Vec<[u8; 32]>,
}

/// A wrong password as remembered: hashed with a key of this process, so the table holds
/// nothing a guesser could test offline.
fn guess(name: &str, password: &str) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| {
        let mut key = [0u8; 32];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key);
        key
    });
    let mut h = Sha256::new();
    h.update(key);
    h.update((name.len() as u64).to_le_bytes());
    h.update(name.as_bytes());
    h.update(password.as_bytes());
    h.finalize().into()
}

pub struct FailedLogins {
    max: u32,
    window: Duration,
    seen: Mutex<HashMap<String, Entry>>,
}

impl FailedLogins {
    pub fn new(max: u32, window: Duration) -> FailedLogins {
        FailedLogins { max: max.max(1), window, seen: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `name` has used up its failures for now.
    pub fn blocked(&self, name: &str, now: Instant) -> bool {
        self.lock()
            .get(name)
            .is_some_and(|e| e.count >= self.max && now.duration_since(e.since) < self.window)
    }

    /// Count a failure for `name` with `password` (`known`: a configured user's), unless the
    /// same wrong password was counted for it in this window already.
    pub fn failed(&self, name: &str, password: &str, known: bool, now: Instant) {
        let mut seen = self.lock();
        if seen.len() >= MAX_TRACKED && !seen.contains_key(name) {
            let window = self.window;
            seen.retain(|_, e| now.duration_since(e.since) < window);
            if seen.len() >= MAX_TRACKED {
                let unknown = seen.iter().filter(|(_, e)| !e.known);
                let oldest = unknown.min_by_key(|(_, e)| e.since).map(|(n, _)| n.clone());
                if let Some(oldest) = oldest {
                    seen.remove(&oldest);
                }
            }
        }
        let entry =
            seen.entry(name.to_string()).or_insert(Entry { count: 0, since: now, known, tried: Vec::new() });
        if now.duration_since(entry.since) >= self.window {
            (entry.count, entry.since) = (0, now);
            entry.tried.clear();
        }
        let tried = guess(name, password);
        if entry.tried.contains(&tried) {
            return;
        }
        if entry.tried.len() < REMEMBERED_GUESSES {
            entry.tried.push(tried);
        }
        entry.count += 1;
    }

    /// Names tracked now (tests).
    #[cfg(test)]
    pub fn lock_len(&self) -> usize {
        self.lock().len()
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
        for i in 0..3 {
            assert!(!l.blocked("a", t));
            l.failed("a", &format!("guess {i}"), true, t);
        }
        assert!(l.blocked("a", t));
        assert!(!l.blocked("b", t));
        assert!(!l.blocked("a", t + Duration::from_secs(61)));
        l.succeeded("a");
        assert!(!l.blocked("a", t));
    }

    /// The same wrong password again (a client's second form of one login, a node retrying
    /// an old secret) is not another guess; different ones are, up to the limit.
    #[test]
    fn a_repeated_wrong_password_counts_once() {
        let l = FailedLogins::new(3, Duration::from_secs(60));
        let t = Instant::now();
        for _ in 0..10 {
            l.failed("alice", "old", true, t);
        }
        assert!(!l.blocked("alice", t), "one wrong password, sent ten times, blocked the name");
        l.failed("alice", "guess 1", true, t);
        l.failed("bob", "guess 2", true, t);
        assert!(!l.blocked("alice", t));
        l.failed("alice", "guess 2", true, t);
        assert!(l.blocked("alice", t), "three different wrong passwords");
        // A new window forgets the passwords tried.
        let later = t + Duration::from_secs(61);
        l.failed("alice", "old", true, later);
        assert_eq!(l.lock().get("alice").map(|e| e.count), Some(1));
    }

    /// Made-up names within one window do not grow the table past its bound; the made-up
    /// name whose window started first makes room, a configured user's entry never does.
    #[test]
    fn the_table_stays_bounded_within_one_window() {
        let l = FailedLogins::new(3, Duration::from_secs(60));
        let t = Instant::now();
        for i in 0..3 {
            l.failed("user", &format!("guess {i}"), true, t);
        }
        for i in 0..MAX_TRACKED + 500 {
            l.failed(&format!("made-up {i}"), "x", false, t + Duration::from_micros(i as u64 + 1));
        }
        assert!(l.lock().len() <= MAX_TRACKED, "{} names tracked", l.lock().len());
        assert!(l.blocked("user", t), "a configured user's count stays");
        assert!(!l.lock().contains_key("made-up 0"), "the oldest made-up name made room");
        assert!(l.lock().contains_key(&format!("made-up {}", MAX_TRACKED + 499)));
    }
}
