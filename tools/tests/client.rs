//! ringkv-client against a real `ringkv server` process: every API, pipelining,
//! timeouts on a node that stops answering, retries, and reconnecting after a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ringkv_client::{AsyncClient, Client, Error, PutMode, ReadOptions, RetryPolicy, WriteOptions};

mod common;
use common::{Server, tempdir};

fn client(server: &Server) -> Client {
    Client::builder()
        .seeds([server.native.clone()])
        .request_timeout(Duration::from_secs(5))
        .connect_blocking()
        .expect("client connects")
}

#[test]
fn every_blocking_api_against_a_real_node() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let c = client(&server);
    c.ping().unwrap();

    // Put/get, binary-safe, empty values, absent keys.
    c.put(b"k", b"v1").unwrap();
    c.put(b"k", b"v2").unwrap();
    assert_eq!(c.get(b"k").unwrap().value(), Some(&b"v2"[..]));
    c.put(b"\x00\xff", b"").unwrap();
    assert_eq!(c.get(b"\x00\xff").unwrap().siblings, vec![Vec::<u8>::new()]);
    assert!(c.get(b"absent").unwrap().is_empty());

    // Siblings from writes that saw nothing; a put with their context resolves them.
    let blind = |v: &[u8]| c.put_with(b"s", v, PutMode::Sibling, WriteOptions::default());
    blind(b"a").unwrap();
    blind(b"b").unwrap();
    let both = c.get(b"s").unwrap();
    let mut siblings = both.siblings.clone();
    siblings.sort();
    assert_eq!(siblings, vec![b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(both.value(), None);
    c.put_after(b"s", b"ab", &both.context).unwrap();
    assert_eq!(c.get(b"s").unwrap().siblings, vec![b"ab".to_vec()]);

    // Read-merge-write sees every sibling.
    blind(b"c").unwrap();
    c.modify(b"s", |siblings| {
        let mut all: Vec<u8> = siblings.concat();
        all.sort();
        Some(all)
    })
    .unwrap();
    assert_eq!(c.get(b"s").unwrap().siblings, vec![b"abc".to_vec()]);
    c.modify(b"s", |_| None).unwrap();
    assert!(c.get(b"s").unwrap().is_empty());

    // Delete.
    c.delete(b"k").unwrap();
    assert!(c.get(b"k").unwrap().is_empty());

    // Multi-key, per-request options, typed errors.
    let keys: Vec<Vec<u8>> = (0..50u32).map(|i| format!("m{i}").into_bytes()).collect();
    let items: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (&k[..], &k[..])).collect();
    assert!(c.multi_put(&items).iter().all(Result::is_ok));
    let refs: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
    for (key, found) in keys.iter().zip(c.multi_get(&refs)) {
        assert_eq!(found.unwrap().siblings, vec![key.clone()]);
    }
    let r1 = ReadOptions {
        r: Some(1),
        timeout: Some(Duration::from_secs(1)),
        strict: false,
    };
    assert_eq!(c.get_with(b"m1", r1).unwrap().value(), Some(&b"m1"[..]));
    let too_many = ReadOptions {
        r: Some(3),
        ..ReadOptions::default()
    };
    assert!(matches!(
        c.get_with(b"m1", too_many),
        Err(Error::InvalidArgument(_))
    ));
    let huge = vec![0u8; 2 << 20];
    let refused = c.put(b"big", &huge).unwrap_err();
    assert!(matches!(refused, Error::TooLarge { .. }), "{refused}");
    assert!(!refused.retry_safe() && !refused.outcome_unknown());

    // Topology and status describe this node.
    let topology = c.topology().unwrap();
    assert_eq!(topology.partitions, 64);
    assert_eq!(topology.nodes[0].native, server.native);
    let status = c.status().unwrap();
    assert_eq!(status.len(), 1);
    let shards = &status[0].shards;
    assert_eq!(shards.len(), 2);
    assert_eq!(shards.iter().map(|s| s.partitions).sum::<u32>(), 64);
    // Every request went straight to the owning shard and both shards served some.
    assert!(shards.iter().all(|s| s.writes > 0 && s.reads > 0));
    assert_eq!(shards.iter().map(|s| s.keys).sum::<u64>(), 51);
}

#[test]
fn many_threads_pipeline_over_one_client() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let c = Arc::new(client(&server));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    let key = format!("t{t}-{i}");
                    c.put(key.as_bytes(), key.as_bytes()).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    for t in 0..8 {
        for i in (0..200).step_by(17) {
            let key = format!("t{t}-{i}");
            assert_eq!(c.get(key.as_bytes()).unwrap().value(), Some(key.as_bytes()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_client_keeps_many_requests_in_flight() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let c = AsyncClient::builder()
        .seeds([server.native.clone()])
        .connect()
        .await
        .unwrap();
    let writes = (0..1000u32).map(|i| {
        let c = c.clone();
        tokio::spawn(async move { c.put(&i.to_be_bytes(), &i.to_le_bytes()).await })
    });
    for write in writes.collect::<Vec<_>>() {
        write.await.unwrap().unwrap();
    }
    for i in (0..1000u32).step_by(7) {
        let found = c.get(&i.to_be_bytes()).await.unwrap();
        assert_eq!(found.value(), Some(&i.to_le_bytes()[..]));
    }
    drop(server);
}

#[test]
fn a_node_that_stops_answering_times_out_and_the_client_recovers() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let c = Client::builder()
        .seeds([server.native.clone()])
        .request_timeout(Duration::from_millis(300))
        .retry(RetryPolicy::none())
        .connect_blocking()
        .unwrap();
    c.put(b"k", b"before").unwrap();
    server.pause();
    let started = Instant::now();
    let write = c.put(b"k", b"during").unwrap_err();
    assert!(write.outcome_unknown() && !write.retry_safe(), "{write}");
    assert!(matches!(write, Error::Timeout { .. }), "{write}");
    let read = c.get(b"k").unwrap_err();
    assert!(matches!(read, Error::Timeout { .. }), "{read}");
    assert!(started.elapsed() < Duration::from_secs(5));
    server.resume();
    // The write that timed out may or may not have happened; either value is right.
    let after = c.get(b"k").unwrap();
    assert!(after.value() == Some(b"before") || after.value() == Some(b"during"));
}

#[test]
fn the_client_reconnects_and_refreshes_after_a_restart() {
    let dir = tempdir();
    let server = Server::start(dir.path());
    let c = Client::builder()
        .seeds([server.native.clone()])
        .retry(RetryPolicy {
            attempts: 50,
            backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
        })
        .connect_blocking()
        .unwrap();
    c.put(b"k", b"kept").unwrap();
    let server = server.restart();
    // The old connections are dead; a read is safe to retry, so it just works.
    assert_eq!(c.get(b"k").unwrap().value(), Some(&b"kept"[..]));
    c.put(b"k2", b"new").unwrap();
    assert_eq!(c.topology().unwrap().nodes[0].native, server.native);

    // Nothing listening at all: a clear connect error, safe to retry.
    drop(server);
    let gone = Client::builder()
        .seeds(["127.0.0.1:1"])
        .connect_timeout(Duration::from_millis(200))
        .connect_blocking()
        .err()
        .expect("no node to connect to");
    assert!(
        matches!(gone, Error::Connect { .. }) && gone.retry_safe(),
        "{gone}"
    );
}
