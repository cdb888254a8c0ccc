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
use uuid::Uuid;

use crate::admin::Health;
use crate::mapping::{Mapper, MappingConfig};
use crate::outbox::{AppendOutcome, Outbox};
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

/// Compile a source's mapping and parse its target queue; the start-up
/// checks every source makes (`validate` reports the same problems).
pub(crate) fn routing(
    source_name: &str,
    mapping: &MappingConfig,
    queue_id: &str,
) -> Result<(Mapper, Uuid), SourceError> {
    let conf_err = |message: String| SourceError::Config {
        source_name: source_name.to_string(),
        message,
    };
    let mapper = Mapper::new(mapping).map_err(|errs| {
        conf_err(
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let queue_id = Uuid::parse_str(queue_id)
        .map_err(|_| conf_err(format!("queue_id {queue_id:?} is not a UUID")))?;
    Ok((mapper, queue_id))
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
        match self {
            SourceConfig::Http(h) => vec![(
                format!("sources.{}", h.name),
                h.queue_id.clone(),
                h.account.clone().unwrap_or_else(default),
            )],
            SourceConfig::Amqp(a) => vec![(
                format!("sources.{}", a.name),
                a.queue_id.clone(),
                a.account.clone().unwrap_or_else(default),
            )],
            SourceConfig::Kafka(k) => {
                let account = k.account.clone().unwrap_or_else(default);
                let mut out = Vec::new();
                // The source's own queue serves the topics without a route.
                if k.topics
                    .iter()
                    .any(|t| !k.routes.iter().any(|r| &r.topic == t))
                {
                    out.push((
                        format!("sources.{}", k.name),
                        k.queue_id.clone(),
                        account.clone(),
                    ));
                }
                for r in &k.routes {
                    out.push((
                        format!("sources.{}.routes.{}", k.name, r.topic),
                        r.queue_id.clone().unwrap_or_else(|| k.queue_id.clone()),
                        r.account.clone().unwrap_or_else(|| account.clone()),
                    ));
                }
                out
            }
        }
    }

    pub fn name(&self) -> &str {
        match self {
            SourceConfig::Http(h) => &h.name,
            SourceConfig::Amqp(a) => &a.name,
            SourceConfig::Kafka(k) => &k.name,
        }
    }
}

/// What every source has: a target queue, a mapping, and an optional JSON
/// pointer naming a producer-supplied id (`(key name, value)`).
pub(crate) fn check_routing(
    at: &str,
    queue_id: &str,
    mapping: &MappingConfig,
    id_field: (&str, Option<&str>),
    errors: &mut Vec<String>,
) {
    if Uuid::parse_str(queue_id).is_err() {
        errors.push(format!("{at}.queue_id {queue_id:?} is not a UUID"));
    }
    if let Err(errs) = Mapper::new(mapping) {
        for e in errs {
            errors.push(format!("{at}.{e}"));
        }
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
