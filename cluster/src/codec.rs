//! Byte encodings of causal contexts (handed to clients) and version sets (handed to
//! the storage engine). docs/cluster.md gives every field; all integers are
//! little-endian and fixed-width so the layout can be read off a hex dump.
//!
//! Decoding is strict: every malformed input is a [`DecodeError`] naming what was
//! wrong, never a panic, and decode(encode(x)) == x for every valid x.

use thiserror::Error;

use crate::clock::{Actor, ClockEntry, Dot, VersionVector};
use crate::ring::NodeId;
use crate::version::{ConflictMode, Value, Version, VersionSet};

/// First byte of an encoded context. Format 1 had 32-bit incarnations where format 2
/// has 64-bit actor epochs; its contexts and sets are refused as an unknown format.
pub const CONTEXT_FORMAT: u8 = 2;
/// First byte of an encoded version set's metadata.
pub const VERSION_SET_FORMAT: u8 = 2;
/// Encoded size of one version vector entry: node u32, epoch u64, counter u64,
/// updated_at_ms u64.
pub const CLOCK_ENTRY_LEN: usize = 28;
/// Most entries one vector may carry on the wire; far above any pruning setting.
pub const CLOCK_ENTRIES_MAX: usize = 4096;
/// Most siblings one stored set may carry.
pub const SIBLINGS_MAX_ENCODED: usize = 4096;
/// Most bytes an encoded version blob may take, whatever the configured limit: one
/// sibling whose past has the most entries a vector may carry. Within it every past
/// fits a vector's encoding and the sibling count fits its u16.
pub const STORED_VERSION_MAX: usize = 4 + 35 + CLOCK_ENTRIES_MAX * CLOCK_ENTRY_LEN;

/// Why bytes are not a valid context or version set.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty input")]
    Empty,
    #[error("unknown format byte {0}")]
    UnknownFormat(u8),
    #[error("truncated: {field} needs {needed} bytes at offset {offset}, {available} left")]
    Truncated {
        field: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("{0} bytes left over after the last field")]
    TrailingBytes(usize),
    #[error("clock entries are not in strictly increasing actor order")]
    UnsortedEntries,
    #[error("a counter is zero (counters start at 1)")]
    ZeroCounter,
    #[error("{count} {what} exceed the limit of {limit}")]
    TooMany {
        what: &'static str,
        count: usize,
        limit: usize,
    },
    #[error("unknown conflict mode {0}")]
    UnknownMode(u8),
    #[error("unknown value kind {0}")]
    UnknownKind(u8),
    #[error("a tombstone claims {0} value bytes")]
    TombstoneWithValue(u32),
    #[error("siblings are not in strictly increasing dot order")]
    UnsortedSiblings,
    #[error("sibling {0:?} is dominated by another sibling")]
    DominatedSibling(Dot),
    #[error("values total {declared} bytes but {actual} were given")]
    ValueLength { declared: u64, actual: usize },
}

/// The opaque causal context a client gets from a read and hands back with a put.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Context(pub VersionVector);

impl Context {
    pub fn vector(&self) -> &VersionVector {
        &self.0
    }

    /// Layout: format u8 = 2, entry count u16, then the entries in actor order.
    ///
    /// A read that merges many replicas' siblings can join more entries than a vector
    /// may carry; the context then keeps the most recently updated ones. That is safe
    /// for a context (unlike a stored past): a put whose context claims fewer writes
    /// supersedes fewer siblings and never draws a used dot, since the coordinator
    /// draws past what it stores.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(3 + self.0.len() * CLOCK_ENTRY_LEN);
        out.push(CONTEXT_FORMAT);
        if self.0.len() <= CLOCK_ENTRIES_MAX {
            encode_vector(&mut out, &self.0);
        } else {
            let mut newest: Vec<(Actor, ClockEntry)> = self.0.entries().collect();
            newest.sort_by_key(|(actor, entry)| std::cmp::Reverse((entry.updated_at_ms, *actor)));
            newest.truncate(CLOCK_ENTRIES_MAX);
            encode_vector(&mut out, &VersionVector::from_entries(newest));
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Context, DecodeError> {
        let mut reader = Reader::new(bytes);
        let format = reader.u8("format")?;
        if format != CONTEXT_FORMAT {
            return Err(DecodeError::UnknownFormat(format));
        }
        let vector = decode_vector(&mut reader)?;
        reader.finish()?;
        Ok(Context(vector))
    }
}

/// A version set as the storage engine keeps it: `version` is the causal metadata
/// (small, bounded), `value` the sibling values back to back. `tombstone` tells the
/// engine the key reads as deleted (every sibling is a tombstone).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct StoredVersions {
    pub version: Vec<u8>,
    pub value: Vec<u8>,
    pub tombstone: bool,
}

