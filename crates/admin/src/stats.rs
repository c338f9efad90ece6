//! [`StatsBook`]: what the pool's attempts did over the last 5 minutes, hour and day, for
//! `GET /api/v1/stats` and `proxygate stats`.
//!
//! The pool counts every attempt as it reports (the whole pool's counts and response-time
//! histogram, and each upstream's counts and summed response time since the last look). The
//! book takes those every [`SAMPLE_EVERY`] (and before answering) into the current minute,
//! and keeps 1,440 closed minutes. Memory is bounded: a minute keeps at most
//! [`UPSTREAMS_PER_MINUTE`] upstreams (the busiest), each 24 bytes, and one histogram for the
//! whole pool.
//!
//! Percentiles: the pool's are exact for the window (to two significant digits); an
//! upstream's are over its whole measured life (its histogram is kept with its stats), its
//! window figures are counts, success rate and mean response time.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use proxygate_core::UpstreamId;
use proxygate_pool::PoolReader;
use proxygate_pool::latency::Window;
use serde::Serialize;

use crate::catalog::unix_ms;

/// How often the book takes the pool's counts.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Minutes kept: one day.
pub const MINUTES: usize = 1440;
/// Upstreams kept per minute (the busiest).
pub const UPSTREAMS_PER_MINUTE: usize = 1024;
/// Upstreams with fewer attempts in a window are not ranked top or bottom.
pub const MIN_RANKED_ATTEMPTS: u64 = 3;
/// How many upstreams the top and bottom lists hold.
pub const RANKED: usize = 10;

const MINUTE_MS: u64 = 60_000;

/// The windows the API offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    FiveMinutes,
    Hour,
    Day,
}

impl Span {
    pub fn parse(s: &str) -> Option<Span> {
        match s {
            "5m" => Some(Span::FiveMinutes),
            "1h" => Some(Span::Hour),
            "24h" | "1d" => Some(Span::Day),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Span::FiveMinutes => "5m",
            Span::Hour => "1h",
            Span::Day => "24h",
        }
    }

    fn minutes(self) -> u64 {
        match self {
            Span::FiveMinutes => 5,
            Span::Hour => 60,
            Span::Day => 1440,
        }
    }
}

/// One upstream over one minute.
#[derive(Debug, Clone, Copy, Default)]
struct UpstreamMinute {
    id: UpstreamId,
    successes: u32,
    failures: u32,
    response_ms_sum: u64,
}

#[derive(Debug, Default)]
struct Minute {
    start_unix_ms: u64,
    pool: Window,
    upstreams: HashMap<UpstreamId, UpstreamMinute>,
}

/// The last day of the pool's attempts, minute by minute.
#[derive(Debug, Default)]
pub struct StatsBook {
    closed: VecDeque<Minute>,
    current: Minute,
}

/// One upstream over a window.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamWindow {
    pub id: String,
    pub address: String,
    pub scheme: &'static str,
    pub attempts: u64,
    pub failures: u64,
    pub success_rate: f64,
    pub mean_response_ms: Option<f64>,
    /// Percentiles over the upstream's whole measured life.
    pub lifetime_p50_ms: Option<u64>,
    pub lifetime_p95_ms: Option<u64>,
    pub lifetime_p99_ms: Option<u64>,
}

/// Percentiles of response time, ms.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub p50: Option<u64>,
    pub p95: Option<u64>,
    pub p99: Option<u64>,
}

/// `GET /api/v1/stats`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub window: &'static str,
    pub from_unix_ms: u64,
    pub to_unix_ms: u64,
    /// Attempts through upstreams that said something about them (successes and the
    /// upstreams' own failures).
    pub attempts: u64,
    pub successes: u64,
    pub failures: u64,
    pub success_rate: Option<f64>,
    pub response_ms: Percentiles,
    /// Upstreams with at least one attempt in the window.
    pub active_upstreams: usize,
    /// The best upstreams of the window (success rate, then mean response time), among those
    /// with at least [`MIN_RANKED_ATTEMPTS`] attempts.
    pub top: Vec<UpstreamWindow>,
    /// The worst, by the same order.
    pub bottom: Vec<UpstreamWindow>,
}

