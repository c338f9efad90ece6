//! [`Metrics`]: the data plane's Prometheus metrics, registered on the registry the app hands
//! in (never the global one).
//!
//! Every label value comes from a closed set (protocols, [`ErrorKind`], [`Strategy`]) and
//! every series is created at registration, so the number of series never depends on
//! traffic or on the pool's size. There is no per-upstream label: per-upstream detail is the
//! admin API's. Counting is one relaxed atomic add on an already resolved series: no label
//! lookup, no lock on the data path.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use proxygate_core::ErrorKind;
use proxygate_pool::Strategy;

/// How a client reached us, as `proxygate_client_connections_total{protocol}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Socks5,
    Socks4,
    /// A first byte that is none of the above.
    Unknown,
}

impl Protocol {
    const ALL: [Protocol; 4] = [
        Protocol::Http,
        Protocol::Socks5,
        Protocol::Socks4,
        Protocol::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Socks5 => "socks5",
            Protocol::Socks4 => "socks4",
            Protocol::Unknown => "unknown",
        }
    }
}

/// What a client asked for, as `proxygate_client_requests_total{protocol}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// HTTP `CONNECT`.
    HttpConnect,
    /// An absolute-form HTTP request.
    HttpForward,
    /// An HTTP request head refused before its method was known (malformed, too large, too
    /// slow).
    Http,
    Socks5,
    Socks4,
}

impl RequestKind {
    const ALL: [RequestKind; 5] = [
        RequestKind::HttpConnect,
        RequestKind::HttpForward,
        RequestKind::Http,
        RequestKind::Socks5,
        RequestKind::Socks4,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::HttpConnect => "http_connect",
            RequestKind::HttpForward => "http_forward",
            RequestKind::Http => "http",
            RequestKind::Socks5 => "socks5",
            RequestKind::Socks4 => "socks4",
        }
    }
}

/// Outcomes per request kind: `ok`, then one per [`ErrorKind`].
const OUTCOMES: usize = ErrorKind::ALL.len() + 1;

/// Histogram buckets for upstream timings, seconds: from 1 ms to past the longest default
/// timeout (`dial.response_timeout`, 60 s), so a timed-out attempt lands in a bucket of its
/// own rather than in `+Inf` with the slow ones.
pub const TIMING_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The data plane's metrics.
#[derive(Debug)]
pub struct Metrics {
    connections: Vec<IntCounter>,
    /// `[request kind][outcome]`, outcome 0 = ok, 1 + [`ErrorKind::index`] otherwise.
    requests: Vec<IntCounter>,
    active_connections: IntGauge,
    active_tunnels: IntGauge,
    parked_connections: IntGauge,
    bytes_up: IntCounter,
    bytes_down: IntCounter,
    connect: Histogram,
    handshake: Histogram,
    first_byte: Histogram,
    attempts: IntCounter,
    retries: IntCounter,
    failures: Vec<IntCounter>,
    selections: Vec<IntCounter>,
    /// Hedged connects: `[won, lost]` (the hedge served, or the first attempt did).
    hedges: [IntCounter; 2],
    kept: KeptMetrics,
}

/// Upstream connection reuse, as each data-plane worker adds its own figures in once a second
/// (`http::reuse::publish`): nothing on the request path touches them.
#[derive(Debug, Clone)]
pub(crate) struct KeptMetrics {
    /// Idle upstream connections kept for reuse with hyper's client state on them.
    pub(crate) live: IntGauge,
    /// Those that let it go (idle past `server.keepalive_release_after`): the bare socket.
    pub(crate) parked: IntGauge,
    /// Requests that went out on a kept connection rather than a new one.
    pub(crate) reused: IntCounter,
}

/// What the registry collects from (the series of [`Metrics`] are their children).
type Collectors = Vec<Box<dyn prometheus::core::Collector>>;

/// So that a relay can count into a `&Metrics` as well as into one it reaches through the
/// gateway it owns ([`crate::relay::relay`]).
impl AsRef<Metrics> for Metrics {
    fn as_ref(&self) -> &Metrics {
        self
    }
}

