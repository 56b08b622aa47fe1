//! ringkv-client: talk to a ringkv cluster from Rust.
//!
//! The client learns the partition map from any node and sends each request straight
//! to the shard (core) that owns its key, over persistent connections on which many
//! requests are in flight at once. Reads return every sibling value and a causal
//! context; writes take the context back so they supersede exactly what was read.
//!
//! Two front ends share one implementation: [`AsyncClient`] for tokio, and [`Client`]
//! for plain threads (it runs a private tokio runtime).
//!
//! ```no_run
//! use ringkv_client::Client;
//!
//! # fn main() -> Result<(), ringkv_client::Error> {
//! let client = Client::builder().seeds(["127.0.0.1:7500"]).connect_blocking()?;
//! client.put(b"user:42", b"Ada")?;
//! let found = client.get(b"user:42")?;
//! assert_eq!(found.value(), Some(&b"Ada"[..]));
//!
//! // Concurrent writers leave siblings; merge them and write back with the context.
//! client.modify(b"cart:7", |siblings| {
//!     let mut items: Vec<u8> = siblings.concat();
//!     items.sort();
//!     items.dedup();
//!     Some(items)
//! })?;
//! # Ok(())
//! # }
//! ```
//!
//! Errors say whether a retry is safe ([`Error::retry_safe`]); a write that was sent
//! but not confirmed is [`Error::Timeout`], whose outcome is unknown, never "failed".
//! The client itself retries, by its [`RetryPolicy`], only what is safe to repeat.

mod blocking;
mod client;
mod connection;
mod error;
mod options;
mod router;

pub use blocking::Client;
pub use client::{AsyncClient, ClientBuilder, Context, PutMode, StatusEach, Versions};
pub use error::Error;
pub use options::{Config, ReadOptions, RetryPolicy, WriteOptions};
pub use ringkv_proto::{MemberReport, NodeAddress, NodeStatus, ShardStatus, Topology};
