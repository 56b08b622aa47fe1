//! The native protocol's messages.
//!
//! A connection carries frames ([`crate::frame`]) whose payloads are rkyv archives: a
//! [`Request`] from the client, a [`Response`] from the node. Every request carries an
//! id chosen by the client and its response carries the same id, so a client may keep
//! many requests in flight on one connection; the node may answer them in any order.
//!
//! The first request on a connection must be [`Op::Hello`]; the node answers
//! [`Body::Welcome`] with the protocol version both sides will speak, or an error
//! (and closes) when their version ranges do not meet. Archives are validated
//! (bytecheck) before a single field is read: a malformed frame is a [`DecodeError`],
//! and the node closes that connection only.

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use thiserror::Error;

use crate::frame::{self, FrameError};
use crate::topology::Topology;

/// The protocol version this build speaks. Once released, a change to any archived type
/// below bumps it; until then (nothing deployed) variants are only ever appended.
pub const PROTOCOL_VERSION: u16 = 4;

/// Opens every handshake, so a node can tell a ringkv client from anything else that
/// connects (an HTTP probe, a Redis client on the wrong port) at the first frame.
pub const MAGIC: u64 = u64::from_le_bytes(*b"ringkv\0\x01");

/// One request and the id its response will carry.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub op: Op,
}

/// What a request asks. `r` and `w` of `None` use the node's defaults.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The handshake; must come first. The node picks the highest version in
    /// `min_version..=max_version` that it speaks.
    Hello {
        magic: u64,
        min_version: u16,
        max_version: u16,
        client: String,
    },
    Ping,
    /// Every sibling of `key` and the causal context covering them.
    Get {
        key: Vec<u8>,
        r: Option<u8>,
        /// Ask only the key's own replicas (no stand-ins for down ones).
        strict: bool,
    },
    Put(Put),
    /// A tombstone, superseding what `context` covers.
    Delete {
        key: Vec<u8>,
        context: WriteContext,
        w: Option<u8>,
        strict: bool,
    },
    /// Gets of several keys; answered by [`Body::FoundMany`] in the same order.
    MultiGet {
        keys: Vec<Vec<u8>>,
        r: Option<u8>,
    },
    /// Puts of several keys; answered by [`Body::WrittenMany`] in the same order. Each
    /// put stands alone: there is no atomicity across keys.
    MultiPut(Vec<Put>),
    /// The node's view of the cluster: its members, their shard ports, the partition map.
    Topology,
    /// What the node holds and has served, shard by shard.
    Status,
    /// Instead of `Hello`, from another node: the connection becomes a peer link
    /// ([`crate::peer`]).
    PeerHello(crate::peer::PeerHello),
    /// An operator's or a joining node's membership change, started at this node;
    /// answered by [`Body::RingView`] with the view that holds it, or an error when
    /// refused (another change is in progress, or the change cannot apply).
    ChangeRing(RingChangeRequest),
    /// This node's ring view, answered by [`Body::RingView`].
    RingView,
}

/// A membership change asked of a node ([`Op::ChangeRing`]).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum RingChangeRequest {
    /// Node `node_id`, reached at `native`, joins. Asked again once it is part of the
    /// change (or of the ring), it is answered with the view: a joiner that crashed
    /// before storing the answer asks again.
    Join {
        node_id: u32,
        native: String,
        /// The joiner's partition count, which must be the cluster's.
        partitions: u32,
    },
    /// Node `node_id` hands its partitions off and leaves the ring.
    Leave { node_id: u32 },
    /// Node `node_id`, reached at `native`, takes over every partition of `dead`,
    /// which is gone for good (its data is rebuilt from the other replicas).
    Replace {
        dead: u32,
        node_id: u32,
        native: String,
        partitions: u32,
    },
}

/// A write of one key.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Put {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub context: WriteContext,
    pub w: Option<u8>,
    /// Count only the key's own replicas toward W (no hinted stand-ins: sloppy
    /// quorum off for this write).
    pub strict: bool,
}

