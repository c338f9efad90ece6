//! Freed memory handed back to the system. The process's allocator is mimalloc (linked as its
//! `malloc`, `main.rs`): a page whose blocks are all freed goes back to its arena and is
//! scheduled for purging (`MADV_DONTNEED`) a second later (`purge_delay`), but the purge is
//! only done when the allocator is next called on a path that checks, in practice the next
//! page freed. A worker that falls quiet after a burst (5,000 tunnels closing at once) so kept
//! their pages resident: RSS stayed 1.3x its level before them, 10 s later and for good,
//! where with immediate purging (`MIMALLOC_PURGE_DELAY=0`) it was 1.0x. Each data-plane
//! worker calls [`give_back`] once a second instead (`Server::on_worker_tick`).
//!
//! [`configure`] has large blocks mapped from the system rather than carved from the arenas,
//! which kept memory resident that nothing uses (sled's zero-filled metrics).

/// Lets mimalloc free this thread's empty pages and purge what is due in the arenas: what
/// `mi_collect(false)` does, a walk of the thread's own non-full pages (microseconds, once a
/// second) and a purge of whatever has waited out its delay.
pub(crate) fn give_back() {
    // SAFETY: `mi_collect` takes no pointer and may be called on any thread at any time; it
    // works on the calling thread's heap and the arenas under the allocator's own locks.
    #[expect(
        unsafe_code,
        reason = "one FFI call with no arguments to the allocator this binary links; a \
                  measured win (RSS after a burst of tunnels 1.3x -> 1.0x) with no safe API"
    )]
    unsafe {
        libmimalloc_sys::mi_collect(false);
    }
}

/// [`give_back`], and more: every empty page of this thread's heap freed at once, not after
/// its delay, and abandoned pages collected. For the main thread, once, when the pool is
/// loaded: it allocates little after that.
pub(crate) fn give_back_all() {
    // SAFETY: as in `give_back`; `force` only makes the same walk free what it finds at once.
    #[expect(
        unsafe_code,
        reason = "one FFI call with a bool argument to the allocator this binary links; a \
                  measured win (RSS of a 10,000-upstream gateway once started) with no safe API"
    )]
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}

/// mimalloc v3's `mi_option_arena_max_object_size` (`mi_option_e` in `mimalloc.h`; the sys
/// crate names only the older options): the largest request, in KiB, it serves from its
/// arenas, past which it maps memory from the system for that request alone.
const OPTION_ARENA_MAX_OBJECT_SIZE: libmimalloc_sys::mi_option_t = 45;
/// That option's default (2 GiB on 64-bit): what it reads when nobody set it, and the check
/// that index 45 is the option meant.
const ARENA_MAX_OBJECT_DEFAULT_KIB: std::ffi::c_long = 2 * 1024 * 1024;
/// Requests past this (and the 4 MiB pages that hold requests of 84-512 KiB) are mapped
/// from the system and unmapped when freed, as glibc does past 128 KiB. The data path's
/// largest blocks (64 KiB relay buffers) stay in the arenas' 512 KiB pages, as before.
const ARENA_MAX_OBJECT_KIB: std::ffi::c_long = 2048;

/// Sets the allocator's options; called first thing in `main`.
///
/// Large blocks are mapped from the system rather than carved from mimalloc's arenas. From
/// an arena a zeroed block is zeroed by hand whenever its memory was used before, which
/// makes every page of it resident: sled zero-fills forty 512 KiB histograms when it opens
/// (its metrics, never written: `no_metrics`), and with upstreams in the store, read while
/// opening, that memory had been used. A gateway with 10,000 upstreams so held 38 MiB once
/// started where 19 MiB are in use (2,500: 21 MiB against 7.5), and mapped memory is
/// resident only where written. An operator's `MIMALLOC_ARENA_MAX_OBJECT_SIZE` wins: the
/// option is set only while it holds its default.
pub(crate) fn configure() {
    // SAFETY: `mi_option_get` and `mi_option_set` take an option index and a value, no
    // pointer; mimalloc reads this option on each large request, so setting it at any time
    // is allowed (it affects later requests only). An index past the enum is ignored by
    // mimalloc (it checks the bound), and the default check keeps a renumbered enum from
    // changing another option.
    #[expect(
        unsafe_code,
        reason = "two FFI calls with integer arguments to the allocator this binary links; \
                  a measured win (RSS of a 10,000-upstream gateway 38 -> 19 MiB) with no \
                  safe API"
    )]
    unsafe {
        if libmimalloc_sys::mi_option_get(OPTION_ARENA_MAX_OBJECT_SIZE)
            == ARENA_MAX_OBJECT_DEFAULT_KIB
        {
            libmimalloc_sys::mi_option_set(OPTION_ARENA_MAX_OBJECT_SIZE, ARENA_MAX_OBJECT_KIB);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The process's anonymous resident memory, from `/proc/self/status`.
    fn rss_anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Pages a thread freed stay resident until the allocator is next called on a path that
    /// purges; `give_back_all` hands them back at once. 64 MiB in 4 KiB blocks, written and
    /// freed on one thread: at least half of it leaves RSS (other tests run beside this one,
    /// hence the margin).
    #[test]
    fn give_back_all_returns_what_this_thread_freed() {
        std::thread::spawn(|| {
            let blocks: Vec<Vec<u8>> = (0..16 * 1024).map(|_| vec![1u8; 4096]).collect();
            assert!(blocks.iter().all(|b| b[4095] == 1));
            drop(blocks);
            let freed = rss_anon_kib();
            give_back_all();
            let after = rss_anon_kib();
            assert!(
                freed.saturating_sub(after) >= 32 * 1024,
                "RssAnon {freed} KiB with 64 MiB freed, {after} KiB after give_back_all"
            );
        })
        .join()
        .unwrap();
    }

    /// Index 45 is the option meant (its default is 2 GiB, no other option's), and
    /// `configure` sets it: a renumbered enum in a newer mimalloc would otherwise leave the
    /// option at its default without a word.
    #[test]
    fn configure_sets_the_arena_object_limit() {
        let get = || {
            // SAFETY: as in `configure`: an integer in, an integer out.
            #[expect(unsafe_code, reason = "reads the allocator option `configure` sets")]
            unsafe {
                libmimalloc_sys::mi_option_get(OPTION_ARENA_MAX_OBJECT_SIZE)
            }
        };
        // An operator's setting in the environment is theirs, and stays.
        let ours = std::env::var_os("MIMALLOC_ARENA_MAX_OBJECT_SIZE").is_none();
        if ours {
            assert_eq!(get(), ARENA_MAX_OBJECT_DEFAULT_KIB);
        }
        configure();
        if ours {
            assert_eq!(get(), ARENA_MAX_OBJECT_KIB);
        }
    }
}
