//! What the workers and the control threads share: the settings of `zring run` and the
//! state behind them (the config snapshot, certificates, metrics, pods).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Condvar, Mutex, RwLock,
    },
    time::{Duration, SystemTime},
};

use anyhow::Context;
use zring_hbone::H2Settings;
use zring_runtime::WorkerConfig;

use crate::{
    config::{
        index::{Change, Delta, MeshIndex},
        LocalConfig,
    },
    identity::CertManager,
    metrics::Metrics,
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
    /// Handshake, response and keepalive limits; the handshake cap.
    pub limits: super::Limits,
    /// On SIGTERM, and when a pod leaves: how long live connections may go on before they are
    /// closed.
    pub drain_timeout: Duration,
    /// The DNS proxy (15053): in each pod's namespace in in-pod mode, else in zring's own.
    /// None: off (ztunnel's `ISTIO_META_DNS_CAPTURE=false`).
    pub dns: Option<crate::dns::DnsSettings>,
    /// Lifetime of the workload certificates a local CA issues (`SECRET_TTL`, default 24 h).
    pub cert_ttl: Duration,
    /// The config from a control plane over xDS instead of the file (`config` is then unused).
    pub xds: Option<crate::xds::client::XdsSettings>,
    /// Waypoint mode (`zring waypoint`): CONNECT streams to local workloads are served at L7
    /// instead of being delivered.
    pub waypoint: Option<crate::waypoint::WaypointSettings>,
}

impl RunConfig {
    /// Whether `port` is one of zring's own listeners that no tunnel and no outbound
    /// connection may target on a workload's or zring's address (ztunnel's `illegal_ports`):
    /// outbound 15001, inbound plaintext 15006, HBONE and SOCKS5 always; in node mode, where
    /// workloads share zring's addresses, also admin, stats, readiness and DNS.
    pub fn own_port(&self, port: u16) -> bool {
        let always = [
            self.outbound.map_or(15001, |a| a.port()),
            self.inbound_plaintext.map_or(15006, |a| a.port()),
            15001,
            15006,
            self.hbone_port,
        ];
        if always.contains(&port) || self.socks5.is_some_and(|a| a.port() == port) {
            return true;
        }
        self.zds_socket.is_none()
            && [
                self.admin,
                self.stats,
                self.readiness,
                self.dns.as_ref().map(|d| d.addr),
            ]
            .iter()
            .flatten()
            .any(|a| a.port() == port)
    }

    /// Whether plain TCP to `dst` from a workload whose addresses are `own` would reach zring
    /// itself (ztunnel's outbound self-call check, widened): one of zring's ports on loopback
    /// or on the workload's own address; in node mode also any address zring listens on
    /// (admin, stats, readiness, DNS, SOCKS5), an unspecified bind matching every local
    /// address. Mesh workloads and services are routed before this, and stay reachable.
    pub fn reaches_self(&self, dst: SocketAddr, own: &[std::net::IpAddr]) -> bool {
        if (dst.ip().is_loopback() || own.contains(&dst.ip())) && self.own_port(dst.port()) {
            return true;
        }
        if self.zds_socket.is_some() {
            // In-pod mode: the socket is made in the pod's namespace, where only the pod's
            // own addresses reach zring's listeners (checked above).
            return false;
        }
        let local = || std::net::UdpSocket::bind(SocketAddr::new(dst.ip(), 0)).is_ok();
        [
            self.admin,
            self.stats,
            self.readiness,
            self.socks5,
            self.outbound,
            self.inbound_plaintext,
            self.dns.as_ref().map(|d| d.addr),
        ]
        .iter()
        .flatten()
        .any(|l| *l == dst || (l.ip().is_unspecified() && l.port() == dst.port() && local()))
    }
}

/// Where the local workloads' certificates come from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// Issued by the local CA in this directory (`root-cert.pem`, `root-key.pem`).
    Ca(PathBuf),
    /// Read from a certificate directory (`root-cert.pem`, `<ns>/<sa>/cert-chain.pem` and
    /// `key.pem`), re-read when the files change.
    Files(PathBuf),
    /// From Istio's CA over gRPC (`CA_ADDRESS`): istiod or `zring control-plane`.
    IstioCa(crate::xds::ca_client::CaClientSettings),
}

/// How often the config file is checked for changes (SIGHUP is seen within `TICK`).
pub const CONFIG_CHECK: Duration = Duration::from_secs(1);
pub(super) const TICK: Duration = Duration::from_millis(100);

