//! The public face of one shard's store, and the state its parts share.
//!
//! A `Store` is single-threaded (one per glommio executor) and shared as `Rc<Store>`.
//! Its owner must drive `Store::run` as a background task: that loop performs the group
//! commits (and, in interval mode, the periodic fdatasync). Compaction runs when the
//! owner calls `Store::compact_once`, typically from a low-priority task queue.
//!
//! Reads never wait for writes: the index only ever points at records that are already
//! committed, so a put becomes visible the moment it is acknowledged (and is served from
//! the cache, since the committed bytes are inserted there).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use event_listener::Event;
use hashbrown::HashMap;

use crate::cache::RecordCache;
use crate::config::{Durability, StoreConfig};
use crate::disk::{Disk, DiskFile};
use crate::error::{Result, StoreError};
use crate::hint::HintBuilder;
use crate::index::{Entry, Index, Location};
use crate::keylock::KeyLocks;
use crate::record::{self, Header, Kind, MAX_KEY_LEN, MAX_VERSION_LEN, Record};
use crate::segment::{self, Segment};

/// Counters, all monotonic except where noted.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stats {
    pub puts: u64,
    pub gets: u64,
    pub cache_hits: u64,
    pub disk_reads: u64,
    /// Group commits performed, and records they carried.
    pub commits: u64,
    pub committed_records: u64,
    pub syncs: u64,
    /// Reads answered `Corrupt`: a record that failed its checksum, or a key whose
    /// record was lost to corruption (never served; replication repairs them).
    pub corrupt_reads: u64,
    /// Damaged regions that compaction found in sealed segments.
    pub corrupt_regions_found: u64,
    /// Newest records of a key found corrupt by compaction and replaced by a lost
    /// marker (the key reads as missing here until it is written again).
    pub records_lost: u64,
    /// Group commits that failed (not acknowledged; the segment was cut back).
    pub failed_commits: u64,
    /// Found at open: damaged regions skipped, torn tail bytes cut, segments scanned
    /// because they had no usable hint file.
    pub recovered_corrupt_regions: u64,
    pub recovered_torn_tail_bytes: u64,
    pub recovered_segments_scanned: u64,
    pub compactions: u64,
    pub compacted_bytes_reclaimed: u64,
    /// Segments removed because they held no records.
    pub empty_segments_removed: u64,
    /// Tombstones removed from the index by `collect_tombstone`, and those whose records
    /// compaction has since dropped for good.
    pub tombstones_collected: u64,
    pub collected_tombstones_dropped: u64,
}

impl Stats {
    /// Every kind of corruption seen, for one number in a status report.
    pub fn corruption(&self) -> u64 {
        self.corrupt_reads
            + self.recovered_corrupt_regions
            + self.corrupt_regions_found
            + self.records_lost
    }
}

/// Sizes right now (not monotonic).
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    pub keys: usize,
    pub segments: usize,
    /// Bytes of records in all segments, dead ones included.
    pub record_bytes: u64,
    /// Bytes written to the active segment and not yet covered by an fdatasync (always
    /// 0 between commits in `sync` mode).
    pub unsynced_bytes: u64,
    /// Bytes of records the index still points at.
    pub live_bytes: u64,
    /// Heap bytes of the index, key bytes included; and the key bytes alone.
    pub index_bytes: usize,
    pub key_bytes: usize,
    pub cache_bytes: u64,
}

/// What `Store::update`'s merge function decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merge {
    /// Leave the key as it is.
    Keep,
    /// Store this value (or a tombstone) with this version.
    Write {
        version: Vec<u8>,
        value: Vec<u8>,
        tombstone: bool,
    },
}

/// A key of a partition as the index knows it (no I/O needed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySummary {
    pub key: Vec<u8>,
    pub version_digest: u32,
    pub tombstone: bool,
}

/// Records waiting to be committed together; one outcome for all of them. The records
/// are encoded unsealed: their checks are written once the commit knows where they go.
#[derive(Default)]
pub(crate) struct Batch {
    pub bytes: Vec<u8>,
    pub records: Vec<(usize, Header)>,
    pub outcome: Rc<Outcome>,
}

