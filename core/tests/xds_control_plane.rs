//! Two zring nodes configured only through `zring control-plane` (delta xDS and the Istio CA
//! over TLS with a bearer token; 10 s certificates, so they renew during the test):
//! the first push makes them ready and they carry HBONE with policy; a policy change in the
//! control plane's file applies to new connections while an open one keeps running; a workload
//! added and a service removed arrive incrementally; the control plane restarted mid-run:
//! traffic flows throughout, the nodes reconnect and later changes still arrive; a policy added
//! and removed, a workload removed and a service added back, each incrementally; a node whose
//! control plane never answers is not ready and says why.

use std::{
    io::Write,
    net::{IpAddr, Shutdown},
    path::Path,
    time::Duration,
};

mod common;

use common::{
    mesh::{echo_through, http_get, metric, socks, Node},
    tmp, Proc,
};

const CP: &str = "127.0.61.1:15012";

fn mesh(allow: &[&str], with_newpod: bool, with_service: bool) -> String {
    mesh_with(allow, with_newpod, with_service, false)
}

/// `deny_notsleep`: a second, namespace-wide policy denying notsleep.
fn mesh_with(allow: &[&str], with_newpod: bool, with_service: bool, deny_notsleep: bool) -> String {
    let principals: String = allow
        .iter()
        .map(|sa| format!("        - !Exact cluster.local/ns/default/sa/{sa}\n"))
        .collect();
    let newpod = if with_newpod {
        r#"- uid: c//v1/Pod/default/newpod
  name: newpod
  namespace: default
  serviceAccount: newpod
  workloadIps: ["127.0.61.5"]
  protocol: HBONE
  node: node-a
"#
    } else {
        ""
    };
    let service = if with_service {
        r#"- name: productpage
  namespace: default
  hostname: productpage.default.svc.cluster.local
  vips: ["/127.0.61.20"]
  ports:
    9080: 9080
"#
    } else {
        ""
    };
    let deny = if deny_notsleep {
        r#"- name: deny-notsleep
  namespace: default
  scope: Namespace
  action: Deny
  dryRun: false
  rules:
  - - - principals: [!Exact cluster.local/ns/default/sa/notsleep]
"#
    } else {
        ""
    };
    format!(
        r#"workloads:
- uid: c//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["127.0.61.2"]
  protocol: HBONE
  node: node-a
- uid: c//v1/Pod/default/notsleep
  name: notsleep
  namespace: default
  serviceAccount: notsleep
  workloadIps: ["127.0.61.4"]
  protocol: HBONE
  node: node-a
{newpod}- uid: c//v1/Pod/default/productpage
  name: productpage
  namespace: default
  serviceAccount: productpage
  workloadIps: ["127.0.61.3"]
  protocol: HBONE
  node: node-b
  services:
    "default/productpage.default.svc.cluster.local":
      9080: 9080
  authorizationPolicies: ["default/productpage-viewer"]
services:
{service}policies:
{deny}- name: productpage-viewer
  namespace: default
  scope: WorkloadSelector
  action: Allow
  dryRun: false
  rules:
  - - - principals:
{principals}"#
    )
}

fn start_cp(cfg: &Path, ca: &Path, token: &Path) -> Proc {
    common::xds::control_plane(CP, cfg, ca, Some(token))
}

fn node(name: &str, host: [u8; 4], ca: &Path, token: &Path, xds: &str, socks5: bool) -> Node {
    common::xds::node(name, host, ca, token, xds, socks5, "10s")
}

/// From workload address `src` through node-a's SOCKS5 to productpage's echo: the bytes that
/// came back, or the SOCKS5 reply code when the proxy refused.
fn call(src: [u8; 4], data: &[u8]) -> Result<Vec<u8>, u8> {
    let (code, c) = socks(
        IpAddr::from(src),
        "127.0.61.6:15080".parse().unwrap(),
        "127.0.61.3:9080".parse().unwrap(),
    );
    if code != 0 {
        return Err(code);
    }
    Ok(echo_through(c, data))
}

/// Connections the destination's proxy took over HBONE from service account `sa`.
fn tunnelled_from(metrics: &str, sa: &str) -> u64 {
    let principal = format!("source_principal=\"spiffe://cluster.local/ns/default/sa/{sa}\"");
    metric(
        metrics,
        "istio_tcp_connections_opened_total",
        &["reporter=\"destination\"", &principal],
    )
    .unwrap_or(0)
}

