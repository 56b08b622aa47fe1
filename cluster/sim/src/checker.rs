//! The invariants every run is held to (docs/simulator.md lists them):
//!
//! 1. A put acknowledged at W is returned by every later read at R with R + W > N, as
//!    itself or a causal successor (Dynamo §4.5 with §2's "always writeable" caveat:
//!    only for overlapping quorums).
//! 2. Concurrent writes survive as siblings until a write that saw them.
//! 3. Once faults stop and reads repair, the replicas of every key hold identical sets.
//! 4. Deleted (and overwritten) values do not come back once the delete is acked.
//! 5. A read returns under a dot the value written under it.
//! 6. No two acknowledged writes of one key carry the same dot (a reused dot makes
//!    replicas take the second write for the first and drop it).
//! 7. A write's stamp is above the stamp of every write its client had seen, however
//!    skewed or jumpy the coordinators' wall clocks (last-writer-wins relies on it).
//!
//! The checkers judge the cluster by what clients sent and saw (the values they wrote,
//! the contexts they passed, the dots they were acked), never by the cluster's own
//! bookkeeping: a read shows an acked write only by returning its value under its
//! dot, or the value of a write whose client had seen it.
//!
//! Data loss on the victim node (a wiped disk, a lost record) can take away a copy of
//! an acknowledged write; a write acked before such a loss on one of its replicas is
//! exempt from checks 1 and 4 (a quorum read may meet the emptied replica and one
//! that never had the write), and, if acked by a single replica, from check 2.

use std::collections::BTreeMap;
use std::time::Duration;

use ringkv_cluster::{Dot, NodeId, Value, Version, VersionSet};

use crate::history::{History, PutRecord};

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
    /// 6: two acknowledged writes of one key were given the same dot.
    DuplicateDot,
    /// 7: a write was stamped at or below a write its client had seen.
    StampsFollowCausality,
    /// 8: after healing, a hint was never handed off, or an acknowledged write was
    /// missing from its home replicas before any read repaired them.
    Handoff,
}

/// Which nodes replicate each key, for judging which writes a data loss exposed.
pub type Replicas = BTreeMap<Vec<u8>, Vec<NodeId>>;

/// How much the read checkers had to judge: a batch where these stay zero proved
/// nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadCounts {
    /// (acked put, later overlapping read) pairs checked.
    pub checked: u64,
    /// Reads that returned more than one sibling.
    pub with_siblings: u64,
    /// Of `checked`, those on keys replicated by a node that lost data in the run: the
    /// loss exemptions leave these keys checked.
    pub checked_near_losses: u64,
}

/// Whether a data loss may have taken a copy of `put` before `until` (a read's end;
/// `None`: the end of the run): a wiped disk, or a lost record of its key, on one of
/// its key's replicas, between the put's start and `until`.
fn exposed(
    put: &PutRecord,
    until: Option<Duration>,
    history: &History,
    replicas: &Replicas,
) -> bool {
    let Some(of_key) = replicas.get(&put.key) else {
        return false;
    };
    history.losses.iter().any(|loss| {
        loss.at >= put.start
            && until.is_none_or(|until| loss.at <= until)
            // A write acked by stand-ins had copies off the key's replicas too.
            && (of_key.contains(&loss.node) || put.stand_ins > 0)
            && loss.key.as_ref().is_none_or(|key| *key == put.key)
            // A dead node answers nothing: W - 1 copies of the write survive it, and
            // the replacement streams them from the survivors.
            && (!loss.retired || put.quorum.w() < 2 || put.stand_ins > 0)
    })
}

fn value_of(put: &PutRecord) -> Value {
    match &put.value {
        Some(bytes) => Value::Data(bytes.clone()),
        None => Value::Tombstone,
    }
}

