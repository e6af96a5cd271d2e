//! The node proxy's side of the security review of 6b1deb9 (M3, M4, M5), probed as the review
//! probed it: two `zring run` node proxies on loopback, real TLS, raw CONNECTs from
//! `zring tunnel client` with certificates from the mesh's CA, SOCKS5 as a workload.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

mod common;

use common::{
    ca_init,
    mesh::{socks, Node},
    tmp, wait_until, Proc,
};

fn ip(host: u8) -> IpAddr {
    IpAddr::from([127, 0, 56, host])
}

/// sleep on node-a; app, other and ipguard (no loopback source may connect) on node-b.
fn mesh() -> String {
    let wl = |name: &str, host: u8, node: &str, extra: &str| {
        format!("- uid: c//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {name}\n  workloadIps: [\"127.0.56.{host}\"]\n  protocol: HBONE\n  node: {node}\n{extra}")
    };
    let mut y = String::from("workloads:\n");
    y += &wl("sleep", 2, "node-a", "");
    y += &wl("app", 10, "node-b", "");
    y += &wl("other", 11, "node-b", "");
    y += &wl(
        "ipguard",
        12,
        "node-b",
        "  authorizationPolicies: [\"default/ipguard-deny-net\"]\n",
    );
    y += "policies:\n- name: ipguard-deny-net\n  namespace: default\n  scope: WorkloadSelector\n  action: Deny\n  dryRun: false\n  rules:\n  - - - sourceIps: [\"127.0.0.0/8\"]\n";
    y
}

/// A server at `addr` that writes `tag` to each connection and closes it.
fn tag_at(addr: SocketAddr, tag: &'static str) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(tag.as_bytes());
        }
    });
}

/// What a fresh connection to `addr` reads before the far end closes (empty: refused).
fn read_from(addr: SocketAddr) -> String {
    let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return String::new();
    };
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut s = String::new();
    let _ = c.read_to_string(&mut s);
    s
}

/// `zring tunnel client` on `listen` presenting `identity` (issued by the mesh's CA): HBONE to
/// `server`, CONNECT `target`.
fn tunnel(
    ca: &Path,
    listen: SocketAddr,
    identity: &str,
    server: SocketAddr,
    target: SocketAddr,
) -> Proc {
    let expect = format!(
        "spiffe://cluster.local/ns/default/sa/{}",
        workload_at(server.ip())
    );
    common::tunnel_client(ca, listen, identity, server, target, &expect)
}

/// The workload (and service account) at `ip` in [`mesh`].
fn workload_at(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(v4) => match v4.octets()[3] {
            2 => "sleep",
            10 => "app",
            11 => "other",
            12 => "ipguard",
            _ => "nobody",
        },
        IpAddr::V6(_) => "nobody",
    }
}

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";

/// M3: a CONNECT is served only for the address whose listener took it (ztunnel's
/// `validate_destination`: 400 otherwise), and never for one of zring's own ports (503
/// self-call), so no nested tunnel can launder its source address past `sourceIps`. M5: a
/// peer certificate from the mesh's root but for a foreign trust domain fails the handshake.
#[test]
fn inbound_connects_reach_only_their_listeners_workload_from_the_local_trust_domain() {
    let dir = tmp("sec-inbound");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = ca_init(&dir);
    let cfg = dir.join("mesh.yaml");
    std::fs::write(&cfg, mesh()).unwrap();
    let mut b = Node::start("node-b", ip(5), &cfg, &ca, &["--bind-source"]);
    b.wait_ready();
    for (host, tag) in [(10, "app"), (11, "other"), (12, "ipguard")] {
        tag_at(SocketAddr::new(ip(host), 7000), tag);
    }
    let hbone = |host: u8| SocketAddr::new(ip(host), 15008);
    let app = SocketAddr::new(ip(10), 7000);
    let cases: [(u16, &str, SocketAddr, SocketAddr, &str, &str); 5] = [
        // The control: the listener's own workload.
        (17000, SLEEP, hbone(10), app, "app", ""),
        // Another workload through app's listener.
        (
            17001,
            SLEEP,
            hbone(10),
            SocketAddr::new(ip(11), 7000),
            "",
            "another workload's listener",
        ),
        // zring's own HBONE port: the first hop of a nested tunnel.
        (17002, SLEEP, hbone(10), hbone(10), "", "self-call"),
        (
            17003,
            SLEEP,
            hbone(12),
            SocketAddr::new(ip(12), 15006),
            "",
            "self-call",
        ),
        // The same root, another trust domain.
        (
            17004,
            "spiffe://evil.example/ns/default/sa/sleep",
            hbone(10),
            app,
            "",
            "outside the trust domain",
        ),
    ];
    for (port, id, server, target, want, logged) in cases {
        let listen = SocketAddr::new(ip(2), port);
        let _t = tunnel(&ca, listen, id, server, target);
        assert_eq!(read_from(listen), want, "{id} via {server} to {target}");
        if !logged.is_empty() {
            wait_until(
                Duration::from_secs(5),
                || b.proc.log().contains(logged),
                || b.proc.log(),
            );
        }
    }
    // ipguard's DENY on loopback sources holds for a tunnel straight to it.
    let listen = SocketAddr::new(ip(2), 17005);
    let _t = tunnel(&ca, listen, SLEEP, hbone(12), SocketAddr::new(ip(12), 7000));
    assert_eq!(read_from(listen), "");
    wait_until(
        Duration::from_secs(5),
        || b.proc.log().contains("ipguard-deny-net"),
        || b.proc.log(),
    );
}

/// M4: a workload cannot reach its node proxy's admin, stats, readiness or listeners through
/// SOCKS5 (or capture): a loopback address on one of zring's ports, or an address zring
/// listens on, is a self-call and refused (SOCKS5 reply 2); other loopback destinations
/// outside the mesh stay reachable, and so does the node proxy for whoever is not a workload.
#[test]
fn workloads_cannot_reach_their_node_proxys_admin_or_listeners() {
    let dir = tmp("sec-selfcall");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = ca_init(&dir);
    let cfg = dir.join("mesh.yaml");
    std::fs::write(&cfg, mesh()).unwrap();
    let socks5 = SocketAddr::new(ip(1), 15080);
    let mut a = Node::start(
        "node-a",
        ip(1),
        &cfg,
        &ca,
        &["--bind-source", "--socks5", &socks5.to_string()],
    );
    a.wait_ready();
    let outside = SocketAddr::new(ip(30), 7000);
    tag_at(outside, "outside");
    let (code, mut s) = socks(ip(2), socks5, outside);
    assert_eq!(code, 0, "{}", a.proc.log());
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    assert_eq!(got, "outside");
    for target in [
        a.admin,
        a.stats,
        a.ready,
        socks5,
        SocketAddr::new(ip(1), 15008),
        "127.0.0.1:15000".parse().unwrap(),
        "127.0.0.1:15001".parse().unwrap(),
        SocketAddr::new(ip(2), 15008),
    ] {
        let (code, _s) = socks(ip(2), socks5, target);
        assert_eq!(
            code,
            2,
            "SOCKS5 to {target} was not refused:\n{}",
            a.proc.log()
        );
    }
    wait_until(
        Duration::from_secs(5),
        || a.proc.log().contains("a self-call"),
        || a.proc.log(),
    );
    // The node proxy itself still answers whoever is not a workload (the test, here).
    assert_eq!(
        common::mesh::http_get(a.admin, "GET", "/config_dump").0,
        200
    );
}
