//! Everything a run randomises, drawn from the seed before anything else happens and
//! printed with it, so a failure report says what the run was.

use std::time::Duration;

use ringkv_cluster::{HintConfig, Quorum};

use crate::dice::Dice;

/// The shape of one run. Rates are per mille; times are milliseconds of simulated time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub nodes: usize,
    pub keys: usize,
    pub clients: usize,
    pub partitions: u32,
    /// The quorums client operations draw from. N is 3 (or the node count if smaller).
    pub quorums: Vec<Quorum>,
    pub delay_min_ms: u64,
    pub delay_max_ms: u64,
    pub drop_per_mille: u32,
    pub duplicate_per_mille: u32,
    /// Chance, at every fault tick (50 ms), that a live node crashes.
    pub crash_per_mille: u32,
    pub downtime_max_ms: u64,
    /// Chance, at every fault tick, that the network splits in two.
    pub partition_per_mille: u32,
    pub partition_max_ms: u64,
    pub read_latency_max_ms: u64,
    pub sync_delay_max_ms: u64,
    pub request_timeout_ms: u64,
    pub client_timeout_ms: u64,
    pub think_max_ms: u64,
    /// Chance that a put ignores the client's context (a concurrent, blind write).
    pub blind_put_per_mille: u32,
    pub delete_per_mille: u32,
    /// Puts that supersede what a quorum holds (Redis SET), and deletes of whatever a
    /// quorum holds if it is live (Redis DEL): the node reads, then writes.
    pub set_per_mille: u32,
    pub delete_if_present_per_mille: u32,
    /// How long clients work and faults strike before the network heals.
    pub safety_ms: u64,
    /// The one node whose storage may lose data, if any (one node only, so a write
    /// acknowledged by two replicas always keeps a copy): a crash may wipe its disk
    /// (a replaced disk, a restored backup), a read may find its record lost (a
    /// checksum failure) and a write may fail. Its restarts must never reuse a dot.
    pub loss_victim: Option<u32>,
    /// Chance that a crash of the victim wipes its disk.
    pub wipe_per_mille: u32,
    /// Chance that a read on the victim finds its record lost.
    pub lost_read_per_mille: u32,
    /// Chance that a write on the victim fails.
    pub failed_write_per_mille: u32,
    /// How far each node's wall clock is set from true time, at most (either way).
    pub clock_skew_max_ms: u64,
    /// Chance, at every fault tick, that a node's wall clock jumps (up to 10 s either
    /// way, as NTP stepping a clock would).
    pub clock_jump_per_mille: u32,
    /// The nodes' limits: siblings a put may leave, and what the store keeps for one
    /// key (values, encoded versions). A quarter of the seeds make them tight, so
    /// puts are refused and merges hit the store's limits.
    pub siblings_max: usize,
    pub stored_value_max: usize,
    pub stored_version_max: usize,
    /// Shards per node (one `Node` state machine each), by node id - 1.
    pub shards: Vec<usize>,
    /// How long failure detectors take to see a split (until then, requests across
    /// it time out; after, they go to stand-ins).
    pub detect_max_ms: u64,
    /// Chance, at every fault tick, that one node falsely suspects another for a while.
    pub false_suspicion_per_mille: u32,
    /// Chance that a request is strict (no stand-ins).
    pub strict_per_mille: u32,
    /// Hint bounds and handoff pace; a quarter of the seeds make the byte bound tiny,
    /// so stand-ins refuse hints.
    pub hints: HintConfig,
    /// Tombstones are collected once this old and held by every replica (off: never).
    pub tombstone_grace_ms: Option<u64>,
    /// A membership change during the safety phase, if any: a node joins (node
    /// `nodes + 1`, which has an entry in `shards`), a member leaves, or a member dies
    /// for good and node `nodes + 1` replaces it.
    pub membership: Option<MembershipChange>,
}

/// The change a run makes, and when (ms into the safety phase).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MembershipChange {
    pub kind: ChangeKind,
    pub at_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Join,
    Leave,
    Replace,
}

impl Settings {
    /// Whether the limits are tight enough to refuse work (then the run resolves
    /// every key after healing, as a client would).
    pub fn tight_limits(&self) -> bool {
        self.stored_value_max != usize::MAX
    }
}

