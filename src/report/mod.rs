//! Reports back to a source: when an event's case ends failed (or another
//! reported status), or the API refused the event for good, the source that
//! produced it is told: a signed HTTP callback, an AMQP publish with
//! publisher confirms, a Kafka record on a failure topic.
//!
//! Reports are outbox records: the [`Report`] is written in the same sled
//! batch as the tracking change that caused it, and removed only after the
//! [`Reporter`] returned `Ok`, i.e. after the target acknowledged it (HTTP
//! 2xx, broker confirm, Kafka ack). A crash between the acknowledgement and
//! the removal sends the report again, with the same [`Report::id`], which
//! receivers can use to discard the copy.

pub mod kafka;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::outbox::{EventId, Origin};

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

/// One report, as persisted in the outbox and handed to a [`Reporter`].
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
    /// The original event as the case's `data` carried it (the event's
    /// compact JSON, or its text for non-JSON payloads).
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
    /// `status`, `reason`, `updated_at`, `title` and the original `event`
    /// (parsed back to JSON when it is JSON, else a string).
    pub fn body(&self) -> serde_json::Value {
        let event = self.event.as_deref().map(|e| {
            serde_json::from_str::<serde_json::Value>(e)
                .unwrap_or_else(|_| serde_json::Value::String(e.to_string()))
        });
        serde_json::json!({
            "report_id": self.id.to_string(),
            "source": self.source,
            "event_id": self.event_id,
            "case_id": self.case_id,
            "queue_id": self.queue_id,
            "status": self.status,
            "reason": self.reason,
            "updated_at": self.case_updated_at,
            "title": self.title,
            "event": event,
        })
    }
}

/// Why a report could not be delivered this time. Every error is retried
/// (with backoff) until the target acknowledges: a report is never dropped.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The target could not be reached (connection refused, timeout, broker
    /// down).
    #[error("report target unreachable: {0}")]
    Unreachable(String),
    /// The target answered but did not accept the report (HTTP non-2xx,
    /// broker nack, unroutable with `mandatory`, Kafka delivery error).
    #[error("report refused: {0}")]
    Refused(String),
    /// The report cannot be addressed with what is configured (no callback
    /// URL, no exchange and no `reply_to`). Retried too: the configuration
    /// may be fixed and the bridge restarted.
    #[error("report has no destination: {0}")]
    NoDestination(String),
}

/// Sends reports to one source's target. One reporter per source; the
/// dispatcher calls `send` for one report at a time per reporter (or a few
/// concurrently) and removes the report from the outbox only after `Ok`.
pub trait Reporter: Send + Sync + 'static {
    /// Short kind for logs and metric labels: `http`, `amqp`, `kafka`.
    fn kind(&self) -> &'static str;
    /// Deliver one report and return once the target acknowledged it.
    fn send<'a>(&'a self, report: &'a Report) -> BoxFuture<'a, Result<(), ReportError>>;
    /// Where `report` goes, as a key: reports with the same key share one
    /// target, so when a send to it fails the dispatcher backs off that
    /// destination as a whole (one probe per backoff period) instead of
    /// letting its reports hold the send slots of every other destination.
    /// Shown in logs: it must never carry a secret. The default puts all of
    /// a reporter's reports behind one destination.
    fn destination(&self, report: &Report) -> String {
        let _ = report;
        self.kind().to_string()
    }
}

pub mod amqp;
pub mod dispatch;
pub mod http;
