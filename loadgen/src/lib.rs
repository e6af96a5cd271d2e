//! zring-loadgen: a load generator whose latency numbers can be trusted.
//!
//! - **Open loop** (`--rps N`): every connection has a schedule of intended send times (rate
//!   `N / connections`, staggered across connections, optionally Poisson-jittered). Latency is
//!   measured from a request's *intended* send time, not from when it was actually sent, so a
//!   stall that delays later requests shows up in their latency instead of being hidden
//!   (coordinated omission, as wrk2 corrects it). Send times are kept with a `timerfd` per
//!   connection (microseconds), not tokio's millisecond timer (see [`pace`]).
//! - **Closed loop** (`--rps max`): each connection sends its next request as soon as the previous
//!   answer arrives; latency is from the actual send.
//!
//! Modes: `http` (HTTP/1.1 keep-alive), `tcp-rr` (request/response over a persistent
//! connection, every echoed byte checked), `tcp-crr` (a fresh connection per request), and
//! `tcp-stream` (bulk throughput). `serve http|echo|sink` provides targets. Results print as a
//! summary and, with `--json`, as fortio-compatible JSON.
//!
//! It uses tokio, not zring's runtime, so a bug in zring's I/O cannot hide in a measurement.

#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod http;
pub mod pace;
pub mod report;
pub mod serve;
pub mod socks5;
pub mod stats;
