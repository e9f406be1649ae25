//! The state topic and the changes topic in Kafka: creating the compacted state topic, reading
//! a segment's committed state into a spill, and writing changes with their state records in
//! transactions of a bounded size under a `transactional.id` stable per segment.

use std::time::{Duration, Instant};

use futures::executor::block_on;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use super::diff::Applied;
use super::spill::Spill;
use super::state::{self, StateRecord};
use super::SnapshotError;
use crate::config::Config;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Reading the state gives up when it makes no progress for this long.
const READ_STALL: Duration = Duration::from_secs(120);

fn kafka(what: &str, e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Kafka(format!("{what}: {e}"))
}

/// Creates the state topic, compacted, unless it exists.
pub fn ensure_state_topic(cfg: &Config, topic: &str) -> Result<(), SnapshotError> {
    if topic_exists(cfg, topic)? {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = crate::kafka::client_config(cfg)
        .create()
        .map_err(|e| kafka("creating an admin client", e))?;
    // -1: the broker's default replication factor, as an operator's other topics have.
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact");
    let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
    let results = block_on(admin.create_topics([&new], &options))
        .map_err(|e| kafka(&format!("creating the state topic {topic}"), e))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(kafka(&format!("creating the state topic {topic}"), code))
            }
        }
    }
    Ok(())
}

/// Whether `topic` exists with partitions (a metadata request, which creates nothing).
pub fn topic_exists(cfg: &Config, topic: &str) -> Result<bool, SnapshotError> {
    let consumer: BaseConsumer = crate::kafka::client_config(cfg)
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(|e| kafka("creating a metadata client", e))?;
    let md = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|e| kafka(&format!("metadata of {topic}"), e))?;
    Ok(md
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()))
}

/// The state reader's context: the end of a partition is how the reader knows it has read
/// everything, not an error to log (librdkafka also reports it as a client error).
struct StateReader;

impl rdkafka::ClientContext for StateReader {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !eof {
            tracing::warn!(%error, reason, "reading the snapshot state");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for StateReader {}

/// Reads the committed records of `segment` from the state topic: its members go into
/// `members` (in log order, so the spill's last write wins), and the run applied last is
/// returned. Read committed: a killed run's open transaction is never seen.
pub fn read_state(
    cfg: &Config,
    topic: &str,
    segment: &str,
    members: &mut Spill,
) -> Result<Option<Applied>, SnapshotError> {
    let mut c = crate::kafka::client_config(cfg);
    c.set("group.id", "segment-sync-snapshot")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        // The state is read once, start to end: larger fetches than the default megabyte.
        .set("max.partition.fetch.bytes", "16777216")
        // librdkafka waits a second (its default) before fetching again once its local queue
        // is full; this reader drains the queue at once, so that pause would be most of the
        // read (9 of 11 s for 1,000,000 members).
        .set("fetch.queue.backoff.ms", "10")
        .set("enable.partition.eof", "true");
    let consumer: BaseConsumer<StateReader> = c
        .create_with_context(StateReader)
        .map_err(|e| kafka("creating the consumer", e))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|e| kafka(&format!("metadata of {topic}"), e))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(kafka(topic, "the state topic has no partitions"));
    }
    let mut tpl = TopicPartitionList::new();
    let mut pending = std::collections::HashSet::new();
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, REQUEST_TIMEOUT)
            .map_err(|e| kafka(&format!("watermarks of {topic} [{p}]"), e))?;
        if high > low {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)
                .map_err(|e| kafka("assigning", e))?;
            pending.insert(*p);
        }
    }
    if pending.is_empty() {
        return Ok(None);
    }
    consumer
        .assign(&tpl)
        .map_err(|e| kafka("assigning the state topic", e))?;
    let mut applied = None;
    let mut progress = Instant::now();
    while !pending.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            None => {
                if progress.elapsed() > READ_STALL {
                    return Err(kafka(
                        topic,
                        "no progress reading the state for 2 minutes (a transaction left open?)",
                    ));
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                pending.remove(&p);
            }
            Some(Err(e)) => return Err(kafka(&format!("reading {topic}"), e)),
            Some(Ok(m)) => {
                progress = Instant::now();
                let Some(key) = m.key() else { continue };
                match state::parse(segment, key, m.payload())? {
                    None => {}
                    Some(StateRecord::Member(_, Some(member))) => members.put(&member)?,
                    Some(StateRecord::Member(user, None)) => members.remove(&user)?,
                    Some(StateRecord::Segment(a)) => applied = a,
                }
            }
        }
    }
    members.flush()?;
    Ok(applied)
}

