//! Retry policy: how fast a failed request is tried again. The batcher,
//! the tracker, the reporters and the broker sources' reconnects all use it.
//!
//! Transient delivery faults (5xx, timeouts, refused connections, a 429 the gate did
//! not see coming) are retried **forever**: the events are already durable in
//! the outbox, and giving up would only turn an outage of the Duvo API into a
//! pile of dead letters that someone has to replay by hand. What the policy
//! controls is *how fast* we come back: exponentially growing delays, capped,
//! with jitter so that many batchers (and replicas) that failed together do not
//! retry in lock-step and knock the API over again the moment it recovers.
//!
//! This is a thin wrapper over [`backoff::ExponentialBackoff`] (0.4). The
//! wrapper exists to pin down two properties the crate does not give by
//! default: no maximum elapsed time (the crate's default gives up after 15
//! minutes), and a hard ceiling of [`RetryPolicy::max`] on the *jittered*
//! delay (the crate caps only the pre-jitter interval, so a 30 s cap with 30 %
//! jitter could otherwise yield 39 s).
//!
//! Retry-after deadlines from the server are not this module's business: they
//! are enforced by the rate gate ([`crate::deliver::gate`]) for every sender sharing the
//! key, so a retry scheduled here can never leave before such a deadline.

use std::time::Duration;

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff;

/// Why a [`RetryPolicy`] was rejected by [`RetryPolicy::validate`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RetryPolicyError {
    /// A zero first delay would make the first retry a hot loop.
    #[error("retry initial delay must be greater than zero")]
    ZeroInitial,
    /// The cap must not be below the first delay.
    #[error("retry max delay ({max:?}) must be at least the initial delay ({initial:?})")]
    MaxBelowInitial { initial: Duration, max: Duration },
    /// A multiplier below 1 would shrink the delays (and NaN breaks everything).
    #[error("retry multiplier must be a finite number >= 1.0, got {0}")]
    Multiplier(f64),
    /// Jitter is a fraction of the delay, in `[0, 1)`: 1.0 could yield a zero delay.
    #[error("retry jitter must be a finite number in [0, 1), got {0}")]
    Jitter(f64),
}

/// How delays between retries of one request grow.
///
/// Defaults: first delay 250 ms, doubling, capped at 30 s, ±30 % jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Nominal delay before the first retry.
    pub initial: Duration,
    /// Ceiling for any delay, jitter included.
    pub max: Duration,
    /// Growth factor of the nominal delay per attempt.
    pub multiplier: f64,
    /// Randomisation factor: a nominal delay `d` becomes a uniform value in
    /// `[d * (1 - jitter), d * (1 + jitter)]` (then capped at `max`).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.3,
        }
    }
}

impl RetryPolicy {
    /// Check the policy; meant for config validation at startup so that a bad
    /// value is reported instead of silently corrected.
    pub fn validate(&self) -> Result<(), RetryPolicyError> {
        if self.initial.is_zero() {
            return Err(RetryPolicyError::ZeroInitial);
        }
        if self.max < self.initial {
            return Err(RetryPolicyError::MaxBelowInitial {
                initial: self.initial,
                max: self.max,
            });
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err(RetryPolicyError::Multiplier(self.multiplier));
        }
        if !self.jitter.is_finite() || !(0.0..1.0).contains(&self.jitter) {
            return Err(RetryPolicyError::Jitter(self.jitter));
        }
        Ok(())
    }

    /// A fresh schedule for one request (or one batch): the first call to
    /// [`RetrySchedule::next_delay`] gives about `initial`.
    ///
    /// Out-of-range values are clamped to the nearest sane value rather than
    /// panicking: a daemon that is already running must keep retrying.
    /// Call [`RetryPolicy::validate`] at startup to reject them loudly.
    pub fn new_schedule(&self) -> RetrySchedule {
        let initial = if self.initial.is_zero() {
            Duration::from_millis(1)
        } else {
            self.initial
        };
        let max = self.max.max(initial);
        let multiplier = if self.multiplier.is_finite() && self.multiplier >= 1.0 {
            self.multiplier
        } else {
            1.0
        };
        let jitter = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 0.99)
        } else {
            0.0
        };
        let inner = ExponentialBackoff {
            current_interval: initial,
            initial_interval: initial,
            randomization_factor: jitter,
            multiplier,
            max_interval: max,
            // Never give up: transient faults are retried forever.
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        RetrySchedule {
            inner,
            max,
            attempts: 0,
        }
    }
}

