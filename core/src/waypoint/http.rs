//! One CONNECT stream at the waypoint: protocol detection, then HTTP (hyper, HTTP/1.1 or h2c)
//! request by request, or a TCP relay.

use std::{
    cell::{Cell, RefCell},
    convert::Infallible,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    rc::Rc,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use zring_hbone::{
    client::ConnectHeaders,
    pool::{PoolKey, StreamSlot},
    relay::{self, TunnelCounts},
    server::Incoming as ConnectStream,
    stream::H2Stream,
    Executor as _, SpiffeId,
};
use zring_runtime::net::{self, ConnectOptions};

use super::{
    cors::{self, Cors},
    ext_authz,
    headers::{self, HeaderRules},
    jwt,
    metrics::Refused,
    mirror, normalize,
    policy::{self, Decision, RequestContext},
    resources::{self, Abort, Backend, L7Config, Mirror, RequestView, RetryPolicy},
    traffic::{self, Outcome, Outlier, Overflow, Permit},
    FastMap, Waypoint,
};
use crate::{
    config::{
        index::MeshIndex, weighted_turn, InboundProtocol, LoadBalancerMode, Service, Workload,
    },
    hbone_io::{MonoioExecutor, PollTcp},
    metrics::{ConnLabels, Peer},
    proxy::{random, ConnLog, HbonePool, State, DEFAULT_CONNECT_TIMEOUT},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides (not `Send`: bodies hold this worker's counters).
type Body = Pin<Box<dyn hyper::body::Body<Data = Bytes, Error = BoxError>>>;

/// Runs hyper's background futures on the current worker.
#[derive(Debug, Clone, Copy)]
struct LocalExec;

impl<F: Future<Output = ()> + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        MonoioExecutor.spawn(Box::pin(fut));
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a stream say it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 with prior knowledge (h2c, gRPC).
    Http2,
    /// Anything else.
    Tcp,
}

/// HTTP/1 methods recognised by protocol detection (RFC 9110, PATCH, WebDAV).
const METHODS: [&[u8]; 17] = [
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
    b"SEARCH",
];

/// Classify the first bytes; None: not enough yet. HTTP/1 needs a whole request line (a known
/// method, a target, `HTTP/1.0` or `HTTP/1.1`): binary payloads that happen to start with
/// capital letters and a space stay TCP (a looser check sent about 1 in 3,000 random echo payloads
/// to the HTTP parser in the harness).
pub fn detect(buf: &[u8]) -> Option<Detected> {
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Some(Detected::Http2);
    }
    if H2_PREFACE.starts_with(buf) {
        return None;
    }
    let n = buf.iter().take_while(|c| c.is_ascii_uppercase()).count();
    if n == buf.len() {
        return (n > 16).then_some(Detected::Tcp);
    }
    if buf[n] != b' ' || !METHODS.contains(&&buf[..n]) {
        return Some(Detected::Tcp);
    }
    match buf.iter().position(|&c| c == b'\n') {
        None if buf.len() < 8192 => None,
        None => Some(Detected::Tcp),
        Some(end) => {
            let line = &buf[..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
                true => Some(Detected::Http1),
                false => Some(Detected::Tcp),
            }
        }
    }
}

/// A stream whose first bytes were read to detect the protocol, played back first.
struct Rewind {
    prefix: Bytes,
    inner: H2Stream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An upstream byte stream: a CONNECT stream over pooled HBONE (holding its pool slot) or
/// plain TCP to a workload that does not speak HBONE.
enum UpIo {
    Hbone(H2Stream, StreamSlot),
    Tcp(PollTcp),
}

impl AsyncRead for UpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Hbone(s, _) => Pin::new(s).poll_read(cx, buf),
            UpIo::Tcp(t) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpIo::Hbone(s, _) => Pin::new(s).poll_write(cx, b),
            UpIo::Tcp(t) => Pin::new(t).poll_write(cx, b),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Hbone(s, _) => Pin::new(s).poll_flush(cx),
            UpIo::Tcp(t) => Pin::new(t).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Hbone(s, _) => Pin::new(s).poll_shutdown(cx),
            UpIo::Tcp(t) => Pin::new(t).poll_shutdown(cx),
        }
    }
}

/// A request sender on a pooled upstream connection.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

impl Sender {
    fn usable(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => !s.is_closed(),
        }
    }
    fn closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
    /// Another handle on an HTTP/2 connection (HTTP/1.1 senders are not shared).
    fn clone_h2(&self) -> Option<Sender> {
        match self {
            Sender::H2(s) => Some(Sender::H2(s.clone())),
            Sender::H1(_) => None,
        }
    }
    async fn send(&mut self, req: Request<Body>) -> hyper::Result<Response<Incoming>> {
        match self {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }
}

/// Most idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// What a route's `timeout: 0s` stands for: no limit (a year, beyond any real request).
const NO_LIMIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Upstream HTTP connections by (endpoint, h2), each with the requests it has carried.
type SenderPool = FastMap<(SocketAddr, bool), Vec<(Sender, u32)>>;

thread_local! {
    /// This worker's upstream HTTP connections: (endpoint, h2) -> senders, each with the
    /// requests it has carried.
    static SENDERS: RefCell<SenderPool> = RefCell::new(FastMap::default());
    /// Endpoints that failed recently, and until when they are skipped.
    static EJECTED: RefCell<FastMap<SocketAddr, Instant>> = RefCell::new(FastMap::default());
    /// Per-worker round robin over endpoints.
    static RR: Cell<usize> = const { Cell::new(0) };
    /// Per-worker turns of `distribute`'s weighted choice (apart from [`RR`], which the pick
    /// after it advances too).
    static SHARE_TURN: Cell<usize> = const { Cell::new(0) };
}

/// A pooled sender to `addr` and the requests it carried before this one. An HTTP/2 sender
/// stays pooled (shared) until it has carried `max_uses` requests (0: no limit); an HTTP/1.1
/// one is taken out until its response, then put back with [`put_sender`].
fn take_sender(addr: SocketAddr, h2: bool, max_uses: u32) -> Option<(Sender, u32)> {
    SENDERS.with(|m| {
        let mut m = m.borrow_mut();
        let v = m.get_mut(&(addr, h2))?;
        v.retain(|(s, _)| !s.closed());
        let i = v.iter().position(|(s, _)| match s {
            Sender::H2(_) => h2,
            Sender::H1(_) => !h2 && s.usable(),
        })?;
        if !h2 {
            return Some(v.swap_remove(i));
        }
        let (s, uses) = &mut v[i];
        let taken = (s.clone_h2()?, *uses);
        *uses += 1;
        if max_uses > 0 && *uses >= max_uses {
            // Retired: no new streams; it closes once its last stream ends.
            v.swap_remove(i);
        }
        Some(taken)
    })
}

/// Pool a sender that has carried `uses` requests, unless that reached `max_uses`.
fn put_sender(addr: SocketAddr, s: Sender, uses: u32, max_uses: u32) {
    if max_uses > 0 && uses >= max_uses {
        return;
    }
    SENDERS.with(|m| {
        let mut m = m.borrow_mut();
        let v = m.entry((addr, matches!(s, Sender::H2(_)))).or_default();
        v.retain(|(s, _)| !s.closed());
        if v.len() < MAX_IDLE_PER_ENDPOINT {
            v.push((s, uses));
        }
    })
}

fn ejected(addr: SocketAddr) -> bool {
    EJECTED.with(|e| {
        let mut e = e.borrow_mut();
        match e.get(&addr) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                e.remove(&addr);
                false
            }
            None => false,
        }
    })
}

fn eject(wp: &Waypoint, addr: SocketAddr) {
    let until = Instant::now() + wp.settings.ejection;
    EJECTED.with(|e| e.borrow_mut().insert(addr, until));
    wp.metrics.ejected();
    tracing::info!(endpoint = %addr, secs = wp.settings.ejection.as_secs(), "waypoint: endpoint failed; skipped for a while");
}

/// What one client connection (CONNECT stream) shares across its requests.
struct ConnCtx {
    state: Arc<State>,
    wp: Arc<Waypoint>,
    pool: Rc<HbonePool>,
    /// The CONNECT's authority: the original destination.
    target: SocketAddr,
    peer: Option<SpiffeId>,
    /// The peer's principal as policies name it (`cluster.local/ns/NS/sa/SA`), made once per
    /// connection rather than per request.
    principal: Option<String>,
    /// The original client (`Forwarded: for=`), else the TCP peer.
    client: SocketAddr,
    local_ip: IpAddr,
    my_id: SpiffeId,
    /// `baggage` of the waypoint's own workload, sent on its upstream CONNECTs (the waypoint
    /// is their source, as a node proxy sends its pod's).
    baggage: String,
    /// The client's `traceparent` (well-formed), forwarded upstream; else a new trace per
    /// upstream stream.
    traceparent: Option<String>,
    source: std::sync::Arc<Peer>,
    h2: bool,
    /// Requests whose response has not ended yet, and when the last one ended (the idle
    /// watchdog closes a connection with none in flight for `idle_timeout`).
    in_flight: Cell<usize>,
    last_active: Cell<Instant>,
}

/// Marks a request in flight until its response body ends (or is dropped).
struct InFlight(Rc<ConnCtx>);

impl InFlight {
    fn new(ctx: Rc<ConnCtx>) -> Self {
        ctx.in_flight.set(ctx.in_flight.get() + 1);
        InFlight(ctx)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .set(self.0.in_flight.get().saturating_sub(1));
        self.0.last_active.set(Instant::now());
    }
}

