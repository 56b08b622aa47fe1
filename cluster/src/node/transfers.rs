//! Streaming partitions to their new replicas during a membership change (see
//! `crate::view` for why this is safe, `crate::keeper` for when it may start).
//!
//! A source (a replica leaving the partition's list; for a replacement, every
//! surviving replica) lists the partition from its store a chunk of Merkle leaves at
//! a time, reads each key and sends it to each new replica as a replica write, a
//! window of keys at a time; the new replica merges it causally and acks once it is
//! durable, as for any write. When every listed key is acked, a source that leaves the
//! list stops serving the partition, and only then tells the new replica
//! `TransferDone` (again every second until the partition shows as moved: the message
//! may be lost, or the new replica may restart and forget it heard it). The new
//! replica reports the partition moved ([`Action::Moved`]) once every source has said
//! so, and the ring keeper spreads the news.
//!
//! A node drops the partitions it no longer serves a few request timeouts after its
//! view stops naming it (requests already queued there finish first).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use super::pace::Pace;
use super::{Action, DropReason, Node};
use crate::hints::Shelf;
use crate::message::{PeerMessage, RequestId};
use crate::replica::{Job, StorageOp, StorageOpId};
use crate::ring::{NodeId, PartitionId};
use crate::version::VersionSet;

/// Streams a shard runs at once: moves run in parallel, bounded.
pub const STREAMS_MAX: usize = 4;
/// Keys of one stream read or in flight to the new replica at once.
pub const STREAM_WINDOW: usize = 64;
/// Merkle leaves listed per storage listing (of `merkle::LEAVES`).
const LEAVES_PER_LISTING: usize = 64;
/// How often a finished source repeats `TransferDone` until the partition moved.
const DONE_RESEND: Duration = Duration::from_secs(1);
/// How long a key the new replica refused waits before it is sent again.
const REFUSED_RETRY: Duration = Duration::from_secs(5);

/// Counters of partition transfers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Keys streamed to new replicas and acknowledged there, and their bytes (keys
    /// and values).
    pub keys_sent: u64,
    pub bytes_sent: u64,
    /// Refusals of a streamed key by a new replica (over its store's limits); the
    /// key goes again every few seconds and the partition waits for it.
    pub keys_refused: u64,
    /// Partitions this shard finished streaming, and received in full.
    pub partitions_sent: u64,
    pub partitions_received: u64,
    /// Partitions dropped after they moved away.
    pub partitions_dropped: u64,
    /// Streams running now.
    pub streams: u64,
    /// The streaming rate now, in keys per second (it follows the new replicas'
    /// ack times, up to the configured rate; 0 when unlimited or not streaming).
    pub keys_per_second: u64,
}

/// One partition streaming to one new replica.
#[derive(Debug, Default)]
struct Stream {
    /// The next Merkle leaf to list.
    next_leaf: usize,
    listing: bool,
    queued: VecDeque<Vec<u8>>,
    in_flight: usize,
    /// Keys the new replica refused (its merge was over its store's limits), and
    /// when each goes again.
    refused: VecDeque<(Duration, Vec<u8>)>,
    /// When `TransferDone` was last sent (once every key is acked).
    done_sent_at: Option<Duration>,
}

impl Stream {
    fn finished(&self) -> bool {
        self.next_leaf >= crate::merkle::LEAVES
            && !self.listing
            && self.queued.is_empty()
            && self.in_flight == 0
            && self.refused.is_empty()
    }
}

/// A key of a stream being read here or written there.
#[derive(Debug)]
struct KeyInFlight {
    partition: PartitionId,
    target: NodeId,
    key: Vec<u8>,
    deadline: Duration,
    /// When it was sent to the new replica (read from the store before that).
    sent_at: Duration,
}

