//! The identity manager: one certificate per local workload identity, issued by the local CA,
//! renewed at half its lifetime. Renewal swaps in new TLS configs for *new* connections; live
//! connections keep the config (and certificate) they were made with.

use std::{
    collections::HashMap,
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
}

/// Issues and renews workload certificates.
#[derive(Debug)]
pub struct CertManager {
    ca: LocalCa,
    roots: Vec<CertificateDer<'static>>,
    ttl: Duration,
    issued: Mutex<HashMap<SpiffeId, Arc<Issued>>>,
}

impl CertManager {
    /// A manager issuing `ttl`-long certificates from `ca`.
    pub fn new(ca: LocalCa, ttl: Duration) -> Self {
        let roots = vec![ca.root().clone()];
        Self {
            ca,
            roots,
            ttl,
            issued: Mutex::new(HashMap::new()),
        }
    }

    fn issue(&self, id: &SpiffeId) -> Result<Arc<Issued>, IdentityError> {
        let cert = self
            .ca
            .issue(id, self.ttl)
            .map_err(|source| IdentityError::Issue {
                id: id.clone(),
                source: Box::new(source),
            })?;
        let server =
            tls::server_config(&cert, &self.roots).map_err(|source| IdentityError::Tls {
                id: id.clone(),
                source: Box::new(source),
            })?;
        tracing::info!(identity = %id, expires = ?cert.not_after, "issued workload certificate");
        Ok(Arc::new(Issued { cert, server }))
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
            .filter(|(_, i)| i.cert.needs_renewal(now))
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
