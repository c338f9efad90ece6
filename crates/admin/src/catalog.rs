//! [`Catalog`]: the operator's operations on the pool, over the store and (when the gateway
//! runs) the live pool. One set of typed operations serves every way in: `proxygate pool ...`
//! on a stopped data dir, the control socket of a running gateway ([`crate::ops`] renders
//! their text) and the HTTP admin API ([`crate::api`] renders their JSON).
//!
//! Every change is written and flushed to the store before it is acknowledged, then published
//! to the live pool.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use proxygate_core::{Tier, Upstream, UpstreamId};
use proxygate_pool::latency::Latency;
use proxygate_pool::reputation::{Explanation, Inputs, explain};
use proxygate_pool::{Entry, HealthConfig, Identity, PoolWriter, Saved, State, Strategy};
use proxygate_store::{CheckRecord, Origin, Record, Stats, Store, StoreError};
use serde::{Deserialize, Serialize};

/// Why an operation was refused. Each maps onto an exit code and an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// An URL or import line is invalid; nothing was written.
    #[error("{0}")]
    Invalid(String),
    /// No upstream has that id.
    #[error("{0}")]
    NotFound(String),
    /// An id prefix matches several upstreams.
    #[error("{0}")]
    Ambiguous(String),
    /// A bad argument (an unknown strategy name...).
    #[error("{0}")]
    Usage(String),
    /// The operation cannot run in this state (a key rotation already under way...).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// sysexits(3) EX_USAGE.
pub const EXIT_USAGE: u8 = 64;
/// sysexits(3) EX_DATAERR: an URL or an import line is invalid.
pub const EXIT_DATA: u8 = 65;

impl OpError {
    /// The CLI's exit code: 65 invalid input (nothing written), 64 a bad argument, 1 the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            OpError::Invalid(_) => EXIT_DATA,
            OpError::Usage(_) => EXIT_USAGE,
            _ => 1,
        }
    }

    /// The admin API's status.
    pub fn http_status(&self) -> u16 {
        match self {
            OpError::Invalid(_) => 422,
            OpError::NotFound(_) => 404,
            OpError::Ambiguous(_) | OpError::Usage(_) => 400,
            OpError::Conflict(_) => 409,
            OpError::Store(_) => 500,
        }
    }
}

/// The operator's view of the pool.
#[derive(Debug)]
pub struct Catalog {
    store: Arc<Store>,
    /// Every record, disabled ones included: publishing never decrypts.
    records: BTreeMap<UpstreamId, Record>,
    live: Option<Live>,
    health: HealthConfig,
    /// How many records are disabled, for the metrics (the pool never holds them).
    disabled: Arc<AtomicUsize>,
    /// Every upstream's last check through itself, as the store's binary row
    /// ([`CheckRecord::encode`], ~70 bytes), read back when asked for ([`Catalog::check`]).
    /// Every member of a list pool has one: held as structs with their strings, a record and
    /// its check took 750 bytes, 378 as rows (`tests/memory.rs`).
    checks: HashMap<UpstreamId, Box<[u8]>>,
    /// When a list upstream is `verified`.
    trust: TrustPolicy,
}

/// Inserts in one batch past which the record map is rebuilt full ([`Catalog::repack`]).
const REPACK_MIN: usize = 64;

/// The start of the reason of a quarantined upstream: disabled for tampering, released by an
/// operator only (`proxygate pool enable`), never by a later check.
pub const QUARANTINED: &str = "quarantined: ";

/// When a list upstream earns the `verified` tier: `checks` integrity checks passed in a row
/// (no leak, nothing tampered) over at least `after_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustPolicy {
    pub after_ms: u64,
    pub checks: u32,
}

impl Default for TrustPolicy {
    /// The checker's defaults (`checker.verify_after`, `checker.verify_checks`).
    fn default() -> Self {
        use proxygate_sources::config::{DEFAULT_VERIFY_AFTER, DEFAULT_VERIFY_CHECKS};
        TrustPolicy {
            after_ms: crate::millis(DEFAULT_VERIFY_AFTER),
            checks: DEFAULT_VERIFY_CHECKS,
        }
    }
}

/// An upstream's trust tier at `now` (Unix ms): `operator` for the operator's own (the config,
/// `pool add`, `pool import`), `verified` for a list upstream whose integrity checks passed as
/// `policy` asks, else `untrusted`. An exit seen leaking by its last check is `untrusted`
/// whoever added it (demoted).
pub fn tier_of(r: &Record, check: Option<&CheckRecord>, policy: &TrustPolicy, now: u64) -> Tier {
    if check.is_some_and(|c| c.leak.is_some() || c.tampered.is_some()) {
        return Tier::Untrusted;
    }
    match r.origin {
        Origin::Operator | Origin::Config => Tier::Operator,
        Origin::Source => match check {
            Some(c)
                if c.integrity_passes >= policy.checks
                    && c.integrity_since_unix_ms
                        .is_some_and(|t| now.saturating_sub(t) >= policy.after_ms) =>
            {
                Tier::Verified
            }
            _ => Tier::Untrusted,
        },
    }
}

/// Whether a record is disabled for tampering.
pub fn is_quarantined(r: &Record) -> bool {
    r.disabled
        && r.disabled_reason
            .as_deref()
            .is_some_and(|w| w.starts_with(QUARANTINED))
}

/// The running gateway's side.
#[derive(Debug)]
struct Live {
    pool: PoolWriter,
    /// The strategy the config (or `--strategy`) chose, restored by a strategy reset.
    configured: Strategy,
}

/// What an add or import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Added {
    pub added: usize,
    pub updated: usize,
    /// The ids of the upstreams given, in order.
    pub ids: Vec<String>,
}

/// The strategy in force, and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StrategyView {
    /// The strategy in force (live), or the one the next start uses (offline; `None` when
    /// only the config decides).
    pub strategy: Option<String>,
    /// `operator` (set with `strategy NAME`, kept across restarts) or `config`.
    pub set_by: &'static str,
    /// The config's (or `--strategy`'s) choice, which a reset returns to (live only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub configured: Option<String>,
    /// Whether a gateway is running this catalog (changes apply at once).
    pub live: bool,
}

/// One upstream as `pool list --json`, `pool show --json` and the API show it.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub id: String,
    pub scheme: &'static str,
    pub address: String,
    pub country: Option<String>,
    pub proxy_type: &'static str,
    pub reputation: u8,
    pub success_rate: Option<f64>,
    pub avg_latency_ms: Option<f64>,
    pub uses: u64,
    pub failures: u64,
    pub consecutive_failures: u32,
    pub state: &'static str,
    pub origin: &'static str,
    /// The list source that brought it (origin `source`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub added_unix_ms: u64,
    pub last_used_unix_ms: Option<u64>,
    pub last_health_check_unix_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_left_ms: Option<u64>,
    /// The last check through itself, when it was checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_check_passed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anonymity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_ip: Option<String>,
    /// How many pool members exit from the same IP (itself included), when it serves and its
    /// exit is known: selection treats them as one exit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_group_size: Option<usize>,
    /// Its trust tier: operator, verified or untrusted.
    pub tier: &'static str,
    /// What its exit leaked at the last check (it is demoted to untrusted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leak: Option<String>,
    /// Integrity checks passed in a row.
    pub integrity_passes: u32,
    /// Why the janitor disabled it (or quarantined it: "quarantined: ...").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    /// What its list claimed of its anonymity (`anonymity` is the checker's verdict).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listed_anonymity: Option<String>,
}

