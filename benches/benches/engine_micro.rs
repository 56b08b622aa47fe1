//! Micro-benchmarks of the engine's hot-path pieces: record framing and the index.
//! Run: cargo bench -p ringkv-bench --bench engine_micro

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ringkv_engine::index::{Entry, Index, Location};
use ringkv_engine::record::{Kind, checksum_ok, decode_header, encode};

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
    );
    group.bench_function("decode + verify 100 B value", |b| {
        b.iter(|| {
            let header = decode_header(black_box(&encoded)).unwrap();
            assert!(checksum_ok(&encoded[..header.record_len()]));
        })
    });
    group.finish();
}

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

criterion_group!(benches, record_framing, index);
criterion_main!(benches);
