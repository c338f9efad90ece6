//! The root configuration: one TOML file whose sections belong to the components.
//!
//! | section       | owner                                  |
//! |---------------|----------------------------------------|
//! | `data_dir`    | the store (state lives there)          |
//! | `[server]`    | `proxygate_gateway::config::ServerConfig` |
//! | `[auth]`      | `proxygate_gateway::config::AuthConfig`   |
//! | `[dial]`      | `proxygate_gateway::config::DialConfig`   |
//! | `[pool]`      | [`PoolConfig`]                          |
//! | `[upstreams]` | [`UpstreamsConfig`]                     |
//! | `[store]`     | [`StoreConfig`]                         |
//! | `[log]`       | [`LogConfig`]                           |
//!
//! Every key has a compiled-in default (`config/default.toml` documents them), so no file is
//! needed. Loading reports every problem it can find at once, each as `file: key: reason`:
//! each section is read on its own, so one bad section does not hide another's errors, and
//! semantic checks run on whatever parsed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proxygate_core::Upstream;
use proxygate_gateway::config::{AuthConfig, DialConfig, Problem, ServerConfig};
use proxygate_pool::{HealthConfig, ReputationConfig, Strategy};
use serde::Deserialize;
use serde::de::DeserializeOwned;

pub(crate) const DEFAULT_DATA_DIR: &str = "./data";

/// The whole configuration.
#[derive(Debug, Clone)]
pub(crate) struct RootConfig {
    pub(crate) data_dir: PathBuf,
    pub(crate) gateway: proxygate_gateway::Config,
    pub(crate) pool: PoolConfig,
    pub(crate) upstreams: UpstreamsConfig,
    pub(crate) store: StoreConfig,
    pub(crate) log: LogConfig,
}

/// `[store]`: how live state reaches the data dir.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct StoreConfig {
    /// How often live reputation stats are written behind (in one batch); once more at
    /// shutdown. A crash loses at most this much of them; operator changes are durable first.
    #[serde(with = "humantime_serde")]
    pub(crate) stats_flush_interval: Duration,
}

pub(crate) const DEFAULT_STATS_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            stats_flush_interval: DEFAULT_STATS_FLUSH_INTERVAL,
        }
    }
}

/// `[pool]`: selection, health and reputation.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct PoolConfig {
    pub(crate) strategy: Strategy,
    /// Healthy needs at least this reputation (0-100)...
    pub(crate) healthy_reputation: u8,
    /// ...and fewer consecutive failures than this.
    pub(crate) max_consecutive_failures: u32,
    /// Backoff ceiling of an upstream that turned unhealthy; doubles per further failure
    /// (full jitter: the wait is uniform below the ceiling).
    #[serde(with = "humantime_serde")]
    pub(crate) backoff_base: Duration,
    /// Largest backoff ceiling.
    #[serde(with = "humantime_serde")]
    pub(crate) backoff_max: Duration,
    /// Weight of the newest sample in the success and response-time moving averages.
    pub(crate) ema_alpha: f64,
    /// What one failed attempt costs in fastest_response's expected time to a working
    /// connection (`rt + (1 - success) / success * failure_cost`); 0 ranks by response time
    /// alone.
    #[serde(with = "humantime_serde")]
    pub(crate) failure_cost: Duration,
    /// best_reputation and fastest_response re-measure an upstream unused for this long (one
    /// pick in 16 at most), so one bad sample does not exile it for good.
    #[serde(with = "humantime_serde")]
    pub(crate) remeasure_after: Duration,
    /// How often the orders used by best_reputation and fastest_response are refreshed.
    #[serde(with = "humantime_serde")]
    pub(crate) reindex_interval: Duration,
    /// How long a sticky session (`session-<id>` hint) keeps its upstream; `ttl-<s>` overrides.
    #[serde(with = "humantime_serde")]
    pub(crate) session_ttl: Duration,
    pub(crate) reputation: ReputationConfig,
}

pub(crate) const DEFAULT_REINDEX_INTERVAL: Duration = Duration::from_secs(1);
pub(crate) const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(600);

impl Default for PoolConfig {
    fn default() -> Self {
        let h = HealthConfig::default();
        Self {
            strategy: Strategy::default(),
            healthy_reputation: h.healthy_reputation,
            max_consecutive_failures: h.max_consecutive_failures,
            backoff_base: h.backoff_base,
            backoff_max: h.backoff_max,
            ema_alpha: h.ema_alpha,
            failure_cost: h.failure_cost,
            remeasure_after: h.remeasure_after,
            reindex_interval: DEFAULT_REINDEX_INTERVAL,
            session_ttl: DEFAULT_SESSION_TTL,
            reputation: ReputationConfig::default(),
        }
    }
}

