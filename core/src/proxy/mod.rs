//! `zring run`: the node proxy.
//!
//! - Config: ztunnel's local YAML (`--config` or `LOCAL_XDS_PATH`); workloads whose `node` is
//!   `--node-name` (or `NODE_NAME`) are local. The file is re-read when it changes (checked every
//!   second) or on SIGHUP; a file that does not parse is rejected, the config in force stays,
//!   and the error is logged and counted (`zring_config_reloads_total{result="failure"}`). Live
//!   connections keep going across reloads; new connections see the new config.
//! - Identities: one certificate per local workload identity from the local CA (`--ca-dir`),
//!   issued before a config that names the workload comes into force, renewed at half-life.
//! - Inbound HBONE (`inbound`): every worker listens on `<ip>:15008` for each local HBONE
//!   workload IP (listeners for workloads added by a reload are bound on the fly).
//! - Inbound plaintext (`--inbound-plaintext-addr`, 15006 in-pod): policy without identity.
//! - Outbound (`outbound`): captured connections on `--outbound-addr` (15001; original
//!   destination from SO_ORIGINAL_DST, or the local address under TPROXY) and SOCKS5
//!   (`--socks5`, 15080).
//! - Telemetry and control (`crate::admin`): metrics, readiness, admin.

mod inbound;
mod outbound;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, SystemTime},
};

use anyhow::Context;
use zring_hbone::{
    ca::{LocalCa, DEFAULT_WORKLOAD_TTL},
    pool::{Pool, PoolKey, PoolSettings},
    H2Settings,
};
use zring_runtime::{
    drain::Drain,
    net::{self, ConnectOptions, ListenOptions},
    server as accept, ShutdownTrigger, WorkerConfig, WorkerContext, Workers,
};

use crate::{
    admin,
    config::{index::MeshIndex, InboundProtocol, LocalConfig},
    hbone_io::{MonoioExecutor, TlsDialer},
    identity::CertManager,
    metrics::Metrics,
    relay_cmd::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_DRAIN_TIMEOUT},
};

/// ztunnel's default packet mark for its own upstream sockets.
pub const DEFAULT_PACKET_MARK: u32 = 1337;

/// Settings of `zring run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The mesh config file.
    pub config: PathBuf,
    /// This node's name.
    pub node: String,
    /// Where certificates come from.
    pub certs: CertSource,
    /// SOCKS5 listener, if any.
    pub socks5: Option<SocketAddr>,
    /// Outbound capture listener (15001), if any.
    pub outbound: Option<SocketAddr>,
    /// Inbound plaintext capture listener (15006), if any.
    pub inbound_plaintext: Option<SocketAddr>,
    /// IP_TRANSPARENT on the capture listeners (TPROXY).
    pub transparent: bool,
    /// Inbound HBONE port.
    pub hbone_port: u16,
    /// SO_MARK on upstream sockets (None: off, for unprivileged runs).
    pub mark: Option<u32>,
    /// Originate HBONE connections from the source workload's IP (loopback demos and tests;
    /// in-pod mode does this by living in the pod's namespace).
    pub bind_source: bool,
    /// Admin endpoint (15000).
    pub admin: Option<SocketAddr>,
    /// Prometheus endpoint (15020).
    pub stats: Option<SocketAddr>,
    /// Readiness endpoint (15021).
    pub readiness: Option<SocketAddr>,
    /// In-pod mode: the node agent's ZDS socket. Pods it hands over get listeners on 15001,
    /// 15006 and 15008 inside their own network namespace.
    pub zds_socket: Option<PathBuf>,
    /// Workers.
    pub workers: WorkerConfig,
}

/// Where the local workloads' certificates come from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// Issued by the local CA in this directory (`root-cert.pem`, `root-key.pem`).
    Ca(PathBuf),
    /// Read from a certificate directory (`root-cert.pem`, `<ns>/<sa>/cert-chain.pem` and
    /// `key.pem`), re-read when the files change.
    Files(PathBuf),
}

