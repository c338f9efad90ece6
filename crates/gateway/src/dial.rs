//! Upstream dialing: [`Connector`] speaks every upstream scheme once; [`Dialer`] picks
//! upstreams from the pool and retries on another while the failure is the upstream's fault,
//! within `dial.max_attempts` and `dial.retry_deadline`.
//!
//! - `http` / `https`: TCP (and TLS to the proxy), then `CONNECT host:port` with Basic
//!   credentials; or, for absolute-form requests, just the connection (the request is
//!   forwarded in absolute form by [`crate::http`]).
//! - `socks5` (names resolved here) / `socks5h` (names sent to the proxy), with RFC 1929
//!   credentials; `socks4` (IPv4 resolved here) / `socks4a` (names sent), user id = username.
//!
//! A non-2xx answer to CONNECT is classified by status: 401/407 the upstream rejected our
//! credentials, 502 the destination was unreachable, 504 it timed out; anything else is the
//! upstream refusing service. (Implementations disagree on 500/503, so those count as the
//! upstream's.)

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use proxygate_core::{ErrorKind, Host, Outcome, Route, Scheme, Target, Upstream, UpstreamId};
use proxygate_pool::{Lease, PoolReader, Strategy};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_socks::tcp::Socks4Stream;

use crate::auth::basic_value;
use crate::config::DialConfig;
use crate::io::{BoxedIo, Fresh, Rewind};
use crate::policy::Policy;
use crate::{GatewayError, Metrics};

/// Speaks every upstream scheme.
#[derive(Clone)]
pub struct Connector {
    cfg: DialConfig,
    tls: TlsConnector,
    /// Judges the destinations this side resolves (SOCKS5 and SOCKS4 upstreams).
    policy: Policy,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").field("cfg", &self.cfg).finish()
    }
}

/// What a connection through an upstream is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A byte tunnel to the target (CONNECT, SOCKS).
    Tunnel,
    /// An absolute-form HTTP request: HTTP upstreams get the request itself, others a tunnel.
    Forward,
}

/// A connection made through one upstream, before its lease joins it: the stream, what the
/// attempt measured, and where the stream goes.
pub struct Dialed {
    pub io: BoxedIo,
    /// Connect and handshake times, for the outcome.
    pub outcome: Outcome,
    /// `true` when `io` is a connection to an HTTP proxy that expects absolute-form requests
    /// (rather than a tunnel to the target).
    pub to_http_proxy: bool,
}

/// An established connection through an upstream.
pub struct Established {
    pub io: BoxedIo,
    pub lease: Lease,
    /// `true` when `io` is a connection to an HTTP proxy that expects absolute-form requests
    /// (rather than a tunnel to the target).
    pub to_http_proxy: bool,
    /// Connect and handshake times, for the outcome.
    pub outcome: Outcome,
}

impl std::fmt::Debug for Dialed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialed")
            .field("to_http_proxy", &self.to_http_proxy)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Established")
            .field("upstream", &self.lease.upstream().to_string())
            .field("to_http_proxy", &self.to_http_proxy)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Connectors with `cfg`; `policy` judges the destinations they resolve themselves.
    pub fn new(cfg: DialConfig, tls: Arc<rustls::ClientConfig>, policy: Policy) -> Self {
        Self {
            cfg,
            tls: TlsConnector::from(tls),
            policy,
        }
    }

    pub fn config(&self) -> &DialConfig {
        &self.cfg
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// TCP to the upstream, and TLS for `https` upstreams, within `connect_timeout`.
    pub async fn open(&self, up: &Upstream) -> Result<BoxedIo, GatewayError> {
        Ok(self.open_with(up, &[]).await?.0)
    }

    /// [`Connector::open`], with `early` (for a plain `http` upstream, the request that opens
    /// the tunnel) sent the moment the TCP connection is up; returns the stream and how much
    /// of `early` went out (nothing to `https` upstreams).
    ///
    /// On loopback and fast LANs the TCP handshake has usually completed by the time a
    /// non-blocking connect(2) returns: `early` then goes out in the next syscall, and the
    /// first writes of the handshake that follows (a SOCKS greeting, a TLS ClientHello) go
    /// out directly too ([`Fresh`]), without a trip through the event loop to learn that the
    /// socket is writable and without the `SO_ERROR` probe. A send on a socket still
    /// connecting fails with `EAGAIN` (one syscall); the connect is then awaited as usual.
    /// HAProxy sends the same way.
    pub async fn open_with(
        &self,
        up: &Upstream,
        early: &[u8],
    ) -> Result<(BoxedIo, usize), GatewayError> {
        self.open_until(up, early, None).await
    }

    /// [`Connector::open_with`], ending at `outer` (a dial's retry deadline) if that comes
    /// before the connect timeout.
    async fn open_until(
        &self,
        up: &Upstream,
        early: &[u8],
        outer: Option<tokio::time::Instant>,
    ) -> Result<(BoxedIo, usize), GatewayError> {
        let fut = async {
            if up.scheme != Scheme::Https {
                let (tcp, sent) = tcp_connect(up, early).await?;
                return Ok((Box::new(tcp) as BoxedIo, sent));
            }
            let (tcp, _) = tcp_connect(up, &[]).await?;
            let name = match &up.host {
                Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
                Host::Domain(d) => ServerName::try_from(d.clone()).map_err(|_| {
                    GatewayError::new(ErrorKind::UpstreamTls, format!("{up}: invalid TLS name"))
                })?,
            };
            // Boxed: the TLS handshake's state is kilobytes, and inline it would make every
            // plain connect's future that large (moved, not just allocated, at each await).
            let tls = Box::pin(self.tls.connect(name, tcp)).await.map_err(|e| {
                GatewayError::new(ErrorKind::UpstreamTls, format!("{up}: TLS: {e}"))
            })?;
            Ok((Box::new(tls) as BoxedIo, 0))
        };
        // The timer is armed only if the connect has to wait.
        let (deadline, outer_first) = self.deadline(self.cfg.connect_timeout, outer);
        match tokio::time::timeout_at(deadline, fut).await {
            Ok(r) => r,
            Err(_) if outer_first => Err(retry_deadline_passed(up, self.cfg.retry_deadline)),
            Err(_) => Err(connect_timed_out(up, self.cfg.connect_timeout)),
        }
    }

    /// The connection to `up` made now, where that needs no wait: a plain (not TLS) upstream
    /// at an IP address, `early` sent with the connect as [`Connector::open_with`] sends it.
    /// `Later`: the general path ([`Connector::open_until`]) is the one to take.
    fn open_now(&self, up: &Upstream, early: &[u8]) -> OpenNow {
        let Host::Ip(ip) = up.host else {
            return OpenNow::Later;
        };
        if up.scheme == Scheme::Https {
            return OpenNow::Later;
        }
        match connect_and_send(SocketAddr::new(ip, up.port), early) {
            Early::Sent(sock, n) => OpenNow::Open(Fresh::new(sock), n),
            Early::Connecting(sock) => OpenNow::Connecting(sock),
            Early::Failed(e) => OpenNow::Failed(connect_refused(up, e)),
        }
    }

    /// `sock`, a connect to `up` under way, once connected, within the connect timeout (or
    /// `outer`, if that comes first).
    async fn connecting(
        &self,
        up: &Upstream,
        sock: socket2::Socket,
        outer: Option<tokio::time::Instant>,
    ) -> Result<Fresh, GatewayError> {
        let (deadline, outer_first) = self.deadline(self.cfg.connect_timeout, outer);
        match tokio::time::timeout_at(deadline, connected(sock)).await {
            Ok(r) => r.map_err(|e| connect_refused(up, e)),
            Err(_) if outer_first => Err(retry_deadline_passed(up, self.cfg.retry_deadline)),
            Err(_) => Err(connect_timed_out(up, self.cfg.connect_timeout)),
        }
    }

    /// When a phase allowed `limit` from now ends, given `outer` (a dial's retry deadline):
    /// one timer for both, and whether `outer` is the one it stands for. (The phase's future
    /// is awaited in place by the caller: passing it through a helper would move it once more,
    /// and these futures are large.)
    fn deadline(
        &self,
        limit: Duration,
        outer: Option<tokio::time::Instant>,
    ) -> (tokio::time::Instant, bool) {
        Self::deadline_from(tokio::time::Instant::now(), limit, outer)
    }

    /// [`Connector::deadline`] for a phase that starts at `now`.
    fn deadline_from(
        now: tokio::time::Instant,
        limit: Duration,
        outer: Option<tokio::time::Instant>,
    ) -> (tokio::time::Instant, bool) {
        let own = now + limit;
        match outer {
            Some(outer) if outer <= own => (outer, true),
            _ => (own, false),
        }
    }

    /// A tunnel to `target` through `up`'s proxy protocol, within `handshake_timeout`.
    pub async fn handshake(
        &self,
        up: &Upstream,
        io: BoxedIo,
        target: &Target,
    ) -> Result<BoxedIo, GatewayError> {
        let now = tokio::time::Instant::now();
        self.handshake_after(up, io, target, None, None, now).await
    }

    /// [`Connector::handshake`], for an upstream whose first message went out in part already
    /// (an `http` upstream's [`connect_request`], a SOCKS5 upstream's greeting): `unsent` is
    /// the rest. The phase starts at `now` (the caller's clock reading, one fewer here).
    async fn handshake_after(
        &self,
        up: &Upstream,
        io: BoxedIo,
        target: &Target,
        unsent: Option<&[u8]>,
        outer: Option<tokio::time::Instant>,
        now: tokio::time::Instant,
    ) -> Result<BoxedIo, GatewayError> {
        let fut = async {
            match (up.scheme, unsent) {
                (Scheme::Http | Scheme::Https, Some(rest)) => {
                    http_connect_with(up, io, target, rest, self.cfg.max_reply_head_bytes).await
                }
                (Scheme::Http | Scheme::Https, None) => {
                    http_connect(up, io, target, self.cfg.max_reply_head_bytes).await
                }
                (Scheme::Socks5 | Scheme::Socks5h | Scheme::Socks4 | Scheme::Socks4a, _) => {
                    // Boxed: a SOCKS handshake's state (tokio-socks' for SOCKS4 over a
                    // kilobyte, ours for SOCKS5 its 262-byte reply buffer) inline would size
                    // (and move) every handshake, HTTP CONNECTs' too.
                    Box::pin(socks_connect(up, io, target, &self.policy, unsent)).await
                }
            }
        };
        let (deadline, outer_first) = Self::deadline_from(now, self.cfg.handshake_timeout, outer);
        match tokio::time::timeout_at(deadline, fut).await {
            Ok(r) => r,
            Err(_) if outer_first => Err(retry_deadline_passed(up, self.cfg.retry_deadline)),
            Err(_) => Err(GatewayError::new(
                ErrorKind::UpstreamHandshakeTimeout,
                format!(
                    "{up}: no handshake reply within {:?}",
                    self.cfg.handshake_timeout
                ),
            )),
        }
    }
}

