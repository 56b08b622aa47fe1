//! Who is in the cluster and who is alive: push-pull gossip of a membership digest
//! (Dynamo §4.8, Cassandra's gossiper) with a phi-accrual detector per peer
//! ([`crate::phi`]). A sans-IO state machine like [`crate::Node`]: the driver calls
//! [`Membership::tick`] every heartbeat interval and [`Membership::handle`] for every
//! gossip message, then drains [`Membership::poll_send`] and
//! [`Membership::poll_event`]. One per node, shared by its shards.
//!
//! Two kinds of traffic. Every heartbeat interval (200 ms) a node sends each member it
//! knows a tiny heartbeat, so the detector sees arrivals often enough to suspect a
//! silent node within about 2 s without suspecting one whose heartbeats are merely
//! late. Every gossip interval (1 s) it pushes its whole view to a few random peers;
//! that is how members, addresses, status and ring epochs spread. (All-to-all
//! heartbeats grow as n² messages: right for the clusters ringkv runs, to revisit with
//! heartbeats to ring neighbours only for hundreds of nodes.)
//!
//! Each member gossips its own state: an incarnation (bumped at every start, so a new
//! life beats an old one), a heartbeat counted up every round, its self-declared status
//! (joining, up, leaving), its addresses and the ring epoch it holds. A state with a
//! higher (incarnation, heartbeat) replaces an older one, wherever it came from, so
//! news spreads epidemically: every round each node pushes its view to a few random
//! peers, which merge it and answer with what they know better (push-pull).
//!
//! "Down" is never gossiped: each node judges it from the heartbeats it sees arrive
//! (a rising heartbeat, from the member or from anyone relaying it), and it is only a
//! routing decision. A member is never removed for being down.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use crate::clock::EpochSource;
use crate::phi::{PhiConfig, PhiDetector};
use crate::ring::NodeId;

/// The most members a gossip message may carry.
const MEMBERS_MAX: usize = 4096;

/// Settings of a node's membership.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MembershipConfig {
    /// How often the driver calls `tick`: each tick sends every member a heartbeat.
    pub heartbeat_interval: Duration,
    /// How often a tick also pushes this node's view to `fanout` random peers.
    pub gossip_interval: Duration,
    /// Peers pushed to per round (Cassandra: up to 3).
    pub fanout: usize,
    /// Whether gossip may add members this node was not told of. Off for a static
    /// member list, so a confused or hostile peer cannot grow the view (and the
    /// heartbeats and digests that go with it) without end.
    pub learn_members: bool,
    /// Members each tick's heartbeat goes to, chosen at random each tick (default:
    /// all). Fewer keeps very large clusters' heartbeat traffic in check, at the cost
    /// of slower suspicion: a node then mostly hears of others through gossip.
    pub heartbeat_fanout: usize,
    pub phi: PhiConfig,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            heartbeat_interval: Duration::from_millis(200),
            gossip_interval: Duration::from_secs(1),
            fanout: 3,
            learn_members: true,
            heartbeat_fanout: usize::MAX,
            phi: PhiConfig::default(),
        }
    }
}

/// A member's own declaration of where it stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemberStatus {
    Joining,
    Up,
    Leaving,
}

/// How to reach a member: its native and Redis addresses; shard i listens on each
/// port + 1 + i.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemberAddress {
    pub native: String,
    pub resp: String,
    pub shards: u16,
}

/// What a member says about itself, as gossip carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberState {
    pub node: NodeId,
    pub incarnation: u64,
    pub heartbeat: u64,
    pub status: MemberStatus,
    pub address: MemberAddress,
    pub ring_epoch: u64,
}

impl Known {
    /// Evidence that the member was alive at `version`, arriving at `now`: the
    /// detector counts it if it is news. True if the member was taken for down.
    fn alive(&mut self, now: Duration, version: (u64, u64), phi: &PhiConfig) -> bool {
        if version <= self.heard {
            return false;
        }
        if version.0 > self.heard.0 || self.down {
            // A new life, or the first word after a silence: the gaps start over, so
            // one long silence does not teach the detector to wait that long again.
            self.detector = PhiDetector::new(phi);
        }
        self.heard = version;
        self.detector.heartbeat(now, phi);
        std::mem::replace(&mut self.down, false)
    }
}

