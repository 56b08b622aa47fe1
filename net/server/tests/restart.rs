//! Stopping a node under load and starting it again on the same directory, many times
//! (issue 9, item 8: a node once aborted while stopping, glibc finding its heap written
//! after free, because executors exited with sockets, files and io_uring operations
//! still in flight).
//!
//! Each round starts a node, runs writers that overwrite a small key space (so group
//! commits, compaction of the segments earlier rounds left behind, and storage reads
//! and writes are all busy), and stops the node in the middle of that. Rounds alternate
//! between a node in this process, where every file of the data directory must be
//! closed once it has stopped, and a node in a child process, which must exit with
//! success and no word from glibc's heap checks. The next round checks that every
//! write acknowledged before the stop reads back.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringkv_server::config::ServerConfig;

mod common;
use common::{Node, config, free_ports};

const ROUNDS: u64 = 20;
const WRITERS: u64 = 3;
const KEYS_PER_WRITER: u64 = 12;
/// Writes sent together by a writer, each to a different key of its own.
const PIPELINE: u64 = 6;
const VALUE_PADDING: usize = 1500;

/// Set in the child process, to "data dir|base port": it runs a node until SIGTERM.
const CHILD_ENV: &str = "RINGKV_RESTART_TEST_NODE";

/// What a writer has done to one key: the sequence number of the last write the node
/// acknowledged, and of the last one sent (which may have been applied unacknowledged).
#[derive(Clone, Copy, Default)]
struct Written {
    acked: u64,
    sent: u64,
}

type Ledger = Arc<Mutex<HashMap<String, Written>>>;

/// Keys with at least one acknowledged write; a run that acknowledged none proved
/// nothing, so that fails here.
fn acknowledged_keys(ledger: &Ledger) -> usize {
    let acked = ledger
        .lock()
        .unwrap()
        .values()
        .filter(|w| w.acked > 0)
        .count();
    assert!(acked > 0, "no write was ever acknowledged");
    acked
}

/// The tests here run one at a time: a node restarting on its ports leaves them free
/// between rounds, where another test's `free_ports` could pick them.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    // A test that failed holding the lock has said so already.
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn a_node_stopped_under_load_restarts_with_everything_it_acknowledged() {
    let _alone = one_at_a_time();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let port = free_ports();
    let ledger: Ledger = Arc::default();
    let started = Instant::now();
    for round in 0..ROUNDS {
        let in_process = round % 2 == 0;
        let node = if in_process {
            Running::InProcess(Node::start(dir.path(), port))
        } else {
            Running::Child(start_child(dir.path(), port))
        };
        check_acknowledged(port, &ledger, round);

        let load = Arc::new(AtomicBool::new(true));
        let writers: Vec<JoinHandle<()>> = (0..WRITERS)
            .map(|w| {
                let (ledger, load) = (ledger.clone(), load.clone());
                std::thread::spawn(move || write_until_stopped(port, w, round, &ledger, &load))
            })
            .collect();
        // Twice (a node in this process, then a child) a client that has sent half a
        // command and waits: the node must hang up on it after the drain timeout
        // instead of keeping its socket.
        let idle = matches!(round, 4 | 13).then(|| {
            let mut idle = TcpStream::connect(("127.0.0.1", port)).unwrap();
            idle.write_all(b"*2\r\n$3\r\nGET\r\n").unwrap();
            idle
        });
        // Stop at a different point of the load each round.
        std::thread::sleep(Duration::from_millis(150 + fastrand::u64(0..350)));
        match node {
            Running::InProcess(node) => {
                node.stop();
                assert_no_open_files_in(dir.path(), round);
            }
            Running::Child(child) => stop_child(child, round),
        }
        load.store(false, Ordering::SeqCst);
        for writer in writers {
            writer.join().expect("a writer panicked");
        }
        if let Some(mut idle) = idle {
            idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut rest = Vec::new();
            // The node closed (or reset) the connection: the read ends, and not by
            // running out of time.
            match idle.read_to_end(&mut rest) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => {
                    panic!("round {round}: the stopped node kept an idle client's socket: {e}")
                }
            }
        }
    }
    let node = Node::start(dir.path(), port);
    check_acknowledged(port, &ledger, ROUNDS);
    node.stop();
    let acked = acknowledged_keys(&ledger);
    eprintln!(
        "{ROUNDS} rounds, {acked} keys checked, in {:?}",
        started.elapsed()
    );
}

