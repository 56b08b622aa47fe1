//! Data placement: Q fixed, equal partitions mapped onto physical nodes.
//!
//! This is Dynamo's partitioning "strategy 3" (Dynamo §6.2): the hash space is cut
//! into Q equal partitions (a power of two) and each node owns about Q/S of them. A key
//! belongs to partition `xxh3_64(key) >> (64 - log2 Q)`; its preference list is the
//! first N distinct nodes met walking the partitions clockwise from its own (Dynamo
//! §4.3), preferring nodes in zones not yet used when zones are configured.
//!
//! The assignment is a value, not a side effect: [`Ring::new`] computes it from the
//! member list alone, and [`Ring::with_member`] / [`Ring::without_member`] compute the
//! next ring from the current one and the change. Every node that applies the same
//! changes in the same order (the ring epoch says how many) holds the same map. We
//! derive each ring from its predecessor rather than from the member set alone because
//! no function of the member set alone is both exactly balanced and minimal on change:
//! rendezvous-style schemes are minimal but only statistically balanced, and capped
//! variants cascade moves. Transitions from the current ring give both: a join takes
//! exactly the newcomer's share from the most loaded nodes, a leave hands the leaver's
//! partitions to the least loaded ones.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

/// A physical node of the cluster. Ids are chosen by the operator and never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

/// A failure domain (rack, availability zone). Replicas of a key prefer distinct zones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ZoneId(pub u32);

/// One of the Q equal slices of the hash space ("virtual node" in Dynamo's terms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionId(pub u32);

/// A node as the ring sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub node: NodeId,
    pub zone: Option<ZoneId>,
}

impl Member {
    pub fn new(node: NodeId) -> Self {
        Member { node, zone: None }
    }

    pub fn in_zone(node: NodeId, zone: ZoneId) -> Self {
        Member {
            node,
            zone: Some(zone),
        }
    }
}

/// Why a ring could not be built or changed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RingError {
    #[error("partition count {0} is not a power of two between 1 and 2^24")]
    PartitionCount(u32),
    #[error("a ring needs at least one member")]
    NoMembers,
    #[error("{members} members cannot share {partitions} partitions: each needs at least one")]
    TooManyMembers { members: usize, partitions: u32 },
    #[error("node {0:?} is listed twice")]
    DuplicateMember(NodeId),
    #[error("node {0:?} is not a member")]
    UnknownMember(NodeId),
    #[error("node id {0} is above the largest allowed, {NODE_ID_MAX}")]
    NodeIdTooLarge(u32),
    #[error("the ring epoch cannot grow further")]
    EpochExhausted,
    #[error("unbalanced ring: nodes hold between {min} and {max} partitions")]
    Unbalanced { min: usize, max: usize },
}

/// The largest node id: hint shelves number their store partitions after their target
/// (see [`crate::hints::Shelf`]) above every ring partition.
pub const NODE_ID_MAX: u32 = (1 << 31) - 1;

/// The largest supported partition count. Far beyond any sensible setting (Dynamo and
/// Riak use hundreds to a few thousand); it bounds the memory a bad config can ask for.
pub const PARTITIONS_MAX: u32 = 1 << 24;

/// The partition-to-node map, with the members it was computed for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    /// log2 of the partition count.
    partition_bits: u32,
    /// owners[p] is the node holding partition p.
    owners: Vec<NodeId>,
    members: BTreeMap<NodeId, Member>,
    /// How many changes led to this ring; nodes compare epochs to spot stale views.
    epoch: u64,
}

impl Ring {
    /// The initial ring for `members`: partitions dealt round-robin in node id order
    /// (interleaving zones, so neighbouring partitions sit in different zones), which is
    /// exactly balanced and puts N distinct nodes on every run of N partitions.
    pub fn new(partitions: u32, members: &[Member]) -> Result<Ring, RingError> {
        let partition_bits = partition_bits(partitions)?;
        let members = member_map(members)?;
        if members.len() > partitions as usize {
            return Err(RingError::TooManyMembers {
                members: members.len(),
                partitions,
            });
        }
        let deal_order = interleave_zones(&members);
        let owners = (0..partitions as usize)
            .map(|p| deal_order[p % deal_order.len()])
            .collect();
        let ring = Ring {
            partition_bits,
            owners,
            members,
            epoch: 0,
        };
        ring.assert_invariants();
        Ok(ring)
    }

