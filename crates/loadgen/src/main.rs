//! pg-loadgen: drives load *through a forward proxy* and reports what it got: completed
//! requests, errors by kind, requests per second, latency percentiles (p50 to p99.9), bytes.
//! The same client code runs against proxygate and its peers (squid, haproxy, pproxy), so the
//! figures compare.
//!
//! ```text
//! pg-loadgen --proxy 127.0.0.1:8080 --origin 127.0.0.1:8081 --scenario connect \
//!     [--concurrency 50] [--duration 8s] [--rate 1000] [--requests N] [--json]
//! ```
//!
//! Scenarios:
//! - `connect`: a new HTTP CONNECT tunnel per request (connect, CONNECT, one GET, close);
//! - `socks5`: a new SOCKS5 tunnel per request;
//! - `in-tunnel`: GETs inside long-lived CONNECT tunnels (one per worker, kept alive);
//! - `keepalive`: absolute-form GETs over kept-alive proxy connections;
//! - `absolute-new`: absolute-form GETs, a new proxy connection each;
//! - `bulk`: GETs of a large body (`--bulk-path`) through CONNECT tunnels, reporting MB/s;
//! - `idle`: `--tunnels` CONNECT tunnels opened and held idle for `--duration` (prints
//!   `established N` on stderr once they are up, for whoever measures the proxy meanwhile), then
//!   each is checked with one GET;
//! - `idle-keepalive`: `--tunnels` proxy connections, each with one absolute-form GET answered
//!   and kept alive, held idle for `--duration` (`established N` as above), then each checked
//!   with one more absolute-form GET. A proxy that closed a connection after its answer (it or
//!   its upstream would not keep it alive) counts it as not held.
//!
//! Closed loop by default (`--concurrency` workers, each sending its next request when the
//! last is answered). With `--rate R`, open loop: requests are due at fixed intervals and each
//! latency counts from when it was due, so a stalled proxy shows up in the percentiles instead
//! of slowing the load down (no coordinated omission); `--concurrency` then caps the requests
//! in flight. The due times come from a thread of their own, accurate to tens of microseconds
//! (tokio's timer is not: one millisecond), and the requests run on one thread; the report's
//! `send_late_us` says how late after its due time each request was started. Loopback or a lab
//! only: it sends as fast as it is told.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    Connect,
    Socks5,
    InTunnel,
    Keepalive,
    AbsoluteNew,
    Bulk,
    Idle,
    IdleKeepalive,
}

#[derive(Debug, Parser)]
#[command(
    name = "pg-loadgen",
    about = "Load through a forward proxy: throughput and latency"
)]
struct Args {
    /// The proxy, HOST:PORT (it must speak what the scenario needs: HTTP CONNECT,
    /// absolute-form, or SOCKS5).
    #[arg(long)]
    proxy: SocketAddr,
    /// The origin the requests are for, HOST:PORT (an HTTP server reachable from the proxy).
    #[arg(long)]
    origin: SocketAddr,
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Requests in flight (closed loop: workers; open loop: the cap).
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// How long to send (`8s`, `500ms`, `2m`).
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    duration: Duration,
    /// Open loop: requests per second, due at fixed intervals.
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many requests (whichever of this and --duration comes first).
    #[arg(long)]
    requests: Option<u64>,
    /// The path requested.
    #[arg(long, default_value = "/")]
    path: String,
    /// The path of a large body (bulk).
    #[arg(long, default_value = "/bulk")]
    bulk_path: String,
    /// Tunnels (idle) or kept-alive connections (idle-keepalive) held open.
    #[arg(long, default_value_t = 1000)]
    tunnels: usize,
    /// One request's limit.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("not a duration: {s:?} (use ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// A connection and the bytes read past what was consumed.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// No byte of the current exchange's response has arrived (a failure then means the
    /// request was not answered at all).
    untouched: bool,
}

fn is_closed(kind: &str) -> bool {
    kind == "closed" || kind.starts_with("io: ")
}

