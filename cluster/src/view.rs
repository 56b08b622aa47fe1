//! A ring view: the ring a node routes by, and the membership change moving in.
//!
//! A change (a node joins, leaves, or takes over a dead node's partitions) makes a next
//! ring from the current one ([`Ring::with_member`], [`Ring::without_member`],
//! [`Ring::with_replacement`]). Only partitions whose replica set differs between the
//! two have to move; while they do, both rings count:
//!
//! - Writes to a partition not yet moved go to the replicas of both rings and need W
//!   acks from each (a joint quorum, as in Raft's joint consensus), so whichever ring
//!   a later read uses, W of its replicas hold every write acknowledged meanwhile.
//! - Reads use the old replicas until the partition has moved, then the new ones.
//! - A partition moves once every source has streamed it to each new replica, and the
//!   sources leaving its list stopped serving it before saying so. A reader still on
//!   the old view then cannot count an old replica that misses writes acknowledged by
//!   the new replicas alone: that replica no longer answers.
//!
//! Writes acknowledged before the change reached every coordinator reach the new
//! replicas by the stream, which starts only after every member holds the change and a
//! settle time has passed (see [`crate::keeper`]). The change ends when every partition
//! has moved: the next ring becomes the ring.
//!
//! Views only move forward, so they converge like a grow-only set: [`RingView::merge`]
//! takes a later epoch over an earlier one, a finished change over the same change in
//! progress, and for one change the partitions either side saw move.

use std::collections::BTreeSet;

use thiserror::Error;
use xxhash_rust::xxh3::Xxh3;

use crate::ring::{Member, NodeId, PartitionId, Ring, RingError};

/// A change of membership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingChange {
    /// A new node takes its share of the partitions.
    Join(Member),
    /// A member hands its partitions over and goes.
    Leave(NodeId),
    /// A new node takes every partition of a member lost for good. The dead node is
    /// not asked for anything: the partitions' other replicas stream them.
    Replace { dead: NodeId, with: Member },
}

/// Why a change cannot start.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ViewError {
    #[error("a membership change is in progress (to ring epoch {0}); wait for it to finish")]
    ChangeInProgress(u64),
    #[error("{members} members cannot hold {replicas} replicas of every key")]
    TooFewMembers { members: usize, replicas: usize },
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("the pending partitions name partition {0}, beyond the ring")]
    PendingOutOfRange(u32),
}

/// A change moving in: the next ring and the partitions still to move.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    change: RingChange,
    ring: Ring,
    /// Partitions whose replica set changes and that have not moved yet.
    pending: BTreeSet<PartitionId>,
    fingerprint: u64,
}

/// The rings a node routes by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingView {
    /// N: replicas of each key, the same on every node (checked at the handshake).
    replicas: usize,
    ring: Ring,
    next: Option<Transition>,
}

impl RingView {
    /// A view with no change in progress.
    pub fn stable(ring: Ring, replicas: usize) -> RingView {
        RingView {
            replicas,
            ring,
            next: None,
        }
    }

    /// A view as a peer sent it (`pending` are partition numbers): the next ring is
    /// recomputed from the change, never taken from the wire.
    pub fn from_parts(
        ring: Ring,
        replicas: usize,
        change: Option<RingChange>,
        pending: &[u32],
    ) -> Result<RingView, ViewError> {
        let stable = RingView::stable(ring, replicas);
        let Some(change) = change else {
            return Ok(stable);
        };
        let mut view = stable.start(change)?;
        let transition = view.next.as_mut().expect("started just above");
        let count = transition.ring.partition_count();
        if let Some(&beyond) = pending.iter().find(|&&p| p >= count) {
            return Err(ViewError::PendingOutOfRange(beyond));
        }
        let sent: BTreeSet<PartitionId> = pending.iter().map(|&p| PartitionId(p)).collect();
        transition.pending.retain(|p| sent.contains(p));
        view.finish_if_moved();
        Ok(view)
    }

