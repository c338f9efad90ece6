//! [`Fetcher`]: one source fetched: every URL of it (and every page of a paged API), read
//! within `refresh.fetch_timeout`, bodies capped at `refresh.max_body_bytes`, requests retried
//! with backoff on network errors, 408, 429 and 5xx (a `Retry-After` honoured), a browser-like
//! User-Agent. What it read is parsed ([`crate::parse`]), deduplicated by scheme + host +
//! port + username, and filtered: entries pointing at loopback, private, link-local, CGNAT,
//! multicast or unspecified addresses are dropped unless `allow_private_networks` (a poisoned
//! list must not turn the gateway against its own network; names are resolved to judge them).
//!
//! Paging: ProxyScrape's JSON API by `skip`/`limit` (2,000 per page), Geonode by
//! `page`/`limit` (500 per page); both stop at the first page without rows (never on the
//! totals they report, which are not transactional), or at [`MAX_PAGES`].

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use proxygate_core::net::{is_local_name, is_private};
use proxygate_core::{Host, Scheme};
use reqwest::Url;

use crate::candidate::Candidate;
use crate::config::{Kind, RefreshConfig, SourceConfig};
use crate::parse::{self, Ctx, ParseError};

/// Pages read from one paged API at most.
pub const MAX_PAGES: usize = 50;
const PROXYSCRAPE_PAGE: usize = 2000;
const GEONODE_PAGE: usize = 500;

/// What fetching one source gave.
#[derive(Debug, Clone, Default)]
pub struct FetchReport {
    pub source: String,
    /// Entries the source listed (rows), read or not.
    pub fetched: usize,
    /// Distinct candidates after filtering, in the source's order.
    pub candidates: Vec<Candidate>,
    /// Entries that could not be read.
    pub invalid: usize,
    /// Entries the source itself marked dead.
    pub dead: usize,
    /// Entries dropped as private or unresolvable addresses.
    pub dropped_private: usize,
    /// Why the fetch failed; `None` when the source answered a list. A failed fetch may
    /// still carry the candidates of the URLs that did answer.
    pub error: Option<String>,
    pub elapsed: Duration,
}

impl FetchReport {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// Fetches sources.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    cfg: RefreshConfig,
    allow_private: bool,
}

/// Why one request failed.
#[derive(Debug)]
enum RequestError {
    /// Worth trying again (network, 408, 429, 5xx); with the server's `Retry-After`.
    Transient(String, Option<Duration>),
    Final(String),
}

