//! kill -9 in the middle of writes: every acknowledged put and delete survives.
//!
//! A child process (engine-writer) writes with four concurrent writers and logs each
//! acknowledgement; the parent kills it with SIGKILL at a varying point, reopens the
//! store in-process and checks every acknowledged operation. Three rounds share one
//! directory, so each round also recovers what the earlier kills left behind.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use ringkv_engine::disk::DmaDisk;
use ringkv_engine::{Store, StoreConfig};
use ringkv_tests::value_for;

#[derive(Default)]
struct Log {
    /// key -> partition, for every acknowledged put.
    puts: BTreeMap<String, u32>,
    deleting: BTreeSet<String>,
    deleted: BTreeSet<String>,
}

fn run_and_kill(dir: &Path, prefix: &str, acks_before_kill: usize, log: &mut Log) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_engine-writer"))
        .args([dir.to_str().unwrap(), prefix, "4"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start engine-writer");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let mut acks = 0;
    let record = |line: &str, log: &mut Log| {
        let (what, key) = line
            .split_once(' ')
            .expect("malformed line from engine-writer");
        let partition = key.rsplit('-').next().unwrap().parse::<u32>().unwrap() % 16;
        match what {
            "put" => drop(log.puts.insert(key.to_owned(), partition)),
            "deleting" => drop(log.deleting.insert(key.to_owned())),
            "deleted" => drop(log.deleted.insert(key.to_owned())),
            other => panic!("unknown line {other}"),
        }
    };
    for line in lines.by_ref() {
        let line = line.unwrap();
        record(&line, log);
        acks += 1;
        if acks == acks_before_kill {
            break;
        }
    }
    child.kill().expect("kill -9");
    // Lines already in the pipe were printed after their acknowledgement: they count.
    for line in lines.map_while(Result::ok) {
        // A line cut by the kill is not an acknowledgement.
        if line
            .split_once(' ')
            .is_some_and(|(_, k)| k.matches('-').count() == 2)
        {
            record(&line, log);
        }
    }
    child.wait().unwrap();
}

fn verify(dir: &Path, log: &Log) -> usize {
    let dir = dir.to_path_buf();
    let puts = log.puts.clone();
    let deleting = log.deleting.clone();
    let deleted = log.deleted.clone();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let store = Store::open(DmaDisk::new(&dir).unwrap(), StoreConfig::default())
                .await
                .unwrap();
            for (key, partition) in &puts {
                let record = store.get(*partition, key.as_bytes()).await.unwrap();
                let record = record.unwrap_or_else(|| panic!("acknowledged put of {key} lost"));
                if deleted.contains(key) {
                    assert!(record.is_tombstone(), "acknowledged delete of {key} lost");
                } else if record.is_tombstone() {
                    assert!(
                        deleting.contains(key),
                        "{key} deleted though nobody deleted it"
                    );
                } else {
                    assert_eq!(record.value(), value_for(key), "{key} has the wrong value");
                }
            }
            puts.len()
        })
        .unwrap()
        .join()
        .unwrap()
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut log = Log::default();
    for (round, acks) in [(0, 400), (1, 1500), (2, 4000)] {
        run_and_kill(dir.path(), &format!("r{round}"), acks, &mut log);
        let checked = verify(dir.path(), &log);
        assert!(
            checked >= acks * 2 / 3,
            "round {round}: only {checked} puts checked"
        );
        assert!(!log.deleted.is_empty());
    }
}
