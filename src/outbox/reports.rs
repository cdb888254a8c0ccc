//! Pending reports in the outbox: written by the tracker (and by `reject`)
//! in the same sled batch as the change that caused them, removed by the
//! report dispatcher only after the source's target acknowledged them, or
//! set aside as dead reports when the dispatcher gives up on one (a
//! per-request callback URL unreachable for longer than its source allows).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::record::{DEAD_REPORT_PREFIX, dead_report_key, encode, report_key};
use super::types::{EventId, Origin, OutboxError};
use super::{Outbox, lock};

/// Why a report is sent: the case status the tracker saw, or what happened
/// to the event before a case existed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportStatus {
    Failed,
    Canceled,
    NeedsInput,
    Postponed,
    Completed,
    /// The case was still unfinished when the tracking TTL ran out.
    Expired,
    /// The API refused the event for good (400/413/422): no case exists.
    Rejected,
}

impl ReportStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReportStatus::Failed => "failed",
            ReportStatus::Canceled => "canceled",
            ReportStatus::NeedsInput => "needs_input",
            ReportStatus::Postponed => "postponed",
            ReportStatus::Completed => "completed",
            ReportStatus::Expired => "expired",
            ReportStatus::Rejected => "rejected",
        }
    }
}

impl std::fmt::Display for ReportStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One report, as persisted in the outbox and handed to a reporter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Stable id (outbox-generated). A report re-sent after a crash carries
    /// the same id, so receivers can deduplicate.
    pub id: u64,
    /// Name of the source the event came from (selects the reporter).
    pub source: String,
    pub event_id: EventId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    pub queue_id: Uuid,
    /// `None` when the API refused the event (no case was created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case_id: Option<Uuid>,
    pub status: ReportStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The case's `updated_at` at the reported transition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case_updated_at: Option<String>,
    pub title: String,
    /// The original event as the case's `data` carried it (the producer's
    /// JSON text, or the text of a non-JSON payload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    pub created_at_ms: u64,
    /// Send attempts so far (persisted, survives restarts).
    #[serde(default)]
    pub attempts: u32,
}

impl Report {
    /// The JSON document every reporter sends (HTTP body, AMQP and Kafka
    /// payload): `report_id`, `source`, `event_id`, `case_id`, `queue_id`,
    /// `status`, `reason`, `updated_at`, `title` and the original `event`:
    /// embedded as the producer's JSON text, byte for byte, when it is a
    /// JSON document, else as a string.
    pub fn body(&self) -> Vec<u8> {
        #[derive(Serialize)]
        #[serde(untagged)]
        enum Event<'a> {
            Json(&'a serde_json::value::RawValue),
            Text(&'a str),
        }
        #[derive(Serialize)]
        struct Body<'a> {
            report_id: String,
            source: &'a str,
            event_id: EventId,
            case_id: Option<Uuid>,
            queue_id: Uuid,
            status: ReportStatus,
            reason: Option<&'a str>,
            updated_at: Option<&'a str>,
            title: &'a str,
            event: Option<Event<'a>>,
        }
        let event = self.event.as_deref().map(|e| {
            serde_json::from_str::<&serde_json::value::RawValue>(e)
                .map(Event::Json)
                .unwrap_or(Event::Text(e))
        });
        serde_json::to_vec(&Body {
            report_id: self.id.to_string(),
            source: &self.source,
            event_id: self.event_id,
            case_id: self.case_id,
            queue_id: self.queue_id,
            status: self.status,
            reason: self.reason.as_deref(),
            updated_at: self.case_updated_at.as_deref(),
            title: &self.title,
            event,
        })
        .expect("a report always serialises")
    }
}

/// A report the dispatcher gave up on, kept for operators (never sent
/// again by the bridge itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadReport {
    pub report: Report,
    /// The last send error.
    pub error: String,
    pub died_at_ms: u64,
}

