//! [`Target`]: the destination a client asked for, as `host:port`.
//!
//! Parsed from an HTTP `CONNECT` authority or built from a SOCKS address. IPv6 literals are
//! written in brackets (`[::1]:443`); domains are kept as given (lower-cased) so a `socks5h` or
//! HTTP upstream resolves them remotely.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// A host: an IP address or a domain name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Ip(IpAddr),
    Domain(String),
}

/// A destination `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

/// Why a `host:port` string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetParseError {
    #[error("missing port in {0:?}")]
    MissingPort(String),
    #[error("invalid port in {0:?}")]
    InvalidPort(String),
    #[error("invalid host in {0:?}")]
    InvalidHost(String),
}

impl Host {
    /// Parses a host as it appears in a URL or authority: `[v6]`, v4, or a domain name.
    pub fn parse(s: &str) -> Option<Host> {
        if let Some(inner) = s.strip_prefix('[') {
            let inner = inner.strip_suffix(']')?;
            return inner
                .parse::<std::net::Ipv6Addr>()
                .ok()
                .map(|ip| Host::Ip(IpAddr::V6(ip)));
        }
        if let Ok(ip) = s.parse::<std::net::Ipv4Addr>() {
            return Some(Host::Ip(IpAddr::V4(ip)));
        }
        Self::domain(s)
    }

    /// Accepts a domain name (letters, digits, `-`, `_`, `.`; at most 255 bytes).
    pub fn domain(s: &str) -> Option<Host> {
        let valid = !s.is_empty()
            && s.len() <= 255
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        valid.then(|| Host::Domain(s.to_ascii_lowercase()))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Domain(d) => f.write_str(d),
        }
    }
}

impl Target {
    pub fn new(host: Host, port: u16) -> Self {
        Self { host, port }
    }

