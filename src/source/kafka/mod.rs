//! Kafka source: a consumer-group member (librdkafka `StreamConsumer`)
//! that turns records into outbox events.
//!
//! At-least-once without gaps:
//! - `enable.auto.offset.store=false`: the bridge stores a partition's
//!   offset itself, and only after every record below it is durable (fsync'd
//!   in the outbox, produced to the dead-letter topic, or deliberately
//!   skipped); librdkafka's auto-commit then commits stored offsets every
//!   `auto.commit.interval.ms`, and the context commits them when partitions
//!   are revoked (see [`context`]).
//! - The loop is strictly sequential: drain what the consumer has buffered
//!   (up to `max_batch`), append it in one `Outbox::append` (one fsync),
//!   store the offsets, poll again. Rebalance callbacks run only inside a
//!   poll, so never while an append is in flight; records of a partition
//!   revoked between their receipt and the append are dropped unappended
//!   (the next owner reads them from the committed offset).
//! - A record that cannot be handled (outbox error, dead-letter topic
//!   refusing writes) stops its partition there: nothing at or above it is
//!   stored and the consumer seeks back to it (see [`offsets`]).
//! - Redelivered records (after a crash, a seek, a rebalance back to this
//!   replica) are deduplicated by the outbox: identity
//!   `kafka:{source}:{topic}:{partition}:{offset}:t{timestamp}` (the
//!   timestamp tells a re-created topic's records from the old ones at the
//!   same offsets), or `kafka:{source}:id:{id}` when a configured header or
//!   JSON field carries a producer-supplied id.
//!
//! Backpressure: over the outbox high-water mark every assigned partition
//! is paused (librdkafka drops what it prefetched for them and resumes from
//! the last record handed out), while the consumer keeps being polled so
//! the group membership and rebalances stay served. Memory is bounded by
//! `max_batch` plus librdkafka's prefetch (`queued.max.messages.kbytes`).

pub mod client;
pub mod context;
pub mod offsets;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{
    BorrowedMessage, Header, Headers, Message, OwnedHeaders, OwnedMessage, Timestamp,
};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

pub mod config;

pub use client::consumer_config;
pub use config::{KafkaSourceConfig, KafkaUndecodablePolicy};
use context::{KafkaContext, Reread, Shared};
use offsets::{BatchOffsets, Gap, PartitionOutcome, Tp};

use super::{Source, SourceContext, SourceError};
use crate::duvo::NewCase;
use crate::encoding::base64;
use crate::kafka::{
    LogContext, Scrubber, check_librdkafka, describe_config_error, with_source_coordinates,
};
use crate::outbox::{NewEvent, Origin};
use crate::raw_json::RawEvent;
use crate::retry::RetryPolicy;
use crate::routing::{Inputs, Router};

/// How often backpressure is re-checked while partitions are paused.
const PAUSE_POLL: Duration = Duration::from_millis(100);
/// Pause after an outbox or dead-letter failure before reading again.
const ERROR_PAUSE: Duration = Duration::from_secs(1);
/// How long a dead-letter produce may wait for room in the producer queue.
const DLQ_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful stop retries the final commit during a rebalance.
const FINAL_COMMIT_FOR: Duration = Duration::from_secs(10);
/// Identical consumer errors are logged at most this often.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(30);
/// How far before a hole the second re-read starts (a broker serving a
/// record batch only from its first offset needs the batch's start).
const STEP_BACK: i64 = 1000;
/// Longest wait for a partition's log start when a hole is found.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(5);

/// The Kafka intake. The consumer is created in [`Source::run`]; librdkafka
/// reconnects by itself, and a fatal client error restarts the consumer
/// with backoff.
pub struct KafkaSource {
    cfg: KafkaSourceConfig,
    router: Router,
    scrubber: Scrubber,
    restart: RetryPolicy,
}

/// What a record became.
enum What {
    Event(Box<NewEvent>),
    DeadLetter {
        reason: &'static str,
        msg: OwnedMessage,
    },
    Skip(&'static str),
}

/// One received record, decoded.
struct Item {
    topic: String,
    partition: i32,
    offset: i64,
    /// `Shared::epoch` right after the record was received.
    epoch: u64,
    what: What,
}

/// Why a consumer session ended.
enum SessionEnd {
    Stopped,
    Failed(String),
}

/// The dead-letter producer and topic.
struct DeadLetters {
    topic: String,
    producer: FutureProducer<LogContext>,
}

impl KafkaSource {
    /// Validate what can be validated without a broker: routes, mappings,
    /// the client configuration.
    pub fn new(cfg: KafkaSourceConfig) -> Result<KafkaSource, SourceError> {
        let conf_err = |message: String| SourceError::Config {
            source_name: cfg.name.clone(),
            message,
        };
        let router = super::routing(&cfg.name, &cfg.mapping(), &cfg.queue_id, &cfg.routes)?;
        let errors = check_librdkafka(&cfg.librdkafka);
        if !errors.is_empty() {
            return Err(conf_err(errors.join("; ")));
        }
        let native = consumer_config(&cfg).map_err(conf_err)?;
        native
            .create_native_config()
            .map_err(|e| conf_err(describe_config_error(&e, &cfg.librdkafka)))?;
        Ok(KafkaSource {
            scrubber: Scrubber::new(&cfg.librdkafka),
            router,
            cfg,
            restart: RetryPolicy {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(30),
                ..RetryPolicy::default()
            },
        })
    }

