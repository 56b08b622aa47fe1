//! The in-memory index: for each partition, key -> where its newest record lives.
//!
//! Memory is the constraint (hundreds of millions of keys per node), so an entry is a
//! 20-byte `Slot` in a vector indexed by a `hashbrown::HashTable` of positions, and key
//! bytes live in a
//! per-partition arena of large chunks behind a 1-3 byte length prefix, rather than one
//! heap allocation per key (which would cost 16-32 bytes of allocator overhead alone).
//! `Index::memory_bytes` reports what it really uses; `ringkv bench engine` prints it
//! per key.

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
    pub version_digest: u32,
}

const TOMBSTONE_BIT: u32 = 1 << 31;
const LOST_BIT: u32 = 1 << 30;
const LEN_MASK: u32 = LOST_BIT - 1;

#[derive(Clone, Copy)]
struct Slot {
    key_ref: u32,
    file: u32,
    offset: u32,
    /// Record length in the low 30 bits (records are far below 1 GiB), then the lost
    /// and tombstone flags.
    len_and_tombstone: u32,
    version_digest: u32,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 20);

impl Slot {
    fn entry(&self) -> Entry {
        Entry {
            location: Location {
                file: self.file,
                offset: self.offset,
                len: self.len_and_tombstone & LEN_MASK,
            },
            tombstone: self.len_and_tombstone & TOMBSTONE_BIT != 0,
            lost: self.len_and_tombstone & LOST_BIT != 0,
            version_digest: self.version_digest,
        }
    }

    fn set(&mut self, entry: Entry) {
        assert!(
            entry.location.len & !LEN_MASK == 0,
            "record length over 1 GiB"
        );
        self.file = entry.location.file;
        self.offset = entry.location.offset;
        self.len_and_tombstone = entry.location.len
            | if entry.tombstone { TOMBSTONE_BIT } else { 0 }
            | if entry.lost { LOST_BIT } else { 0 };
        self.version_digest = entry.version_digest;
    }
}

/// Key bytes, each behind a LEB128 length, in chunks of at most `1 << CHUNK_BITS` bytes.
/// A key reference is `chunk << CHUNK_BITS | offset`: an offset, not a pointer, so the
/// last chunk may be reallocated as it grows. It grows by a quarter at a time
/// (`reserve_exact`) rather than doubling, which would leave up to half of it unused.
#[derive(Default)]
struct KeyArena {
    chunks: Vec<Vec<u8>>,
}

const CHUNK_BITS: u32 = 18;
const CHUNK_MAX: usize = 1 << CHUNK_BITS;
const FIRST_CHUNK: usize = 256;

impl KeyArena {
    fn push(&mut self, key: &[u8]) -> u32 {
        let mut prefix = [0u8; 3];
        let prefix_len = leb128(key.len(), &mut prefix);
        let need = prefix_len + key.len();
        assert!(need <= CHUNK_MAX, "key longer than an arena chunk");
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
            chunk.reserve_exact(grown.min(CHUNK_MAX - chunk.len()));
        }
        let offset = chunk.len();
        chunk.extend_from_slice(&prefix[..prefix_len]);
        chunk.extend_from_slice(key);
        ((chunk_no as u32) << CHUNK_BITS) | offset as u32
    }

    fn key(&self, key_ref: u32) -> &[u8] {
        let chunk = &self.chunks[(key_ref >> CHUNK_BITS) as usize];
        let mut at = (key_ref & ((1 << CHUNK_BITS) - 1)) as usize;
        let mut len = 0usize;
        let mut shift = 0;
        loop {
            let byte = chunk[at];
            at += 1;
            len |= ((byte & 0x7f) as usize) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        &chunk[at..at + len]
    }

    fn memory_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.capacity()).sum::<usize>()
            + self.chunks.capacity() * std::mem::size_of::<Vec<u8>>()
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
///
/// Slots live in a vector grown by a quarter at a time; the hash table holds only their
/// 4-byte positions. A table of whole slots would cost 21 bytes per bucket, and hash
/// tables double, leaving 21 to 48 bytes per key; this way the doubling applies to 5
/// bytes per bucket and the slot vector wastes at most a quarter of 20.
#[derive(Default)]
pub struct PartitionIndex {
    table: HashTable<u32>,
    slots: Vec<Slot>,
    arena: KeyArena,
}

