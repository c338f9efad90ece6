//! [`Upstream`]: one upstream proxy, parsed from a URL such as
//! `socks5h://user:p%40ss@proxy.example:1080`.
//!
//! Schemes: `http`, `https` (TLS to the proxy itself), `socks4`, `socks4a`, `socks5`,
//! `socks5h` (the proxy resolves names). Userinfo is percent-decoded, so any byte can appear in
//! a password. When the port is left out it defaults as curl does: 443 for `https`, 1080 for
//! the others. `Display` never shows the password.

use std::fmt;
use std::str::FromStr;

use percent_encoding::percent_decode_str;

use crate::target::parse_port;
use crate::{Host, Secret};

/// An upstream's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
    Socks4,
    Socks4a,
    Socks5,
    Socks5h,
}

impl Scheme {
    pub const ALL: [Scheme; 6] = [
        Scheme::Http,
        Scheme::Https,
        Scheme::Socks4,
        Scheme::Socks4a,
        Scheme::Socks5,
        Scheme::Socks5h,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Socks4 => "socks4",
            Scheme::Socks4a => "socks4a",
            Scheme::Socks5 => "socks5",
            Scheme::Socks5h => "socks5h",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Https => 443,
            _ => 1080,
        }
    }

    /// HTTP proxies (plain or over TLS) can forward absolute-form requests themselves.
    pub fn is_http(self) -> bool {
        matches!(self, Scheme::Http | Scheme::Https)
    }
}

impl FromStr for Scheme {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scheme::ALL
            .into_iter()
            .find(|scheme| scheme.as_str().eq_ignore_ascii_case(s))
            .ok_or(())
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Username and password presented to an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: Secret,
    pub password: Secret,
}

/// One upstream proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub scheme: Scheme,
    pub host: Host,
    pub port: u16,
    pub credentials: Option<Credentials>,
    /// Where the proxy exits (ISO 3166-1 alpha-2, upper case), when known: `?country=us` in
    /// the URL, or from a list source.
    pub country: Option<String>,
    /// What kind of address the proxy exits from: `?proxy_type=residential` in the URL.
    pub proxy_type: ProxyType,
}

/// The kind of network an upstream exits from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ProxyType {
    #[default]
    Datacenter,
    Residential,
    Mobile,
}

impl ProxyType {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyType::Datacenter => "datacenter",
            ProxyType::Residential => "residential",
            ProxyType::Mobile => "mobile",
        }
    }
}

impl FromStr for ProxyType {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            ProxyType::Datacenter,
            ProxyType::Residential,
            ProxyType::Mobile,
        ]
        .into_iter()
        .find(|t| t.as_str().eq_ignore_ascii_case(s))
        .ok_or(())
    }
}

impl fmt::Display for ProxyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stable identifier of an upstream: derived from scheme, host, port and username (never the
/// password), so the same proxy listed twice is one upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpstreamId(pub u64);

/// Why an upstream URL was refused. Messages never include the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamParseError {
    #[error("missing scheme (expected one of http, https, socks4, socks4a, socks5, socks5h)")]
    MissingScheme,
    #[error("unknown scheme {0:?} (expected one of http, https, socks4, socks4a, socks5, socks5h)")]
    UnknownScheme(String),
    #[error("missing host")]
    MissingHost,
    #[error("invalid host {0:?}")]
    InvalidHost(String),
    #[error("invalid port {0:?}")]
    InvalidPort(String),
    #[error("a path or fragment is not allowed in an upstream URL")]
    UnexpectedPath,
    #[error(
        "invalid query {0:?} (known: country=<ISO 3166-1 alpha-2 code>, \
         proxy_type=datacenter|residential|mobile)"
    )]
    InvalidQuery(String),
    #[error("userinfo is not valid percent-encoded UTF-8")]
    InvalidUserinfo,
}

