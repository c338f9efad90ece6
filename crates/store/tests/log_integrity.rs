//! The sled this workspace builds gives back the pages of its log buffer once they are in the
//! log file (crates/sled/PROXYGATE.md). Were a page given back before its bytes were written,
//! the log would hold zeros there and the database would lose everything from that point at
//! the next open (sled stops at the first message whose checksum fails). Several writers across
//! several segments, flushing as they go, then a reopen that must find every value.

use std::sync::Arc;

use proxygate_store::Store;

const WRITERS: usize = 4;
const EACH: usize = 10_000;

fn value(w: usize, i: usize) -> String {
    // ~1 KB, different for every key, so a zeroed page cannot pass for the right bytes.
    format!("{w}:{i}:{}", "abcdefghij".repeat(100 + (w * 7 + i) % 13))
}

#[test]
fn every_write_survives_a_reopen_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = Store::open(dir.path(), None).unwrap();
        let store = Arc::new(store);
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        store
                            .set_setting(&format!("k{w}-{i}"), Some(&value(w, i)))
                            .unwrap();
                        if i % 200 == 199 {
                            store.flush().unwrap();
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        store.flush().unwrap();
    }
    // ~40 MB written: more than two 16 MiB segments.
    let (store, _) = Store::open(dir.path(), None).unwrap();
    for w in 0..WRITERS {
        for i in 0..EACH {
            assert_eq!(
                store.setting(&format!("k{w}-{i}")).unwrap(),
                Some(value(w, i)),
                "key k{w}-{i} after a reopen"
            );
        }
    }
}
