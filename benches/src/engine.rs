//! `ringkv bench engine`: one shard's store on this machine's disk, measured next to the
//! disk itself (a bare 4 KiB write+fdatasync and a 4 KiB O_DIRECT read) in the same run
//! and on the same filesystem.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context;
use glommio::io::{DmaFile, OpenOptions};
use glommio::{Latency, Shares};
use ringkv_engine::disk::DmaDisk;
use ringkv_engine::{Durability, Store, StoreConfig};
use serde::Serialize;

use crate::report::{Measurement, Recorder};

#[derive(Debug, Clone)]
pub struct EngineBenchOptions {
    /// Where to put the store; a fresh directory under it is used and removed.
    pub dir: PathBuf,
    pub value_size: usize,
    pub writers: usize,
    /// Keys loaded for the read, index-memory and recovery measurements.
    pub keys: u64,
    /// Length of each timed phase.
    pub phase: Duration,
    pub durability: Durability,
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineBenchReport {
    pub measurements: Vec<Measurement>,
    pub keys_loaded: u64,
    /// Heap bytes of the index per key, beyond the key bytes themselves.
    pub index_bytes_per_key: f64,
    /// Seconds to reopen the store holding `keys_loaded` keys (index from hint files).
    pub recovery_seconds: f64,
    /// After a steady overwrite workload with compaction running: bytes of records on
    /// disk divided by bytes of live records.
    pub space_amplification: f64,
    pub compactions: u64,
}

const PARTITIONS: u32 = 64;
/// Keys read by the cached-get measurement: 100k records of ~160 B fit the default cache.
const HOT_KEYS: u64 = 100_000;
/// Keys overwritten by the space measurement: ~30 MiB live, many times a segment, so
/// the bound (about 2x live, plus the active segment) is what is measured.
const OVERWRITE_KEYS: u64 = 200_000;

/// glommio's error type is not Sync; anyhow needs it as an io::Error.
fn io<T>(result: glommio::Result<T, ()>) -> std::io::Result<T> {
    result.map_err(std::io::Error::from)
}

/// A fixed-width 20-byte key: "key-" and 16 hex digits.
fn key(i: u64) -> [u8; 20] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut k = *b"key-0000000000000000";
    for (n, byte) in k[4..].iter_mut().enumerate() {
        *byte = HEX[((i >> (60 - 4 * n)) & 0xf) as usize];
    }
    k
}

fn partition(i: u64) -> u32 {
    (i % PARTITIONS as u64) as u32
}

pub fn run(options: &EngineBenchOptions) -> anyhow::Result<EngineBenchReport> {
    std::fs::create_dir_all(&options.dir)?;
    let scratch = tempfile::tempdir_in(&options.dir).context("creating a scratch directory")?;
    let root = scratch.path().to_path_buf();
    let options = options.clone();
    glommio::LocalExecutorBuilder::default()
        .name("bench-engine")
        .spawn(move || async move { run_on_executor(&root, &options).await })
        .map_err(|e| {
            anyhow::anyhow!("cannot start a glommio executor (is io_uring allowed here?): {e}")
        })?
        .join()
        .map_err(|e| anyhow::anyhow!("benchmark executor failed: {e:?}"))?
}

async fn open(dir: &Path, config: StoreConfig) -> anyhow::Result<Rc<Store<DmaDisk>>> {
    let store = Store::open(DmaDisk::new(dir)?, config).await?;
    let runner = store.clone();
    glommio::spawn_local(async move { runner.run().await }).detach();
    Ok(store)
}