impl Upstream {
    /// Parses `scheme://[user[:pass]@]host[:port][/][?country=cc&proxy_type=t]`.
    pub fn parse(url: &str) -> Result<Upstream, UpstreamParseError> {
        let url = url.trim();
        let (url, (country, proxy_type)) = match url.rsplit_once('?') {
            Some((u, q)) if !q.contains(['@', '/']) => (u, parse_query(q)?),
            _ => (url, (None, ProxyType::default())),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or(UpstreamParseError::MissingScheme)?;
        let scheme = Scheme::from_str(scheme)
            .map_err(|()| UpstreamParseError::UnknownScheme(scheme.to_owned()))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        // The password may itself contain '@' when written unencoded: the last '@' ends it.
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        if hostport.contains(['/', '?', '#']) {
            return Err(UpstreamParseError::UnexpectedPath);
        }
        let credentials = userinfo.map(parse_userinfo).transpose()?;
        let (host, port) = split_host_port(hostport)?;
        let host = if host.is_empty() {
            return Err(UpstreamParseError::MissingHost);
        } else {
            Host::parse(host).ok_or_else(|| UpstreamParseError::InvalidHost(host.to_owned()))?
        };
        let port = match port {
            Some(p) => {
                parse_port(p).ok_or_else(|| UpstreamParseError::InvalidPort(p.to_owned()))?
            }
            None => scheme.default_port(),
        };
        Ok(Upstream {
            scheme,
            host,
            port,
            credentials,
            country,
            proxy_type,
        })
    }

    /// The stable id (FNV-1a over scheme, host, port and username).
    pub fn id(&self) -> UpstreamId {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            // Field separator so ("ab","c") and ("a","bc") differ.
            h ^= 0xff;
            h = h.wrapping_mul(0x0100_0000_01b3);
        };
        feed(self.scheme.as_str().as_bytes());
        feed(self.host.to_string().as_bytes());
        feed(&self.port.to_be_bytes());
        if let Some(c) = &self.credentials {
            feed(c.username.expose().as_bytes());
        }
        UpstreamId(h)
    }

    /// `host:port` of the proxy itself, for connecting and logging.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The full URL, credentials included (percent-encoded) and `?country=`/`proxy_type=`
    /// when set: what [`Upstream::parse`] reads back to an equal upstream. It exposes the
    /// password: only for an operator's explicit export, never for a log.
    pub fn expose_url(&self) -> String {
        use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
        let mut url = format!("{}://", self.scheme);
        if let Some(c) = &self.credentials {
            url.push_str(&format!(
                "{}:{}@",
                utf8_percent_encode(c.username.expose(), NON_ALPHANUMERIC),
                utf8_percent_encode(c.password.expose(), NON_ALPHANUMERIC)
            ));
        }
        url.push_str(&self.authority());
        let mut query = Vec::new();
        if let Some(cc) = &self.country {
            query.push(format!("country={}", cc.to_ascii_lowercase()));
        }
        if self.proxy_type != ProxyType::default() {
            query.push(format!("proxy_type={}", self.proxy_type));
        }
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query.join("&"));
        }
        url
    }
}

impl FromStr for UpstreamId {
    type Err = ();

    /// The 16 hex digits [`UpstreamId`]'s `Display` writes.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 16 {
            return Err(());
        }
        u64::from_str_radix(s, 16).map(UpstreamId).map_err(|_| ())
    }
}

impl FromStr for Upstream {
    type Err = UpstreamParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Upstream::parse(s)
    }
}

/// Redacted: `socks5://***@host:1080`.
impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = if self.credentials.is_some() {
            "***@"
        } else {
            ""
        };
        write!(f, "{}://{auth}{}:{}", self.scheme, self.host, self.port)
    }
}

impl fmt::Display for UpstreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

fn parse_query(q: &str) -> Result<(Option<String>, ProxyType), UpstreamParseError> {
    let bad = || UpstreamParseError::InvalidQuery(q.to_owned());
    let (mut country, mut proxy_type) = (None, None);
    for pair in q.split('&') {
        match pair.split_once('=').ok_or_else(bad)? {
            ("country", cc) if country.is_none() => {
                if cc.len() != 2 || !cc.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(bad());
                }
                country = Some(cc.to_ascii_uppercase());
            }
            ("proxy_type", t) if proxy_type.is_none() => {
                proxy_type = Some(t.parse::<ProxyType>().map_err(|()| bad())?);
            }
            _ => return Err(bad()),
        }
    }
    Ok((country, proxy_type.unwrap_or_default()))
}

fn parse_userinfo(userinfo: &str) -> Result<Credentials, UpstreamParseError> {
    let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let decode = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .map(|c| Secret::new(c.into_owned()))
            .map_err(|_| UpstreamParseError::InvalidUserinfo)
    };
    Ok(Credentials {
        username: decode(user)?,
        password: decode(pass)?,
    })
}

