//! `zring waypoint` end to end on loopback: real node proxies (SOCKS5 source node, destination
//! node), a real waypoint, real HTTP servers; the seeds' bookinfo L7 examples from `examples/`.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use common::{
    ca_init, echo_at,
    http::{checksum, pattern, seen, server},
    logged_trace_id,
    mesh::{http_get, metric, socks, Node},
    tmp, wait_until, Proc,
};

fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::from([127, 0, net, host])
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/waypoint")
}

/// The bookinfo mesh on 127.0.`n`.x: sleep and notsleep on node-a; productpage, reviews-v1 and
/// -v2 on node-b (behind the waypoint); the waypoint on node-w. `reviews` is served by both
/// versions; `reviews-v1`/`reviews-v2` by one each (the HTTPRoute backends).
fn mesh(n: u8) -> String {
    let wl = |name: &str,
              sa: &str,
              host: u8,
              node: &str,
              rev: &str,
              services: &[&str],
              wp: bool| {
        let mut s = format!(
            "- uid: c//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {sa}\n  workloadIps: [\"127.0.{n}.{host}\"]\n  protocol: HBONE\n  node: {node}\n  canonicalName: {}\n  canonicalRevision: {rev}\n",
            name.split('-').next().unwrap()
        );
        if wp {
            s += &format!(
                "  waypoint:\n    destination: \"/127.0.{n}.20\"\n    hboneMtlsPort: 15008\n"
            );
        }
        s += "  services:\n";
        for svc in services {
            s += &format!("    \"default/{svc}.default.svc.cluster.local\":\n      9080: 9080\n");
        }
        if services.is_empty() {
            s = s.replace("  services:\n", "  services: {}\n");
        }
        s
    };
    let svc = |name: &str, vip: u8, wp: bool| {
        let mut s = format!(
            "- name: {name}\n  namespace: default\n  hostname: {name}.default.svc.cluster.local\n  vips: [\"/127.0.{n}.{vip}\"]\n  ports:\n    9080: 9080\n"
        );
        if wp {
            s += &format!(
                "  waypoint:\n    destination: \"/127.0.{n}.20\"\n    hboneMtlsPort: 15008\n"
            );
        }
        s
    };
    let mut y = String::from("workloads:\n");
    y += &wl("sleep", "sleep", 2, "node-a", "v1", &[], false);
    y += &wl("notsleep", "notsleep", 3, "node-a", "v1", &[], false);
    y += &wl(
        "productpage-v1",
        "bookinfo-productpage",
        10,
        "node-b",
        "v1",
        &["productpage"],
        true,
    );
    y += &wl(
        "reviews-v1",
        "bookinfo-reviews",
        11,
        "node-b",
        "v1",
        &["reviews", "reviews-v1"],
        true,
    );
    y += &wl(
        "reviews-v2",
        "bookinfo-reviews",
        12,
        "node-b",
        "v2",
        &["reviews", "reviews-v2"],
        true,
    );
    y += &wl(
        "ext-authz-v1",
        "ext-authz",
        13,
        "node-b",
        "v1",
        &["ext-authz"],
        false,
    );
    y += &wl(
        "waypoint",
        "bookinfo-waypoint",
        20,
        "node-w",
        "v1",
        &[],
        false,
    );
    y += "services:\n";
    y += &svc("productpage", 100, true);
    y += &svc("reviews", 101, true);
    y += &svc("reviews-v1", 102, false);
    y += &svc("reviews-v2", 103, false);
    y += &svc("ext-authz", 104, false);
    y
}

struct Lab {
    n: u8,
    dir: PathBuf,
    resources: PathBuf,
    a: Node,
    b: Node,
    w: Node,
}

impl Lab {
    /// Start the mesh; the waypoint reads `resources` (a folder) as its L7 config.
    fn start(n: u8, tag: &str, files: &[(&str, &Path)]) -> Lab {
        Lab::start_with(n, tag, files, &[])
    }

    /// `start`, with more arguments for the waypoint.
    fn start_with(n: u8, tag: &str, files: &[(&str, &Path)], wp_args: &[&str]) -> Lab {
        let dir = tmp(tag);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = ca_init(&dir);
        let cfg = dir.join("mesh.yaml");
        std::fs::write(&cfg, mesh(n)).unwrap();
        let resources = dir.join("resources");
        std::fs::create_dir_all(&resources).unwrap();
        for (name, src) in files {
            std::fs::copy(src, resources.join(name)).unwrap();
        }
        let socks5 = SocketAddr::new(ip(n, 1), 15080).to_string();
        let mut a = Node::start(
            "node-a",
            ip(n, 1),
            &cfg,
            &ca,
            &["--socks5", &socks5, "--bind-source"],
        );
        let mut b = Node::start("node-b", ip(n, 5), &cfg, &ca, &["--bind-source"]);
        let w = waypoint_node(n, &cfg, &ca, &resources, wp_args);
        a.wait_ready();
        b.wait_ready();
        let mut lab = Lab {
            n,
            dir,
            resources,
            a,
            b,
            w,
        };
        lab.w.wait_ready();
        lab
    }

    /// Rewrite the mesh with `edit` and wait until all three proxies have it in force (the
    /// config generation they count after a SIGHUP, starting at 1).
    fn remesh(&self, generation: &mut u32, edit: &dyn Fn(String) -> String) {
        *generation += 1;
        std::fs::write(self.dir.join("mesh.yaml"), edit(mesh(self.n))).unwrap();
        for node in [&self.a, &self.b, &self.w] {
            node.proc.signal(1);
            let want = format!("zring_config_generation {generation}");
            wait_until(
                Duration::from_secs(10),
                || node.metrics().lines().any(|l| l == want),
                || node.proc.log(),
            );
        }
    }

    /// Write DestinationRule `reviews` with `traffic_policy` (indented under
    /// `trafficPolicy:`) and wait until the waypoint's config dump shows `marker`.
    fn reviews_dr(&self, traffic_policy: &str, marker: &str) {
        std::fs::write(
            self.resources.join("reviews-dr.yaml"),
            format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  host: reviews\n  trafficPolicy:\n{traffic_policy}"),
        )
        .unwrap();
        wait_until(
            Duration::from_secs(10),
            || config_dump(self).contains(marker),
            || config_dump(self),
        );
    }

    /// Which reviews version served each of `k` GETs on one keep-alive connection from sleep.
    fn tally(&self, k: usize) -> Vec<(String, usize)> {
        let mut c = self.client(2, self.vip(101));
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..k {
            c.send(b"GET /reviews/0 HTTP/1.1\r\nHost: reviews:9080\r\n\r\n");
            let r = c.read();
            assert_eq!(r.status, 200, "{}", r.text());
            *seen
                .entry(r.header("x-served-by").unwrap_or_default().to_string())
                .or_default() += 1;
        }
        seen.into_iter().collect()
    }

    fn socks5(&self) -> SocketAddr {
        SocketAddr::new(ip(self.n, 1), 15080)
    }

    fn vip(&self, host: u8) -> SocketAddr {
        SocketAddr::new(ip(self.n, host), 9080)
    }

    /// A keep-alive HTTP/1.1 connection from workload `src` (2 sleep, 3 notsleep) to `dst`.
    fn client(&self, src: u8, dst: SocketAddr) -> Client {
        let (code, s) = socks(ip(self.n, src), self.socks5(), dst);
        assert_eq!(code, 0, "SOCKS5 refused:\n{}", self.a.proc.log());
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        Client {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }
}

fn waypoint_node(n: u8, cfg: &Path, ca: &Path, resources: &Path, more: &[&str]) -> Node {
    let mut extra = vec![
        "--bind-source",
        "--resources",
        resources.to_str().unwrap(),
        "--gateway-name",
        "bookinfo-productpage",
        "--ejection-time",
        "30s",
        "--idle-timeout",
        "3s",
    ];
    extra.extend_from_slice(more);
    Node::start_cmd("waypoint", "node-w", ip(n, 20), cfg, Some(ca), &extra)
}

struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Client {
    fn send(&mut self, raw: &[u8]) {
        self.w.write_all(raw).unwrap();
    }

    fn request(&mut self, method: &str, path: &str, body: &[u8]) -> Reply {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: reviews:9080\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.send(head.as_bytes());
        self.send(body);
        self.read()
    }

    /// A bodyless request for `target` (origin or absolute form) with `Host: host`.
    fn request_to(&mut self, method: &str, target: &str, host: &str) -> Reply {
        self.send(format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
        self.read()
    }

    /// One response (content-length or chunked body).
    fn read(&mut self) -> Reply {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            self.r.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap();
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let mut reply = Reply {
            status,
            headers,
            body: Vec::new(),
        };
        if status == 100 || status == 101 {
            return reply;
        }
        if let Some(n) = reply.header("content-length") {
            let mut b = vec![0u8; n.parse().unwrap()];
            self.r.read_exact(&mut b).unwrap();
            reply.body = b;
        } else if reply
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
        {
            loop {
                let mut size = String::new();
                self.r.read_line(&mut size).unwrap();
                let n = usize::from_str_radix(size.trim(), 16).unwrap();
                let mut chunk = vec![0u8; n + 2];
                self.r.read_exact(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                reply.body.extend_from_slice(&chunk[..n]);
            }
        }
        reply
    }
}

/// The share of `n` requests to reviews that v2 served, in percent.
fn v2_share(lab: &Lab, n: usize) -> f64 {
    let mut c = lab.client(2, lab.vip(101));
    let mut v2 = 0;
    for i in 0..n {
        let r = c.request("GET", "/reviews", b"");
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        match r.header("x-served-by") {
            Some("reviews-v2") => v2 += 1,
            Some("reviews-v1") => {}
            other => panic!("served by {other:?}"),
        }
    }
    v2 as f64 * 100.0 / n as f64
}

/// `zring tunnel client` on `listen` with sleep's certificate: HBONE to `server`, CONNECT to
/// `target`, expecting the server to present `expect_sa`'s identity (a client that skips the
/// node proxy, and so the waypoint).
fn sleep_tunnel(
    lab: &Lab,
    listen: SocketAddr,
    server: SocketAddr,
    target: SocketAddr,
    expect_sa: &str,
) -> Proc {
    common::tunnel_client(
        &lab.dir.join("ca"),
        listen,
        "spiffe://cluster.local/ns/default/sa/sleep",
        server,
        target,
        &format!("spiffe://cluster.local/ns/default/sa/{expect_sa}"),
    )
}

fn config_dump(lab: &Lab) -> String {
    http_get(lab.w.admin, "GET", "/config_dump").1
}

#[test]
fn bookinfo_l7_examples_split_traffic_and_enforce_the_get_only_policy() {
    let lab = Lab::start(
        77,
        "wp-bookinfo",
        &[
            ("reviews.yaml", &examples().join("istio/reviews-90-10.yaml")),
            (
                "policy.yaml",
                &examples().join("istio/productpage-viewer.yaml"),
            ),
        ],
    );
    let n = lab.n;
    for (name, host) in [
        ("productpage-v1", 10),
        ("reviews-v1", 11),
        ("reviews-v2", 12),
    ] {
        server(SocketAddr::new(ip(n, host), 9080), name);
    }
    // The seeds' policy: sleep may GET productpage; POST from sleep and anything from notsleep
    // are refused by the waypoint with 403.
    let mut sleep = lab.client(2, lab.vip(100));
    let r = sleep.request("GET", "/productpage", b"");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), lab.w.proc.log());
    assert_eq!(r.text(), "productpage-v1 GET /productpage");
    let r = sleep.request("POST", "/productpage", b"x=1");
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "RBAC: access denied");
    let r = sleep.request("GET", "/productpage", b"");
    assert_eq!(r.status, 200, "the connection survives a denied request");
    let mut notsleep = lab.client(3, lab.vip(100));
    assert_eq!(notsleep.request("GET", "/productpage", b"").status, 403);

    // The VirtualService over DestinationRule subsets: 90/10 within 3 points over 2000.
    let share = v2_share(&lab, 2000);
    assert!(
        (7.0..=13.0).contains(&share),
        "v2 got {share}% (want 10 +- 3)"
    );

    // The destination node saw the waypoint's identity, not sleep's (its connections are
    // pooled and still open: counted as opened, logged when they close).
    let from = |who: &str| {
        metric(
            &lab.b.metrics(),
            "istio_tcp_connections_opened_total",
            &[&format!(
                "source_principal=\"spiffe://cluster.local/ns/default/sa/{who}\""
            )],
        )
        .unwrap_or(0)
    };
    assert!(from("bookinfo-waypoint") >= 1, "{}", lab.b.metrics());
    assert_eq!(from("sleep"), 0, "{}", lab.b.metrics());
    // A client that skips the waypoint (a tunnel straight to node-b with sleep's certificate)
    // is refused by the destination node.
    let tunnel = SocketAddr::new(ip(n, 2), 18080);
    let _bypass = sleep_tunnel(
        &lab,
        tunnel,
        SocketAddr::new(ip(n, 10), 15008),
        SocketAddr::new(ip(n, 10), 9080),
        "bookinfo-productpage",
    );
    let (st, _) = http_get(tunnel, "GET", "/productpage");
    assert_ne!(st, 200, "the bypass was served");
    wait_until(
        Duration::from_secs(5),
        || lab.b.proc.log().contains("bypassed"),
        || lab.b.proc.log(),
    );

