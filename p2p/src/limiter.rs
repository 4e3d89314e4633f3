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
        RateLimiter { rate, burst, state: Mutex::new(Bucket { tokens: burst as f64, last: Instant::now() }) }
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
