//! Where a key lives, as a client computes it from a node's [`Topology`].
//!
//! A key's partition is the top log2(Q) bits of its xxh3-64 hash (the ring in
//! ringkv-cluster uses the same rule; a server test checks they agree). Each partition
//! has an owner node (the first of its preference list, which coordinates its
//! requests), and inside a node partition `p` belongs to shard `p % shards`.

use xxhash_rust::xxh3::xxh3_64;

/// A node's view of the cluster, as the `Topology` request returns it.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The node that answered.
    pub node_id: u32,
    /// Grows whenever the partition map changes; a client holding an older map refreshes.
    pub epoch: u64,
    /// Q, a power of two.
    pub partitions: u32,
    pub nodes: Vec<NodeAddress>,
    /// For each partition, the node id of its owner.
    pub owners: Vec<u32>,
}

/// How to reach one node.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    pub node_id: u32,
    /// The native-protocol address every shard accepts on.
    pub native: String,
    /// The Redis-protocol address every shard accepts on.
    pub resp: String,
    /// Shard i's own native-protocol address; its length is the node's shard count.
    pub shard_native: Vec<String>,
}

/// The partition of `key` among `partitions` (a power of two; 0 or 1 mean one).
pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    let bits = partitions.max(1).trailing_zeros();
    if bits == 0 {
        return 0;
    }
    (xxh3_64(key) >> (64 - bits)) as u32
}

impl Topology {
    /// The owner of `key` and the shard on it that holds the key, if the map is whole.
    pub fn route(&self, key: &[u8]) -> Option<(&NodeAddress, usize)> {
        let partition = partition_of(key, self.partitions);
        let owner = *self.owners.get(partition as usize)?;
        let node = self.nodes.iter().find(|n| n.node_id == owner)?;
        let shards = node.shard_native.len().max(1);
        Some((node, partition as usize % shards))
    }

    /// The node with id `node_id`.
    pub fn node(&self, node_id: u32) -> Option<&NodeAddress> {
        self.nodes.iter().find(|n| n.node_id == node_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_use_the_top_bits_and_stay_in_range() {
        for q in [1u32, 2, 64, 1024, 1 << 20] {
            for i in 0..1000u32 {
                assert!(partition_of(&i.to_le_bytes(), q) < q.max(1));
            }
        }
        let key = b"user:42";
        assert_eq!(partition_of(key, 1024), (xxh3_64(key) >> 54) as u32);
    }

    #[test]
    fn keys_route_to_their_owner_and_shard() {
        let node = |id: u32, shards: usize| NodeAddress {
            node_id: id,
            native: format!("10.0.0.{id}:7500"),
            resp: format!("10.0.0.{id}:7379"),
            shard_native: (0..shards)
                .map(|s| format!("10.0.0.{id}:{}", 7501 + s))
                .collect(),
        };
        let topology = Topology {
            node_id: 1,
            epoch: 1,
            partitions: 4,
            nodes: vec![node(1, 2), node(2, 3)],
            owners: vec![1, 2, 1, 2],
        };
        for i in 0..200u32 {
            let key = i.to_be_bytes();
            let p = partition_of(&key, 4);
            let (owner, shard) = topology.route(&key).unwrap();
            assert_eq!(owner.node_id, topology.owners[p as usize]);
            assert_eq!(shard, p as usize % owner.shard_native.len());
        }
        let broken = Topology {
            owners: vec![1, 9, 1, 9],
            ..topology
        };
        assert!((0..50u32).any(|i| broken.route(&i.to_be_bytes()).is_none()));
    }
}
