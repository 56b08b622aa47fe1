//! The async client (tokio) and its builder.

use std::sync::Arc;
use std::time::Duration;

use ringkv_proto::{Body, Found, NodeStatus, Op, Put, Topology, WriteContext};

use crate::router::Router;
use crate::{Config, Error, ReadOptions, RetryPolicy, WriteOptions};

/// The opaque causal context of a read: hand it back with the next write of the key so
/// that the write supersedes exactly the siblings that read returned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Context(Vec<u8>);

impl Context {
    /// The context's bytes, to store or print; give them back with [`Context::from_bytes`].
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Context {
        Context(bytes.into())
    }
}

/// What a read found: every sibling value (none when the key is absent or deleted;
/// more than one when writes were concurrent) and the context covering them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Versions {
    pub siblings: Vec<Vec<u8>>,
    pub context: Context,
    /// Answers from stand-ins for down replicas (sloppy quorum); above zero, the
    /// read may miss writes the key's own replicas hold.
    pub stand_ins: u32,
}

impl Versions {
    /// True when the key is absent or deleted.
    pub fn is_empty(&self) -> bool {
        self.siblings.is_empty()
    }

    /// The value when there is exactly one.
    pub fn value(&self) -> Option<&[u8]> {
        match self.siblings.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }
}

impl From<Found> for Versions {
    fn from(found: Found) -> Versions {
        Versions {
            siblings: found.siblings,
            context: Context(found.context),
            stand_ins: found.stand_ins,
        }
    }
}

/// Which stored versions a write supersedes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutMode {
    /// Whatever the node reads just before writing, like Redis's SET.
    Latest,
    /// Exactly those a previous read returned: the safe way to resolve siblings.
    After(Context),
    /// None: the write becomes a sibling of whatever is stored.
    Sibling,
}

impl From<PutMode> for WriteContext {
    fn from(mode: PutMode) -> WriteContext {
        match mode {
            PutMode::Latest => WriteContext::Latest,
            PutMode::After(context) => WriteContext::Given(context.0),
            PutMode::Sibling => WriteContext::Blind,
        }
    }
}

/// The least time between two refreshes of the partition map.
const STALE_REFRESH_PAUSE: Duration = Duration::from_millis(100);

/// Sets up a client; every setting has a default (see [`Config`]).
#[derive(Debug, Clone, Default)]
pub struct ClientBuilder {
    config: Config,
}

impl ClientBuilder {
    pub fn new() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Native-protocol addresses (HOST:PORT) to learn the cluster from; replaces the
    /// default (127.0.0.1:7500).
    pub fn seeds<S: Into<String>>(mut self, seeds: impl IntoIterator<Item = S>) -> Self {
        self.config.seeds = seeds.into_iter().map(Into::into).collect();
        self
    }

    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    pub fn connections_per_shard(mut self, connections: usize) -> Self {
        self.config.connections_per_shard = connections.max(1);
        self
    }

    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    /// R and W for requests that do not name their own.
    pub fn quorum(mut self, r: Option<u8>, w: Option<u8>) -> Self {
        (self.config.default_r, self.config.default_w) = (r, w);
        self
    }

    pub fn topology_refresh(mut self, every: Duration) -> Self {
        self.config.topology_refresh = every;
        self
    }

    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.config.client_name = name.into();
        self
    }

    /// Connects from inside a tokio runtime: learns the topology from the seeds and
    /// starts refreshing it in the background.
    pub async fn connect(self) -> Result<AsyncClient, Error> {
        if self.config.seeds.is_empty() {
            return Err(Error::InvalidArgument("no seed addresses".into()));
        }
        let router = Arc::new(Router::new(self.config));
        router.refresh().await?;
        let weak = Arc::downgrade(&router);
        let every = router.config.topology_refresh;
        let stale = router.stale.clone();
        tokio::spawn(async move {
            let mut pause = STALE_REFRESH_PAUSE;
            loop {
                // Every `topology_refresh`, or at once when a reply named a newer map.
                let _ = tokio::time::timeout(every, stale.notified()).await;
                let Some(router) = weak.upgrade() else { break };
                // A failed refresh keeps the old map; requests refresh on errors too.
                let reached = matches!(router.refresh_newest().await, Ok((_, true)));
                drop(router);
                // At most one refresh per pause; one that found no node on the epoch
                // a reply named (a node naming epochs no ring has) doubles the pause,
                // up to the periodic interval.
                pause = if reached {
                    STALE_REFRESH_PAUSE
                } else {
                    (pause * 2).min(every)
                };
                tokio::time::sleep(pause).await;
            }
        });
        Ok(AsyncClient { router })
    }

    /// Connects a blocking client (see [`crate::Client`]); must not be called from
    /// inside an async runtime.
    pub fn connect_blocking(self) -> Result<crate::Client, Error> {
        crate::Client::connect(self)
    }
}

