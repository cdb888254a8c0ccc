//! Reports back to a source: when an event's case ends failed (or another
//! reported status), or the API refused the event for good, the source that
//! produced it is told: a signed HTTP callback, an AMQP publish with
//! publisher confirms, a Kafka record on a failure topic.
//!
//! Reports are outbox records ([`crate::outbox::Report`]): one is written in the same sled
//! batch as the tracking change that caused it, and removed only after the
//! [`Reporter`] returned `Ok`, i.e. after the target acknowledged it (HTTP
//! 2xx, broker confirm, Kafka ack). A crash between the acknowledgement and
//! the removal sends the report again, with the same [`Report::id`], which
//! receivers can use to discard the copy.

pub mod kafka;

use futures::future::BoxFuture;

/// The report record is the outbox's own type: reporters read it from
/// the outbox, the outbox never depends on them.
pub use crate::outbox::{Report, ReportStatus};

/// Why a report could not be delivered this time. Every error is retried
/// (with backoff) until the target acknowledges, except where the reporter
/// bounds a report's life ([`Reporter::give_up_after`]): then it is kept as
/// a dead report, never silently dropped.
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
    /// How long after its creation a report that still fails is given up
    /// on (moved to the outbox's dead reports and counted). `None`, the
    /// default: retried until acknowledged. Meant for destinations a
    /// client chose (a per-request callback URL): an operator's own target
    /// is worth waiting for, a stranger's dead endpoint is not.
    fn give_up_after(&self, report: &Report) -> Option<std::time::Duration> {
        let _ = report;
        None
    }
}

pub mod amqp;
pub mod callback_policy;
pub mod dispatch;
pub mod http;
