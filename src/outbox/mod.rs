//! The durable outbox: a sled database between the sources and the batcher.
//!
//! The promise it keeps: **a source acknowledges an event only after it is
//! durably on disk; nothing acknowledged is ever lost; no case is created
//! twice.** Concretely:
//!
//! - [`Outbox::append`] returns only after an fsync that covers the write
//!   (group commit, see [`flusher`]). Duplicate identities are answered with
//!   the first event's id and store nothing.
//! - [`Outbox::claim_batch`] persists the batch (and its idempotency key)
//!   and flushes *before* handing it out, so a re-send after a crash uses
//!   the same key and the API does not create the cases again.
//! - [`Outbox::settle_delivered`], [`Outbox::split_batch`] and
//!   [`Outbox::reject`] change events and batch records in one atomic sled
//!   batch (or transaction) and wait for the flush.
//! - Settled events keep a small tombstone (and their identity) for
//!   `retention`, so dedupe and `get` keep working; [`Outbox::purge_expired`]
//!   removes them afterwards.
//!
//! The on-disk layout is described in [`record`].

mod callbacks;
pub mod compact;
pub mod config;
pub mod durable;
mod flusher;
mod index;
mod inspect;
pub mod record;
mod reports;
mod tracking;
mod types;
mod verify;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sled::Transactional;
use sled::transaction::ConflictableTransactionResult;
use tokio::sync::Notify;
use uuid::Uuid;

pub use types::{
    AppendOutcome, Batch, DeadLetter, EventId, EventState, EventView, ListingOutcome,
    ListingStream, NewEvent, Origin, OutboxConfig, OutboxError, OutboxStats, QueueTracking,
    ReadySummary, TrackPhase, Tracking, TrackingPolicy, Transition,
};

use callbacks::{CallbackLock, CallbackRefs};
use flusher::FlushShared;
use index::{ReadyEntry, ReadyIndex};
pub use inspect::{
    Census, DeadLetterSelector, EVENT_STATES, EventFilter, REPLAY_IDENTITY_PREFIX, Replayed,
    state_name,
};
use record::{
    BATCH_PREFIX, BatchRecord, DEAD_LETTERS_TREE, EVENTS_TREE, EventRecord, REPORT_PREFIX,
    Watermark, batch_body_size, batch_key, case_body_size, case_key, deadline_key, decode, encode,
    event_key, expiry_key, expiry_key_id, identity_key, key_u64, report_key, watermark_key,
};
use reports::ReportIndex;
pub use reports::{DeadReport, Report, ReportStatus};
use tracking::TrackIndex;
pub use verify::{Problem, VerifyReport, verify};

use crate::clock::now_ms;

/// Keys per sled batch when purging, so one purge never builds a huge batch.
const PURGE_CHUNK: usize = 512;

/// Handle to the outbox; cheap to clone, all clones share one database.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.inner.cfg.path)
            .field("stats", &self.stats())
            .finish()
    }
}

pub(crate) struct Inner {
    cfg: OutboxConfig,
    /// The current generation's database; lent to every sled call by
    /// [`Inner::st`], taken for writing only by a compaction's switch.
    stores: parking_lot::RwLock<compact::Stores>,
    /// One compaction at a time.
    compact_lock: Mutex<()>,
    flush: Arc<FlushShared>,
    /// The flusher's fsync descriptors and commit sequence (only the
    /// flusher locks it, on the blocking pool).
    durability: Mutex<flusher::Durability>,
    /// Serialises appends so the identity check and the insert are atomic
    /// with respect to other appends, and ids enter the ready index in order.
    write_lock: Mutex<()>,
    /// This outbox's identity (from its marker): part of every batch's
    /// idempotency key.
    outbox_id: Uuid,
    /// Serialises changes to existing batch records (settle, split, reject,
    /// attempts), so a batch cannot be settled twice.
    batch_lock: Mutex<()>,
    index: Mutex<ReadyIndex>,
    ready_notify: Notify,
    /// True once every event stored before this open is in the indexes.
    loaded: tokio::sync::watch::Sender<bool>,
    /// Serialises read-modify-writes of tracked events (tracker pages,
    /// expiry) and of reports.
    track_lock: Mutex<()>,
    track: Mutex<TrackIndex>,
    /// Per queue and listing stream, where the tracker must read again
    /// from: a batch settled late (its cases were created before the
    /// stream's watermark), so the stream may have passed over transitions
    /// of cases it did not know yet. Taken by the tracker at its next turn;
    /// until then it also caps the watermark `apply_listing` persists.
    rewinds: Mutex<HashMap<(Uuid, ListingStream), chrono::DateTime<chrono::Utc>>>,
    reports: Mutex<ReportIndex>,
    report_notify: Notify,
    callback_lock: CallbackLock,
    appended: AtomicU64,
    duplicates: AtomicU64,
    corrupt: AtomicU64,
    over_high: AtomicBool,
    /// Free space below `min_free_disk_bytes` at the last look, and when.
    disk_low: AtomicBool,
    disk_checked_ms: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.flush.shutdown();
    }
}

impl Inner {
    /// The current generation's database, for one sled call (a statement):
    /// held for reading, so a compaction's switch waits until no call is
    /// in progress. Recursive, so a call made while another is held never
    /// waits behind a switch that waits for it.
    pub(crate) fn st(&self) -> parking_lot::RwLockReadGuard<'_, compact::Stores> {
        self.stores.read_recursive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves no half-done state in
    // memory that matters more than availability: disk is the truth.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Everything `open` computes on the blocking pool before the event scan.
struct Opened {
    stores: compact::Stores,
    index: ReadyIndex,
    reports: ReportIndex,
    corrupt: u64,
    bytes: u64,
    identity: durable::Identity,
    load: EventLoad,
}

impl Outbox {
    /// Open (or create) the database, recover the in-memory indexes (batch
    /// and report records here; the stored events by a scan, before this
    /// returns or, with `background_load`, after) and spawn the flusher on
    /// the current tokio runtime.
    ///
    /// Corrupt records found during recovery are logged and counted, and
    /// left out of the indexes; they stay on disk for inspection and do not
    /// prevent the outbox from opening.
    pub async fn open(cfg: OutboxConfig) -> Result<Outbox, OutboxError> {
        let blocking_cfg = cfg.clone();
        let mut opened = tokio::task::spawn_blocking(move || open_blocking(&blocking_cfg))
            .await
            .map_err(|e| OutboxError::Task(e.to_string()))??;
        // Corrupt batch records are rebuilt from the events that point at
        // them, which takes the whole scan: then it is done before anything
        // else runs.
        let background = cfg.background_load && opened.load.broken.is_empty();
        opened.index.begin_loading(opened.load.first_new_id);
        let mut load = opened.load;
        let flush = Arc::new(FlushShared::new(opened.bytes));
        let inner = Arc::new(Inner {
            cfg,
            stores: parking_lot::RwLock::new(opened.stores),
            compact_lock: Mutex::new(()),
            flush: flush.clone(),
            durability: Mutex::new(flusher::Durability {
                generation: opened.identity.generation,
                outbox_id: opened.identity.outbox_id,
                commit_seq: opened.identity.commit_seq,
                marker_seq: opened.identity.commit_seq,
                marker_written: std::time::Instant::now(),
            }),
            write_lock: Mutex::new(()),
            outbox_id: opened.identity.outbox_id,
            batch_lock: Mutex::new(()),
            index: Mutex::new(opened.index),
            ready_notify: Notify::new(),
            loaded: tokio::sync::watch::Sender::new(false),
            track_lock: Mutex::new(()),
            track: Mutex::new(TrackIndex::default()),
            rewinds: Mutex::new(HashMap::new()),
            reports: Mutex::new(opened.reports),
            report_notify: Notify::new(),
            callback_lock: CallbackLock::default(),
            appended: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            corrupt: AtomicU64::new(opened.corrupt),
            over_high: AtomicBool::new(false),
            disk_low: AtomicBool::new(false),
            disk_checked_ms: AtomicU64::new(0),
        });
        tokio::spawn(flusher::run(flush, Arc::downgrade(&inner)));
        tokio::spawn(compact::run(Arc::downgrade(&inner)));
        let outbox = Outbox { inner };
        metrics::gauge!("duvo_bridge_outbox_bytes").set(opened.bytes as f64);
        if background {
            // What is known already (batched events) shows at once; the
            // load publishes and wakes the batcher as it goes.
            outbox.publish_depth();
            outbox.publish_tracking();
            let weak = Arc::downgrade(&outbox.inner);
            tokio::task::spawn_blocking(move || load_in_background(weak, load));
        } else {
            let ob = outbox.clone();
            tokio::task::spawn_blocking(move || ob.load_events(&mut load))
                .await
                .map_err(|e| OutboxError::Task(e.to_string()))??;
        }
        Ok(outbox)
    }

