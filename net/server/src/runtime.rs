//! Starting and stopping a node: startup checks, one pinned glommio executor per shard
//! joined by a channel mesh, listeners, and a graceful stop on SIGINT or SIGTERM (stop
//! accepting, let open connections finish what they started, close the stores). A shard
//! returns only once every task it started has ended (see `Running::stop`).

use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use glommio::channels::channel_mesh::{Full, MeshBuilder};
use glommio::net::TcpListener;
use glommio::{Latency, LocalExecutorPoolBuilder, PoolPlacement, Shares, Task};
use ringkv_cluster::{
    KeeperConfig, Member, Node, NodeConfig, NodeId, Quorum, Ring, RingView, ShardMap,
};
use ringkv_engine::disk::DmaDisk;
use ringkv_engine::{Store, StoreConfig};

use crate::config::{ServerConfig, Settings};
use crate::driver::ShardDriver;
use crate::front::connections::Connections;
use crate::front::native::NodeInfo;
use crate::layout::{self, NodeLayout};
use crate::listener::{self, Stopper};
use crate::shard::Hop;
use crate::shard::Shard;
use ringkv_proto::NodeAddress;
use ringkv_proto::peer::{ClusterSpec, MemberSpec};

use crate::membership::MembershipDriver;
use crate::peers::Peers;
use crate::ring_change;
use crate::ring_file;
use crate::ring_keeper::{KeeperDriver, Published, RingBoard};
use ringkv_proto::RingChangeRequest;
use ringkv_proto::peer_message::RingFrame;

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
    #[error("shard {shard} failed: {source}")]
    Shard { shard: usize, source: ShardError },
    #[error(transparent)]
    RingFile(#[from] crate::ring_file::RingFileError),
    #[error("the ring: {0}")]
    Ring(String),
}

