//! ztunnel's local YAML loads unchanged; L4 policy decides with ztunnel's semantics.

use std::{net::SocketAddr, path::Path};

use zring_core::{
    authz::{evaluate, ConnInfo, Verdict},
    config::{ConfigError, InboundProtocol, LocalConfig},
};
use zring_hbone::SpiffeId;

const BOOKINFO: &str = include_str!("data/bookinfo-mesh.yaml");

fn bookinfo() -> LocalConfig {
    LocalConfig::from_yaml(BOOKINFO, Path::new("bookinfo-mesh.yaml"))
        .expect("ztunnel's example loads unchanged")
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

fn decide(
    cfg: &LocalConfig,
    dst_name: &str,
    src: &str,
    dst: &str,
    who: Option<&SpiffeId>,
) -> Verdict {
    let w = cfg
        .workloads
        .iter()
        .find(|w| w.name == dst_name)
        .expect("workload");
    let c = ConnInfo {
        src: src.parse::<SocketAddr>().unwrap(),
        dst: dst.parse().unwrap(),
        src_identity: who,
    };
    evaluate(&cfg.policies, w, &c)
}

#[test]
fn the_bookinfo_example_loads_with_every_shape_it_uses() {
    let cfg = bookinfo();
    assert_eq!(
        (cfg.workloads.len(), cfg.services.len(), cfg.policies.len()),
        (6, 2, 2)
    );
    let pp = cfg
        .workloads
        .iter()
        .find(|w| w.name == "productpage-v1")
        .unwrap();
    assert_eq!(
        pp.identity().unwrap().to_string(),
        "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
    );
    assert_eq!(pp.protocol, InboundProtocol::Hbone);
    assert_eq!(
        pp.services["default/productpage.default.svc.cluster.local"][&9080],
        9080
    );
    assert_eq!(
        pp.authorization_policies,
        vec!["default/productpage-viewer".to_string()]
    );
    let reviews = cfg.services.iter().find(|s| s.name == "reviews").unwrap();
    let wp = reviews.waypoint.as_ref().unwrap();
    assert_eq!(
        (
            wp.destination.network.as_str(),
            wp.destination.address.to_string().as_str(),
            wp.hbone_mtls_port
        ),
        ("", "10.201.3.2", 15008)
    );
    assert_eq!(reviews.vips[0].to_string(), "/10.96.0.30");
    let db = cfg
        .workloads
        .iter()
        .find(|w| w.name == "legacy-db")
        .unwrap();
    assert_eq!(db.protocol, InboundProtocol::Tcp);
}

#[test]
fn the_seeds_policy_allows_sleep_and_denies_notsleep_and_plaintext() {
    let cfg = bookinfo();
    let to_pp = "10.201.2.2:9080";
    assert_eq!(
        decide(
            &cfg,
            "productpage-v1",
            "10.201.1.2:40000",
            to_pp,
            Some(&id("sleep"))
        ),
        Verdict::Allow
    );
    match decide(
        &cfg,
        "productpage-v1",
        "10.201.1.3:40000",
        to_pp,
        Some(&id("notsleep")),
    ) {
        Verdict::Deny(why) => assert!(why.contains("default/productpage-viewer"), "{why}"),
        v => panic!("notsleep must be denied, got {v:?}"),
    }
    // Plaintext (no identity) cannot satisfy a principal rule.
    assert!(matches!(
        decide(&cfg, "productpage-v1", "10.201.1.3:40000", to_pp, None),
        Verdict::Deny(_)
    ));
}

#[test]
fn a_namespace_deny_wins_over_an_allow() {
    let cfg = bookinfo();
    // sleep is allowed to productpage, but port 9999 is denied namespace-wide.
    assert_eq!(
        decide(
            &cfg,
            "productpage-v1",
            "10.201.1.2:1",
            "10.201.2.2:9999",
            Some(&id("sleep"))
        ),
        Verdict::Deny("default/deny-9999".into())
    );
    // The namespace policy applies to every workload in default, even without a selector.
    assert_eq!(
        decide(
            &cfg,
            "legacy-db",
            "10.201.1.2:1",
            "10.201.2.9:9999",
            Some(&id("sleep"))
        ),
        Verdict::Deny("default/deny-9999".into())
    );
}

#[test]
fn no_applicable_allow_policy_means_allow() {
    let cfg = bookinfo();
    // reviews has no ALLOW policy; only the namespace DENY on 9999, which does not match 9080.
    assert_eq!(
        decide(
            &cfg,
            "reviews-v1",
            "10.201.1.3:1",
            "10.201.2.3:9080",
            Some(&id("notsleep"))
        ),
        Verdict::Allow
    );
    assert_eq!(
        decide(&cfg, "reviews-v1", "10.201.1.3:1", "10.201.2.3:9080", None),
        Verdict::Allow
    );
}

fn with_policies(extra: &str) -> LocalConfig {
    let yaml = format!(
        "workloads:\n- uid: u1\n  name: db\n  namespace: prod\n  serviceAccount: db\n  workloadIps: [\"10.210.0.5\"]\n  protocol: HBONE\n  authorizationPolicies: [\"prod/p\"]\npolicies:\n{extra}"
    );
    LocalConfig::from_yaml(&yaml, Path::new("inline.yaml"))
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn verdict(cfg: &LocalConfig, src: &str, port: u16, who: Option<&SpiffeId>) -> bool {
    let c = ConnInfo {
        src: format!("{src}:5555").parse().unwrap(),
        dst: format!("10.210.0.5:{port}").parse().unwrap(),
        src_identity: who,
    };
    evaluate(&cfg.policies, &cfg.workloads[0], &c) == Verdict::Allow
}

#[test]
fn ports_ip_blocks_and_their_not_forms() {
    let cfg = with_policies(
        "- name: p\n  namespace: prod\n  scope: WorkloadSelector\n  action: Allow\n  dryRun: false\n  rules:\n  - - - destinationPorts: [5432]\n        sourceIps: [\"10.210.1.0/24\"]\n        notSourceIps: [\"10.210.1.66\"]\n",
    );
    assert!(verdict(&cfg, "10.210.1.7", 5432, None));
    assert!(!verdict(&cfg, "10.210.1.7", 5433, None), "other port");
    assert!(
        !verdict(&cfg, "10.210.2.7", 5432, None),
        "outside the block"
    );
    assert!(
        !verdict(&cfg, "10.210.1.66", 5432, None),
        "excluded by notSourceIps"
    );
}

#[test]
fn principals_namespaces_and_service_accounts_with_every_string_match() {
    let cfg = with_policies(
        "- name: p\n  namespace: prod\n  scope: WorkloadSelector\n  action: Allow\n  dryRun: false\n  rules:\n  - - - principals:\n        - !Prefix cluster.local/ns/front\n    - - notNamespaces:\n        - !Suffix -test\n  - - - serviceAccounts: [{namespace: ops, serviceAccount: backup}]\n  - - - namespaces:\n        - !Exact audit\n        notPrincipals:\n        - !Suffix /sa/intern\n",
    );
    let sid = |ns: &str, sa: &str| SpiffeId::new("cluster.local", ns, sa).unwrap();
    assert!(
        verdict(&cfg, "10.0.0.1", 1, Some(&sid("frontend", "web"))),
        "prefix principal AND namespace clause"
    );
    assert!(
        !verdict(&cfg, "10.0.0.1", 1, Some(&sid("frontend-test", "web"))),
        "second clause excludes *-test"
    );
    assert!(
        verdict(&cfg, "10.0.0.1", 1, Some(&sid("ops", "backup"))),
        "service account rule"
    );
    assert!(!verdict(&cfg, "10.0.0.1", 1, Some(&sid("ops", "other"))));
    assert!(verdict(&cfg, "10.0.0.1", 1, Some(&sid("audit", "reader"))));
    assert!(
        !verdict(&cfg, "10.0.0.1", 1, Some(&sid("audit", "intern"))),
        "notPrincipals"
    );
    assert!(
        !verdict(&cfg, "10.0.0.1", 1, None),
        "no identity matches no identity rule"
    );

    let presence = with_policies("- name: p\n  namespace: prod\n  scope: WorkloadSelector\n  action: Allow\n  dryRun: false\n  rules:\n  - - - principals:\n        - !Presence\n");
    assert!(verdict(&presence, "10.0.0.1", 1, Some(&sid("x", "y"))));
    assert!(!verdict(&presence, "10.0.0.1", 1, None));
}

#[test]
fn dry_run_policies_are_not_enforced_and_global_scope_applies_everywhere() {
    let cfg = with_policies(
        "- name: p\n  namespace: prod\n  scope: WorkloadSelector\n  action: Deny\n  dryRun: true\n  rules:\n  - - - destinationPorts: [1]\n- name: g\n  namespace: istio-system\n  scope: Global\n  action: Deny\n  dryRun: false\n  rules:\n  - - - destinationPorts: [2]\n",
    );
    assert!(verdict(&cfg, "10.0.0.1", 1, None), "dry-run DENY only logs");
    assert!(
        !verdict(&cfg, "10.0.0.1", 2, None),
        "global DENY applies to a workload in another namespace"
    );
}

#[test]
fn bad_files_name_the_file_the_field_and_the_problem() {
    let bad_ip = BOOKINFO.replacen("10.201.1.3", "10.201.1.300", 1);
    let e = LocalConfig::from_yaml(&bad_ip, Path::new("mesh.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("mesh.yaml: workloads[1].workloadIps[0]:"),
        "{e}"
    );
    assert!(e.contains("invalid IP address syntax"), "{e}");

    let no_dry_run = BOOKINFO.replacen("  dryRun: false\n", "", 1);
    let e = LocalConfig::from_yaml(&no_dry_run, Path::new("mesh.yaml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("policies[0]") && e.contains("dryRun"), "{e}");

    let dup = BOOKINFO.replacen(
        "uid: cluster1//v1/Pod/default/notsleep",
        "uid: cluster1//v1/Pod/default/sleep",
        1,
    );
    let e = LocalConfig::from_yaml(&dup, Path::new("mesh.yaml")).unwrap_err();
    assert!(
        matches!(&e, ConfigError::Invalid { field, .. } if field == "workloads[1].uid"),
        "{e}"
    );

    let vip = BOOKINFO.replacen("vips: [\"/10.96.0.20\"]", "vips: [\"10.96.0.20\"]", 1);
    let e = LocalConfig::from_yaml(&vip, Path::new("mesh.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("services[0].vips[0]") && e.contains("network/ip"),
        "{e}"
    );

    let e = LocalConfig::load(Path::new("/nonexistent/mesh.yaml"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("/nonexistent/mesh.yaml:"), "{e}");

    // Fields zring does not know yet are accepted, as ztunnel's own parser grows.
    let extra = BOOKINFO.replacen(
        "  name: sleep\n",
        "  name: sleep\n  canonicalName: sleep\n  locality: {region: r1}\n",
        1,
    );
    LocalConfig::from_yaml(&extra, Path::new("mesh.yaml")).expect("unknown fields are ignored");
}
