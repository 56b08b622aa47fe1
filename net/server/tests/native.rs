//! The native protocol end to end: a real node (two shards) on loopback, spoken to over
//! plain sockets with ringkv-proto's codec.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use ringkv_cluster::{Member, NodeId, Ring};
use ringkv_proto::frame::next_frame;
use ringkv_proto::native::{MAGIC, decode_response, encode_request, hello};
use ringkv_proto::{
    Body, ErrorReply, Found, MAX_FRAME, Op, PROTOCOL_VERSION, Put, Request, Response, WriteContext,
    partition_of,
};
use rkyv::util::AlignedVec;

mod common;
use common::{Node, free_ports, native_port};

/// A blocking native connection that has done its handshake.
struct Conn {
    stream: TcpStream,
    input: Vec<u8>,
    next_id: u64,
}

impl Conn {
    fn raw(port: u16) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Conn {
            stream,
            input: Vec::new(),
            next_id: 1,
        }
    }

    fn open(port: u16) -> (Conn, ringkv_proto::Welcome) {
        let mut conn = Conn::raw(port);
        conn.send(&[hello(0, "test")]);
        match conn.receive().body {
            Body::Welcome(welcome) => (conn, welcome),
            other => panic!("handshake answered {other:?}"),
        }
    }

    fn send(&mut self, requests: &[Request]) {
        let mut out = Vec::new();
        for request in requests {
            encode_request(request, &mut out).unwrap();
        }
        self.stream.write_all(&out).unwrap();
    }

    /// The next response, or None when the node closed the connection.
    fn try_receive(&mut self) -> Option<Response> {
        loop {
            if let Some((payload, end)) = next_frame(&self.input).unwrap() {
                let response =
                    decode_response(&self.input[payload], &mut AlignedVec::new()).unwrap();
                self.input.drain(..end);
                return Some(response);
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn receive(&mut self) -> Response {
        self.try_receive().expect("a response before the close")
    }

    fn call(&mut self, op: Op) -> Body {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&[Request { id, op }]);
        let response = self.receive();
        assert_eq!(response.id, id);
        response.body
    }

    fn get(&mut self, key: &[u8]) -> Found {
        match self.call(Op::Get {
            key: key.to_vec(),
            r: None,
            strict: false,
        }) {
            Body::Found(found) => found,
            other => panic!("get answered {other:?}"),
        }
    }

    fn put(&mut self, key: &[u8], value: &[u8], context: WriteContext) -> Body {
        self.call(Op::Put(Put {
            key: key.to_vec(),
            value: value.to_vec(),
            context,
            w: None,
            strict: false,
        }))
    }
}

fn sorted(mut values: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    values.sort();
    values
}

#[test]
fn every_operation_over_the_native_protocol() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let base = free_ports();
    let node = Node::start(dir.path(), base);
    let (mut c, welcome) = Conn::open(native_port(base));
    assert_eq!(
        (welcome.version, welcome.node_id, welcome.shards),
        (PROTOCOL_VERSION, 1, 2)
    );
    let first_shard_port = format!("127.0.0.1:{}", native_port(base) + 1);
    assert_eq!(welcome.shard_native.first(), Some(&first_shard_port));
    assert_eq!(c.call(Op::Ping), Body::Pong);

    // Latest replaces, like SET; binary-safe keys and values, empty values.
    let key = b"\x00bin\r\nkey\xff".to_vec();
    assert_eq!(c.put(&key, b"one", WriteContext::Latest), Body::Written);
    assert_eq!(
        c.put(&key, b"\x00\xff\r\n", WriteContext::Latest),
        Body::Written
    );
    assert_eq!(c.get(&key).siblings, vec![b"\x00\xff\r\n".to_vec()]);
    assert_eq!(c.put(b"empty", b"", WriteContext::Latest), Body::Written);
    assert_eq!(c.get(b"empty").siblings, vec![Vec::<u8>::new()]);
    let absent = c.get(b"never written");
    assert!(absent.siblings.is_empty());

    // Blind writes become siblings; a write with their context resolves them.
    assert_eq!(c.put(b"s", b"a", WriteContext::Blind), Body::Written);
    assert_eq!(c.put(b"s", b"b", WriteContext::Blind), Body::Written);
    let both = c.get(b"s");
    assert_eq!(
        sorted(both.siblings.clone()),
        vec![b"a".to_vec(), b"b".to_vec()]
    );
    let merged = WriteContext::Given(both.context);
    assert_eq!(c.put(b"s", b"ab", merged), Body::Written);
    assert_eq!(c.get(b"s").siblings, vec![b"ab".to_vec()]);

    // Delete with the context read: gone.
    let seen = c.get(b"s").context;
    let deleted = c.call(Op::Delete {
        key: b"s".to_vec(),
        context: WriteContext::Given(seen),
        w: None,
        strict: false,
    });
    assert_eq!(deleted, Body::Written);
    assert!(c.get(b"s").siblings.is_empty());

    // Multi-put and multi-get, in order, each key on whichever shard owns it.
    let puts: Vec<Put> = (0..20u32)
        .map(|i| Put {
            key: format!("m{i}").into_bytes(),
            value: i.to_le_bytes().to_vec(),
            context: WriteContext::Latest,
            w: None,
            strict: false,
        })
        .collect();
    assert_eq!(
        c.call(Op::MultiPut(puts)),
        Body::WrittenMany(vec![Ok(()); 20])
    );
    let keys: Vec<Vec<u8>> = (0..21u32).map(|i| format!("m{i}").into_bytes()).collect();
    let Body::FoundMany(found) = c.call(Op::MultiGet { keys, r: None }) else {
        panic!("multi-get answered otherwise");
    };
    for (i, result) in found.iter().enumerate() {
        let expected: Vec<Vec<u8>> = if i < 20 {
            vec![(i as u32).to_le_bytes().to_vec()]
        } else {
            Vec::new()
        };
        assert_eq!(result.as_ref().unwrap().siblings, expected, "key m{i}");
    }

    // Limits and bad quorums are typed errors, and the connection goes on.
    let big_key = vec![b'k'; 65 << 10];
    assert!(matches!(
        c.put(&big_key, b"v", WriteContext::Latest),
        Body::Error(ErrorReply::TooLarge { .. })
    ));
    assert!(matches!(
        c.put(b"v", &vec![0u8; (64 << 10) + 1], WriteContext::Latest),
        Body::Error(ErrorReply::TooLarge { size, limit: 65536, .. }) if size == 65537
    ));
    // Siblings share the store's value limit: a write that would push them over it is
    // refused at once as TooLarge, and the siblings already there are untouched.
    let half = vec![7u8; 40 << 10];
    assert_eq!(
        c.put(b"big siblings", &half, WriteContext::Blind),
        Body::Written
    );
    assert!(matches!(
        c.put(b"big siblings", &half, WriteContext::Blind),
        Body::Error(ErrorReply::TooLarge { size, .. }) if size == 80 << 10
    ));
    assert_eq!(c.get(b"big siblings").siblings, vec![half.clone()]);
    let bad_quorum = c.call(Op::Get {
        key: b"k".to_vec(),
        r: Some(2),
        strict: false,
    });
    assert!(matches!(
        bad_quorum,
        Body::Error(ErrorReply::InvalidArgument { .. })
    ));
    let bad_context = c.put(b"k", b"v", WriteContext::Given(b"junk".to_vec()));
    assert!(matches!(
        bad_context,
        Body::Error(ErrorReply::InvalidArgument { .. })
    ));
    let second_hello = c.call(hello(0, "again").op);
    assert!(matches!(
        second_hello,
        Body::Error(ErrorReply::InvalidArgument { .. })
    ));
    assert_eq!(c.call(Op::Ping), Body::Pong);

    // Topology: this node, its shard ports, a partition map that agrees with the ring.
    let Body::Topology(topology) = c.call(Op::Topology) else {
        panic!("topology answered otherwise");
    };
    assert_eq!((topology.node_id, topology.partitions), (1, 64));
    let me = topology.node(1).unwrap();
    assert_eq!(me.native, format!("127.0.0.1:{}", native_port(base)));
    assert_eq!(me.shard_native.len(), 2);
    let ring = Ring::new(64, &[Member::new(NodeId(1))]).unwrap();
    for i in 0..500u32 {
        let key = format!("key{i}");
        assert_eq!(
            partition_of(key.as_bytes(), 64),
            ring.partition_of(key.as_bytes()).0
        );
    }
    // Each shard's own port lands on that shard.
    for (shard, addr) in me.shard_native.iter().enumerate() {
        let port = addr.rsplit(':').next().unwrap().parse().unwrap();
        let (mut direct, welcome) = Conn::open(port);
        assert_eq!(welcome.shard as usize, shard);
        // And serves keys of every shard (the other's with one hop).
        assert_eq!(
            direct.get(b"m3").siblings,
            vec![3u32.to_le_bytes().to_vec()]
        );
    }
    drop(c);
    node.stop();

    // Restart: the same data.
    let node = Node::start(dir.path(), base);
    let (mut c, _) = Conn::open(native_port(base));
    assert_eq!(c.get(&key).siblings, vec![b"\x00\xff\r\n".to_vec()]);
    assert_eq!(c.get(b"m19").siblings, vec![19u32.to_le_bytes().to_vec()]);
    drop(c);
    node.stop();
}

