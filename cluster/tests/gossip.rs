//! Gossip membership and phi-accrual detection across many simulated nodes: how many
//! rounds news takes to reach everyone, how fast a silent node is suspected, and how
//! often a live one is wrongly suspected when messages are lost. Deterministic: every
//! random choice comes from a seeded generator, so each number printed replays.

use std::collections::BTreeMap;
use std::time::Duration;

use ringkv_cluster::{
    EpochSource, MemberAddress, MemberState, MemberStatus, Membership, MembershipConfig,
    MembershipEvent, NodeId,
};

fn state(node: u32) -> MemberState {
    MemberState {
        node: NodeId(node),
        incarnation: 1,
        heartbeat: 0,
        status: MemberStatus::Up,
        address: MemberAddress {
            native: format!("10.0.0.{node}:7500"),
            resp: format!("10.0.0.{node}:7379"),
            shards: 2,
        },
        ring_epoch: 1,
    }
}

/// Nodes 1..=n, each knowing `known(i)` beforehand, exchanging gossip through a
/// network that loses `loss_per_mille` of messages and delays ticks by up to `jitter`.
struct Cluster {
    nodes: BTreeMap<NodeId, Membership>,
    /// Nodes that neither tick nor receive (a paused process).
    paused: Vec<NodeId>,
    dice: EpochSource,
    loss_per_mille: u64,
    jitter_ms: u64,
    events: Vec<(Duration, NodeId, MembershipEvent)>,
}

impl Cluster {
    fn new(n: u32, known: impl Fn(u32) -> Vec<u32>, config: MembershipConfig, seed: u64) -> Self {
        let nodes = (1..=n)
            .map(|i| {
                let known = known(i).into_iter().map(state);
                let membership =
                    Membership::new(config, state(i), known, seed ^ u64::from(i), Duration::ZERO);
                (NodeId(i), membership)
            })
            .collect();
        Cluster {
            nodes,
            paused: Vec::new(),
            dice: EpochSource::new(seed),
            loss_per_mille: 0,
            jitter_ms: 0,
            events: Vec::new(),
        }
    }

    /// One heartbeat interval starting at `start`: every live node ticks (late by up
    /// to the jitter), and every message sent is delivered, or lost.
    fn round(&mut self, start: Duration) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            if self.paused.contains(&id) {
                continue;
            }
            let late = Duration::from_millis(self.dice.next_epoch() % (self.jitter_ms + 1));
            let now = start + late;
            self.nodes.get_mut(&id).unwrap().tick(now);
            self.deliver(id, now);
        }
    }

    /// Carries every message `from` has to send, and the answers they cause.
    fn deliver(&mut self, from: NodeId, now: Duration) {
        let mut queue: Vec<(NodeId, NodeId, ringkv_cluster::GossipMessage)> = Vec::new();
        while let Some((to, message)) = self.nodes.get_mut(&from).unwrap().poll_send() {
            queue.push((from, to, message));
        }
        while let Some((sender, to, message)) = queue.pop() {
            self.collect_events(sender, now);
            let lost = self.dice.next_epoch() % 1000 < self.loss_per_mille;
            if lost || self.paused.contains(&to) || !self.nodes.contains_key(&to) {
                continue;
            }
            let receiver = self.nodes.get_mut(&to).unwrap();
            receiver.handle(now, sender, message);
            while let Some((next, answer)) = receiver.poll_send() {
                queue.push((to, next, answer));
            }
            self.collect_events(to, now);
        }
        self.collect_events(from, now);
    }

    fn collect_events(&mut self, id: NodeId, now: Duration) {
        let node = self.nodes.get_mut(&id).unwrap();
        while let Some(event) = node.poll_event() {
            self.events.push((now, id, event));
        }
    }

    /// Whether every node knows of every member.
    fn everyone_knows_everyone(&self) -> bool {
        let n = self.nodes.len();
        self.nodes.values().all(|m| m.known() == n)
    }
}

/// The start of heartbeat interval `i` (200 ms each; every fifth also gossips).
fn tick(i: u64) -> Duration {
    Duration::from_millis(200 * i)
}

const TICKS_PER_GOSSIP: u64 = 5;