impl StatsBook {
    /// Takes what the pool counted since the last call into the current minute, closing it
    /// (and any minute that passed) when its minute is over.
    pub fn sample(&mut self, pool: &PoolReader) {
        self.sample_at(pool, unix_ms());
    }

    fn sample_at(&mut self, pool: &PoolReader, now_unix_ms: u64) {
        let minute = now_unix_ms - now_unix_ms % MINUTE_MS;
        if self.current.start_unix_ms == 0 {
            self.current.start_unix_ms = minute;
        }
        // Close the minute first: what the pool counted since the last look (at most
        // SAMPLE_EVERY ago) goes to the minute now, so short windows see it.
        if minute > self.current.start_unix_ms {
            let mut done = std::mem::take(&mut self.current);
            self.current.start_unix_ms = minute;
            if done.upstreams.len() > UPSTREAMS_PER_MINUTE {
                let mut all: Vec<_> = done.upstreams.into_values().collect();
                all.sort_by_key(|u| std::cmp::Reverse(u.successes + u.failures));
                all.truncate(UPSTREAMS_PER_MINUTE);
                done.upstreams = all.into_iter().map(|u| (u.id, u)).collect();
            }
            self.closed.push_back(done);
            while self.closed.len() > MINUTES {
                self.closed.pop_front();
            }
        }
        let recent = pool.take_recent();
        self.current.pool.merge(&recent);
        for e in pool.snapshot().entries() {
            let i = e.health.take_interval();
            if i.is_empty() {
                continue;
            }
            let u = self
                .current
                .upstreams
                .entry(e.id)
                .or_insert(UpstreamMinute {
                    id: e.id,
                    ..UpstreamMinute::default()
                });
            u.successes = u
                .successes
                .saturating_add(u32::try_from(i.successes).unwrap_or(u32::MAX));
            u.failures = u
                .failures
                .saturating_add(u32::try_from(i.failures).unwrap_or(u32::MAX));
            u.response_ms_sum += i.response_ms_sum;
        }
    }

    /// The window `span` back from now, the current minute included.
    pub fn report(&self, span: Span, pool: &PoolReader) -> Report {
        self.report_at(span, pool, unix_ms())
    }

