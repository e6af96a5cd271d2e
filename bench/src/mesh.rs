//! `zring-bench mesh`: the full node-proxy path, client -> zring A -> HBONE -> zring B ->
//! server, against the same client and server talking directly, in one run.
//!
//! Everything runs inside a network namespace the benchmark creates (and deletes): the client
//! workload 10.240.1.2 has its outbound TCP redirected by iptables to zring A's 15001 (as in
//! ztunnel's dedicated mode), zring A tunnels to zring B on 10.240.2.2:15008, zring B delivers
//! to the server at 10.240.2.2. The direct path is the same client bound to 10.240.1.9, which
//! the rules do not capture. Needs root.
//!
//! Measured per path: HTTP/1.1 with 1 KiB responses at a fixed 1000 rps on 1, 4, 16 and 64
//! connections (p50/p90/p99, coordinated omission corrected), max rps on 16 connections, a new
//! connection per request (tcp-crr, max rate on 16 connections), iperf3 throughput (1 stream),
//! and the CPU (cores) and RSS of each zring during every run.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::{
    sample::{rss_mib, CpuWindow},
    util::{git_commit, machine, which, Killed},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// The zring binary.
    #[arg(long, default_value = "target/release/zring")]
    zring: PathBuf,
    /// The zring-loadgen binary.
    #[arg(long, default_value = "target/release/zring-loadgen")]
    loadgen: PathBuf,
    /// Workers per zring (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Output folder.
    #[arg(long, default_value = "perf-reports/mesh")]
    out: PathBuf,
}

const CLIENT_MESH: &str = "10.240.1.2";
const CLIENT_DIRECT: &str = "10.240.1.9";
const SERVER: &str = "10.240.2.2";

const CONFIG: &str = r#"workloads:
- uid: bench//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["10.240.1.2"]
  protocol: HBONE
  node: node-a
- uid: bench//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["10.240.2.2"]
  protocol: HBONE
  node: node-b
policies:
- name: server-viewer
  namespace: default
  scope: Namespace
  action: Allow
  dryRun: false
  rules:
  - - - principals:
        - !Exact cluster.local/ns/default/sa/client
"#;

struct Ns {
    name: String,
}

