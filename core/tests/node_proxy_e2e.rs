//! Two `zring run` node proxies on loopback, real TLS: sleep -> SOCKS5 (node A) -> HBONE ->
//! node B -> productpage, with the seeds' policy; VIPs; a waypoint; passthrough; metrics,
//! access logs, readiness, reload.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

mod common;

use common::{
    ca_init, echo_at,
    mesh::{echo_through, http_get, metric, socks, Node},
    tmp, Proc, ZRING,
};

thread_local! {
    /// Which of this process's address blocks the test on this thread uses.
    static BLOCK: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

/// Give the calling test its own 127.X.0.0/16 (tests run in parallel threads).
fn use_block(k: u8) {
    BLOCK.with(|b| b.set(k));
}

/// A per-run, per-test 127.X.0.0/16 so parallel runs and tests do not share addresses (five
/// blocks per run).
fn net_octet() -> u8 {
    10 + (std::process::id() % 48) as u8 * 5 + BLOCK.with(|b| b.get())
}

fn ip(b: u8, c: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, net_octet(), b, c))
}

const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/default/sa/waypoint";

/// The mesh: node-a has sleep and notsleep; node-b has productpage (seeds' policy), three
/// reviews endpoints behind a VIP, ratings (behind a waypoint) and a TCP-only legacy-db; the
/// waypoint lives on node-c (a `zring tunnel server` in the tests).
fn mesh_yaml(policy_extra: &str) -> String {
    let (sleep, notsleep, pp, db, vip) = (ip(1, 2), ip(1, 3), ip(2, 2), ip(2, 9), ip(20, 20));
    let (r1, r2, r3, rvip) = (ip(2, 3), ip(2, 4), ip(2, 5), ip(20, 21));
    let (ratings, ratings_vip, wp) = (ip(2, 6), ip(20, 22), ip(3, 2));
    let (near, far, pref_vip, strict_vip) = (ip(1, 5), ip(2, 7), ip(20, 30), ip(20, 31));
    let reviews = |n: u8, a: IpAddr| {
        format!(
            r#"- uid: c//v1/Pod/default/reviews-v{n}
  name: reviews-v{n}
  namespace: default
  serviceAccount: bookinfo-reviews
  workloadIps: ["{a}"]
  protocol: HBONE
  node: node-b
  canonicalName: reviews
  canonicalRevision: v{n}
  services:
    "default/reviews.default.svc.cluster.local":
      9080: 9080
"#
        )
    };
    format!(
        r#"workloads:
- uid: c//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["{sleep}"]
  protocol: HBONE
  node: node-a
- uid: c//v1/Pod/default/notsleep
  name: notsleep
  namespace: default
  serviceAccount: notsleep
  workloadIps: ["{notsleep}"]
  protocol: HBONE
  node: node-a
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
- uid: c//v1/Pod/default/legacy-db
  name: legacy-db
  namespace: default
  serviceAccount: legacy-db
  workloadIps: ["{db}"]
  protocol: TCP
  node: node-b
{r1y}{r2y}{r3y}- uid: c//v1/Pod/default/ratings
  name: ratings
  namespace: default
  serviceAccount: bookinfo-ratings
  workloadIps: ["{ratings}"]
  protocol: HBONE
  node: node-b
  waypoint:
    destination: "/{wp}"
    hboneMtlsPort: 15008
  services:
    "default/ratings.default.svc.cluster.local":
      9080: 9080
- uid: c//v1/Pod/default/near
  name: near
  namespace: default
  serviceAccount: sleep
  workloadIps: ["{near}"]
  protocol: HBONE
  node: node-a
  services:
    "default/pref.default.svc.cluster.local":
      9080: 9080
- uid: c//v1/Pod/default/far
  name: far
  namespace: default
  serviceAccount: bookinfo-reviews
  workloadIps: ["{far}"]
  protocol: HBONE
  node: node-b
  services:
    "default/pref.default.svc.cluster.local":
      9080: 9080
    "default/strict.default.svc.cluster.local":
      9080: 9080
- uid: c//v1/Pod/default/waypoint
  name: waypoint
  namespace: default
  serviceAccount: waypoint
  workloadIps: ["{wp}"]
  protocol: HBONE
  node: node-c
services:
- name: productpage
  namespace: default
  hostname: productpage.default.svc.cluster.local
  vips: ["/{vip}"]
  ports:
    9080: 9080
- name: reviews
  namespace: default
  hostname: reviews.default.svc.cluster.local
  vips: ["/{rvip}"]
  ports:
    9080: 9080
- name: ratings
  namespace: default
  hostname: ratings.default.svc.cluster.local
  vips: ["/{ratings_vip}"]
  ports:
    9080: 9080
  waypoint:
    destination: "/{wp}"
    hboneMtlsPort: 15008
- name: pref
  namespace: default
  hostname: pref.default.svc.cluster.local
  vips: ["/{pref_vip}"]
  ports:
    9080: 9080
  loadBalancer:
    routingPreferences: [Node]
    mode: Failover
- name: strict
  namespace: default
  hostname: strict.default.svc.cluster.local
  vips: ["/{strict_vip}"]
  ports:
    9080: 9080
  loadBalancer:
    routingPreferences: [Node]
    mode: Strict
policies:
- name: productpage-viewer
  namespace: default
  scope: WorkloadSelector
  action: Allow
  dryRun: false
  rules:
  - - - principals:
        - !Exact cluster.local/ns/default/sa/sleep
{policy_extra}"#,
        r1y = reviews(1, r1),
        r2y = reviews(2, r2),
        r3y = reviews(3, r3),
    )
}

