//! [`Candidate`]: one proxy a list named, with what the list said of it, and
//! [`Anonymity`], the three levels lists and judges speak of.

use std::fmt;
use std::str::FromStr;

use proxygate_core::{Upstream, UpstreamId};
use serde::{Deserialize, Serialize};

/// What an upstream reveals to the sites it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Anonymity {
    /// The client's (our) address is visible.
    Transparent,
    /// Our address is hidden, but the proxy says it is one (`Via`, `X-Forwarded-For`...).
    Anonymous,
    /// Neither.
    Elite,
}

impl Anonymity {
    pub fn as_str(self) -> &'static str {
        match self {
            Anonymity::Transparent => "transparent",
            Anonymity::Anonymous => "anonymous",
            Anonymity::Elite => "elite",
        }
    }

    /// Reads what lists say: `elite proxy`, `elite`, `high`, `H`, `Hia`; `anonymous`,
    /// `anm`, `A`; `transparent`, `noa`, `N` (any case).
    pub fn from_list(s: &str) -> Option<Anonymity> {
        match s.trim().to_ascii_lowercase().as_str() {
            "elite" | "elite proxy" | "high" | "high anonymous" | "h" | "hia" => {
                Some(Anonymity::Elite)
            }
            "anonymous" | "anm" | "a" | "anon" => Some(Anonymity::Anonymous),
            "transparent" | "noa" | "n" => Some(Anonymity::Transparent),
            _ => None,
        }
    }
}

impl FromStr for Anonymity {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Anonymity::from_list(s).ok_or(())
    }
}

impl fmt::Display for Anonymity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One proxy a source listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Scheme, address, credentials, and the country when the list gave one.
    pub upstream: Upstream,
    /// What the list claimed (the checker measures its own).
    pub anonymity: Option<Anonymity>,
    /// The source that listed it.
    pub source: String,
}

impl Candidate {
    /// Scheme + host + port + username: two lists naming the same proxy give one upstream.
    pub fn id(&self) -> UpstreamId {
        self.upstream.id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_levels() {
        for (s, a) in [
            ("elite proxy", Anonymity::Elite),
            ("Elite", Anonymity::Elite),
            ("H", Anonymity::Elite),
            ("anonymous", Anonymity::Anonymous),
            ("Anonymous", Anonymity::Anonymous),
            ("transparent", Anonymity::Transparent),
            ("N", Anonymity::Transparent),
        ] {
            assert_eq!(Anonymity::from_list(s), Some(a), "{s}");
        }
        assert_eq!(Anonymity::from_list("unknown"), None);
        assert!(Anonymity::Elite > Anonymity::Anonymous);
    }
}
