//! ringkv-server: the node runtime.
//!
//! Each shard (one glommio executor, one core) owns a disjoint set of partitions, one
//! engine store, and one `ringkv_cluster::Node` state machine. The folders follow a
//! request:
//! - [`front`]: the client protocols (Redis and native) over one pipelined connection
//!   loop, and the operations they share;
//! - `shard`: a request's way to the shard that owns its key (at most one hop over the
//!   channel mesh), with `ShardMap` from ringkv-cluster deciding which shard that is;
//! - `peers`: the links to other nodes, which carry peer messages;
//! - `membership` (gossip, failure detection) and `ring_keeper` (the ring view and its
//!   changes), both on shard 0; `ring_file` stores the view; [`ring_change`] asks a
//!   member for a change (`--join`, `ringkv admin`);
//! - [`driver`]: what the state machine asks for (storage, timers, replies, sends),
//!   carried out; the same state machine the simulator drives in tests;
//! - [`runtime`]: starting and stopping the shards, from a [`config`].
//!
//! Only what the `ringkv` binary and the tests use is public.

pub mod config;
pub mod driver;
mod front;
mod layout;
mod listener;
mod membership;
mod peers;
pub mod ring_change;
mod ring_file;
mod ring_keeper;
pub mod runtime;
mod shard;
mod tasks;

pub use driver::ShardDriver;
