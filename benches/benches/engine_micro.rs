//! Micro-benchmarks of the engine's hot-path pieces: record framing and the index.
//! Run: cargo bench -p ringkv-bench --bench engine_micro

use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ringkv_engine::disk::SimDisk;
use ringkv_engine::index::{Entry, Index, Location};
use ringkv_engine::record::{Kind, checksum_ok, decode_header, encode};
use ringkv_engine::{Durability, Store, StoreConfig};

fn record_framing(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    let value = vec![7u8; 100];
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode 100 B value", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            encode(
                &mut out,
                Kind::Value,
                3,
                black_box(b"user:000042"),
                b"version-bytes",
                &value,
                SEED,
            );
        })
    });
    let mut encoded = Vec::new();
    encode(
        &mut encoded,
        Kind::Value,
        3,
        b"user:000042",
        b"version-bytes",
        &value,
        SEED,
    );
    group.bench_function("decode + verify 100 B value", |b| {
        b.iter(|| {
            let header = decode_header(black_box(&encoded), SEED).unwrap();
            assert!(checksum_ok(&encoded[..header.record_len()], SEED));
        })
    });
    group.finish();
}

/// A record's checksum seed: a segment salt combined with the record's offset.
const SEED: u64 = 0x5a17_0000_0000_1000;

fn index(c: &mut Criterion) {
    const KEYS: u32 = 100_000;
    let keys: Vec<Vec<u8>> = (0..KEYS)
        .map(|i| format!("key-{i:012}").into_bytes())
        .collect();
    let entry = |i: u32| Entry {
        location: Location {
            file: 1,
            offset: i * 64,
            len: 64,
        },
        tombstone: false,
        lost: false,
        cache_slot: None,
        version_digest: i,
    };
    let mut group = c.benchmark_group("index");
    group.throughput(Throughput::Elements(KEYS as u64));
    group.bench_function("insert 100k keys", |b| {
        b.iter(|| {
            let mut index = Index::default();
            for (i, key) in keys.iter().enumerate() {
                index.insert(i as u32 % 64, key, entry(i as u32));
            }
            index
        })
    });
    let mut index = Index::default();
    for (i, key) in keys.iter().enumerate() {
        index.insert(i as u32 % 64, key, entry(i as u32));
    }
    group.bench_function("get 100k keys", |b| {
        b.iter(|| {
            for (i, key) in keys.iter().enumerate() {
                black_box(index.get(i as u32 % 64, key));
            }
        })
    });
    group.finish();
}

/// A fixed-width 20-byte key built on the stack, so a lookup of a random key does not
/// also pay cache misses to fetch the key from a big vector.
fn hex_key(i: u64) -> [u8; 20] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut k = *b"key-0000000000000000";
    for (n, byte) in k[4..].iter_mut().enumerate() {
        *byte = HEX[((i >> (60 - 4 * n)) & 0xf) as usize];
    }
    k
}

/// Index lookups of random keys among a million: the tables no longer fit the CPU caches,
/// which is what a loaded shard sees.
fn index_large(c: &mut Criterion) {
    const KEYS: u64 = 1_000_000;
    let mut index = Index::default();
    for i in 0..KEYS {
        let entry = Entry {
            location: Location {
                file: 1,
                offset: i as u32,
                len: 64,
            },
            tombstone: false,
            lost: false,
            cache_slot: None,
            version_digest: 0,
        };
        index.insert(i as u32 % 64, &hex_key(i), entry);
    }
    let mut group = c.benchmark_group("index");
    group.throughput(Throughput::Elements(1));
    group.bench_function("get 1 random key of 1M", |b| {
        let mut rng = fastrand::Rng::with_seed(3);
        b.iter(|| {
            let i = rng.u64(..KEYS);
            black_box(index.get(i as u32 % 64, &hex_key(i)))
        })
    });
    group.finish();
}

/// Polls a future once; the cached-get path must finish without waiting.
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("a cached get waited"),
    }
}

/// `Store::get` served from the record cache (index lookup, cache lookup, record clone),
/// the path behind the "gets from cache" target. In-memory disk; no I/O is involved.
fn store_cached_get(c: &mut Criterion) {
    const KEYS: u64 = 100_000;
    let executor = glommio::LocalExecutorBuilder::default()
        .make()
        .expect("a glommio executor");
    executor.run(async {
        let config = StoreConfig {
            durability: Durability::None,
            ..StoreConfig::default()
        };
        let store = Store::open(SimDisk::new(), config).await.expect("open");
        let runner = store.clone();
        glommio::spawn_local(async move { runner.run().await }).detach();
        let mut loaders = Vec::new();
        for l in 0..64 {
            let store = store.clone();
            loaders.push(glommio::spawn_local(async move {
                let mut i = l;
                while i < KEYS {
                    let value = [7u8; 100];
                    store
                        .put((i % 64) as u32, &hex_key(i), b"version", &value)
                        .await?;
                    i += 64;
                }
                Ok::<(), ringkv_engine::StoreError>(())
            }));
        }
        for loader in loaders {
            loader.await.expect("load");
        }
        let mut group = c.benchmark_group("store");
        group.throughput(Throughput::Elements(1));
        group.bench_function("get 1 random cached key of 100k", |b| {
            let mut rng = fastrand::Rng::with_seed(5);
            b.iter(|| {
                let i = rng.u64(..KEYS);
                let record = ready(store.get((i % 64) as u32, &hex_key(i))).expect("get");
                black_box(record.expect("loaded key"))
            })
        });
        group.finish();
        store.close().await.expect("close");
    });
}

criterion_group!(
    benches,
    record_framing,
    index,
    index_large,
    store_cached_get
);
criterion_main!(benches);
