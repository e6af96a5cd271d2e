//! `zring-bench loadgen`: how much load zring-loadgen generates against its own server, next to
//! wrk in the same run (max rps at 16 and 64 connections; connections per second in tcp-crr).

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context};

use crate::util::{git_commit, machine, Killed};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Load-generator threads (wrk -t and zring-loadgen -t); the server gets one.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The zring-loadgen binary.
    #[arg(long, default_value = "target/release/zring-loadgen")]
    loadgen: PathBuf,
    /// Output folder.
    #[arg(long, default_value = "perf-reports/loadgen")]
    out: PathBuf,
}

fn serve(loadgen: &PathBuf, kind: &str) -> anyhow::Result<(Killed, String)> {
    let mut child = Command::new(loadgen)
        .args(["serve", kind, "--listen", "127.0.0.1:0", "--threads", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .context("start zring-loadgen serve")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .context("address line")?
        .to_string();
    Ok((Killed(child), addr))
}

fn wrk(url: &str, conns: usize, args: &Args) -> anyhow::Result<f64> {
    let out = Command::new("wrk")
        .args([
            &format!("-t{}", args.threads),
            &format!("-c{conns}"),
            &format!("-d{}s", args.duration),
            url,
        ])
        .output()
        .context("run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|x| x.trim().parse().ok())
        .with_context(|| format!("wrk output: {text}"))
}

fn ours(
    mode: &str,
    target: &str,
    conns: usize,
    extra: &[&str],
    args: &Args,
) -> anyhow::Result<f64> {
    let json =
        std::env::temp_dir().join(format!("zring-bench-loadgen-{}.json", std::process::id()));
    let status = Command::new(&args.loadgen)
        .args([
            "run",
            mode,
            target,
            "--rps",
            "max",
            "-c",
            &conns.to_string(),
            "-d",
            &format!("{}s", args.duration),
        ])
        .args([
            "-t",
            &args.threads.to_string(),
            "--json",
            json.to_str().unwrap_or_default(),
        ])
        .args(extra)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("zring-loadgen {mode} failed");
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let _ = std::fs::remove_file(&json);
    v["ActualQPS"].as_f64().context("ActualQPS")
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (_http, http_addr) = serve(&args.loadgen, "http")?;
    let url = format!("http://{http_addr}/");
    let mut rows = Vec::new();
    for conns in [16, 64] {
        let w = wrk(&url, conns, &args)?;
        let o = ours("http", &url, conns, &[], &args)?;
        eprintln!("http max rps, {conns} connections: wrk {w:.0}, zring-loadgen {o:.0}");
        rows.push(serde_json::json!({"test": format!("HTTP/1.1 max rps, {conns} connections"), "wrk": w, "zring_loadgen": o}));
    }
    let (_echo, echo_addr) = serve(&args.loadgen, "echo")?;
    let crr = ours("tcp-crr", &echo_addr, 16, &["--req-size", "64"], &args)?;
    eprintln!("tcp-crr connections per second, 16 concurrent: {crr:.0}");
    rows.push(serde_json::json!({"test": "tcp-crr connections/s, 16 concurrent, 64 B", "wrk": null, "zring_loadgen": crr}));
    let machine = machine();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("raw.json"),
        serde_json::to_string_pretty(
            &serde_json::json!({"command": command, "commit": git_commit(), "machine": machine, "rows": rows}),
        )?,
    )?;
    let mut md = format!(
        "# zring-loadgen capacity vs wrk\n\n- commit: `{}`\n- machine: {} CPUs, {}, kernel {}\n- command: `{command}`\n- server: `zring-loadgen serve` with 1 thread; generators with {} thread(s); all on one 2-core machine, so the generator and the server compete for the same cores.\n\n| test | wrk | zring-loadgen | ratio |\n|---|---|---|---|\n",
        git_commit(),
        machine["nproc"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
        args.threads
    );
    for r in &rows {
        let o = r["zring_loadgen"].as_f64().unwrap_or(0.0);
        match r["wrk"].as_f64() {
            Some(w) => md.push_str(&format!(
                "| {} | {w:.0} | {o:.0} | {:.2} |\n",
                r["test"].as_str().unwrap_or(""),
                o / w
            )),
            None => md.push_str(&format!(
                "| {} | - | {o:.0} | - |\n",
                r["test"].as_str().unwrap_or("")
            )),
        }
    }
    std::fs::write(args.out.join("report.md"), &md)?;
    println!("{md}");
    Ok(())
}
