//! What makes the outbox's writes durable, beyond what sled does itself.
//!
//! - [`DirSync`]: sled 0.34's `flush()` ends with `sync_file_range`, which
//!   on Linux neither flushes a disk's volatile write cache nor writes the
//!   file's metadata (sled issue #1452), and the outbox turns sled's only
//!   periodic `sync_all` off. So after every sled flush the flusher fsyncs
//!   every file in the outbox directory (and `blobs/`) through descriptors it
//!   keeps open, and a directory itself whenever its entries changed. Only
//!   then is anyone acknowledged.
//! - [`Marker`]: the outbox's own identity, outside sled: an id and the
//!   commit sequence known durable, in a small file written with fsync of
//!   the file and the directory. sled that lost its data (a power cut before
//!   this fix, a volume swapped or wiped) opens empty or older without
//!   complaint; the marker lets `open` see it and refuse, instead of
//!   silently starting with nothing.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::types::OutboxError;

/// Name of the marker file inside the outbox directory.
pub const MARKER_FILE: &str = "duvo-outbox.marker";
/// sled default-tree keys holding the outbox id and the commit sequence.
pub(crate) const META_OUTBOX_ID: &[u8] = b"duvo-meta/outbox-id";
pub(crate) const META_COMMIT_SEQ: &[u8] = b"duvo-meta/commit-seq";

/// Descriptors of the outbox directory's files, fsynced after each flush.
#[derive(Debug)]
pub(crate) struct DirSync {
    root: PathBuf,
    /// Path -> (inode, open descriptor). A name that now points at another
    /// inode (a snapshot replaced by rename) is reopened.
    files: HashMap<PathBuf, (u64, File)>,
    /// Entry names of each directory at its last fsync.
    entries: HashMap<PathBuf, HashSet<std::ffi::OsString>>,
}

/// What one [`DirSync::sync`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SyncStats {
    pub files: usize,
    pub dirs: usize,
}

impl DirSync {
    pub(crate) fn new(root: impl Into<PathBuf>) -> Self {
        DirSync {
            root: root.into(),
            files: HashMap::new(),
            entries: HashMap::new(),
        }
    }

    /// fsync every regular file under the outbox directory (one level, plus
    /// `blobs/`; not the marker, which syncs itself), and each directory whose set of entries changed since the
    /// last call (and every directory the first time).
    pub(crate) fn sync(&mut self) -> io::Result<SyncStats> {
        let mut stats = SyncStats::default();
        let mut dirs = vec![self.root.clone()];
        let blobs = self.root.join("blobs");
        if blobs.is_dir() {
            dirs.push(blobs);
        }
        for dir in dirs {
            // Any entry created, renamed or removed (a file, `blobs/`)
            // since the last fsync of the directory needs one now.
            let mut changed = false;
            let mut names = HashSet::new();
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let name = entry.file_name();
                if name.to_string_lossy().starts_with(MARKER_FILE) {
                    continue; // written durably by [`Marker::write`] itself
                }
                names.insert(name);
                let Ok(kind) = entry.file_type() else {
                    continue; // removed while listing
                };
                if !kind.is_file() {
                    continue;
                }
                let path = entry.path();
                let ino = entry.ino();
                if let Some((known, file)) = self.files.get(&path)
                    && *known == ino
                {
                    file.sync_data()?;
                    stats.files += 1;
                    continue;
                }
                let file = match File::open(&path) {
                    Ok(f) => f,
                    // Removed between the listing and the open: nothing to sync.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                file.sync_all()?;
                stats.files += 1;
                let ino = file.metadata().map(|m| m.ino()).unwrap_or(ino);
                self.files.insert(path, (ino, file));
                changed = true;
            }
            self.files.retain(|p, _| {
                p.parent() != Some(dir.as_path())
                    || p.file_name().is_some_and(|n| names.contains(n))
            });
            changed |= self.entries.get(&dir) != Some(&names);
            if changed {
                File::open(&dir)?.sync_all()?;
                stats.dirs += 1;
                self.entries.insert(dir, names);
            }
        }
        Ok(stats)
    }
}

