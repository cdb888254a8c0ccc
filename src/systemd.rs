//! Service-manager notifications (`sd_notify`): `READY=1` once the bridge
//! is started, `WATCHDOG=1` pings while the process is healthy, `STATUS=`
//! lines with the backlog, `RELOADING=1` around a SIGHUP reload and
//! `STOPPING=1` when the drain begins.
//!
//! Everything here is a no-op when `NOTIFY_SOCKET` is unset (not started by
//! systemd with `Type=notify`), so the same binary runs anywhere. A failed
//! notification is logged once at debug level and otherwise ignored: the
//! bridge must never stop delivering because the service manager is gone.
//!
//! The watchdog only pings when the outbox's group-commit flusher answers a
//! flush within the ping interval: a wedged disk, a stuck flusher or a
//! starved runtime stop the pings, and systemd restarts the service after
//! `WatchdogSec`. Undelivered events are safe on disk and resume at the
//! next start.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::deliver::gate::RateGate;
use crate::outbox::Outbox;

/// How often `STATUS=` is refreshed when no watchdog asks for more.
const STATUS_EVERY: Duration = Duration::from_secs(5);

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// `READY=1` with a first status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1`: the drain has begun.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// `RELOADING=1` (with the monotonic time systemd 253+ wants), before a
/// reload; follow with [`reloaded`].
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading")];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send(&states);
}

/// `READY=1` after a reload, with what it did.
pub fn reloaded(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, for this pid).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// One status line: backlog, age of the oldest event, pace.
pub fn status_line(outbox: &Outbox, gate: &RateGate, draining: bool) -> String {
    let depth = outbox.depth();
    let oldest = outbox
        .ready_summary()
        .iter()
        .map(|r| r.oldest_received_at_ms)
        .min()
        .map(|t| crate::clock::now_ms().saturating_sub(t) / 1000);
    let g = gate.stats();
    let what = if draining { "draining" } else { "running" };
    match oldest {
        Some(age) => format!(
            "{what}: backlog {depth} events, oldest {age}s, pace {:.0} req/min",
            g.effective_rpm
        ),
        None => format!(
            "{what}: backlog {depth} events, pace {:.0} req/min",
            g.effective_rpm
        ),
    }
}

/// Ping the watchdog at half its interval while the outbox flusher
/// answers, and refresh `STATUS=`; returns when `stop` is cancelled.
/// Without `NOTIFY_SOCKET` it returns at once.
pub async fn supervise(
    outbox: Outbox,
    gate: RateGate,
    draining: CancellationToken,
    stop: CancellationToken,
) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let watchdog = watchdog_interval();
    let every = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
    if let Some(w) = watchdog {
        tracing::info!(
            watchdog_ms = w.as_millis() as u64,
            ping_ms = every.as_millis() as u64,
            "systemd watchdog enabled"
        );
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = tokio::time::Instant::now() - STATUS_EVERY;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if watchdog.is_some() {
            // Healthy = the flusher completes an fsync within the interval.
            match tokio::time::timeout(every, outbox.flush()).await {
                Ok(Ok(())) => send(&[NotifyState::Watchdog]),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "outbox flush failed: withholding the watchdog ping");
                }
                Err(_) => tracing::error!(
                    timeout_ms = every.as_millis() as u64,
                    "outbox flush did not answer in time: withholding the watchdog ping"
                ),
            }
        }
        if last_status.elapsed() >= STATUS_EVERY {
            last_status = tokio::time::Instant::now();
            let line = status_line(&outbox, &gate, draining.is_cancelled());
            send(&[NotifyState::Status(&line)]);
        }
    }
}
