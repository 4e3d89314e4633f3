//! Repository metadata as last-writer-wins records. Each repository's links, manifests and
//! tags are stored on the origins that own the repository name; every change is a record with
//! a version, and replicas converge by keeping the highest version of each key. Deletes are
//! records too (tombstones), so a stale replica cannot bring a deleted tag back.

use std::cmp::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use shoal_registry::manifest::ReferrerDescriptor;
use shoal_registry::Digest;

/// When and where a record was written: a hybrid logical clock reading (see
/// [`VersionClock`]). Conflicts resolve by the later reading (milliseconds, then the logical
/// counter), then by the greater origin id; the same write seen twice compares equal and
/// changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// Milliseconds since the Unix epoch: the writing origin's clock, or a later version it
    /// had seen.
    pub millis: u64,
    /// Orders versions within one millisecond (and after a version from a clock ahead).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub logical: u32,
    /// Id of the writing origin (its cluster address).
    pub node: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Version {
    pub fn new(millis: u64, node: impl Into<String>) -> Version {
        Version { millis, logical: 0, node: node.into() }
    }

    /// The least version greater than this one: the same reading, from a node id that sorts
    /// right after this one's. Every version a [`VersionClock`] hands out after observing
    /// `self` has a later reading, so it is greater still.
    ///
    /// Garbage collection's tombstones carry it: a tombstone must win over the link version it
    /// marked and nothing newer. One from the collector's own clock could outrank a manifest
    /// put's refresh of the link when the refresh reached an owner after the tombstone (a slow
    /// write, or the collector's clock ahead), and an acknowledged image would lose its layer.
    pub fn just_after(&self) -> Version {
        Version { millis: self.millis, logical: self.logical, node: format!("{}\0", self.node) }
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.millis, self.logical, &self.node).cmp(&(other.millis, other.logical, &other.node))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Milliseconds since the Unix epoch, for versions and ages.
pub fn now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What a record is about, within one repository.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", content = "key", rename_all = "lowercase")]
pub enum RecordKey {
    /// A blob readable through the repository.
    Link(Digest),
    /// A manifest of the repository.
    Manifest(Digest),
    /// A tag of the repository.
    Tag(String),
}

/// The kinds of [`RecordKey`], for scans.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    Link,
    Manifest,
    Tag,
}

impl RecordKey {
    pub fn kind(&self) -> RecordKind {
        match self {
            RecordKey::Link(_) => RecordKind::Link,
            RecordKey::Manifest(_) => RecordKind::Manifest,
            RecordKey::Tag(_) => RecordKind::Tag,
        }
    }

    /// The key inside its kind: a digest or a tag name.
    pub fn name(&self) -> String {
        match self {
            RecordKey::Link(d) | RecordKey::Manifest(d) => d.to_string(),
            RecordKey::Tag(t) => t.clone(),
        }
    }
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Link => "link",
            RecordKind::Manifest => "manifest",
            RecordKind::Tag => "tag",
        }
    }
}

/// A stored manifest with what the API needs without parsing it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestValue {
    pub media_type: String,
    /// The manifest exactly as pushed (manifests are JSON, so UTF-8).
    pub bytes: String,
    /// Blobs (config, layers) it references: what garbage collection keeps.
    #[serde(default)]
    pub blobs: Vec<Digest>,
    /// Child manifests (of an index).
    #[serde(default)]
    pub children: Vec<Digest>,
    /// The referrers API entry, for a manifest with a subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referrer: Option<ReferrerDescriptor>,
}

/// The value of a live record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordValue {
    Link { size: u64 },
    Manifest(Box<ManifestValue>),
    Tag { digest: Digest },
}

/// One versioned fact about a repository; `value: None` is a tombstone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub key: RecordKey,
    pub version: Version,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<RecordValue>,
    /// Compare-and-set: apply this record only where the stored record of `key` has exactly
    /// this version. Garbage collection's tombstones carry the version of the link it marked,
    /// so a link refreshed since (a manifest put reusing the blob) is not removed. A condition,
    /// never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<Version>,
}

