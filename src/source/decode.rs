//! Request body decoding for the HTTP source.
//!
//! A webhook body carries one event (a JSON object), several (a JSON array of
//! objects) or a stream of them (NDJSON, one object per line). This module
//! turns the raw bytes into events, or into one precise error that the HTTP
//! source can hand back to the sender: the producer of a bad body is usually
//! a person wiring up an integration, and "line 3, column 17: expected `:`"
//! saves them a round of guessing.
//!
//! Decoding is all-or-nothing: a body with any bad event is rejected whole,
//! so a sender that retries the corrected body never creates duplicates of
//! the events that were fine the first time.
//!
//! Bodies run up to 1 MiB with hundreds of events, so decoding is a single
//! pass: UTF-8 is validated once, each event is syntax-checked once and kept
//! as a slice of the body ([`RawEvent`]: the producer's bytes, nothing
//! re-serialised, no parsed tree held), and positions (line, column) are
//! only computed on the error path.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::raw_json::RawEvent;

/// How the body's events are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyFormat {
    /// One JSON object, or a JSON array of objects.
    #[default]
    Json,
    /// One JSON object per line (NDJSON / JSON Lines). Blank lines are
    /// skipped, `\r\n` line ends are accepted, and a leading RS (0x1E) on a
    /// line is ignored so single-line `application/json-seq` records work.
    Ndjson,
}

/// Media types (compared case-insensitively, parameters ignored) that select
/// [`BodyFormat::Ndjson`]. There is no single registered type for
/// line-delimited JSON, so the spellings seen in the wild are all accepted.
const NDJSON_TYPES: &[&str] = &[
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/x-jsonl",
    "application/jsonlines",
    "application/x-jsonlines",
    "application/json-seq",
];

impl BodyFormat {
    /// Pick the format from a `Content-Type` header value. Anything that is
    /// not a known line-delimited type (including a missing header) is
    /// treated as JSON: senders often omit or misspell the type, and plain
    /// JSON is the common case.
    pub fn from_content_type(ct: Option<&str>) -> BodyFormat {
        let Some(ct) = ct else {
            return BodyFormat::Json;
        };
        let essence = ct.split(';').next().unwrap_or_default().trim();
        if NDJSON_TYPES.iter().any(|t| essence.eq_ignore_ascii_case(t)) {
            BodyFormat::Ndjson
        } else {
            BodyFormat::Json
        }
    }
}

/// Why a body was rejected. Lines and columns are 1-based, relative to the
/// whole body, and columns count characters (not bytes); a leading UTF-8 BOM
/// is not counted.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq, Serialize)]
pub enum DecodeError {
    /// The body is not UTF-8 (JSON must be). `byte_offset` is the first
    /// offending byte in the body as received.
    #[error(
        "body is not valid UTF-8: invalid byte at offset {byte_offset} (line {line}, column {column})"
    )]
    InvalidUtf8 {
        byte_offset: usize,
        line: usize,
        column: usize,
    },
    /// The body (or, for NDJSON, one line of it) is not valid JSON.
    #[error("malformed JSON at line {line}, column {column}: {message}")]
    Malformed {
        line: usize,
        column: usize,
        message: String,
    },
    /// An event is valid JSON but not an object. `index` is the 0-based
    /// position among the body's events.
    #[error("event {index} (line {line}) is not a JSON object; each event must be an object")]
    NotAnObject { index: usize, line: usize },
    /// The body holds no events at all (empty, blank, `[]`).
    #[error("body contains no events")]
    Empty,
    /// More events than one request may carry.
    #[error("body contains {count} events; at most {max} are accepted per request")]
    TooManyEvents { count: usize, max: usize },
}