#[test]
fn pipelined_requests_are_answered_by_id() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let base = free_ports();
    let node = Node::start(dir.path(), base);
    let (mut c, _) = Conn::open(native_port(base));
    // A write then a read of each key, all sent before any answer is read: the read
    // sees the write, because requests on one key run in arrival order.
    let mut requests = Vec::new();
    for i in 0..300u64 {
        let key = format!("p{}", i % 100).into_bytes();
        let op = if i % 3 == 2 {
            Op::Get {
                key,
                r: None,
                strict: false,
            }
        } else {
            Op::Put(Put {
                key,
                value: i.to_le_bytes().to_vec(),
                context: WriteContext::Latest,
                w: None,
                strict: false,
            })
        };
        requests.push(Request { id: 1000 + i, op });
    }
    c.send(&requests);
    let mut answered = std::collections::BTreeMap::new();
    for _ in 0..requests.len() {
        let response = c.receive();
        answered.insert(response.id, response.body);
    }
    assert_eq!(answered.len(), 300);
    for i in 0..300u64 {
        let body = &answered[&(1000 + i)];
        if i % 3 == 2 {
            // The last put of the same key before it: i - 1 or i - 2 share i % 100 only
            // when they are i - 100k; within one pass of 100 keys the put was i - 100.
            let last_put = (0..i).rev().find(|j| j % 100 == i % 100 && j % 3 != 2);
            let expected: Vec<Vec<u8>> = last_put
                .map(|j| j.to_le_bytes().to_vec())
                .into_iter()
                .collect();
            assert_eq!(
                body,
                &Body::Found(Found {
                    context: match body {
                        Body::Found(f) => f.context.clone(),
                        _ => panic!("request {i} answered {body:?}"),
                    },
                    siblings: expected,
                    stand_ins: 0,
                }),
                "request {i}"
            );
        } else {
            assert_eq!(body, &Body::Written, "request {i}");
        }
    }
    drop(c);
    node.stop();
}

