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
///
/// Two things make TLS over it cheaper in syscalls. Writes are vectored: rustls hands over every
/// record it has ready in one `write_vectored`, which goes out as one `writev` (without it, each
/// record was a `send` of its own). Under TLS ([`PollTcp::tls`]) small reads read ahead: rustls
/// asks for at most 4 KiB at a time, so a 16 KiB record took four or five `recv`s; a read
/// smaller than [`READ_AHEAD`] reads up to that much into the worker's scratch buffer. When the
/// caller left 16 KiB or more of it, the connection takes the buffer itself (the worker's slot
/// is refilled by the next buffer a connection finishes with, or a new one), so bulk bytes are
/// not copied a second time; a smaller rest is copied out at its size. Nothing stays allocated
/// per connection while it is idle: a buffer goes back to the worker (or is freed) as soon as
/// its last byte is taken.
///
/// Readiness stays monoio's (an epoll instance behind the ring, cleared by a read that would
/// block). Tracking it here instead, with an io_uring poll per blocked socket and a short read
/// taken as drained, cut a node proxy's syscalls at 1000 rps from 10 to 6 per request but lost
/// 4-40% of the maximum request rate in three interleaved A/B rounds: one poll operation per
/// socket per wait costs more than one `epoll_wait` for all of them (see
/// `perf-reports/2026-11-29-sidecar-tls12-rps-conns/notes.md`).
#[derive(Debug)]
pub struct PollTcp {
    io: monoio::net::tcp::stream_poll::TcpStreamPoll,
    read_ahead: bool,
    /// Bytes read ahead and not yet taken: `ahead[ahead_pos..ahead_end]` (the buffer is a
    /// whole scratch buffer, taken from the worker).
    ahead: Vec<u8>,
    ahead_pos: usize,
    ahead_end: usize,
}

/// How much a small read asks the kernel for: a few TLS records.
pub const READ_AHEAD: usize = 64 * 1024;

/// Leftovers of a read-ahead at least this big keep the worker's scratch buffer (bulk data is
/// not copied twice); smaller ones are copied out at their size, so a connection that goes
/// quiet with a few bytes pending holds those bytes, not 64 KiB.
const TAKE_SCRATCH_FROM: usize = 16 * 1024;

thread_local! {
    /// The worker's read-ahead scratch buffer (a worker polls one socket at a time).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl PollTcp {
    /// Convert a completion-mode monoio stream (plaintext: its readers bring their own
    /// buffers).
    pub fn new(stream: monoio::net::TcpStream) -> io::Result<Self> {
        Ok(Self {
            io: stream.into_poll_io()?,
            read_ahead: false,
            ahead: Vec::new(),
            ahead_pos: 0,
            ahead_end: 0,
        })
    }

    /// Convert a completion-mode monoio stream that will carry TLS: small reads read ahead.
    pub fn tls(stream: monoio::net::TcpStream) -> io::Result<Self> {
        let mut s = Self::new(stream)?;
        s.read_ahead = true;
        Ok(s)
    }

    /// Hand out read-ahead bytes; true if there were any. The last of them gives the buffer
    /// back to the worker's scratch slot when that is empty (else it is freed).
    fn take_ahead(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let left = &self.ahead[self.ahead_pos..self.ahead_end];
        if left.is_empty() {
            return false;
        }
        let n = left.len().min(buf.remaining());
        buf.put_slice(&left[..n]);
        self.ahead_pos += n;
        if self.ahead_pos == self.ahead_end {
            let done = std::mem::take(&mut self.ahead);
            (self.ahead_pos, self.ahead_end) = (0, 0);
            if done.len() == READ_AHEAD {
                SCRATCH.with(|scratch| {
                    if let Ok(mut slot) = scratch.try_borrow_mut() {
                        if slot.is_empty() {
                            *slot = done;
                        }
                    }
                });
            }
        }
        true
    }
}

impl ResetOnClose for PollTcp {
    fn reset_on_close(&self) {
        let _ = net::set_reset_on_close(&self.io);
    }
}

impl AsyncRead for PollTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.take_ahead(buf) {
            return Poll::Ready(Ok(()));
        }
        if !this.read_ahead || buf.remaining() >= READ_AHEAD {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        SCRATCH.with(|scratch| {
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                // Not reachable (no read polls another); read without read-ahead if it were.
                return Pin::new(&mut this.io).poll_read(cx, buf);
            };
            if scratch.len() < READ_AHEAD {
                scratch.resize(READ_AHEAD, 0);
            }
            let mut tmp = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut this.io).poll_read(cx, &mut tmp) {
                Poll::Ready(Ok(())) => {
                    let got = tmp.filled().len();
                    let n = got.min(buf.remaining());
                    buf.put_slice(&scratch[..n]);
                    if got - n >= TAKE_SCRATCH_FROM {
                        // Bulk: keep the rest where it is; this connection takes the buffer.
                        this.ahead = std::mem::take(&mut *scratch);
                        (this.ahead_pos, this.ahead_end) = (n, got);
                    } else if n < got {
                        this.ahead = scratch[n..got].to_vec();
                        (this.ahead_pos, this.ahead_end) = (0, got - n);
                    }
                    Poll::Ready(Ok(()))
                }
                other => other,
            }
        })
    }
}

