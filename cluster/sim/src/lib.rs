//! ringkv-sim: a deterministic simulator for ringkv-cluster.
//!
//! [`run`] drives many real [`ringkv_cluster::Node`]s in one thread from a seed: a
//! network that delays, drops, duplicates and reorders messages and splits in two;
//! disks whose writes are pending until a sync and lost in a crash; nodes that crash
//! and restart; clients that write the same keys concurrently. It then holds the run
//! to the checkers in [`checker`]. The same seed always gives the same run (the trace
//! hash proves it), so any failure replays. docs/simulator.md says how to use it.

pub mod checker;
mod dice;
mod disk;
mod history;
pub mod settings;
mod world;

use std::collections::BTreeMap;

pub use checker::{Checker, Violation};
pub use ringkv_cluster::Sabotage;
pub use settings::Settings;

use dice::Dice;
use world::World;

/// What a caller can choose about a run; everything else comes from the seed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Deliberate bugs, to prove the checkers catch them.
    pub sabotage: Sabotage,
    /// Adjusts the seed's settings (a named scenario pins the faults it needs).
    pub tweak: Option<fn(&mut Settings)>,
    /// Print the seed and settings before running (they go first, so a crash of the
    /// simulator itself still names its seed).
    pub verbose: bool,
    /// Skip the anti-entropy phase (to show read repair's own checker can fail).
    pub without_anti_entropy: bool,
}

/// Counters of one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    pub events: u64,
    pub events_hash: u64,
    pub messages_sent: u64,
    pub messages_dropped: u64,
    /// Messages in flight to a node that restarted before they arrived (lost with its
    /// connections, as over TCP).
    pub messages_to_dead_incarnations: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub lost_pending_writes: u64,
    pub puts_acked: u64,
    /// Of `puts_acked`, deletes.
    pub deletes_acked: u64,
    pub puts_not_acked: u64,
    pub gets_ok: u64,
    pub gets_failed: u64,
    pub late_replies: u64,
    pub repairs: u64,
    /// Data-loss faults on the victim node, and the actors nodes gave up over them.
    pub disk_wipes: u64,
    pub records_lost: u64,
    pub writes_failed: u64,
    pub actors_retired: u64,
    pub clock_jumps: u64,
    /// Nodes running more than one shard (one `Node` per shard).
    pub multi_shard_nodes: u64,
    /// Puts refused for the nodes' limits (too many siblings, too large).
    pub puts_refused_for_limits: u64,
    /// Acked puts the nodes resolved (SET and DEL: a quorum read, then the write).
    pub quorum_held_puts_acked: u64,
    /// Deletes-if-present whose read found nothing to delete.
    pub nothing_to_delete: u64,
    /// Puts a node held no replica of and forwarded.
    pub forwarded: u64,
    /// Times a node falsely suspected a live, reachable one.
    pub false_suspicions: u64,
    /// Sloppy quorum: hinted writes stored by stand-ins, refused at the hint bound,
    /// handed off to their targets, expired, recovered from disk at a restart, and
    /// left parked (refused by their target) at the end.
    pub hints_stored: u64,
    /// Acked puts whose W (or SET/DEL read) counted a stand-in.
    pub puts_acked_with_stand_ins: u64,
    pub hints_refused: u64,
    pub hints_handed_off: u64,
    pub hints_expired: u64,
    pub hints_recovered: u64,
    pub hints_parked: u64,
    /// Hinted versions the handoff check found at their targets.
    pub hinted_versions_checked: u64,
    /// Partitions whose incrementally kept Merkle tree was checked against its disk.
    pub trees_checked: u64,
    /// Trees left stale at the end (no anti-entropy phase ran to rebuild them).
    pub stale_trees_skipped: u64,
    /// Anti-entropy rounds it took after healing until every key's replicas agreed,
    /// with no read.
    pub anti_entropy_rounds: u64,
    /// Keys anti-entropy pushed between replicas.
    pub ae_keys_pushed: u64,
    /// Tombstones the nodes collected (every replica held them; see the `collect`
    /// profile).
    pub tombstones_collected: u64,
    /// (acked put, later acked SET or DEL) pairs whose node read was checked.
    pub node_reads_checked: u64,
    /// Writes the resolver made after healing in tight-limit runs.
    pub resolving_puts: u64,
    /// Siblings seen by successful reads (more than one version returned).
    pub reads_with_siblings: u64,
    /// Acked puts checked against later reads by the read checkers.
    pub reads_checked: u64,
    /// Of those, checks on keys of a node that lost data in the run.
    pub reads_checked_near_losses: u64,
    /// Peer input the nodes dropped, by reason.
    pub drops: BTreeMap<String, u64>,
    /// Membership changes proposed, partitions moved to new replicas (and keys
    /// streamed there), partitions dropped after moving away, and the ring epoch the
    /// run ended on.
    pub membership_changes: u64,
    pub partitions_moved: u64,
    pub transfer_keys_sent: u64,
    pub partitions_dropped: u64,
    pub final_ring_epoch: u64,
}

/// The result of one run.
#[derive(Clone, Debug)]
pub struct Report {
    pub seed: u64,
    pub settings: Settings,
    /// A hash of every event and reply in order: equal for equal seeds and options.
    pub trace_hash: u64,
    pub violations: Vec<Violation>,
    pub stats: RunStats,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// One line: seed, verdict, and the counters that show the run did something.
    pub fn summary(&self) -> String {
        let s = &self.stats;
        format!(
            "seed {} {}: {} events, {} puts acked, {} not, {} gets ({} with siblings, {} checks), {} crashes, {} splits, {} lost unsynced writes, {} wipes, {} lost records, {} failed writes, {} actors retired, {} repairs, {} hints stored ({} handed off, {} recovered, {} refused), {} false suspicions, trace {:016x}",
            self.seed,
            if self.passed() { "ok" } else { "FAILED" },
            s.events,
            s.puts_acked,
            s.puts_not_acked,
            s.gets_ok,
            s.reads_with_siblings,
            s.reads_checked,
            s.crashes,
            s.partitions,
            s.lost_pending_writes,
            s.disk_wipes,
            s.records_lost,
            s.writes_failed,
            s.actors_retired,
            s.repairs,
            s.hints_stored,
            s.hints_handed_off,
            s.hints_recovered,
            s.hints_refused,
            s.false_suspicions,
            self.trace_hash
        )
    }
}

/// Runs one simulation. Deterministic: a pure function of `seed` and `options`.
pub fn run(seed: u64, options: &Options) -> Report {
    let mut dice = Dice::new(seed);
    let mut settings = Settings::random(&mut dice);
    if let Some(tweak) = options.tweak {
        tweak(&mut settings);
    }
    if options.verbose {
        println!("seed {seed} settings {settings:?}");
    }
    let mut world = World::new(seed, settings.clone(), dice, *options);
    world.run();
    Report {
        seed,
        settings,
        trace_hash: world.trace_hash(),
        violations: world.violations,
        stats: world.stats,
    }
}
