//! The simulator's own tests: a fixed batch of seeds (CI), an open-ended sweep and a
//! single-seed replay (by environment variable), determinism, and proof that the
//! checkers catch deliberately broken nodes.

use ringkv_sim::{Checker, Options, Report, RunStats, Sabotage, run};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be an integer, got {v:?}"))
    })
}

fn run_logged(seed: u64, options: &Options) -> Report {
    let report = run(seed, options);
    println!("{}", report.summary());
    for violation in &report.violations {
        println!("  {:?}: {}", violation.checker, violation.detail);
    }
    report
}

/// RINGKV_SIM_FAULTS=heavy turns on the crash-heavy fault profile for sweeps and
/// replays; RINGKV_SIM_FAULTS=loss the data-loss profile; =split (and =split-w1, every
/// write at W=1) long, detected splits over lossy links; =collect many deletes with
/// tombstone collection on; =membership a node joining, leaving or replacing a dead one.
fn sweep_options() -> Options {
    let tweak: Option<fn(&mut ringkv_sim::Settings)> =
        match std::env::var("RINGKV_SIM_FAULTS").as_deref() {
            Ok("heavy") => Some(crash_heavy),
            Ok("loss") => Some(data_loss_heavy),
            Ok("split") => Some(split_heavy),
            Ok("split-w1") => Some(split_heavy_w1),
            Ok("collect") => Some(tombstone_collection),
            Ok("membership") => Some(membership_change),
            _ => None,
        };
    Options {
        tweak,
        ..Options::default()
    }
}

/// Seeds 0..CI_SEEDS, every checker after every run.
const CI_SEEDS: u64 = 500;
/// Seeds 0..CI_HEAVY_SEEDS again under the crash-heavy profile.
const CI_HEAVY_SEEDS: u64 = 150;

#[test]
fn fixed_seed_batch_passes_every_checker() {
    let options = Options::default();
    let mut total = RunStats::default();
    let failing: Vec<u64> = (0..CI_SEEDS)
        .filter(|&seed| {
            let report = run_logged(seed, &options);
            add(&mut total, &report.stats);
            !report.passed()
        })
        .collect();
    assert!(
        failing.is_empty(),
        "failing seeds: {failing:?} (replay with RINGKV_SIM_SEED=<seed>)"
    );
    assert_did_something(&total);
}

/// Sums what a batch did.
fn add(total: &mut RunStats, run: &RunStats) {
    total.puts_acked += run.puts_acked;
    total.deletes_acked += run.deletes_acked;
    total.gets_ok += run.gets_ok;
    total.reads_checked += run.reads_checked;
    total.reads_checked_near_losses += run.reads_checked_near_losses;
    total.reads_with_siblings += run.reads_with_siblings;
    total.crashes += run.crashes;
    total.disk_wipes += run.disk_wipes;
    total.records_lost += run.records_lost;
    total.writes_failed += run.writes_failed;
    total.actors_retired += run.actors_retired;
    total.clock_jumps += run.clock_jumps;
    total.multi_shard_nodes += run.multi_shard_nodes;
    total.puts_refused_for_limits += run.puts_refused_for_limits;
    total.resolving_puts += run.resolving_puts;
    total.quorum_held_puts_acked += run.quorum_held_puts_acked;
    total.nothing_to_delete += run.nothing_to_delete;
    total.forwarded += run.forwarded;
    total.node_reads_checked += run.node_reads_checked;
    total.false_suspicions += run.false_suspicions;
    total.hints_stored += run.hints_stored;
    total.puts_acked_with_stand_ins += run.puts_acked_with_stand_ins;
    total.hints_refused += run.hints_refused;
    total.hints_handed_off += run.hints_handed_off;
    total.hints_recovered += run.hints_recovered;
    total.partitions += run.partitions;
    total.hinted_versions_checked += run.hinted_versions_checked;
    total.trees_checked += run.trees_checked;
    total.ae_keys_pushed += run.ae_keys_pushed;
    for (reason, count) in &run.drops {
        *total.drops.entry(reason.clone()).or_default() += count;
    }
}

