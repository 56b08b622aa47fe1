//! Tombstone collection, the node's part: when a replica may forget a tombstone.
//!
//! A delete writes a tombstone, a version like any other, so it supersedes exactly
//! what its client saw. Kept forever, tombstones grow disk and index without bound
//! under deletes; collected too early, they let the deleted value come back from a
//! replica that never saw the delete (Cassandra's gc_grace resurrections). Each
//! replica collects its own tombstones of a key only when
//!
//! 1. every version of the key it holds is a tombstone written more than the grace
//!    period ago (`NodeConfig::tombstone_grace`, longer than the hint window: no hint
//!    of an older value is left on a stand-in to hand back), and
//! 2. every other home replica of the key, asked twice at least `settle` apart, holds
//!    exactly the same tombstones or nothing at all. A replica holding nothing has
//!    nothing to bring back; one holding anything else (the old value, a later
//!    write) blocks it. The second answer comes after every message sent before the
//!    first has landed or been dropped as stale, so no older value still in flight
//!    can arrive after it.
//!
//! Then the key is forgotten if it still holds exactly those tombstones (a job on the
//! key's queue, so a write that came meanwhile keeps it). Each replica decides for
//! itself, so a tombstone that came back with a restart (collection is not durable)
//! is collected again by the replica that holds it, with the others answering
//! "nothing here". A repair bringing only tombstones past their grace to a key a
//! replica holds nothing of is dropped: there is nothing there to delete.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::{DropReason, Node};
use crate::anti_entropy::Listing;
use crate::hints::Shelf;
use crate::message::{PeerMessage, RequestId};
use crate::replica::{Job, StorageOp, StorageOpId};
use crate::ring::{NodeId, PartitionId};
use crate::version::VersionSet;

/// Tombstones one sweep reads and asks about (and one check answers about).
pub const SWEEP_KEYS_MAX: usize = 1024;
/// Sweeps open at once, each over one partition: a sweep lasts at least the settle
/// time (up to a minute), so this bounds collection at SWEEPS_MAX * SWEEP_KEYS_MAX
/// per settle time and shard.
pub const SWEEPS_MAX: usize = 64;
/// About the most bytes of keys and versions one check carries.
pub const CHECK_BYTES_MAX: usize = 4 << 20;
/// Keys of peers' checks this node reads at once (a check past it is refused and
/// asked again by a later sweep).
pub const PEER_CHECK_KEYS_MAX: usize = 16 * 1024;

/// Counters over the node's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TombstoneStats {
    /// Sweeps started (one partition each), and those given up at their deadline.
    pub sweeps: u64,
    pub sweeps_timed_out: u64,
    /// Tombstones past their grace that every other replica confirmed twice.
    pub confirmed: u64,
    /// Tombstones forgotten here.
    pub collected: u64,
}

/// One sweep over a partition's tombstones, started by this node.
#[derive(Debug)]
pub(crate) struct Sweep {
    partition: PartitionId,
    /// The other home replicas, each of which must confirm.
    peers: Vec<NodeId>,
    /// The partition's tombstone writes when it was listed.
    written: u64,
    stage: Stage,
    /// Given up after this (a lost answer, a read that failed).
    deadline: Duration,
}

#[derive(Debug)]
enum Stage {
    Listing,
    /// Reading the listed tombstones here: what each holds, and its age.
    Reading {
        reads: BTreeMap<RequestId, Vec<u8>>,
        old: Vec<(Vec<u8>, VersionSet)>,
        /// Bytes `old` would take in a check (about), and when the first tombstone
        /// read that is not yet past its grace will be (Unix ms).
        old_bytes: usize,
        next_due_ms: Option<u64>,
    },
    /// Asking the peers (round 1 or 2): which of `keys` each holds the same or not.
    Checking {
        round: u8,
        keys: Vec<(Vec<u8>, VersionSet)>,
        waiting: BTreeSet<NodeId>,
        confirmations: BTreeMap<Vec<u8>, usize>,
    },
    /// Round 1 confirmed `keys`; round 2 asks again after `until`.
    Settling {
        until: Duration,
        keys: Vec<(Vec<u8>, VersionSet)>,
    },
}

