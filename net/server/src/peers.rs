//! The peer transport of one shard: a link to every other node, and the receiving end
//! of the links other nodes open to this one (see `ringkv_proto::peer`).
//!
//! A link is a bounded queue and a task that connects (with backoff), does the peer
//! handshake and writes whatever is queued. While a link cannot connect, its node is
//! reported unreachable to this shard's cluster state machine, so requests that need
//! it fail fast with Unavailable instead of waiting for a timeout. A full queue drops
//! the message: the coordinator's timeout covers it, as it covers a lost packet.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use futures_util::StreamExt;
use glommio::net::TcpStream;
use ringkv_cluster::{NodeId, PeerMessage, RingView};
use ringkv_proto::frame::next_frame;
use ringkv_proto::native::{decode_response, encode_request};
use ringkv_proto::peer::{ClusterSpec, MemberSpec, PEER_MAGIC, PeerHello};
use ringkv_proto::peer_message::{
    Incoming, PeerInput, encode_gossip, encode_peer_message, encode_ring_view,
};
use ringkv_proto::{Body, NodeAddress, Op, PROTOCOL_VERSION, Request};
use rkyv::util::AlignedVec;

use crate::driver::PeerSend;
use crate::front::connections::{ConnectionError, read_more};
use crate::shard::Shard;
use crate::tasks::TaskGroup;

/// Frames queued for one peer before new ones are dropped.
const LINK_QUEUE: usize = 8192;
/// Bytes gathered into one write.
const WRITE_BATCH: usize = 256 << 10;

/// The sending end of one link: a queue bounded by counting what is in it. Each
/// frame carries when it was queued.
struct Link {
    queue: UnboundedSender<(Instant, Vec<u8>)>,
    queued: Rc<Cell<usize>>,
}

/// The link task's end of the queue.
struct Queue {
    frames: UnboundedReceiver<(Instant, Vec<u8>)>,
    queued: Rc<Cell<usize>>,
    /// Frames queued longer than this are dropped unsent: whoever waits on them (a
    /// coordinator, a forwarding node, a handoff) has given up, and a forwarded put
    /// applied after its forwarder answered Timeout would overwrite later writes.
    stale_after: Duration,
}

impl Queue {
    async fn next(&mut self) -> Option<Vec<u8>> {
        loop {
            let frame = self.frames.next().await;
            match self.taken(frame) {
                Taken::Fresh(frame) => return Some(frame),
                Taken::Stale => continue,
                Taken::Empty => return None,
            }
        }
    }

    fn try_next(&mut self) -> Option<Vec<u8>> {
        loop {
            let frame = self.frames.try_recv().ok();
            match self.taken(frame) {
                Taken::Fresh(frame) => return Some(frame),
                Taken::Stale => continue,
                Taken::Empty => return None,
            }
        }
    }

    fn taken(&self, frame: Option<(Instant, Vec<u8>)>) -> Taken {
        let Some((queued_at, frame)) = frame else {
            return Taken::Empty;
        };
        self.queued.set(self.queued.get() - 1);
        if queued_at.elapsed() > self.stale_after {
            Taken::Stale
        } else {
            Taken::Fresh(frame)
        }
    }
}

enum Taken {
    Fresh(Vec<u8>),
    Stale,
    Empty,
}

/// One shard's links to the other nodes.
pub struct Peers {
    me: NodeId,
    shard: u16,
    spec: ClusterSpec,
    /// Links to every member the ring view names (more are added as nodes join).
    links: RefCell<HashMap<NodeId, Link>>,
    stale_after: Duration,
    /// How each node said it is reached (learned at handshakes), for clients' topology.
    learned: RefCell<HashMap<u32, NodeAddress>>,
    /// Nodes whose link cannot connect right now.
    down: RefCell<std::collections::HashSet<u32>>,
    /// The link tasks; they end once `close` has closed their queues.
    running: TaskGroup,
}

