//! The store on real files (O_DIRECT through glommio's io_uring): damage found by
//! checksum on open and on read, torn tails cut, compaction racing writes and deletes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use glommio::{Latency, LocalExecutorBuilder, Shares};
use ringkv_engine::disk::DmaDisk;
use ringkv_engine::{Store, StoreConfig, StoreError};

const RECORD_OVERHEAD: u64 = 36;
/// Records start after each segment's 4 KiB header block.
const HEADER: u64 = 4096;

fn on_glommio<T: Send + 'static>(test: impl AsyncFnOnce() -> T + Send + 'static) -> T {
    LocalExecutorBuilder::default()
        .spawn(move || async move { test().await })
        .expect("start a glommio executor")
        .join()
        .expect("executor panicked")
}

async fn open(dir: &Path, config: StoreConfig) -> Rc<Store<DmaDisk>> {
    let store = Store::open(DmaDisk::new(dir).unwrap(), config)
        .await
        .expect("open");
    let runner = store.clone();
    glommio::spawn_local(async move { runner.run().await }).detach();
    store
}

/// Runs the store's compaction loop in a low-priority queue, as the server does; the
/// loop ends once the store is closed.
fn spawn_compaction(store: &Rc<Store<DmaDisk>>) -> glommio::task::JoinHandle<()> {
    let background = glommio::executor().create_task_queue(
        Shares::Static(10),
        Latency::NotImportant,
        "compaction",
    );
    let compactor = store.clone();
    glommio::spawn_local_into(
        async move { compactor.run_compaction(Duration::from_millis(1)).await },
        background,
    )
    .unwrap()
    .detach()
}

/// O_DIRECT needs a real filesystem (tmpfs refuses direct reads), so not /tmp.
fn scratch_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn small_segments() -> StoreConfig {
    StoreConfig {
        segment_size: 256 << 10,
        max_value_len: 1024,
        commit_batch_bytes: 64 << 10,
        ..StoreConfig::default()
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs
}

/// Removes every hint file: the directory as a crash leaves it (a clean close writes a
/// hint for the active segment too).
fn remove_hints(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "hint") {
            std::fs::remove_file(path).unwrap();
        }
    }
}

fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x5a], at).unwrap();
    file.sync_all().unwrap();
}

fn key(i: u32) -> Vec<u8> {
    format!("key-{i:05}").into_bytes()
}

/// Record length of key(i) with version "v" and a 100-byte value.
const REC_LEN: u64 = RECORD_OVERHEAD + 9 + 1 + 100;

#[test]
fn corrupt_record_in_the_middle_is_skipped_at_open_and_never_served() {
    let dir = scratch_dir();
    let path = dir.path().to_path_buf();
    on_glommio(async move || {
        let store = open(&path, StoreConfig::default()).await;
        for i in 0..100 {
            store.put(0, &key(i), b"v", &[i as u8; 100]).await.unwrap();
        }
        store.close().await.unwrap();
        // As after a crash, the first segment has no hint: recovery scans it.
        remove_hints(&path);
        flip_byte(&segment_files(&path)[0], HEADER + 50 * REC_LEN + 60);
        let store = open(&path, StoreConfig::default()).await;
        assert_eq!(store.stats().recovered_corrupt_regions, 1);
        assert!(
            store.get(0, &key(50)).await.unwrap().is_none(),
            "damaged record served"
        );
        for i in (0..100).filter(|&i| i != 50) {
            assert_eq!(
                store.get(0, &key(i)).await.unwrap().unwrap().value(),
                &[i as u8; 100]
            );
        }
    });
}

#[test]
fn corrupt_record_behind_a_hint_fails_its_read_with_corrupt() {
    let dir = scratch_dir();
    let path = dir.path().to_path_buf();
    on_glommio(async move || {
        let store = open(&path, small_segments()).await;
        // Enough to fill and seal the first segment, which then gets a hint file.
        let n = (256 << 10) / REC_LEN as u32 + 50;
        for i in 0..n {
            store.put(0, &key(i), b"v", &[i as u8; 100]).await.unwrap();
        }
        store.close().await.unwrap();
        flip_byte(&segment_files(&path)[0], HEADER + 7 * REC_LEN + 80);
        let config = StoreConfig {
            cache_bytes: 0,
            ..small_segments()
        };
        let store = open(&path, config).await;
        let err = store.get(0, &key(7)).await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
        assert_eq!(store.stats().corrupt_reads, 1);
        for i in (0..n).filter(|&i| i != 7) {
            assert_eq!(
                store.get(0, &key(i)).await.unwrap().unwrap().value(),
                &[i as u8; 100]
            );
        }
    });
}

#[test]
fn torn_tail_is_cut_and_writing_resumes() {
    let dir = scratch_dir();
    let path = dir.path().to_path_buf();
    on_glommio(async move || {
        let store = open(&path, StoreConfig::default()).await;
        for i in 0..30 {
            store.put(1, &key(i), b"v", &[1; 100]).await.unwrap();
        }
        store.close().await.unwrap();
        // Half a record after the last one: a write interrupted by a crash, which
        // leaves no hint for the segment either.
        remove_hints(&path);
        let mut torn = Vec::new();
        ringkv_engine::record::encode(
            &mut torn,
            ringkv_engine::record::Kind::Value,
            1,
            &key(99),
            b"v",
            &[7; 500],
            ringkv_engine::record::position_seed(0, HEADER + 30 * REC_LEN),
        );
        torn.truncate(200);
        {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&segment_files(&path)[0])
                .unwrap();
            file.write_all_at(&torn, HEADER + 30 * REC_LEN).unwrap();
            file.sync_all().unwrap();
        }
        let store = open(&path, StoreConfig::default()).await;
        assert_eq!(store.stats().recovered_torn_tail_bytes, 200);
        assert_eq!(store.stats().recovered_corrupt_regions, 0);
        assert!(store.get(1, &key(99)).await.unwrap().is_none());
        assert_eq!(store.usage().keys, 30);
        store.put(1, &key(100), b"v", b"after").await.unwrap();
        store.close().await.unwrap();
        let store = open(&path, StoreConfig::default()).await;
        assert_eq!(store.usage().keys, 31);
        assert_eq!(
            store.get(1, &key(100)).await.unwrap().unwrap().value(),
            b"after"
        );
    });
}

