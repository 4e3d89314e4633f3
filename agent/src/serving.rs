//! What this agent serves to other peers: pieces of its running downloads and of the blobs
//! in its cache. Serving a cached blob keeps it seeded.

use std::sync::Arc;

use async_trait::async_trait;
use shoal_p2p::blob::BlobPieces;
use shoal_p2p::server::PieceLookup;
use shoal_p2p::Metainfo;
use shoal_registry::Digest;

use crate::downloads::Downloads;
use crate::seeding::Seeding;

/// Finds pieces for the peer server.
pub struct AgentPieces {
    pub downloads: Arc<Downloads>,
    pub seeding: Arc<Seeding>,
}

#[async_trait]
impl PieceLookup for AgentPieces {
    async fn lookup(&self, digest: &Digest) -> Option<Arc<BlobPieces>> {
        if let Some(d) = self.downloads.running(digest) {
            return Some(d.pieces.clone());
        }
        // Pinned for as long as a peer is being served from it: never evicted while seeded.
        let pin = self.downloads.cache.pin(digest)?;
        let cache = self.downloads.cache.clone();
        let digest = digest.clone();
        let pieces = tokio::task::spawn_blocking(move || {
            let json = std::fs::read(cache.metainfo_path(&digest)).ok()?;
            let metainfo: Metainfo = serde_json::from_slice(&json).ok()?;
            if metainfo.digest() != &digest {
                return None;
            }
            BlobPieces::complete(&cache.blob_path(&digest), Arc::new(metainfo))
                .ok()
                .map(|b| b.with_guard(pin))
        })
        .await
        .ok()??;
        self.seeding.touch(pieces.metainfo().digest());
        Some(Arc::new(pieces))
    }
}
