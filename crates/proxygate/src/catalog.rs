//! [`Catalog`]: the operator's commands on the pool, over the store and (when the gateway
//! runs) the live pool. The same code answers `proxygate pool ...` on a stopped data dir and,
//! through the control socket, inside the running gateway.
//!
//! Every change is written and flushed to the store before it is acknowledged, then published
//! to the live pool. The persister ([`persist`]) writes live stats behind in batches.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use proxygate_core::{Upstream, UpstreamId};
use proxygate_pool::{Entry, HealthConfig, PoolWriter, Saved, Strategy};
use proxygate_store::{Origin, Record, Stats, Store, StoreError};
use serde::{Deserialize, Serialize};

/// sysexits(3) EX_DATAERR: an URL or an import line is invalid.
pub(crate) const EXIT_DATA: u8 = 65;

/// One operator command. Serialized as JSON over the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Op {
    Add { urls: Vec<String> },
    Import { text: String },
    List { json: bool },
    Show { id: String, json: bool },
    Remove { id: String },
    Disable { id: String },
    Enable { id: String },
    Export { decrypt: bool },
    Strategy { name: Option<String>, reset: bool },
}

/// What a command prints and its exit code.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Reply {
    pub(crate) code: u8,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// The operator's view of the pool.
#[derive(Debug)]
pub(crate) struct Catalog {
    store: Arc<Store>,
    /// Every record, disabled ones included: publishing never decrypts.
    records: BTreeMap<UpstreamId, Record>,
    live: Option<Live>,
    health: HealthConfig,
}

/// The running gateway's side.
#[derive(Debug)]
struct Live {
    pool: PoolWriter,
    /// The strategy the config (or `--strategy`) chose, restored by `strategy --reset`.
    configured: Strategy,
}

/// One upstream as `pool list --json` and `pool show --json` print it.
#[derive(Debug, Serialize)]
struct Row {
    id: String,
    scheme: &'static str,
    address: String,
    country: Option<String>,
    proxy_type: &'static str,
    reputation: u8,
    success_rate: Option<f64>,
    avg_latency_ms: Option<f64>,
    uses: u64,
    failures: u64,
    consecutive_failures: u32,
    state: &'static str,
    origin: &'static str,
    added_unix_ms: u64,
    last_used_unix_ms: Option<u64>,
    last_health_check_unix_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_flight: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backoff_left_ms: Option<u64>,
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
    #[serde(default)]
    stats: Option<Stats>,
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) fn to_saved(s: &Stats) -> Saved {
    Saved {
        success_rate: s.success_rate,
        response_time_ms: s.response_time_avg_ms,
        consecutive_failures: s.consecutive_failures,
        successes: s.total_uses.saturating_sub(s.failures),
        failures: s.failures,
    }
}

/// An entry's live stats in the store's shape (`previous` supplies what the pool does not
/// track).
pub(crate) fn live_stats(e: &Entry, now: Instant, now_unix: u64, previous: &Stats) -> Stats {
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
        last_used_unix_ms: e.since_last_use(now).map(at).or(previous.last_used_unix_ms),
        last_health_check_unix_ms: e
            .since_last_check(now)
            .map(at)
            .or(previous.last_health_check_unix_ms),
    }
}

fn ok(stdout: String) -> Reply {
    Reply {
        code: 0,
        stdout,
        stderr: String::new(),
    }
}

fn fail(code: u8, stderr: impl Into<String>) -> Reply {
    Reply {
        code,
        stdout: String::new(),
        stderr: stderr.into(),
    }
}

fn store_fail(e: &StoreError) -> Reply {
    fail(1, format!("proxygate: {e}"))
}