/// How often the config file is checked for changes (SIGHUP is seen within `TICK`).
pub const CONFIG_CHECK: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_millis(100);

/// Everything the workers and the control threads share.
#[derive(Debug)]
pub struct State {
    /// Settings.
    pub cfg: RunConfig,
    index: RwLock<Arc<MeshIndex>>,
    /// 0 until a config is in force, then +1 per accepted reload.
    generation: AtomicU64,
    /// Certificates of local identities.
    pub certs: Arc<CertManager>,
    /// Metrics.
    pub metrics: Metrics,
    /// HTTP/2 settings of HBONE connections.
    pub h2: H2Settings,
    /// The generation each worker has bound listeners for.
    worker_generation: Mutex<HashMap<usize, u64>>,
    workers: AtomicUsize,
    last_error: Mutex<Option<String>>,
    /// Pods handed over by the node agent (in-pod mode).
    pods: Mutex<Pods>,
    /// +1 whenever `pods` changes.
    pods_generation: AtomicU64,
}

/// The pods of in-pod mode.
#[derive(Debug, Default)]
struct Pods {
    by_uid: std::collections::BTreeMap<String, Arc<crate::zds::client::Pod>>,
    netns_by_ip: HashMap<IpAddr, Arc<zring_runtime::net::NetNs>>,
}

impl State {
    /// The config in force (a snapshot: a connection uses one config from start to end).
    pub fn index(&self) -> Arc<MeshIndex> {
        self.index.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The generation of the config in force.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Why the proxy is not ready, or None when it is.
    pub fn not_ready(&self) -> Option<String> {
        let g = self.generation();
        if g == 0 {
            let last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
            return Some(match &*last {
                Some(e) => format!("no config in force yet: {e}"),
                None => format!("waiting for the config file {}", self.cfg.config.display()),
            });
        }
        let expected = self.workers.load(Ordering::Acquire);
        let done = self
            .worker_generation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|&&w| w >= g)
            .count();
        if expected == 0 || done < expected {
            return Some(format!(
                "{done} of {expected} workers have bound the listeners of config generation {g}"
            ));
        }
        None
    }

    /// `/config_dump`: the config in force and the certificates, as JSON.
    pub fn config_dump(&self) -> String {
        let index = self.index();
        let now = SystemTime::now();
        let certs: Vec<serde_json::Value> = self
            .certs
            .expiries()
            .into_iter()
            .map(|(id, exp)| {
                let secs = exp
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let left = exp.duration_since(now).map_or(0, |d| d.as_secs());
                serde_json::json!({
                    "identity": id.to_string(),
                    "expirationTime": humantime::format_rfc3339_seconds(exp).to_string(),
                    "expirationUnix": secs,
                    "secondsLeft": left,
                })
            })
            .collect();
        let dump = serde_json::json!({
            "node": self.cfg.node,
            "configFile": self.cfg.config.display().to_string(),
            "generation": self.generation(),
            "workloads": index.config.workloads,
            "services": index.config.services,
            "policies": index.config.policies,
            "certificates": certs,
        });
        serde_json::to_string_pretty(&dump).unwrap_or_default()
    }

    /// Put `config` in force: issue the certificates of its local identities first, so that no
    /// connection ever finds its workload without one.
    fn install(&self, config: LocalConfig) -> anyhow::Result<u64> {
        let index = MeshIndex::new(config);
        let mut ids = HashSet::new();
        for w in index.local_workloads(&self.cfg.node) {
            let id = w
                .identity()
                .with_context(|| format!("workload {}", w.uid))?;
            if ids.insert(id.clone()) {
                self.certs.get(&id)?;
            }
        }
        let (w, s, p, l) = (
            index.config.workloads.len(),
            index.config.services.len(),
            index.config.policies.len(),
            index.local_workloads(&self.cfg.node).count(),
        );
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(index);
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        // Pods' addresses come from the config: a pod handed over before its workload was
        // known gets its address (and so its namespace for upstream sockets) now.
        self.pods_changed(|_| {});
        tracing::info!(file = %self.cfg.config.display(), generation = g, workloads = w, services = s, policies = p, local_workloads = l, identities = ids.len(), "config in force");
        Ok(g)
    }

