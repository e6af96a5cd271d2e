//! FINs are forwarded one direction at a time; resets are forwarded as resets.

mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    time::Duration,
};

use common::*;

const REPLY: u64 = 10 << 20;

#[test]
fn client_half_close_still_receives_ten_mib_then_eof() {
    init_tracing();
    for (backend, mode) in matrix() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let up = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            // The request is 1000 bytes and then EOF: EOF must come exactly after them.
            let got = recv_pattern(&mut conn, 7, 1000).unwrap();
            assert_eq!(got, 1000, "server saw EOF at the wrong place");
            // The other direction is still open: send 10 MiB after the client's FIN.
            send_pattern(&mut conn, 8, REPLY).unwrap();
            conn.shutdown(Shutdown::Write).unwrap();
        });
        let relay = RelayFixture::start(backend, mode, up);
        let mut conn = TcpStream::connect(relay.addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        send_pattern(&mut conn, 7, 1000).unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        let got = recv_pattern(&mut conn, 8, REPLY).unwrap();
        assert_eq!(got, REPLY, "{backend}/{mode}: client got EOF early");
        server.join().unwrap();
        relay.stop();
    }
}

#[test]
fn upstream_half_close_lets_client_keep_sending() {
    init_tracing();
    for (backend, mode) in matrix() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let up = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.write_all(b"banner").unwrap();
            conn.shutdown(Shutdown::Write).unwrap();
            recv_pattern(&mut conn, 9, REPLY).unwrap()
        });
        let relay = RelayFixture::start(backend, mode, up);
        let mut conn = TcpStream::connect(relay.addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut banner = Vec::new();
        conn.read_to_end(&mut banner).unwrap();
        assert_eq!(banner, b"banner", "{backend}/{mode}");
        send_pattern(&mut conn, 9, REPLY).unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        assert_eq!(
            server.join().unwrap(),
            REPLY,
            "{backend}/{mode}: upstream got all bytes after its FIN"
        );
        relay.stop();
    }
}

fn reset(stream: &TcpStream) {
    socket2::SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

/// Read until an error or EOF; return the error kind (EOF = None).
fn read_until_end(conn: &mut TcpStream) -> Option<ErrorKind> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return None,
            Ok(_) => continue,
            Err(e) => return Some(e.kind()),
        }
    }
}

#[test]
fn upstream_reset_reaches_client_as_reset() {
    init_tracing();
    for (backend, mode) in matrix() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let up = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 5];
            conn.read_exact(&mut buf).unwrap();
            conn.write_all(b"partial").unwrap();
            reset(&conn);
            drop(conn);
        });
        let relay = RelayFixture::start(backend, mode, up);
        let mut conn = TcpStream::connect(relay.addr).unwrap();
        conn.write_all(b"hello").unwrap();
        server.join().unwrap();
        let end = read_until_end(&mut conn);
        assert_eq!(
            end,
            Some(ErrorKind::ConnectionReset),
            "{backend}/{mode}: client must see a reset, not a clean close"
        );
        let outcomes = relay.outcomes.clone();
        relay.stop();
        let o = outcomes.lock().unwrap();
        assert!(
            o[0].error.is_some(),
            "{backend}/{mode}: relay must report the reset"
        );
    }
}

#[test]
fn client_reset_reaches_upstream_as_reset() {
    init_tracing();
    for (backend, mode) in matrix() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let up = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 5];
            conn.read_exact(&mut buf).unwrap();
            read_until_end(&mut conn)
        });
        let relay = RelayFixture::start(backend, mode, up);
        let conn = TcpStream::connect(relay.addr).unwrap();
        (&conn).write_all(b"hello").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        reset(&conn);
        drop(conn);
        assert_eq!(
            server.join().unwrap(),
            Some(ErrorKind::ConnectionReset),
            "{backend}/{mode}: upstream must see a reset"
        );
        relay.stop();
    }
}

#[test]
fn idle_timeout_closes_a_silent_connection() {
    init_tracing();
    for (backend, mode) in matrix() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let up = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            read_until_end(&mut conn)
        });
        let opts = zring_runtime::RelayOptions {
            mode,
            idle_timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        };
        let relay = RelayFixture::start_with(backend, opts, up);
        let mut conn = TcpStream::connect(relay.addr).unwrap();
        conn.write_all(b"x").unwrap();
        let t = std::time::Instant::now();
        let end = read_until_end(&mut conn);
        let waited = t.elapsed();
        assert_eq!(end, Some(ErrorKind::ConnectionReset), "{backend}/{mode}");
        assert!(
            waited >= Duration::from_millis(250),
            "{backend}/{mode}: closed too early ({waited:?})"
        );
        assert!(
            waited < Duration::from_secs(5),
            "{backend}/{mode}: idle timeout not enforced ({waited:?})"
        );
        server.join().unwrap();
        relay.stop();
    }
}
