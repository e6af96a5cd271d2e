//! Outbound: a local workload's connection, captured on 15001 (original destination from
//! SO_ORIGINAL_DST, or the local address under TPROXY) or asked for over SOCKS5, is routed:
//!
//! - a service with a waypoint (or a workload with one) -> HBONE to the waypoint, CONNECT to the
//!   original VIP:port (or workload ip:port);
//! - a service VIP -> one of its endpoints, round robin per worker;
//! - an HBONE workload on another node -> HBONE to `<ip>:15008` through the worker's pool,
//!   presenting the source's identity and requiring the destination's;
//! - an HBONE workload on this node -> delivered directly, after the destination's inbound
//!   checks and policy (as if it had arrived over HBONE from the source's identity);
//! - a TCP workload or an address not in the mesh -> passthrough with the splice relay.

use std::{cell::Cell, net::SocketAddr, rc::Rc, sync::Arc, time::Instant};

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use zring_hbone::{
    client::{ConnectError, ConnectHeaders},
    pool::{PoolError, PoolKey},
    relay::copy_bidirectional,
    SpiffeId,
};
use zring_runtime::{
    net::{self, ConnectOptions},
    relay::RelayOptions,
};

use super::{wait_for_config, ConnLog, HbonePool, State};
use crate::{
    config::{
        index::{MeshIndex, Resolved},
        GatewayAddress, InboundProtocol, Workload,
    },
    hbone_io::PollTcp,
    inbound,
    metrics::{ConnLabels, Peer, Reporter},
    relay_cmd::DEFAULT_CONNECT_TIMEOUT,
    socks5::{self, Reply},
};

/// The original destination of a captured connection: SO_ORIGINAL_DST (REDIRECT), else the
/// local address when it is not the listener's own (TPROXY). None when it was not redirected.
pub(super) fn original_destination(
    sock: &monoio::net::TcpStream,
    listen: SocketAddr,
) -> Option<SocketAddr> {
    let own = |a: SocketAddr| {
        a.port() == listen.port() && (listen.ip().is_unspecified() || a.ip() == listen.ip())
    };
    if let Ok(d) = net::original_dst(sock) {
        if !own(d) {
            return Some(d);
        }
    }
    sock.local_addr().ok().filter(|a| !own(*a))
}

/// Where an outbound connection goes.
enum Route {
    /// Through HBONE to `hbone` (a workload's or waypoint's `ip:15008`), CONNECT `target`.
    Hbone {
        dst_id: SpiffeId,
        hbone: SocketAddr,
        target: SocketAddr,
        waypoint: bool,
    },
    /// A workload on this node: checked like inbound HBONE, then delivered directly.
    Local(SocketAddr),
    /// Plain TCP to `target`.
    Passthrough(SocketAddr),
}

/// Outbound handling on one worker. Built once per listener and cloned per connection (a few
/// reference counts).
#[derive(Clone)]
pub(super) struct Outbound {
    state: Arc<State>,
    pool: Rc<HbonePool>,
    rr: Rc<Cell<usize>>,
    /// In-pod mode: the pod's namespace, where upstream connections are created.
    netns: Option<Arc<zring_runtime::net::NetNs>>,
    /// In-pod mode: the pod these connections come from.
    pod: Option<Rc<crate::zds::proto::WorkloadInfo>>,
}

#[derive(Clone, Copy)]
enum Client {
    Socks,
    Captured,
}

impl Outbound {
    pub(super) fn new(state: Arc<State>, pool: Rc<HbonePool>, rr: Rc<Cell<usize>>) -> Self {
        Outbound {
            state,
            pool,
            rr,
            netns: None,
            pod: None,
        }
    }

    /// Connections from `pod`: upstream connections are created inside its namespace.
    pub(super) fn for_pod(mut self, pod: &crate::zds::client::Pod) -> Self {
        self.netns = Some(pod.netns.clone());
        self.pod = Some(Rc::new(pod.info.clone()));
        self
    }

