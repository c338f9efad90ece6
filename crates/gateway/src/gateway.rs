//! The state every connection shares and what one connection holds: [`Gateway`] (config,
//! client auth, dialer, metrics), swapped whole on a reload through [`Live`]; a connection's
//! [`ConnectionSlot`]; what its first read hands the protocol that serves it ([`Opened`]); and
//! the [`Tunnel`] a handshake hands back, which reports to the pool when it ends. The listeners
//! (`server`) and both front ends (`http`, `socks`) build on this file; it imports none of them.
//!
//! A reload ([`Live::apply`]) swaps the whole [`Gateway`] snapshot: a connection keeps the
//! configuration it was accepted under (limits, timeouts, destination policy, dial settings)
//! and new connections get the new one, so nothing open is dropped. Accounts and the
//! allow-list are read afresh on every check, so a removed account is refused on its next
//! request even on a kept-alive connection.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use proxygate_core::{ErrorKind, Outcome, Shutdown};
use proxygate_pool::PoolReader;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::auth::ClientAuth;
use crate::dial::{Connector, Dialer, Established};
use crate::io::Io;
use crate::metrics::{GaugeGuard, Protocol};
use crate::relay::{RelayEnd, RelayStats, Relaying, relay};
use crate::tls::TlsConfigError;
use crate::{Config, Metrics};

/// The state every connection shares.
#[derive(Debug, Clone)]
pub struct Gateway(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    config: Config,
    dialer: Dialer,
    shared: Arc<Shared>,
}

impl AsRef<Metrics> for Gateway {
    fn as_ref(&self) -> &Metrics {
        self.metrics()
    }
}

/// What outlives a reload.
#[derive(Debug)]
struct Shared {
    auth: ArcSwap<ClientAuth>,
    tasks: TaskTracker,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
    per_ip: Arc<PerIp>,
}

/// The gateway in force: what the listeners hand each new connection, replaced whole by a
/// reload.
#[derive(Debug, Clone)]
pub struct Live(Arc<ArcSwap<Inner>>);

impl Live {
    /// The gateway in force until the first reload.
    pub(crate) fn new(gateway: Gateway) -> Live {
        Live(Arc::new(ArcSwap::new(gateway.0)))
    }

    /// The gateway new connections get now.
    pub fn gateway(&self) -> Gateway {
        Gateway(self.0.load_full())
    }

    /// Builds what a new configuration needs (the dial TLS settings may fail to load),
    /// changing nothing yet.
    pub fn prepare(&self, config: Config) -> Result<Staged, TlsConfigError> {
        let connector = connector(&config)?;
        Ok(Staged { config, connector })
    }

    /// Applies a prepared configuration and new client auth: connections accepted from now on
    /// use them, open ones keep their settings (auth applies to every next check).
    pub fn apply(&self, staged: Staged, auth: ClientAuth) {
        let current = self.0.load_full();
        let shared = Arc::clone(&current.shared);
        let dialer = Dialer::new(
            current.dialer.pool().clone(),
            staged.connector,
            Arc::clone(&shared.metrics),
        );
        shared.auth.store(Arc::new(auth));
        self.0.store(Arc::new(Inner {
            config: staged.config,
            dialer,
            shared,
        }));
    }
}

/// A configuration ready to apply ([`Live::prepare`]).
#[derive(Debug)]
pub struct Staged {
    config: Config,
    connector: Connector,
}

fn connector(config: &Config) -> Result<Connector, TlsConfigError> {
    let tls = crate::tls::client_config(config.dial.tls_ca_file.as_deref())?;
    Ok(Connector::new(config.dial.clone(), tls, config.policy()))
}

/// A client connection's place: its share of `server.max_connections`, of its address's
/// `server.max_connections_per_ip`, and its count in `proxygate_active_connections`, held until
/// every part of the connection (a CONNECT tunnel included) has ended.
#[derive(Debug)]
pub struct ConnectionSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _per_ip: PerIpGuard,
    _open: GaugeGuard,
}

impl ConnectionSlot {
    /// The slot of a connection holding `permit`, counted against its address by `per_ip`
    /// and in the gauge by `open`.
    pub(crate) fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        per_ip: PerIpGuard,
        open: GaugeGuard,
    ) -> Self {
        Self {
            _permit: permit,
            _per_ip: per_ip,
            _open: open,
        }
    }

    /// A slot outside `server.max_connections` (the fuzz targets' in-memory connections), still
    /// counted against its address and in the gauge.
    pub(crate) fn unlimited(gw: &Gateway, peer: SocketAddr) -> Option<Self> {
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().ok()?;
        Some(Self {
            _permit: permit,
            _per_ip: gw.0.shared.per_ip.enter(peer.ip(), usize::MAX)?,
            _open: gw.0.shared.metrics.connection(Protocol::Http),
        })
    }
}

