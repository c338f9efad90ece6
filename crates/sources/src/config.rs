//! The sources' sections of the root config file: `[[sources]]` (one table per list source),
//! `[checker]` and `[refresh]`. Defaults are the `DEFAULT_*` constants and
//! [`default_sources`], and match `config/default.toml`.
//!
//! ```toml
//! [[sources]]
//! name = "ps"              # free text: output, store, metrics
//! kind = "proxyscrape"     # proxyscrape | geonode | proxy_list_download | free_proxy_list | generic
//! url = "https://..."      # optional: replaces the kind's default request URL(s)
//! interval = "1h"          # optional
//! scheme = "http"          # generic only: the scheme of bare ip:port lines
//! ```

use std::collections::HashSet;
use std::time::Duration;

use proxygate_core::{Problem, Scheme};
use serde::Deserialize;

use crate::candidate::Anonymity;

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(3600);
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_CHECK_CONCURRENCY: usize = 256;
pub const DEFAULT_RECHECK_IDLE: Duration = Duration::from_secs(1800);
pub const DEFAULT_RECHECK_EVERY: Duration = Duration::from_secs(15);
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 << 20;
pub const DEFAULT_RETRIES: u32 = 2;
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(1);
pub const DEFAULT_FULL_REIMPORT: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_MAX_PER_SOURCE: usize = 100_000;
/// What the fetcher says it is: a browser (several lists serve bots something else).
pub const DEFAULT_USER_AGENT: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 \
                                      (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";

/// The integrity checks' references of the embedded defaults: IANA's example page, static, over
/// TLS (its certificate) and over plain HTTP (its body).
pub const DEFAULT_TLS_JUDGE: &str = "https://example.com/";
pub const DEFAULT_INTEGRITY_URL: &str = "http://example.com/";
pub const DEFAULT_AUDIT_EVERY: Duration = Duration::from_secs(6 * 3600);
pub const DEFAULT_VERIFY_AFTER: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_VERIFY_CHECKS: u32 = 3;

/// The public judges of the embedded defaults: httpbin-style JSON and an azenv page.
pub const DEFAULT_JUDGES: [&str; 2] = ["http://httpbin.org/get?show_env=1", "http://azenv.net/"];

/// A list format proxygate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// ProxyScrape: the plain-text API (`ip:port` lines) or the v3/v4 JSON API (`skip`/`limit`
    /// paging).
    Proxyscrape,
    /// Geonode: JSON with `page`/`limit` paging.
    Geonode,
    /// proxy-list.download: v1 text per `type=`, or the v2 JSON (`LISTA`).
    ProxyListDownload,
    /// free-proxy-list.net and its sister pages: an HTML table (or the raw list of its
    /// `<textarea>`).
    FreeProxyList,
    /// Any URL or file of `ip:port` lines, `scheme://[user:pass@]host:port` lines or JSON lines
    /// (or one JSON array): the operator's own lists.
    Generic,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Proxyscrape => "proxyscrape",
            Kind::Geonode => "geonode",
            Kind::ProxyListDownload => "proxy_list_download",
            Kind::FreeProxyList => "free_proxy_list",
            Kind::Generic => "generic",
        }
    }

    /// The real public request URLs of the kind (what a source fetches when `url` is not
    /// set). Paged kinds add their page parameters to these.
    pub fn default_urls(self) -> &'static [&'static str] {
        match self {
            Kind::Proxyscrape => &[
                "https://api.proxyscrape.com/v4/free-proxy-list/get?request=display_proxies&proxy_format=protocolipport&format=json",
            ],
            Kind::Geonode => {
                &["https://proxylist.geonode.com/api/proxy-list?sort_by=lastChecked&sort_type=desc"]
            }
            Kind::ProxyListDownload => &[
                "https://www.proxy-list.download/api/v1/get?type=http",
                "https://www.proxy-list.download/api/v1/get?type=https",
                "https://www.proxy-list.download/api/v1/get?type=socks4",
                "https://www.proxy-list.download/api/v1/get?type=socks5",
            ],
            Kind::FreeProxyList => &[
                "https://free-proxy-list.net/",
                "https://www.sslproxies.org/",
                "https://www.us-proxy.org/",
                "https://www.socks-proxy.net/",
            ],
            Kind::Generic => &[],
        }
    }
}

