//! The store against a model on a simulated disk whose operations suspend for seeded
//! random delays (so the commit task, compaction, rotation, interval syncs and reads
//! interleave), with crashes at random points (unsynced writes dropped or torn, also in
//! the middle of recovery) and injected faults: failed file creations (EMFILE), failed
//! writes (EIO), full disks, failed fdatasyncs and directory syncs.
//!
//! What is checked, in every durability mode:
//! - while the store runs, every key reads as its last acknowledged state (a failed
//!   write changes nothing);
//! - after a clean restart, the same (a failed write that was cut back never reappears);
//! - after a crash: in `sync` mode every acknowledged write survives; in `interval` and
//!   `none` mode every write acknowledged before the last sync point survives, where a
//!   sync point is `Store::sync`, a clean close, and (interval mode) one interval of
//!   simulated time: the documented loss windows. Anything newer may or may not.
//!
//! Small segments make rotation and compaction frequent.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use futures::executor::LocalPool;
use futures::future::join_all;
use futures::task::LocalSpawnExt;
use proptest::prelude::*;
use ringkv_engine::disk::{SimDisk, SimFaults};
use ringkv_engine::{Durability, Merge, Store, StoreConfig, StoreError};

/// What a key holds: None (absent), or (tombstone?, bytes: value or version).
type State = Option<(bool, Vec<u8>)>;
type Key = (u32, u8);

const KEYS: u8 = 24;
const PARTITIONS: u32 = 3;
const INTERVAL: Duration = Duration::from_millis(5);

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
    /// Puts to distinct keys issued together (sharing group commits), racing a
    /// compaction and syncs; with `then_sync`, a sync point follows.
    Concurrent {
        keys: Vec<u8>,
        len: usize,
        then_sync: bool,
    },
    DropPartition {
        partition: u32,
    },
    /// Writers overwriting keys with large values (so segments fill, rotate and become
    /// garbage) while compaction loops beside them: rotation, compaction and commits
    /// interleave at every disk operation. With `crash_after`, the machine stops that
    /// many disk operations into the storm (inside commits, rotations and compactions,
    /// with writers in flight) and reboots.
    Storm {
        writers: u8,
        puts: u8,
        seed: u64,
        crash_after: Option<u64>,
    },
    Compact,
    /// `Store::sync`: a sync point.
    Sync,
    /// One interval of simulated time passes (interval mode: the background sync runs).
    Tick,
    Fault(Fault),
    /// Stop the machine after `after` more disk operations, keep going until something
    /// fails, then reboot from what a crash (chosen by `seed`) leaves; with
    /// `recovery_after`, the first recovery is itself stopped after that many
    /// operations and crashed again.
    Crash {
        after: u64,
        seed: u64,
        recovery_after: Option<u64>,
    },
    Restart,
}

#[derive(Debug, Clone)]
enum Fault {
    CreateFails(u64),
    WriteFails(u64),
    SyncFails(u64),
    DirSyncFails(u64),
    DiskFull(u64),
    Clear,
}

fn op() -> impl Strategy<Value = Op> {
    let partition = 0u32..PARTITIONS;
    let key = 0u8..KEYS;
    let fault = prop_oneof![
        (0u64..4).prop_map(Fault::CreateFails),
        (0u64..6).prop_map(Fault::WriteFails),
        (0u64..6).prop_map(Fault::SyncFails),
        (0u64..3).prop_map(Fault::DirSyncFails),
        (0u64..40_000).prop_map(Fault::DiskFull),
        Just(Fault::Clear),
    ];
    prop_oneof![
        6 => (partition.clone(), key.clone(), 0usize..600).prop_map(|(partition, key, len)| Op::Put { partition, key, len }),
        2 => (partition.clone(), key.clone()).prop_map(|(partition, key)| Op::Delete { partition, key }),
        2 => (partition.clone(), key.clone()).prop_map(|(partition, key)| Op::Append { partition, key }),
        3 => (prop::collection::btree_set(0u8..KEYS, 2..8), 0usize..300, any::<bool>())
            .prop_map(|(keys, len, then_sync)| Op::Concurrent { keys: keys.into_iter().collect(), len, then_sync }),
        1 => partition.prop_map(|partition| Op::DropPartition { partition }),
        2 => (2u8..8, 5u8..40, any::<u64>(), prop::option::weighted(0.4, 0u64..400))
            .prop_map(|(writers, puts, seed, crash_after)| Op::Storm { writers, puts, seed, crash_after }),
        2 => Just(Op::Compact),
        1 => Just(Op::Sync),
        1 => Just(Op::Tick),
        1 => fault.prop_map(Op::Fault),
        2 => (0u64..40, any::<u64>(), prop::option::weighted(0.3, 0u64..12))
            .prop_map(|(after, seed, recovery_after)| Op::Crash { after, seed, recovery_after }),
        1 => Just(Op::Restart),
    ]
}