impl DecodeError {
    /// Stable machine-readable code, used as `error` in [`Self::to_json`].
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::InvalidUtf8 { .. } => "invalid_utf8",
            DecodeError::Malformed { .. } => "malformed_json",
            DecodeError::NotAnObject { .. } => "not_an_object",
            DecodeError::Empty => "empty",
            DecodeError::TooManyEvents { .. } => "too_many_events",
        }
    }

    /// Response body for the sender:
    /// `{"error": <code>, "message": <text>, ...}` plus the error's position
    /// (`line`, `column`, `byte_offset`, `index`) or limits (`count`, `max`)
    /// where it has them.
    pub fn to_json(&self) -> Value {
        let mut body = serde_json::Map::new();
        body.insert("error".into(), self.code().into());
        body.insert("message".into(), self.to_string().into());
        let extra: &[(&str, usize)] = match *self {
            DecodeError::InvalidUtf8 {
                byte_offset,
                line,
                column,
            } => &[
                ("line", line),
                ("column", column),
                ("byte_offset", byte_offset),
            ],
            DecodeError::Malformed { line, column, .. } => &[("line", line), ("column", column)],
            DecodeError::NotAnObject { index, line } => &[("line", line), ("index", index)],
            DecodeError::Empty => &[],
            DecodeError::TooManyEvents { count, max } => &[("count", count), ("max", max)],
        };
        for &(k, v) in extra {
            body.insert(k.into(), v.into());
        }
        Value::Object(body)
    }
}

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Decode a request body into events.
///
/// [`BodyFormat::Json`]: a single JSON object is one event, a JSON array of
/// objects is one event per element. [`BodyFormat::Ndjson`]: one object per
/// non-blank line (`\r\n` and a trailing newline are fine). A leading UTF-8
/// BOM is ignored. More than `max_events` events is an error; so is any
/// malformed or non-object event: nothing is partially accepted.
pub fn decode_events(
    body: &[u8],
    format: BodyFormat,
    max_events: usize,
) -> Result<Vec<RawEvent<'_>>, DecodeError> {
    // Some Windows tools prepend a BOM; serde_json rejects it, senders do
    // not see it, so drop it and count positions without it.
    let (bom_len, body) = match body.strip_prefix(UTF8_BOM) {
        Some(rest) => (UTF8_BOM.len(), rest),
        None => (0, body),
    };
    let text = std::str::from_utf8(body).map_err(|e| {
        let offset = e.valid_up_to();
        let (line, column) = position(body, offset);
        DecodeError::InvalidUtf8 {
            byte_offset: bom_len + offset,
            line,
            column,
        }
    })?;
    match format {
        BodyFormat::Json => decode_json(text, max_events),
        BodyFormat::Ndjson => decode_ndjson(text, max_events),
    }
}

fn decode_json(text: &str, max: usize) -> Result<Vec<RawEvent<'_>>, DecodeError> {
    let bytes = text.as_bytes();
    let start = skip_ws(bytes, 0);
    match bytes.get(start) {
        None => Err(DecodeError::Empty),
        Some(b'[') => decode_json_array(text, start, max),
        Some(_) => {
            let raw: &RawValue = serde_json::from_str(text).map_err(|e| malformed(text, 0, &e))?;
            let event = RawEvent::from_raw(raw).map_err(|_| DecodeError::NotAnObject {
                index: 0,
                line: position(bytes, start).0,
            })?;
            if max == 0 {
                return Err(DecodeError::TooManyEvents { count: 1, max });
            }
            Ok(vec![event])
        }
    }
}

/// Walk the top-level array element by element rather than parsing it into
/// one value first: each element is checked exactly once, kept as its own
/// slice of the body, and its start offset is known, so a non-object element can be
/// reported with its line. Past `max` elements are only syntax-checked
/// (`IgnoredAny`, no allocation) to report the true count.
fn decode_json_array(
    text: &str,
    open: usize,
    max: usize,
) -> Result<Vec<RawEvent<'_>>, DecodeError> {
    let bytes = text.as_bytes();
    let mut pos = skip_ws(bytes, open + 1);
    let mut events = Vec::new();
    let mut count = 0usize;

    if bytes.get(pos) == Some(&b']') {
        check_trailing(text, pos + 1)?;
        return Err(DecodeError::Empty);
    }
    loop {
        if pos == bytes.len() {
            return Err(malformed_at(text, pos, "EOF while parsing a list"));
        }
        let element = &text[pos..];
        let consumed = if count < max {
            let mut stream = serde_json::Deserializer::from_str(element).into_iter::<&RawValue>();
            match stream.next() {
                Some(Ok(raw)) => {
                    let event = RawEvent::from_raw(raw).map_err(|_| DecodeError::NotAnObject {
                        index: count,
                        line: position(bytes, pos).0,
                    })?;
                    events.push(event);
                    stream.byte_offset()
                }
                Some(Err(e)) => return Err(malformed(text, pos, &e)),
                None => return Err(malformed_at(text, pos, "EOF while parsing a list")),
            }
        } else {
            let mut stream = serde_json::Deserializer::from_str(element).into_iter::<IgnoredAny>();
            match stream.next() {
                Some(Ok(IgnoredAny)) => stream.byte_offset(),
                Some(Err(e)) => return Err(malformed(text, pos, &e)),
                None => return Err(malformed_at(text, pos, "EOF while parsing a list")),
            }
        };
        count += 1;
        pos = skip_ws(bytes, pos + consumed);
        match bytes.get(pos) {
            Some(b',') => {
                pos = skip_ws(bytes, pos + 1);
                if bytes.get(pos) == Some(&b']') {
                    return Err(malformed_at(text, pos, "trailing comma"));
                }
            }
            Some(b']') => {
                pos += 1;
                break;
            }
            Some(_) => return Err(malformed_at(text, pos, "expected ',' or ']'")),
            None => return Err(malformed_at(text, pos, "EOF while parsing a list")),
        }
    }
    check_trailing(text, pos)?;
    if count > max {
        return Err(DecodeError::TooManyEvents { count, max });
    }
    Ok(events)
}

