//! The report dispatcher: for every source with a reporter, sends the
//! source's pending reports (a few at once) until their targets acknowledge
//! them, and only then removes them from the outbox. A target that fails
//! backs off as a destination (see [`run_source`]): its reports wait in the
//! outbox, not in a send slot, so they never block reports to other targets.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ReportError, Reporter};
use crate::outbox::{Outbox, OutboxError};
use crate::retry::{RetryPolicy, RetrySchedule};

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

/// How many pending ids one look-up in the outbox's index walks at most
/// (the index lock is held meanwhile). The reports of backing-off
/// destinations are skipped by walking past them in steps of this size,
/// with a cursor (see [`run_source`]), so a dead target with a huge backlog
/// costs neither a long lock nor a full walk per filled slot.
/// (Small in unit tests, so that they walk past held reports in steps.)
const LOOKAHEAD: usize = if cfg!(test) { 64 } else { 4096 };

/// Reports whose destination is read from disk per fill before the loop
/// yields to other tasks (the destination of an id is then cached).
const READS_PER_YIELD: usize = 256;

/// A destination whose last send failed: nothing goes to it until `until`,
/// then one report at a time (a probe) until one is acknowledged.
struct Backoff {
    /// The destination's own schedule: advanced per failed probe, dropped
    /// (so reset) when a send to the destination is acknowledged.
    schedule: RetrySchedule,
    until: Instant,
    /// The report sent as the probe, while it is in flight.
    probe: Option<u64>,
    /// Known pending reports to this destination, held back (not in a slot).
    held: BTreeSet<u64>,
}

/// How one send of one report ended.
enum Outcome {
    /// Acknowledged and removed from the outbox.
    Done,
    /// Not in the outbox any more (nothing was sent).
    Gone,
    /// Not acknowledged; the report stays pending.
    Failed { error: ReportError, attempt: u32 },
    /// The record cannot be decoded; it is left on disk and skipped.
    Corrupt,
    /// Not acknowledged and older than its reporter allows: moved to the
    /// dead reports.
    GivenUp,
    /// `abort` fired during the send.
    Aborted,
}

/// What a send task returns: the report's destination (when it could be
/// read) and how the send ended.
type Sent = (Option<Arc<str>>, Outcome);

/// One source's dispatcher loop.
///
/// A failed send does not keep its slot while it waits to be retried:
/// retrying inside the slot let a few reports to a dead target (e.g. a
/// per-event callback URL nobody answers) hold every slot of the source
/// and block its reports to healthy targets. Instead the report's
/// *destination* ([`Reporter::destination`]) backs off: the report goes
/// back to the pending set, the destination gets a deadline from its own
/// exponential schedule, and reports to it are skipped when slots are
/// filled. When the deadline passes one report to it is sent (a probe): if
/// it fails, the destination backs off longer; once one is acknowledged the
/// destination's schedule is dropped and all its reports are eligible
/// again. So a dead target with thousands of pending reports costs one
/// attempt per backoff period, and probes use at most half the slots.
/// Reports stay in the outbox throughout: only an acknowledgement removes
/// one.
async fn run_source(
    outbox: Outbox,
    source: String,
    reporter: Arc<dyn Reporter>,
    cfg: DispatchConfig,
    stop: CancellationToken,
    abort: CancellationToken,
) {
    let backing_off = metrics::gauge!("duvo_bridge_report_destinations_backing_off",
        "source" => source.clone());
    let mut d = SourceDispatch::new(outbox.clone(), source, reporter, cfg, abort.clone());
    loop {
        let now = Instant::now();
        if !stop.is_cancelled() {
            d.fill_slots(now).await;
        } else if d.sends.is_empty() {
            backing_off.set(0.0);
            return;
        }
        backing_off.set(d.parked.len() as f64);
        // Wake for the earliest deadline of a destination with no probe out.
        let wake = d
            .parked
            .values()
            .filter(|b| b.probe.is_none() && b.until > now)
            .map(|b| b.until)
            .min();
        tokio::select! {
            Some(done) = d.sends.join_next_with_id(), if !d.sends.is_empty() => {
                let (task, sent) = match done {
                    Ok((task, sent)) => (task, Some(sent)),
                    Err(e) => {
                        tracing::error!(error = %e, "report send task failed; its report stays in the outbox");
                        (e.id(), None)
                    }
                };
                d.finished(task, sent);
            }
            _ = async { tokio::time::sleep_until(wake.unwrap_or(now)).await }, if wake.is_some() && !stop.is_cancelled() => {}
            _ = outbox.reports_notified(), if !stop.is_cancelled() => d.cursor = 0,
            _ = stop.cancelled(), if !stop.is_cancelled() => {}
            _ = abort.cancelled() => {
                d.sends.shutdown().await;
                backing_off.set(0.0);
                return;
            }
        }
    }
}