/// A response body that keeps its request marked in flight.
struct Tracked {
    inner: Body,
    _guard: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.inner.as_mut().poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Completes once the connection has had no request in flight for `idle` (a client that
/// opens a connection and sends nothing, or trickles a request head, is bounded by it).
async fn idle_watchdog(ctx: &ConnCtx, idle: Duration) {
    loop {
        let wait = match ctx.in_flight.get() {
            0 => {
                let since = ctx.last_active.get().elapsed();
                if since >= idle {
                    return;
                }
                idle - since
            }
            _ => idle,
        };
        monoio::time::sleep(wait).await;
    }
}

/// Serve one CONNECT stream that reached the waypoint.
pub(crate) async fn stream(
    incoming: ConnectStream,
    peer_addr: SocketAddr,
    local: SocketAddr,
    state: Arc<State>,
    wp: Arc<Waypoint>,
    pool: Rc<HbonePool>,
) {
    let target = incoming.request.target;
    let peer = incoming.request.peer.clone();
    // The client is the HBONE connection's peer, as Istio's waypoint takes it
    // (`%DOWNSTREAM_REMOTE_ADDRESS%`): never a `Forwarded` any peer with a certificate could
    // write, so `source.ip`/`ipBlocks` and the `Forwarded` sent on cannot be forged.
    let client = peer_addr;
    let index = state.index();
    let Some((me, my_id)) = index
        .workload_by_ip(local.ip())
        .and_then(|w| w.identity().ok().map(|id| (w, id)))
    else {
        tracing::warn!(%local, "waypoint: no workload owns the address this stream came to");
        return incoming.reject(StatusCode::SERVICE_UNAVAILABLE);
    };
    let baggage = crate::proxy::headers::baggage(me);
    // Serve only what is bound to this waypoint: a service VIP or a workload address whose
    // waypoint is this one. Anything else would make the waypoint a relay that re-originates
    // under its own identity (past the destination's policy on the real client).
    let refused = if target.ip() == local.ip() {
        Some(Refused::OwnAddress)
    } else {
        match index.waypoint_at(target.ip()) {
            None => Some(Refused::Unknown),
            Some(wp) if !wp.is_some_and(|gw| index.gateway_is(gw, me)) => Some(Refused::NotBound),
            Some(_) => None,
        }
    };
    if let Some(why) = refused {
        wp.metrics.refused(why);
        tracing::info!(
            src.addr = %peer_addr,
            src.identity = ?peer.as_ref().map(ToString::to_string),
            dst.addr = %target,
            response_flags = "NR",
            reason = why.label(),
            "waypoint: CONNECT refused: {why}"
        );
        return incoming.reject(StatusCode::BAD_REQUEST);
    }
    // The client's trace goes on to the destination, so both ends' access lines carry its id.
    let traceparent = incoming
        .request
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|t| crate::proxy::telemetry::trace_id(t).is_some())
        .map(str::to_string);
    let source = Peer::source(index.workload_by_ip(client.ip()), peer.as_ref());
    drop(index);
    let Ok(mut s) = incoming.accept() else {
        return tracing::debug!(%target, "waypoint: the stream ended before 200");
    };
    // Detect the protocol from the first bytes (a server-first protocol sends none: TCP).
    let mut buf = BytesMut::new();
    let deadline = Instant::now() + wp.settings.sniff_timeout;
    let detected = loop {
        if let Some(d) = detect(&buf) {
            break d;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match monoio::time::timeout(left, s.reader.recv_bytes()).await {
            Ok(Ok(Some(b))) => buf.extend_from_slice(&b),
            Ok(Ok(None)) if buf.is_empty() => return,
            Ok(Ok(None)) | Err(_) => break Detected::Tcp,
            Ok(Err(e)) => {
                return tracing::debug!(error = %e, "waypoint: stream failed before any data")
            }
        }
    };
    let io = Rewind {
        prefix: buf.freeze(),
        inner: s,
    };
    let ctx = Rc::new(ConnCtx {
        state,
        wp,
        pool,
        target,
        principal: peer.as_ref().map(SpiffeId::principal),
        peer,
        client,
        local_ip: local.ip(),
        my_id,
        baggage,
        traceparent,
        source,
        h2: detected == Detected::Http2,
        in_flight: Cell::new(0),
        last_active: Cell::new(Instant::now()),
    });
    let idle = ctx.wp.settings.idle_timeout;
    match detected {
        // Each branch boxed: the task lives as long as the connection, and inline it would be
        // sized by the largest (hyper's) whichever protocol the connection turned out to be.
        Detected::Tcp => Box::pin(tcp(ctx, io)).await,
        Detected::Http1 => {
            let c = ctx.clone();
            let svc = hyper::service::service_fn(move |req| handle(c.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(ctx.wp.settings.max_header_bytes.max(8192))
                .keep_alive(true)
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            let conn = Box::pin(conn);
            monoio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "waypoint: HTTP/1 client connection ended with an error");
                },
                _ = idle_watchdog(&ctx, idle) => {
                    tracing::debug!(idle_ms = idle.as_millis() as u64, "waypoint: HTTP/1 client connection idle; closed");
                }
            }
        }
        Detected::Http2 => {
            let c = ctx.clone();
            let svc = hyper::service::service_fn(move |req| handle(c.clone(), req));
            let conn = hyper::server::conn::http2::Builder::new(LocalExec)
                .max_concurrent_streams(ctx.wp.settings.max_concurrent_streams)
                .max_header_list_size(ctx.wp.settings.max_header_bytes as u32)
                .serve_connection(TokioIo::new(io), svc);
            let conn = Box::pin(conn);
            monoio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "waypoint: HTTP/2 client connection ended with an error");
                },
                _ = idle_watchdog(&ctx, idle) => {
                    tracing::debug!(idle_ms = idle.as_millis() as u64, "waypoint: HTTP/2 client connection idle; closed");
                }
            }
        }
    }
}

/// A service and its endpoints with their target ports.
type Endpoints<'a> = (&'a Service, Vec<(&'a Workload, u16)>);

/// The endpoints of `b` (a service, maybe a subset) for `port` (the backend's, else the
/// dialed one, else the service's only port): the ready ones (unless the service allows all),
/// narrowed by the service's routing preferences (`trafficDistribution`, as istiod sends it)
/// as seen from the waypoint's own workload, as a node proxy narrows them for its pod.
fn endpoints<'a>(
    index: &'a MeshIndex,
    rules: &L7Config,
    ctx: &ConnCtx,
    b: &Backend,
    dialed: u16,
) -> Result<Endpoints<'a>, String> {
    let svc = index
        .service_by_key(&b.service)
        .ok_or_else(|| format!("service {} is not in the mesh config", b.service))?;
    let port = match b.port {
        Some(p) => p,
        None if svc.ports.contains_key(&dialed) => dialed,
        None if svc.ports.len() == 1 => svc.ports.keys().copied().next().unwrap_or(dialed),
        None => dialed,
    };
    let mut eps = index.service_endpoints(&b.service, port);
    if let Some(subset) = &b.subset {
        let labels = rules
            .subsets
            .get(&(b.service.clone(), subset.clone()))
            .ok_or_else(|| {
                format!(
                    "subset {subset} of {} is not defined by any DestinationRule",
                    b.service
                )
            })?;
        eps.retain(|(w, _)| crate::config::labels_match(w, labels));
    }
    // Strict preferences narrow the set; the others order it (`by_level`).
    if let Some(lb) = svc
        .load_balancer
        .as_ref()
        .filter(|lb| lb.mode == LoadBalancerMode::Strict)
    {
        if let Some(me) = index.workload_by_ip(ctx.local_ip) {
            eps = lb.select(me, &ctx.state.cfg.node, &eps);
        }
    }
    Ok((svc, eps))
}

/// Whether the endpoint at `a` is healthy: not ejected, and among those outlier detection
/// leaves in (`up`).
fn is_up(a: SocketAddr, up: Option<&[SocketAddr]>) -> bool {
    !ejected(a) && up.is_none_or(|up| up.contains(&a))
}

/// [`is_up`] for an endpoint given as a workload and its target port.
fn healthy(e: &(&Workload, u16), up: Option<&[SocketAddr]>) -> bool {
    endpoint_addr(e).is_some_and(|a| is_up(a, up))
}

/// `localityLbSetting.distribute`: the one endpoint (of `eps`, less those `tried`) this request
/// goes to, in turn by its locality's share (`traffic::distributed`), each locality's share
/// scaled by its health as Envoy scales locality weights (healthy part x 1.4, at most all).
/// Endpoints in localities the rule gives nothing get nothing; `None`: no rule is from the
/// waypoint's locality, nothing changes.
fn distribute<'a>(
    ctx: &ConnCtx,
    index: &MeshIndex,
    rules: &[(String, Vec<(String, u32)>)],
    eps: &[(&'a Workload, u16)],
    tried: &[SocketAddr],
    up: Option<&[SocketAddr]>,
) -> Option<Vec<(&'a Workload, u16)>> {
    let me = index.workload_by_ip(ctx.local_ip)?;
    let eps: Vec<(&Workload, u16)> = eps
        .iter()
        .filter(|e| endpoint_addr(e).is_some_and(|a| !tried.contains(&a)))
        .copied()
        .collect();
    let weights = traffic::distributed(me, &eps, rules)?;
    // Each locality's endpoints and healthy ones, counted once.
    let mut localities: Vec<(&crate::config::Locality, u64, u64)> = Vec::new();
    for e in &eps {
        let h = u64::from(healthy(e, up));
        match localities.iter_mut().find(|l| *l.0 == e.0.locality) {
            Some(l) => (l.1, l.2) = (l.1 + 1, l.2 + h),
            None => localities.push((&e.0.locality, 1, h)),
        }
    }
    let scaled: Vec<u64> = eps
        .iter()
        .zip(&weights)
        .map(|((w, _), weight)| {
            let (total, up_n) = localities
                .iter()
                .find(|l| *l.0 == w.locality)
                .map_or((1, 0), |l| (l.1, l.2));
            weight.unwrap_or(0) * (140 * up_n / total).min(100)
        })
        .collect();
    // No locality healthy: their plain shares (Envoy's panic: better a failing one than none).
    let shares: Vec<u64> = match scaled.iter().all(|w| *w == 0) {
        true => weights.iter().map(|w| w.unwrap_or(0) * 100).collect(),
        false => scaled,
    };
    let gcd = shares.iter().fold(0u64, |g, w| gcd(g, *w)).max(1);
    let turns = shares
        .iter()
        .map(|w| u32::try_from(w / gcd).unwrap_or(u32::MAX));
    let n = SHARE_TURN.with(|r| {
        let v = r.get();
        r.set(v.wrapping_add(1));
        v
    });
    Some(
        weighted_turn(turns, n)
            .map(|i| vec![eps[i]])
            .unwrap_or_default(),
    )
}

fn gcd(a: u64, b: u64) -> u64 {
    match b {
        0 => a,
        _ => gcd(b, a % b),
    }
}

/// Of `eps`, less those `tried`, the ones in the priority level this request goes to
/// (`traffic::levels`: locality failover, failover priorities, the service's preferences), by
/// Envoy's priority load: the best level while enough of it is healthy (`up`: those outlier
/// detection leaves in), spilling over to the next as its endpoints are ejected. `None`: no
/// order applies, choose from all of `eps` (the common case, which allocates nothing).
fn by_level<'a>(
    ctx: &ConnCtx,
    index: &MeshIndex,
    svc: &Service,
    policy: Option<&traffic::TrafficPolicy>,
    eps: &[(&'a Workload, u16)],
    tried: &[SocketAddr],
    up: Option<&[SocketAddr]>,
) -> Option<Vec<(&'a Workload, u16)>> {
    if let Some(rules) = policy
        .and_then(|p| p.locality.as_ref())
        .filter(|l| l.enabled && !l.distribute.is_empty())
        .map(|l| &l.distribute)
    {
        return distribute(ctx, index, rules, eps, tried, up);
    }
    let ordered = policy.is_some_and(|p| p.outlier.is_some() || p.locality.is_some())
        || svc
            .load_balancer
            .as_ref()
            .is_some_and(|lb| lb.mode == LoadBalancerMode::Failover);
    if !ordered || eps.len() < 2 {
        return None;
    }
    let eps: Vec<(&Workload, u16)> = eps
        .iter()
        .filter(|e| endpoint_addr(e).is_some_and(|a| !tried.contains(&a)))
        .copied()
        .collect();
    let me = index.workload_by_ip(ctx.local_ip);
    let node = &ctx.state.cfg.node;
    let levels = traffic::levels(me, node, &eps, svc.load_balancer.as_ref(), policy);
    if levels.iter().all(|l| *l == levels[0]) {
        return None;
    }
    // (level, endpoints, healthy ones), best level first.
    let mut tally: Vec<(u32, usize, usize)> = Vec::new();
    for (e, l) in eps.iter().zip(&levels) {
        let healthy = healthy(e, up) as usize;
        match tally.iter_mut().find(|t| t.0 == *l) {
            Some(t) => (t.1, t.2) = (t.1 + 1, t.2 + healthy),
            None => tally.push((*l, 1, healthy)),
        }
    }
    tally.sort_unstable();
    let level = traffic::pick_level(&tally, random())?;
    Some(
        eps.into_iter()
            .zip(levels)
            .filter(|(_, l)| *l == level)
            .map(|(e, _)| e)
            .collect(),
    )
}

/// Count a try's outcome at `addr` (one of `peers`) under outlier detection `o`; an ejection
/// is counted and logged.
fn record_outcome(
    wp: &Waypoint,
    o: &Outlier,
    addr: SocketAddr,
    peers: &[SocketAddr],
    outcome: Outcome,
) {
    if let Some(d) = wp.health.record(addr, outcome, o, peers, Instant::now()) {
        wp.metrics.ejected();
        tracing::info!(endpoint = %addr, secs = d.as_secs_f64(), "waypoint: endpoint ejected by outlier detection");
    }
}

/// A backend by weight.
fn pick_backend(backends: &[Backend]) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| b.weight as u64).sum();
    if total == 0 {
        return None;
    }
    let mut r = random() % total;
    for b in backends {
        if r < b.weight as u64 {
            return Some(b);
        }
        r -= b.weight as u64;
    }
    backends.last()
}

