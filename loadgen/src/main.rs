//! The `zring-loadgen` binary. See `zring-loadgen --help`.

use std::{
    io::{IsTerminal, Write},
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::atomic::Ordering,
    time::Duration,
};

use clap::{Parser, Subcommand};
use zring_loadgen::{
    client::{self, Mode, RunConfig},
    config::{HumanDuration, Rate, Target},
    report, serve,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An open-loop load generator with coordinated-omission-corrected latency.
#[derive(Debug, Parser)]
#[command(name = "zring-loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate load against a target.
    Run(Box<RunArgs>),
    /// Serve a target: http, echo or sink.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// http, tcp-rr, tcp-crr or tcp-stream.
    #[arg(value_enum)]
    mode: Mode,
    /// `host:port`, or `http://host:port/path` in http mode.
    target: Target,
    /// Requests per second in total (open loop), or `max` (closed loop).
    #[arg(long, default_value = "1000")]
    rps: Rate,
    /// Concurrent connections.
    #[arg(short = 'c', long, default_value_t = 16)]
    connections: usize,
    /// Measured duration (a hard bound), like 5s or 2m.
    #[arg(short = 'd', long, default_value = "10s")]
    duration: HumanDuration,
    /// Load before measuring, discarded.
    #[arg(long, default_value = "0s")]
    warmup: HumanDuration,
    /// Runtime threads generating load (default: one per CPU).
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Request size in bytes (tcp-rr/tcp-crr payload; HTTP POST body when > 0; tcp-stream write size).
    #[arg(long, default_value_t = 0)]
    req_size: usize,
    /// Response size in bytes asked of the server (HTTP adds ?size=N).
    #[arg(long, default_value_t = 0)]
    resp_size: usize,
    /// Poisson arrivals instead of evenly spaced requests (open loop).
    #[arg(long)]
    jitter: bool,
    /// Per-request timeout.
    #[arg(long, default_value = "5s")]
    timeout: HumanDuration,
    /// Go through a SOCKS5 proxy (zring's port 15080).
    #[arg(long)]
    socks5: Option<SocketAddr>,
    /// Source IP of every connection (like curl --interface): a mesh workload's address, so
    /// that capture rules and the proxy see the connection as that workload's.
    #[arg(long)]
    bind: Option<std::net::IpAddr>,
    /// Write fortio-compatible JSON results here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Free-form labels stored in the JSON.
    #[arg(long, default_value = "")]
    labels: String,
    /// Exit 0 even if some requests failed.
    #[arg(long)]
    allow_errors: bool,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// http, echo or sink.
    #[arg(value_enum)]
    kind: serve::Kind,
    /// Address to listen on (port 0 picks one; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// HTTP: response body size when the request has no ?size=.
    #[arg(long, default_value_t = 0)]
    resp_size: usize,
    /// HTTP: wait this long before each response, like 50ms.
    #[arg(long, default_value = "0s")]
    delay: HumanDuration,
    /// Runtime threads (default: one per CPU).
    #[arg(short = 't', long)]
    threads: Option<usize>,
}

fn runtime(threads: Option<usize>) -> std::io::Result<(tokio::runtime::Runtime, usize)> {
    let n = threads
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(n)
        .enable_all()
        .build()?;
    Ok((rt, n))
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(a) => run(*a),
        Command::Serve(a) => {
            let cfg = serve::ServeConfig {
                kind: a.kind,
                resp_size: a.resp_size,
                delay: a.delay.0,
            };
            let result =
                runtime(a.threads).and_then(|(rt, _)| rt.block_on(serve::run(a.listen, cfg)));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("zring-loadgen serve: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(a: RunArgs) -> ExitCode {
    if a.connections == 0 {
        eprintln!("zring-loadgen: --connections must be at least 1");
        return ExitCode::FAILURE;
    }
    if matches!(a.mode, Mode::TcpRr | Mode::TcpCrr) && a.req_size == 0 {
        eprintln!(
            "zring-loadgen: {:?} needs --req-size > 0 (bytes sent and echoed per request)",
            a.mode
        );
        return ExitCode::FAILURE;
    }
    let cfg = RunConfig {
        mode: a.mode,
        target: a.target,
        rate: a.rps,
        connections: a.connections,
        duration: a.duration.0,
        warmup: a.warmup.0,
        req_size: a.req_size,
        resp_size: a.resp_size,
        jitter: a.jitter,
        timeout: a.timeout.0,
        socks5: a.socks5,
        bind: a.bind,
    };
    let (rt, threads) = match runtime(a.threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("zring-loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tty = std::io::stderr().is_terminal();
    let progress: Option<client::Progress> = tty.then(|| {
        Box::new(|elapsed: Duration, live: &zring_loadgen::stats::Live| {
            let p99 = live.interval.lock().ok().and_then(|mut g| {
                g.as_mut().map(|h| {
                    let v = (!h.is_empty()).then(|| h.value_at_quantile(0.99));
                    h.reset();
                    v
                })
            });
            let line = report::progress_line(
                elapsed,
                live.completed.load(Ordering::Relaxed),
                live.error_total(),
                p99.flatten(),
            );
            let _ = std::io::stderr().write_all(line.as_bytes());
        }) as client::Progress
    });
    let out = rt.block_on(client::run(cfg.clone(), progress));
    if tty {
        eprintln!();
    }
    print!("{}", report::summary(&cfg, &out));
    if let Some(path) = &a.json {
        let v = report::fortio_json(&cfg, &out, &a.labels, threads);
        let text = serde_json::to_string_pretty(&v).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("zring-loadgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    rt.shutdown_timeout(Duration::from_millis(100));
    let errors = out.live.error_total();
    if errors > 0 && !a.allow_errors {
        eprintln!("zring-loadgen: {errors} requests failed (use --allow-errors to exit 0 anyway)");
        return ExitCode::from(2);
    }
    if out.merged.hist.is_empty() && errors == 0 && cfg.mode != Mode::TcpStream {
        eprintln!("zring-loadgen: no request completed");
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}
