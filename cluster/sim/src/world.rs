//! The simulated world: nodes, disks, network and clients, advanced one event at a
//! time in simulated time. Everything random comes from one seeded [`Dice`]; events
//! at the same instant run in the order they were scheduled, so a seed fixes the run.
//!
//! A run has three phases, after tigerbeetle's VOPR:
//! - safety: clients work while faults strike (drops, duplicates, delays, network
//!   splits, crashes that lose unsynced writes);
//! - healing: faults stop, crashed nodes restart, clients finish what they started,
//!   and the world runs until nothing is left to do;
//! - repair: one read at R = N per key repairs every replica, the world quiesces
//!   again, and the checkers compare the replicas.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ringkv_cluster::merkle;
use ringkv_cluster::{
    Action, ClientError, ClientReply, ClientToken, GetRequest, KeeperConfig, Member, Node,
    NodeConfig, NodeId, PartitionId, PeerMessage, PutOutcome, PutRequest, Quorum, Ring, RingChange,
    RingKeeper, RingView, ShardMap, StorageCompletion, StorageOp, Supersedes, TimerId, VersionSet,
};
use xxhash_rust::xxh3::Xxh3;

use ringkv_proto::peer_message::{
    Incoming, PeerInput, PeerWireError, encode_peer_message, encode_ring_view,
};

use crate::checker::{self, Checker, Violation};
use crate::dice::Dice;
use crate::disk::Disk;
use crate::history::{Collected, GetRecord, History, Loss, PutRecord, PutResult};
use crate::settings::{ChangeKind, Settings};
use crate::{Options, RunStats};

/// How often the fault injector considers a crash or a network split.
const FAULT_TICK: Duration = Duration::from_millis(50);
/// True time at the start of a run, as the nodes' wall clocks count it (Unix ms).
const WALL_CLOCK_START_MS: u64 = 1_800_000_000_000;
/// The most a clock jump moves a node's wall clock, either way.
const CLOCK_JUMP_MAX_MS: u64 = 10_000;
/// A run that has not quiesced after this many events is stuck (a liveness bug).
const EVENTS_MAX: u64 = 3_000_000;
/// How often ring keepers and partition transfers are ticked while a membership
/// change has work left (the server ticks them as often).
const KEEPER_TICK: Duration = Duration::from_millis(100);

#[derive(Debug)]
enum Event {
    /// A peer message in its wire form (rkyv), decoded on arrival as a server would.
    /// It travels on a connection to one life (`incarnation`) of `to`, and dies with
    /// it as a TCP connection does: a restarted node never gets its old messages.
    Deliver {
        from: NodeId,
        to: NodeId,
        incarnation: u32,
        bytes: Vec<u8>,
    },
    Timer {
        node: NodeId,
        shard: usize,
        incarnation: u32,
        timer: TimerId,
    },
    StorageDone {
        node: NodeId,
        shard: usize,
        incarnation: u32,
        completion: StorageCompletion,
    },
    Sync {
        node: NodeId,
        incarnation: u32,
    },
    ClientWake {
        client: usize,
    },
    ClientGiveUp {
        client: usize,
        op: u64,
    },
    FaultTick,
    Restart {
        node: NodeId,
    },
    Heal,
    /// The failure detectors see the current split (`split` numbers it).
    SplitDetected {
        split: u64,
    },
    /// `by` stops suspecting `node`.
    Unsuspect {
        by: NodeId,
        node: NodeId,
    },
    StopFaults,
    /// The run's membership change is proposed (see `Settings::membership`).
    MembershipChange,
    /// Ring keepers push their views, and shards run their transfers.
    KeeperTick,
    /// A ring view from one node's keeper to another's, over the faulty network, in
    /// its wire form (decoded on arrival as a server would).
    DeliverView {
        from: NodeId,
        to: NodeId,
        incarnation: u32,
        bytes: Vec<u8>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Safety,
    Healing,
}

/// One simulated server: one `Node` per shard, as the server runs one per core,
/// routed between by the server's own [`ShardMap`].
struct SimNode {
    id: NodeId,
    incarnation: u32,
    /// The shards' state machines while the node is up.
    node: Option<Vec<Node>>,
    shards: ShardMap,
    disk: Disk,
    sync_scheduled: bool,
    /// How far this node's wall clock is from true time (either way); it survives
    /// restarts, as a machine's clock does.
    skew_ms: i64,
    /// The node's ring keeper while it is up, and the view it stored (which survives
    /// crashes; `None` for a node not started yet: it joins later).
    keeper: Option<RingKeeper>,
    stored_view: Option<RingView>,
    /// Dead for good (a replaced node): never restarted.
    retired: bool,
}

/// A hint a stand-in made durable: the versions (by dot) its target is owed.
struct Hinted {
    holder: NodeId,
    target: NodeId,
    key: Vec<u8>,
    dots: Vec<ringkv_cluster::Dot>,
}

struct Client {
    /// The context of this client's latest read of each key.
    contexts: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// A request waiting for its reply.
enum Waiting {
    Put {
        client: usize,
        index: usize,
    },
    Get {
        client: Option<usize>,
        key: Vec<u8>,
        quorum: Quorum,
        start: Duration,
    },
}

pub struct World {
    settings: Settings,
    options: Options,
    dice: Dice,
    now: Duration,
    queue: BTreeMap<(Duration, u64), Event>,
    scheduled: u64,
    ring: Ring,
    n: usize,
    nodes: Vec<SimNode>,
    clients: Vec<Client>,
    waiting: BTreeMap<u64, Waiting>,
    next_op: u64,
    history: History,
    phase: Phase,
    /// One side of the current network split, if any.
    split: Option<BTreeSet<NodeId>>,
    /// Splits so far, and whether the failure detectors have seen the current one
    /// (until then requests time out across it; after, they go around it).
    splits: u64,
    split_detected: bool,
    /// False suspicions: (who, of whom); the suspect is alive and reachable.
    suspicions: BTreeSet<(NodeId, NodeId)>,
    /// Every hint made durable on a stand-in, for the handoff check.
    hinted: Vec<Hinted>,
    /// Whether a keeper tick is scheduled.
    keeper_ticking: bool,
    /// What each node retired for good held durably (at home or as hints) when it
    /// died, per key.
    retired_held: Vec<(NodeId, Vec<u8>, ringkv_cluster::VersionVector)>,
    hasher: Xxh3,
    pub stats: RunStats,
    pub violations: Vec<Violation>,
}

impl World {
    pub fn new(seed: u64, settings: Settings, dice: Dice, options: Options) -> World {
        let members: Vec<Member> = (1..=settings.nodes as u32)
            .map(|i| Member::new(NodeId(i)))
            .collect();
        let ring = Ring::new(settings.partitions, &members).expect("settings give a valid ring");
        let n = settings.quorums[0].n();
        let mut world = World {
            n,
            nodes: Vec::new(),
            // The working clients, then the resolver (see `resolver`).
            clients: (0..=settings.clients)
                .map(|_| Client {
                    contexts: BTreeMap::new(),
                })
                .collect(),
            waiting: BTreeMap::new(),
            next_op: 0,
            history: History {
                tombstones_collected: settings.tombstone_grace_ms.is_some(),
                ..History::default()
            },
            phase: Phase::Safety,
            split: None,
            splits: 0,
            split_detected: false,
            suspicions: BTreeSet::new(),
            hinted: Vec::new(),
            keeper_ticking: false,
            retired_held: Vec::new(),
            hasher: Xxh3::new(),
            stats: RunStats::default(),
            violations: Vec::new(),
            queue: BTreeMap::new(),
            scheduled: 0,
            now: Duration::ZERO,
            ring,
            dice,
            options,
            settings,
        };
        world.hasher.update(&seed.to_le_bytes());
        // A node that joins later (or replaces a dead one) exists from the start, down
        // and without a view, until its change is proposed.
        let newcomer = world
            .settings
            .membership
            .filter(|m| m.kind != ChangeKind::Leave)
            .map(|_| Member::new(NodeId(world.settings.nodes as u32 + 1)));
        for member in members.into_iter().chain(newcomer) {
            let shard_count = world.settings.shards[member.node.0 as usize - 1];
            if shard_count > 1 {
                world.stats.multi_shard_nodes += 1;
            }
            let shards = ShardMap::new(shard_count).expect("1 to 3 shards");
            let starts = world.ring.is_member(member.node);
            let view = starts.then(|| RingView::stable(world.ring.clone(), world.n));
            let skew_max = world.settings.clock_skew_max_ms;
            let skew_ms = world.dice.between(0, 2 * skew_max) as i64 - skew_max as i64;
            world.nodes.push(SimNode {
                id: member.node,
                incarnation: 0,
                node: None,
                shards,
                disk: Disk::default(),
                sync_scheduled: false,
                skew_ms,
                keeper: None,
                stored_view: view,
                retired: false,
            });
            if starts {
                world.start_node(member.node);
            }
        }
        if let Some(change) = world.settings.membership {
            world.schedule(Duration::from_millis(change.at_ms), Event::MembershipChange);
        }
        for client in 0..world.settings.clients {
            let wake = world.dice.between(0, 20);
            world.schedule(Duration::from_millis(wake), Event::ClientWake { client });
        }
        world.schedule(FAULT_TICK, Event::FaultTick);
        world.schedule(
            Duration::from_millis(world.settings.safety_ms),
            Event::StopFaults,
        );
        world
    }