    /// A connection captured on the outbound port.
    pub(super) async fn captured(
        self,
        sock: monoio::net::TcpStream,
        peer: SocketAddr,
        listen: SocketAddr,
    ) {
        let Some(target) = original_destination(&sock, listen) else {
            return tracing::warn!(src.addr = %peer, "outbound connection without an original destination (not redirected?); closed");
        };
        self.forward(sock, peer, target, Client::Captured).await
    }

    /// A SOCKS5 client: the handshake gives the destination.
    pub(super) async fn socks(self, mut sock: monoio::net::TcpStream, peer: SocketAddr) {
        let mut buf = Vec::new();
        let greeting = read_until(&mut sock, &mut buf, |b| match socks5::parse_greeting(b) {
            Ok(Some(n)) => Some(Ok(n)),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        })
        .await;
        let n = match greeting {
            Some(Ok(n)) => n,
            Some(Err(e)) => {
                return tracing::debug!(src.addr = %peer, error = e, "bad SOCKS5 greeting")
            }
            None => return,
        };
        buf.drain(..n);
        if sock.write_all(vec![5u8, 0]).await.0.is_err() {
            return;
        }
        let request = read_until(&mut sock, &mut buf, |b| match socks5::parse_request(b) {
            Ok(Some(v)) => Some(Ok(v)),
            Ok(None) => None,
            Err(r) => Some(Err(r)),
        })
        .await;
        let target = match request {
            Some(Ok((t, _))) => t,
            Some(Err(r)) => {
                let _ = sock.write_all(socks5::reply(r).to_vec()).await;
                return;
            }
            None => return,
        };
        self.forward(sock, peer, target, Client::Socks).await
    }

