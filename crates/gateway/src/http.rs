//! The HTTP/1.1 front end, on hyper: `CONNECT host:port` tunnels and absolute-form requests
//! (`GET http://host/path`, any method, sized or chunked bodies, keep-alive).
//!
//! The first request head is read here before hyper sees the connection, so garbage, an
//! oversized head or a slow client gets our typed answer with a `Proxy-Status` header (hyper's
//! own error answers have none); later requests on a kept-alive connection are hyper's to
//! parse, until the connection idles past `server.keepalive_release_after`: hyper lets it go
//! with its buffers (`park`), and its next head is read here again, as a first one is. A
//! CONNECT, first or later, turns the connection into a tunnel handed back to the listener.
//!
//! Forwarding: hop-by-hop headers and every header named in `Connection` are removed both ways,
//! `Host` is rebuilt from the URI, and the client's `Proxy-Authorization` never leaves. Through
//! an HTTP upstream the request stays in absolute form and carries the upstream's credentials;
//! through a SOCKS upstream it goes down a tunnel in origin form. A client connection keeps its
//! upstream connection for the next request while that upstream stays available.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use proxygate_core::{ErrorKind, Outcome, Target, UpstreamId};
use proxygate_pool::Lease;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::GatewayError;
mod body;
mod park;
mod reuse;
mod strict;

use crate::auth::{ClientCredentials, Refused, basic_value, parse_basic};
use crate::config::{Rotate, TunnelPlain};
use crate::dial::{Budget, Dialed, Established, Purpose, Routing};
use crate::gateway::{Gateway, Opened, Tunnel};
use crate::io::{BoxedIo, Io, Rewind};
use crate::metrics::{Metrics, RequestKind};

/// A connection's slot (its `server.max_connections` permit and its count as an open
/// connection).
pub type Permit = crate::gateway::ConnectionSlot;

/// The response body type of the front end.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// hyper's smallest accepted read buffer.
const HYPER_MIN_BUF: usize = 8192;

/// For `dial.rotate = "connection"`: the upstream a client connection's forwarded requests
/// went through, and the routing it was picked for (another routing picks afresh).
type Sticky = Mutex<Option<(UpstreamId, Routing)>>;

/// What the requests of one client connection share.
#[derive(Default)]
struct Kept {
    sticky: Sticky,
    /// A CONNECT that hyper answered: once hyper has let the connection go, the connection is
    /// this tunnel's. Boxed: a connection holds this for its whole life, and rarely fills it.
    tunnel: Mutex<Option<Box<(Established, Target)>>>,
}

/// The future of one request served by hyper. Boxed: hyper hands a connection back
/// (`poll_without_shutdown`) only if its requests' futures can move.
type Serving = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// Serves one HTTP client connection: [`serve_first`], then [`serve_kept`] (the listeners
/// await the two apart, so that a kept-alive connection holds nothing of the first's state).
///
/// `permit` is the connection's slot of `server.max_connections`. A connection whose request
/// is CONNECT, its first or a later one, ends here with its tunnel established and answered:
/// the tunnel and the slot are handed back for the caller to relay
/// (`Gateway::serve_connection`, in `server.rs`), in a state that holds nothing of this one.
pub async fn serve_http<S: Io>(
    gw: Gateway,
    stream: S,
    peer: SocketAddr,
    permit: Permit,
    opened: Opened,
) -> Option<(Tunnel<Rewind<S>>, Permit)> {
    match serve_first(gw, stream, peer, opened).await {
        First::Tunnel(tunnel) => Some((tunnel, permit)),
        First::Kept(kept) => serve_kept(kept, permit).await,
        First::Closed => None,
    }
}

/// How a connection's first request went.
pub enum First<S> {
    /// A CONNECT, established and answered: the tunnel to relay.
    Tunnel(Tunnel<Rewind<S>>),
    /// Another request, its head read: the connection goes on in [`serve_kept`].
    Kept(KeptAlive<S>),
    /// Refused and answered, or gone.
    Closed,
}

impl<S> std::fmt::Debug for First<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            First::Tunnel(_) => "Tunnel",
            First::Kept(_) => "Kept",
            First::Closed => "Closed",
        })
    }
}

/// A connection whose first request is not a CONNECT, with that request's head read.
pub struct KeptAlive<S> {
    gw: Gateway,
    stream: S,
    head: BytesMut,
    peer: SocketAddr,
    limits: HeadLimits,
}

impl<S> std::fmt::Debug for KeptAlive<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptAlive")
            .field("peer", &self.peer)
            .field("head_len", &self.head.len())
            .finish_non_exhaustive()
    }
}

/// Reads a connection's first request head; a CONNECT is served here, without hyper.
pub async fn serve_first<S: Io>(
    gw: Gateway,
    mut stream: S,
    peer: SocketAddr,
    opened: Opened,
) -> First<S> {
    let limits = HeadLimits::of(&gw.config().server);
    // A CONNECT head that came whole with the first read, as clients send it, goes straight
    // on: no read to wait for, so neither the timer nor the boxed read below (an allocation
    // and ~300 instructions per tunnel).
    let head = if is_whole_connect(&opened.first) {
        Ok(opened.first)
    } else {
        // Boxed, like every part that ends before a tunnel starts: the connection's task then
        // holds only what the tunnel needs for its whole life, not the largest state it passed.
        Box::pin(tokio::time::timeout_at(
            opened.head_deadline,
            read_first_head(&mut stream, opened.first, limits),
        ))
        .await
        .unwrap_or_else(|_| Err(head_timeout()))
    };
    let head = match head {
        Ok(buf) => buf,
        Err(e) => {
            Box::pin(refuse_head(&gw, &mut stream, &e)).await;
            return First::Closed;
        }
    };
    if head.starts_with(b"CONNECT ") {
        return match connect_first(gw, stream, head, peer, limits).await {
            Some(tunnel) => First::Tunnel(tunnel),
            None => First::Closed,
        };
    }
    First::Kept(KeptAlive {
        gw,
        stream,
        head,
        peer,
        limits,
    })
}

/// Serves a connection from its first (non-CONNECT) request on: through hyper while requests
/// come, holding nothing of hyper's while it idles (`server.keepalive_release_after`), until it
/// closes or a CONNECT turns it into a tunnel, which is handed back with `permit`.
pub async fn serve_kept<S: Io>(
    kept_alive: KeptAlive<S>,
    permit: Permit,
) -> Option<(Tunnel<Rewind<S>>, Permit)> {
    let KeptAlive {
        gw,
        mut stream,
        mut head,
        peer,
        limits,
    } = kept_alive;
    let kept = Arc::new(Kept::default());
    loop {
        if head.starts_with(b"CONNECT ") {
            let tunnel = Box::pin(connect_first(gw, stream, head, peer, limits)).await?;
            return Some((tunnel, permit));
        }
        let (unread, since);
        (stream, unread, since) =
            match Box::pin(serve_hyper(&gw, stream, head.freeze(), peer, &kept)).await {
                LetGo::Closed => return None,
                LetGo::Tunnel {
                    stream,
                    early,
                    est,
                    target,
                } => return Some((gw.relay(Rewind::new(early, stream), est, target), permit)),
                LetGo::Idle {
                    stream,
                    unread,
                    since,
                } => (stream, unread, since),
            };
        // Nothing of hyper's is held from here on: while the connection idles, the task holds
        // this function's state and the wait's, each boxed at its own size.
        let deadline = since + gw.config().server.keepalive_timeout;
        let mut unread = unread;
        if unread.is_empty() {
            let first = Box::pin(parked(&gw, &mut stream, deadline)).await?;
            unread = first
                .map(|b| Bytes::copy_from_slice(&[b]))
                .unwrap_or_default();
        }
        head = Box::pin(next_head(&gw, &mut stream, unread, deadline, limits)).await?;
    }
}

/// A CONNECT head as clients send it, alone and whole: it ends in an empty line, so it is
/// complete or malformed, never partial ([`ConnectHead::parse`] tells which, within the head
/// limits).
fn is_whole_connect(buf: &[u8]) -> bool {
    buf.starts_with(b"CONNECT ") && buf.ends_with(b"\r\n\r\n")
}

fn head_timeout() -> GatewayError {
    GatewayError::new(
        ErrorKind::ClientTimeout,
        "request head not received in time",
    )
}

/// Counts and answers a request head that could not be read (a client that went away is not
/// answered).
async fn refuse_head<S: Io>(gw: &Gateway, stream: &mut S, e: &GatewayError) {
    tracing::debug!(error = %e, "bad request head");
    gw.metrics().request(RequestKind::Http, Some(e.kind));
    if e.kind != ErrorKind::ClientClosed {
        answer_error(stream, e).await;
    }
}