impl Catalog {
    /// Reads every record (all must decrypt).
    pub(crate) fn load(store: Arc<Store>, health: HealthConfig) -> Result<Catalog, StoreError> {
        let records = store
            .records()?
            .into_iter()
            .map(|r| (r.upstream.id(), r))
            .collect();
        Ok(Catalog {
            store,
            records,
            live: None,
            health,
        })
    }

    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Makes the store hold exactly the config's upstreams among those of origin `Config`
    /// (operator-added ones are left alone); durable when it returns. Returns (added or
    /// changed, removed).
    pub(crate) fn sync_config(
        &mut self,
        upstreams: &[Upstream],
    ) -> Result<(usize, usize), StoreError> {
        let mut wanted = HashMap::new();
        for u in upstreams {
            wanted.entry(u.id()).or_insert(u);
        }
        let (mut changed, mut removed) = (0, 0);
        for (id, u) in &wanted {
            let record = match self.records.get(id) {
                Some(r) if r.upstream == **u => continue,
                Some(r) => Record {
                    upstream: (*u).clone(),
                    ..r.clone()
                },
                None => Record {
                    upstream: (*u).clone(),
                    disabled: false,
                    origin: Origin::Config,
                    added_unix_ms: unix_ms(),
                },
            };
            self.store.put(&record)?;
            self.records.insert(*id, record);
            changed += 1;
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
        Ok((changed, removed))
    }

    /// Attaches the live pool and publishes the enabled upstreams to it, with their saved
    /// stats.
    pub(crate) fn attach(&mut self, pool: PoolWriter, configured: Strategy) {
        self.live = Some(Live { pool, configured });
        self.publish();
    }

    /// Publishes the enabled records to the live pool. Upstreams new to it start from their
    /// stored stats; the others keep their live ones.
    fn publish(&self) {
        let Some(live) = &self.live else { return };
        let items: Vec<(Upstream, Option<Saved>)> = {
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
                    (r.upstream.clone(), saved)
                })
                .collect()
        };
        live.pool.replace_saved(items);
    }

    pub(crate) fn enabled(&self) -> usize {
        self.records.values().filter(|r| !r.disabled).count()
    }

    pub(crate) fn execute(&mut self, op: &Op) -> Reply {
        let result = match op {
            Op::Add { urls } => self.add(urls),
            Op::Import { text } => self.import(text),
            Op::List { json } => self.list(*json),
            Op::Show { id, json } => self.show(id, *json),
            Op::Remove { id } => self.remove(id),
            Op::Disable { id } => self.set_disabled(id, true),
            Op::Enable { id } => self.set_disabled(id, false),
            Op::Export { decrypt } => self.export(*decrypt),
            Op::Strategy { name, reset } => self.strategy(name.as_deref(), *reset),
        };
        let reply = result.unwrap_or_else(|e| store_fail(&e));
        let mutates = !matches!(
            op,
            Op::List { .. }
                | Op::Show { .. }
                | Op::Export { .. }
                | Op::Strategy {
                    name: None,
                    reset: false
                }
        );
        if mutates && reply.code == 0 {
            // An audit line: what changed (ids and counts, never a URL).
            let summary = reply.stdout.lines().next().unwrap_or_default();
            tracing::info!(live = self.live.is_some(), "operator: {summary}");
        }
        reply
    }

    /// A full id, or a unique prefix of at least 4 hex digits.
    fn resolve(&self, text: &str) -> Result<UpstreamId, Reply> {
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
            [] => Err(fail(1, format!("proxygate: no upstream with id {text:?}"))),
            _ => Err(fail(
                1,
                format!(
                    "proxygate: {text:?} matches {} upstreams; give more digits",
                    matches.len()
                ),
            )),
        }
    }

    fn put_all(
        &mut self,
        records: Vec<Record>,
        stats: Vec<(UpstreamId, Stats)>,
    ) -> Result<(usize, usize), StoreError> {
        let (mut added, mut updated) = (0, 0);
        for mut r in records {
            let id = r.upstream.id();
            if let Some(old) = self.records.get(&id) {
                // Re-adding keeps what the operator set (disabled) and when it came.
                r.disabled |= old.disabled;
                r.added_unix_ms = old.added_unix_ms;
                updated += 1;
            } else {
                added += 1;
            }
            self.store.put(&r)?;
            self.records.insert(id, r);
        }
        if !stats.is_empty() {
            self.store
                .write_stats(stats.iter().map(|(id, s)| (*id, s)))?;
        }
        self.store.flush()?;
        self.publish();
        Ok((added, updated))
    }

    fn add(&mut self, urls: &[String]) -> Result<Reply, StoreError> {
        let mut records = Vec::new();
        let mut errors = String::new();
        for (i, url) in urls.iter().enumerate() {
            match Upstream::parse(url) {
                Ok(upstream) => records.push(Record {
                    upstream,
                    disabled: false,
                    origin: Origin::Operator,
                    added_unix_ms: unix_ms(),
                }),
                // The URL itself may hold a password: name it by position only.
                Err(e) => {
                    let _ = writeln!(errors, "proxygate: URL {}: {e}", i + 1);
                }
            }
        }
        if !errors.is_empty() {
            errors.push_str("proxygate: nothing was added\n");
            return Ok(fail(EXIT_DATA, errors));
        }
        let ids: Vec<String> = records
            .iter()
            .map(|r| r.upstream.id().to_string())
            .collect();
        let (added, updated) = self.put_all(records, Vec::new())?;
        let mut out = format!("added {added}, updated {updated}\n");
        for id in ids {
            let _ = writeln!(out, "{id}");
        }
        Ok(ok(out))
    }

    fn import(&mut self, text: &str) -> Result<Reply, StoreError> {
        let mut records = Vec::new();
        let mut stats = Vec::new();
        let mut errors = String::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parsed = if line.starts_with('{') {
                self.import_line(line)
            } else {
                Upstream::parse(line)
                    .map(|upstream| {
                        (
                            Record {
                                upstream,
                                disabled: false,
                                origin: Origin::Operator,
                                added_unix_ms: unix_ms(),
                            },
                            None,
                        )
                    })
                    .map_err(|e| e.to_string())
            };
            match parsed {
                Ok((record, s)) => {
                    if let Some(s) = s {
                        stats.push((record.upstream.id(), s));
                    }
                    records.push(record);
                }
                Err(e) => {
                    let _ = writeln!(errors, "proxygate: line {}: {e}", n + 1);
                }
            }
        }
        if !errors.is_empty() {
            errors.push_str("proxygate: nothing was imported\n");
            return Ok(fail(EXIT_DATA, errors));
        }
        let (added, updated) = self.put_all(records, stats)?;
        Ok(ok(format!("imported: added {added}, updated {updated}\n")))
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
            _ => Origin::Operator,
        };
        Ok((
            Record {
                upstream,
                disabled: e.disabled,
                origin,
                added_unix_ms: e.added_unix_ms,
            },
            e.stats,
        ))
    }

    fn row(&self, r: &Record, stored: &Stats, detail: bool) -> Row {
        let id = r.upstream.id();
        let now = Instant::now();
        let entry = self
            .live
            .as_ref()
            .and_then(|l| l.pool.reader().snapshot().get(id).cloned());
        let stats = match &entry {
            Some(e) => live_stats(e, now, unix_ms(), stored),
            None => stored.clone(),
        };
        let healthy = stats.reputation >= self.health.healthy_reputation
            && stats.consecutive_failures < self.health.max_consecutive_failures;
        let state = match &entry {
            _ if r.disabled => "disabled",
            Some(e) if e.backoff_left(now).is_some() => "backoff",
            Some(e) if e.health.is_on_probation() => "probation",
            _ if healthy => "healthy",
            _ => "unhealthy",
        };
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
            state,
            origin: r.origin.as_str(),
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
        }
    }

    fn list(&self, json: bool) -> Result<Reply, StoreError> {
        let stored = self.store.all_stats()?;
        let rows: Vec<Row> = self
            .records
            .values()
            .map(|r| {
                self.row(
                    r,
                    &stored.get(&r.upstream.id()).cloned().unwrap_or_default(),
                    false,
                )
            })
            .collect();
        if json {
            return Ok(ok(format!(
                "{}\n",
                serde_json::to_string_pretty(&rows).unwrap_or_default()
            )));
        }
        let mut out = format!(
            "{:<16}  {:<7}  {:<28}  {:<7}  {:>3}  {:>7}  {:>9}  {:>7}  {}\n",
            "ID", "SCHEME", "ADDRESS", "COUNTRY", "REP", "SUCCESS", "LATENCY", "USES", "STATE"
        );
        for r in &rows {
            let _ = writeln!(
                out,
                "{:<16}  {:<7}  {:<28}  {:<7}  {:>3}  {:>7}  {:>9}  {:>7}  {}",
                r.id,
                r.scheme,
                r.address,
                r.country.as_deref().unwrap_or("-"),
                r.reputation,
                r.success_rate
                    .map_or("-".into(), |s| format!("{:.1}%", s * 100.0)),
                r.avg_latency_ms
                    .map_or("-".into(), |ms| format!("{ms:.0}ms")),
                r.uses,
                r.state
            );
        }
        Ok(ok(out))
    }

    fn show(&self, id: &str, json: bool) -> Result<Reply, StoreError> {
        let id = match self.resolve(id) {
            Ok(id) => id,
            Err(reply) => return Ok(reply),
        };
        let Some(r) = self.records.get(&id) else {
            return Ok(fail(1, format!("proxygate: no upstream with id {id}")));
        };
        let row = self.row(r, &self.store.stats(id)?, true);
        let value = serde_json::to_value(&row).unwrap_or_default();
        if json {
            return Ok(ok(format!(
                "{}\n",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            )));
        }
        let mut out = String::new();
        if let serde_json::Value::Object(map) = value {
            for (k, v) in map {
                let v = match v {
                    serde_json::Value::Null => "-".to_owned(),
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                let _ = writeln!(out, "{k:<26} {v}");
            }
        }
        Ok(ok(out))
    }

    fn remove(&mut self, id: &str) -> Result<Reply, StoreError> {
        let id = match self.resolve(id) {
            Ok(id) => id,
            Err(reply) => return Ok(reply),
        };
        if !self.store.remove(id)? {
            return Ok(fail(1, format!("proxygate: no upstream with id {id}")));
        }
        self.store.flush()?;
        self.records.remove(&id);
        self.publish();
        Ok(ok(format!("removed {id}\n")))
    }

    fn set_disabled(&mut self, id: &str, disabled: bool) -> Result<Reply, StoreError> {
        let id = match self.resolve(id) {
            Ok(id) => id,
            Err(reply) => return Ok(reply),
        };
        if !self.store.set_disabled(id, disabled)? {
            return Ok(fail(1, format!("proxygate: no upstream with id {id}")));
        }
        self.store.flush()?;
        if let Some(r) = self.records.get_mut(&id) {
            r.disabled = disabled;
        }
        self.publish();
        let verb = if disabled { "disabled" } else { "enabled" };
        Ok(ok(format!("{verb} {id}\n")))
    }

    fn export(&self, decrypt: bool) -> Result<Reply, StoreError> {
        let stored = self.store.all_stats()?;
        let mut out = String::new();
        for (id, r) in &self.records {
            let mut upstream = r.upstream.clone();
            let credentials = if decrypt {
                None
            } else {
                upstream.credentials = None;
                self.store.sealed(*id)?
            };
            let stats = match &self.live {
                Some(l) => l.pool.reader().snapshot().get(*id).map(|e| {
                    live_stats(
                        e,
                        Instant::now(),
                        unix_ms(),
                        &stored.get(id).cloned().unwrap_or_default(),
                    )
                }),
                None => None,
            }
            .or_else(|| stored.get(id).cloned());
            let line = ExportLine {
                id: id.to_string(),
                url: upstream.expose_url(),
                credentials,
                disabled: r.disabled,
                origin: Some(r.origin.as_str().to_owned()),
                added_unix_ms: r.added_unix_ms,
                stats,
            };
            let _ = writeln!(out, "{}", serde_json::to_string(&line).unwrap_or_default());
        }
        Ok(ok(out))
    }

    fn strategy(&mut self, name: Option<&str>, reset: bool) -> Result<Reply, StoreError> {
        if reset {
            self.store.set_setting("strategy", None)?;
            self.store.flush()?;
            return Ok(ok(match &self.live {
                Some(l) => {
                    l.pool.set_strategy(l.configured);
                    format!("strategy reset: {} (from the config), live\n", l.configured)
                }
                None => "strategy reset: the config's pool.strategy applies from the next start\n"
                    .into(),
            }));
        }
        let Some(name) = name else {
            let stored = self.store.setting("strategy")?;
            let current = match (&self.live, stored) {
                (Some(l), _) => l.pool.reader().strategy().to_string(),
                (None, Some(s)) => s,
                (None, None) => "(none set: the config's pool.strategy applies)".into(),
            };
            return Ok(ok(format!("{current}\n")));
        };
        let strategy: Strategy = match name.parse() {
            Ok(s) => s,
            Err(e) => return Ok(fail(crate::EXIT_CONFIG, format!("proxygate: {e}"))),
        };
        self.store
            .set_setting("strategy", Some(strategy.as_str()))?;
        self.store.flush()?;
        Ok(ok(match &self.live {
            Some(l) => {
                l.pool.set_strategy(strategy);
                format!("strategy set to {strategy}, live\n")
            }
            None => format!("strategy set to {strategy}; it applies from the next start\n"),
        }))
    }
}

