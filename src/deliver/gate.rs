//! The rate gate: one per API key, shared by every sender using that key.
//!
//! The Duvo API allows 300 requests per minute per key, all endpoints counted
//! together, enforced by the server with a **fixed window** per key that it
//! describes in `x-ratelimit-{limit,remaining,reset}` headers, plus a
//! `retry-after` on 429. The gate has two goals that pull in opposite
//! directions: use the budget as fully as physics allows, and never make the
//! server say no. It combines four mechanisms:
//!
//! 1. **Even pacing (GCRA).** Permits are spaced `60 / R` seconds apart with a
//!    small burst tolerance (`burst`, default 3). We deliberately do *not*
//!    hand out a whole minute's quota at once: the server's window is not
//!    aligned with ours, and a minute's quota fired in one second at the end
//!    of its window plus another at the start of the next is how clients get
//!    429s. The bucket is a GCRA "theoretical arrival time", which makes a run
//!    time rate change a simple rescale (see [`RateGate::set_rate`]).
//! 2. **Hard deadlines.** A `retry-after` (on a 429, or a 503 that carries one)
//!    blocks *every* acquirer until the deadline, including those that were
//!    already waiting: waiters never hold a pre-computed slot, they re-check
//!    the gate's state each time they wake, so nothing leaves early. After the
//!    deadline the bucket restarts with a single permit (no burst into a
//!    server that just pushed back).
//! 3. **Server window guard.** Every grant decrements an estimate of the
//!    server's `remaining` for its current window; every response lowers the
//!    estimate to what the server reports (minus the other requests still in
//!    flight, which the server may not have counted yet). When the estimate
//!    hits zero, acquirers wait for the window's end plus `window_guard`; the
//!    estimate is then unknown until the next response. When the server's
//!    count drops faster than our own requests explain, someone else uses the
//!    key (another replica): we then keep as many requests in reserve at the
//!    end of a window as such foreign requests arrived between two of our
//!    observations, since our estimate cannot see them sooner. This is what keeps a
//!    server whose window is out of phase with our pacing from ever answering
//!    429, and what lets several replicas sharing a key notice each other.
//! 4. **Adaptation.** If the server announces a lower limit than configured,
//!    we pace at `limit * share` (never above the configured rate), and
//!    [`RateGate::set_rate`] changes the configured rate at run time (SIGHUP).
//!
//! Three request classes share the gate: [`RequestClass::Create`] (the
//! batcher), [`RequestClass::Track`] (a tracking listing that continues a
//! full page: known work) and [`RequestClass::Poll`] (a speculative tracking
//! listing, which may well come back empty). While a create waits, tracking
//! is held to its shares: a Track waiter gets a slot once per `1 /
//! track_share` of the rate, a Poll waiter once per `1 / poll_share` (and it
//! counts against the track share too); such a slot goes to the tracker
//! ahead of the creates, so tracking gets exactly its share, never starved,
//! and creates get the rest. When no create waits, tracking may use any slot
//! the shared bucket allows, but keeps one permit of the burst for the next
//! create, so an idle budget spent on listings costs a batch no latency.
//!
//! Why not the `governor` crate: its quota is fixed at construction, it has no
//! notion of an externally imposed deadline that must also hold back waiters
//! already queued, and it cannot take a budget fed by the server's headers.
//! Those three are the point of this module.
//!
//! Time: everything uses [`tokio::time::Instant`] and `sleep_until`, so tests
//! run on paused time. Wall-clock header values are converted to durations
//! "from now" once, by [`ServerFeedback::from_info`]; the gate itself only
//! sees durations. (Absolute `x-ratelimit-reset` values are exposed to clock
//! skew between us and the server; the window guard and the retry-after path
//! absorb small skews, the relative IETF `RateLimit-Reset` form avoids it.)

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};

use crate::duvo::RateLimitInfo;

/// Length of the server's window when it does not say otherwise: the API's
/// limit is documented "per minute".
pub const DEFAULT_SERVER_WINDOW: Duration = Duration::from_secs(60);

/// Retry-after assumed for a 429 that carries no `retry-after` header.
pub const DEFAULT_429_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Two reset instants closer than this belong to the same server window. The
/// server reports whole seconds (absolute, or relative for the IETF form), so
/// the same window seen by two responses can differ by up to about a second
/// plus latency; real windows are tens of seconds apart.
const SAME_WINDOW_TOLERANCE: Duration = Duration::from_millis(1500);

/// Upper bound for any server-imposed delay. A longer value is almost surely a
/// bogus header; capping keeps `Instant` arithmetic safe, and if the server
/// still means it, it will say so again on the next request.
const MAX_SERVER_DELAY: Duration = Duration::from_secs(24 * 3600);

/// The lowest pace the gate will ever compute (requests per minute); keeps the
/// interval arithmetic finite when a server announces a tiny limit.
const MIN_RPM: f64 = 0.01;

/// Upper bound of the end-of-window reserve kept when the key is shared (see
/// `State::safety_margin`); it is also at most a tenth of the server's limit.
const MAX_SAFETY_MARGIN: u64 = 10;

/// Which budget a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestClass {
    /// Case creation (the batcher): everything tracking leaves.
    Create,
    /// Tracking that continues a full page: while creates wait, at most
    /// `track_share` of the rate.
    Track,
    /// Speculative tracking (a listing that may find nothing): while
    /// creates wait, at most `poll_share` of the rate.
    Poll,
}

impl RequestClass {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestClass::Create => "create",
            RequestClass::Track => "track",
            RequestClass::Poll => "poll",
        }
    }
}

