//! Admin listener: `/metrics` (Prometheus), `/healthz` (the process is
//! alive and its loops turn), `/readyz` (it should be sent traffic).
//!
//! Readiness is the conjunction of named conditions that components set
//! through a shared [`Health`]: a source that is not bound, an outbox over
//! its high-water mark, or a drain in progress each make `/readyz` answer
//! 503 with the reasons, so a load balancer or Kubernetes stops routing to
//! this replica while it catches up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Named readiness conditions. A condition set to `Err(reason)` makes the
/// bridge unready.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<Mutex<BTreeMap<String, Result<(), String>>>>,
}

impl Health {
    pub fn set_ready(&self, name: &str) {
        self.update(name, Ok(()));
    }

    pub fn set_unready(&self, name: &str, reason: impl Into<String>) {
        self.update(name, Err(reason.into()));
    }

    fn update(&self, name: &str, v: Result<(), String>) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(name.to_string(), v);
        let ready = m.values().all(Result::is_ok);
        metrics::gauge!("duvo_bridge_ready").set(if ready { 1.0 } else { 0.0 });
    }

    /// `Ok` when every condition holds; otherwise the failing ones.
    pub fn check(&self) -> Result<(), Vec<(String, String)>> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let bad: Vec<(String, String)> = m
            .iter()
            .filter_map(|(k, v)| v.as_ref().err().map(|e| (k.clone(), e.clone())))
            .collect();
        if bad.is_empty() { Ok(()) } else { Err(bad) }
    }
}

#[derive(Clone)]
struct AdminState {
    prometheus: PrometheusHandle,
    health: Health,
}

pub fn router(prometheus: PrometheusHandle, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState { prometheus, health })
}

async fn metrics(State(s): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.prometheus.render(),
    )
        .into_response()
}

async fn readyz(State(s): State<AdminState>) -> Response {
    match s.health.check() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(bad) => {
            let body: BTreeMap<String, String> = bad.into_iter().collect();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(serde_json::json!({ "ready": false, "reasons": body })),
            )
                .into_response()
        }
    }
}

/// Serve the admin router until `shutdown` is cancelled. The admin port
/// stays up through the drain so probes and scrapes see it happen.
pub async fn serve(
    listener: TcpListener,
    prometheus: PrometheusHandle,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    crate::listener::serve(
        listener,
        router(prometheus, health),
        crate::listener::ListenerLimits::default(),
        shutdown,
    )
    .await
}

pub async fn bind(addr: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

/// Admin HTTP listener: `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9090".into(),
        }
    }
}

impl AdminConfig {
    /// Every problem with the `[admin]` section.
    pub fn check(&self) -> Vec<String> {
        match self.listen.parse::<SocketAddr>() {
            Ok(_) => Vec::new(),
            Err(_) => vec![format!(
                "admin.listen {:?} is not an address like 127.0.0.1:9090",
                self.listen
            )],
        }
    }
}
