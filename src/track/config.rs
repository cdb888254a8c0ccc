//! `[tracking]`: how the tracker follows created cases and which outcomes
//! are reported back to the sources.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::outbox::{ReportStatus, TrackingPolicy};

/// Case tracking: follow every created case until it ends, and report
/// failures back to the source the event came from.
///
/// Tracking lists each queue's finished cases (filtered by status and by
/// `updated_at` from a persisted watermark, 100 per request), so it costs
/// about one request per 100 finished cases plus one per poll interval per
/// queue, from the same per-key budget as creates (at most `share` of it
/// while creates are waiting; never starved).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingConfig {
    /// Follow created cases at all. Off: delivered events are forgotten at
    /// once and no report is ever sent for a case (rejected events are
    /// still reported).
    pub enabled: bool,
    /// Largest share of the rate budget tracking takes while creates are
    /// waiting, in (0, 1]. With no create waiting, tracking may use the
    /// idle budget.
    pub share: f64,
    /// Largest share of the rate budget speculative listings (those that do
    /// not continue a full page, and may find nothing) take while creates
    /// are waiting, in (0, 1]. It bounds what polling costs a backlog: at
    /// 300 requests/min the default 0.005 is one listing every 40 s, so a
    /// failure may take that long to be reported while a backlog drains.
    pub poll_share: f64,
    /// Longest time between two listings of a queue with unfinished cases.
    /// Listing goes on back to back while pages come back full.
    pub poll_interval_ms: u64,
    /// Time between two listings of a queue whose tracked cases have all
    /// ended failed or canceled (watched only for a retry in Duvo).
    pub watch_interval_ms: u64,
    /// Each listing starts this far before the watermark, to catch updates
    /// the server commits out of `updated_at` order. Re-read cases are
    /// recognised and cost no report, but they fill pages: on a busy queue
    /// every listing re-reads what changed in this span. 0 (the default)
    /// trusts the server's ordering, as the API contract does.
    pub lookback_ms: u64,
    /// A case still unfinished this long after it was created is reported
    /// `expired` and no longer followed; a failed one stops being watched.
    pub ttl_hours: u64,
    /// Case statuses reported back to the source: any of `failed`,
    /// `canceled`, `needs_input`, `postponed`, `completed`. Events the API
    /// refused (`rejected`) and cases past the TTL (`expired`) are always
    /// reported.
    pub report: Vec<ReportStatus>,
    /// Reports in flight at once per source.
    pub report_concurrency: usize,
    /// First retry delay of a report destination that did not acknowledge a
    /// report, ms (doubles up to `report_retry_max_ms`, per destination;
    /// reports are never dropped).
    pub report_retry_initial_ms: u64,
    pub report_retry_max_ms: u64,
}

impl Default for TrackingConfig {
    fn default() -> Self {
        TrackingConfig {
            enabled: true,
            share: 0.1,
            poll_share: 0.005,
            poll_interval_ms: 2000,
            watch_interval_ms: 30_000,
            lookback_ms: 0,
            ttl_hours: 72,
            report: vec![ReportStatus::Failed, ReportStatus::Canceled],
            report_concurrency: 8,
            report_retry_initial_ms: 500,
            report_retry_max_ms: 60_000,
        }
    }
}

impl TrackingConfig {
    /// Every problem with the `[tracking]` section.
    pub fn check(&self) -> Vec<String> {
        use ReportStatus as R;
        let mut errors = Vec::new();
        if !(self.share.is_finite() && self.share > 0.0 && self.share <= 1.0) {
            errors.push(format!(
                "tracking.share must be in (0, 1] (got {})",
                self.share
            ));
        }
        if !(self.poll_share.is_finite() && self.poll_share > 0.0 && self.poll_share <= 1.0) {
            errors.push(format!(
                "tracking.poll_share must be in (0, 1] (got {})",
                self.poll_share
            ));
        }
        if self.poll_interval_ms < 100 {
            errors.push("tracking.poll_interval_ms must be at least 100".into());
        }
        if self.watch_interval_ms < self.poll_interval_ms {
            errors.push("tracking.watch_interval_ms must be at least poll_interval_ms".into());
        }
        if self.ttl_hours == 0 {
            errors.push("tracking.ttl_hours must be at least 1".into());
        }
        for s in &self.report {
            if matches!(s, R::Expired | R::Rejected) {
                errors.push(format!(
                    "tracking.report: {s:?} is always reported; list only failed, canceled, needs_input, postponed, completed"
                ));
            }
        }
        if self.report_concurrency == 0 {
            errors.push("tracking.report_concurrency must be at least 1".into());
        }
        if self.report_retry_initial_ms == 0
            || self.report_retry_max_ms < self.report_retry_initial_ms
        {
            errors.push(
                "tracking.report_retry_initial_ms must be >= 1 and <= report_retry_max_ms".into(),
            );
        }
        errors
    }

    /// The outbox's tracking policy; `None` when tracking is off and no
    /// source reports (with tracking off, rejections of reporting sources
    /// are still reported).
    pub fn policy(&self, report_sources: BTreeSet<String>) -> Option<TrackingPolicy> {
        if !self.enabled && report_sources.is_empty() {
            return None;
        }
        Some(TrackingPolicy {
            track_cases: self.enabled,
            ttl: Duration::from_secs(self.ttl_hours.saturating_mul(3600)),
            report_sources,
            report_statuses: self.report.iter().copied().collect(),
        })
    }
}