/// How hyper let a connection go.
enum LetGo<S> {
    /// Closed, or to be closed.
    Closed,
    /// Idle for `server.keepalive_release_after` since `since`: it waits for its next request
    /// without hyper's buffers. `unread`: what hyper had read of it.
    Idle {
        stream: S,
        unread: Bytes,
        since: tokio::time::Instant,
    },
    /// A CONNECT answered: the connection is this tunnel's, `early` its first bytes.
    Tunnel {
        stream: S,
        early: Bytes,
        est: Established,
        target: Target,
    },
}

/// The connection from a (non-CONNECT) request on, through hyper: kept alive, absolute-form
/// requests forwarded, until it closes, asks for a tunnel or idles past
/// `server.keepalive_release_after` (`park`).
async fn serve_hyper<S: Io>(
    gw: &Gateway,
    stream: S,
    buffered: Bytes,
    peer: SocketAddr,
    kept: &Arc<Kept>,
) -> LetGo<S> {
    let (keepalive, release, max_headers, max_buf) = {
        let s = &gw.config().server;
        (
            s.keepalive_timeout,
            s.keepalive_release_after,
            s.max_headers,
            s.max_header_bytes.max(HYPER_MIN_BUF),
        )
    };
    let park = Arc::new(park::Park::default());
    let io = TokioIo::new(park::Watched::new(
        Rewind::new(buffered, stream),
        Arc::clone(&park),
    ));
    let service = {
        let gw = gw.clone();
        let kept = Arc::clone(kept);
        hyper::service::service_fn(move |req| -> Serving {
            let gw = gw.clone();
            let kept = Arc::clone(&kept);
            Box::pin(async move { Ok(handle(gw, kept, req, peer).await) })
        })
    };
    // hyper runs this timer only while it waits for the next request head on an idle
    // connection (the first head, read before, had header_read_timeout): it lets the
    // connection go after `release`, or ends it at `keepalive`.
    let timer = park::ParkTimer::new(Arc::clone(&park), release, keepalive);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .header_read_timeout(timer.wait())
        .timer(timer)
        .max_headers(max_headers)
        .max_buf_size(max_buf);
    let mut conn = builder.serve_connection(io, service);
    let mut shutdown = gw.shutdown();
    let stop = shutdown.wait();
    tokio::pin!(stop);
    let mut stopping = false;
    let ended = std::future::poll_fn(|cx| {
        if !stopping && stop.as_mut().poll(cx).is_ready() {
            // Finish the request in progress, then close.
            stopping = true;
            Pin::new(&mut conn).graceful_shutdown();
        }
        conn.poll_without_shutdown(cx)
    })
    .await;
    // A CONNECT hyper answered: the connection is its tunnel's if hyper let it go cleanly.
    let tunnel = kept
        .tunnel
        .lock()
        .ok()
        .and_then(|mut t| t.take())
        .map(|t| *t);
    // hyper lets a connection go without flushing what it last wrote (the end of an answer
    // before a close, a CONNECT's 200): polled again, it flushes. A client that takes none of
    // it for `keepalive_timeout` is closed.
    if ended.is_ok() && park.unflushed() {
        let flushed = std::future::poll_fn(|cx| match conn.poll_without_shutdown(cx) {
            Poll::Ready(Ok(())) if park.unflushed() => Poll::Pending,
            other => other,
        });
        if !matches!(tokio::time::timeout(keepalive, flushed).await, Ok(Ok(()))) {
            tracing::debug!("http connection closed with its last answer not taken");
            if let Some((est, _)) = tunnel {
                crate::gateway::client_gone(est);
            }
            return LetGo::Closed;
        }
    }
    let parked = park.parked_since().filter(|_| !stopping);
    if let Err(e) = &ended
        && parked.is_none()
    {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
    let hyper::server::conn::http1::Parts { io, read_buf, .. } = conn.into_parts();
    let (prefix, stream) = io.into_inner().into_inner().into_parts();
    // Its own copy: hyper's read buffer (8 KiB) is what the connection lets go of.
    let unread = match (read_buf.is_empty(), prefix.is_empty()) {
        (true, true) => Bytes::new(),
        (false, true) => Bytes::copy_from_slice(&read_buf),
        _ => Bytes::from([&read_buf[..], &prefix[..]].concat()),
    };
    match (tunnel, parked) {
        (Some((est, target)), _) if ended.is_ok() => LetGo::Tunnel {
            stream,
            early: unread,
            est,
            target,
        },
        (Some((est, _)), _) => {
            crate::gateway::client_gone(est);
            LetGo::Closed
        }
        (None, Some(since)) => LetGo::Idle {
            stream,
            unread,
            since,
        },
        (None, None) => LetGo::Closed,
    }
}

/// Reads a let-go connection's next request head (`unread`: what hyper had read of it), whole
/// by `deadline` (`server.keepalive_timeout` after the connection fell idle, as hyper would
/// have). `None`: closed, quietly if nothing came.
async fn next_head<S: Io>(
    gw: &Gateway,
    stream: &mut S,
    unread: Bytes,
    deadline: tokio::time::Instant,
    limits: HeadLimits,
) -> Option<BytesMut> {
    let mut buf = BytesMut::with_capacity(unread.len().max(crate::gateway::FIRST_READ));
    buf.extend_from_slice(&unread);
    drop(unread);
    let head = tokio::time::timeout_at(deadline, read_first_head(stream, buf, limits))
        .await
        .unwrap_or_else(|_| Err(head_timeout()));
    match head {
        Ok(head) => Some(head),
        // The client closed its idle connection: not an error.
        Err(e) if e.kind == ErrorKind::ClientClosed => None,
        Err(e) => {
            refuse_head(gw, stream, &e).await;
            None
        }
    }
}

/// A let-go connection's wait for its next request, what it holds while idle. `None` at
/// `deadline`, at shutdown or at the stream's end; else what it read: nothing from a TCP
/// stream, whose readiness is polled in place (no read, no future of its own to hold), the
/// first byte from any other (fuzzing, tests).
async fn parked<S: Io>(
    gw: &Gateway,
    stream: &mut S,
    deadline: tokio::time::Instant,
) -> Option<Option<u8>> {
    let _parked = gw.metrics().parked();
    let mut shutdown = gw.shutdown();
    let stop = shutdown.wait();
    let idle_limit = tokio::time::sleep_until(deadline);
    tokio::pin!(stop, idle_limit);
    if let Some(tcp) = S::as_any(stream).downcast_ref::<tokio::net::TcpStream>() {
        let ready = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = tcp.poll_read_ready(cx) {
                return Poll::Ready(r.ok().map(|()| None));
            }
            if stop.as_mut().poll(cx).is_ready() || idle_limit.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        });
        return ready.await;
    }
    let mut first = [0u8; 1];
    tokio::select! {
        r = stream.read(&mut first) => matches!(r, Ok(1)).then_some(Some(first[0])),
        () = stop => None,
        () = idle_limit => None,
    }
}

/// The limits of a request head.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadLimits {
    /// The whole head.
    bytes: usize,
    /// Header fields.
    headers: usize,
    /// The request target.
    target: usize,
}

impl HeadLimits {
    pub(crate) fn of(server: &crate::config::ServerConfig) -> Self {
        HeadLimits {
            bytes: server.max_header_bytes,
            headers: server.max_headers,
            target: server.max_target_bytes,
        }
    }
}

/// Reads until the first request head is complete, going on from the bytes already read
/// (`buf`: the connection's first read, which told the protocol apart); returns everything
/// read. A head over `limits.bytes` or with more than `limits.headers` fields is 431, a target
/// over `limits.target` is 414.
async fn read_first_head<S: Io>(
    stream: &mut S,
    mut buf: BytesMut,
    limits: HeadLimits,
) -> Result<BytesMut, GatewayError> {
    let too_large = || too_many_fields(limits);
    let uri_too_long = || target_too_long(limits);
    let mut fresh = buf.is_empty();
    loop {
        if fresh {
            let n = stream.read_buf(&mut buf).await.map_err(|_| closed())?;
            if n == 0 {
                return Err(if buf.is_empty() {
                    closed()
                } else {
                    GatewayError::new(ErrorKind::ClientMalformed, "truncated request head")
                });
            }
        }
        fresh = true;
        // A CONNECT head as clients send it, alone and whole: parsed once, by `connect_first`
        // (with these limits), not here too (~700 instructions and a 3 KiB allocation per
        // tunnel).
        if is_whole_connect(&buf) {
            return Ok(buf);
        }
        // Room for the fields, not initialised: the parser writes what it finds.
        let mut fields = Vec::with_capacity(limits.headers);
        let mut req = httparse::Request::new(&mut []);
        match req.parse_with_uninit_headers(&buf, fields.spare_capacity_mut()) {
            Ok(httparse::Status::Complete(_)) => {
                if req.path.is_some_and(|p| p.len() > limits.target) {
                    return Err(uri_too_long());
                }
                return Ok(buf);
            }
            // Still in the request line, already past the target's limit.
            Ok(httparse::Status::Partial)
                if buf.len() > limits.target + 32 && !buf.contains(&b'\n') =>
            {
                return Err(uri_too_long());
            }
            Ok(httparse::Status::Partial) if buf.len() <= limits.bytes => {}
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                return Err(too_large());
            }
            Err(e) => {
                return Err(GatewayError::new(
                    ErrorKind::ClientMalformed,
                    format!("invalid request head: {e}"),
                ));
            }
        }
    }
}

