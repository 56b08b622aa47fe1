//! How one node splits its work between its shards (one state machine per core): which
//! shard owns each partition, and which range of request ids each shard numbers from,
//! so a peer's message reaches the one shard that can use it. The server and the
//! simulator both route by this type, so the simulator routes as production does.

use thiserror::Error;

use crate::message::{PeerMessage, RequestId};
use crate::ring::PartitionId;

/// The shards of one node. Partition p belongs to shard p % shards; shard i numbers its
/// requests from i << 48, leaving each 2^48 sequence numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardMap {
    shards: usize,
}

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("{0} shards: a node runs 1 to {max} shards", max = ShardMap::SHARDS_MAX)]
pub struct ShardCountError(pub usize);

impl ShardMap {
    /// Bits of a request sequence left to each shard.
    const SEQUENCE_BITS: u32 = 48;
    /// The most shards the id ranges leave room for.
    pub const SHARDS_MAX: usize = 1 << (64 - Self::SEQUENCE_BITS);

    pub fn new(shards: usize) -> Result<ShardMap, ShardCountError> {
        if shards == 0 || shards > Self::SHARDS_MAX {
            return Err(ShardCountError(shards));
        }
        Ok(ShardMap { shards })
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The shard that owns `partition` (and every key in it).
    pub fn owner(&self, partition: PartitionId) -> usize {
        partition.0 as usize % self.shards
    }

    /// Where shard `shard` starts numbering its requests (see `NodeConfig::first_sequence`).
    pub fn first_sequence(&self, shard: usize) -> u64 {
        (shard as u64) << Self::SEQUENCE_BITS
    }

    /// The shard that numbered `request`; `None` for an id no shard of this node made.
    pub fn numbered(&self, request: RequestId) -> Option<usize> {
        let shard = (request.sequence >> Self::SEQUENCE_BITS) as usize;
        (shard < self.shards).then_some(shard)
    }

    /// The shard a peer message is for: a request to the shard that owns its
    /// partition, a reply to the shard that numbered the request. `None` for a reply to
    /// a request no shard of this node made (a confused or hostile peer).
    pub fn recipient(&self, message: &PeerMessage) -> Option<usize> {
        match message {
            PeerMessage::Read { partition, .. }
            | PeerMessage::Write { partition, .. }
            | PeerMessage::Repair { partition, .. }
            | PeerMessage::Forward { partition, .. }
            | PeerMessage::AeBranches { partition, .. }
            | PeerMessage::AeLeaves { partition, .. }
            | PeerMessage::AeKeys { partition, .. }
            | PeerMessage::AePull { partition, .. }
            | PeerMessage::TombstonesCheck { partition, .. }
            | PeerMessage::TombstonesHeld { partition, .. }
            | PeerMessage::TransferDone { partition, .. } => Some(self.owner(*partition)),
            PeerMessage::ReadReply { request, .. }
            | PeerMessage::WriteAck { request }
            | PeerMessage::WriteRefused { request, .. }
            | PeerMessage::ForwardReply { request, .. } => self.numbered(*request),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_route_back_to_the_shard_that_numbered_them() {
        let map = ShardMap::new(3).unwrap();
        for shard in 0..3 {
            let request = RequestId {
                epoch: 9,
                sequence: map.first_sequence(shard) + 17,
            };
            assert_eq!(map.numbered(request), Some(shard));
            let ack = PeerMessage::WriteAck { request };
            assert_eq!(map.recipient(&ack), Some(shard));
        }
        let foreign = RequestId {
            epoch: 9,
            sequence: map.first_sequence(3),
        };
        assert_eq!(map.numbered(foreign), None);
        assert_eq!(map.owner(PartitionId(7)), 1);
        assert!(ShardMap::new(0).is_err());
        assert!(ShardMap::new(ShardMap::SHARDS_MAX + 1).is_err());
    }
}
