//! Public data types of the outbox: ids, events, states, batches, config,
//! statistics and the module's error type.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use chrono::{DateTime, Utc};

use super::reports::ReportStatus;
use crate::duvo::{CaseStatus, NewCase};

/// Identifier of an event in the outbox.
///
/// Allocated with sled's `generate_id`, so ids grow monotonically across
/// restarts: id order is arrival order, which is what "oldest first" uses.
/// Serialised as a decimal *string* because JavaScript-side consumers of the
/// admin API and of reports cannot represent every u64 as a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(pub u64);

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for EventId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<u64>().map(EventId)
    }
}

impl Serialize for EventId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An event as a source hands it to the outbox, already mapped to a case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Source name, e.g. `oms`.
    pub source: String,
    /// Dedupe identity, e.g. `http:oms:<idem-key>:3` or `kafka:t:0:123`.
    /// Events without an identity are never deduplicated.
    pub identity: Option<String>,
    /// Target Duvo queue.
    pub queue_id: Uuid,
    /// The case to create.
    pub case: NewCase,
    /// Unix ms at which the source received the event (end-to-end latency).
    pub received_at_ms: u64,
    /// Where the event came from, as much as a reporter needs to send a
    /// failure report back to it. Kept while the case is tracked.
    pub origin: Option<Origin>,
}

/// Where an event came from: what a reporter needs to
/// address a report about it (a callback URL, an AMQP `reply_to` and message
/// id, a Kafka topic/partition/offset and key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    Http {
        /// Per-event callback URL (the request's `X-Duvo-Callback-Url`
        /// header); the source's `callback_url` when absent. What a source
        /// hands in and a report carries; in a stored event the outbox moves
        /// it to a shared record and keeps `callback_ref`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        callback_url: Option<String>,
        /// Outbox-internal: the stored URL's digest (see `outbox::callbacks`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        callback_ref: Option<String>,
    },
    Amqp {
        /// The queue the message was consumed from.
        queue: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        correlation_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<String>,
    },
    Kafka {
        topic: String,
        partition: i32,
        offset: i64,
        /// The record key, base64 (standard alphabet, padded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_b64: Option<String>,
    },
}

/// Lifecycle of an event in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum EventState {
    /// Durable, waiting for a batch.
    Stored,
    /// In a persisted batch, maybe in flight.
    Batched { batch_id: u64 },
    /// The case was created.
    Delivered { case_id: Uuid, delivered_at_ms: u64 },
    /// The API refused it for good; a copy is in the dead letters.
    Rejected {
        status: u16,
        error: String,
        message: String,
    },
}

impl EventState {
    /// Delivered or rejected: nothing more will happen to the event.
    pub fn is_settled(&self) -> bool {
        matches!(
            self,
            EventState::Delivered { .. } | EventState::Rejected { .. }
        )
    }
}

/// What `Outbox::get` shows about an event (no payload: it is dropped once
/// the event is settled and no longer tracked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventView {
    pub id: EventId,
    pub source: String,
    pub queue_id: Uuid,
    pub state: EventState,
    pub received_at_ms: u64,
    pub title: String,
    /// The case's status history as the tracker saw it (delivered events
    /// only, while tracked and for `retention` after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<Tracking>,
}

/// How far the tracker follows a delivered event's case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackPhase {
    /// Not finished yet (pending, claimed, needs input, postponed).
    Open,
    /// Ended failed or canceled (and reported); still watched because a
    /// retry in Duvo can send it back to pending and fail it again.
    Watching,
    /// No longer followed: completed, expired, or its TTL ran out while
    /// watching.
    Done,
}

/// One status change the tracker saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub status: CaseStatus,
    /// The case's `updated_at` (server clock): with `status`, what makes a
    /// transition distinct, so the same one is never reported twice.
    pub updated_at: DateTime<Utc>,
    /// When the tracker saw it (unix ms, bridge clock).
    pub seen_at_ms: u64,
    /// Whether it produced a report.
    #[serde(default)]
    pub reported: bool,
}

/// Tracking state of a delivered event, kept in its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracking {
    pub phase: TrackPhase,
    /// Unix ms after which an open case is reported `expired` and a watched
    /// one is forgotten.
    pub deadline_ms: u64,
    /// Transitions seen, oldest first (the most recent
    /// [`Tracking::HISTORY_MAX`] are kept).
    #[serde(default)]
    pub history: Vec<Transition>,
}

impl Tracking {
    pub const HISTORY_MAX: usize = 32;

    /// The last transition handled, if any.
    pub fn last(&self) -> Option<&Transition> {
        self.history.last()
    }
}

