#![no_main]
//! A credentials envelope: opened as is, and sealed then opened.

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxygate_store::fuzz::envelope(data));
