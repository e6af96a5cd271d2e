//! Bad input gets the right answer and disturbs nobody else.

mod common;

use std::{cell::Cell, rc::Rc, time::Duration};

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zring_hbone::{
    server::{self, Incoming},
    H2Settings, TokioLocal,
};

async fn status_of(
    send: &h2::client::SendRequest<Bytes>,
    req: Request<()>,
) -> Result<StatusCode, h2::Error> {
    let mut send = send.clone().ready().await?;
    let (resp, _stream) = send.send_request(req, false)?;
    Ok(resp.await?.status())
}

/// The server still answers a well-formed CONNECT (503: nothing listens at the target).
async fn still_serving(srv: std::net::SocketAddr, mesh: &Mesh) {
    let send = h2_client(
        srv,
        mesh.client_config(&id("default", "sleep"), &id("default", "productpage")),
    )
    .await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(dead.to_string())
        .body(())
        .unwrap();
    assert_eq!(
        status_of(&send, req).await.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

async fn setup() -> (Mesh, HboneServer, h2::client::SendRequest<Bytes>) {
    let mesh = Mesh::new();
    let srv = hbone_server(
        mesh.server_config(&id("default", "productpage")),
        H2Settings::default(),
        relay_handler(),
    )
    .await;
    let send = h2_client(
        srv.addr,
        mesh.client_config(&id("default", "sleep"), &id("default", "productpage")),
    )
    .await;
    (mesh, srv, send)
}

#[test]
fn non_connect_methods_get_405() {
    run_local(async {
        let (mesh, srv, send) = setup().await;
        for m in [Method::GET, Method::POST, Method::PUT] {
            let req = Request::builder()
                .method(m.clone())
                .uri("http://10.0.0.1:80/")
                .body(())
                .unwrap();
            assert_eq!(
                status_of(&send, req).await.unwrap(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{m}"
            );
        }
        still_serving(srv.addr, &mesh).await;
    });
}

#[test]
fn authorities_that_are_not_ip_and_port_get_400() {
    run_local(async {
        let (mesh, srv, send) = setup().await;
        for authority in [
            "productpage.default.svc:9080",
            "10.0.0.1",
            "10.0.0.1:99999",
            "[::1]",
        ] {
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(authority)
                .body(())
                .unwrap();
            assert_eq!(
                status_of(&send, req).await.unwrap(),
                StatusCode::BAD_REQUEST,
                "{authority}"
            );
        }
        still_serving(srv.addr, &mesh).await;
    });
}

#[test]
fn oversized_headers_are_refused_without_harm() {
    run_local(async {
        let (mesh, srv, send) = setup().await;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.1:80")
            .header("baggage", "x".repeat(64 * 1024))
            .body(())
            .unwrap();
        match status_of(&send, req).await {
            Ok(s) => assert_ne!(s, StatusCode::OK, "oversized request must not be accepted"),
            Err(e) => tracing::debug!("oversized headers refused: {e}"),
        }
        still_serving(srv.addr, &mesh).await;
    });
}

#[test]
fn concurrent_streams_never_exceed_the_limit() {
    run_local(async {
        let mesh = Mesh::new();
        let live = Rc::new(Cell::new(0u32));
        let peak = Rc::new(Cell::new(0u32));
        let (l, p) = (live.clone(), peak.clone());
        let handler: Handler = Rc::new(move |i: Incoming| {
            let (l, p) = (l.clone(), p.clone());
            Box::pin(async move {
                l.set(l.get() + 1);
                p.set(p.get().max(l.get()));
                let Ok(mut s) = i.accept() else { return };
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = s.shutdown().await;
                l.set(l.get() - 1);
            })
        });
        let settings = H2Settings {
            max_streams: 10,
            ..Default::default()
        };
        let srv = hbone_server(
            mesh.server_config(&id("default", "productpage")),
            settings,
            handler,
        )
        .await;
        let send = h2_client(
            srv.addr,
            mesh.client_config(&id("default", "sleep"), &id("default", "productpage")),
        )
        .await;
        let mut tasks = Vec::new();
        for _ in 0..30 {
            let send = send.clone();
            tasks.push(tokio::task::spawn_local(async move {
                let req = Request::builder()
                    .method(Method::CONNECT)
                    .uri("10.0.0.1:80")
                    .body(())
                    .unwrap();
                status_of(&send, req).await
            }));
        }
        let mut ok = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), Ok(StatusCode::OK)) {
                ok += 1;
            }
        }
        assert!(
            peak.get() <= 10,
            "peak {} streams with a limit of 10",
            peak.get()
        );
        assert!(ok >= 10, "streams within the limit are served ({ok})");
        still_serving_relay(&mesh).await;
    });
}

