//! One node's request handling as a sans-IO state machine (Dynamo §4.5).
//!
//! The shape follows quinn-proto's `Connection`: `handle_*` methods take an input
//! (a client request, a peer message, a timer, a storage completion) with the current
//! time, and [`Node::poll_action`] hands out what to do next (send, store, arm a timer,
//! reply). A driver loops: feed inputs, drain actions, carry them out. The node never
//! blocks, sleeps or reads a clock.
//!
//! Two clocks come in. `now`, on every input, is monotonic (a `Duration` since an
//! epoch the driver chooses; it must never go backwards) and only times deadlines.
//! `wall_ms`, given with each put, is the coordinator's wall clock (Unix milliseconds,
//! which may jump or be skewed from other nodes'); it only seeds version stamps, which
//! the replica turns into a hybrid logical clock (see `Replica::stamp`): a version's
//! stamp is above the stamps of everything its writer saw, whatever the clocks say.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use crate::anti_entropy::{self, AntiEntropyStats, Exchange, Listing, Push};
use crate::clock::{Actor, Dot, EpochSource, VersionVector};
use crate::codec::Context;
use crate::coordinator::{
    Answer, Forwarding, GetCoordination, PutCoordination, Requester, ThenPut,
};
use crate::hints::{HintConfig, HintLedger, HintStats, HintsPending, Placement, Shelf, Throttle};
use crate::merkle::FANOUT;
use crate::message::{ForwardedPut, PeerMessage, RequestId, TooLarge};
use crate::quorum::Quorum;
use crate::replica::StorageOpId;
use crate::replica::{
    Job, Origin, Refusal, Replica, ReplicaConfig, ReplicaEvent, StorageCompletion, StorageOp,
};
use crate::request::{
    ClientError, ClientReply, ClientToken, GetOutcome, GetRequest, InvalidArgument, PutOutcome,
    PutRequest, Supersedes, Written,
};
use crate::ring::{NodeId, PartitionId, Ring};
use crate::shard_map::ShardMap;
use crate::version::{Value, VersionSet};
use crate::view::{RingChange, RingView};

mod pace;
pub mod tombstones;
pub mod transfers;
use tombstones::{PeerCheck, Sweep, TombstoneStats};
use transfers::{TransferStats, Transfers};

/// Settings of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub node: NodeId,
    /// 64 random bits, fresh for every start of the node (the OS's randomness; the
    /// simulator's dice). The node draws its actor epochs from it, so it needs no
    /// stored state to never reuse an actor (see [`Actor`]).
    pub epoch_seed: u64,
    /// N, R and W of requests that name none.
    pub quorum: Quorum,
    /// How long a coordinator waits for its quorum before answering `Timeout`.
    pub request_timeout: Duration,
    /// Most siblings a put may leave; a put beyond it is refused (Riak fails writes
    /// at 100 siblings). Replicas merging sets never enforce it: a concurrent write is
    /// never dropped to respect a cap.
    pub siblings_max: usize,
    /// Most bytes all sibling values of one key may take together (the store keeps
    /// them in one record, under its value limit), and most bytes their encoded
    /// versions may take (the store's version-blob limit). Checked alike by the
    /// coordinator (a put beyond them is refused before anything is written) and by
    /// every replica merge (which refuses to the coordinator instead of writing).
    pub stored_value_max: usize,
    pub stored_version_max: usize,
    /// Longest key a put may carry (the store's limit). Checked here too, not only by
    /// the server's front ends, because forwarded puts arrive from peers.
    pub key_max: usize,
    /// Bounds and pace of the hints this node holds for down replicas.
    pub hints: HintConfig,
    /// Tombstones older than this, held alike by every replica of their key, are
    /// collected (see `tombstones`); never when `None`. Must exceed the hint age
    /// bound (`hints.age_max`) with room to spare, or a hint of a deleted value could
    /// outlive the tombstone that deleted it.
    pub tombstone_grace: Option<Duration>,
    /// Most keys anti-entropy pushes to peers per second (0: no limit), so a replica
    /// catching up (a replaced disk) does not take the foreground's share.
    pub anti_entropy_pushes_per_second: u64,
    /// Most keys a shard streams to new replicas per second during a membership
    /// change (0: no limit), so moves do not take the foreground's share.
    pub transfer_keys_per_second: u64,
    /// The longest a peer message may take to arrive once sent (the transport's
    /// bound: the server's peer sockets give up after TCP_USER_TIMEOUT). Tombstone
    /// collection waits it out between its two rounds.
    pub message_delay_max: Duration,
    /// Where this node's request sequence numbers start. A driver that runs several
    /// state machines as one node (one per core) gives each its own range, so request
    /// ids stay unique per node and replies can be told apart.
    pub first_sequence: u64,
    /// The node's shards and which one this state machine is: it serves (and
    /// exchanges Merkle trees for) only the partitions `shards` gives `shard`.
    pub shards: ShardMap,
    pub shard: usize,
    /// Deliberate bugs, for proving the simulator's checkers; all off in production.
    pub sabotage: Sabotage,
}

impl NodeConfig {
    pub fn new(node: NodeId, epoch_seed: u64) -> Self {
        NodeConfig {
            node,
            epoch_seed,
            quorum: Quorum::default(),
            request_timeout: Duration::from_secs(1),
            siblings_max: 100,
            stored_value_max: usize::MAX,
            stored_version_max: usize::MAX,
            key_max: usize::MAX,
            hints: HintConfig::default(),
            tombstone_grace: None,
            anti_entropy_pushes_per_second: 0,
            transfer_keys_per_second: 0,
            message_delay_max: Duration::from_secs(10),
            first_sequence: 0,
            shards: ShardMap::new(1).expect("one shard is always a valid count"),
            shard: 0,
            sabotage: Sabotage::default(),
        }
    }
}

/// Switches that break the node on purpose, so tests can show the simulator's checkers
/// catch what they claim to. Never set outside tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sabotage {
    /// Ack a write when it is handed to storage, before it is durable.
    pub ack_before_durable: bool,
    /// Keep only the latest sibling on every merge, losing concurrent writes.
    pub keep_one_sibling: bool,
    /// Never send read repairs, so replicas that missed writes stay behind.
    pub skip_read_repair: bool,
    /// Treat every put as blind, so deletes and overwrites supersede nothing.
    pub ignore_context: bool,
    /// Keep one actor per node for ever, across restarts and storage failures, the
    /// way a node that restarts with an empty data directory would reuse its old
    /// incarnation: its dots collide with ones it issued before.
    pub reuse_actor: bool,
    /// Stamp versions with the wall clock alone, so a skewed or jumping clock stamps a
    /// write below one its writer saw.
    pub wall_clock_stamps: bool,
    /// Make a SET supersede only what the coordinator's own replica holds, with no
    /// quorum read (right for N = 1 only): writes the other replicas hold survive it
    /// as siblings, and the SET's "what it superseded" misses acked writes.
    pub set_reads_local_only: bool,
    /// Coordinate every copy of a duplicated forward, as a node without the
    /// forwarded-put memory would: one SET is applied twice, under two dots.
    pub forget_forwards: bool,
    /// Remove a hint as soon as it is sent, before its target acknowledged it: a
    /// handoff lost in flight (or a target that crashes before its sync) loses the
    /// only copy a sloppy write had there.
    pub drop_hints_unacked: bool,
    /// Leave the partition's Merkle tree alone when a replica merge (not a put made
    /// here) is written: the tree drifts from what the store holds.
    pub skip_tree_updates: bool,
    /// Draw a home dot one past what the key's copy and context show, as if nothing
    /// were ever collected: after a tombstone is collected, a blind put redraws a dot
    /// an old context still claims, and a write with that context supersedes it unseen.
    pub dense_counters_after_collection: bool,
    /// Collect a tombstone once old enough, without asking the other replicas: one
    /// that still holds the deleted value brings it back.
    pub collect_unconfirmed: bool,
    /// Stream no key of a moving partition (its transfer ends at once): the new
    /// replicas serve reads without the writes acknowledged before the change.
    pub stream_nothing: bool,
    /// Write only to the old ring's replicas while a partition moves (no joint
    /// quorum): once it moved, a write acked by replicas that left it is missed.
    pub old_ring_writes_only: bool,
    /// Never drop a partition that moved away: its stale copy stays on disk.
    pub keep_moved_partitions: bool,
}

/// Which timer fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimerId {
    /// The deadline of a coordinated request (or of one hint's handoff).
    Request(RequestId),
    /// Time to look at the hints again: hand off, retry, expire.
    Handoff,
}

/// Something the driver must do for the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Send {
        to: NodeId,
        message: PeerMessage,
    },
    Storage(StorageOp),
    /// Call [`Node::handle_timer`] with `timer` once `now >= at`.
    SetTimer {
        timer: TimerId,
        at: Duration,
    },
    Reply {
        client: ClientToken,
        reply: ClientReply,
    },
    /// This node now holds everything of `partition` its sources had, under the
    /// membership change named `fingerprint`: tell the node's ring keeper
    /// ([`crate::keeper::RingKeeper::partition_moved`]).
    Moved {
        partition: PartitionId,
        fingerprint: u64,
    },
}

/// Why an input was dropped. Bad or stale input is counted here, never a panic and
/// never an error that climbs the stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// An answer to a request that already finished (normal after a quorum).
    LateResponse,
    /// An answer from a node the request did not ask.
    UnexpectedSender,
    /// A second answer from the same node (a duplicated message).
    DuplicateResponse,
    /// A write ack before the coordinator made the version: impossible from honest
    /// peers.
    AckBeforeVersion,
    /// A message whose partition does not match its key under this node's ring.
    WrongPartition,
    /// A storage completion for an operation this node did not issue.
    UnknownStorageOp,
    /// Stored bytes that do not decode; treated as a missing record.
    CorruptStoredVersions,
    StorageReadFailed,
    StorageWriteFailed,
    /// A repair whose merged versions the store could not keep (see
    /// `NodeConfig::stored_value_max`); nothing was written.
    MergeTooLarge,
    /// A timer that fired early was re-armed.
    EarlyTimer,
    /// A forwarded put this node already took (a duplicated message): a put is not
    /// idempotent, so it is coordinated once.
    DuplicateForward,
    /// A sloppy read or write standing in for a node that is not a ring member.
    UnknownHintTarget,
    /// A key longer than any store keeps (`NodeConfig::key_max`), from a peer.
    KeyTooLong,
    /// A repair of tombstones past their grace period for a key this replica holds
    /// nothing of: nothing here to delete, and every replica collects them.
    CollectedTombstone,
    /// A tombstone to collect that was written meanwhile (it stays).
    TombstoneChanged,
    /// A tombstone check beyond what this node answers at once (`SWEEP_KEYS_MAX`
    /// keys, `PEER_CHECK_KEYS_MAX` in all); the sweeper asks again later.
    TombstoneCheckRefused,
    /// A request for a partition this node holds no replica of under its ring view
    /// (the sender's view is older or newer, or this node handed the partition over).
    NotServing,
    /// A transfer message that does not match the membership change in progress here.
    StaleTransfer,
}

