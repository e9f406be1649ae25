//! Writes dead-letter records to Kafka and reports each acknowledgement to the pipeline,
//! which settles the record's offset only then (DESIGN.md: a rejected record holds the
//! watermark until its dead-letter write is acknowledged).

use std::sync::mpsc::Sender;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use crate::config::Config;
use crate::dlq::DlqRecord;
use crate::offsets::Position;
use crate::pipeline::Ack;

/// A dead-letter record on its way, with the offsets it settles once acknowledged.
pub struct PendingDlq {
    pub record: DlqRecord,
    pub positions: Vec<Position>,
    pub label: &'static str,
}

pub struct DlqContext {
    acks: Sender<Ack>,
}

impl ClientContext for DlqContext {}

impl ProducerContext for DlqContext {
    type DeliveryOpaque = Box<PendingDlq>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Box<PendingDlq>) {
        let ack = match result {
            Ok(_) => Ack::DlqWritten(pending),
            Err((e, _)) => Ack::DlqFailed(pending, e.to_string()),
        };
        // The pipeline is gone only at shutdown, when nothing waits for this any more.
        let _ = self.acks.send(ack);
    }
}

pub struct DlqWriter {
    producer: ThreadedProducer<DlqContext>,
    topic: String,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot create the dead-letter producer: {0}")]
pub struct DlqWriterError(#[from] KafkaError);

impl DlqWriter {
    pub fn new(cfg: &Config, acks: Sender<Ack>) -> Result<DlqWriter, DlqWriterError> {
        let mut c = crate::consumer::client_config(cfg);
        // The dead-letter topic is the last copy of a record the worker gives up on: wait
        // for every in-sync replica.
        c.set("acks", "all").set("linger.ms", "5");
        let producer = c.create_with_context(DlqContext { acks })?;
        Ok(DlqWriter {
            producer,
            topic: cfg.kafka.dlq_topic.clone(),
        })
    }

    /// Queues the record; its acknowledgement arrives on the pipeline's channel.
    pub fn send(&self, pending: Box<PendingDlq>) {
        let mut pending = pending;
        loop {
            let mut headers = OwnedHeaders::new_with_capacity(pending.record.headers.len());
            for (k, v) in &pending.record.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: v.as_deref(),
                });
            }
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
            match self.producer.send(rec) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), rec)) => {
                    pending = rec.delivery_opaque;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((e, rec)) => {
                    tracing::warn!(error = %e, "dead-letter record not queued; retrying");
                    pending = rec.delivery_opaque;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }

    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}
