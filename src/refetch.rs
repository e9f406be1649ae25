//! Reads consumed records back by offset, for the dead-letter records of events Braze
//! rejected. The window keeps only a 16-byte position per event, not the payload (that is
//! what keeps a pending user under 300 bytes), so on the rare rejection the original key,
//! value and headers are fetched again from the log, on a thread of its own so the poll loop
//! never waits for it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

use crate::braze::Rejection;
use crate::config::Config;
use crate::dlq::{dead_letter, DlqReason, SourceRecord};
use crate::dlq_writer::{DlqWriter, PendingDlq};
use crate::offsets::Position;

/// The events of one partition that Braze rejected.
pub struct RejectedEvents {
    pub topic: std::sync::Arc<str>,
    pub partition: i32,
    pub positions: Vec<Position>,
    pub rejection: Rejection,
}

/// Starts the thread that reads rejected events back and dead-letters them. Each position
/// handed over comes back to the pipeline as exactly one dead-letter acknowledgement.
/// The thread ends once the sender is dropped; join it to be sure its clients are closed.
pub fn spawn(
    refetcher: Refetcher,
    dlq: std::sync::Arc<DlqWriter>,
) -> std::io::Result<(
    std::sync::mpsc::Sender<RejectedEvents>,
    std::thread::JoinHandle<()>,
)> {
    let (tx, rx) = std::sync::mpsc::channel::<RejectedEvents>();
    let handle = std::thread::Builder::new()
        .name("dlq-refetch".into())
        .spawn(move || {
            // Rejections come in bursts (a request's users): everything waiting is read back
            // with one fetch per partition.
            while let Ok(first) = rx.recv() {
                let mut jobs = vec![first];
                jobs.extend(rx.try_iter());
                refetcher.dead_letter(jobs, &dlq);
            }
        })?;
    Ok((tx, handle))
}

pub struct Refetcher {
    consumer: BaseConsumer,
}

impl Refetcher {
    pub fn new(cfg: &Config, group_id: &str) -> Result<Refetcher, KafkaError> {
        let mut c = crate::consumer::client_config(cfg);
        // Assigned, never subscribed: the group id only satisfies librdkafka; nothing is
        // committed under it.
        c.set("group.id", format!("{group_id}.refetch"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            // The records are there already: do not let the broker hold the fetch open.
            .set("fetch.wait.max.ms", "10");
        Ok(Refetcher {
            consumer: c.create()?,
        })
    }

    fn dead_letter(&self, jobs: Vec<RejectedEvents>, dlq: &DlqWriter) {
        let mut by_partition: BTreeMap<(std::sync::Arc<str>, i32), Vec<RejectedEvents>> =
            BTreeMap::new();
        for job in jobs {
            by_partition
                .entry((job.topic.clone(), job.partition))
                .or_default()
                .push(job);
        }
        for ((topic, partition), jobs) in by_partition {
            let offsets: Vec<i64> = jobs
                .iter()
                .flat_map(|j| j.positions.iter().map(|p| p.offset()))
                .collect();
            let found = self.fetch(&topic, partition, &offsets, Duration::from_secs(10));
            for job in jobs {
                for pos in job.positions {
                    let reason = DlqReason::Rejected {
                        status: job.rejection.status,
                        error_type: job.rejection.error_type.clone(),
                        message: job.rejection.message.clone(),
                    };
                    let msg = found.get(&pos.offset());
                    if msg.is_none() {
                        tracing::warn!(
                            topic = &*topic,
                            partition,
                            offset = pos.offset(),
                            "rejected record no longer readable; dead-lettering its context only"
                        );
                    }
                    let src = SourceRecord {
                        topic: &topic,
                        partition,
                        offset: pos.offset(),
                        timestamp: msg.and_then(|m| m.timestamp().to_millis()),
                        key: msg.and_then(|m| m.key()),
                        value: msg.and_then(|m| m.payload()),
                        headers: msg.map(headers_of).unwrap_or_default(),
                    };
                    dlq.send(Box::new(PendingDlq {
                        record: dead_letter(&src, &reason),
                        positions: vec![pos],
                        label: reason.metric_label(),
                    }));
                }
            }
        }
    }

    /// The records at `offsets` of one partition; an offset missing from the answer is no
    /// longer in the log (retention) or could not be read within `timeout`.
    pub fn fetch(
        &self,
        topic: &str,
        partition: i32,
        offsets: &[i64],
        timeout: Duration,
    ) -> BTreeMap<i64, OwnedMessage> {
        let mut found = BTreeMap::new();
        let (Some(&first), Some(&last)) = (offsets.iter().min(), offsets.iter().max()) else {
            return found;
        };
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(topic, partition, Offset::Offset(first))
            .and_then(|_| self.consumer.assign(&tpl))
            .is_err()
        {
            return found;
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let offset = m.offset();
                    if offsets.contains(&offset) {
                        found.insert(offset, m.detach());
                    }
                    if offset >= last {
                        break;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, topic, partition, "re-reading a rejected record")
                }
                None => {}
            }
        }
        let _ = self.consumer.unassign();
        found
    }
}

/// The original headers of a record, borrowed, as `dlq::SourceRecord` wants them.
fn headers_of(m: &OwnedMessage) -> Vec<(&str, Option<&[u8]>)> {
    m.headers()
        .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
        .unwrap_or_default()
}
