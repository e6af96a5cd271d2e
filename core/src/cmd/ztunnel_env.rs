//! `zring proxy ztunnel`: the node proxy configured the way Istio's ztunnel chart configures
//! ztunnel, from the environment alone (the chart's container args are `proxy ztunnel`).
//!
//! Read, with ztunnel's meaning:
//! - `NODE_NAME` (required): workloads on this node are local.
//! - Config: `LOCAL_XDS_PATH` (a file, watched) or `LOCAL_XDS` (the YAML itself), ztunnel's
//!   local config format; else xDS from `XDS_ADDRESS` (default istiod's in-cluster address
//!   when `KUBERNETES_SERVICE_HOST` is set, else https://localhost:15012) with `XDS_ROOT_CA`,
//!   `ALT_XDS_HOSTNAME`, `AUTH_TOKEN`, `XDS_HEADER_*`, `CLUSTER_ID` (`crate::xds::client`).
//! - Certificates: zring's `ZRING_CERT_DIR` (mounted certificates) or `ZRING_CA_DIR` (a CA
//!   directory, e.g. a plug-in root), else `FAKE_CA=true` (a CA made at start in the temp dir,
//!   as ztunnel's fake CA), else Istio's CA at `CA_ADDRESS` (same default as the xDS address)
//!   with `CA_ROOT_CA`, `ALT_CA_HOSTNAME`, `AUTH_TOKEN`, `CA_HEADER_*`
//!   (`crate::xds::ca_client`). `SECRET_TTL` is the certificates' lifetime (default 24h).
//! - In-pod mode always (ztunnel's shared mode): pods come over ZDS at `INPOD_UDS` (default
//!   `/var/run/ztunnel/ztunnel.sock`); `INPOD_ENABLED` is accepted. `PROXY_MODE=dedicated` is
//!   refused (not supported).
//! - Workers: `ZTUNNEL_WORKER_THREADS` (a count or a percentage of the CPUs), else
//!   `ZTUNNEL_RESOURCE_CPU_LIMIT`, else `ZTUNNEL_CPU_LIMIT` (Kubernetes CPU quantities, rounded
//!   up), never more than the CPUs zring may run on; else one per allowed CPU. zring's own
//!   `ZRING_PIN` (auto, on, off: see `zring run --help`) says whether they are pinned.
//! - Drain: `CONNECTION_TERMINATION_DEADLINE`, else from `TERMINATION_GRACE_PERIOD_SECONDS`.
//! - `KEEPALIVE_TIME`, `KEEPALIVE_INTERVAL`, `KEEPALIVE_RETRIES`, `KEEPALIVE_ENABLED`,
//!   `PACKET_MARK`, `UNSTABLE_ENABLE_SOCKS5` (SOCKS5 on 127.0.0.1:15080).
//! - DNS proxy on `ISTIO_META_DNS_PROXY_ADDR` (default localhost:15053) unless
//!   `ISTIO_META_DNS_CAPTURE` is false; upstreams from /etc/resolv.conf.
//! - The xDS node (and logged at start): id from `INSTANCE_IP`, `POD_NAME`, `POD_NAMESPACE`;
//!   metadata NAME, NAMESPACE, INSTANCE_IPS, NODE_NAME, `CLUSTER_ID`/`ISTIO_META_CLUSTER_ID` and
//!   every `ISTIO_META_*`; `SERVICE_ACCOUNT` and `NETWORK` are logged.
//! - `LOG_FORMAT`, `RUST_LOG` and `RUST_BACKTRACE` are read where zring starts.
//!
//! Every other ztunnel variable that is set is listed in one log line as ignored.
//! `CRL_PATH` gets a warning of its own: zring does not check revocation lists yet.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, Context};
use zring_runtime::WorkerConfig;

use crate::proxy::{CertSource, Limits, RunConfig, DEFAULT_DRAIN_TIMEOUT, DEFAULT_PACKET_MARK};

/// Where `zring proxy ztunnel` serves Prometheus metrics (0.0.0.0), as ztunnel.
pub const STATS_PORT: u16 = 15020;
/// Where it serves `/healthz/ready` (0.0.0.0).
pub const READINESS_PORT: u16 = 15021;
/// Its admin endpoint (127.0.0.1).
pub const ADMIN_PORT: u16 = 15000;

