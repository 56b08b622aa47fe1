//! `ringkv bench engine`: one shard's store on this machine's disk, measured next to the
//! disk itself (a bare 4 KiB write+fdatasync and a 4 KiB O_DIRECT read) in the same run
//! and on the same filesystem.

use std::cell::{Cell, RefCell};
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
    pub durability: String,
    pub value_size: usize,
    pub writers: usize,
    pub phase_seconds: f64,
    /// /proc/loadavg before and after the run: other work on the machine skews latency.
    pub loadavg_before: String,
    pub loadavg_after: String,
    pub measurements: Vec<Measurement>,
    pub index: IndexMemory,
    pub recovery: Recovery,
    pub space: Space,
}

/// Heap bytes of the index per key beyond the key bytes, `(index_bytes - key_bytes) /
/// keys`, sampled as the load grows: the hash tables double in steps, so one size alone
/// can flatter or condemn the index.
#[derive(Debug, Clone, Serialize)]
pub struct IndexMemory {
    pub keys: u64,
    /// At `keys` keys.
    pub bytes_per_key: f64,
    /// Lowest and highest over the samples taken while loading.
    pub min_bytes_per_key: f64,
    pub max_bytes_per_key: f64,
    /// (keys loaded, bytes per key) at each sample.
    pub samples: Vec<(u64, f64)>,
    pub load_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    pub keys: u64,
    /// Time for `Store::open` on the closed store (hint files plus a scan of the rest).
    pub seconds: f64,
    pub segments: usize,
    pub scanned_segments: u64,
}

/// A steady uniform overwrite of a fixed key set with compaction running in a
/// low-priority task queue.
#[derive(Debug, Clone, Serialize)]
pub struct Space {
    pub keys: u64,
    pub segment_bytes: u64,
    pub puts: u64,
    /// Puts divided by keys: how many times the key set was rewritten.
    pub passes: f64,
    pub seconds: f64,
    pub compactions: u64,
    /// record_bytes / live_bytes: the highest seen while writing (sampled every 50 ms),
    /// at the end of the writes, and after compaction caught up with no more writes.
    pub peak_amplification: f64,
    pub amplification_at_end: f64,
    pub amplification_after_catch_up: f64,
    pub live_bytes: u64,
    pub record_bytes: u64,
    /// Segments at the end of the writes, the active one included.
    pub segments: usize,
    /// At the end of the writes: sizes of every file in the store's directory (segments,
    /// hints), and the blocks the filesystem allocated for them.
    pub file_bytes: u64,
    pub allocated_bytes: u64,
    /// Of `allocated_bytes`, what the hint files (the index snapshots) take.
    pub hint_allocated_bytes: u64,
    /// allocated_bytes / live_bytes at the end of the writes.
    pub disk_amplification: f64,
}

const PARTITIONS: u32 = 64;
/// Keys read by the cached-get measurement: 100k records of ~160 B fit the default cache.
const HOT_KEYS: u64 = 100_000;
/// Keys overwritten by the space measurement: ~30 MiB live with 100 B values, many times
/// a segment, so the bound (about 2x live, plus the active segment) is what is measured.
const OVERWRITE_KEYS: u64 = 200_000;
/// Segment size for the space measurement (small, so the live set spans many segments).
const OVERWRITE_SEGMENT: u64 = 2 << 20;
/// Times the overwrite key set is rewritten, unless `OVERWRITE_PHASES` phases pass first.
const OVERWRITE_PASSES: u64 = 4;
const OVERWRITE_PHASES: u32 = 5;
/// Index samples taken while loading.
const INDEX_SAMPLES: u64 = 10;

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

