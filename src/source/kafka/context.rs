//! The consumer's context: rebalance, commit, statistics and error
//! callbacks, and the partition state they share with the consume loop.
//!
//! Every callback runs inside a poll of the consumer, and the consume loop
//! polls only between batches (never while an append is in flight), so the
//! assignment the loop sees cannot change under a running append. Records
//! that were received in a batch but whose partition was revoked before the
//! batch was appended are recognised by the *epoch* (a counter bumped at
//! every revocation) and dropped unappended: the partition's next owner
//! reads them from the committed offset.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::offsets::{Gap, Tp};
use crate::admin::Health;
use crate::kafka::{Scrubber, log_librdkafka};

/// What [`Shared::reread_gap`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reread {
    /// Read again from the hole's first missing offset.
    FromHole,
    /// Read again from further back than the hole.
    StepBack,
    /// The hole is real: move past it.
    Pass,
}

/// How long holes in a partition pass without a re-read once a re-read
/// confirmed one.
pub const HOLES_TRUSTED_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// Partition state shared by the consume loop and the callbacks.
pub struct Shared {
    pub source: String,
    health: Health,
    health_key: String,
    scrubber: Scrubber,
    /// Bumped at every revocation.
    epoch: AtomicU64,
    state: Mutex<PartState>,
}

#[derive(Default)]
struct PartState {
    assigned: BTreeSet<Tp>,
    /// Epoch at which each partition was last revoked.
    revoked_at: HashMap<Tp, u64>,
    /// Last offset stored (next record to read) per partition.
    stored: HashMap<Tp, i64>,
    /// Last offset the broker confirmed as committed per partition.
    committed: HashMap<Tp, i64>,
    /// Per partition, the last offset hole the loop went back to re-read,
    /// and how many times.
    reread_gaps: HashMap<Tp, (Gap, u8)>,
    /// Per partition, until when holes pass without a re-read: a re-read
    /// just confirmed one (compaction, transaction markers), and on such a
    /// topic holes come often; re-reading each would read it many times.
    holes_trusted_until: HashMap<Tp, tokio::time::Instant>,
    /// Partitions stopped at a hole they must not store past.
    stalled: BTreeSet<Tp>,
    paused: bool,
    connected: Option<bool>,
}

