//! Typed configuration (TOML), with defaults and validation that reports
//! every problem at once.
//!
//! The doc comments on the fields are the user documentation: they are what
//! `config/duvo-bridge.example.toml` explains. Every struct denies unknown
//! fields, so a typo is an error rather than a silently ignored setting.
//!
//! Loading is two-phase: each section is deserialised on its own so that one
//! bad section does not hide the errors of the others, then semantic checks
//! (addresses, queue ids, templates, secrets present) run over the result.
//! `duvo-bridge validate` prints every error and exits 64 (EX_USAGE).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::duvo::Priority;
use crate::mapping::{Mapper, MappingConfig};
use crate::secret::{ApiKey, Secret};

pub mod env;

/// Exit code for a bad configuration (sysexits EX_USAGE / EX_CONFIG family).
pub const EXIT_BAD_CONFIG: i32 = 64;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub duvo: DuvoConfig,
    #[serde(default)]
    pub outbox: OutboxSection,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub tracking: TrackingConfig,
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
}

/// Case tracking: follow every created case until it ends, and report
/// failures back to the source the event came from.
///
/// Tracking lists each queue's finished cases (filtered by status and by
/// `updated_at` from a persisted watermark, 100 per request), so it costs
/// about one request per 100 finished cases plus one per poll interval per
/// queue, from the same per-key budget as creates (at most `share` of it
/// while creates are waiting; never starved).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingConfig {
    /// Follow created cases at all. Off: delivered events are forgotten at
    /// once and no report is ever sent for a case (rejected events are
    /// still reported).
    pub enabled: bool,
    /// Largest share of the rate budget tracking takes while creates are
    /// waiting, in (0, 1].
    pub share: f64,
    /// Longest time between two listings of a queue with unfinished cases.
    /// Listing goes on back to back while pages come back full.
    pub poll_interval_ms: u64,
    /// Time between two listings of a queue whose tracked cases have all
    /// ended failed or canceled (watched only for a retry in Duvo).
    pub watch_interval_ms: u64,
    /// Each listing starts this far before the watermark, to catch updates
    /// the server commits out of `updated_at` order. Re-read cases are
    /// recognised and cost no report, but they fill pages: on a busy queue
    /// every listing re-reads what changed in this span. 0 (the default)
    /// trusts the server's ordering, as the API contract does.
    pub lookback_ms: u64,
    /// A case still unfinished this long after it was created is reported
    /// `expired` and no longer followed; a failed one stops being watched.
    pub ttl_hours: u64,
    /// Case statuses reported back to the source: any of `failed`,
    /// `canceled`, `needs_input`, `postponed`, `completed`. Events the API
    /// refused (`rejected`) and cases past the TTL (`expired`) are always
    /// reported.
    pub report: Vec<crate::report::ReportStatus>,
    /// Reports in flight at once per source.
    pub report_concurrency: usize,
    /// First retry delay of a report destination that did not acknowledge a
    /// report, ms (doubles up to `report_retry_max_ms`, per destination;
    /// reports are never dropped).
    pub report_retry_initial_ms: u64,
    pub report_retry_max_ms: u64,
}

impl Default for TrackingConfig {
    fn default() -> Self {
        TrackingConfig {
            enabled: true,
            share: 0.1,
            poll_interval_ms: 2000,
            watch_interval_ms: 30_000,
            lookback_ms: 0,
            ttl_hours: 72,
            report: vec![
                crate::report::ReportStatus::Failed,
                crate::report::ReportStatus::Canceled,
            ],
            report_concurrency: 8,
            report_retry_initial_ms: 500,
            report_retry_max_ms: 60_000,
        }
    }
}

/// How to reach the Duvo API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DuvoConfig {
    /// Scheme, host and port of the API (no version prefix).
    pub base_url: String,
    /// Version prefix appended to `base_url`.
    pub version_prefix: String,
    /// Name of the environment variable holding the API key.
    pub api_key_env: Option<String>,
    /// File holding the API key (e.g. a mounted Kubernetes secret).
    /// Surrounding whitespace is trimmed.
    pub api_key_file: Option<PathBuf>,
    /// Name of a systemd credential holding the API key
    /// (`LoadCredential=<name>:<path>` in the unit): the key is read from
    /// `$CREDENTIALS_DIRECTORY/<name>`, a file only this service can read.
    pub api_key_credential: Option<String>,
    /// The key itself. Discouraged (it ends up in a file readable by whoever
    /// reads the config); prefer `api_key_env` or `api_key_file`.
    pub api_key: Option<Secret>,
    /// Requests per minute this bridge may send with this key (all endpoints).
    pub rate_limit_per_minute: u32,
    /// Share of the key's budget this replica takes when several replicas
    /// share one key (e.g. 0.33 each for three replicas).
    pub rate_share: f64,
    /// Requests that may leave back to back before pacing applies.
    pub burst: u32,
    /// Whole-request timeout, seconds. A timeout is retried with the same
    /// idempotency key.
    pub timeout_secs: u64,
}

impl Default for DuvoConfig {
    fn default() -> Self {
        DuvoConfig {
            base_url: "http://127.0.0.1:8088".into(),
            version_prefix: "/v2".into(),
            api_key_env: Some("DUVO_API_KEY".into()),
            api_key_file: None,
            api_key_credential: None,
            api_key: None,
            rate_limit_per_minute: 300,
            rate_share: 1.0,
            burst: 3,
            timeout_secs: 30,
        }
    }
}

impl DuvoConfig {
    /// Resolve the API key from `api_key`, `api_key_file`,
    /// `api_key_credential` or `api_key_env`, in that order.
    pub fn resolve_api_key(&self) -> Result<ApiKey, String> {
        if let Some(k) = &self.api_key {
            if k.is_empty() {
                return Err("duvo.api_key is empty".into());
            }
            return Ok(ApiKey::new(k.expose()));
        }
        if let Some(path) = &self.api_key_file {
            return match std::fs::read_to_string(path) {
                Ok(s) if !s.trim().is_empty() => Ok(ApiKey::new(s.trim())),
                Ok(_) => Err(format!("duvo.api_key_file {} is empty", path.display())),
                Err(e) => Err(format!(
                    "duvo.api_key_file {} cannot be read: {e}",
                    path.display()
                )),
            };
        }
        if let Some(name) = &self.api_key_credential {
            return read_credential("duvo.api_key_credential", name).map(ApiKey::new);
        }
        if let Some(var) = &self.api_key_env {
            return match std::env::var(var) {
                Ok(s) if !s.trim().is_empty() => Ok(ApiKey::new(s.trim())),
                _ => Err(format!(
                    "duvo.api_key_env: environment variable {var} is not set or empty"
                )),
            };
        }
        Err("duvo: no API key configured (set api_key_env, api_key_file or api_key)".into())
    }
}

/// The durable outbox on local disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxSection {
    /// Directory of the sled database. Must be on a persistent volume.
    pub path: PathBuf,
    /// Above this many undelivered events, sources stop taking new input
    /// (HTTP answers 503 with Retry-After; brokers are paused).
    pub high_water_events: u64,
    /// Intake resumes below this many undelivered events.
    pub low_water_events: u64,
    /// Above this many bytes on disk, intake stops as for `high_water_events`.
    pub high_water_bytes: u64,
    /// How long delivered events are remembered so a re-sent event (same
    /// idempotency key or event id) is recognised and not delivered twice.
    pub retention_hours: u64,
    /// Not a file key: `run --accept-outbox-loss` sets it, for the one
    /// start after an outbox was found to have lost data.
    #[serde(skip)]
    pub accept_data_loss: bool,
}

