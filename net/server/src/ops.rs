//! The data operations both protocols share: size limits, quorums, the write contexts,
//! and one error vocabulary ([`ErrorReply`]) that each protocol renders its own way.

use std::time::Duration;

use ringkv_cluster::{
    ClientError, ConflictMode, GetOutcome, GetRequest, NodeId, PutRequest, Quorum, TooLarge,
};
use ringkv_proto::{Body, ErrorReply, Op, Put, WriteContext};

use crate::shard::{ServerError, Shard};

/// How long a forwarded write may take before the answer is Timeout (outcome unknown).
const FORWARD_WAIT: Duration = Duration::from_secs(5);

/// Every sibling of `key` from R replicas (the default R when `r` is None).
pub async fn get(shard: &Shard, key: &[u8], r: Option<usize>) -> Result<GetOutcome, ErrorReply> {
    check_key(key)?;
    let quorum = quorum(shard, r, None)?;
    shard
        .get(GetRequest {
            key: key.to_vec(),
            quorum,
        })
        .await
        .map_err(error_reply)
}

/// Writes `value` (a tombstone when None) superseding what `context` names.
pub async fn put(
    shard: &Shard,
    key: &[u8],
    value: Option<&[u8]>,
    context: WriteContext,
    w: Option<usize>,
) -> Result<(), ErrorReply> {
    check_key(key)?;
    let len = value.map_or(0, <[u8]>::len);
    if len > shard.max_value_bytes {
        return Err(too_large("value", len, shard.max_value_bytes));
    }
    let quorum = quorum(shard, None, w)?;
    // Replacing what is stored: a single replica holds everything there is, so the
    // coordinator's own read inside the put suffices; with N > 1 a quorum read first
    // makes the write supersede what a quorum has seen, not just the coordinator.
    let supersede_local = matches!(context, WriteContext::Latest) && quorum.n() == 1;
    let context = match context {
        WriteContext::Given(bytes) => Some(bytes),
        WriteContext::Blind => None,
        WriteContext::Latest if supersede_local => None,
        WriteContext::Latest => Some(get(shard, key, None).await?.context.encode()),
    };
    let resolved = match &context {
        Some(bytes) => WriteContext::Given(bytes.clone()),
        None if supersede_local => WriteContext::Latest,
        None => WriteContext::Blind,
    };
    let request = PutRequest {
        key: key.to_vec(),
        value: value.map(<[u8]>::to_vec),
        context,
        quorum,
        mode: ConflictMode::Causal,
        supersede_local,
    };
    match shard.put(request).await {
        Ok(_) => Ok(()),
        // Any node accepts any key: a write this node holds no replica of goes to one
        // that does, which coordinates it.
        Err(ServerError::Client(ClientError::NotReplica { replicas })) => {
            forward(shard, &replicas, key, value, resolved, w, quorum.w()).await
        }
        Err(e) => Err(error_reply(e)),
    }
}

/// Sends a write this node holds no replica of to a replica, which coordinates it at
/// `required` (the W this node resolved) and answers with its real outcome.
async fn forward(
    shard: &Shard,
    replicas: &[NodeId],
    key: &[u8],
    value: Option<&[u8]>,
    context: WriteContext,
    w: Option<usize>,
    required: usize,
) -> Result<(), ErrorReply> {
    let peers = shard.peers();
    // The first replica whose link is up; a node known to be down would only time out.
    let replica = peers
        .as_ref()
        .and_then(|p| replicas.iter().find(|&&r| p.is_up(r)));
    let (Some(peers), Some(&replica)) = (peers, replica) else {
        // No replica can be asked, so none can acknowledge it.
        return Err(ErrorReply::Unavailable {
            required: required as u32,
            reachable: 0,
        });
    };
    let w = w.map(|w| w.min(u8::MAX as usize) as u8);
    let op = match value {
        Some(value) => Op::Put(Put {
            key: key.to_vec(),
            value: value.to_vec(),
            context,
            w,
        }),
        None => Op::Delete {
            key: key.to_vec(),
            context,
            w,
        },
    };
    match peers
        .forward(replica, op, FORWARD_WAIT, required as u32)
        .await
    {
        Body::Written => Ok(()),
        Body::Error(e) => Err(e),
        other => Err(ErrorReply::Internal {
            message: format!("a forwarded write was answered with {other:?}"),
        }),
    }
}

/// Deletes `key` if it holds a value (Redis DEL); true if it did.
pub async fn delete_existing(shard: &Shard, key: &[u8]) -> Result<bool, ErrorReply> {
    let seen = get(shard, key, None).await?;
    if seen.values().is_empty() {
        return Ok(false);
    }
    let context = WriteContext::Given(seen.context.encode());
    put(shard, key, None, context, None).await?;
    Ok(true)
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

/// N from the node's configuration; R and W default to a majority of it.
pub fn quorum(shard: &Shard, r: Option<usize>, w: Option<usize>) -> Result<Quorum, ErrorReply> {
    let n = shard.replicas;
    let majority = n / 2 + 1;
    Quorum::new(n, r.unwrap_or(majority), w.unwrap_or(majority)).map_err(|e| {
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
