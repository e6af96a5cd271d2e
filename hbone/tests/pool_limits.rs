//! The pool: streams per connection, one dial per key, retirement after GOAWAY.

mod common;

use std::{
    cell::Cell, future::Future, io, net::SocketAddr, pin::Pin, rc::Rc, sync::Arc, time::Duration,
};

use common::*;
use zring_hbone::{
    pool::{Dialer, Pool, PoolKey, PoolSettings},
    H2Settings, TokioLocal,
};

struct TlsDialer {
    cfg: Arc<rustls::ClientConfig>,
    dials: Rc<Cell<u32>>,
}

impl Dialer for TlsDialer {
    type Io = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;
    fn dial(&self, key: &PoolKey) -> Pin<Box<dyn Future<Output = io::Result<Self::Io>>>> {
        self.dials.set(self.dials.get() + 1);
        let (addr, cfg) = (key.dst, self.cfg.clone());
        Box::pin(async move {
            // A slow dial, so concurrent first users really overlap with it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            dial_tls(addr, cfg).await
        })
    }
}

/// A target that holds every connection open until the client closes it.
async fn hold_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::task::spawn_local(async move {
        loop {
            let Ok((mut c, _)) = l.accept().await else {
                return;
            };
            tokio::task::spawn_local(async move {
                let mut b = [0u8; 64];
                let _ = tokio::io::AsyncReadExt::read(&mut c, &mut b).await;
            });
        }
    });
    a
}

async fn setup() -> (
    Pool<TlsDialer, TokioLocal>,
    PoolKey,
    Rc<Cell<u32>>,
    SocketAddr,
) {
    let (pool, key, dials, target, _srv) = setup_with(PoolSettings::default()).await;
    (pool, key, dials, target)
}

async fn setup_with(
    settings: PoolSettings,
) -> (
    Pool<TlsDialer, TokioLocal>,
    PoolKey,
    Rc<Cell<u32>>,
    SocketAddr,
    HboneServer,
) {
    let mesh = Mesh::new();
    let (client_id, server_id) = (id("default", "sleep"), id("default", "productpage"));
    let srv = hbone_server(
        mesh.server_config(&server_id),
        H2Settings::default(),
        relay_handler(),
    )
    .await;
    let dials = Rc::new(Cell::new(0));
    let dialer = TlsDialer {
        cfg: mesh.client_config(&client_id, &server_id),
        dials: dials.clone(),
    };
    let pool = Pool::new(dialer, TokioLocal, settings);
    let key = PoolKey {
        src_id: client_id,
        dst_id: server_id,
        src_ip: "127.0.0.1".parse().unwrap(),
        dst: srv.addr,
    };
    (pool, key, dials, hold_server().await, srv)
}

#[test]
fn five_hundred_concurrent_streams_use_exactly_five_connections() {
    run_local(async {
        let (pool, key, dials, target) = setup().await;
        let mut tasks = Vec::new();
        for _ in 0..500 {
            let (pool, key) = (pool.clone(), key.clone());
            // Each task returns its stream, which keeps its slot until the test drops it.
            tasks.push(tokio::task::spawn_local(async move {
                pool.connect(&key, target, &Default::default()).await
            }));
        }
        let mut streams_per_conn = std::collections::HashMap::new();
        let mut held = Vec::new();
        for t in tasks {
            let s = t.await.unwrap().expect("stream");
            *streams_per_conn.entry(s.connection_id).or_insert(0) += 1;
            held.push(s);
        }
        assert_eq!(dials.get(), 5, "dials");
        assert_eq!(streams_per_conn.len(), 5, "connections");
        assert!(
            streams_per_conn.values().all(|&n| n == 100),
            "{streams_per_conn:?}"
        );
    });
}

#[test]
fn fifty_concurrent_first_uses_make_exactly_one_dial() {
    run_local(async {
        let (pool, key, dials, target) = setup().await;
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (pool, key) = (pool.clone(), key.clone());
            tasks.push(tokio::task::spawn_local(async move {
                pool.connect(&key, target, &Default::default())
                    .await
                    .map(|s| s.connection_id)
            }));
        }
        let mut ids = std::collections::HashSet::new();
        for t in tasks {
            ids.insert(t.await.unwrap().expect("stream"));
        }
        assert_eq!(dials.get(), 1);
        assert_eq!(ids.len(), 1);
        assert_eq!(pool.stats().dials, 1);
    });
}

