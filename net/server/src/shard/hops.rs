//! Work one shard hands another over glommio's channel mesh.
//!
//! A request for a key another shard owns, and a peer message for another shard, is a
//! [`Hop`]. Each carries the typed channel its answer goes back on, and the
//! destination answers without a task of its own. Hops are sent one by one, at once:
//! batching them per destination and turn of the executor was measured (see
//! docs/benchmarks.md) and bought nothing, since the destination is rarely asleep
//! under load, and cost a task per batch.

use futures_channel::oneshot;
use ringkv_cluster::{
    ClientError, GetOutcome, GetRequest, GossipMessage, NodeId, PeerMessage, PutOutcome, PutRequest,
};
use ringkv_proto::peer_message::RingFrame;
use ringkv_proto::{MemberReport, RingChangeRequest, RingReport, ShardStatus};

/// One request or message for another shard of this node.
pub enum Hop {
    Get {
        request: GetRequest,
        reply: oneshot::Sender<Result<GetOutcome, ClientError>>,
    },
    Put {
        request: PutRequest,
        reply: oneshot::Sender<Result<PutOutcome, ClientError>>,
    },
    /// Live keys on the destination shard.
    CountKeys {
        reply: oneshot::Sender<u64>,
    },
    Status {
        reply: oneshot::Sender<ShardStatus>,
    },
    /// The node's membership view, from shard 0.
    Members {
        reply: oneshot::Sender<Vec<MemberReport>>,
    },
    /// A peer message from another node, for the destination shard; no answer.
    Peer {
        from: NodeId,
        message: PeerMessage,
    },
    /// Gossip from another node, for shard 0 (which runs the node's membership).
    Gossip {
        from: NodeId,
        message: GossipMessage,
    },
    /// Every node the node's failure detector suspects now (the whole set, sent again
    /// every heartbeat interval, so a lost update heals at the next one).
    Suspected {
        nodes: Vec<NodeId>,
    },
    /// A peer's ring view, for the node's ring keeper on shard 0.
    Ring {
        from: NodeId,
        frame: RingFrame,
    },
    /// A membership change asked of this node, for its ring keeper on shard 0:
    /// answered with the stored view (as a ring frame) or why it was refused.
    ChangeRing {
        request: RingChangeRequest,
        reply: oneshot::Sender<Result<Vec<u8>, String>>,
    },
    /// The ring view as the keeper on shard 0 holds it.
    RingReport {
        reply: oneshot::Sender<RingReport>,
    },
}
