//! Source quality: which sources are worth their fetches. Pure policy ([`policy`]) over a
//! source's recent yields, and [`Quality`], the table the refresher (how often to fetch) and
//! the app (which candidates to check first) share.
//!
//! A source whose last [`WINDOW`] fetches yielded under [`LOW_YIELD`] of their unique
//! candidates as passing checks is fetched [`SLOWDOWN`] times less often (never less than
//! once a day) and its candidates are checked after everyone else's.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Fetches looked at.
pub const WINDOW: usize = 3;
/// Passed / unique under this is "near zero".
pub const LOW_YIELD: f64 = 0.01;
/// How much less often a low-yield source is fetched.
pub const SLOWDOWN: u32 = 4;
const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// One fetch's yield: unique candidates, and how many of them passed their check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Yield {
    pub unique: u64,
    pub passed: u64,
}

/// What to do about a source.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Policy {
    /// Interval multiplier (1: as configured).
    pub slowdown: u32,
    /// Its candidates go to the back of the check queue.
    pub check_last: bool,
    /// Why, for `sources list`.
    pub why: Option<String>,
}

/// The policy for a source whose recent yields (oldest first) are `recent`.
pub fn policy(recent: &[Yield]) -> Policy {
    let last: Vec<&Yield> = recent.iter().rev().take(WINDOW).collect();
    let unique: u64 = last.iter().map(|y| y.unique).sum();
    let passed: u64 = last.iter().map(|y| y.passed).sum();
    if last.len() < WINDOW || unique == 0 {
        return Policy {
            slowdown: 1,
            ..Policy::default()
        };
    }
    let share = passed as f64 / unique as f64;
    if share >= LOW_YIELD {
        return Policy {
            slowdown: 1,
            ..Policy::default()
        };
    }
    Policy {
        slowdown: SLOWDOWN,
        check_last: true,
        why: Some(format!(
            "yield {:.2}% ({passed} of {unique} candidates passed) over the last {WINDOW} \
             fetches: fetched {SLOWDOWN}x less often, checked last",
            share * 100.0
        )),
    }
}

/// How long to wait before fetching a source again.
pub fn next_interval(interval: Duration, p: &Policy) -> Duration {
    interval
        .saturating_mul(p.slowdown.max(1))
        .min(MAX_INTERVAL.max(interval))
}

/// The current policy of every source.
#[derive(Debug, Default)]
pub struct Quality(Mutex<HashMap<String, Policy>>);

impl Quality {
    pub fn set(&self, source: &str, p: Policy) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(source.to_owned(), p);
    }

    pub fn get(&self, source: &str) -> Policy {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(source)
            .cloned()
            .unwrap_or(Policy {
                slowdown: 1,
                ..Policy::default()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn y(unique: u64, passed: u64) -> Yield {
        Yield { unique, passed }
    }

    #[test]
    fn near_zero_yield_slows_a_source_down() {
        assert_eq!(policy(&[]).slowdown, 1);
        assert_eq!(
            policy(&[y(1000, 0), y(1000, 0)]).slowdown,
            1,
            "too few fetches"
        );
        let p = policy(&[y(900, 50), y(1000, 2), y(1000, 3), y(1000, 4)]);
        assert_eq!((p.slowdown, p.check_last), (4, true));
        assert!(p.why.unwrap().contains("9 of 3000"));
        let p = policy(&[y(1000, 2), y(1000, 3), y(1000, 40)]);
        assert_eq!(p.slowdown, 1, "1.5% is not near zero");
        assert_eq!(
            policy(&[y(0, 0), y(0, 0), y(0, 0)]).slowdown,
            1,
            "nothing fetched"
        );
        let slow = Policy {
            slowdown: 4,
            ..Policy::default()
        };
        assert_eq!(
            next_interval(Duration::from_secs(3600), &slow),
            Duration::from_secs(4 * 3600)
        );
        assert_eq!(
            next_interval(Duration::from_secs(12 * 3600), &slow),
            MAX_INTERVAL
        );
    }
}
