//! What nodes send each other. A driver moves these between nodes (serialising them
//! for the network); a node never trusts them: anything stale, duplicated or from an
//! unexpected sender is counted under a [`DropReason`](crate::node::DropReason) and
//! dropped.

use crate::quorum::Quorum;
use crate::request::{ClientError, PutOutcome, Supersedes};
use crate::ring::{NodeId, PartitionId};
use crate::version::{ConflictMode, VersionSet};

/// Names one coordinated request. `epoch` is the coordinating node's first actor
/// epoch of its current life (random, see [`crate::clock::Actor`]): ids stay unique
/// across restarts, even ones that lost the data directory, so a reply to a request
/// made before a crash can never match a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId {
    pub epoch: u64,
    pub sequence: u64,
}

/// What made a key's merged versions too large to store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TooLarge {
    /// The sibling values together, in bytes.
    Values { size: usize, limit: usize },
    /// The version metadata (dots, stamps, pasts) together, in encoded bytes.
    Versions { size: usize, limit: usize },
    /// A stand-in's hints for the down replica would pass their byte bound
    /// ([`crate::hints::HintConfig::bytes_max`]); the hint was not stored.
    Hints { size: usize, limit: usize },
}

/// A message between two nodes about one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMessage {
    /// Coordinator to replica: send me your versions of `key` (with `hint_for`, the
    /// ones you hold as hints for that down replica: a sloppy read).
    Read {
        request: RequestId,
        partition: PartitionId,
        key: Vec<u8>,
        hint_for: Option<NodeId>,
    },
    /// Replica to coordinator: my versions (empty when I have none).
    ReadReply {
        request: RequestId,
        versions: VersionSet,
    },
    /// Coordinator to replica: merge these versions into yours, durably, then ack.
    /// With `hint_for`, to a node standing in for that down replica (sloppy quorum):
    /// merge them into the hints held for it. Also a hint's handoff to its target
    /// (without `hint_for`).
    Write {
        request: RequestId,
        partition: PartitionId,
        key: Vec<u8>,
        versions: VersionSet,
        hint_for: Option<NodeId>,
    },
    /// Replica to coordinator: the merged versions are durable here.
    WriteAck { request: RequestId },
    /// Replica to coordinator: the merged versions exceed what this replica's store
    /// keeps for one key, so nothing was written here; the client hears why.
    WriteRefused {
        request: RequestId,
        refusal: TooLarge,
    },
    /// Coordinator to a stale replica after a read: merge these; no ack is expected.
    Repair {
        partition: PartitionId,
        key: Vec<u8>,
        versions: VersionSet,
    },
    /// A node holding no replica of the key to one that does: coordinate this put
    /// and answer with [`PeerMessage::ForwardReply`]. Never forwarded again.
    Forward {
        request: RequestId,
        partition: PartitionId,
        put: ForwardedPut,
    },
    /// The replica's answer to a forwarded put, exactly as it would reply to a client.
    ForwardReply {
        request: RequestId,
        reply: Result<PutOutcome, ClientError>,
    },
    /// Anti-entropy (crate::anti_entropy): the sender's Merkle branches of a partition.
    AeBranches {
        partition: PartitionId,
        branches: Vec<u64>,
    },
    /// The answer: the receiver's leaves (index, value) under every branch that differs.
    AeLeaves {
        partition: PartitionId,
        leaves: Vec<(u32, u64)>,
    },
    /// The sender's keys (with version digests) of the leaves that differ.
    AeKeys {
        partition: PartitionId,
        leaves: Vec<u32>,
        keys: Vec<(Vec<u8>, u32)>,
    },
    /// Keys the sender lacks or holds differently: push them (as `Repair`).
    AePull {
        partition: PartitionId,
        keys: Vec<Vec<u8>>,
    },
    /// Tombstone collection (crate::tombstones): do you hold exactly these tombstones?
    TombstonesCheck {
        partition: PartitionId,
        sweep: u64,
        keys: Vec<(Vec<u8>, VersionSet)>,
    },
    /// The answer: the keys of the check whose stored versions are exactly those sent.
    TombstonesHeld {
        partition: PartitionId,
        sweep: u64,
        keys: Vec<Vec<u8>>,
    },
    /// A source of a moving partition to a new replica (`crate::node::transfers`):
    /// every key I held is durable with you, and (if I leave the partition's list) I
    /// no longer serve it. `fingerprint` names the membership change.
    TransferDone {
        partition: PartitionId,
        fingerprint: u64,
    },
}

/// A client's put as the forwarding node resolved it: its context already decoded
/// once there (so it is valid), its quorum already defaulted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardedPut {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub supersedes: Supersedes,
    pub quorum: Quorum,
    pub mode: ConflictMode,
    pub only_if_present: bool,
    /// Only the key's own N replicas may take the write (no hinted stand-ins).
    pub strict: bool,
    /// The forwarding node's wall clock, which seeds the version stamp as a
    /// coordinator's own would (the stamp is a hybrid logical clock either way).
    pub wall_ms: u64,
}
