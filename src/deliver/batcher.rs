//! The batcher: turns ready outbox events into create requests and settles
//! them, under the rate gate, with retries that never duplicate a case.
//!
//! One dispatcher loop per API key picks the queue whose oldest ready event
//! has waited longest (among queues with a full batch or past `linger_ms`),
//! waits for a rate-gate permit, and only *then* claims the batch from the
//! outbox, so the batch holds everything that arrived while we waited for
//! the permit. The claim is persisted (with its Idempotency-Key) before the
//! request leaves; sending and retrying happens in a task per batch, at most
//! `max_in_flight` at once.
//!
//! Outcomes:
//! - 2xx: events settle as delivered with their case ids (request order).
//! - 400/413/422: the batch is split in halves (new keys: the server
//!   committed nothing) until the bad event is alone; it is dead-lettered
//!   with the API's error and the rest are delivered.
//! - 429, 5xx, timeouts, connection errors, unreadable 2xx: retried forever
//!   with the *same* key and body, after exponential backoff with jitter;
//!   the gate holds every sender back until a retry-after deadline.
//! - Before a re-send after an attempt the server may have carried out
//!   (timeout, cut connection, 5xx, 409, unreadable 2xx, or any attempt of
//!   an earlier run), the batch's cases are looked for by their batch label
//!   ([`super::reconcile`]): the found ones settle, only the others are
//!   sent (under a new key when some were found), so nothing is created
//!   twice even by a server that ignores `Idempotency-Key`.
//! - 401/403/404/409: nothing we can fix by splitting; retried with backoff
//!   (capped) while logging loudly, so a rotated key or a missing queue
//!   does not dead-letter a whole backlog.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::reconcile;
use crate::clock::now_ms;
use crate::deliver::config::DeliveryConfig;
use crate::deliver::gate::{Permit, RateGate, RequestClass, ServerFeedback};
use crate::duvo::{ApiError, CreateCasesRequest, DuvoClient, Label};
use crate::outbox::EventId;
use crate::outbox::{Batch, Outbox};
use crate::retry::RetryPolicy;

/// What to do with a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The content is refused: split or dead-letter.
    Invalid,
    /// Try the same request again later.
    Retry,
}

fn classify(e: &ApiError) -> Verdict {
    match e.status().map(|s| s.as_u16()) {
        Some(400) | Some(413) | Some(422) => Verdict::Invalid,
        _ => Verdict::Retry,
    }
}

/// Serialise a batch as the create body, each case labelled
/// `label_key` = the batch's idempotency key. Deterministic, so a retry
/// after a restart sends byte-identical content under the same key.
pub fn encode_batch(batch: &Batch, label_key: &str) -> Bytes {
    let cases = batch
        .events
        .iter()
        .map(|(_, c)| {
            let mut c = c.clone();
            c.labels.push(Label {
                key: label_key.to_string(),
                value: batch.idempotency_key.clone(),
            });
            c
        })
        .collect();
    let req = CreateCasesRequest::batch(cases);
    Bytes::from(serde_json::to_vec(&req).expect("request types always serialise"))
}

/// What reconciling a batch before a re-send concluded.
enum Reconciled {
    /// Nothing more to send for it: settled, or split with the missing
    /// part pushed to be sent under a new key.
    Done,
    /// None of its cases exist: send it (again, same key and body).
    Send,
    /// The listing failed: try again after a pause.
    Failed,
    /// `abort` fired.
    Aborted,
}

/// Delivery for one API key.
#[derive(Clone)]
pub struct Batcher {
    outbox: Outbox,
    client: Arc<DuvoClient>,
    gate: RateGate,
    cfg: DeliveryConfig,
    retry: RetryPolicy,
    clock: Arc<reconcile::ServerClock>,
    /// The queues this batcher (its account) delivers.
    scope: super::QueueScope,
}

impl Batcher {
    pub fn new(
        outbox: Outbox,
        client: Arc<DuvoClient>,
        gate: RateGate,
        cfg: DeliveryConfig,
    ) -> Self {
        let retry = RetryPolicy {
            initial: Duration::from_millis(cfg.retry_initial_ms),
            max: Duration::from_millis(cfg.retry_max_ms),
            ..RetryPolicy::default()
        };
        Batcher {
            outbox,
            client,
            gate,
            cfg,
            retry,
            clock: Arc::default(),
            scope: super::QueueScope::All,
        }
    }

