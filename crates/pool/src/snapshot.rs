//! [`Snapshot`]: the immutable set of upstreams that selection reads.
//!
//! Writers build a new snapshot aside and swap it in. An upstream that stays across a swap
//! keeps its [`Health`] (the `Arc<Entry>` is carried over, and with it its slot in the hot
//! table), so replacing the list never forgets what was learned about a proxy.
//!
//! A pick reads only the hot table (through `Members::hot`) and hands out a [`Lease`]
//! that keeps the snapshot's members alive through one of a few `Shard` handles (the one of
//! the picking thread), so no reference count shared by every thread, and none inside the
//! chosen entry, is touched per pick.
//!
//! [`Lease`]: crate::Lease

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use proxygate_core::{Route, Scheme, Tier, Upstream, UpstreamId};

use crate::health::Saved;
use crate::hot::{self, Directory, PickState, Slab};
use crate::identity::{ExitGroups, Identity, IdentityCell};
use crate::{Health, HealthConfig};

/// Pools up to this size are picked from exactly, by a full scan: their orders by reputation
/// and by latency are never read, so the reindexer does not refresh them.
pub const EXACT_MAX: usize = 64;

/// One upstream and its live health.
#[derive(Debug)]
pub struct Entry {
    pub health: Health,
    pub id: UpstreamId,
    /// Shared with the catalog's record of it.
    pub upstream: Arc<Upstream>,
    /// Its exit IP and trust tier, as last published.
    pub(crate) identity: IdentityCell,
    /// The pool's clock and policy, so a lease needs nothing but its entry (no shared
    /// reference count touched per pick).
    pub(crate) shared: Arc<Shared>,
}

impl Entry {
    /// Whether an upstream satisfies a route's filters.
    pub(crate) fn fits(&self, route: &Route) -> bool {
        route.tier_filter().is_none_or(|t| self.tier() >= t)
            && route.scheme.is_none_or(|s| s == self.upstream.scheme)
            && route
                .country
                .as_deref()
                .is_none_or(|c| self.upstream.country.as_deref() == Some(c))
            && route
                .min_reputation
                .is_none_or(|m| self.health.reputation() >= m)
    }

    /// The fastest_response order: the expected time to a working connection, in ms. Attempts
    /// succeed with probability `s` (the success rate), so `(1 - s) / s` of them fail before one
    /// works, and each failure costs `pool.failure_cost` (a retry the client waits for, and one
    /// attempt of its budget); the one that works costs the response time:
    /// `rt + (1 - s) / s * failure_cost`. A fast upstream that fails half the time therefore
    /// ranks a whole failure cost behind one that always works, not merely twice its own response
    /// time. Unmeasured upstreams sort last (re-measuring gets them tried).
    pub(crate) fn latency_key(&self, cfg: &HealthConfig) -> f64 {
        let Some(rt) = self.health.response_time_ms() else {
            return f64::INFINITY;
        };
        let success = self.health.success_rate().unwrap_or(1.0).clamp(0.01, 1.0);
        rt + (1.0 - success) / success * cfg.failure_cost.as_secs_f64() * 1000.0
    }

    /// Its trust tier.
    pub fn tier(&self) -> Tier {
        self.identity.tier()
    }

    /// The exit IP the checker's judge saw, when known.
    pub fn exit(&self) -> Option<std::net::IpAddr> {
        self.identity.exit()
    }

    /// Its exit group's key ([`crate::identity::group_key`]).
    pub fn exit_group(&self) -> u64 {
        self.identity.group()
    }

    /// How long ago this upstream was last handed out, if ever (in this process).
    pub fn since_last_use(&self, now: Instant) -> Option<std::time::Duration> {
        let last = self.health.last_used_ms();
        (last > 0).then(|| self.since(last, now))
    }

    /// The time from `ms` (on the pool's clock) to `now`.
    fn since(&self, ms: u64, now: Instant) -> std::time::Duration {
        std::time::Duration::from_millis(self.shared.millis(now).saturating_sub(ms))
    }

    /// How much of its backoff this upstream has left at `now`, if it is in one.
    pub fn backoff_left(&self, now: Instant) -> Option<std::time::Duration> {
        let until = self.health.backoff_until_ms();
        let now_ms = self.shared.millis(now);
        (until > now_ms).then(|| std::time::Duration::from_millis(until - now_ms))
    }

    /// Where this upstream stands at `now`.
    pub fn state(&self, now: Instant) -> crate::State {
        self.health
            .state(self.shared.millis(now), &self.shared.health)
    }

