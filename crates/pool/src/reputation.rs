//! The reputation formula (0-100), pure. Every constant is configurable; the defaults are the
//! product's documented formula:
//!
//! ```text
//! score = 50
//! score += (success_rate - 0.5) * 60                 # ±30 (no data yet: 0)
//! rt <  500 ms: +15 ;  rt > 2000 ms: -15 ;  between: linear from +15 at 500 ms to 0 at 2000 ms
//! score -= 5 * consecutive_failures
//! score += min(total_uses / 10, 10)
//! reputation = clamp(round(score), 0, 100)           # a new upstream scores 50
//! ```

/// The formula's constants (`[pool.reputation]` in the config file).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReputationConfig {
    /// Score of an upstream with no history.
    pub base: f64,
    /// `(success_rate - 0.5) * success_weight` is added.
    pub success_weight: f64,
    /// Response times under this earn the full latency bonus.
    pub fast_ms: f64,
    /// Response times over this cost the full latency bonus.
    pub slow_ms: f64,
    /// The latency bonus (and penalty).
    pub latency_bonus: f64,
    /// Subtracted per consecutive failure.
    pub failure_penalty: f64,
    /// One point per this many uses...
    pub uses_per_point: u64,
    /// ...up to this many points.
    pub max_uses_bonus: u64,
}

impl Default for ReputationConfig {
    fn default() -> Self {
        Self {
            base: 50.0,
            success_weight: 60.0,
            fast_ms: 500.0,
            slow_ms: 2000.0,
            latency_bonus: 15.0,
            failure_penalty: 5.0,
            uses_per_point: 10,
            max_uses_bonus: 10,
        }
    }
}

/// The inputs of the formula.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Inputs {
    /// Moving average of success (0.0-1.0); `None` before any attempt.
    pub success_rate: Option<f64>,
    /// Moving average of response time in ms; `None` before any measurement.
    pub response_time_ms: Option<f64>,
    pub consecutive_failures: u32,
    pub total_uses: u64,
}

/// The success term: `(rate - 0.5) * weight`, 0 without data.
pub fn success_term(rate: Option<f64>, cfg: &ReputationConfig) -> f64 {
    rate.map_or(0.0, |r| (r.clamp(0.0, 1.0) - 0.5) * cfg.success_weight)
}

/// The latency term: `+bonus` under `fast_ms`, `-bonus` over `slow_ms`, linear from `+bonus`
/// to 0 between them; 0 without data.
pub fn latency_term(rt_ms: Option<f64>, cfg: &ReputationConfig) -> f64 {
    match rt_ms {
        None => 0.0,
        Some(rt) if rt.is_nan() => 0.0,
        Some(rt) if rt < cfg.fast_ms => cfg.latency_bonus,
        Some(rt) if rt > cfg.slow_ms => -cfg.latency_bonus,
        Some(rt) => {
            let span = (cfg.slow_ms - cfg.fast_ms).max(f64::EPSILON);
            cfg.latency_bonus * (cfg.slow_ms - rt) / span
        }
    }
}

/// The failure term: `-penalty * consecutive_failures`.
pub fn failure_term(consecutive_failures: u32, cfg: &ReputationConfig) -> f64 {
    -cfg.failure_penalty * f64::from(consecutive_failures)
}

/// The experience term: `min(total_uses / uses_per_point, max_uses_bonus)`.
pub fn uses_term(total_uses: u64, cfg: &ReputationConfig) -> f64 {
    let points = total_uses / cfg.uses_per_point.max(1);
    points.min(cfg.max_uses_bonus) as f64
}

/// The reputation, 0..=100.
pub fn reputation(i: &Inputs, cfg: &ReputationConfig) -> u8 {
    explain(i, cfg).reputation
}

/// The formula worked through for one upstream: each term with the input it came from, the
/// raw score and the reputation it rounds and clamps to. What `proxygate reputation ID`
/// shows.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Explanation {
    pub base: f64,
    pub success_rate: Option<f64>,
    pub success_term: f64,
    pub response_time_ms: Option<f64>,
    pub latency_term: f64,
    pub consecutive_failures: u32,
    pub failure_term: f64,
    pub total_uses: u64,
    pub uses_term: f64,
    /// `base + success + latency + failure + uses`, before rounding and clamping.
    pub score: f64,
    pub reputation: u8,
}