/// Why a request failed (the report counts each).
#[derive(Debug)]
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(format!("io: {e}"))
    }
}

fn fail(kind: impl Into<String>) -> Failure {
    Failure(kind.into())
}

const MAX_HEAD: usize = 64 * 1024;

impl Conn {
    async fn open(addr: SocketAddr) -> Result<Conn, Failure> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| fail(format!("connect: {}", e.kind())))?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
            untouched: true,
        })
    }

    /// Reads until `buf` holds at least `n` bytes.
    async fn fill(&mut self, n: usize) -> Result<(), Failure> {
        while self.buf.len() < n {
            let mut chunk = [0u8; 16 * 1024];
            let got = self.stream.read(&mut chunk).await?;
            if got == 0 {
                return Err(fail("closed"));
            }
            self.untouched = false;
            self.buf.extend_from_slice(&chunk[..got]);
        }
        Ok(())
    }

    /// Reads one response head: status, content length, whether the connection stays open.
    /// The head's bytes are consumed.
    async fn head(&mut self) -> Result<(u16, Option<u64>, bool), Failure> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = resp.code.unwrap_or(0);
                    let mut length = None;
                    let mut keep = resp.version == Some(1);
                    for h in resp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            length = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse().ok());
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
                            keep = !v.contains("close") && (keep || v.contains("keep-alive"));
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            return Err(fail("chunked response (unsupported)"));
                        }
                    }
                    self.buf.drain(..n);
                    return Ok((status, length, keep));
                }
                Ok(httparse::Status::Partial) if self.buf.len() < MAX_HEAD => {
                    let want = self.buf.len() + 1;
                    self.fill(want).await?;
                }
                Ok(httparse::Status::Partial) => return Err(fail("response head too large")),
                Err(e) => return Err(fail(format!("bad response: {e}"))),
            }
        }
    }

    /// Sends `request` and reads the response; returns the body's length and whether the
    /// connection may carry another request.
    async fn exchange(&mut self, request: &[u8]) -> Result<(u64, bool), Failure> {
        self.untouched = self.buf.is_empty();
        self.stream.write_all(request).await?;
        let (status, length, keep) = self.head().await?;
        if !(200..300).contains(&status) {
            return Err(fail(format!("status {status}")));
        }
        let body = match length {
            Some(n) => {
                self.drain(n).await?;
                n
            }
            None => {
                // Until the end of the stream.
                let mut n = self.buf.len() as u64;
                self.buf.clear();
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let got = self.stream.read(&mut chunk).await?;
                    if got == 0 {
                        break;
                    }
                    n += got as u64;
                }
                return Ok((n, false));
            }
        };
        Ok((body, keep && length.is_some()))
    }

    /// Consumes `n` body bytes without keeping them.
    async fn drain(&mut self, n: u64) -> Result<(), Failure> {
        let buffered = (self.buf.len() as u64).min(n);
        self.buf.drain(..buffered as usize);
        let mut left = n - buffered;
        let mut chunk = vec![0u8; 64 * 1024];
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
            let got = self.stream.read(&mut chunk[..want]).await?;
            if got == 0 {
                return Err(fail("closed mid-body"));
            }
            left -= got as u64;
        }
        Ok(())
    }

    /// An HTTP CONNECT tunnel to `origin` through `proxy`.
    async fn connect_tunnel(proxy: SocketAddr, origin: SocketAddr) -> Result<Conn, Failure> {
        let mut c = Conn::open(proxy).await?;
        c.stream
            .write_all(format!("CONNECT {origin} HTTP/1.1\r\nHost: {origin}\r\n\r\n").as_bytes())
            .await?;
        let (status, _, _) = c.head().await?;
        if status != 200 {
            return Err(fail(format!("CONNECT status {status}")));
        }
        Ok(c)
    }

    /// A SOCKS5 tunnel (no authentication) to `origin` through `proxy`.
    async fn socks5_tunnel(proxy: SocketAddr, origin: SocketAddr) -> Result<Conn, Failure> {
        let mut c = Conn::open(proxy).await?;
        // Greeting (no authentication), then CONNECT.
        let mut req = vec![5, 1, 0, 5, 1, 0];
        match origin {
            SocketAddr::V4(a) => {
                req.push(1);
                req.extend(a.ip().octets());
            }
            SocketAddr::V6(a) => {
                req.push(4);
                req.extend(a.ip().octets());
            }
        }
        req.extend(origin.port().to_be_bytes());
        // Greeting, then the request once the method is chosen, as clients do (some servers
        // read the greeting with one read and drop what came with it).
        c.stream.write_all(&req[..3]).await?;
        c.fill(2).await?;
        if c.buf[..2] != [5, 0] {
            return Err(fail("SOCKS5 method refused"));
        }
        c.buf.drain(..2);
        c.stream.write_all(&req[3..]).await?;
        c.fill(5).await?;
        if c.buf[1] != 0 {
            return Err(fail(format!("SOCKS5 reply {:#04x}", c.buf[1])));
        }
        let addr_len = match c.buf[3] {
            1 => 4,
            4 => 16,
            3 => 1 + usize::from(c.buf[4]),
            _ => return Err(fail("SOCKS5 bad address type")),
        };
        let total = 4 + addr_len + 2;
        c.fill(total).await?;
        c.buf.drain(..total);
        Ok(c)
    }
}