/// Membership at hundreds of nodes: heartbeats to 3 random members a tick, not all.
fn large() -> MembershipConfig {
    MembershipConfig {
        heartbeat_fanout: 3,
        ..MembershipConfig::default()
    }
}

/// Gossip rounds until every node has heard of every other, when each starts
/// knowing only a seed (node 1, which knows nobody).
fn rounds_to_join(n: u32, seed: u64) -> u64 {
    let known = |i: u32| if i == 1 { vec![] } else { vec![1] };
    let mut cluster = Cluster::new(n, known, large(), seed);
    for t in 0..1_000 {
        cluster.round(tick(t));
        if cluster.everyone_knows_everyone() {
            return t / TICKS_PER_GOSSIP + 1;
        }
    }
    panic!("{n} nodes did not converge in 200 rounds");
}

/// Gossip rounds until a change one member declares (it is leaving) is known to
/// every node, in a cluster where everyone knows everyone. Heartbeats do not carry
/// it: only the push-pull of views does.
fn rounds_to_spread(n: u32, seed: u64) -> u64 {
    let everyone = |i: u32| (1..=n).filter(|&j| j != i).collect();
    let mut cluster = Cluster::new(n, everyone, large(), seed);
    // One round so every node has gossiped once, then the change.
    for t in 0..TICKS_PER_GOSSIP {
        cluster.round(tick(t));
    }
    let first = cluster.nodes.get_mut(&NodeId(1)).unwrap();
    first.set_own(MemberStatus::Leaving, 1);
    for t in TICKS_PER_GOSSIP..1_000 {
        cluster.round(tick(t));
        let knows = |m: &Membership| {
            m.member(NodeId(1))
                .is_some_and(|s| s.status == MemberStatus::Leaving)
        };
        if cluster.nodes.values().all(knows) {
            return (t - TICKS_PER_GOSSIP) / TICKS_PER_GOSSIP + 1;
        }
    }
    panic!("{n} nodes: the change did not spread in 200 rounds");
}

#[test]
fn membership_spreads_in_logarithmically_many_rounds() {
    for (n, seeds, bound) in [(100, 3, 12), (1_000, 1, 16)] {
        let join: Vec<u64> = (1..=seeds).map(|seed| rounds_to_join(n, seed)).collect();
        let spread: Vec<u64> = (1..=seeds).map(|seed| rounds_to_spread(n, seed)).collect();
        println!(
            "{n} nodes: joining through one seed converges in {join:?} gossip rounds; a status change reaches everyone in {spread:?}"
        );
        // log2(100) ~ 6.6, log2(1000) ~ 10: the spread grows with log n, not with n.
        assert!(join.iter().chain(&spread).all(|&r| r <= bound), "{n} nodes");
    }
}

#[test]
fn a_paused_node_is_suspected_within_seconds_and_welcomed_back() {
    let config = MembershipConfig::default();
    let everyone = |i: u32| (1..=5).filter(|&j| j != i).collect();
    let mut cluster = Cluster::new(5, everyone, config, 7);
    cluster.jitter_ms = 100;
    for t in 0..150 {
        cluster.round(tick(t));
    }
    let early_downs = cluster
        .events
        .iter()
        .filter(|(_, _, e)| matches!(e, MembershipEvent::Down(_)))
        .count();
    assert_eq!(early_downs, 0, "nobody suspected while everyone is well");
    let paused = NodeId(3);
    cluster.paused.push(paused);
    let stopped_at = tick(150);
    // Judged between ticks too, so the moment of suspicion is measured, not rounded
    // up to the next tick.
    for tenth in 301..=400 {
        let now = Duration::from_millis(tenth * 100);
        if tenth % 2 == 0 {
            cluster.round(now);
        }
        for id in [1, 2, 4, 5].map(NodeId) {
            cluster.nodes.get_mut(&id).unwrap().judge(now);
            cluster.collect_events(id, now);
        }
    }
    let suspected: Vec<Duration> = cluster
        .events
        .iter()
        .filter(|(_, _, e)| *e == MembershipEvent::Down(paused))
        .map(|(at, _, _)| *at - stopped_at)
        .collect();
    println!("node 3 paused: suspected by the others after {suspected:?}");
    assert_eq!(suspected.len(), 4, "every other node suspects it once");
    assert!(
        suspected
            .iter()
            .all(|&after| after <= Duration::from_millis(2_500))
    );
    cluster.paused.clear();
    for t in 201..=210 {
        cluster.round(tick(t));
    }
    let back = cluster
        .events
        .iter()
        .filter(|(_, _, e)| *e == MembershipEvent::Up(paused))
        .count();
    assert_eq!(back, 4, "every other node takes it back");
    assert!((1..=5).all(|i| !cluster.nodes[&NodeId(i)].is_down(paused)));
}

