#![no_main]
//! A stored upstream record as read back at load (JSON, sealed credentials).

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxygate_store::fuzz::sealed_record(data));
