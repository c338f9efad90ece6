#![no_main]
//! The proxy-list parsers: the first byte picks the list kind and the default scheme, the rest is
//! the body a source served.

use proxygate_core::Scheme;
use proxygate_sources::Kind;
use proxygate_sources::parse::{Ctx, parse};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((pick, body)) = data.split_first() else {
        return;
    };
    let kind = [
        Kind::Proxyscrape,
        Kind::Geonode,
        Kind::ProxyListDownload,
        Kind::FreeProxyList,
        Kind::Generic,
    ][usize::from(pick % 5)];
    let scheme = [Scheme::Http, Scheme::Socks4, Scheme::Socks5][usize::from(pick / 5 % 3)];
    let ctx = Ctx {
        source: "fuzz",
        scheme,
    };
    let _ = parse(kind, body, ctx, pick & 0x80 != 0);
});
