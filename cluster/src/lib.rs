//! ringkv-cluster: ringkv's distributed logic as sans-IO state machines.
//!
//! Nothing here does I/O, reads a clock, draws random numbers, spawns threads or
//! awaits: time comes in as `now`, and every effect goes out as an action for a driver
//! to carry out (the glommio server in production, `ringkv-sim` in tests). A test
//! (`tests/tidy.rs`) enforces this. docs/cluster.md describes the design and the byte
//! layouts.
//!
//! - [`ring`]: partitions, their assignment to nodes, preference lists.
//! - [`clock`] and [`version`]: dotted version vectors, siblings, merge.
//! - [`codec`]: the byte encodings of contexts and stored version sets.
//! - [`quorum`]: validated (N, R, W).
//! - [`node`]: one node's state machine (coordinator and replica), driven by
//!   `handle_*` inputs and [`Node::poll_action`] outputs; [`message`] and [`request`]
//!   are what it exchanges with peers and clients.
//! - [`merkle`] and [`anti_entropy`]: per-partition Merkle trees kept current on the
//!   write path, and the exchange that compares two replicas' trees.
//! - [`membership`] and [`phi`]: gossip membership and phi-accrual failure detection.
//! - [`hints`]: sloppy quorum's stand-ins and the hints they hold for handoff.
//! - [`shard_map`]: which of a node's shards owns a partition or a reply.
//! - [`view`] and [`keeper`]: membership changes (join, leave, replace): the ring a
//!   node routes by while partitions move, and the node's keeper that proposes
//!   changes, spreads views and says when streaming may start.
//!
//! The wire form of peer messages lives with the other formats, in `ringkv-proto`.

pub mod anti_entropy;
pub mod clock;
pub mod codec;
mod coordinator;
pub mod hints;
pub mod keeper;
pub mod membership;
pub mod merkle;
pub mod message;
pub mod node;
pub mod phi;
pub mod quorum;
mod replica;
pub mod request;
pub mod ring;
pub mod shard_map;
pub mod version;
pub mod view;

pub use clock::{Actor, ClockEntry, Dot, EpochSource, VersionVector};
pub use codec::{Context, DecodeError, StoredVersions};
pub use hints::{HintConfig, HintStats, HintsPending, Shelf};
pub use keeper::{KeeperConfig, RingKeeper};
pub use membership::{
    GossipMessage, MemberAddress, MemberState, MemberStatus, MemberView, Membership,
    MembershipConfig, MembershipEvent,
};
pub use message::{ForwardedPut, PeerMessage, RequestId, TooLarge};
pub use node::{Action, DropReason, Node, NodeConfig, NodeStats, Sabotage, TimerId};
pub use quorum::{Quorum, QuorumError};
pub use replica::{StorageCompletion, StorageFailure, StorageOp, StorageOpId, StoredRead};
pub use request::{
    ClientError, ClientReply, ClientToken, GetOutcome, GetRequest, InvalidArgument, PutOutcome,
    PutRequest, Supersedes, Written,
};
pub use ring::{Member, NodeId, PartitionId, Ring, RingError, ZoneId};
pub use shard_map::{ShardCountError, ShardMap};
pub use version::{ConflictMode, Value, Version, VersionSet};
pub use view::{RingChange, RingView, ViewError};
