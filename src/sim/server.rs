//! HTTP side of the simulator: routing, auth, rate limit, faults, handlers,
//! and the accept loop.
//!
//! API requests go through one dispatcher instead of axum extractors because
//! the contract fixes the order of checks (401 -> 429 -> faults -> 404/403 ->
//! 413 -> 400 -> idempotency -> commit), which extractor rejections would
//! break. Connections are served by hand (hyper http1 per TCP stream) so the
//! `drop_after_commit` fault can close a socket without any answer.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use hyper::body::Incoming;
use hyper::service::Service as _;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::faults::{FaultsPatch, roll};
use super::ratelimit::RateVerdict;
use super::state::{Begin, Counters, lock};
use super::validate::{self, Invalid};
use super::{KeyAccess, SimState};
use crate::duvo::types::{CreateCasesResponse, ErrorBody, MAX_BODY_BYTES, MAX_CASES_PER_REQUEST};

/// Most bytes discarded from an oversized body before answering 413. Reading
/// (not storing) the rest lets the client see the 413 instead of a reset.
const DRAIN_CAP: usize = 16 * MAX_BODY_BYTES;

/// Per-connection signal: fired by a handler to close its connection with no
/// HTTP answer (the `drop_after_commit` fault).
#[derive(Clone, Default)]
pub(crate) struct DropSignal(Arc<Notify>);

/// An API error answer: status + `{"error","message","request_id"}`.
#[derive(Debug, thiserror::Error)]
#[error("{status} {kind}: {message}")]
pub(crate) struct ApiFailure {
    status: StatusCode,
    kind: &'static str,
    message: String,
    details: Option<serde_json::Value>,
}

impl ApiFailure {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiFailure {
            status,
            kind,
            message: message.into(),
            details: None,
        }
    }
    fn unauthorized(m: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", m)
    }
    fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", m)
    }
    fn conflict(m: &str) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", m)
    }
    fn too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body exceeds {MAX_BODY_BYTES} bytes"),
        )
    }
    fn injected(status: u16) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let kind = match status.as_u16() {
            400 => "invalid_request",
            401 => "unauthorized",
            403 => "forbidden",
            404 => "not_found",
            409 => "conflict",
            413 => "payload_too_large",
            429 => "rate_limited",
            500 => "internal_error",
            502 => "bad_gateway",
            503 => "service_unavailable",
            504 => "gateway_timeout",
            s if s >= 500 => "server_error",
            _ => "client_error",
        };
        Self::new(status, kind, "simulated fault (error_ratio)")
    }

    fn into_response(self, request_id: &str) -> Response {
        let body = ErrorBody {
            error: self.kind.to_string(),
            message: self.message,
            code: None,
            request_id: Some(request_id.to_string()),
            details: self.details,
        };
        json_response(
            self.status,
            serde_json::to_vec(&body).unwrap_or_default().into(),
        )
    }
}

impl From<Invalid> for ApiFailure {
    fn from(i: Invalid) -> Self {
        let mut f = Self::new(StatusCode::BAD_REQUEST, "invalid_request", i.message);
        if i.problems.len() > 1 {
            f.details = Some(serde_json::json!({ "problems": i.problems }));
        }
        f
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Result<Response, ApiFailure> {
    let bytes = serde_json::to_vec(v).map_err(|e| {
        ApiFailure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e.to_string(),
        )
    })?;
    Ok(json_response(status, bytes.into()))
}

/// Holds an idempotency record "in progress" until the answer leaves; on drop
/// it either publishes the committed answer or forgets the key.
struct IdemGuard {
    state: Arc<SimState>,
    scope: (String, String),
    result: Option<(u16, Bytes)>,
}

impl Drop for IdemGuard {
    fn drop(&mut self) {
        let mut idem = lock(&self.state.idem);
        match self.result.take() {
            Some((s, b)) => idem.complete(&self.scope, s, b),
            None => idem.abandon(&self.scope),
        }
    }
}

struct Reply {
    resp: Response,
    guard: Option<IdemGuard>,
}

impl From<Response> for Reply {
    fn from(resp: Response) -> Self {
        Reply { resp, guard: None }
    }
}

pub(crate) fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/_sim/stats", get(sim_stats))
        .route("/_sim/cases", get(sim_cases))
        .route("/_sim/faults", get(get_faults).post(post_faults))
        .fallback(dispatch)
        .with_state(state)
}