/// Counters a driver can export.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub drops: BTreeMap<DropReason, u64>,
    pub repairs_sent: u64,
    /// Repairs peers sent this node (read repair and anti-entropy pushes).
    pub repairs_received: u64,
    /// Actors given up after a storage failure or a lost record (see `Actor`).
    pub actors_retired: u64,
    /// Puts this node held no replica of and forwarded to one that does.
    pub forwarded: u64,
    pub hints: HintStats,
    pub anti_entropy: AntiEntropyStats,
    pub tombstones: TombstoneStats,
    pub transfers: TransferStats,
}

/// One node: coordinator for the requests it receives, replica for the keys it holds.
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    /// The first epoch of this start; request ids carry it.
    boot_epoch: u64,
    /// After a coordinated put's local write failed, puts are refused until then.
    coordination_paused_until: Option<Duration>,
    /// The ring, and the membership change moving in, if any.
    view: RingView,
    /// Partitions streaming to new replicas, or from old ones (`transfers`).
    transfers: Transfers,
    unreachable: BTreeSet<NodeId>,
    replica: Replica,
    puts: BTreeMap<RequestId, PutCoordination>,
    gets: BTreeMap<RequestId, GetCoordination>,
    forwards: BTreeMap<RequestId, Forwarding>,
    /// Forwarded puts taken recently, with when to forget them (in taking order).
    forwards_taken: BTreeSet<(NodeId, RequestId)>,
    forwards_taken_order: VecDeque<(Duration, NodeId, RequestId)>,
    /// Which keys this node holds as hints, for whom.
    hints: HintLedger,
    /// Hints being handed off: read here, sent, awaiting the target's ack.
    handoffs: BTreeMap<RequestId, Handoff>,
    /// Paces handoff; created at the first input (it needs the clock).
    throttle: Option<Throttle>,
    /// When the handoff timer is armed for, if it is.
    handoff_timer: Option<Duration>,
    /// Anti-entropy: the exchange this node started, the partition it took last, the
    /// key listings asked of storage (ids count down from the top, apart from the
    /// replica's), and keys being read to push to a peer.
    exchange: Option<Exchange>,
    exchange_cursor: Option<PartitionId>,
    /// Per partition, how many exchanges it had: its replicas are taken in turn.
    exchange_turns: BTreeMap<PartitionId, usize>,
    /// The ring partitions this state machine holds a home replica of (its shard's
    /// share of this node's), in order: what anti-entropy walks.
    home: Vec<PartitionId>,
    /// The ring partitions this state machine takes writes of: its home ones and,
    /// while partitions move here, those too (see `serves`).
    writable: Vec<PartitionId>,
    /// Home partitions whose tree matched a peer's when last compared (but for a few
    /// leaves: writes in flight), and whether the last exchange this node started
    /// found more different (then the driver runs exchanges back to back: a node
    /// catching up, such as one with a new empty disk).
    in_sync: BTreeSet<PartitionId>,
    catching_up: bool,
    /// Whether the last exchange started was for a partition not (yet) in sync.
    behind: bool,
    /// When a repair last changed what this node holds; the first tick if none did
    /// yet.
    ae_progress_at: Option<Duration>,
    listings: BTreeMap<StorageOpId, Listing>,
    next_listing: u64,
    pushes: BTreeMap<RequestId, Push>,
    /// Paces pushes (`anti_entropy_pushes_per_second`); made at the first push.
    push_throttle: Option<Throttle>,
    ae_stats: AntiEntropyStats,
    /// Tombstone collection: the latest wall clock the driver gave (Unix ms), open
    /// sweeps and the partition the last one took, peers' checks being answered, and
    /// which sweep or check each local read is for.
    wall_ms: u64,
    sweeps: BTreeMap<u64, Sweep>,
    sweep_cursor: usize,
    sweep_turns: BTreeMap<PartitionId, usize>,
    next_sweep: u64,
    peer_checks: BTreeMap<u64, PeerCheck>,
    sweep_of_read: BTreeMap<RequestId, u64>,
    check_of_read: BTreeMap<RequestId, u64>,
    tombstone_stats: TombstoneStats,
    /// Home partitions whose last listing found no tombstone and none written since:
    /// sweeps skip them rather than walk their index again.
    no_tombstones: BTreeSet<PartitionId>,
    /// Tombstone writes completed per partition, so a listing taken before one (and
    /// answered after it) does not mark the partition empty.
    tombstones_written: BTreeMap<PartitionId, u64>,
    /// When each partition may be swept again (once per settle time; later while its
    /// tombstones are all younger than the grace).
    sweep_not_before: BTreeMap<PartitionId, Duration>,
    next_sequence: u64,
    actions: VecDeque<Action>,
    /// Messages this node sent itself, delivered before the handler returns.
    local_inbox: VecDeque<PeerMessage>,
    stats: NodeStats,
}

impl Node {
    pub fn new(config: NodeConfig, ring: Ring) -> Self {
        let view = RingView::stable(ring, config.quorum.n());
        Node::with_view(config, view)
    }

    /// A node starting with a change in progress (a view kept across a restart).
    pub fn with_view(config: NodeConfig, view: RingView) -> Self {
        let mut node = Node::starting(config, view);
        node.assume_handed_over();
        node
    }

    fn starting(config: NodeConfig, view: RingView) -> Self {
        // The sabotage seeds every start alike, as a stored incarnation that was lost
        // would be: each start draws the epochs the previous one drew.
        let seed = if config.sabotage.reuse_actor {
            u64::from(config.node.0)
        } else {
            config.epoch_seed
        };
        let mut epochs = EpochSource::new(seed);
        let boot_epoch = epochs.next_epoch();
        let replica = Replica::new(
            ReplicaConfig {
                node: config.node,
                siblings_max: config.siblings_max,
                stored_value_max: config.stored_value_max,
                stored_version_max: config.stored_version_max,
                hint_bytes_max: config.hints.bytes_max,
                sabotage: config.sabotage,
            },
            epochs,
        );
        let home = home_partitions(&config, &view);
        let writable = writable_partitions(&config, &view);
        Node {
            config,
            boot_epoch,
            coordination_paused_until: None,
            transfers: Transfers::new(view.fingerprint()),
            view,
            unreachable: BTreeSet::new(),
            replica,
            puts: BTreeMap::new(),
            gets: BTreeMap::new(),
            forwards: BTreeMap::new(),
            forwards_taken: BTreeSet::new(),
            forwards_taken_order: VecDeque::new(),
            hints: HintLedger::default(),
            handoffs: BTreeMap::new(),
            throttle: None,
            handoff_timer: None,
            exchange: None,
            exchange_cursor: None,
            exchange_turns: BTreeMap::new(),
            home,
            writable,
            in_sync: BTreeSet::new(),
            catching_up: false,
            behind: false,
            ae_progress_at: None,
            listings: BTreeMap::new(),
            next_listing: u64::MAX,
            pushes: BTreeMap::new(),
            push_throttle: None,
            ae_stats: AntiEntropyStats::default(),
            wall_ms: 0,
            sweeps: BTreeMap::new(),
            sweep_cursor: 0,
            sweep_turns: BTreeMap::new(),
            // Sweep and check ids of one life never match another's answers.
            next_sweep: boot_epoch,
            peer_checks: BTreeMap::new(),
            sweep_of_read: BTreeMap::new(),
            check_of_read: BTreeMap::new(),
            tombstone_stats: TombstoneStats::default(),
            no_tombstones: BTreeSet::new(),
            tombstones_written: BTreeMap::new(),
            sweep_not_before: BTreeMap::new(),
            next_sequence: config.first_sequence,
            actions: VecDeque::new(),
            local_inbox: VecDeque::new(),
            stats: NodeStats::default(),
        }
    }

    pub fn id(&self) -> NodeId {
        self.config.node
    }

    /// Which of its node's shards this state machine is.
    pub fn shard(&self) -> usize {
        self.config.shard
    }

    /// The ring in force (the old one while a change moves in).
    pub fn ring(&self) -> &Ring {
        self.view.ring()
    }

    pub fn view(&self) -> &RingView {
        &self.view
    }

    /// The wall clock (Unix ms), before anything else: a hint restored at start is
    /// judged too old to hand off by it (see `send_handoff`). Puts and ticks keep it
    /// current afterwards.
    pub fn set_wall_clock(&mut self, wall_ms: u64) {
        self.wall_ms = wall_ms;
    }

    /// Adopts a newer ring view (from the node's ring keeper).
    pub fn set_view(&mut self, now: Duration, view: RingView) {
        let before = std::mem::replace(&mut self.view, view);
        self.home = home_partitions(&self.config, &self.view);
        self.writable = writable_partitions(&self.config, &self.view);
        self.in_sync.retain(|p| self.home.binary_search(p).is_ok());
        self.transfers_view_changed(now, &before);
    }

    /// The ring partitions this state machine holds a home replica of.
    pub fn home_partitions(&self) -> &[PartitionId] {
        &self.home
    }

    /// How many home partitions matched a peer's tree when last compared, of how many.
    pub fn anti_entropy_progress(&self) -> (usize, usize) {
        (self.in_sync.len(), self.home.len())
    }

