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
            strategy: AtomicU8::new(strategy_code(strategy)),
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

fn strategy_code(s: Strategy) -> u8 {
    match s {
        Strategy::RoundRobin => 0,
    }
}

fn strategy_from_code(_code: u8) -> Strategy {
    Strategy::RoundRobin
}

impl PoolReader {
    /// The current snapshot.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.0.snapshot.load()
    }

    pub fn strategy(&self) -> Strategy {
        strategy_from_code(self.0.strategy.load(Ordering::Relaxed))
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
        let entry = snap.get(id).filter(|e| e.health.is_available(now_ms))?;
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
        let (entry, panic_mode) =
            match pick(self.strategy(), entries, &pool.cursor, exclude, now_ms) {
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

/// The strategy's pick among available, non-excluded entries.
fn pick<'a>(
    strategy: Strategy,
    entries: &'a [Arc<Entry>],
    cursor: &AtomicUsize,
    exclude: &[UpstreamId],
    now_ms: u64,
) -> Option<&'a Arc<Entry>> {
    let n = entries.len();
    if n == 0 {
        return None;
    }
    match strategy {
        Strategy::RoundRobin => {
            // One atomic increment per pick; scanning forward past unavailable entries keeps
            // the cost proportional to how many are unavailable, not to the pool size.
            let start = cursor.fetch_add(1, Ordering::Relaxed);
            (0..n)
                .map(|i| &entries[start.wrapping_add(i) % n])
                .find(|e| e.health.is_available(now_ms) && !exclude.contains(&e.id))
        }
    }
}

/// Panic mode: the non-excluded entry whose backoff ends first.
fn least_bad<'a>(entries: &'a [Arc<Entry>], exclude: &[UpstreamId]) -> Option<&'a Arc<Entry>> {
    entries
        .iter()
        .filter(|e| !exclude.contains(&e.id))
        .min_by_key(|e| e.health.backoff_until_ms())
}

impl PoolWriter {
    /// Replaces the set of upstreams; upstreams that stay keep their health.
    pub fn replace(&self, upstreams: impl IntoIterator<Item = Upstream>) {
        let previous = self.0.snapshot.load();
        let next = Snapshot::build(upstreams, &previous);
        self.0.snapshot.store(Arc::new(next));
    }

    /// Switches the strategy; selections already made are unaffected.
    pub fn set_strategy(&self, strategy: Strategy) {
        self.0
            .strategy
            .store(strategy_code(strategy), Ordering::Relaxed);
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
        self.entry.health.record(outcome, now_ms, &self.pool.health);
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

    fn pool_of(n: usize) -> (PoolReader, PoolWriter) {
        let (r, w) = Pool::create(Strategy::RoundRobin, HealthConfig::default());
        w.replace((0..n).map(|i| Upstream::parse(&format!("http://10.0.0.{i}:8080")).unwrap()));
        (r, w)
    }

    #[test]
    fn round_robin_is_even() {
        let (r, _w) = pool_of(5);
        let mut counts: HashMap<UpstreamId, u32> = HashMap::new();
        for _ in 0..1000 {
            let lease = r.select(&[]).unwrap();
            *counts.entry(lease.id()).or_default() += 1;
        }
        assert_eq!(counts.len(), 5);
        assert!(counts.values().all(|c| *c == 200), "{counts:?}");
    }

    #[test]
    fn skips_excluded_and_returns_none_when_all_are() {
        let (r, _w) = pool_of(3);
        let ids: Vec<_> = r.snapshot().entries().iter().map(|e| e.id).collect();
        for _ in 0..10 {
            let lease = r.select(&ids[..2]).unwrap();
            assert_eq!(lease.id(), ids[2]);
        }
        assert!(r.select(&ids).is_none());
        let (empty, _w) = pool_of(0);
        assert!(empty.select(&[]).is_none());
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
        let a = r.select_at(&[], t0).unwrap();
        let b = r.select_at(&[], t0).unwrap();
        let (a_id, b_id) = (a.id(), b.id());
        let fail = Outcome::failed(ErrorKind::UpstreamConnectTimeout);
        a.report_at(&fail, t0);
        // b fails twice: a longer backoff, so a is the least bad.
        b.report_at(&fail, t0);
        r.select_at(&[a_id], t0 + Duration::from_secs(3))
            .unwrap()
            .report_at(&fail, t0);
        let lease = r.select_at(&[], t0).unwrap();
        assert!(lease.is_panic_mode());
        assert_eq!(lease.id(), a_id);
        assert_ne!(a_id, b_id);
        assert_eq!(r.panic_selections(), 1);
    }

    #[test]
    fn lease_by_id_respects_backoff_and_removal() {
        let (r, w) = pool_of(2);
        let lease = r.select(&[]).unwrap();
        let id = lease.id();
        assert_eq!(r.lease(id).unwrap().id(), id);
        lease.report(&Outcome::failed(ErrorKind::UpstreamIo));
        assert!(r.lease(id).is_none());
        w.replace([Upstream::parse("http://10.9.9.9:1").unwrap()]);
        assert!(r.lease(id).is_none());
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