#[derive(Default)]
pub(crate) struct Outcome {
    result: RefCell<Option<Result<()>>>,
    done: Event,
}

impl Outcome {
    pub fn finish(&self, result: Result<()>) {
        *self.result.borrow_mut() = Some(result);
        self.done.notify(usize::MAX);
    }

    async fn wait(&self) -> Result<()> {
        loop {
            if let Some(result) = self.result.borrow().clone() {
                return result;
            }
            let listener = self.done.listen();
            if let Some(result) = self.result.borrow().clone() {
                return result;
            }
            listener.await;
        }
    }
}

/// The segment being appended to.
pub(crate) struct Active {
    pub file_no: u32,
    pub order: u32,
    pub salt: u64,
    /// Logical end: the header block plus the records written so far.
    pub end: u64,
    /// How far an fdatasync that completed is known to cover (never beyond `end`).
    pub synced_end: u64,
    /// When the oldest write not yet covered by an fdatasync completed (at the latest):
    /// interval mode syncs at most one interval after it.
    pub unsynced_since: Option<std::time::Duration>,
    /// Bytes from the last 4 KiB boundary up to `end`: the next write rewrites them
    /// (identical bytes, so a torn rewrite cannot damage what was acknowledged).
    pub tail: Vec<u8>,
    pub hint: HintBuilder,
}

pub(crate) struct Inner<F> {
    pub index: Index,
    /// Every segment by file number, the active one included.
    pub segments: BTreeMap<u32, Segment<F>>,
    pub active: Active,
    pub next_number: u32,
    /// The live partition-drop marker of each dropped partition.
    pub drops: HashMap<u32, Location>,
    /// Tombstones the cluster layer collected (`Store::collect_tombstone`): gone from
    /// the index, but their records are kept, and counted live, until no older record
    /// of their key can be left on disk (see compaction). Not durable: after a restart
    /// they are in the index again and the cluster layer collects them again.
    pub collected: HashMap<Location, (u32, Vec<u8>)>,
    pub queue: VecDeque<Batch>,
    pub cache: RecordCache,
    pub stats: Stats,
    /// Whether `compaction.reserve` is on disk (space compaction may take when full).
    pub reserve: bool,
}

impl<F> Inner<F> {
    /// Makes `location` the newest record of its key (or its partition's drop marker),
    /// keeping every segment's live byte count true.
    pub fn apply(
        &mut self,
        kind: Kind,
        partition: u32,
        key: &[u8],
        location: Location,
        digest: u32,
    ) {
        match kind {
            Kind::Value | Kind::Tombstone | Kind::Lost => {
                let entry = Entry {
                    location,
                    tombstone: kind == Kind::Tombstone,
                    lost: kind == Kind::Lost,
                    version_digest: digest,
                    cache_slot: None,
                };
                if let Some(old) = self.index.insert(partition, key, entry) {
                    self.forget(old);
                }
            }
            Kind::PartitionDrop => {
                if let Some(dropped) = self.index.remove_partition(partition) {
                    for (_, entry) in dropped.iter() {
                        self.forget(entry);
                    }
                }
                if let Some(old) = self.drops.insert(partition, location) {
                    self.add_live(old, false);
                }
            }
        }
        self.add_live(location, true);
    }

    /// An entry the index no longer holds: its record is garbage and leaves the cache.
    fn forget(&mut self, entry: Entry) {
        self.add_live(entry.location, false);
        if let Some(slot) = entry.cache_slot {
            self.cache.free(slot);
        }
    }

    /// An entry's version digest, wherever it is kept.
    pub fn digest(&self, entry: &Entry) -> u32 {
        match entry.cache_slot {
            Some(slot) => self.cache.digest(slot),
            None => entry.version_digest,
        }
    }

