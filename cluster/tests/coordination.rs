//! Request paths through real `Node`s wired by a tiny synchronous driver
//! (Dynamo §4.5 "Execution of get() and put() operations", §4.4 versioning, §4.7
//! read repair as used in §4.5).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use ringkv_cluster::{
    Action, ClientError, ClientReply, ClientToken, ConflictMode, Context, DropReason, GetOutcome,
    GetRequest, InvalidArgument, Member, Node, NodeConfig, NodeId, PeerMessage, PutOutcome,
    PutRequest, Quorum, RequestId, Ring, Shelf, StorageCompletion, StorageFailure, StorageOp,
    StoredRead, StoredVersions, Supersedes, Written, merkle,
};

/// Delivers everything at once, in order; `silenced` nodes neither receive nor send.
struct Harness {
    now: Duration,
    nodes: BTreeMap<NodeId, Node>,
    disks: BTreeMap<NodeId, BTreeMap<(Shelf, Vec<u8>), StoredVersions>>,
    /// Requests are strict (no stand-ins) unless a test says otherwise.
    sloppy: bool,
    inbox: VecDeque<(NodeId, NodeId, PeerMessage)>,
    timers: Vec<(NodeId, ringkv_cluster::TimerId, Duration)>,
    replies: BTreeMap<ClientToken, ClientReply>,
    silenced: BTreeSet<NodeId>,
    /// Nodes whose store fails every write (a latched store) or reads every record
    /// as lost (a checksum failure).
    failing_writes: BTreeSet<NodeId>,
    losing_reads: BTreeSet<NodeId>,
    next_client: u64,
    storage_ops: usize,
}

impl Harness {
    fn new(nodes: u32, configure: impl Fn(&mut NodeConfig)) -> Self {
        let members: Vec<Member> = (1..=nodes).map(|i| Member::new(NodeId(i))).collect();
        let ring = Ring::new(64, &members).unwrap();
        let mut harness = Harness {
            now: Duration::from_millis(1_000),
            nodes: BTreeMap::new(),
            disks: BTreeMap::new(),
            sloppy: false,
            inbox: VecDeque::new(),
            timers: Vec::new(),
            replies: BTreeMap::new(),
            silenced: BTreeSet::new(),
            failing_writes: BTreeSet::new(),
            losing_reads: BTreeSet::new(),
            next_client: 0,
            storage_ops: 0,
        };
        for i in 1..=nodes {
            let mut config = NodeConfig::new(NodeId(i), 0);
            configure(&mut config);
            harness
                .nodes
                .insert(NodeId(i), Node::new(config, ring.clone()));
            harness.disks.insert(NodeId(i), BTreeMap::new());
        }
        harness
    }

    fn ring(&self) -> Ring {
        self.nodes.values().next().unwrap().ring().clone()
    }

    fn replicas(&self, key: &[u8]) -> Vec<NodeId> {
        self.ring().preference_list_for_key(key, 3)
    }

    fn client(&mut self) -> ClientToken {
        self.next_client += 1;
        ClientToken(self.next_client)
    }

    fn put(
        &mut self,
        at: NodeId,
        key: &[u8],
        value: Option<&[u8]>,
        context: Option<Vec<u8>>,
        quorum: Quorum,
    ) -> ClientToken {
        let request = PutRequest {
            key: key.to_vec(),
            value: value.map(|v| v.to_vec()),
            supersedes: context.map_or(Supersedes::Nothing, Supersedes::Context),
            quorum: Some(quorum),
            mode: ConflictMode::Causal,
            only_if_present: false,
            strict: !self.sloppy,
        };
        self.send_put(at, request)
    }

    fn send_put(&mut self, at: NodeId, request: PutRequest) -> ClientToken {
        let client = self.client();
        self.nodes.get_mut(&at).unwrap().handle_put(
            self.now,
            self.now.as_millis() as u64,
            client,
            request,
        );
        self.settle();
        client
    }

    fn get(&mut self, at: NodeId, key: &[u8], quorum: Quorum) -> ClientToken {
        let client = self.client();
        let request = GetRequest {
            key: key.to_vec(),
            quorum: Some(quorum),
            strict: !self.sloppy,
        };
        self.nodes
            .get_mut(&at)
            .unwrap()
            .handle_get(self.now, client, request);
        self.settle();
        client
    }

    fn put_ok(
        &mut self,
        at: NodeId,
        key: &[u8],
        value: Option<&[u8]>,
        context: Option<Vec<u8>>,
    ) -> Written {
        let client = self.put(at, key, value, context, Quorum::default());
        self.written(client)
    }

    fn written(&mut self, client: ClientToken) -> Written {
        match self.replies.remove(&client) {
            Some(ClientReply::Put(Ok(PutOutcome::Written(written)))) => written,
            other => panic!("expected a written put, got {other:?}"),
        }
    }

    fn get_ok(&mut self, at: NodeId, key: &[u8]) -> GetOutcome {
        self.get_ok_at(at, key, Quorum::default())
    }

    fn get_ok_at(&mut self, at: NodeId, key: &[u8], quorum: Quorum) -> GetOutcome {
        let client = self.get(at, key, quorum);
        match self.replies.remove(&client) {
            Some(ClientReply::Get(Ok(outcome))) => outcome,
            other => panic!("expected a get outcome, got {other:?}"),
        }
    }