/// Whether `sibling` shows `put`: it is `put` itself (its dot and its value), or a
/// write whose client had seen `put` (its context, as sent, holds `put`'s dot).
/// Contexts are version vectors, so a write that saw a successor of `put` saw `put`.
fn shows(
    sibling: &Version,
    put: &PutRecord,
    dot: Dot,
    puts_of_key: &[&PutRecord],
    acked_dots: &BTreeMap<Dot, &PutRecord>,
) -> bool {
    if sibling.dot == dot && sibling.value == value_of(put) {
        return true;
    }
    puts_of_key.iter().any(|q| {
        if q.op == put.op {
            return false;
        }
        if !q.context_known {
            // A SET or DEL never acked: what its own read found is known only as the
            // past of the version it made, if it landed. Its value names it (every
            // SET's value is unique; a DEL's tombstone may be any unacked delete's).
            return q.may_have_landed()
                && value_of(q) == sibling.value
                && !acked_dots.contains_key(&sibling.dot)
                && sibling.past.contains(dot);
        }
        q.context.contains(dot)
            && match q.acked_dot() {
                Some(q_dot) => q_dot == sibling.dot,
                // A write never acked may still have landed; its value names it, unless
                // the sibling is another write's (values repeat: every delete is a
                // tombstone).
                None => {
                    value_of(q) == sibling.value
                        && !acked_dots.contains_key(&sibling.dot)
                        // Every delete is a tombstone: only one made with q's context
                        // can be q's.
                        && (q.value.is_some() || sibling.past == q.context)
                }
            }
    })
}

/// Check 7 over every version a read returned: for an acked write Q and each acked
/// write P that Q's client had seen, both read back, Q's stamp is above P's.
pub fn check_stamps(history: &History) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut stamps: BTreeMap<(&[u8], Dot), u64> = BTreeMap::new();
    for get in &history.gets {
        for sibling in get.versions.siblings() {
            stamps.insert((&get.key, sibling.dot), sibling.written_at_ms);
        }
    }
    for q in &history.puts {
        let Some(q_dot) = q.acked_dot() else { continue };
        let Some(&q_stamp) = stamps.get(&(q.key.as_slice(), q_dot)) else {
            continue;
        };
        for p in history
            .puts
            .iter()
            .filter(|p| p.key == q.key && p.op != q.op)
        {
            let Some(p_dot) = p.acked_dot().filter(|&d| q.context.contains(d)) else {
                continue;
            };
            if let Some(&p_stamp) = stamps.get(&(p.key.as_slice(), p_dot))
                && q_stamp <= p_stamp
            {
                violations.push(Violation {
                    checker: Checker::StampsFollowCausality,
                    detail: format!(
                        "key {:?}: put #{} is stamped {q_stamp}, not above {p_stamp} of put #{} it saw",
                        String::from_utf8_lossy(&q.key),
                        q.op,
                        p.op
                    ),
                });
            }
        }
    }
    violations
}

/// Check 6 over the whole history: one dot, one acknowledged write (per key).
pub fn check_duplicate_dots(history: &History) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut first: BTreeMap<(&[u8], Dot), u64> = BTreeMap::new();
    for put in &history.puts {
        let Some(dot) = put.acked_dot() else { continue };
        if let Some(earlier) = first.insert((&put.key, dot), put.op) {
            violations.push(Violation {
                checker: Checker::DuplicateDot,
                detail: format!(
                    "key {:?}: puts #{earlier} and #{} were both acked with {dot:?}",
                    String::from_utf8_lossy(&put.key),
                    put.op
                ),
            });
        }
    }
    violations
}

