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

use crate::clock::{Actor, Dot, EpochSource, VersionVector};
use crate::codec::Context;
use crate::coordinator::{Answer, GetCoordination, PutCoordination};
use crate::message::{PeerMessage, RequestId, TooLarge};
use crate::replica::{
    Job, Origin, Refusal, Replica, ReplicaConfig, ReplicaEvent, StorageCompletion, StorageOp,
};
use crate::request::{
    ClientError, ClientReply, ClientToken, GetOutcome, GetRequest, InvalidArgument, PutOutcome,
    PutRequest,
};
use crate::ring::{NodeId, PartitionId, Ring};
use crate::version::{Value, VersionSet};

/// Settings of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub node: NodeId,
    /// 64 random bits, fresh for every start of the node (the OS's randomness; the
    /// simulator's dice). The node draws its actor epochs from it, so it needs no
    /// stored state to never reuse an actor (see [`Actor`]).
    pub epoch_seed: u64,
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
    /// Where this node's request sequence numbers start. A driver that runs several
    /// state machines as one node (one per core) gives each its own range, so request
    /// ids stay unique per node and replies can be told apart.
    pub first_sequence: u64,
    /// Deliberate bugs, for proving the simulator's checkers; all off in production.
    pub sabotage: Sabotage,
}

impl NodeConfig {
    pub fn new(node: NodeId, epoch_seed: u64) -> Self {
        NodeConfig {
            node,
            epoch_seed,
            request_timeout: Duration::from_secs(1),
            siblings_max: 100,
            stored_value_max: usize::MAX,
            stored_version_max: usize::MAX,
            first_sequence: 0,
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
}

/// Which timer fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimerId {
    /// The deadline of a coordinated request.
    Request(RequestId),
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
}

/// Counters a driver can export.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub drops: BTreeMap<DropReason, u64>,
    pub repairs_sent: u64,
    /// Actors given up after a storage failure or a lost record (see `Actor`).
    pub actors_retired: u64,
}

/// One node: coordinator for the requests it receives, replica for the keys it holds.
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    /// The first epoch of this start; request ids carry it.
    boot_epoch: u64,
    /// After a coordinated put's local write failed, puts are refused until then.
    coordination_paused_until: Option<Duration>,
    ring: Ring,
    unreachable: BTreeSet<NodeId>,
    replica: Replica,
    puts: BTreeMap<RequestId, PutCoordination>,
    gets: BTreeMap<RequestId, GetCoordination>,
    next_sequence: u64,
    actions: VecDeque<Action>,
    /// Messages this node sent itself, delivered before the handler returns.
    local_inbox: VecDeque<PeerMessage>,
    stats: NodeStats,
}

