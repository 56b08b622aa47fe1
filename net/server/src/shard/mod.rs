//! One shard's view of the node: routes each request to the shard that owns its key
//! (directly, or with one hop over the glommio channel mesh), and bounds the work in
//! flight so an overloaded shard answers `Overloaded` instead of queueing without end.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use futures_channel::oneshot;
use glommio::channels::channel_mesh::Senders;
use glommio::channels::shared_channel::ConnectedReceiver;
use ringkv_cluster::{
    ClientError, GetOutcome, GetRequest, GossipMessage, NodeId, PeerMessage, PutOutcome,
    PutRequest, Quorum, Ring, ShardMap, Shelf,
};
use ringkv_engine::disk::DmaDisk;
use ringkv_proto::{HintReport, MemberReport, ShardStatus};

use crate::driver::ShardDriver;
use crate::membership::MembershipDriver;
use crate::ring_keeper::{KeeperDriver, RingBoard};
pub use hops::Hop;
use ringkv_proto::peer_message::RingFrame;
use ringkv_proto::{RingChangeRequest, RingReport};
use std::sync::Arc;
use std::time::Duration;

mod hops;
use crate::peers::Peers;

/// Why the server (not the cluster logic) could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Client(ClientError),
    #[error("shard overloaded: {inflight} requests in flight; retry later")]
    Overloaded { inflight: usize },
    #[error("shutting down")]
    ShuttingDown,
}

pub struct Shard {
    pub id: usize,
    map: ShardMap,
    ring: Ring,
    driver: Rc<ShardDriver<DmaDisk>>,
    /// The other shards of this node; gone once this shard will send them no more
    /// (see `close_mesh`).
    mesh: RefCell<Option<Rc<Senders<Hop>>>>,
    inflight: Cell<usize>,
    max_inflight: usize,
    reads: Cell<u64>,
    writes: Cell<u64>,
    overloaded: Cell<u64>,
    /// The node's quorum (N from the configuration, R and W a majority of it): what
    /// requests naming no R or W use (`Settings::quorum`).
    pub quorum: Quorum,
    peers: RefCell<Option<Rc<Peers>>>,
    /// The node's gossip membership, on shard 0 only.
    membership: RefCell<Option<Rc<MembershipDriver>>>,
    /// The node's ring keeper, on shard 0 only, and the board its views are
    /// published on, which every shard follows.
    keeper: RefCell<Option<Rc<KeeperDriver>>>,
    pub board: Arc<RingBoard>,
    /// The epoch of the ring in force of the view this shard runs on: what its
    /// replies carry, so clients holding an older partition map refresh.
    map_epoch: Cell<u64>,
    stopping: Cell<bool>,
    /// Largest value a put may carry (the store's limit).
    pub max_value_bytes: usize,
}

/// Counts one request in flight for as long as it lives.
struct InFlight<'a>(&'a Cell<usize>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

impl Shard {
    pub fn new(
        ring: Ring,
        driver: Rc<ShardDriver<DmaDisk>>,
        mesh: Senders<Hop>,
        max_inflight: usize,
        max_value_bytes: usize,
        quorum: Quorum,
        board: Arc<RingBoard>,
    ) -> Rc<Shard> {
        let map_epoch = Cell::new(driver.view().ring().epoch());
        Rc::new(Shard {
            id: mesh.peer_id(),
            map: ShardMap::new(mesh.nr_consumers()).expect("one mesh peer per shard"),
            ring,
            driver,
            mesh: RefCell::new(Some(Rc::new(mesh))),
            inflight: Cell::new(0),
            max_inflight,
            reads: Cell::new(0),
            writes: Cell::new(0),
            overloaded: Cell::new(0),
            quorum,
            peers: RefCell::new(None),
            membership: RefCell::new(None),
            keeper: RefCell::new(None),
            board,
            map_epoch,
            stopping: Cell::new(false),
            max_value_bytes,
        })
    }

    pub fn set_peers(&self, peers: Rc<Peers>) {
        self.driver.set_peers(peers.clone());
        *self.peers.borrow_mut() = Some(peers);
    }

    pub fn peers(&self) -> Option<Rc<Peers>> {
        self.peers.borrow().clone()
    }

    /// Marks the node as stopping: links from other nodes end, links to them stop
    /// reconnecting.
    pub fn stop(&self) {
        self.stopping.set(true);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.get()
    }

    /// Drops this shard's senders to the other shards (hops fail with ShuttingDown from
    /// now on). Each other shard serves hops from this one until this happens: only
    /// then does its `serve_peer` loop for this shard end.
    pub fn close_mesh(&self) {
        self.mesh.borrow_mut().take();
    }

