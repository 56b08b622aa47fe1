//! The replica side of a node: reads, read-merge-writes and version creation for the
//! keys it stores, one key at a time (Dynamo §4.5, the "write locally" and replica
//! steps).
//!
//! Every job on a key reads the stored set, decides, and (when the set changes) writes
//! the merged set back. Jobs on one key run strictly one after another, and the next
//! starts only once the previous write is durable. That makes two things true without
//! further care: a read never sees a write that could still be lost in a crash (so an
//! ack never rests on unsynced data), and two puts coordinated here can never draw the
//! same dot. Jobs on different keys run side by side, so the engine still batches
//! their flushes (group commit).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::clock::{Actor, Dot, EpochSource, VersionVector};
use crate::codec::{self, StoredVersions};
use crate::hints::{Shelf, hint_bytes};
use crate::merkle::{MerkleTree, version_digest};
use crate::message::{RequestId, TooLarge};
use crate::node::{DropReason, Sabotage};
use crate::ring::NodeId;
use crate::ring::PartitionId;
use crate::version::{ConflictMode, Value, Version, VersionSet};

/// Names one storage operation, so its completion finds its way back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorageOpId(pub u64);

/// What a replica asks of its storage. The driver carries it out and reports back
/// with a [`StorageCompletion`] carrying the same id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageOp {
    /// Read the stored versions of `key` (`None` when absent; a record that fails its
    /// checksum counts as absent and is repaired from other replicas).
    Read {
        op: StorageOpId,
        shelf: Shelf,
        key: Vec<u8>,
    },
    /// Replace the stored versions of `key`, durably: complete only once on disk.
    Write {
        op: StorageOpId,
        shelf: Shelf,
        key: Vec<u8>,
        stored: StoredVersions,
    },
    /// Forget `key` on `shelf` (a hint handed off or expired), durably; completes as
    /// a write. Reads find it absent from then on, also after a restart.
    Remove {
        op: StorageOpId,
        shelf: Shelf,
        key: Vec<u8>,
    },
    /// List every key of home partition `partition` in Merkle leaves `leaves`, with
    /// its version digest, from the store's index (lost records left out); completes
    /// as `Listed`.
    ListLeaves {
        op: StorageOpId,
        partition: PartitionId,
        leaves: Vec<u32>,
    },
    /// List every key of home partition `partition` stored as a tombstone, with its
    /// version digest, from the index; completes as `Listed`.
    ListTombstones {
        op: StorageOpId,
        partition: PartitionId,
    },
    /// Forget every key of home partition `partition`, durably (it moved to other
    /// nodes); completes as a write.
    DropPartition {
        op: StorageOpId,
        partition: PartitionId,
    },
    /// Forget `key` of home partition `partition` if it still is the tombstone whose
    /// version digest is `digest` (tombstone collection: every replica holds it).
    /// Not durable: after a restart the tombstone is back and collected again. A key
    /// that changed meanwhile stays and completes as a failed write.
    Collect {
        op: StorageOpId,
        partition: PartitionId,
        key: Vec<u8>,
        digest: u32,
    },
}

/// The storage's answer to a [`StorageOp`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageCompletion {
    Read {
        op: StorageOpId,
        result: Result<StoredRead, StorageFailure>,
    },
    Write {
        op: StorageOpId,
        result: Result<(), StorageFailure>,
    },
    Listed {
        op: StorageOpId,
        keys: Vec<(Vec<u8>, u32)>,
    },
}

/// What a read found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredRead {
    Found(StoredVersions),
    /// The key was never written here (or its delete was collected).
    Absent,
    /// The store held a record for the key but lost it (it failed its checksum). The
    /// key reads as absent, so repairs restore it, and the coordinator takes a new
    /// actor: it can no longer see every dot its actor issued for the key.
    Lost,
}

/// The storage could not do what was asked (an I/O error; the store latches it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageFailure(pub String);

/// Who asked for a job and waits for its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Origin {
    pub node: NodeId,
    pub request: RequestId,
}

/// A unit of work on one key.
#[derive(Clone, Debug)]
pub(crate) enum Job {
    /// Answer with the stored versions.
    Read { origin: Origin },
    /// Merge `incoming` into the stored versions; ack `origin` once durable (repairs
    /// have no origin and expect no ack).
    Merge {
        origin: Option<Origin>,
        incoming: VersionSet,
        /// Store nothing if this replica holds nothing of the key: a repair bringing
        /// only tombstones past their grace period, which every replica collects.
        skip_if_absent: bool,
    },
    /// Tombstone collection: forget the key if it holds exactly `expected`, a set of
    /// tombstones every replica of the key was found to hold.
    Collect { expected: VersionSet },
    /// Remove a hint: unconditionally (`handed: None`, at its age bound), or only if
    /// it still holds exactly `handed`, what its target acknowledged (a write that
    /// reached the hint after the handoff read keeps it for another round).
    DropHint { handed: Option<VersionSet> },
    /// Coordinate a put: make a new version from `context`, merge, write, ack.
    Coordinate {
        origin: Origin,
        context: VersionVector,
        /// Add what this replica holds to `context` (see `PutRequest::supersede_local`).
        supersede_local: bool,
        value: Value,
        mode: ConflictMode,
        /// The coordinator's wall clock when the put arrived (Unix ms).
        wall_ms: u64,
    },
}