fn retry_deadline_passed(up: &Upstream, retry_deadline: Duration) -> GatewayError {
    GatewayError::new(
        ErrorKind::UpstreamHandshakeTimeout,
        format!("{up}: retry deadline ({retry_deadline:?}) passed"),
    )
}

fn connect_refused(up: &Upstream, e: std::io::Error) -> GatewayError {
    GatewayError::new(
        ErrorKind::UpstreamConnectRefused,
        format!("{up}: connect: {e}"),
    )
}

fn connect_timed_out(up: &Upstream, after: Duration) -> GatewayError {
    GatewayError::new(
        ErrorKind::UpstreamConnectTimeout,
        format!("{up}: connect timed out after {after:?}"),
    )
}

/// What [`Connector::open_now`] could do.
enum OpenNow {
    /// Connected, and this many bytes of `early` sent.
    Open(Fresh, usize),
    /// The connect is under way.
    Connecting(socket2::Socket),
    /// Refused, unreachable, or no socket at all.
    Failed(GatewayError),
    /// Not here: TLS, or a name to resolve.
    Later,
}

/// Where a non-blocking connect with an early send stands.
enum Early {
    /// Connected, and this many bytes sent.
    Sent(socket2::Socket, usize),
    /// Still connecting: wait for writability, then read `SO_ERROR`.
    Connecting(socket2::Socket),
    /// Refused, unreachable, or no socket at all.
    Failed(std::io::Error),
}

/// A non-blocking TCP connect to `addr` (`TCP_NODELAY` on) and, when it has already
/// completed, a send of `early`.
fn connect_and_send(addr: SocketAddr, early: &[u8]) -> Early {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = match Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    ) {
        Ok(s) => s,
        Err(e) => return Early::Failed(e),
    };
    let _ = sock.set_tcp_nodelay(true);
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Early::Failed(e),
    }
    // A socket still in SYN_SENT answers EAGAIN; one that was refused meanwhile, its error.
    match sock.send_with_flags(early, crate::io::SEND_FLAGS) {
        Ok(n) => Early::Sent(sock, n),
        Err(e) if crate::io::would_wait(&e) => Early::Connecting(sock),
        Err(e) => Early::Failed(e),
    }
}

/// What opens the handshake with `up`, sent with the connect: a plain HTTP proxy's CONNECT
/// for a tunnel (`forward`: no tunnel, hyper writes the request), a SOCKS5 upstream's
/// greeting. `None`: the send with the connect is of nothing, to learn whether it is done.
fn first_message(up: &Upstream, target: &Target, forward: bool) -> Option<Cow<'static, [u8]>> {
    match up.scheme {
        Scheme::Http if !forward => Some(Cow::Owned(connect_request(up, target))),
        Scheme::Socks5 | Scheme::Socks5h => Some(Cow::Borrowed(crate::socks5_client::greeting(
            up.credentials.is_some(),
        ))),
        _ => None,
    }
}

/// TCP to `up` (each of its name's addresses in turn), `early` sent as soon as it is up.
async fn tcp_connect(up: &Upstream, early: &[u8]) -> Result<(Fresh, usize), GatewayError> {
    let refused = |e| connect_refused(up, e);
    match &up.host {
        Host::Ip(ip) => connect_one(SocketAddr::new(*ip, up.port), early)
            .await
            .map_err(refused),
        Host::Domain(d) => {
            let mut last = None;
            for addr in tokio::net::lookup_host((d.as_str(), up.port))
                .await
                .map_err(refused)?
            {
                match connect_one(addr, early).await {
                    Ok(done) => return Ok(done),
                    Err(e) => last = Some(e),
                }
            }
            Err(refused(last.unwrap_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address")
            })))
        }
    }
}

