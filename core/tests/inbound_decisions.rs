//! What the destination proxy answers to each CONNECT, over the bookinfo mesh.

use std::path::Path;

use zring_core::{
    authz::decide,
    config::{index::MeshIndex, LocalConfig},
};
use zring_hbone::{server::StatusCode, SpiffeId};

fn index() -> MeshIndex {
    MeshIndex::new(
        LocalConfig::from_yaml(
            include_str!("data/bookinfo-mesh.yaml"),
            Path::new("bookinfo-mesh.yaml"),
        )
        .unwrap(),
    )
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

fn status(
    idx: &MeshIndex,
    node: &str,
    target: &str,
    peer: Option<&SpiffeId>,
) -> Option<StatusCode> {
    decide(
        idx,
        node,
        "10.201.1.2:40000".parse().unwrap(),
        target.parse().unwrap(),
        peer,
    )
    .err()
    .map(|r| r.status)
}

#[test]
fn sleep_reaches_productpage_and_notsleep_gets_401_with_deny_flags() {
    let idx = index();
    assert_eq!(
        status(&idx, "node-b", "10.201.2.2:9080", Some(&id("sleep"))),
        None
    );
    let r = decide(
        &idx,
        "node-b",
        "10.201.1.3:40000".parse().unwrap(),
        "10.201.2.2:9080".parse().unwrap(),
        Some(&id("notsleep")),
    )
    .unwrap_err();
    assert_eq!(
        (r.status, r.response_flags),
        (StatusCode::UNAUTHORIZED, "DENY")
    );
    assert!(
        r.reason.contains("default/productpage-viewer"),
        "{}",
        r.reason
    );
}

#[test]
fn only_local_hbone_workloads_are_reachable() {
    let idx = index();
    assert_eq!(
        status(&idx, "node-a", "10.201.2.2:9080", Some(&id("sleep"))),
        Some(StatusCode::SERVICE_UNAVAILABLE),
        "productpage is not on node-a"
    );
    assert_eq!(
        status(&idx, "node-b", "10.201.9.9:80", Some(&id("sleep"))),
        Some(StatusCode::SERVICE_UNAVAILABLE),
        "unknown address"
    );
    assert_eq!(
        status(&idx, "node-b", "10.201.2.9:5432", Some(&id("sleep"))),
        Some(StatusCode::SERVICE_UNAVAILABLE),
        "TCP-only workload"
    );
}

#[test]
fn a_workload_behind_a_waypoint_accepts_only_the_waypoint() {
    let idx = index();
    assert_eq!(
        status(&idx, "node-b", "10.201.2.3:9080", Some(&id("sleep"))),
        Some(StatusCode::UNAUTHORIZED),
        "bypassing the waypoint"
    );
    assert_eq!(
        status(&idx, "node-b", "10.201.2.3:9080", None),
        Some(StatusCode::UNAUTHORIZED)
    );
    assert_eq!(
        status(
            &idx,
            "node-b",
            "10.201.2.3:9080",
            Some(&id("bookinfo-reviews-waypoint"))
        ),
        None,
        "the waypoint itself"
    );
    // The namespace DENY still applies behind the waypoint.
    assert_eq!(
        status(
            &idx,
            "node-b",
            "10.201.2.3:9999",
            Some(&id("bookinfo-reviews-waypoint"))
        ),
        Some(StatusCode::UNAUTHORIZED)
    );
}
