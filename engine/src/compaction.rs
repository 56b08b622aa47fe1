//! Compaction: rewrite a sealed segment whose garbage ratio passed the threshold,
//! keeping only the records the index still points at.
//!
//! The output keeps the segment's *order* under a new file number, so the recovery rule
//! (higher order wins, then later offset) still holds: every record a rewrite keeps was
//! the newest of its key when it was copied, and anything written since lives in a
//! higher order. Steps, each crash-safe: judge liveness, fdatasync the active segment
//! (so that every record that made an old one garbage is durable before the old one can
//! disappear), write `<new>.log.tmp`, fdatasync, write its hint, rename into place, sync
//! the directory, re-point the index, then delete the old files. A crash before the
//! rename leaves a temporary file (removed at open); after it, two files share the order
//! and recovery keeps the higher file number.
//!
//! Corruption: a record the index still points at but that fails its checksum cannot be
//! copied. Its key gets a `Lost` marker in the output instead (a live partition-drop
//! marker is written afresh), so the key reads as missing here, replication repairs it,
//! and no older record of it can come back at the next recovery.

use std::rc::Rc;
use std::time::Duration;

use crate::disk::{Disk, DiskFile, WriteBuf};
use crate::error::{Result, StoreError};
use crate::hint::HintBuilder;
use crate::index::Location;
use crate::record::{self, Header, Kind};
use crate::scan::{self, Found};
use crate::segment::{self, Segment, align_up};
use crate::store::Store;

/// What one compaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionReport {
    pub order: u32,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub records_kept: usize,
    /// Live records found corrupt and replaced by lost markers.
    pub records_lost: usize,
}

/// Records checked for liveness between yields to foreground work.
const RECORDS_PER_YIELD: usize = 512;

/// A record of the output: where its original was, and where its copy goes.
struct Kept {
    old: Location,
    new: Location,
    /// The copy's header (a lost marker's, for a record that was corrupt).
    header: Header,
    lost: bool,
}

/// The output being assembled: header block, then records sealed for their place.
struct Output {
    file_no: u32,
    salt: u64,
    bytes: Vec<u8>,
    hint: HintBuilder,
    kept: Vec<Kept>,
}

impl Output {
    fn new(order: u32, file_no: u32, salt: u64) -> Output {
        let mut bytes = vec![0u8; segment::HEADER_LEN as usize];
        segment::encode_header(order, file_no, salt, &mut bytes);
        Output {
            file_no,
            salt,
            bytes,
            hint: HintBuilder::default(),
            kept: Vec::new(),
        }
    }

    fn has_records(&self) -> bool {
        !self.kept.is_empty()
    }

    /// Appends `record` (exactly one record, whose header is `header`), resealed for
    /// its new offset, in place of the original at `old`.
    fn push(&mut self, old: Location, header: Header, record: &[u8], lost: bool) {
        let offset = self.bytes.len() as u64;
        self.bytes.extend_from_slice(record);
        let copy = &mut self.bytes[offset as usize..];
        record::seal(copy, record::position_seed(self.salt, offset));
        let (key, version, _) = record::split(copy, &header);
        let new = Location {
            file: self.file_no,
            offset: offset as u32,
            len: record.len() as u32,
        };
        self.hint
            .push(&header, new, record::version_digest(version), key);
        self.kept.push(Kept {
            old,
            new,
            header,
            lost,
        });
    }

    /// Copies the planned records into the output in the order their originals had in
    /// the segment (a partition-drop marker must stay before the records of its
    /// partition written after it).
    fn fill(&mut self, mut planned: Vec<Planned>, data: &[u8]) {
        planned.sort_by_key(|p| p.old.offset);
        for p in planned {
            let bytes = match &p.marker {
                None => &data[p.old.offset as usize..][..p.old.len as usize],
                Some(marker) => &marker[..],
            };
            self.push(p.old, p.header, bytes, p.header.kind == Kind::Lost);
        }
    }
}

/// A record the output will hold: a copy of the original at `old`, or a fresh marker
/// (Lost, or a rewritten partition drop) standing in for a corrupt original there.
struct Planned {
    old: Location,
    header: Header,
    marker: Option<Vec<u8>>,
}

impl Planned {
    fn copy(old: Location, header: Header) -> Planned {
        Planned {
            old,
            header,
            marker: None,
        }
    }