    /// Replace the consumer-restart backoff (tests use short delays).
    pub fn with_restart_policy(mut self, policy: RetryPolicy) -> KafkaSource {
        self.restart = policy;
        self
    }

    fn health_key(&self) -> String {
        format!("kafka:{}", self.cfg.name)
    }

    async fn run_loop(self, ctx: SourceContext) {
        let name = self.cfg.name.clone();
        let health_key = self.health_key();
        ctx.health
            .set_unready(&health_key, "connecting to the Kafka cluster");
        let mut schedule = self.restart.new_schedule();
        loop {
            if ctx.stop.is_cancelled() {
                break;
            }
            let started = Instant::now();
            match self.session(&ctx).await {
                SessionEnd::Stopped => break,
                SessionEnd::Failed(reason) => {
                    if started.elapsed() > Duration::from_secs(60) {
                        schedule.reset();
                    }
                    let delay = schedule.next_delay();
                    tracing::warn!(
                        source = %name, error = %reason, retry_in_ms = delay.as_millis() as u64,
                        "Kafka consumer failed; restarting it"
                    );
                    metrics::counter!("duvo_bridge_kafka_consumer_restarts_total", "source" => name.clone()).increment(1);
                    ctx.health.set_unready(&health_key, reason);
                    tokio::select! {
                        _ = ctx.stop.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        ctx.health.set_unready(&health_key, "stopped");
        tracing::info!(source = %name, "Kafka source stopped");
    }

    /// One consumer, from creation to close.
    async fn session(&self, ctx: &SourceContext) -> SessionEnd {
        let shared = Arc::new(Shared::new(
            &self.cfg.name,
            ctx.health.clone(),
            self.health_key(),
            self.scrubber.clone(),
        ));
        let client_cfg = match consumer_config(&self.cfg) {
            Ok(c) => c,
            Err(e) => return SessionEnd::Failed(e),
        };
        let consumer: StreamConsumer<KafkaContext> =
            match client_cfg.create_with_context(KafkaContext {
                shared: shared.clone(),
            }) {
                Ok(c) => c,
                Err(e) => {
                    return SessionEnd::Failed(format!(
                        "creating the consumer: {}",
                        describe_config_error(&e, &self.cfg.librdkafka)
                    ));
                }
            };
        let topics: Vec<&str> = self.cfg.topics.iter().map(String::as_str).collect();
        if let Err(e) = consumer.subscribe(&topics) {
            return SessionEnd::Failed(format!("subscribing to {topics:?}: {e}"));
        }
        let dead_letters = match &self.cfg.dead_letter_topic {
            None => None,
            Some(topic) => {
                match self
                    .cfg
                    .client()
                    .producer_config("dead-letters")
                    .create_with_context(LogContext {
                        source: self.cfg.name.clone(),
                        scrubber: self.scrubber.clone(),
                    }) {
                    Ok(producer) => Some(DeadLetters {
                        topic: topic.clone(),
                        producer,
                    }),
                    Err(e) => {
                        return SessionEnd::Failed(format!(
                            "creating the dead-letter producer: {}",
                            describe_config_error(&e, &self.cfg.librdkafka)
                        ));
                    }
                }
            }
        };
        tracing::info!(
            source = %self.cfg.name, brokers = %self.cfg.brokers, group = %self.cfg.group_id,
            topics = ?self.cfg.topics, "Kafka consumer subscribed"
        );
        let consumer = Arc::new(consumer);
        let end = self
            .consume(&consumer, dead_letters.as_ref(), &shared, ctx)
            .await;
        self.final_commit(&consumer).await;
        // Close (leaving the group unless the membership is static); it
        // blocks, so off the async workers.
        let closed = tokio::task::spawn_blocking(move || drop(consumer)).await;
        if closed.is_err() {
            tracing::warn!(source = %self.cfg.name, "closing the Kafka consumer panicked");
        }
        if let Some(d) = dead_letters {
            let _ = tokio::task::spawn_blocking(move || {
                use rdkafka::producer::Producer;
                let _ = d.producer.flush(Duration::from_secs(5));
            })
            .await;
        }
        end
    }

    /// Commit the stored offsets before leaving. A commit refused because a
    /// rebalance is under way is retried (for up to [`FINAL_COMMIT_FOR`])
    /// while the consumer is polled so the rebalance can complete; records
    /// read meanwhile are dropped unstored (whoever owns their partition
    /// next reads them again).
    async fn final_commit(&self, consumer: &Arc<StreamConsumer<KafkaContext>>) {
        let name = &self.cfg.name;
        let deadline = Instant::now() + FINAL_COMMIT_FOR;
        loop {
            let c = consumer.clone();
            let r = tokio::task::spawn_blocking(move || c.commit_consumer_state(CommitMode::Sync))
                .await;
            match r {
                Ok(Ok(())) | Ok(Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))) => {
                    return;
                }
                Ok(Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::RebalanceInProgress)))
                    if Instant::now() < deadline =>
                {
                    tracing::debug!(source = %name, "final commit: rebalance in progress; polling, then retrying");
                    let mut stream = consumer.stream();
                    let _ = tokio::time::timeout(Duration::from_millis(200), async {
                        while let Some(m) = stream.next().await {
                            drop(m);
                        }
                    })
                    .await;
                }
                Ok(Err(e)) => {
                    tracing::warn!(source = %name, error = %e, "final offset commit failed; records after the last commit are read again by the partition's next owner");
                    return;
                }
                Err(_) => return,
            }
        }
    }

