//! `cases retry`: re-drive failed cases in Duvo, under the rate gate, and
//! follow them again.
//!
//! The queue is listed first (status, `updated_at_from`, 100 a page, sorted
//! by `updated_at`), whole, before anything is retried: a retried case
//! leaves the `failed` listing, which would shift offset-paged pages under
//! a listing that retried as it went. Labels are matched here (the list
//! endpoint does not filter by them). Then `POST .../bulk-retry` with 100
//! ids a call. Every request takes a [`RequestClass::Track`] permit, so a
//! re-drive shares the key's budget with creates and tracking instead of
//! bursting past it; a transient answer (429, 5xx, transport) is retried
//! after the gate's own wait and a backoff, a bounded number of times.
//!
//! Cases this bridge created and still follows (phase watching, within
//! their TTL) are re-armed ([`Outbox::rearm_tracking`]): open again with a
//! fresh TTL, so their second ending is seen and reported like the first.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::deliver::gate::{RateGate, RequestClass, ServerFeedback};
use crate::duvo::{
    ApiError, ApiResponse, CaseStatus, DuvoClient, Label, ListQuery, SortBy, SortOrder,
};
use crate::outbox::{Outbox, OutboxError};
use crate::retry::RetryPolicy;

/// Cases one re-drive lists at most (then it says it stopped there).
pub const MAX_CASES: usize = 100_000;
/// Ids per bulk-retry call (the API's maximum).
pub const IDS_PER_CALL: usize = 100;
/// Attempts per request before a re-drive gives up with the error.
const ATTEMPTS: u32 = 6;

/// What to re-drive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryCases {
    pub queue: Uuid,
    /// Statuses to retry (`failed` when empty; `canceled` may be added).
    #[serde(default)]
    pub statuses: Vec<CaseStatus>,
    /// Only cases updated (failed) at or after this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Only cases carrying every one of these labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<Label>,
    /// List and count, retry nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// What a re-drive did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RetryOutcome {
    /// Cases that matched the selection.
    pub matched: u64,
    /// Cases the API sent back to pending.
    pub retried: Vec<Uuid>,
    /// What the API skipped (not failed any more, unknown), as it said it.
    pub skipped: Vec<serde_json::Value>,
    /// Retried cases this bridge follows again (their next ending is
    /// reported to their source).
    pub followed: u64,
    /// Retried cases this bridge does not follow (not created by it, or
    /// past their tracking TTL).
    pub not_followed: u64,
    /// The listing stopped at [`MAX_CASES`].
    pub truncated: bool,
    /// API requests spent.
    pub requests: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error("the Duvo API refused the re-drive: {0}")]
    Api(#[from] ApiError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("only failed and canceled cases can be retried, not {0}")]
    Status(CaseStatus),
}

/// Runs re-drives for one API key.
#[derive(Clone)]
pub struct Redriver {
    pub client: Arc<DuvoClient>,
    pub gate: RateGate,
    pub outbox: Outbox,
    pub retry: RetryPolicy,
}

impl Redriver {
    pub async fn run(&self, req: RetryCases) -> Result<RetryOutcome, RedriveError> {
        let statuses = if req.statuses.is_empty() {
            vec![CaseStatus::Failed]
        } else {
            req.statuses.clone()
        };
        if let Some(s) = statuses
            .iter()
            .find(|s| !matches!(s, CaseStatus::Failed | CaseStatus::Canceled))
        {
            return Err(RedriveError::Status(*s));
        }
        let mut out = RetryOutcome::default();
        let mut ids = Vec::new();
        let mut offset = 0u64;
        loop {
            let q = ListQuery {
                limit: Some(super::PAGE_SIZE),
                offset: (offset > 0).then_some(offset),
                status: statuses.clone(),
                updated_at_from: req.since,
                sort_by: Some(SortBy::UpdatedAt),
                sort_order: Some(SortOrder::Asc),
                ..ListQuery::default()
            };
            let page = self
                .call(&mut out, || self.client.list_cases(req.queue, &q))
                .await?
                .cases;
            offset += page.len() as u64;
            let full = page.len() as u32 >= super::PAGE_SIZE;
            ids.extend(
                page.into_iter()
                    .filter(|c| req.labels.iter().all(|l| c.labels.contains(l)))
                    .map(|c| c.id),
            );
            if ids.len() >= MAX_CASES {
                ids.truncate(MAX_CASES);
                out.truncated = true;
                break;
            }
            if !full {
                break;
            }
        }
        out.matched = ids.len() as u64;
        if req.dry_run {
            return Ok(out);
        }
        for chunk in ids.chunks(IDS_PER_CALL) {
            let answer = self
                .call(&mut out, || self.client.bulk_retry(req.queue, chunk))
                .await?;
            let (followed, not) = self.outbox.rearm_tracking(&answer.retried).await?;
            out.followed += followed;
            out.not_followed += not;
            out.retried.extend(answer.retried);
            out.skipped.extend(answer.skipped);
        }
        metrics::counter!("duvo_bridge_cases_redriven_total").increment(out.retried.len() as u64);
        tracing::info!(queue = %req.queue, matched = out.matched, retried = out.retried.len(),
            skipped = out.skipped.len(), followed = out.followed, requests = out.requests,
            "failed cases re-driven");
        Ok(out)
    }

    /// One API request under a permit, retried while the answer is
    /// transient (the gate itself waits out any `retry-after`).
    async fn call<T, F, Fut>(&self, out: &mut RetryOutcome, send: F) -> Result<T, ApiError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<ApiResponse<T>, ApiError>>,
    {
        let mut schedule = self.retry.new_schedule();
        loop {
            let permit = self.gate.acquire(RequestClass::Track).await;
            out.requests += 1;
            match send().await {
                Ok(resp) => {
                    permit.observe(
                        &ServerFeedback::from_info(&resp.rate, SystemTime::now())
                            .with_status(resp.status.as_u16()),
                    );
                    return Ok(resp.body);
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
                    if !e.is_transient() || schedule.attempts() + 1 >= ATTEMPTS {
                        return Err(e);
                    }
                    let wait = schedule.next_delay().min(Duration::from_secs(30));
                    tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64,
                        "re-drive request failed; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}
