//! One worker: its HBONE pool, its listeners (node and pods), and the loop that follows config
//! and pod changes until the drain.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    rc::Rc,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use monoio::task::JoinHandle;
use zring_hbone::pool::{Pool, PoolKey, PoolSettings};
use zring_runtime::{
    drain::Drain,
    net::{self, ConnectOptions, ListenOptions},
    server as accept, WorkerContext,
};

use super::{inbound, outbound, pods::pod_loops, state::TICK, HandshakeGate, State};
use crate::{
    config::InboundProtocol,
    hbone_io::{MonoioExecutor, TlsDialer},
    proxy::DEFAULT_CONNECT_TIMEOUT,
};

/// The worker's HBONE connection pool.
pub(crate) type HbonePool = Pool<TlsDialer, MonoioExecutor>;

pub(super) fn pool(state: &Arc<State>) -> Rc<HbonePool> {
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
        timeouts: state.h2.timeouts.clone(),
        tcp_keepalive: state.cfg.limits.tcp_keepalive,
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

pub(super) fn listen(
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

/// Ticks between two reports of live connections' bytes ([`crate::metrics::LIVE_BYTES_INTERVAL`]).
const LIVE_REPORT_TICKS: u64 =
    crate::metrics::LIVE_BYTES_INTERVAL.as_millis() as u64 / TICK.as_millis() as u64;

pub(super) async fn worker(ctx: WorkerContext, state: Arc<State>) -> std::io::Result<()> {
    let drain = Drain::on_shutdown(ctx.shutdown);
    let pool = pool(&state);
    let rr = Rc::new(std::cell::Cell::new(ctx.index));
    let mut loops = Vec::new();
    let limit = state.cfg.limits.max_handshakes;
    if let Some(addr) = state.cfg.socks5 {
        let listener = listen("SOCKS5", addr, false)?;
        let (o, d) = (
            outbound::Outbound::new(state.clone(), pool.clone(), rr.clone()),
            drain.clone(),
        );
        let gate = HandshakeGate::new("socks5", limit, state.metrics.clone());
        loops.push(monoio::spawn(async move {
            accept::accept_loop(listener, &d, |sock, conn| {
                let Some(permit) = gate.enter() else { return };
                accept::spawn_tracked(&d, conn, o.clone().socks(sock, conn.peer, permit));
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
            accept::accept_loop(listener, &d, |sock, conn| {
                accept::spawn_tracked(&d, conn, o.clone().captured(sock, conn.peer, addr));
            })
            .await;
        }));
    }
    if let Some(addr) = state.cfg.inbound_plaintext {
        let listener = listen("inbound plaintext", addr, state.cfg.transparent)?;
        let (s, d) = (state.clone(), drain.clone());
        loops.push(monoio::spawn(async move {
            accept::accept_loop(listener, &d, |sock, conn| {
                let fut = inbound::plaintext(sock, conn.peer, addr, s.clone(), None);
                accept::spawn_tracked(&d, conn, fut);
            })
            .await;
        }));
    }
    let mut listeners = Listeners {
        ctx_index: ctx.index,
        state: state.clone(),
        drain: drain.clone(),
        hbone_gate: HandshakeGate::new("hbone", limit, state.metrics.clone()),
        pool: pool.clone(),
        hbone: HashMap::new(),
        hbone_failed: HashSet::new(),
        config_seen: 0,
        pods: HashMap::new(),
        pods_seen: 0,
    };
    let mut ticks = 0u64;
    loop {
        ticks += 1;
        if ticks.is_multiple_of(50) {
            // Idle HBONE connections are released even when no new connection comes, and the
            // memory a burst of connections left behind goes back to the OS.
            pool.sweep_all();
            zring_runtime::sys::release_free_memory();
        }
        if ticks.is_multiple_of(LIVE_REPORT_TICKS) {
            // Live connections' bytes show before they close.
            super::telemetry::report_live();
        }
        #[cfg(feature = "test-hooks")]
        super::test_hooks::maybe_panic_worker(ctx.index, ticks);
        // A failed bind is retried every second (readiness says why meanwhile).
        listeners.sync_hbone(ticks.is_multiple_of(10));
        listeners.sync_pods(&pool, &rr);
        monoio::select! {
            _ = drain.signaled() => break,
            _ = monoio::time::sleep(TICK) => {}
        }
    }
    // Shutdown: every listener stops; node and pod connections alike get the drain timeout.
    let deadline = std::time::Instant::now() + state.cfg.drain_timeout;
    for l in loops {
        l.await;
    }
    listeners.shutdown(deadline).await;
    drain
        .wait_idle(deadline.saturating_duration_since(std::time::Instant::now()))
        .await;
    // Close pooled HBONE connections and let their tasks finish (GOAWAY) before the runtime
    // goes away, bounded: the drain deadline has already cut what was still live.
    pool.close();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while MonoioExecutor::live_tasks() > 0 && std::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// A worker's listeners that follow the config and the pods: the inbound HBONE listener of
/// each local workload IP (node mode) and each pod's listeners (in-pod mode). Each has its
/// own stop drain; node-mode connections stay tracked by the worker's drain, a pod's by the
/// pod's drain.
struct Listeners {
    ctx_index: usize,
    state: Arc<State>,
    drain: Drain,
    hbone_gate: HandshakeGate,
    /// The worker's HBONE pool (a waypoint's upstream connections).
    pool: Rc<HbonePool>,
    /// Local workload IP -> the drain that stops its 15008 listener, and the accept loop.
    hbone: HashMap<IpAddr, (Drain, JoinHandle<()>)>,
    /// IPs whose listener could not be bound (retried).
    hbone_failed: HashSet<IpAddr>,
    config_seen: u64,
    /// Pod uid -> its namespace's inode, its drain, its accept loops.
    pods: HashMap<String, (u64, Drain, Vec<JoinHandle<()>>)>,
    pods_seen: u64,
}

impl Listeners {
    /// Bind the 15008 listeners of local HBONE workloads that appeared (or whose bind failed
    /// earlier, when `retry`), close those of workloads that left.
    fn sync_hbone(&mut self, retry: bool) {
        let g = self.state.generation();
        let retry_now = retry && !self.hbone_failed.is_empty();
        if g == self.config_seen && !retry_now {
            return;
        }
        if self.state.cfg.zds_socket.is_some() {
            // In-pod mode: each pod's 15008 lives in its own namespace (`sync_pods`); the
            // workloads' addresses do not exist in zring's.
            self.config_seen = g;
            self.state.worker_at(self.ctx_index, g);
            return;
        }
        let index = self.state.index();
        let ips: HashSet<IpAddr> = index
            .local_workloads(&self.state.cfg.node)
            .filter(|w| w.protocol == InboundProtocol::Hbone)
            .flat_map(|w| w.workload_ips.iter().copied())
            .collect();
        drop(index);
        let first = self.ctx_index == 0;
        self.hbone.retain(|ip, (stop, _)| {
            let keep = ips.contains(ip);
            if !keep {
                stop.start();
                if first {
                    tracing::info!(ip = %ip, "workload left the config: its inbound HBONE listener is closed");
                }
            }
            keep
        });
        // A workload that left is no longer a bind failure either.
        let (state, worker, port) = (&self.state, self.ctx_index, self.state.cfg.hbone_port);
        self.hbone_failed.retain(|ip| {
            let keep = ips.contains(ip);
            if !keep {
                state.bind_result(worker, SocketAddr::new(*ip, port).to_string(), None);
            }
            keep
        });
        for ip in ips {
            if !self.hbone.contains_key(&ip) {
                self.bind_hbone(ip);
            }
        }
        self.config_seen = g;
        self.state.worker_at(self.ctx_index, g);
    }

    fn bind_hbone(&mut self, ip: IpAddr) {
        let addr = SocketAddr::new(ip, self.state.cfg.hbone_port);
        let listener = match listen("inbound HBONE", addr, false) {
            Ok(l) => l,
            Err(e) => {
                if self.hbone_failed.insert(ip) {
                    tracing::error!(worker = self.ctx_index, error = %e, "cannot listen for a local workload; its inbound traffic will fail (retried every second; not ready meanwhile)");
                }
                self.state
                    .bind_result(self.ctx_index, addr.to_string(), Some(e.to_string()));
                return;
            }
        };
        if self.hbone_failed.remove(&ip) {
            tracing::info!(worker = self.ctx_index, %addr, "inbound HBONE listener bound after an earlier failure");
        }
        self.state
            .bind_result(self.ctx_index, addr.to_string(), None);
        let stop = Drain::new();
        let (s, d, gate, pool) = (
            self.state.clone(),
            self.drain.clone(),
            self.hbone_gate.clone(),
            self.pool.clone(),
        );
        let st = stop.clone();
        let handle = monoio::spawn(async move {
            accept::accept_loop(listener, &st, |tcp, conn| {
                let Some(permit) = gate.enter() else { return };
                let fut = inbound::hbone(
                    tcp,
                    conn.peer,
                    s.clone(),
                    d.clone(),
                    None,
                    permit,
                    pool.clone(),
                );
                accept::spawn_tracked(&d, conn, fut)
            })
            .await;
        });
        self.hbone.insert(ip, (stop, handle));
    }

    /// Follow the pods: stop the listeners of pods that left (or moved to another network
    /// namespace), bind those of new pods, and report each bind to the pod's `AddWorkload`.
    fn sync_pods(&mut self, pool: &Rc<HbonePool>, rr: &Rc<std::cell::Cell<usize>>) {
        let pg = self.state.pods_generation.load(Ordering::Acquire);
        if pg == self.pods_seen {
            return;
        }
        self.pods_seen = pg;
        let pods = self.state.pods_snapshot();
        let current: HashMap<&str, u64> =
            pods.iter().map(|p| (p.uid.as_str(), p.netns_id)).collect();
        let first = self.ctx_index == 0;
        self.pods.retain(|uid, (netns_id, d, _)| {
            let keep = current.get(uid.as_str()) == Some(netns_id);
            if !keep {
                // Stops the pod's accept loops; its live connections get the drain timeout.
                d.start();
                if first {
                    tracing::info!(uid = %uid, "pod removed or moved: its listeners are closed");
                }
            }
            keep
        });
        for pod in pods {
            if self.pods.contains_key(&pod.uid) {
                continue;
            }
            let result = match pod_loops(&self.state, pool, rr, &pod) {
                Ok((pod_drain, loops)) => {
                    self.pods
                        .insert(pod.uid.clone(), (pod.netns_id, pod_drain, loops));
                    if first {
                        tracing::info!(uid = %pod.uid, pod = %pod.info.name, namespace = %pod.info.namespace, "pod listeners bound in its network namespace (15001, 15006, 15008)");
                    }
                    Ok(())
                }
                Err(e) => {
                    tracing::error!(uid = %pod.uid, worker = self.ctx_index, error = %e, "cannot listen inside the pod's network namespace");
                    Err(e.to_string())
                }
            };
            self.state.pod_bound(&pod.uid, self.ctx_index, result);
        }
    }

    /// Stop every listener and wait (until `deadline`) for the pods' connections.
    async fn shutdown(self, deadline: std::time::Instant) {
        for (stop, handle) in self.hbone.into_values() {
            stop.start();
            handle.await;
        }
        for (_, d, _) in self.pods.values() {
            d.start();
        }
        for (_, d, loops) in self.pods.into_values() {
            for l in loops {
                l.await;
            }
            d.wait_idle(deadline.saturating_duration_since(std::time::Instant::now()))
                .await;
        }
    }
}
