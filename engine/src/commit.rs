//! Group commit: every record queued while the previous commit was on disk is written
//! with one O_DIRECT write and made durable with one fdatasync, then indexed, cached and
//! acknowledged together.
//!
//! Writes start at the 4 KiB boundary below the segment's logical end and carry the
//! partial block already there (`Active::tail`) followed by the new records, padded with
//! zeroes. Rewriting the tail is safe even if the rewrite tears, because the bytes that
//! were acknowledged are rewritten unchanged. Padding is zero, which recovery reads as
//! "no more records".

use std::rc::Rc;
use std::time::Duration;

use crate::config::Durability;
use crate::disk::{Disk, DiskFile, WriteBuf};
use crate::error::{Result, StoreError};
use crate::hint::HintBuilder;
use crate::index::Location;
use crate::record::{self, Record};
use crate::segment::{self, Segment, align_down, align_up};
use crate::store::{Active, Batch, Store, cache_key};

impl<D: Disk> Store<D> {
    pub(crate) async fn run_commits(&self) {
        loop {
            let Some(batch) = self.next_batch().await else {
                break;
            };
            let result = self.commit(&batch).await;
            if let Err(err) = &result {
                tracing::warn!(records = batch.records.len(), %err, "group commit failed");
            }
            batch.outcome.finish(result);
        }
    }

    async fn next_batch(&self) -> Option<Batch> {
        loop {
            if let Some(batch) = self.inner.borrow_mut().queue.pop_front() {
                return Some(batch);
            }
            if self.closing.get() {
                return None;
            }
            let listener = self.work.listen();
            if !self.inner.borrow().queue.is_empty() || self.closing.get() {
                continue;
            }
            listener.await;
        }
    }

    pub(crate) async fn run_interval_sync(&self, every: Duration) {
        while !self.closing.get() {
            self.disk.sleep(every).await;
            self.disk.yield_now().await;
            if self.inner.borrow().active.unsynced && self.failed.borrow().is_none() {
                // A failure is latched inside; the next write reports it.
                let _ = self.sync_active().await;
            }
        }
    }

    /// Commits `batch`. Segments it fills are sealed (made eligible for compaction) only
    /// once its records are indexed: until then compaction would see them as garbage.
    async fn commit(&self, batch: &Batch) -> Result<()> {
        let first_file = self.inner.borrow().active.file_no;
        let result = self.commit_records(batch).await;
        let mut inner = self.inner.borrow_mut();
        let active = inner.active.file_no;
        for (_, segment) in inner.segments.range_mut(first_file..active) {
            segment.sealed = true;
        }
        result
    }

    async fn commit_records(&self, batch: &Batch) -> Result<()> {
        self.check_writable()?;
        if self.inner.borrow().active.broken {
            self.rotate().await?;
        }
        let segment_size = self.config.segment_size;
        let mut placed = Vec::with_capacity(batch.records.len());
        let mut first = 0;
        while first < batch.records.len() {
            let (file_no, end) = {
                let inner = self.inner.borrow();
                (inner.active.file_no, inner.active.end)
            };
            // The longest run of records, starting at `first`, that fits the segment.
            let run_start = batch.records[first].0;
            let mut last = first;
            let mut run_len = 0u64;
            while let Some((_, header)) = batch.records.get(last) {
                let len = header.record_len() as u64;
                if end + run_len + len > segment_size {
                    break;
                }
                run_len += len;
                last += 1;
            }
            if last == first {
                self.rotate().await?;
                continue;
            }
            let run = &batch.bytes[run_start..run_start + run_len as usize];
            self.write_run(run).await?;
            let mut inner = self.inner.borrow_mut();
            for (start, header) in &batch.records[first..last] {
                let offset = end + (start - run_start) as u64;
                let location = Location {
                    file: file_no,
                    offset: offset as u32,
                    len: header.record_len() as u32,
                };
                let bytes = &batch.bytes[*start..*start + header.record_len()];
                let record = Record::from_checked(Rc::from(bytes), *header);
                let digest = record::version_digest(record.version());
                inner
                    .active
                    .hint
                    .push(header, location, digest, record.key());
                placed.push((location, digest, record, header.kind));
            }
            first = last;
        }
        if self.config.durability == Durability::Sync {
            self.sync_active().await?;
        }
        let mut inner = self.inner.borrow_mut();
        inner.stats.commits += 1;
        inner.stats.committed_records += placed.len() as u64;
        for (location, digest, record, kind) in placed {
            inner.apply(kind, record.partition(), record.key(), location, digest);
            if kind != record::Kind::PartitionDrop {
                inner.cache.insert(cache_key(location), record);
            }
        }
        Ok(())
    }