/// 431: the head over `limits.bytes` or with more than `limits.headers` fields.
fn too_many_fields(limits: HeadLimits) -> GatewayError {
    GatewayError::new(
        ErrorKind::ClientHeaderTooLarge,
        format!(
            "request head larger than {} bytes or with more than {} header fields",
            limits.bytes, limits.headers
        ),
    )
}

/// 414: the request target over `limits.target`.
fn target_too_long(limits: HeadLimits) -> GatewayError {
    GatewayError::new(
        ErrorKind::ClientUriTooLong,
        format!("request target longer than {} bytes", limits.target),
    )
}

fn closed() -> GatewayError {
    GatewayError::new(ErrorKind::ClientClosed, "client went away")
}

async fn handle(
    gw: Gateway,
    kept: Arc<Kept>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let kind = if req.method() == Method::CONNECT {
        RequestKind::HttpConnect
    } else {
        RequestKind::HttpForward
    };
    // The first head was measured as it was read; later ones are hyper's, measured here.
    let max_target = gw.config().server.max_target_bytes;
    let result = if uri_len(req.uri()) > max_target {
        Err(GatewayError::new(
            ErrorKind::ClientUriTooLong,
            format!("request target longer than {max_target} bytes"),
        ))
    } else if let Err(e) = strict::check(&req) {
        // The framing of whatever follows is in doubt: answer and close.
        log_failure(&e);
        gw.metrics().request(kind, Some(e.kind));
        let mut resp = error_response(&e);
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    } else {
        route_and_serve(&gw, &kept, req, peer).await
    };
    gw.metrics()
        .request(kind, result.as_ref().err().map(|e| e.kind));
    result.unwrap_or_else(|e| {
        log_failure(&e);
        error_response(&e)
    })
}

/// Authenticates, reads the routing hints, and serves the request.
async fn route_and_serve(
    gw: &Gateway,
    kept: &Kept,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, GatewayError> {
    let credentials = req.headers().get(header::PROXY_AUTHORIZATION);
    let routing = authorize(gw, credentials.map(HeaderValue::as_bytes), peer).await?;
    if req.method() == Method::CONNECT {
        connect(gw, req, routing, kept).await
    } else {
        forward(gw, &kept.sticky, req, routing).await
    }
}

/// Checks the client's `Proxy-Authorization` (its value, when it sent one; when auth is on)
/// and reads the routing hints of its username.
async fn authorize(
    gw: &Gateway,
    proxy_authorization: Option<&[u8]>,
    peer: SocketAddr,
) -> Result<Routing, GatewayError> {
    let creds = proxy_authorization.and_then(parse_basic);
    let (account, routing) = Routing::from_username(creds.as_ref().map(|c| c.username.as_str()))?;
    let account_creds = creds.map(|c| ClientCredentials {
        username: account,
        password: c.password,
    });
    if let Err(why) = gw
        .auth()
        .authenticate(peer.ip(), account_creds.as_ref())
        .await
    {
        return Err(GatewayError::new(
            ErrorKind::ClientAuth,
            match why {
                Refused::Missing => "proxy authentication required",
                Refused::Wrong => "proxy authentication failed",
                Refused::Throttled => "too many failed logins from this address: try again later",
            },
        ));
    }
    Ok(routing)
}

/// What the gateway answers a CONNECT it has established.
const CONNECT_ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// A connection whose first request is CONNECT, served without hyper: one tunnel per
/// connection is the common case, and it needs no HTTP machinery past the head (already read
/// and measured against the limits). The head is parsed once more, in place (no request, no
/// header map: nothing of it is forwarded), and checked as on hyper's path (strictness, auth,
/// routing, destination policy). Returns the tunnel, dialed and answered, to relay; any failure
/// is answered and the connection closed (`None`).
async fn connect_first<S: Io>(
    gw: Gateway,
    mut stream: S,
    head: BytesMut,
    peer: SocketAddr,
    limits: HeadLimits,
) -> Option<Tunnel<Rewind<S>>> {
    let prepared = async {
        let connect = ConnectHead::parse(&head, limits)?;
        let routing = authorize(&gw, connect.credentials, peer).await?;
        let target = parse_target(connect.authority.as_deref())?;
        gw.policy().tunnel(&target)?;
        let est = gw.dialer().dial(&target, Purpose::Tunnel, routing).await?;
        Ok((est, connect.len, target))
    };
    let prepared = Box::pin(prepared).await;
    match prepared {
        Ok((est, head_len, target)) => {
            gw.metrics().request(RequestKind::HttpConnect, None);
            if stream.write_all(CONNECT_ESTABLISHED).await.is_err() {
                crate::gateway::client_gone(est);
                return None;
            }
            // Bytes the client sent after the head (a TLS hello, optimistically) go first; a
            // copy, so the head's read buffer is not held for the tunnel's life.
            let early = Bytes::copy_from_slice(&head[head_len..]);
            drop(head);
            Some(gw.relay(Rewind::new(early, stream), est, target))
        }
        Err(e) => {
            log_failure(&e);
            gw.metrics().request(RequestKind::HttpConnect, Some(e.kind));
            answer_error(&mut stream, &e).await;
            None
        }
    }
}

/// A complete CONNECT request head, parsed in place and checked as hyper's path checks a
/// request (strictness; no body), within the head limits (a target over `limits.target` is
/// 414, more than `limits.headers` fields 431).
#[derive(Debug)]
pub(crate) struct ConnectHead<'h> {
    /// The request target's authority (none: the target has none, as `/`).
    authority: Option<Cow<'h, str>>,
    /// The first `Proxy-Authorization` field's value, as sent.
    credentials: Option<&'h [u8]>,
    /// The head's length: what follows is the tunnel's.
    pub(crate) len: usize,
}

/// Field slots on the stack for a CONNECT head (clients send a handful); a head with more is
/// parsed again with room for `server.max_headers`.
const CONNECT_FIELDS: usize = 24;

impl<'h> ConnectHead<'h> {
    pub(crate) fn parse(head: &'h [u8], limits: HeadLimits) -> Result<Self, GatewayError> {
        // httparse, with room left uninitialised (zeroing it cost more than reading a short
        // head). A short way of our own read it in fewer instructions but more time
        // (`crate::head`).
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; CONNECT_FIELDS];
        match Self::parse_in(head, limits, &mut fields) {
            Err(Some(e)) => Err(e),
            Ok(parsed) => Ok(parsed),
            // More fields than slots here, fewer than the limit maybe.
            Err(None) => {
                let mut fields = Vec::with_capacity(limits.headers);
                Self::parse_in(head, limits, fields.spare_capacity_mut())
                    .map_err(|e| e.unwrap_or_else(|| too_many_fields(limits)))
            }
        }
    }

    /// [`ConnectHead::parse`] by httparse, with room for `storage.len()` fields (`Err(None)`:
    /// not enough, though within the limit).
    fn parse_in(
        head: &'h [u8],
        limits: HeadLimits,
        storage: &mut [std::mem::MaybeUninit<httparse::Header<'h>>],
    ) -> Result<Self, Option<GatewayError>> {
        let malformed = |why: String| Some(GatewayError::new(ErrorKind::ClientMalformed, why));
        let room = storage.len().min(limits.headers);
        let mut parsed = httparse::Request::new(&mut []);
        let len = match parsed.parse_with_uninit_headers(head, &mut storage[..room]) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return Err(malformed("truncated request head".into()));
            }
            Err(httparse::Error::TooManyHeaders) if room < limits.headers => return Err(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Some(too_many_fields(limits))),
            Err(e) => return Err(malformed(format!("invalid request head: {e}"))),
        };
        Self::check(
            limits,
            parsed.path.unwrap_or_default(),
            parsed.version == Some(0),
            parsed.headers,
            len,
        )
        .map_err(Some)
    }

    /// The checks of a parsed head (its target, version, fields and length): limits,
    /// strictness, no body; and what the tunnel needs of it.
    fn check(
        limits: HeadLimits,
        path: &'h str,
        http10: bool,
        fields: &[httparse::Header<'h>],
        len: usize,
    ) -> Result<Self, GatewayError> {
        let malformed = |why: String| GatewayError::new(ErrorKind::ClientMalformed, why);
        if path.len() > limits.target {
            return Err(target_too_long(limits));
        }
        let authority =
            connect_authority(path).map_err(|e| malformed(format!("invalid request head: {e}")))?;
        strict::check_head(http10, fields.iter().map(|f| f.name), authority.as_deref())?;
        // The value of the first field named `name` (in any case), as sent.
        let field = |name: &str| {
            fields
                .iter()
                .find(|f| f.name.eq_ignore_ascii_case(name))
                .map(|f| f.value)
        };
        let framed = field(header::CONTENT_LENGTH.as_str()).is_some_and(|v| v != b"0")
            || field(header::TRANSFER_ENCODING.as_str()).is_some();
        if framed {
            return Err(malformed("a CONNECT request with a body".into()));
        }
        Ok(ConnectHead {
            authority,
            credentials: field(header::PROXY_AUTHORIZATION.as_str()),
            len,
        })
    }
}

