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
/// computation now waits for the one under way and takes its result. The wait is
/// asynchronous: waiting on the blocking pool, a fleet's askers (HTTP metainfo requests, peer
/// handshakes) filled its threads for the length of the hash and stalled every file and
/// metadata operation of the origin.
#[derive(Default)]
pub(crate) struct Hashing {
    running: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// Hash passes over blob files so far.
    passes: std::sync::atomic::AtomicU64,
}

impl Hashing {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<tokio::sync::Mutex<()>>>> {
        // Inserts and removals only: a panic cannot leave the map torn.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` (blocking, on the blocking pool) alone among the computations of `digest`,
    /// waiting for the one under way without holding a thread.
    async fn alone<T: Send + 'static>(
        &self,
        digest: &Digest,
        f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let turn = self.lock().entry(digest.clone()).or_default().clone();
        let result = {
            let _guard = turn.lock().await;
            tokio::task::spawn_blocking(f)
                .await
                .map_err(|e| StoreError::Internal(format!("metainfo task: {e}")))
        };
        // References are taken only under the map's lock: dropped under it too, a count of one
        // (the map's) means nobody else waits, and the entry goes.
        let mut all = self.lock();
        drop(turn);
        if all.get(digest).is_some_and(|t| Arc::strong_count(t) == 1) {
            all.remove(digest);
        }
        result?
    }
}

/// The metainfo recorded for a blob held here: `None` if the blob is not here, `Some(None)` if
/// it is but no metainfo is recorded yet. Blocking.
fn recorded_blocking(inner: &Inner, digest: &Digest) -> Result<Option<Option<Metainfo>>, StoreError> {
    if inner.meta.blob_size(digest)?.is_none() {
        return Ok(None);
    }
    Ok(Some(inner.meta.metainfo(digest)?.and_then(|json| serde_json::from_slice::<Metainfo>(&json).ok())))
}

/// The metainfo of a blob held here, recorded or computed and recorded (one computation per
/// blob at a time; a caller that waited for another takes what it recorded).
async fn metainfo_of(inner: &Arc<Inner>, digest: &Digest) -> Result<Option<Metainfo>, StoreError> {
    let lookup = {
        let (inner, digest) = (inner.clone(), digest.clone());
        move || recorded_blocking(&inner, &digest)
    };
    let found = tokio::task::spawn_blocking(lookup.clone())
        .await
        .map_err(|e| StoreError::Internal(format!("metainfo task: {e}")))??;
    match found {
        None => return Ok(None),
        Some(Some(m)) => return Ok(Some(m)),
        Some(None) => {}
    }
    let (held, digest) = (inner.clone(), digest.clone());
    inner
        .hashing
        .alone(&digest.clone(), move || {
            match lookup()? {
                None => return Ok(None),
                Some(Some(m)) => return Ok(Some(m)),
                Some(None) => {}
            }
            held.hashing.passes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (m, json) = compute(&held.layout.blob(&digest), &digest)?;
            held.meta.put_metainfo(&digest, &json)?;
            Ok(Some(m))
        })
        .await
}

impl OriginStore {
    /// The metainfo of a blob held here, computing and recording it on first use.
    pub async fn metainfo(&self, digest: &Digest) -> Result<Option<Arc<Metainfo>>, StoreError> {
        Ok(metainfo_of(&self.inner, digest).await?.map(Arc::new))
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
    /// Holds the store only weakly until the task starts (a store closed by then is left
    /// alone); the computation itself holds it, as every caller's does.
    pub fn precompute_metainfo(&self, digest: &Digest) {
        let weak = Arc::downgrade(&self.inner);
        let digest = digest.clone();
        tokio::spawn(async move {
            let Some(inner) = weak.upgrade() else { return }; // the store closed
            if let Err(e) = metainfo_of(&inner, &digest).await {
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

    /// A store in `dir` holding one blob of `len` bytes of `byte`, whose metainfo is not known.
    async fn store_holding(dir: &tempfile::TempDir, byte: u8, len: usize) -> (OriginStore, Digest) {
        let config = StoreConfig {
            data_dir: dir.path().to_path_buf(),
            upload_idle_timeout: Duration::from_secs(3600),
            max_upload_sessions: 100,
        };
        let store = OriginStore::open(config).await.unwrap();
        let data = bytes::Bytes::from(vec![byte; len]);
        let digest = Digest::of(Algorithm::Sha256, &data);
        let body: shoal_registry::ByteStream = Box::pin(futures_util::stream::iter([Ok(data.clone())]));
        store.blob_put(&digest, data.len() as u64, body).await.unwrap();
        (store, digest)
    }

    /// A fleet asking for a fresh blob's metainfo at once (and the background computation
    /// after its commit) gets one hash pass over the file, not one per asker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_askers_share_one_hash_pass() {
        let dir = tempfile::tempdir().unwrap();
        let (store, digest) = store_holding(&dir, 5, 32 << 20).await;
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
        // The background computation may still be finishing its own wait.
        for _ in 0..100 {
            if store.inner.hashing.lock().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(store.inner.hashing.lock().is_empty(), "nothing left behind");
        assert_eq!(store.inner.hashing.passes.load(Ordering::Relaxed), 1);
    }

    /// Askers waiting for a hash pass hold no thread of the blocking pool: with a pool of two,
    /// one hashing and six askers waiting, a metadata lookup still answers while the pass
    /// runs. Before, the waiters parked on the pool's threads and the lookup waited for the
    /// whole pass.
    #[test]
    fn waiting_for_a_hash_pass_holds_no_blocking_thread() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (store, digest) = store_holding(&dir, 7, 256 << 20).await;
            let started = std::time::Instant::now();
            let asks: Vec<_> = (0..6)
                .map(|_| {
                    let (store, digest) = (store.clone(), digest.clone());
                    tokio::spawn(async move { store.metainfo(&digest).await })
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(30)).await;
            let other = Digest::of(Algorithm::Sha256, b"other");
            assert!(!store.has_blob(&other).await.unwrap());
            let looked_up = started.elapsed();
            for ask in futures_util::future::join_all(asks).await {
                assert!(ask.unwrap().unwrap().is_some());
            }
            let hashed = started.elapsed();
            assert_eq!(store.inner.hashing.passes.load(Ordering::Relaxed), 1);
            assert!(
                looked_up < hashed / 2,
                "a lookup took {looked_up:?} while the askers waited for a {hashed:?} hash pass"
            );
        });
    }
}
