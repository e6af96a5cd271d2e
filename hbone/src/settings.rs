//! HTTP/2 settings of HBONE connections.

use std::{fmt, sync::Arc, time::Duration};

/// Stream flow-control window: 4 MiB, ztunnel's default. h2's 64 KiB default caps a single
/// stream at a window per round trip and gives about a third of the throughput.
pub const DEFAULT_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Connection flow-control window: 16 MiB (ztunnel), room for four full streams.
pub const DEFAULT_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame: 1 MiB (ztunnel), fewer frames and syscalls per MiB.
pub const DEFAULT_MAX_FRAME: u32 = 1024 * 1024;
/// Concurrent streams per connection: 100, ztunnel's pool default.
pub const DEFAULT_MAX_STREAMS: u32 = 100;
/// Largest request header block the server accepts: 16 KiB is generous for CONNECT with
/// `Forwarded`, `baggage` and `traceparent`.
pub const DEFAULT_MAX_HEADER_LIST: u32 = 16 * 1024;
/// Idle pooled connections are closed after 5 minutes (ztunnel).
pub const DEFAULT_POOL_IDLE: Duration = Duration::from_secs(300);
/// A key's spare idle connections, beyond the one kept warm for [`DEFAULT_POOL_IDLE`], are
/// closed after 10 s without a stream. A burst of 10,000 tunnels to one destination opens 100
/// connections (100 streams each); each holds its TLS and HTTP/2 state at the burst's peak
/// (stream tables, buffers: about 200 KB), and keeping 99 of them warm for 5 minutes kept
/// 20 MB per proxy after the burst ended.
pub const DEFAULT_POOL_SPARE_IDLE: Duration = Duration::from_secs(10);

/// TLS handshake limit, both sides of 15008: 10 s. A peer that opens TCP and never finishes
/// TLS holds a socket and a task; ztunnel has no explicit limit on its server side (its
/// outbound connect, TCP only, is bounded by 10 s), so this matches its client side and beats
/// its server side.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 preface and SETTINGS exchange after TLS: 10 s.
pub const DEFAULT_H2_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client waits for the answer to a CONNECT: 15 s, longer than the destination's
/// own 10 s connect timeout towards the workload, so a slow workload is reported by the
/// destination (503) rather than cut here.
pub const DEFAULT_CONNECT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
/// A server connection that has finished its handshakes but never opened a stream is closed
/// after 60 s. A pooled client always opens a stream at once (it dials because it needs one),
/// so only idle or hostile peers hit this.
pub const DEFAULT_IDLE_NO_STREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// HTTP/2 PING every 10 s on an idle-or-busy connection, ztunnel's interval.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(10);
/// A PING unanswered for 20 s declares the peer gone (ztunnel's value): the connection is
/// dropped, its streams fail, and the pool dials afresh for the next stream.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Which limit fired; reported through [`TimeoutHook`] so the embedding proxy can count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TimeoutKind {
    /// TLS handshake (either side).
    TlsHandshake,
    /// HTTP/2 preface/SETTINGS.
    H2Handshake,
    /// A CONNECT's response.
    ConnectResponse,
    /// A server connection that never opened a stream.
    IdleNoStream,
    /// An unanswered HTTP/2 PING.
    Keepalive,
    /// A SOCKS5 greeting or request (the proxy's own listener).
    Socks5Greeting,
}

impl TimeoutKind {
    /// Label value for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TlsHandshake => "tls_handshake",
            Self::H2Handshake => "h2_handshake",
            Self::ConnectResponse => "connect_response",
            Self::IdleNoStream => "idle_no_stream",
            Self::Keepalive => "keepalive",
            Self::Socks5Greeting => "socks5_greeting",
        }
    }

    /// Every kind, for rendering counters that start at zero.
    pub const ALL: [TimeoutKind; 6] = [
        Self::TlsHandshake,
        Self::H2Handshake,
        Self::ConnectResponse,
        Self::IdleNoStream,
        Self::Keepalive,
        Self::Socks5Greeting,
    ];
}

/// Called whenever a limit fires (counting it is the caller's business).
#[derive(Clone)]
pub struct TimeoutHook(pub Arc<dyn Fn(TimeoutKind) + Send + Sync>);

impl fmt::Debug for TimeoutHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TimeoutHook")
    }
}

/// Handshake, response and liveness limits of HBONE connections.
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// TLS handshake, either side.
    pub tls_handshake: Duration,
    /// HTTP/2 preface and SETTINGS.
    pub h2_handshake: Duration,
    /// Waiting for a CONNECT's response.
    pub connect_response: Duration,
    /// A server connection without any stream yet.
    pub idle_no_stream: Duration,
    /// HTTP/2 PING interval (`Duration::ZERO` turns keepalive off).
    pub ping_interval: Duration,
    /// An unanswered PING after this long closes the connection.
    pub ping_timeout: Duration,
    /// Told about every limit that fires.
    pub hook: Option<TimeoutHook>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tls_handshake: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            h2_handshake: DEFAULT_H2_HANDSHAKE_TIMEOUT,
            connect_response: DEFAULT_CONNECT_RESPONSE_TIMEOUT,
            idle_no_stream: DEFAULT_IDLE_NO_STREAM_TIMEOUT,
            ping_interval: DEFAULT_PING_INTERVAL,
            ping_timeout: DEFAULT_PING_TIMEOUT,
            hook: None,
        }
    }
}

impl Timeouts {
    /// Report that `kind` fired.
    pub fn fired(&self, kind: TimeoutKind) {
        if let Some(h) = &self.hook {
            (h.0)(kind);
        }
    }
}

/// Tunables shared by HBONE clients and servers.
#[derive(Debug, Clone)]
pub struct H2Settings {
    /// Per-stream receive window, bytes.
    pub stream_window: u32,
    /// Per-connection receive window, bytes.
    pub connection_window: u32,
    /// Largest frame we accept, bytes.
    pub max_frame: u32,
    /// Concurrent streams allowed per connection (server) / used per connection (pool).
    pub max_streams: u32,
    /// Largest header block accepted, bytes.
    pub max_header_list: u32,
    /// How long a draining server waits for live streams after GOAWAY.
    pub drain_timeout: Duration,
    /// Handshake, response and keepalive limits.
    pub timeouts: Timeouts,
}

impl Default for H2Settings {
    fn default() -> Self {
        Self {
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONNECTION_WINDOW,
            max_frame: DEFAULT_MAX_FRAME,
            max_streams: DEFAULT_MAX_STREAMS,
            max_header_list: DEFAULT_MAX_HEADER_LIST,
            drain_timeout: Duration::from_secs(5),
            timeouts: Timeouts::default(),
        }
    }
}
