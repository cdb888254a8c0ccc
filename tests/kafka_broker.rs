//! The Kafka source and reporter against Apache Kafka (KRaft), the broker
//! users run. `scripts/services.sh` provisions it from Maven Central jars:
//! a single broker on 127.0.0.1:19092 and a three-node cluster on
//! 127.0.0.1:19192-19194 for the broker-loss test. Each test calls it
//! (idempotent: a second call finds the broker up), so `cargo nextest run`
//! alone works too; the first start takes about 20 s.

mod common;
mod kafka_util;

use std::time::Duration;

use common::*;
use kafka_util::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};
use serde_json::json;

/// Orders `0..n` keyed `key-{i}`, every 100th (`i % 100 == 7`) one whose
/// case fails in the simulator.
fn failing_every_100th(n: usize) -> Vec<Rec> {
    (0..n)
        .map(|i| {
            let mut o = json!({ "order_id": format!("ORD-{i:06}") });
            if i % 100 == 7 {
                o["simulate"] = json!("fail");
            }
            Rec::json(&format!("key-{i}"), &o)
        })
        .collect()
}

fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bridges_deliver_every_record_once_and_report_failures_to_the_failure_topic() {
    const N: usize = 3000;
    let bs = apache_kafka().await;
    let suffix = suffix();
    let (topic, failures) = (
        format!("orders-{suffix}"),
        format!("orders-{suffix}.failures"),
    );
    create_topics(&bs, &[(&topic, 4), (&failures, 1)], 1).await;
    let recs = failing_every_100th(N);
    let p = producer(&bs);
    produce(&p, &topic, &recs[..N / 2]).await;

    let sim = start_sim(duvo_bridge::sim::SimConfig {
        process_ms: 200,
        ..sim_config()
    })
    .await;
    let q = sim.queues()[0];
    let group = format!("g-{suffix}");
    let src = |name: &str| {
        let mut k = kafka_source(name, &bs, &group, &[&topic], q);
        k.failure_topic = Some(failures.clone());
        k
    };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cfgs = Vec::new();
    for (d, name) in [(&d1, "t-a"), (&d2, "t-b")] {
        let mut cfg = kafka_bridge_config(&sim, d.path(), vec![src(name)]);
        cfg.tracking.poll_interval_ms = 300;
        cfg.tracking.report_retry_initial_ms = 50;
        cfg.tracking.report_retry_max_ms = 1000;
        cfgs.push(cfg);
    }
    let mut cfgs = cfgs.into_iter();
    let a = Bridge::start(cfgs.next().unwrap()).await;
    let b = Bridge::start(cfgs.next().unwrap()).await;
    produce(&p, &topic, &recs[N / 2..]).await;
    expect_cases(&sim, N as u64, 120).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per = cases_per_order(&sim);
    assert_eq!(per.len(), N, "every record became a case");
    assert!(per.values().all(|c| *c == 1), "no duplicate case");
    // One metrics registry per process: both bridges' counters are in it.
    let t = a.metrics().await;
    let (ca, cb) = (
        metric_sum(&t, "duvo_bridge_kafka_consumed_total", &["t-a"]),
        metric_sum(&t, "duvo_bridge_kafka_consumed_total", &["t-b"]),
    );
    eprintln!("consumed: a={ca} b={cb}");

    let want = (0..N).filter(|i| i % 100 == 7).count();
    let reports = read_topic(&bs, &failures, want, Duration::from_secs(120)).await;
    assert_eq!(reports.len(), want, "one report per failed case");
    for r in &reports {
        let key = std::str::from_utf8(r.key().expect("keyed by the record key")).unwrap();
        let i: usize = key.trim_start_matches("key-").parse().unwrap();
        assert_eq!(i % 100, 7, "{key}");
        assert_eq!(header(r, "duvo-status"), Some("failed"));
        assert_eq!(header(r, "duvo-source-topic"), Some(topic.as_str()));
        let body: serde_json::Value = serde_json::from_slice(r.payload().unwrap()).unwrap();
        assert_eq!(body["event"]["order_id"], format!("ORD-{i:06}"));
    }
    a.stop().await;
    b.stop().await;
    assert!(ca + cb >= N as f64, "a={ca} b={cb}");
}

