//! Node-to-node frames. A peer connection starts like a client's, on a shard's own
//! native port, but its first request is [`Op::PeerHello`](crate::Op::PeerHello)
//! carrying the sender's view of the cluster; the node answers
//! [`Body::PeerWelcome`](crate::Body::PeerWelcome) only if that view is identical to its
//! own (same partitions, replicas and members with the same addresses), and from then
//! on the connection carries [`PeerFrame`]s one way, from the connecting shard to the
//! accepting node. Each shard keeps one such connection to each other node (on the
//! node's shared native port); the accepting shard passes each frame to the shard it
//! is for. Replies travel on the connections the other way round.

use rkyv::util::AlignedVec;

use crate::frame::FrameError;
use crate::native::{DecodeError, decode_archive, encode_archive};
use crate::{Body, Op};

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
pub const PEER_MAGIC: u64 = u64::from_le_bytes(*b"ringkvP\x01");

/// What flows on a peer connection after the handshake.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum PeerFrame {
    /// A replication message (ringkv-cluster's wire encoding of a `PeerMessage`).
    /// `from_shard` is where a reply to it must go; `to_shard` names the shard a reply
    /// is for (requests go to the shard owning their partition).
    Message {
        from_shard: u16,
        to_shard: Option<u16>,
        payload: Vec<u8>,
    },
    /// A client request this node cannot coordinate (a write for a key it holds no
    /// replica of), handed to a replica; answered by `ForwardReply` with the same id.
    Forward {
        from_shard: u16,
        id: u64,
        op: Op,
    },
    ForwardReply {
        to_shard: u16,
        id: u64,
        body: Body,
    },
}

/// Appends `frame` to `out` as one length-prefixed frame.
pub fn encode_peer_frame(frame: &PeerFrame, out: &mut Vec<u8>) -> Result<(), FrameError> {
    encode_archive(frame, out)
}

/// Validates and decodes one peer frame payload (see [`crate::native::decode_request`]).
pub fn decode_peer_frame(
    payload: &[u8],
    scratch: &mut AlignedVec<16>,
) -> Result<PeerFrame, DecodeError> {
    decode_archive(payload, scratch)
}

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
    use crate::frame::next_frame;
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
    fn frames_round_trip() {
        let frames = [
            PeerFrame::Message {
                from_shard: 1,
                to_shard: Some(0),
                payload: vec![1, 2, 3],
            },
            PeerFrame::Forward {
                from_shard: 0,
                id: 7,
                op: Op::Ping,
            },
            PeerFrame::ForwardReply {
                to_shard: 0,
                id: 7,
                body: Body::Pong,
            },
        ];
        let mut scratch = AlignedVec::new();
        for frame in frames {
            let mut wire = Vec::new();
            encode_peer_frame(&frame, &mut wire).unwrap();
            let (payload, _) = next_frame(&wire).unwrap().unwrap();
            assert_eq!(
                decode_peer_frame(&wire[payload], &mut scratch).unwrap(),
                frame
            );
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