    /// Read, append, store, until stopped or the consumer fails for good.
    async fn consume(
        &self,
        consumer: &StreamConsumer<KafkaContext>,
        dead_letters: Option<&DeadLetters>,
        shared: &Shared,
        ctx: &SourceContext,
    ) -> SessionEnd {
        let name = &self.cfg.name;
        let max_batch = self.cfg.max_batch.max(1);
        let mut stream = consumer.stream();
        let mut paused = false;
        let mut errors = ErrorLog::default();
        loop {
            if ctx.outbox.over_high_water() {
                if !paused {
                    paused = true;
                    shared.set_paused(true);
                    tracing::info!(source = %name, "outbox over high water: pausing the assigned partitions");
                }
                // Every tick: partitions assigned meanwhile are paused too.
                set_paused(consumer, true, name);
            } else if paused {
                paused = false;
                shared.set_paused(false);
                set_paused(consumer, false, name);
                tracing::info!(source = %name, "outbox below low water: resuming the partitions");
            }
            let next = tokio::select! {
                biased;
                _ = ctx.stop.cancelled() => return SessionEnd::Stopped,
                m = stream.next() => m,
                _ = tokio::time::sleep(PAUSE_POLL), if paused => continue,
            };
            let received_at_ms = crate::clock::now_ms();
            let mut batch = Vec::new();
            match next {
                None => return SessionEnd::Failed("the consumer stream ended".into()),
                Some(Err(e)) => {
                    if let Some(end) = self.stream_error(consumer, shared, e, &mut errors) {
                        return end;
                    }
                    continue;
                }
                Some(Ok(m)) => batch.push(self.decode(&m, shared.epoch(), received_at_ms, ctx)),
            }
            let mut failed = None;
            while batch.len() < max_batch {
                match stream.next().now_or_never() {
                    Some(Some(Ok(m))) => {
                        batch.push(self.decode(&m, shared.epoch(), received_at_ms, ctx))
                    }
                    Some(Some(Err(e))) => {
                        failed = self.stream_error(consumer, shared, e, &mut errors);
                        break;
                    }
                    Some(None) => {
                        failed = Some(SessionEnd::Failed("the consumer stream ended".into()));
                        break;
                    }
                    None => break,
                }
            }
            shared.set_connected(true, "");
            if let Err(reason) = self
                .persist(consumer, dead_letters, shared, ctx, batch)
                .await
            {
                return SessionEnd::Failed(reason);
            }
            if let Some(end) = failed {
                return end;
            }
        }
    }

    /// A consumer error: fatal ones end the session, the others are logged
    /// (librdkafka retries by itself).
    fn stream_error(
        &self,
        consumer: &StreamConsumer<KafkaContext>,
        shared: &Shared,
        e: KafkaError,
        errors: &mut ErrorLog,
    ) -> Option<SessionEnd> {
        let name = &self.cfg.name;
        if let Some((code, reason)) = consumer.client().fatal_error() {
            return Some(SessionEnd::Failed(format!(
                "fatal consumer error {code}: {}",
                shared.scrub(&reason)
            )));
        }
        if matches!(
            e,
            KafkaError::MessageConsumption(RDKafkaErrorCode::AllBrokersDown)
        ) {
            shared.set_connected(false, "all Kafka brokers are down");
        }
        metrics::counter!("duvo_bridge_kafka_consumer_errors_total", "source" => name.clone())
            .increment(1);
        let text = shared.scrub(&e.to_string());
        if errors.should_log(&text) {
            tracing::warn!(source = %name, error = %text, "Kafka consumer error (librdkafka retries)");
        } else {
            tracing::debug!(source = %name, error = %text, "Kafka consumer error (librdkafka retries)");
        }
        None
    }