/// A batch that passed while acknowledging nothing, or without ever meeting a fault,
/// proved nothing: say what it did and insist on each kind of it.
fn assert_did_something(total: &RunStats) {
    println!(
        "batch: {} puts acked ({} deletes), {} gets, {} read checks, {} reads with siblings, \
         {} crashes, {} wiped disks, {} lost records, {} failed writes, {} actors retired, \
         {} clock jumps, {} puts refused for limits, {} resolving puts, {} multi-shard nodes, \
         {} SET/DEL acked, {} DEL with nothing to delete, {} forwarded puts, \
         {} SET/DEL read checks, {} splits, {} false suspicions, {} hints stored, \
         {} handed off, {} recovered at restarts, {} refused at their bound",
        total.puts_acked,
        total.deletes_acked,
        total.gets_ok,
        total.reads_checked,
        total.reads_with_siblings,
        total.crashes,
        total.disk_wipes,
        total.records_lost,
        total.writes_failed,
        total.actors_retired,
        total.clock_jumps,
        total.puts_refused_for_limits,
        total.resolving_puts,
        total.multi_shard_nodes,
        total.quorum_held_puts_acked,
        total.nothing_to_delete,
        total.forwarded,
        total.node_reads_checked,
        total.partitions,
        total.false_suspicions,
        total.hints_stored,
        total.hints_handed_off,
        total.hints_recovered,
        total.hints_refused
    );
    for (what, count) in [
        ("acked puts", total.puts_acked),
        ("acked deletes", total.deletes_acked),
        ("read checks", total.reads_checked),
        ("reads with siblings", total.reads_with_siblings),
        ("crashes", total.crashes),
        ("wiped disks", total.disk_wipes),
        ("lost records", total.records_lost),
        ("failed writes", total.writes_failed),
        ("retired actors", total.actors_retired),
        ("clock jumps", total.clock_jumps),
        ("puts refused for limits", total.puts_refused_for_limits),
        ("resolving puts", total.resolving_puts),
        ("multi-shard nodes", total.multi_shard_nodes),
        ("acked SETs and DELs", total.quorum_held_puts_acked),
        ("DELs with nothing to delete", total.nothing_to_delete),
        ("forwarded puts", total.forwarded),
        ("SET/DEL read checks", total.node_reads_checked),
        ("network splits", total.partitions),
        ("false suspicions", total.false_suspicions),
        ("hinted writes", total.hints_stored),
        ("puts acked with stand-ins", total.puts_acked_with_stand_ins),
        ("hints handed off", total.hints_handed_off),
        ("hints recovered at a restart", total.hints_recovered),
        ("hints refused at their bound", total.hints_refused),
        (
            "hinted versions checked at their targets",
            total.hinted_versions_checked,
        ),
        (
            "Merkle trees checked against their disks",
            total.trees_checked,
        ),
        ("keys pushed by anti-entropy", total.ae_keys_pushed),
        (
            "duplicated forwards dropped",
            total.drops.get("DuplicateForward").copied().unwrap_or(0),
        ),
    ] {
        assert!(count > 0, "the batch had no {what}");
    }
}

#[test]
fn fixed_seed_batch_passes_under_heavy_crashes() {
    let options = Options {
        tweak: Some(crash_heavy),
        ..Options::default()
    };
    let failing: Vec<u64> = (0..CI_HEAVY_SEEDS)
        .filter(|&seed| !run_logged(seed, &options).passed())
        .collect();
    assert!(
        failing.is_empty(),
        "failing seeds: {failing:?} (replay with RINGKV_SIM_FAULTS=heavy RINGKV_SIM_SEED=<seed>)"
    );
}

#[test]
fn same_seed_same_trace() {
    let options = Options::default();
    for seed in [3, 17] {
        let first = run(seed, &options);
        let second = run(seed, &options);
        assert_eq!(
            first.trace_hash, second.trace_hash,
            "seed {seed} is not deterministic"
        );
        assert_eq!(first.stats, second.stats);
    }
    assert_ne!(run(3, &options).trace_hash, run(4, &options).trace_hash);
}