/// The variables zring reads (beyond `ISTIO_META_*`): ztunnel's, and zring's own certificate
/// sources.
const USED: &[&str] = &[
    "ZRING_CA_DIR",
    "ZRING_CERT_DIR",
    "ZRING_PIN",
    "NODE_NAME",
    "LOCAL_XDS_PATH",
    "LOCAL_XDS",
    "FAKE_CA",
    "SECRET_TTL",
    "INPOD_UDS",
    "INPOD_ENABLED",
    "PROXY_MODE",
    "PACKET_MARK",
    "KEEPALIVE_TIME",
    "KEEPALIVE_INTERVAL",
    "KEEPALIVE_RETRIES",
    "KEEPALIVE_ENABLED",
    "ZTUNNEL_WORKER_THREADS",
    "ZTUNNEL_CPU_LIMIT",
    "ZTUNNEL_RESOURCE_CPU_LIMIT",
    "ZTUNNEL_RESOURCE_CPU_REQUEST",
    "CONNECTION_TERMINATION_DEADLINE",
    "TERMINATION_GRACE_PERIOD_SECONDS",
    "UNSTABLE_ENABLE_SOCKS5",
    "NETWORK",
    "CLUSTER_ID",
    "POD_NAME",
    "POD_NAMESPACE",
    "INSTANCE_IP",
    "SERVICE_ACCOUNT",
    "LOG_FORMAT",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "KUBERNETES_SERVICE_HOST",
];

/// The control plane's variables: accepted, not used until the xDS and CA clients exist.
const CONTROL_PLANE: &[&str] = &[
    "XDS_ADDRESS",
    "CA_ADDRESS",
    "XDS_ROOT_CA",
    "CA_ROOT_CA",
    "ALT_XDS_HOSTNAME",
    "ALT_CA_HOSTNAME",
    "AUTH_TOKEN",
    "XDS_ON_DEMAND",
];

/// ztunnel's other variables (its `src/config.rs`): set ones are listed as ignored.
const IGNORED: &[&str] = &[
    "ENABLE_PROXY",
    "PROXY_WORKLOAD_INFO",
    "USER_TIMEOUT_ENABLED",
    "INPOD_PORT_REUSE",
    "CLUSTER_DOMAIN",
    "PREFERED_SERVICE_NAMESPACE",
    "POOL_MAX_STREAMS_PER_CONNECTION",
    "POOL_UNUSED_RELEASE_TIMEOUT",
    "ENABLE_ORIG_SRC",
    "PROXY_CONFIG",
    "IPV6_ENABLED",
    "HTTP2_STREAM_WINDOW_SIZE",
    "HTTP2_CONNECTION_WINDOW_SIZE",
    "HTTP2_FRAME_SIZE",
    "LOCALHOST_APP_TUNNEL",
    "ENABLE_RESPONSE_BAGGAGE",
    "CRL_PATH",
];

/// The run config the environment describes, and what to tell the operator about it.
#[derive(Debug)]
pub struct ZtunnelSetup {
    /// What `zring run` would get.
    pub run: RunConfig,
    /// Log lines (warnings) about variables not used.
    pub notes: Vec<String>,
    /// The identity of this proxy's own pod and its metadata (logged at start).
    pub proxy: BTreeMap<String, String>,
}

