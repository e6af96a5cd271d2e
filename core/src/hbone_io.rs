//! Glue between zring's monoio workers and the runtime-agnostic HBONE crate: an executor, the
//! socket type HBONE relays over, and a pool dialer.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use monoio::io::IntoPollIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use zring_hbone::{
    pool::PoolKey,
    relay::ResetOnClose,
    settings::{TimeoutKind, Timeouts},
    tls, Executor, LocalFuture,
};
use zring_runtime::net::{self, ConnectOptions};

/// Spawns and sleeps on the current monoio worker.
#[derive(Debug, Clone, Copy, Default)]
pub struct MonoioExecutor;

thread_local! {
    /// Tasks spawned through [`MonoioExecutor`] on this worker that have not finished.
    static LIVE_TASKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl MonoioExecutor {
    /// Tasks (HTTP/2 connections, streams) spawned on this worker that are still running. A
    /// worker waits for them to end before it stops: a task dropped with its runtime may wake
    /// a waker from a context that no longer exists.
    pub fn live_tasks() -> usize {
        LIVE_TASKS.with(|n| n.get())
    }
}

impl Executor for MonoioExecutor {
    fn spawn(&self, fut: LocalFuture) {
        LIVE_TASKS.with(|n| n.set(n.get() + 1));
        monoio::spawn(async move {
            fut.await;
            LIVE_TASKS.with(|n| n.set(n.get().saturating_sub(1)));
        });
    }
    fn sleep(&self, d: Duration) -> LocalFuture {
        Box::pin(monoio::time::sleep(d))
    }
}

/// A worker's TCP socket in readiness (poll) mode, usable by tokio-rustls and h2, that can be
/// reset on close.
#[derive(Debug)]
pub struct PollTcp(monoio::net::tcp::stream_poll::TcpStreamPoll);

impl PollTcp {
    /// Convert a completion-mode monoio stream.
    pub fn new(stream: monoio::net::TcpStream) -> io::Result<Self> {
        Ok(Self(stream.into_poll_io()?))
    }
}

impl ResetOnClose for PollTcp {
    fn reset_on_close(&self) {
        let _ = net::set_reset_on_close(&self.0);
    }
}

impl AsyncRead for PollTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PollTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Picks the client TLS config (certificate to present, identities to expect) for a pool key.
pub type ClientConfigFor = Arc<dyn Fn(&PoolKey) -> io::Result<Arc<rustls::ClientConfig>>>;

/// Dials HBONE connections from a worker: TCP (marked, with a timeout), then mutual TLS.
#[derive(Clone)]
pub struct TlsDialer {
    /// Client TLS config per (source, destination) identity pair; built by the caller.
    pub config: ClientConfigFor,
    /// Socket options for the TCP part.
    pub connect: ConnectOptions,
    /// Bind the TCP socket to the key's source IP before connecting (loopback demos and tests;
    /// in-pod mode gets the pod's source address by living in the pod's namespace).
    pub bind_source: bool,
    /// In-pod mode: the network namespace a source IP's connections leave from.
    pub netns_of: Option<NetnsOf>,
    /// The TLS handshake limit (and the hook that counts it).
    pub timeouts: Timeouts,
    /// TCP keepalive on the dialed connection (pooled, so long-lived).
    pub tcp_keepalive: Option<net::TcpKeepalive>,
}

/// Finds the network namespace of a pod by its IP.
pub type NetnsOf = Arc<dyn Fn(std::net::IpAddr) -> Option<Arc<zring_runtime::net::NetNs>>>;

impl std::fmt::Debug for TlsDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsDialer")
            .field("connect", &self.connect)
            .finish_non_exhaustive()
    }
}

impl zring_hbone::pool::Dialer for TlsDialer {
    type Io = tokio_rustls::client::TlsStream<PollTcp>;

    fn dial(&self, key: &PoolKey) -> Pin<Box<dyn Future<Output = io::Result<Self::Io>>>> {
        let key = key.clone();
        let this = self.clone();
        Box::pin(async move {
            let cfg = (this.config)(&key)?;
            let mut opts = this.connect.clone();
            if let Some(f) = &this.netns_of {
                opts.netns = f(key.src_ip);
            }
            if this.bind_source {
                opts.bind = Some(std::net::SocketAddr::new(key.src_ip, 0));
            }
            let tcp = net::connect(key.dst, &opts).await.map_err(|e| {
                io::Error::new(e.kind(), format!("TCP to {} failed: {e} (is port 15008 reachable, or a NetworkPolicy blocking HBONE?)", key.dst))
            })?;
            if let Some(ka) = &this.tcp_keepalive {
                let _ = net::set_tcp_keepalive(&tcp, ka);
            }
            let tcp = PollTcp::new(tcp)?;
            let limit = this.timeouts.tls_handshake;
            let handshake =
                tokio_rustls::TlsConnector::from(cfg).connect(tls::server_name(key.dst.ip()), tcp);
            match monoio::time::timeout(limit, handshake).await {
                Ok(done) => done.map_err(|e| {
                    let why = tls::classify_handshake(e);
                    io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("TLS to {}: {why}", key.dst),
                    )
                }),
                Err(_) => {
                    this.timeouts.fired(TimeoutKind::TlsHandshake);
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("TLS to {}: no handshake within {limit:?} (is something other than an HBONE proxy listening on 15008?)", key.dst),
                    ))
                }
            }
        })
    }
}
