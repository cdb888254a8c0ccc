//! The operator endpoints on the admin listener: `/v1/outbox/stats`,
//! `/v1/outbox/events[/{id}]`, `/v1/outbox/dead-letters` (NDJSON) and its
//! `replay` and `purge`. What `duvo-bridge outbox --admin URL` calls.
//!
//! Off unless `[admin]` names a token (404 `operator_api_off`); then every
//! request must bear it (401 otherwise), checked before any body is read:
//! these endpoints show payloads and change the outbox. Bodies are capped
//! at 64 KiB; scans run on the blocking pool.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::deliver::QueueScope;
use crate::outbox::{DeadLetterSelector, EventFilter, EventId, Outbox, OutboxError};
use crate::secret::Secret;
use crate::track::redrive::{RedriveError, Redriver, RetryCases};

/// What the operator endpoints work on: the live outbox, and the token a
/// request must bear (`None`: the endpoints are off).
#[derive(Clone)]
pub struct Operator {
    pub outbox: Outbox,
    pub token: Option<Secret>,
    /// Re-drives failed cases in Duvo under the rate gate of the account
    /// whose scope holds the queue (`POST /v1/cases/retry`); none: that
    /// endpoint answers 404.
    pub redrive: Vec<(QueueScope, Redriver)>,
}

/// Largest operator request body (a replay or purge selector).
const MAX_OPERATOR_BODY: usize = 64 * 1024;
/// Most records one `GET /v1/outbox/events` returns.
pub const MAX_LIST_LIMIT: usize = 10_000;

/// The operator routes, to merge into the admin router.
pub fn router(op: Operator) -> Router {
    Router::new()
        .route("/v1/outbox/stats", get(op_stats))
        .route("/v1/outbox/events", get(op_list))
        .route("/v1/outbox/events/{id}", get(op_inspect))
        .route("/v1/outbox/dead-letters", get(op_dead_letters))
        .route("/v1/outbox/dead-letters/replay", post(op_replay))
        .route("/v1/outbox/dead-letters/purge", post(op_purge))
        .route("/v1/outbox/compact", post(op_compact))
        .route("/v1/cases/retry", post(op_cases_retry))
        // Checked before any handler runs, so before a body is read.
        .layer(axum::middleware::from_fn_with_state(op.clone(), op_auth))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_OPERATOR_BODY))
        .with_state(op)
}

fn op_error(status: StatusCode, error: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "error": error, "message": message.into() })),
    )
        .into_response()
}

async fn op_auth(State(op): State<Operator>, req: Request, next: Next) -> Response {
    let Some(expected) = &op.token else {
        return op_error(
            StatusCode::NOT_FOUND,
            "operator_api_off",
            "the operator endpoints are off: set [admin] token_env or token_credential",
        );
    };
    let ok = crate::secret::bearer(req.headers()).is_some_and(|got| {
        crate::secret::constant_time_eq(got.as_bytes(), expected.expose().as_bytes())
    });
    if !ok {
        metrics::counter!("duvo_bridge_admin_unauthorized_total").increment(1);
        let mut r = op_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    next.run(req).await
}

fn outbox_failure(e: OutboxError) -> Response {
    match e {
        OutboxError::Invalid(m) => op_error(StatusCode::BAD_REQUEST, "invalid_request", m),
        e => op_error(StatusCode::INTERNAL_SERVER_ERROR, "outbox", e.to_string()),
    }
}

/// Run a scan of the outbox on the blocking pool (a census reads every
/// record) and answer with its JSON.
async fn blocking_json<T: Serialize + Send + 'static>(
    f: impl FnOnce() -> Result<T, OutboxError> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(e)) => outbox_failure(e),
        Err(e) => op_error(StatusCode::INTERNAL_SERVER_ERROR, "task", e.to_string()),
    }
}

async fn op_stats(State(op): State<Operator>) -> Response {
    blocking_json(move || op.outbox.census()).await
}

/// Copy the outbox into a fresh file now, giving back the disk it no
/// longer needs (what the bridge does by itself past `compact_min_mb`).
async fn op_compact(State(op): State<Operator>) -> Response {
    blocking_json(move || op.outbox.compact()).await
}

/// `GET /v1/outbox/events` query: the filter and a limit (flat: a
/// flattened struct would see every query value as a string).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    queue: Option<uuid::Uuid>,
    source: Option<String>,
    after: Option<EventId>,
    limit: Option<usize>,
}

