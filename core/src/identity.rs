//! The identity manager: one certificate per local workload identity, issued by the local CA
//! and renewed at half its lifetime, or read from files (`--cert-dir`) and re-read when they
//! change. A new certificate swaps in new TLS configs for *new* connections; live connections
//! keep the config (and certificate) they were made with.
//!
//! A certificate directory holds `root-cert.pem` (the trust bundle) and, per identity,
//! `<namespace>/<service account>/cert-chain.pem` and `key.pem` (what
//! `zring ca issue --out DIR/<namespace>/<service account>/` writes). A file's leaf must carry
//! exactly the identity it is filed under.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rustls::pki_types::CertificateDer;
use zring_hbone::{
    ca::{CaError, LocalCa, WorkloadCert},
    tls::{self, TlsError},
    SpiffeId,
};

/// Errors of the identity manager.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Issuing failed.
    #[error("issuing a certificate for {id}: {source}")]
    Issue {
        /// For whom.
        id: SpiffeId,
        /// Why.
        source: Box<CaError>,
    },
    /// A certificate file is for another identity.
    #[error("{}: the certificate is for {}, not {}", .0.path.display(), .0.found, .0.id)]
    WrongFile(Box<WrongFile>),
    /// Building TLS configs failed.
    #[error("TLS config for {id}: {source}")]
    Tls {
        /// For whom.
        id: SpiffeId,
        /// Why.
        source: Box<TlsError>,
    },
}

/// A workload identity's current certificate and the server config that presents it.
#[derive(Debug)]
pub struct Issued {
    /// The certificate.
    pub cert: WorkloadCert,
    /// Server config presenting it (inbound HBONE for this workload).
    pub server: Arc<rustls::ServerConfig>,
    /// For certificates from files: the files' modification time when read.
    loaded: Option<SystemTime>,
}

impl Issued {
    /// Whether this certificate should be replaced now: past half its life (CA), or its files
    /// changed (files).
    fn due(&self, source: &Source, id: &SpiffeId, now: SystemTime) -> bool {
        match source {
            Source::Ca { .. } => self.cert.needs_renewal(now),
            Source::Remote { backoff, .. } => {
                self.cert.needs_renewal(now)
                    && backoff
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(id)
                        .is_none_or(|(next, _)| *next <= now)
            }
            Source::Files { dir } => {
                let prefix = CertManager::prefix(dir, id);
                let current =
                    mtime(&prefix.join("cert-chain.pem")).max(mtime(&prefix.join("key.pem")));
                current != self.loaded
            }
        }
    }
}

/// A certificate file filed under one identity holds another.
#[derive(Debug)]
pub struct WrongFile {
    /// Expected identity.
    pub id: SpiffeId,
    /// What the file holds.
    pub found: SpiffeId,
    /// The file.
    pub path: PathBuf,
}

/// Where certificates come from.
#[derive(Debug)]
enum Source {
    /// Issued by a local CA, `ttl` long.
    Ca { ca: Box<LocalCa>, ttl: Duration },
    /// Read from a certificate directory.
    Files { dir: PathBuf },
    /// From Istio's CA (istiod or `zring control-plane`), `ttl` long.
    Remote {
        ca: Box<crate::xds::ca_client::IstioCa>,
        ttl: Duration,
        /// Per identity: when the next attempt may run, and the back-off after a failure.
        backoff: Mutex<HashMap<SpiffeId, (SystemTime, Duration)>>,
    },
}

/// The longest wait between attempts for one identity after failures.
const MAX_CA_BACKOFF: Duration = Duration::from_secs(150);

/// Issues (or loads) and renews workload certificates.
#[derive(Debug)]
pub struct CertManager {
    source: Source,
    roots: Vec<CertificateDer<'static>>,
    issued: Mutex<HashMap<SpiffeId, Arc<Issued>>>,
    ca_errors: std::sync::atomic::AtomicU64,
}

