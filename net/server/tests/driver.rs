//! The shard driver runs the cluster's Node over a real engine store: a one-node ring
//! gives Dynamo's versioning (§4.4) on a single machine, durably.

use std::path::Path;
use std::rc::Rc;

use ringkv_cluster::{
    ConflictMode, GetRequest, Member, Node, NodeConfig, NodeId, PutRequest, Quorum, Ring,
    Supersedes,
};
use ringkv_engine::disk::DmaDisk;
use ringkv_engine::{Store, StoreConfig};
use ringkv_server::ShardDriver;

fn one() -> Quorum {
    Quorum::new(1, 1, 1).expect("N=1, R=1, W=1 is a valid quorum")
}

async fn start(dir: &Path, epoch_seed: u64) -> Rc<ShardDriver<DmaDisk>> {
    let store = Store::open(DmaDisk::new(dir).unwrap(), StoreConfig::default())
        .await
        .unwrap();
    let runner = store.clone();
    glommio::spawn_local(async move { runner.run().await }).detach();
    let ring = Ring::new(64, &[Member::new(NodeId(1))]).unwrap();
    ShardDriver::new(
        Node::new(NodeConfig::new(NodeId(1), epoch_seed), ring),
        store,
    )
}

fn put(key: &[u8], value: Option<&[u8]>, context: Option<Vec<u8>>) -> PutRequest {
    PutRequest {
        key: key.to_vec(),
        value: value.map(<[u8]>::to_vec),
        supersedes: context.map_or(Supersedes::Nothing, Supersedes::Context),
        quorum: Some(one()),
        mode: ConflictMode::Causal,
        only_if_present: false,
        strict: false,
    }
}

fn get(key: &[u8]) -> GetRequest {
    GetRequest {
        key: key.to_vec(),
        quorum: Some(one()),
        strict: false,
    }
}

#[test]
fn siblings_contexts_deletes_and_restart_over_a_real_store() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().to_path_buf();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let driver = start(&path, 0).await;
            assert!(driver.get(get(b"k")).await.unwrap().values().is_empty());

            // Two writes without a context are concurrent: both are kept.
            driver.put(put(b"k", Some(b"a"), None)).await.unwrap();
            driver.put(put(b"k", Some(b"b"), None)).await.unwrap();
            let both = driver.get(get(b"k")).await.unwrap();
            let mut values: Vec<&[u8]> = both.values();
            values.sort();
            assert_eq!(values, vec![&b"a"[..], &b"b"[..]]);

            // A write with the context that saw both supersedes both.
            let context = both.context.encode();
            driver
                .put(put(b"k", Some(b"merged"), Some(context)))
                .await
                .unwrap();
            assert_eq!(
                driver.get(get(b"k")).await.unwrap().values(),
                vec![&b"merged"[..]]
            );

            // Superseding what a quorum holds (N = 1: the coordinator) replaces siblings.
            driver.put(put(b"r", Some(b"x"), None)).await.unwrap();
            driver.put(put(b"r", Some(b"y"), None)).await.unwrap();
            assert_eq!(driver.get(get(b"r")).await.unwrap().values().len(), 2);
            let replace = PutRequest {
                supersedes: Supersedes::QuorumHeld,
                ..put(b"r", Some(b"z"), None)
            };
            driver.put(replace).await.unwrap();
            assert_eq!(
                driver.get(get(b"r")).await.unwrap().values(),
                vec![&b"z"[..]]
            );

            // A delete with its context leaves no value.
            let seen = driver.get(get(b"k")).await.unwrap().context.encode();
            driver.put(put(b"k", None, Some(seen))).await.unwrap();
            assert!(driver.get(get(b"k")).await.unwrap().values().is_empty());

            driver
                .put(put(b"durable", Some(b"yes"), None))
                .await
                .unwrap();
            driver.store().close().await.unwrap();

            // Restart: a new epoch seed (as every start draws), the same data.
            let driver = start(&path, 1).await;
            assert_eq!(
                driver.get(get(b"durable")).await.unwrap().values(),
                vec![&b"yes"[..]]
            );
            assert!(driver.get(get(b"k")).await.unwrap().values().is_empty());
            driver
                .put(put(b"durable", Some(b"again"), None))
                .await
                .unwrap();
            assert_eq!(driver.get(get(b"durable")).await.unwrap().values().len(), 2);
        })
        .unwrap()
        .join()
        .unwrap();
}