async fn op_list(
    State(op): State<Operator>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return op_error(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    let limit = q.limit.unwrap_or(100).min(MAX_LIST_LIMIT);
    let filter = EventFilter {
        state: q.state,
        queue: q.queue,
        source: q.source,
        after: q.after,
    };
    blocking_json(move || op.outbox.list_events(&filter, limit)).await
}

async fn op_inspect(State(op): State<Operator>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<EventId>() else {
        return op_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{id:?} is not an event id"),
        );
    };
    match tokio::task::spawn_blocking(move || op.outbox.inspect_event(id)).await {
        Ok(Ok(Some(v))) => axum::Json(v).into_response(),
        Ok(Ok(None)) => op_error(StatusCode::NOT_FOUND, "not_found", format!("no event {id}")),
        Ok(Err(e)) => outbox_failure(e),
        Err(e) => op_error(StatusCode::INTERNAL_SERVER_ERROR, "task", e.to_string()),
    }
}

/// `GET /v1/outbox/dead-letters` query: `ids` comma-separated, filters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterQuery {
    ids: Option<String>,
    queue: Option<uuid::Uuid>,
    source: Option<String>,
    error: Option<String>,
    status: Option<u16>,
}

/// NDJSON, one dead letter per line (the export format).
async fn op_dead_letters(
    State(op): State<Operator>,
    q: Result<Query<DeadLetterQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return op_error(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    let mut ids = Vec::new();
    for part in q
        .ids
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|p| !p.is_empty())
    {
        match part.trim().parse::<EventId>() {
            Ok(id) => ids.push(id),
            Err(_) => {
                return op_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("{part:?} is not an event id"),
                );
            }
        }
    }
    let sel = DeadLetterSelector {
        all: ids.is_empty(),
        ids,
        queue: q.queue,
        source: q.source,
        error: q.error,
        status: q.status,
    };
    match tokio::task::spawn_blocking(move || op.outbox.dead_letters_selected(&sel)).await {
        Ok(Ok(letters)) => {
            let mut body = Vec::new();
            for d in &letters {
                if serde_json::to_writer(&mut body, d).is_ok() {
                    body.push(b'\n');
                }
            }
            ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
        }
        Ok(Err(e)) => outbox_failure(e),
        Err(e) => op_error(StatusCode::INTERNAL_SERVER_ERROR, "task", e.to_string()),
    }
}

/// Body of a replay or purge: a selector (a purge also needs
/// `"confirm": true`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MutateBody {
    #[serde(default)]
    ids: Vec<EventId>,
    #[serde(default)]
    all: bool,
    queue: Option<uuid::Uuid>,
    source: Option<String>,
    error: Option<String>,
    status: Option<u16>,
    #[serde(default)]
    confirm: bool,
}

struct Mutation {
    sel: DeadLetterSelector,
    confirm: bool,
}

fn mutate_body(body: &[u8]) -> Result<Mutation, Box<Response>> {
    let b: MutateBody = serde_json::from_slice(body).map_err(|e| {
        op_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("invalid body: {e}"),
        )
    })?;
    let b = Mutation {
        sel: DeadLetterSelector {
            ids: b.ids,
            all: b.all,
            queue: b.queue,
            source: b.source,
            error: b.error,
            status: b.status,
        },
        confirm: b.confirm,
    };
    if b.sel.ids.is_empty() && !b.sel.all {
        return Err(Box::new(op_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "select dead letters by \"ids\" or with \"all\": true (and optional queue, source, error, status)",
        )));
    }
    Ok(b)
}

