//! RabbitMQ (AMQP 0-9-1) source: consumes one queue with manual acks.
//!
//! A delivery is acknowledged only after `Outbox::append` returned for it,
//! i.e. after the fsync that covers it. Deliveries that are immediately
//! available are drained (up to `prefetch`) and appended in one call, then
//! acknowledged with a single `basic.ack multiple=true` on the highest tag:
//! deliveries on one channel are handled strictly in order, so every lower
//! tag is already durable (or was rejected) when that ack leaves.
//!
//! Acks are sent only on the channel the delivery came from, and only while
//! that channel is open. When the connection or channel dies, whatever was
//! not acked is redelivered by the broker and the outbox's dedupe (by
//! message id, or a content hash) absorbs the copies. There is no automatic
//! recovery inside lapin on purpose: a recovered channel reuses delivery
//! tags from 1, so a stale tag could ack the wrong message. Instead an
//! explicit loop reconnects with exponential backoff and opens a new
//! channel and consumer.
//!
//! Undecodable bodies under `on_undecodable = "reject"`: with a
//! `dead_letter_exchange` the bridge publishes the message there itself
//! (original properties, persistent, plus `x-duvo-bridge-reason`) on a
//! confirm channel of the same connection, and the original is acked (on
//! its own channel, with the next ack) only after the broker confirmed that
//! publish; a nack cannot carry a header. Without a dead-letter exchange, or
//! when that publish fails, the delivery is nacked without requeue and the
//! broker dead-letters it (no reason header).
//!
//! Every event carries [`Origin::Amqp`] (queue, `message_id` or the
//! producer id used for dedupe, `correlation_id`, `reply_to`), which the
//! failure reporter uses to address and correlate its reports.
//!
//! Backpressure: while the outbox is over its high-water mark the consumer
//! stream is simply not polled. The broker stops pushing once `prefetch`
//! messages are unacknowledged, so memory stays bounded and nothing is lost.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, Consumer, ExchangeKind};
use sha2::{Digest, Sha256};

pub mod config;

pub use config::{AmqpSourceConfig, UndecodablePolicy};

use super::{Source, SourceContext, SourceError};
use crate::encoding::base64;
use crate::outbox::{NewEvent, Origin};
use crate::raw_json::RawEvent;
use crate::retry::RetryPolicy;
use crate::routing::{Inputs, Router};
use crate::secret::{amqp_uri_password, scrub_password};

/// How long to wait before polling again while the outbox is over high water.
const PAUSE_POLL: Duration = Duration::from_millis(100);
/// Pause after an outbox error before taking deliveries again.
const OUTBOX_ERROR_PAUSE: Duration = Duration::from_secs(1);
/// Longest wait for the confirm of a rejected delivery published to the
/// dead-letter exchange; then the delivery is nacked instead.
const DEAD_LETTER_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Header with the reason of a rejection, on messages the bridge publishes
/// to the dead-letter exchange: `not_json_object`, `not_utf8`,
/// `event_too_large`.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-duvo-bridge-reason";

/// Errors of one broker session. Messages never contain the URI password.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("connecting to {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("{step}: {message}")]
    Broker { step: &'static str, message: String },
}

/// The AMQP intake. Connects lazily in [`Source::run`], so a broker that is
/// down at start-up shows as not ready instead of failing the process.
pub struct AmqpSource {
    cfg: AmqpSourceConfig,
    router: Router,
    redacted_uri: String,
    /// The password, to scrub it from any error text a library produces.
    password: Option<String>,
    reconnect: RetryPolicy,
}

/// Why a session ended.
enum SessionEnd {
    /// `ctx.stop` was cancelled; the session was closed cleanly.
    Stopped,
    /// The connection, channel or consumer went away.
    Lost(String),
}

/// A delivery decoded into a case, or the reason it is refused.
enum Decoded {
    Case(Box<NewEvent>),
    Reject(&'static str),
}

impl AmqpSource {
    /// Validate what can be validated without the broker (mapping, queue id).
    pub fn new(cfg: AmqpSourceConfig) -> Result<AmqpSource, SourceError> {
        let conf_err = |message: String| SourceError::Config {
            source_name: cfg.name.clone(),
            message,
        };
        let router = super::routing(&cfg.name, &cfg.mapping(), &cfg.queue_id, &cfg.routes)?;
        let parsed = cfg
            .uri
            .expose()
            .parse::<lapin::uri::AMQPUri>()
            .map_err(|_| {
                conf_err(format!(
                    "uri {} is not a valid AMQP URI",
                    cfg.redacted_uri()
                ))
            })?;
        let password = amqp_uri_password(&parsed);
        Ok(AmqpSource {
            redacted_uri: cfg.redacted_uri(),
            password,
            router,
            cfg,
            reconnect: RetryPolicy {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(10),
                ..RetryPolicy::default()
            },
        })
    }

