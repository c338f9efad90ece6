//! The gateway's configuration: `[server]`, `[auth]` and `[dial]` of the root config file.
//!
//! Defaults are the `DEFAULT_*` constants below and match `config/default.toml`.
//! [`Config::validate`] reports every problem at once, each with its key path, before any port
//! is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
pub use proxygate_core::Problem;
use serde::Deserialize;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
pub const DEFAULT_MAX_HEADERS: usize = 100;
pub const DEFAULT_MAX_TARGET_BYTES: usize = 8 * 1024;
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 1024;
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_KEEPALIVE_RELEASE_AFTER: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX_REPLY_HEAD_BYTES: usize = 8 * 1024;
pub const DEFAULT_KEEP_IDLE: Duration = Duration::from_secs(30);
/// Idle upstream connections kept per (upstream, origin) and worker. 16 starved a busy origin:
/// with 1,000 keep-alive clients through three upstreams, connections came back faster than
/// requests took them, and past 16 each was closed and the next request dialled anew (13.1
/// TCP segments per request against 9.1 at 256; `tests/bench/results-2026-11-29.md`).
pub const DEFAULT_KEEP_IDLE_MAX: usize = 256;
pub const DEFAULT_HEDGE_RATIO: f64 = 0.1;
pub const DEFAULT_HEDGE_MIN_DELAY: Duration = Duration::from_millis(100);
pub const DEFAULT_HEDGE_MAX_DELAY: Duration = Duration::from_secs(3);
/// The most data-plane threads `server.workers` may ask for.
pub const MAX_WORKERS: usize = 1024;
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_RETRY_DEADLINE: Duration = Duration::from_secs(15);

/// Everything the data plane needs.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub dial: DialConfig,
    /// The root's top-level `allow_private_networks`: clients may reach private destinations.
    #[serde(skip)]
    pub allow_private_networks: bool,
}

/// Listeners and client-facing limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Addresses to listen on; every one serves HTTP, SOCKS5 and SOCKS4 alike.
    pub listen: Vec<SocketAddr>,
    /// Client networks allowed to connect. Empty: everyone who reaches the port (only safe on
    /// loopback, or with client auth).
    pub allow: Vec<IpNet>,
    /// Concurrent client connections; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Data-plane threads, each with its own single-threaded runtime and its own listener
    /// socket per address (`SO_REUSEPORT`: the kernel spreads new connections over them). 0:
    /// one per CPU.
    pub workers: usize,
    /// Concurrent connections from one client address; more are closed at once.
    pub max_connections_per_ip: usize,
    /// Time for a client to send its request head or SOCKS handshake.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A tunnel with no byte either way for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest request head accepted (answered 431 beyond).
    pub max_header_bytes: usize,
    /// Most header fields in a request head (answered 431 beyond).
    pub max_headers: usize,
    /// Longest request target (answered 414 beyond).
    pub max_target_bytes: usize,
    /// A kept-alive client connection may wait this long for its next request head.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// A kept-alive connection idle this long gives back its HTTP buffers (16 KiB) until its
    /// next request comes. At or past `keepalive_timeout`: never. An upstream connection kept
    /// for reuse (`dial.keep_idle`) idle this long lets go of hyper's client state likewise.
    #[serde(with = "humantime_serde")]
    pub keepalive_release_after: Duration,
    /// How long shutdown waits for open connections before it closes them.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Ports a tunnel (CONNECT, SOCKS) may reach: ports and "low-high" ranges, or "*".
    pub connect_ports: crate::policy::Ports,
    /// Bulk transfers between two plain TCP connections move through a pipe (`splice(2)`,
    /// Linux) rather than a buffer: no copy through the process. False: always copied.
    pub splice: bool,
}

/// Client authentication.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// A file of `name:$argon2id$...` lines (`proxygate user add`). When set, every client
    /// must authenticate (HTTP `Proxy-Authorization: Basic`, SOCKS5 RFC 1929). SOCKS4 cannot
    /// carry a password and is refused then.
    pub users_file: Option<PathBuf>,
}

