//! [`Checker`]: validates an upstream **through itself**: connect, the upstream's handshake,
//! and a request to a judge, within `checker.timeout`. It records the response time, the exit
//! address the judge saw and the anonymity ([`crate::judge`]). A check's outcome is an
//! [`Outcome`] like any attempt's, so the app feeds it to the same reputation.
//!
//! The dial goes through the gateway's own connectors, behind the narrow [`Connect`] trait
//! (the app plugs them in; tests may plug a fake). Through an HTTP(S) upstream the judge is
//! asked in absolute form, so the headers the proxy adds are seen; through SOCKS (or to an
//! `https://` judge) a tunnel is opened first.
//!
//! Before checking, [`Checker::calibrate`] asks every judge directly: what our own address is
//! (a proxy that shows it is transparent), which revealing headers the judge adds by itself,
//! and which judges answer at all. A judge that is down is skipped rather than blamed on the
//! proxies; with none answering, checks fail as `no judge` without costing upstreams.
//!
//! A check also looks for **leaks** ([`judge::leak`]: our address, the client's hop-by-hop
//! headers or `Proxy-Authorization` reaching the judge) and, once the judge step passed, for
//! **tampering** ([`crate::integrity`]): the TLS judge's certificate through the upstream
//! against the one seen directly, and a static page's body through it against a direct
//! fetch. Calibration takes those references too; a step without a reference (the site did
//! not answer directly, the page is not static) is skipped, never blamed on the upstream.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use proxygate_core::{ErrorKind, Outcome, Target, Upstream, UpstreamId};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::candidate::Anonymity;
use crate::config::CheckerConfig;
use crate::integrity::{self, Reference};
use crate::judge::{self, Echo, JudgeUrl};

/// Largest judge answer read.
const MAX_JUDGE_BODY: usize = 256 << 10;

/// Any byte stream a connector hands back.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed stream.
pub type Stream = Box<dyn Io>;

/// A boxed future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a step of a check failed: the kind (whose fault) and a password-free detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub detail: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Failure {
        Failure {
            kind,
            detail: detail.into(),
        }
    }
}

/// The dialers a check uses: the gateway's.
pub trait Connect: Send + Sync + std::fmt::Debug {
    /// TCP (and TLS for `https` upstreams) to the upstream itself.
    fn open<'a>(&'a self, up: &'a Upstream) -> BoxFuture<'a, Result<Stream, Failure>>;
    /// A tunnel to `target` through `io`, by the upstream's protocol.
    fn handshake<'a>(
        &'a self,
        up: &'a Upstream,
        io: Stream,
        target: &'a Target,
    ) -> BoxFuture<'a, Result<Stream, Failure>>;
}

/// One check's result.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub id: UpstreamId,
    /// Connect and handshake (or response head) times; the error when it failed.
    pub outcome: Outcome,
    /// Passed and anonymous enough (`checker.min_anonymity`).
    pub passed: bool,
    pub exit_ip: Option<IpAddr>,
    pub anonymity: Option<Anonymity>,
    /// The judge asked.
    pub judge: Option<String>,
    /// Why it failed (never a password).
    pub detail: Option<String>,
    /// Connect to judge answer, ms (what "latency" means for a check).
    pub latency_ms: Option<u64>,
    /// Whether the failure was ours (no judge answering), not the upstream's.
    pub inconclusive: bool,
    /// What the exit leaked ([`judge::leak`]), when it did.
    pub leak: Option<String>,
    /// How it tampered with traffic, when it did: the upstream is to be quarantined.
    pub tampered: Option<String>,
    /// Every configured integrity step ran and passed (what `verified` is earned by).
    pub integrity_ok: bool,
}

impl CheckResult {
    fn failed(id: UpstreamId, outcome: Outcome, judge: Option<String>, detail: String) -> Self {
        CheckResult {
            id,
            outcome,
            passed: false,
            exit_ip: None,
            anonymity: None,
            judge,
            detail: Some(detail),
            latency_ms: None,
            inconclusive: false,
            leak: None,
            tampered: None,
            integrity_ok: false,
        }
    }
}

/// What one integrity step found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// Not configured, or no reference (the site did not answer directly).
    Skipped,
    /// It could not be told (the upstream failed to fetch, timed out, answered other than 200).
    Inconclusive,
    Passed,
    Tampered(String),
}

