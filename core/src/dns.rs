//! The DNS proxy on port 15053, as ztunnel runs it: in every pod's network namespace in in-pod
//! mode (istio-cni's DNS capture sends the pod's UDP and TCP port 53 there), else in zring's
//! own namespace.
//!
//! - A and AAAA questions for the mesh's service hostnames are answered from the config in
//!   force (TTL 30 s, authoritative): the full name, the short forms a pod's search path
//!   produces (`reviews` and `reviews.default` from a pod in `default`), and a name the
//!   resolver already extended with a search domain (`reviews.default.default.svc.cluster.local`
//!   is answered with a CNAME to `reviews.default` and its address, as ztunnel does, sparing
//!   the client a round trip). Services without a VIP (headless) answer with their endpoints'
//!   addresses. A mesh name with no address of the asked family gets an empty NOERROR.
//! - Every other question is forwarded, as received, to the upstream resolvers (zring's own
//!   `/etc/resolv.conf` unless `--dns-upstream`), over the transport it came on, each upstream
//!   tried in turn with a time limit; the answer is relayed as is. In in-pod mode the question
//!   leaves from inside the pod's namespace (as ztunnel's do), marked past the capture.
//! - Bounded: a cap on questions in flight (past it, SERVFAIL at once), on TCP connections per
//!   server, and an idle limit on TCP connections. A packet that is not a DNS query gets
//!   FORMERR when its header can be read and is dropped otherwise; each outcome is counted
//!   (`istio_dns_requests_total`, `zring_dns_requests_total{result}`,
//!   `istio_dns_upstream_requests_total`, `istio_dns_upstream_failures_total`) and failures
//!   are logged.
//!
//! The servers run on one thread of their own (a single-threaded tokio runtime): DNS is not on
//! the connection data path.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        rdata::{A, AAAA, CNAME},
        Name, RData, Record, RecordType,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{mpsc, Semaphore},
};

use crate::config::index::MeshIndex;

/// ztunnel's DNS port.
pub const DEFAULT_PORT: u16 = 15053;
/// TTL of the answers for mesh names (ztunnel's).
pub const TTL: u32 = 30;
/// Per-upstream time limit of a forwarded question.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Questions in flight (all servers together) before new ones get SERVFAIL at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
/// TCP connections per server; more are closed at once.
const MAX_TCP_CONNS: usize = 256;
/// TCP connections one client address may hold on one server.
const MAX_TCP_CONNS_PER_CLIENT: usize = 32;
/// An answer the client has not taken within this long closes its TCP connection.
const TCP_WRITE: Duration = Duration::from_secs(5);
/// A TCP connection with no complete question for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The largest UDP answer without EDNS (RFC 1035).
const UDP_PLAIN_MAX: usize = 512;

/// Settings of the DNS proxy.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// Where each server listens (inside each pod's namespace in in-pod mode).
    pub addr: SocketAddr,
    /// Upstream resolvers, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// Per-upstream time limit.
    pub timeout: Duration,
    /// Questions in flight before SERVFAIL.
    pub max_in_flight: usize,
    /// SO_MARK on the forwarding sockets (so capture rules skip them).
    pub mark: Option<u32>,
}

impl DnsSettings {
    /// Settings with the upstreams of `resolv_conf` (`nameserver` lines, port 53); none found
    /// means 127.0.0.1:53, as libc resolvers assume.
    pub fn from_resolv_conf(addr: SocketAddr, resolv_conf: &str) -> Self {
        let mut upstreams: Vec<SocketAddr> = resolv_conf
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some("nameserver"))
                    .then(|| words.next())
                    .flatten()
                    .and_then(|ip| ip.split('%').next()?.parse::<IpAddr>().ok())
                    .map(|ip| SocketAddr::new(ip, 53))
            })
            .collect();
        if upstreams.is_empty() {
            upstreams.push(SocketAddr::from((Ipv4Addr::LOCALHOST, 53)));
        }
        DnsSettings {
            addr,
            upstreams,
            timeout: DEFAULT_UPSTREAM_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            mark: None,
        }
    }
}