/// Which versions a write supersedes.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum WriteContext {
    /// Exactly those a previous get returned (the context bytes, unchanged): the only
    /// way to resolve siblings safely.
    Given(Vec<u8>),
    /// Whatever the coordinator reads just before writing, like Redis's SET. Two such
    /// writes racing from different clients can still leave siblings; nothing is lost.
    Latest,
    /// Nothing: the write becomes a sibling of whatever is stored.
    Blind,
}

/// The answer to the request with the same id.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub id: u64,
    /// The epoch of the partition map the answering shard routes by (the
    /// [`Topology::epoch`] it would give now; 0 in connection-level errors). A client
    /// holding an older map fetches the topology again at once: that is how clients
    /// learn of a membership change without waiting for their periodic refresh.
    pub ring_epoch: u64,
    pub body: Body,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Welcome(Welcome),
    Pong,
    Found(Found),
    /// A put or delete reached its write quorum durably.
    Written,
    FoundMany(Vec<Result<Found, ErrorReply>>),
    WrittenMany(Vec<Result<(), ErrorReply>>),
    Topology(Topology),
    Error(ErrorReply),
    Status(NodeStatus),
    /// The answer to an accepted `PeerHello`: how to reach the accepting node.
    PeerWelcome(crate::topology::NodeAddress),
    /// A ring view and its members' native addresses, as one peer frame
    /// (`crate::peer_message::encode_ring_view`; decode it with
    /// `crate::peer_message::PeerInput`, which checks it).
    RingView(Vec<u8>),
}

/// One node's answer to [`Op::Status`].
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub node_id: u32,
    /// Grows by one each time the node starts.
    pub incarnation: u32,
    pub shards: Vec<ShardStatus>,
    /// How this node sees every member (itself included), from its gossip membership;
    /// empty for a single node.
    pub members: Vec<MemberReport>,
    /// The ring view this node holds.
    pub ring: RingReport,
}

/// A node's ring view, for operators: the ring in force and the change moving in.
#[derive(
    rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq, Default,
)]
pub struct RingReport {
    pub epoch: u64,
    /// The ring's members (the ring in force).
    pub members: Vec<u32>,
    /// The change in progress, if any (`join 4`, `leave 2`, `replace 3 with 5`).
    pub change: Option<String>,
    /// Partitions of the change still to move.
    pub pending: u32,
    /// Members that have not reported holding the change yet (streaming waits for
    /// them).
    pub waiting_for: Vec<u32>,
    /// Whether this node's shards may stream partitions now.
    pub streaming: bool,
}

/// One member in a node's membership view.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MemberReport {
    pub node_id: u32,
    pub incarnation: u64,
    pub heartbeat: u64,
    /// What the member declares: `joining`, `up` or `leaving`.
    pub status: String,
    /// The failure detector's phi for it, times 1000 (0 for the reporting node).
    pub phi_milli: u32,
    /// Whether this node takes it for down (routes around it) now.
    pub down: bool,
    /// Times this node has taken it for down since this node started.
    pub suspicions: u64,
    /// The epoch of the ring view the member declares it holds (gossiped): members
    /// that differ have not all heard of the latest change yet.
    pub ring_epoch: u64,
}