impl Default for OutboxSection {
    fn default() -> Self {
        OutboxSection {
            path: PathBuf::from("/var/lib/duvo-bridge"),
            high_water_events: 1_000_000,
            low_water_events: 800_000,
            high_water_bytes: 8 * 1024 * 1024 * 1024,
            retention_hours: 24,
            accept_data_loss: false,
        }
    }
}

/// Batching and retries.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Most cases per create request (the API allows 100).
    pub max_batch: usize,
    /// Most bytes per create request body (the API allows 1 MiB).
    pub max_batch_bytes: usize,
    /// How long to wait for a fuller batch once the first event is ready.
    pub linger_ms: u64,
    /// First retry delay after a transient fault, milliseconds.
    pub retry_initial_ms: u64,
    /// Longest retry delay, milliseconds. Transient faults are retried forever.
    pub retry_max_ms: u64,
    /// Requests in flight at once per API key.
    pub max_in_flight: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            max_batch: 100,
            max_batch_bytes: 1_000_000,
            linger_ms: 200,
            retry_initial_ms: 250,
            retry_max_ms: 30_000,
            max_in_flight: 4,
        }
    }
}

/// Admin HTTP listener: `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9090".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// Logging. `RUST_LOG` overrides `level` when set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `pretty` for humans, `json` for log shippers.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `info,duvo_bridge::deliver=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

/// Graceful shutdown.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// On SIGTERM/SIGINT: stop intake, then keep delivering for at most this
    /// long before exiting. Whatever is not delivered stays in the outbox.
    pub grace_period_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace_period_secs: 20,
        }
    }
}

impl ShutdownConfig {
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.grace_period_secs)
    }
}

/// One intake. `type` selects the kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceConfig {
    Http(HttpSourceConfig),
    Amqp(AmqpSourceConfig),
    Kafka(KafkaSourceConfig),
}

impl SourceConfig {
    /// Whether the source has somewhere to send failure reports.
    pub fn reports(&self) -> bool {
        match self {
            SourceConfig::Http(h) => h.reports(),
            SourceConfig::Amqp(a) => a.reports(),
            SourceConfig::Kafka(k) => k.failure_topic.is_some(),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            SourceConfig::Http(h) => &h.name,
            SourceConfig::Amqp(a) => &a.name,
            SourceConfig::Kafka(k) => &k.name,
        }
    }
}

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
    /// Duvo queue the cases go to.
    pub queue_id: String,
    /// Title template: `{/json/pointer}` fields, `{/ptr|fallback}`.
    #[serde(default = "default_title")]
    pub title: String,
    /// Title when the template renders empty (and for wrapped non-JSON).
    #[serde(default = "default_title_fallback")]
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
    #[serde(default = "default_true")]
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

fn default_true() -> bool {
    true
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
            title: default_title(),
            title_fallback: default_title_fallback(),
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
        redact_amqp_uri(self.uri.expose())
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
}

/// `amqp://user:secret@host/vhost` -> `amqp://user:***@host/vhost`. Anything
/// that does not look like a URI with credentials is reduced to its scheme
/// and host part so a malformed value cannot leak a password either.
pub fn redact_amqp_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return "[unparseable uri]".into();
    };
    // Authority ends at the first '/', '?' or '#'; the password may contain
    // anything else, so the last '@' in the authority separates userinfo.
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let tail = tail.split(['?', '#']).next().unwrap_or("");
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => format!("{scheme}://{authority}{tail}"),
    }
}

/// What to do with a Kafka record whose value is not a JSON object (plain
/// text, another JSON value, bytes that are not UTF-8, an empty value).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum KafkaUndecodablePolicy {
    /// Make a case anyway: `data` is the text (base64 when not UTF-8) and
    /// the title is `title_fallback`.
    #[default]
    Wrap,
    /// Produce the record unchanged (key, value, headers, plus
    /// `duvo-bridge-error` and the source topic/partition/offset headers) to
    /// `dead_letter_topic`, then move on.
    DeadLetter,
}

/// Per-topic routing: the cases of records from `topic` go to this queue
/// with this mapping. Keys left out are taken from the source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KafkaRoute {
    /// A topic from `topics` (exact name).
    pub topic: String,
    /// Duvo queue for this topic's cases.
    #[serde(default)]
    pub queue_id: Option<String>,
    /// Title template for this topic.
    #[serde(default)]
    pub title: Option<String>,
    /// Title when the template renders empty (and for wrapped non-JSON).
    #[serde(default)]
    pub title_fallback: Option<String>,
    /// Labels for this topic (replace the source's labels).
    #[serde(default)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    /// Static priority for this topic.
    #[serde(default)]
    pub priority: Option<Priority>,
    /// JSON pointer whose value overrides `priority`.
    #[serde(default)]
    pub priority_field: Option<String>,
}

/// librdkafka settings passed through unchanged (`[sources.librdkafka]`),
/// e.g. `"security.protocol" = "ssl"`. Values may be strings, numbers or
/// booleans. Values of secret-looking keys (anything containing `password`
/// or `secret`, and `ssl.key.pem`, `sasl.oauthbearer.config`) are kept as
/// [`Secret`]s and shown as `[redacted]` in `--print-config`, logs, errors
/// and `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct LibrdkafkaSettings(std::collections::BTreeMap<String, Secret>);

impl LibrdkafkaSettings {
    /// Whether the value of `key` must never be shown.
    pub fn is_secret_key(key: &str) -> bool {
        let k = key.to_ascii_lowercase();
        k.contains("password")
            || k.contains("secret")
            || matches!(k.as_str(), "ssl.key.pem" | "sasl.oauthbearer.config")
    }

    pub fn insert(&mut self, key: &str, value: &str) {
        self.0.insert(key.to_string(), Secret::new(value));
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(Secret::expose)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// Every setting with its real value (to hand to librdkafka only).
    pub fn iter_exposed(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.expose()))
    }

    /// Every setting, secret values replaced by `[redacted]`.
    pub fn iter_redacted(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| {
            let shown = if Self::is_secret_key(k) {
                crate::secret::REDACTED
            } else {
                v.expose()
            };
            (k.as_str(), shown)
        })
    }

    /// The secret values, to scrub them from text a library produced.
    pub fn secret_values(&self) -> impl Iterator<Item = &str> {
        self.0
            .iter()
            .filter(|(k, _)| Self::is_secret_key(k))
            .map(|(_, v)| v.expose())
    }
}

impl std::fmt::Debug for LibrdkafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter_redacted()).finish()
    }
}

impl Serialize for LibrdkafkaSettings {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.iter_redacted() {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for LibrdkafkaSettings {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            S(String),
            I(i64),
            F(f64),
            B(bool),
        }
        let raw = std::collections::BTreeMap::<String, Scalar>::deserialize(d)?;
        Ok(LibrdkafkaSettings(
            raw.into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        Scalar::S(s) => s,
                        Scalar::I(i) => i.to_string(),
                        Scalar::F(f) => f.to_string(),
                        Scalar::B(b) => b.to_string(),
                    };
                    (k, Secret::new(v))
                })
                .collect(),
        ))
    }
}

