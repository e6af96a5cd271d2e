//! In-pod redirection end to end, with real kernel parts: two pod network namespaces joined by
//! a veth pair, `zring node-agent` enrolling them over ZDS (iptables rules inside each pod),
//! `zring run --zds-socket` binding 15001/15006/15008 inside the pods and originating from
//! them. tcpdump on the wire between the pods proves the bytes crossed as HBONE on 15008.
//!
//! Needs root (CI runs as root). Elsewhere it prints a loud SKIPPED line and returns.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use zring_runtime::net::NetNs;

mod common;

use common::{
    ca_init,
    netns::{agent_add, agent_remove, echo_in, exchange, is_root, sh, TestNs},
    tmp, Proc,
};

const CONFIG: &str = r#"workloads:
- uid: c//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["10.233.1.2"]
  protocol: HBONE
  node: node-1
- uid: c//v1/Pod/default/productpage
  name: productpage
  namespace: default
  serviceAccount: bookinfo-productpage
  workloadIps: ["10.233.2.2"]
  protocol: HBONE
  node: node-1
  authorizationPolicies: ["default/productpage-viewer"]
policies:
- name: productpage-viewer
  namespace: default
  scope: WorkloadSelector
  action: Allow
  dryRun: false
  rules:
  - - - principals:
        - !Exact cluster.local/ns/default/sa/sleep
"#;

