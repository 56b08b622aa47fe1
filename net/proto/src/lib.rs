//! ringkv-proto: the bytes that travel between clients and nodes, with no runtime.
//!
//! - [`frame`]: the native protocol's length-prefixed frames; sizes are checked before
//!   anything is allocated.
//! - [`native`]: the native protocol's messages (requests with ids for pipelining, a
//!   versioned handshake, typed errors) as rkyv archives validated before use.
//! - [`peer`]: frames between nodes (replication messages, forwarded requests).
//! - [`topology`]: which node and shard own a key, as a client computes it.
//! - [`resp`]: the Redis protocol (RESP2 and RESP3) codec.
//!
//! docs/protocol.md describes both protocols byte by byte. The server (glommio) and the
//! client (threads or tokio) share this crate, so neither can drift from the other.

pub mod frame;
pub mod native;
pub mod peer;
pub mod peer_gossip;
pub mod peer_message;
pub mod peer_ring;
pub mod resp;
pub mod topology;

pub use frame::{FrameError, MAX_FRAME};
pub use native::{
    Body, DecodeError, ErrorReply, Found, HintReport, MemberReport, NodeStatus, Op,
    PROTOCOL_VERSION, Put, Request, Response, RingChangeRequest, RingReport, ShardStatus, Welcome,
    WriteContext,
};
pub use topology::{NodeAddress, Topology, partition_of};
