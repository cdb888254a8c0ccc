//! Kafka intake throughput against a consume-only loop, on the same broker
//! in the same run.
//!
//! The broker is librdkafka's mock cluster inside this process (or
//! `KAFKA_BENCH_BROKERS=host:port`, e.g. the Apache Kafka of
//! `scripts/services.sh`, whose `env` prints it). One topic
//! with 6 partitions is filled with N JSON records before any clock starts;
//! each consumer reads all of it from the beginning in its own group.
//!
//! (a) baseline: a `StreamConsumer` that only counts records (librdkafka's
//!     defaults: offsets stored and committed automatically);
//! (a') the same consumer with the bridge's offset handling: drain what is
//!     buffered (up to 1000), store one offset per partition per batch;
//! (b) the bridge's `KafkaSource`: the same drain, plus JSON parsing and
//!     mapping of every record, one `Outbox::append` (fsync'd group commit)
//!     per batch, then the offset store. The clock stops when the last
//!     record is durably appended.
//! (c) the ceiling for (b) without Kafka: the same events, mapped the same
//!     way beforehand, appended to a fresh outbox in batches of 1000.
//!
//! Run with `cargo bench --bench kafka` (`KAFKA_BENCH_N=200000`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use duvo_bridge::admin::Health;
use duvo_bridge::outbox::{Outbox, OutboxConfig};
use duvo_bridge::source::KafkaSourceConfig;
use duvo_bridge::source::kafka::KafkaSource;
use duvo_bridge::source::{Source, SourceContext};
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "bench";
const PARTITIONS: i32 = 6;
const MAX_BATCH: usize = 1000;

fn fill(brokers: &str, n: usize) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    for i in 0..n {
        let key = format!("ORD-{i:07}");
        let body = format!("{{\"order_id\":\"{key}\",\"channel\":\"web\",\"amount\":{i}}}");
        loop {
            match p.send(BaseRecord::to(TOPIC).key(&key).payload(&body)) {
                Ok(()) => break,
                Err(_) => {
                    p.poll(Duration::from_millis(10));
                }
            }
        }
    }
    p.flush(Duration::from_secs(120)).expect("flushed");
}

fn consumer(brokers: &str, group: &str, bridge_like: bool) -> StreamConsumer {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest");
    if bridge_like {
        c.set("enable.auto.offset.store", "false")
            .set("auto.commit.interval.ms", "1000");
    }
    c.create().expect("consumer")
}

