//! AMQP failure reporter: publishes each report of an AMQP source to the
//! source's failure exchange, or to the message's `reply_to` queue.
//!
//! A report is acknowledged (and so removed from the outbox) only when the
//! broker confirmed the publish (publisher confirms) *and* did not return it
//! as unroutable (`mandatory`): a report nobody can receive stays in the
//! outbox and is retried until a queue is bound.
//!
//! Destination: a report about a message that had a `reply_to` property
//! goes to the default exchange with routing key = `reply_to` (when
//! `reply_to_reports` allows it); if the broker returns it (the reply queue
//! is gone, as RPC reply queues usually are after a while), it goes to
//! `failure_exchange` / `failure_routing_key` in the same attempt. Every
//! other report goes to the failure exchange directly.
//!
//! The message: body [`Report::body`] (JSON), persistent (delivery mode 2),
//! `content_type` `application/json`, `message_id` = the report id (stable
//! across re-sends, so receivers can drop a copy sent again after a crash),
//! `correlation_id` = the original message's id (its `message_id`, else its
//! configured id header or field, else its `correlation_id`), and headers
//! `x-duvo-case-id` (absent when the API refused the event), `x-duvo-queue-id`,
//! `x-duvo-status`, `x-duvo-reason` (when known), `x-duvo-event-id`,
//! `x-duvo-source-queue` and `x-duvo-source`.
//!
//! Connection: the reporter has its own connection (never the consumer's),
//! opened at the first report and reopened with backoff when it dies; while
//! the backoff runs, sends fail at once as unreachable (the dispatcher
//! retries them). Each publish uses a channel of its own from a small pool,
//! with exactly one publish in flight per channel: lapin hands a returned
//! message to the next confirm of its channel, so with several publishes in
//! flight on one channel a return could be attributed to the wrong report
//! (and an unroutable report would be removed). With `declare = true` the
//! failure exchange is declared (durable) on every new connection.

use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::time::Instant;

use super::{Report, ReportError, Reporter};
use crate::outbox::Origin;
use crate::retry::{RetryPolicy, RetrySchedule};
use crate::secret::Secret;
use crate::secret::{amqp_uri_password, scrub_password};

/// Report headers.
pub const CASE_ID_HEADER: &str = "x-duvo-case-id";
pub const QUEUE_ID_HEADER: &str = "x-duvo-queue-id";
pub const STATUS_HEADER: &str = "x-duvo-status";
pub const REASON_HEADER: &str = "x-duvo-reason";
pub const EVENT_ID_HEADER: &str = "x-duvo-event-id";
pub const SOURCE_QUEUE_HEADER: &str = "x-duvo-source-queue";
pub const SOURCE_HEADER: &str = "x-duvo-source";

/// Longest wait for the broker's confirm of one publish.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a connection (TCP + AMQP handshake + declaration).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the reporter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AmqpReporterError {
    #[error("source {source_name}: {message}")]
    Config {
        source_name: String,
        message: String,
    },
}

/// Where an AMQP source's reports go (its config builds it:
/// `AmqpSourceConfig::report_target`).
#[derive(Debug, Clone)]
pub struct AmqpTarget {
    /// Name of the source (logs, metrics, the `x-duvo-source` header).
    pub source: String,
    /// Broker URI (with its password).
    pub uri: Secret,
    /// The consumed queue, named in reports about events without an AMQP
    /// origin.
    pub source_queue: String,
    /// The failure exchange and routing key.
    pub failure: Destination,
    /// Send a report to its message's `reply_to` queue first.
    pub reply_to: bool,
    /// Declare the failure exchange with this kind on every new connection.
    pub declare: Option<lapin::ExchangeKind>,
}

/// Where one publish goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub exchange: String,
    pub routing_key: String,
}

/// What the broker did with one publish it confirmed.
enum Published {
    Routed,
    /// Returned as unroutable (`mandatory`): reply code and text.
    Returned(String),
}

/// The reporter's connection and its reconnect backoff.
struct ConnState {
    conn: Option<Connection>,
    schedule: RetrySchedule,
    /// No new connection attempt before this instant (backoff).
    retry_at: Option<Instant>,
    last_error: String,
}

