//! The store's only way to touch storage: a small async trait with two implementations,
//! `DmaDisk` (real files, O_DIRECT through glommio's io_uring) and `SimDisk` (memory,
//! with crashes that drop or tear unsynced writes, for tests and the simulator).
//!
//! Contract every implementation keeps:
//! - `write_at` takes a buffer from `alloc` whose length and offset are multiples of
//!   `config::ALIGN`; it writes all of it or fails. Written bytes are visible to reads at
//!   once but are durable only after `sync` returns Ok.
//! - A failed `sync` means the data may be lost; the caller must not retry it
//!   (fsyncgate) and must treat every unsynced write as gone.
//! - Creating, renaming and removing files is durable only after `sync_dir`.

mod dma;
mod sim;

use std::io;
use std::ops::Deref;
use std::time::Duration;

pub use dma::DmaDisk;
pub use sim::{SimDisk, SimFaults};

/// A directory of files. Single-threaded by design: futures are not Send.
#[allow(async_fn_in_trait)]
pub trait Disk: Clone + 'static {
    type File: DiskFile;

    /// Opens `name`, creating it if it does not exist.
    async fn open(&self, name: &str) -> io::Result<Self::File>;
    /// Names of every file in the directory.
    async fn list(&self) -> io::Result<Vec<String>>;
    async fn remove(&self, name: &str) -> io::Result<()>;
    /// Atomically replaces `to` with `from`.
    async fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Makes creations, renames and removals durable.
    async fn sync_dir(&self) -> io::Result<()>;
    /// Waits `duration` (real time for DmaDisk; returns at once in simulation).
    async fn sleep(&self, duration: Duration);
    /// Lets other tasks run if this one has had the CPU for long enough.
    async fn yield_now(&self);
    /// Monotonic time since an arbitrary start, for deadlines (the simulated clock for
    /// SimDisk). Never stored.
    fn now(&self) -> Duration;
    /// A fresh random value that no reader of the log can guess (a segment's checksum
    /// salt): from the OS for DmaDisk, from the seeded generator for SimDisk.
    fn fresh_salt(&self) -> u64;
}

#[allow(async_fn_in_trait)]
pub trait DiskFile: 'static {
    type Buf: WriteBuf;
    type Read: Deref<Target = [u8]>;

    /// A zeroed buffer of `len` bytes suitable for `write_at`.
    fn alloc(&self, len: usize) -> Self::Buf;
    async fn write_at(&self, buf: Self::Buf, pos: u64) -> io::Result<()>;
    /// Reads up to `len` bytes at `pos`; fewer only at the end of the file.
    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Self::Read>;
    /// fdatasync.
    async fn sync(&self) -> io::Result<()>;
    async fn size(&self) -> io::Result<u64>;
    /// Cuts (or extends with zeroes) the file to `len` bytes; durable after `sync`.
    async fn truncate(&self, len: u64) -> io::Result<()>;
    /// Allocates space for the first `len` bytes (fallocate), so that writing them later
    /// cannot run out of space; the file's size becomes at least `len`.
    async fn allocate(&self, len: u64) -> io::Result<()>;
}

pub trait WriteBuf {
    fn bytes_mut(&mut self) -> &mut [u8];
}