/// A peer's check this node is answering: the local reads still out.
#[derive(Debug)]
pub(crate) struct PeerCheck {
    from: NodeId,
    partition: PartitionId,
    sweep: u64,
    reads: BTreeMap<RequestId, (Vec<u8>, VersionSet)>,
    held: Vec<Vec<u8>>,
    deadline: Duration,
}

impl Node {
    /// Starts tombstone sweeps (the driver calls this every second or so, with the
    /// wall clock), and moves settled ones to their second round. Nothing when
    /// collection is off (`tombstone_grace` unset).
    pub fn tick_tombstones(&mut self, now: Duration, wall_ms: u64) {
        // The reading as it is, not the largest seen: one bad reading must not make
        // every tombstone look old for the rest of the node's life.
        self.wall_ms = wall_ms;
        self.peer_checks.retain(|_, c| c.deadline > now);
        let checks = &self.peer_checks;
        self.check_of_read
            .retain(|_, check| checks.contains_key(check));
        if self.config.tombstone_grace.is_none() {
            return;
        }
        // While a membership change moves partitions, "every replica" is a moving
        // set: sweeps wait for the change to end (their answers are dropped).
        if !self.view.is_stable() {
            self.sweeps.clear();
            return;
        }
        let expired: Vec<u64> = (self.sweeps.iter())
            .filter(|(_, s)| s.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            self.sweeps.remove(&id);
            self.tombstone_stats.sweeps_timed_out += 1;
        }
        // Reads that never answered (a failed read) belong to nothing any more.
        let sweeps = &self.sweeps;
        self.sweep_of_read
            .retain(|_, sweep| sweeps.contains_key(sweep));
        let settled: Vec<u64> = (self.sweeps.iter())
            .filter(|(_, s)| matches!(s.stage, Stage::Settling { until, .. } if until <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in settled {
            let sweep = self.sweeps.get_mut(&id).expect("listed just above");
            let Stage::Settling { keys, .. } = std::mem::replace(&mut sweep.stage, Stage::Listing)
            else {
                unreachable!("filtered on the stage");
            };
            self.ask_peers(now, id, 2, keys);
        }
        self.start_sweeps(now);
        self.flush_local(now);
    }

    /// Opens sweeps over the next home partitions whose replicas all answer.
    fn start_sweeps(&mut self, now: Duration) {
        let n = self.config.quorum.n();
        let home = self.home.len();
        let mut looked = 0;
        while self.sweeps.len() < SWEEPS_MAX && looked < home {
            looked += 1;
            self.sweep_cursor = (self.sweep_cursor + 1) % home;
            let partition = self.home[self.sweep_cursor];
            let busy = self.sweeps.values().any(|s| s.partition == partition);
            let resting = self
                .sweep_not_before
                .get(&partition)
                .is_some_and(|&at| now < at);
            if busy || resting || self.no_tombstones.contains(&partition) {
                continue;
            }
            // Once per settle time at most; longer when its tombstones are young.
            self.sweep_not_before.insert(partition, now + self.settle());
            let peers: Vec<NodeId> = (self.view.read_replicas(partition, n).into_iter())
                .filter(|&p| p != self.config.node)
                .collect();
            if peers.iter().any(|p| self.unreachable.contains(p)) {
                continue;
            }
            let id = self.next_sweep;
            self.next_sweep = self.next_sweep.wrapping_add(1);
            self.tombstone_stats.sweeps += 1;
            let deadline = now + self.settle() * 2 + self.config.request_timeout * 4;
            let written = self
                .tombstones_written
                .get(&partition)
                .copied()
                .unwrap_or(0);
            let sweep = Sweep {
                partition,
                peers,
                written,
                stage: Stage::Listing,
                deadline,
            };
            self.sweeps.insert(id, sweep);
            let op = StorageOpId(self.next_listing);
            self.next_listing -= 1;
            self.listings.insert(op, Listing::Tombstones { sweep: id });
            let list = StorageOp::ListTombstones { op, partition };
            self.actions.push_back(super::Action::Storage(list));
        }
    }

    /// How long round 1's answers must be outlived before round 2: every message
    /// sent before them is delivered or dropped as stale by then. Peer links drop
    /// frames older than the request timeout before sending; bytes already in a
    /// socket can take longer (retransmissions, a paused receiver), so a quarter of
    /// the grace, up to a minute, and never under three request timeouts.
    fn settle(&self) -> Duration {
        let grace = self.config.tombstone_grace.unwrap_or_default();
        let floor = self.config.request_timeout * 3 + self.config.message_delay_max;
        (grace / 4).min(Duration::from_secs(60)).max(floor)
    }

    /// The partition's tombstones (from the index): read up to `SWEEP_KEYS_MAX`.
    pub(super) fn on_tombstones_listed(
        &mut self,
        now: Duration,
        sweep_id: u64,
        keys: Vec<(Vec<u8>, u32)>,
    ) {
        let Some(sweep) = self.sweeps.get(&sweep_id) else {
            return;
        };
        let partition = sweep.partition;
        if keys.is_empty() {
            let written = self
                .tombstones_written
                .get(&partition)
                .copied()
                .unwrap_or(0);
            if written == sweep.written {
                self.no_tombstones.insert(partition);
            }
            self.sweeps.remove(&sweep_id);
            return;
        }
        // From a rotating offset, so tombstones that stay (too young, a peer that
        // holds something else) never keep the rest from their turn.
        let turn = self.sweep_turns.entry(partition).or_default();
        let start = (*turn * SWEEP_KEYS_MAX) % keys.len();
        *turn += 1;
        let chosen: Vec<Vec<u8>> = (keys[start..].iter().chain(&keys[..start]))
            .take(SWEEP_KEYS_MAX)
            .map(|(key, _)| key.clone())
            .collect();
        let mut reads = BTreeMap::new();
        for key in chosen {
            let id = self.new_request_id();
            reads.insert(id, key.clone());
            self.sweep_of_read.insert(id, sweep_id);
            let origin = self.local_origin(id);
            self.submit(now, key, Shelf::Home(partition), Job::Read { origin });
        }
        if let Some(sweep) = self.sweeps.get_mut(&sweep_id) {
            sweep.stage = Stage::Reading {
                reads,
                old: Vec::new(),
                old_bytes: 0,
                next_due_ms: None,
            };
        }
    }

    /// A local read for a sweep or for a peer's check; false if it was neither.
    pub(super) fn on_tombstone_read(
        &mut self,
        now: Duration,
        id: RequestId,
        versions: VersionSet,
    ) -> bool {
        if let Some(check_id) = self.check_of_read.remove(&id) {
            self.on_check_read(check_id, id, versions);
            return true;
        }
        let Some(sweep_id) = self.sweep_of_read.remove(&id) else {
            return false;
        };
        let grace_ms = self.grace_ms();
        let Some(sweep) = self.sweeps.get_mut(&sweep_id) else {
            return true;
        };
        let Stage::Reading {
            reads,
            old,
            old_bytes,
            next_due_ms,
        } = &mut sweep.stage
        else {
            return true;
        };
        let Some(key) = reads.remove(&id) else {
            return true;
        };
        // About what the key and its versions take in a check; past the budget the
        // rest waits for a later sweep (a check must fit a peer frame).
        let size = key.len() + 256 * versions.len();
        if past_grace(&versions, self.wall_ms, grace_ms) {
            if *old_bytes + size <= CHECK_BYTES_MAX {
                *old_bytes += size;
                old.push((key, versions));
            }
        } else if versions.siblings().all(|v| v.value.is_tombstone()) {
            let newest = versions
                .siblings()
                .map(|v| v.written_at_ms)
                .max()
                .unwrap_or(0);
            let due = newest.saturating_add(grace_ms);
            *next_due_ms = Some(next_due_ms.map_or(due, |d| d.min(due)));
        }
        if !reads.is_empty() {
            return true;
        }
        let old = std::mem::take(old);
        if old.is_empty() {
            // Nothing old enough: the partition rests until its first tombstone is.
            let wait_ms = next_due_ms.map_or(0, |due| due.saturating_sub(self.wall_ms));
            let partition = sweep.partition;
            let rest = Duration::from_millis(wait_ms).max(self.settle());
            self.sweep_not_before.insert(partition, now + rest);
            self.sweeps.remove(&sweep_id);
        } else if self.config.sabotage.collect_unconfirmed {
            let partition = sweep.partition;
            self.sweeps.remove(&sweep_id);
            self.collect(now, partition, old);
        } else {
            self.ask_peers(now, sweep_id, 1, old);
        }
        true
    }

    /// Asks every other replica which of `keys` it holds the same or not at all.
    fn ask_peers(
        &mut self,
        now: Duration,
        sweep_id: u64,
        round: u8,
        keys: Vec<(Vec<u8>, VersionSet)>,
    ) {
        // Each round goes under a fresh id, so a late or duplicated answer to an
        // earlier round never counts for this one.
        let Some(sweep) = self.sweeps.remove(&sweep_id) else {
            return;
        };
        let sweep_id = self.next_sweep;
        self.next_sweep = self.next_sweep.wrapping_add(1);
        let sweep = self.sweeps.entry(sweep_id).or_insert(sweep);
        if sweep.peers.is_empty() || keys.is_empty() {
            let partition = sweep.partition;
            self.sweeps.remove(&sweep_id);
            self.collect(now, partition, keys);
            return;
        }
        let partition = sweep.partition;
        let peers = sweep.peers.clone();
        sweep.stage = Stage::Checking {
            round,
            keys: keys.clone(),
            waiting: peers.iter().copied().collect(),
            confirmations: BTreeMap::new(),
        };
        for peer in peers {
            let message = PeerMessage::TombstonesCheck {
                partition,
                sweep: sweep_id,
                keys: keys.clone(),
            };
            self.send(peer, message);
        }
    }

    /// A peer's answer to a check of ours.
    pub(super) fn on_tombstones_held(
        &mut self,
        now: Duration,
        from: NodeId,
        partition: PartitionId,
        sweep_id: u64,
        held: Vec<Vec<u8>>,
    ) {
        let settle = self.settle();
        let sweep = self.sweeps.get_mut(&sweep_id);
        let Some(sweep) = sweep.filter(|s| s.partition == partition) else {
            self.count(DropReason::LateResponse);
            return;
        };
        let Stage::Checking {
            round,
            keys,
            waiting,
            confirmations,
        } = &mut sweep.stage
        else {
            self.count(DropReason::LateResponse);
            return;
        };
        if !waiting.remove(&from) {
            self.count(DropReason::UnexpectedSender);
            return;
        }
        let asked: BTreeSet<&[u8]> = keys.iter().map(|(k, _)| k.as_slice()).collect();
        let held: BTreeSet<Vec<u8>> = held.into_iter().collect();
        for key in held.into_iter().filter(|k| asked.contains(k.as_slice())) {
            *confirmations.entry(key).or_default() += 1;
        }
        if !waiting.is_empty() {
            return;
        }
        let peers = sweep.peers.len();
        let confirmed: Vec<(Vec<u8>, VersionSet)> = std::mem::take(keys)
            .into_iter()
            .filter(|(k, _)| confirmations.get(k) == Some(&peers))
            .collect();
        let (round, partition) = (*round, sweep.partition);
        if confirmed.is_empty() {
            self.sweeps.remove(&sweep_id);
        } else if round == 1 {
            sweep.stage = Stage::Settling {
                until: now + settle,
                keys: confirmed,
            };
        } else {
            self.sweeps.remove(&sweep_id);
            self.tombstone_stats.confirmed += confirmed.len() as u64;
            self.collect(now, partition, confirmed);
        }
    }

    /// Forgets each key here if it still holds exactly the tombstones confirmed.
    fn collect(&mut self, now: Duration, partition: PartitionId, keys: Vec<(Vec<u8>, VersionSet)>) {
        for (key, expected) in keys {
            self.submit(now, key, Shelf::Home(partition), Job::Collect { expected });
        }
    }

    /// A peer asks which of `keys` this node holds the same or not at all: read each.
    pub(super) fn on_tombstones_check(
        &mut self,
        now: Duration,
        from: NodeId,
        partition: PartitionId,
        sweep: u64,
        keys: Vec<(Vec<u8>, VersionSet)>,
    ) {
        if !self.is_co_replica(from, partition) {
            self.count(DropReason::WrongPartition);
            return;
        }
        let reading: usize = self.peer_checks.values().map(|c| c.reads.len()).sum();
        let too_many = keys.len() > SWEEP_KEYS_MAX || reading + keys.len() > PEER_CHECK_KEYS_MAX;
        // During a membership change nothing is confirmed (see `tick_tombstones`).
        if too_many || !self.view.is_stable() {
            // Answered "none held", so the sweeper ends the round now rather than at
            // its deadline, and asks again after its partition rests.
            self.count(DropReason::TombstoneCheckRefused);
            let keys = Vec::new();
            let answer = PeerMessage::TombstonesHeld {
                partition,
                sweep,
                keys,
            };
            self.send(from, answer);
            return;
        }
        let check_id = self.next_sweep;
        self.next_sweep = self.next_sweep.wrapping_add(1);
        let mut reads = BTreeMap::new();
        for (key, expected) in keys {
            if key.len() > self.config.key_max || self.view.ring().partition_of(&key) != partition {
                continue;
            }
            let id = self.new_request_id();
            reads.insert(id, (key.clone(), expected));
            self.check_of_read.insert(id, check_id);
            let origin = self.local_origin(id);
            self.submit(now, key, Shelf::Home(partition), Job::Read { origin });
        }
        let check = PeerCheck {
            from,
            partition,
            sweep,
            reads,
            held: Vec::new(),
            deadline: now + self.config.request_timeout * 4,
        };
        self.peer_checks.insert(check_id, check);
        self.answer_check_if_done(check_id);
    }

    fn on_check_read(&mut self, check_id: u64, id: RequestId, versions: VersionSet) {
        // Nothing here counts only for a key not read back lost (its newest record
        // may be the damaged one); the same
        // tombstones count only if past the grace on this node's clock too (when it
        // collects at all), so one node's fast clock cannot collect alone.
        let old_enough = match self.config.tombstone_grace {
            Some(_) => past_grace(&versions, self.wall_ms, self.grace_ms()),
            None => true,
        };
        let Some(check) = self.peer_checks.get_mut(&check_id) else {
            return;
        };
        let Some((key, expected)) = check.reads.remove(&id) else {
            return self.answer_check_if_done(check_id);
        };
        let absent_ok = !self.replica.read_lost(check.partition, &key);
        let check = self
            .peer_checks
            .get_mut(&check_id)
            .expect("looked up just above");
        if (versions.is_empty() && absent_ok) || (versions == expected && old_enough) {
            check.held.push(key);
        }
        self.answer_check_if_done(check_id);
    }

    fn answer_check_if_done(&mut self, check_id: u64) {
        if !self
            .peer_checks
            .get(&check_id)
            .is_some_and(|c| c.reads.is_empty())
        {
            return;
        }
        let check = self
            .peer_checks
            .remove(&check_id)
            .expect("looked up just above");
        let message = PeerMessage::TombstonesHeld {
            partition: check.partition,
            sweep: check.sweep,
            keys: check.held,
        };
        self.send(check.from, message);
    }

    /// Whether a repair of `versions` may be dropped where the key is absent (see
    /// the module doc).
    pub(super) fn is_collectable(&self, versions: &VersionSet) -> bool {
        self.config.tombstone_grace.is_some() && past_grace(versions, self.wall_ms, self.grace_ms())
    }

    fn grace_ms(&self) -> u64 {
        let grace = self.config.tombstone_grace.unwrap_or(Duration::MAX);
        u64::try_from(grace.as_millis()).unwrap_or(u64::MAX)
    }

    /// Counters over the node's life.
    pub fn tombstone_stats(&self) -> TombstoneStats {
        self.tombstone_stats
    }
}

/// Whether `versions` holds only tombstones, all written more than `grace_ms` before
/// `wall_ms` (stamps are hybrid logical clocks, never behind the writer's wall clock).
fn past_grace(versions: &VersionSet, wall_ms: u64, grace_ms: u64) -> bool {
    !versions.is_empty()
        && versions
            .siblings()
            .all(|v| v.value.is_tombstone() && v.written_at_ms.saturating_add(grace_ms) <= wall_ms)
}
