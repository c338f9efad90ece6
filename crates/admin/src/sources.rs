//! [`SourcesRuntime`]: the pool filling itself. It takes what the refresher fetched (or a
//! fetch an operator asked for), checks the new candidates through themselves, merges the
//! ones that passed durably into the store and then into the live pool, and keeps each
//! source's quality: fetches ok and failed, candidates, unique, new, passed, still alive after
//! 24 h, and the share of served traffic that succeeded. It also re-checks pool members on a
//! schedule: unhealthy ones when their backoff ends, idle ones every `checker.recheck_idle`,
//! busy ones never (their traffic is the check).
//!
//! The same runtime serves `proxygate sources fetch` and `proxygate check` on a stopped data
//! dir (no pool), and the running gateway (through the admin API and the control socket).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use proxygate_core::{Shutdown, Upstream, UpstreamId};
use proxygate_pool::{PoolReader, State};
use proxygate_sources::checker::{CheckResult, Checker, Progress};
use proxygate_sources::fetch::{FetchReport, Fetcher};
use proxygate_sources::metrics::{POOL, SourceMetrics};
use proxygate_sources::quality::{self, Quality, Yield};
use proxygate_sources::refresher::{Batch, Refresher};
use proxygate_sources::{Candidate, SourceConfig};
use proxygate_store::{CheckRecord, FetchSummary, Origin, SourceStats};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::api::{Actions, BoxFuture};
use crate::catalog::{Catalog, Checked, OpError, unix_ms};

/// Yields kept per source.
const RECENT_YIELDS: usize = 10;
/// Judges are asked directly again (our address, their own headers) this often.
const RECALIBRATE_EVERY: Duration = Duration::from_secs(1800);
/// Members re-checked per scheduler round at most (the rest wait for the next round).
const RECHECK_BATCH: usize = 4096;

/// What one source's fetch (and the checks after it) gave.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceSummary {
    pub name: String,
    /// Entries listed.
    pub fetched: usize,
    /// Distinct candidates after filtering.
    pub unique: usize,
    /// Not in the pool before (nor listed by an earlier source of this fetch).
    pub new: usize,
    pub checked: usize,
    pub checked_ok: usize,
    pub imported: usize,
    pub dropped_private: usize,
    pub invalid: usize,
    pub error: Option<String>,
    pub elapsed_ms: u64,
}

/// What a re-check gave.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckSummary {
    pub checked: usize,
    pub passed: usize,
    pub failed: usize,
    /// Checks that could not judge (no judge answering): nobody was blamed.
    pub inconclusive: usize,
    pub elapsed_ms: u64,
    pub results: Vec<CheckLine>,
}

/// One re-checked upstream, for the CLI's table.
#[derive(Debug, Clone, Serialize)]
pub struct CheckLine {
    pub id: String,
    pub address: String,
    pub passed: bool,
    pub latency_ms: Option<u64>,
    pub anonymity: Option<String>,
    pub exit_ip: Option<String>,
    pub error: Option<String>,
    /// What the exit leaked (it is demoted to untrusted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leak: Option<String>,
    /// How it tampered (it is quarantined).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tampered: Option<String>,
}

/// Where the pool's upstreams come from, and how it checks them.
#[derive(Debug)]
pub struct SourcesRuntime {
    sources: Vec<SourceConfig>,
    fetcher: Fetcher,
    checker: Arc<Checker>,
    catalog: Arc<Mutex<Catalog>>,
    pool: Option<PoolReader>,
    quality: Arc<Quality>,
    metrics: SourceMetrics,
    /// One batch of checks at a time: memory stays bounded, sources take turns.
    checking: tokio::sync::Mutex<()>,
    calibrated: Mutex<Option<Instant>>,
}

fn catalog_op<T>(
    catalog: &Arc<Mutex<Catalog>>,
    f: impl FnOnce(&mut Catalog) -> Result<T, OpError>,
) -> Result<T, OpError> {
    let mut c = catalog.lock().unwrap_or_else(PoisonError::into_inner);
    f(&mut c)
}

