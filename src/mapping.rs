//! Event -> case mapping.
//!
//! Every source (Kafka, RabbitMQ, webhooks) hands the pipeline a JSON event;
//! this module turns it into the [`NewCase`] the Duvo API wants. The mapping
//! is configured per source with small string templates rather than code, so
//! operators can change titles and labels without a rebuild.
//!
//! Templates are compiled once ([`Mapper::new`]) so configuration mistakes
//! are reported at start-up (and by `validate`), all at once, naming the
//! offending field. Mapping itself ([`Mapper::map`]) is total: a delivered
//! event must never be dropped or wedge the pipeline because a field is
//! missing, so every gap falls back to something the API accepts.
//!
//! # Template syntax
//!
//! * Literal text is copied verbatim.
//! * `{/json/pointer}` is replaced by the field at that
//!   [RFC 6901](https://www.rfc-editor.org/rfc/rfc6901) JSON pointer
//!   (`~1` stands for `/` and `~0` for `~` inside a key; array elements are
//!   addressed by index, e.g. `{/items/0/sku}`). Strings are inserted
//!   verbatim, numbers and booleans as their JSON text, objects and arrays as
//!   compact JSON. A missing or `null` field renders as the empty string.
//! * `{/json/pointer|fallback text}` renders `fallback text` instead when the
//!   field is missing or `null`. Everything after the first `|` is the
//!   fallback, so a pointer cannot address a key containing `|`; the fallback
//!   cannot contain `{` or `}`.
//! * `{{` and `}}` are a literal `{` and `}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::raw_json::{Field, RawEvent, unescape_token};

use crate::duvo::types::{Label, MAX_TITLE_CHARS, NewCase, Priority};

/// Default title template: most event schemas carry an `id`, and a title that
/// names it lets a human find the event again; events without one still get a
/// readable title instead of falling through to `title_fallback`.
pub const DEFAULT_TITLE: &str = "Event {/id|(no id)}";
/// Default for [`MappingConfig::title_fallback`].
pub const DEFAULT_TITLE_FALLBACK: &str = "Untitled event";
/// Appended to a title cut to [`MAX_TITLE_CHARS`], so a reader sees that the
/// title was shortened rather than wrongly assuming it is complete.
const ELLIPSIS: char = '…';

/// How events become Duvo cases.
///
/// Every field is optional; the defaults map any event to a case titled
/// `Event <id>` with the event itself as the case's `data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MappingConfig {
    /// Title template, e.g. `"Order {/order_id} for {/customer/name}"`.
    /// `{<JSON pointer>}` is replaced by the field (strings verbatim,
    /// numbers/booleans as JSON text, objects/arrays as compact JSON);
    /// `{/ptr|fallback text}` gives a fallback when the field is missing or
    /// null; `{{` / `}}` are literal braces. The rendered title is trimmed and
    /// cut to 500 characters (ending in `…` when cut).
    /// Default: `"Event {/id|(no id)}"`.
    pub title: String,
    /// Title used when the rendered title is empty (or only whitespace), and
    /// for payloads that are not JSON. Must not be empty.
    /// Default: `"Untitled event"`.
    pub title_fallback: String,
    /// Labels to attach, key -> value. Values use the same template syntax as
    /// `title`, so they can be static (`"team": "billing"`) or taken from the
    /// event (`"region": "{/region}"`). A label whose value renders empty
    /// (or only whitespace) is left out. Default: none.
    pub labels: BTreeMap<String, String>,
    /// Priority of every case (`none`, `medium` or `high`). Default: not sent,
    /// so the API's default (`none`) applies.
    pub priority: Option<Priority>,
    /// Optional JSON pointer (e.g. `"/severity"`) whose value (`none`,
    /// `medium` or `high`, case-insensitive) overrides `priority`. Any other
    /// value, or a missing field, leaves `priority` in effect.
    pub priority_field: Option<String>,
}

impl Default for MappingConfig {
    fn default() -> Self {
        Self {
            title: DEFAULT_TITLE.to_owned(),
            title_fallback: DEFAULT_TITLE_FALLBACK.to_owned(),
            labels: BTreeMap::new(),
            priority: None,
            priority_field: None,
        }
    }
}

