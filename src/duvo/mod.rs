//! Typed async client for the Duvo cases API.
//!
//! One [`DuvoClient`] per API key. It knows nothing about rate limiting or
//! retries: it sends one request, and hands back the body together with what
//! the server said about the rate-limit window ([`RateLimitInfo`]), so the
//! caller (the rate gate and the retry policy in `deliver`) decides what to do.
//! That split keeps the client trivially testable and lets the tracker and the
//! batcher share one gate.

pub mod config;
pub mod headers;
pub mod types;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap};
use serde::de::DeserializeOwned;
use uuid::Uuid;

pub use headers::{LifecycleInfo, RateLimitInfo};
pub use types::*;

use crate::secret::ApiKey;

/// Where and how to reach the API.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Scheme, host and port, e.g. `https://api.duvo.ai`.
    pub base_url: String,
    /// Version prefix, e.g. `/v2` (older deployments: `/v1`).
    pub version_prefix: String,
    pub api_key: ApiKey,
    /// Whole-request timeout; a timeout is a transient fault.
    pub timeout: Duration,
}

/// A successful answer with the rate-limit state the server reported.
#[derive(Debug, Clone)]
pub struct ApiResponse<T> {
    pub status: StatusCode,
    pub body: T,
    pub rate: RateLimitInfo,
    /// The server's clock when it answered (`Date`, whole seconds).
    pub date: Option<SystemTime>,
}

/// Why a request did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The server answered with a non-2xx status.
    #[error("Duvo API answered {status}: {} ({})", body.error, body.message)]
    Status {
        status: StatusCode,
        /// Boxed: error bodies can be large and this error travels in every
        /// `Result` of the client.
        body: Box<ErrorBody>,
        rate: RateLimitInfo,
    },
    /// Timeout, refused or reset connection, or a response cut short: the
    /// request may or may not have been processed.
    #[error("transport error talking to Duvo API: {0}")]
    Transport(String),
    /// No connection could be opened: nothing reached the server.
    #[error("cannot connect to Duvo API: {0}")]
    Connect(String),
    /// A 2xx answer whose body did not parse.
    #[error("Duvo API answered {status} with an unreadable body: {message}")]
    Decode { status: StatusCode, message: String },
}

impl ApiError {
    /// Worth retrying unchanged: 408, 425, 429, 5xx, transport faults.
    /// 4xx are permanent for this request (409 too: same key, other body).
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || status.as_u16() == 425
            }
            ApiError::Transport(_) | ApiError::Connect(_) => true,
            // A 2xx we could not read: the server did the work; retrying
            // with the same idempotency key replays the answer.
            ApiError::Decode { .. } => true,
        }
    }

    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ApiError::Status { status, .. } | ApiError::Decode { status, .. } => Some(*status),
            ApiError::Transport(_) | ApiError::Connect(_) => None,
        }
    }

    /// Whether the server may have carried the request out although we
    /// have no answer saying so: a timeout or a connection cut after the
    /// request left, a 5xx (a proxy's 502/504 says nothing about the
    /// origin), 408, a 409 (the same key still in progress), an unreadable
    /// 2xx. Before sending such a create again, the batcher looks for its
    /// cases (`deliver::reconcile`). Any other answer is the server saying
    /// it did nothing.
    pub fn may_have_committed(&self) -> bool {
        match self {
            ApiError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::CONFLICT
            }
            ApiError::Transport(_) | ApiError::Decode { .. } => true,
            ApiError::Connect(_) => false,
        }
    }

    pub fn rate(&self) -> Option<&RateLimitInfo> {
        match self {
            ApiError::Status { rate, .. } => Some(rate),
            _ => None,
        }
    }
}

fn transport(e: reqwest::Error) -> ApiError {
    // reqwest errors carry the URL, never headers, so the key cannot leak;
    // strip the URL anyway to keep messages short and stable.
    if e.is_connect() {
        ApiError::Connect(e.without_url().to_string())
    } else {
        ApiError::Transport(e.without_url().to_string())
    }
}

/// Async client for one API key.
pub struct DuvoClient {
    http: reqwest::Client,
    base: String,
    key: ApiKey,
    lifecycle_warned: AtomicBool,
}

impl std::fmt::Debug for DuvoClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DuvoClient")
            .field("base", &self.base)
            .field("key", &self.key)
            .finish()
    }
}

impl DuvoClient {
    pub fn new(cfg: ClientConfig) -> Result<Self, ApiError> {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("duvo-bridge/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(50))
            .build()
            .map_err(transport)?;
        let prefix = cfg.version_prefix.trim_matches('/');
        let base = if prefix.is_empty() {
            cfg.base_url.trim_end_matches('/').to_string()
        } else {
            format!("{}/{}", cfg.base_url.trim_end_matches('/'), prefix)
        };
        Ok(DuvoClient {
            http,
            base,
            key: cfg.api_key,
            lifecycle_warned: AtomicBool::new(false),
        })
    }

    /// Base URL including the version prefix.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn cases_url(&self, queue: Uuid) -> String {
        format!("{}/queues/{queue}/cases", self.base)
    }

    /// Create one case (`{"case": ...}`).
    pub async fn create_case(
        &self,
        queue: Uuid,
        case: NewCase,
        idempotency_key: Option<&str>,
    ) -> Result<ApiResponse<CreateCasesResponse>, ApiError> {
        self.create_cases(queue, &CreateCasesRequest::single(case), idempotency_key)
            .await
    }

