//! Socket setup for workers: reuseport listeners, marks, transparent sockets, the original
//! destination of redirected connections, and sockets inside other network namespaces.
//!
//! # Network namespaces
//! A socket belongs to the network namespace its creating thread was in at `socket(2)` time and
//! stays there for life. zring runs in the node's (or its own) namespace and must listen and
//! connect inside pods' namespaces. [`NetNs::run`] does it on the calling worker thread:
//! `setns(target)`, create (and bind) the socket, `setns(original)`. Both `setns` calls are plain
//! syscalls of a few microseconds, no thread hand-off, and the socket is then driven by the
//! worker's ring like any other. The switch is scoped to a closure that cannot `.await`, so no
//! other task ever runs while the thread is in the foreign namespace.

use std::{
    fs::File,
    io,
    net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

/// Default listen backlog. The kernel caps it at `net.core.somaxconn` (4096 on current kernels);
/// a proxy in front of many clients wants the cap rather than std's 128.
pub const DEFAULT_BACKLOG: i32 = 4096;

/// How to create a listening socket.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    /// `SO_REUSEPORT`: every worker binds its own socket on the same address and the kernel
    /// spreads connections over them. On by default: that is how workers share a port.
    pub reuse_port: bool,
    /// `listen(2)` backlog.
    pub backlog: i32,
    /// `IP_TRANSPARENT`: accept connections for addresses that are not local (TPROXY capture).
    /// Needs CAP_NET_ADMIN.
    pub transparent: bool,
    /// `IP_FREEBIND`: bind an address not (yet) configured on any interface.
    pub freebind: bool,
    /// `SO_MARK` on the listener (inherited by accepted sockets).
    pub mark: Option<u32>,
}

impl Default for ListenOptions {
    fn default() -> Self {
        Self {
            reuse_port: true,
            backlog: DEFAULT_BACKLOG,
            transparent: false,
            freebind: false,
            mark: None,
        }
    }
}

/// Bind a non-blocking TCP listener in the calling thread's network namespace.
pub fn bind_listener(addr: SocketAddr, opts: &ListenOptions) -> io::Result<StdListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if opts.reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if opts.transparent {
        set_transparent(&socket, addr.is_ipv6())?;
    }
    if opts.freebind {
        if addr.is_ipv6() {
            socket.set_freebind_v6(true)?;
        } else {
            socket.set_freebind_v4(true)?;
        }
    }
    if let Some(mark) = opts.mark {
        socket.set_mark(mark)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(opts.backlog)?;
    Ok(socket.into())
}

/// Bind a listener and hand it to the current worker's runtime.
pub fn bind_monoio_listener(
    addr: SocketAddr,
    opts: &ListenOptions,
) -> io::Result<monoio::net::TcpListener> {
    monoio::net::TcpListener::from_std(bind_listener(addr, opts)?)
}

fn set_transparent(socket: &Socket, v6: bool) -> io::Result<()> {
    if v6 {
        socket.set_ip_transparent_v6(true)
    } else {
        socket.set_ip_transparent_v4(true)
    }
}

/// How to create an upstream (outgoing) connection.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// `SO_MARK`, so capture rules can tell zring's own traffic from the pods'.
    pub mark: Option<u32>,
    /// Local address to bind before connecting (port 0 = any).
    pub bind: Option<SocketAddr>,
    /// `IP_TRANSPARENT` with `bind`: originate from an address that is not local (TPROXY mode
    /// spoofing the pod's source IP). Needs CAP_NET_ADMIN.
    pub transparent: bool,
    /// Give up after this long; `None` waits for the kernel's own SYN retries (about two minutes).
    pub timeout: Option<Duration>,
    /// Create the socket inside this network namespace (in-pod mode: the connection leaves from
    /// the pod's own namespace, with its own address and routes).
    pub netns: Option<std::sync::Arc<NetNs>>,
}