impl AsyncWrite for PollTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
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
            let tcp = PollTcp::tls(tcp)?;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use monoio::net::{TcpListener, TcpStream};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use zring_runtime::{backend::build_runtime, IoBackend};

    use super::PollTcp;

    async fn pair() -> (PollTcp, PollTcp) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (dialed, accepted) = monoio::join!(TcpStream::connect(addr), l.accept());
        (
            PollTcp::new(dialed.unwrap()).unwrap(),
            PollTcp::tls(accepted.unwrap().0).unwrap(),
        )
    }

    /// On both backends: a reader that drained the socket is woken for bytes sent later; a writer
    /// that filled the send buffer is woken when the peer reads; the peer's FIN reads as the
    /// end. A lost wake-up would hang, so each wait has a limit.
    #[test]
    fn a_drained_socket_wakes_for_later_bytes_and_a_full_one_for_room() {
        for backend in [IoBackend::Uring, IoBackend::Epoll] {
            let mut rt = build_runtime(backend, 256).unwrap();
            rt.block_on(async {
                let limit = Duration::from_secs(10);
                let (mut a, mut b) = pair().await;
                a.write_all(b"hello").await.unwrap();
                let mut buf = vec![0u8; 4096];
                let n = b.read(&mut buf).await.unwrap();
                assert_eq!(&buf[..n], b"hello", "{backend:?}");

                let later = monoio::spawn(async move {
                    monoio::time::sleep(Duration::from_millis(50)).await;
                    a.write_all(b"world").await.unwrap();
                    a
                });
                let n = monoio::time::timeout(limit, b.read(&mut buf))
                    .await
                    .expect("the reader was woken")
                    .unwrap();
                assert_eq!(&buf[..n], b"world");
                let mut a = later.await;

                // 16 MiB is more than both socket buffers hold: the writer blocks until the
                // reader, which starts late, makes room.
                let sent: Vec<u8> = (0..16 << 20).map(|i: u32| (i % 251) as u8).collect();
                let expect = sent.clone();
                let writer = monoio::spawn(async move {
                    a.write_all(&sent).await.unwrap();
                    a.shutdown().await.unwrap();
                });
                monoio::time::sleep(Duration::from_millis(100)).await;
                let mut got = Vec::new();
                monoio::time::timeout(limit, b.read_to_end(&mut got))
                    .await
                    .expect("the reader saw the end")
                    .unwrap();
                assert!(got == expect, "{backend:?}: bytes differ");
                writer.await;
            });
        }
    }

    /// Three connections on one worker, each holding bytes it read ahead (through the worker's
    /// one scratch buffer) beyond what its reader asked for, read in small alternating pieces:
    /// each gets exactly its own bytes, in order. Their leftovers are big (the connection takes
    /// the scratch buffer, the next one needs another, a drained one is given back) and, at the
    /// end of the third, small (copied out).
    #[test]
    fn connections_holding_read_ahead_bytes_each_get_their_own() {
        let mut rt = build_runtime(IoBackend::Uring, 256).unwrap();
        rt.block_on(async {
            let mut conns = Vec::new();
            for (len, salt) in [(100_000u32, 0u8), (100_000, 0x5a), (70_000, 0xa5)] {
                let (mut a, b) = pair().await;
                let want: Vec<u8> = (0..len).map(|i| (i % 241) as u8 ^ salt).collect();
                a.write_all(&want).await.unwrap();
                conns.push((a, b, want, Vec::new()));
            }
            // Let all arrive whole, so the first read of each reads ahead.
            monoio::time::sleep(Duration::from_millis(50)).await;
            let mut piece = [0u8; 1000];
            while conns.iter().any(|(_, _, want, got)| got.len() < want.len()) {
                for (_, b, want, got) in conns.iter_mut() {
                    if got.len() < want.len() {
                        b.read_exact(&mut piece).await.unwrap();
                        got.extend_from_slice(&piece);
                    }
                }
            }
            for (i, (_, _, want, got)) in conns.iter().enumerate() {
                assert!(got == want, "connection {i}'s bytes differ");
            }
        });
    }
}
