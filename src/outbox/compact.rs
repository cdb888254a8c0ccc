//! Giving disk back: the outbox copies what it holds into a fresh sled
//! database (a new *generation*) and switches to it, while it runs.
//!
//! Why: sled 0.34 never shrinks its file in practice. Its segment cleaner
//! runs only in its own periodic thread (off here: we fsync ourselves), and
//! even with it on, measured, a 200,000-event soak left 1,008 MiB on disk
//! for 120 MiB of live records (RELIABILITY.md, soak). A fresh copy of the
//! same records takes about twice their size.
//!
//! Layout: generation 0 is sled's files in the outbox directory itself (as
//! outboxes were always laid out); generation N > 0 lives in `sled-N/`
//! beside the marker, which names the current one. Switching is the
//! marker's atomic rewrite (temporary file, fsync, rename, directory fsync),
//! done only once the new generation is complete and fsynced: a crash or a
//! power cut before it leaves the old generation current (the half-made
//! copy is deleted at the next open), after it the new one; the old files
//! are deleted after the switch, or at the next open.
//!
//! Copying without stopping the outbox: every tree is watched (sled's
//! subscribers) before the copy starts, so every key written meanwhile is
//! known; those keys are copied again in rounds while writes go on, and the
//! last few under the stores' write lock, which every sled call of the
//! outbox holds for reading ([`super::Inner::st`]): nothing is written to
//! the old generation after its last keys were copied. sled's id counter
//! does not travel with the records, so each generation stores the base its
//! ids continue from ([`META_ID_BASE`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sled::IVec;

use super::durable::{DirSync, Marker};
use super::types::{OutboxConfig, OutboxError};
use super::{DEAD_LETTERS_TREE, EVENTS_TREE, Inner, Outbox, lock};

/// sled default-tree key: what this generation's `generate_id` is offset by.
pub(crate) const META_ID_BASE: &[u8] = b"duvo-meta/id-base";
/// Directory name prefix of generations above 0.
const GENERATION_PREFIX: &str = "sled-";
/// Records per sled batch while copying.
const COPY_CHUNK: usize = 4096;
/// Keys written during the copy that are copied while writes go on, round
/// after round, until no more than this many are left for the pause.
const PAUSE_KEYS: usize = 2_000;
const MAX_ROUNDS: usize = 6;
/// Keys written during the copy that are copied at once, in the middle of
/// it, rather than remembered longer (about 100 bytes each).
const DRAIN_KEYS: usize = 20_000;
/// A generation is compacted when its file is this many times the size of
/// its records (a fresh copy measured ~2x) and at least `compact_min_bytes`.
pub(crate) const COMPACT_RATIO: u64 = 4;
/// How often the outbox looks at its size.
const CHECK_EVERY: Duration = Duration::from_secs(30);
/// The longest the records go uncounted while the file is big enough.
const RECOUNT_EVERY: Duration = Duration::from_secs(600);

/// One generation's sled database and its trees. Every sled call of the
/// outbox goes through [`super::Inner::st`], which lends it.
pub(crate) struct Stores {
    pub(crate) db: sled::Db,
    pub(crate) events: sled::Tree,
    pub(crate) dead: sled::Tree,
    /// This generation's number.
    pub(crate) generation: u64,
    /// Added to sled's `generate_id` (a copy's counter starts at 0).
    id_base: u64,
    /// The fsync descriptors of this generation's files.
    pub(crate) dir_sync: Mutex<DirSync>,
}

impl Stores {
    /// Open generation `generation` of the outbox at `cfg.path`.
    pub(crate) fn open(cfg: &OutboxConfig, generation: u64) -> sled::Result<Stores> {
        let dir = generation_dir(&cfg.path, generation);
        let db = super::open_when_released(|| sled_config(cfg, &dir).open())?;
        Stores::from_db(db, generation, dir)
    }

