//! The coordinator's bookkeeping for one put or one get (Dynamo §4.5).
//!
//! These are small state machines fed by the node: they count answers from the
//! replicas they asked, say when the quorum is reached, and say what to repair. They
//! never send anything themselves; [`Node`](crate::node::Node) turns their decisions
//! into actions.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::clock::{Dot, VersionVector};
use crate::message::RequestId;
use crate::quorum::Quorum;
use crate::request::ClientToken;
use crate::ring::{NodeId, PartitionId};
use crate::version::{ConflictMode, Value, VersionSet};

/// Who waits for a coordinated request's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Requester {
    /// A client of this node's driver.
    Client(ClientToken),
    /// A node that forwarded the put here, under its own request id.
    Forwarder { node: NodeId, request: RequestId },
}

/// The write half of a put that supersedes what a quorum holds: it starts when the
/// read half reaches its quorum, with that read's context.
#[derive(Clone, Debug)]
pub(crate) struct ThenPut {
    pub value: Value,
    pub quorum: Quorum,
    pub mode: ConflictMode,
    pub only_if_present: bool,
    pub strict: bool,
    pub wall_ms: u64,
}

/// A put this node forwarded to a replica, waiting for the replica's answer.
#[derive(Debug)]
pub(crate) struct Forwarding {
    pub client: ClientToken,
    pub to: NodeId,
    pub required: usize,
    pub deadline: Duration,
}

/// How an answer from a replica was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Counted; the quorum is not reached yet (or was reached before).
    Counted,
    /// Counted, and it completes the quorum: reply now.
    QuorumReached,
    /// This replica was not asked.
    NotAsked,
    /// This replica already answered.
    Duplicate,
}

/// A put in progress: the local replica makes the version, then the other replicas
/// merge it; the client hears back after `required` durable acks (local one included).
#[derive(Debug)]
pub(crate) struct PutCoordination {
    pub client: Requester,
    pub key: Vec<u8>,
    pub partition: PartitionId,
    /// The reachable replicas asked to store the write, this node among them.
    pub replicas: Vec<NodeId>,
    /// W: acks each group needs.
    pub required: usize,
    /// The replica sets that must each reach W (two while the key's partition moves
    /// to new replicas, see `crate::view`). A stand-in's ack counts for the replica
    /// it stands in for.
    pub groups: Vec<Vec<NodeId>>,
    pub deadline: Duration,
    /// Set once the local replica made the version.
    pub dot: Option<Dot>,
    /// The clock of what the version superseded (its past), set with `dot`.
    pub superseded: VersionVector,
    /// The asked nodes that stand in for down replicas → the replica each stands in for.
    pub hint_for: BTreeMap<NodeId, NodeId>,
    /// Stand-ins among the answers of the read before this write (SET, DEL).
    pub read_stand_ins: u32,
    acked: BTreeSet<NodeId>,
    /// Replicas that could not store the write (its merge was too large there).
    refused: BTreeSet<NodeId>,
}

impl PutCoordination {
    pub fn new(
        client: Requester,
        key: Vec<u8>,
        partition: PartitionId,
        replicas: Vec<NodeId>,
        groups: Vec<Vec<NodeId>>,
        required: usize,
        deadline: Duration,
    ) -> Self {
        assert!(required >= 1 && required <= replicas.len());
        PutCoordination {
            client,
            key,
            partition,
            replicas,
            required,
            groups,
            deadline,
            dot: None,
            superseded: VersionVector::new(),
            hint_for: BTreeMap::new(),
            read_stand_ins: 0,
            acked: BTreeSet::new(),
            refused: BTreeSet::new(),
        }
    }

    /// `from` refused to store the write. `QuorumReached` here means the opposite:
    /// too few replicas are left to ever reach the quorum, so the put is decided.
    pub fn refuse(&mut self, from: NodeId) -> Answer {
        if !self.replicas.contains(&from) {
            return Answer::NotAsked;
        }
        if self.acked.contains(&from) || !self.refused.insert(from) {
            return Answer::Duplicate;
        }
        let refused = self.represented(&self.refused);
        let hopeless = self
            .groups
            .iter()
            .any(|group| group.iter().filter(|n| !refused.contains(n)).count() < self.required);
        if hopeless {
            Answer::QuorumReached
        } else {
            Answer::Counted
        }
    }

    /// The replicas a set of answering nodes stands for (a stand-in for its target).
    fn represented(&self, nodes: &BTreeSet<NodeId>) -> BTreeSet<NodeId> {
        nodes
            .iter()
            .map(|n| self.hint_for.get(n).copied().unwrap_or(*n))
            .collect()
    }

    /// Whether every group has W acks.
    fn reached(&self) -> bool {
        let acked = self.represented(&self.acked);
        self.groups
            .iter()
            .all(|group| group.iter().filter(|n| acked.contains(n)).count() >= self.required)
    }

    /// A durable ack from `from`.
    pub fn ack(&mut self, from: NodeId) -> Answer {
        if !self.replicas.contains(&from) {
            return Answer::NotAsked;
        }
        if self.refused.contains(&from) || !self.acked.insert(from) {
            return Answer::Duplicate;
        }
        if self.reached() {
            Answer::QuorumReached
        } else {
            Answer::Counted
        }
    }

    pub fn acked(&self) -> usize {
        self.acked.len()
    }

    /// Acks that came from stand-ins for down replicas.
    pub fn stand_ins_acked(&self) -> u32 {
        self.acked
            .iter()
            .filter(|n| self.hint_for.contains_key(n))
            .count() as u32
    }