#[test]
fn bad_handshakes_and_malformed_frames_close_only_that_connection() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let base = free_ports();
    let node = Node::start(dir.path(), base);
    let port = native_port(base);
    let (mut bystander, _) = Conn::open(port);

    // A request before the handshake: refused and closed.
    let mut c = Conn::raw(port);
    c.send(&[Request {
        id: 5,
        op: Op::Ping,
    }]);
    let refused = c.receive();
    assert_eq!(refused.id, 5);
    assert!(matches!(
        refused.body,
        Body::Error(ErrorReply::InvalidArgument { .. })
    ));
    assert_eq!(c.try_receive(), None);

    // A version this node does not speak, and a foreign magic.
    for (magic, min, max) in [
        (MAGIC, PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3),
        (7, 1, 1),
    ] {
        let mut c = Conn::raw(port);
        let op = Op::Hello {
            magic,
            min_version: min,
            max_version: max,
            client: "x".into(),
        };
        c.send(&[Request { id: 1, op }]);
        assert!(matches!(
            c.receive().body,
            Body::Error(ErrorReply::InvalidArgument { .. })
        ));
        assert_eq!(c.try_receive(), None);
    }

    // A frame announcing more than the limit: refused from its header, then closed.
    let (mut c, _) = Conn::open(port);
    c.stream
        .write_all(&((MAX_FRAME + 1) as u32).to_le_bytes())
        .unwrap();
    let error = c.receive();
    assert_eq!(error.id, 0);
    assert!(
        matches!(&error.body, Body::Error(ErrorReply::InvalidArgument { message }) if message.contains("exceeds"))
    );
    assert_eq!(c.try_receive(), None);

    // A frame that is no archive; a response where a request belongs.
    let (mut c, _) = Conn::open(port);
    c.stream
        .write_all(&[8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
        .unwrap();
    assert_eq!(c.receive().id, 0);
    assert_eq!(c.try_receive(), None);
    // A valid request whose enum tag was damaged.
    let (mut c, _) = Conn::open(port);
    let mut ping = Vec::new();
    encode_request(
        &Request {
            id: 9,
            op: Op::Ping,
        },
        &mut ping,
    )
    .unwrap();
    let tags: Vec<usize> = (4..ping.len())
        .filter(|&i| ping[i] != 0 && ping[i] != 9)
        .collect();
    for at in tags {
        ping[at] = 0xEE;
    }
    c.stream.write_all(&ping).unwrap();
    assert_eq!(c.receive().id, 0);
    assert_eq!(c.try_receive(), None);

    // The connection that behaved never noticed.
    assert_eq!(bystander.call(Op::Ping), Body::Pong);
    drop(bystander);
    node.stop();
}

/// Random bytes, truncated frames and bit-flipped archives on both listeners: the node
/// keeps serving, with every write it acknowledged intact.
#[test]
fn fuzzed_input_on_both_listeners_never_hurts_the_node() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let base = free_ports();
    let node = Node::start(dir.path(), base);
    let port = native_port(base);
    let (mut c, _) = Conn::open(port);
    assert_eq!(c.put(b"keep", b"me", WriteContext::Latest), Body::Written);

    let mut valid = Vec::new();
    encode_request(&hello(1, "fuzz"), &mut valid).unwrap();
    let put = Op::Put(Put {
        key: b"fuzz".to_vec(),
        value: b"value".to_vec(),
        context: WriteContext::Blind,
        w: Some(1),
        strict: false,
    });
    encode_request(&Request { id: 2, op: put }, &mut valid).unwrap();
    let resp_valid = b"*3\r\n$3\r\nSET\r\n$4\r\nfuzz\r\n$5\r\nvalue\r\n".to_vec();

    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let seed = rng.get_seed();
    println!("fuzz seed {seed:#x}");
    for round in 0..300 {
        let (target, template) = if round % 2 == 0 {
            (port, &valid)
        } else {
            (base, &resp_valid)
        };
        let mut bytes = template.clone();
        match rng.u8(0..3) {
            0 => bytes = (0..rng.usize(1..200)).map(|_| rng.u8(..)).collect(),
            1 => bytes.truncate(rng.usize(0..bytes.len())),
            _ => {
                for _ in 0..rng.usize(1..6) {
                    let at = rng.usize(0..bytes.len());
                    bytes[at] ^= rng.u8(1..);
                }
            }
        }
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", target)) else {
            panic!("round {round}: the node stopped accepting");
        };
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let _ = stream.write_all(&bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let _ = stream.read_to_end(&mut Vec::new());
    }
    assert_eq!(c.call(Op::Ping), Body::Pong);
    assert_eq!(c.get(b"keep").siblings, vec![b"me".to_vec()]);
    let mut redis = node.client(base);
    let pong: String = redis::cmd("PING").query(&mut redis).unwrap();
    assert_eq!(pong, "PONG");
    drop((c, redis));
    node.stop();
}
