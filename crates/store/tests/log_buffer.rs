//! sled writes its log through an IO buffer the size of one segment (16 MiB here), filled from
//! its start and replaced only when the segment is full. Its written part used to stay resident
//! until then: a sawtooth of up to 16 MiB in a gateway's RSS (results-2026-11-30.md, "A pool's
//! memory in long use"). The sled this workspace builds gives those pages back once they are in
//! the log file (crates/sled/PROXYGATE.md). Its own test binary: RSS is the process's, and no
//! other test may allocate beside it.

use proxygate_store::Store;

/// The process's anonymous resident memory, from `/proc/self/status`.
fn rss_anon_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[test]
fn the_log_buffer_gives_back_what_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), None).unwrap();
    store.flush().unwrap();
    // ~10 MB through the log, flushed every ~500 KB as the persister and sled's flusher do:
    // less than a segment, so the buffer is never replaced meanwhile.
    let filler = "x".repeat(1000);
    let before = rss_anon_kib().unwrap();
    for i in 0..10_000 {
        store
            .set_setting("filler", Some(&format!("{i} {filler}")))
            .unwrap();
        if i % 500 == 499 {
            store.flush().unwrap();
        }
    }
    store.flush().unwrap();
    let grown = rss_anon_kib().unwrap().saturating_sub(before);
    assert!(
        grown < 4 * 1024,
        "RssAnon grew by {grown} KiB while ~10 MB went through the log: its buffer stays resident"
    );
    assert_eq!(
        store.setting("filler").unwrap().as_deref(),
        Some(format!("9999 {filler}").as_str())
    );
}
