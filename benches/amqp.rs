//! AMQP intake throughput against a plain consume-and-ack loop, on the same
//! RabbitMQ (127.0.0.1:5672, guest/guest) in the same run.
//!
//! (a) baseline: lapin `basic_consume` with prefetch 200, `ack` per delivery,
//!     nothing else (the ceiling of the broker + client on this machine);
//! (a') the same loop acking with one `multiple` ack per batch of
//!     deliveries that are immediately available (the fair ceiling for (b));
//! (b) the bridge's `AmqpSource` (prefetch 200) mapping each message to a
//!     case, appending drained deliveries to the outbox (fsync'd group
//!     commit) and acking them with one `multiple` ack per append.
//!
//! Both queues are filled with the same N persistent messages before the
//! clock starts; the clock stops when the last message is acked (a) or
//! appended (b). Run with `cargo bench --bench amqp` (`AMQP_BENCH_N=50000`).

use std::time::{Duration, Instant};

use duvo_bridge::admin::Health;
use duvo_bridge::outbox::{Outbox, OutboxConfig};
use duvo_bridge::source::AmqpSourceConfig;
use duvo_bridge::source::amqp::AmqpSource;
use duvo_bridge::source::{Source, SourceContext};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const PREFETCH: u16 = 200;

async fn fill(ch: &Channel, queue: &str, n: usize) {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let mut confirms = Vec::with_capacity(1000);
    for i in 0..n {
        let body = format!("{{\"order_id\":\"ORD-{i:07}\",\"channel\":\"web\",\"amount\":{i}}}");
        let props = BasicProperties::default()
            .with_message_id(format!("m-{i}").into())
            .with_delivery_mode(2);
        confirms.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await
            .expect("publish"),
        );
        if confirms.len() == 1000 {
            for c in futures::future::join_all(confirms.drain(..)).await {
                c.expect("confirm");
            }
        }
    }
    for c in futures::future::join_all(confirms).await {
        c.expect("confirm");
    }
}

/// Consume and ack only, either per message or (like the bridge) with one
/// `multiple` ack per batch of immediately available deliveries.
async fn baseline(queue: &str, n: usize, batched: bool) -> Duration {
    let conn = Connection::connect(URI, ConnectionProperties::default())
        .await
        .expect("connect");
    let start = Instant::now();
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "bench-baseline".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut acked = 0;
    while acked < n {
        let d = consumer
            .next()
            .await
            .expect("stream open")
            .expect("delivery");
        if !batched {
            d.ack(BasicAckOptions::default()).await.expect("ack");
            acked += 1;
            continue;
        }
        let mut last = d.delivery_tag;
        acked += 1;
        while let Some(Some(Ok(d))) = futures::FutureExt::now_or_never(consumer.next()) {
            last = d.delivery_tag;
            acked += 1;
        }
        ch.basic_ack(last, BasicAckOptions { multiple: true })
            .await
            .expect("ack");
    }
    let took = start.elapsed();
    let _ = conn.close(200, "done".into()).await;
    took
}

async fn bridge(queue: &str, n: usize) -> Duration {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ocfg = OutboxConfig::new(dir.path().join("outbox"));
    ocfg.high_water_events = (n as u64) * 2;
    ocfg.low_water_events = n as u64;
    let outbox = Outbox::open(ocfg).await.expect("outbox");
    let mut cfg = AmqpSourceConfig::new("bench", URI, queue, uuid::Uuid::new_v4());
    cfg.prefetch = PREFETCH;
    cfg.title = "Order {/order_id}".into();
    let src = AmqpSource::new(cfg).expect("source");
    let stop = CancellationToken::new();
    let ctx = SourceContext {
        outbox: outbox.clone(),
        health: Health::default(),
        stop: stop.clone(),
        max_case_bytes: 1_000_000,
    };
    let start = Instant::now();
    let task = tokio::spawn(Box::new(src).run(ctx));
    while (outbox.stats().appended as usize) < n {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = start.elapsed();
    stop.cancel();
    let _ = task.await;
    took
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("AMQP_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let conn = Connection::connect(URI, ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let id = uuid::Uuid::new_v4().simple().to_string();
    let qa = format!("duvo-bench-baseline-{id}");
    let qm = format!("duvo-bench-multiple-{id}");
    let qb = format!("duvo-bench-bridge-{id}");
    fill(&ch, &qa, n).await;
    fill(&ch, &qm, n).await;
    fill(&ch, &qb, n).await;

    // The bridge goes first so any warm-up favours the baselines.
    let ours = bridge(&qb, n).await;
    // On a worker thread like the source's task (not the block_on thread).
    let q = qa.clone();
    let base = tokio::spawn(async move { baseline(&q, n, false).await })
        .await
        .expect("baseline task");
    let q = qm.clone();
    let multi = tokio::spawn(async move { baseline(&q, n, true).await })
        .await
        .expect("baseline task");
    let rate = |d: Duration| n as f64 / d.as_secs_f64();

    println!("\nAMQP intake, {n} persistent messages, prefetch {PREFETCH}\n");
    println!("| consumer | seconds | messages/s | vs baseline |");
    println!("|---|---:|---:|---:|");
    println!(
        "| lapin consume + ack per message | {:.2} | {:.0} | 1.00 |",
        base.as_secs_f64(),
        rate(base)
    );
    println!(
        "| lapin consume + multiple ack per drained batch | {:.2} | {:.0} | {:.2} |",
        multi.as_secs_f64(),
        rate(multi),
        rate(multi) / rate(base)
    );
    println!(
        "| AmqpSource -> outbox (fsync) + multiple ack | {:.2} | {:.0} | {:.2} |",
        ours.as_secs_f64(),
        rate(ours),
        rate(ours) / rate(base)
    );
    for q in [&qa, &qm, &qb] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "bench done".into()).await;
}
