//! Where do the slowest durable puts come from? Runs 64 closed-loop writers against one
//! store and timestamps every segment rotation (a new segment file appearing), then
//! counts how many slow puts finished shortly after a rotation.
//!
//! Run: cargo run --release -p ringkv-bench --example put_stalls -- [dir] [seconds] [segment MiB]

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use ringkv_bench::report::{Recorder, print_table};
use ringkv_engine::disk::DmaDisk;
use ringkv_engine::{Store, StoreConfig};

const WRITERS: u64 = 64;
const SLOW: Duration = Duration::from_millis(2);
/// A slow put "follows" a rotation if it finished within this long after one.
const WINDOW: Duration = Duration::from_millis(100);

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| ".".into()));
    let seconds: f64 = args.next().map_or(Ok(10.0), |s| s.parse())?;
    let segment_mib: u64 = args.next().map_or(Ok(64), |s| s.parse())?;
    let scratch = tempfile::tempdir_in(&dir)?;
    let root = scratch.path().to_path_buf();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let config = StoreConfig {
                segment_size: segment_mib << 20,
                ..StoreConfig::default()
            };
            let store = Store::open(DmaDisk::new(&root)?, config).await?;
            let runner = store.clone();
            glommio::spawn_local(async move { runner.run().await }).detach();
            let started = Instant::now();
            let phase = Duration::from_secs_f64(seconds);
            let rotations = Rc::new(RefCell::new(Vec::new()));
            let sampler = {
                let (root, rotations) = (root.clone(), rotations.clone());
                glommio::spawn_local(async move {
                    let mut logs = 0;
                    while started.elapsed() < phase {
                        let now = std::fs::read_dir(&root)
                            .map(|d| {
                                d.filter_map(Result::ok)
                                    .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                                    .count()
                            })
                            .unwrap_or(logs);
                        if now > logs && logs > 0 {
                            rotations.borrow_mut().push(started.elapsed());
                        }
                        logs = now;
                        glommio::timer::sleep(Duration::from_millis(1)).await;
                    }
                })
            };
            let all = Rc::new(RefCell::new(Recorder::default()));
            let slow = Rc::new(RefCell::new(Vec::new()));
            let mut tasks = Vec::new();
            for w in 0..WRITERS {
                let (store, all, slow) = (store.clone(), all.clone(), slow.clone());
                tasks.push(glommio::spawn_local(async move {
                    let mut i = w << 40;
                    while started.elapsed() < phase {
                        let t = Instant::now();
                        store.put((i % 64) as u32, &i.to_be_bytes(), b"version", &[7u8; 100]).await?;
                        let latency = t.elapsed();
                        all.borrow_mut().record(latency);
                        if latency >= SLOW {
                            slow.borrow_mut().push((started.elapsed(), latency));
                        }
                        i += 1;
                    }
                    anyhow::Ok(())
                }));
            }
            for task in tasks {
                task.await?;
            }
            sampler.await;
            let elapsed = started.elapsed();
            store.close().await?;
            print_table(&[all.borrow().measurement("put (sync), 64 writers", elapsed)]);
            let rotations = rotations.borrow();
            let slow = slow.borrow();
            let near = |at: Duration| rotations.iter().any(|&r| at >= r && at <= r + WINDOW);
            let following = slow.iter().filter(|(at, _)| near(*at)).count();
            let worst = slow.iter().filter(|(_, l)| *l >= SLOW * 2).count();
            let worst_following = slow
                .iter()
                .filter(|(at, l)| *l >= SLOW * 2 && near(*at))
                .count();
            println!(
                "{segment_mib} MiB segments: {} rotations in {:.1} s; {} puts took >= {:?}, {} of them finished within {:?} after a rotation; {} took >= {:?}, {} of them after a rotation",
                rotations.len(),
                elapsed.as_secs_f64(),
                slow.len(),
                SLOW,
                following,
                WINDOW,
                worst,
                SLOW * 2,
                worst_following
            );
            let mut longest: Vec<(Duration, Duration)> = slow.to_vec();
            longest.sort_by_key(|&(_, l)| std::cmp::Reverse(l));
            longest.dedup_by_key(|&mut (at, _)| at.as_millis() / 5);
            println!(
                "longest stalls (finished at s, ms): {:?}",
                longest
                    .iter()
                    .take(8)
                    .map(|(at, l)| (
                        (at.as_secs_f64() * 1000.0).round() / 1000.0,
                        (l.as_secs_f64() * 10000.0).round() / 10.0
                    ))
                    .collect::<Vec<_>>()
            );
            println!("rotations at (s): {:?}", rotations.iter().map(|r| (r.as_secs_f64() * 1000.0).round() / 1000.0).collect::<Vec<_>>());
            anyhow::Ok(())
        })
        .map_err(|e| anyhow::anyhow!("cannot start a glommio executor: {e}"))?
        .join()
        .map_err(|e| anyhow::anyhow!("executor failed: {e:?}"))?
}
