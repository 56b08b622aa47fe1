//! Logical clocks: actors, dots and version vectors (Dynamo §4.4).
//!
//! Entries are keyed by the *coordinating actor*, never by client, so a vector has at
//! most one entry per actor that ever coordinated a write to the key.
//!
//! The actor rule: a dot is drawn as one past the largest counter of its actor that
//! the coordinator knows for the key, which is safe only while the coordinator's local
//! state holds every dot its actor ever issued for that key. Whenever that may not be
//! true any more (the node restarted, its data directory was lost or restored, its
//! store failed a write or read, a record read back corrupt), the coordinator stops
//! using its actor and draws a new one. Epochs are random 64-bit numbers, never
//! derived from anything stored, so no lost or restored state can make a node reuse
//! one (docs/cluster.md, "Actors"; Riak reached the same fix with per-restart vnode
//! epochs).

use std::collections::BTreeMap;

use crate::ring::NodeId;

/// Who coordinated a write: a node during one epoch of its life. An epoch ends at
/// every restart and whenever the node can no longer vouch for its local state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Actor {
    pub node: NodeId,
    pub epoch: u64,
}

/// Draws actor epochs for one period of a node's life (from one start to its stop).
///
/// Seeded once per period with 64 random bits (the OS's randomness in production, the
/// seeded dice in the simulator). splitmix64 is a bijection of its counter, so one
/// period never draws an epoch twice; two periods collide with probability about
/// 2^-64 per pair of draws.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochSource {
    state: u64,
}

impl EpochSource {
    pub fn new(seed: u64) -> Self {
        EpochSource { state: seed }
    }

    pub fn next_epoch(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// One write event: the `counter`-th write coordinated by `actor` for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dot {
    pub actor: Actor,
    pub counter: u64,
}

/// What a vector knows of one actor: its writes 1..=counter, and when (the
/// coordinator's hybrid logical clock, milliseconds) the newest of them was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClockEntry {
    pub counter: u64,
    pub updated_at_ms: u64,
}

/// A version vector: for each actor, how many of its writes are known. It stands for
/// the set of dots {(a, 1..=v[a])}; absent actors are zero.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VersionVector {
    entries: BTreeMap<Actor, ClockEntry>,
}

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many of `actor`'s writes are known (0 when none).
    pub fn counter(&self, actor: Actor) -> u64 {
        self.entries.get(&actor).map_or(0, |e| e.counter)
    }

    /// Whether the write `dot` is in the set of dots this vector stands for.
    pub fn contains(&self, dot: Dot) -> bool {
        self.counter(dot.actor) >= dot.counter
    }

    /// Adds `dot` (and so every earlier dot of its actor) to the vector.
    pub fn add(&mut self, dot: Dot, updated_at_ms: u64) {
        self.merge_entry(
            dot.actor,
            ClockEntry {
                counter: dot.counter,
                updated_at_ms,
            },
        );
    }

    /// Pointwise maximum. Commutative, associative and idempotent, including the
    /// timestamps: on equal counters the later timestamp wins.
    pub fn join(&mut self, other: &VersionVector) {
        for (actor, entry) in &other.entries {
            self.merge_entry(*actor, *entry);
        }
    }

    /// Whether every dot of `other` is also in `self`.
    pub fn dominates_or_equals(&self, other: &VersionVector) -> bool {
        other
            .entries
            .iter()
            .all(|(actor, entry)| self.counter(*actor) >= entry.counter)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries in actor order.
    pub fn entries(&self) -> impl Iterator<Item = (Actor, ClockEntry)> + '_ {
        self.entries.iter().map(|(a, e)| (*a, *e))
    }

    /// Builds a vector from entries; later duplicates are joined into earlier ones.
    pub fn from_entries(entries: impl IntoIterator<Item = (Actor, ClockEntry)>) -> Self {
        let mut vector = VersionVector::new();
        for (actor, entry) in entries {
            vector.merge_entry(actor, entry);
        }
        vector
    }

    fn merge_entry(&mut self, actor: Actor, entry: ClockEntry) {
        if entry.counter == 0 {
            return;
        }
        let slot = self.entries.entry(actor).or_insert(entry);
        // ClockEntry orders by counter, then time: max() is the join of one entry.
        *slot = (*slot).max(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor(node: u32) -> Actor {
        Actor {
            node: NodeId(node),
            epoch: 0,
        }
    }

    fn dot(node: u32, counter: u64) -> Dot {
        Dot {
            actor: actor(node),
            counter,
        }
    }

    #[test]
    fn contains_every_earlier_dot_of_an_actor() {
        let mut v = VersionVector::new();
        v.add(dot(1, 3), 10);
        assert!(v.contains(dot(1, 1)));
        assert!(v.contains(dot(1, 3)));
        assert!(!v.contains(dot(1, 4)));
        assert!(!v.contains(dot(2, 1)));
    }

    #[test]
    fn an_epoch_source_never_repeats_itself_and_seeds_give_other_epochs() {
        let mut a = EpochSource::new(7);
        let mut b = EpochSource::new(8);
        let from_a: std::collections::BTreeSet<u64> = (0..10_000).map(|_| a.next_epoch()).collect();
        assert_eq!(from_a.len(), 10_000);
        assert!((0..10_000).all(|_| !from_a.contains(&b.next_epoch())));
    }

    #[test]
    fn join_takes_pointwise_maximum() {
        let mut a = VersionVector::new();
        a.add(dot(1, 2), 1);
        a.add(dot(2, 7), 1);
        let mut b = VersionVector::new();
        b.add(dot(1, 4), 2);
        let mut ab = a.clone();
        ab.join(&b);
        assert_eq!(ab.counter(actor(1)), 4);
        assert_eq!(ab.counter(actor(2)), 7);
        assert!(ab.dominates_or_equals(&a));
        assert!(ab.dominates_or_equals(&b));
        assert!(!a.dominates_or_equals(&b));
    }
}
