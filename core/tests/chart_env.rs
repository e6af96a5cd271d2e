//! `zring proxy ztunnel` under exactly the environment Istio's ztunnel chart gives the container
//! (the chart's `args` and `env`; only `INPOD_UDS` added so parallel runs do not share a
//! socket), with the chart's mounts as files under the process's working directory
//! (`var/run/secrets/istio/root-cert.pem`, `var/run/secrets/tokens/istio-token`), in a
//! namespace of its own (the node) whose /etc/hosts sends `istiod.istio-system.svc` to a
//! `zring control-plane` there. It takes its config over xDS and its certificates from the CA,
//! comes up ready in in-pod mode on 15021, logs JSON, serves two pods enrolled with istio-cni's rules
//! (DNS capture on): a pod resolves a mesh service's short and full names to its VIP and an
//! outside name through the upstream of the node's /etc/resolv.conf, over UDP and TCP through
//! the port-53 capture (forwarded from inside the pod), and its TCP goes to the other pod over HBONE.
//!
//! Needs root (CI runs as root). Elsewhere it prints a loud SKIPPED line and returns.

use std::{
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    time::Duration,
};

use hickory_proto::{op::ResponseCode, rr::RecordType};

mod common;

use common::{
    dns::{self, answers, Upstream},
    mesh::{http_get, metric},
    netns::{agent_add, echo_in, exchange, is_root, sh, EtcNetns, TestNs},
    tmp, Proc,
};

const CONFIG: &str = r#"workloads:
- uid: c//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["10.222.1.2"]
  protocol: HBONE
  node: node-1
- uid: c//v1/Pod/default/reviews
  name: reviews
  namespace: default
  serviceAccount: reviews
  workloadIps: ["10.222.2.2"]
  protocol: HBONE
  node: node-1
  services:
    "default/reviews.default.svc.cluster.local":
      9080: 9080
services:
- name: reviews
  namespace: default
  hostname: reviews.default.svc.cluster.local
  vips: ["/10.222.96.20"]
  ports:
    9080: 9080
policies: []
"#;

