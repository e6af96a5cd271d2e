//! The SOCKS5 server side (RFC 1928), for hosts without traffic capture: no authentication,
//! CONNECT to an IPv4 or IPv6 address or a domain name (the caller resolves it: ztunnel
//! resolves names through its DNS proxy, zring against the mesh's service hostnames). Parsing
//! is separate from I/O so it is tested on bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// SOCKS5 reply codes zring uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    /// Succeeded.
    Ok = 0,
    /// General failure.
    Failure = 1,
    /// Connection not allowed by ruleset (policy denied).
    NotAllowed = 2,
    /// Host unreachable.
    HostUnreachable = 4,
    /// Connection refused.
    Refused = 5,
    /// Command not supported.
    CommandNotSupported = 7,
    /// Address type not supported.
    AddressNotSupported = 8,
}

/// What a SOCKS5 request asks to reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An address.
    Addr(SocketAddr),
    /// A domain name (ATYP 3) and port; valid UTF-8, 1 to 255 bytes.
    Name(String, u16),
}

/// Parse the greeting (`VER NMETHODS METHODS...`). Returns how many bytes it took, or `None` if
/// more are needed; an error if it is not SOCKS5 or offers no "no authentication" method.
pub fn parse_greeting(buf: &[u8]) -> Result<Option<usize>, &'static str> {
    if buf.len() < 2 {
        return Ok(None);
    }
    if buf[0] != 5 {
        return Err("not SOCKS5");
    }
    let n = 2 + buf[1] as usize;
    if buf.len() < n {
        return Ok(None);
    }
    if !buf[2..n].contains(&0) {
        return Err("client offers no 'no authentication' method");
    }
    Ok(Some(n))
}

/// Parse a request (`VER CMD RSV ATYP ADDR PORT`). Returns the target and the bytes taken, or
/// `None` if more are needed; `Err(reply)` says what to answer.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Target, usize)>, Reply> {
    if buf.len() < 4 {
        return Ok(None);
    }
    if buf[0] != 5 {
        return Err(Reply::Failure);
    }
    if buf[1] != 1 {
        return Err(Reply::CommandNotSupported);
    }
    let port_at = |len: usize| u16::from_be_bytes([buf[len - 2], buf[len - 1]]);
    match buf[3] {
        1 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let ip = Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]);
            Ok(Some((
                Target::Addr(SocketAddr::new(ip.into(), port_at(10))),
                10,
            )))
        }
        4 => {
            if buf.len() < 22 {
                return Ok(None);
            }
            let mut o = [0u8; 16];
            o.copy_from_slice(&buf[4..20]);
            let ip = IpAddr::from(Ipv6Addr::from(o));
            Ok(Some((Target::Addr(SocketAddr::new(ip, port_at(22))), 22)))
        }
        3 => {
            let Some(&n) = buf.get(4) else {
                return Ok(None);
            };
            let len = 5 + n as usize + 2;
            if n == 0 {
                return Err(Reply::HostUnreachable);
            }
            if buf.len() < len {
                return Ok(None);
            }
            let name =
                std::str::from_utf8(&buf[5..5 + n as usize]).map_err(|_| Reply::HostUnreachable)?;
            Ok(Some((Target::Name(name.to_string(), port_at(len)), len)))
        }
        _ => Err(Reply::AddressNotSupported),
    }
}

/// The reply bytes (bound address 0.0.0.0:0).
pub fn reply(code: Reply) -> [u8; 10] {
    [5, code as u8, 0, 1, 0, 0, 0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_greetings_and_requests_incrementally() {
        assert_eq!(parse_greeting(&[5]), Ok(None));
        assert_eq!(parse_greeting(&[5, 1, 0]), Ok(Some(3)));
        assert!(parse_greeting(&[4, 1, 0]).is_err());
        assert!(parse_greeting(&[5, 1, 2]).is_err());
        let req = [5, 1, 0, 1, 10, 201, 2, 2, 0x23, 0x78];
        assert_eq!(parse_request(&req[..7]), Ok(None));
        assert_eq!(
            parse_request(&req),
            Ok(Some((Target::Addr("10.201.2.2:9080".parse().unwrap()), 10)))
        );
        assert_eq!(
            parse_request(&[5, 2, 0, 1]),
            Err(Reply::CommandNotSupported)
        );
        assert_eq!(parse_request(&[5, 1, 0, 3, 4]), Ok(None));
        assert_eq!(
            parse_request(&[5, 1, 0, 9, 4]),
            Err(Reply::AddressNotSupported)
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 0, 0, 80]),
            Err(Reply::HostUnreachable)
        );
        let mut named = vec![5, 1, 0, 3, 11];
        named.extend_from_slice(b"productpage");
        named.extend_from_slice(&9080u16.to_be_bytes());
        assert_eq!(
            parse_request(&named),
            Ok(Some((
                Target::Name("productpage".into(), 9080),
                named.len()
            )))
        );
        assert_eq!(parse_request(&named[..named.len() - 1]), Ok(None));
        named[6] = 0xff;
        assert_eq!(parse_request(&named), Err(Reply::HostUnreachable));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 1u64;
        for _ in 0..20000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let len = (seed >> 59) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            let _ = parse_greeting(&bytes);
            let _ = parse_request(&bytes);
        }
    }
}