    /// Runs all three phases and the final checks.
    pub fn run(&mut self) {
        self.run_until_quiet();
        self.check_handoff_complete();
        if !self.options.without_anti_entropy && !self.settings.tight_limits() {
            self.converge_by_anti_entropy();
        }
        if self.settings.tombstone_grace_ms.is_some() && !self.settings.tight_limits() {
            self.collect_every_tombstone();
        }
        if self.settings.tight_limits() {
            // Over the store's limits, replicas keep what they hold and refuse merges
            // until a client resolves the siblings: do what such a client does, then
            // hold the key to the same convergence as any other.
            self.repair_every_key(Some(self.resolver()));
            self.run_until_quiet();
            // Before the resolver supersedes everything: every acked write no write
            // saw must still be on some replica (check 2 would count the resolver's
            // write as one that saw them all).
            // Hints their targets refused (over the limits) still hold acked writes.
            self.check_final_keys(true);
            self.resolve_every_key();
            self.run_until_quiet();
            // Resolved keys fit again: the server retries refused hints on a timer.
            self.retry_parked_hints();
            self.run_until_quiet();
        }
        self.repair_every_key(None);
        self.run_until_quiet();
        self.check_final_state();
        self.check_trees();
        let replicas = self.replicas_of_keys();
        let (violations, counts) = checker::check_reads(&self.history, &replicas);
        self.violations.extend(violations);
        self.violations
            .extend(checker::check_duplicate_dots(&self.history));
        self.violations.extend(checker::check_stamps(&self.history));
        let (violations, node_reads_checked) = checker::check_node_reads(&self.history, &replicas);
        self.violations.extend(violations);
        self.stats.node_reads_checked = node_reads_checked;
        let (violations, deletes_checked) =
            checker::check_nothing_to_delete(&self.history, &replicas);
        self.violations.extend(violations);
        self.stats.node_reads_checked += deletes_checked;
        self.violations
            .extend(checker::check_applied_once(&self.history));
        self.stats.reads_checked = counts.checked;
        self.stats.reads_with_siblings = counts.with_siblings;
        self.stats.reads_checked_near_losses = counts.checked_near_losses;
        self.stats.deletes_acked = self
            .history
            .puts
            .iter()
            .filter(|p| p.value.is_none() && p.acked_dot().is_some())
            .count() as u64;
        self.stats.events_hash = self.hasher.digest();
    }

    pub fn trace_hash(&self) -> u64 {
        self.hasher.digest()
    }

    /// A node starting from its stored view: its shards and its ring keeper.
    fn start_node(&mut self, id: NodeId) {
        let shards = self.sim_node(id).shards;
        let view = self
            .sim_node(id)
            .stored_view
            .clone()
            .expect("started nodes have a view");
        let node = self.boot(id, shards, &view);
        let config = KeeperConfig {
            push_interval: Duration::from_millis(200),
            // Writes coordinated under the old ring end within a request timeout.
            settle: Duration::from_millis(self.settings.request_timeout_ms * 2),
        };
        let sim = self.sim_node_mut(id);
        sim.node = Some(node);
        sim.keeper = Some(RingKeeper::new(id, view, config));
        self.ensure_keeper_ticks();
    }

    /// A node starting: its shards, each with a fresh epoch seed every time, as the
    /// server draws one from the OS for every shard on every start.
    fn boot(&mut self, id: NodeId, shards: ShardMap, view: &RingView) -> Vec<Node> {
        (0..shards.shards())
            .map(|shard| {
                let mut config = NodeConfig::new(id, self.dice.bits());
                config.request_timeout = Duration::from_millis(self.settings.request_timeout_ms);
                config.sabotage = self.options.sabotage;
                config.siblings_max = self.settings.siblings_max;
                config.stored_value_max = self.settings.stored_value_max;
                config.stored_version_max = self.settings.stored_version_max;
                config.first_sequence = shards.first_sequence(shard);
                config.shards = shards;
                config.shard = shard;
                config.hints = self.settings.hints;
                // Streams paced as the server paces them (its default ceiling): the
                // pacer follows simulated ack times.
                config.transfer_keys_per_second = 20_000;
                config.tombstone_grace =
                    self.settings.tombstone_grace_ms.map(Duration::from_millis);
                // The simulated network delivers within its delay bound, or never.
                config.message_delay_max = Duration::from_millis(self.settings.delay_max_ms);
                let mut node = Node::with_view(config, view.clone());
                let wall_ms = self.wall_clock_ms(id);
                node.set_wall_clock(wall_ms);
                node
            })
            .collect()
    }

    /// The shard of node `id` that owns `partition`.
    fn shard_of(&self, id: NodeId, partition: PartitionId) -> usize {
        self.sim_node(id).shards.owner(partition)
    }

    /// Whether `id` may lose data now: the victim, while faults strike.
    fn is_victim(&self, id: NodeId) -> bool {
        self.phase == Phase::Safety && self.settings.loss_victim == Some(id.0)
    }

    fn schedule(&mut self, after: Duration, event: Event) {
        self.scheduled += 1;
        self.queue.insert((self.now + after, self.scheduled), event);
    }

    fn run_until_quiet(&mut self) {
        while let Some(((at, _), event)) = self.queue.pop_first() {
            self.now = at;
            self.stats.events += 1;
            if self.stats.events > EVENTS_MAX {
                self.violations.push(Violation {
                    checker: Checker::Convergence,
                    detail: format!("no quiescence after {EVENTS_MAX} events"),
                });
                self.queue.clear();
                return;
            }
            self.hash_event(&event);
            self.handle(event);
        }
    }

