//! Group commit: one task owns every fsync.
//!
//! A group commit is sled's `flush()` followed by an fsync of every file in
//! the outbox directory ([`super::durable::DirSync`]): sled's flush alone
//! is `sync_file_range`, not an fsync, on Linux.
//!
//! sled 0.34's `flush_async` deadlocks when called concurrently, and one
//! fsync per append caps throughput at the disk's fsync rate. So writers
//! never flush themselves: they register with the [`FlushShared`] queue and
//! wait, and a single flusher task runs blocking `db.flush()` on the blocking
//! pool and then wakes everyone it covered.
//!
//! Happens-before argument: a writer first writes to sled, then takes the
//! queue lock and pushes a one-shot answer channel. The flusher takes the
//! same lock, takes every queued channel (bumping the generation `started`)
//! and only then calls `flush()`. So the flush that answers a writer started
//! after the writer's write, and sled's flush makes every write issued before
//! it durable. Writers arriving while a flush runs are queued for the next
//! one, which serves all of them with one fsync; each writer is woken
//! exactly once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};

use super::Inner;
use super::durable::{META_COMMIT_SEQ, Marker};
use super::types::OutboxError;

/// Minimum interval between two reads of the database size.
const SIZE_REFRESH_EVERY: Duration = Duration::from_millis(200);

/// What a waiter hears: the flush covering its writes succeeded, or why not.
type FlushResult = Result<(), Arc<str>>;

#[derive(Debug, Default)]
struct FlushQueue {
    /// Number of flushes started so far (generation of the latest).
    started: u64,
    /// Writers registered since the last flush started; each is answered
    /// exactly once, by the next flush (no thundering herd on every fsync).
    waiters: Vec<oneshot::Sender<FlushResult>>,
    /// The flusher task ended; nobody will flush any more.
    stopped: bool,
}

/// State shared between writers and the flusher task.
#[derive(Debug)]
pub(crate) struct FlushShared {
    queue: Mutex<FlushQueue>,
    wake: Notify,
    shutdown: AtomicBool,
    pub(crate) flushes: AtomicU64,
    pub(crate) bytes_on_disk: AtomicU64,
}

impl FlushShared {
    pub(crate) fn new(bytes_on_disk: u64) -> Self {
        FlushShared {
            queue: Mutex::new(FlushQueue::default()),
            wake: Notify::new(),
            shutdown: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
            bytes_on_disk: AtomicU64::new(bytes_on_disk),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, FlushQueue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wait until a flush that started after this call has completed: every
    /// sled write the caller issued before calling is then on disk.
    /// Cancel-safe: dropping the future only stops waiting.
    pub(crate) async fn wait_durable(&self) -> Result<(), OutboxError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.queue();
            if q.stopped {
                return Err(OutboxError::FlusherStopped);
            }
            q.waiters.push(tx);
        }
        self.wake.notify_one();
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(OutboxError::Flush(e.to_string())),
            // The flusher dropped us without an answer: it stopped.
            Err(_) => Err(OutboxError::FlusherStopped),
        }
    }

    /// Ask the flusher to exit (the last outbox handle is gone).
    pub(crate) fn shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// Marks the flusher stopped however its task ends (exit, abort at runtime
/// shutdown) and drops the queued waiters, so no writer waits forever.
struct StopGuard(Arc<FlushShared>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        let mut q = self.0.queue();
        q.stopped = true;
        q.waiters.clear();
    }
}