/// Why a [`RateGateConfig`] was rejected by [`RateGateConfig::validate`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GateConfigError {
    /// Zero requests per minute would stop delivery for good.
    #[error("rate_per_minute must be at least 1")]
    ZeroRate,
    /// A burst of zero would never grant anything.
    #[error("burst must be at least 1")]
    ZeroBurst,
    /// Share of the server's limit this replica may use, in `(0, 1]`.
    #[error("share must be a number in (0, 1], got {0}")]
    Share(f64),
    /// Share of the rate tracking may use, in `(0, 1]`.
    #[error("track_share must be a number in (0, 1], got {0}")]
    TrackShare(f64),
    /// Share of the rate speculative tracking may use, in `(0, 1]`.
    #[error("poll_share must be a number in (0, 1], got {0}")]
    PollShare(f64),
}

/// Rate gate settings. `Default`: 300/min, burst 3, share 1.0, track share
/// 0.1, poll share 0.005, window guard 100 ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateGateConfig {
    /// This replica's ceiling, requests per minute, all classes together.
    pub rate_per_minute: u32,
    /// Permits that may be granted back to back after an idle period.
    pub burst: u32,
    /// Fraction of the server-announced limit this replica may use when
    /// several replicas share a key (1.0: alone on the key).
    pub share: f64,
    /// Fraction of the effective rate tracking requests may use while
    /// creates wait.
    pub track_share: f64,
    /// Fraction of the effective rate speculative tracking requests
    /// ([`RequestClass::Poll`]) may use while creates wait.
    pub poll_share: f64,
    /// Extra wait after the server's window end before assuming a fresh
    /// window: covers the whole-second rounding of `reset`, latency and
    /// small clock differences.
    pub window_guard: Duration,
    /// While nothing is known of the server's current window (at start,
    /// after a window ended), let a single request in flight find out
    /// before others follow, so a window someone else already spent costs
    /// one 429 and never an early retry. On by default.
    pub probe_unknown_window: bool,
}

impl Default for RateGateConfig {
    fn default() -> Self {
        RateGateConfig {
            rate_per_minute: 300,
            burst: 3,
            share: 1.0,
            track_share: 0.1,
            poll_share: 0.005,
            window_guard: Duration::from_millis(100),
            probe_unknown_window: true,
        }
    }
}

impl RateGateConfig {
    /// Check the settings; meant for config validation at startup.
    pub fn validate(&self) -> Result<(), GateConfigError> {
        if self.rate_per_minute == 0 {
            return Err(GateConfigError::ZeroRate);
        }
        if self.burst == 0 {
            return Err(GateConfigError::ZeroBurst);
        }
        if !(self.share.is_finite() && self.share > 0.0 && self.share <= 1.0) {
            return Err(GateConfigError::Share(self.share));
        }
        if !(self.track_share.is_finite() && self.track_share > 0.0 && self.track_share <= 1.0) {
            return Err(GateConfigError::TrackShare(self.track_share));
        }
        if !(self.poll_share.is_finite() && self.poll_share > 0.0 && self.poll_share <= 1.0) {
            return Err(GateConfigError::PollShare(self.poll_share));
        }
        Ok(())
    }

    /// The nearest valid settings. [`RateGate::new`] cannot fail (a running
    /// daemon must keep delivering), so it clamps; `validate` is what rejects
    /// bad values loudly at startup.
    fn sanitized(mut self) -> Self {
        let d = RateGateConfig::default();
        self.rate_per_minute = self.rate_per_minute.max(1);
        self.burst = self.burst.max(1);
        if !(self.share.is_finite() && self.share > 0.0) {
            self.share = d.share;
        }
        self.share = self.share.min(1.0);
        if !(self.track_share.is_finite() && self.track_share > 0.0) {
            self.track_share = d.track_share;
        }
        self.track_share = self.track_share.min(1.0);
        if !(self.poll_share.is_finite() && self.poll_share > 0.0) {
            self.poll_share = d.poll_share;
        }
        self.poll_share = self.poll_share.min(1.0);
        self
    }
}

/// What one response said about the rate limit, as durations from "now".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerFeedback {
    /// HTTP status of the response, if there was one. A 429 without
    /// `retry-after` is treated as `retry-after: 1`; a 2xx never imposes a
    /// retry-after deadline.
    pub status: Option<u16>,
    /// Requests allowed per server window.
    pub limit: Option<u64>,
    /// Requests left in the current server window.
    pub remaining: Option<u64>,
    /// Time until the current server window ends (already past: `None`).
    pub reset_in: Option<Duration>,
    /// Do not send anything before this much time has passed.
    pub retry_after_in: Option<Duration>,
    /// Length of the server's window, if known (the headers we parse do not
    /// carry it; [`DEFAULT_SERVER_WINDOW`] is assumed). Used to turn `limit`
    /// into a per-minute rate.
    pub window: Option<Duration>,
}

impl ServerFeedback {
    /// Convert parsed headers (absolute wall-clock instants) to durations from
    /// `now`, the time the response was received. `status` is left `None`;
    /// set it with [`ServerFeedback::with_status`].
    pub fn from_info(info: &RateLimitInfo, now: SystemTime) -> Self {
        let until = |t: Option<SystemTime>| t.and_then(|t| t.duration_since(now).ok());
        ServerFeedback {
            status: None,
            limit: info.limit,
            remaining: info.remaining,
            reset_in: until(info.reset_at),
            retry_after_in: until(info.retry_after),
            window: None,
        }
    }

