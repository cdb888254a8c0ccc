//! Rate gate behaviour on paused tokio time: pacing, retry-after deadlines,
//! the server window guard (against a simulated fixed-window server whose
//! window is out of phase with ours), adaptation, run-time rate changes,
//! request classes and cancel safety.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use duvo_bridge::deliver::gate::{Permit, RateGate, RateGateConfig, RequestClass, ServerFeedback};
use duvo_bridge::duvo::RateLimitInfo;
use tokio::time::{Instant, sleep, sleep_until, timeout};

const MS: fn(u64) -> Duration = Duration::from_millis;
const SECS: fn(u64) -> Duration = Duration::from_secs;

fn ok_feedback(remaining: u64, reset_in: Duration) -> ServerFeedback {
    ServerFeedback {
        status: Some(201),
        limit: Some(300),
        remaining: Some(remaining),
        reset_in: Some(reset_in),
        ..ServerFeedback::default()
    }
}

/// Defaults without probing of unknown windows: most tests hold several
/// permits without feedback to look at pacing alone.
fn unprobed() -> RateGateConfig {
    RateGateConfig {
        probe_unknown_window: false,
        ..RateGateConfig::default()
    }
}

async fn create(gate: &RateGate) -> Permit {
    gate.acquire(RequestClass::Create).await
}

/// Spawn a task that acquires once and reports when it was granted.
fn spawn_acquire(
    gate: &RateGate,
    class: RequestClass,
) -> tokio::task::JoinHandle<(Instant, Permit)> {
    let g = gate.clone();
    tokio::spawn(async move {
        let p = g.acquire(class).await;
        (Instant::now(), p)
    })
}

/// Let spawned tasks run until they block (paused time does not advance
/// while any task can make progress).
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

// ---------------------------------------------------------------- pacing

#[tokio::test(start_paused = true)]
async fn paces_evenly_after_a_small_burst() {
    let gate = RateGate::new(unprobed());
    let t0 = Instant::now();
    let end = t0 + SECS(60);
    let mut tasks = Vec::new();
    // Several concurrent acquirers must not beat the pace either.
    for _ in 0..4 {
        let g = gate.clone();
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            loop {
                let _p = g.acquire(RequestClass::Create).await;
                let now = Instant::now();
                if now >= end {
                    return times;
                }
                times.push(now - t0);
            }
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        times.extend(t.await.expect("acquirer task"));
    }
    times.sort();

    // 300 per minute plus the burst of 3, nothing more.
    assert!(
        (300..=303).contains(&times.len()),
        "granted {} in 60 s",
        times.len()
    );
    assert_eq!(&times[..3], &[Duration::ZERO; 3], "burst of 3 at start");
    // After the burst: one permit per 200 ms, evenly.
    for pair in times[2..].windows(2) {
        assert_eq!(pair[1] - pair[0], MS(200), "uneven gap at {:?}", pair[1]);
    }
    // No 200 ms span holds more than the burst.
    for (i, t) in times.iter().enumerate() {
        let in_span = times[i..].iter().take_while(|u| **u < *t + MS(200)).count();
        assert!(in_span <= 3, "{in_span} permits within 200 ms of {t:?}");
    }
    assert_eq!(gate.stats().granted_create, times.len() as u64 + 4);
}

// ----------------------------------------------------------- retry-after

