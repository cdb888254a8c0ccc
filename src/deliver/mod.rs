//! Delivery: the batcher, the rate gate and reconciliation.
pub mod batcher;
pub mod config;
pub mod deadline_file;
pub mod gate;
pub mod reconcile;

use std::collections::BTreeSet;
use std::sync::Arc;

use uuid::Uuid;

/// The queues one account's batcher and tracker work on. Each queue
/// belongs to one account (`Config::queue_accounts`); the implicit default
/// account takes every queue no other account names, so events stored for
/// a queue a later config no longer names are still delivered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum QueueScope {
    /// Every queue (one account).
    #[default]
    All,
    /// Only these.
    Only(Arc<BTreeSet<Uuid>>),
    /// Every queue but these (the default account beside others).
    AllBut(Arc<BTreeSet<Uuid>>),
}

impl QueueScope {
    pub fn contains(&self, queue: &Uuid) -> bool {
        match self {
            QueueScope::All => true,
            QueueScope::Only(qs) => qs.contains(queue),
            QueueScope::AllBut(qs) => !qs.contains(queue),
        }
    }
}