impl Ns {
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    fn sh(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = self.cmd(args[0]).args(&args[1..]).output()?;
        if !out.status.success() {
            bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[derive(Debug, Clone, Serialize)]
struct Proxy {
    cores: f64,
    rss_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    path: &'static str,
    test: String,
    /// Requests (or connections) per second achieved.
    rate: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    gbit_s: f64,
    errors: u64,
    /// Errors by kind, as zring-loadgen reports them.
    error_kinds: String,
    proxies: Vec<Proxy>,
}

fn wait_ready(ns: &Ns, addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ok = ns
            .cmd("bash")
            .args([
                "-c",
                &format!(
                    "exec 3<>/dev/tcp/{}/{} && printf 'GET /healthz/ready HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -c 12 <&3",
                    addr.split(':').next().unwrap_or_default(),
                    addr.split(':').nth(1).unwrap_or_default()
                ),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("200"))
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("zring at {addr} never became ready");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    which("iperf3")?;
    which("iptables")?;
    let name = format!("zrb-mesh-{}", std::process::id());
    let st = Command::new("ip").args(["netns", "add", &name]).status()?;
    if !st.success() {
        bail!("cannot create a network namespace (needs root)");
    }
    let ns = Ns { name };
    ns.sh(&["ip", "link", "set", "lo", "up"])?;
    // Connection-per-request runs from one source IP reuse 4-tuples within TIME_WAIT; the
    // default (2) allows that only for 127/8 addresses. This namespace is the bench's own.
    // (zring-loadgen picks --bind source ports from 20000..60000 itself.)
    ns.sh(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    // zring B's connections to the server all go from 10.240.2.2 to one ip:port: a wider
    // ephemeral range gives a connection-per-request run room before TIME_WAIT fills it.
    ns.sh(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000"])?;
    for a in [CLIENT_MESH, CLIENT_DIRECT, SERVER] {
        ns.sh(&["ip", "addr", "add", &format!("{a}/32"), "dev", "lo"])?;
    }
    let nat = |rule: &[&str]| {
        let mut v = vec!["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp"];
        v.extend_from_slice(rule);
        ns.sh(&v)
    };
    nat(&["-m", "mark", "--mark", "1337", "-j", "RETURN"])?;
    nat(&[
        "-s",
        CLIENT_MESH,
        "-d",
        SERVER,
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ])?;

    let dir = std::env::temp_dir().join(format!("zring-bench-mesh-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ca = dir.join("ca");
    let st = Command::new(&args.zring)
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("zring ca init failed");
    }
    let cfg = dir.join("mesh.yaml");
    std::fs::write(&cfg, CONFIG)?;

    // Servers.
    let _http = Killed(
        ns.cmd(args.loadgen.to_str().unwrap_or_default())
            .args([
                "serve",
                "http",
                "--listen",
                &format!("{SERVER}:8080"),
                "--resp-size",
                "1024",
            ])
            .stdout(Stdio::null())
            .spawn()?,
    );
    let _echo = Killed(
        ns.cmd(args.loadgen.to_str().unwrap_or_default())
            .args(["serve", "echo", "--listen", &format!("{SERVER}:8081")])
            .stdout(Stdio::null())
            .spawn()?,
    );
    let _iperf = Killed(
        ns.cmd("iperf3")
            .args(["-s", "-B", SERVER, "-p", "5201"])
            .stdout(Stdio::null())
            .spawn()?,
    );
    // Proxies.
    let zring = |node: &str, host: &str, extra: &[&str]| -> anyhow::Result<Killed> {
        let mut c = ns.cmd(args.zring.to_str().unwrap_or_default());
        c.args(["run", "--config"])
            .arg(&cfg)
            .args(["--node-name", node, "--ca-dir"])
            .arg(&ca)
            .args([
                "--admin-addr",
                &format!("{host}:15000"),
                "--stats-addr",
                &format!("{host}:15020"),
                "--readiness-addr",
                &format!("{host}:15021"),
            ])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("ZRING_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(match std::env::var_os("ZRING_BENCH_LOG_DIR") {
                Some(d) => Stdio::from(std::fs::File::create(
                    PathBuf::from(d).join(format!("{node}.log")),
                )?),
                None => Stdio::inherit(),
            });
        if let Some(w) = args.workers {
            c.args(["--workers", &w.to_string()]);
        }
        Ok(Killed(c.spawn()?))
    };
    let b = zring("node-b", "127.0.0.3", &[])?;
    let a = zring(
        "node-a",
        "127.0.0.2",
        &["--outbound-addr", "127.0.0.1:15001", "--bind-source"],
    )?;
    wait_ready(&ns, "127.0.0.3:15021")?;
    wait_ready(&ns, "127.0.0.2:15021")?;
    std::thread::sleep(Duration::from_millis(500));
    // `ip netns exec` execs the program: the child's pid is zring's own.
    let pids = [a.0.id(), b.0.id()];

    let mut rows = Vec::new();
    for (path, src) in [("direct", CLIENT_DIRECT), ("zring", CLIENT_MESH)] {
        let measure = |test: String, f: &dyn Fn() -> anyhow::Result<Row>| -> anyhow::Result<Row> {
            let windows: Vec<CpuWindow> = pids.iter().map(|p| CpuWindow::start(Some(*p))).collect();
            let mut row = f()?;
            row.test = test;
            if path == "zring" {
                row.proxies = windows
                    .iter()
                    .zip(pids)
                    .map(|(w, pid)| Proxy {
                        cores: w.finish().process_cores.unwrap_or(0.0),
                        rss_mib: rss_mib(pid),
                    })
                    .collect();
            }
            eprintln!("{path:>6} {:<28} rate {:>9.0}  p50 {:>7.3} ms  p90 {:>7.3} ms  p99 {:>7.3} ms  {:>6.2} Gbit/s  errors {} {}  proxies {:?}", row.test, row.rate, row.p50_ms, row.p90_ms, row.p99_ms, row.gbit_s, row.errors, row.error_kinds, row.proxies);
            Ok(row)
        };
        for conns in [1usize, 4, 16, 64] {
            rows.push(measure(format!("http 1000 rps, {conns} conns"), &|| {
                loadgen(&ns, &args, path, src, "http", "1000", conns, 8080)
            })?);
        }
        rows.push(measure("http max rps, 16 conns".into(), &|| {
            loadgen(&ns, &args, path, src, "http", "max", 16, 8080)
        })?);
        rows.push(measure("tcp-crr max, 16 conns".into(), &|| {
            loadgen(&ns, &args, path, src, "tcp-crr", "max", 16, 8081)
        })?);
        rows.push(measure("iperf3, 1 stream".into(), &|| {
            iperf(&ns, &args, path, src)
        })?);
    }
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
    write_report(&args, &rows)
}

#[allow(clippy::too_many_arguments)]
fn loadgen(
    ns: &Ns,
    args: &Args,
    path: &'static str,
    src: &str,
    mode: &str,
    rps: &str,
    conns: usize,
    port: u16,
) -> anyhow::Result<Row> {
    let json = std::env::temp_dir().join(format!(
        "zring-bench-mesh-{}-{mode}.json",
        std::process::id()
    ));
    let target = if mode == "http" {
        format!("http://{SERVER}:{port}/")
    } else {
        format!("{SERVER}:{port}")
    };
    let out = ns
        .cmd(args.loadgen.to_str().unwrap_or_default())
        .args(["run", mode, &target, "--rps", rps, "-c", &conns.to_string()])
        .args([
            "-d",
            &format!("{}s", args.duration),
            "--warmup",
            "1s",
            "--bind",
            src,
        ])
        .args([
            "--allow-errors",
            "--json",
            json.to_str().unwrap_or_default(),
        ])
        .args(if mode == "http" {
            &[][..]
        } else {
            &["--req-size", "64", "--resp-size", "64"][..]
        })
        .output()?;
    if !out.status.success() {
        bail!(
            "zring-loadgen {mode} on {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let _ = std::fs::remove_file(&json);
    let pct = |p: f64| -> f64 {
        v["DurationHistogram"]["Percentiles"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["Percentile"].as_f64() == Some(p)))
            .and_then(|x| x["Value"].as_f64())
            .map_or(0.0, |s| s * 1e3)
    };
    let errors = v["Errors"]
        .as_object()
        .map(|m| m.values().filter_map(|x| x.as_u64()).sum())
        .unwrap_or(0);
    Ok(Row {
        path,
        test: String::new(),
        rate: v["ActualQPS"].as_f64().context("ActualQPS")?,
        p50_ms: pct(50.0),
        p90_ms: pct(90.0),
        p99_ms: pct(99.0),
        gbit_s: 0.0,
        errors,
        error_kinds: v["Errors"].to_string(),
        proxies: Vec::new(),
    })
}

fn iperf(ns: &Ns, args: &Args, path: &'static str, src: &str) -> anyhow::Result<Row> {
    let out = ns
        .cmd("iperf3")
        .args(["-c", SERVER, "-B", src, "-p", "5201", "-J"])
        .args(["-t", &args.duration.to_string()])
        .output()?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    if let Some(e) = json.get("error") {
        bail!("iperf3 on {path}: {e}");
    }
    Ok(Row {
        path,
        test: String::new(),
        rate: 0.0,
        p50_ms: 0.0,
        p90_ms: 0.0,
        p99_ms: 0.0,
        gbit_s: json["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map_or(0.0, |b| b / 1e9),
        errors: 0,
        error_kinds: String::new(),
        proxies: Vec::new(),
    })
}

fn write_report(args: &Args, rows: &[Row]) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let m = machine();
    let commit = git_commit();
    let raw = serde_json::json!({"commit": commit, "machine": m, "duration_s": args.duration, "workers": args.workers, "rows": rows});
    let raw_path = args.out.join("node-proxy.json");
    std::fs::write(&raw_path, serde_json::to_string_pretty(&raw)?)?;
    let mut md = String::new();
    md.push_str("# Node proxy: client -> zring -> HBONE -> zring -> server vs direct\n\n");
    md.push_str(&format!(
        "Command: `zring-bench mesh --duration {}{}` (release build, root, inside a network namespace the bench creates; the client's outbound TCP is captured by iptables REDIRECT to zring A's 15001). Commit `{commit}`. Machine: {} CPUs, {}, kernel {}. Each run {} s after a 1 s warm-up; all figures from one run of the bench (direct and zring back to back).\n\n",
        args.duration,
        args.workers.map(|w| format!(" --workers {w}")).unwrap_or_default(),
        m["nproc"], m["cpu_model"].as_str().unwrap_or(""), m["kernel"].as_str().unwrap_or(""), args.duration
    ));
    md.push_str("| test | direct | zring | zring / direct | zring A cores, RSS | zring B cores, RSS |\n|---|---|---|---|---|---|\n");
    let direct: Vec<&Row> = rows.iter().filter(|r| r.path == "direct").collect();
    for z in rows.iter().filter(|r| r.path == "zring") {
        let Some(d) = direct.iter().find(|d| d.test == z.test) else {
            continue;
        };
        let fmt = |r: &Row| {
            if r.gbit_s > 0.0 {
                format!("{:.2} Gbit/s", r.gbit_s)
            } else if r.test.contains("1000 rps") {
                format!(
                    "p50 {:.3} / p90 {:.3} / p99 {:.3} ms ({:.0}/s{})",
                    r.p50_ms,
                    r.p90_ms,
                    r.p99_ms,
                    r.rate,
                    if r.errors > 0 {
                        format!(", {} errors", r.errors)
                    } else {
                        String::new()
                    }
                )
            } else {
                format!(
                    "{:.0}/s, p99 {:.3} ms{}",
                    r.rate,
                    r.p99_ms,
                    if r.errors > 0 {
                        format!(", {} errors", r.errors)
                    } else {
                        String::new()
                    }
                )
            }
        };
        let ratio = if z.gbit_s > 0.0 {
            format!("{:.2}x throughput", z.gbit_s / d.gbit_s.max(1e-9))
        } else if z.test.contains("1000 rps") {
            format!(
                "+{:.3} ms p50, +{:.3} ms p99",
                z.p50_ms - d.p50_ms,
                z.p99_ms - d.p99_ms
            )
        } else {
            format!("{:.2}x rate", z.rate / d.rate.max(1e-9))
        };
        let px = |i: usize| {
            z.proxies
                .get(i)
                .map(|p| format!("{:.2}, {:.1} MiB", p.cores, p.rss_mib))
                .unwrap_or_default()
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            z.test,
            fmt(d),
            fmt(z),
            ratio,
            px(0),
            px(1)
        ));
    }
    md.push_str("\nRaw numbers: `node-proxy.json` next to this file.\n");
    let md_path = args.out.join("node-proxy.md");
    std::fs::write(&md_path, md)?;
    eprintln!("wrote {} and {}", md_path.display(), raw_path.display());
    Ok(())
}
