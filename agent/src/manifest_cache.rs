//! The manifests an agent keeps in memory, so a pull's repeated asks (a tag, then its
//! digest, then an index's platform manifest) need no round trip to the origin.
//!
//! A manifest may be up to 4 MiB and any client of port 5000 chooses which ones are asked
//! for, so what is kept is bounded in bytes, not in entries: 10,000 entries of up to 4 MiB,
//! once for each tag and again by digest, was up to 80 GiB. A tag keeps only its digest for
//! `tag_ttl` (tags move), so its manifest's bytes are held once, by digest. Past the budget
//! everything is dropped at once: entries are cheap to fetch again, and a cache that a client
//! fills with junk then costs refetches, never memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use shoal_registry::store::StoredManifest;
use shoal_registry::{Digest, RepoName, Tag};

/// Default bytes of manifests kept (with [`ENTRY_OVERHEAD`] each): thousands of typical
/// manifests (a few KiB each), sixteen of the largest allowed.
pub const DEFAULT_MANIFEST_CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Bytes charged per entry besides the manifest's own (keys, map slots), so many tiny
/// manifests count too.
const ENTRY_OVERHEAD: usize = 512;
/// Tags remembered at once (each a name and a digest); past it, all are forgotten.
const MAX_TAGS: usize = 10_000;

/// Manifests by repository and digest within a byte budget, and each tag's digest for a while.
pub struct ManifestCache {
    budget: usize,
    tag_ttl: Duration,
    confirm_ttl: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Manifests by digest, with when the origin last confirmed each.
    by_digest: HashMap<(RepoName, Digest), (StoredManifest, Instant)>,
    /// What `by_digest` holds, charged as in [`charge`].
    bytes: usize,
    tags: HashMap<(RepoName, Tag), TagAnswer>,
}

/// What the origins last answered for a tag.
struct TagAnswer {
    /// When the answer arrived (its freshness runs from there).
    at: Instant,
    digest: Digest,
    /// When it was asked (an answer to an earlier question does not replace one to a later
    /// question).
    asked: Instant,
    /// Until when (Unix seconds) it may be served while the origins cannot be asked
    /// ([`StoredManifest::serve_stale_until`]); `None`: without limit.
    serve_stale_until: Option<u64>,
}

fn charge(m: &StoredManifest) -> usize {
    m.bytes.len() + ENTRY_OVERHEAD
}