impl Record {
    /// An unconditional record.
    pub fn new(key: RecordKey, version: Version, value: Option<RecordValue>) -> Record {
        Record { key, version, value, expect: None }
    }

    /// Whether this record should replace `existing` (last writer wins).
    pub fn supersedes(&self, existing: Option<&Record>) -> bool {
        existing.is_none_or(|e| self.version > e.version)
    }

    /// Whether a store holding `existing` takes this record: it is newer and, if it is
    /// conditional, `existing` is exactly the version it expects.
    pub fn applies_over(&self, existing: Option<&Record>) -> bool {
        let condition_holds = match &self.expect {
            None => true,
            Some(expected) => existing.is_some_and(|e| &e.version == expected),
        };
        condition_holds && self.supersedes(existing)
    }

    /// The record as stored: without its condition.
    pub fn stored(&self) -> Record {
        Record { expect: None, ..self.clone() }
    }

    pub fn is_live(&self) -> bool {
        self.value.is_some()
    }

    /// The blob size of a live link.
    pub fn link_size(&self) -> Option<u64> {
        match &self.value {
            Some(RecordValue::Link { size }) => Some(*size),
            _ => None,
        }
    }

    pub fn manifest(&self) -> Option<&ManifestValue> {
        match &self.value {
            Some(RecordValue::Manifest(m)) => Some(m),
            _ => None,
        }
    }

    pub fn tag_target(&self) -> Option<&Digest> {
        match &self.value {
            Some(RecordValue::Tag { digest }) => Some(digest),
            _ => None,
        }
    }
}

/// The winner among the copies of one record that several replicas returned.
pub fn newest<'a>(copies: impl IntoIterator<Item = &'a Record>) -> Option<&'a Record> {
    copies.into_iter().max_by(|a, b| a.version.cmp(&b.version))
}

/// How far ahead of this origin's wall clock a version may be. Further ahead, it is refused
/// on the internal API and not observed: one origin with a clock far in the future must not
/// drag every version of the cluster there.
pub const MAX_CLOCK_AHEAD: Duration = Duration::from_secs(60);

/// Whether `v` is further ahead of this origin's wall clock than [`MAX_CLOCK_AHEAD`].
pub fn too_far_ahead(v: &Version) -> bool {
    v.millis > now_millis().saturating_add(MAX_CLOCK_AHEAD.as_millis() as u64)
}

/// A hybrid logical clock: physical time in milliseconds with a logical counter, moved past
/// every version this origin reads or receives ([`VersionClock::observe`]). A write through
/// any origin therefore gets a version later than every version it read first, so a push
/// that follows another one's `201` (and reads its record) wins, whatever the origins' clocks
/// say; where no record links them, the later wall clock wins as before.
#[derive(Debug)]
pub struct VersionClock {
    node: String,
    state: std::sync::Mutex<ClockState>,
}

#[derive(Debug, Default)]
struct ClockState {
    /// The latest (millis, logical) handed out or observed.
    last: (u64, u32),
    /// The latest version seen but not followed because it was too far ahead: a write from
    /// here would get an older version and lose to it, so writes wait until the wall clock
    /// has come within [`MAX_CLOCK_AHEAD`] of it ([`VersionClock::unfollowed_ahead`]).
    unfollowed: Option<(u64, u32)>,
}