/// TCP to `addr`, `early` sent as soon as it is up.
async fn connect_one(addr: SocketAddr, early: &[u8]) -> std::io::Result<(Fresh, usize)> {
    match connect_and_send(addr, early) {
        Early::Sent(sock, n) => Ok((Fresh::new(sock), n)),
        Early::Connecting(sock) => Ok((connected(sock).await?, 0)),
        Early::Failed(e) => Err(e),
    }
}

/// `sock`, still connecting, once connected.
async fn connected(sock: socket2::Socket) -> std::io::Result<Fresh> {
    let tcp = TcpStream::from_std(sock.into())?;
    tcp.writable().await?;
    match tcp.take_error()? {
        Some(e) => Err(e),
        None => Ok(Fresh::registered(tcp)),
    }
}

/// The request that opens a tunnel to `target` through the HTTP(S) proxy `up`.
pub(crate) fn connect_request(up: &Upstream, target: &Target) -> Vec<u8> {
    // No fmt (`Ipv4Addr`'s Display was most of a tunnel's formatting); the authority is
    // written once and copied.
    let mut req = Vec::with_capacity(160);
    req.extend_from_slice(b"CONNECT ");
    let at = req.len();
    target.push_authority(&mut req);
    let authority = at..req.len();
    req.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    req.extend_from_within(authority);
    req.extend_from_slice(b"\r\n");
    if let Some(c) = &up.credentials {
        req.extend_from_slice(b"Proxy-Authorization: ");
        req.extend_from_slice(basic_value(c.username.expose(), c.password.expose()).as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    req
}

/// `CONNECT target` through an HTTP(S) proxy.
pub(crate) async fn http_connect(
    up: &Upstream,
    io: BoxedIo,
    target: &Target,
    max_head: usize,
) -> Result<BoxedIo, GatewayError> {
    let req = connect_request(up, target);
    http_connect_with(up, io, target, &req, max_head).await
}

/// `CONNECT target` through an HTTP(S) proxy, `unsent` being what is left to send of its
/// [`connect_request`].
async fn http_connect_with(
    up: &Upstream,
    mut io: BoxedIo,
    target: &Target,
    unsent: &[u8],
    max_head: usize,
) -> Result<BoxedIo, GatewayError> {
    let io_err =
        |e: std::io::Error| GatewayError::new(ErrorKind::UpstreamIo, format!("{up}: CONNECT: {e}"));
    if !unsent.is_empty() {
        io.write_all(unsent).await.map_err(io_err)?;
    }

    // Its own small buffer, not a spare relay one (16 KiB): a handshake may wait long on a slow
    // upstream, and thousands may wait at once.
    let mut buf = BytesMut::with_capacity(1024);
    let (status, head_len) = loop {
        if io.read_buf(&mut buf).await.map_err(io_err)? == 0 {
            return Err(GatewayError::new(
                ErrorKind::UpstreamProtocol,
                format!("{up}: closed before answering CONNECT"),
            ));
        }
        match crate::head::reply(&buf) {
            Ok(httparse::Status::Complete(reply)) => break reply,
            Ok(httparse::Status::Partial) if buf.len() < max_head => {}
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                return Err(GatewayError::new(
                    ErrorKind::UpstreamProtocol,
                    format!("{up}: CONNECT response head too large"),
                ));
            }
            Err(e) => {
                return Err(GatewayError::new(
                    ErrorKind::UpstreamProtocol,
                    format!("{up}: invalid CONNECT response: {e}"),
                ));
            }
        }
    };
    let kind = match status {
        200..=299 => {
            // Nothing after the head, as nearly always: the stream as it is (a split would
            // allocate the buffer's shared header).
            if head_len == buf.len() {
                return Ok(io);
            }
            return Ok(Box::new(Rewind::new(buf.split_off(head_len).freeze(), io)));
        }
        // Some proxies (tinyproxy among them) answer 401 rather than 407; before the tunnel
        // exists no origin can have said it.
        401 | 407 => ErrorKind::UpstreamAuth,
        502 => ErrorKind::TargetUnreachable,
        504 => ErrorKind::TargetTimeout,
        _ => ErrorKind::UpstreamRefused,
    };
    Err(GatewayError::new(
        kind,
        format!("{up}: CONNECT {target} answered {status}"),
    ))
}

/// A SOCKS tunnel through `up`; `unsent`, for SOCKS5, what is left to send of its greeting
/// (`None`: all of it).
pub(crate) async fn socks_connect(
    up: &Upstream,
    io: BoxedIo,
    target: &Target,
    policy: &Policy,
    unsent: Option<&[u8]>,
) -> Result<BoxedIo, GatewayError> {
    let creds = up.credentials.as_ref();
    let remote_dns = matches!(up.scheme, Scheme::Socks5h | Scheme::Socks4a);
    let addr: TargetAddr = match (&target.host, remote_dns) {
        (Host::Ip(ip), _) => TargetAddr::Ip(SocketAddr::new(*ip, target.port)),
        (Host::Domain(d), true) => TargetAddr::Domain(d.clone(), target.port),
        (Host::Domain(d), false) => {
            let want_v4 = matches!(up.scheme, Scheme::Socks4);
            let addr = resolve(d, target.port, want_v4).await?;
            policy.resolved(target, addr.ip())?;
            TargetAddr::Ip(addr)
        }
    };
    let map = |e: tokio_socks::Error| socks_error(up, target, e);
    let stream: BoxedIo = match up.scheme {
        Scheme::Socks5 | Scheme::Socks5h => {
            let dest = match &addr {
                TargetAddr::Ip(a) => crate::socks5_client::Dest::Ip(*a),
                TargetAddr::Domain(d, port) => crate::socks5_client::Dest::Domain(d, *port),
            };
            let creds = creds.map(|c| (c.username.expose(), c.password.expose()));
            crate::socks5_client::connect(up, target, io, dest, creds, unsent).await?
        }
        _ => {
            if let TargetAddr::Ip(a) = &addr
                && a.is_ipv6()
            {
                return Err(GatewayError::new(
                    ErrorKind::TargetUnreachable,
                    format!("{up}: SOCKS4 cannot reach IPv6 target {target}"),
                ));
            }
            let s = match creds {
                Some(c) => {
                    Socks4Stream::connect_with_userid_and_socket(
                        io,
                        addr.as_tokio(),
                        c.username.expose(),
                    )
                    .await
                }
                None => Socks4Stream::connect_with_socket(io, addr.as_tokio()).await,
            }
            .map_err(map)?;
            Box::new(s.into_inner())
        }
    };
    Ok(stream)
}

enum TargetAddr {
    Ip(SocketAddr),
    Domain(String, u16),
}

impl TargetAddr {
    fn as_tokio(&self) -> tokio_socks::TargetAddr<'_> {
        match self {
            TargetAddr::Ip(a) => tokio_socks::TargetAddr::Ip(*a),
            TargetAddr::Domain(d, p) => tokio_socks::TargetAddr::Domain(d.as_str().into(), *p),
        }
    }
}

async fn resolve(host: &str, port: u16, v4_only: bool) -> Result<SocketAddr, GatewayError> {
    let unreachable = |why: String| {
        GatewayError::new(
            ErrorKind::TargetUnreachable,
            format!("resolve {host}: {why}"),
        )
    };
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let mut fallback = None;
    for a in addrs {
        if a.is_ipv4() {
            return Ok(a);
        }
        fallback.get_or_insert(a);
    }
    match fallback {
        Some(a) if !v4_only => Ok(a),
        _ => Err(unreachable("no usable address".into())),
    }
}

