//! Limits that keep one peer from costing others: handshake, response and keepalive time
//! limits (flags of `zring run`, defaults next to ztunnel's in the README), and the cap on
//! connections that have not finished their handshake.
//!
//! The cap is per listener and per worker: each worker counts its own unfinished handshakes
//! ([`HandshakeGate`], no atomics, no sharing); past [`Limits::max_handshakes`] a new
//! connection is accepted and closed at once and counted in
//! `zring_handshake_limit_rejected_total{listener}`. With the handshake time limit this bounds
//! what a flood of silent or half-open connections can hold: at most `max_handshakes` sockets
//! and tasks per listener and worker, each for at most the handshake limit.

use std::{cell::Cell, rc::Rc, sync::Arc, time::Duration};

use zring_hbone::settings::Timeouts;
use zring_runtime::net::{TcpKeepalive, DEFAULT_TCP_KEEPALIVE};

use crate::metrics::Metrics;

/// How long live connections may run after SIGTERM before they are closed. ztunnel's default
/// drain period is 5 s; relays of long transfers may want more (`--drain-timeout`).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the upstream's SYN-ACK. Short enough that a dead upstream fails the
/// client promptly instead of after the kernel's two minutes of SYN retries.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A SOCKS5 client must finish its greeting and request within 10 s (ztunnel has no limit).
pub const DEFAULT_SOCKS5_GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// Unfinished handshakes per listener and worker: 4096. High enough that a node's normal
/// connection bursts never reach it, low enough to bound a flood (4096 x ~16 KiB = 64 MiB per
/// worker at worst, for at most the handshake time limit). ztunnel has no such cap.
pub const DEFAULT_MAX_HANDSHAKES: usize = 4096;

/// The proxy's limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// HBONE handshake, response and keepalive limits (both sides of 15008).
    pub timeouts: Timeouts,
    /// SOCKS5 greeting and request, from accept.
    pub socks5_greeting: Duration,
    /// Unfinished handshakes per listener and worker.
    pub max_handshakes: usize,
    /// TCP keepalive on HBONE connections (None: off).
    pub tcp_keepalive: Option<TcpKeepalive>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeouts: Timeouts::default(),
            socks5_greeting: DEFAULT_SOCKS5_GREETING_TIMEOUT,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            tcp_keepalive: Some(DEFAULT_TCP_KEEPALIVE),
        }
    }
}

/// One listener's count of unfinished handshakes on one worker.
#[derive(Debug, Clone)]
pub(crate) struct HandshakeGate {
    listener: &'static str,
    in_flight: Rc<Cell<usize>>,
    max: usize,
    metrics: Arc<Metrics>,
}

/// Holds one place in a [`HandshakeGate`] until the handshake is done (dropped).
#[derive(Debug)]
pub(crate) struct HandshakePermit(Rc<Cell<usize>>);

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

impl HandshakeGate {
    pub(crate) fn new(listener: &'static str, max: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            listener,
            in_flight: Rc::new(Cell::new(0)),
            max,
            metrics,
        }
    }

    /// A place for a new connection's handshake, or None (counted) when the listener is full:
    /// the caller closes the connection at once.
    pub(crate) fn enter(&self) -> Option<HandshakePermit> {
        let n = self.in_flight.get();
        if n >= self.max {
            self.metrics.handshake_rejected(self.listener);
            tracing::debug!(
                listener = self.listener,
                in_flight = n,
                "too many unfinished handshakes; connection closed at once"
            );
            return None;
        }
        self.in_flight.set(n + 1);
        Some(HandshakePermit(self.in_flight.clone()))
    }
}
