//! A node's simulated storage: honest about durability, like foundationdb's
//! AsyncFileNonDurable. A write is pending until the next sync (which groups every
//! write pending at that moment, like the engine's group commit); its completion is
//! delivered only then. A crash loses every pending write.

use std::collections::BTreeMap;

use ringkv_cluster::{StorageOpId, StoredVersions};

#[derive(Default)]
pub struct Disk {
    durable: BTreeMap<Vec<u8>, StoredVersions>,
    pending: Vec<(StorageOpId, Vec<u8>, StoredVersions)>,
}

impl Disk {
    /// What a read sees: the newest pending write of the key (the page cache), else
    /// the durable record.
    pub fn read(&self, key: &[u8]) -> Option<StoredVersions> {
        self.pending
            .iter()
            .rev()
            .find(|(_, k, _)| k == key)
            .map(|(_, _, stored)| stored.clone())
            .or_else(|| self.durable.get(key).cloned())
    }

    /// Queues a write; returns whether it is the first pending one (a sync must then
    /// be scheduled).
    pub fn write(&mut self, op: StorageOpId, key: Vec<u8>, stored: StoredVersions) -> bool {
        self.pending.push((op, key, stored));
        self.pending.len() == 1
    }

    /// Makes every pending write durable, in order; returns their op ids.
    pub fn sync(&mut self) -> Vec<StorageOpId> {
        let mut done = Vec::with_capacity(self.pending.len());
        for (op, key, stored) in self.pending.drain(..) {
            self.durable.insert(key, stored);
            done.push(op);
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
