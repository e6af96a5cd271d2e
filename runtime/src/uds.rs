//! `SOCK_SEQPACKET` unix sockets that carry file descriptors (`SCM_RIGHTS`): the transport of
//! Istio's ZDS protocol, where the node agent hands each pod's network namespace to the node
//! proxy. Blocking I/O: both ends run on control threads, never on a data-path worker.
//!
//! One `send` is one message (a datagram with boundaries, in order, reliable); a message may
//! carry descriptors. `recv` returns the message and the descriptors that came with it, opened
//! close-on-exec; a message larger than the buffer is an error, never silently cut.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

use socket2::{Domain, SockAddr, Socket, Type};

/// Most descriptors one message may carry.
pub const MAX_FDS: usize = 4;

/// A connected `SOCK_SEQPACKET` unix socket.
#[derive(Debug)]
pub struct SeqPacket(Socket);

/// A listening `SOCK_SEQPACKET` unix socket.
#[derive(Debug)]
pub struct SeqPacketListener(Socket);

fn socket() -> io::Result<Socket> {
    Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)
}

impl SeqPacketListener {
    /// Listen on `path` (a stale socket file there is replaced).
    pub fn bind(path: &Path) -> io::Result<Self> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        let s = socket()?;
        s.bind(&SockAddr::unix(path)?)?;
        s.listen(16)?;
        Ok(Self(s))
    }

    /// Accept one peer.
    pub fn accept(&self) -> io::Result<SeqPacket> {
        let (s, _) = self.0.accept()?;
        Ok(SeqPacket(s))
    }

    /// Accept with a bound wait: `Ok(None)` when nothing came within `timeout`.
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<Option<SeqPacket>> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        match n {
            0 => Ok(None),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
            _ => self.accept().map(Some),
        }
    }
}

impl SeqPacket {
    /// Connect to the listener at `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let s = socket()?;
        s.connect(&SockAddr::unix(path)?)?;
        Ok(Self(s))
    }

    /// Bound every `recv` (None: wait forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.0.set_read_timeout(t)
    }

    /// Send one message with `fds` attached.
    pub fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("at most {MAX_FDS} descriptors per message"),
            ));
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let fd_bytes = std::mem::size_of_val(raw.as_slice()) as u32;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
        // u64 storage keeps the control buffer aligned for cmsghdr.
        let mut control = vec![0u64; space.div_ceil(8).max(1)];
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // SAFETY: an all-zero msghdr is a valid empty header; the fields are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !raw.is_empty() {
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points at `space` writable, aligned bytes, enough for one
            // cmsghdr with `fd_bytes` of data (CMSG_SPACE), so CMSG_FIRSTHDR is non-null and
            // CMSG_DATA has room for the descriptors copied into it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr() as *const u8,
                    libc::CMSG_DATA(cmsg),
                    fd_bytes as usize,
                );
            }
        }
        // SAFETY: `msg` points at `iov` (over `data`) and `control`, all alive for the call.
        let n = unsafe { libc::sendmsg(self.0.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != data.len() {
            return Err(io::Error::other("short write of a SEQPACKET message"));
        }
        Ok(())
    }

    /// Receive one message into `buf`: its length and its descriptors. Length 0 with no
    /// descriptors is the peer closing.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        let fd_bytes = (MAX_FDS * std::mem::size_of::<RawFd>()) as u32;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is a valid empty header; the fields are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: `msg` points at `iov` (over `buf`) and `control`, writable and alive.
        let n = unsafe { libc::recvmsg(self.0.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut fds = Vec::new();
        // SAFETY: the kernel filled `msg`'s control area (msg_controllen says how much);
        // CMSG_FIRSTHDR/NXTHDR walk only within it, and each SCM_RIGHTS payload holds
        // (cmsg_len - CMSG_LEN(0)) / size_of::<RawFd>() descriptors that are now ours.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        let fd = std::ptr::read_unaligned((data as *const RawFd).add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("message larger than {} bytes", buf.len()),
            ));
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {MAX_FDS} descriptors in one message"),
            ));
        }
        Ok((n as usize, fds))
    }
}

impl AsFd for SeqPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
