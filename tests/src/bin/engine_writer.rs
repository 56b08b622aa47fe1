//! Test helper: writes to an engine store as fast as it can and reports every
//! acknowledgement on stdout, so a parent can kill -9 it mid-stream and then check
//! that every acknowledged write survived.
//!
//! Usage: engine-writer DIR PREFIX WRITERS
//! Prints `ready`, then `put KEY` after each acknowledged put, `deleting KEY` before a
//! delete is issued and `deleted KEY` once it is acknowledged.

use std::io::Write;
use std::rc::Rc;

use anyhow::Context;
use ringkv_engine::disk::DmaDisk;
use ringkv_engine::{Store, StoreConfig};
use ringkv_tests::value_for;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A parent that stopped reading is killing us anyway.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: engine-writer DIR PREFIX WRITERS";
    let dir = args.next().context(usage)?;
    let prefix = args.next().context(usage)?;
    let writers: u32 = args.next().context(usage)?.parse().context(usage)?;
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            // Small segments so kills land during rotation and hint writes too.
            let config = StoreConfig {
                segment_size: 512 << 10,
                max_value_len: 4096,
                commit_batch_bytes: 64 << 10,
                ..StoreConfig::default()
            };
            let store = Store::open(DmaDisk::new(&dir)?, config)
                .await
                .map_err(anyhow::Error::from)?;
            let runner = store.clone();
            glommio::spawn_local(async move { runner.run().await }).detach();
            say("ready");
            let mut tasks = Vec::new();
            for w in 0..writers {
                let store: Rc<Store<DmaDisk>> = store.clone();
                let prefix = prefix.clone();
                tasks.push(glommio::spawn_local(async move {
                    for n in 0u64.. {
                        let key = format!("{prefix}-{w}-{n}");
                        store
                            .put(n as u32 % 16, key.as_bytes(), b"v1", &value_for(&key))
                            .await?;
                        say(&format!("put {key}"));
                        if n % 5 == 4 {
                            let victim = format!("{prefix}-{w}-{}", n - 2);
                            say(&format!("deleting {victim}"));
                            store
                                .delete((n - 2) as u32 % 16, victim.as_bytes(), b"v2")
                                .await?;
                            say(&format!("deleted {victim}"));
                        }
                    }
                    anyhow::Ok(())
                }));
            }
            for task in tasks {
                task.await?;
            }
            anyhow::Ok(())
        })
        .map_err(|e| anyhow::anyhow!("cannot start a glommio executor: {e}"))?
        .join()
        .map_err(|e| anyhow::anyhow!("executor failed: {e:?}"))?
}
