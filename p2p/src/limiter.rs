//! Token-bucket bandwidth limits, one per direction per node, shared by every connection so
//! the node as a whole keeps to its rate.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A shared token bucket; `None` rate means unlimited.
#[derive(Debug)]
pub struct RateLimiter {
    rate: Option<u64>,
    burst: u64,
    state: Mutex<Bucket>,
    /// Bytes promised (admitted) but not yet sent, across every connection.
    backlog: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// `rate` bytes per second (None: unlimited), allowing bursts of `burst` bytes.
    pub fn new(rate: Option<u64>, burst: u64) -> RateLimiter {
        let burst = burst.max(1);
        RateLimiter {
            rate,
            burst,
            state: Mutex::new(Bucket { tokens: burst as f64, last: Instant::now() }),
            backlog: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn unlimited() -> RateLimiter {
        RateLimiter::new(None, 1)
    }

    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// Take `n` tokens, returning how long the caller must wait before using them. Requests
    /// larger than the burst go into debt, so big pieces still pass at the configured rate.
    pub fn reserve(&self, n: u64, now: Instant) -> Duration {
        let Some(rate) = self.rate.filter(|r| *r > 0) else { return Duration::ZERO };
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate as f64).min(self.burst as f64);
        b.last = now;
        b.tokens -= n as f64;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / rate as f64)
        }
    }

    /// Promise to send `n` more bytes, unless the bytes already promised would keep them
    /// waiting longer than `max_wait` at this rate: a peer is better told "no" at once than
    /// left to time out. Always admits when unlimited. Pair with [`release`](Self::release).
    pub fn admit(&self, n: u64, max_wait: Duration) -> bool {
        use std::sync::atomic::Ordering;
        let Some(rate) = self.rate.filter(|r| *r > 0) else { return true };
        // Bytes already being sent (reserved past the tokens at hand) wait ahead of these too:
        // with a dozen connections each sending a piece, that alone was over a second, and
        // admitted requests timed out at their requesters.
        let debt = self.debt(Instant::now());
        let budget = ((max_wait.as_secs_f64() * rate as f64) as u64).saturating_sub(debt);
        let mut current = self.backlog.load(Ordering::Relaxed);
        loop {
            // A single request larger than the budget is still admitted when nothing waits.
            if (current > 0 || debt > 0) && current.saturating_add(n) > budget {
                return false;
            }
            match self.backlog.compare_exchange(current, current + n, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// Bytes reserved beyond the tokens available at `now` (what current senders still owe).
    fn debt(&self, now: Instant) -> u64 {
        let Some(rate) = self.rate.filter(|r| *r > 0) else { return 0 };
        let b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        let tokens = (b.tokens + elapsed * rate as f64).min(self.burst as f64);
        // `as` saturates; a negative balance is the debt.
        (-tokens).max(0.0) as u64
    }

    /// Forget `n` admitted bytes (sent, or no longer wanted).
    pub fn release(&self, n: u64) {
        use std::sync::atomic::Ordering;
        if self.rate.filter(|r| *r > 0).is_none() {
            return;
        }
        let _ =
            self.backlog.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(b.saturating_sub(n)));
    }

    /// Wait until `n` bytes may pass.
    pub async fn acquire(&self, n: u64) {
        let wait = self.reserve(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let l = RateLimiter::unlimited();
        assert_eq!(l.reserve(u64::MAX / 2, Instant::now()), Duration::ZERO);
    }

    #[test]
    fn admits_only_what_can_be_sent_in_time() {
        let l = RateLimiter::new(Some(1000), 1000);
        assert!(l.admit(1500, Duration::from_secs(2)));
        assert!(!l.admit(1000, Duration::from_secs(2)), "2500 bytes would wait 2.5 s");
        l.release(1500);
        assert!(l.admit(5000, Duration::from_secs(2)), "an empty backlog admits one big request");
        assert!(RateLimiter::unlimited().admit(u64::MAX / 2, Duration::ZERO));
    }

    #[test]
    fn bytes_being_sent_count_against_admission() {
        let l = RateLimiter::new(Some(1000), 1000);
        let t0 = Instant::now();
        // Connections already sending 2500 bytes: 1500 more than the burst covers.
        assert_eq!(l.reserve(2500, t0), Duration::from_millis(1500));
        assert!(!l.admit(600, Duration::from_secs(2)), "1.5 s of debt + 0.6 s > 2 s");
        assert!(l.admit(400, Duration::from_secs(2)), "1.5 s of debt + 0.4 s fits");
    }

    #[test]
    fn keeps_the_rate_over_time() {
        let l = RateLimiter::new(Some(1000), 1000);
        let t0 = Instant::now();
        assert_eq!(l.reserve(1000, t0), Duration::ZERO); // the burst
        assert_eq!(l.reserve(500, t0), Duration::from_millis(500));
        // One second later, 1000 tokens were earned; 500 of them pay the debt.
        assert_eq!(l.reserve(500, t0 + Duration::from_secs(1)), Duration::ZERO);
        let wait = l.reserve(2000, t0 + Duration::from_secs(1));
        assert_eq!(wait, Duration::from_secs(2));
    }
}
