//! Command-line values: durations, rates, targets.

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

/// Requests per second: a fixed rate (open loop) or as fast as possible (closed loop).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Open loop at this many requests per second in total.
    Fixed(f64),
    /// Closed loop.
    Max,
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "max" || s == "0" {
            return Ok(Self::Max);
        }
        match s.parse::<f64>() {
            Ok(r) if r > 0.0 && r.is_finite() => Ok(Self::Fixed(r)),
            _ => Err(format!("--rps takes a positive number or `max`, not {s:?}")),
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(r) => write!(f, "{r}"),
            Self::Max => f.write_str("max"),
        }
    }
}

/// A duration written like `5s`, `250ms`, `2m` or `1m30s` (a bare number means seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(secs) = s.parse::<f64>() {
            if secs >= 0.0 && secs.is_finite() {
                return Ok(Self(Duration::from_secs_f64(secs)));
            }
        }
        humantime::parse_duration(s)
            .map(Self)
            .map_err(|e| format!("bad duration {s:?} ({e}); write it like 5s, 250ms or 2m"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// Where the load goes: `host:port`, or an `http://host:port/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Resolved address to connect to.
    pub addr: SocketAddr,
    /// `Host` header value (and the SOCKS5 destination name).
    pub host: String,
    /// Request path for HTTP.
    pub path: String,
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hostport, path) = match s.strip_prefix("http://") {
            Some(rest) => match rest.find('/') {
                Some(i) => (&rest[..i], rest[i..].to_string()),
                None => (rest, "/".to_string()),
            },
            None if s.starts_with("https://") => {
                return Err("https targets are not supported; use http:// or host:port".into())
            }
            None => (s, "/".to_string()),
        };
        let hostport = if hostport.contains(':') || hostport.starts_with('[') {
            hostport.to_string()
        } else {
            format!("{hostport}:80")
        };
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&hostport)
            .map_err(|e| format!("cannot resolve {hostport:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{hostport:?} resolves to no address"))?;
        Ok(Self {
            addr,
            host: hostport,
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_wrk_and_fortio() {
        assert_eq!(
            "5s".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(5)
        );
        assert_eq!(
            "2m".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(120)
        );
        assert_eq!(
            "250ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(
            "1.5".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(1500)
        );
        assert!("soon".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn targets_accept_urls_and_host_ports() {
        let t: Target = "http://127.0.0.1:8080/echo?size=10".parse().unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.path, "/echo?size=10");
        let t: Target = "127.0.0.1:9".parse().unwrap();
        assert_eq!(t.path, "/");
        assert!("https://127.0.0.1:1/".parse::<Target>().is_err());
    }

    #[test]
    fn rates_are_positive_or_max() {
        assert_eq!("max".parse::<Rate>().unwrap(), Rate::Max);
        assert_eq!("1000".parse::<Rate>().unwrap(), Rate::Fixed(1000.0));
        assert!("-1".parse::<Rate>().is_err());
    }
}