impl MemberState {
    /// Which of two states of one member is newer.
    fn version(&self) -> (u64, u64) {
        (self.incarnation, self.heartbeat)
    }
}

/// One gossip exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GossipMessage {
    /// Push: the sender's whole view.
    Syn { members: Vec<MemberState> },
    /// Pull: what the receiver of a `Syn` knows better than its sender did.
    Ack { members: Vec<MemberState> },
    /// The sender is alive at this (incarnation, heartbeat).
    Heartbeat { incarnation: u64, heartbeat: u64 },
}

/// A change in what this node believes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A member this node had not known of.
    Joined(NodeId),
    /// A member's heartbeats stopped long enough (phi at the threshold): route around it.
    Down(NodeId),
    /// A member taken for down sent a heartbeat again.
    Up(NodeId),
}

/// One member as this node sees it, for status reports.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberView {
    pub state: MemberState,
    pub phi: f64,
    pub down: bool,
}

#[derive(Clone, Debug)]
struct Known {
    /// The member's state as gossip last brought it.
    state: MemberState,
    /// The newest (incarnation, heartbeat) seen by any path, heartbeats included:
    /// evidence of life for the detector, kept apart from `state` so a direct
    /// heartbeat never makes the gossiped state that carries news look stale.
    heard: (u64, u64),
    detector: PhiDetector,
    down: bool,
}

/// A node's membership: its own state, everything it heard about the others, and a
/// detector per peer.
#[derive(Debug)]
pub struct Membership {
    config: MembershipConfig,
    me: NodeId,
    members: BTreeMap<NodeId, Known>,
    /// Chooses peers; the driver seeds it (this crate draws no randomness of its own).
    random: EpochSource,
    sends: VecDeque<(NodeId, GossipMessage)>,
    events: VecDeque<MembershipEvent>,
    /// When the next tick also gossips.
    next_gossip: Duration,
    /// When the last tick ran: a much longer gap means this node itself stalled.
    last_tick: Option<Duration>,
    /// The members of the node's ring view, once the driver said
    /// ([`Membership::restrict_to`]): no other node is kept or learned.
    ring_members: Option<BTreeSet<NodeId>>,
}

impl Membership {
    /// A node starting at `now` with its own state and the members it knows of
    /// beforehand (the seeds, or a static member list: heartbeat 0, never heard from).
    /// Their silence counts from `now`: a member that never speaks is suspected like
    /// one that stopped.
    pub fn new(
        config: MembershipConfig,
        me: MemberState,
        known: impl IntoIterator<Item = MemberState>,
        random_seed: u64,
        now: Duration,
    ) -> Membership {
        let mut members = BTreeMap::new();
        let node = me.node;
        for state in known.into_iter().filter(|s| s.node != node) {
            let mut detector = PhiDetector::new(&config.phi);
            detector.heartbeat(now, &config.phi);
            members.insert(
                state.node,
                Known {
                    heard: state.version(),
                    state,
                    detector,
                    down: false,
                },
            );
        }
        let detector = PhiDetector::new(&config.phi);
        members.insert(
            node,
            Known {
                heard: me.version(),
                state: me,
                detector,
                down: false,
            },
        );
        Membership {
            config,
            me: node,
            members,
            random: EpochSource::new(random_seed),
            sends: VecDeque::new(),
            events: VecDeque::new(),
            next_gossip: Duration::ZERO,
            last_tick: None,
            ring_members: None,
        }
    }

    /// Keeps only the members of the ring view (`members`, either ring of a change)
    /// and this node, from now on: a node that left the ring (or was replaced) is
    /// forgotten, so no heartbeat goes to it, status stops listing it as down, and
    /// gossip that still carries it does not bring it back. A node the ring names
    /// again is learned again from gossip. The driver calls this on every new view.
    pub fn restrict_to(&mut self, members: BTreeSet<NodeId>) {
        let me = self.me;
        self.members
            .retain(|node, _| *node == me || members.contains(node));
        self.ring_members = Some(members);
    }