    /// Append the batch, dead-letter what must be, store offsets up to the
    /// first failure per partition and seek back to it. `Err` when the
    /// consumer's position can no longer be trusted (a seek failed): the
    /// session restarts from the committed offsets.
    async fn persist(
        &self,
        consumer: &StreamConsumer<KafkaContext>,
        dead_letters: Option<&DeadLetters>,
        shared: &Shared,
        ctx: &SourceContext,
        batch: Vec<Item>,
    ) -> Result<(), String> {
        let src = self.cfg.name.as_str();
        metrics::counter!("duvo_bridge_events_received_total", "source" => src.to_string())
            .increment(batch.len() as u64);
        count_consumed(src, &batch);

        let batch = drop_revoked(src, shared, batch);
        if batch.is_empty() {
            return Ok(());
        }

        let mut progress = BatchOffsets::default();
        let mut coords: Vec<(String, i32, i64)> = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        let mut dead = Vec::new();
        for it in batch {
            progress.record(&it.topic, it.partition, it.offset);
            match it.what {
                What::Event(ev) => events.push(*ev),
                What::DeadLetter { reason, msg } => {
                    dead.push((it.topic.clone(), it.partition, it.offset, reason, msg))
                }
                What::Skip(reason) => {
                    count_rejected(src, reason, 1);
                    tracing::warn!(
                        source = src, reason, topic = %it.topic, partition = it.partition,
                        offset = it.offset, "record skipped (no dead_letter_topic configured)"
                    );
                }
            }
            coords.push((it.topic, it.partition, it.offset));
        }

        let mut pause = false;
        if !events.is_empty() && !self.append(ctx, events).await {
            count_rejected(src, "outbox_error", coords.len());
            progress.fail_all();
            pause = true;
        }
        pause |= !self
            .send_dead_letters(dead_letters, dead, &mut progress)
            .await;

        let mut outcomes = progress.outcomes(|(t, p)| {
            coords
                .iter()
                .filter(|(tt, pp, _)| pp == p && tt == t)
                .map(|(_, _, o)| *o)
                .collect()
        });
        self.handle_gaps(consumer, shared, &mut outcomes);
        // A re-read from before the offset stored last (a step back) must
        // not move it backwards.
        for o in &mut outcomes {
            if let (Some(s), Some(prev)) = (o.store, shared.stored(&o.tp))
                && s < prev
            {
                o.store = None;
            }
        }
        store_offsets(src, consumer, shared, &outcomes);
        for o in &outcomes {
            if let Some(f) = o.seek {
                consumer
                    .seek(&o.tp.0, o.tp.1, Offset::Offset(f), Duration::from_secs(10))
                    .map_err(|e| {
                        format!(
                            "seeking {}[{}] back to {f} failed ({e}); restarting from the committed offsets",
                            o.tp.0, o.tp.1
                        )
                    })?;
            }
        }
        if pause {
            tokio::select! {
                _ = ctx.stop.cancelled() => {}
                _ = tokio::time::sleep(ERROR_PAUSE) => {}
            }
        }
        Ok(())
    }

    /// Append a batch's events to the outbox; `false` when the append
    /// failed (nothing of the batch may be stored then).
    async fn append(&self, ctx: &SourceContext, mut events: Vec<NewEvent>) -> bool {
        let src = self.cfg.name.as_str();
        // A record stored by a version that identified records by their
        // coordinates alone is recognised by that identity (read again
        // after an upgrade, it is the same record).
        for ev in &mut events {
            let Some(legacy) = legacy_of(src, ev) else {
                continue;
            };
            match ctx.outbox.identity_known(&legacy) {
                Ok(true) => ev.identity = Some(legacy),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(source = src, error = %e, "outbox read failed; the records are read again");
                    return false;
                }
            }
        }
        match ctx.outbox.append(events).await {
            Ok(outcomes) => {
                let (stored, dups) = super::count_appended(src, &outcomes);
                tracing::debug!(
                    source = src,
                    stored,
                    duplicates = dups,
                    "kafka: batch appended"
                );
                true
            }
            Err(e) => {
                tracing::error!(source = src, error = %e, "outbox append failed; the records are read again");
                false
            }
        }
    }