/// Bytes `StoredVersions::encode(set)` would give as its version blob, without
/// encoding (nor its sibling-count assertion): what limits are checked against.
pub fn encoded_version_len(set: &VersionSet) -> usize {
    // format, mode, sibling count; per sibling: dot, stamp, kind, value length, past.
    let fixed = 1 + 1 + 2;
    let per_sibling = 20 + 8 + 1 + 4 + 2;
    fixed
        + set
            .siblings()
            .map(|v| per_sibling + CLOCK_ENTRY_LEN * v.past.len())
            .sum::<usize>()
}

impl StoredVersions {
    /// Metadata layout: format u8 = 2, mode u8, sibling count u16, then per sibling:
    /// dot (node u32, epoch u64, counter u64), written_at_ms u64, kind u8
    /// (0 data, 1 tombstone), value length u32, past vector (count u16 + entries).
    pub fn encode(set: &VersionSet) -> StoredVersions {
        let mut version = Vec::with_capacity(4 + set.len() * 64);
        let mut value = Vec::new();
        assert!(
            set.len() <= SIBLINGS_MAX_ENCODED,
            "set beyond the stored limit"
        );
        version.push(VERSION_SET_FORMAT);
        version.push(match set.mode() {
            ConflictMode::Causal => 0,
            ConflictMode::LastWriterWins => 1,
        });
        put_u16(&mut version, set.len() as u16);
        for sibling in set.siblings() {
            put_dot(&mut version, sibling.dot);
            put_u64(&mut version, sibling.written_at_ms);
            match &sibling.value {
                Value::Data(bytes) => {
                    version.push(0);
                    put_u32(&mut version, bytes.len() as u32);
                    value.extend_from_slice(bytes);
                }
                Value::Tombstone => {
                    version.push(1);
                    put_u32(&mut version, 0);
                }
            }
            encode_vector(&mut version, &sibling.past);
        }
        StoredVersions {
            version,
            value,
            tombstone: set.is_deleted(),
        }
    }

    pub fn decode(&self) -> Result<VersionSet, DecodeError> {
        decode_version_set(&self.version, &self.value)
    }
}

/// Decodes a version set from its metadata and value bytes (see [`StoredVersions`]),
/// wherever they lie: in a record, or in a received message, read in place.
pub fn decode_version_set(version: &[u8], values: &[u8]) -> Result<VersionSet, DecodeError> {
    let mut reader = Reader::new(version);
    let format = reader.u8("format")?;
    if format != VERSION_SET_FORMAT {
        return Err(DecodeError::UnknownFormat(format));
    }
    let mode = match reader.u8("mode")? {
        0 => ConflictMode::Causal,
        1 => ConflictMode::LastWriterWins,
        other => return Err(DecodeError::UnknownMode(other)),
    };
    let count = reader.u16("sibling count")? as usize;
    if count > SIBLINGS_MAX_ENCODED {
        return Err(DecodeError::TooMany {
            what: "siblings",
            count,
            limit: SIBLINGS_MAX_ENCODED,
        });
    }
    let mut versions: Vec<Version> = Vec::with_capacity(count);
    let mut value_offset: usize = 0;
    for _ in 0..count {
        let dot = read_dot(&mut reader)?;
        if versions.last().is_some_and(|prev| prev.dot >= dot) {
            return Err(DecodeError::UnsortedSiblings);
        }
        let written_at_ms = reader.u64("written_at_ms")?;
        let kind = reader.u8("kind")?;
        let length = reader.u32("value length")?;
        let past = decode_vector(&mut reader)?;
        let value = match kind {
            0 => {
                let end = value_offset.saturating_add(length as usize);
                let Some(bytes) = values.get(value_offset..end) else {
                    return Err(DecodeError::ValueLength {
                        declared: end as u64,
                        actual: values.len(),
                    });
                };
                value_offset = end;
                Value::Data(bytes.to_vec())
            }
            1 if length == 0 => Value::Tombstone,
            1 => return Err(DecodeError::TombstoneWithValue(length)),
            other => return Err(DecodeError::UnknownKind(other)),
        };
        versions.push(Version {
            dot,
            past,
            written_at_ms,
            value,
        });
    }
    reader.finish()?;
    if value_offset != values.len() {
        return Err(DecodeError::ValueLength {
            declared: value_offset as u64,
            actual: values.len(),
        });
    }
    // A stored set never holds a version another member saw; one that does was not
    // written by us, and is refused rather than silently "repaired".
    for version in &versions {
        if versions.iter().any(|other| version.is_dominated_by(other)) {
            return Err(DecodeError::DominatedSibling(version.dot));
        }
    }
    let set = VersionSet::from_versions(mode, versions);
    if set.len() != count {
        // Only LWW mode can shrink here: a stored LWW set has one member.
        return Err(DecodeError::TooMany {
            what: "last-writer-wins siblings",
            count,
            limit: 1,
        });
    }
    Ok(set)
}