    fn marker(old: Location, kind: Kind, partition: u32, key: &[u8]) -> Planned {
        let mut marker = Vec::new();
        record::encode_unsealed(&mut marker, kind, partition, key, &[], &[]);
        Planned {
            old,
            header: record::unsealed_header(&marker),
            marker: Some(marker),
        }
    }
}

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
            self.sleep_unless_closing(idle).await;
            self.disk.yield_now().await;
        }
    }

    /// Compacts the sealed segment with the most garbage, if one passes the threshold
    /// (a sealed segment without records always does).
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
            .filter(|s| s.sealed && s.garbage_ratio() >= threshold)
            .max_by(|a, b| a.garbage_ratio().total_cmp(&b.garbage_ratio()))
            .map(|s| s.file_no)
    }

    async fn compact_segment(&self, file_no: u32) -> Result<CompactionReport> {
        self.check_writable()?;
        let (order, file, len, salt) = {
            let inner = self.inner.borrow();
            let s = &inner.segments[&file_no];
            (s.order, s.file.clone(), s.len, s.salt)
        };
        let data = file
            .read_at(0, len as usize)
            .await
            .map_err(|e| StoreError::io("reading a segment to compact", e))?;
        let mut candidates: Vec<(u64, Header)> = Vec::new();
        let mut damaged: Vec<(u64, u64)> = Vec::new();
        scan::scan(&data, salt, |found| match found {
            Found::Record { offset, header, .. } => candidates.push((offset, header)),
            Found::Damaged { offset, len } => damaged.push((offset, len)),
        });
        // The scan stops at the first bytes it cannot read past; whatever the segment
        // held beyond them is damaged too.
        let scanned_end = candidates
            .last()
            .map_or(segment::HEADER_LEN, |(o, h)| o + h.record_len() as u64);
        if scanned_end < len {
            damaged.push((scanned_end, len - scanned_end));
        }
        if !damaged.is_empty() {
            self.inner.borrow_mut().stats.corrupt_regions_found += damaged.len() as u64;
            tracing::warn!(
                file_no,
                regions = damaged.len(),
                "compaction found damaged records in a sealed segment"
            );
        }

        let new_no = self.reserve_number();
        let mut out = Output::new(order, new_no, self.disk.fresh_salt());
        // A collected tombstone may go only from the oldest segment: with nothing older
        // on disk, no earlier record of its key can come back at recovery.
        let oldest = self.inner.borrow().segments.values().map(|s| s.order).min() == Some(order);
        let mut dropped_tombstones = Vec::new();
        let mut planned = Vec::new();
        for chunk in candidates.chunks(RECORDS_PER_YIELD) {
            {
                let inner = self.inner.borrow();
                for &(offset, header) in chunk {
                    let bytes = &data[offset as usize..offset as usize + header.record_len()];
                    let (key, _, _) = record::split(bytes, &header);
                    let old = Location {
                        file: file_no,
                        offset: offset as u32,
                        len: bytes.len() as u32,
                    };
                    let live = match header.kind {
                        Kind::PartitionDrop => inner.drops.get(&header.partition) == Some(&old),
                        Kind::Value | Kind::Tombstone | Kind::Lost => inner
                            .index
                            .get(header.partition, key)
                            .is_some_and(|e| e.location == old),
                    };
                    if !live && inner.collected.contains_key(&old) {
                        if oldest {
                            dropped_tombstones.push(old);
                        } else {
                            planned.push(Planned::copy(old, header));
                        }
                        continue;
                    }
                    if live {
                        planned.push(Planned::copy(old, header));
                    }
                }
            }
            self.disk.yield_now().await;
        }
        let records_lost = if damaged.is_empty() {
            0
        } else {
            self.mark_lost_records(file_no, &damaged, &mut planned)
                .await
        };
        out.fill(planned, &data);

        // Whatever made the dropped records garbage must be durable before the output
        // can replace the segment that holds them.
        self.sync_active().await?;
        let new_file = if out.has_records() {
            Some(self.write_compacted(order, &out).await?)
        } else {
            None
        };
        self.repoint(
            file_no,
            order,
            &out,
            new_file,
            records_lost,
            &dropped_tombstones,
        );
        self.remove_quietly(&segment::hint_name(order, file_no))
            .await;
        if let Err(err) = self.disk.remove(&segment::log_name(order, file_no)).await {
            // The segment is no longer tracked: left on disk, its dead records would be
            // replayed at the next open, and a collected tombstone judged to be in the
            // oldest segment might no longer shadow them. Fail stop instead.
            return Err(self.latch_failure(format!("removing a compacted segment failed: {err}")));
        }
        self.sync_dir().await?;
        self.ensure_reserve().await;
        Ok(CompactionReport {
            order,
            bytes_before: len - segment::HEADER_LEN,
            bytes_after: if out.has_records() {
                out.bytes.len() as u64 - segment::HEADER_LEN
            } else {
                0
            },
            records_kept: out.kept.len() - records_lost,
            records_lost,
        })
    }

    /// The slow path, taken only when a segment holds damage: finds the index entries,
    /// collected tombstones and partition-drop markers that still point into a damaged
    /// region of `file_no` and plans markers for them. Returns the keys marked lost.
    async fn mark_lost_records(
        &self,
        file_no: u32,
        damaged: &[(u64, u64)],
        planned: &mut Vec<Planned>,
    ) -> usize {
        let inside = |location: Location| {
            location.file == file_no
                && damaged.iter().any(|&(offset, len)| {
                    (offset..offset + len).contains(&(location.offset as u64))
                })
        };
        let partitions = self.partitions();
        let mut lost = 0;
        for partition in partitions {
            let found: Vec<(Vec<u8>, Location)> = {
                let inner = self.inner.borrow();
                let Some(index) = inner.index.partition(partition) else {
                    continue;
                };
                index
                    .iter()
                    .filter(|(_, e)| inside(e.location))
                    .map(|(key, e)| (key.to_vec(), e.location))
                    .collect()
            };
            for (key, old) in found {
                tracing::warn!(
                    partition,
                    file_no,
                    old.offset,
                    "record lost to corruption; the key reads as missing here until repaired"
                );
                planned.push(Planned::marker(old, Kind::Lost, partition, &key));
                lost += 1;
            }
            self.disk.yield_now().await;
        }
        // A collected tombstone still shadows older records of its key: a lost marker,
        // which shadows them too, takes its place (and stays collected).
        let collected: Vec<(Location, u32, Vec<u8>)> = {
            let inner = self.inner.borrow();
            inner
                .collected
                .iter()
                .filter(|(at, _)| inside(**at))
                .map(|(at, (p, key))| (*at, *p, key.clone()))
                .collect()
        };
        for (old, partition, key) in collected {
            planned.push(Planned::marker(old, Kind::Lost, partition, &key));
        }
        let drops: Vec<(u32, Location)> = {
            let inner = self.inner.borrow();
            inner
                .drops
                .iter()
                .filter(|(_, at)| inside(**at))
                .map(|(p, at)| (*p, *at))
                .collect()
        };
        for (partition, old) in drops {
            planned.push(Planned::marker(old, Kind::PartitionDrop, partition, &[]));
        }
        lost
    }

    /// Points the index at the copies that are still the newest of their key, and
    /// forgets the compacted segment. Runs without awaiting, so no write interleaves.
    fn repoint(
        &self,
        file_no: u32,
        order: u32,
        out: &Output,
        new_file: Option<D::File>,
        records_lost: usize,
        dropped_tombstones: &[Location],
    ) {
        let mut inner = self.inner.borrow_mut();
        for old in dropped_tombstones {
            if inner.collected.remove(old).is_some() {
                inner.stats.collected_tombstones_dropped += 1;
                let segment = inner
                    .segments
                    .get_mut(&file_no)
                    .expect("compacted segment tracked");
                segment.live_bytes -= old.len as u64;
            }
        }
        if let Some(new_file) = new_file {
            inner.segments.insert(
                out.file_no,
                Segment {
                    order,
                    file_no: out.file_no,
                    file: Rc::new(new_file),
                    salt: out.salt,
                    len: out.bytes.len() as u64,
                    live_bytes: 0,
                    sealed: true,
                },
            );
        }
        for kept in &out.kept {
            let copy = &out.bytes[kept.new.offset as usize..][..kept.new.len as usize];
            let (key, _, _) = record::split(copy, &kept.header);
            // A tombstone collected meanwhile (even while its marker was being planned)
            // moves in the collected set; everything else in the index or drops.
            if let Some(collected) = inner.collected.remove(&kept.old) {
                inner.collected.insert(kept.new, collected);
                inner.move_live(kept.old, kept.new);
                continue;
            }
            let moved = match kept.header.kind {
                Kind::PartitionDrop => match inner.drops.get_mut(&kept.header.partition) {
                    Some(at) if *at == kept.old => {
                        *at = kept.new;
                        true
                    }
                    _ => false,
                },
                Kind::Value | Kind::Tombstone | Kind::Lost => {
                    let before = inner.index.relocate(
                        kept.header.partition,
                        key,
                        kept.old,
                        kept.new,
                        kept.lost,
                    );
                    // A cached record follows its copy; one replaced by a lost marker
                    // leaves the cache (the entry no longer names a slot).
                    if let Some(slot) = before.and_then(|b| b.cache_slot) {
                        if kept.lost {
                            inner.cache.free(slot);
                        } else {
                            inner.cache.retag(slot, kept.old, kept.new);
                        }
                    }
                    before.is_some()
                }
            };
            if moved {
                inner.move_live(kept.old, kept.new);
            }
        }
        let old = inner
            .segments
            .remove(&file_no)
            .expect("compacted segment tracked");
        // Every live record was copied or marked lost; anything else is a bug here.
        assert_eq!(
            old.live_bytes, 0,
            "a live record was left behind in a compacted segment"
        );
        let bytes_after = if out.has_records() {
            out.bytes.len() as u64
        } else {
            segment::HEADER_LEN
        };
        inner.stats.compactions += 1;
        inner.stats.records_lost += records_lost as u64;
        inner.stats.compacted_bytes_reclaimed += old.len.saturating_sub(bytes_after);
        if !out.has_records() && old.record_bytes() == 0 {
            inner.stats.empty_segments_removed += 1;
        }
    }
}

