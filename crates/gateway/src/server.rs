//! Listeners and connections: [`Server`] binds every `server.listen` address and accepts;
//! [`Gateway`] is the shared state each connection gets (config, client auth, dialer).
//!
//! A reload ([`Live::reconfigure`]) swaps the whole [`Gateway`] snapshot: a connection keeps
//! the configuration it was accepted under (limits, timeouts, destination policy, dial
//! settings) and new connections get the new one, so nothing open is dropped. Accounts and
//! the allow-list are read afresh on every check, so a removed account is refused on its next
//! request even on a kept-alive connection.
//!
//! Each accepted connection takes a permit (`server.max_connections`), gets `TCP_NODELAY`, is
//! checked against the allow-list, and is told apart by the first byte of its first read:
//! `0x05` SOCKS5, `0x04` SOCKS4, an ASCII letter HTTP; anything else is answered 400 and
//! closed. On shutdown the listeners close, kept-alive HTTP connections finish their current
//! request, and open tunnels get `server.shutdown_grace` to end.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use proxygate_core::{ErrorKind, Outcome, Shutdown};
use proxygate_pool::PoolReader;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::auth::ClientAuth;
use crate::dial::{Connector, Dialer, Established};
use crate::io::{Io, Rewind};
use crate::metrics::{GaugeGuard, Protocol, RequestKind};
use crate::relay::{RelayEnd, RelayStats, Relaying, relay};
use crate::tls::TlsConfigError;
use crate::{Config, GatewayError, Metrics, http, socks};

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

/// Open connections per client address.
#[derive(Debug, Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

