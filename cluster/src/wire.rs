//! The wire form of [`PeerMessage`]: an rkyv archive, validated on the way in.
//!
//! The archived types here are deliberately plain (integers and byte vectors); version
//! sets travel in their stored encoding ([`StoredVersions`]), whose decoder already
//! refuses every malformed set. Decoding is therefore two checks in a row: rkyv's
//! bytecheck proves the archive is structurally sound, then the conversion to a
//! [`PeerMessage`] proves it means something. Either failure is a [`WireError`]; the
//! driver counts it and closes that connection only. Framing (length prefix, request
//! multiplexing, size limits) is the transport's business, not this module's.

use rkyv::rancor;
use rkyv::util::AlignedVec;
use thiserror::Error;

use crate::codec::{DecodeError, StoredVersions};
use crate::message::{PeerMessage, RequestId, TooLarge};
use crate::ring::PartitionId;

/// Why received bytes are not a peer message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The archive is malformed (bad offsets, lengths, enum tags, truncation).
    #[error("malformed archive: {0}")]
    Archive(String),
    /// A write refusal of a kind this node does not know.
    #[error("unknown write refusal {0}")]
    UnknownRefusal(u8),
    /// The archive is sound but carries an invalid version set.
    #[error("invalid version set: {0}")]
    Versions(#[from] DecodeError),
}

/// The archived form of a [`PeerMessage`].
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
enum WireMessage {
    Read {
        request: WireRequest,
        partition: u32,
        key: Vec<u8>,
    },
    ReadReply {
        request: WireRequest,
        versions: WireVersions,
    },
    Write {
        request: WireRequest,
        partition: u32,
        key: Vec<u8>,
        versions: WireVersions,
    },
    WriteAck {
        request: WireRequest,
    },
    WriteRefused {
        request: WireRequest,
        /// 0: the values were too large; 1: the versions were.
        what: u8,
        size: u64,
        limit: u64,
    },
    Repair {
        partition: u32,
        key: Vec<u8>,
        versions: WireVersions,
    },
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
struct WireRequest {
    epoch: u64,
    sequence: u64,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
struct WireVersions {
    version: Vec<u8>,
    value: Vec<u8>,
}

/// Encodes a message for the network.
pub fn encode(message: &PeerMessage) -> Vec<u8> {
    let wire = WireMessage::from(message);
    // Serialising plain integers and byte vectors into memory cannot fail.
    rkyv::to_bytes::<rancor::Error>(&wire)
        .expect("serialising plain data into memory cannot fail")
        .to_vec()
}

/// Decodes and validates a message from the network.
pub fn decode(bytes: &[u8]) -> Result<PeerMessage, WireError> {
    // rkyv reads archives in place and needs them aligned; received buffers may not be.
    let mut aligned: AlignedVec<16> = AlignedVec::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    let wire = rkyv::from_bytes::<WireMessage, rancor::Error>(&aligned)
        .map_err(|e| WireError::Archive(e.to_string()))?;
    PeerMessage::try_from(wire)
}

impl From<&PeerMessage> for WireMessage {
    fn from(message: &PeerMessage) -> Self {
        match message {
            PeerMessage::Read {
                request,
                partition,
                key,
            } => WireMessage::Read {
                request: (*request).into(),
                partition: partition.0,
                key: key.clone(),
            },
            PeerMessage::ReadReply { request, versions } => WireMessage::ReadReply {
                request: (*request).into(),
                versions: WireVersions::encode(versions),
            },
            PeerMessage::Write {
                request,
                partition,
                key,
                versions,
            } => WireMessage::Write {
                request: (*request).into(),
                partition: partition.0,
                key: key.clone(),
                versions: WireVersions::encode(versions),
            },
            PeerMessage::WriteAck { request } => WireMessage::WriteAck {
                request: (*request).into(),
            },
            PeerMessage::WriteRefused { request, refusal } => {
                let (what, size, limit) = match *refusal {
                    TooLarge::Values { size, limit } => (0, size, limit),
                    TooLarge::Versions { size, limit } => (1, size, limit),
                };
                WireMessage::WriteRefused {
                    request: (*request).into(),
                    what,
                    size: size as u64,
                    limit: limit as u64,
                }
            }
            PeerMessage::Repair {
                partition,
                key,
                versions,
            } => WireMessage::Repair {
                partition: partition.0,
                key: key.clone(),
                versions: WireVersions::encode(versions),
            },
        }
    }
}

impl TryFrom<WireMessage> for PeerMessage {
    type Error = WireError;