impl PoolConfig {
    pub(crate) fn health(&self) -> HealthConfig {
        HealthConfig {
            reputation: self.reputation.clone(),
            healthy_reputation: self.healthy_reputation,
            max_consecutive_failures: self.max_consecutive_failures,
            backoff_base: self.backoff_base,
            backoff_max: self.backoff_max,
            ema_alpha: self.ema_alpha,
            failure_cost: self.failure_cost,
            remeasure_after: self.remeasure_after,
        }
    }
}

/// `[upstreams]`: the operator's own upstreams.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct UpstreamsConfig {
    /// Upstream URLs. Prefer `files` for upstreams with passwords: keep secrets out of config.
    pub(crate) urls: Vec<String>,
    /// Files of one URL per line (`#` comments and blank lines skipped).
    pub(crate) files: Vec<PathBuf>,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct LogConfig {
    /// A tracing filter: `info`, `debug`, `proxygate_gateway=debug,info`... `RUST_LOG` wins.
    pub(crate) level: String,
    pub(crate) format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Default for RootConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            gateway: proxygate_gateway::Config::default(),
            pool: PoolConfig::default(),
            upstreams: UpstreamsConfig::default(),
            store: StoreConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// Every problem found in a configuration, ready to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigErrors {
    pub(crate) source: String,
    pub(crate) problems: Vec<Problem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {}: {}", self.source, p.key, p.reason)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

const SECTIONS: [&str; 8] = [
    "data_dir",
    "server",
    "auth",
    "dial",
    "pool",
    "upstreams",
    "store",
    "log",
];

impl RootConfig {
    /// Reads a config file (syntax, keys, types; the semantic checks are
    /// [`RootConfig::validate`]'s, after command-line overrides). Sections with problems keep
    /// their defaults, so the semantic checks can still run on the rest.
    pub(crate) fn load(path: &Path) -> (RootConfig, Vec<Problem>) {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text),
            Err(e) => (
                RootConfig::default(),
                vec![Problem::new("(file)", format!("cannot read: {e}"))],
            ),
        }
    }

    /// Parses TOML text, collecting the problems of every section.
    pub(crate) fn parse(text: &str) -> (RootConfig, Vec<Problem>) {
        let mut cfg = RootConfig::default();
        let table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => return (cfg, vec![Problem::new("(syntax)", one_line(&e))]),
        };
        let mut problems = Vec::new();
        for key in table.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                problems.push(Problem::new(
                    key.clone(),
                    format!("unknown key (expected one of: {})", SECTIONS.join(", ")),
                ));
            }
        }
        if let Some(v) = table.get("data_dir") {
            match v.as_str() {
                Some(s) => cfg.data_dir = PathBuf::from(s),
                None => problems.push(Problem::new("data_dir", "expected a string (a path)")),
            }
        }
        section::<ServerConfig>(&table, "server", &mut problems, &mut cfg.gateway.server);
        section::<AuthConfig>(&table, "auth", &mut problems, &mut cfg.gateway.auth);
        section::<DialConfig>(&table, "dial", &mut problems, &mut cfg.gateway.dial);
        section::<PoolConfig>(&table, "pool", &mut problems, &mut cfg.pool);
        section::<UpstreamsConfig>(&table, "upstreams", &mut problems, &mut cfg.upstreams);
        section::<StoreConfig>(&table, "store", &mut problems, &mut cfg.store);
        section::<LogConfig>(&table, "log", &mut problems, &mut cfg.log);
        (cfg, problems)
    }

    /// Semantic checks of the final configuration, and the upstreams it names, which are
    /// returned parsed.
    pub(crate) fn validate(&self) -> Result<Vec<Upstream>, Vec<Problem>> {
        let mut problems = self.gateway.validate();
        if self.pool.backoff_base.is_zero() {
            problems.push(Problem::new("pool.backoff_base", "must be longer than 0"));
        }
        if self.pool.backoff_max < self.pool.backoff_base {
            problems.push(Problem::new(
                "pool.backoff_max",
                "must be at least pool.backoff_base",
            ));
        }
        let pool = &self.pool;
        if pool.healthy_reputation > 100 {
            problems.push(Problem::new("pool.healthy_reputation", "must be 0-100"));
        }
        if pool.max_consecutive_failures == 0 {
            problems.push(Problem::new(
                "pool.max_consecutive_failures",
                "must be at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&pool.ema_alpha) || pool.ema_alpha == 0.0 {
            problems.push(Problem::new("pool.ema_alpha", "must be in (0, 1]"));
        }
        if pool.session_ttl.is_zero() {
            problems.push(Problem::new("pool.session_ttl", "must be longer than 0"));
        }
        if pool.remeasure_after.is_zero() {
            problems.push(Problem::new(
                "pool.remeasure_after",
                "must be longer than 0",
            ));
        }
        if pool.reindex_interval.is_zero() {
            problems.push(Problem::new(
                "pool.reindex_interval",
                "must be longer than 0",
            ));
        }
        let rep = &pool.reputation;
        if rep.fast_ms.partial_cmp(&rep.slow_ms) != Some(std::cmp::Ordering::Less) {
            problems.push(Problem::new(
                "pool.reputation.slow_ms",
                "must be greater than pool.reputation.fast_ms",
            ));
        }
        if rep.uses_per_point == 0 {
            problems.push(Problem::new(
                "pool.reputation.uses_per_point",
                "must be at least 1",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            problems.push(Problem::new("log.level", format!("invalid filter: {e}")));
        }
        if self.store.stats_flush_interval.is_zero() {
            problems.push(Problem::new(
                "store.stats_flush_interval",
                "must be longer than 0",
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            problems.push(Problem::new("data_dir", "must not be empty"));
        }
        let mut upstreams = Vec::new();
        for (i, url) in self.upstreams.urls.iter().enumerate() {
            match Upstream::parse(url) {
                Ok(u) => upstreams.push(u),
                Err(e) => {
                    problems.push(Problem::new(format!("upstreams.urls[{i}]"), e.to_string()))
                }
            }
        }
        for (i, file) in self.upstreams.files.iter().enumerate() {
            match read_upstreams_file(file) {
                Ok(list) => upstreams.extend(list),
                Err(errs) => problems.extend(
                    errs.into_iter()
                        .map(|reason| Problem::new(format!("upstreams.files[{i}]"), reason)),
                ),
            }
        }
        if problems.is_empty() {
            Ok(upstreams)
        } else {
            Err(problems)
        }
    }
}

fn section<T: DeserializeOwned>(
    table: &toml::Table,
    name: &str,
    problems: &mut Vec<Problem>,
    into: &mut T,
) {
    let Some(value) = table.get(name) else {
        return;
    };
    if !value.is_table() {
        problems.push(Problem::new(name, "expected a table"));
        return;
    }
    // Re-serialize the section alone so toml's deserializer reports the failing key.
    let text = match toml::to_string(value) {
        Ok(t) => t,
        Err(e) => {
            problems.push(Problem::new(name, e.to_string()));
            return;
        }
    };
    match toml::from_str::<T>(&text) {
        Ok(v) => *into = v,
        Err(e) => {
            let (key, msg) = section_error(&e, &text);
            let key = key.map_or_else(|| name.to_owned(), |k| format!("{name}.{k}"));
            problems.push(Problem::new(key, msg));
        }
    }
}

/// The failing key inside a section (from toml's span or an "unknown field" message), and
/// toml's message.
fn section_error(e: &toml::de::Error, text: &str) -> (Option<String>, String) {
    let msg = e.message().trim().replace('\n', " ");
    let unknown = msg
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(k, _)| k.to_owned());
    let span = e.span();
    // A nested table (`[reputation]` inside `[pool]`) prefixes the key.
    let header = span
        .as_ref()
        .and_then(|sp| text.get(..sp.end))
        .and_then(|upto| {
            upto.lines()
                .rev()
                .find(|l| l.trim_start().starts_with('['))
                .map(|l| l.trim().trim_matches(['[', ']']).to_owned())
        });
    let spanned = || {
        let before = text.get(..span.as_ref()?.start)?;
        let line = before.lines().last()?.trim();
        if line.starts_with('[') {
            return None;
        }
        let key = line.split_once('=').map_or(line, |(k, _)| k).trim();
        (!key.is_empty()).then(|| key.trim_matches('"').to_owned())
    };
    let key = unknown.or_else(spanned);
    let key = match (header, key) {
        (Some(h), Some(k)) => Some(format!("{h}.{k}")),
        (Some(h), None) => Some(h),
        (None, k) => k,
    };
    (key, msg)
}

fn one_line(e: &toml::de::Error) -> String {
    e.to_string()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads a file of upstream URLs: one per line, `#` comments and blank lines skipped. Every
/// bad line is reported as `path:line: reason`.
pub(crate) fn read_upstreams_file(path: &Path) -> Result<Vec<Upstream>, Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
    parse_upstreams(&text).map_err(|errs| {
        errs.into_iter()
            .map(|(line, reason)| format!("{}:{line}: {reason}", path.display()))
            .collect()
    })
}

/// Parses upstream-list text; errors are `(line number, reason)`.
pub(crate) fn parse_upstreams(text: &str) -> Result<Vec<Upstream>, Vec<(usize, String)>> {
    let mut ok = Vec::new();
    let mut errs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match Upstream::parse(line) {
            Ok(u) => ok.push(u),
            Err(e) => errs.push((i + 1, e.to_string())),
        }
    }
    if errs.is_empty() { Ok(ok) } else { Err(errs) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys `validate` names, which must refuse `c`.
    fn invalid_keys(c: &RootConfig) -> Vec<String> {
        c.validate()
            .unwrap_err()
            .into_iter()
            .map(|p| p.key)
            .collect()
    }

    #[test]
    fn embedded_default_file_matches_compiled_defaults() {
        let text = include_str!("../../../config/default.toml");
        let (parsed, problems) = RootConfig::parse(text);
        assert!(problems.is_empty(), "{problems:?}");
        let d = RootConfig::default();
        assert_eq!(format!("{parsed:?}"), format!("{d:?}"));
    }

    #[test]
    fn empty_file_is_defaults() {
        let (c, problems) = RootConfig::parse("");
        assert!(problems.is_empty());
        assert_eq!(
            c.gateway.server.listen,
            vec!["127.0.0.1:8080".parse().unwrap()]
        );
        assert!(c.validate().unwrap().is_empty());
    }

    #[test]
    fn reports_every_section_problem_with_keys() {
        let text = r#"
            bogus = 1
            [server]
            max_connections = "many"
            [dial]
            conect_timeout = "5s"
            [pool]
            strategy = "fastest"
            [log]
            format = "text"
        "#;
        let (_, problems) = RootConfig::parse(text);
        let rendered: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {}", p.key, p.reason))
            .collect();
        assert_eq!(problems.len(), 4, "{rendered:#?}");
        assert!(rendered[0].starts_with("bogus: unknown key"));
        assert!(
            rendered[1].starts_with("server.max_connections: invalid type"),
            "{}",
            rendered[1]
        );
        assert!(
            rendered[2].starts_with("dial.conect_timeout: unknown field"),
            "{}",
            rendered[2]
        );
        assert!(
            rendered[3].starts_with("pool.strategy: unknown variant `fastest`"),
            "{}",
            rendered[3]
        );
    }

    #[test]
    fn nested_keys_are_named_in_full() {
        let (_, p) = RootConfig::parse("[pool.reputation]\nbase = 40.0\nfoo = 1\n");
        assert_eq!(p[0].key, "pool.reputation.foo", "{p:?}");
        let (_, p) = RootConfig::parse("[pool.reputation]\nbase = \"x\"\n");
        assert_eq!(p[0].key, "pool.reputation.base", "{p:?}");
        let (c, p) = RootConfig::parse("[pool.reputation]\nbase = 40.0\n");
        assert!(p.is_empty());
        assert_eq!(c.pool.reputation.base, 40.0);
    }

    #[test]
    fn semantic_problems_name_keys() {
        let (mut c, problems) = RootConfig::parse(
            r#"
            [server]
            listen = ["0.0.0.0:8080"]
            [upstreams]
            urls = ["http://ok:1", "ftp://u:secret@bad:1"]
            "#,
        );
        assert!(problems.is_empty());
        c.pool.backoff_max = std::time::Duration::from_millis(1);
        let problems = c.validate().unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["server.listen", "pool.backoff_max", "upstreams.urls[1]"]
        );
        assert!(problems.iter().all(|p| !p.reason.contains("secret")));
    }

    #[test]
    fn selection_costs_parse_and_are_checked() {
        let (c, p) =
            RootConfig::parse("[pool]\nfailure_cost = \"250ms\"\nremeasure_after = \"5m\"\n");
        assert!(p.is_empty(), "{p:?}");
        let h = c.pool.health();
        assert_eq!(h.failure_cost, std::time::Duration::from_millis(250));
        assert_eq!(h.remeasure_after, std::time::Duration::from_secs(300));
        let (c, p) = RootConfig::parse("[pool]\nfailure_cost = \"0s\"\nremeasure_after = \"0s\"\n");
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(
            invalid_keys(&c),
            ["pool.remeasure_after"],
            "a zero failure cost is allowed"
        );
        let (_, p) = RootConfig::parse("[pool]\nfailure_cost = \"soon\"\n");
        assert_eq!(p[0].key, "pool.failure_cost", "{p:?}");
    }

    #[test]
    fn store_section_is_checked() {
        let (_, p) = RootConfig::parse("[store]\nstats_flush_intervl = \"5s\"\n");
        assert!(p[0].key == "store.stats_flush_intervl", "{p:?}");
        let (c, p) = RootConfig::parse("[store]\nstats_flush_interval = \"0s\"\n");
        assert!(p.is_empty());
        assert_eq!(invalid_keys(&c), ["store.stats_flush_interval"]);
    }

    #[test]
    fn upstream_lists_report_every_bad_line() {
        let text = "# pool\nhttp://a:1\n\nsocks5://u:p@b:2\nnot a url\nhttp://c:99999\n";
        let errs = parse_upstreams(text).unwrap_err();
        assert_eq!(errs.iter().map(|e| e.0).collect::<Vec<_>>(), [5, 6]);
        assert_eq!(parse_upstreams("http://a:1\n# x\n").unwrap().len(), 1);
    }
}
