//! [`Strategy`]: how an upstream is picked, a closed set chosen by name, and the pick
//! algorithms. Every pick skips upstreams that are not selectable (in backoff, or on
//! probation with a request in flight) and upstreams already tried for this request.
//!
//! Cost per pick stays flat as the pool grows:
//! - `round_robin`: one atomic increment, then a forward scan past unavailable upstreams; a
//!   retry (some upstreams already tried) is drawn by reputation instead, so it does not walk
//!   into the failed upstream's neighbours (`least_recently_used` retries the same way).
//! - `random`: uniform probes.
//! - `weighted_random` (the default): rejection sampling, a uniform probe accepted with
//!   probability reputation/100, which picks exactly in proportion to reputation in O(1)
//!   expected probes (100 / mean reputation); small pools are drawn exactly over a prefix sum.
//! - `least_recently_used`: exact for pools of up to [`EXACT_MAX`] upstreams; beyond, the least
//!   recently used of [`LRU_SAMPLE`] uniform probes (an approximation that needs no lock or
//!   global order).
//! - `best_reputation`, `fastest_response` (response time / success rate): exact scans for
//!   small pools; beyond, a walk of the
//!   snapshot's order by reputation / by response time, which the pool's reindexer refreshes
//!   (every `pool.reindex_interval`) from live stats.
//!
//! When every probe misses, a bounded fallback scan from a random start finds any selectable
//! upstream, so a sparse pool is never mistaken for an empty one. A route that filters on
//! country, scheme or minimum reputation picks from the snapshot's precomputed list for it
//! (the smallest when several), so a filter that matches few upstreams of a large pool stays
//! cheap.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use proxygate_core::{Route, UpstreamId};
use serde::Deserialize;

use crate::{Entry, Snapshot};

/// Pools up to this size are picked from exactly, by a full scan.
pub const EXACT_MAX: usize = 64;
/// Probes of the approximate least-recently-used pick.
pub const LRU_SAMPLE: usize = 8;
/// Uniform probes before the fallback scan.
const MAX_PROBES: usize = 256;

/// A selection strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    RoundRobin,
    LeastRecentlyUsed,
    /// Weight = reputation.
    #[default]
    WeightedRandom,
    BestReputation,
    FastestResponse,
    Random,
}

/// A strategy name that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown strategy {0:?} (expected one of: round_robin, least_recently_used, \
     weighted_random, best_reputation, fastest_response, random)"
)]
pub struct UnknownStrategy(pub String);

impl Strategy {
    pub const ALL: [Strategy; 6] = [
        Strategy::RoundRobin,
        Strategy::LeastRecentlyUsed,
        Strategy::WeightedRandom,
        Strategy::BestReputation,
        Strategy::FastestResponse,
        Strategy::Random,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::LeastRecentlyUsed => "least_recently_used",
            Strategy::WeightedRandom => "weighted_random",
            Strategy::BestReputation => "best_reputation",
            Strategy::FastestResponse => "fastest_response",
            Strategy::Random => "random",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            Strategy::RoundRobin => 0,
            Strategy::LeastRecentlyUsed => 1,
            Strategy::WeightedRandom => 2,
            Strategy::BestReputation => 3,
            Strategy::FastestResponse => 4,
            Strategy::Random => 5,
        }
    }

    pub(crate) fn from_code(code: u8) -> Strategy {
        Strategy::ALL
            .get(usize::from(code))
            .copied()
            .unwrap_or_default()
    }
}

impl FromStr for Strategy {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStrategy(s.to_owned()))
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a pick needs besides the snapshot.
pub(crate) struct PickCtx<'a> {
    pub(crate) exclude: &'a [UpstreamId],
    pub(crate) route: &'a Route,
    pub(crate) now_ms: u64,
    pub(crate) cursor: &'a AtomicUsize,
}

impl PickCtx<'_> {
    fn ok(&self, e: &Entry) -> bool {
        e.health.is_selectable(self.now_ms)
            && !self.exclude.contains(&e.id)
            && crate::pool::fits(self.route, e)
    }
}

/// The entries a pick chooses from: all of them, or a precomputed subset (by country or
/// scheme) when the route filters on one.
#[derive(Clone, Copy)]
struct View<'a> {
    entries: &'a [Arc<Entry>],
    subset: Option<&'a [u32]>,
}

impl<'a> View<'a> {
    fn len(&self) -> usize {
        self.subset.map_or(self.entries.len(), <[u32]>::len)
    }

    fn get(&self, i: usize) -> &'a Arc<Entry> {
        match self.subset {
            Some(s) => &self.entries[s[i] as usize],
            None => &self.entries[i],
        }
    }

    fn iter(self) -> impl Iterator<Item = &'a Arc<Entry>> {
        (0..self.len()).map(move |i| self.get(i))
    }
}

