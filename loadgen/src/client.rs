//! The load loop: one task per connection, open or closed loop.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, SystemTime},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant as TokioInstant,
};

use crate::{
    config::{Rate, Target},
    http,
    stats::{ErrorKind, Live, TaskResult},
};

/// How long requests still in flight at the end of the run may take to finish.
pub const END_GRACE: Duration = Duration::from_millis(500);

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Mode {
    /// HTTP/1.1 requests on keep-alive connections.
    Http,
    /// Request/response of `--req-size` bytes over a persistent connection to an echo server;
    /// every echoed byte is checked.
    TcpRr,
    /// Like tcp-rr, but a new connection for every request: measures connection set-up.
    TcpCrr,
    /// Bulk send for the whole duration (like iperf3): measures throughput.
    TcpStream,
}

/// A whole run's settings.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// What to generate.
    pub mode: Mode,
    /// Where.
    pub target: Target,
    /// Open loop at a rate, or closed loop.
    pub rate: Rate,
    /// Concurrent connections.
    pub connections: usize,
    /// Measured time (a hard bound: no request starts after it).
    pub duration: Duration,
    /// Load before measuring, discarded.
    pub warmup: Duration,
    /// Request bytes (tcp modes; HTTP body when > 0).
    pub req_size: usize,
    /// Response bytes the server is asked for (tcp-rr/crr read this many; HTTP adds `?size=`).
    pub resp_size: usize,
    /// Poisson arrivals instead of evenly spaced ones (open loop).
    pub jitter: bool,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Go through this SOCKS5 proxy.
    pub socks5: Option<SocketAddr>,
    /// Source address of every connection (port 0 = any), like `curl --interface`.
    pub bind: Option<std::net::IpAddr>,
}

/// The merged outcome of a run.
#[derive(Debug)]
pub struct RunOutcome {
    /// Wall-clock start of the measured window.
    pub start_time: SystemTime,
    /// Length of the measured window actually run.
    pub actual: Duration,
    /// Merged per-task results.
    pub merged: TaskResult,
    /// Live counters (completed, bytes, errors).
    pub live: Arc<Live>,
}

/// A progress callback: elapsed measured time and the live counters.
pub type Progress = Box<dyn Fn(Duration, &Live) + Send + Sync>;

/// Run the load. `progress` is called about once a second with the live counters.
pub async fn run(cfg: RunConfig, progress: Option<Progress>) -> RunOutcome {
    let live = Arc::new(Live::default());
    if progress.is_some() {
        *live.interval.lock().unwrap_or_else(|p| p.into_inner()) = Some(crate::stats::histogram());
    }
    let cfg = Arc::new(cfg);
    let t0 = TokioInstant::now() + Duration::from_millis(20);
    let measure_from = t0 + cfg.warmup;
    let end = measure_from + cfg.duration;
    let mut tasks = Vec::with_capacity(cfg.connections);
    for i in 0..cfg.connections {
        let cfg = cfg.clone();
        let live = live.clone();
        tasks.push(tokio::spawn(async move {
            conn_task(i, &cfg, &live, t0, measure_from, end).await
        }));
    }
    let ticker = progress.map(|p| {
        let live = live.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(
                measure_from + Duration::from_secs(1),
                Duration::from_secs(1),
            );
            loop {
                let now = tick.tick().await;
                if now > end {
                    break;
                }
                p(now.saturating_duration_since(measure_from), &live);
            }
        })
    });
    let start_time =
        SystemTime::now() + measure_from.saturating_duration_since(TokioInstant::now());
    let mut merged = TaskResult::new();
    for t in tasks {
        if let Ok(r) = t.await {
            let _ = merged.hist.add(&r.hist);
            for (code, n) in r.codes {
                *merged.codes.entry(code).or_default() += n;
            }
            merged.sockets += r.sockets;
        }
    }
    if let Some(t) = ticker {
        t.abort();
    }
    let actual = TokioInstant::now()
        .min(end)
        .saturating_duration_since(measure_from);
    RunOutcome {
        start_time,
        actual: actual.max(Duration::from_micros(1)),
        merged,
        live,
    }
}

/// Tiny xorshift PRNG for jitter and payloads: deterministic per connection, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

