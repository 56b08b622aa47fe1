//! A real three-node cluster (three `ringkv server` processes on loopback, N=3) under
//! faults: kill -9, a stale node coming back, SIGSTOP, concurrent writers, bad peers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use redis::Value;
use ringkv_client::{Client, Error, PutMode, ReadOptions, WriteOptions};
use ringkv_proto::native::{decode_response, encode_request};
use ringkv_proto::peer::{ClusterSpec, MemberSpec, PEER_MAGIC, PeerHello};
use ringkv_proto::{Body, Op, PROTOCOL_VERSION, Request};

mod common;
use common::Cluster;

const W2: WriteOptions = WriteOptions {
    w: Some(2),
    timeout: None,
    strict: false,
};
const R2: ReadOptions = ReadOptions {
    r: Some(2),
    timeout: None,
    strict: false,
};

/// What an application does with an idempotent write whose outcome is unknown (in
/// flight on a connection to a node that just died): send it again.
fn put_until_acked(c: &Client, key: &[u8], value: &[u8]) {
    for _ in 0..5 {
        match c.put_with(key, value, PutMode::Latest, W2) {
            Ok(()) => return,
            Err(e) if e.outcome_unknown() => continue,
            Err(e) => panic!("write failed outright: {e}"),
        }
    }
    panic!("write never acknowledged");
}

/// Retries `check` until it holds or `within` passes (read repair is asynchronous).
fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn acknowledged_writes_survive_kill_9_of_one_node() {
    let mut cluster = Cluster::start(3);
    let c = cluster.client(&[1, 2, 3]);
    let mut acked = Vec::new();
    let mut unknown = 0;
    for i in 0..600u32 {
        if i == 200 {
            cluster.kill(3);
        }
        let key = format!("unique-{i}");
        match c.put_with(key.as_bytes(), &i.to_le_bytes(), PutMode::Latest, W2) {
            Ok(()) => acked.push((key, i)),
            Err(e) if e.outcome_unknown() => unknown += 1,
            Err(e) => panic!("write {i} failed outright: {e}"),
        }
    }
    assert!(
        acked.len() >= 550,
        "only {} of 600 acked ({unknown} unknown)",
        acked.len()
    );
    let check_all = |c: &Client, when: &str| {
        for (key, i) in &acked {
            let found = c.get_with(key.as_bytes(), R2).unwrap();
            assert_eq!(found.value(), Some(&i.to_le_bytes()[..]), "{key} {when}");
        }
    };
    check_all(&c, "while node 3 is down");
    cluster.restart(3);
    check_all(&c, "after node 3 restarted");
}

#[test]
fn concurrent_writers_leave_siblings_that_a_merged_write_resolves() {
    let cluster = Cluster::start(3);
    let mut a = cluster.redis(1);
    let mut b = cluster.redis(2);
    let _: () = redis::cmd("KV.PUT")
        .arg("cart")
        .arg("apple")
        .query(&mut a)
        .unwrap();
    let _: () = redis::cmd("KV.PUT")
        .arg("cart")
        .arg("pear")
        .query(&mut b)
        .unwrap();
    let (context, mut siblings): (Vec<u8>, Vec<String>) =
        redis::cmd("KV.GET").arg("cart").query(&mut a).unwrap();
    siblings.sort();
    assert_eq!(siblings, ["apple", "pear"]);
    // The client sees both too.
    let c = cluster.client(&[3]);
    let mut seen = c.get_with(b"cart", R2).unwrap().siblings;
    seen.sort();
    assert_eq!(seen, [b"apple".to_vec(), b"pear".to_vec()]);
    let _: () = redis::cmd("KV.PUT")
        .arg("cart")
        .arg("apple+pear")
        .arg("CONTEXT")
        .arg(&context)
        .query(&mut b)
        .unwrap();
    let found = c.get_with(b"cart", R2).unwrap();
    assert_eq!(found.siblings, [b"apple+pear".to_vec()]);
}