    // A CONNECT to the waypoint's own address would loop back into it: refused.
    let own = SocketAddr::new(ip(n, 2), 18081);
    let own_hbone = SocketAddr::new(ip(n, 20), 15008);
    let _self_loop = sleep_tunnel(&lab, own, own_hbone, own_hbone, "bookinfo-waypoint");
    assert_ne!(http_get(own, "GET", "/").0, 200);
    wait_until(
        Duration::from_secs(5),
        || lab.w.proc.log().contains("own_address"),
        || lab.w.proc.log(),
    );

    // Telemetry: Istio's request metrics with reporter="waypoint", and access-log lines.
    let m = lab.w.metrics();
    let denied = metric(
        &m,
        "istio_requests_total",
        &["reporter=\"waypoint\"", "response_code=\"403\""],
    );
    assert_eq!(denied, Some(2), "{m}");
    let ok = metric(
        &m,
        "istio_requests_total",
        &[
            "reporter=\"waypoint\"",
            "response_code=\"200\"",
            "destination_service=\"reviews.default.svc.cluster.local\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
        ],
    );
    assert_eq!(ok, Some(2000), "{m}");
    assert!(m.contains("istio_request_duration_milliseconds_bucket{"));
    let log = lab.w.proc.log();
    assert!(
        log.contains("request complete") && log.contains("status=403"),
        "{log}"
    );

    // Today's forms (HTTPRoute + targetRefs policy), swapped in while running.
    for f in ["reviews.yaml", "policy.yaml"] {
        std::fs::remove_file(lab.resources.join(f)).unwrap();
    }
    std::fs::copy(
        examples().join("gateway-api/reviews-90-10.yaml"),
        lab.resources.join("route.yaml"),
    )
    .unwrap();
    std::fs::copy(
        examples().join("gateway-api/productpage-viewer.yaml"),
        lab.resources.join("policy.yaml"),
    )
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        || config_dump(&lab).contains("HTTPRoute default/reviews"),
        || config_dump(&lab),
    );
    let share = v2_share(&lab, 2000);
    assert!(
        (7.0..=13.0).contains(&share),
        "v2 got {share}% (want 10 +- 3)"
    );
    let mut sleep = lab.client(2, lab.vip(100));
    assert_eq!(sleep.request("GET", "/productpage", b"").status, 200);
    assert_eq!(sleep.request("POST", "/productpage", b"").status, 403);
    assert_eq!(
        lab.client(3, lab.vip(100))
            .request("GET", "/productpage", b"")
            .status,
        403
    );

    // A bad file is refused, named, and the rules in force stay.
    std::fs::write(
        lab.resources.join("zz-bad.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: broken}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n      weight: lots\n",
    )
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        || {
            metric(
                &lab.w.metrics(),
                "zring_waypoint_reloads_total",
                &["failure"],
            ) == Some(1)
        },
        || lab.w.proc.log(),
    );
    let log = lab.w.proc.log();
    assert!(
        log.contains("zz-bad.yaml: VirtualService default/broken: spec.http[0].route[0].weight"),
        "{log}"
    );
    assert!(config_dump(&lab).contains("HTTPRoute default/reviews"));
    assert_eq!(sleep.request("POST", "/productpage", b"").status, 403);
}

#[test]
fn a_routes_timeout_cuts_a_stalled_response_body_and_the_default_does_not() {
    let res = tmp("wp-timeout-res");
    std::fs::create_dir_all(&res).unwrap();
    let vs = res.join("productpage.yaml");
    // `/slow` has `0s` (no limit at all, as Envoy reads it); everything else 1 s.
    std::fs::write(
        &vs,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: productpage, namespace: default}\nspec:\n  hosts: [productpage]\n  http:\n  - match: [{uri: {prefix: /slow}}]\n    timeout: 0s\n    route:\n    - destination: {host: productpage}\n  - timeout: 1s\n    route:\n    - destination: {host: productpage}\n",
    )
    .unwrap();
    // The default (no route: reviews) bounds the response head at 1 s.
    let lab = Lab::start_with(
        76,
        "wp-timeout",
        &[("productpage.yaml", &vs)],
        &["--request-timeout", "1s"],
    );
    let n = lab.n;
    server(SocketAddr::new(ip(n, 10), 9080), "productpage-v1");
    server(SocketAddr::new(ip(n, 11), 9080), "reviews-v1");
    let stall =
        b"POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
    let flagged = |path: &str, flags: &str| {
        let log = lab.w.proc.log();
        log.lines().any(|l| {
            l.contains("request complete")
                && l.contains(path)
                && (l.contains(&format!("response_flags=\"{flags}\""))
                    || l.contains(&format!("response_flags={flags}")))
        })
    };

    // The route's 1 s covers the whole response: the head and the first chunk arrive, then the
    // body stalls (the client stops sending) and the waypoint cuts it.
    let mut c = lab.client(2, lab.vip(100));
    let t0 = std::time::Instant::now();
    c.send(stall);
    assert_eq!(read_head(&mut c), 200);
    assert_eq!(read_chunk(&mut c).as_deref(), Some(&b"hello"[..]));
    let mut rest = Vec::new();
    let end = c.r.read_to_end(&mut rest);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(6),
        "cut after {took:?} ({end:?}, {rest:?})"
    );
    assert!(
        !String::from_utf8_lossy(&rest).contains("0\r\n\r\n"),
        "the body must not look complete: {rest:?}"
    );
    wait_until(
        Duration::from_secs(5),
        || flagged("/echo", "UT"),
        || lab.w.proc.log(),
    );

    // No route timeout: `--request-timeout` (1 s here) bounds the response head only, so a
    // body that pauses for 2 s still completes...
    let mut c = lab.client(2, lab.vip(101));
    c.send(stall);
    assert_eq!(read_head(&mut c), 200);
    assert_eq!(read_chunk(&mut c).as_deref(), Some(&b"hello"[..]));
    std::thread::sleep(Duration::from_millis(2000));
    c.send(b"6\r\n world\r\n0\r\n\r\n");
    assert_eq!(read_chunk(&mut c).as_deref(), Some(&b" world"[..]));
    assert_eq!(read_chunk(&mut c), None, "the body ends normally");
    // ...and a head later than that is answered 504.
    let mut c = lab.client(2, lab.vip(101));
    let r = c.request("GET", "/slow?ms=2000", b"");
    assert_eq!(r.status, 504, "{}", r.text());
    wait_until(
        Duration::from_secs(5),
        || flagged("/slow", "UT"),
        || lab.w.proc.log(),
    );

    // A route's `timeout: 0s` lifts the limit: a head after 2 s (twice the default) arrives.
    let mut c = lab.client(2, lab.vip(100));
    let r = c.request("GET", "/slow?ms=2000", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "productpage-v1 GET /slow");
    let _ = std::fs::remove_dir_all(&res);
}

/// A response's status, its head read up to the blank line.
fn read_head(c: &mut Client) -> u16 {
    let mut line = String::new();
    c.r.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    loop {
        let mut h = String::new();
        c.r.read_line(&mut h).unwrap();
        if h.trim_end().is_empty() {
            break;
        }
    }
    status.unwrap_or_else(|| panic!("bad status line {line:?}"))
}

/// The next chunk of a chunked body; None at its last chunk.
fn read_chunk(c: &mut Client) -> Option<Vec<u8>> {
    let mut size = String::new();
    c.r.read_line(&mut size).unwrap();
    let len = usize::from_str_radix(size.trim_end(), 16)
        .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
    let mut data = vec![0u8; len + 2];
    c.r.read_exact(&mut data).unwrap();
    data.truncate(len);
    (len > 0).then_some(data)
}

#[test]
fn a_dead_endpoint_is_retried_elsewhere_and_all_dead_is_503() {
    let lab = Lab::start(78, "wp-retry", &[]);
    let n = lab.n;
    // reviews-v2 has no server: its node answers 503 to the waypoint's CONNECT.
    server(SocketAddr::new(ip(n, 11), 9080), "reviews-v1");
    let mut c = lab.client(2, lab.vip(101));
    for i in 0..20 {
        let r = c.request("GET", "/r", b"");
        assert_eq!(
            r.status,
            200,
            "request {i}: {}\n{}",
            r.text(),
            lab.w.proc.log()
        );
        assert_eq!(r.header("x-served-by"), Some("reviews-v1"));
    }
    let m = lab.w.metrics();
    assert!(
        metric(&m, "zring_waypoint_retries_total", &[]).unwrap_or(0) >= 1,
        "{m}"
    );
    assert!(metric(&m, "zring_waypoint_ejections_total", &[]).unwrap_or(0) >= 1);
    // productpage has no server at all: 503 with Envoy's upstream-failure flag.
    let mut c = lab.client(2, lab.vip(100));
    let r = c.request("GET", "/productpage", b"");
    assert_eq!(r.status, 503, "{}", r.text());
    let m = lab.w.metrics();
    assert_eq!(
        metric(
            &m,
            "istio_requests_total",
            &["response_code=\"503\"", "response_flags=\"UF\""]
        ),
        Some(1),
        "{m}"
    );
    let log = lab.w.proc.log();
    assert!(
        log.contains("status=503") && log.contains("response_flags=\"UF\"")
            || log.contains("response_flags=UF"),
        "{log}"
    );
}

/// Write `text` as the only resource file `name` of a test's own folder.
fn resource(tag: &str, name: &str, text: &str) -> PathBuf {
    let dir = tmp(tag);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A DestinationRule's `outlierDetection`: an endpoint answering 500 is ejected after two in a
/// row and the rest of the requests go to the healthy one; without the rule the failing
/// endpoint keeps getting its share.
#[test]
fn outlier_detection_ejects_an_endpoint_that_keeps_failing() {
    let dr = resource(
        "wp-outlier-res",
        "reviews-dr.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: default}\nspec:\n  host: reviews\n  trafficPolicy:\n    tls: {mode: ISTIO_MUTUAL}\n    outlierDetection:\n      consecutive5xxErrors: 2\n      interval: 1s\n      baseEjectionTime: 60s\n      maxEjectionPercent: 100\n",
    );
    let lab = Lab::start(74, "wp-outlier", &[("reviews-dr.yaml", &dr)]);
    let n = lab.n;
    server(SocketAddr::new(ip(n, 11), 9080), "reviews-v1");
    server(SocketAddr::new(ip(n, 12), 9080), "reviews-v2");
    // reviews-v2 answers 500 to `/fail` (500 is not in the default retry conditions).
    let served = |c: &mut Client, count: usize| {
        let mut failed = 0;
        for _ in 0..count {
            let r = c.request("GET", "/fail?reviews-v2=500", b"");
            match (r.status, r.header("x-served-by")) {
                (200, Some("reviews-v1")) => {}
                (500, Some("reviews-v2")) => failed += 1,
                other => panic!("unexpected {other:?}: {}", r.text()),
            }
        }
        failed
    };
    let mut c = lab.client(2, lab.vip(101));
    assert_eq!(
        served(&mut c, 30),
        2,
        "two 500s in a row eject reviews-v2 for 60 s\n{}",
        lab.w.proc.log()
    );
    let m = lab.w.metrics();
    assert_eq!(
        metric(&m, "zring_waypoint_ejections_total", &[]),
        Some(1),
        "{m}"
    );
    assert!(lab
        .w
        .proc
        .log()
        .contains("endpoint ejected by outlier detection"));
    assert!(
        config_dump(&lab).contains("\"consecutive5xxErrors\": 2"),
        "{}",
        config_dump(&lab)
    );

    // The same rule without outlier detection (reloaded while running): nothing keeps
    // reviews-v2 out any more, so it gets its round-robin share of the requests again.
    std::fs::write(
        lab.resources.join("reviews-dr.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: default}\nspec:\n  host: reviews\n  trafficPolicy:\n    tls: {mode: ISTIO_MUTUAL}\n",
    )
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        || !config_dump(&lab).contains("consecutive5xxErrors"),
        || config_dump(&lab),
    );
    let failed = served(&mut c, 30);
    assert!(
        (10..=20).contains(&failed),
        "{failed} of 30 failed without outlier detection"
    );
}

/// A DestinationRule's `connectionPool` (Istio's circuit-breaking example): one request in
/// flight, one waiting, the third refused at once with 503 `UO`; and an upstream connection
/// per request with `maxRequestsPerConnection: 1`.
/// Runs `f` on a current-thread tokio runtime with an HTTP/2 (h2c, prior knowledge) client
/// connection from the client pod to `dst` through the source node's SOCKS5 port.
fn with_h2c<B, F, Fut>(lab: &Lab, dst: SocketAddr, f: F)
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: FnOnce(hyper::client::conn::http2::SendRequest<B>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (code, s) = socks(ip(lab.n, 2), lab.socks5(), dst);
    assert_eq!(code, 0, "SOCKS5 refused:\n{}", lab.a.proc.log());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        s.set_nonblocking(true).unwrap();
        let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::from_std(s).unwrap());
        let (send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(conn);
        f(send).await;
    });
}

