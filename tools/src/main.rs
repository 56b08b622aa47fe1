//! The `ringkv` binary. It parses arguments and calls the libraries; nothing more.

mod admin;
mod kv;
mod local_cluster;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ringkv_bench::engine::{EngineBenchOptions, EngineBenchReport, run};
use ringkv_bench::load::{self, KeyDistribution, LoadOptions, Workload};
use ringkv_bench::report::print_table;
use ringkv_engine::Durability;
use ringkv_server::config::ServerConfig;

#[derive(Parser)]
#[command(
    name = "ringkv",
    version,
    about = "A leaderless, Dynamo-style replicated key-value store"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

/// Top-level commands.
#[derive(Subcommand)]
enum Command {
    /// A local development cluster of real server processes on loopback (the default
    /// when no command is given): 3 nodes, N=3.
    Cluster(local_cluster::ClusterArgs),
    /// Run a node: one executor per core, native protocol on --listen, Redis protocol
    /// on --resp (the default when no command is given).
    Server(Box<ServerArgs>),
    /// Read a key: its value, or every sibling and the context to resolve them.
    /// Exit 0 found, 1 absent, 3 unreachable, 4 timeout, 5 refused, 6 other.
    Get(kv::GetArgs),
    /// Write a key (the value from standard input when left out).
    Put(kv::PutArgs),
    /// Delete a key.
    Del(kv::DelArgs),
    /// Every node, its shards and partitions, and request counters.
    Status(kv::StatusArgs),
    /// Load a running node or cluster and print ops/s and latency percentiles;
    /// `ringkv bench engine` measures the storage engine alone.
    Bench(BenchCommand),
    /// Membership changes: a node leaves (handing its partitions off first), or a new
    /// node replaces a dead one. A node joins with `ringkv server --join`.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchCommand {
    #[command(subcommand)]
    which: Option<Bench>,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum WorkloadArg {
    /// 50% reads, 50% updates (YCSB A).
    A,
    /// 95% reads, 5% updates (YCSB B).
    B,
    /// Reads only (YCSB C).
    C,
    /// Writes only.
    W,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DistributionArg {
    Uniform,
    Zipfian,
}

#[derive(Args)]
struct LoadArgs {
    /// Any node's native-protocol address.
    #[arg(long, default_value = "127.0.0.1:7500")]
    addr: String,
    /// Connections in all (spread over the shards).
    #[arg(short, long, default_value_t = 50)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Open loop at this many requests per second in all (latencies corrected for
    /// coordinated omission); without it, closed loop.
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, value_enum, default_value_t = WorkloadArg::A)]
    workload: WorkloadArg,
    #[arg(long, value_enum, default_value_t = DistributionArg::Uniform)]
    distribution: DistributionArg,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Skip writing every key once before measuring.
    #[arg(long)]
    no_preload: bool,
    /// Replicas a read must hear from (default: the node's).
    #[arg(long)]
    r: Option<u8>,
    /// Replicas a write must be durable on (default: the node's).
    #[arg(long)]
    w: Option<u8>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of a table (and no progress lines).
    #[arg(long)]
    json: bool,
}

/// What to benchmark. A whole-cluster benchmark joins this enum later.
#[derive(Subcommand)]
enum Bench {
    /// One shard's storage engine on this machine's disk, next to the bare disk.
    Engine(EngineArgs),
}

