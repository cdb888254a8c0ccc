//! The Kafka source and reporter against librdkafka's mock cluster
//! (`rdkafka::mocking::MockCluster`, a Kafka protocol implementation inside
//! the test process, on real TCP ports), with the in-process simulator and
//! bridge; the SIGKILL test runs the real binary against the same cluster.

mod common;
mod kafka_util;

use std::time::Duration;

use common::*;
use duvo_bridge::outbox::{EventId, Origin};
use duvo_bridge::report::kafka::KafkaReporter;
use duvo_bridge::report::{Report, ReportError, ReportStatus, Reporter};
use duvo_bridge::source::KafkaUndecodablePolicy;
use kafka_util::*;
use rdkafka::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use serde_json::json;

type Mock = MockCluster<'static, DefaultProducerContext>;

fn mock(brokers: i32, topics: &[(&str, i32)]) -> Mock {
    let m = MockCluster::new(brokers).expect("mock cluster");
    for (t, p) in topics {
        m.create_topic(t, *p, 1).expect("topic");
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_become_cases_exactly_once_and_offsets_are_committed() {
    let m = mock(1, &[("orders", 3)]);
    let bs = m.bootstrap_servers();
    let p = producer(&bs);
    produce(&p, "orders", &order_recs(0..3000)).await;

    let sim = start_sim(sim_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut src = kafka_source("k-deliver", &bs, "g-deliver", &["orders"], sim.queues()[0]);
    src.labels.insert("channel".into(), "{/channel}".into());
    let bridge = Bridge::start(kafka_bridge_config(&sim, dir.path(), vec![src])).await;
    expect_cases(&sim, 3000, 60).await;
    // Produced while the bridge runs.
    produce(&p, "orders", &order_recs(3000..3500)).await;
    expect_cases(&sim, 3500, 60).await;
    assert_exactly_once(&sim, 3500);
    let case = sim
        .cases()
        .into_iter()
        .find(|c| c.title == "Order ORD-000042")
        .expect("case");
    assert_eq!(case.labels[0].value, "kafka");
    let data: serde_json::Value = serde_json::from_str(case.data.as_deref().unwrap()).unwrap();
    assert_eq!(data["amount"], 42);

    // The group's committed offsets reach the end of every partition.
    let ok = wait_until(Duration::from_secs(30), || async {
        committed(&bs, "g-deliver", "orders", 3).iter().sum::<i64>() == 3500
    })
    .await;
    assert!(
        ok,
        "committed: {:?}",
        committed(&bs, "g-deliver", "orders", 3)
    );
    let text = bridge.metrics().await;
    assert_eq!(
        metric_sum(&text, "duvo_bridge_kafka_consumed_total", &["k-deliver"]),
        3500.0
    );
    assert_eq!(
        metric_sum(&text, "duvo_bridge_kafka_stored_offset", &["k-deliver"]),
        3500.0
    );
    assert_eq!(
        metric_sum(&text, "duvo_bridge_events_stored_total", &["k-deliver"]),
        3500.0
    );
    assert!(bridge.ready().await);
    let ok = wait_until(Duration::from_secs(20), || async {
        let t = bridge.metrics().await;
        metric_sum(&t, "duvo_bridge_kafka_committed_offset", &["k-deliver"]) == 3500.0
            && t.contains("duvo_bridge_kafka_lag{")
            && metric_sum(&t, "duvo_bridge_kafka_lag", &["k-deliver"]) == 0.0
    })
    .await;
    assert!(ok, "{}", bridge.metrics().await);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_records_are_wrapped_or_dead_lettered_and_never_stall_the_partition() {
    let m = mock(1, &[("mixed", 1), ("mixed.dlq", 1)]);
    let bs = m.bootstrap_servers();
    let p = producer(&bs);
    let with_id = |v: serde_json::Value, id: &str| Rec {
        headers: vec![("event-id".into(), id.into())],
        ..Rec::json("k", &v)
    };
    let recs = vec![
        Rec::json("a", &json!({"order_id": "A"})),
        Rec {
            key: Some(b"t".to_vec()),
            value: Some(b"plain text".to_vec()),
            ..Rec::default()
        },
        Rec {
            key: Some(vec![0xff]),
            value: Some(vec![0xff, 0xfe, 0x00]),
            ..Rec::default()
        },
        Rec {
            key: Some(b"tomb".to_vec()),
            value: None,
            ..Rec::default()
        },
        Rec {
            key: None,
            value: Some(b"[1,2]".to_vec()),
            ..Rec::default()
        },
        with_id(json!({"order_id": "B"}), "X-1"),
        with_id(json!({"order_id": "C"}), "X-1"),
        Rec::json("d", &json!({"order_id": "D", "event_id": "E-9"})),
        Rec::json("e", &json!({"order_id": "E", "event_id": "E-9"})),
    ];
    produce(&p, "mixed", &recs).await;

    let sim = start_sim(sim_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let q = sim.queues()[0];
    let mut wrap = kafka_source("k-wrap", &bs, "g-wrap", &["mixed"], q);
    wrap.message_id_header = Some("event-id".into());
    wrap.message_id_field = Some("/event_id".into());
    wrap.labels.insert("via".into(), "wrap".into());
    let mut dlq = kafka_source("k-dlq", &bs, "g-dlq", &["mixed"], q);
    dlq.on_undecodable = KafkaUndecodablePolicy::DeadLetter;
    dlq.dead_letter_topic = Some("mixed.dlq".into());
    dlq.labels.insert("via".into(), "dlq".into());
    let bridge = Bridge::start(kafka_bridge_config(&sim, dir.path(), vec![wrap, dlq])).await;

    // wrap: A, text, base64, [1,2], B (C has B's header id), D (E has D's field id) = 6
    // dlq:  A, B, C, D, E = 5; text, bytes, tombstone, array dead-lettered
    expect_cases(&sim, 11, 60).await;
    let dead = read_topic(&bs, "mixed.dlq", 4, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cases = sim.cases();
    let via = |v: &str| {
        let mut t: Vec<(String, String)> = cases
            .iter()
            .filter(|c| c.labels.iter().any(|l| l.key == "via" && l.value == v))
            .map(|c| (c.title.clone(), c.data.clone().unwrap_or_default()))
            .collect();
        t.sort();
        t
    };
    let wrapped = via("wrap");
    let titles: Vec<&str> = wrapped.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        titles,
        [
            "Order A",
            "Order B",
            "Order D",
            "Untitled event",
            "Untitled event",
            "Untitled event"
        ],
        "{wrapped:?}"
    );
    let datas: Vec<&str> = wrapped.iter().map(|(_, d)| d.as_str()).collect();
    for want in ["plain text", "//4A", "[1,2]"] {
        assert!(datas.contains(&want), "{want} not in {datas:?}");
    }
    let dl_titles: Vec<String> = via("dlq").into_iter().map(|(t, _)| t).collect();
    assert_eq!(
        dl_titles,
        ["Order A", "Order B", "Order C", "Order D", "Order E"]
    );

    assert_eq!(dead.len(), 4, "{dead:?}");
    let reasons: Vec<&str> = dead
        .iter()
        .map(|m| header(m, "duvo-bridge-error").unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "not_json_object",
            "not_utf8",
            "null_value",
            "not_json_object"
        ]
    );
    assert_eq!(dead[1].payload(), Some(&[0xff, 0xfe, 0x00][..]));
    assert_eq!(dead[1].key(), Some(&[0xff][..]));
    assert!(dead[2].payload().is_none());
    assert_eq!(header(&dead[0], "duvo-source-topic"), Some("mixed"));
    assert_eq!(header(&dead[0], "duvo-source-offset"), Some("1"));
    assert_eq!(header(&dead[0], "duvo-bridge-source"), Some("k-dlq"));

    // Neither partition stalled: both groups committed past the last record.
    let ok = wait_until(Duration::from_secs(20), || async {
        committed(&bs, "g-wrap", "mixed", 1) == [9] && committed(&bs, "g-dlq", "mixed", 1) == [9]
    })
    .await;
    assert!(
        ok,
        "wrap {:?} dlq {:?}",
        committed(&bs, "g-wrap", "mixed", 1),
        committed(&bs, "g-dlq", "mixed", 1)
    );
    let text = bridge.metrics().await;
    assert_eq!(
        metric_sum(&text, "duvo_bridge_events_duplicate_total", &["k-wrap"]),
        2.0
    );
    assert_eq!(
        metric_sum(
            &text,
            "duvo_bridge_events_rejected_total",
            &["k-wrap", "null_value"]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(&text, "duvo_bridge_kafka_dead_lettered_total", &["k-dlq"]),
        4.0
    );
    bridge.stop().await;
}

/// Membership changes with records flowing around them. librdkafka's mock
/// coordinator refuses offset commits while a join is pending (real Kafka
/// accepts them until the rebalance completes, which is what the commit on
/// revocation relies on), so A's offsets are let reach the broker before B
/// joins; the graceful leave is not: A leaves right after reading a burst,
/// and its final commit (on stop) tells B where to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bridges_in_one_group_share_the_partitions_and_a_leave_hands_over_exactly_once() {
    let m = mock(1, &[("shared", 6)]);
    let bs = m.bootstrap_servers();
    let sim = start_sim(sim_config()).await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let q = sim.queues()[0];
    // Distinct source names: the two bridges share the process's metrics.
    let src = |name: &str| kafka_source(name, &bs, "g-shared", &["shared"], q);
    let p = producer(&bs);
    produce(&p, "shared", &order_recs(0..2000)).await;
    let a = Bridge::start(kafka_bridge_config(&sim, d1.path(), vec![src("k-a")])).await;
    expect_cases(&sim, 2000, 60).await;
    let ok = wait_until(Duration::from_secs(30), || async {
        committed(&bs, "g-shared", "shared", 6).iter().sum::<i64>() == 2000
    })
    .await;
    assert!(ok, "A committed what it read");

    // B joins.
    let b = Bridge::start(kafka_bridge_config(&sim, d2.path(), vec![src("k-b")])).await;
    let both = wait_until(Duration::from_secs(60), || async {
        let t = b.metrics().await;
        metric_sum(&t, "duvo_bridge_kafka_rebalances_total", &["k-b", "assign"]) >= 1.0
            && metric_sum(&t, "duvo_bridge_kafka_rebalances_total", &["k-a", "assign"]) >= 2.0
    })
    .await;
    assert!(both, "both bridges got partitions: {}", b.metrics().await);
    produce(&p, "shared", &order_recs(2000..4000)).await;
    expect_cases(&sim, 4000, 60).await;
    let t = b.metrics().await;
    assert!(
        metric_sum(&t, "duvo_bridge_kafka_consumed_total", &["k-a"]) > 2000.0,
        "A kept some partitions"
    );
    assert!(
        metric_sum(&t, "duvo_bridge_kafka_consumed_total", &["k-b"]) > 0.0,
        "B got some"
    );

    // A leaves right after a burst: nothing but its final commit says
    // where B must start on A's partitions.
    produce(&p, "shared", &order_recs(4000..6000)).await;
    a.stop().await;
    expect_cases(&sim, 6000, 90).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_exactly_once(&sim, 6000);
    let ok = wait_until(Duration::from_secs(30), || async {
        let t = b.metrics().await;
        metric_sum(&t, "duvo_bridge_kafka_stored_offset", &["k-b"]) >= 0.0
            && metric_sum(&t, "duvo_bridge_kafka_rebalances_total", &["k-b", "assign"]) >= 2.0
    })
    .await;
    assert!(ok, "B took over A's partitions");
    b.stop().await;
    assert_eq!(
        committed(&bs, "g-shared", "shared", 6).iter().sum::<i64>(),
        6000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_then_up_is_reported_unready_and_loses_nothing() {
    let m = mock(1, &[("flaky", 2)]);
    let bs = m.bootstrap_servers();
    let p = producer(&bs);
    produce(&p, "flaky", &order_recs(0..1000)).await;
    let sim = start_sim(sim_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let bridge = Bridge::start(kafka_bridge_config(
        &sim,
        dir.path(),
        vec![kafka_source(
            "k-flaky",
            &bs,
            "g-flaky",
            &["flaky"],
            sim.queues()[0],
        )],
    ))
    .await;
    expect_cases(&sim, 1000, 60).await;
    assert!(wait_until(Duration::from_secs(20), || bridge.ready()).await);

    m.broker_down(-1).unwrap();
    let down = wait_until(Duration::from_secs(60), || async { !bridge.ready().await }).await;
    assert!(down, "/readyz turns 503 while no broker is reachable");
    let text = bridge.metrics().await;
    assert_eq!(
        metric_sum(&text, "duvo_bridge_kafka_connected", &["k-flaky"]),
        0.0
    );

    m.broker_up(-1).unwrap();
    produce(&p, "flaky", &order_recs(1000..2000)).await;
    expect_cases(&sim, 2000, 90).await;
    assert!(
        wait_until(Duration::from_secs(30), || bridge.ready()).await,
        "ready again"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_exactly_once(&sim, 2000);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_high_water_the_partitions_pause_and_the_outbox_stays_bounded() {
    const N: usize = 3000;
    let m = mock(1, &[("burst", 3)]);
    let bs = m.bootstrap_servers();
    produce(&producer(&bs), "burst", &order_recs(0..N)).await;
    let mut sc = sim_config();
    sc.rate_limit = 600;
    let sim = start_sim(sc).await;
    let dir = tempfile::tempdir().unwrap();
    let mut src = kafka_source("k-burst", &bs, "g-burst", &["burst"], sim.queues()[0]);
    src.max_batch = 50;
    let mut cfg = kafka_bridge_config(&sim, dir.path(), vec![src]);
    cfg.outbox.high_water_events = 300;
    cfg.outbox.low_water_events = 100;
    cfg.duvo.rate_limit_per_minute = 600;
    let bridge = Bridge::start(cfg).await;
    let outbox = bridge.running.outbox.clone();
    let mut max_depth = 0;
    let mut saw_paused = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while sim.stats().cases_created < N as u64 && tokio::time::Instant::now() < deadline {
        max_depth = max_depth.max(outbox.depth());
        if !saw_paused
            && metric_sum(
                &bridge.metrics().await,
                "duvo_bridge_kafka_paused",
                &["k-burst"],
            ) > 0.0
        {
            saw_paused = true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    expect_cases(&sim, N as u64, 10).await;
    assert!(saw_paused, "partitions were paused over high water");
    // High water plus what one batch may add on top of it.
    assert!(max_depth <= 300 + 50, "outbox depth reached {max_depth}");
    assert_exactly_once(&sim, N);
    let text = bridge.metrics().await;
    assert_eq!(
        metric_sum(&text, "duvo_bridge_kafka_paused", &["k-burst"]),
        0.0,
        "resumed at the end"
    );
    bridge.stop().await;
}

fn report(id: u64, origin: Option<Origin>, status: ReportStatus) -> Report {
    Report {
        id,
        source: "k-rep".into(),
        event_id: EventId(7),
        origin,
        queue_id: uuid::Uuid::new_v4(),
        case_id: Some(uuid::Uuid::new_v4()),
        status,
        reason: Some("agent gave up".into()),
        case_updated_at: Some("2026-01-01T00:00:00Z".into()),
        title: "Order ORD-1".into(),
        event: Some(r#"{"order_id":"ORD-1"}"#.into()),
        created_at_ms: 1,
        attempts: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporter_produces_keyed_records_with_headers_and_fails_while_the_broker_is_down() {
    let m = mock(1, &[("orders", 1), ("orders.failures", 1)]);
    let bs = m.bootstrap_servers();
    let mut cfg = kafka_source("k-rep", &bs, "g-rep", &["orders"], uuid::Uuid::new_v4());
    cfg.failure_topic = Some("orders.failures".into());
    cfg.librdkafka.insert("message.timeout.ms", "3000");
    let rep = KafkaReporter::new(cfg.report_target().expect("reporter")).unwrap();
    let with_origin = report(
        41,
        Some(Origin::Kafka {
            topic: "orders".into(),
            partition: 0,
            offset: 1234,
            key_b64: Some(duvo_bridge::encoding::base64(b"ORD-1\xff")),
        }),
        ReportStatus::Failed,
    );
    rep.send(&with_origin).await.expect("acknowledged");
    let rejected = Report {
        case_id: None,
        ..report(42, None, ReportStatus::Rejected)
    };
    rep.send(&rejected).await.expect("acknowledged");

    let got = read_topic(&bs, "orders.failures", 2, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2);
    let r = &got[0];
    assert_eq!(r.key(), Some(&b"ORD-1\xff"[..]));
    assert_eq!(header(r, "duvo-source-topic"), Some("orders"));
    assert_eq!(header(r, "duvo-source-partition"), Some("0"));
    assert_eq!(header(r, "duvo-source-offset"), Some("1234"));
    assert_eq!(
        header(r, "duvo-case-id"),
        Some(with_origin.case_id.unwrap().to_string().as_str())
    );
    assert_eq!(header(r, "duvo-status"), Some("failed"));
    assert_eq!(header(r, "duvo-report-id"), Some("41"));
    assert_eq!(header(r, "duvo-event-id"), Some("7"));
    assert_eq!(header(r, "content-type"), Some("application/json"));
    assert_eq!(r.payload().unwrap(), &with_origin.body()[..]);
    let body: serde_json::Value = serde_json::from_slice(r.payload().unwrap()).unwrap();
    assert_eq!(body["status"], "failed");
    assert_eq!(body["reason"], "agent gave up");
    assert_eq!(body["event"]["order_id"], "ORD-1");
    let r = &got[1];
    assert_eq!(r.key(), None);
    assert_eq!(header(r, "duvo-status"), Some("rejected"));
    assert_eq!(header(r, "duvo-case-id"), None);
    assert_eq!(header(r, "duvo-source-topic"), None);

    // No acknowledgement, no Ok: the dispatcher keeps the report.
    m.broker_down(-1).unwrap();
    let err = rep
        .send(&report(43, None, ReportStatus::Failed))
        .await
        .unwrap_err();
    assert!(matches!(err, ReportError::Unreachable(_)), "{err:?}");
    m.broker_up(-1).unwrap();
    let ok = wait_until(Duration::from_secs(30), || async {
        rep.send(&report(44, None, ReportStatus::Failed))
            .await
            .is_ok()
    })
    .await;
    assert!(ok, "sends again once the broker is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_binary_loses_nothing_and_duplicates_nothing() {
    use rand::Rng;
    const N: usize = 12_000;
    let mut rng = seeded_rng();

    let m = mock(1, &[("killed", 4)]);
    let bs = m.bootstrap_servers();
    let mut sc = sim_config();
    sc.rate_limit = 1200;
    let sim = start_sim(sc).await;
    let dir = tempfile::tempdir().unwrap();
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
[[sources]]
type = "kafka"
name = "orders"
brokers = "{bs}"
group_id = "g-kill"
group_instance_id = "replica-1"
topics = ["killed"]
queue_id = "{queue}"
title = "Order {{/order_id}}"
max_batch = 200
[sources.librdkafka]
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500
"auto.commit.interval.ms" = 1000
"#,
                queue = sim.queues()[0],
            ),
        ),
    )
    .unwrap();
    let log = dir.path().join("bridge.log");
    let key = sim.api_keys()[0].clone();
    let p = producer(&bs);
    let feeder = {
        let p = p.clone();
        tokio::spawn(async move {
            for c in 0..60 {
                produce(&p, "killed", &order_recs(c * N / 60..(c + 1) * N / 60)).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut bridge = spawn_bridge(&config, &key, &log);
    assert!(wait_ready(admin).await, "bridge ready");
    for kill in 1..=3 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        bridge.kill().unwrap(); // SIGKILL
        bridge.wait().unwrap();
        eprintln!(
            "killed bridge #{kill}; cases so far {}",
            sim.stats().cases_created
        );
        bridge = spawn_bridge(&config, &key, &log);
        assert!(
            wait_ready(admin).await,
            "bridge ready after restart #{kill}"
        );
    }
    feeder.await.unwrap();
    let ok = wait_until(Duration::from_secs(120), || async {
        sim.stats().cases_created as usize >= N
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = bridge.kill();
    let _ = bridge.wait();
    if !ok {
        eprintln!("{logs}");
    }
    assert!(ok, "all records delivered: {:?}", sim.stats());
    assert_exactly_once(&sim, N);
    assert!(!logs.contains(&key), "the API key never appears in logs");
    let restarts = logs.matches("Kafka consumer subscribed").count();
    assert_eq!(restarts, 4, "one consumer per process start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_rejected_records_are_reported_to_the_failure_topic_keyed_by_the_record() {
    let m = mock(1, &[("orders", 2), ("orders.failures", 1)]);
    let bs = m.bootstrap_servers();
    let recs: Vec<Rec> = (0..200)
        .map(|i| {
            let mut o = json!({ "order_id": format!("ORD-{i:06}") });
            if i % 10 == 3 {
                o["simulate"] = json!("fail");
            }
            if i == 77 {
                o["simulate"] = json!("reject");
            }
            Rec::json(&format!("key-{i}"), &o)
        })
        .collect();
    produce(&producer(&bs), "orders", &recs).await;
    let sim = start_sim(duvo_bridge::sim::SimConfig {
        process_ms: 200,
        ..sim_config()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut src = kafka_source("k-fail", &bs, "g-fail", &["orders"], sim.queues()[0]);
    src.failure_topic = Some("orders.failures".into());
    let mut cfg = kafka_bridge_config(&sim, dir.path(), vec![src]);
    cfg.tracking.poll_interval_ms = 300;
    cfg.tracking.report_retry_initial_ms = 50;
    cfg.tracking.report_retry_max_ms = 500;
    let bridge = Bridge::start(cfg).await;
    expect_cases(&sim, 199, 60).await;
    let reports = read_topic(&bs, "orders.failures", 21, Duration::from_secs(90)).await;
    assert_eq!(reports.len(), 21, "20 failed cases and one rejected event");
    let mut failed_keys = Vec::new();
    for r in &reports {
        let key = std::str::from_utf8(r.key().expect("keyed"))
            .unwrap()
            .to_string();
        let i: usize = key.trim_start_matches("key-").parse().unwrap();
        let body: serde_json::Value = serde_json::from_slice(r.payload().unwrap()).unwrap();
        assert_eq!(body["event"]["order_id"], format!("ORD-{i:06}"));
        assert_eq!(header(r, "duvo-source-topic"), Some("orders"));
        let partition: i32 = header(r, "duvo-source-partition").unwrap().parse().unwrap();
        let offset: i64 = header(r, "duvo-source-offset").unwrap().parse().unwrap();
        assert!((0..2).contains(&partition) && (0..200).contains(&offset));
        assert_eq!(header(r, "duvo-bridge-source"), Some("k-fail"));
        if i == 77 {
            assert_eq!(header(r, "duvo-status"), Some("rejected"));
            assert_eq!(header(r, "duvo-case-id"), None);
        } else {
            assert_eq!(header(r, "duvo-status"), Some("failed"));
            assert_eq!(header(r, "duvo-case-id"), body["case_id"].as_str());
            failed_keys.push(i);
        }
    }
    failed_keys.sort();
    assert_eq!(
        failed_keys,
        (0..200).filter(|i| i % 10 == 3).collect::<Vec<_>>()
    );
    // Each report was produced once (acknowledged, then removed).
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A reader joins its group in about 3 s on the mock cluster.
    let again = read_topic(&bs, "orders.failures", 22, Duration::from_secs(15)).await;
    assert_eq!(again.len(), 21);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_routed_by_header_and_content_and_the_unrouted_dead_lettered() {
    let m = mock(1, &[("orders-mixed", 1), ("orders-mixed.dlq", 1)]);
    let bs = m.bootstrap_servers();
    let p = producer(&bs);
    let mut recs = Vec::new();
    for i in 0..12usize {
        let id = format!("ORD-{i:06}");
        recs.push(match i % 3 {
            0 => Rec {
                headers: vec![("Kind".into(), "return".into())],
                ..Rec::json(&id, &json!({"order_id": id, "channel": "web"}))
            },
            1 => Rec::json(&id, &json!({"order_id": id, "channel": "b2b"})),
            _ => Rec::json(&id, &json!({"order_id": id, "channel": "phone"})),
        });
    }
    produce(&p, "orders-mixed", &recs).await;

    let mut sc = sim_config();
    sc.queues = (0..2).map(|_| uuid::Uuid::new_v4()).collect();
    let sim = start_sim(sc).await;
    let q = sim.queues();
    let dir = tempfile::tempdir().unwrap();
    let mut src = kafka_source("k-routes", &bs, "g-routes", &["orders-mixed"], q[0]);
    src.queue_id = String::new(); // no default route: unrouted records are dead letters
    src.dead_letter_topic = Some("orders-mixed.dlq".into());
    src.routes = vec![
        duvo_bridge::routing::RouteConfig {
            name: Some("returns".into()),
            header: Some("kind".into()),
            equals: Some("return".into()),
            queue_id: Some(q[0].to_string()),
            title: Some("Return {/order_id}".into()),
            ..Default::default()
        },
        duvo_bridge::routing::RouteConfig {
            topic: Some("orders-mixed".into()),
            pointer: Some("/channel".into()),
            equals: Some("b2b".into()),
            queue_id: Some(q[1].to_string()),
            ..Default::default()
        },
    ];
    let bridge = Bridge::start(kafka_bridge_config(&sim, dir.path(), vec![src])).await;
    expect_cases(&sim, 8, 60).await;
    let dead = read_topic(&bs, "orders-mixed.dlq", 4, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cases = sim.cases();
    assert_eq!(cases.len(), 8, "exactly once");
    for c in &cases {
        let data: serde_json::Value = serde_json::from_str(c.data.as_deref().unwrap()).unwrap();
        match data["channel"].as_str().unwrap() {
            "web" => {
                assert_eq!(c.queue_id, q[0]);
                assert!(c.title.starts_with("Return "), "{}", c.title);
            }
            "b2b" => assert_eq!(c.queue_id, q[1]),
            other => panic!("a {other} record became a case"),
        }
    }
    assert_eq!(dead.len(), 4, "{dead:?}");
    assert!(
        dead.iter()
            .all(|m| header(m, "duvo-bridge-error") == Some("no_route"))
    );
    bridge.stop().await;
}