/// The state of one source's dispatcher between two turns of its loop.
struct SourceDispatch {
    outbox: Outbox,
    source: String,
    reporter: Arc<dyn Reporter>,
    cfg: DispatchConfig,
    abort: CancellationToken,
    in_flight: HashSet<u64>,
    tasks: HashMap<tokio::task::Id, u64>,
    sends: JoinSet<Sent>,
    /// Destination of each pending report seen so far (read once from disk).
    dest_of: HashMap<u64, Arc<str>>,
    parked: HashMap<Arc<str>, Backoff>,
    /// Union of every `Backoff::held`, for the scan's skip test.
    held: HashSet<u64>,
    /// Ids that cannot be read (corrupt, or indexed but missing): skipped
    /// until the next start instead of being picked up again at once.
    broken: HashSet<u64>,
    /// Every pending id below `cursor` is in flight, held or broken: filling
    /// slots resumes there, so the held backlog of a dead destination is not
    /// walked again for every slot. Reset to 0 whenever an id below it may
    /// have become eligible: new reports announced (ids may be announced out
    /// of order), a destination's held reports released, a send task lost.
    cursor: u64,
}

impl SourceDispatch {
    fn new(
        outbox: Outbox,
        source: String,
        reporter: Arc<dyn Reporter>,
        cfg: DispatchConfig,
        abort: CancellationToken,
    ) -> SourceDispatch {
        SourceDispatch {
            outbox,
            source,
            reporter,
            cfg,
            abort,
            in_flight: HashSet::new(),
            tasks: HashMap::new(),
            sends: JoinSet::new(),
            dest_of: HashMap::new(),
            parked: HashMap::new(),
            held: HashSet::new(),
            broken: HashSet::new(),
            cursor: 0,
        }
    }

    /// Start sending report `id` in a free slot.
    fn spawn(&mut self, id: u64) {
        self.in_flight.insert(id);
        let outbox = self.outbox.clone();
        let reporter = self.reporter.clone();
        let abort = self.abort.clone();
        let retry = self.cfg.retry;
        let handle = self
            .sends
            .spawn(async move { send_once(&outbox, &*reporter, id, retry, &abort).await });
        self.tasks.insert(handle.id(), id);
    }

    /// Fill the free slots: probes of due destinations first, then the
    /// oldest reports whose destination is not backing off.
    async fn fill_slots(&mut self, now: Instant) {
        let mut room = self.cfg.concurrency.saturating_sub(self.in_flight.len());
        // Probes first: one report per destination whose deadline passed,
        // in at most half the slots, so that many dead destinations
        // (whose probes may each hang until the send times out) cannot
        // take every slot from the reports to healthy ones.
        let probe_cap = (self.cfg.concurrency / 2).max(1);
        let mut probes = self.parked.values().filter(|b| b.probe.is_some()).count();
        let mut due = Vec::new();
        for b in self.parked.values_mut() {
            if room == 0 || probes >= probe_cap {
                break;
            }
            if b.probe.is_none()
                && b.until <= now
                && let Some(id) = b.held.pop_first()
            {
                b.probe = Some(id);
                due.push(id);
                room -= 1;
                probes += 1;
            }
        }
        for id in due {
            self.held.remove(&id);
            self.spawn(id);
        }
        // A due destination with nothing known to send is forgotten.
        self.parked
            .retain(|_, b| b.probe.is_some() || !b.held.is_empty() || b.until > now);
        let mut reads = 0;
        while room > 0 {
            let (candidates, last) = {
                let (in_flight, held, broken) = (&self.in_flight, &self.held, &self.broken);
                self.outbox.pending_report_ids_where(
                    &self.source,
                    self.cursor,
                    room,
                    LOOKAHEAD,
                    |id| in_flight.contains(&id) || held.contains(&id) || broken.contains(&id),
                )
            };
            let Some(last) = last else { break };
            self.cursor = last.saturating_add(1);
            if candidates.is_empty() {
                // A whole step of skipped ids: let others run, go on.
                tokio::task::yield_now().await;
                continue;
            }
            for id in candidates {
                let dest = match self.dest_of.get(&id) {
                    Some(d) => Some(d.clone()),
                    None => {
                        reads += 1;
                        match self.read_destination(id) {
                            Ok(d) => d,
                            Err(()) => continue,
                        }
                    }
                };
                if let Some(b) = dest.as_ref().and_then(|d| self.parked.get_mut(d)) {
                    if b.probe.is_none() && b.until <= now && probes < probe_cap {
                        b.probe = Some(id);
                        probes += 1;
                    } else {
                        b.held.insert(id);
                        self.held.insert(id);
                        continue;
                    }
                }
                self.spawn(id);
                room -= 1;
            }
            if reads >= READS_PER_YIELD {
                reads = 0;
                tokio::task::yield_now().await;
            }
        }
    }

