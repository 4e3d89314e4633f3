//! How often one announcer may make the tracker ask the origins about a digest it knows no
//! seeders of. Admission charges live entries, and a `stopped` announce frees one at once,
//! so an announcer alternating batches of new digests and their stops was charged nothing
//! and cost the origins a call per digest (128 per request, with no rate at all). A token
//! bucket per announcer: a full batch of new digests at once, then [`LOOKUPS_PER_SEC`].
//! Past it, the announce is handed what a full tracker hands out (cached seeders only).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Uncached seeder lookups one announcer may cause at once: a full batch of new digests (an
/// agent starting pulls of a few large images).
pub const LOOKUP_BURST: f64 = 256.0;
/// Uncached seeder lookups one announcer may cause per second, past the burst: a node
/// pulling new layers all the time asks about a few a second.
pub const LOOKUPS_PER_SEC: f64 = 20.0;
/// Announcers remembered; past it the budgets start again (forgetting only gives each a new
/// burst, and each announcer's entries are capped by its quota anyway).
const MAX_ANNOUNCERS: usize = 100_000;

/// Each announcer's lookup budget: tokens left and when they were counted.
#[derive(Default)]
pub struct LookupBudgets {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl LookupBudgets {
    /// Whether `announcer` may cause one more lookup at `now` (and if so, it is spent).
    pub fn take(&self, announcer: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_ANNOUNCERS && !buckets.contains_key(announcer) {
            buckets.clear();
        }
        let (tokens, at) = buckets.entry(announcer.to_string()).or_insert((LOOKUP_BURST, now));
        let refilled = now.saturating_duration_since(*at).as_secs_f64() * LOOKUPS_PER_SEC;
        *tokens = (*tokens + refilled).min(LOOKUP_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate_per_announcer() {
        let budgets = LookupBudgets::default();
        let now = Instant::now();
        let taken = (0..1000).filter(|_| budgets.take("a", now)).count();
        assert_eq!(taken, LOOKUP_BURST as usize);
        assert!(budgets.take("b", now), "another announcer has its own budget");
        let later = now + Duration::from_secs(1);
        let taken = (0..1000).filter(|_| budgets.take("a", later)).count();
        assert_eq!(taken, LOOKUPS_PER_SEC as usize, "a second's worth");
        // Refills stop at the burst.
        let much_later = later + Duration::from_secs(3600);
        let taken = (0..1000).filter(|_| budgets.take("a", much_later)).count();
        assert_eq!(taken, LOOKUP_BURST as usize);
    }
}
