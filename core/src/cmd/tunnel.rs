//! `zring tunnel server|client`: plain TCP carried over one HBONE hop, on zring's workers.
//!
//! `client` accepts TCP, opens a CONNECT stream to `--target` through a pooled mutual-TLS HTTP/2
//! connection to `--server`, and relays; `server` terminates HBONE, dials the CONNECT target
//! and relays. Both take their certificates from a local CA directory (`zring ca init`). This is
//! the tunnel benchmark subject and a debugging tool for HBONE peers; the node proxy uses the
//! same pieces with policy and config on top.

use std::{net::SocketAddr, rc::Rc, sync::Arc, time::Instant};

use anyhow::Context;
use zring_hbone::{
    ca::{LocalCa, DEFAULT_WORKLOAD_TTL},
    client::ConnectHeaders,
    pool::{Pool, PoolKey, PoolSettings},
    relay::copy_bidirectional,
    server::{self, Incoming},
    tls, H2Settings, SpiffeId,
};
use zring_runtime::{
    drain::Drain,
    net::{self, ConnectOptions, ListenOptions},
    server as accept, ShutdownTrigger, WorkerConfig, WorkerContext, Workers,
};

use crate::{
    hbone_io::{MonoioExecutor, PollTcp, TlsDialer},
    proxy::DEFAULT_DRAIN_TIMEOUT,
};

/// Settings shared by both ends.
#[derive(Debug, Clone)]
pub struct TunnelCommon {
    /// Where to accept.
    pub listen: SocketAddr,
    /// CA directory with root-cert.pem and root-key.pem.
    pub ca_dir: std::path::PathBuf,
    /// The identity this end presents.
    pub identity: SpiffeId,
    /// Workers.
    pub workers: WorkerConfig,
    /// HTTP/2 settings.
    pub h2: H2Settings,
    /// Upstream connect options.
    pub connect: ConnectOptions,
}

/// `zring tunnel server`.
pub fn run_server(c: TunnelCommon, trigger: &ShutdownTrigger) -> anyhow::Result<()> {
    let ca = LocalCa::load_dir(&c.ca_dir)
        .with_context(|| format!("loading the CA from {}", c.ca_dir.display()))?;
    let cert = ca.issue(&c.identity, DEFAULT_WORKLOAD_TTL)?;
    let config = tls::server_config(&cert, &[ca.root().clone()])?;
    let c = Arc::new(c);
    let cc = c.clone();
    let workers = Workers::start(&c.workers, trigger, move |ctx| {
        server_worker(ctx, cc.clone(), config.clone())
    })?;
    tracing::info!(listen = %c.listen, identity = %c.identity, workers = workers.len(), io = %workers.backend(), "HBONE tunnel server listening");
    workers.join()?;
    Ok(())
}

async fn server_worker(
    ctx: WorkerContext,
    c: Arc<TunnelCommon>,
    config: Arc<rustls::ServerConfig>,
) -> std::io::Result<()> {
    let listener = net::bind_monoio_listener(c.listen, &ListenOptions::default())?;
    let drain = Drain::on_shutdown(ctx.shutdown);
    accept::accept_loop(listener, &drain, |tcp, conn| {
        let (c, config, d) = (c.clone(), config.clone(), drain.clone());
        let peer_addr = conn.peer;
        accept::spawn_tracked(&drain, conn, async move {
            // Without TCP_NODELAY, small frames (WINDOW_UPDATE, SETTINGS ACK) wait for Nagle
            // and the peer's delayed ACK, stalling flow control for tens of milliseconds.
            let _ = tcp.set_nodelay(true);
            let tcp = match PollTcp::tls(tcp) {
                Ok(t) => t,
                Err(e) => return tracing::warn!(error = %e, "cannot switch socket to poll mode"),
            };
            let tls = match tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
                Ok(t) => t,
                Err(e) => return tracing::info!(src.addr = %peer_addr, error = %tls::classify_handshake(e), "HBONE TLS handshake failed"),
            };
            let peer = tls::peer_identity(tls.get_ref().1);
            let c2 = c.clone();
            let handler = move |i: Incoming| serve_stream(i, c2.clone());
            if let Err(e) = server::serve(tls, peer, &c.h2, MonoioExecutor, handler, async move { d.signaled().await }).await {
                tracing::info!(src.addr = %peer_addr, error = %e, "HBONE connection failed");
            }
        });
    })
    .await;
    drain.wait_idle(DEFAULT_DRAIN_TIMEOUT).await;
    Ok(())
}

