//! `ringkv bench`: a load generator for a running node or cluster, through the client.
//!
//! Closed loop: `connections x depth` workers each keep one request in flight and send
//! the next as soon as the last is answered. Open loop (`rate`): requests are scheduled
//! at fixed intervals and each latency is measured from when its request *should*
//! have been sent, so a stalled server shows up as the queueing delay every delayed
//! request really suffers (coordinated omission corrected, as wrk2 does).
//!
//! Workloads follow YCSB's core mixes: A 50% reads / 50% updates, B 95/5, C read-only,
//! W write-only; keys uniform or zipfian (YCSB's constant 0.99, ranks scrambled over
//! the key space so the hot keys are not neighbours).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Zipf};
use ringkv_client::{AsyncClient, PutMode, ReadOptions, RetryPolicy, WriteOptions};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Workload {
    /// 50% reads, 50% updates.
    A,
    /// 95% reads, 5% updates.
    B,
    /// Reads only.
    C,
    /// Writes only.
    W,
}

impl Workload {
    fn read_share(self) -> f64 {
        match self {
            Workload::A => 0.5,
            Workload::B => 0.95,
            Workload::C => 1.0,
            Workload::W => 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum KeyDistribution {
    Uniform,
    Zipfian,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub addr: String,
    pub connections: usize,
    pub depth: usize,
    pub duration: Duration,
    /// Requests per second in all (open loop); None: closed loop.
    pub rate: Option<f64>,
    pub workload: Workload,
    pub distribution: KeyDistribution,
    pub keys: u64,
    pub value_size: usize,
    /// Write every key once before measuring, so reads find values.
    pub preload: bool,
    pub r: Option<u8>,
    pub w: Option<u8>,
    pub seed: u64,
    /// Print a progress line to stderr every second.
    pub progress: bool,
}

/// One operation's results.
#[derive(Debug, Clone, Serialize)]
pub struct OpReport {
    pub name: String,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub addr: String,
    pub workload: Workload,
    pub distribution: KeyDistribution,
    pub connections: usize,
    pub depth: usize,
    pub rate: Option<f64>,
    pub keys: u64,
    pub value_size: usize,
    pub seconds: f64,
    pub operations: Vec<OpReport>,
    /// The first few distinct error messages, to tell what went wrong.
    pub error_samples: Vec<String>,
}

/// Latencies and errors of one worker, merged at the end (no sharing while running).
struct Tally {
    reads: Histogram<u64>,
    writes: Histogram<u64>,
    read_errors: u64,
    write_errors: u64,
    error_samples: Vec<String>,
}

impl Tally {
    fn new() -> Tally {
        let histogram = || Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
        Tally {
            reads: histogram(),
            writes: histogram(),
            read_errors: 0,
            write_errors: 0,
            error_samples: Vec::new(),
        }
    }

    fn merge(&mut self, other: Tally) {
        self.reads.add(&other.reads).expect("same bounds");
        self.writes.add(&other.writes).expect("same bounds");
        self.read_errors += other.read_errors;
        self.write_errors += other.write_errors;
        for sample in other.error_samples {
            if self.error_samples.len() < 5 && !self.error_samples.contains(&sample) {
                self.error_samples.push(sample);
            }
        }
    }
}

/// Picks keys by the configured distribution.
struct Keys {
    count: u64,
    zipf: Option<Zipf<f64>>,
}

impl Keys {
    fn new(count: u64, distribution: KeyDistribution) -> anyhow::Result<Keys> {
        let zipf = match distribution {
            KeyDistribution::Uniform => None,
            KeyDistribution::Zipfian => Some(Zipf::new(count as f64, 0.99)?),
        };
        Ok(Keys { count, zipf })
    }

    fn pick(&self, rng: &mut SmallRng) -> u64 {
        match &self.zipf {
            None => rng.random_range(0..self.count),
            // Rank 1 is the hottest; scramble ranks so hot keys spread over the space.
            Some(zipf) => {
                let rank = zipf.sample(rng) as u64;
                xxhash_rust::xxh3::xxh3_64(&rank.to_le_bytes()) % self.count
            }
        }
    }
}

pub fn key(index: u64) -> Vec<u8> {
    format!("user{index:012}").into_bytes()
}

/// Runs the load and returns what it measured. Needs no runtime of its own: it starts
/// a tokio runtime with a worker per core.
pub fn run(options: &LoadOptions) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(options.keys > 0, "--keys must be above zero");
    anyhow::ensure!(
        options.connections > 0 && options.depth > 0,
        "--connections and --depth must be above zero"
    );
    if let Some(rate) = options.rate {
        anyhow::ensure!(rate > 0.0 && rate.is_finite(), "--rate must be above zero");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ringkv-bench")
        .build()?;
    runtime.block_on(drive(options))
}

async fn drive(options: &LoadOptions) -> anyhow::Result<LoadReport> {
    let client = connect(options).await?;
    if options.preload {
        preload(&client, options).await?;
    }
    let keys = Arc::new(Keys::new(options.keys, options.distribution)?);
    let value: Arc<[u8]> = vec![b'x'; options.value_size].into();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tickets = Arc::new(AtomicU64::new(0));
    let workers = options.connections * options.depth;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(workers);
    for worker in 0..workers {
        let context = Worker {
            client: client.clone(),
            keys: keys.clone(),
            value: value.clone(),
            done: done.clone(),
            stop: stop.clone(),
            tickets: tickets.clone(),
            rng: SmallRng::seed_from_u64(options.seed.wrapping_add(worker as u64)),
            read_share: options.workload.read_share(),
            rate: options.rate,
            start,
            read: ReadOptions {
                r: options.r,
                ..ReadOptions::default()
            },
            write: WriteOptions {
                w: options.w,
                ..WriteOptions::default()
            },
        };
        tasks.push(tokio::spawn(context.run()));
    }
    let mut last = 0;
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    while start.elapsed() < options.duration {
        let left = options.duration.saturating_sub(start.elapsed());
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep(left) => break,
        }
        let now = done.load(Ordering::Relaxed);
        if options.progress {
            eprintln!(
                "[{:>5.1} s] {:>10.0} ops/s  ({} ops)",
                start.elapsed().as_secs_f64(),
                (now - last) as f64,
                now
            );
        }
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    let seconds = start.elapsed().as_secs_f64();
    let mut total = Tally::new();
    for task in tasks {
        total.merge(task.await?);
    }
    let report = |name: &str, histogram: &Histogram<u64>, errors: u64| {
        let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        OpReport {
            name: name.into(),
            ops: histogram.len(),
            ops_per_sec: histogram.len() as f64 / seconds,
            p50_us: us(0.5),
            p90_us: us(0.9),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: histogram.max() as f64 / 1000.0,
            errors,
        }
    };
    let mut operations = Vec::new();
    if options.workload != Workload::W {
        operations.push(report("read", &total.reads, total.read_errors));
    }
    if options.workload != Workload::C {
        let name = if options.workload == Workload::W {
            "write"
        } else {
            "update"
        };
        operations.push(report(name, &total.writes, total.write_errors));
    }
    Ok(LoadReport {
        addr: options.addr.clone(),
        workload: options.workload,
        distribution: options.distribution,
        connections: options.connections,
        depth: options.depth,
        rate: options.rate,
        keys: options.keys,
        value_size: options.value_size,
        seconds,
        operations,
        error_samples: total.error_samples,
    })
}

/// A client with about `connections` connections in all, spread over the shards.
async fn connect(options: &LoadOptions) -> anyhow::Result<AsyncClient> {
    let builder = || {
        AsyncClient::builder()
            .seeds([options.addr.clone()])
            .client_name("ringkv bench")
            // A benchmark reports errors; it does not hide them behind retries.
            .retry(RetryPolicy::none())
    };
    let probe = builder().connect().await?;
    let topology = probe.topology().await?;
    let shards: usize = topology
        .nodes
        .iter()
        .map(|n| n.shard_native.len().max(1))
        .sum();
    let per_shard = options.connections.div_ceil(shards.max(1));
    Ok(builder().connections_per_shard(per_shard).connect().await?)
}

async fn preload(client: &AsyncClient, options: &LoadOptions) -> anyhow::Result<()> {
    let value = vec![b'x'; options.value_size];
    let next = Arc::new(AtomicU64::new(0));
    let loaders = (0..(options.connections * options.depth).clamp(1, 256)).map(|_| {
        let (client, next, value) = (client.clone(), next.clone(), value.clone());
        let (keys, w) = (options.keys, options.w);
        tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return Ok::<(), ringkv_client::Error>(());
                }
                let options = WriteOptions {
                    w,
                    ..WriteOptions::default()
                };
                client
                    .put_with(&key(i), &value, PutMode::Latest, options)
                    .await?;
            }
        })
    });
    for loader in loaders.collect::<Vec<_>>() {
        loader.await??;
    }
    Ok(())
}