/// Kafka source: a consumer-group member (librdkafka) reading `topics`.
/// Offsets are stored only once every record below them is fsync'd in the
/// outbox, and committed every `auto.commit.interval.ms` (1 s unless set in
/// `[sources.librdkafka]`) and when partitions are revoked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Unique name; appears in metrics and event identities.
    pub name: String,
    /// Bootstrap brokers, `host:port[,host:port...]` (`bootstrap.servers`).
    pub brokers: String,
    /// Consumer group; replicas with the same group share the partitions.
    pub group_id: String,
    /// Topics to consume (a name starting with `^` is a regex subscription).
    pub topics: Vec<String>,
    /// Static group membership (`group.instance.id`): a replica that
    /// restarts within `session.timeout.ms` (45 s by default) gets its
    /// partitions back without a rebalance, so the records it had stored but
    /// not yet committed are re-read by *it* and deduplicated by its own
    /// outbox. Strongly recommended with several replicas; each replica
    /// needs its own value.
    #[serde(default)]
    pub group_instance_id: Option<String>,
    /// Environment variable holding `group_instance_id` (e.g. the pod name
    /// of a StatefulSet), for replicas that share one config file.
    #[serde(default)]
    pub group_instance_id_env: Option<String>,
    /// Duvo queue the cases go to (per topic: `routes`).
    pub queue_id: String,
    /// Title template: `{/json/pointer}` fields, `{/ptr|fallback}`.
    #[serde(default = "default_title")]
    pub title: String,
    /// Title when the template renders empty (and for wrapped non-JSON).
    #[serde(default = "default_title_fallback")]
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
    /// Per-topic queue and mapping (`[[sources.routes]]`); topics without a
    /// route use the keys above.
    #[serde(default)]
    pub routes: Vec<KafkaRoute>,
    /// Record header carrying a producer-supplied id used for dedupe
    /// (checked before `message_id_field`). Without either, a record's
    /// identity is its topic, partition and offset.
    #[serde(default)]
    pub message_id_header: Option<String>,
    /// JSON pointer of a producer-supplied id used for dedupe when the
    /// record has no `message_id_header` (e.g. `/event_id`).
    #[serde(default)]
    pub message_id_field: Option<String>,
    /// Policy for values that are not a JSON object: `wrap` or
    /// `dead_letter` (needs `dead_letter_topic`).
    #[serde(default)]
    pub on_undecodable: KafkaUndecodablePolicy,
    /// Topic for records that cannot become a case (undecodable with
    /// `on_undecodable = "dead_letter"`, or too large for the API). Without
    /// it, a too-large record is logged with its coordinates and skipped.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Topic for failure reports (a case ended failed, or the API refused
    /// the event): keyed by the original record key, with headers naming the
    /// source topic/partition/offset, case id, status and report id.
    #[serde(default)]
    pub failure_topic: Option<String>,
    /// Most records appended to the outbox in one call (one fsync).
    #[serde(default = "default_kafka_max_batch")]
    pub max_batch: usize,
    /// When the consumer is handed records with a hole in their offsets
    /// (after the offset stored last, or between two records of a batch),
    /// store only up to the hole and read the partition again from it,
    /// once: a broker that skipped records by mistake hands them over then,
    /// and a hole that is still there is accepted (compaction, transaction
    /// markers). Either way it is logged and counted
    /// (`duvo_bridge_kafka_offset_gaps_total`). Set to false for compacted
    /// or transactional topics to save the re-reads.
    #[serde(default = "default_true")]
    pub reread_offset_gaps: bool,
    /// librdkafka settings passed through (TLS, SASL, timeouts...). The
    /// bridge sets `bootstrap.servers`, `group.id`, `group.instance.id`,
    /// `enable.auto.offset.store` (false), `enable.auto.commit` (true),
    /// `enable.idempotence` and `acks` itself; defaults it sets unless given
    /// here: `auto.offset.reset = "earliest"`, `auto.commit.interval.ms =
    /// 1000`, `statistics.interval.ms = 5000`.
    #[serde(default)]
    pub librdkafka: LibrdkafkaSettings,
}

fn default_kafka_max_batch() -> usize {
    1000
}

/// librdkafka keys the bridge sets itself, with the config key to use instead.
pub const KAFKA_RESERVED_KEYS: &[(&str, &str)] = &[
    ("bootstrap.servers", "brokers"),
    ("metadata.broker.list", "brokers"),
    ("group.id", "group_id"),
    ("group.instance.id", "group_instance_id"),
    (
        "enable.auto.offset.store",
        "(always false: offsets are stored after the fsync)",
    ),
    (
        "enable.auto.commit",
        "(always true: stored offsets are committed periodically)",
    ),
    (
        "enable.idempotence",
        "(always true for the failure and dead-letter producers)",
    ),
    ("acks", "(always all)"),
    ("request.required.acks", "(always all)"),
    ("enable.partition.eof", "(not used)"),
    ("transactional.id", "(not used)"),
];

impl KafkaSourceConfig {
    /// A source with every default, consuming `topics` from `brokers`.
    pub fn new(name: &str, brokers: &str, group_id: &str, topics: &[&str], queue_id: Uuid) -> Self {
        KafkaSourceConfig {
            name: name.to_string(),
            brokers: brokers.to_string(),
            group_id: group_id.to_string(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            group_instance_id: None,
            group_instance_id_env: None,
            queue_id: queue_id.to_string(),
            title: default_title(),
            title_fallback: default_title_fallback(),
            labels: Default::default(),
            priority: None,
            priority_field: None,
            routes: Vec::new(),
            message_id_header: None,
            message_id_field: None,
            on_undecodable: KafkaUndecodablePolicy::Wrap,
            dead_letter_topic: None,
            failure_topic: None,
            max_batch: default_kafka_max_batch(),
            reread_offset_gaps: true,
            librdkafka: LibrdkafkaSettings::default(),
        }
    }

    /// The source-wide mapping (topics without a route).
    pub fn mapping(&self) -> MappingConfig {
        MappingConfig {
            title: self.title.clone(),
            title_fallback: self.title_fallback.clone(),
            labels: self.labels.clone(),
            priority: self.priority,
            priority_field: self.priority_field.clone(),
        }
    }

    /// A route's mapping and queue id, with the source's keys filled in.
    pub fn route_mapping(&self, r: &KafkaRoute) -> (MappingConfig, String) {
        let m = MappingConfig {
            title: r.title.clone().unwrap_or_else(|| self.title.clone()),
            title_fallback: r
                .title_fallback
                .clone()
                .unwrap_or_else(|| self.title_fallback.clone()),
            labels: r.labels.clone().unwrap_or_else(|| self.labels.clone()),
            priority: r.priority.or(self.priority),
            priority_field: r
                .priority_field
                .clone()
                .or_else(|| self.priority_field.clone()),
        };
        (
            m,
            r.queue_id.clone().unwrap_or_else(|| self.queue_id.clone()),
        )
    }

    /// `group_instance_id`, or the value of `group_instance_id_env`.
    pub fn group_instance_id(&self) -> Result<Option<String>, String> {
        match (&self.group_instance_id, &self.group_instance_id_env) {
            (Some(_), Some(_)) => Err(format!(
                "sources.{}: set group_instance_id or group_instance_id_env, not both",
                self.name
            )),
            (Some(id), None) if id.is_empty() => Err(format!(
                "sources.{}.group_instance_id must not be empty",
                self.name
            )),
            (Some(id), None) => Ok(Some(id.clone())),
            (None, Some(var)) => match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_string())),
                _ => Err(format!(
                    "sources.{}.group_instance_id_env: environment variable {var} is not set or empty",
                    self.name
                )),
            },
            (None, None) => Ok(None),
        }
    }
}

