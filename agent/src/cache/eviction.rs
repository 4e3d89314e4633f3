//! Applying the watermarks: making room for a download, reclaiming space when a write finds
//! the disk full, and the periodic sweep of idle partials. What to remove is decided by
//! [`crate::disk::plan_eviction`]; this does the removing.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use shoal_p2p::piece_store::bitfield_path;
use shoal_registry::Digest;

use super::{on_disk, remove_logged, BlobCache};
use crate::disk::{self, BlobUse, FsUsage, PartialUse, Victim};

impl BlobCache {
    /// Apply the watermarks, with `incoming` bytes about to be written (a download starting),
    /// and remove stale idle partials. Returns the bytes removed. Blocking.
    pub fn make_room(&self, incoming: u64) -> u64 {
        let fs = self.fs_usage_if_needed();
        self.evict(|held| disk::bytes_to_free(&self.limits, held, fs, incoming))
    }

    /// [`make_room`](Self::make_room) for a download of `digest` (`size` bytes) that starts
    /// now: what its partial file already occupies (a resumed download) is on the filesystem
    /// already, so only the rest is incoming. Blocking (one stat).
    pub fn make_room_for_download(&self, digest: &Digest, size: u64) -> u64 {
        let allocated = std::fs::metadata(self.partial_path(digest)).map_or(0, |m| on_disk(&m));
        self.make_room(size.saturating_sub(allocated))
    }

    /// A write found the disk full: remove at least `need` bytes (what the download still has
    /// to write), or what the watermarks ask if more. Whether anything was removed. Blocking.
    pub fn reclaim(&self, need: u64) -> bool {
        self.metrics.disk_full.inc();
        let fs = self.fs_usage_if_needed();
        let freed = self.evict(|held| need.max(disk::bytes_to_free(&self.limits, held, fs, 0)));
        if freed == 0 {
            tracing::warn!(need, "disk full and nothing left to evict");
        }
        freed > 0
    }

    /// A blob's last pin went: apply the watermarks again, on the blocking pool (a pin is
    /// dropped on the runtime), one pass at a time. Downloads that ran together move into
    /// the cache while their clients still read them, when nothing can be evicted, and the
    /// cache stayed over its high watermark until the next download or the minute's sweep.
    /// With a byte watermark the pass is skipped while the cache is under it.
    pub(super) fn unpinned(self: &Arc<Self>) {
        if let crate::disk::Watermark::Bytes(high) = self.limits.high {
            let state = self.lock();
            let held: u64 = state.entries.values().map(|e| e.size).sum::<u64>()
                + state.partials.values().map(|p| p.bytes).sum::<u64>();
            if held <= high {
                return;
            }
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        if self.room_queued.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let cache = self.clone();
        runtime.spawn_blocking(move || {
            cache.room_queued.store(false, std::sync::atomic::Ordering::Release);
            cache.make_room(0);
        });
    }

    fn fs_usage_if_needed(&self) -> Option<FsUsage> {
        match self.limits.high {
            disk::Watermark::Share(_) => (self.usage)(),
            disk::Watermark::Bytes(_) => None,
        }
    }

    /// Remove what [`disk::plan_eviction`] picks for `need(held)` bytes. Victims leave the
    /// index under the lock, their files are renamed aside after it (a new download or copy
    /// of the same blob waits for that: [`BlobCache::wait_set_aside`]) and then unlinked.
    fn evict(&self, need: impl FnOnce(u64) -> u64) -> u64 {
        let mut aside = Vec::new();
        let mut freed = 0u64;
        let mut evicted = 0u64;
        {
            let mut state = self.lock();
            // Most passes free nothing (under the watermarks, no stale partial): decided from
            // sums, without copying and sorting the whole index under the lock async tasks
            // take (a pass ran after every last pin dropped).
            let held: u64 = state.entries.values().map(|e| e.size).sum::<u64>()
                + state.partials.values().map(|p| p.bytes).sum::<u64>();
            let need = need(held);
            let now = SystemTime::now();
            let stale = |p: &super::Partial| {
                p.active == 0
                    && now.duration_since(p.idle_since).unwrap_or_default() > self.limits.partial_max_age
            };
            if need == 0 && !state.partials.values().any(stale) {
                return 0;
            }
            let blobs: Vec<BlobUse> = state
                .entries
                .iter()
                .map(|(d, e)| BlobUse {
                    digest: d.clone(),
                    size: e.size,
                    last_used: e.last_used,
                    pinned: e.pins > 0,
                })
                .collect();
            let partials: Vec<PartialUse> = state
                .partials
                .iter()
                .map(|(d, p)| PartialUse {
                    digest: d.clone(),
                    bytes: p.bytes,
                    idle_since: (p.active == 0).then_some(p.idle_since),
                })
                .collect();
            let victims = disk::plan_eviction(need, &blobs, &partials, now, self.limits.partial_max_age);
            for victim in victims {
                match victim {
                    Victim::Partial(digest) => {
                        let Some(p) = state.partials.remove(&digest) else { continue };
                        freed += p.bytes;
                        let path = self.partial_path(&digest);
                        tracing::info!(%digest, bytes = p.bytes, "removing an idle partial download");
                        state.begin_set_aside(&digest);
                        aside.push((digest, [bitfield_path(&path), path]));
                    }
                    Victim::Blob(digest) => {
                        let Some(e) = state.remove_entry(&digest) else { continue };
                        freed += e.size;
                        evicted += 1;
                        tracing::info!(%digest, size = e.size, "evicting blob from cache");
                        state.begin_set_aside(&digest);
                        aside.push((digest.clone(), [self.blob_path(&digest), self.metainfo_path(&digest)]));
                    }
                }
            }
            self.publish(&state);
        }
        self.metrics.evictions.inc_by(evicted);
        for path in self.set_aside_all(aside) {
            remove_logged(&path);
        }
        freed
    }

    /// Re-measure idle partials (forgetting those gone from disk), then apply the watermarks
    /// and remove stale partials. Blocking.
    pub fn sweep(&self) {
        let idle: Vec<Digest> =
            self.lock().partials.iter().filter(|(_, p)| p.active == 0).map(|(d, _)| d.clone()).collect();
        let measured: Vec<(Digest, Option<u64>)> = idle
            .into_iter()
            .map(|d| {
                let bytes = std::fs::metadata(self.partial_path(&d)).ok().map(|m| on_disk(&m));
                (d, bytes)
            })
            .collect();
        {
            let mut state = self.lock();
            for (digest, bytes) in measured {
                let Some(p) = state.partials.get_mut(&digest) else { continue };
                if p.active > 0 {
                    continue;
                }
                match bytes {
                    Some(b) => p.bytes = b,
                    None => {
                        state.partials.remove(&digest);
                    }
                }
            }
            self.publish(&state);
        }
        self.make_room(0);
    }

    /// Sweep every `every`, for as long as the process runs.
    pub async fn maintain(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            let cache = self.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || cache.sweep()).await {
                tracing::warn!(error = %e, "cache maintenance failed");
            }
        }
    }
}
