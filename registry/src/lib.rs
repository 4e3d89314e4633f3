//! The OCI Distribution v1.1 API and content model shared by Shoal's origins and agents:
//! digests, names, ranges, manifests, spec errors, the storage trait, the axum router, and
//! how blob bytes are written to files ([`file_write`]).

pub mod api;
pub mod auth;
pub mod digest;
pub mod durable;
pub mod error;
pub mod file_write;
pub mod identity;
pub mod manifest;
pub mod mirror;
pub mod name;
pub mod range;
pub mod store;

pub use api::{router, ApiConfig};
pub use digest::{Algorithm, Digest};
pub use error::{ApiError, ErrorCode, StoreError};
pub use name::{RepoName, Tag};
pub use store::{ByteStream, Reference, RegistryStore};