/// `RINGKV_SIM_SEEDS=10000 cargo test -p ringkv-sim --release sweep -- --nocapture`
/// runs seeds from RINGKV_SIM_FIRST_SEED (default 1000) on and lists the failures.
#[test]
fn sweep() {
    let Some(count) = env_u64("RINGKV_SIM_SEEDS") else {
        println!("set RINGKV_SIM_SEEDS=<count> to sweep");
        return;
    };
    let first = env_u64("RINGKV_SIM_FIRST_SEED").unwrap_or(1000);
    let options = sweep_options();
    let mut failing = Vec::new();
    for seed in first..first + count {
        let report = run(seed, &options);
        if !report.passed() {
            println!("{}", report.summary());
            for violation in report.violations.iter().take(5) {
                println!("  {:?}: {}", violation.checker, violation.detail);
            }
            failing.push(seed);
        }
    }
    println!(
        "swept {count} seeds from {first}: {} failed {failing:?}",
        failing.len()
    );
    assert!(failing.is_empty(), "failing seeds: {failing:?}");
}

/// `RINGKV_SIM_SEED=1234 cargo test -p ringkv-sim replay -- --nocapture` replays one
/// seed, printing its settings and every violation.
#[test]
fn replay() {
    let Some(seed) = env_u64("RINGKV_SIM_SEED") else {
        println!("set RINGKV_SIM_SEED=<seed> to replay one seed");
        return;
    };
    let options = Options {
        verbose: true,
        ..sweep_options()
    };
    let report = run_logged(seed, &options);
    println!("{:#?}", report.stats);
    assert!(report.passed());
}

/// Deletes (a third of the writes, and DEL) with tombstone collection on, under the
/// seed's faults: the grace period is a few request timeouts, so tombstones are
/// collected while nodes crash, links drop and split. Requests are strict (no
/// stand-ins, so no hint outlives a grace this short; the server's grace must exceed
/// its hint age, checked at start), and clocks agree within the grace.
fn tombstone_collection(settings: &mut ringkv_sim::Settings) {
    settings.delete_per_mille = settings.delete_per_mille.max(330);
    settings.delete_if_present_per_mille = settings.delete_if_present_per_mille.max(100);
    settings.strict_per_mille = 1000;
    settings.clock_skew_max_ms = settings.clock_skew_max_ms.min(50);
    settings.clock_jump_per_mille = 0;
    // More keys, written less often: a deleted key stays deleted past the grace
    // period, so tombstones are collected while faults strike and writes go on.
    settings.keys = settings.keys.max(10);
    settings.think_max_ms = settings.think_max_ms.max(300);
    settings.safety_ms = settings.safety_ms.max(5_000);
    let grace = 2 * settings.request_timeout_ms + 2 * settings.clock_skew_max_ms + 100;
    settings.tombstone_grace_ms = Some(grace);
}

/// Seeds of the `collect` profile, in CI.
const CI_COLLECT_SEEDS: u64 = 150;

#[test]
fn fixed_seed_batch_passes_with_tombstone_collection() {
    let options = Options {
        tweak: Some(tombstone_collection),
        ..Options::default()
    };
    let mut collected = 0;
    let mut deletes = 0;
    let failing: Vec<u64> = (0..CI_COLLECT_SEEDS)
        .filter(|&seed| {
            let report = run_logged(seed, &options);
            collected += report.stats.tombstones_collected;
            deletes += report.stats.deletes_acked;
            !report.passed()
        })
        .collect();
    println!("{deletes} deletes acked, {collected} tombstones collected");
    assert!(
        failing.is_empty(),
        "failing seeds: {failing:?} (replay with RINGKV_SIM_FAULTS=collect RINGKV_SIM_SEED=<seed>)"
    );
    assert!(deletes > 0 && collected > 0, "the batch collected nothing");
}

