#![no_main]
//! The HTTP front end: first head, then hyper and our per-request checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxygate_gateway::fuzz::http_server(data));
