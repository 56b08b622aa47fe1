//! The on-disk record: framing, checksums, encoding and zero-copy views.
//!
//! Byte layout (all integers little-endian; docs/format.md is the reference):
//!
//! ```text
//! offset size field
//!  0     3    magic "RKV"
//!  3     1    format version (2)
//!  4     1    kind: 0 value, 1 tombstone, 2 partition drop, 3 lost
//!  5     3    reserved, zero
//!  8     4    partition id
//! 12     4    key length
//! 16     4    version length
//! 20     4    value length
//! 24     4    header check: low 32 bits of xxh3_64_with_seed(bytes 0..24, seed)
//! 28     ...  key, version, value
//! end-8  8    record checksum: xxh3_64_with_seed(every byte before it, seed)
//! ```
//!
//! `seed` binds a record to where it lies: it is the segment's random salt (kept in the
//! segment's header block, never sent anywhere) combined with the record's offset in the
//! file. The same bytes anywhere else fail both checks, so a client value that happens
//! to hold an image of a record (a partition drop, say) can never be read as one, even
//! by recovery's search for the next record after damage.
//!
//! The header has its own check so that recovery can trust the lengths of a record whose
//! body is damaged (skip exactly that record) and can find the next record after damage
//! by searching for a header whose check holds, without hashing what a forged length
//! claims.

use std::rc::Rc;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

pub const MAGIC: [u8; 3] = *b"RKV";
pub const FORMAT_VERSION: u8 = 2;
pub const HEADER_LEN: usize = 28;
pub const CHECKSUM_LEN: usize = 8;
/// Bytes a record takes beyond its key, version and value.
pub const RECORD_OVERHEAD: usize = HEADER_LEN + CHECKSUM_LEN;
/// Longest key accepted (64 KiB).
pub const MAX_KEY_LEN: usize = 64 << 10;
/// Longest opaque version blob accepted (64 KiB).
pub const MAX_VERSION_LEN: usize = 64 << 10;

const _: () = assert!(HEADER_LEN == 28 && RECORD_OVERHEAD == 36);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Value = 0,
    Tombstone = 1,
    /// Marks every earlier record of its partition as dropped (see `Store::drop_partition`).
    PartitionDrop = 2,
    /// The key's newest record was found corrupt by compaction: the key reads as
    /// missing here (replication repairs it) and older records of it stay forgotten.
    Lost = 3,
}

impl Kind {
    pub(crate) fn from_byte(b: u8) -> Option<Kind> {
        match b {
            0 => Some(Kind::Value),
            1 => Some(Kind::Tombstone),
            2 => Some(Kind::PartitionDrop),
            3 => Some(Kind::Lost),
            _ => None,
        }
    }
}

/// A decoded, checked header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub partition: u32,
    pub key_len: u32,
    pub version_len: u32,
    pub value_len: u32,
}

impl Header {
    pub fn record_len(&self) -> usize {
        RECORD_OVERHEAD
            + self.key_len as usize
            + self.version_len as usize
            + self.value_len as usize
    }
}

/// Why bytes at some offset are not a record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than HEADER_LEN bytes are left.
    Short,
    /// All zero: the unwritten space after the last record.
    Zeroes,
    /// Magic, version, kind, check or lengths are wrong.
    Invalid,
}

