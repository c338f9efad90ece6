//! Client authentication and the client allow-list.
//!
//! Users come from a file of `username:password` lines (`#` comments and blank lines
//! skipped). HTTP clients authenticate with `Proxy-Authorization: Basic`, SOCKS5 clients with
//! RFC 1929. Without a users file every client is accepted, and whatever username it sends is
//! still read (it will carry routing hints).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ipnet::IpNet;
use proxygate_core::Secret;

/// The users allowed to connect; `None` users means authentication is off.
#[derive(Debug, Clone, Default)]
pub struct ClientAuth {
    users: Option<HashMap<String, Secret>>,
    allow: Vec<IpNet>,
}

/// What a client presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCredentials {
    pub username: String,
    pub password: Secret,
}

/// Why a users file was refused.
#[derive(Debug, thiserror::Error)]
pub enum UsersFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: expected `username:password`")]
    Syntax { path: String, line: usize },
}

impl ClientAuth {
    /// No users (authentication off), no allow-list.
    pub fn open() -> Self {
        Self::default()
    }

    pub fn with_users(mut self, users: HashMap<String, Secret>) -> Self {
        self.users = Some(users);
        self
    }

    pub fn with_allow(mut self, allow: Vec<IpNet>) -> Self {
        self.allow = allow;
        self
    }

    /// Reads a users file.
    pub fn load_users(path: &Path) -> Result<HashMap<String, Secret>, UsersFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| UsersFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        parse_users(&text).map_err(|line| UsersFileError::Syntax {
            path: path.display().to_string(),
            line,
        })
    }

    pub fn is_required(&self) -> bool {
        self.users.is_some()
    }

    /// Whether a client at `ip` may connect at all.
    pub fn is_allowed(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&ip))
    }

    /// Whether these credentials (or their absence) let the client in.
    pub fn check(&self, creds: Option<&ClientCredentials>) -> bool {
        let Some(users) = &self.users else {
            return true;
        };
        let Some(c) = creds else {
            return false;
        };
        users
            .get(&c.username)
            .is_some_and(|p| p.constant_time_eq(c.password.expose().as_bytes()))
    }
}

/// Parses a `Proxy-Authorization` value `Basic base64(user:pass)`.
pub fn parse_basic(value: &[u8]) -> Option<ClientCredentials> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(token.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, pass) = decoded.split_once(':')?;
    Some(ClientCredentials {
        username: user.to_owned(),
        password: Secret::new(pass),
    })
}

/// `Basic base64(user:pass)`, for writing to an upstream.
pub fn basic_value(username: &str, password: &str) -> String {
    format!(
        "Basic {}",
        STANDARD.encode(format!("{username}:{password}"))
    )
}

fn parse_users(text: &str) -> Result<HashMap<String, Secret>, usize> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((u, p)) if !u.is_empty() => {
                users.insert(u.to_owned(), Secret::new(p));
            }
            _ => return Err(i + 1),
        }
    }
    Ok(users)
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are matched as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_users_and_checks() {
        let users = parse_users("# ops\nalice:s3cr:et\n\n bob:pw \n").unwrap();
        let auth = ClientAuth::open().with_users(users);
        let creds = |u: &str, p: &str| ClientCredentials {
            username: u.into(),
            password: Secret::new(p),
        };
        assert!(auth.check(Some(&creds("alice", "s3cr:et"))));
        assert!(auth.check(Some(&creds("bob", "pw"))));
        assert!(!auth.check(Some(&creds("alice", "wrong"))));
        assert!(!auth.check(Some(&creds("carol", "pw"))));
        assert!(!auth.check(None));
        assert!(ClientAuth::open().check(None));
        assert_eq!(parse_users("ok:1\nnocolon\n"), Err(2));
    }

    #[test]
    fn basic_round_trip() {
        let v = basic_value("u-session-1", "p:w");
        let c = parse_basic(v.as_bytes()).unwrap();
        assert_eq!(c.username, "u-session-1");
        assert_eq!(c.password.expose(), "p:w");
        assert!(parse_basic(b"Bearer abc").is_none());
        assert!(parse_basic(b"Basic !!!").is_none());
    }

    #[test]
    fn allow_list() {
        let auth = ClientAuth::open().with_allow(vec!["10.0.0.0/8".parse().unwrap()]);
        assert!(auth.is_allowed("10.1.2.3".parse().unwrap()));
        assert!(auth.is_allowed("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!auth.is_allowed("127.0.0.1".parse().unwrap()));
        assert!(ClientAuth::open().is_allowed("8.8.8.8".parse().unwrap()));
    }
}