    /// Whether this node is behind its peers: its last exchange found many leaves
    /// different, or some partition has not matched a peer since the start. The
    /// driver then starts exchanges back to back instead of one per interval.
    pub fn anti_entropy_catching_up(&self, now: Duration) -> bool {
        (self.catching_up || self.behind) && self.ae_progressing(now)
    }

    /// Whether a repair changed something here lately (or the node just started):
    /// partitions that stay different without progress (a merge the store refuses,
    /// tombstones a peer keeps) must not hold the node in catch-up for good.
    fn ae_progressing(&self, now: Duration) -> bool {
        self.ae_progress_at
            .is_none_or(|at| now.saturating_sub(at) < anti_entropy::CATCH_UP_IDLE)
    }

    /// What the failure detector believes; unreachable replicas are not asked, and a
    /// request with too few reachable replicas fails at once with `Unavailable`.
    /// Puts forwarded to a node found unreachable are answered Timeout at once (the
    /// replica may have applied them): waiting out their deadline would tell nothing more.
    pub fn set_reachable(&mut self, node: NodeId, reachable: bool) {
        if reachable {
            let returned = self.unreachable.remove(&node);
            if returned && self.hints.targets().contains(&node) {
                self.hints.unpark(node);
                // Hand off at the next input (set_reachable has no clock): arm now.
                self.handoff_timer = None;
                self.arm_handoff(Duration::ZERO);
            }
        } else if node != self.config.node {
            self.unreachable.insert(node);
            let cut_off: Vec<RequestId> = self
                .forwards
                .iter()
                .filter(|(_, f)| f.to == node)
                .map(|(&id, _)| id)
                .collect();
            for id in cut_off {
                let forward = self.forwards.remove(&id).expect("listed just above");
                self.forward_timed_out(forward);
            }
        }
    }

    pub fn stats(&self) -> NodeStats {
        NodeStats {
            actors_retired: self.replica.actors_retired(),
            hints: self.hints.stats,
            anti_entropy: self.ae_stats,
            tombstones: self.tombstone_stats,
            transfers: self.transfers.stats,
            ..self.stats.clone()
        }
    }

    /// The Merkle tree of a home partition of this node (None: nothing stored).
    pub fn merkle_tree(&self, partition: PartitionId) -> Option<&crate::merkle::MerkleTree> {
        self.replica.tree(partition)
    }

    /// Installs a partition's tree rebuilt from the store's index: at start for every
    /// partition, later for the ones `stale_trees` lists (not busy).
    pub fn set_merkle_tree(&mut self, partition: PartitionId, tree: crate::merkle::MerkleTree) {
        self.replica.set_tree(partition, tree);
    }

    /// Partitions whose trees a lost record made stale, with whether a write of each
    /// is in flight (rebuild the others).
    pub fn stale_trees(&self) -> Vec<(PartitionId, bool)> {
        self.replica.stale_trees()
    }

    /// Hints held here, per target.
    pub fn hints_pending(&self) -> Vec<HintsPending> {
        self.hints.pending()
    }

    /// Tries again the hints their targets refused (the driver calls this now and
    /// then: a refusal over the store's limits lasts until a client resolves the
    /// key's siblings, which nothing here sees).
    pub fn retry_parked_hints(&mut self, now: Duration) {
        for target in self.hints.targets() {
            self.hints.unpark(target);
        }
        self.pump_handoff(now);
        self.flush_local(now);
    }

    /// Hints their target refused (over its store's limits), waiting for a new write
    /// or the target's return.
    pub fn hints_parked(&self) -> usize {
        self.hints.parked()
    }

    /// A hint found in the store at start (the driver lists the hint shelves before
    /// the first request): handed off like any other once its target is seen up. Its
    /// age counts from `now`.
    pub fn restore_hint(&mut self, now: Duration, target: NodeId, key: Vec<u8>, bytes: u64) {
        // A hint for a node that left is kept too: it goes to the key's replicas.
        if target == self.config.node {
            return;
        }
        self.hints.stored(target, &key, bytes, now);
        self.replica.hint_restored(target, bytes);
        self.hints.stats.recovered += 1;
        self.arm_handoff(now);
    }

    /// The actor that stamps the puts this node coordinates now.
    pub fn actor(&self) -> Actor {
        self.replica.actor()
    }

    /// The next thing to do, in the order the node decided them.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Requests still being coordinated here, and keys with replica work in flight.
    pub fn open_work(&self) -> usize {
        self.puts.len()
            + self.gets.len()
            + self.forwards.len()
            + self.handoffs.len()
            + self.listings.len()
            + self.pushes.len()
            + self.transfers.open_work()
            + self.replica.busy_keys()
    }

    pub fn handle_get(&mut self, now: Duration, client: ClientToken, request: GetRequest) {
        let GetRequest {
            key,
            quorum,
            strict,
        } = request;
        let quorum = quorum.unwrap_or(self.config.quorum);
        self.start_read(now, Requester::Client(client), key, quorum, strict, None);
        self.flush_local(now);
    }

    /// A client's put. Coordinated here if this node holds a replica of the key,
    /// otherwise forwarded to the first reachable replica, which answers as it would
    /// answer the client (one peer round trip, see [`PeerMessage::Forward`]).
    pub fn handle_put(
        &mut self,
        now: Duration,
        wall_ms: u64,
        client: ClientToken,
        request: PutRequest,
    ) {
        self.wall_ms = wall_ms;
        let PutRequest {
            key,
            value,
            supersedes,
            quorum,
            mode,
            only_if_present,
            strict,
        } = request;
        let put = ForwardedPut {
            key,
            value,
            supersedes,
            quorum: quorum.unwrap_or(self.config.quorum),
            mode,
            only_if_present,
            strict,
            wall_ms,
        };
        self.start_put(now, Requester::Client(client), put);
        self.flush_local(now);
    }

    /// Sends a get's reads (or a put's read half, with `then`) to the reachable
    /// replicas of `key` (and, unless `strict`, to stand-ins for the others).
    fn start_read(
        &mut self,
        now: Duration,
        requester: Requester,
        key: Vec<u8>,
        quorum: Quorum,
        strict: bool,
        then: Option<ThenPut>,
    ) {
        let partition = self.view.ring().partition_of(&key);
        let home = self.view.read_replicas(partition, quorum.n());
        let placements = self.placements(partition, &home, strict);
        let asked: Vec<NodeId> = placements.iter().map(|p| p.node).collect();
        if asked.len() < quorum.r() {
            let error = ClientError::Unavailable {
                required: quorum.r(),
                reachable: asked.len(),
            };
            self.reply_error(requester, then.is_some(), error);
            return;
        }
        let id = self.new_request_id();
        let deadline = now + self.config.request_timeout;
        self.arm(id, deadline);
        for placement in &placements {
            let message = PeerMessage::Read {
                request: id,
                partition,
                key: key.clone(),
                hint_for: placement.hint_for,
            };
            self.send(placement.node, message);
        }
        let mut coordination =
            GetCoordination::new(requester, key, partition, asked, quorum.r(), deadline, then);
        coordination.stand_ins = placements
            .iter()
            .filter(|p| p.hint_for.is_some())
            .map(|p| p.node)
            .collect();
        self.gets.insert(id, coordination);
    }

    /// A put from a client of this node or forwarded by another node.
    fn start_put(&mut self, now: Duration, requester: Requester, put: ForwardedPut) {
        if let Err(error) = self.check_put(&put) {
            self.reply(requester, ClientReply::Put(Err(error)));
            return;
        }
        let context = match &put.supersedes {
            Supersedes::Context(bytes) => match Context::decode(bytes) {
                Ok(context) => context.0,
                Err(error) => {
                    let error = ClientError::InvalidArgument(InvalidArgument::Context(error));
                    self.reply(requester, ClientReply::Put(Err(error)));
                    return;
                }
            },
            Supersedes::QuorumHeld | Supersedes::Nothing => VersionVector::new(),
        };
        let context = if self.config.sabotage.ignore_context {
            VersionVector::new()
        } else {
            context
        };
        let partition = self.view.ring().partition_of(&put.key);
        let placements = self.write_placements(partition, put.quorum.n(), put.strict);
        if !placements.iter().any(|p| p.node == self.config.node) {
            match requester {
                Requester::Client(client) => self.forward(now, client, partition, put),
                // Rings or views disagree; forwarding on could loop.
                Requester::Forwarder { .. } => {
                    let error = ClientError::NotReplica {
                        replicas: self.view.read_replicas(partition, put.quorum.n()),
                    };
                    self.reply(requester, ClientReply::Put(Err(error)));
                }
            }
            return;
        }
        let ForwardedPut {
            key,
            value,
            supersedes,
            quorum,
            mode,
            only_if_present,
            strict,
            wall_ms,
        } = put;
        // With N = 1 the only replica's own read is the quorum read (unless the put
        // must first learn whether a value is there).
        let local_read_suffices = quorum.n() == 1 || self.config.sabotage.set_reads_local_only;
        let reads_first =
            supersedes == Supersedes::QuorumHeld && (only_if_present || !local_read_suffices);
        let required = if reads_first {
            quorum.w().max(quorum.r())
        } else {
            quorum.w()
        };
        let groups = self.write_groups(partition, quorum.n());
        if let Some(error) = self.cannot_write(now, &groups, &placements, required) {
            self.reply(requester, ClientReply::Put(Err(error)));
            return;
        }
        let value = value.map_or(Value::Tombstone, Value::Data);
        if reads_first {
            let then = ThenPut {
                value,
                quorum,
                mode,
                only_if_present,
                strict,
                wall_ms,
            };
            self.start_read(now, requester, key, quorum, strict, Some(then));
            return;
        }
        // With N = 1 the coordinator's replica holds everything there is: its own
        // read inside the write is the quorum read.
        let supersede_local = supersedes == Supersedes::QuorumHeld;
        let write = Coordinate {
            requester,
            key,
            partition,
            placements,
            groups,
            required: quorum.w(),
            read_stand_ins: 0,
            context,
            supersede_local,
            value,
            mode,
            wall_ms,
        };
        self.coordinate(now, write);
    }

