//! A simulated disk in memory that is honest about what survives a crash, and that
//! makes the store's tasks interleave.
//!
//! Each file keeps what is durable and the changes made since its last sync. `crash`
//! returns the disk a reboot would find: each pending write is dropped, applied, or torn
//! (a random subset of its 512-byte sectors applied), each pending resize dropped or
//! applied, and file creations, renames and removals not followed by `sync_dir` are
//! undone.
//!
//! With `with_latency`, every operation first yields to the executor a seeded random
//! number of times, so the commit task, compaction, rotation, interval syncs and reads
//! suspend at every I/O and interleave the way they do on a real disk (a disk whose
//! operations complete at once never lets two of them overlap). With `manual_clock`,
//! `sleep` waits for `advance`, so interval syncs run exactly when a test says time
//! has passed.
//!
//! Faults can be injected: a capacity (ENOSPC), a failing write (EIO after a random
//! part of it reached the disk), a failing fdatasync or directory sync (EIO), a failing
//! file creation (EMFILE) or removal (EIO), and a point after which every operation
//! fails, as if the machine stopped there.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use super::{Disk, DiskFile, WriteBuf};

const SECTOR: usize = 512;

/// Faults to inject. All counters count from the moment they are set, from 0.
#[derive(Debug, Clone, Default)]
pub struct SimFaults {
    /// Total bytes all files may hold; writes past it fail with ENOSPC.
    pub capacity: Option<u64>,
    /// The file sync with this number fails with EIO (and forgets its pending writes).
    pub fail_sync_at: Option<u64>,
    /// The directory sync with this number fails with EIO.
    pub fail_sync_dir_at: Option<u64>,
    /// The creation of a new file with this number fails with EMFILE.
    pub fail_create_at: Option<u64>,
    /// The write with this number fails with EIO after a random part of it was written.
    pub fail_write_at: Option<u64>,
    /// The removal of a file with this number fails with EIO (the file stays).
    pub fail_remove_at: Option<u64>,
    /// After this many more mutating operations, every operation fails: the machine
    /// "stopped" there, and `crash` gives what it would find after a reboot.
    pub stop_after_ops: Option<u64>,
}

#[derive(Debug, Clone, Default)]
struct Counters {
    syncs: u64,
    dir_syncs: u64,
    creates: u64,
    writes: u64,
    removes: u64,
}

enum Pending {
    Write(u64, Vec<u8>),
    Resize(u64),
}

/// A file's bytes: what is durable, and the changes since, each with the sequence
/// number it was made at (so a sync covers exactly the changes made before it was
/// issued, whichever order concurrent syncs complete in).
#[derive(Default)]
struct FileData {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<(u64, Pending)>,
    next_seq: u64,
    /// Failed syncs so far: a sync in flight when another fails reports the failure
    /// too (Linux reports a writeback error to every fsync that was waiting on it).
    sync_failures: u64,
}

impl FileData {
    fn push(&mut self, pending: Pending) {
        self.pending.push((self.next_seq, pending));
        self.next_seq += 1;
    }
}

type FileRef = Rc<RefCell<FileData>>;

struct State {
    names: BTreeMap<String, FileRef>,
    durable_names: BTreeMap<String, FileRef>,
    faults: SimFaults,
    counters: Counters,
    stopped: bool,
    rng: fastrand::Rng,
    /// Most yields an operation makes before it runs (0: none).
    latency: u32,
    manual_clock: bool,
    now: Duration,
    sleepers: Vec<Waker>,
    /// Bumped by every creation, rename and removal; `durable_seq` is the highest one a
    /// completed directory sync covers (durability of names only moves forward).
    names_seq: u64,
    durable_seq: u64,
}

impl State {
    fn new(seed: u64) -> State {
        State {
            names: BTreeMap::new(),
            durable_names: BTreeMap::new(),
            faults: SimFaults::default(),
            counters: Counters::default(),
            stopped: false,
            rng: fastrand::Rng::with_seed(seed),
            latency: 0,
            manual_clock: false,
            now: Duration::ZERO,
            sleepers: Vec::new(),
            names_seq: 0,
            durable_seq: 0,
        }
    }

