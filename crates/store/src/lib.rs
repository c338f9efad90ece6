//! proxygate-store: the durable state in the data dir. sled (0.34) behind an API of our own
//! types: no sled type leaves this crate.
//!
//! - [`config`]: [`Config`], the `[store]` section of the config file.
//! - [`store`]: [`Store`]: open (lock, schema check, key, migrations), records, stats,
//!   settings, key rotation.
//! - [`record`]: [`Record`], [`Stats`], [`Origin`] and their on-disk JSON shapes.
//! - [`crypto`]: AES-256-GCM credential envelopes with key ids; key files and `ENCRYPTION_KEY`.
//! - [`migrate`] (inside `store`): the ordered, idempotent schema migrations.
//! - [`error`]: [`StoreError`], one variant per thing an operator must act on.
//!
//! Blocking: every call does disk I/O (a flush is an fsync). Async callers use
//! `spawn_blocking`.

pub mod config;
pub mod crypto;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod record;
pub mod store;

pub use config::Config;
pub use crypto::{KEY_ENV, KEY_FILE, Key, KeyId, KeyOrigin, Keyring, NEXT_KEY_FILE};
pub use error::StoreError;
pub use record::{CheckRecord, FetchSummary, Origin, Record, SourceStats, Stats};
pub use store::migrate::{self, CURRENT_VERSION};
pub use store::segments::config as sled_config;
pub use store::{OpenReport, RotationProgress, Store};