    fn try_from(wire: WireMessage) -> Result<Self, WireError> {
        Ok(match wire {
            WireMessage::Read {
                request,
                partition,
                key,
            } => PeerMessage::Read {
                request: request.into(),
                partition: PartitionId(partition),
                key,
            },
            WireMessage::ReadReply { request, versions } => PeerMessage::ReadReply {
                request: request.into(),
                versions: versions.decode()?,
            },
            WireMessage::Write {
                request,
                partition,
                key,
                versions,
            } => PeerMessage::Write {
                request: request.into(),
                partition: PartitionId(partition),
                key,
                versions: versions.decode()?,
            },
            WireMessage::WriteAck { request } => PeerMessage::WriteAck {
                request: request.into(),
            },
            WireMessage::WriteRefused {
                request,
                what,
                size,
                limit,
            } => {
                // Sizes past usize only saturate: they are reported, never allocated.
                let (size, limit) = (clamp(size), clamp(limit));
                let refusal = match what {
                    0 => TooLarge::Values { size, limit },
                    1 => TooLarge::Versions { size, limit },
                    other => return Err(WireError::UnknownRefusal(other)),
                };
                PeerMessage::WriteRefused {
                    request: request.into(),
                    refusal,
                }
            }
            WireMessage::Repair {
                partition,
                key,
                versions,
            } => PeerMessage::Repair {
                partition: PartitionId(partition),
                key,
                versions: versions.decode()?,
            },
        })
    }
}

fn clamp(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl From<RequestId> for WireRequest {
    fn from(id: RequestId) -> Self {
        WireRequest {
            epoch: id.epoch,
            sequence: id.sequence,
        }
    }
}

impl From<WireRequest> for RequestId {
    fn from(wire: WireRequest) -> Self {
        RequestId {
            epoch: wire.epoch,
            sequence: wire.sequence,
        }
    }
}

impl WireVersions {
    fn encode(set: &crate::version::VersionSet) -> Self {
        let stored = StoredVersions::encode(set);
        WireVersions {
            version: stored.version,
            value: stored.value,
        }
    }

    fn decode(self) -> Result<crate::version::VersionSet, DecodeError> {
        StoredVersions {
            version: self.version,
            value: self.value,
            tombstone: false,
        }
        .decode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Actor, Dot, VersionVector};
    use crate::ring::NodeId;
    use crate::version::{ConflictMode, Value, Version, VersionSet};

    fn sample_set() -> VersionSet {
        let version = Version {
            dot: Dot {
                actor: Actor {
                    node: NodeId(2),
                    epoch: 3,
                },
                counter: 7,
            },
            past: VersionVector::new(),
            written_at_ms: 99,
            value: Value::Data(b"value".to_vec()),
        };
        VersionSet::from_versions(ConflictMode::Causal, [version])
    }

    fn samples() -> Vec<PeerMessage> {
        let request = RequestId {
            epoch: 1,
            sequence: 42,
        };
        vec![
            PeerMessage::Read {
                request,
                partition: PartitionId(5),
                key: b"k".to_vec(),
            },
            PeerMessage::ReadReply {
                request,
                versions: sample_set(),
            },
            PeerMessage::Write {
                request,
                partition: PartitionId(5),
                key: b"k".to_vec(),
                versions: sample_set(),
            },
            PeerMessage::WriteAck { request },
            PeerMessage::WriteRefused {
                request,
                refusal: TooLarge::Values {
                    size: 2_000_000,
                    limit: 1 << 20,
                },
            },
            PeerMessage::WriteRefused {
                request,
                refusal: TooLarge::Versions {
                    size: 70_000,
                    limit: 65_536,
                },
            },
            PeerMessage::Repair {
                partition: PartitionId(5),
                key: b"k".to_vec(),
                versions: VersionSet::new(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for message in samples() {
            assert_eq!(decode(&encode(&message)).unwrap(), message);
        }
    }

    #[test]
    fn truncated_or_flipped_bytes_are_errors_not_panics() {
        for message in samples() {
            let bytes = encode(&message);
            for cut in 0..bytes.len() {
                let _ = decode(&bytes[..cut]);
            }
            for at in 0..bytes.len() {
                let mut flipped = bytes.clone();
                flipped[at] ^= 0xff;
                // Either rejected or decoded into some valid message; never a panic.
                let _ = decode(&flipped);
            }
        }
        assert!(matches!(decode(&[]), Err(WireError::Archive(_))));
    }

    #[test]
    fn a_sound_archive_with_a_bad_version_set_is_refused() {
        let wire = WireMessage::ReadReply {
            request: WireRequest {
                epoch: 0,
                sequence: 1,
            },
            versions: WireVersions {
                version: vec![crate::codec::VERSION_SET_FORMAT, 0, 1, 0],
                value: Vec::new(),
            },
        };
        let bytes = rkyv::to_bytes::<rancor::Error>(&wire).unwrap();
        assert!(matches!(
            decode(&bytes),
            Err(WireError::Versions(DecodeError::Truncated { .. }))
        ));
    }
}