#[test]
fn a_stale_node_is_repaired_by_reads() {
    let mut cluster = Cluster::start(3);
    let c = cluster.client(&[1, 2]);
    for i in 0..30u32 {
        c.put_with(format!("k{i}").as_bytes(), b"old", PutMode::Latest, W2)
            .unwrap();
    }
    cluster.kill(3);
    for i in 0..30u32 {
        put_until_acked(&c, format!("k{i}").as_bytes(), b"new");
    }
    cluster.restart(3);
    // Quorum reads return the latest although node 3 missed it; each read repairs it.
    for i in 0..30u32 {
        let found = c.get_with(format!("k{i}").as_bytes(), R2).unwrap();
        assert_eq!(found.value(), Some(&b"new"[..]), "k{i}");
    }
    // With nodes 1 and 2 gone, node 3 alone answers R=1 from its own store: repaired.
    std::thread::sleep(Duration::from_millis(500));
    cluster.kill(1);
    cluster.kill(2);
    let alone = Client::builder()
        .seeds([cluster.native(3)])
        .request_timeout(Duration::from_secs(3))
        .connect_blocking()
        .unwrap();
    let r1 = ReadOptions {
        r: Some(1),
        timeout: None,
        strict: false,
    };
    for i in 0..30u32 {
        let key = format!("k{i}");
        let repaired = eventually(Duration::from_secs(5), || {
            alone
                .get_with(key.as_bytes(), r1)
                .is_ok_and(|f| f.value() == Some(b"new"))
        });
        assert!(repaired, "{key} was not repaired on node 3");
    }
}

#[test]
fn a_stopped_node_slows_nothing_that_two_replicas_can_answer() {
    let cluster = Cluster::start(3);
    let mut r = cluster.redis(1);
    let _: () = redis::cmd("KV.PUT")
        .arg("x")
        .arg("0")
        .arg("W")
        .arg(3)
        .query(&mut r)
        .unwrap();
    cluster.node(3).pause();
    for i in 1..=20 {
        let started = Instant::now();
        let _: () = redis::cmd("SET")
            .arg(format!("s{i}"))
            .arg(i)
            .query(&mut r)
            .unwrap();
        let value: String = redis::cmd("GET")
            .arg(format!("s{i}"))
            .query(&mut r)
            .unwrap();
        assert_eq!(value, i.to_string());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "W=2/R=2 waited on the stopped node"
        );
    }
    // Needing all three: Timeout or Unavailable, never a wrong answer.
    let all = redis::cmd("KV.PUT")
        .arg("x")
        .arg("1")
        .arg("W")
        .arg(3)
        .query::<Value>(&mut r);
    let message = all.unwrap_err().to_string();
    assert!(
        message.contains("TIMEOUT") || message.contains("UNAVAILABLE"),
        "{message}"
    );
    let read_all = redis::cmd("KV.GET")
        .arg("x")
        .arg("R")
        .arg(3)
        .query::<Value>(&mut r);
    let message = read_all.unwrap_err().to_string();
    assert!(
        message.contains("TIMEOUT") || message.contains("UNAVAILABLE"),
        "{message}"
    );
    cluster.node(3).resume();
    // Until its next heartbeat the node may still be suspected (Unavailable).
    let mut read = None;
    let back = eventually(Duration::from_secs(10), || {
        read = redis::cmd("KV.GET")
            .arg("x")
            .arg("R")
            .arg(3)
            .query::<(Vec<u8>, Vec<String>)>(&mut r)
            .ok();
        read.is_some()
    });
    assert!(back, "the resumed node answers reads again");
    // The write that timed out may or may not have happened; either value is right.
    let (_, values) = read.expect("read above");
    // KV.PUT without a context is a sibling: "1" either joined "0" or never landed.
    let mut values = values;
    values.sort();
    assert!(values == ["0"] || values == ["0", "1"], "{values:?}");
}

