//! proxygate-sources: where upstreams come from when no operator types them. List sources
//! (ProxyScrape, Geonode, proxy-list.download, the free-proxy-list.net family, any URL or file),
//! their parsers, the checker that validates a candidate through itself, and the refresher
//! that fetches on a schedule. It knows neither the store nor the pool: it hands batches of
//! candidates to the app (`proxygate-admin` merges them).
//!
//! - [`config`]: `[[sources]]`, `[checker]`, `[refresh]`, and the embedded public defaults.
//! - [`candidate`]: [`Candidate`], [`Anonymity`].
//! - [`parse`]: the list formats, pure; broken bodies are errors, never empty lists.
//! - [`fetch`]: [`fetch::Fetcher`]: requests, paging, retries, caps, the private-address filter.
//! - [`integrity`]: certificate and body comparisons that catch tampering upstreams.
//! - [`judge`]: judge answers (httpbin, azenv) and the anonymity verdict, pure.
//! - [`checker`]: [`checker::Checker`]: a check through the upstream itself, over the gateway's
//!   dialers ([`checker::Connect`]).
//! - [`quality`]: low-yield sources are fetched less often and checked last.
//! - [`refresher`]: the background fetch loop.
//! - [`metrics`]: per-source Prometheus series.

pub mod candidate;
pub mod checker;
pub mod config;
pub mod fetch;
pub mod integrity;
pub mod judge;
pub mod metrics;
pub mod parse;
pub mod quality;
pub mod refresher;

pub use candidate::{Anonymity, Candidate};
pub use config::{CheckerConfig, Kind, RefreshConfig, SourceConfig};

/// `d` in whole milliseconds, saturating.
pub(crate) fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