/// The address of endpoint `e` (its first IP, the target port).
fn endpoint_addr((w, p): &(&Workload, u16)) -> Option<SocketAddr> {
    Some(SocketAddr::new(*w.workload_ips.first()?, *p))
}

/// How a request chooses among a destination's endpoints.
#[derive(Clone, Copy, Default)]
struct Choice<'p> {
    /// The destination's `loadBalancer` (`None`: Istio's default, least request).
    balance: Option<&'p traffic::Balance>,
    /// Its slow start, if any.
    warmup: Option<&'p traffic::Warmup>,
    /// A consistent hash's key: the same endpoint for the same key while it is there.
    key: Option<&'p [u8]>,
    /// The waypoint, whose shared state (requests in flight, endpoints' first sighting) least
    /// request and slow start read; without it, neither applies.
    wp: Option<&'p Arc<Waypoint>>,
    /// Count the request in flight at the endpoint chosen (HTTP requests under least
    /// request); the caller uncounts it when the request ends ([`ReqLog`] does).
    count: bool,
}

/// An endpoint not tried yet, preferring those not ejected (by the built-in ejection, or by
/// `outlier` detection: `up` holds the endpoints it leaves in), chosen as `how` says
/// ([`traffic::choose`]: least request by default, round robin per worker, random, by weight
/// and slow start).
fn pick_endpoint<'a>(
    eps: &[(&'a Workload, u16)],
    tried: &[SocketAddr],
    up: Option<&[SocketAddr]>,
    how: Choice<'_>,
) -> Option<(&'a Workload, SocketAddr, bool)> {
    let fresh: Vec<(&Workload, SocketAddr)> = eps
        .iter()
        .filter_map(|e| Some((e.0, endpoint_addr(e)?)))
        .filter(|(_, a)| !tried.contains(a))
        .collect();
    let mut from: Vec<&(&Workload, SocketAddr)> =
        fresh.iter().filter(|(_, a)| is_up(*a, up)).collect();
    // All ejected: try one anyway (as Envoy's panic threshold does) rather than fail.
    if from.is_empty() {
        from = fresh.iter().collect();
    }
    if let Some(key) = how.key {
        return traffic::rendezvous(key, from.iter().map(|e| e.1))
            .map(|i| (from[i].0, from[i].1, false));
    }
    let n = RR.with(|r| {
        let v = r.get();
        r.set(v.wrapping_add(1));
        v
    });
    let balance = how.balance.unwrap_or(&traffic::Balance::LeastRequest);
    // Slow start under round robin and least request; sightings are recorded even with one
    // candidate, so that one seen alone first is older than those that join it.
    let slow = how.warmup.filter(|_| {
        matches!(
            balance,
            traffic::Balance::LeastRequest | traffic::Balance::RoundRobin
        )
    });
    let warm = slow.and_then(|w| {
        let wp = how.wp?;
        let addrs: Vec<SocketAddr> = from.iter().map(|e| e.1).collect();
        Some(wp.births.factors(&addrs, w, Instant::now()))
    });
    // One candidate (the common case): nothing to weigh or count.
    if let [only] = from[..] {
        return (only.0.capacity > 0).then_some((only.0, only.1, false));
    }
    let candidates: Vec<traffic::Candidate> = from
        .iter()
        .enumerate()
        .map(|(i, e)| traffic::Candidate {
            weight: e.0.capacity,
            warm: warm.as_ref().map_or(1.0, |f| f[i]),
        })
        .collect();
    let rand = random();
    match how.wp {
        Some(wp) if how.count && *balance == traffic::Balance::LeastRequest => {
            wp.in_flight.with(|counts| {
                let i = traffic::choose(balance, &candidates, n, rand, |i| {
                    counts.get(&from[i].1).copied().unwrap_or(0)
                })?;
                *counts.entry(from[i].1).or_insert(0) += 1;
                Some((from[i].0, from[i].1, true))
            })
        }
        _ => traffic::choose(balance, &candidates, n, rand, |_| 0)
            .map(|i| (from[i].0, from[i].1, false)),
    }
}

/// An endpoint of `b` for a call the waypoint makes on the side (an external authorization
/// check, a mirrored copy): the service's preferences and levels, Istio's default balancer, no
/// rule's traffic policy.
fn side_endpoint<'a>(
    ctx: &ConnCtx,
    index: &'a MeshIndex,
    rules: &L7Config,
    b: &Backend,
    port: u16,
) -> Result<(&'a Service, &'a Workload, SocketAddr), String> {
    let (svc, eps) = endpoints(index, rules, ctx, b, port)?;
    let level = by_level(ctx, index, svc, None, &eps, &[], None);
    let from = level.as_deref().unwrap_or(&eps);
    let (w, addr, _) = pick_endpoint(from, &[], None, Choice::default())
        .ok_or_else(|| format!("no endpoint of {}", svc.hostname))?;
    Ok((svc, w, addr))
}

/// A consistent hash's key for a request (`None`: it has none, and round robin picks), and the
/// `Set-Cookie` to answer with when the key is a cookie with a ttl that the request lacks (a
/// new random value, as Envoy makes one up, so the client's next requests stick).
fn hash_key(
    k: &traffic::HashKey,
    parts: &http::request::Parts,
    client: IpAddr,
) -> (Option<Vec<u8>>, Option<HeaderValue>) {
    use traffic::HashKey;
    match k {
        HashKey::Header(h) => {
            let mut all = parts.headers.get_all(h).iter();
            let first = all.next().map(|v| v.as_bytes().to_vec());
            // Repeated headers hash together, in order.
            let key = first.map(|mut k| {
                for v in all {
                    k.push(b',');
                    k.extend_from_slice(v.as_bytes());
                }
                k
            });
            (key, None)
        }
        HashKey::Cookie { name, path, ttl } => {
            let found = headers::cookie(&parts.headers, name).map(|v| v.as_bytes().to_vec());
            match (found, ttl) {
                (Some(v), _) => (Some(v), None),
                (None, None) => (None, None),
                (None, Some(ttl)) => {
                    let value = format!("{:016x}", random());
                    let mut c = format!("{name}=\"{value}\"; Max-Age={}", ttl.as_secs().max(1));
                    if let Some(p) = path {
                        c.push_str("; Path=");
                        c.push_str(p);
                    }
                    c.push_str("; HttpOnly");
                    (Some(value.into_bytes()), HeaderValue::from_str(&c).ok())
                }
            }
        }
        HashKey::SourceIp => (Some(client.to_string().into_bytes()), None),
        HashKey::Query(q) => {
            let key = headers::query_pairs(parts.uri.query())
                .find_map(|(k, v)| (k == q).then(|| v.as_bytes().to_vec()));
            (key, None)
        }
    }
}

/// Open a byte stream to `addr` on workload `w`: HBONE with the waypoint's identity when it
/// speaks HBONE, else TCP.
async fn dial(
    ctx: &ConnCtx,
    w: &Workload,
    addr: SocketAddr,
    host: Option<&str>,
) -> Result<UpIo, String> {
    if w.protocol == InboundProtocol::Hbone {
        let dst_id = w.identity().map_err(|e| e.to_string())?;
        if ctx.state.certs.is_remote() {
            ctx.state
                .certs
                .get_urgent(&ctx.my_id)
                .await
                .map_err(|e| e.to_string())?;
        }
        let key = PoolKey {
            src_id: ctx.my_id.clone(),
            dst_id,
            src_ip: ctx.local_ip,
            dst: SocketAddr::new(addr.ip(), ctx.state.cfg.hbone_port),
        };
        let headers = ConnectHeaders {
            forwarded_for: Some(ctx.client),
            forwarded_host: host.map(str::to_string),
            baggage: Some(ctx.baggage.clone()),
            traceparent: Some(
                ctx.traceparent
                    .clone()
                    .unwrap_or_else(crate::proxy::headers::traceparent),
            ),
        };
        let s = ctx
            .pool
            .connect(&key, addr, &headers)
            .await
            .map_err(|e| e.to_string())?;
        let (stream, slot) = s.into_parts();
        return Ok(UpIo::Hbone(stream, slot));
    }
    let opts = ConnectOptions {
        mark: ctx.state.cfg.mark,
        timeout: Some(DEFAULT_CONNECT_TIMEOUT),
        ..Default::default()
    };
    let tcp = net::connect(addr, &opts)
        .await
        .and_then(PollTcp::new)
        .map_err(|e| e.to_string())?;
    Ok(UpIo::Tcp(tcp))
}

/// A sender to `addr` speaking HTTP/2 (`h2`) or HTTP/1.1, and the requests it carried before:
/// a pooled one if free, else a new connection.
async fn sender(
    ctx: &ConnCtx,
    w: &Workload,
    addr: SocketAddr,
    host: Option<&str>,
    max_uses: u32,
    h2: bool,
) -> Result<(Sender, u32), String> {
    match take_sender(addr, h2, max_uses) {
        Some(s) => Ok(s),
        // Boxed: a new connection (dial, TLS, HTTP handshake) is a large future that every
        // request's future would otherwise carry and copy, though it is rarely taken.
        None => Box::pin(connect(ctx, w, addr, host, max_uses, h2)).await,
    }
}

/// A new upstream connection to `addr`: HBONE (or TCP) and the HTTP handshake.
async fn connect(
    ctx: &ConnCtx,
    w: &Workload,
    addr: SocketAddr,
    host: Option<&str>,
    max_uses: u32,
    h2: bool,
) -> Result<(Sender, u32), String> {
    let io = TokioIo::new(dial(ctx, w, addr, host).await?);
    if h2 {
        let (send, conn) = hyper::client::conn::http2::handshake(LocalExec, io)
            .await
            .map_err(|e| format!("HTTP/2 handshake with {addr}: {e}"))?;
        MonoioExecutor.spawn(Box::pin(async move {
            let _ = conn.await;
        }));
        put_sender(addr, Sender::H2(send.clone()), 1, max_uses);
        Ok((Sender::H2(send), 0))
    } else {
        let (send, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| format!("HTTP/1.1 handshake with {addr}: {e}"))?;
        MonoioExecutor.spawn(Box::pin(async move {
            let _ = conn.await;
        }));
        Ok((Sender::H1(send), 0))
    }
}

/// Typed names: removing by `&str` parses and hashes the name on every request.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::EXPECT,
];

