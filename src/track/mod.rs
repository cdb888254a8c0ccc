//! The case tracker: follows every case the bridge created until it ends,
//! and turns the endings the sources want to hear about into reports.
//!
//! Tracking spends requests from the same per-key budget as creating, so it
//! is built to be frugal:
//! - one listing per queue, not one request per case: `GET
//!   /queues/{id}/cases?status=completed,failed,canceled[,...]
//!   &updated_at_from=<watermark>&sort_by=updated_at&sort_order=asc&limit=100`;
//! - pages are read back to back only while they come back full; then the
//!   queue rests for `poll_interval_ms` (open cases) or `watch_interval_ms`
//!   (only failed/canceled cases watched for a retry); a queue with nothing
//!   tracked is never listed;
//! - every request takes a [`RequestClass::Track`] permit from the rate
//!   gate, which caps tracking at `tracking.share` of the budget while
//!   creates wait, and never starves it.
//!
//! Paging is by key, not by offset: the next page starts at the last
//! `updated_at` seen, skipping the cases already read at exactly that
//! instant, so cases that change while we page cannot shift a page and be
//! skipped. Each page is applied to the outbox atomically with the new
//! watermark ([`Outbox::apply_listing`]); a crash re-reads at most one page,
//! and a re-read transition is recognised (same status and `updated_at`)
//! and never reported twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::TrackingConfig;
use crate::deliver::gate::{RateGate, RequestClass, ServerFeedback};
use crate::deliver::retry::{RetryPolicy, RetrySchedule};
use crate::duvo::{ApiError, CaseStatus, DuvoClient, ListQuery, SortBy, SortOrder};
use crate::outbox::{Outbox, OutboxError};
use crate::report::ReportStatus;

/// Cases per listing page (the API's maximum).
pub const PAGE_SIZE: u32 = 100;
/// How often TTLs are checked.
const EXPIRY_EVERY: Duration = Duration::from_secs(10);

/// Tracker settings (from `[tracking]`).
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    pub poll_interval: Duration,
    pub watch_interval: Duration,
    pub lookback: Duration,
    /// Statuses listed: the terminal ones plus any derived status that is
    /// reported.
    pub statuses: Vec<CaseStatus>,
}

impl TrackerConfig {
    pub fn from_config(cfg: &TrackingConfig) -> Self {
        let mut statuses = vec![
            CaseStatus::Completed,
            CaseStatus::Failed,
            CaseStatus::Canceled,
        ];
        if cfg.report.contains(&ReportStatus::NeedsInput) {
            statuses.push(CaseStatus::NeedsInput);
        }
        if cfg.report.contains(&ReportStatus::Postponed) {
            statuses.push(CaseStatus::Postponed);
        }
        TrackerConfig {
            poll_interval: Duration::from_millis(cfg.poll_interval_ms),
            watch_interval: Duration::from_millis(cfg.watch_interval_ms),
            lookback: Duration::from_millis(cfg.lookback_ms),
            statuses,
        }
    }
}

/// Why one listing cycle of a queue stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("listing cases failed: {0}")]
    Api(#[from] ApiError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("stopped")]
    Stopped,
}

/// Follows the cases of every queue the bridge delivered to.
pub struct CaseTracker {
    outbox: Outbox,
    client: Arc<DuvoClient>,
    gate: RateGate,
    cfg: TrackerConfig,
    retry: RetryPolicy,
}

/// Per-queue schedule.
struct QueueState {
    next_at: Instant,
    failures: Option<RetrySchedule>,
}

impl CaseTracker {
    pub fn new(
        outbox: Outbox,
        client: Arc<DuvoClient>,
        gate: RateGate,
        cfg: TrackerConfig,
    ) -> Self {
        let retry = RetryPolicy {
            initial: Duration::from_secs(1),
            max: cfg.watch_interval.max(Duration::from_secs(1)),
            ..RetryPolicy::default()
        };
        CaseTracker {
            outbox,
            client,
            gate,
            cfg,
            retry,
        }
    }