    /// The view with `change` moving in.
    pub fn start(&self, change: RingChange) -> Result<RingView, ViewError> {
        if let Some(next) = &self.next {
            return Err(ViewError::ChangeInProgress(next.ring.epoch()));
        }
        let ring = match change {
            RingChange::Join(member) => self.ring.with_member(member)?,
            RingChange::Leave(node) => self.ring.without_member(node)?,
            RingChange::Replace { dead, with } => self.ring.with_replacement(dead, with)?,
        };
        if ring.member_count() < self.replicas.min(self.ring.member_count()) {
            return Err(ViewError::TooFewMembers {
                members: ring.member_count(),
                replicas: self.replicas,
            });
        }
        let pending = (0..ring.partition_count())
            .map(PartitionId)
            .filter(|&p| {
                let before: BTreeSet<NodeId> = self
                    .ring
                    .preference_list(p, self.replicas)
                    .into_iter()
                    .collect();
                let after: BTreeSet<NodeId> =
                    ring.preference_list(p, self.replicas).into_iter().collect();
                before != after
            })
            .collect();
        let fingerprint = fingerprint(&self.ring, &change);
        let mut view = RingView {
            replicas: self.replicas,
            ring: self.ring.clone(),
            next: Some(Transition {
                change,
                ring,
                pending,
                fingerprint,
            }),
        };
        view.finish_if_moved();
        Ok(view)
    }

    /// The ring in force (the old one while a change moves in).
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The ring a change in progress leads to.
    pub fn next_ring(&self) -> Option<&Ring> {
        self.next.as_ref().map(|t| &t.ring)
    }

    pub fn change(&self) -> Option<RingChange> {
        self.next.as_ref().map(|t| t.change)
    }

    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// The latest ring this view knows of: the next one during a change.
    pub fn epoch(&self) -> u64 {
        self.next_ring().unwrap_or(&self.ring).epoch()
    }

    pub fn is_stable(&self) -> bool {
        self.next.is_none()
    }

    /// Names the change in progress (0 when stable): two views at one epoch with
    /// different changes (proposed at once on two nodes) differ in it.
    pub fn fingerprint(&self) -> u64 {
        self.next.as_ref().map_or(0, |t| t.fingerprint)
    }

    /// Partitions still to move, in order.
    pub fn pending(&self) -> impl Iterator<Item = PartitionId> + '_ {
        self.next.iter().flat_map(|t| t.pending.iter().copied())
    }

    pub fn is_pending(&self, partition: PartitionId) -> bool {
        self.next
            .as_ref()
            .is_some_and(|t| t.pending.contains(&partition))
    }

    /// Every member of either ring.
    pub fn members(&self) -> BTreeSet<NodeId> {
        let mut all: BTreeSet<NodeId> = self.ring.members().map(|m| m.node).collect();
        if let Some(next) = self.next_ring() {
            all.extend(next.members().map(|m| m.node));
        }
        all
    }

    /// Members of either ring that can take part in a change (a replaced node is dead).
    pub fn live_members(&self) -> BTreeSet<NodeId> {
        let mut all = self.members();
        if let Some(RingChange::Replace { dead, .. }) = self.change() {
            all.remove(&dead);
        }
        all
    }

    pub fn is_member(&self, node: NodeId) -> bool {
        self.ring.is_member(node) || self.next_ring().is_some_and(|r| r.is_member(node))
    }

    /// Who answers reads of `partition`: the old replicas until it has moved.
    pub fn read_replicas(&self, partition: PartitionId, n: usize) -> Vec<NodeId> {
        match &self.next {
            Some(next) if !next.pending.contains(&partition) => {
                next.ring.preference_list(partition, n)
            }
            _ => self.ring.preference_list(partition, n),
        }
    }

    /// Who takes writes of `partition`, as groups that must each reach the write
    /// quorum: both rings' replicas while it moves, else the readers alone.
    pub fn write_groups(&self, partition: PartitionId, n: usize) -> Vec<Vec<NodeId>> {
        match &self.next {
            Some(next) if next.pending.contains(&partition) => vec![
                self.ring.preference_list(partition, n),
                next.ring.preference_list(partition, n),
            ],
            _ => vec![self.read_replicas(partition, n)],
        }
    }

    /// Whether `node` holds a replica of `partition` now: it answers reads and takes
    /// writes of it.
    pub fn serves(&self, node: NodeId, partition: PartitionId, n: usize) -> bool {
        self.write_groups(partition, n)
            .iter()
            .any(|group| group.contains(&node))
    }

    /// The new replicas of a moving partition: what its stream goes to.
    pub fn gained(&self, partition: PartitionId) -> Vec<NodeId> {
        let (before, after) = self.lists(partition);
        after.into_iter().filter(|n| !before.contains(n)).collect()
    }

    /// The replicas a moving partition leaves.
    pub fn lost(&self, partition: PartitionId) -> Vec<NodeId> {
        let (before, after) = self.lists(partition);
        before.into_iter().filter(|n| !after.contains(n)).collect()
    }

    /// Who streams a moving partition to its new replicas: the replicas leaving it
    /// (each hands over what it held), or when the change replaces a dead node, every
    /// other old replica (together they hold every write a quorum acknowledged).
    pub fn sources(&self, partition: PartitionId) -> Vec<NodeId> {
        match self.change() {
            Some(RingChange::Replace { dead, .. }) => self
                .ring
                .preference_list(partition, self.replicas)
                .into_iter()
                .filter(|&n| n != dead)
                .collect(),
            Some(_) => self.lost(partition),
            None => Vec::new(),
        }
    }

    /// Records that `partition` moved under the change named `fingerprint`; the change
    /// ends with its last partition. True if that is news.
    pub fn mark_moved(&mut self, partition: PartitionId, fingerprint: u64) -> bool {
        let Some(next) = self.next.as_mut().filter(|t| t.fingerprint == fingerprint) else {
            return false;
        };
        let news = next.pending.remove(&partition);
        self.finish_if_moved();
        news
    }

    /// Takes whatever `other` knows that this view does not; true if anything changed.
    /// Views of another cluster (other N or partition count) are ignored.
    pub fn merge(&mut self, other: &RingView) -> bool {
        if !self.same_cluster(other) {
            return false;
        }
        let rank = |v: &RingView| (v.epoch(), v.is_stable(), v.fingerprint());
        if rank(other) > rank(self) {
            *self = other.clone();
            return true;
        }
        match (&mut self.next, &other.next) {
            // The same change on both sides: what moved on either side moved.
            (Some(mine), Some(theirs))
                if rank(other) == (mine.ring.epoch(), false, mine.fingerprint) =>
            {
                let before = mine.pending.len();
                mine.pending.retain(|p| theirs.pending.contains(p));
                let changed = mine.pending.len() != before;
                self.finish_if_moved();
                changed
            }
            _ => false,
        }
    }

    /// Whether `other` is a view of the same cluster (same N and partition count).
    pub fn same_cluster(&self, other: &RingView) -> bool {
        other.replicas == self.replicas
            && other.ring.partition_count() == self.ring.partition_count()
    }

    fn lists(&self, partition: PartitionId) -> (Vec<NodeId>, Vec<NodeId>) {
        match &self.next {
            Some(next) => (
                self.ring.preference_list(partition, self.replicas),
                next.ring.preference_list(partition, self.replicas),
            ),
            None => (Vec::new(), Vec::new()),
        }
    }

    fn finish_if_moved(&mut self) {
        if self.next.as_ref().is_some_and(|t| t.pending.is_empty()) {
            let next = self.next.take().expect("checked just above");
            self.ring = next.ring;
        }
    }
}