async fn run_on_executor(root: &Path, o: &EngineBenchOptions) -> anyhow::Result<EngineBenchReport> {
    let mut rows = Vec::new();
    let value = vec![0xA5u8; o.value_size];
    let config = StoreConfig {
        durability: o.durability,
        ..StoreConfig::default()
    };

    // The store opens first: DmaDisk's first open makes glommio's IOPOLL probe honest
    // (see docs/architecture.md) before the baselines open raw DMA files.
    let puts_dir = root.join("puts");
    let store = open(&puts_dir, config.clone()).await?;

    let fsync = baseline_write_fsync(root, o.phase).await?;
    let read = baseline_direct_read(root, o.phase).await?;

    let mut put1 = puts(&store, 1, &value, o.phase, 0)
        .await?
        .measurement("put, 1 writer", o.phase);
    put1.p50_vs_baseline = Some(put1.p50_us / fsync.p50_us);
    let name = format!("put, {} writers", o.writers);
    let mut put_n = puts(&store, o.writers, &value, o.phase, 1 << 40)
        .await?
        .measurement(&name, o.phase);
    put_n.p50_vs_baseline = Some(put_n.p50_us / fsync.p50_us);
    store.close().await?;

    // Load keys without waiting for fdatasync (the load is setup, not a measurement).
    let load_dir = root.join("load");
    let load_config = StoreConfig {
        durability: Durability::None,
        ..StoreConfig::default()
    };
    let store = open(&load_dir, load_config.clone()).await?;
    load(&store, o.keys, &value).await?;
    let usage = store.usage();
    let index_bytes_per_key =
        (usage.index_bytes - usage.key_bytes) as f64 / usage.keys.max(1) as f64;
    // A hot set that fits the cache, read once to warm it, then measured.
    let hot = o.keys.min(HOT_KEYS);
    gets(&store, hot, Duration::from_millis(200)).await?;
    let cached_gets = gets(&store, hot, o.phase)
        .await?
        .measurement("get, from cache (hot set)", o.phase);
    store.close().await?;

    let started = Instant::now();
    let store = open(
        &load_dir,
        StoreConfig {
            cache_bytes: 0,
            ..load_config
        },
    )
    .await?;
    let recovery_seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(store.usage().keys as u64 == o.keys, "recovery lost keys");
    let mut disk_gets = gets(&store, o.keys, o.phase)
        .await?
        .measurement("get, from disk (QD1)", o.phase);
    disk_gets.p50_vs_baseline = Some(disk_gets.p50_us / read.p50_us);
    store.close().await?;

    let (space_amplification, compactions) = overwrite(root, o, &value).await?;

    rows.extend([fsync, read, put1, put_n, cached_gets, disk_gets]);
    Ok(EngineBenchReport {
        measurements: rows,
        keys_loaded: o.keys,
        index_bytes_per_key,
        recovery_seconds,
        space_amplification,
        compactions,
    })
}

async fn baseline_write_fsync(root: &Path, phase: Duration) -> anyhow::Result<Measurement> {
    let file = io(OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .dma_open(root.join("baseline-write"))
        .await)?;
    let mut recorder = Recorder::default();
    let started = Instant::now();
    let mut pos = 0u64;
    while started.elapsed() < phase {
        let mut buf = file.alloc_dma_buffer(4096);
        buf.as_bytes_mut().fill(0x5A);
        let t = Instant::now();
        io(file.write_at(buf, pos).await)?;
        io(file.fdatasync().await)?;
        recorder.record(t.elapsed());
        pos = (pos + 4096) % (64 << 20);
    }
    io(file.close().await)?;
    Ok(recorder.measurement("baseline: 4 KiB write+fdatasync", started.elapsed()))
}

async fn baseline_direct_read(root: &Path, phase: Duration) -> anyhow::Result<Measurement> {
    let path = root.join("baseline-read");
    let len: u64 = 64 << 20;
    std::fs::write(&path, vec![0x3Cu8; len as usize])?;
    std::fs::File::open(&path)?.sync_all()?;
    let file: DmaFile = io(OpenOptions::new().read(true).dma_open(&path).await)?;
    let mut rng = fastrand::Rng::with_seed(7);
    let mut recorder = Recorder::default();
    let started = Instant::now();
    while started.elapsed() < phase {
        let pos = rng.u64(0..len / 4096) * 4096;
        let t = Instant::now();
        let read = io(file.read_at_aligned(pos, 4096).await)?;
        recorder.record(t.elapsed());
        anyhow::ensure!(read.len() == 4096, "short read");
    }
    io(file.close().await)?;
    Ok(recorder.measurement("baseline: 4 KiB O_DIRECT read", started.elapsed()))
}

