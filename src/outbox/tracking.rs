//! Case tracking inside the outbox: which delivered cases are still
//! followed, where each queue's listing resumes (the watermark), and the
//! atomic application of one listing page (transitions, reports, forgotten
//! cases, new watermark in one sled batch).
//!
//! Polling and pacing live in [`crate::track`]; this module only keeps the
//! state durable and consistent, so a crash anywhere re-reads a page and
//! reaches the same outcome without reporting a transition twice.

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use uuid::Uuid;

use super::callbacks::{self, CallbackRefs};
use super::record::EventRecord;
use super::record::{
    DEADLINE_PREFIX, Watermark, case_key, deadline_key, deadline_key_id, encode, event_key,
    expiry_key, report_key, watermark_key,
};
use super::reports::{Report, ReportStatus};
use super::types::{
    EventState, ListingOutcome, ListingStream, OutboxError, QueueTracking, TrackPhase, Tracking,
    Transition,
};
use super::{EventId, Outbox, lock};
use crate::clock::now_ms;
use crate::duvo::{Case, CaseStatus};

/// Tracked cases per queue, rebuilt from the event records at open.
#[derive(Debug, Default)]
pub(crate) struct TrackIndex {
    queues: HashMap<Uuid, QueueTracking>,
}

impl TrackIndex {
    fn entry(&mut self, queue_id: Uuid) -> &mut QueueTracking {
        self.queues.entry(queue_id).or_insert(QueueTracking {
            queue_id,
            ..QueueTracking::default()
        })
    }

    pub fn count(&mut self, queue_id: Uuid, phase: TrackPhase) {
        let e = self.entry(queue_id);
        match phase {
            TrackPhase::Open => e.open += 1,
            TrackPhase::Watching => e.watching += 1,
            TrackPhase::Done => {}
        }
    }

    pub fn add_open(&mut self, queue_id: Uuid, n: u64) {
        self.entry(queue_id).open += n;
    }

    fn moved(&mut self, queue_id: Uuid, from: TrackPhase, to: TrackPhase) {
        if from == to {
            return;
        }
        let e = self.entry(queue_id);
        match from {
            TrackPhase::Open => e.open = e.open.saturating_sub(1),
            TrackPhase::Watching => e.watching = e.watching.saturating_sub(1),
            TrackPhase::Done => {}
        }
        match to {
            TrackPhase::Open => e.open += 1,
            TrackPhase::Watching => e.watching += 1,
            TrackPhase::Done => {}
        }
        if e.open == 0 && e.watching == 0 {
            self.queues.remove(&queue_id);
        }
    }

    pub fn total(&self) -> u64 {
        self.queues.values().map(|q| q.open + q.watching).sum()
    }

    fn totals(&self) -> (u64, u64) {
        self.queues
            .values()
            .fold((0, 0), |(o, w), q| (o + q.open, w + q.watching))
    }

    fn snapshot(&self) -> Vec<QueueTracking> {
        let mut v: Vec<QueueTracking> = self
            .queues
            .values()
            .filter(|q| q.open + q.watching > 0)
            .copied()
            .collect();
        v.sort_by_key(|q| q.queue_id);
        v
    }
}

/// What [`Outbox::expire_tracking`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExpireOutcome {
    /// Open cases past their TTL (reported `expired` where configured).
    pub expired: u64,
    /// Watched (failed/canceled) cases past their TTL, forgotten silently.
    pub forgotten: u64,
    /// Reports created.
    pub reports: u64,
}

/// The status a listed case is reported under: its stored status when
/// terminal, else the derived filters it matched (`needs_input`,
/// `postponed`). `None` for a plain pending/claimed case.
pub fn effective_status(case: &Case) -> Option<CaseStatus> {
    if case.status.is_terminal() {
        Some(case.status)
    } else if case.pending_human_request_id.is_some() {
        Some(CaseStatus::NeedsInput)
    } else if case.postponed_to.is_some() {
        Some(CaseStatus::Postponed)
    } else {
        None
    }
}

fn report_status(status: CaseStatus) -> Option<ReportStatus> {
    Some(match status {
        CaseStatus::Failed => ReportStatus::Failed,
        CaseStatus::Canceled => ReportStatus::Canceled,
        CaseStatus::Completed => ReportStatus::Completed,
        CaseStatus::NeedsInput => ReportStatus::NeedsInput,
        CaseStatus::Postponed => ReportStatus::Postponed,
        CaseStatus::Pending | CaseStatus::Claimed => return None,
    })
}