fn config(durability: Durability) -> StoreConfig {
    StoreConfig {
        segment_size: 160 << 10,
        max_value_len: 1024,
        durability,
        cache_bytes: 8 << 10,
        commit_batch_bytes: 2048,
        compaction_garbage_ratio: 0.3,
        compaction_reserve: true,
    }
}

/// What each key must or may hold.
#[derive(Default)]
struct Model {
    /// The last acknowledged state: what a read returns while the store runs.
    acked: BTreeMap<Key, State>,
    /// The state known durable (acknowledged before the last sync point).
    durable: BTreeMap<Key, State>,
    /// States written since the durable one, acknowledged or not: a crash may leave any.
    since: BTreeMap<Key, Vec<State>>,
    /// Acknowledgements counted, so a run that acknowledged nothing is seen as such.
    acks: u64,
}

impl Model {
    fn ack(&mut self, key: Key, state: State, durable_now: bool) {
        self.acks += 1;
        self.acked.insert(key, state.clone());
        if durable_now {
            self.durable.insert(key, state);
            self.since.remove(&key);
        } else {
            self.since.entry(key).or_default().push(state);
        }
    }
    fn doubt(&mut self, key: Key, state: State) {
        let since = self.since.entry(key).or_default();
        if !since.contains(&state) {
            since.push(state);
        }
    }
    fn acked(&self, key: Key) -> State {
        self.acked.get(&key).cloned().flatten()
    }
    /// Everything acknowledged is durable now; nothing in flight remains.
    fn sync_point(&mut self) {
        self.durable = self.acked.clone();
        self.since.clear();
    }
    /// What recovery found is on disk now: it is the truth from here on.
    fn settle(&mut self, key: Key, found: State) {
        self.acked.insert(key, found.clone());
        self.durable.insert(key, found);
        self.since.remove(&key);
    }
}

/// A state in a failure message: kind, length and the tag at the front of the value.
fn show(state: &State) -> String {
    match state {
        None => "absent".into(),
        Some((tombstone, bytes)) => {
            let tag: String = bytes
                .iter()
                .take(12)
                .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
                .collect();
            format!(
                "{}({} bytes, {tag})",
                if *tombstone { "tombstone" } else { "value" },
                bytes.len()
            )
        }
    }
}

