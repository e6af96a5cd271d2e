//! Under istio-cni's in-pod rules (DNS capture on), two nodes whose proxies are Istio's ztunnel
//! on both, or zring (`zring proxy ztunnel`) on one and ztunnel on the other, either way round:
//! captured TCP both ways over HBONE (proven by the destination's
//! `istio_tcp_connections_opened_total{reporter="destination",source_principal=...}`), inbound
//! plaintext from a pod outside the mesh to a pod without policy (allowed) and to a pod whose
//! policy names a principal (denied), and DNS from the pods: a mesh service's short and full
//! names to its VIP and an outside name through the node's upstream (forwarded from inside the
//! pod, as ztunnel does), over UDP and TCP.
//! zring and ztunnel trust each other through ztunnel's fake CA root (next to its binary).
//!
//! Needs root and `ZTUNNEL_BIN` (`.ci/run` sets it from ../shared/anchors/ztunnel); without
//! either it prints a loud SKIPPED line and returns.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use hickory_proto::rr::RecordType;

mod common;

use common::{
    dns::{self, answers, Upstream},
    mesh::{http_get, metric},
    netns::{agent_add, echo_in, exchange, is_root, sh, EtcNetns, TestNs},
    tmp, Proc,
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Zring,
    /// ztunnel with `FAKE_CA` and the local config file.
    Ztunnel,
    /// ztunnel with neither: its config and certificates come from `zring control-plane` (run
    /// in the node's namespace at 127.0.0.1:15012, as istiod would be reached).
    ZtunnelFromControlPlane,
}

fn mesh_yaml(net: u8) -> String {
    format!(
        r#"workloads:
- uid: c//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  trustDomain: cluster.local
  workloadIps: ["10.{net}.0.2"]
  protocol: HBONE
  node: node-1
  services: {{}}
- uid: c//v1/Pod/default/reviews
  name: reviews
  namespace: default
  serviceAccount: reviews
  trustDomain: cluster.local
  workloadIps: ["10.{net}.0.3"]
  protocol: HBONE
  node: node-2
  services:
    "default/reviews.default.svc.cluster.local":
      9080: 9080
  authorizationPolicies: ["default/reviews-viewer"]
services:
- name: reviews
  namespace: default
  hostname: reviews.default.svc.cluster.local
  vips: ["/10.{net}.96.20"]
  ports:
    9080: 9080
  subjectAltNames: []
policies:
- name: reviews-viewer
  namespace: default
  scope: WorkloadSelector
  action: Allow
  dryRun: false
  rules:
  - - - principals:
        - !Exact cluster.local/ns/default/sa/sleep
"#
    )
}

struct NodeUnderTest {
    ns: TestNs,
    proxy: Proc,
    _control_plane: Option<Proc>,
    _agent: Proc,
    _etc: EtcNetns,
    socket: String,
}

impl NodeUnderTest {
    fn get(&self, addr: &str, path: &str) -> (u16, String) {
        let addr: SocketAddr = addr.parse().unwrap();
        self.ns.open().run(|| http_get(addr, "GET", path)).unwrap()
    }
}

