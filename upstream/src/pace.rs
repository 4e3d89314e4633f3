//! Whether an upstream body keeps a minimum rate: an upstream that sent a byte just inside
//! each idle timeout held a pull-through fetch, and the clients waiting on it, without end.

use std::time::{Duration, Instant};

/// A body (a blob's or a manifest's) that averages less than this many bytes a second over a
/// window of twice the idle timeout (60 s) fails. 64 KiB/s is half a megabit, far below any
/// registry's link.
pub const MIN_BODY_RATE: u64 = 64 * 1024;

/// Whether a body keeps [`MIN_BODY_RATE`]: bytes counted per window of twice the idle
/// timeout, checked as each chunk arrives (silence is the idle timeout's to catch).
pub(crate) struct Pace {
    window: Duration,
    started: Instant,
    bytes: u64,
}

impl Pace {
    pub(crate) fn new(idle: Duration) -> Pace {
        Pace { window: idle.saturating_mul(2), started: Instant::now(), bytes: 0 }
    }

    /// Count `n` bytes just received; an error once a whole window passed below the rate.
    pub(crate) fn count(&mut self, n: u64) -> Result<(), String> {
        self.bytes = self.bytes.saturating_add(n);
        let elapsed = self.started.elapsed();
        if elapsed < self.window {
            return Ok(());
        }
        let rate = self.bytes as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
        if rate < MIN_BODY_RATE as f64 {
            return Err(format!(
                "upstream sent {} bytes in {:.0} s, under the minimum of {MIN_BODY_RATE} bytes/s",
                self.bytes,
                elapsed.as_secs_f64()
            ));
        }
        (self.started, self.bytes) = (Instant::now(), 0);
        Ok(())
    }
}
