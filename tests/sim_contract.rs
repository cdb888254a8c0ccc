//! Contract tests of the simulator, rule by rule, with plain reqwest (and a
//! few with `DuvoClient`) against an in-process sim on port 0.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use duvo_bridge::duvo::{
    ApiError, CaseStatus, ClientConfig, CreateCasesRequest, DuvoClient, ListQuery, NewCase,
    SearchFilters, SearchRequest,
};
use duvo_bridge::secret::ApiKey;
use duvo_bridge::sim::{self, FaultsPatch, SimConfig, SimHandle, would_fail};
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

const KEY: &str = "dv_testkey0000000000000000000000000";
const RKEY: &str = "dv_restricted00000000000000000000000";

async fn start(f: impl FnOnce(&mut SimConfig)) -> SimHandle {
    let mut cfg = SimConfig {
        api_keys: vec![KEY.into()],
        rate_limit: 10_000,
        process_ms: 60_000,
        ..SimConfig::default()
    };
    f(&mut cfg);
    sim::start(cfg).await.expect("sim starts")
}

struct T {
    sim: SimHandle,
    http: Client,
    q: Uuid,
}

impl T {
    async fn new(f: impl FnOnce(&mut SimConfig)) -> T {
        let sim = start(f).await;
        let q = sim.queues()[0];
        T {
            sim,
            http: Client::new(),
            q,
        }
    }
    fn url(&self, p: &str) -> String {
        format!("{}/v2{p}", self.sim.base_url())
    }
    fn cases_url(&self) -> String {
        self.url(&format!("/queues/{}/cases", self.q))
    }
    async fn post(&self, url: &str, body: &str) -> Response {
        self.http
            .post(url)
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("request sent")
    }
    async fn create(&self, body: Value, idem: Option<&str>) -> Response {
        let mut rb = self
            .http
            .post(self.cases_url())
            .bearer_auth(KEY)
            .json(&body);
        if let Some(k) = idem {
            rb = rb.header("Idempotency-Key", k);
        }
        rb.send().await.expect("request sent")
    }
    async fn get(&self, url: &str) -> Response {
        self.http
            .get(url)
            .bearer_auth(KEY)
            .send()
            .await
            .expect("request sent")
    }
}

async fn body(r: Response) -> Value {
    r.json().await.expect("json body")
}

/// Asserts the status and the JSON error model; returns (error, message).
async fn error_of(r: Response, status: StatusCode) -> (String, String) {
    assert_eq!(r.status(), status);
    let b = body(r).await;
    assert!(
        b["request_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{b}"
    );
    (
        b["error"].as_str().expect("error").to_string(),
        b["message"].as_str().expect("message").to_string(),
    )
}

fn assert_rate_headers(r: &Response) {
    for h in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ] {
        assert!(r.headers().contains_key(h), "missing {h} on {}", r.status());
    }
}

