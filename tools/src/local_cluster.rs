//! `ringkv cluster`: a development cluster of real `ringkv server` processes on
//! loopback, stopped together on Ctrl-C or SIGTERM.
//!
//! Node k (from 1) takes native ports from `base_port + (k-1)(shards+1)` and Redis
//! ports from `resp_port + (k-1)(shards+1)`: its shared port, then one per shard.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use ringkv_client::{Client, ReadOptions};

#[derive(Args)]
pub struct ClusterArgs {
    /// Nodes to start.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Native-protocol port of node 1; the others follow.
    #[arg(long, default_value_t = 7500)]
    pub base_port: u16,
    /// Redis-protocol port of node 1; the others follow.
    #[arg(long, default_value_t = 7379)]
    pub resp_port: u16,
    /// Data directory; node k keeps its data in DIR/node-k.
    #[arg(long, default_value = "ringkv-cluster")]
    pub dir: PathBuf,
    /// Executors per node. Several nodes share this machine's cores, so one each is
    /// the default.
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    #[arg(long, default_value_t = 1024)]
    pub partitions: u32,
    /// N, replicas of each key.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// sync (default), none, or interval(<ms>).
    #[arg(long)]
    pub durability: Option<String>,
    /// Grow a running cluster of --nodes nodes: start this many more (nodes
    /// --nodes+1 onwards), each joining through node 1; their partitions stream to
    /// them while the cluster serves. Run it in a second terminal.
    #[arg(long, default_value_t = 0)]
    pub add: usize,
}

impl Default for ClusterArgs {
    fn default() -> Self {
        ClusterArgs {
            nodes: 3,
            base_port: 7500,
            resp_port: 7379,
            dir: PathBuf::from("ringkv-cluster"),
            shards: 1,
            partitions: 1024,
            replicas: 3,
            durability: None,
            add: 0,
        }
    }
}

struct Member {
    id: usize,
    native: String,
    resp: String,
    child: Child,
}

pub fn run(args: ClusterArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.shards == 0 {
        bail!("--nodes and --shards must be at least 1");
    }
    let span = args.shards as u32 + 1;
    let port = |base: u16, k: usize| -> anyhow::Result<u16> {
        u16::try_from(base as u32 + (k as u32 - 1) * span).context("ports run past 65535")
    };
    let mut addresses = Vec::new();
    let first = if args.add > 0 { args.nodes + 1 } else { 1 };
    for k in first..args.nodes + 1 + args.add {
        let native = format!("127.0.0.1:{}", port(args.base_port, k)?);
        let resp = format!("127.0.0.1:{}", port(args.resp_port, k)?);
        addresses.push((k, native, resp));
    }
    let peers: Vec<String> = addresses
        .iter()
        .map(|(k, native, _)| format!("{k}@{native}"))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let exe = std::env::current_exe().context("cannot find the ringkv binary")?;
    let mut members = Vec::new();
    for (k, native, resp) in &addresses {
        let mut command = Command::new(&exe);
        command
            .args(["server", "--node-id", &k.to_string()])
            .args(["--listen", native, "--resp", resp])
            .arg("--data-dir")
            .arg(args.dir.join(format!("node-{k}")))
            .args(["--shards", &args.shards.to_string()])
            .args(["--partitions", &args.partitions.to_string()])
            .args(["--replicas", &args.replicas.to_string()])
            .stdout(Stdio::piped());
        if args.add > 0 {
            let through = format!("127.0.0.1:{}", args.base_port);
            command.args(["--join", &through]);
        } else {
            command.args(["--peers", &peers.join(",")]);
        }
        if let Some(durability) = &args.durability {
            command.args(["--durability", durability]);
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start node {k}"))?;
        members.push(Member {
            id: *k,
            native: native.clone(),
            resp: resp.clone(),
            child,
        });
    }
    let outcome = wait_ready(&mut members, &stop).and_then(|()| {
        let replicas = args.replicas.min(args.nodes + args.add);
        wait_connected(&members, replicas, &stop)
    });
    if outcome.is_ok() {
        for m in &members {
            println!("node {} native={} resp={}", m.id, m.native, m.resp);
        }
        println!("cluster ready");
        supervise(&mut members, &stop);
    }
    stop_all(&mut members);
    outcome
}

/// Waits for every node's "ready" line; their other output goes to stderr, tagged.
fn wait_ready(members: &mut [Member], stop: &AtomicBool) -> anyhow::Result<()> {
    let (ready, readies) = std::sync::mpsc::channel();
    for m in members.iter_mut() {
        let stdout = m.child.stdout.take().expect("stdout is piped");
        let (id, ready) = (m.id, ready.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("ringkv server ready") {
                    let _ = ready.send(id);
                }
                eprintln!("[node {id}] {line}");
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut waiting: Vec<usize> = members.iter().map(|m| m.id).collect();
    while !waiting.is_empty() {
        if stop.load(Ordering::Relaxed) {
            bail!("stopped before the cluster was ready");
        }
        if Instant::now() > deadline {
            bail!("nodes {waiting:?} did not get ready within 60 s");
        }
        for m in members.iter_mut() {
            if let Ok(Some(status)) = m.child.try_wait() {
                bail!("node {} exited before it was ready ({status})", m.id);
            }
        }
        if let Ok(id) = readies.recv_timeout(Duration::from_millis(100)) {
            waiting.retain(|&w| w != id);
        }
    }
    Ok(())
}

/// Waits until every node reaches its peers: a read at R = N coordinated by each node
/// succeeds only when the node hears from every replica.
fn wait_connected(members: &[Member], n: usize, stop: &AtomicBool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for m in members {
        let client = Client::builder()
            .seeds([m.native.clone()])
            .request_timeout(Duration::from_secs(2))
            .connect_blocking()
            .with_context(|| format!("cannot reach node {}", m.id))?;
        let options = ReadOptions {
            r: Some(n.min(u8::MAX as usize) as u8),
            timeout: None,
            // The key's own replicas, every one: no stand-ins.
            strict: true,
        };
        // Sent to this node's own shard directly, whatever the key's owner.
        while let Err(e) = client.get_on(&m.native, b"ringkv-connectivity-probe", options) {
            if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                bail!("node {} cannot reach its peers: {e}", m.id);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Runs until Ctrl-C or SIGTERM, reporting nodes that exit on their own (someone may
/// be testing failures on purpose: the others keep running).
fn supervise(members: &mut [Member], stop: &AtomicBool) {
    let mut reported = vec![false; members.len()];
    while !stop.load(Ordering::Relaxed) {
        for (m, reported) in members.iter_mut().zip(reported.iter_mut()) {
            if !*reported && let Ok(Some(status)) = m.child.try_wait() {
                eprintln!("node {} exited ({status}); the others keep running", m.id);
                *reported = true;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM to every node still running (they drain and exit), then wait for them.
fn stop_all(members: &mut [Member]) {
    for m in members.iter_mut() {
        if let Ok(None) = m.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &m.child.id().to_string()])
                .status();
        }
    }
    for m in members.iter_mut() {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match m.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = m.child.kill();
                    let _ = m.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}
