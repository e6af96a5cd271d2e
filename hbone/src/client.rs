//! The CONNECT client: open HBONE streams on an established TLS connection.

use std::{net::SocketAddr, rc::Rc};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{header::FORWARDED, HeaderName, HeaderValue, Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    keepalive,
    settings::{H2Settings, TimeoutKind},
    stream::H2Stream,
    Executor,
};

/// Headers zring sends with each CONNECT, as ztunnel sends them.
#[derive(Debug, Clone, Default)]
pub struct ConnectHeaders {
    /// The original client address, sent as `Forwarded: for="<ip>:<port>"`.
    pub forwarded_for: Option<SocketAddr>,
    /// The service the client meant to reach, sent as `;host=<hostname>` in `Forwarded` (the
    /// destination uses it to label its metrics with the right service).
    pub forwarded_host: Option<String>,
    /// W3C `baggage`.
    pub baggage: Option<String>,
    /// W3C `traceparent`.
    pub traceparent: Option<String>,
}

const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// A CONNECT header value. One that differs on every stream (`per_stream`: the client's
/// address and port, a fresh trace id) is sent as a literal that neither side's HPACK table
/// keeps ("never indexed"). Indexed, each one took a slot in the encoder's and the decoder's
/// dynamic tables, evicting entries that do repeat (`baggage`, the target), and the last few
/// dozen stayed alive there for as long as the pooled connection: small allocations from the
/// end of a burst, scattered over allocator pages that could not be given back after the
/// burst's connections closed.
fn header_value<V>(v: V, per_stream: bool) -> Result<HeaderValue, ConnectError>
where
    HeaderValue: TryFrom<V>,
{
    let mut v =
        HeaderValue::try_from(v).map_err(|_| ConnectError::BadRequest(StatusCode::BAD_REQUEST))?;
    v.set_sensitive(per_stream);
    Ok(v)
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
    /// No response to the CONNECT within the limit (the stream is reset).
    #[error(
        "no response to CONNECT within {0:?} (the destination node may be overloaded or gone)"
    )]
    Timeout(std::time::Duration),
}

/// Why an HTTP/2 handshake (preface and SETTINGS) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer broke the handshake (not HTTP/2, garbage, early close).
    #[error("HTTP/2 handshake failed: {0}")]
    H2(#[from] h2::Error),
    /// The peer did not finish the handshake in time.
    #[error("HTTP/2 handshake not finished within {0:?}")]
    Timeout(std::time::Duration),
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

/// Perform the HTTP/2 client handshake on `io` (bounded by `settings.timeouts.h2_handshake`)
/// and run the connection on `executor`, with PING keepalive. Returns the request handle and a
/// flag that turns true when the connection has ended (closed, failed, or declared dead by the
/// keepalive).
pub async fn handshake<IO, X>(
    io: IO,
    settings: &H2Settings,
    executor: &X,
) -> Result<(SendRequest<Bytes>, Rc<std::cell::Cell<bool>>), HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin + 'static,
    X: Executor,
{
    let handshake = h2::client::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame)
        .max_header_list_size(settings.max_header_list)
        .max_send_buffer_size(settings.max_frame as usize)
        .max_concurrent_reset_streams(settings.max_streams as usize)
        .handshake::<_, Bytes>(io);
    let limit = settings.timeouts.h2_handshake;
    let Some(done) = keepalive::within(executor, limit, handshake).await else {
        settings.timeouts.fired(TimeoutKind::H2Handshake);
        return Err(HandshakeError::Timeout(limit));
    };
    let (send, mut conn) = done?;
    let closed = Rc::new(std::cell::Cell::new(false));
    let c = closed.clone();
    let ping_pong = conn.ping_pong();
    let (timeouts, x) = (settings.timeouts.clone(), executor.clone());
    executor.spawn(Box::pin(async move {
        let silent = keepalive::until_peer_silent(ping_pong, &timeouts, &x);
        match futures_util::future::select(std::pin::pin!(conn), std::pin::pin!(silent)).await {
            futures_util::future::Either::Left((Err(e), _)) => {
                tracing::debug!(error = %e, "HBONE client connection ended")
            }
            futures_util::future::Either::Left((Ok(()), _)) => {}
            // Dropping the connection fails its streams; the pool sees `closed` and dials anew.
            futures_util::future::Either::Right(_) => {}
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
        .uri(target.to_string())
        .body(())
        .map_err(|_| ConnectError::BadRequest(StatusCode::BAD_REQUEST))?;
    let h = req.headers_mut();
    if let Some(addr) = headers.forwarded_for {
        let v = match &headers.forwarded_host {
            Some(host) => format!("for=\"{addr}\";host={host}"),
            None => format!("for=\"{addr}\""),
        };
        h.insert(FORWARDED, header_value(v, true)?);
    }
    if let Some(b) = &headers.baggage {
        h.insert(BAGGAGE, header_value(b.as_str(), false)?);
    }
    if let Some(t) = &headers.traceparent {
        h.insert(TRACEPARENT, header_value(t.as_str(), true)?);
    }
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

/// The `host=` part of a `Forwarded` header (the service the client meant), as ztunnel reads
/// it; the `for=` part is not trusted for anything.
pub fn forwarded_host(value: &str) -> Option<&str> {
    if !value.is_ascii() {
        return None;
    }
    value
        .split(';')
        .map(str::trim)
        .find_map(|part| part.strip_prefix("host="))
        .map(|h| h.trim_matches('"'))
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::forwarded_host;

    #[test]
    fn forwarded_host_reads_only_the_host_part() {
        assert_eq!(
            forwarded_host(r#"for="10.1.2.3:4567";host=reviews.default.svc.cluster.local"#),
            Some("reviews.default.svc.cluster.local")
        );
        assert_eq!(forwarded_host(r#"for="[::1]:80";host="a.b""#), Some("a.b"));
        assert_eq!(forwarded_host(r#"for="10.1.2.3:4567""#), None);
        assert_eq!(forwarded_host("host="), None);
        assert_eq!(forwarded_host("host=\u{e9}"), None);
    }
}
