//! The store against a BTreeMap model on a simulated disk, with crashes at random
//! points that drop or tear every unsynced write.
//!
//! After each crash the store is reopened and every key must read as its last
//! acknowledged state, or as the state of a write that was in flight (not acknowledged)
//! when the machine stopped. Small segments make rotation and compaction frequent.

use std::collections::BTreeMap;
use std::rc::Rc;

use futures::executor::LocalPool;
use futures::future::join_all;
use futures::task::LocalSpawnExt;
use proptest::prelude::*;
use ringkv_engine::disk::{SimDisk, SimFaults};
use ringkv_engine::{Durability, Merge, Store, StoreConfig};

/// What a key holds: None (absent), or (tombstone?, bytes: value or version).
type State = Option<(bool, Vec<u8>)>;

#[derive(Debug, Clone)]
enum Op {
    Put {
        partition: u32,
        key: u8,
        len: usize,
    },
    Delete {
        partition: u32,
        key: u8,
    },
    /// Read-merge-write that appends one byte to the value.
    Append {
        partition: u32,
        key: u8,
    },
    /// Puts to distinct keys issued together, so they share group commits.
    Concurrent {
        keys: Vec<u8>,
        len: usize,
    },
    DropPartition {
        partition: u32,
    },
    Compact,
    /// Stop the machine after `after` more disk operations, keep going until something
    /// fails, then reboot from what a crash (chosen by `seed`) leaves.
    Crash {
        after: u64,
        seed: u64,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let partition = 0u32..3;
    let key = 0u8..24;
    prop_oneof![
        6 => (partition.clone(), key.clone(), 0usize..600).prop_map(|(partition, key, len)| Op::Put { partition, key, len }),
        2 => (partition.clone(), key.clone()).prop_map(|(partition, key)| Op::Delete { partition, key }),
        2 => (partition.clone(), key.clone()).prop_map(|(partition, key)| Op::Append { partition, key }),
        3 => (prop::collection::btree_set(0u8..24, 2..8), 0usize..300)
            .prop_map(|(keys, len)| Op::Concurrent { keys: keys.into_iter().collect(), len }),
        1 => partition.prop_map(|partition| Op::DropPartition { partition }),
        2 => Just(Op::Compact),
        1 => (0u64..40, any::<u64>()).prop_map(|(after, seed)| Op::Crash { after, seed }),
        1 => Just(Op::Restart),
    ]
}

fn config() -> StoreConfig {
    StoreConfig {
        segment_size: 160 << 10,
        max_value_len: 1024,
        durability: Durability::Sync,
        cache_bytes: 8 << 10,
        commit_batch_bytes: 2048,
        compaction_garbage_ratio: 0.3,
    }
}

/// Acknowledged state per key, plus states written but not acknowledged since.
#[derive(Default)]
struct Model {
    acked: BTreeMap<(u32, u8), State>,
    in_doubt: BTreeMap<(u32, u8), Vec<State>>,
}

impl Model {
    fn ack(&mut self, key: (u32, u8), state: State) {
        self.in_doubt.remove(&key);
        self.acked.insert(key, state);
    }
    fn doubt(&mut self, key: (u32, u8), state: State) {
        self.in_doubt.entry(key).or_default().push(state);
    }
    fn acked(&self, key: (u32, u8)) -> State {
        self.acked.get(&key).cloned().flatten()
    }
}

fn value_for(step: usize, key: u8, len: usize) -> Vec<u8> {
    let mut v = format!("{step}:{key}:").into_bytes();
    v.resize(len.max(v.len()), key);
    v
}

async fn read_state(store: &Store<SimDisk>, partition: u32, key: u8) -> State {
    let record = store.get(partition, &[key]).await.expect("read failed");
    record.map(|r| {
        if r.is_tombstone() {
            (true, r.version().to_vec())
        } else {
            (false, r.value().to_vec())
        }
    })
}

async fn verify_and_settle(store: &Store<SimDisk>, model: &mut Model) {
    for partition in 0..3 {
        for key in 0..24u8 {
            let found = read_state(store, partition, key).await;
            let acked = model.acked((partition, key));
            let allowed = model
                .in_doubt
                .get(&(partition, key))
                .cloned()
                .unwrap_or_default();
            assert!(
                found == acked || allowed.contains(&found),
                "partition {partition} key {key}: found {found:?}, acknowledged {acked:?}, in doubt {allowed:?}"
            );
            // What recovery found is on disk now: it is the truth from here on.
            model.ack((partition, key), found);
        }
        let mut listed: Vec<u8> = store
            .partition_keys(partition)
            .iter()
            .map(|k| k.key[0])
            .collect();
        listed.sort_unstable();
        let expected: Vec<u8> = (0..24)
            .filter(|&k| model.acked((partition, k)).is_some())
            .collect();
        assert_eq!(
            listed, expected,
            "partition {partition} lists the wrong keys"
        );
    }
}

fn run_case(ops: Vec<Op>) {
    let mut pool = LocalPool::new();
    let spawner = pool.spawner();
    pool.run_until(async move {
        let mut disk = SimDisk::new();
        let mut model = Model::default();
        let mut store = open(&disk, &spawner).await;
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Put { partition, key, len } => {
                    let value = value_for(step, key, len);
                    let state = Some((false, value.clone()));
                    match store.put(partition, &[key], b"v", &value).await {
                        Ok(()) => model.ack((partition, key), state),
                        Err(_) => model.doubt((partition, key), state),
                    }
                }
                Op::Delete { partition, key } => {
                    let version = format!("del{step}").into_bytes();
                    let state = Some((true, version.clone()));
                    match store.delete(partition, &[key], &version).await {
                        Ok(()) => model.ack((partition, key), state),
                        Err(_) => model.doubt((partition, key), state),
                    }
                }
                Op::Append { partition, key } => {
                    let base = match model.acked((partition, key)) {
                        Some((false, v)) => v,
                        _ => Vec::new(),
                    };
                    let mut next = base.clone();
                    next.push(b'+');
                    let written = store
                        .update(partition, &[key], |current| {
                            let mut value = match current {
                                Some(r) if !r.is_tombstone() => r.value().to_vec(),
                                _ => Vec::new(),
                            };
                            value.push(b'+');
                            Merge::Write { version: b"v".to_vec(), value, tombstone: false }
                        })
                        .await;
                    match written {
                        Ok(_) => model.ack((partition, key), Some((false, next))),
                        Err(_) => model.doubt((partition, key), Some((false, next))),
                    }
                }
                Op::Concurrent { keys, len } => {
                    let puts = keys.iter().map(|&key| {
                        let value = value_for(step, key, len);
                        let store = store.clone();
                        async move { (key, value.clone(), store.put(1, &[key], b"v", &value).await) }
                    });
                    // Compaction races the puts: segments they fill must not look like garbage.
                    let compaction = async {
                        while let Ok(Some(_)) = store.compact_once().await {}
                    };
                    let (results, ()) = futures::future::join(join_all(puts), compaction).await;
                    for (key, value, result) in results {
                        match result {
                            Ok(()) => model.ack((1, key), Some((false, value))),
                            Err(_) => model.doubt((1, key), Some((false, value))),
                        }
                    }
                }
                Op::DropPartition { partition } => {
                    let dropped = store.drop_partition(partition).await.is_ok();
                    for key in 0..24u8 {
                        if dropped {
                            model.ack((partition, key), None);
                        } else {
                            model.doubt((partition, key), None);
                        }
                    }
                }
                Op::Compact => {
                    // Errors only come from a stopped disk, handled at the next crash.
                    while let Ok(Some(_)) = store.compact_once().await {}
                }
                Op::Crash { after, seed } => {
                    disk.set_faults(SimFaults { stop_after_ops: Some(after), ..SimFaults::default() });
                    // Keep writing until the machine stops; those writes are in doubt.
                    let mut filler = 0u8;
                    while !disk.stopped() {
                        let key = filler % 24;
                        let value = value_for(step, key, 40);
                        match store.put(2, &[key], b"v", &value).await {
                            Ok(()) => model.ack((2, key), Some((false, value))),
                            Err(_) => model.doubt((2, key), Some((false, value))),
                        }
                        filler = filler.wrapping_add(1);
                    }
                    disk = disk.crash(seed);
                    store = open(&disk, &spawner).await;
                    verify_and_settle(&store, &mut model).await;
                }
                Op::Restart => {
                    store.close().await.expect("clean close");
                    store = open(&disk, &spawner).await;
                    verify_and_settle(&store, &mut model).await;
                }
            }
        }
        verify_and_settle(&store, &mut model).await;
        let usage = store.usage();
        assert!(usage.live_bytes <= usage.record_bytes, "{usage:?}");
    });
}

async fn open(disk: &SimDisk, spawner: &futures::executor::LocalSpawner) -> Rc<Store<SimDisk>> {
    let store = Store::open(disk.clone(), config()).await.expect("open");
    let runner = store.clone();
    spawner
        .spawn_local(async move { runner.run().await })
        .expect("spawn");
    store
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn acknowledged_writes_survive_crashes(ops in prop::collection::vec(op(), 1..120)) {
        run_case(ops);
    }
}
