//! Drives the node's ring keeper (`ringkv_cluster::RingKeeper`) on shard 0, the one
//! place the node's ring view changes: operators' changes (`Op::ChangeRing`), peers'
//! views (peer `Ring` frames, routed here from whichever shard read them) and the
//! partitions the shards received in full. Every new view is stored in `ring.view`
//! first, then published on the node's [`RingBoard`], which every shard follows
//! (`Shard::follow_ring`), and only then told to peers, as the keeper requires.
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

use ringkv_cluster::{KeeperConfig, Member, NodeId, PartitionId, RingChange, RingKeeper, RingView};
use ringkv_proto::RingChangeRequest;
use ringkv_proto::RingReport;
use ringkv_proto::peer::MemberSpec;
use ringkv_proto::peer_message::encode_ring_view;

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
    /// Whether shards may stream partitions of the change in progress.
    streaming: AtomicBool,
    /// Partitions shards received in full, for the keeper.
    moved: Mutex<Vec<(PartitionId, u64)>>,
}

/// A view and the native address of every node the keeper knows of.
#[derive(Clone)]
pub struct Published {
    pub view: RingView,
    pub addresses: BTreeMap<u32, String>,
}

impl Published {
    /// The addresses as the ring frame carries them.
    pub fn address_list(&self) -> Vec<MemberSpec> {
        self.addresses
            .iter()
            .map(|(&node_id, native)| MemberSpec {
                node_id,
                native: native.clone(),
            })
            .collect()
    }