impl ManifestCache {
    /// A cache of at most `budget` bytes whose tags are trusted for `tag_ttl`, and manifests by
    /// digest for `confirm_ttl` (then asked again: one deleted at the origin goes).
    pub fn new(tag_ttl: Duration, confirm_ttl: Duration, budget: usize) -> ManifestCache {
        ManifestCache { budget, tag_ttl, confirm_ttl, inner: Mutex::new(Inner::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The manifest `digest` of `repo`, if kept, and whether the origin confirmed it less
    /// than `confirm_ttl` before `now`.
    pub fn by_digest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        now: Instant,
    ) -> Option<(StoredManifest, bool)> {
        let inner = self.lock();
        let (m, at) = inner.by_digest.get(&(repo.clone(), digest.clone()))?;
        Some((m.clone(), now.saturating_duration_since(*at) < self.confirm_ttl))
    }

    /// Forget the manifest `digest` of `repo` (the origin no longer has it).
    pub fn remove(&self, repo: &RepoName, digest: &Digest) {
        let mut inner = self.lock();
        if let Some((old, _)) = inner.by_digest.remove(&(repo.clone(), digest.clone())) {
            inner.bytes -= charge(&old);
        }
    }

    /// The manifest `tag` of `repo` pointed to less than `tag_ttl` before `now`, if kept.
    pub fn by_tag(&self, repo: &RepoName, tag: &Tag, now: Instant) -> Option<StoredManifest> {
        let inner = self.lock();
        let answer = inner.tags.get(&(repo.clone(), tag.clone()))?;
        if now.saturating_duration_since(answer.at) >= self.tag_ttl {
            return None;
        }
        inner.by_digest.get(&(repo.clone(), answer.digest.clone())).map(|(m, _)| m.clone())
    }

    /// Forget where `tag` of `repo` pointed (the origins say it is gone).
    pub fn forget_tag(&self, repo: &RepoName, tag: &Tag) {
        self.lock().tags.remove(&(repo.clone(), tag.clone()));
    }

    /// The manifest `tag` of `repo` last pointed to, however long ago, if kept and the
    /// origins said it may be served at `now_unix` (seconds; an upstream's tag: until
    /// `serve_stale` past its last confirmation): for when the origins cannot be asked.
    pub fn by_tag_kept(&self, repo: &RepoName, tag: &Tag, now_unix: u64) -> Option<StoredManifest> {
        let inner = self.lock();
        let answer = inner.tags.get(&(repo.clone(), tag.clone()))?;
        if answer.serve_stale_until.is_some_and(|until| now_unix >= until) {
            return None;
        }
        inner.by_digest.get(&(repo.clone(), answer.digest.clone())).map(|(m, _)| m.clone())
    }

    /// Keep `manifest` of `repo`, fetched at `now` by `tag` if given (else by its digest). One
    /// bigger than the whole budget is not kept.
    pub fn insert(&self, repo: &RepoName, tag: Option<&Tag>, manifest: &StoredManifest, now: Instant) {
        self.insert_answer(repo, tag, manifest, now, now);
    }

    /// [`insert`](Self::insert) of an answer asked for at `asked` that arrived at `now`.
    pub fn insert_answer(
        &self,
        repo: &RepoName,
        tag: Option<&Tag>,
        manifest: &StoredManifest,
        asked: Instant,
        now: Instant,
    ) {
        let cost = charge(manifest);
        if cost > self.budget {
            return;
        }
        let mut inner = self.lock();
        let key = (repo.clone(), manifest.digest.clone());
        if let Some((old, _)) = inner.by_digest.remove(&key) {
            inner.bytes -= charge(&old);
        }
        if inner.bytes + cost > self.budget {
            inner.by_digest.clear();
            inner.tags.clear();
            inner.bytes = 0;
        }
        // By digest without the tag's limit: a digest's content never changes.
        let kept = StoredManifest { serve_stale_until: None, ..manifest.clone() };
        inner.by_digest.insert(key, (kept, now));
        inner.bytes += cost;
        if let Some(tag) = tag {
            if inner.tags.len() >= MAX_TAGS {
                inner.tags.clear();
            }
            // An answer to an earlier question that arrives after a later one's keeps out.
            let key = (repo.clone(), tag.clone());
            if inner.tags.get(&key).is_none_or(|was| was.asked <= asked) {
                let answer = TagAnswer {
                    at: now,
                    digest: manifest.digest.clone(),
                    asked,
                    serve_stale_until: manifest.serve_stale_until,
                };
                inner.tags.insert(key, answer);
            }
        }
    }

    /// Bytes kept now, as charged against the budget.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use shoal_registry::Algorithm;

    fn manifest(seed: u32, len: usize) -> StoredManifest {
        let mut bytes = vec![0u8; len];
        bytes[..4].copy_from_slice(&seed.to_le_bytes());
        StoredManifest {
            digest: Digest::of(Algorithm::Sha256, &bytes),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes: Bytes::from(bytes),
            serve_stale_until: None,
        }
    }

    fn repo() -> RepoName {
        "team/app".parse().unwrap()
    }

    fn tag(i: usize) -> Tag {
        format!("t{i}").parse().unwrap()
    }

    #[test]
    fn many_tags_of_one_manifest_hold_its_bytes_once() {
        let cache =
            ManifestCache::new(Duration::from_secs(5), Duration::from_secs(60), DEFAULT_MANIFEST_CACHE_BYTES);
        let now = Instant::now();
        for i in 0..300 {
            // Each fetch by tag brings its own copy of the same bytes.
            cache.insert(&repo(), Some(&tag(i)), &manifest(1, 1 << 20), now);
        }
        assert_eq!(cache.bytes(), (1 << 20) + ENTRY_OVERHEAD);
        let m = manifest(1, 1 << 20);
        assert_eq!(cache.by_tag(&repo(), &tag(7), now).map(|k| k.digest), Some(m.digest.clone()));
        assert_eq!(cache.by_digest(&repo(), &m.digest, now).map(|(k, _)| k.bytes.len()), Some(1 << 20));
    }

    /// A tag's answer to an earlier question that arrives after the answer to a later one
    /// (the tag moved in between) does not replace it.
    #[test]
    fn a_slow_older_answer_does_not_replace_a_newer_one() {
        let cache =
            ManifestCache::new(Duration::from_secs(5), Duration::from_secs(60), DEFAULT_MANIFEST_CACHE_BYTES);
        let t0 = Instant::now();
        let (old, new) = (manifest(1, 100), manifest(2, 100));
        let s = Duration::from_secs;
        cache.insert_answer(&repo(), Some(&tag(0)), &new, t0 + s(2), t0 + s(3));
        cache.insert_answer(&repo(), Some(&tag(0)), &old, t0, t0 + s(6));
        assert_eq!(cache.by_tag(&repo(), &tag(0), t0 + s(7)).map(|m| m.digest), Some(new.digest.clone()));
        // Freshness runs from the answer: one that took 6 s is still kept for tag_ttl (5 s).
        cache.insert_answer(&repo(), Some(&tag(1)), &new, t0, t0 + s(6));
        assert_eq!(cache.by_tag(&repo(), &tag(1), t0 + s(9)).map(|m| m.digest), Some(new.digest));
    }

    /// A kept upstream tag is served through an outage of the origins until the time its
    /// answer named (`serve_stale` past the upstream's last confirmation), a pushed one (no
    /// limit) for as long as it is kept; a later answer's limit replaces the earlier one's.
    #[test]
    fn a_kept_tag_is_served_only_until_the_origins_said() {
        let cache =
            ManifestCache::new(Duration::from_secs(5), Duration::from_secs(60), DEFAULT_MANIFEST_CACHE_BYTES);
        let now = Instant::now();
        let limited = StoredManifest { serve_stale_until: Some(1_000), ..manifest(1, 100) };
        cache.insert(&repo(), Some(&tag(0)), &limited, now);
        cache.insert(&repo(), Some(&tag(1)), &manifest(2, 100), now);
        assert!(cache.by_tag_kept(&repo(), &tag(0), 999).is_some());
        assert!(cache.by_tag_kept(&repo(), &tag(0), 1_000).is_none(), "past the limit");
        assert!(cache.by_tag_kept(&repo(), &tag(1), u64::MAX).is_some(), "no limit");
        // By digest the content is served whatever the tag's limit.
        let (m, _) = cache.by_digest(&repo(), &limited.digest, now).unwrap();
        assert_eq!(m.serve_stale_until, None);
        let renewed = StoredManifest { serve_stale_until: Some(5_000), ..limited };
        cache.insert(&repo(), Some(&tag(0)), &renewed, now);
        assert!(cache.by_tag_kept(&repo(), &tag(0), 4_999).is_some(), "a later answer's limit");
    }

    #[test]
    fn what_is_kept_stays_within_the_budget() {
        let budget = 16 << 20;
        let cache = ManifestCache::new(Duration::from_secs(5), Duration::from_secs(60), budget);
        let now = Instant::now();
        for i in 0..300 {
            cache.insert(&repo(), Some(&tag(i)), &manifest(i as u32, 1 << 20), now);
            assert!(cache.bytes() <= budget, "{} bytes kept after {i}", cache.bytes());
        }
        let last = manifest(299, 1 << 20);
        assert!(cache.by_digest(&repo(), &last.digest, now).is_some(), "the newest is kept");
        // One bigger than the budget is served but not kept.
        cache.insert(&repo(), None, &manifest(9, budget), now);
        assert!(cache.by_digest(&repo(), &manifest(9, budget).digest, now).is_none());
        assert!(cache.by_digest(&repo(), &last.digest, now).is_some(), "and pushes nothing out");
    }

    #[test]
    fn a_tag_is_trusted_for_its_ttl_and_per_repository() {
        let cache =
            ManifestCache::new(Duration::from_secs(5), Duration::from_secs(60), DEFAULT_MANIFEST_CACHE_BYTES);
        let now = Instant::now();
        let m = manifest(3, 100);
        cache.insert(&repo(), Some(&tag(1)), &m, now);
        assert!(cache.by_tag(&repo(), &tag(1), now + Duration::from_secs(4)).is_some());
        assert!(
            cache.by_tag(&repo(), &tag(1), now + Duration::from_secs(5)).is_none(),
            "the tag may have moved"
        );
        assert!(cache.by_digest(&repo(), &m.digest, now).is_some(), "the digest does not move");
        let other: RepoName = "team/other".parse().unwrap();
        assert!(cache.by_tag(&other, &tag(1), now).is_none());
        assert!(cache.by_digest(&other, &m.digest, now).is_none(), "only where the origin said it is");
    }

    #[test]
    fn a_manifest_by_digest_is_trusted_for_the_confirm_ttl_then_asked_again() {
        let cache =
            ManifestCache::new(Duration::from_secs(5), Duration::from_secs(60), DEFAULT_MANIFEST_CACHE_BYTES);
        let (m, now) = (manifest(1, 100), Instant::now());
        cache.insert(&repo(), None, &m, now);
        assert!(matches!(
            cache.by_digest(&repo(), &m.digest, now + Duration::from_secs(59)),
            Some((_, true))
        ));
        let later = now + Duration::from_secs(61);
        assert!(
            matches!(cache.by_digest(&repo(), &m.digest, later), Some((_, false))),
            "kept, but to be confirmed"
        );
        cache.insert(&repo(), None, &m, later);
        assert!(matches!(cache.by_digest(&repo(), &m.digest, later), Some((_, true))), "confirmed again");
        cache.remove(&repo(), &m.digest);
        assert!(cache.by_digest(&repo(), &m.digest, later).is_none(), "deleted at the origin");
        assert_eq!(cache.bytes(), 0);
    }
}
