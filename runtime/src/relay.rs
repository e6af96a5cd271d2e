//! The bidirectional TCP relay: zero-copy `splice(2)` through a pipe, or a buffered copy.
//!
//! Both modes forward half-closes (a FIN read on one side becomes `shutdown(SHUT_WR)` on the
//! other while the other direction keeps flowing), turn a reset on one side into a reset on the
//! other (`SO_LINGER` 0, then close), count bytes per direction, and optionally end a connection
//! that moved no byte in either direction for an idle timeout.
//!
//! # Why splice is driven by readiness, not by io_uring's `IORING_OP_SPLICE`
//! io_uring cannot complete a splice inline: `IORING_OP_SPLICE` is always punted to an io-wq
//! kernel worker thread, which then *blocks* in `splice(2)` until the socket has data. One relay
//! direction waiting for data therefore pins one io-wq thread; 1000 idle connections mean 2000
//! kernel threads, all outside the cores the workers are pinned to (see
//! `perf-reports/relay/` for the count measured under load). Bounding them with
//! `IORING_REGISTER_IOWQ_MAX_WORKERS` turns that into head-of-line blocking: a few idle
//! connections hold every io-wq thread and the busy ones stall.
//!
//! So the default ([`SpliceEngine::Readiness`]) waits for readiness on the ring (a `POLL_ADD`
//! SQE, or epoll on the fallback backend) and then calls non-blocking `splice(2)` itself, on the
//! worker thread, on its own core: first into the pipe (up to the pipe's size, 256 KiB by
//! default), then out of it until it is empty. A chunk is always attempted before waiting, so a
//! busy stream costs one splice pair per pipe-full and no poll at all. [`SpliceEngine::Uring`]
//! (the io_uring opcode) remains for measurement only.
//!
//! # Memory
//! A splice relay holds two pipes (four fds, pages referenced rather than copied); a copy relay
//! holds two buffers. Both are taken from and given back to per-worker pools, so a steady state
//! allocates nothing per connection.

use std::{
    cell::{Cell, RefCell},
    fmt,
    future::{poll_fn, Future},
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    pin::pin,
    task::Poll,
    time::{Duration, Instant},
};

use monoio::{
    buf::IoBuf,
    io::{AsyncReadRent, AsyncWriteRentExt},
    net::TcpStream,
};

use crate::net::{dup_stream, set_nonblocking, set_reset_on_close, with_sock};

/// Default pipe size for splice: 256 KiB moves a full TCP window of loopback data per splice pair
/// and stays under the unprivileged limit (`fs.pipe-max-size`, 1 MiB by default).
pub const DEFAULT_PIPE_SIZE: usize = 256 * 1024;
/// Default buffer of the copy relay, per direction.
pub const DEFAULT_COPY_BUFFER: usize = 64 * 1024;
/// Smallest chunk a splice call asks for (the floor; also the kernel's default pipe).
pub const MIN_SPLICE_CHUNK: usize = 64 * 1024;

/// How bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    /// Zero-copy through a pipe.
    Splice(SpliceEngine),
    /// Read into a buffer of `buffer` bytes, write it out.
    Copy {
        /// Buffer size per direction.
        buffer: usize,
    },
}

impl Default for RelayMode {
    fn default() -> Self {
        Self::Splice(SpliceEngine::Readiness)
    }
}

/// Who executes the splice calls (see the module docs for why readiness is the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpliceEngine {
    /// Non-blocking `splice(2)` on the worker, driven by readiness from the ring.
    #[default]
    Readiness,
    /// `IORING_OP_SPLICE` (executed by io-wq kernel threads). io_uring backend only; for
    /// measurement.
    Uring,
}

