//! An event's JSON object as the producer wrote it, and exact field lookups
//! on it.
//!
//! A case's `data` must be the producer's bytes: parsing into
//! `serde_json::Value` and serialising again turns a 30-digit order number
//! into `1.2345678901234568e+29`, `1e-999` into `0.0`, drops duplicate keys
//! and reorders the rest. Worse, an id field read through `Value` makes two
//! distinct big-integer ids the same dedupe identity, and the second event is
//! acknowledged as a duplicate and never becomes a case. So an event stays
//! text ([`RawEvent`]); a lookup walks the text along a JSON pointer with
//! borrowed [`RawValue`]s and hands back the leaf as written ([`Field`]):
//! numbers keep their digits, strings are unescaped, objects and arrays are
//! compact text. Nothing of the event is materialised beyond the path.

use std::borrow::Cow;
use std::fmt;

use serde::Deserializer as _;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// A JSON object's text, validated, exactly as received (surrounding
/// whitespace excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent<'a> {
    text: &'a str,
}

/// Why a text is not an event.
#[derive(Debug, thiserror::Error)]
pub enum RawEventError {
    /// Not valid JSON (serde_json's message, with its position).
    #[error("{0}")]
    Malformed(#[from] serde_json::Error),
    /// Valid JSON, but not an object.
    #[error("not a JSON object")]
    NotAnObject,
}

impl<'a> RawEvent<'a> {
    /// Validate `text` as one JSON object (whitespace around it allowed).
    /// Numbers of any size or precision are accepted, as JSON allows.
    pub fn parse(text: &'a str) -> Result<RawEvent<'a>, RawEventError> {
        let raw: &'a RawValue = serde_json::from_str(text)?;
        RawEvent::from_raw(raw)
    }

    /// An already validated JSON value; refused unless it is an object.
    pub fn from_raw(raw: &'a RawValue) -> Result<RawEvent<'a>, RawEventError> {
        let text = raw.get();
        if text.starts_with('{') {
            Ok(RawEvent { text })
        } else {
            Err(RawEventError::NotAnObject)
        }
    }

    /// The object's text, byte for byte as the producer sent it.
    pub fn text(&self) -> &'a str {
        self.text
    }

    /// The value at an RFC 6901 pointer given as decoded tokens (`~0`/`~1`
    /// already undone); `None` when a step is missing. Duplicate keys
    /// resolve to the last one, as JSON parsers commonly do.
    pub fn lookup<S: AsRef<str>>(&self, tokens: &[S]) -> Option<Field<'a>> {
        let mut at: &'a str = self.text;
        for token in tokens {
            at = child(at, token.as_ref())?;
        }
        Some(Field::of(at))
    }

    /// [`RawEvent::lookup`] with the pointer in its text form (`/a/b~1c/0`);
    /// `None` for a pointer that is not valid RFC 6901 syntax. The empty
    /// pointer is the whole event.
    pub fn pointer(&self, pointer: &str) -> Option<Field<'a>> {
        if pointer.is_empty() {
            return Some(Field::of(self.text));
        }
        let tokens = pointer
            .strip_prefix('/')?
            .split('/')
            .map(|t| unescape_token(t).ok())
            .collect::<Option<Vec<_>>>()?;
        self.lookup(&tokens)
    }
}

/// A looked-up value, as written in the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field<'a> {
    Null,
    Bool(bool),
    /// The number's text exactly as sent (`123456789012345678901234567890`,
    /// `1e-999`).
    Number(&'a str),
    /// The string, unescaped.
    String(Cow<'a, str>),
    /// An object's or array's text as sent.
    Composite(&'a str),
}

impl<'a> Field<'a> {
    fn of(text: &'a str) -> Field<'a> {
        match text.as_bytes().first() {
            Some(b'n') => Field::Null,
            Some(b't') => Field::Bool(true),
            Some(b'f') => Field::Bool(false),
            // Validated JSON: a string always parses, unescaping only
            // allocates when the string has escapes.
            Some(b'"') => serde_json::from_str::<Cow<'a, str>>(text)
                .map(Field::String)
                .unwrap_or(Field::Null),
            Some(b'{' | b'[') => Field::Composite(text),
            _ => Field::Number(text),
        }
    }

    /// The text a template or an identity uses: strings as themselves,
    /// numbers and booleans as their JSON text, objects and arrays as
    /// compact JSON (whitespace outside strings removed, nothing else
    /// changed); `None` for null.
    pub fn render(&self) -> Option<Cow<'a, str>> {
        match self {
            Field::Null => None,
            Field::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
            Field::Number(n) => Some(Cow::Borrowed(n)),
            Field::String(s) => Some(s.clone()),
            Field::Composite(c) => Some(compact(c)),
        }
    }
}

impl Field<'_> {
    /// The field as an id (dedupe identities): a non-empty string, or a
    /// number's text exactly as written, so two ids differing in their 30th
    /// digit stay two ids. Anything else is not an id.
    pub fn as_id(&self) -> Option<String> {
        match self {
            Field::String(s) if !s.is_empty() => Some(s.to_string()),
            Field::Number(n) => Some((*n).to_owned()),
            _ => None,
        }
    }
}

/// Undo `~1` -> `/` and `~0` -> `~` in one RFC 6901 reference token; any
/// other `~` is invalid.
pub fn unescape_token(token: &str) -> Result<String, String> {
    let mut out = String::with_capacity(token.len());
    let mut chars = token.chars();
    while let Some(c) = chars.next() {
        match c {
            '~' => match chars.next() {
                Some('0') => out.push('~'),
                Some('1') => out.push('/'),
                _ => {
                    return Err("'~' must be followed by '0' (for '~') or '1' (for '/')".to_owned());
                }
            },
            c => out.push(c),
        }
    }
    Ok(out)
}

/// RFC 6901 array index: `0` or digits without a leading zero.
pub fn array_index(token: &str) -> Option<usize> {
    let valid = !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_digit())
        && (token == "0" || !token.starts_with('0'));
    if valid { token.parse().ok() } else { None }
}

