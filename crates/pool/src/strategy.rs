//! [`Strategy`]: how an upstream is picked, a closed set chosen by name, and the pick
//! algorithms. Every pick skips upstreams that are not selectable (in backoff, or on
//! probation with a request in flight) and upstreams already tried for this request.
//!
//! Cost per pick stays flat as the pool grows:
//! - `round_robin`: one increment of this thread's cursor (one per lease shard, its cycle
//!   offset by the shard's share of the list: threads neither contend on one counter nor lease
//!   neighbours at once), then a forward scan past unavailable upstreams; a
//!   retry (some upstreams already tried) is drawn by reputation instead, so it does not walk
//!   into the failed upstream's neighbours (`least_recently_used` retries the same way).
//! - `random`: uniform probes.
//! - `weighted_random` (the default): rejection sampling, a uniform probe accepted with
//!   probability reputation/100, which picks exactly in proportion to reputation in O(1)
//!   expected probes (100 / mean reputation); small pools are drawn exactly over a prefix sum.
//! - `least_recently_used`: exact for pools of up to [`EXACT_MAX`] upstreams; beyond, the least
//!   recently used of a sample of [`LRU_SAMPLE`] (an approximation that needs no lock or
//!   global order; see `lru_sample`).
//! - `best_reputation`, `fastest_response` (expected time to a working connection, see
//!   `Entry::latency_key`): exact scans for small pools; beyond, a walk of the snapshot's order by
//!   reputation / by that key, which the pool's reindexer refreshes (every
//!   `pool.reindex_interval`) from live stats.
//!
//! The greedy two only ever measure the upstream they prefer, so an upstream that had one bad
//! sample (a slow connect while the machine was loaded, one refused connection) would never
//! get the request that shows it recovered, and a new one would never be tried. So one pick in
//! [`REMEASURE_EVERY`] on each thread, a first attempt (never a retry, never the pick that pins
//! a sticky session for its whole TTL), goes to an upstream *due* for re-measuring
//! (`PickState::is_due`: unused for `pool.remeasure_after`, or never used) when there is one:
//! in a small pool the longest idle one; in a large pool the next of the
//! snapshot's due list (each handed out once per reindex, so the cost stays O(1)). That bounds
//! what exploration costs at 1 pick in 16, and each stale upstream gets about one request per
//! `remeasure_after`.
//!
//! When every probe misses, a bounded fallback scan from a random start finds any selectable
//! upstream, so a sparse pool is never mistaken for an empty one. A route that filters on
//! country, scheme or minimum reputation picks from the snapshot's precomputed list for it
//! (the smallest when several), so a filter that matches few upstreams of a large pool stays
//! cheap.
//!
//! Probes read only the pool's hot table (the private `hot` module). Over a pool without a
//! route filter whose members fill at least half of the table, probes draw table slots
//! directly (one cache miss each, no position lookup first) and skip slots that are not this
//! snapshot's members.

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use proxygate_core::{Route, UpstreamId};
use serde::Deserialize;

use crate::hot::PickState;
pub use crate::snapshot::EXACT_MAX;
use crate::snapshot::{CandidateList, Counter, LEASE_SHARDS, Members, shard_index};
use crate::{Entry, HealthConfig, Snapshot};

/// Probes of the approximate least-recently-used pick.
pub const LRU_SAMPLE: usize = 8;
/// Uniform probes before the fallback scan.
const MAX_PROBES: usize = 256;
/// One pick in this many, per thread, the greedy strategies offer to an upstream due for
/// re-measuring.
pub const REMEASURE_EVERY: u32 = 16;
/// Due-list claims a re-measuring pick makes before it gives up on this one.
const DUE_CLAIMS: usize = 2;

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
    /// An exit group not to pick from (a new session's client's previous exit).
    pub(crate) avoid_exit: Option<u64>,
    pub(crate) route: &'a Route,
    pub(crate) now_ms: u64,
    /// Round-robin cursors, one per lease shard.
    pub(crate) cursors: &'a [Counter],
    pub(crate) cfg: &'a HealthConfig,
    /// Whether a greedy strategy may spend this pick re-measuring: a first attempt for one
    /// request (not a retry, not a sticky session's pin).
    pub(crate) may_remeasure: bool,
}