impl std::str::FromStr for RelayMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "splice" => Ok(Self::Splice(SpliceEngine::Readiness)),
            "splice-uring" => Ok(Self::Splice(SpliceEngine::Uring)),
            "copy" => Ok(Self::Copy {
                buffer: DEFAULT_COPY_BUFFER,
            }),
            other => Err(format!(
                "unknown relay mode {other:?}: expected splice, copy or splice-uring"
            )),
        }
    }
}

impl fmt::Display for RelayMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Splice(SpliceEngine::Readiness) => f.write_str("splice"),
            Self::Splice(SpliceEngine::Uring) => f.write_str("splice-uring"),
            Self::Copy { buffer } => write!(f, "copy({buffer}B)"),
        }
    }
}

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Splice or copy.
    pub mode: RelayMode,
    /// Pipe size asked of `F_SETPIPE_SZ` in splice mode (kept if the kernel refuses).
    pub pipe_size: usize,
    /// End the connection (with a reset both ways) after this long without a byte either way.
    pub idle_timeout: Option<Duration>,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            mode: RelayMode::default(),
            pipe_size: DEFAULT_PIPE_SIZE,
            idle_timeout: None,
        }
    }
}

/// Which way bytes were going when something failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the accepted (downstream) side to the upstream side.
    ClientToUpstream,
    /// From upstream back to the client.
    UpstreamToClient,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClientToUpstream => "client->upstream",
            Self::UpstreamToClient => "upstream->client",
        })
    }
}

/// Why a relay ended early.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// Reading from the source side failed (a reset arrives here as `ConnectionReset`); the
    /// destination side was reset in turn.
    #[error("{dir}: reading from the {} failed: {source}", if *.dir == Direction::ClientToUpstream { "client" } else { "upstream" })]
    Read {
        /// Direction of the failing copy.
        dir: Direction,
        /// The OS error.
        source: io::Error,
    },
    /// Writing to the destination side failed (it reset or went away); the source side was reset
    /// in turn.
    #[error("{dir}: writing to the {} failed: {source}", if *.dir == Direction::ClientToUpstream { "upstream" } else { "client" })]
    Write {
        /// Direction of the failing copy.
        dir: Direction,
        /// The OS error.
        source: io::Error,
    },
    /// No byte moved either way for the idle timeout.
    #[error("idle for {0:?}; connection closed")]
    Idle(Duration),
    /// Setting up the relay (pipes, buffers, socket options) failed.
    #[error("relay setup failed: {0}")]
    Setup(io::Error),
}

/// What a relay did: bytes each way, and the error that ended it, if any.
#[derive(Debug)]
pub struct RelayOutcome {
    /// Bytes read from the client and written upstream.
    pub client_to_upstream: u64,
    /// Bytes read from upstream and written to the client.
    pub upstream_to_client: u64,
    /// `None` when both directions ended with a clean EOF.
    pub error: Option<RelayError>,
}

/// Relay between `client` and `upstream` until both directions have ended. Consumes and closes
/// both sockets. On the first error in either direction, both sockets are reset.
pub async fn relay(client: TcpStream, upstream: TcpStream, opts: &RelayOptions) -> RelayOutcome {
    relay_counted(client, upstream, opts, &ByteCounts::default()).await
}

/// Bytes moved so far by a live relay, readable while it runs (live metrics).
#[derive(Debug, Default)]
pub struct ByteCounts {
    /// From the client side to the upstream side.
    pub client_to_upstream: Cell<u64>,
    /// From upstream back to the client.
    pub upstream_to_client: Cell<u64>,
}

