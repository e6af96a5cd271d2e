//! Hardening on loopback, real TLS, real sockets: floods of silent and half-handshaken
//! connections are closed by the handshake limit (and capped per worker) while legitimate
//! traffic flows; a peer that never answers TLS fails a dial and every connection queued behind
//! it, quickly; a panic in one connection task leaves the worker and its other connections
//! alone; a slow log sink never slows traffic; byte counters show a live connection's bytes.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

mod common;

use common::{
    ca_init, echo_at, logged_trace_id,
    mesh::{echo_through, metric, socks, socks_ipv4, socks_name, socks_send, Node},
    tmp,
};

thread_local! {
    static BLOCK: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

/// The calling test's own 127.X.0.0/16 (tests of this binary run in parallel threads; the pid
/// keeps parallel runs apart).
fn use_block(k: u8) {
    BLOCK.with(|b| b.set(k));
}

fn ip(b: u8, c: u8) -> IpAddr {
    let x = 20 + (std::process::id() % 20) as u8 * 10 + BLOCK.with(|b| b.get());
    IpAddr::V4(Ipv4Addr::new(127, x, b, c))
}

/// sleep (node-a) may call productpage (node-b, behind a VIP); notsleep may not.
fn mesh(dir: &Path) -> PathBuf {
    let (sleep, pp, vip) = (ip(1, 2), ip(2, 2), ip(20, 20));
    let yaml = format!(
        r#"workloads:
- uid: c//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["{sleep}"]
  protocol: HBONE
  node: node-a
  canonicalName: sleep
  canonicalRevision: v1
- uid: c//v1/Pod/default/productpage
  name: productpage
  namespace: default
  serviceAccount: bookinfo-productpage
  workloadIps: ["{pp}"]
  protocol: HBONE
  node: node-b
  canonicalName: productpage
  canonicalRevision: v1
  services:
    "default/productpage.default.svc.cluster.local":
      9080: 9080
  authorizationPolicies: ["default/productpage-viewer"]
services:
- name: productpage
  namespace: default
  hostname: productpage.default.svc.cluster.local
  vips: ["/{vip}"]
  ports:
    9080: 9080
policies:
- name: productpage-viewer
  namespace: default
  scope: WorkloadSelector
  action: Allow
  dryRun: false
  rules:
  - - - principals:
        - !Exact cluster.local/ns/default/sa/sleep
"#
    );
    let p = dir.join("mesh.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

struct Mesh {
    dir: PathBuf,
    ca: PathBuf,
    cfg: PathBuf,
}

impl Mesh {
    fn new(tag: &str) -> Mesh {
        let dir = tmp(tag);
        let ca = ca_init(&dir);
        let cfg = mesh(&dir);
        echo_at(SocketAddr::new(ip(2, 2), 9080));
        Mesh { dir, ca, cfg }
    }

    /// Node A (sleep's), SOCKS5 on its host address, with `extra` flags.
    fn node_a(&self, extra: &[&str]) -> Node {
        let socks = SocketAddr::new(ip(0, 1), 15080).to_string();
        let mut args = vec!["--socks5", &socks, "--bind-source"];
        args.extend_from_slice(extra);
        let mut a = Node::start("node-a", ip(0, 1), &self.cfg, &self.ca, &args);
        a.wait_ready();
        a
    }

    /// Node B (productpage's), with `extra` flags.
    fn node_b(&self, extra: &[&str]) -> Node {
        let mut b = Node::start("node-b", ip(0, 2), &self.cfg, &self.ca, extra);
        b.wait_ready();
        b
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn socks_addr() -> SocketAddr {
    SocketAddr::new(ip(0, 1), 15080)
}

/// One legitimate request: sleep -> A -> HBONE -> B -> productpage's echo; its latency.
fn legit_echo() -> Duration {
    let t = Instant::now();
    let (code, c) = socks(ip(1, 2), socks_addr(), SocketAddr::new(ip(2, 2), 9080));
    assert_eq!(code, 0, "SOCKS5 reply");
    let data = b"ping through the mesh";
    assert_eq!(echo_through(c, data), data);
    t.elapsed()
}

fn proc_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn timeouts(n: &Node, kind: &str) -> u64 {
    metric(
        &n.metrics(),
        "zring_timeouts_total",
        &[&format!("kind=\"{kind}\"")],
    )
    .unwrap_or(0)
}

/// Wait (5 s at most) until the metric sums to `want`.
fn wait_metric(n: &Node, name: &str, labels: &[&str], want: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = n.metrics();
        if metric(&text, name, labels) == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} {labels:?} never reached {want}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the peer closed `c` (EOF or reset) within `limit`.
fn closed_within(c: &mut TcpStream, limit: Duration) -> bool {
    c.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

/// Connections in one flood.
const FLOOD: usize = 6000;

/// `FLOOD` connections to `hbone`: every other one silent, the rest half a TLS handshake (a
/// record header promising 512 bytes, and 16 of them). A legitimate request every 1000.
fn flood(hbone: SocketAddr) -> Vec<TcpStream> {
    let mut flood = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let mut c = TcpStream::connect(hbone).expect("connect to 15008");
        if i % 2 == 1 {
            let _ = c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03]);
            let _ = c.write_all(&[0u8; 6]);
        }
        flood.push(c);
        if i % 1000 == 999 {
            let t = legit_echo();
            assert!(
                t < Duration::from_secs(1),
                "a legitimate request took {t:?} during the flood"
            );
        }
    }
    flood
}

/// Every flood connection is closed by zring within `limit`.
fn all_closed(flood: &mut [TcpStream], limit: Duration) {
    let deadline = Instant::now() + limit;
    for (i, c) in flood.iter_mut().enumerate() {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        assert!(closed_within(c, left), "flood connection {i} still open");
    }
}

/// zring's descriptors and RSS once a flood's memory had time to go back: two of the workers'
/// 5 s give-back cycles and mimalloc's 1 s purge delay.
fn settled(pid: u32) -> (usize, u64) {
    std::thread::sleep(Duration::from_secs(11));
    (proc_fds(pid), proc_rss_kib(pid))
}

#[test]
fn a_flood_of_silent_and_half_handshaken_connections_is_closed_while_legit_traffic_flows() {
    use_block(0);
    let _ = zring_runtime::sys::raise_nofile_limit();
    let m = Mesh::new("flood");
    for io in ["uring", "epoll"] {
        let b = m.node_b(&[
            "--tls-handshake-timeout",
            "3s",
            "--workers",
            "2",
            "--io",
            io,
        ]);
        let a = m.node_a(&[]);
        let pid = b.proc.child.id();
        let hbone = SocketAddr::new(ip(2, 2), 15008);
        for _ in 0..20 {
            legit_echo();
        }
        std::thread::sleep(Duration::from_millis(300));
        let (fds_fresh, rss_fresh) = (proc_fds(pid), proc_rss_kib(pid));
        // Floods, each followed by a settle. The first sets the workers' high-water marks
        // (monoio's op slab, drain slots, allocator pages); after each, descriptors come back
        // exactly and memory must not creep. The settled RSS wanders with no leak: ten epoll
        // floods in a row settled between 35.5 and 41.2 MiB with no trend, while single
        // levels in CI jumped by 5-9 MiB (41.6 -> 46.4, 41.5 -> 50.2), so one sample cannot
        // decide. The bound is in what a leak would cost, and a leak raises *every* later
        // level: after three floods, some level from the third on must come back within 1 KiB
        // per flood connection (5.9 MiB) of the highest of the first two, trying at most three
        // more floods. A leak of 1 KiB per connection or more keeps every one of them above.
        let mut levels = Vec::new();
        let mut report = Vec::new();
        for round in 0..6 {
            let bound = levels[..levels.len().min(2)]
                .iter()
                .copied()
                .max()
                .unwrap_or(0)
                + FLOOD as u64;
            if round >= 3 && levels[2..].iter().any(|&l| l < bound) {
                break;
            }
            let t0 = Instant::now();
            let mut conns = flood(hbone);
            let (during, rss_during) = (proc_fds(pid), proc_rss_kib(pid));
            assert!(
                during > fds_fresh + 3000,
                "round {round}: the flood did not reach zring: {fds_fresh} -> {during} fds"
            );
            let mut worst = Duration::ZERO;
            while t0.elapsed() < Duration::from_secs(2) {
                worst = worst.max(legit_echo());
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(
                worst < Duration::from_secs(1),
                "round {round}: legitimate requests slowed to {worst:?}"
            );
            all_closed(&mut conns, Duration::from_secs(10));
            drop(conns);
            let (fds, rss) = settled(pid);
            assert!(
                fds <= fds_fresh + 1,
                "round {round}: descriptors not back: {fds_fresh} -> {fds}"
            );
            report.push(format!(
                "round {round}: during {during} fds / {rss_during} KiB, after {fds} / {rss} KiB, worst legitimate request {worst:?}"
            ));
            levels.push(rss);
        }
        assert!(
            timeouts(&b, "tls_handshake") >= (levels.len() * FLOOD) as u64,
            "{}",
            b.metrics()
        );
        eprintln!(
            "flood ({io}): fresh {fds_fresh} fds / {rss_fresh} KiB; {}",
            report.join("; ")
        );
        let bound = levels[..2].iter().copied().max().unwrap_or(0) + FLOOD as u64;
        assert!(
            levels[2..].iter().any(|&l| l < bound),
            "{io}: memory creeps flood after flood: {levels:?} KiB (bound {bound})"
        );
        assert!(legit_echo() < Duration::from_secs(1));
        drop((a, b));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_handshake_cap_closes_excess_connections_at_once_and_counts_them() {
    use_block(1);
    let m = Mesh::new("cap");
    let b = m.node_b(&[
        "--max-handshakes",
        "50",
        "--workers",
        "1",
        "--tls-handshake-timeout",
        "4s",
    ]);
    let _a = m.node_a(&[]);
    let hbone = SocketAddr::new(ip(2, 2), 15008);
    let mut held: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(hbone).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Past the cap: accepted and closed at once.
    let mut excess: Vec<TcpStream> = (0..30)
        .map(|_| TcpStream::connect(hbone).unwrap())
        .collect();
    for (i, c) in excess.iter_mut().enumerate() {
        assert!(
            closed_within(c, Duration::from_secs(1)),
            "excess connection {i} was not closed at once"
        );
    }
    let rejected = metric(
        &b.metrics(),
        "zring_handshake_limit_rejected_total",
        &["listener=\"hbone\""],
    );
    assert_eq!(rejected, Some(30), "{}", b.metrics());
    // The held ones are still open (under the cap) until their handshake limit.
    assert!(!closed_within(&mut held[0], Duration::from_millis(200)));
    for c in held.iter_mut() {
        assert!(closed_within(c, Duration::from_secs(8)));
    }
    // The places are free again: a legitimate connection goes through.
    assert!(legit_echo() < Duration::from_secs(2));
}

/// A listener that accepts TCP and never says a word (holds every connection).
fn black_hole(addr: SocketAddr) -> std::sync::mpsc::Sender<()> {
    let l = TcpListener::bind(addr).unwrap();
    l.set_nonblocking(true).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        loop {
            if !matches!(rx.try_recv(), Err(std::sync::mpsc::TryRecvError::Empty)) {
                return;
            }
            match l.accept() {
                Ok((c, _)) => held.push(c),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    tx
}

#[test]
fn a_peer_that_never_answers_tls_fails_the_dial_and_every_queued_connection_then_recovers() {
    use_block(2);
    let m = Mesh::new("blackhole");
    for io in ["uring", "epoll"] {
        black_hole_round(&m, io);
    }
}

fn black_hole_round(m: &Mesh, io: &str) {
    let a = m.node_a(&["--tls-handshake-timeout", "2s", "--io", io]);
    let hbone = SocketAddr::new(ip(2, 2), 15008);
    let stop = black_hole(hbone);
    let start = Instant::now();
    // Addresses are worked out here: the block is per thread.
    let (src, proxy, dst) = (ip(1, 2), socks_addr(), SocketAddr::new(ip(2, 2), 9080));
    let clients: Vec<_> = (0..51)
        .map(|_| {
            std::thread::spawn(move || {
                let t = Instant::now();
                let (code, _) = socks(src, proxy, dst);
                (code, t.elapsed())
            })
        })
        .collect();
    for c in clients {
        let (code, took) = c.join().unwrap();
        assert_ne!(
            code,
            0,
            "a connection through a dead peer succeeded; log:\n{}",
            a.proc.log()
        );
        assert!(
            took < Duration::from_secs(6),
            "a queued connection hung for {took:?}"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(8));
    assert!(timeouts(&a, "tls_handshake") >= 1, "{}", a.metrics());
    // Each is recorded just after its client got the failure reply.
    wait_metric(
        &a,
        "istio_tcp_connections_closed_total",
        &["reporter=\"source\"", "response_flags=\"UF\""],
        51,
    );
    assert!(
        a.proc.log().contains("no handshake within"),
        "no clear log line:\n{}",
        a.proc.log()
    );
    // The peer is fixed: a real node B takes the address; the next connection dials afresh.
    drop(stop);
    std::thread::sleep(Duration::from_millis(100));
    let _b = m.node_b(&[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, c) = socks(ip(1, 2), socks_addr(), SocketAddr::new(ip(2, 2), 9080));
        if code == 0 {
            assert_eq!(echo_through(c, b"recovered"), b"recovered");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never recovered; log:\n{}",
            a.proc.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_panic_in_one_connection_task_leaves_the_worker_and_its_other_connections_alone() {
    use_block(3);
    if !cfg!(feature = "test-hooks") {
        eprintln!(
            "SKIPPED a_panic_in_one_connection_task_...: needs the test-hooks feature \
             (./scripts/test turns it on: cargo test --features zring-core/test-hooks)"
        );
        return;
    }
    let m = Mesh::new("panic");
    let _b = m.node_b(&[]);
    for io in ["uring", "epoll"] {
        panic_is_contained(&m, io);
    }
}

fn panic_is_contained(m: &Mesh, io: &str) {
    let a = m.node_a(&["--workers", "1", "--io", io]);
    // A long-lived connection on the only worker.
    let (code, mut live) = socks(ip(1, 2), socks_addr(), SocketAddr::new(ip(2, 2), 9080));
    assert_eq!(code, 0);
    live.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    round(&mut live, 64 * 1024);
    // The test hook panics in the task of a connection to port 1.
    let mut doomed = socks_send(
        ip(1, 2),
        socks_addr(),
        &socks_ipv4(SocketAddr::new(ip(2, 2), 1)),
    );
    assert!(
        closed_within(&mut doomed, Duration::from_secs(5)),
        "{io}: the panicking connection was not closed"
    );
    // The socket closes while the task unwinds; the panic is counted once the unwinding is
    // caught, a moment later: wait for the count rather than race it.
    let panics = || {
        a.metrics().lines().find_map(|l| {
            l.strip_prefix("zring_task_panics_total ")?
                .parse::<u64>()
                .ok()
        })
    };
    common::wait_until(
        Duration::from_secs(5),
        || panics() == Some(1),
        || format!("{io}: {}", a.metrics()),
    );
    // The live connection on the same worker keeps flowing byte-exact, and new ones work.
    round(&mut live, 1024 * 1024);
    live.shutdown(Shutdown::Write).unwrap();
    assert!(legit_echo() < Duration::from_secs(2));
    let log = a.proc.log();
    assert_eq!(
        log.matches("connection task panicked").count(),
        1,
        "{io}: one log line per panic:\n{log}"
    );
    assert!(
        log.contains(&ip(1, 2).to_string()),
        "{io}: the panic line names the connection:\n{log}"
    );
    drop(a);
    std::thread::sleep(Duration::from_millis(200));
}

/// Echo `n` bytes through `live` and check them.
fn round(live: &mut TcpStream, n: usize) {
    let data: Vec<u8> = (0..n).map(|i| (i * 7 + n) as u8).collect();
    let mut got = vec![0u8; n];
    let w = {
        let mut w = live.try_clone().unwrap();
        let d = data.clone();
        std::thread::spawn(move || w.write_all(&d).unwrap())
    };
    live.read_exact(&mut got).unwrap();
    w.join().unwrap();
    assert!(got == data, "the live connection's bytes changed");
}

#[test]
fn a_slow_log_sink_drops_lines_instead_of_slowing_traffic() {
    use_block(4);
    let m = Mesh::new("slowlog");
    let _b = m.node_b(&[]);
    // Node A logs at trace level into a pipe nobody reads.
    let socks_at = socks_addr().to_string();
    let host = ip(0, 1);
    let (admin, stats, ready) = (
        SocketAddr::new(host, 15000).to_string(),
        SocketAddr::new(host, 15020).to_string(),
        SocketAddr::new(host, 15021).to_string(),
    );
    let mut child = std::process::Command::new(common::ZRING)
        .args([
            "run",
            "--config",
            m.cfg.to_str().unwrap(),
            "--node-name",
            "node-a",
            "--ca-dir",
            m.ca.to_str().unwrap(),
            "--packet-mark",
            "0",
            "--workers",
            "1",
            "--admin-addr",
            &admin,
            "--stats-addr",
            &stats,
            "--readiness-addr",
            &ready,
            "--socks5",
            &socks_at,
            "--bind-source",
        ])
        .env("RUST_LOG", "trace")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ready_at: SocketAddr = ready.parse().unwrap();
    common::wait_until(
        Duration::from_secs(15),
        || common::mesh::http_get(ready_at, "GET", "/healthz/ready").0 == 200,
        || "node A never ready".to_string(),
    );
    let start = Instant::now();
    for i in 0..600 {
        let t = legit_echo();
        assert!(
            t < Duration::from_secs(2),
            "request {i} took {t:?} with a stalled log sink"
        );
    }
    let took = start.elapsed();
    let text = common::mesh::http_get(stats.parse().unwrap(), "GET", "/metrics").1;
    let dropped: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("zring_log_lines_dropped_total ")?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    let _ = child.kill();
    let _ = child.wait();
    assert!(dropped > 0, "no line was dropped: the sink never filled?");
    eprintln!("600 requests in {took:?} with a stalled log sink; {dropped} log lines dropped");
}

#[test]
fn byte_counters_show_a_live_connections_traffic_before_it_closes() {
    use_block(5);
    let m = Mesh::new("livebytes");
    let b = m.node_b(&[]);
    let a = m.node_a(&[]);
    // By name (SOCKS5 domain): the short form resolves to productpage's VIP.
    let mut c = socks_named(ip(1, 2), socks_addr(), "productpage", 9080);
    let data = vec![42u8; 1 << 20];
    let mut got = vec![0u8; data.len()];
    let w = {
        let mut w = c.try_clone().unwrap();
        let d = data.clone();
        std::thread::spawn(move || w.write_all(&d).unwrap())
    };
    c.read_exact(&mut got).unwrap();
    w.join().unwrap();
    assert!(got == data);
    // Still open: the counters must show the MiB within the live interval (5 s) and slack.
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let sent_a = metric(
            &a.metrics(),
            "istio_tcp_sent_bytes_total",
            &["reporter=\"source\""],
        );
        let sent_b = metric(
            &b.metrics(),
            "istio_tcp_sent_bytes_total",
            &[
                "reporter=\"destination\"",
                "destination_service=\"productpage.default.svc.cluster.local\"",
            ],
        );
        let recv_b = metric(
            &b.metrics(),
            "istio_tcp_received_bytes_total",
            &["reporter=\"destination\""],
        );
        if sent_a >= Some(1 << 20) && sent_b >= Some(1 << 20) && recv_b >= Some(1 << 20) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "live bytes not visible: A sent {sent_a:?}, B sent {sent_b:?} received {recv_b:?}\n{}",
            b.metrics()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let closed = metric(
        &a.metrics(),
        "istio_tcp_connections_closed_total",
        &["reporter=\"source\""],
    );
    assert_eq!(closed.unwrap_or(0), 0, "the connection is still open");
    // At close the totals are exact (no double counting of the live reports).
    c.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = a.metrics();
        if metric(
            &text,
            "istio_tcp_connections_closed_total",
            &["reporter=\"source\""],
        ) == Some(1)
        {
            assert_eq!(
                metric(
                    &text,
                    "istio_tcp_sent_bytes_total",
                    &["reporter=\"source\""]
                ),
                Some(1 << 20)
            );
            assert_eq!(
                metric(
                    &text,
                    "istio_tcp_received_bytes_total",
                    &["reporter=\"source\""]
                ),
                Some(1 << 20)
            );
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Both ends log the same trace id: the CONNECT's traceparent joins their access logs.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (ta, tb) = (
            logged_trace_id(&a.proc.log(), |_| true),
            logged_trace_id(&b.proc.log(), |_| true),
        );
        if ta.is_some() && ta == tb {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "trace ids differ: A {ta:?}, B {tb:?}\n{}\n{}",
            a.proc.log(),
            b.proc.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SOCKS5 CONNECT by domain name; asserts success.
fn socks_named(src: IpAddr, proxy: SocketAddr, name: &str, port: u16) -> TcpStream {
    let mut c = socks_send(src, proxy, &socks_name(name, port));
    let mut r = [0u8; 10];
    c.read_exact(&mut r).unwrap();
    assert_eq!(r[1], 0, "SOCKS5 by name refused");
    c
}

#[test]
fn a_silent_socks5_client_is_cut_at_the_greeting_limit() {
    use_block(6);
    let m = Mesh::new("socksidle");
    let a = m.node_a(&["--socks5-greeting-timeout", "1s"]);
    let mut c = TcpStream::connect(socks_addr()).unwrap();
    let t = Instant::now();
    assert!(closed_within(&mut c, Duration::from_secs(5)));
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "closed before the limit"
    );
    assert_eq!(timeouts(&a, "socks5_greeting"), 1);
    // An unknown name is refused with "host unreachable", not a crash.
    let mut c = socks_send(ip(1, 2), socks_addr(), &socks_name("nowhere", 80));
    let mut r = [0u8; 10];
    c.read_exact(&mut r).unwrap();
    assert_eq!(r[1], 4, "host unreachable");
}

#[test]
fn a_worker_that_dies_makes_the_process_exit_non_zero() {
    use_block(7);
    if !cfg!(feature = "test-hooks") {
        eprintln!("SKIPPED a_worker_that_dies_makes_the_process_exit_non_zero: needs the test-hooks feature (./scripts/test turns it on)");
        return;
    }
    let m = Mesh::new("workerdeath");
    let host = ip(0, 3);
    let (ready, stats) = (
        SocketAddr::new(host, 15021).to_string(),
        SocketAddr::new(host, 15020).to_string(),
    );
    let mut p = common::Proc::spawn_with(
        &[
            "run",
            "--config",
            m.cfg.to_str().unwrap(),
            "--node-name",
            "node-b",
            "--ca-dir",
            m.ca.to_str().unwrap(),
            "--packet-mark",
            "0",
            "--workers",
            "2",
            "--admin-addr",
            "off",
            "--stats-addr",
            &stats,
            "--readiness-addr",
            &ready,
        ],
        |c| {
            c.env("ZRING_TEST_WORKER_PANIC", "1");
        },
    );
    let st = p.wait_exit(Duration::from_secs(15));
    assert!(!st.success(), "zring went on with a dead worker ({st})");
    let log = p.log();
    assert!(
        log.contains("worker 1 panicked"),
        "no line says why:\n{log}"
    );
}

#[test]
fn a_flood_on_the_metrics_port_is_capped_and_it_serves_again_after() {
    use_block(8);
    let m = Mesh::new("adminflood");
    let b = m.node_b(&[]);
    let _ = zring_runtime::sys::raise_nofile_limit();
    let mut silent: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(b.stats).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let closed = silent
        .iter_mut()
        .filter_map(|c| closed_within(c, Duration::from_millis(50)).then_some(()))
        .count();
    assert!(
        closed >= 200 - 128,
        "only {closed} of the excess connections were closed at once"
    );
    drop(silent);
    std::thread::sleep(Duration::from_millis(300));
    let text = b.metrics();
    let rejected = metric(
        &text,
        "zring_handshake_limit_rejected_total",
        &["listener=\"stats\""],
    );
    assert!(rejected >= Some(72), "{text}");
}

#[test]
fn a_workload_leaving_the_config_closes_its_listener_and_a_failed_bind_makes_the_node_unready() {
    use_block(9);
    let m = Mesh::new("listeners");
    let b = m.node_b(&[]);
    let hbone = SocketAddr::new(ip(2, 2), 15008);
    assert!(TcpStream::connect(hbone).is_ok());
    // productpage moves to an address this host does not have: its old listener closes and
    // the new one cannot be bound (no packet is sent anywhere).
    let good = std::fs::read_to_string(&m.cfg).unwrap();
    let moved = good.replace(&format!("\"{}\"", ip(2, 2)), "\"10.255.0.9\"");
    assert_ne!(moved, good);
    std::fs::write(&m.cfg, &moved).unwrap();
    b.proc.signal(1);
    let deadline = Instant::now() + Duration::from_secs(10);
    let why = loop {
        let (status, body) = common::mesh::http_get(b.ready, "GET", "/healthz/ready");
        if status == 503 && TcpStream::connect(hbone).is_err() {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "still {status} {body}; log:\n{}",
            b.proc.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(why.contains("cannot listen on 10.255.0.9:15008"), "{why}");
    // Back: listener bound again, the failure forgotten, ready.
    std::fs::write(&m.cfg, &good).unwrap();
    b.proc.signal(1);
    common::wait_until(
        Duration::from_secs(10),
        || {
            common::mesh::http_get(b.ready, "GET", "/healthz/ready").0 == 200
                && TcpStream::connect(hbone).is_ok()
        },
        || format!("never ready again:\n{}", b.proc.log()),
    );
}