/// Publishes the reports of one AMQP source.
pub struct AmqpReporter {
    source: String,
    uri: Secret,
    redacted_uri: String,
    password: Option<String>,
    source_queue: String,
    failure: Destination,
    reply_to: bool,
    /// Declare the failure exchange with this kind on every new connection.
    declare: Option<lapin::ExchangeKind>,
    state: tokio::sync::Mutex<ConnState>,
    /// Open channels in confirm mode, each with no publish in flight.
    idle: Mutex<Vec<Channel>>,
    connected: metrics::Gauge,
    returned: metrics::Counter,
}

impl std::fmt::Debug for AmqpReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpReporter")
            .field("source", &self.source)
            .field("uri", &self.redacted_uri)
            .field("failure", &self.failure)
            .field("reply_to", &self.reply_to)
            .finish()
    }
}

impl AmqpReporter {
    /// The reporter of an AMQP source. It connects on the first send.
    pub fn new(t: AmqpTarget) -> Result<AmqpReporter, AmqpReporterError> {
        let redacted_uri = crate::secret::redact_amqp_uri(t.uri.expose());
        let parsed = t.uri.expose().parse::<lapin::uri::AMQPUri>().map_err(|_| {
            AmqpReporterError::Config {
                source_name: t.source.clone(),
                message: format!("uri {redacted_uri} is not a valid AMQP URI"),
            }
        })?;
        Ok(AmqpReporter {
            connected: metrics::gauge!("duvo_bridge_amqp_reporter_connected", "source" => t.source.clone()),
            returned: metrics::counter!("duvo_bridge_amqp_reports_returned_total", "source" => t.source.clone()),
            source: t.source,
            uri: t.uri,
            redacted_uri,
            password: amqp_uri_password(&parsed),
            source_queue: t.source_queue,
            failure: t.failure,
            reply_to: t.reply_to,
            declare: t.declare,
            state: tokio::sync::Mutex::new(ConnState {
                conn: None,
                schedule: RetryPolicy {
                    initial: Duration::from_millis(200),
                    max: Duration::from_secs(10),
                    ..RetryPolicy::default()
                }
                .new_schedule(),
                retry_at: None,
                last_error: String::new(),
            }),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Where `report` goes, in order: its `reply_to` queue (when allowed),
    /// then the failure exchange.
    pub fn destinations(&self, report: &Report) -> Vec<Destination> {
        let mut out = Vec::with_capacity(2);
        if self.reply_to
            && let Some(Origin::Amqp {
                reply_to: Some(r), ..
            }) = &report.origin
            && !r.is_empty()
            && r.len() <= 255
        {
            out.push(Destination {
                exchange: String::new(),
                routing_key: r.clone(),
            });
        }
        out.push(self.failure.clone());
        out
    }

    /// The message properties of `report` (see the module docs).
    pub fn properties(&self, report: &Report) -> BasicProperties {
        let mut headers = FieldTable::default();
        let mut put = |k: &str, v: String| {
            headers.insert(k.into(), AMQPValue::LongString(v.into()));
        };
        if let Some(c) = report.case_id {
            put(CASE_ID_HEADER, c.to_string());
        }
        put(QUEUE_ID_HEADER, report.queue_id.to_string());
        put(STATUS_HEADER, report.status.as_str().to_string());
        if let Some(r) = &report.reason {
            put(REASON_HEADER, r.clone());
        }
        put(EVENT_ID_HEADER, report.event_id.to_string());
        let (queue, correlation) = match &report.origin {
            Some(Origin::Amqp {
                queue,
                message_id,
                correlation_id,
                ..
            }) => (queue.clone(), message_id.clone().or(correlation_id.clone())),
            _ => (self.source_queue.clone(), None),
        };
        put(SOURCE_QUEUE_HEADER, queue);
        put(SOURCE_HEADER, report.source.clone());
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(report.id.to_string().into())
            .with_app_id("duvo-bridge".into())
            .with_timestamp(report.created_at_ms / 1000)
            .with_headers(headers);
        if let Some(c) = correlation.and_then(short) {
            props = props.with_correlation_id(c);
        }
        props
    }

    fn scrub(&self, text: String) -> String {
        scrub_password(text, self.password.as_deref())
    }

    /// Connect and declare what is configured.
    async fn connect(&self) -> Result<Connection, String> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("duvo-bridge:{}:reports", self.source).into());
        let conn = Connection::connect(self.uri.expose(), props)
            .await
            .map_err(|e| {
                format!(
                    "connecting to {}: {}",
                    self.redacted_uri,
                    self.scrub(e.to_string())
                )
            })?;
        if let Some(kind) = &self.declare {
            let declared = async {
                let ch = conn.create_channel().await?;
                ch.exchange_declare(
                    self.failure.exchange.as_str().into(),
                    kind.clone(),
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                Ok::<_, lapin::Error>(ch)
            }
            .await;
            match declared {
                Ok(ch) => self.give_back(ch),
                Err(e) => {
                    let _ = conn.close(200, "declaration failed".into()).await;
                    return Err(format!(
                        "declaring the failure exchange {:?}: {}",
                        self.failure.exchange,
                        self.scrub(e.to_string())
                    ));
                }
            }
        }
        Ok(conn)
    }

    /// An idle channel in confirm mode, opening the connection if needed
    /// (with backoff between attempts).
    async fn channel(&self) -> Result<Channel, ReportError> {
        loop {
            let ch = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match ch {
                Some(ch) if ch.status().connected() => return Ok(ch),
                Some(_) => continue,
                None => break,
            }
        }
        let mut st = self.state.lock().await;
        // Another send may have connected and pooled a channel meanwhile.
        if let Some(ch) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
            && ch.status().connected()
        {
            return Ok(ch);
        }
        if !st.conn.as_ref().is_some_and(|c| c.status().connected()) {
            if st.conn.take().is_some() {
                self.connected.set(0.0);
                tracing::warn!(source = %self.source, uri = %self.redacted_uri,
                    "AMQP report connection lost; reconnecting");
            }
            if let Some(at) = st.retry_at
                && Instant::now() < at
            {
                return Err(ReportError::Unreachable(format!(
                    "{} (next connection attempt in {} ms)",
                    st.last_error,
                    at.saturating_duration_since(Instant::now()).as_millis()
                )));
            }
            let res = tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
                .await
                .unwrap_or_else(|_| Err(format!("connecting to {}: timed out", self.redacted_uri)));
            match res {
                Ok(conn) => {
                    st.schedule.reset();
                    st.retry_at = None;
                    self.connected.set(1.0);
                    tracing::info!(source = %self.source, uri = %self.redacted_uri,
                        exchange = %self.failure.exchange, "AMQP reporter connected");
                    // Declaring pooled a channel already.
                    if let Some(ch) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
                        st.conn = Some(conn);
                        return Ok(ch);
                    }
                    st.conn = Some(conn);
                }
                Err(e) => {
                    let delay = st.schedule.next_delay();
                    st.retry_at = Some(Instant::now() + delay);
                    st.last_error = e.clone();
                    tracing::warn!(source = %self.source, error = %e,
                        retry_in_ms = delay.as_millis() as u64, attempt = st.schedule.attempts(),
                        "AMQP reporter cannot connect");
                    return Err(ReportError::Unreachable(e));
                }
            }
        }
        let conn = st.conn.as_ref().expect("connected above");
        let opened = async {
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>(ch)
        }
        .await;
        opened.map_err(|e| {
            ReportError::Unreachable(format!("opening a channel: {}", self.scrub(e.to_string())))
        })
    }

    fn give_back(&self, ch: Channel) {
        if ch.status().connected() {
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(ch);
        }
    }

    /// Publish once and wait for the broker's confirm. The channel goes
    /// back to the pool only when its one publish is settled.
    async fn publish(
        &self,
        dest: &Destination,
        body: &[u8],
        props: BasicProperties,
        report_id: &str,
    ) -> Result<Published, ReportError> {
        let ch = self.channel().await?;
        let confirmed = tokio::time::timeout(CONFIRM_TIMEOUT, async {
            ch.basic_publish(
                dest.exchange.as_str().into(),
                dest.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                props,
            )
            .await?
            .await
        })
        .await;
        let confirmation = match confirmed {
            Err(_) => {
                // A confirm may still arrive on this channel: never reuse it.
                let _ = ch.close(200, "confirm timed out".into()).await;
                return Err(ReportError::Unreachable(format!(
                    "no publisher confirm within {} s",
                    CONFIRM_TIMEOUT.as_secs()
                )));
            }
            Ok(Err(e)) => {
                // Channel-level errors (e.g. 404 for a missing exchange)
                // close the channel; the connection may still be fine.
                let text = format!("publishing to {dest:?}: {}", self.scrub(e.to_string()));
                let channel_level = matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
                    if matches!(p.kind(), lapin::protocol::AMQPErrorKind::Soft(_)));
                return Err(if channel_level {
                    ReportError::Refused(text)
                } else {
                    ReportError::Unreachable(text)
                });
            }
            Ok(Ok(c)) => c,
        };
        match confirmation {
            Confirmation::Ack(None) => {
                self.give_back(ch);
                Ok(Published::Routed)
            }
            Confirmation::Ack(Some(ret)) => {
                self.give_back(ch);
                let ours = ret
                    .delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .is_some_and(|m| m.as_str() == report_id);
                if !ours {
                    return Err(ReportError::Refused(
                        "the broker returned another message with this confirm".into(),
                    ));
                }
                Ok(Published::Returned(format!(
                    "{} {}",
                    ret.reply_code,
                    ret.reply_text.as_str()
                )))
            }
            Confirmation::Nack(_) => {
                self.give_back(ch);
                Err(ReportError::Refused(format!(
                    "the broker nacked the publish to {dest:?}"
                )))
            }
            Confirmation::NotRequested => {
                Err(ReportError::Refused("channel not in confirm mode".into()))
            }
        }
    }
}

