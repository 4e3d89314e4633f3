//! The agent's disk policy, as pure functions: what the cache watermarks mean, how many bytes
//! to free, and which files go first. [`crate::cache`] does the I/O (directory scans, statvfs,
//! unlinks) around these decisions.
//!
//! The rules:
//! - The cache holds complete blobs (`cache/`) and partial downloads (`partial/`); both count.
//!   A running download counts at its blob's full size from its start (the space it is about
//!   to take); an idle partial (its download failed or the agent restarted) at the bytes it
//!   occupies on disk.
//! - A watermark is a byte count of what the cache holds (`20GiB`), or a share of the whole
//!   filesystem in use, by anyone (`90%`; Dragonfly's `diskGCThresholdPercent` model: the
//!   node's disk is shared with the images containerd unpacks, and what matters is that it
//!   does not fill). Both watermarks are of one kind.
//! - Over the high watermark, files are removed until the low one is reached: idle partials
//!   first (oldest first), then complete blobs, least recently used first. A blob being read
//!   or seeded (pinned) and a running download are never removed.
//! - An idle partial older than `partial_max_age` is removed whatever the watermarks say: the
//!   pull that left it is long over.
//! - A write that finds the disk full removes, in the same order, at least what the download
//!   still has to write, and tries again.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use shoal_registry::Digest;

/// How long an idle partial download is kept for a retried pull to resume, by default.
pub const DEFAULT_PARTIAL_MAX_AGE: Duration = Duration::from_secs(3600);

/// A cache watermark.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Watermark {
    /// Bytes held by the cache (complete blobs and partial downloads).
    Bytes(u64),
    /// Share of the filesystem in use, by anyone, as `df` shows it (0.0 to 1.0).
    Share(f64),
}

/// Why a watermark or a pair of them is refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LimitsError {
    #[error("watermark {0:?} is neither a size (\"20GiB\") nor a share of the filesystem (\"90%\")")]
    Syntax(String),
    #[error("watermark {0:?}: a share of the filesystem must be above 0% and at most 100%")]
    Share(String),
    #[error("the high and low watermarks must both be sizes or both be shares of the filesystem")]
    Mixed,
}

impl FromStr for Watermark {
    type Err = LimitsError;

    /// `"90%"` or `"87.5%"`: a share of the filesystem; `"20GiB"`, `"500 MB"`, `"1048576"`: bytes.
    fn from_str(s: &str) -> Result<Watermark, LimitsError> {
        let t = s.trim();
        if let Some(percent) = t.strip_suffix('%') {
            let p: f64 = percent.trim().parse().map_err(|_| LimitsError::Syntax(s.to_string()))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(LimitsError::Share(s.to_string()));
            }
            return Ok(Watermark::Share(p / 100.0));
        }
        t.parse::<bytesize::ByteSize>()
            .map(|b| Watermark::Bytes(b.as_u64()))
            .map_err(|_| LimitsError::Syntax(s.to_string()))
    }
}

impl fmt::Display for Watermark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Watermark::Bytes(b) => write!(f, "{}", bytesize::ByteSize::b(*b)),
            Watermark::Share(s) => write!(f, "{}%", s * 100.0),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Watermark {
    /// A string as in [`FromStr`], or a plain number of bytes.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Watermark, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(Watermark::Bytes(b)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Size bounds of the cache (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheLimits {
    /// Eviction starts above this...
    pub high: Watermark,
    /// ...and stops at or below this.
    pub low: Watermark,
    /// An idle partial download older than this is removed.
    pub partial_max_age: Duration,
}

impl CacheLimits {
    /// Both watermarks of one kind; a low watermark above the high one is lowered to it.
    pub fn new(
        high: Watermark,
        low: Watermark,
        partial_max_age: Duration,
    ) -> Result<CacheLimits, LimitsError> {
        let low = match (high, low) {
            (Watermark::Bytes(h), Watermark::Bytes(l)) => Watermark::Bytes(l.min(h)),
            (Watermark::Share(h), Watermark::Share(l)) => Watermark::Share(l.min(h)),
            _ => return Err(LimitsError::Mixed),
        };
        Ok(CacheLimits { high, low, partial_max_age })
    }

    /// Byte watermarks, with the default partial age.
    pub fn bytes(high: u64, low: u64) -> CacheLimits {
        CacheLimits {
            high: Watermark::Bytes(high),
            low: Watermark::Bytes(low.min(high)),
            partial_max_age: DEFAULT_PARTIAL_MAX_AGE,
        }
    }
}

/// A filesystem's size and use, in bytes (from statvfs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsUsage {
    pub total: u64,
    /// In use by anyone: total minus what an unprivileged user may still take, as `df` shows.
    pub used: u64,
}

/// The usage of the filesystem holding `path`. Blocking (one statvfs).
pub fn fs_usage(path: &std::path::Path) -> std::io::Result<FsUsage> {
    let st = rustix::fs::statvfs(path)?;
    let total = st.f_blocks.saturating_mul(st.f_frsize);
    let available = st.f_bavail.saturating_mul(st.f_frsize);
    Ok(FsUsage { total, used: total.saturating_sub(available) })
}