/// The state shared by every worker of a run.
#[derive(Debug)]
struct Run {
    args: Args,
    /// Requests started so far (the `--requests` budget).
    started: AtomicU64,
    bytes: AtomicU64,
    /// Requests sent again because a kept-alive connection had been closed.
    reconnects: AtomicU64,
    /// Kept-alive connections (in-tunnel, keepalive, bulk).
    idle: Mutex<Vec<Conn>>,
    get_origin_form: Vec<u8>,
    get_origin_form_close: Vec<u8>,
    get_absolute: Vec<u8>,
    get_absolute_close: Vec<u8>,
    get_bulk: Vec<u8>,
}

impl Run {
    fn new(args: Args) -> Run {
        let (o, p) = (args.origin, &args.path);
        Run {
            get_origin_form: format!("GET {p} HTTP/1.1\r\nHost: {o}\r\n\r\n").into_bytes(),
            get_origin_form_close: format!(
                "GET {p} HTTP/1.1\r\nHost: {o}\r\nConnection: close\r\n\r\n"
            )
            .into_bytes(),
            get_absolute: format!("GET http://{o}{p} HTTP/1.1\r\nHost: {o}\r\n\r\n").into_bytes(),
            get_absolute_close: format!(
                "GET http://{o}{p} HTTP/1.1\r\nHost: {o}\r\nConnection: close\r\n\r\n"
            )
            .into_bytes(),
            get_bulk: format!("GET {} HTTP/1.1\r\nHost: {o}\r\n\r\n", args.bulk_path).into_bytes(),
            started: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            idle: Mutex::new(Vec::new()),
            args,
        }
    }

    /// Takes the next request from the budget; `false` once it is spent.
    fn take(&self) -> bool {
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        self.args.requests.is_none_or(|max| n < max)
    }

    /// A new connection of the scenario's kind: a tunnel, or a connection to the proxy.
    async fn fresh(&self) -> Result<Conn, Failure> {
        match self.args.scenario {
            Scenario::Keepalive => Conn::open(self.args.proxy).await,
            _ => Conn::connect_tunnel(self.args.proxy, self.args.origin).await,
        }
    }

    async fn pooled(&self) -> Option<Conn> {
        self.idle.lock().await.pop()
    }

    async fn give_back(&self, c: Conn) {
        self.idle.lock().await.push(c);
    }

