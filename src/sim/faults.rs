//! Run-time fault injection (`/_sim/faults`, [`super::SimHandle::set_faults`]).
//!
//! Faults exist so the bridge's retry, idempotency and outage handling can be
//! exercised on demand: a share of requests answered with an error status, a
//! total outage, extra latency, a 429 storm (every request refused with a
//! `retry-after` pointing at the storm's end, as seconds or as an HTTP-date),
//! and the nastiest one, a create request whose cases are committed but whose
//! connection is closed without an answer.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The faults currently in force.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Faults {
    /// Share (0..=1) of API requests answered with `error_status`.
    pub error_ratio: f64,
    /// Status used for `error_ratio` faults (400..=599).
    pub error_status: u16,
    /// Delay added before every API answer.
    pub latency_ms: u64,
    /// Every API request is refused with 503.
    pub outage: bool,
    /// Share (0..=1) of create requests that commit but get no HTTP answer.
    pub drop_after_commit_ratio: f64,
    /// A 429 storm is in force until this Unix time in milliseconds (0: none).
    /// Every API request is answered 429 with `retry-after` naming the
    /// storm's end (rounded up to a whole second); a request before a
    /// deadline it was given counts as an early retry.
    pub throttle_until_unix_ms: u64,
    /// The storm's `retry-after` is an HTTP-date instead of seconds.
    pub throttle_http_date: bool,
    /// Cases whose data carries `"simulate":"reject"` are refused (400).
    /// Set to `false` to accept them: the cause of a dead letter "fixed",
    /// so it can be replayed.
    #[serde(default = "yes")]
    pub reject_marked: bool,
    /// API keys answered 401 as if revoked (a key rotated or withdrawn
    /// mid-run); the rest of the simulator is unchanged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_keys: Vec<String>,
}

fn yes() -> bool {
    true
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            error_ratio: 0.0,
            error_status: 503,
            latency_ms: 0,
            outage: false,
            drop_after_commit_ratio: 0.0,
            throttle_until_unix_ms: 0,
            throttle_http_date: false,
            reject_marked: true,
            revoked_keys: Vec::new(),
        }
    }
}

/// A partial update of [`Faults`]: absent fields keep their value. Unknown
/// fields are rejected so a typo (`error_rate`) is not silently ignored.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultsPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outage: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_after_commit_ratio: Option<f64>,
    /// Start a 429 storm lasting this many seconds from now (0 ends one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_secs: Option<u64>,
    /// Whether the storm's `retry-after` is an HTTP-date (default seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_http_date: Option<bool>,
    /// Refuse cases marked `"simulate":"reject"` (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reject_marked: Option<bool>,
    /// Keys to answer 401 from now on (replaces the list; `[]` restores
    /// every key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_keys: Option<Vec<String>>,
}

/// Why a patch was refused (nothing of it is applied then).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FaultsError {
    #[error("{field} must be a number between 0 and 1, got {value}")]
    RatioOutOfRange { field: &'static str, value: f64 },
    #[error("error_status must be an HTTP error status (400..=599), got {0}")]
    BadStatus(u16),
}

fn check_ratio(field: &'static str, v: Option<f64>) -> Result<(), FaultsError> {
    match v {
        Some(value) if !(0.0..=1.0).contains(&value) => {
            Err(FaultsError::RatioOutOfRange { field, value })
        }
        _ => Ok(()),
    }
}

impl Faults {
    /// Validate the whole patch, then apply it (all or nothing).
    pub fn apply(&mut self, p: &FaultsPatch) -> Result<(), FaultsError> {
        check_ratio("error_ratio", p.error_ratio)?;
        check_ratio("drop_after_commit_ratio", p.drop_after_commit_ratio)?;
        if let Some(s) = p.error_status
            && !(400..=599).contains(&s)
        {
            return Err(FaultsError::BadStatus(s));
        }
        if let Some(v) = p.error_ratio {
            self.error_ratio = v;
        }
        if let Some(v) = p.error_status {
            self.error_status = v;
        }
        if let Some(v) = p.latency_ms {
            self.latency_ms = v;
        }
        if let Some(v) = p.outage {
            self.outage = v;
        }
        if let Some(v) = p.drop_after_commit_ratio {
            self.drop_after_commit_ratio = v;
        }
        if let Some(secs) = p.throttle_secs {
            self.throttle_until_unix_ms = match secs {
                0 => 0,
                s => unix_ms(SystemTime::now()).saturating_add(s.saturating_mul(1000)),
            };
        }
        if let Some(v) = p.throttle_http_date {
            self.throttle_http_date = v;
        }
        if let Some(v) = p.reject_marked {
            self.reject_marked = v;
        }
        if let Some(v) = &p.revoked_keys {
            self.revoked_keys = v.clone();
        }
        Ok(())
    }

    /// The end of the 429 storm in force at `now`, rounded up to a whole
    /// second (so the seconds and the HTTP-date forms name the same instant).
    pub fn throttled_until(&self, now: SystemTime) -> Option<SystemTime> {
        if self.throttle_until_unix_ms <= unix_ms(now) {
            return None;
        }
        let secs = self.throttle_until_unix_ms.div_ceil(1000);
        Some(UNIX_EPOCH + Duration::from_secs(secs))
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether a fault with probability `ratio` fires now. 0 never and 1 always
/// fire without touching the RNG, so tests with those values are exact.
pub fn roll(ratio: f64) -> bool {
    if ratio <= 0.0 || ratio.is_nan() {
        false
    } else if ratio >= 1.0 {
        true
    } else {
        rand::random::<f64>() < ratio
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_keeps_absent_fields_and_is_atomic() {
        let mut f = Faults::default();
        f.apply(&FaultsPatch {
            error_ratio: Some(0.5),
            latency_ms: Some(7),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(f.error_ratio, 0.5);
        assert_eq!(f.latency_ms, 7);
        assert_eq!(f.error_status, 503);
        let err = f
            .apply(&FaultsPatch {
                outage: Some(true),
                drop_after_commit_ratio: Some(1.5),
                ..Default::default()
            })
            .unwrap_err();
        assert!(matches!(err, FaultsError::RatioOutOfRange { .. }));
        assert!(!f.outage, "a refused patch applies nothing");
        assert_eq!(
            f.apply(&FaultsPatch {
                error_status: Some(200),
                ..Default::default()
            }),
            Err(FaultsError::BadStatus(200))
        );
    }

    #[test]
    fn roll_extremes_are_exact() {
        assert!((0..100).all(|_| roll(1.0)));
        assert!((0..100).all(|_| !roll(0.0)));
    }

    #[test]
    fn unknown_patch_fields_are_rejected() {
        assert!(serde_json::from_str::<FaultsPatch>(r#"{"error_rate":0.1}"#).is_err());
    }
}