/// Read the environment (given as a map, so tests need not touch the process's).
pub fn setup(env: &BTreeMap<String, String>) -> anyhow::Result<ZtunnelSetup> {
    fn lookup<'e>(env: &'e BTreeMap<String, String>, k: &str) -> Option<&'e str> {
        env.get(k).map(|v| v.trim()).filter(|v| !v.is_empty())
    }
    let get = |k: &str| lookup(env, k);
    let flag = |k: &str| get(k).map(|v| v.eq_ignore_ascii_case("true"));
    let node = get("NODE_NAME")
        .context("NODE_NAME is not set (the chart sets it from spec.nodeName)")?
        .to_string();
    if let Some(mode) = get("PROXY_MODE") {
        if !mode.eq_ignore_ascii_case("shared") {
            bail!(
                "PROXY_MODE={mode}: zring runs only in ztunnel's shared (node proxy, in-pod) mode"
            );
        }
    }
    let mut xds = None;
    let config = match (get("LOCAL_XDS_PATH"), get("LOCAL_XDS")) {
        (Some(_), Some(_)) => bail!("only one of LOCAL_XDS_PATH or LOCAL_XDS may be set"),
        (Some(p), None) => PathBuf::from(p),
        (None, Some(yaml)) => {
            let p =
                std::env::temp_dir().join(format!("zring-local-xds-{}.yaml", std::process::id()));
            std::fs::write(&p, yaml)
                .with_context(|| format!("writing LOCAL_XDS to {}", p.display()))?;
            p
        }
        (None, None) => {
            // ztunnel's default: istiod in the cluster, else on this host.
            let address = get("XDS_ADDRESS").map(str::to_string).unwrap_or_else(|| {
                if get("KUBERNETES_SERVICE_HOST").is_some() {
                    "https://istiod.istio-system.svc:15012".into()
                } else {
                    "https://localhost:15012".into()
                }
            });
            xds = Some(xds_settings(
                &address,
                get("XDS_ROOT_CA")
                    .unwrap_or("./var/run/secrets/istio/root-cert.pem")
                    .into(),
                get("ALT_XDS_HOSTNAME").map(str::to_string),
                Some(
                    get("AUTH_TOKEN")
                        .unwrap_or("./var/run/secrets/tokens/istio-token")
                        .into(),
                ),
                env,
            ));
            PathBuf::from(format!("xds:{address}"))
        }
    };
    let ttl = match get("SECRET_TTL") {
        Some(v) => parse_duration(v).with_context(|| format!("SECRET_TTL={v}"))?,
        None => zring_hbone::ca::DEFAULT_WORKLOAD_TTL,
    };
    let certs = if let Some(dir) = get("ZRING_CERT_DIR") {
        CertSource::Files(dir.into())
    } else if let Some(dir) = get("ZRING_CA_DIR") {
        CertSource::Ca(dir.into())
    } else if flag("FAKE_CA") == Some(true) {
        let dir = std::env::temp_dir().join(format!("zring-fake-ca-{}", std::process::id()));
        // One CA per process, made once even when set up from several threads at a time
        // (tests do): checking and creating under one lock.
        static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = MAKING.lock().unwrap_or_else(|p| p.into_inner());
        if !dir.join("root-key.pem").exists() {
            zring_hbone::ca::LocalCa::init_dir(&dir, crate::config::DEFAULT_TRUST_DOMAIN)
                .with_context(|| format!("FAKE_CA: creating a CA in {}", dir.display()))?;
        }
        CertSource::Ca(dir)
    } else {
        let address = get("CA_ADDRESS").map(str::to_string).unwrap_or_else(|| {
            if get("KUBERNETES_SERVICE_HOST").is_some() {
                "https://istiod.istio-system.svc:15012".into()
            } else {
                "https://localhost:15012".into()
            }
        });
        CertSource::IstioCa(ca_settings(
            &address,
            get("CA_ROOT_CA")
                .unwrap_or("./var/run/secrets/istio/root-cert.pem")
                .into(),
            get("ALT_CA_HOSTNAME").map(str::to_string),
            Some(
                get("AUTH_TOKEN")
                    .unwrap_or("./var/run/secrets/tokens/istio-token")
                    .into(),
            ),
            env,
        ))
    };
    let mut limits = Limits::default();
    if flag("KEEPALIVE_ENABLED") == Some(false) {
        limits.tcp_keepalive = None;
    } else if let Some(k) = limits.tcp_keepalive.as_mut() {
        if let Some(v) = get("KEEPALIVE_TIME") {
            k.time = parse_duration(v).with_context(|| format!("KEEPALIVE_TIME={v}"))?;
        }
        if let Some(v) = get("KEEPALIVE_INTERVAL") {
            k.interval = parse_duration(v).with_context(|| format!("KEEPALIVE_INTERVAL={v}"))?;
        }
        if let Some(v) = get("KEEPALIVE_RETRIES") {
            k.retries = v
                .parse()
                .with_context(|| format!("KEEPALIVE_RETRIES={v}"))?;
        }
    }
    let mark = match get("PACKET_MARK") {
        Some(v) => v
            .parse::<u32>()
            .with_context(|| format!("PACKET_MARK={v}"))?,
        None => DEFAULT_PACKET_MARK,
    };
    let drain_timeout = match get("CONNECTION_TERMINATION_DEADLINE") {
        Some(v) => {
            parse_duration(v).with_context(|| format!("CONNECTION_TERMINATION_DEADLINE={v}"))?
        }
        None => drain_from_grace(get("TERMINATION_GRACE_PERIOD_SECONDS")),
    };
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = worker_count(&|k: &str| lookup(env, k), available)?;
    let pin = match get("ZRING_PIN") {
        Some(v) => v
            .parse::<zring_runtime::Pinning>()
            .map_err(|e| anyhow::anyhow!("ZRING_PIN={v}: {e}"))?,
        None => zring_runtime::Pinning::Auto,
    };
    let dns = if flag("ISTIO_META_DNS_CAPTURE") == Some(false) {
        None
    } else {
        let addr = match get("ISTIO_META_DNS_PROXY_ADDR") {
            Some(v) => {
                parse_dns_addr(v).with_context(|| format!("ISTIO_META_DNS_PROXY_ADDR={v}"))?
            }
            None => SocketAddr::from(([127, 0, 0, 1], crate::dns::DEFAULT_PORT)),
        };
        let mut s = crate::dns::DnsSettings::from_resolv_conf(
            addr,
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        );
        s.mark = Some(mark);
        Some(s)
    };
    let run = RunConfig {
        config,
        node,
        certs,
        socks5: (flag("UNSTABLE_ENABLE_SOCKS5") == Some(true))
            .then(|| SocketAddr::from(([127, 0, 0, 1], 15080))),
        outbound: None,
        inbound_plaintext: None,
        transparent: false,
        hbone_port: 15008,
        mark: Some(mark),
        bind_source: false,
        admin: Some(SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT))),
        stats: Some(SocketAddr::from(([0, 0, 0, 0], STATS_PORT))),
        readiness: Some(SocketAddr::from(([0, 0, 0, 0], READINESS_PORT))),
        zds_socket: Some(
            get("INPOD_UDS")
                .unwrap_or(crate::zds::DEFAULT_SOCKET)
                .into(),
        ),
        workers: WorkerConfig {
            workers,
            pin,
            ..WorkerConfig::default()
        },
        limits,
        drain_timeout,
        dns,
        cert_ttl: ttl,
        xds,
        waypoint: None,
    };

    let mut notes = Vec::new();
    let unused: Vec<&str> = env
        .keys()
        .map(String::as_str)
        .filter(|k| {
            let xds = k.starts_with("XDS_") || *k == "ALT_XDS_HOSTNAME";
            let ca = k.starts_with("CA_") || *k == "ALT_CA_HOSTNAME";
            let remote_ca = matches!(run.certs, CertSource::IstioCa(_));
            let no_xds = run.xds.is_none();
            (CONTROL_PLANE.contains(k)
                || k.starts_with("XDS_HEADER_")
                || k.starts_with("CA_HEADER_"))
                && ((ca && !remote_ca)
                    || (xds && no_xds)
                    || (*k == "AUTH_TOKEN" && no_xds && !remote_ca))
        })
        .collect();
    if !unused.is_empty() {
        notes.push(format!(
            "control-plane settings not used (config from {}, certificates from {}): {}",
            run.config.display(),
            match &run.certs {
                CertSource::Ca(d) => format!("the CA in {}", d.display()),
                CertSource::Files(d) => format!("the files in {}", d.display()),
                CertSource::IstioCa(c) => c.address.clone(),
            },
            unused.join(", ")
        ));
    }
    let ignored: Vec<&str> = env
        .keys()
        .map(String::as_str)
        .filter(|k| IGNORED.contains(k))
        .collect();
    if !ignored.is_empty() {
        notes.push(format!(
            "ztunnel settings zring ignores: {}",
            ignored.join(", ")
        ));
    }
    if let Some(crl) = get("CRL_PATH") {
        notes.push(format!(
            "CRL_PATH={crl}: zring does not check certificate revocation lists yet; revoked peer certificates are NOT refused"
        ));
    }
    let mut proxy = BTreeMap::new();
    for k in [
        "POD_NAME",
        "POD_NAMESPACE",
        "INSTANCE_IP",
        "SERVICE_ACCOUNT",
        "NETWORK",
    ] {
        if let Some(v) = get(k) {
            proxy.insert(k.to_string(), v.to_string());
        }
    }
    let cluster = get("ISTIO_META_CLUSTER_ID")
        .or_else(|| get("CLUSTER_ID"))
        .unwrap_or("Kubernetes");
    proxy.insert("CLUSTER_ID".into(), cluster.to_string());
    for (k, v) in env {
        if let Some(meta) = k.strip_prefix("ISTIO_META_") {
            proxy.insert(format!("metadata.{meta}"), v.clone());
        }
    }
    Ok(ZtunnelSetup { run, notes, proxy })
}