fn config(dir: &std::path::Path) -> PathBuf {
    let p = dir.join("mesh.yaml");
    std::fs::write(&p, mesh_yaml("")).unwrap();
    p
}

/// A server at `addr` that writes `tag` and closes.
fn tag_at(addr: SocketAddr, tag: &'static str) {
    let l = TcpListener::bind(addr).unwrap();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(tag.as_bytes());
        }
    });
}

fn waypoint(dir: &std::path::Path, ca: &std::path::Path) -> Proc {
    let listen = SocketAddr::new(ip(3, 2), 15008).to_string();
    let mut p = Proc::spawn(&[
        "tunnel",
        "server",
        "--listen",
        &listen,
        "--ca-dir",
        ca.to_str().unwrap(),
        "--identity",
        WAYPOINT_ID,
        "--workers",
        "1",
    ]);
    p.wait_listening(SocketAddr::new(ip(3, 2), 15008));
    let _ = dir;
    p
}

/// Pipes zring holds: the splice relay's, so > 0 only once a passthrough has run.
fn pipes(p: &Proc) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", p.child.id()))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .map(|l| l.to_string_lossy().starts_with("pipe:"))
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

/// node-b, then node-a with SOCKS5 on its address (port 15080, sources kept), both ready.
fn start_pair(cfg: &std::path::Path, ca: &std::path::Path) -> (Node, Node, SocketAddr) {
    let socks_addr = SocketAddr::new(ip(1, 1), 15080);
    let socks_s = socks_addr.to_string();
    let mut b = Node::start("node-b", ip(2, 1), cfg, ca, &[]);
    let mut a = Node::start(
        "node-a",
        ip(1, 1),
        cfg,
        ca,
        &["--bind-source", "--socks5", &socks_s],
    );
    b.wait_ready();
    a.wait_ready();
    (a, b, socks_addr)
}

fn read_all(mut c: TcpStream) -> String {
    let mut s = String::new();
    let _ = c.read_to_string(&mut s);
    s
}

