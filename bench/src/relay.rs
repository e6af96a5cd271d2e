//! `zring-bench relay`: iperf3 throughput through direct, copy and splice relays.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::{
    sample::{self, CpuUse, CpuWindow},
    util::{git_commit, machine, median, wait_port, which, Killed},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Repetitions of each configuration (the table shows the median).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Parallel iperf3 streams to test, comma-separated.
    #[arg(long, default_value = "1,4", value_delimiter = ',')]
    streams: Vec<u32>,
    /// The zring binary (a release build).
    #[arg(long, default_value = "target/release/zring")]
    zring: PathBuf,
    /// Output folder for report.md and raw.json.
    #[arg(long, default_value = "perf-reports/relay")]
    out: PathBuf,
    /// Relay workers (default: zring's default, one per CPU).
    #[arg(long)]
    workers: Option<usize>,
}

/// One thing iperf3 goes through.
#[derive(Debug, Clone, Serialize)]
struct Subject {
    name: String,
    /// `None` for direct.
    relay_args: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
struct RunResult {
    subject: String,
    streams: u32,
    rep: usize,
    gbits: f64,
    cpu: CpuUse,
    /// Most io-wq (`iou-wrk`) threads seen in the relay process during the run.
    iowq_threads_max: usize,
}

const IPERF_PORT: u16 = 15201;
const RELAY_PORT: u16 = 15202;

fn subjects() -> Vec<Subject> {
    let relay = |name: &str, extra: &[&str]| Subject {
        name: name.to_string(),
        relay_args: Some(extra.iter().map(|s| s.to_string()).collect()),
    };
    vec![
        Subject {
            name: "direct".into(),
            relay_args: None,
        },
        relay(
            "copy-64k/io_uring",
            &["--mode", "copy", "--buffer-size", "65536", "--io", "uring"],
        ),
        relay(
            "copy-256k/io_uring",
            &["--mode", "copy", "--buffer-size", "262144", "--io", "uring"],
        ),
        relay("splice/io_uring", &["--mode", "splice", "--io", "uring"]),
        relay(
            "copy-64k/epoll",
            &["--mode", "copy", "--buffer-size", "65536", "--io", "epoll"],
        ),
        relay(
            "copy-256k/epoll",
            &["--mode", "copy", "--buffer-size", "262144", "--io", "epoll"],
        ),
        relay("splice/epoll", &["--mode", "splice", "--io", "epoll"]),
        relay(
            "splice-uring-op/io_uring",
            &["--mode", "splice-uring", "--io", "uring"],
        ),
    ]
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.zring.exists() {
        bail!(
            "{} not found: run `cargo build --release` first",
            args.zring.display()
        );
    }
    which("iperf3")?;
    let _server = Killed(
        Command::new("iperf3")
            .args(["-s", "-p", &IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start iperf3 -s")?,
    );
    wait_port(IPERF_PORT)?;
    let mut results = Vec::new();
    for subject in subjects() {
        for &streams in &args.streams {
            for rep in 0..args.reps {
                // iperf3's server takes one test at a time and resets a client that arrives while
                // it still tears down the previous one: pause, and retry once if it happens.
                std::thread::sleep(Duration::from_millis(500));
                let r = match one_run(&args, &subject, streams, rep) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("retrying once after: {e:#}");
                        std::thread::sleep(Duration::from_secs(2));
                        one_run(&args, &subject, streams, rep)?
                    }
                };
                eprintln!(
                    "{:<26} P={streams} rep {rep}: {:6.2} Gbit/s, system CPU {:4.0}%, relay {:.2} cores, io-wq max {}",
                    r.subject,
                    r.gbits,
                    r.cpu.system_busy * 100.0,
                    r.cpu.process_cores.unwrap_or(0.0),
                    r.iowq_threads_max
                );
                results.push(r);
            }
        }
    }
    std::fs::create_dir_all(&args.out)?;
    let machine = machine();
    let raw = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "commit": git_commit(),
        "machine": machine,
        "duration_s": args.duration,
        "results": results,
    });
    std::fs::write(
        args.out.join("raw.json"),
        serde_json::to_string_pretty(&raw)?,
    )?;
    let md = report(&args, &results, &machine);
    std::fs::write(args.out.join("report.md"), &md)?;
    println!("{md}");
    Ok(())
}

