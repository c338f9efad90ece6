#![no_main]
//! An HTTP upstream's answer to CONNECT.

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxygate_gateway::fuzz::upstream_connect_reply(data));