/// Closed-loop writers, each putting fresh keys for `phase`.
async fn puts(
    store: &Rc<Store<DmaDisk>>,
    writers: usize,
    value: &[u8],
    phase: Duration,
    base: u64,
) -> anyhow::Result<Recorder> {
    let total = Rc::new(RefCell::new(Recorder::default()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers as u64 {
        let (store, total, value) = (store.clone(), total.clone(), value.to_vec());
        tasks.push(glommio::spawn_local(async move {
            let mut recorder = Recorder::default();
            let mut i = base + (w << 32);
            while started.elapsed() < phase {
                let t = Instant::now();
                store.put(partition(i), &key(i), b"version", &value).await?;
                recorder.record(t.elapsed());
                i += 1;
            }
            total.borrow_mut().merge(&recorder);
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok(Rc::try_unwrap(total)
        .map_err(|_| anyhow::anyhow!("writer still running"))?
        .into_inner())
}

async fn load(store: &Rc<Store<DmaDisk>>, keys: u64, value: &[u8]) -> anyhow::Result<()> {
    const LOADERS: u64 = 64;
    let mut tasks = Vec::new();
    for l in 0..LOADERS {
        let (store, value) = (store.clone(), value.to_vec());
        tasks.push(glommio::spawn_local(async move {
            let mut i = l;
            while i < keys {
                store.put(partition(i), &key(i), b"version", &value).await?;
                i += LOADERS;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok(())
}

/// One task reading random loaded keys for `phase`.
async fn gets(store: &Rc<Store<DmaDisk>>, keys: u64, phase: Duration) -> anyhow::Result<Recorder> {
    let mut rng = fastrand::Rng::with_seed(11);
    let mut recorder = Recorder::default();
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < phase {
        let i = rng.u64(0..keys);
        let t = Instant::now();
        let record = store.get(partition(i), &key(i)).await?;
        recorder.record(t.elapsed());
        anyhow::ensure!(record.is_some(), "key {i} missing");
        n = n.wrapping_add(1);
        if n.is_multiple_of(4096) {
            // Cache hits never yield on their own; let the commit task breathe.
            glommio::yield_if_needed().await;
        }
    }
    Ok(recorder)
}

/// Overwrites a fixed key set for `phase` with compaction running in a low-priority
/// queue; returns (record bytes / live bytes, compactions).
async fn overwrite(
    root: &Path,
    o: &EngineBenchOptions,
    value: &[u8],
) -> anyhow::Result<(f64, u64)> {
    let config = StoreConfig {
        segment_size: 2 << 20,
        durability: o.durability,
        ..StoreConfig::default()
    };
    let store = open(&root.join("overwrite"), config).await?;
    let queue = glommio::executor().create_task_queue(
        Shares::Static(10),
        Latency::NotImportant,
        "compaction",
    );
    let compactor = store.clone();
    let compaction = io(glommio::spawn_local_into(
        async move { compactor.run_compaction(Duration::from_millis(10)).await },
        queue,
    ))?
    .detach();
    let keys = OVERWRITE_KEYS;
    let duration = o.phase * 2;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..o.writers.max(1) as u64 {
        let (store, value) = (store.clone(), value.to_vec());
        tasks.push(glommio::spawn_local(async move {
            let mut rng = fastrand::Rng::with_seed(w);
            while started.elapsed() < duration {
                let i = rng.u64(0..keys);
                store.put(partition(i), &key(i), b"version", &value).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await?;
    }
    // Let compaction catch up with the last sealed segments.
    while store.compact_once().await?.is_some() {}
    let usage = store.usage();
    let compactions = store.stats().compactions;
    store.close().await?;
    compaction.cancel();
    Ok((
        usage.record_bytes as f64 / usage.live_bytes.max(1) as f64,
        compactions,
    ))
}