impl PartitionIndex {
    fn find(&self, key: &[u8]) -> Option<usize> {
        let (slots, arena) = (&self.slots, &self.arena);
        self.table
            .find(hash(key), |&i| arena.key(slots[i as usize].key_ref) == key)
            .map(|&i| i as usize)
    }

    pub fn get(&self, key: &[u8]) -> Option<Entry> {
        self.find(key).map(|i| self.slots[i].entry())
    }

    /// Points `key` at `entry`; returns what it pointed at before.
    pub fn insert(&mut self, key: &[u8], entry: Entry) -> Option<Entry> {
        let (slots, arena) = (&self.slots, &self.arena);
        let found = self.table.entry(
            hash(key),
            |&i| arena.key(slots[i as usize].key_ref) == key,
            |&i| hash(arena.key(slots[i as usize].key_ref)),
        );
        match found {
            TableEntry::Occupied(occupied) => {
                let slot = &mut self.slots[*occupied.get() as usize];
                let old = slot.entry();
                slot.set(entry);
                Some(old)
            }
            TableEntry::Vacant(vacant) => {
                let position =
                    u32::try_from(self.slots.len()).expect("over 4 billion keys in one partition");
                vacant.insert(position);
                let mut slot = Slot {
                    key_ref: self.arena.push(key),
                    file: 0,
                    offset: 0,
                    len_and_tombstone: 0,
                    version_digest: 0,
                };
                slot.set(entry);
                if self.slots.len() == self.slots.capacity() {
                    self.slots.reserve_exact((self.slots.len() / 4).max(16));
                }
                self.slots.push(slot);
                None
            }
        }
    }

    /// Moves `key` from `from` to `to` only if it still points at `from`; `lost` marks
    /// the moved entry as lost (its record was corrupt and a marker replaces it).
    pub fn relocate(&mut self, key: &[u8], from: Location, to: Location, lost: bool) -> bool {
        let Some(i) = self.find(key) else {
            return false;
        };
        let slot = &mut self.slots[i];
        let mut entry = slot.entry();
        if entry.location != from {
            return false;
        }
        entry.location = to;
        if lost {
            entry = Entry {
                tombstone: false,
                lost: true,
                version_digest: 0,
                ..entry
            };
        }
        slot.set(entry);
        true
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Every key and entry, in insertion order (deterministic).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], Entry)> {
        self.slots
            .iter()
            .map(|s| (self.arena.key(s.key_ref), s.entry()))
    }

    fn memory_bytes(&self) -> usize {
        self.table.allocation_size()
            + self.slots.capacity() * std::mem::size_of::<Slot>()
            + self.arena.memory_bytes()
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
    ) -> bool {
        self.partitions
            .get_mut(&partition)
            .is_some_and(|p| p.relocate(key, from, to, lost))
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
        }
    }

    proptest! {
        #[test]
        fn behaves_like_a_map(ops in prop::collection::vec(
            (0u32..3, prop::collection::vec(any::<u8>(), 0..300), any::<u32>(), any::<bool>()), 1..400)
        ) {
            let mut index = Index::default();
            let mut model = BTreeMap::new();
            for (partition, key, offset, tombstone) in ops {
                let e = entry(1, offset, tombstone);
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
        assert!(!index.relocate(
            0,
            b"k",
            Location {
                file: 1,
                offset: 99,
                len: 40
            },
            to,
            false
        ));
        assert!(index.relocate(0, b"k", entry(1, 10, false).location, to, false));
        assert_eq!(index.get(0, b"k").unwrap().location, to);
        assert!(!index.get(0, b"k").unwrap().lost);
        assert!(!index.relocate(0, b"missing", to, to, false));
        assert!(index.relocate(0, b"k", to, to, true));
        assert!(index.get(0, b"k").unwrap().lost);
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
