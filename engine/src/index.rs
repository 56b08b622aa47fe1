//! The in-memory index: for each partition, key -> where its newest record lives.
//!
//! Memory is the constraint (hundreds of millions of keys per node), so a key and its
//! 16-byte entry sit side by side in a per-partition arena of 64 KiB chunks (behind a
//! 1-3 byte LEB128 length), and the partition's `hashbrown::HashTable<u32>` holds only
//! arena references: no heap allocation per key, no slot vector, and a lookup touches
//! the table's control bytes, the 4-byte reference and the arena (one dependent cache
//! miss fewer than a table of positions into a slot vector). 64 KiB chunks keep the
//! growing chunk's slack small. `Index::memory_bytes` reports what it really uses;
//! `ringkv bench engine` prints it per key.
//!
//! Entries are updated in place. A key removed alone (a collected tombstone) leaves its
//! bytes in the arena marked dead; a partition whose arena is mostly dead is rebuilt.

use hashbrown::HashMap;
use hashbrown::hash_table::{Entry as TableEntry, HashTable};
use xxhash_rust::xxh3::xxh3_64;

/// Where a record lives: segment file number, byte offset, record length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    pub file: u32,
    pub offset: u32,
    pub len: u32,
}

/// What the index knows about a key without reading its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub location: Location,
    pub tombstone: bool,
    /// The key's newest record was lost to corruption (a `Kind::Lost` marker): it reads
    /// as missing here until a replica's copy is written again.
    pub lost: bool,
    /// Meaningful only while `cache_slot` is None: a cached entry lends these four
    /// bytes to the slot number, and the cache keeps the digest (`Inner::digest`).
    pub version_digest: u32,
    /// The record cache slot holding this record, if it is cached.
    pub cache_slot: Option<u32>,
}

/// Bytes of an entry in the arena: file, offset, length and flags, version digest.
const ENTRY_LEN: usize = 16;
const TOMBSTONE_BIT: u32 = 1 << 31;
const LOST_BIT: u32 = 1 << 30;
/// The key was removed; its bytes stay until the partition is rebuilt.
const DEAD_BIT: u32 = 1 << 29;
/// The record is cached: the digest word holds the cache slot number.
const CACHED_BIT: u32 = 1 << 28;
const LEN_MASK: u32 = CACHED_BIT - 1;

fn encode(entry: Entry, dead: bool) -> [u8; ENTRY_LEN] {
    assert!(
        entry.location.len & !LEN_MASK == 0,
        "record length over 256 MiB"
    );
    let flags = if entry.tombstone { TOMBSTONE_BIT } else { 0 }
        | if entry.lost { LOST_BIT } else { 0 }
        | if dead { DEAD_BIT } else { 0 }
        | if entry.cache_slot.is_some() {
            CACHED_BIT
        } else {
            0
        };
    let last = entry.cache_slot.unwrap_or(entry.version_digest);
    let mut b = [0u8; ENTRY_LEN];
    b[0..4].copy_from_slice(&entry.location.file.to_le_bytes());
    b[4..8].copy_from_slice(&entry.location.offset.to_le_bytes());
    b[8..12].copy_from_slice(&(entry.location.len | flags).to_le_bytes());
    b[12..16].copy_from_slice(&last.to_le_bytes());
    b
}

/// The entry in `b`, and whether it is dead.
fn decode(b: &[u8]) -> (Entry, bool) {
    let u = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let len_and_flags = u(8);
    let entry = Entry {
        location: Location {
            file: u(0),
            offset: u(4),
            len: len_and_flags & LEN_MASK,
        },
        tombstone: len_and_flags & TOMBSTONE_BIT != 0,
        lost: len_and_flags & LOST_BIT != 0,
        version_digest: 0,
        cache_slot: None,
    };
    let entry = if len_and_flags & CACHED_BIT != 0 {
        Entry {
            cache_slot: Some(u(12)),
            ..entry
        }
    } else {
        Entry {
            version_digest: u(12),
            ..entry
        }
    };
    (entry, len_and_flags & DEAD_BIT != 0)
}

