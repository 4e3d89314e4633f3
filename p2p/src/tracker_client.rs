//! The tracker protocol and its client. Several trackers can run; each digest is handled by
//! the tracker that rendezvous hashing picks for it, and the next ones take over when it fails.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shoal_registry::Digest;

use crate::rendezvous;

/// `POST /v1/announce`: "I am in the swarm of `digest`".
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnnounceRequest {
    pub digest: Digest,
    /// Hex of the 20-byte peer id.
    pub peer_id: String,
    /// Where other peers reach this one's peer listener.
    pub addr: SocketAddr,
    /// Holds every piece.
    pub complete: bool,
    /// Leaving the swarm: forget this peer.
    #[serde(default)]
    pub stopped: bool,
}

/// A peer as the tracker hands it out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Hex peer id (20 bytes).
    pub peer_id: String,
    pub addr: SocketAddr,
    /// Holds the whole blob.
    pub complete: bool,
    /// An origin that owns the blob.
    #[serde(default)]
    pub origin: bool,
}

/// The answer to an announce.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnnounceResponse {
    /// Announce again after this many seconds.
    pub interval_secs: u64,
    pub peers: Vec<PeerInfo>,
}

/// A seeder of a blob as its origin reports it (`GET /shoal/v1/blobs/<digest>/locations`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Seeder {
    pub peer_id: String,
    pub addr: SocketAddr,
}

/// The origin's answer to a locations query.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Locations {
    pub seeders: Vec<Seeder>,
}

/// Path on an origin of a blob's metainfo.
pub fn metainfo_path(digest: &Digest) -> String {
    format!("/shoal/v1/blobs/{digest}/metainfo")
}

/// Path on an origin of a blob's seeders.
pub fn locations_path(digest: &Digest) -> String {
    format!("/shoal/v1/blobs/{digest}/locations")
}

/// Whether a peer id is 40 lowercase hex characters.
pub fn valid_peer_id(id: &str) -> bool {
    id.len() == 40 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Why no tracker answered.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("no tracker configured")]
    NoTracker,
    #[error("every tracker failed; last error: {0}")]
    AllFailed(String),
}

/// Client of one or more trackers.
pub struct TrackerClient {
    urls: Vec<String>,
    http: reqwest::Client,
}

impl TrackerClient {
    pub fn new(urls: Vec<String>, timeout: Duration) -> Result<TrackerClient, reqwest::Error> {
        let http = shoal_tls::http_client().timeout(timeout).connect_timeout(timeout).build()?;
        let urls = urls.into_iter().map(|u| u.trim_end_matches('/').to_string()).collect();
        Ok(TrackerClient { urls, http })
    }

    /// Trackers in the order to try for `digest`: the rendezvous winner first. The ranking's
    /// hash is pinned (see [`rendezvous`]), so agents of every build pick the same tracker for
    /// a digest and its swarm is not split.
    pub fn order_for(&self, digest: &Digest) -> Vec<String> {
        rendezvous::ranked(&digest.to_string(), &self.urls)
    }

    /// Announce to the digest's tracker, failing over to the next ones.
    pub async fn announce(&self, req: &AnnounceRequest) -> Result<AnnounceResponse, TrackerError> {
        let mut last = None;
        for url in self.order_for(&req.digest) {
            let sent = self.http.post(format!("{url}/v1/announce")).json(req).send().await;
            match sent {
                Ok(r) if r.status().is_success() => match r.json::<AnnounceResponse>().await {
                    Ok(resp) => return Ok(resp),
                    Err(e) => last = Some(format!("{url}: {e}")),
                },
                Ok(r) => last = Some(format!("{url}: status {}", r.status())),
                Err(e) => last = Some(format!("{url}: {e}")),
            }
        }
        Err(last.map_or(TrackerError::NoTracker, TrackerError::AllFailed))
    }

    /// A blob's metainfo JSON from the digest's tracker; `None` if no tracker knows it.
    pub async fn metainfo(&self, digest: &Digest) -> Result<Option<Bytes>, TrackerError> {
        let mut last = None;
        let mut not_found = false;
        for url in self.order_for(digest) {
            match self.http.get(format!("{url}/v1/metainfo/{digest}")).send().await {
                Ok(r) if r.status().is_success() => match r.bytes().await {
                    Ok(b) => return Ok(Some(b)),
                    Err(e) => last = Some(format!("{url}: {e}")),
                },
                Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => not_found = true,
                Ok(r) => last = Some(format!("{url}: status {}", r.status())),
                Err(e) => last = Some(format!("{url}: {e}")),
            }
        }
        if not_found {
            return Ok(None);
        }
        Err(last.map_or(TrackerError::NoTracker, TrackerError::AllFailed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_stable_and_spreads_digests() {
        let client = TrackerClient::new(
            vec!["http://a".into(), "http://b".into(), "http://c".into()],
            Duration::from_secs(1),
        )
        .unwrap();
        let mut firsts = std::collections::HashSet::new();
        for i in 0..50 {
            let d = Digest::of(shoal_registry::Algorithm::Sha256, format!("{i}").as_bytes());
            let order = client.order_for(&d);
            assert_eq!(order.len(), 3);
            assert_eq!(order, client.order_for(&d));
            firsts.insert(order[0].clone());
        }
        assert_eq!(firsts.len(), 3, "every tracker leads for some digests");
    }
}
