//! Content-based routes, the same for every source: an ordered list of
//! rules (`[[sources.routes]]`), first match wins, then the source's own
//! queue and mapping as the default route (when it names a `queue_id`).
//!
//! A rule tests one value, a JSON pointer into the event or a header (HTTP
//! request header, AMQP message header, Kafka record header), with one of
//! `equals`, `one_of`, `prefix`, `exists`; a Kafka rule may also name a
//! `topic` (alone, it is the per-topic route Kafka sources always had).
//! Values compare as the event wrote them: strings unescaped, numbers as
//! their text (`"123456789012345678901234567890"` stays itself), booleans
//! `true`/`false`. Each rule names its queue (default: the source's), its
//! account, and may replace the title, labels and priority.
//!
//! An event no rule matches, on a source without a default queue, is
//! refused at intake (HTTP 422 `no_route`; AMQP rejected to its
//! dead-letter exchange; Kafka to its `dead_letter_topic`), never dropped
//! in silence; `duvo_bridge_events_routed_total{source,route}` counts the
//! rest.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::duvo::Priority;
use crate::mapping::{Mapper, MappingConfig};
use crate::raw_json::RawEvent;

/// One routing rule (`[[sources.routes]]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Its name in metrics and errors (default: `route-<n>`, or the topic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Kafka: only records of this topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// JSON pointer of the event value to test, e.g. `/type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
    /// Or the header to test (names are case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The value is exactly this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<String>,
    /// The value is one of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<String>>,
    /// The value starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The value is there (not null) (`true`), or is not (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
    /// Duvo queue of the matching events (default: the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_id: Option<String>,
    /// Account delivering them (default: the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Title template (default: the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Title when the template renders empty (default: the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title_fallback: Option<String>,
    /// Labels (replace the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Static priority (default: the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// JSON pointer whose value overrides `priority` (default: the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_field: Option<String>,
}

impl RouteConfig {
    /// The name used in metrics and errors; `n` is its 0-based position.
    pub fn display_name(&self, n: usize) -> String {
        self.name
            .clone()
            .or_else(|| self.topic.clone())
            .unwrap_or_else(|| format!("route-{n}"))
    }

    /// This rule's mapping: its keys, the source's for the rest.
    pub fn mapping(&self, base: &MappingConfig) -> MappingConfig {
        MappingConfig {
            title: self.title.clone().unwrap_or_else(|| base.title.clone()),
            title_fallback: self
                .title_fallback
                .clone()
                .unwrap_or_else(|| base.title_fallback.clone()),
            labels: self.labels.clone().unwrap_or_else(|| base.labels.clone()),
            priority: self.priority.or(base.priority),
            priority_field: self
                .priority_field
                .clone()
                .or_else(|| base.priority_field.clone()),
        }
    }
}

/// Where a routed event goes.
#[derive(Debug)]
pub struct Target {
    /// The route's name (`default` for the source's own).
    pub route: Arc<str>,
    pub queue_id: Uuid,
    pub mapper: Mapper,
}

#[derive(Debug)]
enum Subject {
    Pointer(String),
    Header(String),
}

#[derive(Debug)]
enum Test {
    Equals(String),
    OneOf(Vec<String>),
    Prefix(String),
    Exists(bool),
}

#[derive(Debug)]
struct Rule {
    topic: Option<String>,
    value: Option<(Subject, Test)>,
    target: Target,
}

/// What a rule can look at for one event.
pub struct Inputs<'a, 'e> {
    /// The event, when it is JSON (a wrapped non-JSON payload has none:
    /// pointer rules never match it).
    pub event: Option<&'a RawEvent<'e>>,
    /// A header's value by name (case-insensitive for HTTP).
    pub header: &'a dyn Fn(&str) -> Option<String>,
    /// Kafka: the record's topic.
    pub topic: Option<&'a str>,
}

/// A source's compiled routes.
#[derive(Debug)]
pub struct Router {
    rules: Vec<Rule>,
    default: Option<Target>,
}

