//! Where each request goes: the partition map learned from the nodes, and a pool of
//! connections per shard address.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ringkv_proto::{Body, Op, Topology};
use tokio::sync::Notify;

use crate::connection::Connection;
use crate::{Config, Error};

pub(crate) struct Router {
    pub config: Config,
    topology: RwLock<Option<Arc<Topology>>>,
    /// The epoch of the map held (0 before the first): read on every reply, so kept
    /// apart from the lock.
    held_epoch: AtomicU64,
    /// The highest map epoch any reply carried. Above `held_epoch`, the map is stale:
    /// the ring changed, and `stale` wakes the background refresher.
    newest_epoch: Arc<AtomicU64>,
    pub stale: Arc<Notify>,
    pools: Mutex<HashMap<String, Vec<Arc<Connection>>>>,
    turn: AtomicUsize,
    /// Addresses that failed recently, and until when to avoid them: any node accepts
    /// any key, so a request whose owner is down or silent goes to another node.
    avoid: Mutex<HashMap<String, Instant>>,
}

/// How long an address that failed is avoided.
const AVOID_FOR: Duration = Duration::from_secs(2);

impl Router {
    pub fn new(config: Config) -> Router {
        Router {
            config,
            topology: RwLock::new(None),
            held_epoch: AtomicU64::new(0),
            newest_epoch: Arc::new(AtomicU64::new(0)),
            stale: Arc::new(Notify::new()),
            pools: Mutex::new(HashMap::new()),
            turn: AtomicUsize::new(0),
            avoid: Mutex::new(HashMap::new()),
        }
    }

    /// The partition map, fetched first if the client has none.
    pub async fn topology(&self) -> Result<Arc<Topology>, Error> {
        if let Some(topology) = self.topology.read().expect("never poisoned").clone() {
            return Ok(topology);
        }
        self.refresh().await
    }

    /// Fetches the partition map from the first node that answers with one at least as
    /// new as the map held (known nodes first, then the seeds).
    pub async fn refresh(&self) -> Result<Arc<Topology>, Error> {
        let held = self.held_epoch.load(Ordering::Relaxed);
        Ok(self.fetch(held).await?.0)
    }