    async fn forward(
        self,
        mut sock: monoio::net::TcpStream,
        peer: SocketAddr,
        target: SocketAddr,
        client: Client,
    ) {
        let start = Instant::now();
        let _ = sock.set_nodelay(true);
        let state = &*self.state;
        let index = state.index();
        let mut log = ConnLog::new(
            "outbound",
            "-",
            peer,
            target,
            ConnLabels {
                reporter: Reporter::Source,
                source: Peer::default(),
                destination: Peer::default(),
                service: None,
                mtls: false,
                response_flags: "-",
            },
            start,
        );
        // Refuse: a SOCKS5 code to a SOCKS client, a reset to a captured one.
        let refuse = |mut sock: monoio::net::TcpStream, code: Reply| async move {
            match client {
                Client::Socks => {
                    let _ = sock.write_all(socks5::reply(code).to_vec()).await;
                }
                Client::Captured => {
                    let _ = net::set_reset_on_close(&sock);
                }
            }
        };
        // A pod's connection may come before the config that names its workload: wait for it.
        let index = match &self.pod {
            Some(pod) => {
                let node = &state.cfg.node;
                wait_for_config(state, |idx| {
                    idx.workload_by_ip(peer.ip())
                        .is_some_and(|w| &w.node == node)
                        || (peer.ip().is_loopback()
                            && idx.config.workloads.iter().any(|w| {
                                w.name == pod.name
                                    && w.namespace == pod.namespace
                                    && &w.node == node
                            }))
                })
                .await
            }
            None => index,
        };
        // The source workload: the owner of the client's address; for a pod's own loopback
        // (SOCKS5 inside the pod) the pod's workload, whose address the connection then uses.
        let src = match (&self.pod, peer.ip().is_loopback()) {
            (Some(pod), true) => index.config.workloads.iter().find(|w| {
                w.name == pod.name && w.namespace == pod.namespace && w.node == state.cfg.node
            }),
            _ => index
                .workload_by_ip(peer.ip())
                .filter(|w| w.node == state.cfg.node),
        };
        let client_ip = match (src, peer.ip().is_loopback()) {
            (Some(w), true) => w.workload_ips.first().copied().unwrap_or(peer.ip()),
            _ => peer.ip(),
        };
        let Some(src) = src else {
            refuse(sock, Reply::NotAllowed).await;
            let why = format!("{} is not a workload on node {}", peer.ip(), state.cfg.node);
            return log.close(state, "NR", 0, 0, Some(why));
        };
        let src_id = match src.identity() {
            Ok(i) => i,
            Err(e) => {
                refuse(sock, Reply::NotAllowed).await;
                return log.close(state, "NR", 0, 0, Some(e.to_string()));
            }
        };
        log.src_identity = Some(src_id.clone());
        log.labels.source = Peer::of(src, Some(&src_id));
        let route = match self.route(&index, &mut log, src, target) {
            Ok(r) => r,
            Err(e) => {
                refuse(sock, Reply::HostUnreachable).await;
                return log.close(state, "NR", 0, 0, Some(e));
            }
        };
        let upstream_opts = ConnectOptions {
            mark: state.cfg.mark,
            timeout: Some(DEFAULT_CONNECT_TIMEOUT),
            netns: self.netns.clone(),
            ..Default::default()
        };
        let dst = match route {
            Route::Passthrough(dst) => {
                log.path = "passthrough";
                Some(dst)
            }
            Route::Local(dst) => {
                log.path = "local";
                if let Err(r) = inbound::decide(&index, &state.cfg.node, peer, dst, Some(&src_id)) {
                    refuse(sock, Reply::NotAllowed).await;
                    return log.close(state, r.response_flags, 0, 0, Some(r.reason));
                }
                Some(dst)
            }
            Route::Hbone { .. } => None,
        };
        drop(index);
        if let Some(dst) = dst {
            log.dst = dst;
            let up = match net::connect(dst, &upstream_opts).await {
                Ok(u) => u,
                Err(e) => {
                    refuse(sock, Reply::Refused).await;
                    return log.close(state, "UF", 0, 0, Some(e.to_string()));
                }
            };
            if matches!(client, Client::Socks)
                && sock
                    .write_all(socks5::reply(Reply::Ok).to_vec())
                    .await
                    .0
                    .is_err()
            {
                return log.close(state, "-", 0, 0, Some("client left".into()));
            }
            log.established(state);
            let out = zring_runtime::relay(sock, up, &RelayOptions::default()).await;
            return log.close(
                state,
                "-",
                out.client_to_upstream,
                out.upstream_to_client,
                out.error.map(|e| e.to_string()),
            );
        }
        let Route::Hbone {
            dst_id,
            hbone,
            target: connect_to,
            waypoint,
        } = route
        else {
            return;
        };
        log.path = if waypoint { "waypoint" } else { "hbone" };
        log.dst = connect_to;
        log.dst_hbone = Some(hbone);
        log.dst_identity = Some(dst_id.clone());
        log.labels.mtls = true;
        let key = PoolKey {
            src_id,
            dst_id,
            src_ip: client_ip,
            dst: hbone,
        };
        let headers = ConnectHeaders {
            forwarded_for: Some(client_ip),
            ..Default::default()
        };
        let stream = match self.pool.connect(&key, connect_to, &headers).await {
            Ok(s) => s,
            Err(e) => {
                let (code, flags) = match &e {
                    PoolError::Connect(ConnectError::Denied) => (Reply::NotAllowed, "DENY"),
                    PoolError::Connect(ConnectError::Unavailable(_)) => {
                        (Reply::HostUnreachable, "UF")
                    }
                    _ => (Reply::Failure, "UF"),
                };
                refuse(sock, code).await;
                return log.close(state, flags, 0, 0, Some(e.to_string()));
            }
        };
        if matches!(client, Client::Socks)
            && sock
                .write_all(socks5::reply(Reply::Ok).to_vec())
                .await
                .0
                .is_err()
        {
            return log.close(state, "-", 0, 0, Some("client left".into()));
        }
        log.established(state);
        let (stream, _slot) = stream.into_parts();
        let Ok(sock) = PollTcp::new(sock) else {
            return log.close(state, "-", 0, 0, Some("socket setup failed".into()));
        };
        let out = copy_bidirectional(sock, stream).await;
        log.close(
            state,
            "-",
            out.socket_to_stream,
            out.stream_to_socket,
            out.error.map(|e| e.to_string()),
        );
    }

