//! Inbound: HBONE on 15008 (mTLS, CONNECT, policy with the peer's identity) and plaintext on
//! 15006 (policy with no identity, then the splice relay).

use std::{net::SocketAddr, rc::Rc, sync::Arc, time::Instant};

use tracing::Instrument;
use zring_hbone::{
    server::{self, Incoming},
    settings::TimeoutKind,
    tls, SpiffeId,
};
use zring_runtime::{
    drain::Drain,
    net::{self, ConnectOptions, NetNs},
};

use super::{
    telemetry::{trace_id, Relay, SocketSide},
    wait_for_config, ConnLog, HandshakePermit, HbonePool, State,
};
use crate::{
    authz,
    config::index::MeshIndex,
    hbone_io::{MonoioExecutor, PollTcp},
    metrics::{ConnLabels, Peer, Reporter},
    proxy::DEFAULT_CONNECT_TIMEOUT,
};

/// The telemetry of an inbound connection: the source is the workload at `src` when it owns
/// the proven identity (or, for plaintext, any workload there), the destination the workload
/// at `target`; its identity is worked out once, for the labels and the access log.
fn inbound_log(
    index: &MeshIndex,
    path: &'static str,
    src: SocketAddr,
    peer: Option<SpiffeId>,
    target: SocketAddr,
    start: Instant,
) -> ConnLog {
    let source = Peer::source(index.workload_by_ip(src.ip()), peer.as_ref());
    let dst = index.workload_by_ip(target.ip());
    let dst_identity = dst.and_then(|w| w.identity().ok());
    let destination = dst.map(|w| w.peer()).unwrap_or_else(Peer::none);
    let labels = ConnLabels {
        reporter: Reporter::Destination,
        source,
        destination,
        service: None,
        mtls: path == "hbone",
        response_flags: "-",
    };
    let mut log = ConnLog::new("inbound", path, src, target, labels, start);
    log.src_identity = peer;
    log.dst_identity = dst_identity;
    log
}

/// The destination service of an inbound connection, as ztunnel guesses it: the service the
/// client named (`host`), if `target` is one of its endpoints; else the first of the
/// workload's services whose target port is `target`'s port.
fn destination_service<'a>(
    index: &'a MeshIndex,
    target: SocketAddr,
    host: Option<&str>,
) -> Option<&'a crate::config::Service> {
    let w = index.workload_by_ip(target.ip())?;
    if let Some(s) = host.and_then(|h| index.service_by_hostname(h)) {
        if w.services
            .contains_key(&format!("{}/{}", s.namespace, s.hostname))
        {
            return Some(s);
        }
    }
    // Of the workload's own services (no allocation, no scan of the mesh's), the first by
    // name whose target port is the connection's, so every connection guesses alike.
    let port = target.port();
    w.services
        .iter()
        .filter_map(|(k, ports)| Some((k, ports, index.service_by_key(k)?)))
        .filter(|(_, ports, s)| {
            ports.values().any(|&p| p == port) || s.ports.values().any(|&p| p == port)
        })
        .min_by(|a, b| a.0.cmp(b.0))
        .map(|(_, _, s)| s)
}

/// How to reach the destination workload: marked, bounded, and from inside its pod's
/// namespace in in-pod mode.
fn upstream_opts(state: &State, netns: Option<Arc<NetNs>>) -> ConnectOptions {
    ConnectOptions {
        mark: state.cfg.mark,
        timeout: Some(DEFAULT_CONNECT_TIMEOUT),
        netns,
        ..Default::default()
    }
}

/// One inbound HBONE connection: TLS with the destination workload's certificate (bounded by
/// the TLS handshake limit; `permit` holds the connection's place under the listener's
/// handshake cap until then), then CONNECT streams until the peer or a drain ends it.
pub(super) async fn hbone(
    tcp: monoio::net::TcpStream,
    peer_addr: SocketAddr,
    state: Arc<State>,
    drain: Drain,
    netns: Option<Arc<NetNs>>,
    permit: HandshakePermit,
    pool: Rc<HbonePool>,
) {
    let local = tcp.local_addr().ok();
    let span = tracing::debug_span!(
        "inbound",
        src.addr = %peer_addr,
        dst.hbone = ?local,
        src.identity = tracing::field::Empty,
    );
    hbone_connection(tcp, peer_addr, state, drain, netns, permit, pool)
        .instrument(span)
        .await
}