/// Everything the workers and the control threads share.
#[derive(Debug)]
pub struct State {
    /// Settings.
    pub cfg: RunConfig,
    pub(super) index: RwLock<Arc<MeshIndex>>,
    /// 0 until a config is in force, then +1 per accepted reload.
    pub(super) generation: AtomicU64,
    /// Certificates of local identities.
    pub certs: Arc<CertManager>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// HTTP/2 settings of HBONE connections.
    pub h2: H2Settings,
    /// The generation each worker has bound listeners for.
    pub(super) worker_generation: Mutex<HashMap<usize, u64>>,
    pub(super) workers: AtomicUsize,
    pub(super) last_error: Mutex<Option<String>>,
    /// Pods handed over by the node agent (in-pod mode).
    pub(super) pods: Mutex<Pods>,
    /// +1 whenever `pods` changes.
    pub(super) pods_generation: AtomicU64,
    /// Pods being added: each worker's bind result (None until it reports). `add` waits on
    /// `pod_binds_done` until every worker has reported.
    pub(super) pod_binds: Mutex<HashMap<String, Vec<BindReport>>>,
    pub(super) pod_binds_done: Condvar,
    /// Listeners a worker failed to bind, `(worker, address)` -> error; not ready while any.
    pub(super) bind_failures: Mutex<BTreeMap<(usize, String), String>>,
    /// The DNS proxy's thread, when on.
    pub(super) dns: std::sync::OnceLock<crate::dns::Dns>,
    /// With xDS: type url -> resource name -> version, as last received.
    pub(super) resource_versions: Mutex<BTreeMap<String, BTreeMap<String, String>>>,
    /// Waypoint mode: the L7 rules and request metrics.
    pub waypoint: Option<Arc<crate::waypoint::Waypoint>>,
}

/// One worker's answer to a pod's bind: None until it has tried.
pub(super) type BindReport = Option<Result<(), String>>;

/// The pods of in-pod mode.
#[derive(Debug, Default)]
pub(super) struct Pods {
    pub(super) by_uid: std::collections::BTreeMap<String, Arc<crate::zds::client::Pod>>,
    pub(super) netns_by_ip: HashMap<IpAddr, Arc<zring_runtime::net::NetNs>>,
}

