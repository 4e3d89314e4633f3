//! The tracker's HTTP protocol, shared by the tracker and its clients (agents).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use shoal_registry::Digest;

pub use crate::peers::PeerInfo;

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