fn durability_name(d: Durability) -> String {
    match d {
        Durability::Sync => "sync".into(),
        Durability::None => "none".into(),
        Durability::Interval(every) => format!("interval({}ms)", every.as_millis()),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

pub fn run(options: &EngineBenchOptions) -> anyhow::Result<EngineBenchReport> {
    let loadavg_before = loadavg();
    std::fs::create_dir_all(&options.dir)?;
    let scratch = tempfile::tempdir_in(&options.dir).context("creating a scratch directory")?;
    let root = scratch.path().to_path_buf();
    let options = options.clone();
    let report = glommio::LocalExecutorBuilder::default()
        .name("bench-engine")
        .spawn(move || async move { run_on_executor(&root, &options).await })
        .map_err(|e| {
            anyhow::anyhow!("cannot start a glommio executor (is io_uring allowed here?): {e}")
        })?
        .join()
        .map_err(|e| anyhow::anyhow!("benchmark executor failed: {e:?}"))??;
    Ok(EngineBenchReport {
        loadavg_before,
        loadavg_after: loadavg(),
        ..report
    })
}

async fn open(dir: &Path, config: StoreConfig) -> anyhow::Result<Rc<Store<DmaDisk>>> {
    let store = Store::open(DmaDisk::new(dir)?, config).await?;
    let runner = store.clone();
    glommio::spawn_local(async move { runner.run().await }).detach();
    Ok(store)
}

async fn run_on_executor(root: &Path, o: &EngineBenchOptions) -> anyhow::Result<EngineBenchReport> {
    let value = vec![0xA5u8; o.value_size];
    let mode = durability_name(o.durability);
    let config = StoreConfig {
        durability: o.durability,
        ..StoreConfig::default()
    };

    // The store opens first: DmaDisk's first open makes glommio's IOPOLL probe honest
    // (see docs/architecture.md) before the baselines open raw DMA files.
    let puts_dir = root.join("puts");
    let store = open(&puts_dir, config.clone()).await?;

    let (overwrite_fsync, put1) = overwrite_and_single_put(
        &store,
        root,
        &value,
        o.phase,
        &format!("put ({mode}), 1 writer"),
    )
    .await?;
    let append_fsync = baseline_append_fsync(root, o.phase).await?;
    let read = baseline_direct_read(root, o.phase).await?;

    // The many-writer row is compared with the same bare write as the single put: the
    // floor for acknowledging anything durably.
    let name = format!("put ({mode}), {} writers", o.writers);
    let mut put_n = measured_puts(&store, o.writers, &value, o.phase, 1 << 40, &name).await?;
    put_n.compare_with(&overwrite_fsync);
    store.close().await?;

    // Load keys without waiting for fdatasync (the load is setup, not a measurement).
    let load_dir = root.join("load");
    let load_config = StoreConfig {
        durability: Durability::None,
        ..StoreConfig::default()
    };
    let store = open(&load_dir, load_config.clone()).await?;
    let index = load(&store, o.keys, &value).await?;
    // A hot set that fits the cache, read once to warm it, then measured.
    let hot = o.keys.min(HOT_KEYS);
    gets(&store, hot, Duration::from_millis(200)).await?;
    let (recorder, elapsed) = gets(&store, hot, o.phase).await?;
    let cached_gets = recorder.measurement(&format!("get, from cache ({hot} hot keys)"), elapsed);
    store.close().await?;

    // Reopen with no cache: recovery time, then every get goes to the disk.
    let started = Instant::now();
    let store = open(
        &load_dir,
        StoreConfig {
            cache_bytes: 0,
            ..load_config
        },
    )
    .await?;
    let recovery = Recovery {
        keys: o.keys,
        seconds: started.elapsed().as_secs_f64(),
        segments: store.usage().segments,
        scanned_segments: store.stats().recovered_segments_scanned,
    };
    anyhow::ensure!(store.usage().keys as u64 == o.keys, "recovery lost keys");
    let (recorder, elapsed) = gets(&store, o.keys, o.phase).await?;
    let mut disk_gets =
        recorder.measurement(&format!("get, from disk (QD1, {} keys)", o.keys), elapsed);
    disk_gets.compare_with(&read);
    let stats = store.stats();
    anyhow::ensure!(
        stats.cache_hits * 100 <= stats.gets,
        "{} of {} disk gets were served from the cache",
        stats.cache_hits,
        stats.gets
    );
    store.close().await?;

    let space = overwrite(root, o, &value).await?;

    Ok(EngineBenchReport {
        durability: mode,
        value_size: o.value_size,
        writers: o.writers,
        phase_seconds: o.phase.as_secs_f64(),
        loadavg_before: String::new(),
        loadavg_after: String::new(),
        measurements: vec![
            overwrite_fsync,
            append_fsync,
            read,
            put1,
            put_n,
            cached_gets,
            disk_gets,
        ],
        index,
        recovery,
        space,
    })
}

/// The bare 4 KiB O_DIRECT write + fdatasync, one at a time, cycling over 1 MiB of a
/// file whose blocks are already written and synced (no allocation, no size change, so
/// fdatasync has only the data to flush), and the single-writer put, measured in
/// alternating rounds of `ROUND` operations so that drift on a shared machine hits both
/// alike. Each gets `phase` of time in total.
async fn overwrite_and_single_put(
    store: &Rc<Store<DmaDisk>>,
    root: &Path,
    value: &[u8],
    phase: Duration,
    put_name: &str,
) -> anyhow::Result<(Measurement, Measurement)> {
    const REGION: u64 = 1 << 20;
    const ROUND: usize = 25;
    let file = io(OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .dma_open(root.join("baseline-overwrite"))
        .await)?;
    let mut buf = file.alloc_dma_buffer(REGION as usize);
    buf.as_bytes_mut().fill(0x5A);
    io(file.write_at(buf, 0).await)?;
    io(file.fdatasync().await)?;
    let before = store.stats();
    let (mut bare, mut put) = (Recorder::default(), Recorder::default());
    let (mut bare_time, mut put_time) = (Duration::ZERO, Duration::ZERO);
    let (mut pos, mut i) = (0u64, 0u64);
    while bare_time < phase || put_time < phase {
        let round = Instant::now();
        for _ in 0..ROUND {
            let mut buf = file.alloc_dma_buffer(4096);
            buf.as_bytes_mut().fill(pos as u8);
            let t = Instant::now();
            io(file.write_at(buf, pos).await)?;
            io(file.fdatasync().await)?;
            bare.record_since(t);
            pos = (pos + 4096) % REGION;
        }
        bare_time += round.elapsed();
        let round = Instant::now();
        for _ in 0..ROUND {
            let t = Instant::now();
            store.put(partition(i), &key(i), b"version", value).await?;
            put.record_since(t);
            i += 1;
        }
        put_time += round.elapsed();
    }
    io(file.close().await)?;
    let after = store.stats();
    let bare = bare.measurement("bare: 4 KiB overwrite+fdatasync", bare_time);
    let mut put = put.measurement(put_name, put_time);
    let commits = after.commits - before.commits;
    put.records_per_commit =
        Some((after.committed_records - before.committed_records) as f64 / commits.max(1) as f64);
    put.syncs_per_sec = Some((after.syncs - before.syncs) as f64 / put_time.as_secs_f64());
    put.compare_with(&bare);
    Ok((bare, put))
}

/// 4 KiB O_DIRECT write + fdatasync, one at a time, each into a new block at the end of
/// the file: every fdatasync also commits the block allocation and the new size.
async fn baseline_append_fsync(root: &Path, phase: Duration) -> anyhow::Result<Measurement> {
    let file = io(OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .dma_open(root.join("baseline-append"))
        .await)?;
    let mut recorder = Recorder::default();
    let started = Instant::now();
    let mut pos = 0u64;
    loop {
        let mut buf = file.alloc_dma_buffer(4096);
        buf.as_bytes_mut().fill(0x5A);
        let t = Instant::now();
        io(file.write_at(buf, pos).await)?;
        io(file.fdatasync().await)?;
        if recorder.record_since(t) - started >= phase {
            break;
        }
        pos += 4096;
    }
    io(file.close().await)?;
    Ok(recorder.measurement("bare: 4 KiB append+fdatasync", started.elapsed()))
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
    loop {
        let pos = rng.u64(0..len / 4096) * 4096;
        let t = Instant::now();
        let read = io(file.read_at_aligned(pos, 4096).await)?;
        let now = recorder.record_since(t);
        anyhow::ensure!(read.len() == 4096, "short read");
        if now - started >= phase {
            break;
        }
    }
    io(file.close().await)?;
    Ok(recorder.measurement("bare: 4 KiB O_DIRECT read (QD1)", started.elapsed()))
}

/// `puts`, summarised, with the group commits it took.
async fn measured_puts(
    store: &Rc<Store<DmaDisk>>,
    writers: usize,
    value: &[u8],
    phase: Duration,
    base: u64,
    name: &str,
) -> anyhow::Result<Measurement> {
    let before = store.stats();
    let (recorder, elapsed) = puts(store, writers, value, phase, base).await?;
    let after = store.stats();
    let mut m = recorder.measurement(name, elapsed);
    let commits = after.commits - before.commits;
    m.records_per_commit =
        Some((after.committed_records - before.committed_records) as f64 / commits.max(1) as f64);
    m.syncs_per_sec = Some((after.syncs - before.syncs) as f64 / elapsed.as_secs_f64());
    Ok(m)
}

/// Closed-loop writers, each putting fresh keys for `phase`.
async fn puts(
    store: &Rc<Store<DmaDisk>>,
    writers: usize,
    value: &[u8],
    phase: Duration,
    base: u64,
) -> anyhow::Result<(Recorder, Duration)> {
    let total = Rc::new(RefCell::new(Recorder::default()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers as u64 {
        let (store, total, value) = (store.clone(), total.clone(), value.to_vec());
        tasks.push(glommio::spawn_local(async move {
            let mut recorder = Recorder::default();
            let mut i = base + (w << 32);
            loop {
                let t = Instant::now();
                store.put(partition(i), &key(i), b"version", &value).await?;
                if recorder.record_since(t) - started >= phase {
                    break;
                }
                i += 1;
            }
            total.borrow_mut().merge(&recorder);
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed();
    let recorder = Rc::try_unwrap(total)
        .map_err(|_| anyhow::anyhow!("writer still running"))?
        .into_inner();
    Ok((recorder, elapsed))
}

/// Loads keys `0..keys` with 64 concurrent writers, sampling the index's bytes per key
/// at `INDEX_SAMPLES` evenly spaced sizes.
async fn load(store: &Rc<Store<DmaDisk>>, keys: u64, value: &[u8]) -> anyhow::Result<IndexMemory> {
    const LOADERS: u64 = 64;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut loaded = 0;
    for step in 1..=INDEX_SAMPLES {
        let until = keys * step / INDEX_SAMPLES;
        if until == loaded {
            continue;
        }
        let mut tasks = Vec::new();
        for l in 0..LOADERS {
            let (store, value) = (store.clone(), value.to_vec());
            tasks.push(glommio::spawn_local(async move {
                let mut i = loaded + l;
                while i < until {
                    store.put(partition(i), &key(i), b"version", &value).await?;
                    i += LOADERS;
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await?;
        }
        loaded = until;
        let usage = store.usage();
        anyhow::ensure!(usage.keys as u64 == loaded, "load lost keys");
        let per_key = (usage.index_bytes - usage.key_bytes) as f64 / usage.keys.max(1) as f64;
        samples.push((loaded, per_key));
    }
    let load_seconds = started.elapsed().as_secs_f64();
    let per_key: Vec<f64> = samples.iter().map(|s| s.1).collect();
    Ok(IndexMemory {
        keys,
        bytes_per_key: per_key.last().copied().unwrap_or(0.0),
        min_bytes_per_key: per_key.iter().copied().fold(f64::INFINITY, f64::min),
        max_bytes_per_key: per_key.iter().copied().fold(0.0, f64::max),
        samples,
        load_seconds,
    })
}

/// One task reading random loaded keys for `phase`.
async fn gets(
    store: &Rc<Store<DmaDisk>>,
    keys: u64,
    phase: Duration,
) -> anyhow::Result<(Recorder, Duration)> {
    let mut rng = fastrand::Rng::with_seed(11);
    let mut recorder = Recorder::default();
    let started = Instant::now();
    let mut n = 0u32;
    loop {
        let i = rng.u64(0..keys);
        let t = Instant::now();
        let record = store.get(partition(i), &key(i)).await?;
        let now = recorder.record_since(t);
        anyhow::ensure!(record.is_some(), "key {i} missing");
        if now - started >= phase {
            break;
        }
        n = n.wrapping_add(1);
        if n.is_multiple_of(4096) {
            // Cache hits never yield on their own; let the commit task breathe.
            glommio::yield_if_needed().await;
        }
    }
    Ok((recorder, started.elapsed()))
}

fn amplification(store: &Store<DmaDisk>) -> f64 {
    let usage = store.usage();
    usage.record_bytes as f64 / usage.live_bytes.max(1) as f64
}

/// Apparent and allocated bytes of every file in `dir`, and allocated bytes of hint files.
fn files_on_disk(dir: &Path) -> anyhow::Result<(u64, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let (mut apparent, mut allocated, mut hints) = (0, 0, 0);
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_file() {
            apparent += meta.len();
            allocated += meta.blocks() * 512;
            if entry.file_name().to_string_lossy().ends_with(".hint") {
                hints += meta.blocks() * 512;
            }
        }
    }
    Ok((apparent, allocated, hints))
}

/// Overwrites a fixed key set uniformly at random with `writers` writers, in the
/// configured durability mode, until it has been rewritten `OVERWRITE_PASSES` times (or
/// `OVERWRITE_PHASES` phases pass), with compaction running in a low-priority queue.
async fn overwrite(root: &Path, o: &EngineBenchOptions, value: &[u8]) -> anyhow::Result<Space> {
    let dir = root.join("overwrite");
    let config = StoreConfig {
        segment_size: OVERWRITE_SEGMENT,
        durability: o.durability,
        ..StoreConfig::default()
    };
    let store = open(&dir, config).await?;
    let queue = glommio::executor().create_task_queue(
        Shares::Static(10),
        Latency::NotImportant,
        "compaction",
    );
    let compactor = store.clone();
    let compaction = io(glommio::spawn_local_into(
        async move { compactor.run_compaction(Duration::from_millis(10)).await },
        queue,
    ))?;
    let keys = OVERWRITE_KEYS;
    let target = keys * OVERWRITE_PASSES;
    let cap = o.phase * OVERWRITE_PHASES;
    let puts = Rc::new(Cell::new(0u64));
    let done = Rc::new(Cell::new(false));
    let peak = Rc::new(Cell::new(0f64));
    let sampler = {
        let (store, done, peak) = (store.clone(), done.clone(), peak.clone());
        glommio::spawn_local(async move {
            while !done.get() {
                glommio::timer::sleep(Duration::from_millis(50)).await;
                peak.set(peak.get().max(amplification(&store)));
            }
        })
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..o.writers.max(1) as u64 {
        let (store, value, puts) = (store.clone(), value.to_vec(), puts.clone());
        tasks.push(glommio::spawn_local(async move {
            let mut rng = fastrand::Rng::with_seed(w);
            while puts.get() < target && started.elapsed() < cap {
                let i = rng.u64(0..keys);
                store.put(partition(i), &key(i), b"version", &value).await?;
                puts.set(puts.get() + 1);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    done.set(true);
    sampler.await;
    let at_end = amplification(&store);
    let end_usage = store.usage();
    let (file_bytes, allocated_bytes, hint_allocated_bytes) = files_on_disk(&dir)?;
    // Let compaction catch up with the last sealed segments, with no writes.
    while store.compact_once().await?.is_some() {}
    let after = amplification(&store);
    let compactions = store.stats().compactions;
    // Closing stops the compaction loop; wait for it rather than cancel it with its
    // I/O in flight.
    store.close().await?;
    compaction.await;
    Ok(Space {
        keys,
        segment_bytes: OVERWRITE_SEGMENT,
        puts: puts.get(),
        passes: puts.get() as f64 / keys as f64,
        seconds,
        compactions,
        peak_amplification: peak.get().max(at_end),
        amplification_at_end: at_end,
        amplification_after_catch_up: after,
        live_bytes: end_usage.live_bytes,
        record_bytes: end_usage.record_bytes,
        segments: end_usage.segments,
        file_bytes,
        allocated_bytes,
        hint_allocated_bytes,
        disk_amplification: allocated_bytes as f64 / end_usage.live_bytes.max(1) as f64,
    })
}
