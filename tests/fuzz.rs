//! Property tests over everything that parses untrusted input: the intake
//! body decoder, the raw-event pointer lookups, the title/label templates,
//! the rate-limit header parsers. No input may panic; every refusal must
//! say where and why. `PROPTEST_CASES=100000` runs them longer by hand.

use std::time::{Duration, SystemTime};

use duvo_bridge::duvo::RateLimitInfo;
use duvo_bridge::duvo::headers::parse_retry_after;
use duvo_bridge::mapping::{Mapper, MappingConfig};
use duvo_bridge::raw_json::RawEvent;
use duvo_bridge::source::decode::{BodyFormat, DecodeError, decode_events};
use proptest::prelude::*;

/// Bytes that look like JSON often enough to get past the first character.
fn jsonish() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"{".to_vec()),
        Just(b"}".to_vec()),
        Just(b"[".to_vec()),
        Just(b"]".to_vec()),
        Just(b",".to_vec()),
        Just(b":".to_vec()),
        Just(b"\"k\"".to_vec()),
        Just(b"\"\\u00e9\\\"\"".to_vec()),
        Just(b"123456789012345678901234567890".to_vec()),
        Just(b"1e-999".to_vec()),
        Just(b"-0.5E+7".to_vec()),
        Just(b"true".to_vec()),
        Just(b"null".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b" ".to_vec()),
        Just(b"\xEF\xBB\xBF".to_vec()),
        Just(b"\x1e".to_vec()),
        Just("é".as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 1..4),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        "[a-zA-Z0-9 é\"\\\\/{}|~]{0,12}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("[a-z/~|]{1,4}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn the_body_decoder_never_panics_and_keeps_bytes(body in jsonish(), ndjson in any::<bool>()) {
        let format = if ndjson { BodyFormat::Ndjson } else { BodyFormat::Json };
        match decode_events(&body, format, 50) {
            Ok(events) => {
                prop_assert!(!events.is_empty());
                let text = String::from_utf8_lossy(&body);
                for e in &events {
                    // Each event is a slice of the body, and an object.
                    prop_assert!(text.contains(e.text()));
                    let v: serde_json::Value = serde_json::from_str(e.text()).unwrap_or(serde_json::Value::Null);
                    prop_assert!(v.is_object() || e.text().contains("e999") || e.text().contains("e-999") || e.text().contains("567890"));
                }
            }
            Err(DecodeError::Malformed { line, column, message }) => {
                prop_assert!(line >= 1 && column >= 1);
                prop_assert!(!message.is_empty());
            }
            Err(DecodeError::InvalidUtf8 { line, column, byte_offset }) => {
                prop_assert!(line >= 1 && column >= 1);
                prop_assert!(byte_offset < body.len());
            }
            Err(DecodeError::NotAnObject { line, .. }) => prop_assert!(line >= 1),
            Err(DecodeError::Empty) | Err(DecodeError::TooManyEvents { .. }) => {}
        }
    }

    #[test]
    fn objects_decode_to_their_own_text(v in prop::collection::vec(json_value(), 1..5)) {
        let objects: Vec<serde_json::Value> = v
            .into_iter()
            .map(|x| serde_json::json!({ "x": x }))
            .collect();
        let body = serde_json::to_string(&objects).unwrap();
        let events = decode_events(body.as_bytes(), BodyFormat::Json, 50).unwrap();
        prop_assert_eq!(events.len(), objects.len());
        for (e, o) in events.iter().zip(&objects) {
            prop_assert_eq!(e.text(), o.to_string());
        }
    }

    #[test]
    fn pointer_lookups_agree_with_serde_json(v in json_value(), ptr in "(/[a-z0-9~|]{0,3}){1,3}") {
        let event = serde_json::json!({ "a": v.clone(), "b": [v] });
        let text = event.to_string();
        let raw = RawEvent::parse(&text).unwrap();
        let ours = raw.pointer(&ptr).and_then(|f| f.render().map(|c| c.into_owned()));
        let theirs = event.pointer(&ptr).and_then(|x| match x {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        });
        // serde_json's pointer accepts `~` escapes loosely; ours follows
        // RFC 6901 strictly, so only compare where the pointer is valid.
        let strict = !ptr.contains('~') || ptr.split('~').skip(1).all(|p| p.starts_with('0') || p.starts_with('1'));
        if strict {
            prop_assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn templates_compile_or_name_their_error_and_render_within_limits(
        title in "[a-z{}/|~ ]{0,40}",
        label in "[a-z{}/|]{0,20}",
        v in json_value(),
    ) {
        let mut cfg = MappingConfig { title, ..MappingConfig::default() };
        cfg.labels.insert("l".into(), label);
        match Mapper::new(&cfg) {
            Ok(m) => {
                let text = serde_json::json!({ "a": v, "id": 1 }).to_string();
                let case = m.map(&RawEvent::parse(&text).unwrap());
                prop_assert!(!case.title.trim().is_empty());
                prop_assert!(case.title.chars().count() <= 500);
                prop_assert!(!case.title.chars().any(char::is_control));
                prop_assert_eq!(case.data.as_deref(), Some(text.as_str()));
            }
            Err(errors) => {
                prop_assert!(!errors.is_empty());
                for e in errors {
                    prop_assert!(e.field == "title" || e.field == "labels.l", "{}", e.field);
                }
            }
        }
    }

    #[test]
    fn rate_limit_headers_never_panic(
        values in prop::collection::vec(prop_oneof![
            "[ -~]{0,40}",
            "[0-9]{1,25}",
            Just("Sun, 06 Nov 1994 08:49:37 GMT".to_string()),
            Just("limit=100, remaining=0, reset=99999999999999999999".to_string()),
        ], 8),
        secs in 0u64..4_000_000_000,
    ) {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        let _ = parse_retry_after(&values[0], now);
        let names = [
            "retry-after", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset",
            "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "ratelimit",
        ];
        let mut h = reqwest::header::HeaderMap::new();
        for (n, v) in names.iter().zip(&values) {
            if let Ok(v) = reqwest::header::HeaderValue::from_str(v) {
                h.insert(*n, v);
            }
        }
        let info = RateLimitInfo::from_headers(&h, now);
        // No header holds sending back more than a day (a date in the past
        // is "now", which is fine).
        let cap = now + duvo_bridge::duvo::headers::MAX_WAIT;
        for at in [info.retry_after, info.reset_at, parse_retry_after(&values[1], now)]
            .into_iter()
            .flatten()
        {
            prop_assert!(at <= cap, "{at:?} past {cap:?}");
        }
    }
}
