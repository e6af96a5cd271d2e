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
use tracing::Instrument;
use zring_hbone::{
    client::{ConnectError, ConnectHeaders},
    pool::{PoolError, PoolKey},
    settings::TimeoutKind,
    SpiffeId,
};
use zring_runtime::net::{self, ConnectOptions};

use super::{
    headers::connect_headers,
    telemetry::{trace_id, Relay, SocketSide},
    wait_for_config, ConnLog, HandshakePermit, HbonePool, State,
};
use crate::{
    authz,
    config::{
        index::{MeshIndex, Resolved},
        weighted_turn, GatewayAddress, InboundProtocol, LoadBalancerMode, Workload,
    },
    hbone_io::PollTcp,
    metrics::{ConnLabels, Peer, Reporter},
    proxy::DEFAULT_CONNECT_TIMEOUT,
    socks5::{self, Reply, Target},
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

/// What to do with a connection, decided before any I/O. Short-lived and moved straight into
/// the call that acts on it, so the size difference between variants costs nothing that
/// boxing (an allocation per connection) would save.
#[allow(clippy::large_enum_variant)]
enum Plan {
    /// Plain TCP to this address.
    Tcp(SocketAddr),
    /// CONNECT `target` over the pooled HBONE connection for `key`.
    Hbone {
        key: PoolKey,
        target: SocketAddr,
        headers: ConnectHeaders,
    },
}

/// A connection refused before any upstream I/O.
struct Refused {
    code: Reply,
    flags: &'static str,
    reason: String,
}

impl Refused {
    fn new(code: Reply, flags: &'static str, reason: String) -> Self {
        Self {
            code,
            flags,
            reason,
        }
    }
}

/// Refuse: a SOCKS5 code to a SOCKS client, a reset to a captured one.
async fn refuse(sock: &mut monoio::net::TcpStream, client: Client, code: Reply) {
    match client {
        Client::Socks => {
            let _ = sock.write_all(socks5::reply(code).to_vec()).await;
        }
        Client::Captured => {
            let _ = net::set_reset_on_close(sock);
        }
    }
}

/// A SOCKS client is told it is connected; false when it left meanwhile.
async fn socks_ok(sock: &mut monoio::net::TcpStream, client: Client) -> bool {
    match client {
        Client::Socks => sock
            .write_all(socks5::reply(Reply::Ok).to_vec())
            .await
            .0
            .is_ok(),
        Client::Captured => true,
    }
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

    /// A connection captured on the outbound port. Not an `async fn`, for the same reason as
    /// [`Self::forward`]: the connection's task then holds only what the relay needs.
    pub(super) fn captured(
        self,
        sock: monoio::net::TcpStream,
        peer: SocketAddr,
        listen: SocketAddr,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let forward = match original_destination(&sock, listen) {
            Some(target) => Some(self.forward(sock, peer, target, Client::Captured)),
            None => {
                tracing::warn!(src.addr = %peer, "outbound connection without an original destination (not redirected?); closed");
                None
            }
        };
        // Polled in place (an `async` block awaiting it would hold it twice).
        futures_util::FutureExt::map(futures_util::future::OptionFuture::from(forward), |_| ())
    }

    /// A SOCKS5 client: the handshake gives the destination. The greeting and request must
    /// arrive within the SOCKS5 limit; `permit` holds the connection's place under the
    /// listener's handshake cap until then. A domain name is resolved against the mesh's
    /// service hostnames (and the short forms the client's namespace completes).
    pub(super) async fn socks(
        self,
        mut sock: monoio::net::TcpStream,
        peer: SocketAddr,
        permit: HandshakePermit,
    ) {
        let limit = self.state.cfg.limits.socks5_greeting;
        // Boxed (a timer is 640 bytes): the connection's task should not keep its room.
        let greeting = Box::pin(monoio::time::timeout(
            limit,
            socks_handshake(&mut sock, peer),
        ));
        let target = match greeting.await {
            Ok(Some(t)) => t,
            Ok(None) => return,
            Err(_) => {
                self.state.metrics.timeout(TimeoutKind::Socks5Greeting);
                return tracing::debug!(src.addr = %peer, limit_ms = limit.as_millis() as u64, "SOCKS5 greeting not finished in time; closed");
            }
        };
        drop(permit);
        let target = match target {
            Target::Addr(a) => a,
            Target::Name(name, port) => match self.resolve_name(&name, port, peer) {
                Some(a) => a,
                None => {
                    let _ = sock
                        .write_all(socks5::reply(Reply::HostUnreachable).to_vec())
                        .await;
                    return tracing::info!(src.addr = %peer, name = %name, "SOCKS5: the name is not a mesh service (zring resolves only service hostnames and their short forms for SOCKS5)");
                }
            },
        };
        self.forward(sock, peer, target, Client::Socks).await
    }

    /// A SOCKS5 domain name: an IP literal, or a mesh service's first VIP.
    fn resolve_name(&self, name: &str, port: u16, peer: SocketAddr) -> Option<SocketAddr> {
        if let Ok(ip) = name.parse::<std::net::IpAddr>() {
            return Some(SocketAddr::new(ip, port));
        }
        let index = self.state.index();
        let namespace = match &self.pod {
            Some(pod) => pod.namespace.clone(),
            None => index
                .workload_by_ip(peer.ip())
                .map(|w| w.namespace.clone())
                .unwrap_or_default(),
        };
        let service = index.service_by_name(name, &namespace)?;
        let vip = service.vips.first()?;
        Some(SocketAddr::new(vip.address, port))
    }

    /// Decide where the connection goes, then act on it: refuse it, relay it as plain TCP, or
    /// tunnel it over HBONE.
    ///
    /// Not an `async fn`: its future would keep room for the arguments (the socket, the
    /// `Outbound`, the addresses: ~600 bytes with the caller's) for as long as the connection
    /// lives. They move into the boxed set-up here, which is freed when the relay starts.
    fn forward(
        self,
        sock: monoio::net::TcpStream,
        peer: SocketAddr,
        target: SocketAddr,
        client: Client,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let span = tracing::debug_span!(
            "outbound",
            src.addr = %peer,
            dst.addr = %target,
            src.identity = tracing::field::Empty,
            dst.identity = tracing::field::Empty,
        );
        // The set-up runs boxed and hands over the relay: the task that lives as long as the
        // connection then holds two pointers, not the largest set-up step's state.
        let set_up = Box::pin(
            self.set_up(sock, peer, target, client)
                .instrument(span.clone()),
        );
        async move {
            if let Some(relay) = set_up.await {
                relay.instrument(span).await
            }
        }
    }

    /// Route the connection and establish its upstream side; the relay that carries it from
    /// then on (none when it was refused).
    async fn set_up(
        self,
        mut sock: monoio::net::TcpStream,
        peer: SocketAddr,
        target: SocketAddr,
        client: Client,
    ) -> Option<Relay> {
        let _ = sock.set_nodelay(true);
        let state = &*self.state;
        let mut log = ConnLog::new(
            "outbound",
            "-",
            peer,
            target,
            ConnLabels {
                reporter: Reporter::Source,
                source: Peer::none(),
                destination: Peer::none(),
                service: None,
                mtls: false,
                response_flags: "-",
            },
            Instant::now(),
        );
        let index = Box::pin(self.config_for(peer)).await;
        let plan = self.decide(&index, &mut log, peer, target);
        drop(index);
        #[cfg(feature = "test-hooks")]
        super::test_hooks::maybe_panic(target);
        match plan {
            Err(r) => {
                refuse(&mut sock, client, r.code).await;
                log.close(state, r.flags, 0, 0, Some(r.reason));
                None
            }
            Ok(Plan::Tcp(dst)) => self.plain(sock, client, log, dst).await,
            Ok(Plan::Hbone {
                key,
                target,
                headers,
            }) => self.tunnel(sock, client, log, key, target, headers).await,
        }
    }

    /// The config to route with. A pod's connection may come before the config that names its
    /// workload: wait for it (bounded).
    async fn config_for(&self, peer: SocketAddr) -> Arc<MeshIndex> {
        let state = &*self.state;
        let Some(pod) = &self.pod else {
            return state.index();
        };
        let node = &state.cfg.node;
        wait_for_config(state, |idx| {
            idx.workload_by_ip(peer.ip())
                .is_some_and(|w| &w.node == node)
                || (peer.ip().is_loopback()
                    && idx
                        .workloads_of_pod(&pod.namespace, &pod.name)
                        .any(|w| &w.node == node))
        })
        .await
    }

    /// Where a connection from `peer` to `target` goes, with the log filled in; no I/O.
    fn decide(
        &self,
        index: &MeshIndex,
        log: &mut ConnLog,
        peer: SocketAddr,
        target: SocketAddr,
    ) -> Result<Plan, Refused> {
        let node = &self.state.cfg.node;
        // The source workload: the owner of the client's address; for a pod's own loopback
        // (SOCKS5 inside the pod) the pod's workload, whose address the connection then uses.
        let src = match (&self.pod, peer.ip().is_loopback()) {
            (Some(pod), true) => index
                .workloads_of_pod(&pod.namespace, &pod.name)
                .find(|w| &w.node == node),
            _ => index.workload_by_ip(peer.ip()).filter(|w| &w.node == node),
        };
        let Some(src) = src else {
            return Err(Refused::new(
                Reply::NotAllowed,
                "NR",
                format!("{} is not a workload on node {node}", peer.ip()),
            ));
        };
        let client_ip = match peer.ip().is_loopback() {
            true => src.workload_ips.first().copied().unwrap_or(peer.ip()),
            false => peer.ip(),
        };
        let src_id = src
            .identity()
            .map_err(|e| Refused::new(Reply::NotAllowed, "NR", e.to_string()))?;
        tracing::Span::current().record("src.identity", tracing::field::display(&src_id));
        log.src_identity = Some(src_id.clone());
        log.labels.source = src.peer();
        let route = self
            .route(index, log, src, target)
            .map_err(|e| Refused::new(Reply::HostUnreachable, "NR", e))?;
        match route {
            Route::Passthrough(dst) => {
                log.path = "passthrough";
                log.dst = dst;
                if self.state.cfg.reaches_self(dst, &src.workload_ips) {
                    return Err(Refused::new(
                        Reply::NotAllowed,
                        "NR",
                        format!("{dst} is zring itself (a self-call; its admin, stats and listeners are not for workloads)"),
                    ));
                }
                Ok(Plan::Tcp(dst))
            }
            Route::Local(dst) => {
                log.path = "local";
                log.dst = dst;
                authz::check_target(index, dst.ip(), dst, |p| self.state.cfg.own_port(p))
                    .and_then(|()| authz::decide(index, node, peer, dst, Some(&src_id)))
                    .map_err(|r| Refused::new(Reply::NotAllowed, r.response_flags, r.reason))?;
                Ok(Plan::Tcp(dst))
            }
            Route::Hbone {
                dst_id,
                hbone,
                target: connect_to,
                waypoint,
            } => {
                log.path = if waypoint { "waypoint" } else { "hbone" };
                log.dst = connect_to;
                log.dst_hbone = Some(hbone);
                log.dst_identity = Some(dst_id.clone());
                tracing::Span::current().record("dst.identity", tracing::field::display(&dst_id));
                log.labels.mtls = true;
                let headers = connect_headers(
                    src,
                    SocketAddr::new(client_ip, peer.port()),
                    log.labels.service.as_ref().map(|s| s.0.as_str()),
                );
                log.trace_id = headers.traceparent.as_deref().and_then(trace_id);
                Ok(Plan::Hbone {
                    key: PoolKey {
                        src_id,
                        dst_id,
                        src_ip: client_ip,
                        dst: hbone,
                    },
                    target: connect_to,
                    headers,
                })
            }
        }
    }

    /// Plain TCP to `dst` (passthrough, or a workload on this node), spliced.
    async fn plain(
        &self,
        mut sock: monoio::net::TcpStream,
        client: Client,
        log: ConnLog,
        dst: SocketAddr,
    ) -> Option<Relay> {
        let state = &*self.state;
        let opts = ConnectOptions {
            mark: state.cfg.mark,
            timeout: Some(DEFAULT_CONNECT_TIMEOUT),
            netns: self.netns.clone(),
            ..Default::default()
        };
        let up = match Box::pin(net::connect(dst, &opts)).await {
            Ok(u) => u,
            Err(e) => {
                refuse(&mut sock, client, Reply::Refused).await;
                log.close(state, "UF", 0, 0, Some(e.to_string()));
                return None;
            }
        };
        if !socks_ok(&mut sock, client).await {
            log.close(state, "-", 0, 0, Some("client left".into()));
            return None;
        }
        Some(Box::pin(log.splice_and_close(self.state.clone(), sock, up)))
    }

    /// A CONNECT to `target` over the worker's pooled HBONE connection for `key`.
    async fn tunnel(
        &self,
        mut sock: monoio::net::TcpStream,
        client: Client,
        log: ConnLog,
        key: PoolKey,
        target: SocketAddr,
        headers: ConnectHeaders,
    ) -> Option<Relay> {
        let state = &*self.state;
        // From Istio's CA, the source's certificate before the pool dials with it: fetched now
        // if a config change queued it behind others, without blocking this worker. (A local
        // CA or files issue at once: nothing to wait for.)
        if state.certs.is_remote() {
            if let Err(e) = Box::pin(state.certs.get_urgent(&key.src_id)).await {
                refuse(&mut sock, client, Reply::Failure).await;
                log.close(state, "UF", 0, 0, Some(e.to_string()));
                return None;
            }
        }
        // Boxed, as the certificate fetch above: set-up futures (a dial, a TLS handshake) are
        // several KiB, and inline they would size the task for as long as the tunnel lives.
        let stream = match Box::pin(self.pool.connect(&key, target, &headers)).await {
            Ok(s) => s,
            Err(e) => {
                let (code, flags) = match &e {
                    PoolError::Connect(ConnectError::Denied) => (Reply::NotAllowed, "DENY"),
                    PoolError::Connect(ConnectError::Unavailable(_)) => {
                        (Reply::HostUnreachable, "UF")
                    }
                    _ => (Reply::Failure, "UF"),
                };
                refuse(&mut sock, client, code).await;
                log.close(state, flags, 0, 0, Some(e.to_string()));
                return None;
            }
        };
        if !socks_ok(&mut sock, client).await {
            log.close(state, "-", 0, 0, Some("client left".into()));
            return None;
        }
        let (stream, slot) = stream.into_parts();
        let Ok(sock) = PollTcp::new(sock) else {
            log.close(state, "-", 0, 0, Some("socket setup failed".into()));
            return None;
        };
        // The stream's place on its pooled connection is held while it relays.
        Some(log.tunnel_and_close(self.state.clone(), sock, stream, SocketSide::Client, slot))
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
                if service
                    .load_balancer
                    .as_ref()
                    .is_some_and(|lb| lb.mode == LoadBalancerMode::Passthrough)
                {
                    // No endpoint is chosen: the dialed address is the destination.
                    return Ok(Route::Passthrough(target));
                }
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
                let i = weighted_turn(endpoints.iter().map(|(w, _)| w.capacity), n).ok_or_else(
                    || {
                        format!(
                            "service {} has no endpoint with capacity for port {}",
                            service.hostname,
                            target.port()
                        )
                    },
                )?;
                let (w, port) = endpoints[i];
                let ip = *w
                    .workload_ips
                    .first()
                    .ok_or_else(|| format!("endpoint {} has no IP", w.name))?;
                (w, SocketAddr::new(ip, port))
            }
        };
        let dst_id = w.identity().map_err(|e| e.to_string())?;
        log.labels.destination = w.peer();
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
    log.labels.destination = w.peer();
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

/// The SOCKS5 greeting, our method choice, and the request. None when the client left or sent
/// something that is not SOCKS5 (answered with a failure reply where the protocol allows).
async fn socks_handshake(sock: &mut monoio::net::TcpStream, peer: SocketAddr) -> Option<Target> {
    let mut buf = Vec::new();
    let greeting = read_until(sock, &mut buf, |b| match socks5::parse_greeting(b) {
        Ok(Some(n)) => Some(Ok(n)),
        Ok(None) => None,
        Err(e) => Some(Err(e)),
    })
    .await;
    let n = match greeting? {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(src.addr = %peer, error = e, "bad SOCKS5 greeting");
            return None;
        }
    };
    buf.drain(..n);
    sock.write_all(vec![5u8, 0]).await.0.ok()?;
    let request = read_until(sock, &mut buf, |b| match socks5::parse_request(b) {
        Ok(Some(v)) => Some(Ok(v)),
        Ok(None) => None,
        Err(r) => Some(Err(r)),
    })
    .await?;
    match request {
        Ok((t, _)) => Some(t),
        Err(r) => {
            let _ = sock.write_all(socks5::reply(r).to_vec()).await;
            None
        }
    }
}
