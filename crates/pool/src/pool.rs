//! [`Pool`]: the shared pool, read through [`PoolReader`] and changed through [`PoolWriter`].
//!
//! `select` loads the current [`Snapshot`] (lock-free), skips excluded upstreams (already tried
//! for this request) and upstreams in backoff, and picks by the current [`Strategy`]. When
//! every candidate is in backoff it falls back to the one whose backoff ends first ("panic
//! mode", as Envoy calls it): a pool that looks all-dead is still tried rather than failing
//! outright, and the fallback is counted. It returns a [`Lease`] that must report the attempt.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use proxygate_core::{Outcome, Upstream, UpstreamId};

use crate::strategy::{PickCtx, pick};
use crate::{Entry, HealthConfig, Snapshot, Strategy};

/// The pool, shared by its reader and writer handles.
#[derive(Debug)]
pub struct Pool {
    snapshot: ArcSwap<Snapshot>,
    strategy: AtomicU8,
    cursor: AtomicUsize,
    panic_selections: AtomicU64,
    epoch: Instant,
    health: HealthConfig,
}

/// The hot-path handle: select upstreams, read the snapshot.
#[derive(Debug, Clone)]
pub struct PoolReader(Arc<Pool>);

/// The control handle: replace upstreams, switch strategy.
#[derive(Debug, Clone)]
pub struct PoolWriter(Arc<Pool>);

/// One upstream handed out for one attempt. Report the outcome with [`Lease::report`];
/// a lease dropped unreported counts as nothing (the attempt was abandoned by us).
#[derive(Debug)]
pub struct Lease {
    entry: Arc<Entry>,
    pool: Arc<Pool>,
    panic_mode: bool,
}

impl Pool {
    /// An empty pool with the given strategy and health policy.
    pub fn create(strategy: Strategy, health: HealthConfig) -> (PoolReader, PoolWriter) {
        let pool = Arc::new(Pool {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            strategy: AtomicU8::new(strategy.code()),
            cursor: AtomicUsize::new(0),
            panic_selections: AtomicU64::new(0),
            epoch: Instant::now(),
            health,
        });
        (PoolReader(Arc::clone(&pool)), PoolWriter(pool))
    }

    fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }
}

impl PoolReader {
    /// The current snapshot.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.0.snapshot.load()
    }

    pub fn strategy(&self) -> Strategy {
        Strategy::from_code(self.0.strategy.load(Ordering::Relaxed))
    }

    /// How often selection fell back to an upstream in backoff because no other was left.
    pub fn panic_selections(&self) -> u64 {
        self.0.panic_selections.load(Ordering::Relaxed)
    }

    /// A lease on one upstream by id, if it is in the pool and not in backoff: to keep
    /// using an upstream already chosen (a kept-alive connection, a sticky session).
    pub fn lease(&self, id: UpstreamId) -> Option<Lease> {
        let pool = &self.0;
        let now_ms = pool.millis(Instant::now());
        let snap = pool.snapshot.load();
        let entry = snap.get(id).filter(|e| e.health.is_selectable(now_ms))?;
        entry.health.acquire(now_ms);
        Some(Lease {
            entry: Arc::clone(entry),
            pool: Arc::clone(pool),
            panic_mode: false,
        })
    }

    /// Picks an upstream not in `exclude`, or `None` when every upstream is excluded (or the
    /// pool is empty).
    pub fn select(&self, exclude: &[UpstreamId]) -> Option<Lease> {
        self.select_at(exclude, Instant::now())
    }

    /// [`PoolReader::select`] at a given time.
    pub fn select_at(&self, exclude: &[UpstreamId], now: Instant) -> Option<Lease> {
        let pool = &self.0;
        let snap = pool.snapshot.load();
        let entries = snap.entries();
        let now_ms = pool.millis(now);
        let ctx = PickCtx {
            exclude,
            now_ms,
            cursor: &pool.cursor,
        };
        let (entry, panic_mode) = match pick(self.strategy(), &snap, &ctx) {
            Some(e) => (e, false),
            None => {
                let e = least_bad(entries, exclude)?;
                pool.panic_selections.fetch_add(1, Ordering::Relaxed);
                (e, true)
            }
        };
        entry.health.acquire(now_ms);
        Some(Lease {
            entry: Arc::clone(entry),
            pool: Arc::clone(pool),
            panic_mode,
        })
    }
}

