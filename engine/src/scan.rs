//! Walking the records of a segment image: used by recovery (when a segment has no
//! usable hint file) and by compaction.
//!
//! Damage is handled so that nothing damaged is ever returned and nothing intact is
//! lost: a record whose header holds but whose body fails its checksum is skipped by its
//! trusted length; bytes that are not a header are skipped by searching forward for the
//! next header whose check holds and whose record checksum holds. Damage followed by
//! no intact record is a torn tail (an interrupted write), cut at the last good record.

use crate::record::{self, Header, HeaderError, MAGIC};

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

/// Calls `found(offset, header, record_bytes)` for every intact record, in order.
pub fn scan(data: &[u8], mut found: impl FnMut(u64, Header, &[u8])) -> ScanSummary {
    let mut summary = ScanSummary::default();
    let mut pos = 0usize;
    let mut damaged_since_last_good = false;
    while pos < data.len() {
        let intact = match record::decode_header(&data[pos..]) {
            Ok(header) => {
                let len = header.record_len();
                match data.get(pos..pos + len) {
                    Some(bytes) if record::checksum_ok(bytes) => Some((header, len)),
                    // Header holds, body does not: skip exactly this record.
                    Some(_) => {
                        damaged_since_last_good = true;
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
                if damaged_since_last_good {
                    summary.corrupt_regions += 1;
                    damaged_since_last_good = false;
                }
                found(pos as u64, header, &data[pos..pos + len]);
                pos += len;
                summary.end = pos as u64;
            }
            None => match next_intact_record(data, pos + 1) {
                Some(next) => {
                    damaged_since_last_good = true;
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

fn next_intact_record(data: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while at < data.len() {
        let offset = data[at..].windows(MAGIC.len()).position(|w| w == MAGIC)?;
        at += offset;
        if let Ok(header) = record::decode_header(&data[at..])
            && let Some(bytes) = data.get(at..at + header.record_len())
            && record::checksum_ok(bytes)
        {
            return Some(at);
        }
        at += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{HEADER_LEN, Kind, encode};

    fn image(n: usize) -> (Vec<u8>, Vec<usize>) {
        let mut data = Vec::new();
        let mut offsets = Vec::new();
        for i in 0..n {
            offsets.push(data.len());
            let value = vec![i as u8; 50 + i];
            encode(
                &mut data,
                Kind::Value,
                1,
                format!("key{i}").as_bytes(),
                b"v",
                &value,
            );
        }
        (data, offsets)
    }

    fn offsets_found(data: &[u8]) -> (Vec<u64>, ScanSummary) {
        let mut found = Vec::new();
        let summary = scan(data, |offset, _, _| found.push(offset));
        (found, summary)
    }

    #[test]
    fn clean_image_with_zero_padding() {
        let (mut data, offsets) = image(5);
        let end = data.len() as u64;
        data.resize(8192, 0);
        let (found, summary) = offsets_found(&data);
        assert_eq!(found, offsets.iter().map(|&o| o as u64).collect::<Vec<_>>());
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
        let (found, summary) = offsets_found(&data);
        assert_eq!(found.len(), 4);
        assert!(!found.contains(&(offsets[2] as u64)));
        assert_eq!(summary.corrupt_regions, 1);
    }

    #[test]
    fn corrupt_header_in_the_middle_resyncs() {
        let (mut data, offsets) = image(5);
        data[offsets[1] + 9] ^= 0x01;
        let (found, summary) = offsets_found(&data);
        assert_eq!(
            found,
            vec![0, offsets[2] as u64, offsets[3] as u64, offsets[4] as u64]
        );
        assert_eq!(summary.corrupt_regions, 1);
    }

    #[test]
    fn torn_tail_is_cut_not_counted_as_corruption() {
        let (data, offsets) = image(5);
        // The header and the first key byte made it to disk; the rest did not.
        let torn = &data[..offsets[4] + HEADER_LEN + 1];
        let (found, summary) = offsets_found(torn);
        assert_eq!(found.len(), 4);
        assert_eq!(summary.end, offsets[4] as u64);
        assert_eq!(summary.corrupt_regions, 0);
        assert_eq!(summary.torn_tail_bytes, HEADER_LEN as u64 + 1);
    }
}
