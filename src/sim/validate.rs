//! Request validation: the 400 rules of the contract, with messages that say
//! which field of which case is wrong, so a client author can fix the request
//! from the error alone.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::state::ListParams;
use crate::duvo::types::{
    CaseStatus, Label, MAX_CASES_PER_REQUEST, MAX_TITLE_CHARS, NewCase, Priority, SearchRequest,
    SortBy, SortOrder,
};

/// A rejected request: the first problem as the message, all as details.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    pub message: String,
    pub problems: Vec<String>,
}

impl Invalid {
    fn one(msg: impl Into<String>) -> Self {
        let m = msg.into();
        Invalid {
            message: m.clone(),
            problems: vec![m],
        }
    }
}

/// Validate a create body and return the cases in request order.
/// Data text that makes the simulator refuse a case as invalid (400).
pub const REJECT_MARKER: &str = r#""simulate":"reject""#;

/// The test hook a case's data asks for: the `simulate` member of data
/// that is a JSON object (`{"simulate": "fail", ...}`, however spaced), or
/// the compact marker anywhere in other data. Clients keep producers' bytes
/// verbatim, so the spacing is theirs.
pub fn simulate_hook(data: &str) -> Option<String> {
    if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(data) {
        return o.get("simulate").and_then(Value::as_str).map(str::to_owned);
    }
    ["fail", "reject"]
        .into_iter()
        .find(|h| data.contains(&format!(r#""simulate":"{h}""#)))
        .map(str::to_owned)
}

#[cfg(test)]
pub fn create_body(raw: &[u8]) -> Result<Vec<NewCase>, Invalid> {
    create_body_with(raw, true)
}

/// [`create_body`], refusing cases marked [`REJECT_MARKER`] only when
/// `reject_marked` (the `reject_marked` fault, on by default): turned off,
/// a test can fix the cause of a dead letter and replay it.
pub fn create_body_with(raw: &[u8], reject_marked: bool) -> Result<Vec<NewCase>, Invalid> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err(Invalid::one(
            "request body is empty; expected a JSON object with \"case\" or \"cases\"",
        ));
    }
    let v: Value = serde_json::from_slice(raw)
        .map_err(|e| Invalid::one(format!("request body is not valid JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(Invalid::one(
            "request body must be a JSON object with \"case\" or \"cases\"",
        ));
    };
    let items: Vec<(String, &Value)> = match (obj.get("case"), obj.get("cases")) {
        (Some(_), Some(_)) => {
            return Err(Invalid::one(
                "give exactly one of \"case\" and \"cases\", not both",
            ));
        }
        (None, None) => {
            return Err(Invalid::one(
                "missing \"case\" (one case) or \"cases\" (a list of 1 to 100 cases)",
            ));
        }
        (Some(c), None) => vec![("case".to_string(), c)],
        (None, Some(Value::Array(list))) => {
            if list.is_empty() {
                return Err(Invalid::one("\"cases\" must hold at least 1 case"));
            }
            if list.len() > MAX_CASES_PER_REQUEST {
                return Err(Invalid::one(format!(
                    "\"cases\" holds {} cases; at most {MAX_CASES_PER_REQUEST} per request",
                    list.len()
                )));
            }
            list.iter()
                .enumerate()
                .map(|(i, c)| (format!("cases[{i}]"), c))
                .collect()
        }
        (None, Some(_)) => return Err(Invalid::one("\"cases\" must be a list of case objects")),
    };
    let mut problems = Vec::new();
    let mut out = Vec::with_capacity(items.len());
    for (path, item) in items {
        match one_case(&path, item, reject_marked) {
            Ok(c) => out.push(c),
            Err(mut p) => problems.append(&mut p),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(Invalid {
            message: problems[0].clone(),
            problems,
        })
    }
}

fn one_case(path: &str, v: &Value, reject_marked: bool) -> Result<NewCase, Vec<String>> {
    let Value::Object(o) = v else {
        return Err(vec![format!("{path}: a case must be a JSON object")]);
    };
    let mut problems = Vec::new();
    let title = match o.get("title") {
        None | Some(Value::Null) => {
            problems.push(format!("{path}.title is required"));
            String::new()
        }
        Some(Value::String(t)) => {
            if t.trim().is_empty() {
                problems.push(format!("{path}.title must not be empty"));
            }
            let n = t.chars().count();
            if n > MAX_TITLE_CHARS {
                problems.push(format!(
                    "{path}.title has {n} characters; at most {MAX_TITLE_CHARS}"
                ));
            }
            t.clone()
        }
        Some(_) => {
            problems.push(format!("{path}.title must be a string"));
            String::new()
        }
    };
    let data = match o.get("data") {
        None | Some(Value::Null) => None,
        // Test hook, like `"simulate":"fail"` for the agent: a case whose
        // data carries `"simulate":"reject"` is invalid, so clients can
        // exercise their handling of one poison case inside a batch.
        Some(Value::String(d))
            if reject_marked && simulate_hook(d).as_deref() == Some("reject") =>
        {
            problems.push(format!(
                "{path}.data is refused by the simulator (it contains {REJECT_MARKER})"
            ));
            None
        }
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => {
            problems.push(format!(
                "{path}.data must be a string (serialise a JSON document to a string)"
            ));
            None
        }
    };
    let labels = labels(path, o, &mut problems);
    let priority = match o.get("priority") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) => match p.as_str() {
            "none" => Some(Priority::None),
            "medium" => Some(Priority::Medium),
            "high" => Some(Priority::High),
            other => {
                problems.push(format!(
                    "{path}.priority {other:?} is not one of none, medium, high"
                ));
                None
            }
        },
        Some(_) => {
            problems.push(format!("{path}.priority must be one of none, medium, high"));
            None
        }
    };
    if problems.is_empty() {
        Ok(NewCase {
            title,
            data,
            labels,
            priority,
        })
    } else {
        Err(problems)
    }
}