    fn mesh(&self) -> Option<Rc<Senders<Hop>>> {
        self.mesh.borrow().clone()
    }

    /// Hands a replication message to shard `target` of this node. A full batch is
    /// sent here, waiting for room in the mesh: that carries backpressure back to the
    /// peer's connection when the target shard falls behind.
    pub async fn peer_message(&self, target: usize, from: NodeId, message: PeerMessage) {
        if target == self.id {
            self.driver.handle_peer(from, message);
        } else if target < self.map.shards() {
            // Dropped only when the node stops, as a message to a stopped node is.
            self.hop(target, Hop::Peer { from, message }).await;
        }
    }

    /// Sends `hop` to shard `to`, waiting for room in the mesh; false if it could not
    /// be sent (the node is stopping), and then nothing was done.
    async fn hop(&self, to: usize, hop: Hop) -> bool {
        match self.mesh() {
            // The target shard only goes away when the node stops.
            Some(mesh) => mesh.send_to(to, hop).await.is_ok(),
            None => false,
        }
    }

    /// Gossip from node `from`, for the node's membership on shard 0.
    pub async fn gossip(&self, from: NodeId, message: GossipMessage) {
        if self.id == 0 {
            self.take_gossip(from, message);
        } else {
            self.hop(0, Hop::Gossip { from, message }).await;
        }
    }

    fn take_gossip(&self, from: NodeId, message: GossipMessage) {
        if let Some(membership) = self.membership() {
            membership.handle(from, message);
        }
    }

    /// Tells every shard of this node which nodes the failure detector suspects now.
    /// Each shard's state machine routes around them.
    pub fn broadcast_suspected(&self, nodes: &[NodeId]) {
        self.driver.set_suspected(nodes);
        let Some(mesh) = self.mesh() else { return };
        for other in (0..self.map.shards()).filter(|&s| s != self.id) {
            // Without waiting (this runs inside the membership's step). The whole set
            // goes again at the next heartbeat interval, so a full queue only delays it.
            let nodes = nodes.to_vec();
            let _ = mesh.try_send_to(other, Hop::Suspected { nodes });
        }
    }

    /// A peer's ring view, for the node's ring keeper on shard 0.
    pub async fn ring_view(&self, from: NodeId, frame: RingFrame) {
        if self.id == 0 {
            self.take_ring_view(from, frame);
        } else {
            self.hop(0, Hop::Ring { from, frame }).await;
        }
    }

    fn take_ring_view(&self, from: NodeId, frame: RingFrame) {
        if let Some(keeper) = self.keeper() {
            keeper.handle(from, frame);
        }
    }

    /// Starts a membership change at the node's ring keeper (shard 0); the stored view
    /// that holds it, as a ring frame, or why it was refused.
    pub async fn change_ring(&self, request: RingChangeRequest) -> Result<Vec<u8>, String> {
        if self.id == 0 {
            return self.local_change(request);
        }
        let (reply, answer) = oneshot::channel();
        if !self.hop(0, Hop::ChangeRing { request, reply }).await {
            return Err("shutting down".into());
        }
        answer.await.map_err(|_| "shutting down".to_string())?
    }

    fn local_change(&self, request: RingChangeRequest) -> Result<Vec<u8>, String> {
        match self.keeper() {
            Some(keeper) => keeper.change(request).map_err(|e| e.to_string()),
            None => Err("this node runs no ring keeper".into()),
        }
    }

    /// The ring view as the node's keeper (shard 0) holds it.
    pub async fn ring_report(&self) -> Result<RingReport, ServerError> {
        if self.id == 0 {
            return Ok(self.local_ring_report());
        }
        let (reply, answer) = oneshot::channel();
        if !self.hop(0, Hop::RingReport { reply }).await {
            return Err(ServerError::ShuttingDown);
        }
        answer.await.map_err(|_| ServerError::ShuttingDown)
    }

    fn local_ring_report(&self) -> RingReport {
        self.keeper().map(|k| k.report()).unwrap_or_default()
    }

    pub fn set_keeper(&self, keeper: Rc<KeeperDriver>) {
        *self.keeper.borrow_mut() = Some(keeper);
    }

    pub fn keeper(&self) -> Option<Rc<KeeperDriver>> {
        self.keeper.borrow().clone()
    }

