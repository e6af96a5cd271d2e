//! `zring control-plane`'s CA signs only for whom may hold the identity (the security review's
//! H3): calls through zring's own Istio CA client (TLS, bearer token, ImpersonatedIdentity,
//! as ztunnel makes them) with each kind of token, and with none.

use std::{path::Path, time::Duration};

mod common;

use common::{tmp, xds::control_plane, Proc};
use zring_core::xds::{ca_client::IstioCa, conn::Upstream};

const MESH: &str = r#"workloads:
- uid: c//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["127.0.62.10"]
  protocol: HBONE
  node: node-a
- uid: c//v1/Pod/default/productpage
  name: productpage
  namespace: default
  serviceAccount: productpage
  workloadIps: ["127.0.62.11"]
  protocol: HBONE
  node: node-b
"#;

/// Ask the control plane at `cp` for a certificate for service account `sa` (`ns/sa` for
/// another namespace) with the token in `token`; the error text (with its gRPC code) if refused.
fn ask(cp: &str, ca: &Path, token: Option<&Path>, sa: &str) -> Result<(), String> {
    let (ns, sa) = sa.split_once('/').unwrap_or(("default", sa));
    let client = IstioCa::new(Upstream {
        address: format!("https://{cp}"),
        root_ca: ca.join("root-cert.pem"),
        server_name: Some("istiod.istio-system.svc".into()),
        token_file: token.map(Path::to_path_buf),
        cluster_id: "Kubernetes".into(),
        headers: Vec::new(),
    })
    .unwrap();
    let id = format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
        .parse()
        .unwrap();
    client
        .issue(&id, Duration::from_secs(3600))
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
}

#[test]
fn the_control_plane_signs_only_identities_the_caller_may_hold() {
    let dir = tmp("xds-certs");
    let ca = common::ca_init(&dir);
    let cfg = dir.join("mesh.yaml");
    std::fs::write(&cfg, MESH).unwrap();
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        "# node proxies and one workload\ntok-node-a node=node-a\ntok-node-b node=node-b\ntok-sleep identity=spiffe://cluster.local/ns/default/sa/sleep\n",
    )
    .unwrap();
    let token = |name: &str, value: &str| {
        let p = dir.join(name);
        std::fs::write(&p, format!("{value}\n")).unwrap();
        p
    };
    let (node_b, sleep, wrong) = (
        token("node-b", "tok-node-b"),
        token("sleep", "tok-sleep"),
        token("wrong", "tok-node-c"),
    );
    let cp = "127.0.62.1:15012";
    let p = control_plane(cp, &cfg, &ca, Some(&tokens));
    let refused = |r: Result<(), String>, code: &str, case: &str| match r {
        Err(e) if e.contains(code) => {}
        other => panic!("{case}: {other:?}, not {code}\n{}", p.log()),
    };
    // Who may: node-b's proxy for node-b's workload; sleep for itself.
    ask(cp, &ca, Some(&node_b), "productpage").unwrap_or_else(|e| panic!("{e}\n{}", p.log()));
    ask(cp, &ca, Some(&sleep), "sleep").unwrap_or_else(|e| panic!("{e}\n{}", p.log()));
    // Who may not.
    for (token, sa, code, case) in [
        (None, "sleep", "Unauthenticated", "no token"),
        (Some(&wrong), "sleep", "Unauthenticated", "unknown token"),
        (
            Some(&node_b),
            "sleep",
            "PermissionDenied",
            "node-b's proxy for node-a's workload",
        ),
        (
            Some(&node_b),
            "istio-system/ztunnel",
            "PermissionDenied",
            "node-b's proxy for ztunnel's identity",
        ),
        (
            Some(&sleep),
            "productpage",
            "PermissionDenied",
            "sleep for productpage",
        ),
    ] {
        refused(ask(cp, &ca, token.map(|t| t.as_path()), sa), code, case);
    }
    assert!(p.log().contains("certificate refused"), "{}", p.log());

    // Without a token file: loopback only, and still only identities some workload holds.
    let open = "127.0.62.2:15012";
    let q = control_plane(open, &cfg, &ca, None);
    ask(open, &ca, None, "sleep").unwrap_or_else(|e| panic!("{e}\n{}", q.log()));
    for sa in ["istio-system/ztunnel", "vault"] {
        match ask(open, &ca, None, sa) {
            Err(e) if e.contains("PermissionDenied") => {}
            other => panic!("{sa} with no token: {other:?}\n{}", q.log()),
        }
    }
    // And it refuses to listen anywhere else without tokens.
    let mut r = Proc::spawn(&[
        "control-plane",
        "--config",
        cfg.to_str().unwrap(),
        "--ca-dir",
        ca.to_str().unwrap(),
        "--listen",
        "0.0.0.0:15912",
    ]);
    let st = r.wait_exit(Duration::from_secs(10));
    assert!(!st.success(), "it listened on 0.0.0.0 with no token file");
    assert!(r.log().contains("refusing to listen"), "{}", r.log());
}