impl<D: Disk> Store<D> {
    /// Writes the output under a temporary name, syncs it, writes its hint, renames it
    /// into place and syncs the directory. On a full disk it gives up the reserve and
    /// tries once more. A failure removes the temporary file.
    async fn write_compacted(&self, order: u32, out: &Output) -> Result<D::File> {
        let name = segment::log_name(order, out.file_no);
        let tmp = segment::tmp_name(&name);
        let mut result = self.write_output(&tmp, &out.bytes).await;
        if matches!(result, Err(StoreError::DiskFull { .. })) && self.release_reserve().await {
            result = self.write_output(&tmp, &out.bytes).await;
        }
        let file = match result {
            Ok(file) => file,
            Err(err) => {
                self.remove_quietly(&tmp).await;
                return Err(err);
            }
        };
        let len = out.bytes.len() as u64;
        if let Err(err) = self
            .write_hint(order, out.file_no, len, out.salt, &out.hint)
            .await
        {
            tracing::warn!(%err, order, out.file_no, "could not write a compaction output's hint; recovery will scan");
        }
        if let Err(err) = self.disk.rename(&tmp, &name).await {
            self.remove_quietly(&tmp).await;
            self.remove_quietly(&segment::hint_name(order, out.file_no))
                .await;
            return Err(StoreError::io("renaming a compaction output", err));
        }
        self.sync_dir().await?;
        Ok(file)
    }

