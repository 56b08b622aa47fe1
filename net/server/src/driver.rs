//! Drives one shard's `Node` (sans-IO) against its engine store and glommio's timers.
//!
//! Requests enter through `get` and `put`, which hand the node a client token and wait
//! for the reply that the node emits as an action. `pump` drains the node's actions:
//! storage operations and timers run as local tasks that feed their completion back
//! into the node and pump again. The node is only borrowed between awaits, never
//! across one.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use hashbrown::HashMap;
use ringkv_cluster::{
    Action, ClientError, ClientReply, ClientToken, GetOutcome, GetRequest, Node, NodeId,
    PeerMessage, PutOutcome, PutRequest, StorageCompletion, StorageFailure, StorageOp, StoredRead,
    StoredVersions, TimerId,
};
use ringkv_engine::disk::Disk;
use ringkv_engine::{Store, StoreError};

use crate::tasks::TaskGroup;

/// Where the driver hands messages for other nodes: the peer transport.
pub trait PeerSend {
    /// Sends `message` to node `to`.
    fn send(&self, to: NodeId, message: &PeerMessage);
}

pub struct ShardDriver<D: Disk> {
    node: RefCell<Node>,
    store: Rc<Store<D>>,
    waiting: RefCell<HashMap<u64, oneshot::Sender<ClientReply>>>,
    next_token: Cell<u64>,
    started: Instant,
    peers: RefCell<Option<Rc<dyn PeerSend>>>,
    /// Deadlines the node asked for, fired by one ticker task: every request sets one,
    /// and a task (and a glommio timer) per request cost more than the request itself.
    timers: RefCell<BTreeMap<(Duration, u64), TimerId>>,
    timer_seq: Cell<u64>,
    /// The ticker task, and whether it should end.
    ticker: TaskGroup,
    ticking: Cell<bool>,
    /// Storage operations in flight: each reads or writes the store's files.
    storage: TaskGroup,
}

/// How late a deadline may fire: request timeouts are a second, so a few ms is noise.
const TIMER_TICK: Duration = Duration::from_millis(5);

impl<D: Disk> ShardDriver<D> {
    pub fn new(node: Node, store: Rc<Store<D>>) -> Rc<Self> {
        let driver = Rc::new(ShardDriver {
            node: RefCell::new(node),
            store,
            waiting: RefCell::new(HashMap::new()),
            next_token: Cell::new(0),
            started: Instant::now(),
            peers: RefCell::new(None),
            timers: RefCell::new(BTreeMap::new()),
            timer_seq: Cell::new(0),
            ticker: TaskGroup::new(),
            ticking: Cell::new(true),
            storage: TaskGroup::new(),
        });
        let ticker = Rc::downgrade(&driver);
        driver.ticker.spawn(async move {
            loop {
                glommio::timer::sleep(TIMER_TICK).await;
                let Some(driver) = ticker.upgrade().filter(|d| d.ticking.get()) else {
                    break;
                };
                driver.fire_due_timers();
            }
        });
        driver
    }

    /// Waits until no storage operation is in flight (more may start afterwards, from
    /// a message or a deadline).
    pub async fn storage_idle(&self) {
        self.storage.ended().await
    }

    /// Stops firing deadlines and waits for the storage operations in flight; after
    /// this the driver starts no I/O unless handed a request or a message. Only for a
    /// stopping shard: requests still waiting would never time out.
    pub async fn stop(&self) {
        self.ticking.set(false);
        self.ticker.ended().await;
        self.storage.ended().await;
    }

    /// Hands the node every deadline that has passed.
    fn fire_due_timers(self: &Rc<Self>) {
        let now = self.now();
        loop {
            let due = {
                let mut timers = self.timers.borrow_mut();
                match timers.first_key_value() {
                    Some((&(at, _), _)) if at <= now => timers.pop_first().map(|(_, t)| t),
                    _ => None,
                }
            };
            let Some(timer) = due else { break };
            self.node.borrow_mut().handle_timer(now, timer);
        }
        self.pump();
    }

    /// Connects the driver to the peer transport (a single node has none).
    pub fn set_peers(&self, peers: Rc<dyn PeerSend>) {
        *self.peers.borrow_mut() = Some(peers);
    }

    /// A message from node `from`.
    pub fn handle_peer(self: &Rc<Self>, from: NodeId, message: PeerMessage) {
        let now = self.now();
        self.node.borrow_mut().handle_message(now, from, message);
        self.pump();
    }