/// Wrong suspicions of live nodes when messages are lost and ticks are late, per
/// peer and hour of simulated time.
fn false_downs_per_peer_hour(loss_per_mille: u64, jitter_ms: u64) -> f64 {
    let everyone = |i: u32| (1..=5).filter(|&j| j != i).collect();
    let mut cluster = Cluster::new(5, everyone, MembershipConfig::default(), 11);
    cluster.loss_per_mille = loss_per_mille;
    cluster.jitter_ms = jitter_ms;
    let hours = 2;
    for t in 0..3_600 * 5 * hours {
        cluster.round(tick(t));
    }
    let downs = cluster
        .events
        .iter()
        .filter(|(_, _, e)| matches!(e, MembershipEvent::Down(_)))
        .count();
    // 5 nodes each watching 4 peers.
    downs as f64 / (20 * hours) as f64
}

#[test]
fn live_nodes_are_rarely_suspected_when_messages_are_lost() {
    let quiet = false_downs_per_peer_hour(0, 300);
    let lossy = false_downs_per_peer_hour(100, 300);
    let very_lossy = false_downs_per_peer_hour(300, 300);
    println!(
        "false downs per peer-hour (ticks up to 300 ms late): no loss {quiet}, 10% loss {lossy}, 30% loss {very_lossy}"
    );
    assert_eq!(quiet, 0.0, "no loss, no false suspicion");
    assert!(lossy < 1.0, "10% loss: {lossy} false downs per peer-hour");
}

/// A restarted member (a higher incarnation, its heartbeat from 0) replaces its old
/// life everywhere, and gossip still carrying the old life cannot bring it back.
#[test]
fn a_restarted_member_replaces_its_old_life() {
    let everyone = |i: u32| (1..=3).filter(|&j| j != i).collect();
    let mut cluster = Cluster::new(3, everyone, MembershipConfig::default(), 5);
    for t in 0..50 {
        cluster.round(tick(t));
    }
    let old_life = cluster.nodes[&NodeId(1)].member(NodeId(3)).unwrap().clone();
    assert!(old_life.heartbeat > 10);
    let mut reborn = state(3);
    reborn.incarnation = 2;
    let others = [1, 2].map(state);
    let random = 99;
    let restarted = Membership::new(
        MembershipConfig::default(),
        reborn,
        others,
        random,
        tick(50),
    );
    cluster.nodes.insert(NodeId(3), restarted);
    for t in 50..60 {
        cluster.round(tick(t));
    }
    for i in [1, 2] {
        let seen = cluster.nodes[&NodeId(i)].member(NodeId(3)).unwrap();
        assert_eq!(seen.incarnation, 2, "node {i} holds the new life");
    }
    // A late gossip message carrying the old life changes nothing.
    let stale = ringkv_cluster::GossipMessage::Ack {
        members: vec![old_life],
    };
    let node1 = cluster.nodes.get_mut(&NodeId(1)).unwrap();
    node1.handle(tick(60), NodeId(2), stale);
    assert_eq!(node1.member(NodeId(3)).unwrap().incarnation, 2);
    assert!(!node1.is_down(NodeId(3)));
}

