//! The copy between a TCP socket and a CONNECT stream.
//!
//! - FIN from the socket -> END_STREAM; END_STREAM from the peer -> `shutdown(SHUT_WR)` on the
//!   socket. The other direction keeps flowing.
//! - A reset socket -> RST_STREAM(CONNECT_ERROR); RST_STREAM from the peer -> the socket is reset
//!   (`SO_LINGER` 0, then close), never closed with a FIN that would look like success.
//! - Byte counts per direction are returned even when the relay ends with an error.

use std::{
    cell::Cell,
    future::{poll_fn, Future},
    io,
    pin::{pin, Pin},
    task::Poll,
};

use bytes::{Bytes, BytesMut};
use h2::Reason;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::stream::H2Stream;

/// Largest read buffer of the socket -> stream copy: bulk transfers read up to this much per
/// syscall and hand it to h2 as one chunk.
pub const COPY_BUFFER: usize = 256 * 1024;
/// First read size of a connection. Reads of up to this much go through the thread's scratch
/// buffer and are copied out at their exact size, so a connection waiting for its next
/// request holds no read buffer at all (with its own 4 KiB buffer, 10,000 idle tunnels held
/// 40 MiB per proxy). A read that fills it switches the connection to its own buffer, which
/// grows (x4 up to [`COPY_BUFFER`]) while reads keep filling it: bulk data is never copied.
pub const INITIAL_COPY_BUFFER: usize = 4 * 1024;