impl Node {
    pub fn new(config: NodeConfig, ring: Ring) -> Self {
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
                sabotage: config.sabotage,
            },
            epochs,
        );
        Node {
            config,
            boot_epoch,
            coordination_paused_until: None,
            ring,
            unreachable: BTreeSet::new(),
            replica,
            puts: BTreeMap::new(),
            gets: BTreeMap::new(),
            next_sequence: config.first_sequence,
            actions: VecDeque::new(),
            local_inbox: VecDeque::new(),
            stats: NodeStats::default(),
        }
    }

    pub fn id(&self) -> NodeId {
        self.config.node
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Adopts a newer ring (from gossip or an admin change).
    pub fn set_ring(&mut self, ring: Ring) {
        self.ring = ring;
    }

    /// What the failure detector believes; unreachable replicas are not asked, and a
    /// request with too few reachable replicas fails at once with `Unavailable`.
    pub fn set_reachable(&mut self, node: NodeId, reachable: bool) {
        if reachable {
            self.unreachable.remove(&node);
        } else if node != self.config.node {
            self.unreachable.insert(node);
        }
    }

    pub fn stats(&self) -> NodeStats {
        NodeStats {
            actors_retired: self.replica.actors_retired(),
            ..self.stats.clone()
        }
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
        self.puts.len() + self.gets.len() + self.replica.busy_keys()
    }

    pub fn handle_get(&mut self, now: Duration, client: ClientToken, request: GetRequest) {
        let GetRequest { key, quorum } = request;
        let partition = self.ring.partition_of(&key);
        let asked = self.reachable_replicas(partition, quorum.n());
        if asked.len() < quorum.r() {
            let error = ClientError::Unavailable {
                required: quorum.r(),
                reachable: asked.len(),
            };
            self.reply(client, ClientReply::Get(Err(error)));
            return;
        }
        let id = self.new_request_id();
        let deadline = now + self.config.request_timeout;
        self.arm(id, deadline);
        for &replica in &asked {
            let message = PeerMessage::Read {
                request: id,
                partition,
                key: key.clone(),
            };
            self.send(now, replica, message);
        }
        let coordination =
            GetCoordination::new(client, key, partition, asked, quorum.r(), deadline);
        self.gets.insert(id, coordination);
        self.flush_local(now);
    }

    pub fn handle_put(
        &mut self,
        now: Duration,
        wall_ms: u64,
        client: ClientToken,
        request: PutRequest,
    ) {
        let PutRequest {
            key,
            value,
            context,
            quorum,
            mode,
            supersede_local,
        } = request;
        let context = match context.as_deref().map(Context::decode).transpose() {
            Ok(_) if self.config.sabotage.ignore_context => VersionVector::new(),
            Ok(context) => context.map(|c| c.0).unwrap_or_default(),
            Err(error) => {
                let error = ClientError::InvalidArgument(InvalidArgument::Context(error));
                self.reply(client, ClientReply::Put(Err(error)));
                return;
            }
        };
        let partition = self.ring.partition_of(&key);
        let preference = self.ring.preference_list(partition, quorum.n());
        if !preference.contains(&self.config.node) {
            let error = ClientError::NotReplica {
                replicas: preference,
            };
            self.reply(client, ClientReply::Put(Err(error)));
            return;
        }
        let replicas = self.reachable_replicas(partition, quorum.n());
        if replicas.len() < quorum.w() {
            let error = ClientError::Unavailable {
                required: quorum.w(),
                reachable: replicas.len(),
            };
            self.reply(client, ClientReply::Put(Err(error)));
            return;
        }
        // Each failed local write costs an actor (a clock entry on every key it
        // writes next): while the store keeps failing, refuse rather than spend one
        // per put. One put is let through per pause to find out.
        if self
            .coordination_paused_until
            .is_some_and(|until| now < until)
        {
            self.reply(client, ClientReply::Put(Err(ClientError::StorageFailed)));
            return;
        }
        let id = self.new_request_id();
        let deadline = now + self.config.request_timeout;
        self.arm(id, deadline);
        let coordination = PutCoordination::new(
            client,
            key.clone(),
            partition,
            replicas,
            quorum.w(),
            deadline,
        );
        self.puts.insert(id, coordination);
        let job = Job::Coordinate {
            origin: self.local_origin(id),
            context,
            supersede_local,
            value: value.map_or(Value::Tombstone, Value::Data),
            mode,
            wall_ms,
        };
        self.submit(now, key, partition, job);
        self.flush_local(now);
    }

    pub fn handle_message(&mut self, now: Duration, from: NodeId, message: PeerMessage) {
        self.dispatch(now, from, message);
        self.flush_local(now);
    }

    fn dispatch(&mut self, now: Duration, from: NodeId, message: PeerMessage) {
        match message {
            PeerMessage::Read {
                request,
                partition,
                key,
            } => {
                if self.check_partition(partition, &key) {
                    let origin = Origin {
                        node: from,
                        request,
                    };
                    self.submit(now, key, partition, Job::Read { origin });
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
            } => {
                if self.check_partition(partition, &key) {
                    let origin = Some(Origin {
                        node: from,
                        request,
                    });
                    let job = Job::Merge {
                        origin,
                        incoming: versions,
                    };
                    self.submit(now, key, partition, job);
                }
            }
            PeerMessage::WriteAck { request } => self.on_write_ack(now, from, request),
            PeerMessage::WriteRefused { request, refusal } => {
                self.on_write_refused(from, request, refusal)
            }
            PeerMessage::Repair {
                partition,
                key,
                versions,
            } => {
                if self.check_partition(partition, &key) {
                    let job = Job::Merge {
                        origin: None,
                        incoming: versions,
                    };
                    self.submit(now, key, partition, job);
                }
            }
        }
    }

    pub fn handle_timer(&mut self, now: Duration, timer: TimerId) {
        let TimerId::Request(id) = timer;
        let deadline = self
            .puts
            .get(&id)
            .map(|p| p.deadline)
            .or_else(|| self.gets.get(&id).map(|g| g.deadline));
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
                let error = ClientError::Timeout {
                    acked: get.answered(),
                    required: get.required,
                };
                self.reply(get.client, ClientReply::Get(Err(error)));
            }
            self.repair(now, &get);
        }
        // A timer for a finished request is normal: requests finish before deadlines.
        self.flush_local(now);
    }

    pub fn handle_storage(&mut self, now: Duration, completion: StorageCompletion) {
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
    }

    fn reachable_replicas(&self, partition: PartitionId, n: usize) -> Vec<NodeId> {
        self.ring
            .preference_list(partition, n)
            .into_iter()
            .filter(|node| !self.unreachable.contains(node))
            .collect()
    }

    fn check_partition(&mut self, partition: PartitionId, key: &[u8]) -> bool {
        if self.ring.partition_of(key) == partition {
            return true;
        }
        self.count(DropReason::WrongPartition);
        false
    }

    fn on_read_reply(&mut self, now: Duration, from: NodeId, id: RequestId, versions: VersionSet) {
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
                let outcome = GetOutcome {
                    context: Context(versions.context()),
                    versions,
                };
                let client = get.client;
                self.reply(client, ClientReply::Get(Ok(outcome)));
            }
        }
        let done = self.gets.get(&id).is_some_and(|g| g.all_answered());
        if done {
            let get = self.gets.remove(&id).expect("checked just above");
            self.repair(now, &get);
        }
    }

    fn on_write_ack(&mut self, _now: Duration, from: NodeId, id: RequestId) {
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
                self.reply(put.client, ClientReply::Put(Ok(PutOutcome { dot })));
            }
        }
    }

    /// A replica could not store the write. Once too few replicas are left to reach
    /// the quorum, the client hears why (not a timeout): the write may stand on the
    /// replicas that did store it, as a write that timed out may.
    fn on_write_refused(&mut self, from: NodeId, id: RequestId, refusal: TooLarge) {
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
    fn repair(&mut self, now: Duration, get: &GetCoordination) {
        if self.config.sabotage.skip_read_repair {
            return;
        }
        let (merged, stale) = get.repairs();
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
            self.send(now, node, message);
        }
    }

    fn submit(&mut self, now: Duration, key: Vec<u8>, partition: PartitionId, job: Job) {
        let mut events = Vec::new();
        self.replica.submit(key, partition, job, &mut events);
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
                    self.send(now, origin.node, message);
                }
                ReplicaEvent::Durable { origin } => {
                    let message = PeerMessage::WriteAck {
                        request: origin.request,
                    };
                    self.send(now, origin.node, message);
                }
                ReplicaEvent::Created {
                    origin,
                    dot,
                    versions,
                } => self.on_created(now, origin, dot, versions),
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
                    let message = PeerMessage::WriteRefused {
                        request: origin.request,
                        refusal,
                    };
                    self.send(now, origin.node, message);
                }
                ReplicaEvent::Dropped(reason) => self.count(reason),
            }
        }
    }

    /// The local replica made the put's version: fan the merged set out to the other
    /// replicas while the local write proceeds (Dynamo §4.5).
    fn on_created(&mut self, now: Duration, origin: Origin, dot: Dot, versions: VersionSet) {
        // The put may have timed out while its local read was queued.
        let Some(put) = self.puts.get_mut(&origin.request) else {
            return;
        };
        put.dot = Some(dot);
        let targets: Vec<NodeId> = put
            .replicas
            .iter()
            .copied()
            .filter(|&n| n != self.config.node)
            .collect();
        let (partition, key) = (put.partition, put.key.clone());
        for node in targets {
            let message = PeerMessage::Write {
                request: origin.request,
                partition,
                key: key.clone(),
                versions: versions.clone(),
            };
            self.send(now, node, message);
        }
    }

    /// Sends to a peer, or queues a message to this node for [`Node::flush_local`]:
    /// the local replica is asked exactly like a remote one, minus the network.
    fn send(&mut self, _now: Duration, to: NodeId, message: PeerMessage) {
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

    fn reply(&mut self, client: ClientToken, reply: ClientReply) {
        self.actions.push_back(Action::Reply { client, reply });
    }

    fn count(&mut self, reason: DropReason) {
        *self.stats.drops.entry(reason).or_default() += 1;
    }
}

fn too_large_error(too_large: TooLarge) -> ClientError {
    match too_large {
        TooLarge::Values { size, limit } => ClientError::ValuesTooLarge { size, limit },
        TooLarge::Versions { size, limit } => ClientError::VersionsTooLarge { size, limit },
    }
}