/// A candidate: a slot of the hot table, with the slot at hand, and its position in the
/// snapshot's entries when the [`Choices`] it came from knew it.
#[derive(Clone, Copy)]
pub(crate) struct Candidate<'a> {
    pub(crate) slot: u32,
    pos: Option<u32>,
    hot: &'a PickState,
}

/// What a pick chooses from.
#[derive(Clone, Copy)]
enum Scope<'a> {
    /// Every entry, by position.
    All(usize),
    /// A precomputed subset, by position.
    Positions(&'a [u32]),
    /// A precomputed subset, by slot.
    Slots(&'a [u32]),
    /// The whole slot space `0..n`, members or not: no position lookup per probe. Used when
    /// the members fill at least half of it.
    Table(u32),
}

/// Whether deciding if a candidate fits needs its entry: an exclusion, an exit to avoid, a
/// tier, or a country or scheme filter that the candidate list (if any) does not guarantee.
fn needs_entry(ctx: &PickCtx<'_>, list: Option<CandidateList<'_>>) -> bool {
    let route = ctx.route;
    !ctx.exclude.is_empty()
        || ctx.avoid_exit.is_some()
        || route.tier_filter().is_some()
        || route.country.is_some() && !matches!(list, Some(CandidateList::Country(_)))
        || route.scheme.is_some() && !matches!(list, Some(CandidateList::Scheme(_)))
}

/// What a pick chooses among: the members in its [`Scope`], and the filters each candidate
/// must pass (on the hot slot alone where it can).
#[derive(Clone, Copy)]
struct Choices<'a> {
    members: &'a Members,
    scope: Scope<'a>,
    /// See [`needs_entry`]. A plain pick reads the hot slot alone.
    needs_entry: bool,
    /// The route's minimum reputation (0: none), checked on the hot slot.
    min_reputation: u8,
}

impl<'a> Choices<'a> {
    fn new(snap: &'a Snapshot, ctx: &PickCtx<'_>) -> Choices<'a> {
        let members = snap.members();
        let n = snap.len();
        let route = ctx.route;
        let list = match route.is_unfiltered() {
            true => None,
            false => snap.candidates(route),
        };
        let scope = match list {
            Some(CandidateList::Country(l) | CandidateList::Scheme(l)) => Scope::Slots(l),
            Some(CandidateList::Reputation(l)) => Scope::Positions(l),
            None if n > EXACT_MAX && members.space() as usize <= 2 * n => {
                Scope::Table(members.space())
            }
            None => Scope::All(n),
        };
        Choices {
            members,
            scope,
            needs_entry: needs_entry(ctx, list),
            min_reputation: route.min_reputation.unwrap_or(0),
        }
    }

    /// The same filters over every entry of the snapshot by position: for picks from the
    /// snapshot's own lists (its orders, its due list), which the choices' candidate list does
    /// not restrict, so every route filter is checked on the entry.
    fn whole(&self, ctx: &PickCtx<'_>) -> Choices<'a> {
        Choices {
            scope: Scope::All(self.members.len()),
            needs_entry: needs_entry(ctx, None),
            ..*self
        }
    }

    fn len(&self) -> usize {
        match self.scope {
            Scope::All(n) => n,
            Scope::Positions(l) | Scope::Slots(l) => l.len(),
            Scope::Table(n) => n as usize,
        }
    }

    #[inline]
    fn get(&self, i: usize) -> Candidate<'a> {
        match self.scope {
            Scope::All(_) => self.at(i),
            Scope::Positions(l) => self.at(l[i] as usize),
            Scope::Slots(l) => self.slot(l[i]),
            Scope::Table(_) => self.slot(u32::try_from(i).unwrap_or(u32::MAX)),
        }
    }

    /// Entry `pos` (of the whole snapshot) as a candidate.
    fn at(&self, pos: usize) -> Candidate<'a> {
        let slot = self.members.slot_of(pos);
        Candidate {
            slot,
            pos: u32::try_from(pos).ok(),
            hot: self.members.hot(slot),
        }
    }

    fn slot(&self, slot: u32) -> Candidate<'a> {
        Candidate {
            slot,
            pos: None,
            hot: self.members.hot(slot),
        }
    }

    fn entry(&self, c: Candidate<'_>) -> Option<&'a Arc<Entry>> {
        match c.pos {
            Some(pos) => Some(self.members.entry_at(pos as usize)),
            None => self.members.entry(c.slot),
        }
    }

    /// Whether candidate `c` may be picked: a member, selectable, not excluded, fitting the
    /// route.
    #[inline]
    fn ok(&self, ctx: &PickCtx<'_>, c: Candidate<'_>) -> bool {
        self.holds(c)
            && c.hot.is_selectable(ctx.now_ms)
            && c.hot.reputation() >= self.min_reputation
            && (!self.needs_entry
                || self.entry(c).is_some_and(|e| {
                    !ctx.exclude.contains(&e.id)
                        && e.fits(ctx.route)
                        && ctx.avoid_exit.is_none_or(|g| e.exit_group() != g)
                }))
    }

    /// Whether `c` is one of the snapshot's members: a probe of the slot space may land on a
    /// free slot or on another snapshot's upstream.
    #[inline]
    fn holds(&self, c: Candidate<'_>) -> bool {
        !matches!(self.scope, Scope::Table(_)) || self.members.is_member(c.slot)
    }

    fn iter(self) -> impl Iterator<Item = Candidate<'a>> {
        (0..self.len()).map(move |i| self.get(i))
    }
}

