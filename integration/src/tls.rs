//! A test PKI for the TLS tests: one cluster CA per test binary, certificates issued by
//! `shoal_tls` (as `shoal certs` does), and the harness's own clients made to trust the CA
//! (through the process-wide context every `shoal_tls::http_client()` uses).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use shoal_registry::identity::Role;
use shoal_tls::{Issued, Tls, TlsSettings};

/// The cluster CA of this test binary, in a directory that lives as long as the process.
pub struct TestPki {
    dir: PathBuf,
    ca: Issued,
}

static PKI: OnceLock<TestPki> = OnceLock::new();

/// The binary's PKI; the first call creates the CA and makes the harness trust it.
pub fn pki() -> &'static TestPki {
    PKI.get_or_init(|| {
        let dir =
            tempfile::Builder::new().prefix("shoal-pki-").tempdir().expect("create the PKI directory").keep();
        let ca = shoal_tls::new_ca("Shoal test CA", 2).expect("make a CA");
        std::fs::write(dir.join("ca.pem"), &ca.cert_pem).expect("write ca.pem");
        std::fs::write(dir.join("ca-key.pem"), &ca.key_pem).expect("write ca-key.pem");
        let settings = TlsSettings { ca: Some(dir.join("ca.pem")), ..TlsSettings::default() };
        let tls = Tls::load(&settings).expect("load the harness's TLS settings");
        assert!(shoal_tls::install(Arc::new(tls)), "the TLS context was set before the test PKI");
        TestPki { dir, ca }
    })
}

impl TestPki {
    /// The CA certificate (PEM).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Issue (or re-issue, replacing the files) `name`'s certificate for localhost and
    /// 127.0.0.1; returns the certificate and key paths.
    pub fn issue(&self, name: &str, role: Role) -> (PathBuf, PathBuf) {
        let issued = shoal_tls::issue(
            &self.ca,
            name,
            role,
            &["localhost".into()],
            &["127.0.0.1".parse().expect("an IP")],
            1,
        )
        .expect("issue a certificate");
        let (cert, key) = (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}-key.pem")));
        // The key first: a reload between the two writes sees a pair that does not match
        // and keeps the old one until the next check.
        write_atomically(&key, &issued.key_pem);
        write_atomically(&cert, &issued.cert_pem);
        (cert, key)
    }

    /// A TLS context holding `name`'s certificate with `role`, trusting the cluster CA: what
    /// a node or an operator of the cluster presents.
    pub fn identity(&self, name: &str, role: Role) -> Tls {
        let (cert, key) = self.issue(name, role);
        let settings = TlsSettings {
            cert: Some(cert),
            key: Some(key),
            cluster_ca: Some(self.ca_path()),
            ..TlsSettings::default()
        };
        Tls::load(&settings).expect("load a certificate of the test PKI")
    }

    /// An HTTP client presenting `name`'s certificate with `role`.
    pub fn client(&self, name: &str, role: Role) -> reqwest::Client {
        shoal_tls::http_client_with(&self.identity(name, role)).build().expect("build an HTTP client")
    }

    /// `--tls-cert`, `--tls-key` and `--cluster-ca` flags for a process named `name`.
    pub fn flags(&self, name: &str, role: Role) -> Vec<OsString> {
        let (cert, key) = self.issue(name, role);
        vec![
            "--tls-cert".into(),
            cert.into(),
            "--tls-key".into(),
            key.into(),
            "--cluster-ca".into(),
            self.ca_path().into(),
        ]
    }

    /// A `[tls]` config section with a certificate and no cluster CA (server TLS only); the
    /// test CA is trusted as any extra root (`ca`), as a public CA would be by the system's.
    pub fn server_toml(&self, name: &str, role: Role) -> String {
        let (cert, key) = self.issue(name, role);
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\nreload_seconds = 1\n",
            cert.display().to_string(),
            key.display().to_string(),
            self.ca_path().display().to_string()
        )
    }

    /// A `[tls]` config section for a process named `name`, checking its files every second.
    pub fn toml(&self, name: &str, role: Role) -> String {
        let (cert, key) = self.issue(name, role);
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\ncluster_ca = {:?}\nreload_seconds = 1\n",
            cert.display().to_string(),
            key.display().to_string(),
            self.ca_path().display().to_string()
        )
    }
}

fn write_atomically(path: &Path, contents: &str) {
    // A name of its own: tests issue certificates in parallel.
    let tmp = path.with_extension(format!("tmp-{}", crate::unique_token()));
    std::fs::write(&tmp, contents).expect("write a certificate file");
    std::fs::rename(&tmp, path).expect("rename a certificate file");
}
