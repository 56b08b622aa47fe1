//! Bare 4 KiB O_DIRECT write + fdatasync latency for the write patterns a store makes:
//! rewriting the same block (a lone writer's group commit rewrites the segment's partial
//! tail block), rewriting blocks in turn across an allocated region, and appending new
//! blocks (what a commit that crosses into a new block does). Interleaved in rounds so
//! drift on a shared machine hits every pattern alike.
//!
//! Run: cargo run --release -p ringkv-bench --example fsync_patterns -- [dir] [seconds]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use glommio::io::{DmaFile, OpenOptions};
use ringkv_bench::report::{Recorder, print_table};

const REGION: u64 = 1 << 20;

fn io<T>(result: glommio::Result<T, ()>) -> std::io::Result<T> {
    result.map_err(std::io::Error::from)
}

async fn open(path: PathBuf) -> std::io::Result<DmaFile> {
    io(OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .dma_open(path)
        .await)
}

async fn write_sync(file: &DmaFile, pos: u64, fill: u8) -> std::io::Result<Duration> {
    let mut buf = file.alloc_dma_buffer(4096);
    buf.as_bytes_mut().fill(fill);
    let t = Instant::now();
    io(file.write_at(buf, pos).await)?;
    io(file.fdatasync().await)?;
    Ok(t.elapsed())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| ".".into()));
    let seconds: f64 = args.next().map_or(Ok(6.0), |s| s.parse())?;
    let scratch = tempfile::tempdir_in(&dir)?;
    let root = scratch.path().to_path_buf();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            // Make glommio's IOPOLL probe see a non-empty file first (see DmaDisk::probe).
            std::fs::write(root.join("probe"), [0u8; 4096])?;
            io(io(OpenOptions::new()
                .read(true)
                .dma_open(root.join("probe"))
                .await)?
            .close()
            .await)?;
            let region = open(root.join("region")).await?;
            let mut buf = region.alloc_dma_buffer(REGION as usize);
            buf.as_bytes_mut().fill(1);
            io(region.write_at(buf, 0).await)?;
            io(region.fdatasync().await)?;
            let append = open(root.join("append")).await?;
            let (mut same, mut cycle, mut grow) = (
                Recorder::default(),
                Recorder::default(),
                Recorder::default(),
            );
            let (mut pos, mut end, mut n) = (0u64, 0u64, 0u8);
            let started = Instant::now();
            while started.elapsed().as_secs_f64() < seconds {
                for _ in 0..50 {
                    n = n.wrapping_add(1);
                    same.record(write_sync(&region, 0, n).await?);
                }
                for _ in 0..50 {
                    pos = (pos + 4096) % REGION;
                    cycle.record(write_sync(&region, pos.max(4096), n).await?);
                }
                for _ in 0..50 {
                    grow.record(write_sync(&append, end, n).await?);
                    end += 4096;
                }
            }
            let elapsed = started.elapsed() / 3;
            print_table(&[
                same.measurement("rewrite the same block + fdatasync", elapsed),
                cycle.measurement("rewrite blocks in turn + fdatasync", elapsed),
                grow.measurement("append a new block + fdatasync", elapsed),
            ]);
            anyhow::Ok(())
        })
        .map_err(|e| anyhow::anyhow!("cannot start a glommio executor: {e}"))?
        .join()
        .map_err(|e| anyhow::anyhow!("executor failed: {e:?}"))?
}
