//! The per-connection decisions, against meshes of 10 to 10,000 workloads and as many policies:
//! - `resolve`: an original destination (a service VIP) to its service and endpoints;
//! - `authorize`: the destination's inbound decision (workload on this node, waypoint rule, L4
//!   policy with the peer's identity);
//! - `metrics`: a connection's open and close in the metrics table, with one label set per
//!   workload already present.
//!
//! Each workload names a policy of its own (`WorkloadSelector`) and its namespace has one more,
//! so the policies that apply to one workload stay two while the mesh's total grows: the cost
//! of each decision must not grow with N.

use std::{hint::black_box, net::SocketAddr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use zring_core::{
    authz,
    config::{index::MeshIndex, LocalConfig},
    metrics::{ConnLabels, Metrics, Reporter},
};
use zring_hbone::SpiffeId;

const SIZES: [usize; 4] = [10, 100, 1_000, 10_000];

fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256)
}

/// N workloads (service `s-{i % (N/10)}`, one policy each), N/10 services, N + 50 policies.
fn mesh(n: usize) -> MeshIndex {
    let services = (n / 10).max(1);
    let mut y = String::from("workloads:\n");
    for i in 0..n {
        let ns = i % 50;
        let s = i % services;
        y.push_str(&format!(
            "- uid: b//v1/Pod/ns-{ns}/w-{i}\n  name: w-{i}\n  namespace: ns-{ns}\n  serviceAccount: sa-{i}\n  workloadIps: [\"{}\"]\n  protocol: HBONE\n  node: node-{}\n  services:\n    \"ns-{}/s-{s}.ns-{}.svc.cluster.local\":\n      80: 8080\n  authorizationPolicies: [\"ns-{ns}/only-{i}\"]\n",
            ip(i),
            i % 100,
            s % 50,
            s % 50
        ));
    }
    y.push_str("services:\n");
    for s in 0..services {
        y.push_str(&format!(
            "- name: s-{s}\n  namespace: ns-{ns}\n  hostname: s-{s}.ns-{ns}.svc.cluster.local\n  vips: [\"/10.96.{}.{}\"]\n  ports:\n    80: 8080\n",
            s / 256,
            s % 256,
            ns = s % 50
        ));
    }
    y.push_str("policies:\n");
    for i in 0..n {
        y.push_str(&format!(
            "- name: only-{i}\n  namespace: ns-{}\n  scope: WorkloadSelector\n  action: Allow\n  dryRun: false\n  rules:\n  - - - principals: [!Exact cluster.local/ns/ns-0/sa/sa-{}]\n",
            i % 50,
            (i + 50) % n.max(1)
        ));
    }
    for ns in 0..50 {
        y.push_str(&format!(
            "- name: deny-outsiders\n  namespace: ns-{ns}\n  scope: Namespace\n  action: Deny\n  dryRun: false\n  rules:\n  - - - namespaces: [!Exact outsiders]\n"
        ));
    }
    let config = LocalConfig::from_yaml(&y, std::path::Path::new("bench.yaml")).expect("mesh");
    MeshIndex::new(config)
}

fn decisions(c: &mut Criterion) {
    let mut resolve = c.benchmark_group("resolve");
    let meshes: Vec<(usize, MeshIndex)> = SIZES.iter().map(|&n| (n, mesh(n))).collect();
    for (n, index) in &meshes {
        let vip: SocketAddr = "10.96.0.0:80".parse().expect("vip");
        resolve.bench_with_input(BenchmarkId::from_parameter(n), index, |b, i| {
            b.iter(|| black_box(i.resolve(black_box(vip))))
        });
    }
    resolve.finish();

    let mut authorize = c.benchmark_group("authorize");
    for (n, index) in &meshes {
        // Workload 0 (ns-0, node-0) allows only sa-50's principal; that is the peer here
        // (sa-{50 % n} for the smallest mesh).
        let target: SocketAddr = format!("{}:8080", ip(0)).parse().expect("target");
        let client: SocketAddr = format!("{}:40000", ip(1 % n)).parse().expect("client");
        let peer = SpiffeId::new("cluster.local", "ns-0", &format!("sa-{}", 50 % n)).expect("id");
        assert!(authz::decide(index, "node-0", client, target, Some(&peer)).is_ok());
        authorize.bench_with_input(BenchmarkId::from_parameter(n), index, |b, i| {
            b.iter(|| {
                black_box(authz::decide(
                    i,
                    "node-0",
                    black_box(client),
                    black_box(target),
                    Some(&peer),
                ))
            })
        });
    }
    authorize.finish();

    let mut metrics = c.benchmark_group("metrics");
    for (n, index) in &meshes {
        let m = Metrics::default();
        let labels: Vec<ConnLabels> = index
            .workloads()
            .map(|w| ConnLabels {
                reporter: Reporter::Destination,
                source: w.peer(),
                destination: w.peer(),
                service: None,
                mtls: true,
                response_flags: "-",
            })
            .collect();
        for l in &labels {
            m.opened(l);
        }
        let one = &labels[labels.len() / 2];
        metrics.bench_with_input(BenchmarkId::from_parameter(n), &m, |b, m| {
            b.iter(|| m.opened(black_box(one)).closed(1024, 1024))
        });
    }
    metrics.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = decisions
}
criterion_main!(benches);