fn check_trailing(text: &str, pos: usize) -> Result<(), DecodeError> {
    let pos = skip_ws(text.as_bytes(), pos);
    if pos < text.len() {
        return Err(malformed_at(text, pos, TRAILING_HINT));
    }
    Ok(())
}

/// Several JSON values in one `application/json` body is almost always
/// NDJSON sent with the wrong type; say how to fix it.
const TRAILING_HINT: &str = "trailing characters after the JSON value (to send several events, \
     wrap them in a JSON array or send one per line with Content-Type: application/x-ndjson)";

fn decode_ndjson(text: &str, max: usize) -> Result<Vec<RawEvent<'_>>, DecodeError> {
    let mut events = Vec::new();
    let mut count = 0usize;
    let mut line_start = 0usize;
    for (i, raw) in text.split('\n').enumerate() {
        let base = line_start;
        line_start += raw.len() + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        // json-seq (RFC 7464) records start with RS; tolerate it per line.
        let (skip, content) = match line.strip_prefix('\u{1e}') {
            Some(rest) => (1, rest),
            None => (0, line),
        };
        if content.bytes().all(is_json_ws) {
            continue;
        }
        count += 1;
        if count > max {
            // Keep counting (cheaply, without parsing) to report the total.
            continue;
        }
        let raw: &RawValue =
            serde_json::from_str(content).map_err(|e| malformed(text, base + skip, &e))?;
        let event = RawEvent::from_raw(raw).map_err(|_| DecodeError::NotAnObject {
            index: count - 1,
            line: i + 1,
        })?;
        events.push(event);
    }
    if count == 0 {
        return Err(DecodeError::Empty);
    }
    if count > max {
        return Err(DecodeError::TooManyEvents { count, max });
    }
    Ok(events)
}

fn is_json_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn skip_ws(bytes: &[u8], mut pos: usize) -> usize {
    while bytes.get(pos).copied().is_some_and(is_json_ws) {
        pos += 1;
    }
    pos
}

/// Turn a serde_json error from parsing `text[base..]` into a position in the
/// whole body, keeping serde's description but not its (relative) position.
fn malformed(text: &str, base: usize, err: &serde_json::Error) -> DecodeError {
    let sub = &text.as_bytes()[base..];
    // serde_json's line/column point at the offending byte (column 1-based,
    // in bytes); convert to an offset so the position is recomputed for the
    // whole body, in characters.
    let line_start = if err.line() <= 1 {
        0
    } else {
        sub.iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'\n')
            .nth(err.line() - 2)
            .map_or(sub.len(), |(i, _)| i + 1)
    };
    let offset = (line_start + err.column().saturating_sub(1)).min(sub.len());
    let full = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    let message = full.strip_suffix(&suffix).unwrap_or(&full);
    let message = if message == "trailing characters" {
        TRAILING_HINT
    } else {
        message
    };
    malformed_at(text, base + offset, message)
}

fn malformed_at(text: &str, offset: usize, message: &str) -> DecodeError {
    let (line, column) = position(text.as_bytes(), offset);
    DecodeError::Malformed {
        line,
        column,
        message: message.to_owned(),
    }
}