    /// Whether gossip may add `node` (a member not known yet).
    fn may_learn(&self, node: NodeId) -> bool {
        self.config.learn_members
            && self
                .ring_members
                .as_ref()
                .is_none_or(|members| members.contains(&node))
    }

    pub fn me(&self) -> &MemberState {
        &self.members[&self.me].state
    }

    /// Changes this node's own declaration (joining, up, leaving; the ring it holds).
    pub fn set_own(&mut self, status: MemberStatus, ring_epoch: u64) {
        let me = &mut self.members.get_mut(&self.me).expect("always known").state;
        me.status = status;
        me.ring_epoch = ring_epoch;
    }

    /// One heartbeat interval at `now`: a heartbeat to every member, a push to
    /// `fanout` random peers once per gossip interval, and a look at every peer's phi.
    pub fn tick(&mut self, now: Duration) {
        // A node that was itself stalled (paused, starved of CPU) heard nobody in the
        // meantime; the silence is its own. The heartbeats that arrived are still
        // unread, so judging now would suspect everyone.
        let stalled = self
            .last_tick
            .is_some_and(|last| now.saturating_sub(last) > self.config.heartbeat_interval * 3);
        self.last_tick = Some(now);
        if stalled {
            for known in self.members.values_mut() {
                known.detector.rebase(now);
            }
        }
        let me = &mut self.members.get_mut(&self.me).expect("always known").state;
        me.heartbeat += 1;
        let beat = GossipMessage::Heartbeat {
            incarnation: me.incarnation,
            heartbeat: me.heartbeat,
        };
        let mut peers: Vec<NodeId> = self
            .members
            .keys()
            .copied()
            .filter(|&n| n != self.me)
            .collect();
        if self.config.heartbeat_fanout >= peers.len() {
            for &peer in &peers {
                self.sends.push_back((peer, beat.clone()));
            }
        } else {
            for _ in 0..self.config.heartbeat_fanout {
                let pick = (self.random.next_epoch() % peers.len() as u64) as usize;
                self.sends.push_back((peers[pick], beat.clone()));
            }
        }
        if now >= self.next_gossip {
            self.next_gossip = now + self.config.gossip_interval;
            self.gossip(&mut peers);
        }
        if !stalled {
            self.judge(now);
        }
    }

    /// Pushes this node's view to `fanout` random members of `peers`.
    fn gossip(&mut self, peers: &mut Vec<NodeId>) {
        for _ in 0..self.config.fanout.min(peers.len()) {
            let pick = (self.random.next_epoch() % peers.len() as u64) as usize;
            let peer = peers.swap_remove(pick);
            let members = self.digest();
            self.sends.push_back((peer, GossipMessage::Syn { members }));
        }
    }

    /// A gossip message from `from`.
    pub fn handle(&mut self, now: Duration, from: NodeId, message: GossipMessage) {
        match message {
            GossipMessage::Syn { members } if members.len() <= MEMBERS_MAX => {
                let newer = self.newer_than(&members);
                self.merge(now, members);
                self.sends
                    .push_back((from, GossipMessage::Ack { members: newer }));
            }
            GossipMessage::Ack { members } if members.len() <= MEMBERS_MAX => {
                self.merge(now, members)
            }
            // More members than any cluster has: not from a sane peer.
            GossipMessage::Syn { .. } | GossipMessage::Ack { .. } => {}
            GossipMessage::Heartbeat {
                incarnation,
                heartbeat,
            } => self.heard(now, from, incarnation, heartbeat),
        }
    }