/// One shard's counters since the node started (keys and bytes: now).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ShardStatus {
    pub shard: u32,
    /// Partitions this shard owns.
    pub partitions: u32,
    /// Live keys (tombstones not counted) and bytes of records on disk.
    pub keys: u64,
    pub disk_bytes: u64,
    /// Client reads and writes this shard received (a write that replaces reads first,
    /// so it counts once in each; a forwarded write counts here too), and those it
    /// refused as overloaded.
    pub reads: u64,
    pub writes: u64,
    pub overloaded: u64,
    /// Group commits (each one write and one fdatasync).
    pub commits: u64,
    /// Corruption the shard's store has met since it opened: reads refused because a
    /// record failed its checksum, damaged regions found at recovery or by compaction,
    /// records lost to corruption. Each such key reads as missing here and is repaired
    /// from its other replicas.
    pub corrupt: u64,
    /// The store's latched failure (a failed fdatasync or directory sync), if any: it
    /// refuses writes until the node restarts.
    pub store_failure: Option<String>,
    /// Hints this shard holds for down (or just returned) nodes, per target.
    pub hints: Vec<HintReport>,
    /// Since the start: hinted writes stored here, handed off to their target,
    /// refused at the per-target bound, and dropped at the age bound.
    pub hints_stored: u64,
    pub hints_handed_off: u64,
    pub hints_refused: u64,
    pub hints_expired: u64,
    /// Anti-entropy: of `partitions`, those whose Merkle tree matched a peer's when
    /// last compared; keys pushed to peers and repairs received from them since start.
    pub partitions_in_sync: u32,
    pub keys_pushed: u64,
    pub repairs_received: u64,
    /// Tombstones in the index (home partitions), the index's heap bytes, and
    /// tombstones collected since start (every replica held them; see
    /// `--tombstone-grace-s`).
    pub tombstones: u64,
    pub index_bytes: u64,
    pub tombstones_collected: u64,
    /// Membership changes since start: keys and bytes this shard streamed to new
    /// replicas, partitions it finished sending and receiving, and partitions it
    /// dropped after they moved away; streams running now.
    pub transfer_keys_sent: u64,
    pub transfer_bytes_sent: u64,
    pub partitions_sent: u64,
    pub partitions_received: u64,
    pub partitions_dropped: u64,
    pub streams: u32,
    /// The rate streams run at now (keys per second; it follows the new replicas'
    /// ack times up to `--transfer-keys-per-second`; 0 when not streaming).
    pub transfer_keys_per_second: u64,
}

/// Hints pending for one target node.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HintReport {
    pub target: u32,
    pub keys: u64,
    pub bytes: u64,
}

/// The node's side of the handshake.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    pub node_id: u32,
    /// The shard (core) that accepted this connection, and how many the node runs.
    pub shard: u32,
    pub shards: u32,
    /// Each shard's own native address, so a shard-aware client can go straight to the
    /// shard that owns a key (partition % shards).
    pub shard_native: Vec<String>,
    pub server: String,
}

/// A read's result: the live sibling values (empty when the key is absent or deleted)
/// and the opaque context to hand back with the next write of the key.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub context: Vec<u8>,
    pub siblings: Vec<Vec<u8>>,
    /// Answers that came from stand-ins for down replicas (sloppy quorum): above
    /// zero, the read may miss writes the key's own replicas hold.
    pub stand_ins: u32,
}

/// Why a request did not succeed. Whether a retry is safe depends on the kind:
/// `Timeout` on a write means the outcome is unknown, never that it failed.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq, Error)]
pub enum ErrorReply {
    /// The request can never succeed as sent (bad quorum, bad context, bad handshake).
    #[error("invalid argument: {message}")]
    InvalidArgument { message: String },
    /// A key or value over the node's limits; nothing was written.
    #[error("{what} of {size} bytes exceeds the limit of {limit}")]
    TooLarge { what: String, size: u64, limit: u64 },
    /// The shard has too much in flight; nothing was done. Retry after a pause.
    #[error("overloaded: {inflight} requests in flight on the shard")]
    Overloaded { inflight: u32 },
    /// Too few replicas reachable to try; nothing was done.
    #[error("unavailable: {reachable} replicas reachable, {required} required")]
    Unavailable { required: u32, reachable: u32 },
    /// The quorum was not reached in time. For a write the outcome is unknown: it may
    /// be on some replicas and may yet spread.
    #[error(
        "timed out with {acked} of {required} replicas answering (a write's outcome is unknown)"
    )]
    Timeout { acked: u32, required: u32 },
    /// The write would leave more siblings than the node allows; nothing was written.
    #[error("{count} siblings would exceed the limit of {limit}; read, merge, write back")]
    TooManySiblings { count: u32, limit: u32 },
    /// The node is stopping; nothing was done.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// Something failed inside the node (a store error); the message says what.
    #[error("internal error: {message}")]
    Internal { message: String },
    /// A membership change is moving this key's partition and the nodes asked do not
    /// agree yet on who holds it (the node a write was forwarded to is no replica
    /// under its newer view, which names `replicas`). Nothing was written; retry
    /// after a pause (views agree within a few round trips).
    #[error(
        "the ring is changing: this key's replicas are now {replicas:?}; nothing was written, retry"
    )]
    RingChanging { replicas: Vec<u32> },
}

