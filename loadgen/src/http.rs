//! HTTP/1.1 framing for the client (one response at a time on a keep-alive connection) and the
//! server (one request at a time).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest header block either side accepts.
pub const MAX_HEAD: usize = 64 * 1024;

/// Build a request. With a body, it is a POST of `body` bytes, otherwise a GET.
pub fn request(host: &str, path: &str, body: usize) -> Vec<u8> {
    let mut r = if body > 0 {
        format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: zring-loadgen\r\nContent-Length: {body}\r\n\r\n").into_bytes()
    } else {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: zring-loadgen\r\n\r\n")
            .into_bytes()
    };
    r.resize(r.len() + body, b'x');
    r
}

/// A response's status and the bytes it took on the wire.
#[derive(Debug, Clone, Copy)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Header plus body bytes.
    pub bytes: usize,
    /// Whether the server asked to close the connection.
    pub close: bool,
}

/// Why a response was not read.
#[derive(Debug)]
pub enum ReadError {
    /// The socket failed or closed early.
    Io(io::Error),
    /// The bytes were not a valid HTTP/1.1 response of a length we can frame.
    Bad(String),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Read one response from `r`. `buf` keeps bytes between calls (it must be empty afterwards:
/// this client never pipelines, so leftover bytes are a protocol error).
pub async fn read_response<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Response, ReadError> {
    buf.clear();
    let (status, head_len, length, close) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let status = resp.code.unwrap_or(0);
                let mut length = None;
                let mut close = false;
                for h in resp.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        let v = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse::<usize>().ok());
                        length =
                            Some(v.ok_or_else(|| ReadError::Bad("invalid Content-Length".into()))?);
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(ReadError::Bad("chunked responses are not supported; the server must send Content-Length".into()));
                    } else if h.name.eq_ignore_ascii_case("connection")
                        && h.value.eq_ignore_ascii_case(b"close")
                    {
                        close = true;
                    }
                }
                let length = match (length, status) {
                    (Some(l), _) => l,
                    (None, 204) | (None, 304) => 0,
                    (None, _) => {
                        return Err(ReadError::Bad("response without Content-Length".into()))
                    }
                };
                break (status, n, length, close);
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD {
                    return Err(ReadError::Bad("response header larger than 64 KiB".into()));
                }
                read_more(r, buf).await?;
            }
            Err(e) => return Err(ReadError::Bad(format!("malformed response: {e}"))),
        }
    };
    let total = head_len + length;
    while buf.len() < total {
        read_more(r, buf).await?;
    }
    if buf.len() > total {
        return Err(ReadError::Bad("bytes after the response body".into()));
    }
    Ok(Response {
        status,
        bytes: total,
        close,
    })
}

async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.reserve(16 * 1024);
    let n = r.read_buf(buf).await?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed mid-response",
        ));
    }
    Ok(())
}

/// A parsed request head, for the server.
#[derive(Debug)]
pub struct RequestHead {
    /// Header bytes.
    pub head_len: usize,
    /// Body bytes that follow.
    pub body_len: usize,
    /// `Connection: close` was asked.
    pub close: bool,
    /// `?size=N` in the path, fortio's way to ask for a response size.
    pub size: Option<usize>,
    /// The path is [`STATS_PATH`]: the server's own counters are asked for.
    pub stats: bool,
}

/// The path at which `zring-loadgen serve http` reports how many requests it served, so a test
/// can check a client's count against the server's.
pub const STATS_PATH: &str = "/__zring-loadgen/stats";

/// Parse a request head from `buf`, if complete.
pub fn parse_request(buf: &[u8]) -> Result<Option<RequestHead>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) => {
            let mut body_len = 0;
            let mut close = req.version == Some(0);
            for h in req.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    body_len = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse().ok())
                        .ok_or("invalid Content-Length")?;
                } else if h.name.eq_ignore_ascii_case("connection") {
                    close = h.value.eq_ignore_ascii_case(b"close");
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    return Err("chunked requests are not supported".into());
                }
            }
            let size = req
                .path
                .and_then(|p| p.split_once("size="))
                .and_then(|(_, v)| v.split('&').next().and_then(|n| n.parse().ok()));
            let stats = req.path == Some(STATS_PATH);
            Ok(Some(RequestHead {
                head_len,
                body_len,
                close,
                size,
                stats,
            }))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(format!("malformed request: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_a_response_with_body() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec();
        let mut r = &wire[..];
        let mut buf = Vec::new();
        let resp = read_response(&mut r, &mut buf).await.unwrap();
        assert_eq!((resp.status, resp.bytes), (200, wire.len()));
    }

    #[tokio::test]
    async fn rejects_garbage_and_truncation() {
        let mut buf = Vec::new();
        let mut r = &b"SSH-2.0-OpenSSH\r\n\r\n"[..];
        assert!(matches!(
            read_response(&mut r, &mut buf).await,
            Err(ReadError::Bad(_))
        ));
        let mut r = &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"[..];
        assert!(matches!(
            read_response(&mut r, &mut buf).await,
            Err(ReadError::Io(_))
        ));
    }

    #[test]
    fn parses_requests_with_size_and_body() {
        let head = parse_request(b"POST /x?size=1024 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap()
            .unwrap();
        assert_eq!(
            (head.body_len, head.size, head.close),
            (3, Some(1024), false)
        );
        assert!(parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .unwrap()
            .is_none());
    }
}