    /// One request of the scenario.
    async fn one(&self) -> Result<(), Failure> {
        let (proxy, origin) = (self.args.proxy, self.args.origin);
        let body = match self.args.scenario {
            Scenario::Connect => {
                let mut c = Conn::connect_tunnel(proxy, origin).await?;
                c.exchange(&self.get_origin_form_close).await?.0
            }
            Scenario::Socks5 => {
                let mut c = Conn::socks5_tunnel(proxy, origin).await?;
                c.exchange(&self.get_origin_form_close).await?.0
            }
            Scenario::AbsoluteNew => {
                let mut c = Conn::open(proxy).await?;
                c.exchange(&self.get_absolute_close).await?.0
            }
            Scenario::InTunnel | Scenario::Bulk | Scenario::Keepalive => {
                let request = match self.args.scenario {
                    Scenario::Bulk => &self.get_bulk,
                    Scenario::Keepalive => &self.get_absolute,
                    _ => &self.get_origin_form,
                };
                let (mut c, reused) = match self.pooled().await {
                    Some(c) => (c, true),
                    None => (self.fresh().await?, false),
                };
                let (n, keep) = match c.exchange(request).await {
                    // A kept-alive connection the other side closed meanwhile: a client
                    // sends its (idempotent) GET again on a new one, as browsers and curl do.
                    Err(Failure(kind)) if reused && c.untouched && is_closed(&kind) => {
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                        c = self.fresh().await?;
                        c.exchange(request).await?
                    }
                    other => other?,
                };
                if keep {
                    self.give_back(c).await;
                }
                n
            }
            Scenario::Idle | Scenario::IdleKeepalive => {
                return Err(fail("idle scenarios are not request scenarios"));
            }
        };
        self.bytes.fetch_add(body, Ordering::Relaxed);
        Ok(())
    }
}

/// What one worker (or the open-loop dispatcher) recorded.
#[derive(Debug)]
struct Tally {
    latency: Histogram<u64>,
    completed: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> anyhow::Result<Tally> {
        Ok(Tally {
            latency: Histogram::new_with_bounds(1, 120_000_000, 3)?,
            completed: 0,
            errors: BTreeMap::new(),
        })
    }

    fn record(&mut self, took: Duration, outcome: Result<(), Failure>) {
        match outcome {
            Ok(()) => {
                self.completed += 1;
                let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                let _ = self.latency.record(us.clamp(1, 120_000_000));
            }
            Err(Failure(kind)) => *self.errors.entry(kind).or_insert(0) += 1,
        }
    }

    fn merge(&mut self, other: Tally) {
        let _ = self.latency.add(&other.latency);
        self.completed += other.completed;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_insert(0) += v;
        }
    }
}

async fn timed(run: &Run) -> Result<(), Failure> {
    match tokio::time::timeout(run.args.timeout, run.one()).await {
        Ok(r) => r,
        Err(_) => Err(fail("timeout")),
    }
}

async fn closed_loop(run: Arc<Run>, until: Instant) -> anyhow::Result<Tally> {
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..run.args.concurrency {
        let run = Arc::clone(&run);
        workers.spawn(async move {
            let mut tally = Tally::new()?;
            while Instant::now() < until && run.take() {
                let t0 = Instant::now();
                let outcome = timed(&run).await;
                tally.record(t0.elapsed(), outcome);
            }
            anyhow::Ok(tally)
        });
    }
    let mut total = Tally::new()?;
    while let Some(t) = workers.join_next().await {
        total.merge(t??);
    }
    Ok(total)
}

/// How long before a due time the pacer stops sleeping and yields until it comes.
const SPIN: Duration = Duration::from_micros(200);

