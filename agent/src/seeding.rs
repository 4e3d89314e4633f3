//! The agent as a seeder: the pieces it can serve (running downloads and cached blobs) and
//! the announcements that keep it listed at the tracker for blobs it recently pulled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use shoal_p2p::blob::BlobPieces;
use shoal_p2p::server::PieceLookup;
use shoal_p2p::tracker_client::{AnnounceRequest, TrackerClient};
use shoal_p2p::{Metainfo, PeerId};
use shoal_registry::Digest;

use crate::downloads::Downloads;

/// Blobs announced as seeded at once, most recent first.
const MAX_SEEDED: usize = 1000;

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

/// Blobs this agent keeps announcing as a complete seeder, for `window` after their last use.
pub struct Seeding {
    recent: Mutex<HashMap<Digest, Instant>>,
    window: Duration,
}

impl Seeding {
    pub fn new(window: Duration) -> Seeding {
        Seeding { recent: Mutex::new(HashMap::new()), window }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Instant>> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The blob was pulled or served: keep seeding it.
    pub fn touch(&self, digest: &Digest) {
        let mut recent = self.lock();
        recent.insert(digest.clone(), Instant::now());
        if recent.len() > MAX_SEEDED {
            let mut by_age: Vec<(Instant, Digest)> = recent.iter().map(|(d, t)| (*t, d.clone())).collect();
            by_age.sort();
            for (_, d) in by_age.into_iter().take(recent.len() - MAX_SEEDED) {
                recent.remove(&d);
            }
        }
    }

    fn current(&self) -> Vec<Digest> {
        let mut recent = self.lock();
        let window = self.window;
        recent.retain(|_, t| t.elapsed() < window);
        recent.keys().cloned().collect()
    }

    /// Re-announce every recently used blob as complete, every `interval`, until the process ends.
    pub async fn announce_loop(
        self: Arc<Self>,
        tracker: Arc<TrackerClient>,
        downloads: Arc<Downloads>,
        peer_id: PeerId,
        advertise: std::net::SocketAddr,
        interval: Duration,
    ) {
        loop {
            tokio::time::sleep(interval).await;
            for digest in self.current() {
                if downloads.cache.get(&digest).is_none() {
                    continue;
                }
                let req = AnnounceRequest {
                    digest,
                    peer_id: peer_id.to_string(),
                    addr: advertise,
                    complete: true,
                    stopped: false,
                };
                if let Err(e) = tracker.announce(&req).await {
                    tracing::debug!(error = %e, "seeding announce failed");
                }
            }
        }
    }
}