fn socks_error(up: &Upstream, target: &Target, e: tokio_socks::Error) -> GatewayError {
    use tokio_socks::Error as E;
    let kind = match &e {
        E::Io(_) => ErrorKind::UpstreamIo,
        E::NoAcceptableAuthMethods
        | E::PasswordAuthFailure(_)
        | E::AuthorizationRequired
        | E::InvalidAuthValues(_)
        | E::IdentdAuthFailure
        | E::InvalidUserIdAuthFailure => ErrorKind::UpstreamAuth,
        E::GeneralSocksServerFailure | E::ConnectionNotAllowedByRuleset => {
            ErrorKind::UpstreamRefused
        }
        E::NetworkUnreachable | E::HostUnreachable => ErrorKind::TargetUnreachable,
        E::ConnectionRefused => ErrorKind::TargetRefused,
        E::TtlExpired => ErrorKind::TargetTimeout,
        _ => ErrorKind::UpstreamProtocol,
    };
    GatewayError::new(kind, format!("{up}: SOCKS to {target}: {e}"))
}

/// How a client asked to be routed: its hints, resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    pub route: Route,
    /// `account NUL session`, so two accounts never share a session.
    pub session_key: Option<String>,
    pub strategy: Option<Strategy>,
}

impl Routing {
    /// Splits a client username into its account and routing; `None` means no hints.
    pub fn from_username(username: Option<&str>) -> Result<(String, Routing), GatewayError> {
        let Some(username) = username else {
            return Ok((String::new(), Routing::default()));
        };
        let invalid = |e: String| GatewayError::new(ErrorKind::RouteInvalid, e);
        let (account, route) = Route::parse(username).map_err(|e| invalid(e.to_string()))?;
        let strategy = route
            .strategy
            .as_deref()
            .map(str::parse::<Strategy>)
            .transpose()
            .map_err(|e| invalid(e.to_string()))?;
        let session_key = route
            .session
            .as_ref()
            .map(|s| proxygate_pool::sessions::key(account, s));
        Ok((
            account.to_owned(),
            Routing {
                route,
                session_key,
                strategy,
            },
        ))
    }
}

/// The attempts left for one client request.
#[derive(Debug)]
pub struct Budget {
    metrics: Arc<Metrics>,
    pool: PoolReader,
    /// The target's site (see `proxygate_pool::sites`), worked out when first needed.
    target: Target,
    site: Option<String>,
    routing: Routing,
    tried: Vec<UpstreamId>,
    max_attempts: usize,
    deadline: tokio::time::Instant,
    last: Option<GatewayError>,
    /// A hedge was started for this request (at most one is).
    hedged: bool,
}

impl Budget {
    /// Records a failed attempt on `lease` (reporting it to the pool); returns whether another
    /// upstream may be tried.
    pub fn fail(&mut self, lease: Lease, err: GatewayError) -> bool {
        tracing::debug!(upstream = %lease.upstream(), error = %err, "attempt failed");
        self.metrics.failure(err.kind);
        if err.kind == ErrorKind::UpstreamRefused {
            // It refused this destination: blocked there, perhaps not elsewhere.
            let site = self.site().to_owned();
            self.pool
                .site_outcome(lease.id(), true, || site, Instant::now());
        }
        if !self.tried.contains(&lease.id()) {
            self.tried.push(lease.id());
        }
        lease.report(&Outcome::failed(err.kind));
        let retry = err.kind.is_retryable() && self.has_time() && self.has_attempts();
        self.last = Some(err);
        retry
    }

    pub fn routing(&self) -> &Routing {
        &self.routing
    }

    /// The target's site: its registrable domain, or the address.
    pub fn site(&mut self) -> &str {
        let target = &self.target;
        self.site
            .get_or_insert_with(|| proxygate_pool::sites::site_of_target(target))
    }

    fn has_time(&self) -> bool {
        tokio::time::Instant::now() < self.deadline
    }

    fn has_attempts(&self) -> bool {
        self.tried.len() < self.max_attempts
    }

    /// The error to answer with once no attempt is left.
    pub fn exhausted(&mut self) -> GatewayError {
        let tried = self.tried.len();
        match self.last.take() {
            Some(e) if tried > 1 => GatewayError::new(
                e.kind,
                format!("{tried} upstreams failed; last: {}", e.detail),
            ),
            Some(e) => e,
            None if tried == 0 && self.routing.route.has_filters() => GatewayError::new(
                ErrorKind::NoUpstream,
                format!("no upstream matches {}", self.routing.route),
            ),
            None if tried == 0
                && self.routing.session_key.is_some()
                && !self.pool.snapshot().is_empty() =>
            {
                GatewayError::new(
                    ErrorKind::NoUpstream,
                    "no upstream left for this new session: every one exits from the address \
                     this client's previous session had (pool.new_session_exit = different)",
                )
            }
            None if tried == 0 => {
                GatewayError::new(ErrorKind::NoUpstream, "no upstream in the pool")
            }
            None => GatewayError::new(ErrorKind::NoUpstream, "no untried upstream left"),
        }
    }
}

/// Picks upstreams and retries.
#[derive(Debug, Clone)]
pub struct Dialer {
    pool: PoolReader,
    connector: Connector,
    metrics: Arc<Metrics>,
    hedging: Arc<Hedging>,
}

/// What hedged connects go by, shared by every clone of a dialer.
#[derive(Debug, Default)]
struct Hedging {
    /// A running estimate of the p95 of the time successful attempts took to an established
    /// tunnel (connect and handshake), in µs as `f64` bits; 0 before any.
    p95_us: AtomicU64,
    /// Hedge credit in thousandths of a hedge: each attempt earns `dial.hedge_ratio` of one, a
    /// hedge spends one, and at most [`HEDGE_BURST`] are banked.
    credit: AtomicI64,
}

/// Hedges banked at most (credit earned while none was needed).
const HEDGE_BURST: i64 = 10;
/// How far one sample moves the p95 estimate: up by `0.95 * STEP` when above it, down by
/// `0.05 * STEP` when not, which settles where 5 % of samples are above it.
const P95_STEP: f64 = 0.05;

impl Hedging {
    /// Feeds one successful attempt's time to an established tunnel.
    ///
    /// The first one starts the estimate at no more than `floor` (`dial.hedge_min_delay`):
    /// the estimate climbs nineteen times faster than it falls (that is what settles it at the
    /// p95), so a slow first attempt, say the first one after a start through an upstream that
    /// answers in seconds, would hold hedging off for a thousand attempts; one that starts low
    /// costs at most some early hedges, and the budget bounds those.
    fn observe(&self, took: Duration, floor: Duration) {
        let t = took.as_secs_f64() * 1e6;
        let cur = f64::from_bits(self.p95_us.load(Ordering::Relaxed));
        let next = if cur <= 0.0 || !cur.is_finite() {
            t.min(floor.as_secs_f64() * 1e6)
        } else if t > cur {
            cur * (1.0 + 0.95 * P95_STEP)
        } else {
            cur * (1.0 - 0.05 * P95_STEP)
        };
        self.p95_us.store(next.to_bits(), Ordering::Relaxed);
    }

