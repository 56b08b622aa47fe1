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
    /// The context the client sent, decoded: what this write saw.
    pub context: VersionVector,
    pub quorum: Quorum,
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
}

impl PutRecord {
    pub fn acked_dot(&self) -> Option<Dot> {
        match self.outcome {
            PutResult::Acked(dot) => Some(dot),
            _ => None,
        }
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
}

#[derive(Default, Debug)]
pub struct History {
    pub puts: Vec<PutRecord>,
    pub gets: Vec<GetRecord>,
    pub failed_gets: u64,
    /// Stored data lost on a node: writes acknowledged before it may have lost a copy.
    pub losses: Vec<Loss>,
}

/// Data lost on a node at a moment: one key's record, or (`key: None`) the disk.
#[derive(Clone, Debug)]
pub struct Loss {
    pub at: Duration,
    pub node: NodeId,
    pub key: Option<Vec<u8>>,
}