/// A human-readable reason: the API has no failure-reason field, so we say
/// what we know (status, agent run status, postponement, human request).
fn reason_for(case: &Case, status: CaseStatus) -> String {
    let mut r = format!("case {status}");
    if let Some(run) = case
        .agent_run_status
        .as_deref()
        .filter(|r| *r != status.as_str())
    {
        r.push_str(&format!(" (agent run {run})"));
    }
    if status == CaseStatus::Postponed
        && let Some(t) = case.postponed_to
    {
        r.push_str(&format!(
            " until {}",
            t.to_rfc3339_opts(SecondsFormat::Secs, true)
        ));
    }
    if status == CaseStatus::NeedsInput
        && let Some(h) = &case.pending_human_request_id
    {
        r.push_str(&format!(" (human request {h})"));
    }
    r
}

impl Outbox {
    /// Queues with tracked cases (open or watched), by queue id.
    pub fn tracked_queues(&self) -> Vec<QueueTracking> {
        lock(&self.inner.track).snapshot()
    }

    /// Take the point a stream must read again from, if a batch settled
    /// after the stream's watermark had passed its cases' creation.
    pub fn take_rewind(&self, queue_id: Uuid, stream: ListingStream) -> Option<DateTime<Utc>> {
        lock(&self.inner.rewinds).remove(&(queue_id, stream))
    }

