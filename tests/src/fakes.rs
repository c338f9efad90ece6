//! Fake upstream proxies, written independently of proxygate's own codecs, that record what
//! they were asked and dial out from their own loopback address (`egress`), so an [`Origin`]'s
//! `x-peer` tells which upstream carried a request.
//!
//! [`Origin`]: crate::origin::Origin

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Which protocol a fake speaks.
#[derive(Clone)]
pub enum Kind {
    Http,
    Https(tokio_rustls::TlsAcceptor),
    Socks5,
    Socks4,
}

/// What a fake saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Credentials presented, one entry per handshake (None: none presented).
    pub auth: Vec<Option<(String, String)>>,
    /// Per request: `CONNECT host:port`, `GET http://...` (absolute form), `socks5 domain
    /// host:port`, `socks5 ip addr`, `socks4a host:port`, `socks4 addr`.
    pub requests: Vec<String>,
    /// An HTTPS fake's TLS handshakes, in order: whether each resumed an earlier session.
    pub tls_resumed: Vec<bool>,
}

/// A running fake upstream.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub egress: IpAddr,
    creds: Option<(String, String)>,
    seen: Arc<Mutex<Seen>>,
    connections: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// Counts a connection open until dropped.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

static NEXT_EGRESS: AtomicU8 = AtomicU8::new(2);

fn next_egress() -> IpAddr {
    let n = NEXT_EGRESS.fetch_add(1, Ordering::SeqCst);
    assert!(n < 250, "out of loopback egress addresses");
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// How a fake misbehaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct Behavior {
    /// Wait this long before answering each connection.
    pub delay: std::time::Duration,
    /// Close every second connection at once, without a word.
    pub fail_every_other: bool,
    /// What an HTTP fake adds to the absolute-form requests it forwards.
    pub reveal: Reveal,
    /// An HTTP fake answers `403` to a CONNECT to this host (its ACL, or a site banning its
    /// address), and serves every other.
    pub refuse_host: Option<&'static str>,
    /// Dial out from this address rather than one of its own: several fakes with the same
    /// egress are one box on several ports (one exit IP).
    pub egress: Option<IpAddr>,
    /// An HTTP fake forwards the headers its client named in `Connection` (hop-by-hop, which a
    /// proxy must remove): it leaks its client's headers.
    pub keep_hop_headers: bool,
    /// How the fake tampers with what it carries.
    pub tamper: Tamper,
}

/// A tampering proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Tamper {
    #[default]
    None,
    /// A man in the middle: an HTTP fake answers a CONNECT itself and ends the client's TLS
    /// with a certificate of its own CA (then holds the connection).
    SwapCertificate,
    /// An HTTP fake appends a script to the HTML bodies of the absolute-form responses it
    /// forwards.
    InjectBody,
}

/// What [`Tamper::InjectBody`] adds.
pub const INJECTED: &str = "<script src=\"http://ads.invalid/x.js\"></script>";

/// Headers an HTTP fake adds when it forwards a request: what a judge classifies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Reveal {
    /// Nothing: an elite proxy.
    #[default]
    Nothing,
    /// `Via: 1.1 fake-proxy`: an anonymous proxy.
    Via,
    /// `X-Forwarded-For: 127.0.0.1` (its client, the gateway): a transparent proxy.
    ClientIp,
}

impl FakeUpstream {
    /// Starts a fake; with `creds`, clients must present them.
    pub async fn start(kind: Kind, creds: Option<(&str, &str)>) -> FakeUpstream {
        Self::start_with(kind, creds, Behavior::default()).await
    }

