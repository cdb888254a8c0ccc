//! Loading whole configuration files: every section, every error at once.

use super::*;
use crate::source::amqp::config::AmqpExchangeType;
use crate::source::{KafkaUndecodablePolicy, UndecodablePolicy};

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
    let text = include_str!("../../config/duvo-bridge.example.toml");
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
        "sources.2 (p)",
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

#[test]
fn no_config_error_quotes_a_secret_value() {
    // An override of the API key with a number: the type error must not
    // quote it.
    let vars = vec![
        (
            "DUVO_BRIDGE__DUVO__API_KEY".to_string(),
            "424242424242424242".to_string(),
        ),
        (
            "DUVO_BRIDGE__SOURCES__0__CALLBACK_SECRET".to_string(),
            "987654321987".to_string(),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, GOOD).unwrap();
    let err = Config::load_with_env(&path, vars).unwrap_err().to_string();
    assert!(!err.contains("424242424242424242"), "{err}");
    assert!(!err.contains("987654321987"), "{err}");
    assert!(err.contains("[redacted]"), "{err}");
    // A syntax error names the line, not its text.
    let bad = "[duvo]\napi_key = \"dv_live_0123456789abcdef_unterminated\n";
    let err = Config::parse(bad).unwrap_err().to_string();
    assert!(!err.contains("dv_live_0123456789abcdef"), "{err}");
    assert!(err.contains("line 2"), "{err}");
    // --print-config shows a callback URL without its password or query.
    let mut c = Config::parse(GOOD).unwrap();
    if let SourceConfig::Http(h) = &mut c.sources[0] {
        h.callback_url = Some("https://oms:hunter22@oms.example/cb?token=abc123xyz".into());
    }
    let printed = c.to_redacted_toml();
    assert!(!printed.contains("hunter22"), "{printed}");
    assert!(!printed.contains("abc123xyz"), "{printed}");
    assert!(printed.contains("oms.example/cb"), "{printed}");
}

#[test]
fn every_bad_key_of_a_section_is_reported_not_only_the_first() {
    let bad = r#"
[duvo]
api_key = "dv_x"
rate_limit_per_minute = "lots"
typo_key = 1
rate_share = "half"
[outbox]
cache_mb = "big"
high_water_events = -1
[[sources]]
type = "http"
name = "oms"
queue_id = "7b0c8a52-4a1f-4c57-9b7e-2f0f7c1d9a11"
listen = 8080
nonsense = true
title = 5
"#;
    let errs = Config::parse(bad).unwrap_err().0;
    let all = errs.join("\n");
    for needle in [
        "rate_limit_per_minute",
        "typo_key",
        "rate_share",
        "cache_mb",
        "high_water_events",
        "sources.0 (oms)",
        "listen",
        "nonsense",
        "title",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    // One line per bad key, and the source that exists is not "missing".
    assert_eq!(errs.len(), 8, "{all}");
    assert!(!all.contains("no [[sources]]"), "{all}");
}

#[test]
fn a_source_that_does_not_parse_is_not_reported_as_no_sources() {
    let errs = Config::parse(&format!(
        "{}\n[[sources]]\ntype = \"carrier-pigeon\"\nname = \"coop\"\n",
        "[duvo]\napi_key = \"dv_x\""
    ))
    .unwrap_err()
    .0;
    let all = errs.join("\n");
    assert!(
        all.contains("sources.0 (coop): unknown variant `carrier-pigeon`"),
        "{all}"
    );
    assert!(!all.contains("no [[sources]]"), "{all}");
}

#[test]
fn an_override_the_file_refuses_is_named_by_its_variable_without_its_value() {
    let vars = vec![
        ("DUVO_BRIDGE__DUVO__BURST".to_string(), "plenty".to_string()),
        (
            "DUVO_BRIDGE__SOURCES__0__LISTEN".to_string(),
            "8181".to_string(),
        ),
        ("DUVO_BRIDGE__DUVO__RATE_SHARE".to_string(), "7".to_string()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, format!("{GOOD}\n")).unwrap();
    let errs = Config::load_with_env(&path, vars).unwrap_err().0;
    let all = errs.join("\n");
    for (var, key) in [
        ("DUVO_BRIDGE__DUVO__BURST", "burst"),
        ("DUVO_BRIDGE__SOURCES__0__LISTEN", "listen"),
        ("DUVO_BRIDGE__DUVO__RATE_SHARE", "rate_share"),
    ] {
        let line = errs
            .iter()
            .find(|e| e.contains(var))
            .unwrap_or_else(|| panic!("no error names {var}:\n{all}"));
        assert!(line.contains(key), "{line}");
    }
    for value in ["plenty", "8181", "got 7"] {
        assert!(!all.contains(value), "{value:?} echoed:\n{all}");
    }
    // Only the errors about those keys name a variable.
    assert_eq!(
        errs.iter()
            .filter(|e| e.contains("environment variable"))
            .count(),
        3,
        "{all}"
    );
}

#[test]
fn an_unknown_key_near_a_known_one_is_suggested() {
    let errs = Config::parse(
        r#"
[duvo]
api_key = "dv_x"
rate_limit_per_minut = 100
[[sources]]
type = "kafka"
name = "orders"
brokers = "127.0.0.1:9092"
group_id = "g"
topic = ["orders"]
queue-id = "7b0c8a52-4a1f-4c57-9b7e-2f0f7c1d9a11"
colour = "blue"
[[sources]]
type = "kafak"
name = "other"
"#,
    )
    .unwrap_err()
    .0;
    let all = errs.join("\n");
    let line = |key: &str| {
        errs.iter()
            .find(|e| {
                e.contains(&format!("unknown field `{key}`"))
                    || e.contains(&format!("unknown variant `{key}`"))
            })
            .unwrap_or_else(|| panic!("no line for {key} in:\n{all}"))
            .clone()
    };
    assert!(
        line("rate_limit_per_minut")
            .contains("`rate_limit_per_minut` (did you mean `rate_limit_per_minute`?)"),
        "{all}"
    );
    assert!(
        line("topic").contains("`topic` (did you mean `topics`?)"),
        "{all}"
    );
    assert!(
        line("queue-id").contains("`queue-id` (did you mean `queue_id`?)"),
        "{all}"
    );
    assert!(
        line("kafak").contains("`kafak` (did you mean `kafka`?)"),
        "{all}"
    );
    // Nothing is near `colour`: no guess.
    assert!(!line("colour").contains("did you mean"), "{all}");
}
