//! Signal handling. SIGTERM/SIGINT cancel a token; every long-running task
//! watches it. The drain (stop intake, finish in-flight work, bounded by a
//! grace period) is orchestrated by `app`; this module only turns signals
//! into cancellation so it can be replaced in tests by cancelling directly.

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
