//! Live stats of one upstream and the health policy around them.
//!
//! Every attempt reports its outcome. Successes and failures that are the upstream's fault
//! move exponential moving averages of success (0.0-1.0) and response time (connect plus
//! upstream handshake, in ms), the consecutive-failure count and the use count; the reputation
//! is recomputed from them at once ([`crate::reputation`]). Failures that are not the
//! upstream's fault (the client went away, the destination refused) change nothing.
//!
//! An upstream is *healthy* while its reputation is at least `healthy_reputation` and its
//! consecutive failures are under `max_consecutive_failures`. One that stops being healthy is
//! deactivated for a full-jitter exponential backoff (`backoff_base` doubling per further
//! failure up to `backoff_max`), then comes back on *probation*: at most one request in flight
//! until one succeeds. New upstreams start on probation too, so a burst cannot pile onto a dead
//! proxy. All numbers are atomics: reporting and selection never take a lock.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use proxygate_core::{Outcome, Side};

use crate::hot::{PickSlot, PickState};
use crate::latency::Latency;
use crate::reputation::{Inputs, ReputationConfig, reputation, selection_weight};

pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(30);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(600);
pub const DEFAULT_HEALTHY_REPUTATION: u8 = 30;
pub const DEFAULT_MAX_CONSECUTIVE_FAILURES: u32 = 3;
pub const DEFAULT_EMA_ALPHA: f64 = 0.2;
pub const DEFAULT_FAILURE_COST: Duration = Duration::from_secs(1);
pub const DEFAULT_REMEASURE_AFTER: Duration = Duration::from_secs(60);
pub const DEFAULT_WEIGHT_SUCCESS_EXPONENT: f64 = 4.0;

/// Health policy, and how the greedy strategies weigh what health measured.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub reputation: ReputationConfig,
    /// Healthy needs at least this reputation...
    pub healthy_reputation: u8,
    /// ...and fewer consecutive failures than this.
    pub max_consecutive_failures: u32,
    /// Backoff ceiling after the upstream first turns unhealthy; doubles per further failure.
    pub backoff_base: Duration,
    /// Largest backoff ceiling.
    pub backoff_max: Duration,
    /// Weight of the newest sample in the moving averages (0 < alpha <= 1).
    pub ema_alpha: f64,
    /// What one failed attempt costs a client in `fastest_response`'s expected time to a
    /// working connection (a retry, and one attempt of its budget): the key is
    /// `response_time + (1 - success_rate) / success_rate * failure_cost`.
    pub failure_cost: Duration,
    /// The greedy strategies (`best_reputation`, `fastest_response`) re-measure an upstream
    /// that nobody has used for this long (or ever), now and then, so one bad sample does not
    /// exile it for good.
    pub remeasure_after: Duration,
    /// `weighted_random` draws by `reputation * success_rate ^ this` ([`selection_weight`]).
    pub weight_success_exponent: f64,
    /// When an upstream counts as blocked for a site.
    pub sites: crate::sites::SiteConfig,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            reputation: ReputationConfig::default(),
            healthy_reputation: DEFAULT_HEALTHY_REPUTATION,
            max_consecutive_failures: DEFAULT_MAX_CONSECUTIVE_FAILURES,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            ema_alpha: DEFAULT_EMA_ALPHA,
            failure_cost: DEFAULT_FAILURE_COST,
            remeasure_after: DEFAULT_REMEASURE_AFTER,
            weight_success_exponent: DEFAULT_WEIGHT_SUCCESS_EXPONENT,
            sites: crate::sites::SiteConfig::default(),
        }
    }
}

/// "No value yet" for the f32 moving averages.
const NONE: u32 = u32::MAX;

/// Live stats of one upstream. Times are milliseconds since the pool's epoch.
///
/// What a pick reads and writes (backoff, in flight, reputation, probation, last use) lives
/// in the pool's hot table (the private `hot` module), in a slot this health owns; the rest
/// is here.
#[derive(Debug)]
pub struct Health {
    hot: PickSlot,
    consecutive_failures: AtomicU32,
    /// f32 bits, or `NONE`.
    success_ema: AtomicU32,
    /// f32 bits (ms), or `NONE`.
    response_ema: AtomicU32,
    successes: AtomicU64,
    failures: AtomicU64,
    /// Set by every recorded outcome, cleared by whoever persists the stats.
    dirty: AtomicBool,
    /// When an attempt last re-checked this upstream: an outcome recorded while it was on
    /// probation (its first use, or its first after a backoff). 0: never.
    last_check_ms: AtomicU64,
    /// Response times since first measured; empty (no allocation) until the first.
    latency: Mutex<Latency>,
    /// Successes, failures and summed response time (ms) since the control plane last took
    /// them ([`Health::take_interval`]): its per-upstream windows.
    interval: [AtomicU64; 3],
}

