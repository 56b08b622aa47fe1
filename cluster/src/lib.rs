//! ringkv-cluster: ringkv's distributed logic as sans-IO state machines.
//!
//! Nothing here does I/O, reads a clock, draws random numbers, spawns threads or
//! awaits: time comes in as `now`, and every effect goes out as an action for a driver
//! to carry out (the glommio server in production, `ringkv-sim` in tests). A test
//! (`tests/tidy.rs`) enforces this. docs/cluster.md describes the design and the byte
//! layouts.
//!
//! - [`ring`]: partitions, their assignment to nodes, preference lists.
//! - [`clock`] and [`version`]: dotted version vectors, siblings, merge.
//! - [`codec`]: the byte encodings of contexts and stored version sets.

pub mod clock;
pub mod codec;
pub mod ring;
pub mod version;

pub use clock::{Actor, ClockEntry, Dot, VersionVector};
pub use codec::{Context, DecodeError, StoredVersions};
pub use ring::{Member, NodeId, PartitionId, Ring, RingError, ZoneId};
pub use version::{ConflictMode, Value, Version, VersionSet};
