//! A fault-injecting FUSE filesystem for the power-loss tests: it keeps
//! everything in memory, remembers what was last fsynced, and on
//! [`PowerFs::cut`] forgets everything that was not, as a power cut does
//! to a disk's cache and the kernel's page cache.
//!
//! The model is strict (the strictest a POSIX disk may be):
//! - a file's bytes and size are durable only once `fsync`/`fdatasync`
//!   covered them;
//! - a directory's entries (a created, renamed or removed name) are
//!   durable only once the directory itself was fsynced.
//!
//! Every open is `direct_io` and every attribute and entry has a zero TTL,
//! so the kernel caches nothing that could survive a cut: the process
//! started after it reads exactly the durable state. The filesystem is
//! served from the test process (fuser, pure Rust: it mounts with
//! mount(2) as root, else through Debian's `fusermount3`), while the bridge
//! under test is a separate process writing into it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

const PAGE: usize = 4096;
const TTL: Duration = Duration::ZERO;

#[derive(Debug, Default)]
struct FileData {
    /// What a reader sees now.
    cur: Vec<u8>,
    /// What survives a cut.
    dur: Vec<u8>,
    /// Pages where `cur` and `dur` may differ (besides the length).
    dirty: BTreeSet<usize>,
}

impl FileData {
    fn mark(&mut self, from: usize, to: usize) {
        if to > from {
            self.dirty.extend(from / PAGE..=(to - 1) / PAGE);
        }
    }

    fn write(&mut self, off: usize, data: &[u8]) {
        let end = off + data.len();
        if end > self.cur.len() {
            let old = self.cur.len();
            self.cur.resize(end, 0);
            self.mark(old, end);
        }
        self.cur[off..end].copy_from_slice(data);
        self.mark(off, end);
    }

    fn truncate(&mut self, len: usize) {
        let old = self.cur.len();
        self.mark(len.min(old), len.max(old));
        self.cur.resize(len, 0);
    }

    fn sync(&mut self) {
        self.dur.resize(self.cur.len(), 0);
        for p in std::mem::take(&mut self.dirty) {
            let (s, e) = (p * PAGE, ((p + 1) * PAGE).min(self.cur.len()));
            if s < e {
                self.dur[s..e].copy_from_slice(&self.cur[s..e]);
            }
        }
    }

    fn cut(&mut self) {
        let len = self.dur.len();
        if self.cur.len() < len {
            self.cur.resize(len, 0);
        }
        for p in std::mem::take(&mut self.dirty) {
            let (s, e) = (p * PAGE, ((p + 1) * PAGE).min(len));
            if s < e {
                self.cur[s..e].copy_from_slice(&self.dur[s..e]);
            }
        }
        self.cur.truncate(len);
    }
}

#[derive(Debug)]
enum Body {
    File(FileData),
    Dir {
        cur: BTreeMap<OsString, u64>,
        dur: BTreeMap<OsString, u64>,
    },
}

#[derive(Debug)]
struct Node {
    body: Body,
    perm: u16,
    mtime: SystemTime,
}

#[derive(Debug, Default)]
struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// Counters, for the test's report.
    fsyncs: u64,
    dir_fsyncs: u64,
    cuts: u64,
    /// Bytes written and not yet synced that the last cut threw away.
    dropped_bytes: u64,
}

/// Counters of what the filesystem saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct PowerStats {
    pub fsyncs: u64,
    pub dir_fsyncs: u64,
    pub cuts: u64,
    pub dropped_pages_last_cut: u64,
}

/// The filesystem; clone the handle to cut the power from the test.
#[derive(Clone, Debug)]
pub struct PowerFs {
    state: Arc<Mutex<State>>,
}

/// A mounted [`PowerFs`]; unmounted on drop.
pub struct Mounted {
    pub fs: PowerFs,
    session: Option<fuser::BackgroundSession>,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

impl PowerFs {
    pub fn new() -> PowerFs {
        let mut st = State {
            next_ino: 2,
            ..State::default()
        };
        st.nodes.insert(
            1,
            Node {
                body: Body::Dir {
                    cur: BTreeMap::new(),
                    dur: BTreeMap::new(),
                },
                perm: 0o755,
                mtime: SystemTime::now(),
            },
        );
        PowerFs {
            state: Arc::new(Mutex::new(st)),
        }
    }

