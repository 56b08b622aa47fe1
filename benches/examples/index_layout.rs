//! A proposal for the engine's index layout, measured next to the engine's own index.
//!
//! The engine (ringkv_engine::index) keeps a `HashTable<u32>` of positions into a vector
//! of 20-byte slots, each pointing at its key in an arena: a lookup touches the table's
//! control bytes, the position, the slot and the arena (four dependent cache misses once
//! the index outgrows the CPU caches). Here the 16-byte entry sits right after its key in
//! the arena and the table holds arena references: three misses, no slot vector, and
//! 64 KiB arena chunks so the growing chunk's slack stays small.
//!
//! Run: cargo run --release -p ringkv-bench --example index_layout -- [keys]

use std::hint::black_box;
use std::time::Instant;

mod proposal {
    use hashbrown::HashMap;
    use hashbrown::hash_table::{Entry as TableEntry, HashTable};
    use xxhash_rust::xxh3::xxh3_64;

    use ringkv_engine::index::{Entry, Location};

    const TOMBSTONE_BIT: u32 = 1 << 31;
    const CHUNK_BITS: u32 = 16;
    const CHUNK_MAX: usize = 1 << CHUNK_BITS;
    const FIRST_CHUNK: usize = 256;
    const ENTRY: usize = 16;

    #[derive(Default)]
    struct Arena {
        chunks: Vec<Vec<u8>>,
    }

    impl Arena {
        fn push(&mut self, key: &[u8], entry: Entry) -> u32 {
            let mut prefix = [0u8; 3];
            let plen = leb128(key.len(), &mut prefix);
            let need = plen + key.len() + ENTRY;
            if self
                .chunks
                .last()
                .is_none_or(|c| c.len() + need > CHUNK_MAX)
            {
                self.chunks.push(Vec::new());
            }
            let no = self.chunks.len() - 1;
            let chunk = self.chunks.last_mut().unwrap();
            if chunk.capacity() - chunk.len() < need {
                let grown = (chunk.len() / 4).max(FIRST_CHUNK).max(need);
                chunk.reserve_exact(grown.min(CHUNK_MAX - chunk.len()));
            }
            let off = chunk.len();
            chunk.extend_from_slice(&prefix[..plen]);
            chunk.extend_from_slice(key);
            chunk.extend_from_slice(&encode(entry));
            ((no as u32) << CHUNK_BITS) | off as u32
        }
        #[inline]
        fn locate(&self, r: u32) -> (&Vec<u8>, usize, usize) {
            let chunk = &self.chunks[(r >> CHUNK_BITS) as usize];
            let mut at = (r & ((1 << CHUNK_BITS) - 1)) as usize;
            let (mut len, mut shift) = (0usize, 0);
            loop {
                let b = chunk[at];
                at += 1;
                len |= ((b & 0x7f) as usize) << shift;
                if b & 0x80 == 0 {
                    break;
                }
                shift += 7;
            }
            (chunk, at, len)
        }
        #[inline]
        fn key(&self, r: u32) -> &[u8] {
            let (c, at, len) = self.locate(r);
            &c[at..at + len]
        }
        #[inline]
        fn entry(&self, r: u32) -> Entry {
            let (c, at, len) = self.locate(r);
            decode(&c[at + len..at + len + ENTRY])
        }
        fn set(&mut self, r: u32, e: Entry) {
            let no = (r >> CHUNK_BITS) as usize;
            let (_, at, len) = self.locate(r);
            self.chunks[no][at + len..at + len + ENTRY].copy_from_slice(&encode(e));
        }
        fn memory_bytes(&self) -> usize {
            self.chunks.iter().map(|c| c.capacity()).sum::<usize>() + self.chunks.capacity() * 24
        }
    }

