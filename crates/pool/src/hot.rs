//! The hot part of every upstream's health, in one contiguous table.
//!
//! A pick reads a candidate's backoff, probation, in-flight count, reputation and LRU key,
//! and writes the chosen one's in-flight count and last use. In a pool of a million upstreams
//! those live in a million separate heap allocations (with the upstream's address, account and
//! cold stats around them), so each probe was a cache and TLB miss into hundreds of megabytes.
//! Here they are 32-byte [`Hot`] slots in chunks of [`CHUNK`] (32 MB for a million), and a
//! pick touches nothing else: the [`Entry`](crate::Entry) itself is read only when the chosen
//! upstream is dialed or reported.
//!
//! A slot belongs to one [`Health`](crate::Health) for its whole life (its index never moves,
//! so a snapshot swap never copies or loses hot state) and goes back to the [`Slab`]'s free
//! list when that health is dropped, which is when no snapshot and no lease refer to it any
//! more. Chunks are never freed or moved while the slab lives, so a snapshot can keep the
//! directory of chunks it was built with.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Slots per chunk (a power of two): 128 KB chunks.
pub(crate) const CHUNK_SHIFT: u32 = 12;
pub(crate) const CHUNK: usize = 1 << CHUNK_SHIFT;
const MASK: u32 = (1 << CHUNK_SHIFT) - 1;

/// A new upstream's reputation.
pub(crate) const INITIAL_REPUTATION: u8 = 50;
/// "In no snapshot" for [`Hot::member_since`].
const NO_GENERATION: u64 = u64::MAX;

/// What a pick reads and writes of one upstream. Times are milliseconds since the pool's
/// epoch.
#[derive(Debug)]
#[repr(C, align(32))]
pub(crate) struct Hot {
    pub(crate) backoff_until_ms: AtomicU64,
    pub(crate) last_used_ms: AtomicU64,
    /// The generation of the first snapshot this slot's upstream is a member of, or
    /// `NO_GENERATION` while it is in none (free, or removed from the pool): a pick that
    /// probes the table by slot skips slots that are not members of its snapshot.
    member_since: AtomicU64,
    pub(crate) in_flight: AtomicU32,
    pub(crate) reputation: AtomicU8,
    pub(crate) probation: AtomicBool,
}

impl Hot {
    fn new() -> Hot {
        Hot {
            backoff_until_ms: AtomicU64::new(0),
            last_used_ms: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            member_since: AtomicU64::new(NO_GENERATION),
            reputation: AtomicU8::new(INITIAL_REPUTATION),
            probation: AtomicBool::new(true),
        }
    }

    /// Back to a new upstream's state (a reused slot).
    fn reset(&self) {
        self.backoff_until_ms.store(0, Ordering::Relaxed);
        self.last_used_ms.store(0, Ordering::Relaxed);
        self.in_flight.store(0, Ordering::Relaxed);
        self.member_since.store(NO_GENERATION, Ordering::Relaxed);
        self.reputation.store(INITIAL_REPUTATION, Ordering::Relaxed);
        self.probation.store(true, Ordering::Relaxed);
    }

    /// Whether selection may hand this upstream out at `now_ms`: not in backoff, and not on
    /// probation with a request already in flight.
    pub(crate) fn is_selectable(&self, now_ms: u64) -> bool {
        self.backoff_until_ms.load(Ordering::Relaxed) <= now_ms
            && (!self.probation.load(Ordering::Relaxed)
                || self.in_flight.load(Ordering::Relaxed) == 0)
    }

    pub(crate) fn reputation(&self) -> u8 {
        self.reputation.load(Ordering::Relaxed)
    }

    /// The least-recently-used strategy's key: the last use, or the end of a backoff if
    /// later, so an upstream coming back from one does not count as the least recently used
    /// of all.
    pub(crate) fn lru_ms(&self) -> u64 {
        self.last_used_ms
            .load(Ordering::Relaxed)
            .max(self.backoff_until_ms())
    }

    /// Whether this slot's upstream is a member of the snapshot of generation `generation`.
    pub(crate) fn is_member_of(&self, generation: u64) -> bool {
        self.member_since.load(Ordering::Relaxed) <= generation
    }

    /// Marks the upstream a member of snapshots from `generation` on.
    pub(crate) fn join(&self, generation: u64) {
        self.member_since.store(generation, Ordering::Relaxed);
    }