async fn still_serving_relay(mesh: &Mesh) {
    let srv = hbone_server(
        mesh.server_config(&id("default", "productpage")),
        H2Settings::default(),
        relay_handler(),
    )
    .await;
    still_serving(srv.addr, mesh).await;
}

#[test]
fn garbage_instead_of_tls_is_dropped_and_others_are_served() {
    run_local(async {
        let (mesh, srv, _send) = setup().await;
        let mut raw = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let r = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
            .await
            .expect("server answers or closes");
        assert!(!matches!(r, Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 200")));
        still_serving(srv.addr, &mesh).await;
    });
}

#[test]
fn garbage_instead_of_http2_after_tls_is_dropped_and_others_are_served() {
    run_local(async {
        let (mesh, srv, _send) = setup().await;
        let mut tls = dial_tls(
            srv.addr,
            mesh.client_config(&id("default", "sleep"), &id("default", "productpage")),
        )
        .await
        .unwrap();
        tls.write_all(&[0xffu8; 4096]).await.unwrap();
        let mut buf = [0u8; 256];
        // The server closes (possibly after a GOAWAY frame); it must not hang.
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "server must close a connection that is not HTTP/2"
        );
        still_serving(srv.addr, &mesh).await;
    });
}

#[test]
fn a_peer_that_never_reads_holds_bounded_memory() {
    run_local(async {
        let mesh = Mesh::new();
        let written = Rc::new(Cell::new(0u64));
        let w = written.clone();
        let handler: Handler = Rc::new(move |i: Incoming| {
            let w = w.clone();
            Box::pin(async move {
                let Ok(mut s) = i.accept() else { return };
                let chunk = vec![7u8; 64 * 1024];
                while s.write_all(&chunk).await.is_ok() {
                    w.set(w.get() + chunk.len() as u64);
                }
            })
        });
        let srv = hbone_server(
            mesh.server_config(&id("default", "productpage")),
            H2Settings::default(),
            handler,
        )
        .await;
        let send = h2_client(
            srv.addr,
            mesh.client_config(&id("default", "sleep"), &id("default", "productpage")),
        )
        .await;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let mut s = send.clone().ready().await.unwrap();
        let (resp, _up) = s.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        let _body = resp.into_body(); // never read
        tokio::time::sleep(Duration::from_secs(1)).await;
        let n = written.get();
        // One 4 MiB stream window plus at most one 1 MiB send buffer, rounded to chunks.
        assert!(
            n > 0 && n <= 6 * 1024 * 1024,
            "server buffered {n} bytes for a peer that never reads"
        );
        still_serving_relay(&mesh).await;
    });
}

#[test]
fn a_client_that_never_sends_the_http2_preface_is_closed_at_the_handshake_limit() {
    use std::sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    };
    use zring_hbone::settings::{TimeoutHook, TimeoutKind, Timeouts};
    run_local(async {
        let fired = Arc::new(AtomicU32::new(0));
        let f = fired.clone();
        let settings = H2Settings {
            timeouts: Timeouts {
                h2_handshake: Duration::from_millis(300),
                hook: Some(TimeoutHook(Arc::new(move |k| {
                    assert_eq!(k, TimeoutKind::H2Handshake);
                    f.fetch_add(1, Ordering::Relaxed);
                }))),
                ..Timeouts::default()
            },
            ..H2Settings::default()
        };
        // A connected pair where the "client" says nothing at all.
        let (_client, server) = tokio::io::duplex(1 << 16);
        let start = std::time::Instant::now();
        let r = server::serve(
            server,
            None,
            &settings,
            TokioLocal,
            |_i: server::Incoming| async {},
            std::future::pending::<()>(),
        )
        .await;
        assert!(
            matches!(r, Err(server::ServeError::HandshakeTimeout(_))),
            "{r:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(fired.load(Ordering::Relaxed), 1);
    });
}
