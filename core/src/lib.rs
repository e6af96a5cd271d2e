//! The zring node proxy.
//!
//! - `proxy`: `zring run`, the node proxy (config and reload, outbound, inbound, telemetry);
//!   `config` (ztunnel's local YAML, policy), `identity` (certificates), `inbound` (decisions),
//!   `metrics` and `admin` (Prometheus, readiness, admin endpoints).
//! - `demo`: `zring` with no arguments, a two-node mesh on loopback.
//! - Tools: `zring relay` (TCP forwarder on the runtime; the relay benchmark subject),
//!   `zring tunnel` (one HBONE hop), `zring ca` (a local CA).

#![forbid(unsafe_code)]

pub mod admin;
pub mod ca_cmd;
pub mod config;
pub mod demo;
pub mod hbone_io;
pub mod identity;
pub mod inbound;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod relay_cmd;
pub mod socks5;
pub mod tunnel_cmd;
pub mod zds;
