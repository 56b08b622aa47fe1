//! The store's error type: what went wrong and whether anything acknowledged is at risk.

use std::io;

/// Errors from the store. Cloneable so one failed group commit can be reported to every
/// writer that shared it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// The caller's input breaks a documented limit (key, version or value size, config).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The disk is full. The write was not acknowledged and nothing acknowledged
    /// earlier is lost; writes may succeed again once space is freed.
    #[error("disk full while {op}: write not acknowledged (nothing acknowledged earlier is lost)")]
    DiskFull { op: &'static str },
    /// An fdatasync failed earlier. Linux may have dropped the dirty pages and marked
    /// them clean, so a retry could "succeed" without the data: the store refuses all
    /// further writes until it is reopened (which re-reads what is really on disk).
    #[error("store failed and refuses writes: {0}; reopen the store to recover")]
    Failed(String),
    /// Any other I/O error, with the operation that hit it.
    #[error("I/O error while {op}: {message}")]
    Io {
        op: &'static str,
        kind: io::ErrorKind,
        message: String,
    },
    /// A record read back from disk failed its checksum. It is never served; the
    /// replication layer treats the key as missing here and repairs it from replicas.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The store is shutting down.
    #[error("store is closed")]
    Closed,
}

impl StoreError {
    pub(crate) fn io(op: &'static str, err: io::Error) -> StoreError {
        if err.kind() == io::ErrorKind::StorageFull || err.raw_os_error() == Some(libc::ENOSPC) {
            return StoreError::DiskFull { op };
        }
        StoreError::Io {
            op,
            kind: err.kind(),
            message: err.to_string(),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
