//! [`StatsBook`]: what the pool's attempts did over the last 5 minutes, hour and day, for
//! `GET /api/v1/stats` and `proxygate stats`.
//!
//! The pool counts every attempt as it reports (the whole pool's counts and response-time
//! histogram, and each upstream's counts and summed response time since the last look). The
//! book takes those every [`SAMPLE_EVERY`] (and before answering) into the current minute. It
//! keeps the last [`MINUTES_KEPT`] closed minutes, for the 5-minute and hour windows, and the
//! last [`HOURS_KEPT`] closed hours, each the sum of its minutes, for the day: the day's window
//! starts at the top of the hour that holds its first minute (so it spans 24 to 25 hours, and
//! says where it starts). Memory is bounded and small: a closed minute or hour keeps at most
//! [`UPSTREAMS_PER_MINUTE`] upstreams (the busiest), 24 bytes each, and the pool's histogram as
//! its recorded buckets only. A day of minutes, each a dense histogram and a hash map, held ~100
//! MiB with 1,100 busy upstreams (8 MiB with none).
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
/// Closed minutes kept: the hour window's.
pub const MINUTES_KEPT: usize = 60;
/// Closed hours kept: the day window's.
pub const HOURS_KEPT: usize = 24;
/// Upstreams kept per closed minute or hour (the busiest).
pub const UPSTREAMS_PER_MINUTE: usize = 1024;
/// Upstreams with fewer attempts in a window are not ranked top or bottom.
pub const MIN_RANKED_ATTEMPTS: u64 = 3;
/// How many upstreams the top and bottom lists hold.
pub const RANKED: usize = 10;

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;

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

/// One upstream over one minute (or hour).
#[derive(Debug, Clone, Copy, Default)]
struct UpstreamMinute {
    id: UpstreamId,
    successes: u32,
    failures: u32,
    response_ms_sum: u64,
}

impl UpstreamMinute {
    fn attempts(&self) -> u64 {
        u64::from(self.successes) + u64::from(self.failures)
    }
}

/// Adds `u`'s counts into its row of `rows`.
fn add_upstream(rows: &mut HashMap<UpstreamId, UpstreamMinute>, u: &UpstreamMinute) {
    let t = rows.entry(u.id).or_insert(UpstreamMinute {
        id: u.id,
        ..UpstreamMinute::default()
    });
    t.successes = t.successes.saturating_add(u.successes);
    t.failures = t.failures.saturating_add(u.failures);
    t.response_ms_sum += u.response_ms_sum;
}

/// The busiest `keep` of `rows`.
fn busiest(rows: HashMap<UpstreamId, UpstreamMinute>, keep: usize) -> Vec<UpstreamMinute> {
    let mut all: Vec<_> = rows.into_values().collect();
    if all.len() > keep {
        all.sort_unstable_by_key(|u| (std::cmp::Reverse(u.attempts()), u.id));
        all.truncate(keep);
    }
    all
}

/// A minute or an hour still filling.
#[derive(Debug, Default)]
struct Open {
    start_unix_ms: u64,
    pool: Window,
    upstreams: HashMap<UpstreamId, UpstreamMinute>,
}

impl Open {
    /// Its figures, kept compact: the busiest upstreams only, the histogram's recorded buckets.
    fn close(self) -> Closed {
        let response_ms = self
            .pool
            .response_ms
            .iter_recorded()
            .map(|v| {
                (
                    u32::try_from(v.value_iterated_to()).unwrap_or(u32::MAX),
                    v.count_at_value(),
                )
            })
            .collect();
        Closed {
            start_unix_ms: self.start_unix_ms,
            successes: self.pool.successes,
            failures: self.pool.failures,
            response_ms,
            upstreams: busiest(self.upstreams, UPSTREAMS_PER_MINUTE).into(),
        }
    }

    /// Adds a closed minute into this hour. The hour's rows stay bounded: past four minutes'
    /// worth, only the busiest two minutes' worth go on.
    fn absorb(&mut self, m: &Closed) {
        m.add_to(&mut self.pool, &mut self.upstreams);
        if self.upstreams.len() > 4 * UPSTREAMS_PER_MINUTE {
            let kept = busiest(
                std::mem::take(&mut self.upstreams),
                2 * UPSTREAMS_PER_MINUTE,
            );
            self.upstreams = kept.into_iter().map(|u| (u.id, u)).collect();
        }
    }
}

