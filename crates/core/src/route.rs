//! Routing hints: one grammar, carried in the client's username for HTTP (`Proxy-Authorization:
//! Basic`) and SOCKS (RFC 1929, or the SOCKS4 user id).
//!
//! ```text
//! username = account *( "-" key "-" value )
//! key      = "session" | "ttl" | "country" | "type" | "strategy" | "minrep" | "tier"
//! ```
//!
//! For example `alice-session-s42-country-us-type-socks5-minrep-70`. The account is everything
//! before the first `-`, so account names cannot contain `-`; values cannot either. A key may
//! appear once. Strategy names are checked where strategies live (the pool).

use std::fmt;
use std::time::Duration;

use crate::Scheme;

/// How far an upstream is trusted not to tamper with traffic, least first: `untrusted` (fresh
/// from a public list), `verified` (a list upstream that passed the checker's integrity checks
/// for a while), `operator` (added by the operator: the config, `pool add`, `pool import`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Tier {
    #[default]
    Untrusted,
    Verified,
    Operator,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Untrusted, Tier::Verified, Tier::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Untrusted => "untrusted",
            Tier::Verified => "verified",
            Tier::Operator => "operator",
        }
    }

    /// The tier as a small number (0 = untrusted), for atomics.
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Tier {
        Tier::ALL
            .get(usize::from(code))
            .copied()
            .unwrap_or_default()
    }
}

impl std::str::FromStr for Tier {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tier::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
            .ok_or(())
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Tier {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|()| {
            serde::de::Error::custom(format!(
                "unknown trust tier {s:?} (expected untrusted, verified or operator)"
            ))
        })
    }
}

/// What a client asked for, besides its destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Route {
    /// `session-<id>`: keep one upstream for this id.
    pub session: Option<String>,
    /// `ttl-<seconds>`: how long the session keeps its upstream.
    pub ttl: Option<Duration>,
    /// `country-<cc>`: ISO 3166-1 alpha-2, upper-cased.
    pub country: Option<String>,
    /// `type-<scheme>`: only upstreams of this scheme.
    pub scheme: Option<Scheme>,
    /// `strategy-<name>`: this request's strategy.
    pub strategy: Option<String>,
    /// `minrep-<n>`: only upstreams with at least this reputation.
    pub min_reputation: Option<u8>,
    /// `tier-<name>`: only upstreams trusted at least this much ([`Tier`]).
    pub min_tier: Option<Tier>,
}

/// Why a username's hints were refused. The message names the hint, never a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error(
        "unknown routing hint {0:?} (known: session, ttl, country, type, strategy, minrep, tier)"
    )]
    UnknownHint(String),
    #[error("routing hint {0:?} has no value")]
    MissingValue(String),
    #[error("routing hint {0:?} given twice")]
    Repeated(String),
    #[error("invalid value {value:?} for routing hint {key:?}: {why}")]
    InvalidValue {
        key: String,
        value: String,
        why: &'static str,
    },
}

/// Longest session id accepted.
const MAX_SESSION_LEN: usize = 64;
/// Longest session TTL accepted (one day).
const MAX_TTL_SECS: u64 = 86_400;

impl Route {
    /// Whether this route lets every upstream serve (no country, type or reputation filter).
    pub fn is_unfiltered(&self) -> bool {
        self.country.is_none()
            && self.scheme.is_none()
            && self.min_reputation.is_none()
            && self.tier_filter().is_none()
    }

    /// The minimum tier when it excludes anything (`untrusted` admits every upstream).
    pub fn tier_filter(&self) -> Option<Tier> {
        self.min_tier.filter(|t| *t > Tier::Untrusted)
    }