#[test]
fn compaction_racing_writes_loses_nothing_and_resurrects_nothing() {
    let dir = scratch_dir();
    let path = dir.path().to_path_buf();
    on_glommio(async move || {
        let config = StoreConfig {
            compaction_garbage_ratio: 0.3,
            ..small_segments()
        };
        let store = open(&path, config.clone()).await;
        let compaction = spawn_compaction(&store);

        // Four writers overwrite and delete 200 keys; the model is the last acknowledged
        // state of each key (writers own disjoint keys, so acknowledgement order is
        // write order per key).
        let mut writers = Vec::new();
        for w in 0..4u32 {
            let store = store.clone();
            writers.push(glommio::spawn_local(async move {
                let mut model = BTreeMap::new();
                for round in 0..60u32 {
                    for i in (w..200).step_by(4) {
                        if (i + round) % 7 == 0 {
                            store
                                .delete(2, &key(i), format!("d{round}").as_bytes())
                                .await
                                .unwrap();
                            model.insert(i, None);
                        } else {
                            let value = format!("{i}@{round}").into_bytes();
                            store.put(2, &key(i), b"v", &value).await.unwrap();
                            model.insert(i, Some(value));
                        }
                    }
                }
                model
            }));
        }
        let mut model = BTreeMap::new();
        for writer in writers {
            model.extend(writer.await);
        }
        let compactions = store.stats().compactions;
        assert!(compactions > 0, "the workload never triggered compaction");

        let check = async |store: &Store<DmaDisk>| {
            for (i, expected) in &model {
                let found = store.get(2, &key(*i)).await.unwrap();
                match expected {
                    Some(value) => assert_eq!(found.unwrap().value(), value, "key {i}"),
                    None => assert!(found.unwrap().is_tombstone(), "deleted key {i} came back"),
                }
            }
        };
        check(&store).await;
        store.close().await.unwrap();
        // Closing ends the compaction loop; wait for it instead of cancelling its I/O.
        compaction.await;
        let reopened = open(&path, config).await;
        check(&reopened).await;
        let usage = reopened.usage();
        assert!(
            usage.record_bytes <= 2 * usage.live_bytes + (256 << 10) * 2,
            "space {usage:?}"
        );
    });
}

/// The bench's overwrite phase as a test, on real O_DIRECT files: many writers overwrite
/// a key set with small values while compaction runs in a low-priority queue, segments
/// rotate every few hundred milliseconds, and every commit, rotation and compaction
/// interleaves at real io_uring completions. Any panic fails it (the bench panicked
/// here, 2 runs in 4, before segment numbers were reserved before the first await).
/// Afterwards, and after a reopen, every key holds its last acknowledged value.
/// `RINGKV_SOAK_SECONDS` makes it run longer (default 8).
#[test]
fn overwrite_storm_with_compaction_keeps_every_acknowledged_value() {
    let seconds: f64 = std::env::var("RINGKV_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8.0);
    let dir = scratch_dir();
    let path = dir.path().to_path_buf();
    on_glommio(async move || {
        let config = StoreConfig {
            segment_size: 1 << 20,
            max_value_len: 1024,
            compaction_garbage_ratio: 0.3,
            ..StoreConfig::default()
        };
        let store = open(&path, config.clone()).await;
        let compaction = spawn_compaction(&store);
        const WRITERS: u32 = 64;
        const KEYS_PER_WRITER: u32 = 200;
        let deadline = std::time::Instant::now() + Duration::from_secs_f64(seconds);
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let store = store.clone();
            writers.push(glommio::spawn_local(async move {
                // Each writer owns its keys, so its acknowledgement order is the order
                // of writes to them.
                let mut last = BTreeMap::new();
                let mut rng = fastrand::Rng::with_seed(w as u64);
                let mut n = 0u64;
                while std::time::Instant::now() < deadline {
                    let i = w * KEYS_PER_WRITER + rng.u32(0..KEYS_PER_WRITER);
                    let mut value = format!("{i}:{n}:").into_bytes();
                    value.resize(100, b'.');
                    store.put(i % 16, &key(i), b"v", &value).await.unwrap();
                    last.insert(i, value);
                    n += 1;
                }
                (last, n)
            }));
        }
        let mut model = BTreeMap::new();
        let mut puts = 0;
        for writer in writers {
            let (last, n) = writer.await;
            model.extend(last);
            puts += n;
        }
        let stats = store.stats();
        eprintln!(
            "overwrite storm: {puts} puts, {} commits, {} compactions, {} segments now",
            stats.commits,
            stats.compactions,
            store.usage().segments
        );
        assert!(puts > 10_000, "only {puts} puts were acknowledged");
        assert!(stats.compactions > 0, "the workload never compacted");
        let check = async |store: &Store<DmaDisk>| {
            for (i, value) in &model {
                let found = store.get(i % 16, &key(*i)).await.unwrap();
                assert_eq!(
                    found.expect("acknowledged key missing").value(),
                    &value[..],
                    "key {i}"
                );
            }
        };
        check(&store).await;
        store.close().await.unwrap();
        compaction.await;
        let reopened = open(&path, config).await;
        check(&reopened).await;
        reopened.close().await.unwrap();
    });
}
