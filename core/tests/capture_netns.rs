//! Real kernel capture: inside a network namespace created for the test, iptables REDIRECT
//! sends workloads' outbound TCP to zring's 15001 (the dedicated / same-namespace deployment)
//! and an outsider's inbound TCP to 15006; zring finds the original destination with
//! SO_ORIGINAL_DST. No SOCKS5 anywhere.
//!
//! Needs root (CI runs as root). Elsewhere it prints a loud SKIPPED line and returns.

use std::time::{Duration, Instant};

use zring_runtime::net::NetNs;

mod common;

use common::{
    ca_init,
    netns::{echo_in, exchange, is_root, TestNs},
    tmp, Proc,
};

const CONFIG: &str = r#"workloads:
- uid: c//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["10.230.1.2"]
  protocol: HBONE
  node: node-a
- uid: c//v1/Pod/default/notsleep
  name: notsleep
  namespace: default
  serviceAccount: notsleep
  workloadIps: ["10.230.1.3"]
  protocol: HBONE
  node: node-a
- uid: c//v1/Pod/default/productpage
  name: productpage
  namespace: default
  serviceAccount: bookinfo-productpage
  workloadIps: ["10.230.2.2"]
  protocol: HBONE
  node: node-b
  authorizationPolicies: ["default/productpage-viewer"]
- uid: c//v1/Pod/default/legacy-db
  name: legacy-db
  namespace: default
  serviceAccount: legacy-db
  workloadIps: ["10.230.2.9"]
  protocol: TCP
  node: node-b
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