    /// Mount on `at` (an existing empty directory), served by a background
    /// thread of this process.
    pub fn mount(at: &Path) -> std::io::Result<Mounted> {
        let fs = PowerFs::new();
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            fuser::MountOption::FSName("duvo-powerfs".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        let session = fuser::spawn_mount(fs.clone(), at, &cfg)?;
        Ok(Mounted {
            fs,
            session: Some(session),
        })
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The power cut: every file and directory goes back to what was last
    /// fsynced. Call it only once the writers are dead (SIGKILL and wait):
    /// a dead process's page cache is what a cut loses.
    pub fn cut(&self) -> u64 {
        let mut st = self.st();
        let mut dropped = 0u64;
        for node in st.nodes.values_mut() {
            match &mut node.body {
                Body::File(f) => {
                    dropped += f.dirty.len() as u64 + u64::from(f.cur.len() != f.dur.len());
                    f.cut();
                }
                Body::Dir { cur, dur } => {
                    if cur != dur {
                        dropped += 1;
                    }
                    *cur = dur.clone();
                }
            }
        }
        st.cuts += 1;
        st.dropped_bytes = dropped;
        dropped
    }

    pub fn stats(&self) -> PowerStats {
        let st = self.st();
        PowerStats {
            fsyncs: st.fsyncs,
            dir_fsyncs: st.dir_fsyncs,
            cuts: st.cuts,
            dropped_pages_last_cut: st.dropped_bytes,
        }
    }
}

impl Default for PowerFs {
    fn default() -> Self {
        PowerFs::new()
    }
}

/// The files belong to whoever runs the tests (the mount is theirs).
fn owner() -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    static OWNER: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *OWNER.get_or_init(|| std::fs::metadata("/proc/self").map_or((0, 0), |m| (m.uid(), m.gid())))
}

fn attr(ino: u64, n: &Node) -> FileAttr {
    let (kind, size, nlink) = match &n.body {
        Body::File(f) => (FileType::RegularFile, f.cur.len() as u64, 1),
        Body::Dir { .. } => (FileType::Directory, 0, 2),
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: n.mtime,
        mtime: n.mtime,
        ctime: n.mtime,
        crtime: n.mtime,
        kind,
        perm: n.perm,
        nlink,
        uid: owner().0,
        gid: owner().1,
        rdev: 0,
        blksize: PAGE as u32,
        flags: 0,
    }
}

impl State {
    fn entries(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.nodes.get_mut(&dir).map(|n| &mut n.body) {
            Some(Body::Dir { cur, .. }) => Ok(cur),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn child(&mut self, dir: u64, name: &OsStr) -> Result<u64, Errno> {
        self.entries(dir)?.get(name).copied().ok_or(Errno::ENOENT)
    }

    fn make(&mut self, parent: u64, name: &OsStr, body: Body, perm: u16) -> Result<u64, Errno> {
        if self.entries(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                body,
                perm,
                mtime: SystemTime::now(),
            },
        );
        self.entries(parent)?.insert(name.to_os_string(), ino);
        Ok(ino)
    }

    /// fsync of a file (its bytes and size) or a directory (its entries).
    fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.body) {
            Some(Body::File(f)) => f.sync(),
            Some(Body::Dir { cur, dur }) => *dur = cur.clone(),
            None => return Err(Errno::ENOENT),
        }
        Ok(())
    }

    fn file(&mut self, ino: u64) -> Result<&mut FileData, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.body) {
            Some(Body::File(f)) => Ok(f),
            Some(_) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }
}

fn direct() -> FopenFlags {
    FopenFlags::FOPEN_DIRECT_IO
}