#[test]
fn connection_pool_limits_queue_then_refuse_and_retire_connections() {
    let dr = resource(
        "wp-pool-res",
        "productpage-dr.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: productpage, namespace: default}\nspec:\n  host: productpage\n  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnections: 1, connectTimeout: 2s}\n      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 2}\n",
    );
    let lab = Lab::start(75, "wp-pool", &[("productpage-dr.yaml", &dr)]);
    let n = lab.n;
    server(SocketAddr::new(ip(n, 10), 9080), "productpage-v1");
    let opened = || {
        metric(
            &lab.b.metrics(),
            "istio_tcp_connections_opened_total",
            &["source_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-waypoint\""],
        )
        .unwrap_or(0)
    };

    // Three clients at once, each asking for an answer that takes 1.5 s.
    let clients: Vec<Client> = (0..3).map(|_| lab.client(2, lab.vip(100))).collect();
    let t0 = std::time::Instant::now();
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200 * i as u64));
                let r = c.request("GET", "/slow?ms=1500", b"");
                (r.status, r.text(), t0.elapsed())
            })
        })
        .collect();
    let mut results: Vec<(u16, String, Duration)> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    results.sort_by_key(|r| r.2);
    let statuses: Vec<u16> = results.iter().map(|r| r.0).collect();
    assert_eq!(
        statuses,
        [503, 200, 200],
        "{results:?}\n{}",
        lab.w.proc.log()
    );
    assert!(
        results[0].1.contains("overflow") && results[0].2 < Duration::from_millis(1200),
        "refused at once: {results:?}"
    );
    assert!(
        results[2].2 >= Duration::from_millis(2900),
        "the second request waited for the first: {results:?}"
    );
    let m = lab.w.metrics();
    assert_eq!(
        metric(
            &m,
            "istio_requests_total",
            &["response_code=\"503\"", "response_flags=\"UO\""]
        ),
        Some(1),
        "{m}"
    );
    assert_eq!(metric(&m, "zring_waypoint_overflows_total", &[]), Some(1));

    // maxRequestsPerConnection: 2: an upstream connection is retired after its second
    // request, so four requests open two.
    let before = opened();
    let mut c = lab.client(2, lab.vip(100));
    for _ in 0..4 {
        assert_eq!(c.request("GET", "/p", b"").status, 200);
    }
    wait_until(
        Duration::from_secs(5),
        || opened() == before + 2,
        || format!("opened {} (before {before})\n{}", opened(), lab.b.metrics()),
    );

    // The same over HTTP/2 (h2c from the client, so h2 upstream): the shared upstream
    // connection takes no new stream after its second, so four requests on one client
    // connection open two upstream connections.
    let before = opened();
    with_h2c(&lab, lab.vip(100), |mut send| async move {
        for i in 0..4 {
            let req = hyper::Request::get(format!("http://productpage:9080/h2/{i}"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200, "h2 request {i}");
        }
    });
    wait_until(
        Duration::from_secs(5),
        || opened() == before + 2,
        || {
            format!(
                "h2: opened {} (before {before})\n{}",
                opened(),
                lab.b.metrics()
            )
        },
    );
}

#[test]
fn http1_edge_cases_websocket_and_h2c_pass_byte_exact() {
    let lab = Lab::start(79, "wp-edge", &[]);
    let n = lab.n;
    server(SocketAddr::new(ip(n, 10), 9080), "productpage-v1");
    let dst = lab.vip(100);

    // 10 MiB each way, content-length up and down.
    let mut c = lab.client(2, dst);
    let big = pattern(10 << 20);
    let r = c.request("POST", "/echo", &big);
    assert_eq!(r.status, 200);
    assert!(r.body == big, "10 MiB echo differs");
    let r = c.request("GET", "/big?n=10485760", b"");
    assert!(r.body == big, "10 MiB download differs");

    // Not HTTP (binary, server answers): relayed as TCP by the workload waypoint, byte exact
    // in both directions through small and bulk writes, and the half-close crosses.
    let echo = echo_at(SocketAddr::new(ip(n, 10), 9090));
    let (code, mut t) = socks(ip(n, 2), lab.socks5(), echo);
    assert_eq!(code, 0, "SOCKS5 refused:\n{}", lab.a.proc.log());
    t.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    for len in [5usize, 1 << 20, 1, 70_000, 3] {
        let mut out = pattern(len);
        out[0] = 0x01; // never an HTTP method
        let reader = {
            let mut r = t.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut back = vec![0u8; len];
                r.read_exact(&mut back).map(|_| back)
            })
        };
        t.write_all(&out).unwrap();
        let back = reader.join().unwrap().unwrap();
        assert!(
            back == out,
            "{len} B through the waypoint's TCP relay differ"
        );
    }
    t.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let end = t.read_to_end(&mut rest);
    assert!(
        end.is_ok() && rest.is_empty(),
        "the half-close must come back as EOF: {end:?}"
    );
    // The waypoint's access line counts every byte, both ways.
    let total = [5usize, 1 << 20, 1, 70_000, 3].iter().sum::<usize>();
    wait_until(
        Duration::from_secs(5),
        || {
            let log = lab.w.proc.log();
            log.contains(&format!("bytes_sent={total}"))
                && log.contains(&format!("bytes_recv={total}"))
        },
        || lab.w.proc.log(),
    );

    // The client's trace crosses the waypoint: the destination's access line for the TCP
    // connection carries the trace id the source node sent on its CONNECT.
    drop(t);
    wait_until(
        Duration::from_secs(5),
        || trace_id_of(&lab.a.proc.log(), ":9090").is_some(),
        || {
            format!(
                "no access line with a trace id at the source:\n{}",
                lab.a.proc.log()
            )
        },
    );
    let sent = trace_id_of(&lab.a.proc.log(), ":9090").unwrap_or_default();
    wait_until(
        Duration::from_secs(5),
        || trace_id_of(&lab.b.proc.log(), ":9090").as_deref() == Some(sent.as_str()),
        || {
            format!(
                "trace id {sent} not at the destination:\n{}",
                lab.b.proc.log()
            )
        },
    );

    // Chunked request body, pipelined requests, Expect: 100-continue.
    c.send(b"POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
    assert_eq!(c.read().body, b"hello world");
    c.send(b"GET /a HTTP/1.1\r\nHost: p\r\n\r\nGET /b HTTP/1.1\r\nHost: p\r\n\r\nGET /c HTTP/1.1\r\nHost: p\r\n\r\n");
    for p in ["/a", "/b", "/c"] {
        assert_eq!(c.read().text(), format!("productpage-v1 GET {p}"));
    }
    c.send(b"POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n");
    let first = c.read();
    assert_eq!(first.status, 100, "no 100 Continue");
    c.send(b"ping");
    assert_eq!(c.read().body, b"ping");

    // A websocket upgrade: 101, then raw bytes both ways.
    let mut ws = lab.client(2, dst);
    ws.send(b"GET /ws HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n");
    let r = ws.read();
    assert_eq!(r.status, 101);
    ws.send(b"\x81\x05hello");
    let mut back = [0u8; 7];
    ws.r.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"\x81\x05hello");

    // Malformed HTTP in one stream: 400, that stream closed; another stream is unaffected.
    let mut bad = lab.client(2, dst);
    bad.send(b"GET / HTTP/1.1\r\nHost: p\r\nBad Header Without Colon\r\n\r\n");
    assert_eq!(bad.read().status, 400);
    let mut rest = Vec::new();
    let closed = bad.r.read_to_end(&mut rest);
    assert!(
        closed.is_ok() && rest.is_empty(),
        "after the 400 the stream must end (EOF, nothing more): {closed:?}, {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert_eq!(c.request("GET", "/after", b"").status, 200);

    // h2c (prior knowledge), gRPC-style: unary and a stream of messages echoed, trailers kept.
    with_h2c(&lab, dst, |mut send| async move {
        use http_body_util::BodyExt;
        // Unary.
        let msg = bytes::Bytes::from_static(b"\x00\x00\x00\x00\x05hello");
        let req = hyper::Request::post("http://productpage:9080/grpc.Echo/Unary")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(
                http_body_util::Full::new(msg.clone())
                    .map_err(|e: std::convert::Infallible| -> std::io::Error { match e {} })
                    .boxed(),
            )
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.unwrap();
        assert_eq!(
            collected
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
        assert_eq!(collected.to_bytes(), msg);
        // Streaming: each message sent only after the previous one came back.
        let (mut tx, rx) = futures_channel_pair();
        let body = http_body_util::StreamBody::new(rx).boxed();
        let req = hyper::Request::post("http://productpage:9080/grpc.Echo/Stream")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let mut body = resp.into_body();
        for i in 0..5u8 {
            let m = bytes::Bytes::from(vec![0, 0, 0, 0, 1, i]);
            tx.send(m.clone()).await;
            let mut got = Vec::new();
            while got.len() < m.len() {
                let f = body.frame().await.unwrap().unwrap();
                if let Ok(d) = f.into_data() {
                    got.extend_from_slice(&d);
                }
            }
            assert_eq!(got, m.to_vec(), "message {i}");
        }
        drop(tx);
        let mut trailers = None;
        while let Some(f) = body.frame().await {
            if let Ok(t) = f.unwrap().into_trailers() {
                trailers = Some(t);
            }
        }
        assert_eq!(
            trailers.and_then(|t| t.get("grpc-status").cloned()),
            Some(http::HeaderValue::from_static("0"))
        );
    });
    let m = lab.w.metrics();
    assert!(
        metric(&m, "istio_requests_total", &["request_protocol=\"grpc\""]).unwrap_or(0) >= 2,
        "{m}"
    );

    // A slow client (a request head that never ends) is closed at the idle limit (3 s here);
    // the other connections are not disturbed.
    let mut slow = lab.client(2, dst);
    slow.send(b"GET /slow HTTP/1.1\r\nHost: p\r\nX-Slow: ");
    let t = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = slow.r.read_to_end(&mut rest);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(10),
        "slow client closed after {waited:?}"
    );
    let mut c = lab.client(2, dst);
    assert_eq!(c.request("GET", "/fine", b"").status, 200);
}

/// A channel whose receiver is a stream of body frames.
struct Tx(tokio::sync::mpsc::Sender<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>);

impl Tx {
    async fn send(&mut self, b: bytes::Bytes) {
        self.0.send(Ok(hyper::body::Frame::data(b))).await.unwrap();
    }
}

fn futures_channel_pair() -> (
    Tx,
    tokio_stream_compat::ReceiverStream<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    (Tx(tx), tokio_stream_compat::ReceiverStream::new(rx))
}

use tokio_stream::wrappers as tokio_stream_compat;

/// The `trace_id` of the first access line in `log` whose destination address ends with `port`
/// (e.g. ":9090").
fn trace_id_of(log: &str, port: &str) -> Option<String> {
    logged_trace_id(log, |l| {
        l.split_whitespace()
            .any(|f| f.starts_with("dst.addr=") && f.trim_end_matches('"').ends_with(port))
    })
}

/// A VirtualService for `reviews` with these `http` rules (YAML list items at indent 2).
fn reviews_vs(http: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  hosts: [reviews]\n  http:\n{http}")
}

/// An HTTPRoute for the `reviews` Service with these `rules` (YAML list items at indent 2).
fn reviews_route(rules: &str) -> String {
    format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: reviews, port: 9080}}]\n  rules:\n{rules}")
}

/// Replace the lab's VirtualService for `reviews` by `route` (an HTTPRoute's file text) and wait
/// until the HTTPRoute alone is in force.
fn swap_to_route(lab: &Lab, route: &str) {
    let _ = std::fs::remove_file(lab.resources.join("reviews.yaml"));
    std::fs::write(lab.resources.join("reviews-route.yaml"), route).unwrap();
    wait_until(
        Duration::from_secs(10),
        || {
            let dump = config_dump(lab);
            dump.contains("HTTPRoute default/reviews")
                && !dump.contains("VirtualService default/reviews")
                && dump.contains("\"lastError\": null")
        },
        || config_dump(lab),
    );
}

/// A lab whose waypoint routes `reviews` by a VirtualService with these `http` rules, with
/// reviews-v1 serving, and a keep-alive client from sleep to reviews.
fn reviews_lab(n: u8, tag: &str, http: &str) -> (Lab, Client) {
    let vs = resource(&format!("{tag}-res"), "reviews.yaml", &reviews_vs(http));
    let lab = Lab::start(n, tag, &[("reviews.yaml", &vs)]);
    server(SocketAddr::new(ip(n, 11), 9080), "reviews-v1");
    let c = lab.client(2, lab.vip(101));
    (lab, c)
}