    /// Why a put cannot start writing now, if it cannot: too few reachable replicas
    /// (nothing is attempted), or coordination paused after a failed local write.
    fn cannot_write(
        &self,
        now: Duration,
        groups: &[Vec<NodeId>],
        placements: &[Placement],
        required: usize,
    ) -> Option<ClientError> {
        // Each group (two while the partition moves) needs `required` of its replicas
        // asked, in person or through a stand-in.
        let asked: BTreeSet<NodeId> = placements
            .iter()
            .map(|p| p.hint_for.unwrap_or(p.node))
            .collect();
        let reachable = groups
            .iter()
            .map(|group| group.iter().filter(|n| asked.contains(n)).count())
            .min()
            .unwrap_or(0);
        if reachable < required {
            return Some(ClientError::Unavailable {
                required,
                reachable,
            });
        }
        // Each failed local write costs an actor (a clock entry on every key it
        // writes next): while the store keeps failing, refuse rather than spend one
        // per put. One put is let through per pause to find out.
        let paused = self
            .coordination_paused_until
            .is_some_and(|until| now < until);
        paused.then_some(ClientError::StorageFailed)
    }

    /// Refuses a put that can never succeed as sent.
    fn check_put(&self, put: &ForwardedPut) -> Result<(), ClientError> {
        if put.only_if_present && put.supersedes != Supersedes::QuorumHeld {
            return Err(InvalidArgument::OnlyIfPresentWithoutRead.into());
        }
        if put.key.len() > self.config.key_max {
            let (len, limit) = (put.key.len(), self.config.key_max);
            return Err(InvalidArgument::KeyTooLong { len, limit }.into());
        }
        let size = put.value.as_ref().map_or(0, Vec::len);
        if size > self.config.stored_value_max {
            let limit = self.config.stored_value_max;
            return Err(ClientError::ValuesTooLarge { size, limit });
        }
        Ok(())
    }

    /// Starts the write of a put at its replicas, the local one first.
    fn coordinate(&mut self, now: Duration, write: Coordinate) {
        let Coordinate {
            requester,
            key,
            partition,
            placements,
            groups,
            required,
            read_stand_ins,
            context,
            supersede_local,
            value,
            mode,
            wall_ms,
        } = write;
        let id = self.new_request_id();
        let deadline = now + self.config.request_timeout;
        self.arm(id, deadline);
        let replicas = placements.iter().map(|p| p.node).collect();
        let mut coordination = PutCoordination::new(
            requester,
            key.clone(),
            partition,
            replicas,
            groups,
            required,
            deadline,
        );
        coordination.read_stand_ins = read_stand_ins;
        coordination.hint_for = placements
            .iter()
            .filter_map(|p| Some((p.node, p.hint_for?)))
            .collect();
        let shelf = self.shelf_of(&placements, partition);
        self.puts.insert(id, coordination);
        let job = Job::Coordinate {
            origin: self.local_origin(id),
            context,
            supersede_local,
            value,
            mode,
            wall_ms,
        };
        self.submit(now, key, shelf, job);
    }

    /// Hands a put for a key this node holds no replica of to the first reachable
    /// replica; while the key's partition moves, to one that stays (not the new
    /// replica, which is busy receiving the partition and, if its view lags, may not
    /// agree yet). The answer comes back as [`PeerMessage::ForwardReply`].
    fn forward(
        &mut self,
        now: Duration,
        client: ClientToken,
        partition: PartitionId,
        put: ForwardedPut,
    ) {
        let required = put.quorum.w();
        let placements = self.write_placements(partition, put.quorum.n(), put.strict);
        let gained = self.view.gained(partition);
        let Some(to) = placements
            .iter()
            .find(|p| !gained.contains(&p.node))
            .or(placements.first())
            .map(|p| p.node)
        else {
            // No replica can be asked, so none can acknowledge it.
            let error = ClientError::Unavailable {
                required,
                reachable: 0,
            };
            self.reply(Requester::Client(client), ClientReply::Put(Err(error)));
            return;
        };
        // The replica answers within its own timeouts (two for a put that reads
        // first); waiting one more lets its real answer, in flight, win over ours.
        let phases = if put.supersedes == Supersedes::QuorumHeld {
            2
        } else {
            1
        };
        let timeout = self.config.request_timeout;
        let deadline = now + timeout * (phases + 1);
        let id = self.new_request_id();
        self.arm(id, deadline);
        self.forwards.insert(
            id,
            Forwarding {
                client,
                to,
                required,
                deadline,
            },
        );
        self.stats.forwarded += 1;
        let message = PeerMessage::Forward {
            request: id,
            partition,
            put,
        };
        self.send(to, message);
    }

    pub fn handle_message(&mut self, now: Duration, from: NodeId, message: PeerMessage) {
        // A node being replaced is taken for dead: if it is not (cut off, not
        // crashed), nothing it says (answers, acks, requests) is counted.
        if let Some(RingChange::Replace { dead, .. }) = self.view.change()
            && dead == from
        {
            self.count(DropReason::NotServing);
            return;
        }
        self.dispatch(now, from, message);
        self.flush_local(now);
    }

    fn dispatch(&mut self, now: Duration, from: NodeId, message: PeerMessage) {
        match message {
            PeerMessage::Read {
                request,
                partition,
                key,
                hint_for,
            } => {
                if self.check_partition(partition, &key)
                    && self.check_hint_target(hint_for)
                    && self.check_serving(partition, hint_for, true)
                {
                    let origin = Origin {
                        node: from,
                        request,
                    };
                    let shelf = self.shelf_for(partition, hint_for);
                    self.submit(now, key, shelf, Job::Read { origin });
                }
            }
            PeerMessage::ReadReply { request, versions } => {
                self.on_read_reply(now, from, request, versions)
            }
            PeerMessage::Write {
                request,
                partition,
                key,
                versions,
                hint_for,
            } => {
                if self.check_partition(partition, &key)
                    && self.check_hint_target(hint_for)
                    && self.check_serving(partition, hint_for, false)
                {
                    let origin = Some(Origin {
                        node: from,
                        request,
                    });
                    let job = Job::Merge {
                        origin,
                        incoming: versions,
                        skip_if_absent: false,
                    };
                    let shelf = self.shelf_for(partition, hint_for);
                    self.submit(now, key, shelf, job);
                }
            }
            PeerMessage::WriteAck { request } => self.on_write_ack(now, from, request),
            PeerMessage::TransferDone {
                partition,
                fingerprint,
            } => self.on_transfer_done(from, partition, fingerprint),
            PeerMessage::WriteRefused { request, refusal } => {
                self.on_write_refused(now, from, request, refusal)
            }
            PeerMessage::Repair {
                partition,
                key,
                versions,
            } => {
                if self.check_partition(partition, &key)
                    && self.check_serving(partition, None, false)
                {
                    self.stats.repairs_received += 1;
                    let job = Job::Merge {
                        origin: None,
                        skip_if_absent: self.is_collectable(&versions),
                        incoming: versions,
                    };
                    self.submit(now, key, Shelf::Home(partition), job);
                }
            }
            PeerMessage::Forward {
                request,
                partition,
                put,
            } => {
                if self.view.ring().partition_of(&put.key) != partition {
                    // Rings disagree: say so rather than let the forwarder time out.
                    self.count(DropReason::WrongPartition);
                    let requester = Requester::Forwarder {
                        node: from,
                        request,
                    };
                    let replicas = self.view.read_replicas(partition, put.quorum.n());
                    let error = ClientError::NotReplica { replicas };
                    self.reply(requester, ClientReply::Put(Err(error)));
                } else if self.take_forward(now, from, request) {
                    let requester = Requester::Forwarder {
                        node: from,
                        request,
                    };
                    self.start_put(now, requester, put);
                }
            }
            PeerMessage::ForwardReply { request, reply } => {
                self.on_forward_reply(from, request, reply)
            }
            PeerMessage::TombstonesCheck {
                partition,
                sweep,
                keys,
            } => self.on_tombstones_check(now, from, partition, sweep, keys),
            PeerMessage::TombstonesHeld {
                partition,
                sweep,
                keys,
            } => self.on_tombstones_held(now, from, partition, sweep, keys),
            PeerMessage::AeBranches {
                partition,
                branches,
            } => self.on_ae_branches(from, partition, &branches),
            PeerMessage::AeLeaves { partition, leaves } => {
                self.on_ae_leaves(from, partition, &leaves)
            }
            PeerMessage::AeKeys {
                partition,
                leaves,
                keys,
            } => self.on_ae_keys(now, from, partition, leaves, keys),
            PeerMessage::AePull { partition, keys } => {
                if !self.is_co_replica(from, partition) {
                    self.count(DropReason::WrongPartition);
                    return;
                }
                let keys: std::collections::BTreeSet<Vec<u8>> = keys.into_iter().collect();
                for key in keys {
                    if self.check_partition(partition, &key) {
                        self.start_push(now, from, partition, key);
                    }
                }
            }
        }
    }

    /// Starts one anti-entropy exchange (the driver calls this every interval): the
    /// next partition this node holds data of, with one of its other replicas that is
    /// reachable, in turn. Nothing while the previous exchange is open.
    pub fn tick_anti_entropy(&mut self, now: Duration) {
        self.pushes.retain(|_, push| push.deadline > now);
        if let Some(exchange) = &self.exchange {
            if now < exchange.deadline {
                return;
            }
            self.ae_stats.timed_out += 1;
            self.exchange = None;
            self.catching_up = false;
        }
        // Out of push budget: whatever this exchange found would wait anyway.
        if let Some(throttle) = &mut self.push_throttle
            && !throttle.ready(now)
        {
            return;
        }
        // Every home partition, tree or none: a replica with an empty disk has no tree
        // yet and must still ask its peers for what it lacks.
        let start = match self.exchange_cursor {
            Some(cursor) => self.home.partition_point(|&p| p <= cursor),
            None => 0,
        };
        // Partitions not yet in sync first while that makes progress (a node
        // catching up), then all in turn.
        self.ae_progress_at.get_or_insert(now);
        let home = self.home.len();
        let order = (0..home).map(|i| self.home[(start + i) % home]);
        let progressing = self.ae_progressing(now);
        let behind = order
            .clone()
            .filter(|p| progressing && !self.in_sync.contains(p));
        let order: Vec<PartitionId> = behind.chain(order).collect();
        // Stays false when no partition has a reachable peer: nothing to catch up with.
        self.behind = false;
        let n = self.config.quorum.n();
        for partition in order {
            if self.transfers.handed_over(partition) {
                continue;
            }
            let peers: Vec<NodeId> = self
                .view
                .read_replicas(partition, n)
                .into_iter()
                .filter(|&p| p != self.config.node && !self.unreachable.contains(&p))
                .collect();
            if peers.is_empty() {
                continue;
            }
            let turn = self.exchange_turns.entry(partition).or_default();
            let peer = peers[*turn % peers.len()];
            *turn += 1;
            self.behind = !self.in_sync.contains(&partition);
            self.exchange_cursor = Some(partition);
            self.ae_stats.exchanges += 1;
            self.exchange = Some(Exchange {
                partition,
                peer,
                deadline: now + self.config.request_timeout,
            });
            let tree = self.replica.tree(partition).cloned().unwrap_or_default();
            let branches = tree.branches().to_vec();
            self.send(
                peer,
                PeerMessage::AeBranches {
                    partition,
                    branches,
                },
            );
            self.flush_local(now);
            return;
        }
        // No partition has a reachable peer: nothing to catch up with.
        self.catching_up = false;
    }

