//! ringkv-engine: one shard's durable, log-structured key-value store.
//!
//! Records are appended to fixed-size segment files with O_DIRECT (through the `Disk`
//! trait: glommio's io_uring in production, a crash-simulating disk in tests), indexed in
//! memory per partition, cached in user space, group-committed, compacted in the
//! background and recovered from hint files plus a scan of the rest. The engine stores
//! an opaque version blob with each value; the cluster layer gives it meaning.
//!
//! docs/format.md gives the byte layouts; docs/architecture.md the design and the
//! durability modes.

mod cache;
mod commit;
mod compaction;
pub mod config;
pub mod disk;
mod error;
mod hint;
pub mod index;
mod keylock;
pub mod record;
mod recovery;
mod scan;
mod segment;
mod store;

pub use compaction::CompactionReport;
pub use config::{Durability, StoreConfig};
pub use error::{Result, StoreError};
pub use record::Record;
pub use store::{KeySummary, Merge, Stats, Store, Usage};
