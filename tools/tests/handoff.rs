//! Sloppy quorum, hinted handoff and anti-entropy across real processes on loopback
//! (N=3): with four `ringkv server` processes every key has a node outside its
//! replicas to stand in for a dead one; with three, none, and only anti-entropy (or a
//! read) brings a replica that missed writes up to date.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ringkv_client::{Client, PutMode, ReadOptions, WriteOptions};
use ringkv_cluster::{Member, NodeId, Ring};

mod common;
use common::Cluster;

/// The ring every server builds from `--partitions 64` and members 1..=size.
fn ring(size: u32) -> Ring {
    let members: Vec<Member> = (1..=size).map(|i| Member::new(NodeId(i))).collect();
    Ring::new(64, &members).expect("a valid ring")
}

/// The status of each shard of node `id`, as `c` sees it (none if it did not answer).
fn shards_of(c: &Client, id: u32) -> Vec<ringkv_client::ShardStatus> {
    (c.status_each().unwrap().into_iter())
        .filter(|(node, _)| *node == id)
        .filter_map(|(_, status)| status.ok())
        .flat_map(|n| n.shards)
        .collect()
}

/// Waits until every running node's failure detector takes `node` for down (before
/// that, a write may still be sent to it and lost with it, and no stand-in takes it:
/// only read repair or anti-entropy would bring that one back).
fn wait_seen_down(c: &Client, node: u32) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let each = c.status_each().expect("status");
        let seen = each
            .iter()
            .filter(|(id, _)| *id != node)
            .all(|(_, status)| {
                status
                    .as_ref()
                    .is_ok_and(|s| s.members.iter().any(|m| m.node_id == node && m.down))
            });
        if seen {
            return;
        }
        assert!(Instant::now() < deadline, "node {node} was never seen down");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kill one of four nodes for 30 s under write load, then restart it: every write
