//! [`Strategy`]: how an upstream is picked. A closed set, chosen by name in config.
//!
//! Only `round_robin` exists today; the reputation-driven strategies (weighted random, best
//! reputation, fastest response, least recently used, random) join this enum and
//! [`crate::pool`]'s `pick` with the reputation work.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

/// A selection strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Each upstream in turn.
    #[default]
    RoundRobin,
}

/// A strategy name that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown strategy {0:?} (expected one of: round_robin)")]
pub struct UnknownStrategy(pub String);

impl Strategy {
    pub const ALL: [Strategy; 1] = [Strategy::RoundRobin];

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
        }
    }
}

impl FromStr for Strategy {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStrategy(s.to_owned()))
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