async fn op_replay(State(op): State<Operator>, body: Bytes) -> Response {
    let b = match mutate_body(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    match op.outbox.replay_dead_letters(&b.sel).await {
        Ok(replayed) => axum::Json(serde_json::json!({ "replayed": replayed })).into_response(),
        Err(e) => outbox_failure(e),
    }
}

async fn op_purge(State(op): State<Operator>, body: Bytes) -> Response {
    let b = match mutate_body(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    if !b.confirm {
        return op_error(
            StatusCode::BAD_REQUEST,
            "confirmation_required",
            "a purge removes dead letters for good: send \"confirm\": true",
        );
    }
    match op.outbox.purge_dead_letters(&b.sel).await {
        Ok(ids) => axum::Json(serde_json::json!({ "purged": ids })).into_response(),
        Err(e) => outbox_failure(e),
    }
}

/// `POST /v1/cases/retry` with a [`RetryCases`] body: lists the queue's
/// failed cases, retries them in Duvo under the rate gate (so the answer
/// can take a while on a busy key), and answers what was done.
async fn op_cases_retry(State(op): State<Operator>, body: Bytes) -> Response {
    let req: RetryCases = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return op_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("invalid body: {e}"),
            );
        }
    };
    let Some((_, redrive)) = op
        .redrive
        .iter()
        .find(|(scope, _)| scope.contains(&req.queue))
    else {
        return op_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "this bridge does not re-drive cases",
        );
    };
    match redrive.run(req).await {
        Ok(out) => axum::Json(out).into_response(),
        Err(e @ RedriveError::Status(_)) => {
            op_error(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
        }
        Err(e) => op_error(StatusCode::BAD_GATEWAY, "redrive_failed", e.to_string()),
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;
    use crate::outbox::OutboxConfig;

    /// The operator routes on a fresh outbox, on a free port.
    pub async fn serve(token: Option<&str>) -> (String, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(OutboxConfig::new(dir.path().join("outbox")))
            .await
            .unwrap();
        let app = router(Operator {
            outbox,
            token: token.map(Secret::new),
            redrive: Vec::new(),
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        (format!("http://{addr}"), dir)
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::serve;
    use super::*;

    #[tokio::test]
    async fn off_without_a_token_and_closed_to_a_wrong_one() {
        let c = reqwest::Client::new();
        let (off, _d1) = serve(None).await;
        let r = c
            .get(format!("{off}/v1/outbox/stats"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        assert!(r.text().await.unwrap().contains("operator_api_off"));

        let (on, _d2) = serve(Some("s3cret-token")).await;
        let r = c.get(format!("{on}/v1/outbox/stats")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        for wrong in ["s3cret-tokeN", "s3cret-token-", ""] {
            let r = c
                .get(format!("{on}/v1/outbox/stats"))
                .bearer_auth(wrong)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401, "token {wrong:?}");
        }
        let r = c
            .get(format!("{on}/v1/outbox/stats"))
            .bearer_auth("s3cret-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let census: crate::outbox::Census = r.json().await.unwrap();
        assert_eq!(census.dead_letters_total, 0);

        // Mutations need a selection, and a purge a confirmation.
        for (path, body, error) in [
            ("replay", "{}", "invalid_request"),
            ("purge", r#"{"all":true}"#, "confirmation_required"),
            ("purge", r#"{"all":true,"typo":1}"#, "invalid_request"),
        ] {
            let r = c
                .post(format!("{on}/v1/outbox/dead-letters/{path}"))
                .bearer_auth("s3cret-token")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{path} {body}");
            assert!(r.text().await.unwrap().contains(error), "{path} {body}");
        }
        let r = c
            .post(format!("{on}/v1/outbox/dead-letters/purge"))
            .bearer_auth("s3cret-token")
            .body(vec![b' '; MAX_OPERATOR_BODY + 1])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413, "body capped");
    }
}

#[cfg(test)]
mod openapi_tests {
    use super::tests_support::serve;

    /// Every operator path the admin OpenAPI document lists is routed (a
    /// route missing from the router would answer axum's bare 404).
    #[tokio::test]
    async fn every_documented_operator_path_is_routed() {
        let doc: serde_json::Value = serde_json::from_str(crate::admin::OPENAPI).unwrap();
        let (base, _dir) = serve(Some("t0ken")).await;
        let c = reqwest::Client::new();
        let mut checked = 0;
        for (path, ops) in doc["paths"].as_object().unwrap() {
            if !path.starts_with("/v1/") {
                continue;
            }
            for method in ops.as_object().unwrap().keys() {
                let url = format!("{base}{}", path.replace("{id}", "1"));
                let rb = match method.as_str() {
                    "get" => c.get(&url),
                    "post" => c.post(&url).body("{}"),
                    m => panic!("undocumented method {m}"),
                };
                let r = rb.bearer_auth("t0ken").send().await.unwrap();
                let status = r.status();
                let body = r.text().await.unwrap();
                assert!(
                    !(status == 404 && body.is_empty()),
                    "{method} {path} is documented but not routed"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 8, "the operator endpoints");
    }
}