impl SourcesRuntime {
    pub fn new(
        sources: Vec<SourceConfig>,
        fetcher: Fetcher,
        checker: Arc<Checker>,
        catalog: Arc<Mutex<Catalog>>,
        pool: Option<PoolReader>,
        quality: Arc<Quality>,
        metrics: SourceMetrics,
    ) -> SourcesRuntime {
        let rt = SourcesRuntime {
            sources,
            fetcher,
            checker,
            catalog,
            pool,
            quality,
            metrics,
            checking: tokio::sync::Mutex::new(()),
            calibrated: Mutex::new(None),
        };
        rt.load_quality();
        rt
    }

    pub fn sources(&self) -> &[SourceConfig] {
        &self.sources
    }

    /// The background fetcher of this runtime's sources (sharing its quality table).
    pub fn refresher(&self, full_every: Duration) -> Refresher {
        Refresher::new(
            self.sources.clone(),
            self.fetcher.clone(),
            Arc::clone(&self.quality),
            full_every,
        )
    }

    /// The yield policy of every source, from the stats the store kept.
    fn load_quality(&self) {
        for s in &self.sources {
            let stats = catalog_op(&self.catalog, |c| Ok(c.store().source_stats(&s.name)?))
                .unwrap_or_default();
            self.quality.set(&s.name, quality::policy(&yields(&stats)));
        }
    }

    /// Asks the judges directly when that is older than [`RECALIBRATE_EVERY`].
    async fn calibrate_if_stale(&self) {
        let stale = self
            .calibrated
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none_or(|t| t.elapsed() >= RECALIBRATE_EVERY);
        if stale {
            let up = self.checker.calibrate().await;
            if up == 0 {
                tracing::error!(
                    "no judge answers (checker.judge_urls): candidates cannot be checked, and \
                     none will be imported until one does"
                );
            }
            *self
                .calibrated
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        }
    }