/// Header changes in both generations of route: a VirtualService's `headers` on the rule and on
/// the destination (the rule's `set` wins over the destination's, as Envoy orders them; `host`
/// rewrites the authority) and an HTTPRoute's header modifier filters on the rule and on the
/// backendRef; the server sees the changed request, the client the changed response, also on
/// the waypoint's own 503. A route with a filter zring does not implement is refused by name and
/// the last good rules stay.
#[test]
fn routes_change_request_and_response_headers() {
    let (lab, mut c) = reviews_lab(
        73,
        "wp-headers",
        r#"  - match: [{uri: {prefix: /headers}}]
    headers:
      request:
        set: {x-env: prod, host: reviews-v1.default.svc.cluster.local}
        add: {x-tag: route}
        remove: [x-secret]
      response:
        set: {x-route: headers}
        remove: [x-internal]
    route:
    - destination: {host: reviews-v1}
      headers:
        request: {set: {x-env: canary, x-dest: v1}}
        response: {add: {x-dest: v1}}
  - headers:
      response: {set: {x-route: fallback}}
    route:
    - destination: {host: productpage}
"#,
    );
    c.send(b"GET /headers HTTP/1.1\r\nHost: reviews:9080\r\nx-tag: client\r\nx-secret: s3cr3t\r\nx-env: client\r\nx-keep: yes\r\n\r\n");
    let r = c.read();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), lab.w.proc.log());
    let seen = r.text();
    let lines: Vec<&str> = seen.lines().collect();
    let all = |name: &str| -> Vec<&str> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("{name}: ")))
            .collect()
    };
    assert_eq!(all("x-env"), ["prod"], "the rule's set wins:\n{seen}");
    assert_eq!(all("x-dest"), ["v1"], "{seen}");
    assert_eq!(all("x-tag"), ["client", "route"], "{seen}");
    assert_eq!(all("x-secret"), Vec::<&str>::new(), "{seen}");
    assert_eq!(all("x-keep"), ["yes"], "{seen}");
    assert_eq!(
        all("host"),
        ["reviews-v1.default.svc.cluster.local"],
        "{seen}"
    );
    assert_eq!(r.header("x-route"), Some("headers"));
    assert_eq!(r.header("x-dest"), Some("v1"));
    assert_eq!(r.header("x-internal"), None, "removed from the response");
    assert_eq!(r.header("x-served-by"), Some("reviews-v1"));
    // A websocket upgrade on the same rule: the 101's head gets the response changes too, and
    // the bytes still flow both ways.
    let mut ws = lab.client(2, lab.vip(101));
    ws.send(b"GET /headers/ws HTTP/1.1\r\nHost: reviews:9080\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
    let r = ws.read();
    assert_eq!(r.status, 101, "{}", lab.w.proc.log());
    assert_eq!(r.header("x-route"), Some("headers"));
    assert_eq!(r.header("x-dest"), Some("v1"));
    assert_eq!(r.header("upgrade"), Some("websocket"));
    ws.send(b"ping");
    let mut echo = [0u8; 4];
    ws.r.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping");
    let dump = config_dump(&lab);
    assert!(
        dump.contains("\"host\": \"reviews-v1.default.svc.cluster.local\"")
            && dump.contains("\"x-dest\""),
        "{dump}"
    );
    // The second rule goes to productpage, which has no server: the waypoint's own 503 carries
    // the rule's response header.
    let r = c.request("GET", "/other", b"");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("x-route"), Some("fallback"));

    // The same through an HTTPRoute's filters, swapped in while running.
    let hr = reviews_route(
        r#"  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-env, value: gw}]
        add: [{name: x-tag, value: gw-route}]
        remove: [x-secret]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add: [{name: x-route, value: gw}]
        remove: [x-internal]
    backendRefs:
    - name: reviews-v1
      port: 9080
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: x-env, value: backend}, {name: x-dest, value: v1}]}
"#,
    );
    swap_to_route(&lab, &hr);
    let mut c = lab.client(2, lab.vip(101));
    c.send(b"GET /headers HTTP/1.1\r\nHost: reviews:9080\r\nx-tag: client\r\nx-secret: s\r\n\r\n");
    let r = c.read();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.text();
    assert!(
        seen.contains("x-env: gw\n") && !seen.contains("x-env: backend"),
        "{seen}"
    );
    assert!(seen.contains("x-dest: v1\n"), "{seen}");
    assert!(seen.contains("x-tag: client\nx-tag: gw-route\n"), "{seen}");
    assert!(!seen.contains("x-secret"), "{seen}");
    assert!(seen.contains("host: reviews:9080\n"), "{seen}");
    assert_eq!(r.header("x-route"), Some("gw"));
    assert_eq!(r.header("x-internal"), None);
    // The same changes on an h2c request.
    with_h2c(&lab, lab.vip(101), |mut send| async move {
        use http_body_util::BodyExt as _;
        let req = hyper::Request::get("http://reviews:9080/headers")
            .header("x-secret", "s")
            .header("x-tag", "client")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-route"], "gw");
        assert!(resp.headers().get("x-internal").is_none());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let seen = String::from_utf8_lossy(&body);
        assert!(
            seen.contains("x-env: gw\n") && seen.contains("x-dest: v1\n"),
            "{seen}"
        );
        assert!(
            seen.contains("x-tag: client\nx-tag: gw-route\n") && !seen.contains("x-secret"),
            "{seen}"
        );
    });

    // A filter zring does not implement: refused by name, the rules in force kept.
    std::fs::write(
        lab.resources.join("reviews-route.yaml"),
        hr.replace(
            "    - type: ResponseHeaderModifier\n      responseHeaderModifier:\n        add: [{name: x-route, value: gw}]\n        remove: [x-internal]\n",
            "    - type: ExtensionRef\n      extensionRef: {group: example.io, kind: Filter, name: x}\n",
        ),
    )
    .unwrap();
    let want = "HTTPRoute default/reviews: spec.rules[0].filters[1].type: filter \"ExtensionRef\" is not supported";
    wait_until(
        Duration::from_secs(10),
        || lab.w.proc.log().contains(want),
        || lab.w.proc.log(),
    );
    let r = c.request("GET", "/headers", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-route"), Some("gw"), "the last good rules stay");
}

/// VirtualService `fault`, as in Istio's bookinfo fault-injection task: an abort for the
/// requests its rule matches (`end-user: jason`) answered by the waypoint with `FI`, the server
/// never reached; a delay that does not count against the rule's timeout (`DI`); an abort for a
/// share of requests; a gRPC abort as a trailers-only `grpc-status`.
#[test]
fn faults_delay_and_abort_the_requests_their_rule_matches() {
    let (lab, mut c) = reviews_lab(
        72,
        "wp-fault",
        r#"  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      abort:
        percentage:
          value: 100.0
        httpStatus: 500
    route:
    - destination: {host: reviews-v1}
  - match: [{uri: {prefix: /slow}}]
    timeout: 300ms
    fault:
      delay:
        percentage: {value: 100.0}
        fixedDelay: 400ms
    route:
    - destination: {host: reviews-v1}
  - match: [{uri: {prefix: /half}}]
    fault:
      abort: {httpStatus: 418, percentage: {value: 50}}
    route:
    - destination: {host: reviews-v1}
  - match: [{uri: {prefix: /grpc.}}]
    fault:
      abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}
    route:
    - destination: {host: reviews-v1}
  - route:
    - destination: {host: reviews-v1}
"#,
    );
    c.send(b"GET /reviews/0 HTTP/1.1\r\nHost: reviews:9080\r\nend-user: jason\r\nContent-Length: 0\r\n\r\n");
    let r = c.read();
    assert_eq!(r.status, 500, "{}\n{}", r.text(), lab.w.proc.log());
    assert_eq!(r.text(), "fault filter abort");
    assert_eq!(r.header("x-served-by"), None, "the server is not reached");
    let r = c.request("GET", "/reviews/0", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-served-by"), Some("reviews-v1"));

    let t0 = std::time::Instant::now();
    // 400 ms of delay, then a server that takes 100 ms: within the rule's 300 ms, which starts
    // after the delay.
    let r = c.request("GET", "/slow?ms=100", b"");
    let took = t0.elapsed();
    assert_eq!(
        r.status,
        200,
        "the delay is not the route's time: {}",
        r.text()
    );
    assert!(took >= Duration::from_millis(500), "not delayed: {took:?}");
    // Delayed, then the server outlasts the route's timeout: both flags, in Envoy's order.
    let r = c.request("GET", "/slow?ms=600", b"");
    assert_eq!(r.status, 504, "{}", r.text());

    let mut aborted = 0;
    for i in 0..200 {
        let r = c.request("GET", "/half", b"");
        match r.status {
            418 => aborted += 1,
            200 => {}
            s => panic!("request {i}: {s} {}", r.text()),
        }
    }
    assert!(
        (70..=130).contains(&aborted),
        "{aborted} of 200 aborted (want 50%)"
    );

    with_h2c(&lab, lab.vip(101), |mut send| async move {
        let req = hyper::Request::post("http://reviews:9080/grpc.Echo/Unary")
            .header("content-type", "application/grpc")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["grpc-status"], "14");
        assert_eq!(resp.headers()["grpc-message"], "fault filter abort");
    });

    let m = lab.w.metrics();
    let requests = |code: &str, flags: &str, protocol: &str| {
        let labels = [
            format!("response_code=\"{code}\""),
            format!("response_flags=\"{flags}\""),
            format!("request_protocol=\"{protocol}\""),
        ];
        metric(
            &m,
            "istio_requests_total",
            &labels.each_ref().map(String::as_str),
        )
    };
    assert_eq!(requests("500", "FI", "http"), Some(1), "{m}");
    assert_eq!(requests("418", "FI", "http"), Some(aborted), "{m}");
    assert_eq!(requests("200", "DI", "http"), Some(1), "{m}");
    assert_eq!(requests("504", "UT,DI", "http"), Some(1), "{m}");
    // The answers served in full carry no flag (they were counted as cut short, `UR`, until
    // this test: hyper drops a body of known length after its last byte without polling its
    // end).
    assert_eq!(requests("200", "-", "http"), Some(1 + 200 - aborted), "{m}");
    assert_eq!(requests("200", "FI", "grpc"), Some(1), "{m}");
}

/// URL rewrites: a VirtualService `rewrite` (the matched prefix replaced, the authority
/// changed, the query kept) and an HTTPRoute `URLRewrite` (`ReplacePrefixMatch` on path
/// segments, `ReplaceFullPath`); the server sees the rewritten request line and Host.
#[test]
fn routes_rewrite_the_path_and_authority() {
    let (lab, mut c) = reviews_lab(
        71,
        "wp-rewrite",
        r#"  - match: [{uri: {prefix: /old/}}]
    rewrite: {uri: /new/, authority: reviews-v1.default.svc.cluster.local}
    route:
    - destination: {host: reviews-v1}
  - match: [{uri: {exact: /exact}}]
    rewrite: {uri: /whole}
    route:
    - destination: {host: reviews-v1}
  - match: [{uri: {prefix: /service/}}]
    rewrite:
      uriRegexRewrite: {match: "^/service/([^/]+)(/.*)$", rewrite: "\\2/instance/\\1"}
    route:
    - destination: {host: reviews-v1}
"#,
    );
    // The server answers `<name> <method> <path>` (path without the query).
    let r = c.request("GET", "/old/page?x=1", b"");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), lab.w.proc.log());
    assert_eq!(r.text(), "reviews-v1 GET /new/page");
    let r = c.request("GET", "/exact", b"");
    assert_eq!(r.text(), "reviews-v1 GET /whole");
    let r = c.request("GET", "/service/foo/v1/api?q=2", b"");
    assert_eq!(r.text(), "reviews-v1 GET /v1/api/instance/foo");
    // `/headers` is not rewritten (no rule): the Host the client sent arrives.
    let r = c.request("GET", "/old/headers", b"");
    assert_eq!(r.text(), "reviews-v1 GET /new/headers");
    std::fs::write(
        lab.resources.join("reviews.yaml"),
        reviews_vs(
            r#"  - match: [{uri: {prefix: /old/headers}}]
    rewrite: {uri: /headers, authority: reviews-v1.default.svc.cluster.local}
    route:
    - destination: {host: reviews-v1}
"#,
        ),
    )
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        || config_dump(&lab).contains(r#"Prefix(\"/headers\")"#),
        || config_dump(&lab),
    );
    let r = c.request("GET", "/old/headers", b"");
    assert!(
        r.text()
            .contains("host: reviews-v1.default.svc.cluster.local\n"),
        "{}",
        r.text()
    );

    let hr = reviews_route(
        r#"  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /all}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /fixed}}
    backendRefs: [{name: reviews-v1, port: 9080}]
"#,
    );
    std::fs::remove_file(lab.resources.join("reviews.yaml")).unwrap();
    std::fs::write(lab.resources.join("reviews-route.yaml"), &hr).unwrap();
    wait_until(
        Duration::from_secs(10),
        || config_dump(&lab).contains("HTTPRoute default/reviews"),
        || config_dump(&lab),
    );
    let mut c = lab.client(2, lab.vip(101));
    for (path, want) in [
        ("/api/x", "/v2/x"),
        ("/api", "/v2"),
        ("/all/of/it?q=1", "/fixed"),
    ] {
        let r = c.request("GET", path, b"");
        assert_eq!(r.text(), format!("reviews-v1 GET {want}"), "{path}");
    }
}

