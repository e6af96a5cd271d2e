//! HBONE micro benchmarks, in memory (tokio duplex pipes, no sockets):
//! - full mutual-TLS 1.3 + HTTP/2 handshakes per second;
//! - CONNECT stream opens per second on a warm connection;
//! - tunnel throughput of one CONNECT stream (bytes/s through TLS + HTTP/2 framing both ways).
//!
//! With zring's allocator, so buffers sit where they sit in the proxy (a relay's 256 KiB read
//! starts page-aligned; rustls' records 5 bytes into a page). `GLIBC_TUNABLES=
//! glibc.cpu.x86_rep_movsb_threshold=2112` (glibc 2.36's default on AMD) against `=1048576`
//! (what `zring` sets there) shows what glibc's `rep movsb` costs the tunnel (README,
//! "Performance").

use std::{net::SocketAddr, sync::Arc, time::Duration};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zring_hbone::{
    ca::LocalCa,
    client, server,
    tls::{self},
    H2Settings, SpiffeId, TokioLocal,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Fixture {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn fixture() -> Fixture {
    let ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let sid = SpiffeId::new("cluster.local", "default", "productpage").unwrap();
    let cid = SpiffeId::new("cluster.local", "default", "sleep").unwrap();
    let roots = vec![ca.root().clone()];
    Fixture {
        server: tls::server_config(&ca.issue(&sid, Duration::from_secs(3600)).unwrap(), &roots)
            .unwrap(),
        client: tls::client_config(
            &ca.issue(&cid, Duration::from_secs(3600)).unwrap(),
            &roots,
            vec![sid],
        )
        .unwrap(),
    }
}

const PIPE: usize = 4 * 1024 * 1024;
const TARGET: &str = "10.0.0.1:8080";

/// Server side of one connection: accept every CONNECT and echo its bytes back.
async fn serve_echo(io: tokio::io::DuplexStream, cfg: Arc<rustls::ServerConfig>) {
    let Ok(tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(io).await else {
        return;
    };
    let peer = tls::peer_identity(tls.get_ref().1);
    let _ = server::serve(
        tls,
        peer,
        &H2Settings::default(),
        TokioLocal,
        |i: server::Incoming| async move {
            let Ok(s) = i.accept() else { return };
            let (mut r, mut w) = s.into_split();
            while let Ok(Some(b)) = r.recv_bytes().await {
                if w.send_bytes(b).await.is_err() {
                    return;
                }
            }
            let _ = w.shutdown().await;
        },
        std::future::pending(),
    )
    .await;
}

async fn connect(f: &Fixture) -> h2::client::SendRequest<bytes::Bytes> {
    let (a, b) = tokio::io::duplex(PIPE);
    tokio::task::spawn_local(serve_echo(b, f.server.clone()));
    let tls = tokio_rustls::TlsConnector::from(f.client.clone())
        .connect(tls::server_name("10.0.0.1".parse().unwrap()), a)
        .await
        .unwrap();
    client::handshake(tls, &H2Settings::default(), &TokioLocal)
        .await
        .unwrap()
        .0
}

fn rt() -> (tokio::runtime::Runtime, tokio::task::LocalSet) {
    (
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        tokio::task::LocalSet::new(),
    )
}

fn handshakes(c: &mut Criterion) {
    let f = fixture();
    let (rt, local) = rt();
    let mut g = c.benchmark_group("hbone");
    g.throughput(Throughput::Elements(1));
    g.bench_function("mtls_h2_handshake", |b| {
        b.iter(|| local.block_on(&rt, async { drop(connect(&f).await) }));
    });
    g.finish();
}

fn stream_opens(c: &mut Criterion) {
    let f = fixture();
    let (rt, local) = rt();
    let send = local.block_on(&rt, connect(&f));
    let target: SocketAddr = TARGET.parse().unwrap();
    let mut g = c.benchmark_group("hbone");
    g.throughput(Throughput::Elements(1));
    g.bench_function("connect_stream_open_warm", |b| {
        b.iter(|| {
            local.block_on(&rt, async {
                drop(
                    client::open(&send, target, &Default::default())
                        .await
                        .unwrap(),
                )
            })
        });
    });
    g.finish();
}

fn throughput(c: &mut Criterion) {
    const LEN: usize = 16 << 20;
    let f = fixture();
    let (rt, local) = rt();
    let send = local.block_on(&rt, connect(&f));
    let target: SocketAddr = TARGET.parse().unwrap();
    let chunk = bytes::Bytes::from(vec![0x5au8; 256 * 1024]);
    let mut g = c.benchmark_group("hbone");
    g.throughput(Throughput::Bytes(2 * LEN as u64));
    g.sample_size(20);
    g.bench_function("tunnel_echo_16MiB", |b| {
        b.iter(|| {
            local.block_on(&rt, async {
                let s = client::open(&send, target, &Default::default())
                    .await
                    .unwrap();
                let (mut r, mut w) = s.into_split();
                let data = chunk.clone();
                let writer = tokio::task::spawn_local(async move {
                    for _ in 0..LEN / data.len() {
                        w.send_bytes(data.clone()).await.unwrap();
                    }
                    w.shutdown().await.unwrap();
                });
                let mut buf = vec![0u8; 256 * 1024];
                let mut got = 0;
                loop {
                    let n = r.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                writer.await.unwrap();
                assert_eq!(got, LEN);
            })
        });
    });
    g.finish();
}

criterion_group!(benches, handshakes, stream_opens, throughput);
criterion_main!(benches);