/// The checksum seed of a record at `offset` in a segment whose salt is `salt`.
pub fn position_seed(salt: u64, offset: u64) -> u64 {
    salt ^ offset.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Decodes the header at the start of `bytes`, checked against `seed`.
pub fn decode_header(bytes: &[u8], seed: u64) -> Result<Header, HeaderError> {
    let Some(h) = bytes.get(..HEADER_LEN) else {
        return Err(HeaderError::Short);
    };
    if h.iter().all(|&b| b == 0) {
        return Err(HeaderError::Zeroes);
    }
    if h[..3] != MAGIC || h[3] != FORMAT_VERSION || h[5..8] != [0, 0, 0] {
        return Err(HeaderError::Invalid);
    }
    if u32_at(h, 24) != xxh3_64_with_seed(&h[..24], seed) as u32 {
        return Err(HeaderError::Invalid);
    }
    let kind = Kind::from_byte(h[4]).ok_or(HeaderError::Invalid)?;
    let header = Header {
        kind,
        partition: u32_at(h, 8),
        key_len: u32_at(h, 12),
        version_len: u32_at(h, 16),
        value_len: u32_at(h, 20),
    };
    // A header can pass its check and still describe an impossible record only if it was
    // written by a buggy or newer writer; refuse it rather than read gigabytes.
    if header.key_len as usize > MAX_KEY_LEN
        || header.version_len as usize > MAX_VERSION_LEN
        || header.value_len as usize > crate::config::MAX_VALUE_LEN_CEILING
    {
        return Err(HeaderError::Invalid);
    }
    Ok(header)
}

/// The header of a record this process encoded (`encode_unsealed`), not yet sealed.
pub(crate) fn unsealed_header(bytes: &[u8]) -> Header {
    Header {
        kind: Kind::from_byte(bytes[4]).expect("encoded by this process"),
        partition: u32_at(bytes, 8),
        key_len: u32_at(bytes, 12),
        version_len: u32_at(bytes, 16),
        value_len: u32_at(bytes, 20),
    }
}

/// The key, version and value inside one record's bytes, as `header` describes them.
pub fn split<'a>(record: &'a [u8], header: &Header) -> (&'a [u8], &'a [u8], &'a [u8]) {
    let key_end = HEADER_LEN + header.key_len as usize;
    let version_end = key_end + header.version_len as usize;
    let value_end = version_end + header.value_len as usize;
    (
        &record[HEADER_LEN..key_end],
        &record[key_end..version_end],
        &record[version_end..value_end],
    )
}

/// True when `record` (exactly one record's bytes) carries a checksum that holds for
/// `seed`.
pub fn checksum_ok(record: &[u8], seed: u64) -> bool {
    let Some(body_len) = record.len().checked_sub(CHECKSUM_LEN) else {
        return false;
    };
    let (body, sum) = record.split_at(body_len);
    let mut stored = [0u8; 8];
    stored.copy_from_slice(sum);
    u64::from_le_bytes(stored) == xxh3_64_with_seed(body, seed)
}

/// Appends one record to `out` with both checks left zero: it becomes valid only once
/// `seal` binds it to the position it is written at. The caller has validated lengths.
pub fn encode_unsealed(
    out: &mut Vec<u8>,
    kind: Kind,
    partition: u32,
    key: &[u8],
    version: &[u8],
    value: &[u8],
) {
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&partition.to_le_bytes());
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(&(version.len() as u32).to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(key);
    out.extend_from_slice(version);
    out.extend_from_slice(value);
    out.extend_from_slice(&[0; CHECKSUM_LEN]);
}

/// Writes the header check and the checksum of `record` (exactly one record) for `seed`.
pub fn seal(record: &mut [u8], seed: u64) {
    let check = xxh3_64_with_seed(&record[..24], seed) as u32;
    record[24..28].copy_from_slice(&check.to_le_bytes());
    let body_len = record.len() - CHECKSUM_LEN;
    let sum = xxh3_64_with_seed(&record[..body_len], seed);
    record[body_len..].copy_from_slice(&sum.to_le_bytes());
}

/// Appends one record sealed for `seed` (see `position_seed`).
pub fn encode(
    out: &mut Vec<u8>,
    kind: Kind,
    partition: u32,
    key: &[u8],
    version: &[u8],
    value: &[u8],
    seed: u64,
) {
    let start = out.len();
    encode_unsealed(out, kind, partition, key, version, value);
    seal(&mut out[start..], seed);
}

/// Digest of a version blob kept in the index, so anti-entropy can compare versions
/// without reading records.
pub fn version_digest(version: &[u8]) -> u32 {
    xxh3_64(version) as u32
}

/// A record read from the store: shares the cached bytes, copies nothing.
#[derive(Clone)]
pub struct Record {
    raw: Rc<[u8]>,
    header: Header,
}

