//! `ring.view` in the data directory: the node's ring view (`ringkv_cluster::RingView`),
//! stored before anyone hears of it (see `ringkv_cluster::keeper`). A node that told
//! its peers it writes to both rings of a change must come back from a crash knowing
//! the change.
//!
//! The file is a magic, an xxh3-64 of the rest, then the view as the peer frame keepers
//! send each other (`ringkv_proto::peer_message::encode_ring_view`), so it is checked
//! twice on load: the checksum catches a damaged file, the decoder a view that does not
//! hold together. Either is an error the node stops on, never a view it guesses at.
//! Written through a temporary file, fsynced and renamed (`layout::write_durably`): a
//! crash leaves the old view or the new one.

use std::path::{Path, PathBuf};

use ringkv_cluster::RingView;
use ringkv_proto::peer::MemberSpec;
use ringkv_proto::peer_message::{Incoming, PeerInput, RingFrame, encode_ring_view};
use xxhash_rust::xxh3::xxh3_64;

pub const FILE_NAME: &str = "ring.view";
const MAGIC: &[u8; 8] = b"ringkvV1";
const HEADER: usize = MAGIC.len() + 8;

#[derive(Debug, thiserror::Error)]
pub enum RingFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is damaged ({why}); restore it from a peer's or remove it to rejoin")]
    Damaged { path: PathBuf, why: String },
}

/// Stores the cluster's id, `view` and the members' native addresses durably in `dir`.
pub fn store(
    dir: &Path,
    cluster: u64,
    view: &RingView,
    addresses: &[MemberSpec],
) -> Result<(), RingFileError> {
    let path = dir.join(FILE_NAME);
    let mut frame = Vec::new();
    encode_ring_view(cluster, view, addresses, &mut frame).map_err(|e| RingFileError::Damaged {
        path: path.clone(),
        why: format!("the view does not fit a frame: {e}"),
    })?;
    let mut bytes = Vec::with_capacity(HEADER + frame.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&xxh3_64(&frame).to_le_bytes());
    bytes.extend_from_slice(&frame);
    crate::layout::write_durably(dir, &path, &bytes).map_err(|source| RingFileError::Io {
        path: path.clone(),
        source,
    })
}

/// What is stored in `dir`, or `None` if nothing ever was.
pub fn load(dir: &Path) -> Result<Option<RingFrame>, RingFileError> {
    let path = dir.join(FILE_NAME);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(RingFileError::Io { path, source }),
    };
    let damaged = |why: String| RingFileError::Damaged {
        path: path.clone(),
        why,
    };
    if bytes.len() < HEADER || &bytes[..MAGIC.len()] != MAGIC {
        return Err(damaged("not a ring view file".into()));
    }
    let (sum, frame) = bytes[MAGIC.len()..].split_at(8);
    let sum = u64::from_le_bytes(sum.try_into().expect("split at 8"));
    if xxh3_64(frame) != sum {
        return Err(damaged("checksum mismatch".into()));
    }
    match PeerInput::new(frame).next_message() {
        Ok(Some(Incoming::Ring(frame))) => Ok(Some(frame)),
        Ok(_) => Err(damaged("no ring view in it".into())),
        Err(e) => Err(damaged(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv_cluster::{Member, NodeId, Ring, RingChange};

    fn joining() -> RingView {
        let members: Vec<Member> = (1..=3).map(|n| Member::new(NodeId(n))).collect();
        let stable = RingView::stable(Ring::new(64, &members).unwrap(), 3);
        stable
            .start(RingChange::Join(Member::new(NodeId(4))))
            .unwrap()
    }

    #[test]
    fn a_stored_view_loads_back_and_replaces_the_last() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let mut view = joining();
        let addresses = vec![MemberSpec {
            node_id: 4,
            native: "127.0.0.1:7540".into(),
        }];
        store(dir.path(), 9, &view, &addresses).unwrap();
        let frame = load(dir.path()).unwrap().unwrap();
        assert_eq!((frame.cluster, &frame.view), (9, &view));
        assert_eq!(frame.addresses, addresses);
        let first = view.pending().next().unwrap();
        view.mark_moved(first, view.fingerprint());
        store(dir.path(), 9, &view, &[]).unwrap();
        assert_eq!(load(dir.path()).unwrap().unwrap().view, view);
    }

    #[test]
    fn a_damaged_or_truncated_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        store(dir.path(), 9, &joining(), &[]).unwrap();
        let path = dir.path().join(FILE_NAME);
        let good = std::fs::read(&path).unwrap();
        let mut flipped = good.clone();
        let last = flipped.len() - 20;
        flipped[last] ^= 0x40;
        for bad in [
            flipped,
            good[..good.len() / 2].to_vec(),
            b"ringkvV1".to_vec(),
        ] {
            std::fs::write(&path, &bad).unwrap();
            assert!(matches!(
                load(dir.path()),
                Err(RingFileError::Damaged { .. })
            ));
        }
    }
}
