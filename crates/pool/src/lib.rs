//! proxygate-pool: the upstream pool in memory. Pure: no network, no disk.
//!
//! - [`config`]: [`Config`], the `[pool]` section of the config file, and its checks.
//! - [`snapshot`]: [`Snapshot`], an immutable list of [`Entry`]s (upstream + live [`Health`]),
//!   published through an `ArcSwap` so the hot path only `load()`s it.
//! - [`reputation`]: the 0-100 reputation formula, pure, every constant configurable.
//! - [`health`]: per-upstream live stats in atomics (moving averages, failures, uses), the
//!   healthy/probation/backoff policy.
//! - [`latency`]: response-time histograms per upstream ([`latency::Latency`]) and of the
//!   whole pool since the last look ([`latency::Recent`]).
//! - `hot`: the hot table, the part of every upstream's health a pick reads, contiguous.
//! - [`identity`]: exit IPs and trust tiers; exit groups, which round robin, sticky
//!   sessions and new sessions treat as one upstream.
//! - [`sessions`]: the sticky-session table (session key -> pinned upstream, with a TTL).
//! - [`sites`]: per-(upstream, target site) failures, so selection avoids an upstream where it
//!   is blocked while it serves elsewhere.
//! - [`strategy`]: [`Strategy`], the six selection strategies and their pick algorithms.
//! - [`pool`]: [`Pool`] with its [`PoolReader`] (select, hot path) and [`PoolWriter`] (replace
//!   the set of upstreams, switch strategy), and the [`Lease`] that reports an attempt's
//!   [`Outcome`](proxygate_core::Outcome).
//!
//! Time is an argument (`now: Instant`) everywhere policy is decided, so tests drive it.

pub mod config;
pub mod health;
pub(crate) mod hot;
pub mod identity;
pub mod latency;
pub mod pool;
pub mod reputation;
pub mod sessions;
pub mod sites;
pub mod snapshot;
pub mod strategy;

pub use config::Config;
pub use health::{Health, HealthConfig, Saved, State};
pub use identity::{Identity, NewSessionExit};

/// `d` in whole milliseconds, saturating: the pool's clock and its policy times are
/// milliseconds.
pub(crate) fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
pub use pool::{Lease, Pool, PoolReader, PoolWriter};
pub use reputation::{ReputationConfig, selection_weight};
pub use snapshot::{Entry, Snapshot};
pub use strategy::{Strategy, UnknownStrategy};
