//! `zring-bench xds-scale`: a zring node fed by `zring control-plane` over delta xDS with a
//! mesh of N workloads (N/10 services, one namespace policy per namespace), for several N in
//! one run: the time from the node's start to ready (stream, first push, index built), the RSS
//! it takes per resource, and the time to apply one changed workload with N present.
//!
//! The node's own cost of a push is its `zring_config_apply_seconds` summary (from a delta's
//! arrival to the new config in force); the end-to-end time (file written -> node's
//! `zring_config_generation` moves) adds the control plane's file poll, its YAML parse and its
//! diff, which grow with N by design (it re-reads the whole file). Everything runs on
//! loopback; the workloads' addresses are data only, never connected to.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::{
    sample::rss_mib,
    util::{git_commit, machine, median, Killed},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Workload counts to measure (services are a tenth; 0 is the empty baseline).
    #[arg(long, value_delimiter = ',', default_value = "0,1000,10000")]
    sizes: Vec<usize>,
    /// Changed workloads pushed, one at a time, per size.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// The zring binary of the node measured (a release build).
    #[arg(long, default_value = "target/release/zring")]
    zring: PathBuf,
    /// The zring binary serving `zring control-plane` (default: `--zring`); set it to compare
    /// an older node build against the same control plane.
    #[arg(long)]
    control_plane_zring: Option<PathBuf>,
    /// Output folder.
    #[arg(long, default_value = "perf-reports/xds-scale")]
    out: PathBuf,
}

#[derive(Debug, Serialize)]
struct Row {
    workloads: usize,
    services: usize,
    policies: usize,
    yaml_bytes: usize,
    /// Node start -> readiness 200 (includes the TLS stream and the control plane's send).
    ready_ms: f64,
    /// The node's own apply of the first push.
    first_apply_ms: f64,
    rss_mib: f64,
    /// Node-side apply of one changed workload: median and max over the changes.
    change_apply_ms_median: f64,
    change_apply_ms_max: f64,
    /// File written -> the node's generation moved (control plane poll + parse + diff + push).
    change_end_to_end_ms_median: f64,
    /// In this process: building the whole index from the config (what every push cost
    /// before the index was incremental), median of 5.
    index_rebuild_ms: f64,
    /// In this process: applying one changed workload to the index, median of 200.
    index_apply_one_us: f64,
}

/// The index alone, in this process: a whole rebuild against one change applied.
fn index_costs(yaml: &str, workloads: usize) -> anyhow::Result<(f64, f64)> {
    use zring_core::config::{
        index::{Change, MeshIndex},
        LocalConfig,
    };
    if workloads == 0 {
        return Ok((0.0, 0.0));
    }
    let config = LocalConfig::from_yaml(yaml, Path::new("mesh.yaml"))?;
    let rebuild: Vec<f64> = (0..5)
        .map(|_| {
            let c = config.clone();
            let t = Instant::now();
            let i = MeshIndex::new(c);
            let ms = t.elapsed().as_secs_f64() * 1e3;
            drop(i);
            ms
        })
        .collect();
    let index = MeshIndex::new(config.clone());
    let apply: Vec<f64> = (0..200)
        .map(|k| {
            let mut w = config.workloads[k * 37 % workloads].clone();
            w.workload_ips = vec![std::net::IpAddr::from([10, 251, (k / 256) as u8, k as u8])];
            let delta = vec![(w.uid.clone(), Change::Workload(Box::new(w)))];
            let t = Instant::now();
            let next = index.apply(delta);
            let us = t.elapsed().as_secs_f64() * 1e6;
            drop(next);
            us
        })
        .collect();
    Ok((median(rebuild), median(apply)))
}