/// A node's transfers for the change in progress.
#[derive(Debug, Default)]
pub(super) struct Transfers {
    /// The change these transfers belong to (0: none).
    fingerprint: u64,
    streams: BTreeMap<(PartitionId, NodeId), Stream>,
    /// Partitions this node streamed away and no longer serves.
    handed_over: BTreeSet<PartitionId>,
    /// Per partition moving here, the sources that finished.
    received: BTreeMap<PartitionId, BTreeSet<NodeId>>,
    keys: BTreeMap<RequestId, KeyInFlight>,
    listings: BTreeMap<StorageOpId, (PartitionId, NodeId)>,
    /// Partitions to drop, and from when.
    drops_due: Vec<(Duration, PartitionId)>,
    drops: BTreeMap<StorageOpId, PartitionId>,
    pace: Option<Pace>,
    pub stats: TransferStats,
}

impl Transfers {
    pub fn new(fingerprint: u64) -> Transfers {
        Transfers {
            fingerprint,
            ..Transfers::default()
        }
    }

    /// Streams not finished yet.
    fn running(&self) -> usize {
        self.streams.values().filter(|s| !s.finished()).count()
    }

    pub fn handed_over(&self, partition: PartitionId) -> bool {
        self.handed_over.contains(&partition)
    }

    pub fn owns_request(&self, id: RequestId) -> bool {
        self.keys.contains_key(&id)
    }

    pub fn owns_listing(&self, op: StorageOpId) -> bool {
        self.listings.contains_key(&op)
    }

    pub fn owns_drop(&self, op: StorageOpId) -> bool {
        self.drops.contains_key(&op)
    }

    pub fn open_work(&self) -> usize {
        self.keys.len() + self.listings.len() + self.drops.len()
    }

    /// Forgets everything of the previous change (its answers are dropped as not
    /// owned); drops still due and the counters stay.
    fn restart(&mut self, fingerprint: u64) {
        self.fingerprint = fingerprint;
        self.streams.clear();
        self.handed_over.clear();
        self.received.clear();
        self.keys.clear();
        self.listings.clear();
        self.pace = None;
    }

    /// Takes a key off its stream's window (answered or timed out): the stream, if
    /// it still runs, and the key.
    fn take_key(&mut self, id: RequestId) -> Option<(&mut Stream, KeyInFlight)> {
        let key = self.keys.remove(&id)?;
        let stream = self.streams.get_mut(&(key.partition, key.target))?;
        stream.in_flight -= 1;
        Some((stream, key))
    }
}

impl Node {
    /// Whether this shard still has transfer work: partitions to drop, or streams
    /// of the change in progress not finished.
    pub fn transfers_busy(&self) -> bool {
        !self.transfers.drops_due.is_empty()
            || !self.transfers.drops.is_empty()
            || self.transfers.running() > 0
    }

    /// At start, every partition this node leaves under the change in progress counts
    /// as handed over: whether it was before the restart is not stored, and serving it
    /// again would let a reader on an older view count this node while it misses
    /// writes the new replicas acknowledged. (Its writes reach W among the others, and
    /// it still streams the partition from its store.)
    pub(super) fn assume_handed_over(&mut self) {
        let me = self.config.node;
        let leaving: Vec<PartitionId> = (self.view.pending())
            .filter(|&p| self.config.shards.owner(p) == self.config.shard)
            .filter(|&p| self.view.lost(p).contains(&me))
            .collect();
        self.transfers.handed_over.extend(leaving);
    }

    /// Runs this shard's part of the change in progress (the driver calls this every
    /// 100 ms or so): streams start once `allowed` (the ring keeper's word that every
    /// member holds the change and it has settled), and partitions moved away are
    /// dropped once due.
    pub fn tick_transfers(&mut self, now: Duration, allowed: bool) {
        self.drop_due_partitions(now);
        if allowed && !self.view.is_stable() {
            self.start_streams();
            let streams: Vec<(PartitionId, NodeId)> =
                self.transfers.streams.keys().copied().collect();
            for (partition, target) in streams {
                self.pump_stream(now, partition, target);
            }
        }
        let running = self.transfers.running();
        self.transfers.stats.streams = running as u64;
        self.transfers.stats.keys_per_second = match &self.transfers.pace {
            Some(pace) if running > 0 => pace.rate(),
            _ => 0,
        };
        self.flush_local(now);
    }

