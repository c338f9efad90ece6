#![no_main]
//! A config file: every section, then the semantic checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxygate::fuzz::config(data));