#[test]
fn a_failed_dial_fails_every_waiter_without_redialing() {
    run_local(async {
        let mesh = Mesh::new();
        let dials = Rc::new(Cell::new(0));
        let dialer = TlsDialer {
            cfg: mesh.client_config(&id("default", "sleep"), &id("default", "productpage")),
            dials: dials.clone(),
        };
        let pool = Pool::new(dialer, TokioLocal, PoolSettings::default());
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let key = PoolKey {
            src_id: id("default", "sleep"),
            dst_id: id("default", "productpage"),
            src_ip: "127.0.0.1".parse().unwrap(),
            dst: dead,
        };
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (pool, key) = (pool.clone(), key.clone());
            tasks.push(tokio::task::spawn_local(async move {
                pool.connect(&key, dead, &Default::default()).await.is_err()
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap(), "every waiter sees the failure");
        }
        assert_eq!(dials.get(), 1);
    });
}

#[test]
fn idle_connections_are_released_and_the_next_stream_dials_afresh() {
    run_local(async {
        let settings = PoolSettings {
            idle_timeout: Duration::from_millis(100),
            ..Default::default()
        };
        let (pool, key, dials, target, _srv) = setup_with(settings).await;
        let s = pool
            .connect(&key, target, &Default::default())
            .await
            .unwrap();
        drop(s);
        let s = pool
            .connect(&key, target, &Default::default())
            .await
            .unwrap();
        assert_eq!(dials.get(), 1, "a warm connection is reused");
        drop(s);
        assert_eq!(pool.stats().connections, 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        pool.sweep_all();
        assert_eq!(pool.stats().connections, 0, "idle connection released");
        let _s = pool
            .connect(&key, target, &Default::default())
            .await
            .unwrap();
        assert_eq!(dials.get(), 2);
    });
}

#[test]
fn a_bursts_spare_connections_close_sooner_and_one_stays_warm() {
    run_local(async {
        let settings = PoolSettings {
            h2: H2Settings {
                max_streams: 2,
                ..Default::default()
            },
            idle_timeout: Duration::from_millis(1500),
            spare_idle_timeout: Duration::from_millis(100),
        };
        let (pool, key, dials, target, _srv) = setup_with(settings).await;
        // A burst: 6 streams at 2 per connection take 3 connections.
        let mut burst = Vec::new();
        for _ in 0..6 {
            burst.push(
                pool.connect(&key, target, &Default::default())
                    .await
                    .unwrap(),
            );
        }
        assert_eq!((dials.get(), pool.stats().connections), (3, 3));
        let oldest = burst[0].connection_id;
        // One connection keeps a stream: it is busy, not a spare.
        let kept = burst.pop().unwrap();
        assert_ne!(kept.connection_id, oldest);
        drop(burst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        pool.sweep_all();
        assert_eq!(
            pool.stats().connections,
            2,
            "the busy connection and one warm idle one stay; the other spare closed"
        );
        drop(kept);
        tokio::time::sleep(Duration::from_millis(300)).await;
        pool.sweep_all();
        assert_eq!(
            pool.stats().connections,
            1,
            "of two idle connections, only one stays warm"
        );
        // The warm one is the oldest (not the one used last): it serves the next stream
        // without a dial, then closes after idle_timeout.
        let next = pool
            .connect(&key, target, &Default::default())
            .await
            .unwrap();
        assert_eq!(
            next.connection_id, oldest,
            "the oldest connection stays warm"
        );
        drop(next);
        assert_eq!(dials.get(), 3, "the warm connection is reused");
        tokio::time::sleep(Duration::from_millis(1700)).await;
        pool.sweep_all();
        assert_eq!(
            pool.stats().connections,
            0,
            "the warm one closes after idle_timeout"
        );
    });
}

#[test]
fn goaway_retires_the_connection_and_new_streams_dial_afresh() {
    run_local(async {
        let (pool, key, dials, target, srv) = setup_with(PoolSettings::default()).await;
        let first = pool
            .connect(&key, target, &Default::default())
            .await
            .unwrap();
        srv.shutdown.notify_waiters();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = pool
            .connect(&key, target, &Default::default())
            .await
            .unwrap();
        assert_ne!(
            first.connection_id, second.connection_id,
            "a GOAWAY'd connection takes no new streams"
        );
        assert_eq!(dials.get(), 2);
    });
}

/// A dialer whose dials never finish (a peer that accepts TCP and never answers TLS).
struct StuckDialer {
    dials: Rc<Cell<u32>>,
}

impl Dialer for StuckDialer {
    type Io = tokio::net::TcpStream;
    fn dial(&self, _key: &PoolKey) -> Pin<Box<dyn Future<Output = io::Result<Self::Io>>>> {
        self.dials.set(self.dials.get() + 1);
        Box::pin(std::future::pending())
    }
}

#[test]
fn a_cancelled_dial_releases_its_waiters_and_the_next_connection_dials_afresh() {
    run_local(async {
        let dials = Rc::new(Cell::new(0));
        let pool = Pool::new(
            StuckDialer {
                dials: dials.clone(),
            },
            TokioLocal,
            PoolSettings::default(),
        );
        let key = PoolKey {
            src_id: id("default", "sleep"),
            dst_id: id("default", "productpage"),
            src_ip: "127.0.0.1".parse().unwrap(),
            dst: "127.0.0.1:15008".parse().unwrap(),
        };
        let target: SocketAddr = "127.0.0.1:9080".parse().unwrap();
        // The first connection dials; ten more wait behind it.
        let (p, k) = (pool.clone(), key.clone());
        let dialing = tokio::task::spawn_local(async move {
            let _ = p.connect(&k, target, &Default::default()).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let waiters: Vec<_> = (0..10)
            .map(|_| {
                let (p, k) = (pool.clone(), key.clone());
                tokio::task::spawn_local(async move {
                    p.connect(&k, target, &Default::default()).await.err()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            dials.get(),
            1,
            "waiters must not dial while one dial is in flight"
        );
        // The dialing task is dropped (as at a pod's drain deadline): every waiter is released
        // with an error at once, none hangs.
        dialing.abort();
        for w in waiters {
            let err = tokio::time::timeout(Duration::from_secs(1), w)
                .await
                .expect("a waiter hung after its dial was cancelled")
                .unwrap()
                .expect("a waiter got a stream from a cancelled dial");
            assert!(err.to_string().contains("cancelled"), "{err}");
        }
        // The key is free: the next connection dials afresh.
        let (p, k) = (pool.clone(), key.clone());
        let next = tokio::task::spawn_local(async move {
            let _ = p.connect(&k, target, &Default::default()).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(dials.get(), 2);
        next.abort();
    });
}