#[tokio::test(start_paused = true)]
async fn retry_after_holds_back_everyone_including_earlier_waiters() {
    let gate = RateGate::new(unprobed());
    let t0 = Instant::now();
    let first = create(&gate).await;
    let _b = create(&gate).await;
    let _c = create(&gate).await;
    // Three acquisitions that start *before* the 429 arrives.
    let early: Vec<_> = (0..3)
        .map(|_| spawn_acquire(&gate, RequestClass::Create))
        .collect();
    settle().await;
    sleep(MS(50)).await;
    assert_eq!(gate.stats().waiting, 3);

    first.observe(&ServerFeedback {
        status: Some(429),
        retry_after_in: Some(SECS(5)),
        ..ServerFeedback::default()
    });
    let deadline = t0 + MS(50) + SECS(5);
    let late = create(&gate).await;
    let late_at = Instant::now();
    drop(late);

    let mut granted = vec![late_at];
    for h in early {
        granted.push(h.await.expect("waiter").0);
    }
    granted.sort();
    // Nothing before the deadline; the first right at it; then paced again
    // (no burst into a server that just pushed back).
    assert_eq!(
        granted,
        vec![
            deadline,
            deadline + MS(200),
            deadline + MS(400),
            deadline + MS(600)
        ]
    );
    let s = gate.stats();
    assert_eq!(s.throttled_responses, 1);
    assert_eq!(s.retry_after_waits, 4);
    assert!(s.retry_after_wait_secs >= 4.0 * 4.95, "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn a_429_without_retry_after_waits_one_second() {
    let gate = RateGate::new(unprobed());
    let t0 = Instant::now();
    let p = create(&gate).await;
    p.observe(&ServerFeedback {
        status: Some(429),
        ..ServerFeedback::default()
    });
    let _q = create(&gate).await;
    assert_eq!(Instant::now() - t0, SECS(1));
}

#[tokio::test(start_paused = true)]
async fn a_503_retry_after_is_honoured_and_deadlines_only_extend() {
    let gate = RateGate::new(unprobed());
    let t0 = Instant::now();
    let a = create(&gate).await;
    let b = create(&gate).await;
    a.observe(&ServerFeedback {
        status: Some(503),
        retry_after_in: Some(SECS(8)),
        ..ServerFeedback::default()
    });
    // A shorter deadline reported later does not shorten the first one.
    b.observe(&ServerFeedback {
        status: Some(429),
        retry_after_in: Some(SECS(2)),
        ..ServerFeedback::default()
    });
    let _c = create(&gate).await;
    assert_eq!(Instant::now() - t0, SECS(8));
}

// ---------------------------------------------------------- window guard

#[tokio::test(start_paused = true)]
async fn spent_window_holds_until_reset_plus_guard() {
    let gate = RateGate::new(unprobed());
    let t0 = Instant::now();
    let p = create(&gate).await;
    p.observe(&ok_feedback(0, SECS(7)));
    assert_eq!(gate.stats().remaining_estimate, Some(0));
    let _q = create(&gate).await;
    assert_eq!(Instant::now() - t0, SECS(7) + MS(100));
    let s = gate.stats();
    assert_eq!(s.window_waits, 1);
    assert!((s.window_wait_secs - 7.1).abs() < 1e-6, "{s:?}");
    // A fresh window: unknown until the server says otherwise.
    assert_eq!(s.remaining_estimate, None);
    assert_eq!(s.throttled_responses, 0);
}

#[tokio::test(start_paused = true)]
async fn window_estimate_counts_permits_in_flight() {
    let gate = RateGate::new(unprobed());
    let t0 = Instant::now();
    let p = create(&gate).await;
    p.observe(&ok_feedback(2, SECS(10)));
    // Two permits out use up the two remaining requests...
    let _one = create(&gate).await;
    let _two = create(&gate).await;
    assert_eq!(Instant::now(), t0);
    let s = gate.stats();
    assert_eq!((s.remaining_estimate, s.in_flight), (Some(0), 2));
    // ...so the third waits for the reset.
    let _three = create(&gate).await;
    assert_eq!(Instant::now() - t0, SECS(10) + MS(100));
}

#[tokio::test(start_paused = true)]
async fn reported_remaining_is_shared_with_requests_still_in_flight() {
    let gate = RateGate::new(unprobed());
    let t0 = Instant::now();
    let _a = create(&gate).await;
    let _b = create(&gate).await;
    let c = create(&gate).await;
    // The server has counted `c` but maybe not `a` and `b`: 2 left for all.
    c.observe(&ok_feedback(2, SECS(10)));
    assert_eq!(gate.stats().remaining_estimate, Some(0));
    let _d = create(&gate).await;
    assert_eq!(Instant::now() - t0, SECS(10) + MS(100));
}

#[tokio::test(start_paused = true)]
async fn dropped_permit_still_counts_against_the_window() {
    let gate = RateGate::new(unprobed());
    let p = create(&gate).await;
    p.observe(&ok_feedback(5, SECS(30)));
    let q = create(&gate).await;
    drop(q); // transport error: the request may have reached the server
    let s = gate.stats();
    assert_eq!((s.remaining_estimate, s.in_flight), (Some(4), 0));
}

// ------------------------------------------- out-of-phase fixed window server

/// A fixed-window rate limiter like the Duvo API's: `limit` requests per
/// `period`, window boundaries at `phase` after the test start, headers in
/// whole Unix seconds (reset rounded up, as a conforming server must).
struct FixedWindowServer {
    limit: u64,
    period: Duration,
    phase: Duration,
    start: Instant,
    wall0: SystemTime,
    window: i64,
    count: u64,
    accepted: BTreeMap<i64, u64>,
    rejected: u64,
}

impl FixedWindowServer {
    fn new(limit: u64, phase: Duration, start: Instant, wall0: SystemTime) -> Self {
        FixedWindowServer {
            limit,
            period: SECS(60),
            phase,
            start,
            wall0,
            window: i64::MIN,
            count: 0,
            accepted: BTreeMap::new(),
            rejected: 0,
        }
    }

    fn wall(&self, at: Instant) -> SystemTime {
        self.wall0 + (at - self.start)
    }

    fn window_of(&self, at: Instant) -> i64 {
        let since = (at - self.start).as_nanos() as i128 - self.phase.as_nanos() as i128;
        since.div_euclid(self.period.as_nanos() as i128) as i64
    }

    fn window_end(&self, k: i64) -> Instant {
        let offset =
            self.phase.as_nanos() as i128 + (k as i128 + 1) * self.period.as_nanos() as i128;
        self.start + Duration::from_nanos(offset as u64)
    }

    fn handle(&mut self, at: Instant) -> (u16, RateLimitInfo) {
        let k = self.window_of(at);
        if k != self.window {
            self.window = k;
            self.count = 0;
        }
        let end = self.window_end(k);
        let end_secs = ceil_secs(self.wall(end));
        let reset_at = UNIX_EPOCH + SECS(end_secs);
        if self.count >= self.limit {
            self.rejected += 1;
            let wait = (end - at).as_secs_f64().ceil() as u64;
            return (
                429,
                RateLimitInfo {
                    limit: Some(self.limit),
                    remaining: Some(0),
                    reset_at: Some(reset_at),
                    retry_after: Some(self.wall(at) + SECS(wait)),
                },
            );
        }
        self.count += 1;
        *self.accepted.entry(k).or_default() += 1;
        (
            201,
            RateLimitInfo {
                limit: Some(self.limit),
                remaining: Some(self.limit - self.count),
                reset_at: Some(reset_at),
                retry_after: None,
            },
        )
    }
}

fn ceil_secs(t: SystemTime) -> u64 {
    let d = t.duration_since(UNIX_EPOCH).expect("after epoch");
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// One party using the key in a simulation.
enum Party {
    /// A replica: its own gate, driven by `senders` concurrent loops.
    Replica { cfg: RateGateConfig, senders: usize },
    /// Someone outside our control using the same key at a steady rate
    /// (another tool, a human with curl); it ignores rate-limit headers.
    External { per_minute: u32 },
}

struct SimReport {
    /// Accepted requests (all parties) per server window that lay entirely
    /// inside the run.
    full_windows: Vec<u64>,
    /// Per replica: 429s for requests sent after that replica's first feedback.
    rejected_after_first_feedback: Vec<u64>,
    /// 429s for everyone, external parties included.
    rejected_total: u64,
    limit: u64,
    gates: Vec<RateGate>,
}

/// Run the parties against the simulated server for `minutes`, with a 40 ms
/// round trip for every request.
async fn simulate(limit: u64, phase: Duration, minutes: u64, parties: Vec<Party>) -> SimReport {
    let start = Instant::now();
    // A wall clock with a fractional second, so whole-second rounding bites.
    let wall0 = UNIX_EPOCH + Duration::from_nanos(1_800_000_000_370_000_000);
    let server = Arc::new(Mutex::new(FixedWindowServer::new(
        limit, phase, start, wall0,
    )));
    let until = start + SECS(60 * minutes);

    let mut gates = Vec::new();
    let mut rejected_counters = Vec::new();
    let mut tasks = Vec::new();
    for party in parties {
        match party {
            Party::Replica { cfg, senders } => {
                let gate = RateGate::new(cfg);
                let first_feedback: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
                let rejected_after = Arc::new(Mutex::new(0u64));
                for _ in 0..senders {
                    let (gate, server) = (gate.clone(), server.clone());
                    let (first_feedback, rejected_after) =
                        (first_feedback.clone(), rejected_after.clone());
                    tasks.push(tokio::spawn(async move {
                        loop {
                            let permit = gate.acquire(RequestClass::Create).await;
                            if Instant::now() >= until {
                                return;
                            }
                            let informed = first_feedback.lock().expect("lock").is_some();
                            sleep(MS(20)).await;
                            let (status, info) =
                                server.lock().expect("lock").handle(Instant::now());
                            if status == 429 && informed {
                                *rejected_after.lock().expect("lock") += 1;
                            }
                            sleep(MS(20)).await;
                            let now = Instant::now();
                            let wall = wall0 + (now - start);
                            first_feedback.lock().expect("lock").get_or_insert(now);
                            permit.observe(
                                &ServerFeedback::from_info(&info, wall).with_status(status),
                            );
                        }
                    }));
                }
                gates.push(gate);
                rejected_counters.push(rejected_after);
            }
            Party::External { per_minute } => {
                let server = server.clone();
                let every = Duration::from_secs_f64(60.0 / f64::from(per_minute));
                tasks.push(tokio::spawn(async move {
                    // Out of step with everyone else, too.
                    let mut next = start + MS(370);
                    while next < until {
                        sleep_until(next).await;
                        server.lock().expect("lock").handle(Instant::now());
                        next += every;
                    }
                }));
            }
        }
    }
    for t in tasks {
        t.await.expect("party task");
    }
    let server = server.lock().expect("lock");
    let full_windows = server
        .accepted
        .iter()
        .filter(|(k, _)| {
            let k = **k;
            k >= 0 && server.window_end(k) <= until && server.window_end(k - 1) >= start
        })
        .map(|(_, n)| *n)
        .collect();
    SimReport {
        full_windows,
        rejected_after_first_feedback: rejected_counters
            .iter()
            .map(|c| *c.lock().expect("lock"))
            .collect(),
        rejected_total: server.rejected,
        limit,
        gates,
    }
}

fn assert_no_429_and_full_use(r: &SimReport) {
    assert!(
        r.rejected_after_first_feedback.iter().all(|n| *n == 0),
        "server had to answer 429 to a replica: {:?}",
        r.rejected_after_first_feedback
    );
    assert!(
        r.full_windows.len() >= 4,
        "too few full windows: {:?}",
        r.full_windows
    );
    let floor = (r.limit as f64 * 0.95).ceil() as u64;
    for n in &r.full_windows {
        assert!(
            *n >= floor && *n <= r.limit,
            "window throughput {n} not in [{floor}, {}]: {:?}",
            r.limit,
            r.full_windows
        );
    }
    for g in &r.gates {
        assert_eq!(g.stats().throttled_responses, 0, "{:?}", g.stats());
    }
}

fn replica(rate_per_minute: u32, senders: usize) -> Party {
    Party::Replica {
        cfg: RateGateConfig {
            rate_per_minute,
            ..unprobed()
        },
        senders,
    }
}

#[tokio::test(start_paused = true)]
async fn out_of_phase_server_rate_equal_to_limit() {
    let r = simulate(300, MS(17_300), 6, vec![replica(300, 3)]).await;
    assert_no_429_and_full_use(&r);
    assert_eq!(r.rejected_total, 0);
}

#[tokio::test(start_paused = true)]
async fn out_of_phase_server_rate_above_limit() {
    let r = simulate(240, MS(41_730), 6, vec![replica(600, 3)]).await;
    assert_no_429_and_full_use(&r);
    // Adapted to the server's limit.
    let s = r.gates[0].stats();
    assert_eq!(s.server_limit, Some(240));
    assert!((s.effective_rpm - 240.0).abs() < 1e-9, "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn out_of_phase_server_with_small_limit_and_big_burst() {
    // A burst larger than the server's limit: only the window guard stands
    // between the first requests and a 429.
    let cfg = RateGateConfig {
        rate_per_minute: 300,
        burst: 20,
        ..unprobed()
    };
    let r = simulate(30, MS(5_900), 6, vec![Party::Replica { cfg, senders: 4 }]).await;
    assert_no_429_and_full_use(&r);
}

#[tokio::test(start_paused = true)]
async fn window_guard_absorbs_a_foreign_user_of_the_key() {
    // Pacing alone would send 300 + 150 per window: only the server-fed
    // estimate avoids 429s, and only with its reserve for the foreign
    // requests that arrive between two of our observations.
    let parties = vec![replica(300, 2), Party::External { per_minute: 150 }];
    let r = simulate(300, MS(23_450), 6, parties).await;
    assert_no_429_and_full_use(&r);
    let s = r.gates[0].stats();
    assert!(s.window_waits >= 5, "{s:?}");
    // The external party got the 429s, not us.
    assert!(r.rejected_total > 0);
}

#[tokio::test(start_paused = true)]
async fn replicas_sharing_a_key_split_it_without_429s() {
    let half = |senders| Party::Replica {
        cfg: RateGateConfig {
            share: 0.5,
            ..unprobed()
        },
        senders,
    };
    let r = simulate(300, MS(31_010), 6, vec![half(2), half(3)]).await;
    assert_no_429_and_full_use(&r);
    for g in &r.gates {
        assert_eq!(g.stats().effective_rpm, 150.0);
    }
}

// ------------------------------------------------------------ adaptation

#[tokio::test(start_paused = true)]
async fn adapts_to_a_lower_server_limit_never_above_configured() {
    let gate = RateGate::new(unprobed());
    let p = create(&gate).await;
    p.observe(&ServerFeedback {
        limit: Some(120),
        ..ok_feedback(100, SECS(30))
    });
    let s = gate.stats();
    assert_eq!(s.server_limit, Some(120));
    assert_eq!(s.effective_rpm, 120.0);
    let mut times = Vec::new();
    for _ in 0..6 {
        drop(create(&gate).await);
        times.push(Instant::now());
    }
    for pair in times[3..].windows(2) {
        assert_eq!(pair[1] - pair[0], MS(500));
    }

    // A higher limit never lifts us above the configured rate.
    let p = create(&gate).await;
    p.observe(&ServerFeedback {
        limit: Some(600),
        ..ok_feedback(500, SECS(30))
    });
    assert_eq!(gate.stats().effective_rpm, 300.0);
}

#[tokio::test(start_paused = true)]
async fn share_splits_the_server_limit_between_replicas() {
    let gate = RateGate::new(RateGateConfig {
        share: 0.5,
        ..unprobed()
    });
    // Before the server said anything: the configured rate.
    assert_eq!(gate.stats().effective_rpm, 300.0);
    let p = create(&gate).await;
    p.observe(&ok_feedback(299, SECS(30)));
    assert_eq!(gate.stats().effective_rpm, 150.0);
}

#[tokio::test(start_paused = true)]
async fn set_rate_applies_at_once_even_to_waiters() {
    let gate = RateGate::new(unprobed());
    let t0 = Instant::now();
    for _ in 0..3 {
        drop(create(&gate).await);
    }
    // Waiting for the 200 ms slot when the rate drops to 60/min.
    let waiter = spawn_acquire(&gate, RequestClass::Create);
    settle().await;
    gate.set_rate(60);
    assert_eq!(gate.stats().configured_rpm, 60);
    assert_eq!(gate.stats().effective_rpm, 60.0);
    let (at, p) = waiter.await.expect("waiter");
    drop(p);
    assert_eq!(at - t0, SECS(1));
    drop(create(&gate).await);
    assert_eq!(Instant::now() - t0, SECS(2));

    // And back up: 600/min is one per 100 ms.
    gate.set_rate(600);
    let before = Instant::now();
    let mut last = before;
    for _ in 0..10 {
        drop(create(&gate).await);
        last = Instant::now();
    }
    assert!(last - before <= SECS(1), "{:?}", last - before);
    let p1 = Instant::now();
    drop(create(&gate).await);
    assert_eq!(Instant::now() - p1, MS(100));
}

// --------------------------------------------------------- request classes

async fn run_classes(gate: &RateGate, creates: bool, tracks: bool, secs: u64) -> (u64, u64) {
    run_as(gate, creates, tracks.then_some(RequestClass::Track), secs).await
}

/// Loops of creates and of one tracking class (`Track` or `Poll`), each
/// always with a waiter queued; returns (creates, tracking) granted.
async fn run_as(
    gate: &RateGate,
    creates: bool,
    tracking: Option<RequestClass>,
    secs: u64,
) -> (u64, u64) {
    let end = Instant::now() + SECS(secs);
    let mut tasks = Vec::new();
    for (on, class) in [
        (creates, RequestClass::Create),
        (tracking.is_some(), tracking.unwrap_or(RequestClass::Track)),
    ] {
        if !on {
            continue;
        }
        // Two loops per class, so each class always has a waiter queued.
        for _ in 0..2 {
            let g = gate.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                loop {
                    let _p = g.acquire(class).await;
                    if Instant::now() >= end {
                        return (class, n);
                    }
                    n += 1;
                }
            }));
        }
    }
    let (mut c, mut t) = (0, 0);
    for task in tasks {
        match task.await.expect("class loop") {
            (RequestClass::Create, n) => c += n,
            (_, n) => t += n,
        }
    }
    (c, t)
}

