//! The blocking client, for code on plain threads.
//!
//! It runs the async client on a small private tokio runtime and blocks the calling
//! thread on each request, so any number of threads can share one `Client` and their
//! requests are pipelined over the same connections. Do not call it from inside an
//! async runtime (use [`crate::AsyncClient`] there).

use ringkv_proto::{NodeStatus, Topology};
use tokio::runtime::Runtime;

use crate::{
    AsyncClient, ClientBuilder, Context, Error, PutMode, ReadOptions, Versions, WriteOptions,
};

/// A blocking ringkv client; share it between threads by reference or in an `Arc`.
pub struct Client {
    runtime: Runtime,
    inner: AsyncClient,
}

impl Client {
    pub fn builder() -> ClientBuilder {
        ClientBuilder::new()
    }

    pub(crate) fn connect(builder: ClientBuilder) -> Result<Client, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ringkv-client")
            .enable_all()
            .build()
            .map_err(|e| Error::Runtime(e.to_string()))?;
        let inner = runtime.block_on(builder.connect())?;
        Ok(Client { runtime, inner })
    }

    /// The async client this one drives, sharing its connections.
    pub fn as_async(&self) -> &AsyncClient {
        &self.inner
    }

    pub fn get(&self, key: &[u8]) -> Result<Versions, Error> {
        self.runtime.block_on(self.inner.get(key))
    }

    pub fn get_with(&self, key: &[u8], options: ReadOptions) -> Result<Versions, Error> {
        self.runtime.block_on(self.inner.get_with(key, options))
    }

    /// See [`AsyncClient::get_on`].
    pub fn get_on(&self, addr: &str, key: &[u8], options: ReadOptions) -> Result<Versions, Error> {
        self.runtime.block_on(self.inner.get_on(addr, key, options))
    }

    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        self.runtime.block_on(self.inner.put(key, value))
    }

    pub fn put_after(&self, key: &[u8], value: &[u8], context: &Context) -> Result<(), Error> {
        self.runtime
            .block_on(self.inner.put_after(key, value, context))
    }

    pub fn put_with(
        &self,
        key: &[u8],
        value: &[u8],
        mode: PutMode,
        options: WriteOptions,
    ) -> Result<(), Error> {
        self.runtime
            .block_on(self.inner.put_with(key, value, mode, options))
    }

    pub fn delete(&self, key: &[u8]) -> Result<(), Error> {
        self.runtime.block_on(self.inner.delete(key))
    }

    pub fn delete_with(
        &self,
        key: &[u8],
        mode: PutMode,
        options: WriteOptions,
    ) -> Result<(), Error> {
        self.runtime
            .block_on(self.inner.delete_with(key, mode, options))
    }

    /// See [`AsyncClient::modify`].
    pub fn modify<F>(&self, key: &[u8], merge: F) -> Result<(), Error>
    where
        F: FnMut(&[Vec<u8>]) -> Option<Vec<u8>>,
    {
        self.runtime.block_on(self.inner.modify(key, merge))
    }

    pub fn multi_get(&self, keys: &[&[u8]]) -> Vec<Result<Versions, Error>> {
        self.runtime.block_on(self.inner.multi_get(keys))
    }

    pub fn multi_put(&self, items: &[(&[u8], &[u8])]) -> Vec<Result<(), Error>> {
        self.runtime.block_on(self.inner.multi_put(items))
    }

    pub fn ping(&self) -> Result<(), Error> {
        self.runtime.block_on(self.inner.ping())
    }

    pub fn status(&self) -> Result<Vec<NodeStatus>, Error> {
        self.runtime.block_on(self.inner.status())
    }

    /// Every node's status, or why that node did not give it.
    pub fn status_each(&self) -> Result<crate::client::StatusEach, Error> {
        self.runtime.block_on(self.inner.status_each())
    }

    pub fn topology(&self) -> Result<Topology, Error> {
        self.runtime.block_on(self.inner.topology())
    }

    /// See [`AsyncClient::routing_map`].
    pub fn routing_map(&self) -> Option<Topology> {
        self.inner.routing_map()
    }
}
