//! Reads consumed records back by offset, for the dead-letter records of events Braze
//! rejected. The window keeps only a 16-byte position per event, not the payload (that is
//! what keeps a pending user under 300 bytes), so on the rare rejection the original key,
//! value and headers are fetched again from the log.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;

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
            .set("enable.partition.eof", "true");
        Ok(Refetcher {
            consumer: c.create()?,
        })
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
                Some(Err(e)) => tracing::warn!(error = %e, topic, partition, "re-reading a rejected record"),
                None => {}
            }
        }
        let _ = self.consumer.unassign();
        found
    }
}

/// The original headers of a record, borrowed, as `dlq::SourceRecord` wants them.
pub fn headers_of(m: &OwnedMessage) -> Vec<(&str, Option<&[u8]>)> {
    m.headers()
        .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
        .unwrap_or_default()
}
