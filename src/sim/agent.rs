//! The simulated agent: moves cases pending -> claimed -> completed/failed.
//!
//! It sleeps until the earliest agenda entry is due (a min-heap by due time),
//! so its cost is O(log n) per transition and nothing per idle tick, however
//! many cases exist. New work wakes it through a `Notify`.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::SimState;
use super::state::{lock, would_fail};

/// Most transitions applied per lock hold, so a burst of due cases never
/// blocks request handlers for long.
const BATCH: usize = 2_000;

/// Delay from creation (or retry) to claim, and from claim to the end:
/// `process_ms` split in two halves.
pub(crate) fn halves(process_ms: u64) -> (Duration, Duration) {
    let first = process_ms / 2;
    (
        Duration::from_millis(first),
        Duration::from_millis(process_ms - first),
    )
}

pub(crate) async fn run(state: Arc<SimState>, cancel: CancellationToken) {
    let (_, finish_after) = halves(state.cfg.process_ms);
    let fail_ratio = state.cfg.fail_ratio;
    let fail =
        move |c: &crate::duvo::types::Case| would_fail(&c.title, c.data.as_deref(), fail_ratio);
    loop {
        let next = lock(&state.store).run_due(Instant::now(), finish_after, &fail, BATCH);
        match next {
            Some(at) if at <= Instant::now() => {
                // More already due: let other tasks run, then continue.
                tokio::task::yield_now().await;
            }
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = state.agent_wake.notified() => {}
                    _ = cancel.cancelled() => return,
                }
            }
            None => {
                tokio::select! {
                    _ = state.agent_wake.notified() => {}
                    _ = cancel.cancelled() => return,
                }
            }
        }
        if cancel.is_cancelled() {
            return;
        }
    }
}
