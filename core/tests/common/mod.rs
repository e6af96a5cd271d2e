//! Helpers for tests that run the `zring` binary: processes with their log, temp paths,
//! waiting for listeners, echo servers.
#![allow(dead_code)]

pub mod dns;
pub mod http;
pub mod mesh;
pub mod netns;
pub mod xds;

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

pub const ZRING: &str = env!("CARGO_BIN_EXE_zring");

/// A running zring whose stderr goes to a log file; killed and cleaned up on drop.
pub struct Proc {
    pub child: Child,
    log: PathBuf,
}

impl Proc {
    /// Start `zring ARGS` (RUST_LOG=info); `prepare` may adjust the command (seccomp...).
    pub fn spawn_with(args: &[&str], prepare: impl FnOnce(&mut Command)) -> Self {
        let log = tmp("log");
        let mut cmd = Command::new(ZRING);
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        prepare(&mut cmd);
        Proc {
            child: cmd.spawn().expect("spawn zring"),
            log,
        }
    }

    /// A process started elsewhere whose stderr goes to `log`.
    pub fn from_child(child: Child, log: PathBuf) -> Self {
        Proc { child, log }
    }

    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_with(args, |_| {})
    }

    /// Start `zring ARGS` inside the network namespace `ns` (`ip netns exec`).
    pub fn spawn_in_netns(ns: &str, args: &[&str]) -> Self {
        let log = tmp("log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, ZRING])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn zring in a netns");
        Proc { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Send a signal with the `kill` utility (keeps this crate free of unsafe code).
    pub fn signal(&self, sig: i32) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(st.success());
    }

    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "zring did not exit within {limit:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until something accepts on `addr`, failing early if zring exits.
    pub fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("zring exited early ({st}); log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "zring never listened on {addr}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Wait (polling every 25 ms) until `ok` holds; fail the test with `why()` after `limit`.
pub fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{}", why());
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The `trace_id` of the first access-log line ("connection complete") in `log` that `pick`
/// accepts.
pub fn logged_trace_id(log: &str, pick: impl Fn(&str) -> bool) -> Option<String> {
    let line = log
        .lines()
        .find(|l| l.contains("connection complete") && pick(l))?;
    let at = line.find("trace_id=")? + "trace_id=".len();
    let id: String = line[at..]
        .trim_start_matches('"')
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    (id.len() == 32).then_some(id)
}

/// A unique path in the temp directory.
pub fn tmp(tag: &str) -> PathBuf {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!("zring-test-{tag}-{}-{n}", std::process::id()))
}

/// `zring ca init` in `dir/ca` (creating `dir`); returns the CA directory.
pub fn ca_init(dir: &std::path::Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let ca = dir.join("ca");
    let out = Command::new(ZRING)
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ca
}

/// A loopback port nothing listens on (bound and released).
pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// An echo server on `addr` (thread per connection); half-closes after echoing EOF.
pub fn echo_at(addr: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind(addr).unwrap();
    let a = l.local_addr().unwrap();
    serve_echo(l);
    a
}

/// Echo on an already bound listener (thread per connection); half-closes after EOF.
pub fn serve_echo(l: TcpListener) {
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = c.shutdown(Shutdown::Write);
            });
        }
    });
}

/// An echo server on a free loopback port.
pub fn echo() -> SocketAddr {
    echo_at("127.0.0.1:0".parse().unwrap())
}

/// `zring tunnel client` on `listen` presenting `identity` (issued by the CA in `ca`): HBONE
/// to `server`, whose certificate must prove `expect`, CONNECT `target`. A client that skips
/// the node proxies, for probing what a peer with a mesh certificate can ask for.
pub fn tunnel_client(
    ca: &std::path::Path,
    listen: SocketAddr,
    identity: &str,
    server: SocketAddr,
    target: SocketAddr,
    expect: &str,
) -> Proc {
    let mut t = Proc::spawn(&[
        "tunnel",
        "client",
        "--listen",
        &listen.to_string(),
        "--ca-dir",
        ca.to_str().unwrap(),
        "--identity",
        identity,
        "--server",
        &server.to_string(),
        "--target",
        &target.to_string(),
        "--expect",
        expect,
    ]);
    t.wait_listening(listen);
    t
}
