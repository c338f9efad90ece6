//! Sticky sessions: a session key pinned to one upstream (and its exit group) until its TTL
//! runs out, and each client's last session exit (so a new session can avoid it).
//!
//! A session key is `client NUL session-id` (the gateway uses the account as the client):
//! [`client_of`] is the part before the NUL.
//!
//! Sharded maps behind short mutexes (never held across an await): a lookup or a pin locks
//! one of [`SESSION_SHARDS`] shards for a hash-map operation. Expired pins are dropped when
//! met, and a shard is swept of expired pins every [`SWEEP_EVERY`] pins, so idle sessions do
//! not pile up.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

use proxygate_core::UpstreamId;

/// Maps (each behind its own mutex) the sessions are spread over: a few per thread, so two
/// threads rarely wait on one lock.
pub const SESSION_SHARDS: usize = 32;
/// Pins between two sweeps of a shard for expired ones.
pub const SWEEP_EVERY: u32 = 1024;

#[derive(Debug, Clone, Copy)]
struct Pin {
    id: UpstreamId,
    /// The exit group of `id` when pinned ([`crate::identity::group_key`]).
    group: u64,
    expires_ms: u64,
}

#[derive(Debug, Default)]
struct Shard {
    pins: HashMap<String, Pin>,
    /// Client to the exit group of its latest session, until that session's pin expires.
    last_exit: HashMap<String, (u64, u64)>,
    since_sweep: u32,
}

/// The session key of session `id` of `client` (`client NUL id`): two clients never share a
/// session.
pub fn key(client: &str, id: &str) -> String {
    format!("{client}\0{id}")
}

/// The client part of a session key (see [`key`]).
pub fn client_of(key: &str) -> &str {
    key.split('\0').next().unwrap_or(key)
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
            shards: (0..SESSION_SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl Sessions {
    fn shard(&self, key: &str) -> &Mutex<Shard> {
        let h = self.hasher.hash_one(key) as usize;
        &self.shards[h % SESSION_SHARDS]
    }

    /// The upstream `key` is pinned to and its exit group, if the pin has not expired at
    /// `now_ms`.
    pub fn get(&self, key: &str, now_ms: u64) -> Option<(UpstreamId, u64)> {
        let mut shard = self.shard(key).lock().ok()?;
        match shard.pins.get(key) {
            Some(p) if p.expires_ms > now_ms => Some((p.id, p.group)),
            Some(_) => {
                shard.pins.remove(key);
                None
            }
            None => None,
        }
    }

    /// Pins `key` to `id` (of exit group `group`) until `expires_ms`, and remembers that
    /// exit as its client's latest until then.
    pub fn pin(&self, key: &str, id: UpstreamId, group: u64, expires_ms: u64, now_ms: u64) {
        let pin = Pin {
            id,
            group,
            expires_ms,
        };
        self.with_shard(key, now_ms, |s| {
            s.pins.insert(key.to_owned(), pin);
        });
        let client = client_of(key);
        self.with_shard(client, now_ms, |s| {
            s.last_exit.insert(client.to_owned(), (group, expires_ms));
        });
    }

    /// The exit group of `client`'s latest session, while that session's pin lasts.
    pub fn last_exit(&self, client: &str, now_ms: u64) -> Option<u64> {
        let shard = self.shard(client).lock().ok()?;
        shard
            .last_exit
            .get(client)
            .filter(|(_, expires)| *expires > now_ms)
            .map(|(g, _)| *g)
    }

    fn with_shard(&self, key: &str, now_ms: u64, f: impl FnOnce(&mut Shard)) {
        let Ok(mut shard) = self.shard(key).lock() else {
            return;
        };
        f(&mut shard);
        shard.since_sweep += 1;
        if shard.since_sweep >= SWEEP_EVERY {
            shard.since_sweep = 0;
            shard.pins.retain(|_, p| p.expires_ms > now_ms);
            shard.last_exit.retain(|_, (_, expires)| *expires > now_ms);
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
        s.pin("c\0a", UpstreamId(1), 7, 100, 0);
        assert_eq!(s.get("c\0a", 99), Some((UpstreamId(1), 7)));
        assert_eq!(s.last_exit("c", 99), Some(7));
        assert_eq!(s.get("c\0a", 100), None);
        assert_eq!(s.last_exit("c", 100), None);
        assert!(s.is_empty(), "an expired pin is dropped when met");
    }

    #[test]
    fn sweeps_expired_pins() {
        let s = Sessions::default();
        for i in 0..(SWEEP_EVERY as usize * SESSION_SHARDS * 2) {
            s.pin(&format!("c{i}\0k"), UpstreamId(1), 1, 10, 20);
        }
        assert!(
            s.len() < SWEEP_EVERY as usize * SESSION_SHARDS,
            "{}",
            s.len()
        );
        let clients: usize = s
            .shards
            .iter()
            .map(|sh| sh.lock().unwrap().last_exit.len())
            .sum();
        assert!(clients < SWEEP_EVERY as usize * SESSION_SHARDS, "{clients}");
    }
}