fn labels(path: &str, o: &Map<String, Value>, problems: &mut Vec<String>) -> Vec<Label> {
    let list = match o.get("labels") {
        None | Some(Value::Null) => return Vec::new(),
        Some(Value::Array(l)) => l,
        Some(_) => {
            problems.push(format!(
                "{path}.labels must be a list of {{key, value}} objects"
            ));
            return Vec::new();
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, l) in list.iter().enumerate() {
        let key = l.get("key").and_then(Value::as_str);
        let value = l.get("value").and_then(Value::as_str);
        match (key, value) {
            (Some(k), Some(v)) if !k.is_empty() => out.push(Label {
                key: k.to_owned(),
                value: v.to_owned(),
            }),
            _ => problems.push(format!(
                "{path}.labels[{i}] must be an object with a non-empty string \"key\" and a string \"value\""
            )),
        }
    }
    out
}

/// Default and bounds of `limit` (list and search).
pub const DEFAULT_LIMIT: u32 = 20;
pub const MAX_LIMIT: u32 = 100;

fn check_limit(limit: Option<u32>) -> Result<u32, Invalid> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(l) if (1..=MAX_LIMIT).contains(&l) => Ok(l),
        Some(l) => Err(Invalid::one(format!(
            "limit {l} is out of range; use 1 to {MAX_LIMIT}"
        ))),
    }
}

fn parse_time(name: &str, v: &str) -> Result<DateTime<Utc>, Invalid> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            Invalid::one(format!(
                "{name} {v:?} is not an RFC 3339 timestamp (e.g. 2026-01-31T12:00:00Z): {e}"
            ))
        })
}

/// Parse the query of `GET /queues/{id}/cases`. Unknown parameters are
/// ignored (forward compatibility); a repeated parameter: the last wins.
pub fn list_query(pairs: &[(String, String)]) -> Result<ListParams, Invalid> {
    let mut p = ListParams {
        statuses: Vec::new(),
        search: None,
        created_at_from: None,
        updated_at_from: None,
        sort_by: SortBy::CreatedAt,
        sort_order: SortOrder::Desc,
        limit: DEFAULT_LIMIT,
        offset: 0,
    };
    for (k, v) in pairs {
        match k.as_str() {
            "limit" => {
                let l = v.parse::<u32>().map_err(|_| {
                    Invalid::one(format!(
                        "limit {v:?} is not a whole number between 1 and {MAX_LIMIT}"
                    ))
                })?;
                p.limit = check_limit(Some(l))?;
            }
            "offset" => {
                p.offset = v.parse::<u64>().map_err(|_| {
                    Invalid::one(format!("offset {v:?} is not a non-negative whole number"))
                })?;
            }
            "status" => {
                p.statuses = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        s.parse::<CaseStatus>().map_err(|_| {
                            Invalid::one(format!(
                                "unknown status {s:?}; use pending, claimed, completed, failed, canceled, needs_input, postponed"
                            ))
                        })
                    })
                    .collect::<Result<_, _>>()?;
            }
            "search" => p.search = non_empty_lower(v),
            "created_at_from" => p.created_at_from = Some(parse_time(k, v)?),
            "updated_at_from" => p.updated_at_from = Some(parse_time(k, v)?),
            "sort_by" => {
                p.sort_by = match v.as_str() {
                    "created_at" => SortBy::CreatedAt,
                    "updated_at" => SortBy::UpdatedAt,
                    _ => {
                        return Err(Invalid::one(format!(
                            "sort_by {v:?} is not created_at or updated_at"
                        )));
                    }
                }
            }
            "sort_order" => {
                p.sort_order = match v.as_str() {
                    "asc" => SortOrder::Asc,
                    "desc" => SortOrder::Desc,
                    _ => return Err(Invalid::one(format!("sort_order {v:?} is not asc or desc"))),
                }
            }
            _ => {}
        }
    }
    Ok(p)
}

