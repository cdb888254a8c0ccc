//! The AMQP source's `[[sources]]` entry (`type = "amqp"`): the queue to
//! consume, how messages become cases, what is declared, and where
//! rejected messages and failure reports go.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::duvo::Priority;
use crate::mapping::MappingConfig;
use crate::report::amqp::{AmqpTarget, Destination};
use crate::secret::Secret;
use crate::source::{check_name, check_routing};

/// What to do with an AMQP message whose body is not a JSON object
/// (plain text, another JSON value, or bytes that are not UTF-8).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UndecodablePolicy {
    /// Make a case anyway: `data` is the text (base64 when not UTF-8) and
    /// the title is `title_fallback`.
    #[default]
    Wrap,
    /// Refuse it: with `dead_letter_exchange` set, the bridge publishes it
    /// there itself (original properties plus an `x-duvo-bridge-reason`
    /// header, confirmed) and then acks it; without, it is nacked without
    /// requeue, so the broker dead-letters it (configure a dead-letter
    /// exchange on the queue, or it is dropped).
    Reject,
}

/// A queue binding declared when `declare = true`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AmqpBinding {
    /// Exchange to bind the queue to (must exist).
    pub exchange: String,
    /// Routing key (binding key) of the binding.
    #[serde(default)]
    pub routing_key: String,
}

/// RabbitMQ (AMQP 0-9-1) source: consumes one queue with manual
/// acknowledgements; a message is acked only after its case is fsync'd in
/// the outbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSourceConfig {
    /// Unique name; appears in metrics and event identities.
    pub name: String,
    /// Broker URI, `amqp://user:password@host:5672/vhost` (`%2f` for the
    /// default vhost) or `amqps://...`. Treated as a secret: logs show
    /// `amqp://user:***@host/vhost`.
    pub uri: Secret,
    /// Queue to consume.
    pub queue: String,
    /// Unacknowledged messages the broker may push ahead (`basic.qos`).
    /// Bounds the memory used while the outbox is paused.
    #[serde(default = "default_amqp_prefetch")]
    pub prefetch: u16,
    /// Consumer tag; empty lets the broker choose one.
    #[serde(default)]
    pub consumer_tag: String,
    /// Duvo queue the cases go to: the default route. Empty (left out)
    /// with `routes`: a message no route matches is rejected (to the
    /// queue's dead-letter exchange, if it has one).
    #[serde(default)]
    pub queue_id: String,
    /// Content-based routes (`[[sources.routes]]`), first match wins, on a
    /// JSON pointer of the message or one of its headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<crate::routing::RouteConfig>,
    /// The Duvo account (`[[duvo.accounts]]` name) whose key and budget
    /// deliver these cases; default: `[duvo]` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Title template: `{/json/pointer}` fields, `{/ptr|fallback}`.
    #[serde(default = "crate::mapping::default_title")]
    pub title: String,
    /// Title when the template renders empty (and for wrapped non-JSON).
    #[serde(default = "crate::mapping::default_title_fallback")]
    pub title_fallback: String,
    /// Labels; values may be templates like the title.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Static priority: none, medium or high.
    #[serde(default)]
    pub priority: Option<Priority>,
    /// JSON pointer whose value (none/medium/high) overrides `priority`.
    #[serde(default)]
    pub priority_field: Option<String>,
    /// JSON pointer of a producer-supplied id used for dedupe when the
    /// message has no `message_id_header` (e.g. `/event_id`).
    #[serde(default)]
    pub message_id_field: Option<String>,
    /// Header carrying a producer-supplied id used for dedupe; checked
    /// before `message_id_field` and the `message_id` property.
    #[serde(default)]
    pub message_id_header: Option<String>,
    /// Policy for bodies that are not a JSON object: `wrap` or `reject`.
    #[serde(default)]
    pub on_undecodable: UndecodablePolicy,
    /// Declare the queue (durable) and its bindings at every (re)connect.
    /// Off: the queue must exist.
    #[serde(default)]
    pub declare: bool,
    /// Bindings declared with the queue when `declare = true`.
    #[serde(default)]
    pub bindings: Vec<AmqpBinding>,
    /// Where rejected messages go (`on_undecodable = "reject"`): the bridge
    /// publishes them there with an `x-duvo-bridge-reason` header. With
    /// `declare = true` it is also declared (durable fanout) and set as the
    /// queue's `x-dead-letter-exchange`; without, it must exist.
    #[serde(default)]
    pub dead_letter_exchange: Option<String>,
    /// Exchange failure reports are published to (persistent, `mandatory`,
    /// with publisher confirms; a report leaves the outbox only once the
    /// broker confirmed it and did not return it as unroutable). Setting it
    /// turns reports on for this source: every report needs this fallback
    /// destination, even with `reply_to_reports`. `""` is the default
    /// exchange (then `failure_routing_key` names a queue).
    #[serde(default)]
    pub failure_exchange: Option<String>,
    /// Routing key of failure reports. Default: the consumed `queue`'s name.
    #[serde(default)]
    pub failure_routing_key: Option<String>,
    /// With `declare = true`: the type of the failure exchange the bridge
    /// declares (durable): `direct`, `fanout`, `topic` or `headers`.
    /// Default `topic`.
    #[serde(default)]
    pub failure_exchange_type: Option<AmqpExchangeType>,
    /// A message with a `reply_to` property gets its report in that queue
    /// (default exchange, routing key = `reply_to`) instead of the failure
    /// exchange; if the broker returns it as unroutable (the reply queue is
    /// gone), the report goes to the failure exchange. Only with
    /// `failure_exchange` set.
    #[serde(default = "crate::source::default_true")]
    pub reply_to_reports: bool,
}