/// Pending report ids per source, rebuilt from disk at open.
#[derive(Debug, Default)]
pub(crate) struct ReportIndex {
    by_source: BTreeMap<String, BTreeSet<u64>>,
}

impl ReportIndex {
    pub fn insert(&mut self, source: &str, id: u64) {
        self.by_source
            .entry(source.to_string())
            .or_default()
            .insert(id);
    }

    fn remove(&mut self, source: &str, id: u64) -> bool {
        let Some(set) = self.by_source.get_mut(source) else {
            return false;
        };
        let removed = set.remove(&id);
        if set.is_empty() {
            self.by_source.remove(source);
        }
        removed
    }

    pub fn len(&self) -> usize {
        self.by_source.values().map(BTreeSet::len).sum()
    }
}

impl Outbox {
    /// Ids of pending reports of `source`, oldest first, at most `max`,
    /// skipping those in `skip` (the caller's in-flight set).
    pub fn pending_report_ids(&self, source: &str, max: usize, skip: &BTreeSet<u64>) -> Vec<u64> {
        let ix = lock(&self.inner.reports);
        ix.by_source
            .get(source)
            .map(|set| {
                set.iter()
                    .filter(|id| !skip.contains(id))
                    .take(max)
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Like [`Outbox::pending_report_ids`], for a caller that walks the
    /// pending ids with a cursor: starts at id `from`, leaves out the ids
    /// for which `skip(id)` is true, and looks at `scan` ids at most, so a
    /// long run of skipped ids (the report dispatcher skips reports whose
    /// destination is backing off) is walked in bounded steps, never with
    /// the index lock held for the whole outbox. Also returns the last id
    /// looked at (continue after it), `None` when there was none.
    pub fn pending_report_ids_where(
        &self,
        source: &str,
        from: u64,
        max: usize,
        scan: usize,
        mut skip: impl FnMut(u64) -> bool,
    ) -> (Vec<u64>, Option<u64>) {
        let ix = lock(&self.inner.reports);
        let mut out = Vec::new();
        let mut last = None;
        if let Some(set) = ix.by_source.get(source) {
            for &id in set.range(from..).take(scan) {
                if out.len() >= max {
                    break;
                }
                last = Some(id);
                if !skip(id) {
                    out.push(id);
                }
            }
        }
        (out, last)
    }

    /// Pending reports per source (in-memory count).
    pub fn pending_reports(&self) -> BTreeMap<String, u64> {
        lock(&self.inner.reports)
            .by_source
            .iter()
            .map(|(s, set)| (s.clone(), set.len() as u64))
            .collect()
    }

    /// A pending report, `None` once settled.
    pub fn report(&self, id: u64) -> Result<Option<Report>, OutboxError> {
        let key = report_key(id);
        match self.inner.st().events.get(key)? {
            Some(raw) => self.decode_logged(&key, &raw).map(Some),
            None => Ok(None),
        }
    }

    /// Bump and persist a report's attempt counter; returns the new count.
    /// Not flushed: losing an increment in a crash is harmless.
    pub fn record_report_attempt(&self, id: u64) -> Result<u32, OutboxError> {
        let _t = lock(&self.inner.track_lock);
        let mut r = self.report(id)?.ok_or(OutboxError::UnknownReport(id))?;
        r.attempts = r.attempts.saturating_add(1);
        self.inner.st().events.insert(report_key(id), encode(&r)?)?;
        Ok(r.attempts)
    }

    /// The target acknowledged the report: remove it and wait for the flush
    /// (a crash before the flush sends it again, with the same id).
    pub async fn settle_report(&self, id: u64) -> Result<(), OutboxError> {
        {
            let _t = lock(&self.inner.track_lock);
            let Some(r) = self.report(id)? else {
                return Err(OutboxError::UnknownReport(id));
            };
            self.inner.st().events.remove(report_key(id))?;
            lock(&self.inner.reports).remove(&r.source, id);
        }
        self.publish_reports();
        self.inner.flush.wait_durable().await
    }

    /// Give up on a report: move it to the dead reports (one atomic batch)
    /// and wait for the flush.
    pub async fn bury_report(&self, id: u64, error: &str) -> Result<(), OutboxError> {
        {
            let _t = lock(&self.inner.track_lock);
            let Some(report) = self.report(id)? else {
                return Err(OutboxError::UnknownReport(id));
            };
            let source = report.source.clone();
            let dead = DeadReport {
                report,
                error: error.to_string(),
                died_at_ms: crate::clock::now_ms(),
            };
            let mut sb = sled::Batch::default();
            sb.remove(&report_key(id)[..]);
            sb.insert(&dead_report_key(id)[..], encode(&dead)?);
            self.inner.st().events.apply_batch(sb)?;
            lock(&self.inner.reports).remove(&source, id);
        }
        self.publish_reports();
        self.inner.flush.wait_durable().await
    }

    /// Reports given up on, oldest first. Corrupt records are logged and
    /// skipped (they stay on disk).
    pub fn dead_reports(&self) -> Result<Vec<DeadReport>, OutboxError> {
        let mut out = Vec::new();
        for item in self.inner.st().events.scan_prefix([DEAD_REPORT_PREFIX]) {
            let (key, value) = item?;
            match self.decode_logged(&key, &value) {
                Ok(d) => out.push(d),
                Err(OutboxError::Corrupt { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Wait until a report may have been created. Cancel-safe; may wake
    /// spuriously; a wake-up while nobody waits is kept for the next call.
    pub async fn reports_notified(&self) {
        self.inner.report_notify.notified().await;
    }

    /// Write `report` as pending (unit tests of the dispatcher).
    #[cfg(test)]
    pub(crate) fn insert_report_for_test(&self, report: &Report) {
        self.inner
            .st()
            .events
            .insert(report_key(report.id), encode(report).unwrap())
            .unwrap();
        self.note_reports_created(std::slice::from_ref(report));
    }

    pub(crate) fn note_reports_created(&self, reports: &[Report]) {
        if reports.is_empty() {
            return;
        }
        {
            let mut ix = lock(&self.inner.reports);
            for r in reports {
                ix.insert(&r.source, r.id);
                metrics::counter!("duvo_bridge_reports_created_total",
                    "source" => r.source.clone(), "status" => r.status.as_str())
                .increment(1);
            }
        }
        self.publish_reports();
        self.inner.report_notify.notify_waiters();
        self.inner.report_notify.notify_one();
    }

    fn publish_reports(&self) {
        let n = lock(&self.inner.reports).len();
        metrics::gauge!("duvo_bridge_reports_pending").set(n as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(event: Option<&str>) -> Report {
        Report {
            id: 9,
            source: "oms".into(),
            event_id: EventId(3),
            origin: None,
            queue_id: Uuid::nil(),
            case_id: None,
            status: ReportStatus::Failed,
            reason: Some("gave up".into()),
            case_updated_at: None,
            title: "Order 1".into(),
            event: event.map(str::to_owned),
            created_at_ms: 0,
            attempts: 0,
        }
    }

    #[test]
    fn the_body_embeds_the_producers_json_byte_for_byte() {
        let text = r#"{"order_id": 123456789012345678901234567890, "x":1e-999,"x":2}"#;
        let body = String::from_utf8(report(Some(text)).body()).unwrap();
        assert!(body.contains(&format!(r#""event":{text}"#)), "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["report_id"], "9");
        assert_eq!(v["status"], "failed");
        // A payload that is not JSON is a string; no event is null.
        let v: serde_json::Value = serde_json::from_slice(&report(Some("plain")).body()).unwrap();
        assert_eq!(v["event"], "plain");
        let v: serde_json::Value = serde_json::from_slice(&report(None).body()).unwrap();
        assert!(v["event"].is_null());
    }
}
