//! rustls configurations for HBONE.
//!
//! Both sides: TLS 1.3 only, ALPN `h2`, AES-128-GCM / AES-256-GCM, certificates chaining to the
//! trust bundle. No SNI: the server presents the certificate of the workload that owns the
//! destination address (the caller picks the config), and the client checks that the server's
//! URI SAN is one of the SPIFFE ids it expects, failing with [`WrongIdentity`] otherwise.

use std::{
    fmt,
    sync::{Arc, RwLock},
};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ParsedCertificate, WebPkiClientVerifier,
    },
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};

pub use crate::cert::{leaf_info, LeafInfo};
use crate::{
    ca::WorkloadCert,
    identity::{SpiffeId, TrustDomain},
};

/// ALPN protocol of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rustls refused the certificate, key or bundle.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The trust bundle is unusable.
    #[error("trust bundle: {0}")]
    Bundle(String),
}

/// The server presented a valid certificate for a different identity than expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrongIdentity {
    /// What the client would accept.
    pub expected: Vec<SpiffeId>,
    /// What the server's certificate says (None: no SPIFFE URI SAN at all).
    pub got: Option<SpiffeId>,
}

impl fmt::Display for WrongIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let expected: Vec<String> = self.expected.iter().map(|e| e.to_string()).collect();
        match &self.got {
            Some(g) => write!(
                f,
                "peer identity {g} is not the expected {}",
                expected.join(" or ")
            ),
            None => write!(
                f,
                "peer certificate has no SPIFFE identity; expected {}",
                expected.join(" or ")
            ),
        }
    }
}

impl std::error::Error for WrongIdentity {}

/// The crypto provider: ring with only the TLS 1.3 AES-GCM suites.
pub fn provider() -> Arc<CryptoProvider> {
    let base = rustls::crypto::ring::default_provider();
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ],
        ..base
    })
}

/// Trust anchors as a rustls store.
pub fn root_store(roots: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store
            .add(r.clone())
            .map_err(|e| TlsError::Bundle(e.to_string()))?;
    }
    if store.is_empty() {
        return Err(TlsError::Bundle("no trust anchor".into()));
    }
    Ok(Arc::new(store))
}

/// Check that `chain` (leaf first) chains to one of `roots` and is valid now (a certificate
/// fresh from a CA, before it is used).
pub fn verify_chain(
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
) -> Result<(), TlsError> {
    let store = root_store(roots)?;
    let leaf = chain
        .first()
        .ok_or_else(|| TlsError::Bundle("an empty certificate chain".into()))?;
    let parsed = ParsedCertificate::try_from(leaf)?;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &store,
        &chain[1..],
        UnixTime::now(),
        provider().signature_verification_algorithms.all,
    )?;
    Ok(())
}