/// Writes changes and state records in transactions of at most `limit` changes each; the
/// segment's record goes into the last one. Promises: nothing is visible to a read-committed
/// reader until its transaction commits, and a writer of the same segment started later
/// fences this one.
pub struct TxnWriter {
    producer: ThreadedProducer<DefaultProducerContext>,
    changes_topic: String,
    state_topic: String,
    limit: usize,
    in_txn: usize,
    open: bool,
    pub committed: u64,
    /// Test hook: stop (without committing) before committing this transaction number.
    pause_before: Option<u64>,
}

impl TxnWriter {
    pub fn new(
        cfg: &Config,
        segment: &str,
        changes_topic: &str,
        state_topic: &str,
        pause_before: Option<u64>,
    ) -> Result<TxnWriter, SnapshotError> {
        let mut c = crate::kafka::client_config(cfg);
        c.set(
            "transactional.id",
            format!("segment-sync-snapshot.{state_topic}.{segment}"),
        )
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        // A killed run's open transaction is aborted by the broker after this, or at once
        // by the next run of the segment (init_transactions fences it).
        .set("transaction.timeout.ms", "60000")
        // Bounds the producer's memory on a large run: at most this many records wait to be sent.
        .set("queue.buffering.max.messages", "100000");
        let producer: ThreadedProducer<DefaultProducerContext> =
            c.create().map_err(|e| kafka("creating the producer", e))?;
        producer
            .init_transactions(REQUEST_TIMEOUT)
            .map_err(|e| kafka("initialising transactions", e))?;
        Ok(TxnWriter {
            producer,
            changes_topic: changes_topic.to_string(),
            state_topic: state_topic.to_string(),
            limit: cfg.snapshot.transaction_records.max(1),
            in_txn: 0,
            open: false,
            committed: 0,
            pause_before,
        })
    }

    fn begin(&mut self) -> Result<(), SnapshotError> {
        if !self.open {
            self.producer
                .begin_transaction()
                .map_err(|e| kafka("beginning a transaction", e))?;
            self.open = true;
            self.in_txn = 0;
        }
        Ok(())
    }

    fn send(&self, topic: &str, key: &[u8], value: Option<&[u8]>) -> Result<(), SnapshotError> {
        let mut record = BaseRecord::<[u8], [u8]>::to(topic).key(key);
        if let Some(v) = value {
            record = record.payload(v);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(kafka(&format!("producing to {topic}"), e)),
            }
        }
    }

    /// One change and, unless `state` is `None`, its member's state record (`Some(None)`: a
    /// tombstone).
    pub fn change(
        &mut self,
        user: &str,
        payload: &[u8],
        state: Option<(Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<(), SnapshotError> {
        self.begin()?;
        self.send(&self.changes_topic, user.as_bytes(), Some(payload))?;
        if let Some((key, value)) = state {
            self.send(&self.state_topic, &key, value.as_deref())?;
        }
        self.in_txn += 1;
        if self.in_txn >= self.limit {
            self.commit()?;
        }
        Ok(())
    }

    /// A state record without a change (a member whose record is rewritten or removed).
    pub fn state(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), SnapshotError> {
        self.begin()?;
        self.send(&self.state_topic.clone(), key, value)
    }

    fn commit(&mut self) -> Result<(), SnapshotError> {
        if !self.open {
            return Ok(());
        }
        if self.pause_before == Some(self.committed + 1) {
            let _ = self.producer.flush(REQUEST_TIMEOUT);
            eprintln!(
                "snapshot: paused before committing transaction {}",
                self.committed + 1
            );
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        self.producer
            .commit_transaction(REQUEST_TIMEOUT)
            .map_err(|e| kafka("committing a transaction", e))?;
        self.open = false;
        self.committed += 1;
        Ok(())
    }

    /// The segment's record (`None`: a tombstone, the segment retired) in the last
    /// transaction, then commits it.
    pub fn finish(
        &mut self,
        segment: &str,
        applied: Option<&Applied>,
    ) -> Result<(), SnapshotError> {
        let value = applied.map(state::segment_value);
        self.begin()?;
        self.send(
            &self.state_topic.clone(),
            &state::segment_key(segment),
            value.as_deref(),
        )?;
        self.commit()
    }
}