/// xDS settings as ztunnel derives them from its environment: node id from `INSTANCE_IP`,
/// `POD_NAME`, `POD_NAMESPACE`; metadata NAME, NAMESPACE, INSTANCE_IPS, NODE_NAME, CLUSTER_ID
/// and every `ISTIO_META_*` (prefix stripped); headers from `XDS_HEADER_*`.
pub fn xds_settings(
    address: &str,
    root_ca: PathBuf,
    server_name: Option<String>,
    token_file: Option<PathBuf>,
    env: &BTreeMap<String, String>,
) -> crate::xds::client::XdsSettings {
    let get = |k: &str| {
        env.get(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let address = if address.contains("://") {
        address.to_string()
    } else {
        format!("https://{address}")
    };
    let cluster_id = get("ISTIO_META_CLUSTER_ID")
        .or_else(|| get("CLUSTER_ID"))
        .unwrap_or_else(|| "Kubernetes".into());
    let (ip, pod, ns) = (
        get("INSTANCE_IP").unwrap_or_default(),
        get("POD_NAME").unwrap_or_default(),
        get("POD_NAMESPACE").unwrap_or_default(),
    );
    let mut metadata = BTreeMap::new();
    for (k, v) in [
        ("NAME", pod.clone()),
        ("NAMESPACE", ns.clone()),
        ("INSTANCE_IPS", ip.clone()),
        ("NODE_NAME", get("NODE_NAME").unwrap_or_default()),
        ("CLUSTER_ID", cluster_id.clone()),
    ] {
        metadata.insert(k.to_string(), v);
    }
    for (k, v) in env {
        if let Some(m) = k.strip_prefix("ISTIO_META_") {
            metadata.insert(m.to_string(), v.clone());
        }
    }
    let headers = env
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("XDS_HEADER_")
                .map(|h| (h.to_ascii_lowercase().replace('_', "-"), v.clone()))
        })
        .collect();
    crate::xds::client::XdsSettings {
        upstream: crate::xds::conn::Upstream {
            address,
            root_ca,
            server_name,
            token_file,
            cluster_id,
            headers,
        },
        node_id: crate::xds::client::XdsSettings::node_id(&ip, &pod, &ns),
        metadata,
    }
}