/// HTTP inbound source: `POST /v1/events` (JSON object, array or NDJSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSourceConfig {
    /// Unique name; appears in metrics and event identities.
    pub name: String,
    /// Address to listen on.
    #[serde(default = "default_http_listen")]
    pub listen: String,
    /// Duvo queue the cases go to.
    pub queue_id: String,
    /// Title template: `{/json/pointer}` fields, `{/ptr|fallback}`.
    #[serde(default = "default_title")]
    pub title: String,
    /// Title when the template renders empty.
    #[serde(default = "default_title_fallback")]
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
    /// JSON pointer of a producer-supplied event id used for dedupe when
    /// the request has no Idempotency-Key (e.g. `/event_id`).
    #[serde(default)]
    pub event_id_field: Option<String>,
    /// Environment variable holding a bearer token clients must send.
    /// Unset: no authentication (bind to localhost then).
    #[serde(default)]
    pub auth_token_env: Option<String>,
    /// Name of a systemd credential holding the bearer token
    /// (`$CREDENTIALS_DIRECTORY/<name>`); takes precedence over
    /// `auth_token_env`.
    #[serde(default)]
    pub auth_token_credential: Option<String>,
    /// Largest accepted request body, bytes.
    #[serde(default = "default_http_max_body")]
    pub max_body_bytes: usize,
    /// Most events in one request.
    #[serde(default = "default_http_max_events")]
    pub max_events_per_request: usize,
    /// Where failure reports about this source's events are POSTed (JSON
    /// with `event_id`, `case_id`, `queue_id`, `status`, `reason` and the
    /// original `event`), signed with `X-Duvo-Bridge-Signature:
    /// sha256=<hex HMAC-SHA256 of the body>`. Retried until a 2xx answer.
    #[serde(default)]
    pub callback_url: Option<String>,
    /// Environment variable holding the HMAC secret of the callbacks
    /// (required with `callback_url` or `callback_url_header`).
    #[serde(default)]
    pub callback_secret_env: Option<String>,
    /// The HMAC secret itself. Discouraged (it ends up in a file readable
    /// by whoever reads the config); prefer `callback_secret_env`.
    #[serde(default)]
    pub callback_secret: Option<Secret>,
    /// Accept a per-request callback URL in the `X-Duvo-Callback-Url`
    /// header (overrides `callback_url` for the events of that request).
    /// Off by default: whoever can post events could make the bridge call
    /// any URL.
    #[serde(default)]
    pub callback_url_header: bool,
    /// Timeout of one callback request, seconds.
    #[serde(default = "default_callback_timeout")]
    pub callback_timeout_secs: u64,
}

fn default_callback_timeout() -> u64 {
    10
}

fn default_http_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_title() -> String {
    "Event {/id|}".into()
}
fn default_title_fallback() -> String {
    "Untitled event".into()
}
fn default_http_max_body() -> usize {
    4 * 1024 * 1024
}
fn default_http_max_events() -> usize {
    10_000
}

impl HttpSourceConfig {
    /// A source with every default, listening on an ephemeral port.
    pub fn new(name: &str, queue_id: Uuid) -> Self {
        HttpSourceConfig {
            name: name.to_string(),
            listen: "127.0.0.1:0".into(),
            queue_id: queue_id.to_string(),
            title: default_title(),
            title_fallback: default_title_fallback(),
            labels: Default::default(),
            priority: None,
            priority_field: None,
            event_id_field: None,
            auth_token_env: None,
            auth_token_credential: None,
            max_body_bytes: default_http_max_body(),
            max_events_per_request: default_http_max_events(),
            callback_url: None,
            callback_secret_env: None,
            callback_secret: None,
            callback_url_header: false,
            callback_timeout_secs: default_callback_timeout(),
        }
    }

    /// Whether failure reports of this source go anywhere.
    pub fn reports(&self) -> bool {
        self.callback_url.is_some() || self.callback_url_header
    }