    /// The ring after `member` joins: it takes floor(Q/(S+1)) partitions, each from a
    /// node that currently holds the most, so only the newcomer's share moves.
    pub fn with_member(&self, member: Member) -> Result<Ring, RingError> {
        if self.members.contains_key(&member.node) {
            return Err(RingError::DuplicateMember(member.node));
        }
        if member.node.0 > NODE_ID_MAX {
            return Err(RingError::NodeIdTooLarge(member.node.0));
        }
        let partitions = self.partition_count();
        if self.members.len() + 1 > partitions as usize {
            return Err(RingError::TooManyMembers {
                members: self.members.len() + 1,
                partitions,
            });
        }
        let mut next = self.clone();
        next.members.insert(member.node, member);
        next.epoch = next.epoch.checked_add(1).ok_or(RingError::EpochExhausted)?;
        let share = partitions as usize / next.members.len();
        let mut held = next.holdings();
        held.insert(member.node, BTreeSet::new());
        for _ in 0..share {
            let donor = most_loaded(&held, member.node);
            let taken = farthest_from(&held[&donor], &held[&member.node], partitions);
            held.get_mut(&donor)
                .expect("donor came from the holdings map")
                .remove(&taken);
            held.get_mut(&member.node)
                .expect("newcomer was inserted above")
                .insert(taken);
            next.owners[taken as usize] = member.node;
        }
        next.assert_invariants();
        Ok(next)
    }

    /// The ring after `node` leaves: each of its partitions goes to a node holding the
    /// fewest, so only the leaver's share moves.
    pub fn without_member(&self, node: NodeId) -> Result<Ring, RingError> {
        if !self.members.contains_key(&node) {
            return Err(RingError::UnknownMember(node));
        }
        if self.members.len() == 1 {
            return Err(RingError::NoMembers);
        }
        let partitions = self.partition_count();
        let mut next = self.clone();
        next.members.remove(&node);
        next.epoch = next.epoch.checked_add(1).ok_or(RingError::EpochExhausted)?;
        let mut held = self.holdings();
        let orphans = held.remove(&node).unwrap_or_default();
        for orphan in orphans {
            let heir = least_loaded_near(&held, orphan, partitions);
            held.get_mut(&heir)
                .expect("heir came from the holdings map")
                .insert(orphan);
            next.owners[orphan as usize] = heir;
        }
        next.assert_invariants();
        Ok(next)
    }

    /// The ring after `with` takes over every partition of `dead` (a node lost for
    /// good): preference lists change by that one substitution, so only the dead
    /// node's share of the data moves, to the newcomer.
    pub fn with_replacement(&self, dead: NodeId, with: Member) -> Result<Ring, RingError> {
        if !self.members.contains_key(&dead) {
            return Err(RingError::UnknownMember(dead));
        }
        if self.members.contains_key(&with.node) {
            return Err(RingError::DuplicateMember(with.node));
        }
        if with.node.0 > NODE_ID_MAX {
            return Err(RingError::NodeIdTooLarge(with.node.0));
        }
        let mut next = self.clone();
        next.members.remove(&dead);
        next.members.insert(with.node, with);
        next.epoch = next.epoch.checked_add(1).ok_or(RingError::EpochExhausted)?;
        for owner in next.owners.iter_mut().filter(|o| **o == dead) {
            *owner = with.node;
        }
        next.assert_invariants();
        Ok(next)
    }

    /// A ring as another node sent it (see [`Ring::owners`]), checked: a peer's bytes
    /// never make a ring that breaks the invariants.
    pub fn from_parts(
        members: &[Member],
        owners: Vec<NodeId>,
        epoch: u64,
    ) -> Result<Ring, RingError> {
        let partitions = u32::try_from(owners.len()).unwrap_or(u32::MAX);
        let partition_bits = partition_bits(partitions)?;
        let members = member_map(members)?;
        if let Some(stranger) = owners.iter().find(|o| !members.contains_key(o)) {
            return Err(RingError::UnknownMember(*stranger));
        }
        let ring = Ring {
            partition_bits,
            owners,
            members,
            epoch,
        };
        let load = ring.load();
        let min = load.values().copied().min().unwrap_or(0);
        let max = load.values().copied().max().unwrap_or(0);
        if max - min > 1 {
            return Err(RingError::Unbalanced { min, max });
        }
        Ok(ring)
    }