    /// Starts a fake that misbehaves as `behavior` says.
    pub async fn start_with(
        kind: Kind,
        creds: Option<(&str, &str)>,
        behavior: Behavior,
    ) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let egress = behavior.egress.unwrap_or_else(next_egress);
        let creds: Option<(String, String)> = creds.map(|(u, p)| (u.to_owned(), p.to_owned()));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let connections = Arc::new(AtomicUsize::new(0));
        let ctx = Ctx {
            egress,
            creds: creds.clone(),
            seen: Arc::clone(&seen),
            reveal: behavior.reveal,
            refuse_host: behavior.refuse_host,
            keep_hop_headers: behavior.keep_hop_headers,
            tamper: behavior.tamper,
            rogue: (behavior.tamper == Tamper::SwapCertificate)
                .then(|| crate::tls::TestPki::new().acceptor()),
        };
        let count = Arc::clone(&connections);
        let open = Arc::new(AtomicUsize::new(0));
        let open_count = Arc::clone(&open);
        let task = tokio::spawn(async move {
            // The connections die with the fake, as they do with a proxy that goes down:
            // dropping the fake aborts this task, and with it every connection it serves.
            let mut served = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                while served.try_join_next().is_some() {}
                let n = count.fetch_add(1, Ordering::SeqCst);
                if behavior.fail_every_other && n % 2 == 1 {
                    drop(stream);
                    continue;
                }
                let ctx = ctx.clone();
                let kind = kind.clone();
                open_count.fetch_add(1, Ordering::SeqCst);
                let guard = OpenGuard(Arc::clone(&open_count));
                served.spawn(async move {
                    let _guard = guard;
                    if !behavior.delay.is_zero() {
                        tokio::time::sleep(behavior.delay).await;
                    }
                    match kind {
                        Kind::Http => http_proxy(ctx, stream).await,
                        Kind::Https(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let resumed = tls.get_ref().1.handshake_kind()
                                    == Some(rustls::HandshakeKind::Resumed);
                                ctx.seen.lock().unwrap().tls_resumed.push(resumed);
                                http_proxy(ctx, tls).await;
                            }
                        }
                        Kind::Socks5 => socks5(ctx, stream).await,
                        Kind::Socks4 => socks4(ctx, stream).await,
                    }
                });
            }
        });
        FakeUpstream {
            addr,
            egress,
            creds,
            seen,
            connections,
            open,
            task,
        }
    }

    /// `scheme://user:pass@addr`, credentials percent-encoded.
    pub fn url(&self, scheme: &str) -> String {
        match &self.creds {
            Some((u, p)) => format!(
                "{scheme}://{}:{}@{}",
                utf8_percent_encode(u, NON_ALPHANUMERIC),
                utf8_percent_encode(p, NON_ALPHANUMERIC),
                self.addr
            ),
            None => format!("{scheme}://{}", self.addr),
        }
    }

    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Connections being served now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Ctx {
    egress: IpAddr,
    creds: Option<(String, String)>,
    seen: Arc<Mutex<Seen>>,
    reveal: Reveal,
    refuse_host: Option<&'static str>,
    keep_hop_headers: bool,
    tamper: Tamper,
    /// The man in the middle's own TLS server ([`Tamper::SwapCertificate`]).
    rogue: Option<tokio_rustls::TlsAcceptor>,
}

impl Ctx {
    fn record_auth(&self, auth: Option<(String, String)>) -> bool {
        let ok = self.creds.is_none() || self.creds == auth;
        self.seen.lock().unwrap().auth.push(auth);
        ok
    }

    fn record(&self, request: String) {
        self.seen.lock().unwrap().requests.push(request);
    }

    /// Connects to `host:port` from this fake's egress address.
    async fn dial(&self, host: &str, port: u16) -> Option<TcpStream> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addr = tokio::net::lookup_host((host, port)).await.ok()?.next()?;
        if addr.is_ipv6() {
            return TcpStream::connect(addr).await.ok();
        }
        let socket = TcpSocket::new_v4().ok()?;
        socket.bind(SocketAddr::new(self.egress, 0)).ok()?;
        socket.connect(addr).await.ok()
    }
}

async fn pipe<A, B>(mut a: A, mut b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
}

