//! The zring node proxy.
//!
//! - `proxy`: `zring run`, the node proxy (config and reload, outbound, inbound, telemetry);
//!   `config` (ztunnel's local YAML, policy), `identity` (certificates), `authz` (every allow/deny decision),
//!   `metrics` and `admin` (Prometheus, readiness, admin endpoints).
//! - `demo`: `zring` with no arguments, a two-node mesh on loopback.
//! - `cmd`: the tool subcommands: `zring relay` (TCP forwarder on the runtime; the relay
//!   benchmark subject), `zring tunnel` (one HBONE hop), `zring ca` (a local CA), `zring
//!   node-agent` (the node agent's side of ZDS).

#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod cmd;
pub mod config;
pub mod demo;
pub mod dns;
pub mod hbone_io;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod socks5;
pub mod waypoint;
pub mod xds;
pub mod zds;
