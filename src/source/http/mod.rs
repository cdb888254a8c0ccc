//! HTTP inbound source: `POST /v1/events` and `GET /v1/events/{id}`.
//!
//! A request is answered 202 only after every event in it is durably in the
//! outbox, so a client that got a 202 may forget the events. A client that
//! got anything else (or nothing: timeout, reset) must retry; sending the
//! same request with the same `Idempotency-Key` answers the same event ids
//! and stores nothing twice (identity = source + key + position). Without a
//! key, a configured `event_id_field` gives each event its own identity.
//!
//! Bad input never half-succeeds: malformed JSON, invalid UTF-8, a
//! non-object element, an oversize body or event are refused as a whole
//! with a JSON error naming where the problem is, and nothing is stored.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::decode::{BodyFormat, decode_events};
use super::{Source, SourceContext, SourceError};
pub mod config;

use crate::listener::ListenerLimits;
use crate::outbox::{EventId, NewEvent, Origin};
use crate::raw_json::RawEvent;
use crate::report::callback_policy::CallbackPolicy;
use crate::routing::{Inputs, Router as Routes};
use crate::secret::Secret;
pub use config::HttpSourceConfig;
use config::check_http_url;

/// Longest accepted `X-Duvo-Callback-Url` (it is kept with every event of
/// the request).
const MAX_CALLBACK_URL_LEN: usize = 2048;
/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// Seconds a client is asked to wait when the outbox is full.
const RETRY_AFTER_FULL_SECS: u64 = 5;

pub struct HttpSource {
    cfg: HttpSourceConfig,
    listener: TcpListener,
    addr: SocketAddr,
    router: Arc<Routes>,
    token: Option<Secret>,
}

impl HttpSource {
    /// Bind the listener now, so a port conflict fails start-up (and port 0
    /// gives the real port before anything runs).
    pub async fn bind(cfg: HttpSourceConfig) -> Result<HttpSource, SourceError> {
        let conf_err = |message: String| SourceError::Config {
            source_name: cfg.name.clone(),
            message,
        };
        let router = super::routing(&cfg.name, &cfg.mapping(), &cfg.queue_id, &cfg.routes)?;
        let token = cfg.auth_token().map_err(conf_err)?;
        let listener = TcpListener::bind(&cfg.listen)
            .await
            .map_err(|err| SourceError::Bind {
                source_name: cfg.name.clone(),
                addr: cfg.listen.clone(),
                err,
            })?;
        let addr = listener.local_addr().map_err(|err| SourceError::Bind {
            source_name: cfg.name.clone(),
            addr: cfg.listen.clone(),
            err,
        })?;
        Ok(HttpSource {
            cfg,
            listener,
            addr,
            router: Arc::new(router),
            token,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

#[derive(Clone)]
struct HttpState {
    name: Arc<str>,
    cfg: Arc<HttpSourceConfig>,
    router: Arc<Routes>,
    token: Option<Secret>,
    ctx: SourceContext,
    /// Body bytes being read or decoded, one permit per byte.
    inflight: Arc<Semaphore>,
    /// Where per-request callback URLs may go.
    callback_policy: Arc<CallbackPolicy>,
    /// One turn per stripe of Idempotency-Keys (see [`key_turn`]).
    key_turns: Arc<[tokio::sync::Mutex<()>]>,
}

impl Source for HttpSource {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, anyhow::Result<()>> {
        async move {
            let HttpSource {
                cfg,
                listener,
                addr,
                router: routes,
                token,
            } = *self;
            let health_key = format!("source:{}", cfg.name);
            ctx.health.set_ready(&health_key);
            let queues: Vec<String> = routes
                .targets()
                .map(|t| format!("{}={}", t.route, t.queue_id))
                .collect();
            tracing::info!(source = %cfg.name, %addr, routes = %queues.join(" "), "HTTP source listening");
            let state = HttpState {
                name: Arc::from(cfg.name.as_str()),
                router: routes,
                token,
                ctx: ctx.clone(),
                inflight: Arc::new(Semaphore::new(cfg.max_inflight_bytes)),
                callback_policy: Arc::new(cfg.callback_policy()),
                key_turns: (0..KEY_TURNS)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                cfg: Arc::new(cfg),
            };
            let limit = state.cfg.max_body_bytes;
            let limits = ListenerLimits {
                header_read_timeout: Duration::from_millis(state.cfg.header_read_timeout_ms),
                max_connections: state.cfg.max_connections,
            };
            let app = router(state).layer(DefaultBodyLimit::max(limit));
            // Graceful: stop accepting, let requests in progress finish
            // their append (and so their acknowledgement).
            crate::listener::serve(listener, app, limits, ctx.stop.clone()).await?;
            ctx.health.set_unready(&health_key, "stopped");
            Ok(())
        }
        .boxed()
    }
}

/// The intake's OpenAPI 3.1 document (`docs/openapi/intake.json`,
/// validated in CI), served at `GET /openapi.json` without a token: it
/// describes the API, it holds nothing of the data.
pub const OPENAPI: &str = include_str!("../../../docs/openapi/intake.json");

fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v1/events", post(post_events))
        .route("/v1/events/{id}", get(get_event))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .with_state(state)
}

fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({ "error": kind, "message": message.into() })),
    )
        .into_response()
}