/// The strategy's pick (a slot of the hot table), or `None` when no upstream is selectable.
pub(crate) fn pick(strategy: Strategy, snap: &Snapshot, ctx: &PickCtx<'_>) -> Option<u32> {
    let choices = Choices::new(snap, ctx);
    let n = choices.len();
    if n == 0 {
        return None;
    }
    let greedy = matches!(
        strategy,
        Strategy::BestReputation | Strategy::FastestResponse
    );
    if greedy
        && ctx.may_remeasure
        && remeasure_turn()
        && let Some(c) = remeasure(snap, &choices, ctx)
    {
        return Some(c.slot);
    }
    let found = match strategy {
        // A retry of the cyclic strategies is drawn by reputation rather than taken in turn:
        // neighbours in the cycle tend to fail together (same provider, same subnet; or all
        // just back from backoff), and a run of them would eat the whole attempt budget.
        Strategy::RoundRobin | Strategy::LeastRecentlyUsed if !ctx.exclude.is_empty() => {
            weighted(&choices, ctx)
        }
        Strategy::RoundRobin if snap.exits().is_shared() => round_robin_groups(snap, &choices, ctx),
        Strategy::RoundRobin => {
            // In entry order (not slot order), so the cycle follows the pool's list.
            let choices = match choices.scope {
                Scope::Table(_) => Choices {
                    scope: Scope::All(snap.len()),
                    ..choices
                },
                _ => choices,
            };
            let n = choices.len();
            let start = cursor_turn(ctx, n);
            return (0..n)
                .map(|i| choices.get(start.wrapping_add(i) % n))
                .find(|c| choices.ok(ctx, *c))
                .map(|c| c.slot);
        }
        Strategy::Random => probe(&choices, ctx, |_| true),
        Strategy::WeightedRandom => weighted(&choices, ctx),
        Strategy::LeastRecentlyUsed if n <= EXACT_MAX => choices
            .iter()
            .filter(|c| choices.ok(ctx, *c))
            .min_by_key(|c| c.hot.lru_ms()),
        Strategy::LeastRecentlyUsed => lru_sample(&choices, ctx),
        Strategy::BestReputation if n <= EXACT_MAX => choices
            .iter()
            .filter(|c| choices.ok(ctx, *c))
            .max_by_key(|c| c.hot.reputation()),
        Strategy::BestReputation => walk(snap.by_reputation(), &choices, ctx),
        Strategy::FastestResponse if n <= EXACT_MAX => choices
            .iter()
            .filter(|c| choices.ok(ctx, *c))
            .filter_map(|c| Some((c, choices.entry(c)?.latency_key(ctx.cfg))))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(c, _)| c),
        Strategy::FastestResponse => walk(snap.by_latency(), &choices, ctx),
    };
    found.or_else(|| fallback(&choices, ctx)).map(|c| c.slot)
}