    /// Step 2: answer with our leaves under the branches that differ from theirs.
    fn on_ae_branches(&mut self, from: NodeId, partition: PartitionId, branches: &[u64]) {
        if branches.len() != FANOUT || !self.is_co_replica(from, partition) {
            self.count(DropReason::WrongPartition);
            return;
        }
        let tree = self.replica.tree(partition).cloned().unwrap_or_default();
        if tree.branches() == branches {
            self.in_sync.insert(partition);
        }
        let mut leaves = Vec::new();
        for (branch, theirs) in branches.iter().enumerate() {
            if tree.branches()[branch] != *theirs {
                let first = branch * FANOUT;
                for (i, &value) in tree.leaves_of(branch).iter().enumerate() {
                    leaves.push(((first + i) as u32, value));
                }
            }
        }
        self.send(from, PeerMessage::AeLeaves { partition, leaves });
    }

    /// Step 3: list our keys of the leaves that differ, for the peer.
    fn on_ae_leaves(&mut self, from: NodeId, partition: PartitionId, leaves: &[(u32, u64)]) {
        let ours = match &self.exchange {
            Some(e) if e.partition == partition && e.peer == from => {
                self.replica.tree(partition).cloned().unwrap_or_default()
            }
            _ => {
                self.count(DropReason::LateResponse);
                return;
            }
        };
        self.exchange = None;
        let differing: Vec<u32> = leaves
            .iter()
            .filter(|&&(leaf, value)| {
                (leaf as usize) < crate::merkle::LEAVES && ours.leaf(leaf as usize) != value
            })
            .map(|&(leaf, _)| leaf)
            .collect();
        // A few differing leaves are writes in flight; more, a replica behind.
        self.catching_up = differing.len() > anti_entropy::CATCH_UP_LEAVES;
        if self.catching_up {
            self.in_sync.remove(&partition);
        } else {
            self.in_sync.insert(partition);
        }
        // From a rotating offset, so leaves that stay different (a merge the store's
        // limits refuse) never keep the others from their turn.
        let turn = self.exchange_turns.get(&partition).copied().unwrap_or(0);
        let start = (turn * anti_entropy::LEAVES_PER_ROUND) % differing.len().max(1);
        let differing: Vec<u32> = differing[start..]
            .iter()
            .chain(&differing[..start])
            .copied()
            .take(anti_entropy::LEAVES_PER_ROUND)
            .collect();
        if differing.is_empty() {
            return;
        }
        self.ae_stats.exchanges_differing += 1;
        let listing = Listing::ForPeer {
            peer: from,
            partition,
            leaves: differing.clone(),
        };
        self.list_leaves(partition, differing, listing);
    }

    /// Step 4 (the peer's side): list our keys of the same leaves to compare.
    fn on_ae_keys(
        &mut self,
        now: Duration,
        from: NodeId,
        partition: PartitionId,
        leaves: Vec<u32>,
        keys: Vec<(Vec<u8>, u32)>,
    ) {
        let sound = leaves.len() <= anti_entropy::LEAVES_PER_ROUND
            && leaves.iter().all(|&l| (l as usize) < crate::merkle::LEAVES)
            && self.is_co_replica(from, partition);
        if !sound {
            self.count(DropReason::WrongPartition);
            return;
        }
        // Out of push budget: listing now would only find keys it cannot push.
        if let Some(throttle) = &mut self.push_throttle
            && !throttle.ready(now)
        {
            self.ae_stats.pushes_deferred += 1;
            return;
        }
        let listing = Listing::Compare {
            peer: from,
            partition,
            theirs: keys,
        };
        self.list_leaves(partition, leaves, listing);
    }

    fn list_leaves(&mut self, partition: PartitionId, leaves: Vec<u32>, listing: Listing) {
        let op = StorageOpId(self.next_listing);
        self.next_listing -= 1;
        self.listings.insert(op, listing);
        self.actions
            .push_back(Action::Storage(StorageOp::ListLeaves {
                op,
                partition,
                leaves,
            }));
    }

    fn on_listed(&mut self, now: Duration, op: StorageOpId, ours: Vec<(Vec<u8>, u32)>) {
        let Some(listing) = self.listings.remove(&op) else {
            self.count(DropReason::UnknownStorageOp);
            return;
        };
        match listing {
            Listing::Tombstones { sweep } => self.on_tombstones_listed(now, sweep, ours),
            Listing::ForPeer {
                peer,
                partition,
                leaves,
            } => {
                let (leaves, keys) = anti_entropy::within_budget(leaves, ours);
                let message = PeerMessage::AeKeys {
                    partition,
                    leaves,
                    keys,
                };
                self.send(peer, message);
            }
            Listing::Compare {
                peer,
                partition,
                theirs,
            } => {
                let (push, mut pull) = anti_entropy::compare(&ours, &theirs);
                for key in push {
                    self.start_push(now, peer, partition, key);
                }
                // The peer pushes at most this many at once; the rest shows again.
                pull.truncate(anti_entropy::PUSHES_MAX);
                if !pull.is_empty() {
                    self.send(
                        peer,
                        PeerMessage::AePull {
                            partition,
                            keys: pull,
                        },
                    );
                }
            }
        }
    }

    /// Reads `key` here to send it to `to` as a repair.
    fn start_push(&mut self, now: Duration, to: NodeId, partition: PartitionId, key: Vec<u8>) {
        // Pushes in flight are bounded; what is left out shows again next exchange.
        let rate = self.config.anti_entropy_pushes_per_second;
        let throttle = self
            .push_throttle
            .get_or_insert_with(|| Throttle::new(rate, now));
        if self.pushes.len() >= anti_entropy::PUSHES_MAX || !throttle.ready(now) {
            self.ae_stats.pushes_deferred += 1;
            return;
        }
        throttle.spend(1);
        let id = self.new_request_id();
        let push = Push {
            to,
            partition,
            key: key.clone(),
            deadline: now + self.config.request_timeout * 4,
        };
        self.pushes.insert(id, push);
        let origin = self.local_origin(id);
        self.submit(now, key, Shelf::Home(partition), Job::Read { origin });
    }

    /// Whether this node and `peer` are both home replicas of `partition` (a ring
    /// partition: hint shelves are never exchanged).
    fn is_co_replica(&self, peer: NodeId, partition: PartitionId) -> bool {
        if partition.0 >= self.view.ring().partition_count()
            || self.transfers.handed_over(partition)
        {
            return false;
        }
        let replicas = self.view.read_replicas(partition, self.config.quorum.n());
        replicas.contains(&self.config.node) && replicas.contains(&peer)
    }

    /// Marks every tree stale (the store found corruption somewhere: a record it
    /// marked lost may be in any partition); the driver rebuilds them.
    pub fn mark_trees_stale(&mut self) {
        self.replica.mark_trees_stale();
    }

    /// Partitions with a Merkle tree here.
    pub fn merkle_partitions(&self) -> Vec<PartitionId> {
        self.replica.tree_partitions().keys().copied().collect()
    }

    pub fn handle_timer(&mut self, now: Duration, timer: TimerId) {
        let id = match timer {
            TimerId::Request(id) => id,
            TimerId::Handoff => {
                if self.handoff_timer.is_some_and(|at| now < at) {
                    self.count(DropReason::EarlyTimer);
                    return;
                }
                self.handoff_timer = None;
                self.pump_handoff(now);
                self.flush_local(now);
                return;
            }
        };
        if let Some(deadline) = self.handoffs.get(&id).map(|h| h.deadline) {
            if now < deadline {
                self.count(DropReason::EarlyTimer);
                self.arm(id, deadline);
                return;
            }
            // No ack in time: the hint stays for another round.
            let handoff = self.handoffs.remove(&id).expect("looked up just above");
            self.hints.release(handoff.target, &handoff.key);
            self.arm_handoff(now + self.config.hints.retry_interval);
            self.flush_local(now);
            return;
        }
        if self.transfers.owns_request(id) {
            self.on_transfer_timer(now, id);
            self.flush_local(now);
            return;
        }
        let deadline = self
            .puts
            .get(&id)
            .map(|p| p.deadline)
            .or_else(|| self.gets.get(&id).map(|g| g.deadline))
            .or_else(|| self.forwards.get(&id).map(|f| f.deadline));
        if let Some(deadline) = deadline
            && now < deadline
        {
            self.count(DropReason::EarlyTimer);
            self.arm(id, deadline);
            return;
        }
        if let Some(put) = self.puts.remove(&id) {
            let error = ClientError::Timeout {
                acked: put.acked(),
                required: put.required,
            };
            self.reply(put.client, ClientReply::Put(Err(error)));
        } else if let Some(get) = self.gets.remove(&id) {
            if !get.replied {
                let error = if get.then.is_some() {
                    // The read before a write: nothing was written, so the outcome is
                    // known, unlike a write's timeout.
                    ClientError::Unavailable {
                        required: get.required,
                        reachable: get.answered(),
                    }
                } else {
                    ClientError::Timeout {
                        acked: get.answered(),
                        required: get.required,
                    }
                };
                self.reply_error(get.client, get.then.is_some(), error);
            }
            self.repair(&get);
        } else if let Some(forward) = self.forwards.remove(&id) {
            self.forward_timed_out(forward);
        }
        // A timer for a finished request is normal: requests finish before deadlines.
        self.flush_local(now);
    }