/// One upstream's reputation explained: `GET /api/v1/upstreams/{id}`, `proxygate reputation`.
#[derive(Debug, Clone, Serialize)]
pub struct Explained {
    #[serde(flatten)]
    pub upstream: Row,
    /// The formula worked through, term by term, with its inputs.
    pub formula: Explanation,
    /// What "healthy" requires (`pool.healthy_reputation`, `pool.max_consecutive_failures`).
    pub healthy_reputation: u8,
    pub max_consecutive_failures: u32,
    /// What `weighted_random` draws it by: `round(reputation * success_rate ^
    /// pool.weight_success_exponent)`, 0-100.
    pub selection_weight: u8,
    /// The target sites where it is blocked now (selection avoids it there), most recent
    /// failure first; empty when no gateway runs.
    pub blocked_sites: Vec<proxygate_pool::sites::Blocked>,
    /// Why it stands where it does, most important first.
    pub why: Vec<String>,
    /// Response-time percentiles over its measured life.
    pub latency_ms: LatencyView,
    /// Whether these are live figures (a gateway runs) or what the store holds.
    pub live: bool,
}

/// Percentiles of one upstream's response times, ms.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LatencyView {
    /// The histogram's weight: every measured attempt until one value's count passes 65,535,
    /// then older ones count half (`Latency::record`).
    pub samples: u64,
    pub p50: Option<u64>,
    pub p95: Option<u64>,
    pub p99: Option<u64>,
}

impl LatencyView {
    fn of(l: Option<&Latency>) -> LatencyView {
        let q = |q: f64| l.and_then(|l| l.quantile_ms(q));
        LatencyView {
            samples: l.map_or(0, Latency::len),
            p50: q(0.5),
            p95: q(0.95),
            p99: q(0.99),
        }
    }
}

/// Why an upstream stands where it does, most important first: its state, then the terms of
/// the formula that moved it most.
pub fn reasons(row: &Row, f: &Explanation, cfg: &HealthConfig) -> Vec<String> {
    let mut why = Vec::new();
    match row.state {
        "disabled" => why.push("disabled: kept, never served".into()),
        "backoff" => why.push(format!(
            "in backoff for another {:.1}s after {} consecutive failures",
            row.backoff_left_ms.unwrap_or(0) as f64 / 1000.0,
            f.consecutive_failures
        )),
        "probation" if f.total_uses == 0 => {
            why.push("on probation: new, one request at a time until one succeeds".into())
        }
        "probation" => why.push(
            "on probation: back from a backoff, one request at a time until one succeeds".into(),
        ),
        _ => {}
    }
    if f.reputation < cfg.healthy_reputation {
        why.push(format!(
            "reputation {} is under pool.healthy_reputation ({})",
            f.reputation, cfg.healthy_reputation
        ));
    }
    if f.consecutive_failures >= cfg.max_consecutive_failures {
        why.push(format!(
            "{} consecutive failures reach pool.max_consecutive_failures ({})",
            f.consecutive_failures, cfg.max_consecutive_failures
        ));
    }
    let mut terms = vec![
        (
            f.success_term,
            match f.success_rate {
                Some(r) => format!("success rate {:.0}%", r * 100.0),
                None => "no attempt yet".into(),
            },
        ),
        (
            f.latency_term,
            match f.response_time_ms {
                Some(ms) => format!("response time {ms:.0} ms"),
                None => "no response time yet".into(),
            },
        ),
        (
            f.failure_term,
            format!("{} consecutive failures", f.consecutive_failures),
        ),
        (f.uses_term, format!("{} uses", f.total_uses)),
    ];
    terms.sort_by(|a, b| b.0.abs().total_cmp(&a.0.abs()));
    for (points, what) in terms {
        if points.abs() >= 0.5 {
            let verb = if points < 0.0 { "costs" } else { "earns" };
            why.push(format!("{what} {verb} {:.0} points", points.abs()));
        }
    }
    why.push(format!(
        "{:.0} (base) {:+.0} (success) {:+.0} (latency) {:+.0} (failures) {:+.0} (uses) = {:.1} \
         -> reputation {}",
        f.base, f.success_term, f.latency_term, f.failure_term, f.uses_term, f.score, f.reputation
    ));
    why
}

/// One line of `pool export` (JSON lines), read back by `pool import`.
#[derive(Debug, Serialize, Deserialize)]
struct ExportLine {
    id: String,
    /// With `--decrypt`, credentials included; otherwise without them.
    url: String,
    /// The credentials envelope, still sealed (base64), when not decrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    credentials: Option<String>,
    #[serde(default)]
    disabled: bool,
    #[serde(default)]
    origin: Option<String>,
    #[serde(default)]
    added_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<String>,
    #[serde(default)]
    stats: Option<Stats>,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub fn to_saved(s: &Stats) -> Saved {
    Saved {
        success_rate: s.success_rate,
        response_time_ms: s.response_time_avg_ms,
        consecutive_failures: s.consecutive_failures,
        successes: s.total_uses.saturating_sub(s.failures),
        failures: s.failures,
        latency: s.latency_histogram.as_deref().and_then(Latency::decode),
    }
}

/// An entry's live stats in the store's shape. What the pool does not track is left empty: the
/// last use, the last check and the histogram of an entry not used, re-checked or measured
/// since this process started ([`lacks_stored`]; [`fill_from_stored`] takes them from the
/// store's).
pub fn live_only(e: &Entry, now: Instant, now_unix: u64) -> Stats {
    let h = &e.health;
    let at = |ago: std::time::Duration| {
        now_unix.saturating_sub(u64::try_from(ago.as_millis()).unwrap_or(u64::MAX))
    };
    Stats {
        reputation: h.reputation(),
        success_rate: h.success_rate(),
        response_time_avg_ms: h.response_time_ms(),
        consecutive_failures: h.consecutive_failures(),
        total_uses: h.total_uses(),
        failures: h.failures(),
        last_used_unix_ms: e.since_last_use(now).map(at),
        last_health_check_unix_ms: e.since_last_check(now).map(at),
        latency_histogram: h.latency_encoded(),
    }
}

/// Whether [`live_only`]'s stats lack something the stored stats supply. An upstream this
/// process added has been checked (its probation) and measured by its first uses; one loaded
/// from the store at start has not been re-checked until it goes on probation again or the
/// checker visits it.
pub fn lacks_stored(live: &Stats) -> bool {
    live.last_used_unix_ms.is_none()
        || live.last_health_check_unix_ms.is_none()
        || live.latency_histogram.is_none()
}

/// Fills in from `stored` what [`live_only`]'s stats lack.
pub fn fill_from_stored(live: &mut Stats, stored: &Stats) {
    live.last_used_unix_ms = live.last_used_unix_ms.or(stored.last_used_unix_ms);
    live.last_health_check_unix_ms = live
        .last_health_check_unix_ms
        .or(stored.last_health_check_unix_ms);
    if live.latency_histogram.is_none() {
        live.latency_histogram = stored.latency_histogram.clone();
    }
}

/// An entry's live stats in the store's shape, `previous` supplying what the pool does not
/// track.
pub fn live_stats(e: &Entry, now: Instant, now_unix: u64, previous: &Stats) -> Stats {
    let mut live = live_only(e, now, now_unix);
    fill_from_stored(&mut live, previous);
    live
}

impl Catalog {
    /// Reads every record (all must decrypt).
    pub fn load(store: Arc<Store>, health: HealthConfig) -> Result<Catalog, StoreError> {
        let records = store
            .records()?
            .into_iter()
            .map(|r| (r.upstream.id(), r))
            .collect();
        let checks = store.check_rows()?;
        let c = Catalog {
            store,
            records,
            live: None,
            health,
            disabled: Arc::default(),
            checks,
            trust: TrustPolicy::default(),
        };
        c.disabled.store(c.disabled(), Ordering::Relaxed);
        Ok(c)
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Makes the store hold exactly the config's upstreams among those of origin `Config`
    /// (operator-added ones are left alone); durable when it returns. Returns (added or
    /// changed, removed).
    pub fn sync_config(&mut self, upstreams: &[Upstream]) -> Result<(usize, usize), StoreError> {
        let mut wanted = HashMap::new();
        for u in upstreams {
            wanted.entry(u.id()).or_insert(u);
        }
        let mut removed = 0;
        let mut fresh = Vec::new();
        let mut failed = None;
        for (id, u) in &wanted {
            let record = match self.records.get(id) {
                Some(r) if *r.upstream == **u => continue,
                Some(r) => Record {
                    upstream: Arc::new((*u).clone()),
                    ..r.clone()
                },
                None => Record::new((*u).clone(), Origin::Config, unix_ms()),
            };
            if let Err(e) = self.store.put(&record) {
                failed = Some(e);
                break;
            }
            fresh.push(record);
        }
        let changed = fresh.len();
        // What was written is held, even when a later write failed.
        self.hold(fresh);
        if let Some(e) = failed {
            return Err(e);
        }
        let stale: Vec<UpstreamId> = self
            .records
            .iter()
            .filter(|(id, r)| r.origin == Origin::Config && !wanted.contains_key(id))
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.store.remove(id)?;
            self.records.remove(&id);
            removed += 1;
        }
        self.store.flush()?;
        if changed + removed > 0 {
            // A reload: the live pool follows at once (no-op before `attach`).
            self.publish();
        }
        Ok((changed, removed))
    }