/// acknowledged while it was down and meant for it reaches it by handoff, which is
/// checked on that node alone (the other three killed first), without any read of
/// those keys before.
#[test]
fn writes_made_while_a_node_was_down_reach_it_through_handoff() {
    let mut cluster = Cluster::start(4);
    let writer = cluster.client(&[1, 2, 3]);
    cluster.kill(4);
    wait_seen_down(&writer, 4);
    let down_since = Instant::now();
    let w2 = WriteOptions {
        w: Some(2),
        ..WriteOptions::default()
    };
    let ring = ring(4);
    let mut acked: BTreeMap<String, u32> = BTreeMap::new();
    let (mut unknown, mut i) = (0, 0u32);
    while down_since.elapsed() < Duration::from_secs(30) {
        let key = format!("while-down-{i}");
        match writer.put_with(key.as_bytes(), &i.to_le_bytes(), PutMode::Latest, w2) {
            Ok(()) => {
                acked.insert(key, i);
            }
            Err(e) if e.outcome_unknown() => unknown += 1,
            Err(e) => panic!("write {i} failed outright: {e}"),
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    let for_node_4: Vec<(&String, &u32)> = acked
        .iter()
        .filter(|(key, _)| {
            ring.preference_list_for_key(key.as_bytes(), 3)
                .contains(&NodeId(4))
        })
        .collect();
    println!(
        "{} writes acked while node 4 was down ({unknown} unknown), {} of them for node 4",
        acked.len(),
        for_node_4.len()
    );
    assert!(acked.len() >= 1000, "only {} writes acked", acked.len());
    assert!(
        for_node_4.len() >= 300,
        "too few keys for node 4 to prove anything"
    );
    // The last stand-in writes may still be landing (W=2 answers before the third).
    std::thread::sleep(Duration::from_millis(500));
    let pending = common::hints_pending(&writer);
    assert!(
        pending as usize >= for_node_4.len(),
        "{pending} hints held for {} writes",
        for_node_4.len()
    );

    cluster.restart(4);
    let returned = Instant::now();
    let mut drained = false;
    while returned.elapsed() < Duration::from_secs(60) {
        if common::hints_pending(&writer) == 0 {
            drained = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(drained, "hints still pending 60 s after the node returned");
    println!(
        "handoff of {} keys done {:?} after node 4 returned",
        for_node_4.len(),
        returned.elapsed()
    );
    let handed: u64 = writer
        .status_each()
        .unwrap()
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok())
        .flat_map(|n| &n.shards)
        .map(|s| s.hints_handed_off)
        .sum();
    assert!(
        handed as usize >= for_node_4.len(),
        "{handed} hints handed off"
    );

    // Node 4 alone: the others are gone, so only its own store can answer.
    for id in 1..=3 {
        cluster.kill(id);
    }
    let alone = cluster.client(&[4]);
    let one = ReadOptions {
        r: Some(1),
        strict: true,
        ..ReadOptions::default()
    };
    let mut missing = Vec::new();
    for (key, value) in &for_node_4 {
        let found = alone
            .get_on(&cluster.native(4), key.as_bytes(), one)
            .expect("node 4 answers from its own store");
        if found.value() != Some(&value.to_le_bytes()[..]) {
            missing.push(key.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} writes never reached node 4: {:?}",
        missing.len(),
        for_node_4.len(),
        &missing[..missing.len().min(10)]
    );
}

/// A strict write refuses stand-ins: with one replica of a key dead, W=3 is
/// unavailable strict, and acknowledged sloppy (a stand-in took the dead one's share).
#[test]
fn strict_writes_refuse_stand_ins_that_sloppy_ones_count() {
    let mut cluster = Cluster::start(4);
    let c = cluster.client(&[1, 2, 3]);
    cluster.kill(4);
    wait_seen_down(&c, 4);
    let ring = ring(4);
    let key = (0..)
        .map(|i| format!("strict-{i}"))
        .find(|k| {
            ring.preference_list_for_key(k.as_bytes(), 3)
                .contains(&NodeId(4))
        })
        .expect("some key has node 4 as a replica");
    let w3 = |strict| WriteOptions {
        w: Some(3),
        strict,
        ..WriteOptions::default()
    };
    let strict = c.put_with(key.as_bytes(), b"v", PutMode::Latest, w3(true));
    let error = strict.expect_err("a strict W=3 write with a replica dead");
    assert!(
        error.to_string().to_lowercase().contains("unavailable"),
        "strict: {error}"
    );
    c.put_with(key.as_bytes(), b"v", PutMode::Latest, w3(false))
        .expect("a sloppy W=3 write counts the stand-in");
    assert!(common::hints_pending(&c) >= 1);
}

/// A replica that missed writes (killed while they were made; three nodes, so no
/// stand-in took them) catches up through Merkle anti-entropy alone: no read of those
/// keys, no hint. Checked on that node alone, the other two killed.
#[test]
fn a_replica_that_missed_writes_converges_by_anti_entropy_without_reads() {
    let mut cluster = Cluster::start(3);
    let writer = cluster.client(&[1, 2]);
    cluster.kill(3);
    wait_seen_down(&writer, 3);
    let w2 = WriteOptions {
        w: Some(2),
        ..WriteOptions::default()
    };
    let mut acked = BTreeMap::new();
    for i in 0..300u32 {
        let key = format!("missed-{i}");
        if writer
            .put_with(key.as_bytes(), &i.to_le_bytes(), PutMode::Latest, w2)
            .is_ok()
        {
            acked.insert(key, i);
        }
    }
    assert!(acked.len() >= 290, "only {} writes acked", acked.len());
    assert_eq!(
        common::hints_pending(&writer),
        0,
        "three nodes: no stand-in"
    );
    cluster.restart(3);
    let restarted = Instant::now();
    let keys_on_3 = |c: &Client| -> u64 { shards_of(c, 3).iter().map(|s| s.keys).sum() };
    let mut caught_up = None;
    while restarted.elapsed() < Duration::from_secs(90) {
        if keys_on_3(&writer) >= acked.len() as u64 {
            caught_up = Some(restarted.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let caught_up = caught_up.unwrap_or_else(|| {
        panic!(
            "node 3 holds {} of {} keys 90 s after its restart",
            keys_on_3(&writer),
            acked.len()
        )
    });
    println!(
        "node 3 got the {} writes it missed by anti-entropy {caught_up:?} after its restart",
        acked.len()
    );
    cluster.kill(1);
    cluster.kill(2);
    let alone = cluster.client(&[3]);
    let one = ReadOptions {
        r: Some(1),
        strict: true,
        ..ReadOptions::default()
    };
    for (key, value) in &acked {
        let found = alone
            .get_on(&cluster.native(3), key.as_bytes(), one)
            .unwrap();
        assert_eq!(found.value(), Some(&value.to_le_bytes()[..]), "{key}");
    }
}

/// A replica whose disk was replaced (its data directory emptied) gets every key back
/// from its peers by anti-entropy alone, and `ringkv status` shows it in sync.
#[test]
fn a_replica_with_an_empty_disk_is_rebuilt_by_anti_entropy() {
    const KEYS: u32 = 2_000;
    let mut cluster = Cluster::start(3);
    let writer = cluster.client(&[1, 2]);
    let all = WriteOptions {
        w: Some(3),
        ..WriteOptions::default()
    };
    for i in 0..KEYS {
        let key = format!("kept-{i}");
        writer
            .put_with(key.as_bytes(), &i.to_le_bytes(), PutMode::Latest, all)
            .expect("all three nodes are up");
    }
    cluster.kill(3);
    cluster.wipe(3);
    cluster.restart(3);
    let restarted = Instant::now();
    // (keys, partitions in sync, partitions) on node 3.
    let progress = |c: &Client| -> (u64, u32, u32) {
        let shards = shards_of(c, 3);
        let keys = shards.iter().map(|s| s.keys).sum();
        let in_sync = shards.iter().map(|s| s.partitions_in_sync).sum();
        (keys, in_sync, shards.iter().map(|s| s.partitions).sum())
    };
    let mut rebuilt = None;
    while restarted.elapsed() < Duration::from_secs(120) {
        let (keys, in_sync, partitions) = progress(&writer);
        if keys >= u64::from(KEYS) && partitions > 0 && in_sync == partitions {
            rebuilt = Some(restarted.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let rebuilt = rebuilt.unwrap_or_else(|| {
        panic!(
            "node 3 (keys, partitions in sync, partitions) = {:?} 120 s after its restart on an empty disk",
            progress(&writer)
        )
    });
    println!("node 3 rebuilt {KEYS} keys from an empty disk by anti-entropy in {rebuilt:?}");
    cluster.kill(1);
    cluster.kill(2);
    let alone = cluster.client(&[3]);
    let one = ReadOptions {
        r: Some(1),
        strict: true,
        ..ReadOptions::default()
    };
    for i in 0..KEYS {
        let key = format!("kept-{i}");
        let found = alone
            .get_on(&cluster.native(3), key.as_bytes(), one)
            .unwrap();
        assert_eq!(found.value(), Some(&i.to_le_bytes()[..]), "{key}");
    }
}