/// Why a payload is not a valid message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("malformed archive: {0}")]
    Archive(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Appends `request` to `out` as one frame.
pub fn encode_request(request: &Request, out: &mut Vec<u8>) -> Result<(), FrameError> {
    encode_archive(request, out)
}

/// Appends `response` to `out` as one frame.
pub fn encode_response(response: &Response, out: &mut Vec<u8>) -> Result<(), FrameError> {
    encode_archive(response, out)
}

/// Validates and decodes one request payload. `scratch` is reused between calls: rkyv
/// reads archives in place and needs them aligned, and a payload inside a read buffer
/// usually is not.
pub fn decode_request(
    payload: &[u8],
    scratch: &mut AlignedVec<16>,
) -> Result<Request, DecodeError> {
    decode_archive(payload, scratch)
}

/// Validates and decodes one response payload (see [`decode_request`]).
pub fn decode_response(
    payload: &[u8],
    scratch: &mut AlignedVec<16>,
) -> Result<Response, DecodeError> {
    decode_archive(payload, scratch)
}

/// Appends `value` to `out` as one frame holding its rkyv archive.
pub(crate) fn encode_archive<T>(value: &T, out: &mut Vec<u8>) -> Result<(), FrameError>
where
    T: for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>,
{
    let bytes = rkyv::to_bytes::<rancor::Error>(value)
        .expect("serialising plain data into memory cannot fail");
    frame::write_frame(&bytes, out)
}

/// Copies `payload` into the aligned `scratch`, validates the archive and decodes it.
pub(crate) fn decode_archive<T>(
    payload: &[u8],
    scratch: &mut AlignedVec<16>,
) -> Result<T, DecodeError>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
{
    scratch.clear();
    scratch.extend_from_slice(payload);
    rkyv::from_bytes::<T, rancor::Error>(scratch).map_err(|e| DecodeError::Archive(e.to_string()))
}

/// The request that opens a connection.
pub fn hello(id: u64, client: &str) -> Request {
    Request {
        id,
        op: Op::Hello {
            magic: MAGIC,
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client: client.to_owned(),
        },
    }
}

/// The node's answer to a handshake: the version to speak, or why there is none.
pub fn negotiate(magic: u64, min_version: u16, max_version: u16) -> Result<u16, ErrorReply> {
    if magic != MAGIC {
        return Err(ErrorReply::InvalidArgument {
            message: "not a ringkv handshake (bad magic)".into(),
        });
    }
    if min_version > PROTOCOL_VERSION || max_version < PROTOCOL_VERSION {
        return Err(ErrorReply::InvalidArgument {
            message: format!(
                "protocol versions {min_version}..={max_version} requested; this node speaks {PROTOCOL_VERSION}"
            ),
        });
    }
    Ok(PROTOCOL_VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::next_frame;
    use crate::topology::NodeAddress;
    use proptest::prelude::*;

    fn frame_payload(wire: &[u8]) -> &[u8] {
        let (payload, end) = next_frame(wire).unwrap().unwrap();
        assert_eq!(end, wire.len());
        &wire[payload]
    }

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..40)
    }

    fn write_context() -> impl Strategy<Value = WriteContext> {
        prop_oneof![
            bytes().prop_map(WriteContext::Given),
            Just(WriteContext::Latest),
            Just(WriteContext::Blind),
        ]
    }

    fn put() -> impl Strategy<Value = Put> {
        (
            bytes(),
            bytes(),
            write_context(),
            any::<Option<u8>>(),
            any::<bool>(),
        )
            .prop_map(|(key, value, context, w, strict)| Put {
                key,
                value,
                context,
                w,
                strict,
            })
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u64>(), any::<u16>(), any::<u16>(), ".{0,8}").prop_map(
                |(magic, min_version, max_version, client)| Op::Hello {
                    magic,
                    min_version,
                    max_version,
                    client
                }
            ),
            Just(Op::Ping),
            Just(Op::Topology),
            Just(Op::Status),
            (bytes(), any::<Option<u8>>(), any::<bool>()).prop_map(|(key, r, strict)| Op::Get {
                key,
                r,
                strict
            }),
            put().prop_map(Op::Put),
            (bytes(), write_context(), any::<Option<u8>>(), any::<bool>()).prop_map(
                |(key, context, w, strict)| Op::Delete {
                    key,
                    context,
                    w,
                    strict
                }
            ),
            (
                proptest::collection::vec(bytes(), 0..4),
                any::<Option<u8>>()
            )
                .prop_map(|(keys, r)| Op::MultiGet { keys, r }),
            proptest::collection::vec(put(), 0..4).prop_map(Op::MultiPut),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(id in any::<u64>(), op in op()) {
            let request = Request { id, op };
            let mut wire = Vec::new();
            encode_request(&request, &mut wire).unwrap();
            let mut scratch = AlignedVec::new();
            prop_assert_eq!(decode_request(frame_payload(&wire), &mut scratch).unwrap(), request);
        }

        /// Flipped bytes decode to an error or to some valid request; never a panic.
        #[test]
        fn corrupted_requests_never_panic(op in op(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
            let mut wire = Vec::new();
            encode_request(&Request { id: 1, op }, &mut wire).unwrap();
            let mut payload = frame_payload(&wire).to_vec();
            for (at, byte) in flips {
                let at = at % payload.len();
                payload[at] ^= byte | 1;
            }
            let _ = decode_request(&payload, &mut AlignedVec::new());
            payload.truncate(payload.len() / 2);
            let _ = decode_request(&payload, &mut AlignedVec::new());
        }
    }

    #[test]
    fn responses_round_trip() {
        let topology = Topology {
            node_id: 3,
            epoch: 9,
            partitions: 8,
            nodes: vec![NodeAddress {
                node_id: 3,
                native: "127.0.0.1:7500".into(),
                resp: "127.0.0.1:7379".into(),
                shard_native: vec!["127.0.0.1:7501".into()],
            }],
            owners: vec![3; 8],
        };
        let bodies = [
            Body::Pong,
            Body::Written,
            Body::Topology(topology),
            Body::Found(Found {
                context: vec![1, 2],
                siblings: vec![b"a".to_vec(), Vec::new()],
                stand_ins: 1,
            }),
            Body::FoundMany(vec![
                Ok(Found {
                    context: Vec::new(),
                    siblings: Vec::new(),
                    stand_ins: 0,
                }),
                Err(ErrorReply::Timeout {
                    acked: 1,
                    required: 2,
                }),
            ]),
            Body::WrittenMany(vec![Ok(()), Err(ErrorReply::ShuttingDown)]),
            Body::Error(ErrorReply::TooLarge {
                what: "value".into(),
                size: 9,
                limit: 8,
            }),
        ];
        let mut scratch = AlignedVec::new();
        for (id, body) in bodies.into_iter().enumerate() {
            let response = Response {
                id: id as u64,
                ring_epoch: id as u64 * 3,
                body,
            };
            let mut wire = Vec::new();
            encode_response(&response, &mut wire).unwrap();
            assert_eq!(
                decode_response(frame_payload(&wire), &mut scratch).unwrap(),
                response
            );
        }
    }

    #[test]
    fn random_payloads_are_errors_not_panics() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut scratch = AlignedVec::new();
        for _ in 0..20_000 {
            let payload: Vec<u8> = (0..rng.usize(0..96)).map(|_| rng.u8(..)).collect();
            let _ = decode_request(&payload, &mut scratch);
            let _ = decode_response(&payload, &mut scratch);
        }
    }

    #[test]
    fn handshake_versions_must_meet() {
        assert_eq!(negotiate(MAGIC, 1, 5), Ok(PROTOCOL_VERSION));
        assert!(negotiate(MAGIC, PROTOCOL_VERSION + 1, 5).is_err());
        assert!(negotiate(MAGIC, 0, 0).is_err());
        assert!(negotiate(0x4745_5420, 1, 1).is_err());
    }
}
