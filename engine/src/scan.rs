//! Walking the records of a segment image: used by recovery (when a segment has no
//! usable hint file) and by compaction.
//!
//! Damage is handled so that nothing damaged is ever returned and nothing intact is
//! lost: a record whose header holds but whose body fails its checksum is skipped by its
//! trusted length; bytes that are not a header are skipped by searching forward for the
//! next header whose check holds for *its own offset* and whose record checksum holds.
//! Both checks are seeded with the segment's salt and the offset (see
//! `record::position_seed`), so the image of a record inside a value is never taken for
//! a record, and a forged header claiming a huge length fails its 4-byte check before
//! any of that length is hashed. Damage followed by no intact record is a torn tail (an
//! interrupted write), cut at the last good record.

use crate::record::{self, Header, HeaderError, MAGIC};
use crate::segment;

/// What a scan found, besides the records it passed to its callback.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanSummary {
    /// End of the last intact record: where the segment's records logically end.
    pub end: u64,
    /// Damaged regions followed by intact records (corruption, skipped and counted).
    pub corrupt_regions: u64,
    /// Bytes after `end` that were not zero (an interrupted write), cut.
    pub torn_tail_bytes: u64,
}

/// One stretch of a segment, in offset order.
pub enum Found<'a> {
    Record {
        offset: u64,
        header: Header,
        bytes: &'a [u8],
    },
    /// Bytes between two intact records that hold no intact record.
    Damaged { offset: u64, len: u64 },
}

/// Calls `found` for every intact record and every damaged region between intact
/// records of the segment image `data` (the file from offset 0, header block included),
/// in offset order.
pub fn scan(data: &[u8], salt: u64, mut found: impl FnMut(Found<'_>)) -> ScanSummary {
    let start = segment::HEADER_LEN as usize;
    let mut summary = ScanSummary {
        end: start as u64,
        ..ScanSummary::default()
    };
    let mut pos = start;
    let mut damaged_since: Option<usize> = None;
    while pos < data.len() {
        let seed = record::position_seed(salt, pos as u64);
        let intact = match record::decode_header(&data[pos..], seed) {
            Ok(header) => {
                let len = header.record_len();
                match data.get(pos..pos + len) {
                    Some(bytes) if record::checksum_ok(bytes, seed) => Some((header, len)),
                    // Header holds, body does not: skip exactly this record.
                    Some(_) => {
                        damaged_since.get_or_insert(pos);
                        pos += len;
                        continue;
                    }
                    None => None,
                }
            }
            Err(HeaderError::Short) => None,
            Err(HeaderError::Zeroes) if data[pos..].iter().all(|&b| b == 0) => break,
            Err(HeaderError::Zeroes | HeaderError::Invalid) => None,
        };
        match intact {
            Some((header, len)) => {
                if let Some(from) = damaged_since.take() {
                    summary.corrupt_regions += 1;
                    found(Found::Damaged {
                        offset: from as u64,
                        len: (pos - from) as u64,
                    });
                }
                found(Found::Record {
                    offset: pos as u64,
                    header,
                    bytes: &data[pos..pos + len],
                });
                pos += len;
                summary.end = pos as u64;
            }
            None => match next_intact_record(data, salt, pos + 1) {
                Some(next) => {
                    damaged_since.get_or_insert(pos);
                    pos = next;
                }
                None => break,
            },
        }
    }
    let tail = &data[(summary.end as usize).min(data.len())..];
    summary.torn_tail_bytes = tail
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i as u64 + 1);
    summary
}