    /// Create cases from a typed request.
    pub async fn create_cases(
        &self,
        queue: Uuid,
        req: &CreateCasesRequest,
        idempotency_key: Option<&str>,
    ) -> Result<ApiResponse<CreateCasesResponse>, ApiError> {
        let body = serde_json::to_vec(req).expect("request types always serialise");
        self.create_cases_raw(queue, Bytes::from(body), idempotency_key)
            .await
    }

    /// Create cases from an already serialised body. The batcher uses this so
    /// the bytes it measured against the payload limit are the bytes it sends,
    /// and a retry sends exactly the same body under the same key.
    pub async fn create_cases_raw(
        &self,
        queue: Uuid,
        body: Bytes,
        idempotency_key: Option<&str>,
    ) -> Result<ApiResponse<CreateCasesResponse>, ApiError> {
        let mut rb = self
            .http
            .post(self.cases_url(queue))
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(k) = idempotency_key {
            rb = rb.header("Idempotency-Key", k);
        }
        self.send(rb).await
    }

    /// `GET /queues/{id}/cases` with filters and pagination.
    pub async fn list_cases(
        &self,
        queue: Uuid,
        q: &ListQuery,
    ) -> Result<ApiResponse<CaseList>, ApiError> {
        let mut params: Vec<(&str, String)> = Vec::new();
        if let Some(l) = q.limit {
            params.push(("limit", l.to_string()));
        }
        if let Some(o) = q.offset {
            params.push(("offset", o.to_string()));
        }
        if !q.status.is_empty() {
            let s: Vec<&str> = q.status.iter().map(|s| s.as_str()).collect();
            params.push(("status", s.join(",")));
        }
        if let Some(s) = &q.search {
            params.push(("search", s.clone()));
        }
        if let Some(t) = q.created_at_from {
            params.push(("created_at_from", rfc3339(t)));
        }
        if let Some(t) = q.updated_at_from {
            params.push(("updated_at_from", rfc3339(t)));
        }
        if let Some(s) = q.sort_by {
            params.push(("sort_by", s.as_str().into()));
        }
        if let Some(o) = q.sort_order {
            params.push(("sort_order", o.as_str().into()));
        }
        let rb = self.http.get(self.cases_url(queue)).query(&params);
        self.send(rb).await
    }

    /// `GET /queues/{id}`: whether the queue exists and this key may use it
    /// (404, 403), before anything is sent to it.
    pub async fn get_queue(&self, queue: Uuid) -> Result<ApiResponse<serde_json::Value>, ApiError> {
        let rb = self.http.get(format!("{}/queues/{queue}", self.base));
        self.send(rb).await
    }

    /// `POST /queues/{id}/cases/bulk-retry`: failed cases back to pending.
    pub async fn bulk_retry(
        &self,
        queue: Uuid,
        case_ids: &[Uuid],
    ) -> Result<ApiResponse<BulkRetryResponse>, ApiError> {
        let body = BulkRetryRequest {
            case_ids: case_ids.to_vec(),
        };
        let rb = self
            .http
            .post(format!("{}/bulk-retry", self.cases_url(queue)))
            .json(&body);
        self.send(rb).await
    }

    /// `POST /queues/{id}/cases/search`.
    pub async fn search_cases(
        &self,
        queue: Uuid,
        req: &SearchRequest,
    ) -> Result<ApiResponse<CaseList>, ApiError> {
        let rb = self
            .http
            .post(format!("{}/search", self.cases_url(queue)))
            .json(req);
        self.send(rb).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        rb: reqwest::RequestBuilder,
    ) -> Result<ApiResponse<T>, ApiError> {
        let resp = rb
            .header(AUTHORIZATION, format!("Bearer {}", self.key.expose()))
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status();
        let rate = RateLimitInfo::from_headers(resp.headers(), SystemTime::now());
        let date = headers::server_date(resp.headers());
        self.check_lifecycle(resp.headers());
        let bytes = resp.bytes().await.map_err(transport)?;
        if status.is_success() {
            match serde_json::from_slice::<T>(&bytes) {
                Ok(body) => Ok(ApiResponse {
                    status,
                    body,
                    rate,
                    date,
                }),
                Err(e) => Err(ApiError::Decode {
                    status,
                    message: e.to_string(),
                }),
            }
        } else {
            let body = Box::new(
                serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
                    error: status
                        .canonical_reason()
                        .unwrap_or("unknown")
                        .to_lowercase()
                        .replace(' ', "_"),
                    message: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
                    ..ErrorBody::default()
                }),
            );
            Err(ApiError::Status { status, body, rate })
        }
    }

    /// `Deprecation` / `Sunset`: warn once per client, count every time.
    fn check_lifecycle(&self, headers: &HeaderMap) {
        let info = LifecycleInfo::from_headers(headers);
        if !info.is_present() {
            return;
        }
        metrics::counter!("duvo_bridge_api_deprecation_notices_total").increment(1);
        if !self.lifecycle_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                deprecation = info.deprecation.as_deref().unwrap_or("-"),
                sunset = info.sunset.as_deref().unwrap_or("-"),
                base = %self.base,
                "the Duvo API marked this endpoint deprecated; plan an upgrade of version_prefix"
            );
        }
    }

    /// Whether a Deprecation/Sunset warning has been logged (for tests).
    pub fn lifecycle_warned(&self) -> bool {
        self.lifecycle_warned.load(Ordering::Relaxed)
    }
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}
