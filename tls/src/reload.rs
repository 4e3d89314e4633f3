//! A certificate and key that follow their files: cert-manager (or an operator) replaces
//! them, and new connections use the new pair without a restart. Connections already open
//! keep the pair they were made with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;

use crate::{pem, TlsError};

/// Least time between two warnings that the certificate in use is expiring or expired.
pub const EXPIRY_WARNING_EVERY: Duration = Duration::from_secs(3600);

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
    /// The files' stamps when a pair was last held back (warned once).
    held_back: std::sync::Mutex<Option<(Stamp, Stamp)>>,
    /// The cluster CA, once the node has one (see [`ReloadingKey::check_against`]).
    cluster: std::sync::OnceLock<Arc<rustls::RootCertStore>>,
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
            held_back: std::sync::Mutex::new(None),
            cluster: std::sync::OnceLock::new(),
        })
    }

    /// Hold back a new pair the cluster would refuse while the one in use is accepted: one
    /// that does not chain to `roots` (the cluster CA), or names another role (or none). An
    /// issuer changed on an upgrade (cert-manager issues at once, pods are not restarted) put
    /// such a pair in place within 10 s, and every mutual handshake across the cluster failed.
    pub fn check_against(&self, roots: Arc<rustls::RootCertStore>) {
        let _ = self.cluster.set(roots);
    }

    /// Why the cluster would refuse `pair` at `now` (`None`: it accepts it, or there is no
    /// cluster CA to judge by).
    fn refused_by_cluster(&self, pair: &CertifiedKey, now: SystemTime) -> Option<String> {
        let roots = self.cluster.get()?;
        let leaf = pair.cert.first()?;
        let at =
            rustls::pki_types::UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).ok()?);
        let chained = rustls::server::ParsedCertificate::try_from(leaf).and_then(|parsed| {
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                roots,
                &pair.cert[1..],
                at,
                self.provider.signature_verification_algorithms.all,
            )
        });
        if let Err(e) = chained {
            return Some(format!("it does not chain to the cluster CA ({e})"));
        }
        let role =
            |key: &CertifiedKey| key.cert.first().and_then(crate::identity::from_der).map(|id| id.role);
        let (was, is) = (role(&self.current()), role(pair));
        (was != is).then(|| format!("it names the role {is:?}, the certificate in use {was:?}"))
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
    /// stays until the next check finds a good one. So is a pair outside its validity while
    /// the one in use is inside it (a rolled-back Secret, a restored backup, a certificate
    /// from a CA whose clock runs ahead): every handshake with it would fail. Returns whether
    /// a new pair is in use.
    pub fn reload_if_changed(&self) -> bool {
        self.reload_at(SystemTime::now())
    }

    /// [`reload_if_changed`](Self::reload_if_changed) with `now` as the time validity is
    /// judged at.
    fn reload_at(&self, now: SystemTime) -> bool {
        let stamps = (stamp(&self.cert_path), stamp(&self.key_path));
        let unchanged = match self.current.read() {
            Ok(l) => l.stamps == stamps,
            Err(poisoned) => poisoned.into_inner().stamps == stamps,
        };
        if unchanged {
            return false;
        }
        let loaded = load_pair(&self.cert_path, &self.key_path, &self.provider);
        let held_back = match &loaded {
            Ok(pair) if !valid_at(pair, now) && valid_at(&self.current(), now) => {
                Some("it is outside its validity".to_string())
            }
            // Only while the pair in use is accepted: no worse than it otherwise.
            Ok(pair) => self
                .refused_by_cluster(pair, now)
                .filter(|_| self.refused_by_cluster(&self.current(), now).is_none()),
            Err(_) => None,
        };
        match loaded {
            Ok(_) if held_back.is_some() => {
                // Looked at again on every check (it may become acceptable), told once.
                let mut held = self.held_back.lock().unwrap_or_else(|p| p.into_inner());
                if *held != Some(stamps) {
                    *held = Some(stamps);
                    tracing::warn!(
                        cert = %self.cert_path.display(),
                        reason = held_back.as_deref().unwrap_or_default(),
                        "TLS certificate changed to one every handshake would fail with; keeping the old one"
                    );
                }
                false
            }
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

    /// Check the files every `interval` on the blocking pool, for as long as the runtime runs,
    /// and warn (at most every [`EXPIRY_WARNING_EVERY`]) while the certificate in use is
    /// outside its validity or in the last quarter of it: a renewal that stopped (cert-manager
    /// down, `shoal up` left running) shows before every handshake with it fails at once.
    pub fn spawn_watch(self: Arc<Self>, interval: Duration) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut warned: Option<std::time::Instant> = None;
            loop {
                tick.tick().await;
                let this = self.clone();
                let _ = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
                if warned.is_some_and(|at| at.elapsed() < EXPIRY_WARNING_EVERY) {
                    continue;
                }
                if let Some(problem) = self.validity_problem(SystemTime::now()) {
                    tracing::warn!(cert = %self.cert_path.display(), "{problem}");
                    warned = Some(std::time::Instant::now());
                }
            }
        });
    }

    /// What is wrong with the validity of the certificate in use at `now`, if anything:
    /// expired, not yet valid, or in the last quarter of its validity (renewals come at a
    /// third left: one is overdue).
    pub fn validity_problem(&self, now: SystemTime) -> Option<String> {
        let key = self.current();
        let (from, until) = crate::identity::validity(key.cert.first()?)?;
        let secs = |d: Duration| d.as_secs();
        if now >= until {
            return Some(format!(
                "TLS certificate expired {} s ago: every handshake with it fails",
                secs(now.duration_since(until).unwrap_or_default())
            ));
        }
        if now < from {
            return Some(format!(
                "TLS certificate is not valid for another {} s (check the clock)",
                secs(from.duration_since(now).unwrap_or_default())
            ));
        }
        let life = until.duration_since(from).unwrap_or_default();
        let left = until.duration_since(now).unwrap_or_default();
        // cert-manager (and `shoal up`) renew at a third left: a quarter is a renewal missed.
        (left < life / 4)
            .then(|| format!("TLS certificate expires in {} s and has not been renewed", secs(left)))
    }
}

