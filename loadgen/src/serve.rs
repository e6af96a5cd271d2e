//! `zring-loadgen serve`: the targets the harness needs, so it needs nothing else.
//!
//! - `http`: HTTP/1.1 keep-alive; answers every request with `200` and a body of `?size=N` (or
//!   `--resp-size`) bytes, after `--delay` if set.
//! - `echo`: writes back every byte it reads (for tcp-rr / tcp-crr).
//! - `sink`: reads and discards (for tcp-stream).
//!
//! `GET /__zring-loadgen/stats` on the HTTP server answers `{"requests": N}`, the number of
//! requests it answered so far (that request not counted), so a client's count can be checked
//! against the server's.

use std::{
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::http;

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// HTTP/1.1 server.
    Http,
    /// TCP echo.
    Echo,
    /// TCP sink.
    Sink,
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Which server.
    pub kind: Kind,
    /// Default HTTP response body size.
    pub resp_size: usize,
    /// Delay before each HTTP response.
    pub delay: Duration,
}

/// Accept forever on `listener`.
pub async fn serve(listener: TcpListener, cfg: ServeConfig) -> io::Result<()> {
    let cfg = Arc::new(cfg);
    let served = Arc::new(AtomicU64::new(0));
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                eprintln!("zring-loadgen serve: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = conn.set_nodelay(true);
        let cfg = cfg.clone();
        let served = served.clone();
        tokio::spawn(async move {
            let r = match cfg.kind {
                Kind::Http => http_conn(conn, &cfg, &served).await,
                Kind::Echo => echo_conn(conn).await,
                Kind::Sink => sink_conn(conn).await,
            };
            if let Err(e) = r {
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::UnexpectedEof
                ) {
                    eprintln!("zring-loadgen serve: {peer}: {e}");
                }
            }
        });
    }
}

/// Bind and serve; prints the bound address on stdout first (so `--listen 127.0.0.1:0` works).
pub async fn run(listen: SocketAddr, cfg: ServeConfig) -> io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    serve(listener, cfg).await
}

async fn http_conn(mut conn: TcpStream, cfg: &ServeConfig, served: &AtomicU64) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut body = Vec::new();
    loop {
        let head = loop {
            match http::parse_request(&buf) {
                Ok(Some(h)) => break h,
                Ok(None) => {
                    if buf.len() > http::MAX_HEAD {
                        conn.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
                        return Ok(());
                    }
                    buf.reserve(16 * 1024);
                    if conn.read_buf(&mut buf).await? == 0 {
                        return Ok(());
                    }
                }
                Err(_) => {
                    conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
                    return Ok(());
                }
            }
        };
        let total = head.head_len + head.body_len;
        while buf.len() < total {
            buf.reserve(total - buf.len());
            if conn.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
        buf.drain(..total);
        if head.stats {
            let body = format!("{{\"requests\": {}}}\n", served.load(Ordering::Relaxed));
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(resp.as_bytes()).await?;
            if head.close {
                return Ok(());
            }
            continue;
        }
        if !cfg.delay.is_zero() {
            tokio::time::sleep(cfg.delay).await;
        }
        let size = head.size.unwrap_or(cfg.resp_size);
        let mut resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\n{}\r\n",
            if head.close { "Connection: close\r\n" } else { "" }
        )
        .into_bytes();
        if body.len() != size {
            body = vec![b'a'; size];
        }
        resp.extend_from_slice(&body);
        served.fetch_add(1, Ordering::Relaxed);
        conn.write_all(&resp).await?;
        if head.close {
            return Ok(());
        }
    }
}

async fn echo_conn(mut conn: TcpStream) -> io::Result<()> {
    let (mut r, mut w) = conn.split();
    tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await
}

async fn sink_conn(mut conn: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    while conn.read(&mut buf).await? > 0 {}
    Ok(())
}