/// Panic mode: the non-excluded entry whose backoff ends first (the better reputation among
/// equals).
fn least_bad<'a>(entries: &'a [Arc<Entry>], exclude: &[UpstreamId]) -> Option<&'a Arc<Entry>> {
    entries
        .iter()
        .filter(|e| !exclude.contains(&e.id))
        .min_by_key(|e| {
            (
                e.health.backoff_until_ms(),
                std::cmp::Reverse(e.health.reputation()),
            )
        })
}

impl PoolWriter {
    /// Replaces the set of upstreams; upstreams that stay keep their health.
    pub fn replace(&self, upstreams: impl IntoIterator<Item = Upstream>) {
        let previous = self.0.snapshot.load();
        let next = Snapshot::build(upstreams, &previous);
        self.0.snapshot.store(Arc::new(next));
    }

    /// Recomputes the snapshot's orders (by reputation, by response time) from live stats.
    /// The app calls this every `pool.reindex_interval`.
    pub fn reindex(&self) {
        let next = self.0.snapshot.load().reindexed();
        self.0.snapshot.store(Arc::new(next));
    }

    pub fn health_config(&self) -> &HealthConfig {
        &self.0.health
    }

    /// Switches the strategy; selections already made are unaffected.
    pub fn set_strategy(&self, strategy: Strategy) {
        self.0.strategy.store(strategy.code(), Ordering::Relaxed);
    }

    pub fn reader(&self) -> PoolReader {
        PoolReader(Arc::clone(&self.0))
    }
}

impl Lease {
    pub fn id(&self) -> UpstreamId {
        self.entry.id
    }

    pub fn upstream(&self) -> &Upstream {
        &self.entry.upstream
    }

    /// Whether this upstream was picked although in backoff (no better one was left).
    pub fn is_panic_mode(&self) -> bool {
        self.panic_mode
    }

    /// Reports the attempt's outcome.
    pub fn report(self, outcome: &Outcome) {
        self.report_at(outcome, Instant::now());
    }

