//! A CONNECT stream as a byte stream (tokio `AsyncRead + AsyncWrite`).
//!
//! Reads release HTTP/2 flow-control capacity only as the application consumes bytes, so a slow
//! reader slows its writer; writes wait for window capacity, so a peer that never reads holds at
//! most one window plus h2's send buffer of this stream in memory.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest chunk handed to h2 per write: one max-size frame.
pub const MAX_WRITE_CHUNK: usize = 1024 * 1024;

/// Map an h2 error to the I/O error a socket would have shown.
pub fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = if e.is_go_away() {
        io::ErrorKind::ConnectionAborted
    } else if e.is_reset() || e.is_remote() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

/// The receiving half of a CONNECT stream.
#[derive(Debug)]
pub struct H2Reader {
    recv: RecvStream,
    buf: Bytes,
    eof: bool,
}

/// The sending half of a CONNECT stream.
#[derive(Debug)]
pub struct H2Writer {
    send: SendStream<Bytes>,
    finished: bool,
}

/// Both halves.
#[derive(Debug)]
pub struct H2Stream {
    /// Receiving half.
    pub reader: H2Reader,
    /// Sending half.
    pub writer: H2Writer,
}

impl H2Stream {
    /// Wrap the two h2 halves of one stream.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            reader: H2Reader {
                recv,
                buf: Bytes::new(),
                eof: false,
            },
            writer: H2Writer {
                send,
                finished: false,
            },
        }
    }

    /// Split into independently usable halves.
    pub fn into_split(self) -> (H2Reader, H2Writer) {
        (self.reader, self.writer)
    }
}

impl H2Writer {
    /// Send `data` without copying it: it is split into frames as flow-control capacity allows.
    pub async fn send_bytes(&mut self, mut data: Bytes) -> io::Result<()> {
        if self.finished {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "CONNECT stream already ended",
            ));
        }
        while !data.is_empty() {
            self.send.reserve_capacity(data.len().min(MAX_WRITE_CHUNK));
            let cap = std::future::poll_fn(|cx| self.send.poll_capacity(cx)).await;
            let n = match cap {
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "CONNECT stream closed",
                    ))
                }
                Some(Err(e)) => return Err(h2_to_io(e)),
                Some(Ok(n)) => n.min(data.len()),
            };
            if n > 0 {
                self.send
                    .send_data(data.split_to(n), false)
                    .map_err(h2_to_io)?;
            }
        }
        Ok(())
    }

    /// Abort the stream with RST_STREAM (CONNECT_ERROR is what RFC 9113 section 8.5 asks for
    /// when the TCP side was reset).
    pub fn reset(&mut self, reason: Reason) {
        self.finished = true;
        self.send.send_reset(reason);
    }
}

impl H2Reader {
    /// The next chunk of data as h2 received it (no copy), or `None` at END_STREAM. Its
    /// flow-control capacity is released when it is returned.
    pub async fn recv_bytes(&mut self) -> io::Result<Option<Bytes>> {
        if !self.buf.is_empty() {
            let b = std::mem::take(&mut self.buf);
            let _ = self.recv.flow_control().release_capacity(b.len());
            return Ok(Some(b));
        }
        if self.eof {
            return Ok(None);
        }
        loop {
            match self.recv.data().await {
                None => {
                    self.eof = true;
                    return Ok(None);
                }
                Some(Ok(b)) if b.is_empty() => continue,
                Some(Ok(b)) => {
                    let _ = self.recv.flow_control().release_capacity(b.len());
                    return Ok(Some(b));
                }
                Some(Err(e)) => return Err(h2_to_io(e)),
            }
        }
    }
}

impl AsyncRead for H2Reader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.buf.is_empty() {
                let n = self.buf.len().min(out.remaining());
                out.put_slice(&self.buf[..n]);
                self.buf.advance(n);
                // Give the window back only for what the application took.
                let _ = self.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                None => self.eof = true,
                Some(Ok(b)) => self.buf = b,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
    }
}

impl AsyncWrite for H2Writer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.finished {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "CONNECT stream already ended",
            )));
        }
        let want = buf.len().min(MAX_WRITE_CHUNK);
        self.send.reserve_capacity(want);
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "CONNECT stream closed",
                    )))
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(want);
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_to_io)?;
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.finished {
            self.finished = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, out)
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}
