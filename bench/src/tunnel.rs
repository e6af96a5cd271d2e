//! `zring-bench tunnel`: iperf3 through one HBONE hop (plain TCP -> `zring tunnel client` ->
//! mTLS + HTTP/2 CONNECT -> `zring tunnel server` -> plain TCP) vs direct, on both io backends.
//!
//! Placement matters on a 2-core machine: with one worker per core in each proxy, the kernel's
//! `SO_REUSEPORT` hash decides whether a single stream's two proxy workers share a core.
//! `default` leaves that to the hash (what a user gets); `split` pins the server proxy to CPU 0
//! and the client proxy to CPU 1 (`taskset`), the placement a node proxy has in a real
//! two-node mesh where each node runs its own zring.
//!
//! `--profile` also records both proxies with `perf record -e cpu-clock` during one extra run and
//! renders flamegraphs with inferno.

use std::{
    io::BufReader,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::{
    sample::{process_ticks, CpuWindow, USER_HZ},
    util::{git_commit, machine, median, which, Killed},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Repetitions (median reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Parallel streams to test.
    #[arg(long, default_value = "1,4", value_delimiter = ',')]
    streams: Vec<u32>,
    /// The zring binary.
    #[arg(long, default_value = "target/release/zring")]
    zring: PathBuf,
    /// Output folder.
    #[arg(long, default_value = "perf-reports/hbone")]
    out: PathBuf,
    /// Also record flamegraphs of both proxies (needs `perf`).
    #[arg(long)]
    profile: bool,
}

const IPERF_PORT: u16 = 15301;
const CLIENT_PORT: u16 = 15302;
const SERVER_PORT: u16 = 15303;
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

#[derive(Debug, Clone, Serialize)]
struct Run {
    subject: String,
    streams: u32,
    rep: usize,
    gbits: f64,
    system_busy: f64,
    client_cores: Option<f64>,
    server_cores: Option<f64>,
}

#[derive(Debug, Clone)]
struct Subject {
    name: String,
    io: Option<&'static str>,
    split: bool,
}

fn subjects() -> Vec<Subject> {
    let mut v = vec![Subject {
        name: "direct".into(),
        io: None,
        split: false,
    }];
    for io in ["epoll", "uring"] {
        for split in [false, true] {
            v.push(Subject {
                name: format!("hbone/{io}/{}", if split { "split" } else { "default" }),
                io: Some(io),
                split,
            });
        }
    }
    v
}

struct Proxies {
    server: Killed,
    client: Killed,
}

fn start_proxies(args: &Args, ca: &Path, io: &str, split: bool) -> anyhow::Result<Proxies> {
    let spawn = |cpu: &str, rest: Vec<String>| -> anyhow::Result<Killed> {
        let mut cmd = if split {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu]).arg(&args.zring);
            c
        } else {
            Command::new(&args.zring)
        };
        cmd.args(rest)
            .args(["--io", io, "--log-level", "warn"])
            .stdout(Stdio::null());
        Ok(Killed(cmd.spawn().context("start zring tunnel")?))
    };
    let ca = ca.display().to_string();
    let s = |x: &str| x.to_string();
    let server = spawn(
        "0",
        vec![
            s("tunnel"),
            s("server"),
            s("--listen"),
            format!("127.0.0.1:{SERVER_PORT}"),
            s("--ca-dir"),
            ca.clone(),
            s("--identity"),
            s(SERVER_ID),
        ],
    )?;
    wait_listening(SERVER_PORT)?;
    let client = spawn(
        "1",
        vec![
            s("tunnel"),
            s("client"),
            s("--listen"),
            format!("127.0.0.1:{CLIENT_PORT}"),
            s("--ca-dir"),
            ca,
            s("--identity"),
            s(CLIENT_ID),
            s("--server"),
            format!("127.0.0.1:{SERVER_PORT}"),
            s("--target"),
            format!("127.0.0.1:{IPERF_PORT}"),
            s("--expect"),
            s(SERVER_ID),
        ],
    )?;
    wait_listening(CLIENT_PORT)?;
    Ok(Proxies { server, client })
}

fn iperf(port: u16, secs: u64, streams: u32) -> anyhow::Result<f64> {
    let out = Command::new("iperf3")
        .args([
            "-c",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ])
        .output()
        .context("run iperf3")?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    if let Some(e) = json.get("error") {
        bail!("iperf3: {e}");
    }
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 result")
}

