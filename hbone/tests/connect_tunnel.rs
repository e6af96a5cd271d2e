//! Bytes through a CONNECT tunnel over real TCP and TLS: exact, half-closed, reset.

mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr},
    time::Duration,
};

use common::*;
use zring_hbone::H2Settings;

/// client socket -> entry -> CONNECT (TLS, h2) -> HBONE server -> TCP -> `target`.
async fn tunnel_to(target: SocketAddr) -> SocketAddr {
    let mesh = Mesh::new();
    let (client_id, server_id) = (id("default", "sleep"), id("default", "productpage"));
    let srv = hbone_server(
        mesh.server_config(&server_id),
        H2Settings::default(),
        relay_handler(),
    )
    .await;
    let send = h2_client(srv.addr, mesh.client_config(&client_id, &server_id)).await;
    tunnel_entry(send, target).await
}

fn listener() -> (std::net::TcpListener, SocketAddr) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

#[test]
fn round_trip_is_byte_exact_both_directions_at_once() {
    init_tracing();
    for len in [1u64, 64 * 1024, 100 << 20] {
        run_local(async move {
            let (l, target) = listener();
            // Upstream: hash what arrives while sending its own stream.
            let server = tokio::task::spawn_blocking(move || {
                let (mut c, _) = l.accept().unwrap();
                let mut w = c.try_clone().unwrap();
                let tx = std::thread::spawn(move || send_blocking(&mut w, 2, len).unwrap());
                let got = recv_blocking(&mut c).unwrap();
                (got, tx.join().unwrap())
            });
            let entry = tunnel_to(target).await;
            let client = tokio::task::spawn_blocking(move || {
                let mut c = std::net::TcpStream::connect(entry).unwrap();
                let mut w = c.try_clone().unwrap();
                let tx = std::thread::spawn(move || send_blocking(&mut w, 1, len).unwrap());
                let got = recv_blocking(&mut c).unwrap();
                (got, tx.join().unwrap())
            });
            let ((s_got, s_sent), (c_got, c_sent)) = (server.await.unwrap(), client.await.unwrap());
            assert_eq!(s_got, (len, c_sent), "{len} B client->server");
            assert_eq!(c_got, (len, s_sent), "{len} B server->client");
        });
    }
}

#[test]
fn half_close_works_in_both_directions() {
    run_local(async {
        // Client FIN first: the server sees EOF, then still sends 1 MiB back.
        let (l, target) = listener();
        let server = tokio::task::spawn_blocking(move || {
            let (mut c, _) = l.accept().unwrap();
            let got = recv_blocking(&mut c).unwrap();
            let sent = send_blocking(&mut c, 9, 1 << 20).unwrap();
            (got.0, sent)
        });
        let entry = tunnel_to(target).await;
        let client = tokio::task::spawn_blocking(move || {
            let mut c = std::net::TcpStream::connect(entry).unwrap();
            c.write_all(b"request").unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            recv_blocking(&mut c).unwrap()
        });
        let (server_got, server_sent) = server.await.unwrap();
        let (client_got, client_hash) = client.await.unwrap();
        assert_eq!(server_got, 7);
        assert_eq!((client_got, client_hash), (1 << 20, server_sent));

        // Server FIN first: the client sees EOF, then still sends 1 MiB up.
        let (l, target) = listener();
        let server = tokio::task::spawn_blocking(move || {
            let (mut c, _) = l.accept().unwrap();
            c.write_all(b"banner").unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            recv_blocking(&mut c).unwrap()
        });
        let entry = tunnel_to(target).await;
        let client = tokio::task::spawn_blocking(move || {
            let mut c = std::net::TcpStream::connect(entry).unwrap();
            let mut banner = Vec::new();
            c.read_to_end(&mut banner).unwrap();
            let sent = send_blocking(&mut c, 3, 1 << 20).unwrap();
            (banner, sent)
        });
        let (banner, sent) = client.await.unwrap();
        assert_eq!(banner, b"banner");
        assert_eq!(server.await.unwrap(), (1 << 20, sent));
    });
}