    /// Counts one mutating operation; Err once the machine has stopped.
    fn tick(&mut self) -> io::Result<()> {
        if let Some(left) = self.faults.stop_after_ops.as_mut() {
            if *left == 0 {
                self.stopped = true;
            } else {
                *left -= 1;
            }
        }
        self.check_running()
    }

    fn check_running(&self) -> io::Result<()> {
        if self.stopped {
            return Err(io::Error::other("simulated machine stopped"));
        }
        Ok(())
    }

    fn used_bytes(&self) -> u64 {
        self.names
            .values()
            .map(|f| f.borrow().current.len() as u64)
            .sum()
    }

    fn check_space(&self, growth: u64) -> io::Result<()> {
        match self.faults.capacity {
            Some(capacity) if self.used_bytes() + growth > capacity => Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "simulated disk full",
            )),
            _ => Ok(()),
        }
    }
}

/// Returns true (and counts) when the counted operation `counter` is the one to fail.
fn fires(at: Option<u64>, counter: &mut u64) -> bool {
    let number = *counter;
    *counter += 1;
    at == Some(number)
}

/// An in-memory directory. Clones share the same files.
#[derive(Clone)]
pub struct SimDisk {
    state: Rc<RefCell<State>>,
}

impl Default for SimDisk {
    fn default() -> SimDisk {
        SimDisk::new()
    }
}

impl SimDisk {
    pub fn new() -> SimDisk {
        SimDisk {
            state: Rc::new(RefCell::new(State::new(0))),
        }
    }

    /// A disk whose operations each yield up to `max_yields` times first, as chosen by
    /// a generator seeded with `seed`.
    pub fn with_latency(seed: u64, max_yields: u32) -> SimDisk {
        let disk = SimDisk {
            state: Rc::new(RefCell::new(State::new(seed))),
        };
        disk.state.borrow_mut().latency = max_yields;
        disk
    }

    pub fn set_faults(&self, faults: SimFaults) {
        let mut state = self.state.borrow_mut();
        state.faults = faults;
        state.counters = Counters::default();
    }

    /// From now on `sleep` waits until `advance` has moved the clock past its deadline.
    pub fn set_manual_clock(&self) {
        self.state.borrow_mut().manual_clock = true;
    }

    /// Moves the simulated clock forward and wakes the sleepers that are due.
    pub fn advance(&self, by: Duration) {
        let sleepers = {
            let mut state = self.state.borrow_mut();
            state.now += by;
            std::mem::take(&mut state.sleepers)
        };
        for waker in sleepers {
            waker.wake();
        }
    }

    /// True once `stop_after_ops` has run out.
    pub fn stopped(&self) -> bool {
        self.state.borrow().stopped
    }

    /// The disk a reboot would find; `seed` picks which unsynced changes survive, whole
    /// or torn. This disk is left as it was; the new one has the same latency and clock
    /// mode and no faults.
    pub fn crash(&self, seed: u64) -> SimDisk {
        let mut rng = fastrand::Rng::with_seed(seed);
        let state = self.state.borrow();
        let mut names = BTreeMap::new();
        for (name, file) in &state.durable_names {
            let file = file.borrow();
            let mut data = file.durable.clone();
            for (_, pending) in &file.pending {
                match (pending, rng.u8(0..3)) {
                    (_, 0) => {}
                    (Pending::Resize(len), _) => data.resize(*len as usize, 0),
                    (Pending::Write(pos, bytes), 1) => write_into(&mut data, *pos, bytes),
                    (Pending::Write(pos, bytes), _) => {
                        for (i, sector) in bytes.chunks(SECTOR).enumerate() {
                            if rng.bool() {
                                write_into(&mut data, pos + (i * SECTOR) as u64, sector);
                            }
                        }
                    }
                }
            }
            let data = FileData {
                current: data.clone(),
                durable: data,
                ..FileData::default()
            };
            names.insert(name.clone(), Rc::new(RefCell::new(data)));
        }
        let mut next = State::new(seed ^ 0x5eed);
        next.durable_names = names.clone();
        next.names = names;
        next.latency = state.latency;
        next.manual_clock = state.manual_clock;
        next.now = state.now;
        SimDisk {
            state: Rc::new(RefCell::new(next)),
        }
    }