    /// Produce the batch's dead letters (those not behind a failed record
    /// already); a failed produce blocks its partition from that record.
    /// `false` when one failed.
    async fn send_dead_letters(
        &self,
        dead_letters: Option<&DeadLetters>,
        dead: Vec<(String, i32, i64, &'static str, OwnedMessage)>,
        progress: &mut BatchOffsets,
    ) -> bool {
        let src = self.cfg.name.as_str();
        let mut ok = true;
        for (topic, partition, offset, reason, msg) in dead {
            if progress.blocked(&topic, partition, offset) {
                continue;
            }
            let Some(dl) = dead_letters else {
                // Decoding only yields dead letters with a topic configured.
                progress.fail(&topic, partition, offset);
                continue;
            };
            match self.dead_letter(dl, &msg, reason).await {
                Ok(()) => {
                    count_rejected(src, reason, 1);
                    metrics::counter!("duvo_bridge_kafka_dead_lettered_total", "source" => src.to_string(), "reason" => reason).increment(1);
                    tracing::warn!(
                        source = src, reason, %topic, partition, offset,
                        dead_letter_topic = %dl.topic, "record sent to the dead-letter topic"
                    );
                }
                Err(e) => {
                    tracing::error!(
                        source = src, error = %e, %topic, partition, offset,
                        "dead-letter produce failed; the partition is read again from this record"
                    );
                    progress.fail(&topic, partition, offset);
                    ok = false;
                }
            }
        }
        ok
    }

    /// Look for holes in each partition's offsets and decide, per
    /// partition, how far to store and whether to read again.
    ///
    /// A hole below the partition's log start means records were deleted
    /// (retention, DeleteRecords) before this bridge read them: the
    /// partition stalls there (never stored past, paused, named in
    /// `/readyz`) until an operator decides. Any other hole is read again
    /// once from its first missing offset (a broker that skipped records by
    /// mistake hands them over then); a hole that is still there is inside
    /// the log, where Kafka leaves holes only for compaction, transaction
    /// markers and aborted transactions, and is passed.
    fn handle_gaps(
        &self,
        consumer: &StreamConsumer<KafkaContext>,
        shared: &Shared,
        outcomes: &mut [PartitionOutcome],
    ) {
        let src = self.cfg.name.as_str();
        for o in outcomes.iter_mut() {
            tracing::debug!(
                source = src, topic = %o.tp.0, partition = o.tp.1, first = o.first,
                records = o.records, store = o.store, seek = o.seek, "kafka: batch handled"
            );
            // The first batch of a partition since it was assigned starts
            // where the group committed; anywhere past that is a hole too.
            let expected = shared
                .stored(&o.tp)
                .or_else(|| committed_offset(consumer, &o.tp));
            let Some(gap) = o.gap(expected) else {
                continue;
            };
            if o.failure_covers(gap) {
                // Going back to a failed record before the hole anyway.
                continue;
            }
            metrics::counter!("duvo_bridge_kafka_offset_gaps_total", "source" => src.to_string(), "topic" => o.tp.0.clone(), "partition" => o.tp.1.to_string())
                .increment(1);
            let pass = |o: &PartitionOutcome| {
                tracing::debug!(
                    source = src, topic = %o.tp.0, partition = o.tp.1,
                    expected = gap.expected, next = gap.next, skipped = gap.next - gap.expected,
                    reread = self.cfg.reread_offset_gaps,
                    "kafka: offsets missing inside the log (compaction, transaction markers, aborted transactions); moving past them"
                );
            };
            let log_start = consumer
                .fetch_watermarks(&o.tp.0, o.tp.1, WATERMARK_TIMEOUT)
                .map(|(low, _)| low);
            match log_start {
                Ok(low) if gap.expected < low => {
                    o.stop_at(gap, false);
                    self.stall(consumer, shared, &o.tp, gap, low);
                }
                Err(e) => {
                    // Cannot tell: store up to the hole and read it again.
                    o.stop_at(gap, true);
                    tracing::warn!(
                        source = src, topic = %o.tp.0, partition = o.tp.1,
                        expected = gap.expected, next = gap.next, error = %e,
                        "kafka: offsets missing and the partition's log start is unknown; reading again from the first missing one"
                    );
                }
                Ok(low) if self.cfg.reread_offset_gaps => {
                    let how = shared.reread_gap(&o.tp, gap);
                    if how == Reread::Pass {
                        pass(o);
                        continue;
                    }
                    // Read again: what comes after the hole is in the
                    // outbox and is deduplicated on re-read.
                    o.stop_at(gap, true);
                    if how == Reread::StepBack {
                        o.seek = Some((gap.expected - STEP_BACK).max(low).max(0));
                    }
                    tracing::warn!(
                        source = src, topic = %o.tp.0, partition = o.tp.1,
                        expected = gap.expected, next = gap.next, skipped = gap.next - gap.expected,
                        from = o.seek,
                        "kafka: offsets missing; reading the partition again"
                    );
                }
                Ok(_) => pass(o),
            }
        }
    }

    /// Stop `tp` at `gap`, whose first records were deleted before this
    /// bridge read them (the log now starts at `log_start`).
    fn stall(
        &self,
        consumer: &StreamConsumer<KafkaContext>,
        shared: &Shared,
        tp: &Tp,
        gap: Gap,
        log_start: i64,
    ) {
        let lost = log_start - gap.expected;
        let reason = format!(
            "kafka partition {}[{}] stalled at offset {}: the log starts at {log_start}, {lost} records were deleted (retention or DeleteRecords) before this bridge read them; nothing past the hole is committed (see README, \"A partition stalled at a hole\")",
            tp.0, tp.1, gap.expected
        );
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.0, tp.1);
        if let Err(e) = consumer.pause(&tpl) {
            tracing::warn!(source = %self.cfg.name, error = %e, "kafka: pausing a stalled partition failed");
        }
        if shared.stall(tp, reason.clone()) {
            metrics::counter!("duvo_bridge_kafka_partition_stalls_total", "source" => self.cfg.name.clone(), "topic" => tp.0.clone(), "partition" => tp.1.to_string())
                .increment(1);
            tracing::error!(source = %self.cfg.name, topic = %tp.0, partition = tp.1,
                expected = gap.expected, log_start, lost, "{reason}");
        }
    }

    /// Produce the record unchanged to the dead-letter topic, with headers
    /// saying why and where from; `Ok` after the broker acknowledged it.
    async fn dead_letter(
        &self,
        dl: &DeadLetters,
        msg: &OwnedMessage,
        reason: &str,
    ) -> Result<(), String> {
        let headers = msg
            .headers()
            .cloned()
            .unwrap_or_else(OwnedHeaders::new)
            .insert(Header {
                key: "duvo-bridge-error",
                value: Some(reason),
            })
            .insert(Header {
                key: "duvo-bridge-source",
                value: Some(self.cfg.name.as_str()),
            });
        let headers = with_source_coordinates(headers, msg.topic(), msg.partition(), msg.offset());
        let mut rec = FutureRecord::<[u8], [u8]>::to(&dl.topic).headers(headers);
        if let Some(k) = msg.key() {
            rec = rec.key(k);
        }
        if let Some(p) = msg.payload() {
            rec = rec.payload(p);
        }
        dl.producer
            .send(rec, DLQ_QUEUE_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|(e, _)| self.scrubber.scrub(&e.to_string()))
    }

