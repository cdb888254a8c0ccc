//! The report dispatcher: for every source with a reporter, sends the
//! source's pending reports (a few at once), retries each one with backoff
//! until its target acknowledges it, and only then removes it from the
//! outbox.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ReportError, Reporter};
use crate::deliver::retry::RetryPolicy;
use crate::outbox::{Outbox, OutboxError};

/// Dispatcher settings.
#[derive(Debug, Clone, Copy)]
pub struct DispatchConfig {
    /// Reports in flight at once per source.
    pub concurrency: usize,
    pub retry: RetryPolicy,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            concurrency: 8,
            retry: RetryPolicy {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(60),
                ..RetryPolicy::default()
            },
        }
    }
}

/// Sends reports for every source that has a reporter.
pub struct ReportDispatcher {
    outbox: Outbox,
    reporters: BTreeMap<String, Arc<dyn Reporter>>,
    cfg: DispatchConfig,
}

impl ReportDispatcher {
    pub fn new(
        outbox: Outbox,
        reporters: BTreeMap<String, Arc<dyn Reporter>>,
        cfg: DispatchConfig,
    ) -> Self {
        ReportDispatcher {
            outbox,
            reporters,
            cfg,
        }
    }

    /// Run until `stop`; then let sends in flight finish until `abort`.
    /// Whatever is not acknowledged stays in the outbox for the next start.
    pub async fn run(self, stop: CancellationToken, abort: CancellationToken) {
        let tasks = TaskTracker::new();
        let pending = self.outbox.pending_reports();
        for (source, n) in &pending {
            if !self.reporters.contains_key(source) {
                tracing::warn!(%source, pending = n,
                    "reports are pending for a source that has no reporter now; they stay in the outbox");
            }
        }
        for (source, reporter) in self.reporters {
            let outbox = self.outbox.clone();
            let cfg = self.cfg;
            let stop = stop.clone();
            let abort = abort.clone();
            tasks.spawn(run_source(outbox, source, reporter, cfg, stop, abort));
        }
        tasks.close();
        tasks.wait().await;
    }
}

async fn run_source(
    outbox: Outbox,
    source: String,
    reporter: Arc<dyn Reporter>,
    cfg: DispatchConfig,
    stop: CancellationToken,
    abort: CancellationToken,
) {
    let mut in_flight: BTreeSet<u64> = BTreeSet::new();
    let mut tasks: HashMap<tokio::task::Id, u64> = HashMap::new();
    let mut sends: JoinSet<()> = JoinSet::new();
    loop {
        if !stop.is_cancelled() {
            let room = cfg.concurrency.saturating_sub(in_flight.len());
            for id in outbox.pending_report_ids(&source, room, &in_flight) {
                in_flight.insert(id);
                let outbox = outbox.clone();
                let reporter = reporter.clone();
                let source = source.clone();
                let abort = abort.clone();
                let handle = sends.spawn(async move {
                    send_until_acknowledged(&outbox, &source, &*reporter, id, cfg.retry, &abort)
                        .await;
                });
                tasks.insert(handle.id(), id);
            }
        } else if sends.is_empty() {
            return;
        }
        tokio::select! {
            Some(done) = sends.join_next_with_id(), if !sends.is_empty() => {
                let task = match done {
                    Ok((task, ())) => task,
                    Err(e) => {
                        tracing::error!(error = %e, "report send task failed; its report stays in the outbox");
                        e.id()
                    }
                };
                if let Some(id) = tasks.remove(&task) {
                    in_flight.remove(&id);
                }
            }
            _ = outbox.reports_notified(), if !stop.is_cancelled() => {}
            _ = stop.cancelled(), if !stop.is_cancelled() => {}
            _ = abort.cancelled() => {
                sends.shutdown().await;
                return;
            }
        }
    }
}

/// Send one report until the target acknowledges it, then remove it.
async fn send_until_acknowledged(
    outbox: &Outbox,
    source: &str,
    reporter: &dyn Reporter,
    id: u64,
    retry: RetryPolicy,
    abort: &CancellationToken,
) {
    let kind = reporter.kind();
    let mut schedule = retry.new_schedule();
    loop {
        let report = match outbox.report(id) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e @ OutboxError::Corrupt { .. }) => {
                tracing::error!(report = id, error = %e, "corrupt report record; left on disk");
                return;
            }
            Err(e) => {
                tracing::error!(report = id, error = %e, "cannot read report; retrying");
                if sleep_or_abort(schedule.next_delay(), abort).await {
                    return;
                }
                continue;
            }
        };
        let attempt = outbox
            .record_report_attempt(id)
            .unwrap_or(report.attempts + 1);
        let res = tokio::select! {
            r = reporter.send(&report) => r,
            _ = abort.cancelled() => return,
        };
        match res {
            Ok(()) => {
                metrics::counter!("duvo_bridge_reports_sent_total",
                    "source" => source.to_string(), "kind" => kind)
                .increment(1);
                tracing::info!(report = id, %source, event = %report.event_id,
                    case = ?report.case_id, status = %report.status, attempt,
                    "failure report acknowledged");
                loop {
                    match outbox.settle_report(id).await {
                        Ok(()) | Err(OutboxError::UnknownReport(_)) => return,
                        Err(e) => {
                            tracing::error!(report = id, error = %e,
                                "cannot remove an acknowledged report; retrying (a restart would resend it with the same id)");
                            if sleep_or_abort(Duration::from_secs(1), abort).await {
                                return;
                            }
                        }
                    }
                }
            }
            Err(e) => {
                metrics::counter!("duvo_bridge_report_send_failures_total",
                    "source" => source.to_string(), "kind" => kind)
                .increment(1);
                let delay = schedule.next_delay();
                match &e {
                    ReportError::NoDestination(_) => tracing::error!(report = id, %source, attempt,
                        error = %e, retry_in_ms = delay.as_millis() as u64, "report cannot be addressed; kept and retried"),
                    _ => tracing::warn!(report = id, %source, attempt, error = %e,
                        retry_in_ms = delay.as_millis() as u64, "report not acknowledged; retrying"),
                }
                if sleep_or_abort(delay, abort).await {
                    return;
                }
            }
        }
    }
}

async fn sleep_or_abort(d: Duration, abort: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = abort.cancelled() => true,
    }
}