#[tokio::test(start_paused = true)]
async fn tracking_is_capped_and_creates_are_not_starved() {
    let gate = RateGate::new(unprobed());
    let (creates, tracks) = run_classes(&gate, true, true, 120).await;
    let total = creates + tracks;
    assert!(total >= 600, "total {total}");
    // At most ~10 %; under a create backlog tracking still progresses.
    assert!(
        tracks as f64 <= total as f64 * 0.1 + 2.0,
        "tracks {tracks} of {total}"
    );
    assert!(tracks >= 20, "tracking starved: {tracks} of {total}");
    assert!(
        creates as f64 >= total as f64 * 0.9 - 2.0,
        "creates {creates} of {total}"
    );
}

#[tokio::test(start_paused = true)]
async fn speculative_polls_take_only_their_small_share_of_a_backlog() {
    let gate = RateGate::new(unprobed());
    let (creates, polls) = run_as(&gate, true, Some(RequestClass::Poll), 120).await;
    let total = creates + polls;
    assert!(total >= 600, "total {total}");
    // 0.5 % of 600 is 3: never starved, and creates keep >= 99 %.
    assert!((2..=5).contains(&polls), "polls {polls} of {total}");
    assert!(
        creates as f64 >= total as f64 * 0.99,
        "creates {creates} of {total}"
    );
    let s = gate.stats();
    assert_eq!(s.granted_poll, polls + 2, "the two loops' last permits");
}

