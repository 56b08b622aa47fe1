//! Drives one shard's `Node` (sans-IO) against its engine store and glommio's timers.
//!
//! Requests enter through `start_get` and `start_put` with the channel their reply
//! goes to (`get` and `put` make one and wait on it); the node's reply action is
//! delivered there. `pump` drains the node's actions:
//! storage operations and timers run as local tasks that feed their completion back
//! into the node and pump again. The node is only borrowed between awaits, never
//! across one.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use hashbrown::{HashMap, HashSet};
use ringkv_cluster::merkle::{MerkleTree, leaf_of};
use ringkv_cluster::{
    Action, ClientError, ClientReply, ClientToken, GetOutcome, GetRequest, Node, NodeId,
    PartitionId, PeerMessage, PutOutcome, PutRequest, Shelf, StorageCompletion, StorageFailure,
    StorageOp, StoredRead, StoredVersions, TimerId,
};
use ringkv_engine::disk::Disk;
use ringkv_engine::record;
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
    waiting: RefCell<HashMap<u64, Waiter>>,
    /// Why peers are unreachable: this shard's link to them is down, or the node's
    /// failure detector suspects them (see `update`).
    links_down: RefCell<HashSet<NodeId>>,
    suspected: RefCell<HashSet<NodeId>>,
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
    /// When hints their targets refused were last tried again.
    parked_retried: Cell<Duration>,
    /// How often an anti-entropy exchange starts (None: never), and when one last did.
    anti_entropy_every: Cell<Option<Duration>>,
    anti_entropy_at: Cell<Duration>,
    /// The store's corruption count when the trees were last checked against it.
    corruption_seen: Cell<u64>,
    /// Since when anti-entropy is catching up (exchanges back to back), and when the
    /// shard last said how far it got.
    catching_up_since: Cell<Option<Duration>>,
    progress_said: Cell<Duration>,
    /// Whether `pump` is running further up the stack.
    pumping: Cell<bool>,
    /// When the node's tombstone sweeps were last ticked.
    tombstones_swept: Cell<Duration>,
    /// Partitions this shard received in full during a membership change, for the
    /// node's ring keeper (`take_moved`).
    moved: RefCell<Vec<(PartitionId, u64)>>,
}

/// How often tombstone sweeps are started and moved on (see
/// `ringkv_cluster::node::tombstones`).
const TOMBSTONE_TICK: Duration = Duration::from_secs(1);

/// How often a shard that is catching up by anti-entropy says how far it got.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// How often hints their target refused (over its store's limits) are tried again.
const PARKED_HINT_RETRY: Duration = Duration::from_secs(30);

/// Where a request's reply goes.
enum Waiter {
    Get(oneshot::Sender<Result<GetOutcome, ClientError>>),
    Put(oneshot::Sender<Result<PutOutcome, ClientError>>),
}

/// How late a deadline may fire: request timeouts are a second, so a few ms is noise.
const TIMER_TICK: Duration = Duration::from_millis(5);