/// Outcomes counted in `zring_dns_requests_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from the mesh config.
    Local,
    /// Forwarded and the upstream's answer relayed.
    Forwarded,
    /// Every upstream failed or timed out: SERVFAIL.
    UpstreamFailure,
    /// Not a DNS query we serve (FORMERR, NOTIMP) or not readable at all (dropped).
    Malformed,
    /// Too many questions in flight: SERVFAIL at once.
    Overloaded,
    /// Not a question at all (a response, no header, or from the server's own address):
    /// dropped unanswered.
    Dropped,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Local,
        Outcome::Forwarded,
        Outcome::UpstreamFailure,
        Outcome::Malformed,
        Outcome::Overloaded,
        Outcome::Dropped,
    ];
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Local => "local",
            Outcome::Forwarded => "forwarded",
            Outcome::UpstreamFailure => "upstream_failure",
            Outcome::Malformed => "malformed",
            Outcome::Overloaded => "overloaded",
            Outcome::Dropped => "dropped",
        }
    }
}

/// The DNS proxy's counters.
#[derive(Debug, Default)]
pub struct DnsMetrics {
    outcomes: [AtomicU64; 6],
    upstream_requests: AtomicU64,
    upstream_failures: AtomicU64,
    bind_failures: AtomicU64,
}

impl DnsMetrics {
    fn count(&self, o: Outcome) {
        if let Some(i) = Outcome::ALL.iter().position(|x| *x == o) {
            self.outcomes[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many questions ended with `o`.
    pub fn outcome(&self, o: Outcome) -> u64 {
        Outcome::ALL
            .iter()
            .position(|x| *x == o)
            .map_or(0, |i| self.outcomes[i].load(Ordering::Relaxed))
    }

    /// A server could not be bound.
    pub fn bind_failed(&self) {
        self.bind_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text for these counters.
    pub fn render(&self, out: &mut String) {
        let total: u64 = Outcome::ALL.iter().map(|o| self.outcome(*o)).sum();
        let _ = writeln!(
            out,
            "# HELP istio_dns_requests_total Total number of DNS requests.\n# TYPE istio_dns_requests_total counter\nistio_dns_requests_total {total}"
        );
        let _ = writeln!(out, "# HELP zring_dns_requests_total DNS requests by outcome.\n# TYPE zring_dns_requests_total counter");
        for o in Outcome::ALL {
            let _ = writeln!(
                out,
                "zring_dns_requests_total{{result=\"{}\"}} {}",
                o.as_str(),
                self.outcome(o)
            );
        }
        let _ = writeln!(
            out,
            "# HELP istio_dns_upstream_requests_total Total number of DNS requests forwarded to upstream.\n# TYPE istio_dns_upstream_requests_total counter\nistio_dns_upstream_requests_total {}",
            self.upstream_requests.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP istio_dns_upstream_failures_total Total number of DNS failures forwarding to upstream.\n# TYPE istio_dns_upstream_failures_total counter\nistio_dns_upstream_failures_total {}",
            self.upstream_failures.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP zring_dns_bind_failures_total DNS servers that could not be bound.\n# TYPE zring_dns_bind_failures_total counter\nzring_dns_bind_failures_total {}",
            self.bind_failures.load(Ordering::Relaxed)
        );
    }
}

/// The config the answers come from (the snapshot in force).
pub type IndexFn = Arc<dyn Fn() -> Arc<MeshIndex> + Send + Sync>;

/// Whose questions a server answers: the namespace of the pod it serves (in-pod mode), or
/// none (the client's namespace is then looked up by its address).
#[derive(Debug, Clone)]
pub struct Client {
    /// The pod's namespace, in-pod mode.
    pub namespace: Option<String>,
    /// The pod's network namespace, in-pod mode: forwarded questions leave from there, as
    /// ztunnel's do (the upstream sees the pod's address, and the pod's routes apply), marked
    /// so the pod's DNS capture lets them out (istio-cni's CT zone rules keep their replies
    /// apart from the captured flows). Without a mark they leave from zring's own namespace
    /// instead: unmarked, the capture would send them back to the proxy.
    pub netns: Option<Arc<zring_runtime::net::NetNs>>,
    /// Which server this is (set when it starts serving): with the client's address, whose
    /// share of the forward slots a question takes.
    pub server: u64,
}

/// Sockets of one server, bound by the caller (inside a pod's namespace if need be).
#[derive(Debug)]
pub struct Bound {
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
}

/// Bind a server's UDP and TCP sockets at `addr`; for 127.0.0.1 also [::1] where the
/// namespace has IPv6 loopback (as ztunnel's `localhost`). Run it inside the target namespace.
pub fn bind(addr: SocketAddr) -> std::io::Result<Bound> {
    let mut b = Bound {
        udp: vec![bind_udp(addr)?],
        tcp: vec![bind_tcp(addr)?],
    };
    if addr.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST) {
        let v6 = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port());
        if let (Ok(u), Ok(t)) = (bind_udp(v6), bind_tcp(v6)) {
            b.udp.push(u);
            b.tcp.push(t);
        }
    }
    Ok(b)
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        None,
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    Ok(s.into())
}

enum Cmd {
    Serve(String, Client, Bound),
    Stop(String),
    Retain(HashSet<String>),
}

/// Handle on the DNS thread: servers are added and removed by key (a pod's uid).
#[derive(Debug, Clone)]
pub struct Dns {
    tx: mpsc::UnboundedSender<Cmd>,
    /// The counters.
    pub metrics: Arc<DnsMetrics>,
    /// Settings.
    pub settings: Arc<DnsSettings>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cmd::Serve(k, ..) => write!(f, "Serve({k})"),
            Cmd::Stop(k) => write!(f, "Stop({k})"),
            Cmd::Retain(k) => write!(f, "Retain({} keys)", k.len()),
        }
    }
}