#[derive(Args)]
struct EngineArgs {
    /// Directory on the filesystem to measure (a scratch directory is made inside it
    /// and removed). Not tmpfs: direct I/O needs a real filesystem.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Concurrent writers for the group-commit and overwrite measurements.
    #[arg(long, default_value_t = 64)]
    writers: usize,
    /// Keys loaded for the read, index-memory and recovery measurements.
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Durability of the measured puts: sync, none, or interval(<ms>), e.g. interval(5ms).
    #[arg(long, default_value = "sync", value_parser = parse_durability)]
    durability: Durability,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Flags override the config file, which overrides the defaults.
#[derive(Args, Default)]
struct ServerArgs {
    /// TOML file with any of the settings below (snake_case keys).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    node_id: Option<u32>,
    /// Native protocol address (HOST:PORT).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Redis protocol address (HOST:PORT); shard i also listens on PORT+1+i.
    #[arg(long)]
    resp: Option<std::net::SocketAddr>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Executors, one per core (default: every available core).
    #[arg(long)]
    shards: Option<usize>,
    /// Partitions of the key space, a power of two (fixed for the life of the data).
    #[arg(long)]
    partitions: Option<u32>,
    /// sync (default), none, or interval(<ms>).
    #[arg(long)]
    durability: Option<String>,
    /// Every member, this node included: id@host:port,... (native addresses).
    #[arg(long, value_delimiter = ',')]
    peers: Option<Vec<String>>,
    /// N, replicas of each key (at most the member count).
    #[arg(long)]
    replicas: Option<usize>,
    /// Microseconds an idle executor polls before it sleeps (0: sleep at once).
    #[arg(long)]
    spin_before_park_us: Option<u64>,
    /// Milliseconds between heartbeats to every member (default 200).
    #[arg(long)]
    heartbeat_interval_ms: Option<u64>,
    /// Milliseconds between pushes of this node's membership view to a few random
    /// members (default 1000).
    #[arg(long)]
    gossip_interval_ms: Option<u64>,
    /// phi at which a silent member is taken for down and routed around (default 8;
    /// higher suspects later and more surely).
    #[arg(long)]
    phi_threshold: Option<f64>,
    /// Most bytes of hints one shard keeps for one down node (default 256 MiB); past
    /// it a sloppy write does not count that stand-in toward W.
    #[arg(long)]
    hint_bytes_max: Option<u64>,
    /// Seconds after which an undelivered hint is dropped and counted (default 10800).
    #[arg(long)]
    hint_age_max_s: Option<u64>,
    /// Handoff pace to a returning node, per shard, in bytes per second (default 8 MiB).
    #[arg(long)]
    handoff_bytes_per_second: Option<u64>,
    /// Milliseconds between Merkle anti-entropy exchanges of each shard, one
    /// partition with one other replica each (default 100; 0: off).
    #[arg(long)]
    anti_entropy_interval_ms: Option<u64>,
    /// Seconds a tombstone is kept at least before it is collected, once every
    /// replica of its key holds it (default 14400; 0: never). Must exceed
    /// --hint-age-max-s plus twice the request timeout.
    #[arg(long)]
    tombstone_grace_s: Option<u64>,
    /// Most keys each shard's anti-entropy pushes to peers per second (default 2000;
    /// 0: no limit): the pace of a replica's catch-up against foreground latency.
    #[arg(long)]
    anti_entropy_pushes_per_second: Option<u64>,
    /// Join a running cluster through this member's native address (HOST:PORT): the
    /// node is added to the ring and its partitions stream to it. Only for a node
    /// with no ring stored yet; later starts follow the stored ring.
    #[arg(long)]
    join: Option<String>,
    /// With --join: take over every partition of this dead node (gone for good).
    #[arg(long, requires = "join")]
    replace: Option<u32>,
    /// Most keys each shard streams to new replicas per second during a membership
    /// change (default 20000; 0: no limit).
    #[arg(long)]
    transfer_keys_per_second: Option<u64>,
}

fn parse_durability(s: &str) -> Result<Durability, String> {
    s.parse()
        .map_err(|e: ringkv_engine::StoreError| e.to_string())
}

/// Errors end as one line on stderr and exit status 1 (no debug dump: an operator
/// reads this).
fn main() -> ExitCode {
    match dispatch() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ringkv: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping causes the message already quotes.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line = format!("{line}: {cause}");
        }
    }
    line
}

fn dispatch() -> anyhow::Result<ExitCode> {
    let done = |result: anyhow::Result<()>| result.map(|()| ExitCode::SUCCESS);
    match Cli::parse().command {
        None => done(local_cluster::run(local_cluster::ClusterArgs::default())),
        Some(Command::Cluster(args)) => done(local_cluster::run(args)),
        Some(Command::Server(args)) => done(server(*args)),
        Some(Command::Get(args)) => Ok(kv::get(args)),
        Some(Command::Put(args)) => Ok(kv::put(args)),
        Some(Command::Del(args)) => Ok(kv::del(args)),
        Some(Command::Status(args)) => Ok(kv::status(args)),
        Some(Command::Admin(command)) => done(admin::run(command)),
        Some(Command::Bench(BenchCommand {
            which: Some(Bench::Engine(args)),
            ..
        })) => done(bench_engine(args)),
        Some(Command::Bench(BenchCommand { which: None, load })) => done(bench_load(load)),
    }
}

