//! `duvo-bridge outbox verify`: check a stopped bridge's outbox record by
//! record, and the references between records, without changing anything.
//!
//! What the bridge does on its own at open (rebuilding a corrupt batch,
//! making events of a missing batch ready again) is repair; this is the
//! operator's look before and after: every value's frame and checksum, each
//! record decoded as what its key says it is, events and batches pointing
//! at each other, identities and tracked cases pointing at events, the
//! marker agreeing with the database.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::callbacks::{CALLBACK_PREFIX, CallbackUrl};
use super::durable::{META_COMMIT_SEQ, META_OUTBOX_ID, Marker};
use super::record::{
    BATCH_PREFIX, BatchRecord, CASE_PREFIX, DEAD_LETTERS_TREE, DEAD_REPORT_PREFIX, DEADLINE_PREFIX,
    EVENT_PREFIX, EVENTS_TREE, EXPIRY_PREFIX, EventRecord, IDENTITY_PREFIX, QUARANTINE_PREFIX,
    REPORT_PREFIX, WATERMARK_PREFIX, Watermark, decode, describe_key, key_u64,
};
use super::reports::{DeadReport, Report};
use super::types::{DeadLetter, EventState, OutboxError};

/// What `verify` found.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Records read, by kind.
    pub records: BTreeMap<&'static str, u64>,
    /// Every problem, naming its record.
    pub problems: Vec<Problem>,
}

/// One damaged record or broken reference.
#[derive(Debug, Serialize)]
pub struct Problem {
    /// The record, readable (`events/e/17`).
    pub key: String,
    pub problem: String,
}

impl VerifyReport {
    fn problem(&mut self, key: &[u8], problem: impl Into<String>) {
        self.problems.push(Problem {
            key: describe_key(key),
            problem: problem.into(),
        });
    }

    fn decoded<T: DeserializeOwned>(
        &mut self,
        kind: &'static str,
        key: &[u8],
        value: &[u8],
    ) -> Option<T> {
        *self.records.entry(kind).or_default() += 1;
        match decode(key, value) {
            Ok(v) => Some(v),
            Err(OutboxError::Corrupt { reason, .. }) => {
                self.problem(key, reason);
                None
            }
            Err(e) => {
                self.problem(key, e.to_string());
                None
            }
        }
    }
}