/// One `[[sources]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub name: String,
    pub kind: Kind,
    /// Replaces the kind's default request URL(s); a path or `file://` URL reads a local file.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// `generic` only: the scheme of lines that name none (`ip:port`). Default `http`.
    #[serde(default)]
    pub scheme: Option<String>,
}

fn default_interval() -> Duration {
    DEFAULT_INTERVAL
}

impl SourceConfig {
    /// The URLs this source fetches.
    pub fn urls(&self) -> Vec<String> {
        match &self.url {
            Some(u) => vec![u.clone()],
            None => self
                .kind
                .default_urls()
                .iter()
                .map(|u| (*u).to_owned())
                .collect(),
        }
    }

    /// The scheme of `ip:port` entries that name none.
    pub fn default_scheme(&self) -> Scheme {
        self.scheme
            .as_deref()
            .and_then(|s| s.parse().ok())
            .unwrap_or(Scheme::Http)
    }
}

/// The four public sources the embedded defaults enable.
pub fn default_sources() -> Vec<SourceConfig> {
    [
        ("proxyscrape", Kind::Proxyscrape),
        ("geonode", Kind::Geonode),
        ("proxy-list-download", Kind::ProxyListDownload),
        ("free-proxy-list", Kind::FreeProxyList),
    ]
    .into_iter()
    .map(|(name, kind)| SourceConfig {
        name: name.into(),
        kind,
        url: None,
        interval: DEFAULT_INTERVAL,
        scheme: None,
    })
    .collect()
}

/// `[checker]`: validating candidates (and re-checking pool members) through themselves.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckerConfig {
    /// Judges: httpbin-style `/get` JSON (`origin`, `headers`) and azenv-style pages are both
    /// understood. `http://` judges see the headers a proxy adds (anonymity); `https://` ones
    /// only prove the tunnel.
    pub judge_urls: Vec<String>,
    /// Checks in flight at once.
    pub concurrency: usize,
    /// A whole check (connect, handshake, judge request and answer) must finish within this.
    /// Slower proxies fail: reputation already calls more than 2 s slow.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The least anonymity a candidate needs to serve: transparent (every level serves),
    /// anonymous or elite.
    pub min_anonymity: Anonymity,
    /// Pool members unused and unchecked for this long are re-checked.
    #[serde(with = "humantime_serde")]
    pub recheck_idle: Duration,
    /// How often the re-check scheduler looks for members due (ended backoffs, idle ones).
    #[serde(with = "humantime_serde")]
    pub recheck_every: Duration,
    /// Integrity, TLS: an `https://` URL fetched through each upstream; the certificate the
    /// upstream's tunnel shows must be the one a direct connection gets, or the upstream is
    /// quarantined (a man in the middle). Empty: not checked.
    pub tls_judge_url: String,
    /// Integrity, plain HTTP: an `http://` URL of a static page fetched through each upstream;
    /// the body must be byte for byte the one a direct fetch gets, or the upstream is
    /// quarantined (it injects). Empty: not checked.
    pub integrity_url: String,
    /// The leak audit: every pool member, busy or idle, is re-checked this often (judge and
    /// integrity); an exit that reveals the gateway's address or forwards the client's proxy
    /// headers is demoted to `untrusted`. `0s`: no audit (members are still checked when
    /// idle or back from a backoff).
    #[serde(with = "humantime_serde")]
    pub audit_every: Duration,
    /// A list upstream becomes `verified` once its integrity checks have all passed, at least
    /// `verify_checks` of them, over at least this long.
    #[serde(with = "humantime_serde")]
    pub verify_after: Duration,
    pub verify_checks: u32,
}

