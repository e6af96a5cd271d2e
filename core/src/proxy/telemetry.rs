//! One connection's telemetry: metric labels, byte counters and the access-log line.

use std::{future::Future, net::SocketAddr};

use zring_hbone::{
    relay::{copy_bidirectional_counted, ResetOnClose, TunnelCounts},
    stream::H2Stream,
};
use zring_runtime::{relay::RelayOptions, ByteCounts};

use super::State;
use crate::metrics::LIVE_BYTES_INTERVAL;

/// Which way a tunnel's socket faces: the client (outbound: bytes from the socket go towards
/// the destination) or the destination workload (inbound: bytes to the socket do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SocketSide {
    /// The socket is the source workload's connection.
    Client,
    /// The socket is the connection to the destination workload.
    Destination,
}

/// The trace id (32 hex digits) of a `traceparent` value, if well formed.
pub(crate) fn trace_id(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.split('-');
    let (_version, id) = (parts.next()?, parts.next()?);
    (id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| id.to_string())
}

/// One connection's telemetry: its metric labels and access-log fields. Counted as opened
/// when the upstream side is established ([`ConnLog::established`]); closed exactly once, which
/// writes the access-log line and adds the bytes. A connection refused before it was
/// established is counted opened and closed with its response flags (as ztunnel reports a
/// denied connection).
///
/// Boxed: a connection's log is passed down through the set-up steps into the relay, and each
/// async step that takes it by value keeps a slot for it in its state; inline (720 bytes) those
/// slots made up a good part of every idle connection's task.
pub(crate) struct ConnLog(Box<ConnLogFields>);

/// The fields of a [`ConnLog`].
pub(crate) struct ConnLogFields {
    pub direction: &'static str,
    pub path: &'static str,
    pub src: SocketAddr,
    pub src_identity: Option<zring_hbone::SpiffeId>,
    pub dst: SocketAddr,
    pub dst_hbone: Option<SocketAddr>,
    pub dst_identity: Option<zring_hbone::SpiffeId>,
    pub labels: crate::metrics::ConnLabels,
    pub start: std::time::Instant,
    /// The W3C trace id the connection's CONNECT carried (both ends log the same one).
    pub trace_id: Option<String>,
    /// The metric series it counts in, from when it opened.
    series: Option<std::sync::Arc<crate::metrics::Series>>,
    /// Bytes (towards the destination, back) already added to the metrics while live.
    reported: (u64, u64),
}

impl std::ops::Deref for ConnLog {
    type Target = ConnLogFields;
    fn deref(&self) -> &ConnLogFields {
        &self.0
    }
}

impl std::ops::DerefMut for ConnLog {
    fn deref_mut(&mut self) -> &mut ConnLogFields {
        &mut self.0
    }
}

impl ConnLog {
    /// A connection from `src` to `dst`, labelled `labels`.
    pub fn new(
        direction: &'static str,
        path: &'static str,
        src: SocketAddr,
        dst: SocketAddr,
        labels: crate::metrics::ConnLabels,
        start: std::time::Instant,
    ) -> Self {
        ConnLog(Box::new(ConnLogFields {
            direction,
            path,
            src,
            src_identity: None,
            dst,
            dst_hbone: None,
            dst_identity: None,
            labels,
            start,
            trace_id: None,
            series: None,
            reported: (0, 0),
        }))
    }

    /// Add the bytes moved since the last report; `sent` and `received` are the totals so far.
    fn report(&mut self, sent: u64, received: u64) {
        let (s, r) = self.reported;
        if let Some(series) = &self.series {
            series.bytes(sent.saturating_sub(s), received.saturating_sub(r));
            self.reported = (sent.max(s), received.max(r));
        }
    }

