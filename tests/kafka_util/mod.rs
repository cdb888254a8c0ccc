//! Helpers for the Kafka tests: producing and reading records, a Kafka
//! source tuned for quick tests, starting a bridge with only that source,
//! reading metrics.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use duvo_bridge::app::RunningBridge;
use duvo_bridge::config::{Config, SourceConfig};
use duvo_bridge::sim::SimHandle;
use duvo_bridge::source::KafkaSourceConfig;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

/// One record to produce.
#[derive(Clone, Debug, Default)]
pub struct Rec {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
    pub partition: Option<i32>,
}

impl Rec {
    pub fn json(key: &str, v: &serde_json::Value) -> Rec {
        Rec {
            key: Some(key.as_bytes().to_vec()),
            value: Some(v.to_string().into_bytes()),
            ..Rec::default()
        }
    }
}

pub fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .create()
        .expect("producer")
}

/// Produce every record and wait for all acknowledgements.
pub async fn produce(p: &FutureProducer, topic: &str, recs: &[Rec]) {
    for chunk in recs.chunks(2000) {
        let sends = chunk.iter().map(|r| {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &r.headers {
                headers = headers.insert(Header {
                    key: k.as_str(),
                    value: Some(v.as_str()),
                });
            }
            let mut fr = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
            if let Some(k) = &r.key {
                fr = fr.key(k.as_slice());
            }
            if let Some(v) = &r.value {
                fr = fr.payload(v.as_slice());
            }
            if let Some(pt) = r.partition {
                fr = fr.partition(pt);
            }
            p.send(fr, Duration::from_secs(30))
        });
        for r in futures::future::join_all(sends).await {
            r.map_err(|(e, _)| e).expect("produced");
        }
    }
}

/// Orders `range` as JSON records keyed by order id.
pub fn order_recs(range: std::ops::Range<usize>) -> Vec<Rec> {
    range
        .map(|i| {
            let o = serde_json::json!({ "order_id": format!("ORD-{i:06}"), "channel": "kafka", "amount": i });
            Rec::json(&format!("ORD-{i:06}"), &o)
        })
        .collect()
}

/// Read `n` records of `topic` from the beginning (own group), or fewer
/// when `timeout` passes.
pub async fn read_topic(
    bootstrap: &str,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> Vec<OwnedMessage> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    c.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, c.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            Ok(Err(e)) => eprintln!("reader: {e}"),
            Err(_) => break,
        }
    }
    out
}

pub fn header<'a>(m: &'a OwnedMessage, key: &str) -> Option<&'a str> {
    use rdkafka::message::Headers;
    m.headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| std::str::from_utf8(v).unwrap())
}

/// Committed offsets of `group` for partitions `0..partitions` of `topic`.
pub fn committed(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let c: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap_or_default();
    (0..partitions)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => -1,
        })
        .collect()
}

/// A Kafka source with quick group timings for tests.
pub fn kafka_source(
    name: &str,
    bootstrap: &str,
    group: &str,
    topics: &[&str],
    queue: uuid::Uuid,
) -> KafkaSourceConfig {
    let mut k = KafkaSourceConfig::new(name, bootstrap, group, topics, queue);
    k.title = "Order {/order_id}".into();
    k.max_batch = 500;
    for (key, v) in [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
        ("statistics.interval.ms", "500"),
        ("topic.metadata.refresh.interval.ms", "1000"),
        ("auto.commit.interval.ms", "200"),
        ("reconnect.backoff.max.ms", "500"),
    ] {
        k.librdkafka.insert(key, v);
    }
    k
}

/// A bridge config against `sim` whose only source is `sources`.
pub fn kafka_bridge_config(
    sim: &SimHandle,
    outbox: &Path,
    sources: Vec<KafkaSourceConfig>,
) -> Config {
    let mut cfg = crate::common::bridge_config(sim, outbox);
    cfg.sources = sources.into_iter().map(SourceConfig::Kafka).collect();
    cfg
}

pub struct Bridge {
    pub stop: CancellationToken,
    pub running: RunningBridge,
}

impl Bridge {
    pub async fn start(cfg: Config) -> Bridge {
        // Logs go to the test's stderr, shown when a test fails.
        duvo_bridge::telemetry::init_logging(&cfg.log);
        let stop = CancellationToken::new();
        let running = duvo_bridge::app::start(cfg, stop.clone())
            .await
            .expect("bridge starts");
        Bridge { stop, running }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.running.wait().await.expect("bridge stops cleanly");
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.running.admin_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn ready(&self) -> bool {
        reqwest::get(format!("http://{}/readyz", self.running.admin_addr))
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    }
}

/// Sum of the samples of `name` whose labels contain every `needle`.
pub fn metric_sum(text: &str, name: &str, needles: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every order `0..n` is exactly one case in `sim`: none lost, none twice,
/// nothing else.
pub fn assert_exactly_once(sim: &SimHandle, n: usize) {
    let per = crate::common::cases_per_order(sim);
    let missing: Vec<usize> = (0..n)
        .filter(|i| !per.contains_key(&format!("ORD-{i:06}")))
        .collect();
    assert!(
        missing.is_empty(),
        "lost records: {} e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let dups: Vec<_> = per.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        dups.is_empty(),
        "duplicate cases: {} e.g. {:?}",
        dups.len(),
        &dups[..dups.len().min(10)]
    );
    assert_eq!(per.len(), n, "unexpected extra cases");
}

/// Run `scripts/services.sh ARGS` (the project's broker provisioning) and
/// return what it printed on stdout.
pub async fn services(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
        let out = std::process::Command::new("bash")
            .arg(script)
            .args(&args)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run scripts/services.sh");
        assert!(out.status.success(), "scripts/services.sh {args:?} failed");
        String::from_utf8(out.stdout).unwrap()
    })
    .await
    .unwrap()
}

/// The single Apache Kafka broker of `scripts/services.sh` (KRaft, on
/// 127.0.0.1:19092), started if it is not up.
pub async fn apache_kafka() -> String {
    services(&["up", "kafka"]).await;
    "127.0.0.1:19092".into()
}

/// The three-node Apache Kafka cluster of `scripts/services.sh` (default
/// replication factor 3, `min.insync.replicas = 2`), started if not up.
pub async fn apache_kafka_cluster() -> String {
    services(&["up", "kafka-cluster"]).await;
    "127.0.0.1:19192,127.0.0.1:19193,127.0.0.1:19194".into()
}

/// Create `topics` (name, partitions) with `replication` copies each.
pub async fn create_topics(bootstrap: &str, topics: &[(&str, i32)], replication: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(replication)))
        .collect();
    let res = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create topics");
    for r in res {
        r.expect("topic created");
    }
}
