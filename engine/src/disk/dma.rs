//! Real storage: O_DIRECT files driven by glommio's io_uring reactor.

use std::cell::Cell;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use glommio::io::{DmaBuffer, DmaFile, OpenOptions, ReadResult};

use super::{Disk, DiskFile, WriteBuf};
use crate::config::ALIGN;

/// A directory on a real filesystem. Must be used inside a glommio executor.
#[derive(Clone, Debug)]
pub struct DmaDisk {
    root: Rc<PathBuf>,
    probed: Rc<Cell<bool>>,
    started: std::time::Instant,
}

/// Name of the 4 KiB file used to make glommio's IOPOLL probe honest (see `probe`).
const PROBE_FILE: &str = ".iopoll-probe";

impl DmaDisk {
    /// Uses `root`, creating it if needed.
    pub fn new(root: impl AsRef<Path>) -> io::Result<DmaDisk> {
        std::fs::create_dir_all(root.as_ref())?;
        // glommio cannot open a relative directory for fsync (EBADF); keep it absolute.
        let root = std::fs::canonicalize(root.as_ref())?;
        Ok(DmaDisk {
            root: Rc::new(root),
            probed: Rc::default(),
            started: std::time::Instant::now(),
        })
    }

    /// Makes glommio decide correctly whether this device supports polled I/O.
    ///
    /// glommio decides once per device and process, by reading the first 4 KiB of the
    /// first DMA file opened there through the IOPOLL ring. If that file is empty the
    /// kernel answers "end of file" without asking the device, glommio concludes that
    /// polling works, and every later read on a device without poll queues (virtio-blk,
    /// most cloud disks) fails with EOPNOTSUPP. So the first DMA file we open is one
    /// with 4 KiB of data in it.
    async fn probe(&self) -> io::Result<()> {
        if self.probed.replace(true) {
            return Ok(());
        }
        let path = self.root.join(PROBE_FILE);
        std::fs::write(&path, [0u8; ALIGN as usize])?;
        let file = OpenOptions::new().read(true).dma_open(&path).await?;
        file.close().await?;
        std::fs::remove_file(&path)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

pub struct DmaDiskFile {
    file: DmaFile,
}

impl WriteBuf for DmaBuffer {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.as_bytes_mut()
    }
}

impl Disk for DmaDisk {
    type File = DmaDiskFile;

    async fn open(&self, name: &str) -> io::Result<DmaDiskFile> {
        self.probe().await?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .dma_open(self.root.join(name))
            .await?;
        if !ALIGN.is_multiple_of(file.alignment()) {
            return Err(io::Error::other(format!(
                "{name}: device needs {}-byte direct I/O alignment, ringkv writes {ALIGN}-byte blocks",
                file.alignment()
            )));
        }
        Ok(DmaDiskFile { file })
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&*self.root)? {
            if let Some(name) = entry?.file_name().to_str().filter(|n| *n != PROBE_FILE) {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.root.join(name))
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.root.join(from), self.root.join(to))
    }

    async fn sync_dir(&self) -> io::Result<()> {
        let dir = glommio::io::Directory::open(&*self.root).await?;
        dir.sync().await?;
        dir.close().await?;
        Ok(())
    }

    async fn sleep(&self, duration: Duration) {
        glommio::timer::sleep(duration).await;
    }

    async fn yield_now(&self) {
        glommio::yield_if_needed().await;
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    fn fresh_salt(&self) -> u64 {
        // fastrand's per-thread generator is seeded from the OS's randomness.
        fastrand::u64(..)
    }
}

impl DiskFile for DmaDiskFile {
    type Buf = DmaBuffer;
    type Read = ReadResult;

    fn alloc(&self, len: usize) -> DmaBuffer {
        let mut buf = self.file.alloc_dma_buffer(len);
        buf.as_bytes_mut().fill(0);
        buf
    }

    async fn write_at(&self, buf: DmaBuffer, pos: u64) -> io::Result<()> {
        let len = buf.len();
        let written = self.file.write_at(buf, pos).await?;
        if written != len {
            // O_DIRECT writes of whole blocks come back short when the filesystem runs out
            // of space part way; the next attempt would fail with ENOSPC.
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("short write: {written} of {len} bytes at offset {pos}"),
            ));
        }
        Ok(())
    }

    async fn read_at(&self, pos: u64, len: usize) -> io::Result<ReadResult> {
        Ok(self.file.read_at(pos, len).await?)
    }

    async fn sync(&self) -> io::Result<()> {
        Ok(self.file.fdatasync().await?)
    }

    async fn size(&self) -> io::Result<u64> {
        Ok(self.file.file_size().await?)
    }

    async fn truncate(&self, len: u64) -> io::Result<()> {
        Ok(self.file.truncate(len).await?)
    }

    async fn allocate(&self, len: u64) -> io::Result<()> {
        Ok(self.file.pre_allocate(len, false).await?)
    }
}
