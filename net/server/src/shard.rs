//! One shard's view of the node: routes each request to the shard that owns its key
//! (directly, or with one hop over the glommio channel mesh), and bounds the work in
//! flight so an overloaded shard answers `Overloaded` instead of queueing without end.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use futures_channel::oneshot;
use glommio::channels::channel_mesh::Senders;
use ringkv_cluster::{
    ClientError, GetOutcome, GetRequest, NodeId, PartitionId, PeerMessage, PutOutcome, PutRequest,
    Ring,
};
use ringkv_engine::disk::DmaDisk;
use ringkv_proto::ShardStatus;

use crate::driver::ShardDriver;
use crate::peers::Peers;
use crate::tasks::TaskGroup;

/// A request carried to another shard, with where to send the answer.
pub struct Hop {
    request: HopRequest,
    reply: oneshot::Sender<HopReply>,
}

enum HopRequest {
    Get(GetRequest),
    Put(PutRequest),
    CountKeys,
    Status,
    /// A replication message from another node, for the shard owning its partition.
    Peer {
        from: NodeId,
        message: PeerMessage,
    },
    /// The answer to a request this shard forwarded to another node.
    ForwardAnswer {
        id: u64,
        body: ringkv_proto::Body,
    },
}

enum HopReply {
    Get(Result<GetOutcome, ClientError>),
    Put(Result<PutOutcome, ClientError>),
    Count(u64),
    Status(ShardStatus),
    Delivered,
}

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
    pub count: usize,
    ring: Ring,
    driver: Rc<ShardDriver<DmaDisk>>,
    /// The other shards of this node; gone once this shard will send them no more
    /// (see `close_mesh`).
    mesh: RefCell<Option<Rc<Senders<Hop>>>>,
    /// Tasks this shard spawned for a request: hops served for other shards, hops sent
    /// without waiting for the answer, requests forwarded by other nodes.
    tasks: TaskGroup,
    inflight: Cell<usize>,
    max_inflight: usize,
    reads: Cell<u64>,
    writes: Cell<u64>,
    overloaded: Cell<u64>,
    /// N: replicas of each key; requests naming no R or W use a majority of it.
    pub replicas: usize,
    peers: RefCell<Option<Rc<Peers>>>,
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
        replicas: usize,
    ) -> Rc<Shard> {
        Rc::new(Shard {
            id: mesh.peer_id(),
            count: mesh.nr_consumers(),
            ring,
            driver,
            mesh: RefCell::new(Some(Rc::new(mesh))),
            tasks: TaskGroup::new(),
            inflight: Cell::new(0),
            max_inflight,
            reads: Cell::new(0),
            writes: Cell::new(0),
            overloaded: Cell::new(0),
            replicas,
            peers: RefCell::new(None),
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

    /// Runs `work` as a task this shard waits for when it stops (see `crate::tasks`).
    pub fn spawn(&self, work: impl std::future::Future<Output = ()> + 'static) {
        self.tasks.spawn(work);
    }

    /// Waits until every task started by `spawn` has ended.
    pub async fn tasks_ended(&self) {
        self.tasks.ended().await
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

    /// Hands a replication message to shard `target` of this node. Waiting for room
    /// in the mesh (rather than spawning a task per message) carries backpressure back
    /// to the peer's connection when the target shard falls behind.
    pub async fn peer_message(&self, target: usize, from: NodeId, message: PeerMessage) {
        if target == self.id {
            self.driver.handle_peer(from, message);
        } else if let Some(mesh) = self.mesh().filter(|_| target < self.count) {
            let (reply, _) = oneshot::channel();
            let request = HopRequest::Peer { from, message };
            // The target shard only goes away when the node stops.
            let _ = mesh.send_to(target, Hop { request, reply }).await;
        }
    }

    /// Hands the answer to a forwarded request to the shard `target` that forwarded it.
    pub fn forward_answer(&self, target: usize, id: u64, body: ringkv_proto::Body) {
        if target == self.id {
            if let Some(peers) = self.peers() {
                peers.answer_forward(id, body);
            }
        } else if target < self.count {
            self.hop_and_forget(target, HopRequest::ForwardAnswer { id, body });
        }
    }

    fn hop_and_forget(&self, target: usize, request: HopRequest) {
        let Some(mesh) = self.mesh() else { return };
        let (reply, _) = oneshot::channel();
        self.spawn(async move {
            // The target shard only goes away when the node stops.
            let _ = mesh.send_to(target, Hop { request, reply }).await;
        });
    }

    pub fn driver(&self) -> &Rc<ShardDriver<DmaDisk>> {
        &self.driver
    }

    /// The shard that owns `key`: partitions are dealt to shards round-robin.
    pub fn owner(&self, key: &[u8]) -> usize {
        self.ring.partition_of(key).0 as usize % self.count
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
        match self.hop(owner, HopRequest::Get(request)).await? {
            HopReply::Get(result) => result.map_err(ServerError::Client),
            _ => unreachable!("a get hop is answered with a get reply"),
        }
    }

    pub async fn put(&self, request: PutRequest) -> Result<PutOutcome, ServerError> {
        let _admitted = self.admit(&self.writes)?;
        let owner = self.owner(&request.key);
        if owner == self.id {
            return self.driver.put(request).await.map_err(ServerError::Client);
        }
        match self.hop(owner, HopRequest::Put(request)).await? {
            HopReply::Put(result) => result.map_err(ServerError::Client),
            _ => unreachable!("a put hop is answered with a put reply"),
        }
    }

    /// Live (not deleted) keys on every shard of this node.
    pub async fn count_keys(&self) -> Result<u64, ServerError> {
        let mut total = self.local_key_count();
        for peer in (0..self.count).filter(|&p| p != self.id) {
            match self.hop(peer, HopRequest::CountKeys).await? {
                HopReply::Count(n) => total += n,
                _ => unreachable!("a count hop is answered with a count"),
            }
        }
        Ok(total)
    }

    /// Every shard's status, this one's first.
    pub async fn status(&self) -> Result<Vec<ShardStatus>, ServerError> {
        let mut all = vec![self.local_status()];
        for peer in (0..self.count).filter(|&p| p != self.id) {
            match self.hop(peer, HopRequest::Status).await? {
                HopReply::Status(status) => all.push(status),
                _ => unreachable!("a status hop is answered with a status"),
            }
        }
        all.sort_by_key(|s| s.shard);
        Ok(all)
    }

    fn local_status(&self) -> ShardStatus {
        let store = self.driver.store();
        let (stats, usage) = (store.stats(), store.usage());
        // Partitions this node holds a replica of, and of those, the ones this shard
        // owns (partition p belongs to shard p % count).
        let me = self.driver.node_id();
        let owned = (0..self.ring.partition_count())
            .filter(|&p| p as usize % self.count == self.id)
            .filter(|&p| {
                let replicas = self.ring.preference_list(PartitionId(p), self.replicas);
                replicas.contains(&me)
            })
            .count();
        ShardStatus {
            shard: self.id as u32,
            partitions: owned as u32,
            keys: self.local_key_count(),
            disk_bytes: usage.record_bytes,
            reads: self.reads.get(),
            writes: self.writes.get(),
            overloaded: self.overloaded.get(),
            commits: stats.commits,
            corrupt: stats.corruption(),
            store_failure: store.failure(),
        }
    }

    fn local_key_count(&self) -> u64 {
        let store = self.driver.store();
        let partitions = store.partitions();
        partitions
            .into_iter()
            .map(|p| {
                store
                    .partition_keys(p)
                    .iter()
                    .filter(|k| !k.tombstone)
                    .count() as u64
            })
            .sum()
    }

    async fn hop(&self, owner: usize, request: HopRequest) -> Result<HopReply, ServerError> {
        let Some(mesh) = self.mesh() else {
            return Err(ServerError::ShuttingDown);
        };
        let (reply, answer) = oneshot::channel();
        if mesh.send_to(owner, Hop { request, reply }).await.is_err() {
            return Err(ServerError::ShuttingDown);
        }
        // The owner took the request and then dropped it unanswered (it is stopping):
        // it may have been applied, so the outcome is unknown, not "nothing done".
        answer.await.map_err(|_| {
            ServerError::Client(ClientError::Timeout {
                acked: 0,
                required: 0,
            })
        })
    }

    /// Serves hops from one peer shard until it closes its end of the mesh.
    pub async fn serve_peer(
        self: Rc<Self>,
        hops: glommio::channels::shared_channel::ConnectedReceiver<Hop>,
    ) {
        while let Some(Hop { request, reply }) = hops.recv().await {
            let this = self.clone();
            self.spawn(async move {
                let answer = match request {
                    HopRequest::Get(r) => HopReply::Get(this.driver.get(r).await),
                    HopRequest::Put(r) => HopReply::Put(this.driver.put(r).await),
                    HopRequest::CountKeys => HopReply::Count(this.local_key_count()),
                    HopRequest::Status => HopReply::Status(this.local_status()),
                    HopRequest::Peer { from, message } => {
                        this.driver.handle_peer(from, message);
                        HopReply::Delivered
                    }
                    HopRequest::ForwardAnswer { id, body } => {
                        if let Some(peers) = this.peers() {
                            peers.answer_forward(id, body);
                        }
                        HopReply::Delivered
                    }
                };
                // The requesting connection may be gone; nothing to do then.
                let _ = reply.send(answer);
            });
        }
    }
}