    /// Rebuilds the record map in one pass after a batch that inserted `added` records, when
    /// they were many. A `BTreeMap` filled a key at a time, in the ids' hash order, keeps its
    /// nodes about two thirds full; one collected from its own sorted entries is built full,
    /// as [`Catalog::load`] builds it at a restart (massif, 40,000 config upstreams on first
    /// use: 6.25 MB of map, against 4.24 MB restarted).
    fn repack(&mut self, added: usize) {
        if self.is_large_batch(added) {
            self.records = std::mem::take(&mut self.records).into_iter().collect();
        }
    }

    /// Whether a batch of `n` records is large enough, against the map, to rebuild the map
    /// for: at least [`REPACK_MIN`], and a sixteenth of the map.
    fn is_large_batch(&self, n: usize) -> bool {
        n >= REPACK_MIN && n.saturating_mul(16) >= self.records.len()
    }

    /// Takes a batch of records (new or replacing) into the map. A large one is merged in one
    /// pass, the map built once and full after the store's writes rather than node by node
    /// among them, so a first start with many upstreams leaves no half-emptied nodes mixed
    /// into pages with live blocks.
    fn hold(&mut self, batch: Vec<Record>) {
        if !self.is_large_batch(batch.len()) {
            for r in batch {
                self.records.insert(r.upstream.id(), r);
            }
            return;
        }
        for r in &batch {
            self.records.remove(&r.upstream.id());
        }
        let old = std::mem::take(&mut self.records);
        self.records = old
            .into_iter()
            .chain(batch.into_iter().map(|r| (r.upstream.id(), r)))
            .collect();
    }

    /// Attaches the live pool and publishes the enabled upstreams to it, with their saved
    /// stats.
    pub fn attach(&mut self, pool: PoolWriter, configured: Strategy) {
        self.live = Some(Live { pool, configured });
        self.publish();
    }

    pub fn is_live(&self) -> bool {
        self.live.is_some()
    }

    /// When list upstreams become `verified` (`checker.verify_after`, `checker.verify_checks`);
    /// set before the pool is attached.
    #[must_use]
    pub fn with_trust(mut self, trust: TrustPolicy) -> Catalog {
        self.trust = trust;
        self
    }

    /// What the pool is told of `r`: its exit as last checked, its tier now.
    fn identity(&self, r: &Record, now: u64) -> Identity {
        let check = self.check(r.upstream.id());
        let check = check.as_ref();
        Identity {
            exit: check
                .and_then(|c| c.exit_ip.as_deref())
                .and_then(|ip| ip.parse().ok()),
            tier: tier_of(r, check, &self.trust, now),
        }
    }

    /// Publishes the enabled records to the live pool. Upstreams new to it start from their
    /// stored stats; the others keep their live ones. Every one takes its current identity.
    fn publish(&self) {
        self.publish_at(unix_ms());
    }

    /// [`Catalog::publish`], tiers as of `now` (Unix ms).
    fn publish_at(&self, now: u64) {
        self.disabled.store(self.disabled(), Ordering::Relaxed);
        let Some(live) = &self.live else { return };
        let items: Vec<(Arc<Upstream>, Option<Saved>, Identity)> = {
            let snap = live.pool.reader().snapshot();
            self.records
                .values()
                .filter(|r| !r.disabled)
                .map(|r| {
                    let id = r.upstream.id();
                    let saved = match snap.get(id) {
                        Some(_) => None,
                        None => self.store.stats(id).ok().map(|s| to_saved(&s)),
                    };
                    (Arc::clone(&r.upstream), saved, self.identity(r, now))
                })
                .collect()
        };
        live.pool.replace_saved(items);
    }

    /// Records that serve (not disabled).
    pub fn enabled(&self) -> usize {
        self.records.values().filter(|r| !r.disabled).count()
    }

    /// Records kept but disabled.
    pub fn disabled(&self) -> usize {
        self.records.len() - self.enabled()
    }

    /// The count of disabled records, kept current: what the metrics read at scrape time.
    pub fn disabled_counter(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.disabled)
    }

    /// A full id, or a unique prefix of at least 4 hex digits.
    pub fn resolve(&self, text: &str) -> Result<UpstreamId, OpError> {
        if let Ok(id) = text.parse::<UpstreamId>() {
            return Ok(id);
        }
        let text = text.to_ascii_lowercase();
        let matches: Vec<UpstreamId> = self
            .records
            .keys()
            .filter(|id| text.len() >= 4 && id.to_string().starts_with(&text))
            .copied()
            .collect();
        match matches.as_slice() {
            [one] => Ok(*one),
            [] => Err(OpError::NotFound(format!("no upstream with id {text:?}"))),
            _ => Err(OpError::Ambiguous(format!(
                "{text:?} matches {} upstreams; give more digits",
                matches.len()
            ))),
        }
    }

    /// The record of `id`, or `NotFound`.
    pub fn record(&self, id: UpstreamId) -> Result<&Record, OpError> {
        self.records
            .get(&id)
            .ok_or_else(|| OpError::NotFound(format!("no upstream with id {id}")))
    }

