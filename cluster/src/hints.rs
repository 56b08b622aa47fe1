//! Sloppy quorum's bookkeeping (Dynamo §4.6): where a write goes when a preferred
//! replica is down, and the hints a node holds for replicas that were.
//!
//! A node standing in for a down replica stores the write on a separate shelf of its
//! store, [`Shelf::Hints`] for that replica, durably before it acks (so the hint counts
//! toward W exactly like a replica's copy; the replica holds each target's hints to
//! their byte bound, counting writes in flight). [`HintLedger`] remembers which keys
//! each target is owed, how many bytes they take and when a write last reached them; the node hands them off
//! when the failure detector sees the target again, a few at a time and under a byte
//! rate, and removes a hint only after the target acknowledged it durably and only if
//! no newer write reached the hint meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::ring::{NodeId, PartitionId};

/// Where on a node a copy of a key is kept: with the partition it belongs to, or among
/// the hints held for another node (keyed by the same key; its partition follows from
/// the key under the ring).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Shelf {
    Home(PartitionId),
    Hints { target: NodeId },
}

/// The first store partition number of hint shelves: ring partitions stay below
/// 2^24, node ids below 2^31 (see [`crate::ring::NODE_ID_MAX`]).
const HINT_PARTITION_BASE: u32 = 1 << 31;

impl Shelf {
    /// The store partition this shelf is kept in.
    pub fn store_partition(self) -> u32 {
        match self {
            Shelf::Home(partition) => partition.0,
            Shelf::Hints { target } => HINT_PARTITION_BASE | target.0,
        }
    }

    /// The shelf a store partition holds (for recovery's inventory of hints).
    pub fn from_store_partition(partition: u32) -> Shelf {
        if partition & HINT_PARTITION_BASE != 0 {
            Shelf::Hints {
                target: NodeId(partition & !HINT_PARTITION_BASE),
            }
        } else {
            Shelf::Home(PartitionId(partition))
        }
    }
}

/// One node a request asks, and the down replica it stands in for, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub node: NodeId,
    pub hint_for: Option<NodeId>,
}

/// Bounds and pace of hints. Per target and per state machine (one per shard).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HintConfig {
    /// Most bytes of hints held for one target; a hinted write past it is refused, so
    /// it never counts toward W (the coordinator reaches W elsewhere or says so).
    pub bytes_max: u64,
    /// A hint no write has reached for this long is dropped (and counted): its target
    /// stayed away too long, and what it held is left to anti-entropy and read repair.
    /// (Its removal is conditional, like a handoff's: a write that lands meanwhile
    /// keeps it.)
    pub age_max: Duration,
    /// Handoff pace: bytes per second sent to returning targets, all together.
    pub handoff_bytes_per_second: u64,
    /// Most hints handed off and not yet acknowledged at once.
    pub handoff_in_flight: usize,
    /// How often handoff looks again at hints it could not hand off.
    pub retry_interval: Duration,
}

impl Default for HintConfig {
    fn default() -> Self {
        HintConfig {
            bytes_max: 256 << 20,
            age_max: Duration::from_secs(3 * 3600),
            handoff_bytes_per_second: 8 << 20,
            handoff_in_flight: 32,
            retry_interval: Duration::from_secs(1),
        }
    }
}

/// Hints pending for one target, as status reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HintsPending {
    pub target: NodeId,
    pub keys: u64,
    pub bytes: u64,
}

/// Counters of hints over the node's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HintStats {
    /// Hinted writes made durable here.
    pub stored: u64,
    /// Hinted writes refused because the target's hints were at their byte bound.
    pub refused: u64,
    /// Hints removed after their target acknowledged them.
    pub handed_off: u64,
    /// Hints dropped at their age bound, never delivered.
    pub expired: u64,
    /// Hints found at start in the store (recovered).
    pub recovered: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HeldHint {
    bytes: u64,
    /// When the latest write reached it (the node's monotonic clock; at start,
    /// recovered hints count from then).
    last_write: Duration,
    /// Whether a handoff or removal of it is under way.
    busy: bool,
    /// The target refused it (its store's limits): not retried until a new write
    /// reaches the hint or the target comes back, so a refused hint never spins.
    parked: bool,
}

#[derive(Debug, Default)]
struct TargetHints {
    keys: BTreeMap<Vec<u8>, HeldHint>,
    bytes: u64,
}

/// Which keys each target is owed. The hints themselves live in the store; this is
/// the index handoff walks.
#[derive(Debug, Default)]
pub struct HintLedger {
    targets: BTreeMap<NodeId, TargetHints>,
    /// The target handoff took from last: the next take starts after it, so one
    /// target that never acknowledges cannot hold every handoff slot.
    cursor: Option<NodeId>,
    pub stats: HintStats,
}

impl HintLedger {
    pub fn bytes(&self, target: NodeId) -> u64 {
        self.targets.get(&target).map_or(0, |t| t.bytes)
    }

