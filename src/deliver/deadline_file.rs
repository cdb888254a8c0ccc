//! The API's latest `retry-after` deadline, kept in a small file in the
//! outbox directory, so a bridge restarted inside a deadline the server gave
//! it (a crash loop, a deploy during a 429 storm) waits it out instead of
//! asking again early.
//!
//! Not part of the outbox's durability promise: the file is replaced by a
//! rename, without fsync (a SIGKILL keeps it; a power cut may lose the last
//! one, and by the time a machine is back such a deadline has usually
//! passed). A file that cannot be read is logged and ignored.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use super::gate::RateGate;

/// File name inside the outbox directory.
pub const FILE: &str = "duvo-api-deadline";

/// The deadline kept by an earlier run, if it is still ahead.
pub fn load(dir: &Path) -> Option<SystemTime> {
    let path = dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the kept API deadline; ignoring it");
            return None;
        }
    };
    let Ok(ms) = text.trim().parse::<u64>() else {
        tracing::warn!(path = %path.display(), "kept API deadline is not a number; ignoring it");
        return None;
    };
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    (at > SystemTime::now()).then_some(at)
}

/// Apply an earlier run's deadline to `gate` (before anything is sent).
pub fn restore(gate: &RateGate, dir: &Path) {
    if let Some(at) = load(dir) {
        let secs = at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .as_secs_f64();
        tracing::info!(
            wait_secs = secs,
            "the API asked an earlier run to wait (retry-after); waiting out the rest"
        );
        gate.block_until(at);
    }
}

/// Keep every deadline `gate` learns from now on (it subscribes before
/// returning, so nothing learnt before the future first runs is missed),
/// until `stop`.
pub fn keep(
    gate: &RateGate,
    dir: PathBuf,
    stop: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = gate.deadlines();
    async move {
        loop {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
            }
            let Some(at) = *rx.borrow_and_update() else {
                continue;
            };
            if let Err(e) = write(&dir, at).await {
                tracing::warn!(error = %e, "cannot keep the API's retry-after deadline for a restart");
            }
        }
    }
}

async fn write(dir: &Path, at: SystemTime) -> std::io::Result<()> {
    let ms = crate::clock::unix_ms(at);
    let tmp = dir.join(format!("{FILE}.tmp"));
    tokio::fs::write(&tmp, format!("{ms}\n")).await?;
    tokio::fs::rename(&tmp, dir.join(FILE)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::gate::{RateGateConfig, RequestClass, ServerFeedback};

    #[tokio::test]
    async fn a_deadline_learnt_is_kept_and_waited_out_by_the_next_run() {
        let dir = tempfile::tempdir().unwrap();
        let gate = RateGate::new(RateGateConfig::default());
        let stop = CancellationToken::new();
        let keeper = tokio::spawn(keep(&gate, dir.path().into(), stop.clone()));
        let permit = gate.acquire(RequestClass::Create).await;
        permit.observe(
            &ServerFeedback {
                retry_after_in: Some(Duration::from_secs(30)),
                ..Default::default()
            }
            .with_status(429),
        );
        let mut kept = None;
        for _ in 0..100 {
            kept = load(dir.path());
            if kept.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let kept = kept.expect("deadline written");
        let left = kept.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(28), "{left:?}");
        stop.cancel();
        keeper.await.unwrap();

        // The next run: its gate holds every request until the deadline.
        let next = RateGate::new(RateGateConfig::default());
        restore(&next, dir.path());
        let early = tokio::time::timeout(
            Duration::from_millis(300),
            next.acquire(RequestClass::Create),
        )
        .await;
        assert!(early.is_err(), "a request let through inside the deadline");
    }

    #[test]
    fn past_or_unreadable_deadlines_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()), None);
        std::fs::write(dir.path().join(FILE), "12\n").unwrap();
        assert_eq!(load(dir.path()), None, "long past");
        std::fs::write(dir.path().join(FILE), "soon").unwrap();
        assert_eq!(load(dir.path()), None);
    }
}
