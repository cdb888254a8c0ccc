//! The AMQP source and reporter against the real RabbitMQ on 127.0.0.1:5672
//! (guest/guest), with the in-process simulator and bridge (and, for the
//! SIGKILL test, the real binary). Every test uses its own uniquely named
//! queues and exchanges and deletes them at the end.
//!
//! One test restarts the broker (`rabbitmqctl stop_app` / `start_app`).
//! Under nextest every test of this binary is in the `rabbitmq` test group
//! (`.config/nextest.toml`, one at a time); under `cargo test` they share a
//! process and the restart takes [`BROKER`] for writing while the others
//! hold it for reading.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use duvo_bridge::config::{Config, SourceConfig};
use duvo_bridge::sim::FaultsPatch;
use duvo_bridge::source::{AmqpSourceConfig, UndecodablePolicy};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

/// Held for reading by every test, for writing by the broker restart (so
/// that `cargo test`, which runs them as threads of one process, does not
/// restart the broker under the others).
static BROKER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

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
        let conn = match Connection::connect(uri, ConnectionProperties::default()).await {
            Ok(c) => c,
            Err(e) => {
                // A broker-restart test killed mid-way may have left the
                // node with its app stopped: bring it back once.
                eprintln!("RabbitMQ unreachable ({e}); trying rabbitmqctl start_app");
                broker_back_up();
                Connection::connect(uri, ConnectionProperties::default())
                    .await
                    .expect("RabbitMQ on 127.0.0.1:5672")
            }
        };
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

    async fn topic(&mut self, name: &str) {
        self.ch
            .exchange_declare(
                name.into(),
                ExchangeKind::Topic,
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

    async fn bind(&self, queue: &str, exchange: &str, key: &str) {
        self.ch
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    /// Take (and ack) everything ready in `queue`.
    async fn take_all(&self, queue: &str) -> Vec<Received> {
        let mut out = Vec::new();
        while let Some(m) = self
            .ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            out.push(Received::new(m.delivery));
        }
        out
    }

    /// Collect messages from `queue` until `n` arrived (or `timeout`), then
    /// for `quiet` more, so a duplicate would be seen too.
    async fn collect(
        &self,
        queue: &str,
        n: usize,
        timeout: Duration,
        quiet: Duration,
    ) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < n && tokio::time::Instant::now() < deadline {
            got.extend(self.take_all(queue).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(quiet).await;
        got.extend(self.take_all(queue).await);
        got
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

/// A report as a consumer of the failure exchange sees it.
#[derive(Debug, Clone)]
struct Received {
    props: BasicProperties,
    json: serde_json::Value,
}

impl Received {
    fn new(d: lapin::message::Delivery) -> Received {
        Received {
            json: serde_json::from_slice(&d.data).unwrap_or_default(),
            props: d.properties,
        }
    }

    fn header(&self, name: &str) -> Option<String> {
        match self.props.headers().as_ref()?.inner().get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
            _ => None,
        }
    }

    fn correlation_id(&self) -> String {
        self.props
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str().to_string())
            .unwrap_or_default()
    }

    fn message_id(&self) -> String {
        self.props
            .message_id()
            .as_ref()
            .map(|c| c.as_str().to_string())
            .unwrap_or_default()
    }
}

/// Orders `m-{i}` for `i` in `range`, those in `fail` marked to fail in
/// the simulator, with `reply_to` where `reply` says so.
fn orders_failing(
    range: std::ops::Range<usize>,
    fail: impl Fn(usize) -> bool,
    reply: impl Fn(usize) -> Option<String>,
) -> Vec<(Vec<u8>, BasicProperties)> {
    range
        .map(|i| {
            let mut o = order(i);
            if fail(i) {
                o["simulate"] = "fail".into();
            }
            let mut props = BasicProperties::default().with_message_id(format!("m-{i}").into());
            if let Some(r) = reply(i) {
                props = props.with_reply_to(r.into());
            }
            (serde_json::to_vec(&o).unwrap(), props)
        })
        .collect()
}

/// Fast tracking so failed cases are reported within a second or two.
fn fast_tracking(cfg: &mut Config) {
    cfg.tracking.poll_interval_ms = 300;
    cfg.tracking.watch_interval_ms = 600;
    cfg.tracking.report_retry_initial_ms = 50;
    cfg.tracking.report_retry_max_ms = 500;
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
    let _broker = BROKER.read().await;
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
    let _broker = BROKER.read().await;
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
    let _broker = BROKER.read().await;
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
    let _broker = BROKER.read().await;
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
    // Published by the bridge (no x-death: not dead-lettered by the
    // broker), body intact, with the reason.
    let mut dead: Vec<(String, Option<String>, Option<String>)> = rabbit
        .take_all(&dlq)
        .await
        .into_iter()
        .map(|r| {
            (
                r.header("x-duvo-bridge-reason").unwrap_or_default(),
                r.header("x-duvo-source-queue"),
                r.header("x-death"),
            )
        })
        .collect();
    dead.sort();
    assert_eq!(
        dead,
        vec![
            ("not_json_object".into(), Some(queue.clone()), None),
            ("not_utf8".into(), Some(queue.clone()), None),
        ]
    );
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_exchange_falls_back_to_the_brokers_dead_lettering() {
    let _broker = BROKER.read().await;
    let queue = unique("reject-fallback");
    let dlx = unique("dlx");
    let dlq = unique("dlq");
    let mut rabbit = Rabbit::connect(URI).await;
    rabbit.fanout(&dlx).await;
    rabbit.queue(&dlq, FieldTable::default()).await;
    rabbit.bind(&dlq, &dlx, "").await;
    // The queue dead-letters to `dlx`; the bridge is told of another
    // exchange, which does not exist.
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(dlx.as_str().into()),
    );
    rabbit.queue(&queue, args).await;
    rabbit
        .publish(
            &queue,
            vec![(b"garbage".to_vec(), BasicProperties::default())],
        )
        .await;
    rabbit.publish_orders(&queue, 0..3).await;
    let q = queue.clone();
    let missing = unique("no-such-exchange");
    let h = Harness::start(sim_config(), move |cfg| {
        let mut a = amqp_source(URI, &q, cfg);
        a.on_undecodable = UndecodablePolicy::Reject;
        a.dead_letter_exchange = Some(missing);
        cfg.sources.push(SourceConfig::Amqp(a));
    })
    .await;
    let ok = wait_until(Duration::from_secs(20), || async {
        h.sim.stats().cases_created >= 3 && rabbit.ready(&dlq).await == 1
    })
    .await;
    assert!(ok, "{:?}", h.sim.stats());
    let sim = h.stop().await;
    assert_exactly_once(&sim, 3);
    assert_eq!(rabbit.ready(&queue).await, 0, "not requeued");
    let dead = rabbit.take_all(&dlq).await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .props
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .get("x-death")
            .is_some(),
        "dead-lettered by the broker: {:?}",
        dead[0].props
    );
    assert_eq!(dead[0].header("x-duvo-bridge-reason"), None);
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_pauses_consumption_until_the_outbox_drains() {
    let _broker = BROKER.read().await;
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

/// `rabbitmqctl start_app` (a no-op when running) and wait for the boot.
fn broker_back_up() {
    let out = rabbitmqctl(&["start_app"]);
    if !out.status.success() {
        eprintln!("rabbitmqctl start_app: {out:?}");
    }
    let out = rabbitmqctl(&["await_startup", "--timeout", "120"]);
    assert!(out.status.success(), "broker back up: {out:?}");
}

/// Restarts the broker's app if the test that stopped it ends early
/// (panic): the broker is always up when the test is over.
struct BrokerUpOnDrop;

impl Drop for BrokerUpOnDrop {
    fn drop(&mut self) {
        broker_back_up();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_all_connections_mid_flow_reconnects_and_delivers_exactly_once() {
    let _broker = BROKER.read().await;
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
    let _broker = BROKER.read().await;
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
        bridge_toml(
            &sim,
            dir.path(),
            admin,
            3000,
            &format!(
                r#"
[[sources]]
type = "amqp"
name = "rabbit"
uri = "{URI}"
queue = "{queue}"
prefetch = 50
queue_id = "{queue_id}"
title = "Order {{/order_id}}"
"#,
                queue_id = sim.queues()[0],
            ),
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

/// The failed-case reports a test expects, by original message id.
fn by_correlation(reports: &[Received]) -> std::collections::BTreeMap<String, Vec<Received>> {
    let mut m: std::collections::BTreeMap<String, Vec<Received>> = Default::default();
    for r in reports {
        m.entry(r.correlation_id()).or_default().push(r.clone());
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_cases_are_reported_on_the_failure_exchange_once_with_headers() {
    let _broker = BROKER.read().await;
    const FAIL: [usize; 5] = [3, 7, 11, 19, 23];
    const REJECT: usize = 13;
    let queue = unique("reported");
    let exchange = unique("failures");
    let reports = unique("failures-q");
    let mut rabbit = Rabbit::connect(URI).await;
    rabbit.queue(&queue, FieldTable::default()).await;
    // The bridge declares the exchange too (declare = true, topic).
    rabbit.topic(&exchange).await;
    rabbit.queue(&reports, FieldTable::default()).await;
    rabbit.bind(&reports, &exchange, "orders.failed").await;
    let mut msgs = orders_failing(0..30, |i| FAIL.contains(&i), |_| None);
    // A poison event: the API refuses it (400), reported as rejected.
    let mut poison = order(REJECT);
    poison["simulate"] = "reject".into();
    msgs[REJECT].0 = serde_json::to_vec(&poison).unwrap();
    rabbit.publish(&queue, msgs).await;

    let (q, x) = (queue.clone(), exchange.clone());
    let h = Harness::start(sim_config(), move |cfg| {
        fast_tracking(cfg);
        let mut a = amqp_source(URI, &q, cfg);
        a.name = "reported".into();
        a.declare = true;
        a.failure_exchange = Some(x);
        a.failure_routing_key = Some("orders.failed".into());
        cfg.sources.push(SourceConfig::Amqp(a));
    })
    .await;
    let got = rabbit
        .collect(
            &reports,
            FAIL.len() + 1,
            Duration::from_secs(60),
            Duration::from_millis(1500),
        )
        .await;
    let failed_cases = case_ids_in(&h.sim, "failed");
    let per = by_correlation(&got);
    let mut want: Vec<String> = FAIL.iter().map(|i| format!("m-{i}")).collect();
    want.push(format!("m-{REJECT}"));
    want.sort();
    assert_eq!(
        per.keys().cloned().collect::<Vec<_>>(),
        want,
        "reports correlated to the failed and the rejected messages: {got:?}"
    );
    assert_eq!(
        got.len(),
        FAIL.len() + 1,
        "exactly one report each: {got:?}"
    );
    let mut reported_cases = std::collections::BTreeSet::new();
    for r in &got {
        let j = &r.json;
        assert_eq!(r.props.delivery_mode(), &Some(2), "persistent");
        assert_eq!(
            r.props.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(
            r.message_id(),
            j["report_id"].as_str().unwrap(),
            "message_id = report id"
        );
        assert_eq!(
            r.header("x-duvo-queue-id").unwrap(),
            h.sim.queues()[0].to_string()
        );
        assert_eq!(
            r.header("x-duvo-event-id").unwrap(),
            j["event_id"].as_str().unwrap()
        );
        assert_eq!(r.header("x-duvo-source-queue").unwrap(), queue);
        assert_eq!(r.header("x-duvo-source").unwrap(), "reported");
        assert!(!r.header("x-duvo-reason").unwrap().is_empty());
        let i: usize = r.correlation_id()[2..].parse().unwrap();
        assert_eq!(j["event"]["order_id"], format!("ORD-{i:06}"), "{j}");
        if i == REJECT {
            assert_eq!(r.header("x-duvo-status").unwrap(), "rejected");
            assert_eq!(r.header("x-duvo-case-id"), None, "no case was created");
            assert!(j["case_id"].is_null());
        } else {
            assert_eq!(r.header("x-duvo-status").unwrap(), "failed");
            assert_eq!(j["status"], "failed");
            let case = r.header("x-duvo-case-id").unwrap();
            assert_eq!(j["case_id"].as_str().unwrap(), case);
            reported_cases.insert(case);
        }
    }
    assert_eq!(reported_cases, failed_cases, "exactly the failed cases");
    let ok = wait_until(Duration::from_secs(10), || async {
        h.bridge.outbox.pending_reports().is_empty()
    })
    .await;
    assert!(ok, "reports leave the outbox once confirmed");
    assert_eq!(
        metric(
            h.bridge.admin_addr,
            "duvo_bridge_amqp_reports_returned_total{source=\"reported\"}"
        )
        .await,
        0.0
    );
    h.stop().await;
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_report_is_retried_until_a_queue_is_bound() {
    let _broker = BROKER.read().await;
    let queue = unique("unroutable");
    let exchange = unique("failures");
    let reports = unique("failures-q");
    let mut rabbit = Rabbit::connect(URI).await;
    rabbit.queue(&queue, FieldTable::default()).await;
    // The exchange exists, nothing is bound to it.
    rabbit.topic(&exchange).await;
    rabbit
        .publish(&queue, orders_failing(0..6, |i| i % 2 == 0, |_| None))
        .await;
    let (q, x) = (queue.clone(), exchange.clone());
    let h = Harness::start(sim_config(), move |cfg| {
        fast_tracking(cfg);
        let mut a = amqp_source(URI, &q, cfg);
        a.name = "unroutable".into();
        a.failure_exchange = Some(x);
        cfg.sources.push(SourceConfig::Amqp(a));
    })
    .await;
    let admin = h.bridge.admin_addr;
    let returned = "duvo_bridge_amqp_reports_returned_total{source=\"unroutable\"}";
    let ok = wait_until(Duration::from_secs(60), || async {
        metric(admin, returned).await >= 6.0
    })
    .await;
    assert!(
        ok,
        "reports returned as unroutable: {}",
        metric(admin, returned).await
    );
    assert_eq!(
        h.bridge.outbox.pending_reports().get("unroutable"),
        Some(&3),
        "returned reports stay in the outbox"
    );
    // Now someone listens: the kept reports arrive, once each.
    rabbit.queue(&reports, FieldTable::default()).await;
    rabbit.bind(&reports, &exchange, "#").await;
    let got = rabbit
        .collect(
            &reports,
            3,
            Duration::from_secs(30),
            Duration::from_millis(1500),
        )
        .await;
    let per = by_correlation(&got);
    assert_eq!(
        per.keys().cloned().collect::<Vec<_>>(),
        vec!["m-0", "m-2", "m-4"],
        "{got:?}"
    );
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(
        got.iter()
            .all(|r| r.header("x-duvo-source-queue").as_deref() == Some(queue.as_str()))
    );
    let ok = wait_until(Duration::from_secs(10), || async {
        h.bridge.outbox.pending_reports().is_empty()
    })
    .await;
    assert!(ok, "{:?}", h.bridge.outbox.pending_reports());
    h.stop().await;
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_reply_to_gets_its_report_in_that_queue() {
    let _broker = BROKER.read().await;
    let queue = unique("replyto");
    let exchange = unique("failures");
    let reports = unique("failures-q");
    let reply = unique("reply");
    let gone = unique("reply-gone");
    let mut rabbit = Rabbit::connect(URI).await;
    rabbit.queue(&queue, FieldTable::default()).await;
    rabbit.topic(&exchange).await;
    rabbit.queue(&reports, FieldTable::default()).await;
    rabbit.bind(&reports, &exchange, "#").await;
    rabbit.queue(&reply, FieldTable::default()).await;
    let (r1, r2) = (reply.clone(), gone.clone());
    // m-0: fails, reply_to an existing queue; m-1: fails, no reply_to;
    // m-2: fails, reply_to a queue that does not exist (any more);
    // m-3: completes, reply_to: no report.
    rabbit
        .publish(
            &queue,
            orders_failing(
                0..4,
                |i| i < 3,
                move |i| match i {
                    0 | 3 => Some(r1.clone()),
                    2 => Some(r2.clone()),
                    _ => None,
                },
            ),
        )
        .await;
    let (q, x) = (queue.clone(), exchange.clone());
    let h = Harness::start(sim_config(), move |cfg| {
        fast_tracking(cfg);
        let mut a = amqp_source(URI, &q, cfg);
        a.name = "replyto".into();
        a.failure_exchange = Some(x);
        cfg.sources.push(SourceConfig::Amqp(a));
    })
    .await;
    let on_failure = rabbit
        .collect(
            &reports,
            2,
            Duration::from_secs(60),
            Duration::from_millis(1500),
        )
        .await;
    let on_reply = rabbit
        .collect(
            &reply,
            1,
            Duration::from_secs(10),
            Duration::from_millis(500),
        )
        .await;
    assert_eq!(
        on_reply
            .iter()
            .map(Received::correlation_id)
            .collect::<Vec<_>>(),
        vec!["m-0"],
        "the reply_to queue gets the report of its message only"
    );
    assert_eq!(
        on_reply[0].header("x-duvo-status").as_deref(),
        Some("failed")
    );
    let mut fallback: Vec<String> = on_failure.iter().map(Received::correlation_id).collect();
    fallback.sort();
    assert_eq!(
        fallback,
        vec!["m-1", "m-2"],
        "no reply_to, or an unroutable one: the failure exchange"
    );
    assert!(
        metric(
            h.bridge.admin_addr,
            "duvo_bridge_amqp_reports_returned_total{source=\"replyto\"}"
        )
        .await
            >= 1.0
    );
    h.stop().await;
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_while_flowing_loses_nothing_and_reports_every_failure() {
    const N: usize = 5_000;
    let _broker = BROKER.write().await;
    let fails = |i: usize| i % 50 == 7;
    let queue = unique("restart");
    let exchange = unique("failures");
    let reports = unique("failures-q");
    let mut rabbit = Rabbit::connect(URI).await;
    rabbit.queue(&queue, FieldTable::default()).await;
    rabbit.topic(&exchange).await;
    rabbit.queue(&reports, FieldTable::default()).await;
    rabbit.bind(&reports, &exchange, "#").await;
    rabbit
        .publish(&queue, orders_failing(0..N, fails, |_| None))
        .await;
    let (q, x) = (queue.clone(), exchange.clone());
    let mut sc = sim_config();
    sc.rate_limit = 600; // 10 requests/s: intake is paced by delivery
    let h = Harness::start(sc, move |cfg| {
        fast_tracking(cfg);
        cfg.duvo.rate_limit_per_minute = 600;
        // A small outbox window keeps most messages in the broker, so the
        // restart hits consumption, delivery and reporting at once.
        cfg.outbox.high_water_events = 400;
        cfg.outbox.low_water_events = 200;
        let mut a = amqp_source(URI, &q, cfg);
        a.name = "restart".into();
        a.prefetch = 50;
        a.failure_exchange = Some(x);
        cfg.sources.push(SourceConfig::Amqp(a));
    })
    .await;
    let started = wait_until(Duration::from_secs(60), || async {
        h.sim.stats().cases_created >= 1_000
    })
    .await;
    assert!(started, "{:?}", h.sim.stats());
    let ready_before = rabbit.ready(&queue).await;
    drop(rabbit); // its connection dies with the broker
    let up = BrokerUpOnDrop;
    let out = tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let at_stop = h.sim.stats().cases_created;
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::spawn_blocking(move || drop(up)).await.unwrap();
    eprintln!(
        "broker restarted: {ready_before} messages waited in the broker, {at_stop} cases created at the stop"
    );
    expect_cases(&h.sim, N as u64, 120).await;
    let failed = N.div_ceil(50);
    let rabbit = Rabbit::connect(URI).await;
    let got = rabbit
        .collect(
            &reports,
            failed,
            Duration::from_secs(90),
            Duration::from_millis(1500),
        )
        .await;
    let admin = h.bridge.admin_addr;
    assert!(
        metric(
            admin,
            "duvo_bridge_amqp_reconnects_total{source=\"restart\"}"
        )
        .await
            >= 1.0
    );
    let sim = h.stop().await;
    assert_exactly_once(&sim, N);
    // Every failed case is reported; a report sent again after a lost
    // confirm carries the same report id (at least once, never twice with
    // different ids).
    let per = by_correlation(&got);
    let want: Vec<String> = (0..N)
        .filter(|i| fails(*i))
        .map(|i| format!("m-{i}"))
        .collect();
    let mut keys: Vec<String> = per.keys().cloned().collect();
    keys.sort_by_key(|k| k[2..].parse::<usize>().unwrap_or(usize::MAX));
    assert_eq!(keys, want, "one report per failed message");
    for (m, rs) in &per {
        let ids: std::collections::BTreeSet<String> = rs.iter().map(Received::message_id).collect();
        assert_eq!(ids.len(), 1, "{m}: reports with different ids {ids:?}");
    }
    eprintln!("{} reports for {} failed cases", got.len(), failed);
    assert_eq!(rabbit.ready(&queue).await, 0, "every message acked");
    let mut rabbit = rabbit;
    rabbit.queues.extend([queue, reports]);
    rabbit.exchanges.push(exchange);
    rabbit.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_queue_is_routed_by_header_and_content_each_message_once() {
    use lapin::types::ShortString;
    let _broker = BROKER.read().await;
    let queue = unique("routes");
    let mut rabbit = Rabbit::connect(URI).await;
    rabbit.queue(&queue, FieldTable::default()).await;
    let mut msgs = Vec::new();
    for i in 0..30usize {
        let mut o = order(i);
        let mut props = BasicProperties::default().with_message_id(format!("r-{i}").into());
        match i % 3 {
            1 => {
                let mut h = FieldTable::default();
                h.insert(
                    ShortString::from("X-Kind"),
                    AMQPValue::LongString("return".into()),
                );
                props = props.with_headers(h);
            }
            2 => o["channel"] = "b2b".into(),
            _ => {}
        }
        msgs.push((serde_json::to_vec(&o).unwrap(), props));
    }
    rabbit.publish(&queue, msgs).await;
    let mut sc = sim_config();
    sc.queues = (0..3).map(|_| uuid::Uuid::new_v4()).collect();
    let queues = sc.queues.clone();
    let sq = queues.clone();
    let q = queue.clone();
    let h = Harness::start(sc, move |cfg| {
        let mut a = amqp_source(URI, &q, cfg);
        a.queue_id = queues[0].to_string();
        a.routes = vec![
            duvo_bridge::routing::RouteConfig {
                name: Some("returns".into()),
                header: Some("x-kind".into()),
                equals: Some("return".into()),
                queue_id: Some(queues[1].to_string()),
                title: Some("Return {/order_id}".into()),
                ..Default::default()
            },
            duvo_bridge::routing::RouteConfig {
                pointer: Some("/channel".into()),
                one_of: Some(vec!["b2b".into(), "wholesale".into()]),
                queue_id: Some(queues[2].to_string()),
                ..Default::default()
            },
        ];
        cfg.sources.push(SourceConfig::Amqp(a));
    })
    .await;
    let ok = wait_until(Duration::from_secs(20), || async {
        h.sim.stats().cases_created >= 30
    })
    .await;
    assert!(ok, "{:?}", h.sim.stats());
    let sim = h.stop().await;
    assert_exactly_once(&sim, 30);
    for c in sim.cases() {
        let data: serde_json::Value = serde_json::from_str(c.data.as_deref().unwrap()).unwrap();
        let i: usize = data["amount"].as_u64().unwrap() as usize;
        let want = sq[i % 3];
        assert_eq!(c.queue_id, want, "order {i} routed to its queue");
        if i % 3 == 1 {
            assert!(
                c.title.starts_with("Return "),
                "the route's title: {}",
                c.title
            );
        }
    }
    assert_eq!(rabbit.ready(&queue).await, 0);
    rabbit.cleanup().await;
}