impl<D: Disk> ShardDriver<D> {
    pub fn new(node: Node, store: Rc<Store<D>>) -> Rc<Self> {
        let driver = Rc::new(ShardDriver {
            node: RefCell::new(node),
            store,
            waiting: RefCell::new(HashMap::new()),
            links_down: RefCell::new(HashSet::new()),
            suspected: RefCell::new(HashSet::new()),
            next_token: Cell::new(0),
            started: Instant::now(),
            peers: RefCell::new(None),
            timers: RefCell::new(BTreeMap::new()),
            timer_seq: Cell::new(0),
            ticker: TaskGroup::new(),
            ticking: Cell::new(true),
            storage: TaskGroup::new(),
            parked_retried: Cell::new(Duration::ZERO),
            anti_entropy_every: Cell::new(None),
            anti_entropy_at: Cell::new(Duration::ZERO),
            corruption_seen: Cell::new(0),
            catching_up_since: Cell::new(None),
            progress_said: Cell::new(Duration::ZERO),
            pumping: Cell::new(false),
            tombstones_swept: Cell::new(Duration::ZERO),
            moved: RefCell::new(Vec::new()),
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
        // A replica far behind (back from a long absence, or on a new empty disk)
        // runs its exchanges five times as often, one at a time, until it has
        // caught up; its peers' push budget (`anti_entropy_pushes_per_second`)
        // bounds what that costs them.
        let catching_up = self.node.borrow().anti_entropy_catching_up(now);
        if let Some(every) = self.anti_entropy_every.get()
            && now.saturating_sub(self.anti_entropy_at.get())
                >= if catching_up { every / 5 } else { every }
        {
            self.anti_entropy_at.set(now);
            // A stale tree would hide the very differences the exchange looks for. New
            // corruption (a record compaction or a read marked lost) may be anywhere.
            let corruption = self.store.stats().corruption();
            if corruption != self.corruption_seen.replace(corruption) {
                self.node.borrow_mut().mark_trees_stale();
            }
            let stale = self.node.borrow().stale_trees();
            let idle = stale.into_iter().filter(|(_, busy)| !busy).map(|(p, _)| p);
            self.rebuild_trees(idle.collect());
            self.node.borrow_mut().tick_anti_entropy(now);
            self.say_progress(now);
        }
        if now.saturating_sub(self.tombstones_swept.get()) >= TOMBSTONE_TICK {
            self.tombstones_swept.set(now);
            self.node.borrow_mut().tick_tombstones(now, wall_clock_ms());
        }
        if now.saturating_sub(self.parked_retried.get()) >= PARKED_HINT_RETRY {
            self.parked_retried.set(now);
            self.node.borrow_mut().retry_parked_hints(now);
        }
        self.pump();
    }

    /// Says when anti-entropy starts catching up, how far it got every few seconds,
    /// and when it is done: the progress line of a replica rebuilt from its peers.
    fn say_progress(&self, now: Duration) {
        let node = self.node.borrow();
        let (in_sync, of) = node.anti_entropy_progress();
        let received = node.stats().repairs_received;
        let shard = node.shard();
        match (
            self.catching_up_since.get(),
            node.anti_entropy_catching_up(now),
        ) {
            (None, true) => {
                self.catching_up_since.set(Some(now));
                self.progress_said.set(now);
                tracing::info!(shard, in_sync, of, "anti-entropy: catching up with peers");
            }
            (Some(since), true)
                if now.saturating_sub(self.progress_said.get()) >= PROGRESS_EVERY =>
            {
                self.progress_said.set(now);
                let seconds = now.saturating_sub(since).as_secs();
                tracing::info!(
                    shard,
                    in_sync,
                    of,
                    received,
                    seconds,
                    "anti-entropy: catching up"
                );
            }
            (Some(since), false) if in_sync == of => {
                self.catching_up_since.set(None);
                let seconds = now.saturating_sub(since).as_secs_f64();
                tracing::info!(
                    shard,
                    in_sync,
                    of,
                    received,
                    seconds,
                    "anti-entropy: caught up"
                );
            }
            _ => {}
        }
    }

    /// Rebuilds the Merkle trees of `partitions` from the store's index (no record is
    /// read): every home partition at start, stale ones later.
    pub fn rebuild_trees(&self, partitions: Vec<PartitionId>) {
        for partition in partitions {
            let keys = self.store.partition_keys(partition.0);
            let tree = MerkleTree::build(keys.iter().map(|k| (k.key.as_slice(), k.version_digest)));
            self.node.borrow_mut().set_merkle_tree(partition, tree);
        }
    }

    /// Every home partition this shard's store holds.
    pub fn home_partitions(&self) -> Vec<PartitionId> {
        let home = |p| match Shelf::from_store_partition(p) {
            Shelf::Home(partition) => Some(partition),
            Shelf::Hints { .. } => None,
        };
        self.store
            .partitions()
            .into_iter()
            .filter_map(home)
            .collect()
    }

    /// Hands the node the hints this shard's store holds (they survive restarts:
    /// each was written and synced with the write it acknowledged), and forgets the
    /// removal markers of hints handed off before the restart. Before serving. A hint
    /// that cannot be read (corrupt) is restored anyway: its handoff reads it as lost,
    /// which removes it; the node starts either way.
    pub async fn restore_hints(self: &Rc<Self>) -> usize {
        let hint_partitions = self.store.partitions().into_iter().filter_map(|p| {
            match Shelf::from_store_partition(p) {
                Shelf::Hints { target } => Some((p, target)),
                Shelf::Home(_) => None,
            }
        });
        let mut restored = 0;
        for (partition, target) in hint_partitions.collect::<Vec<_>>() {
            for summary in self.store.partition_keys(partition) {
                let bytes = match self.store.get(partition, &summary.key).await {
                    Ok(None) => continue,
                    Ok(Some(record)) if is_removal(&record) => {
                        let digest = record::version_digest(&[]);
                        let collected = self
                            .store
                            .collect_tombstone(partition, &summary.key, digest)
                            .await;
                        if let Err(err) = collected {
                            tracing::warn!(%err, "a removed hint's marker stays");
                        }
                        continue;
                    }
                    Ok(Some(record)) => {
                        (record.key().len() + record.version().len() + record.value().len()) as u64
                    }
                    Err(err) => {
                        tracing::warn!(%err, ?target, "a hint that cannot be read");
                        summary.key.len() as u64
                    }
                };
                let now = self.now();
                self.node
                    .borrow_mut()
                    .restore_hint(now, target, summary.key, bytes);
                restored += 1;
            }
        }
        self.pump();
        restored
    }

    /// Starts an anti-entropy exchange every `every` (Merkle trees compared with one
    /// replica of one partition at a time, in turn; see `ringkv_cluster::anti_entropy`).
    pub fn set_anti_entropy_interval(&self, every: Option<Duration>) {
        self.anti_entropy_every.set(every);
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

    /// Adopts the ring view the node's keeper published.
    pub fn set_view(self: &Rc<Self>, view: ringkv_cluster::RingView) {
        let now = self.now();
        self.node.borrow_mut().set_view(now, view);
        self.pump();
    }

    pub fn view(&self) -> ringkv_cluster::RingView {
        self.node.borrow().view().clone()
    }

    /// Starts and moves on partition streams (while `streaming`) and due drops.
    pub fn tick_transfers(self: &Rc<Self>, streaming: bool) {
        let now = self.now();
        self.node.borrow_mut().tick_transfers(now, streaming);
        self.pump();
    }

    /// Partitions received in full since the last call, for the node's ring keeper.
    pub fn take_moved(&self) -> Vec<(PartitionId, u64)> {
        std::mem::take(&mut *self.moved.borrow_mut())
    }

    /// Drops what the store holds of partitions the view does not give this shard:
    /// only at the start of a node whose view was stored (a partition moved away
    /// before a crash, its drop not done yet).
    pub fn drop_unserved(self: &Rc<Self>) {
        let now = self.now();
        let stored = self.home_partitions();
        self.node.borrow_mut().drop_unserved(now, stored);
        self.pump();
    }

    pub fn node_stats(&self) -> ringkv_cluster::NodeStats {
        self.node.borrow().stats()
    }

    /// Home partitions whose tree matched a peer's when last compared, of how many.
    pub fn anti_entropy_progress(&self) -> (usize, usize) {
        self.node.borrow().anti_entropy_progress()
    }

    pub fn hints_pending(&self) -> Vec<ringkv_cluster::HintsPending> {
        self.node.borrow().hints_pending()
    }

    /// Whether this shard's peer link to `node` is connected.
    pub fn set_link_up(self: &Rc<Self>, node: NodeId, up: bool) {
        self.update(&self.links_down, node, !up);
    }

    /// Every node the node's failure detector (gossip heartbeats, phi) suspects now.
    pub fn set_suspected(self: &Rc<Self>, nodes: &[NodeId]) {
        let now: HashSet<NodeId> = nodes.iter().copied().collect();
        let before = std::mem::replace(&mut *self.suspected.borrow_mut(), now);
        let changed: Vec<NodeId> = before
            .symmetric_difference(&self.suspected.borrow())
            .copied()
            .collect();
        for node in changed {
            self.refresh(node);
        }
    }

    fn update(self: &Rc<Self>, set: &RefCell<HashSet<NodeId>>, node: NodeId, member: bool) {
        if member {
            set.borrow_mut().insert(node);
        } else {
            set.borrow_mut().remove(&node);
        }
        self.refresh(node);
    }

    /// A node is reachable while its link is up and the detector does not suspect it:
    /// a paused process keeps its connections, a killed one may not be suspected yet.
    fn refresh(self: &Rc<Self>, node: NodeId) {
        let reachable =
            !self.links_down.borrow().contains(&node) && !self.suspected.borrow().contains(&node);
        self.node.borrow_mut().set_reachable(node, reachable);
        // Puts forwarded to a node found unreachable are answered now.
        self.pump();
    }

    pub fn store(&self) -> &Rc<Store<D>> {
        &self.store
    }

    /// Monotonic time as the node sees it (since this driver started): deadlines only.
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Starts a get whose reply goes to `reply`.
    pub fn start_get(
        self: &Rc<Self>,
        request: GetRequest,
        reply: oneshot::Sender<Result<GetOutcome, ClientError>>,
    ) {
        let token = self.wait(Waiter::Get(reply));
        let now = self.now();
        self.node.borrow_mut().handle_get(now, token, request);
        self.pump();
    }

    /// Starts a put whose reply goes to `reply`.
    pub fn start_put(
        self: &Rc<Self>,
        request: PutRequest,
        reply: oneshot::Sender<Result<PutOutcome, ClientError>>,
    ) {
        let token = self.wait(Waiter::Put(reply));
        let now = self.now();
        self.node
            .borrow_mut()
            .handle_put(now, wall_clock_ms(), token, request);
        self.pump();
    }

    pub async fn get(self: &Rc<Self>, request: GetRequest) -> Result<GetOutcome, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.start_get(request, reply);
        // The node answers every request it accepts (at the latest when its timeout
        // fires), and the driver drops a waiting sender unanswered only if the node
        // answered with the wrong kind of reply (a bug, logged in `deliver`).
        answer.await.unwrap_or(Err(ClientError::Timeout {
            acked: 0,
            required: 0,
        }))
    }

    pub async fn put(self: &Rc<Self>, request: PutRequest) -> Result<PutOutcome, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.start_put(request, reply);
        // As for `get`; a put cut off this way has an unknown outcome.
        answer.await.unwrap_or(Err(ClientError::Timeout {
            acked: 0,
            required: 0,
        }))
    }

    fn wait(&self, waiter: Waiter) -> ClientToken {
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        self.waiting.borrow_mut().insert(token, waiter);
        ClientToken(token)
    }

    /// Hands a reply to whoever waits for it (who may have gone: a closed connection).
    fn deliver(&self, client: ClientToken, reply: ClientReply) {
        let Some(waiter) = self.waiting.borrow_mut().remove(&client.0) else {
            return;
        };
        match (waiter, reply) {
            (Waiter::Get(sender), ClientReply::Get(result)) => drop(sender.send(result)),
            (Waiter::Put(sender), ClientReply::Put(result)) => drop(sender.send(result)),
            (_, reply) => tracing::error!(?reply, "the node answered with the wrong kind of reply"),
        }
    }

    /// Carries out every action the node has queued.
    fn pump(self: &Rc<Self>) {
        // glommio runs a spawned task at once, so a storage operation that completes
        // without waiting (a listing, a cached read) pumps again from inside this
        // loop; a chain of them (an anti-entropy push of hundreds of cached keys)
        // would nest once per operation and overflow the stack. The outer loop takes
        // whatever the inner calls would have.
        if self.pumping.replace(true) {
            return;
        }
        let _pumping = ClearOnDrop(&self.pumping);
        loop {
            let Some(action) = self.node.borrow_mut().poll_action() else {
                break;
            };
            match action {
                Action::Reply { client, reply } => self.deliver(client, reply),
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
                Action::Moved {
                    partition,
                    fingerprint,
                } => self.moved.borrow_mut().push((partition, fingerprint)),
            }
        }
    }

    async fn run_storage(self: Rc<Self>, op: StorageOp) {
        let completion = match op {
            StorageOp::Read { op, shelf, key } => {
                let result = match self.store.get(shelf.store_partition(), &key).await {
                    Ok(Some(record)) if is_removal(&record) => Ok(StoredRead::Absent),
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
                shelf,
                key,
                stored,
            } => {
                let partition = shelf.store_partition();
                let written = if stored.tombstone {
                    self.store.delete(partition, &key, &stored.version).await
                } else {
                    self.store
                        .put(partition, &key, &stored.version, &stored.value)
                        .await
                };
                StorageCompletion::Write {
                    op,
                    result: written.map_err(|e| StorageFailure(e.to_string())),
                }
            }
            StorageOp::ListLeaves {
                op,
                partition,
                leaves,
            } => {
                // From the index in memory: no record is read.
                let wanted: std::collections::BTreeSet<u32> = leaves.into_iter().collect();
                let keys = self
                    .store
                    .partition_keys(partition.0)
                    .into_iter()
                    .filter(|k| wanted.contains(&(leaf_of(&k.key) as u32)))
                    .map(|k| (k.key, k.version_digest))
                    .collect();
                StorageCompletion::Listed { op, keys }
            }
            StorageOp::ListTombstones { op, partition } => {
                let keys = (self.store.partition_tombstones(partition.0).into_iter())
                    .map(|k| (k.key, k.version_digest))
                    .collect();
                StorageCompletion::Listed { op, keys }
            }
            StorageOp::Collect {
                op,
                partition,
                key,
                digest,
            } => {
                let collected = self
                    .store
                    .collect_tombstone(partition.0, &key, digest)
                    .await;
                let result = match collected {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(StorageFailure("the tombstone changed".into())),
                    Err(err) => Err(StorageFailure(err.to_string())),
                };
                StorageCompletion::Write { op, result }
            }
            StorageOp::DropPartition { op, partition } => {
                let dropped = self.store.drop_partition(partition.0).await;
                if dropped.is_ok() {
                    tracing::info!(partition = partition.0, "partition moved away: dropped");
                }
                StorageCompletion::Write {
                    op,
                    result: dropped.map_err(|e| StorageFailure(e.to_string())),
                }
            }
            StorageOp::Remove { op, shelf, key } => {
                // A durable marker (a tombstone with no version), then forgotten from
                // the index; after a restart the marker reads as absent and is
                // forgotten again (`restore_hints`).
                let partition = shelf.store_partition();
                let removed = match self.store.delete(partition, &key, &[]).await {
                    Ok(()) => self
                        .store
                        .collect_tombstone(partition, &key, record::version_digest(&[]))
                        .await
                        .map(drop),
                    Err(err) => Err(err),
                };
                StorageCompletion::Write {
                    op,
                    result: removed.map_err(|e| StorageFailure(e.to_string())),
                }
            }
        };
        let now = self.now();
        self.node.borrow_mut().handle_storage(now, completion);
        self.pump();
    }
}

/// Clears a flag when dropped, also while unwinding.
struct ClearOnDrop<'a>(&'a Cell<bool>);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// A removed hint's marker: a tombstone without a version (a real tombstone always
/// carries the versions of the delete).
fn is_removal(record: &ringkv_engine::Record) -> bool {
    record.is_tombstone() && record.version().is_empty()
}

/// The wall clock in Unix milliseconds, which seeds version stamps (the node makes a
/// hybrid logical clock of it). A clock set before 1970 reads as 0; the stamps still
/// grow along causality.
pub(crate) fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}
