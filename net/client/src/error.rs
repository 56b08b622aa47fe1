//! What can go wrong, and whether trying again is safe.

use ringkv_proto::ErrorReply;
use thiserror::Error;

/// Why a request did not succeed.
///
/// The variants say what the client knows about the outcome: [`Error::retry_safe`] is
/// true when the node certainly did nothing, so sending the request again cannot
/// apply it twice. A write that was sent but not confirmed is `Timeout` (or
/// `ConnectionLost`): it may have been applied and may yet spread, so it is never
/// reported as failed. Reads can always be retried.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The request can never succeed as sent (bad quorum, bad context). Not retried.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A key or value over the node's limits; nothing was written.
    #[error("{what} of {size} bytes exceeds the limit of {limit}")]
    TooLarge { what: String, size: u64, limit: u64 },
    /// The node had too much in flight and did nothing; retry after a pause.
    #[error("the node is overloaded; nothing was done")]
    Overloaded,
    /// Too few replicas were reachable to try; nothing was done.
    #[error("unavailable: {reachable} replicas reachable, {required} required")]
    Unavailable { required: u32, reachable: u32 },
    /// No quorum in time. `acked` counts the replicas known to have answered and
    /// `required` the quorum (0 when the client gave up before the node answered and
    /// the node's default applied). A write's outcome is unknown.
    #[error(
        "timed out with {acked} of {required} replicas answering; a write's outcome is unknown"
    )]
    Timeout { acked: u32, required: u32 },
    /// The write would leave more siblings than the node allows; nothing was written.
    /// Read, merge the siblings, and write back with the context.
    #[error("{count} siblings would exceed the limit of {limit}")]
    TooManySiblings { count: u32, limit: u32 },
    /// The node is stopping and did nothing.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// A failure inside the node.
    #[error("node error: {0}")]
    Internal(String),
    /// A membership change is moving the key and the nodes did not agree yet on who
    /// holds it; nothing was written. Retried by the policy.
    #[error("the ring is changing (the key's replicas are now {replicas:?}); nothing was written")]
    RingChanging { replicas: Vec<u32> },
    /// No connection could be made; nothing was sent.
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The connection broke after the request was sent; a write's outcome is unknown.
    #[error("connection lost before the answer; a write's outcome is unknown")]
    ConnectionLost,
    /// The node said something this client does not understand (or refused the
    /// handshake); the connection was closed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The blocking client could not start its runtime.
    #[error("cannot start the client runtime: {0}")]
    Runtime(String),
}

impl Error {
    /// True when the node certainly did nothing: sending again cannot apply it twice.
    pub fn retry_safe(&self) -> bool {
        matches!(
            self,
            Error::Overloaded
                | Error::Unavailable { .. }
                | Error::ShuttingDown
                | Error::Connect { .. }
                | Error::RingChanging { .. }
        )
    }

    /// True when a write may have been applied although it was not confirmed.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, Error::Timeout { .. } | Error::ConnectionLost)
    }

    /// Whether the client's retry policy tries again after this error.
    pub(crate) fn retried(&self, write: bool) -> bool {
        self.retry_safe() || (!write && self.outcome_unknown())
    }

    /// The client gave up waiting for the node's answer.
    pub(crate) fn gave_up() -> Error {
        Error::Timeout {
            acked: 0,
            required: 0,
        }
    }
}

impl From<ErrorReply> for Error {
    fn from(reply: ErrorReply) -> Error {
        match reply {
            ErrorReply::InvalidArgument { message } => Error::InvalidArgument(message),
            ErrorReply::TooLarge { what, size, limit } => Error::TooLarge { what, size, limit },
            ErrorReply::Overloaded { .. } => Error::Overloaded,
            ErrorReply::Unavailable {
                required,
                reachable,
            } => Error::Unavailable {
                required,
                reachable,
            },
            ErrorReply::Timeout { acked, required } => Error::Timeout { acked, required },
            ErrorReply::TooManySiblings { count, limit } => Error::TooManySiblings { count, limit },
            ErrorReply::ShuttingDown => Error::ShuttingDown,
            ErrorReply::Internal { message } => Error::Internal(message),
            ErrorReply::RingChanging { replicas } => Error::RingChanging { replicas },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_where_nothing_happened_are_retry_safe() {
        assert!(Error::Overloaded.retry_safe());
        assert!(Error::from(ErrorReply::ShuttingDown).retry_safe());
        let timeout = Error::from(ErrorReply::Timeout {
            acked: 1,
            required: 2,
        });
        assert!(!timeout.retry_safe() && timeout.outcome_unknown());
        assert!(timeout.retried(false) && !timeout.retried(true));
        assert!(!Error::ConnectionLost.retried(true));
        assert!(!Error::InvalidArgument("r".into()).retried(false));
        let moving = Error::from(ErrorReply::RingChanging { replicas: vec![4] });
        assert!(moving.retry_safe() && moving.retried(true));
    }
}
