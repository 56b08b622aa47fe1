//! Segment files: naming, and what the store tracks about each.
//!
//! A segment has an *order* (its place in the log, which decides which record of a key
//! is newest during recovery) and a *file number* (unique forever, used in index
//! locations and cache keys). New segments get order = file number. Compaction rewrites a
//! segment under a new file number but keeps its order, so recovery's rule stays simple:
//! the record in the higher order wins, and within a segment the later offset wins.
//!
//! Files: `seg-<order>-<file>.log` (records), `seg-<order>-<file>.hint` (index snapshot
//! written at seal), `*.tmp` while either is being written, and `compaction.reserve`
//! (space held back so compaction can run on a full disk).
//!
//! Every segment starts with a 4 KiB header block (`HEADER_LEN`) naming its order, file
//! number and the random salt its records' checksums are seeded with; records follow.

use std::rc::Rc;

use xxhash_rust::xxh3::xxh3_64;

use crate::config::ALIGN;

/// Bytes of the header block at the start of every segment; records start here.
pub const HEADER_LEN: u64 = ALIGN;
const HEADER_MAGIC: [u8; 4] = *b"RKVS";
const HEADER_VERSION: u32 = 2;
/// The first bytes of a segment written by format 1, which had no header block.
const FORMAT_1_START: [u8; 4] = *b"RKV\x01";

pub struct Segment<F> {
    pub order: u32,
    pub file_no: u32,
    pub file: Rc<F>,
    /// Seeds the checksums of this segment's records (see `record::position_seed`).
    pub salt: u64,
    /// Logical end: the header block plus the bytes of its records; the file may be
    /// longer (padding, torn tail).
    pub len: u64,
    /// Bytes of records that the index (or a live partition-drop marker) still points at.
    pub live_bytes: u64,
    pub sealed: bool,
}

impl<F> Segment<F> {
    pub fn record_bytes(&self) -> u64 {
        self.len.saturating_sub(HEADER_LEN)
    }

    /// Fraction of record bytes nothing points at; 1 for a segment with no records.
    pub fn garbage_ratio(&self) -> f64 {
        let records = self.record_bytes();
        if records == 0 {
            return 1.0;
        }
        1.0 - self.live_bytes as f64 / records as f64
    }
}

/// The header block of segment (`order`, `file_no`) with `salt`.
pub fn encode_header(order: u32, file_no: u32, salt: u64, block: &mut [u8]) {
    block[..4].copy_from_slice(&HEADER_MAGIC);
    block[4..8].copy_from_slice(&HEADER_VERSION.to_le_bytes());
    block[8..12].copy_from_slice(&order.to_le_bytes());
    block[12..16].copy_from_slice(&file_no.to_le_bytes());
    block[16..24].copy_from_slice(&salt.to_le_bytes());
    let check = xxh3_64(&block[..24]);
    block[24..32].copy_from_slice(&check.to_le_bytes());
}

/// What the first bytes of a segment file say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderBlock {
    /// A valid header: the segment's salt.
    Salt(u64),
    /// Nothing but zeroes (or nothing at all): a segment created but never written.
    Blank,
    /// Written by format 1, which this build does not read.
    Format1,
    /// Damaged, or for another segment.
    Invalid,
}

pub fn decode_header(bytes: &[u8], order: u32, file_no: u32) -> HeaderBlock {
    if bytes.iter().all(|&b| b == 0) {
        return HeaderBlock::Blank;
    }
    if bytes.starts_with(&FORMAT_1_START) {
        return HeaderBlock::Format1;
    }
    let Some(h) = bytes.get(..32) else {
        return HeaderBlock::Invalid;
    };
    let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[at..at + 8]);
        u64::from_le_bytes(b)
    };
    if h[..4] != HEADER_MAGIC
        || u32_at(4) != HEADER_VERSION
        || u32_at(8) != order
        || u32_at(12) != file_no
        || u64_at(24) != xxh3_64(&h[..24])
    {
        return HeaderBlock::Invalid;
    }
    HeaderBlock::Salt(u64_at(16))
}

