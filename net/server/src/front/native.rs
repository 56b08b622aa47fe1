//! Native-protocol connections (docs/protocol.md): a handshake, then pipelined requests
//! in length-prefixed rkyv frames, each answered with its id.
//!
//! Unlike the Redis side, answers go out as each request is done, in any order, and the
//! connection reads on while requests run (up to `max_pipeline` ahead): requests on
//! distinct keys run concurrently, those on one key in arrival order
//! ([`crate::front::unordered`]). A frame that is too large or does not validate gets
//! one error response with id 0 (after the answers to the requests before it) and
//! closes that connection only.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use futures_lite::AsyncWriteExt;
use glommio::net::{TcpListener, TcpStream};
use ringkv_cluster::NodeId;
use ringkv_proto::frame::next_frame;
use ringkv_proto::native::{decode_request, encode_response, negotiate};
use ringkv_proto::peer::{ClusterSpec, check_peer};
use ringkv_proto::{
    Body, ErrorReply, Found, NodeAddress, NodeStatus, Op, PROTOCOL_VERSION, Put, Request, Response,
    Topology, Welcome,
};
use rkyv::util::AlignedVec;

use crate::front::connections::{ConnectionError, Connections, READ_CHUNK, read_more};
use crate::front::ops;
use crate::front::pipeline::{Touch, run_in_order};
use crate::front::unordered::{self, Cut, Gate, Unordered};
use crate::shard::Shard;

/// What a shard tells clients and peers about the node and its cluster.
pub struct NodeInfo {
    pub me: NodeAddress,
    pub incarnation: u32,
    pub cluster: ClusterSpec,
}

impl NodeInfo {
    /// The topology a client routes by: every member, with the addresses each one gave
    /// at its last handshake with this shard (just its native address before that).
    /// The members and owners are the ring view's now: a client that refreshes its map
    /// after a membership change routes by the new ring.
    fn topology(&self, shard: &Shard) -> Topology {
        let peers = shard.peers();
        let published = shard.board.current();
        let ring = published.view.ring();
        // The answering node is listed even once it left the ring: it still answers
        // (status, and requests it forwards) until it is stopped.
        let mut members = published.view.members();
        members.insert(ringkv_cluster::NodeId(self.me.node_id));
        let nodes = members
            .into_iter()
            .map(|node| {
                if node.0 == self.me.node_id {
                    return self.me.clone();
                }
                peers
                    .as_ref()
                    .and_then(|p| p.learned(node.0))
                    .unwrap_or_else(|| NodeAddress {
                        node_id: node.0,
                        native: published
                            .addresses
                            .get(&node.0)
                            .cloned()
                            .unwrap_or_default(),
                        resp: String::new(),
                        shard_native: Vec::new(),
                    })
            })
            .collect();
        Topology {
            node_id: self.me.node_id,
            epoch: ring.epoch(),
            partitions: self.cluster.partitions,
            nodes,
            owners: ring.owners().iter().map(|o| o.0).collect(),
        }
    }
}

/// Accepts native-protocol connections until the node stops.
pub async fn accept(
    listener: TcpListener,
    shard: Rc<Shard>,
    connections: Rc<Connections>,
    info: Rc<NodeInfo>,
) {
    crate::front::connections::accept(
        listener,
        connections.clone(),
        refusal(),
        move |stream, id| {
            let (shard, connections, info) = (shard.clone(), connections.clone(), info.clone());
            async move { serve(stream, id, &shard, &connections, &info).await }
        },
    )
    .await
}

/// The frame a connection past the limit gets before it is closed.
fn refusal() -> &'static [u8] {
    static REFUSAL: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    REFUSAL.get_or_init(|| {
        let mut out = Vec::new();
        let body = Body::Error(ErrorReply::Overloaded { inflight: 0 });
        let response = Response {
            id: 0,
            ring_epoch: 0,
            body,
        };
        encode_response(&response, &mut out).expect("a small frame");
        out
    })
}

