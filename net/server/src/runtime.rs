//! Starting and stopping a node: startup checks, one pinned glommio executor per shard
//! joined by a channel mesh, listeners, and a graceful stop on SIGINT or SIGTERM (stop
//! accepting, let open connections finish what they started, close the stores).

use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::net::TcpListener;
use glommio::{Latency, LocalExecutorPoolBuilder, PoolPlacement, Shares};
use ringkv_cluster::{Member, Node, NodeConfig, NodeId, PartitionId, Ring};
use ringkv_engine::disk::DmaDisk;
use ringkv_engine::{Durability, Store, StoreConfig};

use crate::config::ServerConfig;
use crate::driver::ShardDriver;
use crate::layout::{self, NodeLayout};
use crate::listener::{self, Stopper};
use crate::native::NodeInfo;
use crate::shard::{Hop, Shard};
use ringkv_proto::NodeAddress;
use ringkv_proto::peer::{ClusterSpec, MemberSpec};

use crate::peers::Peers;

/// Why a node could not start; each is one clear line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Layout(#[from] crate::layout::LayoutError),
    #[error(
        "io_uring is disabled on this machine (kernel.io_uring_disabled = {0}); ringkv needs it. \
         Inside Docker, the default seccomp profile blocks io_uring: run with a profile that allows it"
    )]
    IoUringDisabled(String),
    #[error(
        "cannot start the shard executors ({0}). If this runs in a container, io_uring may be blocked \
         by seccomp, or the locked-memory limit (ulimit -l) may be too low"
    )]
    Executors(String),
    #[error(
        "the locked-memory limit is {0} KiB; ringkv's io_uring reactor needs at least {1} KiB. \
         Raise it with `ulimit -l` (or LimitMEMLOCK= in a systemd unit, --ulimit memlock= in Docker)"
    )]
    LockedMemory(u64, u64),
    #[error("cannot listen on {0}: {1} (is another ringkv or redis running there?)")]
    AddressInUse(std::net::SocketAddr, String),
    #[error("shard {shard} failed: {message}")]
    Shard { shard: usize, message: String },
}

/// How long a stopping node waits for open connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the node until SIGINT or SIGTERM; returns once every shard has stopped cleanly.
pub fn run(config: ServerConfig) -> Result<(), StartError> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())
            .map_err(|e| StartError::Executors(format!("cannot handle signals: {e}")))?;
    }
    run_until(config, stop)
}

/// Runs the node until `stop` is set.
pub fn run_until(config: ServerConfig, stop: Arc<AtomicBool>) -> Result<(), StartError> {
    config.validate()?;
    check_io_uring()?;
    check_locked_memory()?;
    raise_open_file_limit();
    let shards = config.shard_count();
    check_addresses_free(&config)?;
    let _lock = layout::lock(&config.data_dir)?;
    let layout = layout::open(&config.data_dir, config.node_id, config.partitions, shards)?;
    let mesh = MeshBuilder::<Hop, _>::full(shards, 1024);
    let listening = Arc::new(AtomicUsize::new(0));
    let config = Arc::new(config);
    let spin = Duration::from_micros(config.spin_before_park_us);
    let handles = LocalExecutorPoolBuilder::new(PoolPlacement::MaxSpread(shards, None))
        .spin_before_park(spin)
        .on_all_shards(move || {
            let (config, layout, mesh, stop, listening) = (
                config.clone(),
                layout.clone(),
                mesh.clone(),
                stop.clone(),
                listening.clone(),
            );
            async move {
                let result = run_shard(&config, &layout, mesh, &stop, &listening).await;
                // One shard failing stops the node: a node missing a shard would refuse
                // every key that shard owns.
                if result.is_err() {
                    stop.store(true, Ordering::SeqCst);
                }
                result
            }
        })
        .map_err(|e| StartError::Executors(e.to_string()))?;
    let mut first_error = None;
    for (shard, result) in handles.join_all().into_iter().enumerate() {
        let outcome = match result {
            Ok(Ok(())) => continue,
            Ok(Err(message)) => message,
            Err(e) => format!("executor panicked: {e:?}"),
        };
        first_error.get_or_insert(StartError::Shard {
            shard,
            message: outcome,
        });
    }
    first_error.map_or(Ok(()), Err)
}

