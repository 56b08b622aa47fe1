//! Compaction: rewrite a sealed segment whose garbage ratio passed the threshold,
//! keeping only the records the index still points at.
//!
//! The output keeps the segment's *order* under a new file number, so the recovery rule
//! (higher order wins, then later offset) still holds: every record a rewrite keeps was
//! the newest of its key when it was copied, and anything written since lives in a
//! higher order. Steps, each crash-safe: write `<new>.log.tmp`, fdatasync, write its hint,
//! rename into place, sync the directory, re-point the index, then delete the old files.
//! A crash before the rename leaves a temporary file (removed at open); after it, two
//! files share the order and recovery keeps the higher file number.

use std::rc::Rc;
use std::time::Duration;

use crate::disk::{Disk, DiskFile, WriteBuf};
use crate::error::{Result, StoreError};
use crate::hint::HintBuilder;
use crate::index::Location;
use crate::record::{self, Header, Kind};
use crate::scan;
use crate::segment::{self, Segment, align_up};
use crate::store::Store;

/// What one compaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionReport {
    pub order: u32,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub records_kept: usize,
}

/// Records checked for liveness between yields to foreground work.
const RECORDS_PER_YIELD: usize = 512;

impl<D: Disk> Store<D> {
    /// Compacts until no segment passes the threshold, then waits `idle`; stops when the
    /// store closes. Run it in a low-priority task queue.
    pub async fn run_compaction(&self, idle: Duration) {
        while !self.closing.get() {
            match self.compact_once().await {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(err) => tracing::warn!(%err, "compaction failed; will retry"),
            }
            self.disk.sleep(idle).await;
            self.disk.yield_now().await;
        }
    }

    /// Compacts the sealed segment with the most garbage, if one passes the threshold.
    pub async fn compact_once(&self) -> Result<Option<CompactionReport>> {
        if self.compacting.replace(true) {
            return Ok(None);
        }
        let result = match self.pick_segment() {
            Some(file_no) => self.compact_segment(file_no).await.map(Some),
            None => Ok(None),
        };
        self.compacting.set(false);
        result
    }

    fn pick_segment(&self) -> Option<u32> {
        let inner = self.inner.borrow();
        let threshold = self.config.compaction_garbage_ratio;
        inner
            .segments
            .values()
            .filter(|s| s.sealed && s.len > 0 && s.garbage_ratio() >= threshold)
            .max_by(|a, b| a.garbage_ratio().total_cmp(&b.garbage_ratio()))
            .map(|s| s.file_no)
    }