    /// The destination of report `id`, read from disk and cached; `Err`
    /// when the report cannot be read (it is marked broken and skipped);
    /// `Ok(None)` on a read error worth sending anyway (the send retries
    /// the read).
    fn read_destination(&mut self, id: u64) -> Result<Option<Arc<str>>, ()> {
        match self.outbox.report(id) {
            Ok(Some(r)) => {
                let d: Arc<str> = self.reporter.destination(&r).into();
                self.dest_of.insert(id, d.clone());
                Ok(Some(d))
            }
            Ok(None) => {
                self.broken.insert(id);
                Err(())
            }
            Err(e @ OutboxError::Corrupt { .. }) => {
                tracing::error!(report = id, error = %e, "corrupt report record; left on disk");
                self.broken.insert(id);
                Err(())
            }
            Err(_) => Ok(None),
        }
    }

    /// A send task ended (`None`: it panicked or was cancelled).
    fn finished(&mut self, task: tokio::task::Id, sent: Option<Sent>) {
        let Some(id) = self.tasks.remove(&task) else {
            return;
        };
        let (dest, outcome) = match sent {
            Some((dest, outcome)) => (dest, Some(outcome)),
            None => {
                self.cursor = 0;
                (None, None)
            }
        };
        self.in_flight.remove(&id);
        let dest = dest.or_else(|| self.dest_of.get(&id).cloned());
        let mut was_probe = false;
        if let Some(b) = dest.as_ref().and_then(|d| self.parked.get_mut(d))
            && b.probe == Some(id)
        {
            b.probe = None;
            was_probe = true;
        }
        let kind = self.reporter.kind();
        match outcome {
            Some(Outcome::Done) => {
                self.dest_of.remove(&id);
                metrics::counter!("duvo_bridge_reports_sent_total",
                    "source" => self.source.clone(), "kind" => kind)
                .increment(1);
                // The destination works: its backlog is eligible again.
                if let Some(b) = dest.as_ref().and_then(|d| self.parked.remove(d)) {
                    for h in &b.held {
                        self.held.remove(h);
                    }
                    self.cursor = 0;
                    tracing::info!(source = %self.source, destination = %dest.as_deref().unwrap_or(""),
                        released = b.held.len(), "report destination acknowledged again");
                }
            }
            Some(Outcome::Failed { error, attempt }) => {
                metrics::counter!("duvo_bridge_report_send_failures_total",
                    "source" => self.source.clone(), "kind" => kind)
                .increment(1);
                self.back_off(id, dest, was_probe, &error, attempt);
            }
            Some(Outcome::Gone) => {
                self.dest_of.remove(&id);
            }
            Some(Outcome::GivenUp) => {
                self.dest_of.remove(&id);
                metrics::counter!("duvo_bridge_reports_given_up_total",
                    "source" => self.source.clone(), "kind" => kind)
                .increment(1);
                // Its destination stays parked; the next of its backlog is
                // probed at once (each gets one last try, and is given up
                // on in turn when as old), not one per backoff period.
                if let Some(b) = dest.as_ref().and_then(|d| self.parked.get_mut(d)) {
                    b.held.remove(&id);
                    if was_probe {
                        b.until = Instant::now();
                    }
                }
                self.held.remove(&id);
            }
            Some(Outcome::Corrupt) => {
                self.dest_of.remove(&id);
                self.broken.insert(id);
            }
            Some(Outcome::Aborted) | None => {}
        }
    }

