//! `zring` with no arguments: a self-contained demo mesh on loopback.
//!
//! `zring control-plane` on 127.0.0.4:15012 (the istiod stand-in, with a freshly generated CA)
//! configures two node proxies (node-a on 127.0.0.2, node-b on 127.0.0.3) over xDS and issues
//! their workload certificates through CreateCertificate, as istiod does in a cluster. The
//! workloads `sleep` and `notsleep` on node-a and `productpage` on node-b (a small HTTP server
//! at 127.0.2.2:9080, service VIP 127.0.20.20:9080), and the seeds' policy: only
//! `cluster.local/ns/default/sa/sleep` may reach productpage. The demo sends real traffic
//! through node-a's SOCKS5 port (each workload's connections come from its own loopback
//! address), prints what happened, then keeps running so you can send your own.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use zring_runtime::{BackendChoice, ShutdownTrigger, WorkerConfig};

use crate::proxy::{self, RunConfig};

const NODE_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const NODE_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const SLEEP: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 2);
const NOTSLEEP: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 3);
const PRODUCTPAGE: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(127, 0, 20, 20);

fn mesh_yaml() -> String {
    format!(
        r#"# The zring demo mesh (ztunnel's local config format).
workloads:
- uid: demo//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["{SLEEP}"]
  protocol: HBONE
  node: node-a
- uid: demo//v1/Pod/default/notsleep
  name: notsleep
  namespace: default
  serviceAccount: notsleep
  workloadIps: ["{NOTSLEEP}"]
  protocol: HBONE
  node: node-a
- uid: demo//v1/Pod/default/productpage
  name: productpage-v1-7d8f9
  namespace: default
  serviceAccount: bookinfo-productpage
  workloadIps: ["{PRODUCTPAGE}"]
  protocol: HBONE
  node: node-b
  canonicalName: productpage
  canonicalRevision: v1
  workloadName: productpage-v1
  services:
    "default/productpage.default.svc.cluster.local":
      9080: 9080
  authorizationPolicies: ["default/productpage-viewer"]
services:
- name: productpage
  namespace: default
  hostname: productpage.default.svc.cluster.local
  vips: ["/{VIP}"]
  ports:
    9080: 9080
policies:
- name: productpage-viewer
  namespace: default
  scope: WorkloadSelector
  action: Allow
  dryRun: false
  rules:
  - - - principals:
        - !Exact cluster.local/ns/default/sa/sleep
"#
    )
}

/// The demo's control plane: `zring control-plane` on 127.0.0.4:15012.
const CONTROL_PLANE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);

fn node(name: &str, ip: Ipv4Addr, ca: &Path, socks5: bool) -> RunConfig {
    let at = |port| Some(SocketAddr::new(IpAddr::V4(ip), port));
    let address = format!("https://{CONTROL_PLANE}:15012");
    let root = ca.join(zring_hbone::ca::ROOT_CERT);
    let env = std::collections::BTreeMap::from([
        ("NODE_NAME".to_string(), name.to_string()),
        ("POD_NAME".to_string(), format!("zring-{name}")),
        ("POD_NAMESPACE".to_string(), "istio-system".to_string()),
        ("INSTANCE_IP".to_string(), ip.to_string()),
    ]);
    let istiod = Some("istiod.istio-system.svc".to_string());
    RunConfig {
        config: format!("xds:{address}").into(),
        xds: Some(crate::cmd::ztunnel_env::xds_settings(
            &address,
            root.clone(),
            istiod.clone(),
            None,
            &env,
        )),
        node: name.into(),
        certs: proxy::CertSource::IstioCa(crate::cmd::ztunnel_env::ca_settings(
            &address, root, istiod, None, &env,
        )),
        socks5: if socks5 { at(15080) } else { None },
        outbound: None,
        inbound_plaintext: None,
        transparent: false,
        hbone_port: 15008,
        mark: None,
        bind_source: true,
        admin: at(15000),
        stats: at(15020),
        readiness: at(15021),
        zds_socket: None,
        workers: WorkerConfig {
            workers: Some(1),
            io: BackendChoice::Auto,
            ..WorkerConfig::default()
        },
        limits: proxy::Limits::default(),
        drain_timeout: proxy::DEFAULT_DRAIN_TIMEOUT,
        // Each node's DNS proxy on its own address: `dig @127.0.0.2 -p 15053 productpage`.
        cert_ttl: zring_hbone::ca::DEFAULT_WORKLOAD_TTL,
        dns: at(crate::dns::DEFAULT_PORT).map(|a| {
            crate::dns::DnsSettings::from_resolv_conf(
                a,
                &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            )
        }),
        waypoint: None,
    }
}

