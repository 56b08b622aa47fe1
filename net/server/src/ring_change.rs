//! Asking a running member for a membership change (`Op::ChangeRing`) or its ring view
//! (`Op::RingView`), over one plain blocking connection: what `ringkv server --join`
//! does before its executors start, and what `ringkv admin` does.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use ringkv_cluster::{RingChange, RingView};
use ringkv_proto::frame::next_frame;
use ringkv_proto::native::{decode_response, encode_request, hello};
use ringkv_proto::peer::MemberSpec;
use ringkv_proto::peer_message::{Incoming, PeerInput, RingFrame};
use ringkv_proto::{Body, Op, Request, RingChangeRequest};
use rkyv::util::AlignedVec;

#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("cannot reach {addr}: {why}")]
    Unreachable { addr: String, why: String },
    #[error("{addr} refused: {why}")]
    Refused { addr: String, why: String },
    #[error("{addr} answered something that is not a ring view: {why}")]
    Malformed { addr: String, why: String },
}

/// A node's answer: who it is, its ring view and the members' addresses it knows.
#[derive(Debug)]
pub struct Answer {
    pub node_id: u32,
    /// The cluster's id (`ClusterSpec::id`).
    pub cluster: u64,
    pub view: RingView,
    pub addresses: Vec<MemberSpec>,
}

/// Asks the node at `addr` to start `change`; answers with the view that holds it, as
/// the node stored it.
pub fn change(addr: &str, change: RingChangeRequest, wait: Duration) -> Result<Answer, AskError> {
    ask(addr, Op::ChangeRing(change), wait)
}

/// The ring view of the node at `addr`.
pub fn view(addr: &str, wait: Duration) -> Result<Answer, AskError> {
    ask(addr, Op::RingView, wait)
}

fn ask(addr: &str, op: Op, wait: Duration) -> Result<Answer, AskError> {
    let unreachable = |why: &dyn std::fmt::Display| AskError::Unreachable {
        addr: addr.to_owned(),
        why: why.to_string(),
    };
    let malformed = |why: &dyn std::fmt::Display| AskError::Malformed {
        addr: addr.to_owned(),
        why: why.to_string(),
    };
    let target = (addr.to_socket_addrs().map_err(|e| unreachable(&e))?)
        .next()
        .ok_or_else(|| unreachable(&"the name resolves to no address"))?;
    let mut stream = TcpStream::connect_timeout(&target, wait).map_err(|e| unreachable(&e))?;
    stream
        .set_read_timeout(Some(wait))
        .and_then(|()| stream.set_write_timeout(Some(wait)))
        .map_err(|e| unreachable(&e))?;
    let mut out = Vec::new();
    encode_request(&hello(1, "ringkv-admin"), &mut out).map_err(|e| malformed(&e))?;
    encode_request(&Request { id: 2, op }, &mut out).map_err(|e| malformed(&e))?;
    stream.write_all(&out).map_err(|e| unreachable(&e))?;
    let deadline = Instant::now() + wait;
    let (mut input, mut chunk, mut scratch) = (Vec::new(), [0u8; 8192], AlignedVec::new());
    let mut node_id = None;
    loop {
        while let Some((payload, consumed)) = next_frame(&input).map_err(|e| malformed(&e))? {
            let response =
                decode_response(&input[payload], &mut scratch).map_err(|e| malformed(&e))?;
            input.drain(..consumed);
            match response.body {
                Body::Welcome(welcome) => node_id = Some(welcome.node_id),
                Body::RingView(frame) => {
                    let frame = decode_view(&frame).map_err(|e| malformed(&e))?;
                    let node_id = node_id.ok_or_else(|| malformed(&"no welcome came first"))?;
                    return Ok(Answer {
                        node_id,
                        cluster: frame.cluster,
                        view: frame.view,
                        addresses: frame.addresses,
                    });
                }
                Body::Error(e) => {
                    return Err(AskError::Refused {
                        addr: addr.to_owned(),
                        why: e.to_string(),
                    });
                }
                other => return Err(malformed(&format!("{other:?}"))),
            }
        }
        if Instant::now() > deadline {
            return Err(unreachable(&"no answer in time"));
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(unreachable(&"the connection closed")),
            Ok(n) => input.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(unreachable(&e)),
        }
    }
}

/// A `Body::RingView` frame, checked.
pub fn decode_view(frame: &[u8]) -> Result<RingFrame, String> {
    match PeerInput::new(frame).next_message() {
        Ok(Some(Incoming::Ring(frame))) => Ok(frame),
        Ok(_) => Err("no ring view in the frame".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A change as operators write it.
pub fn describe(change: &RingChange) -> String {
    match change {
        RingChange::Join(member) => format!("join {}", member.node.0),
        RingChange::Leave(node) => format!("leave {}", node.0),
        RingChange::Replace { dead, with } => format!("replace {} with {}", dead.0, with.node.0),
    }
}
