//! `[outbox]`: where the outbox lives and when intake pauses.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The durable outbox on local disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxSection {
    /// Directory of the sled database. Must be on a persistent volume.
    pub path: PathBuf,
    /// Above this many undelivered events, sources stop taking new input
    /// (HTTP answers 503 with Retry-After; brokers are paused).
    pub high_water_events: u64,
    /// Intake resumes below this many undelivered events.
    pub low_water_events: u64,
    /// Above this many bytes on disk, intake stops as for `high_water_events`.
    pub high_water_bytes: u64,
    /// Free space to keep on the outbox's filesystem, MiB. Below it intake
    /// stops as for `high_water_events` (HTTP 503, brokers paused), before
    /// any write can fail for want of space; delivery goes on (its writes
    /// are small) and intake resumes by itself once space is back.
    /// Default: 256.
    pub min_free_disk_mb: u64,
    /// How long delivered events are remembered so a re-sent event (same
    /// idempotency key or event id) is recognised and not delivered twice.
    pub retention_hours: u64,
    /// Memory for the database's page cache, MiB: the bulk of the bridge's
    /// resident memory under a backlog (it fills up to this and stays).
    /// Waiting events are read back from disk when their batch is built,
    /// so a small cache costs little. Default: 8.
    pub cache_mb: u64,
    /// Give disk back: once the database file is at least this big (MiB)
    /// and four times the size of what it holds (settled events keep a
    /// small record for `retention_hours`; sled reuses freed space but
    /// never shrinks its file), the outbox copies its records into a fresh
    /// file and deletes the old one, while it runs (writers wait only for
    /// the last keys written during the copy, typically milliseconds). It
    /// needs free space for the copy, about twice the records, and memory
    /// once (sled keeps what the copy used until a restart: ~150 MiB for
    /// 3.7M records). 0 turns it off. Default: 256.
    pub compact_min_mb: u64,
    /// Not a file key: `run --accept-outbox-loss` sets it, for the one
    /// start after an outbox was found to have lost data.
    #[serde(skip)]
    pub accept_data_loss: bool,
}

impl Default for OutboxSection {
    fn default() -> Self {
        OutboxSection {
            path: PathBuf::from("/var/lib/duvo-bridge"),
            high_water_events: 1_000_000,
            low_water_events: 800_000,
            high_water_bytes: 8 * 1024 * 1024 * 1024,
            min_free_disk_mb: 256,
            retention_hours: 24,
            cache_mb: 8,
            compact_min_mb: 256,
            accept_data_loss: false,
        }
    }
}

impl OutboxSection {
    /// Every problem with the `[outbox]` section.
    pub fn check(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.low_water_events >= self.high_water_events {
            errors.push(format!(
                "outbox.low_water_events ({}) must be below high_water_events ({})",
                self.low_water_events, self.high_water_events
            ));
        }
        if self.path.as_os_str().is_empty() {
            errors.push("outbox.path must not be empty".into());
        }
        if self.cache_mb == 0 {
            errors.push("outbox.cache_mb must be at least 1".into());
        }
        errors
    }
}
