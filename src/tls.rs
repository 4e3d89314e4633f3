//! The `--tls-*` flags every role takes, and installing the process's TLS context from
//! them and its config file's `[tls]` section.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use shoal_tls::{Tls, TlsSettings};

/// TLS flags; each overrides the config file's `[tls]` key of the same name.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This node's certificate chain (PEM): every listener speaks TLS, and it is the client
    /// certificate of outgoing connections; reloaded when the file changes
    #[arg(long = "tls-cert", env = "SHOAL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM)
    #[arg(long = "tls-key", env = "SHOAL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A CA (PEM) that outgoing connections trust besides the system's roots
    #[arg(long = "tls-ca", env = "SHOAL_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The cluster CA (PEM): certificates it signed identify the cluster's own processes;
    /// with --tls-cert the peer protocol runs over mutual TLS
    #[arg(long = "cluster-ca", env = "SHOAL_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,
}

impl TlsArgs {
    pub fn settings(&self) -> TlsSettings {
        TlsSettings {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
            cluster_ca: self.cluster_ca.clone(),
            ..TlsSettings::default()
        }
    }
}

/// Load `settings` and make them this process's TLS context, reloading the certificate
/// when its files change. Call once, before any listener or client is made.
pub fn install(settings: &TlsSettings) -> anyhow::Result<Arc<Tls>> {
    let tls = Arc::new(Tls::load(settings).context("loading TLS settings")?);
    if !shoal_tls::install(tls.clone()) {
        anyhow::bail!("the TLS context was already set");
    }
    tls.spawn_reload();
    if settings.serves_tls() {
        tracing::info!(
            cert = ?settings.cert,
            node_identity = tls.verifies_nodes(),
            peer_tls = tls.peer().is_some(),
            identity = ?tls.own_identity().map(|i| i.to_string()),
            "TLS on"
        );
    }
    Ok(tls)
}