    /// The live entry of `id`, when a gateway runs and the upstream serves.
    pub fn entry(&self, id: UpstreamId) -> Option<Arc<Entry>> {
        self.live
            .as_ref()
            .and_then(|l| l.pool.reader().snapshot().get(id).cloned())
    }

    fn put_all(
        &mut self,
        records: Vec<Record>,
        stats: Vec<(UpstreamId, Stats)>,
    ) -> Result<Added, StoreError> {
        let mut out = Added::default();
        // Held in one pass after the writes ([`Catalog::hold`]); a later line for the same id
        // updates the earlier one, as it would in the map.
        let mut batch: Vec<Record> = Vec::new();
        let mut at: HashMap<UpstreamId, usize> = HashMap::new();
        let mut failed = None;
        for mut r in records {
            let id = r.upstream.id();
            let earlier = at.get(&id).and_then(|i| batch.get(*i));
            if let Some(old) = earlier.or_else(|| self.records.get(&id)) {
                // Re-adding keeps what the operator set (disabled) and when it came.
                r.disabled |= old.disabled;
                r.added_unix_ms = old.added_unix_ms;
                out.updated += 1;
            } else {
                out.added += 1;
            }
            if let Err(e) = self.store.put(&r) {
                failed = Some(e);
                break;
            }
            out.ids.push(id.to_string());
            match at.get(&id).and_then(|i| batch.get_mut(*i)) {
                Some(slot) => *slot = r,
                None => {
                    at.insert(id, batch.len());
                    batch.push(r);
                }
            }
        }
        self.hold(batch);
        if let Some(e) = failed {
            return Err(e);
        }
        if !stats.is_empty() {
            self.store
                .write_stats(stats.iter().map(|(id, s)| (*id, s)))?;
        }
        self.store.flush()?;
        self.publish();
        Ok(out)
    }