pub fn log_name(order: u32, file_no: u32) -> String {
    format!("seg-{order:010}-{file_no:010}.log")
}

pub fn hint_name(order: u32, file_no: u32) -> String {
    format!("seg-{order:010}-{file_no:010}.hint")
}

pub fn tmp_name(name: &str) -> String {
    format!("{name}.tmp")
}

pub const RESERVE_NAME: &str = "compaction.reserve";

/// What a file name in the store directory means.
#[derive(Debug, PartialEq, Eq)]
pub enum FileKind {
    Log { order: u32, file_no: u32 },
    Hint { order: u32, file_no: u32 },
    Temporary,
    Reserve,
    Unknown,
}

pub fn classify(name: &str) -> FileKind {
    if name.ends_with(".tmp") {
        return FileKind::Temporary;
    }
    if name == RESERVE_NAME {
        return FileKind::Reserve;
    }
    let parse = |stem: &str| {
        let rest = stem.strip_prefix("seg-")?;
        let (order, file_no) = rest.split_once('-')?;
        Some((order.parse().ok()?, file_no.parse().ok()?))
    };
    // Only the names this code writes (ten digits each, below the largest number, so
    // that "one more" never overflows); anything else is left alone.
    let canonical = |(order, file_no): (u32, u32), name_of: fn(u32, u32) -> String| {
        (order < u32::MAX && file_no < u32::MAX && name_of(order, file_no) == name)
            .then_some((order, file_no))
    };
    if let Some(stem) = name.strip_suffix(".log")
        && let Some((order, file_no)) = parse(stem).and_then(|n| canonical(n, log_name))
    {
        return FileKind::Log { order, file_no };
    }
    if let Some(stem) = name.strip_suffix(".hint")
        && let Some((order, file_no)) = parse(stem).and_then(|n| canonical(n, hint_name))
    {
        return FileKind::Hint { order, file_no };
    }
    FileKind::Unknown
}

pub fn align_down(n: u64) -> u64 {
    n / crate::config::ALIGN * crate::config::ALIGN
}

pub fn align_up(n: u64) -> u64 {
    n.div_ceil(crate::config::ALIGN) * crate::config::ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(
            classify(&log_name(3, 17)),
            FileKind::Log {
                order: 3,
                file_no: 17
            }
        );
        assert_eq!(
            classify(&hint_name(3, 17)),
            FileKind::Hint {
                order: 3,
                file_no: 17
            }
        );
        assert_eq!(classify(&tmp_name(&log_name(3, 17))), FileKind::Temporary);
        assert_eq!(classify("partition-map"), FileKind::Unknown);
        assert_eq!(classify(RESERVE_NAME), FileKind::Reserve);
        assert_eq!(classify("seg-x-1.log"), FileKind::Unknown);
        assert_eq!(
            classify("seg-7-7.log"),
            FileKind::Unknown,
            "not a name we write"
        );
        assert_eq!(classify(&log_name(u32::MAX, 1)), FileKind::Unknown);
        assert_eq!(classify(&hint_name(1, u32::MAX)), FileKind::Unknown);
    }

    #[test]
    fn header_block_names_its_segment() {
        let mut block = vec![0u8; HEADER_LEN as usize];
        assert_eq!(decode_header(&block, 3, 17), HeaderBlock::Blank);
        encode_header(3, 17, 0xabcdef, &mut block);
        assert_eq!(decode_header(&block, 3, 17), HeaderBlock::Salt(0xabcdef));
        assert_eq!(decode_header(&block, 3, 18), HeaderBlock::Invalid);
        for at in [0, 5, 9, 13, 17, 25] {
            let mut damaged = block.clone();
            damaged[at] ^= 1;
            assert_eq!(
                decode_header(&damaged, 3, 17),
                HeaderBlock::Invalid,
                "byte {at}"
            );
        }
        assert_eq!(
            decode_header(b"RKV\x01\x00rest", 3, 17),
            HeaderBlock::Format1
        );
    }
}
