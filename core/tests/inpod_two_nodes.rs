//! In-pod redirection end to end on real kernel parts, the way a cluster runs it: two "nodes"
//! (network namespaces), each with a zring and a `zring node-agent` inside, and "pods" (their
//! own namespaces) hanging off the nodes on veth pairs; the nodes are joined by a veth. The
//! agents enroll the pods over ZDS (iptables rules inside each pod); a plain client in one pod
//! talks to a plain server in another. tcpdump on the veth between the nodes proves the bytes
//! crossed as TLS on 15008 and never in plaintext.
//!
//! Needs root (CI runs as root). Elsewhere it prints a loud SKIPPED line and returns.

use std::{
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

fn inns(ns: &str, args: &[&str]) {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    sh(&v);
}

const CONFIG: &str = r#"workloads:
- uid: c//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["10.234.1.2"]
  protocol: HBONE
  node: node-1
- uid: c//v1/Pod/default/notsleep
  name: notsleep
  namespace: default
  serviceAccount: notsleep
  workloadIps: ["10.234.1.3"]
  protocol: HBONE
  node: node-1
- uid: c//v1/Pod/default/productpage
  name: productpage
  namespace: default
  serviceAccount: bookinfo-productpage
  workloadIps: ["10.234.2.2"]
  protocol: HBONE
  node: node-2
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

const SECRET: &[u8] = b"THE-PLAINTEXT-PAYLOAD-MUST-NOT-BE-ON-THE-WIRE";

fn ready(ns: &NetNs) -> bool {
    exchange(
        ns,
        None,
        "127.0.0.1:15021",
        b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .map(|r| r.starts_with(b"HTTP/1.1 200"))
    .unwrap_or(false)
}

fn wait(what: &str, mut ok: impl FnMut() -> bool, logs: &dyn Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "{what} never happened:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

struct Node {
    name: String,
    ns: NetNs,
    socket: String,
    agent: Proc,
}

#[test]
fn two_nodes_in_pod_capture_hbone_on_the_wire_policy_removal_and_restart() {
    if !is_root() {
        eprintln!("SKIPPED two_nodes_in_pod_capture_hbone_on_the_wire_policy_removal_and_restart: needs root for network namespaces, veth, iptables and tcpdump (CI runs as root)");
        return;
    }
    let id = format!(
        "{}{}",
        std::process::id() % 10_000,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            % 1000
    );
    // Every namespace is deleted when these drop (links go with them), also on failure.
    let mut namespaces: Vec<TestNs> = Vec::new();
    let mut mk = |tag: &str| {
        let ns = TestNs::new(tag);
        let name = ns.name.clone();
        namespaces.push(ns);
        name
    };
    let (n1, n2) = (mk("n1"), mk("n2"));
    let (p_sleep, p_not, p_pp) = (mk("ps"), mk("pn"), mk("pp"));
    // A veth between two namespaces; interface names are short and unique per run.
    let link = |a: &str, an: &str, b: &str, bn: &str| {
        sh(&[
            "ip", "link", "add", an, "netns", a, "type", "veth", "peer", "name", bn, "netns", b,
        ]);
        inns(a, &["ip", "link", "set", an, "up"]);
        inns(b, &["ip", "link", "set", bn, "up"]);
    };
    let v = |s: &str| format!("{s}{id}");
    link(&n1, &v("nn1"), &n2, &v("nn2"));
    for (pod, node, ip, pdev, ndev) in [
        (&p_sleep, &n1, "10.234.1.2", v("ps"), v("ns")),
        (&p_not, &n1, "10.234.1.3", v("pn"), v("nn")),
        (&p_pp, &n2, "10.234.2.2", v("pp"), v("np")),
    ] {
        link(pod, &pdev, node, &ndev);
        inns(
            pod,
            &["ip", "addr", "add", &format!("{ip}/32"), "dev", &pdev],
        );
        inns(
            pod,
            &[
                "ip",
                "route",
                "add",
                "10.234.0.0/16",
                "dev",
                &pdev,
                "src",
                ip,
            ],
        );
        // The node's own address on its side, so that its ARP has a sender address.
        let node_ip = if node == &n1 {
            "10.234.0.1/32"
        } else {
            "10.234.0.2/32"
        };
        inns(node, &["ip", "addr", "add", node_ip, "dev", &ndev]);
        inns(node, &["ip", "route", "add", ip, "dev", &ndev]);
        inns(
            node,
            &[
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.{ndev}.proxy_arp=1"),
            ],
        );
    }
    inns(
        &n1,
        &["ip", "addr", "add", "10.234.0.1/32", "dev", &v("nn1")],
    );
    inns(
        &n2,
        &["ip", "addr", "add", "10.234.0.2/32", "dev", &v("nn2")],
    );
    inns(
        &n1,
        &["ip", "route", "add", "10.234.2.0/24", "dev", &v("nn1")],
    );
    inns(
        &n2,
        &["ip", "route", "add", "10.234.1.0/24", "dev", &v("nn2")],
    );
    for (n, dev) in [(&n1, v("nn1")), (&n2, v("nn2"))] {
        inns(n, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        inns(
            n,
            &["sysctl", "-qw", &format!("net.ipv4.conf.{dev}.proxy_arp=1")],
        );
    }
    let open = |n: &str| NetNs::open(format!("/var/run/netns/{n}")).unwrap();
    // productpage's app: an echo server with no idea of the mesh.
    echo_in(&open(&p_pp), "10.234.2.2:9080");
    // Without the mesh the pods already reach each other (plain routing works).
    assert_eq!(
        exchange(&open(&p_sleep), None, "10.234.2.2:9080", b"plain").unwrap(),
        b"plain"
    );

    let dir = tmp("inpod2");
    let ca = ca_init(&dir);
    let cfg = dir.join("mesh.yaml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let (cfg_s, ca_s) = (
        cfg.to_str().unwrap().to_string(),
        ca.to_str().unwrap().to_string(),
    );
    let start_zring = |node: &Node, name: &str| {
        Proc::spawn_in_netns(
            &node.name,
            &[
                "run",
                "--config",
                &cfg_s,
                "--node-name",
                name,
                "--ca-dir",
                &ca_s,
                "--zds-socket",
                &node.socket,
                "--workers",
                "1",
            ],
        )
    };
    let nodes: Vec<Node> = [(&n1, "1"), (&n2, "2")]
        .into_iter()
        .map(|(n, k)| {
            let socket = dir
                .join(format!("node{k}.sock"))
                .to_str()
                .unwrap()
                .to_string();
            let agent = Proc::spawn_in_netns(n, &["node-agent", "run", "--socket", &socket]);
            Node {
                name: n.to_string(),
                ns: open(n),
                socket,
                agent,
            }
        })
        .collect();
    for n in &nodes {
        let c = zring_core::cmd::node_agent::control_path(std::path::Path::new(&n.socket));
        wait("agent listening", || c.exists(), &|| n.agent.log());
    }
    let z1 = start_zring(&nodes[0], "node-1");
    let mut z2 = start_zring(&nodes[1], "node-2");
    for (n, z) in [(&nodes[0], &z1), (&nodes[1], &z2)] {
        wait("zring ready", || ready(&n.ns), &|| z.log());
        wait(
            "zring connected to its agent",
            || n.agent.log().contains("proxy connected"),
            &|| z.log(),
        );
    }
    let enroll = |node: &Node, pod: &str, name: &str, sa: &str| {
        if let Err(e) = agent_add(&node.socket, &format!("/var/run/netns/{pod}"), name, sa) {
            panic!("enroll {name}: {e}\n{}", node.agent.log());
        }
    };
    let remove = |node: &Node, name: &str| {
        if let Err(e) = agent_remove(&node.socket, name) {
            panic!("remove {name}: {e}");
        }
    };
    enroll(&nodes[0], &p_sleep, "sleep", "sleep");
    enroll(&nodes[0], &p_not, "notsleep", "notsleep");
    enroll(&nodes[1], &p_pp, "productpage", "bookinfo-productpage");
    wait(
        "node-1 pods bound",
        || z1.log().matches("pod listeners bound").count() >= 2,
        &|| z1.log(),
    );
    wait(
        "node-2 pod bound",
        || z2.log().contains("pod listeners bound"),
        &|| z2.log(),
    );

    // The wire between the nodes, while sleep calls productpage.
    let pcap = dir.join("wire.pcap");
    let mut dump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &n1,
            "tcpdump",
            "-i",
            &v("nn1"),
            "-nn",
            "-U",
            "-s",
            "0",
            "-w",
        ])
        .arg(&pcap)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump (scripts/test installs it)");
    std::thread::sleep(Duration::from_millis(1000));
    let payload: Vec<u8> = SECRET
        .iter()
        .copied()
        .cycle()
        .take(SECRET.len() * 2000)
        .collect();
    let got = exchange(&open(&p_sleep), None, "10.234.2.2:9080", &payload).unwrap();
    assert!(
        got == payload,
        "sleep -> productpage ({} bytes back)\nnode-1:\n{}\nnode-2:\n{}",
        got.len(),
        z1.log(),
        z2.log()
    );
    // The seeds' policy: notsleep is denied (its connection is reset, nothing comes back).
    let denied = exchange(&open(&p_not), None, "10.234.2.2:9080", SECRET);
    assert!(
        denied.map(|d| d.is_empty()).unwrap_or(true),
        "notsleep must be denied"
    );
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill")
        .args(["-INT", &dump.id().to_string()])
        .status();
    let _ = dump.wait();
    let raw = std::fs::read(&pcap).unwrap();
    assert!(
        raw.len() > 100_000,
        "the capture saw the transfer ({} bytes)",
        raw.len()
    );
    assert!(
        !raw.windows(SECRET.len()).any(|w| w == SECRET),
        "plaintext payload on the wire between the nodes"
    );
    let text = String::from_utf8_lossy(
        &Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&pcap)
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    assert!(
        text.contains("10.234.2.2.15008"),
        "HBONE to 15008 on the wire:\n{text}"
    );
    assert!(
        !text.contains("10.234.2.2.9080"),
        "no connection to the app port on the wire:\n{text}"
    );
    let l2 = z2.log();
    assert!(
        l2.contains("denied by policy") && l2.contains("notsleep"),
        "{l2}"
    );

    // sleep removed: its traffic is no longer captured, reaches productpage in plaintext, and
    // productpage's inbound capture (15006, no identity) denies it. Re-added: works again.
    remove(&nodes[0], "sleep");
    wait(
        "sleep's listeners closed",
        || {
            z1.log()
                .contains("pod removed or moved: its listeners are closed")
        },
        &|| z1.log(),
    );
    let out = exchange(&open(&p_sleep), None, "10.234.2.2:9080", b"bypass");
    assert!(
        out.map(|d| d.is_empty()).unwrap_or(true),
        "uncaptured plaintext must be denied at productpage"
    );
    wait(
        "productpage saw plaintext",
        || z2.log().contains("path=\"plaintext\""),
        &|| z2.log(),
    );
    enroll(&nodes[0], &p_sleep, "sleep", "sleep");
    wait(
        "sleep bound again",
        || z1.log().matches("pod listeners bound").count() >= 3,
        &|| z1.log(),
    );
    assert_eq!(
        exchange(&open(&p_sleep), None, "10.234.2.2:9080", b"again").unwrap(),
        b"again"
    );

    // zring on node-2 restarted: the agent replays its snapshot and traffic works again.
    drop(z2);
    z2 = start_zring(&nodes[1], "node-2");
    wait("node-2 ready again", || ready(&nodes[1].ns), &|| z2.log());
    wait(
        "snapshot replayed",
        || z2.log().contains("pod listeners bound"),
        &|| z2.log(),
    );
    let got = exchange(&open(&p_sleep), None, "10.234.2.2:9080", b"after restart").unwrap();
    assert_eq!(got, b"after restart", "node-2:\n{}", z2.log());
    z1.signal(15);
    drop((z1, z2));
    let _ = std::fs::remove_dir_all(&dir);
}