    /// A heartbeat straight from `from`: a member this node knows (one it does not
    /// know yet is learned, with its addresses, from gossip).
    fn heard(&mut self, now: Duration, from: NodeId, incarnation: u64, heartbeat: u64) {
        let phi = self.config.phi;
        let Some(known) = self.members.get_mut(&from).filter(|_| from != self.me) else {
            return;
        };
        if known.alive(now, (incarnation, heartbeat), &phi) {
            self.events.push_back(MembershipEvent::Up(from));
        }
    }

    /// Re-judges every peer at `now` (also done by every tick).
    pub fn judge(&mut self, now: Duration) {
        let phi = self.config.phi;
        for (&node, known) in self.members.iter_mut() {
            if node == self.me {
                continue;
            }
            let suspected = known.detector.phi(now, &phi) >= phi.threshold;
            if suspected && !known.down {
                known.down = true;
                self.events.push_back(MembershipEvent::Down(node));
            }
        }
    }

    pub fn poll_send(&mut self) -> Option<(NodeId, GossipMessage)> {
        self.sends.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<MembershipEvent> {
        self.events.pop_front()
    }

    /// What gossip last said about `node`, if this node knows of it.
    pub fn member(&self, node: NodeId) -> Option<&MemberState> {
        self.members.get(&node).map(|k| &k.state)
    }

    /// Members this node knows of, itself included.
    pub fn known(&self) -> usize {
        self.members.len()
    }

    /// Every member this node takes for down now.
    pub fn suspected(&self) -> Vec<NodeId> {
        self.members
            .iter()
            .filter(|(_, k)| k.down)
            .map(|(&node, _)| node)
            .collect()
    }

    /// Whether this node takes `node` for down now.
    pub fn is_down(&self, node: NodeId) -> bool {
        self.members.get(&node).is_some_and(|k| k.down)
    }

    /// Every member as this node sees it at `now`, ordered by id.
    pub fn view(&self, now: Duration) -> Vec<MemberView> {
        self.members
            .iter()
            .map(|(&node, known)| MemberView {
                state: known.state.clone(),
                phi: if node == self.me {
                    0.0
                } else {
                    known.detector.phi(now, &self.config.phi)
                },
                down: known.down,
            })
            .collect()
    }

    /// What this node knows, to push.
    fn digest(&self) -> Vec<MemberState> {
        self.members.values().map(|k| k.state.clone()).collect()
    }

    /// The states this node knows better than `theirs` says, or that `theirs` lacks.
    fn newer_than(&self, theirs: &[MemberState]) -> Vec<MemberState> {
        let their_version: BTreeMap<NodeId, (u64, u64)> =
            theirs.iter().map(|s| (s.node, s.version())).collect();
        self.members
            .values()
            .filter(|k| {
                their_version
                    .get(&k.state.node)
                    .is_none_or(|&v| k.state.version() > v)
            })
            .map(|k| k.state.clone())
            .collect()
    }

    fn merge(&mut self, now: Duration, incoming: Vec<MemberState>) {
        let phi = self.config.phi;
        for state in incoming {
            if state.node == self.me {
                // Only this node speaks for itself. A state of it from a later life
                // than its own (a clock set back across a restart) must not win: this
                // life moves past it.
                let me = &mut self.members.get_mut(&self.me).expect("always known").state;
                if state.version() > me.version() {
                    me.incarnation = state.incarnation.saturating_add(1);
                    me.heartbeat = 0;
                }
                continue;
            }
            let learnable = self.may_learn(state.node);
            match self.members.get_mut(&state.node) {
                None if !learnable => {}
                None => {
                    let mut detector = PhiDetector::new(&phi);
                    detector.heartbeat(now, &phi);
                    let node = state.node;
                    self.members.insert(
                        node,
                        Known {
                            heard: state.version(),
                            state,
                            detector,
                            down: false,
                        },
                    );
                    self.events.push_back(MembershipEvent::Joined(node));
                }
                Some(known) if state.version() > known.state.version() => {
                    let (node, version) = (state.node, state.version());
                    known.state = state;
                    if known.alive(now, version, &phi) {
                        self.events.push_back(MembershipEvent::Up(node));
                    }
                }
                Some(_) => {}
            }
        }
    }
}