    /// Run until `stop` is cancelled.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut queues: HashMap<Uuid, QueueState> = HashMap::new();
        let mut next_expiry = Instant::now();
        loop {
            if stop.is_cancelled() {
                return;
            }
            let now = Instant::now();
            if now >= next_expiry {
                self.expire().await;
                next_expiry = now + EXPIRY_EVERY;
            }
            let tracked = self.outbox.tracked_queues();
            queues.retain(|q, _| tracked.iter().any(|t| t.queue_id == *q));
            let mut wake = next_expiry;
            let mut due: Option<(Instant, Uuid)> = None;
            for t in &tracked {
                // A queue seen for the first time is listed one interval
                // later: its cases were only just created.
                let st = queues.entry(t.queue_id).or_insert_with(|| QueueState {
                    next_at: now + self.cfg.poll_interval,
                    failures: None,
                });
                if t.open > 0 {
                    st.next_at = st.next_at.min(now + self.cfg.poll_interval);
                }
                if st.next_at <= now {
                    if due.is_none_or(|(at, _)| st.next_at < at) {
                        due = Some((st.next_at, t.queue_id));
                    }
                } else {
                    wake = wake.min(st.next_at);
                }
            }
            let Some((_, queue)) = due else {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake.min(now + self.cfg.poll_interval)) => {}
                    _ = stop.cancelled() => return,
                }
                continue;
            };
            let result = self.list_queue(queue, &stop).await;
            let now = Instant::now();
            let open = self
                .outbox
                .tracked_queues()
                .iter()
                .find(|t| t.queue_id == queue)
                .map(|t| t.open)
                .unwrap_or(0);
            let Some(st) = queues.get_mut(&queue) else {
                continue;
            };
            match result {
                Ok(()) => {
                    st.failures = None;
                    st.next_at = now
                        + if open > 0 {
                            self.cfg.poll_interval
                        } else {
                            self.cfg.watch_interval
                        };
                }
                Err(TrackError::Stopped) => return,
                Err(e) => {
                    let delay = st
                        .failures
                        .get_or_insert_with(|| self.retry.new_schedule())
                        .next_delay()
                        .max(self.cfg.poll_interval);
                    tracing::warn!(%queue, error = %e, retry_in_ms = delay.as_millis() as u64,
                        "case tracking: listing failed; the watermark stays, nothing is lost");
                    st.next_at = now + delay;
                }
            }
        }
    }

    /// One listing cycle of a queue: pages from the watermark until a page
    /// comes back short.
    async fn list_queue(
        &mut self,
        queue: Uuid,
        stop: &CancellationToken,
    ) -> Result<(), TrackError> {
        let watermark = self
            .outbox
            .watermark(queue)?
            .unwrap_or_else(|| Utc::now() - chrono::Duration::seconds(60));
        let lookback = chrono::Duration::from_std(self.cfg.lookback).unwrap_or_default();
        let mut from: DateTime<Utc> = watermark - lookback;
        let mut offset: u64 = 0;
        let mut high = watermark;
        loop {
            let permit = tokio::select! {
                p = self.gate.acquire(RequestClass::Track) => p,
                _ = stop.cancelled() => return Err(TrackError::Stopped),
            };
            let q = ListQuery {
                limit: Some(PAGE_SIZE),
                offset: (offset > 0).then_some(offset),
                status: self.cfg.statuses.clone(),
                updated_at_from: Some(from),
                sort_by: Some(SortBy::UpdatedAt),
                sort_order: Some(SortOrder::Asc),
                ..ListQuery::default()
            };
            let started = std::time::Instant::now();
            let res = tokio::select! {
                r = self.client.list_cases(queue, &q) => r,
                _ = stop.cancelled() => return Err(TrackError::Stopped),
            };
            metrics::histogram!("duvo_bridge_api_request_seconds", "endpoint" => "list_cases")
                .record(started.elapsed().as_secs_f64());
            let page = match res {
                Ok(resp) => {
                    permit.observe(
                        &ServerFeedback::from_info(&resp.rate, SystemTime::now())
                            .with_status(resp.status.as_u16()),
                    );
                    count_request(&resp.status.as_u16().to_string());
                    resp.body.cases
                }
                Err(e) => {
                    match e.rate() {
                        Some(rate) => {
                            let mut fb = ServerFeedback::from_info(rate, SystemTime::now());
                            fb.status = e.status().map(|s| s.as_u16());
                            permit.observe(&fb);
                        }
                        None => drop(permit),
                    }
                    count_request(
                        &e.status()
                            .map(|s| s.as_u16().to_string())
                            .unwrap_or_else(|| "transport_error".into()),
                    );
                    if e.status().map(|s| s.as_u16()) == Some(400)
                        && self.cfg.statuses.contains(&CaseStatus::Canceled)
                    {
                        // The contract does not list `canceled` among the
                        // filter values; if this server refuses it, track
                        // without it (canceled cases then end by TTL).
                        tracing::warn!(error = %e,
                            "the API refused the status filter; listing without `canceled` from now on");
                        self.cfg.statuses.retain(|s| *s != CaseStatus::Canceled);
                    }
                    return Err(e.into());
                }
            };
            let full = page.len() as u32 >= PAGE_SIZE;
            if let Some(last) = page.last() {
                let last_at = last.updated_at;
                if last_at > high {
                    high = last_at;
                }
                // Key-set paging: resume at the last instant, skipping the
                // cases of this page already read at exactly that instant.
                let at_last = page
                    .iter()
                    .rev()
                    .take_while(|c| c.updated_at == last_at)
                    .count() as u64;
                if last_at == from {
                    offset += page.len() as u64;
                } else {
                    from = last_at;
                    offset = at_last;
                }
            }
            let outcome = self.outbox.apply_listing(queue, &page, high).await?;
            if outcome.transitions > 0 {
                tracing::debug!(%queue, ours = outcome.ours, transitions = outcome.transitions,
                    reports = outcome.reports, finished = outcome.finished, "case tracking page applied");
            }
            metrics::counter!("duvo_bridge_tracking_transitions_total")
                .increment(outcome.transitions);
            metrics::counter!("duvo_bridge_tracking_finished_total").increment(outcome.finished);
            let lag = (Utc::now() - high).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::gauge!("duvo_bridge_tracking_watermark_lag_seconds", "queue" => queue.to_string())
                .set(lag);
            if !full {
                return Ok(());
            }
        }
    }

    async fn expire(&self) {
        loop {
            let now = crate::deliver::batcher::now_ms();
            match self.outbox.expire_tracking(now, 1000).await {
                Ok(o) => {
                    if o.expired + o.forgotten > 0 {
                        tracing::info!(
                            expired = o.expired,
                            forgotten = o.forgotten,
                            reports = o.reports,
                            "case tracking: TTL reached"
                        );
                        metrics::counter!("duvo_bridge_tracking_expired_total")
                            .increment(o.expired);
                    }
                    if o.expired + o.forgotten < 1000 {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "case tracking: expiry failed; retrying later");
                    return;
                }
            }
        }
    }
}

fn count_request(outcome: &str) {
    metrics::counter!("duvo_bridge_api_requests_total", "endpoint" => "list_cases", "outcome" => outcome.to_string())
        .increment(1);
    metrics::counter!("duvo_bridge_tracking_requests_total").increment(1);
}
