//! Things one connection lets go of, kept on its thread for the next (relay buffers, pipes):
//! a pop and a push instead of an allocation or a syscall. Each kind has its own thread-local
//! list and bound; at thread exit whatever is kept is simply dropped.

use std::cell::Cell;
use std::thread::LocalKey;

/// A thread's list of spares of one kind.
pub(crate) type Spares<T> = LocalKey<Cell<Vec<T>>>;

/// The spare last kept, if any.
pub(crate) fn pop<T>(spares: &'static Spares<T>) -> Option<T> {
    spares
        .try_with(|list| {
            let mut all = list.take();
            let item = all.pop();
            list.set(all);
            item
        })
        .ok()
        .flatten()
}

/// Keeps `item` if fewer than `max` are kept; drops it otherwise.
pub(crate) fn push<T>(spares: &'static Spares<T>, item: T, max: usize) {
    let _ = spares.try_with(|list| {
        let mut all = list.take();
        if all.len() < max {
            all.push(item);
        }
        list.set(all);
    });
}

/// How many are kept on this thread.
#[cfg(test)]
pub(crate) fn count<T>(spares: &'static Spares<T>) -> usize {
    spares.with(|list| {
        let all = list.take();
        let n = all.len();
        list.set(all);
        n
    })
}
