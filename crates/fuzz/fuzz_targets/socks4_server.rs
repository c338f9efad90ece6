#![no_main]
//! The SOCKS4/4a server request as a client sends it.

libfuzzer_sys::fuzz_target!(|data: &[u8]| proxygate_gateway::fuzz::socks4_server(data));