    /// The same feedback with the response's HTTP status.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// The retry-after deadline this feedback imposes, if any.
    fn retry_after(&self) -> Option<Duration> {
        match self.status {
            Some(s) if (200..300).contains(&s) => None,
            Some(429) => Some(self.retry_after_in.unwrap_or(DEFAULT_429_RETRY_AFTER)),
            _ => self.retry_after_in,
        }
    }
}

/// A snapshot of the gate's counters and state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GateStats {
    /// Permits granted to [`RequestClass::Create`].
    pub granted_create: u64,
    /// Permits granted to [`RequestClass::Track`].
    pub granted_track: u64,
    /// Permits granted to [`RequestClass::Poll`].
    pub granted_poll: u64,
    /// Acquisitions that were delayed by a retry-after deadline.
    pub retry_after_waits: u64,
    /// Total time acquisitions spent waiting on retry-after deadlines.
    pub retry_after_wait_secs: f64,
    /// Acquisitions that were delayed by an exhausted server window.
    pub window_waits: u64,
    /// Total time acquisitions spent waiting for a server window to end.
    pub window_wait_secs: f64,
    /// Responses observed with status 429.
    pub throttled_responses: u64,
    /// The configured ceiling, requests per minute.
    pub configured_rpm: u32,
    /// The pace actually applied, requests per minute.
    pub effective_rpm: f64,
    /// The last limit the server announced.
    pub server_limit: Option<u64>,
    /// Our estimate of the server's remaining budget, when a window is known.
    pub remaining_estimate: Option<u64>,
    /// Permits granted and not yet observed or dropped.
    pub in_flight: u64,
    /// Acquisitions currently waiting.
    pub waiting: usize,
}

/// Shared rate gate for one API key. Cheap to clone.
#[derive(Clone)]
pub struct RateGate(Arc<Inner>);

struct Inner {
    state: Mutex<State>,
    /// Woken on every state change that can let a waiter through or change
    /// what it waits for. Waiters re-check everything on wake.
    notify: Notify,
    /// The latest server deadline (`retry-after`), wall clock: for whoever
    /// keeps it across a restart ([`super::deadline_file`]).
    deadline: tokio::sync::watch::Sender<Option<SystemTime>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitReason {
    Pace = 0,
    RetryAfter = 1,
    Window = 2,
}

impl WaitReason {
    fn as_str(self) -> &'static str {
        match self {
            WaitReason::Pace => "pace",
            WaitReason::RetryAfter => "retry_after",
            WaitReason::Window => "window",
        }
    }
}

enum Decision {
    Grant,
    Wait {
        until: Option<Instant>,
        reason: WaitReason,
    },
}

struct Waiter {
    id: u64,
    /// `Track` or `Poll` in the tracking queue.
    class: RequestClass,
}

/// Our view of the server's current fixed window.
#[derive(Debug, Clone, Copy)]
struct WindowEstimate {
    /// When the server says this window ends.
    resets_at: Instant,
    /// Requests we believe are still allowed in it.
    remaining: u64,
    /// Largest drop of the server's count not explained by our own
    /// requests between two of our observations in this window: someone
    /// else (another replica, another tool) uses the key.
    foreign_max: u64,
}

struct State {
    cfg: RateGateConfig,
    /// The account this gate paces (the `account` label of its metrics).
    account: Arc<str>,
    server_limit: Option<u64>,
    server_window: Duration,
    /// Reset instant of the latest server window seen.
    last_reset: Option<Instant>,
    /// Window length learnt from consecutive reset instants.
    observed_window: Option<Duration>,
    effective_rpm: f64,
    /// Shared emission interval (60 s / effective rate).
    interval: Duration,
    /// Emission interval of tracking while creates wait.
    track_interval: Duration,
    /// Emission interval of speculative tracking while creates wait.
    poll_interval: Duration,
    /// GCRA theoretical arrival time of the shared bucket.
    tat: Instant,
    /// Earliest next tracking grant while creates wait (burst 1).
    track_tat: Instant,
    /// Earliest next speculative tracking grant while creates wait.
    poll_tat: Instant,
    /// Last time a create was granted after waiting for the pace: creates
    /// are backlogged ([`RateGate::creates_backlogged`]).
    create_waited_at: Option<Instant>,
    blocked_until: Option<Instant>,
    window: Option<WindowEstimate>,
    /// `foreign_max` of the previous window, carried over so that a shared
    /// key keeps its safety margin at the start of a new window.
    prev_foreign: u64,
    in_flight: u64,
    next_id: u64,
    create_q: VecDeque<Waiter>,
    track_q: VecDeque<Waiter>,
    stats: Counters,
}

#[derive(Default)]
struct Counters {
    granted_create: u64,
    granted_track: u64,
    granted_poll: u64,
    retry_after_waits: u64,
    retry_after_wait: Duration,
    window_waits: u64,
    window_wait: Duration,
    throttled: u64,
}

impl State {
    fn new(cfg: RateGateConfig, now: Instant) -> Self {
        let mut s = State {
            cfg,
            account: Arc::from(crate::duvo::config::DEFAULT_ACCOUNT),
            server_limit: None,
            server_window: DEFAULT_SERVER_WINDOW,
            last_reset: None,
            observed_window: None,
            effective_rpm: 0.0,
            interval: Duration::ZERO,
            track_interval: Duration::ZERO,
            poll_interval: Duration::ZERO,
            tat: now,
            track_tat: now,
            poll_tat: now,
            create_waited_at: None,
            blocked_until: None,
            window: None,
            prev_foreign: 0,
            in_flight: 0,
            next_id: 0,
            create_q: VecDeque::new(),
            track_q: VecDeque::new(),
            stats: Counters::default(),
        };
        s.recompute_rate(now);
        s
    }

