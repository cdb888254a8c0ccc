//! Durability under SIGKILL: the real binary is killed at random moments
//! while a client posts and the batcher delivers; after restarts every
//! event that was acknowledged (202) exists in the simulator exactly once.

mod common;

use std::time::Duration;

use common::*;
use rand::Rng;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_acknowledged_and_duplicates_nothing() {
    let mut rng = seeded_rng();

    let mut sc = sim_config();
    sc.rate_limit = 1200; // 20 requests/s: delivery overlaps with posting
    let sim = start_sim(sc).await;
    let hb = HttpBridge::new(&sim, 1200);
    let (http, admin, log, key) = (hb.http, hb.admin, hb.log.clone(), hb.key.clone());

    let mut bridge = hb.spawn();
    assert!(wait_ready(admin).await, "bridge ready");

    const CHUNKS: usize = 30;
    const PER: usize = 200;
    let poster = tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let mut acknowledged = 0usize;
        for c in 0..CHUNKS {
            let body = json!(orders(c * PER..(c + 1) * PER));
            post_until_accepted(&client, http, &format!("chunk-{c}"), &body).await;
            acknowledged += PER;
        }
        acknowledged
    });

    // Three kills at random moments: while posting, batching or sending.
    for kill in 1..=3 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1200))).await;
        bridge.kill().unwrap(); // SIGKILL
        bridge.wait().unwrap();
        eprintln!(
            "killed bridge #{kill}; cases so far {}",
            sim.stats().cases_created
        );
        bridge = hb.spawn();
        assert!(
            wait_ready(admin).await,
            "bridge ready after restart #{kill}"
        );
    }
    let acknowledged = poster.await.unwrap();
    assert_eq!(acknowledged, CHUNKS * PER);

    let ok = wait_until(Duration::from_secs(90), || async {
        sim.stats().cases_created as usize >= acknowledged
    })
    .await;
    // Give a straggling duplicate the chance to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per = cases_per_order(&sim);
    let _ = bridge.kill();
    let _ = bridge.wait();
    if !ok {
        eprintln!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    assert!(ok, "all acknowledged events delivered: {:?}", sim.stats());
    let missing: Vec<usize> = (0..acknowledged)
        .filter(|i| !per.contains_key(&format!("ORD-{i:06}")))
        .collect();
    assert!(missing.is_empty(), "lost acknowledged events: {missing:?}");
    let dups: Vec<_> = per.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "duplicate cases: {dups:?}");
    assert_eq!(per.len(), acknowledged);
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logs.contains("duvo-bridge running"),
        "the bridge logged its start"
    );
    assert!(
        !logs.contains(&key),
        "the API key must never appear in logs"
    );
    assert_eq!(sim.stats().early_retries, 0);
}