impl Filesystem for PowerFs {
    fn init(&mut self, _req: &Request, _config: &mut KernelConfig) -> std::io::Result<()> {
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut st = self.st();
        match st.child(parent.0, name) {
            Ok(ino) => reply.entry(&TTL, &attr(ino, &st.nodes[&ino]), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let st = self.st();
        match st.nodes.get(&ino.0) {
            Some(n) => reply.attr(&TTL, &attr(ino.0, n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut st = self.st();
        if let Some(len) = size {
            match st.file(ino.0) {
                Ok(f) => f.truncate(len as usize),
                Err(e) => return reply.error(e),
            }
        }
        let Some(n) = st.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(m) = mode {
            n.perm = (m & 0o7777) as u16;
        }
        n.mtime = SystemTime::now();
        reply.attr(&TTL, &attr(ino.0, n));
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut st = self.st();
        let body = Body::Dir {
            cur: BTreeMap::new(),
            dur: BTreeMap::new(),
        };
        match st.make(parent.0, name, body, (mode & !umask & 0o7777) as u16) {
            Ok(ino) => reply.entry(&TTL, &attr(ino, &st.nodes[&ino]), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut st = self.st();
        let existing = st.child(parent.0, name).ok();
        let ino = match existing {
            Some(_) if flags & O_EXCL != 0 => return reply.error(Errno::EEXIST),
            Some(ino) => {
                if flags & O_TRUNC != 0
                    && let Ok(f) = st.file(ino)
                {
                    f.truncate(0);
                }
                ino
            }
            None => match st.make(
                parent.0,
                name,
                Body::File(FileData::default()),
                (mode & !umask & 0o7777) as u16,
            ) {
                Ok(ino) => ino,
                Err(e) => return reply.error(e),
            },
        };
        reply.created(
            &TTL,
            &attr(ino, &st.nodes[&ino]),
            Generation(0),
            FileHandle(0),
            direct(),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.st();
        if flags.0 & O_TRUNC != 0
            && let Ok(f) = st.file(ino.0)
        {
            f.truncate(0);
        }
        if st.nodes.contains_key(&ino.0) {
            reply.opened(FileHandle(0), direct());
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut st = self.st();
        match st.file(ino.0) {
            Ok(f) => {
                let s = (offset as usize).min(f.cur.len());
                let e = (s + size as usize).min(f.cur.len());
                reply.data(&f.cur[s..e]);
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut st = self.st();
        match st.file(ino.0) {
            Ok(f) => {
                f.write(offset as usize, data);
                reply.written(data.len() as u32);
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        st.fsyncs += 1;
        match st.sync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.st();
        match st.entries(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut st = self.st();
        let entries: Vec<(OsString, u64)> = match st.entries(ino.0) {
            Ok(e) => e.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            Err(e) => return reply.error(e),
        };
        let mut all = vec![
            (OsString::from("."), ino.0, FileType::Directory),
            (OsString::from(".."), 1, FileType::Directory),
        ];
        for (name, child) in entries {
            let kind = match st.nodes.get(&child).map(|n| &n.body) {
                Some(Body::Dir { .. }) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((name, child, kind));
        }
        for (i, (name, child, kind)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        st.dir_fsyncs += 1;
        match st.sync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.st();
        match st.entries(parent.0) {
            Ok(e) => match e.remove(name) {
                Some(_) => reply.ok(),
                None => reply.error(Errno::ENOENT),
            },
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.st();
        let ino = match st.child(parent.0, name) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        match st.entries(ino) {
            Ok(e) if !e.is_empty() => return reply.error(Errno::ENOTEMPTY),
            Ok(_) => {}
            Err(e) => return reply.error(e),
        }
        st.entries(parent.0).map(|e| e.remove(name)).ok();
        reply.ok();
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        let ino = match st.child(parent.0, name) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        if let Err(e) = st.entries(newparent.0) {
            return reply.error(e);
        }
        st.entries(parent.0).map(|e| e.remove(name)).ok();
        st.entries(newparent.0)
            .map(|e| e.insert(newname.to_os_string(), ino))
            .ok();
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // 64 GiB, mostly free: sled and the bridge only read it for metrics.
        let blocks = 16 * 1024 * 1024;
        reply.statfs(
            blocks,
            blocks / 2,
            blocks / 2,
            1 << 20,
            1 << 19,
            4096,
            255,
            4096,
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let mut st = self.st();
        match st.file(ino.0) {
            Ok(f) => {
                let end = (offset + length) as usize;
                if end > f.cur.len() {
                    f.truncate(end);
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }
}

/// `O_TRUNC` and `O_EXCL` on Linux.
const O_TRUNC: i32 = 0o1000;
const O_EXCL: i32 = 0o200;

#[test]
fn file_data_keeps_only_what_was_synced_across_a_cut() {
    let mut f = FileData::default();
    f.write(0, &[1u8; 10_000]);
    f.sync();
    f.write(5_000, &[2u8; 10_000]);
    f.cut();
    assert_eq!(f.cur, vec![1u8; 10_000]);
    f.write(9_000, &[3u8; 2_000]);
    f.truncate(4_000);
    f.sync();
    f.write(0, &[4u8; 100]);
    f.truncate(20_000);
    f.cut();
    assert_eq!(f.cur, vec![1u8; 4_000]);
}