/// The text of `parent`'s member `token` (object key, or array index).
fn child<'a>(parent: &'a str, token: &str) -> Option<&'a str> {
    let mut de = serde_json::Deserializer::from_str(parent);
    match parent.as_bytes().first() {
        Some(b'{') => de.deserialize_map(MemberOf { key: token }).ok()?,
        Some(b'[') => {
            let index = array_index(token)?;
            de.deserialize_seq(ElementOf { index }).ok()?
        }
        _ => None,
    }
}

/// Finds one key's value in an object without building the object.
struct MemberOf<'k> {
    key: &'k str,
}

impl<'de> Visitor<'de> for MemberOf<'_> {
    type Value = Option<&'de str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == self.key {
                found = Some(map.next_value::<&'de RawValue>()?.get());
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// Finds one element of an array without building the array.
struct ElementOf {
    index: usize,
}

impl<'de> Visitor<'de> for ElementOf {
    type Value = Option<&'de str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        let mut i = 0usize;
        loop {
            if i == self.index {
                match seq.next_element_seed(Raw)? {
                    Some(v) => found = Some(v),
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            i += 1;
        }
        Ok(found)
    }
}

/// Seed that captures an element's raw text.
struct Raw;

impl<'de> DeserializeSeed<'de> for Raw {
    type Value = &'de str;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        <&'de RawValue as serde::Deserialize>::deserialize(d).map(RawValue::get)
    }
}

/// JSON text with the whitespace outside strings removed; borrowed when
/// there is none.
fn compact(text: &str) -> Cow<'_, str> {
    let is_ws = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let mut in_string = false;
    let mut escaped = false;
    let mut needs = false;
    for &b in text.as_bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else if is_ws(b) {
            needs = true;
            break;
        }
    }
    if !needs {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    in_string = false;
    escaped = false;
    for c in text.chars() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            out.push(c);
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !(c.is_ascii() && is_ws(c as u8)) {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(text: &str) -> RawEvent<'_> {
        RawEvent::parse(text).unwrap()
    }

    #[test]
    fn text_is_kept_byte_for_byte() {
        let text = r#"{"b": 123456789012345678901234567890, "a":1e-999,"a":2, "x" : "é\u00e9"}"#;
        assert_eq!(ev(&format!("  {text}\n")).text(), text);
    }

    #[test]
    fn numbers_of_any_size_are_accepted_and_read_exactly() {
        let e = ev(r#"{"big":123456789012345678901234567890,"tiny":1e-999,"huge":1e999}"#);
        assert_eq!(
            e.pointer("/big"),
            Some(Field::Number("123456789012345678901234567890"))
        );
        assert_eq!(e.pointer("/tiny"), Some(Field::Number("1e-999")));
        assert_eq!(e.pointer("/huge"), Some(Field::Number("1e999")));
    }

    #[test]
    fn lookups_walk_objects_and_arrays() {
        let e = ev(r#"{"a":{"b/c":[10,{"d~":"x\ny"}]},"t":true,"n":null}"#);
        assert_eq!(e.pointer("/a/b~1c/0"), Some(Field::Number("10")));
        assert_eq!(
            e.pointer("/a/b~1c/1/d~0"),
            Some(Field::String("x\ny".into()))
        );
        assert_eq!(e.pointer("/a/b~1c/2"), None);
        assert_eq!(e.pointer("/a/b~1c/01"), None);
        assert_eq!(e.pointer("/t"), Some(Field::Bool(true)));
        assert_eq!(e.pointer("/n"), Some(Field::Null));
        assert_eq!(e.pointer("/missing"), None);
        assert_eq!(e.pointer("/t/deeper"), None);
        assert_eq!(e.pointer("no-slash"), None);
        assert_eq!(e.pointer("/bad~2"), None);
    }

    #[test]
    fn the_last_of_duplicate_keys_wins() {
        assert_eq!(
            ev(r#"{"a":1,"a":2}"#).pointer("/a"),
            Some(Field::Number("2"))
        );
    }

    #[test]
    fn composites_render_compact_with_strings_untouched() {
        let e = ev(r#"{"o": { "k" : [1, 2.50, "a b\" c" ] }}"#);
        let f = e.pointer("/o").unwrap();
        assert_eq!(f.render().unwrap(), r#"{"k":[1,2.50,"a b\" c"]}"#);
        assert_eq!(e.pointer("/o/k/2").unwrap().render().unwrap(), "a b\" c");
    }

    #[test]
    fn non_objects_and_bad_json_are_refused() {
        assert!(matches!(
            RawEvent::parse("[1]"),
            Err(RawEventError::NotAnObject)
        ));
        assert!(matches!(
            RawEvent::parse("\"s\""),
            Err(RawEventError::NotAnObject)
        ));
        assert!(matches!(
            RawEvent::parse("{\"a\":}"),
            Err(RawEventError::Malformed(_))
        ));
        assert!(matches!(
            RawEvent::parse("{} {}"),
            Err(RawEventError::Malformed(_))
        ));
    }
}
