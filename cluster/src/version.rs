//! Causal versions of one key: dotted version vectors (Dynamo §4.4, as refined by
//! Preguiça et al.'s "dotted version vectors", which Riak 2.0 adopted to stop sibling
//! explosion).
//!
//! Every stored value is a [`Version`]: the dot of the write that made it plus the
//! version vector the writer had read (its *past*). A version's causal history is its
//! past plus its own dot, so two versions are ordered exactly when one's dot is in the
//! other's history. A key holds a [`VersionSet`]: the versions no other version of the
//! set has seen (the *siblings*). Siblings are concurrent and all kept until a write
//! whose context saw them.
//!
//! Why the summary vector of a set is exact: a coordinator makes dot (a, n) only after
//! reading its local set, and that set holds every earlier dot of `a` or a version that
//! saw it (sets only lose versions by domination, and a restart gets a new actor). So
//! in every stored set the dots of each actor are closed downwards, and the vector
//! joined over a set's siblings claims only writes the siblings really saw.

use std::collections::BTreeMap;

use crate::clock::{Actor, Dot, VersionVector};

/// What a version holds: a value, or the mark that the key was deleted. Tombstones are
/// versions like any other, so a delete supersedes exactly what it saw and loses to
/// nothing it did not see.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    Data(Vec<u8>),
    Tombstone,
}

impl Value {
    pub fn data(&self) -> Option<&[u8]> {
        match self {
            Value::Data(bytes) => Some(bytes),
            Value::Tombstone => None,
        }
    }

    pub fn is_tombstone(&self) -> bool {
        matches!(self, Value::Tombstone)
    }
}

/// How a key's concurrent writes are resolved; a property of the namespace, recorded in
/// the stored set so every replica resolves alike.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConflictMode {
    /// Keep concurrent writes as siblings for the client to resolve (the default).
    #[default]
    Causal,
    /// Keep only the write with the latest coordinator timestamp (ties by dot),
    /// ignoring causality: concurrent writes are silently lost, by request.
    LastWriterWins,
}

/// One write's result: its dot, what its writer had seen, and the value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub dot: Dot,
    pub past: VersionVector,
    /// Coordinator time (ms) of the write; orders last-writer-wins and pruning only.
    pub written_at_ms: u64,
    pub value: Value,
}

impl Version {
    /// Whether `dot` is in this version's causal history (its past or itself).
    pub fn has_seen(&self, dot: Dot) -> bool {
        self.dot == dot || self.past.contains(dot)
    }

    /// Whether `other` saw this version (and is a different write).
    pub fn is_dominated_by(&self, other: &Version) -> bool {
        self.dot != other.dot && other.has_seen(self.dot)
    }

    /// This version's causal history as a vector: its past plus its dot.
    pub fn history(&self) -> VersionVector {
        let mut history = self.past.clone();
        history.add(self.dot, self.written_at_ms);
        history
    }

    fn lww_key(&self) -> (u64, Dot) {
        (self.written_at_ms, self.dot)
    }
}

/// The siblings of one key: versions no other member has seen, in dot order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct VersionSet {
    siblings: BTreeMap<Dot, Version>,
    mode: ConflictMode,
}

impl VersionSet {
    /// The empty set: a key never written (or whose record was lost here).
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a set from versions, dropping the dominated ones.
    pub fn from_versions(mode: ConflictMode, versions: impl IntoIterator<Item = Version>) -> Self {
        let mut set = VersionSet {
            siblings: BTreeMap::new(),
            mode,
        };
        for version in versions {
            set.insert_raw(version);
        }
        set.drop_dominated();
        set
    }

    pub fn mode(&self) -> ConflictMode {
        self.mode
    }

    pub fn siblings(&self) -> impl Iterator<Item = &Version> {
        self.siblings.values()
    }

    pub fn len(&self) -> usize {
        self.siblings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.siblings.is_empty()
    }

    /// True when every sibling is a tombstone (or there are none): the key reads as
    /// absent.
    pub fn is_deleted(&self) -> bool {
        self.siblings.values().all(|v| v.value.is_tombstone())
    }

    pub fn contains_dot(&self, dot: Dot) -> bool {
        self.siblings.contains_key(&dot)
    }

    /// The causal context a client gets with a read: the join of every sibling's
    /// history. A put carrying it supersedes exactly these siblings.
    pub fn context(&self) -> VersionVector {
        let mut context = VersionVector::new();
        for version in self.siblings.values() {
            context.join(&version.history());
        }
        context
    }

    /// Synchronises two replicas' sets: the union, minus every version some member has
    /// seen. Commutative, associative and idempotent, so replicas may exchange sets in
    /// any order, any number of times. In last-writer-wins mode only the latest write
    /// survives.
    pub fn sync(&self, other: &VersionSet) -> VersionSet {
        let mut merged = self.clone();
        merged.mode = self.mode.max(other.mode);
        for version in other.siblings.values() {
            merged.insert_raw(version.clone());
        }
        merged.drop_dominated();
        merged
    }

