//! An HBONE test mesh on loopback: a local CA, a TLS+HTTP/2 CONNECT server whose handler relays
//! to the requested target over real TCP, and a client side that relays a local TCP socket into
//! a CONNECT stream.
#![allow(dead_code)]

use std::{future::Future, net::SocketAddr, rc::Rc, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use zring_hbone::{
    ca::{LocalCa, WorkloadCert},
    client::{self, ConnectHeaders},
    relay,
    server::{self, Incoming},
    tls::{self, Swappable},
    H2Settings, SpiffeId, TokioLocal,
};

pub fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

pub struct Mesh {
    pub ca: LocalCa,
}

impl Mesh {
    pub fn new() -> Self {
        Self {
            ca: LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap(),
        }
    }
    pub fn cert(&self, id: &SpiffeId) -> WorkloadCert {
        self.ca.issue(id, Duration::from_secs(3600)).unwrap()
    }
    pub fn roots(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        vec![self.ca.root().clone()]
    }
    pub fn server_config(&self, id: &SpiffeId) -> Arc<rustls::ServerConfig> {
        tls::server_config(&self.cert(id), &self.roots()).unwrap()
    }
    pub fn client_config(&self, me: &SpiffeId, expect: &SpiffeId) -> Arc<rustls::ClientConfig> {
        tls::client_config(&self.cert(me), &self.roots(), vec![expect.clone()]).unwrap()
    }
}

/// Run a test body on a current-thread runtime inside a LocalSet (HBONE state is worker-local).
pub fn run_local<F: Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local
        .block_on(&rt, async {
            tokio::time::timeout(Duration::from_secs(120), f).await
        })
        .expect("test timed out");
}

/// What the HBONE server does with each accepted CONNECT.
pub type Handler = Rc<dyn Fn(Incoming) -> std::pin::Pin<Box<dyn Future<Output = ()>>>>;

/// Accept the CONNECT, dial the target over TCP and relay (503 if the target is down).
pub fn relay_handler() -> Handler {
    Rc::new(|incoming: Incoming| {
        Box::pin(async move {
            let target = incoming.request.target;
            match TcpStream::connect(target).await {
                Ok(up) => {
                    let Ok(stream) = incoming.accept() else {
                        return;
                    };
                    let _ = relay::copy_bidirectional(up, stream).await;
                }
                Err(_) => incoming.reject(http::StatusCode::SERVICE_UNAVAILABLE),
            }
        })
    })
}

/// An HBONE server on loopback; config swappable for rotation tests.
pub struct HboneServer {
    pub addr: SocketAddr,
    pub config: Rc<Swappable<rustls::ServerConfig>>,
    pub peers: Rc<std::cell::RefCell<Vec<Option<SpiffeId>>>>,
    /// `notify_waiters()` makes every live connection send GOAWAY and drain.
    pub shutdown: Rc<tokio::sync::Notify>,
}

pub async fn hbone_server(
    config: Arc<rustls::ServerConfig>,
    settings: H2Settings,
    handler: Handler,
) -> HboneServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Rc::new(Swappable::new(config));
    let peers = Rc::new(std::cell::RefCell::new(Vec::new()));
    let shutdown = Rc::new(tokio::sync::Notify::new());
    let (cfg, p, sd) = (config.clone(), peers.clone(), shutdown.clone());
    tokio::task::spawn_local(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = TlsAcceptor::from(cfg.load());
            let handler = handler.clone();
            let settings = settings.clone();
            let p = p.clone();
            let sd = sd.clone();
            tokio::task::spawn_local(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!("server TLS accept failed: {e}");
                        return;
                    }
                };
                let peer = tls::peer_identity(tls.get_ref().1);
                p.borrow_mut().push(peer.clone());
                let h = handler.clone();
                let stop = sd.notified();
                let _ = server::serve(tls, peer, &settings, TokioLocal, move |i| h(i), stop).await;
            });
        }
    });
    HboneServer {
        addr,
        config,
        peers,
        shutdown,
    }
}

/// Dial the HBONE server: TCP + TLS.
pub async fn dial_tls(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(cfg)
        .connect(tls::server_name(addr.ip()), tcp)
        .await
}

/// Dial and complete the HTTP/2 handshake.
pub async fn h2_client(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> h2::client::SendRequest<bytes::Bytes> {
    let tls = dial_tls(addr, cfg).await.expect("TLS to the HBONE server");
    client::handshake(tls, &H2Settings::default(), &TokioLocal)
        .await
        .expect("h2 handshake")
        .0
}

/// A local TCP front door: every connection to it is tunnelled through a CONNECT to `target`.
pub async fn tunnel_entry(
    send: h2::client::SendRequest<bytes::Bytes>,
    target: SocketAddr,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::task::spawn_local(async move {
        loop {
            let Ok((sock, peer)) = listener.accept().await else {
                return;
            };
            let send = send.clone();
            tokio::task::spawn_local(async move {
                let headers = ConnectHeaders {
                    forwarded_for: Some(peer),
                    ..Default::default()
                };
                match client::open(&send, target, &headers).await {
                    Ok(stream) => {
                        let _ = relay::copy_bidirectional(sock, stream).await;
                    }
                    Err(e) => {
                        use zring_hbone::relay::ResetOnClose;
                        tracing::debug!("CONNECT failed: {e}");
                        sock.reset_on_close();
                    }
                }
            });
        }
    });
    addr
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// FNV-1a over a stream of bytes: both ends hash what they sent/received and compare.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);

impl Fnv {
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Deterministic bytes from a seed (an LCG; fast enough for 100 MiB).
pub fn fill(seed: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let w = seed.to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
}

/// Blocking: send `len` seeded bytes then half-close; returns the hash of what was sent.
pub fn send_blocking(conn: &mut std::net::TcpStream, seed: u64, len: u64) -> std::io::Result<u64> {
    use std::io::Write;
    let mut s = seed;
    let mut h = Fnv::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        fill(&mut s, &mut buf[..n]);
        h.update(&buf[..n]);
        conn.write_all(&buf[..n])?;
        left -= n as u64;
    }
    conn.shutdown(std::net::Shutdown::Write)?;
    Ok(h.0)
}

/// Blocking: read to EOF; returns (bytes, hash).
pub fn recv_blocking(conn: &mut std::net::TcpStream) -> std::io::Result<(u64, u64)> {
    use std::io::Read;
    let mut h = Fnv::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok((total, h.0));
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
}