/// Works the formula through for `i`.
pub fn explain(i: &Inputs, cfg: &ReputationConfig) -> Explanation {
    let success = success_term(i.success_rate, cfg);
    let latency = latency_term(i.response_time_ms, cfg);
    let failure = failure_term(i.consecutive_failures, cfg);
    let uses = uses_term(i.total_uses, cfg);
    let score = cfg.base + success + latency + failure + uses;
    Explanation {
        base: cfg.base,
        success_rate: i.success_rate,
        success_term: success,
        response_time_ms: i.response_time_ms,
        latency_term: latency,
        consecutive_failures: i.consecutive_failures,
        failure_term: failure,
        total_uses: i.total_uses,
        uses_term: uses,
        score,
        reputation: if score.is_nan() {
            0
        } else {
            score.round().clamp(0.0, 100.0) as u8
        },
    }
}

/// What `weighted_random` draws an upstream by: its reputation times the measured probability
/// that an attempt through it works, raised to `exponent`:
///
/// ```text
/// weight = round(reputation * success_rate ^ exponent)     # 0-100; no data yet: reputation
/// ```
///
/// The reputation alone keeps an upstream that fails every other attempt near 70 (its success
/// term is 0, its latency and experience terms are full), so a draw by reputation sends it
/// about 0.7 of a perfect upstream's share and pays a failed attempt for every second one.
/// With the default exponent of 4 the same upstream weighs 70 * 0.5^4 ≈ 4: it still serves,
/// about 1/25 as often as a perfect one, and a failed attempt costs a client rarely. An
/// exponent of 0 draws by reputation alone.
pub fn selection_weight(reputation: u8, success_rate: Option<f64>, exponent: f64) -> u8 {
    let p = success_rate.unwrap_or(1.0);
    let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
    let exponent = exponent.max(0.0);
    // Every report recomputes this: a whole exponent (the default 4) is a few multiplications,
    // where libm's pow showed in a tunnel's profile.
    let discount = if exponent.fract() == 0.0 && exponent <= 64.0 {
        p.powi(exponent as i32)
    } else {
        p.powf(exponent)
    };
    let w = f64::from(reputation.min(100)) * discount;
    if w.is_nan() {
        0
    } else {
        w.round().clamp(0.0, 100.0) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn selection_weight_discounts_what_fails() {
        // No data: the reputation.
        assert_eq!(selection_weight(50, None, 4.0), 50);
        // Always works: the reputation.
        assert_eq!(selection_weight(97, Some(1.0), 4.0), 97);
        // Fails every other attempt: about 4 instead of 70.
        assert_eq!(selection_weight(70, Some(0.5), 4.0), 4);
        // Never works: nothing.
        assert_eq!(selection_weight(20, Some(0.0), 4.0), 0);
        // Exponent 0: the reputation alone.
        assert_eq!(selection_weight(70, Some(0.5), 0.0), 70);
        assert_eq!(selection_weight(70, Some(f64::NAN), 4.0), 0);
        // Whole and fractional exponents follow the same curve.
        assert_eq!(selection_weight(100, Some(0.9), 2.0), 81);
        assert_eq!(selection_weight(100, Some(0.81), 0.5), 90);
        assert_eq!(selection_weight(100, Some(0.9), f64::NAN), 100);
    }

    proptest! {
        #[test]
        fn whole_exponents_weigh_as_pow_does(rep in 0u8..=100, p in 0.0f64..=1.0, e in 0u8..=12) {
            let want = (f64::from(rep) * p.powf(f64::from(e))).round();
            let got = f64::from(selection_weight(rep, Some(p), f64::from(e)));
            prop_assert!((got - want).abs() <= 1.0, "{got} vs {want}");
        }
    }

    fn cfg() -> ReputationConfig {
        ReputationConfig::default()
    }

    #[test]
    fn explanation_adds_up() {
        let i = Inputs {
            success_rate: Some(0.4),
            response_time_ms: Some(1250.0),
            consecutive_failures: 2,
            total_uses: 37,
        };
        let e = explain(&i, &cfg());
        assert!((e.success_term + 6.0).abs() < 1e-9, "{}", e.success_term);
        assert_eq!(e.latency_term, 7.5);
        assert_eq!(e.failure_term, -10.0);
        assert_eq!(e.uses_term, 3.0);
        let sum = e.base + e.success_term + e.latency_term + e.failure_term + e.uses_term;
        assert_eq!(e.score, sum);
        assert_eq!(e.reputation, 45);
        assert_eq!(reputation(&i, &cfg()), 45);
    }

    #[test]
    fn new_upstream_scores_50() {
        assert_eq!(reputation(&Inputs::default(), &cfg()), 50);
    }

    #[test]
    fn success_term_is_plus_minus_30() {
        assert_eq!(success_term(Some(1.0), &cfg()), 30.0);
        assert_eq!(success_term(Some(0.0), &cfg()), -30.0);
        assert_eq!(success_term(Some(0.5), &cfg()), 0.0);
        assert_eq!(success_term(None, &cfg()), 0.0);
    }

    #[test]
    fn latency_term_edges_and_slope() {
        let c = cfg();
        assert_eq!(latency_term(Some(100.0), &c), 15.0);
        assert_eq!(latency_term(Some(499.9), &c), 15.0);
        assert_eq!(latency_term(Some(500.0), &c), 15.0);
        assert_eq!(latency_term(Some(1250.0), &c), 7.5);
        assert_eq!(latency_term(Some(2000.0), &c), 0.0);
        assert_eq!(latency_term(Some(2000.1), &c), -15.0);
        assert_eq!(latency_term(None, &c), 0.0);
    }

    #[test]
    fn failure_and_uses_terms() {
        let c = cfg();
        assert_eq!(failure_term(3, &c), -15.0);
        assert_eq!(uses_term(9, &c), 0.0);
        assert_eq!(uses_term(10, &c), 1.0);
        assert_eq!(uses_term(95, &c), 9.0);
        assert_eq!(uses_term(1_000_000, &c), 10.0);
    }

    #[test]
    fn best_and_worst_clamp() {
        let best = Inputs {
            success_rate: Some(1.0),
            response_time_ms: Some(10.0),
            consecutive_failures: 0,
            total_uses: 1000,
        };
        assert_eq!(reputation(&best, &cfg()), 100);
        let worst = Inputs {
            success_rate: Some(0.0),
            response_time_ms: Some(9000.0),
            consecutive_failures: 20,
            total_uses: 0,
        };
        assert_eq!(reputation(&worst, &cfg()), 0);
    }

    fn inputs() -> impl Strategy<Value = Inputs> {
        (
            proptest::option::of(0.0f64..=1.0),
            proptest::option::of(0.0f64..100_000.0),
            0u32..1000,
            0u64..u64::MAX,
        )
            .prop_map(|(s, r, f, u)| Inputs {
                success_rate: s,
                response_time_ms: r,
                consecutive_failures: f,
                total_uses: u,
            })
    }

    proptest! {
        #[test]
        fn stays_in_range(i in inputs()) {
            prop_assert!(reputation(&i, &cfg()) <= 100);
        }

        #[test]
        fn more_failures_never_raise_it(i in inputs(), extra in 1u32..50) {
            let worse = Inputs { consecutive_failures: i.consecutive_failures + extra, ..i };
            prop_assert!(reputation(&worse, &cfg()) <= reputation(&i, &cfg()));
        }

        #[test]
        fn weight_never_exceeds_reputation_and_falls_with_success(
            rep in 0u8..=100, p in 0.0f64..=1.0, drop in 0.0f64..=1.0, exp in 0.0f64..8.0
        ) {
            let w = selection_weight(rep, Some(p), exp);
            prop_assert!(w <= rep);
            prop_assert!(selection_weight(rep, Some((p - drop).max(0.0)), exp) <= w);
        }

        #[test]
        fn lower_success_never_raises_it(i in inputs(), drop in 0.0f64..1.0) {
            let Some(s) = i.success_rate else { return Ok(()) };
            let worse = Inputs { success_rate: Some((s - drop).max(0.0)), ..i };
            prop_assert!(reputation(&worse, &cfg()) <= reputation(&i, &cfg()));
        }
    }
}