    async fn write_output(&self, tmp: &str, bytes: &[u8]) -> Result<D::File> {
        let file = self
            .disk
            .open(tmp)
            .await
            .map_err(|e| StoreError::io("creating a compaction output", e))?;
        let mut buf = file.alloc(align_up(bytes.len() as u64) as usize);
        buf.bytes_mut()[..bytes.len()].copy_from_slice(bytes);
        file.write_at(buf, 0)
            .await
            .map_err(|e| StoreError::io("writing a compaction output", e))?;
        if let Err(err) = file.sync().await {
            return Err(
                self.latch_failure(format!("fdatasync of a compaction output failed: {err}"))
            );
        }
        Ok(file)
    }

    /// Removes the reserve so compaction can use its space; false if there was none.
    async fn release_reserve(&self) -> bool {
        if !self.inner.borrow().reserve {
            return false;
        }
        match self.disk.remove(segment::RESERVE_NAME).await {
            Ok(()) => {
                self.inner.borrow_mut().reserve = false;
                tracing::warn!("disk full: compaction is using its reserved space");
                true
            }
            Err(err) => {
                tracing::warn!(%err, "could not release the compaction reserve");
                false
            }
        }
    }

    /// Takes the reserve (one segment of allocated space) if it is configured and not
    /// held; on a full disk it stays released and is tried again after the next
    /// compaction.
    pub(crate) async fn ensure_reserve(&self) {
        if !self.config.compaction_reserve || self.inner.borrow().reserve {
            return;
        }
        let result = async {
            let file = self.disk.open(segment::RESERVE_NAME).await?;
            file.allocate(self.config.segment_size).await
        }
        .await;
        match result {
            Ok(()) => self.inner.borrow_mut().reserve = true,
            Err(err) => {
                tracing::warn!(%err, "could not reserve space for compaction");
                self.remove_quietly(segment::RESERVE_NAME).await;
            }
        }
    }
}