    /// Splits a username into its account and its routing hints.
    pub fn parse(username: &str) -> Result<(&str, Route), RouteError> {
        let mut parts = username.split('-');
        let account = parts.next().unwrap_or_default();
        let mut route = Route::default();
        while let Some(key) = parts.next() {
            let value = parts
                .next()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| RouteError::MissingValue(key.to_owned()))?;
            let invalid = |why| RouteError::InvalidValue {
                key: key.to_owned(),
                value: value.to_owned(),
                why,
            };
            let repeated = || RouteError::Repeated(key.to_owned());
            match key {
                "session" => {
                    let ok = value.len() <= MAX_SESSION_LEN
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.'));
                    if !ok {
                        return Err(invalid("letters, digits, '_' and '.', at most 64"));
                    }
                    set(&mut route.session, value.to_owned(), repeated)?;
                }
                "ttl" => {
                    let secs: u64 = value
                        .parse()
                        .ok()
                        .filter(|s| (1..=MAX_TTL_SECS).contains(s))
                        .ok_or_else(|| invalid("seconds, 1 to 86400"))?;
                    set(&mut route.ttl, Duration::from_secs(secs), repeated)?;
                }
                "country" => {
                    if value.len() != 2 || !value.bytes().all(|b| b.is_ascii_alphabetic()) {
                        return Err(invalid("an ISO 3166-1 alpha-2 code such as us"));
                    }
                    set(&mut route.country, value.to_ascii_uppercase(), repeated)?;
                }
                "type" => {
                    let scheme = value
                        .parse::<Scheme>()
                        .map_err(|()| invalid("http, https, socks4, socks4a, socks5, socks5h"))?;
                    set(&mut route.scheme, scheme, repeated)?;
                }
                "strategy" => set(&mut route.strategy, value.to_owned(), repeated)?,
                "minrep" => {
                    let n: u8 = value
                        .parse()
                        .ok()
                        .filter(|n| *n <= 100)
                        .ok_or_else(|| invalid("0 to 100"))?;
                    set(&mut route.min_reputation, n, repeated)?;
                }
                "tier" => {
                    let tier = value
                        .parse::<Tier>()
                        .map_err(|()| invalid("untrusted, verified or operator"))?;
                    set(&mut route.min_tier, tier, repeated)?;
                }
                other => return Err(RouteError::UnknownHint(other.to_owned())),
            }
        }
        Ok((account, route))
    }

    /// Whether any filter (country, type, minrep) restricts the upstreams.
    pub fn has_filters(&self) -> bool {
        !self.is_unfiltered()
    }
}

fn set<T>(slot: &mut Option<T>, v: T, repeated: impl Fn() -> RouteError) -> Result<(), RouteError> {
    if slot.is_some() {
        return Err(repeated());
    }
    *slot = Some(v);
    Ok(())
}

/// The filters, as `country=US type=socks5 minrep=70`, for error details.
impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if let Some(c) = &self.country {
            write!(f, "country={c}")?;
            sep = " ";
        }
        if let Some(s) = self.scheme {
            write!(f, "{sep}type={s}")?;
            sep = " ";
        }
        if let Some(m) = self.min_reputation {
            write!(f, "{sep}minrep={m}")?;
            sep = " ";
        }
        if let Some(t) = self.tier_filter() {
            write!(f, "{sep}tier={t}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_every_hint() {
        let (account, r) = Route::parse(
            "alice-session-s42-country-us-type-socks5-minrep-70-ttl-60-strategy-random-tier-verified",
        )
        .unwrap();
        assert_eq!(account, "alice");
        assert_eq!(r.session.as_deref(), Some("s42"));
        assert_eq!(r.country.as_deref(), Some("US"));
        assert_eq!(r.scheme, Some(Scheme::Socks5));
        assert_eq!(r.min_reputation, Some(70));
        assert_eq!(r.ttl, Some(Duration::from_secs(60)));
        assert_eq!(r.strategy.as_deref(), Some("random"));
        assert_eq!(r.min_tier, Some(Tier::Verified));
        assert_eq!(
            r.to_string(),
            "country=US type=socks5 minrep=70 tier=verified"
        );
        let (_, any) = Route::parse("a-tier-untrusted").unwrap();
        assert!(any.is_unfiltered(), "untrusted admits every upstream");
        assert!(Tier::Untrusted < Tier::Verified && Tier::Verified < Tier::Operator);
    }

    #[test]
    fn plain_account_has_no_hints() {
        assert_eq!(Route::parse("bob").unwrap(), ("bob", Route::default()));
        assert_eq!(Route::parse("").unwrap(), ("", Route::default()));
    }

    #[test]
    fn refuses_bad_hints() {
        for (u, want) in [
            ("a-colour-red", "unknown routing hint \"colour\""),
            ("a-session", "has no value"),
            ("a-session-", "has no value"),
            ("a-country-usa", "alpha-2"),
            ("a-type-ftp", "socks5h"),
            ("a-minrep-101", "0 to 100"),
            ("a-ttl-0", "1 to 86400"),
            ("a-session-x-session-y", "given twice"),
            ("a-session-a/b", "letters"),
            ("a-tier-gold", "untrusted, verified or operator"),
        ] {
            let err = Route::parse(u).unwrap_err().to_string();
            assert!(err.contains(want), "{u}: {err}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,80}") {
            let _ = Route::parse(&s);
        }
    }
}
