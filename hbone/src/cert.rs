//! Reading certificates: a leaf's SPIFFE identity and validity. Used by the TLS verifiers and
//! by the CA and certificate loading, so neither depends on the other for it.

use std::time::SystemTime;

use rustls_pki_types::CertificateDer;

use crate::identity::SpiffeId;

/// What zring reads from a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    /// The first `spiffe://` URI SAN, if any and if well formed.
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
    let mut identity = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if uri.starts_with("spiffe://") {
                    identity = uri.parse().ok();
                    break;
                }
            }
        }
    }
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