/// Shards bind with SO_REUSEPORT, which would let a second process (another node, or a
/// leftover one) silently share a port with us; a plain bind first refuses that.
///
/// A node that has just stopped (a restart, a test) can hold its listeners for a moment
/// after its executors exit: the kernel tears an io_uring instance down asynchronously,
/// and its pending accepts keep the sockets open until then. So a busy address is retried
/// for a short grace period before it is reported.
fn check_addresses_free(config: &ServerConfig) -> Result<(), StartError> {
    const GRACE: Duration = Duration::from_secs(3);
    let deadline = Instant::now() + GRACE;
    for addr in config.all_addrs() {
        loop {
            match listener::probe(addr) {
                Ok(()) => break,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(StartError::AddressInUse(addr, e.to_string())),
            }
        }
    }
    Ok(())
}

/// glommio refuses to start a reactor under 512 KiB of lockable memory (it registers
/// its I/O buffers with io_uring); say so in one line instead of failing inside it.
fn check_locked_memory() -> Result<(), StartError> {
    const NEEDED_KIB: u64 = 512;
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return Ok(());
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .and_then(|l| l.split_whitespace().nth(3));
    match soft.map(str::parse::<u64>) {
        Some(Ok(bytes)) if bytes / 1024 < NEEDED_KIB => {
            Err(StartError::LockedMemory(bytes / 1024, NEEDED_KIB))
        }
        _ => Ok(()), // "unlimited", or a format we do not know: let glommio decide.
    }
}

/// Each store keeps one file open per segment, and each connection is a socket: take
/// the whole open-file allowance (the soft limit is often 1024 while the hard limit is
/// far higher), and say what it is, since running out shows up as failed rotations.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(err) => tracing::warn!(%err, "cannot raise the open-file limit (ulimit -n)"),
    }
}

fn check_io_uring() -> Result<(), StartError> {
    match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        Ok(value) if value.trim() != "0" => {
            Err(StartError::IoUringDisabled(value.trim().to_owned()))
        }
        _ => Ok(()),
    }
}