#[test]
fn the_mesh_paths_policies_waypoint_vip_passthrough_metrics_and_logs() {
    use_block(0);
    let dir = tmp("mesh");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = ca_init(&dir);
    let cfg = config(&dir);
    echo_at(SocketAddr::new(ip(2, 2), 9080));
    echo_at(SocketAddr::new(ip(2, 9), 5432));
    tag_at(SocketAddr::new(ip(2, 3), 9080), "v1");
    tag_at(SocketAddr::new(ip(2, 4), 9080), "v2");
    tag_at(SocketAddr::new(ip(2, 5), 9080), "v3");
    tag_at(SocketAddr::new(ip(2, 6), 9080), "ratings-direct");
    // The waypoint forwards to its CONNECT target; something answers at the VIP so the test
    // sees which target the waypoint was given.
    tag_at(SocketAddr::new(ip(20, 22), 9080), "via-vip");
    let wp = waypoint(&dir, &ca);
    let (a, b, socks_addr) = start_pair(&cfg, &ca);

    // sleep -> productpage by workload IP and by VIP: allowed, byte-exact.
    let payload: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    for dst in [
        SocketAddr::new(ip(2, 2), 9080),
        SocketAddr::new(ip(20, 20), 9080),
    ] {
        let (code, c) = socks(ip(1, 2), socks_addr, dst);
        assert_eq!(
            code,
            0,
            "sleep -> {dst} must be allowed\nA:\n{}\nB:\n{}",
            a.proc.log(),
            b.proc.log()
        );
        assert!(
            echo_through(c, &payload) == payload,
            "byte-exact through HBONE to {dst}"
        );
    }
    // notsleep -> productpage: denied by the destination's policy.
    let (code, _c) = socks(ip(1, 3), socks_addr, SocketAddr::new(ip(2, 2), 9080));
    assert_eq!(code, 2, "notsleep must be refused (SOCKS5 'not allowed')");

    // The reviews VIP spreads connections over its three endpoints.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..9 {
        let (code, c) = socks(ip(1, 2), socks_addr, SocketAddr::new(ip(20, 21), 9080));
        assert_eq!(code, 0);
        seen.insert(read_all(c));
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["v1", "v2", "v3"]);

    // ratings has a waypoint: its VIP and its workload IP both go to the waypoint, which is
    // given the original address as the CONNECT target.
    let (code, c) = socks(ip(1, 2), socks_addr, SocketAddr::new(ip(20, 22), 9080));
    assert_eq!(code, 0, "A:\n{}", a.proc.log());
    assert_eq!(
        read_all(c),
        "via-vip",
        "the waypoint must get the VIP as target"
    );
    // A client that skips the waypoint and goes straight to ratings' node is refused there.
    let bypass_listen = common::free_port();
    let mut bypass = Proc::spawn(&[
        "tunnel",
        "client",
        "--listen",
        &bypass_listen.to_string(),
        "--ca-dir",
        ca.to_str().unwrap(),
        "--identity",
        "spiffe://cluster.local/ns/default/sa/sleep",
        "--server",
        &SocketAddr::new(ip(2, 6), 15008).to_string(),
        "--target",
        &SocketAddr::new(ip(2, 6), 9080).to_string(),
        "--expect",
        "spiffe://cluster.local/ns/default/sa/bookinfo-ratings",
        "--workers",
        "1",
    ]);
    bypass.wait_listening(bypass_listen);
    let got = read_all(TcpStream::connect(bypass_listen).unwrap());
    assert_eq!(got, "", "a waypoint bypass must not reach ratings");

    // sleep -> the TCP-only workload: passed through with the splice relay (pipes appear).
    let before = pipes(&a.proc);
    let (code, mut c) = socks(ip(1, 2), socks_addr, SocketAddr::new(ip(2, 9), 5432));
    assert_eq!(code, 0);
    c.write_all(b"plain").unwrap();
    let mut five = [0u8; 5];
    c.read_exact(&mut five).unwrap();
    assert_eq!(&five, b"plain");
    let during = pipes(&a.proc);
    assert!(
        during >= before + 2,
        "the passthrough relay splices through pipes ({before} pipe fds before, {during} during)"
    );
    assert_eq!(echo_through(c, b"!"), b"!");
    std::thread::sleep(Duration::from_millis(300));

    // Routing preference: pref's endpoint on this node is chosen over the one on node-b (and
    // delivered directly); strict's only endpoint is on node-b, so nothing qualifies.
    tag_at(SocketAddr::new(ip(1, 5), 9080), "near");
    tag_at(SocketAddr::new(ip(2, 7), 9080), "far");
    for _ in 0..4 {
        let (code, c) = socks(ip(1, 2), socks_addr, SocketAddr::new(ip(20, 30), 9080));
        assert_eq!(code, 0);
        assert_eq!(read_all(c), "near", "same-node preference");
    }
    let (code, _c) = socks(ip(1, 2), socks_addr, SocketAddr::new(ip(20, 31), 9080));
    assert_eq!(
        code, 4,
        "strict preference with no same-node endpoint: host unreachable"
    );

    // Metrics, both sides, with Istio's labels.
    let (ma, mb) = (a.metrics(), b.metrics());
    let sleep_pp = [
        "source_workload=\"sleep\"",
        "destination_workload=\"productpage\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
        "destination_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-productpage\"",
        "connection_security_policy=\"mutual_tls\"",
        "response_flags=\"-\"",
    ];
    let src: Vec<&str> = sleep_pp
        .iter()
        .copied()
        .chain(["reporter=\"source\""])
        .collect();
    let dst: Vec<&str> = sleep_pp
        .iter()
        .copied()
        .chain(["reporter=\"destination\""])
        .collect();
    // Both sides count the two connections and exactly 2 MiB each way.
    for (text, labels) in [(&ma, &src), (&mb, &dst)] {
        for (name, want) in [
            ("istio_tcp_connections_opened_total", 2),
            ("istio_tcp_connections_closed_total", 2),
            ("istio_tcp_sent_bytes_total", 2 << 20),
            ("istio_tcp_received_bytes_total", 2 << 20),
        ] {
            assert_eq!(metric(text, name, labels), Some(want), "{name}:\n{text}");
        }
    }
    assert!(
        metric(
            &ma,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"source\"",
                "destination_service=\"productpage.default.svc.cluster.local\""
            ]
        ) == Some(1),
        "the VIP connection carries the service labels:\n{ma}"
    );
    assert_eq!(
        metric(
            &mb,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"destination\"",
                "source_workload=\"notsleep\"",
                "response_flags=\"DENY\""
            ]
        ),
        Some(1),
        "{mb}"
    );
    assert!(
        metric(
            &mb,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"destination\"",
                "destination_workload=\"ratings\"",
                "response_flags=\"DENY\""
            ]
        ) >= Some(1),
        "the waypoint bypass (and the listening probe before it) is counted as denied:\n{mb}"
    );
    assert_eq!(
        metric(
            &ma,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"source\"",
                "destination_workload=\"legacy-db\"",
                "connection_security_policy=\"unknown\""
            ]
        ),
        Some(1),
        "{ma}"
    );

    // Access logs: one line per connection at close.
    let (la, lb) = (a.proc.log(), b.proc.log());
    assert!(
        lb.contains("denied by policy") && lb.contains("notsleep"),
        "B logs the denial:\n{lb}"
    );
    assert!(
        lb.contains("only accepts traffic through its waypoint"),
        "B logs the bypass:\n{lb}"
    );
    let lines = |l: &str, what: &str| {
        l.lines()
            .filter(|x| x.contains("connection complete") && x.contains(what))
            .count()
    };
    assert_eq!(
        lines(&la, "path=\"hbone\""),
        12,
        "A: 2 allowed + 1 denied to productpage, 9 to reviews\n{la}"
    );
    assert_eq!(lines(&la, "path=\"waypoint\""), 1, "{la}");
    assert_eq!(lines(&la, "path=\"passthrough\""), 1, "{la}");
    assert_eq!(lines(&la, "path=\"local\""), 4, "same-node delivery:\n{la}");
    assert!(
        la.contains("no endpoint that meets its strict routing preferences"),
        "{la}"
    );
    assert!(
        lb.contains("src.identity=spiffe://cluster.local/ns/default/sa/sleep"),
        "B sees sleep's identity:\n{lb}"
    );

    // Admin: the config dump has the certificates with their expiry.
    let (st, dump) = http_get(b.admin, "GET", "/config_dump");
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let certs = v["certificates"].as_array().unwrap();
    assert!(
        certs.iter().any(|c| c["identity"]
            == "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
            && c["secondsLeft"].as_u64().unwrap() > 3600),
        "{dump}"
    );
    assert_eq!(v["workloads"].as_array().unwrap().len(), 11);
    drop(wp);
    let _ = std::fs::remove_dir_all(&dir);
}