/// A request that waits out its timeout holds up nothing else on its connection: the
/// client pipelines every request for a shard over one connection, and the node
/// answers each as it is done and reads on meanwhile. A strict W=3 write with node 3
/// paused (before anyone suspects it) waits the full request timeout; reads sent
/// after it on the same connection come back first.
#[test]
fn a_slow_request_does_not_hold_up_the_others_on_its_connection() {
    let cluster = Cluster::start(3);
    // One connection per shard (the default, named here because the test is about it).
    let client = Client::builder()
        .seeds([cluster.native(1)])
        .connections_per_shard(1)
        .retry(ringkv_client::RetryPolicy::none())
        .connect_blocking()
        .expect("client connects");
    let c = std::sync::Arc::new(client);
    let map = c.routing_map().expect("a map");
    let on_node_1 = |prefix: &str| {
        (0..10_000)
            .map(|i| format!("{prefix}{i}"))
            .filter(|k| map.route(k.as_bytes()).is_some_and(|(n, _)| n.node_id == 1))
            .take(20)
            .collect::<Vec<_>>()
    };
    let slow_key = on_node_1("slow-").remove(0);
    let fast_keys = on_node_1("fast-");
    for key in &fast_keys {
        c.put(key.as_bytes(), b"v").expect("a write");
    }
    cluster.node(3).pause();
    let paused_at = Instant::now();
    let slow = {
        let c = c.clone();
        std::thread::spawn(move || {
            let all = WriteOptions {
                w: Some(3),
                timeout: None,
                strict: true,
            };
            let outcome = c.put_with(slow_key.as_bytes(), b"v", PutMode::Latest, all);
            (outcome, Instant::now())
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let one = ReadOptions {
        r: Some(1),
        timeout: None,
        strict: false,
    };
    for key in &fast_keys {
        let found = c.get_with(key.as_bytes(), one).expect("a read at R=1");
        assert_eq!(found.value(), Some(&b"v"[..]));
    }
    let fast_done = Instant::now();
    let (outcome, slow_done) = slow.join().unwrap();
    cluster.node(3).resume();
    let error = outcome.expect_err("a strict W=3 write with node 3 paused");
    assert!(
        error.outcome_unknown() || matches!(error, Error::Unavailable { .. }),
        "{error}"
    );
    assert!(
        slow_done - paused_at >= Duration::from_millis(800),
        "the write did not wait out its timeout ({:?}): the test proves nothing",
        slow_done - paused_at
    );
    assert!(
        fast_done < slow_done,
        "20 reads waited behind the slow write ({:?} after it)",
        fast_done - slow_done
    );
}

/// A paused node (SIGSTOP) keeps its TCP connections, so only its silence gives it
/// away: the gossip heartbeats stop, the phi detector suspects it, and a write that
/// needs it (W=3) fails at once as Unavailable instead of waiting out a Timeout. Once
/// it runs again its heartbeats clear the suspicion.
#[test]
fn a_paused_node_is_detected_by_its_silence_and_routed_around() {
    let cluster = Cluster::start(3);
    let mut r = cluster.redis(1);
    let put_w3 = |r: &mut redis::Connection, value: &str| {
        redis::cmd("KV.PUT")
            .arg("x")
            .arg(value)
            .arg("W")
            .arg(3)
            .query::<Value>(r)
    };
    put_w3(&mut r, "0").expect("all three nodes up");
    cluster.node(3).pause();
    let paused = Instant::now();
    let mut detected = None;
    while paused.elapsed() < Duration::from_secs(15) {
        let started = Instant::now();
        match put_w3(&mut r, "1") {
            Err(e) if e.to_string().contains("UNAVAILABLE") => {
                detected = Some(paused.elapsed());
                assert!(
                    started.elapsed() < Duration::from_millis(500),
                    "Unavailable is answered at once, not after a timeout"
                );
                break;
            }
            Err(e) if e.to_string().contains("TIMEOUT") => {}
            other => panic!("a W=3 write with a node paused: {other:?}"),
        }
    }
    let detected = detected.expect("the paused node was never suspected");
    println!("paused node routed around {detected:?} after SIGSTOP");
    // What two replicas can answer keeps working.
    let _: () = redis::cmd("SET").arg("y").arg("1").query(&mut r).unwrap();
    cluster.node(3).resume();
    let back = eventually(Duration::from_secs(15), || put_w3(&mut r, "2").is_ok());
    assert!(back, "W=3 writes succeed again once the node runs");
}

#[test]
fn bad_peers_are_dropped_and_the_cluster_keeps_serving() {
    let cluster = Cluster::start(3);
    let addr = cluster.native(1);
    let exchange = |request: &Request| -> Option<Body> {
        let mut stream = TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut out = Vec::new();
        encode_request(request, &mut out).unwrap();
        stream.write_all(&out).unwrap();
        let mut input = Vec::new();
        let _ = stream.read_to_end(&mut input);
        let (payload, _) = ringkv_proto::frame::next_frame(&input).ok()??;
        decode_response(&input[payload], &mut rkyv::util::AlignedVec::new())
            .ok()
            .map(|r| r.body)
    };
    // A node whose data has another shape, a stranger, and one that speaks a future
    // version. (Member lists may differ: the ring view says who the members are.)
    let id = ringkv_server::ring_change::view(&addr, Duration::from_secs(5))
        .expect("the node's ring view")
        .cluster;
    let wrong = ClusterSpec {
        id,
        partitions: 128,
        replicas: 3,
        members: vec![MemberSpec {
            node_id: 2,
            native: "127.0.0.1:1".into(),
        }],
    };
    let hello = |cluster: ClusterSpec, version, from_node| Request {
        id: 1,
        op: Op::PeerHello(PeerHello {
            magic: PEER_MAGIC,
            version,
            cluster,
            from_node,
            from_shard: 0,
        }),
    };
    let mut stranger = wrong.clone();
    stranger.partitions = 64;
    let mut foreign = stranger.clone();
    foreign.id ^= 1;
    for (request, why) in [
        (hello(foreign, PROTOCOL_VERSION, 2), "another cluster"),
        (hello(wrong.clone(), PROTOCOL_VERSION, 2), "shapes differ"),
        (hello(stranger, PROTOCOL_VERSION, 9), "not a member"),
        (hello(wrong, PROTOCOL_VERSION + 1, 2), "version"),
    ] {
        match exchange(&request) {
            Some(Body::Error(e)) => assert!(e.to_string().contains(why), "{e}"),
            other => panic!("a bad peer was answered {other:?}"),
        }
    }
    // Garbage on the native and Redis ports.
    for port in [
        cluster.native(1),
        format!("127.0.0.1:{}", cluster.resp_port(1)),
    ] {
        let mut stream = TcpStream::connect(&port).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = stream.write_all(&[0xff; 64]);
        let _ = stream.read_to_end(&mut Vec::new());
    }
    let c = cluster.client(&[1]);
    c.put_with(b"still", b"here", PutMode::Latest, W2).unwrap();
    assert_eq!(
        c.get_with(b"still", R2).unwrap().value(),
        Some(&b"here"[..])
    );
    let all = ReadOptions {
        r: Some(3),
        timeout: None,
        strict: false,
    };
    assert_eq!(
        c.get_with(b"still", all).unwrap().value(),
        Some(&b"here"[..])
    );
    assert!(!matches!(
        c.get_with(b"absent", all),
        Err(Error::Unavailable { .. })
    ));
}

/// Nodes with different shard counts (2, 1, 2: this machine has two cores): every reply must reach the one shard that asked
/// (request ids are unique per node, not just per shard), or quorums would count
/// answers about other keys.
#[test]
fn nodes_with_different_shard_counts_answer_every_quorum_correctly() {
    let cluster = Cluster::start_with_shards(&[2, 1, 2]);
    let all_w = WriteOptions {
        w: Some(3),
        timeout: None,
        strict: false,
    };
    let all_r = ReadOptions {
        r: Some(3),
        timeout: None,
        strict: false,
    };
    for seed in [1, 2, 3] {
        let c = cluster.client(&[seed]);
        let keys: Vec<Vec<u8>> = (0..150u32)
            .map(|i| format!("s{seed}-{i}").into_bytes())
            .collect();
        // Many writes in flight at once, so both of a node's shards have requests out.
        let writes = keys.iter().map(|k| {
            let c = c.as_async().clone();
            let k = k.clone();
            async move { c.put_with(&k, &k, PutMode::Latest, all_w).await }
        });
        let runtime = tokio::runtime::Runtime::new().unwrap();
        for result in runtime.block_on(futures_util::future::join_all(writes)) {
            result.unwrap();
        }
        for key in &keys {
            let found = c.get_with(key, all_r).unwrap();
            assert_eq!(
                found.siblings,
                vec![key.clone()],
                "{}",
                String::from_utf8_lossy(key)
            );
        }
    }
}

/// Issue 10: a node whose data directory is lost (a replaced disk) comes back under
/// the same id. It must not reuse the version dots it issued before: the other
/// replicas would take its new writes for ones they hold, drop them, and still ack.
/// Every kind of write made through it afterwards (blind, with a context, SET, DEL),
/// while other clients keep writing through the other nodes, must be readable at R=2
/// from every node; so must everything the others acked.
#[test]
fn a_node_restarted_with_an_empty_data_directory_loses_no_acknowledged_write() {
    const KEYS: usize = 40;
    let mut cluster = Cluster::start(3);
    let mut three = cluster.redis(3);
    // Node 3 coordinates six writes of every key, so its old actor reached counter 6.
    for round in 0..6 {
        for k in 0..KEYS {
            let _: String = redis::cmd("SET")
                .arg(format!("key-{k}"))
                .arg(format!("old-{round}"))
                .query(&mut three)
                .unwrap();
        }
    }
    // Every replica has them before the disk goes.
    let all = cluster.client(&[1, 2]);
    let r3 = ReadOptions {
        r: Some(3),
        timeout: None,
        strict: false,
    };
    for k in 0..KEYS {
        let found = all.get_with(format!("key-{k}").as_bytes(), r3).unwrap();
        assert_eq!(
            found.value(),
            Some(&b"old-5"[..]),
            "key-{k} before the wipe"
        );
    }

    // Load through nodes 1 and 2 for the whole restart.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let background = {
        let (stop, seeds) = (stop.clone(), [cluster.native(1), cluster.native(2)]);
        std::thread::spawn(move || {
            let c = Client::builder()
                .seeds(seeds)
                .request_timeout(Duration::from_secs(3))
                .connect_blocking()
                .unwrap();
            let mut acked = Vec::new();
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let key = format!("load-{i}");
                if c.put_with(key.as_bytes(), &i.to_le_bytes(), PutMode::Latest, W2)
                    .is_ok()
                {
                    acked.push((key, i));
                }
                i += 1;
            }
            acked
        })
    };
    cluster.kill(3);
    cluster.wipe(3);
    cluster.restart_unwaited(3);
    let ready = Instant::now();
    let mut three = cluster.redis(3);

    // A W=2 write through the restarted node within 2 s of ready (60 ms here). It took
    // 1.06 s before the peers' links noticed the old node's connections close: their
    // first ack went into a dead socket and the first put timed out.
    let first = eventually(Duration::from_secs(2), || {
        redis::cmd("KV.PUT")
            .arg("first-after-restart")
            .arg("yes")
            .arg("W")
            .arg(2)
            .query::<String>(&mut three)
            .is_ok()
    });
    assert!(first, "no W=2 write through node 3 within 2 s of ready");
    println!(
        "first W=2 write through the restarted node {:?} after ready",
        ready.elapsed()
    );

    // Every kind of write through node 3, each key acked once.
    let mut expected: Vec<(String, Option<String>)> = Vec::new();
    for k in 0..KEYS {
        let key = format!("key-{k}");
        let new = format!("new-{k}");
        let write = |three: &mut redis::Connection| match k % 4 {
            0 => redis::cmd("KV.PUT")
                .arg(&key)
                .arg(&new)
                .arg("W")
                .arg(2)
                .query::<String>(three),
            1 => {
                let (context, _): (Vec<u8>, Vec<Vec<u8>>) = redis::cmd("KV.GET")
                    .arg(&key)
                    .arg("R")
                    .arg(2)
                    .query(three)?;
                redis::cmd("KV.PUT")
                    .arg(&key)
                    .arg(&new)
                    .arg("CONTEXT")
                    .arg(context)
                    .arg("W")
                    .arg(2)
                    .query::<String>(three)
            }
            2 => redis::cmd("SET").arg(&key).arg(&new).query::<String>(three),
            _ => redis::cmd("DEL")
                .arg(&key)
                .query::<i64>(three)
                .map(|n| n.to_string()),
        };
        // A write whose outcome is unknown (a timeout on this loaded machine) is sent
        // again, as an application would; each kind of write is idempotent here.
        let mut written = write(&mut three);
        for _ in 0..5 {
            if written.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
            written = write(&mut three);
        }
        let written = written.unwrap_or_else(|e| panic!("{key} through node 3: {e}"));
        expected.push((key, (k % 4 != 3).then_some(new)));
        assert!(!written.is_empty());
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let load = background.join().unwrap();
    assert!(load.len() > 20, "the load acked only {} writes", load.len());

    for id in 1..=3 {
        let c = cluster.client(&[id]);
        for (key, new) in &expected {
            let found = c.get_with(key.as_bytes(), R2).unwrap();
            let values: Vec<&[u8]> = found.siblings.iter().map(Vec::as_slice).collect();
            match new {
                Some(new) => assert!(
                    values.contains(&new.as_bytes()),
                    "node {id}: the acknowledged {new} of {key} is gone: {values:?}"
                ),
                None => assert!(
                    values.is_empty(),
                    "node {id}: {key} was deleted through node 3 but reads {values:?}"
                ),
            }
        }
        for (key, i) in &load {
            let found = c.get_with(key.as_bytes(), R2).unwrap();
            assert_eq!(
                found.value(),
                Some(&i.to_le_bytes()[..]),
                "node {id}: {key}"
            );
        }
    }
    println!(
        "{} keys written through the wiped node and {} by the load, all readable at R=2 from every node",
        expected.len(),
        load.len()
    );
}

/// A write sent to a node that holds no replica of its key is forwarded to one that
/// does, and the client gets that replica's real outcome, with the W it asked for:
/// OK when a quorum acks, Unavailable naming W when too few replicas are up.
#[test]
fn a_forwarded_write_reports_its_real_quorum_outcome() {
    use ringkv_cluster::{Member, NodeId, Ring};
    let mut cluster = Cluster::start(4);
    let members: Vec<Member> = (1..=4).map(|i| Member::new(NodeId(i))).collect();
    let ring = Ring::new(64, &members).unwrap();
    // A key node 4 holds no replica of, and its three replicas.
    let (key, replicas) = (0..)
        .map(|i| format!("forwarded-{i}"))
        .map(|key| {
            let replicas = ring.preference_list_for_key(key.as_bytes(), 3);
            (key, replicas)
        })
        .find(|(_, replicas)| !replicas.contains(&NodeId(4)))
        .unwrap();
    let mut four = cluster.redis(4);
    // STRICT: only the key's own replicas count (a sloppy write would let node 4
    // stand in for the dead ones, as checked at the end).
    let put = |conn: &mut redis::Connection, w: usize| {
        redis::cmd("KV.PUT")
            .arg(&key)
            .arg("v")
            .arg("W")
            .arg(w)
            .arg("STRICT")
            .query::<String>(conn)
    };
    assert_eq!(put(&mut four, 2).unwrap(), "OK");
    assert_eq!(put(&mut four, 3).unwrap(), "OK");
    // Two of the three replicas go: the one left coordinates and refuses W=2. (Node 4
    // notices a killed peer when its link's connection closes, within milliseconds;
    // a write forwarded before that would time out, hence the retries.)
    cluster.kill(replicas[0].0 as usize);
    cluster.kill(replicas[1].0 as usize);
    // Retries until the W=`w` put through node 4 fails with `expected`.
    let refused_with = |four: &mut redis::Connection, w: usize, expected: &str| {
        let refused = eventually(Duration::from_secs(15), || {
            put(four, w).is_err_and(|e| e.to_string().contains(expected))
        });
        assert!(refused, "last answer: {:?}", put(four, w));
    };
    refused_with(
        &mut four,
        2,
        "UNAVAILABLE: 1 replicas reachable, 2 required",
    );
    // W=1 still succeeds through the one replica left; sloppy, W=2 does too, with
    // node 4 standing in for a dead replica.
    assert_eq!(put(&mut four, 1).unwrap(), "OK");
    let sloppy: String = redis::cmd("KV.PUT")
        .arg(&key)
        .arg("v")
        .arg("W")
        .arg(2)
        .query(&mut four)
        .unwrap();
    assert_eq!(sloppy, "OK");
    // No replica left: node 4 itself says none is reachable, with the W asked for.
    cluster.kill(replicas[2].0 as usize);
    refused_with(
        &mut four,
        3,
        "UNAVAILABLE: 0 replicas reachable, 3 required",
    );
}