    /// Partitions of this shard that this node streams, to each new replica, up to
    /// `STREAMS_MAX` unfinished at once.
    fn start_streams(&mut self) {
        let me = self.config.node;
        let mut running = self.transfers.running();
        let pending: Vec<PartitionId> = self
            .view
            .pending()
            .filter(|&p| self.config.shards.owner(p) == self.config.shard)
            .collect();
        for partition in pending {
            if running >= STREAMS_MAX {
                return;
            }
            if !self.view.sources(partition).contains(&me) {
                continue;
            }
            for target in self.view.gained(partition) {
                if let std::collections::btree_map::Entry::Vacant(entry) =
                    self.transfers.streams.entry((partition, target))
                {
                    entry.insert(Stream::default());
                    running += 1;
                }
            }
        }
    }

    /// Lists, reads and sends what the window and the throttle allow; says done once
    /// every key is acked.
    fn pump_stream(&mut self, now: Duration, partition: PartitionId, target: NodeId) {
        let rate = self.config.transfer_keys_per_second;
        let Some(stream) = self.transfers.streams.get_mut(&(partition, target)) else {
            return;
        };
        if stream.finished() {
            let due = stream.done_sent_at.is_none_or(|at| now >= at + DONE_RESEND);
            if due && self.view.is_pending(partition) {
                self.finish_stream(now, partition, target);
            }
            return;
        }
        while let Some(&(at, _)) = stream.refused.front()
            && at <= now
        {
            let (_, key) = stream.refused.pop_front().expect("looked at just above");
            stream.queued.push_back(key);
        }
        if !stream.listing && stream.queued.is_empty() && stream.in_flight == 0 {
            let first = stream.next_leaf;
            let last = (first + LEAVES_PER_LISTING).min(crate::merkle::LEAVES);
            stream.next_leaf = last;
            stream.listing = true;
            let op = StorageOpId(self.next_listing);
            self.next_listing -= 1;
            self.transfers.listings.insert(op, (partition, target));
            let leaves = (first as u32..last as u32).collect();
            let list = StorageOp::ListLeaves {
                op,
                partition,
                leaves,
            };
            self.actions.push_back(Action::Storage(list));
            return;
        }
        loop {
            let pace = self
                .transfers
                .pace
                .get_or_insert_with(|| Pace::new(rate, now));
            let stream = self
                .transfers
                .streams
                .get_mut(&(partition, target))
                .expect("looked up above");
            if stream.in_flight >= STREAM_WINDOW || stream.queued.is_empty() || !pace.take(now) {
                return;
            }
            let key = stream.queued.pop_front().expect("not empty");
            stream.in_flight += 1;
            let id = self.new_request_id();
            let deadline = now + self.config.request_timeout * 2;
            self.arm(id, deadline);
            let in_flight = KeyInFlight {
                partition,
                target,
                key: key.clone(),
                deadline,
                sent_at: now,
            };
            self.transfers.keys.insert(id, in_flight);
            let origin = self.local_origin(id);
            self.submit(now, key, Shelf::Home(partition), Job::Read { origin });
        }
    }