/// Where this round-robin pick starts in a cycle of `n`: this thread's cursor, moved on, its
/// cycle offset by its shard's share of the list, so threads start far apart.
fn cursor_turn(ctx: &PickCtx<'_>, n: usize) -> usize {
    let shard = shard_index();
    ctx.cursors
        .get(shard)
        .map_or(0, |c| c.0.fetch_add(1, Ordering::Relaxed))
        + shard * n / LEASE_SHARDS
}

/// Round robin over exit groups (see [`crate::identity`]): this thread's cursor walks the
/// groups, and a group serves its members in turn, so an exit listed on several ports gets one
/// turn per cycle like any other. Every filter is checked on the entry.
fn round_robin_groups<'a>(
    snap: &'a Snapshot,
    choices: &Choices<'a>,
    ctx: &PickCtx<'_>,
) -> Option<Candidate<'a>> {
    let groups = snap.exits();
    let n = groups.len();
    let whole = choices.whole(ctx);
    let whole = Choices {
        needs_entry: true,
        ..whole
    };
    let start = cursor_turn(ctx, n);
    (0..n).find_map(|i| {
        groups
            .in_turn(start.wrapping_add(i) % n)
            .map(|pos| whole.at(pos as usize))
            .find(|c| whole.ok(ctx, *c))
    })
}

/// Whether this pick is this thread's turn to re-measure (one in [`REMEASURE_EVERY`]). A
/// thread-local count: no line shared between threads.
fn remeasure_turn() -> bool {
    thread_local! {
        static TURN: Cell<u32> = const { Cell::new(0) };
    }
    TURN.with(|t| {
        let n = t.get().wrapping_add(1) % REMEASURE_EVERY;
        t.set(n);
        n == 0
    })
}

/// An upstream due for re-measuring that this pick may take, if any: among few choices the
/// longest idle due one; over a large one, the next of the snapshot's due list (every filter
/// checked on the entry, and due-ness again, since it may have been used since the reindex).
fn remeasure<'a>(
    snap: &'a Snapshot,
    choices: &Choices<'a>,
    ctx: &PickCtx<'_>,
) -> Option<Candidate<'a>> {
    let after = crate::millis(ctx.cfg.remeasure_after);
    if choices.len() <= EXACT_MAX {
        return choices
            .iter()
            .filter(|c| choices.ok(ctx, *c) && c.hot.is_due(ctx.now_ms, after))
            .min_by_key(|c| c.hot.lru_ms());
    }
    let whole = choices.whole(ctx);
    (0..DUE_CLAIMS)
        .map_while(|_| snap.claim_due())
        .map(|pos| whole.at(pos as usize))
        .find(|c| whole.ok(ctx, *c) && c.hot.is_due(ctx.now_ms, after))
}