    fn hash_event(&mut self, event: &Event) {
        match event {
            // Debug-formatting the bytes would be slow; hash them raw.
            Event::Deliver {
                from, to, bytes, ..
            }
            | Event::DeliverView {
                from, to, bytes, ..
            } => {
                let header = format!("{:?} deliver {from:?}->{to:?} ", self.now);
                self.hasher.update(header.as_bytes());
                self.hasher.update(bytes);
            }
            other => {
                self.hasher
                    .update(format!("{:?} {other:?}\n", self.now).as_bytes());
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver {
                from,
                to,
                incarnation,
                bytes,
            } => {
                if !self.is_current(to, incarnation) {
                    self.stats.messages_to_dead_incarnations += 1;
                    return;
                }
                let now = self.now;
                let message = match decode_as_received(&bytes) {
                    Ok(message) => message,
                    Err(error) => {
                        // Nodes only send valid messages and the network does not
                        // corrupt them: a failure here is a codec bug.
                        panic!("{from:?} -> {to:?}: undecodable message: {error}");
                    }
                };
                // Nodes only answer requests they were sent, so every reply names a
                // shard that numbered it.
                let shard = self
                    .sim_node(to)
                    .shards
                    .recipient(&message)
                    .expect("replies route to the shard that numbered the request");
                if let Some(node) = self.live_node(to, shard) {
                    node.handle_message(now, from, message);
                    self.drain(to, shard);
                }
            }
            Event::Timer {
                node,
                shard,
                incarnation,
                timer,
            } => {
                if self.is_current(node, incarnation) {
                    let now = self.now;
                    self.live_node(node, shard)
                        .expect("current")
                        .handle_timer(now, timer);
                    self.drain(node, shard);
                }
            }
            Event::StorageDone {
                node,
                shard,
                incarnation,
                completion,
            } => {
                if self.is_current(node, incarnation) {
                    let now = self.now;
                    self.live_node(node, shard)
                        .expect("current")
                        .handle_storage(now, completion);
                    self.drain(node, shard);
                }
            }
            Event::Sync { node, incarnation } => {
                if self.is_current(node, incarnation) {
                    self.sync(node);
                }
            }
            Event::ClientWake { client } => self.client_wake(client),
            Event::ClientGiveUp { client, op } => {
                if let Some(waiting) = self.waiting.remove(&op) {
                    self.close(op, waiting, None);
                    self.schedule_wake(client);
                }
            }
            Event::FaultTick => self.fault_tick(),
            Event::Restart { node } => self.restart(node),
            Event::Heal => {
                self.split = None;
                self.split_detected = false;
                self.refresh_reachability();
            }
            Event::SplitDetected { split } => {
                if self.split.is_some() && split == self.splits {
                    self.split_detected = true;
                    self.refresh_reachability();
                }
            }
            Event::Unsuspect { by, node } => {
                self.suspicions.remove(&(by, node));
                self.refresh_reachability();
            }
            Event::StopFaults => {
                self.phase = Phase::Healing;
                self.split = None;
                self.split_detected = false;
                self.suspicions.clear();
                self.refresh_reachability();
                let down: Vec<NodeId> = self
                    .nodes
                    .iter()
                    .filter(|n| n.node.is_none() && !n.retired && n.stored_view.is_some())
                    .map(|n| n.id)
                    .collect();
                for node in down {
                    self.restart(node);
                }
            }
            Event::MembershipChange => self.propose_change(),
            Event::KeeperTick => self.keeper_tick(),
            Event::DeliverView {
                from,
                to,
                incarnation,
                bytes,
            } => {
                if !self.is_current(to, incarnation) {
                    self.stats.messages_to_dead_incarnations += 1;
                    return;
                }
                let view = match PeerInput::new(&bytes).next_message() {
                    Ok(Some(Incoming::Ring(frame))) => frame.view,
                    other => panic!("{from:?} -> {to:?}: not a ring view: {other:?}"),
                };
                let now = self.now;
                if let Some(keeper) = self.sim_node_mut(to).keeper.as_mut() {
                    keeper.handle(now, from, view);
                }
                self.flush_keeper(to);
            }
        }
    }

    /// The run's membership change, proposed at a random live member (a joining or
    /// replacing node starts with that member's view, as `--join` fetches it).
    fn propose_change(&mut self) {
        let Some(plan) = self.settings.membership else {
            return;
        };
        // Live members with no change in progress.
        let members: Vec<NodeId> = (self.nodes.iter())
            .filter(|n| {
                let view = n.keeper.as_ref().map(RingKeeper::view);
                view.is_some_and(|v| v.is_stable() && v.ring().is_member(n.id))
            })
            .map(|n| n.id)
            .collect();
        if members.is_empty() || (plan.kind == ChangeKind::Replace && members.len() < 2) {
            // Nobody to ask right now: try again shortly.
            self.schedule(KEEPER_TICK, Event::MembershipChange);
            return;
        }
        let at = members[self.dice.index(members.len())];
        let newcomer = NodeId(self.settings.nodes as u32 + 1);
        let ring = self
            .sim_node(at)
            .keeper
            .as_ref()
            .expect("live")
            .view()
            .ring()
            .clone();
        let ring_members: Vec<NodeId> = ring.members().map(|m| m.node).collect();
        let change = match plan.kind {
            ChangeKind::Join => RingChange::Join(Member::new(newcomer)),
            ChangeKind::Leave => {
                RingChange::Leave(ring_members[self.dice.index(ring_members.len())])
            }
            ChangeKind::Replace => {
                let others: Vec<NodeId> =
                    ring_members.iter().copied().filter(|&n| n != at).collect();
                let dead = others[self.dice.index(others.len())];
                self.retire(dead);
                RingChange::Replace {
                    dead,
                    with: Member::new(newcomer),
                }
            }
        };
        let now = self.now;
        let proposed = (self.sim_node_mut(at).keeper.as_mut())
            .expect("live")
            .propose(now, change);
        if let Err(error) = proposed {
            panic!("{at:?} refused {change:?}: {error}");
        }
        self.stats.membership_changes += 1;
        self.flush_keeper(at);
        if plan.kind != ChangeKind::Leave {
            let view = self.sim_node(at).stored_view.clone();
            self.sim_node_mut(newcomer).stored_view = view;
            self.restart(newcomer);
        }
        self.ensure_keeper_ticks();
    }

    /// A node dies for good (it is then replaced): its disk is gone.
    fn retire(&mut self, id: NodeId) {
        if self.sim_node(id).node.is_some() {
            self.crash(id);
        }
        // What its disk held goes with it (a W=1 write lives on one node): a hint
        // already handed to it, and the hints it held for others.
        for k in 0..self.settings.keys {
            let key = format!("k{k}").into_bytes();
            let disk = &self.sim_node(id).disk;
            let stored = disk.durable_home(&key).into_iter();
            let held = stored.chain(disk.durable_hints(&key)).fold(
                ringkv_cluster::VersionVector::new(),
                |mut held, stored| {
                    let set = stored.decode().expect("the simulator stores valid sets");
                    held.join(&set.context());
                    held
                },
            );
            self.retired_held.push((id, key, held));
        }
        let sim = self.sim_node_mut(id);
        sim.retired = true;
        sim.disk.wipe();
        self.history.losses.push(Loss {
            at: self.now,
            node: id,
            key: None,
            retired: true,
        });
        self.refresh_reachability();
    }

    /// Ticks every live keeper and every live shard's transfers.
    fn keeper_tick(&mut self) {
        self.keeper_ticking = false;
        let now = self.now;
        for id in self.nodes.iter().map(|n| n.id).collect::<Vec<_>>() {
            let Some(keeper) = self.sim_node_mut(id).keeper.as_mut() else {
                continue;
            };
            keeper.tick(now);
            let allowed = keeper.transfers_allowed(now);
            self.flush_keeper(id);
            for shard in 0..self.sim_node(id).shards.shards() {
                if let Some(node) = self.live_node(id, shard) {
                    node.tick_transfers(now, allowed);
                }
                self.drain(id, shard);
            }
        }
        self.ensure_keeper_ticks();
    }

    /// Schedules the next keeper tick while membership work is left: a change in
    /// progress, views that differ, partitions to drop.
    fn ensure_keeper_ticks(&mut self) {
        if self.keeper_ticking {
            return;
        }
        let live: Vec<&SimNode> = self.nodes.iter().filter(|n| n.node.is_some()).collect();
        let views: Vec<&RingView> = live
            .iter()
            .filter_map(|n| n.keeper.as_ref().map(|k| k.view()))
            .collect();
        let changing = views.iter().any(|v| !v.is_stable());
        let differing = views.windows(2).any(|w| w[0] != w[1]);
        let busy = live
            .iter()
            .flat_map(|n| n.node.iter().flatten())
            .any(Node::transfers_busy);
        let proposing = self.settings.membership.is_some() && self.stats.membership_changes == 0;
        if changing || differing || busy || (proposing && self.phase == Phase::Safety) {
            self.keeper_ticking = true;
            self.schedule(KEEPER_TICK, Event::KeeperTick);
        }
    }

    /// Stores a keeper's new view and hands it to the node's shards, then sends what
    /// the keeper has to send.
    fn flush_keeper(&mut self, id: NodeId) {
        loop {
            let now = self.now;
            let sim = self.sim_node_mut(id);
            let Some(keeper) = sim.keeper.as_mut() else {
                return;
            };
            if let Some(view) = keeper.take_changed() {
                sim.stored_view = Some(view.clone());
                for shard in sim.node.iter_mut().flatten() {
                    shard.set_view(now, view.clone());
                }
                for shard in 0..self.sim_node(id).shards.shards() {
                    self.drain(id, shard);
                }
                continue;
            }
            let Some((to, view)) = keeper.poll_send() else {
                return;
            };
            self.send_view(id, to, view);
        }
    }

    /// A ring view over the network: dropped across a split or by chance, like any
    /// message during the safety phase.
    fn send_view(&mut self, from: NodeId, to: NodeId, view: RingView) {
        self.stats.messages_sent += 1;
        let Some(target) = self.nodes.get(to.0 as usize - 1) else {
            return;
        };
        let incarnation = target.incarnation;
        if self.lost_in_network(from, to) {
            return;
        }
        let mut bytes = Vec::new();
        encode_ring_view(0, &view, &[], &mut bytes).expect("views fit a frame");
        let delay = self.delay();
        let deliver = Event::DeliverView {
            from,
            to,
            incarnation,
            bytes,
        };
        self.schedule(delay, deliver);
    }

    /// A shard received a partition in full: its node's keeper spreads the news.
    fn keeper_moved(&mut self, id: NodeId, partition: PartitionId, fingerprint: u64) {
        let now = self.now;
        if let Some(keeper) = self.sim_node_mut(id).keeper.as_mut() {
            keeper.partition_moved(now, partition, fingerprint);
        }
        self.flush_keeper(id);
    }

    /// Carries out every action a node's shard has queued.
    fn drain(&mut self, id: NodeId, shard: usize) {
        loop {
            let Some(node) = self.live_node(id, shard) else {
                return;
            };
            node.assert_invariants();
            let Some(action) = node.poll_action() else {
                return;
            };
            match action {
                Action::Send { to, message } => self.send(id, to, message),
                Action::Storage(op) => self.storage(id, shard, op),
                Action::SetTimer { timer, at } => {
                    let incarnation = self.sim_node(id).incarnation;
                    let after = at.saturating_sub(self.now);
                    self.schedule(
                        after,
                        Event::Timer {
                            node: id,
                            shard,
                            incarnation,
                            timer,
                        },
                    );
                }
                Action::Reply { client, reply } => self.reply(client, reply),
                Action::Moved {
                    partition,
                    fingerprint,
                } => self.keeper_moved(id, partition, fingerprint),
            }
        }
    }

    fn send(&mut self, from: NodeId, to: NodeId, message: PeerMessage) {
        self.stats.messages_sent += 1;
        let mut bytes = Vec::new();
        // The sender's shard is not modelled (replies route by request id).
        encode_peer_message(0, &message, &mut bytes).expect("messages fit a frame");
        let incarnation = self.sim_node(to).incarnation;
        if self.lost_in_network(from, to) {
            return;
        }
        if self.phase == Phase::Safety && self.dice.chance(self.settings.duplicate_per_mille) {
            let delay = self.delay();
            let copy = Event::Deliver {
                from,
                to,
                incarnation,
                bytes: bytes.clone(),
            };
            self.schedule(delay, copy);
        }
        let delay = self.delay();
        let deliver = Event::Deliver {
            from,
            to,
            incarnation,
            bytes,
        };
        self.schedule(delay, deliver);
    }

    /// Whether a message from `from` to `to` is lost now: across a split, or by
    /// chance, while faults strike (counted).
    fn lost_in_network(&mut self, from: NodeId, to: NodeId) -> bool {
        if self.phase != Phase::Safety {
            return false;
        }
        let split = self
            .split
            .as_ref()
            .is_some_and(|side| side.contains(&from) != side.contains(&to));
        let lost = split || self.dice.chance(self.settings.drop_per_mille);
        if lost {
            self.stats.messages_dropped += 1;
        }
        lost
    }

    fn delay(&mut self) -> Duration {
        let ms = self
            .dice
            .between(self.settings.delay_min_ms, self.settings.delay_max_ms);
        Duration::from_millis(ms)
    }

    fn storage(&mut self, id: NodeId, shard: usize, op: StorageOp) {
        match op {
            StorageOp::ListLeaves {
                op,
                partition,
                leaves,
            } => {
                let wanted: BTreeSet<u32> = leaves.into_iter().collect();
                let keys = self
                    .sim_node(id)
                    .disk
                    .home_digests()
                    .into_iter()
                    .filter(|(p, key, _)| {
                        *p == partition && wanted.contains(&(merkle::leaf_of(key) as u32))
                    })
                    .map(|(_, key, digest)| (key, digest))
                    .collect();
                let latency = self.dice.between(0, self.settings.read_latency_max_ms);
                self.complete_later(id, shard, latency, StorageCompletion::Listed { op, keys });
            }
            StorageOp::ListTombstones { op, partition } => {
                let keys = self.sim_node(id).disk.home_tombstones(partition);
                let latency = self.dice.between(0, self.settings.read_latency_max_ms);
                self.complete_later(id, shard, latency, StorageCompletion::Listed { op, keys });
            }
            StorageOp::Collect {
                op,
                partition,
                key,
                digest,
            } => {
                let collected = self.sim_node_mut(id).disk.collect(partition, &key, digest);
                let result = match collected {
                    Some(stored) => {
                        self.stats.tombstones_collected += 1;
                        let set = stored.decode().expect("the simulator stores valid sets");
                        let at = self.now;
                        let versions = set;
                        self.history.collected.push(Collected { at, key, versions });
                        Ok(())
                    }
                    None => Err(ringkv_cluster::StorageFailure(
                        "the tombstone changed".into(),
                    )),
                };
                let latency = self.dice.between(0, self.settings.read_latency_max_ms);
                self.complete_later(id, shard, latency, StorageCompletion::Write { op, result });
            }
            StorageOp::DropPartition { op, partition } => {
                self.sim_node_mut(id).disk.drop_partition(partition);
                self.stats.partitions_dropped += 1;
                let latency = self.dice.between(0, self.settings.read_latency_max_ms);
                let completion = StorageCompletion::Write { op, result: Ok(()) };
                self.complete_later(id, shard, latency, completion);
            }
            StorageOp::Read { op, shelf, key } => {
                if self.is_victim(id)
                    && self.dice.chance(self.settings.lost_read_per_mille)
                    && self.sim_node_mut(id).disk.lose(shelf, &key)
                {
                    self.stats.records_lost += 1;
                    self.history.losses.push(Loss {
                        at: self.now,
                        node: id,
                        key: Some(key.clone()),
                        retired: false,
                    });
                }
                let stored = self.sim_node(id).disk.read(shelf, &key);
                let latency = self.dice.between(0, self.settings.read_latency_max_ms);
                let completion = StorageCompletion::Read {
                    op,
                    result: Ok(stored),
                };
                self.complete_later(id, shard, latency, completion);
            }
            StorageOp::Write { .. } | StorageOp::Remove { .. } => {
                let (op, shelf, key, stored) = match op {
                    StorageOp::Write {
                        op,
                        shelf,
                        key,
                        stored,
                    } => (op, shelf, key, Some(stored)),
                    StorageOp::Remove { op, shelf, key } => (op, shelf, key, None),
                    StorageOp::Read { .. }
                    | StorageOp::DropPartition { .. }
                    | StorageOp::ListLeaves { .. }
                    | StorageOp::ListTombstones { .. }
                    | StorageOp::Collect { .. } => unreachable!("matched above"),
                };
                if self.is_victim(id) && self.dice.chance(self.settings.failed_write_per_mille) {
                    // The engine cuts a failed write back: nothing of it stays.
                    self.stats.writes_failed += 1;
                    let completion = StorageCompletion::Write {
                        op,
                        result: Err(ringkv_cluster::StorageFailure("injected EIO".into())),
                    };
                    let latency = self.dice.between(0, self.settings.sync_delay_max_ms);
                    self.complete_later(id, shard, latency, completion);
                    return;
                }
                self.sim_node_mut(id)
                    .disk
                    .write(shard, op, shelf, key, stored);
                self.ensure_sync(id);
            }
        }
    }

    /// Delivers a storage completion to the node `latency_ms` from now (if it has not
    /// restarted by then).
    fn complete_later(
        &mut self,
        id: NodeId,
        shard: usize,
        latency_ms: u64,
        completion: StorageCompletion,
    ) {
        let incarnation = self.sim_node(id).incarnation;
        self.schedule(
            Duration::from_millis(latency_ms),
            Event::StorageDone {
                node: id,
                shard,
                incarnation,
                completion,
            },
        );
    }

    fn ensure_sync(&mut self, id: NodeId) {
        let node = self.sim_node(id);
        if node.sync_scheduled || node.disk.pending_writes() == 0 {
            return;
        }
        let incarnation = node.incarnation;
        let delay = self.dice.between(1, self.settings.sync_delay_max_ms);
        self.sim_node_mut(id).sync_scheduled = true;
        self.schedule(
            Duration::from_millis(delay),
            Event::Sync {
                node: id,
                incarnation,
            },
        );
    }

    fn sync(&mut self, id: NodeId) {
        let now = self.now;
        let sim = self.sim_node_mut(id);
        sim.sync_scheduled = false;
        let (done, hints) = sim.disk.sync();
        for (target, key, stored) in hints {
            let set = stored.decode().expect("the simulator stores valid sets");
            let dots = set.siblings().map(|v| v.dot).collect();
            self.hinted.push(Hinted {
                holder: id,
                target,
                key,
                dots,
            });
        }
        for (shard, op) in done {
            let completion = StorageCompletion::Write { op, result: Ok(()) };
            self.live_node(id, shard)
                .expect("synced nodes are live")
                .handle_storage(now, completion);
            self.drain(id, shard);
        }
        self.ensure_sync(id);
    }

    /// Node `id`'s wall clock: true time plus its skew (never before 0).
    fn wall_clock_ms(&self, id: NodeId) -> u64 {
        let true_ms = WALL_CLOCK_START_MS + self.now.as_millis() as u64;
        true_ms.saturating_add_signed(self.sim_node(id).skew_ms)
    }

    fn fault_tick(&mut self) {
        if self.settings.tombstone_grace_ms.is_some() {
            // Anti-entropy and sweeps run alongside the faults, as in the server.
            if self.phase == Phase::Safety && !self.options.without_anti_entropy {
                self.tick_anti_entropy();
            }
            self.tick_tombstones();
        }
        if self.phase != Phase::Safety {
            return;
        }
        if self.dice.chance(self.settings.clock_jump_per_mille) {
            let victim = self.dice.index(self.nodes.len());
            let jump =
                self.dice.between(0, 2 * CLOCK_JUMP_MAX_MS) as i64 - CLOCK_JUMP_MAX_MS as i64;
            self.nodes[victim].skew_ms += jump;
            self.stats.clock_jumps += 1;
        }
        if self.dice.chance(self.settings.crash_per_mille) {
            let live: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|n| n.node.is_some())
                .map(|n| n.id)
                .collect();
            if !live.is_empty() {
                let victim = live[self.dice.index(live.len())];
                self.crash(victim);
            }
        }
        if self.split.is_none() && self.dice.chance(self.settings.partition_per_mille) {
            let mut side = BTreeSet::new();
            for node in &self.nodes {
                if self.dice.chance(500) {
                    side.insert(node.id);
                }
            }
            if !side.is_empty() && side.len() < self.nodes.len() {
                self.stats.partitions += 1;
                self.split = Some(side);
                self.splits += 1;
                let lasts = self.dice.between(50, self.settings.partition_max_ms);
                self.schedule(Duration::from_millis(lasts), Event::Heal);
                let detect = self.dice.between(0, self.settings.detect_max_ms);
                let split = self.splits;
                self.schedule(
                    Duration::from_millis(detect),
                    Event::SplitDetected { split },
                );
            }
        }
        if self.dice.chance(self.settings.false_suspicion_per_mille) {
            let by = self.nodes[self.dice.index(self.nodes.len())].id;
            let node = self.nodes[self.dice.index(self.nodes.len())].id;
            if by != node && self.suspicions.insert((by, node)) {
                self.stats.false_suspicions += 1;
                self.refresh_reachability();
                let lasts = self.dice.between(20, 500);
                self.schedule(Duration::from_millis(lasts), Event::Unsuspect { by, node });
            }
        }
        if self.now + FAULT_TICK < Duration::from_millis(self.settings.safety_ms) {
            self.schedule(FAULT_TICK, Event::FaultTick);
        }
    }

