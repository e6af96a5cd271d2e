//! The per-worker HBONE connection pool.
//!
//! Key: (source identity, destination identity, source IP, destination address). Each pooled
//! HTTP/2 connection carries at most `max_streams` CONNECT streams; past that a new connection is
//! dialed. Only one dial per key is in flight at a time: everyone else who needs that key waits
//! for it and then takes a slot (no connection storms). Every dial ends for its waiters: it
//! succeeds, fails (each phase is bounded: the dialer's TCP and TLS limits, then
//! `timeouts.h2_handshake`), or is cancelled (the dialing task dropped, e.g. at a pod's drain
//! deadline); on failure and cancellation the waiters get the error and the next connection
//! dials afresh. A connection that errors or receives
//! GOAWAY is retired and new streams dial afresh; one idle (no stream) for `idle_timeout` is
//! closed.
//!
//! The pool is `!Send` by design: each worker owns one, so no lock is shared across cores.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{
    client::{self, ConnectError, ConnectHeaders},
    identity::SpiffeId,
    keepalive,
    settings::H2Settings,
    settings::TimeoutKind,
    stream::H2Stream,
    Executor,
};

/// What a pooled connection is shared by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Identity the client presents.
    pub src_id: SpiffeId,
    /// Identity the server must prove.
    pub dst_id: SpiffeId,
    /// Source address the connection is made from.
    pub src_ip: IpAddr,
    /// The HBONE endpoint (`<ip>:15008`).
    pub dst: SocketAddr,
}

/// Makes new TLS connections for the pool.
pub trait Dialer: 'static {
    /// The established, TLS-wrapped connection.
    type Io: AsyncRead + AsyncWrite + Unpin + 'static;
    /// Dial `key.dst` presenting `key.src_id` and expecting `key.dst_id`.
    fn dial(&self, key: &PoolKey) -> Pin<Box<dyn Future<Output = io::Result<Self::Io>>>>;
}

/// Why the pool could not produce a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// Dialing the destination (TCP or TLS) failed.
    #[error("dialing {dst} failed: {message}")]
    Dial {
        /// The HBONE endpoint.
        dst: SocketAddr,
        /// What failed.
        message: String,
    },
    /// The CONNECT itself failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// HTTP/2 settings of new connections; `max_streams` also caps streams per connection.
    pub h2: H2Settings,
    /// Close a key's last idle connection after this long without a stream.
    pub idle_timeout: Duration,
    /// Close a key's other idle connections (all but the oldest) after this long
    /// without a stream: a burst's extra connections do not hold their memory for
    /// `idle_timeout`.
    pub spare_idle_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            h2: H2Settings::default(),
            idle_timeout: crate::settings::DEFAULT_POOL_IDLE,
            spare_idle_timeout: crate::settings::DEFAULT_POOL_SPARE_IDLE,
        }
    }
}

#[derive(Debug)]
struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    active: Cell<u32>,
    closed: Rc<Cell<bool>>,
    retired: Cell<bool>,
    last_used: Cell<Instant>,
}

impl Conn {
    fn usable(&self) -> bool {
        !self.retired.get() && !self.closed.get()
    }
}

#[derive(Debug, Default)]
struct Entry {
    conns: Vec<Rc<Conn>>,
    dialing: Option<Rc<DialWait>>,
}

#[derive(Debug, Default)]
struct DialWait {
    done: Cell<bool>,
    failed: RefCell<Option<String>>,
    wakers: RefCell<Vec<Waker>>,
}

impl DialWait {
    fn finish(&self, failed: Option<String>) {
        *self.failed.borrow_mut() = failed;
        self.done.set(true);
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

/// The dialing task's side of a [`DialWait`]: [`DialGuard::finish`] publishes the outcome; a
/// guard dropped without it (the task was cancelled) releases the waiters with an error and
/// frees the key for a fresh dial.
struct DialGuard<'a> {
    entries: &'a RefCell<HashMap<PoolKey, Entry>>,
    key: &'a PoolKey,
    wait: Rc<DialWait>,
    done: bool,
}

impl DialGuard<'_> {
    fn finish(mut self, result: Result<Rc<Conn>, String>) -> Result<(), String> {
        self.done = true;
        let failed = result.as_ref().err().cloned();
        {
            let mut entries = self.entries.borrow_mut();
            let entry = entries.entry(self.key.clone()).or_default();
            entry.dialing = None;
            if let Ok(conn) = result {
                entry.conns.push(conn);
            }
        }
        self.wait.finish(failed.clone());
        failed.map_or(Ok(()), Err)
    }
}

