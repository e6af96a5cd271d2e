//! `zring run`: the node proxy.
//!
//! - Config: ztunnel's local YAML (`--config` or `LOCAL_XDS_PATH`); workloads whose `node` is
//!   `--node-name` (or `NODE_NAME`) are local. The file is re-read when it changes (checked every
//!   second) or on SIGHUP; a file that does not parse is rejected, the config in force stays,
//!   and the error is logged and counted (`zring_config_reloads_total{result="failure"}`). Live
//!   connections keep going across reloads; new connections see the new config.
//! - Identities: one certificate per local workload identity from the local CA (`--ca-dir`),
//!   issued before a config that names the workload comes into force, renewed at half-life.
//! - Inbound HBONE (`inbound`): every worker listens on `<ip>:15008` for each local HBONE
//!   workload IP (listeners for workloads added by a reload are bound on the fly).
//! - Inbound plaintext (`--inbound-plaintext-addr`, 15006 in-pod): policy without identity.
//! - Outbound (`outbound`): captured connections on `--outbound-addr` (15001; original
//!   destination from SO_ORIGINAL_DST, or the local address under TPROXY) and SOCKS5
//!   (`--socks5`, 15080).
//! - Telemetry and control (`crate::admin`): metrics, readiness, admin.
//!
//! Files, by concern: `state` (settings and the snapshot the workers read), `control` (start-up
//! and the control threads: config watch, certificate renewal, ZDS pods), `worker` (one
//! worker's listeners, pool and loop), `pods` (in-pod listeners and their drain), `telemetry`
//! (one connection's metrics and access-log line), `outbound` and `inbound` (the per-connection
//! work).

mod control;
pub(crate) mod headers;
mod inbound;
mod limits;
mod outbound;
mod pods;
mod state;
pub(crate) mod telemetry;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;
mod worker;

pub use control::run;
pub use control::POD_BIND_WAIT;
pub(crate) use headers::next as random;
pub(crate) use limits::{HandshakeGate, HandshakePermit};
pub use limits::{
    Limits, DEFAULT_CONNECT_TIMEOUT, DEFAULT_DRAIN_TIMEOUT, DEFAULT_MAX_HANDSHAKES,
    DEFAULT_SOCKS5_GREETING_TIMEOUT,
};
pub(crate) use pods::wait_for_config;
pub use pods::POD_WAIT;
pub use state::{CertSource, RunConfig, State, CONFIG_CHECK, DEFAULT_PACKET_MARK};
pub(crate) use telemetry::ConnLog;
pub(crate) use worker::HbonePool;