/// Drop hop-by-hop headers (and those `Connection` names); keep `Upgrade` when upgrading, and
/// `te: trailers` (gRPC needs it).
fn strip_hop_by_hop(h: &mut HeaderMap, upgrading: bool) {
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    let te_trailers = h
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    let upgrade = h.get(header::UPGRADE).cloned();
    for n in HOP_BY_HOP.iter() {
        h.remove(n);
    }
    for n in named {
        if n != "upgrade" {
            h.remove(n.as_str());
        }
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrading {
        if let Some(u) = upgrade {
            h.insert(header::UPGRADE, u);
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
}

fn local_response(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(boxed(Full::new(Bytes::from_static(text.as_bytes()))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// The request's telemetry, written when its response body ends.
struct ReqLog {
    ctx: Rc<ConnCtx>,
    start: Instant,
    method: http::Method,
    authority: String,
    path: String,
    protocol: &'static str,
    service: Option<(String, String, String)>,
    destination: std::sync::Arc<Peer>,
    upstream: Option<SocketAddr>,
    route: String,
    audit: bool,
    upstream_ms: Option<f64>,
    req_bytes: Rc<Cell<u64>>,
    error: Option<String>,
    /// A fault delayed the request (flag `DI`, beside any other).
    delayed: bool,
    /// The request is counted in flight at `upstream` (least request), until this log is
    /// dropped (its answer ended) or the next try's endpoint replaces it. Kept here rather than
    /// in a guard of its own: a request's future has no room for one more field.
    counted: bool,
}

impl Drop for ReqLog {
    fn drop(&mut self) {
        self.uncount();
    }
}

impl ReqLog {
    /// This try's endpoint, `counted` in flight there by [`pick_endpoint`]; the previous
    /// try's count ends.
    fn set_upstream(&mut self, addr: SocketAddr, counted: bool) {
        self.uncount();
        self.upstream = Some(addr);
        self.counted = counted;
    }

    fn uncount(&mut self) {
        if let (true, Some(a)) = (std::mem::take(&mut self.counted), self.upstream) {
            self.ctx.wp.in_flight.done(a);
        }
    }

    fn finish(mut self, status: u16, flags: &'static str, resp_bytes: u64) {
        let flags = match self.delayed {
            true => with_delay(flags),
            false => flags,
        };
        let duration_ms = self.start.elapsed().as_secs_f64() * 1e3;
        let labels = super::metrics::RequestLabels {
            conn: ConnLabels {
                reporter: super::metrics::REPORTER,
                source: self.ctx.source.clone(),
                destination: self.destination.clone(),
                service: self.service.take(),
                mtls: true,
                response_flags: flags,
            },
            code: status,
            protocol: self.protocol,
        };
        let req_bytes = self.req_bytes.get();
        self.ctx
            .wp
            .metrics
            .request(&labels, duration_ms, req_bytes, resp_bytes);
        tracing::info!(
            target: "access",
            direction = "waypoint",
            method = %self.method,
            authority = %self.authority,
            path = %self.path,
            protocol = self.protocol,
            status,
            response_flags = flags,
            route = %self.route,
            upstream = %self.upstream.map(|a| a.to_string()).unwrap_or_default(),
            src.addr = %self.ctx.client,
            src.identity = %self.ctx.peer.as_ref().map(ToString::to_string).unwrap_or_default(),
            dst.identity = %labels.conn.destination.principal,
            dst.service = %labels.conn.service.as_ref().map(|s| s.0.as_str()).unwrap_or(""),
            bytes_recv = req_bytes,
            bytes_sent = resp_bytes,
            duration_ms = (duration_ms * 1e3).round() / 1e3,
            upstream_ms = self.upstream_ms.map_or(-1.0, |u| (u * 1e3).round() / 1e3),
            audit = self.audit,
            error = self.error.as_deref().unwrap_or(""),
            "request complete"
        );
    }
}

/// `flags` with `DI` (a fault's delay) added, in Envoy's order of flags (`UT,DI`, `DI,FI`).
fn with_delay(flags: &'static str) -> &'static str {
    match flags {
        "-" => "DI",
        "UH" => "UH,DI",
        "UT" => "UT,DI",
        "UR" => "UR,DI",
        "UF" => "UF,DI",
        "UO" => "UO,DI",
        "NR" => "NR,DI",
        "FI" => "DI,FI",
        "UAEX" => "DI,UAEX",
        "DC" => "DI,DC",
        "URX" => "DI,URX",
        f => f,
    }
}

/// How a counted body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyEnd {
    Complete,
    /// Failed or dropped before its end.
    Cut,
    /// The route's timeout passed before its end.
    TimedOut,
}

/// A body that counts its bytes and reports when it ends (or is dropped); with a deadline, it
/// fails when the deadline passes first.
struct Counted<B> {
    inner: B,
    bytes: u64,
    on_end: Option<Box<dyn FnOnce(u64, BodyEnd)>>,
    counter: Option<Rc<Cell<u64>>>,
    deadline: Option<Pin<Box<monoio::time::Sleep>>>,
    /// Room under a connection-pool limit, held until the body ends.
    _permit: Option<Permit>,
}

impl<B> Counted<B> {
    fn end(&mut self, how: BodyEnd) {
        if let Some(f) = self.on_end.take() {
            f(self.bytes, how);
        }
    }
}

impl<B> hyper::body::Body for Counted<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                    if let Some(c) = &this.counter {
                        c.set(c.get() + d.len() as u64);
                    }
                }
                // hyper stops polling a body that says it has ended (a response of known
                // length after its last byte) and drops it: the end is here, not at the drop,
                // which would read as cut short (`UR`).
                if this.inner.is_end_stream() {
                    this.end(BodyEnd::Complete);
                }
            }
            Poll::Ready(None) => this.end(BodyEnd::Complete),
            Poll::Ready(Some(Err(_))) => this.end(BodyEnd::Cut),
            Poll::Pending => {
                if let Some(d) = this.deadline.as_mut() {
                    if d.as_mut().poll(cx).is_ready() {
                        this.deadline = None;
                        this.end(BodyEnd::TimedOut);
                        return Poll::Ready(Some(Err("upstream response timeout".into())));
                    }
                }
            }
        }
        r.map(|o| o.map(|x| x.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        let complete = self.on_end.is_some() && self.bytes == 0;
        self.end(if complete {
            BodyEnd::Complete
        } else {
            BodyEnd::Cut
        });
    }
}

/// A request body's start, read before an external authorization check that asked for it.
struct Held {
    /// The frames as they came, to go upstream first.
    frames: std::collections::VecDeque<hyper::body::Frame<Bytes>>,
    /// Their data, at most `maxRequestBytes` of it: what the check carries.
    data: Bytes,
    /// The body was longer than that (`allowPartialMessage`).
    partial: bool,
}

/// Read the body (or, with `allowPartialMessage`, its first `maxRequestBytes`) for a check, as
/// Envoy's `ext_authz` buffers it. A longer body without partial messages allowed: 413; a body
/// that does not come within the check's timeout: 408; a broken one: 400.
async fn read_for_check(
    body: &mut Incoming,
    b: ext_authz::BodyInCheck,
    within: Duration,
) -> Result<Held, StatusCode> {
    let declared = body.size_hint().exact();
    if !b.partial && declared.is_some_and(|n| n > b.max as u64) {
        return Err(StatusCode::PAYLOAD_TOO_LARGE);
    }
    let read = async {
        let mut held = Held {
            frames: Default::default(),
            data: Bytes::new(),
            partial: false,
        };
        let mut data = BytesMut::new();
        while !body.is_end_stream() {
            let Some(f) = body.frame().await else { break };
            let f = f.map_err(|_| StatusCode::BAD_REQUEST)?;
            if let Some(d) = f.data_ref() {
                let room = b.max.saturating_sub(data.len());
                if d.len() > room {
                    if !b.partial {
                        return Err(StatusCode::PAYLOAD_TOO_LARGE);
                    }
                    data.extend_from_slice(&d[..room]);
                    held.partial = true;
                    held.frames.push_back(f);
                    break;
                }
                data.extend_from_slice(d);
            }
            held.frames.push_back(f);
        }
        held.data = data.freeze();
        Ok(held)
    };
    monoio::time::timeout(within, read)
        .await
        .unwrap_or(Err(StatusCode::REQUEST_TIMEOUT))
}

/// Frames read ahead of a request body's consumer.
struct Ahead(std::collections::VecDeque<hyper::body::Frame<Bytes>>);

/// A request body whose first frames were read ahead (for a check): those, then the rest.
struct Prefixed<B> {
    /// Boxed: the request's future carries this for every request, and it is rarely set.
    ahead: Option<Box<Ahead>>,
    inner: B,
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin> hyper::body::Body for Prefixed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(ahead) = this.ahead.as_mut() {
            if let Some(f) = ahead.0.pop_front() {
                return std::task::Poll::Ready(Some(Ok(f)));
            }
            this.ahead = None;
        }
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.as_ref().is_none_or(|a| a.0.is_empty()) && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let ahead: u64 = self
            .ahead
            .iter()
            .flat_map(|a| a.0.iter())
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        let inner = self.inner.size_hint();
        let mut h = hyper::body::SizeHint::new();
        h.set_lower(inner.lower() + ahead);
        if let Some(u) = inner.upper() {
            h.set_upper(u + ahead);
        }
        h
    }
}

/// A request body that counts its bytes into `counter`.
fn counting<B>(inner: B, counter: &Rc<Cell<u64>>) -> Counted<B> {
    Counted {
        inner,
        bytes: 0,
        on_end: None,
        counter: Some(counter.clone()),
        deadline: None,
        _permit: None,
    }
}

fn boxed<B>(b: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + 'static,
    B::Error: Into<BoxError>,
{
    Box::pin(b.map_err(Into::into))
}

/// Answer locally (403, 503, ...) and log it.
fn answer(
    log: ReqLog,
    status: StatusCode,
    flags: &'static str,
    text: &'static str,
) -> Response<Body> {
    log.finish(status.as_u16(), flags, text.len() as u64);
    local_response(status, text)
}

/// Read (and drop) a small request body before a local answer, so the client's connection
/// stays usable (an unread body makes hyper close it); large or slow bodies are not waited for.
async fn drain_small(mut body: Incoming, counter: &Cell<u64>) {
    const LIMIT: u64 = 64 * 1024;
    if body.is_end_stream() || body.size_hint().upper().is_none_or(|u| u > LIMIT) {
        return;
    }
    let read = async {
        while let Some(Ok(f)) = body.frame().await {
            if let Some(d) = f.data_ref() {
                counter.set(counter.get() + d.len() as u64);
            }
        }
    };
    let _ = monoio::time::timeout(Duration::from_secs(1), read).await;
}

async fn handle(ctx: Rc<ConnCtx>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let guard = InFlight::new(ctx.clone());
    let resp = proxy(ctx, req).await;
    Ok(resp.map(|inner| {
        Box::pin(Tracked {
            inner,
            _guard: guard,
        }) as Body
    }))
}

async fn proxy(ctx: Rc<ConnCtx>, mut req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let index = ctx.state.index();
    let rules = ctx.wp.rules();
    // One path and one authority for everything below (JWT, policy, routing, upstream).
    let bad = normalize::request(&mut req, rules.path_normalization).err();
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| ctx.target.to_string());
    let host = headers::split_authority(&authority).0.to_string();
    let path = req.uri().path().to_string();
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    // The destination the client dialed: a service (service waypoint) or a workload.
    let (service, service_key, workload) = destination(&index, ctx.target);
    let req_bytes = Rc::new(Cell::new(0u64));
    let mut log = ReqLog {
        ctx: ctx.clone(),
        start,
        method: req.method().clone(),
        authority: authority.clone(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| path.clone(), |p| p.as_str().to_string()),
        protocol: if grpc { "grpc" } else { "http" },
        service: service.map(|s| (s.hostname.clone(), s.name.clone(), s.namespace.clone())),
        destination: Peer::none(),
        upstream: None,
        route: "-".into(),
        audit: false,
        upstream_ms: None,
        req_bytes: req_bytes.clone(),
        error: None,
        delayed: false,
        counted: false,
    };
    if let Some(why) = bad {
        log.error = Some(format!("refused before routing: {why}"));
        Box::pin(drain_small(req.into_body(), &req_bytes)).await;
        return answer(log, StatusCode::BAD_REQUEST, "-", "Bad Request");
    }
    // Request authentication (RequestAuthentication's JWT rules), before authorization as
    // Envoy's jwt_authn runs before RBAC.
    let auth = match rules.authn.is_empty() {
        true => None,
        false => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let query = req.uri().query().map(str::to_string);
            match jwt::authenticate(
                &rules.authn,
                service_key,
                req.headers_mut(),
                query.as_deref(),
                now,
            ) {
                jwt::Outcome::Missing => None,
                jwt::Outcome::Verified(a) => Some(a),
                jwt::Outcome::Failed(why) => {
                    log.error = Some(format!("JWT: {why}"));
                    Box::pin(drain_small(req.into_body(), &req_bytes)).await;
                    let mut reply = answer(log, StatusCode::UNAUTHORIZED, "-", why);
                    let realm = format!(
                        "Bearer realm=\"http://{authority}{path}\", error=\"invalid_token\""
                    );
                    if let Ok(v) = HeaderValue::from_str(&realm) {
                        reply.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                    }
                    return reply;
                }
            }
        }
    };
    // L7 authorization.
    let principal = ctx.principal.as_deref();
    let pctx = RequestContext {
        principal,
        namespace: principal.and_then(|p| p.split('/').nth(2)),
        source_ip: ctx.client.ip(),
        destination: ctx.target,
        service: service_key,
        method: req.method().as_str(),
        path: &path,
        host: &host,
        headers: req.headers(),
        auth: auth.as_ref(),
        tcp: false,
    };
    // The response changes an external authorizer asked for (boxed: rarely any).
    let mut authz_response: Option<Box<ext_authz::Changes>> = None;
    // The body's start, read for an authorizer that asked for it; it goes upstream first.
    let mut held: Option<Box<Held>> = None;
    match policy::decide(&rules.policies, &pctx) {
        Decision::Deny(reason) => {
            log.error = Some(reason);
            Box::pin(drain_small(req.into_body(), &req_bytes)).await;
            return answer(log, StatusCode::FORBIDDEN, "-", "RBAC: access denied");
        }
        Decision::Allow { audit, check } => {
            log.audit = audit;
            if let Some(name) = check {
                let provider = rules.providers.iter().find_map(|p| {
                    p.call()
                        .filter(|_| p.name() == name.as_str())
                        .map(|call| (p, call))
                });
                let Some((p, call)) = provider else {
                    log.error = Some(format!("extension provider {name} is not configured"));
                    Box::pin(drain_small(req.into_body(), &req_bytes)).await;
                    return answer(log, StatusCode::FORBIDDEN, "UAEX", "RBAC: access denied");
                };
                if let Some(b) = call.body {
                    match Box::pin(read_for_check(req.body_mut(), b, call.timeout)).await {
                        Ok(h) => held = Some(Box::new(h)),
                        Err(status) => {
                            log.error = Some(format!(
                                "request body for extension provider {name}: {}",
                                status.canonical_reason().unwrap_or("unreadable")
                            ));
                            return answer(log, status, "-", "");
                        }
                    }
                }
                let checked = Box::pin(ext_authz_check(
                    &ctx,
                    &index,
                    &rules,
                    p,
                    &req,
                    &authority,
                    held.as_deref().map(|h| (&h.data[..], h.partial)),
                ))
                .await;
                match checked {
                    Ok(Checked::Allowed(a)) => {
                        a.request.apply(req.headers_mut());
                        for k in &a.remove {
                            req.headers_mut().remove(k);
                        }
                        if !a.response.is_empty() {
                            authz_response = Some(Box::new(a.response));
                        }
                    }
                    Ok(Checked::Denied(reply, len)) => {
                        log.error = Some(format!("denied by extension provider {name}"));
                        Box::pin(drain_small(req.into_body(), &req_bytes)).await;
                        log.finish(reply.status().as_u16(), "UAEX", len);
                        return reply;
                    }
                    Err(e) if call.fail_open => {
                        tracing::debug!(provider = %name, error = %e, "external authorization failed; failOpen lets the request through");
                    }
                    Err(e) => {
                        log.error = Some(format!("extension provider {name}: {e}"));
                        Box::pin(drain_small(req.into_body(), &req_bytes)).await;
                        let status = StatusCode::from_u16(call.status_on_error)
                            .unwrap_or(StatusCode::FORBIDDEN);
                        return answer(log, status, "UAEX", "");
                    }
                }
            }
        }
    }
    // Route.
    let view = RequestView {
        method: req.method().as_str(),
        path: &path,
        query: req.uri().query(),
        headers: req.headers(),
        authority: &authority,
        port: ctx.target.port(),
    };
    // The first rule that matches, and which of its matches did (for a path rewrite).
    let (route, matched) = service_key
        .and_then(|k| rules.routes.get(k))
        .and_then(|rs| {
            rs.iter().find_map(|r| match r.matches.is_empty() {
                true => Some((r, None)),
                false => r
                    .matches
                    .iter()
                    .find(|m| m.matches(&view))
                    .map(|m| (r, Some(m))),
            })
        })
        .unzip();
    let matched = matched.flatten();
    let default_backend;
    // A route's own timeout bounds the whole response (body too); `0s` lifts every limit.
    let route_timeout = route.and_then(|r| r.timeout);
    let body_limited = route_timeout.is_some_and(|d| !d.is_zero());
    static DEFAULT_RETRY: std::sync::LazyLock<RetryPolicy> =
        std::sync::LazyLock::new(RetryPolicy::default);
    let (backends, timeout, retry): (&[Backend], Duration, &RetryPolicy) = match route {
        Some(r) => {
            log.route = r.origin.clone();
            let timeout = match route_timeout {
                None => ctx.wp.settings.request_timeout,
                Some(d) if d.is_zero() => NO_LIMIT,
                Some(d) => d,
            };
            (&r.backends, timeout, &r.retry)
        }
        None => {
            default_backend = service_key.map(|k| Backend {
                service: k.to_string(),
                port: None,
                subset: None,
                weight: 1,
                headers: Default::default(),
            });
            (
                default_backend.as_slice(),
                ctx.wp.settings.request_timeout,
                &*DEFAULT_RETRY,
            )
        }
    };
    let route_headers = route.map(|r| &*r.headers);
    let before_cors = Outgoing {
        route: route_headers,
        cors: None,
        authz: authz_response.as_deref(),
    };
    // Faults (VirtualService `fault`): a delay, then an abort, as Envoy's fault filter.
    if let Some(f) = route.and_then(|r| r.fault.as_deref()) {
        if let Some((d, share)) = f.delay {
            if chance(share) {
                log.delayed = true;
                Box::pin(monoio::time::sleep(d)).await;
            }
        }
        if let Some((how, share)) = f.abort {
            if chance(share) {
                Box::pin(drain_small(req.into_body(), &req_bytes)).await;
                return match how {
                    Abort::Http(code) => {
                        let status =
                            StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                        answer_routed(log, status, "FI", "fault filter abort", before_cors)
                    }
                    Abort::Grpc(code) => {
                        log.finish(200, "FI", 0);
                        let mut reply = grpc_abort(code);
                        before_cors.apply(reply.headers_mut());
                        reply
                    }
                };
            }
        }
    }
    // CORS, after faults as Envoy's filters are ordered: a preflight may be answered here.
    let route_cors = route.and_then(|r| r.cors.as_deref());
    let origin = match route_cors.map(|c| c.check(req.method(), req.headers())) {
        None | Some(cors::Step::Pass) => None,
        Some(cors::Step::Allowed(o)) => Some(o),
        Some(cors::Step::Answer(h)) => {
            Box::pin(drain_small(req.into_body(), &req_bytes)).await;
            log.finish(200, "-", 0);
            let mut reply = Response::new(boxed(http_body_util::Empty::<Bytes>::new()));
            reply.headers_mut().extend(h);
            return reply;
        }
    };
    let out = Outgoing {
        route: route_headers,
        cors: route_cors.zip(origin.as_ref()),
        authz: authz_response.as_deref(),
    };
    // A redirect rule answers here, after faults (Envoy's router answers it).
    if let Some(rd) = route.and_then(|r| r.redirect.as_deref()) {
        let new_path = match &rd.path {
            Some(p) => p.apply(&path, resources::matched_len(matched, &path, p)),
            None => path.clone(),
        };
        let location = rd.location(&authority, &new_path, req.uri().query());
        Box::pin(drain_small(req.into_body(), &req_bytes)).await;
        let status = StatusCode::from_u16(rd.code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
        let mut reply = answer_routed(log, status, "-", "", out);
        if let Ok(v) = HeaderValue::from_str(&location) {
            reply.headers_mut().insert(header::LOCATION, v);
        }
        return reply;
    }
    // A directResponse rule answers here too, as Envoy's router does.
    if let Some(d) = route.and_then(|r| r.direct.as_deref()) {
        Box::pin(drain_small(req.into_body(), &req_bytes)).await;
        log.finish(d.status, "-", d.body.len() as u64);
        let mut reply = Response::new(boxed(Full::new(d.body.clone())));
        *reply.status_mut() = StatusCode::from_u16(d.status).unwrap_or(StatusCode::OK);
        if !d.body.is_empty() {
            reply
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        out.apply(reply.headers_mut());
        return reply;
    }
    if route.is_some() && backends.is_empty() {
        return answer(log, StatusCode::INTERNAL_SERVER_ERROR, "NR", "no backend");
    }
    // The request as it goes upstream.
    let upgrading = !ctx.h2
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            });
    let client_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let body = Prefixed {
        ahead: held.map(|h| Box::new(Ahead(h.frames))),
        inner: body,
    };
    strip_hop_by_hop(&mut parts.headers, upgrading);
    let rewrite = route.and_then(|r| r.rewrite.as_deref());
    if let Some(p) = rewrite.and_then(|r| r.path.as_ref()) {
        let new = p.apply(&path, resources::matched_len(matched, &path, p));
        let pq = match parts.uri.query() {
            Some(q) => format!("{new}?{q}"),
            None => new,
        };
        match pq.parse::<Uri>() {
            Ok(u) => parts.uri = u,
            Err(_) => {
                log.error = Some(format!("rewritten path {pq:?} is not a URI"));
                return answer(log, StatusCode::INTERNAL_SERVER_ERROR, "-", "bad rewrite");
            }
        }
    }
    // A URL rewrite's authority, which header changes may replace in turn.
    let rewritten_authority = rewrite.and_then(|r| r.authority.as_deref());
    const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    if !parts.headers.contains_key(X_REQUEST_ID) {
        if let Ok(v) = HeaderValue::from_str(&format!("{:016x}{:016x}", random(), random())) {
            parts.headers.insert(X_REQUEST_ID, v);
        }
    }
    let replayable = body.is_end_stream();
    // Mirrors (each for its share of requests): copies of the request as it goes upstream,
    // sent on their own; the body is teed to them as the main upstream reads it.
    let mirrors: Vec<&Mirror> = match (route, &client_upgrade) {
        (Some(r), None) => r.mirrors.iter().filter(|m| chance(m.share)).collect(),
        _ => Vec::new(),
    };
    let (body, copies) = match mirrors.is_empty() || replayable {
        true => (boxed(counting(body, &req_bytes)), Vec::new()),
        false => {
            let (tee, copies) = mirror::tee(body, mirrors.len());
            (boxed(counting(tee, &req_bytes)), copies)
        }
    };
    let mut body = Some(body);
    // From here: a fault's delay is not part of the route's time, as in Envoy.
    let deadline = Instant::now() + timeout;
    if !mirrors.is_empty() {
        let mut shadow_parts = parts.clone();
        let up_authority = rewrite_request(&mut shadow_parts.headers, None, route_headers)
            .or(rewritten_authority)
            .unwrap_or(&authority);
        let shadow_authority = headers::shadow_authority(up_authority);
        let mut copies = copies.into_iter();
        for m in mirrors {
            let b = match copies.next() {
                Some(c) => boxed(c),
                None => boxed(http_body_util::Empty::<Bytes>::new()),
            };
            let mut req = Request::from_parts(shadow_parts.clone(), b);
            aim(&mut req, ctx.h2, &shadow_authority, true);
            shadow(&ctx, &index, &rules, m, req, deadline);
        }
    }
    let attempts = 1 + retry.attempts;
    let mut tried: Vec<SocketAddr> = Vec::new();
    // A sticky-session cookie made up for this request (consistent hash on a cookie with a
    // ttl), for its answer.
    let mut set_cookie: Option<Box<HeaderValue>> = None;
    let mut last: (StatusCode, &'static str, &'static str) =
        (StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream");
    for attempt in 0..attempts {
        if attempt > 0 {
            ctx.wp.metrics.retried();
            monoio::time::sleep(retry.backoff).await;
        }
        // Where to: a weighted backend's endpoint, or the workload the client dialed, and the
        // traffic policy of its DestinationRule.
        let mut traffic = None;
        let mut peers: Vec<SocketAddr> = Vec::new();
        let mut backend_headers = None;
        let (w, addr, counted, svc_host) = if let Some(w) = workload.filter(|_| backends.is_empty())
        {
            let addr = ctx.target;
            if attempt > 0 && tried.contains(&addr) && !replayable {
                break;
            }
            (w, addr, false, None)
        } else {
            let Some(b) = pick_backend(backends) else {
                break;
            };
            backend_headers = Some(&*b.headers);
            let (svc, eps) = match endpoints(&index, &rules, &ctx, b, ctx.target.port()) {
                Ok(v) => v,
                Err(e) => {
                    log.error = Some(e);
                    last = (StatusCode::SERVICE_UNAVAILABLE, "NR", "no route");
                    break;
                }
            };
            traffic = rules.traffic_for(&b.service, b.subset.as_deref()).cloned();
            let outlier = traffic.as_ref().and_then(|t| t.outlier.as_ref());
            let up = outlier.map(|o| {
                peers = eps.iter().filter_map(endpoint_addr).collect();
                ctx.wp.health.healthy(&peers, o, Instant::now())
            });
            // A consistent hash's key (a cookie to set when it makes one up).
            let key = match traffic.as_ref().and_then(|t| t.balance.as_ref()) {
                Some(traffic::Balance::Hash(k)) => {
                    let (key, cookie) = hash_key(k, &parts, ctx.client.ip());
                    if let Some(c) = cookie {
                        set_cookie = Some(Box::new(c));
                    }
                    key
                }
                _ => None,
            };
            let level = by_level(
                &ctx,
                &index,
                svc,
                traffic.as_deref(),
                &eps,
                &tried,
                up.as_deref(),
            );
            let from = level.as_deref().unwrap_or(&eps);
            let how = Choice {
                balance: traffic.as_ref().and_then(|t| t.balance.as_ref()),
                warmup: traffic.as_ref().and_then(|t| t.warmup.as_ref()),
                key: key.as_deref(),
                wp: Some(&ctx.wp),
                count: true,
            };
            let Some((w, addr, counted)) = pick_endpoint(from, &tried, up.as_deref(), how) else {
                log.error
                    .get_or_insert_with(|| format!("no endpoint of {} left to try", svc.hostname));
                break;
            };
            (w, addr, counted, Some(svc.hostname.as_str()))
        };
        let pool = traffic.as_ref().and_then(|t| t.pool.as_ref());
        let outlier = traffic.as_ref().and_then(|t| t.outlier.as_ref());
        // What this try came to, for outlier detection.
        let record = |outcome: Outcome| {
            if let Some(o) = outlier {
                record_outcome(&ctx.wp, o, addr, &peers, outcome);
            }
        };
        tried.push(addr);
        log.set_upstream(addr, counted);
        log.destination = w.peer();
        if let Some(down) = client_upgrade {
            // Not retried: the upgrade's bytes are the client's from here on.
            let mut parts = parts.clone();
            let authority = rewrite_request(&mut parts.headers, backend_headers, route_headers)
                .or(rewritten_authority)
                .unwrap_or(&authority);
            let mut reply = Box::pin(upgrade(
                &ctx, log, &parts, authority, down, w, addr, svc_host,
            ))
            .await;
            // The answer's head (101 or a refusal) gets the response changes as any other.
            if let Some(h) = backend_headers {
                h.response.apply(reply.headers_mut());
            }
            out.apply(reply.headers_mut());
            return reply;
        }
        // Room under the destination's connection-pool limits (circuit breaking).
        let permit = match (pool, traffic.as_deref()) {
            (Some(p), Some(policy)) => {
                let key = &policy.destination;
                match ctx
                    .wp
                    .gates
                    .acquire(policy, p.limit(ctx.h2), p.max_pending, deadline)
                    .await
                {
                    Ok(permit) => Some(permit),
                    Err(why) => {
                        ctx.wp.metrics.overflowed();
                        log.error = Some(match why {
                            Overflow::Full => format!("{key}: connection pool full"),
                            Overflow::TimedOut => format!("{key}: no room in the connection pool before the request's deadline"),
                        });
                        last = (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "UO",
                            "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                        );
                        break;
                    }
                }
            }
            _ => None,
        };
        let max_uses = pool.map_or(0, |p| p.max_requests_per_connection);
        let left = deadline.saturating_duration_since(Instant::now());
        let connect_limit = pool
            .and_then(|p| p.connect_timeout)
            .map_or(left, |c| c.min(left));
        // A failed connection is ejected by the built-in rule; one that is only slow (the
        // DestinationRule's `connectTimeout`) counts for outlier detection alone.
        let connected = match monoio::time::timeout(
            connect_limit,
            sender(&ctx, w, addr, svc_host, max_uses, ctx.h2),
        )
        .await
        {
            Ok(r) => r.map_err(|e| (e, true)),
            Err(_) if connect_limit < left => {
                Err((format!("no connection within {connect_limit:?}"), false))
            }
            Err(_) => {
                last = (
                    StatusCode::GATEWAY_TIMEOUT,
                    "UT",
                    "upstream request timeout",
                );
                break;
            }
        };
        let (mut send, uses) = match connected {
            Ok(s) => s,
            Err((e, failed)) => {
                log.error = Some(e);
                if failed {
                    eject(&ctx.wp, addr);
                }
                record(Outcome::Failed);
                last = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UF",
                    "upstream connect error",
                );
                if retry.on_connect_failure {
                    continue;
                }
                break;
            }
        };
        let b = match body.take() {
            Some(b) => b,
            None if replayable => boxed(http_body_util::Empty::<Bytes>::new()),
            None => break,
        };
        let mut up = Request::from_parts(parts.clone(), b);
        let rewritten = rewrite_request(up.headers_mut(), backend_headers, route_headers)
            .or(rewritten_authority);
        aim(
            &mut up,
            ctx.h2,
            rewritten.unwrap_or(&authority),
            rewritten.is_some(),
        );
        let per_try = retry
            .per_try_timeout
            .map_or(left, |p| p.min(left))
            .min(deadline.saturating_duration_since(Instant::now()));
        let sent_at = Instant::now();
        let result = monoio::time::timeout(per_try, send.send(up)).await;
        let resp = match result {
            Err(_) => {
                log.error = Some(format!("no response within {per_try:?}"));
                record(Outcome::Failed);
                last = (
                    StatusCode::GATEWAY_TIMEOUT,
                    "UT",
                    "upstream request timeout",
                );
                if retry.per_try_timeout.is_some() && replayable && Instant::now() < deadline {
                    continue;
                }
                break;
            }
            Ok(Err(e)) => {
                log.error = Some(format!("upstream {addr}: {e}"));
                eject(&ctx.wp, addr);
                record(Outcome::Failed);
                last = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "URX",
                    "upstream connect error or disconnect/reset before headers",
                );
                if retry.on_connect_failure && replayable {
                    continue;
                }
                break;
            }
            Ok(Ok(r)) => r,
        };
        log.upstream_ms = Some(sent_at.elapsed().as_secs_f64() * 1e3);
        if !ctx.h2 {
            put_sender(addr, send, uses + 1, max_uses);
        }
        let status = resp.status();
        record(match status.as_u16() {
            c @ 500.. => Outcome::Status(c),
            _ => Outcome::Success,
        });
        if retry.codes.contains(&status.as_u16()) && attempt + 1 < attempts && replayable {
            log.error = Some(format!("upstream {addr} answered {status}"));
            continue;
        }
        let (mut rparts, rbody) = resp.into_parts();
        strip_hop_by_hop(&mut rparts.headers, false);
        if let Some(h) = backend_headers {
            h.response.apply(&mut rparts.headers);
        }
        out.apply(&mut rparts.headers);
        if let Some(c) = set_cookie.take() {
            rparts.headers.append(header::SET_COOKIE, *c);
        }
        let code = status.as_u16();
        // A route's own timeout covers the whole response, as Envoy's route timeout does;
        // `--request-timeout` alone bounds the wait for the response head only, so a long
        // download or stream is not cut by a default nobody chose.
        let counted = Counted {
            inner: rbody,
            bytes: 0,
            counter: None,
            on_end: Some(Box::new(move |bytes, how| {
                let flags = match how {
                    BodyEnd::Complete => "-",
                    BodyEnd::Cut => "UR",
                    BodyEnd::TimedOut => "UT",
                };
                log.finish(code, flags, bytes)
            })),
            deadline: body_limited.then(|| {
                Box::pin(monoio::time::sleep(
                    deadline.saturating_duration_since(Instant::now()),
                ))
            }),
            _permit: permit,
        };
        return Response::from_parts(rparts, boxed(counted));
    }
    let (status, flags, text) = last;
    answer_routed(log, status, flags, text, out)
}

/// What an external authorization check decided.
enum Checked {
    /// Go on, with the provider's changes to the request and its answer.
    Allowed(ext_authz::Allowed),
    /// The check's answer is the client's (with its body's length, for the log).
    Denied(Response<Body>, u64),
}

/// Ask provider `p` about `req` (to `authority`), over the mesh (HBONE to an endpoint of its
/// service) within its timeout: [`http_check`] or [`grpc_check`].
async fn ext_authz_check(
    ctx: &ConnCtx,
    index: &MeshIndex,
    rules: &L7Config,
    p: &ext_authz::Provider,
    req: &Request<Incoming>,
    authority: &str,
    body: Option<(&[u8], bool)>,
) -> Result<Checked, String> {
    let call = p.call().ok_or("not an external authorization provider")?;
    let svc = index
        .service_by_hostname(&call.service)
        .ok_or_else(|| format!("service {} is not in the mesh config", call.service))?;
    let backend = Backend {
        service: format!("{}/{}", svc.namespace, svc.hostname),
        port: Some(call.port),
        subset: None,
        weight: 1,
        headers: Default::default(),
    };
    let (_, w, addr) = side_endpoint(ctx, index, rules, &backend, call.port)?;
    let asked = async {
        match p {
            ext_authz::Provider::Grpc(_) => {
                grpc_check(ctx, call, w, addr, req, authority, body).await
            }
            ext_authz::Provider::Http(h) => http_check(ctx, h, w, addr, req, authority, body).await,
            ext_authz::Provider::Other { .. } => Err("not callable".into()),
        }
    };
    monoio::time::timeout(call.timeout, asked)
        .await
        .map_err(|_| format!("no answer within {:?}", call.timeout))?
}

/// Send `check` on a pooled connection to `addr` and read the answer (head, at most
/// [`ext_authz::MAX_ANSWER`] of body, trailers).
async fn ask(
    ctx: &ConnCtx,
    w: &Workload,
    addr: SocketAddr,
    host: &str,
    h2: bool,
    check: Request<Body>,
) -> Result<(http::response::Parts, Bytes, Option<HeaderMap>), String> {
    let (mut send, uses) = sender(ctx, w, addr, Some(host), 0, h2).await?;
    let resp = send.send(check).await.map_err(|e| format!("{addr}: {e}"))?;
    let (parts, mut body) = resp.into_parts();
    let mut bytes = BytesMut::new();
    let mut trailers = None;
    while let Some(f) = body.frame().await {
        let f = f.map_err(|e| format!("{addr}: {e}"))?;
        if let Some(d) = f.data_ref() {
            if bytes.len() + d.len() > ext_authz::MAX_ANSWER {
                return Err(format!("{addr}: answer over 64 KiB"));
            }
            bytes.extend_from_slice(d);
        } else if let Ok(t) = f.into_trailers() {
            trailers = Some(t);
        }
    }
    put_sender(addr, send, uses + 1, 0);
    Ok((parts, bytes.freeze(), trailers))
}

/// An HTTP provider's check: a request with the same method, the path under the provider's
/// prefix, the authority, `authorization` and the headers it names, no body.
async fn http_check(
    ctx: &ConnCtx,
    p: &ext_authz::HttpProvider,
    w: &Workload,
    addr: SocketAddr,
    req: &Request<Incoming>,
    authority: &str,
    body: Option<(&[u8], bool)>,
) -> Result<Checked, String> {
    let pq = req.uri().path_and_query().map_or("/", |x| x.as_str());
    let mut check = Request::builder()
        .method(req.method().clone())
        .uri(format!("{}{pq}", p.path_prefix))
        .header(header::HOST, authority)
        .header(header::CONTENT_LENGTH, body.map_or(0, |b| b.0.len()));
    if let Some((_, partial)) = body {
        check = check.header(
            ext_authz::PARTIAL_BODY,
            if partial { "true" } else { "false" },
        );
    }
    for (k, v) in req.headers() {
        if *k == header::AUTHORIZATION || ext_authz::listed(&p.include_headers, k.as_str()) {
            check = check.header(k, v);
        }
    }
    for (k, v) in &p.additional_headers {
        check = check.header(k.as_str(), v.as_str());
    }
    let content = Bytes::copy_from_slice(body.map_or(&[][..], |b| b.0));
    let check = check
        .body(boxed(Full::new(content)))
        .map_err(|e| format!("check request: {e}"))?;
    let (parts, bytes, _) = ask(ctx, w, addr, &p.call.service, false, check).await?;
    if parts.status == StatusCode::OK {
        let mut allowed = ext_authz::Allowed::default();
        for (k, v) in &parts.headers {
            if ext_authz::listed(&p.to_upstream_on_allow, k.as_str()) {
                let set = ext_authz::Action::Set;
                allowed.request.0.push((k.clone(), v.clone(), set));
            }
            // Added to the answer, as Envoy adds `allowed_client_headers_on_success`.
            if ext_authz::listed(&p.to_downstream_on_allow, k.as_str()) {
                let add = ext_authz::Action::Append;
                allowed.response.0.push((k.clone(), v.clone(), add));
            }
        }
        return Ok(Checked::Allowed(allowed));
    }
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers, false);
    headers.remove(header::CONTENT_LENGTH);
    if !p.to_downstream_on_deny.is_empty() {
        let unlisted: Vec<HeaderName> = headers
            .keys()
            .filter(|k| !ext_authz::listed(&p.to_downstream_on_deny, k.as_str()))
            .cloned()
            .collect();
        for k in unlisted {
            headers.remove(k);
        }
    }
    let len = bytes.len() as u64;
    let mut reply = Response::new(boxed(Full::new(bytes)));
    *reply.status_mut() = parts.status;
    *reply.headers_mut() = headers;
    Ok(Checked::Denied(reply, len))
}

