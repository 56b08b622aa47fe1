//! Merkle-tree anti-entropy between two replicas of a partition (Dynamo §4.7), as the
//! node's state: which exchange it started, and what it answers.
//!
//! One exchange, started by `Node::tick_anti_entropy` (the driver calls it every
//! interval; at most one exchange per state machine is open at a time):
//!
//! 1. A → B `AeBranches`: A's 32 branch values for the partition.
//! 2. B → A `AeLeaves`: B's leaves under every branch that differs (nothing: equal).
//! 3. A lists its keys of the leaves that differ (at most `LEAVES_PER_ROUND` of them,
//!    from the store's index) and sends them with their digests: `AeKeys`.
//! 4. B lists its own keys of those leaves, pushes to A (as `Repair`) every key whose
//!    digest A lacks or differs, and asks A (`AePull`) for every key it lacks or holds
//!    differently; A pushes those.
//!
//! Every push is an ordinary repair, merged causally by the receiver: anti-entropy
//! never decides between versions, it only makes sure each replica has seen both.

use std::time::Duration;

use crate::ring::{NodeId, PartitionId};

/// Leaves whose keys one exchange lists; the next exchange takes the rest.
pub const LEAVES_PER_ROUND: usize = 256;
/// Keys read to push at once; beyond, a push waits for a later exchange.
pub const PUSHES_MAX: usize = 256;
/// More differing leaves than this in one exchange mean a replica far behind (one
/// that was down, or lost its disk) rather than writes in flight: the node then runs
/// its exchanges back to back instead of one per interval, until it has caught up.
pub const CATCH_UP_LEAVES: usize = 4;
/// Catching up stops after this long without a key moved either way.
pub const CATCH_UP_IDLE: Duration = Duration::from_secs(5);

/// The exchange this node started and waits on.
#[derive(Clone, Debug)]
pub(crate) struct Exchange {
    pub partition: PartitionId,
    pub peer: NodeId,
    /// Given up after this (a lost message, a peer gone): the next tick starts anew.
    pub deadline: Duration,
}

/// A listing of keys the node asked its storage for, and why.
#[derive(Clone, Debug)]
pub(crate) enum Listing {
    /// Step 3: our keys of `leaves`, to send to `peer`.
    ForPeer {
        peer: NodeId,
        partition: PartitionId,
        leaves: Vec<u32>,
    },
    /// Step 4: our keys of the leaves `peer` listed, to compare with `theirs`.
    Compare {
        peer: NodeId,
        partition: PartitionId,
        theirs: Vec<(Vec<u8>, u32)>,
    },
    /// Not anti-entropy: the tombstones of a partition, for tombstone sweep `sweep`
    /// (see `crate::node::tombstones`).
    Tombstones { sweep: u64 },
}

/// A key this node reads to push to a peer.
#[derive(Clone, Debug)]
pub(crate) struct Push {
    pub to: NodeId,
    pub partition: PartitionId,
    pub key: Vec<u8>,
    /// Forgotten after this if the local read never answers (a failed read).
    pub deadline: Duration,
}

/// Counters over the node's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AntiEntropyStats {
    /// Exchanges started, and those whose trees differed.
    pub exchanges: u64,
    pub exchanges_differing: u64,
    /// Keys pushed to peers (each an ordinary repair).
    pub keys_pushed: u64,
    /// Exchanges given up at their deadline.
    pub timed_out: u64,
    /// Pushes left for a later exchange (`PUSHES_MAX` in flight).
    pub pushes_deferred: u64,
}

/// Most key bytes one `AeKeys` lists; past it, whole leaves are left for a later
/// exchange (a partition of long keys would otherwise exceed the frame limit).
pub const KEY_BYTES_PER_ROUND: usize = 4 << 20;

