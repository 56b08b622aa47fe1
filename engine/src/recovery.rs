//! Opening a store: rebuild the index from hint files and segment scans, clean up what
//! an interrupted compaction, rotation or hint write left behind, and start a fresh
//! segment.
//!
//! Segments are replayed in order; within a segment, records in offset order. The last
//! record of a key wins, and a partition-drop marker forgets every earlier record of its
//! partition. A segment without a usable hint (the one that was active when the process
//! died, usually) is scanned: its torn tail is cut, corrupt records are skipped and
//! counted, it is synced (what recovery indexes must not vanish at the next power loss)
//! and a hint is written for next time. New writes always go to a new segment, so a
//! segment that was cut is never appended to, and a later recovery reaches the same
//! verdict about it.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;

use event_listener::Event;
use hashbrown::HashMap;

use crate::cache::RecordCache;
use crate::config::StoreConfig;
use crate::disk::{Disk, DiskFile};
use crate::error::{Result, StoreError};
use crate::hint::{self, HintBuilder};
use crate::index::{Index, Location};
use crate::keylock::KeyLocks;
use crate::record;
use crate::scan::{self, Found};
use crate::segment::{self, FileKind, HeaderBlock, Segment};
use crate::store::{Active, Inner, Stats, Store};

/// What recovery found in one segment file before replaying it.
enum Verdict {
    Replay {
        salt: u64,
        hint: Option<hint::Hint>,
    },
    /// Nothing was ever written to it (a rotation interrupted before its header was
    /// durable): removed.
    Blank,
    /// Its header block is damaged and no hint vouches for its salt: none of its
    /// records can be checked, so none is trusted. Left on disk, reported.
    Unreadable,
}