    fn encode(e: Entry) -> [u8; ENTRY] {
        let mut b = [0u8; ENTRY];
        b[0..4].copy_from_slice(&e.location.file.to_le_bytes());
        b[4..8].copy_from_slice(&e.location.offset.to_le_bytes());
        let lt = e.location.len | if e.tombstone { TOMBSTONE_BIT } else { 0 };
        b[8..12].copy_from_slice(&lt.to_le_bytes());
        b[12..16].copy_from_slice(&e.version_digest.to_le_bytes());
        b
    }
    fn decode(b: &[u8]) -> Entry {
        let u = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        Entry {
            location: Location {
                file: u(0),
                offset: u(4),
                len: u(8) & !TOMBSTONE_BIT,
            },
            tombstone: u(8) & TOMBSTONE_BIT != 0,
            lost: false,
            cache_slot: None,
            version_digest: u(12),
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
        unreachable!()
    }
    fn hash(k: &[u8]) -> u64 {
        xxh3_64(k)
    }

    #[derive(Default)]
    pub struct PartitionIndex {
        table: HashTable<u32>,
        arena: Arena,
    }

    impl PartitionIndex {
        pub fn get(&self, key: &[u8]) -> Option<Entry> {
            let a = &self.arena;
            self.table
                .find(hash(key), |&r| a.key(r) == key)
                .map(|&r| a.entry(r))
        }
        pub fn insert(&mut self, key: &[u8], entry: Entry) -> Option<Entry> {
            let a = &self.arena;
            match self
                .table
                .entry(hash(key), |&r| a.key(r) == key, |&r| hash(a.key(r)))
            {
                TableEntry::Occupied(o) => {
                    let r = *o.get();
                    let old = self.arena.entry(r);
                    self.arena.set(r, entry);
                    Some(old)
                }
                TableEntry::Vacant(_) => {
                    // The probe's closures borrow the arena: push the key once the vacant
                    // entry is gone, then insert (a second probe, on inserts only).
                    let r = self.arena.push(key, entry);
                    let a = &self.arena;
                    self.table.insert_unique(hash(key), r, |&r| hash(a.key(r)));
                    None
                }
            }
        }
        fn memory_bytes(&self) -> usize {
            self.table.allocation_size() + self.arena.memory_bytes()
        }
        fn key_bytes(&self) -> usize {
            self.table.iter().map(|&r| self.arena.key(r).len()).sum()
        }
    }

    #[derive(Default)]
    pub struct Index {
        partitions: HashMap<u32, PartitionIndex>,
    }
    impl Index {
        pub fn get(&self, p: u32, key: &[u8]) -> Option<Entry> {
            self.partitions.get(&p)?.get(key)
        }
        pub fn insert(&mut self, p: u32, key: &[u8], e: Entry) -> Option<Entry> {
            self.partitions.entry(p).or_default().insert(key, e)
        }
        pub fn memory_bytes(&self) -> usize {
            self.partitions.allocation_size()
                + self
                    .partitions
                    .values()
                    .map(|p| p.memory_bytes())
                    .sum::<usize>()
        }
        pub fn key_bytes(&self) -> usize {
            self.partitions.values().map(|p| p.key_bytes()).sum()
        }
    }
}

/// A fixed-width 20-byte key, as `ringkv bench engine` uses.
fn key(i: u64) -> [u8; 20] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut k = *b"key-0000000000000000";
    for (n, byte) in k[4..].iter_mut().enumerate() {
        *byte = HEX[((i >> (60 - 4 * n)) & 0xf) as usize];
    }
    k
}

fn entry(i: u64) -> ringkv_engine::index::Entry {
    ringkv_engine::index::Entry {
        location: ringkv_engine::index::Location {
            file: 1,
            offset: i as u32,
            len: 150,
        },
        tombstone: false,
        lost: false,
        cache_slot: None,
        version_digest: i as u32,
    }
}

/// Loads `keys` keys over 64 partitions, sampling bytes per key beyond the key bytes at
/// 20 sizes, then times random lookups. Prints one line.
macro_rules! measure {
    ($name:expr, $index:expr, $keys:expr) => {{
        let keys: u64 = $keys;
        let mut index = $index;
        let mut samples = Vec::new();
        for i in 0..keys {
            index.insert((i % 64) as u32, &key(i), entry(i));
            if (i + 1) % (keys / 20).max(1) == 0 {
                let beyond = index.memory_bytes() - index.key_bytes();
                samples.push(beyond as f64 / (i + 1) as f64);
            }
        }
        let lookups = 2_000_000u64;
        let mut rng = fastrand::Rng::with_seed(9);
        let started = Instant::now();
        for _ in 0..lookups {
            let i = rng.u64(..keys);
            black_box(index.get((i % 64) as u32, &key(i)));
        }
        let ns = started.elapsed().as_nanos() as f64 / lookups as f64;
        let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
        let max = samples.iter().copied().fold(0.0, f64::max);
        println!(
            "{:<9} {keys:>9} keys: random get {ns:6.1} ns; index bytes/key beyond key bytes {:5.1} at the end, {min:5.1}..{max:5.1} over 20 sizes",
            $name,
            samples.last().copied().unwrap_or(0.0),
        );
    }};
}

fn main() {
    let keys: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("keys: a number"))
        .unwrap_or(1_000_000);
    for _ in 0..2 {
        measure!("engine", ringkv_engine::index::Index::default(), keys);
        measure!("proposal", proposal::Index::default(), keys);
    }
}
