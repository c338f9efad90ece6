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
use crate::judge::{self, JudgeUrl, View};

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
        Checker {
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
                Ok(Ok(view)) => {
                    ours.extend(view.origin.iter().copied());
                    cal.push(Calibration {
                        up: true,
                        baseline: view.revealing(),
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
        let up = cal.iter().filter(|c| c.up).count();
        if let Ok(mut o) = self.ours.write() {
            *o = ours;
        }
        if let Ok(mut c) = self.calibration.write() {
            *c = cal;
        }
        up
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
    async fn direct(&self, j: &JudgeUrl) -> Result<View, String> {
        let addr = (j.host.to_string(), j.port);
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let io: Stream = Box::new(tcp);
        let io = if j.tls {
            self.tls(j, io).await.map_err(|f| f.detail)?
        } else {
            io
        };
        let (status, body) = request(io, j, false, None).await.map_err(|f| f.detail)?;
        if status != 200 {
            return Err(format!("answered {status}"));
        }
        judge::read(&body).ok_or_else(|| "not a judge answer (httpbin JSON or azenv)".into())
    }

    async fn tls(&self, j: &JudgeUrl, io: Stream) -> Result<Stream, Failure> {
        use rustls::pki_types::ServerName;
        let name = match &j.host {
            proxygate_core::Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
            proxygate_core::Host::Domain(d) => ServerName::try_from(d.clone())
                .map_err(|_| Failure::new(ErrorKind::Internal, "invalid judge name"))?,
        };
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
                id,
                outcome: Outcome::failed(ErrorKind::Internal),
                passed: false,
                exit_ip: None,
                anonymity: None,
                judge: None,
                detail: Some("no judge answers: nothing can be checked".into()),
                latency_ms: None,
                inconclusive: true,
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
            Ok(view) => {
                let baseline = self
                    .calibration
                    .read()
                    .ok()
                    .and_then(|c| c.get(i).map(|c| c.baseline.clone()))
                    .unwrap_or_default();
                let anonymity = judge::classify(&view, &self.our_addresses(), &baseline);
                let passed = anonymity >= self.cfg.min_anonymity;
                CheckResult {
                    id,
                    outcome,
                    passed,
                    exit_ip: view.exit_ip,
                    anonymity: Some(anonymity),
                    judge: Some(judge.url.clone()),
                    detail: (!passed).then(|| {
                        format!(
                            "{anonymity}, below checker.min_anonymity ({})",
                            self.cfg.min_anonymity
                        )
                    }),
                    latency_ms: Some(latency),
                    inconclusive: false,
                }
            }
            Err(f) => {
                outcome.error = Some(f.kind);
                CheckResult {
                    id,
                    outcome,
                    passed: false,
                    exit_ip: None,
                    anonymity: None,
                    judge: Some(judge.url.clone()),
                    detail: Some(f.detail),
                    latency_ms: None,
                    inconclusive: false,
                }
            }
        }
    }

    /// Connect, handshake, ask the judge; fills `outcome`'s times as it goes.
    async fn through(
        &self,
        up: &Upstream,
        judge: &JudgeUrl,
        outcome: &mut Outcome,
    ) -> Result<View, Failure> {
        let t0 = Instant::now();
        let io = self.connect.open(up).await?;
        let connect = t0.elapsed();
        outcome.connect = Some(connect);
        let forward = up.scheme.is_http() && !judge.tls;
        let (status, body) = if forward {
            let auth = up
                .credentials
                .as_ref()
                .map(|c| basic(c.username.expose(), c.password.expose()));
            let answer = request(io, judge, true, auth.as_deref()).await?;
            outcome.first_byte = Some(t0.elapsed().saturating_sub(connect));
            answer
        } else {
            let target = judge.target();
            let io = self.connect.handshake(up, io, &target).await?;
            outcome.handshake = Some(t0.elapsed().saturating_sub(connect));
            let io = if judge.tls {
                self.tls(judge, io).await?
            } else {
                io
            };
            request(io, judge, false, None).await?
        };
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
        judge::read(&body).ok_or_else(|| {
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

/// Sends one GET for `judge` over `io` (absolute form through an HTTP proxy, with its
/// credentials), and reads the answer: status and body (capped).
async fn request(
    io: Stream,
    judge: &JudgeUrl,
    absolute: bool,
    proxy_auth: Option<&str>,
) -> Result<(u16, String), Failure> {
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
        .header(http::header::ACCEPT, "*/*")
        .header(http::header::CONNECTION, "close");
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
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// How long a batch of checks takes at most (a bound for progress displays).
pub fn worst_case(n: usize, cfg: &CheckerConfig) -> Duration {
    let rounds = n.div_ceil(cfg.concurrency.max(1)) as u32;
    cfg.timeout * rounds
}
