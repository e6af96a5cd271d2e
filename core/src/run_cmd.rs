//! `zring run`: the node proxy, first cut.
//!
//! - Config: ztunnel's local YAML (`--config` or `LOCAL_XDS_PATH`); workloads whose `node` is
//!   `--node-name` (or `NODE_NAME`) are local.
//! - Identities: one certificate per local workload identity from the local CA (`--ca-dir`).
//! - Inbound HBONE: every worker listens on `<ip>:15008` for each local HBONE workload IP,
//!   presents that workload's certificate, and answers each CONNECT per `inbound::decide`
//!   (local target, waypoint-only, L4 policy) before connecting to the workload and relaying.
//! - Outbound through SOCKS5 (`--socks5 ADDR`): the source workload is the one owning the
//!   client's IP; the destination is resolved (VIP -> an endpoint, round robin per worker;
//!   workload IP; waypoint when the service or workload has one); HBONE workloads are reached
//!   through the worker's pool (source identity presented, destination identity required), TCP
//!   workloads and unknown addresses are passed through with the splice relay.
//!
//! Not yet here (issue 4 continues): SO_ORIGINAL_DST capture on 15001, inbound plaintext on
//! 15006, telemetry, admin, readiness, reload, the demo mesh.

use std::{
    cell::Cell,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    rc::Rc,
    sync::Arc,
    time::Instant,
};

use anyhow::Context;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use zring_hbone::{
    ca::{LocalCa, DEFAULT_WORKLOAD_TTL},
    client::{ConnectError, ConnectHeaders},
    pool::{Pool, PoolError, PoolKey, PoolSettings},
    relay::copy_bidirectional,
    server::{self, Incoming},
    tls, H2Settings, SpiffeId,
};
use zring_runtime::{
    drain::Drain,
    net::{self, ConnectOptions, ListenOptions},
    relay::RelayOptions,
    server as accept, ShutdownTrigger, WorkerConfig, WorkerContext, Workers,
};

use crate::{
    config::{
        index::{MeshIndex, Resolved},
        GatewayAddress, InboundProtocol, LocalConfig, Workload,
    },
    hbone_io::{MonoioExecutor, PollTcp, TlsDialer},
    identity::CertManager,
    inbound,
    relay_cmd::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_DRAIN_TIMEOUT},
    socks5::{self, Reply},
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
    /// CA directory.
    pub ca_dir: PathBuf,
    /// SOCKS5 listener, if any.
    pub socks5: Option<SocketAddr>,
    /// Inbound HBONE port.
    pub hbone_port: u16,
    /// SO_MARK on upstream sockets (None: off, for unprivileged runs).
    pub mark: Option<u32>,
    /// Originate HBONE connections from the source workload's IP (loopback demos and tests;
    /// in-pod mode does this by living in the pod's namespace).
    pub bind_source: bool,
    /// Workers.
    pub workers: WorkerConfig,
}

struct Shared {
    cfg: RunConfig,
    index: MeshIndex,
    certs: Arc<CertManager>,
    h2: H2Settings,
}

/// Run the node proxy until shutdown.
pub fn run(cfg: RunConfig, trigger: &ShutdownTrigger) -> anyhow::Result<()> {
    let config = LocalConfig::load(&cfg.config)?;
    let index = MeshIndex::new(config);
    let ca = LocalCa::load_dir(&cfg.ca_dir)
        .with_context(|| format!("loading the CA from {}", cfg.ca_dir.display()))?;
    let certs = Arc::new(CertManager::new(ca, DEFAULT_WORKLOAD_TTL));
    let local: Vec<&Workload> = index.local_workloads(&cfg.node).collect();
    for w in &local {
        certs.get(&w.identity()?)?;
    }
    tracing::info!(node = %cfg.node, local_workloads = local.len(), workloads = index.config.workloads.len(), services = index.config.services.len(), policies = index.config.policies.len(), "config loaded");
    spawn_renewal(certs.clone(), trigger.clone())?;
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        index,
        certs,
        h2: H2Settings::default(),
    });
    let s = shared.clone();
    let workers = Workers::start(&cfg.workers, trigger, move |ctx| worker(ctx, s.clone()))?;
    tracing::info!(workers = workers.len(), io = %workers.backend(), socks5 = ?cfg.socks5, "zring node proxy running");
    workers.join()?;
    Ok(())
}