    /// The network namespace connections from pod IP `ip` leave from (in-pod mode).
    pub fn netns_of(&self, ip: IpAddr) -> Option<Arc<zring_runtime::net::NetNs>> {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .netns_by_ip
            .get(&ip)
            .cloned()
    }

    fn pods_snapshot(&self) -> Vec<Arc<crate::zds::client::Pod>> {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_uid
            .values()
            .cloned()
            .collect()
    }

    fn pods_changed(&self, f: impl FnOnce(&mut Pods)) {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut pods);
        let index = self.index();
        pods.netns_by_ip = pods
            .by_uid
            .values()
            .flat_map(|p| {
                index
                    .config
                    .workloads
                    .iter()
                    .filter(|w| w.name == p.info.name && w.namespace == p.info.namespace)
                    .flat_map(|w| w.workload_ips.iter().map(|ip| (*ip, p.netns.clone())))
                    .collect::<Vec<_>>()
            })
            .collect();
        self.pods_generation.fetch_add(1, Ordering::AcqRel);
    }

    fn worker_at(&self, worker: usize, g: u64) {
        self.worker_generation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(worker, g);
    }
}

/// Run the node proxy until shutdown.
pub fn run(cfg: RunConfig, trigger: &ShutdownTrigger) -> anyhow::Result<()> {
    if let Err(e) = zring_runtime::sys::raise_nofile_limit() {
        tracing::warn!(error = %e, "cannot raise the open-file limit");
    }
    let certs = match &cfg.certs {
        CertSource::Ca(dir) => CertManager::new(
            LocalCa::load_dir(dir)
                .with_context(|| format!("loading the CA from {}", dir.display()))?,
            DEFAULT_WORKLOAD_TTL,
        ),
        CertSource::Files(dir) => CertManager::from_dir(dir)
            .with_context(|| format!("loading the trust bundle from {}", dir.display()))?,
    };
    let state = Arc::new(State {
        cfg: cfg.clone(),
        index: RwLock::new(Arc::new(MeshIndex::new(LocalConfig::default()))),
        generation: AtomicU64::new(0),
        certs: Arc::new(certs),
        metrics: Metrics::default(),
        h2: H2Settings::default(),
        worker_generation: Mutex::new(HashMap::new()),
        workers: AtomicUsize::new(0),
        last_error: Mutex::new(None),
        pods: Mutex::new(Pods::default()),
        pods_generation: AtomicU64::new(0),
    });
    // A file that exists must be valid at start: a typo fails fast. A missing file is waited
    // for (not ready meanwhile): the config may be mounted after the proxy starts.
    let first = match std::fs::read(&cfg.config) {
        Ok(bytes) => {
            let config = LocalConfig::from_yaml(&String::from_utf8_lossy(&bytes), &cfg.config)?;
            let g = state.install(config)?;
            state.metrics.reload(true, g);
            Some(bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(file = %cfg.config.display(), "config file does not exist yet; waiting for it (not ready meanwhile)");
            None
        }
        Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", cfg.config.display())),
    };
    let mut listeners = Vec::new();
    for (role, addr) in [
        (admin::Role::Admin, cfg.admin),
        (admin::Role::Stats, cfg.stats),
        (admin::Role::Readiness, cfg.readiness),
    ] {
        if let Some(a) = addr {
            listeners.push((role, a));
        }
    }
    admin::start(listeners, state.clone(), trigger.clone())?;
    spawn_config_watch(state.clone(), first, trigger.clone())?;
    if let Some(path) = cfg.zds_socket.clone() {
        let (s, t) = (state.clone(), trigger.clone());
        std::thread::Builder::new()
            .name("zring-zds".into())
            .spawn(move || crate::zds::client::run(path, &mut ProxyPods(s), &t))?;
    }
    spawn_renewal(state.certs.clone(), trigger.clone())?;
    let s = state.clone();
    let workers = Workers::start(&cfg.workers, trigger, move |ctx| worker(ctx, s.clone()))?;
    state.workers.store(workers.len(), Ordering::Release);
    tracing::info!(workers = workers.len(), io = %workers.backend(), socks5 = ?cfg.socks5, outbound = ?cfg.outbound, inbound_plaintext = ?cfg.inbound_plaintext, admin = ?cfg.admin, stats = ?cfg.stats, readiness = ?cfg.readiness, "zring node proxy running");
    workers.join()?;
    Ok(())
}

/// The config watcher: re-reads the file when its bytes change (checked every
/// [`CONFIG_CHECK`]) or on SIGHUP (re-read even if unchanged).
fn spawn_config_watch(
    state: Arc<State>,
    mut last: Option<Vec<u8>>,
    trigger: ShutdownTrigger,
) -> anyhow::Result<()> {
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())
        .context("installing the SIGHUP handler")?;
    std::thread::Builder::new()
        .name("zring-config".into())
        .spawn(move || {
            let mut since_check = Duration::ZERO;
            let mut missing_logged = last.is_some();
            while !trigger.is_triggered() {
                std::thread::sleep(TICK);
                since_check += TICK;
                let forced = hup.swap(false, Ordering::AcqRel);
                if !forced && since_check < CONFIG_CHECK {
                    continue;
                }
                since_check = Duration::ZERO;
                let bytes = match std::fs::read(&state.cfg.config) {
                    Ok(b) => b,
                    Err(e) => {
                        if forced || !missing_logged {
                            tracing::error!(file = %state.cfg.config.display(), error = %e, "cannot read the config file; keeping the config in force");
                            missing_logged = true;
                        }
                        continue;
                    }
                };
                if !forced && last.as_deref() == Some(&bytes[..]) {
                    continue;
                }
                let result = LocalConfig::from_yaml(&String::from_utf8_lossy(&bytes), &state.cfg.config)
                    .map_err(anyhow::Error::from)
                    .and_then(|c| state.install(c));
                last = Some(bytes);
                match result {
                    Ok(g) => state.metrics.reload(true, g),
                    Err(e) => {
                        tracing::error!(file = %state.cfg.config.display(), error = %format!("{e:#}"), generation = state.generation(), "config rejected; the config in force is kept");
                        *state.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(format!("{e:#}"));
                        state.metrics.reload(false, state.generation());
                    }
                }
            }
        })?;
    Ok(())
}

