//! A node's simulated storage: honest about durability, like foundationdb's
//! AsyncFileNonDurable. A write is pending until the next sync (which groups every
//! write pending at that moment, like the engine's group commit); its completion is
//! delivered only then. A crash loses every pending write.

use std::collections::{BTreeMap, BTreeSet};

use ringkv_cluster::{StorageOpId, StoredRead, StoredVersions};

#[derive(Default)]
pub struct Disk {
    durable: BTreeMap<Vec<u8>, StoredVersions>,
    /// Pending writes: the shard that issued each, its op, the key and the record.
    pending: Vec<(usize, StorageOpId, Vec<u8>, StoredVersions)>,
    /// Keys whose record failed its checksum: they read as lost until rewritten, as
    /// the engine's `Lost` markers do.
    lost: BTreeSet<Vec<u8>>,
}

impl Disk {
    /// What a read sees: the newest pending write of the key (the page cache), else
    /// the durable record.
    pub fn read(&self, key: &[u8]) -> StoredRead {
        let pending = self.pending.iter().rev().find(|(_, _, k, _)| k == key);
        match pending {
            Some((_, _, _, stored)) => StoredRead::Found(stored.clone()),
            None if self.lost.contains(key) => StoredRead::Lost,
            None => match self.durable.get(key) {
                Some(stored) => StoredRead::Found(stored.clone()),
                None => StoredRead::Absent,
            },
        }
    }

    /// The durable record of `key` fails its checksum; returns whether there was one.
    pub fn lose(&mut self, key: &[u8]) -> bool {
        let had = self.durable.remove(key).is_some();
        if had {
            self.lost.insert(key.to_vec());
        }
        had
    }

    /// The disk is replaced: nothing durable is left.
    pub fn wipe(&mut self) {
        self.durable.clear();
        self.lost.clear();
        self.pending.clear();
    }

    /// Queues a write; returns whether it is the first pending one (a sync must then
    /// be scheduled).
    pub fn write(
        &mut self,
        shard: usize,
        op: StorageOpId,
        key: Vec<u8>,
        stored: StoredVersions,
    ) -> bool {
        self.pending.push((shard, op, key, stored));
        self.pending.len() == 1
    }

    /// Makes every pending write durable, in order; returns their shards and op ids.
    /// (Shards own disjoint partitions, so their keys never collide.)
    pub fn sync(&mut self) -> Vec<(usize, StorageOpId)> {
        let mut done = Vec::with_capacity(self.pending.len());
        for (shard, op, key, stored) in self.pending.drain(..) {
            self.lost.remove(&key);
            self.durable.insert(key, stored);
            done.push((shard, op));
        }
        done
    }

    /// A crash: pending writes are gone.
    pub fn crash(&mut self) -> usize {
        let lost = self.pending.len();
        self.pending.clear();
        lost
    }

    pub fn durable(&self, key: &[u8]) -> Option<&StoredVersions> {
        self.durable.get(key)
    }

    pub fn pending_writes(&self) -> usize {
        self.pending.len()
    }
}