fn split_host_port(s: &str) -> Result<(&str, Option<&str>), UpstreamParseError> {
    if s.starts_with('[') {
        let end = s
            .find(']')
            .ok_or_else(|| UpstreamParseError::InvalidHost(s.to_owned()))?;
        let (host, rest) = s.split_at(end + 1);
        return match rest {
            "" => Ok((host, None)),
            _ => rest
                .strip_prefix(':')
                .map(|p| (host, Some(p)))
                .ok_or_else(|| UpstreamParseError::InvalidHost(s.to_owned())),
        };
    }
    Ok(match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_every_scheme() {
        for scheme in Scheme::ALL {
            let u = Upstream::parse(&format!("{scheme}://127.0.0.1:3128")).unwrap();
            assert_eq!(u.scheme, scheme);
            assert_eq!(u.port, 3128);
            assert!(u.credentials.is_none());
        }
    }

    #[test]
    fn decodes_credentials() {
        let u = Upstream::parse("HTTP://us%3Aer:p%40ss:w@rd@proxy.example:8080/").unwrap();
        let c = u.credentials.as_ref().unwrap();
        assert_eq!(c.username.expose(), "us:er");
        assert_eq!(c.password.expose(), "p@ss:w@rd");
        assert_eq!(u.host, Host::Domain("proxy.example".into()));
        assert_eq!(u.to_string(), "http://***@proxy.example:8080");
    }

    #[test]
    fn ipv6_and_default_ports() {
        let u = Upstream::parse("socks5h://[::1]").unwrap();
        assert_eq!(u.port, 1080);
        assert_eq!(u.authority(), "[::1]:1080");
        assert_eq!(Upstream::parse("https://p.example").unwrap().port, 443);
    }

    #[test]
    fn refuses_bad_urls_without_leaking_password() {
        let cases = [
            ("127.0.0.1:80", UpstreamParseError::MissingScheme),
            (
                "ftp://a:secret@h:1",
                UpstreamParseError::UnknownScheme("ftp".into()),
            ),
            ("http://u:secret@:80", UpstreamParseError::MissingHost),
            (
                "http://u:secret@h:99999",
                UpstreamParseError::InvalidPort("99999".into()),
            ),
            ("http://h:80/path", UpstreamParseError::UnexpectedPath),
            (
                "http://h:80?colour=red",
                UpstreamParseError::InvalidQuery("colour=red".into()),
            ),
            (
                "http://h:80?country=usa",
                UpstreamParseError::InvalidQuery("country=usa".into()),
            ),
            ("http://u:%ff@h:80", UpstreamParseError::InvalidUserinfo),
        ];
        for (url, want) in cases {
            let err = Upstream::parse(url).unwrap_err();
            assert_eq!(err, want, "{url}");
            assert!(!err.to_string().contains("secret"));
        }
    }

    #[test]
    fn country_from_query() {
        let u = Upstream::parse("socks5://u:p?w@h:1080?country=de").unwrap();
        assert_eq!(u.country.as_deref(), Some("DE"));
        assert_eq!(u.credentials.unwrap().password.expose(), "p?w");
        assert_eq!(
            Upstream::parse("http://h:1/?country=us")
                .unwrap()
                .country
                .as_deref(),
            Some("US")
        );
        assert_eq!(Upstream::parse("http://h:1").unwrap().country, None);
        let u = Upstream::parse("http://h:1?proxy_type=Residential&country=br").unwrap();
        assert_eq!(
            (u.country.as_deref(), u.proxy_type),
            (Some("BR"), ProxyType::Residential)
        );
        assert_eq!(
            Upstream::parse("http://h:1").unwrap().proxy_type,
            ProxyType::Datacenter
        );
        for bad in [
            "http://h:1?proxy_type=cave",
            "http://h:1?country=us&country=de",
            "http://h:1?x",
        ] {
            assert!(
                matches!(
                    Upstream::parse(bad),
                    Err(UpstreamParseError::InvalidQuery(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn id_ignores_password_but_not_user() {
        let a = Upstream::parse("http://u:one@h:80").unwrap().id();
        let b = Upstream::parse("http://u:two@h:80").unwrap().id();
        let c = Upstream::parse("http://v:one@h:80").unwrap().id();
        let d = Upstream::parse("socks5://u:one@h:80").unwrap().id();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert_eq!(a.to_string().parse::<UpstreamId>(), Ok(a));
        assert!("xyz".parse::<UpstreamId>().is_err());
    }

    #[test]
    fn expose_url_round_trips() {
        for url in [
            "http://h.example:3128",
            "socks5h://a%40b:p%3Ass@[::1]:1080?country=us&proxy_type=mobile",
            "https://u:@10.0.0.1:443?country=de",
        ] {
            let u = Upstream::parse(url).unwrap();
            assert_eq!(Upstream::parse(&u.expose_url()).unwrap(), u, "{url}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,80}") {
            let _ = Upstream::parse(&s);
        }

        #[test]
        fn any_password_round_trips(user in "[^\u{0}]{0,16}", pass in "[^\u{0}]{0,16}") {
            use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
            let url = format!(
                "socks5://{}:{}@h.example:1",
                utf8_percent_encode(&user, NON_ALPHANUMERIC),
                utf8_percent_encode(&pass, NON_ALPHANUMERIC),
            );
            let u = Upstream::parse(&url).unwrap();
            prop_assert_eq!(&Upstream::parse(&u.expose_url()).unwrap(), &u);
            let c = u.credentials.unwrap();
            prop_assert_eq!(c.username.expose(), user.as_str());
            prop_assert_eq!(c.password.expose(), pass.as_str());
        }
    }
}