impl Metrics {
    /// Registers every series on `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Arc<Metrics>> {
        let (m, collectors) = Self::build()?;
        for c in collectors {
            registry.register(c)?;
        }
        Ok(Arc::new(m))
    }

    /// Metrics registered nowhere (tests, benchmarks).
    pub fn unregistered() -> Arc<Metrics> {
        match Self::build() {
            Ok((m, _)) => Arc::new(m),
            // The names and labels are static: building cannot fail.
            Err(e) => unreachable!("static metric definitions: {e}"),
        }
    }

    fn build() -> prometheus::Result<(Metrics, Collectors)> {
        let counters = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let connections = counters(
            "proxygate_client_connections_total",
            "Client connections accepted, by the protocol their first byte chose.",
            &["protocol"],
        )?;
        let requests = counters(
            "proxygate_client_requests_total",
            "Client requests (tunnels and forwarded requests) by protocol and outcome (ok, or \
             the error kind the client was answered with).",
            &["protocol", "outcome"],
        )?;
        let bytes = counters(
            "proxygate_bytes_total",
            "Bytes relayed, by direction (up: client to target, down: target to client).",
            &["direction"],
        )?;
        let failures = counters(
            "proxygate_upstream_failures_total",
            "Failed attempts through an upstream, by error kind.",
            &["kind"],
        )?;
        let selections = counters(
            "proxygate_selections_total",
            "Upstreams selected for an attempt, by the strategy that chose them.",
            &["strategy"],
        )?;
        let histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(TIMING_BUCKETS.to_vec()))
        };
        let active_connections = IntGauge::new(
            "proxygate_active_connections",
            "Client connections open now.",
        )?;
        let active_tunnels = IntGauge::new(
            "proxygate_active_tunnels",
            "Tunnels (CONNECT and SOCKS) relaying now.",
        )?;
        let parked_connections = IntGauge::new(
            "proxygate_parked_connections",
            "Kept-alive HTTP client connections idle past server.keepalive_release_after now: \
             waiting for their next request without HTTP buffers.",
        )?;
        let connect = histogram(
            "proxygate_upstream_connect_seconds",
            "TCP (and TLS) connect time to an upstream, of successful connects.",
        )?;
        let handshake = histogram(
            "proxygate_upstream_handshake_seconds",
            "Upstream proxy handshake time (CONNECT or SOCKS reply), of successful ones.",
        )?;
        let first_byte = histogram(
            "proxygate_upstream_first_byte_seconds",
            "From the request sent through an upstream to the first byte back.",
        )?;
        let attempts = IntCounter::new(
            "proxygate_upstream_attempts_total",
            "Attempts through an upstream (first tries and retries).",
        )?;
        let retries = IntCounter::new(
            "proxygate_upstream_retries_total",
            "Attempts that retried a client request on another upstream.",
        )?;
        let hedges = counters(
            "proxygate_upstream_hedges_total",
            "Hedged connects: a second attempt started because the first was slower than the \
             pool's recent p95; won: the hedge served the client, lost: the first attempt did.",
            &["result"],
        )?;
        let kept = IntGaugeVec::new(
            Opts::new(
                "proxygate_upstream_kept_connections",
                "Idle upstream connections kept for reuse by later absolute-form requests, by \
                 state: live (an HTTP client on it) or parked (idle past \
                 server.keepalive_release_after: the bare socket). Each worker updates its \
                 share once a second.",
            ),
            &["state"],
        )?;
        let reused = IntCounter::new(
            "proxygate_upstream_reused_total",
            "Absolute-form requests sent on a kept upstream connection rather than a new one \
             (each new one is an attempt: proxygate_upstream_attempts_total). Each worker adds \
             its count once a second.",
        )?;
        let outcomes = || std::iter::once("ok").chain(ErrorKind::ALL.iter().map(|e| e.as_str()));
        let collectors: Collectors = vec![
            Box::new(connections.clone()),
            Box::new(requests.clone()),
            Box::new(bytes.clone()),
            Box::new(failures.clone()),
            Box::new(selections.clone()),
            Box::new(active_connections.clone()),
            Box::new(active_tunnels.clone()),
            Box::new(parked_connections.clone()),
            Box::new(connect.clone()),
            Box::new(handshake.clone()),
            Box::new(first_byte.clone()),
            Box::new(attempts.clone()),
            Box::new(retries.clone()),
            Box::new(hedges.clone()),
            Box::new(kept.clone()),
            Box::new(reused.clone()),
        ];
        let m = Metrics {
            connections: Protocol::ALL
                .iter()
                .map(|p| connections.with_label_values(&[p.as_str()]))
                .collect(),
            requests: RequestKind::ALL
                .iter()
                .flat_map(|k| outcomes().map(move |o| (k.as_str(), o)))
                .map(|(k, o)| requests.with_label_values(&[k, o]))
                .collect(),
            bytes_up: bytes.with_label_values(&["up"]),
            bytes_down: bytes.with_label_values(&["down"]),
            failures: ErrorKind::ALL
                .iter()
                .map(|k| failures.with_label_values(&[k.as_str()]))
                .collect(),
            selections: Strategy::ALL
                .iter()
                .map(|s| selections.with_label_values(&[s.as_str()]))
                .collect(),
            active_connections,
            active_tunnels,
            parked_connections,
            connect,
            handshake,
            first_byte,
            attempts,
            retries,
            hedges: [
                hedges.with_label_values(&["won"]),
                hedges.with_label_values(&["lost"]),
            ],
            kept: KeptMetrics {
                live: kept.with_label_values(&["live"]),
                parked: kept.with_label_values(&["parked"]),
                reused,
            },
        };
        Ok((m, collectors))
    }

    /// A client connection accepted; the guard counts it open until dropped.
    pub fn connection(&self, protocol: Protocol) -> GaugeGuard {
        self.connections[protocol as usize].inc();
        GaugeGuard::new(&self.active_connections)
    }

    /// A tunnel starts relaying; the guard counts it active until dropped.
    pub fn tunnel(&self) -> GaugeGuard {
        GaugeGuard::new(&self.active_tunnels)
    }

    /// Where the workers add their upstream connection reuse figures.
    pub(crate) fn kept(&self) -> &KeptMetrics {
        &self.kept
    }

    /// A kept-alive connection let go of its HTTP buffers; the guard counts it parked until
    /// dropped.
    pub fn parked(&self) -> GaugeGuard {
        GaugeGuard::new(&self.parked_connections)
    }

    /// One client request ended: `None` served, or the error kind it was answered with.
    pub fn request(&self, kind: RequestKind, error: Option<ErrorKind>) {
        let outcome = error.map_or(0, |e| 1 + e.index());
        self.requests[kind as usize * OUTCOMES + outcome].inc();
    }

    /// Bytes relayed, counted as they move.
    pub fn bytes(&self, up: u64, down: u64) {
        if up > 0 {
            self.bytes_up.inc_by(up);
        }
        if down > 0 {
            self.bytes_down.inc_by(down);
        }
    }

    /// The counters a relay adds to as bytes move (up, down).
    pub fn byte_counters(&self) -> (&IntCounter, &IntCounter) {
        (&self.bytes_up, &self.bytes_down)
    }

    /// An attempt through an upstream starts; `retry` when it is not the request's first.
    pub fn attempt(&self, strategy: Strategy, retry: bool) {
        self.attempts.inc();
        if retry {
            self.retries.inc();
        }
        self.selections[strategy as usize].inc();
    }

    /// A hedged connect ended: `won` when the hedge served the client.
    pub fn hedge(&self, won: bool) {
        self.hedges[usize::from(!won)].inc();
    }

    /// An attempt failed with `kind`.
    pub fn failure(&self, kind: ErrorKind) {
        self.failures[kind.index()].inc();
    }

    /// An attempt connected (and, when `handshake` is given, finished its proxy handshake).
    pub fn established(&self, connect: Duration, handshake: Option<Duration>) {
        self.connect.observe(connect.as_secs_f64());
        if let Some(h) = handshake {
            self.handshake.observe(h.as_secs_f64());
        }
    }

    /// Time to the first byte back through an upstream.
    pub fn first_byte(&self, d: Duration) {
        self.first_byte.observe(d.as_secs_f64());
    }
}