/// The authority of a CONNECT request's target.
fn connect_target(uri: &Uri) -> Result<Target, GatewayError> {
    parse_target(uri.authority().map(|a| a.as_str()))
}

fn parse_target(authority: Option<&str>) -> Result<Target, GatewayError> {
    Target::parse_authority(authority.unwrap_or(""))
        .map_err(|e| GatewayError::new(ErrorKind::ClientMalformed, format!("CONNECT target: {e}")))
}

/// A CONNECT target's authority as hyper's path finds it (`http`'s URI parser), without that
/// parser (a copy into `Bytes`, UTF-8 and character checks: ~600 instructions per tunnel)
/// when the target is a plain `host:port`, as clients send it: that parses to exactly itself.
fn connect_authority(target: &str) -> Result<Option<Cow<'_, str>>, http::uri::InvalidUri> {
    if plain_authority(target) {
        return Ok(Some(Cow::Borrowed(target)));
    }
    let uri: Uri = target.parse()?;
    Ok(uri.authority().map(|a| Cow::Owned(a.as_str().to_owned())))
}

/// `host:port`, the host of letters, digits, dots and dashes or an IPv6 literal in brackets,
/// the port 1-5 digits (its range is `Target`'s to check, as on the other path).
fn plain_authority(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => {
            v6.contains(':')
                && v6
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        }
    }
}

/// The length of `uri` as written (its `Display`), counted without writing it out.
fn uri_len(uri: &Uri) -> usize {
    struct Count(usize);
    impl std::fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut n = Count(0);
    let _ = std::fmt::write(&mut n, format_args!("{uri}"));
    n.0
}

fn log_failure(e: &GatewayError) {
    match e.side() {
        proxygate_core::Side::Client => tracing::debug!(error = %e, "request refused"),
        _ => tracing::info!(error = %e, "request failed"),
    }
}

/// A CONNECT on a kept-alive connection: dialed here and answered by hyper, which then lets
/// the connection go (an upgrade, which this server takes up itself); `serve_hyper` finds the
/// tunnel in `kept` and hands it on to be relayed as a first request's would be.
async fn connect(
    gw: &Gateway,
    req: Request<Incoming>,
    routing: Routing,
    kept: &Kept,
) -> Result<Response<Body>, GatewayError> {
    let target = connect_target(req.uri())?;
    gw.policy().tunnel(&target)?;
    let established = gw.dialer().dial(&target, Purpose::Tunnel, routing).await?;
    if let Ok(mut tunnel) = kept.tunnel.lock()
        && let Some(earlier) = tunnel.replace(Box::new((established, target)))
    {
        crate::gateway::client_gone(earlier.0);
    }
    Ok(Response::new(empty()))
}

/// An absolute-form request head made ready for the next hop, in place, before an upstream is
/// picked: the URI must be `http://` with a host; hop-by-hop fields, every field named in
/// `Connection` and `Expect` go; `Host` becomes the URI's host, with its port unless that is 80.
/// Returns the target and the request's origin form (`/path?query`, what goes down a tunnel to
/// the origin). Every absolute-form request passes here (`benches/head.rs` measures it).
pub fn to_upstream_head(parts: &mut http::request::Parts) -> Result<(Target, Uri), GatewayError> {
    let uri = &parts.uri;
    if uri.scheme_str() != Some("http") {
        let why = match uri.scheme_str() {
            None => {
                "origin-form request: this is a proxy; send absolute-form (http://host/path) or CONNECT"
            }
            Some("https") => "https:// in absolute form is not supported; use CONNECT",
            Some(_) => "unsupported URI scheme",
        };
        return Err(GatewayError::new(ErrorKind::ClientMalformed, why));
    }
    let host = uri
        .host()
        .ok_or_else(|| GatewayError::new(ErrorKind::ClientMalformed, "URI has no host"))?;
    let given_port = uri.port_u16();
    let port = given_port.unwrap_or(80);
    let target = Target::from_host_port(host, port).map_err(|e| {
        GatewayError::new(ErrorKind::ClientMalformed, format!("URI authority: {e}"))
    })?;
    // The host as the client wrote it, with its port unless that is 80 (no fmt: per request).
    let mut host_value = Vec::with_capacity(host.len() + 6);
    host_value.extend_from_slice(host.as_bytes());
    if let Some(p) = given_port.filter(|p| *p != 80) {
        host_value.push(b':');
        proxygate_core::target::push_decimal(&mut host_value, p);
    }
    // `http://host?q` has an empty path: its origin form is `/?q`.
    // The path is the one hyper parsed (no second parse of it: ~300 instructions a request).
    let origin_form = match uri.path_and_query().filter(|pq| !pq.as_str().is_empty()) {
        None => Some(Uri::from_static("/")),
        Some(pq) if pq.as_str().starts_with('?') => Uri::try_from(format!("/{}", pq.as_str())).ok(),
        Some(pq) => {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(pq.clone());
            Uri::from_parts(parts).ok()
        }
    }
    .ok_or_else(|| GatewayError::new(ErrorKind::ClientMalformed, "invalid path"))?;

    strip_hop_by_hop(&mut parts.headers);
    // hyper answered `Expect: 100-continue` to the client when the body was asked for; the
    // upstream gets the body, not the expectation.
    parts.headers.remove(header::EXPECT);
    parts.headers.insert(
        header::HOST,
        HeaderValue::from_maybe_shared(Bytes::from(host_value))
            .map_err(|_| GatewayError::new(ErrorKind::ClientMalformed, "invalid host"))?,
    );
    Ok((target, origin_form))
}

