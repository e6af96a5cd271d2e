//! A local certificate authority, and PEM loading of certificates, keys and bundles.
//!
//! A CA directory holds `root-cert.pem` and `root-key.pem` (PKCS#8; ECDSA P-256 or RSA 2048+),
//! the same two files as an Istio plug-in CA, so an existing root can be used as is.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use crate::identity::SpiffeId;

/// File name of the root certificate in a CA directory.
pub const ROOT_CERT: &str = "root-cert.pem";
/// File name of the root key in a CA directory.
pub const ROOT_KEY: &str = "root-key.pem";
/// Workload certificate lifetime: 24 hours, Istio's default.
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// Root lifetime for `zring ca init`: 10 years, Istio's self-signed root default.
pub const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Issued certificates start this long in the past, so a peer whose clock is a little behind
/// does not reject them as not yet valid.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// Errors of the CA and of PEM loading.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file did not hold what it should.
    #[error("{path}: {what}")]
    Invalid {
        /// The file (or a description of the input).
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// `ca init` would overwrite an existing root.
    #[error("{0} already exists; refusing to overwrite a root CA")]
    Exists(PathBuf),
    /// A certificate signing request that cannot be signed.
    #[error("certificate signing request refused: {0}")]
    Csr(String),
    /// A remote CA failed or refused.
    #[error("{0}")]
    Remote(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A workload's certificate chain (leaf first) and private key, in PEM and DER.
#[derive(Debug)]
pub struct WorkloadCert {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// The identity in the leaf's URI SAN.
    pub identity: SpiffeId,
    /// When the leaf expires.
    pub not_after: std::time::SystemTime,
    /// When the leaf became valid.
    pub not_before: std::time::SystemTime,
    /// When to renew it: half its lifetime after it was issued (Istio's rule). For issued
    /// certificates the lifetime is counted from the issue time, not from the backdated
    /// `not_before`; for loaded ones, from `not_before`.
    pub renew_after: std::time::SystemTime,
}

impl Clone for WorkloadCert {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            identity: self.identity.clone(),
            not_after: self.not_after,
            not_before: self.not_before,
            renew_after: self.renew_after,
        }
    }
}

impl WorkloadCert {
    /// Parse a chain and key from PEM text; the identity is read from the leaf.
    pub fn from_pem(chain_pem: &str, key_pem: &str, origin: &Path) -> Result<Self, CaError> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| CaError::Invalid {
                    path: origin.to_path_buf(),
                    what: format!("bad certificate PEM: {e}"),
                })?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| CaError::Invalid {
                path: origin.to_path_buf(),
                what: format!("bad private key PEM: {e}"),
            })?;
        let leaf = chain.first().ok_or_else(|| CaError::Invalid {
            path: origin.to_path_buf(),
            what: "no certificate in the chain".into(),
        })?;
        let info = crate::cert::leaf_info(leaf).map_err(|what| CaError::Invalid {
            path: origin.to_path_buf(),
            what,
        })?;
        let identity = info.identity.ok_or_else(|| CaError::Invalid {
            path: origin.to_path_buf(),
            what: "the leaf has no spiffe:// URI SAN".into(),
        })?;
        // Half of the life left from now (or from not_before, if later): a CA's backdating of
        // not_before must not make a fresh certificate look due for renewal.
        let start = info.not_before.max(std::time::SystemTime::now());
        let half = info.not_after.duration_since(start).unwrap_or_default() / 2;
        Ok(Self {
            chain,
            key,
            identity,
            not_after: info.not_after,
            not_before: info.not_before,
            renew_after: start + half,
        })
    }

    /// Load `<prefix>cert-chain.pem` and `<prefix>key.pem`, the names `zring ca issue` writes.
    pub fn load(prefix: &str) -> Result<Self, CaError> {
        let cert_path = PathBuf::from(format!("{prefix}cert-chain.pem"));
        let key_path = PathBuf::from(format!("{prefix}key.pem"));
        let chain = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        Self::from_pem(&chain, &key, &cert_path)
    }

    /// The chain as PEM text.
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c.as_ref()))
            .collect()
    }

    /// The key as PEM text.
    pub fn key_pem(&self) -> String {
        match &self.key {
            PrivateKeyDer::Pkcs8(k) => pem_encode("PRIVATE KEY", k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => pem_encode("RSA PRIVATE KEY", k.secret_pkcs1_der()),
            PrivateKeyDer::Sec1(k) => pem_encode("EC PRIVATE KEY", k.secret_sec1_der()),
            _ => String::new(),
        }
    }

    /// Half of the lifetime has passed: time to renew (Istio's rule).
    pub fn needs_renewal(&self, now: std::time::SystemTime) -> bool {
        now >= self.renew_after
    }
}

