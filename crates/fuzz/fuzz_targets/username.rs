#![no_main]
//! A client username with routing hints.

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxygate_gateway::fuzz::username(data));