fn next_intact_record(data: &[u8], salt: u64, from: usize) -> Option<usize> {
    let mut at = from;
    while at < data.len() {
        let offset = data[at..].windows(MAGIC.len()).position(|w| w == MAGIC)?;
        at += offset;
        let seed = record::position_seed(salt, at as u64);
        if let Ok(header) = record::decode_header(&data[at..], seed)
            && let Some(bytes) = data.get(at..at + header.record_len())
            && record::checksum_ok(bytes, seed)
        {
            return Some(at);
        }
        at += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::record::{HEADER_LEN, Kind, encode, position_seed};

    const SALT: u64 = 0x0123_4567_89ab_cdef;
    const START: usize = segment::HEADER_LEN as usize;

    /// A segment image: a header block (zeroes suffice for scanning) and `n` records.
    fn image(n: usize) -> (Vec<u8>, Vec<usize>) {
        let mut data = vec![0u8; START];
        let mut offsets = Vec::new();
        for i in 0..n {
            offsets.push(data.len());
            let value = vec![i as u8; 50 + i];
            let seed = position_seed(SALT, data.len() as u64);
            let key = format!("key{i}");
            encode(
                &mut data,
                Kind::Value,
                1,
                key.as_bytes(),
                b"v",
                &value,
                seed,
            );
        }
        (data, offsets)
    }

    fn offsets_found(data: &[u8]) -> (Vec<u64>, Vec<(u64, u64)>, ScanSummary) {
        let mut records = Vec::new();
        let mut damaged = Vec::new();
        let summary = scan(data, SALT, |f| match f {
            Found::Record { offset, .. } => records.push(offset),
            Found::Damaged { offset, len } => damaged.push((offset, len)),
        });
        (records, damaged, summary)
    }

    #[test]
    fn clean_image_with_zero_padding() {
        let (mut data, offsets) = image(5);
        let end = data.len() as u64;
        data.resize(START + 8192, 0);
        let (found, damaged, summary) = offsets_found(&data);
        assert_eq!(found, offsets.iter().map(|&o| o as u64).collect::<Vec<_>>());
        assert!(damaged.is_empty());
        assert_eq!(
            summary,
            ScanSummary {
                end,
                corrupt_regions: 0,
                torn_tail_bytes: 0
            }
        );
    }

    #[test]
    fn corrupt_body_in_the_middle_skips_one_record() {
        let (mut data, offsets) = image(5);
        data[offsets[2] + 30] ^= 0xff;
        let (found, damaged, summary) = offsets_found(&data);
        assert_eq!(found.len(), 4);
        assert!(!found.contains(&(offsets[2] as u64)));
        let len = (offsets[3] - offsets[2]) as u64;
        assert_eq!(damaged, vec![(offsets[2] as u64, len)]);
        assert_eq!(summary.corrupt_regions, 1);
    }

    #[test]
    fn corrupt_header_in_the_middle_resyncs() {
        let (mut data, offsets) = image(5);
        data[offsets[1] + 9] ^= 0x01;
        let (found, damaged, summary) = offsets_found(&data);
        assert_eq!(
            found,
            vec![
                offsets[0] as u64,
                offsets[2] as u64,
                offsets[3] as u64,
                offsets[4] as u64
            ]
        );
        assert_eq!(damaged.len(), 1);
        assert_eq!(summary.corrupt_regions, 1);
    }

    #[test]
    fn torn_tail_is_cut_not_counted_as_corruption() {
        let (data, offsets) = image(5);
        // The header and the first key byte made it to disk; the rest did not.
        let torn = &data[..offsets[4] + HEADER_LEN + 1];
        let (found, damaged, summary) = offsets_found(torn);
        assert_eq!(found.len(), 4);
        assert!(damaged.is_empty());
        assert_eq!(summary.end, offsets[4] as u64);
        assert_eq!(summary.corrupt_regions, 0);
        assert_eq!(summary.torn_tail_bytes, HEADER_LEN as u64 + 1);
    }

    /// A value holding the image of a record (sealed for every plausible position with
    /// the wrong salt, and with format 1's unseeded checks) is never read as a record,
    /// even when the record around it is damaged and the scan searches for the next one.
    #[test]
    fn records_inside_values_are_never_found() {
        let mut forged = Vec::new();
        for offset in (START..START + 600).step_by(1) {
            encode(
                &mut forged,
                Kind::PartitionDrop,
                1,
                b"",
                b"",
                b"",
                position_seed(0, offset as u64),
            );
        }
        let mut data = vec![0u8; START];
        let seed = position_seed(SALT, START as u64);
        encode(&mut data, Kind::Value, 1, b"carrier", b"v", &forged, seed);
        let after = data.len();
        encode(
            &mut data,
            Kind::Value,
            1,
            b"next",
            b"v",
            b"x",
            position_seed(SALT, after as u64),
        );
        data[START + 2] ^= 0x40; // the carrier's magic: its header is gone
        let (found, _, summary) = offsets_found(&data);
        assert_eq!(found, vec![after as u64]);
        assert_eq!(summary.corrupt_regions, 1);
    }

    proptest! {
        /// Random bytes with real records spliced in: no panic, and every record the
        /// scan reports was written at exactly that offset.
        #[test]
        fn reports_only_records_written_where_found(
            chunks in prop::collection::vec((any::<bool>(), prop::collection::vec(any::<u8>(), 0..120)), 0..20)
        ) {
            let mut data = vec![0u8; START];
            let mut written = Vec::new();
            for (is_record, bytes) in chunks {
                if is_record {
                    let at = data.len();
                    written.push(at as u64);
                    encode(&mut data, Kind::Value, 2, &bytes[..bytes.len().min(8)], b"v", &bytes, position_seed(SALT, at as u64));
                } else {
                    data.extend_from_slice(&bytes);
                }
            }
            let (found, _, summary) = offsets_found(&data);
            for offset in &found {
                prop_assert!(written.contains(offset), "offset {} was never written", offset);
            }
            prop_assert!(summary.end as usize <= data.len());
        }

        #[test]
        fn arbitrary_images_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..3000)) {
            let mut data = vec![0u8; START];
            data.extend_from_slice(&bytes);
            let _ = offsets_found(&data);
            let _ = record::decode_header(&bytes, SALT);
        }
    }
}
