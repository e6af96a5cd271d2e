//! Pod lifecycle in in-pod mode, with real network namespaces, `zring node-agent` and ZDS: an
//! `AddWorkload` is acked only once the pod's listeners accept on every worker; a re-add of the
//! same uid with another namespace moves the listeners; a port that cannot be bound is an error
//! ack naming it (and no half-served pod); SIGTERM lets a long transfer through a pod finish
//! within the drain.
//!
//! Needs root (CI runs as root). Elsewhere it prints a loud SKIPPED line and returns.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use zring_runtime::net::NetNs;

mod common;

use common::{
    ca_init,
    netns::{agent_add, agent_remove, echo_in, is_root, sh, TestNs},
    tmp, Proc,
};

fn config(net: u8) -> String {
    format!(
        r#"workloads:
- uid: c//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["10.{net}.1.2"]
  protocol: HBONE
  node: node-1
- uid: c//v1/Pod/default/productpage
  name: productpage
  namespace: default
  serviceAccount: bookinfo-productpage
  workloadIps: ["10.{net}.2.2"]
  protocol: HBONE
  node: node-1
services: []
policies: []
"#
    )
}

/// Two pods (sleep, productpage) on a veth pair, a node agent, and zring in in-pod mode.
struct Node {
    sleep: TestNs,
    productpage: TestNs,
    net: u8,
    socket: String,
    agent: Proc,
    zring: Proc,
    ready: SocketAddr,
    stats: SocketAddr,
    dir: PathBuf,
}

impl Node {
    fn start(tag: &str, net: u8, extra: &[&str]) -> Node {
        let (pa, pb) = (
            TestNs::new(&format!("{tag}a")),
            TestNs::new(&format!("{tag}b")),
        );
        let id = std::process::id() % 100_000;
        let (va, vb) = (format!("zl{tag}a{id}"), format!("zl{tag}b{id}"));
        sh(&[
            "ip", "link", "add", &va, "netns", &pa.name, "type", "veth", "peer", "name", &vb,
            "netns", &pb.name,
        ]);
        let (a_ip, b_ip) = (format!("10.{net}.1.2"), format!("10.{net}.2.2"));
        for (ns, dev, me, peer) in [(&pa, &va, &a_ip, &b_ip), (&pb, &vb, &b_ip, &a_ip)] {
            ns.exec(&["ip", "addr", "add", &format!("{me}/32"), "dev", dev]);
            ns.exec(&["ip", "link", "set", dev, "up"]);
            ns.exec(&["ip", "route", "add", peer, "dev", dev, "src", me]);
        }
        echo_in(&pb.open(), &format!("{b_ip}:9080"));
        let dir = tmp(&format!("lifecycle-{tag}"));
        let ca = ca_init(&dir);
        let cfg = dir.join("mesh.yaml");
        std::fs::write(&cfg, config(net)).unwrap();
        let socket = dir.join("ztunnel.sock").to_str().unwrap().to_string();
        let agent = Proc::spawn(&["node-agent", "run", "--socket", &socket]);
        let control = zring_core::cmd::node_agent::control_path(std::path::Path::new(&socket));
        common::wait_until(
            Duration::from_secs(10),
            || control.exists(),
            || format!("agent never listened:\n{}", agent.log()),
        );
        let host = format!("127.{}.{net}.1", 10 + id % 200);
        let (admin, stats, ready) = (
            format!("{host}:15000"),
            format!("{host}:15020"),
            format!("{host}:15021"),
        );
        let mut args = vec![
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--node-name",
            "node-1",
            "--ca-dir",
            ca.to_str().unwrap(),
            "--zds-socket",
            &socket,
            "--admin-addr",
            &admin,
            "--stats-addr",
            &stats,
            "--readiness-addr",
            &ready,
            "--workers",
            "2",
        ];
        args.extend_from_slice(extra);
        let zring = Proc::spawn(&args);
        let node = Node {
            sleep: pa,
            productpage: pb,
            net,
            socket,
            agent,
            zring,
            ready: ready.parse().unwrap(),
            stats: stats.parse().unwrap(),
            dir,
        };
        node.wait_ready();
        node
    }