/// What the integrity steps found.
#[derive(Debug, Default)]
struct Integrity {
    tampered: Option<String>,
    /// Every configured step with a reference ran and passed.
    ok: bool,
}

/// What [`Checker::calibrate`] learned of one judge.
#[derive(Debug, Clone, Default)]
struct Calibration {
    up: bool,
    baseline: Vec<String>,
}

/// Checks upstreams through themselves.
pub struct Checker {
    connect: Arc<dyn Connect>,
    cfg: CheckerConfig,
    judges: Vec<JudgeUrl>,
    tls: tokio_rustls::TlsConnector,
    ours: RwLock<Vec<IpAddr>>,
    calibration: RwLock<Vec<Calibration>>,
    next_judge: AtomicUsize,
    /// The integrity steps' targets (when configured) and what direct fetches showed.
    tls_judge: Option<JudgeUrl>,
    integrity_url: Option<JudgeUrl>,
    /// TLS through an upstream: sees any certificate, to compare it ([`integrity`]).
    observing: Option<tokio_rustls::TlsConnector>,
    reference: RwLock<Reference>,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("judges", &self.judges)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Progress of a batch of checks.
pub trait Progress: Send + Sync {
    fn checked(&self, done: usize, total: usize, passed: usize);
}

impl<F: Fn(usize, usize, usize) + Send + Sync> Progress for F {
    fn checked(&self, done: usize, total: usize, passed: usize) {
        self(done, total, passed);
    }
}

impl Checker {
    /// A checker over `connect`; `tls` is used for `https://` judges. Judge URLs were
    /// validated with the config.
    pub fn new(
        connect: Arc<dyn Connect>,
        cfg: CheckerConfig,
        tls: Arc<rustls::ClientConfig>,
    ) -> Checker {
        let judges: Vec<JudgeUrl> = cfg
            .judge_urls
            .iter()
            .filter_map(|u| JudgeUrl::parse(u).ok())
            .collect();
        let parse = |u: &str| (!u.is_empty()).then(|| JudgeUrl::parse(u).ok()).flatten();
        let observing = observing_connector(Arc::clone(tls.crypto_provider()));
        Checker {
            tls_judge: parse(&cfg.tls_judge_url).filter(|j| j.tls),
            integrity_url: parse(&cfg.integrity_url).filter(|j| !j.tls),
            observing,
            reference: RwLock::new(Reference::default()),
            calibration: RwLock::new(vec![
                Calibration {
                    up: true,
                    ..Calibration::default()
                };
                judges.len()
            ]),
            judges,
            connect,
            cfg,
            tls: tokio_rustls::TlsConnector::from(tls),
            ours: RwLock::new(Vec::new()),
            next_judge: AtomicUsize::new(0),
        }
    }

    pub fn config(&self) -> &CheckerConfig {
        &self.cfg
    }

    /// Asks every judge directly: our address, the judge's own revealing headers, whether it
    /// answers. Returns how many judges answered.
    pub async fn calibrate(&self) -> usize {
        let mut ours = Vec::new();
        let mut cal = Vec::new();
        for j in &self.judges {
            let direct = tokio::time::timeout(self.cfg.timeout * 2, self.direct(j)).await;
            match direct {
                Ok(Ok(echo)) => {
                    ours.extend(echo.origin.iter().copied());
                    cal.push(Calibration {
                        up: true,
                        baseline: echo.revealing(),
                    });
                }
                Ok(Err(e)) => {
                    tracing::warn!(judge = j.url, "judge does not answer directly: {e}");
                    cal.push(Calibration::default());
                }
                Err(_) => {
                    tracing::warn!(judge = j.url, "judge does not answer directly: timed out");
                    cal.push(Calibration::default());
                }
            }
        }
        ours.sort();
        ours.dedup();
        self.calibrate_integrity().await;
        let up = cal.iter().filter(|c| c.up).count();
        if let Ok(mut o) = self.ours.write() {
            *o = ours;
        }
        if let Ok(mut c) = self.calibration.write() {
            *c = cal;
        }
        up
    }