async fn run_shard(
    config: &ServerConfig,
    layout: &NodeLayout,
    mesh: MeshBuilder<Hop, glommio::channels::channel_mesh::Full>,
    stop: &AtomicBool,
    listening: &AtomicUsize,
) -> Result<(), String> {
    let (peers, mut hops) = mesh
        .join()
        .await
        .map_err(|e| format!("cannot join the shard mesh: {e}"))?;
    let id = peers.peer_id();
    let durability: Durability = config.durability.parse().map_err(|e| format!("{e}"))?;
    let store_config = StoreConfig {
        durability,
        max_value_len: config.max_value_bytes,
        ..StoreConfig::default()
    };
    let dir = layout::shard_dir(&config.data_dir, id);
    let store = Store::open(
        DmaDisk::new(&dir).map_err(|e| format!("{}: {e}", dir.display()))?,
        store_config,
    )
    .await
    .map_err(|e| format!("opening the store in {}: {e}", dir.display()))?;
    let runner = store.clone();
    let commits = glommio::spawn_local(async move { runner.run().await });
    let background = glommio::executor().create_task_queue(
        Shares::Static(10),
        Latency::NotImportant,
        "compaction",
    );
    let compactor = store.clone();
    glommio::spawn_local_into(
        async move { compactor.run_compaction(Duration::from_secs(1)).await },
        background,
    )
    .map_err(|e| format!("cannot start compaction: {e}"))?
    .detach();

    let node_id = NodeId(config.node_id);
    let members = config.members().map_err(|e| e.to_string())?;
    let ring_members: Vec<Member> = members
        .iter()
        .map(|(id, _)| Member::new(NodeId(*id)))
        .collect();
    let ring = Ring::new(config.partitions, &ring_members).map_err(|e| e.to_string())?;
    let mut node_config = NodeConfig::new(node_id, layout.incarnation);
    node_config.request_timeout = Duration::from_millis(config.request_timeout_ms);
    node_config.stored_value_max = config.max_value_bytes;
    // Shard i numbers its requests from i << 48: ids stay unique across the node's
    // shards, so a peer's reply is routed back to the one shard that asked.
    node_config.first_sequence = (id as u64) << 48;
    let node = Node::new(node_config, ring.clone());
    let driver = ShardDriver::new(node, store.clone());
    let shard = Shard::new(
        ring.clone(),
        driver,
        peers,
        config.max_inflight_per_shard,
        config.max_value_bytes,
        config.replica_count(),
    );
    for (_, receiver) in hops.streams() {
        glommio::spawn_local(shard.clone().serve_peer(receiver)).detach();
    }

    let connections = Rc::new(crate::connections::Connections::new(
        config.max_connections_per_shard,
        config.max_pipeline,
    ));
    let cluster = cluster_spec(config, &members);
    if members.len() > 1 {
        shard.set_peers(Peers::start(node_id, &shard, cluster.clone()));
    }
    let info = Rc::new(NodeInfo {
        me: own_address(config),
        incarnation: layout.incarnation,
        cluster,
        epoch: ring.epoch(),
        owners: (0..ring.partition_count())
            .map(|p| ring.owner(PartitionId(p)).0)
            .collect(),
    });
    let mut acceptors = Vec::new();
    let mut stoppers = Vec::new();
    for addr in [config.resp, config.shard_resp_addr(id)] {
        let listener = bind(addr, &mut stoppers)?;
        let (shard, connections) = (shard.clone(), connections.clone());
        acceptors.push(glommio::spawn_local(async move {
            crate::resp::accept(listener, shard, connections).await
        }));
    }
    for addr in [config.listen, config.shard_native_addr(id)] {
        let listener = bind(addr, &mut stoppers)?;
        let (shard, connections, info) = (shard.clone(), connections.clone(), info.clone());
        acceptors.push(glommio::spawn_local(async move {
            crate::native::accept(listener, shard, connections, info).await
        }));
    }
    listening.fetch_add(1, Ordering::SeqCst);
    if id == 0 {
        while listening.load(Ordering::SeqCst) < shard.count && !stop.load(Ordering::SeqCst) {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        let last = shard.count - 1;
        println!(
            "ringkv server ready: node {} native={} resp={} shards={} (shard ports native {}..={}, resp {}..={}) data={} incarnation={}",
            config.node_id,
            config.listen,
            config.resp,
            shard.count,
            config.shard_native_addr(0).port(),
            config.shard_native_addr(last).port(),
            config.shard_resp_addr(0).port(),
            config.shard_resp_addr(last).port(),
            config.data_dir.display(),
            layout.incarnation
        );
    }

    while !stop.load(Ordering::Relaxed) {
        glommio::timer::sleep(Duration::from_millis(50)).await;
    }
    connections.close();
    for stopper in &stoppers {
        stopper.stop();
    }
    for acceptor in acceptors {
        acceptor.cancel().await;
    }
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while connections.clients_open() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    // Peer links stay up while clients drain: the requests they finish still need
    // answers from the other replicas.
    shard.stop();
    store
        .close()
        .await
        .map_err(|e| format!("closing the store: {e}"))?;
    commits.await;
    if id == 0 {
        println!("ringkv server stopped");
    }
    Ok(())
}

fn bind(addr: SocketAddr, stoppers: &mut Vec<Stopper>) -> Result<TcpListener, String> {
    let bound = listener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    stoppers.push(bound.stopper);
    Ok(bound.listener)
}

/// How clients and peers reach this node.
fn own_address(config: &ServerConfig) -> NodeAddress {
    NodeAddress {
        node_id: config.node_id,
        native: config.listen.to_string(),
        resp: config.resp.to_string(),
        shard_native: (0..config.shard_count())
            .map(|i| config.shard_native_addr(i).to_string())
            .collect(),
    }
}

/// The membership every node must agree on at the peer handshake.
fn cluster_spec(config: &ServerConfig, members: &[(u32, SocketAddr)]) -> ClusterSpec {
    ClusterSpec {
        partitions: config.partitions,
        replicas: config.replica_count().min(u8::MAX as usize) as u8,
        members: members
            .iter()
            .map(|(id, addr)| MemberSpec {
                node_id: *id,
                native: addr.to_string(),
            })
            .collect(),
    }
}

/// Used by tests and tools that need the data directory of a shard.
pub fn shard_data_dir(data_dir: &Path, shard: usize) -> std::path::PathBuf {
    layout::shard_dir(data_dir, shard)
}