#[test]
fn pods_enrolled_over_zds_talk_hbone_on_the_wire_and_removal_closes_listeners() {
    if !is_root() {
        eprintln!("SKIPPED pods_enrolled_over_zds_talk_hbone_on_the_wire_and_removal_closes_listeners: needs root for network namespaces, veth, iptables, tcpdump (CI runs as root)");
        return;
    }
    let (pa, pb) = (TestNs::new("pa"), TestNs::new("pb"));
    let (va, vb) = (
        format!("zra{}", std::process::id() % 100_000),
        format!("zrb{}", std::process::id() % 100_000),
    );
    sh(&[
        "ip", "link", "add", &va, "netns", &pa.name, "type", "veth", "peer", "name", &vb, "netns",
        &pb.name,
    ]);
    for (ns, dev, me, peer) in [
        (&pa.name, &va, "10.233.1.2", "10.233.2.2"),
        (&pb.name, &vb, "10.233.2.2", "10.233.1.2"),
    ] {
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "ip",
            "addr",
            "add",
            &format!("{me}/32"),
            "dev",
            dev,
        ]);
        sh(&["ip", "netns", "exec", ns, "ip", "link", "set", dev, "up"]);
        sh(&[
            "ip", "netns", "exec", ns, "ip", "route", "add", peer, "dev", dev, "src", me,
        ]);
    }
    let ns_a = NetNs::open(format!("/var/run/netns/{}", pa.name)).unwrap();
    let ns_b = NetNs::open(format!("/var/run/netns/{}", pb.name)).unwrap();
    // productpage's app: an echo server inside pod b.
    echo_in(&ns_b, "10.233.2.2:9080");

    let dir = tmp("inpod");
    let ca = ca_init(&dir);
    let cfg = dir.join("mesh.yaml");
    // The config starts without sleep: its pod is handed over before the config names it.
    let without_sleep = CONFIG.replace(
        "- uid: c//v1/Pod/default/sleep\n  name: sleep\n  namespace: default\n  serviceAccount: sleep\n  workloadIps: [\"10.233.1.2\"]\n  protocol: HBONE\n  node: node-1\n",
        "",
    );
    assert_ne!(without_sleep, CONFIG);
    std::fs::write(&cfg, &without_sleep).unwrap();
    let sock = dir.join("ztunnel.sock");
    let sock_s = sock.to_str().unwrap().to_string();
    let agent = Proc::spawn(&["node-agent", "run", "--socket", &sock_s]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !zring_core::cmd::node_agent::control_path(&sock).exists() {
        assert!(
            Instant::now() < deadline,
            "agent never listened:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let host = format!("127.{}.9.1", 10 + std::process::id() % 200);
    let socks = format!("{host}:15080");
    let (admin, stats, ready) = (
        format!("{host}:15000"),
        format!("{host}:15020"),
        format!("{host}:15021"),
    );
    let zring = Proc::spawn(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--node-name",
        "node-1",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--zds-socket",
        &sock_s,
        "--workers",
        "1",
        "--admin-addr",
        &admin,
        "--stats-addr",
        &stats,
        "--readiness-addr",
        &ready,
        "--socks5",
        &socks,
    ]);
    let enroll = |ns: &TestNs, name: &str, sa: &str| {
        if let Err(e) = agent_add(&sock_s, &ns.path(), name, sa) {
            panic!(
                "enroll {name}: {e}\nagent:\n{}\nzring:\n{}",
                agent.log(),
                zring.log()
            );
        }
    };
    // The agent answers an add only once zring acked it, so wait for zring to be connected.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.log().contains("proxy connected") {
        assert!(
            Instant::now() < deadline,
            "zring never connected to the agent:\n{}\n{}",
            agent.log(),
            zring.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    enroll(&pa, "sleep", "sleep");
    enroll(&pb, "productpage", "bookinfo-productpage");
    let deadline = Instant::now() + Duration::from_secs(10);
    while zring.log().matches("pod listeners bound").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "pod listeners never bound:\n{}",
            zring.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // sleep's first connection comes before the config knows sleep: it waits (bounded) for
    // the config, and with it sleep's certificate, instead of failing.
    let early = {
        let ns = NetNs::open(format!("/var/run/netns/{}", pa.name)).unwrap();
        std::thread::spawn(move || exchange(&ns, None, "10.233.2.2:9080", b"early bird"))
    };
    std::thread::sleep(Duration::from_millis(1000));
    std::fs::write(&cfg, CONFIG).unwrap();
    zring.signal(1);
    let got = early.join().unwrap().expect("the early connection");
    assert_eq!(got, b"early bird", "{}", zring.log());

    // Capture the wire between the pods while sleep calls productpage.
    let pcap_txt = dir.join("wire.txt");
    let mut dump = Command::new("ip")
        .args([
            "netns", "exec", &pa.name, "tcpdump", "-i", &va, "-nn", "-l", "-U", "tcp",
        ])
        .stdout(std::fs::File::create(&pcap_txt).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (scripts/test installs it)");
    std::thread::sleep(Duration::from_millis(800));
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let got = exchange(&ns_a, None, "10.233.2.2:9080", &payload).unwrap();
    assert!(
        got == payload,
        "sleep -> productpage in-pod ({} bytes back)\n{}",
        got.len(),
        zring.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill")
        .args(["-INT", &dump.id().to_string()])
        .status();
    let _ = dump.wait();
    let wire = std::fs::read_to_string(&pcap_txt).unwrap_or_default();
    assert!(
        wire.contains("10.233.2.2.15008"),
        "HBONE on the wire:\n{wire}"
    );
    assert!(
        !wire.contains("10.233.2.2.9080"),
        "no plaintext to the app port on the wire:\n{wire}"
    );
    let log = zring.log();
    assert!(
        log.contains("direction=\"inbound\"")
            && log.contains("src.identity=spiffe://cluster.local/ns/default/sa/sleep"),
        "{log}"
    );

    // SOCKS5 inside the pod (127.0.0.1:15080 in its own namespace): the pod's identity is used.
    let mut c = ns_a
        .run(|| TcpStream::connect("127.0.0.1:15080"))
        .unwrap()
        .expect("SOCKS5 inside pod a");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(&[5, 1, 0]).unwrap();
    let mut g = [0u8; 2];
    c.read_exact(&mut g).unwrap();
    c.write_all(&[5, 1, 0, 1, 10, 233, 2, 2, 0x23, 0x78])
        .unwrap();
    let mut r = [0u8; 10];
    c.read_exact(&mut r).unwrap();
    assert_eq!(
        r[1],
        0,
        "SOCKS5 in the pod as sleep: allowed\n{}",
        zring.log()
    );
    c.write_all(b"via socks").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"via socks");

    // A connection that stays open across the removal (closed after the drain deadline).
    let addr: SocketAddr = "10.233.2.2:9080".parse().unwrap();
    let mut live = ns_a.run(|| TcpStream::connect(addr)).unwrap().unwrap();
    live.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    live.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    live.read_exact(&mut one).unwrap();

    // Removing productpage closes its listeners: sleep's next connection fails.
    agent_remove(&sock_s, "productpage").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !zring
        .log()
        .contains("pod removed or moved: its listeners are closed")
    {
        assert!(Instant::now() < deadline, "{}", zring.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    let mut rest = [0u8; 16];
    let end = live.read(&mut rest);
    assert!(
        matches!(end, Ok(0) | Err(_)),
        "the live connection is closed: {end:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(14),
        "closed after the drain deadline, not by the read timeout"
    );
    let after = exchange(&ns_a, None, "10.233.2.2:9080", b"hello");
    assert!(
        after.map(|d| d.is_empty()).unwrap_or(true),
        "productpage is out of the mesh now"
    );
    drop(zring);
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_zds_messages_get_error_acks_and_zring_keeps_serving_its_pods() {
    use prost::Message;
    use std::os::fd::AsFd;
    use zring_core::zds::proto::{self, workload_request::Payload};
    use zring_runtime::uds::SeqPacketListener;
    if !is_root() {
        eprintln!("SKIPPED bad_zds_messages_get_error_acks_and_zring_keeps_serving_its_pods: needs root for a network namespace (CI runs as root)");
        return;
    }
    let pod = TestNs::new("pbd");
    sh(&[
        "ip",
        "netns",
        "exec",
        &pod.name,
        "ip",
        "addr",
        "add",
        "10.236.1.2/32",
        "dev",
        "lo",
    ]);
    let dir = tmp("zdsbad");
    let ca = ca_init(&dir);
    let cfg = dir.join("mesh.yaml");
    std::fs::write(&cfg, CONFIG.replace("10.233.1.2", "10.236.1.2")).unwrap();
    // The test is the agent: it speaks raw ZDS to a real zring.
    let sock = dir.join("zds.sock");
    let l = SeqPacketListener::bind(&sock).unwrap();
    let host = format!("127.{}.9.2", 10 + std::process::id() % 200);
    let zring = Proc::spawn(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--node-name",
        "node-1",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--zds-socket",
        sock.to_str().unwrap(),
        "--workers",
        "1",
        "--admin-addr",
        &format!("{host}:15000"),
        "--stats-addr",
        &format!("{host}:15020"),
        "--readiness-addr",
        &format!("{host}:15021"),
    ]);
    let conn = l
        .accept_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("zring connects");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = conn.recv(&mut buf).unwrap();
    assert_eq!(
        proto::ZdsHello::decode(&buf[..n]).unwrap().version,
        proto::Version::V1 as i32
    );
    let ask = |bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]| -> String {
        conn.send(bytes, fds).unwrap();
        let mut buf = vec![0u8; 4096];
        let (n, _) = conn.recv(&mut buf).unwrap();
        match proto::WorkloadResponse::decode(&buf[..n]).unwrap().payload {
            Some(proto::workload_response::Payload::Ack(a)) => a.error,
            None => panic!("no ack"),
        }
    };
    let add = |uid: &str| {
        proto::WorkloadRequest {
            payload: Some(Payload::Add(proto::AddWorkload {
                uid: uid.into(),
                workload_info: Some(proto::WorkloadInfo {
                    name: "sleep".into(),
                    namespace: "default".into(),
                    service_account: "sleep".into(),
                }),
            })),
        }
        .encode_to_vec()
    };
    let ns_file = std::fs::File::open(format!("/var/run/netns/{}", pod.name)).unwrap();
    assert_eq!(ask(&add("good"), &[ns_file.as_fd()]), "");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !zring.log().contains("pod listeners bound") {
        assert!(Instant::now() < deadline, "{}", zring.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Garbage, and a descriptor that is not a network namespace: error acks.
    assert!(ask(&[0xde, 0xad, 0xbe, 0xef], &[]).contains("malformed"));
    let (pipe_r, _pipe_w) = std::io::pipe().unwrap();
    assert!(ask(&add("bad"), &[pipe_r.as_fd()]).contains("not a network namespace"));
    // The good pod is still served: its HBONE port inside its namespace accepts.
    let ns = NetNs::open(format!("/var/run/netns/{}", pod.name)).unwrap();
    let addr: SocketAddr = "10.236.1.2:15008".parse().unwrap();
    let c = ns
        .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
        .unwrap();
    assert!(
        c.is_ok(),
        "the pod's 15008 listener is gone: {c:?}\n{}",
        zring.log()
    );
    drop(zring);
    let _ = std::fs::remove_dir_all(&dir);
}
