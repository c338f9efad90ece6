//! The root configuration: one TOML file whose sections belong to the components. Each crate
//! deserializes and validates its own section; this file only assembles them.
//!
//! | section       | owner                                     |
//! |---------------|-------------------------------------------|
//! | `data_dir`    | the store (state lives there)             |
//! | `[server]`    | `proxygate_gateway::config::ServerConfig` |
//! | `[auth]`      | `proxygate_gateway::config::AuthConfig`   |
//! | `[dial]`      | `proxygate_gateway::config::DialConfig`   |
//! | `[pool]`      | `proxygate_pool::Config`                  |
//! | `[store]`     | `proxygate_store::Config`                 |
//! | `[admin]`     | `proxygate_admin::config::Config`         |
//! | `[janitor]`   | `proxygate_admin::janitor::Config`        |
//! | `allow_private_networks`, `[[sources]]`, `[checker]`, `[refresh]` | `proxygate_sources::config` |
//! | `[upstreams]` | [`UpstreamsConfig`]                       |
//! | `[log]`       | [`LogConfig`]                             |
//!
//! Every key has a compiled-in default (`config/default.toml` documents them), so no file is
//! needed. Loading reports every problem it can find at once, each as `file: key: reason`:
//! each section is read on its own, so one bad section does not hide another's errors, and
//! semantic checks run on whatever parsed.

use std::path::{Path, PathBuf};

use proxygate_core::config::section;
use proxygate_core::{Problem, Upstream};
use serde::Deserialize;
use serde::de::DeserializeOwned;

pub const DEFAULT_DATA_DIR: &str = "./data";

/// The whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct RootConfig {
    pub data_dir: PathBuf,
    pub gateway: proxygate_gateway::Config,
    pub pool: proxygate_pool::Config,
    pub upstreams: UpstreamsConfig,
    pub store: proxygate_store::Config,
    pub admin: proxygate_admin::config::Config,
    pub janitor: proxygate_admin::janitor::Config,
    /// Candidates from lists may point at private, loopback, link-local... addresses (labs
    /// and tests only).
    pub allow_private_networks: bool,
    pub sources: Vec<proxygate_sources::SourceConfig>,
    pub checker: proxygate_sources::CheckerConfig,
    pub refresh: proxygate_sources::RefreshConfig,
    pub log: LogConfig,
}

/// `[upstreams]`: the operator's own upstreams.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamsConfig {
    /// Upstream URLs. Prefer `files` for upstreams with passwords: keep secrets out of config.
    pub urls: Vec<String>,
    /// Files of one URL per line (`#` comments and blank lines skipped).
    pub files: Vec<PathBuf>,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `proxygate_gateway=debug,info`... `RUST_LOG` wins.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
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
            pool: proxygate_pool::Config::default(),
            upstreams: UpstreamsConfig::default(),
            store: proxygate_store::Config::default(),
            admin: proxygate_admin::config::Config::default(),
            janitor: proxygate_admin::janitor::Config::default(),
            allow_private_networks: false,
            sources: proxygate_sources::config::default_sources(),
            checker: proxygate_sources::CheckerConfig::default(),
            refresh: proxygate_sources::RefreshConfig::default(),
            log: LogConfig::default(),
        }
    }
}

const SECTIONS: [&str; 14] = [
    "data_dir",
    "allow_private_networks",
    "server",
    "auth",
    "dial",
    "pool",
    "upstreams",
    "store",
    "admin",
    "janitor",
    "sources",
    "checker",
    "refresh",
    "log",
];

impl RootConfig {
    /// When list upstreams earn the `verified` tier (`checker.verify_after`, `verify_checks`).
    pub fn trust(&self) -> proxygate_admin::catalog::TrustPolicy {
        proxygate_admin::catalog::TrustPolicy {
            after_ms: u64::try_from(self.checker.verify_after.as_millis()).unwrap_or(u64::MAX),
            checks: self.checker.verify_checks,
        }
    }