/// Run the demo until Ctrl-C.
pub fn run(trigger: &ShutdownTrigger) -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_none() && crate::logging::current_filter() == "info" {
        // Keep the screen for the story; `RUST_LOG=info zring` shows the proxies' logs.
        let _ = crate::logging::set_filter("warn");
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("zring-demo-{}", std::process::id()));
    let ca = dir.join("ca");
    zring_hbone::ca::LocalCa::init_dir(&ca, "cluster.local")
        .with_context(|| format!("creating the demo CA in {}", ca.display()))?;
    let cfg = dir.join("mesh.yaml");
    std::fs::write(&cfg, mesh_yaml())?;
    let server = TcpListener::bind((PRODUCTPAGE, 9080))
        .context("binding productpage on 127.0.2.2:9080 (is another demo running?)")?;
    std::thread::Builder::new()
        .name("productpage".into())
        .spawn(move || productpage(server))?;
    // The control plane: what istiod would be in a cluster. The nodes get the mesh over xDS
    // and their certificates through CreateCertificate from it.
    let cp = crate::xds::server::ControlPlaneConfig {
        config: cfg.clone(),
        ca_dir: ca.clone(),
        listen: SocketAddr::new(IpAddr::V4(CONTROL_PLANE), 15012),
        token_file: None,
        poll: Duration::from_secs(1),
    };
    // The control plane outlives the node proxies: stopped with them, it would close their xDS
    // streams while they drain, and each would log the failure on Ctrl-C.
    let nodes_done = Arc::new(AtomicBool::new(false));
    let cp_done = nodes_done.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("zring-control-plane")
        .enable_all()
        .build()?;
    rt.spawn(async move {
        let stop = async move {
            while !cp_done.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        if let Err(e) = crate::xds::server::serve(cp, stop).await {
            eprintln!("zring demo: the control plane failed: {e:#}");
        }
    });
    let mut threads = Vec::new();
    for (name, ip, socks) in [("node-b", NODE_B, false), ("node-a", NODE_A, true)] {
        let rc = node(name, ip, &ca, socks);
        let t = trigger.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("zring-{name}"))
                .spawn(move || proxy::run(rc, &t))?,
        );
    }
    for ip in [NODE_B, NODE_A] {
        wait_ready(SocketAddr::new(IpAddr::V4(ip), 15021), &threads)?;
    }
    println!(
        "zring demo mesh: two node proxies on loopback, configured by zring control-plane on {CONTROL_PLANE}:15012\n  (xDS for the mesh, CreateCertificate for the workload certificates; its CA is in {})",
        ca.display()
    );
    println!(
        "  node-a 127.0.0.2: sleep (127.0.1.2), notsleep (127.0.1.3); SOCKS5 on 127.0.0.2:15080"
    );
    println!("  node-b 127.0.0.3: productpage (127.0.2.2:9080), service VIP 127.0.20.20:9080");
    println!("  policy productpage-viewer: only cluster.local/ns/default/sa/sleep may call productpage\n");
    let socks = SocketAddr::new(IpAddr::V4(NODE_A), 15080);
    let target = SocketAddr::new(IpAddr::V4(VIP), 9080);
    for (who, src) in [("sleep", SLEEP), ("notsleep", NOTSLEEP)] {
        let t0 = Instant::now();
        let outcome = get_through_socks(src, socks, target);
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        // What the proxies recorded: node-a's view (reporter=source) and node-b's
        // (reporter=destination) of this workload's connection.
        let seen_a = labels_of(NODE_A, "source", who);
        let seen_b = labels_of(NODE_B, "destination", who);
        let get = |m: &Option<std::collections::HashMap<String, String>>, k: &str| {
            m.as_ref()
                .and_then(|m| m.get(k).cloned())
                .unwrap_or_else(|| "?".into())
        };
        match outcome {
            Ok(Ok((status, bytes))) => println!("{who} -> productpage.default.svc.cluster.local ({target}): ALLOWED, {status}, {bytes} bytes in {ms:.2} ms"),
            Ok(Err(code)) => println!("{who} -> productpage.default.svc.cluster.local ({target}): DENIED (SOCKS5 reply {code}) after {ms:.2} ms"),
            Err(e) => println!("{who} -> productpage: the demo client failed: {e}"),
        }
        println!(
            "  node-a: {} -> {} ({}), connection_security_policy={}",
            get(&seen_a, "source_principal"),
            get(&seen_a, "destination_principal"),
            get(&seen_a, "destination_workload"),
            get(&seen_a, "connection_security_policy"),
        );
        println!(
            "  node-b: checked {}'s proven identity against productpage-viewer: response_flags={} ({})\n",
            get(&seen_b, "source_principal"),
            get(&seen_b, "response_flags"),
            if get(&seen_b, "response_flags") == "DENY" { "denied, 401" } else { "allowed" },
        );
    }
    println!("Try it yourself (each workload sends from its own loopback address):");
    println!("  curl -x socks5://127.0.0.2:15080 --interface 127.0.1.2 http://127.0.20.20:9080/   # as sleep: allowed");
    println!("  curl -x socks5://127.0.0.2:15080 --interface 127.0.1.3 http://127.0.20.20:9080/   # as notsleep: denied");
    println!("  curl -s 127.0.0.3:15020/metrics | grep istio_tcp      # node-b's metrics (node-a: 127.0.0.2)");
    println!("  curl -s 127.0.0.3:15000/config_dump                   # config and certificates");
    println!(
        "  edit {} and watch the control plane push the change",
        cfg.display()
    );
    println!("Ctrl-C stops the demo.");
    let mut result = Ok(());
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err(anyhow::anyhow!("a demo proxy panicked")),
        }
    }
    nodes_done.store(true, Ordering::Release);
    rt.shutdown_timeout(Duration::from_secs(2));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn wait_ready(
    addr: SocketAddr,
    threads: &[std::thread::JoinHandle<anyhow::Result<()>>],
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if threads.iter().any(|t| t.is_finished()) {
            anyhow::bail!("a demo proxy stopped during start-up (see the log above)");
        }
        if let Ok(mut c) = TcpStream::connect(addr) {
            let _ =
                c.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut s = String::new();
            let _ = c.read_to_string(&mut s);
            if s.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("the demo proxy at {addr} never became ready");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The labels of the first `istio_tcp_connections_opened_total` series that `reporter` on the
/// node at `ip` has for source workload `who`.
fn labels_of(
    ip: Ipv4Addr,
    reporter: &str,
    who: &str,
) -> Option<std::collections::HashMap<String, String>> {
    let mut c = TcpStream::connect((ip, 15020)).ok()?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    c.read_to_string(&mut text).ok()?;
    let line = text.lines().find(|l| {
        l.starts_with("istio_tcp_connections_opened_total{")
            && l.contains(&format!("reporter=\"{reporter}\""))
            && l.contains(&format!("source_workload=\"{who}\""))
    })?;
    let inner = line.split_once('{')?.1.rsplit_once('}')?.0;
    Some(
        inner
            .split("\",")
            .filter_map(|kv| kv.split_once("=\""))
            .map(|(k, v)| (k.to_string(), v.trim_end_matches('"').to_string()))
            .collect(),
    )
}

/// HTTP GET through the SOCKS5 proxy from `src`: Ok(Ok((status line, bytes))) or the SOCKS
/// reply code when refused.
fn get_through_socks(
    src: Ipv4Addr,
    socks: SocketAddr,
    target: SocketAddr,
) -> std::io::Result<Result<(String, usize), u8>> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(IpAddr::V4(src), 0).into())?;
    sock.connect_timeout(&socks.into(), Duration::from_secs(5))?;
    let mut c: TcpStream = sock.into();
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(&[5, 1, 0])?;
    let mut g = [0u8; 2];
    c.read_exact(&mut g)?;
    let IpAddr::V4(v4) = target.ip() else {
        return Err(std::io::Error::other("IPv4 target expected"));
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.octets());
    req.extend_from_slice(&target.port().to_be_bytes());
    c.write_all(&req)?;
    let mut r = [0u8; 10];
    c.read_exact(&mut r)?;
    if r[1] != 0 {
        return Ok(Err(r[1]));
    }
    c.write_all(b"GET / HTTP/1.1\r\nHost: productpage:9080\r\nConnection: close\r\n\r\n")?;
    let mut resp = Vec::new();
    c.read_to_end(&mut resp)?;
    let status = String::from_utf8_lossy(&resp)
        .lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("HTTP/1.1 ")
        .to_string();
    Ok(Ok((status, resp.len())))
}

/// productpage: answers every request with a small HTML page and closes.
fn productpage(l: TcpListener) {
    for c in l.incoming().flatten() {
        std::thread::spawn(move || {
            let mut c = c;
            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let body = "<html><body><h1>Bookinfo productpage</h1><p>served through zring</p></body></html>\n";
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
    }
}