/// Writes the live stats of every upstream used since the last call, in one batch. Returns
/// how many were written.
pub(crate) fn persist(
    store: &Store,
    pool: &proxygate_pool::PoolReader,
) -> Result<usize, StoreError> {
    let snap = pool.snapshot();
    let now = Instant::now();
    let now_unix = unix_ms();
    let dirty: Vec<&Entry> = snap
        .entries()
        .iter()
        .filter(|e| e.health.take_dirty())
        .map(|e| &**e)
        .collect();
    if dirty.is_empty() {
        return Ok(0);
    }
    let written = dirty
        .iter()
        .map(|e| Ok((e.id, live_stats(e, now, now_unix, &store.stats(e.id)?))))
        .collect::<Result<Vec<_>, StoreError>>()
        .and_then(|batch| store.write_stats(batch.iter().map(|(id, s)| (*id, s))));
    if written.is_err() {
        // Not written: the next interval (or the shutdown flush) tries them again.
        for e in &dirty {
            e.health.mark_dirty();
        }
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxygate_core::Outcome;
    use proxygate_pool::Pool;

    fn catalog(dir: &std::path::Path) -> (Catalog, proxygate_pool::PoolReader) {
        let (store, _) = Store::open(dir, None).unwrap();
        let mut c = Catalog::load(Arc::new(store), HealthConfig::default()).unwrap();
        let (reader, writer) = Pool::create(Strategy::RoundRobin, HealthConfig::default());
        c.attach(writer, Strategy::RoundRobin);
        (c, reader)
    }

    #[test]
    fn persist_writes_only_what_changed_and_restores() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, reader) = catalog(dir.path());
        let reply = c.execute(&Op::Add {
            urls: vec!["http://10.0.0.1:1".into(), "http://10.0.0.2:1".into()],
        });
        assert_eq!(reply.code, 0, "{}", reply.stderr);
        assert_eq!(reader.snapshot().len(), 2, "published live");
        assert_eq!(persist(c.store(), &reader).unwrap(), 0, "nothing used yet");
        let lease = reader.select(&[]).unwrap();
        let id = lease.id();
        lease.report(&Outcome {
            connect: Some(std::time::Duration::from_millis(20)),
            handshake: Some(std::time::Duration::ZERO),
            ..Outcome::default()
        });
        assert_eq!(persist(c.store(), &reader).unwrap(), 1);
        assert_eq!(persist(c.store(), &reader).unwrap(), 0, "written once");
        let saved = c.store().stats(id).unwrap();
        assert_eq!((saved.total_uses, saved.failures), (1, 0));
        assert!(saved.last_used_unix_ms.is_some() && saved.last_health_check_unix_ms.is_some());
        let live_rep = reader.snapshot().get(id).unwrap().health.reputation();
        assert_eq!(saved.reputation, live_rep);

        // A fresh pool over the same store starts from the saved stats.
        let store = Arc::clone(c.store());
        drop(c);
        let mut again = Catalog::load(store, HealthConfig::default()).unwrap();
        let (reader, writer) = Pool::create(Strategy::RoundRobin, HealthConfig::default());
        again.attach(writer, Strategy::RoundRobin);
        let snap = reader.snapshot();
        let h = &snap.get(id).unwrap().health;
        assert_eq!((h.total_uses(), h.reputation()), (1, live_rep));
        assert!(!h.is_on_probation());
    }

    #[test]
    fn disabled_upstreams_leave_the_live_pool() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, reader) = catalog(dir.path());
        c.execute(&Op::Add {
            urls: vec!["http://10.0.0.1:1".into()],
        });
        let id = reader.snapshot().entries()[0].id.to_string();
        assert_eq!(c.execute(&Op::Disable { id: id.clone() }).code, 0);
        assert!(reader.snapshot().is_empty());
        assert_eq!(c.execute(&Op::Enable { id: id[..5].into() }).code, 0);
        assert_eq!(reader.snapshot().len(), 1);
        assert_eq!(c.execute(&Op::Remove { id: "zzzz".into() }).code, 1);
        assert_eq!(c.execute(&Op::Remove { id }).code, 0);
        assert!(reader.snapshot().is_empty());
    }
}