/// Case tracking and report policy of the outbox (`None` in
/// [`OutboxConfig::tracking`] turns tracking off: delivered events are
/// settled to tombstones at once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackingPolicy {
    /// Follow delivered cases. Off: only rejections produce reports.
    pub track_cases: bool,
    /// How long a delivered case is followed.
    pub ttl: Duration,
    /// Sources that have a reporter: only their events produce reports.
    pub report_sources: BTreeSet<String>,
    /// Case statuses that produce a report (`failed`, `canceled`, ...).
    /// `expired` and `rejected` are always reported.
    pub report_statuses: BTreeSet<ReportStatus>,
}

impl TrackingPolicy {
    pub fn reports(&self, source: &str, status: ReportStatus) -> bool {
        self.report_sources.contains(source)
            && (matches!(status, ReportStatus::Expired | ReportStatus::Rejected)
                || self.report_statuses.contains(&status))
    }
}

/// The two listings the tracker keeps per queue, each with its own
/// watermark: reported statuses first (small and urgent: failures), and
/// completions (large, only bookkeeping: forgetting finished cases), so a
/// burst of completions never delays a failure report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListingStream {
    Reports,
    Cleanup,
}

impl ListingStream {
    pub const ALL: [ListingStream; 2] = [ListingStream::Reports, ListingStream::Cleanup];

    pub fn as_str(self) -> &'static str {
        match self {
            ListingStream::Reports => "reports",
            ListingStream::Cleanup => "cleanup",
        }
    }

    pub(crate) fn byte(self) -> u8 {
        match self {
            ListingStream::Reports => b'r',
            ListingStream::Cleanup => b'c',
        }
    }
}

/// Cases tracked in one Duvo queue (in-memory counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueTracking {
    pub queue_id: Uuid,
    /// Cases not finished yet.
    pub open: u64,
    /// Failed/canceled cases watched for a retry.
    pub watching: u64,
}

/// What one page of a listing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ListingOutcome {
    /// Cases on the page created by this bridge and still tracked.
    pub ours: u64,
    /// New transitions recorded (a re-read of a known one is not counted).
    pub transitions: u64,
    /// Reports created.
    pub reports: u64,
    /// Cases no longer tracked (completed).
    pub finished: u64,
}

/// A persisted batch: up to `max_cases` events of one queue sent in one
/// request under one idempotency key.
///
/// The key is fixed when the batch is persisted and never changes, so a
/// re-send after a timeout or a restart cannot create the cases twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub id: u64,
    pub idempotency_key: String,
    pub queue_id: Uuid,
    pub events: Vec<(EventId, NewCase)>,
    pub created_at_ms: u64,
    pub attempts: u32,
}

impl Batch {
    /// The cases in batch order, ready for `CreateCasesRequest::batch`.
    pub fn cases(&self) -> Vec<NewCase> {
        self.events.iter().map(|(_, c)| c.clone()).collect()
    }

    /// The event ids in batch order.
    pub fn event_ids(&self) -> Vec<EventId> {
        self.events.iter().map(|(id, _)| *id).collect()
    }
}

/// Result of appending one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Newly stored under this id.
    Stored(EventId),
    /// The identity was already known (within retention): nothing stored,
    /// this is the id of the first event with that identity.
    Duplicate(EventId),
}

impl AppendOutcome {
    pub fn id(&self) -> EventId {
        match self {
            AppendOutcome::Stored(id) | AppendOutcome::Duplicate(id) => *id,
        }
    }

    pub fn is_duplicate(&self) -> bool {
        matches!(self, AppendOutcome::Duplicate(_))
    }
}

/// One queue's ready (stored, not yet batched) events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadySummary {
    pub queue_id: Uuid,
    pub count: u64,
    /// `received_at_ms` of the oldest ready event (lowest id).
    pub oldest_received_at_ms: u64,
}

/// An event the API refused for good, with everything needed to inspect or
/// replay it by hand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: EventId,
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    pub queue_id: Uuid,
    pub case: NewCase,
    pub status: u16,
    pub error: String,
    pub message: String,
    pub received_at_ms: u64,
    pub rejected_at_ms: u64,
}

/// Point-in-time counters, cheap to read (no disk access).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxStats {
    /// Stored + batched events (the backlog).
    pub depth: u64,
    /// Stored events waiting for a batch.
    pub ready: u64,
    /// Events in persisted, unsettled batches.
    pub batched: u64,
    /// `size_on_disk`, refreshed by the flusher (at most every 200 ms).
    pub bytes_on_disk: u64,
    /// fsyncs performed by the flusher since open.
    pub flushes: u64,
    /// Events stored since open.
    pub appended: u64,
    /// Appends answered with `Duplicate` since open.
    pub duplicates: u64,
    /// Corrupt records detected since open (each detection counts).
    pub corrupt: u64,
}