struct Shared {
    index: IndexFn,
    settings: Arc<DnsSettings>,
    metrics: Arc<DnsMetrics>,
    in_flight: Arc<Semaphore>,
    /// Forward slots by client: a share of `in_flight` each.
    fair: Arc<Fair>,
    log_limit: LogLimit,
}

/// A forward slot: one of the shared ones, and one of its client's share.
struct ForwardSlot {
    _shared: tokio::sync::OwnedSemaphorePermit,
    _client: FairPermit,
}

impl Shared {
    /// A slot to forward a question from `peer` on `client`'s server, if the shared cap and
    /// the client's share (a quarter of it) both have room.
    fn forward_slot(&self, client: &Client, peer: IpAddr) -> Option<ForwardSlot> {
        let mine = self.fair.take((client.server, peer))?;
        let shared = self.in_flight.clone().try_acquire_owned().ok()?;
        Some(ForwardSlot {
            _shared: shared,
            _client: mine,
        })
    }
}

/// Per-client counts under a cap, so that no one client (a pod's server and the client's
/// address: every pod asks from its own 127.0.0.1) takes what others need.
#[derive(Debug)]
struct Fair {
    held: std::sync::Mutex<HashMap<(u64, IpAddr), usize>>,
    cap: usize,
}

impl Fair {
    fn new(cap: usize) -> Self {
        Self {
            held: Default::default(),
            cap: cap.max(1),
        }
    }

    fn take(self: &Arc<Self>, key: (u64, IpAddr)) -> Option<FairPermit> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(key).or_default();
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(FairPermit {
            fair: self.clone(),
            key,
        })
    }
}

#[derive(Debug)]
struct FairPermit {
    fair: Arc<Fair>,
    key: (u64, IpAddr),
}

impl Drop for FairPermit {
    fn drop(&mut self) {
        let mut held = self.fair.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// At most `LOG_PER_SECOND` lines a second about bad or failed questions: a flood is counted
/// in the metrics, not written to the log.
#[derive(Debug, Default)]
struct LogLimit {
    second: AtomicU64,
    lines: AtomicU64,
}

const LOG_PER_SECOND: u64 = 10;

impl LogLimit {
    fn allow(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.lines.store(0, Ordering::Relaxed);
        }
        self.lines.fetch_add(1, Ordering::Relaxed) < LOG_PER_SECOND
    }
}

impl Dns {
    /// Start the DNS thread (no server yet).
    pub fn start(settings: DnsSettings, index: IndexFn) -> std::io::Result<Dns> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
        let settings = Arc::new(settings);
        let metrics = Arc::new(DnsMetrics::default());
        let shared = Arc::new(Shared {
            index,
            settings: settings.clone(),
            metrics: metrics.clone(),
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight.max(1))),
            fair: Arc::new(Fair::new(settings.max_in_flight / 4)),
            log_limit: LogLimit::default(),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("zring-dns".into())
            .spawn(move || {
                rt.block_on(async move {
                    let mut servers: HashMap<String, Vec<tokio::task::JoinHandle<()>>> =
                        HashMap::new();
                    while let Some(cmd) = rx.recv().await {
                        match cmd {
                            Cmd::Serve(key, client, bound) => {
                                let tasks = serve(&shared, client, bound);
                                if let Some(old) = servers.insert(key, tasks) {
                                    old.iter().for_each(|t| t.abort());
                                }
                            }
                            Cmd::Stop(key) => {
                                if let Some(old) = servers.remove(&key) {
                                    old.iter().for_each(|t| t.abort());
                                }
                            }
                            Cmd::Retain(keep) => servers.retain(|k, tasks| {
                                let kept = keep.contains(k);
                                if !kept {
                                    tasks.iter().for_each(|t| t.abort());
                                }
                                kept
                            }),
                        }
                    }
                })
            })?;
        Ok(Dns {
            tx,
            metrics,
            settings,
        })
    }