/// A gRPC provider's check: `Authorization/Check` over HTTP/2 with the request's attributes.
async fn grpc_check(
    ctx: &ConnCtx,
    call: &ext_authz::Call,
    w: &Workload,
    addr: SocketAddr,
    req: &Request<Incoming>,
    authority: &str,
    body: Option<(&[u8], bool)>,
) -> Result<Checked, String> {
    let as_bytes = call.body.is_some_and(|b| b.as_bytes);
    let attrs = ext_authz::Attributes {
        method: req.method().as_str(),
        path: req.uri().path_and_query().map_or("/", |x| x.as_str()),
        authority,
        headers: req.headers(),
        protocol: match req.version() {
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        },
        size: req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok()),
        source: ctx.client,
        source_principal: ctx.principal.as_ref().map(|p| format!("spiffe://{p}")),
        destination: ctx.target,
        destination_principal: ctx.my_id.to_string(),
        body: body.map(|(b, partial)| (b, partial, as_bytes)),
    };
    let body = ext_authz::check_request(&attrs, std::time::SystemTime::now());
    let ms = call.timeout.as_millis().clamp(1, 99_999_999);
    let check = Request::builder()
        .method(http::Method::POST)
        .uri(format!(
            "http://{}:{}{}",
            call.service,
            call.port,
            ext_authz::GRPC_CHECK_PATH
        ))
        .version(Version::HTTP_2)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header("grpc-timeout", format!("{ms}m"))
        .body(boxed(Full::new(body)))
        .map_err(|e| format!("check request: {e}"))?;
    let (parts, bytes, trailers) = ask(ctx, w, addr, &call.service, true, check).await?;
    if parts.status != StatusCode::OK {
        return Err(format!("the check call answered HTTP {}", parts.status));
    }
    // The call's status: in the trailers, or in the head of a trailers-only answer.
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok());
    match ext_authz::verdict(status, &bytes)? {
        Ok(allowed) => Ok(Checked::Allowed(allowed)),
        Err(d) => {
            let len = d.body.len() as u64;
            let mut reply = Response::new(boxed(Full::new(d.body)));
            *reply.status_mut() = StatusCode::from_u16(d.status).unwrap_or(StatusCode::FORBIDDEN);
            *reply.headers_mut() = d.headers;
            Ok(Checked::Denied(reply, len))
        }
    }
}