/// 1-based (line, character column) of byte `offset` in `bytes`. Counting
/// non-continuation bytes gives the character count of any prefix, even one
/// that ends inside a character or precedes invalid UTF-8.
fn position(bytes: &[u8], offset: usize) -> (usize, usize) {
    let prefix = &bytes[..offset.min(bytes.len())];
    let line_start = prefix
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = 1 + prefix[..line_start].iter().filter(|&&b| b == b'\n').count();
    let column = 1 + prefix[line_start..]
        .iter()
        .filter(|&&b| b & 0xC0 != 0x80)
        .count();
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The events as parsed values (what they mean; the byte-exact test
    /// below checks their text).
    fn values(events: Vec<RawEvent<'_>>) -> Vec<Value> {
        events
            .iter()
            .map(|e| serde_json::from_str(e.text()).unwrap())
            .collect()
    }

    fn json(body: &str) -> Result<Vec<Value>, DecodeError> {
        decode_events(body.as_bytes(), BodyFormat::Json, 1000).map(values)
    }

    fn ndjson(body: &str) -> Result<Vec<Value>, DecodeError> {
        decode_events(body.as_bytes(), BodyFormat::Ndjson, 1000).map(values)
    }

    #[test]
    fn events_are_the_bodys_bytes() {
        let a = r#"{"id": 123456789012345678901234567890, "x":1e-999,"x":2}"#;
        let b = r#"{ "k" : [1.50, "é"] }"#;
        for (body, format) in [
            (format!(" {a} \n"), BodyFormat::Json),
            (format!("[ {a} ,\n{b}]"), BodyFormat::Json),
            (format!("{a}  \r\n\u{1e}{b}\n"), BodyFormat::Ndjson),
        ] {
            let events = decode_events(body.as_bytes(), format, 10).unwrap();
            let texts: Vec<&str> = events.iter().map(|e| e.text()).collect();
            let want: &[&str] = if texts.len() == 1 { &[a] } else { &[a, b] };
            assert_eq!(texts, want, "{body:?}");
        }
    }

    fn malformed_pos(err: DecodeError) -> (usize, usize, String) {
        match err {
            DecodeError::Malformed {
                line,
                column,
                message,
            } => (line, column, message),
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn content_type_selects_format() {
        use BodyFormat::*;
        let cases = [
            (None, Json),
            (Some("application/json"), Json),
            (Some("application/json; charset=utf-8"), Json),
            (Some("text/plain"), Json),
            (Some("application/x-ndjson"), Ndjson),
            (Some("Application/X-NDJSON ; charset=UTF-8"), Ndjson),
            (Some("application/jsonl"), Ndjson),
            (Some("application/json-seq"), Ndjson),
            (Some("application/ndjson"), Ndjson),
        ];
        for (ct, want) in cases {
            assert_eq!(BodyFormat::from_content_type(ct), want, "{ct:?}");
        }
    }

    #[test]
    fn single_object() {
        assert_eq!(json(" {\"a\": 1}\n").unwrap(), vec![json!({"a": 1})]);
    }

    #[test]
    fn array_of_objects() {
        let events = json("[{\"a\":1},\n {\"b\":[1,2]} , {}]").unwrap();
        assert_eq!(events, vec![json!({"a":1}), json!({"b":[1,2]}), json!({})]);
    }

    #[test]
    fn leading_bom_is_ignored() {
        let mut body = UTF8_BOM.to_vec();
        body.extend_from_slice(b"{\"a\":1}");
        assert_eq!(
            values(decode_events(&body, BodyFormat::Json, 10).unwrap()),
            vec![json!({"a": 1})]
        );
    }

    #[test]
    fn ndjson_with_blank_lines_crlf_and_trailing_newline() {
        let body = "{\"a\":1}\r\n\r\n  \n{\"b\":2}\n\t\n{\"c\":3}\r\n";
        assert_eq!(
            ndjson(body).unwrap(),
            vec![json!({"a":1}), json!({"b":2}), json!({"c":3})]
        );
        assert_eq!(ndjson("{\"a\":1}").unwrap(), vec![json!({"a":1})]);
    }

    #[test]
    fn json_seq_records_are_accepted() {
        let body = "\u{1e}{\"a\":1}\n\u{1e}{\"b\":2}\n";
        assert_eq!(ndjson(body).unwrap(), vec![json!({"a":1}), json!({"b":2})]);
    }

    #[test]
    fn invalid_utf8_reports_offset_line_and_column() {
        let mut body = b"{\"a\":\"x\"}\n{\"b\":\"\xC3\xA9".to_vec();
        body.extend_from_slice(b"\xFF\"}");
        let err = decode_events(&body, BodyFormat::Ndjson, 10).unwrap_err();
        // Line 2 is `{"b":"é` before the bad byte: 7 characters, 8 bytes.
        assert_eq!(
            err,
            DecodeError::InvalidUtf8 {
                byte_offset: 18,
                line: 2,
                column: 8
            }
        );
        let mut with_bom = UTF8_BOM.to_vec();
        with_bom.extend_from_slice(b"{\xFE");
        assert_eq!(
            decode_events(&with_bom, BodyFormat::Json, 10).unwrap_err(),
            DecodeError::InvalidUtf8 {
                byte_offset: 4,
                line: 1,
                column: 2
            }
        );
    }

    #[test]
    fn malformed_ndjson_line_3_reports_line_3() {
        let body = "{\"a\":1}\r\n\n{\"c\" 3}\n{\"d\":4}\n";
        let (line, column, message) = malformed_pos(ndjson(body).unwrap_err());
        assert_eq!((line, column), (3, 6));
        assert_eq!(message, "expected `:`");

        let body = "{\"a\":1}\n{\"b\":2}\n{\"ü\":}\n";
        let (line, column, _) = malformed_pos(ndjson(body).unwrap_err());
        // Column counts characters: `{"ü":` is 5 characters before `}`.
        assert_eq!((line, column), (3, 6));
    }

    #[test]
    fn malformed_json_reports_whole_body_position() {
        let (line, column, message) =
            malformed_pos(json("[\n  {\"a\": 1},\n  {\"b\": tru}\n]").unwrap_err());
        assert_eq!((line, column), (3, 12));
        assert_eq!(message, "expected ident");

        let (line, column, message) = malformed_pos(json("{\"a\":\n  1,\n  x}").unwrap_err());
        assert_eq!((line, column), (3, 3));
        assert_eq!(message, "key must be a string");

        let (line, column, _) = malformed_pos(json("[{\"a\":1} {\"b\":2}]").unwrap_err());
        assert_eq!((line, column), (1, 10));

        let (_, _, message) = malformed_pos(json("[{\"a\":1},]").unwrap_err());
        assert_eq!(message, "trailing comma");

        let (line, column, message) = malformed_pos(json("[{\"a\":1}").unwrap_err());
        assert_eq!(
            (line, column, message.as_str()),
            (1, 9, "EOF while parsing a list")
        );
    }

    /// For ASCII bodies (bytes == characters) the element-by-element walk
    /// must report exactly where a whole-body serde_json parse would.
    #[test]
    fn array_error_positions_match_a_whole_body_parse() {
        let bodies = [
            "[\n  {\"a\": 1},\n  {\"b\": tru}\n]",
            "[{\"a\":1},\r\n {\"b\":\"x\" \"c\":2}]",
            "[{}, {},\n\n    {\"k\": [1, 2,, 3]}]",
            "[{}, {\"s\": \"unterminated}]",
            "[\n{\"a\":1},\n{\"b\":-}]",
        ];
        for body in bodies {
            let ours = malformed_pos(json(body).unwrap_err());
            let theirs = serde_json::from_str::<Value>(body).unwrap_err();
            assert_eq!(
                (ours.0, ours.1),
                (theirs.line(), theirs.column()),
                "{body:?}"
            );
            assert!(
                theirs.to_string().starts_with(&ours.2),
                "{body:?}: {ours:?}"
            );
        }
    }

    #[test]
    fn concatenated_objects_in_json_body_hint_at_ndjson() {
        let (line, column, message) = malformed_pos(json("{\"a\":1}\n{\"b\":2}\n").unwrap_err());
        assert_eq!((line, column), (2, 1));
        assert!(message.contains("application/x-ndjson"), "{message}");

        let (line, _, message) = malformed_pos(json("[{\"a\":1}]\n[]").unwrap_err());
        assert_eq!(line, 2);
        assert!(message.starts_with("trailing characters"), "{message}");
    }

    #[test]
    fn non_object_events_are_rejected() {
        assert_eq!(
            json("[{\"a\":1},\n\n 42, {}]").unwrap_err(),
            DecodeError::NotAnObject { index: 1, line: 3 }
        );
        assert_eq!(
            json("\n\"just a string\"").unwrap_err(),
            DecodeError::NotAnObject { index: 0, line: 2 }
        );
        assert_eq!(
            json("[[{\"a\":1}]]").unwrap_err(),
            DecodeError::NotAnObject { index: 0, line: 1 }
        );
        assert_eq!(
            ndjson("{\"a\":1}\n\n[1,2]\n").unwrap_err(),
            DecodeError::NotAnObject { index: 1, line: 3 }
        );
        assert_eq!(
            ndjson("null").unwrap_err(),
            DecodeError::NotAnObject { index: 0, line: 1 }
        );
    }

    #[test]
    fn empty_bodies() {
        for body in ["", "  \n\t", "[]", " [ \n ] \n"] {
            assert_eq!(json(body).unwrap_err(), DecodeError::Empty, "{body:?}");
        }
        for body in ["", "\n\n", "\r\n  \r\n", "\u{1e}\n"] {
            assert_eq!(ndjson(body).unwrap_err(), DecodeError::Empty, "{body:?}");
        }
    }

    #[test]
    fn too_many_events_reports_true_count() {
        let array = format!("[{}]", ["{\"a\":1}"; 5].join(","));
        assert_eq!(
            decode_events(array.as_bytes(), BodyFormat::Json, 3).unwrap_err(),
            DecodeError::TooManyEvents { count: 5, max: 3 }
        );
        assert_eq!(
            decode_events(array.as_bytes(), BodyFormat::Json, 5)
                .unwrap()
                .len(),
            5
        );
        let lines = "{\"a\":1}\n\n".repeat(4);
        assert_eq!(
            decode_events(lines.as_bytes(), BodyFormat::Ndjson, 2).unwrap_err(),
            DecodeError::TooManyEvents { count: 4, max: 2 }
        );
        assert_eq!(
            decode_events(b"{}", BodyFormat::Json, 0).unwrap_err(),
            DecodeError::TooManyEvents { count: 1, max: 0 }
        );
    }

    #[test]
    fn large_body_decodes_every_event() {
        let one = json!({"id": "x".repeat(900), "n": 1, "nested": {"k": [1, 2, 3]}});
        let array = Value::Array(vec![one.clone(); 1000]).to_string();
        assert!(array.len() > 900_000);
        let events = decode_events(array.as_bytes(), BodyFormat::Json, 1000).unwrap();
        assert_eq!(events.len(), 1000);
        assert!(values(events).iter().all(|e| *e == one));

        let lines: String = (0..1000).map(|_| format!("{one}\n")).collect();
        let events = decode_events(lines.as_bytes(), BodyFormat::Ndjson, 1000).unwrap();
        assert_eq!(events.len(), 1000);
    }

    #[test]
    fn errors_serialise_for_the_sender() {
        let err = DecodeError::Malformed {
            line: 3,
            column: 6,
            message: "expected `:`".into(),
        };
        assert_eq!(
            err.to_json(),
            json!({
                "error": "malformed_json",
                "message": "malformed JSON at line 3, column 6: expected `:`",
                "line": 3,
                "column": 6
            })
        );
        assert_eq!(
            DecodeError::InvalidUtf8 {
                byte_offset: 9,
                line: 2,
                column: 1
            }
            .to_json(),
            json!({
                "error": "invalid_utf8",
                "message": "body is not valid UTF-8: invalid byte at offset 9 (line 2, column 1)",
                "line": 2, "column": 1, "byte_offset": 9
            })
        );
        assert_eq!(
            DecodeError::NotAnObject { index: 2, line: 4 }.to_json(),
            json!({
                "error": "not_an_object",
                "message": "event 2 (line 4) is not a JSON object; each event must be an object",
                "line": 4, "index": 2
            })
        );
        assert_eq!(
            DecodeError::Empty.to_json(),
            json!({"error": "empty", "message": "body contains no events"})
        );
        assert_eq!(
            DecodeError::TooManyEvents { count: 5, max: 3 }.to_json()["error"],
            "too_many_events"
        );
    }
}