/// Whether the pair's certificate is within its validity at `now` (one whose dates cannot be
/// read counts as valid: the handshake decides).
fn valid_at(pair: &CertifiedKey, now: SystemTime) -> bool {
    let Some((from, until)) = pair.cert.first().and_then(crate::identity::validity) else { return true };
    from <= now && now < until
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

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_registry::identity::Role;

    /// Quiet through the first two thirds of a certificate's validity, then warned about:
    /// renewal due, then expired; and before its start.
    #[test]
    fn the_validity_problem_is_told_in_the_last_third_and_after() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::new_ca("test", 365).unwrap();
        let issued = crate::issue(&ca, "n", Role::Agent, &["localhost".into()], &[], 30).unwrap();
        let (cert, key) = (dir.path().join("n.pem"), dir.path().join("n-key.pem"));
        std::fs::write(&cert, &issued.cert_pem).unwrap();
        std::fs::write(&key, &issued.key_pem).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = ReloadingKey::load(&cert, &key, provider).unwrap();
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        assert_eq!(loaded.validity_problem(now), None);
        assert_eq!(loaded.validity_problem(now + day * 15), None);
        assert!(loaded.validity_problem(now + day * 25).is_some_and(|p| p.contains("has not been renewed")));
        assert!(loaded.validity_problem(now + day * 31).is_some_and(|p| p.contains("expired")));
        assert!(loaded.validity_problem(now - day).is_some_and(|p| p.contains("not valid for another")));
    }

    /// With a cluster CA, a pair from another CA, or naming another role, is not put in
    /// place of one the cluster accepts; a pair from the cluster CA with the same role is.
    #[test]
    fn a_pair_the_cluster_would_refuse_does_not_replace_one_it_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, other_ca) = (crate::new_ca("cluster", 365).unwrap(), crate::new_ca("other", 365).unwrap());
        let (cert, key) = (dir.path().join("n.pem"), dir.path().join("n-key.pem"));
        let write = |ca: &crate::Issued, role: Role, name: &str| {
            let issued = crate::issue(ca, name, role, &["localhost".into()], &[], 30).unwrap();
            std::fs::write(&cert, &issued.cert_pem).unwrap();
            std::fs::write(&key, &issued.key_pem).unwrap();
        };
        write(&ca, Role::Agent, "first");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = ReloadingKey::load(&cert, &key, provider).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.cert_pem).unwrap();
        loaded.check_against(Arc::new(crate::pem::roots(&ca_file).unwrap()));
        let first = loaded.current();
        let now = SystemTime::now();
        write(&other_ca, Role::Agent, "other issuer");
        assert!(!loaded.reload_at(now), "a pair from another CA was put in use");
        assert!(Arc::ptr_eq(&loaded.current(), &first));
        write(&ca, Role::Origin, "other role");
        assert!(!loaded.reload_at(now), "a pair naming another role was put in use");
        assert!(Arc::ptr_eq(&loaded.current(), &first));
        write(&ca, Role::Agent, "renewed");
        assert!(loaded.reload_at(now), "a renewed pair is put in use");
        assert!(!Arc::ptr_eq(&loaded.current(), &first));
    }

    /// A pair that expired (here: judged two days on, a one-day certificate replacing a
    /// 30-day one) is not put in place of one that is valid; a valid one that follows is,
    /// and an expired one replaces one that expired too (it is no worse).
    #[test]
    fn an_expired_pair_does_not_replace_a_valid_one() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::new_ca("test", 365).unwrap();
        let (cert, key) = (dir.path().join("n.pem"), dir.path().join("n-key.pem"));
        let write = |days: u32, name: &str| {
            let issued = crate::issue(&ca, name, Role::Agent, &["localhost".into()], &[], days).unwrap();
            std::fs::write(&cert, &issued.cert_pem).unwrap();
            std::fs::write(&key, &issued.key_pem).unwrap();
            issued.cert_pem
        };
        write(30, "first");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = ReloadingKey::load(&cert, &key, provider).unwrap();
        let first = loaded.current();
        let later = SystemTime::now() + Duration::from_secs(2 * 86_400);
        write(1, "short-lived");
        for _ in 0..2 {
            assert!(!loaded.reload_at(later), "an expired pair was put in use");
            assert!(Arc::ptr_eq(&loaded.current(), &first));
        }
        write(60, "renewed");
        assert!(loaded.reload_at(later), "a valid pair is put in use");
        let renewed = loaded.current();
        // Both outside their validity: the newer files win.
        let much_later = SystemTime::now() + Duration::from_secs(400 * 86_400);
        write(1, "also expired");
        assert!(loaded.reload_at(much_later));
        assert!(!Arc::ptr_eq(&loaded.current(), &renewed));
    }
}