    /// Adds (or updates) the upstreams of `urls` as the operator's. All or nothing: one
    /// invalid URL and nothing is written.
    pub fn add(&mut self, urls: &[String]) -> Result<Added, OpError> {
        let mut records = Vec::new();
        let mut errors = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            match Upstream::parse(url) {
                Ok(upstream) => records.push(operator_record(upstream)),
                // The URL itself may hold a password: name it by position only.
                Err(e) => errors.push(format!("URL {}: {e}", i + 1)),
            }
        }
        if !errors.is_empty() {
            errors.push("nothing was added".into());
            return Err(OpError::Invalid(errors.join("\n")));
        }
        Ok(self.put_all(records, Vec::new())?)
    }

    /// Imports URL lines or `pool export` lines. All or nothing.
    pub fn import(&mut self, text: &str) -> Result<Added, OpError> {
        let mut records = Vec::new();
        let mut stats = Vec::new();
        let mut errors = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parsed = if line.starts_with('{') {
                self.import_line(line)
            } else {
                Upstream::parse(line)
                    .map(|upstream| (operator_record(upstream), None))
                    .map_err(|e| e.to_string())
            };
            match parsed {
                Ok((record, s)) => {
                    if let Some(s) = s {
                        stats.push((record.upstream.id(), s));
                    }
                    records.push(record);
                }
                Err(e) => errors.push(format!("line {}: {e}", n + 1)),
            }
        }
        if !errors.is_empty() {
            errors.push("nothing was imported".into());
            return Err(OpError::Invalid(errors.join("\n")));
        }
        Ok(self.put_all(records, stats)?)
    }

    /// One `pool export` line back into a record (and its stats).
    fn import_line(&self, line: &str) -> Result<(Record, Option<Stats>), String> {
        let e: ExportLine = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
        let mut upstream = Upstream::parse(&e.url).map_err(|e| e.to_string())?;
        if let Some(sealed) = &e.credentials {
            let id: UpstreamId =
                e.id.parse()
                    .map_err(|()| format!("invalid id {:?}", e.id))?;
            let creds = self.store.unseal(id, sealed).map_err(|why| {
                format!(
                    "credentials do not open ({why}): import with the key of the data dir they \
                     came from, or export them with --decrypt"
                )
            })?;
            upstream.credentials = Some(creds);
            if upstream.id() != id {
                return Err(format!("id {} does not match its URL", e.id));
            }
        }
        let origin = match e.origin.as_deref() {
            Some("config") => Origin::Config,
            Some("source") if e.source.is_some() => Origin::Source,
            _ => Origin::Operator,
        };
        Ok((
            Record {
                upstream: Arc::new(upstream),
                disabled: e.disabled,
                origin,
                added_unix_ms: e.added_unix_ms,
                source: e.source.filter(|_| origin == Origin::Source),
                disabled_reason: None,
                listed_anonymity: None,
            },
            e.stats,
        ))
    }

    /// Where an upstream stands: its live state, or (not serving) judged from stored stats by
    /// the pool's one rule for "healthy".
    fn state(&self, r: &Record, entry: Option<&Entry>, stats: &Stats, now: Instant) -> State {
        match entry {
            _ if r.disabled => State::Disabled,
            Some(e) => e.state(now),
            None if proxygate_pool::health::is_healthy(
                stats.reputation,
                stats.consecutive_failures,
                &self.health,
            ) =>
            {
                State::Healthy
            }
            None => State::Unhealthy,
        }
    }

    fn row(&self, r: &Record, stored: &Stats, detail: bool) -> Row {
        let id = r.upstream.id();
        let now = Instant::now();
        let entry = self.entry(id);
        let stats = match &entry {
            Some(e) => live_stats(e, now, unix_ms(), stored),
            None => stored.clone(),
        };
        let state = self.state(r, entry.as_deref(), &stats, now);
        let check = self.check(id);
        let check = check.as_ref();
        Row {
            id: id.to_string(),
            scheme: r.upstream.scheme.as_str(),
            address: r.upstream.authority(),
            country: r.upstream.country.clone(),
            proxy_type: r.upstream.proxy_type.as_str(),
            reputation: stats.reputation,
            success_rate: stats.success_rate,
            avg_latency_ms: stats.response_time_avg_ms,
            uses: stats.total_uses,
            failures: stats.failures,
            consecutive_failures: stats.consecutive_failures,
            state: state.as_str(),
            origin: r.origin.as_str(),
            source: r.source.clone(),
            added_unix_ms: r.added_unix_ms,
            last_used_unix_ms: stats.last_used_unix_ms,
            last_health_check_unix_ms: stats.last_health_check_unix_ms,
            username: detail
                .then(|| {
                    r.upstream
                        .credentials
                        .as_ref()
                        .map(|c| c.username.expose().to_owned())
                })
                .flatten(),
            in_flight: entry
                .as_ref()
                .filter(|_| detail)
                .map(|e| e.health.in_flight()),
            backoff_left_ms: entry
                .as_ref()
                .filter(|_| detail)
                .and_then(|e| e.backoff_left(now))
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            last_check_passed: check.map(|c| c.passed),
            anonymity: check.and_then(|c| c.anonymity.clone()),
            exit_ip: check.and_then(|c| c.exit_ip.clone()),
            exit_group_size: self.live.as_ref().and_then(|l| {
                check.and_then(|c| c.exit_ip.as_ref())?;
                let n = l.pool.reader().snapshot().exit_group_of(id).len();
                (n > 0).then_some(n)
            }),
            tier: tier_of(r, check, &self.trust, unix_ms()).as_str(),
            leak: check.and_then(|c| c.leak.clone()),
            integrity_passes: check.map_or(0, |c| c.integrity_passes),
            disabled_reason: r.disabled_reason.clone(),
            listed_anonymity: r.listed_anonymity.clone(),
        }
    }

    /// Every upstream, in id order.
    pub fn rows(&self) -> Result<Vec<Row>, OpError> {
        let stored = self.store.all_stats()?;
        Ok(self
            .records
            .values()
            .map(|r| {
                let s = stored.get(&r.upstream.id()).cloned().unwrap_or_default();
                self.row(r, &s, false)
            })
            .collect())
    }

    /// One upstream in detail (its username included, never its password).
    pub fn show(&self, id: UpstreamId) -> Result<Row, OpError> {
        let r = self.record(id)?;
        Ok(self.row(r, &self.store.stats(id)?, true))
    }

    /// One upstream's reputation explained, from its live health or (not serving) its stored
    /// stats.
    pub fn explain(&self, id: UpstreamId) -> Result<Explained, OpError> {
        let row = self.show(id)?;
        let (inputs, latency) = match self.entry(id) {
            Some(e) => (e.health.inputs(), e.health.latency()),
            None => {
                let s = self.store.stats(id)?;
                (
                    Inputs {
                        success_rate: s.success_rate,
                        response_time_ms: s.response_time_avg_ms,
                        consecutive_failures: s.consecutive_failures,
                        total_uses: s.total_uses,
                    },
                    s.latency_histogram.as_deref().and_then(Latency::decode),
                )
            }
        };
        let formula = explain(&inputs, &self.health.reputation);
        let selection_weight = proxygate_pool::selection_weight(
            formula.reputation,
            inputs.success_rate,
            self.health.weight_success_exponent,
        );
        let blocked_sites = self
            .live
            .as_ref()
            .map(|l| l.pool.reader().blocked_sites(id, std::time::Instant::now()))
            .unwrap_or_default();
        Ok(Explained {
            selection_weight,
            blocked_sites,
            why: reasons(&row, &formula, &self.health),
            upstream: row,
            formula,
            healthy_reputation: self.health.healthy_reputation,
            max_consecutive_failures: self.health.max_consecutive_failures,
            latency_ms: LatencyView::of(latency.as_ref()),
            live: self.live.is_some(),
        })
    }

    /// The health policy the catalog judges by.
    pub fn health_config(&self) -> &HealthConfig {
        &self.health
    }

    /// Whether `id` is in the catalog (any origin, enabled or not).
    pub fn contains(&self, id: UpstreamId) -> bool {
        self.records.contains_key(&id)
    }

    /// Records checks, and (with `import`) brings the candidates that passed into the pool
    /// as upstreams of their source: durable, then live. A passing check enables an upstream
    /// the janitor had disabled; one an operator disabled stays disabled.
    pub fn merge_checked(
        &mut self,
        checked: Vec<Checked>,
        import: bool,
    ) -> Result<Merged, OpError> {
        let now = unix_ms();
        let mut out = Merged::default();
        let mut checks = Vec::new();
        let mut changed = false;
        for c in checked {
            let id = c.upstream.id();
            let mut check = c.check;
            let prev = self.check(id);
            let prev = prev.as_ref();
            check.failing_since_unix_ms = match (c.passed, prev) {
                (true, _) => None,
                (false, Some(prev)) => prev.failing_since_unix_ms.or(Some(check.checked_unix_ms)),
                (false, None) => Some(check.checked_unix_ms),
            };
            // The integrity streak: a leak or tampering ends it, a clean pass extends it, a
            // check that could not run the integrity steps leaves it as it was.
            let (passes, since) = prev.map_or((0, None), |p| {
                (p.integrity_passes, p.integrity_since_unix_ms)
            });
            (check.integrity_passes, check.integrity_since_unix_ms) =
                if check.leak.is_some() || check.tampered.is_some() {
                    (0, None)
                } else if c.integrity_ok {
                    (
                        passes.saturating_add(1),
                        since.or(Some(check.checked_unix_ms)),
                    )
                } else {
                    (passes, since)
                };
            let leaked_before = prev.is_some_and(|p| p.leak.is_some());
            let before = self
                .records
                .get(&id)
                .map(|r| (self.identity(r, now), r.disabled));
            if let Some(t) = &check.tampered
                && let Some(r) = self.records.get(&id)
                && !is_quarantined(r)
            {
                tracing::warn!(upstream = %r.upstream, "upstream quarantined: {t}");
                self.mark(id, true, Some(format!("{QUARANTINED}{t}")))?;
                out.quarantined += 1;
                changed = true;
            }
            if let (Some(l), Some(r)) = (&check.leak, self.records.get(&id))
                && !leaked_before
            {
                tracing::warn!(upstream = %r.upstream, "upstream demoted to untrusted: it {l}");
            }
            // (Quarantined, disabled by the janitor) for a known record.
            let standing = self.records.get(&id).map(|r| {
                let by_janitor = r.disabled && r.disabled_reason.is_some() && !is_quarantined(r);
                (is_quarantined(r), by_janitor)
            });
            match standing {
                Some((false, true)) if c.passed => {
                    self.mark(id, false, None)?;
                    out.reenabled += 1;
                    changed = true;
                }
                Some(_) => {}
                None if c.passed && import => {
                    let mut r = Record::new(c.upstream, Origin::Source, now);
                    r.source = c.source;
                    r.listed_anonymity = c.listed_anonymity;
                    self.store.put(&r)?;
                    self.records.insert(id, r);
                    out.imported += 1;
                    changed = true;
                }
                None => continue,
            }
            self.checks.insert(id, check.encode().into_boxed_slice());
            if let Some((ident, disabled)) = before
                && let Some(r) = self.records.get(&id)
                && !r.disabled
                && (disabled || self.identity(r, now) != ident)
            {
                changed = true;
            }
            checks.push(id);
        }
        self.repack(out.imported);
        // The rows just held, written as they are.
        self.store.put_checks(
            checks
                .iter()
                .filter_map(|id| self.checks.get(id).map(|row| (*id, &**row))),
        )?;
        self.store.flush()?;
        out.checks = checks.len();
        if changed {
            self.publish();
        }
        Ok(out)
    }

    /// Every record and its last check, for the re-check scheduler and the sources' figures.
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.records.values()
    }

    /// Upstream `id`'s last check through itself, if it was checked.
    pub fn check(&self, id: UpstreamId) -> Option<CheckRecord> {
        self.checks
            .get(&id)
            .and_then(|row| CheckRecord::decode(row))
    }

    /// One janitor pass at `now` (Unix ms): disables list upstreams dead for long, deletes
    /// list upstreams unused for long. Durable, then live.
    pub fn janitor(&mut self, now: u64, cfg: &crate::janitor::Config) -> Result<Swept, OpError> {
        use crate::janitor::{Verdict, verdict};
        let stored = self.store.all_stats()?;
        let instant = Instant::now();
        let mut out = Swept::default();
        let verdicts: Vec<(UpstreamId, Verdict)> = self
            .records
            .values()
            .filter(|r| r.origin == Origin::Source)
            .map(|r| {
                let id = r.upstream.id();
                let last_used = match self.entry(id) {
                    Some(e) => live_stats(&e, instant, now, &Stats::default())
                        .last_used_unix_ms
                        .or(stored.get(&id).and_then(|s| s.last_used_unix_ms)),
                    None => stored.get(&id).and_then(|s| s.last_used_unix_ms),
                };
                (id, verdict(r, self.check(id).as_ref(), last_used, now, cfg))
            })
            .collect();
        for (id, v) in verdicts {
            match v {
                Verdict::Keep => {}
                Verdict::Disable(why) => {
                    self.mark(id, true, Some(why.clone()))?;
                    out.disabled.push((id.to_string(), why));
                }
                Verdict::Delete(why) => {
                    self.store.remove(id)?;
                    self.records.remove(&id);
                    self.checks.remove(&id);
                    out.deleted.push((id.to_string(), why));
                }
            }
        }
        if !out.disabled.is_empty() || !out.deleted.is_empty() {
            self.store.flush()?;
            self.publish();
        } else if self.tiers_moved(now) {
            self.publish_at(now);
        }
        Ok(out)
    }

    /// Whether a serving upstream's tier at `now` differs from the one the pool has: time
    /// alone promotes a list upstream to `verified` (`checker.verify_after` passing since its
    /// integrity streak began), with no check to republish it.
    fn tiers_moved(&self, now: u64) -> bool {
        let Some(live) = &self.live else {
            return false;
        };
        let snap = live.pool.reader().snapshot();
        self.records.values().filter(|r| !r.disabled).any(|r| {
            let id = r.upstream.id();
            snap.get(id)
                .is_some_and(|e| e.tier() != tier_of(r, self.check(id).as_ref(), &self.trust, now))
        })
    }

    /// The stats the store holds for `id` (what a restart starts from).
    pub fn stored_stats(&self, id: UpstreamId) -> Result<Stats, OpError> {
        Ok(self.store.stats(id)?)
    }

    pub fn remove(&mut self, id: UpstreamId) -> Result<UpstreamId, OpError> {
        if !self.store.remove(id)? {
            return Err(OpError::NotFound(format!("no upstream with id {id}")));
        }
        self.store.flush()?;
        self.records.remove(&id);
        self.publish();
        Ok(id)
    }

    /// An operator's disable or enable (the janitor's reason, if any, is forgotten).
    pub fn set_disabled(&mut self, id: UpstreamId, disabled: bool) -> Result<UpstreamId, OpError> {
        if !self.mark(id, disabled, None)? {
            return Err(OpError::NotFound(format!("no upstream with id {id}")));
        }
        self.store.flush()?;
        self.publish();
        Ok(id)
    }

    /// Disables or enables `id`, and why (`None`: an operator's doing), in the store (not yet
    /// flushed) and in the record. Returns whether the store had it.
    fn mark(
        &mut self,
        id: UpstreamId,
        disabled: bool,
        reason: Option<String>,
    ) -> Result<bool, OpError> {
        if !self
            .store
            .set_disabled_because(id, disabled, reason.as_deref())?
        {
            return Ok(false);
        }
        if let Some(r) = self.records.get_mut(&id) {
            r.disabled = disabled;
            r.disabled_reason = reason;
        }
        Ok(true)
    }

    /// Every upstream as JSON lines, credentials sealed unless `decrypt`.
    pub fn export(&self, decrypt: bool) -> Result<String, OpError> {
        use std::fmt::Write as _;
        let stored = self.store.all_stats()?;
        let mut out = String::new();
        for (id, r) in &self.records {
            let mut upstream = Upstream::clone(&r.upstream);
            let credentials = if decrypt {
                None
            } else {
                upstream.credentials = None;
                self.store.sealed(*id)?
            };
            let previous = stored.get(id).cloned().unwrap_or_default();
            let stats = match self.entry(*id) {
                Some(e) => Some(live_stats(&e, Instant::now(), unix_ms(), &previous)),
                None => stored.get(id).cloned(),
            };
            let line = ExportLine {
                id: id.to_string(),
                url: upstream.expose_url(),
                credentials,
                disabled: r.disabled,
                origin: Some(r.origin.as_str().to_owned()),
                added_unix_ms: r.added_unix_ms,
                source: r.source.clone(),
                stats,
            };
            let _ = writeln!(out, "{}", serde_json::to_string(&line).unwrap_or_default());
        }
        Ok(out)
    }

    /// The strategy in force and where it comes from.
    pub fn strategy(&self) -> Result<StrategyView, OpError> {
        let stored = self.store.setting("strategy")?;
        let set_by = if stored.is_some() {
            "operator"
        } else {
            "config"
        };
        Ok(match &self.live {
            Some(l) => StrategyView {
                strategy: Some(l.pool.reader().strategy().to_string()),
                set_by,
                configured: Some(l.configured.to_string()),
                live: true,
            },
            None => StrategyView {
                strategy: stored,
                set_by,
                configured: None,
                live: false,
            },
        })
    }

    /// A reload changed the config's strategy: it applies now unless an operator's choice
    /// (`strategy NAME`) stands, and a reset returns to it. Returns the strategy in force.
    pub fn set_configured_strategy(&mut self, configured: Strategy) -> Result<Strategy, OpError> {
        let operator = self.store.setting("strategy")?.is_some();
        let Some(l) = &mut self.live else {
            return Ok(configured);
        };
        l.configured = configured;
        if !operator {
            l.pool.set_strategy(configured);
        }
        Ok(l.pool.reader().strategy())
    }

    /// Sets the strategy (kept across restarts), or with `None` forgets the operator's
    /// choice so the config's applies. Durable before it returns; live at once.
    pub fn set_strategy(&mut self, name: Option<&str>) -> Result<StrategyView, OpError> {
        let strategy = name
            .map(|n| n.parse::<Strategy>())
            .transpose()
            .map_err(|e| OpError::Usage(e.to_string()))?;
        self.store
            .set_setting("strategy", strategy.map(Strategy::as_str))?;
        self.store.flush()?;
        if let Some(l) = &self.live {
            l.pool.set_strategy(strategy.unwrap_or(l.configured));
        }
        self.strategy()
    }
}