    /// A hint for `key` is durable with `bytes`; keeps the age of one already held.
    pub fn stored(&mut self, target: NodeId, key: &[u8], bytes: u64, now: Duration) {
        let held = self.targets.entry(target).or_default();
        match held.keys.get_mut(key) {
            Some(hint) => {
                held.bytes = held.bytes - hint.bytes + bytes;
                hint.bytes = bytes;
                hint.parked = false;
                hint.last_write = hint.last_write.max(now);
            }
            None => {
                held.bytes += bytes;
                let hint = HeldHint {
                    bytes,
                    last_write: now,
                    busy: false,
                    parked: false,
                };
                held.keys.insert(key.to_vec(), hint);
            }
        }
    }

    /// The hint is gone from the store.
    pub fn removed(&mut self, target: NodeId, key: &[u8]) {
        let Some(held) = self.targets.get_mut(&target) else {
            return;
        };
        if let Some(hint) = held.keys.remove(key) {
            held.bytes -= hint.bytes;
        }
        if held.keys.is_empty() {
            self.targets.remove(&target);
        }
    }

    /// Marks a hint free for another handoff attempt.
    pub fn release(&mut self, target: NodeId, key: &[u8]) {
        if let Some(hint) = self.hint_mut(target, key) {
            hint.busy = false;
        }
    }

    /// The target refused the hint: keep it, but leave it until something changes.
    pub fn park(&mut self, target: NodeId, key: &[u8]) {
        if let Some(hint) = self.hint_mut(target, key) {
            hint.busy = false;
            hint.parked = true;
        }
    }

    /// The target is back: try its parked hints again.
    pub fn unpark(&mut self, target: NodeId) {
        if let Some(held) = self.targets.get_mut(&target) {
            held.keys.values_mut().for_each(|h| h.parked = false);
        }
    }

    /// Hints whose target refused them, waiting for a change.
    pub fn parked(&self) -> usize {
        self.targets
            .values()
            .map(|t| t.keys.values().filter(|h| h.parked).count())
            .sum()
    }

    /// Takes the next hint to hand off to one of `reachable`: its target, key and
    /// size. Marks it busy.
    pub fn take_next(
        &mut self,
        reachable: impl Fn(NodeId) -> bool,
    ) -> Option<(NodeId, Vec<u8>, u64)> {
        use std::ops::Bound::{Excluded, Unbounded};
        let in_turn: Vec<NodeId> = match self.cursor {
            Some(cursor) => self
                .targets
                .range((Excluded(cursor), Unbounded))
                .chain(self.targets.range(..=cursor))
                .map(|(&t, _)| t)
                .collect(),
            None => self.targets.keys().copied().collect(),
        };
        for target in in_turn {
            if !reachable(target) {
                continue;
            }
            let held = self.targets.get_mut(&target).expect("listed above");
            if let Some((key, hint)) = held.keys.iter_mut().find(|(_, h)| !h.busy && !h.parked) {
                hint.busy = true;
                self.cursor = Some(target);
                return Some((target, key.clone(), hint.bytes));
            }
        }
        None
    }

    /// Takes every idle hint no write reached for `age_max`, marking them busy (for
    /// removal).
    pub fn take_expired(&mut self, now: Duration, age_max: Duration) -> Vec<(NodeId, Vec<u8>)> {
        let mut expired = Vec::new();
        for (&target, held) in self.targets.iter_mut() {
            for (key, hint) in held.keys.iter_mut() {
                if !hint.busy && now.saturating_sub(hint.last_write) > age_max {
                    hint.busy = true;
                    expired.push((target, key.clone()));
                }
            }
        }
        expired
    }