async fn serve(
    mut stream: TcpStream,
    id: u64,
    shard: &Rc<Shard>,
    connections: &Connections,
    info: &NodeInfo,
) -> Result<(), ConnectionError> {
    stream.set_nodelay(true)?;
    let mut input: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut output: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut scratch = AlignedVec::<16>::new();

    // The handshake, alone: what follows it depends on whether a client or a peer
    // node is connecting.
    let first = loop {
        match next_frame(&input) {
            Ok(Some((payload, used))) => {
                let decoded = decode_request(&input[payload], &mut scratch);
                input.drain(..used);
                break decoded.map_err(|e| e.to_string());
            }
            Ok(None) => {}
            Err(e) => break Err(e.to_string()),
        }
        if !read_more(&mut stream, &mut chunk, &mut input).await? {
            return Ok(());
        }
    };
    let first = match first {
        Ok(first) => first,
        Err(reason) => {
            let message = format!("malformed frame: {reason}");
            encode(
                0,
                0,
                Body::Error(ErrorReply::InvalidArgument { message }),
                &mut output,
            );
            let _ = stream.write_all(&output).await;
            return Err(ConnectionError::Malformed(format!("handshake: {reason}")));
        }
    };
    let body = welcome(&first, shard, info);
    let refused = match &body {
        Body::Error(e) => Some(e.to_string()),
        _ => None,
    };
    let peer = match (&first.op, &body) {
        (Op::PeerHello(hello), Body::PeerWelcome(_)) => Some(NodeId(hello.from_node)),
        _ => None,
    };
    encode(first.id, shard.map_epoch(), body, &mut output);
    stream.write_all(&output).await?;
    output.clear();
    if let Some(reason) = refused {
        let client = match &first.op {
            Op::Hello { client, .. } => client.as_str(),
            _ => "",
        };
        tracing::warn!(%reason, client, "closing a native connection: handshake refused");
        return Err(ConnectionError::Refused(reason));
    }
    if let Some(from) = peer {
        let serving = crate::peers::serve(stream, shard, from, input);
        return connections.as_peer_link(id, serving).await;
    }

    let mut front = Native {
        shard,
        info,
        scratch,
    };
    let served = unordered::serve(&mut stream, connections, &mut front, input).await;
    if let Err(reason) = &served {
        tracing::info!(%reason, "closing a native connection");
    }
    served
}

/// One client connection of the native protocol, after its handshake.
struct Native<'a> {
    shard: &'a Rc<Shard>,
    info: &'a NodeInfo,
    /// Where each frame is copied to be aligned for rkyv.
    scratch: AlignedVec<16>,
}

impl<'a> Unordered for Native<'a> {
    type Request = Request;
    type Run = Pin<Box<dyn Future<Output = Vec<u8>> + 'a>>;

    fn cut(&mut self, input: &[u8]) -> Cut<Request> {
        match next_frame(input) {
            Ok(Some((payload, used))) => match decode_request(&input[payload], &mut self.scratch) {
                Ok(request) => {
                    let gate = Gate::of(touch(&request));
                    Cut::Request(request, gate, used)
                }
                Err(e) => Cut::Malformed(format!("malformed frame: {e}")),
            },
            Ok(None) => Cut::Incomplete,
            Err(e) => Cut::Malformed(format!("malformed frame: {e}")),
        }
    }

    fn run(&self, request: Request) -> Self::Run {
        let (shard, info) = (self.shard, self.info);
        Box::pin(async move {
            let body = execute(shard, info, &request).await;
            // Read once done: the newest map this shard routes by.
            let mut out = Vec::new();
            encode(request.id, shard.map_epoch(), body, &mut out);
            out
        })
    }

    fn malformed(&self, reason: &str, output: &mut Vec<u8>) {
        let message = reason.to_string();
        encode(
            0,
            0,
            Body::Error(ErrorReply::InvalidArgument { message }),
            output,
        );
    }
}

/// Appends the answer to request `id`, stamped with the epoch of the map the shard
/// routes by (so a client with an older one refreshes).
fn encode(id: u64, ring_epoch: u64, body: Body, out: &mut Vec<u8>) {
    let response = Response {
        id,
        ring_epoch,
        body,
    };
    if let Err(e) = encode_response(&response, out) {
        // Only a multi-get can outgrow a frame; say so instead of sending a broken one.
        let message = format!("the reply does not fit in a frame: {e}; ask for fewer keys");
        let body = Body::Error(ErrorReply::InvalidArgument { message });
        let response = Response {
            id,
            ring_epoch,
            body,
        };
        encode_response(&response, out).expect("a small frame");
    }
}

