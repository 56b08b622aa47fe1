//! What clients ask a node and what they get back.

use thiserror::Error;

use crate::clock::Dot;
use crate::codec::{Context, DecodeError};
use crate::quorum::{Quorum, QuorumError};
use crate::ring::NodeId;
use crate::version::{ConflictMode, VersionSet};

/// The driver's handle for whoever is waiting on a reply; opaque to the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientToken(pub u64);

/// Read every sibling of `key` from R of its N replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetRequest {
    pub key: Vec<u8>,
    pub quorum: Quorum,
}

/// Write `value` (a delete when `None`) superseding what `context` saw; without a
/// context the write becomes a sibling of whatever is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutRequest {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    /// Context bytes exactly as a previous get returned them ([`Context::encode`]).
    pub context: Option<Vec<u8>>,
    pub quorum: Quorum,
    pub mode: ConflictMode,
    /// Also supersede whatever the coordinator's own replica holds when it writes
    /// (Redis SET semantics without a separate read). Versions that only other
    /// replicas hold stay as siblings, so with N > 1 a read first is what makes a
    /// write replace everything a quorum has seen.
    pub supersede_local: bool,
}

/// A successful get: the siblings (tombstones included; see
/// [`VersionSet::is_deleted`]) and the context to hand back with the next put.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetOutcome {
    pub versions: VersionSet,
    pub context: Context,
}

impl GetOutcome {
    /// The live values, in dot order; empty when the key is absent or deleted.
    pub fn values(&self) -> Vec<&[u8]> {
        self.versions
            .siblings()
            .filter_map(|v| v.value.data())
            .collect()
    }
}

/// A successful put: the dot naming the new write. No context is returned on purpose:
/// the coordinator's merged set may hold siblings this client never saw, and a context
/// covering them would let the next put supersede values unseen. Read to get one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PutOutcome {
    pub dot: Dot,
}

/// What a client may get instead of an outcome.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ClientError {
    #[error("invalid argument: {0}")]
    InvalidArgument(#[from] InvalidArgument),
    /// Fewer replicas are reachable than the quorum needs; nothing was attempted.
    #[error("unavailable: {reachable} replicas reachable, {required} required")]
    Unavailable { required: usize, reachable: usize },
    /// The quorum was not reached in time. For a put the outcome is unknown: the write
    /// may be on some replicas and may yet spread; it was not "rolled back".
    #[error("timed out with {acked} of {required} replicas answering")]
    Timeout { acked: usize, required: usize },
    /// Puts must be coordinated by one of the key's replicas; send it to one of these.
    #[error("this node holds no replica of the key; its replicas are {replicas:?}")]
    NotReplica { replicas: Vec<NodeId> },
    /// The write would leave more siblings than allowed; nothing was written. Read,
    /// resolve the siblings, and write back with the context.
    #[error("{count} siblings would exceed the limit of {limit}")]
    TooManySiblings { count: usize, limit: usize },
    /// The key's sibling values together would exceed what the store keeps for one
    /// key; nothing was written. Read, merge the siblings, write back with the context.
    #[error("the siblings' values would take {size} bytes together, over the limit of {limit}")]
    ValuesTooLarge { size: usize, limit: usize },
    /// The key's version metadata (one dot, stamp and past per sibling) would exceed
    /// what the store keeps for one key; nothing was written here. Resolve siblings.
    #[error("the siblings' versions would take {size} bytes together, over the limit of {limit}")]
    VersionsTooLarge { size: usize, limit: usize },
    /// The coordinator's own storage failed before a version was made (or has just
    /// failed a write, and the coordinator pauses); nothing written.
    #[error("the coordinator's storage failed")]
    StorageFailed,
    /// Too many replicas refused the write for their store's limits to reach the
    /// quorum. Unlike the limits the coordinator checks first, the write may stand on
    /// the `acked` replicas (and the coordinator) that stored it, and may spread.
    #[error("replicas refused the write ({refusal:?}); {acked} of {required} stored it")]
    RefusedByReplicas {
        acked: usize,
        required: usize,
        refusal: crate::message::TooLarge,
    },
}

/// A request that can never succeed as sent.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InvalidArgument {
    #[error("bad context: {0}")]
    Context(#[from] DecodeError),
    #[error("bad quorum: {0}")]
    Quorum(#[from] QuorumError),
    #[error("the context claims a write counter at its maximum")]
    CounterOverflow,
}

/// The answer to one client request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientReply {
    Get(Result<GetOutcome, ClientError>),
    Put(Result<PutOutcome, ClientError>),
}