/// A hash of the ring a change starts from and the change: every node that starts
/// the same change from the same ring gets the same number.
fn fingerprint(ring: &Ring, change: &RingChange) -> u64 {
    let mut hash = Xxh3::new();
    hash.update(&ring.epoch().to_le_bytes());
    for owner in ring.owners() {
        hash.update(&owner.0.to_le_bytes());
    }
    let member = |hash: &mut Xxh3, m: &Member| {
        hash.update(&m.node.0.to_le_bytes());
        hash.update(&m.zone.map_or(u64::MAX, |z| u64::from(z.0)).to_le_bytes());
    };
    match change {
        RingChange::Join(m) => {
            hash.update(b"join");
            member(&mut hash, m);
        }
        RingChange::Leave(node) => {
            hash.update(b"leave");
            hash.update(&node.0.to_le_bytes());
        }
        RingChange::Replace { dead, with } => {
            hash.update(b"replace");
            hash.update(&dead.0.to_le_bytes());
            member(&mut hash, with);
        }
    }
    // 0 names "no change".
    hash.digest().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(nodes: &[u32], partitions: u32) -> RingView {
        let members: Vec<Member> = nodes.iter().map(|&n| Member::new(NodeId(n))).collect();
        RingView::stable(Ring::new(partitions, &members).unwrap(), 3)
    }

    #[test]
    fn a_join_moves_only_the_partitions_whose_replicas_change() {
        let old = view(&[1, 2, 3], 64);
        let joining = old.start(RingChange::Join(Member::new(NodeId(4)))).unwrap();
        assert_eq!(joining.epoch(), 1);
        let pending: Vec<PartitionId> = joining.pending().collect();
        assert!(!pending.is_empty());
        for p in (0..64).map(PartitionId) {
            let groups = joining.write_groups(p, 3);
            if joining.is_pending(p) {
                assert_eq!(groups.len(), 2);
                assert_eq!(joining.gained(p), vec![NodeId(4)]);
                assert_eq!(joining.sources(p), joining.lost(p));
                assert_eq!(joining.sources(p).len(), 1);
                // Reads stay with the old replicas until the partition moved.
                assert_eq!(joining.read_replicas(p, 3), old.read_replicas(p, 3));
            } else {
                assert_eq!(groups.len(), 1);
                assert!(!groups[0].contains(&NodeId(4)));
            }
        }
    }

    #[test]
    fn moved_partitions_read_from_the_new_ring_and_the_last_one_ends_the_change() {
        let old = view(&[1, 2, 3], 16);
        let mut joining = old.start(RingChange::Join(Member::new(NodeId(4)))).unwrap();
        let fingerprint = joining.fingerprint();
        let next = joining.next_ring().unwrap().clone();
        let pending: Vec<PartitionId> = joining.pending().collect();
        let first = pending[0];
        assert!(
            !joining.mark_moved(first, fingerprint ^ 1),
            "another change's partition"
        );
        assert!(joining.mark_moved(first, fingerprint));
        assert!(!joining.mark_moved(first, fingerprint), "not news twice");
        assert_eq!(
            joining.read_replicas(first, 3),
            next.preference_list(first, 3)
        );
        assert!(!joining.serves(joining.lost(first)[0], first, 3) || pending.len() == 1);
        for &p in &pending[1..] {
            joining.mark_moved(p, fingerprint);
        }
        assert!(joining.is_stable());
        assert_eq!(joining.ring(), &next);
    }

    #[test]
    fn views_merge_forward_and_agree_whatever_the_order() {
        let old = view(&[1, 2, 3], 16);
        let started = old.start(RingChange::Join(Member::new(NodeId(4)))).unwrap();
        let fingerprint = started.fingerprint();
        let pending: Vec<PartitionId> = started.pending().collect();
        let (mut a, mut b) = (started.clone(), started.clone());
        a.mark_moved(pending[0], fingerprint);
        b.mark_moved(pending[1], fingerprint);
        let mut c = old.clone();
        assert!(c.merge(&a));
        assert!(c.merge(&b));
        assert!(!c.merge(&old), "an older view teaches nothing");
        assert!(a.merge(&b));
        assert_eq!(a, c);
        // A view of the finished change wins over the change in progress.
        let mut done = started.clone();
        for &p in &pending {
            done.mark_moved(p, fingerprint);
        }
        assert!(a.merge(&done));
        assert_eq!(a, done);
        assert!(!done.merge(&started));
    }

    #[test]
    fn two_changes_proposed_at_once_resolve_to_the_same_one_everywhere() {
        let old = view(&[1, 2, 3], 16);
        let join4 = old.start(RingChange::Join(Member::new(NodeId(4)))).unwrap();
        let join5 = old.start(RingChange::Join(Member::new(NodeId(5)))).unwrap();
        assert_ne!(join4.fingerprint(), join5.fingerprint());
        let (mut x, mut y) = (join4.clone(), join5.clone());
        x.merge(&join5);
        y.merge(&join4);
        assert_eq!(x, y);
    }

    #[test]
    fn a_replacement_streams_from_the_survivors_and_a_view_rebuilds_from_its_parts() {
        let old = view(&[1, 2, 3, 4], 32);
        let with = Member::new(NodeId(9));
        let replacing = old
            .start(RingChange::Replace {
                dead: NodeId(2),
                with,
            })
            .unwrap();
        for p in replacing.pending() {
            assert_eq!(replacing.gained(p), vec![NodeId(9)]);
            assert_eq!(replacing.lost(p), vec![NodeId(2)]);
            assert_eq!(replacing.sources(p).len(), 2);
            assert!(!replacing.sources(p).contains(&NodeId(2)));
        }
        assert!(!replacing.live_members().contains(&NodeId(2)));
        let pending: Vec<u32> = replacing.pending().map(|p| p.0).skip(1).collect();
        let rebuilt =
            RingView::from_parts(old.ring().clone(), 3, replacing.change(), &pending).unwrap();
        assert_eq!(rebuilt.fingerprint(), replacing.fingerprint());
        assert_eq!(rebuilt.pending().count(), replacing.pending().count() - 1);
        assert!(RingView::from_parts(old.ring().clone(), 3, replacing.change(), &[99]).is_err());
        assert!(matches!(
            replacing.start(RingChange::Leave(NodeId(1))),
            Err(ViewError::ChangeInProgress(1))
        ));
    }

    #[test]
    fn a_leave_that_would_leave_too_few_members_is_refused() {
        let old = view(&[1, 2, 3], 16);
        assert!(matches!(
            old.start(RingChange::Leave(NodeId(3))),
            Err(ViewError::TooFewMembers { .. })
        ));
    }
}