/// Type of an exchange the bridge declares.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AmqpExchangeType {
    Direct,
    Fanout,
    #[default]
    Topic,
    Headers,
}

impl AmqpExchangeType {
    pub fn kind(self) -> lapin::ExchangeKind {
        match self {
            AmqpExchangeType::Direct => lapin::ExchangeKind::Direct,
            AmqpExchangeType::Fanout => lapin::ExchangeKind::Fanout,
            AmqpExchangeType::Topic => lapin::ExchangeKind::Topic,
            AmqpExchangeType::Headers => lapin::ExchangeKind::Headers,
        }
    }
}

fn default_amqp_prefetch() -> u16 {
    200
}

impl AmqpSourceConfig {
    /// A source with every default, consuming `queue` at `uri`.
    pub fn new(name: &str, uri: &str, queue: &str, queue_id: Uuid) -> Self {
        AmqpSourceConfig {
            name: name.to_string(),
            uri: Secret::new(uri),
            queue: queue.to_string(),
            prefetch: default_amqp_prefetch(),
            consumer_tag: String::new(),
            queue_id: queue_id.to_string(),
            routes: Vec::new(),
            account: None,
            title: crate::mapping::default_title(),
            title_fallback: crate::mapping::default_title_fallback(),
            labels: Default::default(),
            priority: None,
            priority_field: None,
            message_id_field: None,
            message_id_header: None,
            on_undecodable: UndecodablePolicy::Wrap,
            declare: false,
            bindings: Vec::new(),
            dead_letter_exchange: None,
            failure_exchange: None,
            failure_routing_key: None,
            failure_exchange_type: None,
            reply_to_reports: true,
        }
    }

    pub fn mapping(&self) -> MappingConfig {
        MappingConfig {
            title: self.title.clone(),
            title_fallback: self.title_fallback.clone(),
            labels: self.labels.clone(),
            priority: self.priority,
            priority_field: self.priority_field.clone(),
        }
    }

    /// The URI with the password replaced by `***`, safe for logs.
    pub fn redacted_uri(&self) -> String {
        crate::secret::redact_amqp_uri(self.uri.expose())
    }

    /// Whether this source sends failure reports: only with a
    /// `failure_exchange`, the destination of every report without a usable
    /// `reply_to`. (A `reply_to`-only setup would leave reports about
    /// messages without `reply_to` with nowhere to go, retried forever.)
    pub fn reports(&self) -> bool {
        self.failure_exchange.is_some()
    }

    /// Routing key of reports sent to the failure exchange.
    pub fn failure_routing_key(&self) -> &str {
        self.failure_routing_key.as_deref().unwrap_or(&self.queue)
    }

    /// Where this source's failure reports go; `None` without a
    /// `failure_exchange` (the only way reports are turned on).
    pub fn report_target(&self) -> Option<AmqpTarget> {
        let exchange = self.failure_exchange.clone()?;
        // The default exchange and the predeclared `amq.*` ones cannot be
        // declared.
        let declare = (self.declare && !exchange.is_empty() && !exchange.starts_with("amq."))
            .then(|| self.failure_exchange_type.unwrap_or_default().kind());
        Some(AmqpTarget {
            source: self.name.clone(),
            uri: self.uri.clone(),
            source_queue: self.queue.clone(),
            failure: Destination {
                exchange,
                routing_key: self.failure_routing_key().to_string(),
            },
            reply_to: self.reply_to_reports,
            declare,
        })
    }