    /// Marks the upstream a member of no snapshot (it is being removed from the pool).
    pub(crate) fn leave(&self) {
        self.member_since.store(NO_GENERATION, Ordering::Relaxed);
    }

    pub(crate) fn backoff_until_ms(&self) -> u64 {
        self.backoff_until_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn acquire(&self, now_ms: u64) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        // 0 means "never": a use in the pool's first millisecond counts as 1.
        self.last_used_ms.store(now_ms.max(1), Ordering::Relaxed);
    }

    pub(crate) fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A run of slots whose addresses never change.
#[derive(Debug)]
pub(crate) struct Chunk {
    slots: Box<[Hot]>,
}

impl Chunk {
    fn new(len: usize) -> Chunk {
        Chunk {
            slots: (0..len).map(|_| Hot::new()).collect(),
        }
    }
}

/// The chunks a snapshot was built with: slot index to [`Hot`].
pub(crate) type Directory = Arc<[Arc<Chunk>]>;

/// The slot `index` of a directory that covers it.
pub(crate) fn slot(dir: &[Arc<Chunk>], index: u32) -> &Hot {
    &dir[(index >> CHUNK_SHIFT) as usize].slots[(index & MASK) as usize]
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
    /// Generations handed out to snapshots (a `u64` never runs out).
    generation: u64,
}

impl Slab {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlabInner> {
        // The state is a list and a counter, consistent at every step: a panic elsewhere
        // while it was held cannot have left it half-changed.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot in a new upstream's state.
    pub(crate) fn alloc(self: &Arc<Self>) -> HotRef {
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
        let hot = HotRef {
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

    /// The generation of the next snapshot built: one more than the last.
    pub(crate) fn next_generation(&self) -> u64 {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.generation
    }

    /// Slots in use (handed out and not yet returned).
    #[cfg(test)]
    pub(crate) fn in_use(&self) -> usize {
        let inner = self.lock();
        inner.used as usize - inner.free.len()
    }
}

/// One upstream's slot, owned by its health.
pub(crate) struct HotRef {
    chunk: Arc<Chunk>,
    index: u32,
    /// Where the slot goes back to; `None` for a health outside any pool.
    slab: Option<Arc<Slab>>,
}

impl HotRef {
    /// A slot of its own, outside any pool.
    pub(crate) fn standalone() -> HotRef {
        HotRef {
            chunk: Arc::new(Chunk::new(1)),
            index: 0,
            slab: None,
        }
    }

    pub(crate) fn get(&self) -> &Hot {
        &self.chunk.slots[(self.index & MASK) as usize]
    }

    /// Its index in the slab.
    pub(crate) fn index(&self) -> u32 {
        self.index
    }
}

impl std::fmt::Debug for HotRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotRef")
            .field("index", &self.index)
            .field("hot", self.get())
            .finish()
    }
}

impl Drop for HotRef {
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
    fn slots_are_stable_reused_and_reset() {
        let slab = Arc::new(Slab::default());
        let refs: Vec<HotRef> = (0..CHUNK + 3).map(|_| slab.alloc()).collect();
        assert_eq!(slab.in_use(), CHUNK + 3);
        let (dir, used) = slab.directory();
        assert_eq!((dir.len(), used as usize), (2, CHUNK + 3));
        for r in &refs {
            assert!(std::ptr::eq(slot(&dir, r.index()), r.get()), "one address");
        }
        let last = &refs[CHUNK + 2];
        last.get().acquire(7);
        last.get().reputation.store(99, Ordering::Relaxed);
        let index = last.index();
        drop(refs);
        assert_eq!(slab.in_use(), 0);
        let again = slab.alloc();
        assert_eq!(again.index(), index, "the last freed slot is reused first");
        let hot = again.get();
        assert_eq!(hot.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(hot.reputation(), INITIAL_REPUTATION);
        assert!(hot.probation.load(Ordering::Relaxed));
        assert_eq!(hot.last_used_ms.load(Ordering::Relaxed), 0);
        assert!(
            !hot.is_member_of(u64::MAX - 1),
            "a fresh slot is in no snapshot"
        );
        hot.join(3);
        assert!(!hot.is_member_of(2) && hot.is_member_of(3) && hot.is_member_of(4));
        hot.leave();
        assert!(!hot.is_member_of(4));
    }

    #[test]
    fn a_slot_is_32_bytes() {
        assert_eq!(std::mem::size_of::<Hot>(), 32);
    }
}