impl VersionClock {
    pub fn new(node: impl Into<String>) -> VersionClock {
        VersionClock { node: node.into(), state: std::sync::Mutex::new(ClockState::default()) }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ClockState> {
        // Plain integers: a panic while holding the lock cannot leave them torn.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A version later than every one this clock handed out or observed before.
    pub fn next(&self) -> Version {
        let now = now_millis();
        let mut state = self.state();
        let last = state.last;
        state.last = if now > last.0 {
            (now, 0)
        } else if last.1 < u32::MAX {
            (last.0, last.1 + 1)
        } else {
            (last.0 + 1, 0)
        };
        Version { millis: state.last.0, logical: state.last.1, node: self.node.clone() }
    }

    /// Move past `v`, the version of a record read, unless it is too far ahead: then `false`,
    /// and it is remembered for [`VersionClock::unfollowed_ahead`].
    pub fn observe(&self, v: &Version) -> bool {
        self.observe_version(v, true)
    }

    /// Move past `v`, another origin's clock reading, unless it is too far ahead (then
    /// `false`). Not remembered: a clock far ahead is that origin's problem, which the skew
    /// rule judges (`clock_sync`), while a record far ahead is one a write here would lose to.
    pub fn observe_reading(&self, v: &Version) -> bool {
        self.observe_version(v, false)
    }

    fn observe_version(&self, v: &Version, remember: bool) -> bool {
        let seen = (v.millis, v.logical);
        let mut state = self.state();
        if too_far_ahead(v) {
            if remember {
                state.unfollowed = state.unfollowed.max(Some(seen));
            }
            return false;
        }
        state.last = state.last.max(seen);
        true
    }

    /// How far (ms) the newest version this clock saw but could not follow is ahead of the
    /// wall clock, while it is still too far ahead to follow: a version written now would be
    /// older than one already read, and the write would lose to it after its `201`. Once the
    /// wall clock has come within [`MAX_CLOCK_AHEAD`], the version is followed and this is
    /// `None` again.
    pub fn unfollowed_ahead(&self) -> Option<u64> {
        let now = now_millis();
        let mut state = self.state();
        let seen = state.unfollowed?;
        if seen.0 > now.saturating_add(MAX_CLOCK_AHEAD.as_millis() as u64) {
            return Some(seen.0 - now);
        }
        state.last = state.last.max(seen);
        state.unfollowed = None;
        None
    }

    /// The clock's reading without advancing it: the later of the wall clock and the last
    /// version handed out or observed.
    pub fn reading(&self) -> Version {
        let last = self.state().last;
        let (millis, logical) = last.max((now_millis(), 0));
        Version { millis, logical, node: self.node.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(millis: u64, node: &str) -> Version {
        Version::new(millis, node)
    }

    fn tag(version: Version, target: Option<&str>) -> Record {
        Record::new(
            RecordKey::Tag("latest".into()),
            version,
            target.map(|d| RecordValue::Tag { digest: format!("sha256:{}", d.repeat(64)).parse().unwrap() }),
        )
    }

    #[test]
    fn later_timestamp_wins_then_greater_node() {
        let a = tag(v(10, "a"), Some("a"));
        let b = tag(v(11, "a"), Some("b"));
        let c = tag(v(11, "b"), None);
        assert!(b.supersedes(Some(&a)));
        assert!(!a.supersedes(Some(&b)));
        assert!(c.supersedes(Some(&b)), "same millisecond: greater node id wins");
        assert!(!b.supersedes(Some(&b)), "the same write twice changes nothing");
        assert_eq!(newest([&a, &c, &b]), Some(&c));
    }

    #[test]
    fn conditional_records_apply_only_over_the_expected_version() {
        let marked = tag(v(10, "a"), Some("a"));
        let refreshed = tag(v(12, "b"), Some("a"));
        let tombstone = Record { expect: Some(v(10, "a")), ..tag(v(20, "a"), None) };
        assert!(tombstone.applies_over(Some(&marked)), "the link is still as marked");
        assert!(!tombstone.applies_over(Some(&refreshed)), "refreshed since the mark: kept");
        assert!(!tombstone.applies_over(None), "nothing stored: nothing to remove");
        let stale = Record { expect: Some(v(10, "a")), ..tag(v(5, "a"), None) };
        assert!(!stale.applies_over(Some(&marked)), "a condition never makes an older record win");
        assert!(tombstone.stored().expect.is_none());
        let plain = tag(v(11, "a"), None);
        assert!(plain.applies_over(Some(&marked)) && plain.applies_over(None));
    }

    #[test]
    fn just_after_outranks_only_the_version_itself() {
        let marked = Version { millis: 10, logical: 3, node: "o2:5000".into() };
        let tombstone = marked.just_after();
        assert!(tombstone > marked);
        // Nothing sorts between them: no version a writer can produce.
        for node in ["o2:5000", "o1:5000", "o3:5000", "o2:50000", ""] {
            for (millis, logical) in [(10, 3), (10, 2), (9, 99)] {
                let v = Version { millis, logical, node: node.into() };
                assert!(v <= marked || v >= tombstone, "{v:?}");
            }
        }
        // Any later reading wins over it, whichever node wrote it.
        assert!(Version { millis: 10, logical: 4, node: "a".into() } > tombstone);
        assert!(Version::new(11, "") > tombstone);
        // Above all, a write that read the marked version first (a manifest put refreshing
        // its layer's link), from a clock behind the marked one or on the same millisecond.
        for node in ["a", "o2:5000", "zzz"] {
            let clock = VersionClock::new(node);
            assert!(clock.observe(&marked));
            assert!(clock.next() > tombstone, "{node}");
        }
        let now = Version::new(now_millis(), "o1:5000");
        let clock = VersionClock::new("o0:5000");
        assert!(clock.observe(&now));
        assert!(clock.next() > now.just_after());
    }

    #[test]
    fn clock_is_strictly_increasing() {
        let clock = VersionClock::new("n");
        let mut prev = clock.next();
        for _ in 0..10_000 {
            let next = clock.next();
            assert!(next > prev);
            prev = next;
        }
    }

    #[test]
    fn observing_moves_the_clock_past_what_was_seen_but_not_far_into_the_future() {
        let clock = VersionClock::new("b");
        let ahead = Version { millis: now_millis() + 5_000, logical: 7, node: "a".into() };
        assert!(clock.observe(&ahead));
        let next = clock.next();
        assert!(next > ahead, "a write after reading a version from a clock ahead wins: {next:?}");
        assert_eq!((next.millis, next.logical), (ahead.millis, 8));
        let far = Version::new(now_millis() + 10 * 60_000, "c");
        assert!(too_far_ahead(&far));
        assert!(!clock.observe(&far), "ten minutes ahead is refused");
        assert!(clock.next() < far, "and does not drag the clock along");
        assert!(clock.reading() >= next);
    }

    #[test]
    fn a_version_too_far_ahead_to_follow_is_remembered_until_the_clock_catches_up() {
        let clock = VersionClock::new("b");
        assert_eq!(clock.unfollowed_ahead(), None);
        let far = Version::new(now_millis() + 10 * 60_000, "c");
        let farther = Version::new(now_millis() + 11 * 60_000, "c");
        assert!(!clock.observe(&farther) && !clock.observe(&far));
        let ahead = clock.unfollowed_ahead().expect("a write now would lose to what was read");
        assert!((10 * 60_000..=11 * 60_000).contains(&ahead), "the newest one counts: {ahead}");
        assert!(clock.unfollowed_ahead().is_some(), "and stays until the clocks agree");
        let readings = VersionClock::new("b");
        assert!(!readings.observe_reading(&far), "a member's clock reading is not followed either");
        assert_eq!(readings.unfollowed_ahead(), None, "but a member's clock is judged by its skew");
        // Seen when it was far ahead, now within the bound (the wall clock caught up, here
        // simulated by a version that was only just too far): followed, and writes go on.
        let clock = VersionClock::new("b");
        let edge = Version::new(now_millis() + MAX_CLOCK_AHEAD.as_millis() as u64 + 50, "c");
        assert!(!clock.observe(&edge));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(clock.unfollowed_ahead(), None);
        assert!(clock.next() > edge, "the version once refused is followed now");
    }

    #[test]
    fn versions_without_a_logical_counter_still_parse_and_order() {
        let old: Version = serde_json::from_str(r#"{"millis":5,"node":"a"}"#).unwrap();
        assert_eq!(old, Version::new(5, "a"));
        assert_eq!(serde_json::to_string(&old).unwrap(), r#"{"millis":5,"node":"a"}"#);
        let later = Version { logical: 1, ..old.clone() };
        assert!(later > old && Version::new(6, "a") > later);
    }

    #[test]
    fn records_round_trip_as_json() {
        let r = tag(v(1, "x"), Some("c"));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Record>(&json).unwrap(), r);
        let t = tag(v(1, "x"), None);
        assert_eq!(serde_json::from_str::<Record>(&serde_json::to_string(&t).unwrap()).unwrap(), t);
    }
}