/// Instants due every `interval` from `start` until `until`, each sent when it is due, from a
/// thread of their own.
///
/// tokio's timer has a resolution of one millisecond and fires up to a tick late: at 1,000
/// requests a second that lateness (0-1 ms, its phase set by when the run started) is as large
/// as a loopback request through a proxy (~0.2 ms), and since latency counts from the due time
/// it would be measured as the proxy's. `thread::sleep` alone wakes 60-120 µs late here (the
/// kernel's timer slack, a virtual machine's timers), so the thread sleeps until `SPIN` before
/// each due time and yields in a loop for the rest: at 1,000 a second, ~15 % of a core. A due
/// time the receiver has not taken yet still counts from when it was due: the channel queues
/// them, nothing is skipped.
fn pacer(
    start: std::time::Instant,
    interval: Duration,
    until: std::time::Instant,
) -> std::io::Result<tokio::sync::mpsc::UnboundedReceiver<std::time::Instant>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("pacer".into())
        .spawn(move || {
            for i in 0u32.. {
                let due = start + interval * i;
                if due >= until {
                    break;
                }
                let now = std::time::Instant::now();
                if let Some(nap) = due
                    .checked_sub(SPIN)
                    .and_then(|t| t.checked_duration_since(now))
                {
                    std::thread::sleep(nap);
                }
                while std::time::Instant::now() < due {
                    std::thread::yield_now();
                }
                if tx.send(due).is_err() {
                    break;
                }
            }
        })?;
    Ok(rx)
}

async fn open_loop(run: Arc<Run>, rate: f64, until: Instant) -> anyhow::Result<(Tally, Tally)> {
    if !rate.is_finite() || rate <= 0.0 {
        bail!("--rate must be positive");
    }
    let cap = Arc::new(Semaphore::new(run.args.concurrency));
    let total = Arc::new(std::sync::Mutex::new((Tally::new()?, Tally::new()?)));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut ticks = pacer(std::time::Instant::now(), interval, until.into_std())
        .context("starting the pacer thread")?;
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(due) = ticks.recv().await {
        let due = Instant::from_std(due);
        if !run.take() {
            break;
        }
        // Waiting for a slot counts: the latency runs from when the request was due.
        let Ok(permit) = Arc::clone(&cap).acquire_owned().await else {
            break;
        };
        let (run, total) = (Arc::clone(&run), Arc::clone(&total));
        tasks.spawn(async move {
            let late = due.elapsed();
            let outcome = timed(&run).await;
            let took = due.elapsed();
            drop(permit);
            if let Ok(mut t) = total.lock() {
                t.0.record(took, outcome);
                t.1.record(late, Ok(()));
            }
        });
        // Reap finished tasks as we go: a long run must not hold every handle.
        while tasks.try_join_next().is_some() {}
    }
    drop(ticks);
    while tasks.join_next().await.is_some() {}
    let tallies = std::mem::replace(
        &mut *total
            .lock()
            .map_err(|_| anyhow::anyhow!("a request task panicked"))?,
        (Tally::new()?, Tally::new()?),
    );
    Ok(tallies)
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: Scenario,
    proxy: SocketAddr,
    mode: &'static str,
    concurrency: usize,
    rate: Option<f64>,
    seconds: f64,
    completed: u64,
    errors: BTreeMap<String, u64>,
    rps: f64,
    latency_us: Option<Latency>,
    /// Open loop: how long after its due time each request was started (the generator's own
    /// lag, and the wait for a slot under `--concurrency`): the error of the pacing itself.
    send_late_us: Option<Latency>,
    bytes: u64,
    mbytes_per_s: f64,
    /// idle: tunnels established and still answering at the end.
    tunnels: Option<usize>,
    /// Requests sent again on a new connection because a kept-alive one had been closed.
    reconnects: u64,
}

#[derive(Debug, Serialize)]
struct Latency {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: f64,
}