fn reset(s: &std::net::TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

fn read_end(c: &mut std::net::TcpStream) -> Option<ErrorKind> {
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match c.read(&mut b) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => return Some(e.kind()),
        }
    }
}

#[test]
fn resets_cross_the_tunnel_in_both_directions() {
    run_local(async {
        // The upstream resets: the client sees a reset, not EOF.
        let (l, target) = listener();
        let server = tokio::task::spawn_blocking(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut b = [0u8; 5];
            c.read_exact(&mut b).unwrap();
            reset(&c);
        });
        let entry = tunnel_to(target).await;
        let client = tokio::task::spawn_blocking(move || {
            let mut c = std::net::TcpStream::connect(entry).unwrap();
            c.write_all(b"hello").unwrap();
            read_end(&mut c)
        });
        server.await.unwrap();
        assert_eq!(
            client.await.unwrap(),
            Some(ErrorKind::ConnectionReset),
            "upstream RST must reach the client as RST"
        );

        // The client resets: the upstream sees a reset.
        let (l, target) = listener();
        let server = tokio::task::spawn_blocking(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut b = [0u8; 5];
            c.read_exact(&mut b).unwrap();
            read_end(&mut c)
        });
        let entry = tunnel_to(target).await;
        tokio::task::spawn_blocking(move || {
            let mut c = std::net::TcpStream::connect(entry).unwrap();
            c.write_all(b"hello").unwrap();
            std::thread::sleep(Duration::from_millis(200));
            reset(&c);
        })
        .await
        .unwrap();
        assert_eq!(
            server.await.unwrap(),
            Some(ErrorKind::ConnectionReset),
            "client RST must reach the upstream as RST"
        );
    });
}

#[test]
fn unreachable_target_gets_503_and_a_typed_error() {
    run_local(async {
        let mesh = Mesh::new();
        let (client_id, server_id) = (id("default", "sleep"), id("default", "productpage"));
        let srv = hbone_server(
            mesh.server_config(&server_id),
            H2Settings::default(),
            relay_handler(),
        )
        .await;
        let send = h2_client(srv.addr, mesh.client_config(&client_id, &server_id)).await;
        let dead = listener().1;
        let err = zring_hbone::client::open(&send, dead, &Default::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, zring_hbone::client::ConnectError::Unavailable(s) if s == 503),
            "{err}"
        );
    });
}

/// The copy reads small messages through a shared scratch buffer and switches to buffers of its
/// own when reads fill it (bulk), then back: bytes stay exact and in order across the switches,
/// and many tunnels interleaving on one thread do not mix their bytes.
#[test]
fn bulk_and_small_messages_alternate_byte_exact_on_many_tunnels() {
    init_tracing();
    run_local(async {
        let (l, target) = listener();
        // Upstream: an echo server, one thread per connection.
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                std::thread::spawn(move || {
                    let mut w = c.try_clone().unwrap();
                    let _ = std::io::copy(&mut c, &mut w);
                });
            }
        });
        let entry = tunnel_to(target).await;
        let clients: Vec<_> = (0..4u8)
            .map(|k| {
                tokio::task::spawn_blocking(move || {
                    let mut c = std::net::TcpStream::connect(entry).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    let mut seed = 7 + k as u64;
                    for round in 0..3 {
                        for len in [1024 * 1024, 37, 4096, 100, 300 * 1024, 1] {
                            let mut out = vec![0u8; len];
                            fill(&mut seed, &mut out);
                            let mut back = vec![0u8; len];
                            let reader = {
                                let mut r = c.try_clone().unwrap();
                                std::thread::spawn(move || r.read_exact(&mut back).map(|_| back))
                            };
                            c.write_all(&out).unwrap();
                            let back = reader.join().unwrap().unwrap();
                            assert!(back == out, "tunnel {k} round {round}: {len} B differ");
                        }
                    }
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap();
        }
    });
}