    /// How long an attempt may take before it is hedged: the recent p95, within the bounds
    /// (the upper bound before anything was measured).
    fn delay(&self, cfg: &DialConfig) -> Duration {
        let p95 = f64::from_bits(self.p95_us.load(Ordering::Relaxed));
        if p95 <= 0.0 || !p95.is_finite() {
            return cfg.hedge_max_delay;
        }
        Duration::from_secs_f64(p95 / 1e6).clamp(cfg.hedge_min_delay, cfg.hedge_max_delay)
    }

    /// One attempt's worth of credit.
    fn earn(&self, ratio: f64) {
        let add = (ratio * 1000.0) as i64;
        let _ = self
            .credit
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some((c + add).min(HEDGE_BURST * 1000))
            });
    }

    /// Spends one hedge's credit, if there is that much.
    fn spend(&self) -> bool {
        self.credit
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                (c >= 1000).then_some(c - 1000)
            })
            .is_ok()
    }

    fn refund(&self) {
        self.credit.fetch_add(1000, Ordering::Relaxed);
    }
}

/// One attempt's result, with its lease.
type Attempt = (Lease, Result<Dialed, GatewayError>);

impl Dialer {
    pub fn new(pool: PoolReader, connector: Connector, metrics: Arc<Metrics>) -> Self {
        Self {
            pool,
            connector,
            metrics,
            hedging: Arc::default(),
        }
    }

    pub fn pool(&self) -> &PoolReader {
        &self.pool
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// A fresh retry budget for one client request: `dial.max_attempts` upstreams within
    /// `dial.retry_deadline` from now.
    pub fn budget(&self, mut routing: Routing, target: &Target) -> Budget {
        let cfg = self.connector.config();
        if routing.route.min_tier.is_none() {
            routing.route.min_tier = Some(cfg.min_tier);
        }
        Budget {
            metrics: Arc::clone(&self.metrics),
            pool: self.pool.clone(),
            target: target.clone(),
            site: None,
            routing,
            tried: Vec::new(),
            max_attempts: cfg.max_attempts as usize,
            deadline: tokio::time::Instant::now() + cfg.retry_deadline,
            last: None,
            hedged: false,
        }
    }

    /// Connects to `target` through some upstream for `purpose` with a fresh [`Budget`].
    pub async fn dial(
        &self,
        target: &Target,
        purpose: Purpose,
        routing: Routing,
    ) -> Result<Established, GatewayError> {
        self.dial_within(target, purpose, &mut self.budget(routing, target))
            .await
    }

    /// Connects to `target` through some upstream not yet tried in `budget`, trying another
    /// after each upstream-side failure while the budget lasts. Every failed attempt is
    /// reported to the pool here; the returned lease is the caller's to report.
    pub async fn dial_within(
        &self,
        target: &Target,
        purpose: Purpose,
        budget: &mut Budget,
    ) -> Result<Established, GatewayError> {
        let ratio = self.connector.config().hedge_ratio;
        while let Some(lease) = self.pick(budget, None) {
            let hedgeable = purpose == Purpose::Tunnel && ratio > 0.0;
            if hedgeable {
                self.hedging.earn(ratio);
            }
            // A sticky session asked for its exit: never hedged onto another.
            let (lease, result) =
                if hedgeable && !budget.hedged && budget.routing.session_key.is_none() {
                    self.hedged(lease, target, budget).await
                } else {
                    // Not `connect`: the success is observed once, below, hedged or not.
                    let r = self
                        .connect_until(&lease, target, purpose, budget.deadline)
                        .await;
                    (lease, r)
                };
            match result {
                Ok(Dialed {
                    io,
                    outcome,
                    to_http_proxy,
                }) => {
                    self.observe(&outcome);
                    return Ok(Established {
                        io,
                        lease,
                        to_http_proxy,
                        outcome,
                    });
                }
                Err(e) => {
                    if !budget.fail(lease, e) {
                        break;
                    }
                }
            }
        }
        Err(budget.exhausted())
    }

    /// A tunnel attempt through `lease`, hedged: if it has not completed within the recent p95
    /// of attempts (`dial.hedge_min_delay`..`dial.hedge_max_delay`) and the hedge budget
    /// allows, a second attempt starts on another upstream, and the first of them to succeed
    /// serves. The other goes on in the background until it ends, its tunnel (if any) is
    /// closed, and its outcome is reported to its upstream as it was. A failure of one waits
    /// for the other. Nothing has reached the client yet: this is all before the first byte.
    async fn hedged(&self, lease: Lease, target: &Target, budget: &mut Budget) -> Attempt {
        let cfg = self.connector.config();
        let mut first = Box::pin(self.owned_attempt(lease, target.clone(), budget.deadline));
        if let Ok(done) = tokio::time::timeout(self.hedging.delay(cfg), &mut first).await {
            return done;
        }
        if !self.hedging.spend() {
            return first.await;
        }
        let Some(lease2) = self.pick(budget, None) else {
            self.hedging.refund();
            return first.await;
        };
        budget.hedged = true;
        tracing::debug!(
            hedge = %lease2.upstream(),
            "attempt slower than the pool's recent p95: hedging on another upstream"
        );
        let mut second = Box::pin(self.owned_attempt(lease2, target.clone(), budget.deadline));
        // Whichever ends first: a success serves; a failure waits for the other.
        let (done, hedge_ended_first) = tokio::select! {
            done = &mut first => (done, false),
            done = &mut second => (done, true),
        };
        let other = if hedge_ended_first { first } else { second };
        match done {
            (lease, Ok(ok)) => {
                self.metrics.hedge(hedge_ended_first);
                self.finish_in_background(other);
                (lease, Ok(ok))
            }
            (lease, Err(e)) => {
                budget.fail(lease, e);
                let done = other.await;
                if done.1.is_ok() {
                    self.metrics.hedge(!hedge_ended_first);
                }
                done
            }
        }
    }

    /// An attempt that owns what it needs, so the loser of a hedge can finish on its own.
    fn owned_attempt(
        &self,
        lease: Lease,
        target: Target,
        deadline: tokio::time::Instant,
    ) -> impl Future<Output = Attempt> + Send + 'static {
        let this = self.clone();
        async move {
            let r = this
                .connect_until(&lease, &target, Purpose::Tunnel, deadline)
                .await;
            (lease, r)
        }
    }

    /// Lets the attempt that lost a hedge run to its end: a tunnel it opens is closed at once,
    /// and its outcome (success with its times, or its failure) goes to its upstream.
    fn finish_in_background(&self, attempt: impl Future<Output = Attempt> + Send + 'static) {
        let metrics = Arc::clone(&self.metrics);
        tokio::spawn(async move {
            let (lease, r) = attempt.await;
            match r {
                Ok(Dialed { io, outcome, .. }) => {
                    drop(io);
                    lease.report(&outcome);
                }
                Err(e) => {
                    metrics.failure(e.kind);
                    lease.report(&Outcome::failed(e.kind));
                }
            }
        });
    }

