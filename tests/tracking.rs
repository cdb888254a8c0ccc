//! Case tracking and failure reports, end to end against the simulator:
//! the bridge creates cases, follows them with listings, and reports the
//! failed ones to an HTTP callback, signed, once per transition.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use duvo_bridge::config::Config;
use duvo_bridge::report::http::signature;

const SECRET: &str = "callback-secret-for-tests";

fn with_callback(cfg: &mut Config, url: &str, secret_var: &str) {
    // SAFETY: set before the bridge starts, and every test uses its own
    // variable name; nextest runs each test in its own process anyway.
    unsafe { std::env::set_var(secret_var, SECRET) };
    cfg.tracking.poll_interval_ms = 300;
    cfg.tracking.watch_interval_ms = 600;
    cfg.tracking.report_retry_initial_ms = 50;
    cfg.tracking.report_retry_max_ms = 500;
    if let duvo_bridge::config::SourceConfig::Http(h) = &mut cfg.sources[0] {
        h.callback_url = Some(url.to_string());
        h.callback_secret_env = Some(secret_var.to_string());
    }
}

fn by_case(cbs: &[Callback]) -> BTreeMap<String, Vec<Callback>> {
    let mut m: BTreeMap<String, Vec<Callback>> = BTreeMap::new();
    for c in cbs {
        m.entry(c.json["case_id"].as_str().unwrap_or("?").to_string())
            .or_default()
            .push(c.clone());
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_cases_are_reported_once_completed_ones_forgotten() {
    let sink = CallbackSink::start().await;
    let h = Harness::start(
        duvo_bridge::sim::SimConfig {
            fail_ratio: 0.1,
            process_ms: 300,
            ..sim_config()
        },
        |cfg| with_callback(cfg, &sink.url, "TRACK_TEST_SECRET_1"),
    )
    .await;
    let started = Instant::now();
    for chunk in 0..4 {
        let body = serde_json::Value::Array(orders(chunk * 500..(chunk + 1) * 500));
        assert_eq!(h.post(&body, None).await.status(), 202);
    }
    expect_cases(&h.sim, 2000, 60).await;
    // Every case reaches an end in the simulator...
    let ended = wait_until(Duration::from_secs(60), || async {
        let s = h.sim.stats();
        s.by_status.get("completed").copied().unwrap_or(0)
            + s.by_status.get("failed").copied().unwrap_or(0)
            == 2000
    })
    .await;
    assert!(ended, "cases did not all end: {:?}", h.sim.stats());
    let failed = case_ids_in(&h.sim, "failed");
    assert!(
        (100..=320).contains(&failed.len()),
        "fail ratio 0.1 should fail about 200 of 2000, got {}",
        failed.len()
    );
    // ...and the tracker catches up: nothing open any more.
    let caught_up = wait_until(Duration::from_secs(60), || async {
        h.bridge.outbox.tracked_queues().iter().all(|q| q.open == 0)
            && sink.count() >= failed.len()
            && h.bridge.outbox.pending_reports().is_empty()
    })
    .await;
    let elapsed = started.elapsed();
    assert!(
        caught_up,
        "tracking did not finish: {:?}, {} callbacks for {} failed cases",
        h.bridge.outbox.tracked_queues(),
        sink.count(),
        failed.len()
    );
    // Give a duplicate the chance to show up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let received = sink.received();
    let per_case = by_case(&received);
    let reported: BTreeSet<String> = per_case.keys().cloned().collect();
    assert_eq!(reported, failed, "exactly the failed cases are reported");
    for (case, cbs) in &per_case {
        assert_eq!(cbs.len(), 1, "case {case} reported {} times", cbs.len());
        let cb = &cbs[0];
        assert_eq!(
            cb.signature.as_deref(),
            Some(signature(SECRET.as_bytes(), &cb.body).as_str()),
            "signature of the report for {case}"
        );
        assert_eq!(cb.json["status"], "failed");
        assert_eq!(cb.json["queue_id"], h.sim.queues()[0].to_string());
        assert!(cb.json["reason"].as_str().unwrap().contains("failed"));
        assert!(
            cb.json["event"]["order_id"]
                .as_str()
                .unwrap()
                .starts_with("ORD-"),
            "the original event rides along: {}",
            cb.json
        );
        assert_eq!(cb.report_id.as_deref(), cb.json["report_id"].as_str());
    }
    // Completed cases are forgotten: only the failed ones are still watched.
    let tracked = h.bridge.outbox.tracked_queues();
    assert_eq!(tracked.len(), 1);
    assert_eq!(tracked[0].open, 0);
    assert_eq!(tracked[0].watching, failed.len() as u64);
    // The status history is visible on the intake API.
    let any = &received[0];
    let event_id = any.json["event_id"].as_str().unwrap();
    let view: serde_json::Value = h
        .client
        .get(format!("http://{}/v1/events/{event_id}", h.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["tracking"]["phase"], "watching", "{view}");
    assert_eq!(view["tracking"]["history"][0]["status"], "failed", "{view}");
    // Frugal: one listing per 100 finished cases plus one per poll interval,
    // and a short last page per stream each time it catches up (the
    // clean-up stream waits while creates are backlogged, then catches up).
    let lists = h.sim.stats().list_requests;
    let bound = 2000 / 100 + (elapsed.as_millis() as u64 / 300) + 4;
    assert!(
        lists <= bound,
        "{lists} listing requests in {elapsed:?} (bound {bound})"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_case_that_fails_again_is_reported_again_and_only_then() {
    let sink = CallbackSink::start().await;
    let h = Harness::start(
        duvo_bridge::sim::SimConfig {
            fail_ratio: 0.0,
            process_ms: 200,
            ..sim_config()
        },
        |cfg| with_callback(cfg, &sink.url, "TRACK_TEST_SECRET_2"),
    )
    .await;
    let mut events = orders(0..20);
    for e in events.iter_mut().take(5) {
        e["simulate"] = "fail".into();
    }
    assert_eq!(
        h.post(&serde_json::Value::Array(events), None)
            .await
            .status(),
        202
    );
    assert!(wait_until(Duration::from_secs(30), || async { sink.count() == 5 }).await);
    let failed: Vec<String> = case_ids_in(&h.sim, "failed").into_iter().collect();
    assert_eq!(failed.len(), 5);
    // A human retries the failed cases in Duvo; they fail again.
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/v2/queues/{}/cases/bulk-retry",
            h.sim.base_url(),
            h.sim.queues()[0]
        ))
        .bearer_auth(&h.sim.api_keys()[0])
        .json(&serde_json::json!({ "case_ids": failed }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        wait_until(Duration::from_secs(30), || async { sink.count() == 10 }).await,
        "second failures reported: {}",
        sink.count()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let received = sink.received();
    assert_eq!(received.len(), 10, "no report twice for one transition");
    for (case, cbs) in by_case(&received) {
        assert_eq!(cbs.len(), 2, "case {case}");
        assert_ne!(
            cbs[0].json["updated_at"], cbs[1].json["updated_at"],
            "two distinct transitions"
        );
        assert_ne!(cbs[0].report_id, cbs[1].report_id);
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_wait_for_the_callback_to_accept_them_and_rejections_are_reported() {
    let sink = CallbackSink::start().await;
    sink.fail_next
        .store(25, std::sync::atomic::Ordering::SeqCst);
    let h = Harness::start(
        duvo_bridge::sim::SimConfig {
            process_ms: 200,
            ..sim_config()
        },
        |cfg| with_callback(cfg, &sink.url, "TRACK_TEST_SECRET_3"),
    )
    .await;
    let mut events = orders(0..30);
    for e in events.iter_mut().take(3) {
        e["simulate"] = "fail".into();
    }
    // A poison event: the API refuses it (400); it is reported as rejected.
    events[10]["simulate"] = "reject".into();
    assert_eq!(
        h.post(&serde_json::Value::Array(events), None)
            .await
            .status(),
        202
    );
    assert!(
        wait_until(Duration::from_secs(60), || async { sink.count() == 4 }).await,
        "4 reports after the callback recovered: got {}, refused {}",
        sink.count(),
        sink.refused.load(std::sync::atomic::Ordering::SeqCst)
    );
    assert_eq!(sink.refused.load(std::sync::atomic::Ordering::SeqCst), 25);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let received = sink.received();
    assert_eq!(received.len(), 4, "each report acknowledged once");
    let statuses: BTreeMap<String, usize> = received.iter().fold(BTreeMap::new(), |mut m, c| {
        *m.entry(c.json["status"].as_str().unwrap().to_string())
            .or_default() += 1;
        m
    });
    assert_eq!(statuses["failed"], 3);
    assert_eq!(statuses["rejected"], 1);
    let rejected = received
        .iter()
        .find(|c| c.json["status"] == "rejected")
        .unwrap();
    assert!(rejected.json["case_id"].is_null());
    assert_eq!(rejected.json["event"]["order_id"], "ORD-000010");
    assert!(rejected.json["reason"].as_str().unwrap().starts_with("400"));
    assert!(h.bridge.outbox.pending_reports().is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_request_callback_url_is_used_when_allowed() {
    let default_sink = CallbackSink::start().await;
    let own_sink = CallbackSink::start().await;
    let h = Harness::start(
        duvo_bridge::sim::SimConfig {
            process_ms: 100,
            ..sim_config()
        },
        |cfg| {
            with_callback(cfg, &default_sink.url, "TRACK_TEST_SECRET_4");
            if let duvo_bridge::config::SourceConfig::Http(h) = &mut cfg.sources[0] {
                h.callback_url_header = true;
                // The test's receivers listen on loopback.
                h.callback_allow = vec!["127.0.0.1".into()];
            }
        },
    )
    .await;
    let mut ev = order(1);
    ev["simulate"] = "fail".into();
    let resp = h
        .client
        .post(format!("http://{}/v1/events", h.addr))
        .header("X-Duvo-Callback-Url", &own_sink.url)
        .json(&ev)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let bad = h
        .client
        .post(format!("http://{}/v1/events", h.addr))
        .header("X-Duvo-Callback-Url", "file:///etc/passwd")
        .json(&order(2))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    // A URL over 2 KiB is refused with a clear error; a 200 KB one does
    // not even fit the connection's header buffer (64 KiB): 431.
    let long = format!("{}?pad={}", own_sink.url, "a".repeat(3_000));
    let bad = h
        .client
        .post(format!("http://{}/v1/events", h.addr))
        .header("X-Duvo-Callback-Url", &long)
        .json(&order(3))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let v: serde_json::Value = bad.json().await.unwrap();
    assert_eq!(v["error"], "invalid_callback_url", "{v}");
    let huge = format!("{}?pad={}", own_sink.url, "a".repeat(200_000));
    let bad = h
        .client
        .post(format!("http://{}/v1/events", h.addr))
        .header("X-Duvo-Callback-Url", &huge)
        .json(&order(4))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 431);
    assert_eq!(h.bridge.outbox.stats().appended, 1);
    assert!(wait_until(Duration::from_secs(30), || async { own_sink.count() == 1 }).await);
    assert_eq!(default_sink.count(), 0);
    h.stop().await;
}

/// A long run of completions (many full cleanup pages, paced by the
/// tracking share) must not hold a failure report back: the tracker
/// alternates reports listings with cleanup slices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_reported_while_a_burst_of_completions_is_still_being_cleaned_up() {
    let sink = CallbackSink::start().await;
    let h = Harness::start(
        duvo_bridge::sim::SimConfig {
            process_ms: 100,
            ..sim_config()
        },
        |cfg| {
            with_callback(cfg, &sink.url, "TRACK_TEST_SECRET_BURST");
            // 600/min, a tenth for tracking: about one listing a second,
            // so 2,000 completions take some 20 cleanup pages (seconds).
            cfg.duvo.rate_limit_per_minute = 600;
            cfg.tracking.share = 0.1;
        },
    )
    .await;
    for chunk in 0..4 {
        let body = serde_json::Value::Array(orders(chunk * 500..(chunk + 1) * 500));
        assert_eq!(h.post(&body, None).await.status(), 202);
    }
    expect_cases(&h.sim, 2000, 60).await;
    let completed = wait_until(Duration::from_secs(30), || async {
        h.sim
            .stats()
            .by_status
            .get("completed")
            .copied()
            .unwrap_or(0)
            == 2000
    })
    .await;
    assert!(completed, "cases did not complete: {:?}", h.sim.stats());

    // Now a few cases that fail, behind the whole burst of completions.
    let failing: Vec<serde_json::Value> = (9000..9005)
        .map(|i| {
            let mut o = order(i);
            o["simulate"] = "fail".into();
            o
        })
        .collect();
    assert_eq!(
        h.post(&serde_json::Value::Array(failing), None)
            .await
            .status(),
        202
    );
    let reported = wait_until(Duration::from_secs(60), || async { sink.count() >= 5 }).await;
    let still_open: u64 = h
        .bridge
        .outbox
        .tracked_queues()
        .iter()
        .map(|q| q.open)
        .sum();
    assert!(
        reported,
        "failures not reported: {} callbacks",
        sink.count()
    );
    // Reported while most completions were still waiting to be forgotten:
    // with cleanup slices first, the reports would only come after the
    // last completion page (nothing left open).
    assert!(
        still_open >= 500,
        "failures were reported only after the cleanup caught up ({still_open} cases still open)"
    );
    let cbs = sink.received();
    assert!(cbs.iter().all(|c| c.json["status"] == "failed"), "{cbs:?}");
    // And the cleanup does finish: every completion is forgotten.
    let forgotten = wait_until(Duration::from_secs(90), || async {
        h.bridge.outbox.tracked_queues().iter().all(|q| q.open == 0)
    })
    .await;
    assert!(
        forgotten,
        "completions not forgotten: {:?}",
        h.bridge.outbox.tracked_queues()
    );
    h.stop().await;
}

/// Head-of-line blocking: reports to dead per-request callback URLs were
/// created first (lower ids) and outnumber the report slots, yet the reports
/// to a healthy callback go out promptly; the dead ones stay pending in the
/// outbox and are delivered once their endpoint comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_to_dead_callbacks_do_not_block_the_healthy_ones() {
    let healthy = CallbackSink::start().await;
    // Two endpoints nobody listens on (connection refused) until revived.
    let dead_ports = [free_port(), free_port()];
    let dead_url = |port: u16| format!("http://127.0.0.1:{port}/duvo-callback");
    let h = Harness::start(
        duvo_bridge::sim::SimConfig {
            process_ms: 100,
            ..sim_config()
        },
        |cfg| {
            with_callback(cfg, &healthy.url, "TRACK_TEST_SECRET_5");
            cfg.tracking.report_concurrency = 2;
            if let duvo_bridge::config::SourceConfig::Http(h) = &mut cfg.sources[0] {
                h.callback_url_header = true;
                // The test's receivers listen on loopback.
                h.callback_allow = vec!["127.0.0.1".into()];
            }
        },
    )
    .await;
    let post_failing = |range: std::ops::Range<usize>, url: String| {
        let mut events = orders(range);
        for e in events.iter_mut() {
            e["simulate"] = "fail".into();
        }
        let req = h
            .client
            .post(format!("http://{}/v1/events", h.addr))
            .header("X-Duvo-Callback-Url", url)
            .json(&serde_json::Value::Array(events));
        async move { req.send().await.unwrap().status() }
    };
    // First the dead ones: 6 reports, more than the 2 slots...
    assert_eq!(post_failing(0..3, dead_url(dead_ports[0])).await, 202);
    assert_eq!(post_failing(3..6, dead_url(dead_ports[1])).await, 202);
    let pending = |n: u64| {
        let outbox = h.bridge.outbox.clone();
        move || {
            let outbox = outbox.clone();
            async move { outbox.pending_reports().get("oms").copied().unwrap_or(0) >= n }
        }
    };
    assert!(
        wait_until(Duration::from_secs(30), pending(6)).await,
        "the 6 reports to dead callbacks exist: {:?}",
        h.bridge.outbox.pending_reports()
    );
    // ...then the healthy ones, with higher report ids.
    assert_eq!(post_failing(6..10, healthy.url.clone()).await, 202);
    assert!(
        wait_until(Duration::from_secs(20), || async { healthy.count() == 4 }).await,
        "reports to the healthy callback went out despite the dead ones: {} of 4, pending {:?}",
        healthy.count(),
        h.bridge.outbox.pending_reports()
    );
    // The dead ones are kept, not dropped (the last healthy report may
    // still be on its way out of the outbox once the sink has it).
    let outbox = h.bridge.outbox.clone();
    wait_until(Duration::from_secs(5), || {
        let outbox = outbox.clone();
        async move { outbox.pending_reports().get("oms").copied() == Some(6) }
    })
    .await;
    assert_eq!(
        h.bridge.outbox.pending_reports().get("oms").copied(),
        Some(6)
    );
    // Their endpoints come back: they are delivered (retry max is 500 ms).
    let revived = [
        CallbackSink::start_on(&format!("127.0.0.1:{}", dead_ports[0])).await,
        CallbackSink::start_on(&format!("127.0.0.1:{}", dead_ports[1])).await,
    ];
    assert!(
        wait_until(Duration::from_secs(20), || async {
            revived.iter().all(|s| s.count() == 3) && h.bridge.outbox.pending_reports().is_empty()
        })
        .await,
        "revived endpoints got {:?}, pending {:?}",
        revived.iter().map(CallbackSink::count).collect::<Vec<_>>(),
        h.bridge.outbox.pending_reports()
    );
    assert_eq!(healthy.count(), 4, "each report acknowledged once");
    h.stop().await;
}

/// Answers lost after the server committed (the bridge learns its case ids
/// only from the retry, a second later) while cases fail within 100 ms: the
/// reports stream has already listed past those failures when the batch
/// settles. The settle sends the stream back to the cases' creation, so
/// every failure is still reported, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_of_cases_learnt_late_are_still_reported() {
    let sink = CallbackSink::start().await;
    let h = Harness::start(
        duvo_bridge::sim::SimConfig {
            fail_ratio: 0.2,
            process_ms: 100,
            ..sim_config()
        },
        |cfg| {
            with_callback(cfg, &sink.url, "TRACK_TEST_SECRET_LATE");
            cfg.tracking.poll_interval_ms = 100;
            cfg.delivery.retry_initial_ms = 1500;
            cfg.delivery.retry_max_ms = 1500;
        },
    )
    .await;
    h.sim.set_faults(duvo_bridge::sim::FaultsPatch {
        drop_after_commit_ratio: Some(0.5),
        ..Default::default()
    });
    for chunk in 0..6 {
        let body = serde_json::Value::Array(orders(chunk * 100..(chunk + 1) * 100));
        assert_eq!(h.post(&body, None).await.status(), 202);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    expect_cases(&h.sim, 600, 60).await;
    assert!(
        h.sim.stats().dropped_after_commit > 0,
        "no answer was lost: {:?}",
        h.sim.stats()
    );
    h.sim.set_faults(duvo_bridge::sim::FaultsPatch {
        drop_after_commit_ratio: Some(0.0),
        ..Default::default()
    });
    let ended = wait_until(Duration::from_secs(30), || async {
        let s = h.sim.stats();
        s.by_status.get("completed").copied().unwrap_or(0)
            + s.by_status.get("failed").copied().unwrap_or(0)
            == 600
    })
    .await;
    assert!(ended, "cases did not all end: {:?}", h.sim.stats());
    let failed = case_ids_in(&h.sim, "failed");
    assert!(!failed.is_empty());
    let all_reported = wait_until(Duration::from_secs(30), || async {
        sink.count() >= failed.len()
    })
    .await;
    let got = by_case(&sink.received());
    let missing: Vec<_> = failed.iter().filter(|c| !got.contains_key(*c)).collect();
    assert!(
        all_reported && missing.is_empty(),
        "{} of {} failed cases never reported: {:?}",
        missing.len(),
        failed.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        got.values().all(|v| v.len() == 1),
        "a failure was reported twice"
    );
    h.stop().await;
}