/// The strategy's pick, or `None` when no upstream is selectable.
pub(crate) fn pick<'a>(
    strategy: Strategy,
    snap: &'a Snapshot,
    ctx: &PickCtx<'_>,
) -> Option<&'a Arc<Entry>> {
    let view = View {
        entries: snap.entries(),
        subset: snap.candidates(ctx.route),
    };
    let n = view.len();
    if n == 0 {
        return None;
    }
    let found = match strategy {
        // A retry of the cyclic strategies is drawn by reputation rather than taken in turn:
        // neighbours in the cycle tend to fail together (same provider, same subnet; or all
        // just back from backoff), and a run of them would eat the whole attempt budget.
        Strategy::RoundRobin | Strategy::LeastRecentlyUsed if !ctx.exclude.is_empty() => {
            weighted(view, ctx)
        }
        Strategy::RoundRobin => {
            let start = ctx.cursor.fetch_add(1, Ordering::Relaxed);
            return (0..n)
                .map(|i| view.get(start.wrapping_add(i) % n))
                .find(|e| ctx.ok(e));
        }
        Strategy::Random => probe(view, ctx, |_| true),
        Strategy::WeightedRandom => weighted(view, ctx),
        Strategy::LeastRecentlyUsed if n <= EXACT_MAX => view
            .iter()
            .filter(|e| ctx.ok(e))
            .min_by_key(|e| e.health.lru_ms()),
        Strategy::LeastRecentlyUsed => {
            let mut best: Option<&Arc<Entry>> = None;
            let mut seen = 0;
            for _ in 0..MAX_PROBES {
                let e = view.get(fastrand::usize(0..n));
                if !ctx.ok(e) {
                    continue;
                }
                if best.is_none_or(|b| e.health.lru_ms() < b.health.lru_ms()) {
                    best = Some(e);
                }
                seen += 1;
                if seen == LRU_SAMPLE {
                    break;
                }
            }
            best
        }
        Strategy::BestReputation if n <= EXACT_MAX => view
            .iter()
            .filter(|e| ctx.ok(e))
            .max_by_key(|e| e.health.reputation()),
        Strategy::BestReputation => walk(snap.by_reputation(), snap.entries(), ctx),
        Strategy::FastestResponse if n <= EXACT_MAX => view
            .iter()
            .filter(|e| ctx.ok(e))
            .min_by(|a, b| latency_key(a).total_cmp(&latency_key(b))),
        Strategy::FastestResponse => walk(snap.by_latency(), snap.entries(), ctx),
    };
    found.or_else(|| fallback(view, ctx))
}

/// The fastest_response order: response time divided by success rate, the expected time to
/// a successful connection, so a fast upstream that fails half the time does not outrank a
/// slightly slower one that always works. Unmeasured upstreams sort last.
pub(crate) fn latency_key(e: &Entry) -> f64 {
    let rt = e.health.response_time_ms().unwrap_or(f64::INFINITY);
    let success = e.health.success_rate().unwrap_or(1.0).max(0.05);
    rt / success
}

/// A draw in proportion to reputation: exact over small views, rejection sampling beyond.
fn weighted<'a>(view: View<'a>, ctx: &PickCtx<'_>) -> Option<&'a Arc<Entry>> {
    if view.len() <= EXACT_MAX {
        weighted_exact(view, ctx)
    } else {
        probe(view, ctx, |e| fastrand::u8(0..100) < e.health.reputation())
    }
}

/// Uniform probes; the first selectable one that `accept` takes.
fn probe<'a>(
    view: View<'a>,
    ctx: &PickCtx<'_>,
    mut accept: impl FnMut(&Entry) -> bool,
) -> Option<&'a Arc<Entry>> {
    let n = view.len();
    (0..MAX_PROBES)
        .map(|_| view.get(fastrand::usize(0..n)))
        .find(|e| ctx.ok(e) && accept(e))
}

/// Exact weighted draw over a small pool. Reputation 0 still gets weight 1 among the
/// selectable, so a pool of all-zero upstreams is not treated as empty.
fn weighted_exact<'a>(view: View<'a>, ctx: &PickCtx<'_>) -> Option<&'a Arc<Entry>> {
    let weight = |e: &Entry| u32::from(e.health.reputation()).max(1);
    let total: u32 = view.iter().filter(|e| ctx.ok(e)).map(|e| weight(e)).sum();
    if total == 0 {
        return None;
    }
    let mut x = fastrand::u32(0..total);
    for e in view.iter().filter(|e| ctx.ok(e)) {
        let w = weight(e);
        if x < w {
            return Some(e);
        }
        x -= w;
    }
    None
}

/// The first selectable entry in a precomputed order.
fn walk<'a>(order: &[u32], entries: &'a [Arc<Entry>], ctx: &PickCtx<'_>) -> Option<&'a Arc<Entry>> {
    order
        .iter()
        .filter_map(|i| entries.get(*i as usize))
        .find(|e| ctx.ok(e))
}

/// Any selectable entry, scanning from a random start.
fn fallback<'a>(view: View<'a>, ctx: &PickCtx<'_>) -> Option<&'a Arc<Entry>> {
    let n = view.len();
    let start = fastrand::usize(0..n);
    (0..n)
        .map(|i| view.get((start + i) % n))
        .find(|e| ctx.ok(e))
}