/// Open connections per client address, keyed by the address as 128 bits (an IPv4 one
/// mapped into IPv6, as a dual-stack socket reports it).
#[derive(Debug, Default)]
struct PerIp(Mutex<HashMap<u128, usize, AddressHash>>);

/// One connection counted against its address until dropped.
#[derive(Debug)]
pub struct PerIpGuard {
    table: Arc<PerIp>,
    key: u128,
}

fn address_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().to_bits(),
        IpAddr::V6(v6) => v6.to_bits(),
    }
}

impl PerIp {
    /// Counts a connection from `ip`, unless it already has `max`.
    fn enter(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PerIpGuard> {
        let key = address_key(ip);
        let mut t = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = t.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PerIpGuard {
            table: Arc::clone(self),
            key,
        })
    }
}

/// The per-address table's hash: two folded multiplies of the address with keys drawn once
/// per process (from std's `RandomState`), where SipHash-1-3 cost ~100 instructions per
/// lookup, two lookups per connection. Clients choose their addresses, an IPv6 one from a
/// whole /64, so the keys stay secret and random as SipHash's do: without them no one can
/// aim addresses at one bucket.
#[derive(Debug, Clone, Copy)]
struct AddressHash {
    keys: [u64; 2],
}

impl Default for AddressHash {
    fn default() -> Self {
        use std::hash::BuildHasher as _;
        static KEYS: std::sync::OnceLock<[u64; 2]> = std::sync::OnceLock::new();
        let keys = *KEYS.get_or_init(|| {
            let s = std::hash::RandomState::new();
            [s.hash_one(0x5eed_u64), s.hash_one(0x5eed_u64 + 1)]
        });
        AddressHash { keys }
    }
}

impl std::hash::BuildHasher for AddressHash {
    type Hasher = AddressHasher;

    fn build_hasher(&self) -> AddressHasher {
        AddressHasher {
            keys: self.keys,
            hash: 0,
        }
    }
}

/// The hasher of [`AddressHash`]: built for one `u128`; anything else is folded in 8 bytes
/// at a time, as correct, if no faster than need be.
#[derive(Debug)]
struct AddressHasher {
    keys: [u64; 2],
    hash: u64,
}

/// 2^64 divided by the golden ratio: an odd constant whose bits look random.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The 128-bit product of `a` and `b`, its halves xored.
fn folded_multiply(a: u64, b: u64) -> u64 {
    let full = u128::from(a) * u128::from(b);
    (full as u64) ^ ((full >> 64) as u64)
}

impl AddressHasher {
    fn mix(&mut self, word: u64) {
        self.hash = folded_multiply(self.hash ^ word ^ self.keys[0], self.keys[1] | 1);
    }
}