/// In-pod mode's pod handler: pods are recorded; workers bind their listeners.
struct ProxyPods(Arc<State>);

impl crate::zds::client::PodHandler for ProxyPods {
    fn add(&mut self, pod: crate::zds::client::Pod) -> Result<(), String> {
        let index = self.0.index();
        if !index
            .config
            .workloads
            .iter()
            .any(|w| w.name == pod.info.name && w.namespace == pod.info.namespace)
        {
            tracing::warn!(pod = %pod.info.name, namespace = %pod.info.namespace, "no workload in the config for this pod yet; its outbound connections leave from zring's namespace until one appears");
        }
        let uid = pod.uid.clone();
        self.0.pods_changed(|p| {
            p.by_uid.insert(uid, Arc::new(pod));
        });
        Ok(())
    }
    fn del(&mut self, uid: &str) -> Result<(), String> {
        self.0.pods_changed(|p| {
            p.by_uid.remove(uid);
        });
        Ok(())
    }
    fn retain(&mut self, keep: &HashSet<String>) {
        self.0
            .pods_changed(|p| p.by_uid.retain(|uid, _| keep.contains(uid)));
    }
}

/// A control thread that renews certificates past half their lifetime (or re-reads changed
/// certificate files). New connections pick up the new certificate (`CertManager::get` per
/// connection); live ones keep theirs. A failed renewal keeps the old certificate and is
/// retried at the next check.
fn spawn_renewal(certs: Arc<CertManager>, trigger: ShutdownTrigger) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("zring-certs".into())
        .spawn(move || {
            let mut waited = Duration::ZERO;
            while !trigger.is_triggered() {
                std::thread::sleep(TICK);
                waited += TICK;
                if waited < certs.check_interval() {
                    continue;
                }
                waited = Duration::ZERO;
                for r in certs.renew_due(SystemTime::now()) {
                    match r {
                        Ok(id) => tracing::info!(identity = %id, "certificate renewed"),
                        Err(e) => tracing::warn!(error = %e, "certificate renewal failed; keeping the current one and retrying"),
                    }
                }
            }
        })?;
    Ok(())
}

