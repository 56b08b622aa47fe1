//! The `ringkv` binary. It parses arguments and calls the libraries; nothing more.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ringkv_bench::engine::{EngineBenchOptions, run};
use ringkv_bench::report::print_table;
use ringkv_engine::Durability;

#[derive(Parser)]
#[command(
    name = "ringkv",
    version,
    about = "A leaderless, Dynamo-style replicated key-value store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks that print numbers.
    #[command(subcommand)]
    Bench(Bench),
}

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
    /// Concurrent writers for the group-commit measurement.
    #[arg(long, default_value_t = 64)]
    writers: usize,
    /// Keys loaded for the read, index-memory and recovery measurements.
    #[arg(long, default_value_t = 200_000)]
    keys: u64,
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// sync, none, or interval(<ms>)
    #[arg(long, default_value = "sync")]
    durability: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench(Bench::Engine(args)) => bench_engine(args),
    }
}

fn bench_engine(args: EngineArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.seconds > 0.0, "--seconds must be above zero");
    let durability: Durability = args.durability.parse()?;
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
        return Ok(());
    }
    println!(
        "ringkv bench engine: value {} B, {} writers, durability {:?}, {} keys, {:.1} s per phase",
        options.value_size, options.writers, options.durability, options.keys, args.seconds
    );
    print_table(&report.measurements);
    println!(
        "index bytes per key (beyond key bytes): {:.1}",
        report.index_bytes_per_key
    );
    println!(
        "recovery of {} keys: {:.3} s",
        report.keys_loaded, report.recovery_seconds
    );
    println!(
        "space after steady overwrite with compaction: {:.2}x live data ({} compactions)",
        report.space_amplification, report.compactions
    );
    Ok(())
}
