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
//! checked against the allow-list, and has its first byte peeked: `0x05` SOCKS5, `0x04` SOCKS4,
//! an ASCII letter HTTP; anything else is answered 400 and closed. On shutdown the listeners
//! close, kept-alive HTTP connections finish their current request, and open tunnels get
//! `server.shutdown_grace` to end.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use proxygate_core::{ErrorKind, Outcome, Shutdown};
use proxygate_pool::PoolReader;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::auth::ClientAuth;
use crate::dial::{Connector, Dialer, Established};
use crate::io::Io;
use crate::metrics::{GaugeGuard, Protocol, RequestKind};
use crate::relay::{RelayEnd, relay};
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
        if let Some(n) = t.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.ip);
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

    /// Relays an established tunnel and reports its outcome.
    pub(crate) async fn relay<C: Io>(&self, client: C, est: Established) {
        let idle = self.0.config.server.idle_timeout;
        let metrics = &self.0.shared.metrics;
        let _active = metrics.tunnel();
        let stats = relay(client, est.io, idle, metrics).await;
        if let Some(fb) = stats.first_byte {
            metrics.first_byte(fb);
        }
        let mut outcome = est.outcome;
        outcome.bytes_up = stats.bytes_up;
        outcome.bytes_down = stats.bytes_down;
        outcome.first_byte = stats.first_byte;
        // An upstream that breaks before a single byte came back failed us; after that, a
        // reset may as well be the destination's doing.
        if stats.end == RelayEnd::UpstreamError && stats.first_byte.is_none() {
            outcome.error = Some(ErrorKind::UpstreamIo);
            metrics.failure(ErrorKind::UpstreamIo);
        }
        tracing::debug!(
            upstream = %est.lease.upstream(),
            up = stats.bytes_up,
            down = stats.bytes_down,
            end = ?stats.end,
            "tunnel closed"
        );
        est.lease.report(&outcome);
    }

    /// Serves one accepted client connection, holding its connection `permit` until every
    /// part of it (a CONNECT tunnel included) has ended.
    pub async fn serve_connection(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let _ = stream.set_nodelay(true);
        tracing::trace!(%peer, "accepted");
        if !self.0.shared.auth.load().is_allowed(peer.ip()) {
            tracing::info!(%peer, "client not in server.allow; closed");
            return;
        }
        let max_per_ip = self.0.config.server.max_connections_per_ip;
        let Some(per_ip) = self.0.shared.per_ip.enter(peer.ip(), max_per_ip) else {
            tracing::debug!(%peer, max_per_ip, "client at server.max_connections_per_ip; closed");
            self.0.shared.metrics.request(
                crate::metrics::RequestKind::Http,
                Some(ErrorKind::ClientConnectionLimit),
            );
            return;
        };
        let mut first = [0u8; 1];
        let timeout = self.0.config.server.header_read_timeout;
        let peeked = tokio::time::timeout(timeout, stream.peek(&mut first)).await;
        match peeked {
            Ok(Ok(1)) => {}
            _ => return,
        }
        let protocol = match first[0] {
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
        match protocol {
            Protocol::Socks5 => socks::serve_socks5(self, stream, peer).await,
            Protocol::Socks4 => socks::serve_socks4(self, stream).await,
            Protocol::Http => http::serve_http(self, stream, peer, Arc::new(slot)).await,
            Protocol::Unknown => {
                let e = GatewayError::new(
                    ErrorKind::ClientMalformed,
                    "unrecognized protocol (expected HTTP, SOCKS5 or SOCKS4)",
                );
                tracing::debug!(%peer, "unrecognized first byte {:#04x}", first[0]);
                self.0
                    .shared
                    .metrics
                    .request(RequestKind::Http, Some(e.kind));
                let mut stream = stream;
                let _ = stream.write_all(&http::raw_error_response(&e)).await;
                let _ = stream.shutdown().await;
            }
        }
    }
}

/// The bound listeners.
#[derive(Debug)]
pub struct Server {
    live: Live,
    listeners: Vec<TcpListener>,
}

impl Server {
    /// Binds every `server.listen` address.
    pub async fn bind(gateway: Gateway) -> io::Result<Server> {
        let mut listeners = Vec::new();
        for addr in &gateway.config().server.listen {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            listeners.push(l);
        }
        Ok(Server {
            live: Live(Arc::new(ArcSwap::new(gateway.0))),
            listeners,
        })
    }

    /// The handle a reload goes through.
    pub fn live(&self) -> Live {
        self.live.clone()
    }

    /// The addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Accepts until shutdown, then drains within `server.shutdown_grace`.
    ///
    /// Every connection, a CONNECT or SOCKS tunnel included, is a task of ours (hyper forgets
    /// upgraded connections), so the drain waits for tunnels too. Returns how many were still
    /// open when the grace period ran out (they end when the runtime stops).
    pub async fn run(self) -> usize {
        let live = self.live;
        let permits = Arc::new(Semaphore::new(
            live.gateway().config().server.max_connections,
        ));
        let mut loops = tokio::task::JoinSet::new();
        for listener in self.listeners {
            loops.spawn(accept_loop(live.clone(), listener, Arc::clone(&permits)));
        }
        while loops.join_next().await.is_some() {}
        let gw = live.gateway();
        let grace = gw.config().server.shutdown_grace;
        let tasks = &gw.0.shared.tasks;
        tasks.close();
        let open = tasks.len();
        if open > 0 {
            tracing::info!(open, ?grace, "draining connections");
        }
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            let left = tasks.len();
            tracing::warn!(open = left, "grace period over; closing the rest");
            return left;
        }
        0
    }
}

async fn accept_loop(live: Live, listener: TcpListener, permits: Arc<Semaphore>) {
    let mut shutdown = live.gateway().shutdown();
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = shutdown.wait() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.wait() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let gw = live.gateway();
                gw.spawn(gw.clone().serve_connection(stream, peer, permit));
            }
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reports an attempt abandoned because the client went away.
pub(crate) fn client_gone(est: Established) {
    est.lease.report(&Outcome::failed(ErrorKind::ClientClosed));
}
