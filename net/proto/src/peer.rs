//! Node-to-node frames. A peer connection starts like a client's, on a shard's own
//! native port, but its first request is [`Op::PeerHello`](crate::Op::PeerHello)
//! carrying the sender's view of the cluster; the node answers
//! [`Body::PeerWelcome`](crate::Body::PeerWelcome) only if the two agree on the shape of
//! the data (partitions and replicas) and the sender is a member it knows of (members
//! come and go: the ring view, not the handshake, says who they are), and from then
//! on the connection carries [`PeerFrame`](crate::peer_message::PeerFrame)s one way, from the connecting shard to the
//! accepting node. Each shard keeps one such connection to each other node (on the
//! node's shared native port); the accepting shard passes each frame to the shard it
//! is for. Replies travel on the connections the other way round.

/// The sender's cluster: its shape, which every node must share, and the members it
/// knew when its links started (for the operator reading a refusal).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// The cluster's id: drawn from the first members' list when the cluster formed
    /// (every node given the same `--peers` computes the same one), stored with the
    /// ring view, handed to every node that joins. Two clusters never exchange views.
    pub id: u64,
    pub partitions: u32,
    /// N: replicas of each key.
    pub replicas: u8,
    /// Every member, ordered by id.
    pub members: Vec<MemberSpec>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MemberSpec {
    pub node_id: u32,
    /// The member's native-protocol address; its shard i listens on port + 1 + i.
    pub native: String,
}

/// The connecting side of a peer handshake.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PeerHello {
    pub magic: u64,
    pub version: u16,
    pub cluster: ClusterSpec,
    pub from_node: u32,
    pub from_shard: u16,
}

/// Opens a peer handshake (a different magic from a client's, so neither is taken for
/// the other).
/// The last byte is the peer frame format: 2 since frames carry their archive padded
/// and aligned (`crate::peer_message`), so a node of the old format is refused at the
/// handshake instead of misreading frames.
pub const PEER_MAGIC: u64 = u64::from_le_bytes(*b"ringkvP\x05");

/// Why a peer handshake is refused, or None if the two views agree.
pub fn check_peer(
    hello: &PeerHello,
    ours: &ClusterSpec,
    version: u16,
    is_member: impl Fn(u32) -> bool,
) -> Option<String> {
    if hello.magic != PEER_MAGIC {
        return Some("not a ringkv peer handshake (bad magic)".into());
    }
    if hello.version != version {
        return Some(format!(
            "peer speaks version {}, this node {version}",
            hello.version
        ));
    }
    if !is_member(hello.from_node) {
        return Some(format!(
            "node {} is not a member here (join it with `ringkv server --join`)",
            hello.from_node
        ));
    }
    let (theirs, ours) = (&hello.cluster, ours);
    if theirs.id != ours.id {
        return Some(format!(
            "another cluster: peer node {} belongs to cluster {:016x}, this node to {:016x}",
            hello.from_node, theirs.id, ours.id
        ));
    }
    if (theirs.partitions, theirs.replicas) != (ours.partitions, ours.replicas) {
        return Some(format!(
            "cluster shapes differ: peer node {} has {} partitions and N={}, this node {} and N={}",
            hello.from_node, theirs.partitions, theirs.replicas, ours.partitions, ours.replicas
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::native::PROTOCOL_VERSION;

    fn spec(addr: &str) -> ClusterSpec {
        ClusterSpec {
            id: 5,
            partitions: 64,
            replicas: 3,
            members: vec![
                MemberSpec {
                    node_id: 1,
                    native: "127.0.0.1:7500".into(),
                },
                MemberSpec {
                    node_id: 2,
                    native: addr.into(),
                },
            ],
        }
    }

    #[test]
    fn peers_must_agree_on_the_cluster() {
        let ours = spec("127.0.0.1:7510");
        let hello = |cluster: ClusterSpec, from_node: u32| PeerHello {
            magic: PEER_MAGIC,
            version: PROTOCOL_VERSION,
            cluster,
            from_node,
            from_shard: 0,
        };
        let members = |node: u32| node <= 2;
        let check = |h: &PeerHello, version| check_peer(h, &ours, version, members);
        assert_eq!(check(&hello(ours.clone(), 2), PROTOCOL_VERSION), None);
        // Member lists may differ (one side knows of a join first); the shape may not.
        assert_eq!(
            check(&hello(spec("127.0.0.1:9999"), 2), PROTOCOL_VERSION),
            None
        );
        let mut reshaped = ours.clone();
        reshaped.partitions *= 2;
        let reshaped = check(&hello(reshaped, 2), PROTOCOL_VERSION);
        assert!(reshaped.unwrap().contains("shapes differ"));
        let mut foreign = ours.clone();
        foreign.id += 1;
        let foreign = check(&hello(foreign, 2), PROTOCOL_VERSION);
        assert!(foreign.unwrap().contains("another cluster"));
        let mut fewer = ours.clone();
        fewer.replicas = 2;
        assert!(check(&hello(fewer, 2), PROTOCOL_VERSION).is_some());
        let stranger = check(&hello(ours.clone(), 9), PROTOCOL_VERSION);
        assert!(stranger.unwrap().contains("not a member"));
        let old = check(&hello(ours.clone(), 2), PROTOCOL_VERSION + 1);
        assert!(old.unwrap().contains("version"));
    }
}