    /// Takes the integrity references directly: the TLS judge's certificate, and the
    /// integrity page's body when two fetches of it agree (a page that changes per fetch
    /// cannot show injection).
    async fn calibrate_integrity(&self) {
        let limit = self.cfg.timeout * 2;
        let mut leaf = None;
        if let Some(j) = &self.tls_judge {
            match tokio::time::timeout(limit, self.direct_leaf(j)).await {
                Ok(Ok(l)) => leaf = Some(l),
                Ok(Err(e)) => tracing::warn!(
                    judge = j.url,
                    "TLS judge does not answer directly ({e}): certificates are not compared"
                ),
                Err(_) => tracing::warn!(
                    judge = j.url,
                    "TLS judge does not answer directly (timed out): certificates are not \
                     compared"
                ),
            }
        }
        let mut body = None;
        if let Some(u) = &self.integrity_url {
            let fetch = || tokio::time::timeout(limit, self.direct_body(u));
            match (fetch().await, fetch().await) {
                (Ok(Ok(a)), Ok(Ok(b))) if a == b => body = Some(a),
                (Ok(Ok(_)), Ok(Ok(_))) => tracing::warn!(
                    url = u.url,
                    "checker.integrity_url changes from one fetch to the next: bodies are not \
                     compared (give a static page)"
                ),
                _ => tracing::warn!(
                    url = u.url,
                    "checker.integrity_url does not answer 200 directly: bodies are not compared"
                ),
            }
        }
        if let Ok(mut r) = self.reference.write() {
            if let Some(l) = leaf {
                r.add_leaf(l);
            }
            r.body = body;
        }
    }

    /// The TLS judge's leaf certificate as a direct, validated connection sees it.
    async fn direct_leaf(&self, j: &JudgeUrl) -> Result<[u8; 32], String> {
        let tcp = dial_direct(j).await?;
        let name = server_name(j).map_err(|f| f.detail)?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        leaf_of(tls.get_ref().1).ok_or_else(|| "no certificate".into())
    }

    /// The integrity page as a direct fetch gets it (200 only).
    async fn direct_body(&self, u: &JudgeUrl) -> Result<Bytes, String> {
        match request(Box::new(dial_direct(u).await?), u, false, None, false).await {
            Ok((200, body)) => Ok(body),
            Ok((status, _)) => Err(format!("answered {status}")),
            Err(f) => Err(f.detail),
        }
    }

    /// The integrity steps through `up`, each within `checker.timeout`.
    async fn integrity(&self, up: &Upstream) -> Integrity {
        let reference = self.reference.read().map(|r| r.clone()).unwrap_or_default();
        // A man in the middle needs no second look.
        let tls = self.tls_step(up, &reference).await;
        let steps = match tls {
            Step::Tampered(why) => [Step::Tampered(why), Step::Skipped],
            tls => [tls, self.body_step(up, &reference).await],
        };
        let tampered = steps.iter().find_map(|s| match s {
            Step::Tampered(why) => Some(why.clone()),
            _ => None,
        });
        let ran = steps.iter().filter(|s| **s != Step::Skipped).count();
        Integrity {
            ok: tampered.is_none() && ran > 0 && !steps.contains(&Step::Inconclusive),
            tampered,
        }
    }

    /// The TLS step: the certificate the TLS judge shows through `up` against the ones it
    /// showed directly (asked directly once more before a new one counts: sites rotate).
    async fn tls_step(&self, up: &Upstream, reference: &Reference) -> Step {
        let (Some(j), Some(obs)) = (&self.tls_judge, &self.observing) else {
            return Step::Skipped;
        };
        if reference.leaves.is_empty() {
            return Step::Skipped;
        }
        let limit = self.cfg.timeout;
        let Ok(Ok(leaf)) = tokio::time::timeout(limit, self.leaf_through(up, j, obs)).await else {
            return Step::Inconclusive;
        };
        if reference.knows_leaf(&leaf) {
            return Step::Passed;
        }
        if let Ok(Ok(direct)) = tokio::time::timeout(limit, self.direct_leaf(j)).await {
            if let Ok(mut r) = self.reference.write() {
                r.add_leaf(direct);
            }
            if direct == leaf {
                return Step::Passed;
            }
        }
        let seen = reference.leaves.last().map(integrity::short);
        Step::Tampered(format!(
            "TLS: {}'s certificate through it (sha256 {}) is not the one it serves directly \
             ({}): a man in the middle",
            j.host,
            integrity::short(&leaf),
            seen.unwrap_or_default()
        ))
    }

