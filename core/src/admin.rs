//! The control-plane HTTP endpoints, on their own thread (a single-threaded tokio runtime) so
//! that a slow scrape never touches a data-path worker:
//!
//! - admin (default `127.0.0.1:15000`, keep it on localhost): `GET /config_dump` (workloads,
//!   services, policies, certificates with expiry, as JSON), `GET /logging` (the current
//!   filter), `POST /logging?level=FILTER` (e.g. `debug` or `zring_core=debug,info`),
//!   `POST /quitquitquit` (graceful shutdown, as SIGTERM).
//! - stats (default `0.0.0.0:15020`): `GET /metrics` and `GET /stats/prometheus`.
//! - readiness (default `0.0.0.0:15021`): `GET /healthz/ready`, 200 once the config and the
//!   local workloads' certificates are loaded and every worker listens, else 503 with the reason.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use zring_runtime::ShutdownTrigger;

use crate::logging;

/// What the endpoints read from the proxy they serve (so this module does not depend on it).
pub trait Source: Send + Sync + 'static {
    /// The Prometheus text exposition.
    fn metrics_text(&self) -> String;
    /// Why the proxy is not ready, or None when it is.
    fn not_ready(&self) -> Option<String>;
    /// `/config_dump` as JSON.
    fn config_dump(&self) -> String;
    /// A connection to `listener` was closed at once: too many in progress.
    fn rejected(&self, listener: &'static str);
}

/// Connections in progress per endpoint (each bounded by [`REQUEST_TIMEOUT`]); past it new ones
/// are closed at once and counted, so a flood of slow clients costs at most this many sockets.
pub const MAX_CONNECTIONS: usize = 128;
/// A client must send its request and take the answer within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

type State = dyn Source;

/// Which endpoint set a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `/config_dump`, `/logging`, `/quitquitquit`.
    Admin,
    /// `/metrics`.
    Stats,
    /// `/healthz/ready`.
    Readiness,
}

/// Bind every `(role, addr)` now (so errors surface at start) and serve them on a thread.
pub fn start(
    listeners: Vec<(Role, SocketAddr)>,
    state: Arc<dyn Source>,
    trigger: ShutdownTrigger,
) -> anyhow::Result<()> {
    let mut bound = Vec::new();
    for (role, addr) in listeners {
        let l = std::net::TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("binding the {role:?} endpoint on {addr}: {e}"))?;
        l.set_nonblocking(true)?;
        bound.push((role, l));
    }
    std::thread::Builder::new()
        .name("zring-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::error!(error = %e, "admin runtime failed to start"),
            };
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for (role, l) in bound {
                    let Ok(l) = TcpListener::from_std(l) else {
                        continue;
                    };
                    let (state, trigger) = (state.clone(), trigger.clone());
                    tasks.push(tokio::spawn(accept(role, l, state, trigger)));
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        })?;
    Ok(())
}

async fn accept(role: Role, l: TcpListener, state: Arc<dyn Source>, trigger: ShutdownTrigger) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let name = match role {
        Role::Admin => "admin",
        Role::Stats => "stats",
        Role::Readiness => "readiness",
    };
    loop {
        let Ok((conn, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            state.rejected(name);
            drop(conn);
            continue;
        }
        let (state, trigger, n) = (state.clone(), trigger.clone(), in_flight.clone());
        tokio::spawn(async move {
            // A client that never finishes its request is cut off.
            let _ =
                tokio::time::timeout(REQUEST_TIMEOUT, handle(role, conn, &*state, &trigger)).await;
            n.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
}

fn text(status: u16, body: impl Into<String>) -> Response {
    Response {
        status,
        content_type: "text/plain; charset=utf-8",
        body: body.into(),
    }
}

async fn handle(role: Role, mut conn: TcpStream, state: &State, trigger: &ShutdownTrigger) {
    let mut buf = Vec::with_capacity(1024);
    let (method, path) = loop {
        let mut chunk = [0u8; 1024];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                break (
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("").to_string(),
                )
            }
            Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => continue,
            _ => {
                let _ = write(&mut conn, text(400, "bad request\n")).await;
                return;
            }
        }
    };
    let (route, query) = path.split_once('?').unwrap_or((&path, ""));
    let resp = match (role, method.as_str(), route) {
        (Role::Stats, "GET", "/metrics" | "/stats/prometheus") => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: state.metrics_text(),
        },
        (Role::Readiness, "GET", "/healthz/ready") => match state.not_ready() {
            None => text(200, "ready\n"),
            Some(why) => text(503, format!("not ready: {why}\n")),
        },
        (Role::Admin, "GET", "/config_dump") => Response {
            status: 200,
            content_type: "application/json",
            body: state.config_dump(),
        },
        (Role::Admin, "GET", "/logging") => text(
            200,
            format!("current log filter: {}\n", logging::current_filter()),
        ),
        (Role::Admin, "POST", "/logging") => {
            let level = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("level="))
                .unwrap_or("");
            match logging::set_filter(level) {
                Ok(()) => {
                    tracing::info!(filter = level, "log filter changed through the admin port");
                    text(200, format!("log filter set to {level}\n"))
                }
                Err(e) => text(400, format!("{e}\n")),
            }
        }
        (Role::Admin, "POST", "/quitquitquit") => {
            tracing::info!("shutdown asked through the admin port");
            trigger.trigger();
            text(200, "shutting down\n")
        }
        (_, "GET" | "POST", _) => text(404, "not found\n"),
        _ => text(405, "method not allowed\n"),
    };
    let _ = write(&mut conn, resp).await;
}

async fn write(conn: &mut TcpStream, r: Response) -> std::io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(r.body.as_bytes()).await?;
    conn.shutdown().await
}
