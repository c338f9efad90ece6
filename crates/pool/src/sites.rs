//! Per-(upstream, target site) outcomes: an upstream that works for one site is often blocked
//! by another (the site bans its address, or the proxy's ACL refuses the destination), and the
//! upstream's own reputation cannot say so.
//!
//! The key is the target's *site*: its registrable domain (`www.shop.example.co.uk` and
//! `api.shop.example.co.uk` are `example.co.uk`, by the Public Suffix List), or an IP literal or
//! a single-label name as it is. The book keeps only what matters: an entry is made when an
//! upstream fails *for a site* (it refused the CONNECT to it, the target closed the tunnel
//! before a byte, an absolute-form answer was 403 or 429), and a success for that site through
//! that upstream clears its run of failures. Selection avoids an upstream for a site while it
//! has failed there [`SiteConfig::block_after`] times in a row, within
//! [`SiteConfig::block_for`] of the last failure; it is tried there again after that.
//!
//! Memory is a fixed budget: at most [`CAPACITY`] entries in `SITE_SHARDS` (16) shards; a full
//! shard drops the stalest of a few entries to make room. Time is an argument.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use proxygate_core::UpstreamId;

/// Entries kept at most, over all upstreams and sites (about 100 bytes each).
pub const CAPACITY: usize = 65_536;
/// Maps (each behind its own mutex) the entries are spread over; each holds at most
/// `CAPACITY / SITE_SHARDS`.
const SITE_SHARDS: usize = 16;
/// Entries looked at to find the stalest when a shard is full.
const EVICT_SAMPLE: usize = 8;

/// When an upstream counts as blocked for a site (`[pool]` `site_block_after`,
/// `site_block_for`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SiteConfig {
    /// Failures in a row for the site, through the upstream, that block it there...
    pub block_after: u32,
    /// ...for this long after the last of them.
    pub block_for: Duration,
}

pub const DEFAULT_SITE_BLOCK_AFTER: u32 = 2;
pub const DEFAULT_SITE_BLOCK_FOR: Duration = Duration::from_secs(600);

impl Default for SiteConfig {
    fn default() -> Self {
        Self {
            block_after: DEFAULT_SITE_BLOCK_AFTER,
            block_for: DEFAULT_SITE_BLOCK_FOR,
        }
    }
}

/// The site of a target host: its registrable domain, lower-cased; an IP literal or a name
/// without a registrable domain (`localhost`) as it is.
pub fn site_of_target(target: &proxygate_core::Target) -> String {
    site_of(&target.host.to_string())
}

/// The site of a host name or address (see [`site_of_target`]).
pub fn site_of(host: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
        return host;
    }
    match psl::domain_str(&host) {
        Some(d) => d.to_owned(),
        None => host,
    }
}

/// What the book knows of one upstream at one site.
#[derive(Debug, Clone)]
struct Rec {
    site: Box<str>,
    failures: u64,
    consecutive: u32,
    last_failure_ms: u64,
    successes: u64,
    last_ms: u64,
}

/// A site where an upstream is blocked, for the pool views.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Blocked {
    pub site: String,
    /// Failures there, in all and in a row.
    pub failures: u64,
    pub consecutive: u32,
    /// Milliseconds since the last failure.
    pub since_ms: u64,
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<(UpstreamId, u64), Rec>,
}