fn encode_vector(out: &mut Vec<u8>, vector: &VersionVector) {
    assert!(
        vector.len() <= CLOCK_ENTRIES_MAX,
        "vector beyond the wire limit"
    );
    put_u16(out, vector.len() as u16);
    for (actor, entry) in vector.entries() {
        put_u32(out, actor.node.0);
        put_u64(out, actor.epoch);
        put_u64(out, entry.counter);
        put_u64(out, entry.updated_at_ms);
    }
}

fn decode_vector(reader: &mut Reader<'_>) -> Result<VersionVector, DecodeError> {
    let count = reader.u16("entry count")? as usize;
    if count > CLOCK_ENTRIES_MAX {
        return Err(DecodeError::TooMany {
            what: "clock entries",
            count,
            limit: CLOCK_ENTRIES_MAX,
        });
    }
    let mut entries: Vec<(Actor, ClockEntry)> = Vec::with_capacity(count);
    for _ in 0..count {
        let actor = Actor {
            node: NodeId(reader.u32("node")?),
            epoch: reader.u64("epoch")?,
        };
        let counter = reader.u64("counter")?;
        let updated_at_ms = reader.u64("updated_at_ms")?;
        if counter == 0 {
            return Err(DecodeError::ZeroCounter);
        }
        if entries.last().is_some_and(|(prev, _)| *prev >= actor) {
            return Err(DecodeError::UnsortedEntries);
        }
        entries.push((
            actor,
            ClockEntry {
                counter,
                updated_at_ms,
            },
        ));
    }
    Ok(VersionVector::from_entries(entries))
}

fn put_dot(out: &mut Vec<u8>, dot: Dot) {
    put_u32(out, dot.actor.node.0);
    put_u64(out, dot.actor.epoch);
    put_u64(out, dot.counter);
}