    fn crash(&mut self, id: NodeId) {
        self.stats.crashes += 1;
        let wipe = self.is_victim(id) && self.dice.chance(self.settings.wipe_per_mille);
        for shard in self.sim_node_mut(id).node.take().into_iter().flatten() {
            self.count_node_stats(&shard.stats());
        }
        let sim = self.sim_node_mut(id);
        sim.keeper = None;
        sim.sync_scheduled = false;
        let lost = sim.disk.crash();
        if wipe {
            sim.disk.wipe();
            self.stats.disk_wipes += 1;
            self.history.losses.push(Loss {
                at: self.now,
                node: id,
                key: None,
                retired: false,
            });
        }
        self.stats.lost_pending_writes += lost as u64;
        // A perfect failure detector for crashes: the others stop asking this node.
        self.refresh_reachability();
        let downtime = self.dice.between(10, self.settings.downtime_max_ms);
        self.schedule(Duration::from_millis(downtime), Event::Restart { node: id });
    }

    fn restart(&mut self, id: NodeId) {
        let sim = self.sim_node(id);
        if sim.node.is_some() || sim.retired || sim.stored_view.is_none() {
            return;
        }
        let incarnation = sim.incarnation + 1;
        let shards = sim.shards;
        self.sim_node_mut(id).incarnation = incarnation;
        self.start_node(id);
        let mut node = self
            .sim_node_mut(id)
            .node
            .take()
            .expect("started just above");
        // The hints survive in the store: the server lists them before serving, and
        // rebuilds every partition's Merkle tree from its index.
        Self::rebuild_trees(&self.sim_node(id).disk, &shards, &mut node, None);
        let now = self.now;
        for (target, key, bytes) in self.sim_node(id).disk.hints() {
            let shard = shards.owner(self.ring.partition_of(&key));
            node[shard].restore_hint(now, target, key, bytes);
        }
        // Partitions that moved away before the crash let their drop happen.
        let stored: BTreeSet<PartitionId> = (self.sim_node(id).disk.home_digests().into_iter())
            .map(|(p, _, _)| p)
            .collect();
        for shard in node.iter_mut() {
            shard.drop_unserved(now, stored.iter().copied());
        }
        self.sim_node_mut(id).node = Some(node);
        self.ensure_keeper_ticks();
        self.refresh_reachability();
    }