async fn sim_stats(State(st): State<Arc<SimState>>) -> Response {
    json(StatusCode::OK, &st.stats()).unwrap_or_else(|e| e.into_response("sim"))
}

async fn get_faults(State(st): State<Arc<SimState>>) -> Response {
    let f = lock(&st.faults).clone();
    json(StatusCode::OK, &f).unwrap_or_else(|e| e.into_response("sim"))
}

async fn post_faults(State(st): State<Arc<SimState>>, body: Bytes) -> Response {
    let patch: FaultsPatch = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return ApiFailure::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
                .into_response("sim");
        }
    };
    let mut f = lock(&st.faults);
    if let Err(e) = f.apply(&patch) {
        return ApiFailure::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
            .into_response("sim");
    }
    // Plain fields; revoked keys only counted (they are keys).
    tracing::info!(
        error_ratio = f.error_ratio,
        error_status = f.error_status,
        latency_ms = f.latency_ms,
        outage = f.outage,
        drop_after_commit_ratio = f.drop_after_commit_ratio,
        throttle_until_unix_ms = f.throttle_until_unix_ms,
        reject_marked = f.reject_marked,
        revoked_keys = f.revoked_keys.len(),
        "simulator faults changed"
    );
    let snapshot = f.clone();
    drop(f);
    json(StatusCode::OK, &snapshot).unwrap_or_else(|e| e.into_response("sim"))
}

/// NDJSON of every case, produced in chunks so 100k cases never become one
/// giant string and the store lock is held only per chunk.
async fn sim_cases(State(st): State<Arc<SimState>>) -> Response {
    const CHUNK: usize = 500;
    let stream = futures::stream::unfold(0usize, move |from| {
        let st = st.clone();
        async move {
            let cases = lock(&st.store).chunk(from, CHUNK);
            if cases.is_empty() {
                return None;
            }
            let mut buf = Vec::with_capacity(cases.len() * 256);
            for c in &cases {
                if serde_json::to_writer(&mut buf, c).is_ok() {
                    buf.push(b'\n');
                }
            }
            Some((Ok::<_, Infallible>(Bytes::from(buf)), from + cases.len()))
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// Per-request context the decorator needs after the handler ran.
#[derive(Default)]
struct Ctx {
    rate: Option<RateVerdict>,
    /// Send `retry-after` as an HTTP-date naming this instant (429 storm).
    retry_at: Option<SystemTime>,
}

async fn dispatch(State(st): State<Arc<SimState>>, req: Request) -> Response {
    let request_id = format!("req_{}", Uuid::new_v4().simple());
    Counters::inc(&st.counters.requests);
    let mut ctx = Ctx::default();
    let Reply { mut resp, guard } = match handle(&st, req, &mut ctx).await {
        Ok(r) => r,
        Err(e) => e.into_response(&request_id).into(),
    };
    decorate(&st, &ctx, &request_id, resp.headers_mut());
    st.counters.record_response(resp.status().as_u16());
    let latency = lock(&st.faults).latency_ms;
    if latency > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(latency)).await;
    }
    drop(guard);
    resp
}

fn decorate(st: &SimState, ctx: &Ctx, request_id: &str, h: &mut HeaderMap) {
    let mut put = |name: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(name, v);
        }
    };
    put("x-request-id", request_id.to_string());
    if let Some(r) = ctx.rate {
        put("x-ratelimit-limit", r.limit.to_string());
        put("x-ratelimit-remaining", r.remaining.to_string());
        put("x-ratelimit-reset", r.reset_unix.to_string());
        match (ctx.retry_at, r.retry_after_secs) {
            (Some(at), _) => put("retry-after", httpdate::fmt_http_date(at)),
            (None, Some(s)) => put("retry-after", s.to_string()),
            (None, None) => {}
        }
    }
    if st.cfg.deprecated {
        put("deprecation", format!("@{}", st.started_unix));
        put("sunset", st.sunset.clone());
    }
}