#[tokio::test(start_paused = true)]
async fn tracking_alone_uses_the_idle_budget_and_keeps_a_permit_for_a_create() {
    let gate = RateGate::new(unprobed());
    let (creates, tracks) = run_classes(&gate, false, true, 60).await;
    assert_eq!(creates, 0);
    // Far above its 10 % share (30/min) with nothing else waiting; one
    // permit of the burst stays unused.
    assert!(tracks >= 290, "tracks {tracks}");
    assert!(!gate.creates_backlogged());
    // The tracker is still busy; a create that comes now has its permit.
    let g = gate.clone();
    let busy = tokio::spawn(async move {
        loop {
            let _p = g.acquire(RequestClass::Track).await;
        }
    });
    // Between two of the tracker's slots (200 ms apart).
    tokio::time::sleep(MS(5_100)).await;
    let t = Instant::now();
    drop(create(&gate).await);
    assert_eq!(Instant::now() - t, Duration::ZERO, "the create waited");
    busy.abort();
}

#[tokio::test(start_paused = true)]
async fn a_due_tracking_share_goes_ahead_of_waiting_creates_then_waits_its_interval() {
    let gate = RateGate::new(RateGateConfig {
        rate_per_minute: 60,
        burst: 1,
        ..unprobed()
    });
    let t0 = Instant::now();
    drop(create(&gate).await);
    // A create backlog, then the tracker: its share is due (it had none).
    let creates = tokio::spawn({
        let g = gate.clone();
        async move {
            let mut at = Vec::new();
            for _ in 0..12 {
                drop(g.acquire(RequestClass::Create).await);
                at.push(Instant::now());
            }
            at
        }
    });
    settle().await;
    let (t1, _p) = spawn_acquire(&gate, RequestClass::Track)
        .await
        .expect("track");
    assert_eq!(t1 - t0, SECS(1), "the due share takes the next slot");
    assert!(gate.creates_backlogged());
    // The next one waits its interval (10 % of 60/min: 10 s) behind the
    // creates.
    let (t2, _p) = spawn_acquire(&gate, RequestClass::Track)
        .await
        .expect("track");
    assert_eq!(t2 - t1, SECS(10));
    let at = creates.await.expect("creates");
    assert_eq!(at[0] - t0, SECS(2));
    let s = gate.stats();
    assert_eq!(s.granted_track, 2);
}

