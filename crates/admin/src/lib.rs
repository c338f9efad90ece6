//! proxygate-admin: the control plane. Everything an operator does to a running (or stopped)
//! gateway goes through here, and everything an operator sees comes from here.
//!
//! - [`catalog`]: [`Catalog`], the typed operator operations (add, import, list, show,
//!   remove, disable, enable, export, strategy) over the store and the live pool.
//! - [`ops`]: [`Op`] and [`ops::execute`]: the operations as the CLI runs and prints them
//!   (offline, or through the control socket).
//! - [`control`]: the control socket `<data-dir>/control.sock`.
//! - [`api`]: the admin listener: `/metrics`, `/livez`, `/readyz` and the JSON API
//!   (`openapi.yaml` beside this crate describes it).
//! - [`persister`]: live stats written behind to the store.
//! - [`keys`]: key rotation, offline or live.
//! - [`janitor`]: disables list upstreams dead for long, deletes ones unused for long.
//! - [`sources`]: [`sources::SourcesRuntime`]: candidates checked and merged, source quality,
//!   re-checks of pool members.
//! - [`stats`]: the last 5 minutes, hour and day of the pool's attempts.
//! - [`metrics`]: the registry, the pool's scrape-time gauges, the store's flush latency.
//! - [`config`]: [`config::Config`], the `[admin]` section.
//!
//! Dependency direction: `core + pool + store + sources <- admin <- proxygate`; the data
//! plane (gateway) knows nothing of it, and `sources` knows neither store nor pool: the
//! control plane moves candidates between them.

pub mod api;
pub mod catalog;
pub mod config;
pub mod control;
pub mod janitor;
pub mod keys;
pub mod metrics;
pub mod ops;
pub mod persister;
pub mod sources;
pub mod stats;

pub use catalog::{Catalog, OpError};
pub use ops::{Op, Reply};

use proxygate_core::Shutdown;

/// `d` in whole milliseconds, saturating.
pub fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs `f` every `period` (the first time after one period) until shutdown.
pub async fn every<F: std::future::Future<Output = ()>>(
    period: std::time::Duration,
    mut shutdown: Shutdown,
    mut f: impl FnMut() -> F,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => f().await,
            () = shutdown.wait() => return,
        }
    }
}