    /// The next upstream to try within `budget`: `prefer` when it is still in the pool, out of
    /// backoff and not tried yet (a client connection keeping its upstream), else one the
    /// strategy picks. `None` when the budget's attempts are spent or nothing fits. The lease
    /// counts as an attempt.
    pub fn pick(&self, budget: &mut Budget, prefer: Option<UpstreamId>) -> Option<Lease> {
        if budget.tried.len() >= budget.max_attempts {
            return None;
        }
        let r = &budget.routing;
        let preferred = prefer
            .filter(|id| !budget.tried.contains(id))
            .and_then(|id| self.pool.lease_fitting(id, &r.route));
        let mut lease = match preferred {
            Some(l) => l,
            None => self.pool.select_route(
                &r.route,
                r.session_key.as_deref(),
                r.strategy,
                &budget.tried,
            )?,
        };
        // Upstreams blocked for this site are passed over while others are left (a sticky
        // session keeps its exit: it asked for it).
        if budget.routing.session_key.is_none() && self.pool.site_entries() > 0 {
            lease = self.avoid_blocked(lease, budget);
        }
        if lease.is_panic_mode() {
            tracing::info!(
                upstream = %lease.upstream(),
                panic_selections = self.pool.panic_selections(),
                "no selectable upstream left: trying the least bad one (panic mode)"
            );
        }
        // Held for the whole dial and tunnel: keep the upstream, not the pool's snapshot.
        lease.detach();
        let strategy = budget
            .routing
            .strategy
            .unwrap_or_else(|| self.pool.strategy());
        self.metrics.attempt(strategy, !budget.tried.is_empty());
        budget.tried.push(lease.id());
        Some(lease)
    }

    /// `lease`, or (when its upstream is blocked for the budget's site) another the strategy
    /// picks that is not, trying a few; the last pick when every one was blocked.
    fn avoid_blocked(&self, mut lease: Lease, budget: &mut Budget) -> Lease {
        const REPICKS: usize = 4;
        let now = Instant::now();
        let site = budget.site().to_owned();
        if !self.pool.site_blocked(lease.id(), &site, now) {
            return lease;
        }
        let mut avoid = budget.tried.clone();
        for _ in 0..REPICKS {
            avoid.push(lease.id());
            let r = &budget.routing;
            match self.pool.select_route(&r.route, None, r.strategy, &avoid) {
                Some(next) => {
                    lease = next;
                    if !self.pool.site_blocked(lease.id(), &site, now) {
                        break;
                    }
                }
                None => break,
            }
        }
        lease
    }

    /// One attempt through `lease`'s upstream to `target`, within the budget's deadline:
    /// the connection (TLS included), and the proxy handshake unless `purpose` is
    /// [`Purpose::Forward`] through an HTTP upstream.
    pub async fn connect(
        &self,
        lease: &Lease,
        target: &Target,
        purpose: Purpose,
        budget: &Budget,
    ) -> Result<Dialed, GatewayError> {
        let r = self
            .connect_until(lease, target, purpose, budget.deadline)
            .await;
        if let Ok(dialed) = &r {
            self.observe(&dialed.outcome);
        }
        r
    }

    /// Feeds the hedging p95 with what a client waited for: the attempts that served (the
    /// loser of a hedge does not count, or the tail hedging cuts would set the delay).
    fn observe(&self, outcome: &Outcome) {
        if let (Some(connect), Some(handshake)) = (outcome.connect, outcome.handshake) {
            self.hedging
                .observe(connect + handshake, self.connector.config().hedge_min_delay);
        }
    }

    /// One attempt through `lease`'s upstream to `target`, within `deadline` (the retry
    /// deadline bounds the connect and the handshake through their own timers: one timer per
    /// phase, not one more around both). Established ones are counted in the metrics.
    async fn connect_until(
        &self,
        lease: &Lease,
        target: &Target,
        purpose: Purpose,
        deadline: tokio::time::Instant,
    ) -> Result<Dialed, GatewayError> {
        let up = lease.upstream();
        let t0 = Instant::now();
        let forward = purpose == Purpose::Forward && up.scheme.is_http();
        let early = first_message(up, target, forward);
        let early_bytes = early.as_deref().unwrap_or_default();
        // Where it can, the connection is made here and now (a loopback or LAN upstream is
        // usually connected by the time connect(2) returns), without the general path's
        // future, which is large and would size (and be moved with) every attempt.
        let (io, sent): (BoxedIo, usize) = match self.connector.open_now(up, early_bytes) {
            OpenNow::Open(fresh, sent) => (Box::new(fresh), sent),
            OpenNow::Connecting(sock) => {
                let fresh = self.connector.connecting(up, sock, Some(deadline)).await?;
                (Box::new(fresh), 0)
            }
            OpenNow::Failed(e) => return Err(e),
            OpenNow::Later => {
                Box::pin(self.connector.open_until(up, early_bytes, Some(deadline))).await?
            }
        };
        let connected = Instant::now();
        let connect = connected.saturating_duration_since(t0);
        let mut outcome = Outcome {
            connect: Some(connect),
            ..Outcome::default()
        };
        if !forward {
            let unsent = early.as_ref().map(|req| &req[sent..]);
            let io = self
                .connector
                .handshake_after(up, io, target, unsent, Some(deadline), connected.into())
                .await?;
            outcome.handshake = Some(connected.elapsed());
            self.metrics.established(connect, outcome.handshake);
            return Ok(Dialed {
                io,
                outcome,
                to_http_proxy: false,
            });
        }
        self.metrics.established(connect, None);
        Ok(Dialed {
            io,
            outcome,
            to_http_proxy: true,
        })
    }
}

#[cfg(test)]
mod hedging_tests {
    use super::*;

    fn cfg() -> DialConfig {
        DialConfig::default()
    }

    #[test]
    fn the_delay_follows_the_p95_within_its_bounds() {
        let h = Hedging::default();
        // Nothing measured: the upper bound.
        assert_eq!(h.delay(&cfg()), cfg().hedge_max_delay);
        // 95 % of attempts at 200 ms, 5 % at 1 s: the estimate settles between them.
        for i in 0..20_000 {
            let ms = if i % 20 == 0 { 1000 } else { 200 };
            h.observe(Duration::from_millis(ms), cfg().hedge_min_delay);
        }
        let d = h.delay(&cfg());
        assert!(
            d > Duration::from_millis(190) && d < Duration::from_millis(1100),
            "{d:?}"
        );
        // All fast: the lower bound.
        for _ in 0..20_000 {
            h.observe(Duration::from_millis(1), cfg().hedge_min_delay);
        }
        assert_eq!(h.delay(&cfg()), cfg().hedge_min_delay);
        // All very slow: the upper bound.
        for _ in 0..20_000 {
            h.observe(Duration::from_secs(30), cfg().hedge_min_delay);
        }
        assert_eq!(h.delay(&cfg()), cfg().hedge_max_delay);
    }

    #[test]
    fn a_slow_first_attempt_does_not_hold_hedging_off() {
        let min = Duration::from_millis(100);
        // The first attempt after a start took 2 s (a slow upstream), the next ones 5 ms: the
        // delay is at its lower bound at once, not a thousand attempts later.
        let h = Hedging::default();
        h.observe(Duration::from_secs(2), min);
        for _ in 0..20 {
            h.observe(Duration::from_millis(5), min);
        }
        assert_eq!(h.delay(&cfg()), min.max(cfg().hedge_min_delay));
        // Starting low, a pool that really is slow is followed up within some tens.
        let h = Hedging::default();
        for _ in 0..80 {
            h.observe(Duration::from_millis(800), min);
        }
        let d = h.delay(&cfg());
        assert!(
            d > Duration::from_millis(700) && d < Duration::from_millis(900),
            "{d:?}"
        );
    }

