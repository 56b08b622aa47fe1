//! A node's ring keeper: the one place its ring view changes. A sans-IO state machine
//! like [`crate::Membership`], one per node and shared by its shards: the driver feeds
//! it operators' changes, peers' views and the partitions its shards received, hands
//! every new view to the shards, and sends what it has to send.
//!
//! - An operator's change (join, leave, replace) may be proposed at any member; it
//!   starts in that member's view, and is refused while another change is in progress.
//!   Two changes proposed at once on two nodes resolve to one everywhere (see
//!   [`RingView::merge`]); the other's proposer sees its change lost and may retry.
//! - Views spread by push: every push interval, and at once after a change, the
//!   keeper sends its view to every member of either ring; a receiver merges it (views
//!   only move forward) and answers with its own when the two differ, so a node that
//!   was away catches up at its first message.
//! - Streaming may start ([`RingKeeper::transfers_allowed`]) once every live member
//!   has reported holding the change (from then on every coordinator writes to both
//!   rings' replicas) and a settle time has passed since (writes coordinated under the
//!   old ring have finished: they end within a request timeout).
//! - A view is durable before anyone hears of it: a node that told its peers it writes
//!   to both rings, then crashed and came back without the view, would write to the
//!   old ring alone while partitions stream. [`RingKeeper::poll_send`] holds messages
//!   back until the driver has stored the latest view ([`RingKeeper::take_changed`]).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::ring::{NodeId, PartitionId};
use crate::view::{RingChange, RingView, ViewError};

/// Settings of a ring keeper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeeperConfig {
    /// How often the view is pushed to every member.
    pub push_interval: Duration,
    /// How long after every member holds a change streaming waits: at least the
    /// longest a coordinated write may still be in flight (the request timeout), plus
    /// the time the driver takes to hand a view to all its shards.
    pub settle: Duration,
}

impl Default for KeeperConfig {
    fn default() -> Self {
        KeeperConfig {
            push_interval: Duration::from_secs(1),
            settle: Duration::from_secs(3),
        }
    }
}

/// What a member last said it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Reported {
    epoch: u64,
    stable: bool,
    fingerprint: u64,
}

impl Reported {
    fn of(view: &RingView) -> Reported {
        Reported {
            epoch: view.epoch(),
            stable: view.is_stable(),
            fingerprint: view.fingerprint(),
        }
    }

    /// Whether a member that reported this holds `change` (or got past it).
    fn holds(&self, change: &Reported) -> bool {
        self.epoch > change.epoch
            || (self.epoch == change.epoch
                && (self.stable || self.fingerprint == change.fingerprint))
    }
}

/// A node's ring view and what its peers said of theirs.
#[derive(Debug)]
pub struct RingKeeper {
    me: NodeId,
    config: KeeperConfig,
    view: RingView,
    reported: BTreeMap<NodeId, Reported>,
    /// When every live member was first seen holding the change in progress.
    agreed_at: Option<Duration>,
    /// Whether the view changed since the driver last stored it.
    unstored: bool,
    sends: VecDeque<(NodeId, RingView)>,
    next_push: Duration,
}

impl RingKeeper {
    /// A keeper starting from `view` (the one stored, or the initial ring).
    pub fn new(me: NodeId, view: RingView, config: KeeperConfig) -> RingKeeper {
        RingKeeper {
            me,
            config,
            view,
            reported: BTreeMap::new(),
            agreed_at: None,
            unstored: false,
            sends: VecDeque::new(),
            next_push: Duration::ZERO,
        }
    }

    pub fn view(&self) -> &RingView {
        &self.view
    }

    /// Starts an operator's change here; returns the epoch of the ring it leads to.
    pub fn propose(&mut self, now: Duration, change: RingChange) -> Result<u64, ViewError> {
        let next = self.view.start(change)?;
        let epoch = next.epoch();
        self.adopt(now, next);
        Ok(epoch)
    }

    /// A peer's view: merged, and answered with this node's when they differ.
    pub fn handle(&mut self, now: Duration, from: NodeId, theirs: RingView) {
        if from == self.me || !self.view.same_cluster(&theirs) {
            return;
        }
        self.reported.insert(from, Reported::of(&theirs));
        let mut merged = self.view.clone();
        if merged.merge(&theirs) {
            self.adopt(now, merged);
        }
        // Answered only if this view teaches the sender something: two views that
        // cannot merge must not bounce for ever.
        let mut taught = theirs;
        if taught.merge(&self.view) {
            self.sends.push_back((from, self.view.clone()));
        }
        self.check_agreement(now);
    }

    /// A shard of this node holds everything of `partition` from its sources.
    pub fn partition_moved(&mut self, now: Duration, partition: PartitionId, fingerprint: u64) {
        let mut next = self.view.clone();
        if next.mark_moved(partition, fingerprint) {
            self.adopt(now, next);
        }
    }

    /// Pushes the view when due, and looks at whether every member holds the change.
    pub fn tick(&mut self, now: Duration) {
        if now >= self.next_push {
            self.next_push = now + self.config.push_interval;
            self.push_to_all();
        }
        self.check_agreement(now);
    }

    /// Whether this node's shards may stream partitions of the change in progress.
    pub fn transfers_allowed(&self, now: Duration) -> bool {
        !self.view.is_stable()
            && self
                .agreed_at
                .is_some_and(|at| now >= at + self.config.settle)
    }

    /// The view, once after every change: store it durably, then hand it to every
    /// shard, before draining [`RingKeeper::poll_send`].
    pub fn take_changed(&mut self) -> Option<RingView> {
        std::mem::take(&mut self.unstored).then(|| self.view.clone())
    }