struct Worker {
    client: AsyncClient,
    keys: Arc<Keys>,
    value: Arc<[u8]>,
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tickets: Arc<AtomicU64>,
    rng: SmallRng,
    read_share: f64,
    rate: Option<f64>,
    start: Instant,
    read: ReadOptions,
    write: WriteOptions,
}

impl Worker {
    async fn run(mut self) -> Tally {
        let mut tally = Tally::new();
        while !self.stop.load(Ordering::Relaxed) {
            // Open loop: the request's intended start; closed loop: now.
            let intended = match self.rate {
                Some(rate) => {
                    let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
                    let at = self.start + Duration::from_secs_f64(ticket as f64 / rate);
                    tokio::time::sleep_until(at.into()).await;
                    if self.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    at
                }
                None => Instant::now(),
            };
            let key = key(self.keys.pick(&mut self.rng));
            let is_read = self.rng.random::<f64>() < self.read_share;
            let result = if is_read {
                self.client.get_with(&key, self.read).await.map(|_| ())
            } else {
                let mode = PutMode::Latest;
                self.client
                    .put_with(&key, &self.value, mode, self.write)
                    .await
            };
            let nanos = intended.elapsed().as_nanos().min(u64::MAX as u128) as u64;
            let (histogram, errors) = if is_read {
                (&mut tally.reads, &mut tally.read_errors)
            } else {
                (&mut tally.writes, &mut tally.write_errors)
            };
            match result {
                Ok(()) => {
                    let _ = histogram.record(nanos.max(1));
                }
                Err(e) => {
                    *errors += 1;
                    let message = e.to_string();
                    if tally.error_samples.len() < 5 && !tally.error_samples.contains(&message) {
                        tally.error_samples.push(message);
                    }
                }
            }
            self.done.fetch_add(1, Ordering::Relaxed);
        }
        tally
    }
}

