//! A certificate and key that follow their files: cert-manager (or an operator) replaces
//! them, and new connections use the new pair without a restart. Connections already open
//! keep the pair they were made with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;

use crate::{pem, TlsError};

/// What identifies one version of a file without reading it.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The node's certificate and key, served to TLS clients and presented to TLS servers.
pub struct ReloadingKey {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// Never held across an await or while reading files: swapped in one step.
    current: RwLock<Loaded>,
}

struct Loaded {
    key: Arc<CertifiedKey>,
    stamps: (Stamp, Stamp),
}

impl std::fmt::Debug for ReloadingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingKey").field("cert", &self.cert_path).field("key", &self.key_path).finish()
    }
}

fn load_pair(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = pem::certs(cert)?;
    let der = pem::key(key)?;
    let signer = provider.key_provider.load_private_key(der)?;
    let pair = CertifiedKey::new(chain, signer);
    // A key that does not match its certificate would fail every handshake: refuse it here.
    pair.keys_match().map_err(|e| TlsError::Config(format!("{}: {e}", cert.display())))?;
    Ok(pair)
}

impl ReloadingKey {
    /// Load the pair once (blocking).
    pub fn load(
        cert: &Path,
        key: &Path,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<ReloadingKey, TlsError> {
        let stamps = (stamp(cert), stamp(key));
        let pair = load_pair(cert, key, &provider)?;
        Ok(ReloadingKey {
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            provider,
            current: RwLock::new(Loaded { key: Arc::new(pair), stamps }),
        })
    }

    /// The pair new connections use.
    pub fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(l) => l.key.clone(),
            Err(poisoned) => poisoned.into_inner().key.clone(),
        }
    }

    /// Reload if either file changed since the last load (blocking). A pair that does not
    /// load (a half-written file, a key for another certificate) is skipped: the old pair
    /// stays until the next check finds a good one. Returns whether a new pair is in use.
    pub fn reload_if_changed(&self) -> bool {
        let stamps = (stamp(&self.cert_path), stamp(&self.key_path));
        let unchanged = match self.current.read() {
            Ok(l) => l.stamps == stamps,
            Err(poisoned) => poisoned.into_inner().stamps == stamps,
        };
        if unchanged {
            return false;
        }
        match load_pair(&self.cert_path, &self.key_path, &self.provider) {
            Ok(pair) => {
                let mut guard = match self.current.write() {
                    Ok(g) => g,
                    Err(poisoned) => poisoned.into_inner(),
                };
                *guard = Loaded { key: Arc::new(pair), stamps };
                tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate changed but does not load; keeping the old one");
                false
            }
        }
    }

    /// Check the files every `interval` on the blocking pool, for as long as the runtime runs.
    pub fn spawn_watch(self: Arc<Self>, interval: Duration) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let this = self.clone();
                let _ = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
            }
        });
    }
}

impl rustls::server::ResolvesServerCert for ReloadingKey {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for ReloadingKey {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