pub fn run(args: Args) -> anyhow::Result<()> {
    which("iperf3")?;
    which("taskset")?;
    let ca = std::env::temp_dir().join(format!("zring-bench-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&ca);
    let st = Command::new(&args.zring)
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("zring ca init failed");
    }
    let mut runs = Vec::new();
    for subject in subjects() {
        for &streams in &args.streams {
            for rep in 0..args.reps {
                std::thread::sleep(Duration::from_millis(500));
                let r = one(&args, &ca, &subject, streams, rep).or_else(|e| {
                    eprintln!("retrying once after: {e:#}");
                    std::thread::sleep(Duration::from_secs(2));
                    one(&args, &ca, &subject, streams, rep)
                })?;
                eprintln!(
                    "{:<22} P={streams} rep {rep}: {:6.2} Gbit/s, system {:3.0}%, client {:.2} cores, server {:.2} cores",
                    r.subject,
                    r.gbits,
                    r.system_busy * 100.0,
                    r.client_cores.unwrap_or(0.0),
                    r.server_cores.unwrap_or(0.0)
                );
                runs.push(r);
            }
        }
    }
    std::fs::create_dir_all(&args.out)?;
    let mut flames = Vec::new();
    if args.profile {
        for io in ["epoll", "uring"] {
            flames.extend(profile(&args, &ca, io)?);
        }
    }
    let machine = machine();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    std::fs::write(
        args.out.join("raw.json"),
        serde_json::to_string_pretty(
            &serde_json::json!({"command": command, "commit": git_commit(), "machine": machine, "runs": runs}),
        )?,
    )?;
    let mut md = format!(
        "# HBONE tunnel throughput (iperf3 through zring tunnel client -> server) vs direct\n\n- commit: `{}`\n- machine: {} CPUs, {}, kernel {}\n- command: `{command}`\n- each cell: median of {} runs of {} s. `default`: each proxy runs one worker per CPU and the kernel's reuseport hash places the stream; `split`: server proxy on CPU 0, client proxy on CPU 1 (taskset).\n\n",
        git_commit(),
        machine["nproc"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
        args.reps,
        args.duration
    );
    for &streams in &args.streams {
        md.push_str(&format!("## {streams} stream(s)\n\n| path | Gbit/s (median) | runs | x direct | system CPU | client proxy cores | server proxy cores |\n|---|---|---|---|---|---|---|\n"));
        let direct = median(
            runs.iter()
                .filter(|r| r.subject == "direct" && r.streams == streams)
                .map(|r| r.gbits)
                .collect(),
        );
        for s in subjects() {
            let rs: Vec<&Run> = runs
                .iter()
                .filter(|r| r.subject == s.name && r.streams == streams)
                .collect();
            let g = median(rs.iter().map(|r| r.gbits).collect());
            let list: Vec<String> = rs.iter().map(|r| format!("{:.1}", r.gbits)).collect();
            let cores = |f: fn(&Run) -> Option<f64>| {
                if s.io.is_none() {
                    "-".to_string()
                } else {
                    format!("{:.2}", median(rs.iter().filter_map(|r| f(r)).collect()))
                }
            };
            md.push_str(&format!(
                "| {} | {g:.2} | {} | {:.3} | {:.0}% | {} | {} |\n",
                s.name,
                list.join(", "),
                if direct > 0.0 { g / direct } else { 0.0 },
                median(rs.iter().map(|r| r.system_busy * 100.0).collect()),
                cores(|r| r.client_cores),
                cores(|r| r.server_cores),
            ));
        }
        md.push('\n');
    }
    if !flames.is_empty() {
        md.push_str("## Flamegraphs (1 stream, split placement)\n\n");
        for f in &flames {
            md.push_str(&format!("- [{f}]({f})\n"));
        }
        md.push('\n');
    }
    std::fs::write(args.out.join("report.md"), &md)?;
    println!("{md}");
    let _ = std::fs::remove_dir_all(&ca);
    Ok(())
}

/// A fresh one-test iperf3 server (`-1`): a server left half-torn-down by the previous run (its
/// proxies are killed) would reset the next client.
fn iperf_server() -> anyhow::Result<Killed> {
    let k = Killed(
        Command::new("iperf3")
            .args(["-s", "-1", "-p", &IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start iperf3 -s")?,
    );
    wait_listening(IPERF_PORT)?;
    Ok(k)
}

/// Whether something listens on `port` (IPv4 or IPv6), read from /proc without connecting:
/// a probe connection would count as a test for `iperf3 -s -1` and for the tunnel's target.
fn listening(port: u16) -> bool {
    let hex = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f)
            .map(|t| {
                t.lines().any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.len() > 3 && cols[1].ends_with(&hex) && cols[3] == "0A"
                })
            })
            .unwrap_or(false)
    })
}