/// How long a pod's connection waits for the config that names its workload (and so for the
/// workload's certificate) when the pod was handed over first.
pub const POD_WAIT: Duration = Duration::from_secs(5);

/// In-pod mode: wait, bounded by [`POD_WAIT`], until `ready` holds for the config in force;
/// returns the config to use (the last one seen if the wait ran out).
pub(crate) async fn wait_for_config(
    state: &State,
    ready: impl Fn(&MeshIndex) -> bool,
) -> Arc<MeshIndex> {
    let deadline = std::time::Instant::now() + POD_WAIT;
    loop {
        let index = state.index();
        if ready(&index) || std::time::Instant::now() >= deadline {
            return index;
        }
        monoio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long a removed pod's live connections may go on before they are closed.
pub const POD_DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Run a pod's connection, tracked by the pod's drain; once the pod is removed (the drain
/// starts), the connection has [`POD_DRAIN_DEADLINE`] to finish, then it is dropped (its
/// sockets closed).
fn spawn_pod_conn<F>(pod_drain: &Drain, fut: F)
where
    F: std::future::Future<Output = ()> + 'static,
{
    let d = pod_drain.clone();
    // Boxed: the select! below moves the captured future into its own slot, and an async block
    // keeps room for both; boxed, the task holds a pointer (idle connection: ~7 KiB, not ~28).
    let fut = Box::pin(fut);
    accept::spawn_tracked(pod_drain, async move {
        monoio::select! {
            _ = fut => {}
            _ = async {
                d.signaled().await;
                monoio::time::sleep(POD_DRAIN_DEADLINE).await;
            } => tracing::info!("pod removed: a connection still open after the drain deadline was closed"),
        }
    });
}

/// Bind a pod's listeners inside its namespace on this worker and start their accept loops;
/// the returned drain stops them.
fn pod_loops(
    state: &Arc<State>,
    pool: &Rc<HbonePool>,
    rr: &Rc<std::cell::Cell<usize>>,
    pod: &crate::zds::client::Pod,
) -> std::io::Result<(Drain, Vec<monoio::task::JoinHandle<()>>)> {
    let ns = pod.netns.clone();
    let bind = |port: u16| -> std::io::Result<monoio::net::TcpListener> {
        let addr = SocketAddr::from(([0, 0, 0, 0], port));
        let std = ns.run(|| net::bind_listener(addr, &ListenOptions::default()))??;
        monoio::net::TcpListener::from_std(std)
    };
    let (outbound, plaintext, hbone) = (bind(15001)?, bind(15006)?, bind(state.cfg.hbone_port)?);
    let pod_drain = Drain::new();
    let mut loops = Vec::new();
    let template = outbound::Outbound::new(state.clone(), pool.clone(), rr.clone()).for_pod(pod);
    // One accept loop per outbound listener; `socks` picks the SOCKS5 handshake over the
    // original destination of a captured connection.
    let outbound_loop = |listener: monoio::net::TcpListener, socks: bool| {
        let (o, d) = (template.clone(), pod_drain.clone());
        let out_addr = SocketAddr::from(([0, 0, 0, 0], 15001));
        monoio::spawn(async move {
            accept::accept_loop(listener, &d, |sock, peer| {
                let o = o.clone();
                if socks {
                    spawn_pod_conn(&d, o.socks(sock, peer));
                } else {
                    spawn_pod_conn(&d, o.captured(sock, peer, out_addr));
                }
            })
            .await;
        })
    };
    if state.cfg.socks5.is_some() {
        // SOCKS5 for the pod's own processes, on the pod's loopback (as ztunnel's 15080).
        let addr = SocketAddr::from(([127, 0, 0, 1], 15080));
        let std = ns.run(|| net::bind_listener(addr, &ListenOptions::default()))??;
        loops.push(outbound_loop(
            monoio::net::TcpListener::from_std(std)?,
            true,
        ));
    }
    loops.push(outbound_loop(outbound, false));
    let pt_addr = SocketAddr::from(([0, 0, 0, 0], 15006));
    let (s, d, n) = (state.clone(), pod_drain.clone(), ns.clone());
    loops.push(monoio::spawn(async move {
        accept::accept_loop(plaintext, &d, |sock, peer| {
            spawn_pod_conn(
                &d,
                inbound::plaintext(sock, peer, pt_addr, s.clone(), Some(n.clone())),
            );
        })
        .await;
    }));
    let (s, d, n) = (state.clone(), pod_drain.clone(), ns);
    loops.push(monoio::spawn(async move {
        accept::accept_loop(hbone, &d, |tcp, peer| {
            spawn_pod_conn(
                &d,
                inbound::hbone(tcp, peer, s.clone(), d.clone(), Some(n.clone())),
            );
        })
        .await;
    }));
    Ok((pod_drain, loops))
}

/// The worker's HBONE connection pool.
pub(crate) type HbonePool = Pool<TlsDialer, MonoioExecutor>;

fn pool(state: &Arc<State>) -> Rc<HbonePool> {
    let certs = state.certs.clone();
    let dialer = TlsDialer {
        config: Arc::new(move |key: &PoolKey| {
            certs
                .client_config(&key.src_id, vec![key.dst_id.clone()])
                .map_err(|e| std::io::Error::other(e.to_string()))
        }),
        connect: ConnectOptions {
            mark: state.cfg.mark,
            timeout: Some(DEFAULT_CONNECT_TIMEOUT),
            ..Default::default()
        },
        bind_source: state.cfg.bind_source,
        netns_of: state.cfg.zds_socket.as_ref().map(|_| {
            let s = state.clone();
            Arc::new(move |ip| s.netns_of(ip)) as crate::hbone_io::NetnsOf
        }),
    };
    Rc::new(Pool::new(
        dialer,
        MonoioExecutor,
        PoolSettings {
            h2: state.h2.clone(),
            ..Default::default()
        },
    ))
}

fn listen(
    what: &str,
    addr: SocketAddr,
    transparent: bool,
) -> std::io::Result<monoio::net::TcpListener> {
    let opts = ListenOptions {
        transparent,
        ..Default::default()
    };
    net::bind_monoio_listener(addr, &opts)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{what} listener {addr}: {e}")))
}

async fn worker(ctx: WorkerContext, state: Arc<State>) -> std::io::Result<()> {
    let drain = Drain::on_shutdown(ctx.shutdown);
    let pool = pool(&state);
    let rr = Rc::new(std::cell::Cell::new(ctx.index));
    let mut loops = Vec::new();
    if let Some(addr) = state.cfg.socks5 {
        let listener = listen("SOCKS5", addr, false)?;
        let (o, d) = (
            outbound::Outbound::new(state.clone(), pool.clone(), rr.clone()),
            drain.clone(),
        );
        loops.push(monoio::spawn(async move {
            accept::accept_loop(listener, &d, |sock, peer| {
                accept::spawn_tracked(&d, o.clone().socks(sock, peer));
            })
            .await;
        }));
    }
    if let Some(addr) = state.cfg.outbound {
        let listener = listen("outbound capture", addr, state.cfg.transparent)?;
        let (o, d) = (
            outbound::Outbound::new(state.clone(), pool.clone(), rr.clone()),
            drain.clone(),
        );
        loops.push(monoio::spawn(async move {
            accept::accept_loop(listener, &d, |sock, peer| {
                accept::spawn_tracked(&d, o.clone().captured(sock, peer, addr));
            })
            .await;
        }));
    }
    if let Some(addr) = state.cfg.inbound_plaintext {
        let listener = listen("inbound plaintext", addr, state.cfg.transparent)?;
        let (s, d) = (state.clone(), drain.clone());
        loops.push(monoio::spawn(async move {
            accept::accept_loop(listener, &d, |sock, peer| {
                accept::spawn_tracked(&d, inbound::plaintext(sock, peer, addr, s.clone(), None));
            })
            .await;
        }));
    }
    // Inbound HBONE listeners follow the config: one per local HBONE workload IP, bound when a
    // config naming it comes into force. (Listeners of workloads that left stay bound until
    // restart; connections to them are refused with 503 NR by `inbound::decide`.)
    let mut bound: HashSet<IpAddr> = HashSet::new();
    let mut seen = 0;
    // In-pod mode: per pod uid, the drain that stops its listeners.
    let mut pod_listeners: HashMap<String, Drain> = HashMap::new();
    let mut pods_seen = 0;
    let mut ticks = 0u64;
    loop {
        ticks += 1;
        if ticks.is_multiple_of(50) {
            // Idle HBONE connections are released even when no new connection comes.
            pool.sweep_all();
        }
        let g = state.generation();
        if g != seen {
            let index = state.index();
            let ips: Vec<IpAddr> = index
                .local_workloads(&state.cfg.node)
                .filter(|w| w.protocol == InboundProtocol::Hbone)
                .flat_map(|w| w.workload_ips.iter().copied())
                .collect();
            for ip in ips {
                if bound.contains(&ip) {
                    continue;
                }
                let addr = SocketAddr::new(ip, state.cfg.hbone_port);
                match listen("inbound HBONE", addr, false) {
                    Ok(listener) => {
                        bound.insert(ip);
                        let (s, d) = (state.clone(), drain.clone());
                        loops.push(monoio::spawn(async move {
                            accept::accept_loop(listener, &d, |tcp, peer| {
                                accept::spawn_tracked(
                                    &d,
                                    inbound::hbone(tcp, peer, s.clone(), d.clone(), None),
                                )
                            })
                            .await;
                        }));
                    }
                    Err(e) if ctx.index == 0 => {
                        tracing::error!(error = %e, "cannot listen for a local workload; its inbound traffic will fail")
                    }
                    Err(_) => {}
                }
            }
            seen = g;
            state.worker_at(ctx.index, g);
        }
        let pg = state.pods_generation.load(Ordering::Acquire);
        if pg != pods_seen {
            pods_seen = pg;
            let pods = state.pods_snapshot();
            let current: HashSet<&str> = pods.iter().map(|p| p.uid.as_str()).collect();
            pod_listeners.retain(|uid, d| {
                let keep = current.contains(uid.as_str());
                if !keep {
                    // Stops the pod's accept loops; its live connections finish on their own
                    // (bounded by the worker's drain at shutdown).
                    d.start();
                    if ctx.index == 0 {
                        tracing::info!(uid = %uid, "pod removed: its listeners are closed");
                    }
                }
                keep
            });
            for pod in pods {
                if pod_listeners.contains_key(&pod.uid) {
                    continue;
                }
                match pod_loops(&state, &pool, &rr, &pod) {
                    Ok((pod_drain, mut l)) => {
                        loops.append(&mut l);
                        pod_listeners.insert(pod.uid.clone(), pod_drain);
                        if ctx.index == 0 {
                            tracing::info!(uid = %pod.uid, pod = %pod.info.name, namespace = %pod.info.namespace, "pod listeners bound in its network namespace (15001, 15006, 15008)");
                        }
                    }
                    Err(e) => {
                        tracing::error!(uid = %pod.uid, error = %e, "cannot listen inside the pod's network namespace")
                    }
                }
            }
        }
        monoio::select! {
            _ = drain.signaled() => break,
            _ = monoio::time::sleep(TICK) => {}
        }
    }
    for d in pod_listeners.values() {
        d.start();
    }
    for l in loops {
        l.await;
    }
    drain.wait_idle(DEFAULT_DRAIN_TIMEOUT).await;
    // Close pooled HBONE connections and let their tasks finish (GOAWAY) before the runtime
    // goes away, bounded: the drain deadline has already cut what was still live.
    pool.close();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while MonoioExecutor::live_tasks() > 0 && std::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// One connection's telemetry: its metric labels and access-log fields. Counted as opened
/// when the upstream side is established ([`ConnLog::established`]); closed exactly once, which
/// writes the access-log line and adds the bytes. A connection refused before it was
/// established is counted opened and closed with its response flags (as ztunnel reports a
/// denied connection).
pub(crate) struct ConnLog {
    pub direction: &'static str,
    pub path: &'static str,
    pub src: SocketAddr,
    pub src_identity: Option<zring_hbone::SpiffeId>,
    pub dst: SocketAddr,
    pub dst_hbone: Option<SocketAddr>,
    pub dst_identity: Option<zring_hbone::SpiffeId>,
    pub labels: crate::metrics::ConnLabels,
    pub start: std::time::Instant,
    opened: bool,
}

impl ConnLog {
    /// A connection from `src` to `dst`, labelled `labels`.
    pub fn new(
        direction: &'static str,
        path: &'static str,
        src: SocketAddr,
        dst: SocketAddr,
        labels: crate::metrics::ConnLabels,
        start: std::time::Instant,
    ) -> Self {
        ConnLog {
            direction,
            path,
            src,
            src_identity: None,
            dst,
            dst_hbone: None,
            dst_identity: None,
            labels,
            start,
            opened: false,
        }
    }

    /// The upstream side is established: count the connection as opened.
    pub fn established(&mut self, state: &State) {
        if !self.opened {
            self.opened = true;
            state.metrics.opened(&self.labels);
        }
    }

    /// Close with `flags` (`-` for a normal close), bytes towards the destination and back.
    pub fn close(
        mut self,
        state: &State,
        flags: &'static str,
        sent: u64,
        received: u64,
        error: Option<String>,
    ) {
        self.labels.response_flags = flags;
        if !self.opened {
            state.metrics.opened(&self.labels);
        }
        state.metrics.closed(&self.labels, sent, received);
        let service = self
            .labels
            .service
            .as_ref()
            .map(|s| s.0.as_str())
            .unwrap_or("");
        let id = |i: &Option<zring_hbone::SpiffeId>| {
            i.as_ref().map(|i| i.to_string()).unwrap_or_default()
        };
        tracing::info!(
            target: "access",
            direction = self.direction,
            path = self.path,
            src.addr = %self.src,
            src.identity = %id(&self.src_identity),
            dst.addr = %self.dst,
            dst.hbone = %self.dst_hbone.map(|a| a.to_string()).unwrap_or_default(),
            dst.identity = %id(&self.dst_identity),
            dst.service = service,
            bytes_sent = sent,
            bytes_recv = received,
            duration_ms = (self.start.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            response_flags = flags,
            error = error.as_deref().unwrap_or(""),
            "connection complete"
        );
    }
}
