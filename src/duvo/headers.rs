//! Parsing of the rate-limit and lifecycle headers the API sends.
//!
//! The API documents `x-ratelimit-{limit,remaining,reset}` (reset = Unix
//! seconds) and `retry-after` (seconds, or an HTTP-date). Newer docs add the
//! IETF draft form `RateLimit-{Limit,Remaining,Reset}`, where `Reset` is a
//! number of seconds *from now*; and `Deprecation`/`Sunset`. We accept every
//! form and normalise to absolute instants so callers never re-derive them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::HeaderMap;

/// What one response told us about the caller's rate-limit window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimitInfo {
    /// Requests allowed per window.
    pub limit: Option<u64>,
    /// Requests left in the current window.
    pub remaining: Option<u64>,
    /// When the current window ends (wall clock).
    pub reset_at: Option<SystemTime>,
    /// Do not send again before this instant (from `retry-after`).
    pub retry_after: Option<SystemTime>,
}

impl RateLimitInfo {
    /// Parse every supported header form. `now` is passed in so tests are
    /// deterministic and so relative values are anchored to receipt time.
    pub fn from_headers(headers: &HeaderMap, now: SystemTime) -> Self {
        let num = |name: &str| -> Option<u64> {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_first_number)
        };
        let limit = num("x-ratelimit-limit").or_else(|| num("ratelimit-limit"));
        let remaining = num("x-ratelimit-remaining").or_else(|| num("ratelimit-remaining"));
        let reset_at = match num("x-ratelimit-reset") {
            Some(v) => Some(reset_value_to_instant(v, now)),
            None => num("ratelimit-reset").map(|secs| later(now, Duration::from_secs(secs))),
        };
        let retry_after = headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| parse_retry_after(s, now));
        RateLimitInfo {
            limit,
            remaining,
            reset_at,
            retry_after,
        }
    }

    /// True when no rate-limit header at all was present.
    pub fn is_empty(&self) -> bool {
        *self == RateLimitInfo::default()
    }
}

/// `x-ratelimit-reset` is documented as a Unix timestamp, but some servers
/// send seconds-until-reset under the same name. A value too small to be a
/// plausible timestamp (before 2001) is read as a delta.
fn reset_value_to_instant(v: u64, now: SystemTime) -> SystemTime {
    const PLAUSIBLE_EPOCH: u64 = 1_000_000_000;
    if v >= PLAUSIBLE_EPOCH {
        let cap = later(now, MAX_WAIT);
        UNIX_EPOCH
            .checked_add(Duration::from_secs(v))
            .map_or(cap, |at| at.min(cap))
    } else {
        later(now, Duration::from_secs(v))
    }
}

/// The longest wait a server's headers can impose: a day. Values beyond it
/// (a server's bug, or a value that would overflow the clock, like
/// `retry-after: 99999999999999999999`) are read as a day, so one bad
/// header can neither panic the client nor hold every send for years.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// `now + d`, with `d` capped at [`MAX_WAIT`].
fn later(now: SystemTime, d: Duration) -> SystemTime {
    now + d.min(MAX_WAIT)
}

/// `RateLimit-Limit: 300, 300;w=60` style values: take the first number.
fn parse_first_number(s: &str) -> Option<u64> {
    let s = s.trim();
    let end = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let head = &s[..end];
    if head.is_empty() {
        return None;
    }
    // Fractional values are rounded up: waiting a little longer is safe.
    head.parse::<u64>()
        .ok()
        .or_else(|| head.parse::<f64>().ok().map(|f| f.ceil() as u64))
}

/// `retry-after` is either delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub fn parse_retry_after(s: &str, now: SystemTime) -> Option<SystemTime> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(later(now, Duration::from_secs(secs)));
    }
    if let Ok(secs) = s.parse::<f64>()
        && secs.is_finite()
        && secs >= 0.0
    {
        return Some(later(
            now,
            Duration::try_from_secs_f64(secs).unwrap_or(MAX_WAIT),
        ));
    }
    httpdate::parse_http_date(s)
        .ok()
        .map(|at| at.min(later(now, MAX_WAIT)))
}

/// The server's clock when it answered (`Date`, whole seconds), if it said.
pub fn server_date(headers: &HeaderMap) -> Option<SystemTime> {
    let v = headers.get(reqwest::header::DATE)?.to_str().ok()?;
    httpdate::parse_http_date(v.trim()).ok()
}

/// `Deprecation` / `Sunset` headers, if present, as raw strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LifecycleInfo {
    pub deprecation: Option<String>,
    pub sunset: Option<String>,
}

impl LifecycleInfo {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let get = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        LifecycleInfo {
            deprecation: get("deprecation"),
            sunset: get("sunset"),
        }
    }

    pub fn is_present(&self) -> bool {
        self.deprecation.is_some() || self.sunset.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn x_ratelimit_form() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let h = map(&[
            ("x-ratelimit-limit", "300"),
            ("x-ratelimit-remaining", "12"),
            ("x-ratelimit-reset", "1800000030"),
        ]);
        let i = RateLimitInfo::from_headers(&h, now);
        assert_eq!(i.limit, Some(300));
        assert_eq!(i.remaining, Some(12));
        assert_eq!(i.reset_at, Some(now + Duration::from_secs(30)));
        assert_eq!(i.retry_after, None);
    }

    #[test]
    fn ietf_form_reset_is_relative() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let h = map(&[
            ("RateLimit-Limit", "300, 300;w=60"),
            ("RateLimit-Remaining", "0"),
            ("RateLimit-Reset", "17"),
        ]);
        let i = RateLimitInfo::from_headers(&h, now);
        assert_eq!(i.limit, Some(300));
        assert_eq!(i.remaining, Some(0));
        assert_eq!(i.reset_at, Some(now + Duration::from_secs(17)));
    }

    #[test]
    fn retry_after_seconds_and_http_date() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let i = RateLimitInfo::from_headers(&map(&[("retry-after", "7")]), now);
        assert_eq!(i.retry_after, Some(now + Duration::from_secs(7)));

        let date = httpdate::fmt_http_date(now + Duration::from_secs(42));
        let i = RateLimitInfo::from_headers(&map(&[("retry-after", &date)]), now);
        assert_eq!(i.retry_after, Some(now + Duration::from_secs(42)));

        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn absent_headers_are_empty() {
        let i = RateLimitInfo::from_headers(&HeaderMap::new(), SystemTime::now());
        assert!(i.is_empty());
    }

    #[test]
    fn lifecycle_headers() {
        let l = LifecycleInfo::from_headers(&map(&[("Sunset", "Wed, 11 Nov 2026 23:59:59 GMT")]));
        assert!(l.is_present());
        assert_eq!(l.deprecation, None);
    }

    #[test]
    fn huge_values_are_a_day_not_a_panic() {
        // Found by tests/fuzz.rs: these overflowed SystemTime and panicked.
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = now + MAX_WAIT;
        for v in ["99999999999999999999", "18446744073709551615", "1e300"] {
            assert_eq!(parse_retry_after(v, now), Some(day), "{v}");
        }
        let mut h = HeaderMap::new();
        h.insert("ratelimit-reset", "18446744073709551615".parse().unwrap());
        assert_eq!(RateLimitInfo::from_headers(&h, now).reset_at, Some(day));
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-reset", "18446744073709551615".parse().unwrap());
        assert_eq!(RateLimitInfo::from_headers(&h, now).reset_at, Some(day));
        let far = httpdate::fmt_http_date(now + Duration::from_secs(86_400 * 365));
        assert_eq!(parse_retry_after(&far, now), Some(day));
    }
}
