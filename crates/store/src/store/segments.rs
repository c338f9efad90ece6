//! sled's segment size: the unit its log is written and cleaned in. sled 0.34 refuses to open a
//! database with another size than it was made with, so a data dir made with another (every
//! one before this, at sled's default of 512 KiB) is copied once into a new database of
//! [`SIZE`] and swapped in, at open.
//!
//! Why 16 MiB, sled's largest: the persister rewrites the stats row of every upstream used in
//! an interval, once every `store.stats_flush_interval`, and with small segments sled
//! rewrote far more than those rows (its segment cleaner relocating live pages out of segments
//! each write leaves partly dead). Measured with a busy pool (`results-2026-11-30.md`), MiB
//! written to the data dir in 30 s of traffic (40 s for 100,000 and 200,000), on a data dir
//! whose upstreams are used for the first time (every stats row grows from its default) and
//! then on one used before:
//!
//! | upstreams | first use, 512 KiB | first use, 16 MiB | used before, 512 KiB | used before, 16 MiB |
//! |---|---|---|---|---|
//! | 10,000 | 114-152 | 7 | 42-43 | 8-15 |
//! | 40,000 | 266 | 9 | 51 | 13 |
//! | 100,000 | 345 | 23 | – | – |
//! | 200,000 | 361-386 | 904 | 76 | 54 |
//!
//! Sizes between were worse than either end for some pools (40,000 at 2 MiB: 774). The stats
//! were then written in sled batches of 256 rows; the 200,000 row was those batches, each
//! costing ~4 MiB once the database outgrew a segment. Written row by row (6499ffe), 200,000
//! upstreams write 56 MiB on first use and 9 used before, on a box where the batches wrote 746
//! and 262 ([`crate::Store::write_stats`]). sled writes only what it logs, so a small data dir
//! stays small on disk.
//!
//! sled's log buffer is a segment's size too, and its written part stayed resident until the
//! segment was full: a sawtooth of up to 16 MiB in the gateway's RSS. The sled this workspace
//! builds (`crates/sled`, a patch) gives those pages back once they are in the log file, so
//! large segments no longer cost memory (10,000 upstreams in use, 200 s: RssAnon 27-30 MiB,
//! where it swung between 31 and 47).
//!
//! The swap: the copy is made in `db.resizing` and flushed, checked against the original
//! (sled's checksum of every key and value), then `db` is renamed to `db.before-resize` and
//! `db.resizing` to `db`, and the old one removed. Killed at any point, the next open finishes
//! it (`finish_resize`): a leftover `db.resizing` beside `db` is an unfinished copy (removed,
//! and the copy starts over); `db.before-resize` means the copy was complete. A copy that
//! fails (out of disk) leaves the database as it was, opened at its old size.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{db_err, is_lock_error};
use crate::StoreError;

/// The segment size of the databases this build makes.
pub const SIZE: usize = 16 << 20;

/// How long an open waits for sled's threads of a handle this process just dropped to let go
/// of the database's lock.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The sled configuration the database at `path` opens with: the segment size it was made
/// with, or [`SIZE`] for a new one. For tools and tests that open a data dir's database
/// directly (`DATA_DIR/db`), without the store.
pub fn config(path: &Path) -> sled::Config {
    sized(path, stored_size(path).unwrap_or(SIZE))
}

/// The sled configuration of the database at `path` with segments of `size` bytes.
pub(crate) fn sized(path: &Path, size: usize) -> sled::Config {
    sled::Config::new().path(path).segment_size(size)
}

/// The segment size the database at `path` was made with (sled's `conf` file: lines of text,
/// then a CRC32); `None` where there is none yet, or it says nothing sled would read either.
pub(crate) fn stored_size(path: &Path) -> Option<usize> {
    let bytes = std::fs::read(path.join("conf")).ok()?;
    String::from_utf8_lossy(&bytes)
        .lines()
        .find_map(|l| l.strip_prefix("segment_size:")?.trim().parse().ok())
}

/// Where the copy is made.
pub(crate) fn in_progress(path: &Path) -> PathBuf {
    path.with_extension("resizing")
}

/// Where the original waits between the two renames.
pub(crate) fn set_aside(path: &Path) -> PathBuf {
    path.with_extension("before-resize")
}

/// Finishes or undoes a resize that was killed: see the module's text.
pub(crate) fn finish_resize(path: &Path) -> std::io::Result<()> {
    let (aside, fresh) = (set_aside(path), in_progress(path));
    if aside.exists() {
        if !path.exists() {
            std::fs::rename(&fresh, path)?;
        }
        std::fs::remove_dir_all(&aside)?;
    } else if fresh.exists() && path.exists() {
        std::fs::remove_dir_all(&fresh)?;
    }
    Ok(())
}

/// Copies the database at `path` (segments of `old` bytes, not open in this process) into one
/// of [`SIZE`], swaps it in, and returns it open. `dir` is the data dir, for errors.
pub(crate) fn resize(path: &Path, old: usize, dir: &Path) -> Result<sled::Db, StoreError> {
    let started = Instant::now();
    let fresh = in_progress(path);
    let io = |p: &Path| {
        let p = p.to_owned();
        move |e| StoreError::io(&p, e)
    };
    let db = |e| db_err(dir)(e);
    let copied = {
        let from = open_waiting(sized(path, old), dir)?;
        let to = open_waiting(sized(&fresh, SIZE), dir)?;
        let copied = copy_all(&from, &to).map_err(db)?;
        to.flush().map_err(db)?;
        if from.checksum().map_err(db)? != to.checksum().map_err(db)? {
            return Err(StoreError::Db {
                dir: dir.to_owned(),
                message: format!(
                    "the copy made to change the database's segment size ({}) differs from it; \
                     the database is left as it was",
                    fresh.display()
                ),
            });
        }
        copied
    };
    std::fs::rename(path, set_aside(path)).map_err(io(path))?;
    std::fs::rename(&fresh, path).map_err(io(&fresh))?;
    std::fs::remove_dir_all(set_aside(path)).map_err(io(&set_aside(path)))?;
    tracing::info!(
        entries = copied,
        from_bytes = old,
        to_bytes = SIZE,
        took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "database copied to larger log segments (fewer bytes rewritten per stats flush)"
    );
    open_waiting(sized(path, SIZE), dir)
}

/// Copies every tree of `from`, key by key, into `to` (not flushed); returns how many entries.
pub(crate) fn copy_all(from: &sled::Db, to: &sled::Db) -> sled::Result<usize> {
    let mut copied = 0;
    for name in from.tree_names() {
        let (source, copy) = (from.open_tree(&name)?, to.open_tree(&name)?);
        for item in source.iter() {
            let (k, v) = item?;
            copy.insert(k, v)?;
            copied += 1;
        }
    }
    Ok(copied)
}

/// Opens `config`'s database, waiting while the lock is held by sled's threads of a handle this
/// process just dropped (a lock held by anything else still fails, after [`LOCK_WAIT`]).
pub(crate) fn open_waiting(config: sled::Config, dir: &Path) -> Result<sled::Db, StoreError> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Err(e) if is_lock_error(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other.map_err(db_err(dir)),
        }
    }
}
