//! A node's simulated storage: honest about durability, like foundationdb's
//! AsyncFileNonDurable. A write is pending until the next sync (which groups every
//! write pending at that moment, like the engine's group commit); its completion is
//! delivered only then. A crash loses every pending write.

use std::collections::{BTreeMap, BTreeSet};

use ringkv_cluster::merkle::{MerkleTree, version_digest};
use ringkv_cluster::{NodeId, PartitionId, Shelf, StorageOpId, StoredRead, StoredVersions};

/// A key on one shelf (at home in its partition, or among the hints for a node).
type At = (Shelf, Vec<u8>);

/// A hint a sync made durable: its target, key and record.
pub type SyncedHint = (NodeId, Vec<u8>, StoredVersions);

#[derive(Default)]
pub struct Disk {
    durable: BTreeMap<At, StoredVersions>,
    /// Pending writes: the shard that issued each, its op, where, and the record
    /// (`None`: a removal).
    pending: Vec<(usize, StorageOpId, At, Option<StoredVersions>)>,
    /// Keys whose record failed its checksum: they read as lost until rewritten, as
    /// the engine's `Lost` markers do.
    lost: BTreeSet<At>,
    /// Tombstones collected since the last crash: gone from reads and listings, but
    /// back after a crash, as the engine's collection is not durable (its record
    /// stays until compaction can drop it).
    collected: BTreeMap<At, StoredVersions>,
}

impl Disk {
    /// What a read sees: the newest pending write of the key (the page cache), else
    /// the durable record.
    pub fn read(&self, shelf: Shelf, key: &[u8]) -> StoredRead {
        let pending = self
            .pending
            .iter()
            .rev()
            .find(|(_, _, at, _)| at.0 == shelf && at.1 == key);
        let at = (shelf, key.to_vec());
        match pending {
            Some((_, _, _, Some(stored))) => StoredRead::Found(stored.clone()),
            Some((_, _, _, None)) => StoredRead::Absent,
            None if self.lost.contains(&at) => StoredRead::Lost,
            None => match self.durable.get(&at) {
                Some(stored) => StoredRead::Found(stored.clone()),
                None => StoredRead::Absent,
            },
        }
    }

    /// The durable record of `key` fails its checksum; returns whether there was one.
    pub fn lose(&mut self, shelf: Shelf, key: &[u8]) -> bool {
        let at = (shelf, key.to_vec());
        let had = self.durable.remove(&at).is_some();
        if had {
            self.lost.insert(at);
        }
        had
    }

    /// The disk is replaced: nothing durable is left.
    pub fn wipe(&mut self) {
        self.durable.clear();
        self.lost.clear();
        self.pending.clear();
        self.collected.clear();
    }

    /// Forgets the home tombstone `key` if its durable record's version digest is
    /// `digest` and no write of it is pending; returns the record it forgot.
    pub fn collect(
        &mut self,
        partition: PartitionId,
        key: &[u8],
        digest: u32,
    ) -> Option<StoredVersions> {
        let at = (Shelf::Home(partition), key.to_vec());
        let pending = self.pending.iter().any(|(_, _, p, _)| *p == at);
        match self.durable.get(&at) {
            Some(stored)
                if !pending && stored.tombstone && version_digest(&stored.version) == digest =>
            {
                let stored = self.durable.remove(&at).expect("matched just above");
                self.collected.insert(at, stored.clone());
                Some(stored)
            }
            _ => None,
        }
    }

    /// Forgets every home record of `partition`, pending or durable (it moved to
    /// other nodes), durably at once: the engine's drop is one durable marker.
    pub fn drop_partition(&mut self, partition: PartitionId) {
        let home = Shelf::Home(partition);
        self.durable.retain(|(shelf, _), _| *shelf != home);
        self.lost.retain(|(shelf, _)| *shelf != home);
        self.collected.retain(|(shelf, _), _| *shelf != home);
    }

