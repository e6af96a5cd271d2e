//! `zring` with no arguments: the demo mesh starts, tells the story of real traffic, serves the
//! user's own traffic, and stops cleanly on SIGTERM.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

mod common;

#[test]
fn the_demo_mesh_allows_sleep_denies_notsleep_and_serves_socks5_clients() {
    let mut child = Command::new(common::ZRING)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn zring");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !out
        .iter()
        .any(|l: &String| l.contains("Ctrl-C stops the demo"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => out.push(l),
            Err(_) => {
                let _ = child.kill();
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!(
                    "the demo never finished its story:\n{}\n{err}",
                    out.join("\n")
                );
            }
        }
    }
    let text = out.join("\n");
    assert!(
        text.contains(
            "sleep -> productpage.default.svc.cluster.local (127.0.20.20:9080): ALLOWED, 200 OK"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "notsleep -> productpage.default.svc.cluster.local (127.0.20.20:9080): DENIED"
        ),
        "{text}"
    );
    assert!(text.contains("response_flags=DENY"), "{text}");
    assert!(
        text.contains("connection_security_policy=mutual_tls"),
        "{text}"
    );
    // The mesh and the certificates came from the demo's control plane, not a file.
    assert!(text.contains("configured by zring control-plane"), "{text}");
    let (_, dump) =
        common::mesh::http_get("127.0.0.3:15000".parse().unwrap(), "GET", "/config_dump");
    assert!(
        dump.contains("\"configSource\": \"xds:https://127.0.0.4:15012\""),
        "{dump}"
    );

    // The user's own traffic, as the demo suggests: SOCKS5 from sleep's address.
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&"127.0.1.2:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.connect(&"127.0.0.2:15080".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let mut c: TcpStream = s.into();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(&[5, 1, 0]).unwrap();
    let mut g = [0u8; 2];
    c.read_exact(&mut g).unwrap();
    c.write_all(&[5, 1, 0, 1, 127, 0, 20, 20, 0x23, 0x78])
        .unwrap();
    let mut r = [0u8; 10];
    c.read_exact(&mut r).unwrap();
    assert_eq!(r[1], 0, "sleep is allowed");
    c.write_all(b"GET / HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200 OK") && resp.contains("productpage"),
        "{resp}"
    );

    // SIGTERM: a clean exit.
    assert!(Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    assert!(status.success(), "exit status {status}; stderr:\n{err}");
}