/// One candidate checked through itself, ready to merge.
#[derive(Debug, Clone)]
pub struct Checked {
    pub upstream: Upstream,
    /// Every configured integrity step ran and passed.
    pub integrity_ok: bool,
    /// The source that listed it (`None`: a re-check of a pool member).
    pub source: Option<String>,
    /// The anonymity the source claimed for it.
    pub listed_anonymity: Option<String>,
    pub passed: bool,
    pub check: CheckRecord,
}

/// What a merge did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Merged {
    /// New upstreams that joined the pool.
    pub imported: usize,
    /// Upstreams quarantined for tampering.
    pub quarantined: usize,
    /// Upstreams the janitor had disabled, enabled again by a passing check.
    pub reenabled: usize,
    /// Checks recorded.
    pub checks: usize,
}

/// What one janitor pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Swept {
    pub disabled: Vec<(String, String)>,
    pub deleted: Vec<(String, String)>,
}

fn operator_record(upstream: Upstream) -> Record {
    Record::new(upstream, Origin::Operator, unix_ms())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxygate_pool::Pool;

    fn catalog(dir: &std::path::Path) -> (Catalog, proxygate_pool::PoolReader) {
        let (store, _) = Store::open(dir, None).unwrap();
        let mut c = Catalog::load(Arc::new(store), HealthConfig::default()).unwrap();
        let (reader, writer) = Pool::create(Strategy::RoundRobin, HealthConfig::default());
        c.attach(writer, Strategy::RoundRobin);
        (c, reader)
    }

    #[test]
    fn disabled_upstreams_leave_the_live_pool() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, reader) = catalog(dir.path());
        c.add(&["http://10.0.0.1:1".into()]).unwrap();
        let id = reader.snapshot().entries()[0].id;
        c.set_disabled(id, true).unwrap();
        assert!(reader.snapshot().is_empty());
        assert_eq!(c.show(id).unwrap().state, "disabled");
        let prefix = c.resolve(&id.to_string()[..5]).unwrap();
        c.set_disabled(prefix, false).unwrap();
        assert_eq!(reader.snapshot().len(), 1);
        assert!(matches!(c.resolve("zzzz"), Err(OpError::NotFound(_))));
        c.remove(id).unwrap();
        assert!(reader.snapshot().is_empty());
        assert!(matches!(c.remove(id), Err(OpError::NotFound(_))));
    }

    /// The live pool's entries and the catalog's records hold one copy of each upstream
    /// between them, whichever way it came in (config, `pool add`, the store at a start),
    /// and keep sharing it across later publishes.
    #[test]
    fn pool_entries_share_the_records_upstreams() {
        let dir = tempfile::tempdir().unwrap();
        let config = [
            Upstream::parse("http://10.0.0.1:1").unwrap(),
            Upstream::parse("socks5://u:p@10.0.0.2:2").unwrap(),
        ];
        {
            let (mut c, _) = catalog(dir.path());
            c.sync_config(&config).unwrap();
        }
        let (mut c, reader) = catalog(dir.path());
        c.sync_config(&config).unwrap();
        c.add(&["http://10.0.0.3:3".into(), "http://10.0.0.4:4".into()])
            .unwrap();
        let shared = |c: &Catalog| {
            let snap = reader.snapshot();
            assert_eq!(snap.len(), c.records.len());
            snap.entries()
                .iter()
                .all(|e| Arc::ptr_eq(&e.upstream, &c.record(e.id).unwrap().upstream))
        };
        assert!(shared(&c));
        let last = reader.snapshot().entries()[3].id;
        c.set_disabled(last, true).unwrap();
        c.set_disabled(last, false).unwrap();
        assert!(shared(&c));
    }

    /// An import, small or large enough to be held in one pass, counts a repeated line as an
    /// update of the first and keeps what the operator set before (disabled, when added).
    #[test]
    fn imports_count_repeats_and_keep_what_the_operator_set() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, reader) = catalog(dir.path());
        let a = c.add(&["http://10.0.0.1:1".into()]).unwrap();
        let id: UpstreamId = a.ids[0].parse().unwrap();
        c.set_disabled(id, true).unwrap();
        let added_at = c.record(id).unwrap().added_unix_ms;
        for n in [3, 200] {
            let mut urls: Vec<String> = (0..n)
                .map(|i| format!("http://10.1.{}.{}:1", i / 250, i % 250))
                .collect();
            urls.push("http://10.0.0.1:1".into());
            urls.push(urls[0].clone());
            let text = urls.join("\n");
            let out = c.import(&text).unwrap();
            assert_eq!(out.ids.len(), n + 2);
            let fresh = if n == 3 { 3 } else { n - 3 };
            assert_eq!((out.added, out.updated), (fresh, n + 2 - fresh), "{n}");
            let r = c.record(id).unwrap();
            assert!(r.disabled && r.added_unix_ms == added_at);
            assert_eq!(c.records.len(), n + 1);
            assert_eq!(reader.snapshot().len(), n);
        }
        // Held as written: a new catalog over the store reads the same.
        let store = Arc::clone(c.store());
        let held: Vec<Record> = c.records.values().cloned().collect();
        drop(c);
        let again = Catalog::load(store, HealthConfig::default()).unwrap();
        assert_eq!(again.records.values().cloned().collect::<Vec<_>>(), held);
    }

    #[test]
    fn invalid_input_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, reader) = catalog(dir.path());
        let e = c
            .add(&["http://10.0.0.1:1".into(), "gopher://u:pw@h:1".into()])
            .unwrap_err();
        assert_eq!(e.exit_code(), EXIT_DATA);
        assert!(e.to_string().contains("URL 2") && !e.to_string().contains("pw"));
        let e = c.import("http://10.0.0.2:1\nnot a url\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(reader.snapshot().is_empty() && c.rows().unwrap().is_empty());
    }

    fn checked(url: &str, passed: bool, at: u64) -> Checked {
        Checked {
            upstream: Upstream::parse(url).unwrap(),
            integrity_ok: passed,
            source: Some("list".into()),
            listed_anonymity: Some("anonymous".into()),
            passed,
            check: CheckRecord {
                checked_unix_ms: at,
                passed,
                anonymity: passed.then(|| "elite".into()),
                ..CheckRecord::default()
            },
        }
    }

    #[test]
    fn merge_imports_what_passed_and_remembers_failing_since() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, reader) = catalog(dir.path());
        let m = c
            .merge_checked(
                vec![
                    checked("http://8.8.8.8:80", true, 10),
                    checked("http://8.8.4.4:80", false, 10),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            (m.imported, m.checks),
            (1, 1),
            "a failed stranger is not kept"
        );
        assert_eq!(reader.snapshot().len(), 1, "live at once");
        let id = Upstream::parse("http://8.8.8.8:80").unwrap().id();
        let row = c.show(id).unwrap();
        assert_eq!(
            (row.origin, row.source.as_deref()),
            ("source", Some("list"))
        );
        assert_eq!(row.anonymity.as_deref(), Some("elite"));
        assert_eq!(row.listed_anonymity.as_deref(), Some("anonymous"));
        // Failing checks keep the first failure's time; a pass clears it.
        c.merge_checked(vec![checked("http://8.8.8.8:80", false, 20)], true)
            .unwrap();
        c.merge_checked(vec![checked("http://8.8.8.8:80", false, 30)], true)
            .unwrap();
        assert_eq!(c.check(id).unwrap().failing_since_unix_ms, Some(20));
        // Durable: a new catalog over the store sees the record and its check.
        let store = Arc::clone(c.store());
        drop(c);
        let again = Catalog::load(store, HealthConfig::default()).unwrap();
        assert_eq!(again.check(id).unwrap().failing_since_unix_ms, Some(20));
        assert_eq!(again.record(id).unwrap().origin, Origin::Source);
    }

    #[test]
    fn the_janitor_disables_and_deletes_list_upstreams_only() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, reader) = catalog(dir.path());
        let now = unix_ms();
        let hour = 3_600_000;
        c.merge_checked(
            vec![
                checked("http://8.8.8.8:80", true, now),
                checked("http://9.9.9.9:80", true, now),
            ],
            true,
        )
        .unwrap();
        c.add(&["http://1.1.1.1:80".into()]).unwrap();
        let dead = Upstream::parse("http://8.8.8.8:80").unwrap().id();
        let mine = Upstream::parse("http://1.1.1.1:80").unwrap().id();
        // 8.8.8.8 fails every check for two hours; so does the operator's 1.1.1.1.
        c.merge_checked(
            vec![
                checked("http://8.8.8.8:80", false, now - 2 * hour),
                Checked {
                    source: None,
                    ..checked("http://1.1.1.1:80", false, now - 2 * hour)
                },
            ],
            false,
        )
        .unwrap();
        let cfg = crate::janitor::Config::default();
        let swept = c.janitor(now, &cfg).unwrap();
        assert_eq!(swept.disabled.len(), 1, "{swept:?}");
        assert_eq!(swept.disabled[0].0, dead.to_string());
        assert!(swept.deleted.is_empty());
        assert!(
            c.show(mine).unwrap().state != "disabled",
            "an operator's upstream stays"
        );
        assert_eq!(reader.snapshot().len(), 2);
        // A passing check (the list names it again) enables it.
        let m = c
            .merge_checked(vec![checked("http://8.8.8.8:80", true, now)], true)
            .unwrap();
        assert_eq!(m.reenabled, 1);
        assert_eq!(reader.snapshot().len(), 3);
        // An operator's disable is not undone by a check.
        c.set_disabled(dead, true).unwrap();
        let m = c
            .merge_checked(vec![checked("http://8.8.8.8:80", true, now)], true)
            .unwrap();
        assert_eq!(m.reenabled, 0);
        // Eight days later, never used: list upstreams go, the operator's stays.
        let swept = c.janitor(now + 8 * 24 * hour, &cfg).unwrap();
        assert_eq!(swept.deleted.len(), 2, "{swept:?}");
        assert!(c.record(mine).is_ok());
        assert!(matches!(c.record(dead), Err(OpError::NotFound(_))));
        assert!(c.store().get(dead).unwrap().is_none(), "deleted durably");
    }

    #[test]
    fn strategy_is_kept_and_reset_to_the_configured_one() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, reader) = catalog(dir.path());
        assert_eq!(c.strategy().unwrap().set_by, "config");
        let v = c.set_strategy(Some("random")).unwrap();
        assert_eq!(
            (v.strategy.as_deref(), v.set_by),
            (Some("random"), "operator")
        );
        assert_eq!(reader.strategy(), Strategy::Random);
        assert!(matches!(
            c.set_strategy(Some("psychic")),
            Err(OpError::Usage(_))
        ));
        let v = c.set_strategy(None).unwrap();
        assert_eq!(v.set_by, "config");
        assert_eq!(reader.strategy(), Strategy::RoundRobin);
    }

    #[test]
    fn tiers_follow_integrity_and_leaks_demote() {
        let r = Record::new(
            Upstream::parse("http://8.8.8.8:80").unwrap(),
            Origin::Source,
            0,
        );
        let op = Record::new(r.upstream.clone(), Origin::Operator, 0);
        let policy = TrustPolicy {
            after_ms: 1000,
            checks: 2,
        };
        let check = |passes, since| CheckRecord {
            integrity_passes: passes,
            integrity_since_unix_ms: since,
            ..CheckRecord::default()
        };
        assert_eq!(tier_of(&r, None, &policy, 5000), Tier::Untrusted);
        assert_eq!(tier_of(&op, None, &policy, 5000), Tier::Operator);
        // Enough passes but not for long enough; long enough but too few; both.
        assert_eq!(
            tier_of(&r, Some(&check(5, Some(4500))), &policy, 5000),
            Tier::Untrusted
        );
        assert_eq!(
            tier_of(&r, Some(&check(1, Some(0))), &policy, 5000),
            Tier::Untrusted
        );
        assert_eq!(
            tier_of(&r, Some(&check(2, Some(4000))), &policy, 5000),
            Tier::Verified
        );
        let leaking = CheckRecord {
            leak: Some("reveals".into()),
            ..check(9, Some(0))
        };
        assert_eq!(tier_of(&r, Some(&leaking), &policy, 5000), Tier::Untrusted);
        assert_eq!(tier_of(&op, Some(&leaking), &policy, 5000), Tier::Untrusted);
    }

    #[test]
    fn tampering_quarantines_for_good_and_identities_reach_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let (c, reader) = catalog(dir.path());
        let mut c = c.with_trust(TrustPolicy {
            after_ms: 0,
            checks: 2,
        });
        let url = "http://8.8.8.8:80";
        let id = Upstream::parse(url).unwrap().id();
        let with_exit = |passed, at, exit: &str| {
            let mut k = checked(url, passed, at);
            k.check.exit_ip = Some(exit.into());
            k
        };
        c.merge_checked(vec![with_exit(true, 10, "203.0.113.7")], true)
            .unwrap();
        let e = Arc::clone(reader.snapshot().get(id).unwrap());
        assert_eq!(e.exit(), Some("203.0.113.7".parse().unwrap()));
        assert_eq!(
            e.tier(),
            Tier::Untrusted,
            "one integrity pass is not enough"
        );
        c.merge_checked(vec![with_exit(true, 20, "203.0.113.8")], false)
            .unwrap();
        let e = Arc::clone(reader.snapshot().get(id).unwrap());
        assert_eq!(e.tier(), Tier::Verified);
        assert_eq!(
            e.exit(),
            Some("203.0.113.8".parse().unwrap()),
            "exit followed"
        );
        assert_eq!(c.show(id).unwrap().tier, "verified");
        // Tampering: quarantined, out of the pool, and a later passing check does not bring
        // it back; an operator does.
        let mut bad = with_exit(false, 30, "203.0.113.8");
        bad.check.tampered = Some("TLS: swapped".into());
        let m = c.merge_checked(vec![bad], false).unwrap();
        assert_eq!(m.quarantined, 1);
        assert!(reader.snapshot().get(id).is_none());
        let row = c.show(id).unwrap();
        assert!(row.disabled_reason.unwrap().starts_with(QUARANTINED));
        assert_eq!(row.tier, "untrusted");
        let m = c
            .merge_checked(vec![with_exit(true, 40, "203.0.113.8")], false)
            .unwrap();
        assert_eq!(m.reenabled, 0);
        assert!(reader.snapshot().get(id).is_none());
        c.set_disabled(id, false).unwrap();
        assert!(reader.snapshot().get(id).is_some());
    }

    #[test]
    fn time_alone_promotes_and_the_janitor_publishes_it() {
        let dir = tempfile::tempdir().unwrap();
        let (c, reader) = catalog(dir.path());
        let mut c = c.with_trust(TrustPolicy {
            after_ms: 1000,
            checks: 1,
        });
        let url = "http://8.8.8.8:80";
        let id = Upstream::parse(url).unwrap().id();
        c.merge_checked(vec![checked(url, true, 10_000)], true)
            .unwrap();
        let tier = |r: &proxygate_pool::PoolReader| r.snapshot().get(id).unwrap().tier();
        // A streak that began now: verified 1 s from now, with no check in between.
        let now = unix_ms();
        let mut check = c.check(id).unwrap();
        check.integrity_since_unix_ms = Some(now);
        c.checks.insert(id, check.encode().into_boxed_slice());
        c.publish();
        assert_eq!(tier(&reader), Tier::Untrusted);
        let cfg = crate::janitor::Config::default();
        c.janitor(now + 500, &cfg).unwrap();
        assert_eq!(tier(&reader), Tier::Untrusted);
        c.janitor(now + 1500, &cfg).unwrap();
        assert_eq!(tier(&reader), Tier::Verified);
    }
}