/// The marker's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Marker {
    /// Identity of the outbox, also stored inside sled.
    pub outbox_id: Uuid,
    /// A commit sequence sled held durably when the marker was written:
    /// sled opening with a lower one has lost committed writes.
    pub commit_seq: u64,
    /// Which copy of the database is current (`compact`): 0 is sled's
    /// files in the outbox directory, N is `sled-N/`.
    #[serde(default)]
    pub generation: u64,
}

impl Marker {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MARKER_FILE)
    }

    /// Read the marker of the outbox in `dir`; `None` if there is none.
    pub fn read(dir: &Path) -> io::Result<Option<Marker>> {
        match std::fs::read(Self::path(dir)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", Self::path(dir).display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Write the marker durably: a temporary file, fsync, rename over the
    /// old one, fsync of the directory. A crash at any point leaves the old
    /// marker or the new one, never a torn one.
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        let tmp = dir.join(format!("{MARKER_FILE}.tmp"));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(self).map_err(io::Error::other)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, Self::path(dir))?;
        File::open(dir)?.sync_all()
    }
}

/// fsync the directories above the outbox: sled creates the outbox
/// directory (and any missing parents) on first open, and a directory's
/// name is durable only once its parent is synced. Without this a cut
/// shortly after the first start loses the whole outbox, marker included.
/// The parent must succeed; higher ones are best effort (they usually
/// existed before and may not be readable).
fn sync_ancestors(dir: &Path) -> io::Result<()> {
    let abs = std::path::absolute(dir)?;
    let mut first = true;
    for a in abs.ancestors().skip(1) {
        match File::open(a).and_then(|f| f.sync_all()) {
            Ok(()) => {}
            Err(e) if first => return Err(e),
            Err(_) => break,
        }
        first = false;
    }
    Ok(())
}

/// Bytes available to us on the filesystem holding `dir` (statvfs);
/// `u64::MAX` for a filesystem that reports no size at all (some FUSE and
/// virtual filesystems), which cannot be judged full.
pub(crate) fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.f_blocks == 0 {
        return Ok(u64::MAX);
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// The outbox's identity once `open` checked sled against the marker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Identity {
    pub outbox_id: Uuid,
    pub commit_seq: u64,
    pub generation: u64,
}

fn read_u64(db: &sled::Db, key: &[u8]) -> Result<Option<u64>, OutboxError> {
    db.get(key)?
        .map(|v| <[u8; 8]>::try_from(v.as_ref()).map(u64::from_be_bytes))
        .transpose()
        .map_err(|_| OutboxError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: "not an 8-byte sequence".into(),
        })
}

