//! The origin as a seeder: the metainfo of each blob (computed once, after commit, and kept in
//! redb), the blobs it can serve to peers, and where its peer listener is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use shoal_p2p::blob::BlobPieces;
use shoal_p2p::server::PieceLookup;
use shoal_p2p::Metainfo;
use shoal_registry::{Digest, StoreError};

use crate::store::{Inner, OriginStore};

/// Blobs whose metainfo is being computed. A fleet that pulls a blob right after its push asks
/// for its metainfo many times before the first hash pass (seconds for a big layer) ends, and
/// every caller that gave up and asked again started one more pass over the whole file: each
/// computation now waits for the one under way and takes its result.
#[derive(Default)]
pub(crate) struct Hashing {
    running: Mutex<HashMap<Digest, Arc<Mutex<()>>>>,
    /// Hash passes over blob files so far.
    passes: std::sync::atomic::AtomicU64,
}

impl Hashing {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<Mutex<()>>>> {
        // Inserts and removals only: a panic cannot leave the map torn.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` (blocking) alone among the computations of `digest`.
    fn alone<T>(&self, digest: &Digest, f: impl FnOnce() -> T) -> T {
        let turn = self.lock().entry(digest.clone()).or_default().clone();
        let result = {
            let _guard = turn.lock().unwrap_or_else(|p| p.into_inner());
            f()
        };
        let mut all = self.lock();
        // The map's reference and this one: nobody else waits, the entry goes.
        if Arc::strong_count(&turn) == 2 {
            all.remove(digest);
        }
        result
    }
}

/// The metainfo of a blob held here, recorded or computed and recorded (one computation per
/// blob at a time; a caller that waited for another takes what it recorded). Blocking.
fn metainfo_blocking(inner: &Inner, digest: &Digest) -> Result<Option<Metainfo>, StoreError> {
    let recorded = |inner: &Inner| -> Result<Option<Metainfo>, StoreError> {
        Ok(inner.meta.metainfo(digest)?.and_then(|json| serde_json::from_slice::<Metainfo>(&json).ok()))
    };
    if inner.meta.blob_size(digest)?.is_none() {
        return Ok(None);
    }
    if let Some(m) = recorded(inner)? {
        return Ok(Some(m));
    }
    inner.hashing.alone(digest, || {
        if let Some(m) = recorded(inner)? {
            return Ok(Some(m));
        }
        inner.hashing.passes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (m, json) = compute(&inner.layout.blob(digest), digest)?;
        inner.meta.put_metainfo(digest, &json)?;
        Ok(Some(m))
    })
}

impl OriginStore {
    /// The metainfo of a blob held here, computing and recording it on first use.
    pub async fn metainfo(&self, digest: &Digest) -> Result<Option<Arc<Metainfo>>, StoreError> {
        let inner = self.inner.clone();
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || Ok(metainfo_blocking(&inner, &digest)?.map(Arc::new)))
            .await
            .map_err(|e| StoreError::Internal(format!("metainfo task: {e}")))?
    }

    /// Whether this origin holds the blob's file outside quarantine. Unlike `blob_size`, a
    /// quarantined blob stays there: for questions that are no use of the blob (a tracker
    /// asking who seeds it, for agents that still announce a deleted image's blobs).
    pub async fn has_blob(&self, digest: &Digest) -> Result<bool, StoreError> {
        let inner = self.inner.clone();
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || inner.meta.blob_size(&digest).map(|s| s.is_some()))
            .await
            .map_err(|e| StoreError::Internal(format!("lookup task: {e}")))?
    }

    /// Compute a blob's metainfo in the background (unless known) so the first pull does not
    /// wait for it.
    /// Holds the store only weakly, so a closing store is not kept open by the hashing.
    pub fn precompute_metainfo(&self, digest: &Digest) {
        let weak = Arc::downgrade(&self.inner);
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || {
            let Some(inner) = weak.upgrade() else { return }; // the store closed
            if let Err(e) = metainfo_blocking(&inner, &digest) {
                tracing::warn!(%digest, error = %e, "computing metainfo failed");
            }
        });
    }
}

/// Hash a blob file into its metainfo (and its JSON), checking it is the blob it should be.
fn compute(path: &std::path::Path, digest: &Digest) -> Result<(Metainfo, Vec<u8>), StoreError> {
    let m = Metainfo::compute_file(path, digest.algorithm()).map_err(StoreError::from_io)?;
    if m.digest() != digest {
        return Err(StoreError::Internal(format!("blob file of {digest} is corrupt")));
    }
    let json = serde_json::to_vec(&m).map_err(|e| StoreError::Internal(e.to_string()))?;
    Ok((m, json))
}

#[async_trait]
impl PieceLookup for OriginStore {
    async fn lookup(&self, digest: &Digest) -> Option<Arc<BlobPieces>> {
        let metainfo = self.metainfo(digest).await.ok().flatten()?;
        let path = self.inner.layout.blob(digest);
        let pieces =
            tokio::task::spawn_blocking(move || BlobPieces::complete(&path, metainfo)).await.ok()?.ok()?;
        Some(Arc::new(pieces))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use shoal_registry::Algorithm;

    use super::*;
    use crate::StoreConfig;

    /// A fleet asking for a fresh blob's metainfo at once (and the background computation
    /// after its commit) gets one hash pass over the file, not one per asker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_askers_share_one_hash_pass() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            data_dir: dir.path().to_path_buf(),
            upload_idle_timeout: Duration::from_secs(3600),
            max_upload_sessions: 100,
        };
        let store = OriginStore::open(config).await.unwrap();
        let data = bytes::Bytes::from(vec![5u8; 32 << 20]);
        let digest = Digest::of(Algorithm::Sha256, &data);
        let body: shoal_registry::ByteStream = Box::pin(futures_util::stream::iter([Ok(data.clone())]));
        store.blob_put(&digest, data.len() as u64, body).await.unwrap();
        store.precompute_metainfo(&digest);
        let asks = (0..8).map(|_| {
            let (store, digest) = (store.clone(), digest.clone());
            tokio::spawn(async move { store.metainfo(&digest).await })
        });
        for ask in futures_util::future::join_all(asks).await {
            let m = ask.unwrap().unwrap().expect("the blob is held");
            assert_eq!(m.digest(), &digest);
        }
        assert_eq!(store.inner.hashing.passes.load(Ordering::Relaxed), 1);
        assert!(store.inner.hashing.lock().is_empty(), "nothing left behind");
    }
}