    /// The health policy of the pool this entry belongs to.
    pub fn health_config(&self) -> &HealthConfig {
        &self.shared.health
    }

    /// How long ago this upstream was last re-checked (see [`Health::last_check_ms`]).
    pub fn since_last_check(&self, now: Instant) -> Option<std::time::Duration> {
        self.health.last_check_ms().map(|ms| self.since(ms, now))
    }
}

/// What every entry of a pool shares.
#[derive(Debug)]
pub struct Shared {
    pub(crate) epoch: Instant,
    pub(crate) health: HealthConfig,
    /// Every attempt since the control plane last took them.
    pub(crate) recent: crate::latency::Recent,
    /// The hot table every entry of the pool has its slot in.
    pub(crate) slab: Arc<Slab>,
}

impl Shared {
    pub fn new(health: HealthConfig) -> Self {
        Self {
            epoch: Instant::now(),
            health,
            recent: crate::latency::Recent::new(LEASE_SHARDS),
            slab: Arc::new(Slab::default()),
        }
    }

    /// Milliseconds since the pool's epoch.
    pub(crate) fn millis(&self, now: Instant) -> u64 {
        crate::millis(now.saturating_duration_since(self.epoch))
    }
}

/// The upstreams of a snapshot, and where their hot slots are. Reindexed snapshots share it.
#[derive(Debug, Default)]
pub(crate) struct Members {
    entries: Vec<Arc<Entry>>,
    /// Each entry's slot in the hot table, in entry order.
    slots: Vec<u32>,
    /// The hot table's chunks when these members were gathered (covers every slot above).
    dir: Directory,
    /// The slot space when these members were gathered: slots `0..space` (members, free
    /// slots and slots of upstreams of other snapshots).
    space: u32,
    /// Slot to position in `entries` (`u32::MAX`: not a member), over the slot space.
    positions: Vec<u32>,
}

impl Members {
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn entry_at(&self, pos: usize) -> &Arc<Entry> {
        &self.entries[pos]
    }

    /// Entry `pos`'s slot.
    pub(crate) fn slot_of(&self, pos: usize) -> u32 {
        self.slots[pos]
    }

    /// The hot part of the health of the upstream in slot `slot` (any slot in the slot
    /// space), without touching its entry.
    pub(crate) fn hot(&self, slot: u32) -> &PickState {
        hot::slot(&self.dir, slot)
    }

    /// The extent of the slot space.
    pub(crate) fn space(&self) -> u32 {
        self.space
    }

    /// The position of the upstream in slot `slot`, if it is one of these members.
    fn position_of(&self, slot: u32) -> Option<usize> {
        let pos = *self.positions.get(slot as usize)?;
        (pos != u32::MAX).then_some(pos as usize)
    }

    /// The entry in slot `slot`, if it is a member.
    pub(crate) fn entry(&self, slot: u32) -> Option<&Arc<Entry>> {
        self.position_of(slot).map(|pos| &self.entries[pos])
    }

    /// Whether the upstream in slot `slot` is one of these members. When the members fill
    /// the whole slot space (a pool without churn: no free slots, no upstream that only an
    /// older snapshot holds), every slot in it is one, and the slot-to-position table (another
    /// cache miss per probe of a large pool) is not read.
    #[inline]
    pub(crate) fn is_member(&self, slot: u32) -> bool {
        if self.entries.len() == self.space as usize {
            return slot < self.space;
        }
        self.position_of(slot).is_some()
    }
}

/// Handles a snapshot's members are leased through: threads lease through different ones, so
/// no single reference count is shared by all (also the round-robin cursors, one per handle).
pub(crate) const LEASE_SHARDS: usize = 16;

/// A handle on a snapshot's members that a lease holds. Aligned so each shard's reference
/// count has a cache line to itself.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Shard {
    pub(crate) members: Arc<Members>,
}

/// The shard this thread leases (and keeps its round-robin cursor) through.
pub(crate) fn shard_index() -> usize {
    use std::cell::Cell;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SHARD.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT.fetch_add(1, Ordering::Relaxed) % LEASE_SHARDS);
        }
        s.get()
    })
}

/// A counter on a cache line of its own (two, for the adjacent-line prefetcher): whoever
/// writes it does not slow down readers of its neighbours.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Counter(pub(crate) AtomicUsize);

