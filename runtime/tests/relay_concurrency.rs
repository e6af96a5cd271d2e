//! Many connections at once: all byte-exact, and no descriptor left behind.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNS: usize = 1000;
const PER_CONN: usize = 16 * 1024;

/// An echo upstream on tokio that handles any number of connections.
async fn echo_server() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn one_round(relay: std::net::SocketAddr) {
    let mut tasks = Vec::with_capacity(CONNS);
    // Open all connections first so they are really concurrent, then use them.
    let mut conns = Vec::with_capacity(CONNS);
    for _ in 0..CONNS {
        conns.push(
            tokio::net::TcpStream::connect(relay)
                .await
                .expect("connect through relay"),
        );
    }
    for (i, c) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut data = vec![0u8; PER_CONN];
            Pattern::new(i as u64 + 100).fill(&mut data);
            let (mut r, mut w) = c.into_split();
            let send = data.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&send).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut got = Vec::with_capacity(PER_CONN);
            r.read_to_end(&mut got).await.unwrap();
            writer.await.unwrap();
            assert!(
                got == data,
                "connection {i}: echoed bytes differ ({} of {PER_CONN} bytes)",
                got.len()
            );
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("round finished")
            .expect("task ok");
    }
}

#[test]
fn thousand_concurrent_connections_are_byte_exact_and_leak_no_fds() {
    init_tracing();
    zring_runtime::sys::raise_nofile_limit().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let up = rt.block_on(echo_server());
    for (backend, mode) in matrix() {
        let relay = RelayFixture::start(backend, mode, up);
        rt.block_on(one_round(relay.addr));
        let after_first = open_fds();
        rt.block_on(one_round(relay.addr));
        // Give the server side a moment to close its ends.
        std::thread::sleep(Duration::from_millis(200));
        let after_second = open_fds();
        let outcomes = relay.outcomes.clone();
        relay.stop();
        std::thread::sleep(Duration::from_millis(200));
        let after_stop = open_fds();
        let o = outcomes.lock().unwrap();
        assert_eq!(
            o.len(),
            2 * CONNS,
            "{backend}/{mode}: every connection relayed"
        );
        assert!(
            o.iter()
                .all(|o| o.error.is_none() && o.up == PER_CONN as u64 && o.down == PER_CONN as u64),
            "{backend}/{mode}: clean, counted relays"
        );
        // A second identical round must not grow the descriptor count: pooled pipes and buffers
        // are reused, nothing leaks per connection.
        assert!(
            after_second <= after_first + 8,
            "{backend}/{mode}: fds grew from {after_first} to {after_second}"
        );
        eprintln!("{backend}/{mode}: fds after round 1: {after_first}, round 2: {after_second}, after stop: {after_stop}");
    }
}