fn non_empty_lower(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_lowercase())
}

/// Parse and validate a search body (empty body = all defaults).
pub fn search_body(raw: &[u8]) -> Result<ListParams, Invalid> {
    let req: SearchRequest = if raw.iter().all(u8::is_ascii_whitespace) {
        SearchRequest::default()
    } else {
        serde_json::from_slice(raw)
            .map_err(|e| Invalid::one(format!("invalid search body: {e}")))?
    };
    Ok(ListParams {
        statuses: req.filters.status,
        search: req.search.as_deref().and_then(non_empty_lower),
        created_at_from: req.filters.created_at_from,
        updated_at_from: req.filters.updated_at_from,
        sort_by: req.sort_by.unwrap_or_default(),
        sort_order: req.sort_order.unwrap_or_default(),
        limit: check_limit(req.limit)?,
        offset: req.offset.unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> String {
        create_body(body.as_bytes()).unwrap_err().message
    }

    #[test]
    fn create_rules() {
        assert!(err("{nope").contains("not valid JSON"));
        assert!(err("[]").contains("JSON object"));
        assert!(err("{}").contains("missing"));
        assert!(err(r#"{"case":{"title":"a"},"cases":[]}"#).contains("not both"));
        assert!(err(r#"{"cases":[]}"#).contains("at least 1"));
        let many = format!(
            r#"{{"cases":[{}]}}"#,
            vec![r#"{"title":"t"}"#; 101].join(",")
        );
        assert!(err(&many).contains("at most 100"));
        assert!(err(r#"{"case":{}}"#).contains("title is required"));
        assert!(err(r#"{"case":{"title":""}}"#).contains("must not be empty"));
        let long = "é".repeat(501);
        assert!(err(&format!(r#"{{"case":{{"title":"{long}"}}}}"#)).contains("501 characters"));
        let ok500 = "é".repeat(500);
        assert!(create_body(format!(r#"{{"case":{{"title":"{ok500}"}}}}"#).as_bytes()).is_ok());
        assert!(err(r#"{"case":{"title":"a","data":{"x":1}}}"#).contains("data must be a string"));
        assert!(err(r#"{"case":{"title":"a","labels":[{"key":"k"}]}}"#).contains("labels[0]"));
        assert!(err(r#"{"case":{"title":"a","priority":"urgent"}}"#).contains("priority"));
        assert!(
            err(r#"{"case":{"title":"a","data":"{\"simulate\":\"reject\"}"}}"#).contains("refused")
        );
        let e = create_body(br#"{"cases":[{"title":"a"},{},{"title":""}]}"#).unwrap_err();
        assert_eq!(e.problems.len(), 2);
        assert!(e.message.starts_with("cases[1]"));
    }

    #[test]
    fn create_ok_keeps_order_and_fields() {
        let c = create_body(
            br#"{"cases":[{"title":"a","data":"d","labels":[{"key":"k","value":"v"}],"priority":"high"},{"title":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].priority, Some(Priority::High));
        assert_eq!(c[0].labels[0].key, "k");
        assert_eq!(c[1].title, "b");
    }

    #[test]
    fn list_query_rules() {
        let q = |s: &[(&str, &str)]| {
            list_query(
                &s.iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect::<Vec<_>>(),
            )
        };
        let d = q(&[]).unwrap();
        assert_eq!(
            (d.limit, d.offset, d.sort_by, d.sort_order),
            (20, 0, SortBy::CreatedAt, SortOrder::Desc)
        );
        assert!(q(&[("limit", "0")]).is_err());
        assert!(q(&[("limit", "101")]).is_err());
        assert!(q(&[("limit", "x")]).is_err());
        assert!(q(&[("status", "pending,bogus")]).is_err());
        assert!(q(&[("updated_at_from", "yesterday")]).is_err());
        assert!(q(&[("sort_by", "title")]).is_err());
        let p = q(&[("status", "failed,needs_input"), ("search", "ORD")]).unwrap();
        assert_eq!(p.statuses, vec![CaseStatus::Failed, CaseStatus::NeedsInput]);
        assert_eq!(p.search.as_deref(), Some("ord"));
    }
}
