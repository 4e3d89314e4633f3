//! Origin configuration: a TOML file, overridden by `SHOAL_*` environment variables and flags.
//! Every field has a default with units; `docs/configuration.md` lists them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use bytesize::ByteSize;
use serde::Deserialize;
use shoal_registry::access::AuthConfig;

/// The `shoal origin` config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OriginConfig {
    /// HTTP address of the registry API, `/healthz` and `/metrics`.
    pub listen: SocketAddr,
    /// Peer-protocol address for seeding blobs into the swarm.
    pub peer_listen: Option<SocketAddr>,
    /// Peer address announced to others, when `peer_listen` is a wildcard address.
    pub peer_advertise: Option<SocketAddr>,
    /// Where blobs, upload sessions and metadata live.
    pub data_dir: PathBuf,
    /// An upload session idle this long is discarded with its data.
    #[serde(with = "humantime_serde")]
    pub upload_idle_timeout: Duration,
    /// Largest manifest accepted.
    pub max_manifest_size: ByteSize,
    pub limits: Limits,
    pub auth: AuthConfig,
}

/// The `[limits]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Registry requests served at once; more get 429 `TOOMANYREQUESTS`.
    pub max_concurrent_requests: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_concurrent_requests: 1024 }
    }
}

/// Default registry port, the one Docker users expect.
pub fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5000))
}

/// Default upload idle timeout: long enough for a slow CI uploader between chunks.
pub fn default_upload_idle_timeout() -> Duration {
    Duration::from_secs(60 * 60)
}

impl Default for OriginConfig {
    fn default() -> Self {
        OriginConfig {
            listen: default_listen(),
            peer_listen: None,
            peer_advertise: None,
            data_dir: PathBuf::from("shoal-data/origin"),
            upload_idle_timeout: default_upload_idle_timeout(),
            max_manifest_size: ByteSize::b(shoal_registry::manifest::DEFAULT_MAX_MANIFEST_SIZE),
            limits: Limits::default(),
            auth: AuthConfig::default(),
        }
    }
}

/// Read a component's TOML config file; no `path` gives the defaults.
pub fn load_toml<T: serde::de::DeserializeOwned + Default>(path: Option<&Path>) -> anyhow::Result<T> {
    let Some(path) = path else { return Ok(T::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
}

impl OriginConfig {
    /// The registry API settings derived from this config.
    pub fn api(&self) -> shoal_registry::ApiConfig {
        shoal_registry::ApiConfig {
            read_only: false,
            max_manifest_size: self.max_manifest_size.as_u64(),
            max_concurrent_requests: self.limits.max_concurrent_requests,
            auth: self.auth.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_config() {
        let c: OriginConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:7000"
            data_dir = "/tmp/x"
            upload_idle_timeout = "2s"
            max_manifest_size = "1MiB"
            [limits]
            max_concurrent_requests = 3
            [auth]
            anonymous = "pull"
            users = [{ name = "ci", password = "p", access = "push" }]
            "#,
        )
        .unwrap();
        assert_eq!(c.upload_idle_timeout, Duration::from_secs(2));
        assert_eq!(c.max_manifest_size.as_u64(), 1024 * 1024);
        assert_eq!(c.limits.max_concurrent_requests, 3);
        assert_eq!(c.auth.users.len(), 1);
    }

    #[test]
    fn rejects_unknown_fields() {
        assert!(toml::from_str::<OriginConfig>("lisen = \"127.0.0.1:1\"").is_err());
    }
}