impl Router {
    /// Compile `routes` over the source's `mapping` and `queue_id` (empty:
    /// no default route). Every problem is returned, each naming `at`.
    pub fn new(
        at: &str,
        mapping: &MappingConfig,
        queue_id: &str,
        routes: &[RouteConfig],
    ) -> Result<Router, Vec<String>> {
        let mut errors = Vec::new();
        let default = if queue_id.is_empty() {
            if routes.is_empty() {
                errors.push(format!(
                    "{at}.queue_id is required (or routes, each naming a queue_id)"
                ));
            }
            None
        } else {
            target(at, "default", mapping, queue_id, &mut errors)
        };
        let mut rules = Vec::new();
        for (n, r) in routes.iter().enumerate() {
            let name = r.display_name(n);
            let rat = format!("{at}.routes.{name}");
            let value = match (&r.pointer, &r.header) {
                (Some(_), Some(_)) => {
                    errors.push(format!("{rat}: set pointer or header, not both"));
                    None
                }
                (None, None) => None,
                (Some(p), None) => {
                    if !(p.is_empty() || p.starts_with('/')) {
                        errors.push(format!(
                            "{rat}.pointer {p:?} is not a JSON pointer (it starts with /)"
                        ));
                    }
                    Some(Subject::Pointer(p.clone()))
                }
                (None, Some(h)) => {
                    if h.is_empty() {
                        errors.push(format!("{rat}.header must not be empty"));
                    }
                    Some(Subject::Header(h.to_ascii_lowercase()))
                }
            };
            let tests: Vec<Test> = [
                r.equals.clone().map(Test::Equals),
                r.one_of.clone().map(Test::OneOf),
                r.prefix.clone().map(Test::Prefix),
                r.exists.map(Test::Exists),
            ]
            .into_iter()
            .flatten()
            .collect();
            let value = match (value, tests.len()) {
                (None, 0) => {
                    if r.topic.is_none() {
                        errors.push(format!(
                            "{rat}: a route needs a condition (pointer or header with equals, one_of, prefix or exists; or a Kafka topic)"
                        ));
                    }
                    None
                }
                (None, _) => {
                    errors.push(format!(
                        "{rat}: equals, one_of, prefix and exists test a pointer or header: name one"
                    ));
                    None
                }
                (Some(_), 0) => {
                    errors.push(format!(
                        "{rat}: say what to test: equals, one_of, prefix or exists"
                    ));
                    None
                }
                (Some(s), 1) => tests.into_iter().next().map(|t| (s, t)),
                (Some(_), _) => {
                    errors.push(format!(
                        "{rat}: use one of equals, one_of, prefix and exists"
                    ));
                    None
                }
            };
            let queue = r.queue_id.clone().unwrap_or_else(|| queue_id.to_string());
            if queue.is_empty() {
                errors.push(format!(
                    "{rat}.queue_id is required (the source has no queue_id of its own)"
                ));
                continue;
            }
            if let Some(t) = target(&rat, &name, &r.mapping(mapping), &queue, &mut errors) {
                rules.push(Rule {
                    topic: r.topic.clone(),
                    value,
                    target: t,
                });
            }
        }
        if errors.is_empty() {
            Ok(Router { rules, default })
        } else {
            Err(errors)
        }
    }

    /// Where the event goes: the first rule that matches, else the
    /// default route; `None` when neither (refuse it).
    pub fn route(&self, inp: &Inputs<'_, '_>) -> Option<&Target> {
        self.rules
            .iter()
            .find(|r| r.matches(inp))
            .map(|r| &r.target)
            .or(self.default.as_ref())
    }

    /// Whether every event has a route (there is a default).
    pub fn has_default(&self) -> bool {
        self.default.is_some()
    }

    /// Every target, rules first then the default (for start-up logs).
    pub fn targets(&self) -> impl Iterator<Item = &Target> {
        self.rules
            .iter()
            .map(|r| &r.target)
            .chain(self.default.as_ref())
    }
}

impl Rule {
    fn matches(&self, inp: &Inputs<'_, '_>) -> bool {
        if let Some(t) = &self.topic
            && inp.topic != Some(t.as_str())
        {
            return false;
        }
        let Some((subject, test)) = &self.value else {
            return true;
        };
        let value: Option<String> = match subject {
            Subject::Pointer(p) => inp
                .event
                .and_then(|e| e.pointer(p))
                .and_then(|f| f.render().map(|c| c.into_owned())),
            Subject::Header(h) => (inp.header)(h),
        };
        match test {
            Test::Exists(want) => value.is_some() == *want,
            Test::Equals(x) => value.as_deref() == Some(x.as_str()),
            Test::OneOf(xs) => value.is_some_and(|v| xs.contains(&v)),
            Test::Prefix(p) => value.is_some_and(|v| v.starts_with(p.as_str())),
        }
    }
}

fn target(
    at: &str,
    name: &str,
    mapping: &MappingConfig,
    queue_id: &str,
    errors: &mut Vec<String>,
) -> Option<Target> {
    let queue = match Uuid::parse_str(queue_id) {
        Ok(q) => Some(q),
        Err(_) => {
            errors.push(format!("{at}.queue_id {queue_id:?} is not a UUID"));
            None
        }
    };
    let mapper = match Mapper::new(mapping) {
        Ok(m) => Some(m),
        Err(errs) => {
            errors.extend(errs.into_iter().map(|e| format!("{at}.{e}")));
            None
        }
    };
    Some(Target {
        route: Arc::from(name),
        queue_id: queue?,
        mapper: mapper?,
    })
}