    fn report_at(&self, span: Span, pool: &PoolReader, now_unix_ms: u64) -> Report {
        let from = now_unix_ms.saturating_sub(span.minutes() * MINUTE_MS);
        let minutes = self
            .closed
            .iter()
            .filter(|m| m.start_unix_ms >= from)
            .chain(std::iter::once(&self.current));
        let mut total = Window::default();
        let mut per: HashMap<UpstreamId, UpstreamMinute> = HashMap::new();
        for m in minutes {
            total.merge(&m.pool);
            for u in m.upstreams.values() {
                let t = per.entry(u.id).or_insert(UpstreamMinute {
                    id: u.id,
                    ..UpstreamMinute::default()
                });
                t.successes = t.successes.saturating_add(u.successes);
                t.failures = t.failures.saturating_add(u.failures);
                t.response_ms_sum += u.response_ms_sum;
            }
        }
        let snap = pool.snapshot();
        let mut ranked: Vec<UpstreamWindow> = per
            .values()
            .filter(|u| u64::from(u.successes + u.failures) >= MIN_RANKED_ATTEMPTS)
            .filter_map(|u| {
                let e = snap.get(u.id)?;
                let attempts = u64::from(u.successes) + u64::from(u.failures);
                let latency = e.health.latency();
                let q = |q: f64| latency.as_ref().and_then(|l| l.quantile_ms(q));
                Some(UpstreamWindow {
                    id: u.id.to_string(),
                    address: e.upstream.authority(),
                    scheme: e.upstream.scheme.as_str(),
                    attempts,
                    failures: u64::from(u.failures),
                    success_rate: f64::from(u.successes) / attempts as f64,
                    mean_response_ms: (u.successes > 0)
                        .then(|| u.response_ms_sum as f64 / f64::from(u.successes)),
                    lifetime_p50_ms: q(0.5),
                    lifetime_p95_ms: q(0.95),
                    lifetime_p99_ms: q(0.99),
                })
            })
            .collect();
        ranked.sort_by(|a, b| {
            b.success_rate
                .total_cmp(&a.success_rate)
                .then_with(|| {
                    let ms = |u: &UpstreamWindow| u.mean_response_ms.unwrap_or(f64::MAX);
                    ms(a).total_cmp(&ms(b))
                })
                .then_with(|| a.id.cmp(&b.id))
        });
        let top: Vec<_> = ranked.iter().take(RANKED).cloned().collect();
        let bottom: Vec<_> = ranked.iter().rev().take(RANKED).cloned().collect();
        let attempts = total.requests();
        Report {
            window: span.as_str(),
            from_unix_ms: from,
            to_unix_ms: now_unix_ms,
            attempts,
            successes: total.successes,
            failures: total.failures,
            success_rate: (attempts > 0).then(|| total.successes as f64 / attempts as f64),
            response_ms: Percentiles {
                p50: total.quantile_ms(0.5),
                p95: total.quantile_ms(0.95),
                p99: total.quantile_ms(0.99),
            },
            active_upstreams: per.len(),
            top,
            bottom,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxygate_core::{ErrorKind, Outcome, Upstream};
    use proxygate_pool::{HealthConfig, Pool, Strategy};

    fn attempt(pool: &PoolReader, ms: u64, ok: bool) -> UpstreamId {
        let lease = pool.select(&[]).unwrap();
        let id = lease.id();
        lease.report(&Outcome {
            connect: Some(Duration::from_millis(ms)),
            handshake: Some(Duration::ZERO),
            error: (!ok).then_some(ErrorKind::UpstreamConnectRefused),
            ..Outcome::default()
        });
        id
    }

    #[test]
    fn windows_count_what_happened_in_them() {
        let (pool, writer) = Pool::create(Strategy::RoundRobin, HealthConfig::default());
        writer.replace(
            ["http://10.0.0.1:1", "http://10.0.0.2:1"]
                .iter()
                .map(|u| Upstream::parse(u).unwrap()),
        );
        let mut book = StatsBook::default();
        let t0 = 1_700_000_000_000 - 1_700_000_000_000 % MINUTE_MS;
        // Two hours ago: 10 slow successes.
        for _ in 0..10 {
            attempt(&pool, 900, true);
        }
        book.sample_at(&pool, t0);
        book.sample_at(&pool, t0 + 60 * MINUTE_MS);
        // Now: 8 fast successes and 2 failures.
        for _ in 0..8 {
            attempt(&pool, 10, true);
        }
        for _ in 0..2 {
            attempt(&pool, 10, false);
        }
        let now = t0 + 120 * MINUTE_MS + 1000;
        book.sample_at(&pool, now);
        let five = book.report_at(Span::FiveMinutes, &pool, now);
        assert_eq!((five.attempts, five.successes, five.failures), (10, 8, 2));
        assert_eq!(five.success_rate, Some(0.8));
        assert_eq!(five.response_ms.p99, Some(10));
        assert_eq!(five.active_upstreams, 2);
        assert_eq!(five.top.len(), 2);
        let day = book.report_at(Span::Day, &pool, now);
        assert_eq!(day.attempts, 20);
        assert!(day.response_ms.p99.unwrap() >= 890, "{:?}", day.response_ms);
        assert!(day.top[0].lifetime_p99_ms.unwrap() >= 890);
        assert_eq!(Span::parse("1h"), Some(Span::Hour));
        assert_eq!(Span::parse("2h"), None);
    }
}