fn show_all(states: &[State]) -> String {
    states.iter().map(show).collect::<Vec<_>>().join(", ")
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

fn dump_key(disk: &SimDisk, partition: u32, key: u8) -> String {
    use ringkv_engine::record;
    let mut out = String::new();
    for name in disk.names() {
        out.push_str(&format!("\n  file {name}"));
        if !name.ends_with(".log") {
            continue;
        }
        let data = disk.contents(&name).unwrap();
        if data.len() < 4096 {
            continue;
        }
        let salt = u64::from_le_bytes(data[16..24].try_into().unwrap());
        let mut pos = 4096usize;
        while let Ok(h) =
            record::decode_header(&data[pos..], record::position_seed(salt, pos as u64))
        {
            let bytes = &data[pos..pos + h.record_len()];
            let (k, _, v) = record::split(bytes, &h);
            if h.partition == partition && k == [key] {
                out.push_str(&format!(
                    "\n    {pos}: {:?} {}",
                    h.kind,
                    show(&Some((false, v.to_vec())))
                ));
            }
            if h.kind == record::Kind::PartitionDrop && h.partition == partition {
                out.push_str(&format!("\n    {pos}: drop"));
            }
            pos += h.record_len();
        }
    }
    out
}

/// While the store runs: every key reads as its last acknowledged state.
async fn verify_running(store: &Store<SimDisk>, model: &Model) {
    for partition in 0..PARTITIONS {
        for key in 0..KEYS {
            let found = read_state(store, partition, key).await;
            let acked = model.acked((partition, key));
            assert!(
                found == acked,
                "running store: partition {partition} key {key}: found {}, acknowledged {}",
                show(&found),
                show(&acked)
            );
        }
    }
}

/// After a reopen: `strict` (clean restart) demands the acknowledged state; otherwise
/// (crash) the durable state or anything written since.
async fn verify_reopened(store: &Store<SimDisk>, disk: &SimDisk, model: &mut Model, strict: bool) {
    for partition in 0..PARTITIONS {
        for key in 0..KEYS {
            let k = (partition, key);
            let found = read_state(store, partition, key).await;
            if strict {
                let acked = model.acked(k);
                assert!(
                    found == acked,
                    "after restart: partition {partition} key {key}: found {}, acknowledged {}",
                    show(&found),
                    show(&acked)
                );
            } else {
                let durable = model.durable.get(&k).cloned().flatten();
                let since = model.since.get(&k).cloned().unwrap_or_default();
                assert!(
                    found == durable || since.contains(&found),
                    "after crash: partition {partition} key {key}: found {}, durable {}, written since [{}]{}",
                    show(&found),
                    show(&durable),
                    show_all(&since),
                    dump_key(disk, partition, key)
                );
            }
            model.settle(k, found);
        }
        let mut listed: Vec<u8> = store
            .partition_keys(partition)
            .iter()
            .map(|k| k.key[0])
            .collect();
        listed.sort_unstable();
        let expected: Vec<u8> = (0..KEYS)
            .filter(|&k| model.acked((partition, k)).is_some())
            .collect();
        assert_eq!(
            listed, expected,
            "partition {partition} lists the wrong keys"
        );
    }
}

struct Harness {
    durability: Durability,
    spawner: futures::executor::LocalSpawner,
}

impl Harness {
    async fn open(&self, disk: &SimDisk) -> Result<Rc<Store<SimDisk>>, StoreError> {
        let store = Store::open(disk.clone(), config(self.durability)).await?;
        let runner = store.clone();
        self.spawner
            .spawn_local(async move { runner.run().await })
            .expect("spawn");
        Ok(store)
    }

    /// Reboots from a crash of `disk`, optionally crashing once more inside recovery.
    async fn reboot(
        &self,
        disk: &SimDisk,
        seed: u64,
        recovery_after: Option<u64>,
    ) -> (SimDisk, Rc<Store<SimDisk>>) {
        let mut disk = disk.crash(seed);
        if let Some(after) = recovery_after {
            disk.set_faults(SimFaults {
                stop_after_ops: Some(after),
                ..SimFaults::default()
            });
            if let Ok(store) = self.open(&disk).await {
                let _ = store.close().await;
            }
            disk = disk.crash(seed.rotate_left(17));
        }
        let store = self.open(&disk).await.expect("recovery after a crash");
        (disk, store)
    }
}

/// Runs `ops`; returns how many writes were acknowledged.
fn run_case(durability: Durability, latency_seed: u64, ops: Vec<Op>) -> u64 {
    let mut pool = LocalPool::new();
    let spawner = pool.spawner();
    pool.run_until(async move {
        let harness = Harness { durability, spawner };
        let sync_mode = durability == Durability::Sync;
        let mut disk = SimDisk::with_latency(latency_seed, 3);
        disk.set_manual_clock();
        let mut model = Model::default();
        let mut store = harness.open(&disk).await.expect("open");
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Put { partition, key, len } => {
                    let value = value_for(step, key, len);
                    let state = Some((false, value.clone()));
                    match store.put(partition, &[key], b"v", &value).await {
                        Ok(()) => model.ack((partition, key), state, sync_mode),
                        Err(_) => model.doubt((partition, key), state),
                    }
                }
                Op::Delete { partition, key } => {
                    let version = format!("del{step}").into_bytes();
                    let state = Some((true, version.clone()));
                    match store.delete(partition, &[key], &version).await {
                        Ok(()) => model.ack((partition, key), state, sync_mode),
                        Err(_) => model.doubt((partition, key), state),
                    }
                }
                Op::Append { partition, key } => {
                    let mut next = match model.acked((partition, key)) {
                        Some((false, v)) => v,
                        _ => Vec::new(),
                    };
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
                        Ok(_) => model.ack((partition, key), Some((false, next)), sync_mode),
                        Err(_) => model.doubt((partition, key), Some((false, next))),
                    }
                }
                Op::Concurrent { keys, len, then_sync } => {
                    let puts = keys.iter().map(|&key| {
                        let value = value_for(step, key, len);
                        let store = store.clone();
                        async move { (key, value.clone(), store.put(1, &[key], b"v", &value).await) }
                    });
                    // Compaction and syncs race the puts: segments they fill must not
                    // look like garbage, and a sync must not claim more than it covers.
                    let compaction = async { while let Ok(Some(_)) = store.compact_once().await {} };
                    let syncs = async {
                        for _ in 0..keys.len() {
                            let _ = store.sync().await;
                        }
                    };
                    let (results, (), ()) = futures::future::join3(join_all(puts), compaction, syncs).await;
                    for (key, value, result) in results {
                        match result {
                            Ok(()) => model.ack((1, key), Some((false, value)), sync_mode),
                            Err(_) => model.doubt((1, key), Some((false, value))),
                        }
                    }
                    if then_sync && store.sync().await.is_ok() {
                        model.sync_point();
                    }
                }
                Op::DropPartition { partition } => {
                    let dropped = store.drop_partition(partition).await.is_ok();
                    for key in 0..KEYS {
                        if dropped {
                            model.ack((partition, key), None, sync_mode);
                        } else {
                            model.doubt((partition, key), None);
                        }
                    }
                }
                Op::Storm { writers, puts, seed, crash_after } => {
                    if let Some(after) = crash_after {
                        disk.set_faults(SimFaults { stop_after_ops: Some(after), ..SimFaults::default() });
                    }
                    let done = std::cell::Cell::new(0u8);
                    // Acknowledgement order: puts to one key are serialized by its key
                    // lock, so the last acknowledged is the one reads must return.
                    let acks = std::cell::Cell::new(0u64);
                    let writers = (0..writers).map(|w| {
                        let store = store.clone();
                        let (done, acks) = (&done, &acks);
                        async move {
                            let mut rng = fastrand::Rng::with_seed(seed ^ w as u64);
                            let mut results = Vec::new();
                            for i in 0..puts {
                                let key = rng.u8(0..KEYS);
                                let value = value_for(step * 1000 + w as usize * 100 + i as usize, key, rng.usize(400..1000));
                                let acked = store.put(0, &[key], b"v", &value).await.is_ok().then(|| {
                                    acks.set(acks.get() + 1);
                                    acks.get()
                                });
                                results.push((key, Some((false, value)), acked));
                            }
                            done.set(done.get() + 1);
                            results
                        }
                    });
                    let writer_count = writers.len() as u8;
                    let compaction = async {
                        while done.get() < writer_count {
                            let _ = store.compact_once().await;
                            futures_lite::future::yield_now().await;
                        }
                    };
                    let (all, ()) = futures::future::join(join_all(writers), compaction).await;
                    let mut written: BTreeMap<u8, Vec<(State, Option<u64>)>> = BTreeMap::new();
                    for (key, state, acked) in all.into_iter().flatten() {
                        written.entry(key).or_default().push((state, acked));
                    }
                    let stopped = disk.stopped();
                    for (key, mut states) in written {
                        states.sort_by_key(|(_, acked)| *acked);
                        let last_acked = states.iter().rev().find_map(|(s, a)| a.map(|_| s.clone()));
                        if !stopped {
                            let found = read_state(&store, 0, key).await;
                            let expected = last_acked.clone().unwrap_or_else(|| model.acked((0, key)));
                            assert!(
                                found == expected,
                                "storm: partition 0 key {key} reads {}, the last acknowledged write is {}",
                                show(&found),
                                show(&expected)
                            );
                        }
                        // Failed writes may still reach the disk, and unless every
                        // acknowledgement was synced, a crash may leave any acknowledged
                        // state too.
                        for (state, acked) in &states {
                            if acked.is_none() || !sync_mode {
                                model.doubt((0, key), state.clone());
                            }
                        }
                        if let Some(state) = last_acked {
                            model.ack((0, key), state.clone(), sync_mode);
                            if !sync_mode {
                                model.doubt((0, key), state);
                            }
                            // ack() in sync mode cleared the doubts: put failed ones back.
                            for (state, acked) in &states {
                                if acked.is_none() {
                                    model.doubt((0, key), state.clone());
                                }
                            }
                        }
                    }
                    if crash_after.is_some() {
                        (disk, store) = harness.reboot(&disk, seed, None).await;
                        verify_reopened(&store, &disk, &mut model, false).await;
                    }
                }
                Op::Compact => {
                    // Errors come from injected faults, handled at the next crash.
                    while let Ok(Some(_)) = store.compact_once().await {}
                }
                Op::Sync => {
                    if store.sync().await.is_ok() {
                        model.sync_point();
                    }
                }
                Op::Tick => {
                    disk.advance(INTERVAL);
                    if let Durability::Interval(_) = durability {
                        // The background sync must run within the interval.
                        let mut spins = 0;
                        while store.usage().unsynced_bytes > 0 && store.failure().is_none() {
                            futures_lite::future::yield_now().await;
                            spins += 1;
                            assert!(spins < 10_000, "no interval sync within one interval");
                        }
                        if store.failure().is_none() {
                            model.sync_point();
                        }
                    }
                }
                Op::Fault(fault) => {
                    let mut faults = SimFaults::default();
                    match fault {
                        Fault::CreateFails(n) => faults.fail_create_at = Some(n),
                        Fault::WriteFails(n) => faults.fail_write_at = Some(n),
                        Fault::SyncFails(n) => faults.fail_sync_at = Some(n),
                        Fault::DirSyncFails(n) => faults.fail_sync_dir_at = Some(n),
                        Fault::DiskFull(extra) => {
                            let used: u64 = disk.names().iter().filter_map(|n| disk.file_len(n)).sum();
                            faults.capacity = Some(used + extra);
                        }
                        Fault::Clear => {}
                    }
                    disk.set_faults(faults);
                }
                Op::Crash { after, seed, recovery_after } => {
                    disk.set_faults(SimFaults { stop_after_ops: Some(after), ..SimFaults::default() });
                    // Keep writing until the machine stops; those writes are in doubt.
                    let mut filler = 0u8;
                    // A latched store, or one whose faults fail writes before they
                    // reach the disk, never stops the machine: crash it where it is.
                    for _ in 0..500 {
                        if disk.stopped() || store.failure().is_some() {
                            break;
                        }
                        let key = filler % KEYS;
                        let value = value_for(step, key, 40);
                        match store.put(2, &[key], b"v", &value).await {
                            Ok(()) => model.ack((2, key), Some((false, value)), sync_mode),
                            Err(_) => model.doubt((2, key), Some((false, value))),
                        }
                        filler = filler.wrapping_add(1);
                    }
                    (disk, store) = harness.reboot(&disk, seed, recovery_after).await;
                    verify_reopened(&store, &disk, &mut model, false).await;
                }
                Op::Restart => {
                    let latched = store.failure().is_some();
                    disk.set_faults(SimFaults::default());
                    let closed = store.close().await.is_ok();
                    if latched || !closed {
                        // A failed store is reopened from what the disk really holds,
                        // which is what a crash leaves.
                        (disk, store) = harness.reboot(&disk, step as u64, None).await;
                        verify_reopened(&store, &disk, &mut model, false).await;
                    } else {
                        model.sync_point();
                        store = harness.open(&disk).await.expect("reopen");
                        verify_reopened(&store, &disk, &mut model, true).await;
                    }
                }
            }
            if store.failure().is_none() && !disk.stopped() {
                verify_running(&store, &model).await;
            }
        }
        disk.set_faults(SimFaults::default());
        if store.failure().is_none() {
            verify_running(&store, &model).await;
        }
        let usage = store.usage();
        assert!(usage.live_bytes <= usage.record_bytes, "{usage:?}");
        model.acks
    })
}

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cases(192))]
    #[test]
    fn sync_mode_loses_no_acknowledged_write(latency in any::<u64>(), ops in prop::collection::vec(op(), 1..120)) {
        run_case(Durability::Sync, latency, ops);
    }
}

proptest! {
    #![proptest_config(cases(96))]
    #[test]
    fn interval_mode_loses_at_most_one_interval(latency in any::<u64>(), ops in prop::collection::vec(op(), 1..120)) {
        run_case(Durability::Interval(INTERVAL), latency, ops);
    }

    #[test]
    fn none_mode_loses_nothing_synced(latency in any::<u64>(), ops in prop::collection::vec(op(), 1..120)) {
        run_case(Durability::None, latency, ops);
    }
}

/// The model checks something: a run of plain puts acknowledges them.
#[test]
fn a_plain_run_acknowledges_its_writes() {
    let ops: Vec<Op> = (0..50)
        .map(|i| Op::Put {
            partition: (i % 3) as u32,
            key: (i % 24) as u8,
            len: 300,
        })
        .collect();
    assert_eq!(run_case(Durability::Sync, 7, ops), 50);
}
