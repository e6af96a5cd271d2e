//! The zring node proxy.
//!
//! For now this crate holds the `zring relay` command (a TCP port forwarder on zring's runtime,
//! kept as a debugging tool and as the relay benchmark subject), logging set-up, and the `zring`
//! binary's entry points. The mesh proxy (config, policy, HBONE inbound/outbound) lands here next.

#![forbid(unsafe_code)]

pub mod ca_cmd;
pub mod config;
pub mod demo;
pub mod hbone_io;
pub mod identity;
pub mod inbound;
pub mod logging;
pub mod relay_cmd;
pub mod run_cmd;
pub mod socks5;
pub mod tunnel_cmd;