/// Verify the outbox in `dir`. Fails only when the database cannot be
/// opened or read at all; damage is in the report.
pub fn verify(dir: &Path) -> Result<VerifyReport, OutboxError> {
    // A bridge just stopped may still be letting go of the lock; one that
    // runs keeps it (verify is for a stopped bridge's directory).
    let sled_dir = super::compact::current_dir(dir);
    let db =
        super::open_when_released(|| sled::Config::new().path(&sled_dir).open()).map_err(|e| {
            if super::is_lock_held(&e) {
                OutboxError::InUse { path: dir.into() }
            } else {
                e.into()
            }
        })?;
    let events = db.open_tree(EVENTS_TREE)?;
    let dead = db.open_tree(DEAD_LETTERS_TREE)?;
    let mut r = VerifyReport::default();

    match Marker::read(dir) {
        Err(e) => r.problems.push(Problem {
            key: "marker".into(),
            problem: format!("unreadable: {e}"),
        }),
        Ok(None) => {}
        Ok(Some(m)) => {
            let id = db.get(META_OUTBOX_ID)?;
            let seq = db
                .get(META_COMMIT_SEQ)?
                .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                .map(u64::from_be_bytes);
            let problem = match (id, seq) {
                (None, _) => Some("the database has no identity: it opened empty".to_string()),
                (Some(id), _) if id.as_ref() != m.outbox_id.as_bytes() => {
                    Some(format!("the database is not outbox {}", m.outbox_id))
                }
                (_, Some(seq)) if seq < m.commit_seq => Some(format!(
                    "the database holds commits up to {seq}, the marker says {}",
                    m.commit_seq
                )),
                _ => None,
            };
            if let Some(p) = problem {
                r.problems.push(Problem {
                    key: "marker".into(),
                    problem: p,
                });
            }
        }
    }

    let mut event_batch: HashMap<u64, Option<u64>> = HashMap::new();
    let mut batch_events: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut pointers: Vec<(Vec<u8>, u64)> = Vec::new();
    for item in events.iter() {
        let (key, value) = item?;
        match key.first().copied() {
            Some(EVENT_PREFIX) => {
                if let Some(rec) = r.decoded::<EventRecord>("event", &key, &value) {
                    let id = key_u64(&key).unwrap_or(0);
                    let batch = match rec.state {
                        EventState::Batched { batch_id } => Some(batch_id),
                        _ => None,
                    };
                    let pending =
                        matches!(rec.state, EventState::Stored | EventState::Batched { .. });
                    if pending && rec.case.is_none() {
                        r.problem(&key, "pending event without its payload");
                    }
                    event_batch.insert(id, batch);
                }
            }
            Some(BATCH_PREFIX) => {
                if let Some(rec) = r.decoded::<BatchRecord>("batch", &key, &value) {
                    batch_events.insert(key_u64(&key).unwrap_or(0), rec.event_ids);
                }
            }
            Some(IDENTITY_PREFIX) => {
                if let Some(id) = r.decoded::<u64>("identity", &key, &value) {
                    pointers.push((key.to_vec(), id));
                }
            }
            Some(CASE_PREFIX) => {
                if let Some(id) = r.decoded::<u64>("tracked case", &key, &value) {
                    pointers.push((key.to_vec(), id));
                }
            }
            Some(EXPIRY_PREFIX | DEADLINE_PREFIX) => {
                r.decoded::<()>("time index", &key, &value);
                if key.len() != 17 {
                    r.problem(&key, "malformed time-index key");
                }
            }
            Some(WATERMARK_PREFIX) => {
                r.decoded::<Watermark>("watermark", &key, &value);
            }
            Some(REPORT_PREFIX) => {
                r.decoded::<Report>("report", &key, &value);
            }
            Some(DEAD_REPORT_PREFIX) => {
                r.decoded::<DeadReport>("dead report", &key, &value);
            }
            Some(CALLBACK_PREFIX) => {
                if let Some(c) = r.decoded::<CallbackUrl>("callback url", &key, &value)
                    && c.refs == 0
                {
                    r.problem(&key, "callback URL record with no references");
                }
            }
            Some(QUARANTINE_PREFIX) => {
                *r.records.entry("quarantined").or_default() += 1;
            }
            _ => r.problem(&key, "unknown key prefix"),
        }
    }
    for item in dead.iter() {
        let (key, value) = item?;
        *r.records.entry("dead letter").or_default() += 1;
        if let Err(e) = decode::<DeadLetter>(&key, &value) {
            r.problems.push(Problem {
                key: format!("dead_letters/{:02x?}", key.as_ref()),
                problem: e.to_string(),
            });
        }
    }

    // References.
    let mut in_batches: HashSet<u64> = HashSet::new();
    for (batch_id, ids) in &batch_events {
        let key = super::record::batch_key(*batch_id);
        for id in ids {
            in_batches.insert(*id);
            match event_batch.get(id) {
                None => r.problem(&key, format!("lists event {id}, which does not exist")),
                Some(b) if *b != Some(*batch_id) => r.problem(
                    &key,
                    format!("lists event {id}, which is not in this batch"),
                ),
                _ => {}
            }
        }
    }
    for (id, batch) in &event_batch {
        if let Some(b) = batch
            && !batch_events.contains_key(b)
        {
            r.problem(
                &super::record::event_key(*id),
                format!("is in batch {b}, which does not exist (or is damaged)"),
            );
        }
    }
    for (key, id) in pointers {
        if !event_batch.contains_key(&id) {
            r.problem(&key, format!("points at event {id}, which does not exist"));
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::record::event_key;
    use crate::outbox::{NewEvent, Outbox, OutboxConfig};

    #[tokio::test]
    async fn a_clean_outbox_verifies_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox");
        let q = uuid::Uuid::new_v4();
        {
            let outbox = Outbox::open(OutboxConfig::new(path.clone())).await.unwrap();
            let ev = |i: u64| NewEvent {
                source: "oms".into(),
                identity: Some(format!("oms:{i}")),
                queue_id: q,
                case: crate::duvo::NewCase {
                    title: format!("t{i}"),
                    data: None,
                    labels: vec![],
                    priority: None,
                },
                received_at_ms: 1,
                origin: None,
            };
            outbox.append((0..4).map(ev).collect()).await.unwrap();
            outbox.claim_batch(q, 2, 1 << 20).await.unwrap().unwrap();
        }
        let clean = verify(&path).unwrap();
        assert!(clean.problems.is_empty(), "{:?}", clean.problems);
        assert_eq!(clean.records["event"], 4);
        assert_eq!(clean.records["batch"], 1);
        assert_eq!(clean.records["identity"], 4);

        {
            let db = sled::open(&path).unwrap();
            let t = db.open_tree(EVENTS_TREE).unwrap();
            let k = event_key(0);
            let mut v = t.get(k).unwrap().unwrap().to_vec();
            let last = v.len() - 2;
            v[last] ^= 0x20;
            t.insert(k, v).unwrap();
            db.flush().unwrap();
        }
        let damaged = verify(&path).unwrap();
        let named: Vec<&str> = damaged.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(named.contains(&"events/e/0"), "{:?}", damaged.problems);
        assert!(
            damaged
                .problems
                .iter()
                .any(|p| p.problem.contains("checksum")),
            "{:?}",
            damaged.problems
        );
        // The batch lists the damaged event: named too, and the identity
        // pointing at it.
        assert!(damaged.problems.len() >= 2, "{:?}", damaged.problems);
    }
}