/// [`relay`], keeping `counts` up to date as bytes move (so a caller racing it against a timer
/// can report a long-lived connection's traffic before it ends).
pub async fn relay_counted(
    client: TcpStream,
    upstream: TcpStream,
    opts: &RelayOptions,
    counts: &ByteCounts,
) -> RelayOutcome {
    let up = &counts.client_to_upstream;
    let down = &counts.upstream_to_client;
    let activity = Cell::new(Instant::now());
    // Readiness-driven splice and the copy loop need non-blocking sockets (accepted sockets from
    // io_uring are blocking); io_uring's own splice opcode needs blocking ones, or its io-wq
    // worker returns EAGAIN instead of waiting.
    let nonblocking = opts.mode != RelayMode::Splice(SpliceEngine::Uring);
    let setup = set_nonblocking(client.as_raw_fd(), nonblocking)
        .and_then(|()| set_nonblocking(upstream.as_raw_fd(), nonblocking));
    let error = match setup {
        Err(e) => Some(RelayError::Setup(e)),
        Ok(()) => match opts.mode {
            RelayMode::Splice(engine) => {
                relay_splice(&client, &upstream, engine, opts, up, down, &activity).await
            }
            RelayMode::Copy { buffer } => {
                relay_copy(&client, &upstream, buffer, opts, up, down, &activity).await
            }
        }
        .err(),
    };
    if let Some(err) = &error {
        // Reset both sides; a failed setsockopt only means the socket is gone already.
        let _ = set_reset_on_close(&client);
        let _ = set_reset_on_close(&upstream);
        tracing::trace!(error = %err, "relay reset");
    }
    RelayOutcome {
        client_to_upstream: up.get(),
        upstream_to_client: down.get(),
        error,
    }
}