    /// Re-derive the pace from the configured ceiling and the server's
    /// announced limit. The remaining distance of each bucket to "full" is
    /// rescaled, so a rate change neither grants a burst nor strands waiters
    /// behind a deadline computed at the old rate.
    fn recompute_rate(&mut self, now: Instant) {
        let configured = f64::from(self.cfg.rate_per_minute);
        let rpm = match self.server_limit {
            Some(limit) if limit > 0 => {
                let window = self.server_window.as_secs_f64().max(1e-3);
                let server_rpm = limit as f64 * 60.0 / window;
                configured.min(server_rpm * self.cfg.share)
            }
            _ => configured,
        }
        .max(MIN_RPM);
        if rpm == self.effective_rpm {
            return;
        }
        let interval = Duration::from_secs_f64(60.0 / rpm);
        let track_interval = Duration::from_secs_f64(60.0 / (rpm * self.cfg.track_share));
        let poll_interval = Duration::from_secs_f64(60.0 / (rpm * self.cfg.poll_share));
        if !self.interval.is_zero() {
            self.tat = rescale(self.tat, now, self.interval, interval);
            self.track_tat = rescale(self.track_tat, now, self.track_interval, track_interval);
            self.poll_tat = rescale(self.poll_tat, now, self.poll_interval, poll_interval);
        }
        self.effective_rpm = rpm;
        self.interval = interval;
        self.track_interval = track_interval;
        self.poll_interval = poll_interval;
        metrics::gauge!("duvo_bridge_rate_gate_effective_rpm", "account" => self.account.to_string())
            .set(rpm);
    }

    /// Burst tolerance of the shared bucket.
    fn tau(&self) -> Duration {
        self.interval
            .saturating_mul(self.cfg.burst.saturating_sub(1))
    }

    /// Earliest instant the shared bucket allows the next permit.
    fn shared_allowed_at(&self) -> Instant {
        self.tat.checked_sub(self.tau()).unwrap_or(self.tat)
    }

    /// When the tracking head, if any, may have a slot while creates wait.
    fn track_due_at(&self) -> Option<Instant> {
        self.track_q.front().map(|w| match w.class {
            RequestClass::Poll => self.track_tat.max(self.poll_tat),
            _ => self.track_tat,
        })
    }

    /// Earliest instant tracking may take a slot while no create waits: the
    /// shared bucket must still hold one permit for the next create (when
    /// the burst allows more than one).
    fn idle_allowed_at(&self) -> Instant {
        if self.cfg.burst >= 2 {
            self.shared_allowed_at() + self.interval
        } else {
            self.shared_allowed_at()
        }
    }

    fn expire_window(&mut self, now: Instant) {
        if let Some(w) = self.window
            && now >= w.resets_at + self.cfg.window_guard
        {
            self.prev_foreign = w.foreign_max;
            self.window = None;
        }
    }

    /// Requests held back at the end of a window when others share the key.
    ///
    /// Our estimate only learns about foreign requests when one of our
    /// responses comes back, so it can be optimistic by as many foreign
    /// requests as arrive between two observations. Keeping that many in
    /// reserve stops us from sending the request that would be the server's
    /// first 429. Alone on the key, the margin is 0 and the whole budget is
    /// used.
    fn safety_margin(&self) -> u64 {
        let current = self.window.map_or(0, |w| w.foreign_max);
        let margin = current.max(self.prev_foreign);
        let cap = self
            .server_limit
            .map_or(MAX_SAFETY_MARGIN, |l| (l / 10).clamp(1, MAX_SAFETY_MARGIN));
        margin.min(cap)
    }

