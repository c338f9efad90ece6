//! The hot part of every upstream's health, in one contiguous table.
//!
//! A pick reads a candidate's backoff, probation, in-flight count, reputation and LRU key,
//! and writes the chosen one's in-flight count and last use. In a pool of a million upstreams
//! those live in a million separate heap allocations (with the upstream's address, account and
//! cold stats around them), so each probe was a cache and TLB miss into hundreds of megabytes.
//! Here they are 16-byte [`PickState`] slots in chunks of [`CHUNK`] (16 MB for a million), and a
//! pick touches nothing else: the [`Entry`](crate::Entry) itself is read only when the chosen
//! upstream is dialed or reported.
//!
//! A slot belongs to one [`Health`](crate::Health) for its whole life (its index never moves,
//! so a snapshot swap never copies or loses hot state) and goes back to the [`Slab`]'s free
//! list when that health is dropped, which is when no snapshot and no lease refer to it any
//! more. Chunks are never freed or moved while the slab lives, so a snapshot can keep the
//! directory of chunks it was built with.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Slots per chunk (a power of two): 64 KB chunks.
pub(crate) const CHUNK_SHIFT: u32 = 12;
pub(crate) const CHUNK: usize = 1 << CHUNK_SHIFT;
const MASK: u32 = (1 << CHUNK_SHIFT) - 1;
/// Slots per 64-byte cache line.
const PER_LINE_SHIFT: u32 = 2;
const LINES_SHIFT: u32 = CHUNK_SHIFT - PER_LINE_SHIFT;

/// Where slot `index` sits in its chunk. In the first chunk consecutive slots go to
/// consecutive cache lines (slot `i` in line `i % 1024`), so the upstreams of a pool of up to
/// 1,024 each have a line to themselves and threads leasing different ones never write the
/// same line. Later chunks (pools of thousands, where two threads rarely lease neighbours)
/// are in order, so a sample of neighbouring slots is a couple of cache lines.
fn place(index: u32) -> usize {
    let i = index & MASK;
    if index >> CHUNK_SHIFT == 0 {
        (((i & ((1 << LINES_SHIFT) - 1)) << PER_LINE_SHIFT) | (i >> LINES_SHIFT)) as usize
    } else {
        i as usize
    }
}

/// A new upstream's reputation.
pub(crate) const INITIAL_REPUTATION: u8 = 50;

// The state word: in flight (bits 0-15), reputation (16-22), probation (23), last use in ms
// since the pool's epoch (24-63: 34 years).
const IN_FLIGHT_MASK: u64 = 0xFFFF;
const REPUTATION_SHIFT: u32 = 16;
const REPUTATION_MASK: u64 = 0x7F << REPUTATION_SHIFT;
const PROBATION: u64 = 1 << 23;
const LAST_USED_SHIFT: u32 = 24;
const LAST_USED_MAX: u64 = (1 << (64 - LAST_USED_SHIFT)) - 1;
const INITIAL_STATE: u64 = ((INITIAL_REPUTATION as u64) << REPUTATION_SHIFT) | PROBATION;

// The second word: the end of a backoff in ms since the pool's epoch (bits 0-55: two million
// years) and the selection weight (bits 56-62, 0-100; see `reputation::selection_weight`).
const BACKOFF_MASK: u64 = (1 << 56) - 1;
const WEIGHT_SHIFT: u32 = 56;
const WEIGHT_MASK: u64 = 0x7F << WEIGHT_SHIFT;
const INITIAL_WORD2: u64 = (INITIAL_REPUTATION as u64) << WEIGHT_SHIFT;

/// What a pick reads and writes of one upstream, in 16 bytes (a million take 16 MB). Times
/// are milliseconds since the pool's epoch.
///
/// Everything but the backoff shares one word, changed with compare-and-swap, so taking a
/// lease (one more in flight, last use now) is one atomic step. The in-flight count saturates
/// at 65,535 (it only decides whether an upstream on probation is busy, and is shown).
#[derive(Debug)]
#[repr(C, align(16))]
pub(crate) struct PickState {
    backoff_until_ms: AtomicU64,
    state: AtomicU64,
}

impl PickState {
    fn new() -> PickState {
        PickState {
            backoff_until_ms: AtomicU64::new(INITIAL_WORD2),
            state: AtomicU64::new(INITIAL_STATE),
        }
    }

