//! [`Config`]: the `[store]` section of the root config file.

use std::time::Duration;

use proxygate_core::Problem;
use serde::Deserialize;

pub const DEFAULT_STATS_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// `[store]`: how live state reaches the data dir.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How often live reputation stats are written behind (in one batch); once more at
    /// shutdown. A crash loses at most this much of them; operator changes are durable first.
    #[serde(with = "humantime_serde")]
    pub stats_flush_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            stats_flush_interval: DEFAULT_STATS_FLUSH_INTERVAL,
        }
    }
}

impl Config {
    /// Every problem, each named `store.<key>`.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        Problem::check_nonzero(
            "store.stats_flush_interval",
            self.stats_flush_interval,
            &mut problems,
        );
        problems
    }
}