fn one_run(args: &Args, subject: &Subject, streams: u32, rep: usize) -> anyhow::Result<RunResult> {
    let mut relay = None;
    let port = match &subject.relay_args {
        None => IPERF_PORT,
        Some(extra) => {
            let mut cmd = Command::new(&args.zring);
            cmd.args([
                "relay",
                "--listen",
                &format!("127.0.0.1:{RELAY_PORT}"),
                "--to",
                &format!("127.0.0.1:{IPERF_PORT}"),
                "--log-level",
                "warn",
            ]);
            cmd.args(extra);
            if let Some(w) = args.workers {
                cmd.args(["--workers", &w.to_string()]);
            }
            relay = Some(Killed(
                cmd.stdout(Stdio::null())
                    .spawn()
                    .context("start zring relay")?,
            ));
            wait_port(RELAY_PORT)?;
            RELAY_PORT
        }
    };
    let pid = relay.as_ref().map(|k| k.0.id());
    let stop = Arc::new(AtomicBool::new(false));
    let iowq = Arc::new(AtomicUsize::new(0));
    let sampler = pid.map(|pid| {
        let (stop, iowq) = (stop.clone(), iowq.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                iowq.fetch_max(sample::threads_named(pid, "iou-wrk"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    });
    let window = CpuWindow::start(pid);
    let out = Command::new("iperf3")
        .args([
            "-c",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            &args.duration.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ])
        .output()
        .context("run iperf3 -c")?;
    let cpu = window.finish();
    stop.store(true, Ordering::Relaxed);
    if let Some(s) = sampler {
        let _ = s.join();
    }
    drop(relay);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    if let Some(err) = json.get("error") {
        bail!("iperf3 through {}: {err}", subject.name);
    }
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 end.sum_received")?;
    Ok(RunResult {
        subject: subject.name.clone(),
        streams,
        rep,
        gbits: bps / 1e9,
        cpu,
        iowq_threads_max: iowq.load(Ordering::Relaxed),
    })
}

fn report(args: &Args, results: &[RunResult], machine: &serde_json::Value) -> String {
    let mut md = String::new();
    md.push_str("# Relay throughput: direct vs copy vs splice (iperf3, loopback)\n\n");
    md.push_str(&format!(
        "- commit: `{}`\n- machine: {} CPUs, {}, kernel {}\n- command: `{}`\n- each cell: median of {} runs of {} s; client, server and relay share the machine's cores.\n\n",
        git_commit(),
        machine["nproc"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
        std::env::args().collect::<Vec<_>>().join(" "),
        args.reps,
        args.duration
    ));
    for &streams in &args.streams {
        md.push_str(&format!("## {streams} stream(s)\n\n"));
        md.push_str("| path | Gbit/s (median) | runs | x direct | x copy-64k same backend | system CPU | relay CPU (cores) | io-wq threads (max) |\n|---|---|---|---|---|---|---|---|\n");
        let med = |name: &str| {
            median(
                results
                    .iter()
                    .filter(|r| r.subject == name && r.streams == streams)
                    .map(|r| r.gbits)
                    .collect(),
            )
        };
        let direct = med("direct");
        for s in subjects() {
            let rs: Vec<&RunResult> = results
                .iter()
                .filter(|r| r.subject == s.name && r.streams == streams)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let g = med(&s.name);
            let backend = s.name.split('/').nth(1).unwrap_or("");
            let copy = med(&format!("copy-64k/{backend}"));
            let runs: Vec<String> = rs.iter().map(|r| format!("{:.1}", r.gbits)).collect();
            let sys = median(rs.iter().map(|r| r.cpu.system_busy * 100.0).collect());
            let relay_cpu = median(
                rs.iter()
                    .map(|r| r.cpu.process_cores.unwrap_or(0.0))
                    .collect(),
            );
            let iowq = rs.iter().map(|r| r.iowq_threads_max).max().unwrap_or(0);
            md.push_str(&format!(
                "| {} | {:.2} | {} | {:.2} | {} | {:.0}% | {} | {} |\n",
                s.name,
                g,
                runs.join(", "),
                if direct > 0.0 { g / direct } else { 0.0 },
                if s.relay_args.is_some() && copy > 0.0 {
                    format!("{:.2}", g / copy)
                } else {
                    "-".into()
                },
                sys,
                if s.relay_args.is_some() {
                    format!("{relay_cpu:.2}")
                } else {
                    "-".into()
                },
                if s.relay_args.is_some() {
                    iowq.to_string()
                } else {
                    "-".into()
                },
            ));
        }
        md.push('\n');
    }
    md
}