    /// Run `relay`, adding its bytes (`counts()`: towards the destination, back) to the metrics
    /// every [`LIVE_BYTES_INTERVAL`] while it runs.
    ///
    /// The relay comes pinned by the caller: taken by value and pinned here, it would occupy two
    /// slots of this future's state, which lives (allocated) as long as the connection.
    async fn reporting<F: Future>(
        &mut self,
        counts: impl Fn() -> (u64, u64),
        mut relay: std::pin::Pin<&mut F>,
    ) -> F::Output {
        loop {
            monoio::select! {
                out = &mut relay => return out,
                _ = monoio::time::sleep(LIVE_BYTES_INTERVAL) => {
                    let (sent, received) = counts();
                    self.report(sent, received);
                }
            }
        }
    }

    /// Splice `client` <-> `upstream` (plain TCP both sides) until both directions end, then
    /// close the log. Established: counted as opened first.
    pub async fn splice_and_close(
        mut self,
        state: &State,
        client: monoio::net::TcpStream,
        upstream: monoio::net::TcpStream,
    ) {
        self.established(state);
        let counts = ByteCounts::default();
        let get = || {
            (
                counts.client_to_upstream.get(),
                counts.upstream_to_client.get(),
            )
        };
        let opts = RelayOptions::default();
        let relay = std::pin::pin!(zring_runtime::relay_counted(
            client, upstream, &opts, &counts
        ));
        let out = self.reporting(get, relay).await;
        self.close(
            state,
            "-",
            out.client_to_upstream,
            out.upstream_to_client,
            out.error.map(|e| e.to_string()),
        );
    }

    /// Copy between `socket` and the HBONE `stream` until both directions end, then close the
    /// log; `side` says which way is towards the destination.
    pub async fn tunnel_and_close<S>(
        mut self,
        state: &State,
        socket: S,
        stream: H2Stream,
        side: SocketSide,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + ResetOnClose + Unpin,
    {
        self.established(state);
        let counts = TunnelCounts::default();
        let orient = |from_socket: u64, to_socket: u64| match side {
            SocketSide::Client => (from_socket, to_socket),
            SocketSide::Destination => (to_socket, from_socket),
        };
        let get = || orient(counts.socket_to_stream.get(), counts.stream_to_socket.get());
        let relay = std::pin::pin!(copy_bidirectional_counted(socket, stream, &counts));
        let out = self.reporting(get, relay).await;
        let (sent, received) = orient(out.socket_to_stream, out.stream_to_socket);
        self.close(state, "-", sent, received, out.error.map(|e| e.to_string()));
    }

    /// The upstream side is established: count the connection as opened.
    pub fn established(&mut self, state: &State) {
        if self.series.is_none() {
            self.series = Some(state.metrics.opened(&self.labels));
        }
    }

    /// Close with `flags` (`-` for a normal close), bytes towards the destination and back.
    pub fn close(
        mut self,
        state: &State,
        flags: &'static str,
        sent: u64,
        received: u64,
        error: Option<String>,
    ) {
        // The series the live bytes went to keeps them: flags of an established connection
        // stay as they were when it opened.
        let series = match self.series.take() {
            Some(series) => series,
            None => {
                self.labels.response_flags = flags;
                state.metrics.opened(&self.labels)
            }
        };
        let (s, r) = self.reported;
        series.closed(sent.saturating_sub(s), received.saturating_sub(r));
        let service = self
            .labels
            .service
            .as_ref()
            .map(|s| s.0.as_str())
            .unwrap_or("");
        let id = |i: &Option<zring_hbone::SpiffeId>| {
            i.as_ref().map(|i| i.to_string()).unwrap_or_default()
        };
        tracing::info!(
            target: "access",
            direction = self.direction,
            path = self.path,
            src.addr = %self.src,
            src.identity = %id(&self.src_identity),
            dst.addr = %self.dst,
            dst.hbone = %self.dst_hbone.map(|a| a.to_string()).unwrap_or_default(),
            dst.identity = %id(&self.dst_identity),
            dst.service = service,
            bytes_sent = sent,
            bytes_recv = received,
            duration_ms = (self.start.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            response_flags = flags,
            error = error.as_deref().unwrap_or(""),
            trace_id = self.trace_id.as_deref().unwrap_or(""),
            "connection complete"
        );
    }
}