/// What one attempt, as recorded, added to an upstream's stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// A success, with its response time in ms when one was measured.
    Success(Option<u64>),
    /// A failure that was the upstream's fault.
    Failure,
    /// Not the upstream's business (the client left, the destination refused).
    Ignored,
}

/// Successes, failures and summed response time (ms) of one upstream over an interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interval {
    pub successes: u64,
    pub failures: u64,
    pub response_ms_sum: u64,
}

impl Interval {
    pub fn is_empty(&self) -> bool {
        self.successes == 0 && self.failures == 0
    }
}

/// The part of an upstream's stats worth keeping across restarts (what it learned, not what
/// it is doing: in flight, backoff and LRU keys start afresh).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Saved {
    pub success_rate: Option<f64>,
    pub response_time_ms: Option<f64>,
    pub consecutive_failures: u32,
    pub successes: u64,
    pub failures: u64,
    pub latency: Option<Latency>,
}

impl Default for Health {
    /// A new upstream's health, outside any pool.
    fn default() -> Self {
        Self::new(PickSlot::standalone())
    }
}

/// Where an upstream stands, as operators see it (`pool list`, the health API, the
/// `proxygate_pool_upstreams{state}` gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Selectable and healthy.
    Healthy,
    /// New, or back from a backoff: one request in flight until one succeeds.
    Probation,
    /// Deactivated until its backoff ends.
    Backoff,
    /// Below the health thresholds but not (or no longer) in backoff.
    Unhealthy,
    /// Kept but never served (an operator's or the janitor's decision).
    Disabled,
}

