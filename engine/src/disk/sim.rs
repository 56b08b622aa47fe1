//! A simulated disk in memory that is honest about what survives a crash.
//!
//! Each file keeps what is durable and the writes made since its last sync. `crash`
//! returns the disk a reboot would find: each pending write is dropped, applied, or torn
//! (a random subset of its 512-byte sectors applied), and file creations, renames and
//! removals not followed by `sync_dir` are undone. Faults can be injected: a capacity
//! (ENOSPC), a failing fdatasync (EIO), and a point after which every operation fails,
//! as if the machine stopped there.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;
use std::time::Duration;

use super::{Disk, DiskFile, WriteBuf};

const SECTOR: usize = 512;

/// Faults to inject. All counters count from the moment they are set.
#[derive(Debug, Clone, Default)]
pub struct SimFaults {
    /// Total bytes all files may hold; writes past it fail with ENOSPC.
    pub capacity: Option<u64>,
    /// The sync with this number (0 = the next one) fails with EIO.
    pub fail_sync_at: Option<u64>,
    /// After this many more mutating operations, every operation fails: the machine
    /// "stopped" there, and `crash` gives what it would find after a reboot.
    pub stop_after_ops: Option<u64>,
}

#[derive(Default)]
struct FileData {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
}

type FileRef = Rc<RefCell<FileData>>;

#[derive(Default)]
struct State {
    names: BTreeMap<String, FileRef>,
    durable_names: BTreeMap<String, FileRef>,
    faults: SimFaults,
    syncs: u64,
    stopped: bool,
}

impl State {
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
}

/// An in-memory directory. Clones share the same files.
#[derive(Clone, Default)]
pub struct SimDisk {
    state: Rc<RefCell<State>>,
}

impl SimDisk {
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    pub fn set_faults(&self, faults: SimFaults) {
        let mut state = self.state.borrow_mut();
        state.faults = faults;
        state.syncs = 0;
    }

    /// True once `stop_after_ops` has run out.
    pub fn stopped(&self) -> bool {
        self.state.borrow().stopped
    }

    /// The disk a reboot would find; `seed` picks which unsynced writes survive, whole
    /// or torn. This disk is left as it was.
    pub fn crash(&self, seed: u64) -> SimDisk {
        let mut rng = fastrand::Rng::with_seed(seed);
        let state = self.state.borrow();
        let mut names = BTreeMap::new();
        for (name, file) in &state.durable_names {
            let file = file.borrow();
            let mut data = file.durable.clone();
            for (pos, bytes) in &file.pending {
                match rng.u8(0..3) {
                    0 => {}
                    1 => write_into(&mut data, *pos, bytes),
                    _ => {
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
                pending: Vec::new(),
            };
            names.insert(name.clone(), Rc::new(RefCell::new(data)));
        }
        let state = State {
            durable_names: names.clone(),
            names,
            ..State::default()
        };
        SimDisk {
            state: Rc::new(RefCell::new(state)),
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
    state: Rc<RefCell<State>>,
}

impl WriteBuf for Vec<u8> {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl Disk for SimDisk {
    type File = SimFile;

    async fn open(&self, name: &str) -> io::Result<SimFile> {
        let mut state = self.state.borrow_mut();
        state.check_running()?;
        let data = state.names.entry(name.to_owned()).or_default().clone();
        Ok(SimFile {
            data,
            state: self.state.clone(),
        })
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        let state = self.state.borrow();
        state.check_running()?;
        Ok(state.names.keys().cloned().collect())
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        let mut state = self.state.borrow_mut();
        state.tick()?;
        match state.names.remove(name) {
            Some(_) => Ok(()),
            None => Err(io::Error::new(io::ErrorKind::NotFound, name.to_owned())),
        }
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut state = self.state.borrow_mut();
        state.tick()?;
        let file = state
            .names
            .remove(from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, from.to_owned()))?;
        state.names.insert(to.to_owned(), file);
        Ok(())
    }

    async fn sync_dir(&self) -> io::Result<()> {
        let mut state = self.state.borrow_mut();
        state.tick()?;
        state.durable_names = state.names.clone();
        Ok(())
    }

    async fn sleep(&self, _duration: Duration) {}

    async fn yield_now(&self) {
        futures_lite::future::yield_now().await;
    }
}

impl DiskFile for SimFile {
    type Buf = Vec<u8>;
    type Read = Vec<u8>;

    fn alloc(&self, len: usize) -> Vec<u8> {
        vec![0; len]
    }

    async fn write_at(&self, buf: Vec<u8>, pos: u64) -> io::Result<()> {
        let mut state = self.state.borrow_mut();
        state.tick()?;
        let mut file = self.data.borrow_mut();
        let growth = (pos + buf.len() as u64).saturating_sub(file.current.len() as u64);
        if let Some(capacity) = state.faults.capacity {
            drop(file);
            if state.used_bytes() + growth > capacity {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "simulated disk full",
                ));
            }
            file = self.data.borrow_mut();
        }
        write_into(&mut file.current, pos, &buf);
        file.pending.push((pos, buf));
        Ok(())
    }

    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        self.state.borrow().check_running()?;
        let file = self.data.borrow();
        let start = (pos as usize).min(file.current.len());
        let end = (start + len).min(file.current.len());
        Ok(file.current[start..end].to_vec())
    }

    async fn sync(&self) -> io::Result<()> {
        let mut state = self.state.borrow_mut();
        state.tick()?;
        let number = state.syncs;
        state.syncs += 1;
        if state.faults.fail_sync_at == Some(number) {
            // What Linux does after a failed fsync: the pending pages are marked clean
            // and forgotten, so they are not durable and a retry would not write them.
            let mut file = self.data.borrow_mut();
            file.pending.clear();
            return Err(io::Error::other("simulated fdatasync failure (EIO)"));
        }
        let mut file = self.data.borrow_mut();
        file.durable = file.current.clone();
        file.pending.clear();
        Ok(())
    }

    async fn size(&self) -> io::Result<u64> {
        self.state.borrow().check_running()?;
        Ok(self.data.borrow().current.len() as u64)
    }
}