    /// Appends `run` to the active segment (not yet synced).
    async fn write_run(&self, run: &[u8]) -> Result<()> {
        let (file, at, buf, new_tail) = {
            let inner = self.inner.borrow();
            let active = &inner.active;
            let segment = &inner.segments[&active.file_no];
            let at = align_down(active.end);
            let new_end = active.end + run.len() as u64;
            let mut buf = segment.file.alloc((align_up(new_end) - at) as usize);
            let bytes = buf.bytes_mut();
            bytes[..active.tail.len()].copy_from_slice(&active.tail);
            bytes[active.tail.len()..active.tail.len() + run.len()].copy_from_slice(run);
            let tail_from = (align_down(new_end) - at) as usize;
            let new_tail = bytes[tail_from..(new_end - at) as usize].to_vec();
            (segment.file.clone(), at, buf, new_tail)
        };
        if let Err(err) = file.write_at(buf, at).await {
            self.inner.borrow_mut().active.broken = true;
            return Err(StoreError::io("writing a segment", err));
        }
        let mut inner = self.inner.borrow_mut();
        let active = &mut inner.active;
        active.end += run.len() as u64;
        active.tail = new_tail;
        active.unsynced = true;
        let (file_no, end) = (active.file_no, active.end);
        inner
            .segments
            .get_mut(&file_no)
            .expect("active segment is tracked")
            .len = end;
        Ok(())
    }

    /// fdatasync of the active segment. A failure is latched: see `StoreError::Failed`.
    pub(crate) async fn sync_active(&self) -> Result<()> {
        let file = {
            let inner = self.inner.borrow();
            if !inner.active.unsynced {
                return Ok(());
            }
            inner.segments[&inner.active.file_no].file.clone()
        };
        self.check_not_failed()?;
        if let Err(err) = file.sync().await {
            return Err(
                self.latch_failure(format!("fdatasync of the active segment failed: {err}"))
            );
        }
        let mut inner = self.inner.borrow_mut();
        inner.stats.syncs += 1;
        inner.active.unsynced = false;
        Ok(())
    }

    fn check_not_failed(&self) -> Result<()> {
        match self.failed.borrow().as_ref() {
            Some(reason) => Err(StoreError::Failed(reason.clone())),
            None => Ok(()),
        }
    }

    pub(crate) fn latch_failure(&self, reason: String) -> StoreError {
        tracing::error!(%reason, "store failed; refusing writes until reopened");
        // Keep the first failure: it is the one that explains the state of the disk.
        let first = self.failed.borrow_mut().get_or_insert(reason).clone();
        StoreError::Failed(first)
    }

    /// Seals the active segment (sync, hint file) and starts a new one.
    pub(crate) async fn rotate(&self) -> Result<()> {
        let broken = self.inner.borrow().active.broken;
        if !broken {
            self.sync_active().await?;
        }
        let (order, file_no, end, hint) = {
            let mut inner = self.inner.borrow_mut();
            let active = &mut inner.active;
            (
                active.order,
                active.file_no,
                active.end,
                std::mem::take(&mut active.hint),
            )
        };
        // A hint file only speeds up recovery; without one the segment is scanned.
        // A broken segment gets one too: it pins the logical end below any garbage a
        // failed write left behind.
        if let Err(err) = self.write_hint(order, file_no, end, &hint).await {
            tracing::warn!(%err, order, file_no, "could not write hint file; recovery will scan");
        }
        self.start_segment().await
    }

    /// Creates the next segment (durably: the directory is synced) and makes it active.
    pub(crate) async fn start_segment(&self) -> Result<()> {
        let number = self.inner.borrow().next_number;
        let file = self
            .disk
            .open(&segment::log_name(number, number))
            .await
            .map_err(|e| StoreError::io("creating a segment", e))?;
        self.disk
            .sync_dir()
            .await
            .map_err(|e| StoreError::io("syncing the directory", e))?;
        let mut inner = self.inner.borrow_mut();
        inner.next_number = number + 1;
        inner.segments.insert(
            number,
            Segment {
                order: number,
                file_no: number,
                file: Rc::new(file),
                len: 0,
                live_bytes: 0,
                sealed: false,
            },
        );
        inner.active = Active::new(number);
        Ok(())
    }

    /// Writes `seg-<order>-<file>.hint` durably (through a temporary file and a rename;
    /// the directory sync that follows the next segment creation makes the name durable).
    pub(crate) async fn write_hint(
        &self,
        order: u32,
        file_no: u32,
        segment_len: u64,
        hint: &HintBuilder,
    ) -> Result<()> {
        let name = segment::hint_name(order, file_no);
        let tmp = segment::tmp_name(&name);
        let encoded = hint.encode(order, file_no, segment_len);
        let file = self
            .disk
            .open(&tmp)
            .await
            .map_err(|e| StoreError::io("creating a hint file", e))?;
        let mut buf = file.alloc(align_up(encoded.len() as u64) as usize);
        buf.bytes_mut()[..encoded.len()].copy_from_slice(&encoded);
        file.write_at(buf, 0)
            .await
            .map_err(|e| StoreError::io("writing a hint file", e))?;
        file.sync()
            .await
            .map_err(|e| StoreError::io("syncing a hint file", e))?;
        self.disk
            .rename(&tmp, &name)
            .await
            .map_err(|e| StoreError::io("renaming a hint file", e))?;
        Ok(())
    }
}

impl Active {
    pub(crate) fn new(file_no: u32) -> Active {
        Active {
            file_no,
            order: file_no,
            end: 0,
            tail: Vec::new(),
            hint: HintBuilder::default(),
            unsynced: false,
            broken: false,
        }
    }
}