/// Istio CA client settings as ztunnel derives them (headers from `CA_HEADER_*`).
pub fn ca_settings(
    address: &str,
    root_ca: PathBuf,
    server_name: Option<String>,
    token_file: Option<PathBuf>,
    env: &BTreeMap<String, String>,
) -> crate::xds::ca_client::CaClientSettings {
    crate::xds::conn::Upstream {
        headers: env
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("CA_HEADER_")
                    .map(|h| (h.to_ascii_lowercase().replace('_', "-"), v.clone()))
            })
            .collect(),
        ..xds_settings(address, root_ca, server_name, token_file, env).upstream
    }
}

/// Whether `name` is one of ztunnel's variables zring knows about (used, control plane, or
/// ignored).
pub fn is_known(name: &str) -> bool {
    USED.contains(&name)
        || CONTROL_PLANE.contains(&name)
        || IGNORED.contains(&name)
        || name.starts_with("ISTIO_META_")
        || name.starts_with("XDS_HEADER_")
        || name.starts_with("CA_HEADER_")
}

/// ztunnel's drain deadline: a little less than the pod's grace period, so the last seconds
/// are ours to close what is left before the kubelet's SIGKILL.
pub fn drain_from_grace(grace: Option<&str>) -> Duration {
    match grace.and_then(|v| v.trim().parse::<u64>().ok()) {
        Some(secs) if secs > 10 => Duration::from_secs(secs - 5),
        Some(secs) => Duration::from_secs(secs.saturating_sub(1).max(1)),
        None => DEFAULT_DRAIN_TIMEOUT,
    }
}