/// An immutable view of the pool.
#[derive(Debug, Default)]
pub struct Snapshot {
    members: Arc<Members>,
    shards: Arc<[Arc<Shard>]>,
    by_id: Arc<HashMap<UpstreamId, usize>>,
    /// Indexes into `entries`, best reputation first (as of the last reindex).
    by_reputation: Vec<u32>,
    /// The reputations `by_reputation` was sorted by, in its order: where a `minrep` prefix
    /// ends.
    reputation_sorted: Vec<u8>,
    /// Indexes into `entries`, fastest response first, unmeasured last.
    by_latency: Vec<u32>,
    /// Indexes into `entries` of the upstreams due for re-measuring at the last reindex
    /// ([`PickState::is_due`]), the longest idle first, and how far the greedy
    /// strategies' re-measuring picks have claimed them: each is offered once per reindex.
    due: Vec<u32>,
    due_claimed: Counter,
    /// Indexes into `entries` by country and by scheme, for filtered picks. They depend only
    /// on the upstreams, so reindexed snapshots share them.
    meta: Arc<MetaIndex>,
    /// The members' exit groups (shared by reindexed snapshots).
    exits: Arc<ExitGroups>,
}

/// Upstreams by metadata, as hot-table slots (a probe reads the slot without a position
/// lookup first).
#[derive(Debug, Default)]
pub(crate) struct MetaIndex {
    by_country: HashMap<String, Vec<u32>>,
    by_scheme: HashMap<Scheme, Vec<u32>>,
}

impl MetaIndex {
    fn build(members: &Members) -> MetaIndex {
        let mut m = MetaIndex::default();
        for (e, slot) in members.entries.iter().zip(&members.slots) {
            if let Some(c) = &e.upstream.country {
                m.by_country.entry(c.clone()).or_default().push(*slot);
            }
            m.by_scheme
                .entry(e.upstream.scheme)
                .or_default()
                .push(*slot);
        }
        m
    }
}

/// A precomputed list of candidates for a route, and what it guarantees.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CandidateList<'a> {
    /// Hot-table slots of the upstreams in the route's country.
    Country(&'a [u32]),
    /// Hot-table slots of the upstreams of the route's scheme.
    Scheme(&'a [u32]),
    /// Positions of the upstreams whose reputation was at least the route's minimum at the
    /// last reindex.
    Reputation(&'a [u32]),
}

impl CandidateList<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            CandidateList::Country(l) | CandidateList::Scheme(l) | CandidateList::Reputation(l) => {
                l.len()
            }
        }
    }
}

impl Snapshot {
    /// Builds a snapshot from `upstreams`, deduplicated by id (the first occurrence wins),
    /// reusing entries of `previous` so their health survives.
    pub fn build(
        upstreams: impl IntoIterator<Item = impl Into<Arc<Upstream>>>,
        previous: &Snapshot,
        shared: &Arc<Shared>,
    ) -> Snapshot {
        Snapshot::build_saved(
            upstreams
                .into_iter()
                .map(|u| (u.into(), None, Identity::default())),
            previous,
            shared,
        )
    }

    /// [`Snapshot::build`], where an upstream not in `previous` starts from its saved stats
    /// when it has some, and every upstream takes the identity given (entries carried over
    /// are updated in place).
    pub fn build_saved<U: Into<Arc<Upstream>>>(
        upstreams: impl IntoIterator<Item = (U, Option<Saved>, Identity)>,
        previous: &Snapshot,
        shared: &Arc<Shared>,
    ) -> Snapshot {
        let mut entries = Vec::new();
        let mut by_id = HashMap::new();
        for (upstream, saved, identity) in upstreams {
            let upstream: Arc<Upstream> = upstream.into();
            let id = upstream.id();
            if by_id.contains_key(&id) {
                continue;
            }
            let entry = match previous.get(id) {
                // Same proxy, same account: keep its health, but take the new password.
                Some(old) if old.upstream == upstream && Arc::ptr_eq(&old.shared, shared) => {
                    old.identity.set(id, identity);
                    Arc::clone(old)
                }
                _ => {
                    let hot = shared.slab.alloc();
                    Arc::new(Entry {
                        id,
                        upstream,
                        health: match saved {
                            Some(s) => Health::restore_in(hot, &s, &shared.health),
                            None => Health::new(hot),
                        },
                        identity: IdentityCell::new(id, identity),
                        shared: Arc::clone(shared),
                    })
                }
            };
            by_id.insert(id, entries.len());
            entries.push(entry);
        }
        let slots: Vec<u32> = entries.iter().map(|e| e.health.slot()).collect();
        // Taken after every slot above was handed out, so it covers them all.
        let (dir, space) = shared.slab.directory();
        let mut positions = vec![u32::MAX; space as usize];
        for (pos, slot) in slots.iter().enumerate() {
            positions[*slot as usize] = u32::try_from(pos).unwrap_or(u32::MAX);
        }
        let members = Arc::new(Members {
            entries,
            slots,
            dir,
            space,
            positions,
        });
        let mut snap = Snapshot {
            meta: Arc::new(MetaIndex::build(&members)),
            exits: Arc::new(ExitGroups::build(
                members.entries.iter().map(|e| e.identity.group()),
            )),
            shards: (0..LEASE_SHARDS)
                .map(|_| {
                    Arc::new(Shard {
                        members: Arc::clone(&members),
                    })
                })
                .collect(),
            members,
            by_id: Arc::new(by_id),
            ..Snapshot::default()
        };
        snap.reindex(&shared.health, shared.millis(Instant::now()));
        snap
    }