impl Record {
    /// Wraps bytes that were already checked (header decoded, checksum verified).
    pub(crate) fn from_checked(raw: Rc<[u8]>, header: Header) -> Record {
        debug_assert_eq!(raw.len(), header.record_len());
        Record { raw, header }
    }

    pub(crate) fn raw_len(&self) -> usize {
        self.raw.len()
    }
    pub fn partition(&self) -> u32 {
        self.header.partition
    }
    pub fn is_tombstone(&self) -> bool {
        self.header.kind == Kind::Tombstone
    }
    pub fn key(&self) -> &[u8] {
        split(&self.raw, &self.header).0
    }
    pub fn version(&self) -> &[u8] {
        split(&self.raw, &self.header).1
    }
    pub fn value(&self) -> &[u8] {
        split(&self.raw, &self.header).2
    }
    pub fn version_digest(&self) -> u32 {
        version_digest(self.version())
    }
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("partition", &self.partition())
            .field("tombstone", &self.is_tombstone())
            .field("key_len", &self.key().len())
            .field("version_len", &self.version().len())
            .field("value_len", &self.value().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: u64 = 0x1234_5678_9abc_def0;

    #[test]
    fn encode_then_decode_round_trips() {
        let mut buf = Vec::new();
        encode(&mut buf, Kind::Tombstone, 7, b"key", b"ver", b"", SEED);
        let header = decode_header(&buf, SEED).unwrap();
        assert_eq!(header.kind, Kind::Tombstone);
        assert_eq!(header.partition, 7);
        assert_eq!(header.record_len(), buf.len());
        assert!(checksum_ok(&buf, SEED));
        let rec = Record::from_checked(buf.into(), header);
        assert_eq!(
            (rec.key(), rec.version(), rec.value()),
            (&b"key"[..], &b"ver"[..], &b""[..])
        );
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode(&mut buf, Kind::Value, 3, b"k", b"v", b"value", SEED);
        for bit in 0..buf.len() * 8 {
            let mut damaged = buf.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let intact = decode_header(&damaged, SEED)
                .map(|h| h.record_len() == damaged.len() && checksum_ok(&damaged, SEED))
                .unwrap_or(false);
            assert!(!intact, "flip of bit {bit} went unnoticed");
        }
    }

    #[test]
    fn a_record_is_valid_only_where_it_was_sealed() {
        let salt = 0xfeed_f00d;
        let mut buf = Vec::new();
        encode(
            &mut buf,
            Kind::PartitionDrop,
            3,
            b"",
            b"",
            b"",
            position_seed(salt, 8192),
        );
        assert!(decode_header(&buf, position_seed(salt, 8192)).is_ok());
        for (salt, offset) in [(salt, 8193), (salt, 4096), (salt + 1, 8192), (0, 8192)] {
            let seed = position_seed(salt, offset);
            assert_eq!(decode_header(&buf, seed), Err(HeaderError::Invalid));
            assert!(!checksum_ok(&buf, seed));
        }
    }

    #[test]
    fn an_unsealed_record_is_not_valid_anywhere() {
        let mut buf = Vec::new();
        encode_unsealed(&mut buf, Kind::Value, 1, b"k", b"v", b"x");
        assert_eq!(unsealed_header(&buf).record_len(), buf.len());
        assert!(!checksum_ok(&buf, SEED));
        seal(&mut buf, SEED);
        assert!(decode_header(&buf, SEED).is_ok() && checksum_ok(&buf, SEED));
    }

    #[test]
    fn zeroes_are_told_apart_from_garbage() {
        assert_eq!(
            decode_header(&[0; HEADER_LEN], SEED),
            Err(HeaderError::Zeroes)
        );
        assert_eq!(
            decode_header(&[0xAB; HEADER_LEN], SEED),
            Err(HeaderError::Invalid)
        );
        assert_eq!(decode_header(&[0; 5], SEED), Err(HeaderError::Short));
    }
}