impl State {
    pub const ALL: [State; 5] = [
        State::Healthy,
        State::Probation,
        State::Backoff,
        State::Unhealthy,
        State::Disabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::Probation => "probation",
            State::Backoff => "backoff",
            State::Unhealthy => "unhealthy",
            State::Disabled => "disabled",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The one rule for "healthy": reputation at least `healthy_reputation` and consecutive
/// failures under `max_consecutive_failures`. Live health and stored stats are both judged
/// by it.
pub fn is_healthy(reputation: u8, consecutive_failures: u32, cfg: &HealthConfig) -> bool {
    reputation >= cfg.healthy_reputation && consecutive_failures < cfg.max_consecutive_failures
}

/// The backoff ceiling after `n` failures past the health limit (`n >= 1`).
pub fn backoff_ceiling(n: u32, cfg: &HealthConfig) -> Duration {
    let exp = n.saturating_sub(1).min(30);
    cfg.backoff_base
        .saturating_mul(1u32 << exp)
        .min(cfg.backoff_max)
}

/// Full jitter: uniform in `0..=ceiling`, with `unit` a uniform sample of `0.0..1.0`.
pub fn full_jitter(ceiling: Duration, unit: f64) -> Duration {
    ceiling.mul_f64(unit.clamp(0.0, 1.0))
}

fn load_f32(a: &AtomicU32) -> Option<f64> {
    let bits = a.load(Ordering::Relaxed);
    (bits != NONE).then(|| f64::from(f32::from_bits(bits)))
}

/// Moves a moving average toward `sample`. A lost race between two reports drops one sample,
/// which an average can afford; no lock is taken.
fn update_ema(a: &AtomicU32, sample: f64, alpha: f64) {
    let next = match load_f32(a) {
        None => sample,
        Some(prev) => prev + alpha * (sample - prev),
    };
    a.store((next as f32).to_bits(), Ordering::Relaxed);
}

fn store_f32(v: Option<f64>) -> u32 {
    v.map_or(NONE, |v| (v as f32).to_bits())
}

impl Health {
    /// A new upstream's health in slot `hot` (already in a new upstream's state).
    pub(crate) fn new(hot: PickSlot) -> Health {
        Health {
            hot,
            consecutive_failures: AtomicU32::new(0),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            success_ema: AtomicU32::new(NONE),
            response_ema: AtomicU32::new(NONE),
            dirty: AtomicBool::new(false),
            last_check_ms: AtomicU64::new(0),
            latency: Mutex::new(Latency::new()),
            interval: Default::default(),
        }
    }

    /// Health restored from saved stats; the reputation is recomputed from them. It is off
    /// probation only if its last attempt succeeded.
    pub fn restore(saved: &Saved, cfg: &HealthConfig) -> Health {
        Self::restore_in(PickSlot::standalone(), saved, cfg)
    }

    /// [`Health::restore`] into slot `hot`.
    pub(crate) fn restore_in(hot: PickSlot, saved: &Saved, cfg: &HealthConfig) -> Health {
        let h = Health {
            consecutive_failures: AtomicU32::new(saved.consecutive_failures),
            successes: AtomicU64::new(saved.successes),
            failures: AtomicU64::new(saved.failures),
            success_ema: AtomicU32::new(store_f32(saved.success_rate)),
            response_ema: AtomicU32::new(store_f32(saved.response_time_ms)),
            latency: Mutex::new(saved.latency.clone().unwrap_or_default()),
            ..Health::new(hot)
        };
        let hot = h.hot();
        hot.set_probation(saved.consecutive_failures > 0 || saved.successes == 0);
        h.set_reputation(cfg);
        h
    }

    /// Recomputes the reputation and the selection weight from the inputs as they stand.
    fn set_reputation(&self, cfg: &HealthConfig) {
        let rep = reputation(&self.inputs(), &cfg.reputation);
        let hot = self.hot();
        hot.set_reputation(rep);
        hot.set_weight(selection_weight(
            rep,
            self.success_rate(),
            cfg.weight_success_exponent,
        ));
    }

    /// The hot part, in the pool's table.
    pub(crate) fn hot(&self) -> &PickState {
        self.hot.get()
    }

    /// This health's slot in the pool's hot table.
    pub(crate) fn slot(&self) -> u32 {
        self.hot.index()
    }

    /// What [`Health::restore`] takes back.
    pub fn saved(&self) -> Saved {
        Saved {
            success_rate: self.success_rate(),
            response_time_ms: self.response_time_ms(),
            consecutive_failures: self.consecutive_failures(),
            successes: self.successes(),
            failures: self.failures(),
            latency: self.latency(),
        }
    }

    /// The response-time distribution since first measured (a copy), if any.
    pub fn latency(&self) -> Option<Latency> {
        let l = self.latency.lock().unwrap_or_else(PoisonError::into_inner);
        (!l.is_empty()).then(|| l.clone())
    }

    /// The response-time distribution since first measured, encoded as the store keeps it
    /// ([`Latency::encode`]), if any: encoded in place, with no copy of the histogram.
    pub fn latency_encoded(&self) -> Option<String> {
        let l = self.latency.lock().unwrap_or_else(PoisonError::into_inner);
        (!l.is_empty()).then(|| l.encode())
    }

    /// What happened since the last call (and starts the next interval).
    pub fn take_interval(&self) -> Interval {
        let [s, f, rt] = &self.interval;
        Interval {
            successes: s.swap(0, Ordering::Relaxed),
            failures: f.swap(0, Ordering::Relaxed),
            response_ms_sum: rt.swap(0, Ordering::Relaxed),
        }
    }

    /// Whether an outcome was recorded since the last call (and clears the flag).
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::Relaxed)
    }

    /// Flags the stats as not yet persisted again (a write that took them failed).
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Whether selection may hand this upstream out at `now_ms`: not in backoff, and not on
    /// probation with a request already in flight.
    pub fn is_selectable(&self, now_ms: u64) -> bool {
        self.hot().is_selectable(now_ms)
    }

    /// Healthy: reputation at least the threshold, consecutive failures under the limit.
    pub fn is_healthy(&self, cfg: &HealthConfig) -> bool {
        is_healthy(self.reputation(), self.consecutive_failures(), cfg)
    }

    /// Where this upstream stands at `now_ms` (never [`State::Disabled`]: disabled upstreams
    /// are not in the pool).
    pub fn state(&self, now_ms: u64, cfg: &HealthConfig) -> State {
        if self.backoff_until_ms() > now_ms {
            State::Backoff
        } else if self.is_on_probation() {
            State::Probation
        } else if self.is_healthy(cfg) {
            State::Healthy
        } else {
            State::Unhealthy
        }
    }

    pub fn reputation(&self) -> u8 {
        self.hot().reputation()
    }

    /// What `weighted_random` draws it by: see [`selection_weight`].
    pub fn selection_weight(&self) -> u8 {
        self.hot().weight()
    }

    pub fn success_rate(&self) -> Option<f64> {
        load_f32(&self.success_ema)
    }