    /// The same entries (and so the same live health), with the orders recomputed from the
    /// live stats as of `now_ms` (the pool's clock).
    pub fn reindexed(&self, cfg: &HealthConfig, now_ms: u64) -> Snapshot {
        let mut snap = Snapshot {
            members: Arc::clone(&self.members),
            shards: Arc::clone(&self.shards),
            by_id: Arc::clone(&self.by_id),
            by_reputation: Vec::new(),
            reputation_sorted: Vec::new(),
            by_latency: Vec::new(),
            due: Vec::new(),
            due_claimed: Counter::default(),
            meta: Arc::clone(&self.meta),
            exits: Arc::clone(&self.exits),
        };
        snap.reindex(cfg, now_ms);
        snap
    }

    fn reindex(&mut self, cfg: &HealthConfig, now_ms: u64) {
        let entries = &self.members.entries;
        let n = u32::try_from(entries.len()).unwrap_or(u32::MAX);
        let reps: Vec<u8> = entries.iter().map(|e| e.health.reputation()).collect();
        let mut by_rep: Vec<u32> = (0..n).collect();
        by_rep.sort_by_key(|i| std::cmp::Reverse(reps[*i as usize]));
        let lat: Vec<f64> = entries.iter().map(|e| e.latency_key(cfg)).collect();
        let mut by_lat: Vec<u32> = (0..n).collect();
        by_lat.sort_by(|a, b| lat[*a as usize].total_cmp(&lat[*b as usize]));
        let remeasure_after = crate::millis(cfg.remeasure_after);
        let hot = |pos: u32| self.members.hot(self.members.slot_of(pos as usize));
        // The keys are read once, then sorted: picks change the live ones meanwhile, and a
        // sort whose comparisons read them could see an inconsistent order (which the
        // standard sort detects and panics on: it did, once in ~50 runs of
        // picks_race_replaces_safely, and would have stopped the gateway's reindexer).
        let mut due: Vec<(u64, u32)> = (0..n)
            .filter(|pos| hot(*pos).is_due(now_ms, remeasure_after))
            .map(|pos| (hot(pos).lru_ms(), pos))
            .collect();
        due.sort_unstable();
        self.due = due.into_iter().map(|(_, pos)| pos).collect();
        self.due_claimed = Counter::default();
        self.reputation_sorted = by_rep.iter().map(|i| reps[*i as usize]).collect();
        self.by_reputation = by_rep;
        self.by_latency = by_lat;
    }

    pub(crate) fn by_reputation(&self) -> &[u32] {
        &self.by_reputation
    }

    pub(crate) fn by_latency(&self) -> &[u32] {
        &self.by_latency
    }

    /// The next unclaimed position of the due list, if any is left; each is handed out once.
    pub(crate) fn claim_due(&self) -> Option<u32> {
        // A plain load first: once the list is used up, picks share the line read-only.
        if self.due_claimed.0.load(Ordering::Relaxed) >= self.due.len() {
            return None;
        }
        let i = self.due_claimed.0.fetch_add(1, Ordering::Relaxed);
        self.due.get(i).copied()
    }

