//! Admin listener: `/metrics` (Prometheus), `/healthz` (the process is
//! alive and its loops turn), `/readyz` (it should be sent traffic); the
//! operator endpoints (`crate::operator::endpoints`) are merged into it,
//! behind the `[admin]` token configured here.
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

use crate::secret::Secret;

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

/// The admin routes, plus `extra` (the operator endpoints, which live
/// above the outbox in [`crate::operator`]) when given.
/// The admin listener's OpenAPI 3.1 document (`docs/openapi/admin.json`,
/// validated in CI; the operator endpoints included), at `GET /openapi.json`.
pub const OPENAPI: &str = include_str!("../docs/openapi/admin.json");

pub fn router(prometheus: PrometheusHandle, health: Health, extra: Option<Router>) -> Router {
    let base = Router::new()
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState { prometheus, health });
    match extra {
        Some(r) => base.merge(r),
        None => base,
    }
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
    extra: Option<Router>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    crate::listener::serve(
        listener,
        router(prometheus, health, extra),
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

/// Admin HTTP listener: `/metrics`, `/healthz`, `/readyz`, and the
/// operator endpoints (`/v1/outbox/...`, used by `duvo-bridge outbox
/// --admin URL`) when a token is configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: String,
    /// Environment variable holding the bearer token of the operator
    /// endpoints. Neither this nor `token_credential` set: they are off
    /// (404), and only metrics and probes are served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// Name of a systemd credential holding that token
    /// (`$CREDENTIALS_DIRECTORY/<name>`); takes precedence over `token_env`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_credential: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9090".into(),
            token_env: None,
            token_credential: None,
        }
    }
}

impl AdminConfig {
    /// Every problem with the `[admin]` section.
    pub fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.listen.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "admin.listen {:?} is not an address like 127.0.0.1:9090",
                self.listen
            ));
        }
        if let Err(e) = self.token() {
            problems.push(e);
        }
        problems
    }

    /// The operator endpoints' token, if they are on.
    pub fn token(&self) -> Result<Option<Secret>, String> {
        if let Some(name) = &self.token_credential {
            return crate::secret::read_credential("admin.token_credential", name)
                .map(|t| Some(Secret::new(t)));
        }
        match &self.token_env {
            None => Ok(None),
            Some(var) => match std::env::var(var) {
                Ok(s) if !s.is_empty() => Ok(Some(Secret::new(s))),
                _ => Err(format!(
                    "admin.token_env: environment variable {var} is not set or empty"
                )),
            },
        }
    }
}