/// Point `up` at `authority` in the upstream's protocol: the URI's authority on h2; on
/// HTTP/1.1 an origin-form URI, and `Host` when `set_host` or the client sent none.
fn aim(up: &mut Request<Body>, h2: bool, authority: &str, set_host: bool) {
    let pq = up.uri().path_and_query().map_or("/", |p| p.as_str());
    let uri = match h2 {
        true => format!("http://{authority}{pq}"),
        false => pq.to_string(),
    };
    if let Ok(u) = uri.parse::<Uri>() {
        *up.uri_mut() = u;
    }
    *up.version_mut() = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    if !h2 && (set_host || !up.headers().contains_key(header::HOST)) {
        if let Ok(h) = HeaderValue::from_str(authority) {
            up.headers_mut().insert(header::HOST, h);
        }
    }
}

/// Send a mirror's copy of a request on a task of its own (the main request never waits for
/// it) and read its answer to the end, so the connection can carry the next; bounded by the
/// main request's deadline, counted by result.
fn shadow(
    ctx: &Rc<ConnCtx>,
    index: &Arc<MeshIndex>,
    rules: &Arc<L7Config>,
    m: &Mirror,
    req: Request<Body>,
    deadline: Instant,
) {
    let (ctx, index, rules) = (ctx.clone(), index.clone(), rules.clone());
    let backend = m.backend.clone();
    monoio::spawn(async move {
        let send = async {
            let (svc, w, addr) = side_endpoint(&ctx, &index, &rules, &backend, ctx.target.port())?;
            let (mut send, uses) = sender(&ctx, w, addr, Some(&svc.hostname), 0, ctx.h2).await?;
            let resp = send.send(req).await.map_err(|e| format!("{addr}: {e}"))?;
            let status = resp.status();
            let mut body = resp.into_body();
            while let Some(f) = body.frame().await {
                f.map_err(|e| format!("{addr}: {e}"))?;
            }
            if !ctx.h2 {
                put_sender(addr, send, uses + 1, 0);
            }
            Ok::<_, String>((addr, status))
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let r = monoio::time::timeout(left, send)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {left:?}")));
        ctx.wp.metrics.mirrored(r.is_ok());
        match r {
            Ok((addr, status)) => {
                tracing::debug!(mirror = %backend.service, upstream = %addr, status = status.as_u16(), "waypoint: mirrored request answered")
            }
            Err(e) => {
                tracing::debug!(mirror = %backend.service, error = %e, "waypoint: mirrored request failed")
            }
        }
    });
}

/// What the answer to a routed request gets on its way out: the rule's response header
/// changes, then CORS's allow headers when the request came from an allowed origin.
#[derive(Clone, Copy)]
struct Outgoing<'a> {
    route: Option<&'a HeaderRules>,
    cors: Option<(&'a Cors, &'a HeaderValue)>,
    /// An external authorizer's `response_headers_to_add`.
    authz: Option<&'a ext_authz::Changes>,
}