    fn enqueue(&mut self, class: RequestClass) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let w = Waiter { id, class };
        match class {
            RequestClass::Create => self.create_q.push_back(w),
            RequestClass::Track | RequestClass::Poll => self.track_q.push_back(w),
        }
        id
    }

    fn dequeue(&mut self, class: RequestClass, id: u64) {
        let q = match class {
            RequestClass::Create => &mut self.create_q,
            RequestClass::Track | RequestClass::Poll => &mut self.track_q,
        };
        q.retain(|w| w.id != id);
    }

    /// Grant now, or say until when (and why) to wait. Called under the lock
    /// with the waiter's accumulated waits, so a grant and its accounting are
    /// one atomic step.
    fn decide(
        &mut self,
        class: RequestClass,
        id: u64,
        now: Instant,
        waited: &[Duration; 3],
    ) -> Decision {
        self.expire_window(now);
        if let Some(b) = self.blocked_until {
            if now < b {
                return Decision::Wait {
                    until: Some(b),
                    reason: WaitReason::RetryAfter,
                };
            }
            self.blocked_until = None;
        }
        // Probe first: while nothing is known of the server's current
        // window (at start, after a window ended, after a restart in the
        // middle of a spent window), one request finds out before others
        // follow. Two requests racing into a spent window would make the
        // second an early retry of the first one's 429.
        if self.cfg.probe_unknown_window && self.window.is_none() && self.in_flight > 0 {
            return Decision::Wait {
                until: None,
                reason: WaitReason::Window,
            };
        }
        if let Some(w) = self.window
            && w.remaining <= self.safety_margin()
        {
            return Decision::Wait {
                until: Some(w.resets_at + self.cfg.window_guard),
                reason: WaitReason::Window,
            };
        }
        let queue = match class {
            RequestClass::Create => &self.create_q,
            RequestClass::Track | RequestClass::Poll => &self.track_q,
        };
        if queue.front().map(|w| w.id) != Some(id) {
            // FIFO within a class: only the head competes for the bucket.
            return Decision::Wait {
                until: None,
                reason: WaitReason::Pace,
            };
        }
        let shared_at = self.shared_allowed_at();
        match class {
            RequestClass::Create => {
                if let Some(t) = self.track_due_at()
                    && now >= t
                {
                    // Tracking's share is due: it takes the next slot; it
                    // is awake (its timer is at or before `t`) and notifies
                    // on grant.
                    return Decision::Wait {
                        until: (shared_at > now).then_some(shared_at),
                        reason: WaitReason::Pace,
                    };
                }
            }
            RequestClass::Track | RequestClass::Poll => {
                let due_at = self.track_due_at().unwrap_or(now);
                if now < due_at {
                    // Not its share's turn: only a slot no create wants,
                    // with a permit left over for the next create.
                    let idle_at = self.idle_allowed_at();
                    if !self.create_q.is_empty() || idle_at > now {
                        let until = if self.create_q.is_empty() {
                            idle_at.min(due_at)
                        } else {
                            due_at
                        };
                        return Decision::Wait {
                            until: Some(until.max(shared_at)),
                            reason: WaitReason::Pace,
                        };
                    }
                }
            }
        }
        if shared_at > now {
            return Decision::Wait {
                until: Some(shared_at),
                reason: WaitReason::Pace,
            };
        }
        self.grant(class, now, waited);
        Decision::Grant
    }

    fn grant(&mut self, class: RequestClass, now: Instant, waited: &[Duration; 3]) {
        match class {
            RequestClass::Create => {
                self.create_q.pop_front();
                self.stats.granted_create += 1;
            }
            RequestClass::Track | RequestClass::Poll => {
                self.track_q.pop_front();
                if class == RequestClass::Poll {
                    self.stats.granted_poll += 1;
                    self.poll_tat = now + self.poll_interval;
                } else {
                    self.stats.granted_track += 1;
                }
                // Shares are spaced from the last tracking grant, wherever
                // it came from: listings on an idle budget bank nothing for
                // a later backlog.
                self.track_tat = now + self.track_interval;
            }
        }
        if class == RequestClass::Create && !waited[WaitReason::Pace as usize].is_zero() {
            self.create_waited_at = Some(now);
        }
        self.tat = self.tat.max(now) + self.interval;
        if let Some(w) = &mut self.window {
            w.remaining = w.remaining.saturating_sub(1);
        }
        self.in_flight += 1;

        let ra = waited[WaitReason::RetryAfter as usize];
        if !ra.is_zero() {
            self.stats.retry_after_waits += 1;
            self.stats.retry_after_wait += ra;
        }
        let win = waited[WaitReason::Window as usize];
        if !win.is_zero() {
            self.stats.window_waits += 1;
            self.stats.window_wait += win;
        }
    }

    /// Nothing is sent before `deadline` (a server's `retry-after`); the
    /// later of two deadlines stands. Resume with one permit at the
    /// deadline, then pace: no burst.
    fn hold_until(&mut self, deadline: Instant) {
        self.blocked_until = Some(self.blocked_until.map_or(deadline, |b| b.max(deadline)));
        self.tat = self.tat.max(deadline + self.tau());
    }

    /// Apply what a response said. `in_flight` must already exclude the
    /// request this feedback belongs to.
    fn observe(&mut self, fb: &ServerFeedback, now: Instant) {
        if fb.status == Some(429) {
            self.stats.throttled += 1;
            tracing::warn!(
                retry_after_ms = fb.retry_after_in.map(|d| d.as_millis() as u64),
                remaining = fb.remaining,
                "Duvo API answered 429 despite the rate gate"
            );
        }

        let mut rate_inputs_changed = false;
        // The x-ratelimit headers do not name the window length: learn it
        // from two consecutive windows' reset instants (their distance is
        // one window, or a multiple when we skipped some: keep the least).
        // Until then the documented minute is assumed, so a replica that
        // starts in mid-window never mistakes the time to reset for the
        // window and paces too fast.
        if let Some(r) = fb.reset_in {
            let reset = now + r.min(MAX_SERVER_DELAY);
            match self.last_reset {
                Some(prev) if reset > prev + SAME_WINDOW_TOLERANCE => {
                    let d = (reset - prev).as_secs_f64().round();
                    if d >= 1.0 {
                        let d = Duration::from_secs(d as u64).min(DEFAULT_SERVER_WINDOW);
                        self.observed_window = Some(self.observed_window.map_or(d, |o| o.min(d)));
                    }
                    self.last_reset = Some(reset);
                }
                Some(_) => {}
                None => self.last_reset = Some(reset),
            }
        }
        let inferred = fb.window.or(self.observed_window);
        if let Some(w) = inferred
            && !w.is_zero()
            && w != self.server_window
        {
            self.server_window = w;
            rate_inputs_changed = true;
        }
        if let Some(limit) = fb.limit
            && limit > 0
            && self.server_limit != Some(limit)
        {
            self.server_limit = Some(limit);
            rate_inputs_changed = true;
        }
        if rate_inputs_changed {
            self.recompute_rate(now);
        }
        // After the rate is settled: a rate change rescales the buckets'
        // distance to "full", which must not stretch a server deadline.
        if let Some(d) = fb.retry_after() {
            self.hold_until(now + d.min(MAX_SERVER_DELAY));
        }

        // Requests still in flight may not have reached the server yet: the
        // budget the server reports is theirs too.
        let others = self.in_flight;
        let reported = fb.remaining.map(|r| r.saturating_sub(others));
        match fb.reset_in {
            Some(reset_in) => {
                let resets_at = now + reset_in.min(MAX_SERVER_DELAY);
                match &mut self.window {
                    Some(w) if abs_diff(resets_at, w.resets_at) <= SAME_WINDOW_TOLERANCE => {
                        // Same window: the later end is the safe one.
                        w.resets_at = w.resets_at.max(resets_at);
                        if let Some(r) = reported {
                            if r < w.remaining {
                                w.foreign_max = w.foreign_max.max(w.remaining - r);
                            }
                            w.remaining = w.remaining.min(r);
                        }
                    }
                    Some(w) if resets_at < w.resets_at => {
                        // A late answer about an older window: nothing to learn.
                    }
                    _ => {
                        // First news of a (newer) window.
                        if let Some(old) = self.window {
                            self.prev_foreign = old.foreign_max;
                        }
                        self.window = reported.map(|remaining| WindowEstimate {
                            resets_at,
                            remaining,
                            foreign_max: 0,
                        });
                    }
                }
            }
            None => {
                // Without a future window end, `remaining` cannot be placed:
                // it may well describe a window that has already ended (a late
                // answer), and applying it to the current one would stall us
                // for nothing. Pacing and retry-after cover this case.
            }
        }
        if let Some(w) = self.window
            && w.remaining <= self.safety_margin()
        {
            tracing::debug!(
                resets_in_ms = w.resets_at.saturating_duration_since(now).as_millis() as u64,
                "server rate-limit window spent; holding requests until it resets"
            );
        }
    }

    fn snapshot(&self, now: Instant) -> GateStats {
        let window = self
            .window
            .filter(|w| now < w.resets_at + self.cfg.window_guard);
        GateStats {
            granted_create: self.stats.granted_create,
            granted_track: self.stats.granted_track,
            granted_poll: self.stats.granted_poll,
            retry_after_waits: self.stats.retry_after_waits,
            retry_after_wait_secs: self.stats.retry_after_wait.as_secs_f64(),
            window_waits: self.stats.window_waits,
            window_wait_secs: self.stats.window_wait.as_secs_f64(),
            throttled_responses: self.stats.throttled,
            configured_rpm: self.cfg.rate_per_minute,
            effective_rpm: self.effective_rpm,
            server_limit: self.server_limit,
            remaining_estimate: window.map(|w| w.remaining),
            in_flight: self.in_flight,
            waiting: self.create_q.len() + self.track_q.len(),
        }
    }
}

