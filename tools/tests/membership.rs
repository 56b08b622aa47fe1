//! Membership changes across real processes on loopback (N=3): a fourth node joins
//! a three-node cluster under write load, then an original member leaves, and no
//! acknowledged write is lost; every key ends on its three replicas, the leaver drops
//! what it handed off, and the data streamed stays within the bound of the ideal.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ringkv_client::{Client, PutMode, ReadOptions, WriteOptions};
use ringkv_cluster::NodeId;
use ringkv_server::ring_change;

mod common;
use common::Cluster;

/// Waits until node `id`'s ring view has no change in progress and has exactly
/// `members` in force; returns the view's epoch.
fn wait_stable(cluster: &Cluster, id: usize, members: &[u32], within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let answer = ring_change::view(&cluster.native(id), Duration::from_secs(5))
            .expect("the node answers with its ring view");
        let view = &answer.view;
        let now: Vec<u32> = view.ring().members().map(|m| m.node.0).collect();
        if view.is_stable() && now == members {
            return view.epoch();
        }
        assert!(
            Instant::now() < deadline,
            "node {id}: ring still {now:?}, change {:?}, {} partition(s) pending",
            view.change(),
            view.pending().count()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until a client that never refreshes its map on its own routes by ring
/// `epoch` with `members`: it learns of the new ring only from the epoch replies carry
/// (its pings go to any node). Returns how long that took.
fn wait_routed(watcher: &Client, epoch: u64, members: &[u32]) -> Duration {
    let started = Instant::now();
    loop {
        watcher.ping().expect("a ping");
        let map = watcher.routing_map().expect("a map");
        let mut nodes: Vec<u32> = map.nodes.iter().map(|n| n.node_id).collect();
        nodes.sort_unstable();
        let owners_in = map.owners.iter().all(|o| members.contains(o));
        if map.epoch == epoch && owners_in {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the client still routes by epoch {} (nodes {nodes:?}), not {epoch}",
            map.epoch
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until gossip tells node `id` that every one of `members` holds ring `epoch`.
fn wait_gossiped(cluster: &Cluster, id: usize, epoch: u64, members: &[u32]) {
    let c = cluster.client(&[id]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = (c.status_each().expect("status").into_iter())
            .find(|(node, _)| *node == id as u32)
            .and_then(|(_, s)| s.ok())
            .expect("node answers");
        let declared: BTreeMap<u32, u64> = (status.members.iter())
            .map(|m| (m.node_id, m.ring_epoch))
            .collect();
        if members.iter().all(|m| declared.get(m) == Some(&epoch)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {id} hears ring epochs {declared:?}, not {epoch} for {members:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One node's status, summed over its shards.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    keys: u64,
    keys_sent: u64,
    bytes_sent: u64,
    partitions_received: u64,
    partitions_dropped: u64,
}

fn totals(c: &Client) -> BTreeMap<u32, Totals> {
    let mut all = BTreeMap::new();
    for (node, status) in c.status_each().expect("status") {
        let Ok(status) = status else { continue };
        let t: &mut Totals = all.entry(node).or_default();
        for s in &status.shards {
            t.keys += s.keys;
            t.keys_sent += s.transfer_keys_sent;
            t.bytes_sent += s.transfer_bytes_sent;
            t.partitions_received += s.partitions_received;
            t.partitions_dropped += s.partitions_dropped;
        }
    }
    all
}

/// Waits until the partitions the change moved have been dropped where they moved
/// from (each partition a node received is one replica another node lost; drops come
/// three request timeouts after), then returns every node's totals.
fn wait_dropped(c: &Client, received_by: u32) -> BTreeMap<u32, Totals> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = totals(c);
        let received: u64 = now.values().map(|t| t.partitions_received).sum();
        let dropped: u64 = now.values().map(|t| t.partitions_dropped).sum();
        if dropped >= received && now.contains_key(&received_by) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{dropped} partitions dropped of the {received} moved"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the writer saw: the last acknowledged value of each key, and keys whose last
/// write had an unknown outcome (either value may be there).
#[derive(Default)]
struct Written {
    acked: BTreeMap<String, u32>,
    unknown: BTreeMap<String, u32>,
    /// Writes acknowledged in all.
    writes: u64,
}

/// Writes new keys (and rewrites every fifth older one) until `stop`, W=2.
/// `new_keys` counts keys acked for the first time.
fn write_until(
    client: Client,
    stop: Arc<AtomicBool>,
    new_keys: Arc<AtomicU64>,
    mut written: Written,
) -> Written {
    let w2 = WriteOptions {
        w: Some(2),
        ..WriteOptions::default()
    };
    let mut i = written.acked.len() as u32;
    while !stop.load(Ordering::SeqCst) {
        let key = if i % 5 == 4 {
            format!("m-{}", i / 2)
        } else {
            format!("m-{i}")
        };
        match client.put_with(key.as_bytes(), &i.to_le_bytes(), PutMode::Latest, w2) {
            Ok(()) => {
                written.writes += 1;
                written.unknown.remove(&key);
                if written.acked.insert(key, i).is_none() {
                    new_keys.fetch_add(1, Ordering::SeqCst);
                }
            }
            Err(e) if e.outcome_unknown() => {
                written.unknown.insert(key, i);
            }
            Err(e) => panic!("write {i} failed outright: {e}"),
        }
        i += 1;
    }
    written
}

#[test]
fn a_cluster_grows_from_three_to_four_and_back_to_three_under_writes() {
    // Anti-entropy off: what a new replica holds came by stream or by a write, so the
    // counts below prove the streams (and not a later repair) put every key in place.
    let mut cluster = Cluster::start_with_args(3, &["--anti-entropy-interval-ms", "0"]);
    let c = cluster.client(&[1, 2, 3]);
    let all = WriteOptions {
        w: Some(3),
        ..WriteOptions::default()
    };
    // RINGKV_MEMBERSHIP_KEYS scales the run up for the figures in docs/benchmarks.md.
    let keys: u32 = std::env::var("RINGKV_MEMBERSHIP_KEYS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(3000);
    let mut preload = Written::default();
    for i in 0..keys {
        let key = format!("m-{i}");
        c.put_with(key.as_bytes(), &i.to_le_bytes(), PutMode::Latest, all)
            .expect("preload");
        preload.acked.insert(key, i);
    }

    // Writes run through the join and the leave.
    let stop = Arc::new(AtomicBool::new(false));
    let new_keys = Arc::new(AtomicU64::new(0));
    let writer = {
        let (client, stop, new) = (cluster.client(&[1, 3]), stop.clone(), new_keys.clone());
        std::thread::spawn(move || write_until(client, stop, new, preload))
    };

    // Learns of each new ring only from the epochs in its replies.
    let watcher = Client::builder()
        .seeds([cluster.native(1)])
        .topology_refresh(Duration::from_secs(3600))
        .connect_blocking()
        .expect("client connects");
    let first_epoch = watcher.routing_map().expect("a map").epoch;

    let joined_at = Instant::now();
    let four = cluster.join(1);
    let epoch = wait_stable(&cluster, four, &[1, 2, 3, 4], Duration::from_secs(120));
    for id in 1..=3 {
        wait_stable(&cluster, id, &[1, 2, 3, 4], Duration::from_secs(10));
    }
    let join_took = joined_at.elapsed();
    assert!(epoch > first_epoch, "the join did not move the ring on");
    let learned = wait_routed(&watcher, epoch, &[1, 2, 3, 4]);
    println!(
        "join: a client that never refreshes on its own routed by epoch {epoch} {learned:?} after the ring was stable everywhere"
    );
    assert!(
        watcher.routing_map().unwrap().owners.contains(&4),
        "the client's map gives node 4 no partition"
    );
    wait_gossiped(&cluster, 1, epoch, &[1, 2, 3, 4]);
    let after_join = wait_dropped(&c, 4);
    let sent: u64 = after_join.values().map(|t| t.keys_sent).sum();
    let bytes: u64 = after_join.values().map(|t| t.bytes_sent).sum();
    let held_by_four = after_join[&4].keys;
    // The ideal: node 4's share, a quarter of all the copies (N=3 on 4 nodes), counted
    // once the old replicas dropped what moved; the writer's keys meanwhile reached
    // node 4 by its writes, not by stream, so the stream may move a little less.
    let ideal = after_join.values().map(|t| t.keys).sum::<u64>() / 4;
    println!(
        "join: epoch {epoch} after {join_took:?}; {sent} keys ({bytes} bytes) streamed for an ideal of {ideal} ({:.3}x); node 4 holds {held_by_four}, received {} partitions",
        sent as f64 / ideal.max(1) as f64,
        after_join[&4].partitions_received
    );
    assert!(held_by_four > 0, "node 4 received nothing");
    assert!(
        sent as f64 <= 1.1 * ideal as f64,
        "{sent} keys streamed to node 4, more than 1.1x the ideal {ideal}"
    );
    // Most of it came by stream: the preload alone is most of node 4's share.
    assert!(
        sent as f64 >= 0.5 * ideal as f64,
        "only {sent} keys streamed to node 4 for an ideal of {ideal}"
    );

    let held_by_two = totals(&c)[&2].keys;
    let new_before = new_keys.load(Ordering::SeqCst);
    let left_at = Instant::now();
    let leave = std::process::Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .args([
            "admin",
            "leave",
            "--addr",
            &cluster.native(2),
            "--wait",
            "120",
        ])
        .output()
        .expect("ringkv admin leave runs");
    assert!(
        leave.status.success(),
        "admin leave failed: {}",
        String::from_utf8_lossy(&leave.stderr)
    );
    println!("{}", String::from_utf8_lossy(&leave.stdout).trim());
    let mut left_epoch = 0;
    for id in [1, 3, 4] {
        left_epoch = wait_stable(&cluster, id, &[1, 3, 4], Duration::from_secs(30));
    }
    let leave_took = left_at.elapsed();
    let learned = wait_routed(&watcher, left_epoch, &[1, 3, 4]);
    println!("leave: the client routed by epoch {left_epoch} {learned:?} after");
    wait_gossiped(&cluster, 1, left_epoch, &[1, 3, 4]);
    // The ideal: what node 2 held when it started leaving, plus its share (48 of the
    // 64 partitions) of the keys the writer added meanwhile.
    let added = new_keys.load(Ordering::SeqCst) - new_before;
    let ideal = held_by_two + added * 3 / 4;
    // Node 2 is no member now; `c` still asks it, as one of its seeds.
    let after_leave = wait_dropped(&c, 2);
    let sent_leaving = after_leave.values().map(|t| t.keys_sent).sum::<u64>() - sent;
    println!(
        "leave: {sent_leaving} keys streamed for an ideal of {ideal} ({:.3}x): node 2 held {held_by_two}, {added} keys added during the leave",
        sent_leaving as f64 / ideal.max(1) as f64
    );
    assert!(
        sent_leaving as f64 <= 1.1 * ideal as f64,
        "{sent_leaving} keys streamed when node 2 left, more than 1.1x the ideal {ideal}"
    );
    assert!(
        sent_leaving as f64 >= 0.5 * ideal as f64,
        "only {sent_leaving} keys streamed when node 2 left, for an ideal of {ideal}"
    );
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().expect("the writer ends");
    println!(
        "leave: done after {leave_took:?}; {} writes acked during the changes, {} keys in all, {} with an unknown outcome",
        written.writes,
        written.acked.len(),
        written.unknown.len()
    );
    assert!(
        written.writes > 200,
        "too few writes acked during the changes: {}",
        written.writes
    );

    // The leaver dropped every partition it handed off.
    assert_eq!(
        after_leave[&2].keys, 0,
        "node 2 still holds keys after leaving"
    );
    cluster.kill(2);

    // Every key on its three replicas: with three nodes left, each holds every key,
    // counted before any read could repair one.
    let distinct = (written.acked.keys())
        .chain(written.unknown.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    let c = cluster.client(&[1, 3, 4]);
    let end = totals(&c);
    for id in [1, 3, 4] {
        let keys = end[&id].keys;
        assert!(
            keys >= written.acked.len() as u64 && keys <= distinct,
            "node {id} holds {keys} keys; {} acked, {distinct} written",
            written.acked.len()
        );
    }

    // No acknowledged write lost: each reads back as its last acked value.
    let read_all = ReadOptions {
        r: Some(3),
        ..ReadOptions::default()
    };
    let mut lost = Vec::new();
    for (key, value) in &written.acked {
        let found = c.get_with(key.as_bytes(), read_all).expect("a read at R=3");
        if !found
            .siblings
            .iter()
            .any(|v| v[..] == value.to_le_bytes()[..])
        {
            lost.push(key.clone());
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost: {:?}",
        lost.len(),
        written.acked.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        !ring_change::view(&cluster.native(1), Duration::from_secs(5))
            .unwrap()
            .view
            .is_member(NodeId(2))
    );
}

/// A node whose `ring.view` is lost while its store is not refuses to start from the
/// `--peers` ring (it cannot know the ring its data was written under), and comes
/// back with `--join`, taking the cluster's ring from a member and keeping its keys.
#[test]
fn a_store_without_its_ring_view_starts_only_by_joining() {
    let mut cluster = Cluster::start(3);
    let c = cluster.client(&[1]);
    let all = WriteOptions {
        w: Some(3),
        ..WriteOptions::default()
    };
    let keys: Vec<String> = (0..200).map(|i| format!("v-{i}")).collect();
    for key in &keys {
        c.put_with(key.as_bytes(), key.as_bytes(), PutMode::Latest, all)
            .expect("a write at W=3");
    }
    cluster.kill(3);
    std::fs::remove_file(cluster.data_dir(3).join("ring.view")).expect("ring.view was stored");
    let (status, stderr) = cluster.start_refused(3);
    assert!(
        !status.success(),
        "node 3 started from --peers over its store"
    );
    assert!(
        stderr.contains("no ring.view") && stderr.contains("--join"),
        "refused without saying why: {stderr}"
    );
    assert!(
        !cluster.data_dir(3).join("ring.view").exists(),
        "the refused start stored a ring"
    );

    cluster.restart_joining(3, 1);
    let answer = ring_change::view(&cluster.native(3), Duration::from_secs(5)).unwrap();
    let members: Vec<u32> = answer.view.ring().members().map(|m| m.node.0).collect();
    assert_eq!(members, [1, 2, 3], "node 3 came back on another ring");
    assert!(
        answer.view.is_stable(),
        "coming back started a change: {:?}",
        answer.view.change()
    );
    let three = (c.status_each().expect("status").into_iter())
        .find(|(node, _)| *node == 3)
        .and_then(|(_, s)| s.ok())
        .expect("node 3 answers");
    let held: u64 = three.shards.iter().map(|s| s.keys).sum();
    assert_eq!(held, keys.len() as u64, "node 3 lost keys on the way back");
}

/// Changes that could not be safe are refused with a reason, and nothing starts: the
/// ring stays as it was.
#[test]
fn unsafe_or_malformed_membership_changes_are_refused() {
    use ringkv_proto::RingChangeRequest;
    let cluster = Cluster::start(3);
    let at = cluster.native(1);
    let ask = |request| ring_change::change(&at, request, Duration::from_secs(5));
    let refused = |request, why: &str| match ask(request) {
        Err(ring_change::AskError::Refused { why: said, .. }) => {
            assert!(said.contains(why), "refused for '{said}', not '{why}'")
        }
        other => panic!("accepted, expected a refusal for '{why}': {other:?}"),
    };
    let joiner = |node_id, native: &str, partitions| RingChangeRequest::Join {
        node_id,
        native: native.into(),
        partitions,
    };
    refused(joiner(9, "127.0.0.1:1999", 128), "partitions");
    refused(joiner(9, "0.0.0.0:1999", 64), "cannot be dialled");
    refused(joiner(9, "not-an-address", 64), "not an ip:port");
    refused(joiner(1, "127.0.0.1:1999", 64), "this node's id");
    refused(joiner(u32::MAX, "127.0.0.1:1999", 64), "above the largest");
    refused(joiner(2, "127.0.0.1:1999", 64), "is known at");
    refused(RingChangeRequest::Leave { node_id: 2 }, "ask node 2 itself");
    let replace_live = RingChangeRequest::Replace {
        dead: 3,
        node_id: 9,
        native: "127.0.0.1:1999".into(),
        partitions: 64,
    };
    refused(replace_live, "not down");
    let view = ring_change::view(&at, Duration::from_secs(5)).unwrap().view;
    assert!(
        view.is_stable(),
        "a refused change started: {:?}",
        view.change()
    );
    assert_eq!(view.epoch(), 0);
}

/// Node 3 dies for good; node 4 replaces it (`--join --replace 3`) and ends with every
/// key, streamed from the two survivors (anti-entropy off), while the cluster serves.
#[test]
fn a_new_node_replaces_a_dead_one_and_ends_with_every_key() {
    let mut cluster = Cluster::start_with_args(3, &["--anti-entropy-interval-ms", "0"]);
    let c = cluster.client(&[1, 2]);
    let all = WriteOptions {
        w: Some(3),
        ..WriteOptions::default()
    };
    let mut acked = BTreeMap::new();
    for i in 0..2000u32 {
        let key = format!("r-{i}");
        c.put_with(key.as_bytes(), &i.to_le_bytes(), PutMode::Latest, all)
            .expect("preload");
        acked.insert(key, i);
    }
    cluster.kill(3);
    // Node 1 takes node 3 for down before it agrees to replace it.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen = (c.status_each().expect("status").into_iter())
            .filter(|(id, _)| *id == 1)
            .any(|(_, s)| s.is_ok_and(|s| s.members.iter().any(|m| m.node_id == 3 && m.down)));
        if seen {
            break;
        }
        assert!(Instant::now() < deadline, "node 3 never seen down");
        std::thread::sleep(Duration::from_millis(100));
    }
    let w2 = WriteOptions {
        w: Some(2),
        ..WriteOptions::default()
    };
    let four = cluster.join_replacing(1, Some(3));
    // Writes go on while node 4 fills.
    for i in 2000..2300u32 {
        let key = format!("r-{i}");
        c.put_with(key.as_bytes(), &i.to_le_bytes(), PutMode::Latest, w2)
            .expect("a write with one node dead and one filling");
        acked.insert(key, i);
    }
    for id in [1, 2, four] {
        wait_stable(&cluster, id, &[1, 2, 4], Duration::from_secs(120));
    }
    // Nothing to drop: the only replica that lost partitions is dead.
    let end = totals(&c);
    println!(
        "replace: node 4 holds {} of {} keys",
        end[&4].keys,
        acked.len()
    );
    assert_eq!(end[&4].keys, acked.len() as u64, "node 4 lacks keys");
    let read_all = ReadOptions {
        r: Some(3),
        ..ReadOptions::default()
    };
    for (key, value) in &acked {
        let found = c.get_with(key.as_bytes(), read_all).expect("a read at R=3");
        assert!(
            found
                .siblings
                .iter()
                .any(|v| v[..] == value.to_le_bytes()[..]),
            "{key} lost"
        );
    }
}