/// Redirects answered by the waypoint: a VirtualService `redirect` (the whole path replaced,
/// the authority and code set, the query kept) and an HTTPRoute `RequestRedirect` (scheme and
/// host, `ReplacePrefixMatch`, Gateway API's default 302); a VirtualService `directResponse`
/// (status, body, the rule's response headers); the server is never reached.
#[test]
fn routes_answer_redirects_and_direct_responses() {
    let (lab, mut c) = reviews_lab(
        70,
        "wp-redirect",
        r#"  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: "reviews-v2:9080", redirectCode: 308}
  - match: [{uri: {exact: /maintenance}}]
    directResponse: {status: 503, body: {string: "down for maintenance"}}
    headers: {response: {set: {retry-after: "120"}}}
  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {bytes: "AAH/"}}
  - route:
    - destination: {host: reviews-v1}
"#,
    );
    let r = c.request("GET", "/old/page?x=1", b"");
    assert_eq!(r.status, 308, "{}\n{}", r.text(), lab.w.proc.log());
    assert_eq!(r.header("location"), Some("http://reviews-v2:9080/new?x=1"));
    assert_eq!(r.header("x-served-by"), None, "the server is not reached");
    let r = c.request("POST", "/maintenance", b"a body to drain");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.text(), "down for maintenance");
    assert_eq!(r.header("retry-after"), Some("120"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    let r = c.request("GET", "/teapot", b"");
    assert_eq!((r.status, &r.body[..]), (418, &[0u8, 1, 0xff][..]));
    let r = c.request("POST", "/other", b"body");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "reviews-v1 POST /other");
    let v1 = seen(SocketAddr::new(ip(lab.n, 11), 9080));
    assert_eq!(
        v1.iter().map(|s| s.path.as_str()).collect::<Vec<_>>(),
        ["/other"],
        "only the routed request reached the server"
    );

    swap_to_route(
        &lab,
        &reviews_route(
            r#"  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        scheme: https
        hostname: reviews.example.com
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}
  - backendRefs: [{name: reviews-v1, port: 9080}]
"#,
        ),
    );
    let mut c = lab.client(2, lab.vip(101));
    let r = c.request("GET", "/api/items?page=2", b"");
    assert_eq!(r.status, 302, "{}", r.text());
    assert_eq!(
        r.header("location"),
        Some("https://reviews.example.com/v2/items?page=2")
    );
    let r = c.request("GET", "/apis", b"");
    assert_eq!(r.status, 200, "a segment prefix: /apis is not /api");
    let m = lab.w.metrics();
    assert_eq!(
        metric(
            &m,
            "istio_requests_total",
            &["response_code=\"308\"", "response_flags=\"-\""]
        ),
        Some(1),
        "{m}"
    );
}

/// Request mirroring: a VirtualService `mirror` copies each request (body byte-exact, authority
/// `-shadow`) to reviews-v2 while the client is answered by reviews-v1 alone; `mirrors` with a
/// percentage copies about that share; a mirror with no server fails without touching the main
/// request; an HTTPRoute `RequestMirror` does the same on h2c. Copies are counted by result.
#[test]
fn routes_mirror_requests_and_drop_the_copies_answers() {
    let (lab, mut c) = reviews_lab(
        69,
        "wp-mirror",
        r#"  - match: [{uri: {prefix: /sink}}]
    route:
    - destination: {host: reviews-v1}
    mirror: {host: reviews-v2}
  - match: [{uri: {prefix: /half}}]
    route:
    - destination: {host: reviews-v1}
    mirrors:
    - destination: {host: reviews-v2}
      percentage: {value: 50}
  - route:
    - destination: {host: reviews-v1}
    mirror: {host: productpage}
"#,
    );
    let v1 = SocketAddr::new(ip(lab.n, 11), 9080);
    let v2 = SocketAddr::new(ip(lab.n, 12), 9080);
    server(v2, "reviews-v2");
    let mirrored = |result: &str| {
        metric(
            &lab.w.metrics(),
            "zring_waypoint_mirrored_requests_total",
            &[&format!("result=\"{result}\"")],
        )
        .unwrap_or(0)
    };
    // A body larger than one read, copied whole while the client is answered by v1.
    let body = pattern(300 * 1024);
    let r = c.request("POST", "/sink?q=1", &body);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), lab.w.proc.log());
    assert_eq!(r.text(), format!("reviews-v1 {}", body.len()));
    let want = common::http::Seen {
        method: "POST".into(),
        authority: "reviews-shadow:9080".into(),
        path: "/sink?q=1".into(),
        body: Some((body.len(), checksum(&body))),
    };
    wait_until(
        Duration::from_secs(10),
        || seen(v2) == [want.clone()],
        || format!("{:?}\n{}", seen(v2), lab.w.proc.log()),
    );
    assert_eq!(
        seen(v1)[0].authority,
        "reviews:9080",
        "the main request is unmarked"
    );
    wait_until(
        Duration::from_secs(10),
        || mirrored("success") == 1,
        || lab.w.metrics(),
    );

    // Half of the requests copied.
    for _ in 0..200 {
        let r = c.request("GET", "/half", b"");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-served-by"), Some("reviews-v1"));
    }
    wait_until(
        Duration::from_secs(10),
        || mirrored("success") == seen(v2).len() as u64,
        || lab.w.metrics(),
    );
    let copies = seen(v2).len() - 1;
    assert!(
        (60..=140).contains(&copies),
        "{copies} of 200 copied at 50%"
    );

    // A mirror nobody serves: the copy fails, the client does not notice.
    let r = c.request("GET", "/other", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "reviews-v1 GET /other");
    wait_until(
        Duration::from_secs(10),
        || mirrored("failure") == 1,
        || lab.w.metrics(),
    );
    let m = lab.w.metrics();
    assert_eq!(
        metric(&m, "istio_requests_total", &["reporter=\"waypoint\""]),
        Some(202),
        "copies are not requests of the mesh's clients:\n{m}"
    );
    assert!(config_dump(&lab).contains("\"mirrors\""));

    // The HTTPRoute form, on h2c.
    swap_to_route(
        &lab,
        &reviews_route(
            r#"  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: reviews-v2, port: 9080}}
    backendRefs:
    - {name: reviews-v1, port: 9080}
"#,
        ),
    );
    let before = seen(v2).len();
    with_h2c(&lab, lab.vip(101), |mut send| async move {
        use http_body_util::BodyExt as _;
        let req = hyper::Request::post("http://reviews:9080/sink")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"h2 body",
            )))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"reviews-v1 7");
    });
    wait_until(
        Duration::from_secs(10),
        || seen(v2).len() > before,
        || lab.w.proc.log(),
    );
    let copy = seen(v2)[before].clone();
    assert_eq!(
        (copy.authority.as_str(), copy.body),
        ("reviews-shadow:9080", Some((7, checksum(b"h2 body"))))
    );
}

/// CORS as Envoy's filter applies a VirtualService `corsPolicy`: a preflight from an allowed
/// origin is answered by the waypoint (the server never sees it), an allowed origin's request
/// is answered with the allow headers, another origin's request and preflight pass untouched;
/// an HTTPRoute `CORS` filter with a wildcard origin and Gateway API's default max age.
#[test]
fn routes_answer_cors_preflights_and_mark_allowed_answers() {
    let (lab, mut c) = reviews_lab(
        68,
        "wp-cors",
        r#"  - corsPolicy:
      allowOrigins: [{exact: "https://app.example.com"}, {regex: "https://.*[.]test[.]io"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-token]
      exposeHeaders: [x-trace]
      maxAge: 24h
      allowCredentials: true
    route:
    - destination: {host: reviews-v1}
"#,
    );
    let v1 = SocketAddr::new(ip(lab.n, 11), 9080);
    let preflight = |origin: &str| {
        format!("OPTIONS /api HTTP/1.1\r\nHost: reviews:9080\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\n\r\n")
    };
    c.send(preflight("https://a.test.io").as_bytes());
    let r = c.read();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), lab.w.proc.log());
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://a.test.io")
    );
    assert_eq!(r.header("access-control-allow-methods"), Some("GET,POST"));
    assert_eq!(r.header("access-control-allow-headers"), Some("x-token"));
    assert_eq!(r.header("access-control-max-age"), Some("86400"));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(r.header("x-served-by"), None, "answered by the waypoint");
    c.send(b"GET /api HTTP/1.1\r\nHost: reviews:9080\r\nOrigin: https://app.example.com\r\n\r\n");
    let r = c.read();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-served-by"), Some("reviews-v1"));
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(r.header("access-control-expose-headers"), Some("x-trace"));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    c.send(b"GET /api HTTP/1.1\r\nHost: reviews:9080\r\nOrigin: https://evil.example\r\n\r\n");
    let r = c.read();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), None);
    c.send(preflight("https://evil.example").as_bytes());
    let r = c.read();
    assert_eq!(
        r.text(),
        "reviews-v1 OPTIONS /api",
        "forwarded, not answered"
    );
    assert_eq!(r.header("access-control-allow-origin"), None);
    let methods: Vec<String> = seen(v1).into_iter().map(|s| s.method).collect();
    assert_eq!(methods, ["GET", "GET", "OPTIONS"]);

    swap_to_route(
        &lab,
        &reviews_route(
            r#"  - filters:
    - type: CORS
      cors: {allowOrigins: ["https://*.example.com"], allowMethods: [GET]}
    backendRefs: [{name: reviews-v1, port: 9080}]
"#,
        ),
    );
    let mut c = lab.client(2, lab.vip(101));
    c.send(preflight("https://app.example.com").as_bytes());
    let r = c.read();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(r.header("access-control-allow-methods"), Some("GET"));
    assert_eq!(r.header("access-control-max-age"), Some("5"));
    assert_eq!(r.header("access-control-allow-credentials"), None);
    assert_eq!(seen(v1).len(), 3, "the server never saw the preflight");
}

/// Istio's sample JWKS and `demo.jwt` (istio/istio `security/tools/jwt/samples`): RS256,
/// issuer and subject `testing@secure.istio.io`, expiring in 2118.
const ISTIO_JWKS: &str = r#"{"keys":[{"e":"AQAB","kid":"DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ","kty":"RSA","n":"xAE7eB6qugXyCAG3yhh7pkDkT65pHymX-P7KfIupjf59vsdo91bSP9C8H07pSAGQO1MV_xFj9VswgsCg4R6otmg5PV2He95lZdHtOcU5DXIg_pbhLdKXbi66GlVeK6ABZOUW3WYtnNHD-91gVuoeJT_DwtGGcp4ignkgXfkiEm4sw-4sfb4qdt5oLbyVpmW6x9cfa7vs2WTfURiCrBoUqgBo_-4WTiULmmHSGZHOjzwa8WtrtOQGsAFjIbno85jp6MnGGGZPYZbDAa_b3y5u-YpW7ypZrvD8BgtKVjgtQgZhLAGezMt0ua3DRrWnKqTZ0BJ_EyxOGuHJrLsn00fnMQ"}]}"#;
const ISTIO_DEMO_JWT: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6IkRIRmJwb0lVcXJZOHQyenBBMnFYZkNtcjVWTzVaRXI0UnpIVV8tZW52dlEiLCJ0eXAiOiJKV1QifQ.eyJleHAiOjQ2ODU5ODk3MDAsImZvbyI6ImJhciIsImlhdCI6MTUzMjM4OTcwMCwiaXNzIjoidGVzdGluZ0BzZWN1cmUuaXN0aW8uaW8iLCJzdWIiOiJ0ZXN0aW5nQHNlY3VyZS5pc3Rpby5pbyJ9.CfNnxWP2tcnR9q0vxyxweaF3ovQYHYZl82hAUsn21bwQd9zP7c-LS9qd_vpdLG4Tn1A15NxfCjp5f7QNBUo-KC9PJqYpgGbaXhaGx7bEdFWjcwv3nZzvc7M__ZpaCERdwU7igUmJqYGBYQ51vr2njU9ZimyKkfDe3axcyiBZde7G6dabliUosJvvKOPcKIWPccCgefSj_GNfwIip3-SsFdlR7BtbVUcqR-yv-XOxJ3Uc1MI0tz3uMiiZcyPV7sNCU4KRnemRIMHVOfuvHsU60_GhGbiSFzgPTAa9WTltbnarTbxudb_YEOx12JiwYToeX0DCPb43W1tzIBxgm8NxUg";