    /// One established tunnel is one sample of the estimate, hedged or not: the dial loop
    /// also fed its successes through `connect`, and every unhedged one moved it twice.
    #[tokio::test]
    async fn one_dial_is_one_sample() {
        use std::io::{Read, Write};
        // An HTTP upstream that answers every CONNECT with a 200 and keeps the tunnel open.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut open = Vec::new();
            for s in l.incoming() {
                let mut s = s.unwrap();
                let mut head = Vec::new();
                let mut buf = [0u8; 512];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                open.push(s);
            }
        });
        let (reader, writer) = proxygate_pool::Pool::create(
            Strategy::default(),
            proxygate_pool::HealthConfig::default(),
        );
        writer.replace([Upstream::parse(&format!("http://{addr}")).unwrap()]);
        // Every real attempt takes longer than this floor: the first sample sets the estimate
        // to it, and a second one would move it up.
        let floor = Duration::from_nanos(1);
        for ratio in [0.0, 1.0] {
            let cfg = DialConfig {
                hedge_ratio: ratio,
                hedge_min_delay: floor,
                ..DialConfig::default()
            };
            let connector = Connector::new(
                cfg,
                crate::tls::client_config(None).unwrap(),
                Policy::default(),
            );
            let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
            let dialer = Dialer::new(reader.clone(), connector, metrics);
            let target = Target::parse_authority("a.example:443").unwrap();
            let est = dialer
                .dial(&target, Purpose::Tunnel, Routing::default())
                .await
                .unwrap();
            assert!(!est.to_http_proxy);
            let p95 = f64::from_bits(dialer.hedging.p95_us.load(Ordering::Relaxed));
            assert_eq!(p95, floor.as_secs_f64() * 1e6, "hedge_ratio {ratio}");
        }
    }

    #[test]
    fn hedges_are_a_bounded_share_of_attempts() {
        let h = Hedging::default();
        assert!(!h.spend(), "no credit before any attempt");
        let mut hedges = 0;
        for _ in 0..1000 {
            h.earn(0.1);
            if h.spend() {
                hedges += 1;
            }
        }
        assert_eq!(hedges, 100);
        // Credit banks up to a burst, no more.
        for _ in 0..10_000 {
            h.earn(0.1);
        }
        let burst = std::iter::from_fn(|| h.spend().then_some(())).count();
        assert_eq!(burst as i64, HEDGE_BURST);
        h.refund();
        assert!(h.spend());
    }
}

#[cfg(test)]
mod early_tests {
    use super::*;
    use std::io::Read;

    fn connector(connect_timeout: Duration) -> Connector {
        let cfg = DialConfig {
            connect_timeout,
            ..DialConfig::default()
        };
        Connector::new(
            cfg,
            crate::tls::client_config(None).unwrap(),
            Policy::default(),
        )
    }

    fn http(addr: SocketAddr) -> Upstream {
        Upstream::parse(&format!("http://{addr}")).unwrap()
    }

    /// A listener whose accept queue is full: a further SYN is dropped, so a connect to it
    /// stays in SYN_SENT until the queue has room and the SYN is sent again (after ~1 s).
    fn full_listener() -> (socket2::Socket, socket2::Socket) {
        use socket2::{Domain, Socket, Type};
        let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        l.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        l.listen(0).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        for _ in 0..16 {
            match connect_and_send(addr, b"") {
                Early::Sent(..) => {}
                Early::Connecting(s) => return (l, s),
                Early::Failed(e) => panic!("{e}"),
            }
        }
        panic!("the accept queue never filled");
    }

