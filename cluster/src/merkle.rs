//! Per-partition Merkle trees over (key, version digest), for anti-entropy (Dynamo
//! §4.7), kept current on the write path so that comparing two replicas never needs a
//! scan (Riak's AAE rebuilds cost a third of its throughput).
//!
//! A key lands in one of [`LEAVES`] leaves by a hash of its own; a leaf is the XOR of
//! `entry_hash(key, digest)` over its keys, and every inner level is the XOR of its
//! children. XOR combines in any order, so a write updates one leaf and its ancestors
//! in O(depth) with `hash(old) ^ hash(new)`, whatever order writes come in, and two
//! replicas that hold the same (key, digest) pairs have equal trees bit for bit. Two
//! replicas compare roots, then the [`FANOUT`] branches under a differing root, then
//! the leaves under a differing branch: only the keys of differing leaves are sent.
//!
//! The digest is the one the store indexes ([`version_digest`], the engine's
//! `record::version_digest`), so a tree is rebuilt at start from the store's index
//! alone, without reading a record.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Children of the root, and of each branch.
pub const FANOUT: usize = 32;
/// Leaves of one partition's tree (FANOUT branches of FANOUT leaves).
pub const LEAVES: usize = FANOUT * FANOUT;

/// Seeds the key's leaf choice apart from the ring's partition hash (which takes the
/// top bits of the unseeded xxh3), so a partition's keys spread over all its leaves.
const LEAF_SEED: u64 = 0x6d65_726b_6c65_2121;

/// The digest of a stored version set's version bytes, as the engine indexes it.
pub fn version_digest(version: &[u8]) -> u32 {
    xxh3_64(version) as u32
}

/// The leaf a key belongs to.
pub fn leaf_of(key: &[u8]) -> usize {
    (xxh3_64_with_seed(key, LEAF_SEED) % LEAVES as u64) as usize
}

/// What one (key, version digest) contributes to its leaf.
pub fn entry_hash(key: &[u8], digest: u32) -> u64 {
    // Never 0, so a present key always shows.
    xxh3_64_with_seed(key, u64::from(digest) | 1 << 32).max(1)
}

/// One partition's tree. 8 KiB of leaves plus 32 branches and a root.
#[derive(Clone, PartialEq, Eq)]
pub struct MerkleTree {
    leaves: Box<[u64; LEAVES]>,
    branches: [u64; FANOUT],
    root: u64,
    keys: u64,
}

impl std::fmt::Debug for MerkleTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MerkleTree")
            .field("root", &format_args!("{:016x}", self.root))
            .field("keys", &self.keys)
            .finish()
    }
}

impl Default for MerkleTree {
    fn default() -> Self {
        MerkleTree {
            leaves: Box::new([0; LEAVES]),
            branches: [0; FANOUT],
            root: 0,
            keys: 0,
        }
    }
}