/// A replica that collects a tombstone without asking the others lets one that
/// still holds the deleted value bring it back.
#[test]
fn checkers_catch_tombstones_collected_unconfirmed() {
    let options = Options {
        sabotage: Sabotage {
            collect_unconfirmed: true,
            ..Sabotage::default()
        },
        tweak: Some(tombstone_collection),
        ..Options::default()
    };
    let checkers = [Checker::NoResurrection, Checker::AckedWriteReadable];
    let caught = caught_only_with_sabotage(&options, &checkers, 60);
    println!("unconfirmed collection caught on seeds {caught:?}");
    assert!(!caught.is_empty(), "unconfirmed collection never caught");
}

/// After a collection, a home dot drawn from the key's copy and context alone
/// repeats one an old context names: a write with that context supersedes it unseen.
#[test]
fn checkers_catch_dots_redrawn_after_collection() {
    let options = Options {
        sabotage: Sabotage {
            dense_counters_after_collection: true,
            ..Sabotage::default()
        },
        tweak: Some(tombstone_collection),
        ..Options::default()
    };
    let checkers = [
        Checker::DuplicateDot,
        Checker::AckedWriteReadable,
        Checker::SiblingsSurvive,
    ];
    let caught = caught_only_with_sabotage(&options, &checkers, 60);
    println!("redrawn dots caught on seeds {caught:?}");
    assert!(!caught.is_empty(), "redrawn dots never caught");
}

/// Faults that make lost unsynced writes likely: frequent crashes, slow syncs.
fn crash_heavy(settings: &mut ringkv_sim::Settings) {
    settings.crash_per_mille = 300;
    settings.downtime_max_ms = 200;
    settings.sync_delay_max_ms = 150;
    settings.safety_ms = 3_000;
}

/// Checker 2 must catch a merge that keeps one sibling: the broken node loses
/// concurrent writes, and some seed of a small batch must show it.
#[test]
fn checkers_catch_a_merge_that_drops_siblings() {
    let options = Options {
        sabotage: Sabotage {
            keep_one_sibling: true,
            ..Sabotage::default()
        },
        ..Options::default()
    };
    let caught: Vec<u64> = (0..10)
        .filter(|&seed| {
            run(seed, &options).violations.iter().any(|v| {
                v.checker == Checker::SiblingsSurvive || v.checker == Checker::AckedWriteReadable
            })
        })
        .collect();
    println!("sibling-dropping merge caught on seeds {caught:?}");
    assert!(caught.len() >= 5, "caught only on {caught:?}");
}

/// Checker 1 must catch acks sent before the write is durable: crashes then lose
/// acknowledged writes.
#[test]
fn checkers_catch_acks_before_durability() {
    let options = Options {
        sabotage: Sabotage {
            ack_before_durable: true,
            ..Sabotage::default()
        },
        tweak: Some(crash_heavy),
        ..Options::default()
    };
    let checkers = [Checker::AckedWriteReadable, Checker::SiblingsSurvive];
    let caught = caught_only_with_sabotage(&options, &checkers, 20);
    println!("early acks caught on seeds {caught:?}");
    assert!(!caught.is_empty(), "early acks never caught");
}

/// Runs seeds 0..count with `sabotaged` and returns those where one of `checkers`
/// fired, after showing each of them passes with the same faults and no sabotage:
/// the checkers flag the bug, not the fault load.
fn caught_only_with_sabotage(sabotaged: &Options, checkers: &[Checker], count: u64) -> Vec<u64> {
    let caught: Vec<u64> = (0..count)
        .filter(|&seed| {
            run(seed, sabotaged)
                .violations
                .iter()
                .any(|v| checkers.contains(&v.checker))
        })
        .collect();
    let honest = Options {
        sabotage: Sabotage::default(),
        ..*sabotaged
    };
    for &seed in &caught {
        let report = run_logged(seed, &honest);
        assert!(report.passed(), "seed {seed} fails even without sabotage");
        assert!(report.stats.puts_acked > 0, "seed {seed} acked nothing");
    }
    caught
}

/// Runs seeds 0..count with `sabotage` and returns the seeds where `checker` fired.
fn caught_by(checker: Checker, sabotage: Sabotage, count: u64) -> Vec<u64> {
    let options = Options {
        sabotage,
        ..Options::default()
    };
    (0..count)
        .filter(|&seed| {
            run(seed, &options)
                .violations
                .iter()
                .any(|v| v.checker == checker)
        })
        .collect()
}