impl Peers {
    /// Starts a link to every other member. `shard` is told when a node's link goes up
    /// or down.
    pub fn start(
        me: NodeId,
        shard: &Rc<Shard>,
        spec: ClusterSpec,
        stale_after: Duration,
    ) -> Rc<Peers> {
        let members = spec.members.clone();
        let peers = Rc::new(Peers {
            me,
            shard: shard.id as u16,
            spec,
            links: RefCell::new(HashMap::new()),
            stale_after,
            learned: RefCell::new(HashMap::new()),
            down: RefCell::new(std::collections::HashSet::new()),
            running: TaskGroup::new(),
        });
        for member in members {
            peers.add_link(shard, member.node_id, member.native);
        }
        peers
    }

    /// Starts a link to `node` at `native`, unless there is one (or it is this node,
    /// or the node is stopping).
    pub fn add_link(self: &Rc<Self>, shard: &Rc<Shard>, node: u32, native: String) {
        if node == self.me.0 || shard.is_stopping() {
            return;
        }
        let mut links = self.links.borrow_mut();
        if links.contains_key(&NodeId(node)) {
            return;
        }
        let (queue, frames) = unbounded();
        let queued = Rc::new(Cell::new(0));
        links.insert(
            NodeId(node),
            Link {
                queue,
                queued: queued.clone(),
            },
        );
        let receiver = Queue {
            frames,
            queued,
            stale_after: self.stale_after,
        };
        let (link, shard) = (self.clone(), shard.clone());
        self.running
            .spawn(async move { link.run_link(&shard, node, native, receiver).await });
    }

    /// Ends every link of a stopping shard: what is queued is still written, nothing
    /// more is taken, and a link that is down or breaks does not reconnect. Returns
    /// once every link task has ended (a write or a connect in progress times out).
    pub async fn close(&self) {
        for link in self.links.borrow().values() {
            link.queue.close_channel();
        }
        self.running.ended().await;
    }

    /// What a node said about itself at its last handshake, if it has answered one.
    pub fn learned(&self, node: u32) -> Option<NodeAddress> {
        self.learned.borrow().get(&node).cloned()
    }

    fn push(&self, to: NodeId, message: &PeerMessage) -> bool {
        let mut bytes = Vec::new();
        if let Err(err) = encode_peer_message(self.shard, message, &mut bytes) {
            tracing::warn!(%err, ?to, "a peer message that cannot be encoded is dropped");
            return false;
        }
        self.queue(to, bytes)
    }

    /// Queues one encoded frame for `to`; false if it has no link or its queue is full.
    fn queue(&self, to: NodeId, bytes: Vec<u8>) -> bool {
        let links = self.links.borrow();
        let Some(link) = links.get(&to) else {
            return false;
        };
        let sent = link.queued.get() < LINK_QUEUE
            && link.queue.unbounded_send((Instant::now(), bytes)).is_ok();
        if sent {
            link.queued.set(link.queued.get() + 1);
        }
        sent
    }

    /// Sends the node's ring view, and the addresses it knows, to node `to`.
    pub fn send_ring(&self, to: NodeId, cluster: u64, view: &RingView, addresses: &[MemberSpec]) {
        let mut bytes = Vec::new();
        match encode_ring_view(cluster, view, addresses, &mut bytes) {
            Ok(()) => drop(self.queue(to, bytes)),
            Err(err) => tracing::warn!(%err, ?to, "a ring view that cannot be encoded"),
        }
    }