async fn serve_stream(incoming: Incoming, c: Arc<TunnelCommon>) {
    let start = Instant::now();
    let target = incoming.request.target;
    let peer = incoming.request.peer.clone();
    let up = match net::connect(target, &c.connect)
        .await
        .and_then(PollTcp::new)
    {
        Ok(u) => u,
        Err(e) => {
            tracing::info!(dst.addr = %target, error = %e, "target unreachable; answering 503");
            return incoming.reject(http::StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let stream = match incoming.accept() {
        Ok(s) => s,
        Err(e) => return tracing::debug!(error = %e, "stream gone before 200"),
    };
    let out = copy_bidirectional(up, stream).await;
    tracing::info!(
        src.identity = peer.map(|p| p.to_string()).unwrap_or_default(),
        dst.addr = %target,
        bytes_recv = out.stream_to_socket,
        bytes_sent = out.socket_to_stream,
        duration_ms = start.elapsed().as_secs_f64() * 1e3,
        error = out.error.map(|e| e.to_string()).unwrap_or_default(),
        "inbound stream complete"
    );
}

/// `zring tunnel client` extras.
#[derive(Debug, Clone)]
pub struct TunnelClient {
    /// The HBONE server (`ip:15008`).
    pub server: SocketAddr,
    /// The CONNECT target behind it.
    pub target: SocketAddr,
    /// The identity the server must prove.
    pub expect: SpiffeId,
    /// Pool settings.
    pub pool: PoolSettings,
}

/// `zring tunnel client`.
pub fn run_client(
    c: TunnelCommon,
    t: TunnelClient,
    trigger: &ShutdownTrigger,
) -> anyhow::Result<()> {
    let ca = LocalCa::load_dir(&c.ca_dir)
        .with_context(|| format!("loading the CA from {}", c.ca_dir.display()))?;
    let cert = ca.issue(&c.identity, DEFAULT_WORKLOAD_TTL)?;
    let config = tls::client_config(&cert, &[ca.root().clone()], vec![t.expect.clone()])?;
    let (c, t) = (Arc::new(c), Arc::new(t));
    let (cc, tt) = (c.clone(), t.clone());
    let workers = Workers::start(&c.workers, trigger, move |ctx| {
        client_worker(ctx, cc.clone(), tt.clone(), config.clone())
    })?;
    tracing::info!(listen = %c.listen, server = %t.server, target = %t.target, workers = workers.len(), io = %workers.backend(), "HBONE tunnel client listening");
    workers.join()?;
    Ok(())
}

async fn client_worker(
    ctx: WorkerContext,
    c: Arc<TunnelCommon>,
    t: Arc<TunnelClient>,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<()> {
    let listener = net::bind_monoio_listener(c.listen, &ListenOptions::default())?;
    let drain = Drain::on_shutdown(ctx.shutdown);
    let dialer = TlsDialer {
        config: Arc::new(move |_| Ok(config.clone())),
        connect: c.connect.clone(),
        bind_source: false,
        netns_of: None,
        timeouts: t.pool.h2.timeouts.clone(),
        tcp_keepalive: Some(zring_runtime::net::DEFAULT_TCP_KEEPALIVE),
    };
    let pool = Rc::new(Pool::new(dialer, MonoioExecutor, t.pool.clone()));
    let key = Rc::new(PoolKey {
        src_id: c.identity.clone(),
        dst_id: t.expect.clone(),
        src_ip: c.listen.ip(),
        dst: t.server,
    });
    accept::accept_loop(listener, &drain, |sock, conn| {
        let (pool, key, t) = (pool.clone(), key.clone(), t.clone());
        let peer = conn.peer;
        accept::spawn_tracked(&drain, conn, async move {
            let start = Instant::now();
            let _ = sock.set_nodelay(true);
            let headers = ConnectHeaders { forwarded_for: Some(peer), ..Default::default() };
            let stream = match pool.connect(&key, t.target, &headers).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = net::set_reset_on_close(&sock);
                    return tracing::warn!(src.addr = %peer, dst.addr = %t.target, error = %e, "HBONE connect failed");
                }
            };
            let (stream, _slot) = stream.into_parts();
            let sock = match PollTcp::new(sock) {
                Ok(s) => s,
                Err(e) => return tracing::warn!(error = %e, "cannot switch socket to poll mode"),
            };
            let out = copy_bidirectional(sock, stream).await;
            tracing::info!(
                src.addr = %peer,
                dst.addr = %t.target,
                bytes_sent = out.socket_to_stream,
                bytes_recv = out.stream_to_socket,
                duration_ms = start.elapsed().as_secs_f64() * 1e3,
                error = out.error.map(|e| e.to_string()).unwrap_or_default(),
                "outbound stream complete"
            );
        });
    })
    .await;
    drain.wait_idle(DEFAULT_DRAIN_TIMEOUT).await;
    Ok(())
}
