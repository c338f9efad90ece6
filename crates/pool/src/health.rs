//! Live health of one upstream, and the passive backoff policy.
//!
//! Every attempt reports its outcome. A failure that is the upstream's fault raises the
//! consecutive-failure count and puts the upstream in backoff for `base * 2^(n-1)`, capped at
//! `max`; a success clears both. Selection skips upstreams in backoff while any other is
//! available. The numbers live in atomics: the hot path never takes a lock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use proxygate_core::{Outcome, Side};

pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(2);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Passive health policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Backoff after the first consecutive failure; doubles with each further one.
    pub backoff_base: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }
}

/// Live stats of one upstream. Times are milliseconds since the pool's epoch.
#[derive(Debug, Default)]
pub struct Health {
    consecutive_failures: AtomicU32,
    backoff_until_ms: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    in_flight: AtomicU32,
    last_used_ms: AtomicU64,
}

/// The backoff after `consecutive` failures in a row (`consecutive >= 1`).
pub fn backoff(consecutive: u32, cfg: &HealthConfig) -> Duration {
    let exp = consecutive.saturating_sub(1).min(30);
    cfg.backoff_base
        .saturating_mul(1u32 << exp)
        .min(cfg.backoff_max)
}

impl Health {
    /// Whether the upstream may be picked at `now_ms` without falling back to panic mode.
    pub fn is_available(&self, now_ms: u64) -> bool {
        self.backoff_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    pub fn backoff_until_ms(&self) -> u64 {
        self.backoff_until_ms.load(Ordering::Relaxed)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub fn successes(&self) -> u64 {
        self.successes.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn acquire(&self, now_ms: u64) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.last_used_ms.store(now_ms, Ordering::Relaxed);
    }

    pub(crate) fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Applies one attempt's outcome. Failures that are not the upstream's fault (client went
    /// away, destination refused) change nothing: they say nothing about this upstream.
    pub(crate) fn record(&self, outcome: &Outcome, now_ms: u64, cfg: &HealthConfig) {
        match outcome.error {
            None => {
                self.successes.fetch_add(1, Ordering::Relaxed);
                self.consecutive_failures.store(0, Ordering::Relaxed);
                self.backoff_until_ms.store(0, Ordering::Relaxed);
            }
            Some(kind) if kind.side() == Side::Upstream => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                let wait = u64::try_from(backoff(n, cfg).as_millis()).unwrap_or(u64::MAX);
                self.backoff_until_ms
                    .store(now_ms.saturating_add(wait), Ordering::Relaxed);
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proxygate_core::ErrorKind;

    #[test]
    fn backoff_doubles_and_caps() {
        let cfg = HealthConfig::default();
        assert_eq!(backoff(1, &cfg), Duration::from_secs(2));
        assert_eq!(backoff(2, &cfg), Duration::from_secs(4));
        assert_eq!(backoff(3, &cfg), Duration::from_secs(8));
        assert_eq!(backoff(9, &cfg), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX, &cfg), Duration::from_secs(300));
    }

    #[test]
    fn upstream_failure_backs_off_and_success_clears() {
        let cfg = HealthConfig::default();
        let h = Health::default();
        assert!(h.is_available(0));
        h.record(
            &Outcome::failed(ErrorKind::UpstreamConnectRefused),
            1000,
            &cfg,
        );
        assert!(!h.is_available(2999));
        assert!(h.is_available(3000));
        h.record(
            &Outcome::failed(ErrorKind::UpstreamConnectRefused),
            3000,
            &cfg,
        );
        assert_eq!(h.consecutive_failures(), 2);
        assert!(!h.is_available(6999));
        h.record(&Outcome::default(), 7000, &cfg);
        assert!(h.is_available(7000));
        assert_eq!(h.consecutive_failures(), 0);
        assert_eq!((h.successes(), h.failures()), (1, 2));
    }

    #[test]
    fn non_upstream_failures_cost_nothing() {
        let cfg = HealthConfig::default();
        let h = Health::default();
        for kind in [
            ErrorKind::ClientClosed,
            ErrorKind::TargetRefused,
            ErrorKind::NoUpstream,
        ] {
            h.record(&Outcome::failed(kind), 10, &cfg);
        }
        assert!(h.is_available(10));
        assert_eq!(h.failures(), 0);
    }

    proptest! {
        #[test]
        fn backoff_is_monotonic_and_bounded(n in 1u32..200) {
            let cfg = HealthConfig::default();
            prop_assert!(backoff(n, &cfg) <= backoff(n + 1, &cfg));
            prop_assert!(backoff(n, &cfg) <= cfg.backoff_max);
        }
    }
}