fn authenticate(st: &SimState, h: &HeaderMap) -> Result<String, ApiFailure> {
    let Some(v) = h.get(header::AUTHORIZATION) else {
        return Err(ApiFailure::unauthorized(
            "missing Authorization header; send `Authorization: Bearer <api key>`",
        ));
    };
    let v = v.to_str().unwrap_or("");
    let token = match v.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
        _ => "",
    };
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(ApiFailure::unauthorized(
            "malformed Authorization header; expected `Bearer <api key>`",
        ));
    }
    if !st.keys.contains_key(token) {
        return Err(ApiFailure::unauthorized("unknown API key"));
    }
    if lock(&st.faults).revoked_keys.iter().any(|k| k == token) {
        return Err(ApiFailure::unauthorized("this API key was revoked"));
    }
    Ok(token.to_owned())
}

enum Route {
    Queue,
    Cases,
    Search,
    BulkRetry,
}

async fn handle(st: &Arc<SimState>, req: Request, ctx: &mut Ctx) -> Result<Reply, ApiFailure> {
    let path = req.uri().path().to_owned();
    let rest = match path.strip_prefix(st.prefix.as_str()) {
        Some(r) if r.is_empty() || r.starts_with('/') => r,
        _ => return Err(ApiFailure::not_found(format!("no route for {path}"))),
    };
    let key = match authenticate(st, req.headers()) {
        Ok(k) => k,
        Err(e) => {
            Counters::inc(&st.counters.unauthorized);
            return Err(e);
        }
    };
    let now = SystemTime::now();
    let faults = lock(&st.faults).clone();
    let storm = faults
        .throttled_until(now)
        .map(|until| (until, faults.throttle_http_date));
    let verdict = match storm {
        Some((until, _)) => st.limiter.refuse_until(&key, until, now),
        None => st.limiter.check(&key, now),
    };
    ctx.rate = Some(verdict);
    if let Some((_, true)) = storm {
        // The key's deadline (the latest it was given), whole seconds.
        ctx.retry_at =
            Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(verdict.reset_unix));
    }
    if verdict.early_retry {
        Counters::inc(&st.counters.early_retries);
    }
    if !verdict.allowed {
        Counters::inc(&st.counters.rate_limited);
        let message = if storm.is_some() {
            Counters::inc(&st.counters.faults_injected);
            "simulated 429 storm (throttle_secs); retry after the time in retry-after".to_string()
        } else {
            format!(
                "rate limit of {} requests per {} s exceeded; retry after the window resets",
                st.cfg.rate_limit, st.cfg.window_secs
            )
        };
        return Err(ApiFailure::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            message,
        ));
    }
    if faults.outage {
        Counters::inc(&st.counters.faults_injected);
        return Err(ApiFailure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "simulated outage",
        ));
    }
    if roll(faults.error_ratio) {
        Counters::inc(&st.counters.faults_injected);
        return Err(ApiFailure::injected(faults.error_status));
    }
    let segs: Vec<&str> = rest.trim_matches('/').split('/').collect();
    let (route, qid) = match segs.as_slice() {
        ["queues", q] => (Route::Queue, *q),
        ["queues", q, "cases"] => (Route::Cases, *q),
        ["queues", q, "cases", "search"] => (Route::Search, *q),
        ["queues", q, "cases", "bulk-retry"] => (Route::BulkRetry, *q),
        _ => return Err(ApiFailure::not_found(format!("no route for {path}"))),
    };
    let method = req.method().clone();
    let allowed: &[Method] = match route {
        Route::Queue => &[Method::GET],
        Route::Cases => &[Method::GET, Method::POST],
        Route::Search | Route::BulkRetry => &[Method::POST],
    };
    if !allowed.contains(&method) {
        return Err(ApiFailure::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        ));
    }
    let queue = match Uuid::parse_str(qid)
        .ok()
        .filter(|q| st.queues.contains_key(q))
    {
        Some(q) => q,
        None => return Err(ApiFailure::not_found(format!("queue {qid} not found"))),
    };
    let may_use = match st.keys.get(&key) {
        Some(KeyAccess::All) => true,
        Some(KeyAccess::Only(qs)) => qs.contains(&queue),
        None => false,
    };
    if !may_use {
        return Err(ApiFailure::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this API key has no access to queue {queue}"),
        ));
    }
    match (route, method == Method::POST) {
        (Route::Queue, _) => {
            let (name, created_at) = st.queues.get(&queue).cloned().unwrap_or_default();
            let n = lock(&st.store).queue_len(queue);
            json(
                StatusCode::OK,
                &serde_json::json!({"id": queue, "name": name, "created_at": created_at, "case_count": n}),
            )
            .map(Reply::from)
        }
        (Route::Cases, false) => {
            let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(req.uri())
                .map_err(|e| Invalid::one_pub(format!("bad query string: {e}")))?;
            let params = validate::list_query(&pairs)?;
            Counters::inc(&st.counters.list_requests);
            let list = lock(&st.store).list(queue, &params);
            json(StatusCode::OK, &list).map(Reply::from)
        }
        (Route::Search, _) => {
            let body = read_body(req.into_body(), None).await?;
            let params = validate::search_body(&body)?;
            Counters::inc(&st.counters.list_requests);
            let list = lock(&st.store).list(queue, &params);
            json(StatusCode::OK, &list).map(Reply::from)
        }
        (Route::BulkRetry, _) => {
            let body = read_body(req.into_body(), None).await?;
            bulk_retry(st, queue, &body).map(Reply::from)
        }
        (Route::Cases, true) => {
            create(st, req, key, queue, &path, faults.drop_after_commit_ratio).await
        }
    }
}

