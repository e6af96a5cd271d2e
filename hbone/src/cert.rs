//! Reading certificates: a leaf's SPIFFE identity and validity. Used by the TLS verifiers and
//! by the CA and certificate loading, so neither depends on the other for it.

use std::time::SystemTime;

use rustls_pki_types::CertificateDer;

use crate::identity::SpiffeId;

/// What zring reads from a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    /// The SPIFFE id: the leaf's only URI SAN, when it has exactly one and it is well formed.
    pub identity: Option<SpiffeId>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Parse a leaf certificate's identity and validity.
pub fn leaf_info(der: &CertificateDer<'_>) -> Result<LeafInfo, String> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer};
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der.as_ref())
        .map_err(|e| format!("bad certificate: {e}"))?;
    // An X.509-SVID carries exactly one URI SAN, the SPIFFE id: a certificate with none, with
    // two (which one would policy see?), or with one that is no valid SPIFFE id (a NUL or a
    // byte outside the id's alphabet: CVE-2025-66220 class) has no identity at all.
    let mut uris = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect::<Vec<_>>(),
        _ => Vec::new(),
    };
    let identity = match (uris.pop(), uris.is_empty()) {
        (Some(uri), true) => uri.parse().ok(),
        _ => None,
    };
    let ts = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    Ok(LeafInfo {
        identity,
        not_before: ts(cert.validity().not_before),
        not_after: ts(cert.validity().not_after),
    })
}
