//! The data directory: `node.toml` records what must never change under existing data
//! (partition and shard counts, node id) and the node's incarnation, which is bumped
//! durably on every start so a restarted node never reuses a version dot.
//! Shard i keeps its store in `shard-<i>/`.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeLayout {
    pub format: u32,
    pub node_id: u32,
    pub partitions: u32,
    pub shards: usize,
    pub incarnation: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("data directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {dir} is not writable: {source}")]
    NotWritable {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {dir} is in use by another running ringkv node")]
    Locked { dir: PathBuf },
    #[error("{path} is damaged: {message}")]
    Damaged { path: PathBuf, message: String },
    #[error(
        "data directory {dir} was created with {recorded}; this start asks for {requested}. \
         Start with the recorded value, or use a new data directory (resharding is not supported yet)"
    )]
    Mismatch {
        dir: PathBuf,
        recorded: String,
        requested: String,
    },
}

const FILE: &str = "node.toml";

/// Held for as long as a node runs: a second node on the same data directory would
/// corrupt both. Released (by the kernel) when the process exits, however it exits.
pub struct DirLock {
    _file: std::fs::File,
}

pub fn lock(dir: &Path) -> Result<DirLock, LayoutError> {
    let io = |source| LayoutError::Io {
        dir: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = std::fs::File::create(dir.join("LOCK")).map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(DirLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(LayoutError::Locked {
            dir: dir.to_owned(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// Opens (or creates) the layout in `dir`, checks it against the requested shape, bumps
/// the incarnation durably and returns the new layout.
pub fn open(
    dir: &Path,
    node_id: u32,
    partitions: u32,
    shards: usize,
) -> Result<NodeLayout, LayoutError> {
    let io = |source| LayoutError::Io {
        dir: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let probe = dir.join(".write-probe");
    std::fs::write(&probe, b"ok")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|source| LayoutError::NotWritable {
            dir: dir.to_owned(),
            source,
        })?;
    let path = dir.join(FILE);
    let mut layout = match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str::<NodeLayout>(&text).map_err(|e| LayoutError::Damaged {
            path: path.clone(),
            message: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => NodeLayout {
            format: 1,
            node_id,
            partitions,
            shards,
            incarnation: 0,
        },
        Err(e) => return Err(io(e)),
    };
    let mismatch = |what: &str, recorded: String, requested: String| LayoutError::Mismatch {
        dir: dir.to_owned(),
        recorded: format!("{what} = {recorded}"),
        requested: format!("{what} = {requested}"),
    };
    if layout.node_id != node_id {
        return Err(mismatch(
            "node_id",
            layout.node_id.to_string(),
            node_id.to_string(),
        ));
    }
    if layout.partitions != partitions {
        return Err(mismatch(
            "partitions",
            layout.partitions.to_string(),
            partitions.to_string(),
        ));
    }
    if layout.shards != shards {
        return Err(mismatch(
            "shards",
            layout.shards.to_string(),
            shards.to_string(),
        ));
    }
    layout.incarnation += 1;
    let text = toml::to_string(&layout).map_err(|e| io(std::io::Error::other(e)))?;
    write_durably(dir, &path, text.as_bytes()).map_err(io)?;
    Ok(layout)
}

/// Writes `bytes` to `path` in `dir` through a temporary file, fsyncs it, renames it
/// over the old one and fsyncs the directory, so a crash leaves the old file or the
/// new one, never half of one.
pub(crate) fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

pub fn shard_dir(dir: &Path, shard: usize) -> PathBuf {
    dir.join(format!("shard-{shard}"))
}

/// The first non-empty file found in a shard's directory (its store, its hints), if
/// any shard has one: whether this data directory has held data. Directories (a
/// mount point's `lost+found`) and empty files do not count.
pub fn first_store_file(dir: &Path, shards: usize) -> Option<PathBuf> {
    (0..shards).find_map(|shard| {
        let entries = std::fs::read_dir(shard_dir(dir, shard)).ok()?;
        entries
            .flatten()
            .find(|e| e.metadata().is_ok_and(|m| m.is_file() && m.len() > 0))
            .map(|e| e.path())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_node_cannot_lock_the_same_directory() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        assert!(matches!(lock(dir.path()), Err(LayoutError::Locked { .. })));
        drop(held);
        assert!(lock(dir.path()).is_ok());
    }

    #[test]
    fn incarnation_grows_and_shape_changes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(open(dir.path(), 1, 64, 2).unwrap().incarnation, 1);
        assert_eq!(open(dir.path(), 1, 64, 2).unwrap().incarnation, 2);
        let err = open(dir.path(), 1, 64, 4).unwrap_err().to_string();
        assert!(
            err.contains("shards = 2") && err.contains("shards = 4"),
            "{err}"
        );
        assert!(open(dir.path(), 1, 128, 2).is_err());
        assert!(open(dir.path(), 2, 64, 2).is_err());
        std::fs::write(dir.path().join(FILE), "garbage = [").unwrap();
        assert!(matches!(
            open(dir.path(), 1, 64, 2),
            Err(LayoutError::Damaged { .. })
        ));
    }
}