    /// Serve `bound` under `key` (replacing a server with that key).
    pub fn serve(&self, key: &str, client: Client, bound: Bound) {
        let _ = self.tx.send(Cmd::Serve(key.to_string(), client, bound));
    }

    /// Stop the server under `key`.
    pub fn stop(&self, key: &str) {
        let _ = self.tx.send(Cmd::Stop(key.to_string()));
    }

    /// Stop every server whose key is not in `keep`.
    pub fn retain(&self, keep: &HashSet<String>) {
        let _ = self.tx.send(Cmd::Retain(keep.clone()));
    }
}

fn serve(
    shared: &Arc<Shared>,
    mut client: Client,
    bound: Bound,
) -> Vec<tokio::task::JoinHandle<()>> {
    static SERVERS: AtomicU64 = AtomicU64::new(1);
    client.server = SERVERS.fetch_add(1, Ordering::Relaxed);
    let mut tasks = Vec::new();
    for u in bound.udp {
        match UdpSocket::from_std(u) {
            Ok(u) => tasks.push(tokio::spawn(serve_udp(
                shared.clone(),
                client.clone(),
                Arc::new(u),
            ))),
            Err(e) => tracing::error!(error = %e, "DNS: cannot register a UDP socket"),
        }
    }
    for t in bound.tcp {
        match TcpListener::from_std(t) {
            Ok(t) => tasks.push(tokio::spawn(serve_tcp(shared.clone(), client.clone(), t))),
            Err(e) => tracing::error!(error = %e, "DNS: cannot register a TCP listener"),
        }
    }
    tasks
}

async fn serve_udp(shared: Arc<Shared>, client: Client, sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 4096];
    let own = sock.local_addr().ok();
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "DNS: UDP receive error");
                continue;
            }
        };
        // A datagram from the server's own address (spoofed, or a reply to itself) is never
        // answered: answering would talk to itself for ever.
        if Some(peer) == own {
            shared.metrics.count(Outcome::Dropped);
            continue;
        }
        let query = &buf[..n];
        let msg = match prepare(&shared, &client, peer.ip(), query, Transport::Udp) {
            Step::Drop => continue,
            Step::Reply(r) => {
                let _ = sock.send_to(&r, peer).await;
                continue;
            }
            Step::Forward(m) => m,
        };
        // Slots are taken here and held by the task: past the cap a flood gets SERVFAIL at
        // once and never becomes tasks in memory; one client gets at most its share.
        let Some(permit) = shared.forward_slot(&client, peer.ip()) else {
            shared.metrics.count(Outcome::Overloaded);
            if let Some(r) = error_reply(query, ResponseCode::ServFail) {
                let _ = sock.send_to(&r, peer).await;
            }
            continue;
        };
        let (shared, client, sock) = (shared.clone(), client.clone(), sock.clone());
        let query = query.to_vec();
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(reply) =
                forwarded(&shared, &client, peer.ip(), &query, &msg, Transport::Udp).await
            {
                let _ = sock.send_to(&reply, peer).await;
            }
        });
    }
}

async fn serve_tcp(shared: Arc<Shared>, client: Client, l: TcpListener) {
    let conns = Arc::new(Semaphore::new(MAX_TCP_CONNS));
    let per_client = Arc::new(Fair::new(MAX_TCP_CONNS_PER_CLIENT));
    loop {
        let (stream, peer) = match l.accept().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "DNS: TCP accept error");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            shared.metrics.count(Outcome::Overloaded);
            continue;
        };
        // One client holds at most MAX_TCP_CONNS_PER_CLIENT of them: the rest stay for others.
        let Some(mine) = per_client.take((client.server, peer.ip())) else {
            shared.metrics.count(Outcome::Overloaded);
            if shared.log_limit.allow() {
                tracing::info!(client = %peer.ip(), "DNS: a client holds too many TCP connections; closed");
            }
            continue;
        };
        let (shared, client) = (shared.clone(), client.clone());
        tokio::spawn(async move {
            let _permits = (permit, mine);
            tcp_conn(&shared, &client, stream, peer.ip()).await;
        });
    }
}