    pub fn handle_storage(&mut self, now: Duration, completion: StorageCompletion) {
        if let StorageCompletion::Listed { op, keys } = completion {
            if self.transfers.owns_listing(op) {
                self.on_transfer_listed(now, op, keys);
            } else {
                self.on_listed(now, op, keys);
            }
            self.flush_local(now);
            return;
        }
        if let StorageCompletion::Write { op, result } = &completion
            && self.transfers.owns_drop(*op)
        {
            self.on_partition_dropped(now, *op, result.is_ok());
            return;
        }
        let mut events = Vec::new();
        self.replica.complete(completion, &mut events);
        self.apply_replica_events(now, events);
        self.flush_local(now);
    }

    /// Checks every invariant of the node and its open requests; panics on a broken one.
    pub fn assert_invariants(&self) {
        self.replica.assert_invariants();
        for put in self.puts.values() {
            put.assert_invariants();
            assert!(
                put.replicas.contains(&self.config.node),
                "puts are coordinated by a replica"
            );
        }
        for get in self.gets.values() {
            get.assert_invariants();
        }
        assert!(!self.unreachable.contains(&self.config.node));
        self.hints.assert_invariants();
        for handoff in self.handoffs.values() {
            assert!(
                self.hints.holds(handoff.target, &handoff.key),
                "a hint in handoff stays in the ledger until removed"
            );
        }
    }

    /// The nodes a request on `key` asks: the reachable ones of its N home replicas,
    /// and unless `strict`, for each unreachable one the next reachable node along
    /// the ring (Dynamo §4.6), standing in for it. This node does not stand in where
    /// its hints for that replica are full.
    fn placements(&self, partition: PartitionId, home: &[NodeId], strict: bool) -> Vec<Placement> {
        let mut placements: Vec<Placement> = home
            .iter()
            .filter(|node| !self.unreachable.contains(node))
            .map(|&node| Placement {
                node,
                hint_for: None,
            })
            .collect();
        if strict || placements.len() == home.len() {
            return placements;
        }
        let mut down = home
            .iter()
            .copied()
            .filter(|node| self.unreachable.contains(node));
        let mut target = down.next();
        let ring = self.view.ring();
        let walk = ring.preference_list(partition, ring.member_count());
        for node in walk {
            let Some(for_node) = target else {
                break;
            };
            // A home node (of either ring, while a partition moves) is no stand-in.
            if home.contains(&node) || self.unreachable.contains(&node) {
                continue;
            }
            let full = node == self.config.node && !self.replica.hint_room_left(for_node);
            if full {
                continue;
            }
            placements.push(Placement {
                node,
                hint_for: Some(for_node),
            });
            target = down.next();
        }
        placements
    }

    /// The nodes a write of `partition` asks: the replicas of every write group (both
    /// rings' while the partition moves), with stand-ins for the unreachable ones.
    fn write_placements(&self, partition: PartitionId, n: usize, strict: bool) -> Vec<Placement> {
        let mut home: Vec<NodeId> = Vec::new();
        for node in self.write_groups(partition, n).into_iter().flatten() {
            if !home.contains(&node) {
                home.push(node);
            }
        }
        self.placements(partition, &home, strict)
    }

    /// The replica sets a write of `partition` must reach W in (see `RingView`).
    fn write_groups(&self, partition: PartitionId, n: usize) -> Vec<Vec<NodeId>> {
        let mut groups = self.view.write_groups(partition, n);
        if self.config.sabotage.old_ring_writes_only {
            groups.truncate(1);
        }
        groups
    }

    /// Whether this node serves `partition` under its view (a hint for another node
    /// is kept whatever the partition). A request it does not serve is dropped: a
    /// replica that handed a partition over must not answer for it, or a reader on
    /// an older view could count it while it misses newer writes.
    fn check_serving(
        &mut self,
        partition: PartitionId,
        hint_for: Option<NodeId>,
        read: bool,
    ) -> bool {
        if hint_for.is_some_and(|t| t != self.config.node) {
            return true;
        }
        if self.serves(partition, read) {
            return true;
        }
        self.count(DropReason::NotServing);
        false
    }

    /// Whether this node answers for `partition` (`read`: reads; else writes and
    /// repairs). Not once it handed the partition over or it moved away; not for
    /// reads while it is a new replica still receiving the partition (a reader on an
    /// older view must not count it: `home` holds the partitions it reads, the old
    /// replicas' until a partition moved); never as a node being replaced (it is
    /// taken for dead: one that comes back must not answer). On every replica
    /// request, so it only looks up lists made when the view changed.
    fn serves(&self, partition: PartitionId, read: bool) -> bool {
        if let Some(RingChange::Replace { dead, .. }) = self.view.change()
            && dead == self.config.node
        {
            return false;
        }
        let served = if read { &self.home } else { &self.writable };
        served.binary_search(&partition).is_ok() && !self.transfers.handed_over(partition)
    }

    /// Where this node keeps its own copy of a request's key: at home, or among the
    /// hints for the replica it stands in for.
    fn shelf_of(&self, placements: &[Placement], partition: PartitionId) -> Shelf {
        let me = placements.iter().find(|p| p.node == self.config.node);
        self.shelf_for(partition, me.and_then(|p| p.hint_for))
    }

    fn shelf_for(&self, partition: PartitionId, hint_for: Option<NodeId>) -> Shelf {
        match hint_for {
            // A node never holds hints for itself: it would be its own home copy.
            Some(target) if target != self.config.node => Shelf::Hints { target },
            _ => Shelf::Home(partition),
        }
    }

    /// Hints are only kept for ring members: a target no ring holds would never come
    /// back for them, and each would get its own byte bound.
    fn check_hint_target(&mut self, hint_for: Option<NodeId>) -> bool {
        if hint_for.is_none_or(|target| self.view.is_member(target)) {
            return true;
        }
        self.count(DropReason::UnknownHintTarget);
        false
    }

    /// Whether a peer's message about `key` is one this node can act on: the key
    /// belongs to `partition` under this node's ring, and fits the store.
    fn check_partition(&mut self, partition: PartitionId, key: &[u8]) -> bool {
        if key.len() > self.config.key_max {
            self.count(DropReason::KeyTooLong);
            return false;
        }
        if self.view.ring().partition_of(key) == partition {
            return true;
        }
        self.count(DropReason::WrongPartition);
        false
    }

    fn on_read_reply(&mut self, now: Duration, from: NodeId, id: RequestId, versions: VersionSet) {
        if from == self.config.node && self.handoffs.contains_key(&id) {
            self.send_handoff(now, id, versions);
            return;
        }
        let me = from == self.config.node;
        if me && (self.sweep_of_read.contains_key(&id) || self.check_of_read.contains_key(&id)) {
            self.on_tombstone_read(now, id, versions);
            return;
        }
        if me && self.transfers.owns_request(id) {
            self.on_transfer_read(now, id, versions);
            return;
        }
        if from == self.config.node
            && let Some(push) = self.pushes.remove(&id)
        {
            if !versions.is_empty() {
                self.ae_stats.keys_pushed += 1;
                let message = PeerMessage::Repair {
                    partition: push.partition,
                    key: push.key,
                    versions,
                };
                self.send(push.to, message);
            }
            return;
        }
        let Some(get) = self.gets.get_mut(&id) else {
            self.count(DropReason::LateResponse);
            return;
        };
        match get.answer(from, versions) {
            Answer::NotAsked => self.count(DropReason::UnexpectedSender),
            Answer::Duplicate => self.count(DropReason::DuplicateResponse),
            Answer::Counted => {}
            Answer::QuorumReached => {
                get.replied = true;
                let versions = get.merged();
                let client = get.client;
                let stand_ins = get.stand_ins_answered();
                match get.then.take() {
                    None => {
                        let outcome = GetOutcome {
                            context: Context(versions.context()),
                            versions,
                            stand_ins,
                        };
                        self.reply(client, ClientReply::Get(Ok(outcome)));
                    }
                    Some(then) => {
                        let (key, partition) = (get.key.clone(), get.partition);
                        let read = (versions, stand_ins);
                        self.write_after_read(now, client, key, partition, read, then);
                    }
                }
            }
        }
        let done = self.gets.get(&id).is_some_and(|g| g.all_answered());
        if done {
            let get = self.gets.remove(&id).expect("checked just above");
            self.repair(&get);
        }
    }

    /// The write half of a put that supersedes what a quorum holds.
    fn write_after_read(
        &mut self,
        now: Duration,
        requester: Requester,
        key: Vec<u8>,
        partition: PartitionId,
        (read, read_stand_ins): (VersionSet, u32),
        then: ThenPut,
    ) {
        if then.only_if_present && read.siblings().all(|v| v.value.data().is_none()) {
            self.reply(requester, ClientReply::Put(Ok(PutOutcome::NothingToDelete)));
            return;
        }
        // What held when the read started may not hold now.
        let placements = self.write_placements(partition, then.quorum.n(), then.strict);
        if !placements.iter().any(|p| p.node == self.config.node) {
            let error = ClientError::NotReplica {
                replicas: self.view.read_replicas(partition, then.quorum.n()),
            };
            self.reply(requester, ClientReply::Put(Err(error)));
            return;
        }
        let groups = self.write_groups(partition, then.quorum.n());
        if let Some(error) = self.cannot_write(now, &groups, &placements, then.quorum.w()) {
            self.reply(requester, ClientReply::Put(Err(error)));
            return;
        }
        let context = if self.config.sabotage.ignore_context {
            VersionVector::new()
        } else {
            read.context()
        };
        let write = Coordinate {
            requester,
            key,
            partition,
            placements,
            groups,
            required: then.quorum.w(),
            read_stand_ins,
            context,
            supersede_local: false,
            value: then.value,
            mode: then.mode,
            wall_ms: then.wall_ms,
        };
        self.coordinate(now, write);
    }