    /// The smallest precomputed candidate list for a route's country, scheme and minimum
    /// reputation filters, or `None` when the route filters on none. An empty list means
    /// nothing can match. Every pick still checks each filter on the live entry.
    ///
    /// `minrep` takes the prefix of the reputation order whose reputation at the last reindex
    /// was high enough: an upstream that rose above it since joins at the next reindex (within
    /// `pool.reindex_interval`). Small pools are scanned whole instead (their order is not
    /// refreshed).
    pub(crate) fn candidates(&self, route: &Route) -> Option<CandidateList<'_>> {
        let by_country = route.country.as_ref().map(|c| {
            CandidateList::Country(self.meta.by_country.get(c).map_or(&[][..], Vec::as_slice))
        });
        let by_scheme = route.scheme.map(|s| {
            CandidateList::Scheme(self.meta.by_scheme.get(&s).map_or(&[][..], Vec::as_slice))
        });
        let by_reputation = route
            .min_reputation
            .filter(|_| self.len() > EXACT_MAX)
            .map(|m| {
                let end = self.reputation_sorted.partition_point(|r| *r >= m);
                CandidateList::Reputation(&self.by_reputation[..end])
            });
        [by_country, by_scheme, by_reputation]
            .into_iter()
            .flatten()
            .min_by_key(CandidateList::len)
    }

    pub fn entries(&self) -> &[Arc<Entry>] {
        &self.members.entries
    }

    pub(crate) fn exits(&self) -> &ExitGroups {
        &self.exits
    }

    /// The members that exit from the same IP as `id` (itself included); just itself when its
    /// exit is unknown or its own.
    pub fn exit_group_of(&self, id: UpstreamId) -> Vec<UpstreamId> {
        let Some(e) = self.get(id) else {
            return Vec::new();
        };
        match self.exits.members_of(e.exit_group()) {
            // An unknown exit's: alone.
            [] => vec![id],
            group => group
                .iter()
                .map(|pos| self.members.entries[*pos as usize].id)
                .collect(),
        }
    }

    pub(crate) fn members(&self) -> &Members {
        &self.members
    }

    /// The handle a lease taken on this thread keeps the members alive with.
    pub(crate) fn shard(&self) -> &Arc<Shard> {
        &self.shards[shard_index()]
    }

    pub fn get(&self, id: UpstreamId) -> Option<&Arc<Entry>> {
        self.position(id).map(|i| &self.members.entries[i])
    }

    /// Where upstream `id` is in [`Snapshot::entries`].
    pub(crate) fn position(&self, id: UpstreamId) -> Option<usize> {
        self.by_id.get(&id).copied()
    }

    pub fn len(&self) -> usize {
        self.members.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Arc<Shared> {
        Arc::new(Shared::new(HealthConfig::default()))
    }

    fn up(url: &str) -> Upstream {
        Upstream::parse(url).unwrap()
    }

    #[test]
    fn dedupes_and_keeps_health() {
        let shared = shared();
        let first = Snapshot::build(
            [up("http://a:1"), up("http://a:1"), up("socks5://b:2")],
            &Snapshot::default(),
            &shared,
        );
        assert_eq!(first.len(), 2);
        let a = Arc::clone(first.get(up("http://a:1").id()).unwrap());
        let second = Snapshot::build([up("socks5://b:2"), up("http://a:1")], &first, &shared);
        assert!(Arc::ptr_eq(&a, second.get(a.id).unwrap()));
        assert_eq!(*second.entries()[0].upstream, up("socks5://b:2"));
    }

    #[test]
    fn membership_with_and_without_churn() {
        let shared = shared();
        let urls: Vec<_> = (0..6).map(|i| up(&format!("http://h{i}:1"))).collect();
        let first = Snapshot::build(urls.clone(), &Snapshot::default(), &shared);
        let m = first.members();
        // Dense: every slot of the space is a member, none beyond.
        assert_eq!(m.space() as usize, m.len());
        assert!((0..m.space()).all(|s| m.is_member(s)));
        assert!(!m.is_member(m.space()));
        let gone = first.get(urls[5].id()).unwrap().health.slot();
        // Without the last upstream (which `first` still holds): its slot is in the space but
        // not a member.
        let second = Snapshot::build(urls[..5].to_vec(), &first, &shared);
        let m = second.members();
        assert_eq!(m.len(), 5);
        assert!(m.space() > 5);
        assert!(!m.is_member(gone));
        assert_eq!((0..m.space()).filter(|s| m.is_member(*s)).count(), 5);
    }

    #[test]
    fn new_password_makes_new_entry() {
        let shared = shared();
        let first = Snapshot::build([up("http://u:old@a:1")], &Snapshot::default(), &shared);
        let second = Snapshot::build([up("http://u:new@a:1")], &first, &shared);
        let creds = second.entries()[0].upstream.credentials.as_ref().unwrap();
        assert_eq!(creds.password.expose(), "new");
    }
}