/// Three nodes replicating each other, stopped one by one under load: the peer links
/// (both ways) and the replication work in flight end with each node, and what was
/// acknowledged reads back once the cluster is up again.
#[test]
fn a_cluster_stopped_node_by_node_under_load_restarts_with_what_it_acknowledged() {
    let _alone = one_at_a_time();
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap())
        .collect();
    let ports: Vec<u16> = (0..3).map(|_| free_ports()).collect();
    let peers: Vec<String> = (0..3)
        .map(|i| format!("{}@{}", i + 1, config(dirs[i].path(), ports[i]).listen))
        .collect();
    let node_config = |i: usize| ServerConfig {
        node_id: i as u32 + 1,
        peers: peers.clone(),
        ..config(dirs[i].path(), ports[i])
    };
    let ledger: Ledger = Arc::default();
    let load = Arc::new(AtomicBool::new(true));
    let mut nodes: Vec<Option<Node>> = (0..3)
        .map(|i| Some(Node::start_with(node_config(i))))
        .collect();
    // Writes need a quorum (two of three), so they cross the peer links.
    let writers: Vec<JoinHandle<()>> = (0..WRITERS)
        .map(|w| {
            let (ledger, load, port) = (ledger.clone(), load.clone(), ports[w as usize % 2]);
            std::thread::spawn(move || write_until_stopped(port, w, 0, &ledger, &load))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // First the node no writer talks to, while the others go on replicating to it.
    for i in [2, 0, 1] {
        let stopping = Instant::now();
        nodes[i].take().unwrap().stop();
        assert!(
            stopping.elapsed() < Duration::from_secs(15),
            "node {} took {:?} to stop",
            i + 1,
            stopping.elapsed()
        );
        assert_no_open_files_in(dirs[i].path(), 0);
        std::thread::sleep(Duration::from_millis(100));
    }
    load.store(false, Ordering::SeqCst);
    for writer in writers {
        writer.join().expect("a writer panicked");
    }
    let nodes: Vec<Node> = (0..3).map(|i| Node::start_with(node_config(i))).collect();
    check_acknowledged(ports[0], &ledger, 1);
    for node in nodes {
        node.stop();
    }
    acknowledged_keys(&ledger);
}

enum Running {
    InProcess(Node),
    Child(Child),
}

/// Overwrites this writer's keys, in pipelines, until the node stops answering.
fn write_until_stopped(port: u16, writer: u64, round: u64, ledger: &Ledger, load: &AtomicBool) {
    let Ok(mut c) = connect(port) else { return };
    let mut seq = round << 32;
    while load.load(Ordering::SeqCst) {
        let first = fastrand::u64(0..KEYS_PER_WRITER);
        let keys: Vec<String> = (0..PIPELINE)
            .map(|i| format!("w{writer}:k{}", (first + i) % KEYS_PER_WRITER))
            .collect();
        seq += 1;
        let value = format!("{seq}:{}", "x".repeat(VALUE_PADDING));
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("SET").arg(key).arg(&value).ignore();
            ledger.lock().unwrap().entry(key.clone()).or_default().sent = seq;
        }
        pipe.cmd("GET").arg(&keys[0]);
        // Any error (the node stopping closes the connection) ends this writer.
        let Ok((back,)) = pipe.query::<(Vec<u8>,)>(&mut c) else {
            return;
        };
        let mut ledger = ledger.lock().unwrap();
        for key in &keys {
            ledger.get_mut(key).unwrap().acked = seq;
        }
        assert_eq!(
            sequence_of(&back),
            seq,
            "round {round}: {} read back another write",
            keys[0]
        );
    }
}

fn connect(port: u16) -> redis::RedisResult<redis::Connection> {
    let c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?.get_connection()?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(c)
}

fn sequence_of(value: &[u8]) -> u64 {
    let text = std::str::from_utf8(value).expect("a value the test wrote");
    let (seq, _) = text.split_once(':').expect("a value the test wrote");
    seq.parse().expect("a value the test wrote")
}

/// Every key holds its last acknowledged write, or the one sent after it.
fn check_acknowledged(port: u16, ledger: &Ledger, round: u64) {
    let mut c = connect(port).unwrap();
    let ledger = ledger.lock().unwrap();
    for (key, written) in ledger.iter() {
        let Some(value) = read(&mut c, key) else {
            assert_eq!(
                written.acked, 0,
                "round {round}: acknowledged {key} is gone"
            );
            continue;
        };
        let seq = sequence_of(&value);
        assert!(
            written.acked <= seq && seq <= written.sent,
            "round {round}: {key} holds write {seq}, acknowledged {} and sent {}",
            written.acked,
            written.sent
        );
    }
}

/// Reads `key`, waiting out UNAVAILABLE: a cluster just started may not have its peer
/// links up yet.
fn read(c: &mut redis::Connection, key: &str) -> Option<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match redis::cmd("GET").arg(key).query(c) {
            Err(e) if e.to_string().contains("UNAVAILABLE") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            read => return read.unwrap(),
        }
    }
}

/// No file descriptor of this process points into the stopped node's data directory:
/// every segment, hint and lock file it opened was closed.
fn assert_no_open_files_in(dir: &Path, round: u64) {
    let dir = dir.canonicalize().unwrap();
    let open: Vec<_> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.starts_with(&dir))
        .collect();
    assert!(
        open.is_empty(),
        "round {round}: the stopped node left files open: {open:?}"
    );
}

fn start_child(dir: &Path, port: u16) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "node_process", "--ignored", "--nocapture"])
        .env(CHILD_ENV, format!("{}|{port}", dir.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The last listener a node binds: its last shard's own native port.
    let last = config(dir, port).shard_native_addr(common::SHARDS as usize - 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(last).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the node exited at start ({status}): {}", stderr_of(child));
        }
        assert!(Instant::now() < deadline, "node did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// SIGTERM, the way an operator stops a node; it must exit 0 without a heap complaint.
fn stop_child(mut child: Child, round: u64) {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "round {round}: node did not stop"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = stderr_of(child);
    assert!(
        status.success(),
        "round {round}: the node exited with {status}: {stderr}"
    );
    for sign in ["tcache", "double free", "corrupted", "malloc", "panicked"] {
        assert!(
            !stderr.contains(sign),
            "round {round}: the node's stderr says {sign:?}: {stderr}"
        );
    }
}

fn stderr_of(mut child: Child) -> String {
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    stderr
}

/// The node of a child-process round (run by the test above, not on its own): serves
/// until SIGTERM, then returns, and the process exits with the test's outcome.
#[test]
#[ignore = "the node of a child-process round"]
fn node_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (dir, port) = spec.rsplit_once('|').unwrap();
    let config = config(Path::new(dir), port.parse().unwrap());
    ringkv_server::runtime::run(config).expect("the node ran and stopped cleanly");
}