/// Keep a bucket's distance from `now` proportional to the interval, so the
/// same number of "pending" permits is outstanding after a rate change.
fn rescale(tat: Instant, now: Instant, old: Duration, new: Duration) -> Instant {
    if tat <= now || old.is_zero() {
        return tat;
    }
    let ahead = (tat - now).as_secs_f64() * new.as_secs_f64() / old.as_secs_f64();
    now + Duration::from_secs_f64(ahead.min(MAX_SERVER_DELAY.as_secs_f64()))
}

fn abs_diff(a: Instant, b: Instant) -> Duration {
    if a >= b { a - b } else { b - a }
}

impl Inner {
    /// Lock the state. A panic while holding the lock cannot leave the state
    /// logically broken (every mutation is a few assignments), so a poisoned
    /// lock is used as is rather than taking the whole delivery path down.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A waiter's place in its class queue; leaves the queue when dropped, which
/// is what makes a cancelled `acquire` give its turn away.
struct Registration<'a> {
    inner: &'a Inner,
    class: RequestClass,
    id: u64,
    queued: bool,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if self.queued {
            self.inner.lock().dequeue(self.class, self.id);
            self.inner.notify.notify_waiters();
        }
    }
}

impl RateGate {
    /// A gate with the given settings (clamped to valid values; see
    /// [`RateGateConfig::validate`]). The bucket starts full.
    pub fn new(cfg: RateGateConfig) -> Self {
        let state = State::new(cfg.sanitized(), Instant::now());
        RateGate(Arc::new(Inner {
            state: Mutex::new(state),
            notify: Notify::new(),
            deadline: tokio::sync::watch::Sender::new(None),
        }))
    }

    /// A gate for the key of `account` (the `account` label on its
    /// metrics, and what the batcher and tracker using it label theirs with).
    pub fn for_account(cfg: RateGateConfig, account: &str) -> Self {
        let gate = RateGate::new(cfg);
        {
            let mut st = gate.0.lock();
            st.account = Arc::from(account);
            st.recompute_rate(Instant::now());
        }
        gate
    }

    /// The account this gate paces.
    pub fn account(&self) -> Arc<str> {
        self.0.lock().account.clone()
    }

    /// Send nothing before `until` (wall clock): a server deadline an
    /// earlier run was given and kept. A deadline in the past is ignored.
    pub fn block_until(&self, until: SystemTime) {
        let Ok(left) = until.duration_since(SystemTime::now()) else {
            return;
        };
        self.0
            .lock()
            .hold_until(Instant::now() + left.min(MAX_SERVER_DELAY));
        self.0.notify.notify_waiters();
    }