    async fn compact_segment(&self, file_no: u32) -> Result<CompactionReport> {
        self.check_writable()?;
        let (order, file, len) = {
            let inner = self.inner.borrow();
            let s = &inner.segments[&file_no];
            (s.order, s.file.clone(), s.len)
        };
        let data = file
            .read_at(0, len as usize)
            .await
            .map_err(|e| StoreError::io("reading a segment to compact", e))?;
        let mut candidates: Vec<(u64, Header)> = Vec::new();
        scan::scan(&data, |offset, header, _| candidates.push((offset, header)));

        // Numbers are never reused, so taking one now is harmless even if unused.
        let new_no = {
            let mut inner = self.inner.borrow_mut();
            let n = inner.next_number;
            inner.next_number += 1;
            n
        };
        let mut out = Vec::new();
        let mut hint = HintBuilder::default();
        let mut kept: Vec<(Location, u64, Header)> = Vec::new();
        for chunk in candidates.chunks(RECORDS_PER_YIELD) {
            {
                let inner = self.inner.borrow();
                for &(offset, header) in chunk {
                    let bytes = &data[offset as usize..offset as usize + header.record_len()];
                    let (key, version, _) = record::split(bytes, &header);
                    let old = Location {
                        file: file_no,
                        offset: offset as u32,
                        len: bytes.len() as u32,
                    };
                    let live = match header.kind {
                        Kind::PartitionDrop => inner.drops.get(&header.partition) == Some(&old),
                        Kind::Value | Kind::Tombstone => inner
                            .index
                            .get(header.partition, key)
                            .is_some_and(|e| e.location == old),
                    };
                    if live {
                        let new = Location {
                            file: new_no,
                            offset: out.len() as u32,
                            len: old.len,
                        };
                        hint.push(&header, new, record::version_digest(version), key);
                        kept.push((old, out.len() as u64, header));
                        out.extend_from_slice(bytes);
                    }
                }
            }
            self.disk.yield_now().await;
        }

        let new_file = if out.is_empty() {
            None
        } else {
            Some(self.write_compacted(order, new_no, &out, &hint).await?)
        };

        // Re-point the index at the copies that are still the newest of their key.
        {
            let mut inner = self.inner.borrow_mut();
            if let Some(new_file) = new_file {
                inner.segments.insert(
                    new_no,
                    Segment {
                        order,
                        file_no: new_no,
                        file: Rc::new(new_file),
                        len: out.len() as u64,
                        live_bytes: 0,
                        sealed: true,
                    },
                );
            }
            for (old, new_offset, header) in kept {
                let new = Location {
                    file: new_no,
                    offset: new_offset as u32,
                    len: old.len,
                };
                let copy = &out[new_offset as usize..new_offset as usize + old.len as usize];
                let (key, _, _) = record::split(copy, &header);
                let moved = match header.kind {
                    Kind::PartitionDrop => match inner.drops.get_mut(&header.partition) {
                        Some(at) if *at == old => {
                            *at = new;
                            true
                        }
                        _ => false,
                    },
                    Kind::Value | Kind::Tombstone => {
                        inner.index.relocate(header.partition, key, old, new)
                    }
                };
                if moved {
                    inner
                        .segments
                        .get_mut(&file_no)
                        .expect("compacted segment tracked")
                        .live_bytes -= old.len as u64;
                    inner
                        .segments
                        .get_mut(&new_no)
                        .expect("output segment tracked")
                        .live_bytes += old.len as u64;
                }
            }
            let old = inner
                .segments
                .remove(&file_no)
                .expect("compacted segment tracked");
            assert_eq!(
                old.live_bytes, 0,
                "a live record was left behind in a compacted segment"
            );
            inner.stats.compactions += 1;
            inner.stats.compacted_bytes_reclaimed += len - out.len() as u64;
        }
        let io = |op| move |e| StoreError::io(op, e);
        self.disk
            .remove(&segment::log_name(order, file_no))
            .await
            .map_err(io("removing a compacted segment"))?;
        match self.disk.remove(&segment::hint_name(order, file_no)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(StoreError::io("removing a hint", e));
            }
            _ => {}
        }
        self.disk
            .sync_dir()
            .await
            .map_err(io("syncing the directory"))?;
        Ok(CompactionReport {
            order,
            bytes_before: len,
            bytes_after: out.len() as u64,
            records_kept: out.len(),
        })
    }

    async fn write_compacted(
        &self,
        order: u32,
        file_no: u32,
        out: &[u8],
        hint: &HintBuilder,
    ) -> Result<D::File> {
        let io = |op| move |e| StoreError::io(op, e);
        let name = segment::log_name(order, file_no);
        let tmp = segment::tmp_name(&name);
        let file = self
            .disk
            .open(&tmp)
            .await
            .map_err(io("creating a compaction output"))?;
        let mut buf = file.alloc(align_up(out.len() as u64) as usize);
        buf.bytes_mut()[..out.len()].copy_from_slice(out);
        file.write_at(buf, 0)
            .await
            .map_err(io("writing a compaction output"))?;
        if let Err(err) = file.sync().await {
            return Err(
                self.latch_failure(format!("fdatasync of a compaction output failed: {err}"))
            );
        }
        self.write_hint(order, file_no, out.len() as u64, hint)
            .await?;
        self.disk
            .rename(&tmp, &name)
            .await
            .map_err(io("renaming a compaction output"))?;
        self.disk
            .sync_dir()
            .await
            .map_err(io("syncing the directory"))?;
        Ok(file)
    }
}
