//! The AMQP source against the real RabbitMQ on 127.0.0.1:5672 (guest/guest),
//! with the in-process simulator and bridge (and, for the SIGKILL test, the
//! real binary). Every test uses its own uniquely named queues and deletes
//! them at the end.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use duvo_bridge::config::{AmqpSourceConfig, Config, SourceConfig, UndecodablePolicy};
use duvo_bridge::sim::FaultsPatch;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// A vhost of its own for the connection-kill test, so that closing every
/// connection in it does not disturb tests running in parallel.
const KILL_VHOST: &str = "duvo-kill-test";

fn unique(prefix: &str) -> String {
    format!("duvo-test-{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Publisher and inspector: declares, counts, deletes the test's queues.
struct Rabbit {
    conn: Connection,
    ch: Channel,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Rabbit {
    async fn connect(uri: &str) -> Rabbit {
        let conn = Connection::connect(uri, ConnectionProperties::default())
            .await
            .expect("RabbitMQ on 127.0.0.1:5672");
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Rabbit {
            conn,
            ch,
            queues: Vec::new(),
            exchanges: Vec::new(),
        }
    }

    async fn queue(&mut self, name: &str, args: FieldTable) {
        self.ch
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap();
        self.queues.push(name.to_string());
    }

    async fn fanout(&mut self, name: &str) {
        self.ch
            .exchange_declare(
                name.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        self.exchanges.push(name.to_string());
    }

    /// Publish persistent messages and wait for the broker's confirms.
    async fn publish(&self, queue: &str, msgs: Vec<(Vec<u8>, BasicProperties)>) {
        let mut confirms = Vec::with_capacity(msgs.len());
        for (body, props) in msgs {
            let c = self
                .ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body,
                    props.with_delivery_mode(2),
                )
                .await
                .unwrap();
            confirms.push(c);
        }
        for c in futures::future::join_all(confirms).await {
            assert!(c.unwrap().is_ack(), "broker confirmed the publish");
        }
    }

    async fn publish_orders(&self, queue: &str, range: std::ops::Range<usize>) {
        let msgs = range
            .map(|i| {
                let body = serde_json::to_vec(&order(i)).unwrap();
                let props = BasicProperties::default().with_message_id(format!("m-{i}").into());
                (body, props)
            })
            .collect();
        self.publish(queue, msgs).await;
    }

    /// Messages ready in the queue (not counting unacked ones).
    async fn ready(&self, queue: &str) -> u32 {
        self.ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    async fn cleanup(self) {
        for q in &self.queues {
            let _ = self
                .ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for x in &self.exchanges {
            let _ = self
                .ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = self.conn.close(200, "test done".into()).await;
    }
}

fn amqp_source(uri: &str, queue: &str, cfg: &Config) -> AmqpSourceConfig {
    let queue_id = match &cfg.sources[0] {
        SourceConfig::Http(h) => h.queue_id.parse().unwrap(),
        SourceConfig::Amqp(a) => a.queue_id.parse().unwrap(),
        SourceConfig::Kafka(k) => k.queue_id.parse().unwrap(),
    };
    let mut a = AmqpSourceConfig::new("rabbit", uri, queue, queue_id);
    a.title = "Order {/order_id}".into();
    a
}

fn assert_exactly_once(sim: &duvo_bridge::sim::SimHandle, n: usize) {
    let per = cases_per_order(sim);
    let missing: Vec<usize> = (0..n)
        .filter(|i| !per.contains_key(&format!("ORD-{i:06}")))
        .collect();
    assert!(missing.is_empty(), "lost messages: {missing:?}");
    let dups: Vec<_> = per.iter().filter(|(_, c)| **c > 1).collect();
    assert!(dups.is_empty(), "duplicate cases: {dups:?}");
    assert_eq!(per.len(), n);
}

async fn metric(admin: std::net::SocketAddr, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_become_exactly_one_case_each_and_are_all_acked() {
    const N: usize = 10_000;
    let queue = unique("bulk");
    let mut rabbit = Rabbit::connect(URI).await;
    rabbit.queue(&queue, FieldTable::default()).await;
    rabbit.publish_orders(&queue, 0..N).await;

    let q = queue.clone();
    let h = Harness::start(sim_config(), move |cfg| {
        let mut a = amqp_source(URI, &q, cfg);
        // Own name: metrics are per process, and `cargo test` shares one.
        a.name = "bulk".into();
        cfg.sources.push(SourceConfig::Amqp(a));
    })
    .await;
    let ok = wait_until(Duration::from_secs(45), || async {
        h.sim.stats().cases_created as usize >= N
    })
    .await;
    assert!(ok, "all delivered: {:?}", h.sim.stats());
    let admin = h.bridge.admin_addr;
    assert_eq!(
        metric(admin, "duvo_bridge_events_stored_total{source=\"bulk\"}").await,
        N as f64
    );
    assert_eq!(
        metric(admin, "duvo_bridge_amqp_connected{source=\"bulk\"}").await,
        1.0
    );
    let sim = h.stop().await;
    assert_exactly_once(&sim, N);
    // After the bridge closed its channel, anything unacked would be back.
    assert_eq!(rabbit.ready(&queue).await, 0, "every message was acked");
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_message_id_twice_is_one_case_and_header_or_field_ids_work() {
    let queue = unique("dedupe");
    let mut rabbit = Rabbit::connect(URI).await;
    rabbit.queue(&queue, FieldTable::default()).await;
    let props = |id: &str| BasicProperties::default().with_message_id(id.into());
    let mut hdr = FieldTable::default();
    hdr.insert("x-event-id".into(), AMQPValue::LongString("E-7".into()));
    let body = |i: usize, amount: u64| {
        let mut o = order(i);
        o["amount"] = amount.into();
        serde_json::to_vec(&o).unwrap()
    };
    rabbit
        .publish(
            &queue,
            vec![
                (body(1, 1), props("dup-1")),
                // Same id, different body: still the same message.
                (body(1, 2), props("dup-1")),
                (body(2, 1), props("dup-2")),
                // The configured header wins over message_id.
                (
                    body(3, 1),
                    props("a")
                        .with_headers(hdr.clone())
                        .with_message_id("a".into()),
                ),
                (
                    body(3, 2),
                    props("b").with_headers(hdr).with_message_id("b".into()),
                ),
                // No id at all: identical bodies collapse (content hash).
                (body(4, 1), BasicProperties::default()),
                (body(4, 1), BasicProperties::default()),
            ],
        )
        .await;
    let q = queue.clone();
    let h = Harness::start(sim_config(), move |cfg| {
        let mut a = amqp_source(URI, &q, cfg);
        a.message_id_header = Some("x-event-id".into());
        cfg.sources.push(SourceConfig::Amqp(a));
    })
    .await;
    let ok = wait_until(Duration::from_secs(20), || async {
        h.bridge.outbox.stats().appended + h.bridge.outbox.stats().duplicates >= 7
            && h.bridge.outbox.depth() == 0
    })
    .await;
    assert!(ok, "{:?}", h.bridge.outbox.stats());
    assert_eq!(h.bridge.outbox.stats().duplicates, 3);
    let sim = h.stop().await;
    let per = cases_per_order(&sim);
    assert_eq!(per.len(), 4, "{per:?}");
    assert!(per.values().all(|c| *c == 1), "{per:?}");
    assert_eq!(rabbit.ready(&queue).await, 0, "duplicates are acked too");
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_payloads_are_wrapped_as_text_or_base64() {
    let queue = unique("wrap");
    let mut rabbit = Rabbit::connect(URI).await;
    rabbit.queue(&queue, FieldTable::default()).await;
    let p = |id: &str| BasicProperties::default().with_message_id(id.into());
    rabbit
        .publish(
            &queue,
            vec![
                (b"plain text, not JSON".to_vec(), p("t1")),
                (vec![0xff, 0xfe, 0x00], p("t2")),
                (b"[1,2,3]".to_vec(), p("t3")),
            ],
        )
        .await;
    let q = queue.clone();
    let h = Harness::start(sim_config(), move |cfg| {
        let mut a = amqp_source(URI, &q, cfg);
        a.title_fallback = "Unparsed message".into();
        cfg.sources.push(SourceConfig::Amqp(a));
    })
    .await;
    let ok = wait_until(Duration::from_secs(20), || async {
        h.sim.stats().cases_created >= 3
    })
    .await;
    assert!(ok, "{:?}", h.sim.stats());
    let sim = h.stop().await;
    let mut data: Vec<String> = sim.cases().into_iter().filter_map(|c| c.data).collect();
    data.sort();
    assert_eq!(data, vec!["//4A", "[1,2,3]", "plain text, not JSON"]);
    assert!(sim.cases().iter().all(|c| c.title == "Unparsed message"));
    assert_eq!(rabbit.ready(&queue).await, 0);
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_payloads_rejected_land_in_the_dead_letter_queue_once() {
    let queue = unique("reject");
    let dlx = unique("dlx");
    let dlq = unique("dlq");
    let mut rabbit = Rabbit::connect(URI).await;
    rabbit.fanout(&dlx).await;
    rabbit.queue(&dlq, FieldTable::default()).await;
    rabbit
        .ch
        .queue_bind(
            dlq.as_str().into(),
            dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // Same arguments as the bridge declares, so both declarations agree.
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(dlx.as_str().into()),
    );
    rabbit.queue(&queue, args).await;
    rabbit
        .publish(
            &queue,
            vec![
                (b"garbage".to_vec(), BasicProperties::default()),
                (vec![0xc3, 0x28], BasicProperties::default()),
            ],
        )
        .await;
    rabbit.publish_orders(&queue, 0..5).await;
    let (q, x) = (queue.clone(), dlx.clone());
    let h = Harness::start(sim_config(), move |cfg| {
        let mut a = amqp_source(URI, &q, cfg);
        a.name = "rejecter".into();
        a.on_undecodable = UndecodablePolicy::Reject;
        a.declare = true;
        a.dead_letter_exchange = Some(x);
        cfg.sources.push(SourceConfig::Amqp(a));
    })
    .await;
    let ok = wait_until(Duration::from_secs(20), || async {
        h.sim.stats().cases_created >= 5 && rabbit.ready(&dlq).await == 2
    })
    .await;
    assert!(ok, "{:?}", h.sim.stats());
    let admin = h.bridge.admin_addr;
    assert_eq!(
        metric(
            admin,
            "duvo_bridge_events_rejected_total{source=\"rejecter\""
        )
        .await,
        2.0
    );
    let sim = h.stop().await;
    assert_exactly_once(&sim, 5);
    assert_eq!(rabbit.ready(&queue).await, 0, "not requeued");
    assert_eq!(rabbit.ready(&dlq).await, 2, "dead-lettered exactly once");
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_pauses_consumption_until_the_outbox_drains() {
    const N: usize = 400;
    let queue = unique("backpressure");
    let mut rabbit = Rabbit::connect(URI).await;
    rabbit.queue(&queue, FieldTable::default()).await;
    rabbit.publish_orders(&queue, 0..N).await;
    let q = queue.clone();
    let h = Harness::start(sim_config(), |_| {}).await;
    h.sim.set_faults(FaultsPatch {
        outage: Some(true),
        ..Default::default()
    });
    h.stop.cancel();
    h.bridge.wait().await.unwrap();
    // Restart on the same outbox with the AMQP source and a small high water
    // while the API is down.
    let mut cfg = bridge_config(&h.sim, h.dir.path());
    cfg.outbox.high_water_events = 50;
    cfg.outbox.low_water_events = 20;
    let mut a = amqp_source(URI, &q, &cfg);
    a.prefetch = 10;
    cfg.sources.push(SourceConfig::Amqp(a));
    let stop = tokio_util::sync::CancellationToken::new();
    let bridge = duvo_bridge::app::start(cfg, stop.clone()).await.unwrap();
    let ok = wait_until(Duration::from_secs(20), || async {
        bridge.outbox.over_high_water()
    })
    .await;
    assert!(ok, "outbox fills up: {:?}", bridge.outbox.stats());
    // Paused: nothing more is appended while the API stays down.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = bridge.outbox.stats().appended;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(bridge.outbox.stats().appended, held, "consumption paused");
    assert!(held <= 50 + 10, "appended {held} with high water 50");
    let ready = rabbit.ready(&queue).await as usize;
    assert!(ready >= N - 50 - 20, "messages wait in the broker: {ready}");

    h.sim.set_faults(FaultsPatch {
        outage: Some(false),
        ..Default::default()
    });
    let ok = wait_until(Duration::from_secs(30), || async {
        h.sim.stats().cases_created as usize >= N
    })
    .await;
    assert!(ok, "resumes and delivers: {:?}", h.sim.stats());
    stop.cancel();
    bridge.wait().await.unwrap();
    assert_exactly_once(&h.sim, N);
    assert_eq!(rabbit.ready(&queue).await, 0);
    rabbit.cleanup().await;
}

fn rabbitmqctl(args: &[&str]) -> std::process::Output {
    Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl is installed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_all_connections_mid_flow_reconnects_and_delivers_exactly_once() {
    const N: usize = 6_000;
    // A vhost of its own (idempotent set-up) so the kill is local to this test.
    let _ = rabbitmqctl(&["add_vhost", KILL_VHOST]);
    let out = rabbitmqctl(&[
        "set_permissions",
        "-p",
        KILL_VHOST,
        "guest",
        ".*",
        ".*",
        ".*",
    ]);
    assert!(out.status.success(), "{out:?}");
    let uri = format!("amqp://guest:guest@127.0.0.1:5672/{KILL_VHOST}");
    let queue = unique("kill");
    {
        let mut rabbit = Rabbit::connect(&uri).await;
        rabbit.queue(&queue, FieldTable::default()).await;
        rabbit.publish_orders(&queue, 0..N).await;
        let _ = rabbit.conn.close(200, "published".into()).await;
    }
    let (q, u) = (queue.clone(), uri.clone());
    let h = Harness::start(sim_config(), move |cfg| {
        let mut a = amqp_source(&u, &q, cfg);
        a.prefetch = 10;
        cfg.sources.push(SourceConfig::Amqp(a));
    })
    .await;
    let started = wait_until(Duration::from_secs(20), || async {
        h.bridge.outbox.stats().appended > 0
    })
    .await;
    assert!(started);
    let at_kill = h.bridge.outbox.stats().appended;
    let out = tokio::task::spawn_blocking(|| {
        rabbitmqctl(&["close_all_connections", "--vhost", KILL_VHOST, "test"])
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    eprintln!(
        "closed all connections with {at_kill}..{} of {N} appended",
        h.bridge.outbox.stats().appended
    );
    let ok = wait_until(Duration::from_secs(40), || async {
        h.sim.stats().cases_created as usize >= N
    })
    .await;
    assert!(ok, "all delivered after the reconnect: {:?}", h.sim.stats());
    let admin = h.bridge.admin_addr;
    assert!(
        metric(
            admin,
            "duvo_bridge_amqp_reconnects_total{source=\"rabbit\"}"
        )
        .await
            >= 1.0
    );
    let sim = h.stop().await;
    assert_exactly_once(&sim, N);
    let rabbit = Rabbit::connect(&uri).await;
    assert_eq!(rabbit.ready(&queue).await, 0);
    let mut rabbit = rabbit;
    rabbit.queues.push(queue);
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_flow_and_restart_loses_nothing_and_duplicates_nothing() {
    const N: usize = 6_000;
    let queue = unique("sigkill");
    let mut rabbit = Rabbit::connect(URI).await;
    rabbit.queue(&queue, FieldTable::default()).await;
    rabbit.publish_orders(&queue, 0..N).await;

    let mut sc = sim_config();
    sc.rate_limit = 3000; // 50 requests/s: delivery overlaps with intake
    let sim = start_sim(sc).await;
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let config = dir.path().join("bridge.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[duvo]
base_url = "{base}"
api_key_env = "DUVO_API_KEY"
rate_limit_per_minute = 3000
timeout_secs = 5
[outbox]
path = "{outbox}"
[delivery]
linger_ms = 50
retry_initial_ms = 20
retry_max_ms = 500
[admin]
listen = "127.0.0.1:{admin}"
[shutdown]
grace_period_secs = 2
[[sources]]
type = "amqp"
name = "rabbit"
uri = "{URI}"
queue = "{queue}"
prefetch = 50
queue_id = "{queue_id}"
title = "Order {{/order_id}}"
"#,
            base = sim.base_url(),
            outbox = dir.path().join("outbox").display(),
            queue_id = sim.queues()[0],
        ),
    )
    .unwrap();
    let log = dir.path().join("bridge.log");
    let key = sim.api_keys()[0].clone();

    let mut child = spawn_bridge(&config, &key, &log);
    let progressed = wait_until(Duration::from_secs(20), || async {
        sim.stats().cases_created >= 300
    })
    .await;
    assert!(progressed, "bridge delivers before the kill");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    eprintln!(
        "killed with {} cases created, {} messages ready",
        sim.stats().cases_created,
        rabbit.ready(&queue).await
    );
    let mut child = spawn_bridge(&config, &key, &log);
    let ok = wait_until(Duration::from_secs(40), || async {
        sim.stats().cases_created as usize >= N
    })
    .await;
    // A clean stop (SIGTERM) so the channel closes and nothing is unacked.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    if !ok {
        eprintln!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    assert!(ok, "all delivered after restart: {:?}", sim.stats());
    assert!(
        !std::fs::read_to_string(&log)
            .unwrap()
            .contains("guest:guest"),
        "the URI password never appears in logs"
    );
    assert_exactly_once(&sim, N);
    assert_eq!(rabbit.ready(&queue).await, 0);
    rabbit.cleanup().await;
}
