//! Writes dead-letter records to Kafka and reports what became of each one, so that the
//! pipeline settles a record's offset only once its copy is acknowledged (docs/design.md: a
//! rejected record holds the watermark until its dead-letter write is acknowledged).
//!
//! A record Kafka can never take (over the producer's `message.max.bytes` or the topic's
//! `max.message.bytes`) is written again without its value, then without its key and
//! original headers, with a header saying so: the coordinates always fit, and the worker
//! never waits on a write that cannot succeed.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use super::DlqRecord;
use crate::config::Config;
use crate::offsets::Position;

/// The `reason` label of a dead-letter record written without its value because Kafka
/// would not take it whole.
pub const LABEL_TOO_LARGE: &str = "too_large";

/// A dead-letter record on its way, with the offsets it settles once acknowledged.
#[derive(Debug)]
pub struct PendingDlq {
    pub record: DlqRecord,
    pub positions: Vec<Position>,
    /// The `reason` label of `segment_sync_dlq_records_total` it counts under.
    pub label: &'static str,
}

impl PendingDlq {
    /// Drops what makes the record too large (see [`DlqRecord::omit_payload`]); false when
    /// there is nothing left to drop.
    pub fn shrink(&mut self, why: &str) -> bool {
        let shrunk = self.record.omit_payload(why);
        if shrunk {
            self.label = LABEL_TOO_LARGE;
        }
        shrunk
    }
}

/// What became of a dead-letter write.
#[derive(Debug)]
pub enum DlqOutcome {
    /// Acknowledged by every in-sync replica: its positions may settle.
    Written(Box<PendingDlq>),
    /// Not written (the broker refused it, or it timed out): write it again later.
    Failed(Box<PendingDlq>, String),
    /// Refused as too large for the topic and made smaller: write it again now.
    Shrunk(Box<PendingDlq>),
}

/// Where outcomes go; called on librdkafka's thread, so it must only hand them over.
pub type Notify = Box<dyn Fn(DlqOutcome) + Send + Sync>;

pub struct DlqContext {
    notify: Notify,
}

impl ClientContext for DlqContext {}

impl ProducerContext for DlqContext {
    type DeliveryOpaque = Box<PendingDlq>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Box<PendingDlq>) {
        let outcome = match result {
            Ok(_) => DlqOutcome::Written(pending),
            Err((e, _)) if is_too_large(e) => {
                // The topic's own limit, below the producer's: smaller, and again.
                let mut pending = pending;
                if pending.shrink(&format!("refused by the dead-letter topic: {e}")) {
                    tracing::warn!(error = %e, "dead-letter record too large for the topic; writing it without its value");
                    DlqOutcome::Shrunk(pending)
                } else {
                    DlqOutcome::Failed(pending, e.to_string())
                }
            }
            Err((e, _)) => DlqOutcome::Failed(pending, e.to_string()),
        };
        (self.notify)(outcome);
    }
}

fn is_too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge)
    )
}

/// The dead-letter producer. Sending never blocks or sleeps: a full local queue hands the
/// record back to the caller to try again later.
pub struct DlqWriter {
    producer: ThreadedProducer<DlqContext>,
    topic: String,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot create the dead-letter producer: {0}")]
pub struct DlqWriterError(KafkaError);

// The message names the cause, so it is not also a `source()` (see crate::error).
impl From<KafkaError> for DlqWriterError {
    fn from(cause: KafkaError) -> Self {
        DlqWriterError(cause)
    }
}

impl DlqWriter {
    pub fn new(cfg: &Config, notify: Notify) -> Result<DlqWriter, DlqWriterError> {
        let producer = crate::kafka::dead_letter_producer_config(cfg)
            .create_with_context(DlqContext { notify })?;
        Ok(DlqWriter {
            producer,
            topic: cfg.kafka.dlq_topic.clone(),
        })
    }

    /// Queues the record; what becomes of it reaches the `Notify` callback, once. `Err` gives
    /// it back when librdkafka's queue is full: try again after a short while.
    pub fn send(&self, pending: Box<PendingDlq>) -> Result<(), Box<PendingDlq>> {
        let mut pending = pending;
        loop {
            match self.enqueue(pending) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), p)) => {
                    return Err(p)
                }
                Err((e, mut p)) if is_too_large(&e) => {
                    let why = format!("{} bytes over the producer's message.max.bytes", p.size());
                    if !p.shrink(&why) {
                        self.fail(p, e);
                        return Ok(());
                    }
                    tracing::warn!(error = %e, "dead-letter record too large; writing it without its value");
                    pending = p;
                }
                Err((e, p)) => {
                    self.fail(p, e);
                    return Ok(());
                }
            }
        }
    }

    fn fail(&self, pending: Box<PendingDlq>, e: KafkaError) {
        (self.producer.context().notify)(DlqOutcome::Failed(pending, e.to_string()));
    }

    fn enqueue(&self, pending: Box<PendingDlq>) -> Result<(), (KafkaError, Box<PendingDlq>)> {
        let headers = crate::kafka::owned_headers(
            pending
                .record
                .headers
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_deref())),
        );
        // The record's own timestamp is not set: the dead-letter copy of an old record would
        // fall under the dead-letter topic's time retention at once. It is in the headers'
        // coordinates' reach, and librdkafka copies key and value when it queues them.
        let key = pending.record.key.clone();
        let value = pending.record.value.clone();
        let mut rec: BaseRecord<'_, [u8], [u8], Box<PendingDlq>> =
            BaseRecord::with_opaque_to(&self.topic, pending).headers(headers);
        if let Some(k) = key.as_deref() {
            rec = rec.key(k);
        }
        if let Some(v) = value.as_deref() {
            rec = rec.payload(v);
        }
        self.producer
            .send(rec)
            .map_err(|(e, rec)| (e, rec.delivery_opaque))
    }

    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }

    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}

impl PendingDlq {
    /// Bytes of key, value and headers: what the broker's size limit is about.
    fn size(&self) -> usize {
        let r = &self.record;
        r.key.as_ref().map_or(0, Vec::len)
            + r.value.as_ref().map_or(0, Vec::len)
            + r.headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }
}