    /// Cases sent back to pending by a re-drive (`cases retry`): those
    /// this outbox still follows become open again with a fresh TTL, so
    /// their next ending is seen and reported like the first. Returns
    /// (followed again, not followed: unknown here or past their TTL).
    /// Returns once durable.
    pub async fn rearm_tracking(&self, case_ids: &[Uuid]) -> Result<(u64, u64), OutboxError> {
        let Some(policy) = self.inner.cfg.tracking.as_ref() else {
            return Ok((0, case_ids.len() as u64));
        };
        let ttl_ms = u64::try_from(policy.ttl.as_millis()).unwrap_or(u64::MAX);
        let (mut followed, mut not) = (0u64, 0u64);
        {
            let _t = lock(&self.inner.track_lock);
            let now = now_ms();
            let mut sb = sled::Batch::default();
            let mut moves = Vec::new();
            for case_id in case_ids {
                let ck = case_key(*case_id);
                let Some(raw) = self.inner.st().events.get(ck)? else {
                    not += 1;
                    continue;
                };
                let id: u64 = match self.decode_logged(&ck, &raw) {
                    Ok(id) => id,
                    Err(OutboxError::Corrupt { .. }) => {
                        not += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let Some(mut ev) = self.read_event(id)? else {
                    not += 1;
                    continue;
                };
                let Some(tr) = ev.tracking.as_mut().filter(|t| t.phase != TrackPhase::Done) else {
                    not += 1;
                    continue;
                };
                let deadline = now.saturating_add(ttl_ms);
                sb.remove(&deadline_key(tr.deadline_ms, id)[..]);
                sb.insert(&deadline_key(deadline, id)[..], encode(&())?);
                tr.deadline_ms = deadline;
                moves.push((ev.queue_id, tr.phase, TrackPhase::Open));
                tr.phase = TrackPhase::Open;
                sb.insert(&event_key(id)[..], encode(&ev)?);
                followed += 1;
            }
            self.inner.st().events.apply_batch(sb)?;
            self.apply_moves(&moves);
        }
        self.inner.flush.wait_durable().await?;
        self.publish_tracking();
        Ok((followed, not))
    }

    /// Whether tracking is configured.
    pub fn tracking_enabled(&self) -> bool {
        self.inner.cfg.tracking.is_some()
    }

    /// The listing watermark of a queue: every transition before it has
    /// been applied. `None` when the queue was never tracked.
    pub fn watermark(
        &self,
        queue_id: Uuid,
        stream: ListingStream,
    ) -> Result<Option<DateTime<Utc>>, OutboxError> {
        let key = watermark_key(queue_id, stream);
        match self.inner.st().events.get(key)? {
            Some(raw) => Ok(Some(
                self.decode_logged::<Watermark>(&key, &raw)?.updated_at,
            )),
            None => Ok(None),
        }
    }

    /// Apply one page of a listing of `queue_id` (terminal and flagged
    /// cases, ascending `updated_at`) and move the stream's watermark to
    /// `watermark` (never backwards), in one atomic sled batch, then wait for
    /// the flush. Which statuses a stream lists is the tracker's business;
    /// any status on any stream is applied the same way.
    ///
    /// Cases not created by this bridge, or no longer followed, are skipped.
    /// For a followed case, a (status, `updated_at`) pair already in its
    /// history is a re-read and changes nothing; a new one is recorded and,
    /// where the policy says so, produces a report:
    /// - `completed`: the case is forgotten (tombstone until `retention`);
    /// - `failed`/`canceled`: watched, because a retry in Duvo can make it
    ///   fail again, which is a new transition and is reported again;
    /// - `needs_input`/`postponed`: still open.
    pub async fn apply_listing(
        &self,
        queue_id: Uuid,
        stream: ListingStream,
        cases: &[Case],
        watermark: DateTime<Utc>,
    ) -> Result<ListingOutcome, OutboxError> {
        let Some(policy) = self.inner.cfg.tracking.as_ref() else {
            return Err(OutboxError::Invalid("case tracking is off".into()));
        };
        let mut outcome = ListingOutcome::default();
        let mut reports = Vec::new();
        {
            let _t = lock(&self.inner.track_lock);
            // A rewind the tracker has not taken yet caps what is persisted,
            // so a crash before it is taken still reads again from there.
            let watermark = match lock(&self.inner.rewinds).get(&(queue_id, stream)) {
                Some(r) => watermark.min(*r),
                None => watermark,
            };
            let now = now_ms();
            let mut sb = sled::Batch::default();
            let mut callbacks = CallbackRefs::default();
            let mut moves = Vec::new();
            for case in cases {
                let ck = case_key(case.id);
                let Some(raw) = self.inner.st().events.get(ck)? else {
                    continue;
                };
                let id: u64 = match self.decode_logged(&ck, &raw) {
                    Ok(id) => id,
                    Err(OutboxError::Corrupt { .. }) => continue,
                    Err(e) => return Err(e),
                };
                let Some(mut ev) = self.read_event(id)? else {
                    tracing::warn!(case_id = %case.id, event_id = id, "tracked case without its event; forgetting it");
                    sb.remove(&ck[..]);
                    continue;
                };
                let Some(mut tr) = ev.tracking.take() else {
                    continue;
                };
                if tr.phase == TrackPhase::Done {
                    continue;
                }
                outcome.ours += 1;
                let Some(status) = effective_status(case) else {
                    continue;
                };
                let known = tr
                    .history
                    .iter()
                    .any(|t| t.status == status && t.updated_at == case.updated_at);
                let stale = tr.last().is_some_and(|t| case.updated_at < t.updated_at);
                if known || stale {
                    continue;
                }
                let rs = report_status(status);
                let reported = rs.is_some_and(|rs| policy.reports(&ev.source, rs));
                tr.history.push(Transition {
                    status,
                    updated_at: case.updated_at,
                    seen_at_ms: now,
                    reported,
                });
                if tr.history.len() > Tracking::HISTORY_MAX {
                    let cut = tr.history.len() - Tracking::HISTORY_MAX;
                    tr.history.drain(..cut);
                }
                outcome.transitions += 1;
                if let (true, Some(rs)) = (reported, rs) {
                    let r = self.new_report(
                        id,
                        &ev,
                        Some(case.id),
                        rs,
                        reason_for(case, status),
                        Some(case.updated_at),
                        now,
                    )?;
                    sb.insert(&report_key(r.id)[..], encode(&r)?);
                    reports.push(r);
                }
                let from = tr.phase;
                match status {
                    CaseStatus::Completed => {
                        tr.phase = TrackPhase::Done;
                        sb.remove(&ck[..]);
                        sb.remove(&deadline_key(tr.deadline_ms, id)[..]);
                        sb.insert(&expiry_key(now, id)[..], encode(&())?);
                        ev.case = None;
                        callbacks.release(ev.origin.as_ref());
                        ev.origin = None;
                        outcome.finished += 1;
                    }
                    CaseStatus::Failed | CaseStatus::Canceled => tr.phase = TrackPhase::Watching,
                    _ => tr.phase = TrackPhase::Open,
                }
                moves.push((queue_id, from, tr.phase));
                ev.tracking = Some(tr);
                sb.insert(&event_key(id)[..], encode(&ev)?);
            }
            let wk = watermark_key(queue_id, stream);
            let current = match self.inner.st().events.get(wk)? {
                Some(raw) => self
                    .decode_logged::<Watermark>(&wk, &raw)
                    .ok()
                    .map(|w| w.updated_at),
                None => None,
            };
            if current.is_none_or(|c| watermark > c) {
                sb.insert(
                    &wk[..],
                    encode(&Watermark {
                        updated_at: watermark,
                    })?,
                );
            }
            let _c =
                callbacks.write(&self.inner.callback_lock, &self.inner.st().events, &mut sb)?;
            self.inner.st().events.apply_batch(sb)?;
            self.apply_moves(&moves);
        }
        outcome.reports = reports.len() as u64;
        self.announce_when_durable(reports).await?;
        Ok(outcome)
    }

    fn apply_moves(&self, moves: &[(Uuid, TrackPhase, TrackPhase)]) {
        let mut ix = lock(&self.inner.track);
        for (queue_id, from, to) in moves {
            ix.moved(*queue_id, *from, *to);
        }
    }

    /// Wait for the flush covering a tracking change, then hand its reports
    /// to the dispatcher. Announced only once durable: a report sent before
    /// the change that made it is on disk could be re-created under a new
    /// id after a crash.
    pub(crate) async fn announce_when_durable(
        &self,
        reports: Vec<Report>,
    ) -> Result<(), OutboxError> {
        self.publish_tracking();
        let flushed = self.inner.flush.wait_durable().await;
        self.note_reports_created(&reports);
        flushed
    }

    /// A report about event `id` (its record `ev`), with a fresh id.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new_report(
        &self,
        id: u64,
        ev: &EventRecord,
        case_id: Option<Uuid>,
        status: ReportStatus,
        reason: String,
        case_updated_at: Option<DateTime<Utc>>,
        now_ms: u64,
    ) -> Result<Report, OutboxError> {
        Ok(Report {
            id: self.inner.st().generate_id()?,
            source: ev.source.clone(),
            event_id: EventId(id),
            origin: callbacks::resolve(&self.inner.st().events, ev.origin.as_ref()),
            queue_id: ev.queue_id,
            case_id,
            status,
            reason: Some(reason),
            case_updated_at: case_updated_at
                .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            title: ev.title.clone(),
            event: ev.case.as_ref().and_then(|c| c.data.clone()),
            created_at_ms: now_ms,
            attempts: 0,
        })
    }

    /// Handle tracked cases whose TTL ran out before `now_ms` (at most
    /// `max` of them): an open case is reported `expired` (for sources with
    /// a reporter) and forgotten; a watched failed/canceled one is forgotten
    /// silently. Waits for the flush.
    pub async fn expire_tracking(
        &self,
        now_ms: u64,
        max: usize,
    ) -> Result<ExpireOutcome, OutboxError> {
        let Some(policy) = self.inner.cfg.tracking.as_ref() else {
            return Ok(ExpireOutcome::default());
        };
        let mut out = ExpireOutcome::default();
        let mut reports = Vec::new();
        {
            let _t = lock(&self.inner.track_lock);
            let range = deadline_key(0, 0)..=deadline_key(now_ms, u64::MAX);
            let mut sb = sled::Batch::default();
            let mut callbacks = CallbackRefs::default();
            let mut moves = Vec::new();
            let mut seen = 0usize;
            for item in self.inner.st().events.range(range) {
                if seen >= max {
                    break;
                }
                seen += 1;
                let (key, _) = item?;
                debug_assert_eq!(key.first(), Some(&DEADLINE_PREFIX));
                sb.remove(key.clone());
                let Some(id) = deadline_key_id(&key) else {
                    continue;
                };
                let mut ev = match self.read_event(id) {
                    Ok(Some(ev)) => ev,
                    Ok(None) | Err(OutboxError::Corrupt { .. }) => continue,
                    Err(e) => return Err(e),
                };
                let Some(mut tr) = ev.tracking.take() else {
                    continue;
                };
                let from = tr.phase;
                if from == TrackPhase::Done {
                    continue;
                }
                if let EventState::Delivered { case_id, .. } = &ev.state {
                    sb.remove(&case_key(*case_id)[..]);
                    if from == TrackPhase::Open {
                        out.expired += 1;
                        if policy.reports(&ev.source, ReportStatus::Expired) {
                            let r = self.new_report(
                                id,
                                &ev,
                                Some(*case_id),
                                ReportStatus::Expired,
                                format!(
                                    "case not finished {} h after it was created",
                                    policy.ttl.as_secs() / 3600
                                ),
                                tr.last().map(|t| t.updated_at),
                                now_ms,
                            )?;
                            sb.insert(&report_key(r.id)[..], encode(&r)?);
                            reports.push(r);
                        }
                    } else {
                        out.forgotten += 1;
                    }
                }
                tr.phase = TrackPhase::Done;
                moves.push((ev.queue_id, from, TrackPhase::Done));
                ev.tracking = Some(tr);
                ev.case = None;
                callbacks.release(ev.origin.as_ref());
                ev.origin = None;
                sb.insert(&expiry_key(now_ms, id)[..], encode(&())?);
                sb.insert(&event_key(id)[..], encode(&ev)?);
            }
            if seen == 0 {
                return Ok(out);
            }
            let _c =
                callbacks.write(&self.inner.callback_lock, &self.inner.st().events, &mut sb)?;
            self.inner.st().events.apply_batch(sb)?;
            self.apply_moves(&moves);
        }
        out.reports = reports.len() as u64;
        self.announce_when_durable(reports).await?;
        Ok(out)
    }

    pub(crate) fn publish_tracking(&self) {
        let (open, watching) = lock(&self.inner.track).totals();
        metrics::gauge!("duvo_bridge_tracked_cases", "phase" => "open").set(open as f64);
        metrics::gauge!("duvo_bridge_tracked_cases", "phase" => "watching").set(watching as f64);
    }
}
