//! What clients did and saw, as the checkers need it. Times are simulated.

use std::time::Duration;

use ringkv_cluster::{Dot, NodeId, Quorum, VersionSet, VersionVector};

/// A put (or delete, when `value` is `None`) as issued, and how it ended.
#[derive(Clone, Debug)]
pub struct PutRecord {
    pub op: u64,
    pub client: usize,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    /// What this write saw: the context its client sent, decoded; for a put that
    /// supersedes what a quorum holds, what the node says its read found
    /// (`Written::superseded`), known only once acked.
    pub context: VersionVector,
    /// False for a put the node resolved (a SET or DEL) that was not acked: what its
    /// read found is then only visible as the past of the version it made, if any.
    pub context_known: bool,
    /// A put that supersedes what a quorum holds (a SET, or a DEL when `value` is None).
    pub quorum_held: bool,
    pub quorum: Quorum,
    /// Sent strict (no stand-ins), and how many stand-ins the acked outcome counted.
    pub strict: bool,
    pub stand_ins: u32,
    pub coordinator: NodeId,
    pub start: Duration,
    pub end: Option<Duration>,
    pub outcome: PutResult,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutResult {
    Pending,
    /// Acknowledged at W: durable on W replicas.
    Acked(Dot),
    /// Anything else: timeout, unavailable, no answer. The write may or may not exist.
    NotAcked(String),
    /// A delete-if-present whose read found no live value: nothing was written.
    NothingToDelete,
}

impl PutRecord {
    pub fn acked_dot(&self) -> Option<Dot> {
        match self.outcome {
            PutResult::Acked(dot) => Some(dot),
            _ => None,
        }
    }

    /// Whether the write may exist without an ack (it timed out, or never answered).
    pub fn may_have_landed(&self) -> bool {
        matches!(self.outcome, PutResult::NotAcked(_) | PutResult::Pending)
    }
}

/// A get that succeeded, with what it returned.
#[derive(Clone, Debug)]
pub struct GetRecord {
    pub op: u64,
    pub key: Vec<u8>,
    pub quorum: Quorum,
    pub start: Duration,
    pub end: Duration,
    pub versions: VersionSet,
    pub context: VersionVector,
    /// Stand-ins among the R answers (sloppy quorum).
    pub stand_ins: u32,
}

#[derive(Default, Debug)]
pub struct History {
    pub puts: Vec<PutRecord>,
    pub gets: Vec<GetRecord>,
    pub failed_gets: u64,
    /// Stored data lost on a node: writes acknowledged before it may have lost a copy.
    pub losses: Vec<Loss>,
    /// Whether the nodes collect tombstones: a delete may then read as nothing at all
    /// (its tombstone gone with what it deleted), which shows it as well.
    pub tombstones_collected: bool,
    /// Tombstone sets nodes collected: what was on the disk before.
    pub collected: Vec<Collected>,
}

/// A key's tombstones a node collected, and when.
#[derive(Clone, Debug)]
pub struct Collected {
    pub at: Duration,
    pub key: Vec<u8>,
    pub versions: VersionSet,
}

/// Data lost on a node at a moment: one key's record, or (`key: None`) the disk.
#[derive(Clone, Debug)]
pub struct Loss {
    pub at: Duration,
    pub node: NodeId,
    pub key: Option<Vec<u8>>,
    /// The node died for good (it is replaced): it never answers again, so only
    /// writes it may have held the one copy of are exposed (W = 1, or stand-ins).
    pub retired: bool,
}
