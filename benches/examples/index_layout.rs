//! The engine's index layout, measured: bytes per key beyond the key bytes while it
//! grows, and random lookups once it outgrows the CPU caches.
//!
//! The index keeps each key's 16-byte entry next to the key in a per-partition arena and
//! a `HashTable<u32>` of arena references (docs/architecture.md, "Index and cache").
//! This example first measured that layout as a proposal beside the engine's previous
//! one (a table of positions into a vector of 20-byte slots, one dependent cache miss
//! more); the engine adopted it, and the example now measures the engine alone.
//!
//! Run: cargo run --release -p ringkv-bench --example index_layout -- [keys]

use std::hint::black_box;
use std::time::Instant;

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
    }
}
