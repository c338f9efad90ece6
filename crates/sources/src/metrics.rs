//! [`SourceMetrics`]: fetches, candidates and check results per source, and how long checks
//! take. The `source` label takes the configured names (and `pool` for re-checks of pool
//! members): bounded by the config, never by what a list says. Every series exists from
//! registration.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};

/// The `source` label of re-checks of pool members.
pub const POOL: &str = "pool";

/// The sources' series.
#[derive(Debug, Clone)]
pub struct SourceMetrics {
    fetches: IntCounterVec,
    candidates: IntCounterVec,
    checks: IntCounterVec,
    imported: IntCounterVec,
    up: IntGaugeVec,
    last_success: IntGaugeVec,
    check_seconds: Histogram,
    quarantined: prometheus::IntCounter,
    leaks: prometheus::IntCounter,
}

impl SourceMetrics {
    /// Registers the series for `names` (the configured sources).
    pub fn register(registry: &Registry, names: &[String]) -> prometheus::Result<SourceMetrics> {
        let counter = |n: &str, h: &str, l: &[&str]| IntCounterVec::new(Opts::new(n, h), l);
        let gauge = |n: &str, h: &str| IntGaugeVec::new(Opts::new(n, h), &["source"]);
        let m = SourceMetrics {
            fetches: counter(
                "proxygate_source_fetches_total",
                "Fetches of a list source, by result (ok, failed).",
                &["source", "result"],
            )?,
            candidates: counter(
                "proxygate_source_candidates_total",
                "Distinct candidates a source listed, over its fetches.",
                &["source"],
            )?,
            checks: counter(
                "proxygate_source_checks_total",
                "Checks through a candidate (or, source=\"pool\", a pool member), by result \
                 (passed, failed, inconclusive).",
                &["source", "result"],
            )?,
            imported: counter(
                "proxygate_source_imported_total",
                "Candidates that passed their check and joined the pool.",
                &["source"],
            )?,
            up: gauge(
                "proxygate_source_up",
                "1 when the source's last fetch answered a list, 0 when it failed.",
            )?,
            last_success: gauge(
                "proxygate_source_last_success_timestamp_seconds",
                "When the source last answered a list (Unix seconds; 0: never).",
            )?,
            check_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "proxygate_checker_check_seconds",
                    "How long one check (connect, handshake, judge answer) took.",
                )
                .buckets(vec![
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0,
                ]),
            )?,
            quarantined: prometheus::IntCounter::new(
                "proxygate_upstream_quarantined_total",
                "Checks that caught an upstream tampering (a swapped TLS certificate, an altered \
                 body): it is quarantined until an operator enables it.",
            )?,
            leaks: prometheus::IntCounter::new(
                "proxygate_upstream_leaks_total",
                "Checks that saw an exit leak the gateway's address or the client's proxy \
                 headers: it is demoted to untrusted.",
            )?,
        };
        for name in names {
            for result in ["ok", "failed"] {
                m.fetches.with_label_values(&[name.as_str(), result]);
            }
            m.candidates.with_label_values(&[name.as_str()]);
            m.imported.with_label_values(&[name.as_str()]);
            m.up.with_label_values(&[name.as_str()]);
            m.last_success.with_label_values(&[name.as_str()]);
        }
        for name in names.iter().map(String::as_str).chain([POOL]) {
            for result in ["passed", "failed", "inconclusive"] {
                m.checks.with_label_values(&[name, result]);
            }
        }
        registry.register(Box::new(m.fetches.clone()))?;
        registry.register(Box::new(m.candidates.clone()))?;
        registry.register(Box::new(m.checks.clone()))?;
        registry.register(Box::new(m.imported.clone()))?;
        registry.register(Box::new(m.up.clone()))?;
        registry.register(Box::new(m.last_success.clone()))?;
        registry.register(Box::new(m.check_seconds.clone()))?;
        registry.register(Box::new(m.quarantined.clone()))?;
        registry.register(Box::new(m.leaks.clone()))?;
        Ok(m)
    }

    /// Metrics registered nowhere.
    pub fn unregistered() -> SourceMetrics {
        match Self::register(&Registry::new(), &[]) {
            Ok(m) => m,
            Err(e) => unreachable!("static metric definitions: {e}"),
        }
    }

    pub fn fetched(&self, source: &str, ok: bool, unique: usize, now_unix: u64) {
        let result = if ok { "ok" } else { "failed" };
        self.fetches.with_label_values(&[source, result]).inc();
        self.candidates
            .with_label_values(&[source])
            .inc_by(unique as u64);
        self.up.with_label_values(&[source]).set(i64::from(ok));
        if ok {
            self.last_success
                .with_label_values(&[source])
                .set(i64::try_from(now_unix).unwrap_or(i64::MAX));
        }
    }

    pub fn checked(&self, source: &str, passed: bool, inconclusive: bool, seconds: f64) {
        let result = match (passed, inconclusive) {
            (true, _) => "passed",
            (false, true) => "inconclusive",
            (false, false) => "failed",
        };
        self.checks.with_label_values(&[source, result]).inc();
        if !inconclusive {
            self.check_seconds.observe(seconds);
        }
    }

    /// What a check found besides pass or fail: tampering, a leak.
    pub fn findings(&self, tampered: bool, leaked: bool) {
        if tampered {
            self.quarantined.inc();
        }
        if leaked {
            self.leaks.inc();
        }
    }

    pub fn imported(&self, source: &str, n: usize) {
        self.imported.with_label_values(&[source]).inc_by(n as u64);
    }
}
