//! Logical clocks: actors, dots and version vectors (Dynamo §4.4).
//!
//! Entries are keyed by the *coordinating node* in one incarnation (an [`Actor`]),
//! never by client, so a vector has at most one entry per node incarnation that ever
//! coordinated a write to the key. The incarnation is part of the actor because a node
//! that crashes may lose its last unsynced writes: if it came back under the same actor
//! it could hand out a dot it had already used for a different value, and merging would
//! silently keep only one of the two. A fresh actor per restart makes that impossible
//! (Riak reached the same fix with per-restart vnode epochs).

use std::collections::BTreeMap;

use crate::ring::NodeId;

/// Who coordinated a write: a node in one of its incarnations. The driver increments
/// the incarnation durably on every restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Actor {
    pub node: NodeId,
    pub incarnation: u32,
}

/// One write event: the `counter`-th write coordinated by `actor` for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dot {
    pub actor: Actor,
    pub counter: u64,
}

/// What a vector knows of one actor: its writes 1..=counter, and when (coordinator
/// time, milliseconds) the newest of them was made; the time orders pruning only.
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

    /// Drops the least recently updated entries until at most `entries_max` remain
    /// (ties broken by actor, so every replica prunes alike). Returns how many went.
    ///
    /// The trade-off (Dynamo §4.4 "clock truncation"): a pruned vector forgets that its
    /// version saw the dropped actors' writes, so those writes are no longer dominated
    /// and may reappear as siblings. Pruning never loses a write; it can only resurrect
    /// an overwritten or deleted one as a sibling for the client to resolve.
    pub fn prune(&mut self, entries_max: usize) -> usize {
        let excess = self.entries.len().saturating_sub(entries_max);
        if excess == 0 {
            return 0;
        }
        let mut by_age: Vec<(u64, Actor)> = self
            .entries
            .iter()
            .map(|(actor, entry)| (entry.updated_at_ms, *actor))
            .collect();
        by_age.sort_unstable();
        for (_, actor) in by_age.into_iter().take(excess) {
            self.entries.remove(&actor);
        }
        excess
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
            incarnation: 0,
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

    /// Dynamo §4.4: truncation removes the oldest (node, counter) pair first.
    #[test]
    fn prune_drops_oldest_entries_first() {
        let mut v = VersionVector::new();
        v.add(dot(1, 5), 300);
        v.add(dot(2, 1), 100);
        v.add(dot(3, 2), 200);
        assert_eq!(v.prune(2), 1);
        assert_eq!(v.counter(actor(2)), 0);
        assert_eq!(v.counter(actor(1)), 5);
        assert_eq!(v.counter(actor(3)), 2);
        assert_eq!(v.prune(2), 0);
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
