//! Keeping versions causal across origins: every member's health reply carries its version
//! clock's reading, which this origin's clock moves past (so a write here follows whatever the
//! others had written when they answered), and its wall clock, from which the skew between
//! origins is measured, exported and warned about. Clocks are not corrected here; an origin
//! whose clock runs more than `record::MAX_CLOCK_AHEAD` ahead has its writes refused.

use std::collections::HashMap;
use std::sync::{Mutex, Weak};

use crate::cluster::coordinator::Coordinator;
use crate::cluster::membership::{HealthReply, ReplyHook};
use crate::cluster::record::now_millis;

/// Skew (either way) above which a member's clock is warned about, in milliseconds.
pub const SKEW_WARN_MS: u64 = 1_000;

/// Per-member clock skew, as measured from health replies: pure bookkeeping.
#[derive(Debug, Default)]
pub struct SkewTracker {
    /// Member id → (its wall clock − ours, in ms; whether a warning is standing).
    members: HashMap<String, (i64, bool)>,
}

/// What one measurement changed.
#[derive(Debug, PartialEq, Eq)]
pub struct SkewUpdate {
    /// The largest skew of any member, in ms (absolute).
    pub max_abs_ms: u64,
    /// Set when this member just crossed [`SKEW_WARN_MS`] (the skew), or came back under it.
    pub crossed: Option<i64>,
}

impl SkewTracker {
    pub fn update(&mut self, member: &str, skew_ms: i64) -> SkewUpdate {
        let over = skew_ms.unsigned_abs() > SKEW_WARN_MS;
        let entry = self.members.entry(member.to_string()).or_insert((0, false));
        let crossed = (entry.1 != over).then_some(skew_ms);
        *entry = (skew_ms, over);
        let max_abs_ms = self.members.values().map(|(s, _)| s.unsigned_abs()).max().unwrap_or(0);
        SkewUpdate { max_abs_ms, crossed }
    }
}

/// The membership hook of an origin: observe each reply's clock, measure skew.
pub fn reply_hook(coordinator: Weak<Coordinator>) -> ReplyHook {
    let tracker = Mutex::new(SkewTracker::default());
    Box::new(move |member: &str, reply: &HealthReply| {
        let Some(c) = coordinator.upgrade() else { return };
        if let Some(v) = &reply.clock {
            if !c.clock.observe(v) {
                tracing::warn!(%member, millis = v.millis, "member's version clock is far ahead of ours: not followed");
            }
        }
        let Some(theirs) = reply.wall_millis else { return };
        let skew = i64::try_from(theirs)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(now_millis()).unwrap_or(0));
        let update = tracker.lock().unwrap_or_else(|p| p.into_inner()).update(member, skew);
        c.metrics.clock_skew_seconds.set(update.max_abs_ms as f64 / 1000.0);
        match update.crossed {
            Some(s) if s.unsigned_abs() > SKEW_WARN_MS => {
                tracing::warn!(%member, skew_ms = s, "member's clock differs from ours; fix NTP (versions still order causally)")
            }
            Some(s) => tracing::info!(%member, skew_ms = s, "member's clock agrees with ours again"),
            None => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_warns_once_per_crossing_and_reports_the_largest() {
        let mut t = SkewTracker::default();
        assert_eq!(t.update("a", 200), SkewUpdate { max_abs_ms: 200, crossed: None });
        assert_eq!(t.update("b", -3_000), SkewUpdate { max_abs_ms: 3_000, crossed: Some(-3_000) });
        assert_eq!(t.update("b", -2_900), SkewUpdate { max_abs_ms: 2_900, crossed: None });
        assert_eq!(t.update("b", 10), SkewUpdate { max_abs_ms: 200, crossed: Some(10) });
    }
}