    /// Flips bits at `pos` in the named file, durably, as a failing disk would.
    pub fn corrupt(&self, name: &str, pos: u64, xor: u8) {
        let state = self.state.borrow();
        let mut file = state
            .names
            .get(name)
            .expect("corrupt: no such file")
            .borrow_mut();
        let pos = pos as usize;
        file.current[pos] ^= xor;
        file.durable[pos] ^= xor;
    }

    /// Replaces the named file's contents, durably (to plant bytes a test needs).
    pub fn overwrite(&self, name: &str, bytes: &[u8]) {
        let mut state = self.state.borrow_mut();
        let file: FileRef = Rc::new(RefCell::new(FileData {
            current: bytes.to_vec(),
            durable: bytes.to_vec(),
            ..FileData::default()
        }));
        state.names.insert(name.to_owned(), file.clone());
        state.durable_names.insert(name.to_owned(), file);
    }

    /// The named file's current contents.
    pub fn contents(&self, name: &str) -> Option<Vec<u8>> {
        let state = self.state.borrow();
        state.names.get(name).map(|f| f.borrow().current.clone())
    }

    pub fn file_len(&self, name: &str) -> Option<u64> {
        self.state
            .borrow()
            .names
            .get(name)
            .map(|f| f.borrow().current.len() as u64)
    }

    pub fn names(&self) -> Vec<String> {
        self.state.borrow().names.keys().cloned().collect()
    }

    /// Yields to the executor as many times as the latency generator says.
    async fn delay(&self) {
        let yields = {
            let mut state = self.state.borrow_mut();
            match state.latency {
                0 => 0,
                max => state.rng.u32(0..=max),
            }
        };
        for _ in 0..yields {
            futures_lite::future::yield_now().await;
        }
    }
}

fn write_into(data: &mut Vec<u8>, pos: u64, bytes: &[u8]) {
    let pos = pos as usize;
    if data.len() < pos + bytes.len() {
        data.resize(pos + bytes.len(), 0);
    }
    data[pos..pos + bytes.len()].copy_from_slice(bytes);
}

pub struct SimFile {
    data: FileRef,
    disk: SimDisk,
}

impl WriteBuf for Vec<u8> {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl Disk for SimDisk {
    type File = SimFile;

    async fn open(&self, name: &str) -> io::Result<SimFile> {
        self.delay().await;
        let mut state = self.state.borrow_mut();
        state.check_running()?;
        if !state.names.contains_key(name) {
            let fail_at = state.faults.fail_create_at;
            if fires(fail_at, &mut state.counters.creates) {
                return Err(io::Error::from_raw_os_error(libc::EMFILE));
            }
        }
        if !state.names.contains_key(name) {
            state.names_seq += 1;
        }
        let data = state.names.entry(name.to_owned()).or_default().clone();
        Ok(SimFile {
            data,
            disk: self.clone(),
        })
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        self.delay().await;
        let state = self.state.borrow();
        state.check_running()?;
        Ok(state.names.keys().cloned().collect())
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        self.delay().await;
        let mut state = self.state.borrow_mut();
        state.tick()?;
        let fail_at = state.faults.fail_remove_at;
        if fires(fail_at, &mut state.counters.removes) {
            return Err(io::Error::other("simulated unlink failure (EIO)"));
        }
        state.names_seq += 1;
        match state.names.remove(name) {
            Some(_) => Ok(()),
            None => Err(io::Error::new(io::ErrorKind::NotFound, name.to_owned())),
        }
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.delay().await;
        let mut state = self.state.borrow_mut();
        state.tick()?;
        let file = state
            .names
            .remove(from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, from.to_owned()))?;
        state.names.insert(to.to_owned(), file);
        state.names_seq += 1;
        Ok(())
    }

    async fn sync_dir(&self) -> io::Result<()> {
        // Like fdatasync: what the directory held when the sync was issued.
        let (names, seq) = {
            let state = self.state.borrow();
            (state.names.clone(), state.names_seq)
        };
        self.delay().await;
        let mut state = self.state.borrow_mut();
        state.tick()?;
        let fail_at = state.faults.fail_sync_dir_at;
        if fires(fail_at, &mut state.counters.dir_syncs) {
            return Err(io::Error::other("simulated directory fsync failure (EIO)"));
        }
        // A sync issued earlier but completing later covers nothing new.
        if seq >= state.durable_seq {
            state.durable_names = names;
            state.durable_seq = seq;
        }
        Ok(())
    }

