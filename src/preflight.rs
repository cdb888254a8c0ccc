//! What the bridge asks the API before it acknowledges anything: does every
//! queue a source or route names exist, and may its account's key use it
//! (`GET /queues/{id}`)? Run by `validate --online` and at every start
//! (`[duvo] check_queues`), so a wrong `queue_id` or a key without access
//! is named at once, not found by the first batch after events were taken.
//!
//! Only a definitive answer (401, 403, 404) is a problem; a queue that
//! cannot be checked (API down, 5xx, slow past the deadline) is reported as
//! unchecked and never stops a start: an outage must not keep a bridge from
//! taking events it will deliver later.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use uuid::Uuid;

use crate::config::Config;
use crate::deliver::gate::{RateGate, RequestClass, ServerFeedback};
use crate::duvo::config::DuvoConfig;
use crate::duvo::{ClientConfig, DuvoClient};

/// One account's client (and, in a running bridge, its gate, so the check
/// is paced like any request).
pub struct AccountClient {
    pub name: String,
    pub client: Arc<DuvoClient>,
    pub gate: Option<RateGate>,
}

/// What the API said of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueCheck {
    Ok,
    /// 401, 403 or 404: the queue cannot be used with this account.
    Refused {
        status: u16,
        message: String,
    },
    /// No definitive answer (why).
    Unchecked(String),
}

/// One queue of the configuration, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFinding {
    /// Where the configuration names it (`sources.oms`,
    /// `sources.k.routes.orders`).
    pub at: String,
    pub queue: Uuid,
    pub account: String,
    pub check: QueueCheck,
}

impl QueueFinding {
    /// One line naming the route, the queue, the account and the fix.
    pub fn describe(&self) -> String {
        let who = format!(
            "{}: queue {} with account {:?} ({})",
            self.at,
            self.queue,
            self.account,
            DuvoConfig::account_at(&self.account)
        );
        match &self.check {
            QueueCheck::Ok => format!("{who}: OK"),
            QueueCheck::Refused { status: 404, .. } => {
                format!(
                    "{who}: not found (404): check queue_id, and that the queue is in this account's team"
                )
            }
            QueueCheck::Refused { status: 403, .. } => {
                format!(
                    "{who}: the key may not use this queue (403): use the account whose team owns it"
                )
            }
            QueueCheck::Refused { status: 401, .. } => {
                format!("{who}: the key is refused (401): check the account's API key")
            }
            QueueCheck::Refused { status, message } => {
                format!("{who}: refused ({status}): {message}")
            }
            QueueCheck::Unchecked(why) => format!("{who}: not checked ({why})"),
        }
    }
}

/// Clients for every account of `cfg` (no gates: `validate --online`).
pub fn clients(cfg: &Config) -> Result<Vec<AccountClient>, String> {
    let mut out = Vec::new();
    for (name, d) in cfg.duvo.account_configs() {
        let key = d.resolve_api_key()?;
        let client = DuvoClient::new(ClientConfig {
            base_url: d.base_url.clone(),
            version_prefix: d.version_prefix.clone(),
            api_key: key,
            timeout: Duration::from_secs(d.timeout_secs),
        })
        .map_err(|e| e.to_string())?;
        out.push(AccountClient {
            name,
            client: Arc::new(client),
            gate: None,
        });
    }
    Ok(out)
}

/// Check every (queue, account) the sources name, concurrently, each
/// within `deadline`. Findings in configuration order.
pub async fn check_queues(
    cfg: &Config,
    accounts: &[AccountClient],
    deadline: Duration,
) -> Vec<QueueFinding> {
    let mut targets: Vec<(String, Uuid, String)> = Vec::new();
    for s in &cfg.sources {
        for (at, queue, account) in s.targets() {
            let Ok(q) = Uuid::parse_str(&queue) else {
                continue;
            };
            if !targets.iter().any(|(_, tq, ta)| *tq == q && *ta == account) {
                targets.push((at, q, account));
            }
        }
    }
    let checks = targets.into_iter().map(|(at, queue, account)| async move {
        let check = match accounts.iter().find(|a| a.name == account) {
            None => QueueCheck::Unchecked("no such account".into()),
            Some(a) => match tokio::time::timeout(deadline, one(a, queue)).await {
                Ok(c) => c,
                Err(_) => {
                    QueueCheck::Unchecked(format!("no answer within {} s", deadline.as_secs_f64()))
                }
            },
        };
        QueueFinding {
            at,
            queue,
            account,
            check,
        }
    });
    futures::future::join_all(checks).await
}

async fn one(a: &AccountClient, queue: Uuid) -> QueueCheck {
    let permit = match &a.gate {
        Some(g) => Some(g.acquire(RequestClass::Track).await),
        None => None,
    };
    let res = a.client.get_queue(queue).await;
    let (status, rate) = match &res {
        Ok(r) => (Some(r.status.as_u16()), Some(&r.rate)),
        Err(e) => (e.status().map(|s| s.as_u16()), e.rate()),
    };
    // The gate learns only a 429 from this check (its retry-after must
    // hold everyone); any other answer settles the permit with its status
    // alone. A success's window figures would make it trust a window it
    // has not probed with a create: someone else may spend it before the
    // first batch, and a burst sent on stale figures meets 429s with more
    // requests already on the way.
    if let Some(p) = permit {
        let mut fb = match rate {
            Some(rate) if status == Some(429) => ServerFeedback::from_info(rate, SystemTime::now()),
            _ => ServerFeedback::default(),
        };
        fb.status = status;
        p.observe(&fb);
    }
    metrics::counter!("duvo_bridge_api_requests_total", "endpoint" => "get_queue",
        "outcome" => status.map_or("transport_error".into(), |s| s.to_string()),
        "account" => a.name.clone())
    .increment(1);
    match res {
        Ok(_) => QueueCheck::Ok,
        Err(e) => match status {
            Some(s @ (401 | 403 | 404)) => QueueCheck::Refused {
                status: s,
                message: e.to_string(),
            },
            _ => QueueCheck::Unchecked(e.to_string()),
        },
    }
}

/// A start refused because queues cannot be used (`check_queues = "refuse"`).
#[derive(Debug, thiserror::Error)]
#[error("{} queue(s) cannot be used; nothing was started (fix them, or run with --start-anyway):\n{}", .0.len(), .0.join("\n"))]
pub struct QueuesRefused(pub Vec<String>);
