//! `zring` with no arguments: a self-contained demo on loopback.
//!
//! Today it shows the data path that exists: an echo server, the splice relay in front of it on
//! 127.0.0.1:15001, and real traffic through it, described in plain words. It then keeps running
//! so you can send your own traffic (`nc 127.0.0.1 15001`). The node-proxy work turns this into a
//! two-node demo mesh.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use zring_runtime::{relay::RelayOptions, ShutdownTrigger, WorkerConfig};

use crate::relay_cmd::{self, RelayConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_DRAIN_TIMEOUT};

/// The demo relay's address.
pub const DEMO_LISTEN: &str = "127.0.0.1:15001";

/// Run the demo until Ctrl-C.
pub fn run(trigger: &ShutdownTrigger) -> anyhow::Result<()> {
    let echo = TcpListener::bind("127.0.0.1:0")?;
    let echo_addr = echo.local_addr()?;
    std::thread::Builder::new()
        .name("demo-echo".into())
        .spawn(move || echo_server(echo))?;
    let listen: SocketAddr = DEMO_LISTEN.parse()?;
    let cfg = RelayConfig {
        listen,
        to: echo_addr,
        relay: RelayOptions::default(),
        connect: zring_runtime::net::ConnectOptions {
            timeout: Some(DEFAULT_CONNECT_TIMEOUT),
            ..Default::default()
        },
        workers: WorkerConfig::default(),
        drain_timeout: DEFAULT_DRAIN_TIMEOUT,
    };
    std::thread::Builder::new()
        .name("demo-client".into())
        .spawn(move || {
            if let Err(e) = demo_traffic(listen) {
                eprintln!("demo traffic failed: {e}");
            }
        })?;
    relay_cmd::run(cfg, trigger)
}

fn echo_server(listener: TcpListener) {
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut conn = conn;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = conn.shutdown(Shutdown::Write);
        });
    }
}

fn demo_traffic(relay: SocketAddr) -> std::io::Result<()> {
    // Wait for the relay to listen.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut conn = loop {
        match TcpStream::connect(relay) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let total: usize = 256 << 20;
    let start = Instant::now();
    let mut reader = conn.try_clone()?;
    let rx = std::thread::spawn(move || -> std::io::Result<usize> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                return Ok(got);
            }
            got += n;
        }
    });
    let chunk = vec![0x5au8; 256 * 1024];
    let mut sent = 0;
    while sent < total {
        conn.write_all(&chunk)?;
        sent += chunk.len();
    }
    conn.shutdown(Shutdown::Write)?;
    let got = rx
        .join()
        .map_err(|_| std::io::Error::other("reader panicked"))??;
    let secs = start.elapsed().as_secs_f64();
    println!();
    println!(
        "zring demo: a client sent {} MiB to an echo server through the zring relay on {relay}",
        sent >> 20
    );
    println!("  path: client -> zring (splice, zero-copy) -> echo server -> zring -> client");
    println!(
        "  echoed back {} MiB in {:.2} s ({:.2} Gbit/s each way)",
        got >> 20,
        secs,
        (sent as f64 * 8.0) / secs / 1e9
    );
    println!("  the relay keeps running: try `echo hello | nc -q1 {relay}`; Ctrl-C stops it.");
    println!();
    Ok(())
}