/// Keys and entries, each as LEB128 key length, key bytes, entry, in chunks of at most
/// `CHUNK_MAX` bytes (a key too long for one gets a chunk of its own). A reference is
/// `chunk << CHUNK_BITS | offset`: an offset, not a pointer, so the last chunk may be
/// reallocated as it grows. It grows by a quarter at a time (`reserve_exact`) rather
/// than doubling, which would leave up to half of it unused.
#[derive(Default)]
struct Arena {
    chunks: Vec<Vec<u8>>,
}

const CHUNK_BITS: u32 = 16;
const CHUNK_MAX: usize = 1 << CHUNK_BITS;
const FIRST_CHUNK: usize = 256;

impl Arena {
    fn push(&mut self, key: &[u8], entry: Entry) -> u32 {
        let mut prefix = [0u8; 3];
        let prefix_len = leb128(key.len(), &mut prefix);
        let need = prefix_len + key.len() + ENTRY_LEN;
        let fits_in_last = self
            .chunks
            .last()
            .is_some_and(|c| c.len() + need <= CHUNK_MAX);
        if !fits_in_last {
            assert!(self.chunks.len() < 1 << (32 - CHUNK_BITS), "key arena full");
            self.chunks.push(Vec::new());
        }
        let chunk_no = self.chunks.len() - 1;
        let chunk = self.chunks.last_mut().expect("a chunk was just ensured");
        if chunk.capacity() - chunk.len() < need {
            let grown = (chunk.len() / 4).max(FIRST_CHUNK).max(need);
            chunk.reserve_exact(grown.min(CHUNK_MAX.max(need) - chunk.len()));
        }
        let offset = chunk.len();
        chunk.extend_from_slice(&prefix[..prefix_len]);
        chunk.extend_from_slice(key);
        chunk.extend_from_slice(&encode(entry, false));
        ((chunk_no as u32) << CHUNK_BITS) | offset as u32
    }

    /// The chunk, and where the key of `r` starts in it and how long it is.
    #[inline]
    fn locate(&self, r: u32) -> (&[u8], usize, usize) {
        let chunk = &self.chunks[(r >> CHUNK_BITS) as usize];
        let (at, len) = key_at(chunk, (r & ((1 << CHUNK_BITS) - 1)) as usize);
        (chunk, at, len)
    }

    #[inline]
    fn key(&self, r: u32) -> &[u8] {
        let (chunk, at, len) = self.locate(r);
        &chunk[at..at + len]
    }

    #[inline]
    fn entry(&self, r: u32) -> Entry {
        let (chunk, at, len) = self.locate(r);
        decode(&chunk[at + len..at + len + ENTRY_LEN]).0
    }

    fn set(&mut self, r: u32, entry: Entry, dead: bool) {
        let (_, at, len) = self.locate(r);
        let chunk = &mut self.chunks[(r >> CHUNK_BITS) as usize];
        chunk[at + len..at + len + ENTRY_LEN].copy_from_slice(&encode(entry, dead));
    }

    /// Every key and entry in insertion order, dead ones included (flagged).
    fn iter(&self) -> impl Iterator<Item = (&[u8], Entry, bool)> {
        self.chunks.iter().flat_map(|chunk| {
            let mut at = 0;
            std::iter::from_fn(move || {
                if at >= chunk.len() {
                    return None;
                }
                let len;
                (at, len) = key_at(chunk, at);
                let key = &chunk[at..at + len];
                let (entry, dead) = decode(&chunk[at + len..at + len + ENTRY_LEN]);
                at += len + ENTRY_LEN;
                Some((key, entry, dead))
            })
        })
    }

    fn memory_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.capacity()).sum::<usize>()
            + self.chunks.capacity() * std::mem::size_of::<Vec<u8>>()
    }
}

/// Reads the LEB128 key length at `at`: where the key starts, and its length.
#[inline]
fn key_at(chunk: &[u8], mut at: usize) -> (usize, usize) {
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let byte = chunk[at];
        at += 1;
        len |= ((byte & 0x7f) as usize) << shift;
        if byte & 0x80 == 0 {
            return (at, len);
        }
        shift += 7;
    }
}

fn leb128(mut n: usize, out: &mut [u8; 3]) -> usize {
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            return i + 1;
        }
        *byte |= 0x80;
    }
    unreachable!("keys are at most 64 KiB, which fits in three LEB128 bytes")
}

