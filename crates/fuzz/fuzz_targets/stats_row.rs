#![no_main]
//! A stored stats row as read back at load (binary, or schema 4's JSON).

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxygate_store::fuzz::stats_row(data));