/// Create, configure and start connecting a socket in the calling thread's namespace. The
/// returned socket is non-blocking with the connect in progress (or done).
pub fn start_connect(addr: SocketAddr, opts: &ConnectOptions) -> io::Result<Socket> {
    let new = || {
        Socket::new(
            Domain::for_address(addr),
            Type::STREAM.cloexec().nonblocking(),
            Some(Protocol::TCP),
        )
    };
    // A socket belongs to the namespace it was created in; everything after works from here.
    let socket = match &opts.netns {
        Some(ns) => ns.run(new)??,
        None => new()?,
    };
    if let Some(mark) = opts.mark {
        socket.set_mark(mark)?;
    }
    if let Some(bind) = opts.bind {
        if opts.transparent {
            set_transparent(&socket, bind.is_ipv6())?;
        }
        socket.bind(&bind.into())?;
    }
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(socket)
}

/// Finish a connect started by [`start_connect`] on the current worker's runtime.
pub async fn finish_connect(
    socket: Socket,
    timeout: Option<Duration>,
) -> io::Result<monoio::net::TcpStream> {
    let stream = monoio::net::TcpStream::from_std(StdStream::from(socket))?;
    let wait = stream.writable(false);
    match timeout {
        Some(t) => match monoio::time::timeout(t, wait).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect timed out after {t:?}"),
                ))
            }
        },
        None => wait.await?,
    }
    if let Some(e) = with_sock(&stream, |s| s.take_error())? {
        return Err(e);
    }
    // A writable socket with no error may still be unconnected if poll woke spuriously.
    stream.peer_addr()?;
    Ok(stream)
}

/// Connect with the given options on the current worker's runtime.
pub async fn connect(
    addr: SocketAddr,
    opts: &ConnectOptions,
) -> io::Result<monoio::net::TcpStream> {
    let socket = start_connect(addr, opts)?;
    finish_connect(socket, opts.timeout).await
}

/// Run `f` with a [`SockRef`] to anything that has a raw socket fd.
pub fn with_sock<S: AsRawFd, R>(s: &S, f: impl FnOnce(SockRef<'_>) -> R) -> R {
    // SAFETY: `s` owns an open socket fd and is borrowed for the whole call, so the fd stays open
    // and is not reused while `SockRef` (which never closes it) exists.
    let fd = unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) };
    f(SockRef::from(&fd))
}

/// The destination a connection had before iptables `REDIRECT`/`DNAT` rewrote it
/// (`SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` for IPv6).
pub fn original_dst<S: AsRawFd>(s: &S) -> io::Result<SocketAddr> {
    with_sock(s, |sock| {
        let local = sock.local_addr()?;
        let orig: SockAddr = match local.as_socket() {
            Some(SocketAddr::V6(v6)) if v6.ip().to_ipv4_mapped().is_none() => {
                sock.original_dst_v6()?
            }
            _ => sock.original_dst_v4()?,
        };
        orig.as_socket().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "original destination is not an IP address",
            )
        })
    })
}

/// Set `SO_LINGER` to zero so that closing the socket sends a TCP RST instead of a FIN.
pub fn set_reset_on_close<S: AsRawFd>(s: &S) -> io::Result<()> {
    with_sock(s, |sock| sock.set_linger(Some(Duration::ZERO)))
}

/// TCP keepalive probes on a long-lived connection (pooled HBONE connections): the kernel
/// notices a peer that vanished without a FIN or RST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpKeepalive {
    /// Idle time before the first probe (`TCP_KEEPIDLE`).
    pub time: Duration,
    /// Between probes (`TCP_KEEPINTVL`).
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped (`TCP_KEEPCNT`).
    pub retries: u32,
}

/// ztunnel's defaults (`KEEPALIVE_TIME` 180 s, `KEEPALIVE_INTERVAL` 180 s, `KEEPALIVE_RETRIES`
/// 9). They catch dead peers that HTTP/2 PINGs cannot reach (no HTTP/2 yet, or a stalled
/// writer); the PING keepalive is what detects a vanished node within seconds.
pub const DEFAULT_TCP_KEEPALIVE: TcpKeepalive = TcpKeepalive {
    time: Duration::from_secs(180),
    interval: Duration::from_secs(180),
    retries: 9,
};