    async fn run_link(&self, shard: &Rc<Shard>, node: u32, addr: String, mut queue: Queue) {
        let addr = match addr.parse::<SocketAddr>() {
            Ok(addr) => Ok(addr),
            Err(e) => Err(format!("bad address {addr}: {e}")),
        };
        let mut backoff = Duration::from_millis(20);
        loop {
            let connected = match &addr {
                Ok(addr) => self.connect(*addr).await,
                Err(reason) => Err(ConnectionError::Malformed(reason.clone())),
            };
            let mut stream = match connected {
                Ok((stream, address)) => {
                    self.learned.borrow_mut().insert(node, address);
                    if self.down.borrow_mut().remove(&node) {
                        tracing::info!(node, "peer link up");
                    }
                    shard.driver().set_link_up(NodeId(node), true);
                    backoff = Duration::from_millis(20);
                    stream
                }
                Err(reason) => {
                    if self.down.borrow_mut().insert(node) {
                        tracing::warn!(node, %reason, "peer unreachable");
                    }
                    shard.driver().set_link_up(NodeId(node), false);
                    // Messages queued meanwhile would be stale by the time we connect;
                    // the coordinators waiting on them time out.
                    while queue.try_next().is_some() {}
                    if shard.is_stopping() {
                        return;
                    }
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                    continue;
                }
            };
            // Write until the connection fails; then reconnect.
            let mut out = Vec::with_capacity(WRITE_BATCH);
            loop {
                let first = match queue.try_next() {
                    Some(frame) => frame,
                    None => match next_or_closed(&mut queue, &mut stream).await {
                        Idle::Frame(Some(frame)) => frame,
                        Idle::Frame(None) => return,
                        Idle::Closed(why) => {
                            tracing::warn!(node, %why, "peer link closed by the peer");
                            break;
                        }
                    },
                };
                out.extend_from_slice(&first);
                while out.len() < WRITE_BATCH {
                    match queue.try_next() {
                        Some(frame) => out.extend_from_slice(&frame),
                        None => break,
                    }
                }
                if let Err(e) = stream.write_all(&out).await {
                    tracing::warn!(node, %e, "peer link broke");
                    out.clear();
                    break;
                }
                out.clear();
            }
            // What is still queued is for a node we are leaving: not worth a reconnect.
            if shard.is_stopping() {
                return;
            }
        }
    }

    /// Connects and does the handshake; the peer answers with how it is reached.
    async fn connect(&self, addr: SocketAddr) -> Result<(TcpStream, NodeAddress), ConnectionError> {
        let wait = Duration::from_secs(1);
        let mut stream = TcpStream::connect_timeout(addr, wait).await?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(wait))?;
        // A peer that stops reading (paused, or its host gone without a FIN) must not
        // block the link forever: the write fails, the link reconnects, and a peer that
        // cannot finish a handshake is reported unreachable.
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        // Bytes the kernel could not deliver within a few seconds kill the link
        // rather than arrive minutes later (TCP retransmits for ~15 min by default):
        // a frame older than the request timeout is dropped before sending, and
        // tombstone collection waits out only a bounded delay (its settle time).
        set_user_timeout(&stream, PEER_USER_TIMEOUT);
        let hello = Request {
            id: 1,
            op: Op::PeerHello(PeerHello {
                magic: PEER_MAGIC,
                version: PROTOCOL_VERSION,
                cluster: self.spec.clone(),
                from_node: self.me.0,
                from_shard: self.shard,
            }),
        };
        let mut out = Vec::new();
        let malformed = |e: &dyn std::fmt::Display| ConnectionError::Malformed(e.to_string());
        encode_request(&hello, &mut out).map_err(|e| malformed(&e))?;
        stream.write_all(&out).await?;
        let mut input = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((payload, _)) = next_frame(&input).map_err(|e| malformed(&e))? {
                let response = decode_response(&input[payload], &mut AlignedVec::new())
                    .map_err(|e| malformed(&e))?;
                return match response.body {
                    Body::PeerWelcome(address) => Ok((stream, address)),
                    Body::Error(e) => Err(ConnectionError::Refused(e.to_string())),
                    other => Err(malformed(&format!("the handshake answered {other:?}"))),
                };
            }
            if !read_more(&mut stream, &mut chunk, &mut input).await? {
                let closed = std::io::ErrorKind::UnexpectedEof;
                return Err(std::io::Error::new(closed, "closed during the handshake").into());
            }
        }
    }
}

/// What an idle link saw first.
enum Idle {
    /// A frame to send (`None`: the link's queue is gone, the node is stopping).
    Frame(Option<Vec<u8>>),
    /// The peer closed the connection or it failed.
    Closed(String),
}