/// SIGKILL while cases are being tracked and failures reported: after
/// restarts every failed case has been reported, under one report id per
/// failure (a re-send after a kill carries the same id, so the receiver can
/// drop the copy), and no completed case is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_tracking_loses_no_report() {
    let mut rng = seeded_rng();

    let mut sc = sim_config();
    sc.rate_limit = 1200;
    sc.fail_ratio = 0.1;
    sc.process_ms = 1500;
    let sim = start_sim(sc).await;
    let sink = CallbackSink::start().await;
    // The receiver is flaky too: reports stay pending across kills.
    sink.fail_next
        .store(40, std::sync::atomic::Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let admin = free_port();
    let config = dir.path().join("bridge.toml");
    std::fs::write(
        &config,
        bridge_toml(
            &sim,
            dir.path(),
            admin,
            1200,
            &format!(
                r#"
[tracking]
poll_interval_ms = 250
watch_interval_ms = 1000
report_retry_initial_ms = 50
report_retry_max_ms = 300
[[sources]]
type = "http"
name = "oms"
listen = "127.0.0.1:{http}"
queue_id = "{queue}"
title = "Order {{/order_id}}"
callback_url = "{callback}"
callback_secret_env = "OMS_CALLBACK_SECRET"
"#,
                queue = sim.queues()[0],
                callback = sink.url,
            ),
        ),
    )
    .unwrap();
    let log = dir.path().join("bridge.log");
    let key = sim.api_keys()[0].clone();
    let env = [("OMS_CALLBACK_SECRET", "kill-test-secret")];
    let mut bridge = spawn_bridge_with(&config, &key, &log, &env);
    assert!(wait_ready(admin).await, "bridge ready");

    const N: usize = 3000;
    let client = reqwest::Client::new();
    for c in 0..(N / 500) {
        let r = post_events(
            &client,
            format!("127.0.0.1:{http}").parse().unwrap(),
            &json!(orders(c * 500..(c + 1) * 500)),
            Some(&format!("chunk-{c}")),
        )
        .await;
        assert_eq!(r.status(), 202);
    }
    // Kill while cases end and reports flow (cases end 1.5 s after creation).
    for kill in 1..=3 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(800..2500))).await;
        bridge.kill().unwrap();
        bridge.wait().unwrap();
        eprintln!(
            "killed bridge #{kill}; cases {}, callbacks {}",
            sim.stats().cases_created,
            sink.count()
        );
        bridge = spawn_bridge_with(&config, &key, &log, &env);
        assert!(wait_ready(admin).await, "ready after restart #{kill}");
    }
    let ended = wait_until(Duration::from_secs(90), || async {
        let s = sim.stats();
        s.cases_created as usize >= N
            && s.by_status.get("completed").copied().unwrap_or(0)
                + s.by_status.get("failed").copied().unwrap_or(0)
                == s.cases_created
    })
    .await;
    let failed = case_ids_in(&sim, "failed");
    let reported_all = wait_until(Duration::from_secs(90), || async {
        let got: std::collections::BTreeSet<String> = sink
            .received()
            .iter()
            .filter_map(|c| c.json["case_id"].as_str().map(str::to_string))
            .collect();
        got.len() >= failed.len()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let _ = bridge.kill();
    let _ = bridge.wait();
    if !(ended && reported_all) {
        eprintln!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    assert!(ended, "every case ended: {:?}", sim.stats());
    assert!(
        reported_all,
        "every failed case reported: {} of {}",
        sink.count(),
        failed.len()
    );
    let per = cases_per_order(&sim);
    assert_eq!(per.len(), N, "every event is a case");
    assert!(per.values().all(|n| *n == 1), "no duplicate case");
    let mut ids_per_case: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for cb in sink.received() {
        assert_eq!(cb.json["status"], "failed", "{}", cb.json);
        ids_per_case
            .entry(cb.json["case_id"].as_str().unwrap().to_string())
            .or_default()
            .insert(cb.report_id.clone().unwrap());
    }
    let reported: std::collections::BTreeSet<String> = ids_per_case.keys().cloned().collect();
    assert_eq!(reported, failed, "exactly the failed cases are reported");
    for (case, ids) in &ids_per_case {
        assert_eq!(
            ids.len(),
            1,
            "case {case} reported under several ids: {ids:?}"
        );
    }
    eprintln!(
        "{} failed cases, {} callbacks received ({} re-sends of an acknowledged report)",
        failed.len(),
        sink.count(),
        sink.count() - failed.len()
    );
}

/// The server carries out a create and never answers it; the bridge is
/// killed while it waits. A server that ignores `Idempotency-Key` would
/// create the batch again on the restarted bridge's re-send; it does not
/// get one, because a resumed batch is first looked for by its label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_a_committed_post_and_its_answer_creates_nothing_twice_when_keys_are_ignored()
 {
    killed_while_the_answers_are_lost(false).await;
}

/// As above, and while the bridge is down every batch record is damaged:
/// the batches are rebuilt from their events (their keys are derived from
/// the batch ids) and looked for on the server: nothing stranded, nothing
/// created twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_batch_records_are_rebuilt_and_their_cases_found_not_created_again() {
    killed_while_the_answers_are_lost(true).await;
}

async fn killed_while_the_answers_are_lost(damage_batches: bool) {
    let mut sc = sim_config();
    sc.idempotency = duvo_bridge::sim::IdempotencyMode::Ignore;
    let sim = start_sim(sc).await;
    let hb = HttpBridge::new(&sim, 6000);
    let (http, admin, key) = (hb.http, hb.admin, hb.key.clone());
    // Another producer's 3,000 cases, created just before: inside the
    // two-minute skew margin a restarted bridge would walk through if it
    // did not learn the server's clock first.
    let client = reqwest::Client::new();
    for i in 0..30 {
        let cases: Vec<_> = (0..100)
            .map(|j| json!({"title": format!("other {}", i * 100 + j)}))
            .collect();
        let r = client
            .post(format!(
                "{}/v2/queues/{}/cases",
                sim.base_url(),
                sim.queues()[0]
            ))
            .bearer_auth(&key)
            .json(&json!({ "cases": cases }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    // A few seconds older than the bridge's events: beyond a known clock's
    // margin (about a second), well inside an unknown one's (two minutes).
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Every create is committed, and its answer never sent.
    sim.set_faults(duvo_bridge::sim::FaultsPatch {
        drop_after_commit_ratio: Some(1.0),
        ..Default::default()
    });
    let mut bridge = hb.spawn();
    assert!(wait_ready(admin).await, "bridge ready");
    for c in 0..3 {
        let r = client
            .post(format!("http://127.0.0.1:{http}/v1/events"))
            .json(&json!(orders(c * 100..(c + 1) * 100)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    assert!(
        wait_until(Duration::from_secs(10), || async {
            sim.stats().cases_created >= 300
        })
        .await,
        "the creates were carried out"
    );
    bridge.kill().unwrap();
    bridge.wait().unwrap();
    if damage_batches {
        let db = duvo_bridge::outbox::open_raw(&hb.dir.path().join("outbox")).unwrap();
        let tree = db
            .open_tree(duvo_bridge::outbox::record::EVENTS_TREE)
            .unwrap();
        let keys: Vec<_> = tree.scan_prefix([b'b']).map(|kv| kv.unwrap().0).collect();
        assert!(!keys.is_empty(), "batches in flight at the kill");
        for k in keys {
            tree.insert(k, &b"\x01\0\0\0\0garbage"[..]).unwrap();
        }
        db.flush().unwrap();
    }
    sim.set_faults(duvo_bridge::sim::FaultsPatch {
        drop_after_commit_ratio: Some(0.0),
        ..Default::default()
    });
    let lists_before = sim.stats().list_requests;
    let mut bridge = hb.spawn();
    assert!(wait_ready(admin).await, "bridge ready again");
    // The resumed batches settle from the listing: the outbox empties and
    // nothing is created again.
    assert!(
        wait_until(Duration::from_secs(20), || async {
            scrape_metric(admin, "duvo_bridge_outbox_depth").await == Some(0.0)
        })
        .await,
        "resumed batches not settled"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut per = cases_per_order(&sim);
    assert_eq!(per.remove("?"), Some(3000), "the other producer's cases");
    assert_eq!(per.len(), 300);
    assert!(per.values().all(|&n| n == 1), "{per:?}");
    assert_eq!(sim.stats().cases_created, 3300);
    // Each resumed batch: one probe for the server's clock (`Date`), then
    // the pages since its claim. Walking the skew margin instead reads the
    // 3,000 earlier cases for each (30+ pages per batch).
    let lists = sim.stats().list_requests - lists_before;
    assert!(
        lists <= 15,
        "{lists} listings to find 3 resumed batches (the tracker's polls included)"
    );
    send_signal(&bridge, "TERM");
    assert!(bridge.wait().unwrap().success());
}

/// A 429 storm whose `retry-after` runs past a SIGKILL: the restarted
/// bridge waits out the deadline the killed one was given (kept next to the
/// outbox) instead of asking again early, then delivers everything once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_deadline_outlives_a_sigkill() {
    let sim = start_sim(sim_config()).await;
    let hb = HttpBridge::new(&sim, 6000);
    let (http, admin) = (hb.http, hb.admin);
    let mut bridge = hb.spawn();
    assert!(wait_ready(admin).await, "bridge ready");
    sim.set_faults(duvo_bridge::sim::FaultsPatch {
        throttle_secs: Some(6),
        ..Default::default()
    });
    let client = reqwest::Client::new();
    let r = client
        .post(format!("http://127.0.0.1:{http}/v1/events"))
        .json(&json!(orders(0..50)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(
        wait_until(Duration::from_secs(5), || async {
            sim.stats().rate_limited >= 1
        })
        .await,
        "the bridge met the storm"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    bridge.kill().unwrap();
    bridge.wait().unwrap();
    let mut bridge = hb.spawn();
    assert!(wait_ready(admin).await, "bridge ready again");
    expect_cases(&sim, 50, 20).await;
    let s = sim.stats();
    assert_eq!(
        s.early_retries, 0,
        "a request came before the retry-after deadline: {s:?}"
    );
    assert_eq!(s.cases_created, 50);
    send_signal(&bridge, "TERM");
    assert!(bridge.wait().unwrap().success());
}