/// A node: its own network namespace whose /etc/resolv.conf names `resolver` (reachable from
/// the pods, as kube-dns is: both proxies forward from inside the pod), an agent, the proxy.
fn start_node(
    name: &str,
    tag: &str,
    kind: Kind,
    ztunnel: &Path,
    dir: &Path,
    cfg: &Path,
    resolver: IpAddr,
) -> NodeUnderTest {
    let ns = TestNs::new(tag);
    let etc = EtcNetns::new(
        &ns.name,
        &[("resolv.conf", &format!("nameserver {resolver}\n"))],
    );
    let socket = dir
        .join(format!("{name}.sock"))
        .to_str()
        .unwrap()
        .to_string();
    let agent = Proc::spawn(&["node-agent", "run", "--socket", &socket, "--dns-capture"]);
    let control = zring_core::cmd::node_agent::control_path(Path::new(&socket));
    common::wait_until(
        Duration::from_secs(10),
        || control.exists(),
        || format!("agent never listened:\n{}", agent.log()),
    );
    let log = dir.join(format!("{name}.log"));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name]);
    let ca = dir.join("fake-ca");
    let mut control_plane = None;
    match kind {
        Kind::Zring => {
            cmd.args([common::ZRING, "proxy", "ztunnel"])
                .env("ZRING_CA_DIR", &ca)
                .env("LOCAL_XDS_PATH", cfg);
        }
        Kind::Ztunnel => {
            cmd.arg(ztunnel)
                .env("FAKE_CA", "true")
                .env("XDS_ADDRESS", "")
                .env("LOCAL_XDS_PATH", cfg);
        }
        Kind::ZtunnelFromControlPlane => {
            let token = dir.join("istio-token");
            std::fs::write(&token, "a-projected-service-account-token").unwrap();
            let cp_log = dir.join(format!("{name}-control-plane.log"));
            let mut cp = Command::new("ip");
            cp.args([
                "netns",
                "exec",
                &ns.name,
                common::ZRING,
                "control-plane",
                "--config",
            ])
            .arg(cfg)
            .arg("--ca-dir")
            .arg(&ca)
            .args(["--listen", "127.0.0.1:15012", "--token-file"])
            .arg(&token)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&cp_log).unwrap());
            let cp = Proc::from_child(cp.spawn().expect("spawn zring control-plane"), cp_log);
            let at: SocketAddr = "127.0.0.1:15012".parse().unwrap();
            common::wait_until(
                Duration::from_secs(10),
                || {
                    ns.open()
                        .run(|| {
                            std::net::TcpStream::connect_timeout(&at, Duration::from_millis(200))
                                .is_ok()
                        })
                        .unwrap()
                },
                || format!("zring control-plane never listened:\n{}", cp.log()),
            );
            control_plane = Some(cp);
            let root = ca.join("root-cert.pem");
            cmd.arg(ztunnel)
                .env("XDS_ADDRESS", "https://127.0.0.1:15012")
                .env("CA_ADDRESS", "https://127.0.0.1:15012")
                .env("XDS_ROOT_CA", &root)
                .env("CA_ROOT_CA", &root)
                .env("ALT_XDS_HOSTNAME", "istiod.istio-system.svc")
                .env("ALT_CA_HOSTNAME", "istiod.istio-system.svc")
                .env("AUTH_TOKEN", &token)
                .env("POD_NAME", format!("ztunnel-{name}"))
                .env("POD_NAMESPACE", "istio-system")
                .env("INSTANCE_IP", "10.0.0.1");
        }
    };
    cmd.env("NODE_NAME", name)
        .env("INPOD_UDS", &socket)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let proxy = Proc::from_child(cmd.spawn().expect("spawn the node proxy"), log);
    let node = NodeUnderTest {
        ns,
        proxy,
        _control_plane: control_plane,
        _agent: agent,
        _etc: etc,
        socket,
    };
    common::wait_until(
        Duration::from_secs(20),
        || node.get("127.0.0.1:15021", "/healthz/ready").0 == 200,
        || format!("{kind:?} on {name} never ready:\n{}", node.proxy.log()),
    );
    node
}

