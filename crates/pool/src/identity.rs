//! Who an upstream is, beyond its address: the exit IP the checker's judge saw (many free
//! "proxies" are one box on several ports or addresses) and its trust [`Tier`].
//!
//! Upstreams that exit from the same IP form an **exit group**. Selection treats a group as
//! one where identity matters:
//! - `round_robin` cycles over groups (a box listed on five ports gets one turn per cycle, not
//!   five), and over a group's members in turn;
//! - a sticky session is pinned to an exit: when its upstream stops serving, another member
//!   of the same group keeps the session's address before any other upstream is tried;
//! - a client asking for a new session does not get the exit its previous session had
//!   ([`NewSessionExit`]).
//!
//! An upstream whose exit is unknown (never checked) is a group of its own. The other
//! strategies draw upstreams as before: a group of five weighs what its five members weigh.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

use proxygate_core::{Tier, UpstreamId};
use serde::Deserialize;

/// What the catalog knows of an upstream's identity, published with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The address the judge saw its requests come from.
    pub exit: Option<IpAddr>,
    pub tier: Tier,
}

impl Default for Identity {
    /// An upstream published without a catalog (tests, the library alone): the operator's,
    /// exit unknown.
    fn default() -> Self {
        Identity {
            exit: None,
            tier: Tier::Operator,
        }
    }
}

/// The top bit of a group key: set when it is an exit IP's.
const EXIT: u64 = 1 << 63;

/// The group key of an upstream: its exit IP's when known (top bit set), else its own id's
/// (top bit clear), so an upstream with an unknown exit is alone in its group.
pub fn group_key(id: UpstreamId, exit: Option<IpAddr>) -> u64 {
    match exit {
        Some(ip) => {
            // Fixed keys: stable within the process, which is all a key needs.
            let mut h = std::hash::DefaultHasher::new();
            ip.hash(&mut h);
            h.finish() | EXIT
        }
        None => id.0 & !EXIT,
    }
}

/// An entry's identity, kept in atomics: a republish updates an entry carried over from the
/// previous snapshot in place (its health, and so its entry, must survive).
#[derive(Debug, Default)]
pub(crate) struct IdentityCell {
    group: AtomicU64,
    tier: AtomicU8,
    exit: Mutex<Option<IpAddr>>,
}

impl IdentityCell {
    pub(crate) fn new(id: UpstreamId, ident: Identity) -> IdentityCell {
        let cell = IdentityCell::default();
        cell.set(id, ident);
        cell
    }

    pub(crate) fn set(&self, id: UpstreamId, ident: Identity) {
        self.group
            .store(group_key(id, ident.exit), Ordering::Relaxed);
        self.tier.store(ident.tier.code(), Ordering::Relaxed);
        if let Ok(mut e) = self.exit.lock() {
            *e = ident.exit;
        }
    }

    pub(crate) fn group(&self) -> u64 {
        self.group.load(Ordering::Relaxed)
    }

    pub(crate) fn tier(&self) -> Tier {
        Tier::from_code(self.tier.load(Ordering::Relaxed))
    }

    pub(crate) fn exit(&self) -> Option<IpAddr> {
        self.exit.lock().ok().and_then(|e| *e)
    }
}

/// The exit groups of a snapshot's members, by position. Flat arrays rather than a vector per
/// group: most pools have no exit known to be shared, so each member is a group of its own,
/// and a `Vec` apiece cost ~90 bytes per upstream (~0.9 MB at 10,000) for nothing.
#[derive(Debug, Default)]
pub(crate) struct ExitGroups {
    /// Group key to group index, for the keys of known exits only: an unknown exit's key is
    /// its upstream's own, which no other member shares, and a config pool knows no exits.
    index: HashMap<u64, u32>,
    /// Every member's position, group by group, each group's in entry order; groups in order
    /// of first member.
    order: Box<[u32]>,
    /// Where each group starts in `order`, and its end last. Empty when no group has more
    /// than one member: group `i` is then `order[i]` alone.
    starts: Box<[u32]>,
    /// Each group's turn among its members (round robin within a group); empty when no group
    /// has more than one member.
    turns: Box<[AtomicU32]>,
}

impl ExitGroups {
    /// The groups of `keys` (one group key per position).
    pub(crate) fn build(keys: impl IntoIterator<Item = u64>) -> ExitGroups {
        let keys = keys.into_iter();
        let mut index = HashMap::with_capacity(keys.size_hint().0);
        // Each position's group, and each group's size.
        let mut group_of = Vec::with_capacity(keys.size_hint().0);
        let mut sizes: Vec<u32> = Vec::new();
        for key in keys {
            let next = u32::try_from(sizes.len()).unwrap_or(u32::MAX);
            let i = *index.entry(key).or_insert(next);
            if i == next {
                sizes.push(0);
            }
            if let Some(n) = sizes.get_mut(i as usize) {
                *n += 1;
            }
            group_of.push(i);
        }
        index.retain(|key, _| key & EXIT != 0);
        let to_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        if sizes.len() == group_of.len() {
            // Every member its own group, in entry order: group i is position i.
            index.shrink_to_fit();
            return ExitGroups {
                index,
                order: (0..to_u32(group_of.len())).collect(),
                starts: Box::default(),
                turns: Box::default(),
            };
        }
        let mut starts = Vec::with_capacity(sizes.len() + 1);
        let mut at = 0u32;
        for n in &sizes {
            starts.push(at);
            at += n;
        }
        starts.push(at);
        // Filled in entry order, so each group's members keep it.
        let mut next = starts.clone();
        let mut order = vec![0u32; group_of.len()];
        for (pos, g) in group_of.iter().enumerate() {
            let slot = &mut next[*g as usize];
            order[*slot as usize] = to_u32(pos);
            *slot += 1;
        }
        ExitGroups {
            index,
            order: order.into(),
            turns: (0..sizes.len()).map(|_| AtomicU32::new(0)).collect(),
            starts: starts.into(),
        }
    }