impl std::hash::Hasher for AddressHasher {
    fn write_u128(&mut self, n: u128) {
        let [k0, k1] = self.keys;
        // The second multiply carries the first's high bits into the low ones, which pick
        // the bucket (with the first alone, a run of addresses used 40 % of the buckets it
        // should have filled to 63 %, for some keys).
        let h = folded_multiply((n as u64) ^ k0, ((n >> 64) as u64) ^ k1);
        self.hash = folded_multiply(h ^ k0.rotate_left(32), GOLDEN);
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

impl Drop for PerIpGuard {
    fn drop(&mut self) {
        let mut t = self.table.0.lock().unwrap_or_else(PoisonError::into_inner);
        // One lookup for the decrement and the removal.
        if let std::collections::hash_map::Entry::Occupied(mut n) = t.entry(self.key) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
    }
}

impl Gateway {
    /// Builds the gateway over `pool`, counting into `metrics`. Fails only if TLS cannot be
    /// set up.
    pub fn new(
        config: Config,
        auth: ClientAuth,
        pool: PoolReader,
        shutdown: Shutdown,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TlsConfigError> {
        let connector = connector(&config)?;
        Ok(Self(Arc::new(Inner {
            dialer: Dialer::new(pool, connector, Arc::clone(&metrics)),
            config,
            shared: Arc::new(Shared {
                auth: ArcSwap::from_pointee(auth),
                tasks: TaskTracker::new(),
                shutdown,
                metrics,
                per_ip: Arc::default(),
            }),
        })))
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.shared.metrics
    }

    /// Where clients may go.
    pub fn policy(&self) -> &crate::policy::Policy {
        self.0.dialer.connector().policy()
    }

    pub fn config(&self) -> &Config {
        &self.0.config
    }

    /// The accounts and allow-list in force now.
    pub fn auth(&self) -> Arc<ClientAuth> {
        self.0.shared.auth.load_full()
    }

    pub fn dialer(&self) -> &Dialer {
        &self.0.dialer
    }

    pub(crate) fn shutdown(&self) -> Shutdown {
        self.0.shared.shutdown.clone()
    }

    /// Runs a task that shutdown waits for (within the grace period).
    pub(crate) fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.0.shared.tasks.spawn(fut);
    }

    /// The relay of an established tunnel to `target`, which reports its outcome when it ends
    /// (to the upstream, and to its record at the target's site).
    pub(crate) fn relay<C: Io>(
        self,
        client: C,
        est: Established,
        target: proxygate_core::Target,
    ) -> Tunnel<C> {
        let server = &self.0.config.server;
        let (idle, splice) = (server.idle_timeout, server.splice);
        let active = self.metrics().tunnel();
        let upstream_tls = est.lease.upstream().scheme == proxygate_core::Scheme::Https;
        let Established {
            io, lease, outcome, ..
        } = est;
        Box::pin(Tunneling {
            relaying: relay(client, io, upstream_tls, idle, splice, self),
            report: Some(TunnelReport {
                lease,
                connect: outcome.connect,
                handshake: outcome.handshake,
                error: outcome.error,
                target,
                _active: active,
                _held: None,
            }),
        })
    }

    /// Whether the allow-list in force lets `ip` in.
    pub(crate) fn is_allowed(&self, ip: IpAddr) -> bool {
        self.0.shared.auth.load().is_allowed(ip)
    }

    /// Counts a connection from `ip` against `server.max_connections_per_ip`, unless it is
    /// at the limit already.
    pub(crate) fn count_address(&self, ip: IpAddr) -> Option<PerIpGuard> {
        let max = self.0.config.server.max_connections_per_ip;
        self.0.shared.per_ip.enter(ip, max)
    }

    /// The tasks shutdown waits for.
    pub(crate) fn tasks(&self) -> &TaskTracker {
        &self.0.shared.tasks
    }
}

/// A connection's first read's buffer, and a parked HTTP connection's when its next request
/// comes: what a request head usually fits in.
pub(crate) const FIRST_READ: usize = 4096;

/// What a connection's first read left for the protocol that serves it.
#[derive(Debug)]
pub struct Opened {
    /// The bytes read so far (at least one): the start of the request head or handshake.
    pub first: BytesMut,
    /// When the request head or handshake must be complete (`server.header_read_timeout`
    /// from the accept).
    pub head_deadline: tokio::time::Instant,
}

impl Opened {
    /// Nothing read yet, `timeout` to read it all (fuzzing and tests).
    pub fn fresh(timeout: std::time::Duration) -> Self {
        Self {
            first: BytesMut::new(),
            head_deadline: tokio::time::Instant::now() + timeout,
        }
    }
}

/// A tunnel's relay (`Gateway::relay`), boxed: it is handed back from a handshake and held
/// for the tunnel's life, and a pointer moves and copies for nothing where the relay's ~600
/// bytes would be copied at every step.
pub type Tunnel<C> = Pin<Box<Tunneling<C>>>;

pin_project_lite::pin_project! {
    /// A tunnel's relay and its report: a future of its own rather than an `async fn`'s state,
    /// which would keep each argument twice, so that an idle tunnel holds each thing it needs
    /// once and nothing else.
    pub struct Tunneling<C> {
        #[pin]
        relaying: Relaying<C, crate::io::BoxedIo, Gateway>,
        report: Option<TunnelReport>,
    }
}

impl<C> Tunneling<C> {
    /// The tunnel, holding `held` (the connection's slot) until it ends.
    pub(crate) fn holding(mut self: Tunnel<C>, held: ConnectionSlot) -> Tunnel<C> {
        if let Some(report) = self.as_mut().project().report {
            report._held = Some(held);
        }
        self
    }
}

/// What a tunnel reports when its relay ends, and holds while it runs (the upstream's lease,
/// the open-tunnel gauge, the connection's slot).
struct TunnelReport {
    lease: proxygate_pool::Lease,
    /// The dial's part of the outcome (not the whole [`Outcome`]: its relay figures come at
    /// the end, and the 40 bytes they take would move every tunnel up an allocator size).
    connect: Option<std::time::Duration>,
    handshake: Option<std::time::Duration>,
    error: Option<ErrorKind>,
    target: proxygate_core::Target,
    _active: GaugeGuard,
    _held: Option<ConnectionSlot>,
}

impl<C: Io> Future for Tunneling<C> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let stats = std::task::ready!(this.relaying.as_mut().poll(cx));
        if let Some(report) = this.report.take() {
            report.send(this.relaying.metrics(), stats);
        }
        Poll::Ready(())
    }
}