/// Worker threads as ztunnel derives them, capped at the CPUs available.
fn worker_count<'e>(
    get: &dyn Fn(&str) -> Option<&'e str>,
    available: usize,
) -> anyhow::Result<Option<usize>> {
    let n = if let Some(v) = get("ZTUNNEL_WORKER_THREADS") {
        Some(match v.strip_suffix('%') {
            Some(p) => {
                let p: f64 = p
                    .parse()
                    .with_context(|| format!("ZTUNNEL_WORKER_THREADS={v}"))?;
                if !(p > 0.0 && p <= 100.0) {
                    bail!("ZTUNNEL_WORKER_THREADS={v}: a percentage must be in (0, 100]");
                }
                ((available as f64 * p / 100.0).ceil() as usize).max(1)
            }
            None => v
                .parse::<usize>()
                .with_context(|| format!("ZTUNNEL_WORKER_THREADS={v}"))?,
        })
    } else if let Some(v) = get("ZTUNNEL_RESOURCE_CPU_LIMIT") {
        Some(cpu_quantity(v).with_context(|| format!("ZTUNNEL_RESOURCE_CPU_LIMIT={v}"))?)
    } else if let Some(v) = get("ZTUNNEL_CPU_LIMIT") {
        Some(cpu_quantity(v).with_context(|| format!("ZTUNNEL_CPU_LIMIT={v}"))?)
    } else {
        None
    };
    Ok(n.map(|n| n.clamp(1, available.max(1))))
}

/// A Kubernetes CPU quantity (`2`, `1.5`, `500m`) as whole CPUs, rounded up.
pub fn cpu_quantity(v: &str) -> anyhow::Result<usize> {
    let cores = match v.strip_suffix('m') {
        Some(m) => m.parse::<f64>()? / 1000.0,
        None => v.parse::<f64>()?,
    };
    if !cores.is_finite() || cores <= 0.0 {
        bail!("must be a positive CPU quantity");
    }
    Ok(cores.ceil() as usize)
}

/// A duration as ztunnel's variables write it: `10s`, `1m30s`, `500ms`, or plain seconds.
pub fn parse_duration(v: &str) -> anyhow::Result<Duration> {
    let d = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(v)?,
    };
    crate::config::bounded(d, v).map_err(|e| anyhow::anyhow!(e))
}