fn labels(source: &str, tp: &Tp) -> [(&'static str, String); 3] {
    [
        ("source", source.to_string()),
        ("topic", tp.0.clone()),
        ("partition", tp.1.to_string()),
    ]
}

impl Shared {
    pub fn new(source: &str, health: Health, health_key: String, scrubber: Scrubber) -> Shared {
        Shared {
            source: source.to_string(),
            health,
            health_key,
            scrubber,
            epoch: AtomicU64::new(0),
            state: Mutex::new(PartState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PartState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn scrub(&self, text: &str) -> String {
        self.scrubber.scrub(text)
    }

    /// The current epoch; read it after a record was received.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Whether a record of `tp` received at `epoch` may still be appended
    /// and its offset stored (its partition was not revoked since).
    pub fn still_owned(&self, tp: &Tp, epoch: u64) -> bool {
        let st = self.lock();
        st.assigned.contains(tp) && st.revoked_at.get(tp).is_none_or(|r| *r <= epoch)
    }

    pub fn assigned(&self) -> Vec<Tp> {
        self.lock().assigned.iter().cloned().collect()
    }

    /// The offset last stored for `tp` in this process (the next record
    /// it expects to read), if any.
    pub fn stored(&self, tp: &Tp) -> Option<i64> {
        self.lock().stored.get(tp).copied()
    }

    /// What to do about `gap`: read again from it the first time; the
    /// second time, from further back (a broker that serves a record batch
    /// only from its first offset hands over the rest of it then); the
    /// third time it is real and passed, and the partition's holes pass
    /// without a re-read for [`HOLES_TRUSTED_FOR`].
    pub fn reread_gap(&self, tp: &Tp, gap: Gap) -> Reread {
        let now = tokio::time::Instant::now();
        let mut st = self.lock();
        if st.holes_trusted_until.get(tp).is_some_and(|t| now < *t) {
            return Reread::Pass;
        }
        match st.reread_gaps.get(tp) {
            Some((g, 1)) if *g == gap => {
                st.reread_gaps.insert(tp.clone(), (gap, 2));
                Reread::StepBack
            }
            Some((g, _)) if *g == gap => {
                tracing::info!(source = %self.source, topic = %tp.0, partition = tp.1,
                    expected = gap.expected, next = gap.next,
                    "kafka: offsets missing inside the log after two re-reads (compaction, transaction markers, aborted transactions); moving past them, and past this partition's holes for a minute");
                st.reread_gaps.remove(tp);
                st.holes_trusted_until
                    .insert(tp.clone(), now + HOLES_TRUSTED_FOR);
                Reread::Pass
            }
            _ => {
                st.reread_gaps.insert(tp.clone(), (gap, 1));
                Reread::FromHole
            }
        }
    }

    /// Stop `tp` at a hole it must not store past: `/readyz` names it and
    /// `duvo_bridge_kafka_partition_stalled` is 1 until the partition is
    /// revoked (its next owner finds the hole again) or the bridge
    /// restarts. Returns whether it was not stalled yet.
    pub fn stall(&self, tp: &Tp, reason: String) -> bool {
        let new = self.lock().stalled.insert(tp.clone());
        metrics::gauge!(
            "duvo_bridge_kafka_partition_stalled",
            &labels(&self.source, tp)
        )
        .set(1.0);
        self.health
            .set_unready(&stall_key(&self.health_key, tp), reason);
        new
    }

    /// The partitions stalled at a hole (left paused on resume).
    pub fn stalled(&self) -> BTreeSet<Tp> {
        self.lock().stalled.clone()
    }

    fn clear_stall(&self, tp: &Tp) {
        metrics::gauge!(
            "duvo_bridge_kafka_partition_stalled",
            &labels(&self.source, tp)
        )
        .set(0.0);
        self.health.set_ready(&stall_key(&self.health_key, tp));
    }

    pub fn note_stored(&self, tp: &Tp, offset: i64) {
        self.lock().stored.insert(tp.clone(), offset);
        metrics::gauge!("duvo_bridge_kafka_stored_offset", &labels(&self.source, tp))
            .set(offset as f64);
    }

    /// Record the backpressure state and publish the per-partition gauge.
    pub fn set_paused(&self, paused: bool) {
        let mut st = self.lock();
        st.paused = paused;
        for tp in &st.assigned {
            metrics::gauge!("duvo_bridge_kafka_paused", &labels(&self.source, tp)).set(if paused {
                1.0
            } else {
                0.0
            });
        }
    }

    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Broker connectivity as seen by the callbacks: drives `/readyz` and
    /// `duvo_bridge_kafka_connected`.
    pub fn set_connected(&self, up: bool, reason: &str) {
        let changed = {
            let mut st = self.lock();
            let changed = st.connected != Some(up);
            st.connected = Some(up);
            changed
        };
        if !changed {
            return;
        }
        metrics::gauge!("duvo_bridge_kafka_connected", "source" => self.source.clone())
            .set(if up { 1.0 } else { 0.0 });
        if up {
            tracing::info!(source = %self.source, "kafka: connected to the cluster");
            self.health.set_ready(&self.health_key);
        } else {
            tracing::warn!(source = %self.source, reason, "kafka: no broker reachable");
            self.health
                .set_unready(&self.health_key, reason.to_string());
        }
    }

    /// The stored offsets of `tps` not yet known to be committed.
    fn uncommitted(&self, tps: &[Tp]) -> Vec<(Tp, i64)> {
        let st = self.lock();
        tps.iter()
            .filter_map(|tp| {
                let s = *st.stored.get(tp)?;
                (st.committed.get(tp) != Some(&s)).then(|| (tp.clone(), s))
            })
            .collect()
    }
}

/// The readiness condition of a stalled partition.
fn stall_key(health_key: &str, tp: &Tp) -> String {
    format!("{health_key}:{}[{}]", tp.0, tp.1)
}

fn tps_of(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

/// The consumer's [`ConsumerContext`].
pub struct KafkaContext {
    pub shared: Arc<Shared>,
}

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_librdkafka(
            &self.shared.source,
            &self.shared.scrubber,
            level,
            fac,
            log_message,
        );
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let s = &self.shared;
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::AllBrokersDown)) {
            s.set_connected(false, "all Kafka brokers are down");
        }
        tracing::warn!(
            source = %s.source,
            error = %s.scrub(&error.to_string()),
            reason = %s.scrub(reason),
            "kafka consumer error"
        );
    }

    fn stats(&self, st: Statistics) {
        let s = &self.shared;
        let up = st
            .brokers
            .values()
            .any(|b| b.state == "UP" && b.nodeid >= 0);
        if up {
            s.set_connected(true, "");
        }
        let assigned = s.lock().assigned.clone();
        for (topic, t) in &st.topics {
            for (p, ps) in &t.partitions {
                let tp = (topic.clone(), *p);
                if *p < 0 || !assigned.contains(&tp) {
                    continue;
                }
                // Lag behind what is durable in the outbox; before the first
                // store, behind the committed offset.
                let lag = if ps.consumer_lag_stored >= 0 {
                    ps.consumer_lag_stored
                } else {
                    ps.consumer_lag
                };
                if lag >= 0 {
                    metrics::gauge!("duvo_bridge_kafka_lag", &labels(&s.source, &tp))
                        .set(lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for KafkaContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let s = &self.shared;
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let tps = tps_of(tpl);
                // Commit what is stored for the revoked partitions before
                // they go, so the next owner starts right after the last
                // record that is durable here.
                let pending = s.uncommitted(&tps);
                if !pending.is_empty() && !consumer.assignment_lost() {
                    let mut c = TopicPartitionList::new();
                    for ((t, p), o) in &pending {
                        let _ = c.add_partition_offset(t, *p, Offset::Offset(*o));
                    }
                    match consumer.commit(&c, CommitMode::Sync) {
                        Ok(()) => {
                            let mut st = s.lock();
                            for (tp, o) in &pending {
                                st.committed.insert(tp.clone(), *o);
                                metrics::gauge!(
                                    "duvo_bridge_kafka_committed_offset",
                                    &labels(&s.source, tp)
                                )
                                .set(*o as f64);
                            }
                        }
                        Err(e) => tracing::warn!(
                            source = %s.source, error = %e,
                            "commit on revocation failed; the next owner re-reads from the last commit (dedupe absorbs what this replica re-reads)"
                        ),
                    }
                }
                let epoch = s.epoch.fetch_add(1, Ordering::AcqRel) + 1;
                let mut st = s.lock();
                for tp in &tps {
                    st.assigned.remove(tp);
                    st.revoked_at.insert(tp.clone(), epoch);
                    // What this replica stored is history once the partition
                    // is gone: if it comes back, reading resumes from the
                    // group's committed offset (possibly another replica's).
                    st.stored.remove(tp);
                    st.committed.remove(tp);
                    st.reread_gaps.remove(tp);
                    st.holes_trusted_until.remove(tp);
                    if st.stalled.remove(tp) {
                        s.clear_stall(tp);
                    }
                    metrics::gauge!("duvo_bridge_kafka_paused", &labels(&s.source, tp)).set(0.0);
                    // This replica no longer knows the partition's lag: NaN
                    // rather than the last value, so a stale number (or a
                    // stale 0) never speaks for the partition's next owner
                    // in DuvoBridgeKafkaPartitionStuck.
                    metrics::gauge!("duvo_bridge_kafka_lag", &labels(&s.source, tp)).set(f64::NAN);
                }
                drop(st);
                metrics::counter!("duvo_bridge_kafka_rebalances_total", "source" => s.source.clone(), "kind" => "revoke").increment(1);
                tracing::info!(
                    source = %s.source,
                    partitions = %fmt_tps(&tps),
                    lost = consumer.assignment_lost(),
                    "kafka: partitions revoked"
                );
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(source = %s.source, error = %e, "kafka: rebalance error");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let s = &self.shared;
        if let Rebalance::Assign(tpl) = rebalance {
            let tps = tps_of(tpl);
            let paused = {
                let mut st = s.lock();
                for tp in &tps {
                    st.assigned.insert(tp.clone());
                }
                st.paused
            };
            if paused
                && !tps.is_empty()
                && let Err(e) = consumer.pause(tpl)
            {
                tracing::warn!(source = %s.source, error = %e, "kafka: pausing new partitions failed");
            }
            for tp in &tps {
                metrics::gauge!("duvo_bridge_kafka_paused", &labels(&s.source, tp))
                    .set(if paused { 1.0 } else { 0.0 });
            }
            // Joining the group took a working coordinator connection.
            s.set_connected(true, "");
            metrics::counter!("duvo_bridge_kafka_rebalances_total", "source" => s.source.clone(), "kind" => "assign").increment(1);
            tracing::info!(source = %s.source, partitions = %fmt_tps(&tps), "kafka: partitions assigned");
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        let s = &self.shared;
        match result {
            Ok(()) => {
                let mut st = s.lock();
                for e in offsets.elements() {
                    if let (Offset::Offset(o), Ok(())) = (e.offset(), e.error()) {
                        let tp = (e.topic().to_string(), e.partition());
                        metrics::gauge!(
                            "duvo_bridge_kafka_committed_offset",
                            &labels(&s.source, &tp)
                        )
                        .set(o as f64);
                        st.committed.insert(tp, o);
                    }
                }
            }
            // Nothing was stored since the last commit.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                metrics::counter!("duvo_bridge_kafka_commit_failures_total", "source" => s.source.clone()).increment(1);
                tracing::warn!(source = %s.source, error = %e, "kafka: offset commit failed (retried at the next interval)");
            }
        }
    }
}

pub fn fmt_tps(tps: &[Tp]) -> String {
    tps.iter()
        .map(|(t, p)| format!("{t}[{p}]"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_hole_is_read_again_then_from_further_back_then_passed_and_trusted_for_a_while() {
        let s = Shared::new(
            "k",
            Health::default(),
            "kafka:k".into(),
            Scrubber::default(),
        );
        let tp: Tp = ("t".into(), 0);
        let g = |e: i64| Gap {
            expected: e,
            next: e + 1,
        };
        // First sight: read again from it; again: from further back; a
        // third time: real, passed.
        assert_eq!(s.reread_gap(&tp, g(10)), Reread::FromHole);
        assert_eq!(s.reread_gap(&tp, g(10)), Reread::StepBack);
        assert_eq!(s.reread_gap(&tp, g(10)), Reread::Pass);
        // The next holes pass at once for a while (another partition not).
        assert_eq!(s.reread_gap(&tp, g(20)), Reread::Pass);
        assert_eq!(s.reread_gap(&("t".into(), 1), g(20)), Reread::FromHole);
        tokio::time::advance(HOLES_TRUSTED_FOR).await;
        assert_eq!(s.reread_gap(&tp, g(30)), Reread::FromHole);
        // A different hole starts over.
        assert_eq!(s.reread_gap(&tp, g(40)), Reread::FromHole);
    }
}