    #[tokio::test]
    async fn the_connect_request_goes_out_with_the_connect() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let up = http(l.local_addr().unwrap());
        let req = b"CONNECT a:1 HTTP/1.1\r\n\r\n";
        let c = connector(Duration::from_secs(1));
        // Loopback connects within connect(2), unless the kernel deferred its packet work
        // (a loaded box): a few tries.
        let mut early = false;
        for _ in 0..20 {
            let (mut io, sent) = c.open_with(&up, req).await.unwrap();
            io.write_all(&req[sent..]).await.unwrap();
            let (mut s, _) = l.accept().unwrap();
            let mut got = [0u8; 24];
            s.read_exact(&mut got).unwrap();
            assert_eq!(&got, req);
            if sent == req.len() {
                early = true;
                break;
            }
        }
        assert!(early, "the request never went out with the connect");
    }

    #[tokio::test]
    async fn an_ipv6_upstream_gets_its_request_with_the_connect_too() {
        let Ok(l) = std::net::TcpListener::bind("[::1]:0") else {
            return; // no IPv6 loopback on this machine
        };
        let up = http(l.local_addr().unwrap());
        let req = b"CONNECT a:1 HTTP/1.1\r\n\r\n";
        let (mut io, sent) = connector(Duration::from_secs(1))
            .open_with(&up, req)
            .await
            .unwrap();
        io.write_all(&req[sent..]).await.unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut got = [0u8; 24];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, req);
    }

    /// A named upstream is resolved and its addresses tried in turn (where `localhost` gives
    /// ::1 first, nothing listens there and 127.0.0.1 serves).
    #[tokio::test]
    async fn a_named_upstream_is_tried_at_each_address() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(("localhost", port)).await {
            Ok(a) => a.collect(),
            Err(_) => return,
        };
        if !addrs.iter().any(|a| a.is_ipv4()) {
            return; // this machine's localhost is not 127.0.0.1
        }
        let up = Upstream::parse(&format!("socks5://localhost:{port}")).unwrap();
        let mut io = connector(Duration::from_secs(1)).open(&up).await.unwrap();
        io.write_all(b"hi").await.unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut got = [0u8; 2];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
    }

    #[tokio::test]
    async fn a_refused_connect_is_the_upstreams_refusal() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = connector(Duration::from_secs(1))
            .open_with(&http(addr), b"CONNECT a:1 HTTP/1.1\r\n\r\n")
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::UpstreamConnectRefused, "{e}");
    }

    #[tokio::test]
    async fn a_connect_still_pending_times_out() {
        let (l, _pending) = full_listener();
        let up = http(l.local_addr().unwrap().as_socket().unwrap());
        let e = connector(Duration::from_millis(200))
            .open_with(&up, b"CONNECT a:1 HTTP/1.1\r\n\r\n")
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::UpstreamConnectTimeout, "{e}");
    }

    /// When the connect completes only later, the whole request is sent through the
    /// registered stream, and the reply read as usual.
    #[tokio::test]
    async fn a_connect_completing_later_sends_the_request_then() {
        let (l, sock) = full_listener();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let target = Target::parse_authority("example.com:443").unwrap();
        let up = http(addr);
        let req = connect_request(&up, &target);
        let c = connector(Duration::from_secs(10));
        // Accepting makes room in the queue: the SYN goes through when the kernel sends it
        // again (the connections queued before close at once).
        let server = std::thread::spawn(move || {
            for _ in 0..20 {
                let (mut s, _) = l.accept().unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                if !head.is_empty() {
                    std::io::Write::write_all(&mut s, b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
                    return (head, s);
                }
            }
            panic!("no request");
        });
        let io: BoxedIo = Box::new(connected(sock).await.unwrap());
        let _io = c
            .handshake_after(
                &up,
                io,
                &target,
                Some(&req[..]),
                None,
                tokio::time::Instant::now(),
            )
            .await
            .unwrap();
        let (head, _s) = server.join().unwrap();
        assert_eq!(head, req);
    }

    /// Bytes that came in the reply's read, after its head, are the tunnel's first.
    #[tokio::test]
    async fn bytes_sent_with_the_connect_reply_come_first_through_the_tunnel() {
        let up = http("127.0.0.1:1".parse().unwrap());
        let target = Target::parse_authority("a:1").unwrap();
        for (reply, then) in [
            (
                &b"HTTP/1.1 200 Connection established\r\n\r\nBANNER"[..],
                &b"BANNER"[..],
            ),
            (
                &b"HTTP/1.1 200 Connection established\r\n\r\n"[..],
                &b""[..],
            ),
        ] {
            let (near, mut far) = crate::io::tcp_pair().await;
            let (replied, later) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(async move {
                let mut req = Vec::new();
                while !req.ends_with(b"\r\n\r\n") {
                    let mut b = [0u8; 1];
                    far.read_exact(&mut b).await.unwrap();
                    req.push(b[0]);
                }
                far.write_all(reply).await.unwrap();
                // The rest once the handshake is over (else a read may take both at once).
                later.await.unwrap();
                far.write_all(b"-later").await.unwrap();
                far
            });
            let mut io = http_connect(&up, Box::new(Fresh::registered(near)), &target, 8192)
                .await
                .unwrap();
            replied.send(()).unwrap();
            let mut got = vec![0u8; then.len() + 6];
            io.read_exact(&mut got).await.unwrap();
            assert_eq!(&got[..then.len()], then);
            assert_eq!(&got[then.len()..], b"-later");
            drop(server.await.unwrap());
        }
    }

    #[test]
    fn the_connect_request_names_the_target_twice_and_carries_credentials() {
        let up = Upstream::parse("http://user:pa%3Ass@127.0.0.1:3128").unwrap();
        let v6 = Target::parse_authority("[::1]:443").unwrap();
        assert_eq!(
            String::from_utf8(connect_request(&up, &v6)).unwrap(),
            "CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\
             Proxy-Authorization: Basic dXNlcjpwYTpzcw==\r\n\r\n"
        );
        let plain = Upstream::parse("http://127.0.0.1:3128").unwrap();
        let name = Target::parse_authority("example.com:80").unwrap();
        assert_eq!(
            String::from_utf8(connect_request(&plain, &name)).unwrap(),
            "CONNECT example.com:80 HTTP/1.1\r\nHost: example.com:80\r\n\r\n"
        );
    }

    #[test]
    fn the_first_message_goes_out_with_the_connect_where_there_is_one() {
        let target = Target::parse_authority("example.com:443").unwrap();
        let first = |url: &str, forward: bool| {
            first_message(&Upstream::parse(url).unwrap(), &target, forward).map(Cow::into_owned)
        };
        assert_eq!(
            first("http://127.0.0.1:3128", false),
            Some(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n".to_vec())
        );
        // A forwarded request is hyper's to write.
        assert_eq!(first("http://127.0.0.1:3128", true), None);
        // A SOCKS5 upstream's greeting, one method offered: the send with the connect is not
        // one of nothing, and the handshake does not send it again.
        assert_eq!(first("socks5://127.0.0.1:1080", false), Some(vec![5, 1, 0]));
        assert_eq!(
            first("socks5h://u:p@127.0.0.1:1080", false),
            Some(vec![5, 1, 2])
        );
        // SOCKS4's request goes through tokio-socks; TLS first for HTTPS.
        assert_eq!(first("socks4a://127.0.0.1:1080", false), None);
        assert_eq!(first("https://127.0.0.1:3129", false), None);
    }

    /// A connector whose own timeouts are long (10 s), and an upstream that accepts but never
    /// answers.
    fn slow_connector_and_silent_upstream() -> (Connector, std::net::TcpListener, Upstream) {
        let mut c = connector(Duration::from_secs(10));
        c.cfg.handshake_timeout = Duration::from_secs(10);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let up = http(l.local_addr().unwrap());
        (c, l, up)
    }

    /// The error of a handshake with a silent upstream through `c`, given `deadline`.
    async fn silent_handshake(c: &Connector, up: &Upstream, deadline: Instant) -> GatewayError {
        let target = Target::parse_authority("example.com:443").unwrap();
        let deadline = tokio::time::Instant::from_std(deadline);
        let (io, _) = c.open_until(up, b"", Some(deadline)).await.unwrap();
        c.handshake_after(
            up,
            io,
            &target,
            None,
            Some(deadline),
            tokio::time::Instant::now(),
        )
        .await
        .err()
        .unwrap()
    }

    #[tokio::test]
    async fn the_retry_deadline_ends_a_handshake_before_its_own_timeout() {
        let (c, _l, up) = slow_connector_and_silent_upstream();
        let t0 = Instant::now();
        let e = silent_handshake(&c, &up, t0 + Duration::from_millis(300)).await;
        assert_eq!(e.kind, ErrorKind::UpstreamHandshakeTimeout);
        assert!(e.detail.contains("retry deadline"), "{}", e.detail);
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_handshake_timeout_before_the_retry_deadline_is_the_handshakes() {
        let (mut c, _l, up) = slow_connector_and_silent_upstream();
        c.cfg.handshake_timeout = Duration::from_millis(200);
        let deadline = tokio::time::Instant::now().into_std() + Duration::from_secs(60);
        let e = silent_handshake(&c, &up, deadline).await;
        assert_eq!(e.kind, ErrorKind::UpstreamHandshakeTimeout);
        assert!(e.detail.contains("no handshake reply"), "{}", e.detail);
    }

    #[tokio::test]
    async fn the_retry_deadline_ends_a_connect_left_waiting() {
        let (l, _pending) = full_listener();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let (c, _silent, _) = slow_connector_and_silent_upstream();
        let t0 = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        let e = c
            .open_until(&http(addr), b"", Some(deadline))
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::UpstreamHandshakeTimeout);
        assert!(e.detail.contains("retry deadline"), "{}", e.detail);
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }
}
/// The futures of a dial are moved (memcpy) each time they are wrapped or boxed on the way
/// to the task; a kilobyte of SOCKS or TLS handshake state inline in every plain CONNECT cost
/// ~1,000 instructions per tunnel. Those two are boxed; this keeps them so.
#[cfg(test)]
mod future_sizes {
    use super::*;

    #[tokio::test]
    async fn the_connect_and_handshake_futures_stay_small() {
        let c = Connector::new(
            DialConfig::default(),
            crate::tls::client_config(None).unwrap(),
            Policy::default(),
        );
        let up = Upstream::parse("http://127.0.0.1:1").unwrap();
        let target = Target::parse_authority("a.example:1").unwrap();
        let io: BoxedIo = Box::new(tokio::io::duplex(1).0);
        let handshake = std::mem::size_of_val(&c.handshake_after(
            &up,
            io,
            &target,
            None,
            None,
            tokio::time::Instant::now(),
        ));
        let open = std::mem::size_of_val(&c.open_until(&up, b"", None));
        // Unboxed they were 1,456 and 1,336 bytes (debug build).
        assert!(handshake <= 1024, "handshake future: {handshake} bytes");
        assert!(open <= 1024, "connect future: {open} bytes");
    }
}