/// One problem in a [`MappingConfig`], located by config field (`title`,
/// `labels.region`, ...) so the operator can find it without guessing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {kind}")]
pub struct MappingError {
    /// Config field path, e.g. `title`, `labels.region`, `priority_field`.
    pub field: String,
    /// What is wrong.
    pub kind: MappingErrorKind,
}

/// What is wrong with a mapping field. Columns are 1-based and counted in
/// characters of the template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingErrorKind {
    /// A placeholder's JSON pointer is not valid RFC 6901 syntax.
    #[error("invalid JSON pointer {pointer:?} at column {column}: {reason}")]
    InvalidPointer {
        pointer: String,
        column: usize,
        reason: String,
    },
    /// A `{` opens a placeholder that is never closed.
    #[error("unclosed '{{' at column {column} (write '{{{{' for a literal brace)")]
    UnclosedBrace { column: usize },
    /// A `}` that closes nothing.
    #[error("stray '}}' at column {column} (write '}}}}' for a literal brace)")]
    StrayBrace { column: usize },
    /// A `{` inside a placeholder (placeholders do not nest).
    #[error("'{{' at column {column} inside a placeholder (placeholders cannot nest)")]
    NestedBrace { column: usize },
    /// A field that must have content is empty.
    #[error("must not be empty")]
    Empty,
}

impl MappingError {
    fn new(field: impl Into<String>, kind: MappingErrorKind) -> Self {
        Self {
            field: field.into(),
            kind,
        }
    }
}

/// A compiled [`MappingConfig`], ready to map events.
#[derive(Debug, Clone)]
pub struct Mapper {
    title: Template,
    title_fallback: String,
    labels: Vec<(String, Template)>,
    priority: Option<Priority>,
    priority_field: Option<Pointer>,
}

impl Mapper {
    /// Compile `cfg`. Returns every problem at once (bad pointer syntax,
    /// unclosed or stray brace, empty fallback title or label key), each
    /// naming its field, so one `validate` run shows the whole list.
    pub fn new(cfg: &MappingConfig) -> Result<Mapper, Vec<MappingError>> {
        let mut errors = Vec::new();

        let title = Template::compile(&cfg.title, "title", &mut errors);
        // The fallback is the title of last resort; an empty one would make
        // the API reject the case, so refuse it up front.
        if cfg.title_fallback.trim().is_empty() {
            errors.push(MappingError::new("title_fallback", MappingErrorKind::Empty));
        }
        let labels = cfg
            .labels
            .iter()
            .map(|(key, value)| {
                let field = format!("labels.{key}");
                if key.trim().is_empty() {
                    errors.push(MappingError::new(field.clone(), MappingErrorKind::Empty));
                }
                (key.clone(), Template::compile(value, &field, &mut errors))
            })
            .collect();
        let priority_field = cfg.priority_field.as_deref().and_then(|p| {
            Pointer::parse(p)
                .map_err(|reason| {
                    errors.push(MappingError::new(
                        "priority_field",
                        MappingErrorKind::InvalidPointer {
                            pointer: p.to_owned(),
                            column: 1,
                            reason,
                        },
                    ))
                })
                .ok()
        });

        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Mapper {
            title,
            title_fallback: truncate_title(cfg.title_fallback.trim()),
            labels,
            priority: cfg.priority,
            priority_field,
        })
    }

    /// Map one event. `data` is the event's text byte for byte as the
    /// producer sent it (so reports and humans working the case see exactly
    /// what came in, big numbers and key order included). The title is trimmed and cut to [`MAX_TITLE_CHARS`] characters
    /// (never splitting a character, ending in `…` when cut); an empty title
    /// becomes `title_fallback`. Labels whose value renders empty (or blank) are
    /// skipped. Never fails: missing fields fall back.
    pub fn map(&self, event: &RawEvent<'_>) -> NewCase {
        let title = clean(&self.title.render(Some(event)));
        let title = match title.trim() {
            "" => self.title_fallback.clone(),
            t => truncate_title(t),
        };
        NewCase {
            title,
            data: Some(event.text().to_owned()),
            labels: self.render_labels(Some(event)),
            priority: self.priority_for(Some(event)),
        }
    }

    /// Map a payload that is not JSON (e.g. plain text from Kafka): `data` is
    /// the text itself and the title is `title_fallback`, since there are no
    /// fields to fill the title template with. Static labels and the static
    /// priority still apply; templated labels use their fallbacks.
    pub fn map_text(&self, text: &str) -> NewCase {
        NewCase {
            title: self.title_fallback.clone(),
            data: Some(text.to_owned()),
            labels: self.render_labels(None),
            priority: self.priority_for(None),
        }
    }

    fn render_labels(&self, event: Option<&RawEvent<'_>>) -> Vec<Label> {
        self.labels
            .iter()
            .filter_map(|(key, template)| {
                let value = clean(&template.render(event));
                (!value.trim().is_empty()).then(|| Label {
                    key: key.clone(),
                    value: truncate(&value, MAX_LABEL_VALUE_CHARS),
                })
            })
            .collect()
    }

    fn priority_for(&self, event: Option<&RawEvent<'_>>) -> Option<Priority> {
        let from_field = self
            .priority_field
            .as_ref()
            .zip(event)
            .and_then(|(ptr, event)| match ptr.resolve(event) {
                Some(Field::String(s)) => parse_priority(&s),
                _ => None,
            });
        from_field.or(self.priority)
    }
}