/// Waits, on an idle link, for the next frame or for the peer to go. The peer never
/// writes on this connection after the handshake, so a read that ends means it is gone
/// (a killed process's kernel closes it at once): the link reconnects now, instead of
/// learning it at its next write, which would land in a dead socket and be lost (an
/// ack to a restarted node's first put was, and the put timed out). The read waits
/// only while the link is idle, so a busy link pays nothing for it.
async fn next_or_closed(queue: &mut Queue, stream: &mut TcpStream) -> Idle {
    let frame = async { Idle::Frame(queue.next().await) };
    let closed = async {
        let mut probe = [0u8; 64];
        loop {
            match stream.read(&mut probe).await {
                Ok(0) => return Idle::Closed("end of stream".into()),
                Ok(_) => return Idle::Closed("unexpected bytes from the peer".into()),
                // The connection's read timeout: still open, keep watching.
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => return Idle::Closed(e.to_string()),
            }
        }
    };
    futures_lite::future::or(frame, closed).await
}

impl Peers {
    /// Sends a gossip message to node `to` (dropped, like any message, when its link's
    /// queue is full).
    pub fn send_gossip(&self, to: NodeId, message: &ringkv_cluster::GossipMessage) {
        let mut bytes = Vec::new();
        if encode_gossip(message, &mut bytes).is_ok() {
            self.queue(to, bytes);
        }
    }
}

impl PeerSend for Peers {
    fn send(&self, to: NodeId, message: &PeerMessage) {
        self.push(to, message);
    }
}

/// Reads a peer connection after its handshake: every message goes to the shard it is
/// for, read in place (`ringkv_proto::peer_message::PeerInput`). A malformed frame
/// closes the connection (the peer reconnects).
pub async fn serve(
    mut stream: TcpStream,
    shard: &Rc<Shard>,
    from: NodeId,
    after_handshake: Vec<u8>,
) -> Result<(), ConnectionError> {
    let mut chunk = vec![0u8; 64 << 10];
    let mut input = PeerInput::new(&after_handshake);
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    loop {
        loop {
            let next = input.next_message().map_err(|e| {
                tracing::warn!(node = from.0, %e, "closing a peer link: malformed frame");
                ConnectionError::Malformed(format!("peer {}: {e}", from.0))
            })?;
            match next {
                None => break,
                Some(Incoming::Message { message, .. }) => {
                    // A reply to a request no shard here made (a confused or hostile
                    // peer) is dropped.
                    if let Some(target) = shard.map().recipient(&message) {
                        shard.peer_message(target, from, message).await;
                    }
                }
                Some(Incoming::Gossip(message)) => shard.gossip(from, message).await,
                Some(Incoming::Ring(frame)) => shard.ring_view(from, frame).await,
            }
        }
        if shard.is_stopping() {
            return Ok(());
        }
        // Wake up now and then to notice a stopping node: a peer link is never idle
        // for long, but it must not hold up a graceful stop.
        match stream.read(&mut chunk).await {
            Ok(0) => return Ok(()),
            Ok(n) => input.extend(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// How long bytes sent to a peer may stay unacknowledged before its link is given up
/// (TCP_USER_TIMEOUT): the bound on a peer message's delay that tombstone collection
/// waits out (`NodeConfig::message_delay_max`).
pub(crate) const PEER_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP_USER_TIMEOUT on a peer connection: how long sent bytes may stay unacknowledged
/// before the kernel gives the connection up. Best effort: a failure is logged.
fn set_user_timeout(stream: &TcpStream, timeout: Duration) {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: the descriptor is the stream's open socket, borrowed only for this
    // call, while `stream` (which owns it) is alive.
    #[allow(unsafe_code)]
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    if let Err(err) = socket2::SockRef::from(&fd).set_tcp_user_timeout(Some(timeout)) {
        tracing::warn!(%err, "cannot set TCP_USER_TIMEOUT on a peer link");
    }
}