/// Drive both directions; the first error wins, otherwise wait for both to finish.
async fn both<A, B>(
    a: A,
    b: B,
    idle: Option<Duration>,
    activity: &Cell<Instant>,
) -> Result<(), RelayError>
where
    A: Future<Output = Result<(), RelayError>>,
    B: Future<Output = Result<(), RelayError>>,
{
    let mut a = pin!(a);
    let mut b = pin!(b);
    let mut a_done = false;
    let mut b_done = false;
    let mut timer = idle.map(|t| Box::pin(monoio::time::sleep(t)));
    poll_fn(|cx| {
        if !a_done {
            if let Poll::Ready(r) = a.as_mut().poll(cx) {
                r?;
                a_done = true;
            }
        }
        if !b_done {
            if let Poll::Ready(r) = b.as_mut().poll(cx) {
                r?;
                b_done = true;
            }
        }
        if a_done && b_done {
            return Poll::Ready(Ok(()));
        }
        if let (Some(limit), Some(t)) = (idle, timer.as_mut()) {
            while t.as_mut().poll(cx).is_ready() {
                let quiet = activity.get().elapsed();
                if quiet >= limit {
                    return Poll::Ready(Err(RelayError::Idle(limit)));
                }
                *t = Box::pin(monoio::time::sleep(limit - quiet));
            }
        }
        Poll::Pending
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// splice

/// A pipe used as the in-kernel buffer of one splice direction.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// The size asked for (the pool key).
    asked: usize,
    /// The size the kernel granted.
    size: usize,
}

impl Pipe {
    fn new(asked: usize) -> io::Result<Self> {
        let size = asked;
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two c_ints for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ on our own pipe fd; the kernel rounds up to a power of two pages
        // and refuses (EPERM) past the unprivileged limit, in which case the default stays.
        let got =
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
        let size = if got > 0 {
            got as usize
        } else {
            // SAFETY: F_GETPIPE_SZ only reads the pipe's size.
            let cur = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
            if cur > 0 {
                cur as usize
            } else {
                MIN_SPLICE_CHUNK
            }
        };
        Ok(Self {
            read,
            write,
            asked,
            size,
        })
    }
}

thread_local! {
    /// Empty pipes given back by finished relays on this worker, ready for the next connection.
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    /// Copy buffers given back by finished relays on this worker.
    static BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// At most this many idle pipes (or buffers) are kept per worker; the rest are freed.
const POOL_LIMIT: usize = 256;

fn take_pipe(size: usize) -> io::Result<Pipe> {
    let pooled = PIPES.with(|p| {
        let mut p = p.borrow_mut();
        let idx = p.iter().rposition(|pipe| pipe.asked == size)?;
        Some(p.swap_remove(idx))
    });
    match pooled {
        Some(p) => Ok(p),
        None => Pipe::new(size),
    }
}

fn give_pipe(pipe: Pipe) {
    PIPES.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_LIMIT {
            p.push(pipe);
        }
    });
}

fn splice_nb(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: both fds are open for the call (their owners are borrowed by the caller); null
        // offsets mean "use and advance the file position", the only valid choice for
        // sockets and pipes.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn relay_splice(
    client: &TcpStream,
    upstream: &TcpStream,
    engine: SpliceEngine,
    opts: &RelayOptions,
    up: &Cell<u64>,
    down: &Cell<u64>,
    activity: &Cell<Instant>,
) -> Result<(), RelayError> {
    let size = opts.pipe_size.max(MIN_SPLICE_CHUNK);
    let p1 = take_pipe(size).map_err(RelayError::Setup)?;
    let p2 = take_pipe(size).map_err(RelayError::Setup)?;
    let track = opts.idle_timeout.is_some();
    let res = match engine {
        SpliceEngine::Readiness => {
            both(
                splice_dir(
                    client,
                    upstream,
                    &p1,
                    Direction::ClientToUpstream,
                    up,
                    activity,
                    track,
                ),
                splice_dir(
                    upstream,
                    client,
                    &p2,
                    Direction::UpstreamToClient,
                    down,
                    activity,
                    track,
                ),
                opts.idle_timeout,
                activity,
            )
            .await
        }
        SpliceEngine::Uring => {
            both(
                splice_dir_uring(
                    client,
                    upstream,
                    size,
                    Direction::ClientToUpstream,
                    up,
                    activity,
                    track,
                ),
                splice_dir_uring(
                    upstream,
                    client,
                    size,
                    Direction::UpstreamToClient,
                    down,
                    activity,
                    track,
                ),
                opts.idle_timeout,
                activity,
            )
            .await
        }
    };
    // Only a relay that ended cleanly is known to have left its pipes empty.
    if res.is_ok() {
        give_pipe(p1);
        give_pipe(p2);
    }
    res
}

async fn splice_dir(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    dir: Direction,
    count: &Cell<u64>,
    activity: &Cell<Instant>,
    track: bool,
) -> Result<(), RelayError> {
    let (s, d) = (src.as_raw_fd(), dst.as_raw_fd());
    let (pr, pw) = (pipe.read.as_raw_fd(), pipe.write.as_raw_fd());
    loop {
        let n = loop {
            match splice_nb(s, pw, pipe.size) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    src.readable(false)
                        .await
                        .map_err(|source| RelayError::Read { dir, source })?;
                }
                Err(source) => return Err(RelayError::Read { dir, source }),
            }
        };
        if n == 0 {
            return shutdown_write(dst, dir);
        }
        let mut left = n;
        while left > 0 {
            match splice_nb(pr, d, left) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dst.writable(false)
                        .await
                        .map_err(|source| RelayError::Write { dir, source })?;
                }
                Err(source) => return Err(RelayError::Write { dir, source }),
            }
        }
        count.set(count.get() + n as u64);
        if track {
            activity.set(Instant::now());
        }
    }
}

