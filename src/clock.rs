//! Wall-clock time in milliseconds since the Unix epoch: the one timestamp
//! format the outbox records, the tracker's TTLs, the reporters and the
//! systemd status line share. Monotonic durations use `tokio::time`
//! instead; this is for times that are persisted or shown.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// `t` in milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
