//! proxygate-tests: the harness for end-to-end tests of the built `proxygate` binary.
//!
//! Everything listens on loopback port 0. Pieces:
//! - [`curl`]: runs the real curl and parses what it got.
//! - [`gateway`]: builds and starts the real binary, learns its port from its log.
//! - [`origin`]: an HTTP(S) origin that echoes what it saw (peer address, method, headers,
//!   body) in response headers.
//! - [`fakes`]: fake upstream proxies of every scheme that record what clients presented and
//!   dial out from their own loopback address (127.0.0.N), so the origin can tell which
//!   upstream a request came through; plus refusing and black-holed upstreams.
//! - [`tls`]: a throwaway CA and certificates (rcgen).
//! - [`lists`]: a list server (proxy lists, any route) and a judge (httpbin, azenv) for the
//!   sources.
//! - [`raw`]: raw bytes on both sides: a recording upstream that parses strictly, a scripted
//!   client.
//! - [`third_party`]: tinyproxy and microsocks from Debian, started on free ports.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test harness: a broken fixture must fail the test loudly"
)]
#![allow(
    unreachable_pub,
    missing_debug_implementations,
    reason = "the harness is used by the integration tests only"
)]

pub mod curl;
pub mod fakes;
pub mod faulty;
pub mod gateway;
pub mod lists;
pub mod origin;
pub mod raw;
pub mod third_party;
pub mod tls;

use std::time::Duration;

/// The id the gateway gives the upstream `url` (as the API and the CLI show it).
pub fn id_of(url: &str) -> String {
    proxygate_core::Upstream::parse(url)
        .unwrap()
        .id()
        .to_string()
}

/// The value of the sample `line_start` (a metric name with its labels) in the Prometheus
/// text `text`.
pub fn sample(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start) && l[line_start.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line_start} not in the scrape:\n{text}"))
}

/// Polls `f` until it returns `Some`, for at most `limit`.
pub async fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the async `f` until it returns `Some`, for at most `limit`.
pub async fn eventually_async<T, F: std::future::Future<Output = Option<T>>>(
    limit: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