    /// Fetches the partition map of the newest epoch a reply named (for the background
    /// refresher). True with it if one node had it; if none did, the epoch a reply
    /// named is forgotten (a node that no longer answers, or one that named an epoch
    /// no ring has), so replies stop waking the refresher until one names a newer
    /// epoch again.
    pub async fn refresh_newest(&self) -> Result<(Arc<Topology>, bool), Error> {
        let wanted = self.newest_epoch.load(Ordering::Relaxed);
        let (topology, reached) = self.fetch(wanted).await?;
        if !reached {
            let _ = self.newest_epoch.compare_exchange(
                wanted,
                topology.epoch,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        Ok((topology, reached))
    }

    /// The first map of at least epoch `wanted` a node gives (and true), else the
    /// newest any gave (and false).
    async fn fetch(&self, wanted: u64) -> Result<(Arc<Topology>, bool), Error> {
        let mut candidates: Vec<String> = self
            .topology
            .read()
            .expect("never poisoned")
            .iter()
            .flat_map(|t| t.nodes.iter().map(|n| n.native.clone()))
            .collect();
        candidates.extend(self.config.seeds.iter().cloned());
        candidates.dedup();
        let mut last_error = Error::Connect {
            addr: String::new(),
            reason: "no seed addresses configured".into(),
        };
        let mut best: Option<Topology> = None;
        for addr in candidates {
            let wait = self.config.request_timeout;
            let fetched = match self.call(&addr, Op::Topology, wait).await {
                Ok(Body::Topology(t)) => Ok(t),
                Ok(other) => Err(Error::Protocol(format!(
                    "topology request answered with {other:?}"
                ))),
                Err(e) => Err(e),
            };
            match fetched {
                // A node that has not heard of the newer ring yet: ask the next one.
                Ok(topology) if topology.epoch < wanted => {
                    if best.as_ref().is_none_or(|b| b.epoch < topology.epoch) {
                        best = Some(topology);
                    }
                }
                Ok(topology) => return Ok((self.hold(topology), true)),
                Err(e) => last_error = e,
            }
        }
        match best {
            Some(topology) => Ok((self.hold(topology), false)),
            None => Err(last_error),
        }
    }

    /// The map held now, if any was fetched yet.
    pub fn held(&self) -> Option<Arc<Topology>> {
        self.topology.read().expect("never poisoned").clone()
    }

    /// Keeps `topology` unless the map held is newer (two refreshes racing, or a
    /// lagging node answering): routing never moves back to an older ring. Returns the
    /// map held.
    fn hold(&self, topology: Topology) -> Arc<Topology> {
        let mut held = self.topology.write().expect("never poisoned");
        if let Some(current) = held.as_ref()
            && current.epoch > topology.epoch
        {
            return current.clone();
        }
        let topology = Arc::new(topology);
        self.held_epoch.store(topology.epoch, Ordering::Relaxed);
        *held = Some(topology.clone());
        topology
    }

    /// The native address of the shard that owns `key` (any node when `key` is None).
    pub async fn address_for(&self, key: Option<&[u8]>) -> Result<String, Error> {
        let topology = self.topology().await?;
        let routed = key.and_then(|key| topology.route(key));
        if let Some((node, shard)) = routed
            && let Some(addr) = node.shard_native.get(shard)
            && !self.avoided(&[addr, &node.native])
        {
            return Ok(addr.clone());
        }
        // No usable map entry, a keyless request, or an owner that failed recently:
        // any node can serve it (the node forwards a write it holds no replica of).
        let n = topology.nodes.len().max(1);
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let healthy = (0..topology.nodes.len())
            .map(|i| &topology.nodes[(turn + i) % n])
            .find(|node| !self.avoided(&[&node.native]));
        let any = topology.nodes.get(turn % n);
        Ok(healthy
            .or(any)
            .map_or_else(|| self.config.seeds[0].clone(), |n| n.native.clone()))
    }

    /// Avoids `addr` for a while after it failed.
    pub fn avoid(&self, addr: &str) {
        let mut avoid = self.avoid.lock().expect("never poisoned");
        avoid.insert(addr.to_owned(), Instant::now() + AVOID_FOR);
    }

    /// Whether any of `addrs` failed recently (one lock, and no clock read while
    /// nothing is avoided: this runs on every request).
    fn avoided(&self, addrs: &[&str]) -> bool {
        let mut avoid = self.avoid.lock().expect("never poisoned");
        if avoid.is_empty() {
            return false;
        }
        let now = Instant::now();
        avoid.retain(|_, until| *until > now);
        addrs.iter().any(|addr| avoid.contains_key(*addr))
    }

    /// A live connection to `addr`, opening one if the pool is not full yet.
    pub async fn connection_to(&self, addr: &str) -> Result<Arc<Connection>, Error> {
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        {
            let mut pools = self.pools.lock().expect("never poisoned");
            let pool = pools.entry(addr.to_owned()).or_default();
            pool.retain(|c| c.is_alive());
            if pool.len() >= self.config.connections_per_shard.max(1) {
                return Ok(pool[turn % pool.len()].clone());
            }
        }
        let config = &self.config;
        let connection = Connection::open(
            addr,
            config.connect_timeout,
            &config.client_name,
            self.newest_epoch.clone(),
        )
        .await?;
        let connection = Arc::new(connection);
        let mut pools = self.pools.lock().expect("never poisoned");
        let pool = pools.entry(addr.to_owned()).or_default();
        if pool.len() < config.connections_per_shard.max(1) {
            pool.push(connection.clone());
        }
        Ok(connection)
    }

    /// Sends `op` to the node at `addr` and waits at most `wait` for its answer (which
    /// may be `Body::Error`). A connection that fails is dropped from the pool. An
    /// answer from a node on a newer partition map wakes the background refresher:
    /// this request was served anyway (any node forwards), the next ones route by the
    /// new ring.
    pub async fn call(&self, addr: &str, op: Op, wait: Duration) -> Result<Body, Error> {
        let connection = self.connection_to(addr).await?;
        match tokio::time::timeout(wait, connection.call(op)).await {
            Err(_) => Err(Error::gave_up()),
            Ok(Err(e)) => {
                self.forget(&connection);
                Err(e)
            }
            Ok(Ok(body)) => {
                let newest = self.newest_epoch.load(Ordering::Relaxed);
                if newest > self.held_epoch.load(Ordering::Relaxed) {
                    self.stale.notify_one();
                }
                Ok(body)
            }
        }
    }

    /// Drops a connection that failed, so the next request opens a fresh one.
    pub fn forget(&self, connection: &Arc<Connection>) {
        let mut pools = self.pools.lock().expect("never poisoned");
        if let Some(pool) = pools.get_mut(&connection.addr) {
            pool.retain(|c| !Arc::ptr_eq(c, connection));
        }
    }
}
