//! Node proxies on loopback for end-to-end tests: start `zring run` with its control
//! endpoints on its own address, wait for readiness, read metrics, and talk SOCKS5 to it.

use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use super::Proc;

/// GET `path` on `addr`: (status, body).
pub fn http_get(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, String::new());
    };
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = c.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// The value of the metric line that has `name` and every one of `labels`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<u64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .reduce(|a, b| a + b)
}

/// Node proxy A or B with its control endpoints on its own loopback address.
pub struct Node {
    pub proc: Proc,
    pub stats: SocketAddr,
    pub ready: SocketAddr,
    pub admin: SocketAddr,
}

impl Node {
    pub fn start(
        name: &str,
        host: IpAddr,
        cfg: &std::path::Path,
        ca: &std::path::Path,
        extra: &[&str],
    ) -> Node {
        Node::start_with(name, host, cfg, Some(ca), extra)
    }

    /// Without a CA directory, `extra` names the certificate source (`--cert-dir`).
    pub fn start_with(
        name: &str,
        host: IpAddr,
        cfg: &std::path::Path,
        ca: Option<&std::path::Path>,
        extra: &[&str],
    ) -> Node {
        Node::start_cmd("run", name, host, cfg, ca, extra)
    }

    /// `zring CMD` (`run`, or `waypoint`, which takes the same options and more).
    pub fn start_cmd(
        cmd: &str,
        name: &str,
        host: IpAddr,
        cfg: &std::path::Path,
        ca: Option<&std::path::Path>,
        extra: &[&str],
    ) -> Node {
        let (admin, stats, ready) = (
            SocketAddr::new(host, 15000),
            SocketAddr::new(host, 15020),
            SocketAddr::new(host, 15021),
        );
        let cfg = cfg.to_str().unwrap();
        let (a, s, r) = (admin.to_string(), stats.to_string(), ready.to_string());
        let mut args = vec![
            cmd,
            "--config",
            cfg,
            "--node-name",
            name,
            "--packet-mark",
            "0",
            "--admin-addr",
            &a,
            "--stats-addr",
            &s,
            "--readiness-addr",
            &r,
        ];
        if let Some(ca) = ca {
            args.extend(["--ca-dir", ca.to_str().unwrap()]);
        }
        if !extra.contains(&"--workers") {
            args.extend(["--workers", "1"]);
        }
        // Nodes share the loopback namespace: DNS only where a test asks for it.
        if !extra.iter().any(|a| a.starts_with("--dns")) {
            args.extend(["--dns-proxy", "false"]);
        }
        args.extend_from_slice(extra);
        Node {
            proc: Proc::spawn(&args),
            stats,
            ready,
            admin,
        }
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.proc.child.try_wait().unwrap() {
                panic!("zring exited early ({st}); log:\n{}", self.proc.log());
            }
            if http_get(self.ready, "GET", "/healthz/ready").0 == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never ready; log:\n{}",
                self.proc.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn metrics(&self) -> String {
        let (st, body) = http_get(self.stats, "GET", "/metrics");
        assert_eq!(st, 200);
        body
    }
}

/// SOCKS5 CONNECT from `src` through `proxy` to `dst`; returns the reply code and the stream.
pub fn socks(src: IpAddr, proxy: SocketAddr, dst: SocketAddr) -> (u8, TcpStream) {
    let mut c = socks_send(src, proxy, &socks_ipv4(dst));
    let mut r = [0u8; 10];
    c.read_exact(&mut r).unwrap();
    (r[1], c)
}

/// A SOCKS5 CONNECT request's address part for an IPv4 `dst` (ATYP 1).
pub fn socks_ipv4(dst: SocketAddr) -> Vec<u8> {
    let IpAddr::V4(v4) = dst.ip() else {
        unreachable!()
    };
    let mut req = vec![1];
    req.extend_from_slice(&v4.octets());
    req.extend_from_slice(&dst.port().to_be_bytes());
    req
}

/// A SOCKS5 CONNECT request's address part for a domain name (ATYP 3).
pub fn socks_name(name: &str, port: u16) -> Vec<u8> {
    let mut req = vec![3, name.len() as u8];
    req.extend_from_slice(name.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    req
}

/// Connect from `src` to the SOCKS5 `proxy`, greet it (no authentication) and send a CONNECT
/// with `address` (`socks_ipv4` or `socks_name`); the reply is left unread.
pub fn socks_send(src: IpAddr, proxy: SocketAddr, address: &[u8]) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(src, 0).into()).unwrap();
    s.connect(&proxy.into()).unwrap();
    let mut c: TcpStream = s.into();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(&[5, 1, 0]).unwrap();
    let mut g = [0u8; 2];
    c.read_exact(&mut g).unwrap();
    assert_eq!(g, [5, 0]);
    let mut req = vec![5, 1, 0];
    req.extend_from_slice(address);
    c.write_all(&req).unwrap();
    c
}

pub fn echo_through(mut c: TcpStream, data: &[u8]) -> Vec<u8> {
    c.write_all(data).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    got
}