/// The config of a bridge binary whose only source reads `topic`.
fn kafka_binary_toml(
    sim: &duvo_bridge::sim::SimHandle,
    dir: &std::path::Path,
    admin: u16,
    bs: &str,
    group: &str,
    topic: &str,
    max_batch: usize,
) -> String {
    bridge_toml(
        sim,
        dir,
        admin,
        6000,
        &format!(
            r#"
[[sources]]
type = "kafka"
name = "orders"
brokers = "{bs}"
group_id = "{group}"
group_instance_id = "replica-1"
topics = ["{topic}"]
queue_id = "{queue}"
title = "Order {{/order_id}}"
max_batch = {max_batch}
[sources.librdkafka]
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500
"auto.commit.interval.ms" = 200
"#,
            queue = sim.queues()[0],
        ),
    )
}

/// Kafka answers a fetch at an offset inside a record batch with the whole
/// batch (the consumer drops the records before the offset). A source that
/// commits inside a batch, because it cut a drain at `max_batch`, and is
/// killed must therefore find the rest of that batch after the restart.
/// (tansu, a Kafka-protocol broker the tests once used, skipped it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_inside_a_producer_batch_then_sigkill_loses_nothing() {
    const N: usize = 1000;
    const MAX_BATCH: usize = 10;
    let bs = apache_kafka().await;
    let suffix = suffix();
    let (topic, group) = (format!("midbatch-{suffix}"), format!("g-mid-{suffix}"));
    create_topics(&bs, &[(&topic, 1)], 1).await;
    // Every record in as few producer batches as possible: queued at once,
    // lingering long enough to be sent together.
    let p: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "300")
        .set("batch.size", "1000000")
        .create()
        .unwrap();
    produce(&p, &topic, &order_recs(0..N)).await;
    let batches: Vec<(i64, i64)> = services(&["kafka-batches", &topic, "0"])
        .await
        .lines()
        .map(|l| {
            let (b, e) = l.split_once(' ').unwrap();
            (b.parse().unwrap(), e.parse().unwrap())
        })
        .collect();
    eprintln!("record batches on the broker: {batches:?}");
    let largest = batches.iter().map(|(b, e)| e - b + 1).max().unwrap();
    assert!(
        largest > 2 * MAX_BATCH as i64,
        "producer batches larger than max_batch: {batches:?}"
    );

    // First run: the API is down and the outbox's high-water mark is 5
    // events, so the source appends one drain of MAX_BATCH records, stores
    // its offset after the fsync, and pauses: the commit lands inside the
    // first producer batch.
    let sim = start_sim(sim_config()).await;
    sim.set_faults(duvo_bridge::sim::FaultsPatch {
        outage: Some(true),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let config = dir.path().join("bridge.toml");
    std::fs::write(
        &config,
        kafka_binary_toml(&sim, dir.path(), admin, &bs, &group, &topic, MAX_BATCH),
    )
    .unwrap();
    let log = dir.path().join("bridge.log");
    let key = sim.api_keys()[0].clone();
    let mut bridge = spawn_bridge_with(
        &config,
        &key,
        &log,
        &[
            ("DUVO_BRIDGE__OUTBOX__HIGH_WATER_EVENTS", "5"),
            ("DUVO_BRIDGE__OUTBOX__LOW_WATER_EVENTS", "2"),
        ],
    );
    let committed_now = || {
        let (bs, group, topic) = (bs.clone(), group.clone(), topic.clone());
        async move {
            tokio::task::spawn_blocking(move || committed(&bs, &group, &topic, 1)[0])
                .await
                .unwrap()
        }
    };
    let mut committed_first = -1;
    for _ in 0..240 {
        committed_first = committed_now().await;
        if committed_first > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bridge.kill().unwrap(); // SIGKILL, right after the commit
    bridge.wait().unwrap();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        committed_first > 0,
        "the first run committed an offset\n{log_text}"
    );
    let inside = batches
        .iter()
        .any(|(b, e)| *b < committed_first && committed_first <= *e);
    assert!(
        inside,
        "committed offset {committed_first} lies inside a record batch {batches:?}"
    );
    eprintln!("first run committed {committed_first}, killed");

    // Second run: the API is back, default high water. The restarted
    // consumer fetches from the commit; every record is exactly one case.
    sim.set_faults(duvo_bridge::sim::FaultsPatch {
        outage: Some(false),
        ..Default::default()
    });
    let mut bridge = spawn_bridge(&config, &key, &log);
    let done = wait_until(Duration::from_secs(120), || async {
        sim.stats().cases_created as usize >= N
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let final_commit = wait_until(Duration::from_secs(30), || async {
        committed_now().await == N as i64
    })
    .await;
    send_signal(&bridge, "TERM");
    bridge.wait().unwrap();
    if !done {
        eprintln!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    assert_exactly_once(&sim, N);
    assert!(final_commit, "the group's offset reaches the end ({N})");
}

/// The leader of `partition` of `topic` (a node id, 1..=3 on the cluster).
fn leader(bs: &str, topic: &str, partition: i32) -> i32 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bs)
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    md.topics()[0].partitions()[partition as usize].leader()
}

/// One broker of three is SIGKILLed while the bridge consumes and reports,
/// and comes back later: partition leaders and the group coordinator move,
/// producers with `acks=all` keep going on two in-sync replicas, and every
/// record is still exactly one case, every failure reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_of_three_killed_and_restarted_loses_nothing() {
    const N: usize = 3000;
    let bs = apache_kafka_cluster().await;
    let suffix = suffix();
    let (topic, failures) = (
        format!("orders3-{suffix}"),
        format!("orders3-{suffix}.failures"),
    );
    create_topics(&bs, &[(&topic, 3), (&failures, 1)], 3).await;
    let recs = failing_every_100th(N);
    let sim = start_sim(duvo_bridge::sim::SimConfig {
        process_ms: 200,
        ..sim_config()
    })
    .await;
    let q = sim.queues()[0];
    let dir = tempfile::tempdir().unwrap();
    let mut k = kafka_source("c3", &bs, &format!("g3-{suffix}"), &[&topic], q);
    k.failure_topic = Some(failures.clone());
    let mut cfg = kafka_bridge_config(&sim, dir.path(), vec![k]);
    cfg.tracking.poll_interval_ms = 300;
    cfg.tracking.report_retry_initial_ms = 50;
    cfg.tracking.report_retry_max_ms = 1000;
    let bridge = Bridge::start(cfg).await;
    let p = producer(&bs);
    produce(&p, &topic, &recs[..N / 3]).await;
    expect_cases(&sim, (N / 6) as u64, 60).await;

    let victim = {
        let (bs, topic) = (bs.clone(), topic.clone());
        tokio::task::spawn_blocking(move || leader(&bs, &topic, 0))
            .await
            .unwrap()
    };
    assert!((1..=3).contains(&victim), "leader {victim}");
    let victim = victim.to_string();
    services(&["kafka-cluster", "kill", &victim]).await;
    eprintln!(
        "SIGKILLed broker {victim} ({} cases)",
        sim.stats().cases_created
    );
    produce(&p, &topic, &recs[N / 3..2 * N / 3]).await;
    expect_cases(&sim, (N / 2) as u64, 120).await;
    services(&["kafka-cluster", "start", &victim]).await;
    eprintln!("broker {victim} back ({} cases)", sim.stats().cases_created);
    produce(&p, &topic, &recs[2 * N / 3..]).await;
    expect_cases(&sim, N as u64, 180).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_exactly_once(&sim, N);

    let want = (0..N).filter(|i| i % 100 == 7).count();
    let reports = read_topic(&bs, &failures, want, Duration::from_secs(120)).await;
    let keys: std::collections::BTreeSet<String> = reports
        .iter()
        .map(|r| String::from_utf8(r.key().unwrap().to_vec()).unwrap())
        .collect();
    assert!(
        keys.iter().all(|k| k
            .strip_prefix("key-")
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i % 100 == 7)),
        "only failed cases reported: {keys:?}"
    );
    assert_eq!(keys.len(), want, "every failed case reported");
    bridge.stop().await;
}