impl Outgoing<'_> {
    fn apply(&self, h: &mut HeaderMap) {
        if let Some(r) = self.route {
            r.response.apply(h);
        }
        if let Some(a) = self.authz {
            a.apply(h);
        }
        if let Some((c, origin)) = self.cors {
            c.apply(origin, h);
        }
    }
}

/// [`answer`] after a rule was chosen: the rule's response changes (and CORS) apply to the
/// waypoint's own answers too, as Envoy's to its local replies.
fn answer_routed(
    log: ReqLog,
    status: StatusCode,
    flags: &'static str,
    text: &'static str,
    out: Outgoing<'_>,
) -> Response<Body> {
    let mut reply = answer(log, status, flags, text);
    out.apply(reply.headers_mut());
    reply
}

/// True for `share` percent of calls.
fn chance(share: f64) -> bool {
    share >= 100.0 || (random() % 1_000_000) as f64 / 10_000.0 < share
}

/// An injected gRPC abort: HTTP 200, `grpc-status` in the head (a trailers-only answer), as
/// Envoy's fault filter sends it.
fn grpc_abort(code: u32) -> Response<Body> {
    let mut r = Response::new(boxed(http_body_util::Empty::<Bytes>::new()));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    h.insert(
        "grpc-message",
        HeaderValue::from_static("fault filter abort"),
    );
    r
}

/// Apply a request's header changes: the backend's, then the route's (so the route's `set`
/// wins, as in Envoy). Returns the authority they set (the last one), if any.
fn rewrite_request<'a>(
    h: &mut HeaderMap,
    backend: Option<&'a HeaderRules>,
    route: Option<&'a HeaderRules>,
) -> Option<&'a str> {
    let mut out = None;
    for r in [backend, route].into_iter().flatten() {
        r.request.apply(h);
        out = r.authority.as_deref().or(out);
    }
    out
}

