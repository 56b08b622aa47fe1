//! The invariants every run is held to (docs/simulator.md lists them):
//!
//! 1. A put acknowledged at W is returned by every later read at R with R + W > N, as
//!    itself or a causal successor (Dynamo §4.5 with §2's "always writeable" caveat:
//!    only for overlapping quorums).
//! 2. Concurrent writes survive as siblings until a write that saw them.
//! 3. Once faults stop and reads repair, the replicas of every key hold identical sets.
//! 4. Deleted (and overwritten) values do not come back once the delete is acked.
//!
//! The checkers judge the cluster by what clients sent and saw (the contexts they
//! passed, the dots they were acked), never by the cluster's own bookkeeping.

use std::collections::BTreeMap;

use ringkv_cluster::{Dot, NodeId, Value, VersionSet};

use crate::history::{GetRecord, History, PutRecord};

/// One broken invariant, in words a person can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub checker: Checker,
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Checker {
    /// 1: an acknowledged write vanished from a later quorum read.
    AckedWriteReadable,
    /// 2: a concurrent write was dropped although no write saw it.
    SiblingsSurvive,
    /// 3: replicas disagree after the healing phase (or work is stuck).
    Convergence,
    /// 4: a value deleted or overwritten by an acked write came back.
    NoResurrection,
    /// A read returned a value under a dot that was written with another value.
    ValueIntegrity,
}

/// Checks 1, 4 and value integrity over every successful read.
pub fn check_reads(history: &History) -> Vec<Violation> {
    let mut violations = Vec::new();
    // Dots number one key's writes: the same dot on two keys names two writes.
    let mut written: BTreeMap<&[u8], BTreeMap<Dot, &PutRecord>> = BTreeMap::new();
    for put in &history.puts {
        if let Some(dot) = put.acked_dot() {
            written.entry(&put.key).or_default().insert(dot, put);
        }
    }
    let none = BTreeMap::new();
    for get in &history.gets {
        let of_key = written.get(get.key.as_slice()).unwrap_or(&none);
        check_values(get.op, &get.versions, of_key, &mut violations);
        for put in history.puts.iter().filter(|p| p.key == get.key) {
            let Some(dot) = put.acked_dot() else { continue };
            let acked_before = put.end.is_some_and(|end| end < get.start);
            if !acked_before || !overlapping(put, get) {
                continue;
            }
            if !get.context.contains(dot) {
                violations.push(Violation {
                    checker: Checker::AckedWriteReadable,
                    detail: format!(
                        "get #{} (R={}) at {:?} lost put #{} {dot:?} (W={}) acked at {:?}",
                        get.op,
                        get.quorum.r(),
                        get.start,
                        put.op,
                        put.quorum.w(),
                        put.end
                    ),
                });
            }
            for sibling in get.versions.siblings() {
                if put.context.contains(sibling.dot) {
                    violations.push(Violation {
                        checker: Checker::NoResurrection,
                        detail: format!(
                            "get #{} returned {:?}, superseded by put #{} ({}) acked at {:?}",
                            get.op,
                            sibling.dot,
                            put.op,
                            if put.value.is_none() {
                                "a delete"
                            } else {
                                "a write"
                            },
                            put.end
                        ),
                    });
                }
            }
        }
    }
    violations
}

/// Check 2 on the final state of one key: every acked write that no issued write saw
/// is still a sibling, with its value; and nothing any acked write superseded remains.
pub fn check_final_key(
    key: &[u8],
    final_set: &VersionSet,
    history: &History,
    violations: &mut Vec<Violation>,
) {
    let puts: Vec<&PutRecord> = history.puts.iter().filter(|p| p.key == key).collect();
    let written: BTreeMap<Dot, &PutRecord> = puts
        .iter()
        .filter_map(|p| p.acked_dot().map(|d| (d, *p)))
        .collect();
    check_values(u64::MAX, final_set, &written, violations);
    for put in &puts {
        let Some(dot) = put.acked_dot() else { continue };
        let seen_by_a_write = puts
            .iter()
            .any(|q| q.op != put.op && q.context.contains(dot));
        if !seen_by_a_write && !final_set.contains_dot(dot) {
            violations.push(Violation {
                checker: Checker::SiblingsSurvive,
                detail: format!(
                    "key {:?}: put #{} {dot:?} was acked and seen by no write, but is gone: {:?}",
                    String::from_utf8_lossy(key),
                    put.op,
                    final_set.siblings().map(|v| v.dot).collect::<Vec<_>>()
                ),
            });
        }
        if put.acked_dot().is_some() {
            for sibling in final_set.siblings() {
                if put.context.contains(sibling.dot) {
                    violations.push(Violation {
                        checker: Checker::NoResurrection,
                        detail: format!(
                            "key {:?}: final state holds {:?}, superseded by acked put #{}",
                            String::from_utf8_lossy(key),
                            sibling.dot,
                            put.op
                        ),
                    });
                }
            }
        }
    }
}

/// Check 3 on one key: every replica holds the same set.
pub fn check_converged(
    key: &[u8],
    replicas: &[(NodeId, VersionSet)],
    violations: &mut Vec<Violation>,
) {
    let Some((first_node, first)) = replicas.first() else {
        return;
    };
    for (node, set) in &replicas[1..] {
        if set != first {
            violations.push(Violation {
                checker: Checker::Convergence,
                detail: format!(
                    "key {:?}: replica {:?} holds {:?} but {:?} holds {:?}",
                    String::from_utf8_lossy(key),
                    node,
                    set.siblings().map(|v| v.dot).collect::<Vec<_>>(),
                    first_node,
                    first.siblings().map(|v| v.dot).collect::<Vec<_>>()
                ),
            });
        }
    }
}

fn overlapping(put: &PutRecord, get: &GetRecord) -> bool {
    put.quorum.n() == get.quorum.n() && put.quorum.w() + get.quorum.r() > put.quorum.n()
}

fn check_values(
    op: u64,
    set: &VersionSet,
    written: &BTreeMap<Dot, &PutRecord>,
    violations: &mut Vec<Violation>,
) {
    for sibling in set.siblings() {
        let Some(put) = written.get(&sibling.dot) else {
            continue;
        };
        let expected = match &put.value {
            Some(bytes) => Value::Data(bytes.clone()),
            None => Value::Tombstone,
        };
        if sibling.value != expected {
            violations.push(Violation {
                checker: Checker::ValueIntegrity,
                detail: format!(
                    "read #{op}: {:?} holds another value than put #{}",
                    sibling.dot, put.op
                ),
            });
        }
    }
}
