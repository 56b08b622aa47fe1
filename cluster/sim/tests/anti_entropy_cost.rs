//! What anti-entropy sends to repair a small difference, against sending every key:
//! two replicas of a whole ring (every partition), one missing 1 % of the keys, the
//! exchange's messages built as the node builds them and encoded as peer frames.
//! `RINGKV_AE_KEYS=1000000 cargo test -p ringkv-sim --release --test anti_entropy_cost
//! -- --nocapture` prints the numbers for a million keys (the test runs 100,000).

use std::collections::BTreeMap;

use ringkv_cluster::merkle::{FANOUT, MerkleTree, leaf_of, version_digest};
use ringkv_cluster::{Member, NodeId, PartitionId, PeerMessage, Ring, StoredVersions};
use ringkv_proto::peer_message::encode_peer_message;

fn frame_len(message: &PeerMessage) -> usize {
    let mut out = Vec::new();
    encode_peer_message(0, message, &mut out).expect("fits a frame");
    out.len()
}

#[test]
fn a_one_percent_difference_costs_a_small_share_of_the_data() {
    let keys: usize = std::env::var("RINGKV_AE_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let members: Vec<Member> = (1..=3).map(|i| Member::new(NodeId(i))).collect();
    let ring = Ring::new(1024, &members).expect("a valid ring");
    // A stored set's version bytes stand in for its digest; a 100-byte value each.
    let version = StoredVersions {
        version: vec![7; 40],
        value: vec![0; 100],
        tombstone: false,
    };
    let digest = version_digest(&version.version);
    let mut a: BTreeMap<PartitionId, Vec<Vec<u8>>> = BTreeMap::new();
    let mut b: BTreeMap<PartitionId, Vec<Vec<u8>>> = BTreeMap::new();
    for i in 0..keys {
        let key = format!("user:{i:08}").into_bytes();
        let partition = ring.partition_of(&key);
        a.entry(partition).or_default().push(key.clone());
        // Every hundredth key never reached replica B.
        if i % 100 != 37 {
            b.entry(partition).or_default().push(key);
        }
    }
    let (mut exchange_bytes, mut full_bytes, mut pushed) = (0usize, 0usize, 0usize);
    for (&partition, a_keys) in &a {
        let b_keys = b.get(&partition).cloned().unwrap_or_default();
        let tree =
            |keys: &[Vec<u8>]| MerkleTree::build(keys.iter().map(|k| (k.as_slice(), digest)));
        let (ta, tb) = (tree(a_keys), tree(&b_keys));
        let value_bytes = version.version.len() + version.value.len();
        full_bytes += a_keys.iter().map(|k| k.len() + value_bytes).sum::<usize>();
        // 1. A's branches.
        exchange_bytes += frame_len(&PeerMessage::AeBranches {
            partition,
            branches: ta.branches().to_vec(),
        });
        // 2. B's leaves under the differing branches.
        let mut leaves = Vec::new();
        for branch in 0..FANOUT {
            if ta.branches()[branch] != tb.branches()[branch] {
                for (i, &value) in tb.leaves_of(branch).iter().enumerate() {
                    leaves.push(((branch * FANOUT + i) as u32, value));
                }
            }
        }
        exchange_bytes += frame_len(&PeerMessage::AeLeaves { partition, leaves });
        let differing: Vec<u32> = ta.differing_leaves(&tb).iter().map(|&l| l as u32).collect();
        if differing.is_empty() {
            continue;
        }
        // 3. A's keys of the differing leaves; 4. B pulls what it lacks.
        let in_leaves = |keys: &[Vec<u8>]| -> Vec<(Vec<u8>, u32)> {
            keys.iter()
                .filter(|k| differing.contains(&(leaf_of(k) as u32)))
                .map(|k| (k.clone(), digest))
                .collect()
        };
        let listed = in_leaves(a_keys);
        let b_listed = in_leaves(&b_keys);
        exchange_bytes += frame_len(&PeerMessage::AeKeys {
            partition,
            leaves: differing.clone(),
            keys: listed.clone(),
        });
        let (_, pull) = ringkv_cluster::anti_entropy::compare(&b_listed, &listed);
        exchange_bytes += frame_len(&PeerMessage::AePull {
            partition,
            keys: pull.clone(),
        });
        // 5. A pushes each as a repair: key and stored set.
        for key in pull {
            pushed += 1;
            exchange_bytes += 48 + key.len() + value_bytes;
        }
    }
    let missing = keys / 100;
    println!(
        "{keys} keys over 1,024 partitions, {missing} missing on one replica: the exchange sent {exchange_bytes} bytes ({:.2} % of the {full_bytes} bytes of sending every key), {pushed} keys pushed",
        100.0 * exchange_bytes as f64 / full_bytes as f64
    );
    assert_eq!(
        pushed, missing,
        "every missing key, and only those, is pushed"
    );
    assert!(
        exchange_bytes * 5 < full_bytes,
        "the exchange costs {exchange_bytes} of {full_bytes} bytes"
    );
}