/// One connection counted against its address until dropped.
#[derive(Debug)]
pub struct PerIpGuard {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// Counts a connection from `ip`, unless it already has `max`.
    fn enter(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PerIpGuard> {
        let mut t = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = t.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PerIpGuard {
            table: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for PerIpGuard {
    fn drop(&mut self) {
        let mut t = self.table.0.lock().unwrap_or_else(PoisonError::into_inner);
        // One lookup (a SipHash of the address) for the decrement and the removal.
        if let std::collections::hash_map::Entry::Occupied(mut n) = t.entry(self.ip) {
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

    /// Serves one accepted client connection, holding its connection `permit` until every
    /// part of it (a CONNECT tunnel included) has ended.
    pub async fn serve_connection(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        // Boxed, then the tunnel it hands back (boxed too) relayed: the task's own state is a
        // few pointers, which tokio copies several times at each spawn and completion, and an
        // idle tunnel holds its relay and its slot, each once, and nothing of the handshake.
        let tunnel = Box::pin(self.open(stream, peer, permit)).await;
        if let Some(tunnel) = tunnel {
            tunnel.await;
        }
    }

    /// A connection up to its tunnel: checked, its protocol told apart and served. Returns the
    /// tunnel to relay, if it asked for one and got it, holding the connection's slot.
    async fn open(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Option<Tunnel<Rewind<TcpStream>>> {
        tracing::trace!(%peer, "accepted");
        if !self.0.shared.auth.load().is_allowed(peer.ip()) {
            tracing::info!(%peer, "client not in server.allow; closed");
            return None;
        }
        let max_per_ip = self.0.config.server.max_connections_per_ip;
        let Some(per_ip) = self.0.shared.per_ip.enter(peer.ip(), max_per_ip) else {
            tracing::debug!(%peer, max_per_ip, "client at server.max_connections_per_ip; closed");
            self.0.shared.metrics.request(
                crate::metrics::RequestKind::Http,
                Some(ErrorKind::ClientConnectionLimit),
            );
            return None;
        };
        // The first read tells the protocol apart and is the start of the request head or the
        // SOCKS greeting (a read, not a peek: one syscall fewer per connection).
        let head_deadline = tokio::time::Instant::now() + self.0.config.server.header_read_timeout;
        let mut stream = stream;
        let mut first = BytesMut::with_capacity(FIRST_READ);
        // Often the client's first bytes are in by the time its connection is served: read
        // them without a timer (a new socket counts as readable, so a read that finds nothing
        // costs the one recv the wait below would have made anyway).
        match std::future::poll_fn(|cx| Poll::Ready(try_first_read(&mut stream, &mut first, cx)))
            .await
        {
            Poll::Ready(Ok(0)) => return None,
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => {
                // Boxed too: its timer is the largest thing in the task's own state.
                match Box::pin(tokio::time::timeout_at(
                    head_deadline,
                    stream.read_buf(&mut first),
                ))
                .await
                {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return None,
                }
            }
            Poll::Ready(Err(_)) => return None,
        }
        let first_byte = first[0];
        let protocol = match first_byte {
            0x05 => Protocol::Socks5,
            0x04 => Protocol::Socks4,
            b if b.is_ascii_alphabetic() => Protocol::Http,
            _ => Protocol::Unknown,
        };
        let slot = ConnectionSlot {
            _permit: permit,
            _per_ip: per_ip,
            _open: self.0.shared.metrics.connection(protocol),
        };
        let opened = Opened {
            first,
            head_deadline,
        };
        // Each protocol's handshake is boxed at its own size and gone when it ends: a tunnel
        // it hands back is relayed in the connection's task itself (`serve_connection`).
        match protocol {
            Protocol::Socks5 => Box::pin(socks::serve_socks5(self, stream, peer, opened))
                .await
                .map(|t| t.holding(Held::Slot { _slot: slot })),
            Protocol::Socks4 => Box::pin(socks::serve_socks4(self, stream, opened))
                .await
                .map(|t| t.holding(Held::Slot { _slot: slot })),
            // A CONNECT tunnel keeps its share of the connection's slot until it closes.
            Protocol::Http => {
                Box::pin(http::serve_http(self, stream, peer, Arc::new(slot), opened))
                    .await
                    .map(|(t, share)| t.holding(Held::Share { _share: share }))
            }
            Protocol::Unknown => {
                let e = GatewayError::new(
                    ErrorKind::ClientMalformed,
                    "unrecognized protocol (expected HTTP, SOCKS5 or SOCKS4)",
                );
                tracing::debug!(%peer, "unrecognized first byte {first_byte:#04x}");
                self.0
                    .shared
                    .metrics
                    .request(RequestKind::Http, Some(e.kind));
                Box::pin(http::answer_error(&mut stream, &e)).await;
                None
            }
        }
    }
}

/// What holds a connection's slot while its tunnel is relayed: the slot itself, or the share
/// of it that a CONNECT tunnel keeps (hyper's path hands out shares).
enum Held {
    Slot { _slot: ConnectionSlot },
    Share { _share: http::Permit },
}

/// One try at a connection's first bytes, without waiting for them (`Pending`: nothing yet;
/// the task is woken when they come). A poll of a read rather than `try_read_buf`: a read that
/// fills less than the buffer clears the socket's readiness, so the connection's next read
/// (a tunnel's first, after the reply; a SOCKS request after the greeting) waits for the
/// kernel's event instead of trying a recv that finds nothing. That recv was 0.7 of the 6.9
/// recvs of a CONNECT tunnel and 0.8 of the 8.0 of a SOCKS5 tunnel under load.
fn try_first_read(
    stream: &mut TcpStream,
    first: &mut BytesMut,
    cx: &mut std::task::Context<'_>,
) -> Poll<io::Result<usize>> {
    tokio_util::io::poll_read_buf(Pin::new(stream), cx, first)
}

/// The first read's buffer: what a request head usually fits in.
const FIRST_READ: usize = 4096;

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

/// The runtimes serving connections (one per data-plane thread), for metrics.
pub type Runtimes = Arc<Mutex<Vec<tokio::runtime::Handle>>>;

/// The bound listeners: for each data-plane worker, one socket per `server.listen` address.
#[derive(Debug)]
pub struct Server {
    live: Live,
    /// `listeners[worker][address]`.
    listeners: Vec<Vec<std::net::TcpListener>>,
    addrs: Vec<SocketAddr>,
    runtimes: Runtimes,
    /// Run on every data-plane worker thread once a [`TICK`] ([`Server::on_worker_tick`]).
    worker_tick: Option<fn()>,
}

/// How often a worker runs its housekeeping: [`Server::on_worker_tick`]'s hook, and every
/// [`SWEEP_EVERY`] the sweep of its idle upstream connections.
const TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// Backlog of each listening socket (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

fn listener(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    // Accepted connections inherit it on Linux: one setsockopt per listener, not per client.
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

impl Server {
    /// Binds every `server.listen` address, once per data-plane worker
    /// (`server.workers`).
    ///
    /// With several workers the sockets share the port through `SO_REUSEPORT`, which would
    /// also let them share it with another process that set it: a probe bind without it first
    /// makes sure the address is free (and resolves port 0 to the port the group takes).
    pub async fn bind(gateway: Gateway) -> io::Result<Server> {
        let workers = gateway.config().server.worker_threads();
        let mut listeners: Vec<Vec<std::net::TcpListener>> =
            (0..workers).map(|_| Vec::new()).collect();
        let mut addrs = Vec::new();
        for addr in &gateway.config().server.listen {
            let in_use =
                |e: io::Error| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"));
            let actual = if workers > 1 {
                let probe = listener(*addr, false).map_err(in_use)?;
                let actual = probe.local_addr()?;
                drop(probe);
                actual
            } else {
                *addr
            };
            for (i, per_worker) in listeners.iter_mut().enumerate() {
                let l = listener(actual, workers > 1).map_err(in_use)?;
                if i == 0 {
                    addrs.push(l.local_addr()?);
                }
                per_worker.push(l);
            }
        }
        Ok(Server {
            live: Live(Arc::new(ArcSwap::new(gateway.0))),
            listeners,
            addrs,
            runtimes: Runtimes::default(),
            worker_tick: None,
        })
    }

    /// Runs `tick` on every data-plane worker thread once a second, between its connections'
    /// tasks: for what is per thread and wants doing while the thread is up (the binary hands
    /// the allocator's freed pages back to the system with it).
    pub fn on_worker_tick(mut self, tick: fn()) -> Server {
        self.worker_tick = Some(tick);
        self
    }

    /// The addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.clone()
    }

    /// The handle a reload goes through.
    pub fn live(&self) -> Live {
        self.live.clone()
    }

    /// The data-plane runtimes (filled as [`Server::run`] starts them).
    pub fn runtimes(&self) -> Runtimes {
        Arc::clone(&self.runtimes)
    }

    /// Accepts until shutdown, then drains within `server.shutdown_grace`.
    ///
    /// Each worker is a thread with a single-threaded runtime that accepts on its own sockets
    /// and runs the connections it accepted start to end: no cross-thread wake-ups on the data
    /// path. Every connection, a CONNECT or SOCKS tunnel included, is a task of ours (hyper
    /// forgets upgraded connections), so the drain waits for tunnels too. Returns how many
    /// were still open when the grace period ran out; they are closed as their worker's
    /// runtime stops.
    pub async fn run(self) -> usize {
        let gw = self.live.gateway();
        let permits = Arc::new(Semaphore::new(gw.config().server.max_connections));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        // Each worker holds a token of this tracker until it has closed its listening sockets.
        let listening = TaskTracker::new();
        let mut threads = Vec::new();
        for (i, sockets) in self.listeners.into_iter().enumerate() {
            let (live, permits, stopped) =
                (self.live.clone(), Arc::clone(&permits), stopped.clone());
            let listening = listening.token();
            let runtimes = Arc::clone(&self.runtimes);
            let tick = self.worker_tick;
            let spawned = std::thread::Builder::new()
                .name(format!("proxygate-net-{i}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(worker = i, "cannot start a data-plane runtime: {e}");
                            return;
                        }
                    };
                    runtimes
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(rt.handle().clone());
                    rt.block_on(worker(live, sockets, permits, listening, stopped, tick));
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => tracing::error!(worker = i, "cannot start a data-plane thread: {e}"),
            }
        }
        gw.shutdown().wait().await;
        // The drain starts once no socket listens any more: a client connecting from here on
        // is refused by the kernel (one still queued is reset), never half-served.
        listening.close();
        listening.wait().await;
        let gw = self.live.gateway();
        let grace = gw.config().server.shutdown_grace;
        let tasks = &gw.0.shared.tasks;
        tasks.close();
        let open = tasks.len();
        if open > 0 {
            tracing::info!(open, ?grace, "draining connections");
        }
        let left = if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            let left = tasks.len();
            tracing::warn!(open = left, "grace period over; closing the rest");
            left
        } else {
            0
        };
        let _ = stop.send(true);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        left
    }
}

/// One data-plane worker: accepts on its sockets until shutdown, then keeps running the
/// connections it holds until the drain is over (`stopped`).
async fn worker(
    live: Live,
    sockets: Vec<std::net::TcpListener>,
    permits: Arc<Semaphore>,
    listening: TaskTrackerToken,
    mut stopped: tokio::sync::watch::Receiver<bool>,
    tick: Option<fn()>,
) {
    let mut loops = tokio::task::JoinSet::new();
    for socket in sockets {
        match TcpListener::from_std(socket) {
            Ok(l) => {
                loops.spawn(accept_loop(live.clone(), l, Arc::clone(&permits)));
            }
            Err(e) => tracing::error!("cannot use a listening socket: {e}"),
        }
    }
    // Housekeeping: the hook each tick; idle upstream connections kept on this worker go
    // when they are too old to reuse.
    let sweeper = tokio::spawn({
        let live = live.clone();
        async move {
            let mut ticks = tokio::time::interval(TICK);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let per_sweep = (SWEEP_EVERY.as_secs() / TICK.as_secs()).max(1);
            for n in 1u64.. {
                ticks.tick().await;
                if let Some(tick) = tick {
                    tick();
                }
                if n % per_sweep == 0 {
                    crate::http::sweep_kept(live.gateway().config().dial.keep_idle);
                }
            }
        }
    });
    while loops.join_next().await.is_some() {}
    drop(listening);
    let _ = stopped.wait_for(|stop| *stop).await;
    sweeper.abort();
}

/// How often a worker drops its expired idle upstream connections.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Accepts on one socket until shutdown. A connection is accepted first and then waits for its
/// share of `server.max_connections` (the semaphore is fair: first come, first served) before
/// the next accept: a worker holds at most one connection waiting, the rest stay in the
/// kernel's queue. (Taking the share first would let a worker whose queue is empty sit on the
/// last free share while another worker's queue holds the client that should get it.)
async fn accept_loop(live: Live, listener: TcpListener, permits: Arc<Semaphore>) {
    let mut shutdown = live.gateway().shutdown();
    // One wait for the whole loop: a new one per accept registered with the signal and
    // unregistered again (~400 instructions per connection).
    let mut stop = std::pin::pin!(shutdown.wait());
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut stop => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => tokio::select! {
                p = Arc::clone(&permits).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                () = &mut stop => return,
            },
        };
        // On Linux the listening socket's TCP_NODELAY is inherited.
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        let gw = live.gateway();
        gw.spawn(gw.clone().serve_connection(stream, peer, permit));
    }
}

/// A tunnel's relay ([`Gateway::relay`]), boxed: it is handed back from a handshake and held
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
    fn holding(mut self: Tunnel<C>, held: Held) -> Tunnel<C> {
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
    _held: Option<Held>,
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
    use std::sync::Arc;

    /// Threads the tick hook ran on.
    static TICKED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

    fn record_tick() {
        let name = std::thread::current().name().unwrap_or("").to_owned();
        TICKED.lock().unwrap().push(name);
    }

    /// The hook given to `on_worker_tick` runs on every data-plane worker, again and again,
    /// until the server stops.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_worker_runs_the_tick_hook() {
        let (trigger, shutdown) = proxygate_core::Shutdown::new();
        let mut config = crate::Config::default();
        config.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
        config.server.workers = 2;
        config.server.shutdown_grace = std::time::Duration::from_millis(100);
        let metrics = crate::Metrics::register(&prometheus::Registry::new()).unwrap();
        let (reader, _) = proxygate_pool::Pool::create(
            proxygate_pool::Strategy::default(),
            proxygate_pool::HealthConfig::default(),
        );
        let gw = crate::Gateway::new(
            config,
            crate::auth::ClientAuth::open(),
            reader,
            shutdown,
            metrics,
        )
        .unwrap();
        let server = super::Server::bind(gw)
            .await
            .unwrap()
            .on_worker_tick(record_tick);
        let run = tokio::spawn(server.run());
        let ticks = |worker: &str| {
            TICKED
                .lock()
                .unwrap()
                .iter()
                .filter(|t| t.as_str() == worker)
                .count()
        };
        // The first tick is at once, the next a second later.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ticks("proxygate-net-0") < 2 || ticks("proxygate-net-1") < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                TICKED.lock().unwrap()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        trigger.fire();
        assert_eq!(run.await.unwrap(), 0);
    }

    /// A connection's task holds the largest state its future passes through for as long as
    /// the connection lives, and tokio copies it whole several times at each spawn and
    /// completion: it is a few pointers, to the boxed handshake and then to the boxed tunnel.
    /// (Before, the SOCKS handshake's state was paid by every CONNECT tunnel too, ~0.5 KiB; then
    /// the tunnel's relay sat in a boxed HTTP state of 1.8 KiB, with the arguments of four
    /// nested async functions kept twice each. With the tunnel unboxed in the task, 768 bytes,
    /// the copies cost 1,100 instructions per tunnel.)
    #[test]
    fn the_connection_task_holds_no_protocol_state_inline() {
        let gw = crate::fuzz::gateway();
        crate::fuzz::runtime().block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let _client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
                .await
                .unwrap();
            let (stream, peer) = l.accept().await.unwrap();
            let permit = Arc::new(tokio::sync::Semaphore::new(1))
                .acquire_owned()
                .await
                .unwrap();
            let task = gw.serve_connection(stream, peer, permit);
            let size = std::mem::size_of_val(&task);
            assert!(size <= 128, "the connection's future is {size} bytes");
        });
    }

