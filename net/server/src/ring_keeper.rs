//! Drives the node's ring keeper (`ringkv_cluster::RingKeeper`) on shard 0, the one
//! place the node's ring view changes: operators' changes (`Op::ChangeRing`), peers'
//! views (peer `Ring` frames, routed here from whichever shard read them) and the
//! partitions the shards received in full. Every new view is stored in `ring.view`
//! first, then published on the node's [`RingBoard`], which every shard follows
//! (`Shard::follow_ring`), and only once every shard has adopted it is it told to
//! peers, as the keeper requires.
//!
//! A failed store stops the node (as a failed fsync does the store): a node that told
//! its peers of a view it could lose in a crash could come back writing to the old
//! ring alone while partitions stream.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringkv_cluster::{
    KeeperConfig, Member, MemberStatus, NodeId, PartitionId, RingChange, RingKeeper, RingView,
};
use ringkv_proto::RingChangeRequest;
use ringkv_proto::RingReport;
use ringkv_proto::peer::MemberSpec;
use ringkv_proto::peer_message::{RingFrame, encode_ring_view};

use crate::ring_change::describe;
use crate::ring_file;
use crate::shard::Shard;
use crate::tasks::TaskGroup;

/// How often the keeper ticks: pushes views when due, collects moved partitions,
/// and decides whether the shards may stream.
const KEEPER_TICK: Duration = Duration::from_millis(100);

/// The node's ring view as published to its shards, and what the shards report back.
/// Shared by every shard thread; each reads it a few times a second, never on the
/// request path.
pub struct RingBoard {
    /// Grows by one with every publication.
    generation: AtomicU64,
    published: Mutex<Published>,
    /// The generation each shard last adopted.
    adopted: Vec<AtomicU64>,
    /// Partitions shards received in full, for the keeper.
    moved: Mutex<Vec<(PartitionId, u64)>>,
}

/// A view, the native address of every member, and whether the shards may stream
/// the view's change: published together, so a shard never streams a change on the
/// agreement reached for another.
#[derive(Clone)]
pub struct Published {
    /// The cluster's id (`ClusterSpec::id`).
    pub cluster: u64,
    pub view: RingView,
    pub addresses: BTreeMap<u32, String>,
    pub streaming: bool,
}

impl Published {
    /// The addresses as the ring frame carries them.
    pub fn address_list(&self) -> Vec<MemberSpec> {
        address_list(&self.addresses)
    }

    /// The view and addresses as one ring frame (`Body::RingView`).
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut frame = Vec::new();
        encode_ring_view(self.cluster, &self.view, &self.address_list(), &mut frame)
            .map_err(|e| format!("the ring view does not fit a frame: {e}"))?;
        Ok(frame)
    }
}

