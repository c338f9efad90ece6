//! What the control plane's structures hold: live heap bytes, counted by this test binary's
//! allocator (exact, unlike RSS). Each test reads the count of its own thread: sled's threads
//! allocate and free their buffers when they please (a flush under a loaded box's timing moved
//! a whole-process count by 360 KB), and the tests take turns all the same.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use proxygate_admin::catalog::{Catalog, Checked};
use proxygate_admin::stats::{Span, StatsBook, UPSTREAMS_PER_MINUTE};
use proxygate_core::{Outcome, Upstream};
use proxygate_pool::{HealthConfig, Pool, Strategy};
use proxygate_store::{CheckRecord, Store};

struct Counting;

thread_local! {
    /// Bytes allocated less bytes freed by this thread.
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

/// Counts `bytes` (negative: freed) for the calling thread. A thread being torn down has no
/// count left to keep: skipped.
fn count(bytes: isize) {
    let _ = LIVE.try_with(|live| live.set(live.get() + bytes));
}

/// What this thread holds of the heap, as counted since it started.
fn live() -> isize {
    LIVE.with(Cell::get)
}

// SAFETY: every call is passed on to the system allocator unchanged; only a count is kept.
#[expect(
    unsafe_code,
    reason = "a counting allocator: the exact heap a structure holds, which RSS cannot say"
)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One test at a time: each reads the count as its own.
fn alone() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `n` distinct upstreams.
fn upstreams(n: usize) -> Vec<Upstream> {
    (0..n)
        .filter_map(|i| Upstream::parse(&format!("http://10.{}.{}.1:8080", i / 256, i % 256)).ok())
        .collect()
}

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;

/// A book fed 25 hours of minutes, `n` upstreams each with one attempt a minute: the heap it
/// holds then (past what the first minute allocated), and its day and hour windows, which
/// must count exactly the minutes they say they span.
fn a_day(n: usize) -> isize {
    let (pool, writer) = Pool::create(Strategy::RoundRobin, HealthConfig::default());
    let ups = upstreams(n);
    let ids: Vec<_> = ups.iter().map(Upstream::id).collect();
    assert_eq!(ids.len(), n);
    writer.replace(ups);
    let ok = Outcome {
        connect: Some(std::time::Duration::from_millis(20)),
        handshake: Some(std::time::Duration::ZERO),
        ..Outcome::default()
    };
    let t0 = 1_700_000_000_000 - 1_700_000_000_000 % MINUTE_MS;
    let mut book = StatsBook::default();
    // Minute m's attempts are reported before the sample at its start, so they count in it.
    let minute = |book: &mut StatsBook, m: u64| {
        for id in &ids {
            // Always there; were one not, the exact counts below would say so.
            if let Some(lease) = pool.lease(*id) {
                lease.report(&ok);
            }
        }
        book.sample_at(&pool, t0 + m * MINUTE_MS);
    };
    // Every upstream measured once (its histogram allocated) before counting.
    minute(&mut book, 0);
    let before = live();
    let minutes = 25 * 60;
    for m in 1..=minutes {
        minute(&mut book, m);
    }
    let held = live() - before;
    let now = t0 + minutes * MINUTE_MS + 1;
    let n = n as u64;
    let spanned = |from: u64| (1..=minutes).filter(|m| t0 + m * MINUTE_MS >= from).count() as u64;
    let day = book.report_at(Span::Day, &pool, now);
    assert!(day.from_unix_ms <= now - 24 * HOUR_MS && day.from_unix_ms % HOUR_MS == 0);
    assert!(day.from_unix_ms > now - 25 * HOUR_MS);
    assert_eq!(day.attempts, n * spanned(day.from_unix_ms));
    assert_eq!(
        day.active_upstreams as u64,
        n.min(2 * UPSTREAMS_PER_MINUTE as u64)
    );
    assert_eq!(day.response_ms.p50, Some(20));
    let hour = book.report_at(Span::Hour, &pool, now);
    assert_eq!(hour.from_unix_ms, now - HOUR_MS);
    assert_eq!(hour.attempts, n * 60);
    let five = book.report_at(Span::FiveMinutes, &pool, now);
    assert_eq!(five.attempts, n * 5);
    held
}

