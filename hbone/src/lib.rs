//! HBONE: the tunnel every byte of mesh traffic crosses. HTTP/2 `CONNECT` streams inside mutual
//! TLS 1.3, where each side proves a SPIFFE identity.
//!
//! Layers, bottom up:
//! - [`identity`]: `SpiffeId` and `TrustDomain`, parsed at the edge.
//! - [`cert`]: a leaf certificate's identity and validity.
//! - [`ca`]: a local certificate authority (tests, the demo, clusters without istiod) and PEM
//!   loading of workload certificates and trust bundles.
//! - [`tls`]: rustls configs: TLS 1.3 only, ALPN `h2`, AES-GCM; the client checks the server's
//!   SPIFFE id against the expected ones; hot-swappable certificates.
//! - [`stream`]: a CONNECT stream as a tokio `AsyncRead + AsyncWrite`, with flow control.
//! - [`server`] / [`client`]: CONNECT over an established TLS connection.
//! - [`relay`]: the copy between a TCP socket and a CONNECT stream (FIN <-> END_STREAM,
//!   RST <-> RST_STREAM).
//! - [`pool`]: the per-worker connection pool.
//! - [`keepalive`]: bounded waits and the HTTP/2 PING keepalive ([`settings::Timeouts`]).
//!
//! Everything is generic over tokio's `AsyncRead + AsyncWrite`, so it runs on monoio's poll-io
//! streams in zring and on tokio sockets in tests.

#![forbid(unsafe_code)]

pub mod ca;
pub mod cert;
pub mod client;
pub mod identity;
pub mod keepalive;
pub mod pool;
pub mod relay;
pub mod server;
pub mod settings;
pub mod stream;
pub mod tls;

pub use identity::{SpiffeId, TrustDomain};
pub use settings::H2Settings;

use std::{future::Future, pin::Pin, time::Duration};

/// A boxed future that need not be `Send` (HBONE state lives on one worker).
pub type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;

/// What HBONE needs from the runtime it runs on: spawning worker-local tasks and sleeping.
/// zring implements it for monoio; [`TokioLocal`] implements it for a tokio `LocalSet`.
pub trait Executor: Clone + 'static {
    /// Run `fut` to completion on the current worker.
    fn spawn(&self, fut: LocalFuture);
    /// A future that completes after `d`.
    fn sleep(&self, d: Duration) -> LocalFuture;
}

/// [`Executor`] for code running inside a tokio `LocalSet`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioLocal;

impl Executor for TokioLocal {
    fn spawn(&self, fut: LocalFuture) {
        tokio::task::spawn_local(fut);
    }
    fn sleep(&self, d: Duration) -> LocalFuture {
        Box::pin(tokio::time::sleep(d))
    }
}
