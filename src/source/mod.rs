//! Sources turn outside input into outbox appends, and acknowledge their
//! input only after the append returned (i.e. after the fsync that covers
//! it). Each kind lives in its own module behind the small [`Source`] trait
//! so the application can start, drain and observe them uniformly.

pub mod amqp;
pub mod decode;
pub mod http;
pub mod kafka;

use std::net::SocketAddr;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::mapping::MappingConfig;
use crate::outbox::{AppendOutcome, Outbox};
use crate::routing::{RouteConfig, Router};
pub use amqp::config::{AmqpSourceConfig, UndecodablePolicy};
pub use http::config::HttpSourceConfig;
pub use kafka::config::{KafkaSourceConfig, KafkaUndecodablePolicy};

/// What every source gets from the application.
#[derive(Clone)]
pub struct SourceContext {
    pub outbox: Outbox,
    pub health: Health,
    /// Cancelled when intake must stop (start of the drain).
    pub stop: CancellationToken,
    /// Largest serialised case the delivery side can send; bigger events are
    /// refused at intake with a clear error instead of being dead-lettered.
    pub max_case_bytes: usize,
}

/// A running intake.
pub trait Source: Send {
    fn name(&self) -> &str;
    /// Consume input until `ctx.stop` is cancelled, then return once no
    /// acknowledgement is pending.
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, anyhow::Result<()>>;
}

/// Compile a source's routes over its mapping and default queue; the
/// start-up checks every source makes (`validate` reports the same
/// problems, all of them).
pub(crate) fn routing(
    source_name: &str,
    mapping: &MappingConfig,
    queue_id: &str,
    routes: &[RouteConfig],
) -> Result<Router, SourceError> {
    Router::new(&format!("sources.{source_name}"), mapping, queue_id, routes).map_err(|errs| {
        SourceError::Config {
            source_name: source_name.to_string(),
            message: errs.join("; "),
        }
    })
}

/// One intake. `type` selects the kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceConfig {
    Http(HttpSourceConfig),
    Amqp(AmqpSourceConfig),
    Kafka(KafkaSourceConfig),
}

impl SourceConfig {
    /// Whether the source has somewhere to send failure reports.
    pub fn reports(&self) -> bool {
        match self {
            SourceConfig::Http(h) => h.reports(),
            SourceConfig::Amqp(a) => a.reports(),
            SourceConfig::Kafka(k) => k.reports(),
        }
    }

    /// Every problem with this `[[sources]]` entry.
    pub fn check(&self) -> Vec<String> {
        match self {
            SourceConfig::Http(h) => h.check(),
            SourceConfig::Amqp(a) => a.check(),
            SourceConfig::Kafka(k) => k.check(),
        }
    }

    /// The address this source listens on (config key, address), when it
    /// listens and the address parses: `config` refuses two on one port.
    pub fn listen(&self) -> Option<(String, &str)> {
        match self {
            SourceConfig::Http(h) if h.listen.parse::<SocketAddr>().is_ok() => {
                Some((format!("sources.{}.listen", h.name), &h.listen))
            }
            _ => None,
        }
    }

    /// Every queue this source delivers to, with the account that does
    /// it: (config key, queue id as written, account name).
    pub fn targets(&self) -> Vec<(String, String, String)> {
        let default = || crate::duvo::config::DEFAULT_ACCOUNT.to_string();
        let (name, queue_id, account, routes, uses_default) = match self {
            SourceConfig::Http(h) => (&h.name, &h.queue_id, &h.account, &h.routes, true),
            SourceConfig::Amqp(a) => (&a.name, &a.queue_id, &a.account, &a.routes, true),
            SourceConfig::Kafka(k) => {
                // Every topic with a topic-only route of its own never
                // reaches the source's queue.
                let all_routed = k.topics.iter().all(|t| {
                    k.routes.iter().any(|r| {
                        r.topic.as_deref() == Some(t.as_str())
                            && r.pointer.is_none()
                            && r.header.is_none()
                    })
                });
                (&k.name, &k.queue_id, &k.account, &k.routes, !all_routed)
            }
        };
        let account = account.clone().unwrap_or_else(default);
        let mut out = Vec::new();
        if uses_default && !queue_id.is_empty() {
            out.push((format!("sources.{name}"), queue_id.clone(), account.clone()));
        }
        for (n, r) in routes.iter().enumerate() {
            out.push((
                format!("sources.{name}.routes.{}", r.display_name(n)),
                r.queue_id.clone().unwrap_or_else(|| queue_id.clone()),
                r.account.clone().unwrap_or_else(|| account.clone()),
            ));
        }
        out
    }

    pub fn name(&self) -> &str {
        match self {
            SourceConfig::Http(h) => &h.name,
            SourceConfig::Amqp(a) => &a.name,
            SourceConfig::Kafka(k) => &k.name,
        }
    }
}

/// What every source has: a default queue (or routes), a mapping, and an
/// optional JSON pointer naming a producer-supplied id (`(key name,
/// value)`).
pub(crate) fn check_routing(
    at: &str,
    queue_id: &str,
    mapping: &MappingConfig,
    routes: &[RouteConfig],
    id_field: (&str, Option<&str>),
    errors: &mut Vec<String>,
) {
    if let Err(errs) = Router::new(at, mapping, queue_id, routes) {
        errors.extend(errs);
    }
    if let (key, Some(p)) = id_field
        && !p.starts_with('/')
    {
        errors.push(format!(
            "{at}.{key} {p:?} must be a JSON pointer starting with '/'"
        ));
    }
}

/// A source name: it appears in metric labels and event identities.
pub(crate) fn check_name(at: &str, name: &str, errors: &mut Vec<String>) {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        errors.push(format!(
            "{at}.name must be non-empty and use only letters, digits, '-' and '_'"
        ));
    }
}

/// serde's `default = ...` for flags that are on unless turned off.
pub(crate) fn default_true() -> bool {
    true
}

/// Count an append's outcomes (`duvo_bridge_events_stored_total`,
/// `..._duplicate_total`); returns (stored, duplicates).
pub(crate) fn count_appended(source: &str, outcomes: &[AppendOutcome]) -> (usize, usize) {
    let stored = outcomes
        .iter()
        .filter(|o| matches!(o, AppendOutcome::Stored(_)))
        .count();
    let dups = outcomes.len() - stored;
    metrics::counter!("duvo_bridge_events_stored_total", "source" => source.to_string())
        .increment(stored as u64);
    if dups > 0 {
        metrics::counter!("duvo_bridge_events_duplicate_total", "source" => source.to_string())
            .increment(dups as u64);
    }
    (stored, dups)
}

/// Errors a source reports at start-up.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source {source_name}: cannot listen on {addr}: {err}")]
    Bind {
        source_name: String,
        addr: String,
        err: std::io::Error,
    },
    #[error("source {source_name}: {message}")]
    Config {
        source_name: String,
        message: String,
    },
}