/// A closed minute or hour.
#[derive(Debug)]
struct Closed {
    start_unix_ms: u64,
    successes: u64,
    failures: u64,
    /// The pool's response times: each recorded bucket of its histogram, as (the bucket's
    /// highest value, count). A few dozen where the dense histogram holds 1,408 counters.
    response_ms: Box<[(u32, u32)]>,
    /// Its busiest upstreams.
    upstreams: Box<[UpstreamMinute]>,
}

impl Closed {
    /// Adds its figures into a window's.
    fn add_to(&self, pool: &mut Window, rows: &mut HashMap<UpstreamId, UpstreamMinute>) {
        pool.successes += self.successes;
        pool.failures += self.failures;
        for &(ms, n) in &self.response_ms {
            // A value the same histogram recorded, so within its bounds.
            let _ = pool.response_ms.record_n(u64::from(ms), n);
        }
        for u in &self.upstreams {
            add_upstream(rows, u);
        }
    }
}

/// The last day of the pool's attempts: by the minute for the last hour, by the hour before.
#[derive(Debug, Default)]
pub struct StatsBook {
    /// The last [`MINUTES_KEPT`] closed minutes, oldest first.
    minutes: VecDeque<Closed>,
    /// The last [`HOURS_KEPT`] closed hours, oldest first.
    hours: VecDeque<Closed>,
    /// The closed minutes of the hour under way, summed.
    hour: Open,
    current: Open,
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

    /// [`StatsBook::sample`] at `now_unix_ms` (tests drive the clock).
    #[doc(hidden)]
    pub fn sample_at(&mut self, pool: &PoolReader, now_unix_ms: u64) {
        let minute = now_unix_ms - now_unix_ms % MINUTE_MS;
        if self.current.start_unix_ms == 0 {
            self.current.start_unix_ms = minute;
        }
        // Close the minute first: what the pool counted since the last look (at most
        // SAMPLE_EVERY ago) goes to the minute now, so short windows see it.
        if minute > self.current.start_unix_ms {
            let done = std::mem::take(&mut self.current).close();
            self.current.start_unix_ms = minute;
            let hour = done.start_unix_ms - done.start_unix_ms % HOUR_MS;
            if hour > self.hour.start_unix_ms {
                let full = std::mem::take(&mut self.hour);
                if full.start_unix_ms > 0 {
                    self.hours.push_back(full.close());
                    while self.hours.len() > HOURS_KEPT {
                        self.hours.pop_front();
                    }
                }
                self.hour.start_unix_ms = hour;
            }
            self.hour.absorb(&done);
            self.minutes.push_back(done);
            while self.minutes.len() > MINUTES_KEPT {
                self.minutes.pop_front();
            }
        }
        let recent = pool.take_recent();
        self.current.pool.merge(&recent);
        for e in pool.snapshot().entries() {
            let i = e.health.take_interval();
            if i.is_empty() {
                continue;
            }
            add_upstream(
                &mut self.current.upstreams,
                &UpstreamMinute {
                    id: e.id,
                    successes: u32::try_from(i.successes).unwrap_or(u32::MAX),
                    failures: u32::try_from(i.failures).unwrap_or(u32::MAX),
                    response_ms_sum: i.response_ms_sum,
                },
            );
        }
    }

    /// The window `span` back from now, the current minute included.
    pub fn report(&self, span: Span, pool: &PoolReader) -> Report {
        self.report_at(span, pool, unix_ms())
    }

    /// [`StatsBook::report`] at `now_unix_ms`.
    #[doc(hidden)]
    pub fn report_at(&self, span: Span, pool: &PoolReader, now_unix_ms: u64) -> Report {
        let mut from = now_unix_ms.saturating_sub(span.minutes() * MINUTE_MS);
        let mut total = Window::default();
        let mut per: HashMap<UpstreamId, UpstreamMinute> = HashMap::new();
        let open = |o: &Open, total: &mut Window, per: &mut HashMap<_, _>| {
            total.merge(&o.pool);
            for u in o.upstreams.values() {
                add_upstream(per, u);
            }
        };
        match span {
            Span::Day => {
                // Whole hours: from the top of the hour that holds the window's first minute.
                let first = from - from % HOUR_MS;
                for h in self.hours.iter().filter(|h| h.start_unix_ms >= first) {
                    h.add_to(&mut total, &mut per);
                    from = from.min(h.start_unix_ms);
                }
                open(&self.hour, &mut total, &mut per);
            }
            Span::FiveMinutes | Span::Hour => {
                for m in self.minutes.iter().filter(|m| m.start_unix_ms >= from) {
                    m.add_to(&mut total, &mut per);
                }
            }
        }
        open(&self.current, &mut total, &mut per);
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