    /// The owner of every partition, in partition order (with [`Ring::members`] and
    /// [`Ring::epoch`], what [`Ring::from_parts`] rebuilds the ring from).
    pub fn owners(&self) -> &[NodeId] {
        &self.owners
    }

    pub fn partition_count(&self) -> u32 {
        self.owners.len() as u32
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    pub fn is_member(&self, node: NodeId) -> bool {
        self.members.contains_key(&node)
    }

    /// The partition a key belongs to: the top log2(Q) bits of its xxh3 hash.
    pub fn partition_of(&self, key: &[u8]) -> PartitionId {
        if self.partition_bits == 0 {
            return PartitionId(0);
        }
        PartitionId((xxh3_64(key) >> (64 - self.partition_bits)) as u32)
    }

    pub fn owner(&self, partition: PartitionId) -> NodeId {
        self.owners[partition.0 as usize]
    }

    /// Partitions per node, for every member (members owning none included).
    pub fn load(&self) -> BTreeMap<NodeId, usize> {
        let mut load: BTreeMap<NodeId, usize> = self.members.keys().map(|&n| (n, 0)).collect();
        for owner in &self.owners {
            *load.entry(*owner).or_default() += 1;
        }
        load
    }

    /// The nodes that hold replicas of `partition`: walking clockwise from it, first
    /// one node per zone not yet used, then (if there are fewer zones than `n`) the
    /// remaining distinct nodes in walk order. Shorter than `n` only when the ring has
    /// fewer than `n` members. Members without a zone each count as their own zone.
    pub fn preference_list(&self, partition: PartitionId, n: usize) -> Vec<NodeId> {
        let wanted = n.min(self.members.len());
        let mut chosen: Vec<NodeId> = Vec::with_capacity(wanted);
        let zone_count = self.zone_count();
        let mut zones_used: BTreeSet<ZoneKey> = BTreeSet::new();
        // First pass: distinct zones. Stops early once every zone is used.
        for node in self.walk(partition) {
            if chosen.len() == wanted || zones_used.len() == zone_count {
                break;
            }
            let zone = self.zone_key(node);
            if !zones_used.contains(&zone) {
                zones_used.insert(zone);
                chosen.push(node);
            }
        }
        // Second pass: fill up with distinct nodes when zones ran out.
        if chosen.len() < wanted {
            for node in self.walk(partition) {
                if chosen.len() == wanted {
                    break;
                }
                if !chosen.contains(&node) {
                    chosen.push(node);
                }
            }
        }
        chosen
    }

    /// The preference list of the partition holding `key`.
    pub fn preference_list_for_key(&self, key: &[u8], n: usize) -> Vec<NodeId> {
        self.preference_list(self.partition_of(key), n)
    }

    /// Checks the ring's structural invariants; panics with the broken one.
    pub fn assert_invariants(&self) {
        assert!(self.owners.len().is_power_of_two());
        assert_eq!(1usize << self.partition_bits, self.owners.len());
        assert!(!self.members.is_empty());
        for owner in &self.owners {
            assert!(
                self.members.contains_key(owner),
                "owner {owner:?} is no member"
            );
        }
        for (id, member) in &self.members {
            assert_eq!(*id, member.node);
        }
        let load = self.load();
        let min = load.values().copied().min().unwrap_or(0);
        let max = load.values().copied().max().unwrap_or(0);
        assert!(max - min <= 1, "unbalanced ring: min {min}, max {max}");
    }

    fn walk(&self, start: PartitionId) -> impl Iterator<Item = NodeId> + '_ {
        let count = self.owners.len();
        (0..count).map(move |step| self.owners[(start.0 as usize + step) % count])
    }

    fn zone_count(&self) -> usize {
        let zones: BTreeSet<ZoneKey> = self.members.keys().map(|&n| self.zone_key(n)).collect();
        zones.len()
    }

    fn zone_key(&self, node: NodeId) -> ZoneKey {
        match self.members.get(&node).and_then(|m| m.zone) {
            Some(zone) => ZoneKey::Zone(zone),
            None => ZoneKey::Alone(node),
        }
    }

    fn holdings(&self) -> BTreeMap<NodeId, BTreeSet<u32>> {
        let mut held: BTreeMap<NodeId, BTreeSet<u32>> =
            self.members.keys().map(|&n| (n, BTreeSet::new())).collect();
        for (partition, owner) in self.owners.iter().enumerate() {
            held.entry(*owner).or_default().insert(partition as u32);
        }
        held
    }
}