async fn hbone_connection(
    tcp: monoio::net::TcpStream,
    peer_addr: SocketAddr,
    state: Arc<State>,
    drain: Drain,
    netns: Option<Arc<NetNs>>,
    permit: HandshakePermit,
    pool: Rc<HbonePool>,
) {
    let _ = tcp.set_nodelay(true);
    if let Some(ka) = &state.cfg.limits.tcp_keepalive {
        let _ = net::set_tcp_keepalive(&tcp, ka);
    }
    let Ok(local) = tcp.local_addr() else { return };
    let timeouts = &state.h2.timeouts;
    let deadline = Instant::now() + timeouts.tls_handshake;
    // In a pod, the connection may come before the config naming the pod (and its
    // certificate): wait for it, bounded.
    let index = match netns {
        Some(_) => wait_for_config(&state, |idx| idx.workload_by_ip(local.ip()).is_some()).await,
        None => state.index(),
    };
    let Some(id) = index
        .workload_by_ip(local.ip())
        .and_then(|w| w.identity().ok())
    else {
        return tracing::warn!(dst.addr = %local, "inbound HBONE connection to an address with no workload");
    };
    drop(index);
    let issued = match state.certs.get_urgent(&id).await {
        Ok(i) => i,
        Err(e) => return tracing::warn!(error = %e, "no certificate for the destination workload"),
    };
    let Ok(tcp) = PollTcp::tls(tcp) else { return };
    let accept = tokio_rustls::TlsAcceptor::from(issued.server.clone()).accept(tcp);
    let limit = deadline.saturating_duration_since(Instant::now());
    let tls = match monoio::time::timeout(limit, accept).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return tracing::info!(src.addr = %peer_addr, dst.addr = %local, error = %tls::classify_handshake(e), "inbound HBONE handshake failed")
        }
        Err(_) => {
            timeouts.fired(TimeoutKind::TlsHandshake);
            return tracing::debug!(src.addr = %peer_addr, dst.addr = %local, limit_ms = timeouts.tls_handshake.as_millis() as u64, "inbound HBONE: no TLS handshake in time; closed");
        }
    };
    drop(permit);
    let peer = tls::peer_identity(tls.get_ref().1);
    if let Some(p) = &peer {
        tracing::Span::current().record("src.identity", tracing::field::display(p));
    }
    let s = state.clone();
    let conn_span = tracing::Span::current();
    let handler = move |i: Incoming| {
        let span = tracing::debug_span!(parent: &conn_span, "stream", dst.addr = %i.request.target);
        let s = s.clone();
        let (netns, pool) = (netns.clone(), pool.clone());
        async move {
            match s.waypoint.clone() {
                // A waypoint serves the stream at L7 instead of delivering it.
                // Boxed: the L7 future is large and would size every node proxy's stream task.
                Some(wp) => {
                    Box::pin(crate::waypoint::http::stream(
                        i, peer_addr, local, s, wp, pool,
                    ))
                    .await
                }
                // The set-up runs boxed and hands over the relay, so the stream's task keeps
                // only the relay while the connection lives.
                None => {
                    if let Some(relay) = Box::pin(stream(i, peer_addr, local, s, netns)).await {
                        relay.await
                    }
                }
            }
        }
        .instrument(span)
    };
    if let Err(e) = server::serve(tls, peer, &state.h2, MonoioExecutor, handler, async move {
        drain.signaled().await
    })
    .await
    {
        match e {
            server::ServeError::HandshakeTimeout(_) | server::ServeError::IdleNoStream(_) => {
                tracing::debug!(src.addr = %peer_addr, error = %e, "inbound HBONE connection closed")
            }
            _ => {
                tracing::info!(src.addr = %peer_addr, error = %e, "inbound HBONE connection failed")
            }
        }
    }
}

