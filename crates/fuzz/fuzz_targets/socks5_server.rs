#![no_main]
//! The SOCKS5 server handshake (greeting, RFC 1929, request) as a client sends it.

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxygate_gateway::fuzz::socks5_server(data));