    /// Map one record to an outbox event, a dead letter or a skip.
    fn decode(
        &self,
        m: &BorrowedMessage<'_>,
        epoch: u64,
        received_at_ms: u64,
        ctx: &SourceContext,
    ) -> Item {
        let topic = m.topic().to_string();
        let (partition, offset) = (m.partition(), m.offset());
        let what = self.decode_what(m, &topic, received_at_ms, ctx.max_case_bytes);
        Item {
            topic,
            partition,
            offset,
            epoch,
            what,
        }
    }

    fn decode_what(
        &self,
        m: &BorrowedMessage<'_>,
        topic: &str,
        received_at_ms: u64,
        max_case_bytes: usize,
    ) -> What {
        let wrap = self.cfg.on_undecodable == KafkaUndecodablePolicy::Wrap;
        let refuse = |reason: &'static str| {
            if self.cfg.dead_letter_topic.is_some() {
                What::DeadLetter {
                    reason,
                    msg: m.detach(),
                }
            } else {
                What::Skip(reason)
            }
        };
        let (json, wrapped): (Option<RawEvent<'_>>, Option<String>) = match m.payload() {
            // A tombstone (null value) carries nothing to make a case of.
            None => return refuse("null_value"),
            Some(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => match RawEvent::parse(text) {
                    Ok(ev) => (Some(ev), None),
                    _ if wrap => (None, Some(text.to_string())),
                    _ => return refuse("not_json_object"),
                },
                Err(_) if wrap => (None, Some(base64(bytes))),
                Err(_) => return refuse("not_utf8"),
            },
        };
        let header = |name: &str| {
            m.headers().and_then(|hs| {
                hs.iter()
                    .find(|h| h.key.eq_ignore_ascii_case(name))
                    .and_then(|h| h.value)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .map(str::to_owned)
            })
        };
        let Some(route) = self.router.route(&Inputs {
            event: json.as_ref(),
            header: &header,
            topic: Some(topic),
        }) else {
            return refuse("no_route");
        };
        let case: NewCase = match (&json, &wrapped) {
            (Some(ev), _) => route.mapper.map(ev),
            (None, Some(text)) => route.mapper.map_text(text),
            (None, None) => unreachable!("a payload is JSON or wrapped"),
        };
        crate::routing::count_routed(&self.cfg.name, &route.route);
        if !case_fits(&case, max_case_bytes) {
            return refuse("event_too_large");
        }
        let identity = self.identity(m, topic, json.as_ref());
        What::Event(Box::new(NewEvent {
            source: self.cfg.name.clone(),
            identity: Some(identity),
            queue_id: route.queue_id,
            case,
            received_at_ms,
            origin: Some(Origin::Kafka {
                topic: topic.to_string(),
                partition: m.partition(),
                offset: m.offset(),
                key_b64: m.key().map(base64),
            }),
        }))
    }

    /// Dedupe identity: the configured header, else the configured JSON
    /// field, else the record's coordinates.
    fn identity(
        &self,
        m: &BorrowedMessage<'_>,
        topic: &str,
        json: Option<&RawEvent<'_>>,
    ) -> String {
        let src = &self.cfg.name;
        let from_header = || {
            let want = self.cfg.message_id_header.as_deref()?;
            m.headers()?
                .iter()
                .find(|h| h.key == want)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .filter(|v| !v.is_empty())
        };
        let from_field = || {
            let p = self.cfg.message_id_field.as_deref()?;
            json?.pointer(p)?.as_id()
        };
        match from_header().or_else(from_field) {
            Some(id) => format!("kafka:{src}:id:{id}"),
            None => offset_identity(src, topic, m.partition(), m.offset(), m.timestamp()),
        }
    }
}

/// The identity of a record without a producer-supplied id: its
/// coordinates and its timestamp, so that the records of a topic deleted
/// and created again (or of a broker that lost its log), which reuse the
/// old offsets, are not taken for the old ones.
fn offset_identity(src: &str, topic: &str, partition: i32, offset: i64, ts: Timestamp) -> String {
    match ts.to_millis() {
        Some(t) => format!("kafka:{src}:{topic}:{partition}:{offset}:t{t}"),
        None => legacy_offset_identity(src, topic, partition, offset),
    }
}

/// The identity older versions gave every record without a producer id
/// (coordinates only). A record an older version stored is recognised by
/// it until the outbox's retention forgets it (see [`KafkaSource::append`]).
fn legacy_offset_identity(src: &str, topic: &str, partition: i32, offset: i64) -> String {
    format!("kafka:{src}:{topic}:{partition}:{offset}")
}