    /// Caches `record`, just committed or read at `location`, if its key still points
    /// there; entries of evicted records get their digests back.
    pub fn cache_record(&mut self, location: Location, record: Record) {
        let mut evicted = Vec::new();
        let keyed = record.clone();
        if let Some(slot) = self.cache.insert(location, record, &mut evicted) {
            match self
                .index
                .set_cached(keyed.partition(), keyed.key(), location, slot)
            {
                Some(digest) => self.cache.set_digest(slot, digest),
                None => self.cache.free(slot),
            }
        }
        for gone in evicted {
            let record = &gone.record;
            self.index
                .uncache(record.partition(), record.key(), gone.slot, gone.digest);
        }
    }

    /// Moves a live record's bytes from the segment at `from` to the one at `to`.
    pub fn move_live(&mut self, from: Location, to: Location) {
        self.add_live(from, false);
        self.add_live(to, true);
    }

    fn add_live(&mut self, location: Location, live: bool) {
        let segment = self.segments.get_mut(&location.file);
        // The index never points into a segment that is gone: compaction re-points
        // every live record before it removes a segment.
        let segment = segment.expect("index points into a missing segment");
        if live {
            segment.live_bytes += location.len as u64;
        } else {
            segment.live_bytes -= location.len as u64;
        }
    }
}

pub struct Store<D: Disk> {
    pub(crate) disk: D,
    pub(crate) config: StoreConfig,
    pub(crate) inner: RefCell<Inner<D::File>>,
    /// Signalled when a batch is queued or the store starts closing.
    pub(crate) work: Event,
    pub(crate) locks: KeyLocks,
    /// Set on the first failed fdatasync; writes are refused from then on.
    pub(crate) failed: RefCell<Option<String>>,
    pub(crate) closing: Cell<bool>,
    /// Signalled once when the store starts closing, to cut background sleeps short.
    pub(crate) closing_event: Event,
    pub(crate) stopped: Cell<bool>,
    pub(crate) stopped_event: Event,
    pub(crate) compacting: Cell<bool>,
}

impl<D: Disk> Store<D> {
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Drives group commits (and interval syncs) until `close` is called. The owner
    /// runs this as a background task for as long as the store is used.
    pub async fn run(&self) {
        let commits = self.run_commits();
        match self.config.durability {
            Durability::Interval(every) => {
                futures_lite::future::zip(commits, self.run_interval_sync(every)).await;
            }
            Durability::Sync | Durability::None => commits.await,
        }
        self.stopped.set(true);
        self.stopped_event.notify(usize::MAX);
    }

    /// Makes every write acknowledged so far durable (an fdatasync of the active
    /// segment if it has unsynced bytes). In `sync` mode there is nothing to do; in
    /// `interval` and `none` modes this is the barrier a caller can ask for. Fails on a
    /// store that has latched a failure.
    pub async fn sync(&self) -> Result<()> {
        // A failed store says so even when nothing is left to sync: writes that failed
        // with it may still be on their way to the disk.
        if let Some(reason) = self.failure() {
            return Err(StoreError::Failed(reason));
        }
        self.sync_active().await
    }

    /// Commits what is queued, syncs, and stops `run`. Writes after this fail with Closed.
    pub async fn close(&self) -> Result<()> {
        self.closing.set(true);
        self.work.notify(usize::MAX);
        self.closing_event.notify(usize::MAX);
        while !self.stopped.get() {
            let listener = self.stopped_event.listen();
            if self.stopped.get() {
                break;
            }
            listener.await;
        }
        self.sync_active().await?;
        self.write_active_hint().await;
        Ok(())
    }

    /// At a clean close, the active segment gets its hint too, so the next open reads
    /// the hint instead of scanning the segment. Only a speed-up: a failure is logged.
    async fn write_active_hint(&self) {
        let (order, file_no, end, salt, hint) = {
            let inner = self.inner.borrow();
            let active = &inner.active;
            if active.end <= segment::HEADER_LEN {
                return;
            }
            let salt = inner.segments[&active.file_no].salt;
            (
                active.order,
                active.file_no,
                active.end,
                salt,
                active.hint.clone(),
            )
        };
        let written = self.write_hint(order, file_no, end, salt, &hint).await;
        let durable = match written {
            Ok(()) => self
                .disk
                .sync_dir()
                .await
                .map_err(|e| StoreError::io("syncing the directory", e)),
            Err(err) => Err(err),
        };
        if let Err(err) = durable {
            tracing::warn!(%err, order, file_no, "no hint for the active segment; the next open scans it");
        }
    }

