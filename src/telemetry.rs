//! Logs and metrics setup, and the catalogue of metric names.
//!
//! Every metric the bridge emits is described here once (name, unit, help)
//! so `/metrics` carries HELP/TYPE lines that `promtool check metrics`
//! accepts, and so the deploy/ dashboards and alerts have one list to follow.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// Handle on the installed filter, for [`set_log_level`].
static LOG_FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Install the global tracing subscriber. `RUST_LOG` wins over the config
/// at start. Safe to call more than once (later calls are no-ops), which
/// in-process tests and the demo rely on.
pub fn init_logging(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive(quiet_payload_logs());
    let (filter, handle) = reload::Layer::new(filter);
    // Colours only on a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let installed = match cfg.format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(fmt.json().flatten_event(true))
            .try_init(),
        LogFormat::Pretty => tracing_subscriber::registry()
            .with(filter)
            .with(fmt.compact())
            .try_init(),
    };
    if installed.is_ok() {
        let _ = LOG_FILTER.set(handle);
    }
}

/// lapin logs a returned message whole (its body: a failure report, the
/// original event, personal data) at warn; the AMQP reporter logs the
/// return itself, with ids only. So that target only logs errors.
fn quiet_payload_logs() -> tracing_subscriber::filter::Directive {
    "lapin::returned_messages=error"
        .parse()
        .expect("a valid directive")
}

/// Why [`set_log_level`] did not apply a level.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("log level {level:?}: {err}")]
    Parse {
        level: String,
        err: tracing_subscriber::filter::ParseError,
    },
    #[error("logging was not initialised by this process")]
    NotInstalled,
    #[error("cannot swap the log filter: {0}")]
    Reload(#[from] reload::Error),
}

/// Replace the log filter at run time (SIGHUP with a changed `log.level`).
pub fn set_log_level(level: &str) -> Result<(), LogLevelError> {
    let filter = EnvFilter::try_new(level)
        .map_err(|err| LogLevelError::Parse {
            level: level.to_string(),
            err,
        })?
        .add_directive(quiet_payload_logs());
    LOG_FILTER
        .get()
        .ok_or(LogLevelError::NotInstalled)?
        .reload(filter)?;
    Ok(())
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the process-wide Prometheus recorder once and return its handle.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Suffix("_size".into()),
                        &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0],
                    )
                })
                .expect("bucket lists are non-empty");
            let handle = match builder.install_recorder() {
                Ok(h) => h,
                // Another recorder is installed (a test harness): keep a
                // detached one so /metrics still renders something valid.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            };
            describe_all();
            handle
        })
        .clone()
}

