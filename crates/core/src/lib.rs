//! proxygate-core: the vocabulary every other proxygate crate speaks.
//!
//! No sockets and no disk live here, only types and pure functions:
//!
//! - [`target`]: where a client wants to go ([`Target`], [`Host`]), parsed from `host:port`.
//! - [`upstream`]: an upstream proxy ([`Upstream`], [`Scheme`], [`UpstreamId`]), parsed from
//!   `scheme://user:pass@host:port` URLs.
//! - [`secret`]: [`Secret`], a credential that never prints and is zeroized on drop.
//! - [`error`]: [`ErrorKind`] and [`Side`], the closed set of ways an attempt fails and whose
//!   fault it was. Only [`Side::Upstream`] failures may cost an upstream its reputation.
//! - [`outcome`]: [`Outcome`], the measurement of one attempt through one upstream.
//! - [`route`]: [`Route`], the routing hints a client's username carries.
//! - [`shutdown`]: [`Shutdown`], the one signal every task selects on.
//! - [`net`]: [`net::is_private`], which addresses are not the public internet.
//! - [`config`]: [`Problem`] and [`ConfigErrors`], and [`config::section`], which every crate's
//!   config section is read with.

pub mod config;
pub mod error;
pub mod net;
pub mod outcome;
pub mod route;
pub mod secret;
pub mod shutdown;
pub mod target;
pub mod upstream;

pub use config::{ConfigErrors, Problem};
pub use error::{ErrorKind, Side};
pub use outcome::Outcome;
pub use route::{Route, RouteError, Tier};
pub use secret::Secret;
pub use shutdown::{Shutdown, ShutdownTrigger};
pub use target::{Host, Target, TargetParseError};
pub use upstream::{Credentials, ProxyType, Scheme, Upstream, UpstreamId, UpstreamParseError};
