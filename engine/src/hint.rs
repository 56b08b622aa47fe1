//! Hint files: the index entries of one sealed segment, so recovery reads a few bytes
//! per key instead of every record (Bitcask's hint files). Written when a segment is
//! sealed or rewritten by compaction; ignored (and the segment scanned instead) if the
//! checksum, the names or the segment length disagree.
//!
//! Layout (little-endian), padded with zeroes to a multiple of 4 KiB:
//!
//! ```text
//!  0  4  magic "RKVH"
//!  4  4  format version (1)
//!  8  4  segment order
//! 12  4  segment file number
//! 16  8  segment length (logical end of its records)
//! 24  8  payload length
//! 32  8  xxh3_64 of bytes 0..32 followed by the payload
//! 40  .. payload: entries, each
//!        kind u8, partition u32, offset u32, record length u32, version digest u32,
//!        key length u32, key bytes
//! ```

use xxhash_rust::xxh3::Xxh3;

use crate::index::Location;
use crate::record::{Header, Kind};

const MAGIC: [u8; 4] = *b"RKVH";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 40;

/// One record as recovery needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HintEntry {
    pub kind: Kind,
    pub partition: u32,
    pub offset: u32,
    pub len: u32,
    pub version_digest: u32,
    pub key: Vec<u8>,
}

/// Accumulates the entries of the active segment as records are committed.
#[derive(Default)]
pub struct HintBuilder {
    payload: Vec<u8>,
}

impl HintBuilder {
    /// Adds the record described by `header`, stored at `location`.
    pub fn push(&mut self, header: &Header, location: Location, version_digest: u32, key: &[u8]) {
        self.payload.push(header.kind as u8);
        let fields = [
            header.partition,
            location.offset,
            location.len,
            version_digest,
            key.len() as u32,
        ];
        for n in fields {
            self.payload.extend_from_slice(&n.to_le_bytes());
        }
        self.payload.extend_from_slice(key);
    }

    pub fn encode(&self, order: u32, file_no: u32, segment_len: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&order.to_le_bytes());
        out.extend_from_slice(&file_no.to_le_bytes());
        out.extend_from_slice(&segment_len.to_le_bytes());
        out.extend_from_slice(&(self.payload.len() as u64).to_le_bytes());
        let mut hasher = Xxh3::new();
        hasher.update(&out[..32]);
        hasher.update(&self.payload);
        out.extend_from_slice(&hasher.digest().to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }
}

/// A decoded hint file.
pub struct Hint {
    pub segment_len: u64,
    pub entries: Vec<HintEntry>,
}

/// Decodes `bytes` (the whole file, padding included); None if anything disagrees.
pub fn decode(bytes: &[u8], order: u32, file_no: u32) -> Option<Hint> {
    let header = bytes.get(..HEADER_LEN)?;
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap_or_default());
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or_default());
    if header[..4] != MAGIC || u32_at(4) != VERSION || u32_at(8) != order || u32_at(12) != file_no {
        return None;
    }
    let payload_len = usize::try_from(u64_at(24)).ok()?;
    let payload = bytes.get(HEADER_LEN..HEADER_LEN.checked_add(payload_len)?)?;
    let mut hasher = Xxh3::new();
    hasher.update(&header[..32]);
    hasher.update(payload);
    if hasher.digest() != u64_at(32) {
        return None;
    }
    let mut entries = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let (fixed, tail) = rest.split_at_checked(21)?;
        let n = |i: usize| {
            u32::from_le_bytes(fixed[1 + 4 * i..5 + 4 * i].try_into().unwrap_or_default())
        };
        let kind = match fixed[0] {
            0 => Kind::Value,
            1 => Kind::Tombstone,
            2 => Kind::PartitionDrop,
            _ => return None,
        };
        let (key, tail) = tail.split_at_checked(n(4) as usize)?;
        entries.push(HintEntry {
            kind,
            partition: n(0),
            offset: n(1),
            len: n(2),
            version_digest: n(3),
            key: key.to_vec(),
        });
        rest = tail;
    }
    Some(Hint {
        segment_len: u64_at(16),
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_damage() {
        let mut builder = HintBuilder::default();
        let header = |kind, partition, key: &[u8]| Header {
            kind,
            partition,
            key_len: key.len() as u32,
            version_len: 1,
            value_len: 0,
        };
        let at = |offset, len| Location {
            file: 9,
            offset,
            len,
        };
        builder.push(&header(Kind::Value, 5, b"alpha"), at(0, 60), 77, b"alpha");
        builder.push(&header(Kind::Tombstone, 6, b""), at(60, 40), 78, b"");
        let mut bytes = builder.encode(2, 9, 100);
        bytes.resize(4096, 0);
        let hint = decode(&bytes, 2, 9).unwrap();
        assert_eq!(hint.segment_len, 100);
        assert_eq!(hint.entries.len(), 2);
        assert_eq!(hint.entries[0].key, b"alpha");
        assert_eq!(hint.entries[1].kind, Kind::Tombstone);
        assert!(
            decode(&bytes, 2, 10).is_none(),
            "file number mismatch accepted"
        );
        for at in [0, 17, 45, 60] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            assert!(decode(&damaged, 2, 9).is_none(), "damage at {at} accepted");
        }
    }
}