/// How many bytes to free now (0 when under the high watermark).
/// `held`: what the cache holds (see the module docs); `fs`: the filesystem's use, if known;
/// `incoming`: bytes about to be written that the filesystem does not show yet (a download
/// starting; `held` already counts it).
pub fn bytes_to_free(limits: &CacheLimits, held: u64, fs: Option<FsUsage>, incoming: u64) -> u64 {
    match (limits.high, limits.low) {
        (Watermark::Bytes(high), Watermark::Bytes(low)) if held > high => held - low,
        (Watermark::Share(high), Watermark::Share(low)) => {
            let Some(fs) = fs else { return 0 };
            let total = fs.total as f64;
            let used = fs.used.saturating_add(incoming) as f64;
            if used > high * total {
                (used - low * total).ceil() as u64
            } else {
                0
            }
        }
        _ => 0,
    }
}

/// A complete blob in the cache, as eviction sees it.
#[derive(Clone, Debug)]
pub struct BlobUse {
    pub digest: Digest,
    pub size: u64,
    /// Larger is more recent.
    pub last_used: u64,
    /// Being read or seeded: never evicted.
    pub pinned: bool,
}

/// A partial download, as eviction sees it.
#[derive(Clone, Debug)]
pub struct PartialUse {
    pub digest: Digest,
    /// Counted bytes (see the module docs).
    pub bytes: u64,
    /// `None` while its download runs (never removed); else since when it is idle.
    pub idle_since: Option<SystemTime>,
}

/// A file (with what belongs to it) to remove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Victim {
    Partial(Digest),
    Blob(Digest),
}

