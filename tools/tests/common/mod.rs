//! A real `ringkv server` process on loopback for the client and CLI tests.
#![allow(dead_code)] // Each test file uses its own part of this.

pub mod partition;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub dir: PathBuf,
    /// The node's native-protocol address (shards at the next two ports).
    pub native: String,
    pub resp_port: u16,
    base: u16,
}

impl Server {
    /// Starts a two-shard node on free ports with its data in `dir`.
    pub fn start(dir: &Path) -> Server {
        Server::start_on(dir, free_ports())
    }

    pub fn start_on(dir: &Path, base: u16) -> Server {
        let native = format!("127.0.0.1:{}", base + 3);
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringkv"))
            .args(["server", "--shards", "2", "--partitions", "64"])
            .args(["--resp", &format!("127.0.0.1:{base}")])
            .args(["--listen", &native])
            .arg("--data-dir")
            .arg(dir)
            .stdout(Stdio::piped())
            .spawn()
            .expect("ringkv server starts");
        wait_ready(&mut child);
        Server {
            child,
            dir: dir.to_owned(),
            native,
            resp_port: base,
            base,
        }
    }

    /// The same node again after a clean stop (same ports, same data).
    pub fn restart(mut self) -> Server {
        self.stop();
        Server::start_on(&self.dir.clone(), self.base)
    }

    /// SIGTERM and wait: the node drains and exits 0.
    pub fn stop(&mut self) {
        signal(self.child.id(), "TERM");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "server exited with {status}");
    }

    /// SIGSTOP, and wait until the kernel reports the process stopped (the signal is
    /// delivered asynchronously: a request sent right after `kill` could still be served).
    pub fn pause(&self) {
        signal(self.child.id(), "STOP");
        let stat = format!("/proc/{}/stat", self.child.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&stat).unwrap_or_default();
            // The state is the field after the parenthesised command name.
            let state = text
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next());
            if state == Some("T") {
                return;
            }
            assert!(Instant::now() < deadline, "process did not stop: {text}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn resume(&self) {
        signal(self.child.id(), "CONT");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), "CONT");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// A base port with the six ports a two-shard node takes from it free.
