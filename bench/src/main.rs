//! `zring-bench`: measurements that compare zring against baselines in the same run.
//!
//! `zring-bench run` is the latency harness (see `harness`): no-mesh vs ambient vs sidecar paths
//! on network namespaces, Istio's scenarios, reports with charts and flamegraphs.
//!
//! `zring-bench xds-scale` measures a node fed over xDS with up to 10,000 workloads: time to
//! ready, RSS per resource, and the time to apply one change (see `xds_scale`).
//!
//! `zring-bench relay` measures bulk TCP throughput on loopback with iperf3 through nothing
//! (direct), through `zring relay` in copy mode (64 KiB and 256 KiB buffers) and in splice mode,
//! on io_uring and epoll, plus io_uring's own splice opcode for the io-wq thread count. It
//! reports Gbit/s, system-wide CPU (from /proc/stat) and the relay's own CPU (from
//! /proc/PID/stat), and writes raw JSON and a markdown table.

#![forbid(unsafe_code)]

mod capacity;
mod harness;
mod iowq;
mod mesh;
mod relay;
mod sample;
mod tunnel;
mod util;
mod xds_scale;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "zring-bench", about = "zring benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// iperf3 through direct, copy and splice relays, both io backends.
    Relay(relay::Args),
    /// io-wq kernel threads per splice engine with idle connections.
    Iowq(iowq::Args),
    /// zring-loadgen's own capacity next to wrk.
    Loadgen(capacity::Args),
    /// iperf3 through one HBONE hop (zring tunnel client -> server) vs direct.
    Tunnel(tunnel::Args),
    /// The node-proxy path (captured client -> zring -> HBONE -> zring -> server) vs direct:
    /// latency at fixed rates, max rps, connection rate, iperf3, CPU and RSS. Needs root.
    Mesh(mesh::Args),
    /// One node fed by `zring control-plane` with 0 / 1,000 / 10,000 workloads: time to ready,
    /// RSS per resource, time to apply one changed workload.
    XdsScale(xds_scale::Args),
    /// The latency harness: no-mesh vs ambient (zring) vs sidecar (HAProxy) [vs ztunnel, waypoint]
    /// on network namespaces; writes perf-reports/<date>-<commit>/report.md. Needs root.
    Run(harness::RunArgs),
    /// Flamegraphs of the ambient path's proxies during one scenario, added to a report.
    Profile(harness::ProfileArgs),
    /// Re-render a report folder's report.md (and the perf-reports index) from its results.json.
    Report(harness::ReportArgs),
}

fn main() -> anyhow::Result<()> {
    // zring's runtime turns huge pages off at start-up, and children inherit that: the processes
    // this tool starts and compares (ztunnel, HAProxy, Envoy, iperf3) get the system's default.
    // zring sets its own flag again when it starts.
    if let Err(e) = zring_runtime::sys::restore_transparent_huge_pages() {
        eprintln!("zring-bench: could not restore the huge-page policy for child processes: {e}");
    }
    match Cli::parse().command {
        Command::Relay(args) => relay::run(args),
        Command::Iowq(args) => iowq::run(args),
        Command::Loadgen(args) => capacity::run(args),
        Command::Tunnel(args) => tunnel::run(args),
        Command::Mesh(args) => mesh::run(args),
        Command::XdsScale(args) => xds_scale::run(args),
        Command::Run(args) => harness::run(args),
        Command::Profile(args) => harness::profile(args),
        Command::Report(args) => harness::report_cmd(args),
    }
}