/// Outbox configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxConfig {
    /// Directory of the sled database.
    pub path: PathBuf,
    /// Backlog (events) above which `over_high_water` turns true.
    pub high_water_events: u64,
    /// Backlog (events) below which `over_high_water` turns false again.
    pub low_water_events: u64,
    /// Size on disk above which `over_high_water` turns true.
    pub high_water_bytes: u64,
    /// Free bytes to keep on the outbox's filesystem: below them the outbox
    /// counts as over high water.
    pub min_free_disk_bytes: u64,
    /// How long delivered/rejected tombstones and their identities are kept,
    /// i.e. the dedupe window for sources that redeliver.
    pub retention: Duration,
    /// sled page cache size (`[outbox] cache_mb`; 8 MiB by default).
    pub cache_capacity_bytes: u64,
    /// Compact (copy into a fresh file) once the file is this big and four
    /// times its records (`[outbox] compact_min_mb`); 0: never by itself.
    pub compact_min_bytes: u64,
    /// Case tracking and reports; `None`: off.
    pub tracking: Option<TrackingPolicy>,
    /// Open even if the database holds less than its marker says was
    /// durable (logged and counted); otherwise that is
    /// [`OutboxError::DataLost`].
    pub accept_data_loss: bool,
    /// Return from `open` before the stored events are loaded into the
    /// ready index; they are loaded oldest first in the background, offered
    /// to the batcher as they come, and this run's appends wait behind them
    /// ([`Outbox::loaded`](super::Outbox::loaded)). The daemon sets it, so a
    /// large backlog does not delay readiness; off by default (tests and
    /// tools see every event as soon as `open` returns).
    pub background_load: bool,
}

impl OutboxConfig {
    /// Defaults for everything but the path.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        OutboxConfig {
            path: path.into(),
            high_water_events: 1_000_000,
            low_water_events: 800_000,
            high_water_bytes: 8 * 1024 * 1024 * 1024,
            min_free_disk_bytes: 256 * 1024 * 1024,
            retention: Duration::from_secs(24 * 3600),
            cache_capacity_bytes: 8 * 1024 * 1024,
            compact_min_bytes: 256 * 1024 * 1024,
            tracking: None,
            accept_data_loss: false,
            background_load: false,
        }
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig::new("outbox")
    }
}

/// Why an outbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// sled reported an I/O or internal error.
    #[error("outbox storage error: {0}")]
    Storage(#[from] sled::Error),
    /// A record failed its checksum or did not decode. The record is left in
    /// place for inspection; it is never silently dropped.
    #[error("corrupt outbox record {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// The flusher's fsync failed: the writes it should have covered are not
    /// known to be durable.
    #[error("outbox flush failed: {0}")]
    Flush(String),
    /// The flusher task is gone (runtime shutting down).
    #[error("outbox flusher stopped")]
    FlusherStopped,
    /// No such batch on disk (already settled or split, or never persisted).
    #[error("unknown batch {0}")]
    UnknownBatch(u64),
    /// No such report on disk (already settled).
    #[error("unknown report {0}")]
    UnknownReport(u64),
    /// A record the indexes point at is missing from disk.
    #[error("outbox record {0} is missing")]
    Missing(String),
    /// The caller passed something the operation cannot do.
    #[error("invalid outbox request: {0}")]
    Invalid(String),
    /// A blocking task (open, recovery) panicked or was cancelled.
    #[error("outbox background task failed: {0}")]
    Task(String),
    /// The database holds less than its marker says was durable (opened
    /// empty after a power cut, a wiped or swapped volume): refused, so the
    /// bridge never starts empty by accident.
    #[error(
        "outbox at {} lost data: {detail}. Refusing to start on it: events acknowledged from it may be gone. \
         Restore the outbox volume, or start once with --accept-outbox-loss to accept the loss",
        path.display()
    )]
    DataLost { path: PathBuf, detail: String },
    /// sled cannot open the database (its files are damaged): refused, so
    /// the bridge never starts on an empty outbox in its place.
    #[error(
        "outbox at {} cannot be opened: {detail}. Nothing was started. \
         `duvo-bridge outbox verify --path {}` names what is damaged; restore the volume from a backup \
         (or move the directory aside to start empty, accepting the loss of what it held)",
        path.display(), path.display()
    )]
    Unopenable { path: PathBuf, detail: String },
    /// Another process (a second bridge, a tool) holds the database's lock.
    #[error(
        "the outbox at {} is in use by another process (its lock is held); one bridge per outbox directory",
        path.display()
    )]
    InUse { path: PathBuf },
    /// Encoding a record failed (should not happen for our types).
    #[error("cannot encode outbox record: {0}")]
    Encode(#[from] serde_json::Error),
}

impl From<sled::transaction::TransactionError<OutboxError>> for OutboxError {
    fn from(e: sled::transaction::TransactionError<OutboxError>) -> Self {
        match e {
            sled::transaction::TransactionError::Abort(e) => e,
            sled::transaction::TransactionError::Storage(e) => OutboxError::Storage(e),
        }
    }
}