    /// [`Lease::report`] at a given time.
    pub fn report_at(self, outcome: &Outcome, now: Instant) {
        let now_ms = self.pool.millis(now);
        self.entry
            .health
            .record(outcome, now_ms, &self.pool.health, fastrand::f64());
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.entry.health.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxygate_core::ErrorKind;
    use std::collections::HashMap;
    use std::time::Duration;

    /// One failure deactivates (to keep the tests short).
    fn strict() -> HealthConfig {
        HealthConfig {
            max_consecutive_failures: 1,
            backoff_base: Duration::from_secs(2),
            ..HealthConfig::default()
        }
    }

    fn pool_with(n: usize, strategy: Strategy) -> (PoolReader, PoolWriter) {
        let (r, w) = Pool::create(strategy, strict());
        w.replace((0..n).map(|i| {
            Upstream::parse(&format!(
                "http://10.{}.{}.{}:8080",
                i >> 16,
                (i >> 8) & 255,
                i & 255
            ))
            .unwrap()
        }));
        (r, w)
    }

    fn pool_of(n: usize) -> (PoolReader, PoolWriter) {
        pool_with(n, Strategy::RoundRobin)
    }

    fn ids(r: &PoolReader) -> Vec<UpstreamId> {
        r.snapshot().entries().iter().map(|e| e.id).collect()
    }

    fn ok(ms: u64) -> Outcome {
        Outcome {
            connect: Some(Duration::from_millis(ms)),
            handshake: Some(Duration::ZERO),
            ..Outcome::default()
        }
    }

    /// Gives upstream `id` one success with response time `ms` (rep 95 at 100 ms, 88 at
    /// 1250 ms, 65 over 2000 ms).
    fn succeed(r: &PoolReader, id: UpstreamId, ms: u64) {
        r.lease(id).unwrap().report(&ok(ms));
    }

    fn counts(r: &PoolReader, picks: usize) -> HashMap<UpstreamId, usize> {
        let mut c = HashMap::new();
        for _ in 0..picks {
            let lease = r.select(&[]).unwrap();
            *c.entry(lease.id()).or_default() += 1;
        }
        c
    }

    #[test]
    fn round_robin_is_even() {
        let (r, _w) = pool_of(5);
        let c = counts(&r, 1000);
        assert_eq!(c.len(), 5);
        assert!(c.values().all(|n| *n == 200), "{c:?}");
    }

    #[test]
    fn least_recently_used_picks_the_oldest() {
        let (r, _w) = pool_with(10, Strategy::LeastRecentlyUsed);
        let t0 = Instant::now();
        let mut order = Vec::new();
        for i in 0..30u64 {
            let lease = r.select_at(&[], t0 + Duration::from_millis(i + 1)).unwrap();
            order.push(lease.id());
        }
        let first: std::collections::HashSet<_> = order[..10].iter().collect();
        assert_eq!(first.len(), 10, "every upstream once before any twice");
        for i in 10..30 {
            assert_eq!(
                order[i],
                order[i - 10],
                "pick {i} is not the least recently used"
            );
        }
    }

    fn tiers(r: &PoolReader) -> Vec<(UpstreamId, u64)> {
        let ids = ids(r);
        ids.iter()
            .enumerate()
            .map(|(i, id)| {
                let ms = [100, 1250, 3000][i % 3];
                succeed(r, *id, ms);
                (*id, ms)
            })
            .collect()
    }

    #[test]
    fn weighted_random_follows_reputation() {
        let (r, _w) = pool_with(3, Strategy::WeightedRandom);
        let tiers = tiers(&r);
        let reps: Vec<u8> = r
            .snapshot()
            .entries()
            .iter()
            .map(|e| e.health.reputation())
            .collect();
        assert_eq!(reps, [95, 88, 65]);
        let n = 30_000;
        let c = counts(&r, n);
        let total: f64 = reps.iter().map(|x| f64::from(*x)).sum();
        for ((id, _), rep) in tiers.iter().zip(&reps) {
            let want = f64::from(*rep) / total;
            let got = c[id] as f64 / n as f64;
            assert!(
                (got - want).abs() < 0.02,
                "share {got:.3}, expected {want:.3}"
            );
        }
    }

    #[test]
    fn weighted_random_by_rejection_in_large_pools() {
        let (r, _w) = pool_with(3000, Strategy::WeightedRandom);
        let tiers = tiers(&r);
        let n = 60_000;
        let c = counts(&r, n);
        let mut by_tier = [0usize; 3];
        for (i, (id, _)) in tiers.iter().enumerate() {
            by_tier[i % 3] += c.get(id).copied().unwrap_or(0);
        }
        for (i, rep) in [95.0, 88.0, 65.0].iter().enumerate() {
            let want = rep / 248.0;
            let got = by_tier[i] as f64 / n as f64;
            assert!((got - want).abs() < 0.02, "tier {i}: {got:.3} vs {want:.3}");
        }
    }

    #[test]
    fn best_reputation_and_fastest_pick_the_top() {
        for n in [3, 300] {
            let (r, w) = pool_with(n, Strategy::BestReputation);
            let tiers = tiers(&r);
            // Make one upstream the single best and fastest.
            let top = tiers[n - 1].0;
            for _ in 0..20 {
                succeed(&r, top, 10);
            }
            w.reindex();
            for _ in 0..200 {
                assert_eq!(
                    r.select(&[]).unwrap().id(),
                    top,
                    "best_reputation, pool {n}"
                );
            }
            w.set_strategy(Strategy::FastestResponse);
            for _ in 0..200 {
                assert_eq!(
                    r.select(&[]).unwrap().id(),
                    top,
                    "fastest_response, pool {n}"
                );
            }
            // The top one excluded: the next best.
            let next = r.select(&[top]).unwrap().id();
            let entry = r
                .snapshot()
                .get(next)
                .unwrap()
                .health
                .response_time_ms()
                .unwrap();
            assert!((entry - 100.0).abs() < 1.0, "next fastest has {entry} ms");
        }
    }

    #[test]
    fn random_spreads() {
        let (r, _w) = pool_with(10, Strategy::Random);
        let c = counts(&r, 10_000);
        assert_eq!(c.len(), 10);
        assert!(c.values().all(|n| *n < 2000 && *n > 500), "{c:?}");
    }

    #[test]
    fn every_strategy_skips_excluded_and_dead() {
        for strategy in Strategy::ALL {
            for n in [5, 200] {
                let (r, _w) = pool_with(n, strategy);
                let all = ids(&r);
                let t0 = Instant::now();
                let dead = all[0];
                r.lease(dead)
                    .unwrap()
                    .report_at(&Outcome::failed(ErrorKind::UpstreamConnectRefused), t0);
                for _ in 0..50 {
                    let lease = r.select_at(&all[1..2], t0).unwrap();
                    assert!(lease.id() != dead && lease.id() != all[1], "{strategy}");
                    assert!(!lease.is_panic_mode());
                }
                assert!(r.select_at(&all, t0).is_none(), "{strategy}");
            }
        }
    }

    #[test]
    fn probation_allows_one_request_in_flight() {
        let (r, _w) = pool_of(1);
        let a = r.select(&[]).unwrap();
        // The only upstream is new (on probation) and busy: panic mode still hands it out.
        let b = r.select(&[]).unwrap();
        assert!(b.is_panic_mode());
        a.report(&ok(100));
        drop(b);
        let c = r.select(&[]).unwrap();
        let d = r.select(&[]).unwrap();
        assert!(
            !c.is_panic_mode() && !d.is_panic_mode(),
            "a success ends probation"
        );
    }

    #[test]
    fn failed_upstream_is_skipped_until_backoff_ends() {
        let (r, _w) = pool_of(2);
        let t0 = Instant::now();
        let bad = r.select_at(&[], t0).unwrap();
        let bad_id = bad.id();
        bad.report_at(&Outcome::failed(ErrorKind::UpstreamConnectRefused), t0);
        for _ in 0..10 {
            assert_ne!(r.select_at(&[], t0).unwrap().id(), bad_id);
        }
        let later = t0 + Duration::from_secs(3);
        let seen: Vec<_> = (0..4)
            .map(|_| r.select_at(&[], later).unwrap().id())
            .collect();
        assert!(seen.contains(&bad_id));
    }

    #[test]
    fn panic_mode_picks_least_bad() {
        let (r, _w) = pool_of(2);
        let t0 = Instant::now();
        let fail = Outcome::failed(ErrorKind::UpstreamConnectTimeout);
        for id in ids(&r) {
            r.lease(id).unwrap().report_at(&fail, t0);
        }
        let least = r
            .snapshot()
            .entries()
            .iter()
            .min_by_key(|e| e.health.backoff_until_ms())
            .unwrap()
            .id;
        let lease = r.select_at(&[], t0).unwrap();
        assert!(lease.is_panic_mode());
        assert_eq!(lease.id(), least);
        assert_eq!(r.panic_selections(), 1);
    }

    #[test]
    fn skips_excluded_and_returns_none_when_all_are() {
        let (r, _w) = pool_of(3);
        let ids = ids(&r);
        for _ in 0..10 {
            let lease = r.select(&ids[..2]).unwrap();
            assert_eq!(lease.id(), ids[2]);
        }
        assert!(r.select(&ids).is_none());
        let (empty, _w) = pool_of(0);
        assert!(empty.select(&[]).is_none());
    }

    #[test]
    fn lease_by_id_respects_backoff_and_removal() {
        let (r, w) = pool_of(2);
        let id = ids(&r)[0];
        let lease = r.lease(id).unwrap();
        lease.report(&Outcome::failed(ErrorKind::UpstreamIo));
        assert!(r.lease(id).is_none());
        w.replace([Upstream::parse("http://10.9.9.9:1").unwrap()]);
        assert!(r.lease(id).is_none());
    }

    #[test]
    fn strategy_switches_live() {
        let (r, w) = pool_of(3);
        assert_eq!(r.strategy(), Strategy::RoundRobin);
        for s in Strategy::ALL {
            w.set_strategy(s);
            assert_eq!(r.strategy(), s);
            assert!(r.select(&[]).is_some());
        }
    }

    #[test]
    fn in_flight_counts_leases() {
        let (r, _w) = pool_of(1);
        let a = r.select(&[]).unwrap();
        let b = r.select(&[]).unwrap();
        assert_eq!(r.snapshot().entries()[0].health.in_flight(), 2);
        drop(a);
        b.report(&Outcome::default());
        assert_eq!(r.snapshot().entries()[0].health.in_flight(), 0);
    }
}