    /// What an idle tunnel holds besides its task's few pointers is its boxed relay: within
    /// mimalloc's 640-byte size, not the 768 one above it (the whole dial outcome in the report
    /// put it there).
    #[test]
    fn a_tunnel_fits_in_640_bytes() {
        let size = std::mem::size_of::<super::Tunneling<super::Rewind<super::TcpStream>>>();
        assert!(size <= 640, "a tunnel's relay is {size} bytes");
    }

    /// After a first read that took less than its buffer, the socket no longer counts as
    /// readable: the next read waits for the kernel's event rather than trying a recv. Seen
    /// here as `try_read` finding nothing although bytes are queued (no driver turn between);
    /// a first read by `try_read_buf` would leave it readable and take them.
    #[test]
    fn a_short_first_read_leaves_the_next_read_to_the_kernels_event() {
        use std::io::Write;
        crate::fuzz::runtime().block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (mut stream, _) = l.accept().await.unwrap();
            client.write_all(b"\x05\x01\x00").unwrap();
            // Both reads below are tried at once; make sure the bytes are there to be taken.
            let queued = |stream: &tokio::net::TcpStream, n: usize| {
                let mut peek = [std::mem::MaybeUninit::new(0u8); 8];
                for _ in 0..5000 {
                    if socket2::SockRef::from(stream).peek(&mut peek).unwrap_or(0) >= n {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                panic!("{n} bytes never arrived");
            };
            queued(&stream, 3);
            let mut first = bytes::BytesMut::with_capacity(super::FIRST_READ);
            let read = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(super::try_first_read(&mut stream, &mut first, cx))
            })
            .await;
            assert!(matches!(read, std::task::Poll::Ready(Ok(3))), "{read:?}");
            client.write_all(b"\x05\x01\x00\x01").unwrap();
            queued(&stream, 4);
            let mut next = [0u8; 16];
            let e = stream.try_read(&mut next).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
            // The kernel's event makes it readable again: nothing is lost.
            stream.readable().await.unwrap();
            assert_eq!(stream.try_read(&mut next).unwrap(), 4);
        });
    }

    /// Clients get TCP_NODELAY (a small write, the CONNECT reply, goes out at once) without a
    /// setsockopt each: their listening socket has it, and Linux hands it down on accept.
    #[cfg(target_os = "linux")]
    #[test]
    fn accepted_clients_inherit_no_delay() {
        let l = super::listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let _client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (accepted, _) = l.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
