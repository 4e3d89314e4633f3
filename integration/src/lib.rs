//! Black-box test harness for Shoal: starts real `shoal` processes and talks to
//! them over HTTP, the way registry clients do.
//!
//! - [`origin`]: spawn `shoal origin` on a free loopback port with its own data
//!   directory (or point at an already running registry through
//!   `SHOAL_TEST_REGISTRY_URL`), restart it, kill it on drop.
//! - [`cluster`]: an origin, a tracker and N agents on loopback for the swarm
//!   tests: kill and restart processes, push random blobs, pull them through
//!   agents (hashed while streamed) and read Prometheus metrics.
//! - [`origins`]: an origin cluster (N `shoal origin` processes that replicate to each
//!   other): crash, stop, restart, admin repair and GC, where each blob is on disk, and
//!   fallible image push/pull helpers for tests that restart origins under load.
//! - [`api`]: a thin HTTP client with the OCI flows the tests repeat (start an
//!   upload, push a blob, push a manifest) and [`api::Reply`], a fully read
//!   response with assertion helpers for statuses, headers and spec error bodies.
//! - [`oci`]: media types and builders for image manifests, indexes, Docker
//!   schema 2 manifests and manifest lists.
//! - [`content`]: random bytes, digests and unique repository names.
//! - [`raw`]: hand-written HTTP/1.1 over a `TcpStream`, for requests a normal
//!   client refuses to send (`..` in a path) or must not finish (a dropped or
//!   deliberately slow upload).

pub mod api;
pub mod cluster;
pub mod content;
pub mod oci;
pub mod origin;
pub mod origins;
pub mod raw;
pub mod tls;
pub mod upstream;

pub use api::{Client, Reply, SendExt};
pub use content::{random_bytes, sha256, sha512, unique_repo, unique_token};
pub use origin::{external_registry, Origin};
pub use reqwest::{Method, StatusCode};

/// Returns early from a test, with a note on stderr, when the suite runs against
/// an external registry (`SHOAL_TEST_REGISTRY_URL`): restarts and Shoal
/// configuration files need a server this harness spawned itself.
#[macro_export]
macro_rules! skip_if_external {
    ($why:expr) => {
        if let Some(url) = $crate::external_registry() {
            eprintln!("skipped against external registry {url}: {}", $why);
            return;
        }
    };
}