/// Checks 1, 4 and value integrity over every successful read.
pub fn check_reads(history: &History, replicas: &Replicas) -> (Vec<Violation>, ReadCounts) {
    let mut violations = Vec::new();
    let mut counts = ReadCounts::default();
    // Dots number one key's writes: the same dot on two keys names two writes.
    let mut written: BTreeMap<&[u8], BTreeMap<Dot, &PutRecord>> = BTreeMap::new();
    for put in &history.puts {
        if let Some(dot) = put.acked_dot() {
            written.entry(&put.key).or_default().insert(dot, put);
        }
    }
    let none = BTreeMap::new();
    for get in &history.gets {
        if get.versions.len() > 1 {
            counts.with_siblings += 1;
        }
        let of_key = written.get(get.key.as_slice()).unwrap_or(&none);
        check_values(get.op, &get.versions, of_key, &mut violations);
        let puts_of_key: Vec<&PutRecord> =
            history.puts.iter().filter(|p| p.key == get.key).collect();
        for put in &puts_of_key {
            let Some(dot) = put.acked_dot() else { continue };
            let sloppy = get.stand_ins > 0;
            if !must_see(
                put,
                get.start,
                get.quorum,
                Some(get.end),
                sloppy,
                history,
                replicas,
            ) {
                continue;
            }
            counts.checked += 1;
            if history.losses.iter().any(|loss| {
                replicas
                    .get(&put.key)
                    .is_some_and(|r| r.contains(&loss.node))
            }) {
                counts.checked_near_losses += 1;
            }
            // A tombstone collected before the read ended, that was or had seen the
            // put, shows it too: every replica held that tombstone, so the put was
            // deleted, and its trace went with the tombstone.
            let shown = collected_having_seen(history, put, dot, Some(get.end))
                || get
                    .versions
                    .siblings()
                    .any(|sibling| shows(sibling, put, dot, &puts_of_key, of_key));
            if !shown {
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
    (violations, counts)
}

/// Check 2 on the final state of one key: every acked write that no issued write saw
/// is still a sibling, with its value; and nothing any acked write superseded remains.
pub fn check_final_key(
    key: &[u8],
    final_set: &VersionSet,
    history: &History,
    replicas: &Replicas,
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
        // Acked by one replica whose copy a data loss may have taken.
        if put.quorum.w() < 2 && exposed(put, None, history, replicas) {
            continue;
        }
        let seen_by_a_write = puts.iter().any(|q| {
            q.op != put.op
                && if q.context_known {
                    q.context.contains(dot)
                } else {
                    landed_having_seen(q, dot, key, final_set, history, &written)
                }
        });
        // A tombstone may be collected: what it deleted must still be gone (checked
        // below).
        let collected = collected_having_seen(history, put, dot, None);
        if !seen_by_a_write && !final_set.contains_dot(dot) && !collected {
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

/// Whether a node collected, before `until` (`None`: ever), a tombstone of `put`'s
/// key that is `put` (under `dot`) or whose past holds `dot`, made by a put that
/// had not ended when `put` started (one that ended before cannot have seen it; a
/// reused dot would otherwise be excused).
fn collected_having_seen(
    history: &History,
    put: &PutRecord,
    dot: Dot,
    until: Option<Duration>,
) -> bool {
    let made_after = |tombstone: Dot| {
        (history.puts.iter())
            .filter(|p| p.key == put.key && p.acked_dot() == Some(tombstone))
            .all(|p| p.end.is_none_or(|end| end >= put.start))
    };
    (history.collected.iter())
        .filter(|c| c.key == put.key && until.is_none_or(|until| c.at <= until))
        .any(|c| {
            c.versions
                .siblings()
                .any(|v| (v.dot == dot || v.past.contains(dot)) && made_after(v.dot))
        })
}

/// Whether `q`, a SET or DEL never acked, landed as a version whose past holds `dot`:
/// in the final set or in any read of its key.
fn landed_having_seen(
    q: &PutRecord,
    dot: Dot,
    key: &[u8],
    final_set: &VersionSet,
    history: &History,
    acked: &BTreeMap<Dot, &PutRecord>,
) -> bool {
    // A collected tombstone was on a disk too.
    let collected = (history.collected.iter())
        .filter(|c| c.key == key)
        .map(|c| &c.versions);
    let reads = history
        .gets
        .iter()
        .filter(|g| g.key == key)
        .map(|g| &g.versions)
        .chain(collected);
    q.may_have_landed()
        && std::iter::once(final_set).chain(reads).any(|set| {
            set.siblings().any(|v| {
                v.value == value_of(q) && !acked.contains_key(&v.dot) && v.past.contains(dot)
            })
        })
}

/// Check 1 for the read inside a SET or DEL: an acked one says what its read found
/// (`Written::superseded`), which must hold every write acked before it started at a
/// quorum that overlaps the read's, as any quorum read must.
pub fn check_node_reads(history: &History, replicas: &Replicas) -> (Vec<Violation>, u64) {
    let mut violations = Vec::new();
    let mut checked = 0;
    for q in history.puts.iter().filter(|q| q.quorum_held) {
        if q.acked_dot().is_none() {
            continue;
        }
        for put in history
            .puts
            .iter()
            .filter(|p| p.key == q.key && p.op != q.op)
        {
            let Some(dot) = put.acked_dot() else { continue };
            let sloppy = q.stand_ins > 0;
            if !must_see(put, q.start, q.quorum, q.end, sloppy, history, replicas) {
                continue;
            }
            checked += 1;
            // Deleted, and the tombstone collected, before the node's read ended.
            let collected = collected_having_seen(history, put, dot, q.end);
            if !q.context.contains(dot) && !collected {
                violations.push(node_read_missed(q, put, "its read missed"));
            }
        }
    }
    (violations, checked)
}

/// Value integrity across writes: every put's value is unique (it names its op), so
/// reads that show it under two dots saw one put applied twice (a duplicated forward
/// coordinated again, say), the second copy superseding writes acked in between.
/// Also: an acked put, read back, carries as its past exactly the clock the node
/// reported it superseded.
pub fn check_applied_once(history: &History) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut dot_of: BTreeMap<(&[u8], &[u8]), Dot> = BTreeMap::new();
    let acked: BTreeMap<(&[u8], Dot), &PutRecord> = history
        .puts
        .iter()
        .filter_map(|p| p.acked_dot().map(|d| ((p.key.as_slice(), d), p)))
        .collect();
    for get in &history.gets {
        for sibling in get.versions.siblings() {
            if let Some(put) = acked.get(&(get.key.as_slice(), sibling.dot))
                && put.quorum_held
                && sibling.past != put.context
            {
                violations.push(Violation {
                    checker: Checker::ValueIntegrity,
                    detail: format!(
                        "read #{}: put #{} was acked as superseding {:?} but was written over {:?}",
                        get.op, put.op, put.context, sibling.past
                    ),
                });
            }
            let Some(value) = sibling.value.data() else {
                continue;
            };
            let first = *dot_of.entry((&get.key, value)).or_insert(sibling.dot);
            if first != sibling.dot {
                violations.push(Violation {
                    checker: Checker::ValueIntegrity,
                    detail: format!(
                        "read #{}: value {:?} of key {:?} is under {:?} and {:?}: one put applied twice",
                        get.op,
                        String::from_utf8_lossy(value),
                        String::from_utf8_lossy(&get.key),
                        first,
                        sibling.dot
                    ),
                });
            }
        }
    }
    violations
}

/// Check 1 for a DEL that found nothing to delete: no live write acked before it
/// started, at a quorum overlapping its read's, was superseded by nothing that had
/// started by the time the DEL ended. Writes whose context is unknown (unacked SET
/// or DEL) might have; they excuse every write of their key.
pub fn check_nothing_to_delete(history: &History, replicas: &Replicas) -> (Vec<Violation>, u64) {
    let mut violations = Vec::new();
    let mut checked = 0;
    let answered_nothing = history
        .puts
        .iter()
        .filter(|q| q.outcome == crate::history::PutResult::NothingToDelete);
    for q in answered_nothing {
        let Some(end) = q.end else { continue };
        let of_key: Vec<&PutRecord> = history.puts.iter().filter(|p| p.key == q.key).collect();
        let unknown_superseder = of_key
            .iter()
            .any(|r| !r.context_known && r.op != q.op && r.may_have_landed() && r.start < end);
        if unknown_superseder {
            continue;
        }
        for put in of_key.iter().filter(|p| p.value.is_some()) {
            let Some(dot) = put.acked_dot() else { continue };
            // Nothing says whether the read asked stand-ins; only a strict one is sure not to.
            let sloppy = !q.strict;
            if !must_see(put, q.start, q.quorum, Some(end), sloppy, history, replicas) {
                continue;
            }
            checked += 1;
            let superseded = of_key
                .iter()
                .any(|r| r.op != put.op && r.start < end && r.context.contains(dot));
            if !superseded {
                let found = "found nothing to delete, but live was";
                violations.push(node_read_missed(q, put, found));
            }
        }
    }
    (violations, checked)
}

/// The read inside SET or DEL `q` did not see the acked `put` it had to see.
fn node_read_missed(q: &PutRecord, put: &PutRecord, what: &str) -> Violation {
    Violation {
        checker: Checker::AckedWriteReadable,
        detail: format!(
            "SET/DEL #{} (R={}) at {:?}: {what} put #{} {:?} (W={}) acked at {:?}",
            q.op,
            q.quorum.r(),
            q.start,
            put.op,
            put.acked_dot(),
            put.quorum.w(),
            put.end
        ),
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

/// Whether a quorum read at `quorum` that started at `start` (and ended by `until`)
/// must see the acked `put`: it was acked before the read started, the read's R and
/// the put's W overlap among the key's own replicas (neither counted a stand-in:
/// `read_sloppy` says whether the read may have), and no data loss may have taken a
/// copy of it meanwhile. Sloppy quorum promises durability on W nodes, not overlap;
/// the handoff check holds those writes to reaching home.
fn must_see(
    put: &PutRecord,
    start: Duration,
    quorum: ringkv_cluster::Quorum,
    until: Option<Duration>,
    read_sloppy: bool,
    history: &History,
    replicas: &Replicas,
) -> bool {
    let acked_before = put.end.is_some_and(|end| end < start);
    let overlapping = put.quorum.n() == quorum.n() && put.quorum.w() + quorum.r() > quorum.n();
    let home_quorums = !read_sloppy && put.stand_ins == 0;
    acked_before && overlapping && home_quorums && !exposed(put, until, history, replicas)
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
