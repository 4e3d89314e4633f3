//! Keeping versions causal across origins: every member's health reply carries its version
//! clock's reading, which this origin's clock moves past (so a write here follows whatever the
//! others had written when they answered), and its wall clock, from which the skew between
//! origins is measured, exported and warned about. Clocks are not corrected here. Instead an
//! origin whose clock disagrees with most of the others by more than [`SKEW_WRITE_LIMIT_MS`]
//! does not write ([`SkewTracker::write_refusal`]): its versions would either be refused by
//! the others (ahead) or lose to what they wrote before (behind), after its `201`.

use std::collections::HashMap;
use std::sync::{Mutex, Weak};

use crate::cluster::coordinator::Coordinator;
use crate::cluster::membership::{HealthReply, ReplyHook};
use crate::cluster::record::now_millis;

/// Skew (either way) above which a member's clock is warned about, in milliseconds.
pub const SKEW_WARN_MS: u64 = 1_000;

/// Skew (either way) beyond which a member's clock counts as out of sync with this origin's,
/// in milliseconds: a third of `record::MAX_CLOCK_AHEAD`, so that versions of origins that
/// all agree within it (and follow each other's readings) stay inside that bound everywhere.
pub const SKEW_WRITE_LIMIT_MS: u64 = 20_000;

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

    /// Whether `member`'s last measured clock is more than [`SKEW_WRITE_LIMIT_MS`] from ours.
    pub fn out_of_sync(&self, member: &str) -> bool {
        self.members.get(member).is_some_and(|(s, _)| s.unsigned_abs() > SKEW_WRITE_LIMIT_MS)
    }

    /// Why this origin must not write now, given the other live members: more than half of
    /// them have clocks out of sync with ours, so the odd clock is more likely ours (with one
    /// other member, either may be wrong: neither writes). Members not measured yet count as
    /// in sync; a write they refuse as too far ahead still fails cleanly (see the coordinator).
    pub fn write_refusal(&self, others: &[String]) -> Option<String> {
        let off: Vec<(&str, i64)> = others
            .iter()
            .filter(|m| self.out_of_sync(m))
            .filter_map(|m| self.members.get(m.as_str()).map(|(s, _)| (m.as_str(), *s)))
            .collect();
        if off.len() * 2 <= others.len() {
            return None;
        }
        let list: Vec<String> =
            off.iter().map(|(m, s)| format!("{m} {:+.1} s", *s as f64 / 1000.0)).collect();
        Some(format!(
            "this origin's clock disagrees with {} of the {} other origins by more than {} s ({}): writes are refused until the clocks agree (fix NTP)",
            off.len(),
            others.len(),
            SKEW_WRITE_LIMIT_MS / 1000,
            list.join(", ")
        ))
    }
}

/// The skews as the coordinator holds them: measured by the reply hook, read by writes.
#[derive(Debug, Default)]
pub struct Skews(Mutex<SkewTracker>);

impl Skews {
    fn lock(&self) -> std::sync::MutexGuard<'_, SkewTracker> {
        // A map of integers, updated in one insert: a panic cannot leave it torn.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn update(&self, member: &str, skew_ms: i64) -> SkewUpdate {
        self.lock().update(member, skew_ms)
    }

    pub fn out_of_sync(&self, member: &str) -> bool {
        self.lock().out_of_sync(member)
    }

    pub fn write_refusal(&self, others: &[String]) -> Option<String> {
        self.lock().write_refusal(others)
    }
}

/// The membership hook of an origin: observe each reply's clock, measure skew.
pub fn reply_hook(coordinator: Weak<Coordinator>) -> ReplyHook {
    Box::new(move |member: &str, reply: &HealthReply| {
        let Some(c) = coordinator.upgrade() else { return };
        if let Some(v) = &reply.clock {
            if !c.clock.observe_reading(v) {
                tracing::warn!(%member, millis = v.millis, "member's version clock is far ahead of ours: not followed");
            }
        }
        let Some(theirs) = reply.wall_millis else { return };
        let skew = i64::try_from(theirs)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(now_millis()).unwrap_or(0));
        let update = c.skews.update(member, skew);
        c.metrics.clock_skew_seconds.set(update.max_abs_ms as f64 / 1000.0);
        match update.crossed {
            Some(s) if s.unsigned_abs() > SKEW_WARN_MS => {
                tracing::warn!(%member, skew_ms = s, "member's clock differs from ours; fix NTP (versions still order causally; beyond {} s, writes stop)", SKEW_WRITE_LIMIT_MS / 1000)
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

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn writes_stop_where_the_odd_clock_is_ours() {
        let minutes = 5 * 60_000;
        // Three origins, one of them five minutes off (either way): it stops writing, the
        // other two go on (their writes skip it or it takes them).
        for off in [minutes, -minutes] {
            let mut odd = SkewTracker::default();
            odd.update("a", -off);
            odd.update("b", -off + 3_000);
            assert!(odd.write_refusal(&ids(&["a", "b"])).is_some_and(|w| w.contains("2 of the 2")));
            let mut sane = SkewTracker::default();
            sane.update("odd", off);
            sane.update("b", 3_000);
            assert!(sane.out_of_sync("odd") && !sane.out_of_sync("b"));
            assert_eq!(sane.write_refusal(&ids(&["odd", "b"])), None);
        }
        // Two origins apart: neither can tell whose clock is wrong.
        let mut two = SkewTracker::default();
        two.update("a", 40_000);
        assert!(two.write_refusal(&ids(&["a"])).is_some());
        // Within the limit, or not measured yet, or no longer live: no refusal.
        let mut t = SkewTracker::default();
        t.update("a", SKEW_WRITE_LIMIT_MS as i64);
        t.update("gone", 10 * 60_000);
        assert_eq!(t.write_refusal(&ids(&["a", "new"])), None);
        assert_eq!(t.write_refusal(&[]), None, "a lone origin always writes");
    }
}