/// Istio's "JWT authentication with a waypoint" task as written, its `jwksUri` served on
/// loopback: a RequestAuthentication and an AuthorizationPolicy requiring its request
/// principal, both attached to the waypoint's Gateway.
/// No token: 403; the demo token: 200, the token not forwarded; a forged token: 401 with
/// `WWW-Authenticate`, counted with its code.
#[test]
fn jwt_request_authentication_and_request_principals() {
    // The issuer's key set, served to every fetch.
    let keys = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let jwks_uri = format!("http://{}/jwks.json", keys.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut s in keys.incoming().flatten() {
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{ISTIO_JWKS}",
                ISTIO_JWKS.len()
            );
        }
    });
    let res = resource(
        "wp-jwt-res",
        "jwt.yaml",
        &format!(
            r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: default}}
spec:
  targetRefs:
  - {{kind: Gateway, group: gateway.networking.k8s.io, name: bookinfo-productpage}}
  jwtRules:
  - issuer: "testing@secure.istio.io"
    jwksUri: "{jwks_uri}"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: default}}
spec:
  targetRefs:
  - {{kind: Gateway, group: gateway.networking.k8s.io, name: bookinfo-productpage}}
  action: ALLOW
  rules:
  - from:
    - source:
        requestPrincipals: ["testing@secure.istio.io/testing@secure.istio.io"]
"#
        ),
    );
    let lab = Lab::start(67, "wp-jwt", &[("jwt.yaml", &res)]);
    server(SocketAddr::new(ip(lab.n, 11), 9080), "reviews-v1");
    server(SocketAddr::new(ip(lab.n, 12), 9080), "reviews-v2");
    let mut c = lab.client(2, lab.vip(101));
    let r = c.request("GET", "/headers", b"");
    assert_eq!(
        r.status,
        403,
        "no token, no request principal: {}\n{}",
        r.text(),
        lab.w.proc.log()
    );
    assert_eq!(r.text(), "RBAC: access denied");
    c.send(format!("GET /headers HTTP/1.1\r\nHost: reviews:9080\r\nAuthorization: Bearer {ISTIO_DEMO_JWT}\r\n\r\n").as_bytes());
    let r = c.read();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), lab.w.proc.log());
    assert!(r
        .header("x-served-by")
        .is_some_and(|s| s.starts_with("reviews-v")));
    assert!(
        !r.text().to_ascii_lowercase().contains("authorization"),
        "the token stays at the waypoint: {}",
        r.text()
    );
    let forged = ISTIO_DEMO_JWT.replacen("eyJleHAiOjQ2ODU5ODk3MDAs", "eyJleHAiOjQ2ODU5ODk3MDEs", 1);
    assert_ne!(forged, ISTIO_DEMO_JWT);
    c.send(
        format!(
            "GET /headers HTTP/1.1\r\nHost: reviews:9080\r\nAuthorization: Bearer {forged}\r\n\r\n"
        )
        .as_bytes(),
    );
    let r = c.read();
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.text(), "Jwt verification fails");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"http://reviews:9080/headers\", error=\"invalid_token\"")
    );
    let m = lab.w.metrics();
    for code in ["401", "403", "200"] {
        assert_eq!(
            metric(
                &m,
                "istio_requests_total",
                &[&format!("response_code=\"{code}\"")]
            ),
            Some(1),
            "{code}:\n{m}"
        );
    }
}

/// A lab with the mesh config `mesh` (a file) and a CUSTOM policy asking `provider` about
/// `/headers` on the waypoint's services, as Istio's ext-authz task sets it up; reviews-v1 and
/// -v2 serving.
fn ext_authz_lab(n: u8, tag: &str, mesh: &Path, provider: &str) -> Lab {
    let ap = resource(
        &format!("{tag}-res"),
        "policy.yaml",
        &format!(
            r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ext-authz, namespace: default}}
spec:
  targetRefs:
  - {{kind: Gateway, group: gateway.networking.k8s.io, name: bookinfo-productpage}}
  action: CUSTOM
  provider:
    name: {provider}
  rules:
  - to:
    - operation:
        paths: ["/headers"]
"#
        ),
    );
    let lab = Lab::start(n, tag, &[("mesh.yaml", mesh), ("policy.yaml", &ap)]);
    server(SocketAddr::new(ip(lab.n, 11), 9080), "reviews-v1");
    server(SocketAddr::new(ip(lab.n, 12), 9080), "reviews-v2");
    lab
}

/// The ext_authz lab's CUSTOM policy names `/sink` too (a path whose body the server counts).
fn check_sink_too(lab: &Lab) {
    let policy = lab.resources.join("policy.yaml");
    let text = std::fs::read_to_string(&policy).unwrap();
    let text = text.replace(r#"["/headers"]"#, r#"["/headers", "/sink"]"#);
    std::fs::write(&policy, text).unwrap();
}

/// What Istio's ext-authz sample denies a request with (both test servers answer it).
const SAMPLE_DENIAL: &str =
    "denied by ext_authz for not found header `x-ext-authz: allow` in the request";

/// A request the sample provider denies gets its answer: 403, its body and header, and the
/// server is not reached.
fn sample_denial(c: &mut Client) {
    c.send(b"GET /headers HTTP/1.1\r\nHost: reviews:9080\r\nx-ext-authz: deny\r\n\r\n");
    let r = c.read();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.text(), SAMPLE_DENIAL);
    assert_eq!(r.header("x-ext-authz-check-result"), Some("denied"));
    assert_eq!(r.header("x-served-by"), None);
}

/// The requests the lab's waypoint counted with `code` and flag `UAEX`.
fn uaex(lab: &Lab, code: u16) -> Option<u64> {
    let code = format!("response_code=\"{code}\"");
    metric(
        &lab.w.metrics(),
        "istio_requests_total",
        &[&code, "response_flags=\"UAEX\""],
    )
}

/// An HTTP authorization server like Istio's ext-authz sample: allows a request carrying
/// `x-ext-authz: allow`, denies others with 403; both answers say so in
/// `x-ext-authz-check-result`. Counts the checks it answered.
fn ext_authz_server(addr: SocketAddr) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let checks = std::sync::Arc::new(AtomicUsize::new(0));
    let l = std::net::TcpListener::bind(addr).unwrap();
    let counter = checks.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                loop {
                    let mut head = Vec::new();
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push(line.to_ascii_lowercase());
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    // A check with a body (includeRequestBodyInCheck): `allow` in it allows.
                    let len = head
                        .iter()
                        .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
                        .unwrap_or(0usize);
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let allow = head.iter().any(|l| l.trim_end() == "x-ext-authz: allow")
                        || (body.windows(5).any(|w| w == b"allow")
                            && head
                                .iter()
                                .any(|l| l.starts_with("x-envoy-auth-partial-body:")));
                    let answer = match allow {
                        true => "HTTP/1.1 200 OK\r\nx-ext-authz-check-result: allowed\r\nContent-Length: 0\r\n\r\n".to_string(),
                        false => {
                            let body = SAMPLE_DENIAL;
                            format!("HTTP/1.1 403 Forbidden\r\nx-ext-authz-check-result: denied\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}", body.len())
                        }
                    };
                    if w.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    checks
}

/// External authorization as Istio's ext-authz task sets it up for a waypoint: the provider in
/// the mesh config (`istio` ConfigMap), a CUSTOM policy on `/headers` attached to the waypoint.
/// Allowed checks let the request through with the provider's header added; denied ones answer
/// the client with the provider's 403 (`UAEX`); paths the policy does not name are not checked;
/// a provider that does not answer gives `statusOnError`.
#[test]
fn custom_policies_ask_the_external_authorizer() {
    let mesh = |service: &str, extra: &str| {
        format!(
            r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |-
    extensionProviders:
    - name: "sample-ext-authz-http"
      envoyExtAuthzHttp:
        service: "{service}"
        port: "9080"
        includeRequestHeadersInCheck: ["x-ext-authz"]
        headersToUpstreamOnAllow: ["x-ext-authz-check-result"]
        headersToDownstreamOnAllow: ["x-ext-authz-check-*"]{extra}
"#
        )
    };
    let cm = resource(
        "wp-extauthz-res",
        "mesh.yaml",
        &mesh("ext-authz.default.svc.cluster.local", ""),
    );
    let lab = ext_authz_lab(66, "wp-extauthz", &cm, "sample-ext-authz-http");
    let checks = ext_authz_server(SocketAddr::new(ip(lab.n, 13), 9080));
    let asked = || checks.load(std::sync::atomic::Ordering::SeqCst);
    let mut c = lab.client(2, lab.vip(101));
    c.send(b"GET /headers HTTP/1.1\r\nHost: reviews:9080\r\nx-ext-authz: allow\r\n\r\n");
    let r = c.read();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), lab.w.proc.log());
    assert!(
        r.text().contains("x-ext-authz-check-result: allowed\n"),
        "the provider's header reaches the server: {}",
        r.text()
    );
    assert_eq!(
        r.header("x-ext-authz-check-result"),
        Some("allowed"),
        "and the client (headersToDownstreamOnAllow)"
    );
    assert_eq!(asked(), 1);
    sample_denial(&mut c);
    let r = c.request("GET", "/other", b"");
    assert_eq!(r.status, 200, "not a path the policy names");
    assert_eq!(asked(), 2, "and not checked");
    assert_eq!(uaex(&lab, 403), Some(1), "{}", lab.w.metrics());

    // With the body in the check, the provider can decide on it; the server still gets it all.
    check_sink_too(&lab);
    let post = |body: &str| {
        lab.client(2, lab.vip(101))
            .request("POST", "/sink", body.as_bytes())
    };
    // First the policy (checked, no body: denied), then the body in the check.
    wait_until(
        Duration::from_secs(10),
        || post("please allow me").status == 403,
        || lab.w.proc.log(),
    );
    std::fs::write(
        lab.resources.join("mesh.yaml"),
        mesh(
            "ext-authz.default.svc.cluster.local",
            "\n        includeRequestBodyInCheck: {maxRequestBytes: 16, allowPartialMessage: true}",
        ),
    )
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        || post("please allow me, and the rest of it").status == 200,
        || format!("{}\n{}", config_dump(&lab), lab.w.proc.log()),
    );
    let r = post("please allow me, and the rest of it");
    assert!(
        r.text().starts_with("reviews-v") && r.text().ends_with(" 35"),
        "the server got all 35 bytes: {}",
        r.text()
    );
    // Past the 16 bytes sent, `allow` is not seen.
    let r = post("0123456789abcdefallow");
    assert_eq!(r.status, 403, "{}\n{}", r.text(), lab.w.proc.log());

    // A provider nobody serves (productpage has no server here): statusOnError.
    std::fs::write(
        lab.resources.join("mesh.yaml"),
        mesh(
            "productpage.default.svc.cluster.local",
            "\n        statusOnError: \"503\"\n        timeout: 2s",
        ),
    )
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        || {
            config_dump(&lab).contains("\"lastError\": null") && {
                let mut c = lab.client(2, lab.vip(101));
                c.send(
                    b"GET /headers HTTP/1.1\r\nHost: reviews:9080\r\nx-ext-authz: allow\r\n\r\n",
                );
                c.read().status == 503
            }
        },
        || format!("{}\n{}", config_dump(&lab), lab.w.proc.log()),
    );
    // (The tries before the new provider was in force were checked by the old one.)
    let before = asked();
    let mut c = lab.client(2, lab.vip(101));
    c.send(b"GET /headers HTTP/1.1\r\nHost: reviews:9080\r\nx-ext-authz: allow\r\n\r\n");
    let r = c.read();
    assert_eq!((r.status, r.header("x-served-by")), (503, None));
    assert_eq!(asked(), before, "the old provider is not asked any more");
}

/// What the test's gRPC authorizer saw: the checks, the last one's request attributes.
#[derive(Default)]
struct GrpcChecks {
    count: std::sync::atomic::AtomicUsize,
    last: std::sync::Mutex<Option<zring_core::xds::proto::envoy::service::auth::v3::CheckRequest>>,
}

