//! The origin as a seeder: the metainfo of each blob (computed once, after commit, and kept in
//! redb), the blobs it can serve to peers, and where its peer listener is.

use std::sync::Arc;

use async_trait::async_trait;
use shoal_p2p::blob::BlobPieces;
use shoal_p2p::server::PieceLookup;
use shoal_p2p::Metainfo;
use shoal_registry::{Digest, StoreError};

use crate::store::OriginStore;

impl OriginStore {
    /// The metainfo of a blob held here, computing and recording it on first use.
    pub async fn metainfo(&self, digest: &Digest) -> Result<Option<Arc<Metainfo>>, StoreError> {
        let inner = self.inner.clone();
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || {
            if inner.meta.blob_size(&digest)?.is_none() {
                return Ok(None);
            }
            if let Some(json) = inner.meta.metainfo(&digest)? {
                if let Ok(m) = serde_json::from_slice::<Metainfo>(&json) {
                    return Ok(Some(Arc::new(m)));
                }
            }
            let (m, json) = compute(&inner.layout.blob(&digest), &digest)?;
            inner.meta.put_metainfo(&digest, &json)?;
            Ok(Some(Arc::new(m)))
        })
        .await
        .map_err(|e| StoreError::Internal(format!("metainfo task: {e}")))?
    }

    /// Whether this origin holds the blob's file.
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
        let path = self.inner.layout.blob(digest);
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || {
            let known = weak.upgrade().map(|inner| inner.meta.metainfo(&digest));
            if matches!(known, Some(Ok(Some(_))) | None) {
                return; // already computed, or the store closed
            }
            let result = compute(&path, &digest).and_then(|(_, json)| match weak.upgrade() {
                Some(inner) => inner.meta.put_metainfo(&digest, &json),
                None => Ok(()),
            });
            if let Err(e) = result {
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