/// One absolute-form request through the pool: its head made ready for the next hop, then
/// attempts until one is answered. Each takes a connection (a kept one to the same origin, or
/// a new one through the upstream the budget picks), sends the request within its deadline, and
/// either hands the answer to the client ([`answered`]) or reports the failure and, if the
/// request can be sent again and the budget allows, tries the next upstream.
async fn forward(
    gw: &Gateway,
    sticky: &Sticky,
    req: Request<Incoming>,
    routing: Routing,
) -> Result<Response<Body>, GatewayError> {
    let (mut parts, body) = req.into_parts();
    let (target, origin_form) = to_upstream_head(&mut parts)?;
    gw.policy().forward(&target)?;
    // A request without a body can be sent again through another upstream.
    let replayable = body.is_end_stream();
    // Only a request that may be sent twice takes a kept connection: one that turns out
    // closed is then sent again on a new one. Others always get a new connection.
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    let mut body = Some(body);
    let mut budget = gw.dialer().budget(routing, &target);
    let cfg = Reuse::of(&gw.config().dial, replayable && idempotent);
    let prefer = match cfg.rotate {
        Rotate::Connection => sticky_upstream(sticky, budget.routing()),
        Rotate::Request => None,
    };
    let bytes_up = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Set when the client's own body turned out malformed (a bad chunk size...): what failed
    // then is the client's request, not the upstream.
    let client_body_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A kept connection that turned out closed: the same upstream, on a new connection.
    let mut again = None;

    loop {
        let mut up = upstream_sender(gw, &target, &mut budget, prefer, again.take(), &cfg).await?;
        if !up.fresh() {
            reuse::reused();
        }
        let to_http_proxy = !up.tunnel;
        let req_body = match body.take() {
            Some(b) if !replayable => {
                body::Counted::new(b, Arc::clone(&bytes_up), Arc::clone(&client_body_failed))
                    .boxed()
            }
            _ => empty(),
        };
        let to = if to_http_proxy {
            To::HttpProxy(up.lease.upstream())
        } else {
            To::Origin(&origin_form)
        };
        let upstream_req = upstream_request(&parts, to, req_body)?;

        // On a fresh connection to an HTTP proxy nothing has proven the proxy alive yet: a
        // replayable request gets the handshake timeout, so a black-holed proxy is left for
        // another rather than holding the client for the whole response timeout.
        let probing = replayable && up.fresh() && to_http_proxy;
        let per_try = if probing {
            cfg.handshake_timeout
        } else {
            cfg.response_timeout
        };
        let t0 = Instant::now();
        let err = match tokio::time::timeout(per_try, up.sender.send_request(upstream_req)).await {
            Ok(Ok(response))
                if to_http_proxy
                    && response.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED =>
            {
                GatewayError::new(
                    ErrorKind::UpstreamAuth,
                    format!("{}: rejected our credentials (407)", up.lease.upstream()),
                )
            }
            Ok(Ok(response)) => {
                let id = up.lease.id();
                let first_byte = t0.elapsed();
                note_site(gw, id, &response, &mut budget);
                gw.metrics().first_byte(first_byte);
                if cfg.rotate == Rotate::Connection {
                    remember_sticky(sticky, id, budget.routing());
                }
                return Ok(answered(up, response, first_byte, &cfg, &target, bytes_up));
            }
            Ok(Err(_)) if !up.fresh() && replayable => {
                // A kept connection the other side had closed meanwhile: not the upstream's
                // fault; send again on a new connection through it.
                if let Some(since) = up.kept_since {
                    reuse::found_closed(up.lease.id(), up.tunnel, since, Instant::now());
                }
                again = Some(up.lease);
                continue;
            }
            Ok(Err(e)) if client_body_failed.load(std::sync::atomic::Ordering::Relaxed) => {
                GatewayError::new(
                    ErrorKind::ClientMalformed,
                    format!("invalid request body: {e}"),
                )
            }
            Ok(Err(e)) => GatewayError::new(
                ErrorKind::UpstreamIo,
                format!("{}: {e}", up.lease.upstream()),
            ),
            Err(_) if probing => GatewayError::new(
                ErrorKind::UpstreamHandshakeTimeout,
                format!("{}: no response within {per_try:?}", up.lease.upstream()),
            ),
            Err(_) => GatewayError::new(
                ErrorKind::TargetTimeout,
                format!("no response within {per_try:?}"),
            ),
        };
        // Report (and remember) the failure whether or not it can be retried: a request whose
        // body is gone is answered with this very error.
        let retry = budget.fail(up.lease, err);
        if !(replayable && retry) {
            return Err(budget.exhausted());
        }
    }
}

/// The upstream this client connection used last for the same routing, under
/// `dial.rotate = "connection"`.
fn sticky_upstream(sticky: &Sticky, routing: &Routing) -> Option<UpstreamId> {
    let s = sticky.lock().ok()?;
    s.as_ref().filter(|(_, r)| r == routing).map(|(id, _)| *id)
}

/// Remembers `id` as this client connection's upstream for `routing`. The routing is cloned
/// only when it changed (a connection's requests usually all carry the same).
fn remember_sticky(sticky: &Sticky, id: UpstreamId, routing: &Routing) {
    let Ok(mut s) = sticky.lock() else {
        return;
    };
    match &mut *s {
        Some((kept, r)) if r == routing => *kept = id,
        other => *other = Some((id, routing.clone())),
    }
}

/// The upstream's answer made ready for the client: hop-by-hop fields gone, and a body that
/// reports the attempt's outcome (with the bytes each way) when it ends and then hands the
/// connection back to be kept, unless either side said it closes.
// Inlined into `forward`, its one caller: as a call it read ~300 instructions more per
// keep-alive request in two callgrind runs (about the spread of such runs); inlined, level.
#[inline(always)]
fn answered(
    up: Upstream,
    mut response: Response<Incoming>,
    first_byte: Duration,
    cfg: &Reuse,
    target: &Target,
    bytes_up: Arc<std::sync::atomic::AtomicU64>,
) -> Response<Body> {
    let Upstream {
        sender,
        lease,
        tunnel,
        conn,
        mut outcome,
        ..
    } = up;
    let id = lease.id();
    outcome.first_byte = Some(first_byte);
    let to_http_proxy = !tunnel;
    // A connection to an HTTP proxy that wants credentials is not kept: a sloppy proxy pipes a
    // kept-alive connection to the first request's origin (pproxy does), and the credentials
    // of the next request would reach the origin.
    let secret = to_http_proxy && lease.upstream().credentials.is_some();
    let closing = closes(&response);
    let keep = (cfg.keep_idle > Duration::ZERO && !secret && !closing).then(|| body::Keep {
        upstream: id,
        target: target.clone(),
        sender,
        conn,
        tunnel,
        max: cfg.keep_idle_max,
    });
    if closing && to_http_proxy {
        reuse::closing(id, Instant::now());
    }
    strip_hop_by_hop(response.headers_mut());
    response.map(|b| body::Reported::new(b, lease, outcome, bytes_up, keep).boxed())
}

/// Where a forwarded request goes on its upstream connection.
enum To<'a> {
    /// To an HTTP proxy, in absolute form, with the proxy's credentials if it has any.
    HttpProxy(&'a proxygate_core::Upstream),
    /// Down a tunnel to the origin, in origin form.
    Origin(&'a Uri),
}

/// The request as it goes upstream: its own copy of the client's head (the head stays for a
/// retry, which hyper hands back only if it sent nothing), the form of its target and the
/// credentials that `to` asks for, and `body`.
fn upstream_request(
    parts: &http::request::Parts,
    to: To<'_>,
    body: Body,
) -> Result<Request<Body>, GatewayError> {
    let mut headers = parts.headers.clone();
    let uri = match to {
        To::HttpProxy(up) => {
            if let Some(c) = &up.credentials {
                let v = basic_value(c.username.expose(), c.password.expose());
                let v = HeaderValue::from_str(&v).map_err(|_| {
                    GatewayError::new(
                        ErrorKind::UpstreamAuth,
                        "upstream credentials not encodable",
                    )
                })?;
                headers.insert(header::PROXY_AUTHORIZATION, v);
            }
            parts.uri.clone()
        }
        To::Origin(origin_form) => origin_form.clone(),
    };
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Ok(req)
}

/// What an absolute-form answer says of its upstream at the target's site: a block (see
/// [`turned_away`]) is the site turning the upstream's address away; a success or a redirect,
/// that it works there.
fn note_site<B>(gw: &Gateway, id: UpstreamId, response: &Response<B>, budget: &mut Budget) {
    let status = response.status();
    let failed = turned_away(status, response.headers());
    if failed || status.is_success() || status.is_redirection() {
        let site = || budget.site().to_owned();
        gw.dialer()
            .pool()
            .site_outcome(id, failed, site, Instant::now());
    }
}

/// Whether an answer is a site turning the client's address away: 403 and 429, and the block
/// and challenge pages that bot-protection services mark in their headers, whatever their
/// status: Cloudflare's `cf-mitigated: challenge`, AWS WAF's `x-amzn-waf-action` (captcha,
/// challenge).
pub(crate) fn turned_away(status: StatusCode, headers: &HeaderMap) -> bool {
    status == StatusCode::FORBIDDEN
        || status == StatusCode::TOO_MANY_REQUESTS
        || headers
            .get(&CF_MITIGATED)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"challenge"))
        || headers.contains_key(&X_AMZN_WAF_ACTION)
}

// Looked up by name, not by `&str` (which parses the name again on every lookup).
const CF_MITIGATED: HeaderName = HeaderName::from_static("cf-mitigated");
const X_AMZN_WAF_ACTION: HeaderName = HeaderName::from_static("x-amzn-waf-action");

/// What `forward` reads of `[dial]` per request.
struct Reuse {
    rotate: Rotate,
    keep_idle: Duration,
    keep_idle_max: usize,
    tunnel_plain_http: TunnelPlain,
    handshake_timeout: Duration,
    response_timeout: Duration,
    max_reply_head_bytes: usize,
    /// This request may take a kept connection.
    may_take: bool,
}

impl Reuse {
    fn of(d: &crate::config::DialConfig, may_take: bool) -> Self {
        Self {
            rotate: d.rotate,
            keep_idle: d.keep_idle,
            keep_idle_max: d.keep_idle_max,
            tunnel_plain_http: d.tunnel_plain_http,
            handshake_timeout: d.handshake_timeout,
            response_timeout: d.response_timeout,
            max_reply_head_bytes: d.max_reply_head_bytes,
            may_take: may_take && d.keep_idle > Duration::ZERO,
        }
    }
}

/// Whether the upstream said it closes this connection after the response.
fn closes<B>(response: &Response<B>) -> bool {
    let says = |token: &str| {
        response
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            })
    };
    says("close") || (response.version() == Version::HTTP_10 && !says("keep-alive"))
}

