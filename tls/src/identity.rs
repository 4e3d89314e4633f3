//! A verified client certificate's subject as a [`TransportIdentity`]: the common name is
//! the node's name, the organizational unit its role (`shoal certs` writes both).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use shoal_registry::identity::{Role, TransportIdentity};

/// The identity in an end-entity certificate, if it names one of Shoal's roles.
pub fn from_der(cert: &CertificateDer<'_>) -> Option<TransportIdentity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = parsed.subject();
    let role = subject.iter_organizational_unit().find_map(|u| u.as_str().ok().and_then(Role::from_unit))?;
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_string();
    Some(TransportIdentity { name, role })
}

/// The identity a TLS server connection's client proved. Only certificates the cluster CA
/// signed get this far: the server's verifier checked the chain during the handshake.
pub fn identity_of(conn: &rustls::ServerConnection) -> Option<TransportIdentity> {
    from_der(conn.peer_certificates()?.first()?)
}

/// When the certificate a TLS server connection's client presented stops being valid: the
/// identity it proved is good until then, and a connection kept busy outlives it.
pub fn identity_expires(conn: &rustls::ServerConnection) -> Option<SystemTime> {
    validity(conn.peer_certificates()?.first()?).map(|(_, until)| until)
}

/// When the certificate a TLS client connection's server presented stops being valid.
pub fn server_expires(conn: &rustls::ClientConnection) -> Option<SystemTime> {
    validity(conn.peer_certificates()?.first()?).map(|(_, until)| until)
}

/// A certificate's validity period: not before, not after.
pub fn validity(cert: &CertificateDer<'_>) -> Option<(SystemTime, SystemTime)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).ok()?;
        Some(UNIX_EPOCH + Duration::from_secs(secs))
    };
    Some((at(parsed.validity().not_before)?, at(parsed.validity().not_after)?))
}