    /// Wait until every event stored before this open is known to the
    /// indexes (at once unless `background_load`). Cancel-safe.
    pub async fn loaded(&self) {
        let mut rx = self.inner.loaded.subscribe();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Whether the events stored before this open are still being loaded.
    pub fn is_loading(&self) -> bool {
        !*self.inner.loaded.borrow()
    }

    /// Read the events stored before this open into the indexes, oldest
    /// first, then end the load ([`Outbox::finish_load`]).
    fn load_events(&self, load: &mut EventLoad) -> Result<(), OutboxError> {
        while self.load_chunk(load)? {}
        self.finish_load(load)
    }

    /// Load the next chunk of stored events from `load.from` and offer it to
    /// the batcher at once; `false` once there is nothing left. Pending
    /// events of a batch that no longer exists are made ready again
    /// (written back before they are offered). On an error nothing of the
    /// chunk is offered and `load.from` stays, so asking again resumes there.
    fn load_chunk(&self, load: &mut EventLoad) -> Result<bool, OutboxError> {
        const CHUNK: usize = 4096;
        let inner = &self.inner;
        let mut entries: Vec<(Uuid, ReadyEntry)> = Vec::with_capacity(CHUNK);
        let mut counts: Vec<(Uuid, TrackPhase)> = Vec::new();
        let mut orphans = sled::Batch::default();
        let mut n_orphans = 0u64;
        let mut broken_members = 0u64;
        let mut last = None;
        let range = record::event_key(load.from)..record::event_key(load.first_new_id);
        for item in inner.st().events.range(range) {
            let (key, value) = item?;
            // sled 0.34 counts a page against `cache_mb` only once 64
            // accesses have queued up in its shard (page id mod 256), and an
            // iterator touches each leaf once: a one-pass scan would leave
            // up to 16k leaves (~100 MiB with 1M events) uncounted and never
            // paged out. One lookup per record touches each leaf ~16 times
            // (a leaf holds up to 16 records), so the queues fill and the
            // cache evicts as it goes (BENCHMARKS.md, footprint).
            inner.st().events.contains_key(&key)?;
            let Some(id) = key_u64(&key) else {
                continue;
            };
            last = Some(id);
            let rec: record::EventScan<'_> = match record::decode_borrowed(&key, &value) {
                Ok(rec) => rec,
                Err(e) => {
                    inner.corrupt.fetch_add(1, Ordering::Relaxed);
                    note_corrupt_at_open(&e);
                    continue;
                }
            };
            match &rec.state {
                EventState::Stored => {}
                // A batch of this run (ids come from one counter): made
                // while the load went on, e.g. a resumed batch split after
                // its cases were looked for.
                EventState::Batched { batch_id }
                    if load.batch_ids.contains(batch_id) || *batch_id >= load.first_new_id =>
                {
                    if let Some(members) = load.broken.get_mut(batch_id) {
                        members.push((id, rec.queue_id, rec.received_at_ms));
                        broken_members += 1;
                    }
                    continue;
                }
                EventState::Batched { batch_id } => {
                    tracing::warn!(
                        event_id = id,
                        batch_id,
                        "event in a missing batch; made ready again"
                    );
                    let mut full: EventRecord = decode(&key, &value)?;
                    full.state = EventState::Stored;
                    orphans.insert(key.clone(), encode(&full)?);
                    n_orphans += 1;
                }
                EventState::Delivered {
                    delivered_at_ms, ..
                } => {
                    // Settled by this run (a resumed batch, while the load
                    // went on): the settle counted it already.
                    if *delivered_at_ms < load.opened_at_ms
                        && let Some(t) = &rec.tracking
                    {
                        counts.push((rec.queue_id, t.phase));
                    }
                    continue;
                }
                EventState::Rejected { .. } => continue,
            }
            if rec.case.is_none() {
                inner.corrupt.fetch_add(1, Ordering::Relaxed);
                note_corrupt_at_open(&OutboxError::Corrupt {
                    key: record::describe_key(&key),
                    reason: "pending event without payload".into(),
                });
                continue;
            }
            entries.push((
                rec.queue_id,
                ReadyEntry {
                    id,
                    received_at_ms: rec.received_at_ms,
                },
            ));
            if entries.len() >= CHUNK {
                break;
            }
        }
        if n_orphans > 0 {
            inner.st().events.apply_batch(orphans)?;
            load.orphaned += n_orphans;
        }
        load.loaded += entries.len() as u64;
        {
            let mut ix = lock(&inner.index);
            ix.batched += broken_members;
            for (queue_id, entry) in entries {
                ix.push(queue_id, entry);
            }
        }
        if !counts.is_empty() {
            let mut t = lock(&inner.track);
            for (queue_id, phase) in counts {
                t.count(queue_id, phase);
            }
        }
        self.publish_depth();
        self.wake_batcher();
        Ok(match last {
            Some(id) => {
                load.from = id + 1;
                true
            }
            None => false,
        })
    }

    /// Rebuild corrupt batch records from their events (and make the
    /// orphans' rewrite durable), then end the load: this run's appends join
    /// their queues and [`Outbox::loaded`] resolves.
    fn finish_load(&self, load: &mut EventLoad) -> Result<(), OutboxError> {
        let inner = &self.inner;
        let mut rebuilt = 0;
        if load.orphaned > 0 || !load.broken.is_empty() {
            let mut sb = sled::Batch::default();
            rebuilt = rebuild_batches(
                &inner.st().events,
                inner.outbox_id,
                std::mem::take(&mut load.broken),
                &mut sb,
            )?;
            inner.st().events.apply_batch(sb)?;
            let st = inner.st();
            st.db.flush()?;
            lock(&st.dir_sync).sync().map_err(|e| {
                OutboxError::Flush(format!("fsync of the outbox files failed: {e}"))
            })?;
        }
        lock(&inner.index).finish_loading();
        inner.loaded.send_replace(true);
        self.publish_depth();
        self.publish_tracking();
        self.wake_batcher();
        let tracked = lock(&inner.track).total();
        let ix = lock(&inner.index);
        tracing::info!(
            path = %inner.cfg.path.display(),
            loaded = load.loaded,
            ready = ix.ready,
            batched = ix.batched,
            tracked,
            orphaned = load.orphaned,
            rebuilt,
            load_ms = load.started.elapsed().as_millis() as u64,
            "outbox events loaded"
        );
        Ok(())
    }

