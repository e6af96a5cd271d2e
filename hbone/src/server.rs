//! The CONNECT server: serve HBONE streams on an accepted TLS connection.
//!
//! Each valid `CONNECT <ip>:<port>` becomes an [`Incoming`] handed to the caller's handler, which
//! answers it ([`Incoming::accept`] for 200, [`Incoming::reject`] for 401, 503...). Requests that
//! are not CONNECT get 405; a missing or malformed authority gets 400. The stream limit is
//! advertised in SETTINGS and enforced by h2 (excess streams are refused). On shutdown the
//! server sends GOAWAY and lets live streams finish up to the drain deadline.
//!
//! Limits (`settings.timeouts`): the HTTP/2 preface/SETTINGS must arrive within
//! `h2_handshake`; a connection that has opened no stream within `idle_no_stream` of the
//! handshake is closed; a peer that stops answering PINGs is dropped (see [`crate::keepalive`]).

use std::{future::Future, net::SocketAddr, pin::Pin};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
pub use http::StatusCode;
use http::{HeaderMap, Method, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    identity::SpiffeId,
    keepalive,
    settings::{H2Settings, TimeoutKind},
    stream::H2Stream,
    Executor,
};

/// A validated CONNECT request.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// `:authority`, the target `ip:port`.
    pub target: SocketAddr,
    /// Request headers (`forwarded`, `baggage`, `traceparent`...).
    pub headers: HeaderMap,
    /// The client's SPIFFE id from its certificate.
    pub peer: Option<SpiffeId>,
}

/// A CONNECT stream waiting for the handler's answer.
#[derive(Debug)]
pub struct Incoming {
    /// The request.
    pub request: ConnectRequest,
    respond: SendResponse<Bytes>,
    recv: RecvStream,
}

impl Incoming {
    /// Answer 200 and return the tunnel's byte stream.
    pub fn accept(mut self) -> Result<H2Stream, h2::Error> {
        let resp = Response::builder()
            .status(StatusCode::OK)
            .body(())
            .unwrap_or_default();
        let send = self.respond.send_response(resp, false)?;
        Ok(H2Stream::new(send, self.recv))
    }

    /// Answer with an error status and end the stream.
    pub fn reject(mut self, status: StatusCode) {
        let resp = Response::builder()
            .status(status)
            .body(())
            .unwrap_or_default();
        if let Err(e) = self.respond.send_response(resp, true) {
            tracing::debug!(error = %e, "could not send the rejection");
        }
    }
}

/// Why serving a connection ended with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The HTTP/2 preface or settings exchange failed (not HTTP/2, garbage, early close).
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(h2::Error),
    /// The peer did not send the HTTP/2 preface and SETTINGS in time.
    #[error("HTTP/2 handshake not finished within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// The peer opened no stream within the idle limit after the handshake.
    #[error("no stream opened within {0:?} of the handshake; closed")]
    IdleNoStream(std::time::Duration),
    /// The peer stopped answering HTTP/2 PINGs.
    #[error("the peer stopped answering HTTP/2 PINGs; closed")]
    PeerSilent,
    /// The connection failed after the handshake.
    #[error("HTTP/2 connection error: {0}")]
    Connection(h2::Error),
}

/// Parse a CONNECT authority: it must be `ip:port` (IPv6 in brackets).
pub fn parse_authority(s: &str) -> Option<SocketAddr> {
    s.parse().ok()
}