async fn http_proxy<S: AsyncRead + AsyncWrite + Unpin>(ctx: Ctx, mut s: S) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_len = loop {
        let Ok(n) = s.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let rest = buf[head_len..].to_vec();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let auth = head
        .split("\r\n")
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("proxy-authorization")
                .then(|| v.trim().to_owned())
        })
        .and_then(|v| {
            let token = v.strip_prefix("Basic ")?;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(token)
                .ok()?;
            let raw = String::from_utf8(raw).ok()?;
            let (u, p) = raw.split_once(':')?;
            Some((u.to_owned(), p.to_owned()))
        });
    if !ctx.record_auth(auth) {
        let _ = s
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    }
    ctx.record(format!("{method} {target}"));
    let authority = if method == "CONNECT" {
        target.clone()
    } else {
        let Some(rest) = target.strip_prefix("http://") else {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            return;
        };
        let auth = rest.split('/').next().unwrap_or_default();
        if auth.contains(':') && !auth.ends_with(']') {
            auth.to_owned()
        } else {
            format!("{auth}:80")
        }
    };
    let Some((host, port)) = authority.rsplit_once(':') else {
        return;
    };
    if method == "CONNECT" && ctx.refuse_host == Some(host) {
        let _ = s
            .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    }
    let Some(mut out) = ctx.dial(host, port.parse().unwrap_or(0)).await else {
        let _ = s
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    };
    if method == "CONNECT" {
        if s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
        if let Some(rogue) = &ctx.rogue {
            drop(out);
            if let Ok(mut tls) = rogue.accept(s).await {
                let mut sink = [0u8; 1024];
                while matches!(tls.read(&mut sink).await, Ok(n) if n > 0) {}
            }
            return;
        }
    } else {
        // Forward the head as received, minus our own credentials and (as a proxy must) the
        // hop-by-hop headers its client named in Connection, plus what this proxy reveals.
        let hop: Vec<String> = head
            .split("\r\n")
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("connection").then(|| v.to_owned())
            })
            .flat_map(|v| {
                v.split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            })
            .filter(|t| t != "close" && t != "keep-alive")
            .collect();
        let mut forwarded: String = head
            .split_inclusive("\r\n")
            .filter(|l| !l.to_ascii_lowercase().starts_with("proxy-authorization:"))
            .filter(|l| {
                ctx.keep_hop_headers
                    || !l
                        .split_once(':')
                        .is_some_and(|(k, _)| hop.contains(&k.trim().to_ascii_lowercase()))
            })
            .collect();
        let added = match ctx.reveal {
            Reveal::Nothing => "",
            Reveal::Via => "Via: 1.1 fake-proxy\r\n",
            Reveal::ClientIp => "X-Forwarded-For: 127.0.0.1\r\n",
        };
        forwarded.insert_str(forwarded.len() - 2, added);
        if out.write_all(forwarded.as_bytes()).await.is_err() {
            return;
        }
        if ctx.tamper == Tamper::InjectBody {
            if !rest.is_empty() && out.write_all(&rest).await.is_err() {
                return;
            }
            inject(s, out).await;
            return;
        }
    }
    if !rest.is_empty() && out.write_all(&rest).await.is_err() {
        return;
    }
    pipe(s, out).await;
}

/// Relays one response (read to its end: the client asked for `Connection: close`) with
/// [`INJECTED`] appended to its body and its length fixed.
async fn inject<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, mut out: TcpStream) {
    let mut resp = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        out.read_to_end(&mut resp),
    )
    .await;
    if !matches!(read, Ok(Ok(_))) {
        return;
    }
    let Some(i) = resp.windows(4).position(|w| w == b"\r\n\r\n") else {
        let _ = s.write_all(&resp).await;
        return;
    };
    let head = String::from_utf8_lossy(&resp[..i]).into_owned();
    // Ad injectors go for pages, not APIs.
    if !head
        .to_ascii_lowercase()
        .contains("content-type: text/html")
    {
        let _ = s.write_all(&resp).await;
        return;
    }
    let mut body = resp[i + 4..].to_vec();
    body.extend_from_slice(INJECTED.as_bytes());
    let mut new_head: String = head
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("content-length:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    new_head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let _ = s.write_all(new_head.as_bytes()).await;
    let _ = s.write_all(&body).await;
}

