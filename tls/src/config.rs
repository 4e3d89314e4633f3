//! The `[tls]` settings every component takes (and their `--tls-*` flags).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::TlsError;

/// Default time between checks of the certificate and key files for a change.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);
/// Longest accepted reload period (a day): the reload timer overflowed on one near
/// `u64::MAX` seconds and its task died, silently ending certificate reloads.
pub const MAX_RELOAD_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Where a process finds its TLS material. All optional: without `cert` and `key` its
/// listeners speak plain HTTP.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// This node's certificate chain (PEM): served on every listener and presented as its
    /// client certificate.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// CA certificates (PEM) outgoing connections trust besides the system's roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The cluster CA (PEM): client certificates it signed identify the cluster's own
    /// processes, outgoing connections trust it, and with `cert` and `key` it turns on
    /// mutual TLS in the peer protocol.
    #[serde(default)]
    pub cluster_ca: Option<PathBuf>,
    /// Run the peer protocol over mutual TLS (default: on when `cert`, `key` and
    /// `cluster_ca` are all set). Every node of a cluster must agree.
    #[serde(default)]
    pub peer: Option<bool>,
    /// Seconds between checks of `cert` and `key` for a change (default 10).
    #[serde(default)]
    pub reload_seconds: Option<u64>,
}

impl TlsSettings {
    /// Settings that can be loaded: a certificate needs its key and the other way round,
    /// and peer TLS needs all three files.
    pub fn check(&self) -> Result<(), TlsError> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(TlsError::Config("tls: cert and key go together; set both or neither".into()));
        }
        let complete = self.cert.is_some() && self.cluster_ca.is_some();
        if self.peer == Some(true) && !complete {
            return Err(TlsError::Config("tls: peer = true needs cert, key and cluster_ca".into()));
        }
        Ok(())
    }

    /// Whether the peer protocol runs over mutual TLS.
    pub fn peer_enabled(&self) -> bool {
        let complete = self.cert.is_some() && self.key.is_some() && self.cluster_ca.is_some();
        self.peer.unwrap_or(complete) && complete
    }

    /// Whether this process's listeners speak TLS.
    pub fn serves_tls(&self) -> bool {
        self.cert.is_some()
    }

    pub fn reload_interval(&self) -> Duration {
        self.reload_seconds
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_RELOAD_INTERVAL)
            .clamp(Duration::from_secs(1), MAX_RELOAD_INTERVAL)
    }

    /// `self`, with every field `other` sets taken from `other` (command-line flags over
    /// the config file).
    pub fn overridden_by(mut self, other: &TlsSettings) -> TlsSettings {
        if other.cert.is_some() {
            self.cert = other.cert.clone();
        }
        if other.key.is_some() {
            self.key = other.key.clone();
        }
        if other.ca.is_some() {
            self.ca = other.ca.clone();
        }
        if other.cluster_ca.is_some() {
            self.cluster_ca = other.cluster_ca.clone();
        }
        if other.peer.is_some() {
            self.peer = other.peer;
        }
        if other.reload_seconds.is_some() {
            self.reload_seconds = other.reload_seconds;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reload_period_is_between_a_second_and_a_day() {
        let at = |s| TlsSettings { reload_seconds: Some(s), ..Default::default() }.reload_interval();
        assert_eq!(at(0), Duration::from_secs(1));
        assert_eq!(at(30), Duration::from_secs(30));
        assert_eq!(at(u64::MAX), MAX_RELOAD_INTERVAL);
        assert_eq!(TlsSettings::default().reload_interval(), DEFAULT_RELOAD_INTERVAL);
    }

    #[test]
    fn cert_needs_key_and_peer_needs_everything() {
        let cert = TlsSettings { cert: Some("c".into()), ..Default::default() };
        assert!(cert.check().is_err());
        let both = TlsSettings { key: Some("k".into()), ..cert };
        assert!(both.check().is_ok());
        assert!(!both.peer_enabled());
        let forced = TlsSettings { peer: Some(true), ..both.clone() };
        assert!(forced.check().is_err());
        let full = TlsSettings { cluster_ca: Some("ca".into()), ..both };
        assert!(full.peer_enabled());
        assert!(!TlsSettings { peer: Some(false), ..full }.peer_enabled());
    }

    #[test]
    fn flags_override_the_file() {
        let file = TlsSettings { cert: Some("a".into()), key: Some("b".into()), ..Default::default() };
        let flags = TlsSettings { cert: Some("x".into()), ..Default::default() };
        let merged = file.overridden_by(&flags);
        assert_eq!(merged.cert, Some("x".into()));
        assert_eq!(merged.key, Some("b".into()));
    }
}
