//! The CONNECT client: open HBONE streams on an established TLS connection.

use std::{
    net::{IpAddr, SocketAddr},
    rc::Rc,
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{settings::H2Settings, stream::H2Stream, Executor};

/// Headers zring sends with each CONNECT.
#[derive(Debug, Clone, Default)]
pub struct ConnectHeaders {
    /// The original client address, sent as `Forwarded: for="<ip>"`.
    pub forwarded_for: Option<IpAddr>,
    /// W3C `baggage`.
    pub baggage: Option<String>,
    /// W3C `traceparent`.
    pub traceparent: Option<String>,
}

/// Why a CONNECT did not produce a tunnel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// 401: the destination's policy denied this identity.
    #[error("denied by the destination's authorization policy (401)")]
    Denied,
    /// 503 / 502: the destination could not reach the target.
    #[error("destination could not reach the target ({0})")]
    Unavailable(StatusCode),
    /// 400 / 405: the destination found the request malformed.
    #[error("destination rejected the request as malformed ({0})")]
    BadRequest(StatusCode),
    /// Any other non-200 status.
    #[error("unexpected status {0}")]
    Status(StatusCode),
    /// The HTTP/2 connection or stream failed (GOAWAY, reset, I/O). The pool retires the
    /// connection on these.
    #[error("HBONE stream failed: {0}")]
    H2(#[from] h2::Error),
}

impl ConnectError {
    /// Whether the connection itself is unusable (as opposed to this one request failing).
    pub fn is_connection_level(&self) -> bool {
        match self {
            Self::H2(e) => {
                e.is_go_away()
                    || e.is_io()
                    || e.reason() == Some(h2::Reason::REFUSED_STREAM)
                    || !e.is_reset()
            }
            _ => false,
        }
    }
}

/// Perform the HTTP/2 client handshake on `io` and run the connection on `executor`. Returns the
/// request handle and a flag that turns true when the connection has ended.
pub async fn handshake<IO, X>(
    io: IO,
    settings: &H2Settings,
    executor: &X,
) -> Result<(SendRequest<Bytes>, Rc<std::cell::Cell<bool>>), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + 'static,
    X: Executor,
{
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame)
        .max_header_list_size(settings.max_header_list)
        .max_send_buffer_size(settings.max_frame as usize)
        .max_concurrent_reset_streams(settings.max_streams as usize)
        .handshake::<_, Bytes>(io)
        .await?;
    let closed = Rc::new(std::cell::Cell::new(false));
    let c = closed.clone();
    executor.spawn(Box::pin(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "HBONE client connection ended");
        }
        c.set(true);
    }));
    Ok((send, closed))
}

/// Open a CONNECT stream to `target`.
pub async fn open(
    send: &SendRequest<Bytes>,
    target: SocketAddr,
    headers: &ConnectHeaders,
) -> Result<H2Stream, ConnectError> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string());
    if let Some(ip) = headers.forwarded_for {
        let v = match ip {
            IpAddr::V4(v4) => format!("for=\"{v4}\""),
            IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
        };
        req = req.header("forwarded", v);
    }
    if let Some(b) = &headers.baggage {
        req = req.header("baggage", b);
    }
    if let Some(t) = &headers.traceparent {
        req = req.header("traceparent", t);
    }
    let req = req
        .body(())
        .map_err(|_| ConnectError::BadRequest(StatusCode::BAD_REQUEST))?;
    let mut send = send.clone().ready().await?;
    let (resp, stream) = send.send_request(req, false)?;
    let resp = resp.await?;
    match resp.status() {
        StatusCode::OK => Ok(H2Stream::new(stream, resp.into_body())),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(ConnectError::Denied),
        s @ (StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::BAD_GATEWAY
        | StatusCode::GATEWAY_TIMEOUT) => Err(ConnectError::Unavailable(s)),
        s @ (StatusCode::BAD_REQUEST | StatusCode::METHOD_NOT_ALLOWED) => {
            Err(ConnectError::BadRequest(s))
        }
        s => Err(ConnectError::Status(s)),
    }
}