/// A gRPC authorization server like Istio's ext-authz sample (`envoy.service.auth.v3`): allows
/// a request carrying `x-ext-authz: allow` (setting `x-ext-authz-check-result: allowed`,
/// removing `authorization`, adding `x-ext-authz-said` to the response), denies others with
/// 403 and its reason; `x-ext-authz: fail` makes the call itself fail (UNAVAILABLE).
fn grpc_ext_authz_server(addr: SocketAddr) -> std::sync::Arc<GrpcChecks> {
    use zring_core::xds::proto::envoy::service::auth::v3 as pb;
    struct Authz(std::sync::Arc<GrpcChecks>);
    fn opt(k: &str, v: &str) -> pb::HeaderValueOption {
        pb::HeaderValueOption {
            header: Some(pb::HeaderValue {
                key: k.into(),
                value: v.into(),
                raw_value: vec![],
            }),
            append: Some(pb::BoolValue { value: false }),
            ..Default::default()
        }
    }
    #[tonic::async_trait]
    impl pb::authorization_server::Authorization for Authz {
        async fn check(
            &self,
            r: tonic::Request<pb::CheckRequest>,
        ) -> Result<tonic::Response<pb::CheckResponse>, tonic::Status> {
            let r = r.into_inner();
            self.0
                .count
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let said = r
                .attributes
                .as_ref()
                .and_then(|a| a.request.as_ref())
                .and_then(|q| q.http.as_ref())
                .and_then(|h| h.headers.get("x-ext-authz").cloned())
                .unwrap_or_default();
            *self.0.last.lock().unwrap() = Some(r);
            use pb::check_response::HttpResponse;
            let answer = match said.as_str() {
                "fail" => return Err(tonic::Status::unavailable("asked to fail")),
                "allow" => pb::CheckResponse {
                    status: Some(pb::RpcStatus::default()),
                    http_response: Some(HttpResponse::OkResponse(pb::OkHttpResponse {
                        headers: vec![opt("x-ext-authz-check-result", "allowed")],
                        headers_to_remove: vec!["authorization".into()],
                        response_headers_to_add: vec![opt("x-ext-authz-said", "yes")],
                        ..Default::default()
                    })),
                },
                _ => pb::CheckResponse {
                    status: Some(pb::RpcStatus {
                        code: 7,
                        message: "PERMISSION_DENIED".into(),
                    }),
                    http_response: Some(HttpResponse::DeniedResponse(pb::DeniedHttpResponse {
                        status: Some(pb::HttpStatus { code: 403 }),
                        headers: vec![opt("x-ext-authz-check-result", "denied")],
                        body: SAMPLE_DENIAL.into(),
                    })),
                },
            };
            Ok(tonic::Response::new(answer))
        }
    }
    let checks = std::sync::Arc::new(GrpcChecks::default());
    let svc = pb::authorization_server::AuthorizationServer::new(Authz(checks.clone()));
    let l = std::net::TcpListener::bind(addr).unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l))
                .await
                .unwrap();
        });
    });
    checks
}

/// External authorization by a gRPC provider (`envoyExtAuthzGrpc`, Envoy's
/// `Authorization/Check`): the check carries the request's attributes and both peers'
/// identities; an allowed request reaches the server with the provider's header changes and
/// its answer gets the provider's response header; a denial is the provider's (`UAEX`); a
/// failed call gives `statusOnError`.
#[test]
fn custom_policies_ask_a_grpc_external_authorizer() {
    let cm = resource(
        "wp-extauthz-grpc-res",
        "mesh.yaml",
        r#"apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    extensionProviders:
    - name: "sample-ext-authz-grpc"
      envoyExtAuthzGrpc:
        service: "ext-authz.default.svc.cluster.local"
        port: "9080"
        statusOnError: "503"
        timeout: 5s
"#,
    );
    let cm_text = std::fs::read_to_string(&cm).unwrap();
    let lab = ext_authz_lab(65, "wp-extauthz-grpc", &cm, "sample-ext-authz-grpc");
    let checks = grpc_ext_authz_server(SocketAddr::new(ip(lab.n, 13), 9080));
    let asked = || checks.count.load(std::sync::atomic::Ordering::SeqCst);
    let mut c = lab.client(2, lab.vip(101));
    c.send(b"GET /headers?q=1 HTTP/1.1\r\nHost: reviews:9080\r\nx-ext-authz: allow\r\nx-ext-authz-check-result: forged\r\nauthorization: Bearer secret\r\n\r\n");
    let r = c.read();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), lab.w.proc.log());
    let seen = r.text();
    assert!(
        seen.contains("x-ext-authz-check-result: allowed\n") && !seen.contains("forged"),
        "the provider's header replaces the client's: {seen}"
    );
    assert!(
        !seen.contains("authorization:"),
        "the provider removed authorization: {seen}"
    );
    assert_eq!(r.header("x-ext-authz-said"), Some("yes"));
    assert_eq!(asked(), 1);
    {
        let last = checks.last.lock().unwrap();
        let a = last.as_ref().unwrap().attributes.as_ref().unwrap();
        let h = a.request.as_ref().unwrap().http.as_ref().unwrap();
        assert_eq!(
            (h.method.as_str(), h.path.as_str(), h.host.as_str()),
            ("GET", "/headers?q=1", "reviews:9080")
        );
        assert_eq!(
            h.headers.get(":path").map(String::as_str),
            Some("/headers?q=1")
        );
        assert_eq!(
            h.headers.get("authorization").map(String::as_str),
            Some("Bearer secret"),
            "every header is in the check"
        );
        assert_eq!(
            a.source.as_ref().unwrap().principal,
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert_eq!(
            a.destination.as_ref().unwrap().principal,
            "spiffe://cluster.local/ns/default/sa/bookinfo-waypoint"
        );
    }
    sample_denial(&mut c);
    c.send(b"GET /headers HTTP/1.1\r\nHost: reviews:9080\r\nx-ext-authz: fail\r\n\r\n");
    let r = c.read();
    assert_eq!(
        (r.status, r.header("x-served-by")),
        (503, None),
        "a failed call: statusOnError"
    );
    let r = c.request("GET", "/other", b"");
    assert_eq!(r.status, 200, "not a path the policy names");
    assert_eq!(asked(), 3, "and not checked");
    assert_eq!(uaex(&lab, 403), Some(1), "{}", lab.w.metrics());
    assert_eq!(uaex(&lab, 503), Some(1), "{}", lab.w.metrics());

    // includeRequestBodyInCheck: the body's start goes with the check (here its first 8 bytes,
    // as bytes, marked partial), and the whole body still reaches the server after it.
    check_sink_too(&lab);
    let with_body = |b: &str| {
        std::fs::write(
            lab.resources.join("mesh.yaml"),
            cm_text.replace(
                "timeout: 5s",
                &format!("timeout: 5s\n        includeRequestBodyInCheck: {b}"),
            ),
        )
        .unwrap();
    };
    let post = |body: &str| {
        let mut c = lab.client(2, lab.vip(101));
        c.send(
            format!(
                "POST /sink HTTP/1.1\r\nHost: reviews:9080\r\nx-ext-authz: allow\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        c.read()
    };
    let last_body = || {
        let last = checks.last.lock().unwrap();
        let h = last
            .as_ref()
            .and_then(|r| r.attributes.as_ref()?.request.as_ref()?.http.clone())
            .unwrap_or_default();
        let partial = h.headers.get("x-envoy-auth-partial-body").cloned();
        (h.body, h.raw_body, partial)
    };
    with_body("{maxRequestBytes: 8, allowPartialMessage: true, packAsBytes: true}");
    wait_until(
        Duration::from_secs(10),
        || post("0123456789abcdefghij").status == 200 && last_body().1 == b"01234567",
        || format!("{:?}\n{}", last_body(), lab.w.proc.log()),
    );
    let r = post("0123456789abcdefghij");
    assert!(
        r.text().ends_with(" 20"),
        "the server got it all: {}",
        r.text()
    );
    assert_eq!(
        last_body(),
        (String::new(), b"01234567".to_vec(), Some("true".into()))
    );
    // No partial messages: a longer body is refused (413) unchecked; a short one goes as text.
    with_body("{maxRequestBytes: 8}");
    wait_until(
        Duration::from_secs(10),
        || post("0123456789").status == 413,
        || lab.w.proc.log(),
    );
    let before = asked();
    assert_eq!(post("0123456789abcdefghij").status, 413);
    assert_eq!(asked(), before, "not checked");
    let r = post("hello");
    assert_eq!(
        (r.status, r.text().ends_with(" 5")),
        (200, true),
        "{}",
        r.text()
    );
    assert_eq!(
        last_body(),
        ("hello".into(), Vec::new(), Some("false".into()))
    );
}

/// A DestinationRule's `consistentHash`: requests with the same header value go to the same
/// endpoint (and different values spread over both); without the header, round robin; on a
/// cookie with a ttl, a request without it gets a `Set-Cookie` and sticks once it sends it back.
#[test]
fn consistent_hash_sends_a_key_to_one_endpoint_and_makes_up_a_cookie() {
    let dr = |lb: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      consistentHash: {lb}\n")
    };
    let res = resource(
        "wp-hash-res",
        "reviews-dr.yaml",
        &dr("{httpHeaderName: x-user}"),
    );
    let lab = Lab::start(64, "wp-hash", &[("reviews-dr.yaml", &res)]);
    let n = lab.n;
    server(SocketAddr::new(ip(n, 11), 9080), "reviews-v1");
    server(SocketAddr::new(ip(n, 12), 9080), "reviews-v2");
    let mut c = lab.client(2, lab.vip(101));
    let mut get = |extra: &str| {
        c.send(format!("GET /reviews/0 HTTP/1.1\r\nHost: reviews:9080\r\n{extra}\r\n").as_bytes());
        let r = c.read();
        assert_eq!(r.status, 200, "{}", r.text());
        (
            r.header("x-served-by").unwrap_or_default().to_string(),
            r.header("set-cookie").map(str::to_string),
        )
    };
    let mut by_user = std::collections::BTreeMap::new();
    for u in 0..16 {
        let served: std::collections::BTreeSet<String> = (0..4)
            .map(|_| get(&format!("x-user: user-{u}\r\n")).0)
            .collect();
        assert_eq!(served.len(), 1, "user-{u} went to {served:?}");
        by_user.insert(u, served.into_iter().next().unwrap());
    }
    let both: std::collections::BTreeSet<&String> = by_user.values().collect();
    assert_eq!(
        both.len(),
        2,
        "16 keys spread over both endpoints: {by_user:?}"
    );
    let unkeyed: std::collections::BTreeSet<String> = (0..6).map(|_| get("").0).collect();
    assert_eq!(unkeyed.len(), 2, "no key: round robin");

    std::fs::write(
        lab.resources.join("reviews-dr.yaml"),
        dr("{httpCookie: {name: user, path: /, ttl: 60s}}"),
    )
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        || config_dump(&lab).contains("httpCookie"),
        || config_dump(&lab),
    );
    let (_, cookie) = get("");
    let cookie = cookie.expect("a made-up cookie");
    assert!(
        cookie.starts_with("user=\"") && cookie.ends_with("\"; Max-Age=60; Path=/; HttpOnly"),
        "{cookie}"
    );
    let value = cookie.split(';').next().unwrap().to_string();
    let served: std::collections::BTreeSet<String> = (0..6)
        .map(|_| {
            let (s, again) = get(&format!("Cookie: a=1; {value}\r\n"));
            assert_eq!(again, None, "a request with the cookie gets no new one");
            s
        })
        .collect();
    assert_eq!(served.len(), 1, "the cookie sticks: {served:?}");
}

/// `extra` (lines of YAML) added to workload `who`'s entry of a mesh.
fn place(y: String, who: &str, extra: &str) -> String {
    let at = format!("  name: {who}\n");
    y.replacen(&at, &format!("{at}{extra}"), 1)
}

/// A tally as [`Lab::tally`] returns it.
fn served(v: &[(&str, usize)]) -> Vec<(String, usize)> {
    v.iter().map(|(t, k)| (t.to_string(), *k)).collect()
}

