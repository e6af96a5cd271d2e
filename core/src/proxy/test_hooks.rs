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