// ----------------------------------------------------------- cancel safety

#[tokio::test(start_paused = true)]
async fn cancelled_acquire_leaks_no_token_and_no_queue_slot() {
    let gate = RateGate::new(RateGateConfig {
        rate_per_minute: 60,
        burst: 1,
        ..unprobed()
    });
    let t0 = Instant::now();
    drop(create(&gate).await);

    // Given up after 300 ms: takes nothing.
    assert!(timeout(MS(300), create(&gate)).await.is_err());
    assert_eq!(gate.stats().waiting, 0);

    // A queued head that is aborted does not block the one behind it.
    let head = spawn_acquire(&gate, RequestClass::Create);
    settle().await;
    let behind = spawn_acquire(&gate, RequestClass::Create);
    settle().await;
    assert_eq!(gate.stats().waiting, 2);
    head.abort();
    assert!(head.await.is_err());
    let (at, p) = behind.await.expect("behind");
    assert_eq!(at - t0, SECS(1), "the slot at 1 s was not lost");
    drop(p);
    let s = gate.stats();
    assert_eq!((s.granted_create, s.in_flight, s.waiting), (2, 0, 0));

    // And the pace continues from there.
    sleep_until(t0 + MS(1500)).await;
    drop(create(&gate).await);
    assert_eq!(Instant::now() - t0, SECS(2));
}