thread_local! {
    /// Scratch for the small reads of every relay on this thread: a read is polled to
    /// completion (or Pending) inside one call, so one buffer serves them all.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One read of at most `max` bytes through the thread's scratch buffer; what came is copied
/// into a buffer of its exact size. Nothing is held while the read is pending.
async fn read_small<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> io::Result<Bytes> {
    poll_fn(|cx| {
        SCRATCH.with(|scratch| {
            let mut own;
            let mut borrowed = scratch.try_borrow_mut();
            let buf: &mut Vec<u8> = match borrowed.as_deref_mut() {
                Ok(b) => b,
                // Only if a read polled from inside another read; then a buffer of its own.
                Err(_) => {
                    own = Vec::new();
                    &mut own
                }
            };
            if buf.len() < max {
                buf.resize(max, 0);
            }
            let mut rb = ReadBuf::new(&mut buf[..max]);
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(Bytes::copy_from_slice(rb.filled()))),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    })
    .await
}

/// A socket that can be told to send RST instead of FIN when closed.
pub trait ResetOnClose {
    /// Arrange for the next close to send a TCP RST.
    fn reset_on_close(&self);
}

impl ResetOnClose for tokio::net::TcpStream {
    fn reset_on_close(&self) {
        let _ = socket2::SockRef::from(self).set_linger(Some(std::time::Duration::ZERO));
    }
}

/// Which side failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// The TCP side failed (reset, broken pipe); the stream was reset.
    #[error("tcp side: {0}")]
    Socket(io::Error),
    /// The HBONE side failed (RST_STREAM, GOAWAY, connection error); the socket was reset.
    #[error("hbone side: {0}")]
    Stream(io::Error),
}

/// Outcome of [`copy_bidirectional`].
#[derive(Debug)]
pub struct TunnelOutcome {
    /// Bytes from the socket into the tunnel.
    pub socket_to_stream: u64,
    /// Bytes from the tunnel to the socket.
    pub stream_to_socket: u64,
    /// The first failure, if any.
    pub error: Option<TunnelError>,
}

/// Bytes moved so far by a live tunnel, readable while it runs (live metrics).
#[derive(Debug, Default)]
pub struct TunnelCounts {
    /// From the socket into the tunnel.
    pub socket_to_stream: Cell<u64>,
    /// From the tunnel to the socket.
    pub stream_to_socket: Cell<u64>,
}

/// Relay until both directions end.
pub async fn copy_bidirectional<S>(socket: S, stream: H2Stream) -> TunnelOutcome
where
    S: AsyncRead + AsyncWrite + ResetOnClose + Unpin,
{
    copy_bidirectional_counted(socket, stream, &TunnelCounts::default()).await
}

/// [`copy_bidirectional`], keeping `counts` up to date as bytes move. `counts` is a reference
/// or a handle that owns them (an `Rc`), so a caller can create this future before it has a
/// place for the counts to live.
///
/// Not an `async fn`: an async fn's future keeps room for its arguments next to the locals they
/// are moved into (the socket and the stream, ~200 bytes, for as long as the tunnel lives).
/// Split here, the future holds only the halves.
pub fn copy_bidirectional_counted<S, C>(
    socket: S,
    stream: H2Stream,
    counts: C,
) -> impl Future<Output = TunnelOutcome>
where
    S: AsyncRead + AsyncWrite + ResetOnClose + Unpin,
    C: std::ops::Deref<Target = TunnelCounts>,
{
    let (mut h2r, mut h2w) = stream.into_split();
    let (mut sr, mut sw) = tokio::io::split(socket);
    async move {
        let up = &counts.socket_to_stream;
        let down = &counts.stream_to_socket;
        let error = {
            // Socket -> stream: small reads through the scratch buffer (copied out at their size);
            // once reads fill it, into a BytesMut whose filled part goes to h2 as is (no copy).
            let a = pin!(async {
                let mut want = INITIAL_COPY_BUFFER;
                let mut buf = BytesMut::new();
                loop {
                    let (chunk, room) = if want == INITIAL_COPY_BUFFER {
                        let chunk = read_small(&mut sr, want)
                            .await
                            .map_err(TunnelError::Socket)?;
                        (chunk, want)
                    } else {
                        if buf.capacity() < want / 4 {
                            buf.reserve(want);
                        }
                        let room = buf.capacity();
                        sr.read_buf(&mut buf).await.map_err(TunnelError::Socket)?;
                        (buf.split().freeze(), room)
                    };
                    let n = chunk.len();
                    if n == room && want < COPY_BUFFER {
                        want = (want * 4).min(COPY_BUFFER);
                    } else if n > 0 && n < INITIAL_COPY_BUFFER / 4 && want > INITIAL_COPY_BUFFER {
                        // A message-sized read: bulk is over, back to holding nothing between
                        // reads. (Not on any short read: a bulk sender's reads often come back
                        // part full, and falling back then made single-stream transfers 20%
                        // slower.)
                        want = INITIAL_COPY_BUFFER;
                        buf = BytesMut::new();
                    }
                    if n == 0 {
                        h2w.shutdown().await.map_err(TunnelError::Stream)?;
                        return Ok(());
                    }
                    h2w.send_bytes(chunk).await.map_err(TunnelError::Stream)?;
                    up.set(up.get() + n as u64);
                }
            });
            // Stream -> socket: write h2's received chunks straight to the socket (no copy).
            let b = pin!(async {
                loop {
                    match h2r.recv_bytes().await.map_err(TunnelError::Stream)? {
                        None => {
                            sw.shutdown().await.map_err(TunnelError::Socket)?;
                            return Ok(());
                        }
                        Some(chunk) => {
                            sw.write_all(&chunk).await.map_err(TunnelError::Socket)?;
                            down.set(down.get() + chunk.len() as u64);
                        }
                    }
                }
            });
            first_error(a, b).await.err()
        };
        let socket = sr.unsplit(sw);
        match &error {
            Some(TunnelError::Socket(_)) => h2w.reset(Reason::CONNECT_ERROR),
            Some(TunnelError::Stream(_)) => {
                socket.reset_on_close();
                h2w.reset(Reason::CANCEL);
            }
            None => {}
        }
        drop(socket);
        TunnelOutcome {
            socket_to_stream: up.get(),
            stream_to_socket: down.get(),
            error,
        }
    }
}

/// Join two CONNECT streams (a waypoint's client stream `a` and its upstream stream `b`): each
/// chunk h2 receives on one is sent on the other as it is (no copy, and no buffer held while
/// the streams are idle); `a_first`, bytes already read from `a`, goes first. END_STREAM
/// crosses as END_STREAM, each direction on its own; when one side fails, the other is reset
/// (RST_STREAM). In the outcome and in `counts`, "socket" is `a`: `socket_to_stream` counts
/// the bytes from `a` to `b`, [`TunnelError::Socket`] is a failure of `a`.
pub async fn join_streams(
    a: H2Stream,
    a_first: Bytes,
    b: H2Stream,
    counts: &TunnelCounts,
) -> TunnelOutcome {
    let (mut ar, mut aw) = a.into_split();
    let (mut br, mut bw) = b.into_split();
    let (up, down) = (&counts.socket_to_stream, &counts.stream_to_socket);
    let error = {
        let ab = pin!(async {
            let mut first = (!a_first.is_empty()).then_some(a_first);
            loop {
                let chunk = match first.take() {
                    Some(c) => Some(c),
                    None => ar.recv_bytes().await.map_err(TunnelError::Socket)?,
                };
                let Some(chunk) = chunk else {
                    bw.shutdown().await.map_err(TunnelError::Stream)?;
                    return Ok(());
                };
                let n = chunk.len() as u64;
                bw.send_bytes(chunk).await.map_err(TunnelError::Stream)?;
                up.set(up.get() + n);
            }
        });
        let ba = pin!(async {
            loop {
                let Some(chunk) = br.recv_bytes().await.map_err(TunnelError::Stream)? else {
                    aw.shutdown().await.map_err(TunnelError::Socket)?;
                    return Ok(());
                };
                let n = chunk.len() as u64;
                aw.send_bytes(chunk).await.map_err(TunnelError::Socket)?;
                down.set(down.get() + n);
            }
        });
        first_error(ab, ba).await.err()
    };
    match &error {
        Some(TunnelError::Socket(_)) => bw.reset(Reason::CANCEL),
        Some(TunnelError::Stream(_)) => aw.reset(Reason::CONNECT_ERROR),
        None => {}
    }
    TunnelOutcome {
        socket_to_stream: up.get(),
        stream_to_socket: down.get(),
        error,
    }
}

/// Drive both futures; return the first error at once, or Ok when both finished.
async fn first_error<A, B, E>(a: A, b: B) -> Result<(), E>
where
    A: Future<Output = Result<(), E>>,
    B: Future<Output = Result<(), E>>,
{
    let mut a = pin!(a);
    let mut b = pin!(b);
    let (mut a_done, mut b_done) = (false, false);
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
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}