    /// The callback HMAC secret, from `callback_secret_env`.
    pub fn callback_secret(&self) -> Result<Option<Secret>, String> {
        if let Some(s) = &self.callback_secret {
            if s.is_empty() {
                return Err(format!("sources.{}.callback_secret is empty", self.name));
            }
            return Ok(Some(s.clone()));
        }
        match &self.callback_secret_env {
            None if self.reports() => Err(format!(
                "sources.{}: callback_secret_env (or callback_secret) is required with callback_url or callback_url_header (callbacks are signed)",
                self.name
            )),
            None => Ok(None),
            Some(var) => match std::env::var(var) {
                Ok(s) if !s.is_empty() => Ok(Some(Secret::new(s))),
                _ => Err(format!(
                    "sources.{}.callback_secret_env: environment variable {var} is not set or empty",
                    self.name
                )),
            },
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

    pub fn auth_token(&self) -> Result<Option<Secret>, String> {
        if let Some(name) = &self.auth_token_credential {
            let at = format!("sources.{}.auth_token_credential", self.name);
            return read_credential(&at, name).map(|t| Some(Secret::new(t)));
        }
        match &self.auth_token_env {
            None => Ok(None),
            Some(var) => match std::env::var(var) {
                Ok(s) if !s.is_empty() => Ok(Some(Secret::new(s))),
                _ => Err(format!(
                    "sources.{}.auth_token_env: environment variable {var} is not set or empty",
                    self.name
                )),
            },
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<String>);

impl Config {
    /// A complete local configuration: the API at `base_url` with a literal
    /// key, the outbox in `outbox`, the admin listener and one HTTP source
    /// on ephemeral ports. The demo, the tests and the benchmarks start
    /// from this and adjust what they measure.
    pub fn local(base_url: &str, api_key: &str, outbox: &Path, source: HttpSourceConfig) -> Config {
        let mut cfg = Config::default();
        cfg.duvo.base_url = base_url.to_string();
        cfg.duvo.api_key = Some(Secret::new(api_key));
        cfg.duvo.api_key_env = None;
        cfg.outbox.path = outbox.to_path_buf();
        cfg.admin.listen = "127.0.0.1:0".into();
        cfg.sources.push(SourceConfig::Http(source));
        cfg
    }

    /// Read a file, apply the `DUVO_BRIDGE__*` environment overrides (see
    /// [`env`]), parse and validate.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Config::load_with_env(path, process_env()).map(|(c, _)| c)
    }

    /// [`Config::load`] with the environment given; also returns the names
    /// of the override variables applied.
    pub fn load_with_env(
        path: &Path,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Vec<String>), ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("cannot read {}: {e}", path.display())]))?;
        let mut table = parse_table(&text)?;
        let (applied, env_errors) = match env::apply(&mut table, vars) {
            Ok(applied) => (applied, Vec::new()),
            Err(errors) => (Vec::new(), errors),
        };
        Config::from_table(table, env_errors).map(|c| (c, applied))
    }

    /// Parse and validate TOML text, collecting every error.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_table(parse_table(text)?, Vec::new())
    }

    /// Deserialise and check `table`; `errors` already found are reported
    /// with the rest.
    fn from_table(table: toml::Table, mut errors: Vec<String>) -> Result<Config, ConfigErrors> {
        let mut cfg = Config::default();

        fn section<T: serde::de::DeserializeOwned + Default>(
            table: &toml::Table,
            name: &str,
            errors: &mut Vec<String>,
        ) -> T {
            match table.get(name) {
                None => T::default(),
                Some(v) => match v.clone().try_into::<T>() {
                    Ok(t) => t,
                    Err(e) => {
                        errors.push(format!("[{name}]: {}", one_line(&e.to_string())));
                        T::default()
                    }
                },
            }
        }
        for key in table.keys() {
            if !matches!(
                key.as_str(),
                "duvo"
                    | "outbox"
                    | "delivery"
                    | "admin"
                    | "log"
                    | "shutdown"
                    | "tracking"
                    | "sources"
            ) {
                errors.push(format!(
                    "unknown section `{key}` (expected duvo, outbox, delivery, admin, log, shutdown, tracking, sources)"
                ));
            }
        }
        cfg.duvo = section(&table, "duvo", &mut errors);
        cfg.outbox = section(&table, "outbox", &mut errors);
        cfg.delivery = section(&table, "delivery", &mut errors);
        cfg.admin = section(&table, "admin", &mut errors);
        cfg.log = section(&table, "log", &mut errors);
        cfg.shutdown = section(&table, "shutdown", &mut errors);
        cfg.tracking = section(&table, "tracking", &mut errors);
        match table.get("sources") {
            None => {}
            Some(toml::Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    match item.clone().try_into::<SourceConfig>() {
                        Ok(s) => cfg.sources.push(s),
                        Err(e) => {
                            let name = item
                                .get("name")
                                .and_then(|n| n.as_str())
                                .map(|n| format!(" ({n})"))
                                .unwrap_or_default();
                            errors.push(format!(
                                "[[sources]] #{}{name}: {}",
                                i + 1,
                                one_line(&e.to_string())
                            ));
                        }
                    }
                }
            }
            Some(_) => errors.push("`sources` must be an array of tables ([[sources]])".into()),
        }
        errors.extend(cfg.check());
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Semantic checks over a typed config; every problem is returned.
    pub fn check(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let d = &self.duvo;
        if !(d.base_url.starts_with("http://") || d.base_url.starts_with("https://")) {
            errors.push(format!(
                "duvo.base_url must start with http:// or https:// (got {:?})",
                d.base_url
            ));
        }
        if d.rate_limit_per_minute == 0 {
            errors.push("duvo.rate_limit_per_minute must be at least 1".into());
        }
        if !(d.rate_share > 0.0 && d.rate_share <= 1.0) {
            errors.push(format!(
                "duvo.rate_share must be in (0, 1] (got {})",
                d.rate_share
            ));
        }
        if d.burst == 0 {
            errors.push("duvo.burst must be at least 1".into());
        }
        if d.timeout_secs == 0 {
            errors.push("duvo.timeout_secs must be at least 1".into());
        }
        if let Err(e) = d.resolve_api_key() {
            errors.push(e);
        }
        let o = &self.outbox;
        if o.low_water_events >= o.high_water_events {
            errors.push(format!(
                "outbox.low_water_events ({}) must be below high_water_events ({})",
                o.low_water_events, o.high_water_events
            ));
        }
        if o.path.as_os_str().is_empty() {
            errors.push("outbox.path must not be empty".into());
        }
        let dl = &self.delivery;
        if dl.max_batch == 0 || dl.max_batch > crate::duvo::MAX_CASES_PER_REQUEST {
            errors.push(format!(
                "delivery.max_batch must be within 1..={} (got {})",
                crate::duvo::MAX_CASES_PER_REQUEST,
                dl.max_batch
            ));
        }
        if dl.max_batch_bytes < 1024 || dl.max_batch_bytes > crate::duvo::MAX_BODY_BYTES {
            errors.push(format!(
                "delivery.max_batch_bytes must be within 1024..={} (got {})",
                crate::duvo::MAX_BODY_BYTES,
                dl.max_batch_bytes
            ));
        }
        if dl.retry_initial_ms == 0 || dl.retry_max_ms < dl.retry_initial_ms {
            errors.push("delivery.retry_initial_ms must be >= 1 and <= retry_max_ms".into());
        }
        if dl.max_in_flight == 0 {
            errors.push("delivery.max_in_flight must be at least 1".into());
        }
        errors.extend(self.tracking.check());
        let mut listens: Vec<(String, String)> = Vec::new();
        match self.admin.listen.parse::<SocketAddr>() {
            Ok(_) => listens.push(("admin.listen".into(), self.admin.listen.clone())),
            Err(_) => errors.push(format!(
                "admin.listen {:?} is not an address like 127.0.0.1:9090",
                self.admin.listen
            )),
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            errors.push(format!("log.level {:?}: {e}", self.log.level));
        }
        if self.sources.is_empty() {
            errors.push("no [[sources]] configured: the bridge would have nothing to do".into());
        }
        let mut names = BTreeSet::new();
        for s in &self.sources {
            if !names.insert(s.name().to_string()) {
                errors.push(format!("sources: name {:?} is used twice", s.name()));
            }
            match s {
                SourceConfig::Http(h) => {
                    let at = format!("sources.{}", h.name);
                    check_name(&at, &h.name, &mut errors);
                    if h.listen.parse::<SocketAddr>().is_err() {
                        errors.push(format!("{at}.listen {:?} is not an address", h.listen));
                    } else {
                        listens.push((format!("{at}.listen"), h.listen.clone()));
                    }
                    check_routing(
                        &at,
                        &h.queue_id,
                        &h.mapping(),
                        ("event_id_field", h.event_id_field.as_deref()),
                        &mut errors,
                    );
                    if let Err(e) = h.auth_token() {
                        errors.push(e);
                    }
                    if h.max_body_bytes < 1024 {
                        errors.push(format!("{at}.max_body_bytes must be at least 1024"));
                    }
                    if h.max_events_per_request == 0 {
                        errors.push(format!("{at}.max_events_per_request must be at least 1"));
                    }
                    if let Some(u) = &h.callback_url
                        && let Err(e) = check_http_url(u)
                    {
                        errors.push(format!("{at}.callback_url {u:?}: {e}"));
                    }
                    if let Err(e) = h.callback_secret() {
                        errors.push(e);
                    }
                    if h.callback_timeout_secs == 0 {
                        errors.push(format!("{at}.callback_timeout_secs must be at least 1"));
                    }
                }
                SourceConfig::Amqp(a) => errors.extend(check_amqp(a)),
                SourceConfig::Kafka(k) => errors.extend(check_kafka(k)),
            }
        }
        for (i, (a, addr)) in listens.iter().enumerate() {
            for (b, other) in &listens[i + 1..] {
                if addr == other && !addr.ends_with(":0") {
                    errors.push(format!("{a} and {b} both listen on {addr}"));
                }
            }
        }
        errors
    }

    /// The configuration as TOML with secrets redacted (`--print-config`).
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