/// Dialing upstreams.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DialConfig {
    /// TCP (and TLS) connect to an upstream.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The upstream's proxy handshake (CONNECT reply, SOCKS replies).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// From an absolute-form request sent to its response head.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Upstreams tried for one client request, the first included.
    pub max_attempts: u32,
    /// All attempts for one client request must end within this.
    #[serde(with = "humantime_serde")]
    pub retry_deadline: Duration,
    /// Largest reply head read from an upstream (CONNECT answer, forwarded response head).
    pub max_reply_head_bytes: usize,
    /// Extra PEM certificates trusted for HTTPS upstreams, besides the Mozilla roots.
    pub tls_ca_file: Option<PathBuf>,
    /// Which upstream an absolute-form request goes through: `connection` (the upstream the
    /// client connection's first request took, while it stays usable: one exit per client
    /// connection) or `request` (every request picks by the strategy).
    pub rotate: Rotate,
    /// How long an idle upstream connection is kept for a later absolute-form request to the
    /// same origin through the same upstream (any client connection of the same worker);
    /// `0s`: never reused, a new upstream connection per request.
    #[serde(with = "humantime_serde")]
    pub keep_idle: Duration,
    /// Idle upstream connections kept per (upstream, origin), per worker.
    pub keep_idle_max: usize,
    /// When plain-HTTP requests through an HTTP(S) upstream go in a CONNECT tunnel to the
    /// origin (origin-form requests, the connection kept and reused like any other) rather than
    /// in absolute form to the proxy.
    pub tunnel_plain_http: TunnelPlain,
    /// Hedged connects (CONNECT and SOCKS tunnels): an attempt whose upstream handshake has not
    /// completed within the pool's recent p95 of handshake time (bounded by `hedge_min_delay`
    /// and `hedge_max_delay`) gets a second attempt on another upstream; whichever completes
    /// first serves. At most one hedge per request, and at most this share of attempts
    /// (a budget, so a slow pool is not doubled); 0 turns hedging off.
    pub hedge_ratio: f64,
    #[serde(with = "humantime_serde")]
    pub hedge_min_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub hedge_max_delay: Duration,
    /// The least trust tier of the upstreams a client is routed through when its username
    /// names none (`-tier-verified`): untrusted (every upstream), verified or operator.
    pub min_tier: proxygate_core::Tier,
}

/// `dial.tunnel_plain_http`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelPlain {
    /// With reuse on (`keep_idle` > 0): through an upstream that wants credentials (so that a
    /// kept connection never carries them: a proxy that pipes a kept-alive connection to its
    /// first origin would hand them to the origin) and through one seen closing its connection
    /// after every request. An upstream that refuses such a tunnel gets absolute form again.
    #[default]
    Auto,
    /// Never: absolute form; connections to upstreams that want credentials are not kept.
    Never,
    /// Always (unless the upstream refuses the tunnel).
    Always,
}

/// `dial.rotate`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rotate {
    /// A client connection keeps the upstream its first request took.
    #[default]
    Connection,
    /// Every request picks its upstream.
    Request,
}

impl ServerConfig {
    /// The data-plane threads to run: `workers`, or one per CPU when it is 0.
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: vec![default_listen()],
            allow: Vec::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            workers: 0,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_target_bytes: DEFAULT_MAX_TARGET_BYTES,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            keepalive_release_after: DEFAULT_KEEPALIVE_RELEASE_AFTER,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            connect_ports: crate::policy::Ports::default(),
            splice: true,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

impl Default for DialConfig {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            retry_deadline: DEFAULT_RETRY_DEADLINE,
            max_reply_head_bytes: DEFAULT_MAX_REPLY_HEAD_BYTES,
            tls_ca_file: None,
            rotate: Rotate::Connection,
            keep_idle: DEFAULT_KEEP_IDLE,
            keep_idle_max: DEFAULT_KEEP_IDLE_MAX,
            tunnel_plain_http: TunnelPlain::Auto,
            hedge_ratio: DEFAULT_HEDGE_RATIO,
            hedge_min_delay: DEFAULT_HEDGE_MIN_DELAY,
            hedge_max_delay: DEFAULT_HEDGE_MAX_DELAY,
            min_tier: proxygate_core::Tier::Untrusted,
        }
    }
}

impl Config {
    /// The destination policy this config describes.
    pub fn policy(&self) -> crate::policy::Policy {
        crate::policy::Policy {
            ports: self.server.connect_ports.clone(),
            allow_private: self.allow_private_networks,
        }
    }