fn hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// One partition's keys.
#[derive(Default)]
pub struct PartitionIndex {
    table: HashTable<u32>,
    arena: Arena,
    /// Arena bytes of removed keys, reclaimed by a rebuild.
    dead_bytes: usize,
    live_bytes: usize,
}

impl PartitionIndex {
    fn find(&self, key: &[u8]) -> Option<u32> {
        let arena = &self.arena;
        self.table
            .find(hash(key), |&r| arena.key(r) == key)
            .copied()
    }

    pub fn get(&self, key: &[u8]) -> Option<Entry> {
        self.find(key).map(|r| self.arena.entry(r))
    }

    /// Points `key` at `entry`; returns what it pointed at before.
    pub fn insert(&mut self, key: &[u8], entry: Entry) -> Option<Entry> {
        let arena = &self.arena;
        let found = self
            .table
            .entry(hash(key), |&r| arena.key(r) == key, |&r| hash(arena.key(r)));
        match found {
            TableEntry::Occupied(occupied) => {
                let r = *occupied.get();
                let old = self.arena.entry(r);
                self.arena.set(r, entry, false);
                Some(old)
            }
            TableEntry::Vacant(_) => {
                // The probe's closures borrow the arena: push the key once the vacant
                // entry is gone, then insert (a second probe, on inserts only).
                let r = self.arena.push(key, entry);
                self.live_bytes += key.len() + ENTRY_LEN + 1;
                let arena = &self.arena;
                self.table
                    .insert_unique(hash(key), r, |&r| hash(arena.key(r)));
                None
            }
        }
    }

    /// Moves `key` from `from` to `to` only if it still points at `from`; `lost` marks
    /// the moved entry as lost (its record was corrupt and a marker replaces it; it is
    /// no longer cached). Returns the entry as it was before, if it moved.
    pub fn relocate(
        &mut self,
        key: &[u8],
        from: Location,
        to: Location,
        lost: bool,
    ) -> Option<Entry> {
        let r = self.find(key)?;
        let before = self.arena.entry(r);
        if before.location != from {
            return None;
        }
        let mut entry = before;
        entry.location = to;
        if lost {
            entry = Entry {
                tombstone: false,
                lost: true,
                version_digest: 0,
                cache_slot: None,
                ..entry
            };
        }
        self.arena.set(r, entry, false);
        Some(before)
    }

    /// Marks `key` cached in `slot` if it still points at `location` and is not cached
    /// yet; returns the version digest the entry gives up for the slot number.
    pub fn set_cached(&mut self, key: &[u8], location: Location, slot: u32) -> Option<u32> {
        let r = self.find(key)?;
        let entry = self.arena.entry(r);
        if entry.location != location || entry.cache_slot.is_some() {
            return None;
        }
        self.arena.set(
            r,
            Entry {
                cache_slot: Some(slot),
                ..entry
            },
            false,
        );
        Some(entry.version_digest)
    }

    /// Takes `key` out of the cache if it is cached in `slot`, restoring its digest.
    pub fn uncache(&mut self, key: &[u8], slot: u32, digest: u32) {
        let Some(r) = self.find(key) else {
            return;
        };
        let entry = self.arena.entry(r);
        if entry.cache_slot == Some(slot) {
            let entry = Entry {
                cache_slot: None,
                version_digest: digest,
                ..entry
            };
            self.arena.set(r, entry, false);
        }
    }

    /// Forgets `key` if its entry is still `expected`; returns whether it did.
    pub fn remove_if(&mut self, key: &[u8], expected: Entry) -> bool {
        let arena = &self.arena;
        let Ok(found) = self.table.find_entry(hash(key), |&r| arena.key(r) == key) else {
            return false;
        };
        let r = *found.get();
        if self.arena.entry(r) != expected {
            return false;
        }
        found.remove();
        self.arena.set(r, expected, true);
        let bytes = key.len() + ENTRY_LEN + 1;
        self.dead_bytes += bytes;
        self.live_bytes -= bytes;
        if self.dead_bytes > self.live_bytes {
            self.rebuild();
        }
        true
    }

