//! Bad disks on the simulated disk: a failed fdatasync latches the store (fsyncgate),
//! a full disk fails writes without losing anything acknowledged, bad input is refused.

use std::rc::Rc;

use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use ringkv_engine::disk::{SimDisk, SimFaults};
use ringkv_engine::{Store, StoreConfig, StoreError};

fn config() -> StoreConfig {
    StoreConfig {
        segment_size: 256 << 10,
        max_value_len: 4096,
        commit_batch_bytes: 64 << 10,
        ..StoreConfig::default()
    }
}

fn with_store(test: impl AsyncFnOnce(SimDisk, &dyn Fn(&SimDisk) -> Rc<Store<SimDisk>>) + 'static) {
    let mut pool = LocalPool::new();
    let spawner = pool.spawner();
    pool.run_until(async move {
        let disk = SimDisk::new();
        // Opening the sim store never awaits real I/O, so it completes inside block_on.
        let open = move |disk: &SimDisk| {
            let store =
                futures_lite::future::block_on(Store::open(disk.clone(), config())).expect("open");
            let runner = store.clone();
            spawner
                .spawn_local(async move { runner.run().await })
                .expect("spawn");
            store
        };
        test(disk, &open).await;
    });
}

#[test]
fn failed_fdatasync_latches_and_loses_nothing_acknowledged() {
    with_store(async |disk, open| {
        let store = open(&disk);
        for i in 0..20u8 {
            store.put(0, &[i], b"v", &[i; 10]).await.unwrap();
        }
        disk.set_faults(SimFaults {
            fail_sync_at: Some(0),
            ..SimFaults::default()
        });
        let err = store.put(0, b"doomed", b"v", b"x").await.unwrap_err();
        assert!(matches!(err, StoreError::Failed(_)), "{err}");
        // Never retried: the next write is refused even though the disk "works" again.
        let err = store.put(0, b"later", b"v", b"x").await.unwrap_err();
        assert!(matches!(err, StoreError::Failed(_)), "{err}");
        assert!(store.failure().is_some());
        // Acknowledged data is still served.
        assert_eq!(store.get(0, &[7]).await.unwrap().unwrap().value(), &[7; 10]);
        assert!(store.get(0, b"doomed").await.unwrap().is_none());

        let rebooted = disk.crash(1);
        let store = open(&rebooted);
        for i in 0..20u8 {
            assert_eq!(store.get(0, &[i]).await.unwrap().unwrap().value(), &[i; 10]);
        }
        store.put(0, b"after-reopen", b"v", b"ok").await.unwrap();
    });
}

#[test]
fn full_disk_fails_writes_then_recovers_when_space_returns() {
    with_store(async |disk, open| {
        let store = open(&disk);
        let used: u64 = disk.names().iter().filter_map(|n| disk.file_len(n)).sum();
        disk.set_faults(SimFaults {
            capacity: Some(used + (64 << 10)),
            ..SimFaults::default()
        });
        let mut acked = Vec::new();
        let mut full = None;
        for i in 0..10_000u32 {
            match store.put(3, &i.to_le_bytes(), b"v", &[1; 1000]).await {
                Ok(()) => acked.push(i),
                Err(err) => {
                    full = Some(err);
                    break;
                }
            }
        }
        assert!(
            matches!(full, Some(StoreError::DiskFull { .. })),
            "{full:?}"
        );
        assert!(!acked.is_empty());
        for i in &acked {
            assert!(
                store.get(3, &i.to_le_bytes()).await.unwrap().is_some(),
                "lost {i}"
            );
        }
        // Space comes back: writes succeed again without reopening.
        disk.set_faults(SimFaults::default());
        store.put(3, b"after", b"v", b"space").await.unwrap();

        let store = open(&disk.crash(2));
        for i in &acked {
            assert!(
                store.get(3, &i.to_le_bytes()).await.unwrap().is_some(),
                "lost {i} after crash"
            );
        }
        assert_eq!(
            store.get(3, b"after").await.unwrap().unwrap().value(),
            b"space"
        );
    });
}

