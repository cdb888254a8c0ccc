//! The case tracker: follows every case the bridge created until it ends,
//! and turns the endings the sources want to hear about into reports.
//!
//! Tracking spends requests from the same per-key budget as creating, so it
//! is built to be frugal:
//! - listings per queue, never one request per case: `GET
//!   /queues/{id}/cases?status=...&updated_at_from=<watermark>
//!   &sort_by=updated_at&sort_order=asc&limit=100`;
//! - two streams per queue, each with its own watermark: the *reports*
//!   stream (`failed,canceled` and any other reported status) and the
//!   *cleanup* stream (`completed`, only to forget finished cases). A burst
//!   of completions is worked off in slices between report listings, so it
//!   never delays a failure report;
//! - pages are read back to back only while they come back full; then the
//!   reports stream rests for `poll_interval_ms` (open cases) and the
//!   cleanup stream for `watch_interval_ms`; a queue with nothing tracked
//!   is never listed;
//! - every request takes a permit from the rate gate: while creates wait,
//!   speculative listings ([`RequestClass::Poll`]) get `tracking.poll_share`
//!   of the budget and listings that continue a full page
//!   ([`RequestClass::Track`]) `tracking.share`, never starved; the cleanup
//!   stream waits until creates are no longer backlogged. With no create
//!   waiting, tracking may use the idle budget.
//!
//! Paging is by key, not by offset: the next page starts at the last
//! `updated_at` seen, skipping the cases already read at exactly that
//! instant, so cases that change while we page cannot shift a page and be
//! skipped. Each page is applied to the outbox atomically with the new
//! watermark ([`Outbox::apply_listing`]); a crash re-reads at most one page,
//! and a re-read transition is recognised (same status and `updated_at`)
//! and never reported twice.

pub mod config;
pub mod redrive;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::deliver::gate::{RateGate, RequestClass, ServerFeedback};
use crate::duvo::{ApiError, CaseStatus, DuvoClient, ListQuery, SortBy, SortOrder};
use crate::outbox::ReportStatus;
use crate::outbox::{ListingStream, Outbox, OutboxError};
use crate::retry::{RetryPolicy, RetrySchedule};
use crate::track::config::TrackingConfig;

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
    /// Statuses of the reports stream: failed and canceled (the terminal
    /// endings worth reporting) plus any other reported status.
    pub report_statuses: Vec<CaseStatus>,
    /// Whether completions are listed on their own stream (they are, unless
    /// `completed` is itself reported and so on the reports stream).
    pub cleanup: bool,
}

impl TrackerConfig {
    pub fn from_config(cfg: &TrackingConfig) -> Self {
        let mut report_statuses = vec![CaseStatus::Failed, CaseStatus::Canceled];
        for (r, s) in [
            (ReportStatus::NeedsInput, CaseStatus::NeedsInput),
            (ReportStatus::Postponed, CaseStatus::Postponed),
            (ReportStatus::Completed, CaseStatus::Completed),
        ] {
            if cfg.report.contains(&r) {
                report_statuses.push(s);
            }
        }
        let cleanup = !report_statuses.contains(&CaseStatus::Completed);
        TrackerConfig {
            poll_interval: Duration::from_millis(cfg.poll_interval_ms),
            watch_interval: Duration::from_millis(cfg.watch_interval_ms),
            lookback: Duration::from_millis(cfg.lookback_ms),
            report_statuses,
            cleanup,
        }
    }

    fn statuses(&self, stream: ListingStream) -> Vec<CaseStatus> {
        match stream {
            ListingStream::Reports => self.report_statuses.clone(),
            ListingStream::Cleanup => vec![CaseStatus::Completed],
        }
    }

    fn streams(&self) -> &'static [ListingStream] {
        if self.cleanup {
            &ListingStream::ALL
        } else {
            &[ListingStream::Reports]
        }
    }
}

/// Why one listing turn stopped early.
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
    /// The queues this tracker (its account) follows.
    scope: crate::deliver::QueueScope,
    cfg: TrackerConfig,
    retry: RetryPolicy,
}