    fn from_db(db: sled::Db, generation: u64, dir: PathBuf) -> sled::Result<Stores> {
        let id_base = db
            .get(META_ID_BASE)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        Ok(Stores {
            events: db.open_tree(EVENTS_TREE)?,
            dead: db.open_tree(DEAD_LETTERS_TREE)?,
            db,
            generation,
            dir_sync: Mutex::new(DirSync::new(&dir)),
            id_base,
        })
    }

    /// A new id, above every id of this outbox so far (all generations).
    pub(crate) fn generate_id(&self) -> sled::Result<u64> {
        Ok(self.id_base + self.db.generate_id()?)
    }
}

/// The sled configuration of every generation.
pub(crate) fn sled_config(cfg: &OutboxConfig, dir: &Path) -> sled::Config {
    sled::Config::new()
        .path(dir)
        .cache_capacity(cfg.cache_capacity_bytes)
        // We flush explicitly (group commit); sled's own periodic flusher
        // would add fsyncs nobody waits for. (It is also the only caller of
        // sled's segment cleaner, which measured gave nothing back: this
        // module does.)
        .flush_every_ms(None)
        .mode(sled::Mode::HighThroughput)
}

/// Where generation `generation` of the outbox at `root` lives.
pub fn generation_dir(root: &Path, generation: u64) -> PathBuf {
    if generation == 0 {
        root.to_path_buf()
    } else {
        root.join(format!("{GENERATION_PREFIX}{generation}"))
    }
}

/// The generation the marker in `root` names (0 without a marker).
pub fn current_generation(root: &Path) -> std::io::Result<u64> {
    Ok(Marker::read(root)?.map_or(0, |m| m.generation))
}

/// Where the current generation's sled files are, for the tools that open
/// them without [`super::Outbox::open`]. An unreadable marker counts as
/// generation 0 here: the open that follows reports what is wrong.
pub fn current_dir(root: &Path) -> PathBuf {
    generation_dir(root, current_generation(root).unwrap_or(0))
}