/// The mesh as ztunnel's local YAML; `moved` workloads get another address.
fn mesh_yaml(workloads: usize, moved: &[usize]) -> String {
    let services = workloads / 10;
    let mut y = String::with_capacity(workloads * 400);
    y.push_str(if workloads == 0 {
        "workloads: []\n"
    } else {
        "workloads:\n"
    });
    for i in 0..workloads {
        let ns = i % 50;
        let ip = if moved.contains(&i) {
            format!("10.250.{}.{}", (i / 256) % 256, i % 256)
        } else {
            format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256)
        };
        y.push_str(&format!(
            "- uid: bench//v1/Pod/ns-{ns}/w-{i}\n  name: w-{i}\n  namespace: ns-{ns}\n  serviceAccount: sa-{ns}\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: node-{}\n",
            i % 100
        ));
        if services > 0 {
            let s = i % services;
            y.push_str(&format!(
                "  services:\n    \"ns-{}/s-{s}.ns-{}.svc.cluster.local\":\n      80: 8080\n",
                s % 50,
                s % 50
            ));
        }
    }
    y.push_str(if services == 0 {
        "services: []\n"
    } else {
        "services:\n"
    });
    for s in 0..services {
        y.push_str(&format!(
            "- name: s-{s}\n  namespace: ns-{ns}\n  hostname: s-{s}.ns-{ns}.svc.cluster.local\n  vips: [\"/10.96.{}.{}\"]\n  ports:\n    80: 8080\n",
            s / 256,
            s % 256,
            ns = s % 50
        ));
    }
    y.push_str(if workloads == 0 {
        "policies: []\n"
    } else {
        "policies:\n"
    });
    for ns in 0..50.min(workloads) {
        y.push_str(&format!(
            "- name: allow-ns\n  namespace: ns-{ns}\n  scope: Namespace\n  action: Allow\n  dryRun: false\n  rules:\n  - - - namespaces: [!Exact ns-{ns}]\n"
        ));
    }
    y
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One HTTP/1.0 GET to 127.0.0.1: status and body.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    c.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    let status = s.split_whitespace().nth(1)?.parse().ok()?;
    let body = s.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The node's generation and its apply summary (sum seconds, count; NaN from a zring that
/// predates the summary, so an older build can be measured for comparison).
fn node_state(stats: SocketAddr) -> Option<(f64, f64, f64)> {
    let (_, m) = get(stats, "/stats/prometheus")?;
    Some((
        metric(&m, "zring_config_generation")?,
        metric(&m, "zring_config_apply_seconds_sum").unwrap_or(f64::NAN),
        metric(&m, "zring_config_apply_seconds_count").unwrap_or(f64::NAN),
    ))
}