/// Orders `range`, each pinned to `partition`.
fn orders_on(partition: i32, range: std::ops::Range<usize>) -> Vec<Rec> {
    range
        .map(|i| Rec {
            partition: Some(partition),
            ..Rec::json(
                &format!("key-{i}"),
                &json!({ "order_id": format!("ORD-{i:06}") }),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_deleted_before_they_were_read_stall_their_partition_which_is_never_committed_past()
{
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let bs = apache_kafka().await;
    let suffix = suffix();
    let topic = format!("orders-deleted-{suffix}");
    create_topics(&bs, &[(&topic, 2)], 1).await;
    let p = producer(&bs);
    produce(&p, &topic, &orders_on(0, 0..50)).await;
    produce(&p, &topic, &orders_on(1, 50..100)).await;
    let sim = start_sim(sim_config()).await;
    let q = sim.queues()[0];
    let group = format!("g-{suffix}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = || {
        kafka_bridge_config(
            &sim,
            dir.path(),
            vec![kafka_source("del", &bs, &group, &[&topic], q)],
        )
    };
    let a = Bridge::start(cfg()).await;
    expect_cases(&sim, 100, 60).await;
    a.stop().await;
    assert_eq!(committed(&bs, &group, &topic, 2), vec![50, 50]);

    // While no bridge runs, partition 0 gets 50 more records (offsets
    // 50..100) and loses the first 30 of them to DeleteRecords, as
    // retention would take them from a lagging consumer.
    produce(&p, &topic, &orders_on(0, 100..150)).await;
    produce(&p, &topic, &orders_on(1, 150..200)).await;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Offset(80))
        .unwrap();
    admin
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .expect("records deleted");

    let b = Bridge::start(cfg()).await;
    // Partition 1 keeps flowing; partition 0's surviving records (orders
    // 130..150) are read and kept, but its offset never moves past 50.
    expect_cases(&sim, 170, 60).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            committed(&bs, &group, &topic, 2)[1] == 100
        })
        .await,
        "partition 1 committed to its end: {:?}",
        committed(&bs, &group, &topic, 2)
    );
    let per = cases_per_order(&sim);
    for i in (0..100).chain(130..200) {
        assert_eq!(per.get(&format!("ORD-{i:06}")), Some(&1), "order {i}");
    }
    for i in 100..130 {
        assert!(
            !per.contains_key(&format!("ORD-{i:06}")),
            "deleted order {i}"
        );
    }
    let stalled_ready = reqwest::get(format!("http://{}/readyz", b.running.admin_addr))
        .await
        .unwrap();
    assert_eq!(stalled_ready.status(), 503);
    let why = stalled_ready.text().await.unwrap();
    assert!(
        why.contains(&format!("{topic}[0]")) && why.contains("stalled at offset 50"),
        "{why}"
    );
    let m = b.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "duvo_bridge_kafka_partition_stalled",
            &[&topic, "partition=\"0\""]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "duvo_bridge_kafka_partition_stalled",
            &[&topic, "partition=\"1\""]
        ),
        0.0
    );
    // New records on the stalled partition wait; its offset stays put.
    produce(&p, &topic, &orders_on(0, 200..210)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(committed(&bs, &group, &topic, 2), vec![50, 100]);
    assert!(!cases_per_order(&sim).contains_key("ORD-000205"));
    b.stop().await;
    assert_eq!(committed(&bs, &group, &topic, 2), vec![50, 100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_topic_with_aborts_makes_every_committed_record_one_case_and_no_aborted_one()
 {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let bs = apache_kafka().await;
    let suffix = suffix();
    let topic = format!("orders-txn-{suffix}");
    create_topics(&bs, &[(&topic, 2)], 1).await;
    let sim = start_sim(sim_config()).await;
    let q = sim.queues()[0];
    let group = format!("g-{suffix}");
    let dir = tempfile::tempdir().unwrap();
    let mut src = kafka_source("txn", &bs, &group, &[&topic], q);
    src.max_batch = 7;
    let bridge = Bridge::start(kafka_bridge_config(&sim, dir.path(), vec![src])).await;

    // 40 transactions of 10 orders over both partitions; every third is
    // aborted. Committed orders are numbered 0.., aborted ones 10_000.. .
    let (bs2, topic2) = (bs.clone(), topic.clone());
    let committed_n = tokio::task::spawn_blocking(move || {
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &bs2)
            .set(
                "transactional.id",
                format!("txn-test-{}", uuid::Uuid::new_v4()),
            )
            .set("linger.ms", "2")
            .create()
            .expect("transactional producer");
        p.init_transactions(Duration::from_secs(30)).unwrap();
        let (mut ok, mut aborted) = (0usize, 10_000usize);
        for t in 0..40 {
            p.begin_transaction().unwrap();
            let abort = t % 3 == 2;
            for j in 0..10 {
                let n = if abort { aborted + j } else { ok + j };
                let value = json!({ "order_id": format!("ORD-{n:06}") }).to_string();
                let key = format!("key-{n}");
                p.send(
                    BaseRecord::to(&topic2)
                        .partition((j % 2) as i32)
                        .key(&key)
                        .payload(&value),
                )
                .unwrap();
            }
            if abort {
                // Flushed first: the aborted records are then in the log
                // (the point of the test), and librdkafka does not race its
                // AddPartitionsToTxn against the EndTxn of an abort, which
                // Kafka refuses with a fatal INVALID_TXN_STATE
                // (confluentinc/librdkafka#4849).
                p.flush(Duration::from_secs(30)).unwrap();
                p.abort_transaction(Duration::from_secs(30)).unwrap();
                aborted += 10;
            } else {
                p.commit_transaction(Duration::from_secs(30)).unwrap();
                ok += 10;
            }
        }
        ok
    })
    .await
    .unwrap();
    assert_eq!(committed_n, 270);
    expect_cases(&sim, committed_n as u64, 60).await;
    // Committed to the end of both partitions: the markers after the last
    // transactions did not stall them.
    let ends: Vec<i64> = (0..2)
        .map(|p| {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bs)
                .create()
                .unwrap();
            c.fetch_watermarks(&topic, p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .collect();
    // 400 records and one marker per transaction on each partition: the
    // aborted records really are in the log the bridge read.
    assert_eq!(ends.iter().sum::<i64>(), 400 + 40 * 2, "log ends {ends:?}");
    assert!(
        wait_until(Duration::from_secs(30), || async {
            let c = committed(&bs, &group, &topic, 2);
            // The last record of a partition is a commit marker; the
            // consumer's position may stop right before it.
            c.iter().zip(&ends).all(|(c, e)| *c >= e - 1)
        })
        .await,
        "committed {:?}, log ends {ends:?}",
        committed(&bs, &group, &topic, 2)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_exactly_once(&sim, committed_n);
    assert!(bridge.ready().await, "no partition stalled on markers");
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_deleted_and_created_again_within_retention_has_its_records_become_cases() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let bs = apache_kafka().await;
    let suffix = suffix();
    let topic = format!("orders-recreated-{suffix}");
    create_topics(&bs, &[(&topic, 1)], 1).await;
    let p = producer(&bs);
    produce(&p, &topic, &orders_on(0, 0..20)).await;
    let sim = start_sim(sim_config()).await;
    let q = sim.queues()[0];
    let group = format!("g-{suffix}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = || {
        kafka_bridge_config(
            &sim,
            dir.path(),
            vec![kafka_source("re", &bs, &group, &[&topic], q)],
        )
    };
    let a = Bridge::start(cfg()).await;
    expect_cases(&sim, 20, 60).await;
    a.stop().await;

    // The topic is deleted and created again; its new records reuse
    // offsets 0..20 while the outbox still remembers the old ones.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .create()
        .unwrap();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.delete_topics(&[&topic], &opts).await.unwrap() {
        r.expect("topic deleted");
    }
    let recreated = wait_until(Duration::from_secs(60), || async {
        let t = NewTopic::new(&topic, 1, TopicReplication::Fixed(1));
        matches!(
            admin.create_topics(&[t], &opts).await.as_deref(),
            Ok([Ok(_)])
        )
    })
    .await;
    assert!(recreated, "topic created again");
    produce(&p, &topic, &orders_on(0, 100..120)).await;

    let b = Bridge::start(cfg()).await;
    expect_cases(&sim, 40, 60).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per = cases_per_order(&sim);
    for i in (0..20).chain(100..120) {
        assert_eq!(per.get(&format!("ORD-{i:06}")), Some(&1), "order {i}");
    }
    assert_eq!(per.len(), 40);
    b.stop().await;
}

/// Every record of partition 0 of `topic`, read by an assigned consumer
/// from the beginning up to the high watermark.
fn read_partition(bs: &str, topic: &str) -> Vec<rdkafka::message::OwnedMessage> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bs)
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let (_, high) = c
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while out
        .last()
        .is_none_or(|m: &rdkafka::message::OwnedMessage| m.offset() < high - 1)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "read {} of {topic}",
            out.len()
        );
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            out.push(m.detach());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_topic_passes_its_holes_and_delivers_what_compaction_kept() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let bs = apache_kafka().await;
    let suffix = suffix();
    let topic = format!("orders-compacted-{suffix}");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .create()
        .unwrap();
    // Segments roll every 100 ms; the cleaner (every 15 s) takes any
    // closed one.
    let t = NewTopic::new(&topic, 1, TopicReplication::Fixed(1))
        .set("cleanup.policy", "compact")
        .set("segment.ms", "100")
        .set("min.cleanable.dirty.ratio", "0.001")
        .set("min.compaction.lag.ms", "0")
        .set("delete.retention.ms", "0");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.create_topics(&[t], &opts).await.unwrap() {
        r.expect("topic created");
    }
    let keyed = |key: usize, order: usize| Rec {
        partition: Some(0),
        ..Rec::json(
            &format!("key-{key}"),
            &json!({ "order_id": format!("ORD-{order:06}") }),
        )
    };
    let order_of = |m: &rdkafka::message::OwnedMessage| {
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        v["order_id"].as_str().unwrap().to_string()
    };
    let p = producer(&bs);
    // Keys 0..50, then new values for keys 10..20 and 30..40: compaction
    // keeps the newer values and the untouched keys, with holes between.
    produce(
        &p,
        &topic,
        &(0..50).map(|i| keyed(i, i)).collect::<Vec<_>>(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let overwritten: Vec<Rec> = (10..20).chain(30..40).map(|i| keyed(i, 1000 + i)).collect();
    produce(&p, &topic, &overwritten).await;
    let mut fillers = 0;
    let survivors = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // An append after 100 ms rolls the segment, so the one before it
        // can be cleaned.
        produce(&p, &topic, &[keyed(100 + fillers, 2000 + fillers)]).await;
        fillers += 1;
        let (bs, topic) = (bs.clone(), topic.clone());
        let seen = tokio::task::spawn_blocking(move || read_partition(&bs, &topic))
            .await
            .unwrap();
        let orders: std::collections::BTreeSet<String> = seen.iter().map(order_of).collect();
        if !orders.contains("ORD-000010") && !orders.contains("ORD-000030") {
            let offsets: Vec<i64> = seen.iter().map(|m| m.offset()).collect();
            assert!(
                offsets.windows(2).any(|w| w[1] > w[0] + 1),
                "compaction left holes: {offsets:?}"
            );
            break orders;
        }
        assert!(fillers < 120, "the cleaner never compacted the topic");
    };
    for kept in [
        "ORD-000000",
        "ORD-000020",
        "ORD-000049",
        "ORD-001010",
        "ORD-001039",
    ] {
        assert!(survivors.contains(kept), "{kept} in {survivors:?}");
    }

    let sim = start_sim(sim_config()).await;
    let q = sim.queues()[0];
    let group = format!("g-{suffix}");
    let dir = tempfile::tempdir().unwrap();
    let bridge = Bridge::start(kafka_bridge_config(
        &sim,
        dir.path(),
        vec![kafka_source("cmp", &bs, &group, &[&topic], q)],
    ))
    .await;
    expect_cases(&sim, survivors.len() as u64, 60).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per = cases_per_order(&sim);
    let cases: std::collections::BTreeSet<String> = per.keys().cloned().collect();
    assert_eq!(
        cases, survivors,
        "every record compaction kept is a case, nothing else"
    );
    assert!(per.values().all(|n| *n == 1), "no duplicate case");
    assert!(
        bridge.ready().await,
        "the holes did not stall the partition"
    );
    bridge.stop().await;
}
