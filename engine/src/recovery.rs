//! Opening a store: rebuild the index from hint files and segment scans, clean up what
//! an interrupted compaction or hint write left behind, and start a fresh segment.
//!
//! Segments are replayed in order; within a segment, records in offset order. The last
//! record of a key wins, and a partition-drop marker forgets every earlier record of its
//! partition. A segment without a usable hint (the one that was active when the process
//! died, usually) is scanned: its torn tail is cut, corrupt records are skipped and
//! counted, and a hint is written for next time. New writes always go to a new segment,
//! so a segment that was cut is never appended to, and a later recovery reaches the same
//! verdict about it.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use event_listener::Event;
use hashbrown::HashMap;

use crate::config::StoreConfig;
use crate::disk::{Disk, DiskFile};
use crate::error::{Result, StoreError};
use crate::hint::{self, HintBuilder};
use crate::index::{Index, Location};
use crate::keylock::KeyLocks;
use crate::record;
use crate::scan;
use crate::segment::{self, FileKind, Segment};
use crate::store::{Active, Cache, Inner, RecordWeighter, Stats, Store};

impl<D: Disk> Store<D> {
    /// Opens (or creates) the store in `disk`.
    pub async fn open(disk: D, config: StoreConfig) -> Result<Rc<Store<D>>> {
        config.validate()?;
        let io = |op| move |e| StoreError::io(op, e);
        let mut logs: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        let mut hints = std::collections::BTreeSet::new();
        for name in disk
            .list()
            .await
            .map_err(io("listing the store directory"))?
        {
            match segment::classify(&name) {
                FileKind::Log { order, file_no } => logs.entry(order).or_default().push(file_no),
                FileKind::Hint { order, file_no } => {
                    hints.insert((order, file_no));
                }
                // Left by an interrupted compaction or hint write; never renamed into place.
                FileKind::Temporary => disk
                    .remove(&name)
                    .await
                    .map_err(io("removing a temporary file"))?,
                FileKind::Unknown => {}
            }
        }
        let mut inner = Inner {
            index: Index::default(),
            segments: BTreeMap::new(),
            active: Active::new(0),
            next_number: 1,
            drops: HashMap::new(),
            queue: VecDeque::new(),
            cache: Cache::with_weighter(
                (config.cache_bytes / 256).max(16) as usize,
                config.cache_bytes,
                RecordWeighter,
            ),
            stats: Stats::default(),
        };
        for &(order, file_no) in &hints {
            inner.next_number = inner.next_number.max(order + 1).max(file_no + 1);
            if !logs.get(&order).is_some_and(|f| f.contains(&file_no)) {
                // A compaction wrote this hint but died before renaming its segment in.
                disk.remove(&segment::hint_name(order, file_no))
                    .await
                    .map_err(io("removing an orphan hint"))?;
            }
        }
        let mut needs_hint = Vec::new();
        for (order, mut file_nos) in logs {
            file_nos.sort_unstable();
            // Compaction renames its complete output into place before removing the
            // segment it replaces, so the highest file number of an order is complete.
            let file_no = file_nos.pop().expect("an order has at least one file");
            for stale in file_nos {
                disk.remove(&segment::log_name(order, stale))
                    .await
                    .map_err(io("removing a replaced segment"))?;
                if hints.remove(&(order, stale)) {
                    disk.remove(&segment::hint_name(order, stale))
                        .await
                        .map_err(io("removing a stale hint"))?;
                }
            }
            inner.next_number = inner.next_number.max(order + 1).max(file_no + 1);
            let file = disk
                .open(&segment::log_name(order, file_no))
                .await
                .map_err(io("opening a segment"))?;
            let size = file.size().await.map_err(io("sizing a segment"))?;
            inner.segments.insert(
                file_no,
                Segment {
                    order,
                    file_no,
                    file: Rc::new(file),
                    len: 0,
                    live_bytes: 0,
                    sealed: true,
                },
            );
            let from_hint = if hints.contains(&(order, file_no)) {
                Self::replay_hint(&disk, &mut inner, order, file_no, size).await?
            } else {
                false
            };
            if !from_hint {
                let builder = Self::replay_scan(&mut inner, file_no, size).await?;
                needs_hint.push((order, file_no, builder));
            }
        }
        let store = Rc::new(Store {
            disk,
            config,
            inner: RefCell::new(inner),
            work: Event::new(),
            locks: KeyLocks::default(),
            failed: RefCell::new(None),
            closing: Cell::new(false),
            stopped: Cell::new(false),
            stopped_event: Event::new(),
            compacting: Cell::new(false),
        });
        for (order, file_no, builder) in needs_hint {
            let len = store.inner.borrow().segments[&file_no].len;
            if let Err(err) = store.write_hint(order, file_no, len, &builder).await {
                tracing::warn!(%err, order, file_no, "could not write hint file after recovery");
            }
        }
        store.start_segment().await?;
        Ok(store)
    }

    async fn replay_hint(
        disk: &D,
        inner: &mut Inner<D::File>,
        order: u32,
        file_no: u32,
        size: u64,
    ) -> Result<bool> {
        let name = segment::hint_name(order, file_no);
        let file = disk
            .open(&name)
            .await
            .map_err(|e| StoreError::io("opening a hint file", e))?;
        let len = file
            .size()
            .await
            .map_err(|e| StoreError::io("sizing a hint file", e))?;
        let bytes = file
            .read_at(0, len as usize)
            .await
            .map_err(|e| StoreError::io("reading a hint file", e))?;
        let Some(hint) = hint::decode(&bytes, order, file_no).filter(|h| h.segment_len <= size)
        else {
            tracing::warn!(name, "hint file unusable; scanning its segment instead");
            return Ok(false);
        };
        inner
            .segments
            .get_mut(&file_no)
            .expect("inserted above")
            .len = hint.segment_len;
        for entry in hint.entries {
            let location = Location {
                file: file_no,
                offset: entry.offset,
                len: entry.len,
            };
            inner.apply(
                entry.kind,
                entry.partition,
                &entry.key,
                location,
                entry.version_digest,
            );
        }
        Ok(true)
    }

    async fn replay_scan(
        inner: &mut Inner<D::File>,
        file_no: u32,
        size: u64,
    ) -> Result<HintBuilder> {
        let file = inner.segments[&file_no].file.clone();
        let data = file
            .read_at(0, size as usize)
            .await
            .map_err(|e| StoreError::io("reading a segment", e))?;
        let mut builder = HintBuilder::default();
        let summary = scan::scan(&data, |offset, header, bytes| {
            let (key, version, _) = record::split(bytes, &header);
            let digest = record::version_digest(version);
            let location = Location {
                file: file_no,
                offset: offset as u32,
                len: bytes.len() as u32,
            };
            inner.apply(header.kind, header.partition, key, location, digest);
            builder.push(&header, location, digest, key);
        });
        if summary.corrupt_regions > 0 || summary.torn_tail_bytes > 0 {
            tracing::warn!(
                file_no,
                corrupt_regions = summary.corrupt_regions,
                torn_tail_bytes = summary.torn_tail_bytes,
                "segment damaged; damaged records skipped"
            );
        }
        inner
            .segments
            .get_mut(&file_no)
            .expect("inserted above")
            .len = summary.end;
        inner.stats.recovered_segments_scanned += 1;
        inner.stats.recovered_corrupt_regions += summary.corrupt_regions;
        inner.stats.recovered_torn_tail_bytes += summary.torn_tail_bytes;
        Ok(builder)
    }
}
