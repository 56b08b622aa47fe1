//! A network partition between two groups of real `ringkv server` processes on
//! loopback, while clients still reach every node (the nftables harness in
//! `common::partition`; needs root and nftables). Five nodes, N=3, W=2: sloppy quorum
//! keeps writes available on both sides; after healing, handoff brings them home and
//! every acknowledged write is readable at R=2.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ringkv_client::{Client, ReadOptions};
use ringkv_cluster::{Member, NodeId, Ring};

mod common;
use common::Cluster;
use common::partition::{Partitioner, node_user};

/// Waits until every node of `side` takes every node of `other` for down; returns
/// how long that took.
fn wait_detected(c: &Client, side: &[usize], other: &[usize], since: Instant) -> Duration {
    loop {
        let each = c.status_each().expect("status");
        let seen = each
            .iter()
            .filter(|(id, _)| side.contains(&(*id as usize)))
            .all(|(_, status)| {
                status.as_ref().is_ok_and(|s| {
                    other
                        .iter()
                        .all(|&o| s.members.iter().any(|m| m.node_id as usize == o && m.down))
                })
            });
        if seen {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "the cut was never detected"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes unique keys through `nodes` (RESP SET, round robin) until `stop` is set:
/// returns the acknowledged (key, value) pairs and how many were attempted.
fn write_until(
    cluster: &Cluster,
    nodes: &[usize],
    prefix: &str,
    stop: &AtomicBool,
) -> (BTreeMap<String, String>, usize) {
    let mut connections: Vec<redis::Connection> =
        nodes.iter().map(|&id| cluster.redis(id)).collect();
    let mut acked = BTreeMap::new();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("{prefix}-{i}");
        let value = format!("{prefix}-value-{i}");
        let connection = &mut connections[i % nodes.len()];
        let result: redis::RedisResult<()> =
            redis::cmd("SET").arg(&key).arg(&value).query(connection);
        if result.is_ok() {
            acked.insert(key, value);
        }
        i += 1;
    }
    (acked, i)
}

#[test]
fn both_sides_of_a_partition_stay_writable_and_converge_after_healing() {
    let users: Vec<(u32, u32)> = (1..=5).map(node_user).collect();
    let mut partitioner = Partitioner::new(&users);
    let cluster = Cluster::start_as_users(&users);
    partitioner.attach(&cluster);
    let c = cluster.client(&[1, 2, 3, 4, 5]);
    let (small, large) = ([1, 2], [3, 4, 5]);

    partitioner.cut(&small);
    let cut_at = Instant::now();
    let share = |(acked, tried): &(BTreeMap<String, String>, usize)| {
        100.0 * acked.len() as f64 / (*tried).max(1) as f64
    };
    // Until the failure detectors see the cut, writes that need the other side time
    // out (their outcome unknown); the acknowledged ones must survive like any other.
    let detecting = AtomicBool::new(false);
    let (early_small, early_large, detected) = std::thread::scope(|scope| {
        let small_side = scope.spawn(|| write_until(&cluster, &small, "small-early", &detecting));
        let large_side = scope.spawn(|| write_until(&cluster, &large, "large-early", &detecting));
        // The cut holds, and only across the sides.
        assert!(
            !partitioner.can_connect(1, 3),
            "node 1 still reaches node 3"
        );
        assert!(
            !partitioner.can_connect(4, 2),
            "node 4 still reaches node 2"
        );
        assert!(partitioner.can_connect(1, 2), "node 1 lost its own side");
        assert!(partitioner.can_connect(3, 5), "node 3 lost its own side");
        let detected = wait_detected(&c, &small, &large, cut_at)
            .max(wait_detected(&c, &large, &small, cut_at));
        detecting.store(true, Ordering::Relaxed);
        (
            small_side.join().unwrap(),
            large_side.join().unwrap(),
            detected,
        )
    });
    println!(
        "both sides saw the other down {detected:?} after the cut; meanwhile side {{1,2}} acked {} of {} writes ({:.1}%), side {{3,4,5}} {} of {} ({:.1}%)",
        early_small.0.len(),
        early_small.1,
        share(&early_small),
        early_large.0.len(),
        early_large.1,
        share(&early_large)
    );

    let writing = AtomicBool::new(false);
    let (small_side, large_side) = std::thread::scope(|scope| {
        let small_side = scope.spawn(|| write_until(&cluster, &small, "small", &writing));
        let large_side = scope.spawn(|| write_until(&cluster, &large, "large", &writing));
        std::thread::sleep(Duration::from_secs(10));
        writing.store(true, Ordering::Relaxed);
        (small_side.join().unwrap(), large_side.join().unwrap())
    });
    println!(
        "after detection: side {{1,2}} acked {} of {} writes ({:.1}%), side {{3,4,5}} {} of {} ({:.1}%)",
        small_side.0.len(),
        small_side.1,
        share(&small_side),
        large_side.0.len(),
        large_side.1,
        share(&large_side)
    );
    assert!(
        small_side.1 >= 100 && large_side.1 >= 100,
        "too few writes tried"
    );
    // After detection, a stand-in is on hand for every key on both sides.
    assert!(
        share(&small_side) >= 99.0,
        "side {{1,2}}: {:.1}%",
        share(&small_side)
    );
    assert!(
        share(&large_side) >= 99.0,
        "side {{3,4,5}}: {:.1}%",
        share(&large_side)
    );
    let pending = common::hints_pending(&c);
    assert!(pending > 0, "no stand-in held a hint");

    partitioner.heal();
    let healed = Instant::now();
    let mut drained = None;
    while healed.elapsed() < Duration::from_secs(60) {
        if common::hints_pending(&c) == 0 {
            drained = Some(healed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let drained = drained.expect("hints still pending 60 s after healing");
    println!("{pending} hints handed off {drained:?} after healing");

    let r2 = ReadOptions {
        r: Some(2),
        ..ReadOptions::default()
    };
    let mut lost = Vec::new();
    let every_acked = [&early_small.0, &early_large.0, &small_side.0, &large_side.0];
    for (key, value) in every_acked.into_iter().flatten() {
        let found = c
            .get_with(key.as_bytes(), r2)
            .expect("a read at R=2 after healing");
        if found.value() != Some(value.as_bytes()) {
            lost.push((key.clone(), found.siblings.len()));
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged writes not readable at R=2 after healing: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    // The reads repaired what handoff could not reach (a third replica nobody stood
    // in for): each node now holds every acked key it replicates (and at most the
    // keys it replicates that were tried: an unacked write may have landed).
    let members: Vec<Member> = (1..=5).map(|i| Member::new(NodeId(i))).collect();
    let ring = Ring::new(64, &members).expect("a valid ring");
    fn tried_keys(prefix: &'static str, tried: usize) -> impl Iterator<Item = String> {
        (0..tried).map(move |i| format!("{prefix}-{i}"))
    }
    let expected = |node: u32| {
        let holds = |key: &String| {
            ring.preference_list_for_key(key.as_bytes(), 3)
                .contains(&NodeId(node))
        };
        let acked = every_acked
            .into_iter()
            .flat_map(|a| a.keys())
            .filter(|k| holds(k))
            .count();
        let tried = tried_keys("small", small_side.1)
            .chain(tried_keys("large", large_side.1))
            .chain(tried_keys("small-early", early_small.1))
            .chain(tried_keys("large-early", early_large.1))
            .filter(|k| holds(k))
            .count();
        acked as u64..=tried as u64
    };
    let mut held = BTreeMap::new();
    let converged = (0..50).any(|_| {
        held = c
            .status_each()
            .unwrap()
            .into_iter()
            .filter_map(|(id, s)| Some((id, s.ok()?.shards.iter().map(|s| s.keys).sum::<u64>())))
            .collect::<BTreeMap<u32, u64>>();
        let done = (1..=5).all(|id| {
            held.get(&id)
                .is_some_and(|keys| expected(id).contains(keys))
        });
        if !done {
            std::thread::sleep(Duration::from_millis(100));
        }
        done
    });
    let wanted: Vec<_> = (1..=5).map(expected).collect();
    assert!(converged, "keys per node {held:?}, expected {wanted:?}");
}