    /// Replace the reconnect backoff (tests use short delays).
    pub fn with_reconnect_policy(mut self, policy: RetryPolicy) -> AmqpSource {
        self.reconnect = policy;
        self
    }

    fn scrub(&self, text: String) -> String {
        scrub_password(text, self.password.as_deref())
    }

    fn broker_err(&self, step: &'static str) -> impl Fn(lapin::Error) -> AmqpError + '_ {
        move |e| AmqpError::Broker {
            step,
            message: self.scrub(e.to_string()),
        }
    }

    /// Connect, declare the optional topology, set the prefetch and start
    /// consuming with manual acks.
    async fn open(&self) -> Result<(Connection, Channel, Consumer), AmqpError> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("duvo-bridge:{}", self.cfg.name).into());
        let conn = Connection::connect(self.cfg.uri.expose(), props)
            .await
            .map_err(|e| AmqpError::Connect {
                uri: self.redacted_uri.clone(),
                message: self.scrub(e.to_string()),
            })?;
        let channel = conn
            .create_channel()
            .await
            .map_err(self.broker_err("channel.open"))?;
        if self.cfg.declare {
            let mut args = FieldTable::default();
            if let Some(dlx) = &self.cfg.dead_letter_exchange {
                channel
                    .exchange_declare(
                        dlx.as_str().into(),
                        ExchangeKind::Fanout,
                        ExchangeDeclareOptions {
                            durable: true,
                            ..ExchangeDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(self.broker_err("exchange.declare (dead-letter exchange)"))?;
                args.insert(
                    "x-dead-letter-exchange".into(),
                    AMQPValue::LongString(dlx.as_str().into()),
                );
            }
            channel
                .queue_declare(
                    self.cfg.queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    args,
                )
                .await
                .map_err(self.broker_err("queue.declare"))?;
            for b in &self.cfg.bindings {
                channel
                    .queue_bind(
                        self.cfg.queue.as_str().into(),
                        b.exchange.as_str().into(),
                        b.routing_key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(self.broker_err("queue.bind"))?;
            }
        }
        channel
            .basic_qos(self.cfg.prefetch, BasicQosOptions::default())
            .await
            .map_err(self.broker_err("basic.qos"))?;
        let consumer = channel
            .basic_consume(
                self.cfg.queue.as_str().into(),
                self.cfg.consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(self.broker_err("basic.consume"))?;
        Ok((conn, channel, consumer))
    }

    /// Connect / consume / reconnect until stopped.
    async fn run_loop(self, ctx: SourceContext) {
        let name = self.cfg.name.clone();
        let health_key = format!("source:{name}");
        let connected = metrics::gauge!("duvo_bridge_amqp_connected", "source" => name.clone());
        let reconnects =
            metrics::counter!("duvo_bridge_amqp_reconnects_total", "source" => name.clone());
        connected.set(0.0);
        ctx.health
            .set_unready(&health_key, "connecting to the broker");
        let mut schedule = self.reconnect.new_schedule();
        loop {
            let opened = tokio::select! {
                _ = ctx.stop.cancelled() => break,
                r = self.open() => r,
            };
            let reason = match opened {
                Ok((conn, channel, consumer)) => {
                    schedule.reset();
                    connected.set(1.0);
                    ctx.health.set_ready(&health_key);
                    tracing::info!(
                        source = %name, uri = %self.redacted_uri, queue = %self.cfg.queue,
                        prefetch = self.cfg.prefetch, "AMQP source consuming"
                    );
                    let end = self.consume(&conn, &channel, consumer, &ctx).await;
                    connected.set(0.0);
                    match end {
                        SessionEnd::Stopped => break,
                        SessionEnd::Lost(reason) => {
                            reconnects.increment(1);
                            // Dropping the handles; the broker requeues
                            // whatever this channel left unacked.
                            let _ = conn.close(200, "reconnecting".into()).await;
                            format!("connection lost: {reason}")
                        }
                    }
                }
                Err(e) => e.to_string(),
            };
            let delay = schedule.next_delay();
            tracing::warn!(
                source = %name, error = %reason, retry_in_ms = delay.as_millis() as u64,
                attempt = schedule.attempts(), "AMQP source down; reconnecting"
            );
            ctx.health.set_unready(&health_key, reason);
            tokio::select! {
                _ = ctx.stop.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        ctx.health.set_unready(&health_key, "stopped");
        tracing::info!(source = %name, "AMQP source stopped");
    }

    /// Consume one session until it is lost or `ctx.stop` is cancelled.
    async fn consume(
        &self,
        conn: &Connection,
        channel: &Channel,
        mut consumer: Consumer,
        ctx: &SourceContext,
    ) -> SessionEnd {
        let name = &self.cfg.name;
        let max_batch = usize::from(self.cfg.prefetch).max(1);
        let mut paused = false;
        // Confirm channel for publishing rejected deliveries (opened lazily).
        let mut dlx: Option<Channel> = None;
        loop {
            if ctx.outbox.over_high_water() {
                if !paused {
                    paused = true;
                    tracing::info!(source = %name, "outbox over high water: pausing consumption");
                }
                if !channel.status().connected() {
                    return SessionEnd::Lost("channel closed while paused".into());
                }
                tokio::select! {
                    _ = ctx.stop.cancelled() => break,
                    _ = tokio::time::sleep(PAUSE_POLL) => continue,
                }
            }
            if paused {
                paused = false;
                tracing::info!(source = %name, "outbox below low water: resuming consumption");
            }
            let next = tokio::select! {
                biased;
                _ = ctx.stop.cancelled() => break,
                d = consumer.next() => d,
            };
            let first = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return SessionEnd::Lost(self.scrub(e.to_string())),
                None => return SessionEnd::Lost("consumer cancelled or channel closed".into()),
            };
            let mut batch = vec![first];
            let mut lost = None;
            while batch.len() < max_batch {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(d))) => batch.push(d),
                    Some(Some(Err(e))) => {
                        lost = Some(self.scrub(e.to_string()));
                        break;
                    }
                    Some(None) => {
                        lost = Some("consumer cancelled or channel closed".into());
                        break;
                    }
                    None => break,
                }
            }
            self.persist_and_ack(conn, channel, &mut dlx, batch, ctx)
                .await;
            if let Some(reason) = lost {
                return SessionEnd::Lost(reason);
            }
        }
        self.shutdown(conn, channel, consumer).await;
        SessionEnd::Stopped
    }

    /// Stop consuming, give back what was received but not persisted, close.
    async fn shutdown(&self, conn: &Connection, channel: &Channel, mut consumer: Consumer) {
        let name = &self.cfg.name;
        if let Err(e) = channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
        {
            tracing::warn!(source = %name, error = %self.scrub(e.to_string()), "basic.cancel failed");
        }
        let mut highest = None;
        let mut returned = 0usize;
        while let Some(Some(Ok(d))) = consumer.next().now_or_never() {
            highest = highest.max(Some(d.delivery_tag));
            returned += 1;
        }
        if let Some(tag) = highest
            && channel.status().connected()
        {
            // Everything below `tag` that is still unacked was received
            // after the last persisted batch: requeue it all at once.
            let opts = BasicNackOptions {
                multiple: true,
                requeue: true,
            };
            if let Err(e) = channel.basic_nack(tag, opts).await {
                tracing::warn!(source = %name, error = %self.scrub(e.to_string()), "nack of unpersisted deliveries failed; the broker requeues them on close");
            }
        }
        tracing::info!(source = %name, requeued = returned, "AMQP consumer cancelled");
        let _ = channel.close(200, "duvo-bridge stopping".into()).await;
        let _ = conn.close(200, "duvo-bridge stopping".into()).await;
    }

    /// Publish a rejected delivery to the dead-letter exchange (original
    /// properties, persistent, plus the reason header) on `dlx`, a confirm
    /// channel of the consumer's connection opened on first use, and wait
    /// for the broker's confirm. `Ok` means the broker has it routed; the
    /// caller may then ack the original.
    async fn dead_letter(
        &self,
        conn: &Connection,
        dlx: &mut Option<Channel>,
        exchange: &str,
        d: &Delivery,
        reason: &str,
    ) -> Result<(), String> {
        let ch = match dlx.take() {
            Some(ch) if ch.status().connected() => ch,
            _ => {
                let opened = async {
                    let ch = conn.create_channel().await?;
                    ch.confirm_select(ConfirmSelectOptions::default()).await?;
                    Ok::<_, lapin::Error>(ch)
                }
                .await;
                opened.map_err(|e| format!("opening a channel: {}", self.scrub(e.to_string())))?
            }
        };
        let mut headers = d.properties.headers().clone().unwrap_or_default();
        headers.insert(
            DEAD_LETTER_REASON_HEADER.into(),
            AMQPValue::LongString(reason.into()),
        );
        headers.insert(
            "x-duvo-source-queue".into(),
            AMQPValue::LongString(self.cfg.queue.as_str().into()),
        );
        let props = d
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        let confirmed = tokio::time::timeout(DEAD_LETTER_CONFIRM_TIMEOUT, async {
            ch.basic_publish(
                exchange.into(),
                d.routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &d.data,
                props,
            )
            .await?
            .await
        })
        .await;
        match confirmed {
            // A late confirm could still arrive on this channel: drop it.
            Err(_) => Err(format!(
                "no publisher confirm within {} s",
                DEAD_LETTER_CONFIRM_TIMEOUT.as_secs()
            )),
            Ok(Err(e)) => Err(self.scrub(e.to_string())),
            Ok(Ok(c)) => {
                // One publish at a time on this channel, so a returned
                // message belongs to this confirm.
                *dlx = Some(ch);
                match c {
                    Confirmation::Ack(None) => Ok(()),
                    Confirmation::Ack(Some(_)) => {
                        Err("returned: the dead-letter exchange routes it to no queue".into())
                    }
                    Confirmation::Nack(_) => Err("the broker nacked the publish".into()),
                    Confirmation::NotRequested => Err("channel not in confirm mode".into()),
                }
            }
        }
    }

    /// Append the decodable deliveries in one call, reject the others, then
    /// ack on `channel` if it is still open.
    async fn persist_and_ack(
        &self,
        conn: &Connection,
        channel: &Channel,
        dlx: &mut Option<Channel>,
        batch: Vec<Delivery>,
        ctx: &SourceContext,
    ) {
        let src = self.cfg.name.as_str();
        metrics::counter!("duvo_bridge_events_received_total", "source" => src.to_string())
            .increment(batch.len() as u64);
        let received_at_ms = crate::clock::now_ms();
        let mut events = Vec::with_capacity(batch.len());
        // Deliveries handled (appended, or dead-lettered by the bridge).
        let mut ackable = Vec::with_capacity(batch.len());
        let mut rejects = Vec::new();
        for d in &batch {
            match self.decode(d, received_at_ms, ctx.max_case_bytes) {
                Decoded::Case(ev) => {
                    events.push(*ev);
                    ackable.push(d.delivery_tag);
                }
                Decoded::Reject(reason) => rejects.push((d, reason)),
            }
        }
        if !events.is_empty() {
            match ctx.outbox.append(events).await {
                Ok(outcomes) => {
                    super::count_appended(src, &outcomes);
                }
                Err(e) => {
                    tracing::error!(source = src, error = %e, "outbox append failed; requeueing the deliveries");
                    count_rejected(src, "outbox_error", batch.len());
                    if let Some(tag) = batch.iter().map(|d| d.delivery_tag).max()
                        && channel.status().connected()
                    {
                        let opts = BasicNackOptions {
                            multiple: true,
                            requeue: true,
                        };
                        let _ = channel.basic_nack(tag, opts).await;
                    }
                    tokio::time::sleep(OUTBOX_ERROR_PAUSE).await;
                    return;
                }
            }
        }
        // Rejections first: a nacked delivery must be settled before the
        // multiple-ack below; one published to the dead-letter exchange
        // (confirmed) is acked with it.
        let mut nack_failed = Vec::new();
        for (d, reason) in rejects {
            count_rejected(src, reason, 1);
            if let Some(dlx_name) = &self.cfg.dead_letter_exchange {
                match self.dead_letter(conn, dlx, dlx_name, d, reason).await {
                    Ok(()) => {
                        tracing::warn!(
                            source = src,
                            reason,
                            tag = d.delivery_tag,
                            dead_letter_exchange = %dlx_name,
                            "rejected delivery published to the dead-letter exchange with its reason"
                        );
                        ackable.push(d.delivery_tag);
                        continue;
                    }
                    Err(e) => tracing::warn!(
                        source = src,
                        reason,
                        tag = d.delivery_tag,
                        error = %e,
                        "cannot publish to the dead-letter exchange; nacking (the broker dead-letters it without a reason header)"
                    ),
                }
            } else {
                tracing::warn!(
                    source = src,
                    reason,
                    tag = d.delivery_tag,
                    "rejecting delivery (dead-lettered by the broker if configured)"
                );
            }
            let opts = BasicNackOptions {
                multiple: false,
                requeue: false,
            };
            if let Err(e) = d.acker.nack(opts).await {
                tracing::warn!(source = src, tag = d.delivery_tag, error = %self.scrub(e.to_string()),
                    "nack failed; the delivery stays unacknowledged and the broker redelivers it");
                nack_failed.push(d.delivery_tag);
            }
        }
        for (tag, multiple) in ack_plan(&ackable, &nack_failed) {
            if !channel.status().connected() {
                tracing::debug!(
                    source = src,
                    "channel closed before the ack; the broker redelivers and dedupe absorbs it"
                );
                return;
            }
            if let Err(e) = channel.basic_ack(tag, BasicAckOptions { multiple }).await {
                tracing::warn!(source = src, error = %self.scrub(e.to_string()), "ack failed; the broker redelivers and dedupe absorbs it");
            }
        }
    }

    /// Map one delivery to an outbox event, or say why it is refused.
    fn decode(&self, d: &Delivery, received_at_ms: u64, max_case_bytes: usize) -> Decoded {
        // Text for a wrapped payload (not JSON, or not UTF-8).
        let (json, wrapped): (Option<RawEvent<'_>>, Option<String>) =
            match std::str::from_utf8(&d.data) {
                Ok(text) => match RawEvent::parse(text) {
                    Ok(ev) => (Some(ev), None),
                    _ => match self.cfg.on_undecodable {
                        UndecodablePolicy::Wrap => (None, Some(text.to_string())),
                        UndecodablePolicy::Reject => return Decoded::Reject("not_json_object"),
                    },
                },
                Err(_) => match self.cfg.on_undecodable {
                    UndecodablePolicy::Wrap => (None, Some(base64(&d.data))),
                    UndecodablePolicy::Reject => return Decoded::Reject("not_utf8"),
                },
            };
        let headers = d.properties.headers();
        let header = |name: &str| {
            headers.as_ref().and_then(|t| {
                t.inner()
                    .iter()
                    .find(|(k, _)| k.as_str().eq_ignore_ascii_case(name))
                    .and_then(|(_, v)| amqp_value_id(v))
            })
        };
        let Some(target) = self.router.route(&Inputs {
            event: json.as_ref(),
            header: &header,
            topic: None,
        }) else {
            return Decoded::Reject("no_route");
        };
        let case = match (&json, &wrapped) {
            (Some(ev), _) => target.mapper.map(ev),
            (None, Some(text)) => target.mapper.map_text(text),
            (None, None) => unreachable!("a payload is JSON or wrapped"),
        };
        crate::routing::count_routed(&self.cfg.name, &target.route);
        let size = serde_json::to_vec(&case).map(|v| v.len()).unwrap_or(0);
        if size > max_case_bytes {
            return Decoded::Reject("event_too_large");
        }
        let (identity, producer_id) = self.identity(d, json.as_ref());
        let prop = |p: &Option<lapin::types::ShortString>| {
            p.as_ref()
                .map(|s| s.as_str().to_string())
                .filter(|s| !s.is_empty())
        };
        let origin = Origin::Amqp {
            queue: self.cfg.queue.clone(),
            message_id: prop(d.properties.message_id())
                .or(producer_id.filter(|id| id.len() <= 255)),
            correlation_id: prop(d.properties.correlation_id()),
            reply_to: prop(d.properties.reply_to()),
        };
        Decoded::Case(Box::new(NewEvent {
            source: self.cfg.name.clone(),
            identity: Some(identity),
            queue_id: target.queue_id,
            case,
            received_at_ms,
            origin: Some(origin),
        }))
    }

    /// Dedupe identity: the configured header, else the configured JSON
    /// field, else the `message_id` property, else a SHA-256 of the body.
    ///
    /// Trade-off of the hash: two different messages with byte-identical
    /// bodies and no id become one case (within `retention_hours`). The
    /// alternative (no identity without an id) would turn every redelivery
    /// after a lost ack into a duplicate case, which is the failure this
    /// bridge exists to prevent; producers that legitimately repeat bodies
    /// must set `message_id`.
    ///
    /// Also returns the producer's id (header, field or `message_id`) when
    /// there is one: the report's correlation id.
    fn identity(&self, d: &Delivery, json: Option<&RawEvent<'_>>) -> (String, Option<String>) {
        let src = &self.cfg.name;
        let from_header = self.cfg.message_id_header.as_deref().and_then(|h| {
            d.properties
                .headers()
                .as_ref()
                .and_then(|t| t.inner().get(h))
                .and_then(amqp_value_id)
        });
        let from_field = || {
            let p = self.cfg.message_id_field.as_deref()?;
            json?.pointer(p)?.as_id()
        };
        let from_property = || {
            d.properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_string())
                .filter(|m| !m.is_empty())
        };
        match from_header.or_else(from_field).or_else(from_property) {
            Some(id) => (format!("amqp:{src}:id:{id}"), Some(id)),
            None => {
                let digest = Sha256::digest(&d.data);
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                (format!("amqp:{src}:sha256:{hex}"), None)
            }
        }
    }
}

/// The acks that settle the `ackable` deliveries of a batch without
/// covering any in `nack_failed` (a rejected delivery whose nack failed must
/// stay unacknowledged, so the broker redelivers it and it is rejected
/// again, never dropped by a multiple-ack): one multiple-ack up to the
/// highest ackable tag below the first failed nack, then single acks.
/// `(tag, multiple)` pairs, in order.
fn ack_plan(ackable: &[u64], nack_failed: &[u64]) -> Vec<(u64, bool)> {
    let first_failed = nack_failed.iter().copied().min().unwrap_or(u64::MAX);
    let mut plan = Vec::new();
    if let Some(below) = ackable.iter().copied().filter(|t| *t < first_failed).max() {
        plan.push((below, true));
    }
    let mut above: Vec<u64> = ackable
        .iter()
        .copied()
        .filter(|t| *t > first_failed)
        .collect();
    above.sort_unstable();
    plan.extend(above.into_iter().map(|t| (t, false)));
    plan
}

fn amqp_value_id(v: &AMQPValue) -> Option<String> {
    let s = match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        _ => return None,
    };
    (!s.is_empty()).then_some(s)
}

fn count_rejected(source: &str, reason: &'static str, n: usize) {
    metrics::counter!("duvo_bridge_events_rejected_total", "source" => source.to_string(), "reason" => reason)
        .increment(n as u64);
}

impl Source for AmqpSource {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, anyhow::Result<()>> {
        async move {
            self.run_loop(ctx).await;
            Ok(())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_whose_nack_failed_is_never_covered_by_a_multiple_ack() {
        // Nothing failed: one multiple-ack of the highest tag.
        assert_eq!(ack_plan(&[3, 1, 2, 5], &[]), vec![(5, true)]);
        assert_eq!(ack_plan(&[], &[]), vec![]);
        // The nack of 4 failed: a multiple-ack below it, single acks above.
        assert_eq!(
            ack_plan(&[1, 2, 3, 5, 7, 6], &[4]),
            vec![(3, true), (5, false), (6, false), (7, false)]
        );
        // Two failed nacks: neither is acked, whatever the order.
        let plan = ack_plan(&[1, 3, 5, 7], &[6, 2]);
        assert_eq!(plan, vec![(1, true), (3, false), (5, false), (7, false)]);
        for (tag, multiple) in &plan {
            assert!(![2, 6].contains(tag));
            assert!(!*multiple || *tag < 2);
        }
        // Nothing ackable below the failure: no multiple-ack at all.
        assert_eq!(ack_plan(&[5, 6], &[1]), vec![(5, false), (6, false)]);
    }

    #[test]
    fn uri_password_is_redacted() {
        let cfg = AmqpSourceConfig::new(
            "r",
            "amqp://guest:s3cr3t-pw@127.0.0.1:5672/%2f",
            "q",
            uuid::Uuid::nil(),
        );
        assert_eq!(cfg.redacted_uri(), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert!(!format!("{cfg:?}").contains("s3cr3t"));
        let src = AmqpSource::new(cfg).unwrap();
        assert_eq!(
            src.scrub("auth failed for s3cr3t-pw".into()),
            "auth failed for ***"
        );
        assert_eq!(
            crate::secret::redact_amqp_uri("amqps://u:p@ss@h/v?x=1"),
            "amqps://u:***@h/v"
        );
        assert_eq!(
            crate::secret::redact_amqp_uri("amqp://h:5672"),
            "amqp://h:5672"
        );
    }
}
