//! One worker: its HBONE pool, its listeners (node and pods), and the loop that follows config
//! and pod changes until the drain.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    rc::Rc,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

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
    relay_cmd::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_DRAIN_TIMEOUT},
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
    // Inbound HBONE listeners follow the config: one per local HBONE workload IP, bound when a
    // config naming it comes into force and closed when it leaves (each has its own drain to
    // stop its accept loop; its live connections stay tracked by the worker's drain).
    let mut bound: HashMap<IpAddr, Drain> = HashMap::new();
    let hbone_gate = HandshakeGate::new("hbone", limit, state.metrics.clone());
    let mut seen = 0;
    // In-pod mode: per pod uid, the drain that stops its listeners.
    let mut pod_listeners: HashMap<String, Drain> = HashMap::new();
    let mut pods_seen = 0;
    let mut ticks = 0u64;
    loop {
        ticks += 1;
        if ticks.is_multiple_of(50) {
            // Idle HBONE connections are released even when no new connection comes, and the
            // memory a burst of connections left behind goes back to the OS.
            pool.sweep_all();
            zring_runtime::sys::release_free_memory();
        }
        let g = state.generation();
        if g != seen {
            let index = state.index();
            let ips: HashSet<IpAddr> = index
                .local_workloads(&state.cfg.node)
                .filter(|w| w.protocol == InboundProtocol::Hbone)
                .flat_map(|w| w.workload_ips.iter().copied())
                .collect();
            drop(index);
            bound.retain(|ip, stop| {
                let keep = ips.contains(ip);
                if !keep {
                    stop.start();
                    if ctx.index == 0 {
                        tracing::info!(ip = %ip, "workload left the config: its inbound HBONE listener is closed");
                    }
                }
                keep
            });
            for ip in ips {
                if bound.contains_key(&ip) {
                    continue;
                }
                let addr = SocketAddr::new(ip, state.cfg.hbone_port);
                match listen("inbound HBONE", addr, false) {
                    Ok(listener) => {
                        let stop = Drain::new();
                        bound.insert(ip, stop.clone());
                        let (s, d, gate) = (state.clone(), drain.clone(), hbone_gate.clone());
                        loops.push(monoio::spawn(async move {
                            accept::accept_loop(listener, &stop, |tcp, conn| {
                                let Some(permit) = gate.enter() else { return };
                                let fut = inbound::hbone(
                                    tcp,
                                    conn.peer,
                                    s.clone(),
                                    d.clone(),
                                    None,
                                    permit,
                                );
                                accept::spawn_tracked(&d, conn, fut)
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
    for d in pod_listeners.values().chain(bound.values()) {
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
