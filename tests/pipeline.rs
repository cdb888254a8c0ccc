//! End-to-end pipeline tests: HTTP source -> outbox -> batcher -> simulator,
//! all in-process, against the real simulator over real sockets.

mod common;

use std::time::Duration;

use common::*;
use duvo_bridge::outbox::EventState;
use duvo_bridge::sim::FaultsPatch;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_every_event_exactly_once_in_full_batches() {
    let h = Harness::start(sim_config(), |_| {}).await;
    let (sim, bridge, addr, client) = (&h.sim, &h.bridge, h.addr, &h.client);
    let mut ids = Vec::new();
    for chunk in 0..5 {
        let body = json!(orders(chunk * 200..(chunk + 1) * 200));
        let r = post_events(client, addr, &body, Some(&format!("req-{chunk}"))).await;
        assert_eq!(r.status(), 202);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["stored"], 200);
        ids.extend(
            v["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string()),
        );
    }
    expect_cases(sim, 1000, 30).await;
    let per = cases_per_order(sim);
    assert_eq!(per.len(), 1000);
    assert!(per.values().all(|&n| n == 1), "every order exactly once");
    let st = sim.stats();
    assert_eq!(st.cases_created, 1000);
    assert!(
        st.create_requests <= 12,
        "about one request per 100 cases, got {}",
        st.create_requests
    );
    assert_eq!(st.early_retries, 0);

    // The event state is visible through the source.
    let first: u64 = ids[0].parse().unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || async {
            matches!(
                bridge
                    .outbox
                    .get(duvo_bridge::outbox::EventId(first))
                    .unwrap()
                    .map(|v| v.state),
                Some(EventState::Delivered { .. })
            )
        })
        .await
    );
    let v: serde_json::Value = client
        .get(format!("http://{addr}/v1/events/{}", ids[0]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["state"]["state"], "delivered", "{v}");

    // The admin listener exposes what happened.
    let scrape = || async {
        reqwest::get(format!("http://{}/metrics", bridge.admin_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // Counters are bumped right after the outbox settles: allow a moment.
    wait_until(Duration::from_secs(5), || async {
        scrape()
            .await
            .contains("duvo_bridge_end_to_end_seconds_count 1000")
    })
    .await;
    let metrics = scrape().await;
    let created = format!(
        "duvo_bridge_cases_created_total{{queue=\"{}\",account=\"default\"}} 1000",
        sim.queues()[0]
    );
    for needle in [
        "duvo_bridge_events_stored_total{source=\"oms\"} 1000",
        created.as_str(),
        "duvo_bridge_outbox_flush_seconds_bucket",
        "duvo_bridge_end_to_end_seconds_count 1000",
        "duvo_bridge_api_requests_total{endpoint=\"create_cases\",outcome=\"201\",account=\"default\"}",
        "# HELP duvo_bridge_outbox_depth",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from /metrics:\n{metrics}"
        );
    }
    assert!(
        !metrics.contains(&sim.api_keys()[0]),
        "API key leaked into metrics"
    );
    let ready = reqwest::get(format!("http://{}/readyz", bridge.admin_addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_request_with_same_idempotency_key_answers_same_ids() {
    let h = Harness::start(sim_config(), |_| {}).await;
    let (sim, addr, client) = (&h.sim, h.addr, &h.client);
    let body = json!(orders(0..50));
    let a: serde_json::Value = post_events(client, addr, &body, Some("k1"))
        .await
        .json()
        .await
        .unwrap();
    let b: serde_json::Value = post_events(client, addr, &body, Some("k1"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(a["ids"], b["ids"]);
    assert_eq!(b["stored"], 0);
    assert_eq!(b["duplicates"], 50);
    expect_cases(sim, 50, 20).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sim.stats().cases_created, 50);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly_and_stores_nothing() {
    let h = Harness::start(sim_config(), |_| {}).await;
    let (sim, bridge, addr, client) = (&h.sim, &h.bridge, h.addr, &h.client);
    let url = format!("http://{addr}/v1/events");

    // Malformed JSON: 400 naming the line.
    let r = client
        .post(&url)
        .header("content-type", "application/json")
        .body("[{\"order_id\": 1},\n{\"order_id\": }]")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "malformed_json");
    assert_eq!(v["line"], 2);

    // NDJSON with a bad third line.
    let r = client
        .post(&url)
        .header("content-type", "application/x-ndjson")
        .body("{\"a\":1}\n{\"a\":2}\n{\"a\":\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["line"], 3, "{v}");

    // Invalid UTF-8.
    let r = client
        .post(&url)
        .header("content-type", "application/json")
        .body(vec![
            b'{', b'"', b'a', b'"', b':', b'"', 0xff, 0xfe, b'"', b'}',
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "invalid_utf8");

    // Oversize body: 413.
    let big = "x".repeat(3 * 1024 * 1024);
    let r = client
        .post(&url)
        .header("content-type", "application/json")
        .body(format!("{{\"blob\":\"{big}\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // An event too large to ever fit a create request: 413, naming it.
    let big = "y".repeat(1_100_000);
    let r = post_events(
        client,
        addr,
        &json!([{"order_id": "ok"}, {"blob": big}]),
        None,
    )
    .await;
    assert_eq!(r.status(), 413);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["index"], 1);

    // Not an object.
    let r = post_events(client, addr, &json!([1, 2]), None).await;
    assert_eq!(r.status(), 400);

    assert_eq!(bridge.outbox.stats().appended, 0, "nothing stored");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sim.stats().cases_created, 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_event_is_dead_lettered_and_the_rest_delivered() {
    let h = Harness::start(sim_config(), |_| {}).await;
    let (sim, bridge, addr, client) = (&h.sim, &h.bridge, h.addr, &h.client);
    let mut events = orders(0..100);
    events[37]["simulate"] = json!("reject");
    let r = post_events(client, addr, &json!(events), Some("poison")).await;
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = r.json().await.unwrap();
    let poison_id: u64 = v["ids"][37].as_str().unwrap().parse().unwrap();
    expect_cases(sim, 99, 20).await;
    assert!(
        wait_until(Duration::from_secs(5), || async {
            bridge.outbox.dead_letters().map(|d| d.len()).unwrap_or(0) == 1
        })
        .await
    );
    let per = cases_per_order(sim);
    assert_eq!(per.len(), 99);
    assert!(!per.contains_key("ORD-000037"));
    let view = bridge
        .outbox
        .get(duvo_bridge::outbox::EventId(poison_id))
        .unwrap()
        .unwrap();
    match view.state {
        EventState::Rejected { status, .. } => assert_eq!(status, 400),
        other => panic!("poison event should be rejected, is {other:?}"),
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_and_5xx_storm_then_recovery_delivers_exactly_once() {
    let h = Harness::start(sim_config(), |_| {}).await;
    let (sim, bridge, addr, client) = (&h.sim, &h.bridge, h.addr, &h.client);

    sim.set_faults(FaultsPatch {
        outage: Some(true),
        ..Default::default()
    });
    for chunk in 0..3 {
        let body = json!(orders(chunk * 200..(chunk + 1) * 200));
        assert_eq!(
            post_events(client, addr, &body, Some(&format!("o-{chunk}")))
                .await
                .status(),
            202
        );
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        sim.stats().cases_created,
        0,
        "nothing created during the outage"
    );

    // Flaky instead of down: half the requests fail, a third of the
    // successful creates lose their answer.
    sim.set_faults(FaultsPatch {
        outage: Some(false),
        error_ratio: Some(0.5),
        error_status: Some(503),
        drop_after_commit_ratio: Some(0.3),
        ..Default::default()
    });
    for chunk in 3..6 {
        let body = json!(orders(chunk * 200..(chunk + 1) * 200));
        assert_eq!(
            post_events(client, addr, &body, Some(&format!("o-{chunk}")))
                .await
                .status(),
            202
        );
    }
    expect_cases(sim, 1200, 60).await;
    sim.set_faults(FaultsPatch {
        error_ratio: Some(0.0),
        drop_after_commit_ratio: Some(0.0),
        ..Default::default()
    });
    assert!(
        wait_until(Duration::from_secs(10), || async {
            bridge.outbox.depth() == 0
        })
        .await
    );
    let per = cases_per_order(sim);
    assert_eq!(per.len(), 1200);
    assert!(
        per.values().all(|&n| n == 1),
        "no duplicate case despite dropped answers"
    );
    let st = sim.stats();
    // A lost answer was recovered by looking for the batch's cases (and
    // perhaps a replay), never by creating them again.
    assert!(
        st.list_requests > 0 || st.dropped_after_commit == 0,
        "{st:?}"
    );
    assert_eq!(st.early_retries, 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_allowing_less_than_configured_sees_no_early_retry() {
    // The server allows 20 requests per 2 s window (600/min); the bridge is
    // configured for 6000/min and small batches, so it must learn the real
    // limit from the headers and never retry before retry-after.
    let mut sc = sim_config();
    sc.rate_limit = 20;
    sc.window_secs = 2;
    let h = Harness::start(sc, |cfg| cfg.delivery.max_batch = 5).await;
    let (sim, addr, client) = (&h.sim, h.addr, &h.client);
    let body = json!(orders(0..300));
    assert_eq!(
        post_events(client, addr, &body, Some("storm"))
            .await
            .status(),
        202
    );
    expect_cases(sim, 300, 60).await;
    let st = sim.stats();
    assert_eq!(st.early_retries, 0, "{st:?}");
    assert_eq!(cases_per_order(sim).len(), 300);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_and_a_restart_delivers_the_rest() {
    let sim = start_sim(sim_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let mut cfg = bridge_config(&sim, dir.path());
    cfg.shutdown.grace_period_secs = 1;
    let bridge = duvo_bridge::app::start(cfg.clone(), stop.clone())
        .await
        .unwrap();
    let addr = bridge.http_addr("oms").unwrap();
    let client = reqwest::Client::new();
    // Hold delivery back so the drain has work left.
    sim.set_faults(FaultsPatch {
        outage: Some(true),
        ..Default::default()
    });
    let body = json!(orders(0..400));
    assert_eq!(
        post_events(&client, addr, &body, Some("drain"))
            .await
            .status(),
        202
    );
    let t0 = std::time::Instant::now();
    stop.cancel();
    bridge.wait().await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "drain bounded by the grace period"
    );
    // The source no longer accepts input.
    assert!(
        client
            .post(format!("http://{addr}/v1/events"))
            .json(&json!({}))
            .send()
            .await
            .is_err()
    );

    sim.set_faults(FaultsPatch {
        outage: Some(false),
        ..Default::default()
    });
    let stop = CancellationToken::new();
    let bridge = duvo_bridge::app::start(cfg, stop.clone()).await.unwrap();
    expect_cases(&sim, 400, 20).await;
    assert!(
        wait_until(Duration::from_secs(5), || async {
            bridge.outbox.depth() == 0
        })
        .await
    );
    assert_eq!(cases_per_order(&sim).len(), 400);
    stop.cancel();
    bridge.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_over_high_water_answers_503_with_retry_after() {
    let h = Harness::start(sim_config(), |cfg| {
        cfg.outbox.high_water_events = 100;
        cfg.outbox.low_water_events = 50;
    })
    .await;
    let (sim, bridge, addr, client) = (&h.sim, &h.bridge, h.addr, &h.client);
    sim.set_faults(FaultsPatch {
        outage: Some(true),
        ..Default::default()
    });
    assert_eq!(
        post_events(client, addr, &json!(orders(0..150)), None)
            .await
            .status(),
        202
    );
    let r = post_events(client, addr, &json!(orders(150..160)), None).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    // Readiness reflects it.
    assert!(
        wait_until(Duration::from_secs(3), || async {
            reqwest::get(format!("http://{}/readyz", bridge.admin_addr))
                .await
                .map(|r| r.status() == 503)
                .unwrap_or(false)
        })
        .await
    );
    sim.set_faults(FaultsPatch {
        outage: Some(false),
        ..Default::default()
    });
    assert!(
        wait_until(Duration::from_secs(20), || async {
            !bridge.outbox.over_high_water()
        })
        .await
    );
    assert_eq!(
        post_events(client, addr, &json!(orders(150..160)), None)
            .await
            .status(),
        202
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_spent_by_someone_else_gives_429s_but_never_an_early_retry() {
    // Someone else has spent the key's window before the bridge sends
    // anything: its first request meets a 429. Every request after that
    // must wait for retry-after (the simulator counts any request before
    // the deadline as an early retry).
    let mut sc = sim_config();
    sc.rate_limit = 10;
    sc.window_secs = 3;
    let h = Harness::start(sc, |cfg| cfg.delivery.max_batch = 10).await;
    let (sim, client) = (&h.sim, &h.client);
    let list = format!("{}/v2/queues/{}/cases", sim.base_url(), sim.queues()[0]);
    // Spend the window at its start, so the storm lasts a few seconds.
    let reset: u64 = client
        .get(&list)
        .bearer_auth(&sim.api_keys()[0])
        .send()
        .await
        .unwrap()
        .headers()["x-ratelimit-reset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(
        (reset as f64 - now).max(0.0) + 0.05,
    ))
    .await;
    for _ in 0..10 {
        let r = client
            .get(&list)
            .bearer_auth(&sim.api_keys()[0])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        h.post(&json!(orders(0..200)), Some("storm")).await.status(),
        202
    );
    expect_cases(sim, 200, 60).await;
    let st = sim.stats();
    assert!(
        st.rate_limited >= 1,
        "the window was spent: a 429 was expected {st:?}"
    );
    assert_eq!(st.early_retries, 0, "{st:?}");
    assert_eq!(cases_per_order(sim).len(), 200);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_is_required_when_configured() {
    // SAFETY: set before any thread reads it; the variable is unique to
    // this test.
    unsafe { std::env::set_var("PIPELINE_TEST_OMS_TOKEN", "s3cret-token") };
    let h = Harness::start(sim_config(), |cfg| {
        if let duvo_bridge::config::SourceConfig::Http(s) = &mut cfg.sources[0] {
            s.auth_token_env = Some("PIPELINE_TEST_OMS_TOKEN".into());
        }
    })
    .await;
    let url = format!("http://{}/v1/events", h.addr);
    let body = json!(orders(0..3));
    let r = h.client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "unauthorized");
    let r = h
        .client
        .post(&url)
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = h
        .client
        .post(&url)
        .bearer_auth("s3cret-token")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(h.bridge.outbox.stats().appended, 3);
    h.stop().await;
}

/// Send `head` (request line and headers, no body) on a fresh connection
/// and return the status of the answer, which must come without the body
/// being sent; the connection is kept open (returned) so its request stays
/// in progress where the server reads it.
async fn answer_without_body(
    addr: std::net::SocketAddr,
    head: &str,
) -> (Option<u16>, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let status = match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
        Ok(Ok(n)) if n > 12 => std::str::from_utf8(&buf[9..12])
            .ok()
            .and_then(|c| c.parse().ok()),
        _ => None,
    };
    (status, s)
}

#[tokio::test]
async fn requests_are_refused_on_their_headers_before_their_bodies_are_read() {
    // SAFETY: set before any thread reads it; unique to this test.
    unsafe { std::env::set_var("PIPELINE_TEST_HEADERS_TOKEN", "t0ken-for-headers") };
    let h = Harness::start(sim_config(), |cfg| {
        if let duvo_bridge::config::SourceConfig::Http(s) = &mut cfg.sources[0] {
            s.auth_token_env = Some("PIPELINE_TEST_HEADERS_TOKEN".into());
            s.max_body_bytes = 1024 * 1024;
            s.max_inflight_bytes = 2 * 1024 * 1024;
        }
    })
    .await;
    let head = |auth: &str, len: usize| {
        format!(
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: {len}\r\n\r\n"
        )
    };
    let ok = "Authorization: Bearer t0ken-for-headers\r\n";
    // No token, 4 MiB announced, nothing sent: 401 at once.
    let (status, _c) = answer_without_body(h.addr, &head("", 4 << 20)).await;
    assert_eq!(status, Some(401));
    let (status, _c) =
        answer_without_body(h.addr, &head("Authorization: Bearer nope\r\n", 100)).await;
    assert_eq!(status, Some(401));
    // With the token, more than max_body_bytes announced: 413 at once.
    let (status, _c) = answer_without_body(h.addr, &head(ok, (1 << 20) + 1)).await;
    assert_eq!(status, Some(413));
    // Two bodies of 1 MiB being read take the 2 MiB in flight: a third
    // request is told to come back (503) before its body is read...
    let (status, _a) = answer_without_body(h.addr, &head(ok, 1 << 20)).await;
    assert_eq!(status, None, "waits for its body");
    let (status, _b) = answer_without_body(h.addr, &head(ok, 1 << 20)).await;
    assert_eq!(status, None, "waits for its body");
    let (status, _c) = answer_without_body(h.addr, &head(ok, 10)).await;
    assert_eq!(status, Some(503));
    // ...and once they are gone, there is room again.
    drop((_a, _b));
    let url = format!("http://{}/v1/events", h.addr);
    let mut accepted = false;
    for _ in 0..50 {
        let r = h
            .client
            .post(&url)
            .bearer_auth("t0ken-for-headers")
            .json(&json!(orders(0..2)))
            .send()
            .await
            .unwrap();
        if r.status() == 202 {
            accepted = true;
            break;
        }
        assert_eq!(r.status(), 503);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(accepted, "room again once the slow bodies are gone");
    assert_eq!(h.bridge.outbox.stats().appended, 2);
    h.stop().await;
}

#[tokio::test]
async fn slow_clients_are_cut_off_at_the_header_and_body_timeouts() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start(sim_config(), |cfg| {
        if let duvo_bridge::config::SourceConfig::Http(s) = &mut cfg.sources[0] {
            s.header_read_timeout_ms = 1000;
            s.body_read_timeout_ms = 1000;
        }
    })
    .await;
    // Headers trickled one byte every 300 ms: the connection is closed
    // about a second in, whatever the client keeps sending.
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let started = std::time::Instant::now();
    s.write_all(b"POST /v1/events HTTP/1.1\r\n").await.unwrap();
    let mut closed = false;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if s.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {
                // A 408 before the close is fine too.
                closed = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(closed, "a header trickle is cut off");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // A body trickled after complete headers: 408, nothing stored.
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    s.write_all(
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[",
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = s.write_all(b" ").await;
        let mut buf = [0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            answer.extend_from_slice(&buf[..n]);
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(h.bridge.outbox.stats().appended, 0);

    // An idle keep-alive connection is closed too; a normal request works.
    let r = h
        .client
        .post(format!("http://{}/v1/events", h.addr))
        .json(&json!(orders(0..1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let mut idle = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(3), idle.read(&mut buf))
        .await
        .expect("closed by the server")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    h.stop().await;
}

#[tokio::test]
async fn a_callback_header_naming_an_internal_address_is_refused() {
    let h = Harness::start(sim_config(), |cfg| {
        if let duvo_bridge::config::SourceConfig::Http(s) = &mut cfg.sources[0] {
            s.callback_url_header = true;
            s.callback_secret = Some(duvo_bridge::secret::Secret::new("cb-secret"));
        }
    })
    .await;
    let admin = h.bridge.admin_addr;
    for url in [
        format!("http://{admin}/metrics"),
        format!("http://2130706433:{}/", admin.port()),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://[::1]/cb".to_string(),
        "http://localhost:9/cb".to_string(),
        "http://10.0.0.7/cb".to_string(),
    ] {
        let r = h
            .client
            .post(format!("http://{}/v1/events", h.addr))
            .header("X-Duvo-Callback-Url", &url)
            .json(&json!(orders(0..1)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{url}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"], "forbidden_callback_url", "{url}: {v}");
    }
    assert_eq!(h.bridge.outbox.stats().appended, 0);
    let r = h
        .client
        .post(format!("http://{}/v1/events", h.addr))
        .header(
            "X-Duvo-Callback-Url",
            "https://oms.example.com/duvo-callbacks",
        )
        .json(&json!(orders(0..1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    h.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_reused_with_another_body_is_refused_and_stores_nothing() {
    let h = Harness::start(sim_config(), |_| {}).await;
    let url = format!("http://{}/v1/events", h.addr);
    let post = |body: serde_json::Value, key: &'static str| {
        let (client, url) = (h.client.clone(), url.clone());
        async move {
            client
                .post(&url)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let first = post(json!(orders(0..3)), "batch-7").await;
    assert_eq!(first.status(), 202);
    let first: serde_json::Value = first.json().await.unwrap();
    // The same bytes again: the same ids, nothing stored.
    let again = post(json!(orders(0..3)), "batch-7").await;
    assert_eq!(again.status(), 202);
    let again: serde_json::Value = again.json().await.unwrap();
    assert_eq!(again["ids"], first["ids"]);
    assert_eq!(again["duplicates"], 3);
    // Another body under the same key: 422, nothing stored.
    let other = post(json!(orders(10..14)), "batch-7").await;
    assert_eq!(other.status(), 422);
    let v: serde_json::Value = other.json().await.unwrap();
    assert_eq!(v["error"], "idempotency_key_reused", "{v}");
    assert_eq!(h.bridge.outbox.stats().appended, 3);
    // A key that merely starts like another one is its own key.
    let longer = post(json!(orders(10..14)), "batch-7:b").await;
    assert_eq!(longer.status(), 202);
    assert_eq!(h.bridge.outbox.stats().appended, 7);
    h.stop().await;
}

#[tokio::test]
async fn data_arrives_byte_for_byte_and_big_integer_ids_stay_distinct() {
    let h = Harness::start(sim_config(), |cfg| {
        if let duvo_bridge::config::SourceConfig::Http(s) = &mut cfg.sources[0] {
            s.event_id_field = Some("/order_id".into());
        }
    })
    .await;
    // Two ids that are the same f64; numbers a parser would rewrite; a
    // duplicate key; odd spacing. Sent as NDJSON so each line is an event.
    let a = r#"{"order_id": 123456789012345678901234567890, "amount":1e-999, "big": 1e999, "k":1,"k":2}"#;
    let b = r#"{ "order_id" : 123456789012345678901234567891 , "channel":"web" }"#;
    let r = h
        .client
        .post(format!("http://{}/v1/events", h.addr))
        .header("content-type", "application/x-ndjson")
        .body(format!("{a}\n{b}\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["stored"], 2, "two ids, two events: {v}");
    expect_cases(&h.sim, 2, 20).await;
    let mut cases: Vec<(String, String)> = h
        .sim
        .cases()
        .into_iter()
        .map(|c| (c.title, c.data.unwrap_or_default()))
        .collect();
    cases.sort();
    assert_eq!(
        cases,
        vec![
            ("Order 123456789012345678901234567890".into(), a.into()),
            ("Order 123456789012345678901234567891".into(), b.into()),
        ]
    );
    h.stop().await;
}

/// The server ignores `Idempotency-Key` and loses the answers of a third
/// of the creates it carried out, and half its answers are 502s: every
/// re-send is preceded by a look for the batch's cases, so each order is
/// one case all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_ignoring_idempotency_keys_gets_no_duplicate_from_dropped_answers() {
    let mut sim_cfg = sim_config();
    sim_cfg.idempotency = duvo_bridge::sim::IdempotencyMode::Ignore;
    let h = Harness::start(sim_cfg, |_| {}).await;
    let (sim, bridge) = (&h.sim, &h.bridge);
    sim.set_faults(FaultsPatch {
        error_ratio: Some(0.3),
        error_status: Some(502),
        drop_after_commit_ratio: Some(0.3),
        ..Default::default()
    });
    // Separate batches (past linger_ms apart) until a few answers were
    // lost after their commit.
    let mut chunks = 0;
    while chunks < 10 || (sim.stats().dropped_after_commit < 3 && chunks < 60) {
        let r = h
            .post(
                &json!(orders(chunks * 50..(chunks + 1) * 50)),
                Some(&format!("i-{chunks}")),
            )
            .await;
        assert_eq!(r.status(), 202);
        chunks += 1;
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    let total = chunks * 50;
    expect_cases(sim, total as u64, 60).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            bridge.outbox.depth() == 0
        })
        .await,
        "backlog not delivered"
    );
    sim.set_faults(FaultsPatch {
        error_ratio: Some(0.0),
        drop_after_commit_ratio: Some(0.0),
        ..Default::default()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = sim.stats();
    assert!(
        st.dropped_after_commit >= 3,
        "the fault fired too rarely: {st:?}"
    );
    assert_eq!(st.idempotent_replays, 0, "the server replayed nothing");
    let per = cases_per_order(sim);
    assert_eq!(per.len(), total);
    let twice: Vec<_> = per.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "duplicated orders: {twice:?}");
    // Every case carries its batch's label.
    assert!(sim.cases().iter().all(|c| {
        c.labels
            .iter()
            .any(|l| l.key == "duvo-bridge-batch" && !l.value.is_empty())
    }));
    h.stop().await;
}