    /// Tells every live shard what its failure detector would now believe of every
    /// other node: down if crashed, across a detected split, or falsely suspected.
    /// Then carries out what that started (cut-off forwards, handoffs).
    fn refresh_reachability(&mut self) {
        let live: BTreeSet<NodeId> = self
            .nodes
            .iter()
            .filter(|n| n.node.is_some())
            .map(|n| n.id)
            .collect();
        let ids: Vec<NodeId> = self.nodes.iter().map(|n| n.id).collect();
        for &a in &live {
            for &b in &ids {
                if a == b {
                    continue;
                }
                let split = self.split_detected
                    && self
                        .split
                        .as_ref()
                        .is_some_and(|side| side.contains(&a) != side.contains(&b));
                let reachable = live.contains(&b) && !split && !self.suspicions.contains(&(a, b));
                for shard in self.sim_node_mut(a).node.iter_mut().flatten() {
                    shard.set_reachable(b, reachable);
                }
            }
            for shard in 0..self.sim_node(a).shards.shards() {
                self.drain(a, shard);
            }
        }
    }

    /// Rebuilds trees from `disk` as the server does from the store's index: every
    /// partition, or only `only`.
    fn rebuild_trees(
        disk: &Disk,
        shards: &ShardMap,
        node: &mut [Node],
        only: Option<&BTreeSet<PartitionId>>,
    ) {
        let mut trees = disk.home_trees();
        if let Some(only) = only {
            trees.retain(|p, _| only.contains(p));
            for &p in only {
                trees.entry(p).or_default();
            }
        }
        for (partition, tree) in trees {
            node[shards.owner(partition)].set_merkle_tree(partition, tree);
        }
    }

    /// Every shard's Merkle trees agree with what its disk holds: kept current write
    /// by write, they must equal trees built from scratch, for every partition with a
    /// record or a tree. A tree a lost record made stale is left out (the server
    /// rebuilds it before its next exchange) and counted; the anti-entropy phase
    /// rebuilds them all, so a stale tree is left only where that phase did not run.
    fn check_trees(&mut self) {
        for i in 0..self.nodes.len() {
            let sim = &self.nodes[i];
            let Some(node) = sim.node.as_ref() else {
                continue;
            };
            let stale: BTreeSet<PartitionId> = node
                .iter()
                .flat_map(|shard| shard.stale_trees())
                .map(|(p, _)| p)
                .collect();
            let mut expected = sim.disk.home_trees();
            for partition in node.iter().flat_map(|shard| shard.merkle_partitions()) {
                expected.entry(partition).or_default();
            }
            let mut violations = Vec::new();
            let (mut checked, mut skipped) = (0, 0);
            for (partition, want) in expected {
                if stale.contains(&partition) {
                    skipped += 1;
                    continue;
                }
                let shard = &node[sim.shards.owner(partition)];
                let have = shard.merkle_tree(partition).cloned().unwrap_or_default();
                checked += 1;
                if have != want {
                    violations.push(Violation {
                        checker: Checker::Convergence,
                        detail: format!(
                            "{:?} partition {partition:?}: tree {have:?} but its disk makes {want:?}",
                            sim.id
                        ),
                    });
                }
            }
            self.stats.trees_checked += checked;
            self.stats.stale_trees_skipped += skipped;
            self.violations.extend(violations);
        }
    }