/// The answer to the first request, which must be a client's or a peer's handshake.
fn welcome(first: &Request, shard: &Shard, info: &NodeInfo) -> Body {
    if let Op::PeerHello(hello) = &first.op {
        let known = |node| shard.board.knows(node);
        return match check_peer(hello, &info.cluster, PROTOCOL_VERSION, known) {
            None => Body::PeerWelcome(info.me.clone()),
            Some(message) => Body::Error(ErrorReply::InvalidArgument { message }),
        };
    }
    let Op::Hello {
        magic,
        min_version,
        max_version,
        ..
    } = &first.op
    else {
        return Body::Error(ErrorReply::InvalidArgument {
            message: "the first request on a connection must be Hello".into(),
        });
    };
    match negotiate(*magic, *min_version, *max_version) {
        Ok(version) => Body::Welcome(Welcome {
            version,
            node_id: info.me.node_id,
            shard: shard.id as u32,
            shards: shard.map().shards() as u32,
            shard_native: info.me.shard_native.clone(),
            server: format!("ringkv {}", env!("CARGO_PKG_VERSION")),
        }),
        Err(e) => Body::Error(e),
    }
}

fn touch(request: &Request) -> Touch<'_> {
    match &request.op {
        Op::Get { key, .. } | Op::Delete { key, .. } | Op::Put(Put { key, .. }) => Touch::Key(key),
        Op::Ping | Op::Topology | Op::Status | Op::RingView | Op::ChangeRing(_) => Touch::Nothing,
        Op::Hello { .. } | Op::PeerHello(_) | Op::MultiGet { .. } | Op::MultiPut(_) => Touch::Alone,
    }
}

fn touch_put(put: &Put) -> Touch<'_> {
    Touch::Key(&put.key)
}

async fn execute(shard: &Shard, info: &NodeInfo, request: &Request) -> Body {
    let count = |n: Option<u8>| n.map(usize::from);
    match &request.op {
        Op::Ping => Body::Pong,
        Op::Topology => Body::Topology(info.topology(shard)),
        Op::Status => match (
            shard.status().await,
            shard.members().await,
            shard.ring_report().await,
        ) {
            (Ok(shards), Ok(members), Ok(ring)) => Body::Status(NodeStatus {
                node_id: info.me.node_id,
                incarnation: info.incarnation,
                shards,
                members,
                ring,
            }),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => Body::Error(ops::error_reply(e)),
        },
        Op::RingView => match shard.board.current().encode() {
            Ok(frame) => Body::RingView(frame),
            Err(message) => Body::Error(ErrorReply::InvalidArgument { message }),
        },
        Op::ChangeRing(request) => match shard.change_ring(request.clone()).await {
            Ok(frame) => Body::RingView(frame),
            Err(message) => Body::Error(ErrorReply::InvalidArgument { message }),
        },
        Op::Hello { .. } | Op::PeerHello(_) => Body::Error(ErrorReply::InvalidArgument {
            message: "a handshake is only allowed once, as the first request".into(),
        }),
        Op::Get { key, r, strict } => match get(shard, key, count(*r), *strict).await {
            Ok(found) => Body::Found(found),
            Err(e) => Body::Error(e),
        },
        Op::Put(put) => match write(shard, put).await {
            Ok(()) => Body::Written,
            Err(e) => Body::Error(e),
        },
        Op::Delete {
            key,
            context,
            w,
            strict,
        } => match ops::put(shard, key, None, context.clone(), count(*w), *strict).await {
            Ok(()) => Body::Written,
            Err(e) => Body::Error(e),
        },
        Op::MultiGet { keys, r } => {
            let reads = keys.iter().map(|key| get(shard, key, count(*r), false));
            Body::FoundMany(futures_util::future::join_all(reads).await)
        }
        Op::MultiPut(puts) => {
            let written = run_in_order(puts, touch_put, |put| write(shard, put)).await;
            Body::WrittenMany(written)
        }
    }
}

async fn get(
    shard: &Shard,
    key: &[u8],
    r: Option<usize>,
    strict: bool,
) -> Result<Found, ErrorReply> {
    let outcome = ops::get(shard, key, r, strict).await?;
    Ok(Found {
        context: outcome.context.encode(),
        siblings: outcome.values().into_iter().map(<[u8]>::to_vec).collect(),
        stand_ins: outcome.stand_ins,
    })
}

async fn write(shard: &Shard, put: &Put) -> Result<(), ErrorReply> {
    let w = put.w.map(usize::from);
    let context = put.context.clone();
    ops::put(shard, &put.key, Some(&put.value), context, w, put.strict).await
}