fn describe_all() {
    // Sources
    describe_counter!(
        "duvo_bridge_events_received_total",
        "Events received by a source, before validation."
    );
    describe_counter!(
        "duvo_bridge_events_stored_total",
        "Events durably stored in the outbox (acknowledged to the source)."
    );
    describe_counter!(
        "duvo_bridge_events_duplicate_total",
        "Events recognised as already stored (same source identity) and not stored again."
    );
    describe_counter!(
        "duvo_bridge_events_rejected_total",
        "Events or requests refused at intake, by reason."
    );
    // Outbox
    describe_gauge!(
        "duvo_bridge_outbox_depth",
        "Events in the outbox not yet delivered or dead-lettered."
    );
    describe_gauge!(
        "duvo_bridge_outbox_batched_events",
        "Events in persisted batches not settled yet (in flight or about to be sent)."
    );
    describe_gauge!(
        "duvo_bridge_outbox_bytes",
        Unit::Bytes,
        "Size of the outbox database on disk."
    );
    describe_gauge!(
        "duvo_bridge_outbox_high_water_bytes",
        Unit::Bytes,
        "Configured outbox size on disk above which intake pauses (outbox.high_water_bytes)."
    );
    describe_gauge!(
        "duvo_bridge_outbox_high_water_events",
        "Configured undelivered events above which intake pauses (outbox.high_water_events)."
    );
    describe_gauge!(
        "duvo_bridge_outbox_volume_available_bytes",
        Unit::Bytes,
        "Free space available to the bridge on the filesystem holding the outbox."
    );
    describe_gauge!(
        "duvo_bridge_outbox_volume_size_bytes",
        Unit::Bytes,
        "Size of the filesystem holding the outbox."
    );
    describe_gauge!(
        "duvo_bridge_outbox_oldest_event_age_seconds",
        Unit::Seconds,
        "Age of the oldest event waiting for delivery."
    );
    describe_histogram!(
        "duvo_bridge_outbox_flush_seconds",
        Unit::Seconds,
        "Duration of one outbox group commit (sled flush plus the fsync of its files)."
    );
    describe_counter!(
        "duvo_bridge_outbox_fsyncs_total",
        "fsync calls on the outbox's files and directories (group commits fsync each file)."
    );
    describe_counter!(
        "duvo_bridge_outbox_data_loss_accepted_total",
        "Starts on an outbox that had lost data, accepted with --accept-outbox-loss."
    );
    describe_histogram!(
        "duvo_bridge_outbox_flush_batch_size",
        "Appenders served by one outbox fsync."
    );
    describe_counter!(
        "duvo_bridge_outbox_appended_total",
        "Events appended to the outbox."
    );
    describe_counter!(
        "duvo_bridge_outbox_duplicates_total",
        "Appends that matched an existing identity."
    );
    describe_counter!(
        "duvo_bridge_outbox_compactions_total",
        "Compactions: the outbox copied into a fresh file to give disk back."
    );
    describe_counter!(
        "duvo_bridge_outbox_corrupt_records_total",
        "Outbox records whose checksum did not match."
    );
    describe_gauge!(
        "duvo_bridge_outbox_over_high_water",
        "1 while intake is paused because the outbox is over its high-water mark."
    );
    describe_counter!(
        "duvo_bridge_dead_letters_total",
        "Events the API refused for good, kept in the dead-letter tree."
    );
    describe_counter!(
        "duvo_bridge_events_routed_total",
        "Events mapped by a route, by source and route (`default`: the source's own queue)."
    );
    describe_counter!(
        "duvo_bridge_dead_letters_replayed_total",
        "Dead letters put back as new events by an operator (`outbox dead-letters replay`)."
    );
    describe_counter!(
        "duvo_bridge_dead_letters_purged_total",
        "Dead letters removed for good by an operator (`outbox dead-letters purge`)."
    );
    describe_counter!(
        "duvo_bridge_cases_redriven_total",
        "Failed cases sent back to pending in Duvo by `cases retry`."
    );
    describe_counter!(
        "duvo_bridge_admin_unauthorized_total",
        "Operator requests refused for a missing or wrong admin token."
    );
    // Delivery
    describe_counter!(
        "duvo_bridge_batches_sent_total",
        "Create requests that succeeded."
    );
    describe_counter!(
        "duvo_bridge_cases_created_total",
        "Cases created in Duvo, by queue."
    );
    describe_counter!(
        "duvo_bridge_api_requests_total",
        "Requests to the Duvo API by endpoint and outcome (HTTP status or transport error)."
    );
    describe_counter!(
        "duvo_bridge_api_rate_limited_total",
        "429 answers from the Duvo API."
    );
    describe_gauge!(
        "duvo_bridge_outbox_disk_free_bytes",
        Unit::Bytes,
        "Free bytes on the outbox's filesystem; below outbox.min_free_disk_mb intake pauses."
    );
    describe_counter!(
        "duvo_bridge_outbox_batches_rebuilt_total",
        "Batch records found corrupt at open and rebuilt from their events (then looked for on the server before any re-send)."
    );
    describe_counter!(
        "duvo_bridge_reconciliations_total",
        "Looks for a batch's cases by its label before a re-send after an attempt that may have been carried out, by outcome (none_found, some_found, all_found, listing_failed)."
    );
    describe_counter!(
        "duvo_bridge_reconcile_surplus_cases_total",
        "Cases labelled with a batch beyond its events, found while reconciling: created twice before the bridge looked."
    );
    describe_counter!(
        "duvo_bridge_batch_splits_total",
        "Batches split in two to isolate an invalid event."
    );
    describe_histogram!(
        "duvo_bridge_api_request_seconds",
        Unit::Seconds,
        "Duration of Duvo API requests."
    );
    describe_histogram!("duvo_bridge_batch_size", "Cases per create request.");
    describe_histogram!(
        "duvo_bridge_end_to_end_seconds",
        Unit::Seconds,
        "From receipt at a source to case created in Duvo."
    );
    describe_counter!(
        "duvo_bridge_retry_after_waits_total",
        "Times a retry-after deadline held requests back."
    );
    describe_histogram!(
        "duvo_bridge_rate_gate_wait_seconds",
        Unit::Seconds,
        "Time spent waiting at the rate gate, by reason."
    );
    describe_gauge!(
        "duvo_bridge_rate_gate_effective_rpm",
        "Requests per minute the rate gate currently paces at."
    );
    describe_counter!(
        "duvo_bridge_api_deprecation_notices_total",
        "Responses carrying a Deprecation or Sunset header."
    );
    describe_gauge!(
        "duvo_bridge_ready",
        "1 when the bridge is ready to take input."
    );
    describe_gauge!(
        "duvo_bridge_amqp_connected",
        "1 while an AMQP source has an open connection and consumer, by source."
    );
    describe_counter!(
        "duvo_bridge_amqp_reconnects_total",
        "AMQP sessions lost (connection or channel closed) and reopened, by source."
    );
    // Kafka source (labels: source, and topic + partition where named)
    describe_counter!(
        "duvo_bridge_kafka_consumed_total",
        "Kafka records read, by source, topic and partition."
    );
    describe_gauge!(
        "duvo_bridge_kafka_stored_offset",
        "Next offset to read, stored after every record below it was durably handled, by partition."
    );
    describe_gauge!(
        "duvo_bridge_kafka_committed_offset",
        "Offset the broker confirmed as committed for the group, by partition."
    );
    describe_gauge!(
        "duvo_bridge_kafka_lag",
        "Records on the broker beyond the stored offset (not yet durable in the outbox), by partition."
    );
    describe_gauge!(
        "duvo_bridge_kafka_paused",
        "1 while a partition is paused because the outbox is over its high-water mark."
    );
    describe_gauge!(
        "duvo_bridge_kafka_connected",
        "1 while the Kafka consumer reaches the cluster, by source."
    );
    describe_counter!(
        "duvo_bridge_kafka_rebalances_total",
        "Consumer-group rebalances seen, by source and kind (assign, revoke)."
    );
    describe_counter!(
        "duvo_bridge_kafka_commit_failures_total",
        "Offset commits the broker refused or that failed (retried at the next interval)."
    );
    describe_counter!(
        "duvo_bridge_kafka_offset_store_errors_total",
        "Offsets that could not be stored because the partition was no longer assigned."
    );
    describe_counter!(
        "duvo_bridge_kafka_consumer_errors_total",
        "Errors reported by the Kafka consumer (librdkafka retries them)."
    );
    describe_counter!(
        "duvo_bridge_kafka_consumer_restarts_total",
        "Kafka consumers re-created after a fatal error, by source."
    );
    describe_counter!(
        "duvo_bridge_kafka_offset_gaps_total",
        "Holes found in a partition's offsets: before a batch (past the offset stored last) or inside it (compaction, transaction markers, aborted transactions, deleted or skipped records)."
    );
    describe_gauge!(
        "duvo_bridge_kafka_partition_stalled",
        "1 while the partition is stopped at a hole it must not commit past (records deleted before they were read); 0 otherwise."
    );
    describe_counter!(
        "duvo_bridge_kafka_partition_stalls_total",
        "Times a partition stopped at a hole of records deleted before they were read."
    );
    describe_counter!(
        "duvo_bridge_kafka_dead_lettered_total",
        "Records produced to the dead-letter topic, by source and reason."
    );
    describe_gauge!(
        "duvo_bridge_amqp_reporter_connected",
        "1 while the failure reporter of an AMQP source has an open connection, by source."
    );
    describe_counter!(
        "duvo_bridge_amqp_reports_returned_total",
        "Failure reports the broker returned as unroutable (kept and retried), by source."
    );
    describe_gauge!(
        "duvo_bridge_build_info",
        "Build information; the value is always 1."
    );
    // Case tracking and reports
    describe_gauge!(
        "duvo_bridge_tracked_cases",
        "Cases followed by the tracker, by phase (open: not finished; watching: failed or canceled, watched for a retry)."
    );
    describe_counter!(
        "duvo_bridge_tracking_requests_total",
        "Listing requests sent by the case tracker, by stream (reports, cleanup)."
    );
    describe_counter!(
        "duvo_bridge_tracking_transitions_total",
        "Case status transitions the tracker recorded (each at most once)."
    );
    describe_counter!(
        "duvo_bridge_tracking_finished_total",
        "Tracked cases that completed and were forgotten."
    );
    describe_counter!(
        "duvo_bridge_tracking_rewinds_total",
        "Listing streams sent back to re-read because a batch settled after the stream had passed its cases' creation (late answer, re-send after a restart), by stream."
    );
    describe_counter!(
        "duvo_bridge_tracking_rereads_total",
        "Listing pages read again from the start of a tie instant because a case there changed between pages."
    );
    describe_counter!(
        "duvo_bridge_tracking_expired_total",
        "Tracked cases still unfinished when their TTL ran out."
    );
    describe_gauge!(
        "duvo_bridge_tracking_watermark_lag_seconds",
        Unit::Seconds,
        "How far a queue's listing watermark is behind now, by queue and stream."
    );
    describe_counter!(
        "duvo_bridge_reports_created_total",
        "Reports created for a source, by source and status."
    );
    describe_counter!(
        "duvo_bridge_reports_sent_total",
        "Reports acknowledged by their target, by source and reporter kind."
    );
    describe_counter!(
        "duvo_bridge_report_send_failures_total",
        "Report send attempts that were not acknowledged (retried), by source and reporter kind."
    );
    describe_counter!(
        "duvo_bridge_reports_given_up_total",
        "Reports set aside as dead reports because their destination, a callback URL given with the request, failed for longer than callback_header_max_age_hours; by source and reporter kind."
    );
    describe_gauge!(
        "duvo_bridge_report_destinations_backing_off",
        "Report destinations (callback URL, exchange and routing key, topic) whose last send failed and that get one probe per backoff period until one is acknowledged, by source."
    );
    describe_gauge!(
        "duvo_bridge_reports_pending",
        "Reports in the outbox waiting for their target's acknowledgement."
    );
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// Logging. `RUST_LOG` overrides `level` when set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `pretty` for humans, `json` for log shippers.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `info,duvo_bridge::deliver=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

impl LogConfig {
    /// Every problem with the `[log]` section.
    pub fn check(&self) -> Vec<String> {
        match EnvFilter::try_new(&self.level) {
            Ok(_) => Vec::new(),
            Err(e) => vec![format!("log.level {:?}: {e}", self.level)],
        }
    }
}