/// The table `ringkv bench` prints.
pub fn print_report(report: &LoadReport) {
    let mode = match report.rate {
        Some(rate) => format!("open loop at {rate:.0} ops/s"),
        None => format!(
            "closed loop, {} x {} in flight",
            report.connections, report.depth
        ),
    };
    println!(
        "ringkv bench: workload {:?}, {:?} keys ({}), values {} B, {mode}, {:.1} s against {}",
        report.workload,
        report.distribution,
        report.keys,
        report.value_size,
        report.seconds,
        report.addr
    );
    println!(
        "{:<8} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "op", "ops", "ops/s", "p50 us", "p90 us", "p99 us", "p999 us", "max us", "errors"
    );
    for op in &report.operations {
        println!(
            "{:<8} {:>10} {:>12.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>8}",
            op.name,
            op.ops,
            op.ops_per_sec,
            op.p50_us,
            op.p90_us,
            op.p99_us,
            op.p999_us,
            op.max_us,
            op.errors
        );
    }
    for sample in &report.error_samples {
        println!("error: {sample}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipfian_keys_are_skewed_and_in_range() {
        let keys = Keys::new(1000, KeyDistribution::Zipfian).unwrap();
        let mut rng = SmallRng::seed_from_u64(1);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[keys.pick(&mut rng) as usize] += 1;
        }
        counts.sort_unstable_by(|a, b| b.cmp(a));
        // The hottest key alone takes far more than a uniform share (100).
        assert!(counts[0] > 5_000, "hottest {}", counts[0]);
        let uniform = Keys::new(1000, KeyDistribution::Uniform).unwrap();
        assert!((0..10_000).all(|_| uniform.pick(&mut rng) < 1000));
    }
}