    pub async fn get(&self, partition: u32, key: &[u8]) -> Result<Option<Record>> {
        let (location, file, salt) = {
            let mut inner = self.inner.borrow_mut();
            inner.stats.gets += 1;
            let Some(entry) = inner.index.get(partition, key) else {
                return Ok(None);
            };
            if entry.lost {
                inner.stats.corrupt_reads += 1;
                return Err(StoreError::Corrupt(
                    "the key's newest record was lost to corruption".into(),
                ));
            }
            if let Some(slot) = entry.cache_slot {
                // The slot's location tag always matches while the entry names it.
                if let Some(record) = inner.cache.get(slot, entry.location) {
                    debug_assert!(record.key() == key, "a cache slot holds another key");
                    inner.stats.cache_hits += 1;
                    return Ok(Some(record));
                }
                debug_assert!(false, "a cached entry whose slot holds another record");
            }
            inner.stats.disk_reads += 1;
            let segment = inner.segments.get(&entry.location.file);
            let segment = segment.expect("index points into a missing segment");
            (entry.location, segment.file.clone(), segment.salt)
        };
        let bytes = file
            .read_at(location.offset as u64, location.len as usize)
            .await
            .map_err(|e| StoreError::io("reading a record", e))?;
        let seed = record::position_seed(salt, location.offset as u64);
        let header = record::decode_header(&bytes, seed).ok().filter(|h| {
            h.record_len() == bytes.len()
                && h.partition == partition
                && record::checksum_ok(&bytes, seed)
        });
        let Some(header) = header else {
            self.inner.borrow_mut().stats.corrupt_reads += 1;
            return Err(StoreError::Corrupt(format!(
                "record of {} bytes at file {} offset {} failed its checksum",
                location.len, location.file, location.offset
            )));
        };
        let record = Record::from_checked(Rc::from(&bytes[..]), header);
        if record.key() != key {
            self.inner.borrow_mut().stats.corrupt_reads += 1;
            return Err(StoreError::Corrupt(
                "indexed record holds another key".into(),
            ));
        }
        self.inner
            .borrow_mut()
            .cache_record(location, record.clone());
        Ok(Some(record))
    }

    /// Stores `value` under `key` with an opaque `version`; resolves once durable (in
    /// the configured durability mode).
    pub async fn put(
        &self,
        partition: u32,
        key: &[u8],
        version: &[u8],
        value: &[u8],
    ) -> Result<()> {
        self.validate(key, version, value)?;
        let _guard = self.locks.lock(partition, key).await;
        self.write(Kind::Value, partition, key, version, value)
            .await
    }

    /// Writes a tombstone carrying `version`: the key reads as deleted, and the
    /// tombstone is kept (and iterated) so replicas can learn of the delete.
    pub async fn delete(&self, partition: u32, key: &[u8], version: &[u8]) -> Result<()> {
        self.validate(key, version, &[])?;
        let _guard = self.locks.lock(partition, key).await;
        self.write(Kind::Tombstone, partition, key, version, &[])
            .await
    }

    /// Atomic read-merge-write: `merge` sees the current record (or None) and decides.
    /// No other put, delete or update of the same key runs in between. Returns whether
    /// something was written. A current record that is corrupt is seen as None: this
    /// replica has lost it, and what the merge writes repairs the key.
    pub async fn update(
        &self,
        partition: u32,
        key: &[u8],
        merge: impl FnOnce(Option<&Record>) -> Merge,
    ) -> Result<bool> {
        self.validate(key, &[], &[])?;
        let _guard = self.locks.lock(partition, key).await;
        let current = match self.get(partition, key).await {
            Err(StoreError::Corrupt(_)) => None,
            other => other?,
        };
        match merge(current.as_ref()) {
            Merge::Keep => Ok(false),
            Merge::Write {
                version,
                value,
                tombstone,
            } => {
                self.validate(key, &version, &value)?;
                let kind = if tombstone {
                    Kind::Tombstone
                } else {
                    Kind::Value
                };
                self.write(kind, partition, key, &version, &value).await?;
                Ok(true)
            }
        }
    }