    /// Whether a forwarded put is new. A forwarder gives up on its request after a
    /// few request timeouts, so remembering it twice as long as that suffices.
    fn take_forward(&mut self, now: Duration, from: NodeId, request: RequestId) -> bool {
        while let Some(&(forget_at, node, id)) = self.forwards_taken_order.front()
            && forget_at <= now
        {
            self.forwards_taken_order.pop_front();
            self.forwards_taken.remove(&(node, id));
        }
        if !self.forwards_taken.insert((from, request)) && !self.config.sabotage.forget_forwards {
            self.count(DropReason::DuplicateForward);
            return false;
        }
        let forget_at = now + self.config.request_timeout * 6;
        self.forwards_taken_order
            .push_back((forget_at, from, request));
        true
    }

    /// A forwarded put's answer will not come (deadline, or its replica found
    /// unreachable): the client hears Timeout, since the replica may have applied it.
    fn forward_timed_out(&mut self, forward: Forwarding) {
        let error = ClientError::Timeout {
            acked: 0,
            required: forward.required,
        };
        self.reply(
            Requester::Client(forward.client),
            ClientReply::Put(Err(error)),
        );
    }

    /// A replica's answer to a put this node forwarded.
    fn on_forward_reply(
        &mut self,
        from: NodeId,
        id: RequestId,
        reply: Result<PutOutcome, ClientError>,
    ) {
        let Some(forward) = self.forwards.get(&id) else {
            self.count(DropReason::LateResponse);
            return;
        };
        if forward.to != from {
            self.count(DropReason::UnexpectedSender);
            return;
        }
        let forward = self.forwards.remove(&id).expect("looked up just above");
        self.reply(Requester::Client(forward.client), ClientReply::Put(reply));
    }

    fn on_write_ack(&mut self, now: Duration, from: NodeId, id: RequestId) {
        if self.answers_handoff(id, from) {
            self.on_handoff_ack(now, id);
            return;
        }
        if self.transfers.owns_request(id) {
            self.on_transfer_ack(now, from, id, true);
            return;
        }
        let Some(put) = self.puts.get_mut(&id) else {
            self.count(DropReason::LateResponse);
            return;
        };
        let Some(dot) = put.dot else {
            self.count(DropReason::AckBeforeVersion);
            return;
        };
        match put.ack(from) {
            Answer::NotAsked => self.count(DropReason::UnexpectedSender),
            Answer::Duplicate => self.count(DropReason::DuplicateResponse),
            Answer::Counted => {}
            Answer::QuorumReached => {
                let put = self.puts.remove(&id).expect("looked up just above");
                let written = Written {
                    dot,
                    stand_ins: put.read_stand_ins + put.stand_ins_acked(),
                    superseded: put.superseded,
                };
                self.reply(
                    put.client,
                    ClientReply::Put(Ok(PutOutcome::Written(written))),
                );
            }
        }
    }

    /// A replica could not store the write. Once too few replicas are left to reach
    /// the quorum, the client hears why (not a timeout): the write may stand on the
    /// replicas that did store it, as a write that timed out may.
    fn on_write_refused(&mut self, now: Duration, from: NodeId, id: RequestId, refusal: TooLarge) {
        if self.transfers.owns_request(id) {
            self.on_transfer_ack(now, from, id, false);
            return;
        }
        if self.answers_handoff(id, from) {
            // The target cannot merge it (its store's limits); it stays a hint, and
            // read repair or a client's resolution settles the key.
            let handoff = self.handoffs.remove(&id).expect("looked up just above");
            self.hints.park(handoff.target, &handoff.key);
            self.pump_handoff(now);
            return;
        }
        let Some(put) = self.puts.get_mut(&id) else {
            self.count(DropReason::LateResponse);
            return;
        };
        if put.dot.is_none() {
            self.count(DropReason::AckBeforeVersion);
            return;
        }
        match put.refuse(from) {
            Answer::NotAsked => self.count(DropReason::UnexpectedSender),
            Answer::Duplicate => self.count(DropReason::DuplicateResponse),
            Answer::Counted => {}
            Answer::QuorumReached => {
                let put = self.puts.remove(&id).expect("looked up just above");
                let error = ClientError::RefusedByReplicas {
                    acked: put.acked(),
                    required: put.required,
                    refusal,
                };
                self.reply(put.client, ClientReply::Put(Err(error)));
            }
        }
    }

    /// Dynamo §4.5 read repair: send the merged set to every replica that answered
    /// with less.
    fn repair(&mut self, get: &GetCoordination) {
        if self.config.sabotage.skip_read_repair {
            return;
        }
        let (merged, mut stale) = get.repairs();
        // Stand-ins answered from hints; their hints reach the replica by handoff.
        stale.retain(|node| !get.stand_ins.contains(node));
        // Replicas refuse a set over the store's limits; one over the encoding's own
        // limits cannot even be sent.
        let encodable = merged.len() <= crate::codec::SIBLINGS_MAX_ENCODED
            && crate::codec::encoded_version_len(&merged) <= crate::codec::STORED_VERSION_MAX;
        if !encodable {
            self.count(DropReason::MergeTooLarge);
            return;
        }
        for node in stale {
            self.stats.repairs_sent += 1;
            let message = PeerMessage::Repair {
                partition: get.partition,
                key: get.key.clone(),
                versions: merged.clone(),
            };
            self.send(node, message);
        }
    }

    /// Arms the handoff timer for `at`, unless it is armed for earlier already.
    fn arm_handoff(&mut self, at: Duration) {
        if self.handoff_timer.is_some_and(|armed| armed <= at) {
            return;
        }
        self.handoff_timer = Some(at);
        self.actions.push_back(Action::SetTimer {
            timer: TimerId::Handoff,
            at,
        });
    }

    /// Drops hints past their age bound, then starts handoffs to reachable targets
    /// while the in-flight bound and the byte rate allow.
    fn pump_handoff(&mut self, now: Duration) {
        let config = self.config.hints;
        for (target, key) in self.hints.take_expired(now, config.age_max) {
            // Read, then remove only if unchanged: a write landing meanwhile keeps it.
            self.start_handoff(now, target, key, true);
        }
        let rate = config.handoff_bytes_per_second;
        let throttle = self
            .throttle
            .get_or_insert_with(|| Throttle::new(rate, now));
        let mut ready = throttle.ready(now);
        while ready && self.handoffs.len() < config.handoff_in_flight {
            let (unreachable, view) = (&self.unreachable, &self.view);
            // A target that left the ring is not waited for: its hints go to the
            // key's replicas now (see `send_handoff`).
            let ready_target = |t: NodeId| !unreachable.contains(&t) || !view.is_member(t);
            let Some((target, key, bytes)) = self.hints.take_next(ready_target) else {
                break;
            };
            let throttle = self.throttle.as_mut().expect("made above");
            throttle.spend(bytes);
            ready = throttle.ready(now);
            self.start_handoff(now, target, key, false);
        }
        if !self.hints.any_idle() {
            return;
        }
        let throttled = self
            .throttle
            .as_ref()
            .map(|t| t.ready_at())
            .filter(|&at| at > now);
        self.arm_handoff(throttled.unwrap_or(now + config.retry_interval));
    }

    /// Reads a hint (taken busy from the ledger) to hand it off, or with `expire`,
    /// to remove it if it is still what was read.
    fn start_handoff(&mut self, now: Duration, target: NodeId, key: Vec<u8>, expire: bool) {
        let id = self.new_request_id();
        let deadline = now + self.config.request_timeout;
        self.arm(id, deadline);
        let handoff = Handoff {
            target,
            key: key.clone(),
            sent: None,
            sent_to: None,
            deadline,
            expire,
        };
        self.handoffs.insert(id, handoff);
        let origin = self.local_origin(id);
        self.submit(now, key, Shelf::Hints { target }, Job::Read { origin });
    }

    /// The hint was read: send it to its target, which merges it at home and acks.
    fn send_handoff(&mut self, now: Duration, id: RequestId, versions: VersionSet) {
        let Some(handoff) = self.handoffs.get_mut(&id) else {
            return;
        };
        if versions.is_empty() {
            // Gone from the store already (removed, or lost to corruption).
            let handoff = self.handoffs.remove(&id).expect("looked up just above");
            self.hints.removed(handoff.target, &handoff.key);
            return;
        }
        // Past its age by the stamps it holds (a hint's ledger age restarts with its
        // holder, which may have been down for hours): never handed off, or it could
        // outlive a tombstone of what it holds and bring a deleted value back.
        let age_max_ms = u64::try_from(self.config.hints.age_max.as_millis()).unwrap_or(u64::MAX);
        let newest_ms = versions
            .siblings()
            .map(|v| v.written_at_ms)
            .max()
            .unwrap_or(0);
        let too_old = newest_ms.saturating_add(age_max_ms) <= self.wall_ms;
        if handoff.expire || too_old {
            let handoff = self.handoffs.remove(&id).expect("looked up just above");
            self.hints.stats.expired += 1;
            let job = Job::DropHint {
                handed: Some(versions),
            };
            let shelf = Shelf::Hints {
                target: handoff.target,
            };
            self.submit(now, handoff.key, shelf, job);
            return;
        }
        let (target, key) = (handoff.target, handoff.key.clone());
        let partition = self.view.ring().partition_of(&key);
        // The hint's target may no longer hold the key (a membership change moved
        // its partition, or the target left): the key's replicas take it instead.
        let n = self.config.quorum.n();
        let reachable = |r: &NodeId| !self.unreachable.contains(r);
        let destination = if self.view.lost(partition).contains(&target) {
            // Leaving the partition (its stream may have passed this key already):
            // the replica that takes its place gets the hint.
            self.view.gained(partition).into_iter().find(reachable)
        } else if self.view.serves(target, partition, n) {
            Some(target)
        } else {
            (self.view.read_replicas(partition, n).into_iter()).find(reachable)
        };
        let Some(destination) = destination else {
            let handoff = self.handoffs.remove(&id).expect("looked up just above");
            self.hints.release(handoff.target, &handoff.key);
            self.arm_handoff(now + self.config.hints.retry_interval);
            return;
        };
        let handoff = self.handoffs.get_mut(&id).expect("looked up just above");
        handoff.sent = Some(versions.clone());
        handoff.sent_to = Some(destination);
        let message = PeerMessage::Write {
            request: id,
            partition,
            key: key.clone(),
            versions,
            hint_for: None,
        };
        self.send(destination, message);
        if self.config.sabotage.drop_hints_unacked {
            self.handoffs.remove(&id);
            self.hints.stats.handed_off += 1;
            let job = Job::DropHint { handed: None };
            self.submit(now, key, Shelf::Hints { target }, job);
        }
    }

