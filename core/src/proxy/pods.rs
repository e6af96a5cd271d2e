//! In-pod mode: a pod's listeners inside its network namespace, and the drain that closes
//! its connections when it leaves.

use std::{net::SocketAddr, rc::Rc, sync::Arc, time::Duration};

use zring_runtime::{
    drain::Drain,
    net::{self, ListenOptions},
    server::{self as accept, ConnAddrs},
};

use super::{inbound, outbound, HandshakeGate, HbonePool, State};
use crate::config::index::MeshIndex;

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

/// Run a pod's connection, tracked by the pod's drain; once the pod is removed (the drain
/// starts: the pod left, or the proxy is shutting down), the connection has `deadline` (the
/// drain timeout) to finish, then it is dropped (its sockets closed).
pub(super) fn spawn_pod_conn<F>(pod_drain: &Drain, deadline: Duration, conn: ConnAddrs, fut: F)
where
    F: std::future::Future<Output = ()> + 'static,
{
    let d = pod_drain.clone();
    // Boxed: the select! below moves the captured future into its own slot, and an async block
    // keeps room for both; boxed, the task holds a pointer (idle connection: ~7 KiB, not ~28).
    let fut = Box::pin(fut);
    accept::spawn_tracked(pod_drain, conn, async move {
        monoio::select! {
            _ = fut => {}
            _ = async {
                d.signaled().await;
                // Boxed: a timer is 640 bytes, and until the drain every connection keeps room
                // for it.
                Box::pin(monoio::time::sleep(deadline)).await;
            } => tracing::info!("pod removed: a connection still open after the drain deadline was closed"),
        }
    });
}

/// Bind a pod's listeners inside its namespace on this worker and start their accept loops;
/// the returned drain stops them.
pub(super) fn pod_loops(
    state: &Arc<State>,
    pool: &Rc<HbonePool>,
    rr: &Rc<std::cell::Cell<usize>>,
    pod: &crate::zds::client::Pod,
) -> std::io::Result<(Drain, Vec<monoio::task::JoinHandle<()>>)> {
    let ns = pod.netns.clone();
    let bind = |port: u16| -> std::io::Result<monoio::net::TcpListener> {
        let addr = SocketAddr::from(([0, 0, 0, 0], port));
        let bound = ns
            .run(|| net::bind_listener(addr, &ListenOptions::default()))
            .and_then(|r| r)
            .and_then(monoio::net::TcpListener::from_std);
        bound.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("binding port {port} in the pod's network namespace: {e}"),
            )
        })
    };
    let (outbound, plaintext, hbone) = (bind(15001)?, bind(15006)?, bind(state.cfg.hbone_port)?);
    let pod_drain = Drain::new();
    let mut loops = Vec::new();
    let template = outbound::Outbound::new(state.clone(), pool.clone(), rr.clone()).for_pod(pod);
    let limit = state.cfg.limits.max_handshakes;
    let deadline = state.cfg.drain_timeout;
    // One accept loop per outbound listener; `socks` picks the SOCKS5 handshake over the
    // original destination of a captured connection.
    let outbound_loop = |listener: monoio::net::TcpListener, socks: bool| {
        let (o, d) = (template.clone(), pod_drain.clone());
        let out_addr = SocketAddr::from(([0, 0, 0, 0], 15001));
        let gate = HandshakeGate::new("socks5", limit, state.metrics.clone());
        monoio::spawn(async move {
            accept::accept_loop(listener, &d, |sock, conn| {
                let o = o.clone();
                if socks {
                    let Some(permit) = gate.enter() else { return };
                    spawn_pod_conn(&d, deadline, conn, o.socks(sock, conn.peer, permit));
                } else {
                    spawn_pod_conn(&d, deadline, conn, o.captured(sock, conn.peer, out_addr));
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
        accept::accept_loop(plaintext, &d, |sock, conn| {
            let netns = Some(n.clone());
            spawn_pod_conn(
                &d,
                deadline,
                conn,
                inbound::plaintext(sock, conn.peer, pt_addr, s.clone(), netns),
            );
        })
        .await;
    }));
    let (s, d, n) = (state.clone(), pod_drain.clone(), ns);
    let pool = pool.clone();
    let gate = HandshakeGate::new("hbone", limit, state.metrics.clone());
    loops.push(monoio::spawn(async move {
        accept::accept_loop(hbone, &d, |tcp, conn| {
            let Some(permit) = gate.enter() else { return };
            let netns = Some(n.clone());
            spawn_pod_conn(
                &d,
                deadline,
                conn,
                inbound::hbone(
                    tcp,
                    conn.peer,
                    s.clone(),
                    d.clone(),
                    netns,
                    permit,
                    pool.clone(),
                ),
            );
        })
        .await;
    }));
    Ok((pod_drain, loops))
}
