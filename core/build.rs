//! Compiles the in-repo protobuf files (Istio's workload, authorization and certificate APIs,
//! the subset of Envoy's discovery API ztunnel speaks, and Envoy's external authorization API
//! the waypoint calls) with protox (no protoc needed) and
//! tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/xds.proto",
        "proto/workload.proto",
        "proto/authorization.proto",
        "proto/citadel.proto",
        "proto/ext_authz.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto/"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    link_layout()?;
    Ok(())
}

/// How the `zring` binary is linked, for memory: both cut the pages it makes resident.
/// - `hot-text.ld` groups the functions the node proxy and the waypoint run at the front of the
///   code (scripts/hot-text.py says why; scripts/hot-text regenerates it), so the rest of the
///   code is never mapped. With the next item, a harness node's fresh RSS went from 13.9 to
///   10.5 MiB (perf-reports/2026-11-29-hot-text-memory).
/// - `-z pack-relative-relocs` (DT_RELR, glibc >= 2.36, the deploy image's Debian 12) stores
///   the position-independent binary's ~25,000 relative relocations in a few KiB instead of
///   ~600 KiB that the loader reads at every start.
fn link_layout() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var("CARGO_CFG_TARGET_OS")? != "linux" {
        return Ok(());
    }
    let dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let script = dir.join("hot-text.ld");
    println!("cargo:rerun-if-changed=hot-text.ld");
    if script.exists() {
        // Linked from OUT_DIR, not from the checkout: two checkouts sharing one target
        // directory (scripts/fresh-clone-demo builds a temporary clone into this one's) share
        // this script's cached output, and a path into a clone that is gone broke the next link.
        let linked = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("hot-text.ld");
        std::fs::copy(&script, &linked)?;
        println!("cargo:rustc-link-arg-bin=zring=-Wl,-T,{}", linked.display());
    }
    if std::env::var("CARGO_CFG_TARGET_ENV")? == "gnu" {
        println!("cargo:rustc-link-arg-bin=zring=-Wl,-z,pack-relative-relocs");
    }
    Ok(())
}