/// The flusher task. Holds only a `Weak` to the outbox so that dropping the
/// last handle closes the database (and releases sled's file lock) at once,
/// except while a flush is running, which keeps it alive until it returns.
pub(crate) async fn run(shared: Arc<FlushShared>, weak: Weak<Inner>) {
    let _guard = StopGuard(shared.clone());
    let mut last_size_refresh: Option<Instant> = None;
    loop {
        shared.wake.notified().await;
        if shared.shutdown.load(Ordering::Acquire) {
            break;
        }
        let (generation, waiters) = {
            let mut q = shared.queue();
            if q.waiters.is_empty() {
                // A stale wake-up: whoever asked was served by an earlier flush.
                continue;
            }
            q.started += 1;
            (q.started, std::mem::take(&mut q.waiters))
        };
        let served = waiters.len();
        let Some(inner) = weak.upgrade() else {
            // Unreachable while waiters hold a handle; the guard answers them.
            break;
        };
        // Reading the size walks the directory: worth it at most a few
        // times a second, not on every fsync of a busy outbox.
        let refresh_size = last_size_refresh.is_none_or(|t| t.elapsed() >= SIZE_REFRESH_EVERY);
        if refresh_size {
            last_size_refresh = Some(Instant::now());
        }
        let joined = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let result = flush_and_fsync(&inner);
            let elapsed = start.elapsed();
            let bytes = refresh_size.then(|| inner.st().db.size_on_disk());
            // Drop the handle here, before the waiters are woken, so a
            // caller that drops the outbox right after its append returned
            // really closes the database.
            drop(inner);
            (result, elapsed, bytes)
        })
        .await;
        let outcome: Result<(), String> = match joined {
            Ok((result, elapsed, bytes)) => {
                metrics::histogram!("duvo_bridge_outbox_flush_seconds")
                    .record(elapsed.as_secs_f64());
                metrics::histogram!("duvo_bridge_outbox_flush_batch_size").record(served as f64);
                shared.flushes.fetch_add(1, Ordering::Relaxed);
                match bytes {
                    None => {}
                    Some(Ok(b)) => {
                        shared.bytes_on_disk.store(b, Ordering::Relaxed);
                        metrics::gauge!("duvo_bridge_outbox_bytes").set(b as f64);
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "cannot read outbox size on disk"),
                }
                result
            }
            Err(e) => Err(format!("flush task failed: {e}")),
        };
        if let Err(e) = &outcome {
            tracing::error!(error = %e, generation, "outbox flush failed");
        }
        let answer: FlushResult = outcome.map_err(|e| Arc::from(e.as_str()));
        for waiter in waiters {
            // A waiter that gave up (cancelled) is simply gone.
            let _ = waiter.send(answer.clone());
        }
    }
}

/// The marker is rewritten at most this often (three fsyncs each time).
const MARKER_EVERY: Duration = Duration::from_secs(1);

/// One group commit: bump the commit sequence (written in the same flush),
/// sled's flush, then an fsync of every file sled writes. Only when all of
/// it succeeded are the writes issued before it durable.
fn flush_and_fsync(inner: &Inner) -> Result<(), String> {
    // The stores first, then the durability lock: the order a compaction's
    // switch takes them in.
    let st = inner.st();
    let mut d = super::lock(&inner.durability);
    let seq = d.commit_seq + 1;
    st.db
        .insert(META_COMMIT_SEQ, &seq.to_be_bytes())
        .map_err(|e| e.to_string())?;
    st.db.flush().map_err(|e| e.to_string())?;
    let stats = super::lock(&st.dir_sync)
        .sync()
        .map_err(|e| format!("fsync of the outbox files failed: {e}"))?;
    metrics::counter!("duvo_bridge_outbox_fsyncs_total")
        .increment((stats.files + stats.dirs) as u64);
    d.commit_seq = seq;
    // Here, inside the blocking call, so the flusher holds no handle once
    // the waiters are woken; at most once a second, so it delays one group
    // commit per second by the marker's own three fsyncs.
    update_marker(&mut d, &inner.cfg.path);
    Ok(())
}

/// Record the durable commit sequence in the marker, when it is due.
fn update_marker(d: &mut Durability, dir: &std::path::Path) {
    if d.marker_written.elapsed() < MARKER_EVERY || d.marker_seq == d.commit_seq {
        return;
    }
    let m = Marker {
        outbox_id: d.outbox_id,
        commit_seq: d.commit_seq,
        generation: d.generation,
    };
    match m.write(dir) {
        Ok(()) => {
            d.marker_seq = d.commit_seq;
            d.marker_written = Instant::now();
        }
        Err(e) => {
            // The old marker stays: it still names a sequence sled holds,
            // so the start-up check stays correct, only less precise.
            d.marker_written = Instant::now();
            tracing::warn!(error = %e, "cannot update the outbox marker");
        }
    }
}

/// What the flusher needs to make writes durable and prove it later.
#[derive(Debug)]
pub(crate) struct Durability {
    /// The generation the marker names (changed only by a compaction).
    pub(crate) generation: u64,
    pub(crate) outbox_id: uuid::Uuid,
    /// Commit sequence of the last group commit that succeeded.
    pub(crate) commit_seq: u64,
    /// Sequence in the marker on disk, and when it was written.
    pub(crate) marker_seq: u64,
    pub(crate) marker_written: Instant,
}
