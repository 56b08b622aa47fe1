//! Drives the node's gossip membership (`ringkv_cluster::Membership`) on shard 0: a
//! ticker every heartbeat interval, gossip in and out over shard 0's peer links, and
//! every change of suspicion handed to all shards, whose state machines route around
//! a suspected node. One membership per node, shared by its shards.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use ringkv_cluster::{
    GossipMessage, MemberAddress, MemberState, MemberStatus, Membership, MembershipEvent, NodeId,
};

use ringkv_proto::MemberReport;

use crate::config::Settings;
use crate::shard::Shard;
use crate::tasks::TaskGroup;

pub struct MembershipDriver {
    membership: RefCell<Membership>,
    started: Instant,
    /// Shard 0, which owns this; weak, so the shard's drop is not held up by it.
    shard: Weak<Shard>,
    ticking: Cell<bool>,
    ticker: TaskGroup,
    /// Times each member was taken for down since this node started.
    suspicions: RefCell<BTreeMap<NodeId, u64>>,
}

impl MembershipDriver {
    /// Starts gossiping as this node (`incarnation` from its data directory, bumped at
    /// every start) among the configured members.
    pub fn start(shard: &Rc<Shard>, settings: &Settings, incarnation: u64) -> Rc<Self> {
        let me = MemberState {
            node: NodeId(settings.node_id),
            incarnation,
            heartbeat: 0,
            status: MemberStatus::Up,
            address: MemberAddress {
                native: settings.listen.to_string(),
                resp: settings.resp.to_string(),
                shards: settings.shards as u16,
            },
            ring_epoch: 0,
        };
        // The others as the configuration names them, until they are heard from.
        let known = settings.members.iter().map(|(node, native)| MemberState {
            node: *node,
            incarnation: 0,
            heartbeat: 0,
            status: MemberStatus::Up,
            address: MemberAddress {
                native: native.to_string(),
                ..MemberAddress::default()
            },
            ring_epoch: 0,
        });
        let membership = Membership::new(
            settings.membership,
            me,
            known,
            crate::runtime::fresh_epoch_seed(),
            Duration::ZERO,
        );
        let driver = Rc::new(MembershipDriver {
            membership: RefCell::new(membership),
            started: Instant::now(),
            shard: Rc::downgrade(shard),
            ticking: Cell::new(true),
            ticker: TaskGroup::new(),
            suspicions: RefCell::new(BTreeMap::new()),
        });
        let ticker = Rc::downgrade(&driver);
        let interval = settings.membership.heartbeat_interval;
        driver.ticker.spawn(async move {
            loop {
                glommio::timer::sleep(interval).await;
                let Some(driver) = ticker.upgrade().filter(|d| d.ticking.get()) else {
                    break;
                };
                let now = driver.now();
                driver.membership.borrow_mut().tick(now);
                driver.flush();
                // Level-triggered: every shard gets the whole suspected set each
                // interval, so one lost update cannot leave a shard wrong for good.
                if let Some(shard) = driver.shard.upgrade() {
                    shard.broadcast_suspected(&driver.membership.borrow().suspected());
                }
            }
        });
        driver
    }

    /// A gossip message from node `from`.
    pub fn handle(&self, from: NodeId, message: GossipMessage) {
        if !self.ticking.get() {
            return;
        }
        let now = self.now();
        self.membership.borrow_mut().handle(now, from, message);
        self.flush();
    }

    /// Every member as this node sees it now, for the Status request.
    pub fn report(&self) -> Vec<MemberReport> {
        let suspicions = self.suspicions.borrow();
        let view = self.membership.borrow().view(self.now());
        view.into_iter()
            .map(|v| MemberReport {
                node_id: v.state.node.0,
                incarnation: v.state.incarnation,
                heartbeat: v.state.heartbeat,
                status: match v.state.status {
                    MemberStatus::Joining => "joining",
                    MemberStatus::Up => "up",
                    MemberStatus::Leaving => "leaving",
                }
                .into(),
                // Saturates: a silence long enough to overflow this is "down" anyway.
                phi_milli: (v.phi * 1000.0).min(f64::from(u32::MAX)) as u32,
                down: v.down,
                ring_epoch: v.state.ring_epoch,
                suspicions: suspicions.get(&v.state.node).copied().unwrap_or(0),
            })
            .collect()
    }

    /// This node's own declaration, gossiped from the next heartbeat on: its part in
    /// the ring (joining, up, leaving) and the epoch of the ring view it holds.
    pub fn declare(&self, status: MemberStatus, ring_epoch: u64) {
        self.membership.borrow_mut().set_own(status, ring_epoch);
    }

    /// Keeps only the ring view's members (see `Membership::restrict_to`).
    pub fn restrict_to(&self, members: std::collections::BTreeSet<NodeId>) {
        self.membership.borrow_mut().restrict_to(members);
    }

    /// Whether the failure detector takes `node` for down now.
    pub fn is_down(&self, node: NodeId) -> bool {
        self.membership.borrow().is_down(node)
    }

    /// Stops the ticker; no gossip leaves after this returns.
    pub async fn stop(&self) {
        self.ticking.set(false);
        self.ticker.ended().await;
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Sends what the membership has to send and tells every shard what it now
    /// suspects.
    fn flush(&self) {
        let Some(shard) = self.shard.upgrade() else {
            return;
        };
        let peers = shard.peers();
        loop {
            let Some((to, message)) = self.membership.borrow_mut().poll_send() else {
                break;
            };
            if let Some(peers) = &peers {
                peers.send_gossip(to, &message);
            }
        }
        loop {
            let Some(event) = self.membership.borrow_mut().poll_event() else {
                break;
            };
            match event {
                MembershipEvent::Down(node) => {
                    tracing::warn!(node = node.0, "peer suspected down (phi)");
                    *self.suspicions.borrow_mut().entry(node).or_default() += 1;
                    shard.broadcast_suspected(&self.membership.borrow().suspected());
                }
                MembershipEvent::Up(node) => {
                    tracing::info!(node = node.0, "peer heard from again");
                    shard.broadcast_suspected(&self.membership.borrow().suspected());
                }
                // Membership is static (--peers) for now: nobody joins at run time.
                MembershipEvent::Joined(node) => {
                    tracing::warn!(node = node.0, "gossip names a node that is not a member");
                }
            }
        }
    }
}
