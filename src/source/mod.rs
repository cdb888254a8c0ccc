//! Sources turn outside input into outbox appends, and acknowledge their
//! input only after the append returned (i.e. after the fsync that covers
//! it). Each kind lives in its own module behind the small [`Source`] trait
//! so the application can start, drain and observe them uniformly.

pub mod amqp;
pub mod decode;
pub mod http;
pub mod kafka;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::outbox::Outbox;

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
    mapping: &crate::mapping::MappingConfig,
    queue_id: &str,
) -> Result<(crate::mapping::Mapper, uuid::Uuid), SourceError> {
    let conf_err = |message: String| SourceError::Config {
        source_name: source_name.to_string(),
        message,
    };
    let mapper = crate::mapping::Mapper::new(mapping).map_err(|errs| {
        conf_err(
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let queue_id = uuid::Uuid::parse_str(queue_id)
        .map_err(|_| conf_err(format!("queue_id {queue_id:?} is not a UUID")))?;
    Ok((mapper, queue_id))
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