/// An upstream connection for one request.
struct Upstream {
    sender: SendRequest<Body>,
    lease: Lease,
    /// A tunnel to the origin (origin-form requests), not a connection to an HTTP proxy.
    tunnel: bool,
    /// When a kept connection was put back; `None`: opened for this request.
    kept_since: Option<Instant>,
    /// Names the connection for the pool of kept ones.
    conn: u64,
    /// The connect measurements of a fresh connection.
    outcome: Outcome,
}

impl Upstream {
    /// Opened for this request (not kept from an earlier one).
    fn fresh(&self) -> bool {
        self.kept_since.is_none()
    }
}

/// The connection a request goes on: through the upstream the budget picks (`prefer`ring a
/// client connection's own), a kept one to the same origin if there is one, else a new one;
/// with `again`, a new one through that lease's upstream.
async fn upstream_sender(
    gw: &Gateway,
    target: &Target,
    budget: &mut Budget,
    prefer: Option<UpstreamId>,
    mut again: Option<Lease>,
    cfg: &Reuse,
) -> Result<Upstream, GatewayError> {
    loop {
        let retrying = again.is_some();
        let lease = match again.take() {
            Some(l) => l,
            None => gw
                .dialer()
                .pick(budget, prefer)
                .ok_or_else(|| budget.exhausted())?,
        };
        let id = lease.id();
        let now = Instant::now();
        // A kept connection idle long enough to have let hyper's state go: a new client on it,
        // at the same handshake as a new connection's below (one await point, not two: each
        // makes every request's future larger).
        let mut parked = None;
        if cfg.may_take
            && !retrying
            && let Some(kept) = reuse::take(id, target, cfg.keep_idle, now)
        {
            let reuse::Kept {
                state,
                conn,
                tunnel,
                since,
            } = kept;
            match state {
                reuse::State::Live(mut sender) => {
                    if sender.ready().await.is_ok() {
                        return Ok(Upstream {
                            sender,
                            lease,
                            tunnel,
                            kept_since: Some(since),
                            conn,
                            outcome: Outcome::default(),
                        });
                    }
                    reuse::found_closed(id, tunnel, since, Instant::now());
                }
                reuse::State::Parked(io) => parked = Some((io, conn, tunnel, since)),
                reuse::State::Parking => {}
            }
        }
        let (io, conn, tunnel, kept_since, outcome) = match parked {
            Some((io, conn, tunnel, since)) => (io, conn, tunnel, Some(since), Outcome::default()),
            None => {
                let http = lease.upstream().scheme.is_http();
                let tunnel = !http || tunnels_plain_http(cfg, &lease, now);
                let purpose = if tunnel {
                    Purpose::Tunnel
                } else {
                    Purpose::Forward
                };
                // The dial boxed: most requests take a kept connection, and its state (~0.5
                // KiB) would make every request's future larger, which hyper and each async
                // layer move whole.
                let dialed =
                    match Box::pin(gw.dialer().connect(&lease, target, purpose, budget)).await {
                        // It will not tunnel to a plain-HTTP port: absolute-form through it, as
                        // before.
                        Err(e) if http && tunnel && e.kind == ErrorKind::UpstreamRefused => {
                            reuse::refuses_tunnels(id, now);
                            Box::pin(
                                gw.dialer()
                                    .connect(&lease, target, Purpose::Forward, budget),
                            )
                            .await
                        }
                        other => other,
                    };
                match dialed {
                    Ok(Dialed {
                        io,
                        outcome,
                        to_http_proxy,
                    }) => (io, reuse::conn_id(), !to_http_proxy, None, outcome),
                    Err(e) => {
                        if !budget.fail(lease, e) {
                            return Err(budget.exhausted());
                        }
                        continue;
                    }
                }
            }
        };
        let key = (id, target.clone());
        let failed = match client_handshake(io, cfg.max_reply_head_bytes, key, conn).await {
            Ok(sender) => {
                return Ok(Upstream {
                    sender,
                    lease,
                    tunnel,
                    kept_since,
                    conn,
                    outcome,
                });
            }
            Err(e) => e,
        };
        if let Some(since) = kept_since {
            // Not the upstream's doing: a new connection through it.
            reuse::found_closed(id, tunnel, since, Instant::now());
            again = Some(lease);
            continue;
        }
        if !budget.fail(lease, failed) {
            return Err(budget.exhausted());
        }
    }
}

/// Whether a plain-HTTP request through this HTTP(S) upstream goes in a CONNECT tunnel to
/// its origin (see `dial.tunnel_plain_http`).
fn tunnels_plain_http(cfg: &Reuse, lease: &Lease, now: Instant) -> bool {
    let known = reuse::known(lease.id(), now);
    if known.refuses_tunnels {
        return false;
    }
    match cfg.tunnel_plain_http {
        TunnelPlain::Never => false,
        TunnelPlain::Always => true,
        TunnelPlain::Auto => {
            cfg.keep_idle > Duration::ZERO
                && (known.closes || lease.upstream().credentials.is_some())
        }
    }
}

/// Drops this worker's idle upstream connections older than `keep_idle` (run now and then).
pub(crate) fn sweep_kept(keep_idle: Duration) {
    reuse::sweep(keep_idle, Instant::now());
}

/// This worker's kept upstream connections idle for `release_after` let go of hyper's state
/// (run every second).
pub(crate) fn release_kept(release_after: Duration) {
    reuse::release(release_after, Instant::now());
}

/// This worker's upstream connection reuse figures go into `metrics` (run every second, after
/// the release and the sweep).
pub(crate) fn publish_kept(metrics: &Metrics) {
    reuse::publish(metrics.kept());
}

/// Opens an HTTP/1 client connection on `io`, driven by a task of this worker; when it ends,
/// the pool of kept connections hears of it (as `conn`). Ended because the pool let its sender
/// go while it idled, the connection goes back to the pool without hyper's state.
async fn client_handshake(
    io: BoxedIo,
    max_reply_head: usize,
    key: reuse::Key,
    conn_id: u64,
) -> Result<SendRequest<Body>, GatewayError> {
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(max_reply_head.max(HYPER_MIN_BUF))
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| GatewayError::new(ErrorKind::UpstreamIo, format!("http handshake: {e}")))?;
    tokio::spawn(async move {
        match conn.without_shutdown().await {
            // Nothing read that was not asked for: the pool may want it back.
            Ok(parts) if parts.read_buf.is_empty() => {
                let Some(mut io) = reuse::parked(&key, conn_id, parts.io.into_inner()) else {
                    tracing::debug!(conn = conn_id, "kept upstream connection parked");
                    return;
                };
                // Not wanted: closed as hyper would have.
                let _ = io.shutdown().await;
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "upstream http connection ended with an error"),
        }
        reuse::ended(&key, conn_id, Instant::now());
    });
    Ok(sender)
}

const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers (RFC 9110 section 7.6.1) and the proxy-specific ones.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    PROXY_CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// How many names listed in `Connection` are matched against the fields present; the rest are
/// parsed (see [`strip_hop_by_hop`]).
const MATCHED_TOKENS: usize = 8;

/// Removes hop-by-hop headers, every header named in `Connection`, and `Transfer-Encoding`
/// (hyper frames the body again on the next hop).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names (standard ones compare as a tag) finds the fields present, and
    // only those are removed: a removal hashes its name, and removing all nine from every head
    // cost ~2,000 instructions though most heads carry one or none. The first names listed in
    // `Connection` are matched against the names present, not parsed into names of their own
    // (for a token such as `close` that was an allocation per head): ~25 % off a
    // forwarded head (`benches/head.rs`).
    let mut gone: Vec<HeaderName> = Vec::new();
    let mut connection = false;
    for name in headers.keys() {
        if *name == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(name) {
            connection |= *name == header::CONNECTION || *name == PROXY_CONNECTION;
            gone.push(name.clone());
        }
    }
    if connection {
        let tokens = headers
            .get_all(header::CONNECTION)
            .iter()
            .chain(headers.get_all(&PROXY_CONNECTION).iter())
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim);
        for (n, token) in tokens.enumerate() {
            let found = if n < MATCHED_TOKENS {
                headers
                    .keys()
                    .find(|name| name.as_str().eq_ignore_ascii_case(token))
                    .filter(|name| !gone.contains(name))
                    .cloned()
            } else {
                // Past a few, each token is parsed into a name (linear in the tokens: a
                // hostile head's thousands must not meet every field each). A name removed
                // twice is a miss the second time.
                HeaderName::from_bytes(token.as_bytes()).ok()
            };
            gone.extend(found);
        }
    }
    for name in &gone {
        headers.remove(name);
    }
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// The typed error answer: status, `Proxy-Status`, a one-line text body.
pub fn error_response(e: &GatewayError) -> Response<Body> {
    let body = format!("proxygate: {e}\n");
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
    *resp.status_mut() = e.http_status();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&e.proxy_status()) {
        h.insert("proxy-status", v);
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if e.kind == ErrorKind::ClientAuth {
        h.insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"proxygate\""),
        );
    }
    resp
}

