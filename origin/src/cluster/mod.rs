//! The origin cluster: membership, placement of blobs and repository metadata on R owners,
//! synchronous replication, repair and garbage collection. A single origin is a cluster of
//! one, so there is one code path.

pub mod clock_sync;
pub mod collected;
pub mod coordinator;
pub mod gc;
pub mod internal_api;
pub mod local;
pub mod member_entry;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod placement;
pub mod read_repair;
pub mod record;
pub mod remote;
pub mod repair;
pub mod store;
#[cfg(test)]
pub(crate) mod testing;
pub mod topology;
pub mod wire;

use std::time::Duration;

/// Whether `members` (this origin included) make a lone origin: one entry naming one address.
/// A `dns+`/`srv+` entry names every origin the name gives, so it is a cluster however many
/// it gives today.
pub fn lone(members: &[String]) -> bool {
    members.len() == 1 && !members[0].contains('+')
}

/// Settings of the cluster layer (the `[cluster]` section of the origin's config).
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This origin's id: the `host:port` other origins reach its API on.
    pub advertise: String,
    /// Every origin's `host:port` (this one included), or DNS names resolving to them.
    pub members: Vec<String>,
    /// Copies of each blob and of each repository's metadata.
    pub replicas: usize,
    /// Copies that must be durable before a write is acknowledged (1..=replicas).
    pub write_quorum: usize,
    /// Shared secret origins present to each other on the internal API.
    pub secret: Option<String>,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    /// Consecutive failed checks before an origin counts as down.
    pub health_fails: u32,
    /// Consecutive passed checks before a down origin counts as up again.
    pub health_passes: u32,
    /// How often DNS names in `members` are resolved again.
    pub dns_refresh: Duration,
    /// Timeout of each internal call that moves no bulk data.
    pub call_timeout: Duration,
    /// How often the repair loop checks placement when nothing changed.
    pub repair_interval: Duration,
    /// Bytes per second repair may copy between origins.
    pub repair_rate: u64,
    /// A blob no manifest references is kept at least this long after it was stored.
    pub gc_grace: Duration,
    /// How long garbage collection keeps unreferenced files aside before deleting them.
    pub gc_quarantine: Duration,
}