    /// Server deadlines (`retry-after`) as they are learnt, wall clock.
    pub fn deadlines(&self) -> tokio::sync::watch::Receiver<Option<SystemTime>> {
        self.0.deadline.subscribe()
    }

    /// Wait until a request of `class` may be sent.
    ///
    /// Cancel-safe: nothing is reserved while waiting, so dropping the future
    /// before it completes takes no budget and gives up its queue position.
    /// The returned [`Permit`] counts as in flight until it is observed or
    /// dropped.
    pub async fn acquire(&self, class: RequestClass) -> Permit {
        let inner = &*self.0;
        let id = inner.lock().enqueue(class);
        let mut reg = Registration {
            inner,
            class,
            id,
            queued: true,
        };
        // A new head (or a new create behind a waiting tracker) can change
        // what others wait for.
        inner.notify.notify_waiters();

        let mut waited = [Duration::ZERO; 3];
        loop {
            let notified = inner.notify.notified();
            tokio::pin!(notified);
            // Register interest before looking at the state so that a change
            // made between the check and the await is not missed.
            notified.as_mut().enable();
            let now = Instant::now();
            let decision = inner.lock().decide(class, id, now, &waited);
            match decision {
                Decision::Grant => {
                    reg.queued = false;
                    inner.notify.notify_waiters();
                    record_wait_metrics(&waited);
                    return Permit {
                        inner: Arc::clone(&self.0),
                        class,
                        settled: false,
                    };
                }
                Decision::Wait { until, reason } => {
                    match until {
                        Some(t) => {
                            tokio::select! {
                                _ = sleep_until(t) => {}
                                _ = notified.as_mut() => {}
                            }
                        }
                        None => notified.await,
                    }
                    waited[reason as usize] += Instant::now().saturating_duration_since(now);
                }
            }
        }
    }

    /// Change the configured ceiling at run time (config reload). Values
    /// below 1 are raised to 1. The server's announced limit still applies.
    pub fn set_rate(&self, per_minute: u32) {
        {
            let mut st = self.0.lock();
            st.cfg.rate_per_minute = per_minute.max(1);
            st.recompute_rate(Instant::now());
        }
        self.0.notify.notify_waiters();
    }

    /// Change this replica's share of the server's limit at run time
    /// (config reload); clamped to `(0, 1]` like [`RateGate::new`].
    pub fn set_share(&self, share: f64) {
        {
            let mut st = self.0.lock();
            st.cfg.share = RateGateConfig { share, ..st.cfg }.sanitized().share;
            st.recompute_rate(Instant::now());
        }
        self.0.notify.notify_waiters();
    }

    /// The settings in force (after run-time changes).
    pub fn config(&self) -> RateGateConfig {
        self.0.lock().cfg
    }

    /// Whether creates are waiting for the budget, or were granted after
    /// waiting for it within the last two intervals: the budget is spoken
    /// for. The tracker defers its clean-up listings then.
    pub fn creates_backlogged(&self) -> bool {
        let st = self.0.lock();
        let now = Instant::now();
        !st.create_q.is_empty()
            || st
                .create_waited_at
                .is_some_and(|t| now < t + st.interval.saturating_mul(2))
    }

    /// Counters and current state.
    pub fn stats(&self) -> GateStats {
        self.0.lock().snapshot(Instant::now())
    }
}

impl fmt::Debug for RateGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RateGate").field(&self.stats()).finish()
    }
}

fn record_wait_metrics(waited: &[Duration; 3]) {
    for reason in [WaitReason::Pace, WaitReason::RetryAfter, WaitReason::Window] {
        let d = waited[reason as usize];
        // Pace waits are recorded even when zero: their distribution is the
        // signal. The other two only matter when they happened.
        if reason == WaitReason::Pace || !d.is_zero() {
            metrics::histogram!("duvo_bridge_rate_gate_wait_seconds", "reason" => reason.as_str())
                .record(d.as_secs_f64());
        }
    }
    if !waited[WaitReason::RetryAfter as usize].is_zero() {
        metrics::counter!("duvo_bridge_retry_after_waits_total").increment(1);
    }
}

/// Permission to send one request. Report the response with
/// [`Permit::observe`]; dropping it instead means "no information" (e.g. a
/// transport error): the request still counts against the window estimate,
/// since it may have reached the server.
#[must_use = "a permit is for sending a request; report the response with observe()"]
pub struct Permit {
    inner: Arc<Inner>,
    class: RequestClass,
    settled: bool,
}

impl Permit {
    /// The class this permit was granted for.
    pub fn class(&self) -> RequestClass {
        self.class
    }