/// A client for async code on tokio. Cheap to clone: clones share connections.
///
/// Every request goes straight to the shard that owns its key, over a pooled
/// connection on which any number of requests are in flight at once.
#[derive(Clone)]
pub struct AsyncClient {
    router: Arc<Router>,
}

/// Each node's id with its status, or why it did not give one.
pub type StatusEach = Vec<(u32, Result<NodeStatus, Error>)>;

impl AsyncClient {
    pub fn builder() -> ClientBuilder {
        ClientBuilder::new()
    }

    /// Every sibling of `key` and their context.
    pub async fn get(&self, key: &[u8]) -> Result<Versions, Error> {
        self.get_with(key, ReadOptions::default()).await
    }

    pub async fn get_with(&self, key: &[u8], options: ReadOptions) -> Result<Versions, Error> {
        let r = options.r.or(self.router.config.default_r);
        let op = || Op::Get {
            key: key.to_vec(),
            r,
            strict: options.strict,
        };
        self.run(Some(key), false, options.timeout, op, |body| match body {
            Body::Found(found) => Ok(found.into()),
            other => Err(unexpected(other)),
        })
        .await
    }

    /// A read coordinated by the node at `addr` (a native address) instead of the
    /// key's owner: for tools that check one node's view.
    pub async fn get_on(
        &self,
        addr: &str,
        key: &[u8],
        options: ReadOptions,
    ) -> Result<Versions, Error> {
        let r = options.r.or(self.router.config.default_r);
        let wait = options
            .timeout
            .unwrap_or(self.router.config.request_timeout);
        let op = Op::Get {
            key: key.to_vec(),
            r,
            strict: options.strict,
        };
        match self.router.call(addr, op, wait).await? {
            Body::Found(found) => Ok(found.into()),
            other => Err(failure(other)),
        }
    }