impl Default for CheckerConfig {
    fn default() -> Self {
        Self {
            judge_urls: DEFAULT_JUDGES.iter().map(|u| (*u).to_owned()).collect(),
            concurrency: DEFAULT_CHECK_CONCURRENCY,
            timeout: DEFAULT_CHECK_TIMEOUT,
            min_anonymity: Anonymity::Transparent,
            recheck_idle: DEFAULT_RECHECK_IDLE,
            recheck_every: DEFAULT_RECHECK_EVERY,
            tls_judge_url: DEFAULT_TLS_JUDGE.into(),
            integrity_url: DEFAULT_INTEGRITY_URL.into(),
            audit_every: DEFAULT_AUDIT_EVERY,
            verify_after: DEFAULT_VERIFY_AFTER,
            verify_checks: DEFAULT_VERIFY_CHECKS,
        }
    }
}

/// `[refresh]`: how sources are fetched.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RefreshConfig {
    /// One fetch of one source (all its pages and retries) must end within this.
    #[serde(with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// Largest body read from one URL; a larger one is a failed fetch.
    pub max_body_bytes: usize,
    /// Retries of a request that failed on the network or with 408, 429 or 5xx.
    pub retries: u32,
    /// Wait before the first retry; doubles per retry (a `Retry-After` is honoured).
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Every this long, every candidate of every source is checked again, known or not
    /// ("daily rotation").
    #[serde(with = "humantime_serde")]
    pub full_reimport: Duration,
    /// A source listing more candidates than this is cut there.
    pub max_per_source: usize,
    pub user_agent: String,
}

impl Default for RefreshConfig {
    fn default() -> Self {
        Self {
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            retries: DEFAULT_RETRIES,
            retry_backoff: DEFAULT_RETRY_BACKOFF,
            full_reimport: DEFAULT_FULL_REIMPORT,
            max_per_source: DEFAULT_MAX_PER_SOURCE,
            user_agent: DEFAULT_USER_AGENT.into(),
        }
    }
}

/// Every problem of `[[sources]]`, `[checker]` and `[refresh]`, each with its key.
pub fn validate(
    sources: &[SourceConfig],
    checker: &CheckerConfig,
    refresh: &RefreshConfig,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut names = HashSet::new();
    for (i, s) in sources.iter().enumerate() {
        let key = |k: &str| format!("sources[{i}].{k}");
        if s.name.trim().is_empty() {
            problems.push(Problem::new(key("name"), "must not be empty"));
        } else if !names.insert(s.name.as_str()) {
            problems.push(Problem::new(
                key("name"),
                format!("{:?} names another source too", s.name),
            ));
        }
        if s.name.chars().any(|c| c.is_control() || c == '"') {
            problems.push(Problem::new(
                key("name"),
                "must be printable, without quotes",
            ));
        }
        Problem::check_nonzero(&key("interval"), s.interval, &mut problems);
        match (&s.url, s.kind) {
            (None, Kind::Generic) => problems.push(Problem::new(
                key("url"),
                "a generic source needs a url (http(s)://, file:// or a path)",
            )),
            (Some(u), _) if !is_fetchable(u) => problems.push(Problem::new(
                key("url"),
                format!("{u:?} is not an http(s):// URL, a file:// URL or a path"),
            )),
            _ => {}
        }
        if let Some(scheme) = &s.scheme {
            if s.kind != Kind::Generic {
                problems.push(Problem::new(
                    key("scheme"),
                    "only a generic source takes a scheme",
                ));
            } else if scheme.parse::<Scheme>().is_err() {
                problems.push(Problem::new(
                    key("scheme"),
                    format!(
                        "unknown scheme {scheme:?} (expected http, https, socks4, socks4a, \
                         socks5 or socks5h)"
                    ),
                ));
            }
        }
    }
    for (i, u) in checker.judge_urls.iter().enumerate() {
        if crate::judge::JudgeUrl::parse(u).is_err() {
            problems.push(Problem::new(
                format!("checker.judge_urls[{i}]"),
                format!("{u:?} is not an http:// or https:// URL with a host"),
            ));
        }
    }
    if checker.judge_urls.is_empty() && !sources.is_empty() {
        problems.push(Problem::new(
            "checker.judge_urls",
            "needs at least one judge while sources are configured (candidates are checked \
             before they serve)",
        ));
    }
    if !checker.tls_judge_url.is_empty()
        && !crate::judge::JudgeUrl::parse(&checker.tls_judge_url).is_ok_and(|j| j.tls)
    {
        problems.push(Problem::new(
            "checker.tls_judge_url",
            format!(
                "{:?} is not an https:// URL with a host (or \"\" to skip the check)",
                checker.tls_judge_url
            ),
        ));
    }
    if !checker.integrity_url.is_empty()
        && !crate::judge::JudgeUrl::parse(&checker.integrity_url).is_ok_and(|j| !j.tls)
    {
        problems.push(Problem::new(
            "checker.integrity_url",
            format!(
                "{:?} is not an http:// URL with a host (or \"\" to skip the check)",
                checker.integrity_url
            ),
        ));
    }
    if checker.verify_checks == 0 {
        problems.push(Problem::new("checker.verify_checks", "must be at least 1"));
    }
    if checker.concurrency == 0 {
        problems.push(Problem::new("checker.concurrency", "must be at least 1"));
    }
    Problem::check_nonzero("checker.timeout", checker.timeout, &mut problems);
    Problem::check_nonzero("checker.recheck_idle", checker.recheck_idle, &mut problems);
    Problem::check_nonzero(
        "checker.recheck_every",
        checker.recheck_every,
        &mut problems,
    );
    Problem::check_nonzero(
        "refresh.fetch_timeout",
        refresh.fetch_timeout,
        &mut problems,
    );
    Problem::check_nonzero(
        "refresh.full_reimport",
        refresh.full_reimport,
        &mut problems,
    );
    if refresh.max_body_bytes < 1024 {
        problems.push(Problem::new(
            "refresh.max_body_bytes",
            "must be at least 1024",
        ));
    }
    if refresh.max_per_source == 0 {
        problems.push(Problem::new("refresh.max_per_source", "must be at least 1"));
    }
    problems
}