    async fn sleep(&self, duration: Duration) {
        let deadline = {
            let mut state = self.state.borrow_mut();
            if !state.manual_clock {
                state.now += duration;
                return;
            }
            state.now + duration
        };
        poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if state.now >= deadline {
                return Poll::Ready(());
            }
            state.sleepers.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    async fn yield_now(&self) {
        futures_lite::future::yield_now().await;
    }

    fn fresh_salt(&self) -> u64 {
        self.state.borrow_mut().rng.u64(..)
    }

    fn now(&self) -> Duration {
        self.state.borrow().now
    }
}

impl DiskFile for SimFile {
    type Buf = Vec<u8>;
    type Read = Vec<u8>;

    fn alloc(&self, len: usize) -> Vec<u8> {
        vec![0; len]
    }

    async fn write_at(&self, mut buf: Vec<u8>, pos: u64) -> io::Result<()> {
        self.disk.delay().await;
        let mut state = self.disk.state.borrow_mut();
        state.tick()?;
        let growth = {
            let file = self.data.borrow();
            (pos + buf.len() as u64).saturating_sub(file.current.len() as u64)
        };
        state.check_space(growth)?;
        let fail_at = state.faults.fail_write_at;
        let failed = fires(fail_at, &mut state.counters.writes);
        if failed {
            // Some leading sectors reached the disk before the error.
            let sectors = buf.len().div_ceil(SECTOR);
            let written = state.rng.usize(0..=sectors) * SECTOR;
            buf.truncate(written.min(buf.len()));
        }
        let mut file = self.data.borrow_mut();
        write_into(&mut file.current, pos, &buf);
        file.push(Pending::Write(pos, buf));
        if failed {
            return Err(io::Error::other("simulated write failure (EIO)"));
        }
        Ok(())
    }

    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        self.disk.delay().await;
        self.disk.state.borrow().check_running()?;
        let file = self.data.borrow();
        let start = (pos as usize).min(file.current.len());
        let end = (start + len).min(file.current.len());
        Ok(file.current[start..end].to_vec())
    }

    async fn sync(&self) -> io::Result<()> {
        // An fdatasync covers what was written before it was issued; writes that
        // complete while it runs may stay pending.
        let (covered, failures) = {
            let file = self.data.borrow();
            (file.next_seq, file.sync_failures)
        };
        self.disk.delay().await;
        let mut state = self.disk.state.borrow_mut();
        state.tick()?;
        let fail_at = state.faults.fail_sync_at;
        let mut file = self.data.borrow_mut();
        if fires(fail_at, &mut state.counters.syncs) {
            // What Linux does after a failed fsync: the pending pages are marked clean
            // and forgotten, so they are not durable and a retry would not write them.
            file.pending.clear();
            file.sync_failures += 1;
            return Err(io::Error::other("simulated fdatasync failure (EIO)"));
        }
        if file.sync_failures != failures {
            return Err(io::Error::other(
                "simulated fdatasync failure (EIO, seen by a concurrent sync)",
            ));
        }
        let split = file.pending.partition_point(|(seq, _)| *seq < covered);
        let done: Vec<(u64, Pending)> = file.pending.drain(..split).collect();
        for (_, pending) in done {
            match pending {
                Pending::Write(pos, bytes) => write_into(&mut file.durable, pos, &bytes),
                Pending::Resize(len) => file.durable.resize(len as usize, 0),
            }
        }
        Ok(())
    }

    async fn size(&self) -> io::Result<u64> {
        self.disk.delay().await;
        self.disk.state.borrow().check_running()?;
        Ok(self.data.borrow().current.len() as u64)
    }

    async fn truncate(&self, len: u64) -> io::Result<()> {
        self.disk.delay().await;
        let mut state = self.disk.state.borrow_mut();
        state.tick()?;
        let growth = len.saturating_sub(self.data.borrow().current.len() as u64);
        state.check_space(growth)?;
        let mut file = self.data.borrow_mut();
        file.current.resize(len as usize, 0);
        file.push(Pending::Resize(len));
        Ok(())
    }

    async fn allocate(&self, len: u64) -> io::Result<()> {
        let current = self.data.borrow().current.len() as u64;
        if len <= current {
            return Ok(());
        }
        self.truncate(len).await
    }
}
