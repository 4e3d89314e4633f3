//! The agent's blob cache: complete, verified blobs on disk, bounded by size with high and low
//! watermarks and least-recently-used eviction. A pinned blob (being read or seeded) is never
//! evicted. Losing the cache loses nothing: blobs come back from the swarm.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use shoal_registry::Digest;

/// Size bounds of the cache.
#[derive(Clone, Copy, Debug)]
pub struct CacheLimits {
    /// Eviction starts when the cache holds more than this many bytes.
    pub high_watermark: u64,
    /// Eviction stops once the cache is at or below this many bytes.
    pub low_watermark: u64,
}

struct Entry {
    size: u64,
    last_used: u64,
    pins: u32,
}

/// Cache metrics (`shoal_agent_cache_*`).
#[derive(Clone)]
pub struct CacheMetrics {
    pub bytes: prometheus::IntGauge,
    pub evictions: prometheus::IntCounter,
}

impl CacheMetrics {
    pub fn new(registry: &prometheus::Registry) -> Result<CacheMetrics, prometheus::Error> {
        let m = CacheMetrics {
            bytes: prometheus::IntGauge::new("shoal_agent_cache_bytes", "Bytes of complete blobs cached")?,
            evictions: prometheus::IntCounter::new("shoal_agent_cache_evictions_total", "Blobs evicted")?,
        };
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.evictions.clone()))?;
        Ok(m)
    }
}

/// Complete blobs under `<root>/<alg>/<hex>`, with their metainfo beside them.
pub struct BlobCache {
    root: PathBuf,
    limits: CacheLimits,
    entries: Mutex<HashMap<Digest, Entry>>,
    clock: AtomicU64,
    metrics: CacheMetrics,
}

/// Keeps a blob from being evicted while it lives.
pub struct Pin {
    cache: Arc<BlobCache>,
    digest: Digest,
}

impl Drop for Pin {
    fn drop(&mut self) {
        if let Some(e) = self.cache.lock().get_mut(&self.digest) {
            e.pins = e.pins.saturating_sub(1);
        }
    }
}

impl BlobCache {
    /// Open the cache directory, indexing the blobs already there. Blocking.
    pub fn open(root: &Path, limits: CacheLimits, metrics: CacheMetrics) -> std::io::Result<BlobCache> {
        std::fs::create_dir_all(root)?;
        let mut entries = HashMap::new();
        for alg_dir in std::fs::read_dir(root)? {
            let alg_dir = alg_dir?;
            let alg = alg_dir.file_name().to_string_lossy().to_string();
            if !alg_dir.file_type()?.is_dir() {
                continue;
            }
            for file in std::fs::read_dir(alg_dir.path())? {
                let file = file?;
                let name = file.file_name().to_string_lossy().to_string();
                let Ok(digest) = format!("{alg}:{name}").parse::<Digest>() else { continue };
                let size = file.metadata()?.len();
                entries.insert(digest, Entry { size, last_used: 0, pins: 0 });
            }
        }
        let total: u64 = entries.values().map(|e| e.size).sum();
        metrics.bytes.set(i64::try_from(total).unwrap_or(i64::MAX));
        Ok(BlobCache {
            root: root.to_path_buf(),
            limits,
            entries: Mutex::new(entries),
            clock: AtomicU64::new(1),
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where a complete blob lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join(digest.algorithm().name()).join(digest.hex())
    }

    /// Where a cached blob's metainfo lives (JSON), for seeding after a restart.
    pub fn metainfo_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("metainfo").join(digest.algorithm().name()).join(digest.hex())
    }

    /// Size of a cached blob; counts as a use.
    pub fn get(&self, digest: &Digest) -> Option<u64> {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut entries = self.lock();
        let e = entries.get_mut(digest)?;
        e.last_used = tick;
        Some(e.size)
    }

    /// Pin a cached blob for the life of the returned guard.
    pub fn pin(self: &Arc<Self>, digest: &Digest) -> Option<Pin> {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut entries = self.lock();
        let e = entries.get_mut(digest)?;
        e.pins += 1;
        e.last_used = tick;
        Some(Pin { cache: self.clone(), digest: digest.clone() })
    }

    /// Record a blob just finished into `blob_path`, then evict if over the high watermark.
    /// Blocking (eviction removes files).
    pub fn insert(&self, digest: &Digest, size: u64) {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(digest.clone(), Entry { size, last_used: tick, pins: 0 });
        self.evict();
    }

    /// Bytes held.
    pub fn total(&self) -> u64 {
        self.lock().values().map(|e| e.size).sum()
    }

    /// Evict least-recently-used, unpinned blobs while over the high watermark, down to the
    /// low one. Blocking.
    pub fn evict(&self) {
        let mut victims = Vec::new();
        {
            let mut entries = self.lock();
            let mut total: u64 = entries.values().map(|e| e.size).sum();
            if total > self.limits.high_watermark {
                let mut order: Vec<(u64, Digest)> = entries
                    .iter()
                    .filter(|(_, e)| e.pins == 0)
                    .map(|(d, e)| (e.last_used, d.clone()))
                    .collect();
                order.sort();
                for (_, digest) in order {
                    if total <= self.limits.low_watermark {
                        break;
                    }
                    if let Some(e) = entries.remove(&digest) {
                        total -= e.size;
                        victims.push(digest);
                    }
                }
            }
            self.metrics.bytes.set(i64::try_from(total).unwrap_or(i64::MAX));
        }
        for digest in victims {
            tracing::info!(%digest, "evicting blob from cache");
            self.metrics.evictions.inc();
            let _ = std::fs::remove_file(self.blob_path(&digest));
            let _ = std::fs::remove_file(self.metainfo_path(&digest));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(i: u32) -> Digest {
        Digest::of(shoal_registry::Algorithm::Sha256, &i.to_be_bytes())
    }

    fn cache(dir: &Path, high: u64, low: u64) -> Arc<BlobCache> {
        let metrics = CacheMetrics::new(&prometheus::Registry::new()).unwrap();
        Arc::new(
            BlobCache::open(dir, CacheLimits { high_watermark: high, low_watermark: low }, metrics).unwrap(),
        )
    }

    fn put(c: &BlobCache, i: u32, size: usize) {
        let d = digest(i);
        let path = c.blob_path(&d);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, vec![0u8; size]).unwrap();
        c.insert(&d, size as u64);
    }

    #[test]
    fn evicts_lru_down_to_low_watermark_but_never_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path(), 300, 150);
        put(&c, 1, 100);
        put(&c, 2, 100);
        let pinned = c.pin(&digest(1)).unwrap();
        put(&c, 3, 100);
        assert_eq!(c.get(&digest(3)), Some(100));
        // 400 > 300: evict unpinned LRU (2, then 3 is the newest) until <= 150.
        put(&c, 4, 100);
        assert!(c.get(&digest(1)).is_some(), "pinned blob survives");
        assert!(c.get(&digest(2)).is_none());
        assert!(!c.blob_path(&digest(2)).exists());
        assert!(c.total() <= 200);
        drop(pinned);
        put(&c, 5, 200);
        assert!(c.total() <= 300);
    }

    #[test]
    fn reopens_with_existing_blobs() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = cache(dir.path(), 1000, 500);
            put(&c, 1, 10);
        }
        let c = cache(dir.path(), 1000, 500);
        assert_eq!(c.get(&digest(1)), Some(10));
    }
}
