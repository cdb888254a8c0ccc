//! `[delivery]`: batch sizes, linger, retry delays, requests in flight.

use serde::{Deserialize, Serialize};

use crate::duvo::{MAX_BODY_BYTES, MAX_CASES_PER_REQUEST};

/// Batching and retries.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Most cases per create request (the API allows 100).
    pub max_batch: usize,
    /// Most bytes per create request body (the API allows 1 MiB).
    pub max_batch_bytes: usize,
    /// How long to wait for a fuller batch once the first event is ready.
    pub linger_ms: u64,
    /// First retry delay after a transient fault, milliseconds.
    pub retry_initial_ms: u64,
    /// Longest retry delay, milliseconds. Transient faults are retried forever.
    pub retry_max_ms: u64,
    /// Requests in flight at once per API key.
    pub max_in_flight: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            max_batch: 100,
            max_batch_bytes: 1_000_000,
            linger_ms: 200,
            retry_initial_ms: 250,
            retry_max_ms: 30_000,
            max_in_flight: 4,
        }
    }
}

impl DeliveryConfig {
    /// Every problem with the `[delivery]` section.
    pub fn check(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let dl = self;
        if dl.max_batch == 0 || dl.max_batch > MAX_CASES_PER_REQUEST {
            errors.push(format!(
                "delivery.max_batch must be within 1..={} (got {})",
                MAX_CASES_PER_REQUEST, dl.max_batch
            ));
        }
        if dl.max_batch_bytes < 1024 || dl.max_batch_bytes > MAX_BODY_BYTES {
            errors.push(format!(
                "delivery.max_batch_bytes must be within 1024..={} (got {})",
                MAX_BODY_BYTES, dl.max_batch_bytes
            ));
        }
        if dl.retry_initial_ms == 0 || dl.retry_max_ms < dl.retry_initial_ms {
            errors.push("delivery.retry_initial_ms must be >= 1 and <= retry_max_ms".into());
        }
        if dl.max_in_flight == 0 {
            errors.push("delivery.max_in_flight must be at least 1".into());
        }
        errors
    }
}