    pub fn node_id(&self) -> NodeId {
        self.node.borrow().id()
    }

    /// What the failure detector (for now: the peer links) believes about `node`.
    pub fn set_reachable(self: &Rc<Self>, node: NodeId, reachable: bool) {
        self.node.borrow_mut().set_reachable(node, reachable);
    }

    pub fn store(&self) -> &Rc<Store<D>> {
        &self.store
    }

    /// Monotonic time as the node sees it (since this driver started): deadlines only.
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    pub async fn get(self: &Rc<Self>, request: GetRequest) -> Result<GetOutcome, ClientError> {
        let reply = self
            .request(|node, now, token| node.handle_get(now, token, request))
            .await;
        match reply {
            ClientReply::Get(result) => result,
            ClientReply::Put(_) => unreachable!("the node answers a get with a get reply"),
        }
    }

    pub async fn put(self: &Rc<Self>, request: PutRequest) -> Result<PutOutcome, ClientError> {
        let reply = self
            .request(|node, now, token| node.handle_put(now, wall_clock_ms(), token, request))
            .await;
        match reply {
            ClientReply::Put(result) => result,
            ClientReply::Get(_) => unreachable!("the node answers a put with a put reply"),
        }
    }

    async fn request(
        self: &Rc<Self>,
        submit: impl FnOnce(&mut Node, Duration, ClientToken),
    ) -> ClientReply {
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        let (sender, receiver) = oneshot::channel();
        self.waiting.borrow_mut().insert(token, sender);
        submit(&mut self.node.borrow_mut(), self.now(), ClientToken(token));
        self.pump();
        // The node answers every request it accepts (at the latest when its timeout
        // fires), and the driver never drops a waiting sender before delivering.
        receiver.await.expect("the driver delivers every reply")
    }

    /// Carries out every action the node has queued.
    fn pump(self: &Rc<Self>) {
        loop {
            let Some(action) = self.node.borrow_mut().poll_action() else {
                break;
            };
            match action {
                Action::Reply { client, reply } => {
                    if let Some(sender) = self.waiting.borrow_mut().remove(&client.0) {
                        // The requester may have gone (connection closed); nothing to do.
                        let _ = sender.send(reply);
                    }
                }
                Action::Storage(op) => {
                    let this = self.clone();
                    self.storage
                        .spawn(async move { this.run_storage(op).await });
                }
                Action::SetTimer { timer, at } => {
                    let seq = self.timer_seq.get();
                    self.timer_seq.set(seq + 1);
                    self.timers.borrow_mut().insert((at, seq), timer);
                }
                Action::Send { to, message } => match self.peers.borrow().as_ref() {
                    Some(peers) => peers.send(to, &message),
                    None => tracing::warn!(?to, "no peer transport: message dropped"),
                },
            }
        }
    }

    async fn run_storage(self: Rc<Self>, op: StorageOp) {
        let completion = match op {
            StorageOp::Read { op, partition, key } => {
                let result = match self.store.get(partition.0, &key).await {
                    Ok(Some(record)) => Ok(StoredRead::Found(StoredVersions {
                        version: record.version().to_vec(),
                        value: record.value().to_vec(),
                        tombstone: record.is_tombstone(),
                    })),
                    Ok(None) => Ok(StoredRead::Absent),
                    // Never served; the replication layer repairs it from replicas, and
                    // the node stops using an actor whose dots it can no longer see.
                    Err(StoreError::Corrupt(reason)) => {
                        tracing::warn!(%reason, "corrupt record read as missing");
                        Ok(StoredRead::Lost)
                    }
                    Err(err) => Err(StorageFailure(err.to_string())),
                };
                StorageCompletion::Read { op, result }
            }
            StorageOp::Write {
                op,
                partition,
                key,
                stored,
            } => {
                let written = if stored.tombstone {
                    self.store.delete(partition.0, &key, &stored.version).await
                } else {
                    self.store
                        .put(partition.0, &key, &stored.version, &stored.value)
                        .await
                };
                StorageCompletion::Write {
                    op,
                    result: written.map_err(|e| StorageFailure(e.to_string())),
                }
            }
        };
        let now = self.now();
        self.node.borrow_mut().handle_storage(now, completion);
        self.pump();
    }
}

/// The wall clock in Unix milliseconds, which seeds version stamps (the node makes a
/// hybrid logical clock of it). A clock set before 1970 reads as 0; the stamps still
/// grow along causality.
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}
