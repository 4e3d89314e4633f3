//! TLS for every Shoal listener and client.
//!
//! One process is one node, so one [`Tls`] context per process holds everything: the
//! node's certificate and key (served on its listeners, presented as its client identity,
//! reloaded when the files change so cert-manager can rotate them), the CAs outgoing
//! connections trust besides the system's roots, and the cluster CA whose certificates
//! identify the cluster's own processes ([`shoal_registry::identity`]). The binary installs
//! it once at start ([`install`]); every HTTP client in the workspace comes from
//! [`http_client`], and the peer protocol takes its connector and acceptor from
//! [`Tls::peer`].

mod buffered;
mod certs;
mod config;
mod identity;
mod pem;
mod reload;
mod verify;

use std::sync::{Arc, OnceLock};

use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use shoal_registry::identity::TransportIdentity;

pub use buffered::{buffered, Buffered, TLS_HANDSHAKE_READ_BUFFER, TLS_READ_BUFFER};
pub use certs::{issue, issue_for, new_ca, CertsError, Issued};
pub use config::{TlsSettings, DEFAULT_RELOAD_INTERVAL};
pub use identity::{identity_expires, identity_of, server_expires, validity};
pub use reload::ReloadingKey;
pub use rustls::pki_types::ServerName;
pub use tokio_rustls::{client::TlsStream as ClientTlsStream, server::TlsStream as ServerTlsStream};
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// What can go wrong loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {what}")]
    Pem { path: String, what: String },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{0}")]
    Config(String),
}

/// The TLS context of one process.
pub struct Tls {
    settings: TlsSettings,
    /// This node's certificate and key, when it has them.
    key: Option<Arc<ReloadingKey>>,
    /// The cluster CA, when node identity is on.
    cluster_roots: Option<Arc<RootCertStore>>,
    /// For outgoing HTTPS: system roots, `ca` and the cluster CA; presents the node's key.
    client: Arc<rustls::ClientConfig>,
    /// For the HTTP listeners: the node's key; asks for (does not require) a client
    /// certificate from the cluster CA.
    server: Option<Arc<rustls::ServerConfig>>,
    peer: Option<PeerTls>,
}

/// The peer protocol's mutual TLS: both sides present a certificate the cluster CA signed.
#[derive(Clone)]
pub struct PeerTls {
    pub connector: TlsConnector,
    pub acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("settings", &self.settings)
            .field("listeners", &self.server.is_some())
            .field("peer", &self.peer.is_some())
            .finish()
    }
}

/// ring's suites, AES-128-GCM first: every byte of a blob goes through the cipher twice
/// (seeder and downloader), and with AES instructions 128-bit keys take 10 rounds to
/// 256-bit keys' 14, at a security margin far beyond a layer's lifetime. Both ends are
/// rustls with this order, and a rustls server follows the client's preference.
/// ALPN of Shoal's HTTP listeners and clients.
const HTTP_ALPN: &[u8] = b"http/1.1";

/// What a server asks of its clients' certificates.
enum ClientCerts {
    /// Nothing.
    None,
    /// One the cluster CA signed, if the client has one (registry clients have none).
    Optional(Arc<RootCertStore>),
    /// One the cluster CA signed, or no handshake.
    Required(Arc<RootCertStore>),
}

