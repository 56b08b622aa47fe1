//! Causal version properties (Dynamo §4.4 "Data Versioning"), checked on histories the
//! real operations produce: replicas coordinate writes with contexts clients read from
//! any replica, and exchange sets in any order. A model keeps each write's true causal
//! history (explicit sets of write ids) to judge the dotted version vectors against.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use ringkv_cluster::{
    Actor, ConflictMode, Context, Dot, NodeId, StoredVersions, Value, Version, VersionSet,
    VersionVector,
};

const REPLICAS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    /// A client reads `read_from` (or nothing) and writes through coordinator `at`.
    Put {
        at: usize,
        read_from: Option<usize>,
        delete: bool,
    },
    /// Replica `to` receives replica `from`'s set and merges it.
    Sync { from: usize, to: usize },
    /// Replica `at` restarts: same data, new incarnation.
    Restart { at: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..REPLICAS, prop::option::of(0..REPLICAS), prop::bool::weighted(0.2))
            .prop_map(|(at, read_from, delete)| Op::Put { at, read_from, delete }),
        4 => (0..REPLICAS, 0..REPLICAS).prop_map(|(from, to)| Op::Sync { from, to }),
        1 => (0..REPLICAS).prop_map(|at| Op::Restart { at }),
    ]
}

/// Replicas plus the ground truth: every write's true causal history.
struct World {
    replicas: Vec<VersionSet>,
    incarnations: Vec<u64>,
    truth: BTreeMap<Dot, BTreeSet<Dot>>,
    /// Every set any replica held at any point, for the merge laws.
    seen_sets: Vec<VersionSet>,
    clock_ms: u64,
}

impl World {
    fn new() -> Self {
        World {
            replicas: vec![VersionSet::new(); REPLICAS],
            incarnations: vec![0; REPLICAS],
            truth: BTreeMap::new(),
            seen_sets: Vec::new(),
            clock_ms: 0,
        }
    }

    /// Whether write `a` is in the true history of write `b` (and differs from it).
    fn truly_seen(&self, a: Dot, b: Dot) -> bool {
        a != b && self.truth[&b].contains(&a)
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        self.clock_ms += 1;
        match *op {
            Op::Put {
                at,
                read_from,
                delete,
            } => {
                let read = read_from
                    .map(|r| self.replicas[r].clone())
                    .unwrap_or_default();
                // The client's context travels as bytes, as it would over the wire.
                let context = Context::decode(&Context(read.context()).encode()).unwrap();
                let actor = Actor {
                    node: NodeId(at as u32),
                    epoch: self.incarnations[at],
                };
                let local = self.replicas[at].clone();
                let dot = local.next_dot(actor, context.vector());
                prop_assert!(!self.truth.contains_key(&dot), "dot {dot:?} reused");
                let mut history: BTreeSet<Dot> = read
                    .siblings()
                    .flat_map(|v| self.truth[&v.dot].iter().copied())
                    .collect();
                history.insert(dot);
                self.truth.insert(dot, history);
                let version = Version {
                    dot,
                    past: context.vector().clone(),
                    written_at_ms: self.clock_ms,
                    value: if delete {
                        Value::Tombstone
                    } else {
                        Value::Data(format!("w{}", self.truth.len()).into_bytes())
                    },
                };
                let after = local.sync(&VersionSet::from_versions(ConflictMode::Causal, [version]));
                // Dynamo §4.4: a put with a context supersedes exactly what it saw.
                for old in local.siblings() {
                    let saw = self.truly_seen(old.dot, dot);
                    prop_assert_eq!(after.contains_dot(old.dot), !saw, "sibling {:?}", old.dot);
                }
                prop_assert!(after.contains_dot(dot));
                self.replicas[at] = after;
            }
            Op::Sync { from, to } => {
                let (a, b) = (self.replicas[from].clone(), self.replicas[to].clone());
                let merged = b.sync(&a);
                // No concurrent sibling is ever dropped: whatever left was truly seen
                // by a survivor.
                for version in a.siblings().chain(b.siblings()) {
                    if !merged.contains_dot(version.dot) {
                        let covered = merged
                            .siblings()
                            .any(|s| self.truly_seen(version.dot, s.dot));
                        prop_assert!(covered, "{:?} dropped though concurrent", version.dot);
                    }
                }
                self.replicas[to] = merged;
            }
            Op::Restart { at } => self.incarnations[at] += 1,
        }
        for set in &self.replicas {
            set.assert_invariants();
            self.check_clock_agrees_with_truth(set)?;
            self.seen_sets.push(set.clone());
        }
        Ok(())
    }