/// `localhost:PORT` (127.0.0.1) or an `ip:port`.
pub fn parse_dns_addr(v: &str) -> anyhow::Result<SocketAddr> {
    if let Some(port) = v.strip_prefix("localhost:") {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port.parse::<u16>()?)));
    }
    Ok(v.parse()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn workers_follow_ztunnels_variables_capped_at_the_cpus() {
        let w = |pairs: &[(&str, &str)], cpus| {
            let e = env(pairs);
            let get = |k: &str| e.get(k).map(String::as_str);
            worker_count(&get, cpus).unwrap()
        };
        assert_eq!(w(&[], 8), None);
        assert_eq!(w(&[("ZTUNNEL_CPU_LIMIT", "2")], 8), Some(2));
        assert_eq!(w(&[("ZTUNNEL_CPU_LIMIT", "64")], 8), Some(8));
        assert_eq!(
            w(
                &[
                    ("ZTUNNEL_RESOURCE_CPU_LIMIT", "1500m"),
                    ("ZTUNNEL_CPU_LIMIT", "8")
                ],
                8
            ),
            Some(2)
        );
        assert_eq!(
            w(
                &[
                    ("ZTUNNEL_WORKER_THREADS", "50%"),
                    ("ZTUNNEL_CPU_LIMIT", "1")
                ],
                8
            ),
            Some(4)
        );
        assert_eq!(w(&[("ZTUNNEL_WORKER_THREADS", "3")], 8), Some(3));
        let e = env(&[("ZTUNNEL_WORKER_THREADS", "150%")]);
        assert!(worker_count(&|k: &str| e.get(k).map(String::as_str), 8).is_err());
    }

    #[test]
    fn drain_follows_the_grace_period() {
        assert_eq!(drain_from_grace(Some("30")), Duration::from_secs(25));
        assert_eq!(drain_from_grace(Some("5")), Duration::from_secs(4));
        assert_eq!(drain_from_grace(None), DEFAULT_DRAIN_TIMEOUT);
    }

    #[test]
    fn the_chart_environment_maps_to_in_pod_mode() {
        let dir = std::env::temp_dir().join(format!("zring-env-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = env(&[
            ("NODE_NAME", "node-1"),
            ("LOCAL_XDS_PATH", "/etc/mesh.yaml"),
            ("ZRING_CA_DIR", dir.to_str().unwrap()),
            ("CA_ADDRESS", "istiod.istio-system.svc:15012"),
            ("XDS_ADDRESS", "istiod.istio-system.svc:15012"),
            ("INPOD_ENABLED", "true"),
            ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
            ("ZTUNNEL_CPU_LIMIT", "1"),
            ("ISTIO_META_CLUSTER_ID", "east"),
            ("ISTIO_META_DNS_CAPTURE", "false"),
            ("HTTP2_FRAME_SIZE", "16384"),
            ("CRL_PATH", "/var/run/secrets/istio/crl/ca-crl.pem"),
            ("POD_NAME", "ztunnel-abcde"),
        ]);
        let s = setup(&e).unwrap();
        assert_eq!(
            s.run.zds_socket.as_deref(),
            Some(std::path::Path::new("/var/run/ztunnel/ztunnel.sock"))
        );
        assert_eq!(s.run.node, "node-1");
        assert_eq!(s.run.drain_timeout, Duration::from_secs(25));
        assert_eq!(s.run.workers.workers, Some(1));
        assert!(s.run.dns.is_none());
        assert_eq!(s.proxy["CLUSTER_ID"], "east");
        assert_eq!(s.proxy["POD_NAME"], "ztunnel-abcde");
        let notes = s.notes.join("\n");
        assert!(notes.contains("CA_ADDRESS, XDS_ADDRESS"), "{notes}");
        assert!(
            notes.contains("ignores: CRL_PATH, HTTP2_FRAME_SIZE"),
            "{notes}"
        );
        assert!(notes.contains("NOT refused"), "{notes}");

        let from_istiod = env(&[
            ("NODE_NAME", "n"),
            ("FAKE_CA", "true"),
            ("XDS_ADDRESS", "istiod.istio-system.svc:15012"),
            ("INSTANCE_IP", "10.0.0.9"),
            ("POD_NAME", "ztunnel-a"),
            ("POD_NAMESPACE", "istio-system"),
            ("ISTIO_META_FOO", "bar"),
            ("XDS_HEADER_X_TEAM", "platform"),
        ]);
        let x = setup(&from_istiod).unwrap().run.xds.unwrap();
        assert_eq!(x.upstream.address, "https://istiod.istio-system.svc:15012");
        assert_eq!(
            x.node_id,
            "ztunnel~10.0.0.9~ztunnel-a.istio-system~istio-system.svc.cluster.local"
        );
        assert_eq!(x.metadata["FOO"], "bar");
        assert_eq!(x.metadata["NAME"], "ztunnel-a");
        assert_eq!(
            x.upstream.headers,
            vec![("x-team".to_string(), "platform".to_string())]
        );
        assert_eq!(x.upstream.cluster_id, "Kubernetes");
        let istio_ca = env(&[
            ("NODE_NAME", "n"),
            ("LOCAL_XDS_PATH", "/x"),
            ("CA_ADDRESS", "istiod.istio-system.svc:15012"),
            ("CA_HEADER_X_A", "b"),
        ]);
        match setup(&istio_ca).unwrap().run.certs {
            CertSource::IstioCa(c) => {
                assert_eq!(c.address, "https://istiod.istio-system.svc:15012");
                assert_eq!(c.headers, vec![("x-a".to_string(), "b".to_string())]);
            }
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn zring_pin_sets_the_pinning_and_a_bad_value_is_refused_by_name() {
        use zring_runtime::Pinning;
        let base = [
            ("NODE_NAME", "n"),
            ("LOCAL_XDS_PATH", "/x"),
            ("FAKE_CA", "true"),
        ];
        let pin = |v: Option<&str>| {
            let mut pairs = base.to_vec();
            pairs.extend(v.map(|v| ("ZRING_PIN", v)));
            setup(&env(&pairs)).map(|s| s.run.workers.pin)
        };
        assert_eq!(pin(None).unwrap(), Pinning::Auto);
        assert_eq!(pin(Some("off")).unwrap(), Pinning::Off);
        assert_eq!(pin(Some("on")).unwrap(), Pinning::On);
        let err = format!("{:#}", pin(Some("sometimes")).unwrap_err());
        assert!(err.contains("ZRING_PIN=sometimes"), "{err}");
        assert!(err.contains("expected auto, on or off"), "{err}");
    }
}
