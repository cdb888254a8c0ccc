//! What an operator asks of an outbox: a census of everything it holds,
//! records as JSON, and the dead letters: listed, replayed once their cause
//! is fixed, purged.
//!
//! The same methods serve a stopped bridge's directory (the CLI opens the
//! outbox itself) and a running bridge (its admin listener calls them on the
//! live handle), so both see one implementation.
//!
//! A replay appends the dead letter's case as a new event whose identity is
//! `replay:<dead letter id>` and then removes the dead letter: replaying the
//! same letter twice (a retried command, a crash between the two steps) is
//! answered `Duplicate` and creates nothing twice.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::callbacks;
use super::record::{
    BATCH_PREFIX, BatchRecord, DEAD_REPORT_PREFIX, EVENT_PREFIX, EventRecord, REPORT_PREFIX,
    decode, decode_borrowed, event_key, key_u64,
};
use super::reports::{DeadReport, Report};
use super::types::{AppendOutcome, DeadLetter, EventId, EventState, NewEvent, OutboxError};
use super::{Outbox, TrackPhase};
use crate::clock::now_ms;

/// Identity prefix of replayed dead letters.
pub const REPLAY_IDENTITY_PREFIX: &str = "replay:";

/// Everything the outbox holds, counted by one scan.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Census {
    /// Events by state (`stored`, `batched`, `delivered`, `rejected`).
    pub events: BTreeMap<String, u64>,
    /// Per queue id, events by state.
    pub queues: BTreeMap<Uuid, BTreeMap<String, u64>>,
    /// Per source name, events by state.
    pub sources: BTreeMap<String, BTreeMap<String, u64>>,
    /// `received_at_ms` of the oldest event not yet delivered or rejected.
    pub oldest_waiting_received_at_ms: Option<u64>,
    /// Seconds since then (at the time of the census).
    pub oldest_waiting_age_secs: Option<f64>,
    /// Persisted batches not settled yet (each maybe in flight).
    pub batches: u64,
    /// Events in those batches.
    pub batched_events: u64,
    /// Most attempts any of those batches has had.
    pub max_batch_attempts: u32,
    /// Delivered cases by tracking phase (`open`, `watching`, `done`).
    pub tracked: BTreeMap<String, u64>,
    /// Reports waiting to be sent, per source.
    pub pending_reports: BTreeMap<String, u64>,
    /// Reports given up on (kept for inspection).
    pub dead_reports: u64,
    /// Dead letters, per queue id.
    pub dead_letters: BTreeMap<Uuid, u64>,
    pub dead_letters_total: u64,
    /// Records that failed their checksum during the census.
    pub corrupt: u64,
    /// Size of the database on disk.
    pub bytes_on_disk: u64,
    pub taken_at_ms: u64,
}

/// The fields of an event record a census reads (no payload copy).
#[derive(Deserialize)]
struct EventCensus<'a> {
    #[serde(borrow)]
    source: Cow<'a, str>,
    queue_id: Uuid,
    received_at_ms: u64,
    state: EventState,
    #[serde(default)]
    tracking: Option<super::record::TrackingPhase>,
}

/// Which events `list_events` returns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventFilter {
    /// `stored`, `batched`, `delivered` or `rejected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Only events with an id above this one (paging).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<EventId>,
}

/// The states an event can be in, as `list --state` spells them.
pub const EVENT_STATES: [&str; 4] = ["stored", "batched", "delivered", "rejected"];

/// Which dead letters a list, replay or purge acts on: the named ids, or
/// (with `all`) every letter matching the other fields. An empty selector
/// selects nothing, so a mutating call never acts on everything by
/// accident.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterSelector {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<EventId>,
    #[serde(default)]
    pub all: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The API's error type (`invalid_request`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The HTTP status the API answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

impl DeadLetterSelector {
    /// Every dead letter (for listing and export).
    pub fn everything() -> Self {
        DeadLetterSelector {
            all: true,
            ..Default::default()
        }
    }

    fn selects(&self, d: &DeadLetter) -> bool {
        (self.all || self.ids.contains(&d.id))
            && self.queue.is_none_or(|q| q == d.queue_id)
            && self.source.as_deref().is_none_or(|s| s == d.source)
            && self.error.as_deref().is_none_or(|e| e == d.error)
            && self.status.is_none_or(|s| s == d.status)
    }
}

/// What became of one replayed dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replayed {
    /// The dead letter (and the rejected event's) id.
    pub dead_letter: EventId,
    /// The new event carrying its case.
    pub event: EventId,
    /// True when this letter had been replayed before (the earlier event
    /// is named; nothing new was stored).
    pub already: bool,
}