    /// Report what the server said in answer to this permit's request.
    pub fn observe(mut self, fb: &ServerFeedback) {
        self.settled = true;
        let new_deadline = {
            let mut st = self.inner.lock();
            st.in_flight = st.in_flight.saturating_sub(1);
            let before = st.blocked_until;
            let now = Instant::now();
            st.observe(fb, now);
            st.blocked_until
                .filter(|b| Some(*b) != before)
                .map(|b| SystemTime::now() + b.saturating_duration_since(now))
        };
        if let Some(d) = new_deadline {
            self.inner.deadline.send_replace(Some(d));
        }
        self.inner.notify.notify_waiters();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.settled {
            {
                let mut st = self.inner.lock();
                st.in_flight = st.in_flight.saturating_sub(1);
            }
            // A waiter may be holding back only because this request was in
            // flight (the probe of an unknown window): without a wake-up it
            // would sleep until some unrelated change.
            self.inner.notify.notify_waiters();
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("class", &self.class)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn feedback_from_info_converts_to_durations() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let info = RateLimitInfo {
            limit: Some(300),
            remaining: Some(7),
            reset_at: Some(now + Duration::from_secs(12)),
            retry_after: Some(now + Duration::from_secs(3)),
        };
        let fb = ServerFeedback::from_info(&info, now).with_status(429);
        assert_eq!(fb.status, Some(429));
        assert_eq!(fb.limit, Some(300));
        assert_eq!(fb.remaining, Some(7));
        assert_eq!(fb.reset_in, Some(Duration::from_secs(12)));
        assert_eq!(fb.retry_after_in, Some(Duration::from_secs(3)));
        assert_eq!(fb.window, None);
    }

    #[test]
    fn feedback_from_info_drops_past_instants() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let info = RateLimitInfo {
            limit: None,
            remaining: Some(0),
            reset_at: Some(now - Duration::from_secs(1)),
            retry_after: Some(now - Duration::from_secs(5)),
        };
        let fb = ServerFeedback::from_info(&info, now);
        assert_eq!(fb.reset_in, None);
        assert_eq!(fb.retry_after_in, None);
    }

    #[test]
    fn retry_after_rules() {
        let fb = ServerFeedback {
            status: Some(429),
            ..ServerFeedback::default()
        };
        assert_eq!(fb.retry_after(), Some(DEFAULT_429_RETRY_AFTER));
        let fb = ServerFeedback {
            status: Some(503),
            retry_after_in: Some(Duration::from_secs(4)),
            ..ServerFeedback::default()
        };
        assert_eq!(fb.retry_after(), Some(Duration::from_secs(4)));
        let fb = ServerFeedback {
            status: Some(503),
            ..ServerFeedback::default()
        };
        assert_eq!(fb.retry_after(), None);
        let fb = ServerFeedback {
            status: Some(201),
            retry_after_in: Some(Duration::from_secs(4)),
            ..ServerFeedback::default()
        };
        assert_eq!(fb.retry_after(), None);
    }

    #[test]
    fn config_validation() {
        assert_eq!(RateGateConfig::default().validate(), Ok(()));
        let c = RateGateConfig {
            rate_per_minute: 0,
            ..RateGateConfig::default()
        };
        assert_eq!(c.validate(), Err(GateConfigError::ZeroRate));
        assert_eq!(c.sanitized().rate_per_minute, 1);
        let c = RateGateConfig {
            burst: 0,
            ..RateGateConfig::default()
        };
        assert_eq!(c.validate(), Err(GateConfigError::ZeroBurst));
        let c = RateGateConfig {
            share: 1.5,
            ..RateGateConfig::default()
        };
        assert_eq!(c.validate(), Err(GateConfigError::Share(1.5)));
        assert_eq!(c.sanitized().share, 1.0);
        let c = RateGateConfig {
            track_share: f64::NAN,
            ..RateGateConfig::default()
        };
        assert!(matches!(c.validate(), Err(GateConfigError::TrackShare(_))));
        assert_eq!(c.sanitized().track_share, 0.1);
    }

    #[tokio::test(start_paused = true)]
    async fn starts_with_burst_then_paces() {
        let gate = RateGate::new(RateGateConfig::default());
        let t0 = Instant::now();
        let mut at = Vec::new();
        for _ in 0..5 {
            drop(gate.acquire(RequestClass::Create).await);
            at.push(Instant::now() - t0);
        }
        let ms: Vec<u128> = at.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![0, 0, 0, 200, 400]);
        assert_eq!(gate.stats().granted_create, 5);
        assert_eq!(gate.stats().in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_feedback_does_not_resurrect_an_old_window() {
        let gate = RateGate::new(RateGateConfig::default());
        let p = gate.acquire(RequestClass::Create).await;
        p.observe(&ServerFeedback {
            status: Some(201),
            limit: Some(300),
            remaining: Some(50),
            reset_in: Some(Duration::from_secs(30)),
            ..ServerFeedback::default()
        });
        assert_eq!(gate.stats().remaining_estimate, Some(50));
        // An older window's answer (ends earlier) is ignored.
        let p = gate.acquire(RequestClass::Create).await;
        p.observe(&ServerFeedback {
            status: Some(201),
            remaining: Some(0),
            reset_in: Some(Duration::from_secs(5)),
            ..ServerFeedback::default()
        });
        assert_eq!(gate.stats().remaining_estimate, Some(49));
        // Same window (within rounding): min applies.
        let p = gate.acquire(RequestClass::Create).await;
        p.observe(&ServerFeedback {
            status: Some(201),
            remaining: Some(20),
            reset_in: Some(Duration::from_secs(31)),
            ..ServerFeedback::default()
        });
        assert_eq!(gate.stats().remaining_estimate, Some(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_wakes_the_request_waiting_behind_it() {
        let gate = RateGate::new(RateGateConfig::default());
        // Nothing is known of the window: the first request is the probe,
        // the second waits for its answer.
        let probe = gate.acquire(RequestClass::Create).await;
        let g = gate.clone();
        let second = tokio::spawn(async move { g.acquire(RequestClass::Create).await });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            !second.is_finished(),
            "the second request waits for the probe"
        );
        // The probe's request failed in transport: no answer, the permit is
        // dropped. The waiter goes on without any other change to the gate.
        drop(probe);
        let granted = tokio::time::timeout(Duration::from_secs(60), second).await;
        assert!(granted.is_ok(), "the waiter was never woken");
    }
}