async fn socks5(ctx: Ctx, mut s: TcpStream) {
    let mut head = [0u8; 2];
    if s.read_exact(&mut head).await.is_err() || head[0] != 5 {
        return;
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    if s.read_exact(&mut methods).await.is_err() {
        return;
    }
    let want = if ctx.creds.is_some() { 2 } else { 0 };
    if !methods.contains(&want) {
        let _ = s.write_all(&[5, 0xff]).await;
        return;
    }
    if s.write_all(&[5, want]).await.is_err() {
        return;
    }
    if want == 2 {
        let mut v = [0u8; 2];
        if s.read_exact(&mut v).await.is_err() {
            return;
        }
        let mut user = vec![0u8; usize::from(v[1])];
        let _ = s.read_exact(&mut user).await;
        let plen = s.read_u8().await.unwrap_or(0);
        let mut pass = vec![0u8; usize::from(plen)];
        let _ = s.read_exact(&mut pass).await;
        let creds = (
            String::from_utf8_lossy(&user).into_owned(),
            String::from_utf8_lossy(&pass).into_owned(),
        );
        let ok = ctx.record_auth(Some(creds));
        let _ = s.write_all(&[1, if ok { 0 } else { 1 }]).await;
        if !ok {
            return;
        }
    } else {
        ctx.record_auth(None);
    }
    let mut req = [0u8; 4];
    if s.read_exact(&mut req).await.is_err() {
        return;
    }
    let (host, desc) = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            let _ = s.read_exact(&mut a).await;
            let ip = Ipv4Addr::from(a).to_string();
            (ip.clone(), format!("socks5 ip {ip}"))
        }
        4 => {
            let mut a = [0u8; 16];
            let _ = s.read_exact(&mut a).await;
            let ip = std::net::Ipv6Addr::from(a).to_string();
            (ip.clone(), format!("socks5 ip {ip}"))
        }
        3 => {
            let len = s.read_u8().await.unwrap_or(0);
            let mut name = vec![0u8; usize::from(len)];
            let _ = s.read_exact(&mut name).await;
            let name = String::from_utf8_lossy(&name).into_owned();
            (name.clone(), format!("socks5 domain {name}"))
        }
        _ => return,
    };
    let port = s.read_u16().await.unwrap_or(0);
    ctx.record(format!("{desc}:{port}"));
    match ctx.dial(&host, port).await {
        Some(out) => {
            if s.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await.is_ok() {
                pipe(s, out).await;
            }
        }
        None => {
            let _ = s.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).await;
        }
    }
}

async fn read_cstr(s: &mut TcpStream) -> Option<String> {
    let mut out = Vec::new();
    loop {
        let b = s.read_u8().await.ok()?;
        if b == 0 {
            return String::from_utf8(out).ok();
        }
        out.push(b);
        if out.len() > 255 {
            return None;
        }
    }
}

async fn socks4(ctx: Ctx, mut s: TcpStream) {
    let mut head = [0u8; 8];
    if s.read_exact(&mut head).await.is_err() || head[0] != 4 || head[1] != 1 {
        return;
    }
    let port = u16::from_be_bytes([head[2], head[3]]);
    let ip = Ipv4Addr::new(head[4], head[5], head[6], head[7]);
    let Some(user) = read_cstr(&mut s).await else {
        return;
    };
    let auth = (!user.is_empty()).then(|| (user, String::new()));
    let ok = match (&ctx.creds, &auth) {
        (Some((u, _)), Some((got, _))) => u == got,
        (Some(_), None) => false,
        (None, _) => true,
    };
    ctx.seen.lock().unwrap().auth.push(auth);
    if !ok {
        let _ = s.write_all(&[0, 91, 0, 0, 0, 0, 0, 0]).await;
        return;
    }
    let octets = ip.octets();
    let host = if octets[..3] == [0, 0, 0] && octets[3] != 0 {
        let Some(name) = read_cstr(&mut s).await else {
            return;
        };
        ctx.record(format!("socks4a {name}:{port}"));
        name
    } else {
        ctx.record(format!("socks4 {ip}:{port}"));
        ip.to_string()
    };
    match ctx.dial(&host, port).await {
        Some(out) => {
            if s.write_all(&[0, 90, 0, 0, 0, 0, 0, 0]).await.is_ok() {
                pipe(s, out).await;
            }
        }
        None => {
            let _ = s.write_all(&[0, 91, 0, 0, 0, 0, 0, 0]).await;
        }
    }
}

/// An address where nothing listens: connecting is refused.
pub async fn refusing_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Accepts connections and never says a word.
pub struct Blackhole {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    pub async fn start() -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
        Blackhole {
            addr,
            accepted,
            task,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}