impl Job {
    fn origin(&self) -> Option<Origin> {
        match self {
            Job::Read { origin } | Job::Coordinate { origin, .. } => Some(*origin),
            Job::Merge { origin, .. } => *origin,
            Job::DropHint { .. } | Job::Collect { .. } => None,
        }
    }
}

/// Why a coordinated put was refused before any replica stored it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    TooManySiblings {
        count: usize,
        limit: usize,
    },
    StorageFailed,
    TooLarge(TooLarge),
    /// The client's context claims this actor's counter is at its maximum (forged).
    CounterExhausted,
}

/// What the replica asks its node to do.
#[derive(Clone, Debug)]
pub(crate) enum ReplicaEvent {
    Storage(StorageOp),
    ReadDone {
        origin: Origin,
        versions: VersionSet,
    },
    Durable {
        origin: Origin,
    },
    /// A coordinated put made `dot`; `versions` is the merged set now being written
    /// locally, to be sent to the other replicas.
    Created {
        origin: Origin,
        dot: Dot,
        versions: VersionSet,
    },
    Refused {
        origin: Origin,
        refusal: Refusal,
    },
    /// A coordinated put's local write failed after its version was fanned out: the
    /// actor retired, and the node stops coordinating for a moment, so a store that
    /// fails every write (latched) does not add a clock entry per put.
    LocalWriteFailed,
    /// A merge asked by `origin` would leave more than the store keeps for one key;
    /// nothing was written.
    MergeRefused {
        origin: Origin,
        refusal: TooLarge,
    },
    Dropped(DropReason),
    /// A tombstone every replica held was forgotten here (`Job::Collect`).
    TombstoneCollected,
    /// A repair (a merge nobody waits on) changed the stored versions, durably.
    Repaired,
    /// A home copy of only tombstones was written (durably) in `partition`.
    TombstoneWritten {
        partition: PartitionId,
    },
    /// A write to the hints for `target` is durable; the hint now takes `bytes`.
    HintStored {
        target: NodeId,
        key: Vec<u8>,
        bytes: u64,
    },
    /// The hint is gone from the store (or was never there).
    HintRemoved {
        target: NodeId,
        key: Vec<u8>,
    },
    /// A conditional removal found the hint changed; it stays.
    HintKept {
        target: NodeId,
        key: Vec<u8>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReplicaConfig {
    pub node: NodeId,
    pub siblings_max: usize,
    pub stored_value_max: usize,
    pub stored_version_max: usize,
    /// Most bytes of hints kept for one target (`HintConfig::bytes_max`).
    pub hint_bytes_max: u64,
    pub sabotage: Sabotage,
}

#[derive(Debug)]
struct KeyQueue {
    active: Option<Active>,
    waiting: VecDeque<Job>,
}

#[derive(Debug)]
struct Active {
    op: StorageOpId,
    job: Job,
    stage: Stage,
    /// The dot a coordinated put drew, while its local write is in flight.
    made: Option<Dot>,
    /// What the record being written takes (for the hint ledger).
    bytes: u64,
    /// On a hint shelf: what the record replaced took, and the bytes this write
    /// reserved against its target's bound (released when it completes).
    old_bytes: u64,
    reserved: u64,
    /// The version digests the key had when read and will have once written (for
    /// the partition's Merkle tree).
    old_digest: Option<u32>,
    new_digest: u32,
    /// Whether the record written holds only tombstones.
    writes_tombstone: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Reading,
    Writing,
}

/// What a hint write replaces and reserves (see `Replica::reserve_hint`).
#[derive(Clone, Copy, Debug, Default)]
struct HintRoom {
    old_bytes: u64,
    reserved: u64,
}

/// The bytes a record of `set` under `key` takes, as the hint bound counts them.
fn record_bytes(key: &[u8], set: &VersionSet) -> u64 {
    if set.is_empty() {
        return 0;
    }
    let stored = StoredVersions::encode(set);
    hint_bytes(key, stored.version.len(), stored.value.len())
}

/// Keys whose stand-in actors are remembered (the map costs memory only while this
/// node coordinates for down replicas).
const STAND_IN_KEYS_MAX: usize = 100_000;
/// Lost home keys remembered one by one (see `Replica::lost_keys`).
const LOST_KEYS_MAX: usize = 4_096;
const STAND_IN_KEY_BYTES_MAX: usize = 16 << 20;

/// A key on one shelf: the unit jobs queue on. (A node may hold a key at home and as
/// hints for several targets, each its own record.)
type ShelfKey = (Shelf, Vec<u8>);

#[derive(Debug)]
pub(crate) struct Replica {
    config: ReplicaConfig,
    /// Who coordinates the puts made here now; replaced whenever the local state may
    /// miss a dot it issued (see `retire_actor`).
    actor: Actor,
    epochs: EpochSource,
    /// Actors retired since the start, for the node's stats.
    actors_retired: u64,
    /// Whether the current actor has drawn a dot yet (an unused one need not retire).
    actor_used: bool,
    /// Home keys read back lost (a record that failed its checksum) and not written
    /// since: their newest record may be the damaged one, so this replica never
    /// vouches that it holds nothing of them. Past `LOST_KEYS_MAX`, every key.
    lost_keys: BTreeSet<ShelfKey>,
    lost_keys_overflow: bool,
    /// The last counter the current actor drew, over all keys. Each draw goes past
    /// it, so the actor never issues a counter twice, even for a key whose home copy
    /// no longer shows its dots: a collected tombstone leaves no record, and a client
    /// may still hold a context naming the dots it had (see `draw_dot`).
    actor_counter: u64,
    /// Actors of puts coordinated from a hint copy (this node standing in for a down
    /// replica), per key: the actor and the last counter it drew. A hint copy is
    /// removed once handed off, so unlike a home copy it cannot vouch for every dot
    /// an actor drew from it; a context naming counter c claims every dot up to c.
    /// So an actor is kept only while the copy it draws from covers its last dot,
    /// and a fresh one is drawn otherwise (see `draw_dot`). Forgotten past
    /// `STAND_IN_KEYS_MAX` keys (the next draws then take fresh actors).
    stand_in_actors: BTreeMap<Vec<u8>, (Actor, u64)>,
    /// Key bytes in `stand_in_actors`, bounded by `STAND_IN_KEY_BYTES_MAX`.
    stand_in_key_bytes: usize,
    /// Per target: bytes of hints stored, and bytes reserved by hint writes in
    /// flight. Their sum never passes `hint_bytes_max` through a write made here (a
    /// write that would is refused before it is handed to storage), so the bound is
    /// hard whatever runs concurrently.
    hint_held: BTreeMap<NodeId, u64>,
    hint_reserved: BTreeMap<NodeId, u64>,
    /// Targets whose recovered hints alone passed the bound (a smaller bound after a
    /// restart): they only shrink.
    hint_over_at_start: std::collections::BTreeSet<NodeId>,
    /// Each home partition's Merkle tree over (key, version digest), updated as
    /// writes become durable (see `merkle`).
    trees: BTreeMap<PartitionId, MerkleTree>,
    /// Partitions whose tree may be wrong (a record read as lost: the digest it had
    /// is unknown); the driver rebuilds them from the store's index.
    stale_trees: std::collections::BTreeSet<PartitionId>,
    keys: BTreeMap<ShelfKey, KeyQueue>,
    /// Storage operation in flight → the key whose active job issued it.
    in_flight: BTreeMap<StorageOpId, ShelfKey>,
    next_op: u64,
}

impl Replica {
    pub fn new(config: ReplicaConfig, mut epochs: EpochSource) -> Self {
        let actor = Actor {
            node: config.node,
            epoch: epochs.next_epoch(),
        };
        Replica {
            config,
            actor,
            epochs,
            actors_retired: 0,
            actor_used: false,
            lost_keys: BTreeSet::new(),
            lost_keys_overflow: false,
            actor_counter: 0,
            stand_in_actors: BTreeMap::new(),
            stand_in_key_bytes: 0,
            hint_held: BTreeMap::new(),
            hint_reserved: BTreeMap::new(),
            hint_over_at_start: Default::default(),
            trees: BTreeMap::new(),
            stale_trees: Default::default(),
            keys: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            next_op: 0,
        }
    }

    /// Queues `job` on `key`; starts it at once when the key is idle.
    pub fn submit(&mut self, key: Vec<u8>, shelf: Shelf, job: Job, out: &mut Vec<ReplicaEvent>) {
        let at = (shelf, key);
        let queue = self.keys.entry(at.clone()).or_insert_with(|| KeyQueue {
            active: None,
            waiting: VecDeque::new(),
        });
        queue.waiting.push_back(job);
        if queue.active.is_none() {
            self.start_next(&at, out);
        }
    }

    pub fn complete(&mut self, completion: StorageCompletion, out: &mut Vec<ReplicaEvent>) {
        let op = match &completion {
            StorageCompletion::Read { op, .. } | StorageCompletion::Write { op, .. } => *op,
            // Listings belong to the node (anti-entropy), never to a key's job.
            StorageCompletion::Listed { .. } => {
                out.push(ReplicaEvent::Dropped(DropReason::UnknownStorageOp));
                return;
            }
        };
        let Some(at) = self.in_flight.remove(&op) else {
            out.push(ReplicaEvent::Dropped(DropReason::UnknownStorageOp));
            return;
        };
        let queue = self
            .keys
            .get_mut(&at)
            .expect("a key with an op in flight has a queue");
        let active = queue
            .active
            .take()
            .expect("a key with an op in flight has an active job");
        assert_eq!(active.op, op, "in_flight and the active job disagree");
        let key = &at;
        match (completion, active.stage) {
            (StorageCompletion::Read { result, .. }, Stage::Reading) => {
                // What the tree holds for the key now; only a job that may write
                // needs it, so a plain read (every get) hashes nothing.
                let read_digest = match &result {
                    Ok(StoredRead::Found(stored)) if !matches!(active.job, Job::Read { .. }) => {
                        Some(version_digest(&stored.version))
                    }
                    _ => None,
                };
                if let (Ok(StoredRead::Lost), Shelf::Home(partition)) = (&result, key.0) {
                    self.stale_trees.insert(partition);
                    self.remember_lost(key);
                }
                let stored = match result {
                    Ok(StoredRead::Found(stored)) => match stored.decode() {
                        Ok(set) => Some(set),
                        Err(_) => {
                            // Unreadable bytes are a record missing here: the other
                            // replicas and read repair restore it.
                            out.push(ReplicaEvent::Dropped(DropReason::CorruptStoredVersions));
                            self.remember_lost(key);
                            self.retire_actor_for(key.0);
                            Some(VersionSet::new())
                        }
                    },
                    Ok(StoredRead::Absent) => Some(VersionSet::new()),
                    Ok(StoredRead::Lost) => {
                        out.push(ReplicaEvent::Dropped(DropReason::CorruptStoredVersions));
                        self.retire_actor_for(key.0);
                        Some(VersionSet::new())
                    }
                    // Nothing was drawn: a put that cannot read is refused.
                    Err(_) => None,
                };
                match stored {
                    Some(current) => self.decide(key, active.job, current, read_digest, out),
                    None => self.abandon(key, active.job, DropReason::StorageReadFailed, out),
                }
            }
            (StorageCompletion::Write { result, .. }, Stage::Writing) => match result {
                Ok(()) => {
                    let skip = self.config.sabotage.skip_tree_updates
                        && matches!(active.job, Job::Merge { .. });
                    let collected = matches!(active.job, Job::Collect { .. });
                    if !collected {
                        self.lost_keys.remove(key);
                    }
                    if let (Shelf::Home(partition), false) = (key.0, skip) {
                        let tree = self.trees.entry(partition).or_default();
                        let new = (!collected).then_some(active.new_digest);
                        tree.update(&key.1, active.old_digest, new);
                    }
                    if collected {
                        out.push(ReplicaEvent::TombstoneCollected);
                    }
                    // Once durable: a sweep's listing taken before this write must
                    // not mark the partition free of tombstones after it.
                    if let (true, Shelf::Home(partition)) = (active.writes_tombstone, key.0) {
                        out.push(ReplicaEvent::TombstoneWritten { partition });
                    }
                    if let Job::Merge { origin: None, .. } = active.job {
                        out.push(ReplicaEvent::Repaired);
                    }
                    if let Shelf::Hints { target } = key.0 {
                        let removed = matches!(active.job, Job::DropHint { .. });
                        let new = if removed { 0 } else { active.bytes };
                        self.settle_hint(target, &active, Some(new));
                        let key = key.1.clone();
                        out.push(match active.job {
                            Job::DropHint { .. } => ReplicaEvent::HintRemoved { target, key },
                            _ => ReplicaEvent::HintStored {
                                target,
                                key,
                                bytes: active.bytes,
                            },
                        });
                    }
                    if let Some(origin) = active.job.origin()
                        && !self.config.sabotage.ack_before_durable
                    {
                        out.push(ReplicaEvent::Durable { origin });
                    }
                    self.finish(key, out);
                }
                Err(_) => {
                    // A put coordinated here was fanned out before this write: its dot
                    // may live on other replicas but not here. Drawing past it would
                    // not do: the key's set here would then miss a dot below one it
                    // holds, and a context taken from it would claim (and supersede)
                    // a write nobody saw. The actor retires instead, and the node
                    // pauses coordinating (see `ReplicaEvent::LocalWriteFailed`).
                    if active.made.is_some_and(|d| d.actor == self.actor) {
                        self.retire_actor();
                        out.push(ReplicaEvent::LocalWriteFailed);
                    }
                    if let Shelf::Hints { target } = key.0 {
                        self.settle_hint(target, &active, None);
                    }
                    // A collection the store declined: the key changed under it.
                    let reason = match active.job {
                        Job::Collect { .. } => DropReason::TombstoneChanged,
                        _ => DropReason::StorageWriteFailed,
                    };
                    self.abandon(key, active.job, reason, out)
                }
            },
            (_, stage) => {
                // A read completion for a write (or the reverse) is a driver bug.
                panic!("storage completion of the wrong kind for stage {stage:?}");
            }
        }
    }

    pub fn assert_invariants(&self) {
        for (target, held) in &self.hint_held {
            let reserved = self.hint_reserved.get(target).copied().unwrap_or(0);
            assert!(
                held + reserved <= self.config.hint_bytes_max
                    || self.hint_over_at_start.contains(target),
                "hints for {target:?} take {held} + {reserved} bytes, over the bound of {}",
                self.config.hint_bytes_max
            );
        }
        let mut active_ops = 0;
        for (key, queue) in &self.keys {
            match &queue.active {
                Some(active) => {
                    active_ops += 1;
                    assert_eq!(self.in_flight.get(&active.op), Some(key));
                }
                None => assert!(
                    queue.waiting.is_empty(),
                    "an idle key must not have waiting jobs"
                ),
            }
        }
        assert_eq!(active_ops, self.in_flight.len());
        assert!(
            self.keys.values().all(|q| q.active.is_some()),
            "idle keys are removed"
        );
    }

    /// The actor new puts coordinated here are stamped with.
    pub fn actor(&self) -> Actor {
        self.actor
    }

    pub fn actors_retired(&self) -> u64 {
        self.actors_retired
    }

    /// Stops using the current actor for new dots: after a lost record, the local set
    /// may miss a dot it issued, and drawing "one past the largest known" could hand
    /// that dot out again (docs/cluster.md, "Actors"). An actor that drew nothing yet
    /// has nothing to collide with and stays.
    /// A record of `shelf` was lost: the home actor may have lost a dot only if the
    /// record was a home copy (hint copies draw with stand-in actors, see `draw_dot`).
    fn retire_actor_for(&mut self, shelf: Shelf) {
        if let Shelf::Home(_) = shelf {
            self.retire_actor();
        }
    }

    fn retire_actor(&mut self) {
        if self.config.sabotage.reuse_actor || !self.actor_used {
            return;
        }
        self.actor_used = false;
        self.actor_counter = 0;
        self.actor = Actor {
            node: self.config.node,
            epoch: self.epochs.next_epoch(),
        };
        self.actors_retired += 1;
    }

    /// The dot of a put coordinated here: from the home copy, one past every dot of
    /// the actor it holds (it holds all of them, see `retire_actor`). From a hint
    /// copy, with the key's stand-in actor if that copy still covers the actor's last
    /// dot (so no counter is skipped: every earlier dot is in the copy, or under
    /// something in it, and travels with it), else with a fresh actor.
    fn draw_dot(
        &mut self,
        key: &ShelfKey,
        current: &VersionSet,
        context: &VersionVector,
    ) -> Option<Dot> {
        if let Shelf::Home(_) = key.0 {
            let mut dot = current.checked_next_dot(self.actor, context)?;
            if !self.config.sabotage.dense_counters_after_collection {
                dot.counter = dot.counter.max(self.actor_counter.checked_add(1)?);
            }
            self.actor_counter = self.actor_counter.max(dot.counter);
            self.actor_used = true;
            return Some(dot);
        }
        let kept = self
            .stand_in_actors
            .get(&key.1)
            .filter(|(actor, last)| current.context().counter(*actor) >= *last)
            .map(|(actor, _)| *actor);
        let actor = match kept {
            Some(actor) => actor,
            None => {
                if self.stand_in_actors.len() >= STAND_IN_KEYS_MAX
                    || self.stand_in_key_bytes >= STAND_IN_KEY_BYTES_MAX
                {
                    self.stand_in_actors.clear();
                    self.stand_in_key_bytes = 0;
                }
                Actor {
                    node: self.config.node,
                    epoch: self.epochs.next_epoch(),
                }
            }
        };
        let dot = current.checked_next_dot(actor, context)?;
        if self
            .stand_in_actors
            .insert(key.1.clone(), (actor, dot.counter))
            .is_none()
        {
            self.stand_in_key_bytes += key.1.len();
        }
        Some(dot)
    }

    /// A new version's stamp, a hybrid logical clock: the wall clock, unless something
    /// the writer saw (a sibling stored here, an entry of its context) is stamped at or
    /// after it, in which case one millisecond past the latest of those. So stamps
    /// grow along causality whatever the clocks do: across restarts (the stored
    /// siblings carry theirs), under skew between nodes, and after a clock jumps back.
    /// Last-writer-wins then never lets a write lose to one it saw. Concurrent writes
    /// still order by wall clock, which is what LWW asks for.
    fn stamp(&self, wall_ms: u64, current: &VersionSet, context: &VersionVector) -> u64 {
        if self.config.sabotage.wall_clock_stamps {
            return wall_ms;
        }
        let seen = current
            .siblings()
            .map(|v| v.written_at_ms)
            .chain(context.entries().map(|(_, entry)| entry.updated_at_ms))
            .max();
        match seen {
            Some(latest) if latest >= wall_ms => latest.saturating_add(1),
            _ => wall_ms,
        }
    }

    /// Keys with work in flight (for tests and the simulator's liveness checks).
    pub fn busy_keys(&self) -> usize {
        self.keys.len()
    }

    /// The stored set has been read: answer, or merge and write.
    fn decide(
        &mut self,
        key: &ShelfKey,
        job: Job,
        current: VersionSet,
        read_digest: Option<u32>,
        out: &mut Vec<ReplicaEvent>,
    ) {
        match job {
            Job::Read { origin } => {
                out.push(ReplicaEvent::ReadDone {
                    origin,
                    versions: current,
                });
                self.finish(key, out);
            }
            Job::Merge {
                origin,
                ref incoming,
                skip_if_absent,
            } => {
                // A key read back lost takes the tombstones: holding them again is
                // what lets this replica vouch for the key (see `lost_keys`).
                let lost = self.lost_keys_overflow || self.lost_keys.contains(key);
                if skip_if_absent && current.is_empty() && !lost {
                    out.push(ReplicaEvent::Dropped(DropReason::CollectedTombstone));
                    self.finish(key, out);
                    return;
                }
                let merged = self.merge(&current, incoming);
                if let Some(refusal) = self.over_store_limits(&merged) {
                    // Storing less would drop a concurrent write; storing this cannot
                    // be done. Keep what is here and say why; the key converges again
                    // once a client resolves its siblings (a write with the read
                    // context supersedes them all and fits).
                    match origin {
                        Some(origin) => out.push(ReplicaEvent::MergeRefused { origin, refusal }),
                        None => out.push(ReplicaEvent::Dropped(DropReason::MergeTooLarge)),
                    }
                    self.finish(key, out);
                    return;
                }
                if merged == current {
                    // Nothing new: what is stored is already durable (see module doc).
                    if let Some(origin) = origin {
                        out.push(ReplicaEvent::Durable { origin });
                    }
                    self.finish(key, out);
                    return;
                }
                match self.reserve_hint(key, &current, &merged) {
                    Ok(room) => self.write(key, job, &merged, None, (room, read_digest), out),
                    Err(refusal) => {
                        match origin {
                            Some(origin) => {
                                out.push(ReplicaEvent::MergeRefused { origin, refusal })
                            }
                            None => out.push(ReplicaEvent::Dropped(DropReason::MergeTooLarge)),
                        }
                        self.finish(key, out);
                    }
                }
            }
            Job::Coordinate {
                origin,
                ref context,
                supersede_local,
                ref value,
                mode,
                wall_ms,
            } => {
                let mut context = context.clone();
                if supersede_local {
                    context.join(&current.context());
                }
                // A context naming a home counter this actor never drew is forged:
                // drawing past it would let that context (and the version made from
                // it) claim, and supersede, dots the actor has yet to issue. Refused;
                // the actor stays (a client cannot make it retire at will).
                let forged = matches!(key.0, Shelf::Home(_))
                    && context.counter(self.actor) > self.actor_counter
                    && !self.config.sabotage.dense_counters_after_collection;
                if forged {
                    let refusal = Refusal::CounterExhausted;
                    out.push(ReplicaEvent::Refused { origin, refusal });
                    self.finish(key, out);
                    return;
                }
                let Some(dot) = self.draw_dot(key, &current, &context) else {
                    // A context forged to claim this actor's counter at its maximum:
                    // refuse it, and leave the exhausted actor for every later put.
                    self.retire_actor();
                    out.push(ReplicaEvent::Refused {
                        origin,
                        refusal: Refusal::CounterExhausted,
                    });
                    self.finish(key, out);
                    return;
                };
                let written_at_ms = self.stamp(wall_ms, &current, &context);
                let version = Version {
                    dot,
                    past: context,
                    written_at_ms,
                    value: value.clone(),
                };
                let merged = self.merge(&current, &VersionSet::from_versions(mode, [version]));
                let refusal = if merged.len() > self.config.siblings_max {
                    Some(Refusal::TooManySiblings {
                        count: merged.len(),
                        limit: self.config.siblings_max,
                    })
                } else {
                    self.over_store_limits(&merged).map(Refusal::TooLarge)
                };
                if let Some(refusal) = refusal {
                    out.push(ReplicaEvent::Refused { origin, refusal });
                    self.finish(key, out);
                    return;
                }
                let room = match self.reserve_hint(key, &current, &merged) {
                    Ok(room) => room,
                    Err(refusal) => {
                        let refusal = Refusal::TooLarge(refusal);
                        out.push(ReplicaEvent::Refused { origin, refusal });
                        self.finish(key, out);
                        return;
                    }
                };
                out.push(ReplicaEvent::Created {
                    origin,
                    dot,
                    versions: merged.clone(),
                });
                self.write(key, job, &merged, Some(dot), (room, read_digest), out);
            }
            Job::Collect { ref expected } => {
                let (Shelf::Home(partition), Some(digest)) = (key.0, read_digest) else {
                    self.finish(key, out);
                    return;
                };
                let all_tombstones = current.siblings().all(|v| v.value.is_tombstone());
                if current != *expected || current.is_empty() || !all_tombstones {
                    // Written since every replica was found to hold the tombstones.
                    out.push(ReplicaEvent::Dropped(DropReason::TombstoneChanged));
                    self.finish(key, out);
                    return;
                }
                let op = self.new_op(key);
                out.push(ReplicaEvent::Storage(StorageOp::Collect {
                    op,
                    partition,
                    key: key.1.clone(),
                    digest,
                }));
                let room = HintRoom::default();
                self.set_writing(key, op, job, (None, 0, room), (Some(digest), 0));
            }
            Job::DropHint { ref handed } => {
                let Shelf::Hints { target } = key.0 else {
                    debug_assert!(false, "only hints are dropped");
                    self.finish(key, out);
                    return;
                };
                let changed = handed.as_ref().is_some_and(|h| *h != current);
                if changed {
                    out.push(ReplicaEvent::HintKept {
                        target,
                        key: key.1.clone(),
                    });
                    self.finish(key, out);
                } else if current.is_empty() {
                    out.push(ReplicaEvent::HintRemoved {
                        target,
                        key: key.1.clone(),
                    });
                    self.finish(key, out);
                } else {
                    let op = self.new_op(key);
                    out.push(ReplicaEvent::Storage(StorageOp::Remove {
                        op,
                        shelf: key.0,
                        key: key.1.clone(),
                    }));
                    let room = HintRoom {
                        old_bytes: record_bytes(&key.1, &current),
                        reserved: 0,
                    };
                    self.set_writing(key, op, job, (None, 0, room), (None, 0));
                }
            }
        }
    }

    /// Whether `set` exceeds what the store keeps for one key: its values together, or
    /// its encoded versions. The same check guards the coordinator's own write and
    /// every replica's merge, so no write is ever handed to a store that refuses it.
    fn over_store_limits(&self, set: &VersionSet) -> Option<TooLarge> {
        let values: usize = set
            .siblings()
            .filter_map(|v| v.value.data())
            .map(<[u8]>::len)
            .sum();
        if values > self.config.stored_value_max {
            return Some(TooLarge::Values {
                size: values,
                limit: self.config.stored_value_max,
            });
        }
        let versions = codec::encoded_version_len(set);
        let limit = self
            .config
            .stored_version_max
            .min(codec::STORED_VERSION_MAX);
        if versions > limit || set.len() > codec::SIBLINGS_MAX_ENCODED {
            return Some(TooLarge::Versions {
                size: versions,
                limit,
            });
        }
        None
    }

    fn merge(&self, current: &VersionSet, incoming: &VersionSet) -> VersionSet {
        let mut merged = current.sync(incoming);
        if self.config.sabotage.keep_one_sibling {
            merged.keep_latest_only();
        }
        merged
    }

    fn write(
        &mut self,
        key: &ShelfKey,
        job: Job,
        merged: &VersionSet,
        made: Option<Dot>,
        (room, old_digest): (HintRoom, Option<u32>),
        out: &mut Vec<ReplicaEvent>,
    ) {
        let op = self.new_op(key);
        let stored = StoredVersions::encode(merged);
        let tombstone = stored.tombstone;
        let bytes = hint_bytes(&key.1, stored.version.len(), stored.value.len());
        let digests = (old_digest, version_digest(&stored.version));
        out.push(ReplicaEvent::Storage(StorageOp::Write {
            op,
            shelf: key.0,
            key: key.1.clone(),
            stored,
        }));
        if self.config.sabotage.ack_before_durable
            && let Some(origin) = job.origin()
        {
            out.push(ReplicaEvent::Durable { origin });
        }
        self.set_writing(key, op, job, (made, bytes, room), digests);
        if let Some(active) = self.keys.get_mut(key).and_then(|q| q.active.as_mut()) {
            active.writes_tombstone = tombstone;
        }
    }

    fn set_writing(
        &mut self,
        key: &ShelfKey,
        op: StorageOpId,
        job: Job,
        (made, bytes, room): (Option<Dot>, u64, HintRoom),
        (old_digest, new_digest): (Option<u32>, u32),
    ) {
        let queue = self.keys.get_mut(key).expect("the written key has a queue");
        queue.active = Some(Active {
            op,
            job,
            stage: Stage::Writing,
            made,
            bytes,
            old_bytes: room.old_bytes,
            reserved: room.reserved,
            old_digest,
            new_digest,
            writes_tombstone: false,
        });
    }

    /// Before a write to a hint shelf: reserves what it adds against its target's
    /// bound, or refuses it. Home writes need no room.
    fn reserve_hint(
        &mut self,
        key: &ShelfKey,
        current: &VersionSet,
        merged: &VersionSet,
    ) -> Result<HintRoom, TooLarge> {
        let Shelf::Hints { target } = key.0 else {
            return Ok(HintRoom::default());
        };
        let old_bytes = record_bytes(&key.1, current);
        let grow = record_bytes(&key.1, merged).saturating_sub(old_bytes);
        let held = self.hint_held.get(&target).copied().unwrap_or(0);
        let reserved = self.hint_reserved.entry(target).or_default();
        let total = held + *reserved + grow;
        if grow > 0 && total > self.config.hint_bytes_max {
            let clamp = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
            return Err(TooLarge::Hints {
                size: clamp(total),
                limit: clamp(self.config.hint_bytes_max),
            });
        }
        *reserved += grow;
        Ok(HintRoom {
            old_bytes,
            reserved: grow,
        })
    }

    /// A hint write ended: releases its reservation and, if it landed (`new`: the
    /// record's size now, 0 once removed), accounts it as stored.
    fn settle_hint(&mut self, target: NodeId, active: &Active, new: Option<u64>) {
        if let Some(reserved) = self.hint_reserved.get_mut(&target) {
            *reserved -= active.reserved;
        }
        if let Some(new) = new {
            let held = self.hint_held.entry(target).or_default();
            *held = held.saturating_sub(active.old_bytes) + new;
        }
    }

    /// The Merkle tree of home partition `partition` (None: nothing written or
    /// rebuilt there yet).
    /// Remembers a home key read back lost or undecodable (see `lost_keys`).
    fn remember_lost(&mut self, key: &ShelfKey) {
        if !matches!(key.0, Shelf::Home(_)) {
            return;
        }
        if self.lost_keys.len() < LOST_KEYS_MAX {
            self.lost_keys.insert(key.clone());
        } else {
            self.lost_keys_overflow = true;
        }
    }

    /// Whether `key` of home partition `partition` read back lost since it was last
    /// written here (see `lost_keys`).
    pub fn read_lost(&self, partition: PartitionId, key: &[u8]) -> bool {
        self.lost_keys_overflow
            || self
                .lost_keys
                .contains(&(Shelf::Home(partition), key.to_vec()))
    }

    pub fn tree(&self, partition: PartitionId) -> Option<&MerkleTree> {
        self.trees.get(&partition)
    }

    /// The partitions with a tree here (data written or rebuilt).
    pub fn tree_partitions(&self) -> &BTreeMap<PartitionId, MerkleTree> {
        &self.trees
    }

    /// Replaces a partition's tree with one rebuilt from the store's index (at start,
    /// or for a stale tree). Only while no write of the partition is in flight here:
    /// one completing later would apply its change on top of a tree that has it.
    /// Forgets a partition that moved to other nodes (its keys are being dropped).
    pub fn forget_partition(&mut self, partition: PartitionId) {
        self.trees.remove(&partition);
        self.stale_trees.remove(&partition);
    }

    pub fn set_tree(&mut self, partition: PartitionId, tree: MerkleTree) {
        self.stale_trees.remove(&partition);
        self.trees.insert(partition, tree);
    }

    /// Partitions whose trees need a rebuild, each with whether a write of it is in
    /// flight (rebuild only those without: see `set_tree`).
    pub fn stale_trees(&self) -> Vec<(PartitionId, bool)> {
        self.stale_trees
            .iter()
            .map(|&p| {
                // Only a write handed to storage makes a rebuild ambiguous (the index
                // may or may not hold it yet); a key still reading takes its old
                // digest from the store after the rebuild.
                let busy = self.keys.iter().any(|((shelf, _), queue)| {
                    *shelf == Shelf::Home(p)
                        && queue
                            .active
                            .as_ref()
                            .is_some_and(|a| a.stage == Stage::Writing)
                });
                (p, busy)
            })
            .collect()
    }

    pub fn mark_trees_stale(&mut self) {
        let all: Vec<PartitionId> = self.trees.keys().copied().collect();
        self.stale_trees.extend(all);
    }

    /// A hint recovered from the store at start counts against its target's bound.
    pub fn hint_restored(&mut self, target: NodeId, bytes: u64) {
        let held = self.hint_held.entry(target).or_default();
        *held += bytes;
        if *held > self.config.hint_bytes_max {
            self.hint_over_at_start.insert(target);
        }
    }

    /// Whether a new hint for `target` could fit at all now.
    pub fn hint_room_left(&self, target: NodeId) -> bool {
        let held = self.hint_held.get(&target).copied().unwrap_or(0);
        let reserved = self.hint_reserved.get(&target).copied().unwrap_or(0);
        held + reserved < self.config.hint_bytes_max
    }

    /// The job cannot go on; its origin gets no answer (the coordinator times out)
    /// except a local put, which learns at once that nothing was written.
    fn abandon(
        &mut self,
        key: &ShelfKey,
        job: Job,
        reason: DropReason,
        out: &mut Vec<ReplicaEvent>,
    ) {
        out.push(ReplicaEvent::Dropped(reason));
        if let (Job::DropHint { .. }, Shelf::Hints { target }) = (&job, key.0) {
            // The hint stays; handoff tries again later.
            let key = key.1.clone();
            out.push(ReplicaEvent::HintKept { target, key });
        }
        if let (Job::Coordinate { origin, .. }, DropReason::StorageReadFailed) = (&job, reason) {
            out.push(ReplicaEvent::Refused {
                origin: *origin,
                refusal: Refusal::StorageFailed,
            });
        }
        self.finish(key, out);
    }

    fn finish(&mut self, key: &ShelfKey, out: &mut Vec<ReplicaEvent>) {
        let queue = self.keys.get_mut(key).expect("a finishing key has a queue");
        queue.active = None;
        if queue.waiting.is_empty() {
            self.keys.remove(key);
        } else {
            self.start_next(key, out);
        }
    }

    fn start_next(&mut self, key: &ShelfKey, out: &mut Vec<ReplicaEvent>) {
        let op = self.new_op(key);
        let queue = self.keys.get_mut(key).expect("a started key has a queue");
        let job = queue
            .waiting
            .pop_front()
            .expect("start_next is called with a job waiting");
        out.push(ReplicaEvent::Storage(StorageOp::Read {
            op,
            shelf: key.0,
            key: key.1.clone(),
        }));
        queue.active = Some(Active {
            op,
            job,
            stage: Stage::Reading,
            made: None,
            bytes: 0,
            old_bytes: 0,
            reserved: 0,
            old_digest: None,
            new_digest: 0,
            writes_tombstone: false,
        });
    }

    fn new_op(&mut self, key: &ShelfKey) -> StorageOpId {
        self.next_op += 1;
        let op = StorageOpId(self.next_op);
        self.in_flight.insert(op, key.clone());
        op
    }
}