    /// Follows the ring views the keeper publishes until the node stops: each new one
    /// goes to this shard's state machine, and its new members get peer links. Ticks
    /// the shard's partition transfers and reports what it received in full.
    pub async fn follow_ring(self: Rc<Self>, mut seen: u64) {
        const EVERY: Duration = Duration::from_millis(50);
        let mut streaming = false;
        while !self.is_stopping() {
            if let Some((generation, published)) = self.board.newer_than(seen) {
                seen = generation;
                if let Some(peers) = self.peers() {
                    // Links to nodes that left stay: a leaver learns the final view
                    // as the answer to its own pushes, and the replies to requests it
                    // still forwards travel over them.
                    for node in published.view.members() {
                        if let Some(native) = published.addresses.get(&node.0) {
                            peers.add_link(&self, node.0, native.clone());
                        }
                    }
                }
                streaming = published.streaming;
                self.map_epoch.set(published.view.ring().epoch());
                if published.view != self.driver.view() {
                    self.driver.set_view(published.view);
                }
                // The keeper tells peers of a view only once every shard runs on it.
                self.board.adopted(self.id, generation);
            }
            // The flag was published with the view it applies to, which this shard
            // now runs on.
            self.driver.tick_transfers(streaming);
            self.board.report_moved(self.driver.take_moved());
            glommio::timer::sleep(EVERY).await;
        }
    }

    /// Starts the node's membership here (shard 0 of a node with peers).
    pub fn set_membership(&self, membership: Rc<MembershipDriver>) {
        *self.membership.borrow_mut() = Some(membership);
    }

    pub fn membership(&self) -> Option<Rc<MembershipDriver>> {
        self.membership.borrow().clone()
    }

    /// The epoch of the partition map this shard routes by ([`Shard::map_epoch`]
    /// field); replies carry it.
    pub fn map_epoch(&self) -> u64 {
        self.map_epoch.get()
    }

    pub fn driver(&self) -> &Rc<ShardDriver<DmaDisk>> {
        &self.driver
    }

    /// How this node's partitions and request ids are split between its shards.
    pub fn map(&self) -> ShardMap {
        self.map
    }

    /// The shard that owns `key`.
    pub fn owner(&self, key: &[u8]) -> usize {
        self.map.owner(self.ring.partition_of(key))
    }

