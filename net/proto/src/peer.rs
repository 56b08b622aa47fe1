//! Node-to-node frames. A peer connection starts like a client's, on a shard's own
//! native port, but its first request is [`Op::PeerHello`](crate::Op::PeerHello)
//! carrying the sender's view of the cluster; the node answers
//! [`Body::PeerWelcome`](crate::Body::PeerWelcome) only if that view is identical to its
//! own (same partitions, replicas and members with the same addresses), and from then
//! on the connection carries [`PeerFrame`](crate::peer_message::PeerFrame)s one way, from the connecting shard to the
//! accepting node. Each shard keeps one such connection to each other node (on the
//! node's shared native port); the accepting shard passes each frame to the shard it
//! is for. Replies travel on the connections the other way round.

/// The static membership every node must agree on.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
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
pub const PEER_MAGIC: u64 = u64::from_le_bytes(*b"ringkvP\x04");

/// Why a peer handshake is refused, or None if the two views agree.
pub fn check_peer(hello: &PeerHello, ours: &ClusterSpec, version: u16) -> Option<String> {
    if hello.magic != PEER_MAGIC {
        return Some("not a ringkv peer handshake (bad magic)".into());
    }
    if hello.version != version {
        return Some(format!(
            "peer speaks version {}, this node {version}",
            hello.version
        ));
    }
    if !ours.members.iter().any(|m| m.node_id == hello.from_node) {
        return Some(format!("node {} is not a member here", hello.from_node));
    }
    if hello.cluster != *ours {
        return Some(format!(
            "cluster views differ: peer node {} has {:?}, this node has {:?}",
            hello.from_node, hello.cluster, ours
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
        assert_eq!(
            check_peer(&hello(ours.clone(), 2), &ours, PROTOCOL_VERSION),
            None
        );
        let moved = check_peer(&hello(spec("127.0.0.1:9999"), 2), &ours, PROTOCOL_VERSION);
        assert!(moved.unwrap().contains("differ"));
        let stranger = check_peer(&hello(ours.clone(), 9), &ours, PROTOCOL_VERSION);
        assert!(stranger.unwrap().contains("not a member"));
        let old = check_peer(&hello(ours.clone(), 2), &ours, PROTOCOL_VERSION + 1);
        assert!(old.unwrap().contains("version"));
    }
}