    /// Append events. Returns only after a flush covering them returned, so
    /// the caller may acknowledge them to its source.
    ///
    /// An event whose identity is already known (stored earlier, within
    /// retention, or earlier in the same call) is answered with
    /// `Duplicate(first id)` and nothing is stored. Even then the call waits
    /// for a flush: the first event may come from a concurrent append that
    /// is not durable yet. Outcomes are in input order.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<AppendOutcome>, OutboxError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // Encode outside the lock: it is the CPU-heavy part.
        let mut prepared = Vec::with_capacity(events.len());
        for mut ev in events {
            // Stored once per distinct URL (`callbacks`); counted below for
            // the events actually stored.
            let callback = CallbackRefs::intern(&mut ev.origin);
            let rec = EventRecord {
                source: ev.source,
                identity: ev.identity,
                queue_id: ev.queue_id,
                received_at_ms: ev.received_at_ms,
                title: ev.case.title.clone(),
                state: EventState::Stored,
                case: Some(ev.case),
                settled_at_ms: None,
                origin: ev.origin,
                tracking: None,
            };
            let bytes = encode(&rec)?;
            prepared.push((
                rec.identity,
                rec.queue_id,
                rec.received_at_ms,
                bytes,
                callback,
            ));
        }

        let inner = &self.inner;
        let mut outcomes = Vec::with_capacity(prepared.len());
        let (stored, duplicates) = {
            let _w = lock(&inner.write_lock);
            let mut batch = sled::Batch::default();
            let mut seen: HashMap<String, EventId> = HashMap::new();
            let mut entries: Vec<(Uuid, ReadyEntry)> = Vec::new();
            let mut duplicates = 0u64;
            let mut callbacks = CallbackRefs::default();
            for (identity, queue_id, received_at_ms, bytes, callback) in prepared {
                if let Some(identity) = &identity {
                    if let Some(first) = seen.get(identity) {
                        outcomes.push(AppendOutcome::Duplicate(*first));
                        duplicates += 1;
                        continue;
                    }
                    let key = identity_key(identity);
                    if let Some(raw) = inner.st().events.get(&key)? {
                        let first: u64 = self.decode_logged(&key, &raw)?;
                        outcomes.push(AppendOutcome::Duplicate(EventId(first)));
                        duplicates += 1;
                        continue;
                    }
                }
                let id = inner.st().generate_id()?;
                batch.insert(&event_key(id)[..], bytes);
                if let Some(c) = callback {
                    callbacks.acquire(c);
                }
                if let Some(identity) = identity {
                    batch.insert(identity_key(&identity), encode(&id)?);
                    seen.insert(identity, EventId(id));
                }
                entries.push((queue_id, ReadyEntry { id, received_at_ms }));
                outcomes.push(AppendOutcome::Stored(EventId(id)));
            }
            let stored = entries.len() as u64;
            if stored > 0 {
                let _c = callbacks.write(&inner.callback_lock, &inner.st().events, &mut batch)?;
                inner.st().events.apply_batch(batch)?;
                let mut ix = lock(&inner.index);
                for (queue_id, entry) in entries {
                    ix.push(queue_id, entry);
                }
            }
            (stored, duplicates)
        };
        inner.appended.fetch_add(stored, Ordering::Relaxed);
        inner.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        metrics::counter!("duvo_bridge_outbox_appended_total").increment(stored);
        metrics::counter!("duvo_bridge_outbox_duplicates_total").increment(duplicates);
        self.publish_depth();

        inner.flush.wait_durable().await?;
        if stored > 0 {
            self.wake_batcher();
        }
        Ok(outcomes)
    }

    /// Whether an event with `identity` is known (within retention): what
    /// `append` would answer `Duplicate` for.
    pub fn identity_known(&self, identity: &str) -> Result<bool, OutboxError> {
        Ok(self
            .inner
            .st()
            .events
            .contains_key(identity_key(identity))?)
    }

    /// The first known identity starting with `prefix` (identities are
    /// ordered bytewise), if any.
    pub fn first_identity_with_prefix(&self, prefix: &str) -> Result<Option<String>, OutboxError> {
        match self
            .inner
            .st()
            .events
            .scan_prefix(identity_key(prefix))
            .next()
        {
            Some(kv) => {
                let (k, _) = kv?;
                Ok(Some(String::from_utf8_lossy(&k[1..]).into_owned()))
            }
            None => Ok(None),
        }
    }

    /// What the outbox knows about an event; `None` if unknown or purged.
    pub fn get(&self, id: EventId) -> Result<Option<EventView>, OutboxError> {
        Ok(self.read_event(id.0)?.map(|rec| EventView {
            id,
            source: rec.source,
            queue_id: rec.queue_id,
            state: rec.state,
            received_at_ms: rec.received_at_ms,
            title: rec.title,
            tracking: rec.tracking,
        }))
    }

    /// Wait until something may be ready to batch (an append or a recovery
    /// found ready events). Cancel-safe. May wake spuriously; a wake-up that
    /// happens while nobody waits is kept for the next call, so a batcher
    /// that checks `ready_summary` and then waits cannot miss an append.
    pub async fn ready_notified(&self) {
        self.inner.ready_notify.notified().await;
    }

    /// Queues with ready events, oldest first.
    pub fn ready_summary(&self) -> Vec<ReadySummary> {
        lock(&self.inner.index).summary()
    }

    /// Take up to `max_cases` ready events of `queue_id` (oldest first) whose
    /// `{"cases":[...]}` body fits `max_body_bytes`, persist them as a batch
    /// with a fresh idempotency key, flush, and return it. `None` if the
    /// queue has nothing ready.
    ///
    /// A single event larger than `max_body_bytes` is still returned alone:
    /// the API answers 413 and the caller rejects it.
    ///
    /// If an event turns out corrupt, it is set aside (logged, counted, left
    /// on disk), the others go back to the ready list and `Corrupt` is
    /// returned; the next claim proceeds without it.
    ///
    /// If the final flush fails, the batch is already written (and will be
    /// durable with the next successful flush): it is not lost, it shows up
    /// in [`Outbox::unsettled_batches`] and must be sent from there.
    pub async fn claim_batch(
        &self,
        queue_id: Uuid,
        max_cases: usize,
        max_body_bytes: usize,
    ) -> Result<Option<Batch>, OutboxError> {
        if max_cases == 0 {
            return Err(OutboxError::Invalid("max_cases must be at least 1".into()));
        }
        let inner = &self.inner;
        let taken = lock(&inner.index).take(queue_id, max_cases);
        if taken.is_empty() {
            return Ok(None);
        }

        let batch = match self.persist_claim(queue_id, &taken, max_body_bytes) {
            Ok((batch, kept)) => {
                if kept < taken.len() {
                    lock(&inner.index).put_back(queue_id, taken[kept..].iter().copied());
                }
                batch
            }
            Err((err, bad)) => {
                let mut ix = lock(&inner.index);
                let back: Vec<ReadyEntry> = taken
                    .iter()
                    .copied()
                    .filter(|e| Some(e.id) != bad)
                    .collect();
                ix.put_back(queue_id, back);
                if bad.is_some() {
                    // Set aside: neither ready nor batched any more.
                    ix.batched = ix.batched.saturating_sub(1);
                }
                drop(ix);
                self.publish_depth();
                return Err(err);
            }
        };
        inner.flush.wait_durable().await?;
        Ok(Some(batch))
    }

