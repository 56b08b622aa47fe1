//! Segment files: naming, and what the store tracks about each.
//!
//! A segment has an *order* (its place in the log, which decides which record of a key
//! is newest during recovery) and a *file number* (unique forever, used in index
//! locations and cache keys). New segments get order = file number. Compaction rewrites a
//! segment under a new file number but keeps its order, so recovery's rule stays simple:
//! the record in the higher order wins, and within a segment the later offset wins.
//!
//! Files: `seg-<order>-<file>.log` (records), `seg-<order>-<file>.hint` (index snapshot
//! written at seal), and `*.tmp` while either is being written.

use std::rc::Rc;

pub struct Segment<F> {
    pub order: u32,
    pub file_no: u32,
    pub file: Rc<F>,
    /// Bytes of records (the logical end); the file may be longer (padding, torn tail).
    pub len: u64,
    /// Bytes of records that the index (or a live partition-drop marker) still points at.
    pub live_bytes: u64,
    pub sealed: bool,
}

impl<F> Segment<F> {
    pub fn garbage_ratio(&self) -> f64 {
        if self.len == 0 {
            return 0.0;
        }
        1.0 - self.live_bytes as f64 / self.len as f64
    }
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

/// What a file name in the store directory means.
#[derive(Debug, PartialEq, Eq)]
pub enum FileKind {
    Log { order: u32, file_no: u32 },
    Hint { order: u32, file_no: u32 },
    Temporary,
    Unknown,
}

pub fn classify(name: &str) -> FileKind {
    if name.ends_with(".tmp") {
        return FileKind::Temporary;
    }
    let parse = |stem: &str| {
        let rest = stem.strip_prefix("seg-")?;
        let (order, file_no) = rest.split_once('-')?;
        Some((order.parse().ok()?, file_no.parse().ok()?))
    };
    if let Some(stem) = name.strip_suffix(".log")
        && let Some((order, file_no)) = parse(stem)
    {
        return FileKind::Log { order, file_no };
    }
    if let Some(stem) = name.strip_suffix(".hint")
        && let Some((order, file_no)) = parse(stem)
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
        assert_eq!(classify("seg-x-1.log"), FileKind::Unknown);
    }
}
