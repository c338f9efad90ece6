//! proxygate-gateway: the data plane.
//!
//! One port serves every client protocol; the first byte picks the codec. Each connection
//! selects an upstream from the pool, dials it (retrying on another upstream while nothing has
//! gone back to the client), answers the client and relays bytes with idle timeouts. Every
//! attempt's [`Outcome`](proxygate_core::Outcome) goes back to the pool through its lease.
//!
//! - [`config`]: [`Config`] for listeners, client limits, client auth and dialing.
//! - [`error`]: [`GatewayError`], a kind plus a secret-free detail, and how each kind is told
//!   to clients (HTTP status + `Proxy-Status`, SOCKS reply code).
//! - [`auth`]: client authentication (Basic / RFC 1929) and the client allow-list.
//! - [`metrics`]: [`Metrics`], the data plane's Prometheus series (no per-upstream label).
//! - [`policy`]: where clients may go (tunnel ports, private destinations).
//! - [`io`]: [`io::Rewind`] (replays bytes already read) and the boxed stream type.
//! - [`dial`]: upstream connectors for every scheme, and the retrying [`dial::Dialer`];
//!   `socks5_client`, the SOCKS5 handshake with an upstream (SOCKS4 goes through tokio-socks).
//! - `head`: the short way through a tunnel's two HTTP heads (the client's CONNECT, the
//!   upstream's reply), held to httparse's reading.
//! - [`tls`]: rustls client config for HTTPS upstreams.
//! - [`relay`]: bidirectional copy with an idle timeout and byte counts.
//! - [`http`]: the HTTP/1.1 front end (CONNECT and absolute-form), on hyper.
//! - [`socks`]: the SOCKS5 and SOCKS4/4a front end.
//! - [`gateway`]: [`Gateway`], the state every connection shares (swapped whole on a
//!   reload), a connection's slot, and the tunnel a handshake hands back.
//! - [`server`]: listeners, first-byte detection, connection limits, graceful drain, the
//!   workers' housekeeping tick.
//! - `spares`, `splice`: per-thread spare buffers and pipes; `splice(2)` between TCP sockets.

pub mod auth;
#[doc(hidden)]
pub mod bench;
pub mod config;
pub mod dial;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod gateway;
mod head;
pub mod http;
pub mod io;
pub mod metrics;
pub mod policy;
pub mod relay;
pub mod server;
pub mod socks;
mod socks5_client;
mod spares;
#[cfg(target_os = "linux")]
mod splice;
pub mod tls;

pub use config::Config;
pub use error::GatewayError;
pub use gateway::{Gateway, Live, Staged};
pub use metrics::Metrics;
pub use server::Server;
