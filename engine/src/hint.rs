//! Hint files: the index entries of one sealed segment, so recovery reads a few bytes
//! per key instead of every record (Bitcask's hint files). Written when a segment is
//! sealed or rewritten by compaction; ignored (and the segment scanned instead) if the
//! checksum, the names, the salt or the segment length disagree, or if its entries do
//! not account for every byte of the segment's records.
//!
//! Layout (little-endian), padded with zeroes to a multiple of 4 KiB:
//!
//! ```text
//!  0  4  magic "RKVH"
//!  4  4  format version (2)
//!  8  4  segment order
//! 12  4  segment file number
//! 16  8  segment length (logical end of its records, header block included)
//! 24  8  segment salt
//! 32  8  payload length
//! 40  8  xxh3_64 of bytes 0..40 followed by the payload
//! 48  .. payload: entries in offset order, each
//!        kind u8 (255: a damaged region), partition u32, offset u32, length u32,
//!        version digest u32, key length u32, key bytes
//! ```

use xxhash_rust::xxh3::Xxh3;

use crate::index::Location;
use crate::record::{Header, Kind};
use crate::segment;

const MAGIC: [u8; 4] = *b"RKVH";
const VERSION: u32 = 2;
const HEADER_LEN: usize = 48;
const ENTRY_FIXED_LEN: usize = 21;
const DAMAGED: u8 = 255;

/// One stretch of a segment as recovery needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HintEntry {
    /// The record's kind, or None for a damaged region (bytes holding no intact record).
    pub kind: Option<Kind>,
    pub partition: u32,
    pub offset: u32,
    pub len: u32,
    pub version_digest: u32,
    pub key: Vec<u8>,
}

/// Accumulates the entries of a segment in offset order.
#[derive(Default, Clone)]
pub struct HintBuilder {
    payload: Vec<u8>,
}

impl HintBuilder {
    /// Adds the record described by `header`, stored at `location`.
    pub fn push(&mut self, header: &Header, location: Location, version_digest: u32, key: &[u8]) {
        self.push_entry(
            header.kind as u8,
            header.partition,
            location,
            version_digest,
            key,
        );
    }

    /// Adds a damaged region: bytes of the segment that hold no intact record.
    pub fn push_damaged(&mut self, offset: u32, len: u32) {
        let location = Location {
            file: 0,
            offset,
            len,
        };
        self.push_entry(DAMAGED, 0, location, 0, &[]);
    }

    fn push_entry(&mut self, kind: u8, partition: u32, at: Location, digest: u32, key: &[u8]) {
        self.payload.push(kind);
        for n in [partition, at.offset, at.len, digest, key.len() as u32] {
            self.payload.extend_from_slice(&n.to_le_bytes());
        }
        self.payload.extend_from_slice(key);
    }

    pub fn encode(&self, order: u32, file_no: u32, segment_len: u64, salt: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&order.to_le_bytes());
        out.extend_from_slice(&file_no.to_le_bytes());
        out.extend_from_slice(&segment_len.to_le_bytes());
        out.extend_from_slice(&salt.to_le_bytes());
        out.extend_from_slice(&(self.payload.len() as u64).to_le_bytes());
        let mut hasher = Xxh3::new();
        hasher.update(&out[..40]);
        hasher.update(&self.payload);
        out.extend_from_slice(&hasher.digest().to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }
}

/// A decoded hint file.
#[derive(Debug)]
pub struct Hint {
    pub segment_len: u64,
    pub salt: u64,
    pub entries: Vec<HintEntry>,
}

