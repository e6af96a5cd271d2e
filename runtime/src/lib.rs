//! zring's thread-per-core runtime glue.
//!
//! Everything on zring's data path runs here: one pinned worker thread per allowed CPU, each with
//! its own monoio runtime (io_uring, or epoll where io_uring cannot be set up), its own
//! `SO_REUSEPORT` listeners, and the relays that move bytes between two TCP sockets.
//!
//! This is the only crate of the workspace allowed to use `unsafe`; every block carries a
//! `// SAFETY:` comment.
//!
//! Layout:
//! - [`backend`]: choosing io_uring or epoll (`--io auto|uring|epoll`) and building runtimes.
//! - [`worker`]: starting, pinning and joining the workers.
//! - [`drain`]: the shutdown signal (SIGTERM) and per-worker connection draining.
//! - [`net`]: socket setup (reuseport listeners, marks, transparent sockets, original
//!   destination, network namespaces, marked/namespaced connects).
//! - [`relay`]: the bidirectional TCP relay, zero-copy `splice(2)` or buffered copy.
//! - [`server`]: the accept loop and tracked connection tasks.
//! - [`sys`]: process-level helpers (file limits, thread affinity, io-wq thread counts, a seccomp
//!   filter that denies io_uring for fallback tests).

pub mod backend;
pub mod drain;
pub mod net;
pub mod relay;
pub mod server;
pub mod sys;
pub mod uds;
pub mod worker;

pub use backend::{BackendChoice, IoBackend};
pub use drain::{Drain, ShutdownTrigger};
pub use relay::{
    relay, relay_counted, ByteCounts, RelayError, RelayMode, RelayOptions, RelayOutcome,
};
pub use worker::{Pinning, WorkerConfig, WorkerContext, Workers};

/// The monoio runtime type every worker runs: io_uring or epoll, both with timers.
pub type Runtime = monoio::FusionRuntime<
    monoio::time::TimeDriver<monoio::IoUringDriver>,
    monoio::time::TimeDriver<monoio::LegacyDriver>,
>;