    /// Runs anti-entropy rounds (every shard starts one exchange, then the world runs
    /// until quiet) until every key's home replicas hold the same set, with no read
    /// at all: the replicas that missed writes (lost messages, crashes before a sync,
    /// a wiped disk) catch up by Merkle exchanges alone.
    fn converge_by_anti_entropy(&mut self) {
        const ROUNDS_MAX: u64 = 400;
        for round in 0..ROUNDS_MAX {
            if self.replicas_converged() {
                self.stats.anti_entropy_rounds = round;
                return;
            }
            self.tick_anti_entropy();
            // Each round a little later, so an exchange whose answer never came
            // expires (messages no longer drop, but a restart may lose one).
            self.schedule(Duration::from_millis(1), Event::FaultTick);
            self.run_until_quiet();
        }
        let differing: Vec<String> = (0..self.settings.keys)
            .filter_map(|k| {
                let key = format!("k{k}").into_bytes();
                let partition = self.ring.partition_of(&key);
                let sets = self.converging_sets(&key);
                if sets.windows(2).all(|w| w[0].1 == w[1].1) {
                    return None;
                }
                let each: Vec<String> = sets
                    .iter()
                    .map(|(id, set)| {
                        let sim = self.sim_node(*id);
                        let shard = sim.shards.owner(partition);
                        let root = sim
                            .node
                            .as_ref()
                            .and_then(|n| n[shard].merkle_tree(partition))
                            .map(|t| t.root());
                        format!("{id:?} {} versions, root {root:x?}", set.len())
                    })
                    .collect();
                Some(format!("k{k} in {partition:?}: {}", each.join("; ")))
            })
            .collect();
        self.violations.push(Violation {
            checker: Checker::Convergence,
            detail: format!(
                "anti-entropy did not converge the replicas in {ROUNDS_MAX} rounds: {}",
                differing.join(" | ")
            ),
        });
    }

    /// With faults stopped, lets time pass (sweeps ticking) until no replica holds a
    /// key of tombstones only: every tombstone is collected once every replica holds
    /// it (the reads after this, and the final checks, then judge a cluster that
    /// forgot its deletes).
    fn collect_every_tombstone(&mut self) {
        const ROUNDS_MAX: u64 = 300;
        let grace = self.settings.tombstone_grace_ms.unwrap_or(0);
        let pace = Duration::from_millis(self.settings.request_timeout_ms.max(grace) / 2);
        for _ in 0..ROUNDS_MAX {
            if self.tombstones_left().is_empty() {
                return;
            }
            // Anti-entropy keeps running, as in the server: replicas holding other
            // tombstones of a key get each other's, then all hold the same.
            if !self.options.without_anti_entropy {
                self.tick_anti_entropy();
            }
            self.schedule(pace, Event::FaultTick);
            self.run_until_quiet();
        }
        self.violations.push(Violation {
            checker: Checker::Convergence,
            detail: format!(
                "tombstones still held after {ROUNDS_MAX} sweeps with every node up: {:?}",
                self.tombstones_left()
            ),
        });
    }

    /// (node, key) of every durable home set of tombstones only.
    fn tombstones_left(&self) -> Vec<(NodeId, String)> {
        let mut left = Vec::new();
        for k in 0..self.settings.keys {
            let key = format!("k{k}").into_bytes();
            for (id, set) in self.stored_sets(&key) {
                if !set.is_empty() && set.siblings().all(|v| v.value.is_tombstone()) {
                    left.push((id, format!("k{k}")));
                }
            }
        }
        left
    }

    /// Rebuilds the trees a lost record made stale, where no write of the partition
    /// is in flight, as the server does before each exchange.
    fn rebuild_stale_trees(&mut self, id: NodeId) {
        let sim = self.sim_node_mut(id);
        let Some(node) = sim.node.as_mut() else {
            return;
        };
        let stale: BTreeSet<PartitionId> = node
            .iter()
            .flat_map(|shard| shard.stale_trees())
            .filter(|(_, busy)| !busy)
            .map(|(p, _)| p)
            .collect();
        if !stale.is_empty() {
            Self::rebuild_trees(&sim.disk, &sim.shards, node, Some(&stale));
        }
    }

    fn replicas_converged(&self) -> bool {
        (0..self.settings.keys).all(|k| {
            let key = format!("k{k}").into_bytes();
            let sets = self.converging_sets(&key);
            sets.windows(2).all(|w| w[0].1 == w[1].1)
        })
    }

    fn retry_parked_hints(&mut self) {
        let now = self.now;
        for id in self.nodes.iter().map(|n| n.id).collect::<Vec<_>>() {
            for shard in 0..self.sim_node(id).shards.shards() {
                if let Some(node) = self.live_node(id, shard) {
                    node.retry_parked_hints(now);
                }
                self.drain(id, shard);
            }
        }
    }

    fn count_node_stats(&mut self, stats: &ringkv_cluster::NodeStats) {
        self.stats.transfer_keys_sent += stats.transfers.keys_sent;
        self.stats.partitions_moved += stats.transfers.partitions_received;
        self.stats.actors_retired += stats.actors_retired;
        self.stats.forwarded += stats.forwarded;
        self.stats.hints_stored += stats.hints.stored;
        self.stats.hints_refused += stats.hints.refused;
        self.stats.hints_handed_off += stats.hints.handed_off;
        self.stats.hints_expired += stats.hints.expired;
        self.stats.hints_recovered += stats.hints.recovered;
        self.stats.ae_keys_pushed += stats.anti_entropy.keys_pushed;
    }

    fn client_wake(&mut self, client: usize) {
        if self.phase != Phase::Safety {
            return;
        }
        let key = format!("k{}", self.dice.index(self.settings.keys)).into_bytes();
        let quorum = self.settings.quorums[self.dice.index(self.settings.quorums.len())];
        self.next_op += 1;
        let op = self.next_op;
        if self.dice.chance(400) {
            self.issue_get(Some(client), op, key, quorum);
        } else {
            self.issue_put(client, op, key, quorum);
        }
        let timeout = Duration::from_millis(self.settings.client_timeout_ms);
        self.schedule(timeout, Event::ClientGiveUp { client, op });
    }

    fn issue_get(&mut self, client: Option<usize>, op: u64, key: Vec<u8>, quorum: Quorum) {
        let live: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| n.node.is_some())
            .map(|n| n.id)
            .collect();
        let waiting = Waiting::Get {
            client,
            key: key.clone(),
            quorum,
            start: self.now,
        };
        if live.is_empty() {
            self.close(op, waiting, None);
            if let Some(client) = client {
                self.schedule_wake(client);
            }
            return;
        }
        let at = live[self.dice.index(live.len())];
        self.waiting.insert(op, waiting);
        let now = self.now;
        let shard = self.shard_of(at, self.ring.partition_of(&key));
        let request = GetRequest {
            key,
            quorum: Some(quorum),
            strict: self.dice.chance(self.settings.strict_per_mille),
        };
        self.live_node(at, shard)
            .expect("chosen among live nodes")
            .handle_get(now, ClientToken(op), request);
        self.drain(at, shard);
    }

    fn issue_put(&mut self, client: usize, op: u64, key: Vec<u8>, quorum: Quorum) {
        let roll = self.dice.index(1000) as u32;
        let (set, delete_if_present) = (
            self.settings.set_per_mille,
            self.settings.delete_if_present_per_mille,
        );
        if roll < set + delete_if_present {
            // Redis SET or DEL: the node reads a quorum and supersedes what it found.
            let delete = roll >= set;
            self.submit_put(client, op, key, quorum, Supersedes::QuorumHeld, delete);
            return;
        }
        let known = self.clients[client].contexts.remove(&key);
        let blind = self.dice.chance(self.settings.blind_put_per_mille);
        let context = if blind { None } else { known };
        let delete = context.is_some() && self.dice.chance(self.settings.delete_per_mille);
        let supersedes = context.map_or(Supersedes::Nothing, Supersedes::Context);
        self.submit_put(client, op, key, quorum, supersedes, delete);
    }

    /// Sends one put (a delete when `delete`) through a random node, which forwards it
    /// when it holds no replica of the key, as a server does.
    fn submit_put(
        &mut self,
        client: usize,
        op: u64,
        key: Vec<u8>,
        quorum: Quorum,
        supersedes: Supersedes,
        delete: bool,
    ) {
        let value = (!delete).then(|| format!("c{client}-op{op}").into_bytes());
        let coordinator = self.nodes[self.dice.index(self.nodes.len())].id;
        let quorum_held = supersedes == Supersedes::QuorumHeld;
        let decoded = match &supersedes {
            Supersedes::Context(bytes) => {
                ringkv_cluster::Context::decode(bytes)
                    .expect("contexts come from gets")
                    .0
            }
            Supersedes::QuorumHeld | Supersedes::Nothing => Default::default(),
        };
        self.history.puts.push(PutRecord {
            op,
            client,
            key: key.clone(),
            value: value.clone(),
            context: decoded,
            context_known: !quorum_held,
            quorum_held,
            quorum,
            strict: self.dice.chance(self.settings.strict_per_mille),
            stand_ins: 0,
            coordinator,
            start: self.now,
            end: None,
            outcome: PutResult::Pending,
        });
        let waiting = Waiting::Put {
            client,
            index: self.history.puts.len() - 1,
        };
        if self.sim_node(coordinator).node.is_none() {
            // Connection refused: the client learns at once, nothing was written.
            self.close(op, waiting, None);
            self.schedule_wake(client);
            return;
        }
        self.waiting.insert(op, waiting);
        let request = PutRequest {
            key,
            value,
            supersedes,
            quorum: Some(quorum),
            mode: ringkv_cluster::ConflictMode::Causal,
            only_if_present: quorum_held && delete,
            strict: self.history.puts.last().expect("pushed above").strict,
        };
        let now = self.now;
        let wall_ms = self.wall_clock_ms(coordinator);
        let shard = self.shard_of(coordinator, self.ring.partition_of(&request.key));
        self.live_node(coordinator, shard)
            .expect("checked live above")
            .handle_put(now, wall_ms, ClientToken(op), request);
        self.drain(coordinator, shard);
    }

