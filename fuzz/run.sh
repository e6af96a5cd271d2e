#!/usr/bin/env bash
# Run every fuzz target for a bounded time (default 60 s each): ./fuzz/run.sh [SECONDS]
# Installs cargo-fuzz from crates.io if missing. cargo fuzz needs nightly features; on a stable
# toolchain RUSTC_BOOTSTRAP=1 enables them (the sanitizer is turned off with -s none).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
for t in connect_request spiffe_id mesh_yaml zds_message socks5 path_normalize l7_resources control_plane_tokens; do
  echo "== fuzzing $t for ${secs}s"
  RUSTC_BOOTSTRAP=1 cargo fuzz run -s none "$t" -- -max_total_time="$secs" -rss_limit_mb=2048
done
