//! The data operations both protocols share: size limits, quorums, and one error
//! vocabulary ([`ErrorReply`]) that each protocol renders its own way. What a request
//! means (what a SET supersedes, when a DEL writes, forwarding to a replica) is the
//! cluster state machine's business: each operation here is one `Node` request.

use ringkv_cluster::{
    ClientError, GetOutcome, GetRequest, PutOutcome, PutRequest, Quorum, Supersedes, TooLarge,
};
use ringkv_proto::{ErrorReply, WriteContext};

use crate::shard::{ServerError, Shard};

/// Every sibling of `key` from R replicas (the default R when `r` is None); with
/// `strict`, from the key's own replicas only (no stand-ins).
pub async fn get(
    shard: &Shard,
    key: &[u8],
    r: Option<usize>,
    strict: bool,
) -> Result<GetOutcome, ErrorReply> {
    check_key(key)?;
    let quorum = quorum(shard, r, None)?;
    let request = GetRequest {
        key: key.to_vec(),
        quorum: Some(quorum),
        strict,
    };
    shard.get(request).await.map_err(error_reply)
}

/// Writes `value` (a tombstone when None) superseding what `context` names:
/// the given context, nothing (blind), or what a quorum holds (latest). With
/// `strict`, only the key's own replicas count toward W (sloppy quorum off).
pub async fn put(
    shard: &Shard,
    key: &[u8],
    value: Option<&[u8]>,
    context: WriteContext,
    w: Option<usize>,
    strict: bool,
) -> Result<(), ErrorReply> {
    check_key(key)?;
    let len = value.map_or(0, <[u8]>::len);
    if len > shard.max_value_bytes {
        return Err(too_large("value", len, shard.max_value_bytes));
    }
    let supersedes = match context {
        WriteContext::Given(bytes) => Supersedes::Context(bytes),
        WriteContext::Blind => Supersedes::Nothing,
        WriteContext::Latest => Supersedes::QuorumHeld,
    };
    let request = PutRequest {
        key: key.to_vec(),
        value: value.map(<[u8]>::to_vec),
        supersedes,
        quorum: Some(quorum(shard, None, w)?),
        mode: ringkv_cluster::ConflictMode::Causal,
        only_if_present: false,
        strict,
    };
    shard.put(request).await.map_err(error_reply)?;
    Ok(())
}

/// Deletes `key` if a quorum holds a value for it (Redis DEL); true if it did.
pub async fn delete_existing(shard: &Shard, key: &[u8]) -> Result<bool, ErrorReply> {
    check_key(key)?;
    let mut request = PutRequest::delete_if_present(key.to_vec());
    request.quorum = Some(quorum(shard, None, None)?);
    match shard.put(request).await.map_err(error_reply)? {
        PutOutcome::Written(_) => Ok(true),
        PutOutcome::NothingToDelete => Ok(false),
    }
}

fn check_key(key: &[u8]) -> Result<(), ErrorReply> {
    let max = ringkv_engine::record::MAX_KEY_LEN;
    if key.len() > max {
        return Err(too_large("key", key.len(), max));
    }
    Ok(())
}

fn too_large(what: &str, size: usize, limit: usize) -> ErrorReply {
    ErrorReply::TooLarge {
        what: what.into(),
        size: size as u64,
        limit: limit as u64,
    }
}

/// The node's quorum, with the R or W a request names in place of its own.
pub fn quorum(shard: &Shard, r: Option<usize>, w: Option<usize>) -> Result<Quorum, ErrorReply> {
    let node = shard.quorum;
    Quorum::new(node.n(), r.unwrap_or(node.r()), w.unwrap_or(node.w())).map_err(|e| {
        ErrorReply::InvalidArgument {
            message: format!("invalid quorum: {e}"),
        }
    })
}

pub fn error_reply(err: ServerError) -> ErrorReply {
    let count = |n: usize| n.min(u32::MAX as usize) as u32;
    match err {
        ServerError::Client(ClientError::Timeout { acked, required }) => ErrorReply::Timeout {
            acked: count(acked),
            required: count(required),
        },
        ServerError::Client(ClientError::Unavailable {
            required,
            reachable,
        }) => ErrorReply::Unavailable {
            required: count(required),
            reachable: count(reachable),
        },
        ServerError::Client(ClientError::TooManySiblings { count: n, limit }) => {
            ErrorReply::TooManySiblings {
                count: count(n),
                limit: count(limit),
            }
        }
        ServerError::Client(ClientError::ValuesTooLarge { size, limit }) => ErrorReply::TooLarge {
            what: "siblings' values together".into(),
            size: size as u64,
            limit: limit as u64,
        },
        ServerError::Client(ClientError::VersionsTooLarge { size, limit }) => {
            ErrorReply::TooLarge {
                what: "siblings' versions together".into(),
                size: size as u64,
                limit: limit as u64,
            }
        }
        ServerError::Client(ClientError::RefusedByReplicas {
            acked,
            required,
            refusal,
        }) => {
            let (what, size, limit) = match refusal {
                TooLarge::Values { size, limit } => ("values", size, limit),
                TooLarge::Versions { size, limit } => ("versions", size, limit),
                TooLarge::Hints { size, limit } => ("hints for down nodes", size, limit),
            };
            // Not the coordinator's own refusal (nothing written): the write may stand
            // where it was stored, so the client hears it as TooLarge that says so.
            ErrorReply::TooLarge {
                what: format!(
                    "replicas' {what} together (refused by replicas after {acked} of {required} stored the write, which may stand there)"
                ),
                size: size as u64,
                limit: limit as u64,
            }
        }
        // Raised only before anything is written (a forward, or a read-then-write whose
        // view moved on during the read): safe to retry.
        ServerError::Client(ClientError::NotReplica { replicas }) => ErrorReply::RingChanging {
            replicas: replicas.iter().map(|n| n.0).collect(),
        },
        ServerError::Client(ClientError::InvalidArgument(e)) => ErrorReply::InvalidArgument {
            message: e.to_string(),
        },
        ServerError::Client(other) => ErrorReply::Internal {
            message: other.to_string(),
        },
        ServerError::Overloaded { inflight } => ErrorReply::Overloaded {
            inflight: count(inflight),
        },
        ServerError::ShuttingDown => ErrorReply::ShuttingDown,
    }
}