    /// The body step: the integrity page through `up` against a direct fetch, byte for byte.
    async fn body_step(&self, up: &Upstream, reference: &Reference) -> Step {
        let (Some(u), Some(direct)) = (&self.integrity_url, &reference.body) else {
            return Step::Skipped;
        };
        let fetch = async {
            let io = self.connect.open(up).await?;
            self.get_via(up, io, u, false, || {}).await
        };
        match tokio::time::timeout(self.cfg.timeout, fetch).await {
            Ok(Ok((200, body))) => match integrity::compare_body(direct, &body) {
                Some(why) => Step::Tampered(format!("HTTP: {} came back altered: {why}", u.url)),
                None => Step::Passed,
            },
            _ => Step::Inconclusive,
        }
    }

    /// The TLS judge's leaf certificate as seen through `up`'s tunnel.
    async fn leaf_through(
        &self,
        up: &Upstream,
        j: &JudgeUrl,
        obs: &tokio_rustls::TlsConnector,
    ) -> Result<[u8; 32], Failure> {
        let io = self.connect.open(up).await?;
        let io = self.connect.handshake(up, io, &j.target()).await?;
        let tls = obs
            .connect(server_name(j)?, io)
            .await
            .map_err(|e| Failure::new(ErrorKind::UpstreamTls, format!("TLS through it: {e}")))?;
        leaf_of(tls.get_ref().1)
            .ok_or_else(|| Failure::new(ErrorKind::UpstreamTls, "no certificate through it"))
    }

    /// A GET of `u` over `io`, a connection to `up`: in absolute form with its credentials
    /// through an HTTP upstream when `u` is plain HTTP (with `canary`, the hop-by-hop header
    /// it must strip, [`judge::CANARY`]); else through a tunnel (`tunneled` is called once it
    /// is up), TLS inside for `https://`.
    async fn get_via(
        &self,
        up: &Upstream,
        io: Stream,
        u: &JudgeUrl,
        canary: bool,
        tunneled: impl FnOnce(),
    ) -> Result<(u16, Bytes), Failure> {
        if up.scheme.is_http() && !u.tls {
            let auth = up
                .credentials
                .as_ref()
                .map(|c| basic(c.username.expose(), c.password.expose()));
            return request(io, u, true, auth.as_deref(), canary).await;
        }
        let io = self.connect.handshake(up, io, &u.target()).await?;
        tunneled();
        let io = if u.tls { self.tls(u, io).await? } else { io };
        request(io, u, false, None, false).await
    }

    /// Our own addresses as the judges saw them.
    pub fn our_addresses(&self) -> Vec<IpAddr> {
        self.ours.read().map(|o| o.clone()).unwrap_or_default()
    }

    /// The next judge that answered calibration, round robin.
    fn judge(&self) -> Option<(usize, &JudgeUrl)> {
        let cal = self.calibration.read().ok()?;
        let n = self.judges.len();
        let start = self.next_judge.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|i| cal.get(*i).is_some_and(|c| c.up))
            .map(|i| (i, &self.judges[i]))
    }

    /// A judge, asked directly.
    async fn direct(&self, j: &JudgeUrl) -> Result<Echo, String> {
        let io: Stream = Box::new(dial_direct(j).await?);
        let io = if j.tls {
            self.tls(j, io).await.map_err(|f| f.detail)?
        } else {
            io
        };
        let (status, body) = request(io, j, false, None, false)
            .await
            .map_err(|f| f.detail)?;
        if status != 200 {
            return Err(format!("answered {status}"));
        }
        judge::read(&String::from_utf8_lossy(&body))
            .ok_or_else(|| "not a judge answer (httpbin JSON or azenv)".into())
    }

    async fn tls(&self, j: &JudgeUrl, io: Stream) -> Result<Stream, Failure> {
        let name = server_name(j)?;
        let tls =
            self.tls.connect(name, io).await.map_err(|e| {
                Failure::new(ErrorKind::UpstreamTls, format!("TLS to the judge: {e}"))
            })?;
        Ok(Box::new(tls))
    }