    fn admit(&self, counter: &Cell<u64>) -> Result<InFlight<'_>, ServerError> {
        let inflight = self.inflight.get();
        if inflight >= self.max_inflight {
            self.overloaded.set(self.overloaded.get() + 1);
            return Err(ServerError::Overloaded { inflight });
        }
        counter.set(counter.get() + 1);
        self.inflight.set(inflight + 1);
        Ok(InFlight(&self.inflight))
    }

    pub async fn get(&self, request: GetRequest) -> Result<GetOutcome, ServerError> {
        let _admitted = self.admit(&self.reads)?;
        let owner = self.owner(&request.key);
        if owner == self.id {
            return self.driver.get(request).await.map_err(ServerError::Client);
        }
        let (reply, answer) = oneshot::channel();
        if !self.hop(owner, Hop::Get { request, reply }).await {
            return Err(ServerError::ShuttingDown);
        }
        // Dropped unanswered: the node is stopping. A read has no outcome to lose.
        let answer = answer.await.map_err(|_| ServerError::ShuttingDown)?;
        answer.map_err(ServerError::Client)
    }

    pub async fn put(&self, request: PutRequest) -> Result<PutOutcome, ServerError> {
        let _admitted = self.admit(&self.writes)?;
        let owner = self.owner(&request.key);
        if owner == self.id {
            return self.driver.put(request).await.map_err(ServerError::Client);
        }
        let (reply, answer) = oneshot::channel();
        if !self.hop(owner, Hop::Put { request, reply }).await {
            // Never delivered: nothing was written.
            return Err(ServerError::ShuttingDown);
        }
        // Delivered, then dropped unanswered: the node is stopping, and the owner may
        // have applied the put, so its outcome is unknown.
        let answer = answer.await.map_err(|_| {
            ServerError::Client(ClientError::Timeout {
                acked: 0,
                required: 0,
            })
        })?;
        answer.map_err(ServerError::Client)
    }

    /// Live (not deleted) keys on every shard of this node.
    pub async fn count_keys(&self) -> Result<u64, ServerError> {
        let mut total = self.local_key_count().0;
        for peer in (0..self.map.shards()).filter(|&p| p != self.id) {
            let (reply, answer) = oneshot::channel();
            if !self.hop(peer, Hop::CountKeys { reply }).await {
                return Err(ServerError::ShuttingDown);
            }
            total += answer.await.map_err(|_| ServerError::ShuttingDown)?;
        }
        Ok(total)
    }

    /// Every shard's status, this one's first.
    pub async fn status(&self) -> Result<Vec<ShardStatus>, ServerError> {
        let mut all = vec![self.local_status()];
        for peer in (0..self.map.shards()).filter(|&p| p != self.id) {
            let (reply, answer) = oneshot::channel();
            if !self.hop(peer, Hop::Status { reply }).await {
                return Err(ServerError::ShuttingDown);
            }
            all.push(answer.await.map_err(|_| ServerError::ShuttingDown)?);
        }
        all.sort_by_key(|s| s.shard);
        Ok(all)
    }

    /// How the node's membership (on shard 0) sees every member; empty for a single
    /// node.
    pub async fn members(&self) -> Result<Vec<MemberReport>, ServerError> {
        if self.id == 0 {
            return Ok(self.local_members());
        }
        let (reply, answer) = oneshot::channel();
        if !self.hop(0, Hop::Members { reply }).await {
            return Err(ServerError::ShuttingDown);
        }
        answer.await.map_err(|_| ServerError::ShuttingDown)
    }

    fn local_members(&self) -> Vec<MemberReport> {
        self.membership().map_or_else(Vec::new, |m| m.report())
    }

    fn local_status(&self) -> ShardStatus {
        let store = self.driver.store();
        let (stats, usage) = (store.stats(), store.usage());
        let node = self.driver.node_stats();
        // Partitions this node holds a replica of that this shard owns, and of those,
        // the ones anti-entropy last found equal to a peer's.
        let (in_sync, owned) = self.driver.anti_entropy_progress();
        let (keys, tombstones) = self.local_key_count();
        ShardStatus {
            shard: self.id as u32,
            partitions: owned as u32,
            partitions_in_sync: in_sync as u32,
            keys_pushed: node.anti_entropy.keys_pushed,
            repairs_received: node.repairs_received,
            keys,
            tombstones,
            index_bytes: usage.index_bytes as u64,
            tombstones_collected: node.tombstones.collected,
            disk_bytes: usage.record_bytes,
            reads: self.reads.get(),
            writes: self.writes.get(),
            overloaded: self.overloaded.get(),
            commits: stats.commits,
            corrupt: stats.corruption(),
            store_failure: store.failure(),
            hints: self
                .driver
                .hints_pending()
                .into_iter()
                .map(|h| HintReport {
                    target: h.target.0,
                    keys: h.keys,
                    bytes: h.bytes,
                })
                .collect(),
            hints_stored: node.hints.stored,
            hints_handed_off: node.hints.handed_off,
            hints_refused: node.hints.refused,
            hints_expired: node.hints.expired,
            transfer_keys_sent: node.transfers.keys_sent,
            transfer_bytes_sent: node.transfers.bytes_sent,
            partitions_sent: node.transfers.partitions_sent,
            partitions_received: node.transfers.partitions_received,
            partitions_dropped: node.transfers.partitions_dropped,
            streams: node.transfers.streams as u32,
            transfer_keys_per_second: node.transfers.keys_per_second,
        }
    }

    /// Live keys and tombstones of home partitions (hints held for other nodes are
    /// not this node's keys).
    fn local_key_count(&self) -> (u64, u64) {
        let store = self.driver.store();
        let home = (store.partitions().into_iter())
            .filter(|&p| matches!(Shelf::from_store_partition(p), Shelf::Home(_)));
        let (mut keys, mut tombstones) = (0, 0);
        for partition in home {
            let (values, deleted) = store.partition_counts(partition);
            keys += values;
            tombstones += deleted;
        }
        (keys, tombstones)
    }

    /// Serves hops from one peer shard until it closes its end of the mesh. Requests
    /// go into the driver with their reply channels: no task per hop.
    pub async fn serve_peer(self: Rc<Self>, hops: ConnectedReceiver<Hop>) {
        while let Some(hop) = hops.recv().await {
            // A requester may be gone (its connection closed); nothing to do then.
            match hop {
                Hop::Get { request, reply } => self.driver.start_get(request, reply),
                Hop::Put { request, reply } => self.driver.start_put(request, reply),
                Hop::CountKeys { reply } => drop(reply.send(self.local_key_count().0)),
                Hop::Status { reply } => drop(reply.send(self.local_status())),
                Hop::Members { reply } => drop(reply.send(self.local_members())),
                Hop::Peer { from, message } => self.driver.handle_peer(from, message),
                Hop::Gossip { from, message } => self.take_gossip(from, message),
                Hop::Suspected { nodes } => self.driver.set_suspected(&nodes),
                Hop::Ring { from, frame } => self.take_ring_view(from, frame),
                Hop::ChangeRing { request, reply } => drop(reply.send(self.local_change(request))),
                Hop::RingReport { reply } => drop(reply.send(self.local_ring_report())),
            }
            // A busy neighbour must not starve this shard's own connections and timers.
            glommio::yield_if_needed().await;
        }
    }
}
