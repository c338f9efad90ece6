//! [`Pool`]: the shared pool, read through [`PoolReader`] and changed through [`PoolWriter`].
//!
//! `select` loads the current [`Snapshot`] (lock-free), skips excluded upstreams (already tried
//! for this request) and upstreams in backoff, and picks by the current [`Strategy`]. When
//! every candidate is in backoff it falls back to the one whose backoff ends first ("panic
//! mode", as Envoy calls it): a pool that looks all-dead is still tried rather than failing
//! outright, and the fallback is counted. It returns a [`Lease`] that must report the attempt.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use proxygate_core::{Outcome, Route, Upstream, UpstreamId};

use crate::health::Counted;
use crate::identity::{Identity, NewSessionExit};
use crate::latency::Window;
use crate::sessions::Sessions;
use crate::sites::{Blocked, SiteBook};
use crate::snapshot::{Counter, LEASE_SHARDS, Shard, Shared, shard_index};
use crate::strategy::{PickCtx, pick};
use crate::{Entry, HealthConfig, Snapshot, Strategy};

/// The default sticky-session TTL: 10 minutes.
pub const DEFAULT_SESSION_TTL_MS: u64 = 600_000;

/// The pool, shared by its reader and writer handles.
#[derive(Debug)]
pub struct Pool {
    snapshot: ArcSwap<Snapshot>,
    strategy: AtomicU8,
    /// Round-robin cursors, one per lease shard (so per thread, mostly): threads do not
    /// contend on one counter, nor lease neighbouring upstreams at the same moment.
    cursors: Box<[Counter]>,
    panic_selections: AtomicU64,
    sessions: Sessions,
    session_ttl_ms: AtomicU64,
    /// [`NewSessionExit`], as its code.
    new_session_exit: AtomicU8,
    shared: Arc<Shared>,
    /// Per-(upstream, site) failures.
    sites: SiteBook,
    /// Held while a new snapshot is built from the current one and published, so two writers
    /// (a replace and the reindexer) never publish over each other's work.
    writing: Mutex<()>,
}

/// The hot-path handle: select upstreams, read the snapshot.
#[derive(Debug, Clone)]
pub struct PoolReader(Arc<Pool>);

/// The control handle: replace upstreams, switch strategy.
#[derive(Debug, Clone)]
pub struct PoolWriter(Arc<Pool>);

/// One upstream handed out for one attempt. Report the outcome with [`Lease::report`];
/// a lease dropped unreported counts as nothing (the attempt was abandoned by us).
///
/// It holds the snapshot's members through the picking thread's shard (see
/// [`crate::snapshot`]) and the upstream's slot in the hot table, so taking one touches only
/// that slot; the entry is read when the upstream is dialed or reported.
pub struct Lease {
    entry_ref: EntryRef,
    slot: u32,
    panic_mode: bool,
}

/// How a lease reaches its upstream's entry, and keeps it alive.
enum EntryRef {
    /// The members of the snapshot it was picked from (through a per-thread shard handle):
    /// taking it touches nothing of the entry.
    Members(Arc<Shard>),
    /// The entry alone (after [`Lease::detach`]).
    Entry(Arc<Entry>),
}

impl Pool {
    /// An empty pool with the given strategy and health policy.
    pub fn create(strategy: Strategy, health: HealthConfig) -> (PoolReader, PoolWriter) {
        let pool = Arc::new(Pool {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            strategy: AtomicU8::new(strategy.code()),
            cursors: (0..LEASE_SHARDS).map(|_| Counter::default()).collect(),
            panic_selections: AtomicU64::new(0),
            sessions: Sessions::default(),
            session_ttl_ms: AtomicU64::new(DEFAULT_SESSION_TTL_MS),
            new_session_exit: AtomicU8::new(NewSessionExit::default().code()),
            shared: Arc::new(Shared::new(health)),
            sites: SiteBook::default(),
            writing: Mutex::new(()),
        });
        (PoolReader(Arc::clone(&pool)), PoolWriter(pool))
    }

    fn millis(&self, now: Instant) -> u64 {
        self.shared.millis(now)
    }

    /// Builds the next snapshot from the current one with `f` and publishes it.
    fn publish(&self, f: impl FnOnce(&Snapshot) -> Option<Snapshot>) {
        // Nothing the lock guards can be left half-done by a panic: it guards no data.
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.snapshot.load();
        if let Some(next) = f(&current) {
            self.snapshot.store(Arc::new(next));
        }
    }
}

impl PoolReader {
    /// Records what an attempt through `id` showed of a target site (see [`crate::sites`]):
    /// that the site turned it away (`failed`), or that it works there. The site is worked
    /// out only when it matters: a success is only noted while some failure is kept, so while
    /// the book is empty that costs one relaxed load.
    pub fn site_outcome(
        &self,
        id: UpstreamId,
        failed: bool,
        site: impl FnOnce() -> String,
        now: Instant,
    ) {
        let sites = &self.0.sites;
        if failed {
            sites.failed(id, &site(), self.0.millis(now));
        } else if !sites.is_empty() {
            sites.worked(id, &site(), self.0.millis(now));
        }
    }

    /// Whether selection should avoid `id` for `site` now.
    pub fn site_blocked(&self, id: UpstreamId, site: &str, now: Instant) -> bool {
        self.0
            .sites
            .is_blocked(id, site, self.0.millis(now), &self.0.shared.health.sites)
    }

    /// The sites where `id` is blocked now.
    pub fn blocked_sites(&self, id: UpstreamId, now: Instant) -> Vec<Blocked> {
        self.0
            .sites
            .blocked_sites(id, self.0.millis(now), &self.0.shared.health.sites)
    }

    /// (Upstream, site) entries kept now.
    pub fn site_entries(&self) -> usize {
        self.0.sites.len()
    }