    /// The next view to send, and to whom; nothing while a view is unstored.
    pub fn poll_send(&mut self) -> Option<(NodeId, RingView)> {
        if self.unstored {
            return None;
        }
        self.sends.pop_front()
    }

    /// Members that have not reported holding the change in progress yet.
    pub fn waiting_for(&self) -> Vec<NodeId> {
        let mine = Reported::of(&self.view);
        self.view
            .live_members()
            .into_iter()
            .filter(|&m| m != self.me)
            .filter(|m| !self.reported.get(m).is_some_and(|r| r.holds(&mine)))
            .collect()
    }

    fn adopt(&mut self, now: Duration, view: RingView) {
        let before = Reported::of(&self.view);
        self.view = view;
        self.unstored = true;
        let after = Reported::of(&self.view);
        if (before.epoch, before.fingerprint) != (after.epoch, after.fingerprint) {
            self.agreed_at = None;
        }
        // News travels at once, not at the next push.
        self.next_push = now;
        self.sends.clear();
    }

    fn push_to_all(&mut self) {
        for member in self.view.members() {
            if member != self.me {
                self.sends.push_back((member, self.view.clone()));
            }
        }
    }

    fn check_agreement(&mut self, now: Duration) {
        if self.view.is_stable() {
            self.agreed_at = None;
            return;
        }
        if self.agreed_at.is_none() && self.waiting_for().is_empty() {
            self.agreed_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{Member, Ring};

    fn keepers(ids: &[u32]) -> Vec<RingKeeper> {
        let members: Vec<Member> = ids.iter().map(|&n| Member::new(NodeId(n))).collect();
        let ring = Ring::new(16, &members).unwrap();
        ids.iter()
            .map(|&n| {
                let view = RingView::stable(ring.clone(), 3);
                RingKeeper::new(NodeId(n), view, KeeperConfig::default())
            })
            .collect()
    }

    /// Delivers everything until nothing is left to send; returns messages delivered.
    fn deliver(keepers: &mut [RingKeeper], now: Duration, lose: &dyn Fn(NodeId) -> bool) -> usize {
        let mut delivered = 0;
        loop {
            let mut out = Vec::new();
            for k in keepers.iter_mut() {
                k.tick(now);
                k.take_changed();
                while let Some((to, view)) = k.poll_send() {
                    out.push((k.me, to, view));
                }
            }
            if out.is_empty() {
                return delivered;
            }
            for (from, to, view) in out {
                if lose(to) {
                    continue;
                }
                if let Some(k) = keepers.iter_mut().find(|k| k.me == to) {
                    delivered += 1;
                    k.handle(now, from, view);
                }
            }
        }
    }

    #[test]
    fn streaming_waits_for_every_member_and_the_settle_time() {
        let mut ks = keepers(&[1, 2, 3]);
        let joiner = Member::new(NodeId(4));
        let t0 = Duration::from_secs(10);
        ks[0].propose(t0, RingChange::Join(joiner)).unwrap();
        assert!(
            ks[0].poll_send().is_none(),
            "nothing leaves before the view is stored"
        );
        let view = ks[0].take_changed().unwrap();
        ks.push(RingKeeper::new(NodeId(4), view, KeeperConfig::default()));
        ks[0].tick(t0);
        // Node 3 hears nothing: no streaming anywhere.
        deliver(&mut ks, t0, &|to| to == NodeId(3));
        let later = t0 + Duration::from_secs(60);
        assert!(!ks[0].transfers_allowed(later));
        assert_eq!(ks[0].waiting_for(), vec![NodeId(3)]);
        // Node 3 back: every member holds the change; streams wait out the settle.
        let t1 = t0 + Duration::from_secs(61);
        for k in ks.iter_mut() {
            k.tick(t1);
        }
        deliver(&mut ks, t1, &|_| false);
        assert!(ks.iter().all(|k| k.view().epoch() == 1));
        assert!(!ks[0].transfers_allowed(t1));
        assert!(ks[0].transfers_allowed(t1 + KeeperConfig::default().settle));
    }

    #[test]
    fn moved_partitions_spread_and_end_the_change_everywhere() {
        let mut ks = keepers(&[1, 2, 3]);
        let now = Duration::from_secs(1);
        ks[1]
            .propose(now, RingChange::Join(Member::new(NodeId(4))))
            .unwrap();
        let view = ks[1].view().clone();
        ks.push(RingKeeper::new(
            NodeId(4),
            view.clone(),
            KeeperConfig::default(),
        ));
        for k in ks.iter_mut() {
            k.tick(now);
        }
        deliver(&mut ks, now, &|_| false);
        let fingerprint = view.fingerprint();
        for p in view.pending() {
            ks[3].partition_moved(now, p, fingerprint);
        }
        deliver(&mut ks, now, &|_| false);
        for k in &ks {
            assert!(k.view().is_stable(), "node {:?}", k.me);
            assert_eq!(k.view().ring(), view.next_ring().unwrap());
        }
    }

    #[test]
    fn a_second_change_waits_for_the_first() {
        let mut ks = keepers(&[1, 2, 3, 4]);
        let now = Duration::ZERO;
        ks[0].propose(now, RingChange::Leave(NodeId(4))).unwrap();
        assert!(matches!(
            ks[0].propose(now, RingChange::Leave(NodeId(3))),
            Err(ViewError::ChangeInProgress(1))
        ));
    }
}
