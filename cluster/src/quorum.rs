//! Per-request replication and quorum sizes (Dynamo §4.5 "Execution of get() and
//! put() operations"): N replicas, R answers for a read, W durable acks for a write.

use thiserror::Error;

/// A validated (N, R, W): 1 <= R <= N and 1 <= W <= N. R + W > N makes every read
/// quorum overlap every write quorum; smaller values are allowed (and faster) but
/// give up read-your-writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quorum {
    n: usize,
    r: usize,
    w: usize,
}

/// Why an (N, R, W) was refused.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum QuorumError {
    #[error("N must be at least 1")]
    NoReplicas,
    #[error("N = {n} exceeds the limit of {limit}")]
    TooManyReplicas { n: usize, limit: usize },
    #[error("R = {r} is outside 1..={n}")]
    ReadQuorum { r: usize, n: usize },
    #[error("W = {w} is outside 1..={n}")]
    WriteQuorum { w: usize, n: usize },
}

impl Quorum {
    /// The largest N accepted: more replicas than this is a configuration mistake.
    pub const N_MAX: usize = 16;

    pub fn new(n: usize, r: usize, w: usize) -> Result<Quorum, QuorumError> {
        if n == 0 {
            return Err(QuorumError::NoReplicas);
        }
        if n > Self::N_MAX {
            return Err(QuorumError::TooManyReplicas {
                n,
                limit: Self::N_MAX,
            });
        }
        if r == 0 || r > n {
            return Err(QuorumError::ReadQuorum { r, n });
        }
        if w == 0 || w > n {
            return Err(QuorumError::WriteQuorum { w, n });
        }
        Ok(Quorum { n, r, w })
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn r(&self) -> usize {
        self.r
    }

    pub fn w(&self) -> usize {
        self.w
    }

    /// Whether every read quorum shares a replica with every write quorum.
    pub fn reads_see_writes(&self) -> bool {
        self.r + self.w > self.n
    }
}

impl Default for Quorum {
    /// Dynamo's common configuration, (3, 2, 2).
    fn default() -> Self {
        Quorum { n: 3, r: 2, w: 2 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dynamo §4.5: R and W are counts out of the N replicas.
    #[test]
    fn decision_table() {
        // (n, r, w, expected) with the reason in the name of the expectation.
        let cases: &[(usize, usize, usize, Result<(), QuorumError>)] = &[
            (3, 2, 2, Ok(())),
            (3, 1, 3, Ok(())),
            (1, 1, 1, Ok(())),
            (0, 1, 1, Err(QuorumError::NoReplicas)),
            (3, 0, 2, Err(QuorumError::ReadQuorum { r: 0, n: 3 })),
            (3, 4, 2, Err(QuorumError::ReadQuorum { r: 4, n: 3 })),
            (3, 2, 0, Err(QuorumError::WriteQuorum { w: 0, n: 3 })),
            (3, 2, 5, Err(QuorumError::WriteQuorum { w: 5, n: 3 })),
            (
                17,
                1,
                1,
                Err(QuorumError::TooManyReplicas { n: 17, limit: 16 }),
            ),
        ];
        for &(n, r, w, expected) in cases {
            assert_eq!(
                Quorum::new(n, r, w).map(|_| ()),
                expected,
                "({n}, {r}, {w})"
            );
        }
        assert!(Quorum::default().reads_see_writes());
        assert!(!Quorum::new(3, 1, 1).unwrap().reads_see_writes());
    }
}