async fn conn_task(
    index: usize,
    cfg: &RunConfig,
    live: &Live,
    t0: TokioInstant,
    measure_from: TokioInstant,
    end: TokioInstant,
) -> TaskResult {
    let mut res = TaskResult::new();
    let mut rng =
        Rng(0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(16 * 1024);
    let http_req = http::request(
        &cfg.target.host,
        &http_path(cfg),
        if cfg.mode == Mode::Http {
            cfg.req_size
        } else {
            0
        },
    );
    let mut payload = vec![0u8; cfg.req_size.max(1)];
    let interval = match cfg.rate {
        Rate::Fixed(r) => Some(Duration::from_secs_f64(cfg.connections as f64 / r)),
        Rate::Max => None,
    };
    // Stagger connections evenly over one interval so the aggregate is smooth.
    let mut next = match (cfg.rate, interval) {
        (Rate::Fixed(r), Some(_)) => t0 + Duration::from_secs_f64(index as f64 / r),
        _ => t0,
    };
    let mut prev_done = t0;
    let mut pacer = crate::pace::Pacer::new();
    // Set when the target has put this connection behind its schedule (a request took longer
    // than one interval); cleared once the connection is back on schedule.
    let mut behind = false;
    if cfg.mode == Mode::TcpStream {
        stream_task(cfg, live, &mut res, measure_from, end).await;
        return res;
    }
    loop {
        let intended = match interval {
            Some(iv) => {
                if next >= end {
                    break;
                }
                pacer.until(next).await;
                let this = next;
                next += if cfg.jitter {
                    iv.mul_f64(-rng.unit().ln())
                } else {
                    iv
                };
                this
            }
            None => {
                let now = TokioInstant::now();
                if now < t0 {
                    tokio::time::sleep_until(t0).await;
                    continue;
                }
                if now >= end {
                    break;
                }
                now
            }
        };
        let measured = intended >= measure_from;
        // Where latency is counted from. If the target put this connection behind schedule (a
        // request took longer than an interval and the connection was still busy at this
        // request's intended time), the target delayed this one: count from the intended time
        // (coordinated-omission correction), for every request until the connection catches
        // up. Otherwise any gap between the intended and the actual send is our own timer's
        // lateness (tens of microseconds with the pacer's timerfd; up to 1 ms with tokio's
        // timer, its fallback), which is not the target's: count from the actual send.
        let sent = TokioInstant::now();
        if prev_done <= intended {
            behind = false;
        }
        let from = if behind { intended } else { sent };
        // A request may not outlive the run by more than a short grace period; one cut short
        // by the end of the run is incomplete, not a timeout.
        let req_deadline = TokioInstant::now() + cfg.timeout;
        let run_deadline = end + END_GRACE;
        let outcome = tokio::time::timeout_at(
            req_deadline.min(run_deadline),
            one_request(
                cfg,
                &mut conn,
                &mut res,
                &http_req,
                &mut payload,
                &mut buf,
                &mut rng,
            ),
        )
        .await;
        let done = TokioInstant::now();
        prev_done = done;
        if interval.is_some_and(|iv| done.saturating_duration_since(sent) > iv) {
            behind = true;
        }
        match outcome {
            Ok(Ok(bytes)) => {
                if measured {
                    let us = done.saturating_duration_since(from).as_micros() as u64;
                    let _ = res.hist.record(us.clamp(1, crate::stats::MAX_LATENCY_US));
                    live.completed.fetch_add(1, Ordering::Relaxed);
                    live.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                    if let Ok(mut iv) = live.interval.try_lock() {
                        if let Some(h) = iv.as_mut() {
                            let _ = h.record(us.clamp(1, crate::stats::MAX_LATENCY_US));
                        }
                    }
                }
                if cfg.mode == Mode::TcpCrr {
                    conn = None;
                }
            }
            Ok(Err(kind)) => {
                conn = None;
                if measured {
                    live.error(kind);
                }
                if interval.is_none() {
                    // Closed loop: do not spin on a target that refuses.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Err(_) => {
                conn = None;
                if measured && req_deadline <= run_deadline {
                    live.error(ErrorKind::Timeout);
                }
            }
        }
    }
    res
}

fn http_path(cfg: &RunConfig) -> String {
    if cfg.resp_size == 0 || cfg.target.path.contains("size=") {
        return cfg.target.path.clone();
    }
    let sep = if cfg.target.path.contains('?') {
        '&'
    } else {
        '?'
    };
    format!("{}{sep}size={}", cfg.target.path, cfg.resp_size)
}

/// The next source port to try for `--bind` (shared by every connection of the process).
static NEXT_PORT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Connect from `ip`. The source port is picked here, round robin over 20000..60000, not by
/// bind(port 0): the kernel picks a port at bind() before it knows the destination and skips
/// every port a TIME_WAIT connection holds, which makes a connection-per-request run slow
/// (a scan per bind) and then fail. With SO_REUSEADDR an explicit port is reused as soon as
/// its 4-tuple is free.
async fn connect_from(ip: std::net::IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let mut last = None;
    for _ in 0..16 {
        let n = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20000 + (n % 40000) as u16;
        let sock = if target.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }?;
        sock.set_reuseaddr(true)?;
        if let Err(e) = sock.bind(SocketAddr::new(ip, port)) {
            last = Some(e);
            continue;
        }
        match sock.connect(target).await {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no source port available")))
}

async fn connect(cfg: &RunConfig, res: &mut TaskResult) -> Result<TcpStream, ErrorKind> {
    let target = cfg.socks5.unwrap_or(cfg.target.addr);
    let mut s = match cfg.bind {
        None => TcpStream::connect(target).await,
        Some(ip) => connect_from(ip, target).await,
    }
    .map_err(|e| ErrorKind::of(&e))?;
    let _ = s.set_nodelay(true);
    if cfg.socks5.is_some() {
        crate::socks5::handshake(&mut s, cfg.target.addr)
            .await
            .map_err(|e| ErrorKind::of(&e))?;
    }
    res.sockets += 1;
    Ok(s)
}

async fn one_request(
    cfg: &RunConfig,
    conn: &mut Option<TcpStream>,
    res: &mut TaskResult,
    http_req: &[u8],
    payload: &mut [u8],
    buf: &mut Vec<u8>,
    rng: &mut Rng,
) -> Result<usize, ErrorKind> {
    if conn.is_none() {
        *conn = Some(connect(cfg, res).await?);
    }
    let Some(s) = conn.as_mut() else {
        return Err(ErrorKind::Other);
    };
    match cfg.mode {
        Mode::Http => {
            s.write_all(http_req).await.map_err(|e| ErrorKind::of(&e))?;
            let resp = http::read_response(s, buf).await.map_err(|e| match e {
                http::ReadError::Io(e) => ErrorKind::of(&e),
                http::ReadError::Bad(_) => ErrorKind::BadResponse,
            })?;
            *res.codes.entry(resp.status).or_default() += 1;
            if resp.close {
                *conn = None;
            }
            Ok(http_req.len() + resp.bytes)
        }
        Mode::TcpRr | Mode::TcpCrr => {
            // A fresh pattern per request, so a stale or misrouted echo cannot pass the check.
            let seed = rng.next();
            for (i, b) in payload.iter_mut().enumerate() {
                *b = (seed >> ((i % 8) * 8)) as u8 ^ (i as u8);
            }
            let n = cfg.req_size;
            s.write_all(&payload[..n])
                .await
                .map_err(|e| ErrorKind::of(&e))?;
            buf.clear();
            buf.resize(n, 0);
            s.read_exact(&mut buf[..n])
                .await
                .map_err(|e| ErrorKind::of(&e))?;
            if buf[..n] != payload[..n] {
                return Err(ErrorKind::BadResponse);
            }
            Ok(2 * n)
        }
        Mode::TcpStream => Err(ErrorKind::Other),
    }
}

async fn stream_task(
    cfg: &RunConfig,
    live: &Live,
    res: &mut TaskResult,
    measure_from: TokioInstant,
    end: TokioInstant,
) {
    let chunk = vec![0x5au8; cfg.req_size.max(128 * 1024)];
    while TokioInstant::now() < end {
        let mut s = match connect(cfg, res).await {
            Ok(s) => s,
            Err(kind) => {
                if TokioInstant::now() >= measure_from {
                    live.error(kind);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        loop {
            let now = TokioInstant::now();
            if now >= end {
                let _ = s.shutdown().await;
                return;
            }
            match tokio::time::timeout_at(end, s.write(&chunk)).await {
                Ok(Ok(n)) => {
                    if TokioInstant::now() >= measure_from {
                        live.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
                Ok(Err(e)) => {
                    live.error(ErrorKind::of(&e));
                    break;
                }
                Err(_) => return,
            }
        }
    }
}