    /// The dot a new write coordinated by `actor` gets: one past every write of `actor`
    /// known here or in the client's context.
    pub fn next_dot(&self, actor: Actor, context: &VersionVector) -> Dot {
        self.checked_next_dot(actor, context)
            .expect("a counter below u64::MAX")
    }

    /// `next_dot`, or `None` when the counter would overflow (a context forged to
    /// claim u64::MAX).
    pub fn checked_next_dot(&self, actor: Actor, context: &VersionVector) -> Option<Dot> {
        let known = self.context().counter(actor).max(context.counter(actor));
        Some(Dot {
            actor,
            counter: known.checked_add(1)?,
        })
    }

    /// Keeps only the sibling that last-writer-wins would keep. Used on purpose in LWW
    /// mode, and as a deliberately broken merge by the simulator's sabotage switch.
    pub fn keep_latest_only(&mut self) {
        if let Some(latest) = self.siblings.values().max_by_key(|v| v.lww_key()).cloned() {
            self.siblings.clear();
            self.siblings.insert(latest.dot, latest);
        }
    }

    /// Checks that no member has seen another and that keys match dots.
    pub fn assert_invariants(&self) {
        for (dot, version) in &self.siblings {
            assert_eq!(*dot, version.dot);
            assert!(dot.counter > 0, "dot counters start at 1");
            for other in self.siblings.values() {
                assert!(
                    !version.is_dominated_by(other),
                    "{:?} is dominated by {:?} yet kept",
                    version.dot,
                    other.dot
                );
            }
        }
        if self.mode == ConflictMode::LastWriterWins {
            assert!(self.siblings.len() <= 1);
        }
    }

    /// Adds a version keyed by its dot. Two copies of one dot are the same write; should
    /// they ever differ (a bug elsewhere) the larger wins so the result stays
    /// independent of merge order.
    fn insert_raw(&mut self, version: Version) {
        match self.siblings.get_mut(&version.dot) {
            Some(existing) => {
                if version > *existing {
                    *existing = version;
                }
            }
            None => {
                self.siblings.insert(version.dot, version);
            }
        }
    }

    fn drop_dominated(&mut self) {
        let dominated: Vec<Dot> = self
            .siblings
            .values()
            .filter(|v| self.siblings.values().any(|w| v.is_dominated_by(w)))
            .map(|v| v.dot)
            .collect();
        for dot in dominated {
            self.siblings.remove(&dot);
        }
        if self.mode == ConflictMode::LastWriterWins {
            self.keep_latest_only();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::NodeId;

    fn actor(node: u32) -> Actor {
        Actor {
            node: NodeId(node),
            epoch: 0,
        }
    }

    fn write(
        set: &VersionSet,
        node: u32,
        context: &VersionVector,
        value: &str,
        at: u64,
    ) -> VersionSet {
        let dot = set.next_dot(actor(node), context);
        let version = Version {
            dot,
            past: context.clone(),
            written_at_ms: at,
            value: Value::Data(value.as_bytes().to_vec()),
        };
        set.sync(&VersionSet::from_versions(set.mode(), [version]))
    }

    /// Dynamo §4.4: a write without context is concurrent with what is there.
    #[test]
    fn blind_writes_become_siblings_and_a_contextual_write_resolves_them() {
        let empty = VersionSet::new();
        let one = write(&empty, 1, &VersionVector::new(), "a", 1);
        let two = write(&one, 1, &VersionVector::new(), "b", 2);
        assert_eq!(two.len(), 2);
        let resolved = write(&two, 1, &two.context(), "c", 3);
        assert_eq!(resolved.len(), 1);
        assert_eq!(
            resolved.siblings().next().unwrap().value,
            Value::Data(b"c".to_vec())
        );
        resolved.assert_invariants();
    }

    #[test]
    fn last_writer_wins_keeps_one_value() {
        let empty = VersionSet::from_versions(ConflictMode::LastWriterWins, []);
        let one = write(&empty, 1, &VersionVector::new(), "old", 5);
        let two = write(&one, 2, &VersionVector::new(), "new", 9);
        assert_eq!(two.len(), 1);
        assert_eq!(
            two.siblings().next().unwrap().value,
            Value::Data(b"new".to_vec())
        );
        two.assert_invariants();
    }

    #[test]
    fn a_tombstone_reads_as_deleted_until_a_concurrent_value_arrives() {
        let one = write(&VersionSet::new(), 1, &VersionVector::new(), "a", 1);
        let dot = one.next_dot(actor(2), &one.context());
        let tomb = Version {
            dot,
            past: one.context(),
            written_at_ms: 2,
            value: Value::Tombstone,
        };
        let deleted = one.sync(&VersionSet::from_versions(ConflictMode::Causal, [tomb]));
        assert!(deleted.is_deleted());
        assert_eq!(deleted.len(), 1);
        let revived = write(&deleted, 3, &VersionVector::new(), "b", 3);
        assert!(!revived.is_deleted());
        assert_eq!(revived.len(), 2);
    }
}