impl Drop for DialGuard<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Ok(mut entries) = self.entries.try_borrow_mut() {
            if let Some(e) = entries.get_mut(self.key) {
                if e.dialing
                    .as_ref()
                    .is_some_and(|w| Rc::ptr_eq(w, &self.wait))
                {
                    e.dialing = None;
                }
            }
        }
        self.wait.finish(Some(
            "the connection dialing this destination was cancelled".into(),
        ));
    }
}

struct WaitDial(Rc<DialWait>);

impl Future for WaitDial {
    type Output = Option<String>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.0.done.get() {
            return Poll::Ready(self.0.failed.borrow().clone());
        }
        self.0.wakers.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}

/// Counters for tests and metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct PoolStats {
    /// Dials started.
    pub dials: u64,
    /// Connections currently pooled (usable or draining).
    pub connections: usize,
}

/// One worker's pool.
pub struct Pool<D: Dialer, X: Executor> {
    inner: Rc<Inner<D, X>>,
}

impl<D: Dialer, X: Executor> Clone for Pool<D, X> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<D: Dialer, X: Executor> std::fmt::Debug for Pool<D, X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct Inner<D, X> {
    dialer: D,
    executor: X,
    settings: PoolSettings,
    entries: RefCell<HashMap<PoolKey, Entry>>,
    dials: Cell<u64>,
    next_id: Cell<u64>,
}

/// A CONNECT stream that holds its connection's slot until dropped.
#[derive(Debug)]
pub struct PooledStream {
    /// The tunnel.
    pub stream: H2Stream,
    /// Which pooled connection carries it (for logs and tests).
    pub connection_id: u64,
    slot: StreamSlot,
}

impl PooledStream {
    /// Take the tunnel out; the slot must be kept alive as long as the tunnel is in use.
    pub fn into_parts(self) -> (H2Stream, StreamSlot) {
        (self.stream, self.slot)
    }
}

/// Holds one stream's place on its pooled connection; dropping it frees the place.
#[derive(Debug)]
pub struct StreamSlot(Rc<Conn>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get().saturating_sub(1));
        self.0.last_used.set(Instant::now());
    }
}

impl<D: Dialer, X: Executor> Pool<D, X> {
    /// A new, empty pool.
    pub fn new(dialer: D, executor: X, settings: PoolSettings) -> Self {
        let inner = Rc::new(Inner {
            dialer,
            executor,
            settings,
            entries: RefCell::new(HashMap::new()),
            dials: Cell::new(0),
            next_id: Cell::new(0),
        });
        Self { inner }
    }

    /// Dials started so far and connections held.
    pub fn stats(&self) -> PoolStats {
        let entries = self.inner.entries.borrow();
        PoolStats {
            dials: self.inner.dials.get(),
            connections: entries.values().map(|e| e.conns.len()).sum(),
        }
    }