#[test]
fn chart_environment_comes_up_ready_in_pod_mode_with_dns_and_hbone() {
    if !is_root() {
        eprintln!("SKIPPED chart_environment_comes_up_ready_in_pod_mode_with_dns_and_hbone: needs root (network namespaces, iptables); CI runs it as root");
        return;
    }
    let node = TestNs::new("chn");
    let (sleep, reviews) = (TestNs::new("chs"), TestNs::new("chr"));
    let id = std::process::id() % 100_000;
    let (va, vb) = (format!("zcha{id}"), format!("zchb{id}"));
    sh(&[
        "ip",
        "link",
        "add",
        &va,
        "netns",
        &sleep.name,
        "type",
        "veth",
        "peer",
        "name",
        &vb,
        "netns",
        &reviews.name,
    ]);
    for (ns, dev, me, peer) in [
        (&sleep, &va, "10.222.1.2", "10.222.2.2"),
        (&reviews, &vb, "10.222.2.2", "10.222.1.2"),
    ] {
        ns.exec(&["ip", "addr", "add", &format!("{me}/32"), "dev", dev]);
        ns.exec(&["ip", "link", "set", dev, "up"]);
        ns.exec(&["ip", "route", "add", peer, "dev", dev, "src", me]);
    }
    // The pod's resolver (any address off-pod: the capture takes port 53 before routing ends).
    sleep.exec(&[
        "ip",
        "route",
        "add",
        "default",
        "dev",
        &va,
        "src",
        "10.222.1.2",
    ]);
    echo_in(&reviews.open(), "10.222.2.2:9080");

    // The cluster's DNS server (named in the node's /etc/resolv.conf), on a network the pod
    // reaches: zring forwards from inside the pod, as ztunnel does.
    let infra = TestNs::new("chd");
    let (vc, vd) = (format!("zchc{id}"), format!("zchd{id}"));
    sh(&[
        "ip",
        "link",
        "add",
        &vc,
        "netns",
        &sleep.name,
        "type",
        "veth",
        "peer",
        "name",
        &vd,
        "netns",
        &infra.name,
    ]);
    sleep.exec(&["ip", "link", "set", &vc, "up"]);
    sleep.exec(&[
        "ip",
        "route",
        "add",
        "10.222.53.1",
        "dev",
        &vc,
        "src",
        "10.222.1.2",
    ]);
    infra.exec(&["ip", "addr", "add", "10.222.53.1/32", "dev", &vd]);
    infra.exec(&["ip", "link", "set", &vd, "up"]);
    infra.exec(&["ip", "route", "add", "10.222.1.2", "dev", &vd]);
    let upstream = infra
        .open()
        .run(|| Upstream::start(IpAddr::from([10, 222, 53, 1]), 53))
        .unwrap();
    let _etc = EtcNetns::new(
        &node.name,
        &[
            ("resolv.conf", "nameserver 10.222.53.1\noptions ndots:5\n"),
            (
                "hosts",
                "127.0.0.1 localhost\n127.0.0.1 istiod.istio-system.svc\n",
            ),
        ],
    );

    let dir = tmp("chart-env");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("mesh.yaml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let socket = dir.join("ztunnel.sock").to_str().unwrap().to_string();
    // istiod: zring control-plane in the node's namespace, the chart's mounts beside it.
    let ca = common::ca_init(&dir);
    let root = std::fs::read(ca.join("root-cert.pem")).unwrap();
    let cwd = dir.join("root");
    std::fs::create_dir_all(cwd.join("var/run/secrets/istio")).unwrap();
    std::fs::create_dir_all(cwd.join("var/run/secrets/tokens")).unwrap();
    std::fs::write(cwd.join("var/run/secrets/istio/root-cert.pem"), root).unwrap();
    let token = cwd.join("var/run/secrets/tokens/istio-token");
    std::fs::write(&token, "projected-token").unwrap();
    let cp_log = dir.join("control-plane.log");
    let cp = Proc::from_child(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &node.name,
                common::ZRING,
                "control-plane",
                "--config",
            ])
            .arg(&cfg)
            .arg("--ca-dir")
            .arg(&ca)
            .args(["--listen", "127.0.0.1:15012", "--token-file"])
            .arg(&token)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&cp_log).unwrap())
            .spawn()
            .unwrap(),
        cp_log,
    );
    let agent = Proc::spawn(&["node-agent", "run", "--socket", &socket, "--dns-capture"]);
    let control = zring_core::cmd::node_agent::control_path(std::path::Path::new(&socket));
    common::wait_until(
        Duration::from_secs(10),
        || control.exists(),
        || format!("agent never listened:\n{}", agent.log()),
    );

    let log = dir.join("zring.log");
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &node.name,
        common::ZRING,
        "proxy",
        "ztunnel",
    ])
    .current_dir(&cwd)
    .env_clear()
    // The chart's environment (manifests/charts/ztunnel/templates/daemonset.yaml).
    .envs([
        ("CA_ADDRESS", "istiod.istio-system.svc:15012"),
        ("XDS_ADDRESS", "istiod.istio-system.svc:15012"),
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "info"),
        ("RUST_BACKTRACE", "1"),
        ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
        ("INPOD_ENABLED", "true"),
        ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
        ("POD_NAME", "ztunnel-x7k2p"),
        ("POD_NAMESPACE", "istio-system"),
        ("NODE_NAME", "node-1"),
        ("INSTANCE_IP", "10.222.0.1"),
        ("SERVICE_ACCOUNT", "ztunnel"),
        ("ZTUNNEL_CPU_LIMIT", "1"),
        ("ISTIO_META_ENABLE_HBONE", "true"),
        ("INPOD_UDS", socket.as_str()),
    ])
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap());
    let zring = Proc::from_child(cmd.spawn().expect("spawn zring proxy ztunnel"), log);

    let ready: SocketAddr = "127.0.0.1:15021".parse().unwrap();
    let get = |path: &str| node.open().run(|| http_get(ready, "GET", path)).unwrap();
    common::wait_until(
        Duration::from_secs(20),
        || get("/healthz/ready").0 == 200,
        || {
            format!(
                "never ready:\n{}\ncontrol plane:\n{}",
                zring.log(),
                cp.log()
            )
        },
    );
    let text = zring.log();
    let first = text.lines().next().unwrap_or_default();
    assert!(
        serde_json::from_str::<serde_json::Value>(first).is_ok(),
        "LOG_FORMAT=json, got: {first}"
    );
    assert!(!text.contains("control-plane settings not used"), "{text}");
    let cp_text = cp.log();
    assert!(
        cp_text.contains(
            "xDS client connected node=ztunnel~10.222.0.1~ztunnel-x7k2p.istio-system~istio-system.svc.cluster.local"
        ),
        "{cp_text}"
    );
    let configured = text
        .lines()
        .find(|l| l.contains("configured from the ztunnel environment"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        configured.contains("\"workers\":\"Some(1)\""),
        "ZTUNNEL_CPU_LIMIT=1: {configured}"
    );

    agent_add(&socket, &sleep.path(), "sleep", "sleep").unwrap();
    agent_add(&socket, &reviews.path(), "reviews", "reviews").unwrap();

    // DNS through istio-cni's capture (port 53 -> 15053), UDP and TCP.
    let resolver: SocketAddr = "10.222.0.53:53".parse().unwrap();
    let in_pod = |f: &dyn Fn() -> hickory_proto::op::Message| sleep.open().run(f).unwrap();
    let m = in_pod(&|| dns::udp(resolver, None, "reviews.", RecordType::A));
    assert_eq!(answers(&m), ["reviews. 10.222.96.20"]);
    let m = in_pod(&|| {
        dns::udp(
            resolver,
            None,
            "reviews.default.svc.cluster.local.",
            RecordType::A,
        )
    });
    assert_eq!(
        answers(&m),
        ["reviews.default.svc.cluster.local. 10.222.96.20"]
    );
    let m = in_pod(&|| dns::tcp(resolver, "reviews.default.", RecordType::A));
    assert_eq!(answers(&m), ["reviews.default. 10.222.96.20"]);
    let m = in_pod(&|| dns::udp(resolver, None, dns::OUTSIDE, RecordType::A));
    assert_eq!(answers(&m), [format!("{} 10.250.0.9", dns::OUTSIDE)]);
    let m = in_pod(&|| dns::tcp(resolver, dns::OUTSIDE, RecordType::A));
    assert_eq!(answers(&m), [format!("{} 10.250.0.9", dns::OUTSIDE)]);
    let m = in_pod(&|| dns::udp(resolver, None, "nowhere.example.", RecordType::A));
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(
        upstream
            .questions
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );

    // Captured TCP from sleep to reviews goes over HBONE.
    let got = exchange(&sleep.open(), None, "10.222.2.2:9080", b"through the mesh").unwrap();
    assert_eq!(got, b"through the mesh");
    let stats: SocketAddr = "127.0.0.1:15020".parse().unwrap();
    let metrics = node
        .open()
        .run(|| http_get(stats, "GET", "/metrics").1)
        .unwrap();
    assert!(
        metric(
            &metrics,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"destination\"",
                "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\""
            ]
        )
        .unwrap_or(0)
            >= 1,
        "{metrics}"
    );
    assert!(metric(&metrics, "zring_dns_requests_total", &["result=\"local\""]).unwrap() >= 3);
    assert_eq!(metric(&metrics, "zring_workers", &[]), Some(1), "{metrics}");
    assert!(
        metrics.contains("zring_io_backend{backend=\"io_uring\"} 1")
            || metrics.contains("zring_io_backend{backend=\"epoll\"} 1"),
        "{metrics}"
    );
    assert!(
        cp.log()
            .contains("certificate signed identity=spiffe://cluster.local/ns/default/sa/sleep"),
        "{}",
        cp.log()
    );
    assert!(zring.log().contains("Istio CA"), "{}", zring.log());
    drop(zring);
    drop(cp);
    drop(agent);
}