/// The server side: present `cert`, require a client certificate chaining to `roots`.
pub fn server_config(
    cert: &WorkloadCert,
    roots: &[CertificateDer<'static>],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(root_store(roots)?, provider.clone())
        .build()
        .map_err(|e| TlsError::Bundle(e.to_string()))?;
    let verifier = Arc::new(TrustDomainVerifier {
        inner: webpki,
        trust_domain: cert.identity.trust_domain().clone(),
    });
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Resumption by stateless tickets: the session (with the client's certificate chain, so a
    // resumed peer keeps its identity) travels encrypted in the ticket, and the server keeps
    // nothing per session. rustls' default instead stored about 1 KiB per ticket, two tickets
    // per handshake, in a 256-entry cache: after a burst of pooled connections those entries
    // stayed, scattered over allocator pages the proxy could then not give back. One ticket
    // per handshake: a pooled dial uses one and the next handshake brings the next.
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 1;
    Ok(Arc::new(cfg))
}

/// The client side: present `cert`, accept only servers chaining to `roots` whose identity is
/// one of `expected`.
pub fn client_config(
    cert: &WorkloadCert,
    roots: &[CertificateDer<'static>],
    expected: Vec<SpiffeId>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: root_store(roots)?,
        expected,
        provider: provider.clone(),
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    Ok(Arc::new(cfg))
}

/// The name passed to rustls when connecting: an IP, so no SNI is sent (the verifier ignores it).
pub fn server_name(ip: std::net::IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}

/// Checks the chain like WebPKI does, then the SPIFFE id instead of a DNS name.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<SpiffeId>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let got = leaf_info(end_entity).ok().and_then(|i| i.identity);
        match &got {
            Some(id) if self.expected.contains(id) => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(WrongIdentity {
                    expected: self.expected.clone(),
                    got,
                })),
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client certificate is accepted only after WebPKI's checks (chain, expiry, clientAuth)
/// and only when it carries one valid SPIFFE id in the server's own trust domain (ztunnel's
/// `TrustDomainVerifier`, stricter: ztunnel lets a certificate without a SPIFFE id through).
/// Without it a certificate from the same root for `spiffe://evil.example/...`, or with only a
/// DNS name, would pass policies that name namespaces or service accounts.
#[derive(Debug)]
struct TrustDomainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
}

/// The peer's certificate has no SPIFFE id of the local trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignIdentity {
    /// The local trust domain.
    pub expected: TrustDomain,
    /// The certificate's SPIFFE id (None: none, more than one URI SAN, or malformed).
    pub got: Option<SpiffeId>,
}

impl fmt::Display for ForeignIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.got {
            Some(id) => write!(
                f,
                "peer identity {id} is outside the trust domain {}",
                self.expected
            ),
            None => write!(
                f,
                "peer certificate carries no single valid SPIFFE id (trust domain {})",
                self.expected
            ),
        }
    }
}

impl std::error::Error for ForeignIdentity {}

impl ClientCertVerifier for TrustDomainVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let got = leaf_info(end_entity).ok().and_then(|i| i.identity);
        match &got {
            Some(id) if id.trust_domain() == &self.trust_domain => Ok(verified),
            _ => Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(ForeignIdentity {
                    expected: self.trust_domain.clone(),
                    got,
                })),
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The SPIFFE id of the peer of an established TLS connection.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<SpiffeId> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| leaf_info(leaf).ok())
        .and_then(|i| i.identity)
}

/// Why a TLS handshake failed, in the terms an operator acts on.
#[derive(Debug)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// The peer's certificate is valid but names another identity.
    WrongIdentity(WrongIdentity),
    /// The peer's certificate does not chain to our trust bundle, has expired, or is missing.
    BadCertificate(String),
    /// Anything else (network, protocol).
    Other(std::io::Error),
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongIdentity(w) => write!(f, "{w}"),
            Self::BadCertificate(s) => write!(f, "certificate rejected: {s}"),
            Self::Other(e) => write!(f, "TLS handshake failed: {e}"),
        }
    }
}

/// Classify the I/O error tokio-rustls returns from a failed handshake.
pub fn classify_handshake(e: std::io::Error) -> HandshakeFailure {
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return HandshakeFailure::Other(e);
    };
    match inner {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            if let Some(w) = other.0.downcast_ref::<WrongIdentity>() {
                return HandshakeFailure::WrongIdentity(w.clone());
            }
            match other.0.downcast_ref::<ForeignIdentity>() {
                Some(f) => HandshakeFailure::BadCertificate(f.to_string()),
                None => HandshakeFailure::BadCertificate(inner.to_string()),
            }
        }
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            HandshakeFailure::BadCertificate(inner.to_string())
        }
        _ => HandshakeFailure::Other(e),
    }
}

/// A value swapped at runtime (certificate rotation) while readers take cheap snapshots: new
/// connections load the current value; live connections keep the one they started with.
#[derive(Debug)]
pub struct Swappable<T>(RwLock<Arc<T>>);

impl<T> Swappable<T> {
    /// Start with `value`.
    pub fn new(value: Arc<T>) -> Self {
        Self(RwLock::new(value))
    }

    /// The current value.
    pub fn load(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replace the value for everyone who loads after this.
    pub fn store(&self, value: Arc<T>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = value;
    }
}
