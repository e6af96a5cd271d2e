//! Start-up and the control threads: the config watcher, certificate renewal, and the ZDS
//! pod handler. Nothing here runs per connection.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Condvar, Mutex, RwLock,
    },
    time::{Duration, SystemTime},
};

use anyhow::Context;
use zring_hbone::{
    ca::LocalCa,
    settings::{TimeoutHook, Timeouts},
    H2Settings,
};
use zring_runtime::{ShutdownTrigger, Workers};

use super::{
    state::{Pods, CONFIG_CHECK, TICK},
    worker::worker,
    CertSource, RunConfig, State,
};
use crate::{
    admin,
    config::{index::MeshIndex, LocalConfig},
    identity::CertManager,
    metrics::Metrics,
};

/// Run the node proxy until shutdown.
pub fn run(cfg: RunConfig, trigger: &ShutdownTrigger) -> anyhow::Result<()> {
    if let Err(e) = zring_runtime::sys::raise_nofile_limit() {
        tracing::warn!(error = %e, "cannot raise the open-file limit");
    }
    let certs = match &cfg.certs {
        CertSource::Ca(dir) => CertManager::new(
            LocalCa::load_dir(dir)
                .with_context(|| format!("loading the CA from {}", dir.display()))?,
            cfg.cert_ttl,
        ),
        CertSource::Files(dir) => CertManager::from_dir(dir)
            .with_context(|| format!("loading the trust bundle from {}", dir.display()))?,
        CertSource::IstioCa(s) => CertManager::remote(
            crate::xds::ca_client::IstioCa::new(s.clone())?,
            cfg.cert_ttl,
        )
        .with_context(|| format!("loading the trust bundle from {}", s.root_ca.display()))?,
    };
    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(State {
        cfg: cfg.clone(),
        index: RwLock::new(Arc::new(MeshIndex::new(LocalConfig::default()))),
        generation: AtomicU64::new(0),
        certs: Arc::new(certs),
        metrics: metrics.clone(),
        h2: H2Settings {
            timeouts: Timeouts {
                hook: Some(TimeoutHook(Arc::new(move |kind| metrics.timeout(kind)))),
                ..cfg.limits.timeouts.clone()
            },
            ..H2Settings::default()
        },
        worker_generation: Mutex::new(HashMap::new()),
        workers: AtomicUsize::new(0),
        last_error: Mutex::new(None),
        pods: Mutex::new(Pods::default()),
        pods_generation: AtomicU64::new(0),
        pod_binds: Mutex::new(HashMap::new()),
        pod_binds_done: Condvar::new(),
        bind_failures: Mutex::new(Default::default()),
        dns: Default::default(),
        resource_versions: Default::default(),
        waypoint: cfg
            .waypoint
            .clone()
            .map(|w| Arc::new(crate::waypoint::Waypoint::new(w))),
    });
    if let Some(settings) = cfg.dns.clone() {
        let s = Arc::downgrade(&state);
        let dns = crate::dns::Dns::start(
            settings,
            Arc::new(move || {
                s.upgrade().map_or_else(
                    || Arc::new(MeshIndex::new(LocalConfig::default())),
                    |s| s.index(),
                )
            }),
        )
        .context("starting the DNS proxy thread")?;
        if cfg.zds_socket.is_none() {
            // Not in-pod: one server in zring's own namespace. A port in use is logged and
            // counted, not fatal: DNS is an add-on to the traffic zring carries.
            match crate::dns::bind(dns.settings.addr) {
                Ok(b) => dns.serve(
                    "",
                    crate::dns::Client {
                        server: 0,
                        namespace: None,
                        netns: None,
                    },
                    b,
                ),
                Err(e) => {
                    dns.metrics.bind_failed();
                    tracing::error!(addr = %dns.settings.addr, error = %e, "DNS proxy not started: cannot bind");
                }
            }
        }
        let _ = state.dns.set(dns);
    }
    // A file that exists must be valid at start: a typo fails fast. A missing file is waited
    // for (not ready meanwhile): the config may be mounted after the proxy starts. With xDS,
    // the config comes from the control plane instead.
    let first = match &cfg.xds {
        Some(_) => None,
        None => match std::fs::read(&cfg.config) {
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
        },
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
    match cfg.xds.clone() {
        None => spawn_config_watch(state.clone(), first, trigger.clone())?,
        Some(x) => {
            let (s, t) = (state.clone(), trigger.clone());
            std::thread::Builder::new()
                .name("zring-xds".into())
                .spawn(move || {
                    if let Err(e) = crate::xds::client::run(x, XdsSink(s), move || t.is_triggered())
                    {
                        tracing::error!(error = %format!("{e:#}"), "the xDS client stopped");
                    }
                })?;
        }
    }
    spawn_renewal(state.certs.clone(), trigger.clone())?;
    if let Some(wp) = &state.waypoint {
        // A resource file that exists must be valid at start, as the mesh config.
        let domain = state.index().cluster_domain().to_string();
        wp.reload(&domain)
            .map_err(|e| anyhow::anyhow!("waypoint resources: {e}"))?;
        let (s, t) = (Arc::downgrade(&state), trigger.clone());
        wp.spawn_watch(
            move || {
                s.upgrade()
                    .map(|s| s.index().cluster_domain().to_string())
                    .unwrap_or_default()
            },
            move || t.is_triggered(),
        )?;
    }
    let s = state.clone();
    let workers = Workers::start(&cfg.workers, trigger, move |ctx| worker(ctx, s.clone()))?;
    state.workers.store(workers.len(), Ordering::Release);
    state
        .metrics
        .set_io(workers.backend().to_string(), workers.len());
    // Pods are taken only once the workers exist: an AddWorkload is acked after every worker
    // has bound the pod's listeners.
    if let Some(path) = cfg.zds_socket.clone() {
        let (s, t) = (state.clone(), trigger.clone());
        std::thread::Builder::new()
            .name("zring-zds".into())
            .spawn(move || crate::zds::client::run(path, &mut ProxyPods(s), &t))?;
    }

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

/// Where the xDS client's configs and events go: the same install as a file reload.
struct XdsSink(Arc<State>);

impl crate::xds::client::Sink for XdsSink {
    fn apply(
        &self,
        delta: crate::config::index::Delta,
        versions: Vec<crate::xds::client::VersionChange>,
    ) -> Result<(), Vec<String>> {
        {
            let mut held = self
                .0
                .resource_versions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (type_url, name, version) in versions {
                let of_type = held.entry(type_url).or_default();
                match version {
                    Some(v) => of_type.insert(name, v),
                    None => of_type.remove(&name),
                };
            }
        }
        let (g, errors) = self.0.apply_delta(delta);
        self.0.metrics.reload(errors.is_empty(), g);
        *self.0.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
            (!errors.is_empty()).then(|| errors.join("; "));
        match errors.is_empty() {
            true => Ok(()),
            false => Err(errors),
        }
    }
    fn event(&self, e: crate::xds::client::Event<'_>) {
        self.0.metrics.xds_event(&e);
    }
}

/// How long an `AddWorkload` waits for the workers to bind the pod's listeners.
pub const POD_BIND_WAIT: Duration = Duration::from_secs(10);

/// In-pod mode's pod handler: pods are recorded, workers bind their listeners, and the add is
/// acked once they all have.
struct ProxyPods(Arc<State>);

impl crate::zds::client::PodHandler for ProxyPods {
    fn add(&mut self, pod: crate::zds::client::Pod) -> Result<(), String> {
        let state = &self.0;
        let known = state
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_uid
            .get(&pod.uid)
            .map(|p| p.netns_id);
        if known == Some(pod.netns_id) {
            // The agent replaying its snapshot: same pod, same namespace, listeners in place.
            return Ok(());
        }
        let index = state.index();
        if index
            .workloads_of_pod(&pod.info.namespace, &pod.info.name)
            .next()
            .is_none()
        {
            tracing::warn!(pod = %pod.info.name, namespace = %pod.info.namespace, "no workload in the config for this pod yet; its outbound connections leave from zring's namespace until one appears");
        }
        drop(index);
        if let Some(dns) = state.dns.get() {
            // Bound first: a pod whose DNS cannot be served is refused whole (the agent retries).
            let bound = pod
                .netns
                .run(|| crate::dns::bind(dns.settings.addr))
                .and_then(|r| r);
            match bound {
                Ok(b) => dns.serve(
                    &pod.uid,
                    crate::dns::Client {
                        server: 0,
                        namespace: Some(pod.info.namespace.clone()),
                        netns: Some(pod.netns.clone()),
                    },
                    b,
                ),
                Err(e) => {
                    dns.metrics.bind_failed();
                    return Err(format!(
                        "cannot serve pod {}: binding the DNS proxy at {} in its network namespace: {e}",
                        pod.uid, dns.settings.addr
                    ));
                }
            }
        }
        let uid = pod.uid.clone();
        let workers = state.workers.load(Ordering::Acquire);
        state
            .pod_binds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.clone(), vec![None; workers]);
        state.pods_changed(|p| {
            p.by_uid.insert(uid.clone(), Arc::new(pod));
        });
        // Ack only once every worker has bound the pod's listeners (or one failed).
        let deadline = std::time::Instant::now() + POD_BIND_WAIT;
        let mut binds = state.pod_binds.lock().unwrap_or_else(|p| p.into_inner());
        let results = loop {
            let done = binds
                .get(&uid)
                .is_none_or(|v| v.iter().all(Option::is_some));
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if done || left.is_zero() {
                break binds.remove(&uid).unwrap_or_default();
            }
            binds = state
                .pod_binds_done
                .wait_timeout(binds, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        drop(binds);
        let errors: Vec<String> = results
            .iter()
            .enumerate()
            .filter_map(|(w, r)| match r {
                Some(Ok(())) => None,
                Some(Err(e)) => Some(format!("worker {w}: {e}")),
                None => Some(format!("worker {w} did not bind within {POD_BIND_WAIT:?}")),
            })
            .collect();
        if errors.is_empty() {
            return Ok(());
        }
        // No half-served pod: the workers that did bind close the listeners again.
        state.pods_changed(|p| {
            p.by_uid.remove(&uid);
        });
        if let Some(dns) = state.dns.get() {
            dns.stop(&uid);
        }
        Err(format!("cannot serve pod {uid}: {}", errors.join("; ")))
    }
    fn del(&mut self, uid: &str) -> Result<(), String> {
        self.0.pods_changed(|p| {
            p.by_uid.remove(uid);
        });
        if let Some(dns) = self.0.dns.get() {
            dns.stop(uid);
        }
        Ok(())
    }
    fn retain(&mut self, keep: &HashSet<String>) {
        self.0
            .pods_changed(|p| p.by_uid.retain(|uid, _| keep.contains(uid)));
        if let Some(dns) = self.0.dns.get() {
            dns.retain(keep);
        }
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
