//! Socket helpers against the real kernel: listeners and connects inside another network
//! namespace, and `SO_ORIGINAL_DST` after an iptables `REDIRECT` inside that namespace.
//!
//! Needs root (CI runs as root). Elsewhere the tests print a loud SKIPPED line and return.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use zring_runtime::net::{self, ListenOptions, NetNs};

/// A network namespace created for one test and deleted on drop (also when the test fails).
struct TestNs {
    name: String,
}

impl TestNs {
    fn create(tag: &str) -> Option<Self> {
        if !is_root() {
            eprintln!("SKIPPED {tag}: needs root to create network namespaces (CI runs as root)");
            return None;
        }
        let name = format!(
            "zr-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.exec("ip", &["link", "set", "lo", "up"]);
        Some(ns)
    }

    fn exec(&self, cmd: &str, args: &[&str]) {
        let mut full = vec!["netns", "exec", &self.name, cmd];
        full.extend_from_slice(args);
        run("ip", &full);
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn listener_bound_via_netns_run_lives_in_that_namespace() {
    let Some(ns) = TestNs::create("bind") else {
        return;
    };
    let netns = NetNs::open(ns.path()).unwrap();
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let listener = netns
        .run(|| net::bind_listener(addr, &ListenOptions::default()))
        .unwrap()
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    // A connection from our own namespace does not reach it (whatever answers there, if
    // anything, is not this listener)...
    listener.set_nonblocking(true).unwrap();
    let _outside = TcpStream::connect(("127.0.0.1", port));
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        listener.accept().is_err(),
        "a connection from outside the namespace reached the listener"
    );
    // ...but reachable from inside it, through a socket created there.
    let conn = netns
        .run(|| TcpStream::connect(("127.0.0.1", port)))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(false).unwrap();
    let (mut server, peer) = listener.accept().unwrap();
    assert_eq!(peer, conn.local_addr().unwrap());
    (&conn).write_all(b"inside").unwrap();
    let mut buf = [0u8; 6];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"inside");
    // And the thread is back in its own namespace afterwards.
    assert_eq!(
        NetNs::current().unwrap().inode().unwrap(),
        NetNs::open("/proc/self/ns/net").unwrap().inode().unwrap()
    );
}

#[test]
fn original_dst_recovers_the_address_before_redirect() {
    let Some(ns) = TestNs::create("odst") else {
        return;
    };
    ns.exec("ip", &["addr", "add", "10.231.0.1/24", "dev", "lo"]);
    ns.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "10.231.0.7",
            "--dport",
            "8080",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ],
    );
    let netns = NetNs::open(ns.path()).unwrap();
    let listener = netns
        .run(|| net::bind_listener("0.0.0.0:15001".parse().unwrap(), &ListenOptions::default()))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(false).unwrap();
    let client = netns
        .run(|| {
            TcpStream::connect_timeout(&"10.231.0.7:8080".parse().unwrap(), Duration::from_secs(5))
        })
        .unwrap()
        .unwrap();
    let (accepted, _) = listener.accept().unwrap();
    assert_eq!(
        accepted.local_addr().unwrap().port(),
        15001,
        "the kernel redirected the connection"
    );
    assert_eq!(
        net::original_dst(&accepted).unwrap(),
        "10.231.0.7:8080".parse::<SocketAddr>().unwrap()
    );
    drop(client);
}

#[test]
fn non_namespace_fds_are_refused() {
    let err = NetNs::open("/proc/self/status").unwrap_err();
    assert!(err.to_string().contains("not a namespace"), "{err}");
    let err = NetNs::open("/proc/self/ns/uts").unwrap_err();
    assert!(err.to_string().contains("not a network namespace"), "{err}");
}

#[test]
fn marks_are_set_on_upstream_sockets() {
    if !is_root() {
        eprintln!("SKIPPED marks_are_set_on_upstream_sockets: SO_MARK needs CAP_NET_ADMIN");
        return;
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let s = net::start_connect(
        l.local_addr().unwrap(),
        &net::ConnectOptions {
            mark: Some(1337),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(s.mark().unwrap(), 1337);
}

/// Security review L5: a panic inside `NetNs::run` (caught per connection higher up) still
/// switches the thread back, so no later socket of the worker lands in the pod's namespace.
#[test]
fn a_panic_inside_netns_run_still_returns_the_thread_to_its_namespace() {
    let Some(ns) = TestNs::create("panic") else {
        return;
    };
    let netns = NetNs::open(ns.path()).unwrap();
    let home = NetNs::current().unwrap().inode().unwrap();
    assert_ne!(home, netns.inode().unwrap());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        netns.run(|| -> () { panic!("inside the pod's namespace") })
    }));
    assert!(r.is_err(), "the panic was not raised");
    assert_eq!(
        NetNs::current().unwrap().inode().unwrap(),
        home,
        "the thread stayed in the namespace it panicked in"
    );
}
