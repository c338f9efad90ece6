#![no_main]
//! A SOCKS5 (with or without password) or SOCKS4a upstream's replies.

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxygate_gateway::fuzz::upstream_socks_reply(data));
