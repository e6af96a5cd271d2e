//! Shared fixtures for the relay tests: a relay on one worker of a chosen backend, and
//! deterministic byte patterns that both ends can generate and check without storing them.
#![allow(dead_code)]

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use zring_runtime::{
    drain::Drain,
    net,
    relay::{RelayMode, RelayOptions, SpliceEngine},
    server, BackendChoice, IoBackend, RelayOutcome, ShutdownTrigger, WorkerConfig, Workers,
};

/// Every (backend, mode) combination the relay must pass on.
pub fn matrix() -> Vec<(BackendChoice, RelayMode)> {
    let mut out = Vec::new();
    for backend in [BackendChoice::Uring, BackendChoice::Epoll] {
        for mode in [
            RelayMode::Splice(SpliceEngine::Readiness),
            RelayMode::Copy { buffer: 64 * 1024 },
        ] {
            out.push((backend, mode));
        }
    }
    out
}

/// A relay on one worker, forwarding every connection to `upstream`.
pub struct RelayFixture {
    pub addr: SocketAddr,
    pub backend: IoBackend,
    trigger: ShutdownTrigger,
    join: Option<JoinHandle<()>>,
    pub outcomes: Arc<Mutex<Vec<RelayOutcomeSummary>>>,
}

/// What a finished relay reported (the error as text, since errors are not `Clone`).
#[derive(Debug, Clone)]
pub struct RelayOutcomeSummary {
    pub up: u64,
    pub down: u64,
    pub error: Option<String>,
}

impl From<&RelayOutcome> for RelayOutcomeSummary {
    fn from(o: &RelayOutcome) -> Self {
        Self {
            up: o.client_to_upstream,
            down: o.upstream_to_client,
            error: o.error.as_ref().map(|e| e.to_string()),
        }
    }
}

impl RelayFixture {
    pub fn start(backend: BackendChoice, mode: RelayMode, upstream: SocketAddr) -> Self {
        Self::start_with(
            backend,
            RelayOptions {
                mode,
                ..RelayOptions::default()
            },
            upstream,
        )
    }

    pub fn start_with(backend: BackendChoice, opts: RelayOptions, upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay listener");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let slot = Arc::new(Mutex::new(Some(listener)));
        let trigger = ShutdownTrigger::new();
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let cfg = WorkerConfig {
            workers: Some(1),
            io: backend,
            ..WorkerConfig::default()
        };
        let opts = Arc::new(opts);
        let out2 = outcomes.clone();
        let workers = Workers::start(&cfg, &trigger, move |ctx| {
            let slot = slot.clone();
            let opts = opts.clone();
            let outcomes = out2.clone();
            async move {
                let std = slot.lock().unwrap().take().expect("one worker");
                let listener = monoio::net::TcpListener::from_std(std)?;
                let drain = Drain::on_shutdown(ctx.shutdown);
                server::accept_loop(listener, &drain, |client, conn| {
                    let opts = opts.clone();
                    let outcomes = outcomes.clone();
                    server::spawn_tracked(&drain, conn, async move {
                        let upstream =
                            match net::connect(upstream, &net::ConnectOptions::default()).await {
                                Ok(u) => u,
                                Err(_) => {
                                    let _ = net::set_reset_on_close(&client);
                                    return;
                                }
                            };
                        let out = zring_runtime::relay(client, upstream, &opts).await;
                        outcomes.lock().unwrap().push((&out).into());
                    });
                })
                .await;
                drain.wait_idle(Duration::from_secs(5)).await;
                Ok::<(), io::Error>(())
            }
        })
        .expect("start worker");
        let backend = workers.backend();
        let join = std::thread::spawn(move || workers.join().expect("worker ok"));
        Self {
            addr,
            backend,
            trigger,
            join: Some(join),
            outcomes,
        }
    }

    /// Stop accepting, let connections finish, join the worker.
    pub fn stop(mut self) {
        self.trigger.trigger();
        if let Some(j) = self.join.take() {
            j.join().expect("worker thread");
        }
    }
}

impl Drop for RelayFixture {
    fn drop(&mut self) {
        self.trigger.trigger();
    }
}

/// xorshift64* byte stream: cheap, deterministic, and different for every seed.
pub struct Pattern {
    state: u64,
    word: [u8; 8],
    pos: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            word: [0; 8],
            pos: 8,
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.pos == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.word = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                self.pos = 0;
            }
            *b = self.word[self.pos];
            self.pos += 1;
        }
    }
}

/// Write `len` bytes of pattern `seed`.
pub fn send_pattern(w: &mut impl Write, seed: u64, len: u64) -> io::Result<()> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Read to EOF, checking every byte against pattern `seed`; returns the byte count. Fails on the
/// first mismatching byte or if more than `expect` bytes arrive.
pub fn recv_pattern(r: &mut impl Read, seed: u64, expect: u64) -> io::Result<u64> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut want = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(got);
        }
        if got + n as u64 > expect {
            return Err(io::Error::other(format!(
                "more bytes than sent: {} > {expect}",
                got + n as u64
            )));
        }
        p.fill(&mut want[..n]);
        if buf[..n] != want[..n] {
            let off = buf[..n]
                .iter()
                .zip(&want[..n])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(io::Error::other(format!(
                "byte {} differs",
                got + off as u64
            )));
        }
        got += n as u64;
    }
}

/// An upstream that, per connection, checks pattern `seed_in` for `len` bytes while sending
/// pattern `seed_out` of `len` bytes, then half-closes. Returns its address and a handle that
/// yields the byte counts it verified.
pub fn pattern_server(
    len: u64,
    seed_in: u64,
    seed_out: u64,
) -> (SocketAddr, JoinHandle<io::Result<u64>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let h = std::thread::spawn(move || {
        let (conn, _) = listener.accept()?;
        let mut w = conn.try_clone()?;
        let tx = std::thread::spawn(move || -> io::Result<()> {
            send_pattern(&mut w, seed_out, len)?;
            w.shutdown(std::net::Shutdown::Write)
        });
        let mut r = conn;
        let got = recv_pattern(&mut r, seed_in, len)?;
        tx.join()
            .map_err(|_| io::Error::other("sender panicked"))??;
        Ok(got)
    });
    (addr, h)
}

/// Connect to `addr`, send pattern `seed_out` of `len` bytes and half-close, while checking the
/// reply against pattern `seed_in`. Returns the verified reply length.
pub fn pattern_client(addr: SocketAddr, len: u64, seed_out: u64, seed_in: u64) -> io::Result<u64> {
    let conn = TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = conn.try_clone()?;
    let tx = std::thread::spawn(move || -> io::Result<()> {
        send_pattern(&mut w, seed_out, len)?;
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut r = conn;
    let got = recv_pattern(&mut r, seed_in, len)?;
    tx.join()
        .map_err(|_| io::Error::other("sender panicked"))??;
    Ok(got)
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