/// Read the systemd credential `name` from `$CREDENTIALS_DIRECTORY`
/// (trimmed); `at` names the config key in errors.
fn read_credential(at: &str, name: &str) -> Result<String, String> {
    if name.is_empty() || name.contains('/') {
        return Err(format!("{at} {name:?} must be a credential name (no '/')"));
    }
    let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") else {
        return Err(format!(
            "{at} {name:?}: CREDENTIALS_DIRECTORY is not set \
             (run under systemd with LoadCredential={name}:<file>)"
        ));
    };
    let path = Path::new(&dir).join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) => Err(format!("{at}: {} is empty", path.display())),
        Err(e) => Err(format!("{at}: {} cannot be read: {e}", path.display())),
    }
}

fn parse_table(text: &str) -> Result<toml::Table, ConfigErrors> {
    text.parse()
        .map_err(|e: toml::de::Error| ConfigErrors(vec![format!("TOML syntax: {e}")]))
}

/// The process environment (variables that are not UTF-8 cannot be
/// overrides and are skipped).
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// An absolute http(s) URL with a host.
pub fn check_http_url(u: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(u).map_err(|e| e.to_string())?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http:// or https:// URL".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    Ok(())
}

impl TrackingConfig {
    fn check(&self) -> Vec<String> {
        use crate::report::ReportStatus as R;
        let mut errors = Vec::new();
        if !(self.share.is_finite() && self.share > 0.0 && self.share <= 1.0) {
            errors.push(format!(
                "tracking.share must be in (0, 1] (got {})",
                self.share
            ));
        }
        if self.poll_interval_ms < 100 {
            errors.push("tracking.poll_interval_ms must be at least 100".into());
        }
        if self.watch_interval_ms < self.poll_interval_ms {
            errors.push("tracking.watch_interval_ms must be at least poll_interval_ms".into());
        }
        if self.ttl_hours == 0 {
            errors.push("tracking.ttl_hours must be at least 1".into());
        }
        for s in &self.report {
            if matches!(s, R::Expired | R::Rejected) {
                errors.push(format!(
                    "tracking.report: {s:?} is always reported; list only failed, canceled, needs_input, postponed, completed"
                ));
            }
        }
        if self.report_concurrency == 0 {
            errors.push("tracking.report_concurrency must be at least 1".into());
        }
        if self.report_retry_initial_ms == 0
            || self.report_retry_max_ms < self.report_retry_initial_ms
        {
            errors.push(
                "tracking.report_retry_initial_ms must be >= 1 and <= report_retry_max_ms".into(),
            );
        }
        errors
    }

    /// The outbox's tracking policy; `None` when tracking is off and no
    /// source reports (with tracking off, rejections of reporting sources
    /// are still reported).
    pub fn policy(
        &self,
        report_sources: BTreeSet<String>,
    ) -> Option<crate::outbox::TrackingPolicy> {
        if !self.enabled && report_sources.is_empty() {
            return None;
        }
        Some(crate::outbox::TrackingPolicy {
            track_cases: self.enabled,
            ttl: Duration::from_secs(self.ttl_hours.saturating_mul(3600)),
            report_sources,
            report_statuses: self.report.iter().copied().collect(),
        })
    }
}

/// What every source has: a target queue, a mapping, and an optional JSON
/// pointer naming a producer-supplied id (`(key name, value)`).
fn check_routing(
    at: &str,
    queue_id: &str,
    mapping: &MappingConfig,
    id_field: (&str, Option<&str>),
    errors: &mut Vec<String>,
) {
    if Uuid::parse_str(queue_id).is_err() {
        errors.push(format!("{at}.queue_id {queue_id:?} is not a UUID"));
    }
    if let Err(errs) = Mapper::new(mapping) {
        for e in errs {
            errors.push(format!("{at}.{e}"));
        }
    }
    if let (key, Some(p)) = id_field
        && !p.starts_with('/')
    {
        errors.push(format!(
            "{at}.{key} {p:?} must be a JSON pointer starting with '/'"
        ));
    }
}

fn check_name(at: &str, name: &str, errors: &mut Vec<String>) {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        errors.push(format!(
            "{at}.name must be non-empty and use only letters, digits, '-' and '_'"
        ));
    }
}