impl<D: Disk> Store<D> {
    /// Opens (or creates) the store in `disk`.
    pub async fn open(disk: D, config: StoreConfig) -> Result<Rc<Store<D>>> {
        config.validate()?;
        let io = |op| move |e| StoreError::io(op, e);
        let mut logs: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        let mut hints = BTreeSet::new();
        let mut temporary = Vec::new();
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
                FileKind::Temporary => temporary.push(name),
                FileKind::Reserve | FileKind::Unknown => {}
            }
        }
        // Refuse a store of another format before changing anything in it.
        for (&order, file_nos) in &logs {
            for &file_no in file_nos {
                Self::refuse_format_1(&disk, order, file_no).await?;
            }
        }
        for name in temporary {
            // Left by an interrupted compaction or hint write; never renamed into place.
            disk.remove(&name)
                .await
                .map_err(io("removing a temporary file"))?;
        }
        let mut inner = Inner {
            index: Index::default(),
            segments: BTreeMap::new(),
            active: Active::new(0, 0),
            next_number: 1,
            drops: HashMap::new(),
            collected: HashMap::new(),
            queue: VecDeque::new(),
            cache: RecordCache::new(config.cache_bytes),
            stats: Stats::default(),
            reserve: false,
        };
        for &(order, file_no) in &hints {
            inner.next_number = inner.next_number.max(order + 1).max(file_no + 1);
            if !logs.get(&order).is_some_and(|f| f.contains(&file_no)) {
                // A compaction wrote this hint but died before renaming its segment in,
                // or compacted the segment before the rotation wrote its hint.
                disk.remove(&segment::hint_name(order, file_no))
                    .await
                    .map_err(io("removing an orphan hint"))?;
            }
        }
        let mut needs_hint = Vec::new();
        let mut removed_any = false;
        for (order, mut file_nos) in logs {
            file_nos.sort_unstable();
            // Compaction renames its complete output into place before removing the
            // segment it replaces, so the highest file number of an order is complete.
            let file_no = file_nos.pop().expect("an order has at least one file");
            inner.next_number = inner.next_number.max(order + 1).max(file_no + 1);
            for stale in file_nos {
                disk.remove(&segment::log_name(order, stale))
                    .await
                    .map_err(io("removing a replaced segment"))?;
                if hints.remove(&(order, stale)) {
                    disk.remove(&segment::hint_name(order, stale))
                        .await
                        .map_err(io("removing a stale hint"))?;
                }
                removed_any = true;
            }
            let name = segment::log_name(order, file_no);
            let file = disk.open(&name).await.map_err(io("opening a segment"))?;
            let size = file.size().await.map_err(io("sizing a segment"))?;
            let has_hint = hints.contains(&(order, file_no));
            match Self::judge(&disk, &file, order, file_no, size, has_hint).await? {
                Verdict::Blank => {
                    drop(file);
                    Self::remove_empty(&disk, order, file_no, has_hint).await?;
                    inner.stats.empty_segments_removed += 1;
                    removed_any = true;
                }
                Verdict::Unreadable => {
                    tracing::error!(
                        name,
                        "segment header damaged and no hint: its records cannot be checked and are not served"
                    );
                    inner.stats.recovered_corrupt_regions += 1;
                }
                Verdict::Replay { salt, hint } => {
                    inner.segments.insert(
                        file_no,
                        Segment {
                            order,
                            file_no,
                            file: Rc::new(file),
                            salt,
                            len: segment::HEADER_LEN,
                            live_bytes: 0,
                            sealed: true,
                        },
                    );
                    let builder = match hint {
                        Some(hint) => {
                            Self::replay_hint(&mut inner, file_no, hint);
                            None
                        }
                        None => Some(Self::replay_scan(&mut inner, file_no, size).await?),
                    };
                    if inner.segments[&file_no].record_bytes() == 0 {
                        // No records (the active segment of a store that stopped before
                        // its next write): nothing to keep.
                        inner.segments.remove(&file_no);
                        Self::remove_empty(&disk, order, file_no, has_hint).await?;
                        inner.stats.empty_segments_removed += 1;
                        removed_any = true;
                    } else if let Some(builder) = builder {
                        needs_hint.push((order, file_no, builder));
                    }
                }
            }
        }
        if removed_any {
            disk.sync_dir().await.map_err(io("syncing the directory"))?;
        }
        let store = Rc::new(Store {
            disk,
            config,
            inner: RefCell::new(inner),
            work: Event::new(),
            locks: KeyLocks::default(),
            failed: RefCell::new(None),
            closing: Cell::new(false),
            closing_event: Event::new(),
            stopped: Cell::new(false),
            stopped_event: Event::new(),
            compacting: Cell::new(false),
        });
        for (order, file_no, builder) in needs_hint {
            let (file, len, salt) = {
                let inner = store.inner.borrow();
                let s = &inner.segments[&file_no];
                (s.file.clone(), s.len, s.salt)
            };
            // The scan indexed records that may never have been synced: make them
            // durable before a hint makes them part of the index for good.
            file.sync()
                .await
                .map_err(|e| StoreError::io("syncing a recovered segment", e))?;
            if let Err(err) = store.write_hint(order, file_no, len, salt, &builder).await {
                tracing::warn!(%err, order, file_no, "could not write hint file after recovery");
            }
        }
        store.start_segment().await?;
        store.ensure_reserve().await;
        Ok(store)
    }

    /// Reads a segment's header block (and hint, if any) and decides how to replay it.
    async fn judge(
        disk: &D,
        file: &D::File,
        order: u32,
        file_no: u32,
        size: u64,
        has_hint: bool,
    ) -> Result<Verdict> {
        let head = file
            .read_at(0, segment::HEADER_LEN as usize)
            .await
            .map_err(|e| StoreError::io("reading a segment header", e))?;
        let header = segment::decode_header(&head, order, file_no);
        let hint = if has_hint {
            Self::read_hint(disk, order, file_no, size).await?
        } else {
            None
        };
        let hint = match (header, hint) {
            // The hint must agree with the header about the salt, or it is not this
            // segment's.
            (HeaderBlock::Salt(salt), Some(h)) if h.salt != salt => {
                tracing::warn!(
                    order,
                    file_no,
                    "hint salt disagrees with its segment; scanning"
                );
                None
            }
            (_, hint) => hint,
        };
        Ok(match (header, hint) {
            (HeaderBlock::Salt(salt), hint) => Verdict::Replay { salt, hint },
            (HeaderBlock::Invalid | HeaderBlock::Blank | HeaderBlock::Format1, Some(hint)) => {
                Verdict::Replay {
                    salt: hint.salt,
                    hint: Some(hint),
                }
            }
            (HeaderBlock::Blank, None) => {
                let rest = file
                    .read_at(0, size as usize)
                    .await
                    .map_err(|e| StoreError::io("reading a segment", e))?;
                if rest.iter().all(|&b| b == 0) {
                    Verdict::Blank
                } else {
                    Verdict::Unreadable
                }
            }
            (HeaderBlock::Invalid | HeaderBlock::Format1, None) => Verdict::Unreadable,
        })
    }

    /// Removes a segment that holds no records, and its hint if it has one.
    async fn remove_empty(disk: &D, order: u32, file_no: u32, has_hint: bool) -> Result<()> {
        let io = |op| move |e| StoreError::io(op, e);
        disk.remove(&segment::log_name(order, file_no))
            .await
            .map_err(io("removing an empty segment"))?;
        if has_hint {
            disk.remove(&segment::hint_name(order, file_no))
                .await
                .map_err(io("removing an empty segment's hint"))?;
        }
        Ok(())
    }

    async fn refuse_format_1(disk: &D, order: u32, file_no: u32) -> Result<()> {
        let name = segment::log_name(order, file_no);
        let file = disk
            .open(&name)
            .await
            .map_err(|e| StoreError::io("opening a segment", e))?;
        let head = file
            .read_at(0, 8)
            .await
            .map_err(|e| StoreError::io("reading a segment header", e))?;
        if segment::decode_header(&head, order, file_no) == HeaderBlock::Format1 {
            return Err(StoreError::InvalidArgument(format!(
                "{name}: written by storage format 1; this build reads format 2 (docs/format.md). Move the data directory away and let replication rebuild it"
            )));
        }
        Ok(())
    }

    async fn read_hint(
        disk: &D,
        order: u32,
        file_no: u32,
        size: u64,
    ) -> Result<Option<hint::Hint>> {
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
        let hint = hint::decode(&bytes, order, file_no).filter(|h| h.segment_len <= size);
        if hint.is_none() {
            tracing::warn!(name, "hint file unusable; scanning its segment instead");
        }
        Ok(hint)
    }

    fn replay_hint(inner: &mut Inner<D::File>, file_no: u32, hint: hint::Hint) {
        inner
            .segments
            .get_mut(&file_no)
            .expect("inserted by the caller")
            .len = hint.segment_len;
        for entry in hint.entries {
            let Some(kind) = entry.kind else {
                // A damaged region the scan that wrote this hint found.
                continue;
            };
            let location = Location {
                file: file_no,
                offset: entry.offset,
                len: entry.len,
            };
            inner.apply(
                kind,
                entry.partition,
                &entry.key,
                location,
                entry.version_digest,
            );
        }
    }

    async fn replay_scan(
        inner: &mut Inner<D::File>,
        file_no: u32,
        size: u64,
    ) -> Result<HintBuilder> {
        let (file, salt) = {
            let s = &inner.segments[&file_no];
            (s.file.clone(), s.salt)
        };
        let data = file
            .read_at(0, size as usize)
            .await
            .map_err(|e| StoreError::io("reading a segment", e))?;
        let mut builder = HintBuilder::default();
        let summary = scan::scan(&data, salt, |found| match found {
            Found::Record {
                offset,
                header,
                bytes,
            } => {
                let (key, version, _) = record::split(bytes, &header);
                let digest = record::version_digest(version);
                let location = Location {
                    file: file_no,
                    offset: offset as u32,
                    len: bytes.len() as u32,
                };
                inner.apply(header.kind, header.partition, key, location, digest);
                builder.push(&header, location, digest, key);
            }
            Found::Damaged { offset, len } => builder.push_damaged(offset as u32, len as u32),
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
            .expect("inserted by the caller")
            .len = summary.end;
        inner.stats.recovered_segments_scanned += 1;
        inner.stats.recovered_corrupt_regions += summary.corrupt_regions;
        inner.stats.recovered_torn_tail_bytes += summary.torn_tail_bytes;
        Ok(builder)
    }
}