/// A node that was itself stalled (its ticks stopped) suspects nobody for the silence
/// that was its own; and after a long silence of a peer, the detector does not learn
/// to wait that long again: the peer's next silence is suspected as fast as the first.
#[test]
fn a_stall_of_its_own_suspects_nobody_and_a_long_silence_teaches_nothing() {
    let everyone = |i: u32| (1..=3).filter(|&j| j != i).collect();
    let mut cluster = Cluster::new(3, everyone, MembershipConfig::default(), 3);
    for t in 0..50 {
        cluster.round(tick(t));
    }
    // Node 1 stalls for 5 s while the others go on: its next tick must not suspect.
    cluster.paused.push(NodeId(1));
    for t in 50..75 {
        cluster.round(tick(t));
    }
    cluster.paused.clear();
    let downs_before = cluster.events.len();
    cluster.round(tick(75));
    let suspected_by_1 = cluster.events[downs_before..]
        .iter()
        .filter(|(_, by, e)| *by == NodeId(1) && matches!(e, MembershipEvent::Down(_)))
        .count();
    assert_eq!(
        suspected_by_1, 0,
        "node 1's own stall is not the others' silence"
    );
    for t in 76..120 {
        cluster.round(tick(t));
    }
    // Node 2 saw node 1 silent for 5 s and suspected it, then heard it again. Node 1
    // now stops for good: node 2 suspects it again within the usual time, not after
    // the 5 s its detector would have learned to tolerate.
    let first = cluster
        .events
        .iter()
        .filter(|(_, by, e)| *by == NodeId(2) && *e == MembershipEvent::Down(NodeId(1)))
        .count();
    assert_eq!(first, 1, "node 2 suspected the stalled node once");
    cluster.paused.push(NodeId(1));
    let stopped = tick(120);
    for t in 120..140 {
        cluster.round(tick(t));
    }
    let again = cluster
        .events
        .iter()
        .filter(|(at, by, e)| {
            *at >= stopped && *by == NodeId(2) && *e == MembershipEvent::Down(NodeId(1))
        })
        .map(|(at, _, _)| *at - stopped)
        .next()
        .expect("suspected again");
    assert!(again <= Duration::from_millis(2_600), "took {again:?}");
}

/// With a static member list, gossip naming nodes nobody configured adds nothing.
#[test]
fn a_static_member_list_is_not_grown_by_gossip() {
    let config = MembershipConfig {
        learn_members: false,
        ..MembershipConfig::default()
    };
    let mut node = Membership::new(config, state(1), [state(2)], 1, Duration::ZERO);
    let strangers = (100..200).map(state).collect();
    node.handle(
        tick(1),
        NodeId(2),
        ringkv_cluster::GossipMessage::Syn { members: strangers },
    );
    assert_eq!(node.known(), 2);
    assert!(node.poll_event().is_none(), "no Joined events");
}

#[test]
fn a_member_that_left_the_ring_is_forgotten_and_not_relearned() {
    // Four nodes that all know each other; node 4 then leaves the ring, and nodes 1 to
    // 3 keep only the ring's members. Node 4 keeps running and gossiping, and node 3
    // never hears of the change: its gossip still carries node 4.
    let all = |i: u32| (1..=4).filter(|&k| k != i).collect();
    let mut cluster = Cluster::new(4, all, MembershipConfig::default(), 7);
    for t in 0..20 {
        cluster.round(tick(t));
    }
    assert!(cluster.everyone_knows_everyone());
    let ring: std::collections::BTreeSet<NodeId> = (1..=3).map(NodeId).collect();
    for i in [1, 2] {
        let node = cluster.nodes.get_mut(&NodeId(i)).unwrap();
        node.restrict_to(ring.clone());
        assert!(
            node.member(NodeId(4)).is_none(),
            "node {i} still lists node 4"
        );
    }
    for t in 20..120 {
        cluster.round(tick(t));
    }
    for i in [1, 2] {
        let node = &cluster.nodes[&NodeId(i)];
        assert!(
            node.member(NodeId(4)).is_none(),
            "gossip from node 3 or 4 brought node 4 back to node {i}"
        );
        assert!(!node.is_down(NodeId(3)), "node {i} lost sight of node 3");
    }
    assert_eq!(
        cluster.nodes[&NodeId(3)].known(),
        4,
        "node 3 was not restricted"
    );
    // Node 4 joins again: once the ring names it, gossip brings it back.
    let ring: std::collections::BTreeSet<NodeId> = (1..=4).map(NodeId).collect();
    cluster.nodes.get_mut(&NodeId(1)).unwrap().restrict_to(ring);
    for t in 120..160 {
        cluster.round(tick(t));
    }
    assert!(
        cluster.nodes[&NodeId(1)].member(NodeId(4)).is_some(),
        "node 1 did not learn node 4 again"
    );
}
