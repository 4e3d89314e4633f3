//! Opening a cached blob to serve it, and what happens when it turns out bad: its size and
//! metainfo are checked on opening, a missing metainfo is fetched again and the whole file
//! checked against it, and a piece that fails its hash removes the copy.

use std::sync::Arc;

use shoal_p2p::blob::BlobPieces;
use shoal_p2p::piece_store::is_disk_full;
use shoal_p2p::Metainfo;
use shoal_registry::Digest;

use super::{remove_logged, BlobCache, Cached, Pin};

impl BlobCache {
    /// Remove the cached copy of `digest` whose piece `index` did not match (if it is still
    /// the copy of `generation`: a newer one is left alone). Blocking.
    fn remove_corrupt(&self, digest: &Digest, generation: u64, index: Option<u32>) {
        {
            let mut state = self.lock();
            if state.entries.get(digest).is_none_or(|e| e.generation != generation) {
                return;
            }
            state.remove_entry(digest);
            state.begin_set_aside(digest);
            self.publish(&state);
        }
        let doomed =
            self.set_aside_all(vec![(digest.clone(), [self.blob_path(digest), self.metainfo_path(digest)])]);
        self.metrics.corrupt.inc();
        tracing::warn!(%digest, ?index, "cached blob does not match its digest; removed, it will be fetched again");
        for path in doomed {
            remove_logged(&path);
        }
    }

    /// Open a cached blob to serve it (see the module docs for what is checked). Blocking.
    pub fn open_blob(self: &Arc<Self>, digest: &Digest) -> Cached {
        let Some((pin, generation)) = self.pin_with_generation(digest) else { return Cached::Missing };
        let metainfo = std::fs::read(self.metainfo_path(digest))
            .ok()
            .and_then(|json| serde_json::from_slice::<Metainfo>(&json).ok())
            .filter(|m| m.digest() == digest);
        let Some(metainfo) = metainfo else {
            tracing::warn!(%digest, "the metainfo beside a cached blob is missing or bad");
            return Cached::NeedsMetainfo;
        };
        self.open_checked(digest, Arc::new(metainfo), pin, generation)
    }

    /// The blob's file against `metainfo`: the right size, then opened with verifying reads.
    fn open_checked(
        self: &Arc<Self>,
        digest: &Digest,
        metainfo: Arc<Metainfo>,
        pin: Pin,
        generation: u64,
    ) -> Cached {
        let path = self.blob_path(digest);
        let size = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) => {
                tracing::warn!(%digest, error = %e, "a cached blob's file is gone");
                drop(pin);
                self.forget(digest, generation);
                return Cached::Missing;
            }
        };
        if size != metainfo.size() {
            tracing::warn!(%digest, size, expected = metainfo.size(), "cached blob has the wrong size");
            drop(pin);
            self.remove_corrupt(digest, generation, None);
            return Cached::Missing;
        }
        let pieces = match BlobPieces::complete(&path, metainfo) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cannot open a cached blob");
                return Cached::Missing;
            }
        };
        let cache = self.clone();
        let d = digest.clone();
        let pieces = pieces
            .verifying_reads(move |index| cache.remove_corrupt(&d, generation, Some(index)))
            .with_guard(pin);
        Cached::Ready(Arc::new(pieces))
    }

    /// Forget an entry whose file vanished (someone else deleted it).
    fn forget(&self, digest: &Digest, generation: u64) {
        let mut state = self.lock();
        if state.entries.get(digest).is_some_and(|e| e.generation == generation) {
            state.remove_entry(digest);
            self.publish(&state);
        }
    }

    /// A metainfo fetched for a cached blob whose own was missing or bad: if the whole file
    /// matches it (size, every piece, digest; one read), write it beside the blob and open the
    /// blob; otherwise the file is bad and removed. Blocking.
    pub fn adopt_metainfo(self: &Arc<Self>, digest: &Digest, metainfo: Metainfo) -> Cached {
        let Some((pin, generation)) = self.pin_with_generation(digest) else { return Cached::Missing };
        let good = std::fs::File::open(self.blob_path(digest)).and_then(|f| metainfo.describes(f));
        match good {
            Ok(true) => {}
            Ok(false) => {
                drop(pin);
                self.remove_corrupt(digest, generation, None);
                return Cached::Missing;
            }
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cannot check a cached blob against its metainfo");
                return Cached::Missing;
            }
        }
        if let Err(e) = self.write_metainfo(&metainfo) {
            tracing::warn!(%digest, error = %e, "cannot rewrite the metainfo beside a cached blob");
        } else {
            tracing::info!(%digest, "rewrote the metainfo beside a cached blob");
        }
        self.open_checked(digest, Arc::new(metainfo), pin, generation)
    }

    /// Write the metainfo of a blob beside it: a temp file, fsynced, renamed over, the
    /// directory fsynced, so a crash leaves the old file or the new one, never a torn one. A
    /// full disk evicts and tries again. Blocking.
    pub fn write_metainfo(&self, metainfo: &Metainfo) -> std::io::Result<()> {
        let json = serde_json::to_vec(metainfo).map_err(std::io::Error::other)?;
        let path = self.metainfo_path(metainfo.digest());
        // An eviction renaming this digest's files aside would take the new one too.
        self.wait_set_aside(metainfo.digest());
        let mut attempts = 0;
        loop {
            let written = match path.parent() {
                Some(dir) => shoal_registry::durable::create_dir_all(dir),
                None => Err(std::io::Error::other("a metainfo path has a parent")),
            };
            match written.and_then(|()| shoal_registry::durable::replace(&path, &json, None)) {
                Err(e) if is_disk_full(&e) && attempts < 2 => {
                    attempts += 1;
                    if !self.reclaim(json.len() as u64) {
                        return Err(e);
                    }
                }
                other => return other,
            }
        }
    }

    /// Remove what a download that did not make it into the cache left there: its metainfo,
    /// and its blob file if a step after the move failed (a directory sync): uncounted, that
    /// file would sit in the cache until a restart. Nothing of a copy the cache holds. Blocking.
    pub fn discard_unfinished(&self, digest: &Digest) {
        if !self.lock().entries.contains_key(digest) {
            remove_logged(&self.metainfo_path(digest));
            remove_logged(&self.blob_path(digest));
        }
    }
}