    /// Every stream of `partition` is acked: a source leaving its list stops serving
    /// it, then each new replica hears `TransferDone`.
    fn finish_stream(&mut self, now: Duration, partition: PartitionId, target: NodeId) {
        let all_done = self
            .transfers
            .streams
            .range((partition, NodeId(0))..=(partition, NodeId(u32::MAX)))
            .all(|(_, s)| s.finished());
        // (Streams of a partition start together, one per new replica.)
        if !all_done {
            return;
        }
        let me = self.config.node;
        if self.view.lost(partition).contains(&me) && self.transfers.handed_over.insert(partition) {
            self.transfers.stats.partitions_sent += 1;
        }
        let fingerprint = self.view.fingerprint();
        if let Some(stream) = self.transfers.streams.get_mut(&(partition, target)) {
            stream.done_sent_at = Some(now);
        }
        self.send(
            target,
            PeerMessage::TransferDone {
                partition,
                fingerprint,
            },
        );
    }

    pub(super) fn on_transfer_listed(
        &mut self,
        now: Duration,
        op: StorageOpId,
        keys: Vec<(Vec<u8>, u32)>,
    ) {
        let (partition, target) = self.transfers.listings.remove(&op).expect("owned");
        let Some(stream) = self.transfers.streams.get_mut(&(partition, target)) else {
            return;
        };
        stream.listing = false;
        if !self.config.sabotage.stream_nothing {
            stream.queued.extend(keys.into_iter().map(|(key, _)| key));
        }
        self.pump_stream(now, partition, target);
    }

    /// A streamed key was read here: send it, or skip it if it is gone.
    pub(super) fn on_transfer_read(&mut self, now: Duration, id: RequestId, versions: VersionSet) {
        let Some(in_flight) = self.transfers.keys.get_mut(&id) else {
            return;
        };
        if versions.is_empty() {
            self.finish_key(now, id);
            return;
        }
        in_flight.sent_at = now;
        let bytes = in_flight.key.len()
            + versions
                .siblings()
                .map(|v| v.value.data().map_or(0, <[u8]>::len))
                .sum::<usize>();
        self.transfers.stats.bytes_sent += bytes as u64;
        let (target, partition, key) =
            (in_flight.target, in_flight.partition, in_flight.key.clone());
        let message = PeerMessage::Write {
            request: id,
            partition,
            key,
            versions,
            hint_for: None,
        };
        self.send(target, message);
    }

    /// The new replica stored a streamed key (`stored`), or refused it.
    pub(super) fn on_transfer_ack(
        &mut self,
        now: Duration,
        from: NodeId,
        id: RequestId,
        stored: bool,
    ) {
        if self
            .transfers
            .keys
            .get(&id)
            .is_some_and(|k| k.target != from)
        {
            self.count(DropReason::UnexpectedSender);
            return;
        }
        // A refusal says nothing of the new replica's queue (it answered at once).
        if stored
            && let (Some(key), Some(pace)) =
                (self.transfers.keys.get(&id), &mut self.transfers.pace)
        {
            pace.acked(now, now.saturating_sub(key.sent_at));
        }
        if stored {
            self.transfers.stats.keys_sent += 1;
        } else {
            // Over the new replica's store limits (its own writes meanwhile made the
            // merged siblings too large): the partition must not move without the key,
            // or the source drops the only copies of its siblings. It goes again later;
            // like a parked hint, it waits for a client to resolve the siblings.
            self.transfers.stats.keys_refused += 1;
            if let Some((stream, key)) = self.transfers.take_key(id) {
                stream.refused.push_back((now + REFUSED_RETRY, key.key));
            }
            return;
        }
        self.finish_key(now, id);
    }

    /// No answer in time: the key goes again (re-read, so it is current).
    pub(super) fn on_transfer_timer(&mut self, now: Duration, id: RequestId) {
        let Some(in_flight) = self.transfers.keys.get(&id) else {
            return;
        };
        if now < in_flight.deadline {
            let deadline = in_flight.deadline;
            self.count(DropReason::EarlyTimer);
            self.arm(id, deadline);
            return;
        }
        if let Some(pace) = &mut self.transfers.pace {
            pace.timed_out(now);
        }
        if let Some((stream, key)) = self.transfers.take_key(id) {
            stream.queued.push_front(key.key);
            let (partition, target) = (key.partition, key.target);
            self.pump_stream(now, partition, target);
        }
    }