    /// Parses an authority `host:port` (`[::1]:443` for IPv6). The port is required and must
    /// not be 0.
    pub fn parse_authority(s: &str) -> Result<Target, TargetParseError> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| TargetParseError::MissingPort(s.to_owned()))?;
        Self::from_parts(host, parse_port(port), || s.to_owned())
    }

    /// What [`Target::parse_authority`] makes of `host:port`, without writing that out: for a
    /// URI's host (as `http::Uri::host` gives it: `[v6]`, v4 or a name) and port. The string
    /// is written only for an error's message.
    pub fn from_host_port(host: &str, port: u16) -> Result<Target, TargetParseError> {
        Self::from_parts(host, (port != 0).then_some(port), || {
            format!("{host}:{port}")
        })
    }

    /// The host and port rules both share, checked in one order (`port`: `None` when it was
    /// invalid); `written` gives the authority for an error's message.
    fn from_parts(
        host: &str,
        port: Option<u16>,
        written: impl Fn() -> String,
    ) -> Result<Target, TargetParseError> {
        if host.contains(':') && !host.starts_with('[') {
            // A bare IPv6 address without brackets is ambiguous.
            return Err(TargetParseError::InvalidHost(written()));
        }
        let port = port.ok_or_else(|| TargetParseError::InvalidPort(written()))?;
        let host = Host::parse(host).ok_or_else(|| TargetParseError::InvalidHost(written()))?;
        Ok(Target { host, port })
    }

    /// The socket address when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self.host {
            Host::Ip(ip) => Some(SocketAddr::new(ip, self.port)),
            Host::Domain(_) => None,
        }
    }
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Self {
        Target::new(Host::Ip(addr.ip()), addr.port())
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl Target {
    /// Appends `host:port` exactly as [`Display`](fmt::Display) writes it, without the fmt
    /// machinery for an IPv4 address or a name: every CONNECT to an HTTP upstream carries the
    /// target twice, and `Ipv4Addr`'s `Display` alone cost more instructions per tunnel than
    /// the rest of the request.
    pub fn push_authority(&self, out: &mut Vec<u8>) {
        match &self.host {
            Host::Ip(IpAddr::V4(ip)) => {
                // Written on the stack and appended at once: one capacity check, not one
                // per byte. "255.255.255.255:65535" is 21 bytes.
                let mut buf = [0u8; 21];
                let mut at = 0;
                for (i, octet) in ip.octets().into_iter().enumerate() {
                    if i > 0 {
                        buf[at] = b'.';
                        at += 1;
                    }
                    at += write_decimal(&mut buf[at..], octet.into());
                }
                buf[at] = b':';
                at += 1;
                at += write_decimal(&mut buf[at..], self.port);
                out.extend_from_slice(&buf[..at]);
                return;
            }
            Host::Domain(name) => out.extend_from_slice(name.as_bytes()),
            Host::Ip(IpAddr::V6(ip)) => {
                use std::io::Write as _;
                // Writing to a Vec cannot fail.
                let _ = write!(out, "[{ip}]");
            }
        }
        out.push(b':');
        push_decimal(out, self.port);
    }
}

/// Appends `n` in decimal, no leading zeros (as `Display` writes it, without fmt).
pub fn push_decimal(out: &mut Vec<u8>, n: u16) {
    let mut buf = [0u8; 5];
    let len = write_decimal(&mut buf, n);
    out.extend_from_slice(&buf[..len]);
}

/// Writes `n` in decimal, no leading zeros, at the start of `buf` (at least 5 bytes, or as
/// many as `n` has digits): how many bytes it wrote.
fn write_decimal(buf: &mut [u8], n: u16) -> usize {
    let len = match n {
        0..=9 => 1,
        10..=99 => 2,
        100..=999 => 3,
        1_000..=9_999 => 4,
        _ => 5,
    };
    let mut n = n;
    for slot in buf[..len].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
    len
}

/// A decimal port in 1..=65535.
pub(crate) fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_authorities() {
        let t = Target::parse_authority("Example.COM:443").unwrap();
        assert_eq!(t.host, Host::Domain("example.com".into()));
        assert_eq!(t.port, 443);
        let t = Target::parse_authority("[::1]:8443").unwrap();
        assert_eq!(t.to_string(), "[::1]:8443");
        assert_eq!(t.socket_addr().unwrap(), "[::1]:8443".parse().unwrap());
        let t = Target::parse_authority("10.1.2.3:80").unwrap();
        assert_eq!(t.to_string(), "10.1.2.3:80");
    }

    #[test]
    fn refuses_bad_authorities() {
        for bad in [
            "example.com",
            "example.com:",
            "example.com:0",
            "example.com:65536",
            "example.com:+80",
            "::1:443",
            "[::1:443",
            "[zz]:443",
            ":80",
            "exa mple.com:80",
            "a/b:80",
        ] {
            assert!(Target::parse_authority(bad).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn push_authority_writes_what_display_does() {
        for t in [
            "0.0.0.0:1",
            "255.255.255.255:65535",
            "10.0.20.100:80",
            "[::1]:443",
            "[2001:db8::8:800:200c:417a]:8080",
            "example.com:10000",
        ] {
            let t = Target::parse_authority(t).unwrap();
            let mut out = b"x".to_vec();
            t.push_authority(&mut out);
            assert_eq!(out, format!("x{t}").into_bytes());
        }
    }

    proptest! {
        #[test]
        fn from_host_port_is_parse_authority_of_the_two_written(
            host in prop_oneof![
                "[a-zA-Z0-9._-]{0,12}",
                "[0-9.]{1,15}",
                r"\[[0-9a-fA-F:.]{0,20}\]",
                "[ -~]{0,16}",
                any::<IpAddr>().prop_map(|ip| Target::from(SocketAddr::new(ip, 1)).host.to_string()),
            ],
            port in prop_oneof![Just(0u16), any::<u16>()],
        ) {
            let direct = Target::from_host_port(&host, port);
            let parsed = Target::parse_authority(&format!("{host}:{port}"));
            prop_assert_eq!(direct, parsed);
        }

        #[test]
        fn push_authority_matches_display(
            ip in any::<IpAddr>(),
            name in "[a-z0-9][a-z0-9.-]{0,30}",
            port in any::<u16>(),
        ) {
            for host in [Host::Ip(ip), Host::Domain(name.clone())] {
                let t = Target::new(host, port);
                let mut out = Vec::new();
                t.push_authority(&mut out);
                prop_assert_eq!(out, t.to_string().into_bytes());
            }
        }

        #[test]
        fn never_panics(s in ".{0,64}") {
            let _ = Target::parse_authority(&s);
        }

        #[test]
        fn display_round_trips(a in any::<[u8; 4]>(), port in 1u16..) {
            let t = Target::from(SocketAddr::from((a, port)));
            prop_assert_eq!(Target::parse_authority(&t.to_string()).unwrap(), t);
        }
    }
}