async fn splice_dir_uring(
    src: &TcpStream,
    dst: &TcpStream,
    size: usize,
    dir: Direction,
    count: &Cell<u64>,
    activity: &Cell<Instant>,
    track: bool,
) -> Result<(), RelayError> {
    use monoio::io::splice::{SpliceDestination, SpliceSource};
    let (mut pr, mut pw) = monoio::net::unix::new_pipe().map_err(RelayError::Setup)?;
    // The io_uring splice op needs `&mut` access to the stream wrappers; dup the sockets so each
    // direction owns its own handles.
    let mut s = TcpStream::from_std(dup_stream(src).map_err(RelayError::Setup)?)
        .map_err(RelayError::Setup)?;
    let mut d = TcpStream::from_std(dup_stream(dst).map_err(RelayError::Setup)?)
        .map_err(RelayError::Setup)?;
    let len = u32::try_from(size).unwrap_or(u32::MAX);
    loop {
        let n = s
            .splice_to_pipe(&mut pw, len)
            .await
            .map_err(|source| RelayError::Read { dir, source })?;
        if n == 0 {
            return shutdown_write(dst, dir);
        }
        let mut left = n;
        while left > 0 {
            left -= d
                .splice_from_pipe(&mut pr, left)
                .await
                .map_err(|source| RelayError::Write { dir, source })?;
        }
        count.set(count.get() + u64::from(n));
        if track {
            activity.set(Instant::now());
        }
    }
}

fn shutdown_write(dst: &TcpStream, dir: Direction) -> Result<(), RelayError> {
    match with_sock(dst, |s| s.shutdown(std::net::Shutdown::Write)) {
        Ok(()) => Ok(()),
        // The peer is already gone entirely; the other direction will see it.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        Err(source) => Err(RelayError::Write { dir, source }),
    }
}

// ---------------------------------------------------------------------------------------------
// copy

fn take_buffer(size: usize) -> Vec<u8> {
    let pooled = BUFFERS.with(|b| {
        let mut b = b.borrow_mut();
        let idx = b.iter().rposition(|buf| buf.capacity() == size)?;
        Some(b.swap_remove(idx))
    });
    pooled.unwrap_or_else(|| Vec::with_capacity(size))
}

fn give_buffer(mut buf: Vec<u8>) {
    buf.clear();
    BUFFERS.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < POOL_LIMIT {
            b.push(buf);
        }
    });
}

async fn relay_copy(
    client: &TcpStream,
    upstream: &TcpStream,
    buffer: usize,
    opts: &RelayOptions,
    up: &Cell<u64>,
    down: &Cell<u64>,
    activity: &Cell<Instant>,
) -> Result<(), RelayError> {
    // Each direction owns a reading and a writing handle; the writing ones are dups of the same
    // kernel sockets, so both directions run at once without sharing `&mut`.
    let setup = || -> io::Result<_> {
        Ok((
            TcpStream::from_std(dup_stream(client)?)?,
            TcpStream::from_std(dup_stream(upstream)?)?,
            TcpStream::from_std(dup_stream(upstream)?)?,
            TcpStream::from_std(dup_stream(client)?)?,
        ))
    };
    let (mut c_read, mut u_write, mut u_read, mut c_write) = setup().map_err(RelayError::Setup)?;
    let track = opts.idle_timeout.is_some();
    let size = buffer.max(1);
    both(
        copy_dir(
            &mut c_read,
            &mut u_write,
            size,
            Direction::ClientToUpstream,
            up,
            activity,
            track,
        ),
        copy_dir(
            &mut u_read,
            &mut c_write,
            size,
            Direction::UpstreamToClient,
            down,
            activity,
            track,
        ),
        opts.idle_timeout,
        activity,
    )
    .await
}

async fn copy_dir(
    src: &mut TcpStream,
    dst: &mut TcpStream,
    size: usize,
    dir: Direction,
    count: &Cell<u64>,
    activity: &Cell<Instant>,
    track: bool,
) -> Result<(), RelayError> {
    let mut buf = take_buffer(size);
    loop {
        buf.clear();
        let (res, b) = src.read(buf).await;
        buf = b;
        let n = res.map_err(|source| RelayError::Read { dir, source })?;
        if n == 0 {
            give_buffer(buf);
            return shutdown_write(dst, dir);
        }
        let (res, slice) = dst.write_all(buf.slice(..n)).await;
        buf = slice.into_inner();
        res.map_err(|source| RelayError::Write { dir, source })?;
        count.set(count.get() + n as u64);
        if track {
            activity.set(Instant::now());
        }
    }
}