    /// Back to a new upstream's state (a reused slot).
    fn reset(&self) {
        self.backoff_until_ms
            .store(INITIAL_WORD2, Ordering::Relaxed);
        self.state.store(INITIAL_STATE, Ordering::Relaxed);
    }

    fn update(&self, f: impl Fn(u64) -> u64) {
        let _ = self
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| Some(f(s)));
    }

    /// Whether an upstream is due for re-measuring at `now_ms`: never used, or neither used nor
    /// in backoff for `remeasure_after_ms` (an upstream just back from a backoff is re-measured by
    /// its probation, not here).
    pub(crate) fn is_due(&self, now_ms: u64, remeasure_after_ms: u64) -> bool {
        let idle_since = self.lru_ms();
        idle_since == 0 || now_ms.saturating_sub(idle_since) >= remeasure_after_ms
    }

    /// Whether selection may hand this upstream out at `now_ms`: not in backoff, and not on
    /// probation with a request already in flight.
    pub(crate) fn is_selectable(&self, now_ms: u64) -> bool {
        let state = self.state.load(Ordering::Relaxed);
        self.backoff_until_ms() <= now_ms && (state & PROBATION == 0 || state & IN_FLIGHT_MASK == 0)
    }

    pub(crate) fn reputation(&self) -> u8 {
        let bits = (self.state.load(Ordering::Relaxed) & REPUTATION_MASK) >> REPUTATION_SHIFT;
        u8::try_from(bits).unwrap_or(u8::MAX)
    }

    pub(crate) fn set_reputation(&self, reputation: u8) {
        let bits = u64::from(reputation.min(100)) << REPUTATION_SHIFT;
        self.update(|s| (s & !REPUTATION_MASK) | bits);
    }

    pub(crate) fn is_on_probation(&self) -> bool {
        self.state.load(Ordering::Relaxed) & PROBATION != 0
    }

    pub(crate) fn set_probation(&self, on: bool) {
        self.update(|s| if on { s | PROBATION } else { s & !PROBATION });
    }

    pub(crate) fn in_flight(&self) -> u32 {
        u32::try_from(self.state.load(Ordering::Relaxed) & IN_FLIGHT_MASK).unwrap_or(u32::MAX)
    }

    /// The last use (0: never).
    pub(crate) fn last_used_ms(&self) -> u64 {
        self.state.load(Ordering::Relaxed) >> LAST_USED_SHIFT
    }

    /// The least-recently-used strategy's key: the last use, or the end of a backoff if
    /// later, so an upstream coming back from one does not count as the least recently used
    /// of all.
    pub(crate) fn lru_ms(&self) -> u64 {
        self.last_used_ms().max(self.backoff_until_ms())
    }

    pub(crate) fn backoff_until_ms(&self) -> u64 {
        self.backoff_until_ms.load(Ordering::Relaxed) & BACKOFF_MASK
    }

    pub(crate) fn set_backoff_until_ms(&self, until: u64) {
        let until = until.min(BACKOFF_MASK);
        let _ = self
            .backoff_until_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                Some((w & WEIGHT_MASK) | until)
            });
    }

    /// What `weighted_random` draws this upstream by (0-100).
    pub(crate) fn weight(&self) -> u8 {
        let bits = (self.backoff_until_ms.load(Ordering::Relaxed) & WEIGHT_MASK) >> WEIGHT_SHIFT;
        u8::try_from(bits).unwrap_or(u8::MAX)
    }

    pub(crate) fn set_weight(&self, weight: u8) {
        let bits = u64::from(weight.min(100)) << WEIGHT_SHIFT;
        let _ = self
            .backoff_until_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                Some((w & !WEIGHT_MASK) | bits)
            });
    }

    /// One more in flight, used at `now_ms`.
    pub(crate) fn acquire(&self, now_ms: u64) {
        // 0 means "never": a use in the pool's first millisecond counts as 1.
        let used = now_ms.clamp(1, LAST_USED_MAX) << LAST_USED_SHIFT;
        self.update(|s| {
            let in_flight = (s & IN_FLIGHT_MASK).saturating_add(1).min(IN_FLIGHT_MASK);
            (s & (REPUTATION_MASK | PROBATION)) | used | in_flight
        });
    }

    /// One fewer in flight.
    pub(crate) fn release(&self) {
        self.update(|s| {
            let in_flight = (s & IN_FLIGHT_MASK).saturating_sub(1);
            (s & !IN_FLIGHT_MASK) | in_flight
        });
    }
}