/// `s` as an AMQP short string, `None` when it does not fit (255 bytes).
fn short(s: String) -> Option<ShortString> {
    (s.len() <= 255).then(|| s.into())
}

impl Reporter for AmqpReporter {
    fn kind(&self) -> &'static str {
        "amqp"
    }

    fn send<'a>(&'a self, report: &'a Report) -> BoxFuture<'a, Result<(), ReportError>> {
        Box::pin(async move {
            let body = report.body();
            let props = self.properties(report);
            let report_id = report.id.to_string();
            let mut last = None;
            for dest in self.destinations(report) {
                match self
                    .publish(&dest, &body, props.clone(), &report_id)
                    .await?
                {
                    Published::Routed => return Ok(()),
                    Published::Returned(why) => {
                        self.returned.increment(1);
                        tracing::warn!(source = %self.source, report = report.id,
                            exchange = %dest.exchange, routing_key = %dest.routing_key, reason = %why,
                            "report returned as unroutable; kept");
                        last = Some(ReportError::Refused(format!(
                            "unroutable: exchange {:?}, routing key {:?} ({why})",
                            dest.exchange, dest.routing_key
                        )));
                    }
                }
            }
            Err(last.expect("there is always a failure exchange destination"))
        })
    }

    /// The first place the report is published to: the `reply_to` queue
    /// (default exchange, routing key = the queue) when it is used, else
    /// the failure exchange and routing key.
    fn destination(&self, report: &Report) -> String {
        let first = self.destinations(report).swap_remove(0);
        format!(
            "exchange {:?} routing key {:?}",
            first.exchange, first.routing_key
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::EventId;
    use crate::report::ReportStatus;

    fn cfg() -> AmqpTarget {
        AmqpTarget {
            source: "rabbit".into(),
            uri: Secret::new("amqp://guest:s3cr3t-pw@127.0.0.1:5672/%2f"),
            source_queue: "orders".into(),
            failure: Destination {
                exchange: "duvo.failures".into(),
                routing_key: "orders".into(),
            },
            reply_to: true,
            declare: None,
        }
    }

    fn report(origin: Option<Origin>) -> Report {
        Report {
            id: 42,
            source: "rabbit".into(),
            event_id: EventId(7),
            origin,
            queue_id: uuid::Uuid::nil(),
            case_id: Some(uuid::Uuid::from_u128(5)),
            status: ReportStatus::Failed,
            reason: Some("case failed".into()),
            case_updated_at: None,
            title: "t".into(),
            event: Some("{\"a\":1}".into()),
            created_at_ms: 1_700_000_000_000,
            attempts: 0,
        }
    }

    fn amqp_origin(message_id: Option<&str>, reply_to: Option<&str>) -> Option<Origin> {
        Some(Origin::Amqp {
            queue: "orders-eu".into(),
            message_id: message_id.map(Into::into),
            correlation_id: Some("corr-1".into()),
            reply_to: reply_to.map(Into::into),
        })
    }

    #[test]
    fn reply_to_goes_first_then_the_failure_exchange() {
        let r = AmqpReporter::new(cfg()).unwrap();
        let failure = Destination {
            exchange: "duvo.failures".into(),
            routing_key: "orders".into(),
        };
        assert_eq!(r.destinations(&report(None)), vec![failure.clone()]);
        assert_eq!(
            r.destinations(&report(amqp_origin(Some("m"), None))),
            vec![failure.clone()]
        );
        assert_eq!(
            r.destinations(&report(amqp_origin(Some("m"), Some("rpc.reply")))),
            vec![
                Destination {
                    exchange: String::new(),
                    routing_key: "rpc.reply".into()
                },
                failure.clone()
            ]
        );
        let mut c = cfg();
        c.reply_to = false;
        c.failure.routing_key = "failed.orders".into();
        let r = AmqpReporter::new(c).unwrap();
        assert_eq!(
            r.destinations(&report(amqp_origin(Some("m"), Some("rpc.reply")))),
            vec![Destination {
                exchange: "duvo.failures".into(),
                routing_key: "failed.orders".into()
            }]
        );
    }

    #[test]
    fn properties_carry_ids_and_headers() {
        let r = AmqpReporter::new(cfg()).unwrap();
        let p = r.properties(&report(amqp_origin(Some("m-1"), None)));
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), "42");
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "m-1");
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        let h = p.headers().as_ref().unwrap().inner();
        let get = |k: &str| match h.get(k) {
            Some(AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            _ => None,
        };
        assert_eq!(
            get(CASE_ID_HEADER).unwrap(),
            uuid::Uuid::from_u128(5).to_string()
        );
        assert_eq!(get(QUEUE_ID_HEADER).unwrap(), uuid::Uuid::nil().to_string());
        assert_eq!(get(STATUS_HEADER).unwrap(), "failed");
        assert_eq!(get(REASON_HEADER).unwrap(), "case failed");
        assert_eq!(get(EVENT_ID_HEADER).unwrap(), "7");
        assert_eq!(get(SOURCE_QUEUE_HEADER).unwrap(), "orders-eu");
        assert_eq!(get(SOURCE_HEADER).unwrap(), "rabbit");
        // No message id: the original correlation id; no AMQP origin: the
        // configured queue and no correlation id; no case: no case header.
        let p = r.properties(&report(amqp_origin(None, None)));
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "corr-1");
        let mut rejected = report(None);
        rejected.case_id = None;
        rejected.status = ReportStatus::Rejected;
        let p = r.properties(&rejected);
        assert!(p.correlation_id().is_none());
        let h = p.headers().as_ref().unwrap().inner();
        assert!(h.get(CASE_ID_HEADER).is_none());
        assert!(
            matches!(h.get(SOURCE_QUEUE_HEADER), Some(AMQPValue::LongString(s)) if s.as_bytes() == b"orders")
        );
    }

    #[test]
    fn debug_and_errors_never_show_the_password() {
        let r = AmqpReporter::new(cfg()).unwrap();
        let dbg = format!("{r:?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
        assert!(dbg.contains("guest:***@"), "{dbg}");
        assert_eq!(r.scrub("denied for s3cr3t-pw".into()), "denied for ***");
    }

    #[tokio::test]
    async fn an_unreachable_broker_is_an_unreachable_error_without_the_password() {
        let mut c = cfg();
        // Nothing listens on port 1.
        c.uri = Secret::new("amqp://guest:s3cr3t-pw@127.0.0.1:1/%2f");
        let r = AmqpReporter::new(c).unwrap();
        let e = r.send(&report(None)).await.unwrap_err();
        assert!(matches!(e, ReportError::Unreachable(_)), "{e}");
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
        // Within the backoff the next send fails at once, same kind.
        let e = r.send(&report(None)).await.unwrap_err();
        assert!(e.to_string().contains("next connection attempt"), "{e}");
    }
}