#[test]
fn oversized_input_is_an_invalid_argument() {
    with_store(async |disk, open| {
        let store = open(&disk);
        let long_key = vec![0; ringkv_engine::record::MAX_KEY_LEN + 1];
        let big_value = vec![0; 4097];
        for err in [
            store.put(0, &long_key, b"v", b"x").await.unwrap_err(),
            store.put(0, b"k", b"v", &big_value).await.unwrap_err(),
            store
                .put(0, b"k", &vec![0; (64 << 10) + 1], b"x")
                .await
                .unwrap_err(),
        ] {
            assert!(matches!(err, StoreError::InvalidArgument(_)), "{err}");
        }
        assert!(store.get(0, b"k").await.unwrap().is_none());
        let key_at_limit = vec![9; ringkv_engine::record::MAX_KEY_LEN];
        store.put(0, &key_at_limit, b"v", &[1; 4096]).await.unwrap();
        assert_eq!(
            store
                .get(0, &key_at_limit)
                .await
                .unwrap()
                .unwrap()
                .value()
                .len(),
            4096
        );
    });
}

#[test]
fn config_limits_are_checked() {
    let bad = [
        StoreConfig {
            max_value_len: (16 << 20) + 1,
            segment_size: 1 << 30,
            ..StoreConfig::default()
        },
        StoreConfig {
            segment_size: 4096 * 3 + 1,
            ..StoreConfig::default()
        },
        StoreConfig {
            segment_size: 1 << 20,
            ..StoreConfig::default()
        },
        // A fresh segment must hold its header block and a maximal record.
        StoreConfig {
            segment_size: (1 << 20) + (132 << 10),
            ..StoreConfig::default()
        },
        StoreConfig {
            commit_batch_bytes: 0,
            ..StoreConfig::default()
        },
        StoreConfig {
            compaction_garbage_ratio: 1.5,
            ..StoreConfig::default()
        },
    ];
    for config in bad {
        assert!(
            matches!(config.validate(), Err(StoreError::InvalidArgument(_))),
            "{config:?}"
        );
    }
    assert!(StoreConfig::default().validate().is_ok());
    assert_eq!(
        "interval(5ms)".parse(),
        Ok(ringkv_engine::Durability::Interval(
            std::time::Duration::from_millis(5)
        ))
    );
    assert!("sometimes".parse::<ringkv_engine::Durability>().is_err());
}

#[test]
fn scan_partition_visits_exactly_the_live_records_of_that_partition() {
    with_store(async |disk, open| {
        let store = open(&disk);
        for i in 0..50u8 {
            store.put(5, &[i], b"v", &[i; 3]).await.unwrap();
            store.put(6, &[i], b"v", b"other partition").await.unwrap();
        }
        store.put(5, &[7], b"v2", b"overwritten").await.unwrap();
        store.delete(5, &[9], b"gone").await.unwrap();
        let mut seen = std::collections::BTreeMap::new();
        let n = store
            .scan_partition(5, |r| {
                assert_eq!(r.partition(), 5);
                seen.insert(r.key()[0], (r.is_tombstone(), r.value().to_vec()));
            })
            .await
            .unwrap();
        assert_eq!(n, 50);
        assert_eq!(seen.len(), 50);
        assert_eq!(seen[&7], (false, b"overwritten".to_vec()));
        assert_eq!(seen[&9], (true, Vec::new()));
        assert_eq!(seen[&0], (false, vec![0; 3]));
        store.drop_partition(5).await.unwrap();
        assert_eq!(
            store
                .scan_partition(5, |_| panic!("dropped partition visited"))
                .await
                .unwrap(),
            0
        );
        assert_eq!(store.scan_partition(6, |_| {}).await.unwrap(), 50);
    });
}
