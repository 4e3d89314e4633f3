//! A cluster CA and the certificates it issues (`shoal certs`, `shoal up --tls`, the
//! tests). A node certificate names its node in the common name and its role in the
//! organizational unit (see [`shoal_registry::identity::Role`]) and is good for both server
//! and client authentication, since every Shoal process is both.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use shoal_registry::identity::Role;

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Validity starts a little in the past, so a node whose clock is slightly behind the
/// issuer's accepts a fresh certificate.
const BACKDATE: time::Duration = time::Duration::hours(1);

fn validity(params: &mut CertificateParams, days: u32) -> Result<(), CertsError> {
    if days == 0 {
        return Err(CertsError::Invalid("a certificate must be valid for at least one day".into()));
    }
    validity_for(params, std::time::Duration::from_secs(u64::from(days) * 86_400))
}

fn validity_for(params: &mut CertificateParams, life: std::time::Duration) -> Result<(), CertsError> {
    let now = time::OffsetDateTime::now_utc();
    let life = time::Duration::try_from(life).map_err(|_| CertsError::Invalid("validity too long".into()))?;
    params.not_before = now - BACKDATE;
    params.not_after = now + life;
    let serial: [u8; 16] = rand::random();
    // Positive, as X.509 requires.
    let mut serial = serial.to_vec();
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(())
}

/// A new self-signed CA named `name`, valid for `days`.
pub fn new_ca(name: &str, days: u32) -> Result<Issued, CertsError> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days)?;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// A certificate for node (or operator) `name` with `role`, signed by the CA, valid for
/// `days`, for the DNS names and IP addresses given (its server names).
pub fn issue(
    ca: &Issued,
    name: &str,
    role: Role,
    dns: &[String],
    ips: &[IpAddr],
    days: u32,
) -> Result<Issued, CertsError> {
    if days == 0 {
        return Err(CertsError::Invalid("a certificate must be valid for at least one day".into()));
    }
    issue_for(ca, name, role, dns, ips, std::time::Duration::from_secs(u64::from(days) * 86_400))
}

/// The CA can sign: its key is the one its certificate names (signed with another key, a
/// certificate failed every handshake), and it has not expired. Returns when it expires: a
/// certificate it signs ends then at the latest (clients that check the root's expiry,
/// containerd's Go among them, fail once it passes, whatever the leaf says).
fn check_ca(ca: &Issued, ca_key: &KeyPair) -> Result<time::OffsetDateTime, CertsError> {
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem.as_bytes())
        .map_err(|e| CertsError::Invalid(format!("the CA certificate: {e}")))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| CertsError::Invalid(format!("the CA certificate: {e}")))?;
    if parsed.public_key().raw != ca_key.public_key_der().as_slice() {
        return Err(CertsError::Invalid("the CA key is not the CA certificate's key".into()));
    }
    let now = time::OffsetDateTime::now_utc();
    let until = parsed.validity().not_after.to_datetime();
    if until <= now {
        return Err(CertsError::Invalid(format!("the CA expired on {until}")));
    }
    Ok(until)
}

/// [`issue`], valid for `life` from now (tests of expiry, renewals).
pub fn issue_for(
    ca: &Issued,
    name: &str,
    role: Role,
    dns: &[String],
    ips: &[IpAddr],
    life: std::time::Duration,
) -> Result<Issued, CertsError> {
    if name.is_empty() {
        return Err(CertsError::Invalid("a certificate needs a name".into()));
    }
    // Every process but an operator's tool serves TLS: a client checks the name it dialled.
    if role != Role::Admin && dns.is_empty() && ips.is_empty() {
        return Err(CertsError::Invalid(format!(
            "a {} certificate needs the DNS names or IP addresses clients reach it by (--dns, --ip)",
            role.unit()
        )));
    }
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let ca_until = check_ca(ca, &ca_key)?;
    let ca_cert = CertificateParams::from_ca_cert_pem(&ca.cert_pem)?.self_signed(&ca_key)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.distinguished_name.push(DnType::OrganizationalUnitName, role.unit());
    for d in dns {
        let name = d.clone().try_into().map_err(|_| CertsError::Invalid(format!("not a DNS name: {d}")))?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    validity_for(&mut params, life)?;
    params.not_after = params.not_after.min(ca_until);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn not_after(pem: &str) -> time::OffsetDateTime {
        use rustls_pki_types::pem::PemObject as _;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        x509_parser::parse_x509_certificate(der.as_ref()).unwrap().1.validity().not_after.to_datetime()
    }

    /// A certificate is signed only with the CA certificate's own key, ends when its CA
    /// does at the latest, and names where a server is reached; an operator's needs no name.
    #[test]
    fn a_certificate_is_issued_only_as_its_ca_can_vouch_for_it() {
        let ca = new_ca("ca", 30).unwrap();
        let other = new_ca("other", 30).unwrap();
        let names = ["localhost".to_string()];
        assert!(issue(&ca, "o", Role::Origin, &names, &[], 7).is_ok());
        let mixed = Issued { cert_pem: ca.cert_pem.clone(), key_pem: other.key_pem.clone() };
        let err = issue(&mixed, "o", Role::Origin, &names, &[], 7).unwrap_err().to_string();
        assert!(err.contains("not the CA certificate's key"), "{err}");
        let long = issue(&ca, "o", Role::Origin, &names, &[], 90).unwrap();
        assert!(not_after(&long.cert_pem) <= not_after(&ca.cert_pem), "outlives its CA");
        let err = issue(&ca, "o", Role::Agent, &[], &[], 7).unwrap_err().to_string();
        assert!(err.contains("--dns, --ip"), "{err}");
        assert!(issue(&ca, "ops", Role::Admin, &[], &[], 7).is_ok());
    }
}