    /// Tombstone collection, for the cluster layer once every replica of the key is known
    /// to hold this tombstone (and a grace period longer than the hint window passed):
    /// forgets the key if it is still the tombstone whose version digest is
    /// `version_digest`, so it no longer reads, lists or costs index memory. Its record
    /// stays on disk until compaction can drop it without letting an older record of the
    /// key come back at recovery: when it lies in the oldest segment left. Returns
    /// whether the tombstone was collected. Not durable: after a restart the tombstone
    /// is back (as a tombstone, never as an older value) and may be collected again.
    pub async fn collect_tombstone(
        &self,
        partition: u32,
        key: &[u8],
        version_digest: u32,
    ) -> Result<bool> {
        self.validate(key, &[], &[])?;
        let _guard = self.locks.lock(partition, key).await;
        let mut inner = self.inner.borrow_mut();
        let Some(entry) = inner.index.get(partition, key) else {
            return Ok(false);
        };
        if !entry.tombstone || entry.lost || inner.digest(&entry) != version_digest {
            return Ok(false);
        }
        let removed = inner.index.remove_if(partition, key, entry);
        debug_assert!(removed, "the entry was read under the same borrow");
        if let Some(slot) = entry.cache_slot {
            inner.cache.free(slot);
        }
        inner
            .collected
            .insert(entry.location, (partition, key.to_vec()));
        inner.stats.tombstones_collected += 1;
        Ok(true)
    }

    /// Forgets every key of `partition` (after its data moved to another node). Durable:
    /// the records stay on disk until compaction, but never come back.
    pub async fn drop_partition(&self, partition: u32) -> Result<()> {
        self.write(Kind::PartitionDrop, partition, &[], &[], &[])
            .await
    }

    /// Every key of `partition` with its version digest, from memory. Keys lost to
    /// corruption are left out: this replica holds nothing for them.
    pub fn partition_keys(&self, partition: u32) -> Vec<KeySummary> {
        let inner = self.inner.borrow();
        let Some(index) = inner.index.partition(partition) else {
            return Vec::new();
        };
        index
            .iter()
            .filter(|(_, entry)| !entry.lost)
            .map(|(key, entry)| KeySummary {
                key: key.to_vec(),
                version_digest: inner.digest(&entry),
                tombstone: entry.tombstone,
            })
            .collect()
    }

    /// Every tombstone of `partition` with its version digest (lost ones left out),
    /// copying no other key: what tombstone collection sweeps.
    pub fn partition_tombstones(&self, partition: u32) -> Vec<KeySummary> {
        let inner = self.inner.borrow();
        let Some(index) = inner.index.partition(partition) else {
            return Vec::new();
        };
        (index.iter())
            .filter(|(_, entry)| entry.tombstone && !entry.lost)
            .map(|(key, entry)| KeySummary {
                key: key.to_vec(),
                version_digest: inner.digest(&entry),
                tombstone: true,
            })
            .collect()
    }

    /// How many keys of `partition` hold a value and how many a tombstone (lost ones
    /// left out), counted in place: for status, without copying a key.
    pub fn partition_counts(&self, partition: u32) -> (u64, u64) {
        let inner = self.inner.borrow();
        let Some(index) = inner.index.partition(partition) else {
            return (0, 0);
        };
        let (mut values, mut tombstones) = (0, 0);
        for (_, entry) in index.iter().filter(|(_, entry)| !entry.lost) {
            if entry.tombstone {
                tombstones += 1;
            } else {
                values += 1;
            }
        }
        (values, tombstones)
    }

