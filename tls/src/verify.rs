//! The peer protocol's mutual TLS. Peers reach each other at addresses a tracker handed
//! out (a node's IP, which changes with the node and is rarely in its certificate), so a
//! peer's server certificate is checked for what matters there: a chain to the cluster CA,
//! valid now, with the right key usage, and a handshake signature by its key. Its names
//! are not checked. Each side's role must be one of the cluster's processes.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::reload::ReloadingKey;
use crate::{PeerTls, TlsError};

/// ALPN of the peer protocol, so a peer port is never mistaken for an HTTP one.
pub const PEER_ALPN: &[u8] = b"shoal-peer/1";

#[derive(Debug)]
struct ClusterServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match crate::identity::from_der(end_entity) {
            Some(id) if id.role.is_node() => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::General("peer certificate names no Shoal node role".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Connector and acceptor of the peer protocol.
pub fn peer_tls(
    key: Arc<ReloadingKey>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
) -> Result<PeerTls, TlsError> {
    let verifier = Arc::new(ClusterServerVerifier { roots: roots.clone(), provider: provider.clone() });
    let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(key.clone());
    client.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let server = crate::server_config(key, crate::ClientCerts::Required(roots), PEER_ALPN, provider)?;
    Ok(PeerTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        acceptor: tokio_rustls::TlsAcceptor::from(server),
    })
}
