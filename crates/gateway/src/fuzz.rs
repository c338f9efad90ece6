//! Entry points of the fuzz targets (`fuzz/`), not an API. Each feeds arbitrary bytes to one
//! of our parsers over an in-memory stream (what a client or an upstream would have sent; the
//! stream ends where the bytes do) and must return without panicking, whatever they hold.
//!
//! The gateway they run against has an empty pool and the production destination policy, so a
//! request that parses ends in a refusal or "no upstream" at once, never in a dial.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use proxygate_core::{Shutdown, ShutdownTrigger, Target, Upstream};
use proxygate_pool::{HealthConfig, Pool, Strategy};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::auth::ClientAuth;
use crate::gateway::{ConnectionSlot, Opened};
use crate::{Config, Gateway, Metrics};

/// A stream that yields `input`, then end of stream; writes are counted and dropped.
#[derive(Debug)]
pub struct Scripted {
    input: Vec<u8>,
    at: usize,
    /// The most one read yields.
    max_read: usize,
    /// Bytes written to it.
    pub written: usize,
}

impl Scripted {
    pub fn new(input: &[u8]) -> Self {
        Self::reading_at_most(input, usize::MAX)
    }

    /// One that yields at most `max_read` bytes a read, as a peer whose messages come in
    /// pieces would (and one that answers a message at a time, before the next is sent).
    pub fn reading_at_most(input: &[u8], max_read: usize) -> Self {
        Self {
            input: input.to_vec(),
            at: 0,
            max_read: max_read.max(1),
            written: 0,
        }
    }
}

impl AsyncRead for Scripted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let rest = &self.input[self.at..];
        let n = rest.len().min(buf.remaining()).min(self.max_read);
        buf.put_slice(&rest[..n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Scripted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written += buf.len();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => unreachable!("a current-thread runtime: {e}"),
        }
    })
}

pub(crate) fn gateway() -> Gateway {
    static GW: OnceLock<Option<(Gateway, ShutdownTrigger)>> = OnceLock::new();
    let built = GW.get_or_init(|| {
        let (trigger, shutdown) = Shutdown::new();
        let metrics = Metrics::register(&prometheus::Registry::new()).ok()?;
        let (reader, _) = Pool::create(Strategy::default(), HealthConfig::default());
        let gw = Gateway::new(
            Config::default(),
            ClientAuth::open(),
            reader,
            shutdown,
            metrics,
        )
        .ok()?;
        Some((gw, trigger))
    });
    match built {
        Some((gw, _)) => gw.clone(),
        None => unreachable!("the fuzz gateway builds from defaults"),
    }
}

/// A connection with nothing read yet: the scripted stream delivers every byte.
fn opened(gw: &Gateway) -> Opened {
    Opened::fresh(gw.config().server.header_read_timeout)
}

fn peer() -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], 40000))
}

/// The SOCKS5 server handshake: greeting, RFC 1929 sub-negotiation, request.
pub fn socks5_server(data: &[u8]) {
    let gw = gateway();
    let opened = opened(&gw);
    runtime().block_on(async {
        let served = crate::socks::serve_socks5(gw, Scripted::new(data), peer(), opened).await;
        if let Some(tunnel) = served {
            tunnel.await;
        }
    });
}

/// The SOCKS4/4a server request.
pub fn socks4_server(data: &[u8]) {
    let gw = gateway();
    let opened = opened(&gw);
    runtime().block_on(async {
        let served = crate::socks::serve_socks4(gw, Scripted::new(data), opened).await;
        if let Some(tunnel) = served {
            tunnel.await;
        }
    });
}

/// The HTTP front end: the first head read by hand (limits, target), then hyper and our checks
/// per request (CONNECT, absolute form, authorization, strictness).
pub fn http_server(data: &[u8]) {
    let gw = gateway();
    let Some(slot) = ConnectionSlot::unlimited(&gw, peer()) else {
        return;
    };
    let opened = opened(&gw);
    runtime().block_on(async {
        let served = crate::http::serve_http(gw, Scripted::new(data), peer(), slot, opened).await;
        if let Some((tunnel, _slot)) = served {
            tunnel.await;
        }
    });
}

fn target() -> Target {
    match Target::parse_authority("origin.example:443") {
        Ok(t) => t,
        Err(e) => unreachable!("a fixed target: {e}"),
    }
}

fn upstream(url: &str) -> Upstream {
    match Upstream::parse(url) {
        Ok(u) => u,
        Err(e) => unreachable!("a fixed upstream: {e}"),
    }
}

/// An HTTP upstream's answer to CONNECT.
pub fn upstream_connect_reply(data: &[u8]) {
    // The short reading of a plain reply head agrees with httparse's wherever it answers.
    if let Some(short) = crate::head::simple_reply(data) {
        assert_eq!(Some(short), crate::head::httparse_reply(data));
    }
    let up = upstream("http://user:pass@192.0.2.2:8080");
    let _ = runtime().block_on(crate::dial::http_connect(
        &up,
        Box::new(Scripted::new(data)),
        &target(),
        8192,
    ));
}

/// A SOCKS upstream's replies. The first byte picks SOCKS5 with or without a password, or
/// SOCKS4a (`% 3`), and how the replies arrive (`/ 3 % 3`): a byte a read, two bytes a read
/// (a SOCKS5 upstream's answers are two bytes, each sent before our next message), or all at
/// once (an upstream that sends more than it should before our next message).
pub fn upstream_socks_reply(data: &[u8]) {
    let (pick, data) = data.split_first().unwrap_or((&0, &[]));
    let up = upstream(match pick % 3 {
        0 => "socks5h://192.0.2.2:1080",
        1 => "socks5h://user:pass@192.0.2.2:1080",
        _ => "socks4a://192.0.2.2:1080",
    });
    let max_read = match pick / 3 % 3 {
        0 => 1,
        1 => 2,
        _ => usize::MAX,
    };
    let policy = Config::default().policy();
    let _ = runtime().block_on(crate::dial::socks_connect(
        &up,
        Box::new(Scripted::reading_at_most(data, max_read)),
        &target(),
        &policy,
        None,
    ));
}

/// A client username with routing hints (`name-country-us-session-x-ttl-60`).
pub fn username(data: &[u8]) {
    if let Ok(name) = std::str::from_utf8(data) {
        let _ = crate::dial::Routing::from_username(Some(name));
    }
}
