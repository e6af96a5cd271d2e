//! The identity manager: one certificate per local workload identity, issued by the local CA
//! and renewed at half its lifetime, or read from files (`--cert-dir`) and re-read when they
//! change. A new certificate swaps in new TLS configs for *new* connections; live connections
//! keep the config (and certificate) they were made with.
//!
//! With Istio's CA (a remote call per certificate), fetches run on one thread of their own,
//! never on a worker or the xDS thread: a connection waiting for its workload's certificate
//! ([`CertManager::get_urgent`]) is served before the background fetches a config change
//! queued ([`CertManager::prefetch`]), and a queued identity a connection then needs moves to
//! the front.
//!
//! A certificate directory holds `root-cert.pem` (the trust bundle) and, per identity,
//! `<namespace>/<service account>/cert-chain.pem` and `key.pem` (what
//! `zring ca issue --out DIR/<namespace>/<service account>/` writes). A file's leaf must carry
//! exactly the identity it is filed under.

use std::{
    collections::{HashMap, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, OnceLock, Weak},
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

/// How long a connection waits for its certificate from Istio's CA.
const URGENT_WAIT: Duration = Duration::from_secs(15);

/// The longest wait between attempts for one identity after failures.
const MAX_CA_BACKOFF: Duration = Duration::from_secs(150);

/// Issues (or loads) and renews workload certificates.
#[derive(Debug)]
pub struct CertManager {
    source: Source,
    roots: Vec<CertificateDer<'static>>,
    issued: Mutex<HashMap<SpiffeId, Arc<Issued>>>,
    ca_errors: std::sync::atomic::AtomicU64,
    fetches: Fetches,
}

/// What a waiting connection is told once its identity's fetch ends (it polls the receiver).
type Waiter = tokio::sync::oneshot::Sender<Result<Arc<Issued>, String>>;

/// The remote CA's fetch queue: urgent (a connection waits) before background.
#[derive(Debug, Default)]
struct Fetches {
    queue: Mutex<FetchQueue>,
    wake: Condvar,
    thread: OnceLock<()>,
}

#[derive(Debug, Default)]
struct FetchQueue {
    urgent: VecDeque<SpiffeId>,
    background: VecDeque<SpiffeId>,
    /// Identities queued or being fetched, with the connections waiting for each.
    pending: HashMap<SpiffeId, Vec<Waiter>>,
}

impl FetchQueue {
    fn next(&mut self) -> Option<SpiffeId> {
        self.urgent
            .pop_front()
            .or_else(|| self.background.pop_front())
    }
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
            fetches: Fetches::default(),
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
            fetches: Fetches::default(),
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
            fetches: Fetches::default(),
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

    /// The certificate of `id` for a connection waiting on it. From Istio's CA the fetch runs on
    /// the fetch thread, ahead of background ones, and this waits without blocking the caller's
    /// thread; a local CA or files answer at once. For a worker's (monoio) connection tasks.
    pub async fn get_urgent(self: &Arc<Self>, id: &SpiffeId) -> Result<Arc<Issued>, IdentityError> {
        if let Some(i) = self.lock().get(id) {
            return Ok(i.clone());
        }
        if !matches!(self.source, Source::Remote { .. }) {
            return self.get(id);
        }
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        {
            let mut q = self.queue();
            match q.pending.get_mut(id) {
                Some(waiters) => {
                    waiters.push(tx);
                    if let Some(at) = q.background.iter().position(|b| b == id) {
                        q.background.remove(at);
                        q.urgent.push_back(id.clone());
                    }
                }
                None => {
                    q.pending.insert(id.clone(), vec![tx]);
                    q.urgent.push_back(id.clone());
                }
            }
        }
        self.start_fetches();
        let failed = |e: String| IdentityError::Issue {
            id: id.clone(),
            source: Box::new(CaError::Remote(e)),
        };
        // Polled, not awaited: a worker's waker (monoio) must not be woken from the fetch
        // thread. A few milliseconds of latency, on a connection that waits for a CA anyway.
        let deadline = std::time::Instant::now() + URGENT_WAIT;
        loop {
            match rx.try_recv() {
                Ok(r) => return r.map_err(failed),
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                    return Err(failed("the certificate fetch thread stopped".into()))
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
            }
            if std::time::Instant::now() >= deadline {
                return Err(failed(format!(
                    "no answer from the CA within {URGENT_WAIT:?}"
                )));
            }
            monoio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Make sure `id` has a certificate soon: from Istio's CA, queued behind any waiting
    /// connection's (this returns at once); from a local CA or files, now.
    pub fn prefetch(self: &Arc<Self>, id: &SpiffeId) -> Result<(), IdentityError> {
        if !matches!(self.source, Source::Remote { .. }) {
            return self.get(id).map(|_| ());
        }
        if self.lock().contains_key(id) {
            return Ok(());
        }
        {
            let mut q = self.queue();
            if q.pending.contains_key(id) {
                return Ok(());
            }
            q.pending.insert(id.clone(), Vec::new());
            q.background.push_back(id.clone());
        }
        self.start_fetches();
        Ok(())
    }

    /// Whether certificates come from Istio's CA (a fetch may have to wait for the network).
    pub fn is_remote(&self) -> bool {
        matches!(self.source, Source::Remote { .. })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, FetchQueue> {
        self.fetches.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wake the fetch thread, starting it the first time; it ends with the manager.
    fn start_fetches(self: &Arc<Self>) {
        self.fetches.thread.get_or_init(|| {
            let weak = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name("zring-ca-fetch".into())
                .spawn(move || fetch_loop(weak));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the certificate fetch thread");
            }
        });
        self.fetches.wake.notify_one();
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

    /// Drop the certificates of identities not in `keep` (no workload of this node has them any
    /// more), so they are not renewed for nothing; connections using one keep it. Returns how
    /// many went.
    pub fn retain(&self, keep: &std::collections::HashSet<SpiffeId>) -> usize {
        let mut issued = self.lock();
        let before = issued.len();
        issued.retain(|id, _| keep.contains(id));
        before - issued.len()
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

/// The fetch thread: one identity at a time, urgent first, until the manager is dropped.
fn fetch_loop(manager: Weak<CertManager>) {
    loop {
        let Some(m) = manager.upgrade() else { return };
        let next = {
            let mut q = m.queue();
            match q.next() {
                Some(id) => Some(id),
                None => {
                    // Woken by new work, or after a second to let go of the manager (the
                    // thread ends once the manager's last other owner has).
                    let (mut q, _) = m
                        .fetches
                        .wake
                        .wait_timeout(q, Duration::from_secs(1))
                        .unwrap_or_else(|p| p.into_inner());
                    q.next()
                }
            }
        };
        let Some(id) = next else { continue };
        let cached = m.lock().get(&id).cloned();
        let result = match cached {
            Some(i) => Ok(i),
            None => m
                .issue(&id)
                .map(|i| m.lock().entry(id.clone()).or_insert(i).clone())
                .map_err(|e| match e {
                    // The waiter names the identity itself.
                    IdentityError::Issue { source, .. } => source.to_string(),
                    other => other.to_string(),
                }),
        };
        if let Err(e) = &result {
            tracing::warn!(identity = %id, error = %e, "certificate fetch failed; retried when a connection needs it");
        }
        let waiters = m.queue().pending.remove(&id).unwrap_or_default();
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}