fn server(args: ServerArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => ServerConfig::from_file(path)?,
        None => ServerConfig::default(),
    };
    config.node_id = args.node_id.unwrap_or(config.node_id);
    config.listen = args.listen.unwrap_or(config.listen);
    config.resp = args.resp.unwrap_or(config.resp);
    config.data_dir = args.data_dir.unwrap_or(config.data_dir);
    config.shards = args.shards.unwrap_or(config.shards);
    config.partitions = args.partitions.unwrap_or(config.partitions);
    config.durability = args.durability.unwrap_or(config.durability);
    config.peers = args.peers.unwrap_or(config.peers);
    config.replicas = args.replicas.unwrap_or(config.replicas);
    config.spin_before_park_us = args
        .spin_before_park_us
        .unwrap_or(config.spin_before_park_us);
    config.heartbeat_interval_ms = args
        .heartbeat_interval_ms
        .unwrap_or(config.heartbeat_interval_ms);
    config.gossip_interval_ms = args.gossip_interval_ms.unwrap_or(config.gossip_interval_ms);
    config.phi_threshold = args.phi_threshold.unwrap_or(config.phi_threshold);
    config.hint_bytes_max = args.hint_bytes_max.unwrap_or(config.hint_bytes_max);
    config.hint_age_max_s = args.hint_age_max_s.unwrap_or(config.hint_age_max_s);
    config.handoff_bytes_per_second = args
        .handoff_bytes_per_second
        .unwrap_or(config.handoff_bytes_per_second);
    config.anti_entropy_interval_ms = args
        .anti_entropy_interval_ms
        .unwrap_or(config.anti_entropy_interval_ms);
    config.tombstone_grace_s = args.tombstone_grace_s.unwrap_or(config.tombstone_grace_s);
    config.anti_entropy_pushes_per_second = args
        .anti_entropy_pushes_per_second
        .unwrap_or(config.anti_entropy_pushes_per_second);
    config.join = args.join.or(config.join);
    config.replace = args.replace.or(config.replace);
    config.transfer_keys_per_second = args
        .transfer_keys_per_second
        .unwrap_or(config.transfer_keys_per_second);
    // The server's warnings (a failed fsync, corruption met) and progress lines (a
    // replica catching up) go to stderr; RUST_LOG chooses more or less.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logging = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    if let Err(err) = logging {
        eprintln!("ringkv: no log output: {err}");
    }
    ringkv_server::runtime::run(config)?;
    Ok(())
}

fn bench_load(args: LoadArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.seconds > 0.0 && args.seconds.is_finite(),
        "--seconds must be above zero"
    );
    let options = LoadOptions {
        addr: args.addr,
        connections: args.connections,
        depth: args.depth,
        duration: Duration::from_secs_f64(args.seconds),
        rate: args.rate,
        workload: match args.workload {
            WorkloadArg::A => Workload::A,
            WorkloadArg::B => Workload::B,
            WorkloadArg::C => Workload::C,
            WorkloadArg::W => Workload::W,
        },
        distribution: match args.distribution {
            DistributionArg::Uniform => KeyDistribution::Uniform,
            DistributionArg::Zipfian => KeyDistribution::Zipfian,
        },
        keys: args.keys,
        value_size: args.value_size,
        preload: !args.no_preload,
        r: args.r,
        w: args.w,
        seed: args.seed,
        progress: !args.json,
    };
    let report = load::run(&options)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        load::print_report(&report);
    }
    Ok(())
}

fn bench_engine(args: EngineArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.seconds > 0.0 && args.seconds.is_finite(),
        "--seconds must be above zero"
    );
    anyhow::ensure!(args.value_size > 0, "--value-size must be above zero");
    let durability = args.durability;
    let options = EngineBenchOptions {
        dir: args.dir,
        value_size: args.value_size,
        writers: args.writers.max(1),
        keys: args.keys.max(1),
        phase: Duration::from_secs_f64(args.seconds),
        durability,
    };
    let report = run(&options)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &EngineBenchReport) {
    println!(
        "ringkv bench engine: value {} B, {} writers, durability {}, {} keys, {:.1} s per phase",
        r.value_size, r.writers, r.durability, r.index.keys, r.phase_seconds
    );
    println!(
        "load average before {}, after {} (2 cores: above ~0.3 means other work shared the machine)",
        r.loadavg_before, r.loadavg_after
    );
    print_table(&r.measurements);
    let i = &r.index;
    println!(
        "index bytes per key beyond key bytes: {:.1} at {} keys (min {:.1}, max {:.1} over {} sizes while loading in {:.1} s)",
        i.bytes_per_key,
        i.keys,
        i.min_bytes_per_key,
        i.max_bytes_per_key,
        i.samples.len(),
        i.load_seconds
    );
    println!(
        "recovery (Store::open) of {} keys in {} segments: {:.3} s ({} segments scanned without a hint)",
        r.recovery.keys, r.recovery.segments, r.recovery.seconds, r.recovery.scanned_segments
    );
    let s = &r.space;
    println!(
        "space, {} keys overwritten {:.1} times in {:.1} s ({} segments of {} MiB, {} compactions): \
         records/live {:.2}x peak, {:.2}x at end, {:.2}x after compaction caught up; \
         on disk {:.1} MiB allocated ({:.1} MiB of it hint files) for {:.1} MiB live ({:.2}x)",
        s.keys,
        s.passes,
        s.seconds,
        s.segments,
        s.segment_bytes >> 20,
        s.compactions,
        s.peak_amplification,
        s.amplification_at_end,
        s.amplification_after_catch_up,
        s.allocated_bytes as f64 / (1 << 20) as f64,
        s.hint_allocated_bytes as f64 / (1 << 20) as f64,
        s.live_bytes as f64 / (1 << 20) as f64,
        s.disk_amplification
    );
}