/// 503 with `Retry-After`: nothing was stored, the client should retry.
fn unavailable(kind: &str, message: &str) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, kind, message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, RETRY_AFTER_FULL_SECS.into());
    r
}

fn count_rejected(source: &str, reason: &'static str) {
    metrics::counter!("duvo_bridge_events_rejected_total", "source" => source.to_string(), "reason" => reason)
        .increment(1);
}

fn authorized(state: &HttpState, headers: &HeaderMap) -> bool {
    let Some(expected) = &state.token else {
        return true;
    };
    let Some(got) = crate::secret::bearer(headers) else {
        return false;
    };
    crate::secret::constant_time_eq(got.as_bytes(), expected.expose().as_bytes())
}

async fn post_events(State(state): State<HttpState>, headers: HeaderMap, body: Body) -> Response {
    let src = &*state.name;
    // Everything that can refuse a request is decided on its headers,
    // before a byte of its body is read.
    if let Err(refusal) = admit(&state, &headers) {
        return *refusal;
    }
    let max = state.cfg.max_body_bytes;
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > max as u64) {
        count_rejected(src, "too_large");
        discard(body, announced, &state.cfg).await;
        return too_large(max);
    }
    // Room for the body (announced, or the largest allowed) among the
    // bytes all requests of this source are reading and decoding.
    let want = announced.map_or(max, |n| n as usize).max(1) as u32;
    let Ok(_room) = state.inflight.clone().try_acquire_many_owned(want) else {
        count_rejected(src, "busy");
        discard(body, announced, &state.cfg).await;
        return unavailable(
            "busy",
            "too many request bodies are being read; retry shortly",
        );
    };
    let timeout = Duration::from_millis(state.cfg.body_read_timeout_ms);
    let Ok(body) = tokio::time::timeout(timeout, read_body(body, announced, max)).await else {
        count_rejected(src, "body_timeout");
        return error(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the request body did not arrive within {timeout:?}"),
        );
    };
    let body = match body {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            count_rejected(src, "too_large");
            return too_large(max);
        }
        Err(BodyError::Unreadable(e)) => {
            count_rejected(src, "unreadable");
            return error(StatusCode::BAD_REQUEST, "unreadable_body", e.to_string());
        }
    };
    let (idem_key, callback_url) = match request_options(&state, &headers) {
        Ok(o) => o,
        Err(refusal) => return *refusal,
    };
    let format = BodyFormat::from_content_type(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    );
    let events = match decode_events(&body, format, state.cfg.max_events_per_request) {
        Ok(ev) => ev,
        Err(e) => {
            count_rejected(src, "malformed");
            return (StatusCode::BAD_REQUEST, axum::Json(e.to_json())).into_response();
        }
    };
    metrics::counter!("duvo_bridge_events_received_total", "source" => src.to_string())
        .increment(events.len() as u64);

    // Requests with one Idempotency-Key are decided one at a time, so two
    // different bodies sent at once under one key cannot both be stored.
    let _key_turn = match &idem_key {
        Some(k) => Some(state.key_turns[key_turn(k)].lock().await),
        None => None,
    };
    let key_prefix = match &idem_key {
        Some(k) => match key_identity_prefix(&state, k, &body) {
            Ok(p) => Some(p),
            Err(refusal) => return *refusal,
        },
        None => None,
    };
    let batch = match to_new_events(
        &state,
        &headers,
        &events,
        key_prefix.as_deref(),
        callback_url,
    ) {
        Ok(b) => b,
        Err(refusal) => return *refusal,
    };
    store(&state, batch).await
}

/// How many [`HttpState::key_turns`] there are.
const KEY_TURNS: usize = 64;

fn key_turn(key: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() as usize) % KEY_TURNS
}