/// A member's failure domain; a member without a zone is a domain of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ZoneKey {
    Zone(ZoneId),
    Alone(NodeId),
}

fn partition_bits(partitions: u32) -> Result<u32, RingError> {
    if !partitions.is_power_of_two() || partitions > PARTITIONS_MAX {
        return Err(RingError::PartitionCount(partitions));
    }
    Ok(partitions.trailing_zeros())
}

fn member_map(members: &[Member]) -> Result<BTreeMap<NodeId, Member>, RingError> {
    if members.is_empty() {
        return Err(RingError::NoMembers);
    }
    let mut map = BTreeMap::new();
    for member in members {
        if member.node.0 > NODE_ID_MAX {
            return Err(RingError::NodeIdTooLarge(member.node.0));
        }
        if map.insert(member.node, *member).is_some() {
            return Err(RingError::DuplicateMember(member.node));
        }
    }
    Ok(map)
}

/// Node ids in the order partitions are dealt: one node from each zone in turn, so
/// consecutive partitions land in different zones whenever the zones allow it.
fn interleave_zones(members: &BTreeMap<NodeId, Member>) -> Vec<NodeId> {
    let mut by_zone: BTreeMap<ZoneKey, Vec<NodeId>> = BTreeMap::new();
    for member in members.values() {
        let key = match member.zone {
            Some(zone) => ZoneKey::Zone(zone),
            None => ZoneKey::Alone(member.node),
        };
        by_zone.entry(key).or_default().push(member.node);
    }
    let deepest = by_zone.values().map(Vec::len).max().unwrap_or(0);
    let mut order = Vec::with_capacity(members.len());
    for round in 0..deepest {
        for nodes in by_zone.values() {
            if let Some(node) = nodes.get(round) {
                order.push(*node);
            }
        }
    }
    order
}

/// The node (other than `except`) holding the most partitions; ties go to the lowest id
/// so every node picks the same donor.
fn most_loaded(held: &BTreeMap<NodeId, BTreeSet<u32>>, except: NodeId) -> NodeId {
    let mut best: Option<(usize, NodeId)> = None;
    for (node, parts) in held {
        if *node == except {
            continue;
        }
        if best.is_none_or(|(count, _)| parts.len() > count) {
            best = Some((parts.len(), *node));
        }
    }
    // A join always has at least one existing member to take from.
    best.expect("a ring being joined has members").1
}

/// The partition in `candidates` farthest (clockwise or counter-clockwise) from every
/// partition in `owned`, lowest index on ties: spreading a newcomer's partitions keeps
/// the runs of N consecutive partitions (preference lists) made of distinct nodes.
fn farthest_from(candidates: &BTreeSet<u32>, owned: &BTreeSet<u32>, partitions: u32) -> u32 {
    let mut best: Option<(u32, u32)> = None;
    for &candidate in candidates {
        let distance = distance_to_nearest(owned, candidate, partitions);
        if best.is_none_or(|(d, _)| distance > d) {
            best = Some((distance, candidate));
        }
    }
    best.expect("a donor holds at least one partition").1
}

/// The member holding the fewest partitions, preferring (on ties) the one whose nearest
/// partition is farthest from `partition`, then the lowest id.
fn least_loaded_near(held: &BTreeMap<NodeId, BTreeSet<u32>>, partition: u32, count: u32) -> NodeId {
    let mut best: Option<(usize, std::cmp::Reverse<u32>, NodeId)> = None;
    for (node, parts) in held {
        let score = (
            parts.len(),
            std::cmp::Reverse(distance_to_nearest(parts, partition, count)),
            *node,
        );
        if best.is_none_or(|b| score < b) {
            best = Some(score);
        }
    }
    best.expect("a ring keeps at least one member").2
}

