//! [`Policy`]: where clients may go through the gateway.
//!
//! - Tunnels (HTTP `CONNECT`, SOCKS) only to the ports of `server.connect_ports` (default 443
//!   and 80; `"*"` allows every port): a proxy that tunnels to port 25 or 22 for anyone is how
//!   open proxies end up sending spam.
//! - No destination in loopback, private, link-local, CGNAT, unique-local, multicast or
//!   unspecified ranges, as a literal or a local name (`localhost`...), nor a name that
//!   resolves there where proxygate resolves it (SOCKS5 and SOCKS4 upstreams), unless
//!   `allow_private_networks`: the gateway must not become a way into its own network.
//!   Names an upstream resolves (HTTP, `socks5h`, `socks4a`) are the upstream's to judge.
//!
//! Refusals are 403 with `Proxy-Status` (`http_request_denied` for a port,
//! `destination_ip_prohibited` for an address) and SOCKS5 reply 0x02 ("not allowed by
//! ruleset"), SOCKS4 91. Upstreams an operator configured may live anywhere: this is about
//! what clients ask for.

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use proxygate_core::net::{is_local_name, is_private};
use proxygate_core::{ErrorKind, Host, Target};
use serde::Deserialize;

use crate::GatewayError;

/// The tunnel ports a client may ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ports {
    /// `"*"`: every port.
    Any,
    /// Ports and `"low-high"` ranges.
    Only(Vec<RangeInclusive<u16>>),
}

impl Default for Ports {
    fn default() -> Self {
        Ports::Only(vec![443..=443, 80..=80])
    }
}

impl Ports {
    pub fn allows(&self, port: u16) -> bool {
        match self {
            Ports::Any => true,
            Ports::Only(ranges) => ranges.iter().any(|r| r.contains(&port)),
        }
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ports::Any => f.write_str("*"),
            // `connect_ports = []`: an HTTP-only gateway; said so, not as an empty list.
            Ports::Only(ranges) if ranges.is_empty() => f.write_str("none"),
            Ports::Only(ranges) => {
                for (i, r) in ranges.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    if r.start() == r.end() {
                        write!(f, "{}", r.start())?;
                    } else {
                        write!(f, "{}-{}", r.start(), r.end())?;
                    }
                }
                Ok(())
            }
        }
    }
}

impl<'de> Deserialize<'de> for Ports {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Item {
            Port(u16),
            Text(String),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Star(String),
            List(Vec<Item>),
        }
        use serde::de::Error;
        let bad = |what: &str| {
            D::Error::custom(format!(
                "{what}: expected \"*\" or a list of ports and \"low-high\" ranges, e.g. [443, 80, \"8000-8100\"]"
            ))
        };
        match Raw::deserialize(d).map_err(|_| bad("invalid ports"))? {
            Raw::Star(s) if s == "*" => Ok(Ports::Any),
            Raw::Star(s) => Err(bad(&format!("{s:?}"))),
            Raw::List(items) => {
                let mut out = Vec::new();
                for item in items {
                    match item {
                        Item::Port(p) => out.push(p..=p),
                        Item::Text(t) if t == "*" => return Ok(Ports::Any),
                        Item::Text(t) => {
                            let range = t
                                .split_once('-')
                                .and_then(|(a, b)| {
                                    Some(a.trim().parse().ok()?..=b.trim().parse().ok()?)
                                })
                                .filter(|r: &RangeInclusive<u16>| r.start() <= r.end())
                                .ok_or_else(|| bad(&format!("{t:?}")))?;
                            out.push(range);
                        }
                    }
                }
                Ok(Ports::Only(out))
            }
        }
    }
}

/// Where clients may go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub ports: Ports,
    pub allow_private: bool,
}

