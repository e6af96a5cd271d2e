//! Certificates from Istio's CA (`zring control-plane`) for a node with many local identities:
//! a config change queues their fetches in the background, and a connection that needs one of
//! them is served ahead of that queue instead of waiting behind it; the queue still completes,
//! and certificates of identities no longer on the node are dropped.

use std::time::Duration;

mod common;

use common::mesh::{echo_through, metric, socks};

const CP: &str = "127.0.62.1:15012";
/// Background identities on node-a (each a fetch: CSR, a gRPC call, a signature).
const BULK: usize = 1500;

fn mesh(with_sleep: bool) -> String {
    let mut y = String::from("workloads:\n");
    for i in 0..BULK {
        // Loopback addresses: node-a listens on each (15008), nothing connects to them.
        y.push_str(&format!(
            "- uid: c//v1/Pod/bulk/w-{i}\n  name: w-{i}\n  namespace: bulk\n  serviceAccount: sa-{i}\n  workloadIps: [\"127.63.{}.{}\"]\n  protocol: HBONE\n  node: node-a\n",
            i / 256,
            i % 256
        ));
    }
    if with_sleep {
        y.push_str("- uid: c//v1/Pod/default/sleep\n  name: sleep\n  namespace: default\n  serviceAccount: sleep\n  workloadIps: [\"127.0.62.2\"]\n  protocol: HBONE\n  node: node-a\n");
    }
    y.push_str("- uid: c//v1/Pod/default/productpage\n  name: productpage\n  namespace: default\n  serviceAccount: productpage\n  workloadIps: [\"127.0.62.3\"]\n  protocol: HBONE\n  node: node-b\nservices: []\npolicies: []\n");
    y
}

/// Certificates node `stats` holds (its `zring_certificate_expiry_seconds` rows).
fn certificates(metrics: &str) -> usize {
    metrics
        .lines()
        .filter(|l| l.starts_with("zring_certificate_expiry_seconds{"))
        .count()
}

#[test]
fn a_waiting_connections_certificate_is_fetched_before_the_background_queue() {
    let dir = common::tmp("xds-prio");
    let ca = common::ca_init(&dir);
    let cfg = dir.join("mesh.yaml");
    let token = dir.join("istio-token");
    std::fs::write(&token, "token\n").unwrap();
    std::fs::write(&cfg, mesh(false)).unwrap();
    common::echo_at("127.0.62.3:9080".parse().unwrap());
    let cp = common::xds::control_plane(CP, &cfg, &ca, Some(&token));
    let xds = format!("https://{CP}");
    let ttl = "1h";
    let mut a = common::xds::node("node-a", [127, 0, 62, 6], &ca, &token, &xds, true, ttl);
    let mut b = common::xds::node("node-b", [127, 0, 62, 7], &ca, &token, &xds, false, ttl);
    a.wait_ready();
    b.wait_ready();
    // Let the first push's fetches finish, then add sleep with a fresh batch in front of it:
    // rename every bulk identity so the same push queues BULK new fetches, then sleep's.
    common::wait_until(
        Duration::from_secs(120),
        || certificates(&a.metrics()) >= BULK,
        || {
            format!(
                "the first batch of certificates never completed:\n{}",
                a.proc.log()
            )
        },
    );
    let renamed = mesh(true).replace("serviceAccount: sa-", "serviceAccount: sb-");
    std::fs::write(&cfg, renamed).unwrap();
    common::wait_until(
        Duration::from_secs(20),
        || {
            let (_, d) = common::mesh::http_get(a.admin, "GET", "/config_dump");
            d.contains("c//v1/Pod/default/sleep")
        },
        || format!("sleep never arrived:\n{}", a.proc.log()),
    );
    // sleep -> productpage through node-a's SOCKS5: needs sleep's certificate now.
    let (code, c) = socks(
        [127, 0, 62, 2].into(),
        "127.0.62.6:15080".parse().unwrap(),
        "127.0.62.3:9080".parse().unwrap(),
    );
    assert_eq!(code, 0, "sleep was refused:\n{}", a.proc.log());
    assert_eq!(echo_through(c, b"hello"), b"hello");
    // The old batch's certificates went with the push (no workload has them now).
    let held = certificates(&a.metrics());
    assert!(
        held <= BULK,
        "the background queue ({BULK} fetches) had already finished ({held} certificates): \
         the test shows nothing; raise BULK"
    );
    // The CA's log: sleep's signature came before most of the batch queued ahead of it.
    let log = cp.log();
    let signed: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("certificate signed identity=").nth(1))
        .collect();
    let sleep_at = signed
        .iter()
        .position(|l| l.starts_with("spiffe://cluster.local/ns/default/sa/sleep"))
        .expect("sleep's certificate was never signed");
    let batch_before = signed[..sleep_at]
        .iter()
        .filter(|l| l.contains("/ns/bulk/sa/sb-"))
        .count();
    assert!(
        batch_before < BULK / 2,
        "sleep waited behind {batch_before} of the {BULK} background fetches"
    );
    // The background queue still completes; the renamed-away identities are not kept (nor
    // renewed).
    common::wait_until(
        Duration::from_secs(120),
        || certificates(&a.metrics()) == BULK + 1,
        || format!("the background fetches never completed:\n{}", a.metrics()),
    );
    let text = a.metrics();
    assert!(!text.contains("/ns/bulk/sa/sa-"), "{text}");
    assert!(a
        .proc
        .log()
        .contains("certificates of identities no longer on this node dropped"));
    assert_eq!(
        metric(&text, "zring_ca_errors_total", &[]),
        Some(0),
        "{text}"
    );
}