fn read_dot(reader: &mut Reader<'_>) -> Result<Dot, DecodeError> {
    let node = NodeId(reader.u32("dot node")?);
    let epoch = reader.u64("dot epoch")?;
    let counter = reader.u64("dot counter")?;
    if counter == 0 {
        return Err(DecodeError::ZeroCounter);
    }
    Ok(Dot {
        actor: Actor { node, epoch },
        counter,
    })
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A cursor over input bytes whose reads fail with the field's name instead of
/// panicking.
struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, offset: 0 }
    }

    fn take<const LEN: usize>(&mut self, field: &'static str) -> Result<[u8; LEN], DecodeError> {
        if self.bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        let available = self.bytes.len() - self.offset;
        let Some(slice) = self.bytes.get(self.offset..self.offset + LEN) else {
            return Err(DecodeError::Truncated {
                field,
                offset: self.offset,
                needed: LEN,
                available,
            });
        };
        self.offset += LEN;
        let mut array = [0u8; LEN];
        array.copy_from_slice(slice);
        Ok(array)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(field)?))
    }

    fn finish(self) -> Result<(), DecodeError> {
        match self.bytes.len() - self.offset {
            0 => Ok(()),
            left => Err(DecodeError::TrailingBytes(left)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor(node: u32, epoch: u64) -> Actor {
        Actor {
            node: NodeId(node),
            epoch,
        }
    }

    fn sample_set() -> VersionSet {
        let mut past = VersionVector::new();
        past.add(
            Dot {
                actor: actor(1, 0),
                counter: 4,
            },
            77,
        );
        let a = Version {
            dot: Dot {
                actor: actor(2, 1),
                counter: 1,
            },
            past: past.clone(),
            written_at_ms: 100,
            value: Value::Data(b"alpha".to_vec()),
        };
        let b = Version {
            dot: Dot {
                actor: actor(3, 0),
                counter: 9,
            },
            past,
            written_at_ms: 101,
            value: Value::Tombstone,
        };
        VersionSet::from_versions(ConflictMode::Causal, [a, b])
    }

    #[test]
    fn context_round_trips_and_has_the_documented_layout() {
        let context = Context(sample_set().context());
        let bytes = context.encode();
        assert_eq!(bytes[0], CONTEXT_FORMAT);
        assert_eq!(u16::from_le_bytes([bytes[1], bytes[2]]), 3);
        assert_eq!(bytes.len(), 3 + 3 * CLOCK_ENTRY_LEN);
        assert_eq!(Context::decode(&bytes).unwrap(), context);
    }

    #[test]
    fn version_set_round_trips() {
        let set = sample_set();
        let stored = StoredVersions::encode(&set);
        assert_eq!(stored.value, b"alpha");
        assert!(!stored.tombstone);
        assert_eq!(stored.decode().unwrap(), set);
        let empty = StoredVersions::encode(&VersionSet::new());
        assert!(empty.tombstone);
        assert_eq!(empty.decode().unwrap(), VersionSet::new());
    }

    #[test]
    fn malformed_contexts_are_named_errors() {
        assert_eq!(Context::decode(&[]), Err(DecodeError::Empty));
        assert_eq!(
            Context::decode(&[9, 0, 0]),
            Err(DecodeError::UnknownFormat(9))
        );
        // Format 1 (32-bit incarnations) is refused, not misread.
        assert_eq!(
            Context::decode(&[1, 0, 0]),
            Err(DecodeError::UnknownFormat(1))
        );
        assert!(matches!(
            Context::decode(&[CONTEXT_FORMAT, 1, 0, 0]),
            Err(DecodeError::Truncated { field: "node", .. })
        ));
        assert_eq!(
            Context::decode(&[CONTEXT_FORMAT, 0, 0, 5]),
            Err(DecodeError::TrailingBytes(1))
        );
        let mut zero = vec![CONTEXT_FORMAT, 1, 0];
        zero.extend_from_slice(&[0; CLOCK_ENTRY_LEN]);
        assert_eq!(Context::decode(&zero), Err(DecodeError::ZeroCounter));
        let mut twice = Context(sample_set().context()).encode();
        // Overwrite the second entry's actor with the first's: no longer sorted.
        let (first, rest) = twice.split_at_mut(3 + CLOCK_ENTRY_LEN);
        rest[..12].copy_from_slice(&first[3..15]);
        assert_eq!(Context::decode(&twice), Err(DecodeError::UnsortedEntries));
    }

    /// A read merging many replicas can join more entries than a vector carries: the
    /// context keeps the newest instead of failing (or panicking).
    #[test]
    fn an_oversized_context_keeps_its_newest_entries() {
        let huge = VersionVector::from_entries((0..5_000u64).map(|i| {
            let entry = ClockEntry {
                counter: 1,
                updated_at_ms: i,
            };
            (actor(1, i), entry)
        }));
        let decoded = Context::decode(&Context(huge).encode()).unwrap();
        assert_eq!(decoded.0.len(), CLOCK_ENTRIES_MAX);
        assert_eq!(decoded.0.counter(actor(1, 4_999)), 1, "the newest stays");
        assert_eq!(decoded.0.counter(actor(1, 0)), 0, "the oldest goes");
    }

    #[test]
    fn every_truncation_of_a_stored_set_is_an_error() {
        let stored = StoredVersions::encode(&sample_set());
        for cut in 0..stored.version.len() {
            let truncated = StoredVersions {
                version: stored.version[..cut].to_vec(),
                ..stored.clone()
            };
            assert!(truncated.decode().is_err(), "cut at {cut} decoded");
        }
        let short_value = StoredVersions {
            value: b"alp".to_vec(),
            ..stored.clone()
        };
        assert!(matches!(
            short_value.decode(),
            Err(DecodeError::ValueLength { .. })
        ));
        let long_value = StoredVersions {
            value: b"alphabet".to_vec(),
            ..stored
        };
        assert!(matches!(
            long_value.decode(),
            Err(DecodeError::ValueLength { .. })
        ));
    }
}