/// The least recently used of [`LRU_SAMPLE`] selectable upstreams (up to [`MAX_PROBES`]
/// probes). Over the hot table, a round is [`LRU_SAMPLE`] neighbouring slots from a uniform
/// start, every slot read before any is judged, so the cache misses of a large pool overlap
/// (and every upstream is as likely to be in a sample: where an upstream sits in the table
/// says nothing about when it was last used). Over a list (a filtered route, or a pool that
/// shrank far below its table), uniform probes one at a time.
fn lru_sample<'a>(choices: &Choices<'a>, ctx: &PickCtx<'_>) -> Option<Candidate<'a>> {
    let n = choices.len();
    let mut best: Option<(u64, Candidate<'a>)> = None;
    let mut seen = 0;
    let mut consider = |c: Candidate<'a>, key: u64| {
        if best.is_none_or(|(k, _)| key < k) {
            best = Some((key, c));
        }
        seen += 1;
        seen == LRU_SAMPLE
    };
    if let Scope::Table(_) = choices.scope {
        for _ in 0..MAX_PROBES / LRU_SAMPLE {
            let start = fastrand::usize(0..n);
            // A plain loop, not `array::from_fn`: that closure is not always inlined, and
            // eight calls cost LRU a quarter of its time in small pools.
            let mut sample = [choices.get(start); LRU_SAMPLE];
            for (k, c) in sample.iter_mut().enumerate().skip(1) {
                let i = start + k;
                *c = choices.get(if i >= n { i - n } else { i });
            }
            // Every load first, then the decisions.
            let keys = sample.map(|c| c.hot.lru_ms());
            for (c, key) in sample.into_iter().zip(keys) {
                if choices.ok(ctx, c) && consider(c, key) {
                    return best.map(|(_, c)| c);
                }
            }
        }
    } else {
        for _ in 0..MAX_PROBES {
            let c = choices.get(fastrand::usize(0..n));
            if choices.ok(ctx, c) && consider(c, c.hot.lru_ms()) {
                break;
            }
        }
    }
    best.map(|(_, c)| c)
}

/// A draw in proportion to reputation: exact among few choices, rejection sampling beyond.
fn weighted<'a>(choices: &Choices<'a>, ctx: &PickCtx<'_>) -> Option<Candidate<'a>> {
    if choices.len() <= EXACT_MAX {
        weighted_exact(choices, ctx)
    } else {
        probe(choices, ctx, |c| fastrand::u8(0..100) < c.hot.weight())
    }
}

/// Uniform probes; the first selectable one that `accept` takes.
fn probe<'a>(
    choices: &Choices<'a>,
    ctx: &PickCtx<'_>,
    mut accept: impl FnMut(Candidate<'a>) -> bool,
) -> Option<Candidate<'a>> {
    let n = choices.len();
    (0..MAX_PROBES)
        .map(|_| choices.get(fastrand::usize(0..n)))
        .find(|c| choices.ok(ctx, *c) && accept(*c))
}

/// Exact weighted draw over a small pool. Weight 0 still counts as 1 among the selectable, so
/// a pool of all-zero upstreams is not treated as empty.
fn weighted_exact<'a>(choices: &Choices<'a>, ctx: &PickCtx<'_>) -> Option<Candidate<'a>> {
    let weight = |c: Candidate<'_>| u32::from(c.hot.weight()).max(1);
    let total: u32 = choices
        .iter()
        .filter(|c| choices.ok(ctx, *c))
        .map(weight)
        .sum();
    if total == 0 {
        return None;
    }
    let mut x = fastrand::u32(0..total);
    for c in choices.iter().filter(|c| choices.ok(ctx, *c)) {
        let w = weight(c);
        if x < w {
            return Some(c);
        }
        x -= w;
    }
    None
}

/// The first selectable entry in a precomputed order of the whole snapshot, which the choices'
/// candidate list does not restrict: every filter is checked on the entry.
fn walk<'a>(order: &[u32], choices: &Choices<'a>, ctx: &PickCtx<'_>) -> Option<Candidate<'a>> {
    let whole = choices.whole(ctx);
    order
        .iter()
        .map(|pos| whole.at(*pos as usize))
        .find(|c| whole.ok(ctx, *c))
}

/// Any selectable entry, scanning from a random start.
fn fallback<'a>(choices: &Choices<'a>, ctx: &PickCtx<'_>) -> Option<Candidate<'a>> {
    let n = choices.len();
    let start = fastrand::usize(0..n);
    (0..n)
        .map(|i| choices.get((start + i) % n))
        .find(|c| choices.ok(ctx, *c))
}