/// Load trust anchors (one or more PEM certificates).
pub fn load_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CaError::Invalid {
            path: path.to_path_buf(),
            what: format!("bad certificate PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CaError::Invalid {
            path: path.to_path_buf(),
            what: "no certificate in the bundle".into(),
        });
    }
    Ok(certs)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der))
}

/// A fresh ECDSA P-256 key and a certificate signing request naming `id` (its only SAN, a
/// URI): (CSR PEM, key PEM), for a remote CA.
pub fn csr_for(id: &SpiffeId) -> Result<(String, String), CaError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((csr, key.serialize_pem()))
}

/// A certificate authority that can sign workload certificates.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    root_pem: String,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").finish_non_exhaustive()
    }
}

fn system_time(t: OffsetDateTime) -> std::time::SystemTime {
    t.into()
}

impl LocalCa {
    /// A fresh ECDSA P-256 root valid for `ttl`, in memory.
    pub fn generate(trust_domain: &str, ttl: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "zring local root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        let cert = params.self_signed(&key)?;
        let root_pem = cert.pem();
        let root = cert.der().clone();
        Ok(Self {
            issuer: Issuer::new(params, key),
            root,
            root_pem,
        })
    }

    /// `zring ca init`: generate a root and write `root-cert.pem` and `root-key.pem` into `dir`.
    /// Refuses to overwrite an existing root.
    pub fn init_dir(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let cert_path = dir.join(ROOT_CERT);
        let key_path = dir.join(ROOT_KEY);
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(CaError::Exists(p.clone()));
            }
        }
        let ca = Self::generate(trust_domain, DEFAULT_ROOT_TTL)?;
        fs::write(&cert_path, &ca.root_pem).map_err(io_err(&cert_path))?;
        write_private(&key_path, &ca.issuer.key().serialize_pem())?;
        Ok(ca)
    }

    /// Load a CA directory (`root-cert.pem` + `root-key.pem`).
    pub fn load_dir(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(ROOT_CERT);
        let key_path = dir.join(ROOT_KEY);
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Invalid {
            path: key_path.clone(),
            what: format!("not a usable PKCS#8 key (ECDSA P-256 or RSA 2048+): {e}"),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| CaError::Invalid {
            path: cert_path.clone(),
            what: format!("not a CA certificate: {e}"),
        })?;
        let root =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| CaError::Invalid {
                path: cert_path.clone(),
                what: format!("bad certificate PEM: {e}"),
            })?;
        Ok(Self {
            issuer,
            root,
            root_pem: cert_pem,
        })
    }

    /// The root certificate (the trust bundle of this CA).
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// The root certificate as PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Issue a workload certificate for `id`, valid from now (backdated by [`BACKDATE`]) for
    /// `ttl`.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<WorkloadCert, CaError> {
        self.issue_window(
            id,
            OffsetDateTime::now_utc() - BACKDATE,
            OffsetDateTime::now_utc() + ttl,
        )
    }

    /// Issue with an explicit validity window (tests use it for expired certificates).
    pub fn issue_window(
        &self,
        id: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<WorkloadCert, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let issued_at = OffsetDateTime::now_utc().min(not_after);
        let renew_after = system_time(issued_at + (not_after - issued_at) / 2);
        Ok(WorkloadCert {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            identity: id.clone(),
            not_after: system_time(not_after),
            not_before: system_time(not_before),
            renew_after,
        })
    }

    /// A TLS server certificate for `dns` names and `ips` (the control plane's serving
    /// certificate): (chain PEM, key PEM).
    pub fn issue_server(
        &self,
        dns: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if let Some(first) = dns.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        let mut sans = Vec::new();
        for d in dns {
            sans.push(SanType::DnsName(d.clone().try_into()?));
        }
        for ip in ips.iter().filter(|ip| !ip.is_unspecified()) {
            sans.push(SanType::IpAddress(*ip));
        }
        params.subject_alt_names = sans;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Sign a workload's certificate signing request (PEM): the CSR must name exactly one
    /// SPIFFE identity (a URI SAN), equal to `expected` when given. The certificate carries
    /// that identity only, is valid from now (backdated by [`BACKDATE`]) for `ttl`, and is for
    /// both TLS client and server use. Returns the identity and the certificate PEM.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        expected: Option<&SpiffeId>,
        ttl: Duration,
    ) -> Result<(SpiffeId, String), CaError> {
        let mut csr = parse_csr(csr_pem)?;
        let id = csr_id(&csr)?;
        if let Some(want) = expected {
            if *want != id {
                return Err(CaError::Csr(format!(
                    "the CSR names {id}, the caller asked for {want}"
                )));
            }
        }
        let now = OffsetDateTime::now_utc();
        let p = &mut csr.params;
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        p.distinguished_name = DistinguishedName::new();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = now - BACKDATE;
        p.not_after = now + ttl;
        p.use_authority_key_identifier_extension = true;
        let cert = csr.signed_by(&self.issuer)?;
        Ok((id, cert.pem()))
    }

    /// The one SPIFFE identity a CSR (PEM) names, or why it names none (before anything is
    /// signed: the caller decides whether the asker may have it).
    pub fn csr_identity(csr_pem: &str) -> Result<SpiffeId, CaError> {
        csr_id(&parse_csr(csr_pem)?)
    }

    /// `zring ca issue`: write `<prefix>cert-chain.pem`, `<prefix>key.pem` and
    /// `<prefix>root-cert.pem`. Returns the paths written.
    pub fn issue_to_files(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        prefix: &str,
    ) -> Result<Vec<PathBuf>, CaError> {
        let cert = self.issue(id, ttl)?;
        let chain = PathBuf::from(format!("{prefix}cert-chain.pem"));
        let key = PathBuf::from(format!("{prefix}key.pem"));
        let root = PathBuf::from(format!("{prefix}root-cert.pem"));
        if let Some(parent) = chain.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        fs::write(&chain, cert.chain_pem()).map_err(io_err(&chain))?;
        write_private(&key, &cert.key_pem())?;
        fs::write(&root, &self.root_pem).map_err(io_err(&root))?;
        Ok(vec![chain, key, root])
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), CaError> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(text.as_bytes()).map_err(io_err(path))
}

fn parse_csr(csr_pem: &str) -> Result<rcgen::CertificateSigningRequestParams, CaError> {
    rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| CaError::Csr(format!("not a valid PEM CSR: {e}")))
}

/// The CSR's only URI SAN as a SPIFFE id (exactly one, or an error).
fn csr_id(csr: &rcgen::CertificateSigningRequestParams) -> Result<SpiffeId, CaError> {
    let uris: Vec<&str> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|s| match s {
            SanType::URI(u) => Some(u.as_str()),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(CaError::Csr(format!(
            "a CSR must name exactly one SPIFFE identity (URI SAN); this one names {}",
            uris.len()
        )));
    };
    uri.parse()
        .map_err(|e| CaError::Csr(format!("{uri:?} is not a SPIFFE identity: {e}")))
}
