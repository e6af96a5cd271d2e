//! A minimal SOCKS5 client (RFC 1928): no authentication, CONNECT to an IP address.

use std::{io, net::SocketAddr};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Ask the proxy on `stream` to connect to `target`.
pub async fn handshake(stream: &mut TcpStream, target: SocketAddr) -> io::Result<()> {
    stream.write_all(&[5, 1, 0]).await?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await?;
    if choice != [5, 0] {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SOCKS5 proxy refused no-auth (answered {choice:?})"),
        ));
    }
    let mut req = vec![5, 1, 0];
    match target {
        SocketAddr::V4(v4) => {
            req.push(1);
            req.extend_from_slice(&v4.ip().octets());
        }
        SocketAddr::V6(v6) => {
            req.push(4);
            req.extend_from_slice(&v6.ip().octets());
        }
    }
    req.extend_from_slice(&target.port().to_be_bytes());
    stream.write_all(&req).await?;
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a SOCKS5 reply",
        ));
    }
    if head[1] != 0 {
        let kind = match head[1] {
            5 => io::ErrorKind::ConnectionRefused,
            3 | 4 => io::ErrorKind::HostUnreachable,
            _ => io::ErrorKind::Other,
        };
        return Err(io::Error::new(
            kind,
            format!("SOCKS5 CONNECT failed with reply code {}", head[1]),
        ));
    }
    let skip = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut len = [0u8; 1];
            stream.read_exact(&mut len).await?;
            len[0] as usize + 2
        }
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("SOCKS5 reply address type {other}"),
            ))
        }
    };
    let mut rest = vec![0u8; skip];
    stream.read_exact(&mut rest).await?;
    Ok(())
}
