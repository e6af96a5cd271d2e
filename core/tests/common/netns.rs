//! Network namespaces for tests that need root: created with unique names, deleted on drop
//! (also when the test fails), and helpers to run servers and clients inside them.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::Duration,
};

use zring_runtime::net::NetNs;

/// Whether the tests run as root (CI does); callers print a loud SKIPPED line otherwise.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}

/// Run a command; fail the test with its stderr if it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run command");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace the test created; deleted on drop.
pub struct TestNs {
    pub name: String,
}

impl TestNs {
    /// A new namespace `zr<tag>-<unique>` with loopback up. Names stay short: interface names
    /// derived from them must fit 15 characters.
    pub fn new(tag: &str) -> TestNs {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            % 100_000;
        let name = format!("zr{tag}-{}-{n}", std::process::id() % 100_000);
        sh(&["ip", "netns", "add", &name]);
        let ns = TestNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Run a command inside.
    pub fn exec(&self, args: &[&str]) {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        sh(&v);
    }

    /// `/var/run/netns/NAME`.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// A handle to enter it.
    pub fn open(&self) -> NetNs {
        NetNs::open(self.path()).unwrap()
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// An echo server bound at `addr` inside `ns`.
pub fn echo_in(ns: &NetNs, addr: &str) {
    let l = ns.run(|| TcpListener::bind(addr)).unwrap().unwrap();
    super::serve_echo(l);
}

/// Connect inside `ns` (from `src` when given) to `dst`, send `data`, half-close, and read
/// everything back.
pub fn exchange(ns: &NetNs, src: Option<&str>, dst: &str, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let dst: SocketAddr = dst.parse().unwrap();
    let mut c = ns
        .run(|| -> std::io::Result<TcpStream> {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            if let Some(src) = src {
                s.bind(&src.parse::<SocketAddr>().unwrap().into())?;
            }
            s.connect_timeout(&dst.into(), Duration::from_secs(5))?;
            Ok(s.into())
        })
        .unwrap()?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(data)?;
    c.shutdown(Shutdown::Write)?;
    let mut got = Vec::new();
    c.read_to_end(&mut got)?;
    Ok(got)
}

/// `zring node-agent add` for pod `name` (uid `uid-NAME`, namespace default) whose network
/// namespace is at `netns`; Err with the command's stderr when it fails.
pub fn agent_add(socket: &str, netns: &str, name: &str, sa: &str) -> Result<(), String> {
    let uid = format!("uid-{name}");
    agent(&[
        "add",
        "--socket",
        socket,
        "--netns",
        netns,
        "--uid",
        &uid,
        "--name",
        name,
        "--namespace",
        "default",
        "--service-account",
        sa,
    ])
}

/// `zring node-agent remove` for pod `name` (uid `uid-NAME`).
pub fn agent_remove(socket: &str, name: &str) -> Result<(), String> {
    agent(&[
        "remove",
        "--socket",
        socket,
        "--uid",
        &format!("uid-{name}"),
    ])
}

fn agent(args: &[&str]) -> Result<(), String> {
    let out = Command::new(super::ZRING)
        .arg("node-agent")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// Files under `/etc/netns/NAME/` (`resolv.conf`, `hosts`), which `ip netns exec NAME` mounts
/// over their `/etc` namesakes for the command it runs; removed on drop.
pub struct EtcNetns(std::path::PathBuf);

impl EtcNetns {
    pub fn new(ns: &str, files: &[(&str, &str)]) -> EtcNetns {
        let dir = std::path::PathBuf::from(format!("/etc/netns/{ns}"));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        EtcNetns(dir)
    }
}

impl Drop for EtcNetns {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
