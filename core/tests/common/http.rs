//! A real HTTP server for waypoint tests (hyper on a tokio thread, HTTP/1.1 and h2c on the same
//! port): each answer names the server, so tests see which endpoint served a request.
//!
//! - `/echo` (any method): the request body back, streamed, with `x-served-by`;
//! - `/big?n=N`: N bytes of a repeating pattern;
//! - `/headers`: the request's headers, a `name: value` line each, and `x-internal: upstream`;
//! - `/sink` (any method): reads the whole body, answers `<name> <length>`;
//! - `/slow?ms=N`: the usual answer, its head sent after N milliseconds;
//! - `/fail?NAME=CODE`: the usual answer, with status CODE from the server called NAME;
//! - `/grpc.Echo/Stream` (h2): each request frame echoed back as it arrives, then trailers
//!   `grpc-status: 0`;
//! - an `Upgrade: websocket` request: 101, then every byte echoed;
//! - anything else: `<name> <method> <path>`.
//!
//! Every server keeps what it was asked ([`seen`]): method, authority, path, and for `/sink`
//! the body's length and checksum.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo};

type Body = Pin<Box<dyn hyper::body::Body<Data = Bytes, Error = hyper::Error> + Send>>;

fn full(b: impl Into<Bytes>) -> Body {
    Box::pin(Full::new(b.into()).map_err(|e: Infallible| match e {}))
}

/// The pattern `/big` sends: byte i is `i % 251`.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// A request as a test server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    /// The URI's authority (h2), else `Host`.
    pub authority: String,
    /// Path and query.
    pub path: String,
    /// `/sink`: the body's length and FNV-1a checksum.
    pub body: Option<(usize, u64)>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

static SEEN: Mutex<Vec<(SocketAddr, Log)>> = Mutex::new(Vec::new());

/// What the server on `addr` was asked so far, in order of arrival.
pub fn seen(addr: SocketAddr) -> Vec<Seen> {
    let all = SEEN.lock().unwrap();
    all.iter()
        .find(|(a, _)| *a == addr)
        .map(|(_, l)| l.lock().unwrap().clone())
        .unwrap_or_default()
}

/// FNV-1a of `b`.
pub fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x100000001b3)
    })
}

async fn serve(
    name: String,
    log: Log,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let mut seen = Seen {
        method: req.method().to_string(),
        authority: req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                req.headers()
                    .get("host")
                    .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            })
            .unwrap_or_default(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| path.clone(), |p| p.to_string()),
        body: None,
    };
    if path == "/sink" {
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return Ok(Response::new(full("cut"))),
        };
        seen.body = Some((body.len(), checksum(&body)));
        log.lock().unwrap().push(seen);
        let mut r = Response::new(full(format!("{name} {}", body.len())));
        r.headers_mut().insert("x-served-by", name.parse().unwrap());
        return Ok(r);
    }
    log.lock().unwrap().push(seen);
    let resp = |b: Body| {
        let mut r = Response::new(b);
        r.headers_mut().insert("x-served-by", name.parse().unwrap());
        r
    };
    if req.headers().get("upgrade").is_some() {
        let up = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(u) = up.await {
                let mut io = TokioIo::new(u);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut r = resp(full(Bytes::new()));
        *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        r.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        return Ok(r);
    }
    if path == "/echo" || path.starts_with("/grpc.") {
        let grpc = path.starts_with("/grpc.");
        let body = req.into_body();
        let frames = futures_stream(body, grpc);
        let mut r = resp(Box::pin(StreamBody::new(frames)));
        if grpc {
            r.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
        }
        return Ok(r);
    }
    // The number a query like `n=5` gives (0 when absent or malformed).
    let number = |key: &str| -> u64 {
        req.uri()
            .query()
            .and_then(|q| q.strip_prefix(key)?.strip_prefix('='))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    if path == "/headers" {
        // The request's headers as received, one `name: value` line each, in order; and a
        // header of the server's own that a route may remove.
        let mut text = String::new();
        for (k, v) in req.headers() {
            text += &format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes()));
        }
        let mut r = resp(full(text));
        r.headers_mut()
            .insert("x-internal", "upstream".parse().unwrap());
        return Ok(r);
    }
    if path == "/big" {
        return Ok(resp(full(pattern(number("n") as usize))));
    }
    if path == "/slow" {
        tokio::time::sleep(std::time::Duration::from_millis(number("ms"))).await;
    }
    let mut r = resp(full(format!("{name} {} {path}", req.method())));
    if path == "/fail" {
        // `/fail?<name>=<code>`: the server called <name> answers <code>; others as usual.
        if let Some(code) = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix(name.as_str())?.strip_prefix('='))
            .and_then(|c| hyper::StatusCode::from_bytes(c.as_bytes()).ok())
        {
            *r.status_mut() = code;
        }
    }
    Ok(r)
}

/// Echo each data frame; for gRPC end with `grpc-status: 0` trailers.
fn futures_stream(
    body: Incoming,
    grpc: bool,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, hyper::Error>> + Send {
    futures_util::stream::unfold((body, false), move |(mut body, done)| async move {
        if done {
            return None;
        }
        loop {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        return Some((Ok(Frame::data(d)), (body, false)));
                    }
                }
                Some(Err(e)) => return Some((Err(e), (body, true))),
                None if grpc => {
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", "0".parse().unwrap());
                    return Some((Ok(Frame::trailers(t)), (body, true)));
                }
                None => return None,
            }
        }
    })
}

/// Serve on `addr` (HTTP/1.1 with upgrades, or h2c prior knowledge) until the process ends.
pub fn server(addr: SocketAddr, name: &str) {
    let std = std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    std.set_nonblocking(true).unwrap();
    let name = name.to_string();
    let log = Log::default();
    SEEN.lock().unwrap().push((addr, log.clone()));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(std).unwrap();
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let name = name.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let mut first = [0u8; 3];
                    let h2 = matches!(s.peek(&mut first).await, Ok(3) if &first == b"PRI");
                    let svc =
                        hyper::service::service_fn(move |r| serve(name.clone(), log.clone(), r));
                    let io = TokioIo::new(s);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .with_upgrades()
                            .await;
                    }
                });
            }
        });
    });
}