fn get(ns: &NetNs, addr: &str, path: &str) -> (u16, String) {
    let r = exchange(
        ns,
        Some("127.0.0.1:0"),
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let text = String::from_utf8_lossy(&r.unwrap_or_default()).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn wait_ready(ns: &NetNs, addr: &str, p: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while get(ns, addr, "/healthz/ready").0 != 200 {
        if let Some(st) = p.child.try_wait().unwrap() {
            panic!("zring exited ({st}):\n{}", p.log());
        }
        assert!(Instant::now() < deadline, "never ready:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A test namespace with the workloads' addresses, echo servers for productpage and legacy-db,
/// capture `rules` (each a command run inside), and zring node-b and node-a (with `a_extra`).
struct Mesh {
    ns: NetNs,
    a: Proc,
    b: Proc,
    dir: std::path::PathBuf,
    _guard: TestNs,
}

impl Mesh {
    fn start(tag: &str, rules: &[&[&str]], a_extra: &[&str]) -> Mesh {
        let guard = TestNs::new(tag);
        let name = guard.name.clone();
        let exec = |args: &[&str]| guard.exec(args);
        for a in [
            "10.230.1.2",
            "10.230.1.3",
            "10.230.2.2",
            "10.230.2.9",
            "10.230.9.9",
        ] {
            exec(&["ip", "addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        for r in rules {
            exec(r);
        }
        let ns = guard.open();
        echo_in(&ns, "10.230.2.2:9080");
        echo_in(&ns, "10.230.2.9:5432");
        let dir = tmp(tag);
        let ca = ca_init(&dir);
        let cfg = dir.join("mesh.yaml");
        std::fs::write(&cfg, CONFIG).unwrap();
        let (cfg, ca) = (
            cfg.to_str().unwrap().to_string(),
            ca.to_str().unwrap().to_string(),
        );
        let common = |node: &'static str, host: &'static str, extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = [
                "run",
                "--config",
                &cfg,
                "--node-name",
                node,
                "--ca-dir",
                &ca,
                "--workers",
                "1",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            for (flag, port) in [
                ("--admin-addr", 15000),
                ("--stats-addr", 15020),
                ("--readiness-addr", 15021),
            ] {
                v.push(flag.into());
                v.push(format!("{host}:{port}"));
            }
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        let args_b = common(
            "node-b",
            "127.0.0.3",
            &["--inbound-plaintext-addr", "127.0.0.1:15006"],
        );
        let args_a = common("node-a", "127.0.0.2", a_extra);
        let mut b = Proc::spawn_in_netns(
            &name,
            &args_b.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let mut a = Proc::spawn_in_netns(
            &name,
            &args_a.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        wait_ready(&ns, "127.0.0.3:15021", &mut b);
        wait_ready(&ns, "127.0.0.2:15021", &mut a);
        Mesh {
            ns,
            a,
            b,
            dir,
            _guard: guard,
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn tproxy_capture_reaches_the_original_destination() {
    if !is_root() {
        eprintln!("SKIPPED tproxy_capture_reaches_the_original_destination: needs root for a network namespace, iptables and policy routing (CI runs as root)");
        return;
    }
    // TPROXY (mangle PREROUTING; looped-back packets pass it) hands the connection to the
    // IP_TRANSPARENT listener unchanged (no NAT): the accepted socket's local address is the
    // original destination. This checks that such a listener works end to end; it does not
    // tell which of the two lookups (SO_ORIGINAL_DST, local address) produced the address.
    let m = Mesh::start(
        "tp",
        &[
            &[
                "iptables",
                "-t",
                "mangle",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "-s",
                "10.230.1.0/24",
                "-d",
                "10.230.2.0/24",
                "-m",
                "mark",
                "!",
                "--mark",
                "1337",
                "-j",
                "TPROXY",
                "--on-ip",
                "127.0.0.1",
                "--on-port",
                "15001",
                "--tproxy-mark",
                "0x1/0x1",
            ],
            &["ip", "rule", "add", "fwmark", "0x1/0x1", "lookup", "100"],
            &[
                "ip",
                "route",
                "add",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                "100",
            ],
        ],
        &[
            "--outbound-addr",
            "127.0.0.1:15001",
            "--transparent",
            "--bind-source",
        ],
    );
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let got = exchange(&m.ns, Some("10.230.1.2:0"), "10.230.2.2:9080", &payload).unwrap();
    assert!(
        got == payload,
        "sleep -> productpage through TPROXY\nA:\n{}\nB:\n{}",
        m.a.log(),
        m.b.log()
    );
    let denied = exchange(&m.ns, Some("10.230.1.3:0"), "10.230.2.2:9080", b"hello");
    assert!(
        denied.map(|d| d.is_empty()).unwrap_or(true),
        "notsleep must get nothing back"
    );
    std::thread::sleep(Duration::from_millis(200));
    let la = m.a.log();
    assert!(
        la.contains("dst.addr=10.230.2.2:9080") && la.contains("path=\"hbone\""),
        "A tunnels the TPROXY'd connection to its original destination:\n{la}"
    );
}

#[test]
fn redirected_outbound_and_inbound_plaintext_use_the_original_destination() {
    if !is_root() {
        eprintln!("SKIPPED redirected_outbound_and_inbound_plaintext_use_the_original_destination: needs root for a network namespace and iptables (CI runs as root)");
        return;
    }
    // The capture rules: zring's own (marked) sockets are skipped; the workloads' outbound TCP
    // goes to 15001; an outsider's TCP to node-b's workloads goes to 15006.
    let m = Mesh::start(
        "rd",
        &[
            &[
                "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "mark", "--mark",
                "1337", "-j", "RETURN",
            ],
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-s",
                "10.230.1.0/24",
                "-d",
                "10.230.0.0/16",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15001",
            ],
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-s",
                "10.230.9.0/24",
                "-d",
                "10.230.2.0/24",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15006",
            ],
        ],
        &["--outbound-addr", "127.0.0.1:15001", "--bind-source"],
    );
    let (ns, a, b) = (&m.ns, &m.a, &m.b);
    // sleep connects straight to productpage: captured, tunnelled, delivered, byte-exact.
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let got = exchange(ns, Some("10.230.1.2:0"), "10.230.2.2:9080", &payload).unwrap();
    assert!(
        got == payload,
        "sleep -> productpage through capture ({} bytes back)\nA:\n{}\nB:\n{}",
        got.len(),
        a.log(),
        b.log()
    );
    // notsleep is denied by productpage's policy: the captured connection is reset, no data.
    let denied = exchange(ns, Some("10.230.1.3:0"), "10.230.2.2:9080", b"hello");
    assert!(
        denied.map(|d| d.is_empty()).unwrap_or(true),
        "notsleep must get nothing back"
    );
    // sleep -> the TCP-only workload: passthrough.
    assert_eq!(
        exchange(ns, Some("10.230.1.2:0"), "10.230.2.9:5432", b"plain").unwrap(),
        b"plain"
    );
    // An outsider's plaintext to productpage: 15006, no identity, the policy denies.
    let denied = exchange(ns, Some("10.230.9.9:0"), "10.230.2.2:9080", b"hello");
    assert!(
        denied.map(|d| d.is_empty()).unwrap_or(true),
        "plaintext to productpage must be denied"
    );
    // An outsider's plaintext to a workload without policy: delivered.
    assert_eq!(
        exchange(ns, Some("10.230.9.9:0"), "10.230.2.9:5432", b"open").unwrap(),
        b"open"
    );
    std::thread::sleep(Duration::from_millis(300));

    let (la, lb) = (a.log(), b.log());
    assert!(
        la.contains("dst.addr=10.230.2.2:9080") && la.contains("path=\"hbone\""),
        "A tunnels the captured connection to its original destination:\n{la}"
    );
    assert!(
        la.contains("path=\"passthrough\"") && la.contains("dst.addr=10.230.2.9:5432"),
        "{la}"
    );
    let (_, mb) = get(ns, "127.0.0.3:15020", "/metrics");
    let count = |labels: &[&str]| -> u64 {
        mb.lines()
            .filter(|l| {
                l.starts_with("istio_tcp_connections_opened_total{")
                    && labels.iter().all(|x| l.contains(x))
            })
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()))
            .sum()
    };
    assert_eq!(
        count(&[
            "source_workload=\"sleep\"",
            "destination_workload=\"productpage\"",
            "connection_security_policy=\"mutual_tls\"",
            "response_flags=\"-\""
        ]),
        1,
        "{mb}\n{lb}"
    );
    assert_eq!(
        count(&["source_workload=\"notsleep\"", "response_flags=\"DENY\""]),
        1,
        "{mb}"
    );
    assert_eq!(
        count(&[
            "destination_workload=\"productpage\"",
            "connection_security_policy=\"unknown\"",
            "response_flags=\"DENY\""
        ]),
        1,
        "plaintext denial:\n{mb}"
    );
    assert_eq!(
        count(&[
            "destination_workload=\"legacy-db\"",
            "connection_security_policy=\"unknown\"",
            "response_flags=\"-\""
        ]),
        1,
        "plaintext delivery:\n{mb}"
    );
}