#[derive(Deserialize)]
struct BulkRetryBody {
    case_ids: Vec<Uuid>,
}

fn bulk_retry(st: &SimState, queue: Uuid, body: &[u8]) -> Result<Response, ApiFailure> {
    let b: BulkRetryBody = serde_json::from_slice(body)
        .map_err(|e| Invalid::one_pub(format!("invalid bulk-retry body: {e}")))?;
    if b.case_ids.is_empty() || b.case_ids.len() > MAX_CASES_PER_REQUEST {
        return Err(Invalid::one_pub(format!(
            "case_ids must hold 1 to {MAX_CASES_PER_REQUEST} ids"
        ))
        .into());
    }
    let (first, _) = super::agent::halves(st.cfg.process_ms);
    let (retried, skipped) =
        lock(&st.store).retry(queue, &b.case_ids, tokio::time::Instant::now() + first);
    st.agent_wake.notify_one();
    json(
        StatusCode::OK,
        // The contract's shape: skipped ids (why each was skipped is logged).
        &serde_json::json!({"retried": retried, "skipped": skipped.iter().map(|s| {
            tracing::debug!(case_id = %s.id, reason = %s.reason, "bulk-retry skipped a case");
            s.id
        }).collect::<Vec<_>>()}),
    )
}

async fn create(
    st: &Arc<SimState>,
    req: Request,
    key: String,
    queue: Uuid,
    path: &str,
    drop_ratio: f64,
) -> Result<Reply, ApiFailure> {
    Counters::inc(&st.counters.create_requests);
    let signal = req.extensions().get::<DropSignal>().cloned();
    let idem_key = match req.headers().get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(s) if !s.is_empty() && s.len() <= 255 => Some(s.to_owned()),
            _ => {
                return Err(Invalid::one_pub(
                    "Idempotency-Key must be 1 to 255 visible ASCII characters",
                )
                .into());
            }
        },
    };
    let content_length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    let body = read_body(req.into_body(), content_length).await?;
    let reject_marked = lock(&st.faults).reject_marked;
    let cases = validate::create_body_with(&body, reject_marked)?;

    let mut guard = None;
    let idem_key = idem_key.filter(|_| st.cfg.idempotency == super::IdempotencyMode::Honour);
    if let Some(ik) = idem_key {
        // The fingerprint covers the path too: the same key sent to another
        // queue is a different request, not a replay.
        let mut h = Sha256::new();
        h.update(path.as_bytes());
        h.update([0u8]);
        h.update(&body);
        let fp: [u8; 32] = h.finalize().into();
        let scope = (key, ik);
        let begin = lock(&st.idem).begin(scope.clone(), fp, tokio::time::Instant::now());
        match begin {
            Begin::Fresh => {
                guard = Some(IdemGuard {
                    state: st.clone(),
                    scope,
                    result: None,
                })
            }
            Begin::Replay(status, body) => {
                Counters::inc(&st.counters.idempotent_replays);
                let mut r = json_response(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::CREATED),
                    body,
                );
                r.headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
                return Ok(r.into());
            }
            Begin::InProgress => {
                return Err(ApiFailure::conflict(
                    "a request with this Idempotency-Key is still in progress; retry later",
                ));
            }
            Begin::Mismatch => {
                return Err(ApiFailure::conflict(
                    "this Idempotency-Key was already used with a different request body",
                ));
            }
        }
    }

    let (first, _) = super::agent::halves(st.cfg.process_ms);
    let n = cases.len() as u64;
    let added = lock(&st.store).commit(queue, cases, tokio::time::Instant::now() + first);
    st.agent_wake.notify_one();
    Counters::add(&st.counters.cases_created, n);
    let bytes: Bytes = serde_json::to_vec(&CreateCasesResponse { added_cases: added })
        .map_err(|e| {
            ApiFailure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                e.to_string(),
            )
        })?
        .into();
    if let Some(g) = guard.as_mut() {
        g.result = Some((201, bytes.clone()));
    }
    if roll(drop_ratio) {
        match signal {
            Some(sig) => {
                // Publish the idempotency record first: a retry must replay.
                drop(guard.take());
                Counters::inc(&st.counters.dropped_after_commit);
                st.counters.record_response(0);
                sig.0.notify_one();
                std::future::pending::<()>().await;
            }
            None => tracing::warn!("drop_after_commit fault without a connection signal"),
        }
    }
    Ok(Reply {
        resp: json_response(StatusCode::CREATED, bytes),
        guard,
    })
}