    pub fn response_time_ms(&self) -> Option<f64> {
        load_f32(&self.response_ema)
    }

    pub fn backoff_until_ms(&self) -> u64 {
        self.hot().backoff_until_ms()
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

    /// Attempts that said something about the upstream (successes plus its failures).
    pub fn total_uses(&self) -> u64 {
        self.successes() + self.failures()
    }

    pub fn in_flight(&self) -> u32 {
        self.hot().in_flight()
    }

    pub fn last_used_ms(&self) -> u64 {
        self.hot().last_used_ms()
    }

    /// When this upstream was last re-checked (ms since the pool's epoch), if ever.
    pub fn last_check_ms(&self) -> Option<u64> {
        Some(self.last_check_ms.load(Ordering::Relaxed)).filter(|ms| *ms > 0)
    }

    pub fn is_on_probation(&self) -> bool {
        self.hot().is_on_probation()
    }

    #[cfg(test)]
    pub(crate) fn acquire(&self, now_ms: u64) {
        self.hot().acquire(now_ms);
    }

    /// The reputation formula's inputs, as they stand.
    pub fn inputs(&self) -> Inputs {
        Inputs {
            success_rate: self.success_rate(),
            response_time_ms: self.response_time_ms(),
            consecutive_failures: self.consecutive_failures(),
            total_uses: self.total_uses(),
        }
    }

    /// Applies one attempt's outcome at `now_ms`; `jitter` is a uniform sample of `0.0..1.0`.
    /// Returns what it counted.
    pub(crate) fn record(
        &self,
        outcome: &Outcome,
        now_ms: u64,
        cfg: &HealthConfig,
        jitter: f64,
    ) -> Counted {
        let hot = self.hot();
        let was_on_probation = self.is_on_probation();
        let counted = match outcome.error {
            None => {
                self.successes.fetch_add(1, Ordering::Relaxed);
                self.consecutive_failures.store(0, Ordering::Relaxed);
                hot.set_backoff_until_ms(0);
                hot.set_probation(false);
                update_ema(&self.success_ema, 1.0, cfg.ema_alpha);
                let rt = outcome
                    .connect
                    .unwrap_or_default()
                    .saturating_add(outcome.handshake.or(outcome.first_byte).unwrap_or_default());
                let measured = outcome.connect.is_some() || outcome.first_byte.is_some();
                let [s, _, rt_sum] = &self.interval;
                s.fetch_add(1, Ordering::Relaxed);
                if measured {
                    update_ema(&self.response_ema, rt.as_secs_f64() * 1000.0, cfg.ema_alpha);
                    let ms = crate::millis(rt);
                    rt_sum.fetch_add(ms, Ordering::Relaxed);
                    self.latency
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .record(ms);
                }
                Counted::Success(measured.then(|| crate::millis(rt)))
            }
            Some(kind) if kind.side() == Side::Upstream => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
                update_ema(&self.success_ema, 0.0, cfg.ema_alpha);
                self.interval[1].fetch_add(1, Ordering::Relaxed);
                Counted::Failure
            }
            Some(_) => return Counted::Ignored,
        };
        self.set_reputation(cfg);
        self.dirty.store(true, Ordering::Relaxed);
        if was_on_probation {
            self.last_check_ms.store(now_ms.max(1), Ordering::Relaxed);
        }
        if outcome.error.is_some() && !self.is_healthy(cfg) {
            // Deactivate; the first failure past the limit waits up to backoff_base, each
            // further one twice as long.
            let past = self
                .consecutive_failures()
                .saturating_sub(cfg.max_consecutive_failures)
                + 1;
            let wait = full_jitter(backoff_ceiling(past, cfg), jitter);
            let wait_ms = crate::millis(wait).max(1);
            let until = now_ms.saturating_add(wait_ms);
            hot.set_backoff_until_ms(until);
            hot.set_probation(true);
        }
        counted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proxygate_core::ErrorKind;

    fn fail() -> Outcome {
        Outcome::failed(ErrorKind::UpstreamConnectRefused)
    }

    fn ok(ms: u64) -> Outcome {
        Outcome {
            connect: Some(Duration::from_millis(ms)),
            handshake: Some(Duration::ZERO),
            ..Outcome::default()
        }
    }

    #[test]
    fn saved_stats_restore_the_same_reputation() {
        let cfg = HealthConfig::default();
        let h = Health::default();
        assert!(!h.take_dirty());
        for i in 0..30 {
            h.record(&ok(100 + i), i, &cfg, 0.5);
        }
        h.record(&fail(), 40, &cfg, 0.5);
        assert!(h.take_dirty() && !h.take_dirty());
        let back = Health::restore(&h.saved(), &cfg);
        assert_eq!(back.saved(), h.saved());
        assert_eq!(back.reputation(), h.reputation());
        assert!(back.is_on_probation(), "its last attempt failed");
        h.record(&ok(100), 50, &cfg, 0.5);
        assert!(!Health::restore(&h.saved(), &cfg).is_on_probation());
        assert!(Health::restore(&Saved::default(), &cfg).is_on_probation());
        // The first outcome (on probation) was a check; later ones off probation are not.
        assert_eq!(h.last_check_ms(), Some(1));
        assert_eq!(Health::restore(&Saved::default(), &cfg).reputation(), 50);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let cfg = HealthConfig::default();
        assert_eq!(backoff_ceiling(1, &cfg), Duration::from_secs(30));
        assert_eq!(backoff_ceiling(2, &cfg), Duration::from_secs(60));
        assert_eq!(backoff_ceiling(5, &cfg), Duration::from_secs(480));
        assert_eq!(backoff_ceiling(6, &cfg), Duration::from_secs(600));
        assert_eq!(backoff_ceiling(u32::MAX, &cfg), Duration::from_secs(600));
        assert_eq!(
            full_jitter(Duration::from_secs(10), 0.5),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn new_upstream_is_on_probation_until_a_success() {
        let cfg = HealthConfig::default();
        let h = Health::default();
        assert_eq!(h.reputation(), 50);
        assert!(h.is_selectable(0));
        h.acquire(0);
        assert!(
            !h.is_selectable(0),
            "probation allows one request in flight"
        );
        h.record(&ok(100), 1, &cfg, 0.5);
        assert!(h.is_selectable(1), "a success ends probation");
        assert!(h.is_healthy(&cfg));
        // 50 + 30 (success) + 15 (fast) + 0 (uses)
        assert_eq!(h.reputation(), 95);
    }

    #[test]
    fn dead_upstream_backs_off_then_recovers() {
        let cfg = HealthConfig::default();
        let h = Health::default();
        h.record(&ok(100), 0, &cfg, 1.0);
        h.record(&fail(), 10, &cfg, 1.0);
        h.record(&fail(), 20, &cfg, 1.0);
        assert!(h.is_selectable(20), "two failures: still healthy");
        h.record(&fail(), 30, &cfg, 1.0);
        assert!(!h.is_healthy(&cfg));
        assert!(!h.is_selectable(30));
        assert!(!h.is_selectable(30 + 29_999));
        assert!(
            h.is_selectable(30 + 30_000),
            "the jittered wait is at most backoff_base"
        );
        assert!(h.is_on_probation());
        h.record(&fail(), 40_000, &cfg, 1.0);
        assert_eq!(h.backoff_until_ms(), 40_000 + 60_000, "doubled");
        h.record(&ok(100), 100_000, &cfg, 1.0);
        assert!(h.is_selectable(100_000));
        assert!(!h.is_on_probation());
        assert_eq!(h.consecutive_failures(), 0);
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
            h.record(&Outcome::failed(kind), 10, &cfg, 0.5);
        }
        assert_eq!(h.failures(), 0);
        assert_eq!(h.reputation(), 50);
        assert!(h.success_rate().is_none());
    }

    #[test]
    fn moving_averages() {
        let cfg = HealthConfig::default();
        let h = Health::default();
        h.record(&ok(1000), 0, &cfg, 0.5);
        assert_eq!(h.response_time_ms(), Some(1000.0));
        h.record(&ok(0), 0, &cfg, 0.5);
        assert!((h.response_time_ms().unwrap() - 800.0).abs() < 0.01);
        h.record(&fail(), 0, &cfg, 0.5);
        assert!((h.success_rate().unwrap() - 0.8).abs() < 0.001);
    }

    proptest! {
        #[test]
        fn reputation_stays_in_range_and_failures_never_raise_it(
            script in proptest::collection::vec(any::<bool>(), 0..60)
        ) {
            let cfg = HealthConfig::default();
            let h = Health::default();
            for (i, success) in script.iter().enumerate() {
                let before = h.reputation();
                if *success {
                    h.record(&ok(300), i as u64, &cfg, 0.5);
                } else {
                    h.record(&fail(), i as u64, &cfg, 0.5);
                    prop_assert!(h.reputation() <= before);
                }
                prop_assert!(h.reputation() <= 100);
            }
        }
    }
}
