//! One connection's telemetry: metric labels, byte counters and the access-log line.

use std::{
    cell::{Cell, RefCell},
    future::Future,
    net::SocketAddr,
    pin::Pin,
    rc::{Rc, Weak},
    sync::Arc,
};

use zring_hbone::{
    relay::{copy_bidirectional_counted, ResetOnClose, TunnelCounts},
    stream::H2Stream,
};
use zring_runtime::{relay::RelayOptions, ByteCounts};

use super::State;
use crate::metrics::Series;

/// A connection's relay, once its set-up is done: awaited on its own, so the set-up's futures
/// (config wait, dial, TLS, SOCKS5) are freed before the connection settles in for its life.
pub(crate) type Relay = Pin<Box<dyn Future<Output = ()>>>;

/// Byte totals of a live relay: (towards the destination, back).
trait Totals {
    fn totals(&self) -> (u64, u64);
}

impl Totals for (TunnelCounts, SocketSide) {
    fn totals(&self) -> (u64, u64) {
        let (c, side) = self;
        side.orient(c.socket_to_stream.get(), c.stream_to_socket.get())
    }
}

impl Totals for ByteCounts {
    fn totals(&self) -> (u64, u64) {
        (self.client_to_upstream.get(), self.upstream_to_client.get())
    }
}

/// A live connection's counts, as the relay updates them and the worker's periodic report
/// reads them: no timer per connection (a monoio sleep is 640 bytes).
struct Live<C> {
    counts: C,
    series: Arc<Series>,
    /// Totals already added to the series.
    reported: Cell<(u64, u64)>,
}

trait Report {
    fn report(&self);
}

impl<C: Totals> Report for Live<C> {
    fn report(&self) {
        let (sent, received) = self.counts.totals();
        let (s, r) = self.reported.get();
        self.series
            .bytes(sent.saturating_sub(s), received.saturating_sub(r));
        self.reported.set((sent.max(s), received.max(r)));
    }
}

thread_local! {
    /// This worker's live relays.
    static LIVE: RefCell<Vec<Weak<dyn Report>>> = const { RefCell::new(Vec::new()) };
}

/// Add the bytes each of this worker's live connections moved since the last report to its
/// series (the worker calls it every [`crate::metrics::LIVE_BYTES_INTERVAL`]), and forget the
/// ones that ended.
pub(crate) fn report_live() {
    LIVE.with(|l| {
        let mut l = l.borrow_mut();
        l.retain(|w| match w.upgrade() {
            Some(c) => {
                c.report();
                true
            }
            None => false,
        });
        if l.len() < l.capacity() / 4 {
            let keep = l.len() * 2;
            l.shrink_to(keep);
        }
    });
}

fn register<C: Totals + 'static>(counts: C, series: Arc<Series>) -> Rc<Live<C>> {
    let live = Rc::new(Live {
        counts,
        series,
        reported: Cell::new((0, 0)),
    });
    let dynamic: Rc<dyn Report> = live.clone();
    LIVE.with(|l| l.borrow_mut().push(Rc::downgrade(&dynamic)));
    live
}

/// A live tunnel's byte counts, as its copy future holds them (it owns a reference).
struct LiveTunnel(Rc<Live<(TunnelCounts, SocketSide)>>);

impl std::ops::Deref for LiveTunnel {
    type Target = TunnelCounts;
    fn deref(&self) -> &TunnelCounts {
        &self.0.counts.0
    }
}

/// Which way a tunnel's socket faces: the client (outbound: bytes from the socket go towards
/// the destination) or the destination workload (inbound: bytes to the socket do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SocketSide {
    /// The socket is the source workload's connection.
    Client,
    /// The socket is the connection to the destination workload.
    Destination,
}

impl SocketSide {
    /// Bytes (from the socket, to the socket) as (towards the destination, back).
    fn orient(self, from_socket: u64, to_socket: u64) -> (u64, u64) {
        match self {
            SocketSide::Client => (from_socket, to_socket),
            SocketSide::Destination => (to_socket, from_socket),
        }
    }
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

    /// Splice `client` <-> `upstream` (plain TCP both sides) until both directions end, then
    /// close the log. Established: counted as opened first.
    pub async fn splice_and_close(
        mut self,
        state: Arc<State>,
        client: monoio::net::TcpStream,
        upstream: monoio::net::TcpStream,
    ) {
        let live = register(ByteCounts::default(), self.established(&state));
        let opts = RelayOptions::default();
        let out = zring_runtime::relay_counted(client, upstream, &opts, &live.counts).await;
        self.reported = live.reported.get();
        self.close(
            &state,
            "-",
            out.client_to_upstream,
            out.upstream_to_client,
            out.error.map(|e| e.to_string()),
        );
    }

    /// Copy between `socket` and the HBONE `stream` until both directions end, then close the
    /// log; `side` says which way is towards the destination. `hold` (a pooled stream's slot)
    /// is kept until then.
    ///
    /// What an idle tunnel keeps is sized here: the copy is boxed on its own and the block
    /// that closes the log after it holds a pointer to it. (As an `async fn` taking the socket
    /// and the stream, this kept room for both next to the copy that owns them, and an awaited
    /// future is moved into the awaiting one: 1,072 bytes in one allocation, against 592 + 56
    /// in two now.)
    pub fn tunnel_and_close<S, H>(
        mut self,
        state: Arc<State>,
        socket: S,
        stream: H2Stream,
        side: SocketSide,
        hold: H,
    ) -> Relay
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + ResetOnClose + Unpin + 'static,
        H: 'static,
    {
        let live = register((TunnelCounts::default(), side), self.established(&state));
        let copy = Box::pin(copy_bidirectional_counted(
            socket,
            stream,
            LiveTunnel(live.clone()),
        ));
        Box::pin(async move {
            let out = copy.await;
            self.reported = live.reported.get();
            let (sent, received) = side.orient(out.socket_to_stream, out.stream_to_socket);
            self.close(
                &state,
                "-",
                sent,
                received,
                out.error.map(|e| e.to_string()),
            );
            drop(hold);
        })
    }

    /// The upstream side is established: count the connection as opened (once); its series.
    pub fn established(&mut self, state: &State) -> Arc<Series> {
        let f = &mut *self.0;
        f.series
            .get_or_insert_with(|| state.metrics.opened(&f.labels))
            .clone()
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
