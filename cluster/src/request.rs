//! What clients ask a node and what they get back.

use thiserror::Error;

use crate::clock::{Dot, VersionVector};
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
    /// `None`: the node's configured quorum ([`crate::NodeConfig::quorum`]).
    pub quorum: Option<Quorum>,
    /// Ask only the key's own N replicas. By default (sloppy) a down replica's place
    /// is taken by the next healthy node on the ring, which answers from the hints it
    /// holds for it.
    pub strict: bool,
}

/// What a put replaces. Every put is causal: it supersedes exactly the versions its
/// context covers and becomes a sibling of everything else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Supersedes {
    /// Context bytes exactly as a previous get returned them ([`Context::encode`]).
    Context(Vec<u8>),
    /// Whatever R replicas hold when the put starts (Redis SET and DEL): the
    /// coordinator reads a quorum first and writes with the context of that read,
    /// inside this one request. A write concurrent with that read stays a sibling.
    QuorumHeld,
    /// Nothing: a blind write, a sibling of whatever is stored.
    Nothing,
}

/// Write `value` (a delete when `None`) superseding what `supersedes` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutRequest {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub supersedes: Supersedes,
    /// `None`: the node's configured quorum ([`crate::NodeConfig::quorum`]).
    pub quorum: Option<Quorum>,
    pub mode: ConflictMode,
    /// Write only if the quorum read finds a live value (Redis DEL); otherwise the
    /// answer is [`PutOutcome::NothingToDelete`] and nothing is written. Only with
    /// [`Supersedes::QuorumHeld`], which makes that read.
    pub only_if_present: bool,
    /// Count only the key's own N replicas toward W. By default (sloppy quorum,
    /// Dynamo §4.6) a down replica's share goes to the next healthy node on the ring,
    /// which keeps it as a hint, durably, and hands it back when the replica returns.
    pub strict: bool,
}

impl PutRequest {
    /// A put superseding what a quorum holds (Redis SET), at the node's quorum.
    pub fn replacing(key: Vec<u8>, value: Vec<u8>) -> Self {
        PutRequest {
            key,
            value: Some(value),
            supersedes: Supersedes::QuorumHeld,
            quorum: None,
            mode: ConflictMode::Causal,
            only_if_present: false,
            strict: false,
        }
    }

    /// A delete of whatever a quorum holds, if it holds a live value (Redis DEL).
    pub fn delete_if_present(key: Vec<u8>) -> Self {
        PutRequest {
            key,
            value: None,
            supersedes: Supersedes::QuorumHeld,
            quorum: None,
            mode: ConflictMode::Causal,
            only_if_present: true,
            strict: false,
        }
    }
}

/// A successful get: the siblings (tombstones included; see
/// [`VersionSet::is_deleted`]) and the context to hand back with the next put.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetOutcome {
    pub versions: VersionSet,
    pub context: Context,
    /// How many of the R answers came from stand-ins holding hints for a down
    /// replica (sloppy quorum). Above zero, the read may miss a write acknowledged by
    /// the key's own replicas; it sees it again once they are back.
    pub stand_ins: u32,
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

/// A successful put.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    Written(Written),
    /// An `only_if_present` put found no live value; nothing was written.
    NothingToDelete,
}

/// A write that reached its quorum: the dot naming it and the clock of what it
/// superseded (its context, joined with what the quorum read found for
/// [`Supersedes::QuorumHeld`]). No context for a next put is returned on purpose: the
/// coordinator's merged set may hold siblings this client never saw, and a context
/// covering them would let the next put supersede values unseen. Read to get one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub dot: Dot,
    pub superseded: VersionVector,
    /// How many of the answers this put counted (its read's R, for a SET or DEL, and
    /// its W acks) came from stand-ins for down replicas (sloppy quorum). Above zero,
    /// the write is durable on W nodes but a quorum read of the key's own replicas may
    /// miss it until handoff brings it home.
    pub stand_ins: u32,
}

impl PutOutcome {
    /// The new write's dot, if one was written.
    pub fn dot(&self) -> Option<Dot> {
        match self {
            PutOutcome::Written(written) => Some(written.dot),
            PutOutcome::NothingToDelete => None,
        }
    }
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
    #[error("a key of {len} bytes is over the limit of {limit}")]
    KeyTooLong { len: usize, limit: usize },
    /// `only_if_present` needs the quorum read of [`Supersedes::QuorumHeld`].
    #[error("only_if_present needs a put that supersedes what a quorum holds")]
    OnlyIfPresentWithoutRead,
    /// The replica a write was forwarded to refused it as invalid (its words).
    #[error("refused by the replica it was forwarded to: {0}")]
    AtReplica(String),
}

/// The answer to one client request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientReply {
    Get(Result<GetOutcome, ClientError>),
    Put(Result<PutOutcome, ClientError>),
}
