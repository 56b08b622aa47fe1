//! Group commit: every record queued while the previous commit was on disk is written
//! with one O_DIRECT write and made durable with one fdatasync, then indexed, cached and
//! acknowledged together.
//!
//! Writes start at the 4 KiB boundary below the segment's logical end and carry the
//! partial block already there (`Active::tail`) followed by the new records, padded with
//! zeroes. Rewriting the tail is safe even if the rewrite tears, because the bytes that
//! were acknowledged are rewritten unchanged. Padding is zero, which recovery reads as
//! "no more records".
//!
//! A batch is written whole into one segment (configuration guarantees it fits a fresh
//! one), so it is never half in one segment and half lost. A write that fails is cut
//! back (the tail block rewritten, the file truncated at the old end, synced), so none
//! of its records can be replayed at restart; if even that fails, the store fails stop.
//!
//! Async rule for everything here: a resource taken from shared state (a segment
//! number, the hint builder, the "synced up to" mark) is reserved or captured before
//! the first `.await` and committed after it, never read before and trusted after.

use std::rc::Rc;
use std::time::Duration;

use crate::config::{ALIGN, Durability};
use crate::disk::{Disk, DiskFile, WriteBuf};
use crate::error::{Result, StoreError};
use crate::hint::HintBuilder;
use crate::index::Location;
use crate::record::{self, Header, Kind, Record};
use crate::segment::{self, Segment, align_down, align_up};
use crate::store::{Active, Batch, Store};

/// One committed record, ready to be indexed.
struct Placed {
    header: Header,
    location: Location,
    digest: u32,
    record: Record,
    kind: Kind,
}