/// `none` / `medium` / `high`, case-insensitive, surrounding space ignored:
/// producers spell severities inconsistently and a near-miss should still count.
fn parse_priority(s: &str) -> Option<Priority> {
    let s = s.trim();
    [
        ("none", Priority::None),
        ("medium", Priority::Medium),
        ("high", Priority::High),
    ]
    .into_iter()
    .find(|(name, _)| s.eq_ignore_ascii_case(name))
    .map(|(_, p)| p)
}

/// Longest label value the bridge sends (cut like a title beyond it): the
/// API sets no limit, a case's labels are for filtering, not for payloads.
pub const MAX_LABEL_VALUE_CHARS: usize = 500;

/// `s` without what can hide or rearrange text for whoever reads the case:
/// control characters (NUL, CR, LF, tabs: a space each) and the Unicode
/// bidirectional overrides, embeddings, isolates and marks (dropped).
fn clean(s: &str) -> String {
    if !s.chars().any(|c| c.is_control() || is_bidi_control(c)) {
        return s.to_owned();
    }
    s.chars()
        .filter(|c| !is_bidi_control(*c))
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200E}' | '\u{200F}' | '\u{061C}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Cut `s` to at most [`MAX_TITLE_CHARS`] characters (see [`truncate`]).
fn truncate_title(s: &str) -> String {
    truncate(s, MAX_TITLE_CHARS)
}

/// Cut `s` to at most `max` characters, marking a cut with `…` (which
/// counts towards the limit, so the result is always accepted).
fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some(_) => {
            // Byte index of the first character that no longer fits once the
            // ellipsis takes the last slot; char_indices never splits a char.
            let cut = s.char_indices().nth(max - 1).map_or(s.len(), |(i, _)| i);
            let mut out = String::with_capacity(cut + ELLIPSIS.len_utf8());
            out.push_str(&s[..cut]);
            out.push(ELLIPSIS);
            out
        }
    }
}

/// A compiled RFC 6901 pointer: reference tokens already unescaped, so
/// resolving an event does not allocate.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pointer {
    tokens: Vec<String>,
}

impl Pointer {
    /// Parse pointer syntax. The empty pointer (whole document) is refused:
    /// in a template it is almost always a typo, and `data` already carries
    /// the whole event.
    fn parse(src: &str) -> Result<Pointer, String> {
        let Some(rest) = src.strip_prefix('/') else {
            return Err(if src.is_empty() {
                "empty pointer; a pointer starts with '/', e.g. {/id}".to_owned()
            } else {
                format!("must start with '/' (did you mean \"/{src}\"?)")
            });
        };
        let tokens = rest
            .split('/')
            .map(unescape_token)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Pointer { tokens })
    }

    fn resolve<'a>(&self, event: &RawEvent<'a>) -> Option<Field<'a>> {
        event.lookup(&self.tokens)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field {
        pointer: Pointer,
        fallback: Option<String>,
    },
}