fn allowed(src: [u8; 4]) -> bool {
    matches!(call(src, b"hello"), Ok(b) if b == b"hello")
}

#[test]
fn nodes_run_from_the_control_plane_alone() {
    let dir = tmp("xds-cp");
    let ca = common::ca_init(&dir);
    let cfg = dir.join("mesh.yaml");
    let token = dir.join("istio-token");
    std::fs::write(&token, "token-for-the-test\n").unwrap();
    std::fs::write(&cfg, mesh(&["sleep", "newpod"], false, true)).unwrap();
    common::echo_at("127.0.61.3:9080".parse().unwrap());
    let mut cp = start_cp(&cfg, &ca, &token);

    let xds = format!("https://{CP}");
    let mut a = node("node-a", [127, 0, 61, 6], &ca, &token, &xds, true);
    let mut b = node("node-b", [127, 0, 61, 7], &ca, &token, &xds, false);
    a.wait_ready();
    b.wait_ready();
    let (_, dump) = http_get(b.admin, "GET", "/config_dump");
    assert!(
        dump.contains(&format!("\"configSource\": \"xds:https://{CP}\"")),
        "{dump}"
    );
    assert!(
        dump.contains("productpage.default.svc.cluster.local"),
        "{dump}"
    );
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let versions = &v["resourceVersions"]["type.googleapis.com/istio.workload.Address"];
    assert!(
        versions["c//v1/Pod/default/sleep"]
            .as_str()
            .is_some_and(|s| s.len() == 16),
        "{dump}"
    );

    // The first push: HBONE with policy.
    assert!(
        allowed([127, 0, 61, 2]),
        "sleep was refused:\n{}",
        a.proc.log()
    );
    assert!(!allowed([127, 0, 61, 4]), "notsleep got through");
    let text = b.metrics();
    assert!(tunnelled_from(&text, "sleep") >= 1, "{text}");
    assert_eq!(metric(&text, "zring_xds_connected", &[]), Some(1), "{text}");

    // A policy change applies to new connections; an open one keeps going.
    let (code, mut open) = socks(
        IpAddr::from([127, 0, 61, 2]),
        "127.0.61.6:15080".parse().unwrap(),
        "127.0.61.3:9080".parse().unwrap(),
    );
    assert_eq!(code, 0);
    open.write_all(b"before ").unwrap();
    std::fs::write(&cfg, mesh(&["notsleep", "newpod"], false, true)).unwrap();
    common::wait_until(
        Duration::from_secs(10),
        || allowed([127, 0, 61, 4]),
        || {
            format!(
                "the new policy never applied:\n{}\n{}",
                b.proc.log(),
                cp.log()
            )
        },
    );
    assert!(!allowed([127, 0, 61, 2]), "the old policy still applied");
    open.write_all(b"after").unwrap();
    open.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut open, &mut got).unwrap();
    assert_eq!(got, b"before after", "the open connection was disturbed");

    // Incremental: a workload added, a service removed.
    std::fs::write(&cfg, mesh(&["notsleep", "newpod"], true, false)).unwrap();
    common::wait_until(
        Duration::from_secs(10),
        || {
            let (_, d) = http_get(a.admin, "GET", "/config_dump");
            let v: serde_json::Value = serde_json::from_str(&d).unwrap_or_default();
            d.contains("c//v1/Pod/default/newpod")
                && v["services"].as_array().is_some_and(|s| s.is_empty())
        },
        || format!("the add and the removal never arrived:\n{}", a.proc.log()),
    );
    assert!(
        allowed([127, 0, 61, 5]),
        "newpod was refused:\n{}",
        a.proc.log()
    );
    let text = b.metrics();
    assert!(
        tunnelled_from(&text, "newpod") >= 1,
        "newpod's connection did not go through the tunnel:\n{text}"
    );

    // The control plane goes away: traffic flows, readiness holds, the nodes keep retrying.
    drop(cp);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        allowed([127, 0, 61, 4]),
        "traffic stopped with the control plane"
    );
    assert_eq!(http_get(a.ready, "GET", "/healthz/ready").0, 200);
    common::wait_until(
        Duration::from_secs(10),
        || metric(&a.metrics(), "zring_xds_connected", &[]) == Some(0),
        || "node-a never noticed the control plane left".into(),
    );
    // A renewal falls due while the CA is away: it fails, is counted, the old certificate
    // (still valid) stays in use.
    common::wait_until(
        Duration::from_secs(9),
        || metric(&a.metrics(), "zring_ca_errors_total", &[]).unwrap_or(0) >= 1,
        || format!("no failed renewal while the CA was away:\n{}", a.proc.log()),
    );
    assert!(
        allowed([127, 0, 61, 4]),
        "traffic stopped while the CA was away"
    );
    // Back, with a change made meanwhile: the nodes reconnect and get it.
    std::fs::write(&cfg, mesh(&["sleep", "notsleep", "newpod"], true, false)).unwrap();
    cp = start_cp(&cfg, &ca, &token);
    common::wait_until(
        Duration::from_secs(20),
        || allowed([127, 0, 61, 2]),
        || {
            format!(
                "the change made while the control plane was away never arrived:\n{}\n{}",
                b.proc.log(),
                cp.log()
            )
        },
    );
    assert!(allowed([127, 0, 61, 4]));
    // Each node retries on its own backoff (doubling up to 15 s while the control plane was
    // away): the other node may reconnect seconds after this one got the change.
    for n in [&a, &b] {
        common::wait_until(
            Duration::from_secs(20),
            || metric(&n.metrics(), "zring_xds_connections_total", &[]).unwrap_or(0) >= 2,
            || format!("a node never reconnected:\n{}", n.metrics()),
        );
    }
    assert!(b
        .proc
        .log()
        .contains("xDS stream failed; the config in force stays"));
    // Certificates: from the CA, renewed at half-life (10 s certificates).
    let log = a.proc.log();
    assert!(log.contains("source=\"Istio CA\""), "{log}");
    common::wait_until(
        Duration::from_secs(15),
        || a.proc.log().matches("certificate renewed").count() >= 2,
        || format!("no renewals:\n{}", a.proc.log()),
    );
    let text = a.metrics();
    let left = metric(
        &text,
        "zring_certificate_expiry_seconds",
        &["identity=\"spiffe://cluster.local/ns/default/sa/sleep\""],
    )
    .unwrap();
    assert!((1..=10).contains(&left), "{text}");
    assert!(cp
        .log()
        .contains("certificate signed identity=spiffe://cluster.local/ns/default/sa/sleep"));

    // Incremental the other way: a policy added, then removed; a workload removed, a service
    // added back.
    std::fs::write(
        &cfg,
        mesh_with(&["sleep", "notsleep", "newpod"], false, true, true),
    )
    .unwrap();
    common::wait_until(
        Duration::from_secs(10),
        || !allowed([127, 0, 61, 4]),
        || {
            format!(
                "the added DENY policy never applied:\n{}\n{}",
                b.proc.log(),
                cp.log()
            )
        },
    );
    assert!(allowed([127, 0, 61, 2]), "the DENY policy hit sleep too");
    let (_, d) = http_get(a.admin, "GET", "/config_dump");
    let v: serde_json::Value = serde_json::from_str(&d).unwrap();
    assert!(
        !d.contains("c//v1/Pod/default/newpod"),
        "newpod not removed: {d}"
    );
    assert_eq!(v["services"].as_array().map(|s| s.len()), Some(1), "{d}");
    assert!(
        !allowed([127, 0, 61, 5]),
        "a removed workload still got through"
    );
    std::fs::write(
        &cfg,
        mesh_with(&["sleep", "notsleep", "newpod"], false, true, false),
    )
    .unwrap();
    common::wait_until(
        Duration::from_secs(10),
        || allowed([127, 0, 61, 4]),
        || format!("the removed DENY policy still applied:\n{}", b.proc.log()),
    );
    let (_, d) = http_get(b.admin, "GET", "/config_dump");
    assert!(!d.contains("deny-notsleep"), "{d}");
    let text = b.metrics();
    assert!(
        metric(&text, "zring_config_apply_seconds_count", &[]).unwrap_or(0) >= 6,
        "{text}"
    );

    // A node whose control plane never answers is not ready, and says why.
    let mut c = node(
        "node-c",
        [127, 0, 61, 8],
        &ca,
        &token,
        "https://127.0.61.9:15012",
        false,
    );
    std::thread::sleep(Duration::from_secs(2));
    let (st, why) = http_get(c.ready, "GET", "/healthz/ready");
    assert_eq!(st, 503, "{why}");
    assert!(why.contains("waiting for the first xDS push"), "{why}");
    let _ = c.proc.child.kill();
    let _ = a.proc.child.kill();
    drop(cp);
}