    /// The vector order matches true causality for every pair of live versions, and
    /// the set's context claims only writes its siblings truly saw.
    fn check_clock_agrees_with_truth(&self, set: &VersionSet) -> Result<(), TestCaseError> {
        let all: Vec<&Version> = set.siblings().collect();
        for a in &all {
            for b in &all {
                prop_assert_eq!(a.is_dominated_by(b), self.truly_seen(a.dot, b.dot));
            }
        }
        let context = set.context();
        for dot in self.truth.keys() {
            let truly = set.siblings().any(|s| self.truth[&s.dot].contains(dot));
            prop_assert_eq!(
                context.contains(*dot),
                truly,
                "context vs truth for {:?}",
                dot
            );
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Dynamo §4.4: versions are kept until a write that saw them; contexts and clocks
    /// agree with true causality; no dot is handed out twice.
    #[test]
    fn histories_respect_causality(ops in prop::collection::vec(op(), 1..40)) {
        let mut world = World::new();
        for op in &ops {
            world.apply(op)?;
        }
    }

    /// Dynamo §4.4 reconciliation ("syntactic reconciliation") is a join: merging
    /// replica sets is commutative, associative and idempotent.
    #[test]
    fn merge_is_a_join(ops in prop::collection::vec(op(), 1..30), picks in prop::collection::vec(any::<prop::sample::Index>(), 3)) {
        let mut world = World::new();
        for op in &ops {
            world.apply(op)?;
        }
        let sets = &world.seen_sets;
        let a = &sets[picks[0].index(sets.len())];
        let b = &sets[picks[1].index(sets.len())];
        let c = &sets[picks[2].index(sets.len())];
        prop_assert_eq!(a.sync(b), b.sync(a));
        prop_assert_eq!(a.sync(&b.sync(c)), a.sync(b).sync(c));
        prop_assert_eq!(a.sync(a), a.clone());
        prop_assert_eq!(a.sync(&VersionSet::new()), a.clone());
    }

    /// The stored form and the client context survive encoding exactly.
    #[test]
    fn encodings_round_trip(ops in prop::collection::vec(op(), 1..30)) {
        let mut world = World::new();
        for op in &ops {
            world.apply(op)?;
        }
        for set in &world.replicas {
            let stored = StoredVersions::encode(set);
            prop_assert_eq!(&stored.decode().unwrap(), set);
            prop_assert_eq!(stored.tombstone, set.is_deleted());
            let context = Context(set.context());
            prop_assert_eq!(Context::decode(&context.encode()).unwrap(), context);
        }
    }

    /// Decoding arbitrary bytes never panics; it succeeds or names a reason.
    #[test]
    fn decoding_garbage_never_panics(version in prop::collection::vec(any::<u8>(), 0..200), value in prop::collection::vec(any::<u8>(), 0..20)) {
        let _ = Context::decode(&version);
        let _ = StoredVersions { version, value, tombstone: false }.decode();
    }
}

/// Why a coordinator that lost its local state must stop using its actor: the dot it
/// draws next is one it already issued, and a replica holding the first write takes
/// the second for it and drops it. A new epoch makes the second write a sibling.
#[test]
fn a_coordinator_that_lost_its_state_keeps_every_write_only_under_a_new_epoch() {
    let write = |actor: Actor, set: &VersionSet, value: &[u8]| {
        let version = Version {
            dot: set.next_dot(actor, &VersionVector::new()),
            past: VersionVector::new(),
            written_at_ms: 1,
            value: Value::Data(value.to_vec()),
        };
        VersionSet::from_versions(ConflictMode::Causal, [version])
    };
    let first = Actor {
        node: NodeId(1),
        epoch: 11,
    };
    // Node 1 coordinates a write that replica 2 stores; then node 1 loses its disk.
    let replica_2 = VersionSet::new().sync(&write(first, &VersionSet::new(), b"one"));
    let forgotten = VersionSet::new();
    // Kept actor: the blind write draws dot (1, 11, 1) again and replica 2 drops it.
    let reused = replica_2.sync(&write(first, &forgotten, b"two"));
    assert_eq!(
        reused.len(),
        1,
        "the second write vanished under a reused dot"
    );
    // New epoch: both writes survive as siblings.
    let second = Actor {
        node: NodeId(1),
        epoch: 12,
    };
    let kept = replica_2.sync(&write(second, &forgotten, b"two"));
    let values: Vec<_> = kept.siblings().map(|v| v.value.clone()).collect();
    assert_eq!(
        values,
        vec![Value::Data(b"one".to_vec()), Value::Data(b"two".to_vec())]
    );
}
