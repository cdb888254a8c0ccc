//! The Kafka source's `[[sources]]` entry (`type = "kafka"`): what to
//! consume, how records become cases, where dead letters and failure
//! reports go, and the librdkafka pass-through settings.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::duvo::Priority;
use crate::kafka::{ClientSettings, LibrdkafkaSettings, check_librdkafka};
use crate::mapping::MappingConfig;
use crate::report::kafka::KafkaTarget;
use crate::source::{check_name, check_routing};

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

/// A route of a Kafka source: [`crate::routing::RouteConfig`] (a `topic`
/// alone is the per-topic route; a pointer or header tests the record).
pub type KafkaRoute = crate::routing::RouteConfig;

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
    /// Duvo queue the cases go to: the default route (per topic or by
    /// content: `routes`). Empty (left out) with `routes`: a record no route
    /// matches goes to `dead_letter_topic` (required then).
    #[serde(default)]
    pub queue_id: String,
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
    /// Routes (`[[sources.routes]]`), first match wins: by `topic`, by a
    /// JSON pointer of the record or by a record header; records no route
    /// matches use the keys above.
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
    /// store only up to the hole and read the partition again from it, then
    /// from 1,000 records before it: a broker that skipped records by
    /// mistake (or serves a record batch only from its first offset) hands
    /// them over then.
    /// A hole still there inside the log is passed (compaction, transaction
    /// markers, aborted transactions), and the partition's holes pass
    /// without a re-read for the next 60 s (on such topics they come
    /// often); a hole below the log start (records
    /// deleted before they were read) always stalls the partition, with or
    /// without this. Either way it is logged and counted
    /// (`duvo_bridge_kafka_offset_gaps_total`). Set to false for compacted
    /// or transactional topics to save the remaining re-reads.
    #[serde(default = "crate::source::default_true")]
    pub reread_offset_gaps: bool,
    /// Accept `auto.offset.reset = "latest"` (or `largest`, `end`) in
    /// `[sources.librdkafka]`. With it, a new consumer group, or one whose
    /// committed offset is no longer in the log, starts at the end of the
    /// log and never reads the records already there. Off: `validate`
    /// refuses that setting (the bridge's default is `earliest`).
    #[serde(default)]
    pub allow_offset_reset_to_latest: bool,
    /// librdkafka settings passed through (TLS, SASL, timeouts...). The
    /// bridge sets `bootstrap.servers`, `group.id`, `group.instance.id`,
    /// `enable.auto.offset.store` (false), `enable.auto.commit` (true),
    /// `enable.idempotence` and `acks` itself; defaults it sets unless given
    /// here: `auto.offset.reset = "earliest"`, `isolation.level =
    /// "read_committed"` (aborted transactions are never cases),
    /// `auto.commit.interval.ms =
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
            account: None,
            title: crate::mapping::default_title(),
            title_fallback: crate::mapping::default_title_fallback(),
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
            allow_offset_reset_to_latest: false,
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
        (
            r.mapping(&self.mapping()),
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

    /// Whether this source sends failure reports (to `failure_topic`).
    pub fn reports(&self) -> bool {
        self.failure_topic.is_some()
    }

    /// What every librdkafka client of this source shares.
    pub fn client(&self) -> ClientSettings {
        ClientSettings {
            source: self.name.clone(),
            brokers: self.brokers.clone(),
            librdkafka: self.librdkafka.clone(),
        }
    }

    /// Where this source's failure reports go; `None` without a
    /// `failure_topic`.
    pub fn report_target(&self) -> Option<KafkaTarget> {
        Some(KafkaTarget {
            client: self.client(),
            topic: self.failure_topic.clone()?,
        })
    }

    /// Every problem with this source's `[[sources]]` entry.
    pub fn check(&self) -> Vec<String> {
        let k = self;
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
            &k.routes,
            ("message_id_field", k.message_id_field.as_deref()),
            &mut errors,
        );
        for (n, r) in k.routes.iter().enumerate() {
            let rat = format!("{at}.routes.{}", r.display_name(n));
            if let Some(t) = &r.topic
                && (!k.topics.contains(t) || t.starts_with('^'))
            {
                errors.push(format!(
                    "{rat}: the topic is not listed (by exact name) in {at}.topics"
                ));
            }
        }
        if k.queue_id.is_empty() && !k.routes.is_empty() && k.dead_letter_topic.is_none() {
            errors.push(format!(
                "{at}: without a queue_id, a record no route matches has nowhere to go: set queue_id (the default route) or dead_letter_topic"
            ));
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
        if let Some(reset) = k.librdkafka.get("auto.offset.reset")
            && matches!(
                reset.to_ascii_lowercase().as_str(),
                "latest" | "largest" | "end"
            )
            && !k.allow_offset_reset_to_latest
        {
            errors.push(format!(
                "{at}.librdkafka.\"auto.offset.reset\" = {reset:?} skips every record already in a topic when the group is new or its committed offset is out of range; remove it (the default is \"earliest\") or set {at}.allow_offset_reset_to_latest = true to accept that"
            ));
        }
        for e in check_librdkafka(&k.librdkafka) {
            errors.push(format!("{at}.librdkafka: {e}"));
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Reporter;
    use crate::report::kafka::KafkaReporter;

    #[test]
    fn offset_reset_to_latest_is_refused_unless_accepted() {
        let mut cfg = KafkaSourceConfig::new("k", "127.0.0.1:1", "g", &["t"], uuid::Uuid::nil());
        assert_eq!(cfg.check(), Vec::<String>::new());
        for v in ["latest", "LARGEST", "end"] {
            cfg.librdkafka.insert("auto.offset.reset", v);
            let errs = cfg.check();
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert!(errs[0].contains("allow_offset_reset_to_latest"), "{errs:?}");
        }
        cfg.allow_offset_reset_to_latest = true;
        assert_eq!(cfg.check(), Vec::<String>::new());
        cfg.allow_offset_reset_to_latest = false;
        cfg.librdkafka.insert("auto.offset.reset", "earliest");
        assert_eq!(cfg.check(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn no_failure_topic_means_no_reporter() {
        let cfg = KafkaSourceConfig::new("k", "127.0.0.1:1", "g", &["t"], uuid::Uuid::nil());
        assert!(cfg.report_target().is_none());
        let mut with = cfg.clone();
        with.failure_topic = Some("t.failures".into());
        let r = KafkaReporter::new(with.report_target().unwrap()).unwrap();
        assert_eq!(r.kind(), "kafka");
        assert_eq!(r.topic(), "t.failures");
    }
}