    /// Checks one upstream, within `checker.timeout`.
    pub async fn check(&self, up: &Upstream) -> CheckResult {
        let id = up.id();
        let Some((i, judge)) = self.judge() else {
            return CheckResult {
                inconclusive: true,
                ..CheckResult::failed(
                    id,
                    Outcome::failed(ErrorKind::Internal),
                    None,
                    "no judge answers: nothing can be checked".into(),
                )
            };
        };
        let t0 = Instant::now();
        let mut outcome = Outcome::default();
        let run = self.through(up, judge, &mut outcome);
        let result = match tokio::time::timeout(self.cfg.timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(Failure::new(
                if outcome.connect.is_some() {
                    ErrorKind::UpstreamHandshakeTimeout
                } else {
                    ErrorKind::UpstreamConnectTimeout
                },
                format!("no judge answer within {:?}", self.cfg.timeout),
            )),
        };
        let latency = crate::millis(t0.elapsed());
        match result {
            Ok(echo) => {
                let baseline = self
                    .calibration
                    .read()
                    .ok()
                    .and_then(|c| c.get(i).map(|c| c.baseline.clone()))
                    .unwrap_or_default();
                let ours = self.our_addresses();
                let anonymity = judge::classify(&echo, &ours, &baseline);
                let forwarded = up.scheme.is_http() && !judge.tls;
                let leak = judge::leak(&echo, &ours, forwarded);
                let anonymous_enough = anonymity >= self.cfg.min_anonymity;
                let integrity = if anonymous_enough {
                    self.integrity(up).await
                } else {
                    Integrity::default()
                };
                let passed = anonymous_enough && integrity.tampered.is_none();
                let detail = match (&integrity.tampered, anonymous_enough) {
                    (Some(t), _) => Some(format!("tampering: {t}")),
                    (None, false) => Some(format!(
                        "{anonymity}, below checker.min_anonymity ({})",
                        self.cfg.min_anonymity
                    )),
                    (None, true) => None,
                };
                CheckResult {
                    id,
                    outcome,
                    passed,
                    exit_ip: echo.exit_ip,
                    anonymity: Some(anonymity),
                    judge: Some(judge.url.clone()),
                    detail,
                    latency_ms: Some(latency),
                    inconclusive: false,
                    leak,
                    tampered: integrity.tampered,
                    integrity_ok: integrity.ok,
                }
            }
            Err(f) => {
                outcome.error = Some(f.kind);
                CheckResult::failed(id, outcome, Some(judge.url.clone()), f.detail)
            }
        }
    }

    /// Connect, handshake, ask the judge; fills `outcome`'s times as it goes.
    async fn through(
        &self,
        up: &Upstream,
        judge: &JudgeUrl,
        outcome: &mut Outcome,
    ) -> Result<Echo, Failure> {
        let t0 = Instant::now();
        let io = self.connect.open(up).await?;
        let connect = t0.elapsed();
        outcome.connect = Some(connect);
        let mut tunnel = None;
        let (status, body) = self
            .get_via(up, io, judge, true, || {
                tunnel = Some(t0.elapsed().saturating_sub(connect));
            })
            .await?;
        // Through a tunnel the handshake is what an attempt measures; forwarded, the answer.
        match tunnel {
            Some(handshake) => outcome.handshake = Some(handshake),
            None => outcome.first_byte = Some(t0.elapsed().saturating_sub(connect)),
        }
        match status {
            200 => {}
            407 => {
                return Err(Failure::new(
                    ErrorKind::UpstreamAuth,
                    format!("{up}: asked for credentials (407)"),
                ));
            }
            other => {
                return Err(Failure::new(
                    ErrorKind::UpstreamRefused,
                    format!("{up}: the judge request answered {other}"),
                ));
            }
        }
        judge::read(&String::from_utf8_lossy(&body)).ok_or_else(|| {
            Failure::new(
                ErrorKind::UpstreamProtocol,
                format!("{up}: the answer is not the judge's (a block or error page)"),
            )
        })
    }