/// The delays for one request's successive retries. Never exhausted.
#[derive(Debug)]
pub struct RetrySchedule {
    inner: ExponentialBackoff,
    max: Duration,
    attempts: u32,
}

impl RetrySchedule {
    /// Delay to wait before the next retry. Grows by `multiplier` per call up
    /// to `max`, jittered, never above `max`, never "give up".
    pub fn next_delay(&mut self) -> Duration {
        self.attempts = self.attempts.saturating_add(1);
        // `max_elapsed_time` is None, so the crate never returns None; should
        // it ever, waiting the cap is the safe answer.
        self.inner.next_backoff().unwrap_or(self.max).min(self.max)
    }

    /// Start over from `initial`, e.g. after a success.
    pub fn reset(&mut self) {
        self.attempts = 0;
        self.inner.reset();
    }

    /// How many delays were handed out since creation or the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_jitter() -> RetryPolicy {
        RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn defaults_match_spec_and_validate() {
        let p = RetryPolicy::default();
        assert_eq!(p.initial, Duration::from_millis(250));
        assert_eq!(p.max, Duration::from_secs(30));
        assert_eq!(p.multiplier, 2.0);
        assert_eq!(p.jitter, 0.3);
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn grows_geometrically_then_caps() {
        let mut s = no_jitter().new_schedule();
        let got: Vec<u64> = (0..12).map(|_| s.next_delay().as_millis() as u64).collect();
        // 250, 500, 1000, ... 16000, then capped at 30000.
        assert_eq!(
            got,
            vec![
                250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000, 30000
            ]
        );
        assert_eq!(s.attempts(), 12);
    }

    #[test]
    fn never_gives_up() {
        let mut s = RetryPolicy::default().new_schedule();
        for _ in 0..10_000 {
            let d = s.next_delay();
            assert!(d > Duration::ZERO);
            assert!(d <= Duration::from_secs(30));
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut s = no_jitter().new_schedule();
        for _ in 0..5 {
            s.next_delay();
        }
        s.reset();
        assert_eq!(s.attempts(), 0);
        assert_eq!(s.next_delay(), Duration::from_millis(250));
    }

    #[test]
    fn jitter_stays_within_bounds_and_varies() {
        let p = RetryPolicy::default();
        let mut firsts = Vec::new();
        for _ in 0..500 {
            let mut s = p.new_schedule();
            let first = s.next_delay();
            let second = s.next_delay();
            // ±30 % around 250 ms and 500 ms (1 ms slack for float rounding).
            assert!(
                first >= Duration::from_millis(174) && first <= Duration::from_millis(326),
                "{first:?}"
            );
            assert!(
                second >= Duration::from_millis(349) && second <= Duration::from_millis(651),
                "{second:?}"
            );
            firsts.push(first);
        }
        firsts.sort();
        firsts.dedup();
        assert!(firsts.len() > 50, "jitter should spread the delays");
        // At the cap, jitter only goes down: never above max.
        let mut s = p.new_schedule();
        let tail: Vec<Duration> = (0..200).map(|_| s.next_delay()).skip(20).collect();
        assert!(tail.iter().all(|d| *d <= Duration::from_secs(30)));
        assert!(tail.iter().all(|d| *d >= Duration::from_secs(20)));
    }

    #[test]
    fn validate_rejects_nonsense_and_schedule_clamps() {
        let bad = RetryPolicy {
            initial: Duration::ZERO,
            ..RetryPolicy::default()
        };
        assert_eq!(bad.validate(), Err(RetryPolicyError::ZeroInitial));
        assert!(bad.new_schedule().next_delay() > Duration::ZERO);

        let bad = RetryPolicy {
            max: Duration::from_millis(100),
            ..RetryPolicy::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(RetryPolicyError::MaxBelowInitial { .. })
        ));

        let bad = RetryPolicy {
            multiplier: 0.5,
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        assert_eq!(bad.validate(), Err(RetryPolicyError::Multiplier(0.5)));
        let mut s = bad.new_schedule();
        assert_eq!(s.next_delay(), Duration::from_millis(250));
        assert_eq!(s.next_delay(), Duration::from_millis(250));

        let bad = RetryPolicy {
            jitter: f64::NAN,
            ..RetryPolicy::default()
        };
        assert!(matches!(bad.validate(), Err(RetryPolicyError::Jitter(_))));
        assert_eq!(bad.new_schedule().next_delay(), Duration::from_millis(250));
    }
}