    fn finish_key(&mut self, now: Duration, id: RequestId) {
        if let Some((_, key)) = self.transfers.take_key(id) {
            let (partition, target) = (key.partition, key.target);
            self.pump_stream(now, partition, target);
        }
    }

    /// A source finished streaming `partition` here.
    pub(super) fn on_transfer_done(
        &mut self,
        from: NodeId,
        partition: PartitionId,
        fingerprint: u64,
    ) {
        let me = self.config.node;
        let current = fingerprint == self.view.fingerprint()
            && self.view.is_pending(partition)
            && self.view.gained(partition).contains(&me)
            && self.view.sources(partition).contains(&from);
        if !current {
            self.count(DropReason::StaleTransfer);
            return;
        }
        let sources = self.view.sources(partition);
        let received = self.transfers.received.entry(partition).or_default();
        let first = received.insert(from) && sources.iter().all(|s| received.contains(s));
        if sources.iter().all(|s| received.contains(s)) {
            if first {
                self.transfers.stats.partitions_received += 1;
            }
            self.actions.push_back(Action::Moved {
                partition,
                fingerprint,
            });
        }
    }

    /// The view changed: transfers of another change are forgotten, and partitions
    /// this node stopped serving are dropped once due.
    pub(super) fn transfers_view_changed(&mut self, now: Duration, before: &crate::view::RingView) {
        let fingerprint = self.view.fingerprint();
        if fingerprint != self.transfers.fingerprint {
            self.transfers.restart(fingerprint);
        }
        let (me, n) = (self.config.node, self.config.quorum.n());
        let due = now + self.config.request_timeout * 3;
        for partition in (0..self.view.ring().partition_count()).map(PartitionId) {
            if self.config.shards.owner(partition) != self.config.shard {
                continue;
            }
            if before.serves(me, partition, n) && !self.view.serves(me, partition, n) {
                self.transfers.drops_due.push((due, partition));
            }
        }
    }

    fn drop_due_partitions(&mut self, now: Duration) {
        let (me, n) = (self.config.node, self.config.quorum.n());
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.transfers.drops_due)
            .into_iter()
            .partition(|&(at, _)| at <= now);
        self.transfers.drops_due = later;
        for (_, partition) in due {
            // A later change may have made this node a replica again.
            if self.view.serves(me, partition, n) || self.config.sabotage.keep_moved_partitions {
                continue;
            }
            let op = StorageOpId(self.next_listing);
            self.next_listing -= 1;
            self.transfers.drops.insert(op, partition);
            self.replica.forget_partition(partition);
            self.actions
                .push_back(Action::Storage(StorageOp::DropPartition { op, partition }));
        }
    }

    pub(super) fn on_partition_dropped(&mut self, now: Duration, op: StorageOpId, ok: bool) {
        let Some(partition) = self.transfers.drops.remove(&op) else {
            return;
        };
        if ok {
            self.transfers.stats.partitions_dropped += 1;
        } else {
            // Tried again: left on disk, it could meet a later change that makes this
            // node a replica again, with values whose deletes were collected since.
            let again = now + self.config.request_timeout;
            self.transfers.drops_due.push((again, partition));
        }
    }

    /// At start, the ring partitions the store holds data of (`stored`): those this
    /// node does not serve under its view moved away before it could drop them (the
    /// drops still due are not stored), and are dropped now.
    pub fn drop_unserved(&mut self, now: Duration, stored: impl IntoIterator<Item = PartitionId>) {
        let (me, n) = (self.config.node, self.config.quorum.n());
        let count = self.view.ring().partition_count();
        for partition in stored {
            let mine =
                partition.0 < count && self.config.shards.owner(partition) == self.config.shard;
            if mine && !self.view.serves(me, partition, n) {
                self.transfers.drops_due.push((now, partition));
            }
        }
    }
}