pub fn free_ports() -> u16 {
    free_ports_n(6)
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// Real `ringkv server` processes (one shard each unless told otherwise) forming one
/// cluster, N=3.
pub struct Cluster {
    pub nodes: Vec<Option<Server>>,
    base: u16,
    dirs: Vec<tempfile::TempDir>,
    shards: Vec<usize>,
    /// Each node's (uid, gid) when it runs as its own unix user (see `partition`).
    users: Option<Vec<(u32, u32)>>,
    /// Flags every server gets besides the harness's own.
    extra_args: Vec<String>,
    /// Nodes added by `join`, the member each joined through, and the dead node it
    /// replaces (if any).
    joined_through: std::collections::BTreeMap<usize, (usize, Option<usize>)>,
}

/// Ports per node: native and up to three shard ports, then the same for RESP.
const NODE_PORTS: u16 = 8;

impl Cluster {
    pub fn start(size: usize) -> Cluster {
        Cluster::start_with_shards(&vec![1; size])
    }

    /// One node per entry, with that many shards (at most 3).
    pub fn start_with_shards(shards: &[usize]) -> Cluster {
        Cluster::start_inner(shards, None, &[])
    }

    /// `size` one-shard nodes, each server also given `args`.
    pub fn start_with_args(size: usize, args: &[&str]) -> Cluster {
        Cluster::start_inner(&vec![1; size], None, args)
    }

    /// `size` one-shard nodes, node i running as unix user `users[i - 1]` (uid, gid),
    /// so nftables can tell their connections apart on loopback.
    pub fn start_as_users(users: &[(u32, u32)]) -> Cluster {
        Cluster::start_inner(&vec![1; users.len()], Some(users.to_vec()), &[])
    }

    fn start_inner(shards: &[usize], users: Option<Vec<(u32, u32)>>, args: &[&str]) -> Cluster {
        let size = shards.len();
        // Room for two more nodes to join.
        let base = free_ports_n(NODE_PORTS * (size as u16 + 2));
        let dirs: Vec<_> = (0..size).map(|_| tempdir()).collect();
        if let Some(users) = &users {
            for (dir, (uid, gid)) in dirs.iter().zip(users) {
                std::os::unix::fs::chown(dir.path(), Some(*uid), Some(*gid))
                    .expect("chown the node's data directory");
            }
        }
        let mut cluster = Cluster {
            nodes: Vec::new(),
            base,
            dirs,
            shards: shards.to_vec(),
            users,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            joined_through: Default::default(),
        };
        let children: Vec<_> = (1..=size).map(|id| cluster.spawn(id)).collect();
        for (id, child) in (1..=size).zip(children) {
            cluster.nodes.push(Some(cluster.ready(id, child)));
        }
        cluster.wait_connected();
        cluster
    }

    /// Waits until every running node can reach every other running node: a read at
    /// R = all of them (at most N = 3), coordinated by each node in turn, succeeds.
    pub fn wait_connected(&self) {
        let running: Vec<usize> = (1..=self.size())
            .filter(|&id| self.nodes[id - 1].is_some())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        for &id in &running {
            let url = format!("redis://127.0.0.1:{}/", self.resp_port(id));
            let mut connection = redis::Client::open(url).unwrap().get_connection().unwrap();
            loop {
                let read = redis::cmd("KV.GET")
                    .arg("connectivity-probe")
                    .arg("R")
                    .arg(running.len().min(3))
                    .query::<redis::Value>(&mut connection);
                if read.is_ok() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {id} cannot reach its peers: {read:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// A client that knows every node in `ids`, with retries for a node that went away.
    pub fn client(&self, ids: &[usize]) -> ringkv_client::Client {
        ringkv_client::Client::builder()
            .seeds(ids.iter().map(|&id| self.native(id)))
            .request_timeout(Duration::from_secs(3))
            .retry(ringkv_client::RetryPolicy {
                attempts: 4,
                backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(300),
            })
            .connect_blocking()
            .expect("client connects")
    }

    /// A Redis-protocol connection to node `id`.
    pub fn redis(&self, id: usize) -> redis::Connection {
        let url = format!("redis://127.0.0.1:{}/", self.resp_port(id));
        let connection = redis::Client::open(url).unwrap().get_connection().unwrap();
        connection
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        connection
    }

    pub fn size(&self) -> usize {
        self.dirs.len()
    }

    /// Every port node `id` listens on (native and RESP, with their shard ports).
    pub fn ports(&self, id: usize) -> std::ops::Range<u16> {
        let first = self.base + NODE_PORTS * (id as u16 - 1);
        first..first + NODE_PORTS
    }

    /// Node `id`'s native address (shard 0 at the next port).
    pub fn native(&self, id: usize) -> String {
        format!("127.0.0.1:{}", self.base + NODE_PORTS * (id as u16 - 1))
    }

    pub fn resp_port(&self, id: usize) -> u16 {
        self.base + NODE_PORTS * (id as u16 - 1) + NODE_PORTS / 2
    }

    /// Starts one more node (one shard) that joins the cluster through member
    /// `through`; returns its id once it is ready.
    pub fn join(&mut self, through: usize) -> usize {
        self.join_replacing(through, None)
    }

    /// Like `join`, the new node taking over every partition of `dead` (when given).
    pub fn join_replacing(&mut self, through: usize, dead: Option<usize>) -> usize {
        let id = self.size() + 1;
        assert!(id <= self.nodes.len() + 2, "ports for two joiners only");
        self.dirs.push(tempdir());
        self.shards.push(1);
        self.joined_through.insert(id, (through, dead));
        let child = self.spawn(id);
        let server = self.ready(id, child);
        self.nodes.push(Some(server));
        id
    }

    fn spawn(&self, id: usize) -> Child {
        self.command(id)
            .stdout(Stdio::piped())
            .spawn()
            .expect("ringkv server starts")
    }

    /// Starts a stopped node expecting it to refuse to start: its exit status and
    /// what it printed on stderr.
    pub fn start_refused(&mut self, id: usize) -> (std::process::ExitStatus, String) {
        assert!(self.nodes[id - 1].is_none(), "node {id} is still running");
        let mut child = self
            .command(id)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ringkv server runs");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("node {id} started instead of refusing");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        (status, stderr)
    }

    /// Starts a stopped node with `--join <through>` instead of its first flags.
    pub fn restart_joining(&mut self, id: usize, through: usize) {
        self.joined_through.insert(id, (through, None));
        self.restart(id);
    }

    /// Node `id`'s data directory.
    pub fn data_dir(&self, id: usize) -> &Path {
        self.dirs[id - 1].path()
    }

    fn command(&self, id: usize) -> Command {
        let peers: Vec<String> = (1..=self.size())
            .filter(|k| !self.joined_through.contains_key(k))
            .map(|k| format!("{k}@{}", self.native(k)))
            .collect();
        let membership = match self.joined_through.get(&id) {
            Some(&(through, None)) => vec!["--join".to_string(), self.native(through)],
            Some(&(through, Some(dead))) => vec![
                "--join".to_string(),
                self.native(through),
                "--replace".to_string(),
                dead.to_string(),
            ],
            None => vec!["--peers".to_string(), peers.join(",")],
        };
        let mut command = match &self.users {
            Some(users) => {
                let (uid, gid) = users[id - 1];
                let mut command = Command::new("setpriv");
                command
                    .args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()])
                    .args(["--clear-groups", "--", env!("CARGO_BIN_EXE_ringkv")]);
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_ringkv")),
        };
        command
            .args(["server", "--node-id", &id.to_string()])
            .args(["--shards", &self.shards[id - 1].to_string()])
            .args(["--partitions", "64", "--replicas", "3"])
            .args(["--listen", &self.native(id)])
            .args(["--resp", &format!("127.0.0.1:{}", self.resp_port(id))])
            .args(membership)
            .arg("--data-dir")
            .arg(self.dirs[id - 1].path())
            .args(&self.extra_args);
        command
    }

    fn ready(&self, id: usize, child: Child) -> Server {
        let mut child = child;
        wait_ready(&mut child);
        Server {
            child,
            dir: self.dirs[id - 1].path().to_owned(),
            native: self.native(id),
            resp_port: self.resp_port(id),
            base: 0,
        }
    }

    pub fn node(&self, id: usize) -> &Server {
        self.nodes[id - 1].as_ref().expect("node is running")
    }

    /// kill -9: no drain, no flush beyond what was acknowledged.
    pub fn kill(&mut self, id: usize) {
        let mut server = self.nodes[id - 1].take().expect("node is running");
        server.child.kill().unwrap();
        server.child.wait().unwrap();
    }

    pub fn restart(&mut self, id: usize) {
        self.restart_unwaited(id);
        self.wait_connected();
    }

    /// Starts a stopped node and returns once it prints ready, without waiting for
    /// its peer links: what a client sees right after an operator's restart.
    pub fn restart_unwaited(&mut self, id: usize) {
        assert!(self.nodes[id - 1].is_none(), "node {id} is still running");
        let child = self.spawn(id);
        self.nodes[id - 1] = Some(self.ready(id, child));
    }

    /// A stopped node's disk is replaced: its data directory is emptied.
    pub fn wipe(&mut self, id: usize) {
        assert!(self.nodes[id - 1].is_none(), "node {id} is still running");
        let dir = self.dirs[id - 1].path();
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::create_dir(dir).unwrap();
    }
}

/// Hints pending on every node that answers, summed over shards and targets.
pub fn hints_pending(c: &ringkv_client::Client) -> u64 {
    c.status_each()
        .expect("status")
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok())
        .flat_map(|n| &n.shards)
        .flat_map(|s| &s.hints)
        .map(|h| h.keys)
        .sum()
}

fn wait_ready(child: &mut Child) {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "server did not get ready");
        match lines.next() {
            Some(Ok(line)) if line.starts_with("ringkv server ready") => break,
            Some(Ok(_)) => {}
            _ => panic!("server exited before it was ready"),
        }
    }
    std::thread::spawn(move || for _ in lines {});
}

/// A base port with `count` ports from it free (best effort; loopback only).
pub fn free_ports_n(count: u16) -> u16 {
    loop {
        let base = fastrand::u16(20_000..60_000);
        if (0..count).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
}
