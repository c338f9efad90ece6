//! The username grammar (`Route::parse`), per username: every authenticated connection's
//! username passes through it (HTTP `Proxy-Authorization`, SOCKS5 RFC 1929, the SOCKS4 user
//! id). A bare account, the hints scrapers send most (a session and a country), every hint at
//! once, and a username refused (the error names the hint, so it allocates).
//!
//! ```text
//! cargo bench -p proxygate-core --bench route
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark: a broken setup must stop it loudly"
)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use proxygate_core::Route;

const USERNAMES: &[(&str, &str, bool)] = &[
    ("account only", "alice", true),
    (
        "session and country",
        "alice-session-a1b2c3d4-country-us",
        true,
    ),
    (
        "every hint",
        "alice-session-s42-ttl-600-country-de-type-socks5-strategy-fastest-minrep-70-tier-verified",
        true,
    ),
    ("refused", "alice-session-a1b2c3d4-colour-blue", false),
];

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("username grammar");
    g.throughput(Throughput::Elements(1));
    for (name, username, ok) in USERNAMES {
        assert_eq!(Route::parse(username).is_ok(), *ok, "{username}");
        g.bench_function(*name, |b| {
            b.iter(|| Route::parse(black_box(username)).is_ok())
        });
    }
    g.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