/// The per-site outcomes of every upstream.
#[derive(Debug)]
pub struct SiteBook {
    shards: Vec<Mutex<Shard>>,
    len: AtomicUsize,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for SiteBook {
    fn default() -> Self {
        Self {
            shards: (0..SITE_SHARDS).map(|_| Mutex::default()).collect(),
            len: AtomicUsize::new(0),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }
}

impl SiteBook {
    fn key(&self, upstream: UpstreamId, site: &str) -> ((UpstreamId, u64), usize) {
        let site_hash = self.hasher.hash_one(site);
        let shard = (self.hasher.hash_one((upstream, site_hash)) as usize) % SITE_SHARDS;
        ((upstream, site_hash), shard)
    }

    fn shard(&self, i: usize) -> std::sync::MutexGuard<'_, Shard> {
        // A map and counters, consistent at every step.
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Entries kept now.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `upstream` failed for `site` at `now_ms`.
    pub fn failed(&self, upstream: UpstreamId, site: &str, now_ms: u64) {
        let (key, i) = self.key(upstream, site);
        let mut shard = self.shard(i);
        if !shard.map.contains_key(&key) && shard.map.len() >= CAPACITY / SITE_SHARDS {
            // Full: the stalest of a few goes.
            let stalest = shard
                .map
                .iter()
                .take(EVICT_SAMPLE)
                .min_by_key(|(_, r)| r.last_ms)
                .map(|(k, _)| *k);
            if let Some(k) = stalest {
                shard.map.remove(&k);
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let rec = shard.map.entry(key).or_insert_with(|| {
            self.len.fetch_add(1, Ordering::Relaxed);
            Rec {
                site: site.into(),
                failures: 0,
                consecutive: 0,
                last_failure_ms: 0,
                successes: 0,
                last_ms: 0,
            }
        });
        rec.failures += 1;
        rec.consecutive = rec.consecutive.saturating_add(1);
        rec.last_failure_ms = now_ms;
        rec.last_ms = now_ms;
    }

    /// `upstream` worked for `site` at `now_ms`: its run of failures there ends. Nothing is
    /// kept for an upstream that never failed there.
    pub fn worked(&self, upstream: UpstreamId, site: &str, now_ms: u64) {
        if self.is_empty() {
            return;
        }
        let (key, i) = self.key(upstream, site);
        if let Some(rec) = self.shard(i).map.get_mut(&key) {
            rec.successes += 1;
            rec.consecutive = 0;
            rec.last_ms = now_ms;
        }
    }

    /// Whether selection should avoid `upstream` for `site` at `now_ms`.
    pub fn is_blocked(
        &self,
        upstream: UpstreamId,
        site: &str,
        now_ms: u64,
        cfg: &SiteConfig,
    ) -> bool {
        if self.is_empty() {
            return false;
        }
        let (key, i) = self.key(upstream, site);
        self.shard(i)
            .map
            .get(&key)
            .is_some_and(|r| blocks(r, now_ms, cfg))
    }

    /// The sites where `upstream` is blocked at `now_ms`, most recent failure first.
    pub fn blocked_sites(
        &self,
        upstream: UpstreamId,
        now_ms: u64,
        cfg: &SiteConfig,
    ) -> Vec<Blocked> {
        let mut out: Vec<Blocked> = self
            .shards
            .iter()
            .flat_map(|s| {
                let s = s.lock().unwrap_or_else(PoisonError::into_inner);
                s.map
                    .iter()
                    .filter(|((id, _), r)| *id == upstream && blocks(r, now_ms, cfg))
                    .map(|(_, r)| Blocked {
                        site: r.site.to_string(),
                        failures: r.failures,
                        consecutive: r.consecutive,
                        since_ms: now_ms.saturating_sub(r.last_failure_ms),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort_by_key(|b| b.since_ms);
        out
    }

    /// Forgets what is older than `block_for` and no longer blocks anything (run now and then).
    pub fn sweep(&self, now_ms: u64, cfg: &SiteConfig) {
        let horizon = u64::try_from(cfg.block_for.as_millis()).unwrap_or(u64::MAX);
        for s in &self.shards {
            let mut s = s.lock().unwrap_or_else(PoisonError::into_inner);
            let before = s.map.len();
            s.map
                .retain(|_, r| now_ms.saturating_sub(r.last_ms) < horizon);
            self.len.fetch_sub(before - s.map.len(), Ordering::Relaxed);
        }
    }
}

fn blocks(r: &Rec, now_ms: u64, cfg: &SiteConfig) -> bool {
    let window = u64::try_from(cfg.block_for.as_millis()).unwrap_or(u64::MAX);
    r.consecutive >= cfg.block_after.max(1) && now_ms.saturating_sub(r.last_failure_ms) < window
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    #[test]
    fn sites_are_registrable_domains() {
        assert_eq!(site_of("www.Example.com"), "example.com");
        assert_eq!(site_of("api.shop.example.co.uk."), "example.co.uk");
        assert_eq!(site_of("example.com"), "example.com");
        assert_eq!(site_of("10.0.0.7"), "10.0.0.7");
        assert_eq!(site_of("[::1]"), "[::1]");
        assert_eq!(site_of("localhost"), "localhost");
    }

    #[test]
    fn two_failures_in_a_row_block_one_site_only_until_a_success_or_time() {
        let book = SiteBook::default();
        let cfg = SiteConfig::default();
        let (a, b) = (UpstreamId(1), UpstreamId(2));
        book.failed(a, "shop.example", 0);
        assert!(!book.is_blocked(a, "shop.example", 1, &cfg), "one failure");
        book.failed(a, "shop.example", 2);
        assert!(book.is_blocked(a, "shop.example", 3, &cfg));
        // Other sites, other upstreams: untouched.
        assert!(!book.is_blocked(a, "news.example", 3, &cfg));
        assert!(!book.is_blocked(b, "shop.example", 3, &cfg));
        assert_eq!(book.blocked_sites(a, 10, &cfg)[0].site, "shop.example");
        assert!(book.blocked_sites(b, 10, &cfg).is_empty());
        // Time: tried there again after block_for.
        assert!(!book.is_blocked(a, "shop.example", 2 + 10 * MIN, &cfg));
        // A success ends the run.
        book.failed(a, "shop.example", 11 * MIN);
        assert!(book.is_blocked(a, "shop.example", 11 * MIN, &cfg));
        book.worked(a, "shop.example", 11 * MIN + 1);
        assert!(!book.is_blocked(a, "shop.example", 11 * MIN + 2, &cfg));
        // Successes alone keep nothing.
        book.worked(b, "news.example", 0);
        assert_eq!(book.len(), 1);
        book.sweep(30 * MIN, &cfg);
        assert!(book.is_empty());
    }

    #[test]
    fn memory_is_bounded() {
        let book = SiteBook::default();
        for i in 0..(CAPACITY as u64 * 2) {
            book.failed(UpstreamId(i % 1000), &format!("site{i}.example"), i);
        }
        assert!(book.len() <= CAPACITY, "{}", book.len());
        assert!(book.len() >= CAPACITY / 2);
    }
}