fn address_list(addresses: &BTreeMap<u32, String>) -> Vec<MemberSpec> {
    addresses
        .iter()
        .map(|(&node_id, native)| MemberSpec {
            node_id,
            native: native.clone(),
        })
        .collect()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl RingBoard {
    pub fn new(first: Published, shards: usize) -> Arc<RingBoard> {
        Arc::new(RingBoard {
            generation: AtomicU64::new(1),
            published: Mutex::new(first),
            adopted: (0..shards).map(|_| AtomicU64::new(1)).collect(),
            moved: Mutex::new(Vec::new()),
        })
    }

    fn publish(&self, next: Published) {
        let mut published = lock(&self.published);
        *published = next;
        // Under the lock: a reader never pairs one generation with another's content.
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The latest publication if it is newer than `seen`, with its generation.
    pub fn newer_than(&self, seen: u64) -> Option<(u64, Published)> {
        if self.generation.load(Ordering::SeqCst) == seen {
            return None;
        }
        let published = lock(&self.published);
        Some((self.generation.load(Ordering::SeqCst), published.clone()))
    }

    /// Shard `shard` now runs on publication `generation`.
    pub fn adopted(&self, shard: usize, generation: u64) {
        if let Some(slot) = self.adopted.get(shard) {
            slot.store(generation, Ordering::SeqCst);
        }
    }

    /// Whether every shard runs on the latest publication.
    fn all_adopted(&self) -> bool {
        let generation = self.generation.load(Ordering::SeqCst);
        self.adopted
            .iter()
            .all(|a| a.load(Ordering::SeqCst) == generation)
    }

    /// Whether `node` may open a peer link here: a member of either ring of the view
    /// (a joiner is one from the moment its change starts).
    pub fn knows(&self, node: u32) -> bool {
        lock(&self.published).view.is_member(NodeId(node))
    }

    /// Whether the latest publication lets shards stream (without copying its view).
    fn streaming(&self) -> bool {
        lock(&self.published).streaming
    }

    /// The partition map clients route by: epoch, owners, members' addresses.
    pub fn current(&self) -> Published {
        lock(&self.published).clone()
    }

    pub fn report_moved(&self, moved: Vec<(PartitionId, u64)>) {
        if !moved.is_empty() {
            lock(&self.moved).extend(moved);
        }
    }

    fn take_moved(&self) -> Vec<(PartitionId, u64)> {
        std::mem::take(&mut *lock(&self.moved))
    }
}

/// Why a membership change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    Refused(String),
    #[error("the ring view cannot be stored (outcome unknown: see the node's log)")]
    Store,
}

pub struct KeeperDriver {
    me: NodeId,
    cluster: u64,
    keeper: RefCell<RingKeeper>,
    addresses: RefCell<BTreeMap<u32, String>>,
    /// Whether addresses were learned since the view was last stored.
    addresses_changed: Cell<bool>,
    board: Arc<RingBoard>,
    data_dir: PathBuf,
    /// The node's stop flag: set when a view cannot be stored.
    stop: Arc<AtomicBool>,
    failed: Cell<bool>,
    started: Instant,
    shard: Weak<Shard>,
    ticking: Cell<bool>,
    ticker: TaskGroup,
}

impl KeeperDriver {
    pub fn start(
        shard: &Rc<Shard>,
        board: Arc<RingBoard>,
        data_dir: PathBuf,
        config: KeeperConfig,
        stop: Arc<AtomicBool>,
    ) -> Rc<KeeperDriver> {
        let me = shard.driver().node_id();
        let first = board.current();
        let driver = Rc::new(KeeperDriver {
            me,
            cluster: first.cluster,
            keeper: RefCell::new(RingKeeper::new(me, first.view, config)),
            addresses: RefCell::new(first.addresses),
            addresses_changed: Cell::new(false),
            board,
            data_dir,
            stop,
            failed: Cell::new(false),
            started: Instant::now(),
            shard: Rc::downgrade(shard),
            ticking: Cell::new(true),
            ticker: TaskGroup::new(),
        });
        driver.declare();
        let ticker = Rc::downgrade(&driver);
        driver.ticker.spawn(async move {
            loop {
                glommio::timer::sleep(KEEPER_TICK).await;
                let Some(driver) = ticker.upgrade().filter(|d| d.ticking.get()) else {
                    break;
                };
                driver.tick();
            }
        });
        driver
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    fn tick(&self) {
        let now = self.now();
        {
            let mut keeper = self.keeper.borrow_mut();
            for (partition, fingerprint) in self.board.take_moved() {
                keeper.partition_moved(now, partition, fingerprint);
            }
            keeper.tick(now);
        }
        self.flush();
        let allowed = self.keeper.borrow().transfers_allowed(now);
        if !self.failed.get() && allowed != self.board.streaming() {
            if allowed {
                tracing::info!(
                    epoch = self.keeper.borrow().view().epoch(),
                    "every member holds the change: streaming partitions"
                );
            }
            self.board.publish(self.published());
        }
    }

    /// A peer's ring frame: its view and the addresses it knows.
    pub fn handle(&self, from: NodeId, frame: RingFrame) {
        if !self.ticking.get() {
            return;
        }
        if frame.cluster != self.cluster {
            tracing::warn!(
                node = from.0,
                "a ring view from another cluster ({:016x}) ignored",
                frame.cluster
            );
            return;
        }
        self.keeper
            .borrow_mut()
            .handle(self.now(), from, frame.view);
        // Only the addresses of members of the view (now merged) are kept.
        self.learn(frame.addresses.into_iter().map(|a| (a.node_id, a.native)));
        self.flush();
    }

    /// Learns how to reach members it had no address for (an address it has stays:
    /// a member's own word, at its handshake, is what the links use).
    fn learn(&self, addresses: impl IntoIterator<Item = (u32, String)>) {
        let view = self.keeper.borrow().view().clone();
        let mut known = self.addresses.borrow_mut();
        for (node, native) in addresses {
            let wanted = node != self.me.0 && view.is_member(NodeId(node));
            if wanted && !known.contains_key(&node) && parse_address(&native).is_ok() {
                known.insert(node, native);
                self.addresses_changed.set(true);
            }
        }
    }

    /// Starts an operator's or a joiner's change here; answers with the view that
    /// holds it, stored. A joiner already part of the view (a member, or the node the
    /// change in progress adds) is answered with it, if it gives the address the
    /// cluster knows it by.
    pub fn change(&self, request: RingChangeRequest) -> Result<Vec<u8>, ChangeError> {
        if self.failed.get() || !self.ticking.get() {
            return Err(ChangeError::Refused("the node is stopping".into()));
        }
        let refused = |why: String| Err(ChangeError::Refused(why));
        let view = self.keeper.borrow().view().clone();
        let partitions = view.ring().partition_count();
        let (change, newcomer) = match request {
            RingChangeRequest::Leave { node_id } => {
                if node_id != self.me.0 {
                    return refused(format!(
                        "ask node {node_id} itself to leave (this is node {}): a node hands its own partitions off",
                        self.me.0
                    ));
                }
                (RingChange::Leave(NodeId(node_id)), None)
            }
            RingChangeRequest::Join {
                node_id,
                native,
                partitions: theirs,
            }
            | RingChangeRequest::Replace {
                node_id,
                native,
                partitions: theirs,
                ..
            } if theirs != partitions => {
                return refused(format!(
                    "node {node_id} at {native} has {theirs} partitions, this cluster {partitions}"
                ));
            }
            RingChangeRequest::Join {
                node_id, native, ..
            } => (
                RingChange::Join(Member::new(NodeId(node_id))),
                Some((node_id, native)),
            ),
            RingChangeRequest::Replace {
                dead,
                node_id,
                native,
                ..
            } => {
                let down = (self.shard.upgrade())
                    .and_then(|s| s.membership())
                    .is_some_and(|m| m.is_down(NodeId(dead)));
                let change = RingChange::Replace {
                    dead: NodeId(dead),
                    with: Member::new(NodeId(node_id)),
                };
                if !down && view.change() != Some(change) {
                    return refused(format!(
                        "node {dead} is not down here: only a dead node is replaced (a live one leaves)"
                    ));
                }
                (change, Some((node_id, native)))
            }
        };
        if let Some((node, native)) = &newcomer {
            if *node == self.me.0 {
                return refused(format!("{node} is this node's id"));
            }
            parse_address(native).map_err(ChangeError::Refused)?;
            if let Some(known) = self.addresses.borrow().get(node)
                && known != native
            {
                return refused(format!("node {node} is known at {known}, not {native}"));
            }
        }
        let already = match change {
            RingChange::Join(member) => {
                view.ring().is_member(member.node) || view.change() == Some(change)
            }
            _ => view.change() == Some(change),
        };
        if !already {
            let proposed = self.keeper.borrow_mut().propose(self.now(), change);
            match proposed {
                Ok(epoch) => {
                    tracing::info!(change = %describe(&change), epoch, "membership change started")
                }
                Err(e) => return refused(format!("{} refused: {e}", describe(&change))),
            }
        }
        self.learn(newcomer);
        self.flush();
        if self.failed.get() {
            return Err(ChangeError::Store);
        }
        self.published().encode().map_err(ChangeError::Refused)
    }

    fn published(&self) -> Published {
        let now = self.now();
        let keeper = self.keeper.borrow();
        Published {
            cluster: self.cluster,
            view: keeper.view().clone(),
            addresses: self.addresses.borrow().clone(),
            streaming: keeper.transfers_allowed(now),
        }
    }

    /// The view this node holds, for `ringkv status`.
    pub fn report(&self) -> RingReport {
        let keeper = self.keeper.borrow();
        let view = keeper.view();
        RingReport {
            epoch: view.epoch(),
            members: view.ring().members().map(|m| m.node.0).collect(),
            change: view.change().map(|c| describe(&c)),
            pending: view.pending().count() as u32,
            waiting_for: keeper.waiting_for().into_iter().map(|n| n.0).collect(),
            streaming: keeper.transfers_allowed(self.now()),
        }
    }

    /// Stores a changed view and publishes it to the shards; once every shard runs on
    /// it, sends what the keeper has to send over shard 0's links (until then the
    /// sends wait for the next tick).
    fn flush(&self) {
        if self.failed.get() {
            return;
        }
        loop {
            let changed = self.keeper.borrow_mut().take_changed();
            let learned = self.addresses_changed.replace(false);
            if changed.is_some() || learned {
                self.prune_addresses();
                let published = self.published();
                let addresses = published.address_list();
                let stored =
                    ring_file::store(&self.data_dir, self.cluster, &published.view, &addresses);
                if let Err(err) = stored {
                    tracing::error!(%err, "cannot store the ring view: stopping the node");
                    self.failed.set(true);
                    self.board.publish(Published {
                        streaming: false,
                        ..self.board.current()
                    });
                    self.stop.store(true, Ordering::SeqCst);
                    return;
                }
                self.board.publish(published);
                self.declare();
                continue;
            }
            if !self.board.all_adopted() {
                return;
            }
            let Some((to, view)) = self.keeper.borrow_mut().poll_send() else {
                break;
            };
            let Some(shard) = self.shard.upgrade() else {
                return;
            };
            if let Some(peers) = shard.peers() {
                // A member this shard has no link to yet (a joiner heard of just now).
                if let Some(native) = self.addresses.borrow().get(&to.0) {
                    peers.add_link(&shard, to.0, native.clone());
                }
                let addresses = address_list(&self.addresses.borrow());
                peers.send_ring(to, self.cluster, &view, &addresses);
            }
        }
    }

    /// Tells gossip the epoch of the view this node holds and its part in the change
    /// (joining, leaving), so every member's status shows who is behind.
    fn declare(&self) {
        let Some(membership) = self.shard.upgrade().and_then(|s| s.membership()) else {
            return;
        };
        let keeper = self.keeper.borrow();
        let view = keeper.view();
        let in_force = view.ring().is_member(self.me);
        let status = match view.next_ring().map(|next| next.is_member(self.me)) {
            Some(true) if !in_force => MemberStatus::Joining,
            Some(false) if in_force => MemberStatus::Leaving,
            // Out of both rings: it left (or was replaced), and serves nothing.
            _ if !view.is_member(self.me) => MemberStatus::Leaving,
            _ => MemberStatus::Up,
        };
        membership.declare(status, view.epoch());
        // A node that left the ring, or was replaced, is no member to watch.
        membership.restrict_to(view.members());
    }

    /// Keeps only the addresses of the view's members (either ring) and this node's.
    fn prune_addresses(&self) {
        let view = self.keeper.borrow().view().clone();
        let me = self.me.0;
        (self.addresses.borrow_mut()).retain(|&node, _| node == me || view.is_member(NodeId(node)));
    }

    /// Stops the ticker; no view leaves after this returns.
    pub async fn stop(&self) {
        self.ticking.set(false);
        self.ticker.ended().await;
    }
}

/// A member's native address must be one its peers can dial: an IP and a port, not
/// the unspecified address.
pub fn parse_address(native: &str) -> Result<std::net::SocketAddr, String> {
    match native.parse::<std::net::SocketAddr>() {
        Ok(addr) if !addr.ip().is_unspecified() && addr.port() != 0 => Ok(addr),
        Ok(_) => Err(format!(
            "'{native}' cannot be dialled by peers (unspecified address or port 0)"
        )),
        Err(_) => Err(format!("'{native}' is not an ip:port address")),
    }
}