impl Outbox {
    /// Count everything the outbox holds: one scan of every record (a
    /// second or so per million events; the live counters in
    /// [`Outbox::stats`] cost nothing).
    pub fn census(&self) -> Result<Census, OutboxError> {
        let inner = &self.inner;
        let now = now_ms();
        let mut c = Census {
            taken_at_ms: now,
            ..Census::default()
        };
        for item in inner.st().events.scan_prefix([EVENT_PREFIX]) {
            let (key, value) = item?;
            let ev: EventCensus<'_> = match decode_borrowed(&key, &value) {
                Ok(ev) => ev,
                Err(OutboxError::Corrupt { .. }) => {
                    c.corrupt += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let state = state_name(&ev.state);
            *c.events.entry(state.into()).or_default() += 1;
            *c.queues
                .entry(ev.queue_id)
                .or_default()
                .entry(state.into())
                .or_default() += 1;
            *c.sources
                .entry(ev.source.into_owned())
                .or_default()
                .entry(state.into())
                .or_default() += 1;
            if !ev.state.is_settled() {
                c.oldest_waiting_received_at_ms = Some(
                    c.oldest_waiting_received_at_ms
                        .map_or(ev.received_at_ms, |o| o.min(ev.received_at_ms)),
                );
            }
            if let Some(t) = ev.tracking {
                *c.tracked.entry(phase_name(t.phase).into()).or_default() += 1;
            }
        }
        c.oldest_waiting_age_secs = c
            .oldest_waiting_received_at_ms
            .map(|t| now.saturating_sub(t) as f64 / 1000.0);
        for item in inner.st().events.scan_prefix([BATCH_PREFIX]) {
            let (key, value) = item?;
            match decode::<BatchRecord>(&key, &value) {
                Ok(b) => {
                    c.batches += 1;
                    c.batched_events += b.event_ids.len() as u64;
                    c.max_batch_attempts = c.max_batch_attempts.max(b.attempts);
                }
                Err(OutboxError::Corrupt { .. }) => c.corrupt += 1,
                Err(e) => return Err(e),
            }
        }
        for item in inner.st().events.scan_prefix([REPORT_PREFIX]) {
            let (key, value) = item?;
            match decode::<Report>(&key, &value) {
                Ok(r) => *c.pending_reports.entry(r.source).or_default() += 1,
                Err(OutboxError::Corrupt { .. }) => c.corrupt += 1,
                Err(e) => return Err(e),
            }
        }
        for item in inner.st().events.scan_prefix([DEAD_REPORT_PREFIX]) {
            let (key, value) = item?;
            match decode::<DeadReport>(&key, &value) {
                Ok(_) => c.dead_reports += 1,
                Err(OutboxError::Corrupt { .. }) => c.corrupt += 1,
                Err(e) => return Err(e),
            }
        }
        for item in inner.st().dead.iter() {
            let (key, value) = item?;
            match decode::<DeadLetter>(&key, &value) {
                Ok(d) => {
                    *c.dead_letters.entry(d.queue_id).or_default() += 1;
                    c.dead_letters_total += 1;
                }
                Err(OutboxError::Corrupt { .. }) => c.corrupt += 1,
                Err(e) => return Err(e),
            }
        }
        c.bytes_on_disk = inner.st().db.size_on_disk().unwrap_or(0);
        Ok(c)
    }

    /// One event's whole record as JSON (its payload while it has one, its
    /// state, tracking history and origin), `None` if unknown or purged.
    /// A callback URL is shown by its stored reference only: it may carry a
    /// token.
    pub fn inspect_event(&self, id: EventId) -> Result<Option<serde_json::Value>, OutboxError> {
        let key = event_key(id.0);
        let Some(raw) = self.inner.st().events.get(key)? else {
            return Ok(None);
        };
        let rec: EventRecord = decode(&key, &raw)?;
        Ok(Some(event_json(id, &rec)?))
    }

    /// Up to `limit` event records matching `filter`, in id order, each as
    /// [`Outbox::inspect_event`] shows it. Corrupt records are skipped (and
    /// counted by `census`).
    pub fn list_events(
        &self,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<serde_json::Value>, OutboxError> {
        if let Some(s) = &filter.state
            && !EVENT_STATES.contains(&s.as_str())
        {
            return Err(OutboxError::Invalid(format!(
                "unknown event state {s:?}; one of {}",
                EVENT_STATES.join(", ")
            )));
        }
        let start = event_key(filter.after.map_or(0, |a| a.0.saturating_add(1)));
        let end = event_key(u64::MAX);
        let mut out = Vec::new();
        for item in self.inner.st().events.range(start..=end) {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item?;
            let Some(id) = key_u64(&key) else { continue };
            let rec: EventRecord = match decode(&key, &value) {
                Ok(r) => r,
                Err(OutboxError::Corrupt { .. }) => continue,
                Err(e) => return Err(e),
            };
            if filter
                .state
                .as_deref()
                .is_some_and(|s| s != state_name(&rec.state))
                || filter.queue.is_some_and(|q| q != rec.queue_id)
                || filter.source.as_deref().is_some_and(|s| s != rec.source)
            {
                continue;
            }
            out.push(event_json(EventId(id), &rec)?);
        }
        Ok(out)
    }

    /// The dead letters `sel` selects, in id order.
    pub fn dead_letters_selected(
        &self,
        sel: &DeadLetterSelector,
    ) -> Result<Vec<DeadLetter>, OutboxError> {
        Ok(self
            .dead_letters()?
            .into_iter()
            .filter(|d| sel.selects(d))
            .collect())
    }

    /// Put the selected dead letters back into the ready set as new events
    /// (oldest first, delivered like any other) and remove them from the
    /// dead letters. Returns when both are durable.
    ///
    /// The new event keeps the original's source and, when the rejected
    /// event's record still has it, its origin, so a failure of the replay
    /// is reported to the source like the first one was.
    pub async fn replay_dead_letters(
        &self,
        sel: &DeadLetterSelector,
    ) -> Result<Vec<Replayed>, OutboxError> {
        let letters = self.dead_letters_selected(sel)?;
        if letters.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut events = Vec::with_capacity(letters.len());
        for d in &letters {
            let origin = self
                .read_event(d.id.0)?
                .and_then(|rec| callbacks::resolve(&self.inner.st().events, rec.origin.as_ref()));
            events.push(NewEvent {
                source: d.source.clone(),
                identity: Some(format!("{REPLAY_IDENTITY_PREFIX}{}", d.id)),
                queue_id: d.queue_id,
                case: d.case.clone(),
                received_at_ms: now,
                origin,
            });
        }
        let outcomes = self.append(events).await?;
        let mut batch = sled::Batch::default();
        for d in &letters {
            batch.remove(&d.id.0.to_be_bytes()[..]);
        }
        self.inner.st().dead.apply_batch(batch)?;
        self.inner.flush.wait_durable().await?;
        let replayed: Vec<Replayed> = letters
            .iter()
            .zip(outcomes)
            .map(|(d, o)| Replayed {
                dead_letter: d.id,
                event: o.id(),
                already: matches!(o, AppendOutcome::Duplicate(_)),
            })
            .collect();
        for r in &replayed {
            tracing::info!(dead_letter = %r.dead_letter, event = %r.event, already = r.already,
                "dead letter replayed");
        }
        metrics::counter!("duvo_bridge_dead_letters_replayed_total")
            .increment(replayed.iter().filter(|r| !r.already).count() as u64);
        Ok(replayed)
    }

    /// Remove the selected dead letters for good; returns their ids once
    /// the removal is durable.
    pub async fn purge_dead_letters(
        &self,
        sel: &DeadLetterSelector,
    ) -> Result<Vec<EventId>, OutboxError> {
        let letters = self.dead_letters_selected(sel)?;
        let mut batch = sled::Batch::default();
        for d in &letters {
            batch.remove(&d.id.0.to_be_bytes()[..]);
        }
        self.inner.st().dead.apply_batch(batch)?;
        self.inner.flush.wait_durable().await?;
        let ids: Vec<EventId> = letters.iter().map(|d| d.id).collect();
        tracing::info!(count = ids.len(), ids = %ids.iter().map(ToString::to_string).collect::<Vec<_>>().join(","), "dead letters purged");
        metrics::counter!("duvo_bridge_dead_letters_purged_total").increment(ids.len() as u64);
        Ok(ids)
    }
}

fn event_json(id: EventId, rec: &EventRecord) -> Result<serde_json::Value, OutboxError> {
    let mut v = serde_json::to_value(rec)?;
    if let serde_json::Value::Object(o) = &mut v {
        o.insert("id".into(), serde_json::Value::String(id.to_string()));
    }
    Ok(v)
}

/// The name `list --state` and the census use for a state.
pub fn state_name(s: &EventState) -> &'static str {
    match s {
        EventState::Stored => "stored",
        EventState::Batched { .. } => "batched",
        EventState::Delivered { .. } => "delivered",
        EventState::Rejected { .. } => "rejected",
    }
}

fn phase_name(p: TrackPhase) -> &'static str {
    match p {
        TrackPhase::Open => "open",
        TrackPhase::Watching => "watching",
        TrackPhase::Done => "done",
    }
}
