//! Failure reports to a Kafka topic: an idempotent producer
//! (`enable.idempotence=true`, `acks=all`) writes one record per report to
//! the source's `failure_topic`, keyed by the original record's key, with
//! headers naming where the event came from and what happened to it, and
//! the report's JSON body ([`Report::body`]) as value. `send` returns `Ok`
//! only after the broker acknowledged the record (its delivery report).
//!
//! Headers (values are UTF-8 text): `duvo-report-id`, `duvo-event-id`,
//! `duvo-status`, `duvo-bridge-source`, `duvo-queue-id`, `duvo-case-id` (when
//! a case exists), `duvo-source-topic`, `duvo-source-partition`,
//! `duvo-source-offset` (when the event came from Kafka), and
//! `content-type: application/json`.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use super::{Report, ReportError, Reporter};
use crate::encoding::base64_decode;
use crate::kafka::{
    ClientSettings, LogContext, Scrubber, describe_config_error, with_source_coordinates,
};
use crate::outbox::Origin;

/// How long `send` waits for room in librdkafka's queue before giving up
/// (the delivery itself is bounded by `message.timeout.ms`).
const QUEUE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a Kafka reporter cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum KafkaReporterError {
    #[error("source {source_name}: failure-report producer: {message}")]
    Producer {
        source_name: String,
        message: String,
    },
}

/// Where a Kafka source's reports go (its config builds it:
/// `KafkaSourceConfig::report_target`).
#[derive(Debug, Clone)]
pub struct KafkaTarget {
    /// The source's brokers and librdkafka settings.
    pub client: ClientSettings,
    /// The failure topic.
    pub topic: String,
}

/// Sends a source's failure reports to its `failure_topic`.
pub struct KafkaReporter {
    source: String,
    topic: String,
    producer: FutureProducer<LogContext>,
    scrubber: Scrubber,
}

impl std::fmt::Debug for KafkaReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaReporter")
            .field("source", &self.source)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaReporter {
    /// The reporter of a Kafka source. The producer connects lazily: a
    /// broker that is down now only makes the first sends fail (and be
    /// retried by the dispatcher).
    pub fn new(target: KafkaTarget) -> Result<KafkaReporter, KafkaReporterError> {
        let KafkaTarget { client, topic } = target;
        let scrubber = Scrubber::new(&client.librdkafka);
        let producer = client
            .producer_config("reports")
            .create_with_context(LogContext {
                source: client.source.clone(),
                scrubber: scrubber.clone(),
            })
            .map_err(|e| KafkaReporterError::Producer {
                source_name: client.source.clone(),
                message: describe_config_error(&e, &client.librdkafka),
            })?;
        Ok(KafkaReporter {
            source: client.source,
            topic,
            producer,
            scrubber,
        })
    }

    /// The topic reports go to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    async fn produce(&self, report: &Report) -> Result<(), ReportError> {
        let body = report.body();
        let report_id = report.id.to_string();
        let event_id = report.event_id.to_string();
        let queue_id = report.queue_id.to_string();
        let case_id = report.case_id.map(|c| c.to_string());
        let mut headers = OwnedHeaders::new_with_capacity(10)
            .insert(Header {
                key: "duvo-report-id",
                value: Some(report_id.as_str()),
            })
            .insert(Header {
                key: "duvo-event-id",
                value: Some(event_id.as_str()),
            })
            .insert(Header {
                key: "duvo-status",
                value: Some(report.status.as_str()),
            })
            .insert(Header {
                key: "duvo-bridge-source",
                value: Some(report.source.as_str()),
            })
            .insert(Header {
                key: "duvo-queue-id",
                value: Some(queue_id.as_str()),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            });
        if let Some(c) = &case_id {
            headers = headers.insert(Header {
                key: "duvo-case-id",
                value: Some(c.as_str()),
            });
        }
        let mut key = None;
        if let Some(Origin::Kafka {
            topic,
            partition,
            offset,
            key_b64,
        }) = &report.origin
        {
            headers = with_source_coordinates(headers, topic, *partition, *offset);
            key = match key_b64.as_deref().map(base64_decode) {
                Some(Some(k)) => Some(k),
                Some(None) => {
                    return Err(ReportError::Refused(
                        "the origin's key_b64 is not valid base64".into(),
                    ));
                }
                None => None,
            };
        }
        let mut rec = FutureRecord::<[u8], [u8]>::to(&self.topic)
            .payload(&body)
            .headers(headers);
        if let Some(k) = &key {
            rec = rec.key(k.as_slice());
        }
        match self.producer.send(rec, QUEUE_TIMEOUT).await {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(self.classify(e)),
        }
    }

    fn classify(&self, e: KafkaError) -> ReportError {
        let text = format!(
            "topic {}: {}",
            self.topic,
            self.scrubber.scrub(&e.to_string())
        );
        match e.rdkafka_error_code() {
            Some(
                RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::QueueFull
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition,
            ) => ReportError::Unreachable(text),
            _ => ReportError::Refused(text),
        }
    }
}

impl Reporter for KafkaReporter {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn send<'a>(&'a self, report: &'a Report) -> BoxFuture<'a, Result<(), ReportError>> {
        self.produce(report).boxed()
    }

    /// Every report of a Kafka source goes to its failure topic.
    fn destination(&self, _report: &Report) -> String {
        format!("topic {}", self.topic)
    }
}