/// The identity prefix of the events of a request sent with Idempotency-Key
/// `key`: `http:{source}:keyb:{len}:{key}:{digest}:` (then the event's
/// position), where the digest is of the body's bytes. The same key with
/// the same body is the same request (its events are duplicates); the same
/// key with another body is refused with 422, nothing stored. Requests
/// stored by older versions (`http:{source}:key:{key}:{i}`, no digest) keep
/// their identities.
fn key_identity_prefix(state: &HttpState, key: &str, body: &[u8]) -> Result<String, Box<Response>> {
    use sha2::{Digest, Sha256};
    let src = &*state.name;
    let outbox = &state.ctx.outbox;
    let failed = |e: crate::outbox::OutboxError| {
        tracing::error!(source = src, error = %e, "outbox read failed; nothing acknowledged");
        count_rejected(src, "outbox_error");
        Box::new(unavailable(
            "outbox_error",
            "the event store failed; nothing was stored, retry",
        ))
    };
    let legacy = format!("http:{src}:key:{key}:");
    if outbox
        .identity_known(&format!("{legacy}0"))
        .map_err(failed)?
    {
        return Ok(legacy);
    }
    let digest: String = Sha256::digest(body)
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    let of_key = format!("http:{src}:keyb:{}:{key}:", key.len());
    let ours = format!("{of_key}{digest}:");
    match outbox.first_identity_with_prefix(&of_key).map_err(failed)? {
        Some(known) if !known.starts_with(&ours) => {
            count_rejected(src, "idempotency_key_reused");
            Err(Box::new(error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used with another body; nothing was stored (a retry must send the same bytes)",
            )))
        }
        _ => Ok(ours),
    }
}

/// Longest time a refused body is read and dropped before the answer.
const DISCARD_FOR: Duration = Duration::from_secs(1);

/// Read and drop what an authenticated client is still sending of a body
/// that is refused (what it announced, at most 64 MiB, for at most
/// [`DISCARD_FOR`]), so it reads the answer instead of a connection reset.
/// Nothing is kept.
async fn discard(body: Body, announced: Option<u64>, cfg: &HttpSourceConfig) {
    use http_body_util::BodyExt;
    const MOST: u64 = 64 * 1024 * 1024;
    let mut body = body;
    let mut left = announced.unwrap_or(cfg.max_body_bytes as u64).min(MOST) as usize;
    // Briefly: a client that sends nothing more gets its answer anyway.
    let deadline = tokio::time::Instant::now()
        + Duration::from_millis(cfg.body_read_timeout_ms).min(DISCARD_FOR);
    while left > 0 {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(f))) => {
                left = left.saturating_sub(f.data_ref().map_or(0, |d| d.len()));
            }
            _ => break,
        }
    }
}

/// 413 for a body over `max` bytes.
fn too_large(max: usize) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request body is larger than {max} bytes"),
    )
}

/// Whether reading a body failed on its length limit.
enum BodyError {
    TooLarge,
    Unreadable(axum::Error),
}

/// Read the body into one buffer sized by its `Content-Length` (capped at
/// `max`): each frame is copied once and dropped, so a request costs its
/// size, not the frames plus a contiguous copy of them (what collecting
/// and then flattening costs).
async fn read_body(
    mut body: Body,
    announced: Option<u64>,
    max: usize,
) -> Result<Vec<u8>, BodyError> {
    use http_body_util::BodyExt as _;
    let mut buf = Vec::with_capacity(announced.map_or(0, |n| (n as usize).min(max)));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Unreadable)?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > max {
                return Err(BodyError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf)
}

/// Whether a request may come in at all: the token, the drain, the
/// outbox's high-water mark.
fn admit(state: &HttpState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let src = &*state.name;
    if !authorized(state, headers) {
        count_rejected(src, "unauthorized");
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        )));
    }
    if state.ctx.stop.is_cancelled() {
        count_rejected(src, "shutting_down");
        return Err(Box::new(unavailable(
            "shutting_down",
            "the bridge is draining; retry against another replica or later",
        )));
    }
    if state.ctx.outbox.over_high_water() {
        count_rejected(src, "outbox_full");
        return Err(Box::new(unavailable(
            "outbox_full",
            "the outbox is over its high-water mark; retry later",
        )));
    }
    Ok(())
}