/// The legacy identity of `ev` when its identity is the timestamped
/// offset identity (not a producer id).
fn legacy_of(src: &str, ev: &NewEvent) -> Option<String> {
    let Some(Origin::Kafka {
        topic,
        partition,
        offset,
        ..
    }) = &ev.origin
    else {
        return None;
    };
    let legacy = legacy_offset_identity(src, topic, *partition, *offset);
    let rest = ev.identity.as_deref()?.strip_prefix(legacy.as_str())?;
    rest.starts_with(":t").then_some(legacy)
}

/// Count what a batch consumed, per partition.
fn count_consumed(src: &str, batch: &[Item]) {
    let mut consumed: Vec<(Tp, u64)> = Vec::new();
    for it in batch {
        match consumed
            .iter_mut()
            .find(|((t, p), _)| *p == it.partition && *t == it.topic)
        {
            Some((_, n)) => *n += 1,
            None => consumed.push(((it.topic.clone(), it.partition), 1)),
        }
    }
    for (tp, n) in &consumed {
        metrics::counter!("duvo_bridge_kafka_consumed_total", "source" => src.to_string(), "topic" => tp.0.clone(), "partition" => tp.1.to_string())
            .increment(*n);
    }
}

/// The records of a batch whose partition is still ours: those of a
/// partition revoked after they were read are read again by its next
/// owner from the committed offset.
fn drop_revoked(src: &str, shared: &Shared, batch: Vec<Item>) -> Vec<Item> {
    // Records whose partition was revoked after they were read: the
    // next owner reads them again from the committed offset.
    let epoch = shared.epoch();
    let before = batch.len();
    let batch: Vec<Item> = if batch.iter().all(|i| i.epoch == epoch) {
        batch
    } else {
        batch
            .into_iter()
            .filter(|i| shared.still_owned(&(i.topic.clone(), i.partition), i.epoch))
            .collect()
    };
    if batch.len() < before {
        tracing::info!(
            source = src,
            dropped = before - batch.len(),
            "records of revoked partitions left unappended; their next owner reads them"
        );
    }
    batch
}

