//! Sticky sessions: a session key pinned to one upstream until its TTL runs out.
//!
//! Sharded maps behind short mutexes (never held across an await): a lookup or a pin locks
//! one of [`SHARDS`] shards for a hash-map operation. Expired pins are dropped when met, and a
//! shard is swept of expired pins every [`SWEEP_EVERY`] pins, so idle sessions do not pile up.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

use proxygate_core::UpstreamId;

pub const SHARDS: usize = 32;
pub const SWEEP_EVERY: u32 = 1024;

#[derive(Debug, Clone, Copy)]
struct Pin {
    id: UpstreamId,
    expires_ms: u64,
}

#[derive(Debug, Default)]
struct Shard {
    pins: HashMap<String, Pin>,
    since_sweep: u32,
}

/// The session table.
#[derive(Debug)]
pub struct Sessions {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl Sessions {
    fn shard(&self, key: &str) -> &Mutex<Shard> {
        let h = self.hasher.hash_one(key) as usize;
        &self.shards[h % SHARDS]
    }

    /// The upstream `key` is pinned to, if the pin has not expired at `now_ms`.
    pub fn get(&self, key: &str, now_ms: u64) -> Option<UpstreamId> {
        let mut shard = self.shard(key).lock().ok()?;
        match shard.pins.get(key) {
            Some(p) if p.expires_ms > now_ms => Some(p.id),
            Some(_) => {
                shard.pins.remove(key);
                None
            }
            None => None,
        }
    }

    /// Pins `key` to `id` until `expires_ms`.
    pub fn pin(&self, key: &str, id: UpstreamId, expires_ms: u64, now_ms: u64) {
        let Ok(mut shard) = self.shard(key).lock() else {
            return;
        };
        shard.pins.insert(key.to_owned(), Pin { id, expires_ms });
        shard.since_sweep += 1;
        if shard.since_sweep >= SWEEP_EVERY {
            shard.since_sweep = 0;
            shard.pins.retain(|_, p| p.expires_ms > now_ms);
        }
    }

    /// Live pins (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .filter_map(|s| s.lock().ok().map(|s| s.pins.len()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_expire() {
        let s = Sessions::default();
        s.pin("a", UpstreamId(1), 100, 0);
        assert_eq!(s.get("a", 99), Some(UpstreamId(1)));
        assert_eq!(s.get("a", 100), None);
        assert!(s.is_empty(), "an expired pin is dropped when met");
    }

    #[test]
    fn sweeps_expired_pins() {
        let s = Sessions::default();
        for i in 0..(SWEEP_EVERY as usize * SHARDS * 2) {
            s.pin(&format!("k{i}"), UpstreamId(1), 10, 20);
        }
        assert!(s.len() < SWEEP_EVERY as usize * SHARDS, "{}", s.len());
    }
}
