//! The Kafka source and reporter against a real Kafka-protocol broker
//! process: tansu (`cargo install tansu --locked --features dynostore`;
//! `.ci/run` installs it). `DUVO_TEST_KAFKA=host:port` points the test at a
//! running broker (tansu, or Apache Kafka); without it the test starts its
//! own tansu with in-memory storage on a free port.

mod common;
mod kafka_util;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use kafka_util::*;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde_json::json;

/// A broker for the test; kills the tansu it started when dropped.
struct Broker {
    bootstrap: String,
    child: Option<Child>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tansu_binary() -> Option<std::path::PathBuf> {
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let candidates = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("tansu"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .chain(home.map(|h| h.join(".cargo/bin/tansu")));
    candidates.into_iter().find(|p| p.is_file())
}

async fn broker() -> Broker {
    if let Ok(bs) = std::env::var("DUVO_TEST_KAFKA") {
        return Broker {
            bootstrap: bs,
            child: None,
        };
    }
    let bin = tansu_binary().expect(
        "tansu not found: `cargo install tansu --locked --features dynostore` (or set DUVO_TEST_KAFKA=host:port)",
    );
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(bin)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "memory://tansu/", "--silent"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tansu");
    let up = wait_until(Duration::from_secs(20), || async move {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    assert!(up, "tansu listens on {port}");
    Broker {
        bootstrap: format!("127.0.0.1:{port}"),
        child: Some(child),
    }
}

async fn create_topics(bootstrap: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
        .collect();
    let res = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics");
    for r in res {
        r.expect("topic created");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_two_bridges_deliver_every_record_once_and_report_failures_to_the_failure_topic() {
    const N: usize = 3000;
    let b = broker().await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let (topic, failures) = (
        format!("orders-{suffix}"),
        format!("orders-{suffix}.failures"),
    );
    create_topics(&b.bootstrap, &[(&topic, 4), (&failures, 1)]).await;
    let recs: Vec<Rec> = (0..N)
        .map(|i| {
            let mut o = json!({ "order_id": format!("ORD-{i:06}") });
            if i % 100 == 7 {
                o["simulate"] = json!("fail");
            }
            Rec::json(&format!("key-{i}"), &o)
        })
        .collect();
    let p = producer(&b.bootstrap);
    produce(&p, &topic, &recs[..N / 2]).await;

    let sim = start_sim(duvo_bridge::sim::SimConfig {
        process_ms: 200,
        ..sim_config()
    })
    .await;
    let q = sim.queues()[0];
    let group = format!("g-{suffix}");
    let src = |name: &str| {
        let mut k = kafka_source(name, &b.bootstrap, &group, &[&topic], q);
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
    let bb = Bridge::start(cfgs.next().unwrap()).await;
    produce(&p, &topic, &recs[N / 2..]).await;
    expect_cases(&sim, N as u64, 120).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per = cases_per_order(&sim);
    assert_eq!(per.len(), N, "every record became a case");
    assert!(per.values().all(|c| *c == 1), "no duplicate case");
    let t = a.metrics().await;
    let (ca, cb) = (
        metric_sum(&t, "duvo_bridge_kafka_consumed_total", &["t-a"]),
        metric_sum(&t, "duvo_bridge_kafka_consumed_total", &["t-b"]),
    );
    eprintln!("consumed: a={ca} b={cb}");

    let want = (0..N).filter(|i| i % 100 == 7).count();
    let reports = read_topic(&b.bootstrap, &failures, want, Duration::from_secs(120)).await;
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
    bb.stop().await;
    assert!(ca + cb >= N as f64, "a={ca} b={cb}");
}