/// Delete every generation but `current`: a copy a crash left half made,
/// or the previous generation a crash left behind after the switch.
pub(crate) fn remove_other_generations(root: &Path, current: u64) -> std::io::Result<()> {
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix(GENERATION_PREFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if n != current {
            tracing::info!(
                generation = n,
                "removing an outbox generation no longer in use"
            );
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    if current != 0 {
        remove_generation_zero(root)?;
    }
    Ok(())
}

/// sled's own files in the outbox directory (generation 0).
fn remove_generation_zero(root: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == "db" || name == "conf" || name.starts_with("snap.") {
            std::fs::remove_file(entry.path())?;
        } else if name == "blobs" {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}

/// What one compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Compacted {
    /// The generation now current.
    pub generation: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Records copied.
    pub records: u64,
    /// Keys copied again because they were written during the copy.
    pub recopied: u64,
    /// How long writers were held back at the switch, ms.
    pub pause_ms: u64,
    /// The whole compaction, ms.
    pub took_ms: u64,
}

/// Keys written to the old generation since the copy began, by tree.
struct Watch {
    dirty: Arc<Mutex<Vec<HashSet<IVec>>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    trees: Vec<sled::Tree>,
}

/// Written to each old tree (and removed again) while writers are held
/// back, to end its watch: a subscriber hands out events in the order
/// their writes began, so once it has seen this, it has seen every write
/// before it. No record key starts with 0xff.
const SENTINEL: &[u8] = b"\xffduvo-compaction-sentinel";

impl Watch {
    fn start(trees: &[sled::Tree]) -> Watch {
        let dirty = Arc::new(Mutex::new(vec![HashSet::new(); trees.len()]));
        let threads = trees
            .iter()
            .enumerate()
            .map(|(i, tree)| {
                // A subscriber's channel is bounded (writers wait when it is
                // full), so each is drained by a thread of its own. Its
                // blocking iterator, not `next_timeout`: in sled 0.34 that
                // one stalls for good on the first write that turned out a
                // no-op (the reservation is dropped unfilled).
                let sub = tree.watch_prefix(vec![]);
                let dirty = dirty.clone();
                std::thread::spawn(move || {
                    for ev in sub {
                        if ev.key().as_ref() == SENTINEL {
                            break;
                        }
                        lock(&dirty)[i].insert(ev.key().clone());
                    }
                })
            })
            .collect();
        Watch {
            dirty,
            threads,
            trees: trees.to_vec(),
        }
    }

    fn take(&self) -> Vec<HashSet<IVec>> {
        let mut d = lock(&self.dirty);
        d.iter_mut().map(std::mem::take).collect()
    }

    fn pending(&self) -> usize {
        lock(&self.dirty).iter().map(HashSet::len).sum()
    }

    /// Every key written so far, and the watch ended; only while writers
    /// are held back (the stores' write lock), so nothing is written after
    /// the sentinel.
    fn finish(mut self) -> Result<Vec<HashSet<IVec>>, OutboxError> {
        self.stop()?;
        Ok(self.take())
    }

    fn stop(&mut self) -> Result<(), OutboxError> {
        if self.threads.is_empty() {
            return Ok(());
        }
        for tree in &self.trees {
            tree.insert(SENTINEL, &b"1"[..])?;
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for tree in &self.trees {
            tree.remove(SENTINEL)?;
        }
        Ok(())
    }
}

impl Drop for Watch {
    /// A compaction that failed half way still ends its watch: a subscriber
    /// nobody drains would make every writer wait once its channel filled.
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(error = %e, "cannot end the compaction's watch of the outbox");
        }
    }
}

/// Copy `keys`' current values (or their absence) from `from` to `to`.
fn copy_keys(
    from: &[sled::Tree],
    to: &[sled::Tree],
    keys: Vec<HashSet<IVec>>,
) -> Result<u64, OutboxError> {
    let mut n = 0;
    for ((f, t), keys) in from.iter().zip(to).zip(keys) {
        let mut batch = sled::Batch::default();
        for (i, key) in keys.into_iter().enumerate() {
            match f.get(&key)? {
                Some(v) => batch.insert(key, v),
                None => batch.remove(key),
            }
            n += 1;
            if i % COPY_CHUNK == COPY_CHUNK - 1 {
                t.apply_batch(std::mem::take(&mut batch))?;
            }
        }
        t.apply_batch(batch)?;
    }
    Ok(n)
}

/// The default tree and every named tree of `db`, in a fixed order.
fn trees_of(db: &sled::Db) -> Result<Vec<sled::Tree>, OutboxError> {
    open_trees(db, db.tree_names())
}

/// The trees `names` of `db` (opened, created if new), sorted by name: the
/// same order for every database given the same names.
fn open_trees(db: &sled::Db, mut names: Vec<IVec>) -> Result<Vec<sled::Tree>, OutboxError> {
    names.sort();
    names
        .into_iter()
        .map(|n| {
            if n.as_ref() == b"__sled__default" {
                Ok((**db).clone())
            } else {
                Ok(db.open_tree(n)?)
            }
        })
        .collect()
}

fn io_error(what: &str, e: std::io::Error) -> OutboxError {
    OutboxError::Flush(format!("compaction: {what}: {e}"))
}

impl Outbox {
    /// Copy everything the outbox holds into a new generation and switch to
    /// it, giving back the disk the old one took (blocking; appends and
    /// every other operation go on meanwhile, held back only for the last
    /// keys written during the copy). One at a time.
    pub fn compact(&self) -> Result<Compacted, OutboxError> {
        compact(&self.inner)
    }

    /// Records' bytes (keys and values), summed over every tree: what a
    /// fresh copy needs, about half of what it takes on disk.
    pub fn live_bytes(&self) -> Result<u64, OutboxError> {
        let db = self.inner.st().db.clone();
        let mut bytes = 0u64;
        for tree in trees_of(&db)? {
            for item in tree.iter() {
                let (k, v) = item?;
                bytes += (k.len() + v.len()) as u64;
            }
        }
        Ok(bytes)
    }
}

fn compact(inner: &Inner) -> Result<Compacted, OutboxError> {
    let _one = lock(&inner.compact_lock);
    let started = Instant::now();
    let root = inner.cfg.path.clone();
    let (old_db, old_generation) = {
        let st = inner.st();
        (st.db.clone(), st.generation)
    };
    let bytes_before = old_db.size_on_disk()?;
    let generation = old_generation + 1;
    let dir = generation_dir(&root, generation);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| io_error("removing a stale copy", e))?;
    }
    let old_trees = trees_of(&old_db)?;
    let watch = Watch::start(&old_trees);
    // A write that began before the watch did is not in it, and may land
    // after the copy passed its key: wait until every call in progress
    // has returned (they hold the stores for reading).
    drop(inner.stores.write());
    let result = copy_and_switch(inner, &old_db, &old_trees, watch, generation, &dir);
    let (records, recopied, pause) = match result {
        Ok(r) => r,
        Err(e) => {
            // The old generation is still current: the copy is only litter.
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    drop(old_trees);
    drop(old_db);
    // The old generation's last handles went with the swap; its files go
    // now (or at the next open, if this fails or the process dies first).
    if let Err(e) = remove_other_generations(&root, generation) {
        tracing::warn!(error = %e, "cannot remove the previous outbox generation yet; the next start will");
    }
    let bytes_after = inner.st().db.size_on_disk()?;
    inner
        .flush
        .bytes_on_disk
        .store(bytes_after, Ordering::Relaxed);
    metrics::gauge!("duvo_bridge_outbox_bytes").set(bytes_after as f64);
    metrics::counter!("duvo_bridge_outbox_compactions_total").increment(1);
    let done = Compacted {
        generation,
        bytes_before,
        bytes_after,
        records,
        recopied,
        pause_ms: pause.as_millis() as u64,
        took_ms: started.elapsed().as_millis() as u64,
    };
    tracing::info!(
        generation,
        bytes_before,
        bytes_after,
        records,
        recopied,
        pause_ms = done.pause_ms,
        took_ms = done.took_ms,
        "outbox compacted"
    );
    Ok(done)
}

/// The copy, the rounds and the switch; `Err` leaves the old generation
/// current.
fn copy_and_switch(
    inner: &Inner,
    old_db: &sled::Db,
    old_trees: &[sled::Tree],
    watch: Watch,
    generation: u64,
    dir: &Path,
) -> Result<(u64, u64, Duration), OutboxError> {
    let new_db = sled_config(&inner.cfg, dir).open()?;
    let new_trees = open_trees(&new_db, old_db.tree_names())?;
    let mut records = 0u64;
    let mut recopied = 0;
    for (from, to) in old_trees.iter().zip(&new_trees) {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in from.iter() {
            let (k, v) = item?;
            // sled 0.34 counts a page against its cache only after 64
            // accesses in its shard, and an iterator touches each leaf
            // once: without a lookup per record a copy of a large outbox
            // would keep every leaf it read in memory (as the event load at
            // open does, BENCHMARKS.md, footprint).
            from.contains_key(&k)?;
            batch.insert(k, v);
            n += 1;
            if n == COPY_CHUNK {
                to.apply_batch(std::mem::take(&mut batch))?;
                records += n as u64;
                n = 0;
                // Under a heavy write load the keys written meanwhile are
                // copied as they pile up, so they never take much memory.
                if watch.pending() > DRAIN_KEYS {
                    recopied += copy_keys(old_trees, &new_trees, watch.take())?;
                }
            }
        }
        to.apply_batch(batch)?;
        records += n as u64;
    }
    for _ in 0..MAX_ROUNDS {
        if watch.pending() <= PAUSE_KEYS {
            break;
        }
        recopied += copy_keys(old_trees, &new_trees, watch.take())?;
    }
    // The bulk made durable before the pause, so the pause's fsync only
    // covers its own few keys.
    new_db.flush()?;
    // Reopened before it serves: sled counts a page against its cache only
    // after 64 accesses in its shard, so the pages the copy wrote would
    // otherwise all stay in memory (measured: 150 -> 265 MiB resident after
    // compacting 3.6M records). Keys written meanwhile are in the watch.
    drop(new_trees);
    drop(new_db);
    let new_db = super::open_when_released(|| sled_config(&inner.cfg, dir).open())?;
    let new_trees = trees_of(&new_db)?;
    let mut new_sync = DirSync::new(dir);
    new_sync
        .sync()
        .map_err(|e| io_error("fsync of the copy", e))?;

    let pause_started = Instant::now();
    let mut stores = inner.stores.write();
    recopied += copy_keys(old_trees, &new_trees, watch.finish()?)?;
    let next_id = stores.generate_id()?;
    new_db.insert(META_ID_BASE, &next_id.to_be_bytes())?;
    new_db.flush()?;
    new_sync
        .sync()
        .map_err(|e| io_error("fsync of the copy", e))?;
    std::fs::File::open(&inner.cfg.path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error("fsync of the outbox directory", e))?;
    drop(new_trees);
    // Everything that can fail is done before the marker names the new
    // generation: after that, an error would make the caller delete the
    // generation the next start opens.
    let mut fresh = Stores::from_db(new_db, generation, dir.to_path_buf())?;
    fresh.dir_sync = Mutex::new(new_sync);
    {
        let mut d = lock(&inner.durability);
        let marker = Marker {
            outbox_id: d.outbox_id,
            commit_seq: d.marker_seq,
            generation,
        };
        if let Err(e) = marker.write(&inner.cfg.path) {
            // The rename may have happened before the error: what is on
            // disk decides which generation the next start opens.
            match Marker::read(&inner.cfg.path) {
                Ok(Some(m)) if m.generation == generation => {}
                _ => return Err(io_error("writing the marker", e)),
            }
        }
        d.generation = generation;
    }
    let old = std::mem::replace(&mut *stores, fresh);
    drop(stores);
    let pause = pause_started.elapsed();
    drop(old);
    Ok((records, recopied, pause))
}

/// Look at the outbox's size every [`CHECK_EVERY`] and compact when its
/// file is [`COMPACT_RATIO`] times its records and at least
/// `compact_min_bytes`, with room on the filesystem for the copy. Counting
/// the records reads them all, so it is done again only once the file grew
/// by half since the last count, or [`RECOUNT_EVERY`] after it (records
/// shrink without the file changing: settled events lose their payload,
/// retention purges them).
pub(crate) async fn run(weak: std::sync::Weak<Inner>) {
    let mut counted_at: u64 = 0;
    let mut counted = Instant::now();
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let min = inner.cfg.compact_min_bytes;
        let size = inner.flush.bytes_on_disk.load(Ordering::Relaxed);
        let grown = size >= counted_at.saturating_add(counted_at / 2);
        if min == 0 || size < min || !(grown || counted.elapsed() >= RECOUNT_EVERY) {
            continue;
        }
        counted = Instant::now();
        let outbox = Outbox { inner };
        let ob = outbox.clone();
        let decided =
            tokio::task::spawn_blocking(move || -> Result<Option<Compacted>, OutboxError> {
                let live = ob.live_bytes()?;
                let free = super::durable::free_bytes(&ob.inner.cfg.path).unwrap_or(u64::MAX);
                if size < live.saturating_mul(COMPACT_RATIO) {
                    return Ok(None);
                }
                // The copy takes about twice the records; keep the reserve.
                if free
                    < live
                        .saturating_mul(3)
                        .saturating_add(ob.inner.cfg.min_free_disk_bytes)
                {
                    tracing::warn!(
                        size,
                        live,
                        free,
                        "outbox could give disk back, but the filesystem has no room for the copy"
                    );
                    return Ok(None);
                }
                ob.compact().map(Some)
            })
            .await;
        counted_at = outbox.inner.flush.bytes_on_disk.load(Ordering::Relaxed);
        match decided {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "outbox compaction failed; the outbox goes on as it was")
            }
            Err(e) => tracing::warn!(error = %e, "outbox compaction task failed"),
        }
        drop(outbox);
    }
}