    /// Deliver only the queues of `scope` (one account among several).
    pub fn with_scope(mut self, scope: super::QueueScope) -> Self {
        self.scope = scope;
        self
    }

    /// Run until `stop` is cancelled (no new batches are claimed after
    /// that), then wait for in-flight batches until `abort` is cancelled.
    /// Whatever is still in flight at `abort` stays persisted as a batch and
    /// is re-sent with the same key at the next start.
    pub async fn run(self, stop: CancellationToken, abort: CancellationToken) {
        let tracker = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(self.cfg.max_in_flight));

        match self.outbox.unsettled_batches() {
            Ok(mut batches) => {
                batches.retain(|b| self.scope.contains(&b.queue_id));
                if !batches.is_empty() {
                    tracing::info!(
                        batches = batches.len(),
                        "re-sending batches persisted before the last stop (same idempotency keys)"
                    );
                }
                for b in batches {
                    let slot = tokio::select! {
                        s = slots.clone().acquire_owned() => s.expect("semaphore never closed"),
                        _ = stop.cancelled() => break,
                    };
                    let me = self.clone();
                    let abort = abort.clone();
                    tracker.spawn(async move {
                        me.deliver(b, None, true, abort).await;
                        drop(slot);
                    });
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read unsettled batches"),
        }

        while !stop.is_cancelled() {
            let slot = tokio::select! {
                s = slots.clone().acquire_owned() => s.expect("semaphore never closed"),
                _ = stop.cancelled() => break,
            };
            let Some(queue) = self.next_queue(&stop).await else {
                break;
            };
            let permit = tokio::select! {
                p = self.gate.acquire(RequestClass::Create) => p,
                _ = stop.cancelled() => break,
            };
            let batch = match self
                .outbox
                .claim_batch(queue, self.cfg.max_batch, self.claim_budget())
                .await
            {
                Ok(Some(b)) => b,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(error = %e, %queue, "cannot claim a batch; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let me = self.clone();
            let abort = abort.clone();
            tracker.spawn(async move {
                me.deliver(batch, Some(permit), false, abort).await;
                drop(slot);
            });
        }
        tracker.close();
        tokio::select! {
            _ = tracker.wait() => {}
            _ = abort.cancelled() => {
                tracing::warn!("grace period over: leaving in-flight batches persisted for the next start");
                // Every delivery task watches `abort` and returns at once;
                // wait for them so nothing holds the outbox after `run`.
                tracker.wait().await;
            }
        }
    }

    /// Wait for a queue worth sending: a full batch, or an oldest event that
    /// has lingered long enough. Oldest first across queues, for fairness.
    async fn next_queue(&self, stop: &CancellationToken) -> Option<Uuid> {
        let linger = self.cfg.linger_ms;
        loop {
            let now = now_ms();
            let mut best: Option<(u64, Uuid)> = None;
            let mut next_due: Option<u64> = None;
            for s in self.outbox.ready_summary() {
                if s.count == 0 || !self.scope.contains(&s.queue_id) {
                    continue;
                }
                let due = s.oldest_received_at_ms.saturating_add(linger);
                if s.count >= self.cfg.max_batch as u64 || due <= now {
                    if best.is_none_or(|(t, _)| s.oldest_received_at_ms < t) {
                        best = Some((s.oldest_received_at_ms, s.queue_id));
                    }
                } else {
                    next_due = Some(next_due.map_or(due, |d| d.min(due)));
                }
            }
            if let Some((_, q)) = best {
                return Some(q);
            }
            // Bounded wait: a wakeup lost between the summary and the wait
            // costs at most one linger period.
            let wait = next_due
                .map(|d| Duration::from_millis(d.saturating_sub(now).max(1)))
                .unwrap_or(Duration::from_millis(linger.max(50)));
            tokio::select! {
                _ = self.outbox.ready_notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return None,
            }
        }
    }

    /// Deliver one claimed batch to a definite outcome (or until `abort`).
    /// `resumed`: the batch was persisted by an earlier run, which may have
    /// sent it (a crash between the POST and its answer).
    async fn deliver(
        &self,
        batch: Batch,
        first_permit: Option<Permit>,
        resumed: bool,
        abort: CancellationToken,
    ) {
        let mut permit = first_permit;
        // An earlier run's attempts may have happened any time between the
        // claim and this run's start (that run was gone by then).
        let mut earlier_run = resumed.then(|| {
            let claimed = SystemTime::UNIX_EPOCH + Duration::from_millis(batch.created_at_ms);
            (claimed, Some(SystemTime::now()))
        });
        let mut stack = vec![batch];
        while let Some(b) = stack.pop() {
            let body = encode_batch(&b, &self.cfg.batch_label_key);
            let mut schedule = self.retry.new_schedule();
            // When the last attempt that may have been carried out was out
            // (start, end; no end: up to now).
            let mut maybe_committed: Option<(SystemTime, Option<SystemTime>)> = earlier_run.take();
            loop {
                if let Some((start, end)) = maybe_committed {
                    // Not while holding a create permit: the listing takes
                    // its own.
                    drop(permit.take());
                    let attempt = (start, end.unwrap_or_else(SystemTime::now));
                    match self.reconcile(&b, attempt, &mut stack, &abort).await {
                        Reconciled::Done => break,
                        Reconciled::Send => maybe_committed = None,
                        Reconciled::Failed => {
                            self.pause(&mut schedule, &abort).await;
                            continue;
                        }
                        Reconciled::Aborted => return,
                    }
                }
                let p = match permit.take() {
                    Some(p) => p,
                    None => tokio::select! {
                        p = self.gate.acquire(RequestClass::Create) => p,
                        _ = abort.cancelled() => return,
                    },
                };
                let attempt = self.outbox.record_attempt(b.id).unwrap_or(0);
                let started = std::time::Instant::now();
                let sent_at = SystemTime::now();
                let res = tokio::select! {
                    r = self.client.create_cases_raw(b.queue_id, body.clone(), Some(&b.idempotency_key)) => r,
                    _ = abort.cancelled() => return,
                };
                metrics::histogram!("duvo_bridge_api_request_seconds", "endpoint" => "create_cases")
                    .record(started.elapsed().as_secs_f64());
                match res {
                    Ok(resp) => {
                        let mut fb = ServerFeedback::from_info(&resp.rate, SystemTime::now());
                        fb.status = Some(resp.status.as_u16());
                        p.observe(&fb);
                        count_request(&self.gate.account(), &resp.status.as_u16().to_string());
                        let ids: Vec<Uuid> = resp.body.added_cases.iter().map(|c| c.id).collect();
                        let created_at = resp.body.added_cases.iter().map(|c| c.created_at).min();
                        if let Some(c) = created_at {
                            self.clock.observe(sent_at, SystemTime::now(), c);
                        }
                        if ids.len() != b.events.len() {
                            tracing::error!(
                                batch = b.id,
                                sent = b.events.len(),
                                answered = ids.len(),
                                "API answered a different number of cases than sent; looking for the batch's cases before sending again"
                            );
                            maybe_committed = Some(widen(maybe_committed, sent_at));
                            self.pause(&mut schedule, &abort).await;
                            continue;
                        }
                        self.settle(&b, &ids, created_at, &abort).await;
                        break;
                    }
                    Err(e) => {
                        match e.rate() {
                            Some(rate) => {
                                let mut fb = ServerFeedback::from_info(rate, SystemTime::now());
                                fb.status = e.status().map(|s| s.as_u16());
                                p.observe(&fb);
                            }
                            None => drop(p),
                        }
                        let outcome = e
                            .status()
                            .map(|s| s.as_u16().to_string())
                            .unwrap_or_else(|| "transport_error".into());
                        count_request(&self.gate.account(), &outcome);
                        if e.may_have_committed() {
                            maybe_committed = Some(widen(maybe_committed, sent_at));
                        }
                        if e.status().map(|s| s.as_u16()) == Some(429) {
                            metrics::counter!("duvo_bridge_api_rate_limited_total",
                                "account" => self.gate.account().to_string())
                            .increment(1);
                        }
                        match classify(&e) {
                            Verdict::Invalid => {
                                self.isolate(&b, &e, &mut stack, &abort).await;
                                break;
                            }
                            Verdict::Retry => {
                                let level_error = matches!(
                                    e.status().map(|s| s.as_u16()),
                                    Some(401 | 403 | 404 | 409)
                                );
                                if level_error {
                                    let status = e.status().map_or(0, |s| s.as_u16());
                                    tracing::error!(batch = b.id, attempt, status, queue = %b.queue_id,
                                        account = %self.gate.account(),
                                        "{}; the events wait in the outbox and are retried with backoff",
                                        refusal_fix(status));
                                } else {
                                    tracing::warn!(batch = b.id, attempt, error = %e, "transient failure; retrying with the same idempotency key");
                                }
                                if e.status().map(|s| s.as_u16()) != Some(429) {
                                    self.pause(&mut schedule, &abort).await;
                                }
                                if abort.is_cancelled() {
                                    return;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Bytes a claimed batch may hold: the request budget less the batch
    /// label every case gets.
    fn claim_budget(&self) -> usize {
        self.cfg
            .max_batch_bytes
            .saturating_sub(self.cfg.max_batch * self.cfg.batch_label_overhead())
    }

    /// Look for `b`'s cases created while an attempt made within `attempt`
    /// (local clock) may have been carried out, and settle what is there.
    async fn reconcile(
        &self,
        b: &Batch,
        attempt: (SystemTime, SystemTime),
        stack: &mut Vec<Batch>,
        abort: &CancellationToken,
    ) -> Reconciled {
        let label = &self.cfg.batch_label_key;
        let found = tokio::select! {
            r = reconcile::find_batch(&self.client, &self.gate, label, b, &self.clock, attempt, self.retry) => r,
            _ = abort.cancelled() => return Reconciled::Aborted,
        };
        let found = match found {
            Ok(f) => f,
            Err(e) => {
                metrics::counter!("duvo_bridge_reconciliations_total", "outcome" => "listing_failed")
                    .increment(1);
                tracing::warn!(batch = b.id, error = %e,
                    "cannot list the queue to look for the batch's cases; retrying before any re-send");
                return Reconciled::Failed;
            }
        };
        if found.extra > 0 {
            metrics::counter!("duvo_bridge_reconcile_surplus_cases_total")
                .increment(found.extra as u64);
            tracing::error!(batch = b.id, surplus = found.extra, key = %b.idempotency_key,
                "the queue holds more cases labelled with this batch than it has events: an earlier attempt was created twice (outside this bridge's control, e.g. a server ignoring Idempotency-Key before this bridge version)");
        }
        let n = found.count();
        let created_at = found.cases.iter().flatten().map(|c| c.created_at).min();
        let outcome = match n {
            0 => "none_found",
            n if n == b.events.len() => "all_found",
            _ => "some_found",
        };
        metrics::counter!("duvo_bridge_reconciliations_total", "outcome" => outcome).increment(1);
        tracing::info!(
            batch = b.id,
            found = n,
            of = b.events.len(),
            pages = found.pages,
            "looked for the batch's cases before sending it again"
        );
        if n == 0 {
            return Reconciled::Send;
        }
        if let Some(ids) = reconcile::all_ids(&found) {
            self.settle(b, &ids, created_at, abort).await;
            return Reconciled::Done;
        }
        let present: std::collections::HashSet<EventId> = b
            .events
            .iter()
            .zip(&found.cases)
            .filter(|(_, c)| c.is_some())
            .map(|((id, _), _)| *id)
            .collect();
        let ids: Vec<Uuid> = found.cases.iter().flatten().map(|c| c.id).collect();
        loop {
            match self.outbox.split_off(b, &present).await {
                Ok((there, missing)) => {
                    self.settle(&there, &ids, created_at, abort).await;
                    stack.push(missing);
                    return Reconciled::Done;
                }
                Err(err) => {
                    tracing::error!(error = %err, batch = b.id, "cannot split off the found cases; retrying in 1 s");
                    if sleep_or_abort(Duration::from_secs(1), abort).await {
                        return Reconciled::Aborted;
                    }
                }
            }
        }
    }

    async fn pause(&self, schedule: &mut crate::retry::RetrySchedule, abort: &CancellationToken) {
        let d = schedule.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = abort.cancelled() => {}
        }
    }

    /// A refused batch: split it, or dead-letter a lone event.
    async fn isolate(
        &self,
        b: &Batch,
        e: &ApiError,
        stack: &mut Vec<Batch>,
        abort: &CancellationToken,
    ) {
        if b.events.len() > 1 {
            loop {
                match self.outbox.split_batch(b).await {
                    Ok((left, right)) => {
                        metrics::counter!("duvo_bridge_batch_splits_total").increment(1);
                        tracing::warn!(batch = b.id, size = b.events.len(), error = %e,
                            "batch refused as invalid; splitting to isolate the bad event(s)");
                        stack.push(right);
                        stack.push(left);
                        return;
                    }
                    Err(err) => {
                        tracing::error!(error = %err, batch = b.id, "cannot split batch; retrying in 1 s");
                        if sleep_or_abort(Duration::from_secs(1), abort).await {
                            return;
                        }
                    }
                }
            }
        }
        let (status, error, message) = match e {
            ApiError::Status { status, body, .. } => {
                (status.as_u16(), body.error.clone(), body.message.clone())
            }
            other => (
                other.status().map(|s| s.as_u16()).unwrap_or(0),
                "error".into(),
                other.to_string(),
            ),
        };
        loop {
            match self.outbox.reject(b, status, &error, &message).await {
                Ok(()) => {
                    metrics::counter!("duvo_bridge_dead_letters_total").increment(1);
                    tracing::warn!(event = %b.events[0].0, status, error = %error, message = %message,
                        "event refused by the API; kept in the dead-letter tree");
                    return;
                }
                Err(err) => {
                    tracing::error!(error = %err, batch = b.id, "cannot dead-letter event; retrying in 1 s");
                    if sleep_or_abort(Duration::from_secs(1), abort).await {
                        return;
                    }
                }
            }
        }
    }

    async fn settle(
        &self,
        b: &Batch,
        ids: &[Uuid],
        created_at: Option<chrono::DateTime<chrono::Utc>>,
        abort: &CancellationToken,
    ) {
        loop {
            match self.outbox.settle_delivered_at(b, ids, created_at).await {
                Ok(()) => {
                    let account = self.gate.account().to_string();
                    metrics::counter!("duvo_bridge_batches_sent_total", "account" => account.clone())
                        .increment(1);
                    metrics::counter!("duvo_bridge_cases_created_total",
                        "queue" => b.queue_id.to_string(), "account" => account)
                    .increment(ids.len() as u64);
                    metrics::histogram!("duvo_bridge_batch_size").record(ids.len() as f64);
                    let now = now_ms();
                    let h = metrics::histogram!("duvo_bridge_end_to_end_seconds");
                    for (id, _) in &b.events {
                        if let Ok(Some(v)) = self.outbox.get(*id) {
                            h.record(now.saturating_sub(v.received_at_ms) as f64 / 1000.0);
                        }
                    }
                    return;
                }
                Err(err) => {
                    // The cases exist; if we die here the batch is re-sent
                    // with the same key and the server replays the answer.
                    tracing::error!(error = %err, batch = b.id, "cannot settle delivered batch; retrying in 1 s");
                    if sleep_or_abort(Duration::from_secs(1), abort).await {
                        return;
                    }
                }
            }
        }
    }
}

/// What an operator should do about a refusal splitting cannot fix.
fn refusal_fix(status: u16) -> &'static str {
    match status {
        401 => {
            "Duvo refused the API key (401): set a valid key for this account (duvo.api_key_env or [[duvo.accounts]])"
        }
        403 => {
            "the API key may not create cases in this queue (403): grant it access, or deliver the queue with the account that owns it"
        }
        404 => {
            "the queue does not exist for this API key (404): check the source's queue_id (`duvo-bridge validate --online` checks every queue)"
        }
        _ => "Duvo refused the request with a conflict (409)",
    }
}

/// The span of attempts that may have been carried out, extended by one
/// that started at `start` and ended now.
fn widen(
    span: Option<(SystemTime, Option<SystemTime>)>,
    start: SystemTime,
) -> (SystemTime, Option<SystemTime>) {
    let now = SystemTime::now();
    match span {
        Some((first, end)) => (first, end.map(|e| e.max(now))),
        None => (start, Some(now)),
    }
}

fn count_request(account: &str, outcome: &str) {
    metrics::counter!("duvo_bridge_api_requests_total", "endpoint" => "create_cases",
        "outcome" => outcome.to_string(), "account" => account.to_string())
    .increment(1);
}

/// Sleep; true when aborted instead.
async fn sleep_or_abort(d: Duration, abort: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = abort.cancelled() => true,
    }
}
