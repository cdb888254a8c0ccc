//! Signal handling. SIGTERM/SIGINT cancel a token; every long-running task
//! watches it. The drain (stop intake, finish in-flight work, bounded by a
//! grace period) is orchestrated by `app`; this module only turns signals
//! into cancellation so it can be replaced in tests by cancelling directly.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Resolve when SIGTERM or SIGINT arrives (ctrl-c only on non-Unix).
pub async fn signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return "SIGINT";
            }
        };
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// Cancel `token` at the first signal.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let which = signal().await;
        tracing::info!(signal = which, "shutdown requested: draining");
        token.cancel();
    });
}

/// Graceful shutdown.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// On SIGTERM/SIGINT: stop intake, then keep delivering for at most this
    /// long before exiting. Whatever is not delivered stays in the outbox.
    pub grace_period_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace_period_secs: 20,
        }
    }
}

impl ShutdownConfig {
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.grace_period_secs)
    }
}
