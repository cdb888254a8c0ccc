//! Fixed-window, per-key rate limiter.
//!
//! The real API documents "300 requests per minute per key" and reports the
//! window end as a Unix timestamp in `x-ratelimit-reset`. A fixed window aligned
//! to multiples of `window_secs` since the Unix epoch is the simplest model that
//! makes that header exact and the same for every request in the window, so a
//! client that waits until `reset` is guaranteed a fresh budget.
//!
//! Decision (documented in the contract tests): a request answered with 429
//! does NOT consume budget. Counting rejected requests would let an impatient
//! client push its own reset further away, which real APIs avoid, and it would
//! hide the difference between "too fast" and "retried too early".

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the limiter decided for one request; also the source of the
/// `x-ratelimit-*` / `retry-after` headers of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateVerdict {
    pub allowed: bool,
    pub limit: u32,
    /// Requests left in this window after this one.
    pub remaining: u32,
    /// Unix seconds at which the current window ends.
    pub reset_unix: u64,
    /// Whole seconds (rounded up) until the window ends; set only on 429.
    pub retry_after_secs: Option<u64>,
    /// The key still held a 429 whose deadline (the window end) had not
    /// passed when this request arrived.
    pub early_retry: bool,
}

#[derive(Debug, Default)]
struct KeyWindow {
    /// Index of the window (`unix_secs / window_secs`) `used` refers to.
    window: u64,
    used: u32,
    /// Deadline handed out with the last 429 (exact window end).
    retry_deadline: Option<SystemTime>,
}

/// Per-key fixed windows. One mutex is fine: the critical section is a hash
/// lookup and two integer updates.
#[derive(Debug)]
pub struct RateLimiter {
    limit: u32,
    window_secs: u64,
    keys: Mutex<HashMap<String, KeyWindow>>,
}

impl RateLimiter {
    /// `window_secs` must be > 0 (validated by the config).
    pub fn new(limit: u32, window_secs: u64) -> Self {
        RateLimiter {
            limit,
            window_secs: window_secs.max(1),
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// Count one request of `key` at wall-clock `now` (passed in for tests).
    pub fn check(&self, key: &str, now: SystemTime) -> RateVerdict {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let window = since.as_secs() / self.window_secs;
        let reset_unix = (window + 1) * self.window_secs;
        let window_end = UNIX_EPOCH + Duration::from_secs(reset_unix);

        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let kw = keys.entry(key.to_owned()).or_default();
        let early_retry = kw.arrive(window, now);
        if kw.used >= self.limit {
            kw.retry_deadline = Some(window_end);
            return RateVerdict {
                allowed: false,
                limit: self.limit,
                remaining: 0,
                reset_unix,
                retry_after_secs: Some(secs_until(window_end, now)),
                early_retry,
            };
        }
        kw.used += 1;
        RateVerdict {
            allowed: true,
            limit: self.limit,
            remaining: self.limit - kw.used,
            reset_unix,
            retry_after_secs: None,
            early_retry,
        }
    }

    /// Refuse one request of `key` at `now` until `until` (a 429 storm): no
    /// budget is used, the deadline is remembered (the later of this one and
    /// any earlier), and a request still inside an earlier deadline counts as
    /// an early retry, exactly as with [`RateLimiter::check`].
    pub fn refuse_until(&self, key: &str, until: SystemTime, now: SystemTime) -> RateVerdict {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let window = since.as_secs() / self.window_secs;
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let kw = keys.entry(key.to_owned()).or_default();
        let early_retry = kw.arrive(window, now);
        let deadline = kw.retry_deadline.map_or(until, |d| d.max(until));
        kw.retry_deadline = Some(deadline);
        RateVerdict {
            allowed: false,
            limit: self.limit,
            remaining: self.limit.saturating_sub(kw.used),
            reset_unix: deadline
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            retry_after_secs: Some(secs_until(deadline, now)),
            early_retry,
        }
    }
}

impl KeyWindow {
    /// A request arrives at `now` in `window`: roll the window over, and say
    /// whether it came before the deadline of a 429 the key was given.
    fn arrive(&mut self, window: u64, now: SystemTime) -> bool {
        if self.window != window {
            self.window = window;
            self.used = 0;
        }
        match self.retry_deadline {
            Some(deadline) if now < deadline => true,
            Some(_) => {
                self.retry_deadline = None;
                false
            }
            None => false,
        }
    }
}

/// Whole seconds from `now` until `deadline`, rounded up (at least 1) so a
/// client that honours the header is never early.
fn secs_until(deadline: SystemTime, now: SystemTime) -> u64 {
    let wait = deadline.duration_since(now).unwrap_or_default();
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn fixed_window_aligned_to_epoch() {
        let rl = RateLimiter::new(2, 10);
        let a = rl.check("k", at(1_000_003, 0));
        assert!(a.allowed);
        assert_eq!((a.remaining, a.reset_unix), (1, 1_000_010));
        let b = rl.check("k", at(1_000_004, 0));
        assert!(b.allowed);
        assert_eq!(b.remaining, 0);
        let c = rl.check("k", at(1_000_007, 250));
        assert!(!c.allowed);
        // 2.75 s left, rounded up.
        assert_eq!(c.retry_after_secs, Some(3));
        assert!(!c.early_retry);
        // Rejected requests do not consume budget, but are early retries.
        let d = rl.check("k", at(1_000_009, 999));
        assert!(!d.allowed && d.early_retry);
        // The next window starts fresh, exactly at the deadline.
        let e = rl.check("k", at(1_000_010, 0));
        assert!(e.allowed && !e.early_retry);
        assert_eq!((e.remaining, e.reset_unix), (1, 1_000_020));
    }

    #[test]
    fn a_storm_refuses_without_spending_budget_and_marks_early_retries() {
        let rl = RateLimiter::new(3, 60);
        assert!(rl.check("k", at(120, 0)).allowed);
        let until = at(130, 0);
        let a = rl.refuse_until("k", until, at(121, 500));
        assert!(!a.allowed && !a.early_retry);
        assert_eq!((a.retry_after_secs, a.reset_unix), (Some(9), 130));
        // Asked again inside the deadline: early, still refused.
        assert!(rl.refuse_until("k", until, at(125, 0)).early_retry);
        // A shorter storm does not shorten the deadline handed out.
        let b = rl.refuse_until("k", at(126, 0), at(125, 0));
        assert_eq!(b.retry_after_secs, Some(5));
        assert!(rl.check("k", at(129, 999)).early_retry);
        // At the deadline: on time; the storm's refusals spent nothing (the
        // request before it and the early one did).
        let c = rl.check("k", at(130, 0));
        assert!(c.allowed && !c.early_retry);
        assert_eq!(c.remaining, 0);
    }

    #[test]
    fn keys_are_independent() {
        let rl = RateLimiter::new(1, 60);
        assert!(rl.check("a", at(120, 0)).allowed);
        assert!(!rl.check("a", at(121, 0)).allowed);
        assert!(rl.check("b", at(121, 0)).allowed);
    }
}