    /// Read the taken events, oldest first, as long as their cases fit a
    /// `{"cases":[...]}` body of `max_body_bytes` (the first always does: an
    /// oversized event goes alone, the API answers 413 and the caller
    /// rejects it); write the batch record and their `Batched` state in one
    /// atomic sled batch. Returns the batch and how many of `taken` it
    /// holds. On failure returns the id of a corrupt or missing event, if
    /// that was the cause.
    fn persist_claim(
        &self,
        queue_id: Uuid,
        taken: &[ReadyEntry],
        max_body_bytes: usize,
    ) -> Result<(Batch, usize), (OutboxError, Option<u64>)> {
        let inner = &self.inner;
        let batch_id = inner.st().generate_id().map_err(|e| (e.into(), None))?;
        let mut sb = sled::Batch::default();
        let mut events = Vec::with_capacity(taken.len());
        let mut cases_bytes = 0u64;
        for entry in taken {
            let mut rec = match self.read_event(entry.id) {
                Ok(Some(rec)) => rec,
                Ok(None) => {
                    let err = OutboxError::Missing(format!("events/e/{}", entry.id));
                    tracing::error!(
                        event_id = entry.id,
                        "ready event missing from disk; set aside"
                    );
                    return Err((err, Some(entry.id)));
                }
                Err(e @ OutboxError::Corrupt { .. }) => return Err((e, Some(entry.id))),
                Err(e) => return Err((e, None)),
            };
            let Some(case) = rec.case.clone() else {
                tracing::error!(event_id = entry.id, "ready event has no payload; set aside");
                return Err((
                    OutboxError::Missing(format!("payload of events/e/{}", entry.id)),
                    Some(entry.id),
                ));
            };
            let size = case_body_size(&case).map_err(|e| (e, None))?;
            let body = batch_body_size(events.len() as u64 + 1, cases_bytes + size);
            if !events.is_empty() && body > max_body_bytes as u64 {
                break;
            }
            cases_bytes += size;
            rec.state = EventState::Batched { batch_id };
            sb.insert(
                &event_key(entry.id)[..],
                encode(&rec).map_err(|e| (e, None))?,
            );
            events.push((EventId(entry.id), case));
        }
        let rec = BatchRecord {
            idempotency_key: batch_idempotency_key(inner.outbox_id, batch_id),
            queue_id,
            event_ids: events.iter().map(|(id, _)| id.0).collect(),
            created_at_ms: now_ms(),
            attempts: 0,
        };
        sb.insert(
            &batch_key(batch_id)[..],
            encode(&rec).map_err(|e| (e, None))?,
        );
        inner
            .st()
            .events
            .apply_batch(sb)
            .map_err(|e| (e.into(), None))?;
        let kept = events.len();
        let batch = Batch {
            id: batch_id,
            idempotency_key: rec.idempotency_key,
            queue_id,
            events,
            created_at_ms: rec.created_at_ms,
            attempts: 0,
        };
        Ok((batch, kept))
    }