/// Store the offsets a batch decided on; when some partition is no longer
/// assigned, store the others one by one.
fn store_offsets(
    src: &str,
    consumer: &StreamConsumer<KafkaContext>,
    shared: &Shared,
    outcomes: &[PartitionOutcome],
) {
    let mut tpl = TopicPartitionList::new();
    for o in outcomes {
        if let Some(s) = o.store {
            let _ = tpl.add_partition_offset(&o.tp.0, o.tp.1, Offset::Offset(s));
        }
    }
    if tpl.count() > 0 {
        match consumer.store_offsets(&tpl) {
            Ok(()) => {
                for o in outcomes {
                    if let Some(s) = o.store {
                        shared.note_stored(&o.tp, s);
                    }
                }
            }
            // Some partition is no longer assigned ("Erroneous state"):
            // store the others one by one. The records of the lost one
            // are durable here and re-read (deduplicated) if it comes
            // back, or read by its next owner.
            Err(e) => {
                for o in outcomes {
                    let Some(s) = o.store else { continue };
                    let mut one = TopicPartitionList::new();
                    let _ = one.add_partition_offset(&o.tp.0, o.tp.1, Offset::Offset(s));
                    match consumer.store_offsets(&one) {
                        Ok(()) => shared.note_stored(&o.tp, s),
                        Err(e1) => {
                            metrics::counter!("duvo_bridge_kafka_offset_store_errors_total", "source" => src.to_string()).increment(1);
                            tracing::warn!(
                                source = src, topic = %o.tp.0, partition = o.tp.1, offset = s,
                                error = %e1, batch_error = %e,
                                "offset not stored (partition no longer assigned?); its records are in the outbox, a re-read is deduplicated"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The group's committed offset of one partition (one request to the
/// coordinator, made once per partition per assignment); `None` when there
/// is none or it cannot be had quickly.
fn committed_offset(consumer: &StreamConsumer<KafkaContext>, tp: &Tp) -> Option<i64> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.0, tp.1);
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(2))
        .ok()?;
    match got.find_partition(&tp.0, tp.1)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

fn set_paused(consumer: &StreamConsumer<KafkaContext>, pause: bool, source: &str) {
    let Ok(mut tpl) = consumer.assignment() else {
        return;
    };
    if !pause {
        // Stalled partitions stay paused.
        let stalled = consumer.context().shared.stalled();
        if !stalled.is_empty() {
            let mut keep = TopicPartitionList::new();
            for e in tpl.elements() {
                if !stalled.contains(&(e.topic().to_string(), e.partition())) {
                    keep.add_partition(e.topic(), e.partition());
                }
            }
            tpl = keep;
        }
    }
    if tpl.count() == 0 {
        return;
    }
    let r = if pause {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    if let Err(e) = r {
        tracing::warn!(source, error = %e, pause, "kafka: pause/resume failed");
    }
}

/// Whether the case fits one request: a cheap bound first (escaping grows
/// JSON text at most sixfold), the exact size only near the limit.
fn case_fits(case: &NewCase, max: usize) -> bool {
    let raw = case.title.len()
        + case.data.as_ref().map_or(0, String::len)
        + case
            .labels
            .iter()
            .map(|l| l.key.len() + l.value.len() + 32)
            .sum::<usize>()
        + 64;
    if raw.saturating_mul(6) <= max {
        return true;
    }
    serde_json::to_vec(case).is_ok_and(|v| v.len() <= max)
}

fn count_rejected(source: &str, reason: &'static str, n: usize) {
    metrics::counter!("duvo_bridge_events_rejected_total", "source" => source.to_string(), "reason" => reason)
        .increment(n as u64);
}

/// Logs a repeated error once per [`ERROR_LOG_EVERY`].
#[derive(Default)]
struct ErrorLog {
    last: Option<(String, Instant)>,
}

impl ErrorLog {
    fn should_log(&mut self, text: &str) -> bool {
        match &self.last {
            Some((t, at)) if t == text && at.elapsed() < ERROR_LOG_EVERY => false,
            _ => {
                self.last = Some((text.to_string(), Instant::now()));
                true
            }
        }
    }
}

impl Source for KafkaSource {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, anyhow::Result<()>> {
        async move {
            self.run_loop(ctx).await;
            Ok(())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duvo::Label;

    #[test]
    fn case_fits_uses_the_exact_size_near_the_limit() {
        let case = |n: usize| NewCase {
            title: "t".into(),
            data: Some("\u{1}".repeat(n)),
            labels: vec![Label {
                key: "k".into(),
                value: "v".into(),
            }],
            priority: None,
        };
        assert!(case_fits(&case(10), 1_000_000));
        // "\u0001" escapes to six bytes each.
        assert!(case_fits(&case(1000), 6200));
        assert!(!case_fits(&case(1000), 5900));
    }

    fn event(identity: String, offset: i64) -> NewEvent {
        NewEvent {
            source: "k".into(),
            identity: Some(identity),
            queue_id: uuid::Uuid::nil(),
            case: NewCase {
                title: "t".into(),
                data: None,
                labels: vec![],
                priority: None,
            },
            received_at_ms: 0,
            origin: Some(Origin::Kafka {
                topic: "orders".into(),
                partition: 2,
                offset,
                key_b64: None,
            }),
        }
    }

    #[test]
    fn the_offset_identity_carries_the_timestamp_and_knows_its_legacy_form() {
        let id = offset_identity(
            "k",
            "orders",
            2,
            7,
            Timestamp::CreateTime(1_700_000_000_123),
        );
        assert_eq!(id, "kafka:k:orders:2:7:t1700000000123");
        // Same coordinates, another timestamp: another record.
        assert_ne!(
            id,
            offset_identity(
                "k",
                "orders",
                2,
                7,
                Timestamp::LogAppendTime(1_700_000_999_000)
            )
        );
        assert_eq!(
            offset_identity("k", "orders", 2, 7, Timestamp::NotAvailable),
            "kafka:k:orders:2:7"
        );
        assert_eq!(
            legacy_of("k", &event(id, 7)).as_deref(),
            Some("kafka:k:orders:2:7")
        );
        // A producer id, or coordinates that are not the event's own, have
        // no legacy form.
        assert_eq!(legacy_of("k", &event("kafka:k:id:ORD-7".into(), 7)), None);
        assert_eq!(
            legacy_of("k", &event("kafka:k:orders:2:7:t1".into(), 8)),
            None
        );
    }

    #[tokio::test]
    async fn a_record_stored_under_its_legacy_identity_is_still_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let outbox =
            crate::outbox::Outbox::open(crate::outbox::OutboxConfig::new(dir.path().join("db")))
                .await
                .unwrap();
        // What an older version stored for offset 7.
        let old = outbox
            .append(vec![event("kafka:k:orders:2:7".into(), 7)])
            .await
            .unwrap();
        let src = KafkaSource::new(KafkaSourceConfig::new(
            "k",
            "127.0.0.1:1",
            "g",
            &["orders"],
            uuid::Uuid::nil(),
        ))
        .unwrap();
        let ctx = SourceContext {
            outbox: outbox.clone(),
            health: crate::admin::Health::default(),
            stop: tokio_util::sync::CancellationToken::new(),
            max_case_bytes: 1_000_000,
        };
        let ts = Timestamp::CreateTime(1_700_000_000_000);
        assert!(
            src.append(
                &ctx,
                vec![
                    event(offset_identity("k", "orders", 2, 7, ts), 7),
                    event(offset_identity("k", "orders", 2, 8, ts), 8),
                ]
            )
            .await
        );
        // Offset 7 was the old record (no second event); 8 is new.
        assert_eq!(outbox.depth(), 2);
        assert_eq!(old.len(), 1);
        assert!(
            outbox
                .identity_known("kafka:k:orders:2:8:t1700000000000")
                .unwrap()
        );
        assert!(
            !outbox
                .identity_known("kafka:k:orders:2:7:t1700000000000")
                .unwrap()
        );
    }

    #[test]
    fn repeated_errors_are_logged_once_per_interval() {
        let mut l = ErrorLog::default();
        assert!(l.should_log("a"));
        assert!(!l.should_log("a"));
        assert!(l.should_log("b"));
        assert!(l.should_log("a"));
    }
}