/// (a) and (a'): read n records; the clock starts at the first record, so
/// the group join is not measured.
async fn baseline(brokers: &str, n: usize, bridge_like: bool) -> Duration {
    let group = format!("bench-base-{}", uuid::Uuid::new_v4());
    let c = consumer(brokers, &group, bridge_like);
    c.subscribe(&[TOPIC]).expect("subscribe");
    let mut stream = c.stream();
    let first = stream.next().await.expect("open").expect("record");
    let start = Instant::now();
    let mut seen = 1usize;
    drop(first);
    while seen < n {
        let m = stream.next().await.expect("open").expect("record");
        if !bridge_like {
            seen += 1;
            continue;
        }
        let mut next: HashMap<(String, i32), i64> = HashMap::new();
        next.insert((m.topic().to_string(), m.partition()), m.offset() + 1);
        seen += 1;
        let mut batch = 1;
        while batch < MAX_BATCH {
            match stream.next().now_or_never() {
                Some(Some(Ok(m))) => {
                    next.insert((m.topic().to_string(), m.partition()), m.offset() + 1);
                    seen += 1;
                    batch += 1;
                }
                _ => break,
            }
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in next {
            tpl.add_partition_offset(&t, p, Offset::Offset(o)).unwrap();
        }
        c.store_offsets(&tpl).expect("store");
    }
    start.elapsed()
}

/// (b): the source appends n records to a fresh outbox; the clock starts
/// at the first append.
async fn bridge(brokers: &str, n: usize) -> Duration {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ocfg = OutboxConfig::new(dir.path().join("outbox"));
    ocfg.high_water_events = (n as u64) * 2;
    ocfg.low_water_events = n as u64;
    let outbox = Outbox::open(ocfg).await.expect("outbox");
    let group = format!("bench-bridge-{}", uuid::Uuid::new_v4());
    let mut cfg = KafkaSourceConfig::new("bench", brokers, &group, &[TOPIC], uuid::Uuid::new_v4());
    cfg.title = "Order {/order_id}".into();
    cfg.max_batch = MAX_BATCH;
    let src = KafkaSource::new(cfg).expect("source");
    let stop = CancellationToken::new();
    let ctx = SourceContext {
        outbox: outbox.clone(),
        health: Health::default(),
        stop: stop.clone(),
        max_case_bytes: 1_000_000,
    };
    let task = tokio::spawn(Box::new(src).run(ctx));
    while outbox.stats().appended == 0 {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let start = Instant::now();
    let first = outbox.stats().appended as usize;
    while (outbox.stats().appended as usize) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = start.elapsed();
    stop.cancel();
    let _ = task.await;
    // The first batch is not timed; scale to n so rates compare.
    took.mul_f64(n as f64 / (n - first).max(1) as f64)
}

/// The median of three runs, each on a worker thread like the source's
/// task (the baselines take a fraction of a second; one run is noisy).
async fn median3<F, Fut>(f: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Duration> + Send + 'static,
{
    let mut v = Vec::new();
    for _ in 0..3 {
        v.push(tokio::spawn(f()).await.expect("baseline"));
    }
    v.sort();
    v[1]
}

/// (c): `Outbox::append` alone, batches of `MAX_BATCH` pre-mapped events.
async fn outbox_only(n: usize) -> Duration {
    use duvo_bridge::mapping::{Mapper, MappingConfig};
    use duvo_bridge::outbox::NewEvent;
    use duvo_bridge::raw_json::RawEvent;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ocfg = OutboxConfig::new(dir.path().join("outbox"));
    ocfg.high_water_events = (n as u64) * 2;
    ocfg.low_water_events = n as u64;
    let outbox = Outbox::open(ocfg).await.expect("outbox");
    let mapper = Mapper::new(&MappingConfig {
        title: "Order {/order_id}".into(),
        ..MappingConfig::default()
    })
    .expect("mapping");
    let queue = uuid::Uuid::new_v4();
    let events: Vec<NewEvent> = (0..n)
        .map(|i| {
            let v = serde_json::json!({"order_id": format!("ORD-{i:07}"), "channel": "web", "amount": i})
                .to_string();
            NewEvent {
                source: "bench".into(),
                identity: Some(format!("kafka:bench:{TOPIC}:{}:{i}", i % 6)),
                queue_id: queue,
                case: mapper.map(&RawEvent::parse(&v).expect("an object")),
                received_at_ms: 0,
                origin: None,
            }
        })
        .collect();
    let mut chunks: Vec<Vec<NewEvent>> = Vec::new();
    let mut it = events.into_iter().peekable();
    while it.peek().is_some() {
        chunks.push(it.by_ref().take(MAX_BATCH).collect());
    }
    let start = Instant::now();
    for c in chunks {
        outbox.append(c).await.expect("append");
    }
    start.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("KAFKA_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let mock;
    let brokers = match std::env::var("KAFKA_BENCH_BROKERS") {
        Ok(b) => b,
        Err(_) => {
            mock = MockCluster::new(1).expect("mock cluster");
            mock.create_topic(TOPIC, PARTITIONS, 1).expect("topic");
            mock.bootstrap_servers()
        }
    };
    let fill_start = Instant::now();
    let b = brokers.clone();
    tokio::task::spawn_blocking(move || fill(&b, n))
        .await
        .expect("fill");
    eprintln!(
        "filled {n} records in {:.1}s",
        fill_start.elapsed().as_secs_f64()
    );

    // The bridge runs between the two baselines so warm-up favours neither
    // side; the baselines are the median of three runs each.
    let b = brokers.clone();
    let base = median3(move || {
        let b = b.clone();
        async move { baseline(&b, n, false).await }
    })
    .await;
    let ours = bridge(&brokers, n).await;
    let b = brokers.clone();
    let like = median3(move || {
        let b = b.clone();
        async move { baseline(&b, n, true).await }
    })
    .await;
    let ceiling = tokio::spawn(outbox_only(n)).await.expect("outbox only");
    let rate = |d: Duration| n as f64 / d.as_secs_f64();

    println!(
        "\nKafka intake, {n} JSON records (~70 bytes), {PARTITIONS} partitions, broker: {}\n",
        if std::env::var("KAFKA_BENCH_BROKERS").is_ok() {
            brokers.as_str()
        } else {
            "librdkafka mock cluster"
        }
    );
    println!("| consumer | seconds | records/s | vs baseline |");
    println!("|---|---:|---:|---:|");
    println!(
        "| StreamConsumer, count only (auto offset store; median of 3) | {:.2} | {:.0} | 1.00 |",
        base.as_secs_f64(),
        rate(base)
    );
    println!(
        "| StreamConsumer, drained batches + offset store per batch (median of 3) | {:.2} | {:.0} | {:.2} |",
        like.as_secs_f64(),
        rate(like),
        rate(like) / rate(base)
    );
    println!(
        "| KafkaSource -> outbox (map, fsync) + offset store per batch | {:.2} | {:.0} | {:.2} |",
        ours.as_secs_f64(),
        rate(ours),
        rate(ours) / rate(base)
    );
    println!(
        "| (no Kafka) Outbox::append of pre-mapped batches of {MAX_BATCH} | {:.2} | {:.0} | {:.2} |",
        ceiling.as_secs_f64(),
        rate(ceiling),
        rate(ceiling) / rate(base)
    );
    println!(
        "\nKafkaSource reaches {:.2} of the outbox-only ceiling.",
        rate(ours) / rate(ceiling)
    );
}
