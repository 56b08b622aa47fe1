//! A real node (two shards) on loopback, driven with the `redis` client crate.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use redis::{Commands, Value};
use ringkv_server::config::ServerConfig;

mod common;
use common::{Node, config, free_ports};

/// Sends `bytes`, closes the sending side (so the node sees the end even of an
/// incomplete command), and returns what the node answered before closing.
fn raw(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    // A reset instead of a clean close is fine: only what arrived matters.
    let _ = stream.read_to_end(&mut reply);
    reply
}

#[test]
fn redis_clients_get_what_they_expect() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let port = free_ports();
    let node = Node::start(dir.path(), port);
    let mut c = node.client(port);

    let pong: String = redis::cmd("PING").query(&mut c).unwrap();
    assert_eq!(pong, "PONG");
    let echo: String = redis::cmd("ECHO").arg("hi").query(&mut c).unwrap();
    assert_eq!(echo, "hi");

    // Binary-safe keys and values, empty values.
    let key = b"k\x00\xff\r\n".to_vec();
    let value = (0..=255u8).collect::<Vec<u8>>();
    let _: () = c.set(&key, &value).unwrap();
    let back: Vec<u8> = c.get(&key).unwrap();
    assert_eq!(back, value);
    let _: () = c.set("empty", "").unwrap();
    let empty: Vec<u8> = c.get("empty").unwrap();
    assert!(empty.is_empty());
    let missing: Option<Vec<u8>> = c.get("missing").unwrap();
    assert_eq!(missing, None);

    // SET replaces; DEL counts what existed; EXISTS counts what exists.
    let _: () = c.set("a", "1").unwrap();
    let _: () = c.set("a", "2").unwrap();
    let a: String = c.get("a").unwrap();
    assert_eq!(a, "2");
    let exists: i64 = redis::cmd("EXISTS")
        .arg("a")
        .arg("missing")
        .arg("empty")
        .query(&mut c)
        .unwrap();
    assert_eq!(exists, 2);
    let deleted: i64 = redis::cmd("DEL")
        .arg("a")
        .arg("missing")
        .query(&mut c)
        .unwrap();
    assert_eq!(deleted, 1);
    let gone: Option<String> = c.get("a").unwrap();
    assert_eq!(gone, None);

    let _: () = redis::cmd("MSET")
        .arg("m1")
        .arg("x")
        .arg("m2")
        .arg("y")
        .query(&mut c)
        .unwrap();
    let many: Vec<Option<String>> = redis::cmd("MGET")
        .arg("m1")
        .arg("nope")
        .arg("m2")
        .query(&mut c)
        .unwrap();
    assert_eq!(many, vec![Some("x".into()), None, Some("y".into())]);

    // Pipelining: answered in order, and a GET sees the SET before it.
    let mut pipe = redis::pipe();
    for i in 0..200 {
        pipe.cmd("SET").arg("p").arg(i).ignore();
        pipe.cmd("GET").arg("p");
    }
    let seen: Vec<i64> = pipe.query(&mut c).unwrap();
    assert_eq!(seen, (0..200).collect::<Vec<i64>>());

    // Errors: unknown commands, options ringkv cannot honour, limits, databases.
    let err = redis::cmd("FLUSHALL").query::<()>(&mut c).unwrap_err();
    assert!(err.to_string().contains("unknown command"), "{err}");
    let err = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .arg("NX")
        .query::<()>(&mut c)
        .unwrap_err();
    assert!(err.to_string().contains("NX"), "{err}");
    let err = c
        .set::<_, _, ()>("big", vec![0u8; (64 << 10) + 1])
        .unwrap_err();
    assert!(err.to_string().contains("exceeds"), "{err}");
    let _: () = redis::cmd("SELECT").arg(0).query(&mut c).unwrap();
    assert!(redis::cmd("SELECT").arg(1).query::<()>(&mut c).is_err());
    let save: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query(&mut c)
        .unwrap();
    assert_eq!(save, vec!["save".to_string(), String::new()]);
    let _: () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("tester")
        .query(&mut c)
        .unwrap();
    let name: String = redis::cmd("CLIENT").arg("GETNAME").query(&mut c).unwrap();
    assert_eq!(name, "tester");

    // Siblings: two KV.PUTs without a context are both kept; a put with the context
    // that saw both leaves one value.
    let _: () = redis::cmd("KV.PUT")
        .arg("s")
        .arg("left")
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("KV.PUT")
        .arg("s")
        .arg("right")
        .query(&mut c)
        .unwrap();
    let (context, mut siblings): (Vec<u8>, Vec<String>) =
        redis::cmd("KV.GET").arg("s").query(&mut c).unwrap();
    siblings.sort();
    assert_eq!(siblings, vec!["left", "right"]);
    let plain: String = c.get("s").unwrap();
    assert!(plain == "left" || plain == "right");
    let _: () = redis::cmd("KV.PUT")
        .arg("s")
        .arg("both")
        .arg("CONTEXT")
        .arg(&context)
        .query(&mut c)
        .unwrap();
    let (context, siblings): (Vec<u8>, Vec<String>) =
        redis::cmd("KV.GET").arg("s").query(&mut c).unwrap();
    assert_eq!(siblings, vec!["both"]);
    let _: () = redis::cmd("KV.DEL")
        .arg("s")
        .arg("CONTEXT")
        .arg(&context)
        .query(&mut c)
        .unwrap();
    let (_, siblings): (Vec<u8>, Vec<String>) =
        redis::cmd("KV.GET").arg("s").query(&mut c).unwrap();
    assert!(siblings.is_empty());
    // KV.DEL without a context removes what it finds, siblings included.
    for value in ["x", "y"] {
        let _: () = redis::cmd("KV.PUT")
            .arg("d")
            .arg(value)
            .query(&mut c)
            .unwrap();
    }
    let _: () = redis::cmd("KV.DEL").arg("d").query(&mut c).unwrap();
    let (_, siblings): (Vec<u8>, Vec<String>) =
        redis::cmd("KV.GET").arg("d").query(&mut c).unwrap();
    assert!(siblings.is_empty(), "{siblings:?}");
    // A HELLO with a bad option changes nothing; SET options say why they are refused.
    assert!(
        redis::cmd("HELLO")
            .arg(3)
            .arg("BOGUS")
            .query::<Value>(&mut c)
            .is_err()
    );
    let still_resp2: Value = redis::cmd("GET").arg("absent-key").query(&mut c).unwrap();
    assert_eq!(still_resp2, Value::Nil);
    let ex = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .arg("EX")
        .arg(10)
        .query::<Value>(&mut c);
    assert!(ex.unwrap_err().to_string().contains("no expiry"));
    assert!(
        redis::cmd("KV.GET")
            .arg("s")
            .arg("R")
            .arg(2)
            .query::<Value>(&mut c)
            .is_err(),
        "R > N accepted"
    );
    assert!(
        redis::cmd("KV.PUT")
            .arg("s")
            .arg("v")
            .arg("CONTEXT")
            .arg("junk")
            .query::<()>(&mut c)
            .is_err()
    );

    // Keys spread over both shards, and each shard's own port serves every key.
    for i in 0..200 {
        let _: () = c.set(format!("spread-{i}"), i).unwrap();
    }
    for shard in 0..2u16 {
        let mut direct = node.client(port + 1 + shard);
        let info: String = redis::cmd("INFO").query(&mut direct).unwrap();
        let keys: u64 = info
            .lines()
            .find_map(|l| l.strip_prefix("db0:keys="))
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(keys > 50, "shard {shard} holds only {keys} keys:\n{info}");
        let v: i64 = direct.get("spread-7").unwrap();
        assert_eq!(v, 7);
    }
    let size: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(
        size,
        200 + 5,
        "200 spread keys, plus the binary key, empty, m1, m2 and p"
    );

    // Inline commands end at a bare LF too, as redis-server reads them.
    assert_eq!(raw(port, b"PING\nECHO hi\n"), b"+PONG\r\n$2\r\nhi\r\n");

    // Garbage closes only its own connection.
    let reply = raw(port, b"*2\r\n$3\r\nGET\r\n$-7\r\n");
    assert!(
        reply.starts_with(b"-ERR Protocol error"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    for seed in 0..20 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let junk: Vec<u8> = (0..rng.usize(1..300)).map(|_| rng.u8(..)).collect();
        let _ = raw(port, &junk);
    }
    let pong: String = redis::cmd("PING").query(&mut c).unwrap();
    assert_eq!(pong, "PONG");

    drop(c);
    node.stop();

    // Restart: the same data.
    let node = Node::start(dir.path(), port);
    let mut c = node.client(port);
    let back: Vec<u8> = c.get(&key).unwrap();
    assert_eq!(back, value);
    let v: i64 = c.get("spread-199").unwrap();
    assert_eq!(v, 199);
    let gone: Option<String> = c.get("a").unwrap();
    assert_eq!(gone, None);
    drop(c);
    node.stop();
}

#[test]
fn a_second_node_on_the_same_port_or_directory_is_refused() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let other = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let port = free_ports();
    let node = Node::start(dir.path(), port);
    let same_port = config(other.path(), port);
    let err =
        ringkv_server::runtime::run_until(same_port, Arc::new(AtomicBool::new(true))).unwrap_err();
    assert!(err.to_string().contains("cannot listen"), "{err}");
    let same_dir = config(dir.path(), free_ports());
    let err =
        ringkv_server::runtime::run_until(same_dir, Arc::new(AtomicBool::new(true))).unwrap_err();
    assert!(err.to_string().contains("in use by another"), "{err}");
    node.stop();
}

#[test]
fn a_changed_shard_count_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let port = free_ports();
    Node::start(dir.path(), port).stop();
    let config = ServerConfig {
        shards: 1,
        ..config(dir.path(), port)
    };
    let err =
        ringkv_server::runtime::run_until(config, Arc::new(AtomicBool::new(true))).unwrap_err();
    assert!(err.to_string().contains("shards = 2"), "{err}");
}