/// A day of minutes held ~100 MiB with more upstreams busy each minute than a minute keeps,
/// and 8 MiB with three (a dense histogram and a hash map per minute, 1,440 of them).
#[test]
fn a_day_of_minutes_stays_small() {
    let _turn = alone();
    for (n, most) in [(3, 256 << 10), (UPSTREAMS_PER_MINUTE + 100, 4 << 20)] {
        let held = a_day(n);
        eprintln!(
            "a day with {n} upstreams busy: {:.2} MiB held",
            held as f64 / 1048576.0
        );
        assert!(held < most, "{n} upstreams: {held} bytes held");
    }
}

/// What dropping a catalog frees: what it held.
fn held_by(c: Catalog) -> isize {
    let with = live();
    drop(c);
    with - live()
}

/// A catalog that took 20,000 config upstreams at its first start holds no more than one
/// loaded from the same store at a restart. Its record map, filled a key at a time, kept its
/// nodes about two thirds full: 20 % more in all, before it was rebuilt after the batch.
#[test]
fn a_catalog_filled_at_first_start_is_as_small_as_one_loaded() {
    let _turn = alone();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), None).unwrap().0);
    let mut first = Catalog::load(Arc::clone(&store), HealthConfig::default()).unwrap();
    assert_eq!(first.sync_config(&upstreams(20_000)).unwrap(), (20_000, 0));
    let filled = held_by(first);
    let loaded = held_by(Catalog::load(Arc::clone(&store), HealthConfig::default()).unwrap());
    eprintln!("a catalog of 20,000: {filled} bytes filled, {loaded} loaded");
    assert!(loaded > 20_000 * 100, "{loaded}");
    assert!(
        filled <= loaded + loaded / 50,
        "{filled} filled against {loaded} loaded"
    );
}

/// A list pool's catalog: every member has its last check, kept as the store's binary row
/// (~70 bytes) rather than the struct and its strings. 750 bytes per upstream, its record and
/// its check, when the catalog held the structs; 378 as rows.
#[test]
fn a_list_pools_checks_are_kept_compact() {
    let _turn = alone();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), None).unwrap().0);
    let n = 4_000;
    let checked: Vec<Checked> = upstreams(n)
        .into_iter()
        .enumerate()
        .map(|(i, upstream)| Checked {
            upstream,
            integrity_ok: true,
            source: Some("proxyscrape-http".into()),
            listed_anonymity: Some("elite".into()),
            passed: true,
            check: CheckRecord {
                checked_unix_ms: 1_796_000_000_000 + i as u64,
                passed: true,
                anonymity: Some("elite".into()),
                exit_ip: Some(format!("203.0.{}.{}", i / 256, i % 256)),
                latency_ms: Some(400 + i as u64 % 100),
                judge: Some("http://judge.example.net/azenv.php".into()),
                ..CheckRecord::default()
            },
        })
        .collect();
    let mut with = Catalog::load(Arc::clone(&store), HealthConfig::default()).unwrap();
    let merged = with.merge_checked(checked, true).unwrap();
    assert_eq!((merged.imported, merged.checks), (n, n));
    let id = Upstream::parse("http://10.0.7.1:8080").unwrap().id();
    assert_eq!(
        with.check(id).unwrap().exit_ip.as_deref(),
        Some("203.0.0.7")
    );
    let all = held_by(with);
    let per_check = all / n as isize;
    eprintln!("a catalog of {n} checked list upstreams: {all} bytes, {per_check} per upstream");
    assert!(per_check < 520, "{per_check} bytes per checked upstream");
}
