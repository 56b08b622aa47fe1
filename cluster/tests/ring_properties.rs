//! Placement properties (Dynamo §4.2 "Partitioning Algorithm", §4.3 "Replication",
//! §6.2 "Ensuring Uniform Load distribution", strategy 3).

use std::collections::BTreeSet;

use proptest::prelude::*;
use ringkv_cluster::{Member, NodeId, PartitionId, Ring, ZoneId};

/// Enough partitions that Q/S >= 40 for every S up to 100, so integer rounding alone
/// can never push max/mean past 1.05.
const Q: u32 = 4096;

fn members(count: usize) -> Vec<Member> {
    (0..count as u32)
        .map(|i| Member::new(NodeId(i * 7 + 3)))
        .collect()
}

fn max_over_mean(ring: &Ring) -> f64 {
    let load = ring.load();
    let max = *load.values().max().unwrap() as f64;
    let mean = ring.partition_count() as f64 / load.len() as f64;
    max / mean
}

fn moved(before: &Ring, after: &Ring) -> usize {
    (0..before.partition_count())
        .filter(|&p| before.owner(PartitionId(p)) != after.owner(PartitionId(p)))
        .count()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Dynamo §6.2 strategy 3: equal partitions, Q/S per node; max/mean <= 1.05.
    #[test]
    fn initial_ring_is_balanced(size in 3usize..=100) {
        let ring = Ring::new(Q, &members(size)).unwrap();
        prop_assert!(max_over_mean(&ring) <= 1.05, "max/mean {}", max_over_mean(&ring));
        ring.assert_invariants();
    }

    /// Dynamo §4.2: a joining node takes its share from the others and nothing else
    /// moves: at most 1.1x the ideal Q/(S+1) partitions, all of them to the newcomer.
    #[test]
    fn a_join_moves_only_the_newcomers_share(size in 3usize..=99, history in prop::collection::vec(any::<bool>(), 0..4)) {
        let mut ring = Ring::new(Q, &members(size)).unwrap();
        // Vary the starting point with a few earlier joins and leaves.
        let mut next_id = 10_000;
        for join in history {
            ring = if join || ring.member_count() <= 3 {
                next_id += 1;
                ring.with_member(Member::new(NodeId(next_id))).unwrap()
            } else {
                let first = ring.members().next().unwrap().node;
                ring.without_member(first).unwrap()
            };
        }
        let newcomer = NodeId(1_000_000);
        let after = ring.with_member(Member::new(newcomer)).unwrap();
        let s = ring.member_count() as f64;
        let ideal = Q as f64 / (s + 1.0);
        let moved = moved(&ring, &after);
        prop_assert!(moved as f64 <= 1.1 * ideal, "moved {moved}, ideal {ideal}");
        for p in 0..Q {
            let p = PartitionId(p);
            if ring.owner(p) != after.owner(p) {
                prop_assert_eq!(after.owner(p), newcomer);
            }
        }
        prop_assert!(max_over_mean(&after) <= 1.05);
        prop_assert_eq!(after.epoch(), ring.epoch() + 1);
    }

    /// Dynamo §4.2: when a node leaves, only its partitions move (about 1/(S+1) of
    /// them, for the S+1 nodes before the leave), and the ring stays balanced.
    #[test]
    fn a_leave_moves_only_the_leavers_share(size in 4usize..=100, pick in any::<prop::sample::Index>()) {
        let ring = Ring::new(Q, &members(size)).unwrap();
        let nodes: Vec<NodeId> = ring.members().map(|m| m.node).collect();
        let leaver = nodes[pick.index(nodes.len())];
        let after = ring.without_member(leaver).unwrap();
        let ideal = Q as f64 / size as f64;
        let moved = moved(&ring, &after);
        prop_assert!(moved as f64 <= 1.1 * ideal, "moved {moved}, ideal {ideal}");
        for p in 0..Q {
            let p = PartitionId(p);
            if ring.owner(p) != after.owner(p) {
                prop_assert_eq!(ring.owner(p), leaver);
            }
        }
        prop_assert!(!after.is_member(leaver));
        prop_assert!(max_over_mean(&after) <= 1.05);
    }

    /// Dynamo §4.3: every preference list holds N distinct physical nodes when S >= N,
    /// starting with the partition's owner.
    #[test]
    fn preference_lists_have_n_distinct_nodes(size in 3usize..=100, n in 1usize..=5, joins in 0usize..3) {
        let mut ring = Ring::new(Q, &members(size)).unwrap();
        for j in 0..joins {
            ring = ring.with_member(Member::new(NodeId(50_000 + j as u32))).unwrap();
        }
        let expected = n.min(ring.member_count());
        for p in 0..Q {
            let list = ring.preference_list(PartitionId(p), n);
            let distinct: BTreeSet<_> = list.iter().collect();
            prop_assert_eq!(list.len(), expected);
            prop_assert_eq!(distinct.len(), expected);
            prop_assert_eq!(list[0], ring.owner(PartitionId(p)));
        }
    }

    /// With at least N zones, the N replicas of every key sit in N distinct zones.
    #[test]
    fn preference_lists_span_zones(size in 3usize..=60, zones in 3u32..=5, joins in 0usize..3) {
        let zoned: Vec<Member> = (0..size as u32)
            .map(|i| Member::in_zone(NodeId(i), ZoneId(i % zones)))
            .collect();
        let mut ring = Ring::new(1024, &zoned).unwrap();
        for j in 0..joins as u32 {
            ring = ring.with_member(Member::in_zone(NodeId(900 + j), ZoneId(j % zones))).unwrap();
        }
        let zone_of = |node: NodeId| ring.members().find(|m| m.node == node).unwrap().zone;
        for p in 0..1024 {
            let list = ring.preference_list(PartitionId(p), 3);
            let zones_hit: BTreeSet<_> = list.iter().map(|&n| zone_of(n)).collect();
            prop_assert_eq!(zones_hit.len(), 3, "partition {}: {:?}", p, list);
        }
    }

    /// Every node computes the same map from the same inputs, in any listing order.
    #[test]
    fn assignment_is_independent_of_member_order(size in 3usize..=40, seed in any::<u64>()) {
        let mut listed = members(size);
        let mut shuffled = listed.clone();
        // A cheap deterministic shuffle driven by the seed.
        let mut state = seed | 1;
        for i in (1..shuffled.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            shuffled.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let a = Ring::new(Q, &listed).unwrap();
        let b = Ring::new(Q, &shuffled).unwrap();
        prop_assert_eq!(&a, &b);
        listed.reverse();
        prop_assert_eq!(a, Ring::new(Q, &listed).unwrap());
    }
}

/// Dynamo §4.2: the partition is a fixed function of the key's hash.
#[test]
fn partition_is_the_top_bits_of_xxh3() {
    let ring = Ring::new(1024, &members(3)).unwrap();
    for key in [&b"a"[..], b"user:42", b""] {
        let hash = xxhash_rust::xxh3::xxh3_64(key);
        assert_eq!(ring.partition_of(key), PartitionId((hash >> 54) as u32));
    }
}