    /// Fetches the named sources (all when `names` is empty) now, concurrently; with
    /// `check`, checks their new candidates; with `import`, brings those that pass into the
    /// pool (an import always checks first).
    pub async fn fetch_now(
        &self,
        names: &[String],
        check: bool,
        import: bool,
        progress: &dyn Progress,
    ) -> Result<Vec<SourceSummary>, OpError> {
        let unknown: Vec<&String> = names
            .iter()
            .filter(|n| !self.sources.iter().any(|s| &s.name == *n))
            .collect();
        if !unknown.is_empty() {
            return Err(OpError::Usage(format!(
                "no source named {} (configured: {})",
                unknown
                    .iter()
                    .map(|n| format!("{n:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.sources
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (i, src) in self.sources.iter().enumerate() {
            if names.is_empty() || names.contains(&src.name) {
                let (fetcher, src) = (self.fetcher.clone(), src.clone());
                tasks.spawn(async move { (i, fetcher.fetch(&src).await) });
            }
        }
        let mut reports = Vec::new();
        while let Some(Ok(r)) = tasks.join_next().await {
            reports.push(r);
        }
        // In config order: dedupe across sources keeps the first source's claim.
        reports.sort_by_key(|(i, _)| *i);
        let reports = reports.into_iter().map(|(_, r)| r).collect();
        Ok(self
            .process(reports, false, check || import, import, progress)
            .await)
    }

    /// Checks and merges fetched reports; records each source's quality.
    pub async fn process(
        &self,
        reports: Vec<FetchReport>,
        full: bool,
        check: bool,
        import: bool,
        progress: &dyn Progress,
    ) -> Vec<SourceSummary> {
        let now = unix_ms();
        let mut summaries = self.fetched(&reports, now);
        let mut to_check = self.claim(&reports, &mut summaries, check, full);
        // Low-yield sources' candidates go last.
        to_check.sort_by_key(|(i, _)| self.quality.get(&summaries[*i].name).check_last);
        if !to_check.is_empty() {
            let _turn = self.checking.lock().await;
            self.calibrate_if_stale().await;
            let merged = self
                .check_candidates(&to_check, &mut summaries, progress)
                .await;
            self.merge_checked(merged, &mut summaries, import).await;
        }
        for s in &summaries {
            self.metrics.imported(&s.name, s.imported);
        }
        self.record_quality(&summaries, now);
        summaries
    }

    /// Each source's summary of its fetch so far, counted and logged.
    fn fetched(&self, reports: &[FetchReport], now: u64) -> Vec<SourceSummary> {
        for r in reports {
            self.metrics
                .fetched(&r.source, r.ok(), r.candidates.len(), now / 1000);
            match &r.error {
                Some(e) if r.candidates.is_empty() => {
                    tracing::warn!(source = r.source, "source fetch failed: {e}");
                }
                Some(e) => tracing::warn!(
                    source = r.source,
                    candidates = r.candidates.len(),
                    "source fetch partly failed: {e}"
                ),
                None => tracing::info!(
                    source = r.source,
                    listed = r.fetched,
                    unique = r.candidates.len(),
                    dropped_private = r.dropped_private,
                    "source fetched"
                ),
            }
        }
        reports
            .iter()
            .map(|r| SourceSummary {
                name: r.source.clone(),
                fetched: r.fetched,
                unique: r.candidates.len(),
                dropped_private: r.dropped_private,
                invalid: r.invalid,
                error: r.error.clone(),
                elapsed_ms: crate::millis(r.elapsed),
                ..SourceSummary::default()
            })
            .collect()
    }

    /// What to check, each with the index of its report: across sources each proxy once (the
    /// first source's claim), new ones only unless this is a `full` re-import, none unless
    /// `check`. Counts each source's new proxies on the way.
    fn claim(
        &self,
        reports: &[FetchReport],
        summaries: &mut [SourceSummary],
        check: bool,
        full: bool,
    ) -> Vec<(usize, Candidate)> {
        let mut claimed = HashSet::new();
        let mut to_check = Vec::new();
        let catalog = self.catalog.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, r) in reports.iter().enumerate() {
            for c in &r.candidates {
                if !claimed.insert(c.id()) {
                    continue;
                }
                let known = catalog.contains(c.id());
                if !known {
                    summaries[i].new += 1;
                }
                if check && (full || !known) {
                    to_check.push((i, c.clone()));
                }
            }
        }
        to_check
    }

    /// Checks the candidates, each result counted for its source and told to the pool; returns
    /// the conclusive ones, ready to merge.
    async fn check_candidates(
        &self,
        to_check: &[(usize, Candidate)],
        summaries: &mut [SourceSummary],
        progress: &dyn Progress,
    ) -> Vec<(usize, Checked)> {
        let results = self
            .checker
            .check_all(
                to_check.iter().map(|(_, c)| c.upstream.clone()).collect(),
                progress,
            )
            .await;
        let by_id: HashMap<UpstreamId, &(usize, Candidate)> =
            to_check.iter().map(|t| (t.1.id(), t)).collect();
        let mut merged = Vec::with_capacity(results.len());
        for r in &results {
            let Some((i, cand)) = by_id.get(&r.id) else {
                continue;
            };
            summaries[*i].checked += 1;
            if r.passed {
                summaries[*i].checked_ok += 1;
            }
            self.record_check(&summaries[*i].name, r);
            if !r.passed {
                tracing::debug!(
                    candidate = %cand.upstream,
                    source = cand.source,
                    "check failed: {}",
                    r.detail.as_deref().unwrap_or("-")
                );
            }
            if !r.inconclusive {
                merged.push((
                    *i,
                    checked(cand.upstream.clone(), Some(cand.source.clone()), r),
                ));
            }
        }
        merged
    }

    /// Merges checked candidates into the catalog (importing those that passed when
    /// `import`), and counts each source's imports: those that passed and were not in the
    /// catalog before.
    async fn merge_checked(
        &self,
        merged: Vec<(usize, Checked)>,
        summaries: &mut [SourceSummary],
        import: bool,
    ) {
        let known: HashSet<UpstreamId> = {
            let c = self.catalog.lock().unwrap_or_else(PoisonError::into_inner);
            merged
                .iter()
                .map(|(_, m)| m.upstream.id())
                .filter(|id| c.contains(*id))
                .collect()
        };
        let joining: Vec<usize> = merged
            .iter()
            .filter(|(_, m)| import && m.passed && !known.contains(&m.upstream.id()))
            .map(|(i, _)| *i)
            .collect();
        let checked: Vec<Checked> = merged.into_iter().map(|(_, c)| c).collect();
        let catalog = Arc::clone(&self.catalog);
        let merge = tokio::task::spawn_blocking(move || {
            catalog_op(&catalog, |c| c.merge_checked(checked, import))
        })
        .await;
        match merge {
            Ok(Ok(m)) => {
                for i in joining {
                    summaries[i].imported += 1;
                }
                if m.imported > 0 || m.reenabled > 0 {
                    tracing::info!(
                        imported = m.imported,
                        reenabled = m.reenabled,
                        "checked candidates joined the pool"
                    );
                }
            }
            Ok(Err(e)) => tracing::error!("merging checked candidates: {e}"),
            Err(e) => tracing::error!("merging checked candidates: {e}"),
        }
    }

    /// Stores each source's figures of this fetch, and its yield policy.
    fn record_quality(&self, summaries: &[SourceSummary], now: u64) {
        let result = catalog_op(&self.catalog, |c| {
            for s in summaries {
                let mut st = c.store().source_stats(&s.name)?;
                let ok = s.error.is_none() || s.unique > 0;
                if ok {
                    st.fetches_ok += 1;
                    st.last_ok_unix_ms = Some(now);
                } else {
                    st.fetches_failed += 1;
                }
                st.last_fetch_unix_ms = Some(now);
                st.last_error = s.error.clone();
                st.last = FetchSummary {
                    fetched: s.fetched as u64,
                    unique: s.unique as u64,
                    new: s.new as u64,
                    passed: s.checked_ok as u64,
                    imported: s.imported as u64,
                };
                st.total.fetched += st.last.fetched;
                st.total.unique += st.last.unique;
                st.total.new += st.last.new;
                st.total.passed += st.last.passed;
                st.total.imported += st.last.imported;
                // A yield counts only when candidates were checked.
                if s.checked > 0 {
                    st.recent.push((s.checked as u64, s.checked_ok as u64));
                    let excess = st.recent.len().saturating_sub(RECENT_YIELDS);
                    st.recent.drain(..excess);
                }
                c.store().put_source_stats(&s.name, &st)?;
                self.quality.set(&s.name, quality::policy(&yields(&st)));
            }
            c.store().flush()?;
            Ok(())
        });
        if let Err(e) = result {
            tracing::error!("recording source quality: {e}");
        }
    }

    /// One check's result, counted for `source` (a list source, or [`POOL`] for a recheck)
    /// and told to the pool.
    fn record_check(&self, source: &str, r: &CheckResult) {
        self.metrics.checked(
            source,
            r.passed,
            r.inconclusive,
            r.latency_ms.unwrap_or(0) as f64 / 1000.0,
        );
        self.report_to_pool(r);
        self.metrics
            .findings(r.tampered.is_some(), r.leak.is_some());
    }

    /// A check of a pool member moves its reputation like any attempt.
    fn report_to_pool(&self, r: &CheckResult) {
        if let (Some(pool), false) = (&self.pool, r.inconclusive) {
            pool.report_check(r.id, &r.outcome);
        }
    }

    /// Re-checks the upstreams named by ids or unique prefixes (all enabled ones when `names`
    /// is empty) now.
    pub async fn recheck_named(
        &self,
        names: &[String],
        progress: &dyn Progress,
    ) -> Result<CheckSummary, OpError> {
        let ids = catalog_op(&self.catalog, |c| {
            names
                .iter()
                .map(|t| c.resolve(t))
                .collect::<Result<Vec<_>, _>>()
        })?;
        self.recheck(&ids, progress).await
    }

    /// Re-checks the given upstreams (all enabled ones when `ids` is empty) now.
    pub async fn recheck(
        &self,
        ids: &[UpstreamId],
        progress: &dyn Progress,
    ) -> Result<CheckSummary, OpError> {
        let ups: Vec<Upstream> = catalog_op(&self.catalog, |c| {
            if ids.is_empty() {
                return Ok(c
                    .records()
                    .filter(|r| !r.disabled)
                    .map(|r| Upstream::clone(&r.upstream))
                    .collect());
            }
            ids.iter()
                .map(|id| Ok(Upstream::clone(&c.record(*id)?.upstream)))
                .collect()
        })?;
        Ok(self.check_members(ups, progress).await)
    }

    async fn check_members(&self, ups: Vec<Upstream>, progress: &dyn Progress) -> CheckSummary {
        let t0 = Instant::now();
        let _turn = self.checking.lock().await;
        self.calibrate_if_stale().await;
        let by_id: HashMap<UpstreamId, Upstream> =
            ups.iter().map(|u| (u.id(), u.clone())).collect();
        let results = self.checker.check_all(ups, progress).await;
        let mut summary = CheckSummary::default();
        let mut merged = Vec::new();
        for r in &results {
            summary.checked += 1;
            match (r.passed, r.inconclusive) {
                (true, _) => summary.passed += 1,
                (false, true) => summary.inconclusive += 1,
                (false, false) => summary.failed += 1,
            }
            self.record_check(POOL, r);
            if let Some(up) = by_id.get(&r.id) {
                summary.results.push(CheckLine {
                    id: r.id.to_string(),
                    address: format!("{}://{}", up.scheme, up.authority()),
                    passed: r.passed,
                    latency_ms: r.latency_ms,
                    anonymity: r.anonymity.map(|a| a.to_string()),
                    exit_ip: r.exit_ip.map(|ip| ip.to_string()),
                    error: r.detail.clone(),
                    leak: r.leak.clone(),
                    tampered: r.tampered.clone(),
                });
                if !r.inconclusive {
                    merged.push(checked(up.clone(), None, r));
                }
            }
        }
        let catalog = Arc::clone(&self.catalog);
        let merge = tokio::task::spawn_blocking(move || {
            catalog_op(&catalog, |c| c.merge_checked(merged, false))
        })
        .await;
        if let Ok(Err(e)) = merge {
            tracing::error!("recording checks: {e}");
        }
        summary.elapsed_ms = crate::millis(t0.elapsed());
        summary
    }

    /// Pool members due for a re-check at `now`: unhealthy ones whose backoff ended (on
    /// probation again), and idle ones neither used nor checked for `checker.recheck_idle`.
    /// Busy ones are not: their traffic is their check.
    fn due(&self) -> Vec<Upstream> {
        let Some(pool) = &self.pool else {
            return Vec::new();
        };
        let idle_after = self.checker.config().recheck_idle;
        let now = Instant::now();
        let now_unix = unix_ms();
        let checks: HashMap<UpstreamId, u64> = catalog_op(&self.catalog, |c| {
            Ok(c.records()
                .filter_map(|r| {
                    let id = r.upstream.id();
                    c.check(id).map(|k| (id, k.checked_unix_ms))
                })
                .collect())
        })
        .unwrap_or_default();
        pool.snapshot()
            .entries()
            .iter()
            .filter(|e| {
                let backoff_ended = e.state(now) == State::Probation
                    && e.health.consecutive_failures() > 0
                    && e.health.in_flight() == 0;
                let unused = e.since_last_use(now).is_none_or(|d| d >= idle_after);
                let unchecked = checks
                    .get(&e.id)
                    .is_none_or(|t| now_unix.saturating_sub(*t) >= crate::millis(idle_after));
                backoff_ended || (unused && unchecked)
            })
            .take(RECHECK_BATCH)
            .map(|e| Upstream::clone(&e.upstream))
            .collect()
    }

    /// Consumes the refresher's batches until shutdown, checking and merging each; batches of
    /// low-yield sources wait behind the others.
    pub async fn run_batches(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Batch>,
        mut shutdown: Shutdown,
    ) {
        let mut queue: Vec<Batch> = Vec::new();
        loop {
            if queue.is_empty() {
                tokio::select! {
                    b = rx.recv() => match b {
                        Some(b) => queue.push(b),
                        None => return,
                    },
                    () = shutdown.wait() => return,
                }
            }
            while let Ok(b) = rx.try_recv() {
                queue.push(b);
            }
            queue.sort_by_key(|b| self.quality.get(&b.report.source).check_last);
            let batch = queue.remove(0);
            let full = batch.full;
            let work = self.process(vec![batch.report], full, true, true, &|_, _, _| {});
            tokio::select! {
                _ = work => {}
                () = shutdown.wait() => return,
            }
        }
    }

    /// Re-checks due members every `checker.recheck_every` until shutdown.
    pub async fn run_rechecks(self: Arc<Self>, shutdown: Shutdown) {
        let period = self.checker.config().recheck_every;
        let me = Arc::clone(&self);
        crate::every(period, shutdown, move || {
            let me = Arc::clone(&me);
            async move {
                let due = me.due();
                if !due.is_empty() {
                    let s = me.check_members(due, &|_, _, _| {}).await;
                    tracing::debug!(
                        checked = s.checked,
                        passed = s.passed,
                        failed = s.failed,
                        "pool members re-checked"
                    );
                }
            }
        })
        .await;
    }

    /// The leak audit: every `checker.audit_every`, every enabled member is checked again,
    /// busy or idle (judge, leaks, integrity), until shutdown. Off when `audit_every` is 0.
    pub async fn run_audits(self: Arc<Self>, shutdown: Shutdown) {
        let period = self.checker.config().audit_every;
        if period.is_zero() {
            return;
        }
        let me = Arc::clone(&self);
        crate::every(period, shutdown, move || {
            let me = Arc::clone(&me);
            async move {
                match me.recheck(&[], &|_, _, _| {}).await {
                    Ok(s) => {
                        let leaking = s.results.iter().filter(|l| l.leak.is_some()).count();
                        let tampering = s.results.iter().filter(|l| l.tampered.is_some()).count();
                        tracing::info!(
                            checked = s.checked,
                            passed = s.passed,
                            leaking,
                            tampering,
                            "leak audit done"
                        );
                    }
                    Err(e) => tracing::error!("leak audit: {e}"),
                }
            }
        })
        .await;
    }

    /// Every source: its config, its stored quality and what that earns it, how many of its
    /// upstreams are still alive 24 h after they came, and the share of served traffic
    /// through its upstreams that succeeded.
    pub fn view(&self) -> Result<Value, OpError> {
        let now = unix_ms();
        let live = Instant::now();
        catalog_op(&self.catalog, |c| {
            let mut alive: HashMap<&str, (u64, u64)> = HashMap::new();
            let mut served: HashMap<&str, (u64, u64)> = HashMap::new();
            for r in c.records() {
                let (Origin::Source, Some(src)) = (r.origin, r.source.as_deref()) else {
                    continue;
                };
                let entry = c.entry(r.upstream.id());
                if now.saturating_sub(r.added_unix_ms) >= 24 * 3_600_000 {
                    let a = alive.entry(src).or_default();
                    a.1 += 1;
                    if entry
                        .as_ref()
                        .is_some_and(|e| e.state(live) == State::Healthy)
                    {
                        a.0 += 1;
                    }
                }
                if let Some(e) = entry {
                    let s = served.entry(src).or_default();
                    s.0 += e.health.successes();
                    s.1 += e.health.total_uses();
                }
            }
            let mut rows = Vec::new();
            for s in &self.sources {
                let st: SourceStats = c.store().source_stats(&s.name)?;
                let p = self.quality.get(&s.name);
                let (alive_24h, old) = alive.get(s.name.as_str()).copied().unwrap_or_default();
                let (ok, uses) = served.get(s.name.as_str()).copied().unwrap_or_default();
                rows.push(serde_json::json!({
                    "name": s.name,
                    "kind": s.kind.as_str(),
                    "urls": s.urls().iter().map(|u| proxygate_sources::fetch::redact(u)).collect::<Vec<_>>(),
                    "interval_s": s.interval.as_secs(),
                    "fetches_ok": st.fetches_ok,
                    "fetches_failed": st.fetches_failed,
                    "last_fetch_unix_ms": st.last_fetch_unix_ms,
                    "last_ok_unix_ms": st.last_ok_unix_ms,
                    "last_error": st.last_error,
                    "last": st.last,
                    "candidates": st.total.fetched,
                    "unique": st.total.unique,
                    "new": st.total.new,
                    "passed": st.total.passed,
                    "imported": st.total.imported,
                    "alive_24h": alive_24h,
                    "imported_24h_ago": old,
                    "served_success_rate": (uses > 0).then(|| ok as f64 / uses as f64),
                    "slowdown": p.slowdown,
                    "check_last": p.check_last,
                    "why": p.why,
                }));
            }
            Ok(serde_json::json!({ "sources": rows }))
        })
    }
}

fn yields(st: &SourceStats) -> Vec<Yield> {
    st.recent
        .iter()
        .map(|(unique, passed)| Yield {
            unique: *unique,
            passed: *passed,
        })
        .collect()
}

/// A check result as the catalog records it.
fn checked(upstream: Upstream, source: Option<String>, r: &CheckResult) -> Checked {
    Checked {
        upstream,
        integrity_ok: r.integrity_ok,
        source,
        listed_anonymity: None,
        passed: r.passed,
        check: CheckRecord {
            checked_unix_ms: unix_ms(),
            passed: r.passed,
            anonymity: r.anonymity.map(|a| a.to_string()),
            exit_ip: r.exit_ip.map(|ip| ip.to_string()),
            latency_ms: r.latency_ms,
            judge: r.judge.clone(),
            error: r.detail.clone(),
            failing_since_unix_ms: None,
            leak: r.leak.clone(),
            tampered: r.tampered.clone(),
            integrity_passes: 0,
            integrity_since_unix_ms: None,
        },
    }
}

/// The admin API's and the control socket's view of the runtime.
#[derive(Debug, Clone)]
pub struct SourceActions(pub Arc<SourcesRuntime>);

/// `POST /api/v1/sources/fetch`'s body.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FetchRequest {
    /// Source names; empty: every source.
    sources: Vec<String>,
    check: bool,
    import: bool,
}

/// `POST /api/v1/refresh`'s body.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RefreshRequest {
    /// Upstream ids or prefixes; empty: every enabled upstream.
    ids: Vec<String>,
}

/// A request body as `T` (`null` or nothing: its defaults).
fn body<T: serde::de::DeserializeOwned + Default>(v: Value) -> Result<T, OpError> {
    if v.is_null() {
        return Ok(T::default());
    }
    serde_json::from_value(v).map_err(|e| OpError::Usage(format!("invalid request: {e}")))
}

impl Actions for SourceActions {
    fn fetch_sources(&self, request: Value) -> BoxFuture<Result<Value, OpError>> {
        let rt = Arc::clone(&self.0);
        Box::pin(async move {
            let r: FetchRequest = body(request)?;
            let summaries = rt
                .fetch_now(&r.sources, r.check || r.import, r.import, &|_, _, _| {})
                .await?;
            Ok(serde_json::json!({ "sources": summaries }))
        })
    }

    fn refresh(&self, request: Value) -> BoxFuture<Result<Value, OpError>> {
        let rt = Arc::clone(&self.0);
        Box::pin(async move {
            let r: RefreshRequest = body(request)?;
            let s = rt.recheck_named(&r.ids, &|_, _, _| {}).await?;
            Ok(serde_json::to_value(s).unwrap_or_default())
        })
    }

    fn sources(&self) -> BoxFuture<Result<Value, OpError>> {
        let rt = Arc::clone(&self.0);
        Box::pin(async move { rt.view() })
    }
}