    /// Copies the live keys into a fresh arena and table (in the same order).
    fn rebuild(&mut self) {
        let mut fresh = PartitionIndex::default();
        for (key, entry, dead) in self.arena.iter() {
            if !dead {
                fresh.insert(key, entry);
            }
        }
        *self = fresh;
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Every key and entry, in insertion order (deterministic).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], Entry)> {
        self.arena
            .iter()
            .filter(|(_, _, dead)| !dead)
            .map(|(key, entry, _)| (key, entry))
    }

    fn memory_bytes(&self) -> usize {
        self.table.allocation_size() + self.arena.memory_bytes()
    }
}

/// Every partition of one shard.
#[derive(Default)]
pub struct Index {
    partitions: HashMap<u32, PartitionIndex>,
}

impl Index {
    pub fn get(&self, partition: u32, key: &[u8]) -> Option<Entry> {
        self.partitions.get(&partition)?.get(key)
    }

    pub fn insert(&mut self, partition: u32, key: &[u8], entry: Entry) -> Option<Entry> {
        self.partitions
            .entry(partition)
            .or_default()
            .insert(key, entry)
    }

    pub fn relocate(
        &mut self,
        partition: u32,
        key: &[u8],
        from: Location,
        to: Location,
        lost: bool,
    ) -> Option<Entry> {
        self.partitions
            .get_mut(&partition)?
            .relocate(key, from, to, lost)
    }

    pub fn set_cached(
        &mut self,
        partition: u32,
        key: &[u8],
        location: Location,
        slot: u32,
    ) -> Option<u32> {
        self.partitions
            .get_mut(&partition)?
            .set_cached(key, location, slot)
    }

    pub fn uncache(&mut self, partition: u32, key: &[u8], slot: u32, digest: u32) {
        if let Some(index) = self.partitions.get_mut(&partition) {
            index.uncache(key, slot, digest);
        }
    }

    /// Forgets `key` if its entry is still `expected` (see `PartitionIndex::remove_if`).
    pub fn remove_if(&mut self, partition: u32, key: &[u8], expected: Entry) -> bool {
        let Some(index) = self.partitions.get_mut(&partition) else {
            return false;
        };
        let removed = index.remove_if(key, expected);
        if index.is_empty() {
            self.partitions.remove(&partition);
        }
        removed
    }

    pub fn partition(&self, partition: u32) -> Option<&PartitionIndex> {
        self.partitions.get(&partition)
    }

    pub fn remove_partition(&mut self, partition: u32) -> Option<PartitionIndex> {
        self.partitions.remove(&partition)
    }