/// Checker 3 must catch a node that never read-repairs: after healing, replicas that
/// missed writes during faults stay behind.
#[test]
fn checkers_catch_missing_read_repair() {
    let options = Options {
        sabotage: Sabotage {
            skip_read_repair: true,
            ..Sabotage::default()
        },
        // Anti-entropy would converge the replicas that read repair leaves behind.
        without_anti_entropy: true,
        ..Options::default()
    };
    let caught: Vec<u64> = (0..20)
        .filter(|&seed| {
            run(seed, &options)
                .violations
                .iter()
                .any(|v| v.checker == Checker::Convergence)
        })
        .collect();
    println!("missing read repair caught on seeds {caught:?}");
    assert!(caught.len() >= 3, "caught only on {caught:?}");
}

/// Checker 4 must catch puts that ignore their context: a delete then supersedes
/// nothing, and the deleted value is read again.
#[test]
fn checkers_catch_resurrected_deletes() {
    let sabotage = Sabotage {
        ignore_context: true,
        ..Sabotage::default()
    };
    let caught = caught_by(Checker::NoResurrection, sabotage, 20);
    println!("ignored contexts caught on seeds {caught:?}");
    assert!(caught.len() >= 3, "caught only on {caught:?}");
}

/// Checker 1 must catch a SET whose read is not a quorum read: it supersedes only what
/// its coordinator holds, and says so, missing acked writes a quorum read would see.
#[test]
fn checkers_catch_a_set_that_reads_only_its_coordinator() {
    let sabotaged = Options {
        sabotage: Sabotage {
            set_reads_local_only: true,
            ..Sabotage::default()
        },
        ..Options::default()
    };
    let caught = caught_only_with_sabotage(&sabotaged, &[Checker::AckedWriteReadable], 30);
    println!("SETs reading one replica caught on seeds {caught:?}");
    assert!(caught.len() >= 3, "caught only on {caught:?}");
}

/// The value checker must catch a forwarded put applied twice (a node that does not
/// remember the forwards it took): the network repeats messages.
#[test]
fn checkers_catch_a_forward_applied_twice() {
    let sabotaged = Options {
        sabotage: Sabotage {
            forget_forwards: true,
            ..Sabotage::default()
        },
        ..Options::default()
    };
    let caught = caught_only_with_sabotage(&sabotaged, &[Checker::ValueIntegrity], 40);
    println!("forwards applied twice caught on seeds {caught:?}");
    assert!(caught.len() >= 3, "caught only on {caught:?}");
}

/// The handoff checker must catch a node that removes a hint before its target
/// acknowledged it: lost in flight, the hint took the only copy a stand-in had.
#[test]
fn checkers_catch_hints_removed_before_their_ack() {
    let sabotaged = Options {
        sabotage: Sabotage {
            drop_hints_unacked: true,
            ..Sabotage::default()
        },
        tweak: Some(lossy_handoffs),
        ..Options::default()
    };
    let caught = caught_only_with_sabotage(&sabotaged, &[Checker::Handoff], 40);
    println!("hints removed before their ack caught on seeds {caught:?}");
    assert!(caught.len() >= 3, "caught only on {caught:?}");
}

/// Splits that last, seen by the failure detectors, with lossy links: sloppy quorum
/// and handoff at work.
fn split_heavy(settings: &mut ringkv_sim::Settings) {
    settings.partition_per_mille = 60;
    settings.partition_max_ms = 600;
    settings.detect_max_ms = 50;
    settings.drop_per_mille = settings.drop_per_mille.max(50);
    settings.strict_per_mille = 0;
}

/// The tree check must catch Merkle trees that miss writes (here: replica merges).
#[test]
fn checkers_catch_merkle_trees_that_miss_writes() {
    let sabotage = Sabotage {
        skip_tree_updates: true,
        ..Sabotage::default()
    };
    let caught = caught_by(Checker::Convergence, sabotage, 20);
    println!("trees missing merges caught on seeds {caught:?}");
    assert!(caught.len() >= 10, "caught only on {caught:?}");
}