    /// Calls `visit` with every live record (values and tombstones) of `partition`, for
    /// anti-entropy and handoff. Walks that partition's index only, never a whole segment;
    /// keys written after the walk starts may or may not be visited. Stops at the first
    /// error (a corrupt record is reported, not skipped, so a handoff never silently
    /// drops a key).
    pub async fn scan_partition(
        &self,
        partition: u32,
        mut visit: impl FnMut(Record),
    ) -> Result<usize> {
        let keys = self.partition_keys(partition);
        let mut visited = 0;
        for summary in keys {
            // A key dropped or compacted away meanwhile is simply gone.
            if let Some(record) = self.get(partition, &summary.key).await? {
                visit(record);
                visited += 1;
            }
        }
        Ok(visited)
    }

    /// Partitions that hold at least one key, ascending.
    pub fn partitions(&self) -> Vec<u32> {
        self.inner.borrow().index.partition_ids()
    }

    pub fn stats(&self) -> Stats {
        self.inner.borrow().stats.clone()
    }

    pub fn usage(&self) -> Usage {
        let inner = self.inner.borrow();
        Usage {
            keys: inner.index.len(),
            segments: inner.segments.len(),
            record_bytes: inner.segments.values().map(|s| s.record_bytes()).sum(),
            unsynced_bytes: inner.active.end - inner.active.synced_end,
            live_bytes: inner.segments.values().map(|s| s.live_bytes).sum(),
            index_bytes: inner.index.memory_bytes(),
            key_bytes: inner.index.key_bytes(),
            cache_bytes: inner.cache.weight(),
        }
    }

    /// The latched failure, if an fdatasync has failed.
    pub fn failure(&self) -> Option<String> {
        self.failed.borrow().clone()
    }

    fn validate(&self, key: &[u8], version: &[u8], value: &[u8]) -> Result<()> {
        let too_long = |what: &str, len: usize, max: usize| {
            Err(StoreError::InvalidArgument(format!(
                "{what} of {len} bytes exceeds the limit of {max}"
            )))
        };
        if key.len() > MAX_KEY_LEN {
            return too_long("key", key.len(), MAX_KEY_LEN);
        }
        if version.len() > MAX_VERSION_LEN {
            return too_long("version", version.len(), MAX_VERSION_LEN);
        }
        if value.len() > self.config.max_value_len {
            return too_long("value", value.len(), self.config.max_value_len);
        }
        Ok(())
    }

    /// Queues one record for the next group commit and waits for its outcome.
    async fn write(
        &self,
        kind: Kind,
        partition: u32,
        key: &[u8],
        version: &[u8],
        value: &[u8],
    ) -> Result<()> {
        self.check_writable()?;
        let outcome = {
            let mut inner = self.inner.borrow_mut();
            inner.stats.puts += 1;
            // A batch is written whole into one segment, so it never grows beyond what a
            // fresh segment holds (nor, for latency, beyond commit_batch_bytes).
            let cap = self.config.commit_batch_bytes;
            let segment_room = (self.config.segment_size - segment::HEADER_LEN) as usize;
            let len = record::RECORD_OVERHEAD + key.len() + version.len() + value.len();
            if inner
                .queue
                .back()
                .is_none_or(|b| b.bytes.len() >= cap || b.bytes.len() + len > segment_room)
            {
                inner.queue.push_back(Batch::default());
            }
            let batch = inner.queue.back_mut().expect("a batch was just ensured");
            let start = batch.bytes.len();
            record::encode_unsealed(&mut batch.bytes, kind, partition, key, version, value);
            let header = record::unsealed_header(&batch.bytes[start..]);
            batch.records.push((start, header));
            batch.outcome.clone()
        };
        self.work.notify(1);
        outcome.wait().await
    }

    /// Sleeps `duration`, or less if the store starts closing meanwhile.
    pub(crate) async fn sleep_unless_closing(&self, duration: std::time::Duration) {
        let listener = self.closing_event.listen();
        if self.closing.get() {
            return;
        }
        futures_lite::future::or(self.disk.sleep(duration), listener).await;
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if let Some(reason) = self.failed.borrow().as_ref() {
            return Err(StoreError::Failed(reason.clone()));
        }
        if self.closing.get() {
            return Err(StoreError::Closed);
        }
        Ok(())
    }
}