/// Count one routed event.
pub fn count_routed(source: &str, route: &str) {
    metrics::counter!("duvo_bridge_events_routed_total",
        "source" => source.to_string(), "route" => route.to_string())
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(n: u8) -> String {
        format!("00000000-0000-0000-0000-0000000000{n:02}")
    }

    fn rule(f: impl FnOnce(&mut RouteConfig)) -> RouteConfig {
        let mut r = RouteConfig::default();
        f(&mut r);
        r
    }

    fn route<'r>(
        r: &'r Router,
        body: &str,
        headers: &[(&str, &str)],
        topic: Option<&str>,
    ) -> Option<&'r Target> {
        let ev = RawEvent::parse(body).ok();
        let hs: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .collect();
        let header = move |n: &str| hs.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let inp = Inputs {
            event: ev.as_ref(),
            header: &header,
            topic,
        };
        // The borrow of `ev` ends here; only the router's data is returned.
        r.route(&inp)
    }

    #[test]
    fn first_match_wins_then_the_default() {
        let routes = vec![
            rule(|r| {
                r.name = Some("returns".into());
                r.pointer = Some("/type".into());
                r.equals = Some("return".into());
                r.queue_id = Some(q(2));
                r.title = Some("Return {/id}".into());
            }),
            rule(|r| {
                r.pointer = Some("/channel".into());
                r.one_of = Some(vec!["b2b".into(), "wholesale".into()]);
                r.queue_id = Some(q(3));
            }),
            rule(|r| {
                r.pointer = Some("/id".into());
                r.prefix = Some("VIP-".into());
                r.queue_id = Some(q(4));
            }),
            rule(|r| {
                r.header = Some("X-Priority-Lane".into());
                r.exists = Some(true);
                r.queue_id = Some(q(5));
            }),
        ];
        let r = Router::new("sources.oms", &MappingConfig::default(), &q(1), &routes).unwrap();
        let at = |body: &str, h: &[(&str, &str)]| {
            route(&r, body, h, None).map(|t| (t.route.to_string(), t.queue_id.to_string()))
        };
        assert_eq!(
            at(r#"{"type":"return","channel":"b2b"}"#, &[]),
            Some(("returns".into(), q(2)))
        );
        assert_eq!(
            at(r#"{"type":"order","channel":"b2b"}"#, &[]),
            Some(("route-1".into(), q(3)))
        );
        assert_eq!(at(r#"{"id":"VIP-7"}"#, &[]), Some(("route-2".into(), q(4))));
        assert_eq!(
            at(r#"{"id":"7"}"#, &[("x-priority-lane", "1")]),
            Some(("route-3".into(), q(5)))
        );
        assert_eq!(at(r#"{"id":"7"}"#, &[]), Some(("default".into(), q(1))));
        assert_eq!(
            at("not json", &[]),
            Some(("default".into(), q(1))),
            "pointer rules never match text"
        );
        // Numbers compare as written.
        let n = Router::new(
            "s",
            &MappingConfig::default(),
            "",
            &[rule(|r| {
                r.pointer = Some("/account".into());
                r.equals = Some("123456789012345678901234567890".into());
                r.queue_id = Some(q(9));
            })],
        )
        .unwrap();
        assert!(
            route(
                &n,
                r#"{"account":123456789012345678901234567890}"#,
                &[],
                None
            )
            .is_some()
        );
        assert!(
            route(
                &n,
                r#"{"account":123456789012345678901234567891}"#,
                &[],
                None
            )
            .is_none(),
            "no default: refused"
        );
        assert!(!n.has_default());
    }

    #[test]
    fn kafka_topic_rules_and_every_config_problem_at_once() {
        let r = Router::new(
            "sources.k",
            &MappingConfig::default(),
            &q(1),
            &[rule(|r| {
                r.topic = Some("returns".into());
                r.queue_id = Some(q(2));
            })],
        )
        .unwrap();
        assert_eq!(
            route(&r, "{}", &[], Some("returns"))
                .unwrap()
                .queue_id
                .to_string(),
            q(2)
        );
        assert_eq!(
            route(&r, "{}", &[], Some("orders"))
                .unwrap()
                .queue_id
                .to_string(),
            q(1)
        );

        let e = Router::new(
            "sources.oms",
            &MappingConfig::default(),
            "",
            &[
                rule(|r| r.queue_id = Some(q(2))),
                rule(|r| {
                    r.pointer = Some("type".into());
                    r.equals = Some("x".into());
                    r.prefix = Some("y".into());
                }),
                rule(|r| {
                    r.header = Some("h".into());
                    r.pointer = Some("/p".into());
                    r.exists = Some(true);
                    r.queue_id = Some("nope".into());
                }),
            ],
        )
        .unwrap_err();
        let all = e.join("\n");
        for needle in [
            "sources.oms.routes.route-0: a route needs a condition",
            "sources.oms.routes.route-1.pointer \"type\" is not a JSON pointer",
            "sources.oms.routes.route-1: use one of equals",
            "sources.oms.routes.route-1.queue_id is required",
            "sources.oms.routes.route-2: set pointer or header, not both",
            "sources.oms.routes.route-2.queue_id \"nope\" is not a UUID",
        ] {
            assert!(all.contains(needle), "{needle} in\n{all}");
        }
    }
}
