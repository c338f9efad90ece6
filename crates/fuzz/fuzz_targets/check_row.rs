#![no_main]
//! A stored check row as read back at load (binary, or the JSON before schema 6).

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxygate_store::fuzz::check_row(data));