/// The request's Idempotency-Key and per-request callback URL, checked.
fn request_options(
    state: &HttpState,
    headers: &HeaderMap,
) -> Result<(Option<String>, Option<String>), Box<Response>> {
    let src = &*state.name;
    let idem_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(s) if !s.is_empty() && s.len() <= MAX_IDEMPOTENCY_KEY_LEN => Some(s.to_string()),
            _ => {
                count_rejected(src, "bad_idempotency_key");
                return Err(Box::new(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_idempotency_key",
                    format!(
                        "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
                    ),
                )));
            }
        },
    };
    let callback_url = match headers.get(crate::report::http::CALLBACK_URL_HEADER) {
        None => None,
        Some(_) if !state.cfg.callback_url_header => {
            count_rejected(src, "callback_url_not_allowed");
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                "callback_url_not_allowed",
                "this source does not accept X-Duvo-Callback-Url (set callback_url_header = true)",
            )));
        }
        Some(v) if v.len() > MAX_CALLBACK_URL_LEN => {
            count_rejected(src, "bad_callback_url");
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                "invalid_callback_url",
                format!("X-Duvo-Callback-Url is longer than {MAX_CALLBACK_URL_LEN} bytes"),
            )));
        }
        Some(v) => match v.to_str().ok().filter(|u| check_http_url(u).is_ok()) {
            Some(u) => {
                if let Err(e) = state.callback_policy.check_url(u) {
                    count_rejected(src, "forbidden_callback_url");
                    return Err(Box::new(error(
                        StatusCode::BAD_REQUEST,
                        "forbidden_callback_url",
                        format!("X-Duvo-Callback-Url: {e}"),
                    )));
                }
                Some(u.to_string())
            }
            None => {
                count_rejected(src, "bad_callback_url");
                return Err(Box::new(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_callback_url",
                    "X-Duvo-Callback-Url must be an absolute http:// or https:// URL",
                )));
            }
        },
    };
    Ok((idem_key, callback_url))
}

/// Map each event to its case and outbox record; refuses the whole
/// request when one case is too large for the API.
fn to_new_events(
    state: &HttpState,
    headers: &HeaderMap,
    events: &[RawEvent<'_>],
    key_prefix: Option<&str>,
    callback_url: Option<String>,
) -> Result<Vec<NewEvent>, Box<Response>> {
    let src = &*state.name;
    let received_at_ms = crate::clock::now_ms();
    let mut batch = Vec::with_capacity(events.len());
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut routes = Vec::with_capacity(events.len());
    for (i, ev) in events.iter().enumerate() {
        let Some(target) = state.router.route(&Inputs {
            event: Some(ev),
            header: &header,
            topic: None,
        }) else {
            count_rejected(src, "no_route");
            return Err(Box::new((
                StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(json!({
                    "error": "no_route",
                    "message": format!("event #{i} matches none of source {src}'s routes and the source has no default queue_id; nothing was stored"),
                    "index": i,
                })),
            )
                .into_response()));
        };
        routes.push(target.route.clone());
        let case = target.mapper.map(ev);
        let size = serde_json::to_vec(&case).map(|v| v.len()).unwrap_or(0);
        if size > state.ctx.max_case_bytes {
            count_rejected(src, "event_too_large");
            return Err(Box::new((
                StatusCode::PAYLOAD_TOO_LARGE,
                axum::Json(json!({
                    "error": "event_too_large",
                    "message": format!("event #{i} maps to a case of {size} bytes; the API accepts at most {} per request", state.ctx.max_case_bytes),
                    "index": i,
                })),
            )
                .into_response()));
        }
        let identity = match key_prefix {
            Some(prefix) => Some(format!("{prefix}{i}")),
            None => state
                .cfg
                .event_id_field
                .as_deref()
                .and_then(|p| ev.pointer(p))
                .and_then(|v| v.as_id())
                .map(|id| format!("http:{src}:id:{id}")),
        };
        batch.push(NewEvent {
            source: src.to_string(),
            identity,
            queue_id: target.queue_id,
            case,
            received_at_ms,
            origin: Some(Origin::Http {
                callback_url: callback_url.clone(),
                callback_ref: None,
            }),
        });
    }
    for r in &routes {
        crate::routing::count_routed(src, r);
    }
    Ok(batch)
}

/// Append the request's events; 202 with their ids once durable.
async fn store(state: &HttpState, batch: Vec<NewEvent>) -> Response {
    let src = &*state.name;
    match state.ctx.outbox.append(batch).await {
        Ok(outcomes) => {
            let (stored, dups) = super::count_appended(src, &outcomes);
            let ids: Vec<String> = outcomes.iter().map(|o| o.id().to_string()).collect();
            (
                StatusCode::ACCEPTED,
                axum::Json(json!({ "ids": ids, "stored": stored, "duplicates": dups })),
            )
                .into_response()
        }
        Err(e) => {
            tracing::error!(source = src, error = %e, "outbox append failed; nothing acknowledged");
            count_rejected(src, "outbox_error");
            unavailable(
                "outbox_error",
                "the event store failed; nothing was stored, retry",
            )
        }
    }
}

async fn get_event(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !authorized(&state, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        );
    }
    let Ok(id) = id.parse::<EventId>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            "event ids are decimal numbers",
        );
    };
    match state.ctx.outbox.get(id) {
        Ok(Some(view)) => (StatusCode::OK, axum::Json(view)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such event (unknown, or delivered longer ago than the retention period)",
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "outbox_error",
            e.to_string(),
        ),
    }
}