/// Turn on TCP keepalive with `ka`.
pub fn set_tcp_keepalive<S: AsRawFd>(s: &S, ka: &TcpKeepalive) -> io::Result<()> {
    let params = socket2::TcpKeepalive::new()
        .with_time(ka.time)
        .with_interval(ka.interval)
        .with_retries(ka.retries);
    with_sock(s, |sock| sock.set_tcp_keepalive(&params))
}

/// A network namespace, held open by a file descriptor (from `/var/run/netns/NAME`,
/// `/proc/PID/ns/net`, or received over a unix socket).
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
}

impl NetNs {
    /// The calling thread's current namespace.
    pub fn current() -> io::Result<Self> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// Open a namespace file, checking that it is a network namespace.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = File::open(path.as_ref())?;
        Self::from_fd(file.into())
    }

    /// Adopt a descriptor (for example one received in `SCM_RIGHTS`), checking that it refers to
    /// a network namespace.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd; any fd is acceptable
        // (non-namespace fds fail with ENOTTY/EINVAL, handled below).
        let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE) };
        if kind < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("file descriptor is not a namespace: {e}"),
            ));
        }
        if kind != libc::CLONE_NEWNET {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "file descriptor is a namespace of type {kind:#x}, not a network namespace"
                ),
            ));
        }
        Ok(Self { fd })
    }

    /// The inode that identifies this namespace (as shown by `ls -i /proc/PID/ns/net`).
    pub fn inode(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let file = File::from(self.fd.try_clone()?);
        Ok(file.metadata()?.ino())
    }

    /// Run `f` on this thread inside this namespace, then switch back. Sockets created inside
    /// `f` stay in this namespace for life.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> io::Result<R> {
        let original = NetNs::current()?;
        if original.inode()? == self.inode()? {
            return Ok(f());
        }
        setns(self.fd.as_fd())?;
        // The way back is a guard's drop, so it runs even when `f` panics (a panic inside is
        // caught per connection higher up, and the worker would otherwise go on in the pod's
        // namespace for every later socket).
        let _back = Return(original);
        Ok(f())
    }
}

/// Switches the thread back to its namespace when dropped.
struct Return(NetNs);

impl Drop for Return {
    fn drop(&mut self) {
        // Failing to return would leave this worker in the pod's namespace for every later
        // socket; that cannot be recovered safely, so it aborts loudly.
        if let Err(e) = setns(self.0.fd.as_fd()) {
            tracing::error!(error = %e, "could not return to the original network namespace; aborting");
            std::process::abort();
        }
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// `NS_GET_NSTYPE` = `_IO(0xb7, 0x3)` from `linux/nsfs.h`.
const NS_GET_NSTYPE: libc::c_ulong = (0xb7 << 8) | 0x3;

fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is a valid open namespace descriptor for the duration of the call; setns only
    // changes this thread's namespace membership.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Switch a raw socket fd between non-blocking and blocking mode.
pub(crate) fn set_nonblocking(fd: RawFd, nonblocking: bool) -> io::Result<()> {
    // SAFETY: `fd` is open for the duration of the call (the caller holds its owner);
    // SockRef never closes it.
    let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
    SockRef::from(&bfd).set_nonblocking(nonblocking)
}

/// Duplicate a socket into a second std stream sharing the same kernel socket.
pub(crate) fn dup_stream<S: AsRawFd>(s: &S) -> io::Result<StdStream> {
    // SAFETY: F_DUPFD_CLOEXEC on an fd we hold open returns a new fd or -1; no memory involved.
    let fd = unsafe { libc::fcntl(s.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by fcntl, is open and owned by nobody else.
    Ok(unsafe { StdStream::from_raw_fd(fd) })
}