    /// Forgets per-site outcomes that no longer matter (run now and then).
    pub fn sweep_sites(&self, now: Instant) {
        self.0
            .sites
            .sweep(self.0.millis(now), &self.0.shared.health.sites);
    }

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
        self.lease_fitting(id, &Route::default())
    }

    /// [`PoolReader::lease`], when the upstream also fits `route` (a client connection
    /// keeping its upstream while its routing may have changed).
    pub fn lease_fitting(&self, id: UpstreamId, route: &Route) -> Option<Lease> {
        let pool = &self.0;
        let now_ms = pool.millis(Instant::now());
        let snap = pool.snapshot.load();
        let slot = leasable(&snap, id, route, now_ms)?;
        Some(Lease::take(&snap, slot, now_ms, false))
    }

    /// Picks an upstream not in `exclude`, or `None` when every upstream is excluded (or the
    /// pool is empty).
    pub fn select(&self, exclude: &[UpstreamId]) -> Option<Lease> {
        self.select_at(exclude, Instant::now())
    }

    /// [`PoolReader::select`] at a given time.
    pub fn select_at(&self, exclude: &[UpstreamId], now: Instant) -> Option<Lease> {
        self.select_with(&Route::default(), None, exclude, now, true, None)
    }

    /// Picks an upstream that satisfies the route's filters (country, type, minimum
    /// reputation, tier) and is not in `exclude`, with `strategy` or else the pool's.
    ///
    /// With a session key (`client NUL id`, see [`crate::sessions`]): the session's pinned
    /// upstream is kept while it is selectable and fits; when it is not, another member of its
    /// exit group (the same exit IP) takes over before any other upstream. A new session
    /// avoids the exit of its client's previous one as `pool.new_session_exit` says. The pick
    /// is pinned for the route's TTL or the pool's session TTL. `None` when no upstream fits.
    pub fn select_route(
        &self,
        route: &Route,
        session_key: Option<&str>,
        strategy: Option<Strategy>,
        exclude: &[UpstreamId],
    ) -> Option<Lease> {
        let now = Instant::now();
        let Some(key) = session_key else {
            return self.select_with(route, strategy, exclude, now, true, None);
        };
        let pool = &self.0;
        let now_ms = pool.millis(now);
        let pinned = pool.sessions.get(key, now_ms);
        let snap = pool.snapshot.load();
        if let Some((id, group)) = pinned {
            if !exclude.contains(&id)
                && let Some(slot) = leasable(&snap, id, route, now_ms)
            {
                return Some(Lease::take(&snap, slot, now_ms, false));
            }
            // The same exit through another member of its group keeps the session's address.
            let same_exit = snap.exits().members_of(group).iter().find_map(|pos| {
                let e = snap.entries().get(*pos as usize)?;
                if exclude.contains(&e.id) || e.exit_group() != group {
                    return None;
                }
                leasable(&snap, e.id, route, now_ms)
            });
            if let Some(slot) = same_exit {
                let lease = Lease::take(&snap, slot, now_ms, false);
                self.pin(key, &lease, route, now_ms);
                return Some(lease);
            }
        }
        // A new session avoids its client's previous exit; a session that lost its exit
        // takes whatever is left. A pin serves for its whole TTL: never an exploratory pick.
        let policy = self.new_session_exit();
        let avoid = match (pinned, policy) {
            (None, NewSessionExit::Different | NewSessionExit::PreferDifferent) => pool
                .sessions
                .last_exit(crate::sessions::client_of(key), now_ms),
            _ => None,
        };
        let lease = match self.select_with(route, strategy, exclude, now, false, avoid) {
            Some(l) => l,
            None if avoid.is_some() && policy == NewSessionExit::PreferDifferent => {
                self.select_with(route, strategy, exclude, now, false, None)?
            }
            None => return None,
        };
        self.pin(key, &lease, route, now_ms);
        Some(lease)
    }

    fn pin(&self, key: &str, lease: &Lease, route: &Route, now_ms: u64) {
        let pool = &self.0;
        let ttl = route.ttl.map_or_else(
            || pool.session_ttl_ms.load(Ordering::Relaxed),
            crate::millis,
        );
        pool.sessions.pin(
            key,
            lease.id(),
            lease.entry().exit_group(),
            now_ms.saturating_add(ttl),
            now_ms,
        );
    }

    /// What a new session may get (`pool.new_session_exit`).
    pub fn new_session_exit(&self) -> NewSessionExit {
        NewSessionExit::from_code(self.0.new_session_exit.load(Ordering::Relaxed))
    }

    /// Records a check of upstream `id`, made through itself outside any lease (the checker),
    /// as an attempt: it moves the same reputation, ends a backoff when it passes. Returns
    /// whether `id` is in the pool. Checks are not counted as traffic in [`Self::take_recent`].
    pub fn report_check(&self, id: UpstreamId, outcome: &Outcome) -> bool {
        let snap = self.0.snapshot.load();
        let Some(entry) = snap.get(id) else {
            return false;
        };
        let shared = &entry.shared;
        let now_ms = shared.millis(Instant::now());
        entry
            .health
            .record(outcome, now_ms, &shared.health, fastrand::f64());
        true
    }

    /// What every attempt did since the last call: counts and response times (the control
    /// plane's windows are built from these).
    pub fn take_recent(&self) -> Window {
        self.0.shared.recent.take()
    }

    /// Live sticky sessions.
    pub fn sessions(&self) -> usize {
        self.0.sessions.len()
    }

    fn select_with(
        &self,
        route: &Route,
        strategy: Option<Strategy>,
        exclude: &[UpstreamId],
        now: Instant,
        may_remeasure: bool,
        avoid_exit: Option<u64>,
    ) -> Option<Lease> {
        let pool = &self.0;
        let snap = pool.snapshot.load();
        let now_ms = pool.millis(now);
        let ctx = PickCtx {
            exclude,
            avoid_exit,
            route,
            now_ms,
            cursors: &pool.cursors,
            cfg: &pool.shared.health,
            // Only a first attempt that serves one request goes exploring: never a retry.
            may_remeasure: may_remeasure && exclude.is_empty(),
        };
        let strategy = strategy.unwrap_or_else(|| self.strategy());
        let (slot, panic_mode) = match pick(strategy, &snap, &ctx) {
            Some(s) => (s, false),
            None => {
                let pos = least_bad(snap.entries(), exclude, route, avoid_exit)?;
                pool.panic_selections.fetch_add(1, Ordering::Relaxed);
                (snap.members().slot_of(pos), true)
            }
        };
        Some(Lease::take(&snap, slot, now_ms, panic_mode))
    }
}