    fn route(
        &self,
        idx: &MeshIndex,
        log: &mut ConnLog,
        src: &Workload,
        target: SocketAddr,
    ) -> Result<Route, String> {
        let resolved = idx.resolve(target);
        if let Resolved::Service { service, .. } = &resolved {
            log.labels.set_service(service);
        }
        if let Some(wp) = idx.waypoint_for(&resolved) {
            return via_waypoint(idx, log, wp, target);
        }
        let (w, dst) = match resolved {
            Resolved::Unknown => return Ok(Route::Passthrough(target)),
            Resolved::Workload { workload, port } => (workload, SocketAddr::new(target.ip(), port)),
            Resolved::Service {
                service, endpoints, ..
            } => {
                if endpoints.is_empty() {
                    return Err(format!(
                        "service {} has no endpoint for port {}",
                        service.hostname,
                        target.port()
                    ));
                }
                let endpoints = match &service.load_balancer {
                    Some(lb) => lb.select(src, &self.state.cfg.node, &endpoints),
                    None => endpoints,
                };
                if endpoints.is_empty() {
                    return Err(format!(
                        "service {} has no endpoint that meets its strict routing preferences",
                        service.hostname
                    ));
                }
                let n = self.rr.get();
                self.rr.set(n.wrapping_add(1));
                let (w, port) = endpoints[n % endpoints.len()];
                let ip = *w
                    .workload_ips
                    .first()
                    .ok_or_else(|| format!("endpoint {} has no IP", w.name))?;
                (w, SocketAddr::new(ip, port))
            }
        };
        let dst_id = w.identity().map_err(|e| e.to_string())?;
        log.labels.destination = Peer::of(w, Some(&dst_id));
        log.dst_identity = Some(dst_id.clone());
        if w.protocol != InboundProtocol::Hbone {
            log.dst_identity = None;
            return Ok(Route::Passthrough(dst));
        }
        // Same node: delivered directly, unless pods live in their own namespaces (in-pod
        // mode), where the destination pod's own 15008 is reached over HBONE like any other.
        if w.node == self.state.cfg.node && self.state.cfg.zds_socket.is_none() {
            return Ok(Route::Local(dst));
        }
        Ok(Route::Hbone {
            dst_id,
            hbone: SocketAddr::new(dst.ip(), self.state.cfg.hbone_port),
            target: dst,
            waypoint: false,
        })
    }
}

fn via_waypoint(
    idx: &MeshIndex,
    log: &mut ConnLog,
    wp: &GatewayAddress,
    target: SocketAddr,
) -> Result<Route, String> {
    let w: &Workload = idx
        .workload_by_ip(wp.destination.address)
        .ok_or_else(|| format!("waypoint {} is not a known workload", wp.destination))?;
    let dst_id = w.identity().map_err(|e| e.to_string())?;
    log.labels.destination = Peer::of(w, Some(&dst_id));
    Ok(Route::Hbone {
        dst_id,
        hbone: SocketAddr::new(wp.destination.address, wp.hbone_mtls_port),
        target,
        waypoint: true,
    })
}

async fn read_until<T>(
    sock: &mut monoio::net::TcpStream,
    buf: &mut Vec<u8>,
    mut parse: impl FnMut(&[u8]) -> Option<T>,
) -> Option<T> {
    loop {
        if let Some(v) = parse(buf) {
            return Some(v);
        }
        if buf.len() > 512 {
            return None;
        }
        let (r, chunk) = sock.read(vec![0u8; 512]).await;
        let n = r.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