    /// Report `id` was not acknowledged: hold it, and park its destination.
    fn back_off(
        &mut self,
        id: u64,
        dest: Option<Arc<str>>,
        was_probe: bool,
        error: &ReportError,
        attempt: u32,
    ) {
        let dest = dest.unwrap_or_else(|| Arc::from(""));
        let now = Instant::now();
        let fresh = !self.parked.contains_key(&dest);
        let retry = self.cfg.retry;
        let b = self.parked.entry(dest.clone()).or_insert_with(|| Backoff {
            schedule: retry.new_schedule(),
            until: now,
            probe: None,
            held: BTreeSet::new(),
        });
        // A send that started before the destination was parked does not
        // lengthen the backoff again, unless the deadline passed meanwhile
        // (it then counts as the probe).
        if fresh || was_probe || (b.probe.is_none() && b.until <= now) {
            b.until = now + b.schedule.next_delay();
        }
        b.held.insert(id);
        self.held.insert(id);
        let retry_in_ms = b.until.saturating_duration_since(now).as_millis() as u64;
        let source = &self.source;
        match error {
            ReportError::NoDestination(_) => tracing::error!(report = id, %source, attempt,
                destination = %dest, error = %error, retry_in_ms,
                "report cannot be addressed; kept and retried"),
            _ => tracing::warn!(report = id, %source, attempt, destination = %dest,
                error = %error, retry_in_ms,
                "report not acknowledged; its destination backs off, the report is kept"),
        }
    }
}

