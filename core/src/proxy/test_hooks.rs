//! Hooks compiled in only with the `test-hooks` feature (the README's test command turns it
//! on), for behaviour that no input can cause: a connection task that panics.

use std::net::SocketAddr;

/// A connection to this port panics inside its task (port 1, tcpmux, is never a mesh port).
pub const PANIC_PORT: u16 = 1;

/// Panic when `target` is the test port, as a bug in connection handling would.
pub(super) fn maybe_panic(target: SocketAddr) {
    if target.port() == PANIC_PORT {
        panic!("test hook: deliberate panic in the connection to {target}");
    }
}

/// With `ZRING_TEST_WORKER_PANIC=<worker index>` set, that worker panics in its own loop
/// (outside any connection task) after `ticks` ticks, as a bug in the worker itself would.
pub(super) fn maybe_panic_worker(index: usize, ticks: u64) {
    if ticks == 5
        && std::env::var("ZRING_TEST_WORKER_PANIC")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            == Some(index)
    {
        panic!("test hook: deliberate panic in worker {index}");
    }
}