    /// Every problem with this config, empty when it is valid. Files it names are checked
    /// for existence here; their content is checked when loaded.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let s = &self.server;
        if s.listen.is_empty() {
            problems.push(Problem::new("server.listen", "needs at least one address"));
        }
        let open = self.auth.users_file.is_none() && s.allow.is_empty();
        for addr in &s.listen {
            if open && !addr.ip().is_loopback() {
                problems.push(Problem::new(
                    "server.listen",
                    format!(
                        "{addr} is not a loopback address: set auth.users_file (client \
                         authentication) or server.allow (client networks), or proxygate \
                         would be an open proxy"
                    ),
                ));
            }
        }
        if s.max_connections == 0 {
            problems.push(Problem::new("server.max_connections", "must be at least 1"));
        }
        if s.workers > MAX_WORKERS {
            problems.push(Problem::new(
                "server.workers",
                format!("at most {MAX_WORKERS} (0: one per CPU)"),
            ));
        }
        if s.max_header_bytes < 1024 {
            problems.push(Problem::new(
                "server.max_header_bytes",
                "must be at least 1024",
            ));
        }
        if s.max_connections_per_ip == 0 {
            problems.push(Problem::new(
                "server.max_connections_per_ip",
                "must be at least 1",
            ));
        }
        if s.max_headers < 8 {
            problems.push(Problem::new("server.max_headers", "must be at least 8"));
        }
        if s.max_target_bytes < 256 {
            problems.push(Problem::new(
                "server.max_target_bytes",
                "must be at least 256",
            ));
        }
        if self.dial.max_reply_head_bytes < 1024 {
            problems.push(Problem::new(
                "dial.max_reply_head_bytes",
                "must be at least 1024",
            ));
        }
        for (key, d) in [
            ("server.header_read_timeout", s.header_read_timeout),
            ("server.idle_timeout", s.idle_timeout),
            ("server.keepalive_timeout", s.keepalive_timeout),
            ("server.keepalive_release_after", s.keepalive_release_after),
            ("dial.connect_timeout", self.dial.connect_timeout),
            ("dial.handshake_timeout", self.dial.handshake_timeout),
            ("dial.response_timeout", self.dial.response_timeout),
            ("dial.retry_deadline", self.dial.retry_deadline),
        ] {
            if d.is_zero() {
                problems.push(Problem::new(key, "must be longer than 0"));
            }
        }
        if self.dial.max_attempts == 0 {
            problems.push(Problem::new("dial.max_attempts", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.dial.hedge_ratio) {
            problems.push(Problem::new("dial.hedge_ratio", "must be in [0, 1]"));
        }
        if self.dial.hedge_min_delay.is_zero() {
            problems.push(Problem::new(
                "dial.hedge_min_delay",
                "must be longer than 0",
            ));
        }
        if self.dial.hedge_max_delay < self.dial.hedge_min_delay {
            problems.push(Problem::new(
                "dial.hedge_max_delay",
                "must be at least dial.hedge_min_delay",
            ));
        }
        for (key, path) in [
            ("auth.users_file", &self.auth.users_file),
            ("dial.tls_ca_file", &self.dial.tls_ca_file),
        ] {
            if let Some(p) = path
                && !p.is_file()
            {
                problems.push(Problem::new(
                    key,
                    format!("{} does not exist or is not a file", p.display()),
                ));
            }
        }
        if let Some(p) = &self.auth.users_file
            && p.is_file()
            && let Err(e) = crate::auth::ClientAuth::load_users(p)
        {
            problems.push(Problem::new("auth.users_file", e.to_string()));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_loopback() {
        let c = Config::default();
        assert!(c.validate().is_empty());
        assert_eq!(c.server.listen, vec![DEFAULT_LISTEN.parse().unwrap()]);
    }

    #[test]
    fn public_bind_needs_auth_or_allow_list() {
        let mut c = Config::default();
        c.server.listen = vec!["0.0.0.0:8080".parse().unwrap()];
        let p = c.validate();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].key, "server.listen");
        assert!(p[0].reason.contains("open proxy"));
        c.server.allow = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(c.validate().is_empty());
    }

    #[test]
    fn reports_every_problem() {
        let mut c = Config::default();
        c.server.max_connections = 0;
        c.dial.max_attempts = 0;
        c.dial.connect_timeout = Duration::ZERO;
        c.dial.tls_ca_file = Some("/nonexistent/ca.pem".into());
        c.dial.hedge_ratio = 1.5;
        c.dial.hedge_max_delay = Duration::from_millis(10);
        let keys: Vec<_> = c.validate().into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "server.max_connections",
                "dial.connect_timeout",
                "dial.max_attempts",
                "dial.hedge_ratio",
                "dial.hedge_max_delay",
                "dial.tls_ca_file"
            ]
        );
    }
}
