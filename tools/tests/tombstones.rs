//! Tombstone collection across real processes (three `ringkv server`s, N=3): deleted
//! keys leave the index of every replica once all of them hold the tombstone; a
//! restart brings collected tombstones back from the log, they are collected again,
//! and no deleted value ever reads back.

use std::time::{Duration, Instant};

use ringkv_client::{Client, PutMode, ReadOptions, WriteOptions};

mod common;
use common::Cluster;

/// Hints live 1 s, tombstones at least 4 s (the server wants the grace above the
/// hint age plus twice the 1 s request timeout).
const ARGS: &[&str] = &["--hint-age-max-s", "1", "--tombstone-grace-s", "4"];
const KEYS: u32 = 500;

/// Per running node: (id, live keys, tombstones in the index, index bytes, collected).
fn usage(c: &Client) -> Vec<(u32, u64, u64, u64, u64)> {
    (c.status_each().expect("status").into_iter())
        .filter_map(|(id, status)| status.ok().map(|s| (id, s)))
        .map(|(id, s)| {
            let sum = |f: fn(&ringkv_client::ShardStatus) -> u64| s.shards.iter().map(f).sum();
            (
                id,
                sum(|s| s.keys),
                sum(|s| s.tombstones),
                sum(|s| s.index_bytes),
                sum(|s| s.tombstones_collected),
            )
        })
        .collect()
}

/// Waits until no running node holds a tombstone; returns how long that took.
fn wait_collected(c: &Client, nodes: usize) -> Duration {
    let start = Instant::now();
    loop {
        let now = usage(c);
        if now.len() == nodes && now.iter().all(|&(_, _, tombstones, _, _)| tombstones == 0) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "tombstones still held 90 s on: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn assert_all_deleted(cluster: &Cluster, c: &Client) {
    let one = ReadOptions {
        r: Some(1),
        strict: true,
        ..ReadOptions::default()
    };
    for id in 1..=3 {
        for i in 0..KEYS {
            let key = format!("gone-{i}");
            let found = c.get_on(&cluster.native(id), key.as_bytes(), one).unwrap();
            assert!(
                found.value().is_none(),
                "{key} reads {found:?} on node {id}"
            );
        }
    }
}

#[test]
fn deleted_keys_leave_every_replica_and_never_come_back() {
    let mut cluster = Cluster::start_with_args(3, ARGS);
    let c = cluster.client(&[1, 2, 3]);
    let all = WriteOptions {
        w: Some(3),
        ..WriteOptions::default()
    };
    for i in 0..KEYS {
        let key = format!("gone-{i}");
        c.put_with(key.as_bytes(), b"soon deleted", PutMode::Latest, all)
            .unwrap();
    }
    let written = usage(&c);
    for i in 0..KEYS {
        let key = format!("gone-{i}");
        c.delete_with(key.as_bytes(), PutMode::Latest, all).unwrap();
    }
    let deleted = usage(&c);
    assert!(
        deleted
            .iter()
            .all(|&(_, keys, tombstones, _, _)| keys == 0 && tombstones == u64::from(KEYS)),
        "after the deletes: {deleted:?}"
    );
    let took = wait_collected(&c, 3);
    let collected = usage(&c);
    println!("written: {written:?}\ndeleted: {deleted:?}\ncollected after {took:?}: {collected:?}");
    for &(id, keys, _, index_bytes, count) in &collected {
        assert_eq!(keys, 0, "node {id}");
        assert!(count >= u64::from(KEYS), "node {id} collected {count}");
        let before = deleted.iter().find(|d| d.0 == id).unwrap().3;
        assert!(
            index_bytes < before,
            "node {id}: index {before} -> {index_bytes} bytes"
        );
    }
    assert_all_deleted(&cluster, &c);

    // Collection is not durable: node 2's log still holds the tombstones, which come
    // back with the restart and are collected again (its peers answer "nothing").
    cluster.kill(2);
    cluster.restart(2);
    let back: u64 = (usage(&c).iter()).filter(|n| n.0 == 2).map(|n| n.2).sum();
    println!("tombstones back on node 2 after its restart: {back}");
    let again = wait_collected(&c, 3);
    println!(
        "collected again {again:?} after the restart: {:?}",
        usage(&c)
    );
    assert!(usage(&c).iter().all(|&(_, keys, _, _, _)| keys == 0));
    assert_all_deleted(&cluster, &c);
}