async fn poll<F: Fn(&SimHandle) -> bool>(sim: &SimHandle, what: &str, f: F) {
    for _ in 0..400 {
        if f(sim) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn auth_and_routing_statuses() {
    let other = Uuid::new_v4();
    let t = T::new(|c| c.restricted_keys = vec![format!("{RKEY}={other}")]).await;
    assert!(
        t.sim.queues().contains(&other),
        "restricted queue is created"
    );
    let url = t.cases_url();

    let r = t.http.get(&url).send().await.unwrap();
    assert!(!r.headers().contains_key("x-ratelimit-limit"));
    assert_eq!(
        error_of(r, StatusCode::UNAUTHORIZED).await.0,
        "unauthorized"
    );
    for bad in ["Basic abc", "Bearer", "Bearer  ", "dv_x"] {
        let r = t
            .http
            .get(&url)
            .header("authorization", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(r, StatusCode::UNAUTHORIZED).await.0,
            "unauthorized"
        );
    }
    let r = t
        .http
        .get(&url)
        .bearer_auth("dv_unknown")
        .send()
        .await
        .unwrap();
    let (_, msg) = error_of(r, StatusCode::UNAUTHORIZED).await;
    assert!(!msg.contains("dv_unknown"), "keys are never echoed");

    let r = t.http.get(&url).bearer_auth(RKEY).send().await.unwrap();
    assert_rate_headers(&r);
    assert_eq!(error_of(r, StatusCode::FORBIDDEN).await.0, "forbidden");
    let r = t
        .http
        .get(t.url(&format!("/queues/{other}/cases")))
        .bearer_auth(RKEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let r = t
        .get(&t.url(&format!("/queues/{}/cases", Uuid::new_v4())))
        .await;
    assert_rate_headers(&r);
    assert_eq!(error_of(r, StatusCode::NOT_FOUND).await.0, "not_found");
    let r = t.get(&t.url("/queues/not-a-uuid/cases")).await;
    assert_eq!(error_of(r, StatusCode::NOT_FOUND).await.0, "not_found");
    let r = t.get(&t.url("/nope")).await;
    assert_rate_headers(&r);
    assert_eq!(error_of(r, StatusCode::NOT_FOUND).await.0, "not_found");
    let r = t
        .http
        .get(format!("{}/elsewhere", t.sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r, StatusCode::NOT_FOUND).await.0, "not_found");
    let r = t.http.delete(&url).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(
        error_of(r, StatusCode::METHOD_NOT_ALLOWED).await.0,
        "method_not_allowed"
    );

    let r = t.get(&t.url(&format!("/queues/{}", t.q))).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body(r).await["id"], json!(t.q));
    assert_eq!(t.sim.stats().unauthorized, 6);
}

#[tokio::test]
async fn create_validation_and_size_limits() {
    let t = T::new(|_| {}).await;
    let url = t.cases_url();
    let long = "x".repeat(501);
    let many: Vec<Value> = (0..101)
        .map(|i| json!({"title": format!("t{i}")}))
        .collect();
    let cases = [
        ("{not json".to_string(), "not valid JSON"),
        ("".to_string(), "empty"),
        ("[1]".to_string(), "JSON object"),
        ("{}".to_string(), "missing"),
        (
            json!({"case":{"title":"a"},"cases":[{"title":"b"}]}).to_string(),
            "not both",
        ),
        (json!({"cases":[]}).to_string(), "at least 1"),
        (json!({ "cases": many }).to_string(), "at most 100"),
        (
            json!({"case":{"data":"d"}}).to_string(),
            "title is required",
        ),
        (
            json!({"case":{"title":""}}).to_string(),
            "must not be empty",
        ),
        (
            json!({"case":{"title": long}}).to_string(),
            "501 characters",
        ),
        (
            json!({"case":{"title":"a","data":{"k":1}}}).to_string(),
            "data must be a string",
        ),
        (
            json!({"case":{"title":"a","labels":[{"key":1,"value":"v"}]}}).to_string(),
            "labels[0]",
        ),
        (
            json!({"case":{"title":"a","labels":"x"}}).to_string(),
            "labels must be a list",
        ),
        (
            json!({"case":{"title":"a","priority":"urgent"}}).to_string(),
            "priority",
        ),
    ];
    for (b, needle) in cases {
        let r = t.post(&url, &b).await;
        assert_rate_headers(&r);
        let (kind, msg) = error_of(r, StatusCode::BAD_REQUEST).await;
        assert_eq!(kind, "invalid_request");
        assert!(msg.contains(needle), "{b:.60}: {msg}");
    }
    // 500 characters (not bytes) is fine.
    let r = t
        .create(json!({"case":{"title": "é".repeat(500)}}), None)
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);

    // Over 1 MiB: 413, announced by Content-Length or streamed without one.
    let big = json!({"case":{"title":"a","data": "x".repeat(1024 * 1024)}}).to_string();
    let r = t.post(&url, &big).await;
    assert_rate_headers(&r);
    assert_eq!(
        error_of(r, StatusCode::PAYLOAD_TOO_LARGE).await.0,
        "payload_too_large"
    );
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big
        .into_bytes()
        .chunks(64 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let r = t
        .http
        .post(&url)
        .bearer_auth(KEY)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(r, StatusCode::PAYLOAD_TOO_LARGE).await.0,
        "payload_too_large"
    );
    assert_eq!(t.sim.stats().cases_created, 1);
}

#[tokio::test]
async fn create_answers_cases_in_request_order() {
    let t = T::new(|_| {}).await;
    let r = t
        .create(
            json!({"cases":[
                {"title":"first","data":"{\"a\":1}","labels":[{"key":"k","value":"v"}],"priority":"high"},
                {"title":"second"}
            ]}),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_rate_headers(&r);
    let b = body(r).await;
    let added = b["added_cases"].as_array().unwrap();
    assert_eq!(added.len(), 2);
    assert_eq!(added[0]["title"], "first");
    assert_eq!(added[1]["title"], "second");
    for c in added {
        let id = Uuid::parse_str(c["id"].as_str().unwrap()).unwrap();
        assert_eq!(id.get_version_num(), 4);
        assert_eq!(c["queue_id"], json!(t.q));
        assert_eq!(c["status"], "pending");
        for f in ["created_at", "updated_at"] {
            chrono::DateTime::parse_from_rfc3339(c[f].as_str().unwrap()).unwrap();
        }
        for f in [
            "claimed_at",
            "claimed_by_run_id",
            "completed_at",
            "postponed_to",
            "pending_human_request_id",
            "agent_run_status",
        ] {
            assert!(c[f].is_null(), "{f}");
        }
    }
    assert_eq!(added[0]["labels"][0]["key"], "k");
    assert_eq!(added[0]["priority"], "high");
    assert_eq!(added[1]["data"], Value::Null);
    assert_eq!(t.sim.cases().len(), 2);
    let s = t.sim.stats();
    assert_eq!((s.create_requests, s.cases_created), (1, 2));
    assert_eq!(s.by_status["pending"], 2);
    assert_eq!(
        s.by_queue.values().sum::<u64>(),
        2,
        "cases counted per queue: {:?}",
        s.by_queue
    );
}

#[tokio::test]
async fn idempotent_replay_and_conflicts() {
    let t = T::new(|_| {}).await;
    let b1 = json!({"cases":[{"title":"a"},{"title":"b"}]});
    let r1 = t.create(b1.clone(), Some("batch-1")).await;
    assert_eq!(r1.status(), StatusCode::CREATED);
    let first = body(r1).await;
    let r2 = t.create(b1.clone(), Some("batch-1")).await;
    assert_eq!(r2.status(), StatusCode::CREATED);
    assert_rate_headers(&r2);
    assert_eq!(body(r2).await, first, "same ids, same body");
    assert_eq!(t.sim.cases().len(), 2);
    assert_eq!(t.sim.stats().idempotent_replays, 1);

    let r3 = t
        .create(json!({"cases":[{"title":"other"}]}), Some("batch-1"))
        .await;
    let (kind, msg) = error_of(r3, StatusCode::CONFLICT).await;
    assert_eq!(kind, "conflict");
    assert!(msg.contains("different"));
    assert_eq!(t.sim.cases().len(), 2);

    // Without a key every request creates; another key is independent.
    t.create(b1.clone(), None).await;
    t.create(b1.clone(), Some("batch-2")).await;
    assert_eq!(t.sim.cases().len(), 6);

    // Same key while the first is still answering (latency fault): 409.
    t.sim.set_faults(FaultsPatch {
        latency_ms: Some(800),
        ..Default::default()
    });
    let slow = {
        let http = t.http.clone();
        let url = t.cases_url();
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(KEY)
                .header("Idempotency-Key", "slow")
                .json(&json!({"case":{"title":"slow"}}))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    poll(&t.sim, "slow request committed", |s| s.cases().len() == 7).await;
    let r = t
        .create(json!({"case":{"title":"slow"}}), Some("slow"))
        .await;
    let (_, msg) = error_of(r, StatusCode::CONFLICT).await;
    assert!(msg.contains("in progress"), "{msg}");
    assert_eq!(slow.await.unwrap(), StatusCode::CREATED);
}

/// Wait until at least `need` seconds remain in the current fixed window, so
/// a burst of requests cannot straddle a window boundary.
async fn align_window(window: u64, need: f64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let left = window as f64 - now % window as f64;
    if left < need {
        tokio::time::sleep(Duration::from_secs_f64(left + 0.01)).await;
    }
}

#[tokio::test]
async fn fixed_window_rate_limit_and_early_retries() {
    let t = T::new(|c| {
        c.rate_limit = 3;
        c.window_secs = 2;
    })
    .await;
    align_window(2, 1.2).await;
    let url = t.cases_url();
    let mut reset = 0;
    for want in [2u64, 1, 0] {
        let r = t.get(&url).await;
        assert_eq!(r.status(), StatusCode::OK);
        let h = |n: &str| r.headers()[n].to_str().unwrap().parse::<u64>().unwrap();
        assert_eq!(h("x-ratelimit-limit"), 3);
        assert_eq!(h("x-ratelimit-remaining"), want);
        reset = h("x-ratelimit-reset");
        assert_eq!(reset % 2, 0, "window aligned to the epoch");
    }
    let r = t.get(&url).await;
    assert_rate_headers(&r);
    let ra: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&ra), "retry-after {ra}");
    assert_eq!(
        r.headers()["x-ratelimit-reset"].to_str().unwrap(),
        reset.to_string()
    );
    assert_eq!(
        error_of(r, StatusCode::TOO_MANY_REQUESTS).await.0,
        "rate_limited"
    );
    // Retrying before the deadline is early (and still limited).
    let r = t.get(&url).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let s = t.sim.stats();
    assert_eq!((s.rate_limited, s.early_retries), (2, 1));
    // After the reset instant: allowed again, not early.
    let wait = UNIX_EPOCH + Duration::from_secs(reset);
    if let Ok(d) = wait.duration_since(SystemTime::now()) {
        tokio::time::sleep(d + Duration::from_millis(20)).await;
    }
    let r = t.get(&url).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["x-ratelimit-remaining"],
        "2",
        "429s did not consume budget"
    );
    assert_eq!(t.sim.stats().early_retries, 1);
    // /_sim/* is neither authenticated nor counted.
    let r = t
        .http
        .get(format!("{}/_sim/stats", t.sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(!r.headers().contains_key("x-ratelimit-limit"));
}

#[tokio::test]
async fn faults_outage_and_error_ratio() {
    let t = T::new(|_| {}).await;
    let faults_url = format!("{}/_sim/faults", t.sim.base_url());
    let r = t
        .http
        .post(&faults_url)
        .body(r#"{"outage":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let f = body(r).await;
    assert_eq!(f["outage"], json!(true));
    assert_eq!(f["error_status"], json!(503));
    let r = t.get(&t.cases_url()).await;
    assert_rate_headers(&r);
    assert_eq!(
        error_of(r, StatusCode::SERVICE_UNAVAILABLE).await.0,
        "service_unavailable"
    );
    // Auth still comes first.
    let r = t.http.get(t.cases_url()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    let r = t
        .http
        .post(&faults_url)
        .body(r#"{"outage":false,"error_ratio":1.0,"error_status":502}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(body(r).await["error_ratio"], json!(1.0));
    let r = t.create(json!({"case":{"title":"a"}}), None).await;
    assert_rate_headers(&r);
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(t.sim.cases().len(), 0, "a faulted request creates nothing");
    for bad in [
        r#"{"error_ratio":2}"#,
        r#"{"error_status":200}"#,
        r#"{"nope":1}"#,
        "x",
    ] {
        let r = t.http.post(&faults_url).body(bad).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    let f = body(t.http.get(&faults_url).send().await.unwrap()).await;
    assert_eq!(
        f["error_status"],
        json!(502),
        "refused patches change nothing"
    );
    t.sim.set_faults(FaultsPatch {
        error_ratio: Some(0.0),
        ..Default::default()
    });
    assert_eq!(t.get(&t.cases_url()).await.status(), StatusCode::OK);
    assert_eq!(t.sim.stats().faults_injected, 2);
}

/// A 429 storm refuses every request until its end, which `retry-after`
/// names as whole seconds or, on request, as an HTTP-date (the contract says
/// clients must accept both); asking again before that instant is counted as
/// an early retry, and a storm spends no rate budget.
#[tokio::test]
async fn faults_throttle_storm_in_seconds_and_http_date() {
    let t = T::new(|_| {}).await;
    let faults_url = format!("{}/_sim/faults", t.sim.base_url());
    let r = t
        .http
        .post(&faults_url)
        .body(r#"{"throttle_secs":30}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = t.get(&t.cases_url()).await;
    let secs: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((29..=31).contains(&secs), "retry-after {secs}");
    assert_eq!(
        error_of(r, StatusCode::TOO_MANY_REQUESTS).await.0,
        "rate_limited"
    );
    assert_eq!(t.sim.stats().early_retries, 0);
    let r = t.get(&t.cases_url()).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        t.sim.stats().early_retries,
        1,
        "asked again before the deadline"
    );

    t.sim.set_faults(FaultsPatch {
        throttle_secs: Some(20),
        throttle_http_date: Some(true),
        ..Default::default()
    });
    let r = t.get(&t.cases_url()).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let at = httpdate::parse_http_date(r.headers()["retry-after"].to_str().unwrap())
        .expect("retry-after is an HTTP-date");
    let wait = at.duration_since(std::time::SystemTime::now()).unwrap();
    // The first storm's deadline (about 30 s) still stands: deadlines only grow.
    assert!(
        wait.as_secs() >= 25,
        "retry-after names the later deadline: {wait:?}"
    );

    t.sim.set_faults(FaultsPatch {
        throttle_secs: Some(0),
        ..Default::default()
    });
    let f = body(t.http.get(&faults_url).send().await.unwrap()).await;
    assert_eq!(f["throttle_until_unix_ms"], json!(0));
    let r = t.get(&t.cases_url()).await;
    assert_eq!(r.status(), StatusCode::OK, "the storm is over");
    let remaining: u32 = r.headers()["x-ratelimit-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let limit: u32 = r.headers()["x-ratelimit-limit"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The first request let through is the first to spend budget.
    assert_eq!(
        remaining + 1,
        limit,
        "refused requests spent no budget: {remaining} of {limit} left"
    );
}

fn titles(b: &Value) -> Vec<String> {
    b["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["title"].as_str().unwrap().to_string())
        .collect()
}

fn urlenc(s: &str) -> String {
    s.replace(':', "%3A").replace('+', "%2B")
}

#[tokio::test]
async fn list_filters_sort_paging_and_search() {
    let t = T::new(|_| {}).await;
    for i in 0..5 {
        let data = if i % 2 == 0 { "Order ORD-EVEN" } else { "odd" };
        let r = t
            .create(
                json!({"case":{"title": format!("case {i}"), "data": data}}),
                None,
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let list = |q: String| {
        let url = format!("{}?{q}", t.cases_url());
        let t = &t;
        async move { t.get(&url).await }
    };
    let b = body(list(String::new()).await).await;
    assert_eq!(
        (b["total"].clone(), b["limit"].clone(), b["offset"].clone()),
        (json!(5), json!(20), json!(0))
    );
    assert_eq!(titles(&b)[0], "case 4", "default: created_at desc");
    let b = body(list("sort_order=asc&limit=2&offset=1".into()).await).await;
    assert_eq!(titles(&b), vec!["case 1", "case 2"]);
    assert_eq!(b["total"], json!(5));
    let b = body(list("search=ord-even&sort_order=asc".into()).await).await;
    assert_eq!(titles(&b), vec!["case 0", "case 2", "case 4"]);
    let b = body(list("search=CASE%203".into()).await).await;
    assert_eq!(titles(&b), vec!["case 3"]);
    let b = body(list("status=completed,failed".into()).await).await;
    assert_eq!(b["total"], json!(0));
    let b = body(list("status=pending&sort_by=updated_at".into()).await).await;
    assert_eq!(b["total"], json!(5));

    let all = t.sim.cases();
    let mid = all[2]
        .updated_at
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let b = body(list(format!("updated_at_from={}&sort_order=asc", urlenc(&mid))).await).await;
    assert_eq!(titles(&b), vec!["case 2", "case 3", "case 4"], "inclusive");
    let b = body(list(format!("created_at_from={}", urlenc(&mid))).await).await;
    assert_eq!(b["total"], json!(3));

    for bad in [
        "limit=0",
        "limit=101",
        "limit=x",
        "offset=-1",
        "status=bogus",
        "updated_at_from=yesterday",
        "created_at_from=1",
        "sort_by=title",
        "sort_order=up",
    ] {
        let r = list(bad.to_string()).await;
        assert_rate_headers(&r);
        assert_eq!(
            error_of(r, StatusCode::BAD_REQUEST).await.0,
            "invalid_request",
            "{bad}"
        );
    }

    // Paging is stable even for identical timestamps (ties broken by id).
    let batch: Vec<Value> = (0..30)
        .map(|i| json!({"title": format!("same {i}")}))
        .collect();
    let r = t.create(json!({ "cases": batch }), None).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let mut seen = Vec::new();
    for page in 0..4 {
        let b = body(list(format!("limit=10&offset={}", page * 10)).await).await;
        seen.extend(
            b["cases"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_str().unwrap().to_string()),
        );
    }
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!((seen.len(), dedup.len()), (35, 35));

    // Search endpoint: same semantics from a JSON body.
    let url = t.url(&format!("/queues/{}/cases/search", t.q));
    let q =
        json!({"filters":{"status":["pending"]},"search":"ord-even","limit":2,"sort_order":"asc"});
    let r = t.post(&url, &q.to_string()).await;
    assert_eq!(r.status(), StatusCode::OK);
    let b = body(r).await;
    assert_eq!(b["total"], json!(3));
    assert_eq!(titles(&b), vec!["case 0", "case 2"]);
    let r = t.post(&url, r#"{"filters":{"status":["bogus"]}}"#).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = t.post(&url, r#"{"limit":500}"#).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn agent_lifecycle_failures_and_bulk_retry() {
    let t = T::new(|c| {
        c.process_ms = 100;
        c.fail_ratio = 0.5;
    })
    .await;
    let mut cases: Vec<Value> = (0..20)
        .map(|i| json!({"title": format!("job {i}")}))
        .collect();
    cases.push(json!({"title":"forced","data":"{\"simulate\":\"fail\"}"}));
    let r = t.create(json!({ "cases": cases }), None).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    poll(&t.sim, "all terminal", |s| {
        s.cases().iter().all(|c| c.status.is_terminal())
    })
    .await;
    for c in t.sim.cases() {
        let expect_fail = would_fail(&c.title, c.data.as_deref(), 0.5);
        assert_eq!(c.status == CaseStatus::Failed, expect_fail, "{}", c.title);
        let (claimed, done) = (c.claimed_at.unwrap(), c.completed_at.unwrap());
        assert!(c.claimed_by_run_id.is_some());
        assert!(claimed >= c.created_at && done >= claimed && c.updated_at >= done);
    }
    let failed: Vec<Uuid> = t
        .sim
        .cases()
        .iter()
        .filter(|c| c.status == CaseStatus::Failed)
        .map(|c| c.id)
        .collect();
    assert!(failed.len() >= 2, "the forced one and some hashed ones");
    assert!(failed.len() < 21);
    let stats = t.sim.stats();
    assert_eq!(stats.by_status["failed"] as usize, failed.len());
    assert_eq!(stats.by_status["completed"] as usize, 21 - failed.len());

    let ok_id = t
        .sim
        .cases()
        .iter()
        .find(|c| c.status == CaseStatus::Completed)
        .unwrap()
        .id;
    let url = t.url(&format!("/queues/{}/cases/bulk-retry", t.q));
    let unknown = Uuid::new_v4();
    let req = json!({"case_ids": [failed[0], ok_id, unknown]});
    let r = t.post(&url, &req.to_string()).await;
    assert_eq!(r.status(), StatusCode::OK);
    let b = body(r).await;
    assert_eq!(b["retried"], json!([failed[0]]));
    // The contract's shape: the ids skipped (not failed, unknown).
    assert_eq!(b["skipped"], json!([ok_id, unknown]));
    let c = t
        .sim
        .cases()
        .into_iter()
        .find(|c| c.id == failed[0])
        .unwrap();
    assert_eq!(c.status, CaseStatus::Pending);
    assert!(c.completed_at.is_none());
    poll(&t.sim, "retried case terminal again", |s| {
        s.cases()
            .iter()
            .any(|c| c.id == failed[0] && c.status == CaseStatus::Failed)
    })
    .await;
    let r = t.post(&url, r#"{"case_ids":[]}"#).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // NDJSON export: one line per case.
    let text = t
        .http
        .get(format!("{}/_sim/cases", t.sim.base_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 21);
    assert!(
        lines
            .iter()
            .all(|l| l["id"].is_string() && l["status"].is_string())
    );
}

#[tokio::test]
async fn drop_after_commit_then_replay() {
    let t = T::new(|_| {}).await;
    t.sim.set_faults(FaultsPatch {
        drop_after_commit_ratio: Some(1.0),
        ..Default::default()
    });
    let b = json!({"cases":[{"title":"lost answer"}]});
    let err = t
        .http
        .post(t.cases_url())
        .bearer_auth(KEY)
        .header("Idempotency-Key", "k-drop")
        .json(&b)
        .send()
        .await
        .expect_err("connection closed without an answer");
    assert!(!err.is_status());
    let cases = t.sim.cases();
    assert_eq!(cases.len(), 1, "the case was committed");
    assert_eq!(t.sim.stats().dropped_after_commit, 1);
    t.sim.set_faults(FaultsPatch {
        drop_after_commit_ratio: Some(0.0),
        ..Default::default()
    });
    let r = t.create(b, Some("k-drop")).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let got = body(r).await;
    assert_eq!(got["added_cases"][0]["id"], json!(cases[0].id));
    assert_eq!(t.sim.cases().len(), 1);
    assert_eq!(t.sim.stats().idempotent_replays, 1);
}

#[tokio::test]
async fn with_idempotency_ignored_a_repeated_key_creates_again() {
    let t = T::new(|c| c.idempotency = duvo_bridge::sim::IdempotencyMode::Ignore).await;
    let b = json!({"cases":[{"title":"twice"}]});
    let first = t.create(b.clone(), Some("k-same")).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let second = t.create(b, Some("k-same")).await;
    assert_eq!(second.status(), StatusCode::CREATED);
    assert!(second.headers().get("idempotent-replayed").is_none());
    assert_eq!(t.sim.cases().len(), 2, "the key changed nothing");
    assert_eq!(t.sim.stats().idempotent_replays, 0);
    // Another body under the same key is not refused either.
    let third = t
        .create(json!({"cases":[{"title":"other"}]}), Some("k-same"))
        .await;
    assert_eq!(third.status(), StatusCode::CREATED);
}

fn client(sim: &SimHandle, key: &str) -> DuvoClient {
    DuvoClient::new(ClientConfig {
        base_url: sim.base_url(),
        version_prefix: "/v2".into(),
        api_key: ApiKey::new(key),
        timeout: Duration::from_secs(10),
    })
    .unwrap()
}

fn nc(title: &str) -> NewCase {
    NewCase {
        title: title.into(),
        data: Some("{\"order\":1}".into()),
        labels: vec![],
        priority: None,
    }
}

#[tokio::test]
async fn duvo_client_round_trip() {
    let t = T::new(|c| c.rate_limit = 50).await;
    align_window(60, 2.0).await;
    let c = client(&t.sim, KEY);
    let one = c.create_case(t.q, nc("single"), Some("c-1")).await.unwrap();
    assert_eq!(one.status, StatusCode::CREATED);
    assert_eq!(one.body.added_cases[0].title, "single");
    assert_eq!(one.rate.limit, Some(50));
    assert_eq!(one.rate.remaining, Some(49));
    assert!(one.rate.reset_at.unwrap() > SystemTime::now());
    let batch = c
        .create_cases(
            t.q,
            &CreateCasesRequest::batch(vec![nc("b1"), nc("b2")]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(batch.body.added_cases.len(), 2);
    let q = ListQuery {
        limit: Some(2),
        status: vec![CaseStatus::Pending],
        ..Default::default()
    };
    let list = c.list_cases(t.q, &q).await.unwrap();
    assert_eq!((list.body.total, list.body.cases.len()), (3, 2));
    let s = SearchRequest {
        search: Some("B2".into()),
        filters: SearchFilters::default(),
        ..Default::default()
    };
    let found = c.search_cases(t.q, &s).await.unwrap();
    assert_eq!(found.body.cases[0].title, "b2");
    assert!(!c.lifecycle_warned());

    let err = c.create_case(t.q, nc(""), None).await.unwrap_err();
    match &err {
        ApiError::Status { status, body, rate } => {
            assert_eq!(*status, StatusCode::BAD_REQUEST);
            assert_eq!(body.error, "invalid_request");
            assert!(body.request_id.is_some());
            assert!(rate.remaining.is_some());
        }
        e => panic!("unexpected {e:?}"),
    }
    assert!(!err.is_transient());
    let err = client(&t.sim, "dv_nobody")
        .list_cases(t.q, &ListQuery::default())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED));
}

#[tokio::test]
async fn duvo_client_sees_429_and_deprecation() {
    let t = T::new(|c| {
        c.rate_limit = 1;
        c.window_secs = 60;
        c.deprecated = true;
    })
    .await;
    align_window(60, 2.0).await;
    let c = client(&t.sim, KEY);
    c.list_cases(t.q, &ListQuery::default()).await.unwrap();
    assert!(c.lifecycle_warned(), "Deprecation/Sunset headers seen");
    let err = c.list_cases(t.q, &ListQuery::default()).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::TOO_MANY_REQUESTS));
    assert!(err.is_transient());
    let rate = err.rate().unwrap();
    assert_eq!(rate.remaining, Some(0));
    let retry = rate.retry_after.expect("retry-after parsed");
    assert!(retry + Duration::from_secs(1) >= rate.reset_at.unwrap());
}

/// 100,000 cases through the HTTP API: creates stay cheap, the agent keeps
/// up without per-tick scans, and the NDJSON export streams them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_to_100k_cases() {
    let t = T::new(|c| c.process_ms = 200).await;
    let body = json!({
        "cases": (0..100).map(|i| json!({"title": format!("bulk {i}"), "data": "x"})).collect::<Vec<_>>()
    })
    .to_string();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let http = t.http.clone();
        let url = t.cases_url();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            for _ in (w..1000).step_by(8) {
                let r = http
                    .post(&url)
                    .bearer_auth(KEY)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::CREATED);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(t.sim.stats().cases_created, 100_000);
    for _ in 0..1200 {
        if t.sim.stats().by_status["completed"] == 100_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(t.sim.stats().by_status["completed"], 100_000);
    let b = body_of_list(&t, "status=completed&limit=1").await;
    assert_eq!(b["total"], json!(100_000));
    let resp = t
        .http
        .get(format!("{}/_sim/cases", t.sim.base_url()))
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    assert_eq!(text.lines().count(), 100_000);
}

async fn body_of_list(t: &T, q: &str) -> Value {
    body(t.get(&format!("{}?{q}", t.cases_url())).await).await
}