/// Schedule of one (queue, stream) listing.
struct Unit {
    next_at: Instant,
    failures: Option<RetrySchedule>,
    /// Where the next page starts (`updated_at_from`, offset of the cases
    /// at exactly that instant already read). The persisted watermark alone
    /// cannot say it when many cases share one `updated_at`; after a
    /// restart the listing resumes at the watermark and re-reads those.
    cursor: Option<Cursor>,
    /// The last turn stopped at `max_pages` on a full page.
    more: bool,
}

/// A key-set position in a listing sorted by `updated_at` ascending.
///
/// The API pages by offset only, so the position is "from `from`, skipping
/// the `seen` cases at exactly that instant". Offsets shift when a case
/// already read at that instant changes again (a failed case retried): to
/// notice it, the next page overlaps the last by one case, which must be
/// `last_id`, still at `from`; if it is not, the cases at that instant are
/// read again from offset 0 (a re-read is recognised and costs no report).
#[derive(Debug, Clone, Copy)]
struct Cursor {
    from: DateTime<Utc>,
    seen: u64,
    last_id: Option<Uuid>,
}

/// Cleanup pages read per turn before failure listings get their chance
/// again: a burst of completions is worked off in slices.
const CLEANUP_PAGES_PER_TURN: usize = 2;

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
            scope: crate::deliver::QueueScope::All,
            cfg,
            retry,
        }
    }

    /// Follow only the queues of `scope` (one account among several).
    pub fn with_scope(mut self, scope: crate::deliver::QueueScope) -> Self {
        self.scope = scope;
        self
    }

    /// Run until `stop` is cancelled.
    ///
    /// Scheduling: the reports stream of a queue with open cases is listed
    /// every `poll_interval` (sooner while its pages come back full); the
    /// cleanup stream (completions) every `watch_interval` while its pages
    /// come back short, and slice by slice while they are full, always
    /// after any reports stream that is due. Queues whose cases all ended
    /// failed/canceled are listed every `watch_interval`.
    pub async fn run(mut self, stop: CancellationToken) {
        // Its counts of open cases per queue are complete only once the
        // outbox has loaded every stored event (a few seconds after a start
        // with a large backlog); a tracker running earlier would both miss
        // queues and have its transitions counted twice by the load.
        tokio::select! {
            _ = self.outbox.loaded() => {}
            _ = stop.cancelled() => return,
        }
        let mut units: HashMap<(Uuid, ListingStream), Unit> = HashMap::new();
        // Per queue, when its last speculative listing (one not continuing a
        // full page) started: at most one per poll interval, whichever
        // stream, so an idle queue costs one request per interval.
        let mut last_speculative: HashMap<Uuid, Instant> = HashMap::new();
        let mut next_expiry = Instant::now();
        // Whether the last turn was a cleanup slice: then any due reports
        // listing (and speculative listing) goes before the next slice, so a
        // long run of full completion pages never holds failures back.
        let mut after_cleanup = false;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let now = Instant::now();
            if now >= next_expiry {
                self.expire().await;
                next_expiry = now + EXPIRY_EVERY;
            }
            let mut tracked = self.outbox.tracked_queues();
            tracked.retain(|t| self.scope.contains(&t.queue_id));
            units.retain(|(q, _), _| tracked.iter().any(|t| t.queue_id == *q));
            last_speculative.retain(|q, _| tracked.iter().any(|t| t.queue_id == *q));
            let mut wake = next_expiry;
            let backlogged = self.gate.creates_backlogged();
            // Continuations first (reports before cleanup), then speculative
            // listings by how long they have been due, so the cleanup stream
            // gets the per-queue slot too. Right after a cleanup slice,
            // cleanup continuations go last: reports and cleanup alternate
            // while both have work.
            let mut due: Option<((u8, ListingStream, Instant), Uuid, ListingStream)> = None;
            for t in &tracked {
                let slot_at = last_speculative
                    .get(&t.queue_id)
                    .map_or(now, |at| *at + self.cfg.poll_interval);
                for &stream in self.cfg.streams() {
                    // Clean-up only forgets finished cases: it runs in the
                    // budget creates leave over.
                    if stream == ListingStream::Cleanup && backlogged {
                        wake = wake.min(now + self.cfg.poll_interval);
                        continue;
                    }
                    // A queue seen for the first time is listed one interval
                    // later: its cases were only just created.
                    let u = units.entry((t.queue_id, stream)).or_insert_with(|| Unit {
                        next_at: now + self.cfg.poll_interval,
                        failures: None,
                        cursor: None,
                        more: false,
                    });
                    if stream == ListingStream::Reports && t.open > 0 && u.failures.is_none() {
                        u.next_at = u.next_at.min(now + self.cfg.poll_interval);
                    }
                    let continuation = u.more;
                    let at = if continuation {
                        u.next_at
                    } else {
                        u.next_at.max(slot_at)
                    };
                    if at <= now {
                        let key = match (continuation, stream) {
                            (true, ListingStream::Cleanup) if after_cleanup => {
                                (2, stream, u.next_at)
                            }
                            (true, _) => (0, stream, u.next_at),
                            (false, _) => (1, ListingStream::Reports, u.next_at),
                        };
                        if due.is_none_or(|(k, _, _)| key < k) {
                            due = Some((key, t.queue_id, stream));
                        }
                    } else {
                        wake = wake.min(at);
                    }
                }
            }
            let Some(((rank, _, _), queue, stream)) = due else {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake.min(now + self.cfg.poll_interval)) => {}
                    _ = stop.cancelled() => return,
                }
                continue;
            };
            if rank == 1 {
                last_speculative.insert(queue, now);
            }
            after_cleanup = stream == ListingStream::Cleanup;
            let max_pages = match stream {
                ListingStream::Reports => usize::MAX,
                ListingStream::Cleanup => CLEANUP_PAGES_PER_TURN,
            };
            let (mut cursor, continuation) = units
                .get_mut(&(queue, stream))
                .map(|u| (u.cursor.take(), u.more))
                .unwrap_or_default();
            let result = self
                .list(queue, stream, max_pages, &mut cursor, continuation, &stop)
                .await;
            let now = Instant::now();
            let open = self
                .outbox
                .tracked_queues()
                .iter()
                .find(|t| t.queue_id == queue)
                .map(|t| t.open)
                .unwrap_or(0);
            let Some(u) = units.get_mut(&(queue, stream)) else {
                continue;
            };
            u.cursor = cursor;
            u.more = matches!(result, Ok(true));
            match result {
                Ok(more) => {
                    u.failures = None;
                    u.next_at = if more {
                        now
                    } else if stream == ListingStream::Reports && open > 0 {
                        now + self.cfg.poll_interval
                    } else {
                        now + self.cfg.watch_interval
                    };
                }
                Err(TrackError::Stopped) => return,
                Err(e) => {
                    let delay = u
                        .failures
                        .get_or_insert_with(|| self.retry.new_schedule())
                        .next_delay()
                        .max(self.cfg.poll_interval);
                    tracing::warn!(%queue, stream = stream.as_str(), error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "case tracking: listing failed; the watermark stays, nothing is lost");
                    u.next_at = now + delay;
                }
            }
        }
    }

    /// One listing turn of a queue's stream: pages from the watermark until
    /// a page comes back short (returns `false`) or `max_pages` full pages
    /// were read (returns `true`: more to read).
    ///
    /// `cursor` carries the key-set position from one turn to the next. A
    /// turn that does not continue a full page starts `lookback` before the
    /// watermark when a lookback is configured (re-reading what changed in
    /// that span, on purpose), else where the last turn stopped.
    async fn list(
        &mut self,
        queue: Uuid,
        stream: ListingStream,
        max_pages: usize,
        cursor: &mut Option<Cursor>,
        continuation: bool,
        stop: &CancellationToken,
    ) -> Result<bool, TrackError> {
        let watermark = self
            .outbox
            .watermark(queue, stream)?
            .unwrap_or_else(|| Utc::now() - chrono::Duration::seconds(60));
        let lookback = chrono::Duration::from_std(self.cfg.lookback).unwrap_or_default();
        let resume = cursor.take();
        let mut cur = match resume {
            Some(c) if continuation || lookback.is_zero() => c,
            _ => Cursor {
                from: watermark - lookback,
                seen: 0,
                last_id: None,
            },
        };
        // A batch settled late: its cases may have changed before we knew
        // them, behind where this stream stands. Read again from their
        // creation (re-read transitions are recognised, never re-reported).
        if !continuation
            && let Some(r) = self.outbox.take_rewind(queue, stream)
            && r < cur.from
        {
            cur = Cursor {
                from: r,
                seen: 0,
                last_id: None,
            };
        }
        let mut high = watermark;
        let mut pages = 0usize;
        loop {
            let (offset, expect) = match cur.last_id {
                Some(id) if cur.seen > 0 => (cur.seen - 1, Some(id)),
                _ => (cur.seen, None),
            };
            // The first page of a turn that does not continue a full one
            // is speculative: it may well find nothing.
            let class = if continuation || pages > 0 {
                RequestClass::Track
            } else {
                RequestClass::Poll
            };
            let permit = tokio::select! {
                p = self.gate.acquire(class) => p,
                _ = stop.cancelled() => return Err(TrackError::Stopped),
            };
            let q = ListQuery {
                limit: Some(PAGE_SIZE),
                offset: (offset > 0).then_some(offset),
                status: self.cfg.statuses(stream),
                updated_at_from: Some(cur.from),
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
                    count_request(
                        &self.gate.account(),
                        stream,
                        &resp.status.as_u16().to_string(),
                    );
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
                        &self.gate.account(),
                        stream,
                        &e.status()
                            .map(|s| s.as_u16().to_string())
                            .unwrap_or_else(|| "transport_error".into()),
                    );
                    if e.status().map(|s| s.as_u16()) == Some(400)
                        && self.cfg.report_statuses.contains(&CaseStatus::Canceled)
                        && stream == ListingStream::Reports
                    {
                        // The contract does not list `canceled` among the
                        // filter values; if this server refuses it, track
                        // without it (canceled cases then end by TTL).
                        tracing::warn!(error = %e,
                            "the API refused the status filter; listing without `canceled` from now on");
                        self.cfg
                            .report_statuses
                            .retain(|s| *s != CaseStatus::Canceled);
                    }
                    return Err(e.into());
                }
            };
            if let Some(id) = expect
                && offset > 0
                && page.first().map(|c| (c.id, c.updated_at)) != Some((id, cur.from))
            {
                // The cases at `cur.from` changed since the last page: read
                // them again from the start rather than skip one.
                metrics::counter!("duvo_bridge_tracking_rereads_total").increment(1);
                cur.seen = 0;
                cur.last_id = None;
                continue;
            }
            pages += 1;
            let full = page.len() as u32 >= PAGE_SIZE;
            if let Some(last) = page.last() {
                let last_at = last.updated_at;
                if last_at > high {
                    high = last_at;
                }
                if last_at == cur.from {
                    cur.seen = offset + page.len() as u64;
                } else {
                    cur.from = last_at;
                    cur.seen = page
                        .iter()
                        .rev()
                        .take_while(|c| c.updated_at == last_at)
                        .count() as u64;
                }
                cur.last_id = Some(last.id);
            }
            let outcome = self
                .outbox
                .apply_listing(queue, stream, &page, high)
                .await?;
            if outcome.transitions > 0 {
                tracing::debug!(%queue, stream = stream.as_str(), ours = outcome.ours,
                    transitions = outcome.transitions, reports = outcome.reports,
                    finished = outcome.finished, "case tracking page applied");
            }
            metrics::counter!("duvo_bridge_tracking_transitions_total")
                .increment(outcome.transitions);
            metrics::counter!("duvo_bridge_tracking_finished_total").increment(outcome.finished);
            let lag = (Utc::now() - high).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::gauge!("duvo_bridge_tracking_watermark_lag_seconds",
                "queue" => queue.to_string(), "stream" => stream.as_str())
            .set(lag);
            *cursor = Some(cur);
            if !full {
                return Ok(false);
            }
            if pages >= max_pages {
                return Ok(true);
            }
        }
    }

    async fn expire(&self) {
        loop {
            let now = crate::clock::now_ms();
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

fn count_request(account: &str, stream: ListingStream, outcome: &str) {
    metrics::counter!("duvo_bridge_api_requests_total", "endpoint" => "list_cases",
        "outcome" => outcome.to_string(), "account" => account.to_string())
    .increment(1);
    metrics::counter!("duvo_bridge_tracking_requests_total", "stream" => stream.as_str())
        .increment(1);
}