    /// Batches persisted but not settled, oldest first. After a restart they
    /// must be re-sent with their original idempotency key.
    ///
    /// A batch with a corrupt record (or corrupt event) is logged, counted
    /// and skipped so that one bad record cannot block the re-send of all
    /// others; it stays on disk.
    pub fn unsettled_batches(&self) -> Result<Vec<Batch>, OutboxError> {
        let mut out = Vec::new();
        for item in self.inner.st().events.scan_prefix([BATCH_PREFIX]) {
            let (key, value) = item?;
            let Some(batch_id) = key_u64(&key) else {
                continue;
            };
            let rec: BatchRecord = match self.decode_logged(&key, &value) {
                Ok(rec) => rec,
                Err(OutboxError::Corrupt { .. }) => continue,
                Err(e) => return Err(e),
            };
            match self.load_batch(batch_id, rec) {
                Ok(batch) => out.push(batch),
                Err(e @ (OutboxError::Corrupt { .. } | OutboxError::Missing(_))) => {
                    tracing::error!(batch_id, error = %e, "unsettled batch unreadable; skipped");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn load_batch(&self, batch_id: u64, rec: BatchRecord) -> Result<Batch, OutboxError> {
        let mut events = Vec::with_capacity(rec.event_ids.len());
        for id in &rec.event_ids {
            let ev = self
                .read_event(*id)?
                .ok_or_else(|| OutboxError::Missing(format!("events/e/{id}")))?;
            let case = ev
                .case
                .ok_or_else(|| OutboxError::Missing(format!("payload of events/e/{id}")))?;
            events.push((EventId(*id), case));
        }
        Ok(Batch {
            id: batch_id,
            idempotency_key: rec.idempotency_key,
            queue_id: rec.queue_id,
            events,
            created_at_ms: rec.created_at_ms,
            attempts: rec.attempts,
        })
    }

    /// Bump and persist a batch's attempt counter (survives a restart so
    /// backoff and metrics continue); returns the new count. Not flushed:
    /// losing one increment in a crash is harmless.
    pub fn record_attempt(&self, batch_id: u64) -> Result<u32, OutboxError> {
        let _b = lock(&self.inner.batch_lock);
        let mut rec = self
            .read_batch(batch_id)?
            .ok_or(OutboxError::UnknownBatch(batch_id))?;
        rec.attempts = rec.attempts.saturating_add(1);
        self.inner
            .st()
            .events
            .insert(&batch_key(batch_id)[..], encode(&rec)?)?;
        Ok(rec.attempts)
    }

    /// The batch was accepted: its events become `Delivered` with the case
    /// ids in batch order and the batch record is removed. Without tracking
    /// the payloads are dropped (a tombstone stays for `retention`); with
    /// tracking each case is followed (see [`Outbox::apply_listing`]) and
    /// the payload is kept for its reports. Waits for the flush.
    pub async fn settle_delivered(
        &self,
        batch: &Batch,
        case_ids: &[Uuid],
    ) -> Result<(), OutboxError> {
        self.settle_delivered_at(batch, case_ids, None).await
    }

    /// [`Outbox::settle_delivered`], with the server's `created_at` of the
    /// earliest case: the queue's tracking watermark starts there if the
    /// queue has none (a case's transitions all happen after it was
    /// created). Without it the watermark starts a minute before now.
    pub async fn settle_delivered_at(
        &self,
        batch: &Batch,
        case_ids: &[Uuid],
        created_at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<(), OutboxError> {
        if case_ids.len() != batch.events.len() {
            return Err(OutboxError::Invalid(format!(
                "batch {} has {} events but {} case ids were given",
                batch.id,
                batch.events.len(),
                case_ids.len()
            )));
        }
        let now = now_ms();
        let policy = self.inner.cfg.tracking.as_ref().filter(|p| p.track_cases);
        {
            let _b = lock(&self.inner.batch_lock);
            let rec = self.checked_batch(batch)?;
            let mut sb = sled::Batch::default();
            for (id, case_id) in rec.event_ids.iter().zip(case_ids) {
                let mut ev = self.read_existing_event(*id)?;
                ev.state = EventState::Delivered {
                    case_id: *case_id,
                    delivered_at_ms: now,
                };
                ev.settled_at_ms = Some(now);
                match policy {
                    Some(p) => {
                        let deadline = now
                            .saturating_add(u64::try_from(p.ttl.as_millis()).unwrap_or(u64::MAX));
                        ev.tracking = Some(Tracking {
                            phase: TrackPhase::Open,
                            deadline_ms: deadline,
                            history: Vec::new(),
                        });
                        sb.insert(&case_key(*case_id)[..], encode(id)?);
                        sb.insert(&deadline_key(deadline, *id)[..], encode(&())?);
                    }
                    None => {
                        ev.case = None;
                        sb.insert(&expiry_key(now, *id)[..], encode(&())?);
                    }
                }
                sb.insert(&event_key(*id)[..], encode(&ev)?);
            }
            // Serialise with the tracker's page writes: a rewind decided
            // here must not be overwritten by a page read before it.
            let _t = policy.map(|_| lock(&self.inner.track_lock));
            let mut rewinds = Vec::new();
            if policy.is_some() {
                let start = created_at
                    .unwrap_or_else(|| chrono::Utc::now() - chrono::Duration::seconds(60));
                for stream in ListingStream::ALL {
                    let wk = watermark_key(rec.queue_id, stream);
                    match self.inner.st().events.get(wk)? {
                        None => sb.insert(&wk[..], encode(&Watermark { updated_at: start })?),
                        // Every transition of these cases is at or after
                        // their creation. A watermark already past it (the
                        // answer came late: a retry, a re-send after a
                        // restart) may have skipped some of them while
                        // they were not ours yet: read again from there.
                        Some(raw) => {
                            let wm: Watermark = self.decode_logged(&wk, &raw)?;
                            if let Some(c) = created_at.filter(|c| wm.updated_at > *c) {
                                sb.insert(&wk[..], encode(&Watermark { updated_at: c })?);
                                rewinds.push((stream, c));
                            }
                        }
                    }
                }
            }
            sb.remove(&batch_key(batch.id)[..]);
            self.inner.st().events.apply_batch(sb)?;
            if !rewinds.is_empty() {
                let mut r = lock(&self.inner.rewinds);
                for (stream, c) in rewinds {
                    metrics::counter!("duvo_bridge_tracking_rewinds_total", "stream" => stream.as_str())
                        .increment(1);
                    tracing::debug!(queue = %rec.queue_id, stream = stream.as_str(), to = %c,
                        "batch settled after its cases' listing window: the stream reads again from their creation");
                    let e = r.entry((rec.queue_id, stream)).or_insert(c);
                    *e = (*e).min(c);
                }
            }
            let mut ix = lock(&self.inner.index);
            ix.batched = ix.batched.saturating_sub(rec.event_ids.len() as u64);
            drop(ix);
            if policy.is_some() {
                lock(&self.inner.track).add_open(rec.queue_id, rec.event_ids.len() as u64);
            }
        }
        self.publish_depth();
        if policy.is_some() {
            self.publish_tracking();
        }
        self.inner.flush.wait_durable().await
    }

    /// The API refused the batch as invalid (400/413), so the server
    /// committed nothing: replace it by two halves with new idempotency keys,
    /// atomically, and return them (first half first). A batch of one event
    /// cannot be split: use [`Outbox::reject`].
    pub async fn split_batch(&self, batch: &Batch) -> Result<(Batch, Batch), OutboxError> {
        if batch.events.len() < 2 {
            return Err(OutboxError::Invalid(format!(
                "batch {} has {} event(s) and cannot be split; reject it instead",
                batch.id,
                batch.events.len()
            )));
        }
        let mid = batch.events.len().div_ceil(2);
        self.partition_batch(batch, |i, _| i < mid).await
    }

    /// Replace the batch by two with new idempotency keys, atomically: the
    /// events in `first` (batch order kept) and the rest. Reconciliation
    /// uses it to settle the cases found on the server and send only the
    /// others, under a key the server has never seen with another body.
    pub async fn split_off(
        &self,
        batch: &Batch,
        first: &HashSet<EventId>,
    ) -> Result<(Batch, Batch), OutboxError> {
        let n = batch
            .events
            .iter()
            .filter(|(id, _)| first.contains(id))
            .count();
        if n == 0 || n == batch.events.len() {
            return Err(OutboxError::Invalid(format!(
                "split_off of batch {} needs a proper subset of its events",
                batch.id
            )));
        }
        self.partition_batch(batch, |_, id| first.contains(&EventId(id)))
            .await
    }

    /// Replace `batch` by the events for which `in_first(position, id)` and
    /// the rest, both non-empty, with new keys, in one sled batch.
    async fn partition_batch(
        &self,
        batch: &Batch,
        in_first: impl Fn(usize, u64) -> bool,
    ) -> Result<(Batch, Batch), OutboxError> {
        let halves = {
            let _b = lock(&self.inner.batch_lock);
            let rec = self.checked_batch(batch)?;
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for (i, id) in rec.event_ids.iter().copied().enumerate() {
                if in_first(i, id) {
                    a.push(id)
                } else {
                    b.push(id)
                }
            }
            if a.is_empty() || b.is_empty() {
                return Err(OutboxError::Invalid(format!(
                    "batch {} cannot be split into an empty part",
                    batch.id
                )));
            }
            let now = now_ms();
            let mut sb = sled::Batch::default();
            let mut halves = Vec::with_capacity(2);
            for ids in [a, b] {
                let new_id = self.inner.st().generate_id()?;
                let mut events = Vec::with_capacity(ids.len());
                for id in &ids {
                    let mut ev = self.read_existing_event(*id)?;
                    let case = ev
                        .case
                        .clone()
                        .ok_or_else(|| OutboxError::Missing(format!("payload of events/e/{id}")))?;
                    ev.state = EventState::Batched { batch_id: new_id };
                    sb.insert(&event_key(*id)[..], encode(&ev)?);
                    events.push((EventId(*id), case));
                }
                let half = BatchRecord {
                    idempotency_key: batch_idempotency_key(self.inner.outbox_id, new_id),
                    queue_id: rec.queue_id,
                    event_ids: ids,
                    created_at_ms: now,
                    attempts: 0,
                };
                sb.insert(&batch_key(new_id)[..], encode(&half)?);
                halves.push(Batch {
                    id: new_id,
                    idempotency_key: half.idempotency_key,
                    queue_id: rec.queue_id,
                    events,
                    created_at_ms: now,
                    attempts: 0,
                });
            }
            sb.remove(&batch_key(batch.id)[..]);
            self.inner.st().events.apply_batch(sb)?;
            halves
        };
        self.inner.flush.wait_durable().await?;
        let mut it = halves.into_iter();
        match (it.next(), it.next()) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => Err(OutboxError::Invalid(
                "split produced fewer than two halves".into(),
            )),
        }
    }

    /// A batch of exactly one event was refused for good: the event becomes
    /// `Rejected`, a copy with the error goes to the dead letters, and the
    /// batch is removed, all in one transaction. Waits for the flush.
    pub async fn reject(
        &self,
        batch: &Batch,
        status: u16,
        error: &str,
        message: &str,
    ) -> Result<(), OutboxError> {
        if batch.events.len() != 1 {
            return Err(OutboxError::Invalid(format!(
                "only a batch of one event can be rejected; batch {} has {}",
                batch.id,
                batch.events.len()
            )));
        }
        let now = now_ms();
        let report = {
            let _b = lock(&self.inner.batch_lock);
            let rec = self.checked_batch(batch)?;
            let id = rec.event_ids[0];
            let mut ev = self.read_existing_event(id)?;
            // The report carries the payload: build it before taking it.
            let report = match &self.inner.cfg.tracking {
                Some(p) if p.reports(&ev.source, ReportStatus::Rejected) => Some(self.new_report(
                    id,
                    &ev,
                    None,
                    ReportStatus::Rejected,
                    format!("{status} {error}: {message}"),
                    None,
                    now,
                )?),
                _ => None,
            };
            let case = ev
                .case
                .take()
                .ok_or_else(|| OutboxError::Missing(format!("payload of events/e/{id}")))?;
            let dead = DeadLetter {
                id: EventId(id),
                source: ev.source.clone(),
                identity: ev.identity.clone(),
                queue_id: ev.queue_id,
                case,
                status,
                error: error.to_string(),
                message: message.to_string(),
                received_at_ms: ev.received_at_ms,
                rejected_at_ms: now,
            };
            ev.state = EventState::Rejected {
                status,
                error: error.to_string(),
                message: message.to_string(),
            };
            ev.settled_at_ms = Some(now);
            let ev_bytes = encode(&ev)?;
            let dead_bytes = encode(&dead)?;
            let expiry_bytes = encode(&())?;
            let report_rec = match &report {
                Some(r) => Some((report_key(r.id), encode(r)?)),
                None => None,
            };
            let (ek, xk, bk) = (event_key(id), expiry_key(now, id), batch_key(batch.id));
            let dk = id.to_be_bytes();
            (&self.inner.st().events, &self.inner.st().dead).transaction(
                |(events, dead)| -> ConflictableTransactionResult<(), OutboxError> {
                    events.insert(&ek[..], ev_bytes.as_slice())?;
                    events.insert(&xk[..], expiry_bytes.as_slice())?;
                    events.remove(&bk[..])?;
                    if let Some((rk, rb)) = &report_rec {
                        events.insert(&rk[..], rb.as_slice())?;
                    }
                    dead.insert(&dk[..], dead_bytes.as_slice())?;
                    Ok(())
                },
            )?;
            let mut ix = lock(&self.inner.index);
            ix.batched = ix.batched.saturating_sub(1);
            report
        };
        self.publish_depth();
        self.announce_when_durable(report.into_iter().collect())
            .await
    }

    /// All dead letters, in event id order. Corrupt entries are logged,
    /// counted and skipped (they stay on disk).
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, OutboxError> {
        let mut out = Vec::new();
        for item in self.inner.st().dead.iter() {
            let (key, value) = item?;
            match self.decode_logged(&key, &value) {
                Ok(d) => out.push(d),
                Err(OutboxError::Corrupt { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Remove tombstones (and their identities) of events settled more than
    /// `retention` before `now_ms`; returns how many events were removed.
    /// Reads only the expired range of the expiry index.
    pub fn purge_expired(&self, now_ms: u64) -> Result<usize, OutboxError> {
        let inner = &self.inner;
        let retention_ms = u64::try_from(inner.cfg.retention.as_millis()).unwrap_or(u64::MAX);
        let Some(cutoff) = now_ms.checked_sub(retention_ms) else {
            return Ok(0);
        };
        let range = expiry_key(0, 0)..=expiry_key(cutoff, u64::MAX);
        let mut removed = 0usize;
        let mut sb = sled::Batch::default();
        let mut callbacks = CallbackRefs::default();
        let mut pending = 0usize;
        for item in inner.st().events.range(range) {
            let (key, _) = item?;
            sb.remove(key.clone());
            pending += 1;
            if let Some(id) = expiry_key_id(&key) {
                match self.read_event(id) {
                    Ok(Some(ev)) if ev.state.is_settled() && !ev.is_tracked() => {
                        sb.remove(&event_key(id)[..]);
                        callbacks.release(ev.origin.as_ref());
                        if let Some(identity) = &ev.identity {
                            let ik = identity_key(identity);
                            // Only if the identity still points at this event.
                            if let Some(raw) = inner.st().events.get(&ik)? {
                                if let Ok(owner) = self.decode_logged::<u64>(&ik, &raw) {
                                    if owner == id {
                                        sb.remove(ik);
                                    }
                                }
                            }
                        }
                        removed += 1;
                    }
                    Ok(_) => {}
                    Err(OutboxError::Corrupt { .. }) => {
                        // Keep the corrupt record for inspection; drop only
                        // its expiry entry so purge does not trip on it again.
                    }
                    Err(e) => return Err(e),
                }
            }
            if pending >= PURGE_CHUNK {
                let mut chunk = std::mem::take(&mut sb);
                let _c = std::mem::take(&mut callbacks).write(
                    &inner.callback_lock,
                    &inner.st().events,
                    &mut chunk,
                )?;
                inner.st().events.apply_batch(chunk)?;
                pending = 0;
            }
        }
        if pending > 0 {
            let _c = callbacks.write(&inner.callback_lock, &inner.st().events, &mut sb)?;
            inner.st().events.apply_batch(sb)?;
        }
        Ok(removed)
    }

    /// Events not yet delivered or rejected (stored + batched): the backlog.
    pub fn depth(&self) -> u64 {
        lock(&self.inner.index).depth()
    }

    /// Size of the database files, refreshed by the flusher at most every 200 ms (reading it means
    /// walking the directory, so the flusher refreshes it, not every caller).
    pub fn size_on_disk(&self) -> u64 {
        self.inner.flush.bytes_on_disk.load(Ordering::Relaxed)
    }

    /// True once the backlog is above `high_water_events` or the database
    /// above `high_water_bytes`; stays true until the backlog is below
    /// `low_water_events` (hysteresis, so sources do not flap between paused
    /// and running at the threshold).
    pub fn over_high_water(&self) -> bool {
        let cfg = &self.inner.cfg;
        if self.disk_nearly_full() {
            return true;
        }
        let depth = self.depth();
        let over = depth > cfg.high_water_events || self.size_on_disk() > cfg.high_water_bytes;
        let flag = &self.inner.over_high;
        if over {
            flag.store(true, Ordering::Relaxed);
            true
        } else if flag.load(Ordering::Relaxed) && depth >= cfg.low_water_events {
            true
        } else {
            flag.store(false, Ordering::Relaxed);
            false
        }
    }

    /// Whether the outbox's filesystem has less free space than
    /// `min_free_disk_bytes`. Asked of the filesystem at most every 250 ms
    /// (intake asks on every request); an error reading it counts as full.
    pub fn disk_nearly_full(&self) -> bool {
        let inner = &self.inner;
        let now = crate::clock::now_ms();
        let checked = inner.disk_checked_ms.load(Ordering::Relaxed);
        if now.saturating_sub(checked) >= 250
            && inner
                .disk_checked_ms
                .compare_exchange(checked, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let free = durable::free_bytes(&inner.cfg.path).unwrap_or(0);
            if free != u64::MAX {
                metrics::gauge!("duvo_bridge_outbox_disk_free_bytes").set(free as f64);
            }
            let low = free < inner.cfg.min_free_disk_bytes;
            if low != inner.disk_low.swap(low, Ordering::Relaxed) {
                if low {
                    tracing::error!(free_bytes = free, min_free_bytes = inner.cfg.min_free_disk_bytes,
                        path = %inner.cfg.path.display(),
                        "outbox filesystem nearly full: intake paused until space is back (free space there or grow the volume; delivery goes on, and intake resumes by itself)");
                } else {
                    tracing::info!(
                        free_bytes = free,
                        "outbox filesystem has room again: intake resumes"
                    );
                }
            }
        }
        inner.disk_low.load(Ordering::Relaxed)
    }

    /// Force a flush and wait for it (shutdown, tests).
    pub async fn flush(&self) -> Result<(), OutboxError> {
        self.inner.flush.wait_durable().await
    }

    /// Counters, without touching the disk.
    pub fn stats(&self) -> OutboxStats {
        let (depth, ready, batched) = {
            let ix = lock(&self.inner.index);
            (ix.depth(), ix.ready, ix.batched)
        };
        OutboxStats {
            depth,
            ready,
            batched,
            bytes_on_disk: self.size_on_disk(),
            flushes: self.inner.flush.flushes.load(Ordering::Relaxed),
            appended: self.inner.appended.load(Ordering::Relaxed),
            duplicates: self.inner.duplicates.load(Ordering::Relaxed),
            corrupt: self.inner.corrupt.load(Ordering::Relaxed),
        }
    }

    // ---- helpers ----

    fn wake_batcher(&self) {
        // Wake everyone waiting now, and leave a permit for a batcher that is
        // between its check and its wait.
        self.inner.ready_notify.notify_waiters();
        self.inner.ready_notify.notify_one();
    }

    fn publish_depth(&self) {
        let (depth, batched) = {
            let ix = lock(&self.inner.index);
            (ix.depth(), ix.batched)
        };
        metrics::gauge!("duvo_bridge_outbox_depth").set(depth as f64);
        metrics::gauge!("duvo_bridge_outbox_batched_events").set(batched as f64);
    }

    /// Decode a record; on corruption log it and count it before returning
    /// the error.
    fn decode_logged<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        bytes: &[u8],
    ) -> Result<T, OutboxError> {
        decode(key, bytes).inspect_err(|e| {
            if let OutboxError::Corrupt { key, reason } = e {
                self.inner.corrupt.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("duvo_bridge_outbox_corrupt_records_total").increment(1);
                tracing::error!(%key, %reason, "corrupt outbox record");
            }
        })
    }

    fn read_event(&self, id: u64) -> Result<Option<EventRecord>, OutboxError> {
        let key = event_key(id);
        match self.inner.st().events.get(key)? {
            Some(raw) => self.decode_logged(&key, &raw).map(Some),
            None => Ok(None),
        }
    }

    fn read_existing_event(&self, id: u64) -> Result<EventRecord, OutboxError> {
        self.read_event(id)?
            .ok_or_else(|| OutboxError::Missing(format!("events/e/{id}")))
    }

    fn read_batch(&self, batch_id: u64) -> Result<Option<BatchRecord>, OutboxError> {
        let key = batch_key(batch_id);
        match self.inner.st().events.get(key)? {
            Some(raw) => self.decode_logged(&key, &raw).map(Some),
            None => Ok(None),
        }
    }

    /// The persisted record of `batch`, which must exist and list the same
    /// events (a stale or forged `Batch` must not settle other events).
    fn checked_batch(&self, batch: &Batch) -> Result<BatchRecord, OutboxError> {
        let rec = self
            .read_batch(batch.id)?
            .ok_or(OutboxError::UnknownBatch(batch.id))?;
        let ids: Vec<u64> = batch.events.iter().map(|(id, _)| id.0).collect();
        if rec.event_ids != ids {
            return Err(OutboxError::Invalid(format!(
                "batch {} does not match its persisted record",
                batch.id
            )));
        }
        Ok(rec)
    }
}

/// Rebuild the records of batches found corrupt at open from the events
/// that point at them (their key is derived from the batch id), keeping the
/// damaged bytes under a quarantine key for inspection. The batch is then
/// resumed like any other: looked for on the server by its label before
/// anything is sent again. Returns how many were rebuilt.
fn rebuild_batches(
    events: &sled::Tree,
    outbox_id: Uuid,
    broken: HashMap<u64, Vec<(u64, Uuid, u64)>>,
    sb: &mut sled::Batch,
) -> Result<usize, OutboxError> {
    let mut rebuilt = 0;
    for (batch_id, mut members) in broken {
        let key = batch_key(batch_id);
        if let Some(raw) = events.get(key)? {
            sb.insert(record::quarantine_key(&key), raw);
        }
        if members.is_empty() {
            sb.remove(&key[..]);
            continue;
        }
        members.sort_unstable();
        let queue_id = members[0].1;
        let rec = BatchRecord {
            idempotency_key: batch_idempotency_key(outbox_id, batch_id),
            queue_id,
            event_ids: members.iter().map(|m| m.0).collect(),
            // Its cases cannot be older than its oldest event.
            created_at_ms: members.iter().map(|m| m.2).min().unwrap_or(0),
            attempts: 1,
        };
        sb.insert(&key[..], encode(&rec)?);
        tracing::error!(
            batch_id,
            events = members.len(),
            "corrupt batch record rebuilt from its events (damaged bytes kept under events/z/...); it is looked for on the server before anything is re-sent"
        );
        metrics::counter!("duvo_bridge_outbox_batches_rebuilt_total").increment(1);
        rebuilt += 1;
    }
    Ok(rebuilt)
}

/// The idempotency key (and batch label value) of batch `batch_id`: derived,
/// not random, so a batch whose record is lost can be rebuilt from its
/// events with the key its cases were sent under, and looked for by it.
/// The outbox's identity keeps keys of different outboxes apart.
pub fn batch_idempotency_key(outbox_id: Uuid, batch_id: u64) -> String {
    format!("{outbox_id}-{batch_id}")
}

/// Open sled and rebuild the indexes (blocking: runs on the blocking pool).
fn open_blocking(cfg: &OutboxConfig) -> Result<Opened, OutboxError> {
    let started = std::time::Instant::now();
    // The marker names the generation to open (compaction); a marker that
    // cannot be read is refused by the identity check below.
    let generation = compact::current_generation(&cfg.path).unwrap_or(0);
    let stores = compact::Stores::open(cfg, generation).map_err(|e| match e {
        // Another process holds it: not damage.
        e if is_lock_held(&e) => OutboxError::InUse {
            path: cfg.path.clone(),
        },
        sled::Error::Io(_) | sled::Error::Corruption { .. } | sled::Error::ReportableBug(_) => {
            OutboxError::Unopenable {
                path: cfg.path.clone(),
                detail: e.to_string(),
            }
        }
        other => OutboxError::Storage(other),
    })?;
    // Before anything is read: a database that lost its data is refused
    // here, not recovered as if it were new.
    let sled_open_ms = started.elapsed().as_millis() as u64;
    let identity = durable::check_identity(
        &stores.db,
        &cfg.path,
        &mut lock(&stores.dir_sync),
        generation,
        cfg.accept_data_loss,
    )?;
    // A copy a crash left half made, or a generation it left behind.
    if let Err(e) = compact::remove_other_generations(&cfg.path, generation) {
        tracing::warn!(error = %e, "cannot remove an unused outbox generation");
    }
    let db = &stores.db;
    let events = stores.events.clone();
    let mut corrupt = 0u64;
    let mut note_corrupt = |e: &OutboxError| {
        corrupt += 1;
        note_corrupt_at_open(e);
    };
    // Every later id (events appended, batches made from now on) is at or
    // above this one, every stored one below. An empty outbox has nothing
    // to load and keeps its ids from 0.
    let first_new_id = if events.is_empty() {
        0
    } else {
        stores.generate_id()?
    };
    let opened_at_ms = crate::clock::now_ms();

    // Batches first (few, small): the event load needs to know which exist,
    // and the batched count comes from their records.
    let mut index = ReadyIndex::default();
    let mut batch_ids: HashSet<u64> = HashSet::new();
    // Corrupt batch records -> (event id, queue, received at) of their events.
    let mut broken_batches: HashMap<u64, Vec<(u64, Uuid, u64)>> = HashMap::new();
    for item in events.scan_prefix([BATCH_PREFIX]) {
        let (key, value) = item?;
        let Some(batch_id) = key_u64(&key) else {
            continue;
        };
        // A corrupt batch record still counts as existing: its events stay
        // batched (never re-sent under a new key), and the record is
        // rebuilt from them by the load.
        batch_ids.insert(batch_id);
        match decode::<BatchRecord>(&key, &value) {
            Ok(b) => index.batched += b.event_ids.len() as u64,
            Err(e) => {
                note_corrupt(&e);
                broken_batches.insert(batch_id, Vec::new());
            }
        }
    }
    let mut reports = ReportIndex::default();
    for item in events.scan_prefix([REPORT_PREFIX]) {
        let (key, value) = item?;
        let Some(id) = key_u64(&key) else {
            continue;
        };
        match decode::<Report>(&key, &value) {
            Ok(r) => reports.insert(&r.source, id),
            Err(e) => note_corrupt(&e),
        }
    }
    let bytes = db.size_on_disk().unwrap_or(0);
    tracing::info!(
        path = %cfg.path.display(),
        batched = index.batched,
        batches = batch_ids.len(),
        reports = reports.len(),
        corrupt,
        bytes,
        sled_open_ms,
        total_ms = started.elapsed().as_millis() as u64,
        "outbox opened"
    );
    drop(events);
    Ok(Opened {
        stores,
        index,
        reports,
        corrupt,
        bytes,
        identity,
        load: EventLoad {
            batch_ids,
            broken: broken_batches,
            first_new_id,
            opened_at_ms,
            started,
            from: 0,
            loaded: 0,
            orphaned: 0,
        },
    })
}

/// Count and log a corrupt record met while opening or loading (it stays
/// on disk for `outbox verify`).
fn note_corrupt_at_open(e: &OutboxError) {
    metrics::counter!("duvo_bridge_outbox_corrupt_records_total").increment(1);
    tracing::error!(error = %e, "corrupt outbox record found during recovery; left on disk");
}

/// Open with `open`, waiting up to 10 s while the database's file lock is
/// held: an outbox of this process that was just dropped lets go of it when
/// sled's last background write is done, shortly after. A lock another
/// live process keeps is reported after the wait.
fn open_when_released(open: impl Fn() -> sled::Result<sled::Db>) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match open() {
            Err(e) if is_lock_held(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// sled reports a held file lock as an `Other` I/O error naming the OS's
/// `WouldBlock`.
fn is_lock_held(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::WouldBlock
                || io.to_string().contains("could not acquire lock")
        }
        _ => false,
    }
}

/// The outbox's sled database at `path`, opened raw (no recovery, no
/// marker check) for inspection and tests, once a just-closed outbox has
/// released it.
pub fn open_raw(path: &std::path::Path) -> sled::Result<sled::Db> {
    let dir = compact::current_dir(path);
    open_when_released(|| sled::open(&dir))
}

/// The event load: what it needs from the open, and how far it got.
struct EventLoad {
    /// Ids of every persisted batch (corrupt ones included).
    batch_ids: HashSet<u64>,
    /// Corrupt batch records -> (event id, queue, received at) of their
    /// events, to be rebuilt from them.
    broken: HashMap<u64, Vec<(u64, Uuid, u64)>>,
    /// Every event stored before this open has a lower id; events appended
    /// and batches made from now on have this one or higher.
    first_new_id: u64,
    opened_at_ms: u64,
    started: std::time::Instant,
    /// The next event id to read.
    from: u64,
    loaded: u64,
    orphaned: u64,
}

/// The load on the blocking pool while intake and delivery already run,
/// holding the outbox only while it reads a chunk, so a dropped outbox ends
/// it. A failure (an I/O error reading the database) is retried after a
/// second from where it stopped: events the load has not reached are not
/// offered to the batcher until it has, so giving up would strand them
/// until the next start.
fn load_in_background(inner: std::sync::Weak<Inner>, mut load: EventLoad) {
    loop {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let outbox = Outbox { inner };
        let step = match outbox.load_chunk(&mut load) {
            Ok(true) => continue,
            Ok(false) => outbox.finish_load(&mut load),
            Err(e) => Err(e),
        };
        drop(outbox);
        match step {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(error = %e, from = load.from,
                    "loading the outbox's stored events failed; retrying in 1 s from where it stopped");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duvo::NewCase;

    fn ev(queue_id: Uuid, title: &str) -> NewEvent {
        NewEvent {
            source: "oms".into(),
            identity: None,
            queue_id,
            case: NewCase {
                title: title.into(),
                data: None,
                labels: Vec::new(),
                priority: None,
            },
            received_at_ms: 1,
            origin: None,
        }
    }

    #[tokio::test]
    async fn corruption_after_open_sets_the_event_aside_on_claim() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(OutboxConfig::new(dir.path().join("db")))
            .await
            .unwrap();
        let q = Uuid::new_v4();
        let out = outbox
            .append(vec![ev(q, "a"), ev(q, "b"), ev(q, "c")])
            .await
            .unwrap();
        let ids: Vec<EventId> = out.iter().map(AppendOutcome::id).collect();
        // Garbage written behind the outbox's back.
        outbox
            .inner
            .st()
            .events
            .insert(event_key(ids[1].0), &b"\x01garbage"[..])
            .unwrap();
        assert!(matches!(
            outbox.claim_batch(q, 100, 1 << 20).await,
            Err(OutboxError::Corrupt { .. })
        ));
        // The corrupt event is set aside; the others are claimable again, in order.
        let stats = outbox.stats();
        assert_eq!((stats.ready, stats.batched, stats.corrupt), (2, 0, 1));
        let batch = outbox.claim_batch(q, 100, 1 << 20).await.unwrap().unwrap();
        assert_eq!(batch.event_ids(), vec![ids[0], ids[2]]);
        assert!(matches!(
            outbox.get(ids[1]),
            Err(OutboxError::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn flush_wakes_waiters_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(OutboxConfig::new(dir.path().join("db")))
            .await
            .unwrap();
        outbox.flush().await.unwrap();
        outbox.flush().await.unwrap();
        assert_eq!(outbox.stats().flushes, 2);
    }
}