fn wait(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out: {what}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn measure(args: &Args, dir: &Path, ca: &Path, workloads: usize) -> anyhow::Result<Row> {
    let cfg = dir.join(format!("mesh-{workloads}.yaml"));
    let yaml = mesh_yaml(workloads, &[]);
    std::fs::write(&cfg, &yaml)?;
    let cp_port = free_port()?;
    let cp_addr = format!("127.0.0.1:{cp_port}");
    let _cp = Killed(
        Command::new(args.control_plane_zring.as_ref().unwrap_or(&args.zring))
            .args(["control-plane", "--config"])
            .arg(&cfg)
            .arg("--ca-dir")
            .arg(ca)
            .args(["--listen", &cp_addr, "--poll", "50ms"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("starting zring control-plane")?,
    );
    wait(Duration::from_secs(60), "the control plane listens", || {
        TcpStream::connect(&cp_addr).is_ok()
    })?;
    let root = ca.join("root-cert.pem");
    let token = dir.join("istio-token");
    std::fs::write(&token, "bench\n")?;
    let (stats, ready) = (
        SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        SocketAddr::from(([127, 0, 0, 1], free_port()?)),
    );
    let xds = format!("https://{cp_addr}");
    let started = Instant::now();
    let node = Killed(
        Command::new(&args.zring)
            .args(["run", "--node-name", "bench-node", "--xds-address", &xds])
            .arg("--xds-root-ca")
            .arg(&root)
            .args(["--alt-xds-hostname", "istiod.istio-system.svc"])
            .args(["--ca-address", &xds])
            .arg("--ca-root-ca")
            .arg(&root)
            .args(["--alt-ca-hostname", "istiod.istio-system.svc"])
            .arg("--auth-token")
            .arg(&token)
            .args(["--workers", "1", "--dns-proxy", "false"])
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(["--stats-addr", &stats.to_string()])
            .args(["--readiness-addr", &ready.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("starting zring run")?,
    );
    wait(Duration::from_secs(120), "the node is ready", || {
        get(ready, "/healthz/ready").is_some_and(|(s, _)| s == 200)
    })?;
    let ready_ms = started.elapsed().as_secs_f64() * 1e3;
    let (_, first_sum, _) = node_state(stats).context("reading the node's metrics")?;
    std::thread::sleep(Duration::from_secs(2));
    let rss = rss_mib(node.0.id());
    let mut apply = Vec::new();
    let mut e2e = Vec::new();
    for k in 0..args.changes.min(workloads) {
        let (generation, sum, count) = node_state(stats).context("reading the node's metrics")?;
        let i = k * workloads / args.changes.min(workloads).max(1);
        std::fs::write(&cfg, mesh_yaml(workloads, &[i]))?;
        let written = Instant::now();
        let mut after = None;
        wait(
            Duration::from_secs(60),
            "the change reaches the node",
            || {
                after = node_state(stats).filter(|s| s.0 > generation);
                after.is_some()
            },
        )?;
        e2e.push(written.elapsed().as_secs_f64() * 1e3);
        let (_, sum2, count2) = after.context("no state")?;
        if count2 - count > 1.0 {
            bail!("one change came as {} applies", count2 - count);
        }
        apply.push((sum2 - sum) * 1e3);
        // Back to the original, so every change is one workload.
        std::fs::write(&cfg, &yaml)?;
        let g = generation + 1.0;
        wait(
            Duration::from_secs(60),
            "the revert reaches the node",
            || node_state(stats).is_some_and(|s| s.0 > g),
        )?;
    }
    let max = apply.iter().copied().fold(f64::NAN, f64::max);
    let (index_rebuild_ms, index_apply_one_us) = index_costs(&yaml, workloads)?;
    Ok(Row {
        workloads,
        services: workloads / 10,
        policies: 50.min(workloads),
        yaml_bytes: yaml.len(),
        ready_ms,
        first_apply_ms: first_sum * 1e3,
        rss_mib: rss,
        change_apply_ms_median: median(apply),
        change_apply_ms_max: max,
        change_end_to_end_ms_median: median(e2e),
        index_rebuild_ms,
        index_apply_one_us,
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("zring-xds-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ca = dir.join("ca");
    let out = Command::new(&args.zring)
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .output()
        .context("zring ca init")?;
    if !out.status.success() {
        bail!("zring ca init: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut rows = Vec::new();
    for &n in &args.sizes {
        let row = measure(&args, &dir, &ca, n);
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.context(format!("{n} workloads")));
            }
        };
        eprintln!("{row:?}");
        rows.push(row);
    }
    let _ = std::fs::remove_dir_all(&dir);
    write_report(&args, &rows)
}

fn write_report(args: &Args, rows: &[Row]) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let commit = git_commit();
    let json = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "commit": commit,
        "machine": machine(),
        "rows": rows,
    });
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let base = rows.iter().find(|r| r.workloads == 0).map(|r| r.rss_mib);
    let mut md = format!(
        "# xDS scale: one zring node fed by `zring control-plane`\n\nCommand: `{}`  \nCommit: {commit}  \nMachine: {}\n\n\
         | workloads | services | policies | YAML | start -> ready | first apply (node) | RSS | RSS per workload+service over empty | one change: node apply, median / max | one change: file -> node, median | index: whole rebuild | index: one change applied |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        json["command"].as_str().unwrap_or_default(),
        json["machine"]
    );
    for r in rows {
        let per = match (base, r.workloads) {
            (Some(b), n) if n > 0 => format!(
                "{:.2} KiB",
                (r.rss_mib - b) * 1024.0 / (r.workloads + r.services) as f64
            ),
            _ => "-".into(),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} MiB | {:.0} ms | {:.1} ms | {:.1} MiB | {per} | {:.3} / {:.3} ms | {:.0} ms | {:.2} ms | {:.1} us |\n",
            r.workloads,
            r.services,
            r.policies,
            r.yaml_bytes as f64 / (1 << 20) as f64,
            r.ready_ms,
            r.first_apply_ms,
            r.rss_mib,
            r.change_apply_ms_median,
            r.change_apply_ms_max,
            r.change_end_to_end_ms_median,
            r.index_rebuild_ms,
            r.index_apply_one_us,
        ));
    }
    std::fs::write(args.out.join("report.md"), &md)?;
    println!("{md}");
    Ok(())
}