/// Short splits that heal while clients still work, over very lossy links: many
/// handoffs happen while messages are lost.
fn lossy_handoffs(settings: &mut ringkv_sim::Settings) {
    split_heavy(settings);
    settings.partition_max_ms = 200;
    settings.drop_per_mille = 300;
}

/// `split_heavy` where every write needs one ack: a stand-in's hint is then often a
/// write's only copy, and a lost handoff loses it.
fn split_heavy_w1(settings: &mut ringkv_sim::Settings) {
    split_heavy(settings);
    settings.drop_per_mille = 200;
    settings.quorums = vec![ringkv_cluster::Quorum::new(3, 1, 1).expect("valid")];
}

/// Faults that make a node lose its data: it is the victim, every crash wipes its
/// disk, and its reads and writes fail now and then.
fn data_loss_heavy(settings: &mut ringkv_sim::Settings) {
    crash_heavy(settings);
    settings.loss_victim = Some(1);
    settings.wipe_per_mille = 1000;
    settings.lost_read_per_mille = 30;
    settings.failed_write_per_mille = 30;
}

/// The duplicate-dot checker must catch a node that keeps its actor when it loses its data (as a
/// node whose incarnation was stored in the lost data directory would): it hands out
/// dots it already used, and two acknowledged writes share one.
#[test]
fn checkers_catch_a_reused_actor_after_data_loss() {
    let sabotaged = Options {
        sabotage: Sabotage {
            reuse_actor: true,
            ..Sabotage::default()
        },
        tweak: Some(data_loss_heavy),
        ..Options::default()
    };
    let caught = caught_only_with_sabotage(&sabotaged, &[Checker::DuplicateDot], 30);
    println!("reused actor caught on seeds {caught:?}");
    assert!(caught.len() >= 3, "caught only on {caught:?}");
}

#[test]
fn fixed_seed_batch_passes_under_data_loss() {
    let options = Options {
        tweak: Some(data_loss_heavy),
        ..Options::default()
    };
    let mut total = RunStats::default();
    let failing: Vec<u64> = (0..CI_HEAVY_SEEDS)
        .filter(|&seed| {
            let report = run_logged(seed, &options);
            add(&mut total, &report.stats);
            !report.passed()
        })
        .collect();
    assert!(
        failing.is_empty(),
        "failing seeds: {failing:?} (replay with RINGKV_SIM_FAULTS=loss RINGKV_SIM_SEED=<seed>)"
    );
    // The exemptions for writes a loss may have taken must leave the victim's keys
    // checked.
    println!(
        "loss batch: {} read checks, {} on keys of the node that lost data; {} wipes, {} lost records, {} failed writes",
        total.reads_checked,
        total.reads_checked_near_losses,
        total.disk_wipes,
        total.records_lost,
        total.writes_failed
    );
    assert!(total.reads_checked_near_losses > 0);
    assert!(total.disk_wipes > 0 && total.records_lost > 0 && total.writes_failed > 0);
}

/// The stamp checker must catch versions stamped by the wall clock alone: with clocks
/// minutes apart, a write through a slow node is stamped below one its client saw
/// (and last-writer-wins would drop it).
#[test]
fn checkers_catch_stamps_that_trust_skewed_clocks() {
    let sabotaged = Options {
        sabotage: Sabotage {
            wall_clock_stamps: true,
            ..Sabotage::default()
        },
        tweak: Some(|s| {
            s.clock_skew_max_ms = 300_000;
            s.clock_jump_per_mille = 50;
        }),
        ..Options::default()
    };
    let caught = caught_only_with_sabotage(&sabotaged, &[Checker::StampsFollowCausality], 20);
    println!("wall-clock stamps caught on seeds {caught:?}");
    assert!(caught.len() >= 3, "caught only on {caught:?}");
}