/// Send one report once; on acknowledgement remove it from the outbox.
/// Returns the report's destination (when it could be read) and the
/// outcome. Retries here only what is local (reading the record, removing
/// it once acknowledged); a target's failure is the caller's to back off.
async fn send_once(
    outbox: &Outbox,
    reporter: &dyn Reporter,
    id: u64,
    retry: RetryPolicy,
    abort: &CancellationToken,
) -> (Option<Arc<str>>, Outcome) {
    let mut schedule = retry.new_schedule();
    let report = loop {
        match outbox.report(id) {
            Ok(Some(r)) => break r,
            Ok(None) => return (None, Outcome::Gone),
            Err(e @ OutboxError::Corrupt { .. }) => {
                tracing::error!(report = id, error = %e, "corrupt report record; left on disk");
                return (None, Outcome::Corrupt);
            }
            Err(e) => {
                tracing::error!(report = id, error = %e, "cannot read report; retrying");
                if sleep_or_abort(schedule.next_delay(), abort).await {
                    return (None, Outcome::Aborted);
                }
            }
        }
    };
    let dest: Arc<str> = reporter.destination(&report).into();
    let attempt = outbox
        .record_report_attempt(id)
        .unwrap_or(report.attempts + 1);
    let res = tokio::select! {
        r = reporter.send(&report) => r,
        _ = abort.cancelled() => return (Some(dest), Outcome::Aborted),
    };
    if let Err(error) = res {
        let age_ms = crate::clock::now_ms().saturating_sub(report.created_at_ms);
        if let Some(limit) = reporter.give_up_after(&report)
            && u128::from(age_ms) >= limit.as_millis()
        {
            match outbox.bury_report(id, &error.to_string()).await {
                Ok(()) | Err(OutboxError::UnknownReport(_)) => {
                    tracing::error!(report = id, source = %report.source, event = %report.event_id,
                        destination = %dest, attempt, error = %error, age_secs = age_ms / 1000,
                        "report given up on: its destination failed for longer than allowed; kept as a dead report");
                    return (Some(dest), Outcome::GivenUp);
                }
                Err(e) => tracing::error!(report = id, error = %e,
                    "cannot set the report aside; it stays pending"),
            }
        }
        return (Some(dest), Outcome::Failed { error, attempt });
    }
    tracing::info!(report = id, source = %report.source, event = %report.event_id,
        case = report.case_id.map(tracing::field::display), status = %report.status, attempt,
        "failure report acknowledged");
    loop {
        match outbox.settle_report(id).await {
            Ok(()) | Err(OutboxError::UnknownReport(_)) => return (Some(dest), Outcome::Done),
            Err(e) => {
                tracing::error!(report = id, error = %e,
                    "cannot remove an acknowledged report; retrying (a restart would resend it with the same id)");
                if sleep_or_abort(Duration::from_secs(1), abort).await {
                    return (Some(dest), Outcome::Aborted);
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    use super::*;
    use crate::outbox::{EventId, OutboxConfig};
    use crate::report::{Report, ReportStatus};

    /// A reporter whose destination is the report's title; sends to the
    /// destinations in `dead` fail. Counts attempts per destination.
    #[derive(Default)]
    struct Fake {
        dead: Mutex<BTreeSet<String>>,
        attempts: Mutex<HashMap<String, u32>>,
        /// Destinations starting with `client` get this life (a URL a
        /// client chose).
        give_up: Option<Duration>,
    }

    impl Reporter for Fake {
        fn kind(&self) -> &'static str {
            "fake"
        }
        fn send<'a>(
            &'a self,
            report: &'a Report,
        ) -> futures::future::BoxFuture<'a, Result<(), ReportError>> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                *self
                    .attempts
                    .lock()
                    .unwrap()
                    .entry(report.title.clone())
                    .or_default() += 1;
                if self.dead.lock().unwrap().contains(&report.title) {
                    Err(ReportError::Unreachable("dead".into()))
                } else {
                    Ok(())
                }
            })
        }
        fn destination(&self, report: &Report) -> String {
            report.title.clone()
        }
        fn give_up_after(&self, report: &Report) -> Option<Duration> {
            self.give_up.filter(|_| report.title.starts_with("client"))
        }
    }

    /// Like [`Fake`], but a send to a dead destination hangs for a while
    /// before failing (a callback that times out).
    struct Slow(Fake);

    impl Reporter for Slow {
        fn kind(&self) -> &'static str {
            "slow"
        }
        fn send<'a>(
            &'a self,
            report: &'a Report,
        ) -> futures::future::BoxFuture<'a, Result<(), ReportError>> {
            Box::pin(async move {
                if report.title.starts_with("dead") {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                self.0.send(report).await
            })
        }
        fn destination(&self, report: &Report) -> String {
            report.title.clone()
        }
    }

    /// Run a dispatcher of 4 slots for source `src` with `reporter`,
    /// retrying from `initial_ms` up to `max_ms`: its stop and abort tokens
    /// and its task.
    fn dispatch(
        outbox: &Outbox,
        reporter: Arc<dyn Reporter>,
        initial_ms: u64,
        max_ms: u64,
    ) -> (
        CancellationToken,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let cfg = DispatchConfig {
            concurrency: 4,
            retry: RetryPolicy {
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(max_ms),
                ..RetryPolicy::default()
            },
        };
        let (stop, abort) = (CancellationToken::new(), CancellationToken::new());
        let reporters = BTreeMap::from([("src".to_string(), reporter)]);
        let run = tokio::spawn(
            ReportDispatcher::new(outbox.clone(), reporters, cfg).run(stop.clone(), abort.clone()),
        );
        (stop, abort, run)
    }

    fn report(id: u64, dest: &str) -> Report {
        Report {
            id,
            source: "src".into(),
            event_id: EventId(id),
            origin: None,
            queue_id: uuid::Uuid::nil(),
            case_id: None,
            status: ReportStatus::Failed,
            reason: None,
            case_updated_at: None,
            title: dest.into(),
            event: None,
            created_at_ms: 0,
            attempts: 0,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_destination_backs_off_as_a_whole_and_blocks_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(OutboxConfig::new(dir.path().join("db")))
            .await
            .unwrap();
        // 200 reports to a dead destination first, then 20 to a healthy one.
        for id in 1..=200 {
            outbox.insert_report_for_test(&report(id, "dead"));
        }
        for id in 201..=220 {
            outbox.insert_report_for_test(&report(id, "alive"));
        }
        let fake = Arc::new(Fake::default());
        fake.dead.lock().unwrap().insert("dead".into());
        let (stop, _abort, run) = dispatch(&outbox, fake.clone(), 50, 200);
        let pending = |outbox: &Outbox| outbox.pending_reports().get("src").copied().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while pending(&outbox) > 200 {
            assert!(
                Instant::now() < deadline,
                "healthy reports stuck behind dead ones"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Let the dead destination go through a few backoff rounds.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let dead_attempts = fake.attempts.lock().unwrap()["dead"];
        assert_eq!(pending(&outbox), 200, "failed reports stay pending");
        // 4 at the start (before the first failure parks it), then one probe
        // per backoff period (35, 70, 140 ms, then >= 140 ms with jitter):
        // about 20 at most. Four slots each retrying on their own, as before,
        // would make about 40; one attempt per report would make 200.
        assert!(
            dead_attempts <= 25,
            "{dead_attempts} attempts at a dead destination in 1.5 s"
        );
        assert_eq!(fake.attempts.lock().unwrap()["alive"], 20);
        // The destination comes back: its whole backlog goes out.
        fake.dead.lock().unwrap().clear();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pending(&outbox) > 0 {
            assert!(Instant::now() < deadline, "backlog not sent after recovery");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("the dispatcher stops once nothing is in flight")
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probes_of_many_dead_destinations_leave_slots_for_healthy_ones() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(OutboxConfig::new(dir.path().join("db")))
            .await
            .unwrap();
        // 30 distinct dead destinations, each send to them hanging 300 ms.
        for id in 1..=30 {
            outbox.insert_report_for_test(&report(id, &format!("dead-{id}")));
        }
        let slow = Arc::new(Slow(Fake::default()));
        for id in 1..=30 {
            slow.0.dead.lock().unwrap().insert(format!("dead-{id}"));
        }
        let (stop, abort, run) = dispatch(&outbox, slow.clone(), 20, 50);
        // Every dead destination has failed once and is due again and again.
        tokio::time::sleep(Duration::from_millis(3000)).await;
        for id in 31..=40 {
            outbox.insert_report_for_test(&report(id, "alive"));
        }
        let started = Instant::now();
        let pending = |outbox: &Outbox| outbox.pending_reports().get("src").copied().unwrap_or(0);
        while pending(&outbox) > 30 {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "healthy reports starved by probes: {} pending",
                pending(&outbox)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        abort.cancel();
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_to_a_dead_client_url_are_given_up_after_their_life_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(OutboxConfig::new(dir.path().join("db")))
            .await
            .unwrap();
        let now = crate::clock::now_ms();
        // Old reports to a dead client URL, a fresh one to it, and old ones
        // to the operator's own dead target (retried forever).
        for id in 1..=30 {
            outbox.insert_report_for_test(&report(id, "client-dead"));
        }
        let mut fresh = report(31, "client-dead");
        fresh.created_at_ms = now;
        outbox.insert_report_for_test(&fresh);
        for id in 32..=40 {
            outbox.insert_report_for_test(&report(id, "operator-dead"));
        }
        let fake = Arc::new(Fake {
            give_up: Some(Duration::from_secs(3600)),
            ..Fake::default()
        });
        fake.dead
            .lock()
            .unwrap()
            .extend(["client-dead".to_string(), "operator-dead".to_string()]);
        let (stop, _abort, run) = dispatch(&outbox, fake.clone(), 50, 200);
        let deadline = Instant::now() + Duration::from_secs(10);
        while outbox.dead_reports().unwrap().len() < 30 {
            assert!(Instant::now() < deadline, "old client reports not given up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let dead = outbox.dead_reports().unwrap();
        assert_eq!(
            dead.iter().map(|d| d.report.id).collect::<Vec<_>>(),
            (1..=30).collect::<Vec<_>>(),
            "exactly the old client reports, each kept whole"
        );
        assert!(dead.iter().all(|d| d.error.contains("dead")), "{dead:?}");
        // Each had one last try; the fresh one and the operator's stay.
        let attempts = fake.attempts.lock().unwrap()["client-dead"];
        assert!(attempts >= 30, "{attempts}");
        let pending = outbox.pending_report_ids("src", 100, &BTreeSet::new());
        assert_eq!(pending, (31..=40).collect::<Vec<_>>());
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .unwrap()
            .unwrap();
    }
}
