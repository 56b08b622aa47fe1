//! ringkv-server: the node runtime.
//!
//! Each shard (one glommio executor, one core) owns a disjoint set of partitions, one
//! engine store, and one `ringkv_cluster::Node` state machine. The `driver` module
//! carries out what that state machine asks (storage reads and durable writes, timers,
//! replies) — the same state machine the simulator drives in tests. A single node is a
//! one-member ring, so replication later adds members, not a new request path.

pub mod commands;
pub mod config;
pub mod connections;
pub mod driver;
pub mod layout;
pub mod listener;
pub mod native;
pub mod ops;
pub mod peers;
pub mod pipeline;
pub mod resp;
pub mod runtime;
pub mod shard;
pub mod tasks;

pub use driver::ShardDriver;
