//! Two `zring run` node proxies on loopback, real TLS: sleep -> SOCKS5 (node A) -> HBONE ->
//! node B -> productpage, with the seeds' policy; a VIP; passthrough to a TCP-only workload.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

mod common;

use common::{echo_at, tmp, Proc, ZRING};

/// A per-run 127.X.0.0/16 so parallel runs do not share addresses.
fn net_octet() -> u8 {
    10 + (std::process::id() % 200) as u8
}

fn ip(b: u8, c: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, net_octet(), b, c))
}

fn config(dir: &std::path::Path) -> PathBuf {
    let (sleep, notsleep, pp, db, vip) = (ip(1, 2), ip(1, 3), ip(2, 2), ip(2, 9), ip(20, 20));
    let yaml = format!(
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

fn zring(args: &[&str]) -> Proc {
    Proc::spawn(args)
}

fn wait(addr: SocketAddr, p: &mut Proc) {
    p.wait_listening(addr);
}

/// SOCKS5 CONNECT from `src` through `proxy` to `dst`; returns the reply code and the stream.
fn socks(src: IpAddr, proxy: SocketAddr, dst: SocketAddr) -> (u8, TcpStream) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(src, 0).into()).unwrap();
    s.connect(&proxy.into()).unwrap();
    let mut c: TcpStream = s.into();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(&[5, 1, 0]).unwrap();
    let mut g = [0u8; 2];
    c.read_exact(&mut g).unwrap();
    assert_eq!(g, [5, 0]);
    let IpAddr::V4(v4) = dst.ip() else {
        unreachable!()
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.octets());
    req.extend_from_slice(&dst.port().to_be_bytes());
    c.write_all(&req).unwrap();
    let mut r = [0u8; 10];
    c.read_exact(&mut r).unwrap();
    (r[1], c)
}

fn echo_through(mut c: TcpStream, data: &[u8]) -> Vec<u8> {
    c.write_all(data).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    got
}

#[test]
fn sleep_reaches_productpage_over_hbone_notsleep_is_denied_and_tcp_passes_through() {
    let dir = tmp("mesh");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca");
    assert!(Command::new(ZRING)
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success());
    let cfg = config(&dir);
    echo_at(SocketAddr::new(ip(2, 2), 9080));
    echo_at(SocketAddr::new(ip(2, 9), 5432));
    let socks_addr = SocketAddr::new(ip(1, 1), 15080);
    let (cfg_s, ca_s, socks_s) = (
        cfg.to_str().unwrap().to_string(),
        ca.to_str().unwrap().to_string(),
        socks_addr.to_string(),
    );
    let mut b = zring(&[
        "run",
        "--config",
        &cfg_s,
        "--node-name",
        "node-b",
        "--ca-dir",
        &ca_s,
        "--packet-mark",
        "0",
        "--workers",
        "1",
    ]);
    wait(SocketAddr::new(ip(2, 2), 15008), &mut b);
    let mut a = zring(&[
        "run",
        "--config",
        &cfg_s,
        "--node-name",
        "node-a",
        "--ca-dir",
        &ca_s,
        "--packet-mark",
        "0",
        "--bind-source",
        "--socks5",
        &socks_s,
        "--workers",
        "1",
    ]);
    wait(socks_addr, &mut a);

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
            a.log(),
            b.log()
        );
        assert!(
            echo_through(c, &payload) == payload,
            "byte-exact through HBONE to {dst}"
        );
    }
    // notsleep -> productpage: denied by the destination's policy.
    let (code, _c) = socks(ip(1, 3), socks_addr, SocketAddr::new(ip(2, 2), 9080));
    assert_eq!(code, 2, "notsleep must be refused (SOCKS5 'not allowed')");
    // sleep -> the TCP-only workload: passed through, not tunnelled.
    let (code, c) = socks(ip(1, 2), socks_addr, SocketAddr::new(ip(2, 9), 5432));
    assert_eq!(code, 0);
    assert_eq!(echo_through(c, b"plain"), b"plain");
    std::thread::sleep(Duration::from_millis(200));

    let (la, lb) = (a.log(), b.log());
    assert!(
        lb.contains("denied by policy") && lb.contains("DENY") && lb.contains("notsleep"),
        "B logs the denial:\n{lb}"
    );
    assert!(
        la.contains("path=\"hbone\"") || la.contains("path=hbone"),
        "A logs the HBONE path:\n{la}"
    );
    assert!(la.contains("passthrough"), "A logs the passthrough:\n{la}");
    assert!(
        lb.contains("spiffe://cluster.local/ns/default/sa/sleep"),
        "B sees sleep's identity:\n{lb}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