fn check_amqp(a: &AmqpSourceConfig) -> Vec<String> {
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

fn check_kafka(k: &KafkaSourceConfig) -> Vec<String> {
    let mut errors = Vec::new();
    let at = format!("sources.{}", k.name);
    check_name(&at, &k.name, &mut errors);
    if k.brokers.trim().is_empty() {
        errors.push(format!(
            "{at}.brokers must not be empty (host:port[,host:port...])"
        ));
    }
    if k.group_id.trim().is_empty() {
        errors.push(format!("{at}.group_id must not be empty"));
    }
    if k.topics.is_empty() {
        errors.push(format!("{at}.topics must name at least one topic"));
    }
    let mut seen = BTreeSet::new();
    for t in &k.topics {
        if t.trim().is_empty() {
            errors.push(format!("{at}.topics: a topic name is empty"));
        } else if !seen.insert(t.as_str()) {
            errors.push(format!("{at}.topics: {t:?} is listed twice"));
        }
    }
    if let Err(e) = k.group_instance_id() {
        errors.push(e);
    }
    check_routing(
        &at,
        &k.queue_id,
        &k.mapping(),
        ("message_id_field", k.message_id_field.as_deref()),
        &mut errors,
    );
    let mut routed = BTreeSet::new();
    for r in &k.routes {
        let rat = format!("{at}.routes.{}", r.topic);
        if !k.topics.contains(&r.topic) || r.topic.starts_with('^') {
            errors.push(format!(
                "{rat}: the topic is not listed (by exact name) in {at}.topics"
            ));
        }
        if !routed.insert(r.topic.as_str()) {
            errors.push(format!("{rat}: a topic has at most one route"));
        }
        let (mapping, queue_id) = k.route_mapping(r);
        check_routing(&rat, &queue_id, &mapping, ("", None), &mut errors);
    }
    if matches!(&k.message_id_header, Some(h) if h.is_empty()) {
        errors.push(format!("{at}.message_id_header must not be empty"));
    }
    for (key, topic) in [
        ("dead_letter_topic", &k.dead_letter_topic),
        ("failure_topic", &k.failure_topic),
    ] {
        match topic {
            Some(t) if t.trim().is_empty() => {
                errors.push(format!("{at}.{key} must not be empty"));
            }
            Some(t) if k.topics.contains(t) => errors.push(format!(
                "{at}.{key} {t:?} is also consumed by this source (a loop)"
            )),
            _ => {}
        }
    }
    if k.on_undecodable == KafkaUndecodablePolicy::DeadLetter && k.dead_letter_topic.is_none() {
        errors.push(format!(
            "{at}: on_undecodable = \"dead_letter\" needs dead_letter_topic"
        ));
    }
    if k.max_batch == 0 || k.max_batch > 100_000 {
        errors.push(format!(
            "{at}.max_batch must be within 1..=100000 (got {})",
            k.max_batch
        ));
    }
    for (key, instead) in KAFKA_RESERVED_KEYS {
        if k.librdkafka.contains_key(key) {
            errors.push(format!(
                "{at}.librdkafka.\"{key}\" is set by the bridge; use {instead}"
            ));
        }
    }
    for e in crate::source::kafka::check_librdkafka(&k.librdkafka) {
        errors.push(format!("{at}.librdkafka: {e}"));
    }
    errors
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[duvo]
api_key = "dv_test_key_value_1234567890abcdef"
[outbox]
path = "/tmp/x"
[[sources]]
type = "http"
name = "oms"
listen = "127.0.0.1:8080"
queue_id = "7b0c8a52-4a1f-4c57-9b7e-2f0f7c1d9a11"
title = "Order {/order_id}"
"#;

    #[test]
    fn example_shape_parses_with_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.duvo.rate_limit_per_minute, 300);
        assert_eq!(c.duvo.version_prefix, "/v2");
        assert_eq!(c.delivery.max_batch, 100);
        assert_eq!(c.delivery.linger_ms, 200);
        assert_eq!(c.admin.listen, "127.0.0.1:9090");
        assert_eq!(c.sources.len(), 1);
    }

    #[test]
    fn example_file_in_repo_is_valid() {
        // SAFETY: tests in this module do not read DUVO_API_KEY concurrently
        // except this one; the value is a throwaway.
        unsafe { std::env::set_var("DUVO_API_KEY", "dv_example_test_key_000000000000000") };
        unsafe { std::env::set_var("OMS_CALLBACK_SECRET", "example-callback-secret") };
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/duvo-bridge.example.toml"
        );
        if let Err(e) = Config::load(Path::new(path)) {
            panic!("{e}");
        }
    }

    #[test]
    fn example_files_commented_amqp_source_is_valid_once_uncommented() {
        // SAFETY: as in `example_file_in_repo_is_valid` (same throwaway values).
        unsafe { std::env::set_var("DUVO_API_KEY", "dv_example_test_key_000000000000000") };
        unsafe { std::env::set_var("OMS_CALLBACK_SECRET", "example-callback-secret") };
        let text = include_str!("../config/duvo-bridge.example.toml");
        let (head, amqp) = text
            .split_once("# A RabbitMQ intake")
            .expect("the example documents an AMQP source");
        let block = &amqp[amqp.find("# [[sources]]").expect("a commented [[sources]]")..];
        let uncommented: String = block
            .lines()
            .take_while(|l| l.starts_with('#'))
            .filter(|l| !l.starts_with("# #"))
            .filter_map(|l| l.strip_prefix("# "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(uncommented.contains("failure_exchange"), "{uncommented}");
        let c = match Config::parse(&format!("{head}\n{uncommented}")) {
            Ok(c) => c,
            Err(e) => panic!("{e}\n{uncommented}"),
        };
        let Some(SourceConfig::Amqp(a)) = c.sources.iter().find(|s| s.name() == "rabbit") else {
            panic!("amqp source expected")
        };
        assert!(a.reports() && a.declare && a.reply_to_reports);
        assert_eq!(a.failure_exchange_type, Some(AmqpExchangeType::Topic));
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let bad = r#"
[duvo]
api_key = "dv_x"
base_url = "ftp://nowhere"
rate_limit_per_minute = 0
typo_key = 1
[delivery]
max_batch = 500
[admin]
listen = "not an address"
[bogus]
x = 1
[[sources]]
type = "http"
name = "oms"
queue_id = "not-a-uuid"
title = "Order {order_id"
[[sources]]
type = "http"
name = "oms"
queue_id = "7b0c8a52-4a1f-4c57-9b7e-2f0f7c1d9a11"
listen = "127.0.0.1:8080"
[[sources]]
type = "carrier-pigeon"
name = "p"
"#;
        let errs = Config::parse(bad).unwrap_err().0;
        let all = errs.join("\n");
        for needle in [
            "[duvo]",
            "typo_key",
            "max_batch",
            "admin.listen",
            "unknown section `bogus`",
            "queue_id \"not-a-uuid\"",
            "sources.oms.title",
            "used twice",
            "[[sources]] #3",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(errs.len() >= 8, "{all}");
    }

    #[test]
    fn amqp_source_parses_with_defaults_and_checks_every_key() {
        let good = format!(
            "{GOOD}{}",
            r#"
[[sources]]
type = "amqp"
name = "rabbit"
uri = "amqp://guest:pa55word@127.0.0.1:5672/%2f"
queue = "orders"
queue_id = "7b0c8a52-4a1f-4c57-9b7e-2f0f7c1d9a11"
title = "Order {/order_id}"
failure_exchange = "duvo.failures"
failure_routing_key = "orders"
"#
        );
        let c = Config::parse(&good).unwrap();
        let SourceConfig::Amqp(a) = &c.sources[1] else {
            panic!("amqp source expected");
        };
        assert_eq!(a.prefetch, 200);
        assert_eq!(a.on_undecodable, UndecodablePolicy::Wrap);
        assert!(!a.declare);
        assert!(a.reports() && c.sources[1].reports());
        assert!(a.reply_to_reports);
        assert_eq!(a.failure_routing_key(), "orders");
        assert!(!c.to_redacted_toml().contains("pa55word"));
        assert!(!format!("{c:?}").contains("pa55word"));

        let bad = format!(
            "{GOOD}{}",
            r#"
[[sources]]
type = "amqp"
name = "rabbit"
uri = "http://guest:pa55word@host/"
queue = ""
prefetch = 0
queue_id = "nope"
title = "Order {/order_id"
message_id_field = "event_id"
on_undecodable = "wrap"
bindings = [{ exchange = "", routing_key = "k" }]
failure_routing_key = "k"
"#
        );
        let errs = Config::parse(&bad).unwrap_err().0;
        let all = errs.join("\n");
        for needle in [
            "sources.rabbit.uri must start with amqp://",
            "sources.rabbit.queue must not be empty",
            "sources.rabbit.prefetch must be at least 1",
            "sources.rabbit.queue_id \"nope\"",
            "sources.rabbit.title",
            "message_id_field",
            "need declare = true",
            "exchange must not be empty",
            "failure_routing_key and failure_exchange_type need failure_exchange",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(!all.contains("pa55word"), "{all}");
        let typo = format!(
            "{GOOD}[[sources]]\ntype = \"amqp\"\nname = \"r\"\nuri = \"amqp://h\"\nqueue = \"q\"\nqueue_id = \"x\"\nprefech = 5\n"
        );
        let errs = Config::parse(&typo).unwrap_err().0.join("\n");
        assert!(errs.contains("prefech"), "{errs}");
    }

    #[test]
    fn amqp_failure_report_keys_are_checked() {
        let src = |extra: &str| {
            format!(
                "{GOOD}[[sources]]\ntype = \"amqp\"\nname = \"r\"\nuri = \"amqp://h\"\nqueue = \"q\"\nqueue_id = \"7b0c8a52-4a1f-4c57-9b7e-2f0f7c1d9a11\"\n{extra}"
            )
        };
        // No exchange: no reports, whatever reply_to_reports says.
        let c = Config::parse(&src("reply_to_reports = true\n")).unwrap();
        assert!(!c.sources[1].reports());
        let SourceConfig::Amqp(a) = &c.sources[1] else {
            panic!()
        };
        assert_eq!(a.failure_routing_key(), "q", "defaults to the queue name");
        // The default exchange needs a queue name as routing key and cannot
        // be declared; a type needs declare = true.
        let errs = Config::parse(&src(
            "failure_exchange = \"\"\nfailure_exchange_type = \"topic\"\n",
        ))
        .unwrap_err()
        .0
        .join("\n");
        assert!(
            errs.contains("failure_routing_key must name a queue"),
            "{errs}"
        );
        assert!(errs.contains("cannot be declared"), "{errs}");
        let errs = Config::parse(&src(
            "failure_exchange = \"x\"\nfailure_exchange_type = \"fanout\"\n",
        ))
        .unwrap_err()
        .0
        .join("\n");
        assert!(
            errs.contains("failure_exchange_type needs declare = true"),
            "{errs}"
        );
        let long = "k".repeat(256);
        let errs = Config::parse(&src(&format!(
            "failure_exchange = \"x\"\nfailure_routing_key = \"{long}\"\n"
        )))
        .unwrap_err()
        .0
        .join("\n");
        assert!(errs.contains("at most 255 bytes"), "{errs}");
        // Valid: declared topic exchange; a dead-letter exchange without
        // declare (it must exist then).
        let c = Config::parse(&src(
            "declare = true\nfailure_exchange = \"x\"\nfailure_exchange_type = \"direct\"\nreply_to_reports = false\n",
        ))
        .unwrap();
        assert!(c.sources[1].reports());
        Config::parse(&src(
            "on_undecodable = \"reject\"\ndead_letter_exchange = \"dlx\"\n",
        ))
        .unwrap();
    }

    #[test]
    fn kafka_source_parses_with_defaults_redacts_secrets_and_checks_every_key() {
        let good = format!(
            "{GOOD}{}",
            r#"
[[sources]]
type = "kafka"
name = "orders"
brokers = "127.0.0.1:9092"
group_id = "duvo-bridge"
topics = ["orders", "returns"]
queue_id = "7b0c8a52-4a1f-4c57-9b7e-2f0f7c1d9a11"
title = "Order {/order_id}"
failure_topic = "orders.duvo-failures"
[[sources.routes]]
topic = "returns"
queue_id = "2b0c8a52-4a1f-4c57-9b7e-2f0f7c1d9a12"
title = "Return {/return_id}"
[sources.librdkafka]
"security.protocol" = "sasl_ssl"
"sasl.mechanisms" = "SCRAM-SHA-512"
"sasl.username" = "bridge"
"sasl.password" = "kafka-pa55word"
"ssl.key.password" = "key-pa55word"
"ssl.keystore.password" = "store-pa55word"
"session.timeout.ms" = 30000
"#
        );
        let c = Config::parse(&good).unwrap();
        let SourceConfig::Kafka(k) = &c.sources[1] else {
            panic!("kafka source expected");
        };
        assert_eq!(k.max_batch, 1000);
        assert_eq!(k.on_undecodable, KafkaUndecodablePolicy::Wrap);
        assert_eq!(k.librdkafka.get("session.timeout.ms"), Some("30000"));
        assert_eq!(k.librdkafka.get("sasl.password"), Some("kafka-pa55word"));
        let (m, q) = k.route_mapping(&k.routes[0]);
        assert_eq!(m.title, "Return {/return_id}");
        assert_eq!(q, "2b0c8a52-4a1f-4c57-9b7e-2f0f7c1d9a12");
        let printed = c.to_redacted_toml();
        let debug = format!("{c:?}");
        for shown in [&printed, &debug] {
            assert!(!shown.contains("pa55word"), "{shown}");
            assert!(shown.contains("sasl_ssl"), "{shown}");
            assert!(shown.contains("bridge"), "{shown}");
        }
        // The printed config is itself a valid config (secrets aside).
        assert!(Config::parse(&printed).is_ok(), "{printed}");

        let bad = format!(
            "{GOOD}{}",
            r#"
[[sources]]
type = "kafka"
name = "orders"
brokers = ""
group_id = ""
topics = ["orders", "orders"]
queue_id = "nope"
title = "Order {/order_id"
message_id_field = "event_id"
message_id_header = ""
on_undecodable = "dead_letter"
failure_topic = "orders"
max_batch = 0
group_instance_id = "a"
group_instance_id_env = "B"
[[sources.routes]]
topic = "elsewhere"
queue_id = "also-not-a-uuid"
[sources.librdkafka]
"group.id" = "sneaky"
"no.such.property" = 1
"sasl.password" = "kafka-pa55word"
"#
        );
        let errs = Config::parse(&bad).unwrap_err().0;
        let all = errs.join("\n");
        for needle in [
            "sources.orders.brokers must not be empty",
            "sources.orders.group_id must not be empty",
            "\"orders\" is listed twice",
            "sources.orders.queue_id \"nope\"",
            "sources.orders.title",
            "message_id_field",
            "message_id_header must not be empty",
            "needs dead_letter_topic",
            "failure_topic \"orders\" is also consumed",
            "max_batch must be within",
            "not both",
            "sources.orders.routes.elsewhere: the topic is not listed",
            "sources.orders.routes.elsewhere.queue_id",
            "librdkafka.\"group.id\" is set by the bridge; use group_id",
            "no.such.property",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(!all.contains("pa55word"), "{all}");
        let typo = format!(
            "{GOOD}[[sources]]\ntype = \"kafka\"\nname = \"k\"\nbrokers = \"h:1\"\ngroup_id = \"g\"\ntopics = [\"t\"]\nqueue_id = \"7b0c8a52-4a1f-4c57-9b7e-2f0f7c1d9a11\"\nfailure_topik = \"x\"\n"
        );
        let errs = Config::parse(&typo).unwrap_err().0.join("\n");
        assert!(errs.contains("failure_topik"), "{errs}");
    }

    #[test]
    fn commented_kafka_example_in_repo_is_valid_once_uncommented() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/duvo-bridge.example.toml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let start = text
            .find("# [[sources]]\n# type = \"kafka\"")
            .expect("a commented kafka example");
        let block: String = text[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .filter(|l| !l.starts_with("# #"))
            .map(|l| format!("{}\n", l.trim_start_matches('#').trim_start()))
            .collect();
        let cfg = format!("{GOOD}{block}");
        match Config::parse(&cfg) {
            Ok(c) => assert!(matches!(c.sources[1], SourceConfig::Kafka(_))),
            Err(e) => panic!("{e}\n{block}"),
        }
    }

    #[test]
    fn secrets_are_redacted_when_printed() {
        let c = Config::parse(GOOD).unwrap();
        let printed = c.to_redacted_toml();
        assert!(!printed.contains("dv_test_key_value"), "{printed}");
        assert!(printed.contains(crate::secret::REDACTED));
        assert!(!format!("{c:?}").contains("dv_test_key_value"));
    }
}