impl Policy {
    /// May a client open a tunnel to `t`?
    pub fn tunnel(&self, t: &Target) -> Result<(), GatewayError> {
        if !self.ports.allows(t.port) {
            return Err(GatewayError::new(
                ErrorKind::DestinationPort,
                format!(
                    "tunnels to port {} are not allowed (server.connect_ports: {})",
                    t.port, self.ports
                ),
            ));
        }
        self.address(t)
    }

    /// May a client send a request (absolute form) to `t`? Every port is: it is HTTP.
    pub fn forward(&self, t: &Target) -> Result<(), GatewayError> {
        self.address(t)
    }

    fn address(&self, t: &Target) -> Result<(), GatewayError> {
        if self.allow_private {
            return Ok(());
        }
        let local = match &t.host {
            Host::Ip(ip) => is_private(*ip),
            Host::Domain(d) => is_local_name(d),
        };
        if local {
            return Err(private(t));
        }
        Ok(())
    }

    /// May a client reach `t`, resolved here to `ip`?
    pub fn resolved(&self, t: &Target, ip: IpAddr) -> Result<(), GatewayError> {
        if !self.allow_private && is_private(ip) {
            return Err(GatewayError::new(
                ErrorKind::DestinationPrivate,
                format!("{t} resolves to {ip}, a private address (allow_private_networks is off)"),
            ));
        }
        Ok(())
    }
}

fn private(t: &Target) -> GatewayError {
    GatewayError::new(
        ErrorKind::DestinationPrivate,
        format!("{t} is a loopback, private or local address (allow_private_networks is off)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(s: &str) -> Target {
        Target::parse_authority(s).unwrap()
    }

    #[test]
    fn ports_parse_and_print() {
        let p: Ports = toml::from_str::<toml::Table>("p = [443, 80, \"8000-8100\"]")
            .map(|t| t["p"].clone().try_into().unwrap())
            .unwrap();
        assert!(p.allows(443) && p.allows(8050) && !p.allows(22));
        assert_eq!(p.to_string(), "443, 80, 8000-8100");
        let any: Ports = toml::Value::String("*".into()).try_into().unwrap();
        assert_eq!(any, Ports::Any);
        // No tunnels at all (an HTTP-only gateway): a refusal names it, not an empty list.
        let none: Ports = toml::Value::Array(Vec::new()).try_into().unwrap();
        assert!(!none.allows(443));
        assert_eq!(none.to_string(), "none");
        assert!(
            toml::Value::String("all".into())
                .try_into::<Ports>()
                .is_err()
        );
        assert!(
            toml::Value::String("9-1".into())
                .try_into::<Ports>()
                .is_err()
        );
    }

    #[test]
    fn tunnels_to_allowed_ports_and_public_addresses_only() {
        let p = Policy::default();
        assert!(p.tunnel(&target("example.com:443")).is_ok());
        assert!(p.tunnel(&target("93.184.216.34:80")).is_ok());
        let e = p.tunnel(&target("example.com:25")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::DestinationPort);
        assert_eq!(e.http_status(), 403);
        assert_eq!(e.socks5_reply(), 0x02);
        for t in [
            "127.0.0.1:443",
            "10.0.0.1:80",
            "[::1]:443",
            "localhost:443",
            "169.254.169.254:80",
        ] {
            let e = p.tunnel(&target(t)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::DestinationPrivate, "{t}");
            assert!(e.proxy_status().contains("destination_ip_prohibited"));
        }
        assert!(
            p.forward(&target("example.com:8080")).is_ok(),
            "any port in absolute form"
        );
        assert!(p.forward(&target("127.0.0.1:8080")).is_err());
        assert!(
            p.resolved(&target("sneaky.example:443"), "10.1.1.1".parse().unwrap())
                .is_err()
        );
        let lab = Policy {
            ports: Ports::Any,
            allow_private: true,
        };
        assert!(lab.tunnel(&target("127.0.0.1:22")).is_ok());
        assert!(
            lab.resolved(&target("x:1"), "127.0.0.1".parse().unwrap())
                .is_ok()
        );
    }
}
