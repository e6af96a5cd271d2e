//! Nodes and a control plane for the xDS tests: `zring control-plane` and `zring run`
//! configured only through it.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use super::{mesh::Node, Proc};

/// `zring control-plane` on `listen` serving `cfg` (watched), signing with `ca`, taking the
/// tokens in `tokens` (None: no token file, loopback only); returns once it listens.
pub fn control_plane(listen: &str, cfg: &Path, ca: &Path, tokens: Option<&Path>) -> Proc {
    let mut args = vec![
        "control-plane",
        "--config",
        cfg.to_str().unwrap(),
        "--ca-dir",
        ca.to_str().unwrap(),
        "--listen",
        listen,
    ];
    if let Some(t) = tokens {
        args.extend(["--token-file", t.to_str().unwrap()]);
    }
    let p = Proc::spawn(&args);
    super::wait_until(
        Duration::from_secs(10),
        || std::net::TcpStream::connect(listen).is_ok(),
        || format!("zring control-plane never listened:\n{}", p.log()),
    );
    p
}

/// A node configured only through the control plane at `xds` (xDS and CA, the token in
/// `token`, `ttl`-long certificates); admin 15000, stats 15020, readiness 15021 and, with
/// `socks5`, SOCKS5 15080 on `host`.
pub fn node(
    name: &str,
    host: [u8; 4],
    ca: &Path,
    token: &Path,
    xds: &str,
    socks5: bool,
    ttl: &str,
) -> Node {
    let host = IpAddr::from(host);
    let (admin, stats, ready) = (
        SocketAddr::new(host, 15000),
        SocketAddr::new(host, 15020),
        SocketAddr::new(host, 15021),
    );
    let (a, s, r) = (admin.to_string(), stats.to_string(), ready.to_string());
    let socks_at = SocketAddr::new(host, 15080).to_string();
    let root = ca.join("root-cert.pem");
    let mut args = vec![
        "run",
        "--node-name",
        name,
        "--xds-address",
        xds,
        "--xds-root-ca",
        root.to_str().unwrap(),
        "--alt-xds-hostname",
        "istiod.istio-system.svc",
        "--auth-token",
        token.to_str().unwrap(),
        "--ca-address",
        xds,
        "--ca-root-ca",
        root.to_str().unwrap(),
        "--alt-ca-hostname",
        "istiod.istio-system.svc",
        "--cert-ttl",
        ttl,
        "--packet-mark",
        "0",
        "--bind-source",
        "--workers",
        "1",
        "--dns-proxy",
        "false",
        "--admin-addr",
        &a,
        "--stats-addr",
        &s,
        "--readiness-addr",
        &r,
    ];
    if socks5 {
        args.extend(["--socks5", &socks_at]);
    }
    Node {
        proc: Proc::spawn(&args),
        stats,
        ready,
        admin,
    }
}