impl crate::admin::Source for State {
    fn metrics_text(&self) -> String {
        let mut text = self.metrics.render();
        let now = SystemTime::now();
        let _ = std::fmt::Write::write_str(&mut text, "# HELP zring_certificate_expiry_seconds Seconds until each local identity's certificate expires.\n# TYPE zring_certificate_expiry_seconds gauge\n");
        for (id, exp) in self.certs.expiries() {
            let left = exp.duration_since(now).map_or(0, |d| d.as_secs());
            let _ = std::fmt::Write::write_fmt(
                &mut text,
                format_args!("zring_certificate_expiry_seconds{{identity=\"{id}\"}} {left}\n"),
            );
        }
        let _ = std::fmt::Write::write_fmt(
            &mut text,
            format_args!(
                "# HELP zring_ca_errors_total Failed calls to the certificate authority.\n# TYPE zring_ca_errors_total counter\nzring_ca_errors_total {}\n",
                self.certs.ca_errors()
            ),
        );
        if let Some(d) = self.dns.get() {
            d.metrics.render(&mut text);
        }
        if let Some(w) = &self.waypoint {
            w.metrics.render(&mut text);
        }
        text
    }
    fn not_ready(&self) -> Option<String> {
        State::not_ready(self)
    }
    fn config_dump(&self) -> String {
        State::config_dump(self)
    }
    fn rejected(&self, listener: &'static str) {
        self.metrics.handshake_rejected(listener);
    }
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
                None => match &self.cfg.xds {
                    Some(x) => {
                        format!("waiting for the first xDS push from {}", x.upstream.address)
                    }
                    None => format!("waiting for the config file {}", self.cfg.config.display()),
                },
            });
        }
        if let Some(((worker, addr), e)) = self
            .bind_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .next()
        {
            return Some(format!("worker {worker} cannot listen on {addr}: {e}"));
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
            "configSource": self.config_source(),
            "generation": self.generation(),
            "workloads": index.workloads().collect::<Vec<_>>(),
            "services": index.services().collect::<Vec<_>>(),
            "policies": index.policies().collect::<Vec<_>>(),
            "certificates": certs,
            "resourceVersions": *self.resource_versions.lock().unwrap_or_else(|p| p.into_inner()),
            "waypoint": self.waypoint.as_ref().map(|w| w.dump()),
        });
        serde_json::to_string_pretty(&dump).unwrap_or_default()
    }

    /// Where the config comes from: `file:<path>` or `xds:<address>`.
    pub fn config_source(&self) -> String {
        match &self.cfg.xds {
            Some(x) => format!("xds:{}", x.upstream.address),
            None => format!("file:{}", self.cfg.config.display()),
        }
    }

    /// Put `config` in force: issue the certificates of its local identities first, so that no
    /// connection ever finds its workload without one.
    pub(crate) fn install(&self, config: LocalConfig) -> anyhow::Result<u64> {
        let started = std::time::Instant::now();
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
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(index);
        self.metrics.config_applied(started.elapsed());
        Ok(self.in_force(ids.len()))
    }

    /// Apply `delta` to the config in force (the xDS path): O(what changed), whatever the
    /// total. New local identities' certificates are fetched: from Istio's CA in the
    /// background (a connection that needs one first moves it to the front), from a local CA
    /// at once; a failure is reported (naming the workload), the certificate is fetched again
    /// when a connection needs it, and the change applies regardless: the control plane does
    /// not send it twice.
    pub(crate) fn apply_delta(&self, delta: Delta) -> (u64, Vec<String>) {
        let started = std::time::Instant::now();
        let mut errors = Vec::new();
        let mut ids = HashSet::new();
        for (name, change) in &delta {
            let Change::Workload(w) = change else {
                continue;
            };
            if w.node != self.cfg.node {
                continue;
            }
            match w.identity() {
                Ok(id) if ids.insert(id.clone()) => {
                    if let Err(e) = self.certs.prefetch(&id) {
                        errors.push(format!("{name}: certificate: {e}"));
                    }
                }
                Ok(_) => {}
                Err(e) => errors.push(format!("{name}: identity: {e}")),
            }
        }
        {
            let mut current = self.index.write().unwrap_or_else(|p| p.into_inner());
            let next = current.apply(delta);
            *current = Arc::new(next);
        }
        self.metrics.config_applied(started.elapsed());
        (self.in_force(ids.len()), errors)
    }

    /// A new config version is in force: count it, tell the pods, log it.
    fn in_force(&self, identities: usize) -> u64 {
        let index = self.index();
        let (w, s, p) = index.counts();
        let mut l = 0;
        let local: HashSet<_> = index
            .local_workloads(&self.cfg.node)
            .inspect(|_| l += 1)
            .filter_map(|w| w.identity().ok())
            .collect();
        drop(index);
        let forgotten = self.certs.retain(&local);
        if forgotten > 0 {
            tracing::info!(
                identities = forgotten,
                "certificates of identities no longer on this node dropped (not renewed)"
            );
        }
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        // Pods' addresses come from the config: a pod handed over before its workload was
        // known gets its address (and so its namespace for upstream sockets) now.
        self.pods_changed(|_| {});
        tracing::info!(source = %self.config_source(), generation = g, workloads = w, services = s, policies = p, local_workloads = l, identities, "config in force");
        g
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

    pub(super) fn pods_snapshot(&self) -> Vec<Arc<crate::zds::client::Pod>> {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_uid
            .values()
            .cloned()
            .collect()
    }

    pub(super) fn pods_changed(&self, f: impl FnOnce(&mut Pods)) {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut pods);
        let index = self.index();
        pods.netns_by_ip = pods
            .by_uid
            .values()
            .flat_map(|p| {
                index
                    .workloads_of_pod(&p.info.namespace, &p.info.name)
                    .flat_map(|w| w.workload_ips.iter().map(|ip| (*ip, p.netns.clone())))
                    .collect::<Vec<_>>()
            })
            .collect();
        self.pods_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A worker's bind of `addr` failed (`Some(error)`) or succeeded (`None`, clearing an
    /// earlier failure).
    pub(super) fn bind_result(&self, worker: usize, addr: String, error: Option<String>) {
        let mut f = self.bind_failures.lock().unwrap_or_else(|p| p.into_inner());
        match error {
            Some(e) => {
                f.insert((worker, addr), e);
            }
            None => {
                f.remove(&(worker, addr));
            }
        }
    }

    /// Worker `worker` has bound pod `uid`'s listeners (or failed to).
    pub(super) fn pod_bound(&self, uid: &str, worker: usize, result: Result<(), String>) {
        let mut binds = self.pod_binds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = binds.get_mut(uid).and_then(|v| v.get_mut(worker)) {
            *slot = Some(result);
            self.pod_binds_done.notify_all();
        }
    }

    pub(super) fn worker_at(&self, worker: usize, g: u64) {
        self.worker_generation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(worker, g);
    }
}
