//! Store configuration and its validation.

use std::time::Duration;

use crate::error::{Result, StoreError};
use crate::record::{MAX_KEY_LEN, MAX_VERSION_LEN, RECORD_OVERHEAD};

/// Direct I/O alignment used for every write offset and length. 4 KiB is the logical
/// block size of every device we target; the DMA disk checks it at open.
pub const ALIGN: u64 = 4096;

/// Hard ceiling for `max_value_len`.
pub const MAX_VALUE_LEN_CEILING: usize = 16 << 20;

/// When a put is acknowledged relative to the disk. See docs/architecture.md,
/// "Durability modes", for the loss window of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledge after write + fdatasync. Nothing acknowledged is ever lost.
    Sync,
    /// Acknowledge after the write reaches the device; fdatasync one interval after the
    /// oldest unsynced write. A power loss can lose the writes acknowledged in the last
    /// interval (plus one fdatasync); kill -9 loses none.
    Interval(Duration),
    /// Acknowledge after the write reaches the device; fdatasync only when a segment is
    /// sealed, before compaction replaces a segment, at `Store::sync` and at close. A
    /// power loss can lose what the active segment got since its last fdatasync.
    None,
}

impl std::str::FromStr for Durability {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sync" => Ok(Durability::Sync),
            "none" => Ok(Durability::None),
            _ => {
                let ms = s
                    .strip_prefix("interval(")
                    .and_then(|rest| rest.strip_suffix("ms)").or_else(|| rest.strip_suffix(')')))
                    .and_then(|n| n.parse::<u64>().ok())
                    .ok_or_else(|| {
                        StoreError::InvalidArgument(format!(
                            "durability {s:?}: expected sync, none or interval(<ms>)"
                        ))
                    })?;
                Ok(Durability::Interval(Duration::from_millis(ms)))
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Bytes per segment file; a multiple of ALIGN and large enough for one maximal record.
    pub segment_size: u64,
    /// Largest value accepted, in bytes (default 1 MiB, at most 16 MiB).
    pub max_value_len: usize,
    pub durability: Durability,
    /// Bytes of records kept in the user-space cache (direct I/O bypasses the page cache).
    pub cache_bytes: u64,
    /// Largest batch of records written by one group commit.
    pub commit_batch_bytes: usize,
    /// A sealed segment is compacted once this fraction of its bytes is garbage.
    pub compaction_garbage_ratio: f64,
    /// Keep one segment's worth of space allocated in `compaction.reserve`, so that
    /// compaction can still write its output when the disk is full: it frees the
    /// reserve, compacts, and takes the reserve back once there is room.
    pub compaction_reserve: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            segment_size: 64 << 20,
            max_value_len: 1 << 20,
            durability: Durability::Sync,
            cache_bytes: 256 << 20,
            commit_batch_bytes: 1 << 20,
            compaction_garbage_ratio: 0.5,
            compaction_reserve: true,
        }
    }
}

impl StoreConfig {
    /// The largest record this configuration can produce.
    pub fn max_record_len(&self) -> u64 {
        (RECORD_OVERHEAD + MAX_KEY_LEN + MAX_VERSION_LEN + self.max_value_len) as u64
    }

    pub fn validate(&self) -> Result<()> {
        let invalid = |msg: String| Err(StoreError::InvalidArgument(msg));
        if self.max_value_len > MAX_VALUE_LEN_CEILING {
            return invalid(format!(
                "max_value_len {} exceeds the ceiling of {MAX_VALUE_LEN_CEILING} bytes",
                self.max_value_len
            ));
        }
        if !self.segment_size.is_multiple_of(ALIGN) {
            return invalid(format!(
                "segment_size {} is not a multiple of {ALIGN}",
                self.segment_size
            ));
        }
        // A group commit is written whole into one segment (batches are cut to fit a
        // fresh one), so a fresh segment must hold the largest record.
        if self.segment_size < crate::segment::HEADER_LEN + self.max_record_len() {
            return invalid(format!(
                "segment_size {} cannot hold its {}-byte header block and a maximal record of {} bytes; raise it or lower max_value_len",
                self.segment_size,
                crate::segment::HEADER_LEN,
                self.max_record_len()
            ));
        }
        if self.commit_batch_bytes == 0 {
            return invalid("commit_batch_bytes must be above zero".into());
        }
        if self.segment_size > u32::MAX as u64 {
            return invalid(format!("segment_size {} exceeds 4 GiB", self.segment_size));
        }
        if !(0.05..=0.95).contains(&self.compaction_garbage_ratio) {
            return invalid(format!(
                "compaction_garbage_ratio {} must be within 0.05..=0.95",
                self.compaction_garbage_ratio
            ));
        }
        if let Durability::Interval(d) = self.durability
            && d.is_zero()
        {
            return invalid("durability interval must be above zero (use sync)".into());
        }
        Ok(())
    }
}