    fn reply(&mut self, client: ClientToken, reply: ClientReply) {
        let op = client.0;
        self.hasher
            .update(format!("reply {op} {reply:?}\n").as_bytes());
        let Some(waiting) = self.waiting.remove(&op) else {
            // The client gave up before this arrived.
            self.stats.late_replies += 1;
            return;
        };
        let client = match &waiting {
            Waiting::Put { client, .. } => Some(*client),
            Waiting::Get { client, .. } => *client,
        };
        self.close(op, waiting, Some(reply));
        if let Some(client) = client {
            self.schedule_wake(client);
        }
    }

    /// Records how an operation ended (`None`: no reply).
    fn close(&mut self, op: u64, waiting: Waiting, reply: Option<ClientReply>) {
        match waiting {
            Waiting::Put { index, .. } => {
                let record = &mut self.history.puts[index];
                record.end = Some(self.now);
                record.outcome = match reply {
                    Some(ClientReply::Put(Ok(PutOutcome::Written(written)))) => {
                        self.stats.puts_acked += 1;
                        record.stand_ins = written.stand_ins;
                        if written.stand_ins > 0 {
                            self.stats.puts_acked_with_stand_ins += 1;
                        }
                        if record.quorum_held {
                            self.stats.quorum_held_puts_acked += 1;
                            record.context = written.superseded;
                            record.context_known = true;
                        }
                        PutResult::Acked(written.dot)
                    }
                    Some(ClientReply::Put(Ok(PutOutcome::NothingToDelete))) => {
                        self.stats.nothing_to_delete += 1;
                        PutResult::NothingToDelete
                    }
                    Some(other) => {
                        self.stats.puts_not_acked += 1;
                        if matches!(
                            other,
                            ClientReply::Put(Err(ClientError::TooManySiblings { .. }
                                | ClientError::ValuesTooLarge { .. }
                                | ClientError::VersionsTooLarge { .. }
                                | ClientError::RefusedByReplicas { .. }))
                        ) {
                            self.stats.puts_refused_for_limits += 1;
                        }
                        PutResult::NotAcked(format!("{other:?}"))
                    }
                    None => {
                        self.stats.puts_not_acked += 1;
                        PutResult::NotAcked("no reply".to_string())
                    }
                };
            }
            Waiting::Get {
                client,
                key,
                quorum,
                start,
            } => match reply {
                Some(ClientReply::Get(Ok(outcome))) => {
                    self.stats.gets_ok += 1;
                    if let Some(client) = client {
                        self.clients[client]
                            .contexts
                            .insert(key.clone(), outcome.context.encode());
                    }
                    self.history.gets.push(GetRecord {
                        op,
                        key,
                        quorum,
                        start,
                        end: self.now,
                        context: outcome.context.0.clone(),
                        versions: outcome.versions,
                        stand_ins: outcome.stand_ins,
                    });
                }
                _ => {
                    self.stats.gets_failed += 1;
                    self.history.failed_gets += 1;
                    if client.is_none() {
                        self.violations.push(Violation {
                            checker: Checker::Convergence,
                            detail: format!(
                                "repair read of {:?} failed after healing: {reply:?}",
                                String::from_utf8_lossy(&key)
                            ),
                        });
                    }
                }
            },
        }
    }

    fn schedule_wake(&mut self, client: usize) {
        // At least 1 ms: a request that fails at once (coordinator down, Unavailable)
        // must not let a client spin forever at one instant of simulated time.
        let think = self.dice.between(1, self.settings.think_max_ms.max(1));
        self.schedule(Duration::from_millis(think), Event::ClientWake { client });
    }

    /// One read at R = N per key, so read repair brings every replica up to date; the
    /// resolver client keeps the contexts.
    fn repair_every_key(&mut self, resolver: Option<usize>) {
        let quorum = Quorum::new(self.n, self.n, 1).expect("1 <= N");
        for k in 0..self.settings.keys {
            let key = format!("k{k}").into_bytes();
            self.next_op += 1;
            let op = self.next_op;
            self.issue_get(resolver, op, key, quorum);
        }
    }

    /// The client that resolves siblings after healing: one past the working clients,
    /// never woken by the safety phase.
    fn resolver(&self) -> usize {
        self.clients.len() - 1
    }

    /// A write at W = N with the context of the resolver's read, per key it read.
    fn resolve_every_key(&mut self) {
        let quorum = Quorum::new(self.n, 1, self.n).expect("1 <= N");
        let resolver = self.resolver();
        for k in 0..self.settings.keys {
            let key = format!("k{k}").into_bytes();
            let Some(context) = self.clients[resolver].contexts.remove(&key) else {
                continue;
            };
            self.next_op += 1;
            let op = self.next_op;
            self.stats.resolving_puts += 1;
            self.submit_put(
                resolver,
                op,
                key,
                quorum,
                Supersedes::Context(context),
                false,
            );
        }
    }

    fn check_final_state(&mut self) {
        let mut all_stats = Vec::new();
        self.check_views_converged();
        self.check_partitions_dropped();
        for sim in &self.nodes {
            let never_started = sim.stored_view.is_none();
            if sim.retired || never_started {
                continue;
            }
            let Some(shards) = &sim.node else {
                self.violations.push(Violation {
                    checker: Checker::Convergence,
                    detail: format!("{:?} is down after healing", sim.id),
                });
                continue;
            };
            let open: usize = shards.iter().map(Node::open_work).sum();
            if open != 0 || sim.disk.pending_writes() != 0 {
                self.violations.push(Violation {
                    checker: Checker::Convergence,
                    detail: format!(
                        "{:?} still has {open} open requests/keys and {} unsynced writes",
                        sim.id,
                        sim.disk.pending_writes()
                    ),
                });
            }
            all_stats.extend(shards.iter().map(Node::stats));
        }
        for stats in all_stats {
            for (reason, count) in &stats.drops {
                *self.stats.drops.entry(format!("{reason:?}")).or_default() += count;
            }
            self.stats.repairs += stats.repairs_sent;
            self.count_node_stats(&stats);
        }
        for k in 0..self.settings.keys {
            let key = format!("k{k}").into_bytes();
            let replicas = self.converging_sets(&key);
            checker::check_converged(&key, &replicas, &mut self.violations);
        }
        // In tight-limit runs the resolver's writes superseded everything; the keys'
        // sets were checked before it wrote (see `run`).
        if !self.settings.tight_limits() {
            self.check_final_keys(false);
        }
    }

    /// Once the world is quiet, no live node keeps home records of a partition it
    /// does not replicate on the final ring: what moved away was dropped.
    fn check_partitions_dropped(&mut self) {
        let ring = self.final_ring().clone();
        let mut problems = Vec::new();
        for sim in self.nodes.iter().filter(|n| n.node.is_some()) {
            let kept: BTreeSet<PartitionId> = (sim.disk.home_digests().into_iter())
                .map(|(p, _, _)| p)
                .filter(|&p| !ring.preference_list(p, self.n).contains(&sim.id))
                .collect();
            if !kept.is_empty() {
                problems.push(format!("{:?} still holds {kept:?}", sim.id));
            }
        }
        for detail in problems {
            self.violations.push(Violation {
                checker: Checker::Convergence,
                detail: format!("partitions not dropped after moving away: {detail}"),
            });
        }
    }

    /// Invariant 5: once the world is quiet, every live node holds the same view, with
    /// no change left in progress, and the run's change (if any) happened.
    fn check_views_converged(&mut self) {
        let views: Vec<(NodeId, &RingView)> = (self.nodes.iter())
            .filter_map(|n| Some((n.id, n.keeper.as_ref()?.view())))
            .collect();
        let mut problems = Vec::new();
        if let Some((first, view)) = views.first() {
            if !view.is_stable() {
                problems.push(format!("{first:?} still moves to epoch {}", view.epoch()));
            }
            for (id, other) in &views[1..] {
                if other != view {
                    problems.push(format!(
                        "{id:?} holds epoch {} (stable: {}), {first:?} epoch {}",
                        other.epoch(),
                        other.is_stable(),
                        view.epoch()
                    ));
                }
            }
            if self.settings.membership.is_some() && view.epoch() == 0 {
                problems.push("the membership change never happened".into());
            }
            self.stats.final_ring_epoch = view.epoch();
        }
        for detail in problems {
            self.violations.push(Violation {
                checker: Checker::Convergence,
                detail: format!("ring views: {detail}"),
            });
        }
    }