/// Check the freshly opened sled in `dir` against the marker, and make
/// both agree from now on:
/// - no marker, no identity in sled: a new outbox (or one from before the
///   marker existed): give it an identity, durably, then the marker;
/// - identity in sled, no marker (a cut before the first marker was
///   durable): write the marker;
/// - a marker, and sled without an identity (opened empty) or a different
///   one, or a lower commit sequence: sled lost committed data. Refused
///   with [`OutboxError::DataLost`] unless `accept_loss`, which logs the
///   loss and starts from what sled holds.
pub(crate) fn check_identity(
    db: &sled::Db,
    dir: &Path,
    dir_sync: &mut DirSync,
    generation: u64,
    accept_loss: bool,
) -> Result<Identity, OutboxError> {
    let marker = Marker::read(dir).map_err(|e| OutboxError::DataLost {
        path: dir.to_path_buf(),
        detail: format!("its marker cannot be read ({e})"),
    })?;
    let sled_id = db
        .get(META_OUTBOX_ID)?
        .map(|v| Uuid::from_slice(&v))
        .transpose()
        .map_err(|_| OutboxError::Corrupt {
            key: "duvo-meta/outbox-id".into(),
            reason: "not a UUID".into(),
        })?;
    let sled_seq = read_u64(db, META_COMMIT_SEQ)?.unwrap_or(0);
    let problem = match (marker, sled_id) {
        (Some(m), None) => Some(format!(
            "the database opened empty, but its marker says outbox {} had committed up to sequence {}",
            m.outbox_id, m.commit_seq
        )),
        (Some(m), Some(id)) if id != m.outbox_id => Some(format!(
            "the database is outbox {id}, but the marker names outbox {}",
            m.outbox_id
        )),
        (Some(m), Some(_)) if sled_seq < m.commit_seq => Some(format!(
            "the database holds commits up to sequence {sled_seq}, but its marker says {} were durable",
            m.commit_seq
        )),
        _ => None,
    };
    if let Some(detail) = problem {
        if !accept_loss {
            return Err(OutboxError::DataLost {
                path: dir.to_path_buf(),
                detail,
            });
        }
        tracing::error!(path = %dir.display(), problem = %detail,
            "outbox lost data; starting from what it holds because the loss was accepted (--accept-outbox-loss)");
        metrics::counter!("duvo_bridge_outbox_data_loss_accepted_total").increment(1);
    }
    let outbox_id = match sled_id {
        Some(id) => id,
        None => {
            let id = Uuid::new_v4();
            db.insert(META_OUTBOX_ID, id.as_bytes())?;
            id
        }
    };
    // Never go below the marker's sequence, so a marker written before an
    // accepted loss cannot make the next start refuse again.
    let commit_seq = sled_seq.max(marker.map_or(0, |m| m.commit_seq));
    db.insert(META_COMMIT_SEQ, &commit_seq.to_be_bytes())?;
    db.flush()?;
    dir_sync
        .sync()
        .map_err(|e| OutboxError::Flush(format!("fsync of the outbox files failed: {e}")))?;
    sync_ancestors(dir).map_err(|e| {
        OutboxError::Flush(format!(
            "fsync of the outbox's parent directory failed: {e}"
        ))
    })?;
    Marker {
        outbox_id,
        commit_seq,
        generation,
    }
    .write(dir)
    .map_err(|e| OutboxError::Flush(format!("cannot write the outbox marker: {e}")))?;
    Ok(Identity {
        outbox_id,
        commit_seq,
        generation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_sync_syncs_every_file_and_a_directory_only_when_it_changed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"x").unwrap();
        std::fs::write(dir.path().join("conf"), b"y").unwrap();
        let mut s = DirSync::new(dir.path());
        assert_eq!(s.sync().unwrap(), SyncStats { files: 2, dirs: 1 });
        assert_eq!(s.sync().unwrap(), SyncStats { files: 2, dirs: 0 });
        std::fs::write(dir.path().join("snap.1"), b"z").unwrap();
        assert_eq!(s.sync().unwrap(), SyncStats { files: 3, dirs: 1 });
        std::fs::remove_file(dir.path().join("snap.1")).unwrap();
        assert_eq!(s.sync().unwrap(), SyncStats { files: 2, dirs: 1 });
        // Replaced under the same name (rename over it): reopened, dir synced.
        std::fs::write(dir.path().join("conf.tmp"), b"w").unwrap();
        std::fs::rename(dir.path().join("conf.tmp"), dir.path().join("conf")).unwrap();
        assert_eq!(s.sync().unwrap(), SyncStats { files: 2, dirs: 1 });
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        std::fs::write(dir.path().join("blobs").join("7"), b"b").unwrap();
        assert_eq!(s.sync().unwrap(), SyncStats { files: 3, dirs: 2 });
    }

    #[test]
    fn marker_round_trips_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Marker::read(dir.path()).unwrap(), None);
        let m = Marker {
            outbox_id: Uuid::new_v4(),
            commit_seq: 41,
            generation: 0,
        };
        m.write(dir.path()).unwrap();
        assert_eq!(Marker::read(dir.path()).unwrap(), Some(m));
        let m2 = Marker {
            commit_seq: 42,
            ..m
        };
        m2.write(dir.path()).unwrap();
        assert_eq!(Marker::read(dir.path()).unwrap(), Some(m2));
        assert!(!dir.path().join(format!("{MARKER_FILE}.tmp")).exists());
        std::fs::write(Marker::path(dir.path()), b"{not json").unwrap();
        assert!(
            Marker::read(dir.path()).is_err(),
            "a torn marker is an error"
        );
    }
}
