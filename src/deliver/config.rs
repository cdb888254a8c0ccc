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
    /// Key of the label every case carries naming its batch (the value is
    /// the batch's `Idempotency-Key`). After an attempt whose outcome is
    /// unknown (timeout, cut connection, 5xx, 409), the bridge lists the
    /// queue for cases with this label before sending again, and re-sends
    /// only the cases that are not there: no duplicate even when the
    /// server ignores `Idempotency-Key`. Default: `duvo-bridge-batch`.
    pub batch_label_key: String,
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
            batch_label_key: DEFAULT_BATCH_LABEL_KEY.into(),
        }
    }
}

/// Default of [`DeliveryConfig::batch_label_key`].
pub const DEFAULT_BATCH_LABEL_KEY: &str = "duvo-bridge-batch";

/// Longest batch label value: an idempotency key (outbox UUID, `-`, batch
/// id).
const BATCH_LABEL_VALUE_LEN: usize = 36 + 1 + 20;

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
        let key = &dl.batch_label_key;
        if key.is_empty()
            || key.len() > 100
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b))
        {
            errors.push(format!(
                "delivery.batch_label_key {key:?} must be 1 to 100 characters of A-Z a-z 0-9 - _ . : /"
            ));
        }
        errors
    }

    /// Bytes the batch label adds to one case in a request body (an upper
    /// bound: `,"labels":[{"key":"..","value":".."}]`), reserved out of
    /// every size budget so a labelled batch still fits.
    pub fn batch_label_overhead(&self) -> usize {
        r#","labels":[{"key":"","value":""}]"#.len()
            + self.batch_label_key.len()
            + BATCH_LABEL_VALUE_LEN
    }
}