/// The waypoint chooses a service's endpoints as a node proxy does: ready ones only, nearest
/// first when the service prefers close ones (istiod's `trafficDistribution: PreferClose`),
/// from the waypoint's own locality, and in turn by capacity.
#[test]
fn the_waypoint_prefers_close_ready_endpoints_and_weighs_capacity() {
    let lab = Lab::start(63, "wp-choice", &[]);
    let n = lab.n;
    server(SocketAddr::new(ip(n, 11), 9080), "reviews-v1");
    server(SocketAddr::new(ip(n, 12), 9080), "reviews-v2");
    let mut generation = 1;
    let mut remesh = |edit: &dyn Fn(String) -> String| lab.remesh(&mut generation, edit);
    let prefer_close = |y: String| {
        let y = place(y, "waypoint", "  locality: {region: r1, zone: z1}\n");
        let y = place(y, "reviews-v1", "  locality: {region: r1, zone: z2}\n");
        let y = place(y, "reviews-v2", "  locality: {region: r1, zone: z1}\n");
        y.replacen(
            "  hostname: reviews.default.svc.cluster.local\n",
            "  hostname: reviews.default.svc.cluster.local\n  loadBalancer:\n    \
             routingPreferences: [Network, Region, Zone, Subzone]\n    mode: Failover\n",
            1,
        )
    };
    let tally = |k: usize| lab.tally(k);

    // Both versions by default.
    assert_eq!(tally(4), served(&[("reviews-v1", 2), ("reviews-v2", 2)]));
    // PreferClose: v2 shares the waypoint's zone.
    remesh(&|y| prefer_close(y));
    assert_eq!(tally(6), served(&[("reviews-v2", 6)]));
    // v2 not ready: the other zone takes over.
    remesh(&|y| place(prefer_close(y), "reviews-v2", "  status: Unhealthy\n"));
    assert_eq!(tally(4), served(&[("reviews-v1", 4)]));
    // Capacity 3 against 1.
    remesh(&|y| place(y, "reviews-v1", "  capacity: 3\n"));
    assert_eq!(tally(8), served(&[("reviews-v1", 6), ("reviews-v2", 2)]));

    // No service preference, but a DestinationRule with outlier detection: Istio's default
    // locality failover. The same zone first; once it is ejected, the other zone.
    remesh(&|y| {
        let y = place(y, "waypoint", "  locality: {region: r1, zone: z1}\n");
        let y = place(y, "reviews-v1", "  locality: {region: r1, zone: z2}\n");
        place(y, "reviews-v2", "  locality: {region: r1, zone: z1}\n")
    });
    // distribute: a waypoint in r1/z1 sends 75% to its zone and 25% to z2.
    lab.reviews_dr("    loadBalancer:\n      localityLbSetting:\n        distribute:\n        - from: r1/z1/*\n          to: {\"r1/z1/*\": 75, \"r1/z2/*\": 25}\n", "r1/z2/*");
    assert_eq!(tally(8), served(&[("reviews-v1", 2), ("reviews-v2", 6)]));
    lab.reviews_dr("    outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 60s, maxEjectionPercent: 100}\n", "consecutive5xxErrors");
    assert_eq!(tally(4), served(&[("reviews-v2", 4)]));
    let mut c = lab.client(2, lab.vip(101));
    let r = c.request("GET", "/fail?reviews-v2=500", b"");
    assert_eq!(
        (r.status, r.header("x-served-by")),
        (500, Some("reviews-v2")),
        "{}",
        r.text()
    );
    assert_eq!(tally(4), served(&[("reviews-v1", 4)]));
}

/// Least request (Istio's default) sends new requests away from an endpoint still busy with
/// one, where round robin keeps taking turns; `warmup` gives an endpoint that joins the
/// service a small share first (Envoy's slow start).
#[test]
fn least_request_avoids_a_busy_endpoint_and_warmup_ramps_up_a_new_one() {
    let lab = Lab::start(60, "wp-least", &[]);
    let n = lab.n;
    let v1 = SocketAddr::new(ip(n, 11), 9080);
    let v2 = SocketAddr::new(ip(n, 12), 9080);
    server(v1, "reviews-v1");
    server(v2, "reviews-v2");
    // One request held for 3 s by whichever endpoint takes it, and 8 more meanwhile: what
    // served the held one, and the tally of the others.
    let held_so_far = || {
        [v1, v2]
            .iter()
            .map(|a| {
                seen(*a)
                    .iter()
                    .filter(|s| s.path == "/slow?ms=3000")
                    .count()
            })
            .sum::<usize>()
    };
    let busy_then_tally = || {
        let before = held_so_far();
        let mut held = lab.client(2, lab.vip(101));
        held.send(b"GET /slow?ms=3000 HTTP/1.1\r\nHost: reviews:9080\r\n\r\n");
        wait_until(
            Duration::from_secs(10),
            || held_so_far() > before,
            || lab.w.proc.log(),
        );
        let others = lab.tally(8);
        let r = held.read();
        assert_eq!(r.status, 200, "{}", r.text());
        (
            r.header("x-served-by").unwrap_or_default().to_string(),
            others,
        )
    };
    let other = |busy: &str| match busy {
        "reviews-v1" => "reviews-v2",
        _ => "reviews-v1",
    };

    // No DestinationRule: least request. The endpoint holding a request gets none of the 8.
    for _ in 0..2 {
        let (busy, others) = busy_then_tally();
        assert_eq!(others, served(&[(other(&busy), 8)]), "held by {busy}");
    }
    // Round robin takes turns whatever is in flight.
    lab.reviews_dr("    loadBalancer: {simple: ROUND_ROBIN}\n", "ROUND_ROBIN");
    let (_, others) = busy_then_tally();
    assert_eq!(others, served(&[("reviews-v1", 4), ("reviews-v2", 4)]));

    // Slow start over 6 s, aggression 0.25 (the share stays at the 10% minimum for the first
    // 3.4 s): v1 is seen first, alone (v2 not ready), and warms up while it serves a request a
    // second; v2 then joins at 10% of its weight, about 1 request in 11.
    lab.reviews_dr(
        "    loadBalancer: {warmup: {duration: 6s, aggression: 0.25}}\n",
        "durationMs",
    );
    let mut generation = 1;
    lab.remesh(&mut generation, &|y| {
        place(y, "reviews-v2", "  status: Unhealthy\n")
    });
    for _ in 0..7 {
        assert_eq!(lab.tally(1), served(&[("reviews-v1", 1)]));
        std::thread::sleep(Duration::from_secs(1));
    }
    lab.remesh(&mut generation, &|y| y);
    let tally = lab.tally(200);
    let v2_share = tally
        .iter()
        .find(|(who, _)| who == "reviews-v2")
        .map_or(0, |t| t.1);
    assert!(
        (1..=40).contains(&v2_share),
        "a warming endpoint gets about 18 of 200 (at most 40): {tally:?}"
    );
    assert!(
        config_dump(&lab).contains("\"LEAST_REQUEST\""),
        "{}",
        config_dump(&lab)
    );
}

/// `y` with `who`'s own waypoint taken away (its services keep theirs).
fn drop_waypoint(y: String, who: &str) -> String {
    let at = y.find(&format!("  name: {who}\n")).unwrap();
    let (head, tail) = y.split_at(at);
    let end_mark = "hboneMtlsPort: 15008\n";
    let wp = tail.find("  waypoint:\n").unwrap();
    let end = wp + tail[wp..].find(end_mark).unwrap() + end_mark.len();
    format!("{head}{}{}", &tail[..wp], &tail[end..])
}

/// The paths both reviews backends were asked for, in order of arrival per backend.
fn reviews_paths(lab: &Lab) -> Vec<(String, String)> {
    [11, 12]
        .iter()
        .flat_map(|h| seen(SocketAddr::new(ip(lab.n, *h), 9080)))
        .map(|s| (s.path, s.authority))
        .collect()
}

/// The security review's H1, H2 and M2. The waypoint serves a CONNECT only when its target is
/// bound to it (a service or workload whose waypoint this is): anything else gets 400 and is
/// counted, so it is no relay to the rest of the mesh under its own identity. Every request is
/// normalised before JWT, policy and routing (Istio's default BASE), so a DENY on `/admin`
/// holds against each spelling of it, and the backend receives the normalised path; an
/// absolute-form target and `Host` name one authority for policy and backend alike.
#[test]
fn the_waypoint_serves_only_what_is_bound_to_it_and_policy_sees_one_normalised_request() {
    let deny = resource(
        "wp-zt-res",
        "deny.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-admin, namespace: default}\nspec:\n  targetRefs:\n  - {kind: Service, group: \"\", name: reviews}\n  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [\"/admin\"]}\n  - to:\n    - operation: {hosts: [\"secret.example\"]}\n",
    );
    let ip_only = resource(
        "wp-zt-res",
        "ip.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ipcheck-from-9, namespace: default}\nspec:\n  targetRefs:\n  - {kind: Service, group: \"\", name: reviews}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {ipBlocks: [\"127.0.58.9/32\"]}\n    to:\n    - operation: {paths: [\"/ipcheck\"]}\n  - to:\n    - operation: {notPaths: [\"/ipcheck\"]}\n",
    );
    let lab = Lab::start(58, "wp-zt", &[("deny.yaml", &deny), ("ip.yaml", &ip_only)]);
    let n = lab.n;
    for (name, host) in [
        ("productpage-v1", 10),
        ("reviews-v1", 11),
        ("reviews-v2", 12),
        ("ext-authz-v1", 13),
    ] {
        server(SocketAddr::new(ip(n, host), 9080), name);
    }
    let mut c = lab.client(2, lab.vip(101));
    for p in [
        "/admin",
        "/%61dmin",
        "/./admin",
        "/public/../admin",
        "/x/%2e%2e/admin",
        "/x/%2E%2E/admin",
        "/admin?x=1",
    ] {
        let r = c.request("GET", p, b"");
        assert_eq!(r.status, 403, "{p}: {}", r.text());
    }
    assert!(
        !reviews_paths(&lab).iter().any(|(p, _)| p.contains("admin")),
        "a denied request reached a backend: {:?}",
        reviews_paths(&lab)
    );
    // Not decoded twice; under BASE `//admin` is its own path (as Istio).
    for (p, backend) in [
        ("/%2561dmin", "/%2561dmin"),
        ("//admin", "//admin"),
        ("/public/../reviews/1?q=/../x", "/reviews/1?q=/../x"),
        ("/%72eviews/%7e2", "/reviews/~2"),
    ] {
        let r = c.request("GET", p, b"");
        assert_eq!(r.status, 200, "{p}: {}", r.text());
        assert!(
            reviews_paths(&lab).iter().any(|(got, _)| got == backend),
            "{p}: the backends saw {:?}",
            reviews_paths(&lab)
        );
    }
    // Refused outright: an encoded NUL, a method not in upper case.
    assert_eq!(c.request("GET", "/r%00", b"").status, 400);
    assert_eq!(c.request("get", "/r", b"").status, 400);
    // One authority: the absolute-form target's, for policy and backend both.
    assert_eq!(
        c.request_to("GET", "/r", "secret.example").status,
        403,
        "the DENY on the host"
    );
    let r = c.request_to("GET", "http://reviews:9080/abs", "secret.example");
    assert_eq!(r.status, 200, "{}", r.text());
    let abs: Vec<_> = reviews_paths(&lab)
        .into_iter()
        .filter(|(p, _)| p == "/abs")
        .collect();
    assert_eq!(
        abs,
        [("/abs".to_string(), "reviews:9080".to_string())],
        "the backend saw another authority than policy did"
    );

    // M6: the client address is the HBONE peer's. A tunnel's CONNECT carries `Forwarded:
    // for=` of whoever connected to it (127.0.58.9 here, the one address /ipcheck admits);
    // the tunnel's own connection to the waypoint comes from elsewhere: denied.
    let listen = SocketAddr::new(ip(n, 2), 18095);
    let _t = sleep_tunnel(
        &lab,
        listen,
        SocketAddr::new(ip(n, 20), 15008),
        lab.vip(101),
        "bookinfo-waypoint",
    );
    let from_9 = || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::new(ip(n, 9), 0).into()).unwrap();
        s.connect(&listen.into()).unwrap();
        let mut c: TcpStream = s.into();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"GET /ipcheck HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        let _ = c.read_to_string(&mut text);
        text
    };
    let answer = from_9();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert_eq!(
        c.request("GET", "/ipcheck", b"").status,
        403,
        "sleep is not 127.0.58.9"
    );

    // H1: productpage's workload loses its own waypoint (its service keeps it); tunnels
    // straight to the waypoint with sleep's certificate then ask for each kind of target.
    let mut generation = 1;
    lab.remesh(&mut generation, &|y| drop_waypoint(y, "productpage-v1"));
    let refused = |reason: &str| {
        metric(
            &lab.w.metrics(),
            "zring_waypoint_refused_total",
            &[&format!("reason=\"{reason}\"")],
        )
        .unwrap_or(0)
    };
    let waypoint = SocketAddr::new(ip(n, 20), 15008);
    for (port, target, served, reason) in [
        // A service bound to the waypoint, and a workload bound to it.
        (18090, SocketAddr::new(ip(n, 100), 9080), true, ""),
        (18091, SocketAddr::new(ip(n, 11), 9080), true, ""),
        // The pod of a service-bound backend (would skip targetRefs: Service policies), a
        // workload with no waypoint at all, and an address outside the mesh.
        (18092, SocketAddr::new(ip(n, 10), 9080), false, "not_bound"),
        (18093, SocketAddr::new(ip(n, 13), 9080), false, "not_bound"),
        (
            18094,
            SocketAddr::new(ip(n, 99), 9080),
            false,
            "unknown_destination",
        ),
    ] {
        let before = (!reason.is_empty()).then(|| refused(reason));
        let hits = seen(target).len();
        let listen = SocketAddr::new(ip(n, 2), port);
        let _t = sleep_tunnel(&lab, listen, waypoint, target, "bookinfo-waypoint");
        let (st, body) = http_get(listen, "GET", "/productpage");
        if served {
            assert_eq!(st, 200, "{target}: {body}\n{}", lab.w.proc.log());
        } else {
            assert_ne!(st, 200, "{target} was served: {body}");
            wait_until(
                Duration::from_secs(5),
                || Some(refused(reason)) > before,
                || lab.w.metrics(),
            );
            assert_eq!(seen(target).len(), hits, "{target} was reached");
        }
    }
    let log = lab.w.proc.log();
    assert!(
        log.contains("CONNECT refused") && log.contains("NR"),
        "{log}"
    );
}