async fn tcp_conn(shared: &Shared, client: &Client, mut s: TcpStream, peer: IpAddr) {
    loop {
        let query = match tokio::time::timeout(TCP_IDLE, read_frame(&mut s)).await {
            Ok(Ok(q)) => q,
            _ => return,
        };
        let reply = match prepare(shared, client, peer, &query, Transport::Tcp) {
            Step::Drop => return,
            Step::Reply(r) => Some(r),
            Step::Forward(msg) => match shared.forward_slot(client, peer) {
                Some(_permit) => {
                    forwarded(shared, client, peer, &query, &msg, Transport::Tcp).await
                }
                None => {
                    shared.metrics.count(Outcome::Overloaded);
                    error_reply(&query, ResponseCode::ServFail)
                }
            },
        };
        // A client that does not read its answers loses its connection (and the kernel
        // buffer it pins) after TCP_WRITE instead of holding them for ever.
        let Some(r) = reply else { return };
        match tokio::time::timeout(TCP_WRITE, write_frame(&mut s, &r)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

async fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut q).await?;
    Ok(q)
}

async fn write_frame(s: &mut TcpStream, m: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(m.len()).map_err(|_| std::io::ErrorKind::InvalidData)?;
    let mut out = Vec::with_capacity(m.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(m);
    s.write_all(&out).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// An error answer to `query` when at least its header is there.
fn error_reply(query: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    let op = OpCode::from_u8((query[2] >> 3) & 0x0f);
    let mut m = Message::error_msg(id, op, code);
    m.metadata.recursion_desired = query[2] & 1 == 1;
    m.metadata.recursion_available = true;
    m.to_vec().ok()
}

/// What to do with one packet, decided with no I/O.
enum Step {
    /// Nothing: not a question (a response, or no header).
    Drop,
    /// Answer this at once (a mesh name, or an error).
    Reply(Vec<u8>),
    /// Ask the upstreams.
    Forward(Box<Message>),
}

/// The largest UDP answer `msg`'s sender takes.
fn udp_limit(msg: &Message) -> usize {
    msg.edns.as_ref().map_or(UDP_PLAIN_MAX, |e| {
        usize::from(e.max_payload()).max(UDP_PLAIN_MAX)
    })
}

/// `answer` as bytes fitted to the transport: over UDP, past the client's limit, the answer
/// truncated with TC set (the client asks again over TCP).
fn fit(answer: &Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = answer.to_vec().ok()?;
    match bytes.len() > limit {
        true => answer.truncate().to_vec().ok(),
        false => Some(bytes),
    }
}

fn prepare(
    shared: &Shared,
    client: &Client,
    peer: IpAddr,
    query: &[u8],
    transport: Transport,
) -> Step {
    // A response (QR=1) is never answered: two DNS servers, or one and a spoofed source,
    // would answer each other for ever. No header at all: nothing to answer either.
    if query.len() < 12 || query[2] & 0x80 != 0 {
        shared.metrics.count(Outcome::Dropped);
        return Step::Drop;
    }
    let msg = match Message::from_vec(query) {
        Ok(m) => m,
        Err(e) => {
            shared.metrics.count(Outcome::Malformed);
            if shared.log_limit.allow() {
                tracing::warn!(client = %peer, error = %e, "DNS: malformed query");
            }
            return error_reply(query, ResponseCode::FormErr).map_or(Step::Drop, Step::Reply);
        }
    };
    if msg.metadata.message_type != MessageType::Query
        || msg.metadata.op_code != OpCode::Query
        || msg.queries.len() != 1
    {
        shared.metrics.count(Outcome::Malformed);
        if shared.log_limit.allow() {
            tracing::warn!(client = %peer, questions = msg.queries.len(), "DNS: not a standard query with one question");
        }
        let code = if msg.metadata.op_code == OpCode::Query {
            ResponseCode::FormErr
        } else {
            ResponseCode::NotImp
        };
        return error_reply(query, code).map_or(Step::Drop, Step::Reply);
    }
    // RFC 6891 6.1.3: an EDNS version this server does not speak gets BADVERS (as ztunnel's).
    if msg.edns.as_ref().is_some_and(|e| e.version() != 0) {
        shared.metrics.count(Outcome::Malformed);
        let mut m = Message::error_msg(msg.metadata.id, OpCode::Query, ResponseCode::BADVERS);
        m.add_queries(msg.queries.iter().cloned());
        m.set_edns(hickory_proto::op::Edns::new());
        return m.to_vec().map_or(Step::Drop, Step::Reply);
    }
    let index = (shared.index)();
    let namespace = client
        .namespace
        .clone()
        .or_else(|| index.workload_by_ip(peer).map(|w| w.namespace.clone()));
    if let Some(answer) = answer_local(&index, namespace.as_deref(), &msg) {
        shared.metrics.count(Outcome::Local);
        let limit = match transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => udp_limit(&msg),
        };
        return fit(&answer, limit).map_or(Step::Drop, Step::Reply);
    }
    Step::Forward(Box::new(msg))
}

/// Forward a question the mesh does not answer; the upstream's answer fitted to the client's
/// UDP limit, or SERVFAIL.
async fn forwarded(
    shared: &Shared,
    client: &Client,
    peer: IpAddr,
    query: &[u8],
    msg: &Message,
    transport: Transport,
) -> Option<Vec<u8>> {
    match forward(shared, client, query, msg.metadata.id, transport).await {
        Ok(reply) => {
            shared.metrics.count(Outcome::Forwarded);
            if transport == Transport::Udp && reply.len() > udp_limit(msg) {
                return match Message::from_vec(&reply) {
                    Ok(m) => fit(&m, udp_limit(msg)),
                    Err(_) => error_reply(query, ResponseCode::ServFail),
                };
            }
            Some(reply)
        }
        Err(e) => {
            shared.metrics.count(Outcome::UpstreamFailure);
            if shared.log_limit.allow() {
                let name = msg.queries.first().map(|q| q.name().to_ascii());
                tracing::warn!(client = %peer, name = ?name, error = %e, "DNS: no upstream answered; SERVFAIL");
            }
            error_reply(query, ResponseCode::ServFail)
        }
    }
}

/// The answer from the mesh config, if the question names a mesh service.
pub fn answer_local(index: &MeshIndex, namespace: Option<&str>, msg: &Message) -> Option<Message> {
    let q = msg.queries.first()?;
    if !matches!(q.query_type(), RecordType::A | RecordType::AAAA) {
        return None;
    }
    let asked = q.name().to_ascii().to_ascii_lowercase();
    let asked = asked.strip_suffix('.').unwrap_or(&asked);
    let (cname, addrs) = lookup(index, namespace, asked)?;
    let mut m = Message::response(msg.metadata.id, OpCode::Query);
    m.metadata.authoritative = true;
    m.metadata.recursion_desired = msg.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_query(q.clone());
    let fqdn = |s: &str| Name::from_ascii(format!("{s}.")).ok();
    let mut owner = q.name().clone();
    if let Some(target) = cname.as_deref().and_then(fqdn) {
        m.add_answer(Record::from_rdata(
            q.name().clone(),
            TTL,
            RData::CNAME(CNAME(target.clone())),
        ));
        owner = target;
    }
    for ip in addrs {
        let rdata = match (ip, q.query_type()) {
            (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
            (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
            _ => continue,
        };
        m.add_answer(Record::from_rdata(owner.clone(), TTL, rdata));
    }
    if msg.edns.is_some() {
        let mut e = hickory_proto::op::Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    Some(m)
}

/// The addresses of the service `asked` names for a client in `namespace`, with the CNAME
/// target when a search domain was stripped.
fn lookup(
    index: &MeshIndex,
    namespace: Option<&str>,
    asked: &str,
) -> Option<(Option<String>, Vec<IpAddr>)> {
    if asked.is_empty() {
        return None;
    }
    let domain = index.cluster_domain();
    let expand = |name: &str| -> Vec<String> {
        let mut out = vec![name.to_string()];
        match name.split('.').count() {
            1 => {
                if let Some(ns) = namespace {
                    out.push(format!("{name}.{ns}.svc.{domain}"));
                }
            }
            2 => out.push(format!("{name}.svc.{domain}")),
            _ => {}
        }
        out
    };
    for candidate in expand(asked) {
        if let Some(s) = index.service_by_hostname(&candidate) {
            return Some((None, index.service_addresses(s)));
        }
    }
    // A name the client's resolver extended with one of its search domains.
    let mut search = vec![format!("svc.{domain}"), domain.to_string()];
    if let Some(ns) = namespace {
        search.insert(0, format!("{ns}.svc.{domain}"));
    }
    for s in search {
        let Some(stripped) = asked.strip_suffix(&format!(".{s}")) else {
            continue;
        };
        for candidate in expand(stripped) {
            if let Some(svc) = index.service_by_hostname(&candidate) {
                return Some((Some(stripped.to_string()), index.service_addresses(svc)));
            }
        }
    }
    None
}

/// Forward `query` to the upstreams in turn; the first answer with the query's id wins.
async fn forward(
    shared: &Shared,
    client: &Client,
    query: &[u8],
    id: u16,
    transport: Transport,
) -> std::io::Result<Vec<u8>> {
    let mut last = std::io::Error::other("no upstream resolver configured");
    let mark = shared.settings.mark;
    let netns = client.netns.as_deref().filter(|_| mark.is_some());
    for &up in &shared.settings.upstreams {
        shared
            .metrics
            .upstream_requests
            .fetch_add(1, Ordering::Relaxed);
        let attempt = async {
            match transport {
                Transport::Udp => {
                    forward_udp(
                        upstream_socket(netns, up, socket2::Type::DGRAM, mark)?,
                        up,
                        query,
                        id,
                    )
                    .await
                }
                Transport::Tcp => {
                    forward_tcp(
                        upstream_socket(netns, up, socket2::Type::STREAM, mark)?,
                        up,
                        query,
                    )
                    .await
                }
            }
        };
        match tokio::time::timeout(shared.settings.timeout, attempt).await {
            Ok(Ok(r)) => return Ok(r),
            Ok(Err(e)) => last = std::io::Error::new(e.kind(), format!("{up}: {e}")),
            Err(_) => {
                last = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{up}: no answer within {:?}", shared.settings.timeout),
                )
            }
        }
        shared
            .metrics
            .upstream_failures
            .fetch_add(1, Ordering::Relaxed);
    }
    Err(last)
}

/// A socket towards `up`, created in `netns` when given (it stays there).
fn upstream_socket(
    netns: Option<&zring_runtime::net::NetNs>,
    up: SocketAddr,
    ty: socket2::Type,
    mark: Option<u32>,
) -> std::io::Result<socket2::Socket> {
    let make = || -> std::io::Result<socket2::Socket> {
        let s = socket2::Socket::new(socket2::Domain::for_address(up), ty, None)?;
        if let Some(m) = mark {
            match s.set_mark(m) {
                Ok(()) => {}
                // Inside a pod the mark is what keeps the question out of the capture.
                Err(e) if netns.is_some() => return Err(e),
                // In zring's own namespace it is a courtesy to node-level rules.
                Err(_) => {}
            }
        }
        s.set_nonblocking(true)?;
        Ok(s)
    };
    match netns {
        Some(ns) => ns.run(make)?,
        None => make(),
    }
}

async fn forward_udp(
    s: socket2::Socket,
    up: SocketAddr,
    query: &[u8],
    id: u16,
) -> std::io::Result<Vec<u8>> {
    let any: SocketAddr = if up.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    s.bind(&any.into())?;
    let s = UdpSocket::from_std(s.into())?;
    s.connect(up).await?;
    s.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = s.recv(&mut buf).await?;
        // Another id is a stray or spoofed answer: keep waiting for ours.
        if n >= 12 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn forward_tcp(s: socket2::Socket, up: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let s = tokio::net::TcpSocket::from_std_stream(s.into());
    let mut s = s.connect(up).await?;
    write_frame(&mut s, query).await?;
    read_frame(&mut s).await
}

/// A query message for `name` and `ty` (for tests and tools).
pub fn query(id: u16, name: &str, ty: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    if let Ok(n) = Name::from_ascii(name) {
        m.add_query(Query::query(n, ty));
    }
    m.to_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LocalConfig;

    fn index() -> MeshIndex {
        let yaml = r#"
workloads:
- uid: c//v1/Pod/default/r
  name: reviews-v1
  namespace: default
  serviceAccount: reviews
  workloadIps: ["10.1.0.5"]
  node: n
  services:
    "default/reviews.default.svc.cluster.local":
      9080: 9080
- uid: c//v1/Pod/default/h
  name: headless-0
  namespace: default
  serviceAccount: h
  workloadIps: ["10.1.0.6"]
  node: n
  services:
    "default/headless.default.svc.cluster.local":
      80: 80
- uid: c//v1/Pod/default/h1
  name: headless-1
  namespace: default
  serviceAccount: h
  workloadIps: ["10.1.0.7"]
  node: n
  status: Unhealthy
  services:
    "default/headless.default.svc.cluster.local":
      80: 80
services:
- name: reviews
  namespace: default
  hostname: reviews.default.svc.cluster.local
  vips: ["/10.96.0.20", "/fd00::20"]
  ports: {9080: 9080}
- name: headless
  namespace: default
  hostname: headless.default.svc.cluster.local
  ports: {80: 80}
- name: ext
  namespace: default
  hostname: api.example.internal
  vips: ["/240.240.0.1"]
  ports: {443: 443}
"#;
        MeshIndex::new(LocalConfig::from_yaml(yaml, std::path::Path::new("t")).unwrap())
    }

    fn ask(i: &MeshIndex, ns: Option<&str>, name: &str, ty: RecordType) -> Option<Vec<String>> {
        let m = Message::from_vec(&query(7, name, ty)).unwrap();
        let a = answer_local(i, ns, &m)?;
        assert_eq!(a.metadata.id, 7);
        assert!(a.metadata.authoritative);
        Some(
            a.answers
                .iter()
                .map(|r| format!("{} {}", r.name, r.data))
                .collect(),
        )
    }

    #[test]
    fn answers_full_short_and_search_extended_names() {
        let i = index();
        let full = ["reviews.default.svc.cluster.local. 10.96.0.20".to_string()];
        assert_eq!(
            ask(
                &i,
                Some("default"),
                "reviews.default.svc.cluster.local.",
                RecordType::A
            )
            .unwrap(),
            full
        );
        assert_eq!(
            ask(&i, Some("default"), "reviews.", RecordType::A).unwrap(),
            ["reviews. 10.96.0.20"]
        );
        assert_eq!(
            ask(&i, Some("other"), "reviews.default.", RecordType::A).unwrap(),
            ["reviews.default. 10.96.0.20"]
        );
        // `reviews` from another namespace is not ours to answer.
        assert!(ask(&i, Some("other"), "reviews.", RecordType::A).is_none());
        assert_eq!(
            ask(
                &i,
                Some("other"),
                "reviews.default.other.svc.cluster.local.",
                RecordType::A
            )
            .unwrap(),
            [
                "reviews.default.other.svc.cluster.local. reviews.default.",
                "reviews.default. 10.96.0.20"
            ]
        );
        assert_eq!(
            ask(
                &i,
                Some("default"),
                "reviews.default.svc.cluster.local.",
                RecordType::AAAA
            )
            .unwrap(),
            ["reviews.default.svc.cluster.local. fd00::20"]
        );
        assert_eq!(
            ask(&i, None, "API.example.internal.", RecordType::A).unwrap(),
            ["API.example.internal. 240.240.0.1"]
        );
        assert_eq!(
            ask(
                &i,
                None,
                "headless.default.svc.cluster.local.",
                RecordType::A
            )
            .unwrap(),
            ["headless.default.svc.cluster.local. 10.1.0.6"],
            "a headless name has its ready endpoints only"
        );
        // Known name, no address of that family: empty and authoritative.
        assert_eq!(
            ask(&i, None, "api.example.internal.", RecordType::AAAA).unwrap(),
            Vec::<String>::new()
        );
        assert!(ask(&i, Some("default"), "example.com.", RecordType::A).is_none());
        assert!(ask(&i, Some("default"), "reviews.", RecordType::TXT).is_none());
    }

    #[test]
    fn upstreams_come_from_resolv_conf() {
        let s = DnsSettings::from_resolv_conf(
            "127.0.0.1:15053".parse().unwrap(),
            "search default.svc.cluster.local\nnameserver 10.96.0.10\n# c\nnameserver fe80::1%eth0\noptions ndots:5\n",
        );
        assert_eq!(
            s.upstreams,
            vec![
                "10.96.0.10:53".parse::<SocketAddr>().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
        let none = DnsSettings::from_resolv_conf("127.0.0.1:15053".parse().unwrap(), "");
        assert_eq!(none.upstreams, vec!["127.0.0.1:53".parse().unwrap()]);
    }

    #[test]
    fn error_replies_need_a_header() {
        assert!(error_reply(&[1, 2, 3], ResponseCode::FormErr).is_none());
        let r = error_reply(
            &[0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 9],
            ResponseCode::FormErr,
        )
        .unwrap();
        let m = Message::from_vec(&r).unwrap();
        assert_eq!(m.metadata.id, 0xabcd);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert!(m.metadata.recursion_desired);
    }
}