/// Decodes `bytes` (the whole file, padding included); None if anything disagrees,
/// including entries that leave a gap, overlap, or do not end at the segment length.
pub fn decode(bytes: &[u8], order: u32, file_no: u32) -> Option<Hint> {
    let header = bytes.get(..HEADER_LEN)?;
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap_or_default());
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or_default());
    if header[..4] != MAGIC || u32_at(4) != VERSION || u32_at(8) != order || u32_at(12) != file_no {
        return None;
    }
    let payload_len = usize::try_from(u64_at(32)).ok()?;
    let payload = bytes.get(HEADER_LEN..HEADER_LEN.checked_add(payload_len)?)?;
    let mut hasher = Xxh3::new();
    hasher.update(&header[..40]);
    hasher.update(payload);
    if hasher.digest() != u64_at(40) {
        return None;
    }
    let segment_len = u64_at(16);
    let mut entries = Vec::new();
    let mut rest = payload;
    // Every byte from the header block to the segment's end is accounted for, in order.
    let mut next_offset = segment::HEADER_LEN;
    while !rest.is_empty() {
        let (fixed, tail) = rest.split_at_checked(ENTRY_FIXED_LEN)?;
        let n = |i: usize| {
            u32::from_le_bytes(fixed[1 + 4 * i..5 + 4 * i].try_into().unwrap_or_default())
        };
        let kind = match fixed[0] {
            DAMAGED => None,
            byte => Some(Kind::from_byte(byte)?),
        };
        let (key, tail) = tail.split_at_checked(n(4) as usize)?;
        let entry = HintEntry {
            kind,
            partition: n(0),
            offset: n(1),
            len: n(2),
            version_digest: n(3),
            key: key.to_vec(),
        };
        if entry.offset as u64 != next_offset || entry.len == 0 {
            return None;
        }
        next_offset += entry.len as u64;
        entries.push(entry);
        rest = tail;
    }
    if next_offset != segment_len {
        return None;
    }
    Some(Hint {
        segment_len,
        salt: u64_at(24),
        entries,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const START: u32 = segment::HEADER_LEN as u32;

    fn header(kind: Kind, partition: u32, key: &[u8]) -> Header {
        Header {
            kind,
            partition,
            key_len: key.len() as u32,
            version_len: 1,
            value_len: 0,
        }
    }

    fn at(offset: u32, len: u32) -> Location {
        Location {
            file: 9,
            offset,
            len,
        }
    }

    fn sample() -> HintBuilder {
        let mut builder = HintBuilder::default();
        builder.push(
            &header(Kind::Value, 5, b"alpha"),
            at(START, 60),
            77,
            b"alpha",
        );
        builder.push_damaged(START + 60, 10);
        builder.push(
            &header(Kind::Tombstone, 6, b""),
            at(START + 70, 40),
            78,
            b"",
        );
        builder
    }

    #[test]
    fn round_trips_and_rejects_damage() {
        let mut bytes = sample().encode(2, 9, START as u64 + 110, 0x5a17);
        bytes.resize(4096, 0);
        let hint = decode(&bytes, 2, 9).unwrap();
        assert_eq!(hint.segment_len, START as u64 + 110);
        assert_eq!(hint.salt, 0x5a17);
        assert_eq!(hint.entries.len(), 3);
        assert_eq!(hint.entries[0].key, b"alpha");
        assert_eq!(hint.entries[1].kind, None);
        assert_eq!(hint.entries[2].kind, Some(Kind::Tombstone));
        assert!(
            decode(&bytes, 2, 10).is_none(),
            "file number mismatch accepted"
        );
        for at in [0, 17, 25, 45, 50, 60] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            assert!(decode(&damaged, 2, 9).is_none(), "damage at {at} accepted");
        }
    }

    #[test]
    fn entries_must_account_for_the_whole_segment() {
        let builder = sample();
        // A hint that claims more (or less) than its entries cover is refused: recovery
        // would otherwise trust it and skip records it does not list.
        assert!(decode(&builder.encode(2, 9, START as u64 + 200, 1), 2, 9).is_none());
        assert!(decode(&builder.encode(2, 9, START as u64 + 100, 1), 2, 9).is_none());
        assert!(
            decode(
                &HintBuilder::default().encode(2, 9, START as u64 + 110, 1),
                2,
                9
            )
            .is_none()
        );
        assert!(decode(&HintBuilder::default().encode(2, 9, START as u64, 1), 2, 9).is_some());
        let mut gap = HintBuilder::default();
        gap.push(&header(Kind::Value, 1, b"k"), at(START + 8, 40), 1, b"k");
        assert!(decode(&gap.encode(2, 9, START as u64 + 48, 1), 2, 9).is_none());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&bytes, 2, 9);
        }

        #[test]
        fn flipped_hint_bytes_are_refused_or_exact(at in 0usize..170, bit in 0u8..8) {
            let bytes = sample().encode(2, 9, START as u64 + 110, 0x5a17);
            let mut damaged = bytes.clone();
            let at = at % damaged.len();
            damaged[at] ^= 1 << bit;
            prop_assert!(decode(&damaged, 2, 9).is_none());
        }
    }
}