/// A run of slots whose addresses never change.
#[derive(Debug)]
pub(crate) struct Chunk {
    slots: Box<[PickState]>,
}

impl Chunk {
    fn new(len: usize) -> Chunk {
        Chunk {
            slots: (0..len).map(|_| PickState::new()).collect(),
        }
    }
}

/// The chunks a snapshot was built with: slot index to [`PickState`].
pub(crate) type Directory = Arc<[Arc<Chunk>]>;

/// The slot `index` of a directory that covers it.
pub(crate) fn slot(dir: &[Arc<Chunk>], index: u32) -> &PickState {
    &dir[(index >> CHUNK_SHIFT) as usize].slots[place(index)]
}

/// The pool's table of slots, grown a chunk at a time, with a free list of slots to reuse.
#[derive(Debug, Default)]
pub(crate) struct Slab {
    inner: Mutex<SlabInner>,
}

#[derive(Debug, Default)]
struct SlabInner {
    chunks: Vec<Arc<Chunk>>,
    free: Vec<u32>,
    /// Slots ever handed out (the next fresh index).
    used: u32,
}

impl Slab {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlabInner> {
        // The state is a list and a counter, consistent at every step: a panic elsewhere
        // while it was held cannot have left it half-changed.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot in a new upstream's state.
    pub(crate) fn alloc(self: &Arc<Self>) -> PickSlot {
        let mut inner = self.lock();
        let index = match inner.free.pop() {
            Some(i) => i,
            None => {
                let i = inner.used;
                if (i >> CHUNK_SHIFT) as usize == inner.chunks.len() {
                    inner.chunks.push(Arc::new(Chunk::new(CHUNK)));
                }
                inner.used += 1;
                i
            }
        };
        let chunk = Arc::clone(&inner.chunks[(index >> CHUNK_SHIFT) as usize]);
        drop(inner);
        let hot = PickSlot {
            chunk,
            index,
            slab: Some(Arc::clone(self)),
        };
        hot.get().reset();
        hot
    }

    /// Every chunk so far (covering every slot handed out until now) and the number of
    /// slots handed out (the extent of the slot space).
    pub(crate) fn directory(&self) -> (Directory, u32) {
        let inner = self.lock();
        (inner.chunks.iter().cloned().collect(), inner.used)
    }

    /// Slots in use (handed out and not yet returned).
    #[cfg(test)]
    pub(crate) fn in_use(&self) -> usize {
        let inner = self.lock();
        inner.used as usize - inner.free.len()
    }
}

/// One upstream's slot, owned by its health.
pub(crate) struct PickSlot {
    chunk: Arc<Chunk>,
    index: u32,
    /// Where the slot goes back to; `None` for a health outside any pool.
    slab: Option<Arc<Slab>>,
}

impl PickSlot {
    /// A slot of its own, outside any pool.
    pub(crate) fn standalone() -> PickSlot {
        PickSlot {
            chunk: Arc::new(Chunk::new(1)),
            index: 0,
            slab: None,
        }
    }

    pub(crate) fn get(&self) -> &PickState {
        &self.chunk.slots[place(self.index)]
    }

    /// Its index in the slab.
    pub(crate) fn index(&self) -> u32 {
        self.index
    }
}

impl std::fmt::Debug for PickSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PickSlot")
            .field("index", &self.index)
            .field("hot", self.get())
            .finish()
    }
}

