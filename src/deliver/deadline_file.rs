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

/// File name inside the outbox directory (the default account's; another
/// account's adds `.<name>`: each key has its own deadlines).
pub const FILE: &str = "duvo-api-deadline";

/// Where `account`'s deadline is kept in the outbox directory `dir`.
pub fn path(dir: &Path, account: &str) -> PathBuf {
    if account == crate::duvo::config::DEFAULT_ACCOUNT {
        dir.join(FILE)
    } else {
        dir.join(format!("{FILE}.{account}"))
    }
}

/// The deadline kept by an earlier run in `path`, if it is still ahead.
pub fn load(path: &Path) -> Option<SystemTime> {
    let text = match std::fs::read_to_string(path) {
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
pub fn restore(gate: &RateGate, path: &Path) {
    if let Some(at) = load(path) {
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
    path: PathBuf,
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
            if let Err(e) = write(&path, at).await {
                tracing::warn!(error = %e, "cannot keep the API's retry-after deadline for a restart");
            }
        }
    }
}

async fn write(path: &Path, at: SystemTime) -> std::io::Result<()> {
    let ms = crate::clock::unix_ms(at);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    tokio::fs::write(&tmp, format!("{ms}\n")).await?;
    tokio::fs::rename(&tmp, path).await
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
        let keeper = tokio::spawn(keep(&gate, path(dir.path(), "default"), stop.clone()));
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
            kept = load(&path(dir.path(), "default"));
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
        restore(&next, &path(dir.path(), "default"));
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
        assert_eq!(load(&path(dir.path(), "default")), None);
        std::fs::write(path(dir.path(), "default"), "12\n").unwrap();
        assert_eq!(load(&path(dir.path(), "default")), None, "long past");
        std::fs::write(path(dir.path(), "default"), "soon").unwrap();
        assert_eq!(load(&path(dir.path(), "default")), None);
    }
}