#[tokio::test(start_paused = true)]
async fn learns_a_window_shorter_than_a_minute_from_consecutive_resets() {
    // Server: 20 requests per 2 s window (600/min); we are configured for
    // 6000/min. Before two windows were seen, the minute is assumed.
    let gate = RateGate::new(RateGateConfig {
        rate_per_minute: 6000,
        ..unprobed()
    });
    let p = create(&gate).await;
    p.observe(&ServerFeedback {
        limit: Some(20),
        ..ok_feedback(19, MS(1500))
    });
    assert_eq!(
        gate.stats().effective_rpm,
        20.0,
        "minute assumed mid-window"
    );
    tokio::time::sleep(MS(1600)).await;
    let p = create(&gate).await;
    // Next window ends 2 s after the previous one.
    p.observe(&ServerFeedback {
        limit: Some(20),
        ..ok_feedback(19, MS(1900))
    });
    assert_eq!(gate.stats().effective_rpm, 600.0);
}

#[tokio::test(start_paused = true)]
async fn two_429s_at_start_then_progress() {
    let gate = RateGate::new(RateGateConfig {
        rate_per_minute: 6000,
        ..unprobed()
    });
    let a = create(&gate).await;
    let b = create(&gate).await;
    let fb = ServerFeedback {
        status: Some(429),
        limit: Some(10),
        remaining: Some(0),
        reset_in: Some(MS(2500)),
        retry_after_in: Some(SECS(3)),
        ..ServerFeedback::default()
    };
    a.observe(&fb);
    b.observe(&fb);
    let t0 = Instant::now();
    let p = tokio::time::timeout(SECS(30), create(&gate)).await;
    eprintln!("{:?} after {:?}", gate.stats(), Instant::now() - t0);
    assert!(p.is_ok());
}

#[tokio::test(start_paused = true)]
async fn unknown_window_is_probed_by_one_request_before_others_follow() {
    let gate = RateGate::new(RateGateConfig::default());
    let first = create(&gate).await;
    // Burst would allow more, but nothing is known of the server's window.
    let second = spawn_acquire(&gate, RequestClass::Create);
    tokio::time::sleep(SECS(5)).await;
    assert!(
        !second.is_finished(),
        "second request must wait for the probe's answer"
    );
    first.observe(&ok_feedback(10, SECS(30)));
    let (_, p) = second.await.expect("granted after the answer");
    drop(p);
    // With the window known, the burst applies again.
    let t = Instant::now();
    let a = create(&gate).await;
    let b = create(&gate).await;
    assert!(Instant::now() - t <= MS(200));
    drop((a, b));
}