impl Drop for PickSlot {
    fn drop(&mut self) {
        if let Some(slab) = &self.slab {
            slab.lock().free.push(self.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_and_backoff_share_a_word_without_touching_each_other() {
        let hot = PickState::new();
        assert_eq!(
            (hot.weight(), hot.backoff_until_ms()),
            (INITIAL_REPUTATION, 0)
        );
        hot.set_backoff_until_ms(123_456_789);
        hot.set_weight(4);
        assert_eq!((hot.weight(), hot.backoff_until_ms()), (4, 123_456_789));
        hot.set_weight(100);
        hot.set_backoff_until_ms(0);
        assert_eq!((hot.weight(), hot.backoff_until_ms()), (100, 0));
        // Beyond the field: clamped, never spilling into the weight.
        hot.set_backoff_until_ms(u64::MAX);
        assert_eq!((hot.weight(), hot.backoff_until_ms()), (100, BACKOFF_MASK));
        hot.reset();
        assert_eq!(
            (hot.weight(), hot.backoff_until_ms()),
            (INITIAL_REPUTATION, 0)
        );
    }

    #[test]
    fn slots_are_stable_reused_and_reset() {
        let slab = Arc::new(Slab::default());
        let refs: Vec<PickSlot> = (0..CHUNK + 3).map(|_| slab.alloc()).collect();
        assert_eq!(slab.in_use(), CHUNK + 3);
        let (dir, used) = slab.directory();
        assert_eq!((dir.len(), used as usize), (2, CHUNK + 3));
        for r in &refs {
            assert!(std::ptr::eq(slot(&dir, r.index()), r.get()), "one address");
        }
        let last = &refs[CHUNK + 2];
        last.get().acquire(7);
        last.get().set_reputation(99);
        let index = last.index();
        drop(refs);
        assert_eq!(slab.in_use(), 0);
        let again = slab.alloc();
        assert_eq!(again.index(), index, "the last freed slot is reused first");
        let hot = again.get();
        assert_eq!(hot.in_flight(), 0);
        assert_eq!(hot.reputation(), INITIAL_REPUTATION);
        assert!(hot.is_on_probation());
        assert_eq!(hot.last_used_ms(), 0);
    }

    #[test]
    fn placement_is_a_permutation_spreading_neighbours() {
        let mut seen = vec![false; CHUNK];
        for i in 0..CHUNK as u32 {
            let p = place(i);
            assert!(!seen[p], "slot {i} placed twice");
            seen[p] = true;
        }
        // The first 1,024 slots each start a cache line of their own.
        let lines: std::collections::HashSet<usize> = (0..1024).map(|i| place(i) / 4).collect();
        assert_eq!(lines.len(), 1024);
        assert_eq!(place(CHUNK as u32 + 5), 5, "later chunks in order");
    }

    #[test]
    fn a_slot_is_16_bytes() {
        assert_eq!(std::mem::size_of::<PickState>(), 16);
        assert_eq!(
            std::mem::align_of::<PickState>(),
            16,
            "never across two cache lines"
        );
    }

    #[test]
    fn state_fields_do_not_disturb_each_other() {
        let hot = PickState::new();
        hot.acquire(0);
        assert_eq!(
            (hot.in_flight(), hot.last_used_ms()),
            (1, 1),
            "0 ms counts as a use"
        );
        hot.set_reputation(100);
        hot.set_probation(false);
        hot.acquire(LAST_USED_MAX + 5);
        assert_eq!(hot.last_used_ms(), LAST_USED_MAX, "saturates");
        assert_eq!((hot.in_flight(), hot.reputation()), (2, 100));
        assert!(!hot.is_on_probation());
        hot.set_reputation(0);
        hot.set_probation(true);
        assert_eq!((hot.in_flight(), hot.reputation()), (2, 0));
        assert_eq!(hot.last_used_ms(), LAST_USED_MAX);
        hot.release();
        hot.release();
        hot.release();
        assert_eq!(hot.in_flight(), 0, "never below zero");
        for _ in 0..70_000 {
            hot.acquire(9);
        }
        assert_eq!(hot.in_flight(), 65_535, "saturates");
        assert_eq!((hot.reputation(), hot.last_used_ms()), (0, 9));
        assert!(hot.is_on_probation());
    }

    #[test]
    fn selectable_means_out_of_backoff_and_not_busy_on_probation() {
        let hot = PickState::new();
        assert!(hot.is_selectable(0));
        hot.acquire(1);
        assert!(!hot.is_selectable(1), "on probation with one in flight");
        hot.set_probation(false);
        assert!(hot.is_selectable(1));
        hot.set_backoff_until_ms(10);
        assert!(!hot.is_selectable(9) && hot.is_selectable(10));
        assert_eq!(hot.lru_ms(), 10, "back from a backoff counts as used then");
    }
}
