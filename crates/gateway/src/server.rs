//! Listeners and connections: [`Server`] binds every `server.listen` address and accepts;
//! each connection gets the [`Gateway`] in force (`gateway.rs`) and is served here up to its
//! protocol's front end (`http`, `socks`).
//!
//! Each accepted connection takes a permit (`server.max_connections`), gets `TCP_NODELAY`, is
//! checked against the allow-list, and is told apart by the first byte of its first read:
//! `0x05` SOCKS5, `0x04` SOCKS4, an ASCII letter HTTP; anything else is answered 400 and
//! closed. On shutdown the listeners close, kept-alive HTTP connections finish their current
//! request, and open tunnels get `server.shutdown_grace` to end.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use bytes::BytesMut;
use proxygate_core::ErrorKind;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::gateway::{ConnectionSlot, Live, Opened, Tunnel};
use crate::io::Rewind;
use crate::metrics::{Protocol, RequestKind};
use crate::{Gateway, GatewayError, http, socks};

impl Gateway {
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
        if !self.is_allowed(peer.ip()) {
            tracing::info!(%peer, "client not in server.allow; closed");
            return None;
        }
        let Some(per_ip) = self.count_address(peer.ip()) else {
            let max_per_ip = self.config().server.max_connections_per_ip;
            tracing::debug!(%peer, max_per_ip, "client at server.max_connections_per_ip; closed");
            self.metrics().request(
                crate::metrics::RequestKind::Http,
                Some(ErrorKind::ClientConnectionLimit),
            );
            return None;
        };
        // The first read tells the protocol apart and is the start of the request head or the
        // SOCKS greeting (a read, not a peek: one syscall fewer per connection).
        let head_deadline = tokio::time::Instant::now() + self.config().server.header_read_timeout;
        let mut stream = stream;
        let mut first = BytesMut::with_capacity(crate::gateway::FIRST_READ);
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
        let slot = ConnectionSlot::new(permit, per_ip, self.metrics().connection(protocol));
        let opened = Opened {
            first,
            head_deadline,
        };
        // Each protocol's handshake is boxed at its own size and gone when it ends: a tunnel
        // it hands back is relayed in the connection's task itself (`serve_connection`).
        match protocol {
            Protocol::Socks5 => Box::pin(socks::serve_socks5(self, stream, peer, opened))
                .await
                .map(|t| t.holding(slot)),
            Protocol::Socks4 => Box::pin(socks::serve_socks4(self, stream, opened))
                .await
                .map(|t| t.holding(slot)),
            // Awaited apart: a kept-alive connection holds nothing of its first request's state.
            Protocol::Http => match Box::pin(http::serve_first(self, stream, peer, opened)).await {
                http::First::Tunnel(t) => Some(t.holding(slot)),
                http::First::Kept(kept) => Box::pin(http::serve_kept(kept, slot))
                    .await
                    .map(|(t, slot)| t.holding(slot)),
                http::First::Closed => None,
            },
            Protocol::Unknown => {
                let e = GatewayError::new(
                    ErrorKind::ClientMalformed,
                    "unrecognized protocol (expected HTTP, SOCKS5 or SOCKS4)",
                );
                tracing::debug!(%peer, "unrecognized first byte {first_byte:#04x}");
                self.metrics().request(RequestKind::Http, Some(e.kind));
                Box::pin(http::answer_error(&mut stream, &e)).await;
                None
            }
        }
    }
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

/// How often a worker runs its housekeeping: [`Server::on_worker_tick`]'s hook, the release of
/// hyper's state by idle upstream connections, and every [`SWEEP_EVERY`] the sweep of those
/// too old to reuse.
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
            live: Live::new(gateway),
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
    /// path. Every connection, a CONNECT or SOCKS tunnel included, is a task of ours (a
    /// CONNECT that hyper answered is handed back to it, not upgraded in a task of hyper's),
    /// so the drain waits for tunnels too. Returns how many were still open when the grace
    /// period ran out; they are closed as their worker's runtime stops.
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
        let tasks = gw.tasks();
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
    // Housekeeping: the hook each tick; idle upstream connections kept on this worker let go
    // of hyper's state once idle for `server.keepalive_release_after`, and go when they are too
    // old to reuse; then the worker's reuse figures go into the metrics.
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
                let gw = live.gateway();
                crate::http::release_kept(gw.config().server.keepalive_release_after);
                if n % per_sweep == 0 {
                    crate::http::sweep_kept(gw.config().dial.keep_idle);
                }
                crate::http::publish_kept(gw.metrics());
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
            let mut first = bytes::BytesMut::with_capacity(crate::gateway::FIRST_READ);
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