/// A membership change under the seed's faults, a fifth into the safety phase: a node
/// joins, a member leaves, or a member dies for good and a new node replaces it (which
/// one by the seed). Partitions stream while nodes crash, links drop and split, and
/// the checkers hold the run to every acked write, converged replicas on the final
/// ring, and one ring view everywhere. No other node loses data (the replaced one
/// does, for good).
fn membership_change(settings: &mut ringkv_sim::Settings) {
    use ringkv_sim::settings::{ChangeKind, MembershipChange};
    let kind = [ChangeKind::Join, ChangeKind::Leave, ChangeKind::Replace]
        [(settings.safety_ms % 3) as usize];
    if kind == ChangeKind::Leave {
        // N = 3 replicas need three members after the leave.
        settings.nodes = settings.nodes.max(4);
    }
    settings.loss_victim = None;
    // Store limits low enough to refuse merges make a new replica refuse streamed
    // keys too: the change then waits for a client to resolve the siblings, which the
    // run does only once the world is quiet. Not this profile's subject.
    settings.siblings_max = 100;
    settings.stored_value_max = usize::MAX;
    settings.stored_version_max = usize::MAX;
    settings.keys = settings.keys.max(12);
    settings.safety_ms = settings.safety_ms.max(4_000);
    settings.membership = Some(MembershipChange {
        kind,
        at_ms: settings.safety_ms / 5,
    });
    // The newcomer's shards.
    while settings.shards.len() < settings.nodes + 1 {
        settings.shards.push(settings.shards[0]);
    }
}

/// Seeds of the `membership` profile, in CI.
const CI_MEMBERSHIP_SEEDS: u64 = 150;

#[test]
fn fixed_seed_batch_passes_with_membership_changes() {
    let options = Options {
        tweak: Some(membership_change),
        ..Options::default()
    };
    let (mut changes, mut moved, mut keys, mut acked) = (0, 0, 0, 0);
    let failing: Vec<u64> = (0..CI_MEMBERSHIP_SEEDS)
        .filter(|&seed| {
            let report = run_logged(seed, &options);
            changes += report.stats.membership_changes;
            moved += report.stats.partitions_moved;
            keys += report.stats.transfer_keys_sent;
            acked += report.stats.puts_acked;
            !report.passed()
        })
        .collect();
    println!(
        "{changes} membership changes, {moved} partitions moved, {keys} keys streamed, {acked} puts acked"
    );
    assert!(
        failing.is_empty(),
        "failing seeds: {failing:?} (replay with RINGKV_SIM_FAULTS=membership RINGKV_SIM_SEED=<seed>)"
    );
    assert_eq!(changes, CI_MEMBERSHIP_SEEDS, "every run makes its change");
    assert!(
        moved > 0 && keys > 0 && acked > 0,
        "the batch moved nothing"
    );
}

/// Sources that stream nothing: the new replicas serve reads without the writes
/// acknowledged before the change.
#[test]
fn checkers_catch_partitions_moved_without_their_data() {
    let caught = caught_with_membership(ringkv_sim::Sabotage {
        stream_nothing: true,
        ..Default::default()
    });
    println!("moves without data caught on seeds {caught:?}");
    assert!(!caught.is_empty(), "moves without data never caught");
}

/// Writes to the old replicas alone while partitions move: a write acked by replicas
/// that then leave the partition is missed once it moved.
#[test]
fn checkers_catch_writes_that_skip_the_new_replicas() {
    let caught = caught_with_membership(ringkv_sim::Sabotage {
        old_ring_writes_only: true,
        ..Default::default()
    });
    println!("old-ring-only writes caught on seeds {caught:?}");
    assert!(!caught.is_empty(), "old-ring-only writes never caught");
}

/// Partitions that moved away are never dropped: the final check finds their copies.
#[test]
fn checkers_catch_partitions_kept_after_moving_away() {
    let caught = caught_with_membership(ringkv_sim::Sabotage {
        keep_moved_partitions: true,
        ..Default::default()
    });
    println!("kept partitions caught on seeds {caught:?}");
    assert!(!caught.is_empty(), "kept partitions never caught");
}

fn caught_with_membership(sabotage: ringkv_sim::Sabotage) -> Vec<u64> {
    let options = Options {
        sabotage,
        tweak: Some(membership_change),
        ..Options::default()
    };
    (0..60)
        .filter(|&seed| !run(seed, &options).passed())
        .collect()
}