    /// Whether some exit is shared by several members.
    pub(crate) fn is_shared(&self) -> bool {
        !self.starts.is_empty()
    }

    /// How many groups.
    pub(crate) fn len(&self) -> usize {
        match self.starts.len() {
            0 => self.order.len(),
            n => n - 1,
        }
    }

    /// Group `i`'s members (positions).
    fn group(&self, i: usize) -> &[u32] {
        if self.starts.is_empty() {
            return self.order.get(i..=i).unwrap_or_default();
        }
        match (self.starts.get(i), self.starts.get(i + 1)) {
            (Some(&a), Some(&b)) => self.order.get(a as usize..b as usize).unwrap_or_default(),
            _ => &[],
        }
    }

    /// Group `i`'s members, starting at its next turn (each call moves the turn on).
    pub(crate) fn in_turn(&self, i: usize) -> impl Iterator<Item = u32> + '_ {
        let m = self.group(i);
        let start = self
            .turns
            .get(i)
            .map_or(0, |t| t.fetch_add(1, Ordering::Relaxed) as usize);
        (0..m.len()).map(move |k| m[(start + k) % m.len()])
    }

    /// The members (positions) of the group with key `key`, when it is a known exit's (empty
    /// for an unknown exit's key: that member is alone in its group).
    pub(crate) fn members_of(&self, key: u64) -> &[u32] {
        self.index
            .get(&key)
            .map_or(&[][..], |i| self.group(*i as usize))
    }
}

/// What a client asking for a new session (a session id not pinned) may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NewSessionExit {
    /// Never the exit IP its previous session had: with no other exit left, the request
    /// fails (a client that asks for a new identity does not silently keep the old one).
    #[default]
    Different,
    /// Another exit when one is left, else the same.
    PreferDifferent,
    /// Whatever the strategy picks.
    Any,
}

impl NewSessionExit {
    pub fn as_str(self) -> &'static str {
        match self {
            NewSessionExit::Different => "different",
            NewSessionExit::PreferDifferent => "prefer_different",
            NewSessionExit::Any => "any",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            NewSessionExit::Different => 0,
            NewSessionExit::PreferDifferent => 1,
            NewSessionExit::Any => 2,
        }
    }

    pub(crate) fn from_code(c: u8) -> NewSessionExit {
        match c {
            1 => NewSessionExit::PreferDifferent,
            2 => NewSessionExit::Any,
            _ => NewSessionExit::Different,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn keys_group_by_exit_and_unknown_exits_stand_alone() {
        let (a, b) = (UpstreamId(1), UpstreamId(2));
        assert_eq!(
            group_key(a, ip("203.0.113.5")),
            group_key(b, ip("203.0.113.5"))
        );
        assert_ne!(
            group_key(a, ip("203.0.113.5")),
            group_key(a, ip("203.0.113.6"))
        );
        assert_ne!(group_key(a, None), group_key(b, None));
        assert_ne!(group_key(a, None), group_key(a, ip("203.0.113.5")));
    }

    #[test]
    fn groups_and_turns() {
        let [k7, k8, k9] = [7, 8, 9].map(|k| k | EXIT);
        let g = ExitGroups::build([k7, k9, k7, k8, k7]);
        assert!(g.is_shared());
        assert_eq!(g.len(), 3);
        assert_eq!(g.members_of(k7), [0, 2, 4]);
        assert_eq!(g.members_of(1 | EXIT), [] as [u32; 0]);
        let first: Vec<u32> = g.in_turn(0).collect();
        let second: Vec<u32> = g.in_turn(0).collect();
        assert_eq!(first, [0, 2, 4]);
        assert_eq!(second, [2, 4, 0]);
        assert_eq!(g.in_turn(1).collect::<Vec<_>>(), [1]);
        assert_eq!(g.in_turn(2).collect::<Vec<_>>(), [3]);
        assert_eq!(g.members_of(k8), [3]);
        assert_eq!(g.in_turn(3).count(), 0);
        // An unknown exit's key makes a group like any other, but is not kept in the index:
        // looking it up finds nothing.
        let mixed = ExitGroups::build([5, k7, k7]);
        assert!(mixed.is_shared() && mixed.len() == 2);
        assert_eq!(
            (mixed.members_of(5), mixed.members_of(k7)),
            (&[][..], &[1, 2][..])
        );
        let alone = ExitGroups::build([1, 2, 3 | EXIT]);
        assert!(!alone.is_shared());
        assert_eq!(alone.len(), 3);
        assert_eq!(alone.members_of(3 | EXIT), [2]);
        assert_eq!(alone.members_of(4 | EXIT), [] as [u32; 0]);
        assert_eq!(alone.in_turn(1).collect::<Vec<_>>(), [1]);
        assert_eq!(alone.in_turn(1).collect::<Vec<_>>(), [1]);
        assert_eq!(alone.in_turn(3).count(), 0);
        // Lone exits keep no arrays per group, only their positions, and unknown exits no key.
        assert!(alone.starts.is_empty() && alone.turns.is_empty());
        assert_eq!(alone.index.len(), 1);
        let none = ExitGroups::build([]);
        assert!(!none.is_shared() && none.len() == 0 && none.members_of(1).is_empty());
    }
}