    fn wait_ready(&self) {
        common::wait_until(
            Duration::from_secs(15),
            || common::mesh::http_get(self.ready, "GET", "/healthz/ready").0 == 200,
            || format!("never ready:\n{}", self.zring.log()),
        );
    }

    /// Enroll the pod in namespace `ns` through the agent.
    fn add(&self, ns: &TestNs, name: &str, sa: &str) -> Result<(), String> {
        agent_add(&self.socket, &ns.path(), name, sa)
    }

    fn pod_ip(&self, pod: &str) -> String {
        match pod {
            "sleep" => format!("10.{}.1.2", self.net),
            _ => format!("10.{}.2.2", self.net),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether a TCP connect to `addr` from inside `ns` succeeds now (no retry).
fn accepts(ns: &NetNs, addr: &str) -> bool {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
        .unwrap()
}

fn skip(name: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!(
        "SKIPPED {name}: needs root for network namespaces, veth and iptables (CI runs as root)"
    );
    true
}

#[test]
fn an_add_is_acked_only_once_the_pods_listeners_accept() {
    if skip("an_add_is_acked_only_once_the_pods_listeners_accept") {
        return;
    }
    let node = Node::start("k", 236, &[]);
    let ns = node.productpage.open();
    let ip = node.pod_ip("productpage");
    // The pod gets istio-cni's rules, line for line, and the local-delivery policy route.
    node.add(&node.productpage, "productpage", "bookinfo-productpage")
        .unwrap();
    let normalize = |l: &str| {
        l.replace("-m tcp ", "")
            .replace("-m udp ", "")
            .replace("169.254.7.127/32", "169.254.7.127")
            .replace("--to-port ", "--to-ports ")
    };
    let istio = |text: &str| -> std::collections::BTreeSet<String> {
        text.lines()
            .filter(|l| l.starts_with("-A ") && l.contains("ISTIO_"))
            .map(normalize)
            .collect()
    };
    let installed = std::process::Command::new("ip")
        .args(["netns", "exec", &node.productpage.name, "iptables-save"])
        .output()
        .unwrap();
    let installed = String::from_utf8_lossy(&installed.stdout).to_string();
    let expected = istio(&zring_core::cmd::pod_rules::render(false, 1337, false));
    assert_eq!(istio(&installed), expected, "{installed}");
    let out = |args: &[&str]| {
        let o = std::process::Command::new("ip")
            .args(["netns", "exec", &node.productpage.name])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    assert!(out(&["ip", "rule"]).contains("fwmark 0x111/0xfff lookup 100"));
    assert!(out(&["ip", "route", "show", "table", "100"]).contains("local default dev lo"));
    agent_remove(&node.socket, "productpage").unwrap();
    for round in 0..5 {
        node.add(&node.productpage, "productpage", "bookinfo-productpage")
            .unwrap_or_else(|e| panic!("add refused: {e}\n{}", node.zring.log()));
        // The moment the agent has the ack, every listener accepts (both workers bound).
        for addr in [
            format!("{ip}:15008"),
            "127.0.0.1:15001".to_string(),
            "127.0.0.1:15006".to_string(),
        ] {
            assert!(
                accepts(&ns, &addr),
                "round {round}: {addr} refused right after the ack:\n{}",
                node.zring.log()
            );
        }
        agent_remove(&node.socket, "productpage").unwrap();
        common::wait_until(
            Duration::from_secs(5),
            || !accepts(&ns, &format!("{ip}:15008")),
            || "listeners still open after removal".to_string(),
        );
    }
}

#[test]
fn a_re_add_with_another_namespace_moves_the_listeners_and_a_bind_conflict_is_an_error_ack() {
    if skip(
        "a_re_add_with_another_namespace_moves_the_listeners_and_a_bind_conflict_is_an_error_ack",
    ) {
        return;
    }
    let node = Node::start("m", 237, &[]);
    let ip = node.pod_ip("productpage");
    let old = node.productpage.open();
    node.add(&node.productpage, "productpage", "bookinfo-productpage")
        .unwrap();
    assert!(accepts(&old, "127.0.0.1:15006"));
    // The same uid again with the same namespace (an agent replaying): nothing moves.
    node.add(&node.productpage, "productpage", "bookinfo-productpage")
        .unwrap();
    assert!(accepts(&old, "127.0.0.1:15006"));
    // The same uid with a new namespace: the listeners move there.
    let moved = TestNs::new("mv");
    moved.exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    let new = moved.open();
    node.add(&moved, "productpage", "bookinfo-productpage")
        .unwrap();
    assert!(accepts(&new, "127.0.0.1:15006"), "{}", node.zring.log());
    assert!(accepts(&new, &format!("{ip}:15008")));
    common::wait_until(
        Duration::from_secs(5),
        || !accepts(&old, "127.0.0.1:15006"),
        || "the old namespace still has the listeners".to_string(),
    );
    // A pod whose 15006 is taken: an error ack naming the port, and nothing left bound.
    let taken = TestNs::new("tk");
    let tk = taken.open();
    let squatter = tk
        .run(|| std::net::TcpListener::bind("0.0.0.0:15006"))
        .unwrap()
        .unwrap();
    let err = node
        .add(&taken, "sleep", "sleep")
        .expect_err("an add whose port is taken must be refused");
    assert!(
        err.contains("15006") && err.contains("in use"),
        "the error names the port and errno: {err}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !accepts(&tk, "127.0.0.1:15001"),
        "a half-served pod was left bound"
    );
    drop(squatter);
    // Still ready: a refused pod does not make the node unready.
    assert_eq!(
        common::mesh::http_get(node.ready, "GET", "/healthz/ready").0,
        200
    );
    let _ = node.stats;
}

#[test]
fn sigterm_lets_a_long_transfer_through_a_pod_finish_within_the_drain() {
    if skip("sigterm_lets_a_long_transfer_through_a_pod_finish_within_the_drain") {
        return;
    }
    for (io, net) in [("uring", 238), ("epoll", 239)] {
        drain_round(io, net);
    }
}

fn drain_round(io: &str, net: u8) {
    let mut node = Node::start(
        &format!("t{}", &io[..1]),
        net,
        &["--drain-timeout", "10s", "--io", io],
    );
    node.add(&node.sleep, "sleep", "sleep").unwrap();
    node.add(&node.productpage, "productpage", "bookinfo-productpage")
        .unwrap();
    let sleep = node.sleep.open();
    let dst: SocketAddr = format!("{}:9080", node.pod_ip("productpage"))
        .parse()
        .unwrap();
    let mut c = sleep
        .run(|| TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    // 30 chunks of 64 KiB, one every 100 ms (3 s), echoed back through both pods' listeners.
    let chunks = 30usize;
    let mut writer = c.try_clone().unwrap();
    let w = std::thread::spawn(move || {
        for i in 0..chunks {
            let chunk = vec![(i % 251) as u8; 64 * 1024];
            writer.write_all(&chunk)?;
            std::thread::sleep(Duration::from_millis(100));
        }
        writer.shutdown(Shutdown::Write)
    });
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    node.zring.signal(15);
    let mut got = Vec::new();
    c.read_to_end(&mut got)
        .expect("the transfer was cut by SIGTERM");
    w.join().unwrap().expect("the writer was cut");
    assert_eq!(got.len(), chunks * 64 * 1024, "bytes lost in the drain");
    for (i, part) in got.chunks(64 * 1024).enumerate() {
        assert!(
            part.iter().all(|&b| b == (i % 251) as u8),
            "chunk {i} corrupted"
        );
    }
    let st = node.zring.wait_exit(Duration::from_secs(12));
    assert!(
        st.success(),
        "zring exited with {st}:\n{}",
        node.zring.log()
    );
    eprintln!("{io}: transfer finished {:?} after SIGTERM", t.elapsed());
    let _ = &node.agent;
}