fn wait_listening(port: u16) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !listening(port) {
        if std::time::Instant::now() > deadline {
            bail!("nothing listens on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn one(args: &Args, ca: &Path, s: &Subject, streams: u32, rep: usize) -> anyhow::Result<Run> {
    let _server = iperf_server()?;
    let proxies = match s.io {
        Some(io) => Some(start_proxies(args, ca, io, s.split)?),
        None => None,
    };
    let port = if proxies.is_some() {
        CLIENT_PORT
    } else {
        IPERF_PORT
    };
    let pids = proxies.as_ref().map(|p| (p.client.0.id(), p.server.0.id()));
    let t0 = pids.map(|(c, sv)| (process_ticks(c), process_ticks(sv)));
    let window = CpuWindow::start(None);
    let gbits = iperf(port, args.duration, streams)?;
    let cpu = window.finish();
    let secs = args.duration as f64;
    let (client_cores, server_cores) = match (pids, t0) {
        (Some((c, sv)), Some((c0, s0))) => (
            Some(process_ticks(c).saturating_sub(c0) as f64 / USER_HZ / secs),
            Some(process_ticks(sv).saturating_sub(s0) as f64 / USER_HZ / secs),
        ),
        _ => (None, None),
    };
    drop(proxies);
    Ok(Run {
        subject: s.name.clone(),
        streams,
        rep,
        gbits,
        system_busy: cpu.system_busy,
        client_cores,
        server_cores,
    })
}

/// Record both proxies during a 1-stream run and render flamegraphs; returns the SVG file names.
fn profile(args: &Args, ca: &Path, io: &str) -> anyhow::Result<Vec<String>> {
    which("perf")?;
    let _server = iperf_server()?;
    let proxies = start_proxies(args, ca, io, true)?;
    let mut names = Vec::new();
    let mut recs = Vec::new();
    for (role, pid) in [
        ("client", proxies.client.0.id()),
        ("server", proxies.server.0.id()),
    ] {
        let data = args.out.join(format!("perf-{io}-{role}.data"));
        let rec = Command::new("perf")
            .args([
                "record",
                "-e",
                "cpu-clock",
                "-F",
                "999",
                "--call-graph",
                "dwarf,16384",
                "-o",
            ])
            .arg(&data)
            .args(["-p", &pid.to_string(), "--", "sleep", "4"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("perf record")?;
        recs.push((role, data, rec));
    }
    let gbits = iperf(CLIENT_PORT, 6, 1)?;
    eprintln!("profiled run ({io}): {gbits:.2} Gbit/s");
    for (role, data, mut rec) in recs {
        rec.wait()?;
        let svg = format!("flamegraph-{io}-{role}.svg");
        render(
            &data,
            &args.out.join(&svg),
            &format!("zring tunnel {role} ({io}), iperf3 1 stream, {gbits:.1} Gbit/s"),
        )?;
        let _ = std::fs::remove_file(&data);
        names.push(svg);
    }
    drop(proxies);
    Ok(names)
}

/// `perf script` -> inferno collapse -> inferno flamegraph SVG.
pub(crate) fn render(data: &Path, svg: &Path, title: &str) -> anyhow::Result<()> {
    use inferno::collapse::Collapse;
    let script = Command::new("perf")
        .args(["script", "-i"])
        .arg(data)
        .stderr(Stdio::null())
        .output()
        .context("perf script")?;
    let mut folded = Vec::new();
    inferno::collapse::perf::Folder::default()
        .collapse(BufReader::new(&script.stdout[..]), &mut folded)?;
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = title.to_string();
    let out = std::fs::File::create(svg)?;
    inferno::flamegraph::from_reader(&mut opts, BufReader::new(&folded[..]), out)?;
    Ok(())
}