    /// Writes `value`, replacing what the node holds (like Redis's SET).
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        self.put_with(key, value, PutMode::Latest, WriteOptions::default())
            .await
    }

    /// Writes `value`, superseding exactly the siblings `context` covers.
    pub async fn put_after(
        &self,
        key: &[u8],
        value: &[u8],
        context: &Context,
    ) -> Result<(), Error> {
        let mode = PutMode::After(context.clone());
        self.put_with(key, value, mode, WriteOptions::default())
            .await
    }

    pub async fn put_with(
        &self,
        key: &[u8],
        value: &[u8],
        mode: PutMode,
        options: WriteOptions,
    ) -> Result<(), Error> {
        let w = options.w.or(self.router.config.default_w);
        let op = || {
            Op::Put(Put {
                key: key.to_vec(),
                value: value.to_vec(),
                context: mode.clone().into(),
                w,
                strict: options.strict,
            })
        };
        self.run(Some(key), true, options.timeout, op, written)
            .await
    }

    /// Deletes `key` (a tombstone superseding what the node holds).
    pub async fn delete(&self, key: &[u8]) -> Result<(), Error> {
        self.delete_with(key, PutMode::Latest, WriteOptions::default())
            .await
    }

    pub async fn delete_with(
        &self,
        key: &[u8],
        mode: PutMode,
        options: WriteOptions,
    ) -> Result<(), Error> {
        let w = options.w.or(self.router.config.default_w);
        let op = || Op::Delete {
            key: key.to_vec(),
            context: mode.clone().into(),
            w,
            strict: options.strict,
        };
        self.run(Some(key), true, options.timeout, op, written)
            .await
    }

    /// Read-merge-write: reads every sibling of `key`, lets `merge` compute the new
    /// value (None deletes), and writes it with the context read, so the write replaces
    /// exactly what `merge` saw. A writer racing in between is not lost: its value
    /// stays as a sibling, and the next `modify` merges it.
    pub async fn modify<F>(&self, key: &[u8], mut merge: F) -> Result<(), Error>
    where
        F: FnMut(&[Vec<u8>]) -> Option<Vec<u8>>,
    {
        let seen = self.get(key).await?;
        let mode = PutMode::After(seen.context.clone());
        match merge(&seen.siblings) {
            Some(value) => {
                self.put_with(key, &value, mode, WriteOptions::default())
                    .await
            }
            None => self.delete_with(key, mode, WriteOptions::default()).await,
        }
    }

    /// Reads of several keys, in order; each is routed to its own shard.
    pub async fn multi_get(&self, keys: &[&[u8]]) -> Vec<Result<Versions, Error>> {
        let reads = keys.iter().map(|key| self.get(key));
        futures_util::future::join_all(reads).await
    }

    /// Writes of several keys (each replacing what is stored), in order. Each stands
    /// alone: there is no atomicity across keys.
    pub async fn multi_put(&self, items: &[(&[u8], &[u8])]) -> Vec<Result<(), Error>> {
        let writes = items.iter().map(|(key, value)| self.put(key, value));
        futures_util::future::join_all(writes).await
    }

    /// Round trip to some node.
    pub async fn ping(&self) -> Result<(), Error> {
        self.run(
            None,
            false,
            None,
            || Op::Ping,
            |body| match body {
                Body::Pong => Ok(()),
                other => Err(unexpected(other)),
            },
        )
        .await
    }

    /// Every node's status (shards, keys, request counters), one node at a time, for the
    /// nodes of the map this client routes by.
    pub async fn status(&self) -> Result<Vec<NodeStatus>, Error> {
        self.status_each()
            .await?
            .into_iter()
            .map(|(_, s)| s)
            .collect()
    }

    /// Every node's status, or why that node did not give it (a paused or dead node
    /// must not hide the others' views of it), by node id.
    pub async fn status_each(&self) -> Result<StatusEach, Error> {
        // Fetched afresh: an operator asking after a membership change sees the nodes
        // the ring has now.
        let topology = self.router.refresh().await?;
        let wait = self.router.config.request_timeout;
        let mut all = Vec::new();
        for node in &topology.nodes {
            all.push((node.node_id, self.status_of(&node.native, wait).await));
        }
        // A seed the ring no longer names (a node that left, still running) is asked
        // too: an operator pointing at it sees what it still holds.
        let listed = |addr: &String| topology.nodes.iter().any(|n| &n.native == addr);
        for seed in self.router.config.seeds.iter().filter(|s| !listed(s)) {
            if let Ok(status) = self.status_of(seed, wait).await
                && !all.iter().any(|(id, _)| *id == status.node_id)
            {
                all.push((status.node_id, Ok(status)));
            }
        }
        Ok(all)
    }

    async fn status_of(&self, addr: &str, wait: Duration) -> Result<NodeStatus, Error> {
        match self.router.call(addr, Op::Status, wait).await {
            Ok(Body::Status(status)) => Ok(status),
            Ok(other) => Err(failure(other)),
            Err(e) => Err(e),
        }
    }

    /// The partition map this client routes by, fetched afresh.
    pub async fn topology(&self) -> Result<Topology, Error> {
        Ok(self.router.refresh().await?.as_ref().clone())
    }

    /// The partition map this client routes by now, as last fetched (nothing is
    /// asked of a node): the periodic refresh, connection errors and replies from
    /// nodes on a newer ring replace it.
    pub fn routing_map(&self) -> Option<Topology> {
        self.router.held().map(|t| t.as_ref().clone())
    }

    /// Sends one request with the retry policy: a connection error drops the connection
    /// and refreshes the map; only errors after which a retry is safe are retried.
    async fn run<T>(
        &self,
        key: Option<&[u8]>,
        write: bool,
        timeout: Option<Duration>,
        op: impl Fn() -> Op,
        parse: impl Fn(Body) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let policy = &self.router.config.retry;
        let wait = timeout.unwrap_or(self.router.config.request_timeout);
        let mut attempt = 0;
        loop {
            let result = self.attempt(key, wait, op(), &parse).await;
            match result {
                Err(e) if attempt + 1 < policy.attempts.max(1) && e.retried(write) => {
                    tokio::time::sleep(policy.pause(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn attempt<T>(
        &self,
        key: Option<&[u8]>,
        wait: Duration,
        op: Op,
        parse: &impl Fn(Body) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let addr = self.router.address_for(key).await?;
        match self.router.call(&addr, op, wait).await {
            // A silent node: the next attempt goes elsewhere.
            Err(e @ Error::Timeout { .. }) => {
                self.router.avoid(&addr);
                Err(e)
            }
            // The node is down, moved or broke the connection: route around it, and
            // learn the map again.
            Err(e) => {
                self.router.avoid(&addr);
                let _ = self.router.refresh().await;
                Err(e)
            }
            Ok(Body::Error(e)) => Err(e.into()),
            Ok(body) => parse(body),
        }
    }
}

fn written(body: Body) -> Result<(), Error> {
    match body {
        Body::Written => Ok(()),
        other => Err(unexpected(other)),
    }
}

fn unexpected(body: Body) -> Error {
    Error::Protocol(format!("unexpected answer {body:?}"))
}

/// The error an answer other than the expected one stands for.
fn failure(body: Body) -> Error {
    match body {
        Body::Error(e) => e.into(),
        other => unexpected(other),
    }
}