fn pair(kinds: [Kind; 2], net: u8) {
    let name = format!("{kinds:?}");
    if !is_root() {
        eprintln!("SKIPPED ztunnel_inpod {name}: needs root (network namespaces, iptables); CI runs it as root");
        return;
    }
    let Some(ztunnel) = std::env::var_os("ZTUNNEL_BIN").map(PathBuf::from) else {
        eprintln!("SKIPPED ztunnel_inpod {name}: ZTUNNEL_BIN is not set (.ci/run sets it from ../shared/anchors/ztunnel/ztunnel)");
        return;
    };
    let dir = tmp(&format!("ztunnel-inpod-{net}"));
    let ca = dir.join("fake-ca");
    std::fs::create_dir_all(&ca).unwrap();
    let anchors = ztunnel.parent().unwrap();
    std::fs::copy(
        anchors.join("fake-ca-root-cert.pem"),
        ca.join("root-cert.pem"),
    )
    .unwrap();
    std::fs::copy(
        anchors.join("fake-ca-root-key.pem"),
        ca.join("root-key.pem"),
    )
    .unwrap();
    let cfg = dir.join("mesh.yaml");
    std::fs::write(&cfg, mesh_yaml(net)).unwrap();

    // Three pods on one bridge: sleep (node-1), reviews (node-2), outsider (not in the mesh).
    let lan = TestNs::new(&format!("zl{net}"));
    lan.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
    lan.exec(&["ip", "link", "set", "br0", "up"]);
    // The cluster's DNS server, on the pods' network.
    lan.exec(&[
        "ip",
        "addr",
        "add",
        &format!("10.{net}.0.1/24"),
        "dev",
        "br0",
    ]);
    let kube_dns = IpAddr::from([10, net, 0, 1]);
    let upstream = lan.open().run(|| Upstream::start(kube_dns, 53)).unwrap();
    let pods: Vec<TestNs> = ["zs", "zr", "zo"]
        .iter()
        .map(|t| TestNs::new(&format!("{t}{net}")))
        .collect();
    let id = std::process::id() % 10_000;
    for (i, pod) in pods.iter().enumerate() {
        let (inner, outer) = (format!("zp{net}{i}{id}"), format!("zq{net}{i}{id}"));
        sh(&[
            "ip", "link", "add", &inner, "netns", &pod.name, "type", "veth", "peer", "name",
            &outer, "netns", &lan.name,
        ]);
        lan.exec(&["ip", "link", "set", &outer, "master", "br0"]);
        lan.exec(&["ip", "link", "set", &outer, "up"]);
        pod.exec(&[
            "ip",
            "addr",
            "add",
            &format!("10.{net}.0.{}/24", i + 2),
            "dev",
            &inner,
        ]);
        pod.exec(&["ip", "link", "set", &inner, "up"]);
        pod.exec(&["ip", "route", "add", "default", "dev", &inner]);
        echo_in(&pod.open(), &format!("10.{net}.0.{}:9080", i + 2));
    }
    let (sleep, reviews, outsider) = (&pods[0], &pods[1], &pods[2]);
    let (sleep_ip, reviews_ip) = (format!("10.{net}.0.2"), format!("10.{net}.0.3"));

    let node1 = start_node(
        "node-1",
        &format!("zn1{net}"),
        kinds[0],
        &ztunnel,
        &dir,
        &cfg,
        kube_dns,
    );
    let node2 = start_node(
        "node-2",
        &format!("zn2{net}"),
        kinds[1],
        &ztunnel,
        &dir,
        &cfg,
        kube_dns,
    );
    agent_add(&node1.socket, &sleep.path(), "sleep", "sleep").unwrap();
    agent_add(&node2.socket, &reviews.path(), "reviews", "reviews").unwrap();
    let logs = || {
        format!(
            "node-1 ({:?}):\n{}\nnode-2 ({:?}):\n{}",
            kinds[0],
            node1.proxy.log(),
            kinds[1],
            node2.proxy.log()
        )
    };

    // Captured TCP both ways, over HBONE.
    let got = exchange(
        &sleep.open(),
        None,
        &format!("{reviews_ip}:9080"),
        b"to reviews",
    );
    assert_eq!(
        got.as_deref().ok(),
        Some(&b"to reviews"[..]),
        "{name}: {got:?}\n{}",
        logs()
    );
    let got = exchange(
        &reviews.open(),
        None,
        &format!("{sleep_ip}:9080"),
        b"to sleep",
    );
    assert_eq!(
        got.as_deref().ok(),
        Some(&b"to sleep"[..]),
        "{name}: {got:?}\n{}",
        logs()
    );
    for (node, from) in [(&node2, "sleep"), (&node1, "reviews")] {
        let text = node.get("127.0.0.1:15020", "/metrics").1;
        let principal = format!("source_principal=\"spiffe://cluster.local/ns/default/sa/{from}\"");
        let opened = metric(
            &text,
            "istio_tcp_connections_opened_total",
            &["reporter=\"destination\"", &principal],
        );
        assert!(
            opened.unwrap_or(0) >= 1,
            "{name}: no tunnelled connection from {from}:\n{text}\n{}",
            logs()
        );
    }

    // Plaintext from outside the mesh: allowed to sleep (no policy), denied to reviews.
    let got = exchange(
        &outsider.open(),
        None,
        &format!("{sleep_ip}:9080"),
        b"plain",
    );
    assert_eq!(
        got.as_deref().ok(),
        Some(&b"plain"[..]),
        "{name}: {got:?}\n{}",
        logs()
    );
    let got = exchange(
        &outsider.open(),
        None,
        &format!("{reviews_ip}:9080"),
        b"plain",
    );
    assert!(
        got.as_deref().map_or(true, |b| b.is_empty()),
        "{name}: the policy let a plaintext client through: {got:?}\n{}",
        logs()
    );

    // DNS through the capture, on both kinds of proxy.
    let resolver: SocketAddr = format!("10.{net}.0.53:53").parse().unwrap();
    let vip = format!("10.{net}.96.20");
    for pod in [sleep, reviews] {
        let m = pod
            .open()
            .run(|| dns::udp(resolver, None, "reviews.", RecordType::A))
            .unwrap();
        assert_eq!(
            answers(&m),
            [format!("reviews. {vip}")],
            "{name}\n{}",
            logs()
        );
        let m = pod
            .open()
            .run(|| {
                dns::tcp(
                    resolver,
                    "reviews.default.svc.cluster.local.",
                    RecordType::A,
                )
            })
            .unwrap();
        assert_eq!(
            answers(&m),
            [format!("reviews.default.svc.cluster.local. {vip}")],
            "{name}\n{}",
            logs()
        );
        let m = pod
            .open()
            .run(|| dns::udp_try(resolver, None, dns::OUTSIDE, RecordType::A))
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: no answer for {}\n{}", dns::OUTSIDE, logs()));
        assert_eq!(
            answers(&m),
            [format!("{} 10.250.0.9", dns::OUTSIDE)],
            "{name}\n{}",
            logs()
        );
        let m = pod
            .open()
            .run(|| dns::tcp(resolver, dns::OUTSIDE, RecordType::A))
            .unwrap();
        assert_eq!(
            answers(&m),
            [format!("{} 10.250.0.9", dns::OUTSIDE)],
            "{name}\n{}",
            logs()
        );
    }
    // Configured by zring control-plane: it saw the client and signed its certificate.
    for (node, kind) in [(&node1, kinds[0]), (&node2, kinds[1])] {
        if let (Kind::ZtunnelFromControlPlane, Some(cp)) = (kind, &node._control_plane) {
            let text = cp.log();
            assert!(text.contains("xDS client connected"), "{text}");
            assert!(
                text.contains("certificate signed identity=spiffe://cluster.local/ns/default/sa/"),
                "{text}"
            );
            eprintln!(
                "control plane log:\n{text}\nztunnel log:\n{}",
                node.proxy.log()
            );
        }
    }
    // Only the upstream knows outside.example (ztunnel caches its answers, so it may ask once).
    assert!(
        upstream
            .questions
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[test]
fn ztunnel_on_both_nodes() {
    pair([Kind::Ztunnel, Kind::Ztunnel], 225);
}

#[test]
fn zring_client_node_ztunnel_server_node() {
    pair([Kind::Zring, Kind::Ztunnel], 226);
}

#[test]
fn ztunnel_client_node_zring_server_node() {
    pair([Kind::Ztunnel, Kind::Zring], 227);
}

#[test]
fn ztunnel_configured_by_zring_control_plane_with_a_zring_node() {
    pair([Kind::ZtunnelFromControlPlane, Kind::Zring], 228);
}