/// A compiled template: literal runs and placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Compile `src`, pushing every problem onto `errors` (tagged with
    /// `field`) and carrying on, so all mistakes surface in one pass.
    fn compile(src: &str, field: &str, errors: &mut Vec<MappingError>) -> Template {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut push_err = |kind| errors.push(MappingError::new(field, kind));
        // (1-based column, char): columns are what a human counts in the config.
        let mut chars = src.chars().enumerate().map(|(i, c)| (i + 1, c)).peekable();

        while let Some((column, c)) = chars.next() {
            match c {
                '{' if chars.peek().is_some_and(|&(_, n)| n == '{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().is_some_and(|&(_, n)| n == '}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => push_err(MappingErrorKind::StrayBrace { column }),
                '{' => {
                    let mut inner = String::new();
                    let mut closed = false;
                    let mut nested = false;
                    for (col, c) in chars.by_ref() {
                        match c {
                            '}' => {
                                closed = true;
                                break;
                            }
                            '{' => {
                                nested = true;
                                push_err(MappingErrorKind::NestedBrace { column: col });
                            }
                            c => inner.push(c),
                        }
                    }
                    if !closed {
                        push_err(MappingErrorKind::UnclosedBrace { column });
                        break;
                    }
                    if nested {
                        continue;
                    }
                    let (ptr, fallback) = match inner.split_once('|') {
                        Some((p, f)) => (p, Some(f.to_owned())),
                        None => (inner.as_str(), None),
                    };
                    match Pointer::parse(ptr) {
                        Ok(pointer) => {
                            if !literal.is_empty() {
                                parts.push(Part::Literal(std::mem::take(&mut literal)));
                            }
                            parts.push(Part::Field { pointer, fallback });
                        }
                        Err(reason) => push_err(MappingErrorKind::InvalidPointer {
                            pointer: ptr.to_owned(),
                            column,
                            reason,
                        }),
                    }
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Template { parts }
    }

    /// Render against `event`; `None` (no JSON event) renders every
    /// placeholder as missing.
    fn render(&self, event: Option<&RawEvent<'_>>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Field { pointer, fallback } => {
                    match event
                        .and_then(|e| pointer.resolve(e))
                        .and_then(|f| f.render())
                    {
                        Some(text) => out.push_str(&text),
                        None => {
                            if let Some(f) = fallback {
                                out.push_str(f);
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

/// The title template of a source that sets none.
pub fn default_title() -> String {
    "Event {/id|}".into()
}

/// The title of a case whose template renders empty (and of wrapped
/// non-JSON) when the source sets none.
pub fn default_title_fallback() -> String {
    "Untitled event".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests write events with `json!`; sources hand the mapper text.
    trait MapValue {
        fn map_value(&self, event: &Value) -> NewCase;
    }

    impl MapValue for Mapper {
        fn map_value(&self, event: &Value) -> NewCase {
            let text = event.to_string();
            self.map(&RawEvent::parse(&text).unwrap())
        }
    }

    #[test]
    fn data_is_the_producers_text_and_big_numbers_stay_exact() {
        let mut cfg = MappingConfig {
            title: "Order {/order_id}".into(),
            ..MappingConfig::default()
        };
        cfg.labels.insert("amount".into(), "{/amount}".into());
        let m = Mapper::new(&cfg).unwrap();
        let text =
            r#"{ "order_id": 123456789012345678901234567890, "amount": 1e-999, "z":1, "a":[ 1 ] }"#;
        let case = m.map(&RawEvent::parse(text).unwrap());
        assert_eq!(case.data.as_deref(), Some(text));
        assert_eq!(case.title, "Order 123456789012345678901234567890");
        assert_eq!(case.labels[0].value, "1e-999");
    }
    use serde_json::{Value, json};

    fn mapper(title: &str) -> Mapper {
        Mapper::new(&MappingConfig {
            title: title.to_owned(),
            ..MappingConfig::default()
        })
        .expect("valid mapping")
    }

    fn errors(cfg: MappingConfig) -> Vec<MappingError> {
        Mapper::new(&cfg).expect_err("mapping should be rejected")
    }

    #[test]
    fn nested_pointers_and_literal_text() {
        let m = mapper("Order {/order_id} for {/customer/name} ({/items/1/sku})");
        let ev = json!({
            "order_id": "ORD-1",
            "customer": {"name": "Ada"},
            "items": [{"sku": "A"}, {"sku": "B"}]
        });
        assert_eq!(m.map_value(&ev).title, "Order ORD-1 for Ada (B)");
    }

    #[test]
    fn escaped_pointer_tokens() {
        let m = mapper("{/a~1b}|{/m~0n}|{/x~01}");
        let ev = json!({"a/b": "slash", "m~n": "tilde", "x~1": "literal"});
        assert_eq!(m.map_value(&ev).title, "slash|tilde|literal");
    }

    #[test]
    fn numbers_bools_objects_and_arrays_render_as_json() {
        let m = mapper("{/n} {/f} {/b} {/o} {/a}");
        let ev = json!({"n": 42, "f": 1.5, "b": true, "o": {"k": "v", "z": [1]}, "a": [1, "x"]});
        assert_eq!(
            m.map_value(&ev).title,
            r#"42 1.5 true {"k":"v","z":[1]} [1,"x"]"#
        );
    }

    #[test]
    fn missing_or_null_fields_use_the_fallback() {
        let m = mapper("A={/a|none} B={/b|nil} C={/c}. D={/d/e|deep}");
        let ev = json!({"b": null, "d": "not an object"});
        assert_eq!(m.map_value(&ev).title, "A=none B=nil C=. D=deep");
        // Present-but-empty is not missing.
        assert_eq!(m.map_value(&json!({"a": ""})).title, "A= B=nil C=. D=deep");
    }

    #[test]
    fn array_indices_follow_rfc6901() {
        let m = mapper("[{/a/0|-}{/a/01|x}{/a/-|y}{/a/9|z}]");
        assert_eq!(
            m.map_value(&json!({"a": ["first", "second"]})).title,
            "[firstxyz]"
        );
    }

    #[test]
    fn doubled_braces_are_literal() {
        let m = mapper("{{literal}} {{{/id}}}");
        assert_eq!(m.map_value(&json!({"id": 7})).title, "{literal} {7}");
    }

    #[test]
    fn empty_title_uses_title_fallback() {
        let m = Mapper::new(&MappingConfig {
            title: "{/subject}".into(),
            title_fallback: "No subject".into(),
            ..MappingConfig::default()
        })
        .expect("valid");
        assert_eq!(m.map_value(&json!({})).title, "No subject");
        assert_eq!(m.map_value(&json!({"subject": "   "})).title, "No subject");
        assert_eq!(m.map_value(&json!({"subject": "  Hi  "})).title, "Hi");
    }

    #[test]
    fn default_config_maps_any_event() {
        let m = Mapper::new(&MappingConfig::default()).expect("defaults are valid");
        assert_eq!(m.map_value(&json!({"id": "e-1"})).title, "Event e-1");
        let case = m.map_value(&json!({"id": 5, "x": "y"}));
        assert_eq!(case.data.as_deref(), Some(r#"{"id":5,"x":"y"}"#));
        assert!(case.labels.is_empty());
        assert_eq!(case.priority, None);
    }

    #[test]
    fn control_and_bidi_characters_never_reach_titles_or_labels() {
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("note".to_string(), "{/note}".to_string());
        let m = Mapper::new(&MappingConfig {
            title: "Order {/id}".into(),
            title_fallback: "x".into(),
            labels,
            priority: None,
            priority_field: None,
        })
        .unwrap();
        let ev = serde_json::json!({
            "id": "A\u{0}B\r\nC\u{202E}gpj.exe\u{2066}",
            "note": "x".repeat(2000) + "\u{200F}",
        });
        let c = m.map_value(&ev);
        assert_eq!(c.title, "Order A B  Cgpj.exe");
        let note = &c.labels[0].value;
        assert_eq!(note.chars().count(), MAX_LABEL_VALUE_CHARS);
        assert!(note.ends_with('…'));
        assert!(!note.contains('\u{200F}'));
        // The event itself is untouched in `data`.
        assert!(c.data.unwrap().contains('\u{202E}'));
    }

    #[test]
    fn title_of_exactly_500_multibyte_chars_is_kept() {
        let m = mapper("{/t}");
        let t: String = "é🙂".repeat(250);
        assert_eq!(t.chars().count(), 500);
        assert_eq!(m.map_value(&json!({ "t": t })).title, t);
    }

    #[test]
    fn long_title_is_cut_to_500_chars_with_ellipsis() {
        let m = mapper("{/t}");
        let t: String = "日本🙂".repeat(200); // 600 chars, 3- and 4-byte
        let title = m.map_value(&json!({ "t": t })).title;
        assert_eq!(title.chars().count(), MAX_TITLE_CHARS);
        assert!(title.ends_with('…'));
        let kept: String = t.chars().take(MAX_TITLE_CHARS - 1).collect();
        assert_eq!(title, format!("{kept}…"));

        let t501 = "ü".repeat(501);
        let title = m.map_value(&json!({ "t": t501 })).title;
        assert_eq!(title, format!("{}…", "ü".repeat(499)));
    }

    #[test]
    fn long_title_fallback_is_cut_too() {
        let m = Mapper::new(&MappingConfig {
            title_fallback: "x".repeat(600),
            ..MappingConfig::default()
        })
        .expect("valid");
        assert_eq!(m.map_text("hi").title.chars().count(), MAX_TITLE_CHARS);
    }

    #[test]
    fn compile_errors_are_all_reported_with_fields() {
        let cfg = MappingConfig {
            title: "{order_id} and {/ok} } {/a~2} {/x".into(),
            title_fallback: "  ".into(),
            labels: BTreeMap::from([
                ("region".into(), "{/region".into()),
                ("team".into(), "billing".into()),
                ("".into(), "x".into()),
                ("nest".into(), "{/a{/b}}".into()),
            ]),
            priority: None,
            priority_field: Some("severity".into()),
        };
        let errs = errors(cfg);
        let fields: Vec<(&str, &MappingErrorKind)> =
            errs.iter().map(|e| (e.field.as_str(), &e.kind)).collect();
        assert_eq!(
            fields,
            vec![
                (
                    "title",
                    &MappingErrorKind::InvalidPointer {
                        pointer: "order_id".into(),
                        column: 1,
                        reason: "must start with '/' (did you mean \"/order_id\"?)".into(),
                    }
                ),
                ("title", &MappingErrorKind::StrayBrace { column: 22 }),
                (
                    "title",
                    &MappingErrorKind::InvalidPointer {
                        pointer: "/a~2".into(),
                        column: 24,
                        reason: "'~' must be followed by '0' (for '~') or '1' (for '/')".into(),
                    }
                ),
                ("title", &MappingErrorKind::UnclosedBrace { column: 31 }),
                ("title_fallback", &MappingErrorKind::Empty),
                ("labels.", &MappingErrorKind::Empty),
                ("labels.nest", &MappingErrorKind::NestedBrace { column: 4 }),
                ("labels.nest", &MappingErrorKind::StrayBrace { column: 8 }),
                (
                    "labels.region",
                    &MappingErrorKind::UnclosedBrace { column: 1 }
                ),
                (
                    "priority_field",
                    &MappingErrorKind::InvalidPointer {
                        pointer: "severity".into(),
                        column: 1,
                        reason: "must start with '/' (did you mean \"/severity\"?)".into(),
                    }
                ),
            ]
        );
        assert_eq!(
            errs[0].to_string(),
            "title: invalid JSON pointer \"order_id\" at column 1: \
             must start with '/' (did you mean \"/order_id\"?)"
        );
        assert_eq!(
            errs[8].to_string(),
            "labels.region: unclosed '{' at column 1 (write '{{' for a literal brace)"
        );
    }

    #[test]
    fn empty_placeholder_is_an_error() {
        let errs = errors(MappingConfig {
            title: "x {} y {|fb}".into(),
            ..MappingConfig::default()
        });
        assert_eq!(errs.len(), 2);
        assert!(
            errs.iter()
                .all(|e| matches!(e.kind, MappingErrorKind::InvalidPointer { .. }))
        );
    }

    #[test]
    fn labels_static_and_templated() {
        let m = Mapper::new(&MappingConfig {
            labels: BTreeMap::from([
                ("team".into(), "billing".into()),
                ("region".into(), "{/geo/region}".into()),
                ("shop".into(), "shop-{/shop_id|unknown}".into()),
                ("empty".into(), "{/missing}".into()),
                ("blank".into(), " {/blank} ".into()),
            ]),
            ..MappingConfig::default()
        })
        .expect("valid");
        let case = m.map_value(&json!({"geo": {"region": "eu"}, "shop_id": 12}));
        let label = |k: &str, v: &str| Label {
            key: k.into(),
            value: v.into(),
        };
        // BTreeMap order: deterministic, sorted by key; "empty" and "blank" are skipped.
        assert_eq!(
            case.labels,
            vec![
                label("region", "eu"),
                label("shop", "shop-12"),
                label("team", "billing")
            ]
        );

        let text_case = m.map_text("plain text");
        assert_eq!(
            text_case.labels,
            vec![label("shop", "shop-unknown"), label("team", "billing")]
        );
    }

    #[test]
    fn priority_field_overrides_static_priority() {
        let m = Mapper::new(&MappingConfig {
            priority: Some(Priority::Medium),
            priority_field: Some("/meta/severity".into()),
            ..MappingConfig::default()
        })
        .expect("valid");
        let prio = |ev: Value| m.map_value(&ev).priority;
        assert_eq!(
            prio(json!({"meta": {"severity": "HIGH"}})),
            Some(Priority::High)
        );
        assert_eq!(
            prio(json!({"meta": {"severity": " none "}})),
            Some(Priority::None)
        );
        assert_eq!(
            prio(json!({"meta": {"severity": "urgent"}})),
            Some(Priority::Medium)
        );
        assert_eq!(
            prio(json!({"meta": {"severity": 3}})),
            Some(Priority::Medium)
        );
        assert_eq!(prio(json!({})), Some(Priority::Medium));
        assert_eq!(m.map_text("x").priority, Some(Priority::Medium));

        let no_static = Mapper::new(&MappingConfig {
            priority_field: Some("/p".into()),
            ..MappingConfig::default()
        })
        .expect("valid");
        assert_eq!(
            no_static.map_value(&json!({"p": "Medium"})).priority,
            Some(Priority::Medium)
        );
        assert_eq!(no_static.map_value(&json!({"p": "x"})).priority, None);
    }

    #[test]
    fn map_text_uses_text_as_data_and_fallback_title() {
        let m = mapper("Order {/id}");
        let case = m.map_text("not json at all");
        assert_eq!(case.title, DEFAULT_TITLE_FALLBACK);
        assert_eq!(case.data.as_deref(), Some("not json at all"));
    }

    #[test]
    fn config_deserializes_with_defaults_and_rejects_unknown_fields() {
        let cfg: MappingConfig =
            serde_json::from_value(json!({"title": "T {/x}", "priority": "high"}))
                .expect("valid config");
        assert_eq!(cfg.title, "T {/x}");
        assert_eq!(cfg.title_fallback, DEFAULT_TITLE_FALLBACK);
        assert_eq!(cfg.priority, Some(Priority::High));

        let err = serde_json::from_value::<MappingConfig>(json!({"titel": "x"}))
            .expect_err("unknown field");
        assert!(err.to_string().contains("titel"), "{err}");
    }
}
