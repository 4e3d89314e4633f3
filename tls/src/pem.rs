//! Reading certificates and keys from PEM files.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

use crate::TlsError;

fn pem_error(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Pem { path: path.display().to_string(), what: e.to_string() }
}

/// Every certificate in a PEM file; at least one.
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes =
        std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes =
        std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| pem_error(path, e))
}

/// A root store of the certificates in a PEM file.
pub fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs(path)? {
        store.add(cert).map_err(|e| pem_error(path, e))?;
    }
    Ok(store)
}
