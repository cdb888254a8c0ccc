//! The Kafka source's consumer configuration: offsets stored by the
//! bridge after the fsync, committed by librdkafka's auto-commit.

use rdkafka::ClientConfig;

use super::config::KafkaSourceConfig;

/// The consumer: offsets stored by the bridge after the fsync, committed by
/// librdkafka's auto-commit (and by the bridge on revocation).
pub fn consumer_config(cfg: &KafkaSourceConfig) -> Result<ClientConfig, String> {
    let client = cfg.client();
    let mut c = client.base("consumer");
    c.set("group.id", &cfg.group_id);
    if let Some(id) = cfg.group_instance_id()? {
        c.set("group.instance.id", id);
    }
    client.apply_passthrough(
        &mut c,
        &[
            ("auto.offset.reset", "earliest"),
            ("isolation.level", "read_committed"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::{LibrdkafkaSettings, Scrubber, check_librdkafka};

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
        assert_eq!(c.get("isolation.level"), Some("read_committed"));
        assert_eq!(c.get("group.id"), Some("g"));
        let p = cfg.client().producer_config("reports");
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("acks"), Some("all"));
        assert_eq!(p.get("message.timeout.ms"), Some("30000"));
        assert_eq!(
            Scrubber::new(&settings(&[("sasl.password", "hunter2-x")])).scrub("a hunter2-x b"),
            "a [redacted] b"
        );
    }
}