    /// Partition ids that hold at least one key, ascending.
    pub fn partition_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.partitions.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    pub fn len(&self) -> usize {
        self.partitions.values().map(PartitionIndex::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Heap bytes held by the index, key bytes included.
    pub fn memory_bytes(&self) -> usize {
        self.partitions.allocation_size()
            + self
                .partitions
                .values()
                .map(PartitionIndex::memory_bytes)
                .sum::<usize>()
    }

    /// Total length of every indexed key.
    pub fn key_bytes(&self) -> usize {
        self.partitions
            .values()
            .flat_map(|p| p.iter())
            .map(|(k, _)| k.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn entry(file: u32, offset: u32, tombstone: bool) -> Entry {
        Entry {
            location: Location {
                file,
                offset,
                len: 40,
            },
            tombstone,
            lost: false,
            version_digest: offset,
            cache_slot: None,
        }
    }

    proptest! {
        #[test]
        fn behaves_like_a_map(ops in prop::collection::vec(
            (0u32..3, prop::collection::vec(any::<u8>(), 0..300), any::<u32>(), 0u8..8), 1..400)
        ) {
            let mut index = Index::default();
            let mut model = BTreeMap::new();
            for (partition, key, offset, action) in ops {
                if action == 0 {
                    // Remove (only if the entry is what the caller expects).
                    let current = model.get(&(partition, key.clone())).copied();
                    let expected = current.unwrap_or(entry(9, 9, true));
                    let removed = index.remove_if(partition, &key, expected);
                    prop_assert_eq!(removed, current.is_some());
                    model.remove(&(partition, key.clone()));
                    prop_assert_eq!(index.get(partition, &key), None);
                    continue;
                }
                let e = entry(1, offset, action == 1);
                let old = index.insert(partition, &key, e);
                prop_assert_eq!(old, model.insert((partition, key.clone()), e));
                prop_assert_eq!(index.get(partition, &key), Some(e));
            }
            prop_assert_eq!(index.len(), model.len());
            for ((partition, key), e) in &model {
                prop_assert_eq!(index.get(*partition, key), Some(*e));
            }
            let mut listed: Vec<_> = index.partition_ids().into_iter()
                .flat_map(|p| index.partition(p).unwrap().iter()
                    .map(move |(k, e)| ((p, k.to_vec()), e)).collect::<Vec<_>>())
                .collect();
            listed.sort_by(|a, b| a.0.cmp(&b.0));
            prop_assert_eq!(listed, model.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn relocate_only_moves_the_expected_location() {
        let mut index = Index::default();
        index.insert(0, b"k", entry(1, 10, false));
        let to = Location {
            file: 2,
            offset: 0,
            len: 40,
        };
        assert!(
            index
                .relocate(
                    0,
                    b"k",
                    Location {
                        file: 1,
                        offset: 99,
                        len: 40
                    },
                    to,
                    false
                )
                .is_none()
        );
        assert!(
            index
                .relocate(0, b"k", entry(1, 10, false).location, to, false)
                .is_some()
        );
        assert_eq!(index.get(0, b"k").unwrap().location, to);
        assert!(!index.get(0, b"k").unwrap().lost);
        assert!(index.relocate(0, b"missing", to, to, false).is_none());
        assert!(index.relocate(0, b"k", to, to, true).is_some());
        assert!(index.get(0, b"k").unwrap().lost);
    }

    #[test]
    fn a_cached_entry_lends_its_digest_to_the_slot_number() {
        let mut index = Index::default();
        let e = entry(1, 10, false);
        index.insert(0, b"k", e);
        assert_eq!(
            index.set_cached(0, b"k", entry(1, 11, false).location, 7),
            None
        );
        assert_eq!(index.set_cached(0, b"k", e.location, 7), Some(10));
        let cached = index.get(0, b"k").unwrap();
        assert_eq!((cached.cache_slot, cached.location), (Some(7), e.location));
        assert_eq!(
            index.set_cached(0, b"k", e.location, 8),
            None,
            "already cached"
        );
        index.uncache(0, b"k", 8, 99);
        assert_eq!(
            index.get(0, b"k").unwrap().cache_slot,
            Some(7),
            "another slot"
        );
        index.uncache(0, b"k", 7, 10);
        assert_eq!(index.get(0, b"k").unwrap(), e);
    }

    #[test]
    fn remove_if_leaves_a_changed_entry_alone() {
        let mut index = Index::default();
        index.insert(0, b"k", entry(1, 10, true));
        assert!(!index.remove_if(0, b"k", entry(1, 11, true)));
        assert!(index.remove_if(0, b"k", entry(1, 10, true)));
        assert!(index.get(0, b"k").is_none());
        assert!(
            index.partition(0).is_none(),
            "an empty partition is dropped"
        );
    }

    #[test]
    fn a_mostly_removed_partition_is_rebuilt_in_order() {
        let mut index = Index::default();
        for i in 0..1000u32 {
            index.insert(0, &i.to_le_bytes(), entry(1, i, i % 3 == 0));
        }
        for i in (0..1000u32).filter(|i| i % 4 != 0) {
            assert!(index.remove_if(0, &i.to_le_bytes(), entry(1, i, i % 3 == 0)));
        }
        let listed: Vec<u32> = index
            .partition(0)
            .unwrap()
            .iter()
            .map(|(k, _)| u32::from_le_bytes(k.try_into().unwrap()))
            .collect();
        assert_eq!(listed, (0..1000).step_by(4).collect::<Vec<u32>>());
        let partition = index.partition(0).unwrap();
        assert!(partition.dead_bytes <= partition.live_bytes);
    }

    #[test]
    fn keys_of_every_length_up_to_the_limit_round_trip() {
        let mut index = Index::default();
        for len in [0, 1, 127, 128, 16383, 16384, crate::record::MAX_KEY_LEN] {
            let key = vec![len as u8; len];
            index.insert(9, &key, entry(1, len as u32, false));
            assert_eq!(index.get(9, &key).unwrap().location.offset, len as u32);
        }
    }
}