/// An HTTP/1.1 upgrade (websocket): the request head written to a fresh upstream stream by
/// hand (hyper's client upgrades need a `Send` stream; this worker's are not), the response
/// head read back; on 101 both sides are joined byte for byte.
#[allow(clippy::too_many_arguments)]
async fn upgrade(
    ctx: &ConnCtx,
    mut log: ReqLog,
    parts: &http::request::Parts,
    authority: &str,
    down: hyper::upgrade::OnUpgrade,
    w: &Workload,
    addr: SocketAddr,
    host: Option<&str>,
) -> Response<Body> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut up = match dial(ctx, w, addr, host).await {
        Ok(u) => u,
        Err(e) => {
            log.error = Some(e);
            eject(&ctx.wp, addr);
            return answer(
                log,
                StatusCode::SERVICE_UNAVAILABLE,
                "UF",
                "upstream connect error",
            );
        }
    };
    let mut head = Vec::with_capacity(1024);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    head.extend_from_slice(b" HTTP/1.1\r\n");
    if !parts.headers.contains_key(header::HOST) {
        head.extend_from_slice(format!("host: {authority}\r\n").as_bytes());
    }
    for (k, v) in &parts.headers {
        head.extend_from_slice(k.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(v.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let limit = ctx.wp.settings.max_header_bytes;
    let exchange = async {
        up.write_all(&head).await?;
        up.flush().await?;
        let mut buf = Vec::with_capacity(1024);
        loop {
            let mut chunk = [0u8; 4096];
            let n = up.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before a response",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut hs);
            match r.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let mut resp = Response::new(boxed(http_body_util::Empty::<Bytes>::new()));
                    *resp.status_mut() = StatusCode::from_u16(r.code.unwrap_or(502))
                        .unwrap_or(StatusCode::BAD_GATEWAY);
                    for h in r.headers.iter() {
                        if let (Ok(k), Ok(v)) = (
                            http::HeaderName::from_bytes(h.name.as_bytes()),
                            HeaderValue::from_bytes(h.value),
                        ) {
                            resp.headers_mut().append(k, v);
                        }
                    }
                    let rest = Bytes::copy_from_slice(&buf[len..]);
                    return Ok((resp, rest));
                }
                Ok(httparse::Status::Partial) if buf.len() < limit => continue,
                Ok(httparse::Status::Partial) => {
                    return Err(io::Error::other("response head too large"))
                }
                Err(e) => return Err(io::Error::other(format!("bad response head: {e}"))),
            }
        }
    };
    let left = ctx.wp.settings.request_timeout;
    let (mut resp, rest) = match monoio::time::timeout(left, exchange).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            log.error = Some(format!("upstream {addr}: {e}"));
            return answer(
                log,
                StatusCode::SERVICE_UNAVAILABLE,
                "URX",
                "upstream reset before headers",
            );
        }
        Err(_) => {
            return answer(
                log,
                StatusCode::GATEWAY_TIMEOUT,
                "UT",
                "upstream request timeout",
            )
        }
    };
    let status = resp.status();
    log.upstream_ms = Some(log.start.elapsed().as_secs_f64() * 1e3);
    if status != StatusCode::SWITCHING_PROTOCOLS {
        // The upstream declined the upgrade; its answer (without a body) goes back.
        strip_hop_by_hop(resp.headers_mut(), false);
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        log.finish(status.as_u16(), "-", 0);
        return resp;
    }
    strip_hop_by_hop(resp.headers_mut(), true);
    if let Some(u) = parts.headers.get(header::UPGRADE) {
        resp.headers_mut().insert(header::UPGRADE, u.clone());
    }
    MonoioExecutor.spawn(Box::pin(async move {
        let (sent, recv, flags) = match down.await {
            Ok(client) => {
                let mut client = TokioIo::new(client);
                let early = match rest.is_empty() {
                    true => Ok(()),
                    false => client.write_all(&rest).await,
                };
                match early {
                    Ok(()) => match tokio::io::copy_bidirectional(&mut client, &mut up).await {
                        Ok((a, b)) => (a, b + rest.len() as u64, "-"),
                        Err(_) => (0, 0, "UR"),
                    },
                    Err(_) => (0, 0, "DC"),
                }
            }
            Err(_) => (0, 0, "DC"),
        };
        log.req_bytes.set(sent);
        log.finish(101, flags, recv);
    }));
    resp
}

/// The destination the client dialed: a service VIP (a service waypoint; with the service's
/// `namespace/hostname` key) or a workload (a workload waypoint).
fn destination(
    index: &MeshIndex,
    target: SocketAddr,
) -> (Option<&Service>, Option<&str>, Option<&Workload>) {
    match index.service_at(target.ip()) {
        Some((s, key)) => (Some(s), Some(key), None),
        None => (None, None, index.workload_by_ip(target.ip())),
    }
}

/// A stream that is not HTTP: L4 policy, then relayed to the destination.
async fn tcp(ctx: Rc<ConnCtx>, io: Rewind) {
    let start = Instant::now();
    let index = ctx.state.index();
    let rules = ctx.wp.rules();
    let (service, service_key, workload) = destination(&index, ctx.target);
    let mut labels = ConnLabels {
        reporter: super::metrics::REPORTER,
        source: ctx.source.clone(),
        destination: Peer::none(),
        service: None,
        mtls: true,
        response_flags: "-",
    };
    if let Some(s) = service {
        labels.set_service(s);
    }
    let mut log = ConnLog::new("waypoint", "tcp", ctx.client, ctx.target, labels, start);
    log.src_identity = ctx.peer.clone();
    let principal = ctx.principal.as_deref();
    let headers = HeaderMap::new();
    let pctx = RequestContext {
        principal,
        namespace: principal.and_then(|p| p.split('/').nth(2)),
        source_ip: ctx.client.ip(),
        destination: ctx.target,
        service: service_key,
        method: "",
        path: "",
        host: "",
        headers: &headers,
        auth: None,
        tcp: true,
    };
    match policy::decide(&rules.policies, &pctx) {
        Decision::Deny(reason) => return log.close(&ctx.state, "DENY", 0, 0, Some(reason)),
        // An HTTP provider cannot judge a TCP stream: closed, not open.
        Decision::Allow {
            check: Some(name), ..
        } => {
            let why = format!("CUSTOM policy (provider {name}) on a stream that is not HTTP");
            return log.close(&ctx.state, "DENY", 0, 0, Some(why));
        }
        Decision::Allow { .. } => {}
    }
    // The service's outlier detection applies to TCP too: a failed connection counts as a 5xx;
    // so does a consistent hash on the client's address (the only key a stream has).
    let traffic = service_key.and_then(|k| rules.traffic_for(k, None));
    let outlier = traffic.and_then(|t| t.outlier.clone());
    let by_source = matches!(
        traffic.and_then(|t| t.balance.as_ref()),
        Some(traffic::Balance::Hash(traffic::HashKey::SourceIp))
    )
    .then(|| ctx.client.ip().to_string());
    let mut peers: Vec<SocketAddr> = Vec::new();
    let (w, addr, host) = match (workload, service_key) {
        (Some(w), _) => (w, ctx.target, None),
        (None, Some(k)) => {
            let b = Backend {
                service: k.to_string(),
                port: None,
                subset: None,
                weight: 1,
                headers: Default::default(),
            };
            let picked = endpoints(&index, &rules, &ctx, &b, ctx.target.port())
                .ok()
                .and_then(|(svc, eps)| {
                    let up = outlier.as_ref().map(|o| {
                        peers = eps.iter().filter_map(endpoint_addr).collect();
                        ctx.wp.health.healthy(&peers, o, Instant::now())
                    });
                    let key = by_source.as_deref().map(str::as_bytes);
                    let level = by_level(
                        &ctx,
                        &index,
                        svc,
                        traffic.map(|t| &**t),
                        &eps,
                        &[],
                        up.as_deref(),
                    );
                    // Streams are not counted in flight, as Envoy's TCP proxy counts no requests.
                    let how = Choice {
                        balance: traffic.and_then(|t| t.balance.as_ref()),
                        warmup: traffic.and_then(|t| t.warmup.as_ref()),
                        key,
                        wp: Some(&ctx.wp),
                        count: false,
                    };
                    pick_endpoint(level.as_deref().unwrap_or(&eps), &[], up.as_deref(), how)
                        .map(|(w, a, _)| (w, a, Some(svc.hostname.as_str())))
                });
            match picked {
                Some(p) => p,
                None => return log.close(&ctx.state, "UH", 0, 0, Some("no endpoint".into())),
            }
        }
        (None, None) => return log.close(&ctx.state, "NR", 0, 0, Some("unknown".into())),
    };
    log.dst = addr;
    log.dst_identity = w.identity().ok();
    log.labels.destination = w.peer();
    let dialed = Box::pin(dial(&ctx, w, addr, host)).await;
    if let Some(o) = &outlier {
        let outcome = match dialed {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failed,
        };
        record_outcome(&ctx.wp, o, addr, &peers, outcome);
    }
    let up = match dialed {
        Ok(u) => u,
        Err(e) => {
            eject(&ctx.wp, addr);
            return log.close(&ctx.state, "UF", 0, 0, Some(e));
        }
    };
    log.established(&ctx.state);
    // Chunks move as h2 hands them over (no copy buffers: an idle relayed connection holds
    // none); the bytes already read for detection go first.
    let Rewind { prefix, inner } = io;
    let counts = TunnelCounts::default();
    let (sent, received, error) = match up {
        UpIo::Hbone(stream, slot) => {
            let out = relay::join_streams(inner, prefix, stream, &counts).await;
            drop(slot);
            (out.socket_to_stream, out.stream_to_socket, out.error)
        }
        UpIo::Tcp(mut sock) => {
            let first = prefix.len() as u64;
            if let Err(e) = sock.write_all(&prefix).await {
                return log.close(&ctx.state, "UF", 0, 0, Some(e.to_string()));
            }
            let out = relay::copy_bidirectional_counted(sock, inner, &counts).await;
            (
                first + out.stream_to_socket,
                out.socket_to_stream,
                out.error,
            )
        }
    };
    log.close(
        &ctx.state,
        "-",
        sent,
        received,
        error.map(|e| e.to_string()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_are_told_apart_from_the_first_bytes() {
        assert_eq!(detect(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(detect(b"POST /x HTTP/1.0\n"), Some(Detected::Http1));
        assert_eq!(detect(b"POST"), None);
        assert_eq!(detect(b"POST /x"), None);
        assert_eq!(detect(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(detect(&H2_PREFACE[..10]), None);
        assert_eq!(detect(b"PRI * HTTP/1.1\r\n\r\n"), Some(Detected::Tcp));
        assert_eq!(detect(b"\x16\x03\x01"), Some(Detected::Tcp));
        assert_eq!(detect(b"hello"), Some(Detected::Tcp));
        assert_eq!(detect(b"AB \x01\x02"), Some(Detected::Tcp));
        assert_eq!(detect(b"GET \x01\x02\n"), Some(Detected::Tcp));
        assert_eq!(detect(b""), None);
        assert_eq!(detect(b"ABCDEFGHIJKLMNOPQ"), Some(Detected::Tcp));
    }

    /// The size of the future an async fn of two arguments returns, without calling it.
    fn future_size<A, B, F: std::future::Future>(_: fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_requests_future_stays_small() {
        // Every request's future is moved into hyper's dispatcher when it starts; rarely taken
        // branches (a new upstream connection, an upgrade, a pool wait, a local answer's body
        // drain) are boxed so it does not carry them. It was 10,496 bytes with them inline.
        let size = future_size(handle);
        assert!(size <= 4608, "handle()'s future grew to {size} bytes");
    }
}