/// The same answer as raw bytes, for errors found before hyper has the connection.
pub(crate) fn raw_error_response(e: &GatewayError) -> Vec<u8> {
    let status = e.http_status();
    let body = format!("proxygate: {e}\n");
    let challenge = if e.kind == ErrorKind::ClientAuth {
        "Proxy-Authenticate: Basic realm=\"proxygate\"\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {} {}\r\nProxy-Status: {}\r\n{challenge}Content-Type: text/plain; \
         charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        e.proxy_status(),
        body.len()
    )
    .into_bytes()
}

/// Answers `e` with [`raw_error_response`] and closes the writing side (a client that is gone
/// is no error of ours).
pub(crate) async fn answer_error<S: Io>(stream: &mut S, e: &GatewayError) {
    let _ = stream.write_all(&raw_error_response(e)).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_test::io::Builder;

    #[test]
    fn known_block_pages_are_a_site_turning_the_upstream_away() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        let none = h(&[]);
        assert!(turned_away(StatusCode::FORBIDDEN, &none));
        assert!(turned_away(StatusCode::TOO_MANY_REQUESTS, &none));
        assert!(!turned_away(StatusCode::OK, &none));
        assert!(!turned_away(StatusCode::SERVICE_UNAVAILABLE, &none));
        // Cloudflare's challenge page, served 503 (or 403), and AWS WAF's captcha (405) and
        // challenge (202).
        let cf = h(&[("cf-mitigated", "challenge"), ("server", "cloudflare")]);
        assert!(turned_away(StatusCode::SERVICE_UNAVAILABLE, &cf));
        let waf = h(&[("x-amzn-waf-action", "captcha")]);
        assert!(turned_away(StatusCode::METHOD_NOT_ALLOWED, &waf));
        let waf = h(&[("x-amzn-waf-action", "challenge")]);
        assert!(turned_away(StatusCode::ACCEPTED, &waf));
        // Cloudflare serving the page itself is no block.
        assert!(!turned_away(
            StatusCode::OK,
            &h(&[("server", "cloudflare")])
        ));
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic abc"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
    }

    /// The head of `GET <uri>` with `fields`, as hyper hands it over.
    fn parts(uri: &str, fields: &[(&'static str, &'static str)]) -> http::request::Parts {
        let mut req = Request::get(uri).body(()).unwrap();
        for (k, v) in fields {
            req.headers_mut().append(*k, HeaderValue::from_static(v));
        }
        req.into_parts().0
    }

    #[test]
    fn absolute_form_heads_are_made_ready_for_the_next_hop() {
        let mut p = parts(
            "http://Example.com:8080/a/b?x=1",
            &[
                ("host", "spoofed.example"),
                ("proxy-connection", "keep-alive"),
                ("proxy-authorization", "Basic abc"),
                ("expect", "100-continue"),
                ("accept", "*/*"),
            ],
        );
        let (target, origin) = to_upstream_head(&mut p).unwrap();
        assert_eq!(target.to_string(), "example.com:8080");
        assert_eq!(origin, "/a/b?x=1");
        assert_eq!(p.headers["host"], "Example.com:8080");
        assert_eq!(p.headers["accept"], "*/*");
        assert_eq!(p.headers.len(), 2, "{:?}", p.headers);
        // The request itself stays in absolute form (an HTTP upstream gets it so).
        assert_eq!(p.uri, "http://Example.com:8080/a/b?x=1");

        // Port 80 is left out of Host; an empty path is `/`, before a query too.
        for (uri, origin) in [
            ("http://h.example:80", "/"),
            ("http://h.example", "/"),
            ("http://h.example?q=1", "/?q=1"),
            ("http://h.example/?q=1", "/?q=1"),
        ] {
            let mut p = parts(uri, &[]);
            let (target, got) = to_upstream_head(&mut p).unwrap();
            assert_eq!(target.to_string(), "h.example:80", "{uri}");
            assert_eq!(got, origin, "{uri}");
            assert_eq!(p.headers["host"], "h.example", "{uri}");
        }

        for (uri, why) in [
            ("/origin-form", "origin-form request"),
            ("https://h.example/", "use CONNECT"),
            ("ftp://h.example/", "unsupported URI scheme"),
        ] {
            let mut p = parts(uri, &[("x-kept", "1")]);
            let e = to_upstream_head(&mut p).unwrap_err();
            assert_eq!(e.kind, ErrorKind::ClientMalformed, "{uri}");
            assert!(e.to_string().contains(why), "{uri}: {e}");
        }
    }

    const LIMITS: HeadLimits = HeadLimits {
        bytes: 1024,
        headers: 16,
        target: 256,
    };

    #[tokio::test]
    async fn too_many_headers_and_long_targets_are_typed() {
        let many: String = (0..20).map(|i| format!("X-{i}: v\r\n")).collect();
        let head = format!("GET http://a/ HTTP/1.1\r\n{many}\r\n");
        let mut mock = Builder::new().read(head.as_bytes()).build();
        let e = read_first_head(&mut mock, BytesMut::new(), LIMITS)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::ClientHeaderTooLarge);
        assert_eq!(e.http_status(), 431);
        let long = format!(
            "GET http://a/{} HTTP/1.1\r\nHost: a\r\n\r\n",
            "x".repeat(300)
        );
        let mut mock = Builder::new().read(long.as_bytes()).build();
        let e = read_first_head(&mut mock, BytesMut::new(), LIMITS)
            .await
            .unwrap_err();
        assert_eq!(
            (e.kind, e.http_status().as_u16()),
            (ErrorKind::ClientUriTooLong, 414)
        );
        // Still sending the request line, already too long: refused before the head ends.
        let endless = format!("GET http://a/{}", "x".repeat(400));
        let mut mock = Builder::new().read(endless.as_bytes()).build();
        let e = read_first_head(&mut mock, BytesMut::new(), LIMITS)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::ClientUriTooLong);
    }

    #[tokio::test]
    async fn first_head_is_read_whole() {
        let mut mock = Builder::new()
            .read(b"GET http://a/ HTTP/1.1\r\nHo")
            .read(b"st: a\r\n\r\nBODY")
            .build();
        let buf = read_first_head(&mut mock, BytesMut::new(), LIMITS)
            .await
            .unwrap();
        assert!(buf.ends_with(b"\r\n\r\nBODY"));
    }

    #[tokio::test]
    async fn first_head_continues_from_the_bytes_already_read() {
        // The whole head came with the first read: no read at all (the mock has none).
        let mut mock = Builder::new().build();
        let first = BytesMut::from(&b"CONNECT a:443 HTTP/1.1\r\n\r\n\x16"[..]);
        let buf = read_first_head(&mut mock, first, LIMITS).await.unwrap();
        assert_eq!(&buf[..], b"CONNECT a:443 HTTP/1.1\r\n\r\n\x16");
        // Part of it: the rest is read.
        let mut mock = Builder::new().read(b"st: a\r\n\r\n").build();
        let first = BytesMut::from(&b"GET http://a/ HTTP/1.1\r\nHo"[..]);
        let buf = read_first_head(&mut mock, first, LIMITS).await.unwrap();
        assert!(buf.ends_with(b"Host: a\r\n\r\n"));
        // A first read that is already too long or malformed is refused without reading more.
        let mut mock = Builder::new().build();
        let first = BytesMut::from(&b"\x16\x03\x01garbage\r\n\r\n"[..]);
        let e = read_first_head(&mut mock, first, LIMITS).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::ClientMalformed);
    }

    #[tokio::test]
    async fn garbage_and_oversized_heads_are_typed() {
        let mut mock = Builder::new().read(b"\x16\x03\x01garbage\r\n\r\n").build();
        let e = read_first_head(&mut mock, BytesMut::new(), LIMITS)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::ClientMalformed);

        let big = format!("GET http://a/ HTTP/1.1\r\nX: {}\r\n", "a".repeat(2000));
        let mut mock = Builder::new().read(big.as_bytes()).build();
        let e = read_first_head(&mut mock, BytesMut::new(), LIMITS)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::ClientHeaderTooLarge);

        let mut mock = Builder::new().read(b"GET http://a/ HTT").build();
        let e = read_first_head(&mut mock, BytesMut::new(), LIMITS)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::ClientMalformed);
    }

    #[test]
    fn raw_error_has_proxy_status() {
        let e = GatewayError::new(ErrorKind::ClientMalformed, "bad");
        let raw = String::from_utf8(raw_error_response(&e)).unwrap();
        assert!(raw.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(raw.contains("Proxy-Status: proxygate; error=http_request_error;"));
    }

    /// The shortcut for plain `host:port` targets finds what `http`'s URI parser (hyper's
    /// path) finds: whatever it takes as plain, the parser takes too, as exactly that
    /// authority; anything else goes through the parser.
    mod connect_authority {
        use super::super::{connect_authority, plain_authority};
        use http::Uri;
        use proptest::prelude::*;

        fn by_uri(s: &str) -> Option<Option<String>> {
            let uri: Uri = s.parse().ok()?;
            Some(uri.authority().map(|a| a.as_str().to_owned()))
        }

        fn agrees(s: &str) {
            let ours = connect_authority(s).ok().map(|a| a.map(|a| a.into_owned()));
            assert_eq!(ours, by_uri(s), "{s:?}");
        }

        proptest! {
            #[test]
            fn names_and_ports(s in "[a-zA-Z0-9.-]{0,12}:[0-9]{0,6}") {
                agrees(&s);
            }

            #[test]
            fn ipv6_literals(s in r"\[[0-9a-fA-F:.]{0,12}\]:[0-9]{1,5}") {
                agrees(&s);
            }

            #[test]
            fn anything_printable(s in "[ -~]{0,24}") {
                agrees(&s);
            }
        }

        #[test]
        fn the_usual_targets_take_the_shortcut() {
            for s in ["example.com:443", "127.0.0.1:8080", "[::1]:443", "a-b.c:1"] {
                assert!(plain_authority(s), "{s}");
                agrees(s);
            }
            for s in [
                "example.com",
                "example.com:",
                "http://example.com:80/",
                "user@h:1",
                "h:1/",
                "[]:1",
                "[::1:1",
                ":443",
                "h:123456",
            ] {
                assert!(!plain_authority(s), "{s}");
                agrees(s);
            }
        }
    }

    #[test]
    fn hop_by_hop_fields_go_and_the_rest_stay() {
        let head = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            m
        };
        let names = |m: &HeaderMap| {
            let mut v: Vec<String> = m.keys().map(|k| k.to_string()).collect();
            v.sort();
            v
        };
        // None of them: untouched.
        let plain = [("host", "a"), ("accept", "*/*"), ("x-custom", "1")];
        let mut m = head(&plain);
        strip_hop_by_hop(&mut m);
        assert_eq!(m, head(&plain));
        // Every hop-by-hop field, Transfer-Encoding, and what Connection and
        // Proxy-Connection name.
        let mut m = head(&[
            ("host", "a"),
            ("connection", "close, X-Named"),
            ("proxy-connection", "x-also"),
            ("keep-alive", "5"),
            ("proxy-authorization", "Basic eA=="),
            ("proxy-authenticate", "Basic"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("upgrade", "h2c"),
            ("transfer-encoding", "chunked"),
            ("x-named", "1"),
            ("x-also", "2"),
            ("x-kept", "3"),
        ]);
        strip_hop_by_hop(&mut m);
        assert_eq!(names(&m), ["host", "x-kept"]);
        // Transfer-Encoding alone is found too.
        let mut m = head(&[("host", "a"), ("transfer-encoding", "chunked")]);
        strip_hop_by_hop(&mut m);
        assert_eq!(names(&m), ["host"]);
        // Names in any case, with spaces and tabs around them, in several Connection fields,
        // every value of a named field; a name listed twice, a standard one, one that is not
        // there, an empty or invalid token: no harm.
        let mut m = head(&[
            ("host", "a"),
            ("connection", " X-Upper ,\tx-upper, ,Accept"),
            ("connection", "x-b a, x-absent, x-second"),
            ("x-upper", "1"),
            ("x-upper", "2"),
            ("accept", "*/*"),
            ("x-second", "3"),
            ("x-b", "4"),
        ]);
        strip_hop_by_hop(&mut m);
        assert_eq!(names(&m), ["host", "x-b"]);
        // Past the first few names listed, the rest are found too (parsed, not matched).
        let many: Vec<String> = (0..2000).map(|i| format!("X-T{i}")).collect();
        let listed = format!("{}, X-Late", many.join(","));
        let mut m = head(&[
            ("host", "a"),
            ("connection", &listed),
            ("x-t3", "early"),
            ("x-t1999", "late"),
            ("x-late", "1"),
            ("x-kept", "2"),
        ]);
        strip_hop_by_hop(&mut m);
        assert_eq!(names(&m), ["host", "x-kept"]);
    }

    #[test]
    fn a_uri_is_measured_as_written() {
        for s in [
            "http://example.com/a?b=c",
            "http://example.com",
            "example.com:443",
            "/just/a/path?q",
            "*",
            "http://[::1]:8080/x",
        ] {
            let uri: Uri = s.parse().unwrap();
            assert_eq!(uri_len(&uri), uri.to_string().len(), "{s}");
        }
    }

    /// A gateway with no upstreams, `server` adjusted, and the trigger of its shutdown.
    fn gateway_with(
        server: impl FnOnce(&mut crate::config::ServerConfig),
    ) -> (Gateway, proxygate_core::ShutdownTrigger) {
        let (trigger, shutdown) = proxygate_core::Shutdown::new();
        let (reader, _) = proxygate_pool::Pool::create(
            proxygate_pool::Strategy::default(),
            proxygate_pool::HealthConfig::default(),
        );
        let mut config = crate::Config::default();
        server(&mut config.server);
        let gw = Gateway::new(
            config,
            crate::auth::ClientAuth::open(),
            reader,
            shutdown,
            crate::Metrics::unregistered(),
        )
        .unwrap();
        (gw, trigger)
    }

    /// Serves `stream` as an accepted HTTP connection, in a task of its own.
    fn serve(gw: &Gateway, stream: tokio::io::DuplexStream) -> tokio::task::JoinHandle<()> {
        let peer = SocketAddr::from(([127, 0, 0, 1], 40000));
        let slot = crate::gateway::ConnectionSlot::unlimited(gw, peer).unwrap();
        let opened = Opened::fresh(Duration::from_secs(10));
        let gw = gw.clone();
        tokio::spawn(async move {
            serve_http(gw, stream, peer, slot, opened).await;
        })
    }

    /// One answer off `client`: its head and body (`Content-Length` framed).
    async fn answer(client: &mut tokio::io::DuplexStream) -> (String, Vec<u8>) {
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            assert_eq!(
                client.read(&mut byte).await.unwrap(),
                1,
                "closed in the head"
            );
            got.push(byte[0]);
        }
        let head = String::from_utf8(got).unwrap();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.parse().unwrap());
        let mut body = vec![0u8; len];
        client.read_exact(&mut body).await.unwrap();
        (head, body)
    }

    /// An answer hyper wrote and could not flush (a client that does not read) is flushed before
    /// the connection is closed. hyper lets a connection go after a flush, except when the
    /// request's body ends after its answer was written, as here: a 403 for a private
    /// destination (through no upstream), its body sent after the answer, and a 16-byte pipe
    /// that holds the answer until it is read. (Before it parks a connection, the timer waits
    /// for the same flush: `park`'s tests.)
    #[tokio::test]
    async fn the_last_answer_is_flushed_before_the_connection_closes() {
        let (gw, _trigger) = gateway_with(|s| {
            s.keepalive_release_after = Duration::from_millis(50);
        });
        let (mut client, server) = tokio::io::duplex(16);
        let served = serve(&gw, server);
        client
            .write_all(
                b"POST http://10.0.0.1/ HTTP/1.1\r\nHost: 10.0.0.1\r\nContent-Length: 4\r\n\r\n",
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(b"body").await.unwrap();
        // Not read for a while: hyper has closed its side by then.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (head, body) = answer(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
        assert!(body.starts_with(b"proxygate: "), "{body:?}");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        served.await.unwrap();
    }

    /// The size of what an async fn returns, without calling it (its arguments need not exist).
    fn future_size<F, A, B, C, D, E, G, R>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D, E, G) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// Every forwarded request's future is held by hyper and moved whole by each async layer
    /// as it starts the next, each time at its full size: the dial of a new connection (~0.5
    /// KiB of state, in most requests never entered, as they take a kept connection) is boxed
    /// out of it (see `tests/bench/results-2026-11-29.md` for what it measured).
    #[test]
    fn a_forwarded_requests_future_leaves_the_dial_boxed() {
        let sender = future_size(upstream_sender);
        assert!(sender <= 850, "upstream_sender's future is {sender} bytes");
        let handle = future_size(|a, b, c, d, _: (), _: ()| super::handle(a, b, c, d));
        assert!(handle <= 3300, "a request's future is {handle} bytes");
    }
}