async fn idle(run: Arc<Run>) -> anyhow::Result<(Tally, usize)> {
    let (proxy, origin) = (run.args.proxy, run.args.origin);
    let gate = Arc::new(Semaphore::new(run.args.concurrency));
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..run.args.tunnels {
        let gate = Arc::clone(&gate);
        let run = Arc::clone(&run);
        opening.spawn(async move {
            let _slot = gate.acquire_owned().await;
            let t0 = Instant::now();
            let open = async {
                if run.args.scenario == Scenario::IdleKeepalive {
                    let mut c = Conn::open(proxy).await?;
                    let (_, keep) = c.exchange(&run.get_absolute).await?;
                    if !keep {
                        return Err(fail("not kept alive"));
                    }
                    Ok(c)
                } else {
                    Conn::connect_tunnel(proxy, origin).await
                }
            };
            let c = tokio::time::timeout(run.args.timeout, open)
                .await
                .unwrap_or_else(|_| Err(fail("timeout")));
            (t0.elapsed(), c)
        });
    }
    let mut tally = Tally::new()?;
    let mut open = Vec::new();
    while let Some(joined) = opening.join_next().await {
        let (took, c) = joined?;
        match c {
            Ok(c) => {
                tally.record(took, Ok(()));
                open.push(c);
            }
            Err(e) => tally.record(took, Err(e)),
        }
    }
    eprintln!("established {}", open.len());
    tokio::time::sleep(run.args.duration).await;
    // Still alive? One request through each.
    let check = match run.args.scenario {
        Scenario::IdleKeepalive => &run.get_absolute_close,
        _ => &run.get_origin_form_close,
    };
    let mut alive = 0;
    for mut c in open {
        if let Ok(Ok(_)) = tokio::time::timeout(run.args.timeout, c.exchange(check)).await {
            alive += 1;
        }
    }
    Ok((tally, alive))
}

impl Latency {
    fn of(tally: &Tally) -> Option<Latency> {
        let h = &tally.latency;
        (tally.completed > 0).then(|| Latency {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        })
    }
}

fn report(
    run: &Run,
    tally: &Tally,
    late: Option<&Tally>,
    seconds: f64,
    tunnels: Option<usize>,
) -> Report {
    let bytes = run.bytes.load(Ordering::Relaxed);
    Report {
        scenario: run.args.scenario,
        proxy: run.args.proxy,
        mode: if run.args.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        concurrency: run.args.concurrency,
        rate: run.args.rate,
        seconds,
        completed: tally.completed,
        errors: tally.errors.clone(),
        rps: tally.completed as f64 / seconds,
        latency_us: Latency::of(tally),
        send_late_us: late.and_then(Latency::of),
        bytes,
        mbytes_per_s: bytes as f64 / seconds / 1e6,
        tunnels,
        reconnects: run.reconnects.load(Ordering::Relaxed),
    }
}

/// The report as text: a line, then a line for each figure it has.
fn write_text(out: &mut impl std::io::Write, r: &Report) -> std::io::Result<()> {
    writeln!(
        out,
        "{:?} via {} ({} loop, {} {}): {} ok, {} errors in {:.1} s = {:.0}/s",
        r.scenario,
        r.proxy,
        r.mode,
        r.concurrency,
        if r.mode == "open" {
            "max in flight"
        } else {
            "workers"
        },
        r.completed,
        r.errors.values().sum::<u64>(),
        r.seconds,
        r.rps
    )?;
    if let Some(l) = &r.latency_us {
        writeln!(
            out,
            "  latency us: p50 {} p90 {} p99 {} p99.9 {} max {} mean {:.0}",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        )?;
    }
    if let Some(l) = &r.send_late_us {
        writeln!(
            out,
            "  sent after due us: p50 {} p99 {} max {}",
            l.p50, l.p99, l.max
        )?;
    }
    if r.bytes > 0 {
        writeln!(out, "  {} bytes, {:.1} MB/s", r.bytes, r.mbytes_per_s)?;
    }
    if r.reconnects > 0 {
        writeln!(
            out,
            "  {} requests sent again after a kept-alive connection closed",
            r.reconnects
        )?;
    }
    if let Some(t) = r.tunnels {
        writeln!(out, "  {t} tunnels still answering after the hold")?;
    }
    for (kind, n) in &r.errors {
        writeln!(out, "  error {kind}: {n}")?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let json = args.json;
    // Open loop on one thread: the pacer's tick and the request it starts are then handled
    // where they arrive (a multi-thread runtime hands a spawned task to another worker, ~50 µs
    // at p50 here, counted as latency). One thread carries tens of thousands of requests a
    // second; closed loop keeps a worker per core.
    let runtime = if args.rate.is_some() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    }
    .context("runtime")?;
    let run = Arc::new(Run::new(args));
    let r = runtime.block_on(async {
        let start = Instant::now();
        let until = start + run.args.duration;
        let (tally, late, tunnels) = match (run.args.scenario, run.args.rate) {
            (Scenario::Idle | Scenario::IdleKeepalive, _) => {
                let (t, alive) = idle(Arc::clone(&run)).await?;
                (t, None, Some(alive))
            }
            (_, Some(rate)) => {
                let (t, late) = open_loop(Arc::clone(&run), rate, until).await?;
                (t, Some(late), None)
            }
            (_, None) => (closed_loop(Arc::clone(&run), until).await?, None, None),
        };
        let seconds = start.elapsed().as_secs_f64();
        anyhow::Ok(report(&run, &tally, late.as_ref(), seconds, tunnels))
    })?;
    emit(&mut std::io::stdout().lock(), &r, json)
}