    /// Reads a config file (syntax, keys, types; the semantic checks are
    /// [`RootConfig::validate`]'s, after command-line overrides). Sections with problems keep
    /// their defaults, so the semantic checks can still run on the rest.
    pub fn load(path: &Path) -> (RootConfig, Vec<Problem>) {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text),
            Err(e) => (
                RootConfig::default(),
                vec![Problem::new("(file)", format!("cannot read: {e}"))],
            ),
        }
    }

    /// Parses TOML text, collecting the problems of every section.
    pub fn parse(text: &str) -> (RootConfig, Vec<Problem>) {
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
        let mut read = |name: &str, into: &mut dyn FnMut(&toml::Value) -> Result<(), Problem>| {
            if let Some(value) = table.get(name)
                && let Err(p) = into(value)
            {
                problems.push(p);
            }
        };
        read("data_dir", &mut |v| set(v, "data_dir", &mut cfg.data_dir));
        read("server", &mut |v| set(v, "server", &mut cfg.gateway.server));
        read("auth", &mut |v| set(v, "auth", &mut cfg.gateway.auth));
        read("dial", &mut |v| set(v, "dial", &mut cfg.gateway.dial));
        read("pool", &mut |v| set(v, "pool", &mut cfg.pool));
        read("upstreams", &mut |v| {
            set(v, "upstreams", &mut cfg.upstreams)
        });
        read("store", &mut |v| set(v, "store", &mut cfg.store));
        read("admin", &mut |v| set(v, "admin", &mut cfg.admin));
        read("janitor", &mut |v| set(v, "janitor", &mut cfg.janitor));
        read("allow_private_networks", &mut |v| {
            set(v, "allow_private_networks", &mut cfg.allow_private_networks)
        });
        read("sources", &mut |v| set(v, "sources", &mut cfg.sources));
        cfg.gateway.allow_private_networks = cfg.allow_private_networks;
        read("checker", &mut |v| set(v, "checker", &mut cfg.checker));
        read("refresh", &mut |v| set(v, "refresh", &mut cfg.refresh));
        read("log", &mut |v| set(v, "log", &mut cfg.log));
        (cfg, problems)
    }

    /// Semantic checks of the final configuration, and the upstreams it names, which are
    /// returned parsed.
    pub fn validate(&self) -> Result<Vec<Upstream>, Vec<Problem>> {
        let mut problems = self.gateway.validate();
        problems.extend(self.pool.validate());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            problems.push(Problem::new("log.level", format!("invalid filter: {e}")));
        }
        problems.extend(self.store.validate());
        problems.extend(self.admin.validate());
        problems.extend(self.janitor.validate());
        problems.extend(proxygate_sources::config::validate(
            &self.sources,
            &self.checker,
            &self.refresh,
        ));
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

/// The config a command (other than `run`) works with: the file's, or the embedded defaults
/// without one, with `--data-dir` applied. With `check`, the semantic checks run too.
pub fn for_command(
    file: Option<&Path>,
    data_dir: Option<&Path>,
    check: bool,
) -> Result<RootConfig, proxygate_core::ConfigErrors> {
    let Some(path) = file else {
        let mut cfg = RootConfig::default();
        if let Some(dir) = data_dir {
            cfg.data_dir = dir.to_owned();
        }
        return Ok(cfg);
    };
    let (mut cfg, mut problems) = RootConfig::load(path);
    if let Some(dir) = data_dir {
        cfg.data_dir = dir.to_owned();
    }
    if check && problems.is_empty() {
        problems = cfg.validate().err().unwrap_or_default();
    }
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(proxygate_core::ConfigErrors {
            source: path.display().to_string(),
            problems,
        })
    }
}

/// Reads section `name` into `into` (which keeps its defaults on a problem).
fn set<T: DeserializeOwned>(value: &toml::Value, name: &str, into: &mut T) -> Result<(), Problem> {
    *into = section(value, name)?;
    Ok(())
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
pub fn read_upstreams_file(path: &Path) -> Result<Vec<Upstream>, Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
    parse_upstreams(&text).map_err(|errs| {
        errs.into_iter()
            .map(|(line, reason)| format!("{}:{line}: {reason}", path.display()))
            .collect()
    })
}

/// Parses upstream-list text; errors are `(line number, reason)`.
pub fn parse_upstreams(text: &str) -> Result<Vec<Upstream>, Vec<(usize, String)>> {
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
    fn data_dir_must_be_a_path() {
        let (_, p) = RootConfig::parse("data_dir = 3\n");
        assert_eq!(p[0].key, "data_dir", "{p:?}");
        let (c, p) = RootConfig::parse("data_dir = \"/var/lib/proxygate\"\n");
        assert!(p.is_empty());
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/proxygate"));
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