/// Whether `u` is something the fetcher can read.
fn is_fetchable(u: &str) -> bool {
    if let Some(rest) = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"))
    {
        return !rest.is_empty() && !rest.starts_with('/');
    }
    u.starts_with("file://") || u.starts_with('/') || u.starts_with("./") || u.starts_with("../")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(name: &str, kind: Kind, url: Option<&str>) -> SourceConfig {
        SourceConfig {
            name: name.into(),
            kind,
            url: url.map(Into::into),
            interval: DEFAULT_INTERVAL,
            scheme: None,
        }
    }

    #[test]
    fn defaults_are_valid() {
        let p = validate(
            &default_sources(),
            &CheckerConfig::default(),
            &RefreshConfig::default(),
        );
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(default_sources().len(), 4);
        assert_eq!(default_sources()[2].urls().len(), 4);
    }

    #[test]
    fn problems_name_their_keys() {
        let mut s = vec![
            source("a", Kind::Generic, None),
            source("a", Kind::Geonode, Some("ftp://x")),
            source("", Kind::Proxyscrape, None),
        ];
        s[1].scheme = Some("http".into());
        s[1].interval = Duration::ZERO;
        let checker = CheckerConfig {
            judge_urls: vec!["not a url".into()],
            tls_judge_url: "http://example.com/".into(),
            integrity_url: "https://example.com/".into(),
            verify_checks: 0,
            concurrency: 0,
            ..CheckerConfig::default()
        };
        let keys: Vec<String> = validate(&s, &checker, &RefreshConfig::default())
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            [
                "sources[0].url",
                "sources[1].name",
                "sources[1].interval",
                "sources[1].url",
                "sources[1].scheme",
                "sources[2].name",
                "checker.judge_urls[0]",
                "checker.tls_judge_url",
                "checker.integrity_url",
                "checker.verify_checks",
                "checker.concurrency"
            ]
        );
    }
}
