//! `zring ca` and `zring tunnel` end to end: real processes, real TLS, both io backends.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

mod common;

use common::{echo, free_port as free, tmp, Proc, ZRING};

const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/productpage";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";

fn zring(args: &[&str]) -> Proc {
    Proc::spawn(args)
}

fn ca_dir() -> PathBuf {
    let dir = tmp("ca");
    let out = Command::new(ZRING)
        .args(["ca", "init", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

fn tunnel(ca: &Path, io: &str, expect: &str, target: SocketAddr) -> (Proc, Proc, SocketAddr) {
    let (srv_addr, cli_addr) = (free(), free());
    let ca = ca.to_str().unwrap();
    let mut srv = zring(&[
        "tunnel",
        "server",
        "--listen",
        &srv_addr.to_string(),
        "--ca-dir",
        ca,
        "--identity",
        SERVER_ID,
        "--io",
        io,
    ]);
    srv.wait_listening(srv_addr);
    let mut cli = zring(&[
        "tunnel",
        "client",
        "--listen",
        &cli_addr.to_string(),
        "--ca-dir",
        ca,
        "--identity",
        CLIENT_ID,
        "--io",
        io,
        "--server",
        &srv_addr.to_string(),
        "--target",
        &target.to_string(),
        "--expect",
        expect,
    ]);
    cli.wait_listening(cli_addr);
    (srv, cli, cli_addr)
}

#[test]
fn ca_init_refuses_to_overwrite_and_issue_writes_a_usable_chain() {
    let dir = ca_dir();
    let again = Command::new(ZRING)
        .args(["ca", "init", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let prefix = dir.join("sleep-");
    let out = Command::new(ZRING)
        .args(["ca", "issue", "--dir"])
        .arg(&dir)
        .args(["--spiffe", CLIENT_ID, "--out", prefix.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cert = zring_hbone::ca::WorkloadCert::load(prefix.to_str().unwrap()).unwrap();
    assert_eq!(cert.identity.to_string(), CLIENT_ID);
    let bad = Command::new(ZRING)
        .args(["ca", "issue", "--dir"])
        .arg(&dir)
        .args(["--spiffe", "spiffe://x/y", "--out", "/tmp/x-"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/ns/<namespace>/sa/<service-account>"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tunnel_carries_bytes_exactly_on_both_backends() {
    let ca = ca_dir();
    let target = echo();
    for io in ["uring", "epoll"] {
        let (_srv, _cli, entry) = tunnel(&ca, io, SERVER_ID, target);
        let mut c = TcpStream::connect(entry).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let data: Vec<u8> = (0..8 << 20)
            .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut w = c.try_clone().unwrap();
        let d2 = data.clone();
        let tx = std::thread::spawn(move || {
            w.write_all(&d2).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        tx.join().unwrap();
        assert!(
            got == data,
            "{io}: echoed {} of {} bytes, or different bytes",
            got.len(),
            data.len()
        );
    }
    let _ = std::fs::remove_dir_all(&ca);
}

#[test]
fn tunnel_client_refuses_a_server_with_another_identity() {
    let ca = ca_dir();
    let target = echo();
    let (_srv, cli, entry) = tunnel(
        &ca,
        "epoll",
        "spiffe://cluster.local/ns/default/sa/reviews",
        target,
    );
    let mut c = TcpStream::connect(entry).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.write_all(b"hello");
    let mut buf = [0u8; 16];
    assert!(
        !matches!(c.read(&mut buf), Ok(n) if n > 0),
        "no byte may flow to the wrong identity"
    );
    std::thread::sleep(Duration::from_millis(200));
    let log = cli.log();
    assert!(
        log.contains("is not the expected spiffe://cluster.local/ns/default/sa/reviews"),
        "log:\n{log}"
    );
    let _ = std::fs::remove_dir_all(&ca);
}

/// An existing RSA-2048 root (made by openssl, as a cluster's plug-in CA would be) works as a CA
/// directory as is.
#[test]
fn an_existing_rsa_root_from_openssl_is_usable_as_is() {
    let dir = tmp("rsa-ca");
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("root-key.pem");
    let cert = dir.join("root-cert.pem");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl (scripts/test installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        key.to_str().unwrap(),
    ]);
    run(&[
        "req",
        "-x509",
        "-new",
        "-key",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
        "-days",
        "30",
        "-subj",
        "/O=cluster.local/CN=plug-in root",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    ]);
    let target = echo();
    let (_srv, _cli, entry) = tunnel(&dir, "epoll", SERVER_ID, target);
    let mut c = TcpStream::connect(entry).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"signed by RSA").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"signed by RSA");
    let _ = std::fs::remove_dir_all(&dir);
}