impl TunnelReport {
    fn send(self, gw: &Gateway, stats: RelayStats) {
        let metrics = gw.metrics();
        if let Some(fb) = stats.first_byte {
            metrics.first_byte(fb);
        }
        let mut outcome = Outcome {
            connect: self.connect,
            handshake: self.handshake,
            first_byte: stats.first_byte,
            bytes_up: stats.bytes_up,
            bytes_down: stats.bytes_down,
            error: self.error,
        };
        // An upstream that breaks before a single byte came back failed us; after that, a
        // reset may as well be the destination's doing.
        if stats.end == RelayEnd::UpstreamError && stats.first_byte.is_none() {
            outcome.error = Some(ErrorKind::UpstreamIo);
            metrics.failure(ErrorKind::UpstreamIo);
        }
        tracing::debug!(
            upstream = %self.lease.upstream(),
            up = stats.bytes_up,
            down = stats.bytes_down,
            end = ?stats.end,
            "tunnel closed"
        );
        // The target closing or resetting the tunnel before a byte came back, though the
        // client spoke, or answering the client's TLS handshake with an alert: the site
        // turned this upstream away. Other bytes back: it works there.
        let turned_away = (stats.first_byte.is_none()
            && stats.bytes_up > 0
            && matches!(stats.end, RelayEnd::Closed | RelayEnd::UpstreamError))
            || stats.tls_refused();
        if turned_away || stats.first_byte.is_some() {
            let target = &self.target;
            gw.0.dialer.pool().site_outcome(
                self.lease.id(),
                turned_away,
                || proxygate_pool::sites::site_of_target(target),
                std::time::Instant::now(),
            );
        }
        self.lease.report(&outcome);
    }
}

/// Reports an attempt abandoned because the client went away.
pub(crate) fn client_gone(est: Established) {
    est.lease.report(&Outcome::failed(ErrorKind::ClientClosed));
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher as _;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::sync::Arc;

    use super::{AddressHash, PerIp, address_key};

    /// Each address counts its own connections up to the limit, and its entry goes with its
    /// last one; an IPv4 address and an IPv6 one are apart, the IPv4 one and its mapped form
    /// the same client.
    #[test]
    fn connections_count_per_address() {
        let t = Arc::new(PerIp::default());
        let v4 = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
        let mapped = IpAddr::V6(Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped());
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let a = t.enter(v4, 2).unwrap();
        let b = t.enter(mapped, 2).unwrap();
        assert!(t.enter(v4, 2).is_none(), "a third from one address past 2");
        let c = t.enter(v6, 2).unwrap();
        assert_eq!(t.0.lock().unwrap().len(), 2);
        drop(a);
        let a = t.enter(v4, 2).unwrap();
        drop((a, b, c));
        assert!(
            t.0.lock().unwrap().is_empty(),
            "no entry outlives its connections"
        );
    }

    /// The keyed hash tells neighbouring addresses apart in the bits hashbrown uses (the low
    /// ones pick the bucket, the top seven tag it): a /64's worth of clients, or a /16's, do
    /// not pile into a few buckets, whatever the keys drawn (32 draws here).
    #[test]
    fn neighbouring_addresses_spread_over_the_buckets() {
        for _ in 0..32 {
            let s = std::hash::RandomState::new();
            let h = AddressHash {
                keys: [s.hash_one(1u8), s.hash_one(2u8)],
            };
            spread(&h);
        }
        assert_ne!(
            AddressHash::default().keys,
            [0, 0],
            "keys drawn, not left at zero"
        );
    }

    fn spread(h: &AddressHash) {
        for block in [
            (0..4096u32)
                .map(|i| address_key(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))))
                .collect::<Vec<_>>(),
            (0..4096u128)
                .map(|i| address_key(IpAddr::V6(Ipv6Addr::from_bits((0x2001_0db8 << 96) + i))))
                .collect(),
            (0..4096u128)
                .map(|i| {
                    address_key(IpAddr::V6(Ipv6Addr::from_bits(
                        (0x2001_0db8 << 96) + (i << 64),
                    )))
                })
                .collect(),
        ] {
            let hashes: Vec<u64> = block.iter().map(|k| h.hash_one(k)).collect();
            let mut low = std::collections::HashSet::new();
            let mut top = std::collections::HashSet::new();
            for x in &hashes {
                low.insert(x & 0xfff);
                top.insert(x >> 57);
            }
            // 4,096 keys into 4,096 buckets: a random function fills ~63 %.
            assert!(low.len() > 2_300, "{} buckets of 4,096 used", low.len());
            assert_eq!(top.len(), 128, "every tag used");
        }
    }

    /// What an idle tunnel holds besides its task's few pointers is its boxed relay: within
    /// mimalloc's 640-byte size, not the 768 one above it (the whole dial outcome in the report
    /// put it there).
    #[test]
    fn a_tunnel_fits_in_640_bytes() {
        let size =
            std::mem::size_of::<super::Tunneling<crate::io::Rewind<tokio::net::TcpStream>>>();
        assert!(size <= 640, "a tunnel's relay is {size} bytes");
    }
}