/// Read a body up to [`MAX_BODY_BYTES`]; 413 from Content-Length up front or
/// as soon as the streamed size crosses the limit.
async fn read_body(body: Body, content_length: Option<u64>) -> Result<Bytes, ApiFailure> {
    let mut stream = body.into_data_stream();
    if content_length.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        drain(&mut stream).await;
        return Err(ApiFailure::too_large());
    }
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiFailure::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("could not read request body: {e}"),
            )
        })?;
        if buf.len() + chunk.len() > MAX_BODY_BYTES {
            drain(&mut stream).await;
            return Err(ApiFailure::too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

async fn drain(stream: &mut axum::body::BodyDataStream) {
    let mut seen = 0usize;
    while let Some(Ok(c)) = stream.next().await {
        seen += c.len();
        if seen > DRAIN_CAP {
            break;
        }
    }
}

impl Invalid {
    pub(crate) fn one_pub(msg: impl Into<String>) -> Self {
        let m = msg.into();
        Invalid {
            message: m.clone(),
            problems: vec![m],
        }
    }
}

/// Accept loop: one hyper http1 connection per TCP stream, each with its own
/// [`DropSignal`] in every request's extensions.
pub(crate) async fn serve(listener: TcpListener, app: Router, cancel: CancellationToken) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // e.g. EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "simulator accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = cancel.cancelled() => return,
        };
        let app = app.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let signal = DropSignal::default();
            let sig = signal.clone();
            let tower = TowerToHyperService::new(app);
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(sig.clone());
                tower.call(req)
            });
            // A timer lets hyper enforce its header-read timeout, so idle
            // half-open clients cannot pin connections forever.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "simulator connection ended with an error");
                },
                _ = signal.0.notified() => {
                    tracing::debug!("simulated fault: connection closed after commit without an answer");
                }
                _ = cancel.cancelled() => {}
            }
        });
    }
}