/// The leaves of `leaves` (in order) whose keys fit `KEY_BYTES_PER_ROUND` together,
/// with those keys; at least the first leaf, whatever it holds.
pub fn within_budget(
    leaves: Vec<u32>,
    keys: Vec<(Vec<u8>, u32)>,
) -> (Vec<u32>, Vec<(Vec<u8>, u32)>) {
    use std::collections::BTreeMap;
    let mut by_leaf: BTreeMap<u32, Vec<(Vec<u8>, u32)>> = BTreeMap::new();
    for (key, digest) in keys {
        let leaf = crate::merkle::leaf_of(&key) as u32;
        by_leaf.entry(leaf).or_default().push((key, digest));
    }
    let (mut kept_leaves, mut kept_keys, mut bytes) = (Vec::new(), Vec::new(), 0);
    for leaf in leaves {
        let of_leaf = by_leaf.remove(&leaf).unwrap_or_default();
        let size: usize = of_leaf.iter().map(|(k, _)| k.len() + 8).sum();
        if !kept_leaves.is_empty() && bytes + size > KEY_BYTES_PER_ROUND {
            break;
        }
        bytes += size;
        kept_leaves.push(leaf);
        kept_keys.extend(of_leaf);
    }
    (kept_leaves, kept_keys)
}

/// Which keys of two listings need pushing: those `ours` has that `theirs` lacks or
/// holds with another digest (pushed to the peer), and those `theirs` has that `ours`
/// lacks or holds differently (pulled from it). Both listings in any order.
pub fn compare(ours: &[(Vec<u8>, u32)], theirs: &[(Vec<u8>, u32)]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    use std::collections::BTreeMap;
    let ours: BTreeMap<&[u8], u32> = ours.iter().map(|(k, d)| (k.as_slice(), *d)).collect();
    let theirs: BTreeMap<&[u8], u32> = theirs.iter().map(|(k, d)| (k.as_slice(), *d)).collect();
    let push = ours
        .iter()
        .filter(|(k, d)| theirs.get(*k) != Some(d))
        .map(|(k, _)| k.to_vec())
        .collect();
    let pull = theirs
        .iter()
        .filter(|(k, d)| ours.get(*k) != Some(d))
        .map(|(k, _)| k.to_vec())
        .collect();
    (push, pull)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_over_the_budget_keeps_whole_leaves_only() {
        let key = |i: u32| format!("key-{i}").into_bytes().repeat(2_000);
        let keys: Vec<(Vec<u8>, u32)> = (0..1_000).map(|i| (key(i), i)).collect();
        let mut leaves: Vec<u32> = keys
            .iter()
            .map(|(k, _)| crate::merkle::leaf_of(k) as u32)
            .collect();
        leaves.sort_unstable();
        leaves.dedup();
        let (kept, listed) = within_budget(leaves.clone(), keys.clone());
        assert!(
            kept.len() < leaves.len(),
            "12 MB of keys must not fit 4 MiB"
        );
        let bytes: usize = listed.iter().map(|(k, _)| k.len() + 8).sum();
        assert!(bytes <= KEY_BYTES_PER_ROUND);
        // Every key of a kept leaf is listed, none of a leaf left out.
        for (k, _) in &keys {
            let leaf = crate::merkle::leaf_of(k) as u32;
            assert_eq!(kept.contains(&leaf), listed.iter().any(|(l, _)| l == k));
        }
        let small: Vec<(Vec<u8>, u32)> = (0..10).map(|i| (vec![i as u8], i)).collect();
        let all: Vec<u32> = small
            .iter()
            .map(|(k, _)| crate::merkle::leaf_of(k) as u32)
            .collect();
        assert_eq!(within_budget(all.clone(), small.clone()).1.len(), 10);
    }

    #[test]
    fn compare_pushes_what_the_peer_lacks_and_pulls_what_we_lack() {
        let ours = vec![(b"a".to_vec(), 1), (b"b".to_vec(), 2), (b"c".to_vec(), 3)];
        let theirs = vec![(b"b".to_vec(), 2), (b"c".to_vec(), 9), (b"d".to_vec(), 4)];
        let (push, pull) = compare(&ours, &theirs);
        assert_eq!(push, vec![b"a".to_vec(), b"c".to_vec()]);
        assert_eq!(pull, vec![b"c".to_vec(), b"d".to_vec()]);
        assert_eq!(compare(&ours, &ours), (Vec::new(), Vec::new()));
    }
}
