//! How a client is set up, and what one request may override.

use std::time::Duration;

/// Retries of requests that are safe to repeat (see [`crate::Error::retry_safe`]),
/// with exponential backoff and full jitter between attempts.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 means never retry.
    pub attempts: u32,
    /// The first pause; each later one doubles, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(500),
        }
    }
}

impl RetryPolicy {
    /// Never retry.
    pub fn none() -> RetryPolicy {
        RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The pause before attempt `attempt + 1` (0-based `attempt`): a random duration up
    /// to the exponential bound, so clients that failed together do not retry together.
    pub(crate) fn pause(&self, attempt: u32) -> Duration {
        let bound = self
            .backoff
            .saturating_mul(1 << attempt.min(16))
            .min(self.max_backoff);
        bound.mul_f64(fastrand::f64())
    }
}

/// Everything a client is built with; see [`ClientBuilder`](crate::ClientBuilder).
#[derive(Debug, Clone)]
pub struct Config {
    /// Native-protocol addresses (HOST:PORT) to learn the topology from.
    pub seeds: Vec<String>,
    pub connect_timeout: Duration,
    /// How long a request waits for its answer, retries included in each attempt.
    pub request_timeout: Duration,
    /// Connections kept to each shard; requests are pipelined over them.
    pub connections_per_shard: usize,
    pub retry: RetryPolicy,
    /// R for reads and W for writes that do not name their own; None: the node's.
    pub default_r: Option<u8>,
    pub default_w: Option<u8>,
    /// How often the partition map is fetched again in the background.
    pub topology_refresh: Duration,
    /// Name sent in the handshake (the node logs it when it refuses the handshake).
    pub client_name: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            seeds: vec!["127.0.0.1:7500".into()],
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            connections_per_shard: 1,
            retry: RetryPolicy::default(),
            default_r: None,
            default_w: None,
            topology_refresh: Duration::from_secs(30),
            client_name: format!("ringkv-client {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Per-request settings for a read.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReadOptions {
    /// Replicas that must answer; None: the client's default.
    pub r: Option<u8>,
    /// None: the client's request timeout.
    pub timeout: Option<Duration>,
    /// Read only the key's own replicas: no stand-ins answering from the hints they
    /// hold for a down replica (sloppy quorum off for this read).
    pub strict: bool,
}

/// Per-request settings for a write.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WriteOptions {
    /// Replicas that must store the write durably; None: the client's default.
    pub w: Option<u8>,
    /// None: the client's request timeout.
    pub timeout: Option<Duration>,
    /// Count only the key's own replicas toward W: no hinted stand-ins for down ones
    /// (sloppy quorum off). Fails with Unavailable where a sloppy write would land.
    pub strict: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_below_the_bound() {
        let policy = RetryPolicy {
            attempts: 10,
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(80),
        };
        for attempt in 0..10 {
            let bound = Duration::from_millis((10u64 << attempt).min(80));
            for _ in 0..50 {
                assert!(policy.pause(attempt) <= bound);
            }
        }
        let spread: std::collections::BTreeSet<_> = (0..50).map(|_| policy.pause(3)).collect();
        assert!(spread.len() > 1, "jitter varies the pause");
    }
}