    /// Once faults stop and the world quiesces, handoff is complete: no node holds a
    /// hint (bar ones a target refused for its store's limits), and every acknowledged
    /// write is on the key's home replicas, before any read repairs a thing. (Sloppy
    /// quorum's invariant: a write acknowledged by stand-ins reaches home by handoff.)
    fn check_handoff_complete(&mut self) {
        let mut parked = 0;
        for sim in &self.nodes {
            for shard in sim.node.iter().flatten() {
                parked += shard.hints_parked();
                let pending: u64 = shard.hints_pending().iter().map(|p| p.keys).sum();
                if pending as usize > shard.hints_parked() {
                    self.violations.push(Violation {
                        checker: Checker::Handoff,
                        detail: format!(
                            "{:?} still holds {pending} hints after healing: {:?}",
                            sim.id,
                            shard.hints_pending()
                        ),
                    });
                }
            }
        }
        self.stats.hints_parked = parked as u64;
        if parked == 0 && !self.settings.tight_limits() {
            self.check_hints_reached_their_targets();
        }
        if parked == 0 && !self.settings.tight_limits() {
            let before = self.violations.len();
            self.check_final_keys(false);
            for violation in &mut self.violations[before..] {
                violation.checker = Checker::Handoff;
            }
        }
    }

    /// Every version a stand-in held durably as a hint is at its target now, or
    /// superseded there by something that saw it (the target's set covers its dot):
    /// hints leave only after their target has them. Hints held by or for the node
    /// whose storage may lose data are exempt.
    fn check_hints_reached_their_targets(&mut self) {
        let victim = self.settings.loss_victim.map(NodeId);
        let mut checked = 0;
        for hint in &self.hinted {
            if victim == Some(hint.holder) || victim == Some(hint.target) {
                continue;
            }
            // A target that no longer holds the key (a membership change moved it)
            // has its hints handed to the key's replicas instead.
            let replicas = self.final_ring().preference_list_for_key(&hint.key, self.n);
            let holders = if replicas.contains(&hint.target) {
                vec![hint.target]
            } else {
                replicas
            };
            let home = holders.iter().fold(VersionSet::new(), |acc, &holder| {
                match self.sim_node(holder).disk.durable_home(&hint.key) {
                    Some(stored) => {
                        acc.sync(&stored.decode().expect("the simulator stores valid sets"))
                    }
                    None => acc,
                }
            });
            let covered = home.context();
            // A hint on a node that died for good, or already handed to one, died
            // with it.
            let died_with = |dot: &ringkv_cluster::Dot| {
                (self.retired_held.iter()).any(|(node, key, held)| {
                    (*node == hint.target || *node == hint.holder)
                        && *key == hint.key
                        && held.contains(*dot)
                })
            };
            for dot in &hint.dots {
                checked += 1;
                if !covered.contains(*dot) && !died_with(dot) {
                    self.violations.push(Violation {
                        checker: Checker::Handoff,
                        detail: format!(
                            "{:?} held {dot:?} of {:?} as a hint for {:?}, which never got it",
                            hint.holder,
                            String::from_utf8_lossy(&hint.key),
                            hint.target
                        ),
                    });
                }
            }
        }
        self.stats.hinted_versions_checked = checked;
    }

    /// Checks 2 and 4 on the union of every replica's durable set of each key.
    /// `with_hints`: count what stand-ins still hold as hints too.
    fn check_final_keys(&mut self, with_hints: bool) {
        let replicas = self.replicas_of_keys();
        for k in 0..self.settings.keys {
            let key = format!("k{k}").into_bytes();
            let mut merged = self
                .stored_sets(&key)
                .iter()
                .fold(VersionSet::new(), |acc, (_, set)| acc.sync(set));
            if with_hints {
                for sim in &self.nodes {
                    for stored in sim.disk.durable_hints(&key) {
                        let set = stored.decode().expect("the simulator stores valid sets");
                        merged = merged.sync(&set);
                    }
                }
            }
            checker::check_final_key(
                &key,
                &merged,
                &self.history,
                &replicas,
                &mut self.violations,
            );
        }
    }

    /// Every live shard starts an anti-entropy exchange (stale trees rebuilt first,
    /// as the server does).
    fn tick_anti_entropy(&mut self) {
        let now = self.now;
        for id in self.nodes.iter().map(|n| n.id).collect::<Vec<_>>() {
            self.rebuild_stale_trees(id);
            for shard in 0..self.sim_node(id).shards.shards() {
                if let Some(node) = self.live_node(id, shard) {
                    node.tick_anti_entropy(now);
                }
                self.drain(id, shard);
            }
        }
    }

    /// Every live shard's tombstone sweeps, with its node's wall clock.
    fn tick_tombstones(&mut self) {
        let now = self.now;
        for id in self.nodes.iter().map(|n| n.id).collect::<Vec<_>>() {
            let wall_ms = self.wall_clock_ms(id);
            for shard in 0..self.sim_node(id).shards.shards() {
                if let Some(node) = self.live_node(id, shard) {
                    node.tick_tombstones(now, wall_ms);
                }
                self.drain(id, shard);
            }
        }
    }

    /// Each replica's durable set of `key`, for judging convergence: with tombstone
    /// collection on, a set of tombstones only counts as nothing (both read as
    /// deleted, and which of the two a replica holds depends on whether it collected
    /// yet).
    fn converging_sets(&self, key: &[u8]) -> Vec<(NodeId, VersionSet)> {
        let collecting = self.settings.tombstone_grace_ms.is_some();
        (self.stored_sets(key).into_iter())
            .map(|(id, set)| {
                let deleted = set.siblings().all(|v| v.value.is_tombstone());
                match collecting && deleted {
                    true => (id, VersionSet::new()),
                    false => (id, set),
                }
            })
            .collect()
    }

    /// The ring the run ended with: the live nodes' (the checks hold them to one).
    fn final_ring(&self) -> &Ring {
        self.nodes
            .iter()
            .find_map(|n| n.keeper.as_ref().map(|k| k.view().ring()))
            .unwrap_or(&self.ring)
    }

    /// Each replica's durable set of `key`, on its replicas of the final ring.
    fn stored_sets(&self, key: &[u8]) -> Vec<(NodeId, VersionSet)> {
        self.final_ring()
            .preference_list_for_key(key, self.n)
            .into_iter()
            .map(|id| {
                let set = match self.sim_node(id).disk.durable_home(key) {
                    Some(stored) => stored.decode().expect("the simulator stores valid sets"),
                    None => VersionSet::new(),
                };
                (id, set)
            })
            .collect()
    }

    fn replicas_of_keys(&self) -> checker::Replicas {
        (0..self.settings.keys)
            .map(|k| {
                let key = format!("k{k}").into_bytes();
                // Both rings' replicas: a loss on either may have taken a copy.
                let mut nodes = self.ring.preference_list_for_key(&key, self.n);
                for node in self.final_ring().preference_list_for_key(&key, self.n) {
                    if !nodes.contains(&node) {
                        nodes.push(node);
                    }
                }
                (key, nodes)
            })
            .collect()
    }

    fn sim_node(&self, id: NodeId) -> &SimNode {
        &self.nodes[id.0 as usize - 1]
    }

    fn sim_node_mut(&mut self, id: NodeId) -> &mut SimNode {
        &mut self.nodes[id.0 as usize - 1]
    }

    fn live_node(&mut self, id: NodeId, shard: usize) -> Option<&mut Node> {
        // A shard a peer names that this node does not have: dropped, as the server
        // drops a message for an out-of-range shard.
        self.sim_node_mut(id).node.as_mut()?.get_mut(shard)
    }

    fn is_current(&self, id: NodeId, incarnation: u32) -> bool {
        let sim = self.sim_node(id);
        sim.node.is_some() && sim.incarnation == incarnation
    }
}

/// Decodes one peer frame exactly as a server's peer connection does (`PeerInput`:
/// from a 16-byte-aligned buffer, in place).
fn decode_as_received(frame: &[u8]) -> Result<PeerMessage, PeerWireError> {
    match PeerInput::new(frame).next_message()? {
        Some(Incoming::Message { message, .. }) => Ok(message),
        Some(Incoming::Gossip(_) | Incoming::Ring(..)) => {
            Err(PeerWireError::Archive("not a replication message".into()))
        }
        None => Err(PeerWireError::Archive("an incomplete frame".into())),
    }
}
