//! The janitor: keeps the pool from filling with the dead. Every `janitor.interval` it
//! disables upstreams from list sources that have been dead for long (every check failing for
//! `janitor.dead_after`), and deletes upstreams from list sources unused for
//! `janitor.delete_unused_after` (7 days). Upstreams an operator added or configured are never
//! touched: their backoff already keeps them from costing traffic. The rule is pure
//! ([`verdict`]); [`crate::Catalog::janitor`] applies it durably.

use std::time::Duration;

use proxygate_core::Problem;
use proxygate_store::{CheckRecord, Origin, Record};
use serde::Deserialize;

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(600);
pub const DEFAULT_DEAD_AFTER: Duration = Duration::from_secs(3600);
pub const DEFAULT_DELETE_UNUSED_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// `[janitor]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How often the janitor looks.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// An upstream from a list whose every check failed for this long is disabled (a later
    /// passing check, from a fetch that lists it again, enables it).
    #[serde(with = "humantime_serde")]
    pub dead_after: Duration,
    /// An upstream from a list unused (and, if never used, added) this long ago is deleted.
    #[serde(with = "humantime_serde")]
    pub delete_unused_after: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            interval: DEFAULT_INTERVAL,
            dead_after: DEFAULT_DEAD_AFTER,
            delete_unused_after: DEFAULT_DELETE_UNUSED_AFTER,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        Problem::check_nonzero("janitor.interval", self.interval, &mut p);
        Problem::check_nonzero("janitor.dead_after", self.dead_after, &mut p);
        Problem::check_nonzero(
            "janitor.delete_unused_after",
            self.delete_unused_after,
            &mut p,
        );
        p
    }
}

/// What the janitor does with one upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Disable(String),
    Delete(String),
}

fn ago(now: u64, then: u64) -> Duration {
    Duration::from_millis(now.saturating_sub(then))
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// The verdict on `r` at `now` (Unix ms), given its last check and when it was last used.
pub fn verdict(
    r: &Record,
    check: Option<&CheckRecord>,
    last_used_unix_ms: Option<u64>,
    now: u64,
    cfg: &Config,
) -> Verdict {
    if r.origin != Origin::Source {
        return Verdict::Keep;
    }
    let last_activity = last_used_unix_ms.unwrap_or(0).max(r.added_unix_ms);
    let idle = ago(now, last_activity);
    if idle >= cfg.delete_unused_after {
        let what = if last_used_unix_ms.is_some() {
            "unused"
        } else {
            "never used"
        };
        return Verdict::Delete(format!("{what} for {}", human(idle)));
    }
    if !r.disabled
        && let Some(since) = check.and_then(|c| c.failing_since_unix_ms)
        && ago(now, since) >= cfg.dead_after
    {
        return Verdict::Disable(format!(
            "janitor: every check failed for {}",
            human(ago(now, since))
        ));
    }
    Verdict::Keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxygate_core::Upstream;

    const H: u64 = 3_600_000;

    fn record(origin: Origin, added: u64) -> Record {
        Record::new(Upstream::parse("http://8.8.8.8:80").unwrap(), origin, added)
    }

    fn failing_since(t: u64) -> CheckRecord {
        CheckRecord {
            failing_since_unix_ms: Some(t),
            ..CheckRecord::default()
        }
    }

    #[test]
    fn only_list_upstreams_are_touched() {
        let cfg = Config::default();
        let now = 1000 * H;
        for origin in [Origin::Operator, Origin::Config] {
            let r = record(origin, 0);
            assert_eq!(
                verdict(&r, Some(&failing_since(0)), None, now, &cfg),
                Verdict::Keep
            );
        }
    }

    #[test]
    fn dead_for_long_is_disabled_unused_for_long_deleted() {
        let cfg = Config::default();
        let now = 1000 * H;
        let r = record(Origin::Source, now - 10 * H);
        assert_eq!(verdict(&r, None, Some(now - H), now, &cfg), Verdict::Keep);
        assert_eq!(
            verdict(&r, Some(&failing_since(now - H / 2)), None, now, &cfg),
            Verdict::Keep,
            "failing for only 30 minutes"
        );
        assert_eq!(
            verdict(&r, Some(&failing_since(now - 2 * H)), None, now, &cfg),
            Verdict::Disable("janitor: every check failed for 2h".into())
        );
        let mut disabled = r.clone();
        disabled.disabled = true;
        assert_eq!(
            verdict(
                &disabled,
                Some(&failing_since(now - 2 * H)),
                None,
                now,
                &cfg
            ),
            Verdict::Keep
        );
        let old = record(Origin::Source, now - 8 * 24 * H);
        assert_eq!(
            verdict(&old, None, None, now, &cfg),
            Verdict::Delete("never used for 8d".into())
        );
        assert_eq!(
            verdict(&old, None, Some(now - 7 * 24 * H - 1), now, &cfg),
            Verdict::Delete("unused for 7d".into())
        );
        assert_eq!(
            verdict(&old, None, Some(now - 6 * 24 * H), now, &cfg),
            Verdict::Keep
        );
    }
}