    /// Every problem with this source's `[[sources]]` entry.
    pub fn check(&self) -> Vec<String> {
        let a = self;
        let mut errors = Vec::new();
        let at = format!("sources.{}", a.name);
        check_name(&at, &a.name, &mut errors);
        let uri = a.uri.expose();
        if !(uri.starts_with("amqp://") || uri.starts_with("amqps://")) {
            // Never echo the value: it may hold a password.
            errors.push(format!(
                "{at}.uri must start with amqp:// or amqps:// (got {})",
                a.redacted_uri()
            ));
        } else if let Err(e) = uri.parse::<lapin::uri::AMQPUri>() {
            errors.push(format!(
                "{at}.uri {} is not a valid AMQP URI: {}",
                a.redacted_uri(),
                e.replace(uri, "[uri]")
            ));
        }
        if a.queue.is_empty() {
            errors.push(format!("{at}.queue must not be empty"));
        }
        if a.prefetch == 0 {
            errors.push(format!("{at}.prefetch must be at least 1"));
        }
        check_routing(
            &at,
            &a.queue_id,
            &a.mapping(),
            &a.routes,
            ("message_id_field", a.message_id_field.as_deref()),
            &mut errors,
        );
        if matches!(&a.message_id_header, Some(h) if h.is_empty()) {
            errors.push(format!("{at}.message_id_header must not be empty"));
        }
        if !a.declare && !a.bindings.is_empty() {
            errors.push(format!("{at}: bindings need declare = true"));
        }
        if a.bindings.iter().any(|b| b.exchange.is_empty()) {
            errors.push(format!(
                "{at}.bindings: exchange must not be empty (the default exchange cannot be bound)"
            ));
        }
        if matches!(&a.dead_letter_exchange, Some(x) if x.is_empty()) {
            errors.push(format!("{at}.dead_letter_exchange must not be empty"));
        }
        // AMQP short strings: exchange names and routing keys fit in 255 bytes.
        for (key, v) in [
            ("dead_letter_exchange", a.dead_letter_exchange.as_deref()),
            ("failure_exchange", a.failure_exchange.as_deref()),
            ("failure_routing_key", a.failure_routing_key.as_deref()),
        ] {
            if v.is_some_and(|v| v.len() > 255) {
                errors.push(format!("{at}.{key} must be at most 255 bytes"));
            }
        }
        match a.failure_exchange.as_deref() {
            None => {
                if a.failure_routing_key.is_some() || a.failure_exchange_type.is_some() {
                    errors.push(format!(
                        "{at}: failure_routing_key and failure_exchange_type need failure_exchange"
                    ));
                }
            }
            Some("") => {
                if a.failure_routing_key.as_deref().unwrap_or("").is_empty() {
                    errors.push(format!(
                        "{at}.failure_routing_key must name a queue when failure_exchange is \"\" (the default exchange)"
                    ));
                }
                if a.failure_exchange_type.is_some() {
                    errors.push(format!(
                        "{at}.failure_exchange_type: the default exchange (\"\") cannot be declared"
                    ));
                }
            }
            Some(_) => {
                if a.failure_exchange_type.is_some() && !a.declare {
                    errors.push(format!("{at}.failure_exchange_type needs declare = true"));
                }
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_go_to_the_failure_exchange_keyed_by_the_queue_unless_told() {
        let mut c = AmqpSourceConfig::new("rabbit", "amqp://g:pw@h/%2f", "orders", Uuid::nil());
        assert!(c.report_target().is_none());
        c.failure_exchange = Some("duvo.failures".into());
        let t = c.report_target().unwrap();
        assert_eq!(t.failure.routing_key, "orders");
        assert!(t.reply_to);
        assert_eq!(t.declare, None);
        c.declare = true;
        c.failure_routing_key = Some("failed.orders".into());
        c.reply_to_reports = false;
        let t = c.report_target().unwrap();
        assert_eq!(t.failure.routing_key, "failed.orders");
        assert!(!t.reply_to);
        assert_eq!(t.declare, Some(lapin::ExchangeKind::Topic));
        c.failure_exchange = Some("amq.topic".into());
        assert_eq!(c.report_target().unwrap().declare, None);
    }
}
