//! Destination resolution over the bookinfo example, and certificate renewal at half-life.

use std::{path::Path, time::Duration};

use zring_core::{
    config::{
        index::{MeshIndex, Resolved},
        LocalConfig,
    },
    identity::CertManager,
};
use zring_hbone::{ca::LocalCa, SpiffeId};

fn index() -> MeshIndex {
    MeshIndex::new(
        LocalConfig::from_yaml(
            include_str!("data/bookinfo-mesh.yaml"),
            Path::new("bookinfo-mesh.yaml"),
        )
        .unwrap(),
    )
}

#[test]
fn vips_workload_ips_and_outsiders_resolve_as_ztunnel_would() {
    let idx = index();
    match idx.resolve("10.96.0.20:9080".parse().unwrap()) {
        Resolved::Service {
            service,
            port,
            endpoints,
        } => {
            assert_eq!((service.name.as_str(), port), ("productpage", 9080));
            let names: Vec<(&str, u16)> = endpoints
                .iter()
                .map(|(w, p)| (w.name.as_str(), *p))
                .collect();
            assert_eq!(names, vec![("productpage-v1", 9080)]);
        }
        other => panic!("{other:?}"),
    }
    let r = idx.resolve("10.96.0.30:9080".parse().unwrap());
    let wp = idx.waypoint_for(&r).expect("reviews has a waypoint");
    assert_eq!(
        (wp.destination.address.to_string(), wp.hbone_mtls_port),
        ("10.201.3.2".to_string(), 15008)
    );
    match idx.resolve("10.201.2.9:5432".parse().unwrap()) {
        Resolved::Workload { workload, port } => {
            assert_eq!((workload.name.as_str(), port), ("legacy-db", 5432));
            assert!(
                !MeshIndex::speaks_hbone(workload),
                "TCP workloads are passed through"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        idx.resolve("192.0.2.1:443".parse().unwrap()),
        Resolved::Unknown
    ));
    let local: Vec<&str> = idx
        .local_workloads("node-b")
        .map(|w| w.name.as_str())
        .collect();
    // In name (uid) order.
    assert_eq!(local, vec!["legacy-db", "productpage-v1", "reviews-v1"]);
}

#[test]
fn certificates_renew_at_half_life_and_old_ones_stay_usable() {
    let ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let mgr = CertManager::new(ca, Duration::from_secs(2));
    let id = SpiffeId::new("cluster.local", "default", "sleep").unwrap();
    let first = mgr.get(&id).unwrap();
    let now = std::time::SystemTime::now();
    assert!(
        mgr.renew_due(now).is_empty(),
        "fresh certificate is not renewed: now {now:?}, renew_after {:?}, not_after {:?}",
        first.cert.renew_after,
        first.cert.not_after
    );
    assert!(
        std::sync::Arc::ptr_eq(&first, &mgr.get(&id).unwrap()),
        "cached"
    );
    // Half of the 2 s lifetime, counted from issue (not from the 60 s backdated not_before).
    assert!(first.cert.renew_after <= first.cert.not_after - Duration::from_millis(900));
    assert!(
        mgr.renew_due(first.cert.renew_after - Duration::from_millis(10))
            .is_empty(),
        "not before half-life"
    );
    let renewed = mgr.renew_due(first.cert.renew_after + Duration::from_millis(1));
    assert_eq!(renewed.len(), 1);
    assert_eq!(renewed[0].as_ref().unwrap(), &id);
    let second = mgr.get(&id).unwrap();
    assert_ne!(
        first.cert.chain[0], second.cert.chain[0],
        "a new certificate"
    );
    // The old config is still a valid object for live connections.
    assert_eq!(first.server.alpn_protocols, vec![b"h2".to_vec()]);
    let exp = mgr.expiries();
    assert_eq!(exp.len(), 1);
    assert_eq!(exp[0].1, second.cert.not_after);
}

/// A workload's identity and metric labels are made once and shared by its connections; a
/// copy (what a config change starts from) makes its own from its own fields.
#[test]
fn a_workloads_identity_and_labels_are_made_once_and_a_copy_makes_its_own() {
    let idx = index();
    let w = idx
        .workload_by_ip("10.201.2.3".parse().unwrap())
        .expect("reviews-v1 in the example");
    let id = w.identity().unwrap();
    assert_eq!(
        id,
        SpiffeId::new("cluster.local", "default", "bookinfo-reviews").unwrap()
    );
    let (a, b) = (w.peer(), w.peer());
    assert!(std::sync::Arc::ptr_eq(&a, &b), "made once, then shared");
    assert_eq!(a.principal, id.to_string());
    assert_eq!(a.namespace, "default");
    // The example has no canonical name or revision: Istio's fallbacks.
    assert_eq!(a.canonical_service, "reviews-v1");
    assert_eq!(a.canonical_revision, "latest");

    let mut moved = w.clone();
    moved.service_account = "other".into();
    moved.canonical_revision = "v9".into();
    assert_eq!(
        moved.identity().unwrap().to_string(),
        "spiffe://cluster.local/ns/default/sa/other"
    );
    assert_eq!(moved.peer().canonical_revision, "v9");
    assert!(!std::sync::Arc::ptr_eq(&moved.peer(), &a));
    assert_eq!(
        w.peer().canonical_revision,
        "latest",
        "the original keeps its own"
    );
}