fn check(req: &Request<RecvStream>) -> Result<SocketAddr, StatusCode> {
    if req.method() != Method::CONNECT {
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    req.uri()
        .authority()
        .and_then(|a| parse_authority(a.as_str()))
        .ok_or(StatusCode::BAD_REQUEST)
}

/// Serve CONNECT streams on `io` until the peer goes away or `shutdown` completes (then GOAWAY
/// and a drain of at most `settings.drain_timeout`). `handler` runs as its own task per stream.
pub async fn serve<IO, H, Fut, X>(
    io: IO,
    peer: Option<SpiffeId>,
    settings: &H2Settings,
    executor: X,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Incoming) -> Fut,
    Fut: Future<Output = ()> + 'static,
    X: Executor,
{
    let t = &settings.timeouts;
    let handshake = h2::server::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame)
        .max_concurrent_streams(settings.max_streams)
        .max_header_list_size(settings.max_header_list)
        .max_send_buffer_size(settings.max_frame as usize)
        .handshake::<_, Bytes>(io);
    let Some(done) = keepalive::within(&executor, t.h2_handshake, handshake).await else {
        t.fired(TimeoutKind::H2Handshake);
        return Err(ServeError::HandshakeTimeout(t.h2_handshake));
    };
    let mut conn = done.map_err(ServeError::Handshake)?;
    let mut silent: Pin<Box<dyn Future<Output = ()> + '_>> =
        Box::pin(keepalive::until_peer_silent(conn.ping_pong(), t, &executor));
    // Until the first stream: the idle limit.
    let mut idle: Option<Pin<Box<dyn Future<Output = ()>>>> =
        Some(executor.sleep(t.idle_no_stream));
    let mut shutdown: Pin<Box<dyn Future<Output = ()>>> = Box::pin(shutdown);
    let mut deadline: Option<Pin<Box<dyn Future<Output = ()>>>> = None;
    enum Next<R> {
        Deadline,
        Silent,
        Idle,
        Accepted(Option<R>),
    }
    loop {
        let next = std::future::poll_fn(|cx| {
            if deadline.is_none() && shutdown.as_mut().poll(cx).is_ready() {
                conn.graceful_shutdown();
                deadline = Some(executor.sleep(settings.drain_timeout));
            }
            if let Some(d) = deadline.as_mut() {
                if d.as_mut().poll(cx).is_ready() {
                    return std::task::Poll::Ready(Next::Deadline);
                }
            }
            if silent.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(Next::Silent);
            }
            if let Some(i) = idle.as_mut() {
                if i.as_mut().poll(cx).is_ready() {
                    return std::task::Poll::Ready(Next::Idle);
                }
            }
            conn.poll_accept(cx).map(Next::Accepted)
        })
        .await;
        let req = match next {
            Next::Deadline => {
                tracing::debug!("drain deadline passed; closing the HBONE connection");
                return Ok(());
            }
            Next::Silent => {
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                return Err(ServeError::PeerSilent);
            }
            Next::Idle => {
                t.fired(TimeoutKind::IdleNoStream);
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                return Err(ServeError::IdleNoStream(t.idle_no_stream));
            }
            Next::Accepted(None) => return Ok(()),
            Next::Accepted(Some(Err(e))) => {
                if e.is_go_away() || e.is_io() {
                    tracing::debug!(error = %e, "HBONE connection ended");
                    return Ok(());
                }
                return Err(ServeError::Connection(e));
            }
            Next::Accepted(Some(Ok(r))) => r,
        };
        idle = None;
        let (req, mut respond) = req;
        match check(&req) {
            Err(status) => {
                tracing::debug!(method = %req.method(), uri = %req.uri(), %status, "rejecting a malformed HBONE request");
                let resp = Response::builder()
                    .status(status)
                    .body(())
                    .unwrap_or_default();
                let _ = respond.send_response(resp, true);
            }
            Ok(target) => {
                let (parts, recv) = req.into_parts();
                let incoming = Incoming {
                    request: ConnectRequest {
                        target,
                        headers: parts.headers,
                        peer: peer.clone(),
                    },
                    respond,
                    recv,
                };
                executor.spawn(Box::pin(handler(incoming)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::parse_authority;

    #[test]
    fn authorities_must_be_ip_and_port() {
        assert_eq!(
            parse_authority("10.0.0.1:9080"),
            Some("10.0.0.1:9080".parse().unwrap())
        );
        assert_eq!(
            parse_authority("[fd00::1]:15008"),
            Some("[fd00::1]:15008".parse().unwrap())
        );
        for bad in [
            "",
            "10.0.0.1",
            "productpage:9080",
            "10.0.0.1:",
            "10.0.0.1:70000",
            "fd00::1:80",
            "http://10.0.0.1:80",
        ] {
            assert_eq!(parse_authority(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn every_ip_and_port_round_trips(a in any::<[u8; 4]>(), b in any::<[u16; 8]>(), port in any::<u16>()) {
            let v4 = std::net::SocketAddr::from((a, port));
            prop_assert_eq!(parse_authority(&v4.to_string()), Some(v4));
            let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::from(b), port));
            prop_assert_eq!(parse_authority(&v6.to_string()), Some(v6));
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,64}") {
            let _ = parse_authority(&s);
        }
    }
}
