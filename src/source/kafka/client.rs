//! librdkafka client configuration for the Kafka source and its producers
//! (dead letters, failure reports): the settings the bridge owns, the
//! pass-through map, validation that never shows a secret, and a
//! `ClientContext` that routes librdkafka's own logs into `tracing`.

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;

use crate::config::{KafkaSourceConfig, LibrdkafkaSettings};

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

fn base(cfg: &KafkaSourceConfig, role: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    c.set("client.id", format!("duvo-bridge-{}-{role}", cfg.name));
    c
}

/// Settings the bridge defaults but the pass-through map may override.
fn apply_passthrough(c: &mut ClientConfig, cfg: &KafkaSourceConfig, defaults: &[(&str, &str)]) {
    for (k, v) in defaults {
        if !cfg.librdkafka.contains_key(k) {
            c.set(*k, *v);
        }
    }
    for (k, v) in cfg.librdkafka.iter_exposed() {
        c.set(k, v);
    }
}

/// The consumer: offsets stored by the bridge after the fsync, committed by
/// librdkafka's auto-commit (and by the bridge on revocation).
pub fn consumer_config(cfg: &KafkaSourceConfig) -> Result<ClientConfig, String> {
    let mut c = base(cfg, "consumer");
    c.set("group.id", &cfg.group_id);
    if let Some(id) = cfg.group_instance_id()? {
        c.set("group.instance.id", id);
    }
    apply_passthrough(
        &mut c,
        cfg,
        &[
            ("auto.offset.reset", "earliest"),
            ("auto.commit.interval.ms", "1000"),
            ("statistics.interval.ms", "5000"),
        ],
    );
    // Set last so the pass-through map cannot undo them (config::check
    // refuses them there anyway).
    c.set("enable.auto.offset.store", "false");
    c.set("enable.auto.commit", "true");
    c.set("enable.partition.eof", "false");
    Ok(c)
}

/// An idempotent producer (`acks=all`) for dead letters and failure reports.
/// `message.timeout.ms` defaults to 30 s so a send gives up (and is retried
/// by its caller) instead of hanging for librdkafka's 5 minutes.
pub fn producer_config(cfg: &KafkaSourceConfig, role: &str) -> ClientConfig {
    let mut c = base(cfg, role);
    apply_passthrough(&mut c, cfg, &[("message.timeout.ms", "30000")]);
    // The shared map may enable statistics for the consumer; nobody reads
    // a producer's.
    c.set("statistics.interval.ms", "0");
    c.set("enable.idempotence", "true");
    c.set("acks", "all");
    c
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> LibrdkafkaSettings {
        let mut s = LibrdkafkaSettings::default();
        for (k, v) in pairs {
            s.insert(k, v);
        }
        s
    }

    #[test]
    fn every_bad_setting_is_reported_and_secret_values_never_shown() {
        let s = settings(&[
            ("no.such.property", "1"),
            ("session.timeout.ms", "soon"),
            ("security.protocol", "ssl"),
            ("sasl.password", "hunter2-very-secret"),
            ("ssl.key.password", "pw-in-toml"),
            ("sasl.oauthbearer.client.secret", "oauth-secret-value"),
            ("sasl.mechanisms", "GSSAPI"),
        ]);
        let errs = check_librdkafka(&s);
        let all = errs.join("\n");
        // Unknown key, bad value, OIDC (needs libcurl) and GSSAPI (needs
        // libsasl2), neither built in.
        assert_eq!(errs.len(), 4, "{all}");
        assert!(all.contains("GSSAPI"), "{all}");
        assert!(all.contains("no.such.property"), "{all}");
        assert!(all.contains("session.timeout.ms"), "{all}");
        assert!(!all.contains("hunter2"), "{all}");
        assert!(!all.contains("oauth-secret-value"), "{all}");
        let features = ClientConfig::new()
            .create_native_config()
            .unwrap()
            .get("builtin.features")
            .unwrap();
        for f in ["ssl", "sasl_plain", "sasl_scram", "sasl_oauthbearer"] {
            assert!(
                features.split(',').any(|x| x.trim_end_matches('\0') == f),
                "{f} not in {features}"
            );
        }
    }

    #[test]
    fn bridge_settings_win_over_the_pass_through_map_and_defaults_yield_to_it() {
        let mut cfg = KafkaSourceConfig::new("k", "h:9092", "g", &["t"], uuid::Uuid::nil());
        cfg.librdkafka = settings(&[
            ("auto.offset.reset", "latest"),
            ("enable.auto.offset.store", "true"),
            ("sasl.password", "x"),
        ]);
        let c = consumer_config(&cfg).unwrap();
        assert_eq!(c.get("auto.offset.reset"), Some("latest"));
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("enable.auto.commit"), Some("true"));
        assert_eq!(c.get("auto.commit.interval.ms"), Some("1000"));
        assert_eq!(c.get("group.id"), Some("g"));
        let p = producer_config(&cfg, "reports");
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("acks"), Some("all"));
        assert_eq!(p.get("message.timeout.ms"), Some("30000"));
        assert_eq!(
            Scrubber::new(&settings(&[("sasl.password", "hunter2-x")])).scrub("a hunter2-x b"),
            "a [redacted] b"
        );
    }
}