/// What to remove to free `need` bytes, in order (see the module docs), plus every idle partial
/// older than `max_age` whatever `need` is. May fall short of `need` when too much is in use.
pub fn plan_eviction(
    need: u64,
    blobs: &[BlobUse],
    partials: &[PartialUse],
    now: SystemTime,
    max_age: Duration,
) -> Vec<Victim> {
    let age = |since: SystemTime| now.duration_since(since).unwrap_or(Duration::ZERO);
    let mut idle: Vec<(SystemTime, &PartialUse)> =
        partials.iter().filter_map(|p| p.idle_since.map(|since| (since, p))).collect();
    idle.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.digest.cmp(&b.1.digest)));
    let mut lru: Vec<&BlobUse> = blobs.iter().filter(|b| !b.pinned).collect();
    lru.sort_by(|a, b| a.last_used.cmp(&b.last_used).then_with(|| a.digest.cmp(&b.digest)));

    let mut freed = 0u64;
    let mut victims = Vec::new();
    for (since, p) in &idle {
        if age(*since) > max_age || freed < need {
            freed = freed.saturating_add(p.bytes);
            victims.push(Victim::Partial(p.digest.clone()));
        }
    }
    for b in lru {
        if freed >= need {
            break;
        }
        freed = freed.saturating_add(b.size);
        victims.push(Victim::Blob(b.digest.clone()));
    }
    victims
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn d(i: u32) -> Digest {
        Digest::of(shoal_registry::Algorithm::Sha256, &i.to_be_bytes())
    }

    #[test]
    fn watermarks_parse_as_bytes_or_a_share_of_the_filesystem() {
        assert_eq!("90%".parse(), Ok(Watermark::Share(0.9)));
        assert_eq!(" 87.5 % ".parse(), Ok(Watermark::Share(0.875)));
        assert_eq!("100%".parse(), Ok(Watermark::Share(1.0)));
        assert_eq!("20GiB".parse(), Ok(Watermark::Bytes(20 * GIB)));
        assert_eq!("512 MB".parse(), Ok(Watermark::Bytes(512_000_000)));
        assert_eq!("1048576".parse(), Ok(Watermark::Bytes(1 << 20)));
        for bad in ["0%", "101%", "-5%", "nan%"] {
            assert!(
                matches!(bad.parse::<Watermark>(), Err(LimitsError::Share(_) | LimitsError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!("lots".parse::<Watermark>(), Err(LimitsError::Syntax(_))));
        assert!(matches!("ten%".parse::<Watermark>(), Err(LimitsError::Syntax(_))));
        assert_eq!(Watermark::Share(0.9).to_string(), "90%");
        assert_eq!(Watermark::Bytes(20 * GIB).to_string(), "20.0 GiB");
    }

    #[test]
    fn watermarks_deserialize_from_toml_strings_and_numbers() {
        #[derive(serde::Deserialize)]
        struct C {
            a: Watermark,
            b: Watermark,
            c: Watermark,
        }
        let c: C = toml::from_str("a = \"80%\"\nb = \"16GiB\"\nc = 4096\n").unwrap();
        assert_eq!(
            (c.a, c.b, c.c),
            (Watermark::Share(0.8), Watermark::Bytes(16 * GIB), Watermark::Bytes(4096))
        );
        let err = toml::from_str::<C>("a = \"200%\"\nb = \"1\"\nc = 1\n").err().unwrap().to_string();
        assert!(err.contains("at most 100%"), "{err}");
    }

    #[test]
    fn limits_are_of_one_kind_and_low_is_at_most_high() {
        let age = DEFAULT_PARTIAL_MAX_AGE;
        let l = CacheLimits::new(Watermark::Share(0.8), Watermark::Share(0.9), age).unwrap();
        assert_eq!(l.low, Watermark::Share(0.8));
        let l = CacheLimits::new(Watermark::Bytes(10), Watermark::Bytes(20), age).unwrap();
        assert_eq!(l.low, Watermark::Bytes(10));
        assert_eq!(
            CacheLimits::new(Watermark::Share(0.9), Watermark::Bytes(10), age),
            Err(LimitsError::Mixed)
        );
    }

    #[test]
    fn bytes_to_free_follows_the_kind_of_watermark() {
        let bytes = CacheLimits::bytes(100, 60);
        assert_eq!(bytes_to_free(&bytes, 100, None, 0), 0, "at the high watermark is fine");
        assert_eq!(bytes_to_free(&bytes, 101, None, 0), 41, "above it: down to the low one");
        // Byte watermarks look at what the cache holds, not at the filesystem.
        let full = Some(FsUsage { total: 1000, used: 1000 });
        assert_eq!(bytes_to_free(&bytes, 50, full, 500), 0);

        let share =
            CacheLimits::new(Watermark::Share(0.9), Watermark::Share(0.8), DEFAULT_PARTIAL_MAX_AGE).unwrap();
        let fs = |used| Some(FsUsage { total: 1000, used });
        assert_eq!(bytes_to_free(&share, 0, fs(900), 0), 0);
        assert_eq!(bytes_to_free(&share, 0, fs(950), 0), 150, "down to 80% of the filesystem");
        assert_eq!(bytes_to_free(&share, 0, fs(850), 100), 150, "a download about to write counts");
        assert_eq!(bytes_to_free(&share, 10_000, fs(100), 0), 0, "the cache's own size does not matter");
        assert_eq!(bytes_to_free(&share, 0, None, 0), 0, "unknown usage: nothing to go on");
    }

    #[test]
    fn eviction_takes_idle_partials_then_least_recently_used_blobs_never_pinned_or_running() {
        let now = SystemTime::now();
        let ago = |s| now - Duration::from_secs(s);
        let blobs = [
            BlobUse { digest: d(1), size: 100, last_used: 5, pinned: false },
            BlobUse { digest: d(2), size: 100, last_used: 1, pinned: true },
            BlobUse { digest: d(3), size: 100, last_used: 3, pinned: false },
        ];
        let partials = [
            PartialUse { digest: d(10), bytes: 30, idle_since: Some(ago(60)) },
            PartialUse { digest: d(11), bytes: 500, idle_since: None },
            PartialUse { digest: d(12), bytes: 20, idle_since: Some(ago(120)) },
        ];
        let max_age = Duration::from_secs(3600);
        assert_eq!(plan_eviction(0, &blobs, &partials, now, max_age), []);
        assert_eq!(
            plan_eviction(10, &blobs, &partials, now, max_age),
            [Victim::Partial(d(12))],
            "oldest idle first"
        );
        assert_eq!(
            plan_eviction(60, &blobs, &partials, now, max_age),
            [Victim::Partial(d(12)), Victim::Partial(d(10)), Victim::Blob(d(3))],
            "then the least recently used unpinned blob"
        );
        assert_eq!(
            plan_eviction(10_000, &blobs, &partials, now, max_age),
            [Victim::Partial(d(12)), Victim::Partial(d(10)), Victim::Blob(d(3)), Victim::Blob(d(1))],
            "never the pinned blob or the running download, even when short"
        );
    }

    #[test]
    fn stale_idle_partials_go_whatever_the_need() {
        let now = SystemTime::now();
        let partials = [
            PartialUse { digest: d(1), bytes: 10, idle_since: Some(now - Duration::from_secs(7200)) },
            PartialUse { digest: d(2), bytes: 10, idle_since: Some(now - Duration::from_secs(60)) },
            PartialUse { digest: d(3), bytes: 10, idle_since: None },
        ];
        let blobs = [BlobUse { digest: d(4), size: 1, last_used: 0, pinned: false }];
        let max_age = Duration::from_secs(3600);
        assert_eq!(plan_eviction(0, &blobs, &partials, now, max_age), [Victim::Partial(d(1))]);
        // A clock that went backwards makes nothing stale.
        let future =
            [PartialUse { digest: d(5), bytes: 1, idle_since: Some(now + Duration::from_secs(9999)) }];
        assert_eq!(plan_eviction(0, &[], &future, now, max_age), []);
    }
}