    /// Open a CONNECT stream to `target` over a pooled connection for `key`.
    pub async fn connect(
        &self,
        key: &PoolKey,
        target: SocketAddr,
        headers: &ConnectHeaders,
    ) -> Result<PooledStream, PoolError> {
        let max = self.inner.settings.h2.max_streams.max(1);
        loop {
            self.sweep(key);
            // 1. A live connection with a free slot.
            let found = {
                let entries = self.inner.entries.borrow();
                entries.get(key).and_then(|e| {
                    e.conns
                        .iter()
                        .find(|c| c.usable() && c.active.get() < max)
                        .cloned()
                })
            };
            if let Some(conn) = found {
                conn.active.set(conn.active.get() + 1);
                conn.last_used.set(Instant::now());
                let slot = StreamSlot(conn.clone());
                let limit = self.inner.settings.h2.timeouts.connect_response;
                let opened = keepalive::within(
                    &self.inner.executor,
                    limit,
                    client::open(&conn.send, target, headers),
                )
                .await
                .unwrap_or_else(|| {
                    self.inner
                        .settings
                        .h2
                        .timeouts
                        .fired(TimeoutKind::ConnectResponse);
                    Err(ConnectError::Timeout(limit))
                });
                match opened {
                    Ok(stream) => {
                        return Ok(PooledStream {
                            stream,
                            connection_id: conn.id,
                            slot,
                        })
                    }
                    Err(e) if e.is_connection_level() => {
                        tracing::debug!(connection = conn.id, error = %e, "retiring HBONE connection");
                        conn.retired.set(true);
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            // 2. Someone is dialing this key: wait for it, then look again.
            let waiting = self
                .inner
                .entries
                .borrow()
                .get(key)
                .and_then(|e| e.dialing.clone())
                .filter(|w| !w.done.get());
            if let Some(w) = waiting {
                if let Some(message) = WaitDial(w).await {
                    return Err(PoolError::Dial {
                        dst: key.dst,
                        message,
                    });
                }
                continue;
            }
            // 3. Dial ourselves. The guard releases the waiters even if this task is dropped
            // mid-dial.
            let wait = Rc::new(DialWait::default());
            self.inner
                .entries
                .borrow_mut()
                .entry(key.clone())
                .or_default()
                .dialing = Some(wait.clone());
            self.inner.dials.set(self.inner.dials.get() + 1);
            let guard = DialGuard {
                entries: &self.inner.entries,
                key,
                wait,
                done: false,
            };
            let result = self.dial(key).await;
            if let Err(message) = guard.finish(result) {
                return Err(PoolError::Dial {
                    dst: key.dst,
                    message,
                });
            }
        }
    }

    async fn dial(&self, key: &PoolKey) -> Result<Rc<Conn>, String> {
        let io = self
            .inner
            .dialer
            .dial(key)
            .await
            .map_err(|e| e.to_string())?;
        let (send, closed) = client::handshake(io, &self.inner.settings.h2, &self.inner.executor)
            .await
            .map_err(|e| e.to_string())?;
        let id = self.inner.next_id.get();
        self.inner.next_id.set(id + 1);
        tracing::debug!(connection = id, dst = %key.dst, src = %key.src_id, peer = %key.dst_id, "new HBONE connection");
        Ok(Rc::new(Conn {
            id,
            send,
            active: Cell::new(0),
            closed,
            retired: Cell::new(false),
            last_used: Cell::new(Instant::now()),
        }))
    }

    /// Drop retired/closed connections without streams, and idle ones past their timeout: the
    /// oldest idle connection after `idle_timeout`, the others (spares a burst left) after
    /// `spare_idle_timeout`. The oldest is the one new streams try first, and the one made
    /// before a burst: a connection dialed during a burst has its TLS and HTTP/2 state spread
    /// over allocator pages the burst filled, and keeping it would keep those pages resident
    /// after the burst's connections closed (`perf-reports/2026-11-29-burst-pages/`).
    fn sweep(&self, key: &PoolKey) {
        let (idle, spare_idle) = (
            self.inner.settings.idle_timeout,
            self.inner.settings.spare_idle_timeout,
        );
        let mut entries = self.inner.entries.borrow_mut();
        if let Some(e) = entries.get_mut(key) {
            let warm = e
                .conns
                .iter()
                .filter(|c| c.active.get() == 0 && c.usable())
                .min_by_key(|c| c.id)
                .map(|c| c.id);
            e.conns.retain(|c| {
                if c.active.get() > 0 {
                    return true;
                }
                let limit = if Some(c.id) == warm { idle } else { spare_idle };
                c.usable() && c.last_used.get().elapsed() < limit
            });
        }
    }

    /// Drop every pooled connection (shutdown). Each connection's task ends once its live
    /// streams have ended, closing the connection with GOAWAY.
    pub fn close(&self) {
        self.inner.entries.borrow_mut().clear();
    }

    /// Sweep every key (call periodically so idle connections close even without traffic).
    pub fn sweep_all(&self) {
        let keys: Vec<PoolKey> = self.inner.entries.borrow().keys().cloned().collect();
        for k in keys {
            self.sweep(&k);
        }
        self.inner
            .entries
            .borrow_mut()
            .retain(|_, e| !e.conns.is_empty() || e.dialing.is_some());
    }
}

impl AsyncRead for PooledStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PooledStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