/// Counts one thing open in a gauge until dropped.
#[derive(Debug)]
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    fn new(g: &IntGauge) -> GaugeGuard {
        g.inc();
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_exists_before_any_traffic() {
        let registry = Registry::new();
        let m = Metrics::register(&registry).unwrap();
        let count = |r: &Registry| -> usize {
            r.gather()
                .iter()
                .map(|f| f.get_metric().len())
                .sum::<usize>()
        };
        let before = count(&registry);
        assert_eq!(
            before,
            4 + 5 * OUTCOMES + 2 + ErrorKind::ALL.len() + Strategy::ALL.len() + 3 + 3 + 2 + 2 + 3
        );
        m.request(RequestKind::Socks4, Some(ErrorKind::Internal));
        m.request(RequestKind::HttpConnect, None);
        m.failure(ErrorKind::UpstreamIo);
        m.attempt(Strategy::Random, true);
        let _open = m.connection(Protocol::Unknown);
        let _parked = m.parked();
        assert_eq!(count(&registry), before, "traffic adds no series");
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        for line in [
            "proxygate_client_requests_total{outcome=\"internal\",protocol=\"socks4\"} 1",
            "proxygate_client_requests_total{outcome=\"ok\",protocol=\"http_connect\"} 1",
            "proxygate_upstream_failures_total{kind=\"upstream_io\"} 1",
            "proxygate_selections_total{strategy=\"random\"} 1",
            "proxygate_upstream_retries_total 1",
            "proxygate_active_connections 1",
            "proxygate_parked_connections 1",
            "proxygate_client_connections_total{protocol=\"unknown\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
