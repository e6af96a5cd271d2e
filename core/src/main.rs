//! The `zring` binary. See `zring --help`.

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand};
use zring_core::{logging, relay_cmd};
use zring_runtime::{
    net::ConnectOptions,
    relay::{RelayMode, RelayOptions, DEFAULT_COPY_BUFFER, DEFAULT_PIPE_SIZE},
    BackendChoice, ShutdownTrigger, WorkerConfig,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// zring: a node proxy for Istio's ambient mesh, on io_uring with one thread per core.
///
/// With no subcommand, runs a self-contained demo on loopback.
#[derive(Debug, Parser)]
#[command(name = "zring", version, about)]
struct Cli {
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text", env = "LOG_FORMAT")]
    log_format: logging::LogFormat,
    /// Log level filter (overrides RUST_LOG), e.g. `info` or `zring_core=debug`.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Forward TCP from one address to another (a debugging tool and the relay benchmark subject).
    Relay(RelayArgs),
}

#[derive(Debug, clap::Args)]
struct WorkerArgs {
    /// Worker threads, one pinned per CPU; default: the CPUs allowed by affinity and cgroup quota.
    #[arg(long)]
    workers: Option<usize>,
    /// I/O backend: auto (io_uring, else epoll), uring (fail if unavailable), or epoll.
    #[arg(long, default_value = "auto")]
    io: BackendChoice,
}

impl WorkerArgs {
    fn config(&self) -> WorkerConfig {
        WorkerConfig {
            workers: self.workers,
            io: self.io,
            ..WorkerConfig::default()
        }
    }
}

#[derive(Debug, clap::Args)]
struct RelayArgs {
    /// Address to accept connections on.
    #[arg(long)]
    listen: SocketAddr,
    /// Address to forward every connection to.
    #[arg(long)]
    to: SocketAddr,
    /// splice (zero-copy, default), copy (buffered), or splice-uring (io_uring's splice opcode,
    /// executed by kernel io-wq threads; for measurement).
    #[arg(long, default_value = "splice")]
    mode: RelayMode,
    /// Copy mode: buffer size per direction, in bytes.
    #[arg(long, default_value_t = DEFAULT_COPY_BUFFER)]
    buffer_size: usize,
    /// Splice mode: pipe size per direction, in bytes (F_SETPIPE_SZ; 64 KiB minimum).
    #[arg(long, default_value_t = DEFAULT_PIPE_SIZE)]
    pipe_size: usize,
    /// Close a connection idle (no byte either way) for this many seconds; 0 = never.
    #[arg(long, default_value_t = 0)]
    idle_timeout: u64,
    /// Upstream connect timeout in seconds.
    #[arg(long, default_value_t = relay_cmd::DEFAULT_CONNECT_TIMEOUT.as_secs())]
    connect_timeout: u64,
    /// After SIGTERM, how many seconds live connections get to finish.
    #[arg(long, default_value_t = relay_cmd::DEFAULT_DRAIN_TIMEOUT.as_secs_f64())]
    drain_timeout: f64,
    /// SO_MARK for upstream connections.
    #[arg(long)]
    packet_mark: Option<u32>,
    #[command(flatten)]
    workers: WorkerArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format, cli.log_level.as_deref());
    let trigger = ShutdownTrigger::new();
    if let Err(e) = trigger.on_signals() {
        eprintln!("zring: cannot install signal handlers: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let result = match cli.command {
        None => zring_core::demo::run(&trigger),
        Some(Command::Relay(args)) => relay_cmd::run(relay_config(args), &trigger),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("zring: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn relay_config(a: RelayArgs) -> relay_cmd::RelayConfig {
    relay_cmd::RelayConfig {
        listen: a.listen,
        to: a.to,
        relay: RelayOptions {
            mode: relay_cmd::mode_with_buffer(a.mode, a.buffer_size),
            pipe_size: a.pipe_size,
            idle_timeout: (a.idle_timeout > 0).then(|| Duration::from_secs(a.idle_timeout)),
        },
        connect: ConnectOptions {
            mark: a.packet_mark,
            timeout: (a.connect_timeout > 0).then(|| Duration::from_secs(a.connect_timeout)),
            ..ConnectOptions::default()
        },
        workers: a.workers.config(),
        drain_timeout: Duration::from_secs_f64(a.drain_timeout.max(0.0)),
    }
}
