//! librdkafka glue shared by the Kafka source (consumer, dead-letter
//! producer) and the Kafka reporter (failure-report producer): the
//! pass-through settings map with its secret values kept secret, the
//! client settings the bridge owns, validation that never shows a secret,
//! librdkafka's own logs routed into `tracing`, and the headers naming
//! where a record came from.

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use serde::{Deserialize, Serialize};

use crate::secret::Secret;

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
        crate::secret::names_a_secret(key)
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

/// Replaces the values of secret settings in text a library produced.
#[derive(Clone, Default)]
pub struct Scrubber(Vec<String>);

impl Scrubber {
    pub fn new(settings: &LibrdkafkaSettings) -> Scrubber {
        // Very short values would turn any text into stars; librdkafka never
        // echoes secret values anyway, this is a second line of defence.
        Scrubber(
            settings
                .secret_values()
                .filter(|v| v.len() >= 4)
                .map(str::to_string)
                .collect(),
        )
    }

    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.0 {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), crate::secret::REDACTED);
            }
        }
        out
    }
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrubber({} values)", self.0.len())
    }
}

/// Check every pass-through setting on its own (names and values as
/// librdkafka parses them), so every bad one is reported at once. The value
/// of a secret setting is never part of a message.
pub fn check_librdkafka(settings: &LibrdkafkaSettings) -> Vec<String> {
    let mut errors = Vec::new();
    for (key, value) in settings.iter_exposed() {
        let mut one = ClientConfig::new();
        one.set(key, value);
        if let Err(e) = one.create_native_config() {
            errors.push(describe_config_error(&e, settings));
        }
        // Accepted as a value, refused only when the client is created.
        if matches!(key, "sasl.mechanisms" | "sasl.mechanism")
            && value.to_ascii_uppercase().contains("GSSAPI")
        {
            errors.push(format!(
                "\"{key}\" = \"{value}\": GSSAPI (Kerberos) is not built in (no libsasl2); use PLAIN or SCRAM-SHA-256/512"
            ));
        }
    }
    errors
}

/// A client-configuration error as text without secret values.
pub fn describe_config_error(e: &KafkaError, settings: &LibrdkafkaSettings) -> String {
    match e {
        KafkaError::ClientConfig(_, desc, key, value) => {
            if !LibrdkafkaSettings::is_secret_key(key) {
                Scrubber::new(settings).scrub(desc)
            } else if value.len() >= 3 {
                Scrubber::new(settings)
                    .scrub(desc)
                    .replace(value.as_str(), crate::secret::REDACTED)
            } else {
                format!("\"{key}\": invalid (the value is secret and not shown)")
            }
        }
        other => Scrubber::new(settings).scrub(&other.to_string()),
    }
}

/// What every librdkafka client of one source shares: the source's name
/// (client ids, logs), its brokers and its pass-through settings.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub source: String,
    pub brokers: String,
    pub librdkafka: LibrdkafkaSettings,
}

impl ClientSettings {
    /// `bootstrap.servers` and a `client.id` naming the source and role.
    pub fn base(&self, role: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c.set("client.id", format!("duvo-bridge-{}-{role}", self.source));
        c
    }

    /// Settings the bridge defaults but the pass-through map may override.
    pub fn apply_passthrough(&self, c: &mut ClientConfig, defaults: &[(&str, &str)]) {
        for (k, v) in defaults {
            if !self.librdkafka.contains_key(k) {
                c.set(*k, *v);
            }
        }
        for (k, v) in self.librdkafka.iter_exposed() {
            c.set(k, v);
        }
    }

    /// An idempotent producer (`acks=all`) for dead letters and failure reports.
    /// `message.timeout.ms` defaults to 30 s so a send gives up (and is retried
    /// by its caller) instead of hanging for librdkafka's 5 minutes.
    pub fn producer_config(&self, role: &str) -> ClientConfig {
        let mut c = self.base(role);
        self.apply_passthrough(&mut c, &[("message.timeout.ms", "30000")]);
        // The shared map may enable statistics for the consumer; nobody reads
        // a producer's.
        c.set("statistics.interval.ms", "0");
        c.set("enable.idempotence", "true");
        c.set("acks", "all");
        c
    }
}

/// Client context for the producers: librdkafka logs and errors go to
/// `tracing`, scrubbed.
#[derive(Clone)]
pub struct LogContext {
    pub source: String,
    pub scrubber: Scrubber,
}

impl ClientContext for LogContext {
    fn stats(&self, _: rdkafka::statistics::Statistics) {}

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_librdkafka(&self.source, &self.scrubber, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(
            source = %self.source,
            error = %self.scrubber.scrub(&error.to_string()),
            reason = %self.scrubber.scrub(reason),
            "kafka producer error"
        );
    }
}

/// librdkafka's own log lines, at a matching level. Property warnings about
/// consumer settings handed to a producer (the pass-through map is shared)
/// are debug noise.
pub fn log_librdkafka(
    source: &str,
    scrubber: &Scrubber,
    level: RDKafkaLogLevel,
    fac: &str,
    message: &str,
) {
    let message = scrubber.scrub(message);
    match level {
        _ if fac == "CONFWARN" => {
            tracing::debug!(source, fac, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error
        | RDKafkaLogLevel::Warning => tracing::warn!(source, fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(source, fac, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(source, fac, "librdkafka: {message}"),
    }
}

/// Add the headers naming where a record came from (`duvo-source-topic`,
/// `-partition`, `-offset`): the same names on dead letters and failure
/// reports, so consumers of either parse one format.
pub fn with_source_coordinates(
    headers: OwnedHeaders,
    topic: &str,
    partition: i32,
    offset: i64,
) -> OwnedHeaders {
    let (partition, offset) = (partition.to_string(), offset.to_string());
    headers
        .insert(Header {
            key: "duvo-source-topic",
            value: Some(topic),
        })
        .insert(Header {
            key: "duvo-source-partition",
            value: Some(partition.as_str()),
        })
        .insert(Header {
            key: "duvo-source-offset",
            value: Some(offset.as_str()),
        })
}
