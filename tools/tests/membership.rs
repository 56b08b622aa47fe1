//! Membership changes across real processes on loopback (N=3): a fourth node joins
//! a three-node cluster under write load, then an original member leaves, and no
//! acknowledged write is lost; every key ends on its three replicas, the leaver drops
//! what it handed off, and the data streamed stays within the bound of the ideal.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
fn write_until(client: Client, stop: Arc<AtomicBool>, mut written: Written) -> Written {
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
                written.acked.insert(key, i);
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
    let mut cluster = Cluster::start(3);
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
    let writer = {
        let (client, stop) = (cluster.client(&[1, 3]), stop.clone());
        std::thread::spawn(move || write_until(client, stop, preload))
    };

    let joined_at = Instant::now();
    let four = cluster.join(1);
    let epoch = wait_stable(&cluster, four, &[1, 2, 3, 4], Duration::from_secs(120));
    for id in 1..=3 {
        wait_stable(&cluster, id, &[1, 2, 3, 4], Duration::from_secs(10));
    }
    let join_took = joined_at.elapsed();
    let after_join = totals(&c);
    let sent: u64 = after_join.values().map(|t| t.keys_sent).sum();
    let held_by_four = after_join[&4].keys;
    // The ideal: node 4's share of every replica, 1/4 of all the copies (N=3, 4 nodes).
    let copies: u64 = after_join.values().map(|t| t.keys).sum();
    let bytes: u64 = after_join.values().map(|t| t.bytes_sent).sum();
    println!(
        "join: epoch {epoch} after {join_took:?}; {sent} keys ({bytes} bytes) streamed, node 4 holds {held_by_four} keys ({:.3}x), ideal {} ({:.3}x), {} partitions received",
        sent as f64 / held_by_four.max(1) as f64,
        copies / 4,
        sent as f64 / (copies / 4).max(1) as f64,
        after_join[&4].partitions_received
    );
    assert!(held_by_four > 0, "node 4 received nothing");
    // Node 4's share is 3/4 of the keys (N=3 of 4 nodes); everything it holds came
    // by stream except what the writer wrote to it directly meanwhile.
    assert!(
        sent as f64 <= 1.1 * held_by_four as f64,
        "{sent} keys streamed for the {held_by_four} node 4 holds: more than 1.1x the ideal"
    );

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
    for id in [1, 3, 4] {
        wait_stable(&cluster, id, &[1, 3, 4], Duration::from_secs(30));
    }
    let leave_took = left_at.elapsed();
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

    // The leaver drops every partition it handed off (three request timeouts after).
    let deadline = Instant::now() + Duration::from_secs(30);
    while totals(&c).get(&2).is_some_and(|t| t.keys > 0) {
        assert!(
            Instant::now() < deadline,
            "node 2 still holds keys after leaving"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
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