impl Fetcher {
    pub fn new(cfg: RefreshConfig, allow_private: bool) -> Result<Fetcher, String> {
        let client = reqwest::Client::builder()
            .user_agent(cfg.user_agent.clone())
            .connect_timeout(Duration::from_secs(10))
            .timeout(cfg.fetch_timeout)
            // Lists are fetched directly, never through the environment's proxy.
            .no_proxy()
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Fetcher {
            client,
            cfg,
            allow_private,
        })
    }

    /// Fetches every URL of `src`; never fails, the report says what went wrong.
    pub async fn fetch(&self, src: &SourceConfig) -> FetchReport {
        let t0 = Instant::now();
        let mut report = FetchReport {
            source: src.name.clone(),
            ..FetchReport::default()
        };
        let mut all = Vec::new();
        let mut errors = Vec::new();
        let work = async {
            for url in src.urls() {
                match self.fetch_url(src, &url, &mut report).await {
                    Ok(mut c) => all.append(&mut c),
                    Err(e) => errors.push(format!("{}: {e}", redact(&url))),
                }
            }
        };
        if tokio::time::timeout(self.cfg.fetch_timeout, work)
            .await
            .is_err()
        {
            errors.push(format!(
                "not done within refresh.fetch_timeout ({:?})",
                self.cfg.fetch_timeout
            ));
        }
        // Dedupe within the source: scheme + host + port + username.
        let mut seen = HashSet::new();
        all.retain(|c: &Candidate| seen.insert(c.id()));
        all.truncate(self.cfg.max_per_source);
        let (kept, dropped) = self.filter(all).await;
        report.candidates = kept;
        report.dropped_private = dropped;
        if report.candidates.is_empty() && errors.is_empty() {
            errors.push(if report.dropped_private > 0 {
                format!(
                    "every entry ({}) points at a private, loopback or unresolvable address",
                    report.dropped_private
                )
            } else {
                "no live proxy in the list".into()
            });
        }
        if !errors.is_empty() {
            report.error = Some(errors.join("; "));
        }
        report.elapsed = t0.elapsed();
        report
    }

    /// One URL: a file, one request, or every page of a paged API.
    async fn fetch_url(
        &self,
        src: &SourceConfig,
        url: &str,
        report: &mut FetchReport,
    ) -> Result<Vec<Candidate>, String> {
        let scheme = scheme_of(src, url);
        let ctx = Ctx {
            source: &src.name,
            scheme,
        };
        if let Some(path) = file_path(url) {
            let body = read_file(path, self.cfg.max_body_bytes).await?;
            let p = parse::parse(src.kind, &body, ctx, false).map_err(|e| e.to_string())?;
            return Ok(account(report, p));
        }
        let first = self.get(url).await?;
        let json = first.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        let paged = match src.kind {
            Kind::Proxyscrape if json => Some(PROXYSCRAPE_PAGE),
            Kind::Geonode if json => Some(GEONODE_PAGE),
            _ => None,
        };
        let Some(limit) = paged else {
            let p = parse::parse(src.kind, &first, ctx, false).map_err(|e| e.to_string())?;
            return Ok(account(report, p));
        };
        // The first response (as configured) tells the shape; then page from the start.
        let first_page = page_url(src.kind, url, 0, limit)?;
        let mut out = Vec::new();
        for page in 0..MAX_PAGES {
            let body = if page == 0 && first_page == url {
                first.clone()
            } else {
                let u = page_url(src.kind, url, page, limit)?;
                match self.get(&u).await {
                    Ok(b) => b,
                    // A later page failing ends the list here; what came before counts.
                    Err(e) if page > 0 => {
                        tracing::warn!(source = src.name, page, "page failed: {e}");
                        break;
                    }
                    Err(e) => return Err(e),
                }
            };
            let p = match parse::parse(src.kind, &body, ctx, page > 0) {
                Ok(p) => p,
                Err(e) if page > 0 => {
                    tracing::warn!(source = src.name, page, "page unreadable: {e}");
                    break;
                }
                Err(e) => return Err(e.to_string()),
            };
            if p.rows == 0 {
                break;
            }
            out.append(&mut account(report, p));
        }
        Ok(out)
    }

    /// One GET, retried on transient failures.
    async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let mut wait = self.cfg.retry_backoff;
        let mut attempt = 0;
        loop {
            match self.get_once(url).await {
                Ok(body) => return Ok(body),
                Err(RequestError::Final(e)) => return Err(e),
                Err(RequestError::Transient(e, _)) if attempt >= self.cfg.retries => return Err(e),
                Err(RequestError::Transient(e, retry_after)) => {
                    attempt += 1;
                    let pause = retry_after.unwrap_or(wait).min(Duration::from_secs(30));
                    tracing::debug!(url = %redact(url), attempt, ?pause, "retrying: {e}");
                    tokio::time::sleep(pause).await;
                    wait = wait.saturating_mul(2);
                }
            }
        }
    }

    async fn get_once(&self, url: &str) -> Result<Vec<u8>, RequestError> {
        let resp = self
            .client
            .get(url)
            .header(
                reqwest::header::ACCEPT,
                "application/json, text/plain, text/html;q=0.9, */*;q=0.8",
            )
            .header(reqwest::header::ACCEPT_LANGUAGE, "en-US,en;q=0.9")
            .send()
            .await
            .map_err(|e| RequestError::Transient(without_url(e), None))?;
        let status = resp.status();
        if !status.is_success() {
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            // A Cloudflare challenge says so; anything else is the status.
            let body = resp.bytes().await.unwrap_or_default();
            let what = match parse::parse(
                Kind::Generic,
                &body,
                Ctx {
                    source: "",
                    scheme: Scheme::Http,
                },
                true,
            ) {
                Err(ParseError::Cloudflare) => {
                    format!("HTTP {status}: a Cloudflare challenge page")
                }
                _ => format!("HTTP {status}"),
            };
            return Err(match status.as_u16() {
                408 | 429 | 500..=599 => RequestError::Transient(what, retry_after),
                _ => RequestError::Final(what),
            });
        }
        if let Some(len) = resp.content_length()
            && len > self.cfg.max_body_bytes as u64
        {
            return Err(RequestError::Final(format!(
                "body of {len} bytes is over refresh.max_body_bytes ({})",
                self.cfg.max_body_bytes
            )));
        }
        let mut body = Vec::new();
        let mut resp = resp;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| RequestError::Transient(without_url(e), None))?
        {
            if body.len() + chunk.len() > self.cfg.max_body_bytes {
                return Err(RequestError::Final(format!(
                    "body over refresh.max_body_bytes ({})",
                    self.cfg.max_body_bytes
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Drops candidates at private addresses (unless allowed); names are resolved (once each)
    /// and judged by every address they resolve to. Returns (kept, dropped).
    async fn filter(&self, candidates: Vec<Candidate>) -> (Vec<Candidate>, usize) {
        if self.allow_private {
            return (candidates, 0);
        }
        let mut names: HashMap<String, ()> = HashMap::new();
        for c in &candidates {
            if let Host::Domain(d) = &c.upstream.host {
                names.insert(d.clone(), ());
            }
        }
        // A bounded number of lookups in flight.
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
        let mut lookups = tokio::task::JoinSet::new();
        for name in names.into_keys() {
            let permits = std::sync::Arc::clone(&permits);
            lookups.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let public = resolves_publicly(&name).await;
                (name, public)
            });
        }
        let mut resolved = HashMap::new();
        while let Some(Ok((name, public))) = lookups.join_next().await {
            resolved.insert(name, public);
        }
        let before = candidates.len();
        let kept: Vec<Candidate> = candidates
            .into_iter()
            .filter(|c| match &c.upstream.host {
                Host::Ip(ip) => !is_private(*ip),
                Host::Domain(d) => resolved.get(d).copied().unwrap_or(false),
            })
            .collect();
        let dropped = before - kept.len();
        (kept, dropped)
    }
}

/// Whether `name` resolves, within 5 s, to public addresses only.
async fn resolves_publicly(name: &str) -> bool {
    if is_local_name(name) {
        return false;
    }
    let lookup = tokio::net::lookup_host((name, 0));
    match tokio::time::timeout(Duration::from_secs(5), lookup).await {
        Ok(Ok(addrs)) => {
            let ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            !ips.is_empty() && ips.iter().all(|ip| !is_private(*ip))
        }
        _ => false,
    }
}

/// Counts a parsed body into the report; returns its candidates.
fn account(report: &mut FetchReport, p: parse::Parsed) -> Vec<Candidate> {
    report.fetched += p.rows;
    report.invalid += p.invalid;
    report.dead += p.dead;
    p.candidates
}

/// The scheme of entries that name none: a generic source's `scheme`, else the URL's
/// `protocol=` / `proxytype=` / `type=` / `t=` parameter, else http.
fn scheme_of(src: &SourceConfig, url: &str) -> Scheme {
    if src.kind == Kind::Generic {
        return src.default_scheme();
    }
    let Ok(u) = Url::parse(url) else {
        return Scheme::Http;
    };
    u.query_pairs()
        .find(|(k, _)| matches!(k.as_ref(), "protocol" | "proxytype" | "type" | "t"))
        .and_then(|(_, v)| match v.to_ascii_lowercase().as_str() {
            "socks4" => Some(Scheme::Socks4),
            "socks5" => Some(Scheme::Socks5),
            _ => None,
        })
        .unwrap_or(Scheme::Http)
}

/// `url` with the page parameters of `kind` for page `page` (0-based).
fn page_url(kind: Kind, url: &str, page: usize, limit: usize) -> Result<String, String> {
    let mut u = Url::parse(url).map_err(|e| format!("invalid URL: {e}"))?;
    let (drop, add): (&[&str], Vec<(&str, String)>) = match kind {
        Kind::Proxyscrape => (
            &["skip", "limit"],
            vec![
                ("skip", (page * limit).to_string()),
                ("limit", limit.to_string()),
            ],
        ),
        _ => (
            &["page", "limit"],
            vec![
                ("page", (page + 1).to_string()),
                ("limit", limit.to_string()),
            ],
        ),
    };
    let kept: Vec<(String, String)> = u
        .query_pairs()
        .filter(|(k, _)| !drop.contains(&k.as_ref()))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    u.query_pairs_mut()
        .clear()
        .extend_pairs(kept)
        .extend_pairs(add);
    Ok(u.to_string())
}

fn file_path(url: &str) -> Option<&str> {
    url.strip_prefix("file://").or_else(|| {
        (url.starts_with('/') || url.starts_with("./") || url.starts_with("../")).then_some(url)
    })
}

async fn read_file(path: &str, max: usize) -> Result<Vec<u8>, String> {
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|e| format!("{path}: {e}"))?;
    if meta.len() > max as u64 {
        return Err(format!(
            "{path}: {} bytes is over refresh.max_body_bytes ({max})",
            meta.len()
        ));
    }
    tokio::fs::read(path)
        .await
        .map_err(|e| format!("{path}: {e}"))
}

/// A URL without its userinfo (a paid list's URL may carry a key there).
pub fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("***");
            let _ = u.set_password(None);
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// A reqwest error's message without the URL (which may carry credentials), with its causes.
fn without_url(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(kind: Kind, url: &str) -> SourceConfig {
        SourceConfig {
            name: "s".into(),
            kind,
            url: Some(url.into()),
            interval: Duration::from_secs(60),
            scheme: None,
        }
    }

    #[test]
    fn page_urls_replace_their_parameters() {
        let u = page_url(
            Kind::Proxyscrape,
            "https://api.proxyscrape.com/v4/free-proxy-list/get?request=display_proxies&skip=0&limit=10&format=json",
            2,
            2000,
        )
        .unwrap();
        assert_eq!(
            u,
            "https://api.proxyscrape.com/v4/free-proxy-list/get?request=display_proxies&format=json&skip=4000&limit=2000"
        );
        let u = page_url(Kind::Geonode, "http://127.0.0.1:1/api?sort_by=x", 0, 500).unwrap();
        assert_eq!(u, "http://127.0.0.1:1/api?sort_by=x&page=1&limit=500");
    }

    #[test]
    fn schemes_from_urls() {
        let s = |k, u| scheme_of(&src(k, u), u);
        assert_eq!(
            s(Kind::ProxyListDownload, "http://x/api/v1/get?type=socks4"),
            Scheme::Socks4
        );
        assert_eq!(
            s(Kind::ProxyListDownload, "http://x/api/v2/get?l=en&t=socks5"),
            Scheme::Socks5
        );
        assert_eq!(
            s(Kind::Proxyscrape, "http://x/v2/?protocol=http"),
            Scheme::Http
        );
        assert_eq!(
            s(Kind::Proxyscrape, "http://x/?proxytype=socks5"),
            Scheme::Socks5
        );
        let mut g = src(Kind::Generic, "/tmp/list");
        g.scheme = Some("socks5h".into());
        assert_eq!(scheme_of(&g, "/tmp/list"), Scheme::Socks5h);
    }

    #[test]
    fn redacts_userinfo() {
        assert_eq!(
            redact("https://key:secret@lists.example/p.txt"),
            "https://***@lists.example/p.txt"
        );
        assert_eq!(
            redact("https://lists.example/p.txt"),
            "https://lists.example/p.txt"
        );
    }
}
