//! What this agent serves to other peers: pieces of its running downloads and of the blobs
//! in its cache. Serving a cached blob keeps it seeded.

use std::sync::Arc;

use async_trait::async_trait;
use shoal_p2p::blob::BlobPieces;
use shoal_p2p::server::PieceLookup;
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
            return Some(d.pieces());
        }
        // Pinned for as long as a peer is being served from it (never evicted while seeded);
        // every piece sent is checked against its hash first.
        let pieces = self.downloads.open_cached(digest).await?;
        self.seeding.touch(pieces.metainfo().digest());
        Some(pieces)
    }
}