impl<D: Disk> Store<D> {
    pub(crate) async fn run_commits(&self) {
        loop {
            let Some(batch) = self.next_batch().await else {
                break;
            };
            let result = self.commit(&batch).await;
            if let Err(err) = &result {
                self.inner.borrow_mut().stats.failed_commits += 1;
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

    /// Interval mode: an fdatasync at most `every` after the oldest unsynced write, so a
    /// power loss loses at most one interval (plus one fdatasync) of acknowledged writes.
    pub(crate) async fn run_interval_sync(&self, every: Duration) {
        while !self.closing.get() {
            // Sleep until the oldest unsynced write is one interval old; with nothing
            // unsynced, a whole interval (a write meanwhile is younger than the wake-up).
            let due = self.inner.borrow().active.unsynced_since.map(|t| t + every);
            let now = self.disk.now();
            match due {
                Some(due) if due <= now => {
                    if self.failed.borrow().is_some() {
                        // Latched: the next write reports it; nothing more to sync.
                        self.sleep_unless_closing(every).await;
                    } else {
                        let _ = self.sync_active().await;
                    }
                }
                Some(due) => self.sleep_unless_closing(due - now).await,
                None => self.sleep_unless_closing(every).await,
            }
            self.disk.yield_now().await;
        }
    }

    /// Writes `batch` into the active segment (rotating first if it does not fit),
    /// syncs it in `sync` mode, then indexes and caches its records.
    async fn commit(&self, batch: &Batch) -> Result<()> {
        // Not check_writable: a batch queued before close began is still committed.
        self.check_not_failed()?;
        let batch_len = batch.bytes.len() as u64;
        let fits = {
            let inner = self.inner.borrow();
            inner.active.end + batch_len <= self.config.segment_size
        };
        if !fits {
            self.rotate().await?;
        }
        let placed = self.write_batch(batch).await?;
        if self.config.durability == Durability::Sync {
            self.sync_active().await?;
        }
        let mut inner = self.inner.borrow_mut();
        inner.stats.commits += 1;
        inner.stats.committed_records += placed.len() as u64;
        for p in placed {
            inner.apply(
                p.kind,
                p.record.partition(),
                p.record.key(),
                p.location,
                p.digest,
            );
            if p.kind != Kind::PartitionDrop {
                inner.cache_record(p.location, p.record);
            }
        }
        Ok(())
    }

    /// Appends the batch to the active segment (not yet synced): seals every record for
    /// the offset it lands at, writes them with the tail block in one write, and on
    /// success extends the segment and its hint builder.
    async fn write_batch(&self, batch: &Batch) -> Result<Vec<Placed>> {
        let (file, file_no, end, at, buf, new_tail, placed) = {
            let inner = self.inner.borrow();
            let active = &inner.active;
            let segment = &inner.segments[&active.file_no];
            let at = align_down(active.end);
            let new_end = active.end + batch.bytes.len() as u64;
            assert!(
                new_end <= self.config.segment_size,
                "a batch overran its segment"
            );
            let mut buf = segment.file.alloc((align_up(new_end) - at) as usize);
            let bytes = buf.bytes_mut();
            let tail_len = active.tail.len();
            bytes[..tail_len].copy_from_slice(&active.tail);
            bytes[tail_len..tail_len + batch.bytes.len()].copy_from_slice(&batch.bytes);
            let mut placed = Vec::with_capacity(batch.records.len());
            for (start, header) in &batch.records {
                let offset = active.end + *start as u64;
                let in_buf = (offset - at) as usize;
                let record_bytes = &mut bytes[in_buf..in_buf + header.record_len()];
                record::seal(record_bytes, record::position_seed(active.salt, offset));
                let record = Record::from_checked(Rc::from(&record_bytes[..]), *header);
                placed.push(Placed {
                    header: *header,
                    location: Location {
                        file: active.file_no,
                        offset: offset as u32,
                        len: header.record_len() as u32,
                    },
                    digest: record::version_digest(record.version()),
                    record,
                    kind: header.kind,
                });
            }
            let tail_from = (align_down(new_end) - at) as usize;
            let new_tail = bytes[tail_from..(new_end - at) as usize].to_vec();
            (
                segment.file.clone(),
                active.file_no,
                active.end,
                at,
                buf,
                new_tail,
                placed,
            )
        };
        if let Err(err) = file.write_at(buf, at).await {
            let err = StoreError::io("writing a segment", err);
            self.cut_back(&file, end).await?;
            return Err(err);
        }
        let now = self.disk.now();
        let mut inner = self.inner.borrow_mut();
        // Only the commit task writes, and rotation runs inside it: the segment is the
        // one the batch was placed in.
        assert_eq!(
            inner.active.file_no, file_no,
            "the active segment changed under a write"
        );
        let new_end = end + batch.bytes.len() as u64;
        let active = &mut inner.active;
        active.end = new_end;
        active.tail = new_tail;
        active.unsynced_since.get_or_insert(now);
        for p in &placed {
            active
                .hint
                .push(&p.header, p.location, p.digest, p.record.key());
        }
        inner
            .segments
            .get_mut(&file_no)
            .expect("active segment is tracked")
            .len = new_end;
        Ok(placed)
    }

    /// Undoes a failed write to the active segment, whose logical end is `end`: the
    /// block holding the tail is rewritten as it was (zeroes after `end`), the file is
    /// truncated at the next boundary and synced. Records the failed write may have
    /// left on disk can then never be replayed. If this fails too, nothing can be said
    /// about the disk: the store fails stop.
    async fn cut_back(&self, file: &D::File, end: u64) -> Result<()> {
        let tail = self.inner.borrow().active.tail.clone();
        let result = async {
            if !tail.is_empty() {
                let mut block = file.alloc(ALIGN as usize);
                block.bytes_mut()[..tail.len()].copy_from_slice(&tail);
                file.write_at(block, align_down(end)).await?;
            }
            file.truncate(align_up(end)).await?;
            file.sync().await
        }
        .await;
        match result {
            Ok(()) => {
                let mut inner = self.inner.borrow_mut();
                inner.stats.syncs += 1;
                if inner.active.end == end {
                    inner.active.synced_end = end;
                    inner.active.unsynced_since = None;
                }
                Ok(())
            }
            Err(err) => Err(self.latch_failure(format!(
                "a failed segment write could not be cut back: {err}"
            ))),
        }
    }

    /// fdatasync of the active segment up to its current end. A failure is latched:
    /// see `StoreError::Failed`. What the sync covers is captured before it is issued,
    /// so a write that completes while it runs stays unsynced.
    pub(crate) async fn sync_active(&self) -> Result<()> {
        let (file, file_no, end) = {
            let mut inner = self.inner.borrow_mut();
            let active = &mut inner.active;
            if active.synced_end >= active.end {
                active.unsynced_since = None;
                return Ok(());
            }
            let (file_no, end) = (active.file_no, active.end);
            (inner.segments[&file_no].file.clone(), file_no, end)
        };
        self.check_not_failed()?;
        let issued = self.disk.now();
        if let Err(err) = file.sync().await {
            return Err(
                self.latch_failure(format!("fdatasync of the active segment failed: {err}"))
            );
        }
        let mut inner = self.inner.borrow_mut();
        inner.stats.syncs += 1;
        // A segment sealed meanwhile was synced by its rotation.
        if inner.active.file_no == file_no {
            let active = &mut inner.active;
            active.synced_end = active.synced_end.max(end);
            // Writes that completed while the sync ran are no older than its issue.
            active.unsynced_since = (active.synced_end < active.end).then_some(issued);
        }
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

    /// A directory sync whose failure latches the store like a failed fdatasync: a
    /// creation, rename or removal it should have made durable may be lost.
    pub(crate) async fn sync_dir(&self) -> Result<()> {
        self.check_not_failed()?;
        match self.disk.sync_dir().await {
            Ok(()) => Ok(()),
            Err(err) => Err(self.latch_failure(format!("directory fsync failed: {err}"))),
        }
    }

    /// Seals the active segment (fdatasync, hint file) and makes a new one active. If
    /// the new segment cannot be made, the old one stays active, its hint builder
    /// intact, and the error is returned.
    pub(crate) async fn rotate(&self) -> Result<()> {
        self.sync_active().await?;
        let (segment, active) = self.create_segment().await?;
        let old = {
            let mut inner = self.inner.borrow_mut();
            let old = std::mem::replace(&mut inner.active, active);
            // Every record of the old segment was indexed by the commit that wrote it.
            inner
                .segments
                .get_mut(&old.file_no)
                .expect("active segment is tracked")
                .sealed = true;
            inner.segments.insert(segment.file_no, segment);
            old
        };
        let salt = self.inner.borrow().segments[&old.file_no].salt;
        // A hint file only speeds up recovery; without one the segment is scanned.
        if let Err(err) = self
            .write_hint(old.order, old.file_no, old.end, salt, &old.hint)
            .await
        {
            tracing::warn!(%err, old.order, old.file_no, "could not write hint file; recovery will scan");
        }
        Ok(())
    }

    /// Takes the next file number (before anything awaits, so no other task can take
    /// it too).
    pub(crate) fn reserve_number(&self) -> u32 {
        let mut inner = self.inner.borrow_mut();
        let number = inner.next_number;
        inner.next_number = number.checked_add(1).expect("segment numbers exhausted");
        number
    }

    /// Creates a new segment durably (header block written and synced, directory
    /// synced), not yet tracked or active. A failure removes what was created.
    pub(crate) async fn create_segment(&self) -> Result<(Segment<D::File>, Active)> {
        let number = self.reserve_number();
        let name = segment::log_name(number, number);
        let file = self
            .disk
            .open(&name)
            .await
            .map_err(|e| StoreError::io("creating a segment", e))?;
        let salt = self.disk.fresh_salt();
        let written = async {
            let mut block = file.alloc(segment::HEADER_LEN as usize);
            segment::encode_header(number, number, salt, block.bytes_mut());
            file.write_at(block, 0)
                .await
                .map_err(|e| StoreError::io("writing a segment header", e))?;
            file.sync()
                .await
                .map_err(|e| self.latch_failure(format!("fdatasync of a new segment failed: {e}")))
        }
        .await;
        if let Err(err) = written {
            if let Err(e) = self.disk.remove(&name).await {
                tracing::warn!(%e, name, "could not remove a segment that failed to start");
            }
            return Err(err);
        }
        self.sync_dir().await?;
        let segment = Segment {
            order: number,
            file_no: number,
            file: Rc::new(file),
            salt,
            len: segment::HEADER_LEN,
            live_bytes: 0,
            sealed: false,
        };
        Ok((segment, Active::new(number, salt)))
    }

    /// Creates the first active segment of an opened store.
    pub(crate) async fn start_segment(&self) -> Result<()> {
        let (segment, active) = self.create_segment().await?;
        let mut inner = self.inner.borrow_mut();
        inner.segments.insert(segment.file_no, segment);
        inner.active = active;
        Ok(())
    }

    /// Writes `seg-<order>-<file>.hint` durably (through a temporary file and a rename;
    /// the directory sync that follows the next segment creation makes the name durable).
    /// A failure removes the temporary file.
    pub(crate) async fn write_hint(
        &self,
        order: u32,
        file_no: u32,
        segment_len: u64,
        salt: u64,
        hint: &HintBuilder,
    ) -> Result<()> {
        let name = segment::hint_name(order, file_no);
        let tmp = segment::tmp_name(&name);
        let encoded = hint.encode(order, file_no, segment_len, salt);
        let result = async {
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
                .map_err(|e| StoreError::io("renaming a hint file", e))
        }
        .await;
        if result.is_err() {
            self.remove_quietly(&tmp).await;
        }
        result
    }

    /// Removes a file that may not exist, logging (not returning) any other failure.
    pub(crate) async fn remove_quietly(&self, name: &str) {
        match self.disk.remove(name).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(%e, name, "could not remove a file");
            }
            _ => {}
        }
    }
}

impl Active {
    pub(crate) fn new(file_no: u32, salt: u64) -> Active {
        Active {
            file_no,
            order: file_no,
            salt,
            end: segment::HEADER_LEN,
            synced_end: segment::HEADER_LEN,
            unsynced_since: None,
            tail: Vec::new(),
            hint: HintBuilder::default(),
        }
    }
}
