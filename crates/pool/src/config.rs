//! [`Config`]: the `[pool]` section of the root config file (selection, health, reputation).
//!
//! Defaults are the `DEFAULT_*` constants (here and in [`crate::health`]) and match
//! `config/default.toml`. [`Config::validate`] names every problem with its key.

use std::time::Duration;

use proxygate_core::Problem;
use serde::Deserialize;

use crate::{HealthConfig, ReputationConfig, Strategy};

pub const DEFAULT_REINDEX_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(600);

/// `[pool]`: selection, health and reputation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub strategy: Strategy,
    /// Healthy needs at least this reputation (0-100)...
    pub healthy_reputation: u8,
    /// ...and fewer consecutive failures than this.
    pub max_consecutive_failures: u32,
    /// Backoff ceiling of an upstream that turned unhealthy; doubles per further failure
    /// (full jitter: the wait is uniform below the ceiling).
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Largest backoff ceiling.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Weight of the newest sample in the success and response-time moving averages.
    pub ema_alpha: f64,
    /// What one failed attempt costs in fastest_response's expected time to a working
    /// connection (`rt + (1 - success) / success * failure_cost`); 0 ranks by response time
    /// alone.
    #[serde(with = "humantime_serde")]
    pub failure_cost: Duration,
    /// best_reputation and fastest_response re-measure an upstream unused for this long (one
    /// pick in 16 at most), so one bad sample does not exile it for good.
    #[serde(with = "humantime_serde")]
    pub remeasure_after: Duration,
    /// weighted_random draws each upstream by `reputation * success_rate ^ this` (see
    /// [`crate::selection_weight`]); 0 draws by reputation alone.
    pub weight_success_exponent: f64,
    /// Failures in a row for one target site (its registrable domain) through one upstream
    /// after which selection avoids that upstream for that site...
    pub site_block_after: u32,
    /// ...for this long after the last of them.
    #[serde(with = "humantime_serde")]
    pub site_block_for: Duration,
    /// How often the orders used by best_reputation and fastest_response are refreshed.
    #[serde(with = "humantime_serde")]
    pub reindex_interval: Duration,
    /// How long a sticky session (`session-<id>` hint) keeps its upstream; `ttl-<s>` overrides.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// What a client asking for a new session gets: `different` (never the exit IP its
    /// previous session had; refused when no other is left), `prefer_different`, `any`.
    pub new_session_exit: crate::NewSessionExit,
    pub reputation: ReputationConfig,
}

impl Default for Config {
    fn default() -> Self {
        let h = HealthConfig::default();
        Self {
            strategy: Strategy::default(),
            healthy_reputation: h.healthy_reputation,
            max_consecutive_failures: h.max_consecutive_failures,
            backoff_base: h.backoff_base,
            backoff_max: h.backoff_max,
            ema_alpha: h.ema_alpha,
            failure_cost: h.failure_cost,
            remeasure_after: h.remeasure_after,
            weight_success_exponent: h.weight_success_exponent,
            site_block_after: h.sites.block_after,
            site_block_for: h.sites.block_for,
            reindex_interval: DEFAULT_REINDEX_INTERVAL,
            session_ttl: DEFAULT_SESSION_TTL,
            new_session_exit: crate::NewSessionExit::default(),
            reputation: ReputationConfig::default(),
        }
    }
}

impl Config {
    /// The health policy this section describes.
    pub fn health(&self) -> HealthConfig {
        HealthConfig {
            reputation: self.reputation.clone(),
            healthy_reputation: self.healthy_reputation,
            max_consecutive_failures: self.max_consecutive_failures,
            backoff_base: self.backoff_base,
            backoff_max: self.backoff_max,
            ema_alpha: self.ema_alpha,
            failure_cost: self.failure_cost,
            remeasure_after: self.remeasure_after,
            weight_success_exponent: self.weight_success_exponent,
            sites: crate::sites::SiteConfig {
                block_after: self.site_block_after,
                block_for: self.site_block_for,
            },
        }
    }

    /// Every problem, each named `pool.<key>`; empty when valid.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        Problem::check_nonzero("pool.backoff_base", self.backoff_base, &mut problems);
        if self.backoff_max < self.backoff_base {
            problems.push(Problem::new(
                "pool.backoff_max",
                "must be at least pool.backoff_base",
            ));
        }
        if self.healthy_reputation > 100 {
            problems.push(Problem::new("pool.healthy_reputation", "must be 0-100"));
        }
        if self.max_consecutive_failures == 0 {
            problems.push(Problem::new(
                "pool.max_consecutive_failures",
                "must be at least 1",
            ));
        }
        if !(self.ema_alpha > 0.0 && self.ema_alpha <= 1.0) {
            problems.push(Problem::new("pool.ema_alpha", "must be in (0, 1]"));
        }
        if !(0.0..=16.0).contains(&self.weight_success_exponent) {
            problems.push(Problem::new(
                "pool.weight_success_exponent",
                "must be in [0, 16]",
            ));
        }
        if self.site_block_after == 0 {
            problems.push(Problem::new("pool.site_block_after", "must be at least 1"));
        }
        Problem::check_nonzero("pool.site_block_for", self.site_block_for, &mut problems);
        Problem::check_nonzero("pool.session_ttl", self.session_ttl, &mut problems);
        Problem::check_nonzero("pool.remeasure_after", self.remeasure_after, &mut problems);
        Problem::check_nonzero(
            "pool.reindex_interval",
            self.reindex_interval,
            &mut problems,
        );
        let rep = &self.reputation;
        if rep.fast_ms.partial_cmp(&rep.slow_ms) != Some(std::cmp::Ordering::Less) {
            problems.push(Problem::new(
                "pool.reputation.slow_ms",
                "must be greater than pool.reputation.fast_ms",
            ));
        }
        if rep.uses_per_point == 0 {
            problems.push(Problem::new(
                "pool.reputation.uses_per_point",
                "must be at least 1",
            ));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(c: &Config) -> Vec<String> {
        c.validate().into_iter().map(|p| p.key).collect()
    }

    #[test]
    fn defaults_are_valid() {
        assert!(Config::default().validate().is_empty());
    }

    #[test]
    fn every_problem_is_named() {
        let c = Config {
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(1),
            healthy_reputation: 101,
            max_consecutive_failures: 0,
            ema_alpha: 0.0,
            remeasure_after: Duration::ZERO,
            reputation: ReputationConfig {
                fast_ms: 3000.0,
                uses_per_point: 0,
                ..ReputationConfig::default()
            },
            ..Config::default()
        };
        assert_eq!(
            keys(&c),
            [
                "pool.backoff_max",
                "pool.healthy_reputation",
                "pool.max_consecutive_failures",
                "pool.ema_alpha",
                "pool.remeasure_after",
                "pool.reputation.slow_ms",
                "pool.reputation.uses_per_point"
            ]
        );
    }

    #[test]
    fn a_zero_failure_cost_is_allowed() {
        let c = Config {
            failure_cost: Duration::ZERO,
            ..Config::default()
        };
        assert!(c.validate().is_empty());
        assert_eq!(c.health().failure_cost, Duration::ZERO);
    }
}