async fn stream(
    incoming: Incoming,
    peer_addr: SocketAddr,
    local: SocketAddr,
    state: Arc<State>,
    netns: Option<Arc<NetNs>>,
) -> Option<Relay> {
    let start = Instant::now();
    let target = incoming.request.target;
    let peer = incoming.request.peer.clone();
    let index = state.index();
    let mut log = inbound_log(&index, "hbone", peer_addr, peer.clone(), target, start);
    // The service the client meant (`Forwarded: ...;host=`), trusted only if the destination
    // really is one of its endpoints; else a service of the workload with that target port.
    let host = incoming
        .request
        .headers
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(zring_hbone::client::forwarded_host);
    if let Some(service) = destination_service(&index, target, host) {
        log.labels.set_service(service);
    }
    log.trace_id = incoming
        .request
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(trace_id);
    let checked = authz::check_target(&index, local.ip(), target, |p| state.cfg.own_port(p))
        .and_then(|()| authz::decide(&index, &state.cfg.node, peer_addr, target, peer.as_ref()));
    if let Err(r) = checked {
        log.close(&state, r.response_flags, 0, 0, Some(r.reason));
        incoming.reject(r.status);
        return None;
    }
    drop(index);
    let up = match net::connect(target, &upstream_opts(&state, netns))
        .await
        .and_then(PollTcp::new)
    {
        Ok(u) => u,
        Err(e) => {
            log.close(&state, "UF", 0, 0, Some(e.to_string()));
            incoming.reject(server::StatusCode::SERVICE_UNAVAILABLE);
            return None;
        }
    };
    let Ok(stream) = incoming.accept() else {
        let why = "the stream ended before 200";
        log.close(&state, "UF", 0, 0, Some(why.into()));
        return None;
    };
    // Bytes from the destination's point of view: sent = delivered to the workload.
    Some(log.tunnel_and_close(state, up, stream, SocketSide::Destination, ()))
}

/// One captured inbound plaintext connection (15006): the original destination must be a local
/// workload and its policy must allow a client with no identity; then splice.
pub(super) async fn plaintext(
    sock: monoio::net::TcpStream,
    peer: SocketAddr,
    listen: SocketAddr,
    state: Arc<State>,
    netns: Option<Arc<NetNs>>,
) {
    let span = tracing::debug_span!("inbound_plaintext", src.addr = %peer);
    let set_up = plaintext_connection(sock, peer, listen, state, netns).instrument(span.clone());
    if let Some(relay) = Box::pin(set_up).await {
        relay.instrument(span).await
    }
}

async fn plaintext_connection(
    sock: monoio::net::TcpStream,
    peer: SocketAddr,
    listen: SocketAddr,
    state: Arc<State>,
    netns: Option<Arc<NetNs>>,
) -> Option<Relay> {
    let start = Instant::now();
    let Some(target) = super::outbound::original_destination(&sock, listen) else {
        tracing::warn!(src.addr = %peer, "inbound plaintext connection without an original destination (not redirected?); closed");
        return None;
    };
    let index = match netns {
        Some(_) => wait_for_config(&state, |idx| idx.workload_by_ip(target.ip()).is_some()).await,
        None => state.index(),
    };
    let log = inbound_log(&index, "plaintext", peer, None, target, start);
    if let Err(r) = authz::decide_plaintext(&index, &state.cfg.node, peer, target) {
        let _ = zring_runtime::net::set_reset_on_close(&sock);
        log.close(&state, r.response_flags, 0, 0, Some(r.reason));
        return None;
    }
    drop(index);
    let up = match net::connect(target, &upstream_opts(&state, netns)).await {
        Ok(u) => u,
        Err(e) => {
            let _ = zring_runtime::net::set_reset_on_close(&sock);
            log.close(&state, "UF", 0, 0, Some(e.to_string()));
            return None;
        }
    };
    Some(Box::pin(log.splice_and_close(state, sock, up)))
}