    /// Whether `from`'s answer to `id` is for a handoff this node sent it.
    fn answers_handoff(&self, id: RequestId, from: NodeId) -> bool {
        self.handoffs
            .get(&id)
            .is_some_and(|h| h.sent_to == Some(from))
    }

    /// The target holds the hint durably: remove it here, unless a newer write
    /// reached it meanwhile (then it goes again).
    fn on_handoff_ack(&mut self, now: Duration, id: RequestId) {
        let handoff = self.handoffs.remove(&id).expect("checked by the caller");
        let Some(sent) = handoff.sent else {
            self.count(DropReason::AckBeforeVersion);
            self.hints.release(handoff.target, &handoff.key);
            return;
        };
        self.hints.stats.handed_off += 1;
        let job = Job::DropHint { handed: Some(sent) };
        let shelf = Shelf::Hints {
            target: handoff.target,
        };
        self.submit(now, handoff.key, shelf, job);
        self.pump_handoff(now);
    }

    fn submit(&mut self, now: Duration, key: Vec<u8>, shelf: Shelf, job: Job) {
        let mut events = Vec::new();
        self.replica.submit(key, shelf, job, &mut events);
        self.apply_replica_events(now, events);
    }

    fn apply_replica_events(&mut self, now: Duration, events: Vec<ReplicaEvent>) {
        for event in events {
            match event {
                ReplicaEvent::Storage(op) => self.actions.push_back(Action::Storage(op)),
                ReplicaEvent::ReadDone { origin, versions } => {
                    let message = PeerMessage::ReadReply {
                        request: origin.request,
                        versions,
                    };
                    self.send(origin.node, message);
                }
                ReplicaEvent::Durable { origin } => {
                    let message = PeerMessage::WriteAck {
                        request: origin.request,
                    };
                    self.send(origin.node, message);
                }
                ReplicaEvent::Created {
                    origin,
                    dot,
                    versions,
                } => self.on_created(origin, dot, versions),
                ReplicaEvent::Refused { origin, refusal } => {
                    if let Some(put) = self.puts.remove(&origin.request) {
                        let error = match refusal {
                            Refusal::TooManySiblings { count, limit } => {
                                ClientError::TooManySiblings { count, limit }
                            }
                            Refusal::StorageFailed => ClientError::StorageFailed,
                            Refusal::TooLarge(too_large) => too_large_error(too_large),
                            Refusal::CounterExhausted => {
                                ClientError::InvalidArgument(InvalidArgument::CounterOverflow)
                            }
                        };
                        self.reply(put.client, ClientReply::Put(Err(error)));
                    }
                }
                ReplicaEvent::LocalWriteFailed => {
                    self.coordination_paused_until = Some(now + self.config.request_timeout);
                }
                ReplicaEvent::MergeRefused { origin, refusal } => {
                    if let TooLarge::Hints { .. } = refusal {
                        self.hints.stats.refused += 1;
                    }
                    let message = PeerMessage::WriteRefused {
                        request: origin.request,
                        refusal,
                    };
                    self.send(origin.node, message);
                }
                ReplicaEvent::Dropped(reason) => self.count(reason),
                ReplicaEvent::TombstoneCollected => self.tombstone_stats.collected += 1,
                // A repair that changed what this replica holds: anti-entropy (or read
                // repair) is bringing it up to date.
                ReplicaEvent::Repaired => self.ae_progress_at = Some(now),
                ReplicaEvent::TombstoneWritten { partition } => {
                    self.no_tombstones.remove(&partition);
                    *self.tombstones_written.entry(partition).or_default() += 1;
                }
                ReplicaEvent::HintStored { target, key, bytes } => {
                    self.hints.stored(target, &key, bytes, now);
                    self.hints.stats.stored += 1;
                    self.arm_handoff(now + self.config.hints.retry_interval);
                }
                ReplicaEvent::HintRemoved { target, key } => self.hints.removed(target, &key),
                ReplicaEvent::HintKept { target, key } => {
                    self.hints.release(target, &key);
                    self.arm_handoff(now);
                }
            }
        }
    }

    /// The local replica made the put's version: fan the merged set out to the other
    /// replicas while the local write proceeds (Dynamo §4.5).
    fn on_created(&mut self, origin: Origin, dot: Dot, versions: VersionSet) {
        // The put may have timed out while its local read was queued.
        let Some(put) = self.puts.get_mut(&origin.request) else {
            return;
        };
        put.dot = Some(dot);
        if let Some(created) = versions.siblings().find(|v| v.dot == dot) {
            put.superseded = created.past.clone();
        }
        let targets: Vec<(NodeId, Option<NodeId>)> = put
            .replicas
            .iter()
            .copied()
            .filter(|&n| n != self.config.node)
            .map(|n| (n, put.hint_for.get(&n).copied()))
            .collect();
        let (partition, key) = (put.partition, put.key.clone());
        for (node, hint_for) in targets {
            let message = PeerMessage::Write {
                request: origin.request,
                partition,
                key: key.clone(),
                versions: versions.clone(),
                hint_for,
            };
            self.send(node, message);
        }
    }

    /// Sends to a peer, or queues a message to this node for [`Node::flush_local`]:
    /// the local replica is asked exactly like a remote one, minus the network.
    fn send(&mut self, to: NodeId, message: PeerMessage) {
        if to == self.config.node {
            self.local_inbox.push_back(message);
        } else {
            self.actions.push_back(Action::Send { to, message });
        }
    }

    /// Delivers messages this node sent itself, until none are left.
    fn flush_local(&mut self, now: Duration) {
        while let Some(message) = self.local_inbox.pop_front() {
            let me = self.config.node;
            self.dispatch(now, me, message);
        }
    }

    fn local_origin(&self, request: RequestId) -> Origin {
        Origin {
            node: self.config.node,
            request,
        }
    }

    fn new_request_id(&mut self) -> RequestId {
        self.next_sequence += 1;
        RequestId {
            epoch: self.boot_epoch,
            sequence: self.next_sequence,
        }
    }

    fn arm(&mut self, id: RequestId, at: Duration) {
        self.actions.push_back(Action::SetTimer {
            timer: TimerId::Request(id),
            at,
        });
    }

    fn reply(&mut self, to: Requester, reply: ClientReply) {
        match (to, reply) {
            (Requester::Client(client), reply) => {
                self.actions.push_back(Action::Reply { client, reply })
            }
            (Requester::Forwarder { node, request }, ClientReply::Put(reply)) => {
                self.send(node, PeerMessage::ForwardReply { request, reply })
            }
            // Only puts are forwarded, so a forwarder never waits on a get.
            (Requester::Forwarder { .. }, ClientReply::Get(_)) => {}
        }
    }

    /// Replies `error` to a get, or to a put (`for_put`) whose read half failed.
    fn reply_error(&mut self, to: Requester, for_put: bool, error: ClientError) {
        let reply = if for_put {
            ClientReply::Put(Err(error))
        } else {
            ClientReply::Get(Err(error))
        };
        self.reply(to, reply);
    }

    fn count(&mut self, reason: DropReason) {
        *self.stats.drops.entry(reason).or_default() += 1;
    }
}

/// A put's write half, ready to start.
struct Coordinate {
    requester: Requester,
    key: Vec<u8>,
    partition: PartitionId,
    placements: Vec<Placement>,
    /// The replica sets that must each reach `required` acks.
    groups: Vec<Vec<NodeId>>,
    required: usize,
    /// Stand-ins among the answers of the read before this write (SET, DEL).
    read_stand_ins: u32,
    context: VersionVector,
    supersede_local: bool,
    value: Value,
    mode: crate::version::ConflictMode,
    wall_ms: u64,
}

/// The ring partitions `config`'s shard answers reads of, in order.
fn home_partitions(config: &NodeConfig, view: &RingView) -> Vec<PartitionId> {
    let n = config.quorum.n();
    shard_partitions(config, view, |p| {
        view.read_replicas(p, n).contains(&config.node)
    })
}

/// The ring partitions `config`'s shard takes writes of, in order.
fn writable_partitions(config: &NodeConfig, view: &RingView) -> Vec<PartitionId> {
    let n = config.quorum.n();
    shard_partitions(config, view, |p| view.serves(config.node, p, n))
}

fn shard_partitions(
    config: &NodeConfig,
    view: &RingView,
    keep: impl Fn(PartitionId) -> bool,
) -> Vec<PartitionId> {
    (0..view.ring().partition_count())
        .map(PartitionId)
        .filter(|&p| config.shards.owner(p) == config.shard)
        .filter(|&p| keep(p))
        .collect()
}

fn too_large_error(too_large: TooLarge) -> ClientError {
    match too_large {
        TooLarge::Values { size, limit } => ClientError::ValuesTooLarge { size, limit },
        TooLarge::Versions { size, limit } => ClientError::VersionsTooLarge { size, limit },
        // Only stand-ins refuse for their hints; a coordinator's own check never does.
        refusal @ TooLarge::Hints { .. } => ClientError::RefusedByReplicas {
            acked: 0,
            required: 1,
            refusal,
        },
    }
}

/// One hint on its way to its target.
#[derive(Debug)]
struct Handoff {
    target: NodeId,
    key: Vec<u8>,
    /// What was read from the hint and sent (None while the local read runs), and to
    /// whom: the target, or a replica of the key if the target no longer holds it.
    sent: Option<VersionSet>,
    sent_to: Option<NodeId>,
    deadline: Duration,
    /// Read to remove it at its age bound, not to send it.
    expire: bool,
}