    /// The view and addresses as one ring frame (`Body::RingView`).
    pub fn encode(&self) -> Vec<u8> {
        let mut frame = Vec::new();
        // A view of at most 2^16 partitions and a few hundred members fits a frame.
        encode_ring_view(&self.view, &self.address_list(), &mut frame)
            .expect("a ring view fits a frame");
        frame
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl RingBoard {
    pub fn new(first: Published) -> Arc<RingBoard> {
        Arc::new(RingBoard {
            generation: AtomicU64::new(1),
            published: Mutex::new(first),
            streaming: AtomicBool::new(false),
            moved: Mutex::new(Vec::new()),
        })
    }

    fn publish(&self, next: Published, streaming: bool) {
        *lock(&self.published) = next;
        self.streaming.store(streaming, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The latest publication if it is newer than `seen`, with its generation.
    pub fn newer_than(&self, seen: u64) -> Option<(u64, Published)> {
        let generation = self.generation.load(Ordering::SeqCst);
        (generation != seen).then(|| {
            let published = lock(&self.published).clone();
            (generation, published)
        })
    }

    pub fn streaming(&self) -> bool {
        self.streaming.load(Ordering::SeqCst)
    }

    /// Whether `node` may open a peer link here: a member of either ring, or a node
    /// the keeper knows the address of (a joiner being added).
    pub fn knows(&self, node: u32) -> bool {
        let published = lock(&self.published);
        published.view.is_member(NodeId(node)) || published.addresses.contains_key(&node)
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
    #[error("the ring view cannot be stored: {0}")]
    Store(String),
}

pub struct KeeperDriver {
    me: NodeId,
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
        if allowed != self.board.streaming() && !self.failed.get() {
            self.board.streaming.store(allowed, Ordering::SeqCst);
            if allowed {
                tracing::info!(
                    epoch = self.keeper.borrow().view().epoch(),
                    "every member holds the change: streaming partitions"
                );
            }
        }
    }

    /// A peer's view and the addresses it knows.
    pub fn handle(&self, from: NodeId, view: RingView, addresses: Vec<MemberSpec>) {
        if !self.ticking.get() {
            return;
        }
        self.learn(addresses.into_iter().map(|a| (a.node_id, a.native)));
        self.keeper.borrow_mut().handle(self.now(), from, view);
        self.flush();
    }

    /// Learns how to reach nodes it had no address for (an address it has stays: a
    /// member's own word, at its handshake, is what the links use).
    fn learn(&self, addresses: impl IntoIterator<Item = (u32, String)>) {
        let mut known = self.addresses.borrow_mut();
        for (node, native) in addresses {
            if node != self.me.0
                && !known.contains_key(&node)
                && native.parse::<std::net::SocketAddr>().is_ok()
            {
                known.insert(node, native);
                self.addresses_changed.set(true);
            }
        }
    }

    /// Starts an operator's or a joiner's change here; answers with the view that
    /// holds it, stored. A joiner already part of the view is answered with it.
    pub fn change(&self, request: RingChangeRequest) -> Result<Vec<u8>, ChangeError> {
        if self.failed.get() || !self.ticking.get() {
            return Err(ChangeError::Refused("the node is stopping".into()));
        }
        let refused = |why: String| Err(ChangeError::Refused(why));
        let view = self.keeper.borrow().view().clone();
        let change = match request {
            RingChangeRequest::Join { node_id, native } => {
                if native.parse::<std::net::SocketAddr>().is_err() {
                    return refused(format!("'{native}' is not a host:port address"));
                }
                self.learn([(node_id, native)]);
                let joining = view.change() == Some(RingChange::Join(Member::new(NodeId(node_id))));
                if joining || view.ring().is_member(NodeId(node_id)) {
                    self.flush();
                    return self.answer();
                }
                RingChange::Join(Member::new(NodeId(node_id)))
            }
            RingChangeRequest::Leave { node_id } => RingChange::Leave(NodeId(node_id)),
            RingChangeRequest::Replace {
                dead,
                node_id,
                native,
            } => {
                if native.parse::<std::net::SocketAddr>().is_err() {
                    return refused(format!("'{native}' is not a host:port address"));
                }
                self.learn([(node_id, native)]);
                RingChange::Replace {
                    dead: NodeId(dead),
                    with: Member::new(NodeId(node_id)),
                }
            }
        };
        if view.change() == Some(change) {
            self.flush();
            return self.answer();
        }
        let proposed = self.keeper.borrow_mut().propose(self.now(), change);
        match proposed {
            Ok(epoch) => {
                tracing::info!(change = %describe(&change), epoch, "membership change started")
            }
            Err(e) => return refused(format!("{} refused: {e}", describe(&change))),
        }
        self.flush();
        self.answer()
    }

    /// The stored view and addresses, as one ring frame.
    fn answer(&self) -> Result<Vec<u8>, ChangeError> {
        if self.failed.get() {
            return Err(ChangeError::Store("see the node's log".into()));
        }
        Ok(self.published().encode())
    }

    fn published(&self) -> Published {
        Published {
            view: self.keeper.borrow().view().clone(),
            addresses: self.addresses.borrow().clone(),
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
            streaming: self.board.streaming(),
        }
    }

    /// Stores a changed view, publishes it to the shards, then sends what the keeper
    /// has to send over shard 0's links.
    fn flush(&self) {
        if self.failed.get() {
            return;
        }
        loop {
            let changed = self.keeper.borrow_mut().take_changed();
            let learned = self.addresses_changed.replace(false);
            if changed.is_some() || learned {
                let published = self.published();
                let addresses = published.address_list();
                if let Err(err) = ring_file::store(&self.data_dir, &published.view, &addresses) {
                    tracing::error!(%err, "cannot store the ring view: stopping the node");
                    self.failed.set(true);
                    self.board.streaming.store(false, Ordering::SeqCst);
                    self.stop.store(true, Ordering::SeqCst);
                    return;
                }
                // Decided anew for every view: a new change must not stream on the
                // last one's agreement.
                let streaming = self.keeper.borrow().transfers_allowed(self.now());
                self.board.publish(published, streaming);
                continue;
            }
            let Some((to, view)) = self.keeper.borrow_mut().poll_send() else {
                break;
            };
            if let Some(peers) = self.shard.upgrade().and_then(|s| s.peers()) {
                peers.send_ring(to, &view, &self.published().address_list());
            }
        }
    }

    /// Stops the ticker; no view leaves after this returns.
    pub async fn stop(&self) {
        self.ticking.set(false);
        self.ticker.ended().await;
    }
}