    /// Runs every node's actions and every message until nothing moves.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                while let Some(action) = self.nodes.get_mut(&id).unwrap().poll_action() {
                    moved = true;
                    self.carry_out(id, action);
                }
                self.nodes[&id].assert_invariants();
            }
            if let Some((from, to, message)) = self.inbox.pop_front() {
                moved = true;
                if !self.silenced.contains(&to) && !self.silenced.contains(&from) {
                    self.nodes
                        .get_mut(&to)
                        .unwrap()
                        .handle_message(self.now, from, message);
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn carry_out(&mut self, id: NodeId, action: Action) {
        match action {
            Action::Send { to, message } => self.inbox.push_back((id, to, message)),
            Action::SetTimer { timer, at } => self.timers.push((id, timer, at)),
            Action::Reply { client, reply } => {
                assert!(
                    self.replies.insert(client, reply).is_none(),
                    "one reply per request"
                );
            }
            // The rings here never change (the simulator runs membership changes).
            Action::Moved { partition, .. } => panic!("{partition:?} moved on a fixed ring"),
            Action::Storage(op) => {
                self.storage_ops += 1;
                let disk = self.disks.get_mut(&id).unwrap();
                let completion = match op {
                    StorageOp::Read { op, shelf, key } if self.losing_reads.contains(&id) => {
                        disk.remove(&(shelf, key));
                        StorageCompletion::Read {
                            op,
                            result: Ok(StoredRead::Lost),
                        }
                    }
                    StorageOp::Read { op, shelf, key } => StorageCompletion::Read {
                        op,
                        result: Ok(disk
                            .get(&(shelf, key))
                            .cloned()
                            .map_or(StoredRead::Absent, StoredRead::Found)),
                    },
                    StorageOp::Write { op, .. } if self.failing_writes.contains(&id) => {
                        StorageCompletion::Write {
                            op,
                            result: Err(StorageFailure("injected EIO".into())),
                        }
                    }
                    StorageOp::Write {
                        op,
                        shelf,
                        key,
                        stored,
                    } => {
                        disk.insert((shelf, key), stored);
                        StorageCompletion::Write { op, result: Ok(()) }
                    }
                    StorageOp::Remove { op, shelf, key } => {
                        disk.remove(&(shelf, key));
                        StorageCompletion::Write { op, result: Ok(()) }
                    }
                    StorageOp::DropPartition { op, partition } => {
                        disk.retain(|(shelf, _), _| *shelf != Shelf::Home(partition));
                        StorageCompletion::Write { op, result: Ok(()) }
                    }
                    StorageOp::ListLeaves {
                        op,
                        partition,
                        leaves,
                    } => {
                        let keys = disk
                            .iter()
                            .filter(|((shelf, key), _)| {
                                *shelf == Shelf::Home(partition)
                                    && leaves.contains(&(merkle::leaf_of(key) as u32))
                            })
                            .map(|((_, key), stored)| {
                                (key.clone(), merkle::version_digest(&stored.version))
                            })
                            .collect();
                        StorageCompletion::Listed { op, keys }
                    }
                    StorageOp::ListTombstones { op, partition } => {
                        let keys = disk
                            .iter()
                            .filter(|((shelf, _), stored)| {
                                *shelf == Shelf::Home(partition) && stored.tombstone
                            })
                            .map(|((_, key), stored)| {
                                (key.clone(), merkle::version_digest(&stored.version))
                            })
                            .collect();
                        StorageCompletion::Listed { op, keys }
                    }
                    StorageOp::Collect {
                        op,
                        partition,
                        key,
                        digest,
                    } => {
                        let at = (Shelf::Home(partition), key);
                        let matches = disk.get(&at).is_some_and(|stored| {
                            stored.tombstone && merkle::version_digest(&stored.version) == digest
                        });
                        let result = match matches {
                            true => {
                                disk.remove(&at);
                                Ok(())
                            }
                            false => Err(StorageFailure("the tombstone changed".into())),
                        };
                        StorageCompletion::Write { op, result }
                    }
                };
                self.nodes
                    .get_mut(&id)
                    .unwrap()
                    .handle_storage(self.now, completion);
            }
        }
    }

    /// Moves time past every armed timer and fires them.
    fn expire_timers(&mut self) {
        let timers = std::mem::take(&mut self.timers);
        for (node, timer, at) in timers {
            self.now = self.now.max(at);
            self.nodes
                .get_mut(&node)
                .unwrap()
                .handle_timer(self.now, timer);
        }
        self.settle();
    }

    /// What `node` holds of `key` at home.
    fn stored(&self, node: NodeId, key: &[u8]) -> Option<ringkv_cluster::VersionSet> {
        self.stored_on(node, self.home(key), key)
    }

    fn stored_on(
        &self,
        node: NodeId,
        shelf: Shelf,
        key: &[u8],
    ) -> Option<ringkv_cluster::VersionSet> {
        self.disks[&node]
            .get(&(shelf, key.to_vec()))
            .map(|s| s.decode().unwrap())
    }

    fn home(&self, key: &[u8]) -> Shelf {
        Shelf::Home(self.ring().partition_of(key))
    }
}

const KEY: &[u8] = b"user:42";

/// Dynamo §4.5: a put acknowledged by W replicas is seen by a later quorum read.
#[test]
fn put_then_get_returns_the_value() {
    let mut h = Harness::new(4, |_| {});
    let coordinator = h.replicas(KEY)[0];
    let put = h.put_ok(coordinator, KEY, Some(b"hello"), None);
    assert_eq!(put.dot.actor.node, coordinator);
    let reader = *h.nodes.keys().find(|n| **n != coordinator).unwrap();
    let got = h.get_ok(reader, KEY);
    assert_eq!(got.values(), vec![&b"hello"[..]]);
    assert!(got.context.vector().contains(put.dot));
    for replica in h.replicas(KEY) {
        assert!(h.stored(replica, KEY).unwrap().contains_dot(put.dot));
    }
}

/// Dynamo §4.4: writes without context become siblings; a put with the read context
/// supersedes exactly what it saw.
#[test]
fn concurrent_puts_are_siblings_until_a_write_that_saw_them() {
    let mut h = Harness::new(3, |_| {});
    let [a, b, _] = h.replicas(KEY)[..] else {
        panic!()
    };
    h.put_ok(a, KEY, Some(b"one"), None);
    h.put_ok(b, KEY, Some(b"two"), None);
    let got = h.get_ok(a, KEY);
    assert_eq!(got.values().len(), 2);
    let context = got.context.encode();
    // A third writer slips in concurrently with the resolving write.
    let third = h.put_ok(b, KEY, Some(b"three"), None);
    let resolved = h.put_ok(a, KEY, Some(b"merged"), Some(context));
    let after = h.get_ok(a, KEY);
    let mut values = after.values();
    values.sort();
    assert_eq!(values, vec![&b"merged"[..], &b"three"[..]]);
    assert!(after.versions.contains_dot(third.dot));
    assert!(after.versions.contains_dot(resolved.dot));
}

/// Dynamo §4.4 (deletes are versions): a delete with context hides what it saw, and
/// the tombstone is stored on the replicas.
#[test]
fn delete_with_context_hides_the_value() {
    let mut h = Harness::new(3, |_| {});
    let coordinator = h.replicas(KEY)[0];
    h.put_ok(coordinator, KEY, Some(b"v"), None);
    let context = h.get_ok(coordinator, KEY).context.encode();
    h.put_ok(coordinator, KEY, None, Some(context));
    let got = h.get_ok(coordinator, KEY);
    assert!(got.values().is_empty());
    assert!(got.versions.is_deleted());
    assert_eq!(got.versions.len(), 1, "the tombstone is the only version");
    assert!(h.disks[&coordinator][&(h.home(KEY), KEY.to_vec())].tombstone);
}

/// Dynamo §4.5: without W durable acks in time the put answers Timeout, with counts;
/// the outcome is unknown, not failed (the local replica has the write).
#[test]
fn put_without_quorum_times_out_with_counts() {
    let mut h = Harness::new(3, |_| {});
    let replicas = h.replicas(KEY);
    h.silenced.insert(replicas[1]);
    h.silenced.insert(replicas[2]);
    let client = h.put(
        replicas[0],
        KEY,
        Some(b"v"),
        None,
        Quorum::new(3, 2, 2).unwrap(),
    );
    assert!(
        !h.replies.contains_key(&client),
        "no reply before the deadline"
    );
    h.expire_timers();
    assert_eq!(
        h.replies[&client],
        ClientReply::Put(Err(ClientError::Timeout {
            acked: 1,
            required: 2
        }))
    );
    assert!(
        h.stored(replicas[0], KEY).is_some(),
        "the local write stands"
    );
}

/// Too few reachable replicas: Unavailable at once, nothing stored, no timer.
#[test]
fn unavailable_fails_fast() {
    let mut h = Harness::new(3, |_| {});
    let replicas = h.replicas(KEY);
    let coordinator = replicas[0];
    for other in &replicas[1..] {
        h.nodes
            .get_mut(&coordinator)
            .unwrap()
            .set_reachable(*other, false);
    }
    let client = h.put(coordinator, KEY, Some(b"v"), None, Quorum::default());
    assert_eq!(
        h.replies[&client],
        ClientReply::Put(Err(ClientError::Unavailable {
            required: 2,
            reachable: 1
        }))
    );
    let client = h.get(coordinator, KEY, Quorum::default());
    assert_eq!(
        h.replies[&client],
        ClientReply::Get(Err(ClientError::Unavailable {
            required: 2,
            reachable: 1
        }))
    );
    assert_eq!(h.storage_ops, 0);
    assert!(h.timers.is_empty());
}

#[test]
fn bad_context_bytes_are_an_invalid_argument() {
    let mut h = Harness::new(3, |_| {});
    let coordinator = h.replicas(KEY)[0];
    let client = h.put(
        coordinator,
        KEY,
        Some(b"v"),
        Some(vec![1, 9]),
        Quorum::default(),
    );
    match &h.replies[&client] {
        ClientReply::Put(Err(ClientError::InvalidArgument(InvalidArgument::Context(_)))) => {}
        other => panic!("expected a context error, got {other:?}"),
    }
    assert_eq!(h.storage_ops, 0);
}

/// Puts are coordinated by a replica (Dynamo §4.5: the coordinator is in the
/// preference list): a node holding none forwards the put to the first replica, which
/// coordinates it and answers with its real outcome.
#[test]
fn a_put_at_a_non_replica_is_forwarded_and_answered_with_the_replicas_outcome() {
    let mut h = Harness::new(5, |_| {});
    let replicas = h.replicas(KEY);
    let outsider = *h.nodes.keys().find(|n| !replicas.contains(n)).unwrap();
    let written = h.put_ok(outsider, KEY, Some(b"v"), None);
    assert_eq!(
        written.dot.actor.node, replicas[0],
        "the first replica coordinated"
    );
    assert_eq!(h.nodes[&outsider].stats().forwarded, 1);
    assert!(h.disks[&outsider].is_empty(), "the outsider stored nothing");
    for replica in &replicas {
        assert!(h.stored(*replica, KEY).unwrap().contains_dot(written.dot));
    }
    // SET and DEL forwarded alike, one forward each.
    let set = h.send_put(outsider, PutRequest::replacing(KEY.to_vec(), b"w".to_vec()));
    let set = h.written(set);
    assert!(
        set.superseded.contains(written.dot),
        "the SET read the first write"
    );
    let del = h.send_put(outsider, PutRequest::delete_if_present(KEY.to_vec()));
    h.written(del);
    assert!(h.get_ok(outsider, KEY).values().is_empty());
    assert_eq!(h.nodes[&outsider].stats().forwarded, 3);
}

/// The replica a put was forwarded to went silent: the forwarder answers Timeout
/// (outcome unknown), never a failure, and only after the replica's own time ran out.
#[test]
fn a_forwarded_put_whose_replica_is_silent_times_out_with_its_quorum() {
    let mut h = Harness::new(5, |_| {});
    let replicas = h.replicas(KEY);
    let outsider = *h.nodes.keys().find(|n| !replicas.contains(n)).unwrap();
    h.silenced.insert(replicas[0]);
    let client = h.put(
        outsider,
        KEY,
        Some(b"v"),
        None,
        Quorum::new(3, 2, 3).unwrap(),
    );
    assert!(
        !h.replies.contains_key(&client),
        "no answer before the deadline"
    );
    let sent = h.now;
    h.expire_timers();
    assert_eq!(
        h.replies[&client],
        ClientReply::Put(Err(ClientError::Timeout {
            acked: 0,
            required: 3
        }))
    );
    assert!(
        h.now - sent > Duration::from_secs(1),
        "waited past the replica's timeout"
    );
}

/// Once the replica a put was forwarded to is found unreachable, the forwarder answers
/// at once: Timeout (it may have applied the put), without waiting out the deadline.
#[test]
fn a_forward_to_a_replica_found_unreachable_times_out_at_once() {
    let mut h = Harness::new(5, |_| {});
    let replicas = h.replicas(KEY);
    let outsider = *h.nodes.keys().find(|n| !replicas.contains(n)).unwrap();
    h.silenced.insert(replicas[0]);
    let client = h.put(outsider, KEY, Some(b"v"), None, Quorum::default());
    assert!(!h.replies.contains_key(&client));
    h.nodes
        .get_mut(&outsider)
        .unwrap()
        .set_reachable(replicas[0], false);
    h.settle();
    assert_eq!(
        h.replies[&client],
        ClientReply::Put(Err(ClientError::Timeout {
            acked: 0,
            required: 2
        }))
    );
    // The next put goes to the next replica, and succeeds.
    h.silenced.clear();
    let written = h.put_ok(outsider, KEY, Some(b"w"), None);
    assert_eq!(written.dot.actor.node, replicas[1]);
}

/// Puts over the key or value limits are refused by the node itself (forwarded puts
/// arrive from peers, past the front ends' checks).
#[test]
fn puts_over_the_key_or_value_limit_are_refused() {
    let mut h = Harness::new(3, |config| {
        config.key_max = 8;
        config.stored_value_max = 4;
    });
    let coordinator = h.replicas(b"short")[0];
    let long_key = h.put(
        coordinator,
        b"a-key-of-17-bytes",
        Some(b"v"),
        None,
        Quorum::default(),
    );
    assert_eq!(
        h.replies[&long_key],
        ClientReply::Put(Err(ClientError::InvalidArgument(
            InvalidArgument::KeyTooLong { len: 17, limit: 8 }
        )))
    );
    let big = h.put(
        coordinator,
        b"short",
        Some(b"12345"),
        None,
        Quorum::default(),
    );
    assert_eq!(
        h.replies[&big],
        ClientReply::Put(Err(ClientError::ValuesTooLarge { size: 5, limit: 4 }))
    );
    assert_eq!(h.storage_ops, 0, "nothing read or written");
}

/// A forwarded put reaching a node that is no replica under its own ring (rings
/// disagree) is refused with the replicas, not forwarded on.
#[test]
fn a_forwarded_put_is_never_forwarded_again() {
    let mut h = Harness::new(5, |_| {});
    let replicas = h.replicas(KEY);
    let outsiders: Vec<NodeId> = h
        .nodes
        .keys()
        .copied()
        .filter(|n| !replicas.contains(n))
        .collect();
    let partition = h.ring().partition_of(KEY);
    let forward = PeerMessage::Forward {
        request: RequestId {
            epoch: 7,
            sequence: 1,
        },
        partition,
        put: ringkv_cluster::ForwardedPut {
            key: KEY.to_vec(),
            value: Some(b"v".to_vec()),
            supersedes: Supersedes::Nothing,
            quorum: Quorum::default(),
            mode: ConflictMode::Causal,
            only_if_present: false,
            strict: true,
            wall_ms: 0,
        },
    };
    let (from, to) = (outsiders[0], outsiders[1]);
    h.nodes
        .get_mut(&to)
        .unwrap()
        .handle_message(h.now, from, forward);
    let sent: Vec<Action> =
        std::iter::from_fn(|| h.nodes.get_mut(&to).unwrap().poll_action()).collect();
    let expected = PeerMessage::ForwardReply {
        request: RequestId {
            epoch: 7,
            sequence: 1,
        },
        reply: Err(ClientError::NotReplica { replicas }),
    };
    assert_eq!(
        sent,
        vec![Action::Send {
            to: from,
            message: expected
        }]
    );
    assert_eq!(h.nodes[&to].stats().forwarded, 0);
}

/// A duplicated forward (a network that repeats itself, a retried frame) is
/// coordinated once: a put is not idempotent, and a second copy would supersede the
/// acked first under a new dot.
#[test]
fn a_duplicated_forward_is_coordinated_once() {
    let mut h = Harness::new(5, |_| {});
    let replicas = h.replicas(KEY);
    let outsider = *h.nodes.keys().find(|n| !replicas.contains(n)).unwrap();
    h.nodes.get_mut(&outsider).unwrap().handle_put(
        h.now,
        0,
        ClientToken(99),
        PutRequest::replacing(KEY.to_vec(), b"v".to_vec()),
    );
    let actions: Vec<Action> =
        std::iter::from_fn(|| h.nodes.get_mut(&outsider).unwrap().poll_action()).collect();
    for action in actions {
        if let Action::Send { to, message } = &action {
            assert!(matches!(message, PeerMessage::Forward { .. }));
            h.inbox.push_back((outsider, *to, message.clone()));
        }
        h.carry_out(outsider, action);
    }
    h.settle();
    let to = replicas[0];
    let stored = h.stored(to, KEY).unwrap();
    assert_eq!(stored.len(), 1, "one version: {stored:?}");
    assert_eq!(
        h.nodes[&to]
            .stats()
            .drops
            .get(&DropReason::DuplicateForward),
        Some(&1)
    );
    let written = h.written(ClientToken(99));
    assert!(stored.contains_dot(written.dot));
}

/// Redis SET: the put supersedes every sibling a quorum holds, though its client
/// passed no context, and says what it superseded.
#[test]
fn a_put_superseding_what_a_quorum_holds_replaces_siblings_it_never_saw() {
    let mut h = Harness::new(3, |_| {});
    let [a, b, _] = h.replicas(KEY)[..] else {
        panic!()
    };
    let first = h.put_ok(a, KEY, Some(b"one"), None);
    let second = h.put_ok(b, KEY, Some(b"two"), None);
    assert_eq!(h.get_ok(a, KEY).values().len(), 2, "two blind siblings");
    let set = h.send_put(b, PutRequest::replacing(KEY.to_vec(), b"three".to_vec()));
    let set = h.written(set);
    assert!(set.superseded.contains(first.dot) && set.superseded.contains(second.dot));
    assert_eq!(h.get_ok(a, KEY).values(), vec![&b"three"[..]]);
}

/// Redis DEL: an absent (or deleted) key writes nothing and says so; a present one
/// is deleted.
#[test]
fn delete_if_present_writes_only_when_a_value_is_there() {
    let mut h = Harness::new(3, |_| {});
    let coordinator = h.replicas(KEY)[0];
    let absent = h.send_put(coordinator, PutRequest::delete_if_present(KEY.to_vec()));
    assert_eq!(
        h.replies[&absent],
        ClientReply::Put(Ok(PutOutcome::NothingToDelete))
    );
    assert!(h.disks.values().all(|d| d.is_empty()), "nothing written");
    let written = h.put_ok(coordinator, KEY, Some(b"v"), None);
    let deleted = h.send_put(coordinator, PutRequest::delete_if_present(KEY.to_vec()));
    let deleted = h.written(deleted);
    assert!(deleted.superseded.contains(written.dot));
    assert!(h.get_ok(coordinator, KEY).values().is_empty());
    let again = h.send_put(coordinator, PutRequest::delete_if_present(KEY.to_vec()));
    assert_eq!(
        h.replies[&again],
        ClientReply::Put(Ok(PutOutcome::NothingToDelete))
    );
}

/// With N = 1 the only replica's own read is the quorum read: a SET takes one read
/// and one write, not a read phase first.
#[test]
fn a_set_at_n_1_reads_its_replica_once() {
    let mut h = Harness::new(1, |config| config.quorum = Quorum::new(1, 1, 1).unwrap());
    let only = NodeId(1);
    let one = Quorum::new(1, 1, 1).unwrap();
    for value in [&b"one"[..], b"two"] {
        let blind = h.put(only, KEY, Some(value), None, one);
        h.written(blind);
    }
    assert_eq!(h.get_ok_at(only, KEY, one).values().len(), 2);
    let before = h.storage_ops;
    let set = h.send_put(only, PutRequest::replacing(KEY.to_vec(), b"three".to_vec()));
    h.written(set);
    assert_eq!(h.storage_ops - before, 2, "one read, one write");
    assert_eq!(h.get_ok_at(only, KEY, one).values(), vec![&b"three"[..]]);
}

/// A SET's read that cannot reach R replicas in time wrote nothing, so the client
/// hears Unavailable (safe to retry), not a write's Timeout.
#[test]
fn a_set_whose_read_times_out_is_unavailable() {
    let mut h = Harness::new(3, |_| {});
    let [a, b, c] = h.replicas(KEY)[..] else {
        panic!()
    };
    h.silenced.insert(b);
    h.silenced.insert(c);
    let set = h.send_put(a, PutRequest::replacing(KEY.to_vec(), b"v".to_vec()));
    h.expire_timers();
    assert_eq!(
        h.replies[&set],
        ClientReply::Put(Err(ClientError::Unavailable {
            required: 2,
            reachable: 1
        }))
    );
    assert!(h.disks[&a].is_empty(), "nothing written");
}

/// Dynamo §4.5 read repair: a replica that missed a write gets it after a read that
/// saw it was stale.
#[test]
fn read_repair_restores_a_replica_that_missed_a_write() {
    let mut h = Harness::new(3, |_| {});
    let replicas = h.replicas(KEY);
    h.silenced.insert(replicas[2]);
    let put = h.put_ok(replicas[0], KEY, Some(b"v"), None);
    assert!(h.stored(replicas[2], KEY).is_none());
    h.silenced.clear();
    let client = h.get(replicas[1], KEY, Quorum::new(3, 3, 2).unwrap());
    assert!(matches!(h.replies[&client], ClientReply::Get(Ok(_))));
    let repaired = h
        .stored(replicas[2], KEY)
        .expect("read repair wrote the key");
    assert!(repaired.contains_dot(put.dot));
    assert_eq!(h.nodes[&replicas[1]].stats().repairs_sent, 1);
    assert_eq!(h.stored(replicas[0], KEY), h.stored(replicas[2], KEY));
}

/// Stale and duplicated peer messages are counted with a reason and dropped.
#[test]
fn stale_and_duplicate_answers_are_counted_not_fatal() {
    let mut h = Harness::new(3, |_| {});
    let replicas = h.replicas(KEY);
    h.put_ok(replicas[0], KEY, Some(b"v"), None);
    let key_partition = h.ring().partition_of(KEY).0;
    let now = h.now;
    let node = h.nodes.get_mut(&replicas[0]).unwrap();
    let stale = RequestId {
        epoch: 0,
        sequence: 1,
    };
    node.handle_message(now, replicas[1], PeerMessage::WriteAck { request: stale });
    node.handle_message(now, replicas[1], PeerMessage::WriteAck { request: stale });
    node.handle_message(
        now,
        replicas[1],
        PeerMessage::Read {
            request: stale,
            partition: ringkv_cluster::PartitionId(63),
            key: KEY.to_vec(),
            hint_for: None,
        },
    );
    let drops = &node.stats().drops;
    assert!(drops[&DropReason::LateResponse] >= 2);
    if key_partition != 63 {
        assert_eq!(drops[&DropReason::WrongPartition], 1);
    }
    node.assert_invariants();
}

/// Riak's hard sibling limit: a put that would exceed it is refused, nothing written.
#[test]
fn too_many_siblings_refuses_the_put() {
    let mut h = Harness::new(3, |c| c.siblings_max = 2);
    let coordinator = h.replicas(KEY)[0];
    h.put_ok(coordinator, KEY, Some(b"a"), None);
    h.put_ok(coordinator, KEY, Some(b"b"), None);
    let before = h.stored(coordinator, KEY);
    let client = h.put(coordinator, KEY, Some(b"c"), None, Quorum::default());
    assert_eq!(
        h.replies[&client],
        ClientReply::Put(Err(ClientError::TooManySiblings { count: 3, limit: 2 }))
    );
    assert_eq!(h.stored(coordinator, KEY), before);
    // Resolving with the context is always possible.
    let context = h.get_ok(coordinator, KEY).context.encode();
    h.put_ok(coordinator, KEY, Some(b"resolved"), Some(context));
}

/// The version metadata of a key's siblings grows with each blind write; past what
/// the store keeps for one key, the coordinator refuses the put with the sizes, never
/// hands the store a record it would refuse (which timed out before), and nothing
/// is written.
#[test]
fn versions_beyond_the_store_limit_are_refused_with_their_size() {
    let mut h = Harness::new(3, |c| c.stored_version_max = 150);
    let coordinator = h.replicas(KEY)[0];
    let mut refused = None;
    for i in 0..10u8 {
        let before = h.stored(coordinator, KEY);
        let client = h.put(coordinator, KEY, Some(&[i]), None, Quorum::default());
        match &h.replies[&client] {
            ClientReply::Put(Ok(_)) => {}
            other => {
                assert_eq!(h.stored(coordinator, KEY), before, "nothing written");
                refused = Some(other.clone());
                break;
            }
        }
    }
    match refused {
        Some(ClientReply::Put(Err(ClientError::VersionsTooLarge { size, limit: 150 }))) => {
            assert!(size > 150)
        }
        other => panic!("expected VersionsTooLarge, got {other:?}"),
    }
    let context = h.get_ok(coordinator, KEY).context.encode();
    h.put_ok(coordinator, KEY, Some(b"resolved"), Some(context));
}

/// A write that fits at its coordinator can still make a replica's set too large to
/// store (that replica holds a concurrent write). The replica refuses to the
/// coordinator instead of leaving it to time out, and once the quorum cannot be met
/// the client hears why.
#[test]
fn a_replica_merge_beyond_the_store_limit_is_refused_not_timed_out() {
    let mut h = Harness::new(3, |c| c.stored_value_max = 10);
    let [x, y, z] = h.replicas(KEY)[..] else {
        unreachable!()
    };
    h.silenced.insert(z);
    h.put_ok(x, KEY, Some(b"aaaaaa"), None);
    h.silenced.remove(&z);
    h.silenced.insert(x);
    h.silenced.insert(y);
    let one = Quorum::new(3, 1, 1).unwrap();
    let client = h.put(z, KEY, Some(b"bbbbbb"), None, one);
    assert!(matches!(h.replies[&client], ClientReply::Put(Ok(_))));
    h.silenced.clear();
    // x holds aaaaaa and adds cc (8 bytes); z holds bbbbbb and would hold 14.
    let all = Quorum::new(3, 1, 3).unwrap();
    let client = h.put(x, KEY, Some(b"cc"), None, all);
    assert_eq!(
        h.replies[&client],
        ClientReply::Put(Err(ClientError::RefusedByReplicas {
            acked: 2,
            required: 3,
            refusal: ringkv_cluster::TooLarge::Values {
                size: 14,
                limit: 10
            },
        }))
    );
    let z_set = h.stored(z, KEY).unwrap();
    assert_eq!(z_set.len(), 1, "z kept what it had");
    // Resolving with a context covering every sibling fits everywhere again.
    let seen = h.get(x, KEY, Quorum::new(3, 3, 1).unwrap());
    let ClientReply::Get(Ok(outcome)) = h.replies[&seen].clone() else {
        panic!("read failed")
    };
    let resolved = h.put(x, KEY, Some(b"r"), Some(outcome.context.encode()), all);
    assert!(matches!(h.replies[&resolved], ClientReply::Put(Ok(_))));
    for node in [x, y, z] {
        assert_eq!(h.stored(node, KEY).unwrap().len(), 1, "{node:?} converged");
    }
}

/// A coordinator whose local write fails has fanned the version out already: the
/// other replicas store it and ack. Its dot may be there and not here, so the actor
/// retires (drawing past it instead would leave a hole a context could claim), and
/// the node refuses puts for a moment, so a store that fails every write (latched)
/// costs one actor per pause, not one per put.
#[test]
fn a_coordinator_whose_write_fails_retires_its_actor_and_pauses() {
    let mut h = Harness::new(3, |_| {});
    let coordinator = h.replicas(KEY)[0];
    h.failing_writes.insert(coordinator);
    let first_actor = h.nodes[&coordinator].actor();
    let first = h.put_ok(coordinator, KEY, Some(b"one"), None);
    assert_eq!(first.dot.actor, first_actor);
    assert_ne!(h.nodes[&coordinator].actor(), first_actor, "retired");
    let paused = h.put(coordinator, KEY, Some(b"two"), None, Quorum::default());
    assert_eq!(
        h.replies[&paused],
        ClientReply::Put(Err(ClientError::StorageFailed)),
        "refused while paused, nothing fanned out"
    );
    h.now += Duration::from_secs(2);
    let third = h.put_ok(coordinator, KEY, Some(b"three"), None);
    assert_ne!(third.dot.actor, first_actor);
    assert_eq!(h.nodes[&coordinator].stats().actors_retired, 2);
    // Both acked blind writes are siblings on the replicas that stored them.
    let other = h.replicas(KEY)[1];
    assert_eq!(h.stored(other, KEY).unwrap().len(), 2);
}

/// A record that reads back lost may have held dots of the coordinator's actor: the
/// next put it coordinates uses a new actor, so its dot cannot collide with one the
/// other replicas hold.
#[test]
fn a_lost_record_retires_the_coordinators_actor() {
    let mut h = Harness::new(3, |_| {});
    let coordinator = h.replicas(KEY)[0];
    let first = h.put_ok(coordinator, KEY, Some(b"one"), None);
    let before = h.nodes[&coordinator].actor();
    h.losing_reads.insert(coordinator);
    let client = h.put(coordinator, KEY, Some(b"two"), None, Quorum::default());
    h.losing_reads.clear();
    let second = h.written(client);
    assert_ne!(
        second.dot.actor, before,
        "a new actor after the lost record"
    );
    assert_ne!(second.dot, first.dot);
    let other = h.replicas(KEY)[1];
    let values: Vec<_> = h
        .stored(other, KEY)
        .unwrap()
        .siblings()
        .map(|v| v.value.clone())
        .collect();
    assert_eq!(values.len(), 2, "both writes kept: {values:?}");
}

/// Last-writer-wins namespaces keep one value per key.
#[test]
fn last_writer_wins_mode_keeps_one_value() {
    let mut h = Harness::new(3, |_| {});
    let [a, b, _] = h.replicas(KEY)[..] else {
        panic!()
    };
    for (at, value) in [(a, &b"first"[..]), (b, b"second")] {
        h.now += Duration::from_millis(5);
        let request = PutRequest {
            key: KEY.to_vec(),
            value: Some(value.to_vec()),
            supersedes: Supersedes::Nothing,
            quorum: None,
            mode: ConflictMode::LastWriterWins,
            only_if_present: false,
            strict: true,
        };
        h.send_put(at, request);
    }
    assert_eq!(h.get_ok(a, KEY).values(), vec![&b"second"[..]]);
}

/// The context a get returns decodes to exactly the join of its siblings' histories.
#[test]
fn get_context_round_trips() {
    let mut h = Harness::new(3, |_| {});
    let coordinator = h.replicas(KEY)[0];
    h.put_ok(coordinator, KEY, Some(b"v"), None);
    let got = h.get_ok(coordinator, KEY);
    assert_eq!(Context::decode(&got.context.encode()).unwrap(), got.context);
    assert_eq!(got.context.vector(), &got.versions.context());
}

/// The nodes of a 4-node ring that do not replicate `KEY`: the first is the stand-in
/// for a down replica.
fn outsider(h: &Harness) -> NodeId {
    let replicas = h.replicas(KEY);
    *h.nodes.keys().find(|n| !replicas.contains(n)).unwrap()
}

/// Dynamo §4.6: with a replica down, the next healthy node stands in, holds the
/// write as a hint (counted toward W), and hands it to the replica when it is back;
/// the hint goes only after the replica acknowledged it durably.
#[test]
fn a_down_replica_gets_its_writes_through_a_stand_ins_hint() {
    let mut h = Harness::new(4, |_| {});
    h.sloppy = true;
    let [a, b, down] = h.replicas(KEY)[..] else {
        panic!()
    };
    let stand_in = outsider(&h);
    for node in [a, b, stand_in] {
        h.nodes.get_mut(&node).unwrap().set_reachable(down, false);
    }
    h.silenced.insert(down);
    let all = Quorum::new(3, 1, 3).unwrap();
    let client = h.put(a, KEY, Some(b"v"), None, all);
    let written = h.written(client);
    assert_eq!(
        written.stand_ins, 1,
        "one of the three acks is the stand-in's"
    );
    let hint = Shelf::Hints { target: down };
    assert!(
        h.stored_on(stand_in, hint, KEY)
            .unwrap()
            .contains_dot(written.dot)
    );
    assert!(
        h.stored(stand_in, KEY).is_none(),
        "a hint is not a home copy"
    );
    assert!(h.stored(down, KEY).is_none());
    let pending = h.nodes[&stand_in].hints_pending();
    assert_eq!(
        (pending.len(), pending[0].target, pending[0].keys),
        (1, down, 1)
    );

    // A sloppy read at R = 3 asks the stand-in in the down replica's place.
    let got = h.get_ok_at(b, KEY, Quorum::new(3, 3, 1).unwrap());
    assert_eq!((got.values(), got.stand_ins), (vec![&b"v"[..]], 1));

    // The replica is back: the stand-in hands the hint off, then removes it.
    h.silenced.remove(&down);
    for node in [a, b, stand_in] {
        h.nodes.get_mut(&node).unwrap().set_reachable(down, true);
    }
    h.settle();
    h.expire_timers();
    assert!(h.stored(down, KEY).unwrap().contains_dot(written.dot));
    assert!(
        h.stored_on(stand_in, hint, KEY).is_none(),
        "handed off, then removed"
    );
    assert!(h.nodes[&stand_in].hints_pending().is_empty());
    let stats = h.nodes[&stand_in].stats().hints;
    assert_eq!((stats.stored, stats.handed_off), (1, 1));
}

/// A strict write never counts a stand-in: with a replica down, W = 3 is unavailable.
#[test]
fn a_strict_write_refuses_stand_ins() {
    let mut h = Harness::new(4, |_| {});
    let [a, _, down] = h.replicas(KEY)[..] else {
        panic!()
    };
    h.nodes.get_mut(&a).unwrap().set_reachable(down, false);
    let all = Quorum::new(3, 1, 3).unwrap();
    let client = h.put(a, KEY, Some(b"v"), None, all);
    assert_eq!(
        h.replies[&client],
        ClientReply::Put(Err(ClientError::Unavailable {
            required: 3,
            reachable: 2
        }))
    );
    h.sloppy = true;
    let client = h.put(a, KEY, Some(b"v"), None, all);
    assert_eq!(h.written(client).stand_ins, 1);
}

/// Past its byte bound a stand-in refuses the hint, and the write cannot count it:
/// the client hears which limit refused it, never a success resting on nothing.
#[test]
fn a_stand_in_past_its_hint_bound_refuses_and_the_write_is_not_acked() {
    let mut h = Harness::new(4, |config| config.hints.bytes_max = 10);
    h.sloppy = true;
    let [a, b, down] = h.replicas(KEY)[..] else {
        panic!()
    };
    let stand_in = outsider(&h);
    for node in [a, b, stand_in] {
        h.nodes.get_mut(&node).unwrap().set_reachable(down, false);
    }
    let all = Quorum::new(3, 1, 3).unwrap();
    let client = h.put(a, KEY, Some(b"a value longer than ten bytes"), None, all);
    match &h.replies[&client] {
        ClientReply::Put(Err(ClientError::RefusedByReplicas { acked, refusal, .. })) => {
            assert_eq!(*acked, 2);
            assert!(matches!(
                refusal,
                ringkv_cluster::TooLarge::Hints { limit: 10, .. }
            ));
        }
        other => panic!("expected a refusal for the hint bound, got {other:?}"),
    }
    assert!(
        h.stored_on(stand_in, Shelf::Hints { target: down }, KEY)
            .is_none()
    );
    assert_eq!(h.nodes[&stand_in].stats().hints.refused, 1);
}

/// A stand-in that coordinates (all of the key's replicas are across a split) makes
/// its versions with actors that never skip a counter: two successive writes it
/// coordinates, after the first was handed off and its hint removed, never share a
/// dot, and a context that names the second never claims an unseen first.
#[test]
fn a_coordinating_stand_in_never_reuses_a_dot_after_handing_off() {
    let mut h = Harness::new(6, |_| {});
    h.sloppy = true;
    let replicas = h.replicas(KEY);
    let outsiders: Vec<NodeId> = h
        .nodes
        .keys()
        .copied()
        .filter(|n| !replicas.contains(n))
        .collect();
    let set_replicas = |h: &mut Harness, reachable: bool| {
        for &o in &outsiders {
            for &r in &replicas {
                h.nodes.get_mut(&o).unwrap().set_reachable(r, reachable);
            }
        }
    };
    set_replicas(&mut h, false);
    let one = Quorum::new(3, 1, 1).unwrap();
    let coordinator = outsiders[0];
    let first = {
        let client = h.put(coordinator, KEY, Some(b"1"), None, one);
        h.written(client)
    };
    assert_eq!(first.stand_ins, 1);
    set_replicas(&mut h, true);
    h.settle();
    h.expire_timers();
    assert!(h.nodes.values().all(|n| n.hints_pending().is_empty()));
    set_replicas(&mut h, false);
    let second = {
        let client = h.put(coordinator, KEY, Some(b"2"), None, one);
        h.written(client)
    };
    assert_ne!(first.dot, second.dot);
    assert!(
        second.dot.actor != first.dot.actor || second.dot.counter == first.dot.counter + 1,
        "an actor kept across copies would skip or repeat a counter"
    );
    set_replicas(&mut h, true);
    h.settle();
    h.expire_timers();
    let got = h.get_ok_at(replicas[0], KEY, Quorum::new(3, 3, 1).unwrap());
    assert_eq!(
        got.versions.len(),
        2,
        "both blind writes are siblings: {got:?}"
    );
}

/// Dynamo §4.7: a replica that missed writes (silenced while they were made) catches up
/// by Merkle exchanges alone, with no read of the keys; the trees then agree.
#[test]
fn anti_entropy_brings_a_replica_that_missed_writes_up_to_date() {
    let mut h = Harness::new(3, |_| {});
    let keys: Vec<Vec<u8>> = (0..40).map(|i| format!("ae-{i}").into_bytes()).collect();
    let behind = NodeId(3);
    h.silenced.insert(behind);
    let two = Quorum::new(3, 2, 2).unwrap();
    for key in &keys {
        let client = h.put(NodeId(1), key, Some(b"v"), None, two);
        h.written(client);
    }
    h.expire_timers();
    assert!(keys.iter().all(|k| h.stored(behind, k).is_none()));
    h.silenced.remove(&behind);
    for _ in 0..200 {
        for id in [NodeId(1), NodeId(2), NodeId(3)] {
            let now = h.now;
            h.nodes.get_mut(&id).unwrap().tick_anti_entropy(now);
        }
        h.settle();
        if keys.iter().all(|k| h.stored(behind, k).is_some()) {
            break;
        }
        h.now += Duration::from_millis(10);
    }
    for key in &keys {
        assert_eq!(h.stored(behind, key), h.stored(NodeId(1), key), "{key:?}");
    }
    let partitions: BTreeSet<_> = keys.iter().map(|k| h.ring().partition_of(k)).collect();
    for partition in partitions {
        let tree = |id: NodeId| h.nodes[&id].merkle_tree(partition).cloned();
        assert_eq!(tree(behind), tree(NodeId(1)), "{partition:?}");
    }
    assert!(h.nodes[&NodeId(1)].stats().anti_entropy.keys_pushed > 0);
}