/// Circular distance from `partition` to the nearest member of `owned` (Q if none).
fn distance_to_nearest(owned: &BTreeSet<u32>, partition: u32, partitions: u32) -> u32 {
    if owned.is_empty() {
        return partitions;
    }
    let circular = |a: u32, b: u32| {
        let d = a.abs_diff(b);
        d.min(partitions - d)
    };
    let after = owned
        .range(partition..)
        .next()
        .or_else(|| owned.iter().next());
    let before = owned
        .range(..=partition)
        .next_back()
        .or_else(|| owned.iter().next_back());
    [after, before]
        .into_iter()
        .flatten()
        .map(|&p| circular(p, partition))
        .min()
        .unwrap_or(partitions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: &[u32]) -> Vec<Member> {
        ids.iter().map(|&i| Member::new(NodeId(i))).collect()
    }

    #[test]
    fn rejects_bad_partition_counts() {
        assert_eq!(
            Ring::new(12, &nodes(&[1])).unwrap_err(),
            RingError::PartitionCount(12)
        );
        assert_eq!(
            Ring::new(0, &nodes(&[1])).unwrap_err(),
            RingError::PartitionCount(0)
        );
        assert_eq!(Ring::new(8, &[]).unwrap_err(), RingError::NoMembers);
        assert_eq!(
            Ring::new(8, &nodes(&[1, 1])).unwrap_err(),
            RingError::DuplicateMember(NodeId(1))
        );
        assert!(matches!(
            Ring::new(2, &nodes(&[1, 2, 3])),
            Err(RingError::TooManyMembers { .. })
        ));
    }

    #[test]
    fn a_joiner_or_replacement_with_an_id_past_the_largest_is_refused() {
        let ring = Ring::new(8, &nodes(&[1, 2])).unwrap();
        let huge = Member::new(NodeId(NODE_ID_MAX + 1));
        assert_eq!(
            ring.with_member(huge).unwrap_err(),
            RingError::NodeIdTooLarge(NODE_ID_MAX + 1)
        );
        assert_eq!(
            ring.with_replacement(NodeId(2), huge).unwrap_err(),
            RingError::NodeIdTooLarge(NODE_ID_MAX + 1)
        );
    }

    #[test]
    fn single_partition_ring_maps_every_key_to_it() {
        let ring = Ring::new(1, &nodes(&[7])).unwrap();
        assert_eq!(ring.partition_of(b"anything"), PartitionId(0));
        assert_eq!(ring.preference_list(PartitionId(0), 3), vec![NodeId(7)]);
    }

    /// Dynamo §4.3: the preference list skips positions held by a node already chosen.
    #[test]
    fn preference_list_skips_repeated_nodes() {
        let ring = Ring::new(8, &nodes(&[1, 2])).unwrap();
        let ring = ring.with_member(Member::new(NodeId(3))).unwrap();
        for p in 0..8 {
            let list = ring.preference_list(PartitionId(p), 3);
            let distinct: BTreeSet<_> = list.iter().collect();
            assert_eq!(distinct.len(), 3, "partition {p}: {list:?}");
            assert_eq!(list[0], ring.owner(PartitionId(p)));
        }
    }

    #[test]
    fn preference_list_prefers_new_zones() {
        // Zone 0 holds nodes 1, 2, 3; zone 1 holds node 4 alone. Every list of three
        // must include node 4 (the only way to span two zones).
        let members = [
            Member::in_zone(NodeId(1), ZoneId(0)),
            Member::in_zone(NodeId(2), ZoneId(0)),
            Member::in_zone(NodeId(3), ZoneId(0)),
            Member::in_zone(NodeId(4), ZoneId(1)),
        ];
        let ring = Ring::new(64, &members).unwrap();
        for p in 0..64 {
            let list = ring.preference_list(PartitionId(p), 3);
            assert_eq!(list.len(), 3);
            assert!(list.contains(&NodeId(4)), "partition {p}: {list:?}");
            let zone0 = list.iter().filter(|n| n.0 != 4).count();
            assert_eq!(zone0, 2);
        }
    }

    #[test]
    fn leave_and_rejoin_errors_are_typed() {
        let ring = Ring::new(16, &nodes(&[1, 2])).unwrap();
        assert_eq!(
            ring.without_member(NodeId(9)).unwrap_err(),
            RingError::UnknownMember(NodeId(9))
        );
        assert_eq!(
            ring.with_member(Member::new(NodeId(2))).unwrap_err(),
            RingError::DuplicateMember(NodeId(2))
        );
        let one = ring.without_member(NodeId(1)).unwrap();
        assert_eq!(
            one.without_member(NodeId(2)).unwrap_err(),
            RingError::NoMembers
        );
        assert_eq!(one.epoch(), 1);
    }
}