impl MerkleTree {
    /// The tree of `entries` (key, version digest), in any order.
    pub fn build<'a>(entries: impl IntoIterator<Item = (&'a [u8], u32)>) -> MerkleTree {
        let mut tree = MerkleTree::default();
        for (key, digest) in entries {
            tree.update(key, None, Some(digest));
        }
        tree
    }

    /// `key` went from `old` to `new` (None: absent).
    pub fn update(&mut self, key: &[u8], old: Option<u32>, new: Option<u32>) {
        if old == new {
            return;
        }
        let hash = |digest: Option<u32>| digest.map_or(0, |d| entry_hash(key, d));
        let delta = hash(old) ^ hash(new);
        let leaf = leaf_of(key);
        self.leaves[leaf] ^= delta;
        self.branches[leaf / FANOUT] ^= delta;
        self.root ^= delta;
        match (old, new) {
            (None, Some(_)) => self.keys += 1,
            (Some(_), None) => self.keys = self.keys.saturating_sub(1),
            _ => {}
        }
    }

    pub fn root(&self) -> u64 {
        self.root
    }

    /// Keys in the tree.
    pub fn keys(&self) -> u64 {
        self.keys
    }

    pub fn branches(&self) -> &[u64; FANOUT] {
        &self.branches
    }

    pub fn leaf(&self, leaf: usize) -> u64 {
        self.leaves.get(leaf).copied().unwrap_or(0)
    }

    /// The leaves under branch `branch` (0..FANOUT).
    pub fn leaves_of(&self, branch: usize) -> &[u64] {
        let start = branch.min(FANOUT - 1) * FANOUT;
        &self.leaves[start..start + FANOUT]
    }

    /// The leaves whose values differ from `other`'s, descending only into branches
    /// whose values differ: what an exchange would send keys for.
    pub fn differing_leaves(&self, other: &MerkleTree) -> Vec<usize> {
        if self.root == other.root {
            return Vec::new();
        }
        let mut leaves = Vec::new();
        for branch in 0..FANOUT {
            if self.branches[branch] == other.branches[branch] {
                continue;
            }
            for i in 0..FANOUT {
                let leaf = branch * FANOUT + i;
                if self.leaves[leaf] != other.leaves[leaf] {
                    leaves.push(leaf);
                }
            }
        }
        leaves
    }

    /// Checks the levels against each other (every branch the XOR of its leaves, the
    /// root the XOR of the branches); panics on a broken one.
    pub fn assert_invariants(&self) {
        for branch in 0..FANOUT {
            let xor = self.leaves_of(branch).iter().fold(0, |a, l| a ^ l);
            assert_eq!(xor, self.branches[branch], "branch {branch} disagrees");
        }
        assert_eq!(self.branches.iter().fold(0, |a, b| a ^ b), self.root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entries(n: u32) -> Vec<(Vec<u8>, u32)> {
        (0..n)
            .map(|i| (format!("key-{i}").into_bytes(), i * 7 + 1))
            .collect()
    }

    #[test]
    fn the_same_pairs_in_any_order_make_the_same_tree() {
        let mut pairs = entries(500);
        let forward = MerkleTree::build(pairs.iter().map(|(k, d)| (k.as_slice(), *d)));
        pairs.reverse();
        let backward = MerkleTree::build(pairs.iter().map(|(k, d)| (k.as_slice(), *d)));
        assert_eq!(forward, backward);
        assert_eq!(forward.keys(), 500);
        forward.assert_invariants();
    }

    #[test]
    fn one_changed_key_shows_in_exactly_its_leaf() {
        let pairs = entries(2_000);
        let a = MerkleTree::build(pairs.iter().map(|(k, d)| (k.as_slice(), *d)));
        let mut b = a.clone();
        b.update(b"key-17", Some(17 * 7 + 1), Some(9));
        assert_ne!(a.root(), b.root());
        assert_eq!(a.differing_leaves(&b), vec![leaf_of(b"key-17")]);
        b.update(b"key-17", Some(9), Some(17 * 7 + 1));
        assert_eq!(a, b, "undoing the change restores the tree");
        b.update(b"new", None, Some(1));
        assert_eq!(a.differing_leaves(&b), vec![leaf_of(b"new")]);
        b.update(b"new", Some(1), None);
        assert_eq!(a, b);
    }

    #[test]
    fn keys_spread_over_the_leaves() {
        let mut used = vec![0u32; LEAVES];
        for i in 0..(LEAVES as u32 * 8) {
            used[leaf_of(format!("spread-{i}").as_bytes())] += 1;
        }
        let empty = used.iter().filter(|&&n| n == 0).count();
        // 8 keys a leaf on average: a leaf stays empty with probability e^-8.
        assert!(empty < 10, "{empty} empty leaves");
    }

    proptest! {
        /// Incremental updates, in any order, end where a rebuild from the final
        /// state does.
        #[test]
        fn updates_match_a_rebuild(ops in proptest::collection::vec((0u8..40, proptest::option::of(0u32..5)), 0..200)) {
            let mut state: std::collections::BTreeMap<u8, u32> = Default::default();
            let mut tree = MerkleTree::default();
            for (key, digest) in ops {
                let name = [key];
                let old = state.get(&key).copied();
                tree.update(&name, old, digest);
                match digest {
                    Some(d) => state.insert(key, d),
                    None => state.remove(&key),
                };
            }
            let names: Vec<([u8; 1], u32)> = state.iter().map(|(k, d)| ([*k], *d)).collect();
            let rebuilt = MerkleTree::build(names.iter().map(|(k, d)| (k.as_slice(), *d)));
            tree.assert_invariants();
            prop_assert_eq!(tree, rebuilt);
        }
    }
}