    /// Whether any hint waits for a handoff attempt.
    pub fn any_idle(&self) -> bool {
        self.targets
            .values()
            .any(|t| t.keys.values().any(|h| !h.busy && !h.parked))
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    pub fn targets(&self) -> BTreeSet<NodeId> {
        self.targets.keys().copied().collect()
    }

    pub fn pending(&self) -> Vec<HintsPending> {
        self.targets
            .iter()
            .map(|(&target, held)| HintsPending {
                target,
                keys: held.keys.len() as u64,
                bytes: held.bytes,
            })
            .collect()
    }

    pub fn holds(&self, target: NodeId, key: &[u8]) -> bool {
        self.targets
            .get(&target)
            .is_some_and(|t| t.keys.contains_key(key))
    }

    fn hint_mut(&mut self, target: NodeId, key: &[u8]) -> Option<&mut HeldHint> {
        self.targets.get_mut(&target)?.keys.get_mut(key)
    }

    pub fn assert_invariants(&self) {
        for held in self.targets.values() {
            assert!(!held.keys.is_empty(), "targets without hints are removed");
            let sum: u64 = held.keys.values().map(|h| h.bytes).sum();
            assert_eq!(
                sum, held.bytes,
                "a target's byte count is the sum of its hints"
            );
        }
    }
}

/// The size a hint of this key and stored set is charged: what its record takes.
pub fn hint_bytes(key: &[u8], version_len: usize, value_len: usize) -> u64 {
    (key.len() + version_len + value_len) as u64
}

/// A byte-rate limiter driven by the node's clock: handoff may send while the bucket
/// is not in debt; each hint sent takes its size.
#[derive(Debug)]
pub struct Throttle {
    rate: u64,
    /// Bytes that may still be sent (negative: in debt).
    tokens: f64,
    at: Duration,
}

impl Throttle {
    /// `rate` 0 means no limit.
    pub fn new(rate: u64, now: Duration) -> Self {
        Throttle {
            rate,
            tokens: rate as f64,
            at: now,
        }
    }

    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.at).as_secs_f64();
        self.at = self.at.max(now);
        // At most one second of burst.
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.rate as f64);
    }

    /// Whether a send may start now.
    pub fn ready(&mut self, now: Duration) -> bool {
        if self.rate == 0 {
            return true;
        }
        self.refill(now);
        self.tokens >= 0.0
    }

    pub fn spend(&mut self, bytes: u64) {
        self.tokens -= bytes as f64;
    }

    /// Changes the rate from `now` on; the burst allowance shrinks with it.
    pub fn set_rate(&mut self, rate: u64, now: Duration) {
        self.refill(now);
        self.rate = rate;
        self.tokens = self.tokens.min(rate as f64);
    }

    /// When the bucket is out of debt again.
    pub fn ready_at(&self) -> Duration {
        if self.tokens >= 0.0 || self.rate == 0 {
            return self.at;
        }
        self.at + Duration::from_secs_f64(-self.tokens / self.rate as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shelves_map_to_distinct_store_partitions_and_back() {
        for shelf in [
            Shelf::Home(PartitionId(0)),
            Shelf::Home(PartitionId((1 << 24) - 1)),
            Shelf::Hints { target: NodeId(0) },
            Shelf::Hints {
                target: NodeId(crate::ring::NODE_ID_MAX),
            },
        ] {
            assert_eq!(Shelf::from_store_partition(shelf.store_partition()), shelf);
        }
        assert_ne!(
            Shelf::Home(PartitionId(5)).store_partition(),
            Shelf::Hints { target: NodeId(5) }.store_partition()
        );
    }

    #[test]
    fn the_ledger_counts_bytes_once_per_key() {
        let mut ledger = HintLedger::default();
        let t = NodeId(3);
        let now = Duration::ZERO;
        ledger.stored(t, b"a", 60, now);
        ledger.stored(t, b"a", 70, now);
        assert_eq!(ledger.bytes(t), 70, "a rewrite replaces its size");
        ledger.stored(t, b"b", 30, now);
        assert_eq!(ledger.bytes(t), 100);
        ledger.assert_invariants();
        let (target, key, bytes) = ledger.take_next(|_| true).expect("a hint is idle");
        assert_eq!((target, bytes), (t, if key == b"a" { 70 } else { 30 }));
        let (_, other, _) = ledger.take_next(|_| true).expect("a second idle hint");
        assert_ne!(key, other);
        assert!(ledger.take_next(|_| true).is_none(), "both are busy");
        ledger.release(t, &key);
        assert!(ledger.take_next(|n| n != t).is_none(), "the target is down");
        ledger.removed(t, b"a");
        ledger.removed(t, b"b");
        assert!(ledger.is_empty());
    }

    #[test]
    fn hints_expire_once_no_write_reached_them_for_the_age_bound() {
        let mut ledger = HintLedger::default();
        let t = NodeId(1);
        ledger.stored(t, b"old", 1, Duration::from_secs(0));
        ledger.stored(t, b"refreshed", 1, Duration::from_secs(0));
        ledger.stored(t, b"refreshed", 2, Duration::from_secs(90));
        let expired = ledger.take_expired(Duration::from_secs(100), Duration::from_secs(60));
        assert_eq!(expired, vec![(t, b"old".to_vec())]);
    }

    #[test]
    fn handoff_takes_targets_in_turn() {
        let mut ledger = HintLedger::default();
        for target in [NodeId(1), NodeId(2)] {
            for key in [b"a", b"b"] {
                ledger.stored(target, key, 1, Duration::ZERO);
            }
        }
        let order: Vec<NodeId> = (0..4)
            .map(|_| ledger.take_next(|_| true).expect("idle hints").0)
            .collect();
        assert_eq!(order, [NodeId(1), NodeId(2), NodeId(1), NodeId(2)]);
    }

    #[test]
    fn the_throttle_holds_the_byte_rate() {
        let mut throttle = Throttle::new(1000, Duration::ZERO);
        let mut sent = 0;
        let mut now = Duration::ZERO;
        while now < Duration::from_secs(10) {
            if throttle.ready(now) {
                throttle.spend(100);
                sent += 100;
            } else {
                now = throttle.ready_at().max(now + Duration::from_millis(1));
            }
        }
        // One second of burst plus ten of rate, give or take one send.
        assert!((10_000..=11_100).contains(&sent), "sent {sent}");
    }
}