    /// Every durable home tombstone of `partition` with its version digest.
    pub fn home_tombstones(&self, partition: PartitionId) -> Vec<(Vec<u8>, u32)> {
        (self.durable.iter())
            .filter(|((shelf, _), stored)| *shelf == Shelf::Home(partition) && stored.tombstone)
            .map(|((_, key), stored)| (key.clone(), version_digest(&stored.version)))
            .collect()
    }

    /// Queues a write (`None`: a removal); returns whether it is the first pending
    /// one (a sync must then be scheduled).
    pub fn write(
        &mut self,
        shard: usize,
        op: StorageOpId,
        shelf: Shelf,
        key: Vec<u8>,
        stored: Option<StoredVersions>,
    ) -> bool {
        self.pending.push((shard, op, (shelf, key), stored));
        self.pending.len() == 1
    }

    /// Makes every pending write durable, in order; returns their shards and op ids,
    /// and the hints among them: (target, key, record). (Shards own disjoint
    /// partitions, so their keys never collide.)
    pub fn sync(&mut self) -> (Vec<(usize, StorageOpId)>, Vec<SyncedHint>) {
        let mut done = Vec::with_capacity(self.pending.len());
        let mut hints = Vec::new();
        for (shard, op, at, stored) in self.pending.drain(..) {
            self.lost.remove(&at);
            // A newer record shadows a collected one for good.
            self.collected.remove(&at);
            if let (Shelf::Hints { target }, Some(stored)) = (at.0, &stored) {
                hints.push((target, at.1.clone(), stored.clone()));
            }
            match stored {
                Some(stored) => self.durable.insert(at, stored),
                None => self.durable.remove(&at),
            };
            done.push((shard, op));
        }
        (done, hints)
    }

    /// A crash: pending writes are gone.
    pub fn crash(&mut self) -> usize {
        let lost = self.pending.len();
        self.pending.clear();
        // Collection is not durable: collected tombstones are back.
        let collected = std::mem::take(&mut self.collected);
        self.durable.extend(collected);
        lost
    }

    /// The durable record of `key` in its home partition.
    pub fn durable_home(&self, key: &[u8]) -> Option<&StoredVersions> {
        self.durable
            .iter()
            .find(|((shelf, k), _)| matches!(shelf, Shelf::Home(_)) && k == key)
            .map(|(_, stored)| stored)
    }

    /// Every durable home record: its partition, key and version digest (what the
    /// engine's index lists, lost records left out).
    pub fn home_digests(&self) -> Vec<(PartitionId, Vec<u8>, u32)> {
        self.durable
            .iter()
            .filter_map(|((shelf, key), stored)| match shelf {
                Shelf::Home(p) => Some((*p, key.clone(), version_digest(&stored.version))),
                Shelf::Hints { .. } => None,
            })
            .collect()
    }

    /// The Merkle tree of every home partition with a durable record, built from
    /// scratch as the server builds them from the store's index.
    pub fn home_trees(&self) -> BTreeMap<PartitionId, MerkleTree> {
        let mut trees: BTreeMap<PartitionId, MerkleTree> = BTreeMap::new();
        for (partition, key, digest) in self.home_digests() {
            trees
                .entry(partition)
                .or_default()
                .update(&key, None, Some(digest));
        }
        trees
    }

    /// The durable hint copies of `key`, for any target.
    pub fn durable_hints(&self, key: &[u8]) -> Vec<&StoredVersions> {
        self.durable
            .iter()
            .filter(|((shelf, k), _)| matches!(shelf, Shelf::Hints { .. }) && k == key)
            .map(|(_, stored)| stored)
            .collect()
    }

    /// Every durable hint: its target, key and size (as the engine's recovery lists
    /// the hint shelves for the node at start).
    pub fn hints(&self) -> Vec<(NodeId, Vec<u8>, u64)> {
        self.durable
            .iter()
            .filter_map(|((shelf, key), stored)| match shelf {
                Shelf::Hints { target } => {
                    let bytes = (key.len() + stored.version.len() + stored.value.len()) as u64;
                    Some((*target, key.clone(), bytes))
                }
                Shelf::Home(_) => None,
            })
            .collect()
    }

    pub fn pending_writes(&self) -> usize {
        self.pending.len()
    }
}