/// The report to `out`, as JSON or text. A reader that has seen enough (`| head -1`) and closed
/// the pipe is no failure of the run.
fn emit(out: &mut impl std::io::Write, r: &Report, json: bool) -> anyhow::Result<()> {
    let written = if json {
        writeln!(out, "{}", serde_json::to_string(r)?)
    } else {
        write_text(out, r)
    }
    .and_then(|()| out.flush());
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        w => Ok(w?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes `room` bytes, then answers as a closed pipe does.
    struct Pipe {
        got: Vec<u8>,
        room: usize,
    }

    impl std::io::Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.got.len() >= self.room {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(self.room - self.got.len());
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_report_reads_as_text_and_a_closed_pipe_ends_it_quietly() {
        let mut errors = BTreeMap::new();
        errors.insert("refused".to_owned(), 2);
        let r = Report {
            scenario: Scenario::Connect,
            proxy: "127.0.0.1:3128".parse().unwrap(),
            mode: "closed",
            concurrency: 50,
            rate: None,
            seconds: 2.0,
            completed: 1000,
            errors,
            rps: 500.0,
            latency_us: None,
            send_late_us: None,
            bytes: 0,
            mbytes_per_s: 0.0,
            tunnels: None,
            reconnects: 0,
        };
        let mut all = Pipe {
            got: Vec::new(),
            room: usize::MAX,
        };
        emit(&mut all, &r, false).unwrap();
        assert_eq!(
            String::from_utf8(all.got).unwrap(),
            "Connect via 127.0.0.1:3128 (closed loop, 50 workers): 1000 ok, 2 errors in 2.0 s = \
             500/s\n  error refused: 2\n"
        );
        // `| head -c 10`: the rest finds the pipe closed.
        for json in [false, true] {
            let mut head = Pipe {
                got: Vec::new(),
                room: 10,
            };
            emit(&mut head, &r, json).unwrap();
            assert_eq!(head.got.len(), 10);
        }
        let mut full = Pipe {
            got: Vec::new(),
            room: 0,
        };
        assert!(write_text(&mut full, &r).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("8s"), Ok(Duration::from_secs(8)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn the_pacer_sends_every_due_time_in_order_and_none_early() {
        let start = std::time::Instant::now();
        let interval = Duration::from_millis(2);
        let until = start + interval * 25;
        let mut ticks = pacer(start, interval, until).expect("pacer thread");
        let mut got = Vec::new();
        while let Some(due) = ticks.blocking_recv() {
            // Not before it was due (late is the kernel's to decide, and not tested here).
            assert!(std::time::Instant::now() >= due);
            got.push(due);
        }
        let want: Vec<_> = (0..25).map(|i| start + interval * i).collect();
        assert_eq!(got, want);
    }
}