/// The hot-table slot of upstream `id` if it is in `snap`, selectable at `now_ms` and fits
/// `route`: an upstream chosen earlier (a kept-alive connection, a sticky session).
fn leasable(snap: &Snapshot, id: UpstreamId, route: &Route, now_ms: u64) -> Option<u32> {
    let members = snap.members();
    let pos = snap.position(id)?;
    let slot = members.slot_of(pos);
    (members.hot(slot).is_selectable(now_ms) && members.entry_at(pos).fits(route)).then_some(slot)
}

/// Panic mode: the position of the non-excluded entry whose backoff ends first (the better
/// reputation among equals).
fn least_bad(
    entries: &[Arc<Entry>],
    exclude: &[UpstreamId],
    route: &Route,
    avoid_exit: Option<u64>,
) -> Option<usize> {
    entries
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            !exclude.contains(&e.id)
                && e.fits(route)
                && avoid_exit.is_none_or(|g| e.exit_group() != g)
        })
        .min_by_key(|(_, e)| {
            (
                e.health.backoff_until_ms(),
                std::cmp::Reverse(e.health.reputation()),
            )
        })
        .map(|(i, _)| i)
}

impl PoolWriter {
    /// Replaces the set of upstreams; upstreams that stay keep their health.
    pub fn replace(&self, upstreams: impl IntoIterator<Item = impl Into<Arc<Upstream>>>) {
        let shared = &self.0.shared;
        self.0
            .publish(|previous| Some(Snapshot::build(upstreams, previous, shared)));
    }

    /// [`PoolWriter::replace`], where upstreams new to the pool start from saved stats, and
    /// each takes the identity given (exit IP, tier).
    pub fn replace_saved<U: Into<Arc<Upstream>>>(
        &self,
        upstreams: impl IntoIterator<Item = (U, Option<crate::health::Saved>, Identity)>,
    ) {
        let shared = &self.0.shared;
        self.0
            .publish(|previous| Some(Snapshot::build_saved(upstreams, previous, shared)));
    }

    /// Recomputes the snapshot's orders (by reputation, by response time) and its list of
    /// upstreams due for re-measuring from live stats. The app calls this every
    /// `pool.reindex_interval`.
    pub fn reindex(&self) {
        self.reindex_at(Instant::now());
    }

    /// [`PoolWriter::reindex`] as of `now`.
    pub fn reindex_at(&self, now: Instant) {
        let pool = &self.0;
        let now_ms = pool.millis(now);
        pool.publish(|current| {
            // Small pools are picked from by exact scans; their orders are never read.
            (current.len() > crate::snapshot::EXACT_MAX)
                .then(|| current.reindexed(&pool.shared.health, now_ms))
        });
    }

    /// How long a sticky session keeps its upstream unless the client's `ttl` hint says.
    pub fn set_session_ttl(&self, ttl: Duration) {
        self.0
            .session_ttl_ms
            .store(crate::millis(ttl), Ordering::Relaxed);
    }