    /// Checks every upstream of `ups`, `checker.concurrency` at a time, in the given order.
    pub async fn check_all(
        self: &Arc<Self>,
        ups: Vec<Upstream>,
        progress: &dyn Progress,
    ) -> Vec<CheckResult> {
        let total = ups.len();
        let permits = Arc::new(tokio::sync::Semaphore::new(self.cfg.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        let mut results = Vec::with_capacity(total);
        let (mut done, mut passed) = (0, 0);
        let mut collect = |r: CheckResult, done: &mut usize| {
            *done += 1;
            if r.passed {
                passed += 1;
            }
            progress.checked(*done, total, passed);
            results.push(r);
        };
        for up in ups {
            // Hold a permit before spawning: memory stays bounded by the concurrency.
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                break;
            };
            let me = Arc::clone(self);
            tasks.spawn(async move {
                let _permit = permit;
                me.check(&up).await
            });
            while let Some(Ok(r)) = tasks.try_join_next() {
                collect(r, &mut done);
            }
        }
        while let Some(joined) = tasks.join_next().await {
            if let Ok(r) = joined {
                collect(r, &mut done);
            }
        }
        results
    }
}

/// `Basic base64(user:pass)`.
fn basic(user: &str, pass: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// A direct TCP connection to `j` (calibration: what the checker sees without a proxy).
async fn dial_direct(j: &JudgeUrl) -> Result<tokio::net::TcpStream, String> {
    tokio::net::TcpStream::connect((j.host.to_string(), j.port))
        .await
        .map_err(|e| format!("connect: {e}"))
}

/// The name a TLS connection to `j` presents.
fn server_name(j: &JudgeUrl) -> Result<rustls::pki_types::ServerName<'static>, Failure> {
    use rustls::pki_types::ServerName;
    Ok(match &j.host {
        proxygate_core::Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
        proxygate_core::Host::Domain(d) => ServerName::try_from(d.clone())
            .map_err(|_| Failure::new(ErrorKind::Internal, "invalid judge name"))?,
    })
}

/// The SHA-256 of a TLS connection's leaf certificate.
fn leaf_of(conn: &rustls::ClientConnection) -> Option<[u8; 32]> {
    conn.peer_certificates()?
        .first()
        .map(|c| integrity::fingerprint(c.as_ref()))
}

/// The observing TLS connector ([`integrity::observing_tls`]) over a provider.
fn observing_connector(
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Option<tokio_rustls::TlsConnector> {
    match integrity::observing_tls(provider) {
        Ok(c) => Some(tokio_rustls::TlsConnector::from(Arc::new(c))),
        Err(e) => {
            tracing::error!("TLS for the integrity check: {e}; certificates not compared");
            None
        }
    }
}

/// Sends one GET for `judge` over `io` (absolute form through an HTTP proxy, with its
/// credentials; with `canary`, a hop-by-hop header the proxy must remove, see
/// [`judge::CANARY`]), and reads the answer: status and body (capped).
async fn request(
    io: Stream,
    judge: &JudgeUrl,
    absolute: bool,
    proxy_auth: Option<&str>,
    canary: bool,
) -> Result<(u16, Bytes), Failure> {
    let io_err = |what: &str, e: &dyn std::fmt::Display| {
        Failure::new(ErrorKind::UpstreamIo, format!("judge request: {what}: {e}"))
    };
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Empty<Bytes>>(TokioIo::new(io))
        .await
        .map_err(|e| io_err("handshake", &e))?;
    let conn = tokio::spawn(conn);
    let uri = if absolute {
        judge.absolute()
    } else {
        judge.path.clone()
    };
    let mut req = http::Request::get(uri)
        .header(http::header::HOST, judge.host_header())
        .header(http::header::USER_AGENT, crate::config::DEFAULT_USER_AGENT)
        .header(http::header::ACCEPT, "*/*");
    req = if canary {
        req.header(
            http::header::CONNECTION,
            format!("close, {}", judge::CANARY),
        )
        .header(judge::CANARY, "1")
    } else {
        req.header(http::header::CONNECTION, "close")
    };
    if let Some(auth) = proxy_auth {
        req = req.header(http::header::PROXY_AUTHORIZATION, auth);
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| Failure::new(ErrorKind::Internal, format!("judge request: {e}")))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| io_err("send", &e))?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_JUDGE_BODY)
        .collect()
        .await
        .map_err(|e| io_err("body", &e))?
        .to_bytes();
    conn.abort();
    Ok((status, body))
}

/// How long a batch of checks takes at most (a bound for progress displays): the judge step
/// and each configured integrity step have `checker.timeout` each.
pub fn worst_case(n: usize, cfg: &CheckerConfig) -> Duration {
    let rounds = n.div_ceil(cfg.concurrency.max(1)) as u32;
    let steps =
        1 + u32::from(!cfg.tls_judge_url.is_empty()) + u32::from(!cfg.integrity_url.is_empty());
    cfg.timeout * steps * rounds
}