/// Why one shard could not start, or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("cannot join the shard mesh: {0}")]
    Mesh(String),
    #[error(transparent)]
    Ring(#[from] ringkv_cluster::RingError),
    #[error(transparent)]
    ShardCount(#[from] ringkv_cluster::ShardCountError),
    #[error("the store in {dir}: {source}")]
    Store {
        dir: std::path::PathBuf,
        source: ringkv_engine::StoreError,
    },
    #[error("the store's data directory {dir}: {source}")]
    Disk {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start compaction: {0}")]
    Compaction(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("closing the store: {0}")]
    Close(ringkv_engine::StoreError),
    #[error("the executor panicked: {0}")]
    Panicked(String),
    #[error("the executor failed: {0}")]
    Executor(String),
}

/// Why an executor thread did not return a result: its panic's message, when it has one.
fn failed_executor(error: glommio::GlommioError<()>) -> ShardError {
    use glommio::{BuilderErrorKind, GlommioError};
    match error {
        GlommioError::BuilderError(BuilderErrorKind::ThreadPanic(payload)) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            ShardError::Panicked(message)
        }
        other => ShardError::Executor(other.to_string()),
    }
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
    let mut config = config.settings()?;
    check_io_uring()?;
    check_locked_memory()?;
    raise_open_file_limit();
    let shards = config.shards;
    check_addresses_free(&config)?;
    let _lock = layout::lock(&config.data_dir)?;
    let layout = layout::open(&config.data_dir, config.node_id, config.partitions, shards)?;
    let start = starting_ring(&mut config)?;
    let cluster_id = start.published.cluster;
    let board = RingBoard::new(start.published, shards);
    let stored_view = start.stored;
    let mesh = MeshBuilder::<Hop, _>::full(shards, 1024);
    let meshes = Arc::new(ShardMeshes::new(&mesh, shards));
    let listening = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(StopBarrier::new(shards));
    let config = Arc::new(config);
    let spin = config.spin_before_park;
    let handles = LocalExecutorPoolBuilder::new(PoolPlacement::MaxSpread(shards, None))
        .spin_before_park(spin)
        .on_all_shards(move || {
            let (config, layout, mesh, stop, listening, board) = (
                config.clone(),
                layout.clone(),
                meshes.take(),
                stop.clone(),
                listening.clone(),
                board.clone(),
            );
            let attendance = Attendance::new(barrier.clone(), stop.clone());
            async move {
                let start = ShardStart {
                    board,
                    cluster_id,
                    stored_view,
                };
                let result =
                    run_shard(&config, &layout, mesh, &stop, &listening, attendance, start).await;
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
            Ok(Err(error)) => error,
            Err(e) => failed_executor(e),
        };
        first_error.get_or_insert(StartError::Shard {
            shard,
            source: outcome,
        });
    }
    // Dropped only now that no shard thread can touch it (see `ShardMeshes`).
    drop(mesh);
    first_error.map_or(Ok(()), Err)
}

/// One `MeshBuilder` per shard, all cloned here on the starting thread.
///
/// glommio 0.9's `MeshBuilder` keeps its peer list in an `Rc` yet is `Send`: a clone
/// made on a shard thread while another shard drops its own (at the end of
/// `MeshBuilder::join`) is a data race on the reference count, which can come out one
/// too low. The list is then freed while a shard still holds it, and that shard's
/// later decrement writes into freed heap memory: glibc aborted the node at start or
/// at stop with "unaligned tcache chunk" or "unaligned fastbin chunk" (issue 9's CI;
/// a core dump showed the freed chunk was the mesh's peer list, its first word one
/// less than the allocator had left there). So every clone is made before any shard
/// thread starts, and the original outlives them all: the shards only drop clones,
/// and two racing drops can only leave the count too high (a small leak), never free
/// the list early.
struct ShardMeshes(std::sync::Mutex<Vec<MeshBuilder<Hop, Full>>>);

impl ShardMeshes {
    fn new(mesh: &MeshBuilder<Hop, Full>, shards: usize) -> ShardMeshes {
        ShardMeshes(std::sync::Mutex::new(
            (0..shards).map(|_| mesh.clone()).collect(),
        ))
    }

    /// This shard's builder; each shard takes exactly one.
    fn take(&self) -> MeshBuilder<Hop, Full> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .expect("one mesh builder per shard")
    }
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

/// Runs one shard until the node stops. It returns only once every task it started has
/// ended and every file and socket it opened is closed: when it returns, the executor
/// drops whatever is left, and dropping I/O in flight lets the kernel write into freed
/// memory (see `crate::tasks`).
async fn run_shard(
    config: &Settings,
    layout: &NodeLayout,
    mesh: MeshBuilder<Hop, Full>,
    stop: &Arc<AtomicBool>,
    listening: &AtomicUsize,
    mut attendance: Attendance,
    start: ShardStart,
) -> Result<(), ShardError> {
    let result = serve_shard(
        config,
        layout,
        mesh,
        stop,
        listening,
        &mut attendance,
        start,
    )
    .await;
    // Everything the shard used is dropped by now. glommio closes a dropped file, and
    // cancels a dropped socket's poll, by queueing the request for its next trip to the
    // kernel: make that trip before the executor exits, or the files stay open (in a
    // process that goes on, like a test's) and the cancellations are never sent.
    glommio::timer::sleep(Duration::from_millis(1)).await;
    glommio::timer::sleep(Duration::from_millis(1)).await;
    result
}

async fn serve_shard(
    config: &Settings,
    layout: &NodeLayout,
    mesh: MeshBuilder<Hop, Full>,
    stop: &Arc<AtomicBool>,
    listening: &AtomicUsize,
    attendance: &mut Attendance,
    start: ShardStart,
) -> Result<(), ShardError> {
    // What can fail comes before any task starts, so a failure has nothing to stop.
    let (senders, mut hops) = mesh
        .join()
        .await
        .map_err(|e| ShardError::Mesh(e.to_string()))?;
    let id = senders.peer_id();
    let node_id = NodeId(config.node_id);
    let view = start.board.current().view;
    let ring = view.ring().clone();
    let store = open_store(config, id).await?;
    let store = StoreTasks::start(store)?;

    let shards = ShardMap::new(senders.nr_consumers())?;
    let mut node = Node::with_view(node_config(config, shards, id), view);
    node.set_wall_clock(crate::driver::wall_clock_ms());
    let driver = ShardDriver::new(node, store.store.clone());
    let hints = driver.restore_hints().await;
    driver.rebuild_trees(driver.home_partitions());
    if start.stored_view {
        // What moved away before a crash, its drop not done yet (a view built from
        // --peers at a first start is no ground to drop anything on).
        driver.drop_unserved();
    }
    let every = config.anti_entropy_interval_ms;
    driver.set_anti_entropy_interval((every > 0).then(|| Duration::from_millis(every)));
    if hints > 0 {
        tracing::info!(shard = id, hints, "hints for other nodes recovered");
    }
    let shard = Shard::new(
        ring.clone(),
        driver,
        senders,
        config.max_inflight_per_shard,
        config.max_value_bytes,
        config.quorum,
        start.board.clone(),
    );
    let serve_loops = hops
        .streams()
        .into_iter()
        .map(|(_, receiver)| glommio::spawn_local(shard.clone().serve_peer(receiver)))
        .collect();
    let connections = Rc::new(Connections::new(
        config.max_connections_per_shard,
        config.max_pipeline,
    ));
    let cluster = cluster_spec(config, start.cluster_id);
    // Peers, gossip and the ring keeper run even on a node alone: another may join it.
    let stale_after = config.request_timeout;
    shard.set_peers(Peers::start(node_id, &shard, cluster.clone(), stale_after));
    if id == 0 {
        let incarnation = u64::from(layout.incarnation);
        shard.set_membership(MembershipDriver::start(&shard, config, incarnation));
        let keeper_config = KeeperConfig {
            push_interval: Duration::from_secs(1),
            // Writes coordinated under the old ring end within a request timeout;
            // the shards take up to `follow_ring`'s 50 ms to adopt a view.
            settle: config.request_timeout * 2 + Duration::from_secs(1),
        };
        let data_dir = config.data_dir.clone();
        let keeper = KeeperDriver::start(
            &shard,
            start.board.clone(),
            data_dir,
            keeper_config,
            stop.clone(),
        );
        shard.set_keeper(keeper);
    }
    let follower = glommio::spawn_local(shard.clone().follow_ring(1));
    let info = Rc::new(NodeInfo {
        me: own_address(config),
        incarnation: layout.incarnation,
        cluster,
    });
    let mut listeners = Listeners::default();
    let bound = listeners.start(config, id, &shard, &connections, &info);
    match bound {
        Ok(()) => {
            announce_ready(config, layout, &shard, stop, listening).await;
            while !stop.load(Ordering::Relaxed) {
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
        // The whole node stops: a node missing a shard would refuse every key it owns.
        Err(_) => stop.store(true, Ordering::SeqCst),
    }
    let running = Running {
        shard,
        connections,
        listeners,
        serve_loops,
        follower,
        store,
    };
    let stopped = running.stop(attendance).await;
    if id == 0 && stopped.is_ok() {
        println!("ringkv server stopped");
    }
    bound.and(stopped)
}

async fn open_store(config: &Settings, shard: usize) -> Result<Rc<Store<DmaDisk>>, ShardError> {
    let store_config = StoreConfig {
        durability: config.durability,
        max_value_len: config.max_value_bytes,
        ..StoreConfig::default()
    };
    let dir = layout::shard_dir(&config.data_dir, shard);
    let disk = DmaDisk::new(&dir).map_err(|source| ShardError::Disk {
        dir: dir.clone(),
        source,
    })?;
    Store::open(disk, store_config)
        .await
        .map_err(|source| ShardError::Store { dir, source })
}

fn node_config(config: &Settings, shards: ShardMap, shard: usize) -> NodeConfig {
    // A fresh random seed every start: the node's actors never repeat one used before,
    // whatever happened to its data directory (see `ringkv_cluster::Actor`).
    let mut node_config = NodeConfig::new(NodeId(config.node_id), fresh_epoch_seed());
    node_config.request_timeout = config.request_timeout;
    // The same limits the store enforces, so a merge is checked before the store sees it.
    node_config.stored_value_max = config.max_value_bytes;
    node_config.stored_version_max = ringkv_engine::record::MAX_VERSION_LEN;
    node_config.key_max = ringkv_engine::record::MAX_KEY_LEN;
    // Ids stay unique across the node's shards, so a peer's reply is routed back to
    // the one shard that asked.
    node_config.first_sequence = shards.first_sequence(shard);
    node_config.shards = shards;
    node_config.shard = shard;
    node_config.quorum = config.quorum;
    node_config.hints = config.hints;
    node_config.tombstone_grace = config.tombstone_grace;
    node_config.anti_entropy_pushes_per_second = config.anti_entropy_pushes_per_second;
    node_config.message_delay_max = crate::peers::PEER_USER_TIMEOUT;
    node_config.transfer_keys_per_second = config.transfer_keys_per_second;
    node_config
}

/// What every shard starts from: the node's ring board, and whether its view was
/// stored before this start (see `ShardDriver::drop_unserved`).
struct ShardStart {
    board: Arc<RingBoard>,
    cluster_id: u64,
    stored_view: bool,
}

/// The node's ring view at start.
struct RingStart {
    published: Published,
    /// Whether the view was stored before this start (or handed over by a member the
    /// node joined through), rather than built from `--peers`.
    stored: bool,
}

/// The view the node starts from: the one it stored; else the one the member it
/// joins through answers; else the ring of `--peers` (stored now, so later starts
/// follow the ring's changes whatever `--peers` says). The quorum's N and the member
/// list are then the view's.
fn starting_ring(config: &mut Settings) -> Result<RingStart, StartError> {
    let me = config.node_id;
    let (frame, stored) = match ring_file::load(&config.data_dir)? {
        Some(frame) => (frame, true),
        None => match config.join.clone() {
            Some(seed) => (join_through(config, &seed)?, true),
            None => {
                refuse_data_without_ring(config)?;
                let members: Vec<Member> = config
                    .members
                    .iter()
                    .map(|(id, _)| Member::new(*id))
                    .collect();
                let ring = Ring::new(config.partitions, &members)
                    .map_err(|e| StartError::Ring(e.to_string()))?;
                let frame = RingFrame {
                    cluster: first_cluster_id(config),
                    view: RingView::stable(ring, config.quorum.n()),
                    addresses: Vec::new(),
                };
                (frame, false)
            }
        },
    };
    let RingFrame {
        cluster,
        view,
        addresses,
    } = frame;
    if view.ring().partition_count() != config.partitions {
        return Err(StartError::Ring(format!(
            "the stored ring has {} partitions, the configuration {}",
            view.ring().partition_count(),
            config.partitions
        )));
    }
    let mut book: std::collections::BTreeMap<u32, String> = addresses
        .into_iter()
        .map(|a| (a.node_id, a.native))
        .collect();
    for (node, addr) in &config.members {
        book.entry(node.0).or_insert_with(|| addr.to_string());
    }
    book.insert(me, config.listen.to_string());
    if !view.is_member(NodeId(me)) {
        tracing::warn!(
            node = me,
            "this node is not a member of its ring (it left, or was replaced): it serves no partition"
        );
    }
    let n = view.replicas();
    let majority = n / 2 + 1;
    config.quorum =
        Quorum::new(n, majority, majority).map_err(|e| StartError::Ring(e.to_string()))?;
    config.members = view
        .members()
        .into_iter()
        .chain(std::iter::once(NodeId(me)))
        .filter_map(|node| Some((node, book.get(&node.0)?.parse().ok()?)))
        .collect();
    config.members.sort();
    config.members.dedup();
    if config.replicas != n && config.join.is_none() {
        tracing::warn!(
            configured = config.replicas,
            ring = n,
            "--replicas differs from the stored ring's N: the ring's is used"
        );
    }
    let published = Published {
        cluster,
        view,
        addresses: book,
        streaming: false,
    };
    let addresses = published.address_list();
    ring_file::store(&config.data_dir, cluster, &published.view, &addresses)?;
    Ok(RingStart { published, stored })
}

/// A node starts from the `--peers` ring only on an empty data directory. A store
/// without its `ring.view` (lost, or deleted by hand) was written under a ring this
/// node no longer knows: the cluster may have changed since, and serving on the
/// `--peers` ring meanwhile would send writes to nodes that no longer hold their
/// partitions. `--join` through a member is the way back: a member answers a node
/// already in the ring with the current view. (Every start stores `ring.view` before any shard opens its store, so
/// a directory with a store and no view is never a crash's leftover.)
fn refuse_data_without_ring(config: &Settings) -> Result<(), StartError> {
    match crate::layout::first_store_file(&config.data_dir, config.shards) {
        None => Ok(()),
        Some(file) => Err(StartError::Ring(format!(
            "{} holds data ({}) but no {}: the ring it was written under is unknown. \
             Restore that file, or, if the cluster still counts this node as a member, \
             start with --join <member> to take the cluster's ring from it (what this \
             node no longer serves is then dropped)",
            config.data_dir.display(),
            file.display(),
            crate::ring_file::FILE_NAME
        ))),
    }
}

/// The id of a cluster formed from `--peers`: a hash of its shape and its first
/// members with their addresses, the same on every node given the same list (a node
/// alone hashes itself), and different for two clusters that do not share addresses.
fn first_cluster_id(config: &Settings) -> u64 {
    let mut spec = format!("{} {}", config.partitions, config.quorum.n());
    for (node, addr) in &config.members {
        spec.push_str(&format!(" {}@{addr}", node.0));
    }
    xxhash_rust::xxh3::xxh3_64(spec.as_bytes())
}

/// Asks the member at `seed` to add this node (or to have it replace a dead one);
/// retries while the member cannot be reached, for a while.
fn join_through(config: &Settings, seed: &str) -> Result<RingFrame, StartError> {
    let (node_id, native) = (config.node_id, config.listen.to_string());
    crate::ring_keeper::parse_address(&native).map_err(StartError::Ring)?;
    let partitions = config.partitions;
    let request = match config.replace {
        Some(dead) => RingChangeRequest::Replace {
            dead,
            node_id,
            native,
            partitions,
        },
        None => RingChangeRequest::Join {
            node_id,
            native,
            partitions,
        },
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    if let Some(file) = crate::layout::first_store_file(&config.data_dir, config.shards) {
        // A store that lost its ring.view may come back only as the member it was:
        // joining afresh would keep values of partitions it gains that were deleted
        // (and their tombstones collected) meanwhile.
        let answer = ring_change::view(seed, Duration::from_secs(5))
            .map_err(|e| StartError::Ring(format!("cannot ask {seed} for its ring: {e}")))?;
        if !answer.view.ring().is_member(NodeId(node_id)) {
            return Err(StartError::Ring(format!(
                "{} holds data ({}) and the ring {seed} holds does not count node {node_id} \
                 as a member: start it on an empty data directory to join afresh",
                config.data_dir.display(),
                file.display()
            )));
        }
    }
    loop {
        match ring_change::change(seed, request.clone(), Duration::from_secs(5)) {
            Ok(ring_change::Answer {
                view,
                addresses,
                cluster,
                ..
            }) => {
                println!(
                    "ringkv server: joined through {seed}: ring epoch {}, change {}",
                    view.epoch(),
                    view.change()
                        .map_or_else(|| "none".into(), |c| ring_change::describe(&c))
                );
                return Ok(RingFrame {
                    cluster,
                    view,
                    addresses,
                });
            }
            Err(ring_change::AskError::Unreachable { why, .. }) if Instant::now() < deadline => {
                tracing::warn!(seed, %why, "cannot reach the member to join through; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(StartError::Ring(format!("cannot join: {e}"))),
        }
    }
}

/// 64 bits from the OS's randomness. `RandomState` keys its hasher with getrandom
/// (once per thread, then a fresh key per call), unlike fastrand's thread generator,
/// whose seed is only the time since boot and a thread counter: two starts after a
/// reboot could draw the same epochs.
pub(crate) fn fresh_epoch_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::hash::RandomState::new().build_hasher();
    hasher.write_u64(0x6570_6f63_6873);
    hasher.finish()
}

/// Shard 0 says the node is ready once every shard listens.
async fn announce_ready(
    config: &Settings,
    layout: &NodeLayout,
    shard: &Shard,
    stop: &AtomicBool,
    listening: &AtomicUsize,
) {
    listening.fetch_add(1, Ordering::SeqCst);
    if shard.id != 0 {
        return;
    }
    while listening.load(Ordering::SeqCst) < shard.map().shards() && !stop.load(Ordering::SeqCst) {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    let last = shard.map().shards() - 1;
    println!(
        "ringkv server ready: node {} native={} resp={} shards={} (shard ports native {}..={}, resp {}..={}) data={} incarnation={}",
        config.node_id,
        config.listen,
        config.resp,
        shard.map().shards(),
        config.shard_native_addr(0).port(),
        config.shard_native_addr(last).port(),
        config.shard_resp_addr(0).port(),
        config.shard_resp_addr(last).port(),
        config.data_dir.display(),
        layout.incarnation
    );
}

/// A store and its background tasks: group commits and compaction.
struct StoreTasks {
    store: Rc<Store<DmaDisk>>,
    commits: Task<()>,
    compaction: Task<()>,
}

impl StoreTasks {
    fn start(store: Rc<Store<DmaDisk>>) -> Result<StoreTasks, ShardError> {
        let background = glommio::executor().create_task_queue(
            Shares::Static(10),
            Latency::NotImportant,
            "compaction",
        );
        let compactor = store.clone();
        let compaction = glommio::spawn_local_into(
            async move { compactor.run_compaction(Duration::from_secs(1)).await },
            background,
        )
        .map_err(|e| ShardError::Compaction(e.to_string()))?;
        let runner = store.clone();
        let commits = glommio::spawn_local(async move { runner.run().await });
        Ok(StoreTasks {
            store,
            commits,
            compaction,
        })
    }

    /// Commits what is queued, syncs, and waits for both tasks: compaction returns soon
    /// after the store starts closing, at the end of the segment it is compacting.
    async fn close(self) -> Result<(), ShardError> {
        let closed = self.store.close().await;
        // Awaited even if closing failed: both tasks may have I/O in flight.
        self.commits.await;
        self.compaction.await;
        closed.map_err(ShardError::Close)
    }
}

/// The listeners of one shard and the tasks accepting on them.
#[derive(Default)]
struct Listeners {
    acceptors: Vec<Task<()>>,
    stoppers: Vec<Stopper>,
}

impl Listeners {
    /// Binds the node's shared addresses and this shard's own, for both protocols, and
    /// accepts on each; on a failure the ones already bound keep running (the caller
    /// stops them with the rest of the shard).
    fn start(
        &mut self,
        config: &Settings,
        id: usize,
        shard: &Rc<Shard>,
        connections: &Rc<Connections>,
        info: &Rc<NodeInfo>,
    ) -> Result<(), ShardError> {
        for addr in [config.resp, config.shard_resp_addr(id)] {
            let listener = self.bind(addr)?;
            let (shard, connections) = (shard.clone(), connections.clone());
            self.acceptors.push(glommio::spawn_local(async move {
                crate::front::resp::accept(listener, shard, connections).await
            }));
        }
        for addr in [config.listen, config.shard_native_addr(id)] {
            let listener = self.bind(addr)?;
            let (shard, connections, info) = (shard.clone(), connections.clone(), info.clone());
            self.acceptors.push(glommio::spawn_local(async move {
                crate::front::native::accept(listener, shard, connections, info).await
            }));
        }
        Ok(())
    }

    fn bind(&mut self, addr: SocketAddr) -> Result<TcpListener, ShardError> {
        let bound = listener::bind(addr).map_err(|source| ShardError::Listen { addr, source })?;
        self.stoppers.push(bound.stopper);
        Ok(bound.listener)
    }

    /// No new connection from the moment this is called; returns once no task accepts.
    async fn stop(self) {
        for stopper in &self.stoppers {
            stopper.stop();
        }
        // The shutdown fails each queued accept; cancelling covers one that has just
        // succeeded (its connection is dropped). The executor goes on running, so the
        // kernel's answer to the accept is still collected.
        for acceptor in self.acceptors {
            acceptor.cancel().await;
        }
    }
}

/// Everything a serving shard runs, in the order `stop` ends it.
struct Running {
    shard: Rc<Shard>,
    connections: Rc<Connections>,
    listeners: Listeners,
    /// One loop per other shard, serving the hops it sends.
    serve_loops: Vec<Task<()>>,
    /// Follows the ring views the keeper publishes (`Shard::follow_ring`).
    follower: Task<()>,
    store: StoreTasks,
}

impl Running {
    /// Stops the shard without leaving a task, a socket or a file behind. Each step
    /// ends what could still need the ones after it; the node-wide stages keep a shard
    /// from ending what another shard's remaining work still needs from it.
    async fn stop(self, attendance: &mut Attendance) -> Result<(), ShardError> {
        let Running {
            shard,
            connections,
            listeners,
            serve_loops,
            follower,
            store,
        } = self;
        // Clients: no new ones; open ones finish what they started (at most the drain
        // timeout), then the rest are hung up on. Their requests still have every
        // shard, the peer links and the store.
        connections.close();
        listeners.stop().await;
        drain_clients(&connections).await;
        attendance.reach(Stage::ClientsDone).await;

        // Links from other nodes end (within their 200 ms read timeout), still with
        // the links to other nodes up.
        shard.stop();
        if let Some(membership) = shard.membership() {
            membership.stop().await;
        }
        if let Some(keeper) = shard.keeper() {
            keeper.stop().await;
        }
        follower.await;
        connections.ended().await;
        attendance.reach(Stage::NothingIncoming).await;

        // Nothing new enters the node now. The mesh: this shard sends no more hops; its
        // loop serving each other shard ends once that shard has closed its end too,
        // and the hops served finish (a replica write another shard handed over before
        // the stage is stored here, with the links still up for its acknowledgement).
        shard.close_mesh();
        for serving in serve_loops {
            serving.await;
        }

        // Storage work started by other nodes' messages finishes, its acknowledgements
        // are written, and the links end.
        shard.driver().storage_idle().await;
        if let Some(peers) = shard.peers() {
            peers.close().await;
        }

        // The store: the last storage operations end, then commits and compaction.
        shard.driver().stop().await;
        store.close().await
    }
}

/// Lets open client connections finish (up to `DRAIN_TIMEOUT`), hangs up on those left,
/// and waits until each has ended (a request in progress still ends by its timeout).
async fn drain_clients(connections: &Connections) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while connections.clients_open() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    if connections.clients_open() > 0 {
        tracing::info!(
            open = connections.clients_open(),
            "hanging up on clients still connected"
        );
        connections.hang_up_clients();
    }
    while connections.clients_open() > 0 {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
}

/// Points of a node's stop that every shard reaches before any shard goes past them.
#[derive(Clone, Copy)]
enum Stage {
    /// No shard has a client connection left: no new request enters through a client.
    ClientsDone,
    /// No shard has a link from another node left: no request or message enters the
    /// node any more. (A put another node forwarded here and that still waits for
    /// acks is answered by the forwarder's own deadline: Timeout, outcome unknown.)
    NothingIncoming,
}

const STAGES: usize = 2;

/// How many shards have reached each stage.
struct StopBarrier {
    shards: usize,
    reached: [AtomicUsize; STAGES],
}

impl StopBarrier {
    fn new(shards: usize) -> StopBarrier {
        StopBarrier {
            shards,
            reached: std::array::from_fn(|_| AtomicUsize::new(0)),
        }
    }
}

/// One shard's place at the barrier. A shard that ends before reaching every stage has
/// failed (an error or a panic): it is counted at the stages it skipped, so the others
/// do not wait for it, and it stops the node.
struct Attendance {
    barrier: Arc<StopBarrier>,
    stop: Arc<AtomicBool>,
    /// The first stage this shard has not reached yet.
    next: usize,
}

impl Attendance {
    fn new(barrier: Arc<StopBarrier>, stop: Arc<AtomicBool>) -> Attendance {
        Attendance {
            barrier,
            stop,
            next: 0,
        }
    }

    /// Counts this shard at `stage` (and any before it), then waits for every shard.
    async fn reach(&mut self, stage: Stage) {
        let stage = stage as usize;
        self.arrive_up_to(stage);
        let reached = &self.barrier.reached[stage];
        while reached.load(Ordering::SeqCst) < self.barrier.shards {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }

    fn arrive_up_to(&mut self, stage: usize) {
        while self.next <= stage {
            self.barrier.reached[self.next].fetch_add(1, Ordering::SeqCst);
            self.next += 1;
        }
    }
}

impl Drop for Attendance {
    fn drop(&mut self) {
        if self.next < STAGES {
            self.stop.store(true, Ordering::SeqCst);
            self.arrive_up_to(STAGES - 1);
        }
    }
}

/// How clients and peers reach this node.
fn own_address(config: &Settings) -> NodeAddress {
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
fn cluster_spec(config: &Settings, id: u64) -> ClusterSpec {
    ClusterSpec {
        id,
        partitions: config.partitions,
        // N is at most Quorum::N_MAX (16).
        replicas: config.quorum.n() as u8,
        members: config
            .members
            .iter()
            .map(|(id, addr)| MemberSpec {
                node_id: id.0,
                native: addr.to_string(),
            })
            .collect(),
    }
}

/// Used by tests and tools that need the data directory of a shard.
pub fn shard_data_dir(data_dir: &Path, shard: usize) -> std::path::PathBuf {
    layout::shard_dir(data_dir, shard)
}