/// How often certificates are checked for renewal.
pub const RENEWAL_CHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// A control thread that renews certificates past half their lifetime. New connections pick
/// up the renewed certificate (`CertManager::get` per connection); live ones keep theirs. A
/// failed renewal keeps the old, still valid, certificate and is retried at the next check.
fn spawn_renewal(certs: Arc<CertManager>, trigger: ShutdownTrigger) -> std::io::Result<()> {
    std::thread::Builder::new().name("zring-certs".into()).spawn(move || {
        while !trigger.is_triggered() {
            std::thread::sleep(RENEWAL_CHECK);
            for r in certs.renew_due(std::time::SystemTime::now()) {
                match r {
                    Ok(id) => tracing::info!(identity = %id, "certificate renewed"),
                    Err(e) => tracing::warn!(error = %e, "certificate renewal failed; keeping the current one and retrying"),
                }
            }
        }
    })?;
    Ok(())
}

async fn worker(ctx: WorkerContext, shared: Arc<Shared>) -> std::io::Result<()> {
    let drain = Drain::on_shutdown(ctx.shutdown);
    let mut loops = Vec::new();
    let inbound_ips: Vec<IpAddr> = shared
        .index
        .local_workloads(&shared.cfg.node)
        .filter(|w| w.protocol == InboundProtocol::Hbone)
        .flat_map(|w| w.workload_ips.iter().copied())
        .collect();
    for ip in inbound_ips {
        let addr = SocketAddr::new(ip, shared.cfg.hbone_port);
        let listener = net::bind_monoio_listener(addr, &ListenOptions::default()).map_err(|e| {
            std::io::Error::new(e.kind(), format!("inbound HBONE listener {addr}: {e}"))
        })?;
        let (s, d) = (shared.clone(), drain.clone());
        loops.push(monoio::spawn(async move {
            accept::accept_loop(listener, &d, |tcp, peer| {
                accept::spawn_tracked(&d, inbound_conn(tcp, peer, s.clone(), d.clone()))
            })
            .await;
        }));
    }
    if let Some(addr) = shared.cfg.socks5 {
        let listener = net::bind_monoio_listener(addr, &ListenOptions::default())
            .map_err(|e| std::io::Error::new(e.kind(), format!("SOCKS5 listener {addr}: {e}")))?;
        let certs = shared.certs.clone();
        let dialer = TlsDialer {
            config: Arc::new(move |key: &PoolKey| {
                certs
                    .client_config(&key.src_id, vec![key.dst_id.clone()])
                    .map_err(|e| std::io::Error::other(e.to_string()))
            }),
            connect: ConnectOptions {
                mark: shared.cfg.mark,
                timeout: Some(DEFAULT_CONNECT_TIMEOUT),
                ..Default::default()
            },
            bind_source: shared.cfg.bind_source,
        };
        let pool = Rc::new(Pool::new(
            dialer,
            MonoioExecutor,
            PoolSettings {
                h2: shared.h2.clone(),
                ..Default::default()
            },
        ));
        let rr = Rc::new(Cell::new(ctx.index));
        let (s, d) = (shared.clone(), drain.clone());
        loops.push(monoio::spawn(async move {
            accept::accept_loop(listener, &d, |sock, peer| {
                accept::spawn_tracked(
                    &d,
                    outbound_socks(sock, peer, s.clone(), pool.clone(), rr.clone()),
                );
            })
            .await;
        }));
    }
    for l in loops {
        l.await;
    }
    drain.wait_idle(DEFAULT_DRAIN_TIMEOUT).await;
    Ok(())
}

async fn inbound_conn(
    tcp: monoio::net::TcpStream,
    peer_addr: SocketAddr,
    shared: Arc<Shared>,
    drain: Drain,
) {
    let _ = tcp.set_nodelay(true);
    let Ok(local) = tcp.local_addr() else { return };
    let Some(id) = shared
        .index
        .workload_by_ip(local.ip())
        .and_then(|w| w.identity().ok())
    else {
        return tracing::warn!(dst.addr = %local, "inbound connection to an address with no workload");
    };
    let issued = match shared.certs.get(&id) {
        Ok(i) => i,
        Err(e) => return tracing::warn!(error = %e, "no certificate for the destination workload"),
    };
    let Ok(tcp) = PollTcp::new(tcp) else { return };
    let tls = match tokio_rustls::TlsAcceptor::from(issued.server.clone())
        .accept(tcp)
        .await
    {
        Ok(t) => t,
        Err(e) => {
            return tracing::info!(src.addr = %peer_addr, error = %tls::classify_handshake(e), "inbound HBONE handshake failed")
        }
    };
    let peer = tls::peer_identity(tls.get_ref().1);
    let s = shared.clone();
    let handler = move |i: Incoming| inbound_stream(i, peer_addr, s.clone());
    if let Err(e) = server::serve(tls, peer, &shared.h2, MonoioExecutor, handler, async move {
        drain.signaled().await
    })
    .await
    {
        tracing::info!(src.addr = %peer_addr, error = %e, "inbound HBONE connection failed");
    }
}

