//! HTTP/2 settings of HBONE connections.

use std::time::Duration;

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
        }
    }
}
