//! The accept loop of the bridge's own HTTP listeners (the HTTP intake and
//! the admin listener), with the limits `axum::serve` does not have: a
//! client must send its request headers within a timeout (also while a
//! keep-alive connection sits idle), and at most so many connections are
//! open at once, so slow or idle clients cannot pin the process's sockets
//! and memory. Bodies are the handlers' business (they read them with their
//! own limits and timeout).
//!
//! Stopping is graceful: no new connection is accepted, requests in
//! progress finish, idle connections are closed.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest read buffer of one connection (headers must fit in it).
const READ_BUFFER_MAX: usize = 64 * 1024;

/// Limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// Longest time a client may take to send a request's headers, counted
    /// from the connection's start or the previous response.
    pub header_read_timeout: Duration,
    /// Most connections open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

/// Serve `app` on `listener` until `stop`, then finish the requests in
/// progress and return.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ListenerLimits,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let slots = std::sync::Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let conns = TaskTracker::new();
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            _ = stop.cancelled() => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // e.g. EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let app = app.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            let svc = TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                // hyper's adaptive read buffer grows to ~400 KiB on a fast
                // body: a thousand connections sending (or being drained
                // of) bodies would hold 400 MiB in buffers alone. 64 KiB
                // still holds any header block we accept.
                .max_buf_size(READ_BUFFER_MAX)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => log_end(r),
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    log_end(conn.await);
                }
            }
        });
    }
    // Refuse new connections at once rather than leave them in the
    // backlog while the requests in progress finish.
    drop(listener);
    conns.close();
    conns.wait().await;
    Ok(())
}

fn log_end(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