async fn inbound_stream(incoming: Incoming, peer_addr: SocketAddr, shared: Arc<Shared>) {
    let start = Instant::now();
    let target = incoming.request.target;
    let peer = incoming.request.peer.clone();
    let who = peer.as_ref().map(|p| p.to_string()).unwrap_or_default();
    if let Err(r) = inbound::decide(
        &shared.index,
        &shared.cfg.node,
        peer_addr,
        target,
        peer.as_ref(),
    ) {
        tracing::info!(direction = "inbound", src.addr = %peer_addr, src.identity = %who, dst.addr = %target, response_flags = r.response_flags, status = r.status.as_u16(), error = %r.reason, "connection complete");
        return incoming.reject(r.status);
    }
    let opts = ConnectOptions {
        mark: shared.cfg.mark,
        timeout: Some(DEFAULT_CONNECT_TIMEOUT),
        ..Default::default()
    };
    let up = match net::connect(target, &opts).await.and_then(PollTcp::new) {
        Ok(u) => u,
        Err(e) => {
            tracing::info!(direction = "inbound", src.identity = %who, dst.addr = %target, response_flags = "UF", error = %e, "connection complete");
            return incoming.reject(server::StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let Ok(stream) = incoming.accept() else {
        return;
    };
    let out = copy_bidirectional(up, stream).await;
    tracing::info!(
        direction = "inbound",
        src.addr = %peer_addr,
        src.identity = %who,
        dst.addr = %target,
        bytes_sent = out.socket_to_stream,
        bytes_recv = out.stream_to_socket,
        duration_ms = start.elapsed().as_secs_f64() * 1e3,
        error = out.error.map(|e| e.to_string()).unwrap_or_default(),
        "connection complete"
    );
}

/// Where an outbound connection goes.
enum Route {
    /// Through HBONE to `hbone` (a workload's or waypoint's `ip:15008`), CONNECT `target`.
    Hbone {
        dst_id: SpiffeId,
        hbone: SocketAddr,
        target: SocketAddr,
    },
    /// Plain TCP to `target`.
    Passthrough(SocketAddr),
}

fn route(shared: &Shared, target: SocketAddr, rr: &Cell<usize>) -> Result<Route, String> {
    let idx = &shared.index;
    let resolved = idx.resolve(target);
    let via_waypoint = |wp: &GatewayAddress| -> Result<Route, String> {
        let w = idx
            .workload_by_ip(wp.destination.address)
            .ok_or_else(|| format!("waypoint {} is not a known workload", wp.destination))?;
        let dst_id = w.identity().map_err(|e| e.to_string())?;
        Ok(Route::Hbone {
            dst_id,
            hbone: SocketAddr::new(wp.destination.address, wp.hbone_mtls_port),
            target,
        })
    };
    if let Some(wp) = idx.waypoint_for(&resolved) {
        return via_waypoint(wp);
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
            let n = rr.get();
            rr.set(n.wrapping_add(1));
            let (w, port) = endpoints[n % endpoints.len()];
            let ip = *w
                .workload_ips
                .first()
                .ok_or_else(|| format!("endpoint {} has no IP", w.name))?;
            (w, SocketAddr::new(ip, port))
        }
    };
    if w.protocol != InboundProtocol::Hbone {
        return Ok(Route::Passthrough(dst));
    }
    let dst_id = w.identity().map_err(|e| e.to_string())?;
    Ok(Route::Hbone {
        dst_id,
        hbone: SocketAddr::new(dst.ip(), shared.cfg.hbone_port),
        target: dst,
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

async fn outbound_socks(
    mut sock: monoio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    pool: Rc<Pool<TlsDialer, MonoioExecutor>>,
    rr: Rc<Cell<usize>>,
) {
    let start = Instant::now();
    let _ = sock.set_nodelay(true);
    let mut buf = Vec::new();
    let greeting = read_until(&mut sock, &mut buf, |b| match socks5::parse_greeting(b) {
        Ok(Some(n)) => Some(Ok(n)),
        Ok(None) => None,
        Err(e) => Some(Err(e)),
    })
    .await;
    let n = match greeting {
        Some(Ok(n)) => n,
        Some(Err(e)) => return tracing::debug!(src.addr = %peer, error = e, "bad SOCKS5 greeting"),
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
    let fail = |reason: String, flags: &'static str| {
        tracing::info!(direction = "outbound", src.addr = %peer, dst.addr = %target, response_flags = flags, error = %reason, "connection complete");
    };
    let Some(src) = shared
        .index
        .workload_by_ip(peer.ip())
        .filter(|w| w.node == shared.cfg.node)
    else {
        let _ = sock
            .write_all(socks5::reply(Reply::NotAllowed).to_vec())
            .await;
        return fail(
            format!(
                "{} is not a workload on node {}",
                peer.ip(),
                shared.cfg.node
            ),
            "NR",
        );
    };
    let src_id = match src.identity() {
        Ok(i) => i,
        Err(e) => return fail(e.to_string(), "NR"),
    };
    let route = match route(&shared, target, &rr) {
        Ok(r) => r,
        Err(e) => {
            let _ = sock
                .write_all(socks5::reply(Reply::HostUnreachable).to_vec())
                .await;
            return fail(e, "NR");
        }
    };
    match route {
        Route::Passthrough(dst) => {
            let opts = ConnectOptions {
                mark: shared.cfg.mark,
                timeout: Some(DEFAULT_CONNECT_TIMEOUT),
                ..Default::default()
            };
            let up = match net::connect(dst, &opts).await {
                Ok(u) => u,
                Err(e) => {
                    let _ = sock.write_all(socks5::reply(Reply::Refused).to_vec()).await;
                    return fail(e.to_string(), "UF");
                }
            };
            if sock
                .write_all(socks5::reply(Reply::Ok).to_vec())
                .await
                .0
                .is_err()
            {
                return;
            }
            let out = zring_runtime::relay(sock, up, &RelayOptions::default()).await;
            tracing::info!(direction = "outbound", path = "passthrough", src.addr = %peer, dst.addr = %dst, bytes_sent = out.client_to_upstream, bytes_recv = out.upstream_to_client, duration_ms = start.elapsed().as_secs_f64() * 1e3, error = out.error.map(|e| e.to_string()).unwrap_or_default(), "connection complete");
        }
        Route::Hbone {
            dst_id,
            hbone,
            target: connect_to,
        } => {
            let key = PoolKey {
                src_id: src_id.clone(),
                dst_id: dst_id.clone(),
                src_ip: peer.ip(),
                dst: hbone,
            };
            let headers = ConnectHeaders {
                forwarded_for: Some(peer.ip()),
                ..Default::default()
            };
            let stream = match pool.connect(&key, connect_to, &headers).await {
                Ok(s) => s,
                Err(e) => {
                    let (code, flags) = match &e {
                        PoolError::Connect(ConnectError::Denied) => (Reply::NotAllowed, "DENY"),
                        PoolError::Connect(ConnectError::Unavailable(_)) => {
                            (Reply::HostUnreachable, "UF")
                        }
                        _ => (Reply::Failure, "UF"),
                    };
                    let _ = sock.write_all(socks5::reply(code).to_vec()).await;
                    return fail(e.to_string(), flags);
                }
            };
            if sock
                .write_all(socks5::reply(Reply::Ok).to_vec())
                .await
                .0
                .is_err()
            {
                return;
            }
            let (stream, _slot) = stream.into_parts();
            let Ok(sock) = PollTcp::new(sock) else { return };
            let out = copy_bidirectional(sock, stream).await;
            tracing::info!(
                direction = "outbound",
                path = "hbone",
                src.addr = %peer,
                src.identity = %src_id,
                dst.addr = %connect_to,
                dst.hbone = %hbone,
                dst.identity = %dst_id,
                bytes_sent = out.socket_to_stream,
                bytes_recv = out.stream_to_socket,
                duration_ms = start.elapsed().as_secs_f64() * 1e3,
                error = out.error.map(|e| e.to_string()).unwrap_or_default(),
                "connection complete"
            );
        }
    }
}