/// The one way a server configuration is made: the node's reloading key, `clients`, `alpn`.
fn server_config(
    key: Arc<ReloadingKey>,
    clients: ClientCerts,
    alpn: &[u8],
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let verifier = |roots: Arc<RootCertStore>| {
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
    };
    let verifies_clients = !matches!(clients, ClientCerts::None);
    let builder = match clients {
        ClientCerts::None => builder.with_no_client_auth(),
        ClientCerts::Optional(roots) => {
            builder.with_client_cert_verifier(verifier(roots).allow_unauthenticated().build()?)
        }
        ClientCerts::Required(roots) => builder.with_client_cert_verifier(verifier(roots).build()?),
    };
    let mut config = builder.with_cert_resolver(key);
    config.alpn_protocols = vec![alpn.to_vec()];
    if verifies_clients {
        // A resumed TLS 1.3 session carries the client certificate of its first handshake
        // unchecked, and resumption issues new tickets: a node could keep its role past its
        // certificate's expiry, the only revocation there is. Every connection that may
        // present a certificate makes a full handshake.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    let fast = rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
    provider.cipher_suites.sort_by_key(|s| s.suite() != fast);
    Arc::new(provider)
}

/// The system's CA certificates and the extra ones `settings.ca` names: what connections
/// outside the cluster trust.
fn public_roots(settings: &TlsSettings) -> Result<RootCertStore, TlsError> {
    let mut trusted = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = trusted.add_parsable_certificates(native.certs);
    tracing::debug!(added, errors = native.errors.len(), "system CA certificates");
    for path in settings.ca.iter() {
        trusted.add_parsable_certificates(pem::certs(path)?);
    }
    Ok(trusted)
}

impl Tls {
    /// Plain listeners, plain peer protocol; outgoing HTTPS trusts the system's roots.
    pub fn plain() -> Tls {
        // Without files to read, loading cannot fail.
        match Tls::load(&TlsSettings::default()) {
            Ok(tls) => tls,
            Err(e) => unreachable!("plain TLS settings failed to load: {e}"),
        }
    }

    /// Load the files `settings` names (blocking: call before the runtime serves, or on a
    /// blocking thread).
    pub fn load(settings: &TlsSettings) -> Result<Tls, TlsError> {
        settings.check()?;
        let provider = provider();
        let key = match (&settings.cert, &settings.key) {
            (Some(cert), Some(key)) => Some(Arc::new(ReloadingKey::load(cert, key, provider.clone())?)),
            _ => None,
        };
        let cluster_roots = match &settings.cluster_ca {
            Some(path) => Some(Arc::new(pem::roots(path)?)),
            None => None,
        };
        if let (Some(k), Some(roots)) = (&key, &cluster_roots) {
            k.check_against(roots.clone());
        }
        let mut trusted = public_roots(settings)?;
        if let Some(roots) = &cluster_roots {
            trusted.roots.extend(roots.roots.iter().cloned());
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(trusted);
        let mut client = match &key {
            Some(k) => builder.with_client_cert_resolver(k.clone()),
            None => builder.with_no_client_auth(),
        };
        client.alpn_protocols = vec![HTTP_ALPN.to_vec()];
        let server = match &key {
            None => None,
            Some(k) => {
                let clients = match &cluster_roots {
                    Some(roots) => ClientCerts::Optional(roots.clone()),
                    None => ClientCerts::None,
                };
                Some(server_config(k.clone(), clients, HTTP_ALPN, provider.clone())?)
            }
        };
        let peer = match (&key, &cluster_roots) {
            (Some(k), Some(roots)) if settings.peer_enabled() => {
                Some(verify::peer_tls(k.clone(), roots.clone(), provider.clone())?)
            }
            _ => None,
        };
        Ok(Tls { settings: settings.clone(), key, cluster_roots, client: Arc::new(client), server, peer })
    }

    /// The settings this context was loaded from.
    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// The acceptor for HTTP listeners, when this node has a certificate.
    pub fn acceptor(&self) -> Option<TlsAcceptor> {
        self.server.clone().map(TlsAcceptor::from)
    }

    /// The acceptor for a listener only the cluster's processes may use (the origins'
    /// internal listener): a client certificate the cluster CA signed is required at the
    /// handshake. `None` without a certificate or a cluster CA.
    pub fn mutual_acceptor(&self) -> Result<Option<TlsAcceptor>, TlsError> {
        let (Some(key), Some(roots)) = (&self.key, &self.cluster_roots) else { return Ok(None) };
        let config = server_config(key.clone(), ClientCerts::Required(roots.clone()), HTTP_ALPN, provider())?;
        Ok(Some(TlsAcceptor::from(config)))
    }

    /// Check the certificate files now (blocking); whether a new pair is in use.
    pub fn reload_now(&self) -> bool {
        self.key.as_ref().is_some_and(|k| k.reload_if_changed())
    }

    /// The peer protocol's mutual TLS, when on.
    pub fn peer(&self) -> Option<&PeerTls> {
        self.peer.as_ref()
    }

    /// Whether clients can prove node identity to this process's listeners.
    pub fn verifies_nodes(&self) -> bool {
        self.cluster_roots.is_some() && self.server.is_some()
    }

    /// When this node's own certificate stops being valid (the one in use now).
    pub fn certificate_expires(&self) -> Option<std::time::SystemTime> {
        let key = self.key.as_ref()?.current();
        identity::validity(key.cert.first()?).map(|(_, until)| until)
    }

    /// This node's own identity, read from its certificate.
    pub fn own_identity(&self) -> Option<TransportIdentity> {
        let key = self.key.as_ref()?.current();
        identity::from_der(key.cert.first()?)
    }

    /// The rustls client configuration every outgoing HTTPS connection uses.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }

    /// Reload the certificate and key whenever their files change, until the runtime stops.
    pub fn spawn_reload(&self) {
        if let Some(key) = &self.key {
            key.clone().spawn_watch(self.settings.reload_interval());
        }
    }
}

static CURRENT: OnceLock<Arc<Tls>> = OnceLock::new();

/// Make `tls` this process's context. Only the first call counts; later ones return false.
pub fn install(tls: Arc<Tls>) -> bool {
    CURRENT.set(tls).is_ok()
}

/// This process's context: the installed one, or plain.
pub fn current() -> Arc<Tls> {
    CURRENT.get_or_init(|| Arc::new(Tls::plain())).clone()
}

/// How long a client keeps an idle connection for reuse: well below how long Shoal's servers
/// keep one open (30 s, their `header_read_timeout`). A node asks its origins for things
/// every 30 s, and over a busy link a server's close arrives late: a request sent on a
/// connection the server was closing failed with "connection closed before message
/// completed" (on 4 to 13 of 20 agents in each 20-host fleet run). A new connection costs a
/// round trip.
pub const POOL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// The one HTTP client builder of the workspace: TLS from this process's context (trusted
/// roots, the node's client certificate), HTTP/1.1, no proxy from the environment (every
/// peer of a Shoal process is named in its configuration), idle connections dropped after
/// [`POOL_IDLE_TIMEOUT`], a read that met a connection closing under it sent again
/// ([`retry_reads_on_closed_connections`]), and no redirect followed: no Shoal server sends
/// one, and a followed redirect keeps headers such as the client's upstream credentials
/// (reqwest drops only `Authorization` and cookies, and only across hosts). Callers add
/// their timeouts. Upstream registries, whose blobs redirect to object storage, have their
/// own client ([`upstream_http_client`]).
pub fn http_client() -> reqwest::ClientBuilder {
    http_client_with(&current())
}

/// Why [`read_body`] gave no body.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the answer: {0}")]
    Read(#[from] reqwest::Error),
}

/// An answer's body of at most `limit` bytes: beyond that [`BodyError::TooLarge`], or, with
/// `truncate`, the first `limit` bytes (the rest is not read). Every Shoal client reads
/// answers through it, so a peer that sends more than any real answer (or a proxy that
/// ignores `Range`) cannot fill the reader's memory. The client's timeouts bound the time.
pub async fn read_body(
    mut resp: reqwest::Response,
    limit: usize,
    truncate: bool,
) -> Result<bytes::Bytes, BodyError> {
    if !truncate && resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge(limit));
    }
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await? {
        if buf.len() + chunk.len() > limit {
            if truncate {
                buf.extend_from_slice(&chunk[..limit - buf.len()]);
                break;
            }
            return Err(BodyError::TooLarge(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// [`http_client`] with an explicit context (tests, tools).
pub fn http_client_with(tls: &Tls) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_preconfigured_tls((*tls.client).clone())
        .no_proxy()
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .retry(retry_reads_on_closed_connections())
        .redirect(reqwest::redirect::Policy::none())
}

/// How many more times a read that met a closing connection is sent (see
/// [`retry_reads_on_closed_connections`]).
pub const CLOSED_CONNECTION_RETRIES: u32 = 3;

/// Any host: the retry policy below applies to every server the client talks to. reqwest
/// builds a scoped policy only from a host to match (its scope trait is private), so this
/// host matches every name.
struct AnyHost;

impl PartialEq<&str> for AnyHost {
    fn eq(&self, _: &&str) -> bool {
        true
    }
}

/// A GET or HEAD that failed because its connection closed before the answer came (the
/// server closed an idle connection just as the request went out on it: a server with a
/// shorter keep-alive than [`POOL_IDLE_TIMEOUT`], or one restarting) is sent again, as Go's
/// HTTP client does. Reads only: a write may have been applied. The pool may hand the retry
/// another connection the server closed in the same instant (with one retry, 2 of 100 reads
/// still failed in `src/http_server.rs`'s test; with three, none in 7 runs), so up to
/// [`CLOSED_CONNECTION_RETRIES`]; never more, so no retry storm can follow.
fn retry_reads_on_closed_connections() -> reqwest::retry::Builder {
    let retries = CLOSED_CONNECTION_RETRIES;
    reqwest::retry::for_host(AnyHost).no_budget().max_retries_per_request(retries).classify_fn(|attempt| {
        let read = matches!(*attempt.method(), reqwest::Method::GET | reqwest::Method::HEAD);
        if read && attempt.error().is_some_and(closed_under_request) {
            attempt.retryable()
        } else {
            attempt.success()
        }
    })
}

/// Whether an error (or one of its sources) is a connection that closed or was reset before
/// the answer arrived.
fn closed_under_request(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_incomplete_message) {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// A builder for clients of registries outside the cluster (pull-through upstreams): the
/// system's roots, `--tls-ca`, and `extra_ca` (a PEM file) trusted; no client certificate
/// (a node's identity is for its cluster); proxies from the environment (`HTTPS_PROXY`,
/// `NO_PROXY`), which the cluster's own client ignores; reads that meet a connection closing
/// under them sent again as by [`http_client`] (an upstream's keep-alive is its own, often
/// shorter than the pool's). Reads files: call at start.
pub fn upstream_http_client(extra_ca: Option<&std::path::Path>) -> Result<reqwest::ClientBuilder, TlsError> {
    let mut roots = public_roots(current().settings())?;
    if let Some(path) = extra_ca {
        let (added, _) = roots.add_parsable_certificates(pem::certs(path)?);
        if added == 0 {
            return Err(TlsError::Config(format!("{}: no CA certificate in it", path.display())));
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![HTTP_ALPN.to_vec()];
    Ok(reqwest::Client::builder().use_preconfigured_tls(config).retry(retry_reads_on_closed_connections()))
}

/// The certificates of a PEM file (for tests and tools).
pub fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    pem::certs(path)
}

/// The URL scheme of this process's listeners, and so of its cluster's: every origin of a
/// cluster serves TLS or none does.
pub fn scheme() -> &'static str {
    if current().settings().serves_tls() {
        "https"
    } else {
        "http"
    }
}