impl Settings {
    pub fn random(dice: &mut Dice) -> Settings {
        let nodes = dice.between(3, 6) as usize;
        let n = 3.min(nodes);
        let strong = [(2, 2), (1, 3), (3, 1), (2, 2)];
        let mut quorums: Vec<Quorum> = strong
            .iter()
            .filter(|_| dice.chance(600))
            .map(|&(r, w)| Quorum::new(n, r.min(n), w.min(n)).expect("r, w <= n by construction"))
            .collect();
        if quorums.is_empty() {
            quorums.push(Quorum::new(n, 2.min(n), 2.min(n)).expect("2 <= n for n >= 2"));
        }
        if dice.chance(300) {
            // Weak quorums are allowed; the checkers exempt them from read-your-writes.
            quorums.push(Quorum::new(n, 1, 1).expect("1 <= n"));
        }
        let delay_min_ms = dice.between(0, 5);
        let sharded = dice.chance(500);
        let request_timeout_ms = dice.between(100, 400);
        Settings {
            nodes,
            keys: dice.between(1, 6) as usize,
            clients: dice.between(2, 6) as usize,
            partitions: 64,
            quorums,
            delay_min_ms,
            delay_max_ms: delay_min_ms + dice.between(0, 40),
            drop_per_mille: [0, 10, 50, 150][dice.index(4)],
            duplicate_per_mille: [0, 10, 100][dice.index(3)],
            crash_per_mille: [0, 10, 40][dice.index(3)],
            downtime_max_ms: dice.between(50, 800),
            partition_per_mille: [0, 10, 40][dice.index(3)],
            partition_max_ms: dice.between(50, 600),
            read_latency_max_ms: dice.between(0, 3),
            sync_delay_max_ms: dice.between(1, 30),
            request_timeout_ms,
            client_timeout_ms: request_timeout_ms * 3,
            think_max_ms: dice.between(0, 40),
            blind_put_per_mille: dice.between(50, 400) as u32,
            delete_per_mille: dice.between(0, 200) as u32,
            safety_ms: dice.between(1_500, 5_000),
            loss_victim: dice.chance(500).then_some(1),
            wipe_per_mille: [0, 300, 1000][dice.index(3)],
            lost_read_per_mille: [0, 5, 30][dice.index(3)],
            failed_write_per_mille: [0, 5, 30][dice.index(3)],
            clock_skew_max_ms: [0, 50, 300_000][dice.index(3)],
            clock_jump_per_mille: [0, 20][dice.index(2)],
            siblings_max: 100,
            stored_value_max: usize::MAX,
            stored_version_max: usize::MAX,
            set_per_mille: 0,
            delete_if_present_per_mille: 0,
            detect_max_ms: 0,
            false_suspicion_per_mille: 0,
            strict_per_mille: 0,
            hints: HintConfig::default(),
            tombstone_grace_ms: None,
            membership: None,
            shards: (0..nodes)
                .map(|_| {
                    if sharded {
                        dice.between(1, 3) as usize
                    } else {
                        1
                    }
                })
                .collect(),
        }
        .with_tight_limits(dice)
        .with_node_resolved_puts(dice)
        .with_sloppy_quorum(dice)
    }

    fn with_sloppy_quorum(mut self, dice: &mut Dice) -> Settings {
        self.detect_max_ms = dice.between(0, 300);
        self.false_suspicion_per_mille = [0, 20, 100][dice.index(3)];
        self.strict_per_mille = [0, 200][dice.index(2)];
        self.hints = HintConfig {
            bytes_max: if dice.chance(250) {
                dice.between(50, 400)
            } else {
                1 << 30
            },
            // Never reached in a run: an expired hint may hold the only copies of
            // an acknowledged write, and the checkers would rightly call it lost.
            age_max: Duration::from_secs(3600),
            handoff_bytes_per_second: [200, 5_000, 1 << 20][dice.index(3)],
            handoff_in_flight: dice.between(1, 8) as usize,
            retry_interval: Duration::from_millis(dice.between(20, 300)),
        };
        self
    }

    fn with_node_resolved_puts(mut self, dice: &mut Dice) -> Settings {
        self.set_per_mille = dice.between(0, 300) as u32;
        self.delete_if_present_per_mille = dice.between(0, 100) as u32;
        self
    }

    fn with_tight_limits(mut self, dice: &mut Dice) -> Settings {
        if dice.chance(250) {
            self.siblings_max = dice.between(2, 6) as usize;
            self.stored_value_max = dice.between(30, 120) as usize;
            self.stored_version_max = dice.between(1_500, 4_000) as usize;
        }
        self
    }
}
