//! The deployment files stay in step with the binary. Every kustomization under deploy/ is
//! rendered (`kubectl kustomize`; scripts/test installs kubectl, and deploy/validate.sh checks
//! the same output against the Kubernetes schemas), and in each DaemonSet: the container runs
//! `proxy ztunnel` as the chart does; every environment variable is one zring reads (or one of
//! ztunnel's it names as ignored); the ports are the ones `zring proxy ztunnel` serves; the
//! environment, with the downward-API values filled in, is accepted by zring's own parser
//! (the base takes its config and certificates from istiod, the local-config overlay from
//! its files);
//! a seccomp profile it names exists under deploy/seccomp.

use std::{collections::BTreeMap, path::Path, process::Command};

use zring_core::cmd::ztunnel_env;

fn render(dir: &Path) -> Vec<serde_json::Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("kubectl is needed to render deploy/ ({e}); scripts/test installs it")
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML document"))
        .collect()
}

#[test]
fn every_rendered_daemonset_uses_only_what_zring_reads() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut dirs = vec![deploy.join("base")];
    for e in std::fs::read_dir(deploy.join("overlays")).unwrap() {
        dirs.push(e.unwrap().path());
    }
    assert!(dirs.len() >= 3, "{dirs:?}");
    for dir in dirs {
        let docs = render(&dir);
        let ds = docs
            .iter()
            .find(|d| d["kind"] == "DaemonSet")
            .unwrap_or_else(|| panic!("{}: no DaemonSet", dir.display()));
        let spec = &ds["spec"]["template"]["spec"];
        assert_eq!(ds["metadata"]["namespace"], "istio-system");
        assert_eq!(spec["serviceAccountName"], "ztunnel");
        let c = &spec["containers"][0];
        assert_eq!(c["args"], serde_json::json!(["proxy", "ztunnel"]));
        assert_eq!(
            c["readinessProbe"]["httpGet"]["port"],
            ztunnel_env::READINESS_PORT
        );
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz/ready");
        assert_eq!(c["ports"][0]["containerPort"], ztunnel_env::STATS_PORT);
        let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(
            annotations["prometheus.io/port"],
            ztunnel_env::STATS_PORT.to_string()
        );
        let caps = &c["securityContext"]["capabilities"]["add"];
        assert_eq!(
            caps,
            &serde_json::json!(["NET_ADMIN", "SYS_ADMIN", "NET_RAW"])
        );
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        let mounts: Vec<&str> = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["mountPath"].as_str().unwrap())
            .collect();
        for m in [
            "/var/run/ztunnel",
            "/tmp",
            "/var/run/secrets/istio",
            "/var/run/secrets/tokens",
        ] {
            assert!(mounts.contains(&m), "{}: {m} not mounted", dir.display());
        }

        // The environment as the kubelet would fill it in.
        let mut env = BTreeMap::new();
        for e in c["env"].as_array().unwrap() {
            let name = e["name"].as_str().unwrap().to_string();
            assert!(
                ztunnel_env::is_known(&name),
                "{}: {name} is not a variable zring reads",
                dir.display()
            );
            let value = match e.get("value") {
                Some(v) => v.as_str().unwrap().to_string(),
                None if e["valueFrom"].get("resourceFieldRef").is_some() => "2".into(),
                None => match e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap() {
                    "spec.nodeName" => "worker-1".into(),
                    "status.podIP" => "10.244.1.2".into(),
                    other => format!("from-{other}"),
                },
            };
            env.insert(name, value);
        }
        let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert_eq!(
            env["TERMINATION_GRACE_PERIOD_SECONDS"],
            grace.to_string(),
            "{}: the drain must follow the pod's grace period",
            dir.display()
        );
        let setup = ztunnel_env::setup(&env)
            .unwrap_or_else(|e| panic!("{}: zring refuses this environment: {e:#}", dir.display()));
        assert_eq!(
            setup.run.zds_socket.as_deref(),
            Some(Path::new("/var/run/ztunnel/ztunnel.sock"))
        );
        if env.contains_key("LOCAL_XDS_PATH") {
            assert!(setup.run.xds.is_none());
        } else {
            // As the chart means it: config from istiod over xDS, certificates from its CA.
            let x = setup.run.xds.as_ref().expect("xDS from istiod");
            assert_eq!(x.upstream.address, "https://istiod.istio-system.svc:15012");
            assert!(
                x.node_id.starts_with("ztunnel~10.244.1.2~"),
                "{}",
                x.node_id
            );
            assert!(matches!(
                setup.run.certs,
                zring_core::proxy::CertSource::IstioCa(_)
            ));
        }
        if let Some(p) = c["securityContext"]["seccompProfile"]["localhostProfile"].as_str() {
            let file = p.rsplit('/').next().unwrap();
            assert!(
                deploy.join("seccomp").join(file).exists(),
                "{}: seccomp profile {file} not in deploy/seccomp",
                dir.display()
            );
            let r = &c["resources"];
            assert_eq!(r["requests"], r["limits"], "performance: Guaranteed QoS");
            assert!(
                r["limits"]["cpu"].as_str().unwrap().parse::<u32>().is_ok(),
                "performance: whole CPUs"
            );
        }
    }
}