fn noise_policy(i: usize) -> String {
    format!(
        r#"- name: noise-{i}
  namespace: other
  scope: Namespace
  action: Deny
  dryRun: false
  rules:
  - - - namespaces:
        - !Exact nowhere-{i}
"#
    )
}

const DENY_SLEEP: &str = r#"- name: deny-sleep
  namespace: istio-system
  scope: Global
  action: Deny
  dryRun: false
  rules:
  - - - principals:
        - !Exact cluster.local/ns/default/sa/sleep
"#;

fn generation(n: &Node) -> u64 {
    metric_plain(&n.metrics(), "zring_config_generation ").unwrap_or(0)
}

fn metric_plain(text: &str, line_prefix: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Write `yaml` to `path` atomically (as a config manager would) and SIGHUP both nodes; wait
/// until each has `want` as its generation.
fn reload(path: &std::path::Path, yaml: &str, nodes: &[&Node], want: u64) {
    let tmp_path = path.with_extension("tmp");
    std::fs::write(&tmp_path, yaml).unwrap();
    std::fs::rename(&tmp_path, path).unwrap();
    for n in nodes {
        n.proc.signal(1);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in nodes {
        while metric_plain(&n.metrics(), "zring_config_generation ") != Some(want) {
            assert!(
                Instant::now() < deadline,
                "generation {want} never in force; log:\n{}",
                n.proc.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn readiness_waits_for_config_reloads_keep_1000_connections_and_a_bad_file_is_refused() {
    use_block(1);
    zring_runtime::sys::raise_nofile_limit().unwrap();
    let dir = tmp("reload");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = ca_init(&dir);
    let cfg = dir.join("mesh.yaml");
    echo_at(SocketAddr::new(ip(2, 2), 9080));
    // Node B starts before its config exists: up, but not ready, and says why.
    let mut b = Node::start("node-b", ip(2, 1), &cfg, &ca, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (st, body) = loop {
        let r = http_get(b.ready, "GET", "/healthz/ready");
        if r.0 != 0 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(st, 503, "not ready without a config: {body}");
    assert!(body.contains("waiting for the config file"), "{body}");
    std::fs::write(&cfg, mesh_yaml("")).unwrap();
    b.wait_ready();
    let socks_addr = SocketAddr::new(ip(1, 1), 15080);
    let socks_s = socks_addr.to_string();
    let mut a = Node::start(
        "node-a",
        ip(1, 1),
        &cfg,
        &ca,
        &["--bind-source", "--socks5", &socks_s],
    );
    a.wait_ready();
    assert_eq!(generation(&a), 1);

    // 1000 live connections sleep -> productpage.
    let mut conns: Vec<TcpStream> = (0..1000)
        .map(|i| {
            let (code, mut c) = socks(ip(1, 2), socks_addr, SocketAddr::new(ip(2, 2), 9080));
            assert_eq!(code, 0, "connection {i}");
            c.write_all(&[i as u8]).unwrap();
            let mut one = [0u8; 1];
            c.read_exact(&mut one).unwrap();
            c
        })
        .collect();
    // 50 config changes on both nodes.
    for i in 0..50 {
        let extra: String = (0..=i).map(noise_policy).collect();
        reload(&cfg, &mesh_yaml(&extra), &[&a, &b], 2 + i as u64);
    }
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(b"live")
            .unwrap_or_else(|e| panic!("connection {i} dropped: {e}"));
        let mut four = [0u8; 4];
        c.read_exact(&mut four)
            .unwrap_or_else(|e| panic!("connection {i} dropped: {e}"));
        assert_eq!(&four, b"live");
    }
    // A new policy applies to new connections; the live ones keep going.
    reload(&cfg, &mesh_yaml(DENY_SLEEP), &[&a, &b], 52);
    let (code, _c) = socks(ip(1, 2), socks_addr, SocketAddr::new(ip(2, 2), 9080));
    assert_eq!(code, 2, "the new DENY applies to a new connection");
    for c in conns.iter_mut().step_by(97) {
        c.write_all(b"ok").unwrap();
        let mut two = [0u8; 2];
        c.read_exact(&mut two).unwrap();
    }
    // A bad file is refused: logged with the file and the problem, counted, old config kept.
    std::fs::write(
        &cfg,
        "workloads:\n- uid: x\n  name: broken\n  workloadIps: [\"not-an-ip\"]\n",
    )
    .unwrap();
    b.proc.signal(1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_plain(
        &b.metrics(),
        "zring_config_reloads_total{result=\"failure\"}",
    ) != Some(1)
    {
        assert!(
            Instant::now() < deadline,
            "the bad file was never rejected:\n{}",
            b.proc.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(generation(&b), 52, "the config in force is unchanged");
    let log = b.proc.log();
    assert!(
        log.contains("config rejected")
            && log.contains("mesh.yaml")
            && log.contains("workloads[0]"),
        "the error names the file and the field:\n{log}"
    );
    let (code, _c) = socks(ip(1, 2), socks_addr, SocketAddr::new(ip(2, 2), 9080));
    assert_eq!(
        code, 2,
        "the old config (with the DENY) is still in force on B"
    );
    let (st, _) = http_get(b.ready, "GET", "/healthz/ready");
    assert_eq!(st, 200, "a rejected reload does not make the proxy unready");
    drop(conns);
    let _ = std::fs::remove_dir_all(&dir);
}

fn issue(ca: &std::path::Path, sa: &str, out: &std::path::Path, ttl: u64) {
    let st = Command::new(ZRING)
        .args(["ca", "issue", "--dir"])
        .arg(ca)
        .args([
            "--spiffe",
            &format!("spiffe://cluster.local/ns/default/sa/{sa}"),
        ])
        .args(["--out", &format!("{}/default/{sa}/", out.display())])
        .args(["--ttl", &ttl.to_string()])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
}

fn productpage_expiry(b: &Node) -> u64 {
    let (_, dump) = http_get(b.admin, "GET", "/config_dump");
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    v["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["identity"] == "spiffe://cluster.local/ns/default/sa/bookinfo-productpage")
        .and_then(|c| c["expirationUnix"].as_u64())
        .unwrap_or(0)
}

#[test]
fn certificates_from_files_are_used_and_reread_when_rotated() {
    use_block(2);
    let dir = tmp("certfiles");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = ca_init(&dir);
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(ca.join("root-cert.pem"), certs.join("root-cert.pem")).unwrap();
    for sa in [
        "sleep",
        "notsleep",
        "bookinfo-productpage",
        "legacy-db",
        "bookinfo-reviews",
        "bookinfo-ratings",
    ] {
        issue(&ca, sa, &certs, 3600);
    }
    let cfg = config(&dir);
    echo_at(SocketAddr::new(ip(2, 2), 9080));
    let socks_addr = SocketAddr::new(ip(1, 1), 15080);
    let socks_s = socks_addr.to_string();
    let certs_s = certs.to_str().unwrap().to_string();
    // No CA key anywhere near the proxies: --cert-dir only.
    let start = |name: &str, host: IpAddr, extra: &[&str]| {
        let mut args = vec!["--cert-dir", certs_s.as_str()];
        args.extend_from_slice(extra);
        Node::start_with(name, host, &cfg, None, &args)
    };
    let mut b = start("node-b", ip(2, 1), &[]);
    let mut a = start("node-a", ip(1, 1), &["--bind-source", "--socks5", &socks_s]);
    b.wait_ready();
    a.wait_ready();
    let check = |what: &str| {
        let (code, c) = socks(ip(1, 2), socks_addr, SocketAddr::new(ip(2, 2), 9080));
        assert_eq!(code, 0, "{what}");
        assert_eq!(echo_through(c, what.as_bytes()), what.as_bytes());
    };
    check("files");
    let first = productpage_expiry(&b);
    assert!(first > 0);

    // Rotation: new files (a different lifetime) are picked up without a restart.
    issue(&ca, "bookinfo-productpage", &certs, 7200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while productpage_expiry(&b) <= first {
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was never read:\n{}",
            b.proc.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = productpage_expiry(&b);
    assert!(second >= first + 3000, "{first} -> {second}");
    check("rotated");

    // A file for the wrong identity is refused; the current certificate stays.
    for f in ["cert-chain.pem", "key.pem"] {
        std::fs::copy(
            certs.join("default/sleep").join(f),
            certs.join("default/bookinfo-productpage").join(f),
        )
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !b.proc.log().contains("the certificate is for spiffe://cluster.local/ns/default/sa/sleep, not spiffe://cluster.local/ns/default/sa/bookinfo-productpage") {
        assert!(Instant::now() < deadline, "the wrong file was not reported:\n{}", b.proc.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(productpage_expiry(&b), second);
    check("kept");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn admin_changes_the_log_filter_json_logs_parse_and_quitquitquit_stops() {
    use_block(3);
    let dir = tmp("admin");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = ca_init(&dir);
    let cfg = config(&dir);
    let mut b = Node::start("node-b", ip(2, 1), &cfg, &ca, &["--log-format", "json"]);
    b.wait_ready();
    assert_eq!(
        http_get(b.admin, "GET", "/logging"),
        (200, "current log filter: info\n".into())
    );
    let (st, body) = http_get(b.admin, "POST", "/logging?level=zring_core=debug,info");
    assert_eq!(st, 200, "{body}");
    assert!(http_get(b.admin, "GET", "/logging")
        .1
        .contains("zring_core=debug,info"));
    let (st, body) = http_get(b.admin, "POST", "/logging?level=[[[");
    assert_eq!(st, 400, "a bad filter is refused: {body}");
    assert!(body.contains("invalid log filter"), "{body}");
    assert_eq!(http_get(b.admin, "GET", "/nothing-here").0, 404);
    assert_eq!(http_get(b.admin, "DELETE", "/config_dump").0, 405);
    assert_eq!(http_get(b.stats, "GET", "/stats/prometheus").0, 200);
    // A peer that is not TLS at all: one (JSON) log line, nothing else disturbed.
    let mut junk = TcpStream::connect(SocketAddr::new(ip(2, 2), 15008)).unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut sink = Vec::new();
    let _ = junk.read_to_end(&mut sink);
    assert_eq!(http_get(b.ready, "GET", "/healthz/ready").0, 200);
    // /quitquitquit: a graceful, successful exit.
    assert_eq!(http_get(b.admin, "POST", "/quitquitquit").0, 200);
    let st = b.proc.wait_exit(Duration::from_secs(15));
    assert!(st.success(), "{st}");
    let log = b.proc.log();
    let mut lines = 0;
    for l in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{l}");
        lines += 1;
    }
    assert!(lines >= 3, "{log}");
    assert!(log.contains("inbound HBONE handshake failed"), "{log}");
    assert!(
        log.contains("shutdown asked through the admin port"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Services whose endpoints differ in locality, readiness and capacity, as istiod describes
/// them: sleep (region r1, zone z1) on node-a; the endpoints on node-b.
fn endpoint_choice_yaml(same_zone_status: &str) -> String {
    let ep = |name: &str, c: u8, zone: &str, extra: &str, svcs: &[&str]| {
        let services: String = svcs
            .iter()
            .map(|s| format!("    \"default/{s}.default.svc.cluster.local\":\n      9080: 9080\n"))
            .collect();
        format!(
            "- uid: c//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  \
             serviceAccount: {name}\n  workloadIps: [\"{}\"]\n  protocol: HBONE\n  node: node-b\n  \
             locality: {{region: r1, zone: {zone}}}\n{extra}  services:\n{services}",
            ip(2, c)
        )
    };
    let svc = |name: &str, c: u8, lb: &str| {
        format!(
            "- name: {name}\n  namespace: default\n  hostname: {name}.default.svc.cluster.local\n  \
             vips: [\"/{}\"]\n  ports:\n    9080: 9080\n{lb}",
            ip(20, c)
        )
    };
    format!(
        "workloads:\n- uid: c//v1/Pod/default/sleep\n  name: sleep\n  namespace: default\n  \
         serviceAccount: sleep\n  workloadIps: [\"{sleep}\"]\n  protocol: HBONE\n  node: node-a\n  \
         locality: {{region: r1, zone: z1, subzone: s1}}\n{}{}{}{}{}services:\n{}{}{}{}{}",
        ep(
            "same-zone",
            10,
            "z1",
            &format!("  status: {same_zone_status}\n"),
            &["close", "direct"]
        ),
        ep("unready", 11, "z1", "  status: Unhealthy\n", &["close", "notready", "dark"]),
        ep("other-zone", 12, "z2", "", &["close"]),
        ep("heavy", 13, "z1", "  capacity: 3\n", &["weighted"]),
        ep("light", 14, "z1", "", &["weighted"]),
        // PreferClose, as istiod sends it.
        svc(
            "close",
            40,
            "  loadBalancer:\n    routingPreferences: [Network, Region, Zone, Subzone]\n    \
             mode: Failover\n    healthPolicy: OnlyHealthy\n"
        ),
        svc("weighted", 41, ""),
        svc("direct", 42, "  loadBalancer: {routingPreferences: [], mode: Passthrough, healthPolicy: OnlyHealthy}\n"),
        // publishNotReadyAddresses.
        svc("notready", 43, "  loadBalancer: {routingPreferences: [], mode: Standard, healthPolicy: AllowAll}\n"),
        svc("dark", 44, ""),
        sleep = ip(1, 2),
    )
}

#[test]
fn service_endpoints_are_chosen_by_locality_readiness_and_capacity() {
    use_block(4);
    let dir = tmp("choice");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = ca_init(&dir);
    let cfg = dir.join("mesh.yaml");
    std::fs::write(&cfg, endpoint_choice_yaml("Healthy")).unwrap();
    for (c, tag) in [
        (10, "same-zone"),
        (11, "unready"),
        (12, "other-zone"),
        (13, "heavy"),
        (14, "light"),
    ] {
        tag_at(SocketAddr::new(ip(2, c), 9080), tag);
    }
    // Passthrough: what answers at the dialed VIP itself.
    tag_at(SocketAddr::new(ip(20, 42), 9080), "at-vip");
    let (a, b, socks_addr) = start_pair(&cfg, &ca);
    let dial = |vip: u8| {
        let (code, c) = socks(ip(1, 2), socks_addr, SocketAddr::new(ip(20, vip), 9080));
        assert_eq!(code, 0, "sleep -> VIP {vip}; A:\n{}", a.proc.log());
        read_all(c)
    };
    let tally = |vip: u8, n: usize| {
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..n {
            *seen.entry(dial(vip)).or_default() += 1;
        }
        seen.into_iter().collect::<Vec<_>>()
    };
    let counts = |v: &[(&str, usize)]| {
        v.iter()
            .map(|(t, n)| (t.to_string(), *n))
            .collect::<Vec<_>>()
    };

    // PreferClose: the ready endpoint in sleep's zone takes everything; the unready one in
    // the same zone and the one in another zone take nothing.
    assert_eq!(tally(40, 6), counts(&[("same-zone", 6)]));
    // Capacity 3 against 1: three of every four connections.
    assert_eq!(tally(41, 8), counts(&[("heavy", 6), ("light", 2)]));
    // Passthrough: no endpoint is chosen; the VIP itself is dialed.
    assert_eq!(tally(42, 2), counts(&[("at-vip", 2)]));
    // A service that allows all reaches an unready endpoint; one that does not has none.
    assert_eq!(tally(43, 2), counts(&[("unready", 2)]));
    let (code, _c) = socks(ip(1, 2), socks_addr, SocketAddr::new(ip(20, 44), 9080));
    assert_eq!(code, 4, "only an unready endpoint: host unreachable");
    common::wait_until(
        Duration::from_secs(5),
        || {
            a.proc
                .log()
                .contains("service dark.default.svc.cluster.local has no endpoint")
        },
        || format!("the refusal says why; A:\n{}", a.proc.log()),
    );

    // The same-zone endpoint stops being ready: failover to the other zone, still not to the
    // unready one beside it.
    let want = generation(&a) + 1;
    reload(&cfg, &endpoint_choice_yaml("Unhealthy"), &[&a, &b], want);
    assert_eq!(tally(40, 4), counts(&[("other-zone", 4)]));
    // The config dump shows what was read.
    let (_, dump) = http_get(a.admin, "GET", "/config_dump");
    for want in [
        "\"zone\":\"z2\"",
        "\"status\":\"Unhealthy\"",
        "\"capacity\":3",
        "\"healthPolicy\":\"AllowAll\"",
        "\"mode\":\"Passthrough\"",
    ] {
        assert!(
            dump.replace([' ', '\n'], "").contains(want),
            "{want} in /config_dump:\n{dump}"
        );
    }
}