    /// Invariants while the put is still open (it is removed once it replies).
    pub fn assert_invariants(&self) {
        assert!(!self.reached(), "an open put is below quorum");
        assert!(self.acked.iter().all(|n| self.replicas.contains(n)));
        assert!(self.acked.is_disjoint(&self.refused));
        if !self.acked.is_empty() {
            assert!(self.dot.is_some(), "acks only follow a made version");
        }
    }
}

/// A get in progress: asks every reachable replica, replies after `required` answers,
/// keeps listening until all have answered or time runs out, then repairs.
#[derive(Debug)]
pub(crate) struct GetCoordination {
    pub client: Requester,
    pub key: Vec<u8>,
    pub partition: PartitionId,
    pub asked: Vec<NodeId>,
    pub required: usize,
    pub deadline: Duration,
    pub replied: bool,
    /// For the read half of a put: the write to start at quorum instead of replying.
    pub then: Option<ThenPut>,
    /// The asked nodes that answer from hints for a down replica (never repaired).
    pub stand_ins: BTreeSet<NodeId>,
    answers: BTreeMap<NodeId, VersionSet>,
}

impl GetCoordination {
    pub fn new(
        client: Requester,
        key: Vec<u8>,
        partition: PartitionId,
        asked: Vec<NodeId>,
        required: usize,
        deadline: Duration,
        then: Option<ThenPut>,
    ) -> Self {
        assert!(required >= 1 && required <= asked.len());
        GetCoordination {
            client,
            key,
            partition,
            asked,
            required,
            deadline,
            replied: false,
            then,
            stand_ins: BTreeSet::new(),
            answers: BTreeMap::new(),
        }
    }

    pub fn answer(&mut self, from: NodeId, versions: VersionSet) -> Answer {
        if !self.asked.contains(&from) {
            return Answer::NotAsked;
        }
        if self.answers.contains_key(&from) {
            return Answer::Duplicate;
        }
        self.answers.insert(from, versions);
        if self.answers.len() == self.required {
            Answer::QuorumReached
        } else {
            Answer::Counted
        }
    }

    pub fn answered(&self) -> usize {
        self.answers.len()
    }

    /// Answers that came from stand-ins for down replicas.
    pub fn stand_ins_answered(&self) -> u32 {
        self.answers
            .keys()
            .filter(|n| self.stand_ins.contains(n))
            .count() as u32
    }

    pub fn all_answered(&self) -> bool {
        self.answers.len() == self.asked.len()
    }

    /// Every answer so far, merged: what the client is told, and what stale replicas
    /// are repaired to.
    pub fn merged(&self) -> VersionSet {
        self.answers
            .values()
            .fold(VersionSet::new(), |acc, set| acc.sync(set))
    }

    /// The replicas whose answer lacks something the merged set has (Dynamo §4.5:
    /// "read repair"), with the set to send them.
    pub fn repairs(&self) -> (VersionSet, Vec<NodeId>) {
        let merged = self.merged();
        let stale = self
            .answers
            .iter()
            .filter(|(_, set)| **set != merged)
            .map(|(node, _)| *node)
            .collect();
        (merged, stale)
    }

    pub fn assert_invariants(&self) {
        assert!(self.answers.keys().all(|n| self.asked.contains(n)));
        if self.answers.len() >= self.required {
            assert!(self.replied, "a get at quorum has replied");
        }
        assert!(
            !self.all_answered(),
            "a fully answered get is finished and removed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: &[u32]) -> Vec<NodeId> {
        ids.iter().map(|&i| NodeId(i)).collect()
    }

    /// Dynamo §4.5: W acks out of N, each replica counted once.
    #[test]
    fn put_counts_distinct_asked_replicas() {
        let mut put = PutCoordination::new(
            Requester::Client(ClientToken(1)),
            b"k".to_vec(),
            PartitionId(0),
            nodes(&[1, 2, 3]),
            vec![nodes(&[1, 2, 3])],
            2,
            Duration::from_secs(1),
        );
        put.dot = Some(Dot {
            actor: crate::clock::Actor {
                node: NodeId(1),
                epoch: 0,
            },
            counter: 1,
        });
        assert_eq!(put.ack(NodeId(9)), Answer::NotAsked);
        assert_eq!(put.ack(NodeId(2)), Answer::Counted);
        assert_eq!(put.ack(NodeId(2)), Answer::Duplicate);
        put.assert_invariants();
        assert_eq!(put.ack(NodeId(3)), Answer::QuorumReached);
        assert_eq!(put.acked(), 2);
    }

    #[test]
    fn get_reports_stale_and_missing_answers_for_repair() {
        let mut get = GetCoordination::new(
            Requester::Client(ClientToken(1)),
            b"k".to_vec(),
            PartitionId(0),
            nodes(&[1, 2]),
            1,
            Duration::from_secs(1),
            None,
        );
        let version = crate::version::Version {
            dot: Dot {
                actor: crate::clock::Actor {
                    node: NodeId(1),
                    epoch: 0,
                },
                counter: 1,
            },
            past: Default::default(),
            written_at_ms: 0,
            value: crate::version::Value::Data(b"v".to_vec()),
        };
        let full = VersionSet::from_versions(Default::default(), [version]);
        assert_eq!(get.answer(NodeId(1), full.clone()), Answer::QuorumReached);
        get.replied = true;
        assert_eq!(get.answer(NodeId(2), VersionSet::new()), Answer::Counted);
        let (merged, stale) = get.repairs();
        assert_eq!(merged, full);
        assert_eq!(stale, nodes(&[2]));
    }
}