/// Modification time of a file (None when unreadable).
fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl CertManager {
    /// A manager issuing `ttl`-long certificates from `ca`.
    pub fn new(ca: LocalCa, ttl: Duration) -> Self {
        let roots = vec![ca.root().clone()];
        Self {
            source: Source::Ca {
                ca: Box::new(ca),
                ttl,
            },
            roots,
            issued: Mutex::new(HashMap::new()),
            ca_errors: Default::default(),
        }
    }

    /// A manager getting `ttl`-long certificates from Istio's CA; the trust bundle is the
    /// CA's root file (`CA_ROOT_CA`).
    pub fn remote(ca: crate::xds::ca_client::IstioCa, ttl: Duration) -> Result<Self, CaError> {
        let roots = ca.roots()?;
        Ok(Self {
            source: Source::Remote {
                ca: Box::new(ca),
                ttl,
                backoff: Mutex::new(HashMap::new()),
            },
            roots,
            issued: Mutex::new(HashMap::new()),
            ca_errors: Default::default(),
        })
    }

    /// How often [`CertManager::renew_due`] should run: a CA's certificates need it at
    /// half-life (checked every 30 s; a remote CA's every second, for its back-off); files are
    /// checked for changes every second.
    pub fn check_interval(&self) -> Duration {
        match self.source {
            Source::Ca { .. } => Duration::from_secs(30),
            Source::Files { .. } | Source::Remote { .. } => Duration::from_secs(1),
        }
    }

    /// Failed CA calls since start (`zring_ca_errors_total`).
    pub fn ca_errors(&self) -> u64 {
        self.ca_errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A manager reading certificates from `dir` (layout in the module docs).
    pub fn from_dir(dir: &Path) -> Result<Self, CaError> {
        let roots = zring_hbone::ca::load_bundle(&dir.join("root-cert.pem"))?;
        Ok(Self {
            source: Source::Files {
                dir: dir.to_path_buf(),
            },
            roots,
            issued: Mutex::new(HashMap::new()),
            ca_errors: Default::default(),
        })
    }

    fn prefix(dir: &Path, id: &SpiffeId) -> PathBuf {
        dir.join(id.namespace()).join(id.service_account())
    }

    fn issue(&self, id: &SpiffeId) -> Result<Arc<Issued>, IdentityError> {
        let err = |source| IdentityError::Issue {
            id: id.clone(),
            source: Box::new(source),
        };
        let (cert, loaded) = match &self.source {
            Source::Ca { ca, ttl } => (ca.issue(id, *ttl).map_err(err)?, None),
            Source::Remote { ca, ttl, backoff } => match ca.issue(id, *ttl) {
                Ok(c) => {
                    backoff.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
                    (c, None)
                }
                Err(e) => {
                    self.ca_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let mut b = backoff.lock().unwrap_or_else(|p| p.into_inner());
                    let wait = b.get(id).map_or(Duration::from_secs(1), |(_, w)| {
                        (*w * 2).min(MAX_CA_BACKOFF)
                    });
                    b.insert(id.clone(), (SystemTime::now() + wait, wait));
                    return Err(err(CaError::Remote(format!(
                        "{e:#} (next try in {wait:?})"
                    ))));
                }
            },
            Source::Files { dir } => {
                let prefix = Self::prefix(dir, id);
                let chain_path = prefix.join("cert-chain.pem");
                let loaded = mtime(&chain_path).max(mtime(&prefix.join("key.pem")));
                let cert = WorkloadCert::load(&format!("{}/", prefix.display())).map_err(err)?;
                if &cert.identity != id {
                    return Err(IdentityError::WrongFile(Box::new(WrongFile {
                        id: id.clone(),
                        found: cert.identity.clone(),
                        path: chain_path,
                    })));
                }
                (cert, loaded)
            }
        };
        let server =
            tls::server_config(&cert, &self.roots).map_err(|source| IdentityError::Tls {
                id: id.clone(),
                source: Box::new(source),
            })?;
        let source = match (&self.source, loaded.is_some()) {
            (_, true) => "files",
            (Source::Remote { .. }, _) => "Istio CA",
            _ => "local CA",
        };
        tracing::info!(identity = %id, expires = %humantime::format_rfc3339_seconds(cert.not_after), source, "workload certificate in use");
        Ok(Arc::new(Issued {
            cert,
            server,
            loaded,
        }))
    }

    /// The current certificate of `id`, issuing it the first time.
    pub fn get(&self, id: &SpiffeId) -> Result<Arc<Issued>, IdentityError> {
        if let Some(i) = self.lock().get(id) {
            return Ok(i.clone());
        }
        let issued = self.issue(id)?;
        Ok(self.lock().entry(id.clone()).or_insert(issued).clone())
    }

    /// A client config presenting `src`'s certificate and expecting one of `expected`.
    pub fn client_config(
        &self,
        src: &SpiffeId,
        expected: Vec<SpiffeId>,
    ) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
        let issued = self.get(src)?;
        tls::client_config(&issued.cert, &self.roots, expected).map_err(|source| {
            IdentityError::Tls {
                id: src.clone(),
                source: Box::new(source),
            }
        })
    }

    /// Re-issue every certificate past half its lifetime. Returns the identities renewed. A
    /// failure keeps the old certificate (still valid) and is reported; the caller retries.
    pub fn renew_due(&self, now: SystemTime) -> Vec<Result<SpiffeId, IdentityError>> {
        let due: Vec<SpiffeId> = self
            .lock()
            .iter()
            .filter(|(id, i)| i.due(&self.source, id, now))
            .map(|(id, _)| id.clone())
            .collect();
        due.into_iter()
            .map(|id| {
                let fresh = self.issue(&id)?;
                self.lock().insert(id.clone(), fresh);
                Ok(id)
            })
            .collect()
    }

    /// Identities and expiry times, for `/config_dump`.
    pub fn expiries(&self) -> Vec<(SpiffeId, SystemTime)> {
        let mut v: Vec<_> = self
            .lock()
            .iter()
            .map(|(id, i)| (id.clone(), i.cert.not_after))
            .collect();
        v.sort();
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SpiffeId, Arc<Issued>>> {
        self.issued.lock().unwrap_or_else(|p| p.into_inner())
    }
}