    /// What a new session may get (`pool.new_session_exit`).
    pub fn set_new_session_exit(&self, policy: NewSessionExit) {
        self.0
            .new_session_exit
            .store(policy.code(), Ordering::Relaxed);
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
    /// Acquires the member of `snap` in slot `slot` (one more in flight, used now).
    fn take(snap: &Snapshot, slot: u32, now_ms: u64, panic_mode: bool) -> Lease {
        snap.members().hot(slot).acquire(now_ms);
        Lease {
            entry_ref: EntryRef::Members(Arc::clone(snap.shard())),
            slot,
            panic_mode,
        }
    }

    fn entry(&self) -> &Arc<Entry> {
        match &self.entry_ref {
            EntryRef::Members(shard) => match shard.members.entry(self.slot) {
                Some(e) => e,
                // Every pick checks membership of the snapshot whose members the lease holds.
                None => unreachable!("a lease's slot is a member of its snapshot"),
            },
            EntryRef::Entry(e) => e,
        }
    }

    /// Lets go of the snapshot the lease was picked from, keeping only its upstream. A lease
    /// held for long (a tunnel) should be detached first: until then it keeps that snapshot's
    /// whole membership alive (16 bytes per upstream, and the upstreams a later replace
    /// removed). Detaching reads the entry, which the dial does right after anyway.
    pub fn detach(&mut self) {
        if let EntryRef::Members(_) = self.entry_ref {
            self.entry_ref = EntryRef::Entry(Arc::clone(self.entry()));
        }
    }

    pub fn id(&self) -> UpstreamId {
        self.entry().id
    }

    pub fn upstream(&self) -> &Upstream {
        &self.entry().upstream
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
        let entry = self.entry();
        let shared = &entry.shared;
        let now_ms = shared.millis(now);
        let counted = entry
            .health
            .record(outcome, now_ms, &shared.health, fastrand::f64());
        match counted {
            Counted::Success(ms) => shared.recent.record(shard_index(), ms, true),
            Counted::Failure => shared.recent.record(shard_index(), None, false),
            Counted::Ignored => {}
        }
    }
}

impl std::fmt::Debug for Lease {
    /// The upstream (without its password), not the snapshot the lease keeps alive.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("upstream", &self.upstream().to_string())
            .field("slot", &self.slot)
            .field("panic_mode", &self.panic_mode)
            .finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        match &self.entry_ref {
            EntryRef::Members(shard) => shard.members.hot(self.slot).release(),
            EntryRef::Entry(e) => e.health.hot().release(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::REMEASURE_EVERY;
    use proxygate_core::{ErrorKind, Scheme};
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

    /// Address number `i`: `10.x.y.z`.
    fn ip(i: usize) -> String {
        format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)
    }

    /// Upstream number `i`: `http://10.x.y.z:8080`.
    fn up(i: usize) -> Upstream {
        Upstream::parse(&format!("http://{}:8080", ip(i))).unwrap()
    }

    fn pool_with(n: usize, strategy: Strategy) -> (PoolReader, PoolWriter) {
        let (r, w) = Pool::create(strategy, strict());
        w.replace((0..n).map(up));
        (r, w)
    }

    fn pool_of(n: usize) -> (PoolReader, PoolWriter) {
        pool_with(n, Strategy::RoundRobin)
    }

    #[test]
    fn saved_stats_seed_only_new_upstreams() {
        let (r, w) = pool_of(2);
        let live = r.snapshot().entries()[0].upstream.clone();
        let lease = r.lease(live.id()).unwrap();
        lease.report(&ok(10));
        let saved = crate::Saved {
            success_rate: Some(0.0),
            consecutive_failures: 5,
            failures: 40,
            ..crate::Saved::default()
        };
        let new = Upstream::parse("socks5://10.9.9.9:1080").unwrap();
        w.replace_saved([
            (Arc::clone(&live), Some(saved.clone()), Identity::default()),
            (Arc::new(new.clone()), Some(saved), Identity::default()),
        ]);
        let snap = r.snapshot();
        let h = &snap.get(live.id()).unwrap().health;
        assert_eq!(
            (h.successes(), h.consecutive_failures()),
            (1, 0),
            "live stats kept"
        );
        let h = &snap.get(new.id()).unwrap().health;
        assert_eq!((h.failures(), h.consecutive_failures()), (40, 5));
        assert!(h.reputation() < 30 && !h.is_healthy(&strict()));
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

    /// Every pick of `strategy` leases a member of the current snapshot, and the lease's
    /// upstream is the one its id names.
    fn picks_stay_in(r: &PoolReader, want: &std::collections::HashSet<UpstreamId>) {
        for _ in 0..5000 {
            let lease = r.select(&[]).unwrap();
            assert!(
                want.contains(&lease.id()),
                "{} is not in the pool",
                lease.upstream()
            );
            assert_eq!(lease.upstream().id(), lease.id());
        }
    }

    /// Probes of the hot table land on free slots and on upstreams that only an older
    /// snapshot (kept alive by a lease) holds; none may be leased. Slots come back for reuse
    /// once nothing holds their upstream, and a pool that shrank far below its slot space is
    /// picked from by position.
    #[test]
    fn table_probes_never_lease_what_the_snapshot_does_not_hold() {
        for strategy in [
            Strategy::Random,
            Strategy::WeightedRandom,
            Strategy::LeastRecentlyUsed,
        ] {
            let (r, w) = Pool::create(strategy, HealthConfig::default());
            w.replace((0..1000).map(up));
            let held = r.select(&[]).unwrap();
            let held_id = held.id();
            let mut detached = r.select(&[]).unwrap();
            detached.detach();
            let detached_id = detached.id();
            // Keep 500 (not the leased one), add 500 new: the 500 removed keep their slots
            // while the lease holds the old snapshot, so the table has 1,500 slots, 1,000
            // of them members.
            let next: Vec<Upstream> = (0..1000)
                .filter(|i| i % 2 == 0 && up(*i).id() != held_id)
                .chain(2000..2500)
                .map(up)
                .collect();
            w.replace(next.clone());
            let want: std::collections::HashSet<UpstreamId> =
                next.iter().map(Upstream::id).collect();
            picks_stay_in(&r, &want);
            assert_eq!(
                held.upstream().id(),
                held_id,
                "the old lease still reads its entry"
            );
            drop(held);
            // The detached lease keeps only its own upstream (if that was removed).
            let kept = usize::from(!want.contains(&detached_id));
            assert_eq!(
                r.0.shared.slab.in_use(),
                next.len() + kept,
                "removed slots are free"
            );
            assert_eq!(detached.upstream().id(), detached_id);
            detached.report(&ok(5));
            assert_eq!(r.0.shared.slab.in_use(), next.len());
            // New upstreams reuse the freed slots.
            let more: Vec<Upstream> = next.iter().cloned().chain((3000..3200).map(up)).collect();
            w.replace(more.clone());
            assert_eq!(r.0.shared.slab.in_use(), more.len());
            picks_stay_in(&r, &more.iter().map(Upstream::id).collect());
            // Shrunk to 100: far fewer members than slots.
            w.replace(more[..100].to_vec());
            picks_stay_in(&r, &more[..100].iter().map(Upstream::id).collect());
        }
    }

    /// Pickers on two threads while a writer keeps replacing half the pool: every lease is
    /// of an upstream that was in the pool, reads back its own entry, and reports.
    #[test]
    fn picks_race_replaces_safely() {
        let (r, w) = Pool::create(Strategy::Random, HealthConfig::default());
        let set = |k: usize| -> Vec<Upstream> {
            (0..400)
                .map(|i| up(if i % 2 == 0 { i } else { i + 1000 * k }))
                .collect()
        };
        w.replace(set(0));
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    let mut leases = Vec::new();
                    while !done.load(Ordering::Relaxed) {
                        let lease = r.select(&[]).unwrap();
                        assert_eq!(lease.upstream().id(), lease.id());
                        // Some leases outlive a few replaces.
                        leases.push(lease);
                        if leases.len() > 8 {
                            leases.remove(0).report(&ok(10));
                        }
                    }
                });
            }
            // The pickers stop even when a replace panics: the test fails instead of hanging.
            struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
            impl Drop for Stop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Relaxed);
                }
            }
            let _stop = Stop(&done);
            for k in 1..200 {
                w.replace(set(k % 7));
                if k % 10 == 0 {
                    w.reindex();
                }
            }
        });
        assert_eq!(
            r.0.shared.slab.in_use(),
            400,
            "every slot of a removed upstream is back"
        );
    }

    /// Beyond exact scans, LRU is the least recently used of a sample: every upstream is
    /// still used within a few rounds of the pool, and picks come from the oldest few
    /// percent (uniform random picks would leave ~5% unused after 3 rounds and average the
    /// 50th percentile).
    #[test]
    fn sampled_lru_in_a_large_pool_picks_old_upstreams() {
        let n = 4096;
        let (r, _w) = pool_with(n, Strategy::LeastRecentlyUsed);
        let t0 = Instant::now();
        let mut last: HashMap<UpstreamId, i64> = ids(&r).into_iter().map(|id| (id, -1)).collect();
        let mut ranks = 0.0;
        let picks = 3 * n;
        for i in 0..picks {
            let lease = r
                .select_at(&[], t0 + Duration::from_millis(i as u64 + 1))
                .unwrap();
            let mine = last[&lease.id()];
            let older = last.values().filter(|t| **t < mine).count();
            ranks += older as f64 / n as f64;
            last.insert(lease.id(), i as i64);
        }
        let unused = last.values().filter(|t| **t < 0).count();
        assert_eq!(
            unused, 0,
            "{unused} upstreams never picked in {picks} picks"
        );
        let mean = ranks / picks as f64;
        assert!(
            mean < 0.2,
            "picks average the {:.0}th percentile of age",
            mean * 100.0
        );
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

    /// A pool of `n` upstreams under `strategy` with the default health policy (failures
    /// deactivate only after 3 in a row), in the three response-time tiers of [`tiers`].
    fn default_pool(n: usize, strategy: Strategy) -> (PoolReader, PoolWriter, Vec<UpstreamId>) {
        tiered_pool(n, strategy, HealthConfig::default())
    }

    fn tiered_pool(
        n: usize,
        strategy: Strategy,
        health: HealthConfig,
    ) -> (PoolReader, PoolWriter, Vec<UpstreamId>) {
        let (r, w) = Pool::create(strategy, health);
        w.replace((0..n).map(up));
        let ids = tiers(&r).into_iter().map(|(id, _)| id).collect();
        (r, w, ids)
    }

    /// Makes `id` a 5 ms upstream that fails every other attempt (success rate ~0.5).
    fn fail_every_other(r: &PoolReader, id: UpstreamId) {
        for _ in 0..30 {
            r.lease(id)
                .unwrap()
                .report(&Outcome::failed(ErrorKind::UpstreamConnectRefused));
            succeed(r, id, 5);
        }
    }

    #[test]
    fn weighted_random_discounts_upstreams_that_fail_every_other_attempt() {
        for n in [3, 300] {
            let (r, _w, ids) = default_pool(n, Strategy::WeightedRandom);
            let flaky = ids[0];
            fail_every_other(&r, flaky);
            let snap = r.snapshot();
            let h = &snap.get(flaky).unwrap().health;
            // The reputation operators see stays the documented formula's...
            let rep = h.reputation();
            assert!((60..=80).contains(&rep), "reputation {rep}");
            // ...but the draw weighs what a failed attempt costs.
            let weight = h.selection_weight();
            assert!((1..=8).contains(&weight), "weight {weight}");
            let picks = 60_000;
            let c = counts(&r, picks);
            let share = c.get(&flaky).copied().unwrap_or(0) as f64 / picks as f64;
            let total: f64 = snap
                .entries()
                .iter()
                .map(|e| f64::from(e.health.selection_weight().max(1)))
                .sum();
            let want = f64::from(weight) / total;
            assert!(share > 0.0, "pool {n}: the flaky upstream starved");
            assert!(
                (share - want).abs() < 0.01 + want / 2.0,
                "pool {n}: share {share:.4}, weight says {want:.4}"
            );
            // By reputation alone (exponent 0) it would get about rep / sum of reputations.
            let by_rep: f64 = snap
                .entries()
                .iter()
                .map(|e| f64::from(e.health.reputation()))
                .sum();
            assert!(
                share < f64::from(rep) / by_rep / 4.0,
                "pool {n}: {share:.4}"
            );
        }
    }

    #[test]
    fn fastest_response_charges_each_failure() {
        for n in [3, 300] {
            let (r, w, ids) = default_pool(n, Strategy::FastestResponse);
            // A 5 ms upstream that fails every other attempt: twice 5 ms is still far under
            // the 100 ms tier, but each failure costs the client a retry (pool.failure_cost).
            let flaky = ids[1];
            fail_every_other(&r, flaky);
            let h = |id| {
                let snap = r.snapshot();
                let h = &snap.get(id).unwrap().health;
                (h.response_time_ms().unwrap(), h.success_rate().unwrap())
            };
            let (rt, s) = h(flaky);
            assert!(rt < 10.0 && (0.4..0.7).contains(&s), "{rt} ms, {s}");
            w.reindex();
            for _ in 0..200 {
                let id = r.select(&[]).unwrap().id();
                assert_ne!(
                    id, flaky,
                    "pool {n}: the flaky upstream outranked reliable ones"
                );
                assert!(
                    (h(id).0 - 100.0).abs() < 1.0,
                    "pool {n}: not the 100 ms tier"
                );
            }
            // Ranked by response time alone, the flaky one wins.
            let no_cost = HealthConfig {
                failure_cost: Duration::ZERO,
                ..HealthConfig::default()
            };
            let (r, w, ids) = tiered_pool(n, Strategy::FastestResponse, no_cost);
            fail_every_other(&r, ids[1]);
            w.reindex();
            assert_eq!(
                r.select(&[]).unwrap().id(),
                ids[1],
                "pool {n}, failure_cost 0"
            );
        }
    }

    #[test]
    fn greedy_strategies_remeasure_stale_upstreams() {
        for strategy in [Strategy::BestReputation, Strategy::FastestResponse] {
            for n in [3, 300] {
                let (r, w, ids) = default_pool(n, strategy);
                let top = ids[0];
                for _ in 0..20 {
                    succeed(&r, top, 10);
                }
                let t0 = Instant::now();
                w.reindex_at(t0);
                let picks = |at: Instant, exclude: &[UpstreamId], k: usize| {
                    let mut c: HashMap<UpstreamId, usize> = HashMap::new();
                    for _ in 0..k {
                        *c.entry(r.select_at(exclude, at).unwrap().id()).or_default() += 1;
                    }
                    c
                };
                // Everything was just measured: the top one only.
                let c = picks(t0, &[], 320);
                assert_eq!(c.get(&top), Some(&320), "{strategy} pool {n}: {c:?}");
                // A minute later every upstream is due: each gets one request, one pick in
                // REMEASURE_EVERY at most; the rest still go to the top one.
                let t1 = t0 + HealthConfig::default().remeasure_after + Duration::from_secs(1);
                w.reindex_at(t1);
                let k = REMEASURE_EVERY as usize * (n + 10);
                let c = picks(t1, &[], k);
                assert_eq!(c.len(), n, "{strategy} pool {n}: not all re-measured");
                let others: usize = c.iter().filter(|(id, _)| **id != top).map(|(_, k)| k).sum();
                assert!(
                    others <= k / REMEASURE_EVERY as usize + 1,
                    "{strategy} pool {n}: {others} of {k} picks re-measured"
                );
                // Re-measured once, no longer due.
                let c = picks(t1, &[], 320);
                assert_eq!(c.get(&top), Some(&320), "{strategy} pool {n}: {c:?}");
                // A retry never goes exploring.
                let t2 = t1 + HealthConfig::default().remeasure_after + Duration::from_secs(1);
                w.reindex_at(t2);
                let c = picks(t2, &[ids[1]], 320);
                assert_eq!(c.get(&top), Some(&320), "{strategy} pool {n}: {c:?}");
            }
        }
    }

    #[test]
    fn sticky_sessions_are_never_pinned_to_explore() {
        for strategy in [Strategy::BestReputation, Strategy::FastestResponse] {
            for n in [3, 300] {
                let (r, w, ids) = default_pool(n, strategy);
                for _ in 0..20 {
                    succeed(&r, ids[0], 10);
                }
                // Never used, so due for re-measuring.
                w.replace((0..=n).map(up));
                let route = Route::default();
                for i in 0..REMEASURE_EVERY as usize * 4 {
                    let lease = r.select_route(&route, Some(&format!("s{i}")), None, &[]);
                    assert_eq!(lease.unwrap().id(), ids[0], "{strategy} pool {n}, pin {i}");
                }
            }
        }
    }

    #[test]
    fn new_upstreams_get_tried_by_the_greedy_strategies() {
        for strategy in [Strategy::BestReputation, Strategy::FastestResponse] {
            for n in [3, 300] {
                let (r, w, ids) = default_pool(n, strategy);
                let added = up(n);
                w.replace((0..=n).map(up));
                let k = REMEASURE_EVERY as usize * 4;
                let tried = (0..k).any(|_| r.select(&[]).unwrap().id() == added.id());
                assert!(tried, "{strategy} pool {n}: a new upstream never tried");
                assert!(!ids.contains(&added.id()));
            }
        }
    }

    #[test]
    fn round_robin_is_even_across_threads() {
        let (r, _w) = pool_of(10);
        // Off probation first: a new upstream with a lease in flight on another thread is
        // rightly skipped, which would shift a cycle by one.
        for id in ids(&r) {
            succeed(&r, id, 10);
        }
        let c: HashMap<UpstreamId, usize> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4).map(|_| s.spawn(|| counts(&r, 1000))).collect();
            let mut total = HashMap::new();
            for t in threads {
                for (id, k) in t.join().unwrap() {
                    *total.entry(id).or_default() += k;
                }
            }
            total
        });
        assert_eq!(c.len(), 10);
        assert!(c.values().all(|k| *k == 400), "{c:?}");
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

    fn with_meta(urls: &[&str]) -> (PoolReader, PoolWriter) {
        let (r, w) = Pool::create(Strategy::WeightedRandom, strict());
        w.replace(urls.iter().map(|u| Upstream::parse(u).unwrap()));
        (r, w)
    }

    #[test]
    fn route_filters_restrict_every_strategy() {
        let (r, w) = with_meta(&[
            "http://10.0.0.1:1?country=us",
            "socks5://10.0.0.2:1?country=us",
            "socks5://10.0.0.3:1?country=de",
            "http://10.0.0.4:1",
        ]);
        for s in Strategy::ALL {
            w.set_strategy(s);
            let route = Route::parse("a-country-us-type-socks5").unwrap().1;
            for _ in 0..20 {
                let l = r.select_route(&route, None, None, &[]).unwrap();
                assert_eq!(l.upstream().host.to_string(), "10.0.0.2", "{s}");
            }
            let none = Route::parse("a-country-fr").unwrap().1;
            assert!(r.select_route(&none, None, None, &[]).is_none(), "{s}");
            let strict = Route::parse("a-minrep-51").unwrap().1;
            assert!(
                r.select_route(&strict, None, None, &[]).is_none(),
                "{s}: all score 50"
            );
        }
    }

    /// 20,000 upstreams, reindexed; of every `every`, one socks5 and one http upstream in
    /// France, the rest http in the US.
    fn french_pool(every: usize) -> (PoolReader, PoolWriter) {
        let (r, w) = Pool::create(Strategy::WeightedRandom, strict());
        w.replace((0..20_000).map(|i| {
            let (scheme, cc) = match i % every {
                0 => ("socks5", "fr"),
                1 => ("http", "fr"),
                _ => ("http", "us"),
            };
            Upstream::parse(&format!("{scheme}://{}:1?country={cc}", ip(i))).unwrap()
        }));
        w.reindex();
        (r, w)
    }

    #[test]
    fn sparse_filters_in_a_large_pool() {
        let (r, w) = french_pool(4000);
        let fr_socks = Route::parse("a-country-fr-type-socks5").unwrap().1;
        let fr = Route::parse("a-country-fr").unwrap().1;
        for s in Strategy::ALL {
            w.set_strategy(s);
            for _ in 0..50 {
                let l = r.select_route(&fr_socks, None, None, &[]).unwrap();
                assert_eq!(l.upstream().scheme, Scheme::Socks5, "{s}");
                assert_eq!(l.upstream().country.as_deref(), Some("FR"), "{s}");
                let l = r.select_route(&fr, None, None, &[]).unwrap();
                assert_eq!(l.upstream().country.as_deref(), Some("FR"), "{s}");
                assert!(!l.is_panic_mode());
            }
        }
    }

    /// A filter list longer than an exact scan: the strategies that walk the pool's global
    /// orders (best reputation, fastest response) and the table probes must still keep to it.
    #[test]
    fn long_filter_lists_hold_for_every_strategy() {
        let (r, w) = french_pool(50);
        let fr = Route::parse("a-country-fr").unwrap().1;
        let socks = Route::parse("a-type-socks5").unwrap().1;
        let fr_http = Route::parse("a-country-fr-type-http").unwrap().1;
        for s in Strategy::ALL {
            w.set_strategy(s);
            for _ in 0..50 {
                let l = r.select_route(&fr, None, None, &[]).unwrap();
                assert_eq!(l.upstream().country.as_deref(), Some("FR"), "{s}");
                let l = r.select_route(&socks, None, None, &[]).unwrap();
                assert_eq!(l.upstream().scheme, Scheme::Socks5, "{s}");
                let l = r.select_route(&fr_http, None, None, &[l.id()]).unwrap();
                assert_eq!(l.upstream().country.as_deref(), Some("FR"), "{s}");
                assert_eq!(l.upstream().scheme, Scheme::Http, "{s}");
            }
        }
    }

    #[test]
    fn sparse_minrep_in_a_large_pool_picks_from_the_reputation_order() {
        let (r, w) = pool_of(20_000);
        let ids = ids(&r);
        // Five upstreams earn a reputation above 80; the rest stay at 50.
        let good: Vec<UpstreamId> = ids.iter().step_by(4000).copied().collect();
        for id in &good {
            for _ in 0..20 {
                r.lease(*id).unwrap().report(&ok(10));
            }
            assert!(r.snapshot().get(*id).unwrap().health.reputation() > 80);
        }
        w.reindex();
        assert_eq!(
            r.snapshot()
                .candidates(&Route::parse("a-minrep-80").unwrap().1)
                .map(|c| c.len()),
            Some(5)
        );
        let route = Route::parse("a-minrep-80").unwrap().1;
        for s in Strategy::ALL {
            w.set_strategy(s);
            for _ in 0..50 {
                let l = r.select_route(&route, None, None, &[]).unwrap();
                assert!(good.contains(&l.id()), "{s}");
            }
        }
        // One that fails since the reindex is skipped by the live checks.
        r.lease(good[0])
            .unwrap()
            .report(&Outcome::failed(ErrorKind::UpstreamConnectRefused));
        for _ in 0..50 {
            let l = r.select_route(&route, None, None, &[]).unwrap();
            assert_ne!(l.id(), good[0]);
        }
        let none = Route::parse("a-minrep-99").unwrap().1;
        assert!(r.select_route(&none, None, None, &[]).is_none());
    }

    #[test]
    fn sessions_stick_and_move_when_their_upstream_dies() {
        let (r, _w) = with_meta(&[
            "http://10.0.0.1:1",
            "http://10.0.0.2:1",
            "http://10.0.0.3:1",
        ]);
        let route = Route::default();
        let first = r.select_route(&route, Some("alice/s1"), None, &[]).unwrap();
        let pinned = first.id();
        first.report(&ok(50));
        for _ in 0..50 {
            let l = r.select_route(&route, Some("alice/s1"), None, &[]).unwrap();
            assert_eq!(l.id(), pinned);
            l.report(&ok(50));
        }
        // Another session spreads independently; the same id under another key is another
        // session.
        let others: std::collections::HashSet<_> = (0..30)
            .map(|i| {
                r.select_route(&route, Some(&format!("s{i}")), None, &[])
                    .unwrap()
                    .id()
            })
            .collect();
        assert!(others.len() > 1);
        // The pinned upstream fails: the session moves, and stays moved.
        r.lease(pinned)
            .unwrap()
            .report(&Outcome::failed(ErrorKind::UpstreamIo));
        let moved = r.select_route(&route, Some("alice/s1"), None, &[]).unwrap();
        assert_ne!(moved.id(), pinned);
        let moved_id = moved.id();
        moved.report(&ok(50));
        for _ in 0..10 {
            assert_eq!(
                r.select_route(&route, Some("alice/s1"), None, &[])
                    .unwrap()
                    .id(),
                moved_id
            );
        }
    }

    #[test]
    fn session_ttl_expires() {
        let (r, w) = with_meta(&["http://10.0.0.1:1", "http://10.0.0.2:1"]);
        w.set_session_ttl(Duration::from_millis(1));
        let route = Route::default();
        r.select_route(&route, Some("k"), None, &[])
            .unwrap()
            .report(&ok(5));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(r.sessions(), 1);
        r.select_route(&route, Some("k"), None, &[]).unwrap();
        // The expired pin was dropped and replaced by a fresh one.
        assert_eq!(r.sessions(), 1);
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

    /// Upstreams `0..n`, exits as given (`None`: unknown), tiers as given.
    fn with_identities(
        strategy: Strategy,
        idents: &[(Option<&str>, proxygate_core::Tier)],
    ) -> (PoolReader, PoolWriter) {
        let (r, w) = Pool::create(strategy, strict());
        w.replace_saved(idents.iter().enumerate().map(|(i, (exit, tier))| {
            let identity = Identity {
                exit: exit.map(|e| e.parse().unwrap()),
                tier: *tier,
            };
            (up(i), None, identity)
        }));
        (r, w)
    }

    #[test]
    fn round_robin_cycles_over_exit_groups() {
        use proxygate_core::Tier::Untrusted as U;
        // Five upstreams on one box (one exit), two alone, one of unknown exit.
        let box1 = Some("203.0.113.1");
        let (r, _w) = with_identities(
            Strategy::RoundRobin,
            &[
                (box1, U),
                (box1, U),
                (Some("203.0.113.2"), U),
                (box1, U),
                (box1, U),
                (Some("203.0.113.3"), U),
                (box1, U),
                (None, U),
            ],
        );
        let c = counts(&r, 4000);
        let boxed: usize = [0, 1, 3, 4, 6].iter().map(|i| c[&up(*i).id()]).sum();
        // Four groups, a quarter each; the box's share spread evenly over its members.
        assert_eq!(boxed, 1000, "{c:?}");
        for i in [2, 5, 7] {
            assert_eq!(c[&up(i).id()], 1000, "{c:?}");
        }
        for i in [0, 1, 3, 4, 6] {
            assert_eq!(c[&up(i).id()], 200, "{c:?}");
        }
        let snap = r.snapshot();
        assert_eq!(snap.exit_group_of(up(3).id()).len(), 5);
        assert_eq!(snap.exit_group_of(up(7).id()), [up(7).id()]);
    }

    #[test]
    fn a_session_keeps_its_exit_through_another_member() {
        use proxygate_core::Tier::Untrusted as U;
        let (r, _w) = with_identities(
            Strategy::WeightedRandom,
            &[
                (Some("203.0.113.1"), U),
                (Some("203.0.113.1"), U),
                (Some("203.0.113.2"), U),
                (Some("203.0.113.3"), U),
            ],
        );
        // Sessions of fresh clients until one lands on the shared exit; its upstream dies,
        // and the session moves to the other member of that exit, never to another exit.
        let route = Route::default();
        for i in 0..200 {
            let key = format!("bob{i}\0s");
            let l = r.select_route(&route, Some(&key), None, &[]).unwrap();
            let exit = r.snapshot().get(l.id()).unwrap().exit();
            if exit != Some("203.0.113.1".parse().unwrap()) {
                l.report(&ok(5));
                continue;
            }
            let id = l.id();
            l.report(&Outcome::failed(ErrorKind::UpstreamIo));
            let next = r.select_route(&route, Some(&key), None, &[]).unwrap();
            assert_ne!(next.id(), id);
            assert_eq!(r.snapshot().get(next.id()).unwrap().exit(), exit);
            return;
        }
        panic!("no session landed on the shared exit");
    }

    #[test]
    fn a_new_session_never_gets_the_exit_its_client_just_had() {
        use proxygate_core::Tier::Untrusted as U;
        // best_reputation would pick one exit every time (they all score alike).
        let (r, w) = with_identities(
            Strategy::BestReputation,
            &[
                (Some("203.0.113.1"), U),
                (Some("203.0.113.1"), U),
                (Some("203.0.113.2"), U),
            ],
        );
        let route = Route::default();
        let exit_of = |l: &Lease| r.snapshot().get(l.id()).unwrap().exit();
        let mut prev = None;
        for i in 0..100 {
            let l = r
                .select_route(&route, Some(&format!("carol\0s{i}")), None, &[])
                .unwrap();
            let exit = exit_of(&l);
            assert_ne!(
                Some(exit),
                prev,
                "session {i} got its client's previous exit"
            );
            prev = Some(exit);
        }
        // Another client is not held to carol's exits.
        let l = r.select_route(&route, Some("dave\0s0"), None, &[]).unwrap();
        drop(l);
        // One exit left: `different` refuses, `prefer_different` and `any` serve it.
        let (r1, w1) = with_identities(Strategy::RoundRobin, &[(Some("203.0.113.9"), U)]);
        assert!(r1.select_route(&route, Some("e\0a"), None, &[]).is_some());
        assert!(r1.select_route(&route, Some("e\0b"), None, &[]).is_none());
        w1.set_new_session_exit(NewSessionExit::PreferDifferent);
        assert!(r1.select_route(&route, Some("e\0c"), None, &[]).is_some());
        w1.set_new_session_exit(NewSessionExit::Any);
        assert!(r1.select_route(&route, Some("e\0d"), None, &[]).is_some());
        // An existing session is never refused its own pin.
        w1.set_new_session_exit(NewSessionExit::Different);
        assert!(r1.select_route(&route, Some("e\0d"), None, &[]).is_some());
        drop(w);
    }

    #[test]
    fn tier_hints_filter_every_strategy() {
        use proxygate_core::Tier::{Operator, Untrusted, Verified};
        let (r, w) = with_identities(
            Strategy::WeightedRandom,
            &[
                (None, Untrusted),
                (None, Verified),
                (None, Operator),
                (None, Untrusted),
            ],
        );
        let verified = Route::parse("a-tier-verified").unwrap().1;
        let operator = Route::parse("a-tier-operator").unwrap().1;
        for s in Strategy::ALL {
            w.set_strategy(s);
            for _ in 0..50 {
                let l = r.select_route(&verified, None, None, &[]).unwrap();
                assert!(l.id() == up(1).id() || l.id() == up(2).id(), "{s}");
                let l = r.select_route(&operator, None, None, &[]).unwrap();
                assert_eq!(l.id(), up(2).id(), "{s}");
            }
        }
        // The tier is updated in place on republish: the entry (and its health) stays.
        let before = Arc::clone(r.snapshot().get(up(0).id()).unwrap());
        w.replace_saved((0..4).map(|i| {
            (
                up(i),
                None,
                Identity {
                    exit: None,
                    tier: Operator,
                },
            )
        }));
        let after = Arc::clone(r.snapshot().get(up(0).id()).unwrap());
        assert!(Arc::ptr_eq(&before, &after));
        assert_eq!(after.tier(), Operator);
    }
}
